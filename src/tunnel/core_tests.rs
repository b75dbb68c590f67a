//! Two tunnel cores on a simulated network with a simulated clock: handshake, TCP both ways
//! with loss and reordering, rekey after boringtun's timers, keepalive, roaming.
#![allow(clippy::disallowed_types)] // a simulated std::time::Instant clock, as boringtun's Tunn takes

use super::core::*;
use boringtun::x25519::{PublicKey, StaticSecret};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const A_UDP: &str = "192.0.2.2:51820";
const B_UDP: &str = "192.0.2.1:51820";
const A_IP: &str = "10.0.0.2";
const B_IP: &str = "10.0.0.1";

/// A datagram in flight.
struct Flight {
    at: Instant,
    to_b: bool,
    from: SocketAddr,
    payload: Vec<u8>,
}

/// Both cores, the wire between them and the simulated clock.
struct Sim {
    a: TunnelCore,
    b: TunnelCore,
    now: Instant,
    flight: Vec<Flight>,
    rng: u64,
    /// Chance a datagram is lost, per mille.
    loss_permille: u64,
    /// Extra random delay per datagram, ms (reordering when above the spacing of packets).
    jitter_ms: u64,
    /// Where A's datagrams appear to come from (changes when A roams).
    a_from: SocketAddr,
    /// Datagrams A sent, with their sizes.
    a_sent: Vec<(Instant, usize)>,
    /// Datagrams delivered out of order (a later-sent one before an earlier-sent one).
    reordered: usize,
    lost: usize,
    seq: u64,
    /// B's next datagrams to lose on purpose (a chosen loss, beside the random one).
    drop_from_b: usize,
}

fn key(seed: u8) -> StaticSecret {
    StaticSecret::from([seed; 32])
}

fn core(
    me: u8,
    peer: u8,
    addr: &str,
    peer_ip: &str,
    endpoint: Option<&str>,
    keepalive: Option<u16>,
    now: Instant,
) -> TunnelCore {
    TunnelCore::new(
        CoreSpec {
            private_key: key(me),
            address: format!("{addr}/24").parse().unwrap(),
            mtu: 1420,
            listen_port: 51820,
            peers: vec![PeerSpec {
                public_key: PublicKey::from(&key(peer)),
                preshared_key: Some([7; 32]),
                endpoint: endpoint.map(|e| e.parse().unwrap()),
                allowed_ips: vec![format!("{peer_ip}/32").parse().unwrap()],
                persistent_keepalive: keepalive,
            }],
        },
        now,
    )
    .unwrap()
}

impl Sim {
    fn new(loss_permille: u64, jitter_ms: u64, keepalive: Option<u16>) -> Self {
        let now = Instant::now();
        Sim {
            // A (voicegate) knows B's endpoint; B (the PBX) learns A's from its handshake.
            a: core(1, 2, A_IP, B_IP, Some(B_UDP), keepalive, now),
            b: core(2, 1, B_IP, A_IP, None, None, now),
            now,
            flight: Vec::new(),
            rng: 0x2545_f491_4f6c_dd1d,
            loss_permille,
            jitter_ms,
            a_from: A_UDP.parse().unwrap(),
            a_sent: Vec::new(),
            reordered: 0,
            lost: 0,
            seq: 0,
            drop_from_b: 0,
        }
    }

    fn rand(&mut self, n: u64) -> u64 {
        // xorshift64: deterministic, so a failure replays exactly.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    fn collect(&mut self) {
        while let Some(t) = self.a.poll_transmit() {
            assert_eq!(t.dst, B_UDP.parse().unwrap());
            self.a_sent.push((self.now, t.payload.len()));
            let from = self.a_from;
            self.send(true, from, t.payload);
        }
        while let Some(t) = self.b.poll_transmit() {
            if t.dst != self.a_from {
                // A roamed: its old NAT mapping is gone.
                self.lost += 1;
                continue;
            }
            if self.drop_from_b > 0 {
                self.drop_from_b -= 1;
                self.lost += 1;
                continue;
            }
            self.send(false, B_UDP.parse().unwrap(), t.payload);
        }
    }

