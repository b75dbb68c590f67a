//! `[agent]`: which voice agent answers calls, each provider's settings and their validation.
//!
//! The cascade's settings live with it in `agent/cascade/config.rs`.

use crate::error::ConfigError;
use crate::secret::SecretSource;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// `[agent]`: the voice agent, selected by `kind`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // built once at start-up; boxing buys nothing
pub enum AgentConfig {
    /// `kind = "echo"`: plays the caller's voice back (diagnostic, no cloud).
    Echo(EchoConfig),
    /// `kind = "openai_realtime"`: OpenAI Realtime API over WebSocket.
    OpenaiRealtime(OpenAiRealtimeConfig),
    /// `kind = "elevenlabs_agent"`: ElevenLabs Agents (Conversational AI) over WebSocket.
    ElevenlabsAgent(ElevenlabsAgentConfig),
    /// `kind = "cascade"`: streaming STT → Chat Completions LLM → streaming TTS.
    Cascade(crate::agent::cascade::CascadeConfig),
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig::Echo(EchoConfig::default())
    }
}

/// `[agent]` with `kind = "echo"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EchoConfig {
    /// Delay before the caller hears themself, ms (default 500).
    pub delay_ms: u64,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig { delay_ms: 500 }
    }
}

impl EchoConfig {
    /// [`Self::delay_ms`] as a duration.
    pub(crate) fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms)
    }
}

/// How the OpenAI Realtime server finds the end of the caller's turn (openai-python
/// `types/realtime/realtime_audio_input_turn_detection_param.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnDetection {
    /// Silence-based VAD (`threshold`, `prefix_padding_ms`, `silence_duration_ms`,
    /// `idle_timeout_ms`); the default.
    #[default]
    ServerVad,
    /// A model judges whether the caller has finished (`eagerness`).
    SemanticVad,
}

/// `semantic_vad` eagerness: how soon the model answers (`low` lets the caller finish).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VadEagerness {
    /// The server's choice (medium).
    #[default]
    Auto,
    /// Waits longest.
    Low,
    /// Between.
    Medium,
    /// Answers soonest.
    High,
}

/// `audio.input.noise_reduction` (`near_field`: a handset or headset close to the mouth,
/// the usual phone; `far_field`: a speakerphone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseReduction {
    /// Close-talking microphone.
    NearField,
    /// Distant microphone (speakerphone, conference room).
    FarField,
}

/// `[agent]` with `kind = "openai_realtime"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiRealtimeConfig {
    /// WebSocket URL without the query (default `wss://api.openai.com/v1/realtime`); point it
    /// at a proxy or a local fake as needed.
    pub url: String,
    /// Model, sent as `?model=` (default `gpt-realtime`).
    pub model: String,
    /// API key (default `{ env = "OPENAI_API_KEY" }`).
    pub api_key: SecretSource,
    /// Removed: voicegate speaks only the GA Realtime shapes. OpenAI closed the preview
    /// (beta) interface in 2026 (a handshake with `OpenAI-Beta: realtime=v1` is refused with
    /// `beta_api_shape_disabled`), so `api = "preview"` is a config error (exit 64);
    /// `api = "ga"` is accepted and means nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// Voice (default `marin`; any GA voice: alloy, ash, ballad, cedar, coral, echo, marin,
    /// sage, shimmer, verse).
    pub voice: String,
    /// System instructions, inline. Ignored when `instructions_file` is set.
    pub instructions: String,
    /// System instructions from a file (UTF-8 text).
    pub instructions_file: Option<PathBuf>,
    /// When set, the agent speaks first with this greeting.
    pub greeting: Option<String>,
    /// Use G.711 μ-law on the wire when the call is 8 kHz (default true); otherwise, and for
    /// wideband calls, pcm16 at 24 kHz.
    pub g711: bool,
    /// `server_vad` (default) or `semantic_vad`.
    pub turn_detection: TurnDetection,
    /// `semantic_vad` only: `auto` (default), `low`, `medium` or `high`.
    pub vad_eagerness: VadEagerness,
    /// `near_field` or `far_field` input noise reduction; unset: none.
    pub noise_reduction: Option<NoiseReduction>,
    /// `server_vad` only: after this much silence from the caller once the agent has
    /// finished, the server asks the model to respond (it can prompt the caller), ms; unset:
    /// never.
    pub idle_timeout_ms: Option<u32>,
    /// `server_vad` with `idle_timeout_ms`: after this many prompts to a caller who stays
    /// silent, the agent says a short goodbye and the call ends (default 2).
    pub idle_prompts: u32,
    /// Language of the caller (ISO 639-1, e.g. `uk`) for the input transcription; unset:
    /// detected.
    pub transcription_language: Option<String>,
    /// A prompt guiding the input transcription (names, terms); unset: none.
    pub transcription_prompt: Option<String>,
    /// Server VAD: activation threshold 0.0–1.0 (default 0.5).
    pub vad_threshold: f32,
    /// Server VAD: audio kept before speech starts, ms (default 300).
    pub vad_prefix_padding_ms: u32,
    /// Server VAD: silence that ends the caller's turn, ms (default 500).
    pub vad_silence_duration_ms: u32,
    /// Model that transcribes the caller for the log and call record (default
    /// `gpt-4o-mini-transcribe`; empty disables).
    pub transcription_model: String,
    /// Connecting and receiving `session.created` may take this long, ms (default 1500, so a
    /// provider that does not answer still leaves the caller time to reach a human within
    /// about 2 s).
    pub connect_timeout_ms: u64,
    /// A call moves to a new session after this long, s (default 3300; OpenAI ends a session
    /// at 60 minutes with `session_expired`). At least 1.
    pub session_renew_s: u64,
    /// `[agent.barge_in]`: local barge-in (pause on the caller's voice, confirmed by
    /// `input_audio_buffer.speech_started` or the caller's transcript); on by default.
    pub barge_in: crate::audio::bargein::BargeInConfig,
}

