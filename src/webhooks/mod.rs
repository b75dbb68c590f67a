//! Call data out, nothing lost: at the end of every call a signed JSON event is POSTed to
//! each configured webhook (`[[webhooks]]`), through an on-disk outbox.
//!
//! - **Event** ([`call_ended_event`]): `{"type":"call.ended","call_id":…,"ai_seconds":…,
//!   "record":{…}}`, the record being the call's [`CallRecord`] as JSON (caller number per
//!   the webhook's `caller_numbers`, outcome, detail, latencies, tool calls, DTMF,
//!   transcript).
//! - **Signature** ([`sign`]): the Standard Webhooks v1 scheme
//!   (<https://www.standardwebhooks.com/>, `spec/standard-webhooks.md`): headers
//!   `webhook-id` (the idempotency key: the call id), `webhook-timestamp` (Unix seconds of
//!   this attempt) and `webhook-signature: v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))>`.
//!   The key is the secret's bytes, or for a `whsec_…` secret the base64 after the prefix
//!   (as the spec's libraries do). `Idempotency-Key` repeats the call id for receivers that
//!   use that header. HMAC-SHA256 comes from `ring`, the crypto voicegate's TLS already uses.
//! - **Delivery** ([`deliver`]): at-least-once. An event is fsync'd into the webhook's
//!   [`outbox`] before anything is sent and leaves it only on a 2xx answer, on expiry
//!   (`max_age_h`) or when the outbox is over its bounds (oldest first). Any other answer,
//!   a timeout or a refused connection is retried with the capped backoff of
//!   [`crate::backoff`], across restarts; a receiver sees an event twice only with the same
//!   `webhook-id`, and must de-duplicate on it.
//!
//! Never sends a secret: the signing key stays on the box.

pub(crate) mod deliver;
pub(crate) mod outbox;

use crate::error::ConfigError;
use crate::records::{CallRecord, CallerNumbers};
use crate::secret::SecretSource;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One `[[webhooks]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Its name: 1-64 of `a-z A-Z 0-9 _ -`; names its outbox directory
    /// (`<state>/webhooks/<name>/`) and the `webhook` label of its metrics.
    pub name: String,
    /// Where events are POSTed: `http://` or `https://`.
    pub url: String,
    /// The signing secret (inline, `{ env = … }`, `{ file = … }`, `{ credential = … }`);
    /// `whsec_<base64>` is decoded as the Standard Webhooks libraries do.
    pub secret: SecretSource,
    /// One attempt's time limit, ms (default 10 000; 100 to 120 000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// The first retry's wait, ms (default 1000); doubled per failure up to `retry_max_s`.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// The longest wait between attempts, s (default 600).
    #[serde(default = "default_retry_max_s")]
    pub retry_max_s: u64,
    /// Events undelivered for this long are dropped and counted, hours (default 72).
    #[serde(default = "default_max_age_h")]
    pub max_age_h: u32,
    /// Events kept in the outbox at most; beyond, the oldest are dropped and counted
    /// (default 100 000).
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// Bytes kept in the outbox at most (default 256 MiB); beyond, the oldest are dropped.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// What the event keeps of the caller's number: `full` (default), `masked`, `omit`.
    #[serde(default)]
    pub caller_numbers: CallerNumbers,
}

fn default_timeout_ms() -> u32 {
    10_000
}
fn default_retry_initial_ms() -> u64 {
    1_000
}
fn default_retry_max_s() -> u64 {
    600
}
fn default_max_age_h() -> u32 {
    72
}
fn default_max_events() -> usize {
    100_000
}
fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}

impl WebhookConfig {
    /// One attempt's time limit.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.into())
    }

    /// How long an undelivered event is kept.
    pub(crate) fn max_age(&self) -> Duration {
        Duration::from_secs(u64::from(self.max_age_h) * 3600)
    }

    /// The outbox bounds.
    pub(crate) fn bounds(&self) -> outbox::Bounds {
        outbox::Bounds {
            max_events: self.max_events,
            max_bytes: self.max_bytes,
        }
    }
}

