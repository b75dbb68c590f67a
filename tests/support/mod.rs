//! Test helpers for tools: a tiny HTTP/1.1 server standing in for a business's tool
//! endpoint, and a scripted agent the test drives by hand.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use voicegate::agent::{Agent, AgentEndpoint, AgentSession, CallInfo};

/// One request the HTTP server received.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    /// Path and query, as on the request line.
    pub target: String,
    /// Header names lowercased.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// How the server answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `200 OK` with this JSON body.
    Json(String),
    /// This status and body.
    Status(u16, String),
    /// Never answer (hold the connection open).
    Hang,
}

/// A tiny HTTP/1.1 server on 127.0.0.1:0 that answers every request with `reply` and
/// reports each request.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub requests: mpsc::UnboundedReceiver<HttpRequest>,
}

impl HttpServer {
    pub async fn start(reply: Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                let reply = reply.clone();
                tokio::spawn(async move {
                    // Several requests may come over one keep-alive connection.
                    let mut buf = Vec::new();
                    loop {
                        let head_end = loop {
                            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break p + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                        let mut lines = head.split("\r\n");
                        let mut request_line = lines.next().unwrap_or("").split(' ');
                        let method = request_line.next().unwrap_or("").to_owned();
                        let target = request_line.next().unwrap_or("").to_owned();
                        let headers: BTreeMap<String, String> = lines
                            .filter_map(|l| l.split_once(':'))
                            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                            .collect();
                        let len: usize = headers
                            .get("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        while buf.len() < head_end + len {
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body = buf[head_end..head_end + len].to_vec();
                        buf.drain(..head_end + len);
                        let _ = tx.send(HttpRequest {
                            method,
                            target,
                            headers,
                            body,
                        });
                        let (status, body) = match &reply {
                            Reply::Json(b) => (200, b.clone()),
                            Reply::Status(s, b) => (*s, b.clone()),
                            Reply::Hang => {
                                tokio::time::sleep(Duration::from_secs(60)).await;
                                return;
                            }
                        };
                        let response = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        HttpServer { addr, requests: rx }
    }

    pub async fn next_request(&mut self) -> HttpRequest {
        tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("a request in time")
            .expect("server running")
    }
}

/// An agent whose sessions the test drives by hand: each call's [`CallInfo`] and agent-side
/// endpoint are handed to the test.
pub struct ScriptAgent {
    tx: mpsc::UnboundedSender<(CallInfo, AgentEndpoint)>,
}

impl ScriptAgent {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<(CallInfo, AgentEndpoint)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ScriptAgent { tx }, rx)
    }
}

impl Agent for ScriptAgent {
    fn name(&self) -> &'static str {
        "script"
    }

    fn start(&self, call: CallInfo) -> AgentSession {
        let (session, endpoint) = voicegate::agent::session_channel();
        let _ = self.tx.send((call, endpoint));
        session
    }
}
