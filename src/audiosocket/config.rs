//! `[audiosocket]`: the AudioSocket listener's settings and their validation.

use crate::error::ConfigError;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

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
    pub(crate) fn call_id_timeout(&self) -> Duration {
        Duration::from_millis(self.call_id_timeout_ms)
    }
    /// [`Self::shutdown_grace_s`] as a duration.
    pub(crate) fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_s)
    }
    /// [`Self::playout_max_s`] as a duration.
    pub(crate) fn playout_max(&self) -> Duration {
        Duration::from_secs(self.playout_max_s)
    }
    /// [`Self::idle_timeout_ms`] as a duration.
    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

impl AudioSocketConfig {
    /// Checks the ranges of the `audiosocket.*` keys.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(100..=60_000).contains(&self.call_id_timeout_ms) {
            return Err(ConfigError::invalid(
                "audiosocket.call_id_timeout_ms",
                "must be 100 to 60000",
            ));
        }
        if !(1..=600).contains(&self.playout_max_s) {
            return Err(ConfigError::invalid(
                "audiosocket.playout_max_s",
                "must be 1 to 600",
            ));
        }
        if self.idle_timeout_ms < 500 {
            return Err(ConfigError::invalid(
                "audiosocket.idle_timeout_ms",
                "must be at least 500",
            ));
        }
        Ok(())
    }
}
