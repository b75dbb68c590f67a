//! The TOML configuration: parsing, defaults, validation.
//!
//! One file (`--config`, default `/etc/voicegate/voicegate.toml`); when the default file does
//! not exist the built-in defaults apply (AudioSocket on `127.0.0.1:9092`, the `echo` agent).
//! Every key is documented in `examples/voicegate.toml`. Unknown keys are errors, so a typo
//! never silently falls back to a default. Secrets are [`SecretSource`]s and never printed.

use crate::secret::SecretSource;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config is read from when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/voicegate/voicegate.toml";

/// Why a configuration cannot be used. The message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (toml names the key and line).
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, naming the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted key, e.g. `agent.delay_ms`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// A [`ConfigError::Invalid`] for `key`.
    pub fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[audiosocket]`: the listener Asterisk connects to.
    pub audiosocket: AudioSocketConfig,
    /// `[agent]`: which voice agent answers calls.
    pub agent: AgentConfig,
    /// `[log]`: logging.
    pub log: LogConfig,
    /// `[state]`: where state (call records, the AI budget) is kept.
    pub state: StateConfig,
    /// `[guard]`: allowlist, call limits, maximum call length, AI budget.
    pub guard: crate::guard::GuardConfig,
    /// `[fallback]`: maintenance switch, circuit breaker, agent-silence timer.
    pub fallback: crate::fallback::FallbackConfig,
    /// `[health]`: the `/health` and `/metrics` listener.
    pub health: crate::health::HealthConfig,
    /// `[records]`: call records.
    pub records: crate::records::RecordsConfig,
    /// `[[tools]]`: tools the agent can call (HTTP endpoints, `hangup`,
    /// `transfer_to_operator`); see [`crate::tools`].
    pub tools: Vec<crate::tools::ToolConfig>,
    /// `[ari]`: the Asterisk REST Interface (Stasis mode, caller lookup); absent = no ARI.
    pub ari: Option<AriConfig>,
    /// `[wireguard]`: the in-process WireGuard tunnel to a remote Asterisk (optional).
    pub wireguard: Option<crate::tunnel::WireGuardConfig>,
}

/// `[state]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// State directory; default `$STATE_DIRECTORY` (set by systemd's `StateDirectory=`),
    /// else `/var/lib/voicegate`.
    pub dir: Option<PathBuf>,
}

impl StateConfig {
    /// The state directory in force.
    pub fn dir(&self) -> PathBuf {
        if let Some(d) = &self.dir {
            return d.clone();
        }
        // systemd may pass several colon-separated directories; the first is ours.
        match std::env::var_os("STATE_DIRECTORY") {
            Some(v) => PathBuf::from(
                v.to_string_lossy()
                    .split(':')
                    .next()
                    .unwrap_or("/var/lib/voicegate"),
            ),
            None => PathBuf::from("/var/lib/voicegate"),
        }
    }
}

/// `[audiosocket]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioSocketConfig {
    /// Address to listen on for AudioSocket connections (default `127.0.0.1:9092`).
    pub listen: SocketAddr,
    /// How long a new connection may take to send its call id (`0x01`), ms (default 2000).
    pub call_id_timeout_ms: u64,
    /// On SIGTERM/SIGINT, how long live calls may go on before they are hung up, s (default 30).
    pub shutdown_grace_s: u64,
    /// Most agent audio the playout buffer holds per call, s (default 60); older audio is
    /// dropped and counted beyond that.
    pub playout_max_s: u64,
    /// A call with no audio from Asterisk for this long is closed, ms (default 5000;
    /// Asterisk itself gives up after 2000 ms of silence both ways).
    pub idle_timeout_ms: u64,
}

impl Default for AudioSocketConfig {
    fn default() -> Self {
        AudioSocketConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            call_id_timeout_ms: 2_000,
            shutdown_grace_s: 30,
            playout_max_s: 60,
            idle_timeout_ms: 5_000,
        }
    }
}

impl AudioSocketConfig {
    /// [`Self::call_id_timeout_ms`] as a duration.
    pub fn call_id_timeout(&self) -> Duration {
        Duration::from_millis(self.call_id_timeout_ms)
    }
    /// [`Self::shutdown_grace_s`] as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_s)
    }
    /// [`Self::playout_max_s`] as a duration.
    pub fn playout_max(&self) -> Duration {
        Duration::from_secs(self.playout_max_s)
    }
    /// [`Self::idle_timeout_ms`] as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

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
    pub fn delay(&self) -> Duration {
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
        }
    }
}

