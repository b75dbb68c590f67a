//! The sans-IO tunnel core: WireGuard (boringtun's `Tunn`, one per peer) under a userspace
//! TCP/IP stack (smoltcp), with no sockets, no tasks and no clock of its own.
//!
//! The caller feeds it UDP datagrams ([`TunnelCore::handle_datagram`]) and the time
//! ([`TunnelCore::handle_timeout`]), and takes out UDP datagrams to send
//! ([`TunnelCore::poll_transmit`]), TCP events ([`TunnelCore::poll_event`]) and the instant
//! it next needs attention ([`TunnelCore::poll_timeout`]). TCP connections are driven with
//! [`TunnelCore::listen`], [`TunnelCore::connect`], [`TunnelCore::send`],
//! [`TunnelCore::recv`] and [`TunnelCore::close`].
//!
//! ## Time
//! Every entry point takes `now`; the core never reads a clock. boringtun 0.7's timers read
//! the clock themselves (`Instant::now()` inside `update_timers`, the handshake and the rate
//! limiter). voicegate builds boringtun with its `mock-instant` feature, which makes that
//! clock the thread-local `mock_instant::MockClock`; before every call into boringtun the core
//! sets that clock to `now` (as the time since the core was made, never going backwards).
//! So boringtun sees exactly the time the caller passes in, on whatever thread the call runs:
//! tests jump minutes ahead to see a rekey, and the I/O shell passes tokio's clock. The
//! TAI64N timestamp in handshake initiations still comes from the real wall clock
//! (`SystemTime`), as the protocol requires.
//!
//! boringtun's timers have one-second resolution (rekey after 120 s, handshake retry after
//! 5 s, keepalive after 10 s), so the core asks to be called every [`TIMER_TICK`] (250 ms,
//! the cadence of boringtun's own device driver) for them, and sooner when smoltcp has a TCP
//! timer due (retransmission, delayed ACK). Between those the I/O shell sleeps.
//!
//! ## Routing
//! Cryptokey routing as in WireGuard: an IP packet leaving the stack goes to the peer whose
//! `allowed_ips` contains its destination (longest prefix); a packet arriving from a peer is
//! accepted only if its source is in that peer's `allowed_ips`. A datagram is matched to its
//! peer by the receiver index (data, response, cookie) or by the static key inside a
//! handshake initiation. Any datagram that authenticates updates the peer's endpoint, so a
//! peer that roams (new address or NAT port) is followed.
//!
//! ## Bounds
//! Outgoing datagrams queue up to [`MAX_QUEUED_DATAGRAMS`] (beyond: dropped and counted);
//! IP packets between boringtun and smoltcp queue up to [`MAX_QUEUED_PACKETS`] each way;
//! each TCP connection buffers [`TCP_BUFFER_BYTES`] each way. Nothing from the network can
//! make the core panic: malformed datagrams are dropped and counted.
#![allow(clippy::disallowed_types)] // boringtun's Tunn takes std::time::Instant; the time still comes in as an argument

use super::stats::{PeerStats, TunnelStats};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tracing::{debug, trace};

/// How often boringtun's timers are run (handshake retry, rekey, keepalive), ms: 250.
pub(crate) const TIMER_TICK: Duration = Duration::from_millis(250);
/// Most UDP datagrams waiting to be sent; more are dropped and counted.
pub(crate) const MAX_QUEUED_DATAGRAMS: usize = 1024;
/// Most IP packets queued between WireGuard and the TCP/IP stack, each way.
pub(crate) const MAX_QUEUED_PACKETS: usize = 512;
/// Receive and send buffer of each TCP connection, bytes (64 KiB each way).
pub(crate) const TCP_BUFFER_BYTES: usize = 64 * 1024;
/// How long a received segment may wait for its ACK (smoltcp's default is 10 ms): longer
/// than a call's 20 ms frame interval, so the ACK rides on the next audio frame going the
/// other way instead of costing a datagram of its own (encryption, a `sendto`, a wake-up
/// at each end). More than one full segment unacknowledged is still acknowledged at once,
/// so bulk transfers (ARI responses) are not slowed.
pub(crate) const ACK_DELAY: Duration = Duration::from_millis(40);
/// Sockets kept listening per port, so that calls arriving together are all accepted.
pub(crate) const LISTEN_BACKLOG: usize = 2;
/// Most half-open (SYN received) connections per listening port.
const MAX_PENDING_PER_PORT: usize = 64;
/// Largest datagram boringtun may write: an MTU-sized packet plus 32 bytes of WireGuard
/// overhead, and never less than a handshake initiation (148 bytes).
const SCRATCH_BYTES: usize = 65_536 + 32;
/// Ephemeral ports for outgoing connections (IANA dynamic range).
const EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 49_152..=65_535;

