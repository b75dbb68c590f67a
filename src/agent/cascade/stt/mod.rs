//! Streaming speech-to-text: one WebSocket per call to Soniox, Deepgram or ElevenLabs.
//!
//! The cascade sends caller audio (slin little-endian bytes at the call rate, 20 ms frames)
//! into [`SttHandle::audio`]; the STT task converts it to the vendor's wire format (G.711
//! μ-law on 8 kHz calls, PCM at the call rate otherwise), streams it, keeps the session
//! alive, and turns the vendor's results into [`SttEvent`]s: the caller's words so far
//! (interim) and the end of the caller's turn from the vendor's endpointing.
//!
//! Each vendor is a [`Protocol`] (URL, auth, message shapes, `providers.md` §4–§6); the
//! socket loop is shared. A vendor error that asks for a restart (Soniox' 503) reconnects,
//! at most [`MAX_RESTARTS`] times per call; any other error or close ends the session with
//! [`SttEvent::Failed`].

pub(crate) mod deepgram;
pub(crate) mod elevenlabs;
pub(crate) mod flux;
pub(crate) mod soniox;

use super::config::{SttConfig, SttProvider};
use crate::agent::AgentError;
use crate::audio::convert::{Encoder, WireFormat};
use crate::audio::g711::Law;
use crate::secret::Secret;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::{debug, trace, warn};

/// Caller audio frames the STT task's input holds (50 × 20 ms = 1 s).
pub(crate) const AUDIO_CAPACITY_FRAMES: usize = 50;

/// Reconnects allowed per call when the vendor asks for one.
pub(crate) const MAX_RESTARTS: u32 = 3;

/// How long the STT task waits for the vendor's last results after the call ends.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What the STT reports.
#[derive(Debug, Clone)]
pub enum SttEvent {
    /// The caller's current turn so far, unstable part included (replaces the previous one).
    Interim(String),
    /// The vendor's endpointing says the caller finished the turn; the turn's final text
    /// (may be empty when the vendor heard only noise).
    EndOfTurn(String),
    /// Deepgram Flux `EagerEndOfTurn`: the caller has probably finished with these words
    /// (only with `eager_eot_threshold` set). A `TurnResumed` or an `EndOfTurn` follows.
    EagerEndOfTurn(String),
    /// Deepgram Flux `TurnResumed`: the caller went on after an `EagerEndOfTurn`.
    TurnResumed,
    /// The session failed; the cascade ends the call's agent with this error.
    Failed(AgentError),
}

