//! `voicegate run`: builds everything the config describes, binds the listeners, and runs
//! until SIGTERM or SIGINT, then shuts down gracefully (stop accepting, let live calls finish
//! for `audiosocket.shutdown_grace_s`, hang up the rest).
//!
//! Start-up order: config (already loaded) → metrics recorder → agent, guard, breaker →
//! AudioSocket listener → health listener → records spool → nftables (if configured) →
//! `READY=1` and the watchdog thread. SIGHUP re-reads the config file: the new agent, limits
//! and switches apply to new calls; live calls finish on the generation they started with.
//! Listen addresses and the state directory need a restart.
//!
//! There is no test hook in here: the watchdog test (`tests/appliance_notify.rs`) runs
//! [`run`] inside its own process and stalls that runtime itself.

use crate::audiosocket::server::Server;
use crate::call::route::{Generation, Router as CallRouter, ServerParams};
use crate::config::Config;
use crate::fallback::Breaker;
use crate::guard::Guard;
use crate::health::http::{HttpServer, Router, json};
use crate::health::{Component, ComponentStatus, HealthState, Watchdog, component, notify};
use crate::records::spool::Spool;
use crate::records::{CallRecord, CallerNumbers};
use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Summaries of finished calls waiting for the records writer; beyond this a record is
/// dropped and counted (`voicegate_records_lost_total{reason="queue_full"}`).
pub const RECORDS_QUEUE: usize = 1024;

/// The [`Generation`] new calls get under `config`.
///
/// # Errors
/// If the `[[tools]]` cannot be built (already checked by [`Config::validate`]).
pub fn generation(
    config: &Config,
    agent: crate::agent::SharedAgent,
) -> Result<Generation, crate::tools::ToolError> {
    let mut params = ServerParams::from_config(&config.audiosocket).with_tools(Arc::new(
        crate::tools::ToolRegistry::from_config(&config.tools)?,
    ));
    params.session.max_duration = config.guard.max_call();
    params.session.agent_silence = config.fallback.agent_silence();
    Ok(Generation {
        agent,
        params: Arc::new(params),
        fallback: config.fallback.clone(),
    })
}

/// The ARI controller's hooks: a new Stasis caller is routed like any call (maintenance or
/// an open breaker: straight to the operators, nothing set up), and a caller sent to the
/// operators before a session ran for it is counted and recorded as a fallback with its
/// reason.
fn ari_hooks(
    generation: watch::Receiver<Arc<Generation>>,
    breaker: Arc<Breaker>,
    summaries: crate::call::route::SummaryTx,
) -> crate::ari::controller::Hooks {
    use crate::fallback::Route;
    use crate::health::metrics as m;
    let current = generation.clone();
    crate::ari::controller::Hooks {
        route: Some(Arc::new(move || {
            match crate::fallback::route(&generation.borrow().fallback, &breaker) {
                Route::Fallback(reason) => Some(reason),
                Route::Agent => None,
            }
        })),
        report: Some(Arc::new(move |u: crate::ari::controller::Unserved| {
            let agent = current.borrow().agent.name();
            let mut s = crate::call::CallSummary::without_agent(
                u.call_id,
                agent,
                crate::call::Outcome::Fallback(u.reason.to_string()),
            );
            s.started = u.started;
            s.duration = u.duration;
            s.caller_number = u.caller_number;
            ::metrics::counter!(m::CALLS_TOTAL, "outcome" => "fallback").increment(1);
            ::metrics::counter!(m::FALLBACKS, "reason" => u.reason.label()).increment(1);
            s.fallback = Some(u.reason);
            summaries.send(s);
        })),
    }
}

/// The health listener's routes: `GET /health` (JSON; 200 when live and ready, else 503) and
/// `GET /metrics` (Prometheus text). Add more with [`Router::route`].
pub fn health_routes(health: Arc<HealthState>) -> Router {
    use hyper::{Method, StatusCode};
    Router::new()
        .route(Method::GET, "/health", move |_req| {
            let report = health.report();
            async move {
                let status = if report.live && report.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(status, &report)
            }
        })
        .route(Method::GET, "/metrics", |_req| async move {
            crate::health::http::respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::health::metrics::render().into(),
            )
        })
}

