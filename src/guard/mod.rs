//! The guard: the credit-leak firewall in front of the AudioSocket listener.
//!
//! Every AudioSocket connection is checked in two steps, both before any agent (cloud)
//! session can start:
//!
//! 1. On accept, before a byte is read ([`Guard::screen`]): the source address must be in an
//!    allowlist of CIDRs (default loopback only), the per-day budget of AI minutes (UTC days)
//!    must not be spent, and the budget of *handshakes in progress* (connections that have
//!    not sent their call id yet: `max_handshakes` in all, `max_handshakes_per_source` from
//!    one address) must have room. The [`Handshake`] is held only until the call id arrives
//!    or `audiosocket.call_id_timeout_ms` runs out, so idle or churning sockets never count
//!    against the call limits.
//! 2. Once the call id is read ([`Handshake::admit`]): the global and per-source call limits
//!    must have room. A passing call holds a [`Permit`] for its length; dropping it frees its
//!    slots.
//!
//! A refused connection is closed by the listener and counted
//! (`voicegate_guard_rejections_total{reason}`); it leaves no call record.
//!
//! The budget is persisted in the state directory (`budget.json`: UTC day number and AI
//! milliseconds used) so a restart does not reset it. The maximum call duration is enforced
//! by the call session (`call::SessionParams::max_duration`); the call-id timeout by
//! the listener (`audiosocket.call_id_timeout_ms`).
//!
//! A profile's own limits ([`ProfileLimits`], `[profiles.limits]`) apply on top, once the
//! call's profile is known ([`Guard::admit_profile`]): its calls at once and its share of
//! the AI minutes per UTC day, kept here so they outlive a SIGHUP reload; the budget file
//! keeps each profile's minutes beside the box's.
//!
//! Optionally ([`GuardConfig::nftables`]) [`nft`] writes and loads an nftables ruleset that
//! drops packets to the AudioSocket and health ports from outside the allowlist, when the
//! process has `CAP_NET_ADMIN`; the in-process check works without it.
//!
//! Must never: open, or let anything open, a provider session for a rejected connection;
//! block the accept loop on disk (budget writes go through `spawn_blocking`).

pub mod nft;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Name of the budget file in the state directory.
pub(crate) const BUDGET_FILE: &str = "budget.json";

/// `[guard]` in the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Source networks allowed to connect (default `["127.0.0.0/8", "::1/128"]`: loopback).
    pub allow: Vec<IpNet>,
    /// Most calls at once, all sources together (default 32).
    pub max_calls: u32,
    /// Most calls at once from one source address (default 32).
    pub max_calls_per_source: u32,
    /// Most connections at once that have not sent their call id yet, all sources together
    /// (default 128). They do not count against `max_calls`.
    pub max_handshakes: u32,
    /// Most such connections from one source address (default 64).
    pub max_handshakes_per_source: u32,
    /// Longest call, s (default 1800); then the call is handed to the dialplan with `0x00`.
    /// 0 disables.
    pub max_call_s: u64,
    /// AI minutes per UTC day, all calls together (default 0: no budget). When spent, new
    /// connections are closed so the dialplan sends them to the operators.
    pub daily_budget_minutes: u64,
    /// Write and load an nftables ruleset for the AudioSocket and health ports (needs
    /// `CAP_NET_ADMIN` and the `nft` tool; default false).
    pub nftables: bool,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            // Literal CIDRs: parsing cannot fail.
            allow: vec![
                "127.0.0.0/8".parse().expect("literal CIDR"),
                "::1/128".parse().expect("literal CIDR"),
            ],
            max_calls: 32,
            max_calls_per_source: 32,
            max_handshakes: 128,
            max_handshakes_per_source: 64,
            max_call_s: 1800,
            daily_budget_minutes: 0,
            nftables: false,
        }
    }
}

