//! The cascade's TTS: ElevenLabs text-to-speech (`providers.md` §3).
//!
//! The cascade sends each reply's text sentence by sentence as the LLM produces it
//! ([`TtsCommand::Text`]), then [`TtsCommand::Finish`]. Audio comes back in the format that
//! matches the call (`ulaw_8000` for 8 kHz calls, `pcm_16000` for 16 kHz calls), so it is
//! decoded to slin once and never resampled; other call rates get `pcm_16000` resampled.
//!
//! - WebSocket `multi-stream-input` (default; elevenlabs.io `docs/api-reference/text-to-speech/
//!   v-1-text-to-speech-voice-id-multi-stream-input` and the "multi-context WebSocket" guide):
//!   ONE socket per call ([`TtsCall`]), opened when the call starts — while the caller is
//!   still speaking — so the first reply does not wait for TCP + TLS + the upgrade. Each
//!   reply is one context (`context_id` `vg_r<N>`): `{"text":" ","context_id"}` opens it,
//!   every sentence goes with `flush: true`, and the end of the reply is
//!   `{"context_id","flush":true}` then `{"context_id","close_context":true}`, after which
//!   the server sends `{"isFinal":true,"contextId"}`. A barge-in closes the reply's context
//!   at once (`close_context`) and its late audio is dropped. At most
//!   [`MAX_CONTEXTS`] contexts are open at a time (ElevenLabs' limit per connection). With
//!   `sync_alignment=true` every audio chunk carries character timings, which map how much of
//!   an interrupted reply the caller heard to text. A socket that fails is replaced on the
//!   next reply. `eleven_v3` has no multi-context socket: it needs `mode = "http"`.
//! - HTTP streaming (fallback): one `POST …/stream/with-timestamps` per sentence with
//!   `previous_text`/`next_text` for continuity; the answer is newline-delimited JSON with
//!   base64 audio and the characters' real start times.
//!
//! `language_code` is sent only to models that accept it ([`accepts_language_code`]);
//! others answer HTTP 400.
//!
//! Dropping a [`TtsStream`] cancels that reply; dropping the [`TtsCall`] closes the socket
//! (`{"close_socket":true}`).

use super::config::{TtsConfig, TtsMode};
use crate::agent::AgentError;
use crate::audio::convert::{Decoder, WireFormat};
use crate::audio::g711::Law;
use crate::secret::Secret;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace, warn};

const PROVIDER: &str = "elevenlabs_tts";

/// Text the cascade sends.
#[derive(Debug, Clone)]
pub enum TtsCommand {
    /// One sentence (or the tail of the reply).
    Text(String),
    /// No more text for this reply.
    Finish,
}

/// What the TTS yields.
#[derive(Debug, Clone)]
pub enum TtsEvent {
    /// Speech: slin at the call rate.
    Audio(Vec<i16>),
    /// Characters of the text and when each starts, ms from the start of the reply's audio.
    Chars(Vec<(u64, char)>),
    /// All audio of the reply has been sent.
    Done,
    /// The stream failed.
    Failed(AgentError),
}

/// The output format for a call at `rate_hz`: (ElevenLabs name, wire format).
pub(crate) fn output_format(rate_hz: u32) -> (String, WireFormat) {
    match rate_hz {
        8_000 => ("ulaw_8000".into(), WireFormat::G711(Law::Ulaw)),
        16_000 | 22_050 | 24_000 | 44_100 => {
            (format!("pcm_{rate_hz}"), WireFormat::Pcm16 { rate_hz })
        }
        _ => ("pcm_16000".into(), WireFormat::Pcm16 { rate_hz: 16_000 }),
    }
}

/// TTS settings resolved from `[agent.tts]`.
#[derive(Debug, Clone)]
pub struct TtsSettings {
    /// The config.
    pub cfg: TtsConfig,
    /// The resolved `xi-api-key`.
    pub key: Secret,
}

/// Pieces of text queued for the TTS before more text is dropped (issue 14: no unbounded
/// queue); beyond them [`CONTROL_RESERVE`] slots stay free for `Finish`, context opens and
/// cancels, which are never dropped.
pub(crate) const TEXT_QUEUE: usize = 4096;

/// Slots of a TTS queue kept for control messages (see [`TEXT_QUEUE`]).
pub(crate) const CONTROL_RESERVE: usize = 16;

