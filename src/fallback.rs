//! The human fallback: every caller reaches the AI or a human.
//!
//! Three pieces:
//!
//! - [`route`]: before an agent starts, decide [`Route::Agent`] or [`Route::Fallback`]: the
//!   `maintenance` switch sends every call to the operators, and an open [`Breaker`] (after
//!   `breaker_failures` consecutive provider failures, for `breaker_cooldown_s`) does too.
//! - [`Handover`]: *how* a call reaches a human. [`DialplanHandover`] does nothing itself: the
//!   session then sends `0x00` and closes, so Asterisk's `AudioSocket()` returns and the
//!   dialplan's next priority runs `Queue(operators)` (see `asterisk/`). An ARI transfer is
//!   another implementation of the same trait, set in `call::SessionParams::handover`.
//! - The session's own triggers (agent failed, agent task gone, no agent audio for
//!   `agent_silence_s` while the caller waits) end in `call::Outcome::Fallback`.
//!
//! The breaker reads tokio's clock ([`tokio::time::Instant`]), so tests drive it with paused
//! time. Must never: leave a caller in dead air; count a maintenance or breaker-open fallback
//! as a provider failure.

use crate::agent::CallInfo;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// `[fallback]` in the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackConfig {
    /// Send every call to the operators at once, starting no agent (default false). The
    /// one-minute rollback: set it and `systemctl reload voicegate`.
    pub maintenance: bool,
    /// Consecutive provider failures that open the circuit breaker (default 3; 0 disables).
    pub breaker_failures: u32,
    /// How long an open breaker sends new calls straight to the fallback, s (default 60).
    pub breaker_cooldown_s: u64,
    /// No agent audio for this long while the caller is silent and nothing is playing hands
    /// the call to the fallback, s (default 10; 0 disables).
    pub agent_silence_s: u64,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        FallbackConfig {
            maintenance: false,
            breaker_failures: 3,
            breaker_cooldown_s: 60,
            agent_silence_s: 10,
        }
    }
}

impl FallbackConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`crate::error::ConfigError::Invalid`] naming the key.
    pub(crate) fn validate(&self) -> Result<(), crate::error::ConfigError> {
        use crate::error::ConfigError;
        if self.breaker_failures > 0 && !(1..=3600).contains(&self.breaker_cooldown_s) {
            return Err(ConfigError::invalid(
                "fallback.breaker_cooldown_s",
                "must be 1 to 3600",
            ));
        }
        if self.agent_silence_s > 600 {
            return Err(ConfigError::invalid(
                "fallback.agent_silence_s",
                "must be 0 (off) to 600",
            ));
        }
        Ok(())
    }

    /// [`Self::agent_silence_s`] as a duration, `None` when off.
    pub fn agent_silence(&self) -> Option<Duration> {
        (self.agent_silence_s > 0).then(|| Duration::from_secs(self.agent_silence_s))
    }
}

/// Why a call went to the humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum FallbackReason {
    /// `fallback.maintenance` is on.
    Maintenance,
    /// The circuit breaker is open after repeated provider failures.
    BreakerOpen,
    /// The agent failed (could not connect, error event, dropped socket); the error text.
    AgentFailed(String),
    /// No agent audio while the caller waited.
    AgentSilent,
    /// Stasis mode: the call could not be set up (an ARI request failed, or the
    /// externalMedia channel never entered the application); what went wrong.
    SetupFailed(String),
    /// The call's profile is over its own limits (`[profiles.limits]`): its calls at once
    /// or its daily AI minutes.
    ProfileLimit {
        /// The profile's name.
        profile: String,
        /// Which limit: [`crate::guard::Rejection::ProfileLimit`] or
        /// [`crate::guard::Rejection::ProfileBudgetSpent`].
        limit: crate::guard::Rejection,
    },
}

