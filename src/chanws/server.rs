//! The WebSocket listener Asterisk's WebSocket media channel connects to: for
//! `Dial(WebSocket/<connection>/...)` Asterisk (`res_websocket_client`) opens
//! `ws://<websocket_client.conf uri>[?<v(...) parameters>]` and, once upgraded, sends
//! `MEDIA_START`. Each connection is handed on as an [`Incoming`] to a [`Handler`], in its
//! own task. It only listens: who is admitted and where a call goes is the handler's.
//!
//! Per connection: [`Handler::screen`] on accept, before a byte is read (a refused one is
//! closed at once); then, within [`ListenSettings::handshake_timeout`], the HTTP upgrade
//! (HTTP Basic checked when [`ListenSettings::credentials`] is set, as Asterisk sends it from
//! `websocket_client.conf` `username`/`password`; the subprotocol `media` echoed when
//! offered) and the first text message, which must be `MEDIA_START` (its format, plain text
//! or JSON, is the call's control format). Anything else closes that connection only and is
//! reported to [`Handler::handshake_failed`]. Shutdown is as AudioSocket's: stop accepting,
//! wait up to [`ListenSettings::shutdown_grace`], then cancel each call's `hangup` token.
//!
//! Source: Asterisk 22.10.1 `res/res_http_websocket.c` (`websocket_client_handshake`: the
//! request line, `Authorization: Basic`, `Sec-WebSocket-Protocol`; a response with
//! `Sec-WebSocket-Extensions` is refused, so none is sent) and `channels/chan_websocket.c`
//! (`websocket_handoff_to_channel`: `MEDIA_START` first).

use crate::chanws::connection::MediaChannel;
use crate::chanws::protocol::{ControlFormat, Event, MediaStart};
use futures_util::StreamExt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// A connection that upgraded and sent `MEDIA_START`.
#[derive(Debug)]
pub struct Incoming {
    /// The media channel, `MEDIA_START` read.
    pub channel: MediaChannel<TcpStream>,
    /// The TCP peer (Asterisk).
    pub peer: SocketAddr,
    /// The request path (`/` when `websocket_client.conf`'s uri has none).
    pub path: String,
    /// The query parameters, decoded, in order: the `v(name=value,...)` of the dial string
    /// (Asterisk joins them with `&`) after any already in the configured uri.
    pub params: Vec<(String, String)>,
}

impl Incoming {
    /// The first value of query parameter `name`.
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// HTTP Basic credentials Asterisk must present.
#[derive(Clone)]
pub struct Credentials {
    /// The expected `Authorization` header value, `Basic <base64(user:password)>`.
    expected: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl Credentials {
    /// The credentials `username:password`.
    pub(crate) fn new(username: &str, password: &str) -> Self {
        use base64::Engine as _;
        let b64 =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        Credentials {
            expected: format!("Basic {b64}"),
        }
    }

    /// Whether `header` (the request's `Authorization`) matches, in constant time.
    fn check(&self, header: Option<&HeaderValue>) -> bool {
        let Some(h) = header else { return false };
        let (a, b) = (h.as_bytes(), self.expected.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The listener's settings, read from the handler for each connection (a reload may change
/// them).
#[derive(Debug, Clone)]
pub struct ListenSettings {
    /// Time a new connection has for the upgrade and `MEDIA_START`.
    pub handshake_timeout: Duration,
    /// How long live calls may go on after shutdown starts.
    pub shutdown_grace: Duration,
    /// HTTP Basic credentials required of Asterisk, if any.
    pub credentials: Option<Credentials>,
    /// Largest WebSocket message accepted, bytes.
    pub max_message_bytes: usize,
}

/// Why a connection did not become a call, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Closed before `MEDIA_START`.
    Closed,
    /// No upgrade and `MEDIA_START` within [`ListenSettings::handshake_timeout`].
    Timeout,
    /// Not a WebSocket upgrade (or a broken one).
    Upgrade,
    /// Missing or wrong HTTP Basic credentials (answered 401).
    Unauthorized,
    /// The first message was not `MEDIA_START` (or a malformed one).
    NotMediaStart,
}

impl HandshakeFailure {
    /// The label (`closed`, `timeout`, `upgrade`, `unauthorized`, `not_media_start`).
    pub(crate) fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Upgrade => "upgrade",
            HandshakeFailure::Unauthorized => "unauthorized",
            HandshakeFailure::NotMediaStart => "not_media_start",
        }
    }
}

/// What the listener hands connections to.
pub trait Handler: Send + Sync + 'static {
    /// What [`Self::screen`] lets through, carried to [`Self::call`].
    type Ticket: Send + 'static;