/// Queues `msg` without waiting; text (`droppable`) beyond [`TEXT_QUEUE`] is dropped with a
/// warning (an LLM far ahead of the TTS), control messages use the reserve.
fn queue<T>(tx: &mpsc::Sender<T>, msg: T, droppable: bool) -> Result<(), TtsGone> {
    if droppable && tx.capacity() <= CONTROL_RESERVE {
        tracing::warn!(queue = TEXT_QUEUE, "TTS text queue full; text dropped");
        return Ok(());
    }
    match tx.try_send(msg) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(TtsGone),
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!("TTS queue full; control message dropped");
            Ok(())
        }
    }
}

/// Why text could not be sent: the reply's stream is gone (cancelled or failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtsGone;

/// Where a reply's text goes: its context on the call's socket, or its own HTTP task.
#[derive(Debug)]
enum TextSink {
    Ws { ctx: u64, tx: mpsc::Sender<ConnMsg> },
    Http(mpsc::Sender<TtsCommand>),
}

/// The text side of one reply's stream.
#[derive(Debug)]
pub struct TtsText(TextSink);

impl TtsText {
    /// Sends one command; never blocks (the LLM is slower than the socket drains). Text
    /// beyond [`TEXT_QUEUE`] queued pieces is dropped with a warning; `Finish` always fits.
    ///
    /// # Errors
    /// [`TtsGone`] when the stream's task is gone.
    pub fn send(&self, cmd: TtsCommand) -> Result<(), TtsGone> {
        let droppable = matches!(cmd, TtsCommand::Text(_));
        match &self.0 {
            TextSink::Ws { ctx, tx } => queue(tx, ConnMsg::Text { ctx: *ctx, cmd }, droppable),
            TextSink::Http(tx) => queue(tx, cmd, droppable),
        }
    }
}

/// One reply's TTS stream; dropping it cancels the reply (its context is closed, or its
/// HTTP request dropped).
#[derive(Debug)]
pub struct TtsStream {
    /// Text in.
    pub text: TtsText,
    /// Events out.
    pub events: mpsc::Receiver<TtsEvent>,
    cancel: CancellationToken,
}

impl Drop for TtsStream {
    fn drop(&mut self) {
        if let TextSink::Ws { ctx, tx } = &self.text.0 {
            let _ = queue(tx, ConnMsg::Cancel { ctx: *ctx }, false);
        }
        self.cancel.cancel();
    }
}

/// ElevenLabs' limit of open contexts per multi-context socket.
pub(crate) const MAX_CONTEXTS: usize = 5;

/// With no message sent for this long, a `{"text":""}` keeps the socket open (ElevenLabs
/// closes it after `inactivity_timeout`, which voicegate sets to its maximum, 180 s).
const KEEPALIVE: Duration = Duration::from_secs(60);

/// Whether `model_id` takes a `language_code` (elevenlabs.io: "The ISO 639-1 language code
/// (for specific models)"; the multilingual v2.5 models and v3 do, pipecat's
/// `ELEVENLABS_MULTILINGUAL_MODELS` lists the v2.5 ones; others answer HTTP 400).
pub(crate) fn accepts_language_code(model_id: &str) -> bool {
    matches!(
        model_id,
        "eleven_flash_v2_5" | "eleven_turbo_v2_5" | "eleven_v3"
    )
}

impl TtsSettings {
    /// The TTS of one call at `rate_hz`. In `ws` mode nothing is opened until
    /// [`TtsCall::connect`] or the first [`TtsCall::start`].
    pub fn call(&self, rate_hz: u32) -> TtsCall {
        TtsCall {
            settings: self.clone(),
            rate_hz,
            conn: None,
            next_ctx: 1,
        }
    }

    /// The `language_code` to send: the configured one if the model takes it.
    fn language_code(&self) -> Option<&str> {
        self.cfg
            .language_code
            .as_deref()
            .filter(|_| accepts_language_code(&self.cfg.model_id))
    }

    fn base_url(&self, ws: bool) -> String {
        let u = self.cfg.url.trim_end_matches('/');
        let rest = u
            .strip_prefix("wss://")
            .map(|r| (true, r))
            .or_else(|| u.strip_prefix("https://").map(|r| (true, r)))
            .or_else(|| u.strip_prefix("ws://").map(|r| (false, r)))
            .or_else(|| u.strip_prefix("http://").map(|r| (false, r)));
        match (rest, ws) {
            (Some((true, r)), true) => format!("wss://{r}"),
            (Some((true, r)), false) => format!("https://{r}"),
            (Some((false, r)), true) => format!("ws://{r}"),
            (Some((false, r)), false) => format!("http://{r}"),
            (None, _) => u.to_owned(),
        }
    }
}

/// One call's TTS (see the module docs); dropping it closes the call's socket.
#[derive(Debug)]
pub struct TtsCall {
    settings: TtsSettings,
    rate_hz: u32,
    /// The socket task of `ws` mode; replaced when it has ended.
    conn: Option<mpsc::Sender<ConnMsg>>,
    next_ctx: u64,
}

