//! `voicegate run`: builds everything the config describes, binds the listeners, and runs
//! until SIGTERM or SIGINT, then shuts down gracefully (stop accepting, let live calls finish
//! for `audiosocket.shutdown_grace_s`, hang up the rest).
//!
//! Start-up, one step a function: `Base::prepare` (metrics recorder, state directory,
//! agent, breaker, health, guard, the first [`Generation`]) → `start_calls` (the
//! AudioSocket listener, the WireGuard tunnel and its forwards) → `start_ari` →
//! `start_http` (the health listener) → `start_records` → nftables (if configured) →
//! `go_ready` (`READY=1` and the watchdog thread) → `serve` (SIGHUP reloads: the new
//! agent, limits and switches apply to new calls; live calls finish on the generation they
//! started with; listen addresses and the state directory need a restart) →
//! `Parts::shut_down`.
//!
//! There is no test hook in here: the watchdog test (`tests/suite/appliance_notify.rs`) runs
//! [`run`] inside its own process and stalls that runtime itself.

mod feeds;
mod generation;
pub mod http;
pub(crate) mod records;
pub(crate) mod webhooks;

pub(crate) use generation::generation;
pub use http::{health_routes, http_router};
pub use records::{RECORDS_RETRY, RecordsWriter, write_records};

use crate::audiosocket::server::Server;
use crate::call::next::NextStore;
use crate::call::route::{Generation, Router as CallRouter};
use crate::config::Config;
use crate::fallback::Breaker;
use crate::guard::Guard;
use crate::health::http::HttpServer;
use crate::health::{Component, ComponentStatus, HealthState, Watchdog, component, notify};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Summaries of finished calls waiting for the records writer; beyond this a record is
/// dropped and counted (`voicegate_records_lost_total{reason="queue_full"}`).
pub(crate) const RECORDS_QUEUE: usize = 1024;

/// Runs the service until a termination signal. `path` is the config file to re-read on
/// SIGHUP (`None`: the default path, else the built-in defaults).
///
/// # Errors
/// If the agent cannot be built or a listener cannot be bound.
pub async fn run(mut config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let state_dir = config.state.dir();
    generation::console_maintenance(&mut config, &state_dir);
    let base = Base::prepare(&config)?;
    // Bounded: a slow disk drops records (counted), never grows memory.
    let (summary_tx, summary_rx) = mpsc::channel(RECORDS_QUEUE);
    let stops = Stops::default();
    let mut calls = start_calls(&config, &base, &stops, summary_tx.clone()).await?;
    // What the dialplan does after an AudioSocket() call: GET /v1/calls/{id}/next.
    let next = Arc::new(NextStore::new());
    let ari = start_ari(&config, &base, &mut calls, next.clone(), summary_tx, &stops)?;
    let console = start_console(&config, &base, &mut calls, next.clone(), ari.is_some())?;
    // The dialplan's announcements (modes 1 and 2): POST /v1/calls/{id}.
    let announcements = Arc::new(crate::profiles::announce::Announcements::new());
    calls.router.announcements = Some(announcements.clone());
    let incoming = incoming_connector(&config, &mut calls);
    let http = start_http(
        &config,
        &base,
        next,
        (announcements, incoming),
        calls.tunnel.clone(),
        console,
        &stops,
    );
    let http = http.await?;
    let hooks = &config.webhooks;
    let summary_rx = webhooks::start(
        hooks,
        &base.state_dir,
        &base.health,
        summary_rx,
        &stops.webhooks,
    )?;
    let records = start_records(&config, &base, summary_rx);
    if let (Some(tunnel), Some(addr)) = (&calls.tunnel, http.addr) {
        forward_health_into_tunnel(tunnel, addr, &base.guard, &stops).await?;
    }
    if config.guard.nftables {
        let http_port = http.addr.map(|a| a.port());
        feeds::load_nftables(&config, calls.addr.port(), http_port).await;
    }
    let running = go_ready(&base, calls, http, ari, records, &stops)?;
    serve(&base, config, path, running.signals).await;
    running.parts.shut_down(&base, stops).await
}

