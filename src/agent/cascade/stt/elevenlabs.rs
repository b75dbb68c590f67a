//! ElevenLabs Scribe realtime STT (`providers.md` §4; the contract is elevenlabs/packages
//! `schemas/scribe.asyncapi.yaml`): `xi-api-key` header, parameters in the query, audio as
//! base64 inside `input_audio_chunk` JSON, server VAD commits segments
//! (`commit_strategy=vad`): a `committed_transcript` ends the caller's turn.
//!
//! Only the error types the contract lists ([`ERROR_TYPES`]) are errors; any other message
//! type (informational ones such as `committed_transcript_with_timestamps`, or types added
//! later) is logged once at debug and skipped. At the end of the call a last
//! `input_audio_chunk` with `commit: true` asks for the final transcript.
//! `session_time_limit_exceeded` reconnects and carries on, sending the text so far as
//! `previous_text` with the first chunk (the contract allows it only there).

use super::{Protocol, SttEvent, push_segment};
use crate::agent::cascade::config::SttConfig;
use crate::audio::convert::WireFormat;
use crate::secret::Secret;
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

/// The `message_type`s the contract (`ScribeErrorPayload`) lists as errors.
pub(crate) const ERROR_TYPES: [&str; 13] = [
    "error",
    "auth_error",
    "quota_exceeded",
    "commit_throttled",
    "transcriber_error",
    "unaccepted_terms",
    "rate_limited",
    "input_error",
    "queue_overflow",
    "resource_exhausted",
    "session_time_limit_exceeded",
    "chunk_size_exceeded",
    "insufficient_audio_activity",
];

/// Committed text kept for `previous_text` after a reconnect, characters (the tail).
const PREVIOUS_TEXT_CHARS: usize = 500;

/// The ElevenLabs STT side of the wire.
#[derive(Debug)]
pub(crate) struct ElevenLabsStt {
    url: String,
    key: Secret,
    model: String,
    languages: Vec<String>,
    keyterms: Vec<String>,
    silence_ms: u32,
    format: WireFormat,
    /// Committed text of the current turn.
    turn: String,
    b64: String,
    /// Committed text of the call so far (its last [`PREVIOUS_TEXT_CHARS`]).
    history: String,
    /// The next audio chunk is the first of a new session after a reconnect.
    first_after_reconnect: bool,
    /// Unknown message types already logged.
    unknown_seen: Vec<String>,
}

#[derive(Deserialize)]
struct Msg {
    message_type: String,
    #[serde(default)]
    text: String,
    error: Option<serde_json::Value>,
}

impl ElevenLabsStt {
    /// From `[agent.stt]`, the resolved key and the wire format.
    pub(crate) fn new(cfg: &SttConfig, key: Secret, format: WireFormat) -> Self {
        ElevenLabsStt {
            url: cfg.url().to_owned(),
            key,
            model: cfg.model().to_owned(),
            languages: cfg.languages.clone(),
            keyterms: cfg.keyterms.clone(),
            silence_ms: cfg.endpointing_ms.clamp(300, 3_000),
            format,
            turn: String::new(),
            b64: String::with_capacity(512),
            history: String::new(),
            first_after_reconnect: false,
            unknown_seen: Vec::new(),
        }
    }

    fn audio_format(&self) -> String {
        match self.format {
            WireFormat::G711(_) => "ulaw_8000".into(),
            WireFormat::Pcm16 { rate_hz } => format!("pcm_{rate_hz}"),
        }
    }
}