impl TtsCall {
    /// Opens the call's socket now (`ws` mode), so that the first reply finds it ready; a
    /// no-op in `http` mode or when it is open.
    pub fn connect(&mut self) {
        if self.settings.cfg.mode == TtsMode::Ws {
            self.conn();
        }
    }

    /// The socket task's sender, starting a task if there is none alive.
    fn conn(&mut self) -> mpsc::Sender<ConnMsg> {
        match &self.conn {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(TEXT_QUEUE + CONTROL_RESERVE);
                let settings = self.settings.clone();
                let rate_hz = self.rate_hz;
                crate::agent::task::spawn(run_connection(settings, rate_hz, rx));
                self.conn = Some(tx.clone());
                tx
            }
        }
    }

    /// Starts the stream of one reply.
    pub fn start(&mut self) -> TtsStream {
        let (ev_tx, ev_rx) = mpsc::channel(256);
        let cancel = CancellationToken::new();
        let text = match self.settings.cfg.mode {
            TtsMode::Ws => {
                let ctx = self.next_ctx;
                self.next_ctx += 1;
                let open = ConnMsg::Open { ctx, events: ev_tx };
                let mut tx = self.conn();
                // The task may have ended just now: one fresh one takes it.
                if let Err(mpsc::error::TrySendError::Closed(back)) = tx.try_send(open) {
                    self.conn = None;
                    tx = self.conn();
                    let _ = queue(&tx, back, false);
                }
                TextSink::Ws { ctx, tx }
            }
            TtsMode::Http => {
                let (text_tx, text_rx) = mpsc::channel(TEXT_QUEUE + CONTROL_RESERVE);
                let this = self.settings.clone();
                let rate_hz = self.rate_hz;
                let token = cancel.clone();
                crate::agent::task::spawn(async move {
                    if let Err(e) = run_http(&this, rate_hz, text_rx, &ev_tx, token).await {
                        let _ = ev_tx.send(TtsEvent::Failed(e)).await;
                    }
                });
                TextSink::Http(text_tx)
            }
        };
        TtsStream {
            text: TtsText(text),
            events: ev_rx,
            cancel,
        }
    }
}

fn decoder(format: WireFormat, rate_hz: u32) -> Result<Decoder, AgentError> {
    Decoder::new(format, rate_hz).map_err(|e| AgentError::Protocol {
        provider: PROVIDER,
        detail: e.to_string(),
    })
}

/// A server message of the multi-context socket (its `contextId` names the reply).
#[derive(Deserialize)]
struct WsOut {
    audio: Option<String>,
    #[serde(rename = "contextId", alias = "context_id")]
    context_id: Option<String>,
    #[serde(rename = "isFinal")]
    is_final: Option<bool>,
    alignment: Option<Alignment>,
    message: Option<String>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Alignment {
    #[serde(default)]
    chars: Vec<String>,
    #[serde(default)]
    char_start_times_ms: Vec<f64>,
}

/// Fuzzing hook (`fuzz/fuzz_targets/elevenlabs_tts.rs`; built only with `--cfg fuzzing` and
/// in tests): feeds each of `messages` to the socket task's own handler of server text
/// ([`server_text`]), with two live replies (`vg_r1` μ-law 8 kHz, `vg_r2` already closing)
/// whose receivers are drained, on a current-thread runtime. Returns how many messages the
/// handler refused (the socket task fails the call on those).
#[cfg(any(fuzzing, test))]
pub fn fuzz_server_messages(messages: &[&str]) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    rt.block_on(async {
        let format = WireFormat::G711(Law::Ulaw);
        let mut contexts = HashMap::new();
        let mut receivers = Vec::new();
        for (id, closing) in [(1u64, false), (2, true)] {
            let (events, rx) = mpsc::channel(4096);
            let dec = Decoder::new(format, 8_000).expect("a μ-law decoder");
            let ctx = Ctx {
                events,
                dec,
                wire_bytes: 0,
                closing,
            };
            contexts.insert(id, ctx);
            receivers.push(rx);
        }
        let mut raw = Vec::new();
        let mut refused = 0;
        for m in messages {
            refused += server_text(format, m, &mut contexts, &mut raw)
                .await
                .is_err() as usize;
            for rx in &mut receivers {
                while rx.try_recv().is_ok() {}
            }
        }
        refused
    })
}