impl OpenAiRealtimeConfig {
    /// Refuses the removed `api = "preview"` (any `api` other than `ga`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `agent.api`, saying to use the GA shapes.
    pub fn check_api(&self) -> Result<(), ConfigError> {
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
    pub fn load_instructions(&self) -> Result<String, ConfigError> {
        match &self.instructions_file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            }),
            None => Ok(self.instructions.clone()),
        }
    }

    /// [`Self::connect_timeout_ms`] as a duration.
    pub fn connect_timeout(&self) -> Duration {
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
        }
    }
}

impl ElevenlabsAgentConfig {
    /// The prompt override: the file's text when `prompt_file` is set, else `prompt`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read.
    pub fn load_prompt(&self) -> Result<Option<String>, ConfigError> {
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
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Checks the values; keys in messages are relative to `[agent]`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        if !(100..=60_000).contains(&self.connect_timeout_ms) {
            return Err(ConfigError::invalid(
                "agent.connect_timeout_ms",
                "must be 100 to 60000",
            ));
        }
        Ok(())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (default; journald adds timestamps).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `voicegate=debug` (default `info`); the
    /// `RUST_LOG` environment variable overrides it.
    pub level: String,
    /// `text` (default) or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// How voicegate uses ARI (`asterisk.md`, "Three ways Asterisk hands a call to voicegate").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AriMode {
    /// Run the Stasis application: answer, bridge, externalMedia, transfer, hang up. Calls
    /// from the `AudioSocket()` app and channel driver are still accepted (unless
    /// `stasis_only`) and looked up as in `lookup`.
    Stasis,
    /// Only look up the caller of `AudioSocket()` / channel-driver calls (`GET /channels`).
    Lookup,
}

/// Audio format asked of externalMedia.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AriFormat {
    /// 16 kHz slin, AudioSocket kind `0x12`, 640-byte frames (needs Asterisk 20.17/22.7+).
    Slin16,
    /// 8 kHz slin, kind `0x10`, 320-byte frames.
    Slin,
}

impl AriFormat {
    /// The `format=` value of `POST /channels/externalMedia`.
    pub fn as_str(self) -> &'static str {
        match self {
            AriFormat::Slin16 => "slin16",
            AriFormat::Slin => "slin",
        }
    }
}

/// `[ari]`: the Asterisk REST Interface.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AriConfig {
    /// Asterisk's HTTP server, without `/ari` (default `http://127.0.0.1:8088`).
    pub url: String,
    /// ARI user from `ari.conf` (default `voicegate`).
    pub username: String,
    /// ARI password (default `{ env = "VOICEGATE_ARI_PASSWORD" }`).
    pub password: SecretSource,
    /// Stasis application name, as in `Stasis(voicegate)` (default `voicegate`).
    pub app: String,
    /// `stasis` (default) or `lookup`.
    pub mode: AriMode,
    /// `HOST:PORT` at which Asterisk reaches voicegate's AudioSocket listener, for
    /// externalMedia (default: `audiosocket.listen`; when `url` is a `[[wireguard.forward]]`,
    /// the tunnel address and the AudioSocket port, e.g. `10.0.0.2:9092`).
    pub external_host: Option<String>,
    /// externalMedia format: `slin16` (default) or `slin`.
    pub format: AriFormat,
    /// Accept only AudioSocket connections whose UUID voicegate created through ARI
    /// (default false: `AudioSocket()` and channel-driver calls are accepted too).
    pub stasis_only: bool,
    /// Dialplan context a transferred caller continues in (default `voicegate-transfer`).
    pub transfer_context: String,
    /// Extension in it (default `s`).
    pub transfer_extension: String,
    /// Priority (default 1).
    pub transfer_priority: u32,
    /// Each REST request may take this long, ms (default 2000).
    pub request_timeout_ms: u64,
    /// A transfer is confirmed by `StasisEnd` within this long, else retried once, ms
    /// (default 3000).
    pub transfer_confirm_ms: u64,
    /// Caller lookup for `AudioSocket()` calls may delay the call this long, ms (default 500).
    pub lookup_timeout_ms: u64,
    /// Events WebSocket: first reconnect delay, ms (default 500), doubled per failure.
    pub reconnect_initial_ms: u64,
    /// Events WebSocket: longest reconnect delay, ms (default 30000).
    pub reconnect_max_ms: u64,
    /// Events WebSocket: ping interval, ms (default 10000); no frame for two intervals
    /// means the link is dead.
    pub ping_interval_ms: u64,
    /// Stasis mode: reconcile with Asterisk's channel list at least this often, ms (default
    /// 30000); sooner, with backoff from 2 s, while a caller given up on waits for a retry.
    pub reconcile_interval_ms: u64,
    /// Stasis mode: wait this long for the externalMedia channel's own `StasisStart` before
    /// bridging it, ms (default 3000); past it the caller goes to the operators.
    pub media_join_timeout_ms: u64,
}