    fn send(&mut self, to_b: bool, from: SocketAddr, payload: Vec<u8>) {
        if self.rand(1000) < self.loss_permille {
            self.lost += 1;
            return;
        }
        let delay = Duration::from_millis(5 + self.rand(self.jitter_ms + 1));
        self.seq += 1;
        // Keep send order in the payload's place for counting reorderings: sorted by at.
        self.flight.push(Flight {
            at: self.now + delay,
            to_b,
            from,
            payload,
        });
    }

    /// Advances to the next thing that happens (a delivery or a core's timer), at most `max`.
    fn step(&mut self, max: Duration) {
        let mut next = self.now + max;
        next = next.min(self.a.poll_timeout()).min(self.b.poll_timeout());
        if let Some(f) = self.flight.iter().map(|f| f.at).min() {
            next = next.min(f);
        }
        self.now = self.now.max(next);
        let now = self.now;
        let mut due: Vec<Flight> = Vec::new();
        let mut i = 0;
        while i < self.flight.len() {
            if self.flight[i].at <= now {
                due.push(self.flight.remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|f| f.at);
        // Anything delivered while an older datagram is still in flight is reordered.
        self.reordered += due.len().min(self.flight.len());
        for f in due {
            if f.to_b {
                self.b.handle_datagram(now, f.from, &f.payload);
            } else {
                self.a.handle_datagram(now, f.from, &f.payload);
            }
        }
        self.a.handle_timeout(now);
        self.b.handle_timeout(now);
        self.collect();
    }

    /// Runs until `done` or `limit` of simulated time passes.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Sim) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.step(Duration::from_millis(50));
        }
        done(self)
    }