/// Every route of the health listener: [`health_routes`], `GET /v1/wireguard` (the tunnel's
/// statistics; 404 without `[wireguard]`) and `GET /v1/calls/{id}/next` (what the dialplan
/// does after `AudioSocket()` returns, from `next`).
pub fn http_router(
    health: Arc<HealthState>,
    next: Arc<crate::call::next::NextStore>,
    tunnel: Option<crate::tunnel::Tunnel>,
) -> Router {
    health_routes(health)
        .route(hyper::Method::GET, "/v1/wireguard", move |_req| {
            let tunnel = tunnel.clone();
            async move {
                let Some(tunnel) = tunnel else {
                    return crate::health::http::respond(
                        hyper::StatusCode::NOT_FOUND,
                        "text/plain; charset=utf-8",
                        "no [wireguard] configured\n".into(),
                    );
                };
                match tunnel.stats().await {
                    Ok(stats) => {
                        stats.record_metrics();
                        json(hyper::StatusCode::OK, &stats)
                    }
                    Err(e) => crate::health::http::respond(
                        hyper::StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain; charset=utf-8",
                        format!("tunnel: {e}\n").into(),
                    ),
                }
            }
        })
        .route(hyper::Method::GET, "/v1/calls/{id}/next", move |req| {
            let body = next.answer(req.params.get("id").map_or("", String::as_str));
            async move {
                crate::health::http::respond(
                    hyper::StatusCode::OK,
                    "text/plain; charset=utf-8",
                    body.into(),
                )
            }
        })
}

