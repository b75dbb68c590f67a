//! What the dialplan does after voicegate ends an `AudioSocket()` or channel-driver call
//! (`asterisk.md`, "ARI facts": in modes 1 and 2 ARI cannot move the caller, so the dialplan
//! asks voicegate over HTTP once `AudioSocket()` returns):
//!
//! ```text
//! same => n,Set(NEXT=${CURL(http://127.0.0.1:9100/v1/calls/${AS_UUID}/next)})
//! ```
//!
//! The answer is a bare word: `operator`, `hangup`, or a queue/extension the agent chose.
//! Anything voicegate does not know (an unknown id, a forgotten call) answers `operator`, and
//! the dialplan treats an empty answer (voicegate down) the same way: a caller is never left
//! in dead air. Entries live [`NextStore::TTL`] and at most [`NextStore::CAPACITY`] are kept.

use crate::call::directory::{Admission, AdmitFuture, CallDetails, CallDirectory};
use crate::call::{CallSummary, Outcome};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What the dialplan should do next with a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send the caller to the operator queue (the default).
    Operator,
    /// The conversation is over: hang up.
    Hangup,
    /// A queue or extension the agent chose (`[A-Za-z0-9_.@-]`, at most 64 characters).
    Target(String),
}

impl Next {
    /// The answer body: `operator`, `hangup` or the target.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Next::Operator => "operator",
            Next::Hangup => "hangup",
            Next::Target(t) => t,
        }
    }

    /// A target the agent chose, if it is safe to hand to the dialplan (letters, digits,
    /// `_ . @ -`, 1 to 64 characters); `None` otherwise.
    pub fn target(name: &str) -> Option<Next> {
        let ok = (1..=64).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-'));
        ok.then(|| Next::Target(name.to_owned()))
    }

    /// The default for a call that ended with `outcome` and no explicit choice: `hangup` only
    /// when the agent ended the conversation, `operator` for everything else (a failure, a
    /// close voicegate did not ask for, shutdown).
    pub(crate) fn from_outcome(outcome: &Outcome) -> Next {
        match outcome {
            Outcome::AgentEnded(_) => Next::Hangup,
            _ => Next::Operator,
        }
    }
}

/// Call id → [`Next`], shared by the listener (writes) and the HTTP handler (reads).
#[derive(Debug, Default)]
pub struct NextStore {
    entries: Mutex<HashMap<Uuid, (Next, Instant)>>,
}

impl NextStore {
    /// How long an answer is kept after it is written.
    pub(crate) const TTL: Duration = Duration::from_secs(600);
    /// Most answers kept; the oldest go first beyond that.
    pub(crate) const CAPACITY: usize = 10_000;

    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an explicit choice (a tool's transfer, a queue), replacing any earlier one.
    pub fn set(&self, call_id: Uuid, next: Next) {
        self.insert(call_id, next, true);
    }

    /// Records `next` unless a choice is already recorded for the call.
    pub(crate) fn set_default(&self, call_id: Uuid, next: Next) {
        self.insert(call_id, next, false);
    }

    fn insert(&self, call_id: Uuid, next: Next, replace: bool) {
        let now = Instant::now();
        // A poisoned lock only means another thread panicked mid-insert; the map is intact.
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::CAPACITY {
            map.retain(|_, (_, at)| now.duration_since(*at) < Self::TTL);
            if map.len() >= Self::CAPACITY {
                if let Some(oldest) = map.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                    map.remove(&oldest);
                }
            }
        }
        if replace || !map.contains_key(&call_id) {
            map.insert(call_id, (next, now));
        }
    }

    /// The recorded answer for a call, if any and not expired.
    pub(crate) fn get(&self, call_id: Uuid) -> Option<Next> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&call_id)
            .filter(|(_, at)| at.elapsed() < Self::TTL)
            .map(|(n, _)| n.clone())
    }

    /// The body for `GET /v1/calls/{id}/next`: the recorded answer, or `operator` for an
    /// unknown or malformed id.
    pub fn answer(&self, id: &str) -> String {
        Uuid::parse_str(id)
            .ok()
            .and_then(|id| self.get(id))
            .unwrap_or(Next::Operator)
            .as_str()
            .to_owned()
    }

    /// Routes an HTTP request path: `Some(body)` for `/v1/calls/{id}/next` (query ignored),
    /// `None` for any other path. Mount it on the health listener for `GET`.
    pub fn route(&self, path: &str) -> Option<String> {
        let path = path.split('?').next().unwrap_or(path);
        let id = path.strip_prefix("/v1/calls/")?.strip_suffix("/next")?;
        (!id.contains('/')).then(|| self.answer(id))
    }
}

/// Admits every call and records its default answer when it ends: the directory to install
/// when ARI is not configured.
impl CallDirectory for NextStore {
    fn admit(&self, _call_id: Uuid, _end: CancellationToken) -> AdmitFuture<'_> {
        Box::pin(async { Admission::Accept(CallDetails::default()) })
    }

    fn finished(&self, summary: &mut CallSummary) {
        self.set_default(summary.call_id, Next::from_outcome(&summary.outcome));
    }
}

/// Lets a shared store be installed as the directory while the HTTP side keeps a handle.
impl CallDirectory for std::sync::Arc<NextStore> {
    fn admit(&self, call_id: Uuid, end: CancellationToken) -> AdmitFuture<'_> {
        (**self).admit(call_id, end)
    }

    fn finished(&self, summary: &mut CallSummary) {
        (**self).finished(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let s = NextStore::new();
        let id = Uuid::new_v4();
        assert_eq!(s.answer(&id.to_string()), "operator");
        assert_eq!(s.answer("not-a-uuid"), "operator");
        s.set_default(id, Next::Hangup);
        assert_eq!(
            s.route(&format!("/v1/calls/{id}/next")).as_deref(),
            Some("hangup")
        );
        // An explicit choice wins over the default, whichever comes first.
        s.set(id, Next::target("support").unwrap());
        s.set_default(id, Next::Hangup);
        assert_eq!(s.answer(&id.to_string()), "support");
        assert_eq!(s.route("/v1/calls/x/y/next"), None);
        assert_eq!(s.route("/health"), None);
        assert!(Next::target("q;System(rm)").is_none());
        assert_eq!(
            Next::from_outcome(&Outcome::Fallback("x".into())),
            Next::Operator
        );
        assert_eq!(Next::from_outcome(&Outcome::CallerHungUp), Next::Operator);
        assert_eq!(
            Next::from_outcome(&Outcome::AgentEnded("bye".into())),
            Next::Hangup
        );
    }
}