/// The hasher of the maps looked up per packet and per connection: the keys are local
/// socket handles (small integers nobody outside chooses), so SipHash's flood resistance
/// buys nothing and costs a large share of the per-frame CPU.
pub(crate) type FastHash = foldhash::fast::FixedState;

/// Why the core cannot do what was asked.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// No peer's `allowed_ips` contains this address.
    #[error("no peer's allowed_ips contains {0}")]
    NoRoute(IpAddr),
    /// The port is already listened on.
    #[error("port {0} is already listened on")]
    PortInUse(u16),
    /// All ephemeral ports are in use.
    #[error("no free local port for an outgoing connection")]
    NoFreePort,
    /// smoltcp refused to open the connection.
    #[error("cannot open the connection: {0}")]
    Connect(String),
    /// The connection does not exist (closed and removed).
    #[error("unknown or closed connection")]
    UnknownConnection,
    /// The tunnel address family is not supported.
    #[error("cannot use tunnel address {0}")]
    Address(String),
}

/// One peer as the core needs it (keys decoded, endpoint resolved).
#[derive(Clone)]
pub struct PeerSpec {
    /// The peer's static public key.
    pub public_key: PublicKey,
    /// The preshared key, 32 bytes, if any.
    pub preshared_key: Option<[u8; 32]>,
    /// Where to send datagrams until the peer is heard from.
    pub endpoint: Option<SocketAddr>,
    /// Addresses routed to and accepted from this peer.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive, s.
    pub persistent_keepalive: Option<u16>,
}

impl std::fmt::Debug for PeerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSpec")
            .field(
                "public_key",
                &super::keys::encode_key(self.public_key.as_bytes()),
            )
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .finish()
    }
}

/// Everything the core is built from.
pub struct CoreSpec {
    /// This side's static private key.
    pub private_key: StaticSecret,
    /// This side's tunnel address and prefix.
    pub address: IpNet,
    /// Largest IP packet inside the tunnel, bytes.
    pub mtu: u16,
    /// UDP port the shell listens on (only reported in stats).
    pub listen_port: u16,
    /// The peers, in config order (a peer's index is its position here).
    pub peers: Vec<PeerSpec>,
}

/// A UDP datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination (the peer's endpoint).
    pub dst: SocketAddr,
    /// The WireGuard message.
    pub payload: Vec<u8>,
}

/// A TCP connection inside the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(SocketHandle);

/// Something the TCP side of the core wants the caller to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelEvent {
    /// A connection to a listened port is established.
    Accepted {
        /// The new connection.
        conn: ConnId,
        /// The local (listened) port.
        port: u16,
        /// The peer's tunnel address and port.
        remote: SocketAddr,
    },
    /// An outgoing connection is established.
    Connected(ConnId),
    /// An outgoing connection was refused or reset before it was established; it is gone.
    ConnectFailed(ConnId),
}

/// What [`TunnelCore::recv`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recv {
    /// This many bytes were copied.
    Data(usize),
    /// Nothing yet.
    WouldBlock,
    /// The peer closed its side (FIN) or reset the connection; nothing more will come.
    Eof,
}

struct Peer {
    tunn: Tunn,
    public_key: PublicKey,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<u16>,
    rx_bytes: u64,
    tx_bytes: u64,
    handshakes: u64,
    last_handshake: Option<Instant>,
    /// When the last authenticated datagram (data, keepalive or handshake) arrived.
    last_rx: Option<Instant>,
}

/// The in-memory link between WireGuard and smoltcp: IP packets each way.
struct VirtualDevice {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let r = f(&mut packet);
        self.0.push_back(packet);
        r
    }
}

