//! Delivering one webhook's outbox: one task per `[[webhooks]]` entry POSTs the oldest
//! event, removes it on a 2xx answer and otherwise waits the capped backoff
//! ([`crate::backoff`]) before trying it again; [`Webhook::enqueue_blocking`] puts new events in.
//!
//! Metrics (label `webhook` = the entry's name): `voicegate_webhook_backlog_events`,
//! `voicegate_webhook_oldest_age_seconds` (refreshed at least every [`REFRESH`]),
//! `voicegate_webhook_delivered_total`, `voicegate_webhook_attempt_failures_total`,
//! `voicegate_webhook_dropped_total{reason}` (`full`, `expired`, `unwritable`). `/health`
//! has a `webhook:<name>` component: `ok`, or `degraded` while the last attempt failed or
//! the outbox cannot be written, with the backlog and the oldest event's age.

use super::WebhookConfig;
use super::outbox::{Entry, Outbox};
use crate::backoff::Backoff;
use crate::health::metrics as m;
use crate::health::{Component, ComponentStatus, HealthState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{error, info, warn};

/// Gauges and `/health` are refreshed at least this often while events wait.
pub(crate) const REFRESH: Duration = Duration::from_secs(5);

/// Ms since the Unix epoch, now.
pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One webhook: its settings, outbox and wake-up; shared by the enqueuing side and its
/// delivery task.
#[derive(Debug)]
pub(crate) struct Webhook {
    config: WebhookConfig,
    key: Vec<u8>,
    outbox: Mutex<Outbox>,
    wake: Notify,
    /// `webhook:<name>`, the `/health` component (leaked once per configured webhook at
    /// start; webhooks are not reloaded).
    component: &'static str,
    health: Arc<HealthState>,
}

/// Why a webhook cannot start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// The secret cannot be resolved.
    #[error("webhooks.{name}.secret: {source}")]
    Secret {
        /// The webhook's name.
        name: String,
        /// Why.
        source: crate::secret::SecretError,
    },
    /// A `whsec_` secret whose rest is not base64.
    #[error("webhooks.{0}.secret: whsec_ secret is not base64")]
    SecretFormat(String),
    /// The outbox directory cannot be opened.
    #[error("webhooks.{name}: outbox {dir}: {source}")]
    Outbox {
        /// The webhook's name.
        name: String,
        /// The directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
}

impl Webhook {
    /// Resolves the secret and opens the outbox `<state_dir>/webhooks/<name>/` (blocking).
    ///
    /// # Errors
    /// [`StartError`].
    pub(crate) fn open(
        config: WebhookConfig,
        state_dir: &std::path::Path,
        health: Arc<HealthState>,
    ) -> Result<Arc<Self>, StartError> {
        let name = config.name.clone();
        let secret = config
            .secret
            .resolve()
            .map_err(|source| StartError::Secret {
                name: name.clone(),
                source,
            })?;
        let key = super::signing_key(secret.expose())
            .map_err(|_| StartError::SecretFormat(name.clone()))?;
        let dir = state_dir.join("webhooks").join(&name);
        let outbox = Outbox::open(&dir, config.bounds()).map_err(|source| StartError::Outbox {
            name: name.clone(),
            dir: dir.display().to_string(),
            source,
        })?;
        info!(webhook = %name, backlog = outbox.len(), dir = %dir.display(), "webhook outbox open");
        ::metrics::counter!(m::WEBHOOK_DELIVERED, "webhook" => name.clone()).increment(0);
        ::metrics::counter!(m::WEBHOOK_FAILURES, "webhook" => name.clone()).increment(0);
        for reason in ["full", "expired", "unwritable"] {
            ::metrics::counter!(m::WEBHOOK_DROPPED, "webhook" => name.clone(), "reason" => reason)
                .increment(0);
        }
        let component: &'static str = Box::leak(format!("webhook:{name}").into_boxed_str());
        let hook = Arc::new(Webhook {
            config,
            key,
            outbox: Mutex::new(outbox),
            wake: Notify::new(),
            component,
            health,
        });
        hook.refresh(None);
        Ok(hook)
    }

    /// The webhook's settings.
    pub(crate) fn config(&self) -> &WebhookConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        // Only file operations run under the lock; a panic there leaves a consistent index.
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dropped(&self, reason: &'static str, n: u64) {
        if n > 0 {
            ::metrics::counter!(m::WEBHOOK_DROPPED, "webhook" => self.config.name.clone(), "reason" => reason)
                .increment(n);
        }
    }

    /// Puts an event in the outbox durably (fsync'd) and wakes the delivery task; dropping
    /// the oldest events beyond the bounds (counted `full`). Blocking file I/O.
    ///
    /// # Errors
    /// The outbox cannot be written: the event is counted `unwritable` and `/health` says so.
    pub(crate) fn enqueue_blocking(&self, key: &str, body: &[u8]) -> std::io::Result<()> {
        let pushed = self.lock().push(key, unix_ms_now(), body);
        match pushed {
            Ok(dropped) => {
                if dropped > 0 {
                    warn!(webhook = %self.config.name, dropped, "webhook outbox full: oldest events dropped");
                }
                self.dropped("full", dropped);
                self.refresh(None);
                self.wake.notify_one();
                Ok(())
            }
            Err(e) => {
                error!(webhook = %self.config.name, key, error = %e, "webhook event cannot be written to the outbox; lost");
                self.dropped("unwritable", 1);
                self.refresh(Some(&format!("outbox not writable: {e}")));
                Err(e)
            }
        }
    }

    /// Sets the backlog gauges and the `/health` component (`failing`: the last error).
    fn refresh(&self, failing: Option<&str>) {
        let (len, oldest) = {
            let o = self.lock();
            (o.len(), o.oldest_unix_ms())
        };
        let age_s = oldest.map_or(0.0, |t| unix_ms_now().saturating_sub(t) as f64 / 1000.0);
        let name = self.config.name.clone();
        ::metrics::gauge!(m::WEBHOOK_BACKLOG, "webhook" => name.clone()).set(len as f64);
        ::metrics::gauge!(m::WEBHOOK_OLDEST_AGE, "webhook" => name).set(age_s);
        let (status, detail) = match failing {
            None => (
                ComponentStatus::Ok,
                format!("backlog {len} events, oldest {age_s:.0} s"),
            ),
            Some(why) => (
                ComponentStatus::Degraded,
                format!("backlog {len} events, oldest {age_s:.0} s; {why}"),
            ),
        };
        self.health
            .set_component(self.component, Component::new(status, detail));
    }
}

/// What one attempt came to.
enum Sent {
    /// Delivered (2xx) or gone from the outbox: take the next one.
    Done,
    /// Nothing to send.
    Empty,
    /// Failed: retry after the backoff.
    Failed(String),
}

/// Delivers `hook`'s outbox until `stop`: the oldest event first, retried with backoff on
/// any failure; an attempt in flight at `stop` is abandoned (the event stays, and is sent
/// again, with the same `webhook-id`, after the restart).
pub(crate) async fn deliver(
    hook: Arc<Webhook>,
    client: reqwest::Client,
    stop: tokio_util::sync::CancellationToken,
) {
    let c = &hook.config;
    let mut backoff = Backoff::new(
        Duration::from_millis(c.retry_initial_ms),
        Duration::from_secs(c.retry_max_s),
    );
    let mut next_attempt = Instant::now();
    let mut failing: Option<String> = None;
    loop {
        let now = Instant::now();
        if now >= next_attempt {
            let sent = tokio::select! {
                s = attempt(&hook, &client) => s,
                () = stop.cancelled() => return,
            };
            match sent {
                Sent::Done => {
                    backoff.reset();
                    failing = None;
                    continue;
                }
                Sent::Empty => {
                    backoff.reset();
                    failing = None;
                    next_attempt = Instant::now() + Duration::from_secs(3600);
                }
                Sent::Failed(why) => {
                    ::metrics::counter!(m::WEBHOOK_FAILURES, "webhook" => c.name.clone())
                        .increment(1);
                    let wait = backoff.next_wait();
                    if failing.is_none() {
                        warn!(webhook = %c.name, error = %why, "webhook delivery failed; retrying with backoff");
                    }
                    failing = Some(format!(
                        "last attempt: {why}; next in {} ms",
                        wait.as_millis()
                    ));
                    next_attempt = Instant::now() + wait;
                }
            }
        }
        hook.refresh(failing.as_deref());
        let wake_at = next_attempt.min(Instant::now() + REFRESH);
        tokio::select! {
            () = tokio::time::sleep_until(wake_at) => {}
            () = hook.wake.notified() => {
                // A new event: send now unless a failure's backoff is running.
                if failing.is_none() {
                    next_attempt = Instant::now();
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

/// Expires old events, then POSTs the oldest one.
async fn attempt(hook: &Arc<Webhook>, client: &reqwest::Client) -> Sent {
    let h = hook.clone();
    let cutoff = unix_ms_now().saturating_sub(hook.config.max_age().as_millis() as u64);
    let front = tokio::task::spawn_blocking(move || {
        let mut o = h.lock();
        let expired = o.expire(cutoff)?;
        o.front().map(|f| (expired, f))
    })
    .await;
    let (entry, body) = match front {
        Ok(Ok((expired, front))) => {
            if expired > 0 {
                warn!(webhook = %hook.config.name, expired, "webhook events older than max_age_h dropped");
                hook.dropped("expired", expired);
            }
            match front {
                Some(f) => f,
                None => return Sent::Empty,
            }
        }
        Ok(Err(e)) => return Sent::Failed(format!("outbox: {e}")),
        Err(e) => return Sent::Failed(format!("outbox task: {e}")),
    };
    match post(hook, client, &entry, body).await {
        Ok(()) => {
            let h = hook.clone();
            let seq = entry.seq;
            let removed = tokio::task::spawn_blocking(move || h.lock().remove(seq)).await;
            ::metrics::counter!(m::WEBHOOK_DELIVERED, "webhook" => hook.config.name.clone())
                .increment(1);
            match removed {
                Ok(Ok(_)) => Sent::Done,
                // Delivered but still on disk: sent again (same key) after a restart.
                Ok(Err(e)) => Sent::Failed(format!("removing a delivered event: {e}")),
                Err(e) => Sent::Failed(format!("outbox task: {e}")),
            }
        }
        Err(why) => Sent::Failed(why),
    }
}

/// One signed POST of `body`; `Ok` on a 2xx answer.
async fn post(
    hook: &Webhook,
    client: &reqwest::Client,
    entry: &Entry,
    body: Vec<u8>,
) -> Result<(), String> {
    let ts = unix_ms_now() / 1000;
    let signature = super::sign(&hook.key, &entry.key, ts, &body);
    let resp = client
        .post(&hook.config.url)
        .timeout(hook.config.timeout())
        .header("content-type", "application/json")
        .header("webhook-id", &entry.key)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .header("idempotency-key", &entry.key)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretSource;

    #[test]
    fn a_full_outbox_keeps_the_newest_events_and_health_shows_the_backlog() {
        let dir = std::env::temp_dir().join(format!("vg-webhook-bound-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let breaker = Arc::new(crate::fallback::Breaker::new(3, Duration::from_secs(5)));
        let health = Arc::new(HealthState::new("echo", breaker));
        let mut config: WebhookConfig = toml::from_str(
            "name = \"crm\"\nurl = \"http://127.0.0.1:9/hook\"\nsecret = \"s\"\nmax_events = 2\n",
        )
        .unwrap();
        config.secret = SecretSource::Inline("whsec_c2VjcmV0".into());
        let hook = Webhook::open(config, &dir, health.clone()).unwrap();
        for i in 0..5 {
            hook.enqueue_blocking(&format!("call-{i}"), b"{}").unwrap();
        }
        let outbox = dir.join("webhooks/crm");
        let mut names: Vec<String> = std::fs::read_dir(&outbox)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].ends_with("_call-3.json") && names[1].ends_with("_call-4.json"));
        let report = health.report();
        let c = &report.components["webhook:crm"];
        assert!(c.detail.starts_with("backlog 2 events"), "{c:?}");
        // The key is the secret after whsec_, base64-decoded.
        assert_eq!(hook.key, b"secret");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A receiver on 127.0.0.1 that answers every POST 200 and keeps each `webhook-id`, in
    /// order of arrival (plain HTTP/1.1: headers, then a `content-length` body).
    async fn receiver(listener: tokio::net::TcpListener, ids: Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let header = |name: &str| {
                        head.lines()
                            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                    };
                    let len: usize = header("content-length:").map_or(0, |v| v.parse().unwrap());
                    while buf.len() < end + 4 + len {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    ids.lock().unwrap().push(header("webhook-id:").unwrap());
                    buf.drain(..end + 4 + len);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if sock.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// The receiver is down (connections refused) for 15 minutes, on tokio's paused clock,
    /// with the default schedule (1 s doubling to 600 s): nothing is lost, the backlog shows,
    /// and once it is back every event arrives exactly once, oldest first, at the next
    /// attempt of the capped backoff (within `retry_max_s` of its return).
    #[tokio::test(start_paused = true)]
    async fn an_outage_of_minutes_loses_nothing_and_the_capped_backoff_delivers_each_once() {
        let dir = std::env::temp_dir().join(format!("vg-webhook-outage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let breaker = Arc::new(crate::fallback::Breaker::new(3, Duration::from_secs(5)));
        let health = Arc::new(HealthState::new("echo", breaker));
        let mut config: WebhookConfig = toml::from_str(&format!(
            "name = \"crm\"\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret = \"s\"\n"
        ))
        .unwrap();
        config.secret = SecretSource::Inline("whsec_c2VjcmV0".into());
        let retry_max = Duration::from_secs(config.retry_max_s);
        let hook = Webhook::open(config, &dir, health.clone()).unwrap();
        let keys: Vec<String> = (0..3).map(|i| format!("call-{i}")).collect();
        for k in &keys {
            hook.enqueue_blocking(k, b"{}").unwrap();
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let client = crate::tls::http_client_builder().build().unwrap();
        let task = tokio::spawn(deliver(hook.clone(), client, stop.clone()));

        tokio::time::sleep(Duration::from_secs(15 * 60)).await;
        let report = health.report();
        let c = &report.components["webhook:crm"];
        assert!(c.detail.starts_with("backlog 3 events"), "{c:?}");
        assert!(c.detail.contains("last attempt"), "{c:?}");

        let back = Instant::now();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let ids = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(receiver(listener, ids.clone()));
        while ids.lock().unwrap().len() < keys.len() {
            assert!(
                back.elapsed() <= retry_max,
                "{:?} after the receiver came back: {:?}",
                back.elapsed(),
                ids.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Nothing more comes: each event once.
        tokio::time::sleep(retry_max * 2).await;
        assert_eq!(*ids.lock().unwrap(), keys);
        let left = std::fs::read_dir(dir.join("webhooks/crm")).unwrap().count();
        assert_eq!(left, 0, "delivered events stay in the outbox");
        stop.cancel();
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