    /// A connects to B's port 9092; returns (A's conn, B's conn).
    fn connect(&mut self) -> (ConnId, ConnId) {
        self.b.listen(9092).unwrap();
        let remote: SocketAddr = format!("{B_IP}:9092").parse().unwrap();
        let conn_a = self.a.connect(self.now, remote).unwrap();
        let mut connected = false;
        let mut accepted = None;
        let ok = self.run_until(Duration::from_secs(60), |s| {
            while let Some(ev) = s.a.poll_event() {
                if ev == TunnelEvent::Connected(conn_a) {
                    connected = true;
                }
            }
            while let Some(ev) = s.b.poll_event() {
                if let TunnelEvent::Accepted { conn, port, remote } = ev {
                    assert_eq!(port, 9092);
                    assert_eq!(remote.ip().to_string(), A_IP);
                    accepted = Some(conn);
                }
            }
            connected && accepted.is_some()
        });
        assert!(
            ok,
            "connection through the tunnel in time (connected {connected})"
        );
        (conn_a, accepted.unwrap())
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `a_data` from A and `b_data` from B at the same time; returns what each side read.
fn exchange(
    s: &mut Sim,
    ca: ConnId,
    cb: ConnId,
    a_data: &[u8],
    b_data: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let (mut sent_a, mut sent_b) = (0, 0);
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 4096];
    let ok = s.run_until(Duration::from_secs(300), |s| {
        if sent_a < a_data.len() {
            sent_a += s.a.send(ca, &a_data[sent_a..]).unwrap();
        }
        if sent_b < b_data.len() {
            sent_b += s.b.send(cb, &b_data[sent_b..]).unwrap();
        }
        while let Recv::Data(n) = s.b.recv(cb, &mut buf) {
            got_b.extend_from_slice(&buf[..n]);
        }
        while let Recv::Data(n) = s.a.recv(ca, &mut buf) {
            got_a.extend_from_slice(&buf[..n]);
        }
        s.a.handle_timeout(s.now);
        s.b.handle_timeout(s.now);
        s.collect();
        got_a.len() >= b_data.len() && got_b.len() >= a_data.len()
    });
    assert!(
        ok,
        "exchange done: A got {} of {}, B got {} of {}",
        got_a.len(),
        b_data.len(),
        got_b.len(),
        a_data.len()
    );
    (got_a, got_b)
}

#[test]
fn handshake_and_tcp_both_ways_over_a_lossy_reordering_link() {
    // 5 % loss each way, up to 30 ms of jitter (datagrams overtake each other).
    let mut s = Sim::new(50, 30, None);
    let (ca, cb) = s.connect();
    let a_stats = s.a.stats(s.now);
    assert_eq!(a_stats.peers[0].handshakes, 1);
    assert!(a_stats.peers[0].last_handshake_age_s.is_some());

    let up = pattern(200_000, 1);
    let down = pattern(150_000, 2);
    let (got_a, got_b) = exchange(&mut s, ca, cb, &up, &down);
    assert_eq!(got_b, up, "A→B arrives intact and in order");
    assert_eq!(got_a, down, "B→A arrives intact and in order");
    assert!(s.lost > 10, "loss was injected ({} lost)", s.lost);
    assert!(
        s.reordered > 10,
        "reordering was injected ({})",
        s.reordered
    );

    // Close from A: B reads EOF.
    s.a.close(ca);
    let mut buf = [0u8; 16];
    let closed = s.run_until(Duration::from_secs(30), |s| {
        s.b.recv(cb, &mut buf) == Recv::Eof
    });
    assert!(closed, "B sees A's FIN");

    let b_stats = s.b.stats(s.now);
    assert_eq!(
        b_stats.peers[0].endpoint.as_deref(),
        Some(A_UDP),
        "B learnt A's endpoint"
    );
    assert!(b_stats.peers[0].rx_bytes > 200_000);
    assert!(b_stats.peers[0].tx_bytes > 150_000);
}

#[test]
fn rekeys_after_rekey_after_time_and_keeps_the_connection() {
    let mut s = Sim::new(0, 2, None);
    let (ca, cb) = s.connect();
    assert_eq!(s.a.stats(s.now).peers[0].handshakes, 1);
    // Two and a half minutes of a call's worth of traffic: a 160-byte frame each 20 ms
    // would be slow to simulate, so one frame a second both ways keeps the session in use.
    let frame = pattern(160, 3);
    let start = s.now;
    let mut buf = vec![0u8; 1024];
    let mut next_frame = s.now;
    let mut got = 0usize;
    let mut sent = 0usize;
    s.run_until(Duration::from_secs(150), |s| {
        if s.now >= next_frame {
            next_frame = s.now + Duration::from_secs(1);
            sent += s.a.send(ca, &frame).unwrap();
            s.b.send(cb, &frame).unwrap();
            s.a.handle_timeout(s.now);
            s.b.handle_timeout(s.now);
            s.collect();
        }
        while let Recv::Data(n) = s.b.recv(cb, &mut buf) {
            got += n;
        }
        while let Recv::Data(_) = s.a.recv(ca, &mut buf) {}
        false
    });
    let stats = s.a.stats(s.now);
    assert!(
        stats.peers[0].handshakes >= 2,
        "a new handshake after 120 s (REKEY_AFTER_TIME): {stats:?}"
    );
    let age = stats.peers[0].last_handshake_age_s.unwrap();
    assert!(age < 40.0, "last handshake is the rekey, {age} s ago");
    assert!(s.now - start >= Duration::from_secs(150));
    assert!(
        got + 160 >= sent,
        "frames kept flowing across the rekey ({got} of {sent})"
    );
    // The connection still carries data after the rekey.
    let (got_a, got_b) = exchange(&mut s, ca, cb, &pattern(5000, 4), &pattern(5000, 5));
    assert_eq!(got_b, pattern(5000, 4));
    assert_eq!(got_a, pattern(5000, 5));
}

#[test]
fn persistent_keepalive_brings_the_link_up_and_keeps_it_alive() {
    let mut s = Sim::new(0, 2, Some(10));
    s.a.initiate_keepalive_peers(s.now);
    s.collect();
    // With no traffic at all, the handshake completes and keepalives flow.
    s.run_until(Duration::from_secs(65), |_| false);
    let a = s.a.stats(s.now);
    let b = s.b.stats(s.now);
    assert_eq!(a.peers[0].handshakes, 1, "{a:?}");
    assert_eq!(b.peers[0].handshakes, 1, "{b:?}");
    // Keepalives are empty data messages: 32 bytes (16 header + 16 tag).
    let keepalives = s.a_sent.iter().filter(|(_, len)| *len == 32).count();
    assert!(
        (5..=8).contains(&keepalives),
        "one per 10 s for 65 s, got {keepalives}"
    );
    assert_eq!(b.peers[0].endpoint.as_deref(), Some(A_UDP));
}

#[test]
fn follows_a_peer_that_roams() {
    let mut s = Sim::new(0, 2, Some(5));
    let (ca, cb) = s.connect();
    // A's NAT changes its public address and port.
    s.a_from = "198.51.100.7:40000".parse().unwrap();
    let (got_a, got_b) = exchange(&mut s, ca, cb, &pattern(3000, 6), &pattern(3000, 7));
    assert_eq!(got_b, pattern(3000, 6));
    assert_eq!(got_a, pattern(3000, 7));
    assert_eq!(
        s.b.stats(s.now).peers[0].endpoint.as_deref(),
        Some("198.51.100.7:40000")
    );
}

#[test]
fn garbage_and_strangers_are_rejected_without_panic() {
    let mut s = Sim::new(0, 2, None);
    let from: SocketAddr = "203.0.113.9:999".parse().unwrap();
    let mut rng = 1u64;
    for len in [0usize, 1, 4, 32, 92, 148, 200, 1500] {
        let mut junk = vec![0u8; len];
        for b in junk.iter_mut() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
            *b = (rng >> 56) as u8;
        }
        for kind in 1u8..=4 {
            if len >= 4 {
                junk[0] = kind;
                junk[1..4].fill(0);
            }
            s.b.handle_datagram(s.now, from, &junk);
        }
    }
    // A stranger with a valid handshake but an unknown key gets nowhere.
    let mut stranger = core(9, 2, A_IP, B_IP, Some(B_UDP), None, s.now);
    stranger.initiate_handshake(s.now, 0);
    while let Some(t) = stranger.poll_transmit() {
        s.b.handle_datagram(s.now, from, &t.payload);
    }
    assert!(
        s.b.poll_transmit().is_none(),
        "nothing is sent back to strangers"
    );
    let b = s.b.stats(s.now);
    assert_eq!(b.peers[0].handshakes, 0);
    assert_eq!(
        b.peers[0].endpoint, None,
        "a stranger does not move the endpoint"
    );
    assert!(s.b.rejected_datagrams() > 10);
}