impl Device for VirtualDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxTok(packet), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        (self.tx.len() < MAX_QUEUED_PACKETS).then_some(TxTok(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

#[derive(Default)]
struct Listener {
    listening: Vec<SocketHandle>,
    pending: Vec<SocketHandle>,
}

struct ConnInfo {
    /// Outgoing and not yet reported as connected or failed.
    connecting: bool,
    /// The caller closed it; removed once smoltcp is done with it.
    closing: bool,
    /// The caller will not read any more: received bytes may be discarded.
    released: bool,
    /// The peer opened it (accepted on a listened port): a call, for [`PeerStats::calls`].
    /// `None` for outgoing connections.
    incoming_from: Option<usize>,
}

/// The tunnel core. See the module docs.
pub struct TunnelCore {
    peers: Vec<Peer>,
    static_private: StaticSecret,
    static_public: PublicKey,
    address: IpNet,
    listen_port: u16,
    iface: Interface,
    device: VirtualDevice,
    sockets: SocketSet<'static>,
    epoch: Instant,
    now: Instant,
    next_tick: Instant,
    transmits: VecDeque<Transmit>,
    events: VecDeque<TunnelEvent>,
    listeners: HashMap<u16, Listener>,
    conns: HashMap<SocketHandle, ConnInfo, FastHash>,
    next_port: u16,
    scratch: Vec<u8>,
    dropped_datagrams: u64,
    rejected_datagrams: u64,
}

impl std::fmt::Debug for TunnelCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelCore")
            .field("address", &self.address)
            .field("peers", &self.peers.len())
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

fn smol_time(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(now.saturating_duration_since(epoch).as_micros() as i64)
}

fn to_ip(a: IpAddress) -> IpAddr {
    match a {
        IpAddress::Ipv4(v4) => IpAddr::V4(v4),
        IpAddress::Ipv6(v6) => IpAddr::V6(v6),
    }
}

fn to_socket_addr(e: IpEndpoint) -> SocketAddr {
    SocketAddr::new(to_ip(e.addr), e.port)
}

fn new_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER_BYTES]),
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER_BYTES]),
    );
    // Audio frames are small and paced: send each at once.
    s.set_nagle_enabled(false);
    s.set_ack_delay(Some(smoltcp::time::Duration::from_millis(
        ACK_DELAY.as_millis() as u64,
    )));
    // A peer that vanished (PBX rebooted, link cut) is noticed on idle connections too:
    // probes every 30 s, and the connection is reset if nothing is acknowledged for 120 s.
    s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
    s
}

