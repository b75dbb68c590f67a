//! The HTTP listener for `/health`, `/metrics` and other modules' small JSON endpoints
//! (hyper 1 over plain TCP; HTTP/1.1 only; no TLS: bind it to loopback or a management LAN).
//!
//! # Adding a route
//!
//! Routes are `(method, pattern, handler)`; a pattern is a path whose `{name}` segments
//! capture one segment each. A handler takes a [`RouteRequest`] and returns a future of a
//! [`Response`]; [`json`] and [`text`] build the common responses. For example, the tunnel
//! module adds its statistics with:
//!
//! ```no_run
//! # use voicegate::health::http::{Router, json};
//! # use hyper::{Method, StatusCode};
//! # let router = Router::new();
//! let router = router.route(Method::GET, "/v1/wireguard", |_req| async move {
//!     json(StatusCode::OK, &serde_json::json!({"peers": []}))
//! });
//! let router = router.route(Method::GET, "/v1/calls/{id}/next", |req| async move {
//!     let id = req.param("id").unwrap_or_default().to_owned();
//!     json(StatusCode::OK, &serde_json::json!({"call": id, "next": "agent"}))
//! });
//! ```
//!
//! and `app` passes the router to [`HttpServer::run`]. Unknown paths answer 404,
//! a known path with another method 405. Request bodies above [`MAX_BODY_BYTES`] are refused
//! (413), bodies not complete within [`BODY_TIMEOUT`] too (408).
//!
//! # Slow and idle clients
//!
//! The dialplan asks `/v1/calls/{id}/next` here under a `CURL` timeout, so slow clients must
//! never queue it (issue 14). Every connection is accepted at once and gets its own task;
//! it must send its request headers within [`HEADER_TIMEOUT`], its body within
//! [`BODY_TIMEOUT`], and be done within [`CONNECTION_TIMEOUT`]; one request per connection.
//! At most [`MAX_CONNECTIONS`] are open, [`MAX_CONNECTIONS_PER_SOURCE`] from one address: a
//! new connection beyond either limit closes the *oldest* open one in that scope (counted as
//! `voicegate_http_refused_total{reason="busy"|"source_busy"}`). A real request finishes in
//! milliseconds, so it is never the oldest; slowloris connections are, and make room.

use crate::health::metrics as m;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Largest request body a route receives, bytes.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;
/// Time a connection has to send its request headers.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a request has to send its body, once its headers are in.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest life of a connection, request and response together.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; a new one beyond this closes the oldest.
pub(crate) const MAX_CONNECTIONS: usize = 512;
/// Connections open at once from one source address; a new one beyond this closes that
/// source's oldest.
pub(crate) const MAX_CONNECTIONS_PER_SOURCE: usize = 128;
/// Largest request head (request line and headers) hyper buffers, bytes.
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A response as the handlers build it: a whole body ([`respond`]) or a stream of frames
/// (the console's Server-Sent Events, [`HttpResponse::new`] with any boxed body). A stream
/// still ends within [`CONNECTION_TIMEOUT`] of the connection's start.
pub(crate) type HttpResponse = Response<BoxBody<Bytes, std::convert::Infallible>>;

/// A request as a route sees it: the body is read (at most [`MAX_BODY_BYTES`]).
#[derive(Debug)]
pub(crate) struct RouteRequest {
    /// The query string, if any (without `?`).
    pub(crate) query: Option<String>,
    /// Values of the pattern's `{name}` segments.
    pub(crate) params: BTreeMap<String, String>,
    /// Request headers.
    pub(crate) headers: hyper::HeaderMap,
    /// The body.
    pub(crate) body: Bytes,
    /// The client's address, when served from a socket ([`HttpServer::run`]).
    pub(crate) peer: Option<SocketAddr>,
}

