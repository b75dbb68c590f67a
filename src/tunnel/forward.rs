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