/// What the call side tells its socket task.
#[derive(Debug)]
enum ConnMsg {
    /// A new reply: open context `ctx`, its events go to `events`.
    Open {
        ctx: u64,
        events: mpsc::Sender<TtsEvent>,
    },
    /// Text for context `ctx`.
    Text { ctx: u64, cmd: TtsCommand },
    /// Context `ctx` is no longer wanted (barge-in, or the reply is gone).
    Cancel { ctx: u64 },
}

/// One open context (reply) on the socket.
struct Ctx {
    events: mpsc::Sender<TtsEvent>,
    dec: Decoder,
    wire_bytes: u64,
    /// `close_context` was sent (the reply's text is complete); only `isFinal` is to come.
    closing: bool,
}

fn context_id(ctx: u64) -> String {
    format!("vg_r{ctx}")
}

/// The `multi-stream-input` URL for this call.
fn ws_url(s: &TtsSettings, format_name: &str) -> Result<reqwest::Url, AgentError> {
    let mut url = reqwest::Url::parse(&format!(
        "{}/v1/text-to-speech/{}/multi-stream-input",
        s.base_url(true),
        s.cfg.voice_id
    ))
    .map_err(|e| AgentError::Connect {
        provider: PROVIDER,
        detail: format!("url: {e}"),
    })?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("model_id", &s.cfg.model_id)
            .append_pair("output_format", format_name)
            .append_pair("sync_alignment", "true")
            .append_pair("inactivity_timeout", "180");
        if let Some(lang) = s.language_code() {
            q.append_pair("language_code", lang);
        }
    }
    Ok(url)
}

/// The call's socket: connects, then multiplexes the replies' contexts until the call
/// drops its [`TtsCall`] or the socket fails (every open reply then gets
/// [`TtsEvent::Failed`]; the next reply opens a new socket).
async fn run_connection(s: TtsSettings, rate_hz: u32, mut rx: mpsc::Receiver<ConnMsg>) {
    let (format_name, format) = output_format(rate_hz);
    let mut contexts: HashMap<u64, Ctx> = HashMap::new();
    let result = async {
        let url = ws_url(&s, &format_name)?;
        let timeout = Duration::from_millis(s.cfg.connect_timeout_ms);
        let headers = [("xi-api-key", s.key.expose())];
        let t0 = tokio::time::Instant::now();
        let ws = crate::agent::ws::connect(url.as_str(), &headers, timeout)
            .await
            .map_err(|e| AgentError::Connect {
                provider: PROVIDER,
                detail: e.to_string(),
            })?;
        debug!(
            connect_ms = t0.elapsed().as_millis() as u64,
            "tts socket open"
        );
        connection_loop(&s, format, rate_hz, ws, &mut rx, &mut contexts).await
    }
    .await;
    let Err(e) = result else { return };
    warn!(error = %e, "tts socket failed");
    // Replies already opened, and those asked for meanwhile, learn of it.
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        if let ConnMsg::Open { ctx, events } = msg {
            contexts.insert(
                ctx,
                Ctx {
                    events,
                    dec: match decoder(format, rate_hz) {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                    wire_bytes: 0,
                    closing: false,
                },
            );
        }
    }
    for (_, c) in contexts.drain() {
        let _ = c.events.send(TtsEvent::Failed(e.clone())).await;
    }
}