impl RouteRequest {
    /// The value of the `{name}` segment.
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

type BoxedHandler =
    Arc<dyn Fn(RouteRequest) -> Pin<Box<dyn Future<Output = HttpResponse> + Send>> + Send + Sync>;

/// The route table; build it with [`Router::route`]. Path matching is `matchit`'s (the
/// router under axum): `{name}` segments capture one segment each; a trailing `/` is ignored.
#[derive(Default)]
pub struct Router {
    /// Pattern → index into `routes`.
    paths: matchit::Router<usize>,
    /// Per pattern: the pattern and its handlers by method.
    routes: Vec<(String, Vec<(Method, BoxedHandler)>)>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for (pattern, methods) in &self.routes {
            for (m, _) in methods {
                l.entry(&(m.as_str(), pattern));
            }
        }
        l.finish()
    }
}

/// `path` without a trailing `/` (but `/` itself).
fn trim_slash(path: &str) -> &str {
    match path.trim_end_matches('/') {
        "" => "/",
        p => p,
    }
}

impl Router {
    /// An empty router (every path answers 404).
    pub fn new() -> Self {
        Router::default()
    }

    /// Adds a route. `pattern` is an absolute path; `{name}` segments capture.
    ///
    /// # Panics
    /// If `pattern` is not a valid `matchit` pattern or conflicts with another one (the
    /// routes are fixed strings in the code: a programming error, caught by any test that
    /// builds the router).
    pub(crate) fn route<F, Fut>(mut self, method: Method, pattern: &str, handler: F) -> Self
    where
        F: Fn(RouteRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HttpResponse> + Send + 'static,
    {
        let pattern = trim_slash(pattern);
        let handler: BoxedHandler = Arc::new(move |req| Box::pin(handler(req)));
        let index = match self.routes.iter().position(|(p, _)| p == pattern) {
            Some(i) => i,
            None => {
                let i = self.routes.len();
                if let Err(e) = self.paths.insert(pattern, i) {
                    panic!("route {pattern}: {e}");
                }
                self.routes.push((pattern.to_owned(), Vec::new()));
                i
            }
        };
        self.routes[index].1.push((method, handler));
        self
    }

    /// The handlers of the pattern `path` matches, with the captured segments.
    fn matches(&self, path: &str) -> Option<(usize, BTreeMap<String, String>)> {
        let m = self.paths.at(trim_slash(path)).ok()?;
        let params = m
            .params
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some((*m.value, params))
    }

    /// Answers one request (the body is read only for a matching route, within
    /// [`BODY_TIMEOUT`] and [`MAX_BODY_BYTES`]).
    pub async fn handle<B>(&self, req: Request<B>) -> HttpResponse
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.handle_from(req, None).await
    }

    /// [`Router::handle`] for a request from `peer` (passed to the route as
    /// [`RouteRequest::peer`]).
    pub(crate) async fn handle_from<B>(
        &self,
        req: Request<B>,
        peer: Option<SocketAddr>,
    ) -> HttpResponse
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let Some((index, params)) = self.matches(&path) else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        let handler = self.routes[index]
            .1
            .iter()
            .find(|(m, _)| m == req.method())
            .map(|(_, h)| h.clone());
        let Some(handler) = handler else {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        };
        let (parts, body) = req.into_parts();
        let body =
            match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY_BYTES).collect())
                .await
            {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(_)) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
                Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "body not sent in time\n"),
            };
        handler(RouteRequest {
            query: parts.uri.query().map(str::to_owned),
            params,
            headers: parts.headers,
            body,
            peer,
        })
        .await
    }
}

/// A JSON response.
pub(crate) fn json<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> HttpResponse {
    let mut body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    respond(status, "application/json", body.into())
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> HttpResponse {
    respond(status, "text/plain; charset=utf-8", body.into())
}

/// A response with a given content type.
pub(crate) fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> HttpResponse {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A bound HTTP listener.
pub(crate) struct HttpServer {
    listener: TcpListener,
    allow: Option<SourceFilter>,
}

/// Decides whether a connection from a source address may be served.
pub(crate) type SourceFilter = Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>;

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("listener", &self.listener)
            .field("filtered", &self.allow.is_some())
            .finish()
    }
}

