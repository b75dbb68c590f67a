//! One HTTP/1.1 server for every test fake (the fake Asterisk's REST API and events upgrade,
//! the Chat Completions and ElevenLabs TTS fakes, the business tool endpoint), on hyper's
//! server (`hyper::server::conn::http1`, the same stack as voicegate's health listener), so
//! no fake parses HTTP by hand. A fake gives a handler from [`Request`] to a hyper response;
//! the helpers build whole, streamed (chunked, e.g. SSE) and upgrade (101) responses, and a
//! handler that never returns holds the request unanswered until the client gives up.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What a handler answers with.
pub(crate) type Response = hyper::Response<BoxBody<Bytes, Infallible>>;

/// One request, read whole.
pub(crate) struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, percent-decoded.
    pub path: String,
    /// Path and query as on the request line.
    pub target: String,
    /// Query parameters in order, percent-decoded (`+` is a space).
    pub query: Vec<(String, String)>,
    /// Header names lowercased (the last value of a repeated header).
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Bytes,
    /// The connection after a 101 answer ([`Request::upgraded`]).
    upgrade: Option<hyper::upgrade::OnUpgrade>,
}

impl Request {
    /// The first value of query parameter `key`.
    pub(crate) fn query(&self, key: &str) -> Option<String> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    /// A header's value (name in any case).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    /// The raw connection once the handler's 101 response is sent: answer with
    /// [`switching_protocols`], and await this in a spawned task.
    pub(crate) fn upgraded(
        &mut self,
    ) -> impl Future<Output = Option<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>> + use<>
    {
        let on = self.upgrade.take();
        async move { Some(hyper_util::rt::TokioIo::new(on?.await.ok()?)) }
    }
}

/// Serves `handler` on every connection accepted on `listener` (keep-alive, one request at
/// a time per connection, as HTTP/1.1 without pipelining), until the listener fails. A
/// handler answering `None` closes the connection without a response.
pub(crate) async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<Response>> + Send + 'static,
{
    while let Ok((stream, _)) = listener.accept().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let req = read(req).await;
                        handler(req)
                            .await
                            .ok_or_else(|| std::io::Error::other("closed without an answer"))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// Spawns [`serve`] on a new 127.0.0.1:0 listener; returns its address.
pub(crate) async fn spawn<F, Fut>(handler: F) -> std::net::SocketAddr
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<Response>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, handler));
    addr
}

async fn read(mut req: hyper::Request<hyper::body::Incoming>) -> Request {
    let upgrade = Some(hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let query = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    Request {
        method: parts.method.as_str().to_owned(),
        path: percent_decode(parts.uri.path()),
        target,
        query,
        headers,
        body,
        upgrade,
    }
}

/// Percent-decoding of a URL component (`+` is a space, as in a form-encoded query).
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A whole response: `status`, `headers`, `body`.
pub(crate) fn full(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response {
    let mut b = hyper::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into()).boxed())
        .expect("valid status and headers")
}

/// `status` with a JSON body.
pub(crate) fn json(status: u16, body: impl Into<Bytes>) -> Response {
    full(status, &[("content-type", "application/json")], body)
}

/// A streamed (chunked) response: every `Bytes` sent on the returned channel goes out as it
/// comes; dropping the sender ends the body. The sender's `send` fails (and `closed()`
/// resolves) once the client has gone.
pub(crate) fn streamed(status: u16, headers: &[(&str, &str)]) -> (mpsc::Sender<Bytes>, Response) {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut b = hyper::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    (
        tx,
        b.body(BodyExt::boxed(StreamBody::new(stream)))
            .expect("valid status and headers"),
    )
}

/// `101 Switching Protocols` for a WebSocket upgrade with `Sec-WebSocket-Key` `key`.
pub(crate) fn switching_protocols(key: &str) -> Response {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    full(
        101,
        &[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", &accept),
        ],
        Bytes::new(),
    )
}
