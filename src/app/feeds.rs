//! Small background duties of the service: the nftables ruleset, the process signals, and
//! the tasks that mirror the ARI link and the tunnel into `/health`.

use crate::config::Config;
use crate::health::{Component, ComponentStatus, HealthState, component};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub(crate) async fn load_nftables(
    config: &Config,
    audiosocket_port: u16,
    health_port: Option<u16>,
) {
    let mut ports = vec![audiosocket_port];
    ports.extend(health_port);
    let text = crate::guard::nft::ruleset(&config.guard.allow, &ports);
    match tokio::task::spawn_blocking(move || crate::guard::nft::load(&text)).await {
        Ok(Ok(())) => info!(?ports, "nftables ruleset loaded"),
        Ok(Err(e)) => {
            warn!(error = %e, "nftables ruleset not loaded; the in-process guard still applies")
        }
        Err(e) => warn!(error = %e, "nftables task failed"),
    }
}

/// The process signals `voicegate run` acts on, installed before `READY=1`: from then on a
/// SIGTERM or SIGINT (systemd's stop, Ctrl-C) is a graceful shutdown and a SIGHUP
/// (`systemctl reload`) a reload, however soon after start-up it comes. Installed any later,
/// a SIGTERM in between would take the default action and kill the process mid-start-up, or
/// be lost where the parent left it ignored.
pub(crate) struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

/// What [`Signals::next`] received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    /// SIGTERM or SIGINT.
    Shutdown,
    /// SIGHUP.
    Reload,
}

impl Signals {
    /// Installs the handlers for SIGHUP, SIGTERM and SIGINT.
    ///
    /// # Errors
    /// If a handler cannot be installed (no signal driver in the runtime).
    pub(crate) fn install() -> std::io::Result<Self> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal; cancel-safe.
    pub(crate) async fn next(&mut self) -> Received {
        tokio::select! {
            _ = self.term.recv() => Received::Shutdown,
            _ = self.int.recv() => Received::Shutdown,
            _ = self.hup.recv() => Received::Reload,
        }
    }
}

/// Mirrors the ARI events link state into `/health` and `STATUS=`.
pub(crate) fn spawn_ari_health(
    mut state: watch::Receiver<crate::ari::events::LinkState>,
    health: Arc<HealthState>,
) {
    use crate::ari::events::LinkState;
    tokio::spawn(async move {
        loop {
            let now = *state.borrow_and_update();
            let status = match now {
                LinkState::Up | LinkState::Disabled => ComponentStatus::Ok,
                LinkState::Connecting => ComponentStatus::Degraded,
                LinkState::Down => ComponentStatus::Down,
            };
            health.set_component(
                component::ARI,
                Component::new(status, format!("events link {}", now.as_str())),
            );
            if state.changed().await.is_err() {
                break;
            }
        }
    });
}

/// Every second: the tunnel's peers into `/metrics` and the `tunnel` component of `/health`
/// ([`crate::tunnel::TunnelStats::health`]: down when no peer has a live session, degraded
/// when a peer carrying calls has been silent for `silent_after`).
pub(crate) fn spawn_tunnel_health(
    tunnel: crate::tunnel::Tunnel,
    silent_after: Duration,
    health: Arc<HealthState>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let Ok(stats) = tunnel.stats().await else {
                return;
            };
            stats.record_metrics();
            health.set_component(component::TUNNEL, stats.health(silent_after));
        }
    });
}
