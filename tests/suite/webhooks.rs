//! Webhooks deliver every call, at least once, through an outage and a `kill -9`.
//!
//! `voicegate run` (the real binary) takes calls from the synthetic caller while its webhook
//! receiver on 127.0.0.1 is down (connections refused), then answering 503; the events wait
//! in the on-disk outbox (`/metrics` and `/health` show the backlog). The receiver then comes
//! back but holds the first request unanswered, and voicegate is killed with SIGKILL in the
//! middle of that delivery. Restarted on the same state directory, it delivers every call:
//! every call id arrives, a key arrives twice only as the same event, and every request's
//! signature verifies with the shared secret.
//!
//! The receiver is a hyper HTTP/1.1 server; what it checks is the Standard Webhooks v1
//! scheme (<https://www.standardwebhooks.com/>, `spec/standard-webhooks.md`): `webhook-id`,
//! `webhook-timestamp` (Unix s, within 5 minutes), `webhook-signature: v1,<base64 HMAC-SHA256
//! of "{id}.{timestamp}.{body}">` keyed with the base64 after `whsec_`.

use crate::common;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use uuid::Uuid;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, place_call};

/// The webhook secret both sides share (a Standard Webhooks `whsec_` secret).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 503 Service Unavailable.
    Unavailable,
    /// Never answers (the sender is mid-delivery until it gives up or dies).
    Hold,
    /// 204 No Content.
    Accept,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    id: String,
    idempotency_key: String,
    body: Vec<u8>,
    verified: bool,
    answered: bool,
}

#[derive(Default)]
struct Receiver {
    mode: Mutex<Option<Mode>>,
    got: Mutex<Vec<Got>>,
    arrived: Notify,
}

/// Whether the request's Standard Webhooks signature is valid for [`SECRET`] and its
/// timestamp within 5 minutes of now.
fn verify(id: &str, ts: &str, sig: &str, body: &[u8]) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let Ok(ts_s) = ts.parse::<u64>() else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(ts_s) > 300 {
        return false;
    }
    let mut signed = format!("{id}.{ts}.").into_bytes();
    signed.extend_from_slice(body);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    // A header may carry several space-separated signatures; one valid v1 is enough.
    sig.split(' ').any(|s| {
        s.strip_prefix("v1,")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .is_some_and(|tag| ring::hmac::verify(&key, &signed, &tag).is_ok())
    })
}