impl GuardConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`crate::error::ConfigError::Invalid`] naming the key.
    pub(crate) fn validate(&self) -> Result<(), crate::error::ConfigError> {
        use crate::error::ConfigError;
        if self.max_calls == 0 {
            return Err(ConfigError::invalid(
                "guard.max_calls",
                "must be at least 1",
            ));
        }
        if self.max_calls_per_source == 0 {
            return Err(ConfigError::invalid(
                "guard.max_calls_per_source",
                "must be at least 1",
            ));
        }
        if self.max_handshakes == 0 || self.max_handshakes > 65_536 {
            return Err(ConfigError::invalid(
                "guard.max_handshakes",
                "must be 1 to 65536",
            ));
        }
        if self.max_handshakes_per_source == 0 {
            return Err(ConfigError::invalid(
                "guard.max_handshakes_per_source",
                "must be at least 1",
            ));
        }
        if self.max_call_s != 0 && self.max_call_s < 10 {
            return Err(ConfigError::invalid(
                "guard.max_call_s",
                "must be 0 (off) or at least 10",
            ));
        }
        Ok(())
    }

    /// [`Self::max_call_s`] as a duration, `None` when off.
    pub(crate) fn max_call(&self) -> Option<Duration> {
        (self.max_call_s > 0).then(|| Duration::from_secs(self.max_call_s))
    }

    /// Whether `ip` is in the allowlist (IPv4-mapped IPv6 addresses count as IPv4).
    pub(crate) fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.iter().any(|net| net.contains(&ip))
    }
}

/// Why a connection was refused. [`Rejection::label`] is the metrics label (and the
/// serialised name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// The source address is not in `guard.allow`.
    #[error("source not in the allowlist")]
    NotAllowed,
    /// `guard.max_calls` calls are live.
    #[error("global call limit reached")]
    GlobalLimit,
    /// `guard.max_calls_per_source` calls from this source are live.
    #[error("per-source call limit reached")]
    SourceLimit,
    /// Today's `guard.daily_budget_minutes` are spent.
    #[error("daily AI budget spent")]
    BudgetSpent,
    /// `guard.max_handshakes` connections are waiting for their call id.
    #[error("too many connections waiting for their call id")]
    HandshakeLimit,
    /// `guard.max_handshakes_per_source` connections from this source are waiting for their
    /// call id.
    #[error("too many connections from this source waiting for their call id")]
    HandshakeSourceLimit,
    /// The call's profile has its `[profiles.limits] max_calls` calls live.
    #[error("the profile's call limit is reached")]
    ProfileLimit,
    /// Today's `[profiles.limits] daily_budget_minutes` of the call's profile are spent.
    #[error("the profile's daily AI budget is spent")]
    ProfileBudgetSpent,
}

impl Rejection {
    /// Low-cardinality label for metrics and records.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Rejection::NotAllowed => "not_allowed",
            Rejection::GlobalLimit => "global_limit",
            Rejection::SourceLimit => "source_limit",
            Rejection::BudgetSpent => "budget_spent",
            Rejection::HandshakeLimit => "handshake_limit",
            Rejection::HandshakeSourceLimit => "handshake_source_limit",
            Rejection::ProfileLimit => "profile_limit",
            Rejection::ProfileBudgetSpent => "profile_budget_spent",
        }
    }
}

/// Why the budget file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Reading or writing the budget file failed.
    #[error("budget file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// AI time used on one UTC day; the content of `budget.json`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct BudgetDay {
    /// Days since 1970-01-01, UTC.
    pub(crate) day: u64,
    /// AI time used that day, ms.
    pub(crate) used_ms: u64,
    /// The part of it each named profile used, ms (absent in files written before
    /// profiles had budgets: all zero).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) profiles_ms: BTreeMap<String, u64>,
}

impl BudgetDay {
    /// This record as of `today`: itself, or an empty one when it is an older day's.
    fn on(&mut self, today: u64) -> &mut Self {
        if self.day != today {
            *self = BudgetDay {
                day: today,
                ..BudgetDay::default()
            };
        }
        self
    }
}