impl Default for AriConfig {
    fn default() -> Self {
        AriConfig {
            url: "http://127.0.0.1:8088".into(),
            username: "voicegate".into(),
            password: SecretSource::Env {
                env: "VOICEGATE_ARI_PASSWORD".into(),
            },
            app: "voicegate".into(),
            mode: AriMode::Stasis,
            external_host: None,
            format: AriFormat::Slin16,
            stasis_only: false,
            transfer_context: "voicegate-transfer".into(),
            transfer_extension: "s".into(),
            transfer_priority: 1,
            request_timeout_ms: 2_000,
            transfer_confirm_ms: 3_000,
            lookup_timeout_ms: 500,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 30_000,
            ping_interval_ms: 10_000,
            reconcile_interval_ms: 30_000,
            media_join_timeout_ms: 3_000,
        }
    }
}

impl AriConfig {
    /// Checks the section; `listen` is the AudioSocket listener (the default external host).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad `ari.*` key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://"))
            || reqwest::Url::parse(&self.url).is_err()
        {
            return Err(ConfigError::invalid(
                "ari.url",
                "must be an http:// or https:// URL",
            ));
        }
        if self.username.is_empty() || self.username.contains(':') {
            return Err(ConfigError::invalid(
                "ari.username",
                "must be non-empty without `:`",
            ));
        }
        self.password
            .resolve()
            .map_err(|e| ConfigError::invalid("ari.password", e.to_string()))?;
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !name_ok(&self.app) {
            return Err(ConfigError::invalid(
                "ari.app",
                "must be letters, digits, `-`, `_` or `.`",
            ));
        }
        if let Some(h) = &self.external_host {
            let ok = h
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::invalid(
                    "ari.external_host",
                    "must be HOST:PORT",
                ));
            }
        }
        if !name_ok(&self.transfer_context) {
            return Err(ConfigError::invalid(
                "ari.transfer_context",
                "must be a dialplan context name",
            ));
        }
        if self.transfer_extension.is_empty() {
            return Err(ConfigError::invalid(
                "ari.transfer_extension",
                "must not be empty",
            ));
        }
        if self.transfer_priority == 0 {
            return Err(ConfigError::invalid(
                "ari.transfer_priority",
                "must be at least 1",
            ));
        }
        for (key, v, lo, hi) in [
            (
                "ari.request_timeout_ms",
                self.request_timeout_ms,
                100,
                60_000,
            ),
            (
                "ari.transfer_confirm_ms",
                self.transfer_confirm_ms,
                100,
                60_000,
            ),
            ("ari.lookup_timeout_ms", self.lookup_timeout_ms, 50, 10_000),
            (
                "ari.reconnect_initial_ms",
                self.reconnect_initial_ms,
                10,
                60_000,
            ),
            ("ari.reconnect_max_ms", self.reconnect_max_ms, 100, 600_000),
            ("ari.ping_interval_ms", self.ping_interval_ms, 100, 600_000),
            (
                "ari.reconcile_interval_ms",
                self.reconcile_interval_ms,
                1_000,
                3_600_000,
            ),
            (
                "ari.media_join_timeout_ms",
                self.media_join_timeout_ms,
                100,
                30_000,
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(ConfigError::invalid(key, format!("must be {lo} to {hi}")));
            }
        }
        if self.reconnect_max_ms < self.reconnect_initial_ms {
            return Err(ConfigError::invalid(
                "ari.reconnect_max_ms",
                "must be at least ari.reconnect_initial_ms",
            ));
        }
        Ok(())
    }

    /// [`Self::request_timeout_ms`] as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    /// [`Self::transfer_confirm_ms`] as a duration.
    pub fn transfer_confirm(&self) -> Duration {
        Duration::from_millis(self.transfer_confirm_ms)
    }
    /// [`Self::lookup_timeout_ms`] as a duration.
    pub fn lookup_timeout(&self) -> Duration {
        Duration::from_millis(self.lookup_timeout_ms)
    }
    /// [`Self::reconnect_initial_ms`] as a duration.
    pub fn reconnect_initial(&self) -> Duration {
        Duration::from_millis(self.reconnect_initial_ms)
    }
    /// [`Self::reconnect_max_ms`] as a duration.
    pub fn reconnect_max(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_ms)
    }
    /// [`Self::ping_interval_ms`] as a duration.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    /// [`Self::reconcile_interval_ms`] as a duration.
    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms)
    }
    /// [`Self::media_join_timeout_ms`] as a duration.
    pub fn media_join_timeout(&self) -> Duration {
        Duration::from_millis(self.media_join_timeout_ms)
    }
}

