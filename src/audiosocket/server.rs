//! The AudioSocket listener: accepts connections from Asterisk over TCP and through the
//! WireGuard tunnel alike, reads each one's call id (`0x01`) and hands it on as an
//! [`Incoming`] to a [`Handler`], in its own task. It only listens: who is admitted, where a
//! call goes and what is kept of it is the handler's (the router in `call::route`).
//!
//! Per connection: [`Handler::screen`] on accept, before a byte is read (a refused one is
//! closed at once); then the call id within [`ListenSettings::call_id_timeout`] — anything
//! else closes that connection only and is reported to [`Handler::handshake_failed`]; then
//! [`Handler::call`]. Shutdown is two-staged: [`Server::run`] stops accepting when `stop` is
//! cancelled, waits for live calls up to [`ListenSettings::shutdown_grace`], then cancels the
//! `hangup` token each call was given, which makes each call send `0x00` and close.

use crate::audiosocket::{Connection, Message};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uuid::Uuid;

/// A byte stream a call can arrive on: a TCP stream or a WireGuard tunnel stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A connection that sent its call id.
pub struct Incoming {
    /// The connection; bytes read after the call id stay buffered in it.
    pub stream: Connection<Box<dyn Stream>>,
    /// The source: the TCP peer, or the peer's tunnel address.
    pub peer: SocketAddr,
    /// The call id of `0x01` (never nil).
    pub call_id: Uuid,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("peer", &self.peer)
            .field("call_id", &self.call_id)
            .finish_non_exhaustive()
    }
}

/// The listener's timing, read from the handler for each connection (a reload may change
/// them).
#[derive(Debug, Clone, Copy)]
pub struct ListenSettings {
    /// Time a new connection has to send its call id (`0x01`).
    pub call_id_timeout: Duration,
    /// How long live calls may go on after shutdown starts.
    pub shutdown_grace: Duration,
}

/// Why a connection did not become a call, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Closed before the call id.
    Closed,
    /// No call id within [`ListenSettings::call_id_timeout`].
    Timeout,
    /// Bytes that are not AudioSocket.
    Malformed,
    /// The first message was not a call id.
    NotCallId,
    /// The call id was 16 zero bytes (Asterisk never sends that).
    NilCallId,
}

impl HandshakeFailure {
    /// The label (`closed`, `timeout`, `malformed`, `not_call_id`, `nil_call_id`).
    pub(crate) fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::NotCallId => "not_call_id",
            HandshakeFailure::NilCallId => "nil_call_id",
        }
    }
}

/// What the listener hands connections to.
pub trait Handler: Send + Sync + 'static {
    /// What [`Self::screen`] lets through, carried to [`Self::call`] (a handshake slot).
    type Ticket: Send + 'static;

    /// Screens a new connection from `peer` before anything is read; `None` closes it.
    fn screen(&self, peer: SocketAddr) -> Option<Self::Ticket>;

    /// The connection from `peer` did not become a call.
    fn handshake_failed(&self, peer: SocketAddr, why: HandshakeFailure);

    /// Runs one call to its end. `hangup` is cancelled when shutdown's grace runs out.
    fn call(
        &self,
        incoming: Incoming,
        ticket: Self::Ticket,
        hangup: CancellationToken,
    ) -> impl Future<Output = ()> + Send;

    /// The listener's timing now.
    fn settings(&self) -> ListenSettings;

    /// How often the accept loop calls [`Self::beat`].
    fn beat_period(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// The accept loop is alive (for a watchdog).
    fn beat(&self) {}

    /// The listener stopped and every call ended.
    fn stopped(&self) {}
}

