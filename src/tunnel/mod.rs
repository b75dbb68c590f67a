//! WireGuard inside the process: reach a remote Asterisk with no kernel module, no TUN
//! device and no root.
//!
//! ```text
//!  remote Asterisk (wg-quick, kernel or wireguard-go)
//!        │  UDP 51820, WireGuard (Noise IK, ChaCha20-Poly1305)
//!        ▼
//!  Tunnel driver task ── owns ──▶ TunnelCore (sans-IO, core.rs)
//!        │                          boringtun Tunn per peer ⇄ smoltcp TCP/IP stack
//!        │ bounded channels
//!        ▼
//!  TunnelStream (AsyncRead + AsyncWrite)  ◀── TunnelListener::accept / Tunnel::connect
//!        ▼
//!  the AudioSocket call session, the ARI client: they never know it is a tunnel
//! ```
//!
//! - [`core`]: the sans-IO core (time passed in, datagrams in and out, TCP connections).
//! - this module: the I/O shell. One tokio task (the driver) owns the core and the UDP
//!   socket; it sleeps until a datagram, a command from a stream, or the core's next timer
//!   ([`core::TunnelCore::poll_timeout`]: at most [`core::TIMER_TICK`] away), never in a
//!   polling loop. No lock is shared on the packet path: streams talk to the driver through a
//!   bounded command channel (writes also take bytes from a per-connection
//!   [`WRITE_BUDGET_BYTES`] semaphore, so a stream that writes faster than the tunnel sends
//!   waits) and read from their own bounded channel of [`READ_CHUNKS`] chunks (when it is
//!   full the driver leaves the bytes in the TCP receive buffer, so the TCP window closes and
//!   the sender slows down).
//! - [`config`]: `[wireguard]` (wg-quick's fields); [`keys`]: `wg genkey`/`wg pubkey`;
//!   [`stats`]: what `/health`, metrics and `voicegate wg show` report.
//!
//! Endpoint host names are resolved at start and again every [`RESOLVE_RETRY`] while a peer
//! has no live session, so a PBX whose address changed is found again. The UDP socket is
//! IPv4 (`0.0.0.0:listen_port`) unless [`TunnelSpec::bind`] says otherwise.

pub(crate) mod config;
pub mod core;
#[cfg(test)]
mod core_tests;
pub mod forward;
pub mod keys;
pub(crate) mod stats;

pub(crate) use config::WireGuardConfig;
pub use core::{ConnId, CoreError, CoreSpec, PeerSpec, TunnelCore, TunnelEvent};
pub use stats::{PeerStats, TunnelStats, render_wg_show};

use bytes::{Buf, Bytes};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, PollSemaphore, PollSender};
use tracing::{debug, info, warn};

/// Chunks a stream's read channel holds (each up to [`READ_CHUNK_BYTES`]).
pub(crate) const READ_CHUNKS: usize = 16;
/// Largest chunk handed to a stream, bytes.
pub(crate) const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Bytes a stream may have written that the tunnel has not yet taken into its TCP send
/// buffer (64 KiB); a writer past it waits.
pub(crate) const WRITE_BUDGET_BYTES: usize = 64 * 1024;
/// Commands (writes, connects, ...) queued from all streams to the driver.
pub(crate) const COMMAND_QUEUE: usize = 1024;
/// Accepted connections waiting for [`TunnelListener::accept`]; more are reset.
pub(crate) const ACCEPT_QUEUE: usize = 64;
/// An outgoing connection not established by then fails with `TimedOut`.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an endpoint's host name is looked up again while its peer has no session.
pub(crate) const RESOLVE_RETRY: Duration = Duration::from_secs(30);
/// A peer whose last handshake is older than this (WireGuard's Reject-After-Time, 180 s)
/// has no usable session: its endpoint is resolved again.
const SESSION_DEAD: Duration = Duration::from_secs(180);
/// Receive and send buffer asked of the kernel for the UDP socket, bytes (4 MiB).
pub(crate) const UDP_BUFFER_BYTES: usize = 4 << 20;
/// Datagrams read per wake-up before the driver services streams again.
const RECV_BATCH: usize = 64;

