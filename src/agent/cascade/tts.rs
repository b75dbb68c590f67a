//! The cascade's TTS: ElevenLabs text-to-speech (`providers.md` §3), one stream per reply.
//!
//! The cascade sends the reply's text sentence by sentence as the LLM produces it
//! ([`TtsCommand::Text`]), then [`TtsCommand::Finish`]. Audio comes back in the format that
//! matches the call (`ulaw_8000` for 8 kHz calls, `pcm_16000` for 16 kHz calls), so it is
//! decoded to slin once and never resampled; other call rates get `pcm_16000` resampled.
//!
//! - WebSocket `stream-input` (default): one socket per reply, each sentence sent with
//!   `flush: true` so generation starts at once; `{"text":""}` ends the reply. With
//!   `sync_alignment=true` every audio chunk carries character timings, which map how much
//!   of an interrupted reply the caller heard to text.
//! - HTTP streaming (fallback): one `POST …/stream` per sentence, raw audio body; character
//!   timings are spread evenly over each sentence's audio.
//!
//! Dropping the [`TtsStream`] cancels it: the socket is closed (close frame) or the HTTP
//! response dropped, and the provider stops generating.

use super::config::{TtsConfig, TtsMode};
use crate::agent::AgentError;
use crate::audio::convert::{Decoder, WireFormat};
use crate::audio::g711::Law;
use crate::secret::Secret;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::debug;

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
pub fn output_format(rate_hz: u32) -> (String, WireFormat) {
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

/// Pieces of text one reply's TTS stream holds before more text is dropped (issue 14: no
/// unbounded queue); one slot is always left for [`TtsCommand::Finish`].
pub const TEXT_QUEUE: usize = 4096;

/// The text side of a [`TtsStream`]: a bounded queue with the shape of an unbounded sender.
#[derive(Debug, Clone)]
pub struct TextTx(mpsc::Sender<TtsCommand>);

impl TextTx {
    /// Queues `cmd` without waiting. Text beyond [`TEXT_QUEUE`] pieces (an LLM far ahead of
    /// the TTS) is dropped with a warning; the slot kept free means `Finish` always fits.
    ///
    /// # Errors
    /// The command back, when the stream is gone or the text was dropped.
    pub fn send(&self, cmd: TtsCommand) -> Result<(), mpsc::error::TrySendError<TtsCommand>> {
        if matches!(cmd, TtsCommand::Text(_)) && self.0.capacity() <= 1 {
            tracing::warn!(queue = TEXT_QUEUE, "TTS text queue full; text dropped");
            return Err(mpsc::error::TrySendError::Full(cmd));
        }
        self.0.try_send(cmd)
    }
}

/// One reply's TTS stream; dropping it cancels.
#[derive(Debug)]
pub struct TtsStream {
    /// Text in (bounded, never waits: [`TextTx::send`]).
    pub text: TextTx,
    /// Events out.
    pub events: mpsc::Receiver<TtsEvent>,
    cancel: CancellationToken,
}

impl Drop for TtsStream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl TtsSettings {
    /// Starts a stream for one reply on a call at `rate_hz`.
    pub fn start(&self, rate_hz: u32) -> TtsStream {
        let (text_tx, text_rx) = mpsc::channel(TEXT_QUEUE);
        let (ev_tx, ev_rx) = mpsc::channel(256);
        let cancel = CancellationToken::new();
        let this = self.clone();
        let token = cancel.clone();
        tokio::spawn(async move {
            let result = match this.cfg.mode {
                TtsMode::Ws => run_ws(&this, rate_hz, text_rx, &ev_tx, token).await,
                TtsMode::Http => run_http(&this, rate_hz, text_rx, &ev_tx, token).await,
            };
            if let Err(e) = result {
                let _ = ev_tx.send(TtsEvent::Failed(e)).await;
            }
        });
        TtsStream {
            text: TextTx(text_tx),
            events: ev_rx,
            cancel,
        }
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

fn decoder(format: WireFormat, rate_hz: u32) -> Result<Decoder, AgentError> {
    Decoder::new(format, rate_hz).map_err(|e| AgentError::Protocol {
        provider: PROVIDER,
        detail: e.to_string(),
    })
}

#[derive(Deserialize)]
struct WsOut {
    audio: Option<String>,
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

/// The socket-free part of reading one ElevenLabs TTS WebSocket message, exposed for the
/// fuzz target `fuzz/fuzz_targets/elevenlabs_tts.rs`: parses `text` as the stream task does,
/// decodes its base64 audio as μ-law and maps its alignment to (ms, char) pairs. Returns
/// the audio bytes and the character count.
///
/// # Errors
/// serde's error when `text` is not a TTS message (the stream task fails the turn).
pub fn inspect_message(text: &str) -> Result<(usize, usize), serde_json::Error> {
    let out: WsOut = serde_json::from_str(text)?;
    let mut raw = Vec::new();
    if let Some(b64) = out.audio.filter(|a| !a.is_empty()) {
        if base64::engine::general_purpose::STANDARD
            .decode_vec(b64.as_bytes(), &mut raw)
            .is_ok()
        {
            let mut samples = Vec::with_capacity(raw.len());
            if let Ok(mut dec) = Decoder::new(WireFormat::G711(Law::Ulaw), 8_000) {
                dec.decode(&raw, &mut samples);
            }
        }
    }
    let chars = out.alignment.map_or(0, |a| {
        a.chars
            .iter()
            .zip(&a.char_start_times_ms)
            .filter_map(|(c, t)| c.chars().next().map(|c| (t.max(0.0) as u64, c)))
            .count()
    });
    Ok((raw.len(), chars))
}

async fn run_ws(
    s: &TtsSettings,
    rate_hz: u32,
    mut text: mpsc::Receiver<TtsCommand>,
    events: &mpsc::Sender<TtsEvent>,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    let (format_name, format) = output_format(rate_hz);
    let mut url = reqwest::Url::parse(&format!(
        "{}/v1/text-to-speech/{}/stream-input",
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
            .append_pair("output_format", &format_name)
            .append_pair("sync_alignment", "true")
            .append_pair("inactivity_timeout", "60");
        if let Some(lang) = &s.cfg.language_code {
            q.append_pair("language_code", lang);
        }
    }
    let timeout = Duration::from_millis(s.cfg.connect_timeout_ms);
    let headers = [("xi-api-key", s.key.expose())];
    let connect = crate::agent::ws::connect(url.as_str(), &headers, timeout);
    let ws = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        ws = connect => ws.map_err(|e| AgentError::Connect { provider: PROVIDER, detail: e.to_string() })?,
    };
    let (mut sink, mut stream) = ws.split();
    let send_err = |e: tokio_tungstenite::tungstenite::Error| AgentError::Provider {
        provider: PROVIDER,
        detail: format!("send: {e}"),
    };
    let mut init = serde_json::json!({
        "text": " ",
        "generation_config": {"chunk_length_schedule": [50, 120, 160, 250]},
    });
    if (s.cfg.speed - 1.0).abs() > f32::EPSILON {
        init["voice_settings"] = serde_json::json!({"speed": s.cfg.speed});
    }
    sink.send(Message::text(init.to_string()))
        .await
        .map_err(send_err)?;
    let mut dec = decoder(format, rate_hz)?;
    let bytes_per_ms = format.bytes_per_ms() as u64;
    let mut wire_bytes: u64 = 0;
    let mut finished = false;
    let mut text_open = true;
    let mut raw = Vec::with_capacity(8192);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                debug!("tts cancelled: closing the socket");
                let _ = tokio::time::timeout(Duration::from_millis(500), sink.close()).await;
                return Ok(());
            }
            cmd = text.recv(), if text_open => {
                let msg = match cmd {
                    Some(TtsCommand::Text(t)) => {
                        let mut t = t.trim().to_owned();
                        if t.is_empty() { continue; }
                        t.push(' ');
                        serde_json::json!({"text": t, "flush": true}).to_string()
                    }
                    Some(TtsCommand::Finish) => {
                        text_open = false;
                        finished = true;
                        r#"{"text":""}"#.to_owned()
                    }
                    // The stream was dropped (cancelled): close without finishing.
                    None => {
                        let _ = tokio::time::timeout(Duration::from_millis(500), sink.close()).await;
                        return Ok(());
                    }
                };
                sink.send(Message::text(msg)).await.map_err(send_err)?;
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let out: WsOut = serde_json::from_str(t.as_str()).map_err(|e| AgentError::Protocol {
                        provider: PROVIDER,
                        detail: format!("bad message: {e}"),
                    })?;
                    if out.audio.is_none() && (out.message.is_some() || out.error.is_some()) {
                        let detail = out.message.or_else(|| out.error.map(|e| e.to_string())).unwrap_or_default();
                        return Err(AgentError::Provider { provider: PROVIDER, detail });
                    }
                    if let Some(b64) = out.audio.filter(|a| !a.is_empty()) {
                        raw.clear();
                        base64::engine::general_purpose::STANDARD
                            .decode_vec(b64.as_bytes(), &mut raw)
                            .map_err(|e| AgentError::Protocol { provider: PROVIDER, detail: format!("audio base64: {e}") })?;
                        let offset_ms = wire_bytes / bytes_per_ms;
                        wire_bytes += raw.len() as u64;
                        if let Some(a) = out.alignment {
                            let chars = a
                                .chars
                                .iter()
                                .zip(&a.char_start_times_ms)
                                .filter_map(|(c, t)| c.chars().next().map(|c| (offset_ms + t.max(0.0) as u64, c)))
                                .collect::<Vec<_>>();
                            if !chars.is_empty() && events.send(TtsEvent::Chars(chars)).await.is_err() {
                                return Ok(());
                            }
                        }
                        let mut samples = Vec::with_capacity(raw.len() * 2);
                        dec.decode(&raw, &mut samples);
                        if !samples.is_empty() && events.send(TtsEvent::Audio(samples)).await.is_err() {
                            return Ok(());
                        }
                    }
                    if out.is_final == Some(true) {
                        let _ = events.send(TtsEvent::Done).await;
                        let _ = tokio::time::timeout(Duration::from_millis(500), sink.close()).await;
                        return Ok(());
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    if finished {
                        let _ = events.send(TtsEvent::Done).await;
                        return Ok(());
                    }
                    let detail = match frame {
                        Some(f) => format!("closed the stream ({} {})", u16::from(f.code), f.reason),
                        None => "closed the stream".into(),
                    };
                    return Err(AgentError::Provider { provider: PROVIDER, detail });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(AgentError::Provider { provider: PROVIDER, detail: format!("receive: {e}") }),
                None => {
                    if finished {
                        let _ = events.send(TtsEvent::Done).await;
                        return Ok(());
                    }
                    return Err(AgentError::Provider { provider: PROVIDER, detail: "connection closed".into() });
                }
            }
        }
    }
}

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
        "{}/v1/text-to-speech/{}/stream?output_format={format_name}",
        s.base_url(false),
        s.cfg.voice_id
    );
    let mut dec = decoder(format, rate_hz)?;
    let bytes_per_ms = format.bytes_per_ms() as u64;
    let mut wire_bytes: u64 = 0;
    loop {
        let cmd = tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(()),
            cmd = text.recv() => cmd,
        };
        let sentence = match cmd {
            Some(TtsCommand::Text(t)) if !t.trim().is_empty() => t.trim().to_owned(),
            Some(TtsCommand::Text(_)) => continue,
            Some(TtsCommand::Finish) => {
                let _ = events.send(TtsEvent::Done).await;
                return Ok(());
            }
            None => return Ok(()),
        };
        let mut body = serde_json::json!({"text": sentence, "model_id": s.cfg.model_id});
        if let Some(lang) = &s.cfg.language_code {
            body["language_code"] = lang.clone().into();
        }
        if (s.cfg.speed - 1.0).abs() > f32::EPSILON {
            body["voice_settings"] = serde_json::json!({"speed": s.cfg.speed});
        }
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
        let start_ms = wire_bytes / bytes_per_ms;
        let mut stream = response.bytes_stream();
        loop {
            let chunk = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                c = stream.next() => c,
            };
            match chunk {
                None => break,
                Some(Err(e)) => {
                    return Err(AgentError::Provider {
                        provider: PROVIDER,
                        detail: format!("stream: {}", e.without_url()),
                    });
                }
                Some(Ok(bytes)) => {
                    wire_bytes += bytes.len() as u64;
                    let mut samples = Vec::with_capacity(bytes.len() * 2);
                    dec.decode(&bytes, &mut samples);
                    if !samples.is_empty() && events.send(TtsEvent::Audio(samples)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        // Spread the sentence's characters evenly over its audio.
        let end_ms = wire_bytes / bytes_per_ms;
        let chars: Vec<char> = format!("{sentence} ").chars().collect();
        let span = end_ms.saturating_sub(start_ms);
        let n = chars.len() as u64;
        let timed = chars
            .into_iter()
            .enumerate()
            .map(|(i, c)| (start_ms + span * i as u64 / n.max(1), c))
            .collect();
        if events.send(TtsEvent::Chars(timed)).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
