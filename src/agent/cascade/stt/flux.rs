//! Deepgram Flux (`/v2/listen`), the turn-taking model Deepgram recommends for voice agents
//! (developers.deepgram.com `docs/flux/quickstart`, `docs/flux/state`,
//! `docs/flux/configuration`): chosen with `provider = "deepgram"` and a `flux-…` model.
//!
//! `Authorization: Token` header, parameters in the query (`model`, `encoding=linear16`,
//! `sample_rate`, one `keyterm` per configured term; `language_hint` per language for
//! `flux-general-multi`), audio as binary frames, `{"type":"CloseStream"}` at the end.
//! The server speaks in `TurnInfo` messages whose `event` follows Flux's state machine:
//! `StartOfTurn`, `Update`, `EagerEndOfTurn`, `TurnResumed` carry the turn's transcript so
//! far (interim text); `EndOfTurn` ends the caller's turn. With `eager_eot_threshold` set,
//! `EagerEndOfTurn` and `TurnResumed` are also passed on as such, for the cascade to start
//! the reply's LLM early (`docs/flux/voice-agent-eager-eot`). `Connected` is informational;
//! an `Error` message fails the session.

use super::{Protocol, SttEvent};
use crate::agent::cascade::config::SttConfig;
use crate::audio::convert::WireFormat;
use crate::secret::Secret;
use bytes::Bytes;
use serde::Deserialize;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Whether `model` is a Flux model (served on `/v2/listen`).
pub(crate) fn is_flux(model: &str) -> bool {
    model.starts_with("flux")
}

/// The Flux side of the wire.
#[derive(Debug)]
pub(crate) struct Flux {
    url: String,
    key: Secret,
    model: String,
    languages: Vec<String>,
    keyterms: Vec<String>,
    eager_eot_threshold: Option<f32>,
    rate_hz: u32,
}

