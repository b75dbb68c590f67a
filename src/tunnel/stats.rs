//! What the tunnel reports for `/health`, metrics and `voicegate wg show`: per peer the age
//! of the last handshake, bytes in and out, and the current endpoint.
//!
//! The JSON shape (served at `GET /v1/wireguard`) is [`TunnelStats`]; [`render_wg_show`]
//! turns it into the text `wg show` prints for a kernel interface.

use serde::{Deserialize, Serialize};

/// The whole tunnel: the interface and its peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunnelStats {
    /// Interface name shown by `wg show` (always `voicegate`).
    pub interface: String,
    /// This side's public key, base64.
    pub public_key: String,
    /// This side's tunnel address with prefix, e.g. `10.0.0.2/24`.
    pub address: String,
    /// UDP port the tunnel listens on.
    pub listen_port: u16,
    /// Datagrams dropped because the outgoing UDP queue was full.
    pub dropped_datagrams: u64,
    /// One entry per `[[wireguard.peer]]`, in config order.
    pub peers: Vec<PeerStats>,
}

/// One peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStats {
    /// The peer's public key, base64.
    pub public_key: String,
    /// Where the peer's datagrams go now (the config's endpoint, or learnt from the peer's
    /// last authenticated datagram when it roams); `None` until known.
    pub endpoint: Option<String>,
    /// Allowed IPs, e.g. `10.0.0.1/32`.
    pub allowed_ips: Vec<String>,
    /// Seconds since the last completed handshake; `None` if there has been none.
    pub last_handshake_age_s: Option<f64>,
    /// Seconds since the last authenticated datagram from the peer (data, keepalive or
    /// handshake); `None` if none yet. During a call Asterisk sends a frame every 20 ms, so
    /// this stays below 0.1 s unless the link is down.
    #[serde(default)]
    pub last_rx_age_s: Option<f64>,
    /// Open TCP connections the peer made to voicegate through the tunnel: AudioSocket
    /// calls (and, for a few milliseconds each, the dialplan's `/next` requests).
    #[serde(default)]
    pub calls: usize,
    /// Handshakes completed since start (the first one and every rekey).
    pub handshakes: u64,
    /// UDP payload bytes received from the peer.
    pub rx_bytes: u64,
    /// UDP payload bytes sent to the peer.
    pub tx_bytes: u64,
    /// Persistent keepalive interval, s; `None` when off.
    pub persistent_keepalive_s: Option<u16>,
}

impl PeerStats {
    /// True when the peer has had a handshake within 180 s (WireGuard's `Reject-After-Time`:
    /// past it, no session key is valid and the peer counts as silent).
    pub(crate) fn is_up(&self) -> bool {
        self.last_handshake_age_s.is_some_and(|a| a < 180.0)
    }
}

impl TunnelStats {
    /// The `tunnel` component of `/health`:
    /// - `down` when no peer is up ([`PeerStats::is_up`]);
    /// - `degraded` when a peer carrying calls ([`PeerStats::calls`] > 0) has sent nothing
    ///   for longer than `silent_after` (`[wireguard] silent_after_ms`): the link is cut
    ///   and those callers hear nothing, long before the 180 s a handshake may be old;
    /// - `ok` otherwise.
    ///
    /// The detail names each peer (its first allowed IP, else its key) with the time since
    /// its last handshake and last packet and its calls, e.g.
    /// `1 of 1 peers up; 10.0.0.1/32: handshake 12.0 s ago, last packet 0.0 s ago, 2 calls`.
    pub fn health(&self, silent_after: std::time::Duration) -> crate::health::Component {
        use crate::health::{Component, ComponentStatus};
        use std::fmt::Write as _;
        let up = self.peers.iter().filter(|p| p.is_up()).count();
        let mut detail = format!("{up} of {} peers up", self.peers.len());
        let mut silent = Vec::new();
        for p in &self.peers {
            let name = p.allowed_ips.first().unwrap_or(&p.public_key);
            let age = |a: Option<f64>| a.map_or("never".to_owned(), |a| format!("{a:.1} s ago"));
            // Writing to a String cannot fail.
            let _ = write!(
                detail,
                "; {name}: handshake {}, last packet {}, {} call{}",
                age(p.last_handshake_age_s),
                age(p.last_rx_age_s),
                p.calls,
                if p.calls == 1 { "" } else { "s" }
            );
            let quiet = p
                .last_rx_age_s
                .is_none_or(|a| a > silent_after.as_secs_f64());
            if p.calls > 0 && quiet {
                silent.push(name.as_str());
            }
        }
        let status = if up == 0 {
            ComponentStatus::Down
        } else if !silent.is_empty() {
            detail = format!(
                "silent for over {:.1} s while carrying calls: {}; {detail}",
                silent_after.as_secs_f64(),
                silent.join(", ")
            );
            ComponentStatus::Degraded
        } else {
            ComponentStatus::Ok
        };
        Component::new(status, detail)
    }