impl TunnelCore {
    /// Builds the core at time `now`.
    ///
    /// # Errors
    /// [`CoreError::Address`] if smoltcp cannot take the tunnel address.
    pub fn new(spec: CoreSpec, now: Instant) -> Result<Self, CoreError> {
        let static_public = PublicKey::from(&spec.private_key);
        let epoch = now;
        set_boringtun_clock(epoch, now);
        let peers = spec
            .peers
            .into_iter()
            .enumerate()
            .map(|(i, p)| Peer {
                // The index tells our datagrams apart per peer (receiver index >> 8).
                tunn: Tunn::new(
                    spec.private_key.clone(),
                    p.public_key,
                    p.preshared_key,
                    p.persistent_keepalive.filter(|k| *k > 0),
                    i as u32,
                    None,
                ),
                public_key: p.public_key,
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips,
                persistent_keepalive: p.persistent_keepalive.filter(|k| *k > 0),
                rx_bytes: 0,
                tx_bytes: 0,
                handshakes: 0,
                last_handshake: None,
                last_rx: None,
            })
            .collect();
        let mut device = VirtualDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu: usize::from(spec.mtu),
        };
        let mut config = IfaceConfig::new(HardwareAddress::Ip);
        config.random_seed = random_seed();
        let mut iface = Interface::new(config, &mut device, smol_time(epoch, now));
        let cidr = IpCidr::new(
            IpAddress::from(spec.address.addr()),
            spec.address.prefix_len(),
        );
        let mut pushed = Ok(());
        iface.update_ip_addrs(|addrs| pushed = addrs.push(cidr).map_err(|_| ()));
        pushed.map_err(|()| CoreError::Address(spec.address.to_string()))?;
        // Every destination is "on link" for an IP-medium device; the peer is picked by
        // cryptokey routing when the packet leaves the stack.
        let routed = match spec.address.addr() {
            IpAddr::V4(a) => iface.routes_mut().add_default_ipv4_route(a).map(|_| ()),
            IpAddr::V6(a) => iface.routes_mut().add_default_ipv6_route(a).map(|_| ()),
        };
        routed.map_err(|_| CoreError::Address(spec.address.to_string()))?;
        Ok(TunnelCore {
            peers,
            static_private: spec.private_key,
            static_public,
            address: spec.address,
            listen_port: spec.listen_port,
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            epoch,
            now,
            next_tick: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            listeners: HashMap::new(),
            conns: HashMap::default(),
            next_port: *EPHEMERAL_PORTS.start(),
            scratch: vec![0; SCRATCH_BYTES],
            dropped_datagrams: 0,
            rejected_datagrams: 0,
        })
    }

    /// Number of peers.
    pub(crate) fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Points peer `peer` at `endpoint` (after resolving its host name again).
    pub(crate) fn set_endpoint(&mut self, peer: usize, endpoint: SocketAddr) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.endpoint = Some(endpoint);
        }
    }

    /// Where peer `peer`'s datagrams go now.
    pub(crate) fn peer_endpoint(&self, peer: usize) -> Option<SocketAddr> {
        self.peers.get(peer)?.endpoint
    }

    /// Starts a handshake with every peer that has an endpoint and a persistent keepalive
    /// (such a peer should be up without waiting for traffic), as `wg-quick up` does.
    pub(crate) fn initiate_keepalive_peers(&mut self, now: Instant) {
        self.advance(now);
        for i in 0..self.peers.len() {
            if self.peers[i].persistent_keepalive.is_some() && self.peers[i].endpoint.is_some() {
                self.initiate(i);
            }
        }
    }

    /// Starts a handshake with peer `peer` now (if none is under way).
    pub fn initiate_handshake(&mut self, now: Instant, peer: usize) {
        self.advance(now);
        if peer < self.peers.len() {
            self.initiate(peer);
        }
    }

    fn initiate(&mut self, i: usize) {
        let mut buf = std::mem::take(&mut self.scratch);
        let peer = &mut self.peers[i];
        if let TunnResult::WriteToNetwork(d) =
            peer.tunn.format_handshake_initiation(&mut buf, false)
        {
            let d = d.to_vec();
            self.send_to_peer(i, d);
        }
        self.scratch = buf;
    }

    /// Seconds since peer `peer`'s last handshake at `now`; `None` if it never had one.
    pub(crate) fn last_handshake_age(&self, peer: usize, now: Instant) -> Option<Duration> {
        let at = self.peers.get(peer)?.last_handshake?;
        Some(now.saturating_duration_since(at))
    }

    /// Moves the core's clock (and boringtun's) to `now`; time never goes backwards.
    fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
        set_boringtun_clock(self.epoch, self.now);
    }

    /// Handles one UDP datagram from `from`. Datagrams that do not authenticate are dropped
    /// (and counted); an authenticated one moves the peer's endpoint to `from` (roaming).
    /// WireGuard's own answers (handshake responses, cookies) are ready in
    /// [`Self::poll_transmit`] at once; the IP packets it carried reach the TCP connections
    /// at the next [`Self::handle_timeout`], so call that after a batch of datagrams.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.advance(now);
        let Some(i) = self.peer_of(datagram) else {
            self.rejected_datagrams += 1;
            trace!(%from, len = datagram.len(), "datagram for no known peer");
            return;
        };
        let mut buf = std::mem::take(&mut self.scratch);
        let mut authenticated = true;
        let mut first = true;
        loop {
            let input: &[u8] = if first { datagram } else { &[] };
            let result = self.peers[i]
                .tunn
                .decapsulate(Some(from.ip()), input, &mut buf);
            first = false;
            match result {
                TunnResult::Done => break,
                TunnResult::Err(e) => {
                    // Only the first call parses the datagram; later ones flush the queue.
                    if input.is_empty() {
                        break;
                    }
                    authenticated = false;
                    self.rejected_datagrams += 1;
                    trace!(%from, error = ?e, "datagram rejected");
                    break;
                }
                TunnResult::WriteToNetwork(d) => {
                    let d = d.to_vec();
                    self.queue_transmit(i, from, d);
                    // Repeat with an empty datagram until Done, to flush queued packets.
                }
                TunnResult::WriteToTunnelV4(packet, src) => {
                    self.deliver(i, IpAddr::V4(src), packet.len(), &buf);
                    break;
                }
                TunnResult::WriteToTunnelV6(packet, src) => {
                    self.deliver(i, IpAddr::V6(src), packet.len(), &buf);
                    break;
                }
            }
        }
        self.scratch = buf;
        if authenticated {
            let peer = &mut self.peers[i];
            peer.rx_bytes += datagram.len() as u64;
            peer.last_rx = Some(self.now);
            if peer.endpoint != Some(from) {
                debug!(peer = i, %from, "peer endpoint changed");
                peer.endpoint = Some(from);
            }
            self.note_handshake(i);
        }
        // The TCP/IP stack runs once per batch of datagrams, in handle_timeout: running it
        // per datagram costs a pass over every socket each time, which does not scale to
        // hundreds of calls.
    }

    /// Hands a decrypted IP packet from peer `i` to the TCP/IP stack if its source is one
    /// of the peer's allowed IPs.
    fn deliver(&mut self, i: usize, src: IpAddr, len: usize, buf: &[u8]) {
        if !self.peers[i].allowed_ips.iter().any(|n| n.contains(&src)) {
            self.rejected_datagrams += 1;
            trace!(peer = i, %src, "source not in the peer's allowed_ips");
            return;
        }
        if self.device.rx.len() >= MAX_QUEUED_PACKETS {
            self.dropped_datagrams += 1;
            return;
        }
        self.device.rx.push_back(buf[..len].to_vec());
    }

    fn note_handshake(&mut self, i: usize) {
        let now = self.now;
        let peer = &mut self.peers[i];
        if let Some(since) = peer.tunn.time_since_last_handshake() {
            let at = now.checked_sub(since).unwrap_or(now);
            // boringtun's session start is exact on our clock: a new value is a new handshake.
            if peer
                .last_handshake
                .is_none_or(|prev| at > prev + Duration::from_millis(1))
            {
                peer.handshakes += 1;
                peer.last_handshake = Some(at);
                debug!(
                    peer = i,
                    handshakes = peer.handshakes,
                    "handshake completed"
                );
            }
        }
    }

    /// Which peer a datagram belongs to.
    fn peer_of(&self, datagram: &[u8]) -> Option<usize> {
        let by_index = |idx: u32| {
            let i = (idx >> 8) as usize;
            (i < self.peers.len()).then_some(i)
        };
        match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(p) => {
                if self.peers.len() == 1 {
                    // Tunn checks the key itself; skip the extra Diffie-Hellman.
                    return Some(0);
                }
                let half =
                    parse_handshake_anon(&self.static_private, &self.static_public, &p).ok()?;
                self.peers
                    .iter()
                    .position(|peer| peer.public_key.as_bytes() == &half.peer_static_public)
            }
            Packet::HandshakeResponse(p) => by_index(p.receiver_idx),
            Packet::PacketCookieReply(p) => by_index(p.receiver_idx),
            Packet::PacketData(p) => by_index(p.receiver_idx),
        }
    }

    fn queue_transmit(&mut self, i: usize, dst: SocketAddr, payload: Vec<u8>) {
        if self.transmits.len() >= MAX_QUEUED_DATAGRAMS {
            self.dropped_datagrams += 1;
            return;
        }
        self.peers[i].tx_bytes += payload.len() as u64;
        self.transmits.push_back(Transmit { dst, payload });
    }

    fn send_to_peer(&mut self, i: usize, payload: Vec<u8>) {
        match self.peers[i].endpoint {
            Some(dst) => self.queue_transmit(i, dst, payload),
            None => {
                trace!(peer = i, "no endpoint yet; datagram dropped");
                self.dropped_datagrams += 1;
            }
        }
    }

    /// Runs what is due at `now`: boringtun's timers (handshake retry, rekey, keepalive) and
    /// smoltcp's (retransmission, ACKs), and moves data the caller queued with
    /// [`Self::send`] onto the wire. Call it after a batch of `send`/`recv`/`close` calls
    /// and whenever [`Self::poll_timeout`] is reached.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        if self.now >= self.next_tick {
            self.next_tick = self.now + TIMER_TICK;
            let mut buf = std::mem::take(&mut self.scratch);
            for i in 0..self.peers.len() {
                match self.peers[i].tunn.update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(d) => {
                        let d = d.to_vec();
                        self.send_to_peer(i, d);
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {
                        trace!(peer = i, "session expired");
                    }
                    TunnResult::Err(e) => trace!(peer = i, error = ?e, "timer error"),
                    _ => {}
                }
                self.note_handshake(i);
            }
            self.scratch = buf;
        }
        self.poll_stack();
    }

    /// The instant the core next needs [`Self::handle_timeout`].
    pub(crate) fn poll_timeout(&mut self) -> Instant {
        let now = smol_time(self.epoch, self.now);
        let stack = self
            .iface
            .poll_at(now, &self.sockets)
            .map(|at| self.epoch + Duration::from_micros(at.total_micros().max(0) as u64));
        match stack {
            Some(at) if at < self.next_tick => at.max(self.now),
            _ => self.next_tick,
        }
    }

    /// The next datagram to send, oldest first.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Puts back a datagram that could not be sent yet (socket buffer full), to go first.
    pub(crate) fn requeue_transmit(&mut self, t: Transmit) {
        self.transmits.push_front(t);
    }

    /// The next TCP event.
    pub(crate) fn poll_event(&mut self) -> Option<TunnelEvent> {
        self.events.pop_front()
    }

    /// Runs smoltcp, sends what it produced through WireGuard, and turns socket state
    /// changes into events.
    fn poll_stack(&mut self) {
        self.prepare_listeners();
        let now = smol_time(self.epoch, self.now);
        // One poll runs all ingress and then egress until the sockets have nothing more to
        // send; it needs repeating only when the outgoing queue filled up and stopped it.
        for _ in 0..16 {
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            let full = self.device.tx.len() >= MAX_QUEUED_PACKETS;
            self.encapsulate_outgoing();
            if !full {
                break;
            }
        }
        self.update_sockets();
    }

    /// Makes sure every listened port has a listening socket for each connection request
    /// (SYN) waiting in this batch, so calls that arrive together are all accepted instead
    /// of the ones beyond [`LISTEN_BACKLOG`] being reset.
    fn prepare_listeners(&mut self) {
        if self.listeners.is_empty() || self.device.rx.is_empty() {
            return;
        }
        let mut syns: HashMap<u16, usize> = HashMap::new();
        for packet in &self.device.rx {
            if let Some(port) = syn_port(packet) {
                if self.listeners.contains_key(&port) {
                    *syns.entry(port).or_default() += 1;
                }
            }
        }
        for (port, wanted) in syns {
            let Some(l) = self.listeners.get_mut(&port) else {
                continue;
            };
            while l.listening.len() < wanted
                && l.pending.len() + l.listening.len() < MAX_PENDING_PER_PORT
            {
                let mut socket = new_socket();
                if socket.listen(port).is_err() {
                    break;
                }
                l.listening.push(self.sockets.add(socket));
            }
        }
    }

    /// Encrypts every IP packet the stack produced and queues it for its peer.
    fn encapsulate_outgoing(&mut self) {
        let mut buf = std::mem::take(&mut self.scratch);
        while let Some(packet) = self.device.tx.pop_front() {
            let Some(dst) = Tunn::dst_address(&packet) else {
                continue;
            };
            let Some(i) = self.route(dst) else {
                trace!(%dst, "no peer for destination; packet dropped");
                self.dropped_datagrams += 1;
                continue;
            };
            match self.peers[i].tunn.encapsulate(&packet, &mut buf) {
                TunnResult::WriteToNetwork(d) => {
                    let d = d.to_vec();
                    self.send_to_peer(i, d);
                }
                TunnResult::Err(e) => trace!(peer = i, error = ?e, "encapsulate failed"),
                // Queued inside boringtun until the handshake completes.
                _ => {}
            }
        }
        self.scratch = buf;
    }

    /// The peer whose allowed IPs contain `dst`, longest prefix first.
    fn route(&self, dst: IpAddr) -> Option<usize> {
        Self::route_in(&self.peers, dst)
    }

    fn route_in(peers: &[Peer], dst: IpAddr) -> Option<usize> {
        let mut best: Option<(usize, u8)> = None;
        for (i, p) in peers.iter().enumerate() {
            for net in &p.allowed_ips {
                if net.contains(&dst) && best.is_none_or(|(_, len)| net.prefix_len() > len) {
                    best = Some((i, net.prefix_len()));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// Brings the bookkeeping up to date with smoltcp's sockets: listening ports
    /// ([`Self::update_listeners`]), then outgoing and closing connections
    /// ([`Self::update_conns`]).
    fn update_sockets(&mut self) {
        self.update_listeners();
        self.update_conns();
    }

    /// Listening ports: a socket that left Listen is a connection in the making. The
    /// common case (every socket still listening, none pending) costs one state check per
    /// listening socket and allocates nothing. Keeps [`LISTEN_BACKLOG`] sockets listening
    /// per port while fewer than [`MAX_PENDING_PER_PORT`] handshakes are pending.
    fn update_listeners(&mut self) {
        let TunnelCore {
            listeners,
            sockets,
            conns,
            events,
            peers,
            ..
        } = self;
        for (&port, l) in listeners.iter_mut() {
            let settled = l.pending.is_empty()
                && l.listening.len() >= LISTEN_BACKLOG
                && l.listening
                    .iter()
                    .all(|h| sockets.get::<tcp::Socket>(*h).state() == tcp::State::Listen);
            if settled {
                continue;
            }
            let (still, started): (Vec<_>, Vec<_>) = l
                .listening
                .iter()
                .partition(|h| sockets.get::<tcp::Socket>(**h).state() == tcp::State::Listen);
            l.listening = still;
            l.pending.extend(started);
            Self::settle_pending(port, l, sockets, conns, events, peers);
            while l.listening.len() < LISTEN_BACKLOG && l.pending.len() < MAX_PENDING_PER_PORT {
                let mut s = new_socket();
                if s.listen(port).is_err() {
                    break;
                }
                l.listening.push(sockets.add(s));
            }
        }
    }

    /// The pending sockets of listener `l` on `port`: one still in its handshake stays
    /// pending, one reset during it is removed, one established becomes a connection
    /// (routed to the peer its remote address belongs to) and a [`TunnelEvent::Accepted`].
    fn settle_pending(
        port: u16,
        l: &mut Listener,
        sockets: &mut SocketSet<'static>,
        conns: &mut HashMap<SocketHandle, ConnInfo, FastHash>,
        events: &mut VecDeque<TunnelEvent>,
        peers: &[Peer],
    ) {
        let mut keep = Vec::with_capacity(l.pending.len());
        for h in l.pending.drain(..) {
            let s = sockets.get_mut::<tcp::Socket>(h);
            match s.state() {
                tcp::State::SynReceived => keep.push(h),
                tcp::State::Listen | tcp::State::Closed => {
                    // Reset during the handshake.
                    sockets.remove(h);
                }
                _ => match s.remote_endpoint() {
                    Some(remote) => {
                        let peer = Self::route_in(peers, to_ip(remote.addr));
                        conns.insert(
                            h,
                            ConnInfo {
                                connecting: false,
                                closing: false,
                                released: false,
                                incoming_from: peer,
                            },
                        );
                        events.push_back(TunnelEvent::Accepted {
                            conn: ConnId(h),
                            port,
                            remote: to_socket_addr(remote),
                        });
                    }
                    None => {
                        sockets.remove(h);
                    }
                },
            }
        }
        l.pending = keep;
    }

    /// Outgoing connections (reported connected or failed once) and closing ones (removed
    /// once smoltcp is done and the caller has read or released what arrived).
    fn update_conns(&mut self) {
        let mut gone = Vec::new();
        for (h, info) in self.conns.iter_mut() {
            let state = self.sockets.get::<tcp::Socket>(*h).state();
            if info.connecting {
                match state {
                    tcp::State::SynSent => {}
                    tcp::State::Closed => {
                        info.connecting = false;
                        self.events
                            .push_back(TunnelEvent::ConnectFailed(ConnId(*h)));
                        gone.push(*h);
                    }
                    _ => {
                        info.connecting = false;
                        self.events.push_back(TunnelEvent::Connected(ConnId(*h)));
                    }
                }
            } else if info.closing && matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                // Keep it while the caller may still read what arrived before the FIN.
                let socket = self.sockets.get::<tcp::Socket>(*h);
                if info.released || socket.recv_queue() == 0 {
                    gone.push(*h);
                }
            }
        }
        for h in gone {
            self.conns.remove(&h);
            self.sockets.remove(h);
        }
    }

    /// Accepts TCP connections to `port` on the tunnel address from now on.
    ///
    /// # Errors
    /// [`CoreError::PortInUse`] if `port` is already listened on.
    pub(crate) fn listen(&mut self, port: u16) -> Result<(), CoreError> {
        if self.listeners.contains_key(&port) {
            return Err(CoreError::PortInUse(port));
        }
        self.listeners.insert(port, Listener::default());
        self.update_sockets();
        Ok(())
    }

    /// Stops accepting on `port` (established connections stay).
    pub(crate) fn unlisten(&mut self, port: u16) {
        if let Some(l) = self.listeners.remove(&port) {
            for h in l.listening.into_iter().chain(l.pending) {
                self.sockets.get_mut::<tcp::Socket>(h).abort();
                self.sockets.remove(h);
            }
        }
    }

    /// Opens a TCP connection to `remote` through the peer whose allowed IPs contain it.
    /// [`TunnelEvent::Connected`] or [`TunnelEvent::ConnectFailed`] follows.
    ///
    /// # Errors
    /// [`CoreError::NoRoute`], [`CoreError::NoFreePort`] or [`CoreError::Connect`].
    pub(crate) fn connect(
        &mut self,
        now: Instant,
        remote: SocketAddr,
    ) -> Result<ConnId, CoreError> {
        self.advance(now);
        if self.route(remote.ip()).is_none() {
            return Err(CoreError::NoRoute(remote.ip()));
        }
        let port = self.free_port()?;
        let mut s = new_socket();
        s.connect(self.iface.context(), remote, port)
            .map_err(|e| CoreError::Connect(e.to_string()))?;
        let h = self.sockets.add(s);
        self.conns.insert(
            h,
            ConnInfo {
                connecting: true,
                closing: false,
                released: false,
                incoming_from: None,
            },
        );
        Ok(ConnId(h))
    }

    fn free_port(&mut self) -> Result<u16, CoreError> {
        let span = usize::from(EPHEMERAL_PORTS.end() - EPHEMERAL_PORTS.start()) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port == *EPHEMERAL_PORTS.end() {
                *EPHEMERAL_PORTS.start()
            } else {
                port + 1
            };
            let used = self.conns.keys().any(|h| {
                self.sockets
                    .get::<tcp::Socket>(*h)
                    .local_endpoint()
                    .map(|e| e.port)
                    == Some(port)
            }) || self.listeners.contains_key(&port);
            if !used {
                return Ok(port);
            }
        }
        Err(CoreError::NoFreePort)
    }

    fn socket(&mut self, conn: ConnId) -> Result<&mut tcp::Socket<'static>, CoreError> {
        if !self.conns.contains_key(&conn.0) {
            return Err(CoreError::UnknownConnection);
        }
        Ok(self.sockets.get_mut::<tcp::Socket>(conn.0))
    }

    /// Queues bytes to send on `conn`; returns how many fit in its send buffer (possibly 0).
    ///
    /// # Errors
    /// [`CoreError::UnknownConnection`] if the connection is gone or can no longer send.
    pub(crate) fn send(&mut self, conn: ConnId, data: &[u8]) -> Result<usize, CoreError> {
        let s = self.socket(conn)?;
        if !s.may_send() {
            return Err(CoreError::UnknownConnection);
        }
        s.send_slice(data).map_err(|_| CoreError::UnknownConnection)
    }

    /// Copies received bytes of `conn` into `buf`.
    pub(crate) fn recv(&mut self, conn: ConnId, buf: &mut [u8]) -> Recv {
        let Ok(s) = self.socket(conn) else {
            return Recv::Eof;
        };
        if s.can_recv() {
            return match s.recv_slice(buf) {
                Ok(n) => Recv::Data(n),
                Err(_) => Recv::Eof,
            };
        }
        if s.may_recv() || s.state() == tcp::State::SynSent {
            Recv::WouldBlock
        } else {
            Recv::Eof
        }
    }

    /// True while `conn` exists and its peer has not fully closed it.
    pub(crate) fn is_open(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn.0)
            && self.sockets.get::<tcp::Socket>(conn.0).state() != tcp::State::Closed
    }

    /// Closes the sending side of `conn` (FIN after queued data); the connection is forgotten
    /// once both sides are done.
    pub(crate) fn close(&mut self, conn: ConnId) {
        if let Some(info) = self.conns.get_mut(&conn.0) {
            info.closing = true;
            self.sockets.get_mut::<tcp::Socket>(conn.0).close();
        }
    }

    /// Closes `conn` like [`Self::close`] and tells the core nobody will read it any more,
    /// so it is forgotten as soon as both sides are done, unread bytes or not.
    pub(crate) fn release(&mut self, conn: ConnId) {
        if let Some(info) = self.conns.get_mut(&conn.0) {
            info.released = true;
        }
        self.close(conn);
    }

    /// Resets `conn` (RST) and forgets it.
    pub(crate) fn abort(&mut self, conn: ConnId) {
        if let Some(info) = self.conns.get_mut(&conn.0) {
            info.closing = true;
            info.released = true;
            self.sockets.get_mut::<tcp::Socket>(conn.0).abort();
        }
    }

    /// The tunnel's state at `now`, for `/health`, metrics and `wg show`.
    pub fn stats(&self, now: Instant) -> TunnelStats {
        TunnelStats {
            interface: "voicegate".into(),
            public_key: super::keys::encode_key(self.static_public.as_bytes()),
            address: self.address.to_string(),
            listen_port: self.listen_port,
            dropped_datagrams: self.dropped_datagrams,
            peers: self
                .peers
                .iter()
                .enumerate()
                .map(|(i, p)| PeerStats {
                    public_key: super::keys::encode_key(p.public_key.as_bytes()),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                    last_handshake_age_s: p
                        .last_handshake
                        .map(|at| now.saturating_duration_since(at).as_secs_f64()),
                    last_rx_age_s: p
                        .last_rx
                        .map(|at| now.saturating_duration_since(at).as_secs_f64()),
                    calls: self
                        .conns
                        .iter()
                        .filter(|(h, c)| {
                            c.incoming_from == Some(i)
                                && !c.closing
                                && self.sockets.get::<tcp::Socket>(**h).may_recv()
                        })
                        .count(),
                    handshakes: p.handshakes,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    persistent_keepalive_s: p.persistent_keepalive,
                })
                .collect(),
        }
    }

    /// Datagrams that matched no peer, failed to authenticate, or carried a source address
    /// outside the peer's allowed IPs.
    #[cfg(test)]
    pub(crate) fn rejected_datagrams(&self) -> u64 {
        self.rejected_datagrams
    }
}

/// The destination port of a TCP connection request (SYN without ACK) in an IP packet.
fn syn_port(packet: &[u8]) -> Option<u16> {
    use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};
    let (protocol, payload) = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            (ip.next_header(), ip.payload())
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            (ip.next_header(), ip.payload())
        }
        _ => return None,
    };
    if protocol != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(payload).ok()?;
    (tcp.syn() && !tcp.ack()).then(|| tcp.dst_port())
}

/// Sets boringtun's (thread-local, `mock-instant`) clock to `now`, as time since `epoch`.
fn set_boringtun_clock(epoch: Instant, now: Instant) {
    mock_instant::MockClock::set_time(now.saturating_duration_since(epoch));
}

/// A seed for smoltcp's initial sequence numbers and ephemeral choices.
fn random_seed() -> u64 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 8];
    // A failed OS RNG leaves a fixed seed: TCP still works, sequence numbers are guessable
    // only by someone who can already read the (encrypted, authenticated) tunnel.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}