/// What every step shares: built once at start.
struct Base {
    guard: Arc<Guard>,
    breaker: Arc<Breaker>,
    health: Arc<HealthState>,
    state_dir: PathBuf,
    watchdog_interval: Option<Duration>,
    gen_tx: watch::Sender<Arc<Generation>>,
}

/// The stop switches, one per part, cancelled in shutdown order.
#[derive(Default)]
struct Stops {
    listener: CancellationToken,
    ari: CancellationToken,
    http: CancellationToken,
    tunnel: CancellationToken,
    webhooks: CancellationToken,
}

impl Base {
    /// Metrics, the state directory, the agent, breaker, health state, guard and the first
    /// generation.
    fn prepare(config: &Config) -> anyhow::Result<Self> {
        crate::health::metrics::install();
        generation::warn_plaintext_secrets(config);
        // Detached: the upkeep task runs for the life of the process.
        drop(crate::health::metrics::spawn_upkeep());
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
        let budget_dir = state_ok.then_some(state_dir.as_path());
        let guard =
            Guard::new(config.guard.clone(), budget_dir).context("loading the AI budget")?;
        let (gen_tx, _) = watch::channel(Arc::new(generation(config, agent)?));
        Ok(Base {
            guard: Arc::new(guard),
            breaker,
            health,
            state_dir,
            watchdog_interval: notify::watchdog_interval(),
            gen_tx,
        })
    }
}

/// The call listener, ready to run: bound, with its router and (optionally) the tunnel.
struct Calls {
    server: Server,
    router: CallRouter,
    addr: SocketAddr,
    tunnel: Option<crate::tunnel::Tunnel>,
    /// With `[websocket]`: the chan_websocket listener, bound, and its settings.
    websocket: Option<(
        crate::chanws::server::Server,
        crate::chanws::server::ListenSettings,
    )>,
    /// With `[ari] media = "rtp"`: the calls the Stasis controller sets up over RTP.
    rtp: Option<mpsc::Receiver<crate::call::media_rtp::RtpCall>>,
    /// With `[ari] media = "websocket"`: the calls the Stasis controller connects.
    ws_calls: Option<mpsc::Receiver<crate::call::stasis::WsCall>>,
    /// The `Dial(WebSocket/INCOMING/...)` calls voicegate connects when the dialplan
    /// announces them.
    incoming_ws: Option<mpsc::Receiver<crate::call::media_ws::IncomingCall>>,
}

/// Binds the AudioSocket listener and builds the call router; with `[wireguard]`, starts
/// the tunnel: calls from a remote Asterisk arrive on the tunnel address (same port as the
/// LAN listener, same guard), and loopback forwards carry ARI the other way.
async fn start_calls(
    config: &Config,
    base: &Base,
    stops: &Stops,
    summaries: mpsc::Sender<crate::call::CallSummary>,
) -> anyhow::Result<Calls> {
    let listen = config.audiosocket.listen;
    let server = Server::bind(listen)
        .await
        .with_context(|| format!("binding AudioSocket listener {listen}"))?;
    let mut router = CallRouter::new(base.gen_tx.subscribe());
    router.guard = Some(base.guard.clone());
    router.breaker = base.breaker.clone();
    let beat = crate::health::accept_beat_period(base.watchdog_interval);
    router.health = Some((base.health.clone(), beat));
    router.summaries = Some(summaries.into());
    let addr = server.local_addr()?;
    let (server, tunnel) = match &config.wireguard {
        Some(wg) => {
            let (tunnel, listener) = start_tunnel(wg, addr.port(), base, stops).await?;
            (server.with_tunnel(listener), Some(tunnel))
        }
        None => (server, None),
    };
    let detail = format!("listening on {addr}");
    let up = Component::new(ComponentStatus::Ok, detail);
    base.health.set_component(component::AUDIOSOCKET, up);
    let websocket = match &config.websocket {
        Some(ws) => Some(bind_websocket(ws, config.audiosocket.shutdown_grace()).await?),
        None => None,
    };
    Ok(Calls {
        server,
        router,
        addr,
        rtp: None,
        ws_calls: None,
        incoming_ws: None,
        tunnel,
        websocket,
    })
}

