//! The WebSocket media channel (`chan_websocket`, [`crate::chanws`]) as a call's
//! [`MediaPort`], and the listener's [`server::Handler`] that admits its calls through the same
//! [`Router`] as AudioSocket (guard, limits, budget, directory, fallback, records).
//!
//! Where the channel's own controls help, they are used:
//! - barge-in: [`MediaPort::flushed`] sends `FLUSH_MEDIA`, so what Asterisk still queues is
//!   dropped at once;
//! - `MARK_MEDIA` after every [`MARK_EVERY`]th frame: `MEDIA_MARK_PROCESSED` says how much
//!   of what was sent the caller has heard; the depth Asterisk's queue reached is logged at
//!   the end of the call (`playout_max_unconfirmed_frames`);
//! - `MEDIA_XOFF` / `MEDIA_XON`: no frame is sent while Asterisk's queue is over its XOFF
//!   level (held-back frames are counted, not buffered).
//!
//! The session's 20 ms clock still paces what is sent: Asterisk plays one frame per `ptime`
//! from its queue, so a paced sender keeps that queue at a frame or two (measured in
//! `tests/suite/asterisk.rs`), and barge-in, marks and flow control stay exact.
//!
//! URI parameters (the dial string's `v(...)`): `call_id` (a UUID, for the dialplan's
//! `/v1/calls/{id}/next`; a fresh one when absent or not a UUID) and `caller` (the caller's
//! number, given to the agent).

