//! `[websocket]`: the listener Asterisk's WebSocket media channel connects to, and its
//! validation. Absent from the config = no listener (the default).

use crate::error::ConfigError;
use crate::secret::SecretSource;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

/// `[websocket]`.
///
/// ```toml
/// [websocket]
/// listen = "127.0.0.1:9093"              # what websocket_client.conf's uri points at
/// username = "asterisk"                  # websocket_client.conf username/password
/// password = { env = "VOICEGATE_WS_PASSWORD" }
/// ```
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChanWsConfig {
    /// Address to listen on (default `127.0.0.1:9093`). The source of each connection goes
    /// through the same guard as AudioSocket (`[guard] allow`).
    pub listen: SocketAddr,
    /// Time a new connection has for the HTTP upgrade and Asterisk's `MEDIA_START`, ms
    /// (default 2000; Asterisk sends `MEDIA_START` right after the upgrade).
    pub handshake_timeout_ms: u64,
    /// HTTP Basic user Asterisk must present (`username` in `websocket_client.conf`);
    /// needs [`Self::password`]. Absent = no authentication (the allowlist still applies).
    pub username: Option<String>,
    /// The password of [`Self::username`] (a secret source, see [`crate::secret`]).
    pub password: Option<SecretSource>,
    /// Largest WebSocket message accepted, bytes (default 65536: 20 ms of slin192 is 7680).
    pub max_message_bytes: usize,
    /// Asterisk's HTTP server for `Dial(WebSocket/INCOMING/...)` calls, e.g.
    /// `"http://127.0.0.1:8088"`: the dialplan announces a channel's connection id with
    /// `POST /v1/websocket/<id>` and voicegate connects to `<asterisk_url>/media/<id>`.
    /// Absent: `[ari] url` when `[ari]` is set, else such announcements are refused (404).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asterisk_url: Option<String>,
}

impl Default for ChanWsConfig {
    fn default() -> Self {
        ChanWsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9093)),
            handshake_timeout_ms: 2_000,
            username: None,
            password: None,
            max_message_bytes: 65_536,
            asterisk_url: None,
        }
    }
}

impl ChanWsConfig {
    /// [`Self::handshake_timeout_ms`] as a duration.
    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// Checks the ranges of the `websocket.*` keys.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(100..=60_000).contains(&self.handshake_timeout_ms) {
            return Err(ConfigError::invalid(
                "websocket.handshake_timeout_ms",
                "must be 100 to 60000",
            ));
        }
        if !(1_024..=1_048_576).contains(&self.max_message_bytes) {
            return Err(ConfigError::invalid(
                "websocket.max_message_bytes",
                "must be 1024 to 1048576",
            ));
        }
        if let Some(u) = &self.asterisk_url
            && let Err(e) = crate::chanws::client::media_url(u, "0")
        {
            return Err(ConfigError::invalid(
                "websocket.asterisk_url",
                format!("must be an http(s):// or ws(s):// URL: {e}"),
            ));
        }
        match (&self.username, &self.password) {
            (Some(u), Some(_)) if u.is_empty() || u.contains(':') => Err(ConfigError::invalid(
                "websocket.username",
                "must be non-empty and without ':' (HTTP Basic)",
            )),
            (Some(_), None) => Err(ConfigError::invalid(
                "websocket.password",
                "required with websocket.username",
            )),
            (None, Some(_)) => Err(ConfigError::invalid(
                "websocket.username",
                "required with websocket.password",
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ChanWsConfig, String> {
        let c: ChanWsConfig = toml::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults_are_valid_and_local() {
        let c = parse("").unwrap();
        assert_eq!(c.listen, "127.0.0.1:9093".parse().unwrap());
        assert_eq!(c.handshake_timeout(), Duration::from_secs(2));
        assert!(c.username.is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (toml, key) in [
            (
                "handshake_timeout_ms = 50",
                "websocket.handshake_timeout_ms",
            ),
            ("max_message_bytes = 10", "websocket.max_message_bytes"),
            ("username = \"a\"", "websocket.password"),
            ("password = \"p\"", "websocket.username"),
            ("username = \"a:b\"\npassword = \"p\"", "websocket.username"),
            ("asterisk_url = \"ftp://pbx\"", "websocket.asterisk_url"),
            ("asterisk_url = \"pbx:8088\"", "websocket.asterisk_url"),
        ] {
            let e = parse(toml).unwrap_err();
            assert!(e.contains(key), "{toml}: {e}");
        }
        assert!(
            parse("listen_on = \"x\"")
                .unwrap_err()
                .contains("unknown field")
        );
        parse("username = \"asterisk\"\npassword = { env = \"X\" }").unwrap();
        parse("asterisk_url = \"http://127.0.0.1:8088\"").unwrap();
    }
}