impl Default for OpenAiRealtimeConfig {
    fn default() -> Self {
        OpenAiRealtimeConfig {
            url: "wss://api.openai.com/v1/realtime".into(),
            model: "gpt-realtime".into(),
            api_key: SecretSource::Env {
                env: "OPENAI_API_KEY".into(),
            },
            api: None,
            voice: "marin".into(),
            instructions: "You answer the phone for a small business. Be brief and friendly."
                .into(),
            instructions_file: None,
            greeting: None,
            g711: true,
            turn_detection: TurnDetection::ServerVad,
            vad_eagerness: VadEagerness::Auto,
            noise_reduction: None,
            idle_timeout_ms: None,
            idle_prompts: 2,
            transcription_language: None,
            transcription_prompt: None,
            vad_threshold: 0.5,
            vad_prefix_padding_ms: 300,
            vad_silence_duration_ms: 500,
            transcription_model: "gpt-4o-mini-transcribe".into(),
            connect_timeout_ms: 1_500,
            session_renew_s: 3_300,
            barge_in: Default::default(),
        }
    }
}

impl OpenAiRealtimeConfig {
    /// Refuses the removed `api = "preview"` (any `api` other than `ga`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `agent.api`, saying to use the GA shapes.
    pub(crate) fn check_api(&self) -> Result<(), ConfigError> {
        match self.api.as_deref() {
            None | Some("ga") => Ok(()),
            Some(other) => Err(ConfigError::invalid(
                "agent.api",
                format!(
                    "`{other}` is no longer supported: OpenAI removed the preview (beta) Realtime \
                     interface (it refuses `OpenAI-Beta: realtime=v1` with \
                     beta_api_shape_disabled); delete this line, voicegate speaks the GA shapes \
                     (a GA model such as gpt-realtime and a GA voice such as marin)"
                ),
            )),
        }
    }

    /// The instructions: the file's text when `instructions_file` is set, else `instructions`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read.
    pub(crate) fn load_instructions(&self) -> Result<String, ConfigError> {
        match &self.instructions_file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            }),
            None => Ok(self.instructions.clone()),
        }
    }

    /// [`Self::connect_timeout_ms`] as a duration.
    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

/// `[agent]` with `kind = "elevenlabs_agent"` (providers.md §2).
///
/// The agent's audio formats are set on the agent itself (dashboard or agent API:
/// `asr.user_input_audio_format`, `tts.agent_output_audio_format`); for phones choose
/// `ulaw_8000` both ways, or `pcm_16000`. voicegate reads the formats from the server's
/// `conversation_initiation_metadata` and converts to the call's slin.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElevenlabsAgentConfig {
    /// Conversation WebSocket URL without the query (default
    /// `wss://api.elevenlabs.io/v1/convai/conversation`; regional hosts or a local fake).
    pub url: String,
    /// The agent's id (required).
    pub agent_id: String,
    /// `xi-api-key` for a private agent: when set, each call first fetches a signed URL
    /// from `signed_url_endpoint` and connects to it. Unset: a public agent, reached with
    /// `agent_id` alone.
    pub api_key: Option<SecretSource>,
    /// Where signed URLs come from (default
    /// `https://api.elevenlabs.io/v1/convai/conversation/get-signed-url`).
    pub signed_url_endpoint: String,
    /// Override of the agent's system prompt (the agent must allow prompt overrides).
    pub prompt: Option<String>,
    /// The prompt override from a file (UTF-8); wins over `prompt`.
    pub prompt_file: Option<PathBuf>,
    /// Override of the agent's first message (the greeting). Like every override, it must be
    /// allowed in the agent's security settings, or the server closes with 1008
    /// (`override_error`) and the call falls back.
    pub first_message: Option<String>,
    /// Override of the agent's language (`ru`, `uk`, `en`, …); must be allowed too.
    pub language: Option<String>,
    /// Caller audio is sent in chunks of this many ms (default 40; 20 to 250).
    pub chunk_ms: u32,
    /// Connecting (including the signed URL) and receiving the
    /// `conversation_initiation_metadata` may take this long, ms (default 1500, so a
    /// provider that does not answer still leaves the caller time to reach a human within
    /// about 2 s).
    pub connect_timeout_ms: u64,
    /// `[agent.barge_in]`: local barge-in (pause on the caller's voice, confirmed by
    /// `interruption` or the caller's transcript); on by default.
    pub barge_in: crate::audio::bargein::BargeInConfig,
}

