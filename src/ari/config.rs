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

/// How externalMedia carries the call's audio (Stasis mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AriMedia {
    /// `encapsulation=audiosocket&transport=tcp`: Asterisk connects to the AudioSocket
    /// listener (default).
    Audiosocket,
    /// `encapsulation=rtp&transport=udp`: one UDP socket per call from `ari.rtp_ports`,
    /// G.711 or L16 (docs/asterisk.md, "externalMedia over RTP").
    Rtp,
    /// `encapsulation=none&transport=websocket&connection_type=server`: Asterisk's
    /// `chan_websocket` waits and voicegate connects to its HTTP server at
    /// `<ari.url>/media/<connection id>` (Asterisk 20.18+/22.8+/23.2+; docs/asterisk.md,
    /// "externalMedia over WebSocket").
    Websocket,
}

impl AriMedia {
    /// The `encapsulation=` and `transport=` values of `POST /channels/externalMedia`.
    pub(crate) fn encapsulation(self) -> (&'static str, &'static str) {
        match self {
            AriMedia::Audiosocket => ("audiosocket", "tcp"),
            AriMedia::Rtp => ("rtp", "udp"),
            AriMedia::Websocket => ("none", "websocket"),
        }
    }
}

/// Audio format asked of externalMedia.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AriFormat {
    /// 16 kHz slin: AudioSocket kind `0x12`, 640-byte frames (needs Asterisk 20.17/22.7+);
    /// over RTP, L16/16000 big-endian, payload type 118.
    Slin16,
    /// 8 kHz slin, kind `0x10`, 320-byte frames (AudioSocket only).
    Slin,
    /// G.711 A-law, 8 kHz, RTP payload type 8 (RTP only).
    Alaw,
    /// G.711 μ-law, 8 kHz, RTP payload type 0 (RTP only).
    Ulaw,
}

impl AriFormat {
    /// The `format=` value of `POST /channels/externalMedia`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AriFormat::Slin16 => "slin16",
            AriFormat::Slin => "slin",
            AriFormat::Alaw => "alaw",
            AriFormat::Ulaw => "ulaw",
        }
    }

    /// Whether `media` can carry this format.
    pub(crate) fn fits(self, media: AriMedia) -> bool {
        match media {
            AriMedia::Audiosocket | AriMedia::Websocket => {
                matches!(self, AriFormat::Slin16 | AriFormat::Slin)
            }
            AriMedia::Rtp => matches!(self, AriFormat::Slin16 | AriFormat::Alaw | AriFormat::Ulaw),
        }
    }
}