/// Runs the service until a termination signal. `path` is the config file to re-read on
/// SIGHUP (`None`: the default path, else the built-in defaults).
///
/// # Errors
/// If the agent cannot be built or a listener cannot be bound.
pub async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    crate::health::metrics::install();
    warn_plaintext_secrets(&config);
    let _upkeep = crate::health::metrics::spawn_upkeep();
    let state_dir = config.state.dir();
    let state_ok = match std::fs::create_dir_all(&state_dir) {
        Ok(()) => true,
        Err(e) => {
            warn!(dir = %state_dir.display(), error = %e, "state directory unusable: no call records, AI budget not persisted");
            false
        }
    };
    let agent = crate::agent::from_config(&config.agent)?;
    let breaker = Arc::new(Breaker::from_config(&config.fallback));
    let health = Arc::new(HealthState::new(agent.name(), breaker.clone()));
    health.set_maintenance(config.fallback.maintenance);
    let guard = Arc::new(
        Guard::new(
            config.guard.clone(),
            state_ok.then_some(state_dir.as_path()),
        )
        .context("loading the AI budget")?,
    );
    let watchdog_interval = notify::watchdog_interval();
    let (gen_tx, gen_rx) = watch::channel(Arc::new(generation(&config, agent)?));

    // Bounded: a slow disk drops records (counted), never grows memory.
    let (summary_tx, summary_rx) = mpsc::channel(RECORDS_QUEUE);
    let server = Server::bind(config.audiosocket.listen)
        .await
        .with_context(|| format!("binding AudioSocket listener {}", config.audiosocket.listen))?;
    let mut router = CallRouter::new(gen_rx.clone());
    router.guard = Some(guard.clone());
    router.breaker = breaker.clone();
    let beat = crate::health::accept_beat_period(watchdog_interval);
    router.health = Some((health.clone(), beat));
    router.summaries = Some(summary_tx.clone().into());
    let audiosocket_addr = server.local_addr()?;

    // WireGuard: calls from a remote Asterisk arrive on the tunnel address (same port as the
    // LAN listener, same guard), and loopback forwards carry ARI the other way.
    let tunnel_stop = CancellationToken::new();
    let (server, tunnel) = match &config.wireguard {
        Some(wg) => {
            let (tunnel, _driver) = crate::tunnel::Tunnel::from_config(wg, tunnel_stop.clone())
                .await
                .context("starting the WireGuard tunnel")?;
            let listener = tunnel
                .listen(audiosocket_addr.port())
                .await
                .context("listening inside the WireGuard tunnel")?;
            for f in &wg.forwards {
                crate::tunnel::forward::forward(
                    tunnel.clone(),
                    f.listen,
                    f.to,
                    tunnel_stop.clone(),
                )
                .await
                .with_context(|| format!("binding WireGuard forward {}", f.listen))?;
            }
            health.set_component(
                component::TUNNEL,
                Component::new(
                    ComponentStatus::Ok,
                    format!("{} udp {}", tunnel.address(), tunnel.udp_addr()),
                ),
            );
            spawn_tunnel_health(
                tunnel.clone(),
                wg.silent_after(),
                health.clone(),
                tunnel_stop.clone(),
            );
            (server.with_tunnel(listener), Some(tunnel))
        }
        None => (server, None),
    };
    health.set_component(
        component::AUDIOSOCKET,
        Component::new(
            ComponentStatus::Ok,
            format!("listening on {audiosocket_addr}"),
        ),
    );

    let stop = CancellationToken::new();
    // What the dialplan does after an AudioSocket() call: GET /v1/calls/{id}/next.
    let next = std::sync::Arc::new(crate::call::next::NextStore::new());
    let ari_stop = CancellationToken::new();
    let ari = match &config.ari {
        Some(c) => {
            // Its own stop: ARI outlives the listener until the last transfer is confirmed.
            // The bound address: with port 0 in the config, Asterisk must still find us.
            let rt = crate::ari::controller::start(
                c,
                audiosocket_addr,
                next.clone(),
                ari_hooks(gen_rx.clone(), breaker.clone(), summary_tx.into()),
                ari_stop.clone(),
            )
            .context("starting ARI")?;
            router.directory = Some(std::sync::Arc::new(rt.controller.clone()));
            Some(rt)
        }
        None => {
            // The records task ends when the last sender is gone: only the listener keeps
            // one then.
            drop(summary_tx);
            router.directory = Some(std::sync::Arc::new(next.clone()));
            None
        }
    };
    if let Some(rt) = &ari {
        spawn_ari_health(rt.link.state.clone(), health.clone());
    }
    let http_stop = CancellationToken::new();
    let mut http_addr = None;
    let http_task = if config.health.enabled {
        // Only the allowlisted sources (Asterisk, the management LAN) are answered: the
        // dialplan asks `/v1/calls/{id}/next` here.
        let http = HttpServer::bind(config.health.listen)
            .await
            .with_context(|| format!("binding health listener {}", config.health.listen))?
            .with_source_filter({
                let guard = guard.clone();
                Arc::new(move |ip| guard.allows(ip))
            });
        http_addr = Some(http.local_addr()?);
        Some(tokio::spawn(http.run(
            Arc::new(http_router(health.clone(), next.clone(), tunnel.clone())),
            http_stop.clone(),
        )))
    } else {
        None
    };

    // The writer opens the spool itself and retries while it cannot (a full or read-only
    // disk at start); `/health` shows a `records` component meanwhile.
    let records_task = if config.records.enabled {
        Some(tokio::spawn(write_records(
            summary_rx,
            RecordsWriter {
                dir: config.records.spool_dir(&state_dir),
                max_file_bytes: config.records.max_file_bytes,
                keep_files: config.records.keep_files,
                numbers: config.records.caller_numbers,
                retry: RECORDS_RETRY,
            },
            health.clone(),
        )))
    } else {
        health.set_component(
            component::RECORDS,
            Component::new(ComponentStatus::NotConfigured, "records.enabled = false"),
        );
        None
    };

    // Asterisk on the far side of the tunnel asks `/v1/calls/{id}/next` at the tunnel
    // address: carry those connections to the health listener (same allowlist).
    if let (Some(tunnel), Some(addr)) = (&tunnel, http_addr) {
        let listener = tunnel
            .listen(addr.port())
            .await
            .context("listening for health requests inside the WireGuard tunnel")?;
        let local = match addr.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => {
                std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
            }
            ip if ip.is_unspecified() => {
                std::net::SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
            }
            _ => addr,
        };
        let guard = guard.clone();
        crate::tunnel::forward::serve_local(
            listener,
            local,
            Arc::new(move |ip| guard.allows(ip)),
            tunnel_stop.clone(),
        );
    }

    if config.guard.nftables {
        load_nftables(
            &config,
            audiosocket_addr.port(),
            http_addr.map(|a| a.port()),
        )
        .await;
    }

    // Before READY=1: a SIGHUP (`systemctl reload`) right after it must reload, not kill.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let serving = tokio::spawn(server.run(Arc::new(router), stop.clone()));
    health.set_ready(true);
    // READY=1 goes first: systemd ignores WATCHDOG=1 before it, and the order is promised.
    notify::ready(&format!(
        "ready; audiosocket {audiosocket_addr}; health {}; {}",
        http_addr.map_or("off".to_owned(), |a| a.to_string()),
        health.status_line()
    ));
    let watchdog = Watchdog::spawn(health.clone(), watchdog_interval)
        .context("starting the watchdog thread")?;
    info!(audiosocket = %audiosocket_addr, health = ?http_addr, "ready");

    let mut current = config;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = hup.recv() => {
                notify::reloading();
                match reload(&current, path.as_deref(), &guard, &breaker, &health, &gen_tx) {
                    Ok(new) => {
                        current = new;
                        info!("config reloaded; new calls use it");
                    }
                    Err(e) => error!(error = %format!("{e:#}"), "reload failed; keeping the running config"),
                }
                notify::reloaded(&health.status_line());
            }
        }
    }

    info!("shutdown requested");
    health.set_stopping();
    notify::stopping(&format!("stopping; {}", health.status_line()));
    stop.cancel();
    let mut serving = serving;
    loop {
        let live = health.live_calls();
        if live > 0 {
            notify::extend_timeout(
                Duration::from_secs(5),
                &format!("stopping; draining {live} live calls"),
            );
        }
        tokio::select! {
            r = &mut serving => {
                r.context("listener task")?;
                break;
            }
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    if let Some(rt) = &ari {
        // Sessions ended with the listener: let their transfers to the operators finish.
        rt.controller
            .settle(std::time::Duration::from_secs(5))
            .await;
    }
    ari_stop.cancel();
    if let Some(rt) = ari {
        // Its tasks hold the controller, whose hooks hold a sender of the records channel.
        for t in rt.tasks {
            let _ = t.await;
        }
    }
    if let Some(t) = records_task {
        // Every sender is gone once the last call task and ARI flow ended; the timeout is a
        // backstop against a flow that never ends, not a normal path.
        if tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .is_err()
        {
            warn!("call records: writer still waiting at shutdown; stopping anyway");
        }
    }
    http_stop.cancel();
    if let Some(t) = http_task {
        let _ = t.await;
    }
    tunnel_stop.cancel();
    watchdog.stop();
    Ok(())
}

fn reload(
    old: &Config,
    path: Option<&Path>,
    guard: &Guard,
    breaker: &Breaker,
    health: &HealthState,
    gen_tx: &watch::Sender<Arc<Generation>>,
) -> anyhow::Result<Config> {
    let new = Config::load(path)?;
    warn_plaintext_secrets(&new);
    let agent = crate::agent::from_config(&new.agent)?;
    if new.audiosocket.listen != old.audiosocket.listen
        || new.health.listen != old.health.listen
        || new.health.enabled != old.health.enabled
        || new.state.dir != old.state.dir
        || new.records != old.records
    {
        warn!("listen addresses, [state] and [records] changes take effect on restart");
    }
    guard.reconfigure(new.guard.clone());
    breaker.reconfigure(&new.fallback);
    health.set_maintenance(new.fallback.maintenance);
    if new.fallback.maintenance {
        warn!("maintenance switch on: every call goes to the operators");
    }
    gen_tx.send_replace(Arc::new(generation(&new, agent)?));
    Ok(new)
}

/// Warns about every URL that would carry an API key or password unencrypted to another
/// machine ([`Config::plaintext_secret_urls`]).
fn warn_plaintext_secrets(config: &Config) {
    for (key, url) in config.plaintext_secret_urls() {
        warn!(%key, %url, "a secret will be sent unencrypted (ws:// or http://) to a host that is not loopback; use wss:// or https://");
    }
}

/// How often the records writer retries a spool it cannot open or write.
pub const RECORDS_RETRY: Duration = Duration::from_secs(2);

/// Where and how [`write_records`] keeps records.
#[derive(Debug, Clone)]
pub struct RecordsWriter {
    /// The spool directory.
    pub dir: PathBuf,
    /// `records.max_file_bytes`.
    pub max_file_bytes: u64,
    /// `records.keep_files`.
    pub keep_files: u32,
    /// `records.caller_numbers`.
    pub numbers: CallerNumbers,
    /// Wait between attempts while the spool cannot be opened or written.
    pub retry: Duration,
}

/// Writes every summary from `rx` as a record, until `rx` closes and is drained.
///
/// The spool is opened at once and reopened after any failure, every `w.retry`, so a disk
/// that was full or read-only at start is used as soon as it works again. Meanwhile
/// `/health` has `records` degraded with the reason, the record in hand waits and later ones
/// wait in the bounded queue (full: dropped and counted by the listener). A record is only
/// given up (`voicegate_records_lost_total{reason}`) when it cannot be encoded, or at
/// shutdown while the spool still does not work.
pub async fn write_records(
    mut rx: mpsc::Receiver<crate::call::CallSummary>,
    w: RecordsWriter,
    health: Arc<HealthState>,
) {
    let set = |status, detail: String| {
        health.set_component(component::RECORDS, Component::new(status, detail));
    };
    let lost = |reason: &'static str, n: u64| {
        ::metrics::counter!(crate::health::metrics::RECORDS_LOST, "reason" => reason).increment(n);
    };
    let mut spool: Option<Arc<Mutex<Spool>>> = None;
    let mut pending: Option<(uuid::Uuid, CallRecord)> = None;
    let mut degraded = false;
    loop {
        let failure = if let Some(s) = &spool {
            if pending.is_none() {
                match rx.recv().await {
                    Some(summary) => {
                        let record = summary.record(w.numbers);
                        pending = Some((summary.call_id, record));
                    }
                    None => return,
                }
            }
            let s = s.clone();
            // pending is Some: set just above or kept from a failed attempt.
            let (call_id, record) = pending.clone().expect("a record in hand");
            let written = tokio::task::spawn_blocking(move || {
                // Only this task appends, one record at a time: the lock is never
                // contended, and open() repairs whatever a panic inside append left.
                let mut spool = s.lock().unwrap_or_else(|p| p.into_inner());
                spool.append(&record)
            })
            .await;
            match written {
                Ok(Ok(())) => {
                    pending = None;
                    continue;
                }
                Ok(Err(
                    e @ (crate::records::spool::SpoolError::TooLarge(_)
                    | crate::records::spool::SpoolError::Encode(_)),
                )) => {
                    // Cannot happen after from_facts's bounds; never retried.
                    error!(%call_id, error = %e, "call record cannot be encoded; lost");
                    lost("encode", 1);
                    pending = None;
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("records task: {e}"),
            }
        } else {
            let (dir, max, keep) = (w.dir.clone(), w.max_file_bytes, w.keep_files);
            match tokio::task::spawn_blocking(move || Spool::open(&dir, max, keep)).await {
                Ok(Ok(s)) => {
                    info!(dir = %w.dir.display(), quarantined_bytes = s.quarantined_bytes(), "call records spool open");
                    set(
                        ComponentStatus::Ok,
                        format!("writing to {}", w.dir.display()),
                    );
                    degraded = false;
                    spool = Some(Arc::new(Mutex::new(s)));
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("records task: {e}"),
            }
        };
        // The spool failed: reopen it (which also cuts a partial write) after a pause.
        spool = None;
        if !degraded {
            degraded = true;
            error!(dir = %w.dir.display(), error = %failure, "call records cannot be written; retrying");
        }
        set(
            ComponentStatus::Degraded,
            format!(
                "cannot write records: {failure}; retrying every {} ms",
                w.retry.as_millis()
            ),
        );
        if rx.is_closed() {
            // Shutting down (every sender is gone): this attempt was the last one.
            let left = rx.len() as u64 + pending.is_some() as u64;
            if left > 0 {
                error!(dir = %w.dir.display(), records = left, "shutting down with call records unwritten; lost");
                lost("spool_unavailable", left);
            }
            return;
        }
        tokio::time::sleep(w.retry).await;
    }
}

async fn load_nftables(config: &Config, audiosocket_port: u16, health_port: Option<u16>) {
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

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Mirrors the ARI events link state into `/health` and `STATUS=`.
fn spawn_ari_health(
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
fn spawn_tunnel_health(
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
