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
    /// `[wireguard]`: the in-process WireGuard tunnel to a remote Asterisk (optional).
    pub wireguard: Option<crate::tunnel::WireGuardConfig>,
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

/// Which generation of the OpenAI Realtime event names to speak (`providers.md` §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RealtimeApi {
    /// The GA API (`gpt-realtime`): `session.type`, `audio.input.format`,
    /// `response.output_audio.delta`.
    Ga,
    /// The beta/preview API (`OpenAI-Beta: realtime=v1`): `input_audio_format`,
    /// `response.audio.delta`.
    Preview,
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
    /// Event-name generation: `ga` (default) or `preview`.
    pub api: RealtimeApi,
    /// Voice (default `marin`; preview models know only the first eight of OpenAI's names).
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
    /// Server VAD: activation threshold 0.0–1.0 (default 0.5).
    pub vad_threshold: f32,
    /// Server VAD: audio kept before speech starts, ms (default 300).
    pub vad_prefix_padding_ms: u32,
    /// Server VAD: silence that ends the caller's turn, ms (default 500).
    pub vad_silence_duration_ms: u32,
    /// Model that transcribes the caller for the log and call record (default
    /// `gpt-4o-mini-transcribe`; empty disables).
    pub transcription_model: String,
    /// Connecting and receiving `session.created` may take this long, ms (default 5000).
    pub connect_timeout_ms: u64,
}

impl Default for OpenAiRealtimeConfig {
    fn default() -> Self {
        OpenAiRealtimeConfig {
            url: "wss://api.openai.com/v1/realtime".into(),
            model: "gpt-realtime".into(),
            api_key: SecretSource::Env {
                env: "OPENAI_API_KEY".into(),
            },
            api: RealtimeApi::Ga,
            voice: "marin".into(),
            instructions: "You answer the phone for a small business. Be brief and friendly."
                .into(),
            instructions_file: None,
            greeting: None,
            g711: true,
            vad_threshold: 0.5,
            vad_prefix_padding_ms: 300,
            vad_silence_duration_ms: 500,
            transcription_model: "gpt-4o-mini-transcribe".into(),
            connect_timeout_ms: 5_000,
        }
    }
}

impl OpenAiRealtimeConfig {
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

impl Config {
    /// Parses TOML text; `path` is only used in messages.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] naming the key, or [`ConfigError::Invalid`] from validation.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
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
            AgentConfig::OpenaiRealtime(o) => {
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
        }
        if let Some(wg) = &self.wireguard {
            wg.validate()?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