#[test]
fn connect_without_a_route_is_refused() {
    let mut s = Sim::new(0, 2, None);
    let e =
        s.a.connect(s.now, "10.9.9.9:80".parse().unwrap())
            .unwrap_err();
    assert_eq!(e, CoreError::NoRoute("10.9.9.9".parse().unwrap()));
}

#[test]
fn many_connections_arriving_together_are_all_accepted() {
    let mut s = Sim::new(0, 0, None);
    let _ = s.connect();
    // 50 calls at the same instant: their SYNs reach B in one batch.
    let remote: SocketAddr = format!("{B_IP}:9092").parse().unwrap();
    let conns: Vec<ConnId> = (0..50)
        .map(|_| s.a.connect(s.now, remote).unwrap())
        .collect();
    let mut connected = 0;
    let mut accepted = 0;
    let mut failed = 0;
    s.run_until(Duration::from_secs(10), |s| {
        while let Some(ev) = s.a.poll_event() {
            match ev {
                TunnelEvent::Connected(c) if conns.contains(&c) => connected += 1,
                TunnelEvent::ConnectFailed(_) => failed += 1,
                _ => {}
            }
        }
        while let Some(ev) = s.b.poll_event() {
            if matches!(ev, TunnelEvent::Accepted { .. }) {
                accepted += 1;
            }
        }
        connected + failed == 50 && accepted == 50
    });
    assert_eq!((connected, accepted, failed), (50, 50, 0));
}

#[test]
fn a_lost_syn_ack_still_connects_once() {
    // B's socket table has free slots in front (a listener on another port came and went),
    // so the listening socket B adds after the first SYN can sit before the half-open one,
    // where A's SYN sent again (its SYN-ACK lost) may land. Whichever socket answers, the
    // connection must come up once and never be refused.
    let mut s = Sim::new(0, 0, None);
    let _ = s.connect();
    s.b.listen(9000).unwrap();
    s.b.listen(9093).unwrap();
    s.b.unlisten(9000);
    s.run_until(Duration::from_millis(100), |_| false);
    let remote: SocketAddr = format!("{B_IP}:9093").parse().unwrap();
    let conn = s.a.connect(s.now, remote).unwrap();
    // A's SYN goes out; B's SYN-ACK is lost.
    s.collect();
    s.drop_from_b = 1;
    let (mut connected, mut failed, mut accepted) = (false, false, 0);
    // 25 s: A's SYN again, and any second half-open connection at B playing out.
    s.run_until(Duration::from_secs(25), |s| {
        while let Some(ev) = s.a.poll_event() {
            match ev {
                TunnelEvent::Connected(c) if c == conn => connected = true,
                TunnelEvent::ConnectFailed(c) if c == conn => failed = true,
                _ => {}
            }
        }
        while let Some(ev) = s.b.poll_event() {
            if matches!(ev, TunnelEvent::Accepted { port: 9093, .. }) {
                accepted += 1;
            }
        }
        false
    });
    assert!(s.lost >= 1, "the SYN-ACK was lost");
    assert!(
        !failed,
        "the connection was refused after its SYN-ACK was lost"
    );
    assert!(connected, "connected after the SYN was sent again");
    assert_eq!(accepted, 1, "one connection accepted at B");
}

