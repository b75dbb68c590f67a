//! `[agent]` with `kind = "cascade"` and its sub-tables `[agent.stt]`, `[agent.llm]`,
//! `[agent.tts]`, `[agent.vad]`. Every key is documented in `examples/voicegate.toml`.

use crate::error::ConfigError;
use crate::secret::SecretSource;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// `[agent]` with `kind = "cascade"`: streaming STT → Chat Completions LLM → streaming TTS.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CascadeConfig {
    /// When set, the agent speaks first with this text (it also enters the history).
    pub greeting: Option<String>,
    /// `[agent.stt]`.
    pub stt: SttConfig,
    /// `[agent.llm]`.
    pub llm: LlmConfig,
    /// `[agent.tts]`.
    pub tts: TtsConfig,
    /// `[agent.vad]`.
    pub vad: VadConfig,
    /// `[agent.barge_in]`: local barge-in in the call (pause on the caller's voice at once);
    /// with it on, the STT's words confirm a barge-in rather than the `[agent.vad]` alone.
    pub barge_in: crate::audio::bargein::BargeInConfig,
}

/// Which streaming speech-to-text vendor (`providers.md` §4–§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SttProvider {
    /// Soniox real-time WebSocket (§5).
    Soniox,
    /// Deepgram live `/v1/listen` (§6).
    #[default]
    Deepgram,
    /// ElevenLabs Scribe realtime (§4).
    Elevenlabs,
}

impl SttProvider {
    /// Name used in logs and errors.
    pub(crate) fn name(self) -> &'static str {
        match self {
            SttProvider::Soniox => "soniox",
            SttProvider::Deepgram => "deepgram",
            SttProvider::Elevenlabs => "elevenlabs_stt",
        }
    }

    /// The vendor's WebSocket URL (without query).
    pub(crate) fn default_url(self) -> &'static str {
        match self {
            SttProvider::Soniox => "wss://stt-rt.soniox.com/transcribe-websocket",
            SttProvider::Deepgram => "wss://api.deepgram.com/v1/listen",
            SttProvider::Elevenlabs => "wss://api.elevenlabs.io/v1/speech-to-text/realtime",
        }
    }

    /// The default model.
    pub(crate) fn default_model(self) -> &'static str {
        match self {
            SttProvider::Soniox => "stt-rt-v4",
            SttProvider::Deepgram => "nova-3",
            SttProvider::Elevenlabs => "scribe_v2_realtime",
        }
    }

    /// The environment variable the API key is read from by default.
    pub(crate) fn default_key_env(self) -> &'static str {
        match self {
            SttProvider::Soniox => "SONIOX_API_KEY",
            SttProvider::Deepgram => "DEEPGRAM_API_KEY",
            SttProvider::Elevenlabs => "ELEVENLABS_API_KEY",
        }
    }
}

