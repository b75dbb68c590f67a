//! Loopback port forwards through the tunnel, in the manner of onetun: a TCP listener on a
//! loopback address whose every connection is carried to one address inside the tunnel.
//! This is how the ARI client (reqwest for REST, tokio-tungstenite for the events
//! WebSocket), which only knows how to dial a host and port, reaches a remote Asterisk.

use super::Tunnel;
use std::io;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Binds `listen` and, until `stop`, carries each accepted connection to `to` through
/// `tunnel`. Returns the bound address (useful when `listen` has port 0) and the task.
///
/// # Errors
/// The bind error.
pub async fn forward(
    tunnel: Tunnel,
    listen: SocketAddr,
    to: SocketAddr,
    stop: CancellationToken,
) -> io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    info!(%local, %to, "forwarding through the WireGuard tunnel");
    let task = tokio::spawn(async move {
        loop {
            let (mut client, peer) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "forward accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let tunnel = tunnel.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                let mut remote = match tunnel.connect(to).await {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(%peer, %to, error = %e, "cannot reach the far side through the tunnel");
                        return;
                    }
                };
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut client, &mut remote) => {
                        debug!(%peer, %to, result = ?r, "forwarded connection closed");
                    }
                    () = stop.cancelled() => {}
                }
            });
        }
    });
    Ok((local, task))
}

/// Decides whether a connection from a tunnel address may be carried (the guard's
/// allowlist in the service).
pub(crate) type SourceFilter = std::sync::Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>;

/// The other direction: carries each connection arriving through the tunnel on `listener`
/// to the local TCP address `to`, if `allow` accepts its tunnel source address (others are
/// closed at once). This is how Asterisk, on the far side, reaches voicegate's health
/// listener (`GET /v1/calls/{id}/next` after modes 1 and 2) at the tunnel address. Runs
/// until `stop` or the tunnel stops.
pub(crate) fn serve_local(
    mut listener: super::TunnelListener,
    to: SocketAddr,
    allow: SourceFilter,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    info!(local = %listener.local_addr(), %to, "serving through the WireGuard tunnel");
    tokio::spawn(async move {
        loop {
            let (mut remote, peer) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => return,
                },
            };
            if !allow(peer.ip()) {
                debug!(%peer, "tunnel connection from outside the allowlist closed");
                continue;
            }
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut local = match tokio::net::TcpStream::connect(to).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(%peer, %to, error = %e, "cannot reach the local listener");
                        return;
                    }
                };
                let _ = local.set_nodelay(true);
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut remote, &mut local) => {
                        debug!(%peer, %to, result = ?r, "tunnel connection closed");
                    }
                    () = stop.cancelled() => {}
                }
            });
        }
    })
}