impl HttpServer {
    /// Binds `addr`.
    ///
    /// # Errors
    /// The bind error.
    pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(HttpServer {
            allow: None,
            listener: TcpListener::bind(addr).await?,
        })
    }

    /// Serves only sources for which `allow` is true; others are closed at accept, before
    /// any byte is read (the service passes the guard's allowlist).
    pub(crate) fn with_source_filter(mut self, allow: SourceFilter) -> Self {
        self.allow = Some(allow);
        self
    }

    /// The bound address.
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub(crate) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `router` until `stop`; open connections are then closed.
    pub(crate) async fn run(self, router: Arc<Router>, stop: CancellationToken) {
        let tracker = TaskTracker::new();
        let open = Arc::new(Mutex::new(OpenConnections::default()));
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => break,
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if let Some(allow) = &self.allow {
                if !allow(peer.ip()) {
                    metrics::counter!(m::HTTP_REFUSED, "reason" => "not_allowed").increment(1);
                    debug!(%peer, "http connection from outside the allowlist closed");
                    continue;
                }
            }
            let (id, end) = {
                let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
                for (victim, reason) in open.make_room(peer.ip()) {
                    metrics::counter!(m::HTTP_REFUSED, "reason" => reason).increment(1);
                    victim.cancel();
                }
                open.insert(peer.ip(), stop.child_token())
            };
            let router = router.clone();
            let open = open.clone();
            tracker.spawn(async move {
                tokio::select! {
                    () = serve_stream_from(router, stream, Some(peer)) => {}
                    () = end.cancelled() => debug!(%peer, "http connection closed to make room"),
                }
                open.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
            });
        }
        tracker.close();
        tracker.wait().await;
    }
}

/// Serves one HTTP/1.1 request on `stream` with `router`, under [`HEADER_TIMEOUT`],
/// [`BODY_TIMEOUT`] and [`CONNECTION_TIMEOUT`]; then closes it. Any byte stream works (the
/// fuzz target feeds an in-memory one).
pub async fn serve_stream<S>(router: Arc<Router>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    serve_stream_from(router, stream, None).await;
}

/// [`serve_stream`] for a connection from `peer`.
async fn serve_stream_from<S>(router: Arc<Router>, stream: S, peer: Option<SocketAddr>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let router = router.clone();
        async move { Ok::<_, std::convert::Infallible>(router.handle_from(req, peer).await) }
    });
    // One request per connection: an idle keep-alive client cannot hold a slot.
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "http connection"),
        Err(_) => debug!("http connection timed out"),
    }
}

/// The open connections, oldest first, for [`HttpServer::run`]'s limits.
#[derive(Debug, Default)]
struct OpenConnections {
    next_id: u64,
    /// id → (source, token that closes it); ids grow, so the first is the oldest.
    conns: BTreeMap<u64, (std::net::IpAddr, CancellationToken)>,
    per_source: std::collections::HashMap<std::net::IpAddr, usize>,
}

