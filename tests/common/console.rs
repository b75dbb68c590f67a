//! A `voicegate run` with the console on, and a supervisor's HTTP requests to it, for the
//! console tests (tests/suite/console_api.rs, tests/suite/console_summary.rs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub(crate) const PASSWORD: &str = "console api test password";

pub(crate) struct Svc {
    pub(crate) started: super::service::Started,
    pub(crate) dir: PathBuf,
}

impl Drop for Svc {
    fn drop(&mut self) {
        let _ = self.started.child.kill();
        let _ = self.started.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) async fn start(name: &str, body: String) -> Svc {
    let dir = std::env::temp_dir().join(format!("vg-console-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let d = dir.clone();
    let started = tokio::task::spawn_blocking(move || super::service::start(&d, 3, &body))
        .await
        .unwrap();
    Svc { started, dir }
}

pub(crate) fn console_section() -> String {
    let phc = voicegate::console::auth::PasswordHash::hash(PASSWORD).unwrap();
    format!("[console]\nenabled = true\npassword_hash = \"{phc}\"\n")
}

/// One request (the listener closes after one response): status, headers and body.
pub(crate) async fn request(addr: SocketAddr, head: &str, body: &str) -> (u16, String, String) {
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

/// One login attempt with `password`: the status and the response head.
pub(crate) async fn try_login(addr: SocketAddr, password: &str) -> (u16, String) {
    let body = serde_json::json!({ "password": password }).to_string();
    let (code, head, _) = request(
        addr,
        "POST /console/login HTTP/1.1\r\ncontent-type: application/json",
        &body,
    )
    .await;
    (code, head)
}

/// Logs in: the session cookie and the CSRF token.
pub(crate) async fn login(addr: SocketAddr) -> (String, String) {
    let (code, head) = try_login(addr, PASSWORD).await;
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
pub(crate) async fn live_calls(addr: SocketAddr, cookie: &str) -> Vec<serde_json::Value> {
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

pub(crate) async fn act(addr: SocketAddr, cookie: &str, csrf: &str, path: &str) -> u16 {
    request(
        addr,
        &format!("POST {path} HTTP/1.1\r\ncookie: {cookie}\r\nx-csrf-token: {csrf}"),
        "",
    )
    .await
    .0
}