impl Protocol for ElevenLabsStt {
    fn name(&self) -> &'static str {
        "elevenlabs_stt"
    }
    fn format(&self) -> WireFormat {
        self.format
    }
    fn url(&self) -> Result<String, String> {
        let mut url = reqwest::Url::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("model_id", &self.model)
                .append_pair("audio_format", &self.audio_format())
                .append_pair("commit_strategy", "vad")
                .append_pair(
                    "vad_silence_threshold_secs",
                    &format!("{:.1}", self.silence_ms as f32 / 1000.0),
                );
            if let [one] = self.languages.as_slice() {
                q.append_pair("language_code", one);
            }
            // One repeated `keyterms` parameter per term (elevenlabs-js
            // `wrapper/realtime/scribe.ts` buildWebSocketUri; elevenlabs.io keyterm-prompting
            // guide: "pass keyterms as query parameters"), at most 50 of up to 20 characters
            // (checked in `CascadeConfig::validate`).
            for k in &self.keyterms {
                q.append_pair("keyterms", k);
            }
        }
        Ok(url.into())
    }
    fn headers(&self) -> Vec<(&'static str, String)> {
        vec![("xi-api-key", self.key.expose().to_owned())]
    }
    fn first_message(&self) -> Option<String> {
        None
    }
    fn audio_message(&mut self, wire: Bytes) -> Message {
        self.b64.clear();
        base64::engine::general_purpose::STANDARD.encode_string(&wire, &mut self.b64);
        let mut chunk = serde_json::json!({
            "message_type": "input_audio_chunk",
            "audio_base_64": self.b64,
            "commit": false,
            "sample_rate": self.format.rate_hz(),
        });
        if std::mem::take(&mut self.first_after_reconnect) && !self.history.is_empty() {
            chunk["previous_text"] = serde_json::json!(self.history);
        }
        Message::text(chunk.to_string())
    }
    fn keepalive(&self) -> Option<(Duration, Message)> {
        // None documented (§4): the call streams audio (or silence) continuously.
        None
    }
    fn end_message(&self) -> Option<Message> {
        // Commits what was said since the last VAD commit, so its transcript is final.
        Some(Message::text(
            serde_json::json!({
                "message_type": "input_audio_chunk",
                "audio_base_64": "",
                "commit": true,
                "sample_rate": self.format.rate_hz(),
            })
            .to_string(),
        ))
    }
    fn restartable(&self, detail: &str) -> bool {
        // Sessions have a time limit; the call goes on in a new one.
        detail.starts_with("session_time_limit_exceeded")
    }
    fn reset(&mut self) {
        self.turn.clear();
        self.first_after_reconnect = true;
    }
    fn on_text(&mut self, text: &str, out: &mut Vec<SttEvent>) -> Result<(), String> {
        let m: Msg = serde_json::from_str(text).map_err(|e| format!("bad message: {e}"))?;
        match m.message_type.as_str() {
            "session_started" => {}
            "partial_transcript" | "final_transcript" => {
                let mut now = self.turn.clone();
                push_segment(&mut now, &m.text);
                if !now.is_empty() {
                    out.push(SttEvent::Interim(now));
                }
            }
            "committed_transcript" => {
                push_segment(&mut self.turn, &m.text);
                push_segment(&mut self.history, &m.text);
                if self.history.len() > PREVIOUS_TEXT_CHARS {
                    let mut cut = self.history.len() - PREVIOUS_TEXT_CHARS;
                    while !self.history.is_char_boundary(cut) {
                        cut += 1;
                    }
                    self.history.drain(..cut);
                }
                out.push(SttEvent::EndOfTurn(std::mem::take(&mut self.turn)));
            }
            kind if ERROR_TYPES.contains(&kind) => {
                let detail = match m.error {
                    Some(serde_json::Value::String(s)) => s,
                    Some(v) => v.to_string(),
                    None => String::new(),
                };
                return Err(format!("{kind}: {detail}"));
            }
            // committed_transcript_with_timestamps, final_transcript_with_timestamps,
            // committed_transcript_entities, and whatever comes next: not errors.
            other => {
                if !self.unknown_seen.iter().any(|k| k == other) {
                    debug!(message_type = other, "scribe message not used; skipped");
                    self.unknown_seen.push(other.to_owned());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_errors() {
        let cfg = SttConfig::default();
        let mut s = ElevenLabsStt::new(
            &cfg,
            Secret::new("k"),
            WireFormat::Pcm16 { rate_hz: 16_000 },
        );
        assert!(s.url().unwrap().contains("audio_format=pcm_16000"));
        let mut out = Vec::new();
        s.on_text(
            r#"{"message_type":"partial_transcript","text":"hel"}"#,
            &mut out,
        )
        .unwrap();
        s.on_text(
            r#"{"message_type":"committed_transcript","text":"hello"}"#,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            vec![
                SttEvent::Interim("hel".into()),
                SttEvent::EndOfTurn("hello".into())
            ]
        );
        let e = s
            .on_text(
                r#"{"message_type":"quota_exceeded","error":"out of credits"}"#,
                &mut out,
            )
            .unwrap_err();
        assert!(e.contains("quota_exceeded") && e.contains("out of credits"));
        // Informational and unknown types are skipped, not fatal.
        for t in [
            r#"{"message_type":"committed_transcript_with_timestamps","text":"hello","words":[]}"#,
            r#"{"message_type":"committed_transcript_entities","entities":[]}"#,
            r#"{"message_type":"something_new"}"#,
        ] {
            s.on_text(t, &mut out).unwrap();
        }
        assert_eq!(out.len(), 2);
        // The time limit asks for a new session, which gets the text so far once.
        let e = s
            .on_text(
                r#"{"message_type":"session_time_limit_exceeded","error":"limit"}"#,
                &mut out,
            )
            .unwrap_err();
        assert!(s.restartable(&e));
        s.reset();
        let chunk = |m: Message| -> serde_json::Value {
            serde_json::from_str(m.to_text().unwrap()).unwrap()
        };
        let first = chunk(s.audio_message(Bytes::from_static(&[0, 0])));
        assert_eq!(first["previous_text"], "hello");
        let next = chunk(s.audio_message(Bytes::from_static(&[0, 0])));
        assert!(next.get("previous_text").is_none());
        let end = chunk(s.end_message().unwrap());
        assert_eq!(end["commit"], true);
        assert_eq!(end["audio_base_64"], "");
    }
}
