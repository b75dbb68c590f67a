//! Health: the systemd watchdog, `/health` and `/metrics`.
//!
//! - [`notify`]: every `sd_notify` message (READY, STATUS, WATCHDOG, STOPPING,
//!   EXTEND_TIMEOUT_USEC), in one module.
//! - [`HealthState`]: what the process knows about itself: two [`Heartbeat`]s (the accept
//!   loop's ticker, and the call tasks' 20 ms playout clocks), live calls, readiness, and one
//!   [`Component`] per part (AudioSocket listener, agent provider, ARI link, tunnel).
//! - [`Watchdog`]: a plain OS thread, independent of the tokio runtime, that sends
//!   `WATCHDOG=1` only while both heartbeats are fresh. If the runtime stalls (a blocked
//!   worker, a deadlock, a busy loop) the heartbeats go stale, the pings stop and systemd
//!   restarts the service: the pings prove progress, not mere existence.
//! - [`http`]: the HTTP listener (default `127.0.0.1:9100`) and its [`http::Router`];
//!   [`metrics`]: metric names and the Prometheus recorder.
//!
//! Timing, with `W` = `WatchdogSec=` (`WATCHDOG_USEC`): pings every `W/4`, a heartbeat older
//! than `W/2` is a stall, and the accept loop beats every `min(1 s, W/8)`.
//!
//! Must never: ping the watchdog from the runtime being watched; block a call task.

pub mod heap;
pub mod http;
pub mod metrics;
pub mod notify;
pub(crate) mod tally;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
#[allow(clippy::disallowed_types)] // the watchdog thread's Heartbeat needs real time
use std::time::{Duration, Instant};

/// `[health]` in the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Serve `/health` and `/metrics` (default true).
    pub enabled: bool,
    /// Address of the HTTP listener (default `127.0.0.1:9100`; keep it on loopback or a
    /// management network: it has no authentication).
    pub listen: SocketAddr,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
        }
    }
}

/// A progress marker: whoever makes progress calls [`Heartbeat::beat`]; the watchdog reads
/// [`Heartbeat::age`]. One relaxed atomic store per beat (cheap enough for every 20 ms tick).
#[derive(Debug)]
pub struct Heartbeat {
    #[allow(clippy::disallowed_types)] // real time: a stalled runtime must not stop this clock
    origin: Instant,
    last_ms: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    /// A heartbeat that has just beaten.
    pub(crate) fn new() -> Self {
        #[allow(clippy::disallowed_types)] // real time: a stalled runtime must not stop this clock
        Heartbeat {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Records progress now.
    pub(crate) fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub(crate) fn age(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// State of one component in `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentStatus {
    /// Working.
    Ok,
    /// Working with reduced function (e.g. the circuit breaker is open).
    Degraded,
    /// Not working.
    Down,
    /// Not configured on this box.
    NotConfigured,
}

/// One component in `/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Component {
    /// Its state.
    pub status: ComponentStatus,
    /// A human-readable detail (an address, an error message).
    pub detail: String,
}

impl Component {
    /// A component in `status` with `detail`.
    pub(crate) fn new(status: ComponentStatus, detail: impl Into<String>) -> Self {
        Component {
            status,
            detail: detail.into(),
        }
    }
}

/// Component names used in `/health` and `STATUS=`.
pub(crate) mod component {
    /// The AudioSocket listener.
    pub(crate) const AUDIOSOCKET: &str = "audiosocket";
    /// The agent provider.
    pub(crate) const AGENT: &str = "agent";
    /// The ARI link (issue: ARI).
    pub(crate) const ARI: &str = "ari";
    /// The WireGuard tunnel (issue: tunnel).
    pub(crate) const TUNNEL: &str = "tunnel";
    /// The call-record spool: degraded while records cannot be written.
    pub(crate) const RECORDS: &str = "records";
}

/// What the process knows about its own health; shared as `Arc<HealthState>`.
#[derive(Debug)]
pub struct HealthState {
    /// Beaten by the accept loop's ticker.
    pub accept: Heartbeat,
    /// Beaten by every call's playout tick (and when a call starts).
    pub call_clocks: Arc<Heartbeat>,
    live_calls: AtomicUsize,
    ready: AtomicBool,
    stopping: AtomicBool,
    maintenance: AtomicBool,
    stall_limit_ms: AtomicU64,
    components: Mutex<BTreeMap<&'static str, Component>>,
    breaker: Arc<dyn BreakerSource>,
}

/// What the breaker says, for `/health` and `STATUS=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go to the agent.
    Closed,
    /// New calls go to the fallback for `remaining_s` more seconds.
    Open {
        /// Seconds of cool-down left.
        remaining_s: u64,
    },
    /// Cool-down over, the next result decides: a success closes, a failure reopens.
    HalfOpen,
}

/// Where [`HealthState`] reads the circuit breaker's state (`fallback::Breaker` is one):
/// health reports the state it is given and knows no breaker logic.
pub trait BreakerSource: Send + Sync + std::fmt::Debug {
    /// The state now.
    fn breaker_state(&self) -> BreakerState;
}

/// The `/health` document.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// The runtime makes progress (the same test the watchdog applies).
    pub live: bool,
    /// Config loaded and every listener bound, not shutting down.
    pub ready: bool,
    /// Calls in progress.
    pub live_calls: usize,
    /// `fallback.maintenance` is on: every call goes to the operators.
    pub maintenance: bool,
    /// The circuit breaker.
    pub breaker: BreakerState,
    /// Per component.
    pub components: BTreeMap<&'static str, Component>,
}

