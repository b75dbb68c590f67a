//! Deepgram live STT (`providers.md` §6; developers.deepgram.com `reference/listen-live`):
//! `Authorization: Token` header, parameters in the query, audio as binary frames, `Results`
//! with `is_final`/`speech_final`, `UtteranceEnd`.
//!
//! Language: Deepgram transcribes English when no `language` is sent ("All models default to
//! language=en", `docs/models`), so one is always sent: the configured one; `multi` with one
//! `language_hint` per language when several are configured (nova-3 multilingual, 55
//! languages including uk and ru; `docs/nova-3-language-prompting`); `en` when none is.

use super::{Protocol, SttEvent, push_segment};
use crate::agent::cascade::config::SttConfig;
use crate::audio::convert::WireFormat;
use crate::secret::Secret;
use bytes::Bytes;
use serde::Deserialize;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// The language sent when none is configured: what Deepgram would assume anyway, said out
/// loud.
pub(crate) const DEFAULT_LANGUAGE: &str = "en";

/// The Deepgram side of the wire.
#[derive(Debug)]
pub(crate) struct Deepgram {
    url: String,
    key: Secret,
    model: String,
    languages: Vec<String>,
    keyterms: Vec<String>,
    endpointing_ms: u32,
    utterance_end_ms: u32,
    format: WireFormat,
    /// Finalized text of the current turn.
    turn: String,
}

#[derive(Deserialize)]
struct Msg {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    is_final: bool,
    #[serde(default)]
    speech_final: bool,
    channel: Option<serde_json::Value>,
}

impl Deepgram {
    /// From `[agent.stt]`, the resolved key and the wire format.
    pub(crate) fn new(cfg: &SttConfig, key: Secret, format: WireFormat) -> Self {
        Deepgram {
            url: cfg.url().to_owned(),
            key,
            model: cfg.model().to_owned(),
            languages: cfg.languages.clone(),
            keyterms: cfg.keyterms.clone(),
            endpointing_ms: cfg.endpointing_ms,
            utterance_end_ms: cfg.utterance_end_ms.max(1000),
            format,
            turn: String::new(),
        }
    }
}