impl Config {
    /// Parses TOML text; `path` is only used in messages.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] naming the key, or [`ConfigError::Invalid`] from validation.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: redact_secret_lines(text, e.to_string()),
        })?;
        // ARI through a tunnel forward: Asterisk reaches externalMedia at the tunnel address.
        if let (Some(wg), Some(ari)) = (&config.wireguard, &mut config.ari) {
            wg.default_ari_external_host(ari, config.audiosocket.listen.port());
        }
        config.validate()?;
        Ok(config)
    }

    /// Loads the config: `path` if given (it must exist), else [`DEFAULT_PATH`] if it exists,
    /// else the built-in defaults.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and key.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_toml(&text, &path),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// The URLs that would carry a secret in clear text to another machine: `(key, url)` for
    /// every `ws://` or `http://` URL sent an API key, password or secret header whose host
    /// is not loopback (`localhost`, `127.0.0.0/8`, `::1`). `voicegate run` warns about each
    /// at start and on reload.
    pub fn plaintext_secret_urls(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut check = |key: &str, url: &str| {
            if sends_in_clear_to_remote(url) {
                out.push((key.to_owned(), url.to_owned()));
            }
        };
        match &self.agent {
            AgentConfig::Echo(_) => {}
            AgentConfig::OpenaiRealtime(o) => check("agent.url", &o.url),
            AgentConfig::ElevenlabsAgent(e) => {
                if e.api_key.is_some() {
                    check("agent.signed_url_endpoint", &e.signed_url_endpoint);
                }
            }
            AgentConfig::Cascade(c) => {
                check("agent.stt.url", c.stt.url());
                check("agent.llm.url", &c.llm.url);
                check("agent.tts.url", &c.tts.url);
            }
        }
        if let Some(ari) = &self.ari {
            check("ari.url", &ari.url);
        }
        for t in &self.tools {
            if let (Some(url), false) = (&t.url, t.headers.is_empty()) {
                check(
                    &format!("tools.{}.url", t.name.as_deref().unwrap_or("?")),
                    url,
                );
            }
        }
        out
    }

    /// Checks ranges and that every secret and file the config names can be read.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.audiosocket;
        if !(100..=60_000).contains(&a.call_id_timeout_ms) {
            return Err(ConfigError::invalid(
                "audiosocket.call_id_timeout_ms",
                "must be 100 to 60000",
            ));
        }
        if !(1..=600).contains(&a.playout_max_s) {
            return Err(ConfigError::invalid(
                "audiosocket.playout_max_s",
                "must be 1 to 600",
            ));
        }
        if a.idle_timeout_ms < 500 {
            return Err(ConfigError::invalid(
                "audiosocket.idle_timeout_ms",
                "must be at least 500",
            ));
        }
        match &self.agent {
            AgentConfig::Echo(e) if e.delay_ms > 10_000 => {
                return Err(ConfigError::invalid(
                    "agent.delay_ms",
                    "must be at most 10000",
                ));
            }
            AgentConfig::Echo(_) => {}
            AgentConfig::Cascade(c) => c.validate()?,
            AgentConfig::OpenaiRealtime(o) => {
                o.check_api()?;
                if o.session_renew_s == 0 {
                    return Err(ConfigError::invalid(
                        "agent.session_renew_s",
                        "must be at least 1",
                    ));
                }
                if !(o.url.starts_with("ws://") || o.url.starts_with("wss://")) {
                    return Err(ConfigError::invalid(
                        "agent.url",
                        "must start with ws:// or wss://",
                    ));
                }
                o.api_key
                    .resolve()
                    .map_err(|e| ConfigError::invalid("agent.api_key", e.to_string()))?;
                o.load_instructions()
                    .map_err(|e| ConfigError::invalid("agent.instructions_file", e.to_string()))?;
                if !(0.0..=1.0).contains(&o.vad_threshold) {
                    return Err(ConfigError::invalid(
                        "agent.vad_threshold",
                        "must be 0.0 to 1.0",
                    ));
                }
            }
            AgentConfig::ElevenlabsAgent(e) => e.validate()?,
        }
        self.guard.validate()?;
        self.fallback.validate()?;
        self.records.validate()?;
        crate::tools::ToolRegistry::from_config(&self.tools)
            .map_err(|e| ConfigError::invalid("tools", e.to_string()))?;
        if let Some(ari) = &self.ari {
            ari.validate()?;
            if ari.mode == AriMode::Stasis
                && ari.external_host.is_none()
                && self.audiosocket.listen.ip().is_unspecified()
            {
                return Err(ConfigError::invalid(
                    "ari.external_host",
                    "required when audiosocket.listen is a wildcard address: the address Asterisk connects to for externalMedia",
                ));
            }
        }
        if let Some(wg) = &self.wireguard {
            wg.validate()?;
            if let Some(ari) = &self.ari {
                wg.check_ari(ari, self.audiosocket.listen.port())?;
            }
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(ConfigError::invalid(
                "log.level",
                "not a valid tracing filter",
            ));
        }
        Ok(())
    }

    /// The effective config as TOML, secrets redacted (for `voicegate check-config`).
    pub fn to_redacted_toml(&self) -> String {
        // Every field serializes: SecretSource writes a table with the value redacted.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// Whether `url` is `ws://` or `http://` to a host that is not loopback.
fn sends_in_clear_to_remote(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    if !matches!(u.scheme(), "ws" | "http") {
        return false;
    }
    let Some(host) = u.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => !ip.to_canonical().is_loopback(),
        Err(_) => !host.eq_ignore_ascii_case("localhost"),
    }
}