/// Binds the chan_websocket listener (`[websocket]`) and resolves its password.
async fn bind_websocket(
    ws: &crate::chanws::config::ChanWsConfig,
    shutdown_grace: Duration,
) -> anyhow::Result<(
    crate::chanws::server::Server,
    crate::chanws::server::ListenSettings,
)> {
    use crate::chanws::server::{Credentials, ListenSettings, Server as WsServer};
    let credentials = match (&ws.username, &ws.password) {
        (Some(user), Some(password)) => {
            let password = password.resolve().context("websocket.password")?;
            Some(Credentials::new(user, password.expose()))
        }
        _ => None,
    };
    let server = WsServer::bind(ws.listen)
        .await
        .with_context(|| format!("binding the chan_websocket listener {}", ws.listen))?;
    let settings = ListenSettings {
        handshake_timeout: ws.handshake_timeout(),
        shutdown_grace,
        credentials,
        max_message_bytes: ws.max_message_bytes,
    };
    Ok((server, settings))
}

/// Starts the WireGuard tunnel, its listener for calls on `port` and its
/// `[[wireguard.forward]]`s, and the task that mirrors its peers into `/health` and
/// `/metrics`.
async fn start_tunnel(
    wg: &crate::tunnel::WireGuardConfig,
    port: u16,
    base: &Base,
    stops: &Stops,
) -> anyhow::Result<(crate::tunnel::Tunnel, crate::tunnel::TunnelListener)> {
    let (tunnel, _driver) = crate::tunnel::Tunnel::from_config(wg, stops.tunnel.clone())
        .await
        .context("starting the WireGuard tunnel")?;
    let listener = tunnel
        .listen(port)
        .await
        .context("listening inside the WireGuard tunnel")?;
    for f in &wg.forwards {
        crate::tunnel::forward::forward(tunnel.clone(), f.listen, f.to, stops.tunnel.clone())
            .await
            .with_context(|| format!("binding WireGuard forward {}", f.listen))?;
    }
    let detail = format!("{} udp {}", tunnel.address(), tunnel.udp_addr());
    let up = Component::new(ComponentStatus::Ok, detail);
    base.health.set_component(component::TUNNEL, up);
    let health = base.health.clone();
    feeds::spawn_tunnel_health(
        tunnel.clone(),
        wg.silent_after(),
        health,
        stops.tunnel.clone(),
    );
    Ok((tunnel, listener))
}

/// With `[ari]`, starts the ARI controller (its own stop: ARI outlives the listener until
/// the last transfer is confirmed) and makes it the calls' directory; without, the
/// directory is the `/next` store alone.
fn start_ari(
    config: &Config,
    base: &Base,
    calls: &mut Calls,
    next: Arc<NextStore>,
    summaries: mpsc::Sender<crate::call::CallSummary>,
    stops: &Stops,
) -> anyhow::Result<Option<crate::call::stasis::AriRuntime>> {
    let Some(c) = &config.ari else {
        // The records task ends when the last sender is gone: only the listener keeps one.
        drop(summaries);
        calls.router.directory = Some(Arc::new(next));
        return Ok(None);
    };
    let hooks = generation::ari_hooks(
        base.gen_tx.subscribe(),
        base.breaker.clone(),
        summaries.into(),
    );
    // The bound address: with port 0 in the config, Asterisk must still find us.
    let mut rt = crate::call::stasis::start(c, calls.addr, next, hooks, stops.ari.clone())
        .context("starting ARI")?;
    calls.rtp = rt.rtp_calls.take();
    calls.ws_calls = rt.ws_calls.take();
    calls.router.directory = Some(Arc::new(rt.controller.clone()));
    feeds::spawn_ari_health(rt.link.state.clone(), base.health.clone());
    Ok(Some(rt))
}