use crate::audiosocket::SlinRate;
use crate::audiosocket::server::Handler as AudioSocketHandler;
use crate::call::media::{MediaError, MediaEvent, MediaPort};
use crate::call::route::{Router, Ticket};
use crate::chanws::connection::{ChannelError, Inbound, MediaChannel};
use crate::chanws::playout::Playout;
use crate::chanws::protocol::{Command, Event, MediaFormat};
use crate::chanws::server::{self, HandshakeFailure, Incoming, ListenSettings};
use crate::health::metrics as m;
use bytes::{BufMut, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

/// A `MARK_MEDIA` after every this many frames sent (5 × 20 ms: what the caller heard is
/// known to 100 ms).
pub(crate) const MARK_EVERY: u32 = 5;

/// The call rate of a chan_websocket format: slin at a rate AudioSocket's rates include.
///
/// # Errors
/// The format's name, for the log, when it is not slin at such a rate (G.711, opus, ...:
/// use `c(slin16)` or `c(slin)` in the dial string).
pub(crate) fn rate_of(format: &MediaFormat) -> Result<SlinRate, String> {
    match format {
        MediaFormat::Slin(hz) => SlinRate::ALL
            .into_iter()
            .find(|r| r.hz() == *hz)
            .ok_or_else(|| format.name()),
        _ => Err(format.name()),
    }
}

/// One call's chan_websocket channel as a [`MediaPort`].
#[derive(Debug)]
pub struct WebSocketPort<S> {
    channel: MediaChannel<S>,
    rate: SlinRate,
    playout: Playout,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> WebSocketPort<S> {
    /// The port over `channel`.
    ///
    /// # Errors
    /// The format name when the channel's media is not slin ([`rate_of`]).
    pub(crate) fn new(channel: MediaChannel<S>) -> Result<Self, String> {
        let rate = rate_of(&channel.start().format)?;
        Ok(WebSocketPort {
            channel,
            rate,
            playout: Playout::new(MARK_EVERY),
            out: BytesMut::new(),
        })
    }

    /// The playout counters so far (frames sent, heard, held back, flushed).
    #[cfg(test)]
    pub(crate) fn playout(&self) -> crate::chanws::playout::PlayoutStats {
        self.playout.stats()
    }
}

fn media_error(e: ChannelError) -> MediaError {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        ChannelError::Ws(E::Io(io)) => MediaError::Io(io),
        other => MediaError::Protocol(other.to_string()),
    }
}

fn io_error(e: ChannelError) -> std::io::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        ChannelError::Ws(E::Io(io)) => io,
        other => std::io::Error::other(other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> MediaPort for WebSocketPort<S> {
    fn transport(&self) -> &'static str {
        "websocket"
    }

    async fn read(&mut self) -> Result<Option<MediaEvent>, MediaError> {
        loop {
            let inbound = self.channel.recv().await.map_err(media_error)?;
            let event = match inbound {
                None => return Ok(None),
                Some(Inbound::Media(payload)) => {
                    if payload.len() % 2 != 0 {
                        return Err(MediaError::Protocol(format!(
                            "odd slin message of {} bytes",
                            payload.len()
                        )));
                    }
                    return Ok(Some(MediaEvent::Audio {
                        rate: self.rate,
                        payload,
                    }));
                }
                Some(Inbound::Event(e)) => e,
            };
            if self.playout.on_event(&event) {
                continue;
            }
            match event {
                Event::DtmfEnd { digit } => return Ok(Some(MediaEvent::Dtmf(digit))),
                Event::MediaStart(_) => {
                    return Err(MediaError::Protocol("a second MEDIA_START".into()));
                }
                Event::Error { error_text } => {
                    warn!(%error_text, "chan_websocket refused a command");
                }
                other => debug!(event = ?other, "chan_websocket event"),
            }
        }
    }

    /// Writes one frame in the channel's format. Before the caller's first audio fixes the
    /// call's rate the session may prompt the media with 8 kHz silence (a Stasis call's
    /// externalMedia is prompted at once); the channel's rate is known from `MEDIA_START`,
    /// so such a frame goes out as 20 ms of silence at that rate.
    async fn write_frame(&mut self, rate: SlinRate, samples: &[i16]) -> std::io::Result<()> {
        if !self.playout.admit_frame() {
            return Ok(());
        }
        if rate == self.rate {
            self.out.reserve(samples.len() * 2);
            for s in samples {
                self.out.put_i16_le(*s);
            }
        } else {
            self.out.put_bytes(0, self.rate.samples_per_frame() * 2);
        }
        let frame = self.out.split().freeze();
        self.channel.send_media(frame).await.map_err(io_error)?;
        if let Some(mark) = self.playout.frame_sent() {
            self.channel.send(&mark).await.map_err(io_error)?;
        }
        Ok(())
    }

    async fn flushed(&mut self) -> std::io::Result<()> {
        let flush = self.playout.flush();
        self.channel.send(&flush).await.map_err(io_error)
    }

    async fn hang_up(&mut self) -> std::io::Result<()> {
        self.channel.send(&Command::Hangup).await.map_err(io_error)
    }

    async fn close(&mut self) -> std::io::Result<()> {
        let s = self.playout.stats();
        info!(
            frames_sent = s.frames_sent,
            frames_heard = s.frames_heard,
            playout_max_unconfirmed_frames = s.max_unconfirmed,
            marks_processed = s.marks_processed,
            flushes = s.flushes,
            frames_flushed = s.frames_flushed,
            frames_held_back = s.frames_held_back,
            xoffs = s.xoffs,
            "chan_websocket playout"
        );
        self.channel.close().await.map_err(io_error)
    }
}

fn start_control<S: AsyncRead + AsyncWrite + Unpin>(c: &MediaChannel<S>) -> &'static str {
    c.format().name()
}

/// The chan_websocket listener's handler: every connection goes through `router`, as an
/// AudioSocket one does.
#[derive(Debug)]
pub struct WebSocketCalls {
    /// The router shared with the AudioSocket listener.
    pub router: Arc<Router>,
    /// The listener's settings.
    pub settings: ListenSettings,
}

impl server::Handler for WebSocketCalls {
    type Ticket = Ticket;

    fn screen(&self, peer: SocketAddr) -> Option<Ticket> {
        AudioSocketHandler::screen(&*self.router, peer)
    }

