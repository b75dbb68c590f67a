//! Fakes of the cascade's providers, each speaking its vendor's real wire format on
//! 127.0.0.1:0 (`providers.md` §3–§7), and a synthetic AudioSocket caller that can feed the
//! agent's own voice back as echo.
#![allow(dead_code)]

use crate::support::http;

use base64::Engine as _;
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use voicegate::agent::cascade::CascadeConfig;
use voicegate::agent::cascade::config::SttProvider;
use voicegate::audio::g711::Law;
use voicegate::audio::wav::Recording;
use voicegate::audiosocket::codec::{self, Message as AsMessage, SlinRate};
use voicegate::audiosocket::read_message;
use voicegate::secret::SecretSource;

pub(crate) const KEY: &str = "test-key-123";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn query(uri: &str, key: &str) -> Option<String> {
    let url = reqwest::Url::parse(&format!("http://x{uri}")).ok()?;
    url.query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Every value of query parameter `key`, in order.
pub(crate) fn query_all(uri: &str, key: &str) -> Vec<String> {
    let Ok(url) = reqwest::Url::parse(&format!("http://x{uri}")) else {
        return Vec::new();
    };
    url.query_pairs()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// The header a vendor authenticates the WebSocket upgrade with, and its value.
type Auth = (&'static str, String);

/// Accepts a WebSocket upgrade. With `auth`, an upgrade without that header and value is
/// refused with HTTP 401 and `None` is returned (after the URI and headers are read), as the
/// vendors do.
#[allow(clippy::result_large_err)] // the handshake callback's error type is tungstenite's
async fn accept_ws(
    stream: TcpStream,
    auth: Option<Auth>,
) -> (
    Option<tokio_tungstenite::WebSocketStream<TcpStream>>,
    String,
    Vec<(String, String)>,
) {
    use tokio_tungstenite::tungstenite::handshake::server::ErrorResponse;
    use tokio_tungstenite::tungstenite::http::StatusCode;
    let mut uri = String::new();
    let mut headers = Vec::new();
    let ws = tokio_tungstenite::accept_hdr_async(stream, |req: &Request, resp: Response| {
        uri = req.uri().to_string();
        headers = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        if let Some((name, value)) = &auth {
            if header(&headers, name) != Some(value.as_str()) {
                let mut e = ErrorResponse::new(Some(
                    r#"{"error_code":401,"error_message":"Missing or invalid API key."}"#
                        .to_owned(),
                ));
                *e.status_mut() = StatusCode::UNAUTHORIZED;
                return Err(e);
            }
        }
        Ok(resp)
    })
    .await;
    (ws.ok(), uri, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------
// STT fakes
// ---------------------------------------------------------------------------------------

/// Which vendor an STT fake plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SttVendor {
    Soniox,
    Deepgram,
    ElevenLabs,
    /// Deepgram Flux on `/v2/listen` (developers.deepgram.com `docs/flux/quickstart`,
    /// `docs/flux/state`): `Connected`, then `TurnInfo` events (`StartOfTurn`, `Update`,
    /// `EndOfTurn`); the client ends with `CloseStream`. With `eager_eot_threshold` in the
    /// query (0.3–0.9, `docs/flux/configuration`; without it Flux never sends them) also
    /// `EagerEndOfTurn` at a pause and `TurnResumed` when speech follows it
    /// (`docs/flux/voice-agent-eager-eot`), keeping the state machine's rules.
    Flux,
}

/// What an STT fake saw.
#[derive(Debug, Default)]
pub(crate) struct SttLog {
    pub uri: String,
    pub headers: Vec<(String, String)>,
    /// Soniox' first message.
    pub config: Option<serde_json::Value>,
    /// Declared encoding (vendor's name) and sample rate.
    pub encoding: String,
    pub rate_hz: u32,
    /// All audio received, decoded to slin at `rate_hz`.
    pub audio: Vec<i16>,
    /// Control text messages received.
    pub texts: Vec<String>,
    /// Utterances recognised (ended).
    pub turns: usize,
    /// The client ended the stream (vendor end message or close).
    pub client_closed: bool,
    /// Problems with what the client sent.
    pub errors: Vec<String>,
    /// Connections accepted.
    pub connections: usize,
    /// Upgrades refused for a missing or wrong key.
    pub refused: usize,
    /// Soniox: `{"type":"finalize"}` messages received.
    pub finalized: usize,
    /// Soniox: utterances ended by a finalize (before the fake's own endpointing).
    pub turns_by_finalize: usize,
    /// Scribe: a chunk with `commit: true` arrived (the end of the call).
    pub final_commit: bool,
    /// Scribe: `previous_text` values received (with a session's first chunk).
    pub previous_texts: Vec<String>,
    /// Scribe: the `keyterms` query parameters of the last upgrade.
    pub keyterms: Vec<String>,
    /// Soniox: sessions open now, and the most it admits (`None`: no limit).
    pub active_sessions: usize,
    pub concurrency_limit: Option<usize>,
    /// Soniox: sessions refused for the concurrency limit.
    pub refused_concurrency: usize,
    /// Flux: when each `EagerEndOfTurn` (with its transcript) and `EndOfTurn` was sent, and
    /// how many `TurnResumed`.
    pub eager_sent: Vec<(Instant, String)>,
    pub end_of_turn_sent: Vec<Instant>,
    pub resumed: usize,
}

/// One admitted session of an STT fake; leaving it frees the slot.
struct ActiveSession(Arc<Mutex<SttLog>>);

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.lock().unwrap().active_sessions -= 1;
    }
}

/// A scripted STT: the "transcript" of the n-th utterance it hears is `utterances[n]`.
/// Speech is found the way a vendor's endpointing does it, on the audio it received: an
/// utterance is ≥ 200 ms above RMS 300, ended by ≥ 400 ms below.
pub(crate) struct SttFake {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<SttLog>>,
}

impl SttFake {
    pub(crate) async fn start(
        vendor: SttVendor,
        utterances: &[&str],
        fail_after_ms: Option<u64>,
    ) -> Self {
        Self::start_with(vendor, utterances, fail_after_ms, None).await
    }

    /// Like [`Self::start`]; with `failing_connections = Some(n)` only the first `n`
    /// connections fail after `fail_after_ms`.
    pub(crate) async fn start_with(
        vendor: SttVendor,
        utterances: &[&str],
        fail_after_ms: Option<u64>,
        failing_connections: Option<usize>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(SttLog::default()));
        let utterances: Vec<String> = utterances.iter().map(|s| s.to_string()).collect();
        let l = log.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let l = l.clone();
                let u = utterances.clone();
                let index = {
                    let mut log = l.lock().unwrap();
                    log.connections += 1;
                    log.connections - 1
                };
                let fail = fail_after_ms.filter(|_| failing_connections.is_none_or(|n| index < n));
                tokio::spawn(serve_stt(vendor, stream, l, u, fail));
            }
        });
        SttFake { addr, log }
    }

    /// Soniox: at most `n` sessions at once, as a project's concurrency limit (soniox.com
    /// `stt/rt/limits-and-quotas`: 10 by default); one more is refused with a 429.
    pub(crate) fn concurrency_limit(&self, n: usize) {
        self.log.lock().unwrap().concurrency_limit = Some(n);
    }

    pub(crate) fn url(&self, vendor: SttVendor) -> String {
        match vendor {
            SttVendor::Soniox => format!("ws://{}/transcribe-websocket", self.addr),
            SttVendor::Deepgram => format!("ws://{}/v1/listen", self.addr),
            SttVendor::Flux => format!("ws://{}/v2/listen", self.addr),
            SttVendor::ElevenLabs => format!("ws://{}/v1/speech-to-text/realtime", self.addr),
        }
    }
}