impl HealthState {
    /// Fresh state: not ready, ARI and tunnel "not configured", the agent not yet tried.
    pub fn new(agent_name: &str, breaker: Arc<dyn BreakerSource>) -> Self {
        let mut components = BTreeMap::new();
        components.insert(
            component::AUDIOSOCKET,
            Component::new(ComponentStatus::Down, "not bound yet"),
        );
        components.insert(
            component::AGENT,
            Component::new(ComponentStatus::Ok, format!("{agent_name}: no call yet")),
        );
        components.insert(
            component::ARI,
            Component::new(ComponentStatus::NotConfigured, "not configured"),
        );
        components.insert(
            component::TUNNEL,
            Component::new(ComponentStatus::NotConfigured, "not configured"),
        );
        HealthState {
            accept: Heartbeat::new(),
            call_clocks: Arc::new(Heartbeat::new()),
            live_calls: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            maintenance: AtomicBool::new(false),
            stall_limit_ms: AtomicU64::new(10_000),
            components: Mutex::new(components),
            breaker,
        }
    }

    fn components(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Component>> {
        // Inserts of whole values only: a poisoned map is still consistent.
        self.components.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets a component's state (other modules add their own names, e.g. `ari`, `tunnel`).
    pub(crate) fn set_component(&self, name: &'static str, c: Component) {
        self.components().insert(name, c);
    }

    /// Marks the process ready (listeners bound, config loaded).
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Marks shutdown in progress.
    pub(crate) fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Records the maintenance switch in force.
    pub(crate) fn set_maintenance(&self, on: bool) {
        self.maintenance.store(on, Ordering::SeqCst);
    }

    /// Sets how old a heartbeat may be before the runtime counts as stalled.
    pub(crate) fn set_stall_limit(&self, limit: Duration) {
        self.stall_limit_ms
            .store(limit.as_millis() as u64, Ordering::SeqCst);
    }

    /// A call started (beats the call clock so a fresh call is not a stall).
    pub(crate) fn call_started(&self) {
        self.call_clocks.beat();
        let n = self.live_calls.fetch_add(1, Ordering::SeqCst) + 1;
        ::metrics::gauge!(metrics::CALLS_ACTIVE).set(n as f64);
    }

    /// A call ended.
    pub(crate) fn call_ended(&self) {
        let n = self
            .live_calls
            .fetch_sub(1, Ordering::SeqCst)
            .saturating_sub(1);
        ::metrics::gauge!(metrics::CALLS_ACTIVE).set(n as f64);
    }

    /// Calls in progress.
    pub(crate) fn live_calls(&self) -> usize {
        self.live_calls.load(Ordering::SeqCst)
    }

    /// `None` while the runtime makes progress; otherwise what stalled.
    pub(crate) fn stall(&self) -> Option<String> {
        let limit = Duration::from_millis(self.stall_limit_ms.load(Ordering::SeqCst));
        let accept = self.accept.age();
        if accept > limit {
            return Some(format!("accept loop stalled for {} ms", accept.as_millis()));
        }
        if self.live_calls() > 0 {
            let clocks = self.call_clocks.age();
            if clocks > limit {
                return Some(format!("call clocks stalled for {} ms", clocks.as_millis()));
            }
        }
        None
    }

    /// The `/health` document now.
    pub fn report(&self) -> HealthReport {
        let breaker = self.breaker.breaker_state();
        let mut components = self.components().clone();
        if let (BreakerState::Open { remaining_s }, Some(agent)) =
            (breaker, components.get_mut(component::AGENT))
        {
            agent.status = ComponentStatus::Degraded;
            agent.detail = format!(
                "{}; circuit breaker open, calls go to the operators for {remaining_s} s",
                agent.detail
            );
        }
        HealthReport {
            live: self.stall().is_none(),
            ready: self.ready.load(Ordering::SeqCst) && !self.stopping.load(Ordering::SeqCst),
            live_calls: self.live_calls(),
            maintenance: self.maintenance.load(Ordering::SeqCst),
            breaker,
            components,
        }
    }

    /// The one-line `STATUS=` text: live calls, agent health, breaker, ARI link.
    pub(crate) fn status_line(&self) -> String {
        let r = self.report();
        let part = |name: &str| {
            r.components.get(name).map_or("unknown".to_owned(), |c| {
                if c.status == ComponentStatus::NotConfigured {
                    "not configured".to_owned()
                } else {
                    format!("{:?}: {}", c.status, c.detail).to_lowercase()
                }
            })
        };
        let breaker = match r.breaker {
            BreakerState::Closed => "closed".to_owned(),
            BreakerState::HalfOpen => "half-open".to_owned(),
            BreakerState::Open { remaining_s } => format!("open ({remaining_s} s)"),
        };
        format!(
            "{} live calls; agent {}; breaker {}; ari: {}{}{}",
            r.live_calls,
            part(component::AGENT),
            breaker,
            part(component::ARI),
            if r.maintenance {
                "; MAINTENANCE: all calls to operators"
            } else {
                ""
            },
            match self.stall() {
                Some(s) => format!("; UNHEALTHY: {s}"),
                None => String::new(),
            }
        )
    }
}

/// The watchdog thread's handle; dropping it does not stop the thread (use [`Watchdog::stop`]).
#[derive(Debug)]
pub(crate) struct Watchdog {
    stop: Arc<AtomicBool>,
}

impl Watchdog {
    /// Starts the thread. With `interval` (`WATCHDOG_USEC`), it sends `WATCHDOG=1` and
    /// `STATUS=` every `interval/4` while [`HealthState::stall`] is `None`, and only
    /// `STATUS=` (saying what stalled) otherwise; without, `STATUS=` every 5 s.
    ///
    /// # Errors
    /// If the OS cannot start a thread.
    pub(crate) fn spawn(
        state: Arc<HealthState>,
        interval: Option<Duration>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let period = interval.map_or(Duration::from_secs(5), |w| w / 4);
        if let Some(w) = interval {
            state.set_stall_limit(w / 2);
        }
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    let status = state.status_line();
                    match (interval, state.stall()) {
                        (Some(_), None) => notify::watchdog(&status),
                        (Some(_), Some(stall)) => {
                            tracing::error!(%stall, "runtime stalled; withholding watchdog pings");
                            notify::status(&status);
                        }
                        (None, _) => notify::status(&status),
                    }
                    std::thread::sleep(period);
                }
            })?;
        Ok(Watchdog { stop })
    }

    /// Stops the thread after its current sleep.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// How often the accept loop should beat for a watchdog `interval`: `min(1 s, interval/8)`.
pub(crate) fn accept_beat_period(interval: Option<Duration>) -> Duration {
    interval.map_or(Duration::from_secs(1), |w| {
        (w / 8).min(Duration::from_secs(1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fallback::Breaker;

    #[test]
    fn stall_is_reported_when_a_heartbeat_ages() {
        let s = HealthState::new("echo", Arc::new(Breaker::new(3, Duration::from_secs(5))));
        s.set_stall_limit(Duration::from_millis(50));
        s.accept.beat();
        assert!(s.stall().is_none());
        s.call_started();
        std::thread::sleep(Duration::from_millis(80));
        s.accept.beat();
        // A live call whose clock has not ticked for 80 ms: stalled.
        assert!(
            s.stall().unwrap().contains("call clocks"),
            "{:?}",
            s.stall()
        );
        s.call_ended();
        assert!(s.stall().is_none());
        let line = s.status_line();
        assert!(line.contains("0 live calls"), "{line}");
        assert!(line.contains("ari: not configured"), "{line}");
    }
}