/// With `[console] enabled`, puts the console in front of the calls' directory (every call
/// is shown live and can be taken over) and returns its routes' state.
fn start_console(
    config: &Config,
    base: &Base,
    calls: &mut Calls,
    next: Arc<NextStore>,
    stasis: bool,
) -> anyhow::Result<Option<Arc<crate::console::routes::Deps>>> {
    use crate::console::{Console, ConsoleDirectory, auth::Auth, routes::Deps};
    let c = &config.console;
    if !c.enabled {
        return Ok(None);
    }
    if !config.health.enabled {
        anyhow::bail!("console.enabled needs the health listener ([health] enabled = true)");
    }
    let hash = c.hash().map_err(anyhow::Error::msg)?;
    let mode = if stasis { "stasis" } else { "audiosocket" };
    let console = Console::new(
        mode,
        config.records.caller_numbers,
        base.gen_tx.clone(),
        base.health.clone(),
        next.clone(),
        base.state_dir.clone(),
        c.summary
            .as_ref()
            .map(crate::console::SummaryConfig::client)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    );
    let inner = calls
        .router
        .directory
        .take()
        .unwrap_or_else(|| Arc::new(next));
    calls.router.directory = Some(Arc::new(ConsoleDirectory {
        inner,
        console: console.clone(),
    }));
    info!(listen = %config.health.listen, "console enabled at /console on the health listener");
    Ok(Some(Arc::new(Deps {
        console,
        auth: Arc::new(Auth::new(hash, crate::console::session_lifetime(c))),
        spool: config
            .records
            .enabled
            .then(|| config.records.spool_dir(&base.state_dir)),
        guard: Some(base.guard.clone()),
        tunnel: calls.tunnel.clone(),
        dropped: Default::default(),
    })))
}

/// The health listener, when enabled: its address and task.
struct Http {
    addr: Option<SocketAddr>,
    task: Option<JoinHandle<()>>,
}

/// Binds the health listener (`/health`, `/metrics`, `/v1/wireguard`, `/v1/calls/{id}/next`)
/// when `[health] enabled`. Only the allowlisted sources (Asterisk, the management LAN) are
/// answered: the dialplan asks `/v1/calls/{id}/next` here.
async fn start_http(
    config: &Config,
    base: &Base,
    next: Arc<NextStore>,
    announce: (
        Arc<crate::profiles::announce::Announcements>,
        Option<Arc<crate::call::media_ws::IncomingConnector>>,
    ),
    tunnel: Option<crate::tunnel::Tunnel>,
    console: Option<Arc<crate::console::routes::Deps>>,
    stops: &Stops,
) -> anyhow::Result<Http> {
    let (announcements, incoming) = announce;
    if !config.health.enabled {
        return Ok(Http {
            addr: None,
            task: None,
        });
    }
    let listen = config.health.listen;
    let guard = base.guard.clone();
    let http = HttpServer::bind(listen)
        .await
        .with_context(|| format!("binding health listener {listen}"))?
        .with_source_filter(Arc::new(move |ip| guard.allows(ip)));
    let addr = http.local_addr()?;
    let mut router = http_router(base.health.clone(), next, tunnel);
    if let Some(deps) = console {
        router = crate::console::routes::routes(router, deps);
    }
    if let Some(connector) = incoming {
        router = http::incoming_ws_route(router, connector);
    }
    let router = Arc::new(http::announce_route(router, announcements));
    let task = tokio::spawn(http.run(router, stops.http.clone()));
    Ok(Http {
        addr: Some(addr),
        task: Some(task),
    })
}

/// The connector for `Dial(WebSocket/INCOMING/...)` announcements, when voicegate knows
/// Asterisk's HTTP server (`[websocket] asterisk_url`, else `[ari] url`); its calls' queue
/// goes into `calls`, served with the other listeners.
fn incoming_connector(
    config: &Config,
    calls: &mut Calls,
) -> Option<Arc<crate::call::media_ws::IncomingConnector>> {
    let ws = config.websocket.clone().unwrap_or_default();
    let base = ws
        .asterisk_url
        .clone()
        .or_else(|| config.ari.as_ref().map(|a| a.url.clone()))?;
    let (tx, rx) = mpsc::channel(crate::call::media_rtp::RTP_CALL_QUEUE);
    calls.incoming_ws = Some(rx);
    Some(Arc::new(crate::call::media_ws::IncomingConnector {
        base,
        handshake_timeout: ws.handshake_timeout(),
        max_message_bytes: ws.max_message_bytes,
        calls: tx,
    }))
}

