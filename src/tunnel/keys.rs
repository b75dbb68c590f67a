//! WireGuard keys in `wg`'s format: 32 bytes, standard base64 with padding (44 characters).
//!
//! [`generate_private_key`] is `wg genkey` (32 random bytes from the OS, clamped as X25519
//! requires: `k[0] &= 248; k[31] &= 127; k[31] |= 64`) and [`public_key_of`] is `wg pubkey`
//! (Curve25519 base-point multiplication). Private keys are returned as [`Secret`]s so they
//! never reach a log line.

use crate::secret::Secret;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519::{PublicKey, StaticSecret};

/// Why a key could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not base64 (the key itself is never quoted, it may be a private key).
    #[error("key is not valid base64")]
    Base64,
    /// Decoded to other than 32 bytes.
    #[error("key decodes to {0} bytes, a WireGuard key has 32")]
    Length(usize),
    /// The operating system's random source failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Decodes a base64 WireGuard key (surrounding whitespace ignored) into its 32 bytes.
///
/// # Errors
/// [`KeyError::Base64`] or [`KeyError::Length`].
pub(crate) fn decode_key(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError::Base64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// Encodes 32 key bytes as `wg` prints them (base64 with padding, 44 characters).
pub(crate) fn encode_key(bytes: &[u8; 32]) -> String {
    STANDARD.encode(bytes)
}

/// Parses a base64 private key.
///
/// # Errors
/// As [`decode_key`].
pub(crate) fn parse_private_key(text: &str) -> Result<StaticSecret, KeyError> {
    decode_key(text).map(StaticSecret::from)
}

/// A new private key, base64, as `wg genkey` prints it.
///
/// # Errors
/// [`KeyError::Random`] if the OS random source fails.
pub fn generate_private_key() -> Result<Secret, KeyError> {
    use ring::rand::SecureRandom as _;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| KeyError::Random)?;
    key[0] &= 248;
    key[31] &= 127;
    key[31] |= 64;
    Ok(Secret::new(encode_key(&key)))
}

/// The base64 public key of a base64 private key, as `wg pubkey` prints it.
///
/// # Errors
/// As [`decode_key`].
pub fn public_key_of(private_key: &str) -> Result<String, KeyError> {
    let secret = parse_private_key(private_key)?;
    Ok(encode_key(PublicKey::from(&secret).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genkey_is_clamped_base64_and_fresh() {
        let a = generate_private_key().unwrap();
        let b = generate_private_key().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), 44);
        let k = decode_key(a.expose()).unwrap();
        assert_eq!(k[0] & 7, 0);
        assert_eq!(k[31] & 0xC0, 0x40);
        assert_eq!(public_key_of(a.expose()).unwrap().len(), 44);
    }

    #[test]
    fn pubkey_matches_wireguard_tools() {
        // Reference from wireguard-tools 1.0.20210914 (Debian 12):
        // `echo IF7r...Ckk= | wg pubkey`.
        assert_eq!(
            public_key_of("IF7rg2tPXiGB37woxL4pw78YWqXeNxcrf1JhbeEoCkk=\n").unwrap(),
            "fSAaMcDhvJvU5Ia8Ji45HUTVZUTNVV6TTzkt3rYzN3w="
        );
    }

    #[test]
    fn bad_keys_are_rejected_without_quoting_them() {
        assert_eq!(decode_key("not base64!"), Err(KeyError::Base64));
        assert_eq!(decode_key("AAAA"), Err(KeyError::Length(3)));
        assert!(!KeyError::Base64.to_string().contains("not base64!"));
    }
}
