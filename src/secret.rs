//! Secrets (API keys, passwords): where they come from and how they stay out of logs.
//!
//! In the TOML config a secret is either a plain string or a table naming its source:
//!
//! ```toml
//! api_key = "sk-..."                       # inline (discouraged)
//! api_key = { env = "OPENAI_API_KEY" }      # environment variable
//! api_key = { file = "/etc/voicegate/key" } # file; surrounding whitespace is trimmed
//! api_key = { credential = "openai" }       # systemd LoadCredential=openai:...
//! ```
//!
//! [`Secret`] never prints its value: `Debug`, `Display` and `Serialize` all give
//! `"<redacted>"`.

use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::path::PathBuf;

/// Where a secret comes from, as written in the config.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SecretSource {
    /// The value itself.
    Inline(String),
    /// An environment variable.
    Env {
        /// Variable name.
        env: String,
    },
    /// A file holding the value.
    File {
        /// Path of the file.
        file: PathBuf,
    },
    /// A systemd credential: the file `$CREDENTIALS_DIRECTORY/<name>`.
    Credential {
        /// Credential name (`LoadCredential=<name>:…`).
        credential: String,
    },
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("<redacted>"),
            SecretSource::Env { env } => write!(f, "{{ env = {env:?} }}"),
            SecretSource::File { file } => write!(f, "{{ file = {file:?} }}"),
            SecretSource::Credential { credential } => {
                write!(f, "{{ credential = {credential:?} }}")
            }
        }
    }
}

impl Serialize for SecretSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match self {
            SecretSource::Inline(_) => {
                m.serialize_entry("inline", "<redacted>")?;
            }
            SecretSource::Env { env } => m.serialize_entry("env", env)?,
            SecretSource::File { file } => m.serialize_entry("file", file)?,
            SecretSource::Credential { credential } => {
                m.serialize_entry("credential", credential)?
            }
        }
        m.end()
    }
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is unset or not UTF-8.
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    /// The file could not be read.
    #[error("cannot read secret file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `$CREDENTIALS_DIRECTORY` is unset (not started by systemd with `LoadCredential=`).
    #[error("credential {0} requested but CREDENTIALS_DIRECTORY is not set")]
    NoCredentialsDirectory(String),
    /// The secret is empty.
    #[error("secret is empty")]
    Empty,
}

impl SecretSource {
    /// Reads the secret's value.
    ///
    /// # Errors
    /// [`SecretError`] when the source is missing, unreadable or empty.
    pub(crate) fn resolve(&self) -> Result<Secret, SecretError> {
        let value = match self {
            SecretSource::Inline(v) => v.clone(),
            SecretSource::Env { env } => {
                std::env::var(env).map_err(|_| SecretError::MissingEnv(env.clone()))?
            }
            SecretSource::File { file } => read_trimmed(file)?,
            SecretSource::Credential { credential } => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| SecretError::NoCredentialsDirectory(credential.clone()))?;
                read_trimmed(&PathBuf::from(dir).join(credential))?
            }
        };
        if value.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Secret(value))
    }
}

fn read_trimmed(path: &std::path::Path) -> Result<String, SecretError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| SecretError::File {
            path: path.to_owned(),
            source,
        })
}

/// A resolved secret value. Prints as `<redacted>`; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that must send it (an auth header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        k: SecretSource,
    }

    #[test]
    fn sources_parse_and_never_print_the_value() {
        let t: T = toml::from_str(r#"k = "sk-very-secret""#).unwrap();
        assert!(!format!("{:?}", t.k).contains("very-secret"));
        let s = t.k.resolve().unwrap();
        assert_eq!(s.expose(), "sk-very-secret");
        assert!(!format!("{s:?} {s}").contains("very-secret"));
        assert!(!serde_json::to_string(&s).unwrap().contains("very-secret"));
        let t: T = toml::from_str(r#"k = { env = "VOICEGATE_SURELY_UNSET_VAR" }"#).unwrap();
        assert!(matches!(t.k.resolve(), Err(SecretError::MissingEnv(_))));
    }

    #[test]
    fn file_secret_is_trimmed() {
        let dir = std::env::temp_dir().join(format!("vg-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "abc123\n").unwrap();
        let src = SecretSource::File { file: path };
        assert_eq!(src.resolve().unwrap().expose(), "abc123");
    }
}