async fn connection_loop(
    s: &TtsSettings,
    format: WireFormat,
    rate_hz: u32,
    ws: crate::agent::ws::Ws,
    rx: &mut mpsc::Receiver<ConnMsg>,
    contexts: &mut HashMap<u64, Ctx>,
) -> Result<(), AgentError> {
    let (mut sink, mut stream) = ws.split();
    let mut raw = Vec::with_capacity(8192);
    let mut last_sent = tokio::time::Instant::now();
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.tick().await;
    loop {
        tokio::select! {
            biased;
            msg = rx.recv() => {
                let Some(msg) = msg else {
                    // The call is over.
                    let _ = sink.send(Message::text(r#"{"close_socket":true}"#)).await;
                    let _ = tokio::time::timeout(Duration::from_millis(500), sink.close()).await;
                    return Ok(());
                };
                let out = command(s, format, rate_hz, msg, contexts).await?;
                if out.is_empty() {
                    continue;
                }
                for m in out {
                    if let Err(e) = sink.send(Message::text(m.to_string())).await {
                        return Err(send_failed(&mut stream, e).await);
                    }
                }
                last_sent = tokio::time::Instant::now();
            }
            _ = keepalive.tick() => {
                if last_sent.elapsed() >= KEEPALIVE {
                    if let Err(e) = sink.send(Message::text(r#"{"text":""}"#)).await {
                        return Err(send_failed(&mut stream, e).await);
                    }
                    last_sent = tokio::time::Instant::now();
                }
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Some(m) = server_text(format, t.as_str(), contexts, &mut raw).await? {
                        if let Err(e) = sink.send(Message::text(m.to_string())).await {
                            return Err(send_failed(&mut stream, e).await);
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let detail = match frame {
                        Some(f) => format!("closed the stream ({} {})", u16::from(f.code), f.reason),
                        None => "closed the stream".into(),
                    };
                    return Err(AgentError::Provider { provider: PROVIDER, detail });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(AgentError::Provider { provider: PROVIDER, detail: format!("receive: {e}") }),
                None => return Err(AgentError::Provider { provider: PROVIDER, detail: "connection closed".into() }),
            }
        }
    }
}

/// A send to the socket failed, usually because ElevenLabs closed it: it says why just before
/// (an error message such as `{"message":"Invalid API key","error":"invalid_api_key",
/// "code":1008}`, then a 1008 close), so that reason is read from what already arrived (for up
/// to 200 ms) rather than lost behind "broken pipe".
async fn send_failed<S>(stream: &mut S, e: tokio_tungstenite::tungstenite::Error) -> AgentError
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut detail = format!("send: {e}");
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Some(Ok(m)) = stream.next().await {
            match m {
                Message::Text(t) => {
                    if let Ok(out) = serde_json::from_str::<WsOut>(t.as_str()) {
                        if let Some(m) = out.message.or(out.error.map(|e| e.to_string())) {
                            detail = m;
                            return;
                        }
                    }
                }
                Message::Close(Some(f)) => {
                    detail = format!("closed the stream ({} {})", u16::from(f.code), f.reason);
                    return;
                }
                _ => {}
            }
        }
    })
    .await;
    AgentError::Provider {
        provider: PROVIDER,
        detail,
    }
}

/// What one message of the call's side asks the socket to carry.
async fn command(
    s: &TtsSettings,
    format: WireFormat,
    rate_hz: u32,
    msg: ConnMsg,
    contexts: &mut HashMap<u64, Ctx>,
) -> Result<Vec<serde_json::Value>, AgentError> {
    Ok(match msg {
        ConnMsg::Open { ctx, events } => {
            if contexts.len() >= MAX_CONTEXTS {
                let detail = format!("more than {MAX_CONTEXTS} replies at once");
                let _ = events
                    .send(TtsEvent::Failed(AgentError::Protocol {
                        provider: PROVIDER,
                        detail,
                    }))
                    .await;
                return Ok(Vec::new());
            }
            let dec = decoder(format, rate_hz)?;
            contexts.insert(
                ctx,
                Ctx {
                    events,
                    dec,
                    wire_bytes: 0,
                    closing: false,
                },
            );
            let mut init = serde_json::json!({"text": " ", "context_id": context_id(ctx)});
            if (s.cfg.speed - 1.0).abs() > f32::EPSILON {
                init["voice_settings"] = serde_json::json!({"speed": s.cfg.speed});
            }
            vec![init]
        }
        ConnMsg::Text { ctx, cmd } => {
            let Some(c) = contexts.get_mut(&ctx).filter(|c| !c.closing) else {
                return Ok(Vec::new());
            };
            let id = context_id(ctx);
            match cmd {
                TtsCommand::Text(t) => {
                    let mut t = t.trim().to_owned();
                    if t.is_empty() {
                        return Ok(Vec::new());
                    }
                    t.push(' ');
                    vec![serde_json::json!({"text": t, "context_id": id, "flush": true})]
                }
                // Generate what is left, then end the context: isFinal follows.
                TtsCommand::Finish => {
                    c.closing = true;
                    vec![
                        serde_json::json!({"context_id": id, "flush": true}),
                        serde_json::json!({"context_id": id, "close_context": true}),
                    ]
                }
            }
        }
        ConnMsg::Cancel { ctx } => {
            // A closing context is already ending; its late audio is dropped.
            if contexts.remove(&ctx).is_none_or(|c| c.closing) {
                return Ok(Vec::new());
            }
            debug!(context = ctx, "tts context cancelled");
            vec![serde_json::json!({"context_id": context_id(ctx), "close_context": true})]
        }
    })
}

/// One text message of the server: audio, alignment and the end of a reply go to its
/// context; returns a message to send back (the `close_context` of a reply whose receiver is
/// gone). An error about one context fails that reply; any other, the socket.
async fn server_text(
    format: WireFormat,
    text: &str,
    contexts: &mut HashMap<u64, Ctx>,
    raw: &mut Vec<u8>,
) -> Result<Option<serde_json::Value>, AgentError> {
    let out: WsOut = serde_json::from_str(text).map_err(|e| AgentError::Protocol {
        provider: PROVIDER,
        detail: format!("bad message: {e}"),
    })?;
    let ctx = out
        .context_id
        .as_deref()
        .and_then(|c| c.strip_prefix("vg_r"))
        .and_then(|n| n.parse::<u64>().ok());
    if out.audio.is_none() && (out.message.is_some() || out.error.is_some()) {
        let detail = out
            .message
            .or_else(|| out.error.map(|e| e.to_string()))
            .unwrap_or_default();
        let err = AgentError::Provider {
            provider: PROVIDER,
            detail,
        };
        return match ctx.and_then(|c| contexts.remove(&c)) {
            Some(c) => {
                let _ = c.events.send(TtsEvent::Failed(err)).await;
                Ok(None)
            }
            None => Err(err),
        };
    }
    let Some(id) = ctx else {
        trace!("tts message without a context of ours; ignored");
        return Ok(None);
    };
    let Some(c) = contexts.get_mut(&id) else {
        trace!(context = id, "audio of a cancelled reply dropped");
        return Ok(None);
    };
    let mut gone = false;
    if let Some(b64) = out.audio.filter(|a| !a.is_empty()) {
        gone = context_audio(format, c, &b64, out.alignment, raw).await?;
    }
    if out.is_final == Some(true) {
        if let Some(c) = contexts.remove(&id) {
            let _ = c.events.send(TtsEvent::Done).await;
        }
    } else if gone {
        // The reply's receiver is gone without a cancel: stop its generation.
        if contexts.remove(&id).is_some_and(|c| c.closing) {
            return Ok(None);
        }
        return Ok(Some(
            serde_json::json!({"context_id": context_id(id), "close_context": true}),
        ));
    }
    Ok(None)
}

/// `b64` (a message's base64 audio, either endpoint) decoded into `raw`, replacing what it
/// held.
fn decode_audio(b64: &str, raw: &mut Vec<u8>) -> Result<(), AgentError> {
    raw.clear();
    base64::engine::general_purpose::STANDARD
        .decode_vec(b64.as_bytes(), raw)
        .map_err(|e| AgentError::Protocol {
            provider: PROVIDER,
            detail: format!("audio base64: {e}"),
        })
}

/// One chunk of a reply's audio (base64 `b64`, with its `alignment`) to its context;
/// `true` if the reply's receiver is gone.
async fn context_audio(
    format: WireFormat,
    c: &mut Ctx,
    b64: &str,
    alignment: Option<Alignment>,
    raw: &mut Vec<u8>,
) -> Result<bool, AgentError> {
    decode_audio(b64, raw)?;
    let offset_ms = c.wire_bytes / format.bytes_per_ms() as u64;
    c.wire_bytes += raw.len() as u64;
    let mut gone = false;
    if let Some(a) = alignment {
        let chars = a
            .chars
            .iter()
            .zip(&a.char_start_times_ms)
            .filter_map(|(ch, t)| {
                ch.chars()
                    .next()
                    .map(|ch| (offset_ms + t.max(0.0) as u64, ch))
            })
            .collect::<Vec<_>>();
        gone |= !chars.is_empty() && c.events.send(TtsEvent::Chars(chars)).await.is_err();
    }
    let mut samples = Vec::with_capacity(raw.len() * 2);
    c.dec.decode(raw, &mut samples);
    gone |= !samples.is_empty() && c.events.send(TtsEvent::Audio(samples)).await.is_err();
    Ok(gone)
}

/// One chunk of `POST …/stream/with-timestamps` (ElevenLabs' OpenAPI
/// `StreamingAudioChunkWithTimestampsResponseModel`: `audio_base64`, `alignment` with
/// `characters` and `character_start_times_seconds`), one JSON object per line.
#[derive(Deserialize)]
struct HttpChunk {
    audio_base64: Option<String>,
    alignment: Option<HttpAlignment>,
}

#[derive(Deserialize)]
struct HttpAlignment {
    #[serde(default)]
    characters: Vec<String>,
    #[serde(default)]
    character_start_times_seconds: Vec<f64>,
}

/// Characters of `previous_text` sent with each sentence (the tail of the reply so far).
const PREVIOUS_TEXT_CHARS: usize = 300;

async fn run_http(
    s: &TtsSettings,
    rate_hz: u32,
    mut text: mpsc::Receiver<TtsCommand>,
    events: &mpsc::Sender<TtsEvent>,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    let (format_name, format) = output_format(rate_hz);
    let http = crate::tls::http_client_builder()
        .connect_timeout(Duration::from_millis(s.cfg.connect_timeout_ms))
        .build()
        .map_err(|e| AgentError::Connect {
            provider: PROVIDER,
            detail: e.to_string(),
        })?;
    let url = format!(
        "{}/v1/text-to-speech/{}/stream/with-timestamps?output_format={format_name}",
        s.base_url(false),
        s.cfg.voice_id
    );
    let mut dec = decoder(format, rate_hz)?;
    let bytes_per_ms = format.bytes_per_ms() as u64;
    let mut wire_bytes: u64 = 0;
    // Sentences received and not yet spoken (the next one is `next_text`), and the reply so
    // far (its tail is `previous_text`).
    let mut queue: VecDeque<String> = VecDeque::new();
    let mut finished = false;
    let mut spoken = String::new();
    loop {
        if !gather(&mut text, &cancel, &mut queue, &mut finished).await {
            return Ok(());
        }
        let Some(sentence) = queue.pop_front() else {
            if finished {
                let _ = events.send(TtsEvent::Done).await;
                return Ok(());
            }
            continue;
        };
        let body = http_body(s, &sentence, &spoken, queue.front());
        let request = http
            .post(&url)
            .header("xi-api-key", s.key.expose())
            .json(&body)
            .send();
        let timeout = Duration::from_millis(s.cfg.connect_timeout_ms);
        let response = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = tokio::time::timeout(timeout, request) => match r {
                Err(_) => return Err(AgentError::Timeout { provider: PROVIDER, detail: format!("no response within {timeout:?}") }),
                Ok(Err(e)) => return Err(AgentError::Connect { provider: PROVIDER, detail: e.without_url().to_string() }),
                Ok(Ok(r)) => r,
            },
        };
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            let body: String = body.chars().take(500).collect();
            return Err(AgentError::Provider {
                provider: PROVIDER,
                detail: format!("HTTP {status}: {body}"),
            });
        }
        spoken.push_str(&sentence);
        spoken.push(' ');
        // Character times count from the start of this request's audio.
        let request_base_ms = wire_bytes / bytes_per_ms;
        let mut reply = HttpReply {
            events,
            dec: &mut dec,
            wire_bytes: &mut wire_bytes,
            base_ms: request_base_ms,
        };
        if !reply.stream(response, &cancel).await? {
            return Ok(());
        }
    }
}