    fn handshake_failed(&self, peer: SocketAddr, why: HandshakeFailure) {
        ::metrics::counter!(m::HANDSHAKE_FAILURES, "reason" => why.label()).increment(1);
        debug!(%peer, reason = why.label(), "chan_websocket connection closed before MEDIA_START");
    }

    async fn call(&self, incoming: Incoming, ticket: Ticket, hangup: CancellationToken) {
        let call_id = incoming
            .param("call_id")
            .and_then(|s| Uuid::parse_str(s).ok())
            .filter(|u| !u.is_nil())
            .unwrap_or_else(Uuid::new_v4);
        // v(profile=...,caller=...,called_number=...,<variable>=...) of the dial string.
        let choice = crate::profiles::ProfileChoice::from_uri_params(
            incoming
                .params
                .iter()
                .filter(|(k, _)| k != "call_id")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let peer = incoming.peer;
        let mut channel = incoming.channel;
        let start = channel.start().clone();
        info!(
            %call_id,
            channel = %start.channel,
            channel_id = %start.channel_id,
            format = %start.format.name(),
            control = start_control(&channel),
            caller = choice.caller_number.as_deref().unwrap_or(""),
            profile = choice.profile.as_deref().unwrap_or(""),
            "chan_websocket call"
        );
        if let Err(format) = rate_of(&start.format) {
            // Refused like a stranger: no session, no record; Asterisk's dialplan goes on.
            ::metrics::counter!(m::HANDSHAKE_FAILURES, "reason" => "format").increment(1);
            warn!(%call_id, %format, "chan_websocket call in a format voicegate does not take (use c(slin16) or c(slin)); hung up");
            drop(ticket);
            let _ = channel.send(&Command::Hangup).await;
            let _ = channel.close().await;
            return;
        }
        let port = WebSocketPort::new(channel).expect("rate_of checked the format");
        self.router
            .take_call_with_choice(port, call_id, peer, Some(choice), ticket, hangup)
            .await;
    }

    fn settings(&self) -> ListenSettings {
        self.settings.clone()
    }
}

/// A `Dial(WebSocket/INCOMING/...)` call voicegate connected to, for
/// [`crate::call::media_rtp::serve`] (the same queue shape as Stasis calls).
pub(crate) type IncomingCall =
    crate::call::media_rtp::PortCall<WebSocketPort<crate::chanws::client::ClientStream>>;

/// Why an announced `WebSocket/INCOMING` channel did not become a call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IncomingError {
    /// The connection id or the body is unusable (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// voicegate could not connect to Asterisk's `/media/<id>` (HTTP 502): refused, an
    /// HTTP error from Asterisk (404 = no such channel waits), no `MEDIA_START`.
    #[error("{0}")]
    Connect(#[from] crate::chanws::client::ConnectError),
    /// The channel's media is not slin (HTTP 415): use `c(slin16)` or `c(slin)`.
    #[error("media in {0}; use c(slin16) or c(slin)")]
    Format(String),
    /// voicegate is shutting down or the queue is full (HTTP 503).
    #[error("not taking calls now")]
    Unavailable,
}

/// Connects voicegate to the `WebSocket/INCOMING` channels the dialplan announces
/// (`POST /v1/websocket/<connection id>` on the health listener, from the pre-dial handler
/// of `Dial(WebSocket/INCOMING/...,b(...))`): Asterisk's `chan_websocket` waits for a client
/// at `<base>/media/<connection id>` (`MEDIA_WEBSOCKET_CONNECTION_ID`); once `MEDIA_START`
/// is read the call goes to `calls`, through the router as every call.
#[derive(Debug)]
pub(crate) struct IncomingConnector {
    /// Asterisk's HTTP server (`[websocket] asterisk_url`, else `[ari] url`).
    pub(crate) base: String,
    /// The upgrade and `MEDIA_START` must come within this long.
    pub(crate) handshake_timeout: std::time::Duration,
    /// Largest WebSocket message taken, bytes.
    pub(crate) max_message_bytes: usize,
    /// Where connected calls go.
    pub(crate) calls: tokio::sync::mpsc::Sender<IncomingCall>,
}

impl IncomingConnector {
    /// Connects to channel `connection_id`; `body` is the announcement, a form as the
    /// dial string's `v(...)` would carry it: `call_id` (a UUID, for `/next`; a fresh one
    /// when absent), `caller`, `profile`, `called_number`, `<variable>`. Returns the call
    /// id once the call is queued.
    ///
    /// # Errors
    /// [`IncomingError`], each with its HTTP status ([`IncomingError::status`]).
    pub(crate) async fn connect(
        &self,
        connection_id: &str,
        body: &[u8],
    ) -> Result<Uuid, IncomingError> {
        use crate::chanws::client;
        let url = client::media_url(&self.base, connection_id)
            .map_err(|e| IncomingError::BadRequest(e.to_string()))?;
        let params: Vec<(String, String)> = form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let call_id = match params.iter().find(|(k, _)| k == "call_id") {
            Some((_, v)) => Uuid::parse_str(v)
                .ok()
                .filter(|u| !u.is_nil())
                .ok_or_else(|| IncomingError::BadRequest("call_id must be a UUID".into()))?,
            None => Uuid::new_v4(),
        };
        let choice = crate::profiles::ProfileChoice::from_uri_params(
            params
                .iter()
                .filter(|(k, _)| k != "call_id")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let out = match client::connect(&url, self.handshake_timeout, self.max_message_bytes).await
        {
            Ok(out) => out,
            Err(e) => {
                ::metrics::counter!(m::HANDSHAKE_FAILURES, "reason" => e.label()).increment(1);
                return Err(e.into());
            }
        };
        let mut channel = out.channel;
        if let Err(format) = rate_of(&channel.start().format) {
            ::metrics::counter!(m::HANDSHAKE_FAILURES, "reason" => "format").increment(1);
            let _ = channel.send(&Command::Hangup).await;
            let _ = channel.close().await;
            return Err(IncomingError::Format(format));
        }
        let start = channel.start().clone();
        info!(%call_id, connection_id, channel = %start.channel, format = %start.format.name(),
            caller = choice.caller_number.as_deref().unwrap_or(""), "chan_websocket INCOMING call connected");
        let port = WebSocketPort::new(channel).map_err(IncomingError::Format)?;
        self.calls
            .try_send(IncomingCall {
                call_id,
                peer: out.peer,
                port,
                choice: Some(choice),
            })
            .map_err(|_| IncomingError::Unavailable)?;
        Ok(call_id)
    }
}

impl IncomingError {
    /// The HTTP status the announcement is answered with.
    pub(crate) fn status(&self) -> u16 {
        match self {
            IncomingError::BadRequest(_) => 400,
            IncomingError::Connect(_) => 502,
            IncomingError::Format(_) => 415,
            IncomingError::Unavailable => 503,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chanws::protocol::{ControlFormat, MediaStart};
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    fn start(format: MediaFormat) -> MediaStart {
        MediaStart {
            connection_id: "voicegate".into(),
            channel: "WebSocket/voicegate/0x1".into(),
            channel_id: "1764712345.3".into(),
            format,
            optimal_frame_size: 640,
            ptime: 20,
            channel_variables: Default::default(),
        }
    }

    /// The port over one end of a WebSocket whose other end plays Asterisk.
    async fn pair(
        format: ControlFormat,
    ) -> (WebSocketPort<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let ours = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let ast = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let ch = MediaChannel::new(ours, format, start(MediaFormat::Slin(16_000)));
        (WebSocketPort::new(ch).unwrap(), ast)
    }

    async fn next_text(ast: &mut WebSocketStream<DuplexStream>, f: ControlFormat) -> Command {
        loop {
            match ast.next().await.unwrap().unwrap() {
                Message::Text(t) => return Command::parse(&t, f).unwrap(),
                Message::Binary(_) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn only_slin_formats_are_taken() {
        assert_eq!(rate_of(&MediaFormat::Slin(8000)), Ok(SlinRate::Hz8000));
        assert_eq!(rate_of(&MediaFormat::Slin(16_000)), Ok(SlinRate::Hz16000));
        assert_eq!(rate_of(&MediaFormat::Ulaw), Err("ulaw".into()));
        assert_eq!(
            rate_of(&MediaFormat::Other("opus".into())),
            Err("opus".into())
        );
    }

    #[tokio::test]
    async fn media_and_dtmf_reach_the_call_and_playout_events_do_not() {
        for f in [ControlFormat::PlainText, ControlFormat::Json] {
            let (mut port, mut ast) = pair(f).await;
            ast.send(Message::text(Event::MediaXoff.render(f, "1.3")))
                .await
                .unwrap();
            ast.send(Message::binary(vec![1u8, 0, 2, 0])).await.unwrap();
            ast.send(Message::text(
                Event::DtmfEnd { digit: '9' }.render(f, "1.3"),
            ))
            .await
            .unwrap();
            assert_eq!(
                port.read().await.unwrap(),
                Some(MediaEvent::Audio {
                    rate: SlinRate::Hz16000,
                    payload: bytes::Bytes::from_static(&[1, 0, 2, 0]),
                })
            );
            assert!(port.playout.paused(), "MEDIA_XOFF was taken by the playout");
            assert_eq!(port.read().await.unwrap(), Some(MediaEvent::Dtmf('9')));
            ast.send(Message::text(
                Event::MediaStart(start(MediaFormat::Slin(8000))).render(f, "x"),
            ))
            .await
            .unwrap();
            assert!(matches!(port.read().await, Err(MediaError::Protocol(_))));
            ast.close(None).await.unwrap();
            assert_eq!(port.read().await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn frames_go_out_as_slin_with_marks_flush_and_hangup_in_the_calls_format() {
        for f in [ControlFormat::PlainText, ControlFormat::Json] {
            let (mut port, mut ast) = pair(f).await;
            assert_eq!(port.transport(), "websocket");
            let frame = vec![-2i16; 320];
            for _ in 0..MARK_EVERY {
                port.write_frame(SlinRate::Hz16000, &frame).await.unwrap();
            }
            for _ in 0..MARK_EVERY {
                let Message::Binary(b) = ast.next().await.unwrap().unwrap() else {
                    panic!("not media");
                };
                assert_eq!(b.len(), 640);
                assert_eq!(&b[..2], &(-2i16).to_le_bytes());
            }
            assert_eq!(
                next_text(&mut ast, f).await,
                Command::MarkMedia {
                    correlation_id: Some(format!("vg-0-{MARK_EVERY}"))
                }
            );
            // Asterisk played up to the mark: the port counts it heard.
            let done = Event::MediaMarkProcessed {
                correlation_id: format!("vg-0-{MARK_EVERY}"),
            };
            ast.send(Message::text(done.render(f, "1.3")))
                .await
                .unwrap();
            ast.send(Message::text(
                Event::DtmfEnd { digit: '1' }.render(f, "1.3"),
            ))
            .await
            .unwrap();
            assert_eq!(port.read().await.unwrap(), Some(MediaEvent::Dtmf('1')));
            assert_eq!(port.playout().frames_heard, u64::from(MARK_EVERY));
            port.flushed().await.unwrap();
            assert_eq!(next_text(&mut ast, f).await, Command::FlushMedia);
            port.hang_up().await.unwrap();
            assert_eq!(next_text(&mut ast, f).await, Command::Hangup);
            port.close().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_frame_at_another_rate_goes_out_as_silence_at_the_channels_rate() {
        let (mut port, mut ast) = pair(ControlFormat::PlainText).await;
        // The session's 8 kHz prompt before the first audio, on a slin16 channel.
        port.write_frame(SlinRate::Hz8000, &[0; 160]).await.unwrap();
        let Message::Binary(b) = ast.next().await.unwrap().unwrap() else {
            panic!("not media");
        };
        assert_eq!(b.len(), 640, "20 ms of slin16");
        assert!(b.iter().all(|&x| x == 0));
    }

    /// One fake Asterisk `/media/<id>` (chan_websocket.c `incoming_ws_http_callback`): the
    /// upgrade with subprotocol `media`, then `MEDIA_START` in `format`.
    async fn fake_media(format: MediaFormat) -> std::net::SocketAddr {
        use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            #[allow(clippy::result_large_err)]
            let cb = |_: &Request, mut resp: Response| {
                resp.headers_mut().insert(
                    "sec-websocket-protocol",
                    tokio_tungstenite::tungstenite::http::HeaderValue::from_static("media"),
                );
                Ok(resp)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(s, cb).await.unwrap();
            let ms = Event::MediaStart(start(format)).render(ControlFormat::Json, "1.9");
            ws.send(Message::text(ms)).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
        });
        addr
    }

    fn connector(base: String) -> (IncomingConnector, tokio::sync::mpsc::Receiver<IncomingCall>) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let c = IncomingConnector {
            base,
            handshake_timeout: std::time::Duration::from_secs(5),
            max_message_bytes: 65_536,
            calls: tx,
        };
        (c, rx)
    }

    #[tokio::test]
    async fn an_announced_incoming_channel_becomes_a_call_with_the_announced_details() {
        let addr = fake_media(MediaFormat::Slin(16_000)).await;
        let (c, mut calls) = connector(format!("http://{addr}"));
        let id = "a1b2c3d4-0000-4000-8000-000000000001";
        let call_id = Uuid::new_v4();
        let body = format!("call_id={call_id}&caller=%2B4930123&profile=sales");
        assert_eq!(c.connect(id, body.as_bytes()).await.unwrap(), call_id);
        let call = calls.recv().await.unwrap();
        assert_eq!((call.call_id, call.peer), (call_id, addr));
        let choice = call.choice.unwrap();
        assert_eq!(choice.caller_number.as_deref(), Some("+4930123"));
        assert_eq!(choice.profile.as_deref(), Some("sales"));
        assert_eq!(call.port.transport(), "websocket");
    }

    #[tokio::test]
    async fn bad_announcements_and_unreachable_asterisk_are_refused_with_their_status() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let (c, _calls) = connector(format!("http://{closed_addr}"));
        let e = c.connect("../ari", b"").await.unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
        let e = c.connect("a1b2", b"call_id=nope").await.unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
        let e = c.connect("a1b2", b"").await.unwrap_err();
        assert_eq!(e.status(), 502, "{e}");
        // A channel in a codec voicegate does not take: hung up, 415.
        let addr = fake_media(MediaFormat::Ulaw).await;
        let (c, mut calls) = connector(format!("http://{addr}"));
        let e = c.connect("a1b2", b"").await.unwrap_err();
        assert_eq!(e.status(), 415, "{e}");
        assert!(calls.try_recv().is_err());
    }

    #[tokio::test]
    async fn no_frame_goes_out_between_xoff_and_xon() {
        let f = ControlFormat::PlainText;
        let (mut port, mut ast) = pair(f).await;
        ast.send(Message::text("MEDIA_XOFF")).await.unwrap();
        ast.send(Message::text("DTMF_END digit:1 channel_id:1.3"))
            .await
            .unwrap();
        port.read().await.unwrap();
        port.write_frame(SlinRate::Hz16000, &[5; 320])
            .await
            .unwrap();
        ast.send(Message::text("MEDIA_XON")).await.unwrap();
        ast.send(Message::text("DTMF_END digit:2 channel_id:1.3"))
            .await
            .unwrap();
        port.read().await.unwrap();
        port.write_frame(SlinRate::Hz16000, &[6; 320])
            .await
            .unwrap();
        let Message::Binary(b) = ast.next().await.unwrap().unwrap() else {
            panic!("not media");
        };
        assert_eq!(&b[..2], &[6, 0], "the frame written under XOFF was sent");
        assert_eq!(port.playout().frames_held_back, 1);
    }
}