#[derive(Deserialize)]
struct Msg {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    event: String,
    #[serde(default)]
    transcript: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

impl Flux {
    /// From `[agent.stt]`, the resolved key and the call rate (Flux gets pcm16 at it).
    pub(crate) fn new(cfg: &SttConfig, key: Secret, rate_hz: u32) -> Self {
        // The configured URL is the v1 endpoint unless set otherwise; Flux lives on v2.
        let url = cfg.url().replace("/v1/listen", "/v2/listen");
        Flux {
            url,
            key,
            model: cfg.model().to_owned(),
            languages: cfg.languages.clone(),
            keyterms: cfg.keyterms.clone(),
            eager_eot_threshold: cfg.eager_eot_threshold,
            rate_hz,
        }
    }
}

impl Protocol for Flux {
    fn name(&self) -> &'static str {
        "deepgram"
    }
    fn format(&self) -> WireFormat {
        WireFormat::Pcm16 {
            rate_hz: self.rate_hz,
        }
    }
    fn url(&self) -> Result<String, String> {
        let mut url = reqwest::Url::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("model", &self.model)
                .append_pair("encoding", "linear16")
                .append_pair("sample_rate", &self.rate_hz.to_string());
            if self.model.ends_with("-multi") {
                for l in &self.languages {
                    q.append_pair("language_hint", l);
                }
            }
            for k in &self.keyterms {
                q.append_pair("keyterm", k);
            }
            if let Some(t) = self.eager_eot_threshold {
                q.append_pair("eager_eot_threshold", &format!("{t:.2}"));
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
        // The call streams audio (or silence) continuously.
        None
    }
    fn end_message(&self) -> Option<Message> {
        Some(Message::text(r#"{"type":"CloseStream"}"#))
    }
    fn on_text(&mut self, text: &str, out: &mut Vec<SttEvent>) -> Result<(), String> {
        let m: Msg = serde_json::from_str(text).map_err(|e| format!("bad message: {e}"))?;
        match (m.kind.as_str(), m.event.as_str()) {
            ("TurnInfo", "EndOfTurn") => {
                let t = m.transcript.trim();
                if !t.is_empty() {
                    out.push(SttEvent::EndOfTurn(t.to_owned()));
                }
            }
            // Always a nonempty transcript (`docs/flux/state`, rule 2).
            ("TurnInfo", "EagerEndOfTurn") => {
                let t = m.transcript.trim();
                if !t.is_empty() {
                    out.push(SttEvent::EagerEndOfTurn(t.to_owned()));
                }
            }
            ("TurnInfo", "TurnResumed") => {
                out.push(SttEvent::TurnResumed);
                let t = m.transcript.trim();
                if !t.is_empty() {
                    out.push(SttEvent::Interim(t.to_owned()));
                }
            }
            ("TurnInfo", _) => {
                let t = m.transcript.trim();
                if !t.is_empty() {
                    out.push(SttEvent::Interim(t.to_owned()));
                }
            }
            ("Error", _) => {
                let code = m.code.map(|c| c.to_string()).unwrap_or_default();
                return Err(format!(
                    "error {code}: {}",
                    m.description.unwrap_or_default()
                ));
            }
            // Connected, and whatever else: informational.
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_turn_events() {
        let cfg = SttConfig {
            model: Some("flux-general-multi".into()),
            languages: vec!["uk".into(), "ru".into()],
            keyterms: vec!["R16".into()],
            ..SttConfig::default()
        };
        let mut f = Flux::new(&cfg, Secret::new("k"), 8_000);
        assert!(is_flux("flux-general-en") && !is_flux("nova-3"));
        assert_eq!(
            f.url().unwrap(),
            "wss://api.deepgram.com/v2/listen?model=flux-general-multi&encoding=linear16&sample_rate=8000&language_hint=uk&language_hint=ru&keyterm=R16"
        );
        let mut out = Vec::new();
        let ti = |event: &str, t: &str| {
            format!(
                r#"{{"type":"TurnInfo","event":"{event}","turn_index":0,"audio_window_start":0.0,"audio_window_end":1.0,"transcript":"{t}","words":[],"end_of_turn_confidence":0.5}}"#
            )
        };
        f.on_text(
            r#"{"type":"Connected","request_id":"r1","sequence_id":0}"#,
            &mut out,
        )
        .unwrap();
        f.on_text(&ti("StartOfTurn", "book"), &mut out).unwrap();
        f.on_text(&ti("Update", "book a table"), &mut out).unwrap();
        f.on_text(&ti("EndOfTurn", "book a table"), &mut out)
            .unwrap();
        assert_eq!(
            out,
            vec![
                SttEvent::Interim("book".into()),
                SttEvent::Interim("book a table".into()),
                SttEvent::EndOfTurn("book a table".into()),
            ]
        );
        let e = f
            .on_text(
                r#"{"type":"Error","code":"INVALID_AUDIO","description":"bad audio"}"#,
                &mut out,
            )
            .unwrap_err();
        assert!(
            e.contains("INVALID_AUDIO") && e.contains("bad audio"),
            "{e}"
        );
    }

    #[test]
    fn eager_mode_asks_for_and_passes_on_eager_and_resumed() {
        let cfg = SttConfig {
            model: Some("flux-general-en".into()),
            eager_eot_threshold: Some(0.5),
            ..SttConfig::default()
        };
        let mut f = Flux::new(&cfg, Secret::new("k"), 8_000);
        assert!(
            f.url().unwrap().ends_with("&eager_eot_threshold=0.50"),
            "{}",
            f.url().unwrap()
        );
        let ti = |event: &str, t: &str| {
            format!(
                r#"{{"type":"TurnInfo","event":"{event}","turn_index":0,"audio_window_start":0.0,"audio_window_end":1.0,"transcript":"{t}","words":[],"end_of_turn_confidence":0.6}}"#
            )
        };
        let mut out = Vec::new();
        for (e, t) in [
            ("EagerEndOfTurn", "book"),
            ("TurnResumed", "book a"),
            ("EagerEndOfTurn", "book a table"),
            ("EndOfTurn", "book a table"),
        ] {
            f.on_text(&ti(e, t), &mut out).unwrap();
        }
        assert_eq!(
            out,
            vec![
                SttEvent::EagerEndOfTurn("book".into()),
                SttEvent::TurnResumed,
                SttEvent::Interim("book a".into()),
                SttEvent::EagerEndOfTurn("book a table".into()),
                SttEvent::EndOfTurn("book a table".into()),
            ]
        );
    }
}