/// `[agent.stt]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SttConfig {
    /// `soniox`, `deepgram` (default) or `elevenlabs`.
    pub provider: SttProvider,
    /// WebSocket URL without query; default: the vendor's public endpoint.
    pub url: Option<String>,
    /// API key; default `{ env = "SONIOX_API_KEY" | "DEEPGRAM_API_KEY" | "ELEVENLABS_API_KEY" }`.
    pub api_key: Option<SecretSource>,
    /// Model; default `stt-rt-v4` (Soniox), `nova-3` (Deepgram), `scribe_v2_realtime`. A
    /// Deepgram `flux-…` model (`flux-general-en`, `flux-general-multi`) uses Deepgram Flux
    /// on `/v2/listen`, the turn-taking model Deepgram recommends for voice agents.
    pub model: Option<String>,
    /// Languages, ISO 639-1 (`["ru", "uk", "en"]`). Soniox: `language_hints` (empty: it
    /// detects). Deepgram: `language` when one is given (`"multi"` for nova-3 multilingual,
    /// which covers uk and ru among 55 languages), `language=multi` plus one `language_hint`
    /// per language when several; empty sends `language=en` (Deepgram's own default: it does
    /// NOT detect the language unless asked for `multi`). ElevenLabs: `language_code` when
    /// one is given, automatic detection otherwise.
    pub languages: Vec<String>,
    /// Words the caller is likely to say that the STT should not miss (names, brands, tyre
    /// sizes). Deepgram: one `keyterm` each (nova-3 models only; developers.deepgram.com
    /// `docs/keyterm`); Soniox: `context.terms` (soniox.com `stt/concepts/context`);
    /// ElevenLabs Scribe realtime: one `keyterms` query parameter each, at most
    /// [`SCRIBE_MAX_KEYTERMS`] terms of up to [`SCRIBE_MAX_KEYTERM_CHARS`] characters
    /// (elevenlabs.io keyterm-prompting guide; more is refused at start-up, exit 64).
    pub keyterms: Vec<String>,
    /// Send G.711 μ-law on 8 kHz calls (default true; half the bytes of slin, exact for phone
    /// audio); wideband calls always send PCM at the call rate.
    pub g711: bool,
    /// Silence that ends the caller's turn, ms (default 500): Deepgram `endpointing`, Soniox
    /// `max_endpoint_delay_ms` (raised to its 500 minimum), ElevenLabs
    /// `vad_silence_threshold_secs`.
    pub endpointing_ms: u32,
    /// Deepgram `utterance_end_ms`: end of turn on noisy lines (default 1000).
    pub utterance_end_ms: u32,
    /// Deepgram Flux `eager_eot_threshold`, 0.3–0.9; unset (the vendor's default): no eager
    /// mode. When set, Flux sends `EagerEndOfTurn` once it is this confident the caller has
    /// finished; the reply's LLM request starts then, is cancelled on `TurnResumed`, and is
    /// used when `EndOfTurn` confirms the same words (developers.deepgram.com
    /// `docs/flux/voice-agent-eager-eot`, `docs/flux/configuration`). The audio still waits
    /// for `EndOfTurn`. Lower is earlier and costs more LLM requests. Flux models only.
    pub eager_eot_threshold: Option<f32>,
    /// Connecting may take this long, ms (default 1500, so a
    /// provider that does not answer still leaves the caller time to reach a human within
    /// about 2 s).
    pub connect_timeout_ms: u64,
}

impl Default for SttConfig {
    fn default() -> Self {
        SttConfig {
            provider: SttProvider::default(),
            url: None,
            api_key: None,
            model: None,
            languages: Vec::new(),
            keyterms: Vec::new(),
            g711: true,
            endpointing_ms: 500,
            utterance_end_ms: 1000,
            eager_eot_threshold: None,
            connect_timeout_ms: 1_500,
        }
    }
}

impl SttConfig {
    /// The URL in effect.
    pub fn url(&self) -> &str {
        self.url.as_deref().unwrap_or(self.provider.default_url())
    }
    /// The model in effect.
    pub fn model(&self) -> &str {
        self.model
            .as_deref()
            .unwrap_or(self.provider.default_model())
    }
    /// The API key source in effect.
    pub(crate) fn api_key(&self) -> SecretSource {
        self.api_key.clone().unwrap_or_else(|| SecretSource::Env {
            env: self.provider.default_key_env().into(),
        })
    }
    /// [`Self::connect_timeout_ms`] as a duration.
    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

/// Most `keyterms` Scribe realtime takes (elevenlabs.io `speech-to-text/keyterm-prompting`:
/// "Realtime (Scribe v2 Realtime): Max keyterms 50").
pub(crate) const SCRIBE_MAX_KEYTERMS: usize = 50;
/// Longest Scribe realtime keyterm, characters (same page: "Max characters per keyterm 20").
pub(crate) const SCRIBE_MAX_KEYTERM_CHARS: usize = 20;

/// `[agent.llm]`: an OpenAI-compatible Chat Completions endpoint (`providers.md` §7).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// Full URL of the endpoint (default `https://api.openai.com/v1/chat/completions`;
    /// OpenRouter: `https://openrouter.ai/api/v1/chat/completions`).
    pub url: String,
    /// Bearer key (default `{ env = "OPENAI_API_KEY" }`).
    pub api_key: SecretSource,
    /// Model id (default `gpt-4o-mini`; OpenRouter ids are vendor-prefixed).
    pub model: String,
    /// System prompt, inline. Ignored when `system_prompt_file` is set.
    pub system_prompt: String,
    /// System prompt from a file (UTF-8 text).
    pub system_prompt_file: Option<PathBuf>,
    /// Sampling temperature; unset leaves it out of the request (reasoning models refuse it).
    pub temperature: Option<f32>,
    /// Most tokens per reply, sent as `max_completion_tokens`; unset leaves it out. The old
    /// key name `max_tokens` is still read.
    #[serde(alias = "max_tokens")]
    pub max_completion_tokens: Option<u32>,
    /// Extra request headers, e.g. OpenRouter's `HTTP-Referer` and `X-Title` (not secret).
    pub extra_headers: BTreeMap<String, String>,
    /// The response headers must arrive within this long, ms (default 10000).
    pub timeout_ms: u64,
    /// Further attempts after the endpoint refuses a request (connection refused, HTTP 429
    /// or 5xx overloaded), before any of the reply was streamed (default 1; 0: none).
    pub retries: u32,
    /// Wait before such a retry, ms, unless the server's `Retry-After` says otherwise (up to
    /// 2 s; a longer `Retry-After` means no retry) (default 250).
    pub retry_delay_ms: u64,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            url: "https://api.openai.com/v1/chat/completions".into(),
            api_key: SecretSource::Env {
                env: "OPENAI_API_KEY".into(),
            },
            model: "gpt-4o-mini".into(),
            system_prompt: "You answer the phone for a small business. Be brief and friendly; \
                            your words are spoken, so no lists or markup."
                .into(),
            system_prompt_file: None,
            temperature: None,
            max_completion_tokens: None,
            extra_headers: BTreeMap::new(),
            timeout_ms: 10_000,
            retries: 1,
            retry_delay_ms: 250,
        }
    }
}

