//! Soniox real-time STT (`providers.md` §5; soniox.com `api-reference/stt/websocket-api`):
//! the API key with the connection (`Authorization: Bearer <key>` on the upgrade, soniox.com
//! `guides/websocket-authentication`; `api_key` in the start message is deprecated and
//! refused from 15 January 2027), the config as the first text message, audio as binary
//! frames, tokens with `is_final`, `<end>` = end of turn.

use super::{Protocol, SttEvent};
use crate::agent::cascade::config::SttConfig;
use crate::audio::convert::WireFormat;
use crate::secret::Secret;
use bytes::Bytes;
use serde::Deserialize;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// The Soniox side of the wire.
#[derive(Debug)]
pub(crate) struct Soniox {
    url: String,
    key: Secret,
    model: String,
    languages: Vec<String>,
    keyterms: Vec<String>,
    endpoint_delay_ms: u32,
    format: WireFormat,
    /// Final text of the current turn.
    turn: String,
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    tokens: Vec<Token>,
    error_code: Option<serde_json::Value>,
    /// Stable error identifier, e.g. `limit_exceeded` (soniox.com `stt/rt/error-handling`).
    error_type: Option<String>,
    error_message: Option<String>,
}

#[derive(Deserialize)]
struct Token {
    text: String,
    #[serde(default)]
    is_final: bool,
}

impl Soniox {
    /// From `[agent.stt]`, the resolved key and the wire format.
    pub(crate) fn new(cfg: &SttConfig, key: Secret, format: WireFormat) -> Self {
        Soniox {
            url: cfg.url().to_owned(),
            key,
            model: cfg.model().to_owned(),
            languages: cfg.languages.clone(),
            keyterms: cfg.keyterms.clone(),
            endpoint_delay_ms: cfg.endpointing_ms.clamp(500, 3_000),
            format,
            turn: String::new(),
        }
    }
}

impl Protocol for Soniox {
    fn name(&self) -> &'static str {
        "soniox"
    }
    fn format(&self) -> WireFormat {
        self.format
    }
    fn url(&self) -> Result<String, String> {
        Ok(self.url.clone())
    }
    fn headers(&self) -> Vec<(&'static str, String)> {
        vec![("Authorization", format!("Bearer {}", self.key.expose()))]
    }
    fn first_message(&self) -> Option<String> {
        let (audio_format, rate) = match self.format {
            WireFormat::G711(crate::audio::g711::Law::Ulaw) => ("mulaw", 8_000),
            WireFormat::G711(crate::audio::g711::Law::Alaw) => ("alaw", 8_000),
            WireFormat::Pcm16 { rate_hz } => ("pcm_s16le", rate_hz),
        };
        let mut config = serde_json::json!({
            "model": self.model,
            "audio_format": audio_format,
            "sample_rate": rate,
            "num_channels": 1,
            "enable_endpoint_detection": true,
            "max_endpoint_delay_ms": self.endpoint_delay_ms,
        });
        if !self.languages.is_empty() {
            config["language_hints"] = serde_json::json!(self.languages);
        }
        if !self.keyterms.is_empty() {
            config["context"] = serde_json::json!({"terms": self.keyterms});
        }
        Some(config.to_string())
    }
    fn audio_message(&mut self, wire: Bytes) -> Message {
        Message::Binary(wire)
    }
    fn keepalive(&self) -> Option<(Duration, Message)> {
        Some((
            Duration::from_secs(5),
            Message::text(r#"{"type":"keepalive"}"#),
        ))
    }
    fn finalize_message(&self, trailing_silence_ms: u32) -> Option<Message> {
        // soniox.com stt/real-time-API/manual-finalization: all audio so far becomes final,
        // then a `<fin>` token; `trailing_silence_ms` is the silence already sent.
        Some(Message::text(
            serde_json::json!({"type": "finalize", "trailing_silence_ms": trailing_silence_ms})
                .to_string(),
        ))
    }
    fn end_message(&self) -> Option<Message> {
        // An empty frame ends the audio (§5.2).
        Some(Message::text(""))
    }
    fn restartable(&self, detail: &str) -> bool {
        // "503 Cannot continue request (code N). Please restart the request." (§5.3)
        detail.starts_with("error 503")
    }
    fn reset(&mut self) {
        self.turn.clear();
    }
    fn on_text(&mut self, text: &str, out: &mut Vec<SttEvent>) -> Result<(), String> {
        let r: Response = serde_json::from_str(text).map_err(|e| format!("bad response: {e}"))?;
        if let Some(code) = r.error_code {
            let kind = r.error_type.map(|t| format!(" {t}")).unwrap_or_default();
            return Err(format!(
                "error {code}{kind}: {}",
                r.error_message.unwrap_or_default()
            ));
        }
        let mut end = false;
        let mut interim = String::new();
        for t in &r.tokens {
            match (t.text.as_str(), t.is_final) {
                // `<end>`: Soniox's endpointing; `<fin>`: our finalize request answered.
                ("<end>" | "<fin>", _) => end = true,
                (s, true) => self.turn.push_str(s),
                (s, false) => interim.push_str(s),
            }
        }
        if end {
            let text = std::mem::take(&mut self.turn).trim().to_owned();
            // A `<fin>` after the `<end>` of the same words (or on noise) is no turn.
            if !text.is_empty() {
                out.push(SttEvent::EndOfTurn(text));
            }
        } else if !interim.is_empty() || !r.tokens.is_empty() {
            let now = format!("{}{}", self.turn, interim);
            if !now.trim().is_empty() {
                out.push(SttEvent::Interim(now.trim().to_owned()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_become_interim_and_end_of_turn() {
        let cfg = SttConfig {
            keyterms: vec!["R16".into()],
            ..SttConfig::default()
        };
        let mut s = Soniox::new(
            &cfg,
            Secret::new("k"),
            WireFormat::Pcm16 { rate_hz: 16_000 },
        );
        let first: serde_json::Value = serde_json::from_str(&s.first_message().unwrap()).unwrap();
        assert!(
            first.get("api_key").is_none(),
            "the key goes with the connection"
        );
        assert_eq!(s.headers(), [("Authorization", "Bearer k".to_owned())]);
        assert_eq!(first["audio_format"], "pcm_s16le");
        assert_eq!(first["context"], serde_json::json!({"terms": ["R16"]}));
        assert_eq!(first["sample_rate"], 16_000);
        let mut out = Vec::new();
        s.on_text(r#"{"tokens":[{"text":"Hi","is_final":false}],"final_audio_proc_ms":0,"total_audio_proc_ms":600}"#, &mut out).unwrap();
        s.on_text(
            r#"{"tokens":[{"text":"Hi","is_final":true},{"text":" there","is_final":false}]}"#,
            &mut out,
        )
        .unwrap();
        s.on_text(
            r#"{"tokens":[{"text":" there","is_final":true},{"text":"<end>","is_final":true}]}"#,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            vec![
                SttEvent::Interim("Hi".into()),
                SttEvent::Interim("Hi there".into()),
                SttEvent::EndOfTurn("Hi there".into()),
            ]
        );
        let e = s
            .on_text(
                r#"{"error_code":401,"error_message":"Invalid API key"}"#,
                &mut out,
            )
            .unwrap_err();
        assert!(e.contains("401") && e.contains("Invalid API key"), "{e}");
    }
}