    /// Sets the tunnel's gauges in the `metrics` registry (call it when `/metrics` is
    /// scraped), labelled by the peer's public key:
    /// `voicegate_wireguard_peer_last_handshake_age_seconds` (-1 before the first
    /// handshake), `voicegate_wireguard_peer_last_rx_age_seconds` (-1 before the first
    /// packet), `voicegate_wireguard_peer_calls`, `voicegate_wireguard_peer_rx_bytes`, `voicegate_wireguard_peer_tx_bytes`,
    /// `voicegate_wireguard_peer_handshakes`, `voicegate_wireguard_peer_up` (1 or 0), and
    /// `voicegate_wireguard_dropped_datagrams`.
    pub(crate) fn record_metrics(&self) {
        metrics::gauge!("voicegate_wireguard_dropped_datagrams").set(self.dropped_datagrams as f64);
        for p in &self.peers {
            let peer = p.public_key.clone();
            metrics::gauge!("voicegate_wireguard_peer_last_handshake_age_seconds", "peer" => peer.clone())
                .set(p.last_handshake_age_s.unwrap_or(-1.0));
            metrics::gauge!("voicegate_wireguard_peer_last_rx_age_seconds", "peer" => peer.clone())
                .set(p.last_rx_age_s.unwrap_or(-1.0));
            metrics::gauge!("voicegate_wireguard_peer_calls", "peer" => peer.clone())
                .set(p.calls as f64);
            metrics::gauge!("voicegate_wireguard_peer_rx_bytes", "peer" => peer.clone())
                .set(p.rx_bytes as f64);
            metrics::gauge!("voicegate_wireguard_peer_tx_bytes", "peer" => peer.clone())
                .set(p.tx_bytes as f64);
            metrics::gauge!("voicegate_wireguard_peer_handshakes", "peer" => peer.clone())
                .set(p.handshakes as f64);
            metrics::gauge!("voicegate_wireguard_peer_up", "peer" => peer).set(if p.is_up() {
                1.0
            } else {
                0.0
            });
        }
    }
}

/// Renders stats the way `wg show` prints an interface.
pub fn render_wg_show(s: &TunnelStats) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "interface: {}", s.interface);
    let _ = writeln!(out, "  public key: {}", s.public_key);
    let _ = writeln!(out, "  private key: (hidden)");
    let _ = writeln!(out, "  listening port: {}", s.listen_port);
    let _ = writeln!(out, "  address: {}", s.address);
    for p in &s.peers {
        let _ = writeln!(out);
        let _ = writeln!(out, "peer: {}", p.public_key);
        if let Some(ep) = &p.endpoint {
            let _ = writeln!(out, "  endpoint: {ep}");
        }
        let allowed = if p.allowed_ips.is_empty() {
            "(none)".to_owned()
        } else {
            p.allowed_ips.join(", ")
        };
        let _ = writeln!(out, "  allowed ips: {allowed}");
        if let Some(age) = p.last_handshake_age_s {
            let _ = writeln!(out, "  latest handshake: {}", ago(age));
        }
        if p.rx_bytes > 0 || p.tx_bytes > 0 {
            let _ = writeln!(
                out,
                "  transfer: {} received, {} sent",
                bytes(p.rx_bytes),
                bytes(p.tx_bytes)
            );
        }
        if let Some(k) = p.persistent_keepalive_s {
            let _ = writeln!(
                out,
                "  persistent keepalive: every {}",
                duration(u64::from(k))
            );
        }
    }
    out
}

/// `wg`'s "1 minute, 5 seconds ago" (and "Now" under a second).
fn ago(age_s: f64) -> String {
    let secs = age_s.max(0.0) as u64;
    if secs == 0 {
        return "Now".into();
    }
    format!("{} ago", duration(secs))
}