async fn serve_stt(
    vendor: SttVendor,
    stream: TcpStream,
    log: Arc<Mutex<SttLog>>,
    utterances: Vec<String>,
    fail_after_ms: Option<u64>,
) {
    // How each vendor authenticates the upgrade: Soniox `Authorization: Bearer` (soniox.com
    // guides/websocket-authentication; from 15 January 2027 a connection without it is
    // refused), Deepgram `Authorization: Token` (developers.deepgram.com "Authenticating"),
    // ElevenLabs `xi-api-key` (scribe.asyncapi.yaml in elevenlabs/packages).
    let auth: Auth = match vendor {
        SttVendor::Soniox => ("authorization", format!("Bearer {KEY}")),
        SttVendor::Deepgram | SttVendor::Flux => ("authorization", format!("Token {KEY}")),
        SttVendor::ElevenLabs => ("xi-api-key", KEY.to_owned()),
    };
    let (ws, uri, headers) = accept_ws(stream, Some(auth)).await;
    let mut format: Option<(String, u32)> = None;
    {
        let mut l = log.lock().unwrap();
        l.uri = uri.clone();
        l.headers = headers.clone();
        if ws.is_none() {
            l.refused += 1;
            l.errors
                .push("upgrade without the key: refused with 401".into());
        }
        match vendor {
            SttVendor::Deepgram => {
                let enc = query(&uri, "encoding").unwrap_or_default();
                let rate = query(&uri, "sample_rate")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                if query(&uri, "channels").as_deref() != Some("1") {
                    l.errors.push("channels != 1".into());
                }
                if query(&uri, "interim_results").as_deref() != Some("true") {
                    l.errors.push("interim_results not requested".into());
                }
                // `language_hint` belongs to nova-3 multilingual (`language=multi`,
                // developers.deepgram.com docs/nova-3-language-prompting); without a
                // `language` Deepgram silently transcribes English (docs/models).
                let hints = query_all(&uri, "language_hint");
                match query(&uri, "language").as_deref() {
                    None => l
                        .errors
                        .push("no language: Deepgram would assume en".into()),
                    Some("multi") => {}
                    Some(_) if !hints.is_empty() => {
                        l.errors.push("language_hint without language=multi".into())
                    }
                    Some(_) => {}
                }
                if !query_all(&uri, "keyterm").is_empty()
                    && !query(&uri, "model")
                        .unwrap_or_default()
                        .starts_with("nova-3")
                {
                    l.errors
                        .push("keyterm is only compatible with nova-3".into());
                }
                format = Some((enc, rate));
            }
            SttVendor::Flux => {
                if !uri.starts_with("/v2/listen?") {
                    l.errors
                        .push(format!("flux lives on /v2/listen, not {uri}"));
                }
                if !query(&uri, "model").unwrap_or_default().starts_with("flux") {
                    l.errors.push("not a flux model".into());
                }
                let enc = query(&uri, "encoding").unwrap_or_default();
                let rate = query(&uri, "sample_rate")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                if enc.is_empty() || rate == 0 {
                    l.errors
                        .push("encoding and sample_rate are required".into());
                }
                // docs/flux/configuration: eager_eot_threshold 0.3–0.9, unset by default
                // (then no EagerEndOfTurn or TurnResumed is ever sent).
                if let Some(t) = query(&uri, "eager_eot_threshold") {
                    if !t.parse::<f32>().is_ok_and(|t| (0.3..=0.9).contains(&t)) {
                        l.errors
                            .push(format!("eager_eot_threshold {t} outside 0.3–0.9"));
                    }
                }
                format = Some((enc, rate));
            }
            SttVendor::ElevenLabs => {
                let f = query(&uri, "audio_format").unwrap_or_default();
                let rate = if f == "ulaw_8000" {
                    8000
                } else {
                    f.strip_prefix("pcm_")
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0)
                };
                if query(&uri, "commit_strategy").as_deref() != Some("vad") {
                    l.errors.push("commit_strategy != vad".into());
                }
                // Keyterms: one repeated query parameter each (elevenlabs-js
                // `wrapper/realtime/scribe.ts`), at most 50 of up to 20 characters
                // (elevenlabs.io `speech-to-text/keyterm-prompting`, "Realtime").
                l.keyterms = query_all(&uri, "keyterms");
                format = Some((f, rate));
            }
            SttVendor::Soniox => {}
        }
        if let Some((e, r)) = &format {
            l.encoding = e.clone();
            l.rate_hz = *r;
        }
    }
    let Some(mut ws) = ws else { return };
    if vendor == SttVendor::Flux {
        let _ = ws
            .send(Message::text(
                r#"{"type":"Connected","request_id":"r1","sequence_id":0}"#,
            ))
            .await;
    }
    // Scribe: shapes from elevenlabs/packages `schemas/scribe.asyncapi.yaml`
    // (SessionStartedPayload: `vad_commit_strategy` is the string "manual" | "vad";
    // InputAudioChunkPayload: message_type, audio_base_64, commit, sample_rate required,
    // `previous_text` only alongside the first chunk, "if sent in a subsequent chunk, an
    // error will be returned").
    let mut chunks_seen = 0usize;
    if vendor == SttVendor::ElevenLabs {
        let keyterms = log.lock().unwrap().keyterms.clone();
        let refusal = if keyterms.len() > 50 {
            Some(format!(
                "Too many keyterms: {} (maximum 50)",
                keyterms.len()
            ))
        } else {
            keyterms.iter().find(|k| k.chars().count() > 20).map(|k| {
                format!(
                    "Keyterm '{k}' is {} characters (maximum 20)",
                    k.chars().count()
                )
            })
        };
        if let Some(e) = refusal {
            let m = serde_json::json!({"message_type":"input_error","error":e});
            let _ = ws.send(Message::text(m.to_string())).await;
            let _ = ws.close(None).await;
            log.lock().unwrap().errors.push(e);
            return;
        }
        let (f, r) = format.clone().unwrap();
        let started = serde_json::json!({"message_type":"session_started","session_id":"s1",
            "config":{"sample_rate":r,"audio_format":f,"vad_commit_strategy":"vad",
                      "vad_silence_threshold_secs":0.5,"model_id":"scribe_v2_realtime"}});
        let _ = ws.send(Message::text(started.to_string())).await;
    }
    let mut _admitted: Option<ActiveSession> = None;
    let mut ep = Endpointer {
        eager: vendor == SttVendor::Flux && query(&uri, "eager_eot_threshold").is_some(),
        ..Endpointer::default()
    };
    let mut utt = utterances.into_iter();
    let mut current: Option<String> = None;
    let mut audio_ms_total = 0u64;
    while let Some(msg) = ws.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(_) => break,
        };
        let chunk: Vec<i16>;
        match msg {
            Message::Text(t) => {
                let t = t.as_str().to_owned();
                match vendor {
                    SttVendor::Soniox if format.is_none() => {
                        let cfg: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                        let refused = {
                            let mut l = log.lock().unwrap();
                            if cfg.get("api_key").is_some() {
                                l.errors.push(
                                "api_key in the start message: deprecated, the key goes with \
                                 the connection (soniox.com guides/migrate-websocket-authentication)"
                                    .into(),
                            );
                            }
                            if cfg["num_channels"] != 1 {
                                l.errors.push("num_channels != 1".into());
                            }
                            let e = cfg["audio_format"].as_str().unwrap_or("").to_owned();
                            let r = cfg["sample_rate"].as_u64().unwrap_or(0) as u32;
                            l.encoding = e.clone();
                            l.rate_hz = r;
                            l.config = Some(cfg);
                            format = Some((e, r));
                            // A session over the project's concurrency limit: the error response
                            // every real-time error has (soniox.com `stt/rt/error-handling`:
                            // error_code, error_type, error_message, more_info, request_id; then
                            // the socket closes), code 429 `limit_exceeded` as for any rate or
                            // usage limit (`api-reference/errors`, `guides/concurrency-limits`:
                            // "the 429 response identifies which tier rejected it").
                            let refused =
                                l.concurrency_limit.is_some_and(|n| l.active_sessions >= n);
                            if refused {
                                l.refused_concurrency += 1;
                            } else {
                                l.active_sessions += 1;
                            }
                            refused
                        };
                        if refused {
                            let e = serde_json::json!({"error_code":429,"error_type":"limit_exceeded",
                                "error_message":"Concurrent requests limit has been exceeded for your project.",
                                "more_info":"https://soniox.com/docs/api-reference/errors#limit-exceeded",
                                "request_id":"3d37a3bd-5078-47ee-a369-b204e3bbedda"});
                            let _ = ws.send(Message::text(e.to_string())).await;
                            let _ = ws.close(None).await;
                            return;
                        }
                        _admitted = Some(ActiveSession(log.clone()));
                        continue;
                    }
                    // soniox.com stt/real-time-API/manual-finalization: the audio so far
                    // becomes final at once, then a `<fin>` token.
                    SttVendor::Soniox if t.contains(r#""type":"finalize""#) => {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                        {
                            let mut l = log.lock().unwrap();
                            l.finalized += 1;
                            if !v["trailing_silence_ms"].is_u64()
                                && v.get("trailing_silence_ms").is_some()
                            {
                                l.errors
                                    .push("trailing_silence_ms is not an integer".into());
                            }
                        }
                        let mut tokens: Vec<serde_json::Value> = Vec::new();
                        if let Some(text) = current.take() {
                            let mut l = log.lock().unwrap();
                            l.turns += 1;
                            l.turns_by_finalize += 1;
                            drop(l);
                            tokens = text
                                .split_whitespace()
                                .enumerate()
                                .map(|(i, w)| {
                                    let t = if i == 0 { w.to_owned() } else { format!(" {w}") };
                                    serde_json::json!({"text":t,"start_ms":100*i,"end_ms":100*i+90,"confidence":0.95,"is_final":true})
                                })
                                .collect();
                        }
                        tokens.push(serde_json::json!({"text":"<fin>","is_final":true}));
                        let m = serde_json::json!({"tokens":tokens,"final_audio_proc_ms":1000,"total_audio_proc_ms":1000});
                        if ws.send(Message::text(m.to_string())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    SttVendor::Soniox if t.is_empty() => {
                        log.lock().unwrap().client_closed = true;
                        let _ = ws
                            .send(Message::text(r#"{"tokens":[],"final_audio_proc_ms":0,"total_audio_proc_ms":0,"finished":true}"#))
                            .await;
                        let _ = ws.close(None).await;
                        break;
                    }
                    SttVendor::ElevenLabs => {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                        if v["message_type"] != "input_audio_chunk" {
                            log.lock()
                                .unwrap()
                                .errors
                                .push(format!("unexpected message {t}"));
                            continue;
                        }
                        let (_, r) = format.clone().unwrap();
                        if v["sample_rate"] != r {
                            log.lock()
                                .unwrap()
                                .errors
                                .push("sample_rate field differs".into());
                        }
                        if !v["commit"].is_boolean() || !v["audio_base_64"].is_string() {
                            log.lock()
                                .unwrap()
                                .errors
                                .push(format!("input_audio_chunk without a required field: {t}"));
                        }
                        chunks_seen += 1;
                        if chunks_seen > 1 && v.get("previous_text").is_some() {
                            let e = serde_json::json!({"message_type":"input_error",
                                "error":"previous_text can only be sent with the first audio chunk"});
                            let _ = ws.send(Message::text(e.to_string())).await;
                            let _ = ws.close(None).await;
                            log.lock()
                                .unwrap()
                                .errors
                                .push("previous_text after the first chunk".into());
                            break;
                        }
                        if let Some(p) = v["previous_text"].as_str() {
                            log.lock().unwrap().previous_texts.push(p.to_owned());
                        }
                        if v["commit"] == true {
                            // The last chunk of the call: a manual commit.
                            log.lock().unwrap().final_commit = true;
                            continue;
                        }
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(v["audio_base_64"].as_str().unwrap_or(""))
                            .unwrap_or_default();
                        chunk = decode(&format.as_ref().unwrap().0, &bytes);
                    }
                    SttVendor::Deepgram | SttVendor::Flux if t.contains("CloseStream") => {
                        log.lock().unwrap().client_closed = true;
                        let _ = ws
                            .send(Message::text(r#"{"type":"Metadata","transaction_key":"deprecated","request_id":"r1","sha256":"x","created":"2025-01-01T00:00:00Z","duration":1.0,"channels":1}"#))
                            .await;
                        let _ = ws.close(None).await;
                        break;
                    }
                    _ => {
                        log.lock().unwrap().texts.push(t);
                        continue;
                    }
                }
            }
            Message::Binary(b) => match &format {
                Some((enc, _)) if vendor != SttVendor::ElevenLabs => chunk = decode(enc, &b),
                _ => {
                    log.lock()
                        .unwrap()
                        .errors
                        .push("binary audio before config".into());
                    continue;
                }
            },
            Message::Close(_) => {
                log.lock().unwrap().client_closed = true;
                break;
            }
            _ => continue,
        }
        let rate = format.as_ref().map_or(8000, |f| f.1).max(1);
        audio_ms_total += chunk.len() as u64 * 1000 / rate as u64;
        log.lock().unwrap().audio.extend_from_slice(&chunk);
        if let Some(limit) = fail_after_ms {
            if audio_ms_total >= limit {
                let (text, close) = match vendor {
                    SttVendor::Soniox => (
                        Some(
                            r#"{"error_code":503,"error_message":"Cannot continue request (code 1). Please restart the request."}"#,
                        ),
                        CloseFrame {
                            code: CloseCode::Normal,
                            reason: "".into(),
                        },
                    ),
                    SttVendor::Deepgram | SttVendor::Flux => (
                        None,
                        CloseFrame {
                            code: CloseCode::Error,
                            reason: "NET-0000".into(),
                        },
                    ),
                    SttVendor::ElevenLabs => (
                        Some(
                            r#"{"message_type":"session_time_limit_exceeded","error":"Maximum session duration exceeded."}"#,
                        ),
                        CloseFrame {
                            code: CloseCode::Error,
                            reason: "".into(),
                        },
                    ),
                };
                if let Some(t) = text {
                    let _ = ws.send(Message::text(t)).await;
                }
                let _ = ws.close(Some(close)).await;
                break;
            }
        }
        for ev in ep.push(&chunk, rate) {
            let text = match ev {
                EpEvent::Started => {
                    current = utt.next();
                    let Some(text) = &current else { continue };
                    let first = text.split_whitespace().next().unwrap_or("").to_owned();
                    stt_interim(vendor, &first)
                }
                // Flux eager mode (docs/flux/state): the transcript so far is the script's
                // " | "-separated parts up to this pause; `EndOfTurn` repeats the last
                // `EagerEndOfTurn`'s transcript (rule 4), and `TurnResumed` only follows an
                // `EagerEndOfTurn` (rule 3).
                EpEvent::Eager(pause) => {
                    let Some(text) = &current else { continue };
                    let parts: Vec<&str> = text.split(" | ").collect();
                    let so_far = parts[..=pause.min(parts.len() - 1)].join(" ");
                    log.lock()
                        .unwrap()
                        .eager_sent
                        .push((Instant::now(), so_far.clone()));
                    vec![flux_turn("EagerEndOfTurn", &so_far)]
                }
                EpEvent::Resumed => {
                    let Some(text) = &current else { continue };
                    log.lock().unwrap().resumed += 1;
                    vec![flux_turn(
                        "TurnResumed",
                        text.split(" | ").next().unwrap_or(""),
                    )]
                }
                EpEvent::Ended => {
                    let Some(text) = current.take() else { continue };
                    let mut l = log.lock().unwrap();
                    l.turns += 1;
                    if vendor == SttVendor::Flux {
                        l.end_of_turn_sent.push(Instant::now());
                    }
                    drop(l);
                    stt_final(vendor, &text.replace(" | ", " "))
                }
            };
            for t in text {
                if ws.send(Message::text(t)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn stt_interim(vendor: SttVendor, text: &str) -> Vec<String> {
    match vendor {
        SttVendor::Soniox => vec![serde_json::json!({"tokens":[{"text":text,"start_ms":100,"end_ms":300,"confidence":0.8,"is_final":false}],"final_audio_proc_ms":0,"total_audio_proc_ms":400}).to_string()],
        SttVendor::Deepgram => vec![
            r#"{"type":"SpeechStarted","channel":[0,1],"timestamp":0.1}"#.to_owned(),
            serde_json::json!({"type":"Results","channel_index":[0,1],"duration":0.4,"start":0.0,"is_final":false,"speech_final":false,"channel":{"alternatives":[{"transcript":text,"confidence":0.8,"words":[]}]},"metadata":{"request_id":"r1"}}).to_string(),
        ],
        SttVendor::ElevenLabs => vec![serde_json::json!({"message_type":"partial_transcript","text":text}).to_string()],
        SttVendor::Flux => vec![flux_turn("StartOfTurn", text)],
    }
}

fn stt_final(vendor: SttVendor, text: &str) -> Vec<String> {
    match vendor {
        SttVendor::Soniox => {
            let mut tokens: Vec<serde_json::Value> = text
                .split_whitespace()
                .enumerate()
                .map(|(i, w)| {
                    let t = if i == 0 { w.to_owned() } else { format!(" {w}") };
                    serde_json::json!({"text":t,"start_ms":100*i,"end_ms":100*i+90,"confidence":0.95,"is_final":true})
                })
                .collect();
            tokens.push(serde_json::json!({"text":"<end>","is_final":true}));
            vec![serde_json::json!({"tokens":tokens,"final_audio_proc_ms":1000,"total_audio_proc_ms":1000}).to_string()]
        }
        SttVendor::Deepgram => vec![
            serde_json::json!({"type":"Results","channel_index":[0,1],"duration":1.0,"start":0.0,"is_final":true,"speech_final":true,"from_finalize":false,"channel":{"alternatives":[{"transcript":text,"confidence":0.95,"words":[]}]},"metadata":{"request_id":"r1"}}).to_string(),
            r#"{"type":"UtteranceEnd","channel":[0,1],"last_word_end":1.0}"#.to_owned(),
        ],
        SttVendor::ElevenLabs => vec![serde_json::json!({"message_type":"committed_transcript","text":text}).to_string()],
        SttVendor::Flux => vec![flux_turn("Update", text), flux_turn("EndOfTurn", text)],
    }
}

/// A Flux `TurnInfo` message.
fn flux_turn(event: &str, transcript: &str) -> String {
    serde_json::json!({"type":"TurnInfo","event":event,"turn_index":0,"audio_window_start":0.0,
        "audio_window_end":1.0,"transcript":transcript,"words":[],"end_of_turn_confidence":0.9})
    .to_string()
}

fn decode(encoding: &str, bytes: &[u8]) -> Vec<i16> {
    let mut out = Vec::new();
    match encoding {
        "mulaw" | "ulaw_8000" => Law::Ulaw.decode_into(bytes, &mut out),
        _ => voicegate::audio::slin_from_le_bytes(bytes, &mut out),
    }
    out
}

#[derive(Default)]
struct Endpointer {
    buf: Vec<i16>,
    speech_ms: u32,
    silence_ms: u32,
    started: bool,
    /// Flux eager mode: an `Eager` after 120 ms of silence within an utterance (well before
    /// its end at 400 ms), `Resumed` when speech follows it.
    eager: bool,
    /// Eager events sent in this utterance; whether the last one awaits resumption or end.
    pauses: usize,
    awaiting_end: bool,
}

enum EpEvent {
    Started,
    /// The n-th pause (from 0) of the utterance looks like its end.
    Eager(usize),
    Resumed,
    Ended,
}

/// Silence after which the Flux fake, in eager mode, sends `EagerEndOfTurn`.
pub(crate) const FLUX_EAGER_SILENCE_MS: u32 = 120;

impl Endpointer {
    fn push(&mut self, samples: &[i16], rate: u32) -> Vec<EpEvent> {
        self.buf.extend_from_slice(samples);
        let n = rate as usize / 50;
        let mut out = Vec::new();
        while self.buf.len() >= n {
            let block: Vec<i16> = self.buf.drain(..n).collect();
            if voicegate::audio::rms(&block) > 300.0 {
                self.speech_ms += 20;
                self.silence_ms = 0;
                if self.awaiting_end {
                    self.awaiting_end = false;
                    out.push(EpEvent::Resumed);
                }
            } else {
                self.silence_ms += 20;
            }
            if !self.started && self.speech_ms >= 200 {
                self.started = true;
                out.push(EpEvent::Started);
            }
            if self.eager
                && self.started
                && !self.awaiting_end
                && self.silence_ms >= FLUX_EAGER_SILENCE_MS
            {
                self.awaiting_end = true;
                out.push(EpEvent::Eager(self.pauses));
                self.pauses += 1;
            }
            if self.started && self.silence_ms >= 400 {
                self.started = false;
                self.speech_ms = 0;
                self.pauses = 0;
                self.awaiting_end = false;
                out.push(EpEvent::Ended);
            }
            if !self.started && self.silence_ms >= 400 {
                self.speech_ms = 0;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Chat Completions fake (HTTP/1.1, SSE)
// ---------------------------------------------------------------------------------------

/// One scripted answer.
#[derive(Debug, Clone)]
pub(crate) enum LlmReply {
    /// `data:` payloads (`[DONE]` is added); with `hold_after = Some(n)` the fake sends `n`
    /// events, then waits for [`LlmFake::release`] (or the client closing).
    Stream {
        events: Vec<String>,
        hold_after: Option<usize>,
    },
    /// A non-2xx answer with a JSON body (and a `Retry-After: {s}` header if set).
    Error {
        status: u16,
        body: String,
        retry_after_s: Option<u32>,
    },
    /// The connection is closed once the request is read, with no answer.
    Hangup,
}

impl LlmReply {
    /// The streamed reply `text`, whole.
    pub(crate) fn text(text: &str) -> Self {
        LlmReply::Stream {
            events: text_events(text),
            hold_after: None,
        }
    }

    /// The streamed reply `text`, holding back after `n` events (see [`LlmReply::Stream`]).
    pub(crate) fn text_held(text: &str, n: usize) -> Self {
        LlmReply::Stream {
            events: text_events(text),
            hold_after: Some(n),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct LlmLog {
    pub requests: Vec<LlmRequest>,
    /// Request indices whose streams the client closed before the end.
    pub cancelled: Vec<usize>,
    /// When each of `cancelled` was noticed.
    pub cancelled_at: Vec<Instant>,
    /// Request indices whose streams were sent completely.
    pub completed: Vec<usize>,
    /// Request indices that are holding back their last events.
    pub holding: Vec<usize>,
}

#[derive(Debug, Clone)]
pub(crate) struct LlmRequest {
    /// When the request was read.
    pub at: Instant,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

/// A Chat Completions endpoint (`POST /v1/chat/completions`, `stream: true`; shapes from
/// `providers.md` §7 and openai-python `src/openai/types/chat/`). Like the vendor it pushes
/// back: `max_tokens` is refused (reasoning models), and so is a history OpenAI rejects: an
/// assistant message with `tool_calls` not followed by a `tool` message for each id, or a
/// `tool` message that answers no preceding tool call (400 `invalid_request_error`, message
/// texts as the API words them, quoted in sdcb/chats#132 and smarter-sh/smarter#264). Its
/// first token can be delayed ([`LlmFake::first_token_delay`]), as a model thinks before
/// it streams.
pub(crate) struct LlmFake {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<LlmLog>>,
    pub release: Arc<Notify>,
    first_token: Arc<Mutex<Duration>>,
}

impl LlmFake {
    pub(crate) async fn start(script: Vec<LlmReply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(LlmLog::default()));
        let release = Arc::new(Notify::new());
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let first_token = Arc::new(Mutex::new(Duration::ZERO));
        let (l, r, f) = (log.clone(), release.clone(), first_token.clone());
        tokio::spawn(http::serve(listener, move |req: http::Request| {
            let first = *f.lock().unwrap();
            serve_llm(req, l.clone(), r.clone(), script.clone(), first)
        }));
        LlmFake {
            addr,
            log,
            release,
            first_token,
        }
    }

    /// Streams of later requests send their first `data:` event this long after the 200
    /// and the processing comment (the model's time to first token).
    pub(crate) fn first_token_delay(&self, d: Duration) {
        *self.first_token.lock().unwrap() = d;
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/v1/chat/completions", self.addr)
    }
}

/// Answers one request; `None` closes the connection without an answer.
async fn serve_llm(
    req: http::Request,
    log: Arc<Mutex<LlmLog>>,
    release: Arc<Notify>,
    script: Arc<Mutex<VecDeque<LlmReply>>>,
    first_token: Duration,
) -> Option<http::Response> {
    let index = {
        let mut l = log.lock().unwrap();
        l.requests.push(LlmRequest {
            at: Instant::now(),
            path: req.target.clone(),
            headers: req.headers.clone().into_iter().collect(),
            body: req.json(),
        });
        l.requests.len() - 1
    };
    // Reasoning models refuse the deprecated `max_tokens` (openai-python
    // `src/openai/types/chat/completion_create_params.py`: "max_tokens … is not compatible
    // with o-series models"; use `max_completion_tokens`); the fake refuses it for every
    // model, with OpenAI's error shape, before taking a scripted reply.
    let refusal = log.lock().unwrap().requests[index]
        .body
        .get("max_tokens")
        .map(|_| LlmReply::Error {
            status: 400,
            body: r#"{"error":{"message":"Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.","type":"invalid_request_error","param":"max_tokens","code":"unsupported_parameter"}}"#.into(),
            retry_after_s: None,
        });
    let refusal = refusal.or_else(|| {
        let l = log.lock().unwrap();
        history_error(&l.requests[index].body).map(|body| LlmReply::Error {
            status: 400,
            body,
            retry_after_s: None,
        })
    });
    let reply = refusal.or_else(|| script.lock().unwrap().pop_front()).unwrap_or(LlmReply::Error {
            status: 400,
            body:
                r#"{"error":{"message":"fake has no more scripted replies","type":"invalid_request_error"}}"#
                    .into(),
            retry_after_s: None,
        });
    match reply {
        LlmReply::Error {
            status,
            body,
            retry_after_s,
        } => {
            let retry_after = retry_after_s.map(|s| s.to_string());
            let mut headers = vec![("content-type", "application/json")];
            if let Some(r) = &retry_after {
                headers.push(("retry-after", r.as_str()));
            }
            Some(http::full(status, &headers, body))
        }
        LlmReply::Hangup => None,
        LlmReply::Stream { events, hold_after } => {
            let (tx, resp) = http::streamed(
                200,
                &[
                    ("content-type", "text/event-stream"),
                    ("cache-control", "no-cache"),
                ],
            );
            let mut all: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
            all.insert(0, ": OPENROUTER PROCESSING\n\n".into());
            all.push("data: [DONE]\n\n".into());
            let hold_at = hold_after.map(|n| n + 1);
            tokio::spawn(async move {
                for (i, ev) in all.into_iter().enumerate() {
                    if i == 1 && !first_token.is_zero() {
                        tokio::time::sleep(first_token).await;
                    }
                    if Some(i) == hold_at {
                        log.lock().unwrap().holding.push(index);
                        tokio::select! {
                            () = release.notified() => {}
                            () = tx.closed() => {
                                let mut l = log.lock().unwrap();
                                l.cancelled.push(index);
                                l.cancelled_at.push(Instant::now());
                                return;
                            }
                        }
                    }
                    if tx.send(ev.into()).await.is_err() {
                        let mut l = log.lock().unwrap();
                        l.cancelled.push(index);
                        l.cancelled_at.push(Instant::now());
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // The body ends when `tx` is dropped; wait until hyper has taken it all.
                drop(tx);
                log.lock().unwrap().completed.push(index);
            });
            Some(resp)
        }
    }
}

/// OpenAI's 400 body for a `messages` history it refuses, if it does: every assistant
/// `tool_calls` id must be answered by a `tool` message before the next other message, and
/// every `tool` message must answer such an id.
fn history_error(body: &serde_json::Value) -> Option<String> {
    let messages = body["messages"].as_array()?;
    let refuse = |message: String, i: usize| {
        Some(
            serde_json::json!({"error": {"message": message, "type": "invalid_request_error",
                "param": format!("messages.[{i}].role"), "code": null}})
            .to_string(),
        )
    };
    let mut open: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match m["role"].as_str() {
            Some("tool") => {
                let id = m["tool_call_id"].as_str().unwrap_or("");
                if !open.iter().any(|o| o == id) {
                    return refuse(
                        "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.".into(),
                        i,
                    );
                }
                open.retain(|o| o != id);
            }
            _ if !open.is_empty() => {
                return refuse(
                    format!(
                        "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}",
                        open.join(", ")
                    ),
                    i,
                );
            }
            _ => {
                if let Some(calls) = m["tool_calls"].as_array() {
                    open = calls
                        .iter()
                        .filter_map(|c| c["id"].as_str().map(str::to_owned))
                        .collect();
                }
            }
        }
    }
    if !open.is_empty() {
        return refuse(
            format!(
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}",
                open.join(", ")
            ),
            messages.len() - 1,
        );
    }
    None
}

fn chunk(delta: serde_json::Value, finish: Option<&str>) -> String {
    serde_json::json!({"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",
        "choices":[{"index":0,"delta":delta,"finish_reason":finish}]})
    .to_string()
}

/// SSE events streaming `text` a few words at a time, then `stop` and usage.
pub(crate) fn text_events(text: &str) -> Vec<String> {
    let mut out = vec![chunk(
        serde_json::json!({"role":"assistant","content":""}),
        None,
    )];
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    for piece in words.chunks(2) {
        out.push(chunk(serde_json::json!({"content": piece.concat()}), None));
    }
    out.push(chunk(serde_json::json!({}), Some("stop")));
    out.push(serde_json::json!({"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}).to_string());
    out
}

/// SSE events of one tool call, its arguments split into fragments (§7.2).
pub(crate) fn tool_events(id: &str, name: &str, arguments: &str) -> Vec<String> {
    let mut out = vec![chunk(
        serde_json::json!({"role":"assistant","content":null,"tool_calls":[{"index":0,"id":id,"type":"function","function":{"name":name,"arguments":""}}]}),
        None,
    )];
    let mid = arguments.len() / 2;
    for part in [&arguments[..mid], &arguments[mid..]] {
        out.push(chunk(
            serde_json::json!({"tool_calls":[{"index":0,"function":{"arguments":part}}]}),
            None,
        ));
    }
    out.push(chunk(serde_json::json!({}), Some("tool_calls")));
    out
}

// ---------------------------------------------------------------------------------------
// ElevenLabs TTS multi-context fake (WebSocket)
// ---------------------------------------------------------------------------------------

/// One context (= one reply) the fake saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct TtsConn {
    /// The socket's URI.
    pub uri: String,
    pub api_key: Option<String>,
    /// The context's first message.
    pub init: Option<serde_json::Value>,
    /// Text messages with words in them, in order.
    pub texts: Vec<String>,
    /// `{"context_id","flush":true}` without text arrived: the reply's text is complete.
    pub end_of_input: bool,
    /// `isFinal` was sent for it.
    pub final_sent: bool,
    /// The client closed the context before its text was complete (a barge-in).
    pub closed_early: bool,
    /// Audio bytes sent.
    pub audio_bytes: usize,
}

#[derive(Debug, Default)]
pub(crate) struct TtsLog {
    /// One entry per context, in the order they were opened.
    pub conns: Vec<TtsConn>,
    /// WebSocket connections accepted.
    pub sockets: usize,
    /// Violations of the vendor's rules by the client.
    pub errors: Vec<String>,
    /// `{"close_socket":true}` arrived.
    pub close_socket: bool,
    /// Sockets closed for inactivity (`input_timeout_exceeded`).
    pub timed_out: usize,
}

/// Bytes of 100 ms of audio in the format.
fn bytes_per_chunk(ulaw: bool, rate: u32) -> usize {
    if ulaw { 800 } else { rate as usize / 5 }
}

/// Models that take `language_code` (elevenlabs.io multi-stream-input: "for specific
/// models"; pipecat `services/elevenlabs/tts.py` `ELEVENLABS_MULTILINGUAL_MODELS`).
const LANGUAGE_MODELS: [&str; 3] = ["eleven_flash_v2_5", "eleven_turbo_v2_5", "eleven_v3"];

/// A fake of ElevenLabs' multi-context TTS socket
/// (`/v1/text-to-speech/{voice}/multi-stream-input`; shapes from elevenlabs.io
/// `docs/api-reference/text-to-speech/v-1-text-to-speech-voice-id-multi-stream-input`, the
/// multi-context WebSocket guide, and pipecat `services/elevenlabs/tts.py`): `xi-api-key`
/// on the upgrade (else 401); a context opens with its first text; each flushed text is
/// answered with `clip` (a real recording, converted to the requested `output_format`) in
/// 100 ms `{"audio","alignment","contextId"}` chunks; `close_context` is answered with
/// `{"isFinal":true,"contextId"}`. Like the vendor it refuses: more than 5 open contexts,
/// text to a closed context, `eleven_v3` on this socket, and `language_code` for a model that
/// takes none (an error message, then a 1008 close).
///
/// The key and the silence are checked as ElevenLabs does: the upgrade is accepted whatever
/// the key (pipecat-ai/pipecat#1006: a wrong key shows as a 1008 close on the open socket),
/// and a missing or wrong `xi-api-key` gets
/// `{"message":"Invalid API key","error":"invalid_api_key","code":1008}` and a 1008 close
/// (the in-band shape of the vendor's socket errors, livekit/agents#218; `invalid_api_key`
/// is the status its REST API gives a bad key, SillyTavern/SillyTavern#4483). With no text
/// message (keepalives count) for `inactivity_timeout` seconds (query parameter, default 20,
/// max 180; `providers.md` §3.1), the socket gets `input_timeout_exceeded` and a 1008 close
/// (message text as elevenlabs/elevenlabs-docs#426 and livekit/agents#218 quote it);
/// [`TtsFake::inactivity_timeout`] shortens that for a test.
pub(crate) struct TtsFake {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<TtsLog>>,
    inactivity: Arc<Mutex<Option<Duration>>>,
}

impl TtsFake {
    pub(crate) async fn start(clip: Recording, fail: bool) -> Self {
        Self::start_with(clip, fail, Duration::ZERO).await
    }

    /// Like [`Self::start`], each connection's upgrade taking `handshake` (what TCP + TLS +
    /// the HTTP upgrade cost over the internet).
    pub(crate) async fn start_with(clip: Recording, fail: bool, handshake: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(TtsLog::default()));
        let inactivity = Arc::new(Mutex::new(None));
        let (l, i) = (log.clone(), inactivity.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (l, clip) = (l.clone(), clip.clone());
                let idle = *i.lock().unwrap();
                tokio::spawn(async move {
                    tokio::time::sleep(handshake).await;
                    serve_tts(stream, l, clip, fail, idle).await
                });
            }
        });
        TtsFake {
            addr,
            log,
            inactivity,
        }
    }

    /// Sockets opened from now on close after `d` without a text message, whatever
    /// `inactivity_timeout` asks for (`None`: as asked, default 20 s).
    pub(crate) fn inactivity_timeout(&self, d: Option<Duration>) {
        *self.inactivity.lock().unwrap() = d;
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

/// `clip` at `rate_hz` (exact for the 8 kHz fixtures at 8 or 16 kHz).
pub(crate) fn clip_at(clip: &Recording, rate_hz: u32) -> Vec<i16> {
    voicegate::caller::resample_recording(clip, rate_hz)
        .unwrap()
        .samples
}

async fn serve_tts(
    stream: TcpStream,
    log: Arc<Mutex<TtsLog>>,
    clip: Recording,
    fail: bool,
    idle_override: Option<Duration>,
) {
    let (ws, uri, headers) = accept_ws(stream, None).await;
    let Some(mut ws) = ws else {
        return;
    };
    log.lock().unwrap().sockets += 1;
    let api_key = header(&headers, "xi-api-key").map(str::to_owned);
    if api_key.as_deref() != Some(KEY) {
        log.lock().unwrap().errors.push("invalid xi-api-key".into());
        let m = r#"{"message":"Invalid API key","error":"invalid_api_key","code":1008}"#;
        let _ = ws.send(Message::text(m)).await;
        let _ = ws
            .close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: "Invalid API key".into(),
            }))
            .await;
        return;
    }
    let idle_s: f64 = query(&uri, "inactivity_timeout")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20.0f64)
        .min(180.0);
    let idle = idle_override.unwrap_or(Duration::from_secs_f64(idle_s));
    let model = query(&uri, "model_id").unwrap_or_default();
    let refusal = if !uri.contains("/multi-stream-input") {
        Some("not the multi-stream-input endpoint")
    } else if model == "eleven_v3" {
        Some("Multi-context WebSockets are not available for the eleven_v3 model")
    } else if query(&uri, "language_code").is_some() && !LANGUAGE_MODELS.contains(&model.as_str()) {
        Some("language_code is not supported for this model")
    } else {
        None
    };
    if let Some(why) = refusal {
        log.lock().unwrap().errors.push(why.into());
        let m = serde_json::json!({"message": why, "error": "invalid_request", "code": 1008});
        let _ = ws.send(Message::text(m.to_string())).await;
        let _ = ws
            .close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: why.into(),
            }))
            .await;
        return;
    }
    let format = query(&uri, "output_format").unwrap_or_default();
    let (rate, ulaw) = match format.as_str() {
        "ulaw_8000" => (8000, true),
        f => (
            f.strip_prefix("pcm_")
                .and_then(|r| r.parse().ok())
                .unwrap_or(16000),
            false,
        ),
    };
    let samples = clip_at(&clip, rate);
    let mut wire = Vec::new();
    if ulaw {
        Law::Ulaw.encode_into(&samples, &mut wire);
    } else {
        voicegate::audio::slin_to_le_bytes(&samples, &mut wire);
    }
    let bytes_per_100ms = if ulaw { 800 } else { rate as usize / 5 };
    let clip_ms = samples.len() as u64 * 1000 / rate as u64;
    // context id → (index in the log, open)
    let mut contexts: std::collections::HashMap<String, (usize, bool)> = Default::default();
    let refuse = |why: String| {
        let m = serde_json::json!({"message": why, "error": "invalid_request", "code": 1008});
        m.to_string()
    };
    let mut last_text = Instant::now();
    loop {
        let msg = match tokio::time::timeout_at(last_text + idle, ws.next()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(_) => {
                let m = serde_json::json!({"message": format!("Have not received a new text input within the timeout of {idle_s:.1} seconds. Streaming input terminated. Please make sure to either feed the input in the timely manner, or to send the end of input text (empty string \"\") when done."),
                    "error": "input_timeout_exceeded", "code": 1008});
                log.lock().unwrap().timed_out += 1;
                let _ = ws.send(Message::text(m.to_string())).await;
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::Policy,
                        reason: "input_timeout_exceeded".into(),
                    }))
                    .await;
                break;
            }
        };
        let text = match msg {
            Ok(Message::Text(t)) => t.as_str().to_owned(),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        last_text = Instant::now();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if v["close_socket"] == true {
            log.lock().unwrap().close_socket = true;
            let _ = ws.close(None).await;
            break;
        }
        let Some(id) = v["context_id"].as_str().map(str::to_owned) else {
            // `{"text":""}` keeps the socket alive; anything else needs a context.
            if v["text"] != "" {
                log.lock()
                    .unwrap()
                    .errors
                    .push(format!("message without context_id: {text}"));
            }
            continue;
        };
        let t = v["text"].as_str().map(str::to_owned);
        let idx = match contexts.get(&id) {
            Some(&(idx, true)) => idx,
            Some(&(_, false)) => {
                let why = format!("context {id} is closed");
                log.lock().unwrap().errors.push(why.clone());
                let _ = ws.send(Message::text(refuse(why))).await;
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::Policy,
                        reason: "".into(),
                    }))
                    .await;
                break;
            }
            None => {
                if contexts.values().filter(|(_, open)| *open).count() >= 5 {
                    let why = "Maximum of 5 concurrent contexts per connection".to_owned();
                    log.lock().unwrap().errors.push(why.clone());
                    let _ = ws.send(Message::text(refuse(why))).await;
                    let _ = ws
                        .close(Some(CloseFrame {
                            code: CloseCode::Policy,
                            reason: "".into(),
                        }))
                        .await;
                    break;
                }
                let mut l = log.lock().unwrap();
                l.conns.push(TtsConn {
                    uri: uri.clone(),
                    api_key: api_key.clone(),
                    init: Some(v.clone()),
                    ..TtsConn::default()
                });
                let idx = l.conns.len() - 1;
                if t.as_deref() != Some(" ") {
                    l.conns[idx].texts.push("<bad init>".into());
                }
                contexts.insert(id.clone(), (idx, true));
                continue;
            }
        };
        if v["close_context"] == true {
            contexts.insert(id.clone(), (idx, false));
            {
                let mut l = log.lock().unwrap();
                let c = &mut l.conns[idx];
                if !c.end_of_input {
                    c.closed_early = true;
                }
                c.final_sent = true;
            }
            let m = serde_json::json!({"isFinal": true, "contextId": id});
            let _ = ws.send(Message::text(m.to_string())).await;
            continue;
        }
        let Some(t) = t else {
            if v["flush"] == true {
                log.lock().unwrap().conns[idx].end_of_input = true;
            }
            continue;
        };
        if t.trim().is_empty() {
            continue; // a context keepalive
        }
        log.lock().unwrap().conns[idx].texts.push(t.clone());
        if fail {
            let _ = ws
                .send(Message::text(r#"{"message":"Quota exceeded for this API key","error":"quota_exceeded","code":1008}"#))
                .await;
            let _ = ws
                .close(Some(CloseFrame {
                    code: CloseCode::Policy,
                    reason: "quota exceeded".into(),
                }))
                .await;
            return;
        }
        // "Synthesize": the clip, with this text's characters spread over it.
        let chars: Vec<String> = t.chars().map(|c| c.to_string()).collect();
        let n = chars.len() as u64;
        let starts: Vec<u64> = (0..n).map(|i| i * clip_ms / n.max(1)).collect();
        let durs: Vec<u64> = (0..n).map(|_| clip_ms / n.max(1)).collect();
        for (i, piece) in wire.chunks(bytes_per_100ms).enumerate() {
            let mut m = serde_json::json!({"audio": b64(piece), "isFinal": null, "contextId": id});
            if i == 0 {
                let al = serde_json::json!({"chars": chars, "charStartTimesMs": starts, "charDurationsMs": durs});
                m["alignment"] = al.clone();
                m["normalizedAlignment"] = al;
            } else {
                m["alignment"] = serde_json::Value::Null;
            }
            if ws.send(Message::text(m.to_string())).await.is_err() {
                return;
            }
            log.lock().unwrap().conns[idx].audio_bytes += piece.len();
        }
    }
    let mut l = log.lock().unwrap();
    for &(idx, open) in contexts.values() {
        if open && !l.conns[idx].final_sent {
            l.conns[idx].closed_early = true;
        }
    }
}

// ---------------------------------------------------------------------------------------
// A caller whose line echoes what it hears
// ---------------------------------------------------------------------------------------

/// What the synthetic caller does.
pub(crate) struct EchoCaller {
    pub rate: SlinRate,
    /// The first thing the caller says, and when (ms from the call id).
    pub speech: Vec<i16>,
    pub speech_at_ms: u64,
    /// Said this long after the first audible agent audio (a barge-in), if set.
    pub barge: Option<(Vec<i16>, u64)>,
    /// The line returns `gain` × what the caller hears, `delay_ms` later.
    pub echo: Option<(f32, u64)>,
    /// Line noise RMS.
    pub noise_rms: f32,
    pub duration_ms: u64,
}

#[derive(Debug, Default)]
pub(crate) struct EchoReport {
    pub received: Vec<i16>,
    /// ms from the call id of each received frame that was audible (RMS > 64).
    pub audible_ms: Vec<u64>,
    pub first_audio_ms: Option<u64>,
    pub barge_at_ms: Option<u64>,
    pub hangup: bool,
}

impl EchoCaller {
    /// Runs the call; `first_audio` is told when the first audible agent frame arrives.
    pub(crate) async fn run(
        self,
        addr: SocketAddr,
        call_id: uuid::Uuid,
        first_audio: watch::Sender<Option<u64>>,
    ) -> EchoReport {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (mut reader, mut writer) = stream.into_split();
        let mut out = BytesMut::new();
        codec::encode(&AsMessage::CallId(call_id), &mut out);
        writer.write_all(&out).await.unwrap();
        let start = Instant::now();
        let spf = self.rate.samples_per_frame();
        let spms = self.rate.hz() as u64 / 1000;
        let mut report = EchoReport::default();
        let mut buf = BytesMut::new();
        let mut seed = 12345u32;
        let mut n: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let total = self.duration_ms / 20;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if n >= total { break; }
                    let t0 = n * 20;
                    let mut frame = vec![0i16; spf];
                    for (k, s) in frame.iter_mut().enumerate() {
                        let t = t0 * spms + k as u64;
                        let mut v = 0f32;
                        if let Some(i) = t.checked_sub(self.speech_at_ms * spms) {
                            v += self.speech.get(i as usize).copied().unwrap_or(0) as f32;
                        }
                        if let (Some((voice, _)), Some(at)) = (&self.barge, report.barge_at_ms) {
                            if let Some(i) = t.checked_sub(at * spms) {
                                v += voice.get(i as usize).copied().unwrap_or(0) as f32;
                            }
                        }
                        if let Some((gain, delay)) = self.echo {
                            if let Some(i) = t.checked_sub(delay * spms) {
                                v += report.received.get(i as usize).copied().unwrap_or(0) as f32 * gain;
                            }
                        }
                        seed ^= seed << 13; seed ^= seed >> 17; seed ^= seed << 5;
                        v += (seed as f32 / u32::MAX as f32 - 0.5) * self.noise_rms * 3.4;
                        *s = v.clamp(-32768.0, 32767.0) as i16;
                    }
                    out.clear();
                    codec::encode_audio_samples(self.rate, &frame, &mut out);
                    if writer.write_all(&out).await.is_err() { break; }
                    n += 1;
                }
                msg = read_message(&mut reader, &mut buf) => match msg {
                    Ok(Some(AsMessage::Audio { payload, .. })) => {
                        let now = start.elapsed().as_millis() as u64;
                        let mut s = Vec::new();
                        voicegate::audio::slin_from_le_bytes(&payload, &mut s);
                        // Align the received timeline with the sent one at the first frame.
                        if report.received.is_empty() {
                            report.received.resize(n as usize * spf, 0);
                        }
                        if voicegate::audio::rms(&s) > 64.0 {
                            report.audible_ms.push(now);
                            if report.first_audio_ms.is_none() {
                                report.first_audio_ms = Some(now);
                                let _ = first_audio.send(Some(now));
                                if let Some((_, after)) = &self.barge {
                                    report.barge_at_ms = Some(now + after);
                                }
                            }
                        }
                        report.received.extend_from_slice(&s);
                    }
                    Ok(Some(AsMessage::Hangup)) => { report.hangup = true; break; }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let _ = writer.shutdown().await;
        report
    }
}

// ---------------------------------------------------------------------------------------
// ElevenLabs TTS HTTP streaming fake (POST …/stream, raw audio body)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct HttpTtsRequest {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

/// Answers every `POST /v1/text-to-speech/{voice}/stream/with-timestamps?output_format=…`
/// with `clip` in that format, as newline-delimited JSON chunks in ElevenLabs' shape
/// (OpenAPI `StreamingAudioChunkWithTimestampsResponseModel`: `audio_base64`, `alignment` and
/// `normalized_alignment` with `characters`, `character_start_times_seconds`,
/// `character_end_times_seconds`), the text's characters spread over the clip. Refuses (400)
/// another path, and `language_code` for a model that takes none.
pub(crate) struct HttpTtsFake {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<HttpTtsRequest>>>,
}

impl HttpTtsFake {
    pub(crate) async fn start(clip: Recording) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        tokio::spawn(http::serve(listener, move |req: http::Request| {
            let (l, clip) = (l.clone(), clip.clone());
            async move { Some(serve_http_tts(req, &l, &clip)) }
        }));
        HttpTtsFake { addr, log }
    }
}

fn serve_http_tts(
    req: http::Request,
    l: &Mutex<Vec<HttpTtsRequest>>,
    clip: &Recording,
) -> http::Response {
    let path = req.target.clone();
    let headers: Vec<(String, String)> = req.headers.clone().into_iter().collect();
    l.lock().unwrap().push(HttpTtsRequest {
        path: path.clone(),
        headers,
        body: req.json(),
    });
    let format = query(&path, "output_format").unwrap_or_default();
    let (rate, ulaw) = match format.as_str() {
        "ulaw_8000" => (8000, true),
        f => (
            f.strip_prefix("pcm_")
                .and_then(|r| r.parse().ok())
                .unwrap_or(16000),
            false,
        ),
    };
    let req = l.lock().unwrap().last().cloned().unwrap();
    let model = req.body["model_id"].as_str().unwrap_or("").to_owned();
    let bad = if !path.contains("/stream/with-timestamps?") {
        Some("unknown path")
    } else if req.body.get("language_code").is_some() && !LANGUAGE_MODELS.contains(&model.as_str())
    {
        Some("language_code is not supported for this model")
    } else {
        None
    };
    if let Some(why) = bad {
        let body = serde_json::json!({"detail": {"status": "invalid_request", "message": why}});
        return http::json(400, body.to_string());
    }
    let samples = clip_at(clip, rate);
    let mut wire = Vec::new();
    if ulaw {
        Law::Ulaw.encode_into(&samples, &mut wire);
    } else {
        voicegate::audio::slin_to_le_bytes(&samples, &mut wire);
    }
    let clip_s = samples.len() as f64 / rate as f64;
    let text = req.body["text"].as_str().unwrap_or("").to_owned();
    let chars: Vec<String> = text.chars().map(|c| c.to_string()).collect();
    let n = chars.len().max(1) as f64;
    let starts: Vec<f64> = (0..chars.len()).map(|i| i as f64 * clip_s / n).collect();
    let ends: Vec<f64> = (1..=chars.len()).map(|i| i as f64 * clip_s / n).collect();
    let alignment = serde_json::json!({"characters": chars,
        "character_start_times_seconds": starts, "character_end_times_seconds": ends});
    let mut body = Vec::new();
    for (i, piece) in wire.chunks(bytes_per_chunk(ulaw, rate)).enumerate() {
        let mut m = serde_json::json!({"audio_base64": b64(piece), "alignment": null, "normalized_alignment": null});
        if i == 0 {
            m["alignment"] = alignment.clone();
            m["normalized_alignment"] = alignment.clone();
        }
        body.extend_from_slice(m.to_string().as_bytes());
        body.push(b'\n');
    }
    let (tx, resp) = http::streamed(200, &[("content-type", "application/json")]);
    tokio::spawn(async move {
        // Odd-sized chunks: lines split across HTTP chunks must survive.
        for piece in body.chunks(777) {
            if tx.send(bytes::Bytes::copy_from_slice(piece)).await.is_err() {
                return;
            }
        }
    });
    resp
}

/// The cascade's STT provider setting for a fake vendor.
pub(crate) fn provider(v: SttVendor) -> SttProvider {
    match v {
        SttVendor::Soniox => SttProvider::Soniox,
        SttVendor::Deepgram | SttVendor::Flux => SttProvider::Deepgram,
        SttVendor::ElevenLabs => SttProvider::Elevenlabs,
    }
}

/// A cascade on the three fakes: `vendor`'s STT, the Chat Completions fake (with an
/// `X-Title` extra header) and the ElevenLabs TTS fake, all with [`KEY`].
pub(crate) fn config(
    vendor: SttVendor,
    stt: &SttFake,
    llm: &LlmFake,
    tts: &TtsFake,
) -> CascadeConfig {
    let mut c = CascadeConfig::default();
    c.stt.provider = provider(vendor);
    c.stt.url = Some(stt.url(vendor));
    c.stt.api_key = Some(SecretSource::Inline(KEY.into()));
    c.stt.languages = vec!["en".into()];
    c.llm.url = llm.url();
    c.llm.api_key = SecretSource::Inline(KEY.into());
    c.llm.model = "test-model".into();
    c.llm.system_prompt = "You are a test agent.".into();
    c.llm
        .extra_headers
        .insert("X-Title".into(), "voicegate".into());
    c.tts.url = tts.url();
    c.tts.api_key = SecretSource::Inline(KEY.into());
    c.tts.voice_id = "voice1".into();
    c
}