/// Words that make a TOML line hold a secret (matched case-insensitively inside the key).
const SECRET_KEY_WORDS: [&str; 6] = [
    "key",
    "password",
    "secret",
    "token",
    "authorization",
    "credential",
];

/// Whether a TOML line sets a secret-looking key (`api_key = …`, `password = …`,
/// `headers = { Authorization = … }`): the text before any `=` names one of
/// [`SECRET_KEY_WORDS`].
fn is_secret_line(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    // Every `key =` on the line (inline tables hold several).
    let mut keys = lower.split('=');
    let _value_of_last = keys.next_back();
    lower.contains('=') && keys.any(|k| SECRET_KEY_WORDS.iter().any(|w| k.contains(w)))
}

/// Removes from a TOML parse error `message` every line of `text` that holds a secret-looking
/// key, and that line's value wherever else it appears: toml quotes the offending line, and
/// serde may quote the value.
fn redact_secret_lines(text: &str, mut message: String) -> String {
    for line in text.lines().filter(|l| is_secret_line(l)) {
        let line = line.trim_end();
        if let Some((_, value)) = line.split_once('=') {
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            for piece in [value.trim(), line.trim()] {
                if piece.len() >= 4 && message.contains(piece) {
                    message = message.replace(piece, "<redacted>");
                }
            }
        }
        if message.contains(line) {
            message = message.replace(line, "<line redacted: it holds a secret>");
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14: a syntax error on (or naming) the line of an inline secret never prints it.
    #[test]
    fn parse_errors_never_print_a_secret() {
        let cases = [
            // Unterminated string on the key's own line.
            "[agent]\nkind = \"openai_realtime\"\napi_key = \"sk-live-SECRET123\n",
            // Garbage after the value.
            "[agent]\nkind = \"openai_realtime\"\napi_key = \"sk-live-SECRET123\" x\n",
            // A value of the wrong type, quoted back by serde.
            "[ari]\nusername = \"u\"\npassword = [\"sk-live-SECRET123\"]\n",
            // A secret header of an HTTP tool, in an inline table.
            "[[tools]]\nname = \"a\"\nheaders = { Authorization = \"Bearer sk-live-SECRET123\" \n",
            // WireGuard keys.
            "[wireguard]\nprivate_key = \"sk-live-SECRET123\" = 3\n",
        ];
        for text in cases {
            let e = Config::from_toml(text, Path::new("x.toml")).unwrap_err();
            let shown = e.to_string();
            assert!(matches!(e, ConfigError::Parse { .. }), "{shown}");
            assert!(!shown.contains("SECRET123"), "{shown}");
            assert!(shown.contains("line"), "still says where: {shown}");
        }
        // Lines without a secret are still quoted as toml prints them.
        let e = Config::from_toml("[audiosocket]\nlisten = 5 5\n", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("listen = 5 5"), "{e}");
    }

    #[test]
    fn plaintext_urls_to_remote_hosts_are_found() {
        assert!(sends_in_clear_to_remote("ws://10.0.0.5:8080/v1/realtime"));
        assert!(sends_in_clear_to_remote("http://api.example.com/x"));
        assert!(!sends_in_clear_to_remote(
            "wss://api.openai.com/v1/realtime"
        ));
        assert!(!sends_in_clear_to_remote("ws://127.0.0.1:9/x"));
        assert!(!sends_in_clear_to_remote("http://[::1]:9/x"));
        assert!(!sends_in_clear_to_remote("http://localhost:8088"));
        let c = Config::from_toml(
            "[agent]\nkind = \"openai_realtime\"\nurl = \"ws://192.0.2.7/v1\"\napi_key = \"k\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(
            c.plaintext_secret_urls(),
            vec![("agent.url".to_owned(), "ws://192.0.2.7/v1".to_owned())]
        );
        assert!(Config::default().plaintext_secret_urls().is_empty());
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml("", Path::new("x.toml")).unwrap();
        assert_eq!(c.audiosocket.listen, "127.0.0.1:9092".parse().unwrap());
        assert!(matches!(
            c.agent,
            AgentConfig::Echo(EchoConfig { delay_ms: 500 })
        ));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("[audiosocket]\nlisten_addr = \"x\"\n", Path::new("x.toml"))
            .unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        let e = Config::from_toml("[agent]\nkind = \"echo\"\ndelay = 3\n", Path::new("x.toml"))
            .unwrap_err();
        assert!(e.to_string().contains("delay"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::from_toml(
            "[agent]\nkind = \"echo\"\ndelay_ms = 99999\n",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("agent.delay_ms"), "{e}");
        let e = Config::from_toml(
            "[agent]\nkind = \"openai_realtime\"\napi_key = \"k\"\nurl = \"http://x\"\n",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("agent.url"), "{e}");
    }

    #[test]
    fn ari_section_defaults_and_errors() {
        let c = Config::from_toml("[ari]\npassword = \"pw\"\n", Path::new("x")).unwrap();
        let ari = c.ari.expect("ari section");
        assert_eq!(ari.mode, AriMode::Stasis);
        assert_eq!(ari.format, AriFormat::Slin16);
        assert_eq!(ari.transfer_context, "voicegate-transfer");
        assert!(Config::from_toml("", Path::new("x")).unwrap().ari.is_none());
        let c = Config::from_toml(
            "[ari]\npassword = \"ari-very-secret\"\nmode = \"lookup\"\nformat = \"slin\"\n",
            Path::new("x"),
        )
        .unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("ari-very-secret"), "{out}");
        assert!(out.contains("[ari]") && out.contains("lookup"), "{out}");
        for (text, key) in [
            ("[ari]\npassword = \"pw\"\nurl = \"ws://x\"\n", "ari.url"),
            (
                "[ari]\npassword = \"pw\"\nexternal_host = \"nohost\"\n",
                "ari.external_host",
            ),
            (
                "[ari]\npassword = \"pw\"\ntransfer_priority = 0\n",
                "ari.transfer_priority",
            ),
            (
                "[ari]\npassword = { env = \"VOICEGATE_SURELY_UNSET\" }\n",
                "ari.password",
            ),
            ("[ari]\npassword = \"pw\"\nmode = \"other\"\n", "mode"),
            (
                "[ari]\npassword = \"pw\"\nreconnect_max_ms = 20\n",
                "ari.reconnect_max_ms",
            ),
            (
                "[ari]\npassword = \"pw\"\nreconcile_interval_ms = 500\n",
                "ari.reconcile_interval_ms",
            ),
            (
                "[audiosocket]\nlisten = \"0.0.0.0:9092\"\n[ari]\npassword = \"pw\"\n",
                "ari.external_host",
            ),
        ] {
            let e = Config::from_toml(text, Path::new("x")).unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn redacted_output_hides_inline_secrets() {
        let c = Config::from_toml(
            "[agent]\nkind = \"openai_realtime\"\napi_key = \"sk-top-secret\"\n",
            Path::new("x"),
        )
        .unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("sk-top-secret"), "{out}");
        assert!(out.contains("openai_realtime"), "{out}");
        // And it parses back (minus the redacted secret, which becomes a table).
        assert!(out.contains("<redacted>"));
    }
}