/// Why the tunnel cannot start or do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A key in the config does not decode.
    #[error("wireguard.{field}: {source}")]
    Key {
        /// The config key, e.g. `peer[0].public_key`.
        field: String,
        /// Why.
        source: keys::KeyError,
    },
    /// A secret (private or preshared key) cannot be read.
    #[error("wireguard.{field}: {source}")]
    Secret {
        /// The config key.
        field: String,
        /// Why.
        source: crate::secret::SecretError,
    },
    /// The UDP socket cannot be bound.
    #[error("cannot bind the WireGuard UDP socket {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The core refused the settings.
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// Everything needed to start a tunnel.
pub struct TunnelSpec {
    /// The core's settings (keys, address, peers).
    pub core: CoreSpec,
    /// Endpoint host names (`host:port`) per peer, looked up by the driver; `None` where the
    /// peer has no endpoint or `core.peers[i].endpoint` is already an address.
    pub endpoint_names: Vec<Option<String>>,
    /// UDP address to bind, e.g. `0.0.0.0:51820`.
    pub bind: SocketAddr,
}

impl TunnelSpec {
    /// The spec of a `[wireguard]` config: reads the secrets, decodes the keys.
    ///
    /// # Errors
    /// [`TunnelError::Key`] or [`TunnelError::Secret`] naming the config key.
    pub fn from_config(c: &WireGuardConfig) -> Result<Self, TunnelError> {
        let secret = |field: &str, s: &crate::secret::SecretSource| {
            s.resolve().map_err(|source| TunnelError::Secret {
                field: field.to_owned(),
                source,
            })
        };
        let key = |field: &str, text: &str| {
            keys::decode_key(text).map_err(|source| TunnelError::Key {
                field: field.to_owned(),
                source,
            })
        };
        let private = secret("private_key", &c.private_key)?;
        let private_key = key("private_key", private.expose())?.into();
        let mut peers = Vec::new();
        let mut names = Vec::new();
        for (i, p) in c.peers.iter().enumerate() {
            let public_key = key(&format!("peer[{i}].public_key"), &p.public_key)?.into();
            let preshared_key = match &p.preshared_key {
                Some(s) => {
                    let field = format!("peer[{i}].preshared_key");
                    Some(key(&field, secret(&field, s)?.expose())?)
                }
                None => None,
            };
            let literal = p.endpoint.as_deref().and_then(|e| e.parse().ok());
            names.push(match literal {
                Some(_) => None,
                None => p.endpoint.clone(),
            });
            peers.push(PeerSpec {
                public_key,
                preshared_key,
                endpoint: literal,
                allowed_ips: p.allowed_ips.clone(),
                persistent_keepalive: p.persistent_keepalive,
            });
        }
        let port = c.listen_port.unwrap_or(0);
        Ok(TunnelSpec {
            core: CoreSpec {
                private_key,
                address: c.address,
                mtu: c.mtu,
                listen_port: port,
                peers,
            },
            endpoint_names: names,
            bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        })
    }
}

enum Cmd {
    Listen {
        port: u16,
        accepted: mpsc::Sender<(TunnelStream, SocketAddr)>,
        reply: oneshot::Sender<Result<(), CoreError>>,
    },
    Unlisten(u16),
    Connect {
        remote: SocketAddr,
        reply: oneshot::Sender<io::Result<TunnelStream>>,
    },
    Write {
        conn: ConnId,
        data: Bytes,
    },
    Shutdown(ConnId),
    Stats(oneshot::Sender<TunnelStats>),
    Resolved {
        peer: usize,
        addr: Option<SocketAddr>,
    },
}