/// `[profiles.limits]`: one profile's limits, on top of the box's `[guard]` (a call must
/// pass both). Every key 0 (the default) means no limit of the profile's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileLimits {
    /// Most calls of this profile at once; the next goes to the operators.
    pub max_calls: u32,
    /// Longest call of this profile, s (at least 10); the shorter of this and
    /// `guard.max_call_s` applies.
    pub max_call_s: u64,
    /// AI minutes per UTC day for this profile's calls (their share of
    /// `guard.daily_budget_minutes`, which still applies to all calls together); when
    /// spent, its new calls go to the operators.
    pub daily_budget_minutes: u64,
}

impl ProfileLimits {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`crate::error::ConfigError::Invalid`] naming `<prefix>.max_call_s`.
    pub(crate) fn validate(&self, prefix: &str) -> Result<(), crate::error::ConfigError> {
        if self.max_call_s != 0 && self.max_call_s < 10 {
            return Err(crate::error::ConfigError::invalid(
                &format!("{prefix}.max_call_s"),
                "must be 0 (the box's) or at least 10",
            ));
        }
        Ok(())
    }

    /// The longest call under both these limits and the box's `box_max` (`None`: no limit).
    pub(crate) fn max_call(&self, box_max: Option<Duration>) -> Option<Duration> {
        let own = (self.max_call_s > 0).then(|| Duration::from_secs(self.max_call_s));
        match (own, box_max) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn utc_day(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400
}

#[derive(Debug)]
struct State {
    cfg: GuardConfig,
    live: u32,
    per_source: HashMap<IpAddr, u32>,
    handshakes: u32,
    handshakes_per_source: HashMap<IpAddr, u32>,
    /// Live calls per named profile.
    per_profile: HashMap<String, u32>,
    budget: BudgetDay,
}

/// Takes one from a per-source count, forgetting the source at zero.
fn release(map: &mut HashMap<IpAddr, u32>, source: &IpAddr) {
    if let Some(n) = map.get_mut(source) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(source);
        }
    }
}

/// The in-process guard; share it as `Arc<Guard>`.
#[derive(Debug)]
pub struct Guard {
    state: Mutex<State>,
    budget_path: Option<PathBuf>,
    /// Serialises budget file writes so the newest value is the one left on disk.
    save_lock: Mutex<()>,
}

/// A live call's slots in the guard's limits; freed on drop.
#[derive(Debug)]
pub(crate) struct Permit {
    guard: Arc<Guard>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.guard.lock();
        s.live = s.live.saturating_sub(1);
        release(&mut s.per_source, &self.source);
    }
}

/// A live call's slot in its profile's `max_calls`; freed on drop.
#[derive(Debug)]
pub(crate) struct ProfilePermit {
    guard: Arc<Guard>,
    profile: String,
}

impl Drop for ProfilePermit {
    fn drop(&mut self) {
        let mut s = self.guard.lock();
        if let Some(n) = s.per_profile.get_mut(&self.profile) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.per_profile.remove(&self.profile);
            }
        }
    }
}

/// A connection's slot in the budget of handshakes in progress (from accept until its call
/// id); freed on drop or turned into a call's [`Permit`] by [`Handshake::admit`].
#[derive(Debug)]
pub(crate) struct Handshake {
    guard: Arc<Guard>,
    source: IpAddr,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut s = self.guard.lock();
        s.handshakes = s.handshakes.saturating_sub(1);
        release(&mut s.handshakes_per_source, &self.source);
    }
}

impl Handshake {
    /// The call id arrived: frees the handshake slot and takes a call slot.
    ///
    /// # Errors
    /// [`Rejection::GlobalLimit`] or [`Rejection::SourceLimit`]; nothing is reserved then.
    pub(crate) fn admit(self) -> Result<Permit, Rejection> {
        let guard = self.guard.clone();
        let source = self.source;
        drop(self);
        let mut s = guard.lock();
        if s.live >= s.cfg.max_calls {
            return Err(Rejection::GlobalLimit);
        }
        let per = s.per_source.get(&source).copied().unwrap_or(0);
        if per >= s.cfg.max_calls_per_source {
            return Err(Rejection::SourceLimit);
        }
        s.live += 1;
        s.per_source.insert(source, per + 1);
        drop(s);
        Ok(Permit { guard, source })
    }
}

