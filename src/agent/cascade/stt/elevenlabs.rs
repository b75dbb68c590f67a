//! ElevenLabs Scribe realtime STT (`providers.md` §4): `xi-api-key` header, parameters in the
//! query, audio as base64 inside `input_audio_chunk` JSON, server VAD commits segments
//! (`commit_strategy=vad`): a `committed_transcript` ends the caller's turn.

use super::{Protocol, SttEvent, push_segment};
use crate::agent::cascade::config::SttConfig;
use crate::audio::convert::WireFormat;
use crate::secret::Secret;
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// The ElevenLabs STT side of the wire.
#[derive(Debug)]
pub struct ElevenLabsStt {
    url: String,
    key: Secret,
    model: String,
    languages: Vec<String>,
    silence_ms: u32,
    format: WireFormat,
    /// Committed text of the current turn.
    turn: String,
    b64: String,
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
    pub fn new(cfg: &SttConfig, key: Secret, format: WireFormat) -> Self {
        ElevenLabsStt {
            url: cfg.url().to_owned(),
            key,
            model: cfg.model().to_owned(),
            languages: cfg.languages.clone(),
            silence_ms: cfg.endpointing_ms.clamp(300, 3_000),
            format,
            turn: String::new(),
            b64: String::with_capacity(512),
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
        Message::text(
            serde_json::json!({
                "message_type": "input_audio_chunk",
                "audio_base_64": self.b64,
                "commit": false,
                "sample_rate": self.format.rate_hz(),
            })
            .to_string(),
        )
    }
    fn keepalive(&self) -> Option<(Duration, Message)> {
        // None documented (§4): the call streams audio (or silence) continuously.
        None
    }
    fn end_message(&self) -> Option<Message> {
        None
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
                out.push(SttEvent::EndOfTurn(std::mem::take(&mut self.turn)));
            }
            "committed_transcript_with_timestamps" => {}
            other => {
                let detail = match m.error {
                    Some(serde_json::Value::String(s)) => s,
                    Some(v) => v.to_string(),
                    None => String::new(),
                };
                return Err(format!("{other}: {detail}"));
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
    }
}