/// A handle to a running tunnel; clone it freely. The tunnel runs until the `stop` token
/// given to [`Tunnel::spawn`] is cancelled.
#[derive(Clone, Debug)]
pub struct Tunnel {
    cmd: mpsc::Sender<Cmd>,
    address: IpAddr,
    udp_addr: SocketAddr,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

impl Tunnel {
    /// Starts the tunnel of a `[wireguard]` config.
    ///
    /// # Errors
    /// As [`TunnelSpec::from_config`] and [`Tunnel::spawn`].
    pub(crate) async fn from_config(
        c: &WireGuardConfig,
        stop: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), TunnelError> {
        Self::spawn(TunnelSpec::from_config(c)?, stop).await
    }

    /// Binds the UDP socket and spawns the driver task.
    ///
    /// # Errors
    /// [`TunnelError::Bind`], or [`TunnelError::Core`] if the address is unusable.
    pub async fn spawn(
        spec: TunnelSpec,
        stop: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), TunnelError> {
        let udp = UdpSocket::bind(spec.bind)
            .await
            .map_err(|source| TunnelError::Bind {
                addr: spec.bind,
                source,
            })?;
        Self::spawn_on_socket(spec, udp, stop)
    }

    /// Spawns the driver task on a UDP socket bound already (by systemd socket activation,
    /// or inside another network namespace); `spec.bind` is ignored.
    ///
    /// # Errors
    /// [`TunnelError::Bind`] if the socket has no local address, or [`TunnelError::Core`] if
    /// the tunnel address is unusable.
    pub fn spawn_on_socket(
        spec: TunnelSpec,
        udp: UdpSocket,
        stop: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), TunnelError> {
        let udp_addr = udp.local_addr().map_err(|source| TunnelError::Bind {
            addr: spec.bind,
            source,
        })?;
        // Room for bursts while the driver is not scheduled (a busy 2-core box): a datagram
        // the kernel drops costs a TCP retransmission inside the tunnel. The kernel caps the
        // sizes at net.core.rmem_max / wmem_max; a smaller buffer still works.
        let sock = socket2::SockRef::from(&udp);
        let _ = sock.set_recv_buffer_size(UDP_BUFFER_BYTES);
        let _ = sock.set_send_buffer_size(UDP_BUFFER_BYTES);
        let address = spec.core.address.addr();
        let mut core_spec = spec.core;
        core_spec.listen_port = udp_addr.port();
        let core = TunnelCore::new(core_spec, Instant::now().into_std())?;
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        // Unbounded by type only: each TunnelStream sends its id once, on drop, so it never
        // holds more ids than the driver has entries in `conns` (a Drop cannot wait).
        let (drop_tx, drop_rx) = mpsc::unbounded_channel();
        let peers = core.peer_count();
        let mut core = core;
        core.initiate_keepalive_peers(Instant::now().into_std());
        let driver = Driver {
            core,
            address,
            udp,
            cmd_rx,
            cmd_tx: cmd_tx.clone(),
            drop_tx,
            drop_rx,
            wake: Arc::new(Notify::new()),
            conns: HashMap::default(),
            listeners: HashMap::new(),
            connecting: HashMap::default(),
            stack_dirty: true,
            deadline: Instant::now(),
            endpoint_names: spec.endpoint_names,
            next_resolve: vec![Instant::now(); peers],
            resolving: vec![false; peers],
            blocked_transmit: false,
            recv_buf: vec![0; 65_536],
            read_buf: vec![0; READ_CHUNK_BYTES],
        };
        info!(udp = %udp_addr, address = %address, peers, "wireguard tunnel up");
        let task = tokio::spawn(driver.run(stop));
        Ok((
            Tunnel {
                cmd: cmd_tx,
                address,
                udp_addr,
            },
            task,
        ))
    }

    /// This side's tunnel address.
    pub(crate) fn address(&self) -> IpAddr {
        self.address
    }