/// Most ports `ari.rtp_ports` may span (one per concurrent RTP call).
pub(crate) const MAX_RTP_PORTS: u32 = 16_384;

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
    /// externalMedia transport: `audiosocket` (default), `rtp` or `websocket`.
    pub media: AriMedia,
    /// externalMedia format: `slin16` (default), `slin` (AudioSocket and WebSocket), `alaw`
    /// or `ulaw` (RTP only).
    pub format: AriFormat,
    /// With `media = "rtp"`: the UDP ports voicegate binds its per-call RTP sockets from,
    /// `"LOW-HIGH"` inclusive (default `"40000-40999"`; at most 16 384 ports, from 1024).
    /// A call finding every port busy goes to the operators. The address is the host of
    /// `external_host` (an IP address), else the AudioSocket listener's.
    pub rtp_ports: String,
    /// With `media = "rtp"`: most audio the jitter buffer holds, ms (default 300, 60–2000).
    pub rtp_jitter_max_ms: u64,
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
    /// Stasis mode: the channel variable that names a call's agent profile when
    /// `Stasis(app)` has no argument, e.g. `"VOICEGATE_PROFILE"`; read with one
    /// `GET /channels/{id}/variable` per call (within `lookup_timeout_ms`). Unset (the
    /// default): not read; `Stasis(app,<profile>)` still works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_variable: Option<String>,
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
            media: AriMedia::Audiosocket,
            format: AriFormat::Slin16,
            rtp_ports: "40000-40999".into(),
            rtp_jitter_max_ms: 300,
            stasis_only: false,
            transfer_context: "voicegate-transfer".into(),
            transfer_extension: "s".into(),
            transfer_priority: 1,
            request_timeout_ms: 2_000,
            transfer_confirm_ms: 3_000,
            lookup_timeout_ms: 500,
            profile_variable: None,
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
        if let Some(v) = &self.profile_variable
            && (v.is_empty()
                || v.len() > 80
                || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(ConfigError::invalid(
                "ari.profile_variable",
                format!("{v:?}: a channel variable name is 1 to 80 letters, digits or _"),
            ));
        }
        self.validate_connection()?;
        self.validate_names()?;
        self.validate_media()?;
        self.validate_timings()
    }

    /// `ari.media`, `ari.format`, `ari.rtp_ports`.
    fn validate_media(&self) -> Result<(), ConfigError> {
        if !self.format.fits(self.media) {
            return Err(ConfigError::invalid(
                "ari.format",
                match self.media {
                    AriMedia::Audiosocket => "must be slin16 or slin with media = \"audiosocket\"",
                    AriMedia::Websocket => "must be slin16 or slin with media = \"websocket\"",
                    AriMedia::Rtp => "must be alaw, ulaw or slin16 with media = \"rtp\"",
                },
            ));
        }
        self.rtp_port_range()?;
        if self.media == AriMedia::Websocket && self.mode != AriMode::Stasis {
            return Err(ConfigError::invalid(
                "ari.media",
                "\"websocket\" needs mode = \"stasis\" (externalMedia)",
            ));
        }
        if self.media == AriMedia::Rtp {
            if self.mode != AriMode::Stasis {
                return Err(ConfigError::invalid(
                    "ari.media",
                    "\"rtp\" needs mode = \"stasis\" (externalMedia)",
                ));
            }
            if let Some(h) = &self.external_host {
                let ip_ok = h.rsplit_once(':').is_some_and(|(host, _)| {
                    host.trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| !ip.is_unspecified())
                });
                if !ip_ok {
                    return Err(ConfigError::invalid(
                        "ari.external_host",
                        "with media = \"rtp\" its host must be an IP address voicegate can bind (the RTP sockets' address)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// `ari.rtp_ports` as an inclusive range.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] unless it is `"LOW-HIGH"` with 1024 ≤ LOW ≤ HIGH and at most
    /// [`MAX_RTP_PORTS`] ports.
    pub(crate) fn rtp_port_range(&self) -> Result<std::ops::RangeInclusive<u16>, ConfigError> {
        let bad = || {
            ConfigError::invalid(
                "ari.rtp_ports",
                format!(
                    "must be \"LOW-HIGH\" with 1024 <= LOW <= HIGH, at most {MAX_RTP_PORTS} ports"
                ),
            )
        };
        let (lo, hi) = self.rtp_ports.split_once('-').ok_or_else(bad)?;
        let (lo, hi) = (
            lo.trim().parse::<u16>().map_err(|_| bad())?,
            hi.trim().parse::<u16>().map_err(|_| bad())?,
        );
        if lo < 1024 || lo > hi || u32::from(hi - lo) + 1 > MAX_RTP_PORTS {
            return Err(bad());
        }
        Ok(lo..=hi)
    }

    /// [`Self::rtp_jitter_max_ms`] as a duration.
    pub(crate) fn rtp_jitter_max(&self) -> Duration {
        Duration::from_millis(self.rtp_jitter_max_ms)
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
            ("ari.rtp_jitter_max_ms", self.rtp_jitter_max_ms, 60, 2_000),
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
    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    /// [`Self::transfer_confirm_ms`] as a duration.
    pub(crate) fn transfer_confirm(&self) -> Duration {
        Duration::from_millis(self.transfer_confirm_ms)
    }
    /// [`Self::lookup_timeout_ms`] as a duration.
    pub(crate) fn lookup_timeout(&self) -> Duration {
        Duration::from_millis(self.lookup_timeout_ms)
    }
    /// [`Self::reconnect_initial_ms`] as a duration.
    pub(crate) fn reconnect_initial(&self) -> Duration {
        Duration::from_millis(self.reconnect_initial_ms)
    }
    /// [`Self::reconnect_max_ms`] as a duration.
    pub(crate) fn reconnect_max(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_ms)
    }
    /// [`Self::ping_interval_ms`] as a duration.
    pub(crate) fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }
    /// [`Self::reconcile_interval_ms`] as a duration.
    pub(crate) fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms)
    }
    /// [`Self::media_join_timeout_ms`] as a duration.
    pub(crate) fn media_join_timeout(&self) -> Duration {
        Duration::from_millis(self.media_join_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut AriConfig)) -> Result<(), ConfigError> {
        let mut c = AriConfig {
            password: SecretSource::Inline("pw".into()),
            ..AriConfig::default()
        };
        f(&mut c);
        c.validate()
    }

    fn key(r: Result<(), ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn websocket_media_takes_slin_in_stasis_mode() {
        for f in [AriFormat::Slin16, AriFormat::Slin] {
            assert!(with(|c| (c.media, c.format) = (AriMedia::Websocket, f)).is_ok());
        }
        for f in [AriFormat::Alaw, AriFormat::Ulaw] {
            assert_eq!(
                key(with(|c| (c.media, c.format) = (AriMedia::Websocket, f))),
                "ari.format"
            );
        }
        assert_eq!(
            key(with(
                |c| (c.media, c.mode) = (AriMedia::Websocket, AriMode::Lookup)
            )),
            "ari.media"
        );
        assert_eq!(
            AriMedia::Websocket.encapsulation(),
            ("none", "websocket"),
            "res/ari/resource_channels.c: encapsulation must be 'none' for websocket"
        );
        let c: AriConfig = toml::from_str("media = \"websocket\"").unwrap();
        assert_eq!(c.media, AriMedia::Websocket);
    }

    #[test]
    fn rtp_media_formats_ports_and_host() {
        assert!(with(|c| c.media = AriMedia::Rtp).is_ok(), "slin16 over RTP");
        for f in [AriFormat::Alaw, AriFormat::Ulaw] {
            assert!(with(|c| (c.media, c.format) = (AriMedia::Rtp, f)).is_ok());
            assert_eq!(
                key(with(|c| c.format = f)),
                "ari.format",
                "{f:?} over AudioSocket"
            );
        }
        assert_eq!(
            key(with(
                |c| (c.media, c.format) = (AriMedia::Rtp, AriFormat::Slin)
            )),
            "ari.format"
        );
        assert_eq!(
            key(with(
                |c| (c.media, c.mode) = (AriMedia::Rtp, AriMode::Lookup)
            )),
            "ari.media"
        );
        for bad in [
            "",
            "40000",
            "40000-",
            "900-1000",
            "5000-4000",
            "10000-40000",
            "a-b",
            "1024-70000",
        ] {
            assert_eq!(
                key(with(|c| c.rtp_ports = bad.into())),
                "ari.rtp_ports",
                "{bad}"
            );
        }
        let c = AriConfig::default();
        assert_eq!(c.rtp_port_range().unwrap(), 40_000..=40_999);
        assert!(
            with(|c| c.rtp_ports = "1024-17407".into()).is_ok(),
            "16 384 ports"
        );
        assert!(
            with(|c| (c.media, c.external_host) = (AriMedia::Rtp, Some("192.0.2.5:9092".into())))
                .is_ok()
        );
        assert!(
            with(|c| (c.media, c.external_host) = (AriMedia::Rtp, Some("[::1]:9092".into())))
                .is_ok()
        );
        for host in ["voicegate.example:9092", "0.0.0.0:9092"] {
            assert_eq!(
                key(with(
                    |c| (c.media, c.external_host) = (AriMedia::Rtp, Some(host.into()))
                )),
                "ari.external_host",
                "{host}"
            );
        }
        assert_eq!(
            key(with(|c| c.rtp_jitter_max_ms = 20)),
            "ari.rtp_jitter_max_ms"
        );
    }
}