/// Waits for a sentence when none is queued and the reply's text is not finished, then takes
/// whatever else has arrived already (it gives `next_text`); `false` when the reply was
/// cancelled or its text is gone.
async fn gather(
    text: &mut mpsc::Receiver<TtsCommand>,
    cancel: &CancellationToken,
    queue: &mut VecDeque<String>,
    finished: &mut bool,
) -> bool {
    while queue.is_empty() && !*finished {
        let cmd = tokio::select! {
            biased;
            () = cancel.cancelled() => return false,
            cmd = text.recv() => cmd,
        };
        match cmd {
            Some(cmd) => take(cmd, queue, finished),
            None => return false,
        }
    }
    while let Ok(cmd) = text.try_recv() {
        take(cmd, queue, finished);
    }
    true
}

/// Queues the text of `cmd`, or notes that the reply's text is finished.
fn take(cmd: TtsCommand, queue: &mut VecDeque<String>, finished: &mut bool) {
    match cmd {
        TtsCommand::Text(t) if !t.trim().is_empty() => queue.push_back(t.trim().to_owned()),
        TtsCommand::Text(_) => {}
        TtsCommand::Finish => *finished = true,
    }
}

/// The body of one `POST …/stream/with-timestamps` for `sentence`, with the tail of what
/// was `spoken` before it as `previous_text` and the `next` sentence as `next_text`.
fn http_body(
    s: &TtsSettings,
    sentence: &str,
    spoken: &str,
    next: Option<&String>,
) -> serde_json::Value {
    let mut body = serde_json::json!({"text": sentence, "model_id": s.cfg.model_id});
    if !spoken.is_empty() {
        let tail: String = {
            let n = spoken.chars().count();
            spoken
                .chars()
                .skip(n.saturating_sub(PREVIOUS_TEXT_CHARS))
                .collect()
        };
        body["previous_text"] = tail.trim().into();
    }
    if let Some(next) = next {
        body["next_text"] = next.clone().into();
    }
    if let Some(lang) = s.language_code() {
        body["language_code"] = lang.into();
    }
    if (s.cfg.speed - 1.0).abs() > f32::EPSILON {
        body["voice_settings"] = serde_json::json!({"speed": s.cfg.speed});
    }
    body
}