    /// The bound UDP address (the WireGuard listen port).
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    async fn command(&self, cmd: Cmd) -> io::Result<()> {
        self.cmd.send(cmd).await.map_err(|_| stopped())
    }

    /// Accepts TCP connections arriving through the tunnel at `port` on the tunnel address.
    ///
    /// # Errors
    /// `AddrInUse` if the port is already listened on; `NotConnected` if the tunnel stopped.
    pub async fn listen(&self, port: u16) -> io::Result<TunnelListener> {
        let (accepted, rx) = mpsc::channel(ACCEPT_QUEUE);
        let (reply, result) = oneshot::channel();
        self.command(Cmd::Listen {
            port,
            accepted,
            reply,
        })
        .await?;
        result
            .await
            .map_err(|_| stopped())?
            .map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, e))?;
        Ok(TunnelListener {
            rx,
            local: SocketAddr::new(self.address, port),
            cmd: self.cmd.clone(),
        })
    }

    /// Opens a TCP connection to `remote` (a tunnel address) through the tunnel.
    ///
    /// # Errors
    /// `ConnectionRefused` (reset by the far side), `TimedOut` after [`CONNECT_TIMEOUT`],
    /// `HostUnreachable` when no peer's allowed IPs contain `remote`, `NotConnected` if the
    /// tunnel stopped.
    pub async fn connect(&self, remote: SocketAddr) -> io::Result<TunnelStream> {
        let (reply, result) = oneshot::channel();
        self.command(Cmd::Connect { remote, reply }).await?;
        result.await.map_err(|_| stopped())?
    }

    /// The tunnel's state now (for `/health`, metrics, `voicegate wg show`).
    ///
    /// # Errors
    /// `NotConnected` if the tunnel stopped.
    pub async fn stats(&self) -> io::Result<TunnelStats> {
        let (reply, result) = oneshot::channel();
        self.command(Cmd::Stats(reply)).await?;
        result.await.map_err(|_| stopped())
    }
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the wireguard tunnel stopped")
}

/// Accepts TCP connections that arrive through the tunnel on one port. Dropping it stops
/// listening.
#[derive(Debug)]
pub struct TunnelListener {
    rx: mpsc::Receiver<(TunnelStream, SocketAddr)>,
    local: SocketAddr,
    cmd: mpsc::Sender<Cmd>,
}

impl TunnelListener {
    /// The next connection and the peer's tunnel address.
    ///
    /// # Errors
    /// `NotConnected` once the tunnel stopped.
    pub async fn accept(&mut self) -> io::Result<(TunnelStream, SocketAddr)> {
        self.rx.recv().await.ok_or_else(stopped)
    }

    /// The tunnel address and port listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for TunnelListener {
    fn drop(&mut self) {
        // A full queue means the driver is busy; the port then stays open until the tunnel
        // stops, and its connections are reset because nobody accepts them.
        let _ = self.cmd.try_send(Cmd::Unlisten(self.local.port()));
    }
}