impl FallbackReason {
    /// Low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FallbackReason::Maintenance => "maintenance",
            FallbackReason::BreakerOpen => "breaker_open",
            FallbackReason::AgentFailed(_) => "agent_failed",
            FallbackReason::AgentSilent => "agent_silent",
            FallbackReason::SetupFailed(_) => "setup_failed",
            FallbackReason::ProfileLimit { limit, .. } => limit.label(),
        }
    }

    /// The `reason` label of `voicegate_provider_errors_total`: `quota` for a quota, rate
    /// or concurrency refusal ([`crate::agent::failure_reason`]), `silent` for an agent that
    /// sent no audio, else `error`.
    pub(crate) fn provider_reason(&self) -> &'static str {
        match self {
            FallbackReason::AgentFailed(e) => crate::agent::failure_reason(e),
            FallbackReason::AgentSilent => "silent",
            _ => "error",
        }
    }

    /// Whether this counts as a provider failure for the breaker.
    pub(crate) fn is_provider_failure(&self) -> bool {
        matches!(
            self,
            FallbackReason::AgentFailed(_) | FallbackReason::AgentSilent
        )
    }
}

impl std::fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FallbackReason::Maintenance => f.write_str("maintenance"),
            FallbackReason::BreakerOpen => f.write_str("circuit breaker open"),
            FallbackReason::AgentFailed(e) => write!(f, "agent failed: {e}"),
            FallbackReason::AgentSilent => f.write_str("no agent audio while the caller waited"),
            FallbackReason::SetupFailed(e) => write!(f, "stasis setup failed: {e}"),
            FallbackReason::ProfileLimit { profile, limit } => {
                write!(f, "profile {profile:?}: {limit}")
            }
        }
    }
}

/// Where a new call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// Start the agent.
    Agent,
    /// Straight to the humans, no agent.
    Fallback(FallbackReason),
}

/// Decides the route of a new call from the config in force and the breaker.
pub(crate) fn route(cfg: &FallbackConfig, breaker: &Breaker) -> Route {
    if cfg.maintenance {
        Route::Fallback(FallbackReason::Maintenance)
    } else if !breaker.allows_call() {
        Route::Fallback(FallbackReason::BreakerOpen)
    } else {
        Route::Agent
    }
}

/// What a [`Handover`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// Nothing yet: the session sends `0x00` and closes so the dialplan falls through.
    Dialplan,
    /// The call was transferred elsewhere (ARI); the session just closes.
    Transferred,
}

/// How a call reaches a human. Called once per fallback, before the session sends `0x00`;
/// the session gives it at most [`HANDOVER_TIMEOUT`], then falls through to the dialplan.
pub trait Handover: Send + Sync + 'static {
    /// Short name for logs (`dialplan`, `ari`).
    fn name(&self) -> &'static str;
    /// Hands `call` to the humans for `reason`.
    fn hand_over<'a>(
        &'a self,
        call: &'a CallInfo,
        reason: &'a FallbackReason,
    ) -> Pin<Box<dyn Future<Output = Handed> + Send + 'a>>;
}

/// The longest a [`Handover`] may take before the dialplan path is used anyway.
pub(crate) const HANDOVER_TIMEOUT: Duration = Duration::from_millis(1500);

/// A shared handover strategy.
pub(crate) type SharedHandover = Arc<dyn Handover>;

impl std::fmt::Debug for dyn Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handover({})", self.name())
    }
}

/// The AudioSocket-only fallback: end the session with `0x00`; the dialplan's next priority
/// (`Queue(operators)`) runs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DialplanHandover;

impl Handover for DialplanHandover {
    fn name(&self) -> &'static str {
        "dialplan"
    }
    fn hand_over<'a>(
        &'a self,
        _call: &'a CallInfo,
        _reason: &'a FallbackReason,
    ) -> Pin<Box<dyn Future<Output = Handed> + Send + 'a>> {
        Box::pin(std::future::ready(Handed::Dialplan))
    }
}

pub use crate::health::BreakerState;