impl Receiver {
    /// Serves on `listener` until the task is aborted.
    async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| me.clone().handle(req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
        let h = |k: &str| {
            req.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let (id, ts, sig, idem) = (
            h("webhook-id"),
            h("webhook-timestamp"),
            h("webhook-signature"),
            h("idempotency-key"),
        );
        assert_eq!(req.method(), hyper::Method::POST);
        assert_eq!(req.uri().path(), "/hook");
        assert_eq!(h("content-type"), "application/json");
        let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
        let mode = self.mode.lock().unwrap().unwrap_or(Mode::Unavailable);
        let got = Got {
            verified: verify(&id, &ts, &sig, &body),
            id,
            idempotency_key: idem,
            body,
            answered: mode == Mode::Accept,
        };
        self.got.lock().unwrap().push(got);
        self.arrived.notify_waiters();
        match mode {
            Mode::Hold => std::future::pending().await,
            Mode::Unavailable => Ok(hyper::Response::builder()
                .status(503)
                .body(Full::new(Bytes::new()))
                .unwrap()),
            Mode::Accept => Ok(hyper::Response::builder()
                .status(204)
                .body(Full::new(Bytes::new()))
                .unwrap()),
        }
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("an HTTP answer in time")
        .unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The value of the sample `sample` (exactly as rendered) in `/metrics`, 0 if absent.
async fn metric(health: SocketAddr, sample: &str) -> f64 {
    http_get(health, "/metrics")
        .await
        .lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .filter(|rest| rest.starts_with(' '))
                .map(|rest| rest.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

/// Polls `f` every 100 ms until it is true, at most `limit`.
async fn until<F: std::future::Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start(dir: &Path, body: &str) -> common::service::Started {
    let _ = std::fs::remove_file(dir.join("notify.sock"));
    common::service::start(dir, 2, body)
}

fn plan(call_id: Uuid) -> CallPlan {
    CallPlan {
        call_id,
        rate: SlinRate::Hz8000,
        speech: common::fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: Vec::new(),
        duration: Duration::from_millis(1500),
    }
}

const BACKLOG: &str = "voicegate_webhook_backlog_events{webhook=\"crm\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_reaches_the_receiver_through_an_outage_and_a_kill_9() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("vg-webhooks-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The receiver's port, closed for now: the outage starts as connections refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let body = format!(
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n\
         [[webhooks]]\nname = \"crm\"\nurl = \"http://127.0.0.1:{port}/hook\"\n\
         secret = \"{SECRET}\"\ntimeout_ms = 30000\nretry_initial_ms = 50\nretry_max_s = 1\n"
    );
    let d = dir.clone();
    let b = body.clone();
    let mut svc = tokio::task::spawn_blocking(move || start(&d, &b))
        .await
        .unwrap();

    // Four calls while the receiver is down.
    let calls: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for id in &calls {
        let report = place_call(svc.audiosocket, &plan(*id)).await.unwrap();
        assert!(report.frames_received > 0, "{report:?}");
    }
    let health = svc.health;
    until(
        Duration::from_secs(20),
        "four events waiting",
        || async move { metric(health, BACKLOG).await == 4.0 },
    )
    .await;
    let failures = "voicegate_webhook_attempt_failures_total{webhook=\"crm\"}";
    until(
        Duration::from_secs(20),
        "refused attempts counted",
        || async move { metric(health, failures).await >= 2.0 },
    )
    .await;
    let report: serde_json::Value =
        serde_json::from_str(&http_get(health, "/health").await).unwrap();
    let c = &report["components"]["webhook:crm"];
    assert_eq!(c["status"], "degraded", "{report}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .starts_with("backlog 4 events"),
        "{c}"
    );
    let age = "voicegate_webhook_oldest_age_seconds{webhook=\"crm\"}";
    until(
        Duration::from_secs(20),
        "the oldest age grows",
        || async move { metric(health, age).await >= 1.0 },
    )
    .await;

    // The receiver comes back answering 503 (still an outage), then holds the next request.
    let receiver = Arc::new(Receiver::default());
    *receiver.mode.lock().unwrap() = Some(Mode::Unavailable);
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let serving = tokio::spawn(receiver.clone().serve(listener));
    until(Duration::from_secs(20), "a 503 answered", || {
        let r = receiver.clone();
        async move { !r.got.lock().unwrap().is_empty() }
    })
    .await;
    let n_503 = receiver.got.lock().unwrap().len();
    *receiver.mode.lock().unwrap() = Some(Mode::Hold);
    until(Duration::from_secs(20), "a request held", || {
        let r = receiver.clone();
        async move { r.got.lock().unwrap().len() > n_503 }
    })
    .await;
    let held = receiver.got.lock().unwrap().last().unwrap().id.clone();

    // kill -9 in the middle of that delivery.
    svc.child.kill().unwrap();
    svc.child.wait().unwrap();
    *receiver.mode.lock().unwrap() = Some(Mode::Accept);
    let d = dir.clone();
    let mut svc = tokio::task::spawn_blocking(move || start(&d, &body))
        .await
        .unwrap();
    let health = svc.health;
    until(
        Duration::from_secs(30),
        "every event delivered",
        || async move { metric(health, BACKLOG).await == 0.0 },
    )
    .await;

    let got = receiver.got.lock().unwrap().clone();
    let delivered: BTreeSet<String> = got
        .iter()
        .filter(|g| g.answered)
        .map(|g| g.id.clone())
        .collect();
    let want: BTreeSet<String> = calls.iter().map(Uuid::to_string).collect();
    assert_eq!(delivered, want, "every call delivered");
    // The held request was sent again after the restart: a duplicate, with the same key.
    assert!(got.iter().any(|g| g.answered && g.id == held));
    let mut bodies: BTreeMap<&str, &[u8]> = BTreeMap::new();
    for g in &got {
        assert!(g.verified, "signature of {}", g.id);
        assert_eq!(g.idempotency_key, g.id);
        let event: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
        assert_eq!(event["type"], "call.ended");
        assert_eq!(event["call_id"], g.id.as_str(), "the key is the call id");
        assert_eq!(event["record"]["call_id"], g.id.as_str());
        assert!(event["record"]["duration_ms"].as_u64().unwrap() >= 1000);
        assert!(event["ai_seconds"].as_f64().unwrap() > 0.5, "{event}");
        // A key seen again carries the same event, byte for byte.
        let first = *bodies.entry(g.id.as_str()).or_insert(g.body.as_slice());
        assert_eq!(first, g.body.as_slice(), "same key, same event");
    }
    assert!(got.iter().filter(|g| !g.verified).count() == 0);
    // Nothing is left in the outbox directory.
    let left = std::fs::read_dir(dir.join("state/webhooks/crm"))
        .unwrap()
        .count();
    assert_eq!(left, 0);
    svc.child.kill().unwrap();
    svc.child.wait().unwrap();
    serving.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