/// A TCP connection through the tunnel: `AsyncRead + AsyncWrite + Unpin + Send`, usable
/// wherever a `TcpStream` is (split it with `tokio::io::split`).
///
/// A write completes when the bytes are handed to the tunnel (within
/// [`WRITE_BUDGET_BYTES`]); `poll_shutdown` sends FIN after them. Reading returns 0 at the
/// peer's FIN or reset. Dropping the stream closes the connection gracefully.
pub struct TunnelStream {
    conn: ConnId,
    cmd: PollSender<Cmd>,
    drop_tx: mpsc::UnboundedSender<ConnId>,
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
    budget: PollSemaphore,
    permit: Option<OwnedSemaphorePermit>,
    wake: Arc<Notify>,
    local: SocketAddr,
    remote: SocketAddr,
    shutdown: bool,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl TunnelStream {
    /// The far side's tunnel address and port.
    pub fn peer_addr(&self) -> SocketAddr {
        self.remote
    }
}

fn broken_pipe() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "tunnel connection closed")
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.chunk.is_empty() {
            let was_full = this.rx.len() == READ_CHUNKS;
            match ready!(this.rx.poll_recv(cx)) {
                Some(chunk) => {
                    this.chunk = chunk;
                    if was_full {
                        // The driver left bytes in the TCP buffer for want of room here.
                        this.wake.notify_one();
                    }
                }
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.chunk.len().min(buf.remaining());
        buf.put_slice(&this.chunk[..n]);
        this.chunk.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.shutdown {
            return Poll::Ready(Err(broken_pipe()));
        }
        if this.permit.is_none() {
            let want = buf.len().min(READ_CHUNK_BYTES) as u32;
            match ready!(this.budget.poll_acquire_many(cx, want)) {
                Some(p) => this.permit = Some(p),
                None => return Poll::Ready(Err(broken_pipe())),
            }
        }
        if ready!(this.cmd.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(broken_pipe()));
        }
        let Some(mut permit) = this.permit.take() else {
            // Invariant: set just above.
            return Poll::Ready(Err(broken_pipe()));
        };
        let n = permit.num_permits().min(buf.len());
        // Give back what this (shorter) write does not need; keep n permits for the driver
        // to return once the bytes are in the TCP send buffer.
        let extra = permit.split(n);
        drop(extra);
        permit.forget();
        let data = Bytes::copy_from_slice(&buf[..n]);
        if this
            .cmd
            .send_item(Cmd::Write {
                conn: this.conn,
                data,
            })
            .is_err()
        {
            return Poll::Ready(Err(broken_pipe()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.shutdown {
            return Poll::Ready(Ok(()));
        }
        if ready!(this.cmd.poll_reserve(cx)).is_err() {
            return Poll::Ready(Ok(()));
        }
        let _ = this.cmd.send_item(Cmd::Shutdown(this.conn));
        this.shutdown = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let _ = self.drop_tx.send(self.conn);
    }
}

/// The driver's side of one connection.
struct ConnIo {
    to_stream: Option<mpsc::Sender<Bytes>>,
    pending: VecDeque<Bytes>,
    budget: Arc<Semaphore>,
    shutdown: bool,
    dropped: bool,
    closed: bool,
    /// The core was told to close it (FIN after the queued bytes).
    fin: bool,
}

struct Connecting {
    reply: oneshot::Sender<io::Result<TunnelStream>>,
    remote: SocketAddr,
    deadline: Instant,
}

struct Driver {
    core: TunnelCore,
    address: IpAddr,
    udp: UdpSocket,
    cmd_rx: mpsc::Receiver<Cmd>,
    cmd_tx: mpsc::Sender<Cmd>,
    drop_tx: mpsc::UnboundedSender<ConnId>,
    drop_rx: mpsc::UnboundedReceiver<ConnId>,
    wake: Arc<Notify>,
    conns: HashMap<ConnId, ConnIo, core::FastHash>,
    listeners: HashMap<u16, mpsc::Sender<(TunnelStream, SocketAddr)>>,
    connecting: HashMap<ConnId, Connecting, core::FastHash>,
    /// Datagrams arrived or a command touched the core since the stack last ran.
    stack_dirty: bool,
    /// When the core next needs to run (its timers, a connect timeout).
    deadline: Instant,
    endpoint_names: Vec<Option<String>>,
    next_resolve: Vec<Instant>,
    resolving: Vec<bool>,
    blocked_transmit: bool,
    recv_buf: Vec<u8>,
    read_buf: Vec<u8>,
}

impl Driver {
    async fn run(mut self, stop: CancellationToken) {
        loop {
            let deadline = self.turn();
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                r = self.udp.recv_from(&mut self.recv_buf) => {
                    self.on_datagrams(r);
                }
                cmd = self.cmd_rx.recv() => {
                    // Invariant: the driver holds a sender, so the channel never closes.
                    if let Some(cmd) = cmd {
                        self.on_command(cmd);
                    }
                    for _ in 1..RECV_BATCH {
                        match self.cmd_rx.try_recv() {
                            Ok(cmd) => self.on_command(cmd),
                            Err(_) => break,
                        }
                    }
                }
                id = self.drop_rx.recv() => {
                    if let Some(id) = id {
                        self.on_drop(id);
                    }
                    while let Ok(id) = self.drop_rx.try_recv() {
                        self.on_drop(id);
                    }
                }
                () = self.wake.notified() => {}
                r = self.udp.writable(), if self.blocked_transmit => {
                    if r.is_ok() {
                        self.blocked_transmit = false;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
        info!("wireguard tunnel stopped");
    }

    /// One turn's work before the driver waits: pending commands and drops, the stack when
    /// there is something for it, connect timeouts, the streams' writes, endpoint
    /// resolution, the transmit queue. Returns when the driver must run next at the latest.
    fn turn(&mut self) -> Instant {
        // Commands first on every turn, so a steady stream of datagrams (the select in `run`
        // is biased towards them) cannot starve the streams' writes.
        for _ in 0..RECV_BATCH {
            match self.cmd_rx.try_recv() {
                Ok(cmd) => self.on_command(cmd),
                Err(_) => break,
            }
        }
        while let Ok(id) = self.drop_rx.try_recv() {
            self.on_drop(id);
        }
        let now = Instant::now();
        // The stack runs (a pass over every socket) only when there is something for
        // it: datagrams, a command, a timer. A wake-up for a stream's write alone skips
        // this first pass and runs only the one after the write is in the socket.
        if self.stack_dirty || now >= self.deadline {
            self.stack_dirty = false;
            self.core.handle_timeout(now.into_std());
            self.dispatch_events();
        }
        self.expire_connects(now);
        // Send what the streams just queued (or what a command asked for).
        if self.service_conns() || self.stack_dirty {
            self.stack_dirty = false;
            self.core.handle_timeout(now.into_std());
            self.dispatch_events();
        }
        self.maybe_resolve(now);
        self.flush_transmits();
        let deadline = Instant::from_std(self.core.poll_timeout());
        let deadline = self
            .connecting
            .values()
            .map(|c| c.deadline)
            .fold(deadline, Instant::min);
        // Something above left work for the stack (an abort): run again at once.
        let deadline = if self.stack_dirty { now } else { deadline };
        self.deadline = deadline;
        deadline
    }

    /// A received datagram `r`, then up to [`RECV_BATCH`] more already waiting.
    fn on_datagrams(&mut self, r: io::Result<(usize, SocketAddr)>) {
        self.on_datagram(r);
        for _ in 1..RECV_BATCH {
            let r = self.udp.try_recv_from(&mut self.recv_buf);
            if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                break;
            }
            self.on_datagram(r);
        }
    }

    fn on_datagram(&mut self, r: io::Result<(usize, SocketAddr)>) {
        match r {
            Ok((n, from)) => {
                let now = Instant::now().into_std();
                self.core.handle_datagram(now, from, &self.recv_buf[..n]);
                self.stack_dirty = true;
            }
            // ICMP port unreachable from a peer that is down surfaces here: not fatal.
            Err(e) => debug!(error = %e, "udp receive failed"),
        }
    }

    fn flush_transmits(&mut self) {
        if self.blocked_transmit {
            return;
        }
        while let Some(t) = self.core.poll_transmit() {
            match self.udp.try_send_to(&t.payload, t.dst) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.core.requeue_transmit(t);
                    self.blocked_transmit = true;
                    return;
                }
                Err(e) => debug!(dst = %t.dst, error = %e, "udp send failed"),
            }
        }
    }

    fn new_stream(&mut self, conn: ConnId, remote: SocketAddr, local: SocketAddr) -> TunnelStream {
        let (tx, rx) = mpsc::channel(READ_CHUNKS);
        let budget = Arc::new(Semaphore::new(WRITE_BUDGET_BYTES));
        self.conns.insert(
            conn,
            ConnIo {
                to_stream: Some(tx),
                pending: VecDeque::new(),
                budget: budget.clone(),
                shutdown: false,
                dropped: false,
                closed: false,
                fin: false,
            },
        );
        TunnelStream {
            conn,
            cmd: PollSender::new(self.cmd_tx.clone()),
            drop_tx: self.drop_tx.clone(),
            rx,
            chunk: Bytes::new(),
            budget: PollSemaphore::new(budget),
            permit: None,
            wake: self.wake.clone(),
            local,
            remote,
            shutdown: false,
        }
    }

    fn dispatch_events(&mut self) {
        while let Some(ev) = self.core.poll_event() {
            match ev {
                TunnelEvent::Accepted { conn, port, remote } => {
                    let local = SocketAddr::new(self.listener_addr(), port);
                    let Some(tx) = self.listeners.get(&port).cloned() else {
                        self.core.abort(conn);
                        self.stack_dirty = true;
                        continue;
                    };
                    let stream = self.new_stream(conn, remote, local);
                    if let Err(e) = tx.try_send((stream, remote)) {
                        warn!(%remote, port, "accept queue full or closed; connection reset");
                        drop(e.into_inner());
                        self.conns.remove(&conn);
                        self.core.abort(conn);
                        self.stack_dirty = true;
                    } else {
                        debug!(%remote, port, "tunnel connection accepted");
                    }
                }
                TunnelEvent::Connected(conn) => {
                    if let Some(c) = self.connecting.remove(&conn) {
                        let local = SocketAddr::new(self.listener_addr(), 0);
                        let stream = self.new_stream(conn, c.remote, local);
                        if let Err(Ok(stream)) = c.reply.send(Ok(stream)) {
                            // The caller gave up; the stream's drop closes the connection.
                            drop(stream);
                        }
                    }
                }
                TunnelEvent::ConnectFailed(conn) => {
                    if let Some(c) = self.connecting.remove(&conn) {
                        let _ = c.reply.send(Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            format!("{} refused the connection", c.remote),
                        )));
                    }
                }
            }
        }
    }

    fn listener_addr(&self) -> IpAddr {
        self.address
    }

    fn expire_connects(&mut self, now: Instant) {
        let late: Vec<ConnId> = self
            .connecting
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(c) = self.connecting.remove(&id) {
                self.core.abort(id);
                self.stack_dirty = true;
                let _ = c.reply.send(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from {} through the tunnel", c.remote),
                )));
            }
        }
    }

    fn on_command(&mut self, cmd: Cmd) {
        let now = Instant::now();
        // Everything but a write (handled by service_conns) and a stats query touches the
        // core's sockets or peers: the stack must run.
        if !matches!(cmd, Cmd::Write { .. } | Cmd::Stats(_)) {
            self.stack_dirty = true;
        }
        match cmd {
            Cmd::Listen {
                port,
                accepted,
                reply,
            } => {
                let r = self.core.listen(port);
                if r.is_ok() {
                    self.listeners.insert(port, accepted);
                }
                let _ = reply.send(r);
            }
            Cmd::Unlisten(port) => {
                self.listeners.remove(&port);
                self.core.unlisten(port);
            }
            Cmd::Connect { remote, reply } => match self.core.connect(now.into_std(), remote) {
                Ok(conn) => {
                    self.connecting.insert(
                        conn,
                        Connecting {
                            reply,
                            remote,
                            deadline: now + CONNECT_TIMEOUT,
                        },
                    );
                }
                Err(e @ CoreError::NoRoute(_)) => {
                    let _ = reply.send(Err(io::Error::new(io::ErrorKind::HostUnreachable, e)));
                }
                Err(e) => {
                    let _ = reply.send(Err(io::Error::other(e)));
                }
            },
            Cmd::Write { conn, data } => match self.conns.get_mut(&conn) {
                Some(c) if !c.closed => c.pending.push_back(data),
                _ => {}
            },
            Cmd::Shutdown(conn) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.shutdown = true;
                }
            }
            Cmd::Stats(reply) => {
                let _ = reply.send(self.core.stats(now.into_std()));
            }
            Cmd::Resolved { peer, addr } => {
                if let Some(r) = self.resolving.get_mut(peer) {
                    *r = false;
                }
                if let Some(addr) = addr {
                    let first = self.core.peer_endpoint(peer).is_none();
                    self.core.set_endpoint(peer, addr);
                    if first {
                        self.core.initiate_keepalive_peers(now.into_std());
                    }
                }
            }
        }
    }

    fn on_drop(&mut self, id: ConnId) {
        self.stack_dirty = true;
        if let Some(c) = self.conns.get_mut(&id) {
            c.dropped = true;
            c.to_stream = None;
        }
    }

    /// Moves bytes between the streams' channels and the TCP sockets. True when it gave the
    /// core something to send (bytes, a FIN, a release): the stack must then run.
    fn service_conns(&mut self) -> bool {
        let mut sent = false;
        let mut gone = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            // Stream → socket.
            while let Some(front) = c.pending.front_mut() {
                match self.core.send(id, front) {
                    Ok(0) => break,
                    Ok(n) => {
                        sent = true;
                        c.budget.add_permits(n);
                        front.advance(n);
                        if front.is_empty() {
                            c.pending.pop_front();
                        }
                    }
                    Err(_) => {
                        c.pending.clear();
                        c.closed = true;
                        break;
                    }
                }
            }
            // Socket → stream, while the stream has room.
            while let Some(tx) = &c.to_stream {
                if tx.capacity() == 0 {
                    break;
                }
                match self.core.recv(id, &mut self.read_buf) {
                    core::Recv::Data(n) => {
                        // Room was checked above and only this task sends.
                        let _ = tx.try_send(Bytes::copy_from_slice(&self.read_buf[..n]));
                    }
                    core::Recv::WouldBlock => break,
                    core::Recv::Eof => c.to_stream = None,
                }
            }
            if !self.core.is_open(id) {
                c.closed = true;
                c.to_stream = None;
            }
            if c.closed {
                c.budget.close();
            }
            if (c.shutdown || c.dropped) && c.pending.is_empty() && !c.fin {
                self.core.close(id);
                c.fin = true;
                sent = true;
            }
            if c.dropped && (c.pending.is_empty() || c.closed) {
                self.core.release(id);
                gone.push(id);
                sent = true;
            }
        }
        for id in gone {
            self.conns.remove(&id);
        }
        sent
    }

    /// Looks endpoint host names up again for peers without a live session.
    fn maybe_resolve(&mut self, now: Instant) {
        let std_now = now.into_std();
        for peer in 0..self.endpoint_names.len() {
            let Some(name) = self.endpoint_names[peer].clone() else {
                continue;
            };
            if self.resolving[peer] || now < self.next_resolve[peer] {
                continue;
            }
            let alive = self
                .core
                .last_handshake_age(peer, std_now)
                .is_some_and(|age| age < SESSION_DEAD);
            if alive {
                continue;
            }
            self.resolving[peer] = true;
            self.next_resolve[peer] = now + RESOLVE_RETRY;
            let tx = self.cmd_tx.clone();
            tokio::spawn(async move {
                let addr = match tokio::net::lookup_host(name.as_str()).await {
                    Ok(mut addrs) => addrs.find(|a| a.is_ipv4()),
                    Err(e) => {
                        warn!(endpoint = %name, error = %e, "cannot resolve wireguard endpoint");
                        None
                    }
                };
                let _ = tx.send(Cmd::Resolved { peer, addr }).await;
            });
        }
    }
}
