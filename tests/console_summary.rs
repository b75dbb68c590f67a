//! The console's handover summary (issue 18, item 3): a handover card gets its three-line
//! summary from a Chat Completions endpoint (tests/cascade_fakes' `LlmFake`, OpenAI's wire
//! format) after the caller was handed over, never before: the transfer does not wait.

mod cascade_fakes;
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, place_call};

const PASSWORD: &str = "console api test password";

struct Svc {
    started: common::service::Started,
    dir: PathBuf,
}

impl Drop for Svc {
    fn drop(&mut self) {
        let _ = self.started.child.kill();
        let _ = self.started.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(name: &str, body: String) -> Svc {
    let dir = std::env::temp_dir().join(format!("vg-console-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let d = dir.clone();
    let started = tokio::task::spawn_blocking(move || common::service::start(&d, 3, &body))
        .await
        .unwrap();
    Svc { started, dir }
}

fn console_section() -> String {
    let phc = voicegate::console::auth::PasswordHash::hash(PASSWORD).unwrap();
    format!("[console]\nenabled = true\npassword_hash = \"{phc}\"\n")
}

/// One request (the listener closes after one response): status, headers and body.
async fn request(addr: SocketAddr, head: &str, body: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (code, head.to_owned(), body.to_owned())
}

/// Logs in: the session cookie and the CSRF token.
async fn login(addr: SocketAddr) -> (String, String) {
    let (code, head, _) = request(
        addr,
        "POST /console/login HTTP/1.1\r\ncontent-type: application/json",
        &format!("{{\"password\":\"{PASSWORD}\"}}"),
    )
    .await;
    assert_eq!(code, 204, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned();
    let (code, _, body) = request(
        addr,
        &format!("GET /console/api/session HTTP/1.1\r\ncookie: {cookie}"),
        "",
    )
    .await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (cookie, v["csrf"].as_str().unwrap().to_owned())
}

/// The live calls in the feed's first line (the snapshot).
async fn live_calls(addr: SocketAddr, cookie: &str) -> Vec<serde_json::Value> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /console/api/events HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the snapshot comes at once")
            .unwrap();
        assert!(n > 0, "stream closed before the snapshot");
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some(line) = text.lines().find_map(|l| l.strip_prefix("data: ")) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["type"], "snapshot");
            return v["calls"].as_array().unwrap().clone();
        }
    }
}

async fn act(addr: SocketAddr, cookie: &str, csrf: &str, path: &str) -> u16 {
    request(
        addr,
        &format!("POST {path} HTTP/1.1\r\ncookie: {cookie}\r\nx-csrf-token: {csrf}"),
        "",
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_card_gets_its_summary_after_the_transfer_not_before() {
    const SUMMARY: &str =
        "Caller wants an invoice corrected.\nNothing looked up yet.\nOpen: the refund.";
    let llm = cascade_fakes::LlmFake::start(vec![cascade_fakes::LlmReply::text(SUMMARY)]).await;
    // The model takes its time: the transfer must not wait for it.
    llm.first_token_delay(Duration::from_secs(3));
    let body = format!(
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n{}[console.summary]\nurl = \"{}\"\n\
         api_key = \"sk-summary\"\nmodel = \"gpt-4o-mini\"\n",
        console_section(),
        llm.url()
    );
    let svc = start("summary", body).await;
    let (health, to) = (svc.started.health, svc.started.audiosocket);
    let (cookie, csrf) = login(health).await;
    let id = Uuid::new_v4();
    let plan = CallPlan {
        call_id: id,
        rate: SlinRate::Hz8000,
        speech: common::fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: Vec::new(),
        duration: Duration::from_secs(30),
    };
    let call = tokio::spawn(async move { place_call(to, &plan).await });
    let mut seen = false;
    for _ in 0..50 {
        if live_calls(health, &cookie)
            .await
            .iter()
            .any(|c| c["id"] == id.to_string())
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the call shows up live");
    let path = format!("/console/api/calls/{id}/takeover");
    let t0 = tokio::time::Instant::now();
    assert_eq!(act(health, &cookie, &csrf, &path).await, 204);
    let report = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ends")
        .unwrap()
        .unwrap();
    assert!(report.hangup_received, "{report:?}");
    let handed = t0.elapsed();
    assert!(
        handed < Duration::from_secs(2),
        "the transfer waited: {handed:?}"
    );
    let cards = |body: &str| -> Vec<serde_json::Value> { serde_json::from_str(body).unwrap() };
    let (_, _, body) = request(
        health,
        &format!("GET /console/api/handovers HTTP/1.1\r\ncookie: {cookie}"),
        "",
    )
    .await;
    assert!(
        cards(&body)[0]["summary"].is_null(),
        "no summary yet: {body}"
    );
    let mut summary = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, _, body) = request(
            health,
            &format!("GET /console/api/handovers HTTP/1.1\r\ncookie: {cookie}"),
            "",
        )
        .await;
        summary = cards(&body)[0]["summary"].clone();
        if !summary.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(summary, SUMMARY);
    let log = llm.log.lock().unwrap();
    assert_eq!(log.requests.len(), 1);
    let req = &log.requests[0];
    assert!(
        req.headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("authorization") && v == "Bearer sk-summary"),
        "{:?}",
        req.headers
    );
    assert_eq!(req.body["model"], "gpt-4o-mini");
    let user = req.body["messages"][1]["content"].as_str().unwrap();
    assert!(
        user.contains("Why it goes to an operator: supervisor"),
        "{user}"
    );
}