impl Protocol for Deepgram {
    fn name(&self) -> &'static str {
        "deepgram"
    }
    fn format(&self) -> WireFormat {
        self.format
    }
    fn url(&self) -> Result<String, String> {
        let (encoding, rate) = match self.format {
            WireFormat::G711(crate::audio::g711::Law::Ulaw) => ("mulaw", 8_000),
            WireFormat::G711(crate::audio::g711::Law::Alaw) => ("alaw", 8_000),
            WireFormat::Pcm16 { rate_hz } => ("linear16", rate_hz),
        };
        let mut url = reqwest::Url::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("model", &self.model)
                .append_pair("encoding", encoding)
                .append_pair("sample_rate", &rate.to_string())
                .append_pair("channels", "1")
                .append_pair("interim_results", "true")
                .append_pair("endpointing", &self.endpointing_ms.to_string())
                .append_pair("utterance_end_ms", &self.utterance_end_ms.to_string())
                .append_pair("vad_events", "true")
                .append_pair("smart_format", "true");
            match self.languages.as_slice() {
                [] => {
                    q.append_pair("language", DEFAULT_LANGUAGE);
                }
                [one] => {
                    q.append_pair("language", one);
                }
                several => {
                    q.append_pair("language", "multi");
                    for l in several.iter().filter(|l| l.as_str() != "multi") {
                        q.append_pair("language_hint", l);
                    }
                }
            }
            // Keyterm prompting is a nova-3 feature ("Only compatible with Nova-3").
            if self.model.starts_with("nova-3") {
                for k in &self.keyterms {
                    q.append_pair("keyterm", k);
                }
            }
        }
        Ok(url.into())
    }
    fn headers(&self) -> Vec<(&'static str, String)> {
        vec![("Authorization", format!("Token {}", self.key.expose()))]
    }
    fn first_message(&self) -> Option<String> {
        None
    }
    fn audio_message(&mut self, wire: Bytes) -> Message {
        Message::Binary(wire)
    }
    fn keepalive(&self) -> Option<(Duration, Message)> {
        Some((
            Duration::from_secs(3),
            Message::text(r#"{"type":"KeepAlive"}"#),
        ))
    }
    fn end_message(&self) -> Option<Message> {
        Some(Message::text(r#"{"type":"CloseStream"}"#))
    }
    fn on_text(&mut self, text: &str, out: &mut Vec<SttEvent>) -> Result<(), String> {
        let m: Msg = serde_json::from_str(text).map_err(|e| format!("bad message: {e}"))?;
        match m.kind.as_str() {
            "Results" => {
                let transcript = m
                    .channel
                    .as_ref()
                    .and_then(|c| c.pointer("/alternatives/0/transcript"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                if m.is_final {
                    push_segment(&mut self.turn, transcript);
                    if m.speech_final {
                        out.push(SttEvent::EndOfTurn(std::mem::take(&mut self.turn)));
                    } else if !self.turn.is_empty() {
                        out.push(SttEvent::Interim(self.turn.clone()));
                    }
                } else if !transcript.trim().is_empty() {
                    let mut now = self.turn.clone();
                    push_segment(&mut now, transcript);
                    out.push(SttEvent::Interim(now));
                }
            }
            "UtteranceEnd" if !self.turn.is_empty() => {
                out.push(SttEvent::EndOfTurn(std::mem::take(&mut self.turn)));
            }
            // SpeechStarted, Metadata: the cascade's own VAD handles barge-in.
            _ => {}
        }
        Ok(())
    }
    fn describe_close(&self, frame: Option<&CloseFrame>) -> String {
        // In-stream errors are close frames whose reason holds DATA-0000 / NET-0000 (§6.3).
        match frame {
            Some(f) if !f.reason.is_empty() => format!("closed the stream: {}", f.reason),
            Some(f) => format!("closed the stream (code {})", u16::from(f.code)),
            None => "closed the stream".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_results() {
        let cfg = SttConfig {
            languages: vec!["ru".into(), "uk".into()],
            ..SttConfig::default()
        };
        let mut d = Deepgram::new(
            &cfg,
            Secret::new("k"),
            WireFormat::G711(crate::audio::g711::Law::Ulaw),
        );
        let url = d.url().unwrap();
        assert!(url.contains("encoding=mulaw&sample_rate=8000"), "{url}");
        assert!(
            url.ends_with("language=multi&language_hint=ru&language_hint=uk"),
            "{url}"
        );
        let one = |languages: &[&str]| {
            let cfg = SttConfig {
                languages: languages.iter().map(|l| l.to_string()).collect(),
                ..SttConfig::default()
            };
            Deepgram::new(
                &cfg,
                Secret::new("k"),
                WireFormat::Pcm16 { rate_hz: 16_000 },
            )
            .url()
            .unwrap()
        };
        assert!(one(&[]).ends_with("language=en"), "explicit default");
        assert!(one(&["uk"]).ends_with("language=uk"));
        assert!(one(&["multi"]).ends_with("language=multi"));
        let cfg = SttConfig {
            keyterms: vec!["R16".into(), "Michelin".into()],
            ..SttConfig::default()
        };
        let url = Deepgram::new(
            &cfg,
            Secret::new("k"),
            WireFormat::Pcm16 { rate_hz: 16_000 },
        )
        .url()
        .unwrap();
        assert!(url.ends_with("&keyterm=R16&keyterm=Michelin"), "{url}");
        let cfg = SttConfig {
            model: Some("nova-2".into()),
            ..cfg
        };
        let url = Deepgram::new(
            &cfg,
            Secret::new("k"),
            WireFormat::Pcm16 { rate_hz: 16_000 },
        )
        .url()
        .unwrap();
        assert!(!url.contains("keyterm"), "nova-2 takes no keyterm: {url}");
        let mut out = Vec::new();
        let r = |t: &str, f: bool, sf: bool| {
            format!(
                r#"{{"type":"Results","channel_index":[0,1],"is_final":{f},"speech_final":{sf},"channel":{{"alternatives":[{{"transcript":"{t}","confidence":0.9,"words":[]}}]}}}}"#
            )
        };
        d.on_text(&r("book a", false, false), &mut out).unwrap();
        d.on_text(&r("book a table", true, false), &mut out)
            .unwrap();
        d.on_text(&r("for two", true, true), &mut out).unwrap();
        d.on_text(
            r#"{"type":"UtteranceEnd","channel":[0,1],"last_word_end":1.52}"#,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            vec![
                SttEvent::Interim("book a".into()),
                SttEvent::Interim("book a table".into()),
                SttEvent::EndOfTurn("book a table for two".into()),
            ]
        );
    }
}
