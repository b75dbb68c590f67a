//! The console's login: the argon2 password check, sessions (an HttpOnly SameSite=Strict
//! cookie), the CSRF token every action carries, and the login rate limit.
//!
//! - The password is checked against a PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`,
//!   RFC 9106 argon2 through the `argon2` crate) in a blocking task.
//! - A session is 32 random bytes (ring's `SystemRandom`) in the cookie `vg_console`,
//!   base64url; the server keeps at most [`MAX_SESSIONS`] and forgets a session after its
//!   lifetime. Each session has its own CSRF token (32 more random bytes) which the page reads
//!   from `GET /console/api/session` and sends as `X-CSRF-Token` on every `POST`; tokens are
//!   compared in constant time.
//! - Logins are limited per source address: [`LOGIN_BURST`] attempts, then one per
//!   [`LOGIN_REFILL`]; beyond that `429` without checking the password. At most
//!   [`MAX_LIMITED_SOURCES`] sources are tracked (the oldest is forgotten).

use base64::Engine as _;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "vg_console";
/// Sessions kept at once; a new login beyond this forgets the oldest.
pub(crate) const MAX_SESSIONS: usize = 64;
/// Login attempts a source may make at once.
pub(crate) const LOGIN_BURST: u32 = 5;
/// After the burst, one more attempt per this long.
pub(crate) const LOGIN_REFILL: Duration = Duration::from_secs(12);
/// Sources whose login attempts are tracked.
pub(crate) const MAX_LIMITED_SOURCES: usize = 1024;

/// An argon2 PHC string, checked when the console starts.
#[derive(Clone)]
pub struct PasswordHash(String);

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(<redacted>)")
    }
}

impl PasswordHash {
    /// Parses a PHC string (`$argon2id$…`).
    ///
    /// # Errors
    /// The parser's message when it is not a PHC string of an argon2 variant.
    pub(crate) fn parse(phc: &str) -> Result<Self, String> {
        let phc = phc.trim();
        let parsed = argon2::PasswordHash::new(phc).map_err(|e| e.to_string())?;
        if !parsed.algorithm.as_str().starts_with("argon2") {
            return Err(format!("{} is not an argon2 hash", parsed.algorithm));
        }
        Ok(PasswordHash(phc.to_owned()))
    }

    /// Whether `password` matches (slow on purpose: call from a blocking task).
    pub(crate) fn verify(&self, password: &str) -> bool {
        use argon2::PasswordVerifier as _;
        let Ok(parsed) = argon2::PasswordHash::new(&self.0) else {
            return false;
        };
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    }

    /// A new argon2id hash of `password` with a random salt and the crate's default cost
    /// (19 MiB, 2 passes), as a PHC string.
    ///
    /// # Errors
    /// When no random salt can be had or hashing fails.
    pub fn hash(password: &str) -> Result<String, String> {
        use argon2::PasswordHasher as _;
        let mut salt = [0u8; 16];
        fill_random(&mut salt)?;
        let salt =
            argon2::password_hash::SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    }
}

/// Fills `buf` from the system's random source.
fn fill_random(buf: &mut [u8]) -> Result<(), String> {
    use ring::rand::SecureRandom as _;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| "no random source".to_owned())
}

/// 32 random bytes, base64url without padding.
fn token() -> String {
    let mut b = [0u8; 32];
    // The system random source does not fail on Linux; an all-zero token would be caught
    // by no test, so fail loudly instead.
    fill_random(&mut b).expect("system random source");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Equal in time independent of where they differ.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// One logged-in browser.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// The CSRF token of this session.
    pub(crate) csrf: String,
    /// A short, non-secret name for the audit log (the first 8 characters of the token's
    /// SHA-256, hex).
    pub(crate) label: String,
    /// Who logged in: the source address.
    pub(crate) peer: Option<IpAddr>,
    created: Instant,
}