impl PartialEq for SttEvent {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (SttEvent::Interim(a), SttEvent::Interim(b)) => a == b,
            (SttEvent::EndOfTurn(a), SttEvent::EndOfTurn(b)) => a == b,
            (SttEvent::EagerEndOfTurn(a), SttEvent::EagerEndOfTurn(b)) => a == b,
            (SttEvent::TurnResumed, SttEvent::TurnResumed) => true,
            (SttEvent::Failed(a), SttEvent::Failed(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

/// One vendor's side of the wire.
pub trait Protocol: Send + 'static {
    /// Name for logs and errors.
    fn name(&self) -> &'static str;
    /// The format audio is sent in.
    fn format(&self) -> WireFormat;
    /// Full WebSocket URL, query included.
    fn url(&self) -> Result<String, String>;
    /// Handshake headers (auth). Values may be secret; they are never logged.
    fn headers(&self) -> Vec<(&'static str, String)>;
    /// A text message to send right after connecting (Soniox' config), if any.
    fn first_message(&self) -> Option<String>;
    /// Wraps one chunk of wire audio.
    fn audio_message(&mut self, wire: Bytes) -> Message;
    /// A keepalive message and how long without audio before it is due, if the vendor
    /// needs one.
    fn keepalive(&self) -> Option<(Duration, Message)>;
    /// What to send at the end of the call, before the close handshake.
    fn end_message(&self) -> Option<Message>;
    /// What to send when the local VAD has heard the caller stop, after
    /// `trailing_silence_ms` of silence already sent, so the vendor finalizes at once instead
    /// of waiting for its own endpointing (Soniox `{"type":"finalize"}`). Default: nothing.
    fn finalize_message(&self, trailing_silence_ms: u32) -> Option<Message> {
        let _ = trailing_silence_ms;
        None
    }
    /// Handles one text message from the server, appending events; `Err` is a vendor error.
    fn on_text(&mut self, text: &str, out: &mut Vec<SttEvent>) -> Result<(), String>;
    /// Whether the vendor error `detail` (as returned by [`Protocol::on_text`]) asks the
    /// client to reconnect and carry on (Soniox' 503, §5.3). Default: no.
    fn restartable(&self, detail: &str) -> bool {
        let _ = detail;
        false
    }
    /// Forgets per-session state before a reconnect.
    fn reset(&mut self) {}
    /// Describes a close frame from the server (vendors put error codes in the reason).
    fn describe_close(&self, frame: Option<&CloseFrame>) -> String {
        match frame {
            Some(f) => format!("closed the stream ({} {})", u16::from(f.code), f.reason),
            None => "closed the stream".into(),
        }
    }
}

/// The cascade's end of an STT session.
#[derive(Debug)]
pub struct SttHandle {
    /// Caller audio: slin LE bytes at the call rate; `try_send`.
    pub audio: mpsc::Sender<Bytes>,
    /// Results; `None` once the task is gone.
    pub events: mpsc::Receiver<SttEvent>,
    /// Finalize requests (trailing silence, ms); see [`SttHandle::finalize`].
    finalize: mpsc::Sender<u32>,
    task: tokio::task::JoinHandle<()>,
}

impl SttHandle {
    /// The caller stopped speaking `trailing_silence_ms` ago (the local VAD's hang time):
    /// vendors that can finalize on request are asked to (at most once per
    /// [`MIN_FINALIZE_GAP`]); the others keep their own endpointing. Never blocks.
    pub(crate) fn finalize(&self, trailing_silence_ms: u32) {
        let _ = self.finalize.try_send(trailing_silence_ms);
    }
}

/// Finalize requests closer together than this are dropped (Soniox: "do not send finalize
/// too frequently … every few seconds is fine").
pub(crate) const MIN_FINALIZE_GAP: Duration = Duration::from_secs(1);

impl Drop for SttHandle {
    fn drop(&mut self) {
        // Closing `audio` lets the task say goodbye to the vendor; abort only if it lingers.
        let task = self.task.abort_handle();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let linger = async move {
                    tokio::time::sleep(CLOSE_GRACE + Duration::from_secs(1)).await;
                    task.abort();
                };
                rt.spawn(tracing::Instrument::instrument(
                    linger,
                    tracing::Span::current(),
                ));
            }
            Err(_) => task.abort(),
        }
    }
}

/// The vendor format for a call at `rate_hz`.
pub(crate) fn wire_format(provider: SttProvider, rate_hz: u32, g711: bool) -> WireFormat {
    if g711 && rate_hz == 8_000 {
        return WireFormat::G711(Law::Ulaw);
    }
    match provider {
        SttProvider::Soniox | SttProvider::Deepgram => WireFormat::Pcm16 { rate_hz },
        SttProvider::Elevenlabs => {
            if [8_000, 16_000, 22_050, 24_000, 44_100, 48_000].contains(&rate_hz) {
                WireFormat::Pcm16 { rate_hz }
            } else {
                WireFormat::Pcm16 { rate_hz: 16_000 }
            }
        }
    }
}

/// Builds the vendor protocol `cfg` selects.
pub fn protocol(cfg: &SttConfig, key: Secret, rate_hz: u32) -> Box<dyn Protocol> {
    let format = wire_format(cfg.provider, rate_hz, cfg.g711);
    match cfg.provider {
        SttProvider::Deepgram if flux::is_flux(cfg.model()) => {
            Box::new(flux::Flux::new(cfg, key, rate_hz))
        }
        SttProvider::Soniox => Box::new(soniox::Soniox::new(cfg, key, format)),
        SttProvider::Deepgram => Box::new(deepgram::Deepgram::new(cfg, key, format)),
        SttProvider::Elevenlabs => Box::new(elevenlabs::ElevenLabsStt::new(cfg, key, format)),
    }
}

/// Starts the STT task for one call at `rate_hz`.
pub fn spawn(proto: Box<dyn Protocol>, rate_hz: u32, connect_timeout: Duration) -> SttHandle {
    let (audio_tx, audio_rx) = mpsc::channel(AUDIO_CAPACITY_FRAMES);
    let (ev_tx, ev_rx) = mpsc::channel(64);
    let (fin_tx, fin_rx) = mpsc::channel(1);
    let task = crate::agent::task::spawn(async move {
        let name = proto.name();
        if let Err(e) = run(
            proto,
            rate_hz,
            connect_timeout,
            audio_rx,
            fin_rx,
            ev_tx.clone(),
        )
        .await
        {
            debug!(provider = name, error = %e, "stt failed");
            let _ = ev_tx.send(SttEvent::Failed(e)).await;
        }
    });
    SttHandle {
        audio: audio_tx,
        events: ev_rx,
        finalize: fin_tx,
        task,
    }
}

async fn run(
    mut proto: Box<dyn Protocol>,
    rate_hz: u32,
    connect_timeout: Duration,
    mut audio: mpsc::Receiver<Bytes>,
    mut finalize: mpsc::Receiver<u32>,
    events: mpsc::Sender<SttEvent>,
) -> Result<(), AgentError> {
    let mut restarts = 0;
    loop {
        match run_once(
            proto.as_mut(),
            rate_hz,
            connect_timeout,
            &mut audio,
            &mut finalize,
            &events,
        )
        .await
        {
            Err(AgentError::Provider { provider, detail })
                if restarts < MAX_RESTARTS && proto.restartable(&detail) =>
            {
                restarts += 1;
                warn!(provider, error = %detail, restarts, "stt asked for a restart; reconnecting");
                proto.reset();
            }
            other => return other,
        }
    }
}

/// Connects `proto`'s socket within `connect_timeout`.
async fn connect(
    proto: &mut dyn Protocol,
    connect_timeout: Duration,
) -> Result<crate::agent::ws::Ws, AgentError> {
    let provider = proto.name();
    let url = proto
        .url()
        .map_err(|detail| AgentError::Connect { provider, detail })?;
    let headers = proto.headers();
    let format = proto.format();
    let header_refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let ws = crate::agent::ws::connect(&url, &header_refs, connect_timeout)
        .await
        .map_err(|e| AgentError::Connect {
            provider,
            detail: e.to_string(),
        })?;
    debug!(provider, ?format, "stt connected");
    Ok(ws)
}

/// One caller frame in the vendor's format (`encoder`, or as it is when it is already
/// that).
fn encode(encoder: Option<&mut Encoder>, wire: &mut Vec<u8>, bytes: Bytes) -> Bytes {
    match encoder {
        None => bytes,
        Some(enc) => {
            wire.clear();
            enc.encode_le_bytes(&bytes, wire);
            Bytes::copy_from_slice(wire)
        }
    }
}

async fn run_once(
    proto: &mut dyn Protocol,
    rate_hz: u32,
    connect_timeout: Duration,
    audio: &mut mpsc::Receiver<Bytes>,
    finalize: &mut mpsc::Receiver<u32>,
    events: &mpsc::Sender<SttEvent>,
) -> Result<(), AgentError> {
    let provider = proto.name();
    let mut last_finalize: Option<Instant> = None;
    let protocol_err = |detail: String| AgentError::Protocol { provider, detail };
    let (mut sink, mut stream) = connect(proto, connect_timeout).await?.split();
    let send_err = |e: tokio_tungstenite::tungstenite::Error| AgentError::Provider {
        provider,
        detail: format!("send: {e}"),
    };
    if let Some(first) = proto.first_message() {
        sink.send(Message::text(first)).await.map_err(send_err)?;
    }
    let mut encoder = wire_encoder(proto.format(), rate_hz).map_err(protocol_err)?;
    let keepalive = proto.keepalive();
    let mut last_sent = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut out = Vec::new();
    let mut wire = Vec::with_capacity(1024);
    loop {
        tokio::select! {
            frame = audio.recv() => match frame {
                Some(bytes) => {
                    let chunk = encode(encoder.as_mut(), &mut wire, bytes);
                    if chunk.is_empty() {
                        continue;
                    }
                    trace!(bytes = chunk.len(), "stt audio");
                    sink.send(proto.audio_message(chunk)).await.map_err(send_err)?;
                    last_sent = Instant::now();
                }
                None => {
                    // The call is over: ask for the last results, then close.
                    if let Some(end) = proto.end_message() {
                        let _ = sink.send(end).await;
                    }
                    let _ = tokio::time::timeout(CLOSE_GRACE, async {
                        let _ = sink.close().await;
                        while let Some(Ok(_)) = stream.next().await {}
                    }).await;
                    return Ok(());
                }
            },
            msg = stream.next() => {
                if on_server_message(proto, msg, &mut out, events).await? {
                    return Ok(());
                }
            }
            Some(ms) = finalize.recv() => {
                if last_finalize.is_some_and(|t| t.elapsed() < MIN_FINALIZE_GAP) {
                    continue;
                }
                if let Some(msg) = proto.finalize_message(ms) {
                    debug!(provider, trailing_silence_ms = ms, "stt finalize");
                    sink.send(msg).await.map_err(send_err)?;
                    last_finalize = Some(Instant::now());
                }
            }
            _ = tick.tick(), if keepalive.is_some() => {
                if let Some((after, msg)) = &keepalive {
                    if last_sent.elapsed() >= *after {
                        sink.send(msg.clone()).await.map_err(send_err)?;
                        last_sent = Instant::now();
                    }
                }
            }
        }
    }
}

/// The encoder from the call's slin to the provider's `format`: none when the provider takes
/// 16-bit PCM at the call's own rate.
fn wire_encoder(format: WireFormat, rate_hz: u32) -> Result<Option<Encoder>, String> {
    if format == (WireFormat::Pcm16 { rate_hz }) {
        return Ok(None);
    }
    Encoder::new(rate_hz, format)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// One message from the STT socket: its events go to the cascade. `Ok(true)`: the cascade
/// is gone, stop quietly.
async fn on_server_message(
    proto: &mut dyn Protocol,
    msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    out: &mut Vec<SttEvent>,
    events: &mpsc::Sender<SttEvent>,
) -> Result<bool, AgentError> {
    let provider = proto.name();
    let provider_err = |detail: String| AgentError::Provider { provider, detail };
    match msg {
        Some(Ok(Message::Text(text))) => {
            proto.on_text(text.as_str(), out).map_err(provider_err)?;
            for ev in out.drain(..) {
                if events.send(ev).await.is_err() {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Some(Ok(Message::Close(frame))) => Err(provider_err(proto.describe_close(frame.as_ref()))),
        Some(Ok(_)) => Ok(false),
        Some(Err(e)) => Err(provider_err(format!("receive: {e}"))),
        None => Err(provider_err("connection closed".into())),
    }
}

/// Appends `piece` to `acc` as a new segment, with one space between segments.
fn push_segment(acc: &mut String, piece: &str) {
    let piece = piece.trim();
    if piece.is_empty() {
        return;
    }
    if !acc.is_empty() {
        acc.push(' ');
    }
    acc.push_str(piece);
}