/// Checks every `[[webhooks]]` entry: names unique and valid, URLs http(s), ranges.
///
/// # Errors
/// [`ConfigError::Invalid`] naming the entry and key.
pub(crate) fn validate_config(hooks: &[WebhookConfig]) -> Result<(), ConfigError> {
    for (i, h) in hooks.iter().enumerate() {
        let key = |k: &str| format!("webhooks[{i}].{k}");
        let ok_name = (1..=64).contains(&h.name.len())
            && h.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok_name {
            return Err(ConfigError::invalid(
                &key("name"),
                "must be 1-64 characters of a-z, A-Z, 0-9, _ or -",
            ));
        }
        if hooks[..i].iter().any(|o| o.name == h.name) {
            return Err(ConfigError::invalid(&key("name"), "used twice"));
        }
        match reqwest::Url::parse(&h.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return Err(ConfigError::invalid(
                    &key("url"),
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if !(100..=120_000).contains(&h.timeout_ms) {
            return Err(ConfigError::invalid(
                &key("timeout_ms"),
                "must be 100 to 120000",
            ));
        }
        if !(10..=3_600_000).contains(&h.retry_initial_ms) {
            return Err(ConfigError::invalid(
                &key("retry_initial_ms"),
                "must be 10 to 3600000",
            ));
        }
        if !(1..=86_400).contains(&h.retry_max_s) {
            return Err(ConfigError::invalid(
                &key("retry_max_s"),
                "must be 1 to 86400",
            ));
        }
        if !(1..=24 * 365).contains(&h.max_age_h) {
            return Err(ConfigError::invalid(&key("max_age_h"), "must be 1 to 8760"));
        }
        if h.max_events == 0 {
            return Err(ConfigError::invalid(
                &key("max_events"),
                "must be at least 1",
            ));
        }
        if h.max_bytes < 1024 * 1024 {
            return Err(ConfigError::invalid(
                &key("max_bytes"),
                "must be at least 1048576",
            ));
        }
    }
    Ok(())
}

/// The HMAC key of a secret: the bytes after `whsec_` decoded from base64, else the
/// secret's own bytes.
///
/// # Errors
/// A `whsec_` secret whose rest is not base64.
pub(crate) fn signing_key(secret: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    match secret.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

/// The `webhook-signature` header value: `v1,` and the base64 of
/// HMAC-SHA256(`key`, `"{id}.{timestamp_s}.{body}"`).
pub(crate) fn sign(key: &[u8], id: &str, timestamp_s: u64, body: &[u8]) -> String {
    use base64::Engine as _;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp_s.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

/// The body of a `call.ended` event: the record as JSON, the call id (also the
/// idempotency key) and the AI time the call used, s.
///
/// # Errors
/// Cannot happen for a record (plain strings and numbers); kept for the signature's sake.
pub(crate) fn call_ended_event(
    record: &CallRecord,
    ai_time: Duration,
) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&serde_json::json!({
        "type": "call.ended",
        "call_id": record.call_id,
        "ai_seconds": ai_time.as_secs_f64(),
        "record": record,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_reference_vector() {
        // The test vector of standard-webhooks' libraries (python/tests/test_webhooks.py,
        // javascript/src/index.test.ts): secret, id, timestamp, payload → signature.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        // A plain secret is its own bytes.
        assert_eq!(signing_key("abc").unwrap(), b"abc");
        assert!(signing_key("whsec_!!").is_err());
    }

    #[test]
    fn validation_names_the_bad_key() {
        let good: WebhookConfig =
            toml::from_str("name = \"crm\"\nurl = \"https://crm.example/hook\"\nsecret = \"s\"\n")
                .unwrap();
        assert!(validate_config(std::slice::from_ref(&good)).is_ok());
        let e = validate_config(&[good.clone(), good.clone()]).unwrap_err();
        assert!(e.to_string().contains("webhooks[1].name"), "{e}");
        let mut bad = good.clone();
        bad.url = "ftp://x".into();
        let e = validate_config(&[bad]).unwrap_err();
        assert!(e.to_string().contains("webhooks[0].url"), "{e}");
        let mut bad = good;
        bad.name = "../x".into();
        assert!(validate_config(&[bad]).is_err());
    }

    #[test]
    fn the_example_config_parses_and_validates() {
        let text = include_str!("../../examples/voicegate.toml");
        let start = text.find("#[[webhooks]]").expect("webhooks example");
        let toml: String = text[start..]
            .lines()
            .take_while(|l| !l.is_empty())
            .map(|l| format!("{}\n", l.strip_prefix('#').unwrap_or(l)))
            .collect();
        #[derive(Deserialize)]
        struct Doc {
            webhooks: Vec<WebhookConfig>,
        }
        let doc: Doc = toml::from_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        validate_config(&doc.webhooks).unwrap();
        let w = &doc.webhooks[0];
        assert_eq!(
            (w.name.as_str(), w.max_age_h, w.retry_max_s),
            ("crm", 72, 600)
        );
        assert_eq!(w.bounds().max_bytes, default_max_bytes());
    }
}
