//! `[ari]`: the Asterisk REST Interface settings (Stasis mode, caller lookup) and their
//! validation.

use crate::error::ConfigError;
use crate::secret::SecretSource;
use serde::{Deserialize, Serialize};
use std::time::Duration;

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
        self.validate_connection()?;
        self.validate_names()?;
        self.validate_timings()
    }

    /// `ari.url`, `ari.username`, `ari.password`.
    fn validate_connection(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `ari.app`, `ari.external_host` and the transfer target.
    fn validate_names(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// The `ari.*_ms` ranges, and the reconnect cap not below its start.
    fn validate_timings(&self) -> Result<(), ConfigError> {
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