/// Starts the records writer when `[records] enabled`. It opens the spool itself and
/// retries while it cannot (a full or read-only disk at start); `/health` shows a `records`
/// component meanwhile.
fn start_records(
    config: &Config,
    base: &Base,
    summaries: mpsc::Receiver<crate::call::CallSummary>,
) -> Option<JoinHandle<()>> {
    if !config.records.enabled {
        let off = Component::new(ComponentStatus::NotConfigured, "records.enabled = false");
        base.health.set_component(component::RECORDS, off);
        return None;
    }
    let writer = RecordsWriter {
        dir: config.records.spool_dir(&base.state_dir),
        max_file_bytes: config.records.max_file_bytes,
        keep_files: config.records.keep_files,
        numbers: config.records.caller_numbers,
        retry: RECORDS_RETRY,
    };
    Some(tokio::spawn(write_records(
        summaries,
        writer,
        base.health.clone(),
    )))
}

/// Asterisk on the far side of the tunnel asks `/v1/calls/{id}/next` at the tunnel address:
/// carries those connections to the health listener at `addr` (same allowlist).
async fn forward_health_into_tunnel(
    tunnel: &crate::tunnel::Tunnel,
    addr: SocketAddr,
    guard: &Arc<Guard>,
    stops: &Stops,
) -> anyhow::Result<()> {
    let listener = tunnel
        .listen(addr.port())
        .await
        .context("listening for health requests inside the WireGuard tunnel")?;
    let local = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        ip if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    let guard = guard.clone();
    let allow = Arc::new(move |ip| guard.allows(ip));
    crate::tunnel::forward::serve_local(listener, local, allow, stops.tunnel.clone());
    Ok(())
}

/// The running service's parts, for shutdown.
struct Parts {
    serving: JoinHandle<()>,
    ari: Option<crate::call::stasis::AriRuntime>,
    records: Option<JoinHandle<()>>,
    http: Option<JoinHandle<()>>,
    watchdog: Watchdog,
}

/// The service once ready: its parts and the SIGHUP stream.
struct Running {
    parts: Parts,
    signals: feeds::Signals,
}

/// Installs the signal handlers, starts serving calls, says `READY=1` and starts the
/// watchdog thread.
fn go_ready(
    base: &Base,
    calls: Calls,
    http: Http,
    ari: Option<crate::call::stasis::AriRuntime>,
    records: Option<JoinHandle<()>>,
    stops: &Stops,
) -> anyhow::Result<Running> {
    // Before READY=1: a SIGHUP (`systemctl reload`) right after it must reload, and a
    // SIGTERM (`systemctl stop`) shut down gracefully, not kill.
    let signals = feeds::Signals::install().context("installing the signal handlers")?;
    let router = Arc::new(calls.router);
    let websocket = calls.websocket.map(|(server, settings)| {
        let handler = Arc::new(crate::call::media_ws::WebSocketCalls {
            router: router.clone(),
            settings,
        });
        server.run(handler, stops.listener.clone())
    });
    // RTP and WebSocket externalMedia calls go through the same router and stop with the
    // listener, same grace.
    let grace = router.generation.borrow().params.shutdown_grace;
    let rtp = calls.rtp.map(|rtp| {
        crate::call::media_rtp::serve(router.clone(), rtp, stops.listener.clone(), grace)
    });
    let ws_calls = calls
        .ws_calls
        .map(|ws| crate::call::media_rtp::serve(router.clone(), ws, stops.listener.clone(), grace));
    let incoming_ws = calls
        .incoming_ws
        .map(|ws| crate::call::media_rtp::serve(router.clone(), ws, stops.listener.clone(), grace));
    let audiosocket = calls.server.run(router, stops.listener.clone());
    // One task serves every listener: shutdown drains the calls of each.
    let serving = tokio::spawn(async move {
        let websocket = async move {
            if let Some(ws) = websocket {
                ws.await;
            }
        };
        let rtp = async move {
            if let Some(rtp) = rtp {
                rtp.await;
            }
        };
        let ws_calls = async move {
            if let Some(ws) = ws_calls {
                ws.await;
            }
        };
        let incoming_ws = async move {
            if let Some(ws) = incoming_ws {
                ws.await;
            }
        };
        tokio::join!(audiosocket, websocket, rtp, ws_calls, incoming_ws);
    });
    base.health.set_ready(true);
    // READY=1 goes first: systemd ignores WATCHDOG=1 before it, and the order is promised.
    let health_at = http.addr.map_or("off".to_owned(), |a| a.to_string());
    let status = base.health.status_line();
    notify::ready(&format!(
        "ready; audiosocket {}; health {health_at}; {status}",
        calls.addr
    ));
    let watchdog = Watchdog::spawn(base.health.clone(), base.watchdog_interval)
        .context("starting the watchdog thread")?;
    info!(audiosocket = %calls.addr, health = ?http.addr, "ready");
    let parts = Parts {
        serving,
        ari,
        records,
        http: http.task,
        watchdog,
    };
    Ok(Running { parts, signals })
}