/// One HTTP request's audio on its way to the reply.
struct HttpReply<'a> {
    events: &'a mpsc::Sender<TtsEvent>,
    dec: &'a mut Decoder,
    /// Wire audio of the whole reply so far, bytes.
    wire_bytes: &'a mut u64,
    /// Where this request's audio starts in the reply, ms.
    base_ms: u64,
}

impl HttpReply<'_> {
    /// Streams the response's chunks (one JSON object per line) to the reply; `false` if
    /// the reply was cancelled or its receiver is gone.
    async fn stream(
        &mut self,
        response: reqwest::Response,
        cancel: &CancellationToken,
    ) -> Result<bool, AgentError> {
        let mut stream = response.bytes_stream();
        let mut line = Vec::with_capacity(16 * 1024);
        let mut raw = Vec::with_capacity(8192);
        loop {
            let chunk = tokio::select! {
                () = cancel.cancelled() => return Ok(false),
                c = stream.next() => c,
            };
            let bytes = match chunk {
                None => return Ok(true),
                Some(Err(e)) => {
                    return Err(AgentError::Provider {
                        provider: PROVIDER,
                        detail: format!("stream: {}", e.without_url()),
                    });
                }
                Some(Ok(bytes)) => bytes,
            };
            line.extend_from_slice(&bytes);
            // Each complete line is one JSON chunk.
            while let Some(end) = line.iter().position(|&b| b == b'\n') {
                let one: Vec<u8> = line.drain(..=end).collect();
                let one = one.trim_ascii();
                if !one.is_empty() && !self.chunk(one, &mut raw).await? {
                    return Ok(false);
                }
            }
        }
    }

    /// One JSON chunk; `false` if the reply's receiver is gone.
    async fn chunk(&mut self, one: &[u8], raw: &mut Vec<u8>) -> Result<bool, AgentError> {
        let c: HttpChunk = serde_json::from_slice(one).map_err(|e| AgentError::Protocol {
            provider: PROVIDER,
            detail: format!("bad chunk: {e}"),
        })?;
        raw.clear();
        if let Some(b64) = c.audio_base64.filter(|a| !a.is_empty()) {
            decode_audio(&b64, raw)?;
        }
        *self.wire_bytes += raw.len() as u64;
        if let Some(a) = c.alignment {
            let chars: Vec<(u64, char)> = a
                .characters
                .iter()
                .zip(&a.character_start_times_seconds)
                .filter_map(|(ch, t)| {
                    ch.chars()
                        .next()
                        .map(|ch| (self.base_ms + (t.max(0.0) * 1000.0) as u64, ch))
                })
                .collect();
            if !chars.is_empty() && self.events.send(TtsEvent::Chars(chars)).await.is_err() {
                return Ok(false);
            }
        }
        let mut samples = Vec::with_capacity(raw.len() * 2);
        self.dec.decode(raw, &mut samples);
        Ok(samples.is_empty() || self.events.send(TtsEvent::Audio(samples)).await.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz hook drives the live handler: an error outside a reply is refused, one
    /// inside a reply fails only that reply, audio and `isFinal` of ours are taken, and
    /// garbage is refused; the committed corpus runs through it.
    #[test]
    fn fuzz_hook_runs_the_live_handler() {
        let audio = r#"{"audio":"//8A","context_id":"vg_r1","alignment":{"chars":["H"],"charStartTimesMs":[0]}}"#;
        let in_reply =
            r#"{"message":"Unusual activity","error":"quota_exceeded","context_id":"vg_r1"}"#;
        let outside = r#"{"message":"Unusual activity","error":"quota_exceeded","code":1008}"#;
        let fin = r#"{"isFinal":true,"context_id":"vg_r2"}"#;
        assert_eq!(fuzz_server_messages(&[audio, fin]), 0);
        assert_eq!(fuzz_server_messages(&[in_reply]), 0);
        assert_eq!(fuzz_server_messages(&[outside]), 1);
        assert_eq!(fuzz_server_messages(&["not json", "{}"]), 1);
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/elevenlabs_tts");
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            fuzz_server_messages(&lines);
        }
    }

    #[test]
    fn formats_match_the_call() {
        assert_eq!(output_format(8_000).0, "ulaw_8000");
        assert_eq!(output_format(16_000).0, "pcm_16000");
        assert_eq!(
            output_format(48_000).1,
            WireFormat::Pcm16 { rate_hz: 16_000 }
        );
    }

    #[test]
    fn base_url_follows_mode() {
        let cfg = TtsConfig {
            url: "https://api.elevenlabs.io/".into(),
            ..TtsConfig::default()
        };
        let s = TtsSettings {
            cfg,
            key: Secret::new("k"),
        };
        assert_eq!(s.base_url(true), "wss://api.elevenlabs.io");
        assert_eq!(s.base_url(false), "https://api.elevenlabs.io");
    }
}