impl LlmConfig {
    /// The system prompt: the file's text when `system_prompt_file` is set, else inline.
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read.
    pub(crate) fn load_system_prompt(&self) -> Result<String, ConfigError> {
        match &self.system_prompt_file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            }),
            None => Ok(self.system_prompt.clone()),
        }
    }
}

/// How text reaches ElevenLabs TTS (`providers.md` §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TtsMode {
    /// WebSocket `multi-stream-input`: one socket per call, one context per reply (default).
    #[default]
    Ws,
    /// HTTP `POST …/stream/with-timestamps`, one request per sentence.
    Http,
}

/// `[agent.tts]`: ElevenLabs text-to-speech.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtsConfig {
    /// Base URL (default `wss://api.elevenlabs.io`); `ws://`/`wss://` or `http://`/`https://`,
    /// the scheme is switched to suit `mode`.
    pub url: String,
    /// `xi-api-key` (default `{ env = "ELEVENLABS_API_KEY" }`).
    pub api_key: SecretSource,
    /// Voice id (default `21m00Tcm4TlvDq8ikWAM`, a stock voice).
    pub voice_id: String,
    /// Model id (default `eleven_flash_v2_5`, the lowest-latency multilingual model).
    pub model_id: String,
    /// `ws` (default) or `http`.
    pub mode: TtsMode,
    /// `language_code` sent to the model (e.g. `ru`); unset: the model detects. Sent only to
    /// models that take one (`eleven_flash_v2_5`, `eleven_turbo_v2_5`, `eleven_v3`; others
    /// answer 400), otherwise a warning at start-up.
    pub language_code: Option<String>,
    /// Voice `speed` (default 1.0; ElevenLabs accepts 0.7–1.2).
    pub speed: f32,
    /// Connecting (WS) or the response headers (HTTP) may take this long, ms (default 1500, so a
    /// provider that does not answer still leaves the caller time to reach a human within
    /// about 2 s).
    pub connect_timeout_ms: u64,
}

impl Default for TtsConfig {
    fn default() -> Self {
        TtsConfig {
            url: "wss://api.elevenlabs.io".into(),
            api_key: SecretSource::Env {
                env: "ELEVENLABS_API_KEY".into(),
            },
            voice_id: "21m00Tcm4TlvDq8ikWAM".into(),
            model_id: "eleven_flash_v2_5".into(),
            mode: TtsMode::Ws,
            language_code: None,
            speed: 1.0,
            connect_timeout_ms: 1_500,
        }
    }
}

/// `[agent.vad]`: the local barge-in detector, [`crate::audio::vad`].
pub(crate) use crate::audio::vad::VadConfig;

