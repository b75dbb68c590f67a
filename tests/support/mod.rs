//! Test helpers for tools: a tiny HTTP/1.1 server standing in for a business's tool
//! endpoint, and a scripted agent the test drives by hand; [`http`], the HTTP server every
//! fake shares.
#![allow(dead_code)]

pub(crate) mod http;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use voicegate::agent::{Agent, AgentEndpoint, AgentSession, CallInfo};

/// One request the HTTP server received.
#[derive(Debug, Clone)]
pub(crate) struct HttpRequest {
    pub method: String,
    /// Path and query, as on the request line.
    pub target: String,
    /// Header names lowercased.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// How the server answers.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// `200 OK` with this JSON body.
    Json(String),
    /// This status and body.
    Status(u16, String),
    /// Never answer (hold the connection open).
    Hang,
}

/// An HTTP/1.1 server on 127.0.0.1:0 ([`http`]) that answers every request with `reply`
/// and reports each request.
pub(crate) struct HttpServer {
    pub addr: SocketAddr,
    pub requests: mpsc::UnboundedReceiver<HttpRequest>,
}

impl HttpServer {
    pub(crate) async fn start(reply: Reply) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let addr = http::spawn(move |req: http::Request| {
            let (tx, reply) = (tx.clone(), reply.clone());
            async move {
                let _ = tx.send(HttpRequest {
                    method: req.method.clone(),
                    target: req.target.clone(),
                    headers: req.headers.clone(),
                    body: req.body.to_vec(),
                });
                let (status, body) = match reply {
                    Reply::Json(b) => (200, b),
                    Reply::Status(s, b) => (s, b),
                    Reply::Hang => std::future::pending().await,
                };
                Some(http::json(status, body))
            }
        })
        .await;
        HttpServer { addr, requests: rx }
    }

    pub(crate) async fn next_request(&mut self) -> HttpRequest {
        tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("a request in time")
            .expect("server running")
    }
}

/// An agent whose sessions the test drives by hand: each call's [`CallInfo`] and agent-side
/// endpoint are handed to the test.
pub(crate) struct ScriptAgent {
    tx: mpsc::UnboundedSender<(CallInfo, AgentEndpoint)>,
}

impl ScriptAgent {
    pub(crate) fn new() -> (Self, mpsc::UnboundedReceiver<(CallInfo, AgentEndpoint)>) {
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
