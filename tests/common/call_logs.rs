//! Capturing a test's log output to check that every line of a call carries its call id
//! (issue 15: every task of a call runs inside the call's tracing span).
//!
//! Use inside a current-thread `#[tokio::test]`: [`capture`] installs a TRACE-level
//! subscriber for this thread only, so the call's tasks (all on this thread) log into the
//! buffer and other tests running in parallel do not.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// The log text written while the guard of [`capture`] lives.
#[derive(Clone, Default)]
pub struct CallLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CallLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CallLogs {
    type Writer = CallLogs;
    fn make_writer(&'a self) -> CallLogs {
        self.clone()
    }
}

/// Starts capturing every event (TRACE and up, no colours) of this thread.
pub fn capture() -> (CallLogs, tracing::subscriber::DefaultGuard) {
    let logs = CallLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    (logs.clone(), tracing::subscriber::set_default(subscriber))
}

/// Log targets (module paths) whose every line belongs to a call: the agents, the call
/// session and the tools.
const CALL_TARGETS: [&str; 3] = ["voicegate::agent", "voicegate::call", "voicegate::tools"];

impl CallLogs {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Asserts that every captured line logged by a call's module ([`CALL_TARGETS`]) carries
    /// `call_id=<call_id>` (from the call's span), and that at least one line came from each
    /// target in `expected` (so the check saw the tasks it is about: `voicegate::agent::cascade::stt`, …).
    pub fn assert_every_call_line_has(&self, call_id: Uuid, expected: &[&str]) {
        let text = self.text();
        let needle = format!("call_id={call_id}");
        let mut seen = vec![0usize; expected.len()];
        for line in text.lines() {
            let Some(target) = target_of(line) else {
                continue;
            };
            if !CALL_TARGETS.iter().any(|t| target.starts_with(t)) {
                continue;
            }
            assert!(
                line.contains(&needle),
                "a line of the call without its id {call_id}:\n{line}\n\nall lines:\n{text}"
            );
            for (n, want) in seen.iter_mut().zip(expected) {
                if target.starts_with(want) {
                    *n += 1;
                }
            }
        }
        for (n, want) in seen.iter().zip(expected) {
            assert!(*n > 0, "no line from {want}:\n{text}");
        }
    }
}

/// The target of one line of tracing-subscriber's default format
/// (`<time> <LEVEL> <spans>: <target>: <message>`): the first `: `-separated word that is a
/// `voicegate::` module path.
fn target_of(line: &str) -> Option<&str> {
    line.split(": ")
        .map(|w| w.rsplit(' ').next().unwrap_or(w))
        .find(|w| w.starts_with("voicegate::") || *w == "voicegate")
}