/// Sets `voicegate_budget_limit_seconds` to `guard.daily_budget_minutes` (0: no limit).
fn set_budget_limit(cfg: &GuardConfig) {
    ::metrics::gauge!(crate::health::metrics::BUDGET_LIMIT)
        .set(cfg.daily_budget_minutes.saturating_mul(60) as f64);
}

impl Guard {
    /// A guard with `cfg`; with `state_dir`, the budget is loaded from and saved to
    /// `state_dir/budget.json` (a missing file is an empty budget).
    ///
    /// # Errors
    /// [`GuardError::Io`] when the file exists but cannot be read.
    pub fn new(cfg: GuardConfig, state_dir: Option<&Path>) -> Result<Self, GuardError> {
        let budget_path = state_dir.map(|d| d.join(BUDGET_FILE));
        let budget = match &budget_path {
            Some(path) => match std::fs::read(path) {
                // A corrupt file (torn by a crash before the rename existed) counts as empty:
                // the budget is a guard rail, not a ledger.
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BudgetDay::default(),
                Err(source) => {
                    return Err(GuardError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            },
            None => BudgetDay::default(),
        };
        set_budget_limit(&cfg);
        Ok(Guard {
            state: Mutex::new(State {
                cfg,
                live: 0,
                per_source: HashMap::new(),
                handshakes: 0,
                handshakes_per_source: HashMap::new(),
                per_profile: HashMap::new(),
                budget,
            }),
            budget_path,
            save_lock: Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counters inconsistent (each
        // critical section is a few integer updates), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a new config to new connections (live permits keep their slots).
    pub(crate) fn reconfigure(&self, cfg: GuardConfig) {
        set_budget_limit(&cfg);
        self.lock().cfg = cfg;
    }

    /// Whether `ip` is in the allowlist in force (for listeners other than AudioSocket,
    /// such as the health listener that serves the dialplan's `/next` question).
    pub(crate) fn allows(&self, ip: IpAddr) -> bool {
        self.lock().cfg.allows(ip)
    }

    /// Step 1, on accept: checks a new connection from `peer` at wall-clock `now`
    /// (allowlist, budget, handshakes in progress).
    ///
    /// # Errors
    /// The [`Rejection`]; nothing is reserved then.
    pub(crate) fn screen(
        self: &Arc<Self>,
        peer: IpAddr,
        now: SystemTime,
    ) -> Result<Handshake, Rejection> {
        let source = peer.to_canonical();
        let mut s = self.lock();
        if !s.cfg.allows(source) {
            return Err(Rejection::NotAllowed);
        }
        if s.cfg.daily_budget_minutes > 0 {
            let today = utc_day(now);
            let used = if s.budget.day == today {
                s.budget.used_ms
            } else {
                0
            };
            if used >= s.cfg.daily_budget_minutes.saturating_mul(60_000) {
                return Err(Rejection::BudgetSpent);
            }
        }
        if s.handshakes >= s.cfg.max_handshakes {
            return Err(Rejection::HandshakeLimit);
        }
        let per = s.handshakes_per_source.get(&source).copied().unwrap_or(0);
        if per >= s.cfg.max_handshakes_per_source {
            return Err(Rejection::HandshakeSourceLimit);
        }
        s.handshakes += 1;
        s.handshakes_per_source.insert(source, per + 1);
        Ok(Handshake {
            guard: self.clone(),
            source,
        })
    }

    /// Both steps at once ([`Guard::screen`], then [`Handshake::admit`]): a call from `peer`
    /// at `now`.
    ///
    /// # Errors
    /// The [`Rejection`]; nothing is reserved then.
    #[cfg(test)]
    pub(crate) fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        now: SystemTime,
    ) -> Result<Permit, Rejection> {
        self.screen(peer, now)?.admit()
    }

    /// Connections holding a [`Handshake`] (waiting for their call id).
    #[cfg(test)]
    pub(crate) fn handshakes(&self) -> u32 {
        self.lock().handshakes
    }

    /// Live calls holding a permit.
    pub fn live_calls(&self) -> u32 {
        self.lock().live
    }

    /// Adds `ai_time` (time an agent session was up) to the budget of `now`'s UTC day.
    /// Call [`Guard::save_budget`] afterwards (off the async threads).
    #[cfg(test)]
    pub(crate) fn charge(&self, ai_time: Duration, now: SystemTime) {
        self.charge_profile(None, ai_time, now);
    }

    /// Adds `ai_time` (time an agent session was up) to the budget of `now`'s UTC day, also
    /// counting it in `profile`'s share (a named profile). Call [`Guard::save_budget`]
    /// afterwards (off the async threads).
    pub fn charge_profile(&self, profile: Option<&str>, ai_time: Duration, now: SystemTime) {
        let ms = ai_time.as_millis() as u64;
        let mut s = self.lock();
        let b = s.budget.on(utc_day(now));
        b.used_ms = b.used_ms.saturating_add(ms);
        if let Some(p) = profile {
            let used = b.profiles_ms.entry(p.to_owned()).or_default();
            *used = used.saturating_add(ms);
        }
    }

    /// AI time used on `now`'s UTC day.
    pub fn budget_used(&self, now: SystemTime) -> Duration {
        let s = self.lock();
        if s.budget.day == utc_day(now) {
            Duration::from_millis(s.budget.used_ms)
        } else {
            Duration::ZERO
        }
    }

    /// AI time `profile`'s calls used on `now`'s UTC day.
    pub fn profile_budget_used(&self, profile: &str, now: SystemTime) -> Duration {
        let s = self.lock();
        if s.budget.day == utc_day(now) {
            Duration::from_millis(s.budget.profiles_ms.get(profile).copied().unwrap_or(0))
        } else {
            Duration::ZERO
        }
    }

    /// Live calls of `profile` holding a [`ProfilePermit`].
    pub fn profile_calls(&self, profile: &str) -> u32 {
        self.lock().per_profile.get(profile).copied().unwrap_or(0)
    }

    /// A call of `profile` at `now`, under its `limits`: a slot in its `max_calls` while
    /// its `daily_budget_minutes` are not spent. Live calls of earlier config generations
    /// count (the counts outlive a reload).
    ///
    /// # Errors
    /// [`Rejection::ProfileLimit`] or [`Rejection::ProfileBudgetSpent`]; nothing is
    /// reserved then.
    pub(crate) fn admit_profile(
        self: &Arc<Self>,
        profile: &str,
        limits: &ProfileLimits,
        now: SystemTime,
    ) -> Result<ProfilePermit, Rejection> {
        let mut s = self.lock();
        if limits.daily_budget_minutes > 0 {
            let used = if s.budget.day == utc_day(now) {
                s.budget.profiles_ms.get(profile).copied().unwrap_or(0)
            } else {
                0
            };
            if used >= limits.daily_budget_minutes.saturating_mul(60_000) {
                return Err(Rejection::ProfileBudgetSpent);
            }
        }
        let live = s.per_profile.get(profile).copied().unwrap_or(0);
        if limits.max_calls > 0 && live >= limits.max_calls {
            return Err(Rejection::ProfileLimit);
        }
        s.per_profile.insert(profile.to_owned(), live + 1);
        Ok(ProfilePermit {
            guard: self.clone(),
            profile: profile.to_owned(),
        })
    }

    /// Writes the current budget to `budget.json` (temp file, fsync, rename). Blocking: call
    /// it from `spawn_blocking`. Does nothing without a state directory.
    ///
    /// # Errors
    /// [`GuardError::Io`].
    pub(crate) fn save_budget(&self) -> Result<(), GuardError> {
        let Some(path) = &self.budget_path else {
            return Ok(());
        };
        let _serial = self.save_lock.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self.lock().budget.clone();
        let io = |source| GuardError::Io {
            path: path.clone(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            // BudgetDay is integers and a string-keyed map: serialising cannot fail.
            let text = serde_json::to_vec(&budget).unwrap_or_default();
            f.write_all(&text).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(cfg: GuardConfig) -> Arc<Guard> {
        Arc::new(Guard::new(cfg, None).unwrap())
    }

    #[test]
    fn default_allows_loopback_only() {
        let c = GuardConfig::default();
        assert!(c.allows("127.0.0.1".parse().unwrap()));
        assert!(c.allows("127.0.0.2".parse().unwrap()));
        assert!(c.allows("::1".parse().unwrap()));
        assert!(c.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.allows("192.168.1.10".parse().unwrap()));
        assert!(!c.allows("::ffff:10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn allowlist_and_limits() {
        let g = guard(GuardConfig {
            allow: vec!["127.0.0.1/32".parse().unwrap()],
            max_calls: 3,
            max_calls_per_source: 2,
            ..GuardConfig::default()
        });
        let now = SystemTime::now();
        assert_eq!(
            g.admit("127.0.0.2".parse().unwrap(), now).unwrap_err(),
            Rejection::NotAllowed
        );
        let a = g.admit("127.0.0.1".parse().unwrap(), now).unwrap();
        let _b = g.admit("127.0.0.1".parse().unwrap(), now).unwrap();
        assert_eq!(
            g.admit("127.0.0.1".parse().unwrap(), now).unwrap_err(),
            Rejection::SourceLimit
        );
        drop(a);
        let _c = g.admit("127.0.0.1".parse().unwrap(), now).unwrap();
        assert_eq!(g.live_calls(), 2);
        g.reconfigure(GuardConfig {
            allow: vec!["0.0.0.0/0".parse().unwrap()],
            max_calls: 3,
            max_calls_per_source: 2,
            ..GuardConfig::default()
        });
        let _d = g.admit("10.0.0.1".parse().unwrap(), now).unwrap();
        assert_eq!(
            g.admit("10.0.0.2".parse().unwrap(), now).unwrap_err(),
            Rejection::GlobalLimit
        );
    }

    #[test]
    fn handshakes_do_not_count_as_calls() {
        let g = guard(GuardConfig {
            max_calls: 1,
            max_handshakes: 3,
            max_handshakes_per_source: 2,
            ..GuardConfig::default()
        });
        let now = SystemTime::now();
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let h1 = g.screen(a, now).unwrap();
        let h2 = g.screen(a, now).unwrap();
        assert_eq!(
            g.screen(a, now).unwrap_err(),
            Rejection::HandshakeSourceLimit
        );
        let h3 = g.screen(b, now).unwrap();
        assert_eq!(g.screen(b, now).unwrap_err(), Rejection::HandshakeLimit);
        // Idle handshakes hold no call slot: the one call gets in.
        assert_eq!(g.live_calls(), 0);
        let call = h3.admit().unwrap();
        assert_eq!((g.live_calls(), g.handshakes()), (1, 2));
        // The call limit applies once the id is read; the handshake slot is freed either way.
        assert_eq!(h1.admit().unwrap_err(), Rejection::GlobalLimit);
        assert_eq!(g.handshakes(), 1);
        drop(h2);
        drop(call);
        assert_eq!((g.live_calls(), g.handshakes()), (0, 0));
        assert!(g.admit(a, now).is_ok());
    }

    #[test]
    fn budget_is_per_utc_day_and_survives_restart() {
        let dir = std::env::temp_dir().join(format!("vg-guard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join(BUDGET_FILE));
        let cfg = GuardConfig {
            daily_budget_minutes: 2,
            ..GuardConfig::default()
        };
        let day1 = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 3600);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let g = Arc::new(Guard::new(cfg.clone(), Some(&dir)).unwrap());
        drop(g.admit(lo, day1).unwrap());
        g.charge(Duration::from_secs(119), day1);
        g.save_budget().unwrap();
        drop(g.admit(lo, day1).unwrap());
        g.charge(Duration::from_secs(1), day1);
        g.save_budget().unwrap();
        assert_eq!(g.admit(lo, day1).unwrap_err(), Rejection::BudgetSpent);

        // A restart reads the spent budget back.
        let g2 = Arc::new(Guard::new(cfg, Some(&dir)).unwrap());
        assert_eq!(g2.budget_used(day1), Duration::from_secs(120));
        assert_eq!(g2.admit(lo, day1).unwrap_err(), Rejection::BudgetSpent);
        // The next UTC day starts from zero.
        let day2 = day1 + Duration::from_secs(86_400);
        assert!(g2.admit(lo, day2).is_ok());
        assert_eq!(g2.budget_used(day2), Duration::ZERO);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn profile_limits_count_calls_and_minutes_per_profile() {
        let dir = std::env::temp_dir().join(format!("vg-guard-prof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join(BUDGET_FILE));
        let g = Arc::new(Guard::new(GuardConfig::default(), Some(&dir)).unwrap());
        let day1 = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 3600);
        let two = ProfileLimits {
            max_calls: 2,
            daily_budget_minutes: 1,
            ..ProfileLimits::default()
        };
        let a = g.admit_profile("sales", &two, day1).unwrap();
        let _b = g.admit_profile("sales", &two, day1).unwrap();
        assert_eq!(
            g.admit_profile("sales", &two, day1).unwrap_err(),
            Rejection::ProfileLimit
        );
        // Another profile, and one without limits, are not affected.
        let _s = g.admit_profile("service", &two, day1).unwrap();
        let _d = g
            .admit_profile("default", &ProfileLimits::default(), day1)
            .unwrap();
        assert_eq!(g.profile_calls("sales"), 2);
        drop(a);
        assert_eq!(g.profile_calls("sales"), 1);
        drop(g.admit_profile("sales", &two, day1).unwrap());
        // Minutes: the profile's share and the box's total.
        g.charge_profile(Some("sales"), Duration::from_secs(59), day1);
        g.charge_profile(Some("service"), Duration::from_secs(30), day1);
        drop(g.admit_profile("sales", &two, day1).unwrap());
        g.charge_profile(Some("sales"), Duration::from_secs(1), day1);
        assert_eq!(
            g.admit_profile("sales", &two, day1).unwrap_err(),
            Rejection::ProfileBudgetSpent
        );
        assert_eq!(g.budget_used(day1), Duration::from_secs(90));
        assert_eq!(
            g.profile_budget_used("sales", day1),
            Duration::from_secs(60)
        );
        // The shares survive a restart; the next UTC day starts from zero.
        g.save_budget().unwrap();
        let g2 = Arc::new(Guard::new(GuardConfig::default(), Some(&dir)).unwrap());
        assert_eq!(
            g2.profile_budget_used("sales", day1),
            Duration::from_secs(60)
        );
        assert_eq!(
            g2.admit_profile("sales", &two, day1).unwrap_err(),
            Rejection::ProfileBudgetSpent
        );
        let day2 = day1 + Duration::from_secs(86_400);
        assert!(g2.admit_profile("sales", &two, day2).is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_budget_file_without_profiles_still_reads() {
        let b: BudgetDay = serde_json::from_str(r#"{"day":20000,"used_ms":5}"#).unwrap();
        assert_eq!((b.day, b.used_ms, b.profiles_ms.len()), (20_000, 5, 0));
    }

    #[test]
    fn the_shorter_max_call_applies() {
        let l = |s| ProfileLimits {
            max_call_s: s,
            ..ProfileLimits::default()
        };
        let box_max = Some(Duration::from_secs(1800));
        assert_eq!(l(300).max_call(box_max), Some(Duration::from_secs(300)));
        assert_eq!(l(3600).max_call(box_max), box_max);
        assert_eq!(l(0).max_call(box_max), box_max);
        assert_eq!(l(300).max_call(None), Some(Duration::from_secs(300)));
        assert!(l(5).validate("profiles[0].limits").is_err());
    }
}