/// Sessions and login attempts.
#[derive(Debug)]
pub(crate) struct Auth {
    hash: PasswordHash,
    lifetime: Duration,
    sessions: Mutex<HashMap<String, Session>>,
    attempts: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl Auth {
    /// Sessions live `lifetime`.
    pub(crate) fn new(hash: PasswordHash, lifetime: Duration) -> Self {
        Auth {
            hash,
            lifetime,
            sessions: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one login attempt from `peer`'s allowance; `false` when it is used up.
    pub(crate) fn attempt(&self, peer: Option<IpAddr>, now: Instant) -> bool {
        let key = peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut map = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_LIMITED_SOURCES && !map.contains_key(&key) {
            if let Some(oldest) = map.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        let (tokens, at) = map.entry(key).or_insert((f64::from(LOGIN_BURST), now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() / LOGIN_REFILL.as_secs_f64();
        *tokens = (*tokens + refill).min(f64::from(LOGIN_BURST));
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Checks `password` (in a blocking task); a new session's cookie token when it matches.
    pub(crate) async fn login(&self, password: String, peer: Option<IpAddr>) -> Option<String> {
        let hash = self.hash.clone();
        let ok = tokio::task::spawn_blocking(move || hash.verify(&password))
            .await
            .unwrap_or(false);
        if !ok {
            return None;
        }
        let id = token();
        let label = {
            let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
            d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
        };
        let session = Session {
            csrf: token(),
            label,
            peer,
            created: Instant::now(),
        };
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| s.created.elapsed() < self.lifetime);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(id.clone(), session);
        Some(id)
    }

    /// The session of a request's `Cookie` header, if logged in and not expired.
    pub(crate) fn session(&self, headers: &hyper::HeaderMap) -> Option<Session> {
        let id = cookie(headers)?;
        let map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .find(|(k, _)| same(k, &id))
            .map(|(_, s)| s)
            .filter(|s| s.created.elapsed() < self.lifetime)
            .cloned()
    }

    /// The session, if the request also carries its CSRF token in `X-CSRF-Token`.
    pub(crate) fn action(&self, headers: &hyper::HeaderMap) -> Option<Session> {
        let s = self.session(headers)?;
        let sent = headers.get("x-csrf-token")?.to_str().ok()?;
        same(sent, &s.csrf).then_some(s)
    }

    /// Ends the request's session.
    pub(crate) fn logout(&self, headers: &hyper::HeaderMap) {
        if let Some(id) = cookie(headers) {
            let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            map.remove(&id);
        }
    }

    /// The `Set-Cookie` value for a new session.
    pub(crate) fn set_cookie(&self, id: &str) -> String {
        format!(
            "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
            self.lifetime.as_secs()
        )
    }
}

/// The value of the `vg_console` cookie.
fn cookie(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE).then(|| v.to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[tokio::test]
    async fn login_needs_the_password_and_actions_need_the_csrf_token() {
        let phc = PasswordHash::hash("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        let auth = Auth::new(PasswordHash::parse(&phc).unwrap(), Duration::from_secs(60));
        assert!(auth.login("wrong".into(), None).await.is_none());
        let id = auth.login("correct horse".into(), None).await.unwrap();
        let cookie = headers(&[("cookie", format!("other=1; {COOKIE}={id}"))]);
        let s = auth.session(&cookie).expect("logged in");
        assert!(auth.action(&cookie).is_none(), "no CSRF token");
        let mut with = cookie.clone();
        with.insert("x-csrf-token", "nope".parse().unwrap());
        assert!(auth.action(&with).is_none(), "a wrong CSRF token");
        with.insert("x-csrf-token", s.csrf.parse().unwrap());
        assert!(auth.action(&with).is_some());
        assert!(
            auth.session(&headers(&[("cookie", format!("{COOKIE}=x{id}"))]))
                .is_none()
        );
        let set = auth.set_cookie(&id);
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        auth.logout(&cookie);
        assert!(auth.session(&cookie).is_none());
        assert!(PasswordHash::parse("plain text").is_err());
    }

    #[test]
    fn logins_are_limited_per_source() {
        let auth = Auth::new(
            PasswordHash::parse(&PasswordHash::hash("x").unwrap()).unwrap(),
            Duration::from_secs(60),
        );
        let (a, b) = (
            Some(IpAddr::from([127, 0, 0, 1])),
            Some(IpAddr::from([127, 0, 0, 2])),
        );
        let t0 = Instant::now();
        for _ in 0..LOGIN_BURST {
            assert!(auth.attempt(a, t0));
        }
        assert!(!auth.attempt(a, t0), "burst used up");
        assert!(auth.attempt(b, t0), "another source has its own allowance");
        assert!(!auth.attempt(a, t0 + LOGIN_REFILL / 2));
        assert!(auth.attempt(a, t0 + LOGIN_REFILL * 2));
    }
}