/// A bound AudioSocket listener, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    tunnel: Option<crate::tunnel::TunnelListener>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]).
    ///
    /// # Errors
    /// The bind error.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Server {
            listener: TcpListener::bind(addr).await?,
            tunnel: None,
        })
    }

    /// Also accepts AudioSocket calls arriving through the WireGuard tunnel on `listener`
    /// (the tunnel address and port); their peer is their tunnel source address.
    pub fn with_tunnel(mut self, listener: crate::tunnel::TunnelListener) -> Self {
        self.tunnel = Some(listener);
        self
    }

    /// The bound address.
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts calls for `handler` until `stop` is cancelled, then lets live calls finish
    /// for the grace period and hangs up the rest. Returns when every call task has ended.
    pub async fn run<H: Handler>(self, handler: Arc<H>, stop: CancellationToken) {
        let tracker = TaskTracker::new();
        let hangup = CancellationToken::new();
        info!(listen = ?self.listener.local_addr().ok(), "audiosocket listening");
        let mut beat = tokio::time::interval(handler.beat_period());
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tunnel = self.tunnel;
        if let Some(t) = &tunnel {
            info!(listen = %t.local_addr(), "audiosocket listening inside the WireGuard tunnel");
        }
        let spawn = |stream: Box<dyn Stream>, peer| {
            if let Some(ticket) = handler.screen(peer) {
                let (handler, hangup) = (handler.clone(), hangup.clone());
                tracker.spawn(connection(handler, stream, peer, ticket, hangup));
            }
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = beat.tick() => handler.beat(),
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                        }
                        spawn(Box::new(stream), peer);
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                accepted = next_tunnel_connection(&mut tunnel) => match accepted {
                    Ok((stream, peer)) => spawn(Box::new(stream), peer),
                    Err(e) => {
                        warn!(error = %e, "the WireGuard tunnel stopped; no more calls through it");
                        tunnel = None;
                    }
                },
            }
        }
        drop(self.listener);
        drain(&tracker, &hangup, handler.settings().shutdown_grace).await;
        handler.stopped();
        info!("audiosocket listener stopped");
    }
}

/// Waits for live calls up to `grace`, then hangs up the rest and waits for them.
async fn drain(tracker: &TaskTracker, hangup: &CancellationToken, grace: Duration) {
    tracker.close();
    let live = tracker.len();
    if live > 0 {
        info!(
            live_calls = live,
            grace_s = grace.as_secs(),
            "stopped accepting; waiting for live calls"
        );
    }
    if timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            live_calls = tracker.len(),
            "grace period over; hanging up live calls"
        );
        hangup.cancel();
        tracker.wait().await;
    }
}

/// One connection's task: the call id, then the handler's call.
async fn connection<H: Handler>(
    handler: Arc<H>,
    stream: Box<dyn Stream>,
    peer: SocketAddr,
    ticket: H::Ticket,
    hangup: CancellationToken,
) {
    let mut conn = Connection::new(stream);
    let wait = handler.settings().call_id_timeout;
    let failure = match timeout(wait, conn.read_message()).await {
        // Asterisk sends a real UUID (`AudioSocket()` and externalMedia refuse an invalid
        // one); 16 zero bytes is a forged or broken client.
        Ok(Ok(Some(Message::CallId(id)))) if id.is_nil() => HandshakeFailure::NilCallId,
        Ok(Ok(Some(Message::CallId(call_id)))) => {
            let incoming = Incoming {
                stream: conn,
                peer,
                call_id,
            };
            return handler.call(incoming, ticket, hangup).await;
        }
        Ok(Ok(Some(other))) => {
            debug!(%peer, first = kind_name(&other), "first message is not a call id");
            HandshakeFailure::NotCallId
        }
        Ok(Ok(None)) => HandshakeFailure::Closed,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "malformed stream before the call id");
            HandshakeFailure::Malformed
        }
        Err(_) => HandshakeFailure::Timeout,
    };
    drop(ticket);
    handler.handshake_failed(peer, failure);
}

/// The next connection through the tunnel, or never when there is no tunnel listener.
async fn next_tunnel_connection(
    tunnel: &mut Option<crate::tunnel::TunnelListener>,
) -> std::io::Result<(crate::tunnel::TunnelStream, SocketAddr)> {
    match tunnel {
        Some(t) => t.accept().await,
        None => std::future::pending().await,
    }
}

fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Hangup => "hangup",
        Message::CallId(_) => "call id",
        Message::Dtmf(_) => "dtmf",
        Message::Audio { .. } => "audio",
        Message::Error(_) => "error",
    }
}
