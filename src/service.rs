//! `voicegate run`: builds everything the config describes, binds the listeners, and runs
//! until SIGTERM or SIGINT, then shuts down gracefully (stop accepting, let live calls finish
//! for `audiosocket.shutdown_grace_s`, hang up the rest).

use crate::audiosocket::server::{Server, ServerParams};
use crate::config::Config;
use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Runs the service until a termination signal.
///
/// # Errors
/// If the agent cannot be built or a listener cannot be bound.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let agent = crate::agent::from_config(&config.agent)?;
    let server = Server::bind(
        config.audiosocket.listen,
        agent,
        ServerParams::from_config(&config.audiosocket),
    )
    .await
    .with_context(|| format!("binding AudioSocket listener {}", config.audiosocket.listen))?;
    let stop = CancellationToken::new();
    // What the dialplan does after an AudioSocket() call: GET /v1/calls/{id}/next.
    let next = std::sync::Arc::new(crate::call::next::NextStore::new());
    let ari_stop = CancellationToken::new();
    let (server, ari) = match &config.ari {
        Some(c) => {
            // Its own stop: ARI outlives the listener until the last transfer is confirmed.
            let rt = crate::ari::controller::start(
                c,
                config.audiosocket.listen,
                next.clone(),
                ari_stop.clone(),
            )
            .context("starting ARI")?;
            (
                server.with_directory(std::sync::Arc::new(rt.controller.clone())),
                Some(rt),
            )
        }
        None => (
            server.with_directory(std::sync::Arc::new(next.clone())),
            None,
        ),
    };
    let serving = tokio::spawn(server.run(stop.clone()));
    shutdown_signal().await;
    info!("shutdown requested");
    stop.cancel();
    serving.await.context("listener task")?;
    if let Some(rt) = &ari {
        // Sessions ended with the listener: let their transfers to the operators finish.
        rt.controller
            .settle(std::time::Duration::from_secs(5))
            .await;
    }
    ari_stop.cancel();
    Ok(())
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
