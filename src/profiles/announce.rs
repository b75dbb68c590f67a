//! The announcements of modes 1 and 2: before `AudioSocket()` the dialplan POSTs the call's
//! profile and caller details to `/v1/calls/{uuid}` on the health listener (`CURL()`); the
//! call takes them when its connection arrives with that id.
//!
//! The store is bounded ([`CAPACITY`] calls; when full the oldest is dropped) and each entry
//! lives at most [`TTL`]: an announced call that never connects costs nothing for long.

use super::ProfileChoice;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// Most announcements kept at once.
pub(crate) const CAPACITY: usize = 4096;
/// How long an announcement waits for its call (the dialplan runs `AudioSocket()` right
/// after `CURL()`, so seconds would do; a minute leaves room for a slow answer).
pub(crate) const TTL: Duration = Duration::from_secs(60);

/// Announcements waiting for their calls.
#[derive(Debug, Default)]
pub struct Announcements {
    inner: Mutex<HashMap<Uuid, (Instant, ProfileChoice)>>,
}

impl Announcements {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `choice` for `call_id` as of `now`, replacing an earlier one for the same id.
    /// Expired entries go first; when still full, the oldest is dropped.
    pub(crate) fn announce(&self, call_id: Uuid, choice: ProfileChoice, now: Instant) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (at, _)| now.saturating_duration_since(*at) < TTL);
        if map.len() >= CAPACITY && !map.contains_key(&call_id) {
            if let Some(oldest) = map.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(call_id, (now, choice.bounded()));
    }

    /// Takes the announcement of `call_id`, if one was made within [`TTL`] before `now`.
    pub(crate) fn take(&self, call_id: Uuid, now: Instant) -> Option<ProfileChoice> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (at, choice) = map.remove(&call_id)?;
        (now.saturating_duration_since(at) < TTL).then_some(choice)
    }

    /// Announcements held now (expired ones included until the next announce).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Parses an announce body: JSON (`{"profile": …, "caller_number": …, "caller_name": …,
    /// "called_number": …, "variables": {…}}`) when it starts with `{`, else a form
    /// (`profile=sales&caller_number=…&var_customer=…`, what `CURL(url,data)` sends).
    ///
    /// # Errors
    /// A message for the HTTP 400 answer when the body is neither.
    pub(crate) fn parse_body(body: &[u8]) -> Result<ProfileChoice, String> {
        let trimmed = body.trim_ascii_start();
        if trimmed.first() == Some(&b'{') {
            serde_json::from_slice::<ProfileChoice>(trimmed)
                .map(ProfileChoice::bounded)
                .map_err(|e| format!("invalid JSON announce: {e}"))
        } else {
            let pairs: Vec<(String, String)> = form_urlencoded::parse(trimmed)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            Ok(ProfileChoice::from_uri_params(
                pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_announcement_is_gone_and_an_old_one_expired() {
        let s = Announcements::new();
        let t0 = Instant::now();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let sales = ProfileChoice {
            profile: Some("sales".into()),
            ..ProfileChoice::default()
        };
        s.announce(a, sales.clone(), t0);
        s.announce(b, sales.clone(), t0);
        assert_eq!(s.take(a, t0 + Duration::from_secs(1)), Some(sales));
        assert_eq!(s.take(a, t0 + Duration::from_secs(1)), None);
        assert_eq!(s.take(b, t0 + TTL), None, "expired");
    }

    #[test]
    fn the_store_is_bounded_dropping_the_oldest() {
        let s = Announcements::new();
        let t0 = Instant::now();
        let first = Uuid::new_v4();
        s.announce(first, ProfileChoice::default(), t0);
        for i in 0..CAPACITY {
            let at = t0 + Duration::from_millis(1 + i as u64 / 100);
            s.announce(Uuid::new_v4(), ProfileChoice::default(), at);
        }
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s.take(first, t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn form_and_json_bodies_parse_alike() {
        let form = b"profile=sales&caller_number=%2B4930123&caller_name=Ann+Lee&called_number=200&var_customer=C-17&tier=gold";
        let json = br#"{"profile":"sales","caller_number":"+4930123","caller_name":"Ann Lee","called_number":"200","variables":{"customer":"C-17","tier":"gold"}}"#;
        let a = Announcements::parse_body(form).unwrap();
        let b = Announcements::parse_body(json).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.caller_name.as_deref(), Some("Ann Lee"));
        assert_eq!(a.variables["customer"], "C-17");
        assert!(Announcements::parse_body(b"{\"profile\": 3}").is_err());
        assert!(Announcements::parse_body(b"{\"colour\": \"red\"}").is_err());
    }
}