    /// Screens a new connection from `peer` before anything is read; `None` closes it.
    fn screen(&self, peer: SocketAddr) -> Option<Self::Ticket>;

    /// The connection from `peer` did not become a call.
    fn handshake_failed(&self, peer: SocketAddr, why: HandshakeFailure);

    /// Runs one call to its end. `hangup` is cancelled when shutdown's grace runs out.
    fn call(
        &self,
        incoming: Incoming,
        ticket: Self::Ticket,
        hangup: CancellationToken,
    ) -> impl Future<Output = ()> + Send;

    /// The listener's settings now.
    fn settings(&self) -> ListenSettings;

    /// The listener stopped and every call ended.
    fn stopped(&self) {}
}

/// A bound WebSocket media listener, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]).
    ///
    /// # Errors
    /// The bind error.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Server {
            listener: TcpListener::bind(addr).await?,
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts calls for `handler` until `stop` is cancelled, then lets live calls finish
    /// for the grace period and hangs up the rest. Returns when every call task has ended.
    pub async fn run<H: Handler>(self, handler: Arc<H>, stop: CancellationToken) {
        let tracker = TaskTracker::new();
        let hangup = CancellationToken::new();
        info!(listen = ?self.listener.local_addr().ok(), "chan_websocket listening");
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Some(ticket) = handler.screen(peer) else { continue };
                        if let Err(e) = stream.set_nodelay(true) {
                            warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                        }
                        let (handler, hangup) = (handler.clone(), hangup.clone());
                        tracker.spawn(connection(handler, stream, peer, ticket, hangup));
                    }
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(self.listener);
        tracker.close();
        let grace = handler.settings().shutdown_grace;
        if timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                live_calls = tracker.len(),
                "grace period over; hanging up live chan_websocket calls"
            );
            hangup.cancel();
            tracker.wait().await;
        }
        handler.stopped();
        info!("chan_websocket listener stopped");
    }
}

/// What the upgrade callback saw of the request.
#[derive(Debug, Default)]
struct Seen {
    path: String,
    query: Option<String>,
    unauthorized: bool,
}

/// One connection's task: the upgrade and `MEDIA_START`, then the handler's call.
async fn connection<H: Handler>(
    handler: Arc<H>,
    stream: TcpStream,
    peer: SocketAddr,
    ticket: H::Ticket,
    hangup: CancellationToken,
) {
    let settings = handler.settings();
    match timeout(
        settings.handshake_timeout,
        handshake(stream, peer, &settings),
    )
    .await
    {
        Ok(Ok(incoming)) => handler.call(incoming, ticket, hangup).await,
        Ok(Err(why)) => {
            drop(ticket);
            handler.handshake_failed(peer, why);
        }
        Err(_) => {
            drop(ticket);
            handler.handshake_failed(peer, HandshakeFailure::Timeout);
        }
    }
}

/// The HTTP upgrade and `MEDIA_START`.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    settings: &ListenSettings,
) -> Result<Incoming, HandshakeFailure> {
    let mut seen = Seen::default();
    // The signature is tungstenite's `Callback`; its error type is not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        seen.path = req.uri().path().to_owned();
        seen.query = req.uri().query().map(str::to_owned);
        if let Some(c) = &settings.credentials
            && !c.check(req.headers().get("authorization"))
        {
            seen.unauthorized = true;
            let mut e = ErrorResponse::new(Some("unauthorized".into()));
            *e.status_mut() = StatusCode::UNAUTHORIZED;
            e.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Basic realm=\"voicegate\""),
            );
            return Err(e);
        }
        let offers_media = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == "media");
        if offers_media {
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("media"));
        }
        Ok(resp)
    };
    let config = media_ws_config(settings.max_message_bytes);
    let ws = match tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
    {
        Ok(ws) => ws,
        Err(e) => {
            debug!(%peer, error = %e, "websocket upgrade failed");
            return Err(if seen.unauthorized {
                HandshakeFailure::Unauthorized
            } else {
                HandshakeFailure::Upgrade
            });
        }
    };
    let mut ws = ws;
    let (format, start) = read_media_start(&mut ws, peer).await?;
    let params = seen
        .query
        .as_deref()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    Ok(Incoming {
        channel: MediaChannel::new(ws, format, start),
        peer,
        path: seen.path,
        params,
    })
}

/// The WebSocket settings of a media channel taking messages up to `max_message_bytes`.
///
/// Small buffers: tungstenite's defaults (128 KiB to read, 128 KiB to write) cost 170 KiB
/// per call where a message is 20 ms of audio (measured with `benches/load.rs`). Writes go
/// out at once (every send flushes anyway); a peer that stops reading fills at most
/// `max_write_buffer_size`, then the send fails and ends that call.
pub(crate) fn media_ws_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * max_message_bytes)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

