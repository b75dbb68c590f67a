//! The TOML configuration: parsing, defaults, validation.
//!
//! One file (`--config`, default `/etc/voicegate/voicegate.toml`); when the default file does
//! not exist the built-in defaults apply (AudioSocket on `127.0.0.1:9092`, the `echo` agent).
//! Every key is documented in `examples/voicegate.toml`. Unknown keys are errors, so a typo
//! never silently falls back to a default. Secrets are [`SecretSource`](crate::secret::SecretSource)s and never printed.

pub use crate::agent::config::{AgentConfig, ElevenlabsAgentConfig, OpenAiRealtimeConfig};
pub use crate::agent::config::{EchoConfig, NoiseReduction, TurnDetection, VadEagerness};
pub use crate::ari::config::{AriConfig, AriFormat, AriMedia, AriMode};
pub use crate::audiosocket::config::AudioSocketConfig;
pub use crate::error::ConfigError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the config is read from when `--config` is not given.
pub(crate) const DEFAULT_PATH: &str = "/etc/voicegate/voicegate.toml";

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
    /// `[[webhooks]]`: where each call's event is POSTed, signed, through an on-disk outbox;
    /// see [`crate::webhooks`].
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    /// `[wireguard]`: the in-process WireGuard tunnel to a remote Asterisk (optional).
    pub wireguard: Option<crate::tunnel::WireGuardConfig>,
    /// `[console]`: the supervisors' web console on the health listener (off by default).
    pub console: crate::console::ConsoleConfig,
    /// `[websocket]`: the listener for Asterisk's WebSocket media channel
    /// (`Dial(WebSocket/...)`); absent = off.
    pub websocket: Option<crate::chanws::config::ChanWsConfig>,
    /// `[[profiles]]`: more agents besides the default `[agent]`, chosen per call; see
    /// [`crate::profiles`].
    pub profiles: Vec<crate::profiles::ProfileConfig>,
    /// `[profile_routing]`: the DID → profile map and what happens to calls with an unknown
    /// or no profile.
    pub profile_routing: crate::profiles::ProfileRoutingConfig,
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
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: redact_secret_lines(text, e.to_string()),
        })?;
        // ARI through a tunnel forward: Asterisk reaches externalMedia at the tunnel address.
        if let (Some(wg), Some(ari)) = (&config.wireguard, &mut config.ari) {
            wg.default_ari_external_host(
                &ari.url,
                &mut ari.external_host,
                config.audiosocket.listen.port(),
            );
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
    pub(crate) fn plaintext_secret_urls(&self) -> Vec<(String, String)> {
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
        let profile_tools = self.profiles.iter().flat_map(|p| &p.tools);
        for t in self.tools.iter().chain(profile_tools) {
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
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.audiosocket.validate()?;
        self.agent.validate()?;
        self.guard.validate()?;
        self.fallback.validate()?;
        self.records.validate()?;
        self.console.validate()?;
        crate::tools::validate_config(&self.tools)?;
        crate::webhooks::validate_config(&self.webhooks)?;
        crate::profiles::validate_config(&self.profiles, &self.profile_routing, &self.tools)?;
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
        if let Some(ws) = &self.websocket {
            ws.validate()?;
            if ws.listen == self.audiosocket.listen {
                return Err(ConfigError::invalid(
                    "websocket.listen",
                    "must differ from audiosocket.listen",
                ));
            }
        }
        if let Some(wg) = &self.wireguard {
            wg.validate()?;
            if let Some(ari) = &self.ari {
                if ari.media == AriMedia::Rtp && wg.forward_for_url(&ari.url).is_some() {
                    return Err(ConfigError::invalid(
                        "ari.media",
                        "\"rtp\" cannot reach an Asterisk behind the WireGuard tunnel (it carries TCP only): use \"audiosocket\"",
                    ));
                }
                wg.check_ari(
                    &ari.url,
                    ari.external_host.as_deref(),
                    self.audiosocket.listen.port(),
                )?;
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

    /// `[websocket]` is off unless present, validated when present, and may not share the
    /// AudioSocket port.
    #[test]
    fn websocket_section_is_off_by_default_and_checked() {
        let c = Config::from_toml("", Path::new("x.toml")).unwrap();
        assert!(c.websocket.is_none());
        let c = Config::from_toml("[websocket]\n", Path::new("x.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.websocket.unwrap().listen.port(), 9093);
        for (text, key) in [
            (
                "[websocket]\nhandshake_timeout_ms = 1\n",
                "websocket.handshake_timeout_ms",
            ),
            (
                "[websocket]\nlisten = \"127.0.0.1:9092\"\n",
                "websocket.listen",
            ),
        ] {
            let e = Config::from_toml(text, Path::new("x.toml"))
                .and_then(|c| c.validate())
                .unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }
}