fn duration(mut secs: u64) -> String {
    let units = [
        ("year", 365 * 24 * 3600),
        ("day", 24 * 3600),
        ("hour", 3600),
        ("minute", 60),
        ("second", 1),
    ];
    let mut parts = Vec::new();
    for (name, len) in units {
        let n = secs / len;
        secs %= len;
        if n > 0 {
            parts.push(format!("{n} {name}{}", if n == 1 { "" } else { "s" }));
        }
    }
    parts.join(", ")
}

/// `wg`'s byte counts: B, KiB, MiB, GiB, TiB with two decimals.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TunnelStats {
        TunnelStats {
            interface: "voicegate".into(),
            public_key: "fSAaMcDhvJvU5Ia8Ji45HUTVZUTNVV6TTzkt3rYzN3w=".into(),
            address: "10.0.0.2/24".into(),
            listen_port: 51820,
            dropped_datagrams: 0,
            peers: vec![
                PeerStats {
                    public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
                    endpoint: Some("192.0.2.1:51820".into()),
                    allowed_ips: vec!["10.0.0.1/32".into()],
                    last_handshake_age_s: Some(65.4),
                    last_rx_age_s: Some(0.02),
                    calls: 2,
                    handshakes: 2,
                    rx_bytes: 1_572_864,
                    tx_bytes: 2_500,
                    persistent_keepalive_s: Some(25),
                },
                PeerStats {
                    public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
                    endpoint: None,
                    allowed_ips: vec![],
                    last_handshake_age_s: None,
                    last_rx_age_s: None,
                    calls: 0,
                    handshakes: 0,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    persistent_keepalive_s: None,
                },
            ],
        }
    }

    #[test]
    fn renders_like_wg_show() {
        let text = render_wg_show(&sample());
        let want = "\
interface: voicegate
  public key: fSAaMcDhvJvU5Ia8Ji45HUTVZUTNVV6TTzkt3rYzN3w=
  private key: (hidden)
  listening port: 51820
  address: 10.0.0.2/24

peer: HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=
  endpoint: 192.0.2.1:51820
  allowed ips: 10.0.0.1/32
  latest handshake: 1 minute, 5 seconds ago
  transfer: 1.50 MiB received, 2.44 KiB sent
  persistent keepalive: every 25 seconds

peer: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
  allowed ips: (none)
";
        assert_eq!(text, want);
    }

    #[test]
    fn json_round_trips_and_silent_peer_is_down() {
        let s = sample();
        let json = serde_json::to_string(&s).unwrap();
        let back: TunnelStats = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(s.peers[0].is_up());
        assert!(!s.peers[1].is_up());
        assert_eq!(ago(0.4), "Now");
        assert_eq!(ago(3.0 * 3600.0 + 1.0), "3 hours, 1 second ago");
        assert_eq!(bytes(512), "512 B");
    }

    #[test]
    fn health_is_degraded_when_a_peer_with_calls_falls_silent() {
        use crate::health::ComponentStatus;
        use std::time::Duration;
        let silent_after = Duration::from_secs(3);
        let mut s = sample();
        let h = s.health(silent_after);
        assert_eq!(h.status, ComponentStatus::Ok, "{}", h.detail);
        assert!(
            h.detail.starts_with(
                "1 of 2 peers up; 10.0.0.1/32: handshake 65.4 s ago, last packet 0.0 s ago, 2 calls; "
            ),
            "{}",
            h.detail
        );
        // Silent for 4 s with calls on it: degraded, though the handshake is still valid.
        s.peers[0].last_rx_age_s = Some(4.0);
        let h = s.health(silent_after);
        assert_eq!(h.status, ComponentStatus::Degraded, "{}", h.detail);
        assert!(h.detail.contains("10.0.0.1/32"), "{}", h.detail);
        // Silent without calls (keepalives every 25 s are normal): ok.
        s.peers[0].calls = 0;
        assert_eq!(s.health(silent_after).status, ComponentStatus::Ok);
        // No peer with a live session: down.
        s.peers[0].last_handshake_age_s = Some(200.0);
        assert_eq!(s.health(silent_after).status, ComponentStatus::Down);
    }
}
