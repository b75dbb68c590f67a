//! Rate-limited, aggregated log lines for events that can come in floods (refused
//! connections, failed handshakes, lost records): the first one is logged at once, then at
//! most one line per window says how many of each reason happened since the last line.
//! Metrics count every event; the log only has to show that something is going on.
//!
//! [`Tally::note`] is sans-IO (`now` passed in) and returns the counts to log, so the window
//! logic is tested without a clock; [`Tally::note_and_log`] is the one-call form.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Default window between two aggregated lines.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);

/// Counts of events per reason label since the last line.
pub(crate) type Counts = BTreeMap<&'static str, u64>;

/// One kind of flooding event (`what`: "connections refused", "records lost", …).
#[derive(Debug)]
pub(crate) struct Tally {
    what: &'static str,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last_line: Option<Instant>,
    pending: Counts,
}

impl Tally {
    /// A tally of `what`, at most one line per `window`.
    pub(crate) const fn new(what: &'static str, window: Duration) -> Self {
        Tally {
            what,
            window,
            state: Mutex::new(State {
                last_line: None,
                pending: BTreeMap::new(),
            }),
        }
    }

    /// Counts one event with `reason` at `now`; returns the counts to log when a line is due
    /// (the first event, then the first event at least one window after the last line).
    pub(crate) fn note(&self, reason: &'static str, now: Instant) -> Option<Counts> {
        // A panic inside this short critical section cannot leave the counts inconsistent.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *s.pending.entry(reason).or_default() += 1;
        let due = s
            .last_line
            .is_none_or(|t| now.saturating_duration_since(t) >= self.window);
        if !due {
            return None;
        }
        s.last_line = Some(now);
        Some(std::mem::take(&mut s.pending))
    }

    /// Counts what was noted but not yet logged, and forgets it (at shutdown).
    pub(crate) fn take_pending(&self) -> Counts {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()).pending)
    }

    /// [`Tally::note`] at the current time, logging a due line at WARN:
    /// `<what>: <n> since the last report` with `counts` = `reason=n, …`.
    pub(crate) fn note_and_log(&self, reason: &'static str) {
        if let Some(counts) = self.note(reason, Instant::now()) {
            self.log(&counts);
        }
    }

    /// Logs `counts` as one line (nothing when empty).
    pub(crate) fn log(&self, counts: &Counts) {
        let total: u64 = counts.values().sum();
        if total == 0 {
            return;
        }
        let text = counts
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(
            total,
            counts = %text,
            window_s = self.window.as_secs(),
            "{} (aggregated: at most one line per window; every one is counted in /metrics)",
            self.what
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_event_then_one_line_per_window() {
        let t = Tally::new("x", Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(t.note("a", at(0)), Some(Counts::from([("a", 1)])));
        let mut lines = 0;
        for i in 1..10_000u64 {
            // 10 000 events over 9.999 s: nothing more is due inside the window.
            if t.note(if i % 2 == 0 { "a" } else { "b" }, at(i)).is_some() {
                lines += 1;
            }
        }
        assert_eq!(lines, 0);
        let line = t.note("a", at(10_000)).unwrap();
        assert_eq!(line, Counts::from([("a", 5_000), ("b", 5_000)]));
        assert_eq!(t.note("a", at(10_001)), None);
        assert_eq!(t.take_pending(), Counts::from([("a", 1)]));
        assert!(t.take_pending().is_empty());
    }
}