impl Default for ElevenlabsAgentConfig {
    fn default() -> Self {
        ElevenlabsAgentConfig {
            url: "wss://api.elevenlabs.io/v1/convai/conversation".into(),
            agent_id: String::new(),
            api_key: None,
            signed_url_endpoint: "https://api.elevenlabs.io/v1/convai/conversation/get-signed-url"
                .into(),
            prompt: None,
            prompt_file: None,
            first_message: None,
            language: None,
            chunk_ms: 40,
            connect_timeout_ms: 1_500,
            barge_in: Default::default(),
        }
    }
}

impl ElevenlabsAgentConfig {
    /// The prompt override: the file's text when `prompt_file` is set, else `prompt`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read.
    pub(crate) fn load_prompt(&self) -> Result<Option<String>, ConfigError> {
        match &self.prompt_file {
            Some(path) => {
                std::fs::read_to_string(path)
                    .map(Some)
                    .map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })
            }
            None => Ok(self.prompt.clone()),
        }
    }

    /// [`Self::connect_timeout_ms`] as a duration.
    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Checks the values; keys in messages are relative to `[agent]`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("ws://") || self.url.starts_with("wss://")) {
            return Err(ConfigError::invalid(
                "agent.url",
                "must start with ws:// or wss://",
            ));
        }
        if self.agent_id.is_empty() {
            return Err(ConfigError::invalid("agent.agent_id", "is required"));
        }
        if let Some(key) = &self.api_key {
            key.resolve()
                .map_err(|e| ConfigError::invalid("agent.api_key", e.to_string()))?;
            if !(self.signed_url_endpoint.starts_with("http://")
                || self.signed_url_endpoint.starts_with("https://"))
            {
                return Err(ConfigError::invalid(
                    "agent.signed_url_endpoint",
                    "must start with http:// or https://",
                ));
            }
        }
        self.load_prompt()
            .map_err(|e| ConfigError::invalid("agent.prompt_file", e.to_string()))?;
        if !(20..=250).contains(&self.chunk_ms) {
            return Err(ConfigError::invalid("agent.chunk_ms", "must be 20 to 250"));
        }
        self.barge_in.validate("agent.barge_in")?;
        if !(100..=60_000).contains(&self.connect_timeout_ms) {
            return Err(ConfigError::invalid(
                "agent.connect_timeout_ms",
                "must be 100 to 60000",
            ));
        }
        Ok(())
    }
}

impl AgentConfig {
    /// Checks the `agent.*` keys of the selected kind, and that its secrets and files can be
    /// read.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        match self {
            AgentConfig::Echo(e) if e.delay_ms > 10_000 => Err(ConfigError::invalid(
                "agent.delay_ms",
                "must be at most 10000",
            )),
            AgentConfig::Echo(_) => Ok(()),
            AgentConfig::Cascade(c) => c.validate(),
            AgentConfig::OpenaiRealtime(o) => o.validate(),
            AgentConfig::ElevenlabsAgent(e) => e.validate(),
        }
    }
}

impl OpenAiRealtimeConfig {
    /// Checks the `agent.*` keys of `kind = "openai_realtime"`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.check_api()?;
        if self.session_renew_s == 0 {
            return Err(ConfigError::invalid(
                "agent.session_renew_s",
                "must be at least 1",
            ));
        }
        if !(self.url.starts_with("ws://") || self.url.starts_with("wss://")) {
            return Err(ConfigError::invalid(
                "agent.url",
                "must start with ws:// or wss://",
            ));
        }
        self.api_key
            .resolve()
            .map_err(|e| ConfigError::invalid("agent.api_key", e.to_string()))?;
        self.load_instructions()
            .map_err(|e| ConfigError::invalid("agent.instructions_file", e.to_string()))?;
        if !(0.0..=1.0).contains(&self.vad_threshold) {
            return Err(ConfigError::invalid(
                "agent.vad_threshold",
                "must be 0.0 to 1.0",
            ));
        }
        self.barge_in.validate("agent.barge_in")?;
        Ok(())
    }
}