/// Reads the first message of a media WebSocket, which must be `MEDIA_START` (Asterisk
/// sends it first, `websocket_handoff_to_channel` in `channels/chan_websocket.c`); its
/// shape (plain text or JSON) is the call's control format. Pings are skipped.
///
/// # Errors
/// [`HandshakeFailure::Closed`] when the socket ends first,
/// [`HandshakeFailure::NotMediaStart`] for any other first message.
pub(crate) async fn read_media_start<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    peer: SocketAddr,
) -> Result<(ControlFormat, MediaStart), HandshakeFailure> {
    let text = loop {
        match ws.next().await {
            None | Some(Err(_)) => return Err(HandshakeFailure::Closed),
            Some(Ok(Message::Text(t))) => break t,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) => return Err(HandshakeFailure::Closed),
            Some(Ok(_)) => return Err(HandshakeFailure::NotMediaStart),
        }
    };
    let format = ControlFormat::sniff(&text);
    match Event::parse(&text, format) {
        Ok(Event::MediaStart(m)) => Ok((format, m)),
        other => {
            debug!(%peer, first = ?other, "first message is not MEDIA_START");
            Err(HandshakeFailure::NotMediaStart)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chanws::connection::Inbound;
    use crate::chanws::protocol::{Command, MediaFormat, MediaStart};
    use bytes::Bytes;
    use futures_util::SinkExt;
    use std::sync::Mutex;
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    struct Probe {
        allow: bool,
        creds: Option<Credentials>,
        failures: Mutex<Vec<HandshakeFailure>>,
        calls: mpsc::UnboundedSender<Incoming>,
    }

    impl Handler for Probe {
        type Ticket = ();
        fn screen(&self, _peer: SocketAddr) -> Option<()> {
            self.allow.then_some(())
        }
        fn handshake_failed(&self, _peer: SocketAddr, why: HandshakeFailure) {
            self.failures.lock().unwrap().push(why);
        }
        async fn call(&self, incoming: Incoming, _t: (), _h: CancellationToken) {
            let _ = self.calls.send(incoming);
        }
        fn settings(&self) -> ListenSettings {
            ListenSettings {
                handshake_timeout: Duration::from_secs(5),
                shutdown_grace: Duration::from_millis(10),
                credentials: self.creds.clone(),
                max_message_bytes: 65_536,
            }
        }
    }

    async fn listener(
        allow: bool,
        creds: Option<Credentials>,
    ) -> (SocketAddr, Arc<Probe>, mpsc::UnboundedReceiver<Incoming>) {
        let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = server.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let probe = Arc::new(Probe {
            allow,
            creds,
            failures: Mutex::new(Vec::new()),
            calls: tx,
        });
        tokio::spawn(server.run(probe.clone(), CancellationToken::new()));
        (addr, probe, rx)
    }

    /// The request Asterisk's `websocket_client_handshake` writes (res_http_websocket.c):
    /// `Authorization: Basic` from username/password, `Sec-WebSocket-Protocol` from
    /// `protocols`.
    fn asterisk_request(addr: SocketAddr, path_query: &str, auth: Option<&str>) -> Request {
        let mut req = format!("ws://{addr}{path_query}")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("media"));
        if let Some(a) = auth {
            use base64::Engine as _;
            let v = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(a)
            );
            req.headers_mut()
                .insert("authorization", HeaderValue::from_str(&v).unwrap());
        }
        req
    }

    fn start(format: MediaFormat, size: u32) -> MediaStart {
        MediaStart {
            connection_id: "voicegate".into(),
            channel: "WebSocket/voicegate/0x55d0c0ffee00".into(),
            channel_id: "1764712345.42".into(),
            format,
            optimal_frame_size: size,
            ptime: 20,
            channel_variables: Default::default(),
        }
    }

    async fn wait_failure(probe: &Probe) -> HandshakeFailure {
        for _ in 0..500 {
            if let Some(f) = probe.failures.lock().unwrap().first() {
                return *f;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no handshake failure reported");
    }

    #[tokio::test]
    async fn a_call_arrives_with_its_parameters_media_and_controls() {
        let (addr, _probe, mut calls) =
            listener(true, Some(Credentials::new("asterisk", "s3cret"))).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let req = asterisk_request(
            addr,
            "/media?caller=%2B4930123&profile=sales",
            Some("asterisk:s3cret"),
        );
        let (mut ast, resp) = tokio_tungstenite::client_async(req, stream).await.unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], "media");
        assert!(resp.headers().get("sec-websocket-extensions").is_none());
        let ms = Event::MediaStart(start(MediaFormat::Slin(16_000), 640));
        ast.send(Message::text(
            ms.render(ControlFormat::Json, "1764712345.42"),
        ))
        .await
        .unwrap();
        let mut inc = calls.recv().await.unwrap();
        assert_eq!(inc.path, "/media");
        assert_eq!(inc.param("caller"), Some("+4930123"));
        assert_eq!(inc.param("profile"), Some("sales"));
        assert_eq!(inc.channel.format(), ControlFormat::Json);
        assert_eq!(inc.channel.start().format, MediaFormat::Slin(16_000));
        // Asterisk → voicegate: media, then a DTMF event.
        ast.send(Message::binary(vec![7u8; 640])).await.unwrap();
        ast.send(Message::text(
            r#"{"event":"DTMF_END","channel_id":"1.2","digit":"4"}"#,
        ))
        .await
        .unwrap();
        assert_eq!(
            inc.channel.recv().await.unwrap(),
            Some(Inbound::Media(Bytes::from(vec![7u8; 640])))
        );
        assert_eq!(
            inc.channel.recv().await.unwrap(),
            Some(Inbound::Event(Event::DtmfEnd { digit: '4' }))
        );
        // voicegate → Asterisk: a command in the call's format, media, a close.
        inc.channel.send(&Command::FlushMedia).await.unwrap();
        inc.channel
            .send_media(Bytes::from(vec![1u8; 640]))
            .await
            .unwrap();
        inc.channel.close().await.unwrap();
        let got = ast.next().await.unwrap().unwrap();
        assert_eq!(
            Command::parse(got.to_text().unwrap(), ControlFormat::Json),
            Ok(Command::FlushMedia)
        );
        assert_eq!(
            ast.next().await.unwrap().unwrap(),
            Message::binary(vec![1u8; 640])
        );
        assert!(matches!(
            ast.next().await.unwrap().unwrap(),
            Message::Close(_)
        ));
    }

    #[tokio::test]
    async fn plain_text_media_start_sets_the_plain_format() {
        let (addr, _probe, mut calls) = listener(true, None).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut ast, _) =
            tokio_tungstenite::client_async(asterisk_request(addr, "", None), stream)
                .await
                .unwrap();
        let ms = Event::MediaStart(start(MediaFormat::Slin(8000), 320));
        ast.send(Message::text(ms.render(ControlFormat::PlainText, "1.2")))
            .await
            .unwrap();
        let mut inc = calls.recv().await.unwrap();
        assert_eq!(inc.channel.format(), ControlFormat::PlainText);
        assert_eq!(inc.path, "/");
        assert!(inc.params.is_empty());
        inc.channel
            .send(&Command::MarkMedia {
                correlation_id: Some("vg-5".into()),
            })
            .await
            .unwrap();
        assert_eq!(
            ast.next().await.unwrap().unwrap(),
            Message::text("MARK_MEDIA vg-5")
        );
        // Asterisk's close is the call's end.
        ast.close(None).await.unwrap();
        assert_eq!(inc.channel.recv().await.unwrap(), None);
    }

    #[tokio::test]
    async fn wrong_credentials_get_401_and_no_call() {
        let (addr, probe, mut calls) =
            listener(true, Some(Credentials::new("asterisk", "s3cret"))).await;
        for auth in [None, Some("asterisk:wrong")] {
            let stream = TcpStream::connect(addr).await.unwrap();
            let e = tokio_tungstenite::client_async(asterisk_request(addr, "/", auth), stream)
                .await
                .unwrap_err();
            let tokio_tungstenite::tungstenite::Error::Http(r) = e else {
                panic!("not an HTTP refusal: {e}");
            };
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
        assert_eq!(wait_failure(&probe).await, HandshakeFailure::Unauthorized);
        assert!(calls.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_first_message_other_than_media_start_is_no_call() {
        let (addr, probe, mut calls) = listener(true, None).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut ast, _) =
            tokio_tungstenite::client_async(asterisk_request(addr, "/", None), stream)
                .await
                .unwrap();
        ast.send(Message::binary(vec![0u8; 320])).await.unwrap();
        assert_eq!(wait_failure(&probe).await, HandshakeFailure::NotMediaStart);
        assert!(calls.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_screened_out_peer_is_closed_before_the_upgrade() {
        let (addr, probe, mut calls) = listener(false, None).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let r = tokio_tungstenite::client_async(asterisk_request(addr, "/", None), stream).await;
        assert!(r.is_err(), "a refused peer must not get an upgrade");
        assert!(probe.failures.lock().unwrap().is_empty());
        assert!(calls.try_recv().is_err());
    }
}