impl OpenConnections {
    /// The connections to close so one more from `source` fits, with the metric reason.
    fn make_room(&mut self, source: std::net::IpAddr) -> Vec<(CancellationToken, &'static str)> {
        let mut victims = Vec::new();
        if self.per_source.get(&source).copied().unwrap_or(0) >= MAX_CONNECTIONS_PER_SOURCE {
            let oldest = self
                .conns
                .iter()
                .find(|(_, (s, _))| *s == source)
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                victims.push((self.remove(id), "source_busy"));
            }
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            if let Some(&id) = self.conns.keys().next() {
                victims.push((self.remove(id), "busy"));
            }
        }
        victims
    }

    fn insert(
        &mut self,
        source: std::net::IpAddr,
        token: CancellationToken,
    ) -> (u64, CancellationToken) {
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(id, (source, token.clone()));
        *self.per_source.entry(source).or_default() += 1;
        (id, token)
    }

    /// Forgets `id` (a no-op when it was already removed); its token, to cancel.
    fn remove(&mut self, id: u64) -> CancellationToken {
        match self.conns.remove(&id) {
            Some((source, token)) => {
                if let Some(n) = self.per_source.get_mut(&source) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_source.remove(&source);
                    }
                }
                token
            }
            None => CancellationToken::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_capture_segments() {
        let r = Router::new().route(Method::GET, "/v1/calls/{id}/next", |_req| async {
            text(StatusCode::OK, "x")
        });
        let (_, got) = r.matches("/v1/calls/abc-123/next").unwrap();
        assert_eq!(got.get("id").map(String::as_str), Some("abc-123"));
        assert!(r.matches("/v1/calls/abc/next/more").is_none());
        assert!(r.matches("/v1/calls/abc").is_none());
        assert!(r.matches("/v1/wireguard").is_none());
        let root = Router::new().route(Method::GET, "/health", |_req| async {
            text(StatusCode::OK, "x")
        });
        assert!(root.matches("/health/").is_some());
        assert!(root.matches("/").is_none());
    }

    #[test]
    fn a_new_connection_beyond_a_limit_closes_the_oldest_in_its_scope() {
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let mut open = OpenConnections::default();
        let first_b = open.insert(b, CancellationToken::new()).1;
        let mut from_a = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_SOURCE {
            assert!(open.make_room(a).is_empty());
            from_a.push(open.insert(a, CancellationToken::new()));
        }
        // One more from `a`: a's oldest goes, b's is untouched.
        let victims = open.make_room(a);
        assert_eq!(victims.len(), 1);
        assert_eq!(victims[0].1, "source_busy");
        victims[0].0.cancel();
        assert!(from_a[0].1.is_cancelled());
        assert!(!first_b.is_cancelled());
        open.insert(a, CancellationToken::new());
        // A finished connection frees its place; removing twice is harmless.
        open.remove(from_a[1].0);
        open.remove(from_a[1].0);
        assert!(open.make_room(a).is_empty());
        // Fill up to the total from other sources: then the oldest of all goes.
        let mut n = 3u32;
        while open.conns.len() < MAX_CONNECTIONS {
            let ip = std::net::IpAddr::from([10, 0, (n >> 8) as u8, n as u8]);
            open.insert(ip, CancellationToken::new());
            n += 1;
        }
        let victims = open.make_room("10.9.9.9".parse().unwrap());
        assert_eq!(victims.len(), 1);
        assert_eq!(victims[0].1, "busy");
        victims[0].0.cancel();
        assert!(first_b.is_cancelled());
    }

    /// One GET from a client socket bound to `source`; the status line, or `None` when the
    /// server closed the connection without answering.
    async fn get_from(source: &str, server: SocketAddr, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let mut s = sock.connect(server).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return None;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out.lines().next().map(str::to_owned)
    }

    #[tokio::test]
    async fn source_filter_closes_strangers_before_reading() {
        let http = HttpServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
            .with_source_filter(Arc::new(|ip| ip == std::net::Ipv4Addr::LOCALHOST));
        let addr = http.local_addr().unwrap();
        let router = Arc::new(Router::new().route(
            Method::GET,
            "/v1/calls/{id}/next",
            |_req| async { text(StatusCode::OK, "operator") },
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(http.run(router, stop.clone()));
        let ok = get_from("127.0.0.1", addr, "/v1/calls/x/next").await;
        assert_eq!(ok.as_deref(), Some("HTTP/1.1 200 OK"));
        assert_eq!(get_from("127.0.0.2", addr, "/v1/calls/x/next").await, None);
        stop.cancel();
        task.await.unwrap();
    }
}