impl CascadeConfig {
    /// Checks ranges and that every secret and file can be read.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_stt()?;
        self.validate_llm_tts()?;
        self.validate_vad()?;
        self.barge_in.validate("agent.barge_in")
    }

    fn validate_stt(&self) -> Result<(), ConfigError> {
        if !ws_url(self.stt.url()) {
            return Err(ConfigError::invalid(
                "agent.stt.url",
                "must start with ws:// or wss://",
            ));
        }
        self.stt
            .api_key()
            .resolve()
            .map_err(|e| ConfigError::invalid("agent.stt.api_key", e.to_string()))?;
        if let Some(t) = self.stt.eager_eot_threshold {
            let flux = self.stt.provider == SttProvider::Deepgram
                && crate::agent::cascade::stt::flux::is_flux(self.stt.model());
            if !flux {
                return Err(ConfigError::invalid(
                    "agent.stt.eager_eot_threshold",
                    "only Deepgram Flux has EagerEndOfTurn: set provider = \"deepgram\" and a \
                     flux-… model, or remove it",
                ));
            }
            if !(0.3..=0.9).contains(&t) {
                return Err(ConfigError::invalid(
                    "agent.stt.eager_eot_threshold",
                    "must be 0.3 to 0.9 (Deepgram Flux)",
                ));
            }
        }
        if self.stt.provider == SttProvider::Elevenlabs {
            let k = &self.stt.keyterms;
            if k.len() > SCRIBE_MAX_KEYTERMS {
                return Err(ConfigError::invalid(
                    "agent.stt.keyterms",
                    format!(
                        "ElevenLabs Scribe realtime takes at most {SCRIBE_MAX_KEYTERMS} keyterms, {} given",
                        k.len()
                    ),
                ));
            }
            if let Some(long) = k
                .iter()
                .find(|t| t.chars().count() > SCRIBE_MAX_KEYTERM_CHARS)
            {
                return Err(ConfigError::invalid(
                    "agent.stt.keyterms",
                    format!(
                        "ElevenLabs Scribe realtime takes keyterms of at most \
                         {SCRIBE_MAX_KEYTERM_CHARS} characters: {long:?}"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_llm_tts(&self) -> Result<(), ConfigError> {
        if !(self.llm.url.starts_with("http://") || self.llm.url.starts_with("https://")) {
            return Err(ConfigError::invalid(
                "agent.llm.url",
                "must start with http:// or https://",
            ));
        }
        self.llm
            .api_key
            .resolve()
            .map_err(|e| ConfigError::invalid("agent.llm.api_key", e.to_string()))?;
        self.llm
            .load_system_prompt()
            .map_err(|e| ConfigError::invalid("agent.llm.system_prompt_file", e.to_string()))?;
        if let Some(t) = self.llm.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ConfigError::invalid(
                    "agent.llm.temperature",
                    "must be 0.0 to 2.0",
                ));
            }
        }
        let t = &self.tts.url;
        if !(ws_url(t) || t.starts_with("http://") || t.starts_with("https://")) {
            return Err(ConfigError::invalid(
                "agent.tts.url",
                "must start with ws://, wss://, http:// or https://",
            ));
        }
        self.tts
            .api_key
            .resolve()
            .map_err(|e| ConfigError::invalid("agent.tts.api_key", e.to_string()))?;
        if self.tts.mode == TtsMode::Ws && self.tts.model_id == "eleven_v3" {
            return Err(ConfigError::invalid(
                "agent.tts.model_id",
                "eleven_v3 has no multi-context WebSocket: set agent.tts.mode = \"http\"",
            ));
        }
        if self.tts.voice_id.is_empty() {
            return Err(ConfigError::invalid("agent.tts.voice_id", "must be set"));
        }
        Ok(())
    }

    fn validate_vad(&self) -> Result<(), ConfigError> {
        let v = &self.vad;
        if v.onset_ratio < 1.0 {
            return Err(ConfigError::invalid(
                "agent.vad.onset_ratio",
                "must be at least 1.0",
            ));
        }
        if !(0.0..=1.0).contains(&v.echo_return_max) {
            return Err(ConfigError::invalid(
                "agent.vad.echo_return_max",
                "must be 0.0 to 1.0",
            ));
        }
        if v.echo_window_ms > 2_000 || v.min_speech_ms > 2_000 || v.hang_ms > 5_000 {
            return Err(ConfigError::invalid(
                "agent.vad",
                "echo_window_ms and min_speech_ms at most 2000, hang_ms at most 5000",
            ));
        }
        Ok(())
    }
}

/// A WebSocket URL (`ws://` or `wss://`).
fn ws_url(u: &str) -> bool {
    u.starts_with("ws://") || u.starts_with("wss://")
}
