//! Capturing a test's log output to check that every line of a call carries its call id
//! (issue 15: every task of a call runs inside the call's tracing span).
//!
//! Use inside a current-thread `#[tokio::test]`: [`capture`] installs (once per test binary)
//! a global TRACE-level subscriber whose output goes only to the buffer of the thread that
//! captures, so the call's tasks (all on this thread) log into it and tests running in
//! parallel on other threads neither add to it nor pay for formatting. (A thread-local
//! `set_default` per test is not enough when tests run in parallel: tracing caches each
//! callsite's interest across threads, and a callsite first hit on another thread, without
//! a subscriber, stays silent for the test that captures. For the same reason no test in a
//! binary that uses this may install a `set_default` subscriber of its own: callsites
//! registered beside it would ignore the global one.)
#![allow(dead_code)]

use std::cell::RefCell;
use std::sync::{Arc, Mutex, Once};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use uuid::Uuid;

/// The log text written on one thread while its [`Capturing`] guard lives.
#[derive(Clone, Default)]
pub(crate) struct CallLogs(Arc<Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: RefCell<Option<CallLogs>> = const { RefCell::new(None) };
}

impl std::io::Write for CallLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes to the buffer of the thread that logs, if it captures.
struct ThreadWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ThreadWriter {
    type Writer = CallLogs;
    fn make_writer(&'a self) -> CallLogs {
        CAPTURE.with(|c| c.borrow().clone()).unwrap_or_default()
    }
}

/// Stops the capture of this thread when dropped.
pub(crate) struct Capturing;

impl Drop for Capturing {
    fn drop(&mut self) {
        CAPTURE.with(|c| *c.borrow_mut() = None);
    }
}

/// Starts capturing every event (TRACE and up, no colours) of this thread.
pub(crate) fn capture() -> (CallLogs, Capturing) {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(ThreadWriter)
            // Dynamic: asked for every event (a `filter_fn` would cache its first answer
            // per callsite, given on whichever thread hit it first).
            .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|_, _| {
                CAPTURE.with(|c| c.borrow().is_some())
            }));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        // Callsites other tests hit before now were cached as uninteresting (tracing-core
        // 0.1.36 does not rebuild the cache for a global default): ask them again.
        tracing::callsite::rebuild_interest_cache();
    });
    let logs = CallLogs::default();
    CAPTURE.with(|c| *c.borrow_mut() = Some(logs.clone()));
    (logs, Capturing)
}

/// Log targets (module paths) whose every line belongs to a call: the agents, the call
/// session and the tools.
const CALL_TARGETS: [&str; 3] = ["voicegate::agent", "voicegate::call", "voicegate::tools"];

impl CallLogs {
    /// Everything captured so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Asserts that every captured line logged by a call's module ([`CALL_TARGETS`]) carries
    /// `call_id=<call_id>` (from the call's span), and that at least one line came from each
    /// target in `expected` (so the check saw the tasks it is about: `voicegate::agent::cascade::stt`, …).
    pub(crate) fn assert_every_call_line_has(&self, call_id: Uuid, expected: &[&str]) {
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