/// Serves until SIGTERM or SIGINT, reloading the config on every SIGHUP.
async fn serve(base: &Base, config: Config, path: Option<PathBuf>, mut signals: feeds::Signals) {
    let mut current = config;
    while signals.next().await == feeds::Received::Reload {
        notify::reloading();
        let (guard, breaker, health) = (&base.guard, &base.breaker, &base.health);
        match generation::reload(
            &current,
            path.as_deref(),
            guard,
            breaker,
            health,
            &base.gen_tx,
        ) {
            Ok(new) => {
                current = new;
                info!("config reloaded; new calls use it");
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "reload failed; keeping the running config")
            }
        }
        notify::reloaded(&base.health.status_line());
    }
}

impl Parts {
    /// Stops accepting, drains live calls (telling systemd while it takes), lets ARI
    /// transfers settle, then stops ARI, the records writer, the health listener, the tunnel
    /// and the watchdog, in that order.
    async fn shut_down(self, base: &Base, stops: Stops) -> anyhow::Result<()> {
        info!("shutdown requested");
        base.health.set_stopping();
        notify::stopping(&format!("stopping; {}", base.health.status_line()));
        stops.listener.cancel();
        drain(&base.health, self.serving).await?;
        if let Some(rt) = &self.ari {
            // Sessions ended with the listener: let their transfers to the operators finish.
            rt.controller.settle(Duration::from_secs(5)).await;
        }
        stops.ari.cancel();
        if let Some(rt) = self.ari {
            // Its tasks hold the controller, whose hooks hold a sender of the records channel.
            for t in rt.tasks {
                let _ = t.await;
            }
        }
        if let Some(t) = self.records {
            // Every sender is gone once the last call task and ARI flow ended; the timeout
            // is a backstop against a flow that never ends, not a normal path.
            if tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .is_err()
            {
                warn!("call records: writer still waiting at shutdown; stopping anyway");
            }
        }
        // The records are written, so every call's event is in the outboxes.
        stops.webhooks.cancel();
        stops.http.cancel();
        if let Some(t) = self.http {
            let _ = t.await;
        }
        stops.tunnel.cancel();
        self.watchdog.stop();
        Ok(())
    }
}

/// Waits for the listener task (which lets live calls finish within their grace), telling
/// systemd every 2 s how many are still draining.
async fn drain(health: &HealthState, mut serving: JoinHandle<()>) -> anyhow::Result<()> {
    loop {
        let live = health.live_calls();
        if live > 0 {
            let status = format!("stopping; draining {live} live calls");
            notify::extend_timeout(Duration::from_secs(5), &status);
        }
        tokio::select! {
            r = &mut serving => return r.context("listener task"),
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