#[derive(Debug)]
struct BreakerInner {
    threshold: u32,
    cooldown: Duration,
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

/// The circuit breaker over provider failures; share it as `Arc<Breaker>`.
#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<BreakerInner>,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive failures (0: never) for
    /// `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            inner: Mutex::new(BreakerInner {
                threshold,
                cooldown,
                consecutive_failures: 0,
                open_until: None,
            }),
        }
    }

    /// A breaker with the config's settings.
    pub fn from_config(cfg: &FallbackConfig) -> Self {
        Self::new(
            cfg.breaker_failures,
            Duration::from_secs(cfg.breaker_cooldown_s),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        // Each critical section is a few assignments: a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies new settings (SIGHUP); the failure count is kept.
    pub(crate) fn reconfigure(&self, cfg: &FallbackConfig) {
        let mut b = self.lock();
        b.threshold = cfg.breaker_failures;
        b.cooldown = Duration::from_secs(cfg.breaker_cooldown_s);
        if b.threshold == 0 {
            b.open_until = None;
        }
    }

    /// Whether a new call may start an agent now.
    pub(crate) fn allows_call(&self) -> bool {
        let b = self.lock();
        b.open_until.is_none_or(|until| Instant::now() >= until)
    }

    /// A provider failure: opens the breaker when the count reaches the threshold (or
    /// reopens it after a failed trial call).
    pub(crate) fn record_failure(&self) {
        let mut b = self.lock();
        b.consecutive_failures = b.consecutive_failures.saturating_add(1);
        if b.threshold > 0 && b.consecutive_failures >= b.threshold {
            b.open_until = Some(Instant::now() + b.cooldown);
        }
    }

    /// A call the agent served: closes the breaker and resets the count.
    pub(crate) fn record_success(&self) {
        let mut b = self.lock();
        b.consecutive_failures = 0;
        b.open_until = None;
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        let b = self.lock();
        match b.open_until {
            None => BreakerState::Closed,
            Some(until) => {
                let now = Instant::now();
                if now < until {
                    BreakerState::Open {
                        remaining_s: (until - now).as_secs_f64().ceil() as u64,
                    }
                } else {
                    BreakerState::HalfOpen
                }
            }
        }
    }
}

impl crate::health::BreakerSource for Breaker {
    fn breaker_state(&self) -> BreakerState {
        self.state()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The failures voicegate's clients report for each vendor's quota refusal, as they word
    /// them, are `quota`; other failures are `error`.
    #[test]
    fn quota_refusals_are_told_apart() {
        for quota in [
            "openai_realtime error: error while waiting for session.updated: invalid_request_error/insufficient_quota: You exceeded your current quota",
            "soniox error: error 429: Too many concurrent requests.",
            "cannot connect to deepgram: HTTP error: 429 Too Many Requests",
            "elevenlabs_stt error: quota_exceeded: You have exceeded your quota",
            "elevenlabs_stt error: rate_limited: Too many requests",
            "elevenlabs_tts error: Quota exceeded for this API key",
            "cannot connect to elevenlabs_agent: signed url: HTTP 429",
        ] {
            let r = FallbackReason::AgentFailed(quota.into());
            assert_eq!(r.provider_reason(), "quota", "{quota}");
        }
        for other in [
            "soniox error: error 503: Cannot continue request (code 1). Please restart the request.",
            "openai_realtime error: server closed the connection",
            "cannot connect to elevenlabs_tts: HTTP error: 401 Unauthorized",
        ] {
            assert_eq!(
                FallbackReason::AgentFailed(other.into()).provider_reason(),
                "error"
            );
        }
        assert_eq!(FallbackReason::AgentSilent.provider_reason(), "silent");
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_k_failures_and_closes_after_a_success() {
        let cfg = FallbackConfig {
            breaker_failures: 3,
            breaker_cooldown_s: 30,
            ..FallbackConfig::default()
        };
        let b = Breaker::from_config(&cfg);
        assert_eq!(route(&cfg, &b), Route::Agent);
        b.record_failure();
        b.record_failure();
        assert_eq!(b.state(), BreakerState::Closed);
        b.record_failure();
        assert_eq!(b.state(), BreakerState::Open { remaining_s: 30 });
        assert_eq!(
            route(&cfg, &b),
            Route::Fallback(FallbackReason::BreakerOpen)
        );
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!b.allows_call());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(route(&cfg, &b), Route::Agent);
        // The trial call fails: open again at once.
        b.record_failure();
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        tokio::time::advance(Duration::from_secs(30)).await;
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed);
        // A success in between resets the count.
        b.record_failure();
        b.record_failure();
        b.record_success();
        b.record_failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn maintenance_wins() {
        let cfg = FallbackConfig {
            maintenance: true,
            ..FallbackConfig::default()
        };
        let b = Breaker::from_config(&cfg);
        assert_eq!(
            route(&cfg, &b),
            Route::Fallback(FallbackReason::Maintenance)
        );
        assert!(!FallbackReason::Maintenance.is_provider_failure());
        assert!(FallbackReason::AgentSilent.is_provider_failure());
    }
}