#[test]
fn a_cut_link_under_a_call_shows_as_silence_within_seconds() {
    use crate::health::ComponentStatus;
    let silent_after = Duration::from_secs(3);
    // A keeps the link up (keepalive 25 s) and calls B, as Asterisk calls voicegate.
    let mut s = Sim::new(0, 2, Some(25));
    let (ca, cb) = s.connect();
    let frame = pattern(320, 8);
    let mut buf = vec![0u8; 4096];
    // One call-second of 20 ms frames each way.
    let mut talk = |s: &mut Sim, for_: Duration| {
        let mut next = s.now;
        s.run_until(for_, |s| {
            if s.now >= next {
                next += Duration::from_millis(20);
                let _ = s.a.send(ca, &frame);
                let _ = s.b.send(cb, &frame);
                s.a.handle_timeout(s.now);
                s.b.handle_timeout(s.now);
                s.collect();
            }
            while let Recv::Data(_) = s.b.recv(cb, &mut buf) {}
            while let Recv::Data(_) = s.a.recv(ca, &mut buf) {}
            false
        });
    };
    talk(&mut s, Duration::from_secs(1));
    let b = s.b.stats(s.now);
    assert_eq!(b.peers[0].calls, 1, "B counts A's connection as a call");
    assert!(b.peers[0].last_rx_age_s.unwrap() < 0.1, "{b:?}");
    assert_eq!(b.health(silent_after).status, ComponentStatus::Ok);
    // A's connect was outgoing: A carries no calls of B's.
    assert_eq!(s.a.stats(s.now).peers[0].calls, 0);

    // The link is cut for 5 s: the handshake is still fresh, but B hears nothing.
    s.loss_permille = 1000;
    talk(&mut s, Duration::from_secs(2));
    let h = s.b.stats(s.now).health(silent_after);
    assert_eq!(
        h.status,
        ComponentStatus::Ok,
        "2 s of silence: {}",
        h.detail
    );
    talk(&mut s, Duration::from_secs(3));
    let b = s.b.stats(s.now);
    let age = b.peers[0].last_rx_age_s.unwrap();
    assert!((4.9..=5.1).contains(&age), "silent for {age} s");
    assert!(b.peers[0].last_handshake_age_s.unwrap() < 180.0);
    let h = b.health(silent_after);
    assert_eq!(h.status, ComponentStatus::Degraded, "{}", h.detail);
    assert!(h.detail.contains("10.0.0.2/32"), "{}", h.detail);

    // The link comes back: TCP retransmits, packets flow, the tunnel is ok again.
    s.loss_permille = 0;
    talk(&mut s, Duration::from_secs(3));
    let b = s.b.stats(s.now);
    // (TCP may still be in retransmission backoff: packets arrive, not yet every 20 ms.)
    assert!(b.peers[0].last_rx_age_s.unwrap() < 1.0, "{b:?}");
    assert_eq!(b.health(silent_after).status, ComponentStatus::Ok);

    // The call ends (voicegate closes it): no call left, silence is no longer a symptom.
    s.b.release(cb);
    s.run_until(Duration::from_secs(1), |_| false);
    let b = s.b.stats(s.now);
    assert_eq!(b.peers[0].calls, 0);
    s.loss_permille = 1000;
    s.run_until(Duration::from_secs(5), |_| false);
    assert_eq!(
        s.b.stats(s.now).health(silent_after).status,
        ComponentStatus::Ok
    );
}
