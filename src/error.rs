//! Leaf error types shared by every module's configuration.
//!
//! Each module owns its `*Config` and validates it, returning a [`ConfigError`] that names the
//! dotted TOML key; `config.rs` only aggregates them.

use std::path::PathBuf;

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
    pub(crate) fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}
