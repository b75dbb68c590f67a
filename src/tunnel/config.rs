//! `[wireguard]` in the TOML config: the same fields and key formats as a `wg-quick` file,
//! so an installer can copy values between voicegate and the Asterisk server's `wg0.conf`.
//!
//! ```toml
//! [wireguard]
//! private_key = { file = "/etc/voicegate/wg.key" }   # base64, as `voicegate wg genkey` writes
//! address = "10.0.0.2/24"                           # wg-quick Address
//! listen_port = 51820                               # wg-quick ListenPort
//! mtu = 1420                                        # wg-quick MTU
//!
//! [[wireguard.peer]]
//! public_key = "base64..."                          # PublicKey
//! preshared_key = { file = "/etc/voicegate/wg.psk" } # PresharedKey (optional)
//! endpoint = "pbx.example.net:51820"                # Endpoint, re-resolved when the link fails
//! allowed_ips = ["10.0.0.1/32"]                     # AllowedIPs
//! persistent_keepalive = 25                         # PersistentKeepalive, s (0 = off)
//! ```
//!
//! Beyond wg-quick: `silent_after_ms` (when `/health` calls a peer with calls silent) and
//! `[[wireguard.forward]]` (loopback TCP ports carried into the tunnel, for ARI).

use crate::error::ConfigError;
use crate::secret::SecretSource;
use crate::tunnel::keys;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// `[wireguard]`: the in-process WireGuard interface.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireGuardConfig {
    /// This side's private key, base64 (`wg genkey`); from a file, credential or env.
    pub private_key: SecretSource,
    /// This side's tunnel address with prefix, e.g. `10.0.0.2/24` (wg-quick `Address`).
    pub address: IpNet,
    /// UDP port to listen on (wg-quick `ListenPort`); unset picks a free port, which suits a
    /// side that only dials out with a persistent keepalive.
    #[serde(default)]
    pub listen_port: Option<u16>,
    /// Largest IP packet inside the tunnel, bytes (wg-quick `MTU`, default 1420).
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// `[[wireguard.peer]]` entries.
    #[serde(default, rename = "peer")]
    pub peers: Vec<WireGuardPeerConfig>,
    /// `[[wireguard.forward]]` entries: loopback TCP ports carried through the tunnel, so
    /// that clients that only speak to a host and port (the ARI REST client and its events
    /// WebSocket) reach the remote Asterisk: point `[ari] url` at the forward's `listen`.
    #[serde(default, rename = "forward")]
    pub forwards: Vec<ForwardConfig>,
    /// A peer carrying calls that has sent nothing for this long marks the `tunnel`
    /// component of `/health` degraded, ms (default 3000; Asterisk sends a frame every 20 ms
    /// during a call, so silence means the link is cut).
    #[serde(default = "default_silent_after_ms")]
    pub silent_after_ms: u64,
}

/// `[[wireguard.forward]]`: TCP on a local address, carried to a tunnel address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Local address to accept on; must be loopback, e.g. `127.0.0.1:18088`.
    pub listen: std::net::SocketAddr,
    /// Where each connection goes inside the tunnel, e.g. `10.0.0.1:8088` (Asterisk's ARI).
    pub to: std::net::SocketAddr,
}

fn default_mtu() -> u16 {
    1420
}

fn default_silent_after_ms() -> u64 {
    3000
}

/// `[[wireguard.peer]]`: one remote WireGuard peer (the Asterisk server).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WireGuardPeerConfig {
    /// The peer's public key, base64 (`wg pubkey`).
    pub public_key: String,
    /// Optional preshared key, base64 (`wg genpsk`); from a file, credential or env.
    #[serde(default)]
    pub preshared_key: Option<SecretSource>,
    /// The peer's UDP endpoint, `host:port`; resolved at start and again whenever no
    /// handshake succeeds. Unset: wait for the peer to connect (its address is learnt).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Tunnel addresses routed to this peer and accepted from it (wg-quick `AllowedIPs`).
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    /// Send a keepalive every this many seconds (wg-quick `PersistentKeepalive`; 0 or unset
    /// = off). Needed when this side is behind NAT and must stay reachable.
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
}

impl WireGuardConfig {
    /// Checks the keys decode, the addresses make sense and every secret can be read.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key, e.g. `wireguard.peer[0].public_key`.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let key = self
            .private_key
            .resolve()
            .map_err(|e| ConfigError::invalid("wireguard.private_key", e.to_string()))?;
        keys::decode_key(key.expose())
            .map_err(|e| ConfigError::invalid("wireguard.private_key", e.to_string()))?;
        if !(100..=600_000).contains(&self.silent_after_ms) {
            return Err(ConfigError::invalid(
                "wireguard.silent_after_ms",
                "must be 100 to 600000",
            ));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(ConfigError::invalid("wireguard.mtu", "must be 576 to 9000"));
        }
        if self.address.prefix_len() == self.address.max_prefix_len()
            && self.peers.iter().all(|p| p.allowed_ips.is_empty())
        {
            return Err(ConfigError::invalid(
                "wireguard.address",
                "a host address needs peers with allowed_ips",
            ));
        }
        for (i, f) in self.forwards.iter().enumerate() {
            if !f.listen.ip().is_loopback() {
                return Err(ConfigError::invalid(
                    &format!("wireguard.forward[{i}].listen"),
                    "must be a loopback address: a forward must not open the tunnel to the LAN",
                ));
            }
        }
        if self.peers.is_empty() {
            return Err(ConfigError::invalid(
                "wireguard.peer",
                "at least one [[wireguard.peer]] is needed",
            ));
        }
        for (i, p) in self.peers.iter().enumerate() {
            let k = |field: &str| format!("wireguard.peer[{i}].{field}");
            keys::decode_key(&p.public_key)
                .map_err(|e| ConfigError::invalid(&k("public_key"), e.to_string()))?;
            if self.peers[..i].iter().any(|q| q.public_key == p.public_key) {
                return Err(ConfigError::invalid(
                    &k("public_key"),
                    "the same peer is listed twice",
                ));
            }
            if let Some(psk) = &p.preshared_key {
                let psk = psk
                    .resolve()
                    .map_err(|e| ConfigError::invalid(&k("preshared_key"), e.to_string()))?;
                keys::decode_key(psk.expose())
                    .map_err(|e| ConfigError::invalid(&k("preshared_key"), e.to_string()))?;
            }
            if let Some(ep) = &p.endpoint {
                split_endpoint(ep).map_err(|m| ConfigError::invalid(&k("endpoint"), m))?;
            }
            if p.allowed_ips.is_empty() {
                return Err(ConfigError::invalid(
                    &k("allowed_ips"),
                    "must name at least one address range, e.g. [\"10.0.0.1/32\"]",
                ));
            }
        }
        Ok(())
    }
}

/// The addresses `[ari] url` names: the literal IP, or both loopbacks for `localhost`;
/// empty for other host names or an unparsable URL. Port: the URL's, or 80/443.
fn url_addrs(url: &str) -> Vec<std::net::SocketAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let Ok(u) = reqwest::Url::parse(url) else {
        return Vec::new();
    };
    let Some(port) = u.port_or_known_default() else {
        return Vec::new();
    };
    let host = u.host_str().unwrap_or_default();
    let ips: Vec<IpAddr> = if host.eq_ignore_ascii_case("localhost") {
        vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
    } else {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<IpAddr>().into_iter().collect()
    };
    ips.into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

impl WireGuardConfig {
    /// [`Self::silent_after_ms`] as a duration.
    pub(crate) fn silent_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.silent_after_ms)
    }

    /// The index of the `[[wireguard.forward]]` whose `listen` is the host and port of
    /// `url` (an `[ari] url`): ARI then reaches Asterisk through the tunnel, at that
    /// forward's `to`.
    pub fn forward_for_url(&self, url: &str) -> Option<usize> {
        let addrs = url_addrs(url);
        self.forwards.iter().position(|f| addrs.contains(&f.listen))
    }

    /// Where Asterisk, on the far side of the tunnel, reaches voicegate's AudioSocket
    /// listener: the tunnel address (`address` without its prefix) and `port` (the port of
    /// `[audiosocket] listen`, which voicegate also listens on inside the tunnel).
    pub(crate) fn audiosocket_addr(&self, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.address.addr(), port)
    }

    /// Fills in `[ari] external_host` (`external_host`, for ARI at `ari_url`) when ARI goes
    /// through a forward and it is unset: the
    /// default (`[audiosocket] listen`, usually `127.0.0.1:9092`) would send Asterisk's
    /// externalMedia channel to Asterisk's own loopback. The tunnel default is
    /// [`Self::audiosocket_addr`], e.g. `10.0.0.2:9092`.
    pub(crate) fn default_ari_external_host(
        &self,
        ari_url: &str,
        external_host: &mut Option<String>,
        audiosocket_port: u16,
    ) {
        if external_host.is_none() && self.forward_for_url(ari_url).is_some() {
            *external_host = Some(self.audiosocket_addr(audiosocket_port).to_string());
        }
    }

    /// Checks `[ari]` (`ari_url`, `external_host`) against the tunnel: ARI must reach a tunnel address through a
    /// `[[wireguard.forward]]` (the ARI client does not use the tunnel by itself), and when
    /// it does, `external_host` must not be a loopback address (Asterisk is on the far side).
    /// `audiosocket_port` is the port of `[audiosocket] listen`, named in the message.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `ari.url` or `ari.external_host`.
    pub(crate) fn check_ari(
        &self,
        ari_url: &str,
        external_host: Option<&str>,
        audiosocket_port: u16,
    ) -> Result<(), ConfigError> {
        let in_tunnel = url_addrs(ari_url).iter().any(|a| {
            self.address.contains(&a.ip())
                || self
                    .peers
                    .iter()
                    .any(|p| p.allowed_ips.iter().any(|n| n.contains(&a.ip())))
        });
        if in_tunnel {
            return Err(ConfigError::invalid(
                "ari.url",
                "is a tunnel address, which the ARI client cannot reach directly: add a \
                 [[wireguard.forward]] with listen = \"127.0.0.1:18088\" and to = that \
                 address and port, and set ari.url = \"http://127.0.0.1:18088\"",
            ));
        }
        let Some(f) = self.forward_for_url(ari_url) else {
            return Ok(());
        };
        let host = external_host.unwrap_or_default();
        let host_ip = host
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'));
        let loopback = host_ip.is_some_and(|h| {
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
        });
        if loopback {
            return Err(ConfigError::invalid(
                "ari.external_host",
                format!(
                    "{host} is voicegate's loopback, but ARI reaches Asterisk through the \
                     tunnel (wireguard.forward[{f}]): Asterisk connects externalMedia to \
                     voicegate's tunnel address, e.g. \"{}\" (the default when unset)",
                    self.audiosocket_addr(audiosocket_port)
                ),
            ));
        }
        Ok(())
    }
}

/// Splits `host:port` (or `[v6]:port`) into host and port.
///
/// # Errors
/// A message saying what is wrong.
pub(crate) fn split_endpoint(endpoint: &str) -> Result<(&str, u16), String> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| "must be host:port".to_owned())?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err("must be host:port with a non-zero port".into());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    const PRIV: &str = "IF7rg2tPXiGB37woxL4pw78YWqXeNxcrf1JhbeEoCkk=";
    const PUB: &str = "fSAaMcDhvJvU5Ia8Ji45HUTVZUTNVV6TTzkt3rYzN3w=";

    fn parse(extra: &str) -> Result<Config, crate::error::ConfigError> {
        Config::from_toml(
            &format!("[wireguard]\nprivate_key = \"{PRIV}\"\naddress = \"10.0.0.2/24\"\n{extra}"),
            Path::new("x.toml"),
        )
    }

    #[test]
    fn wg_quick_fields_parse() {
        let c = parse(&format!(
            "listen_port = 51820\n[[wireguard.peer]]\npublic_key = \"{PUB}\"\n\
             endpoint = \"pbx.example.net:51820\"\nallowed_ips = [\"10.0.0.1/32\"]\n\
             persistent_keepalive = 25\n"
        ))
        .unwrap();
        let wg = c.wireguard.unwrap();
        assert_eq!(wg.mtu, 1420);
        assert_eq!(wg.listen_port, Some(51820));
        assert_eq!(wg.peers[0].persistent_keepalive, Some(25));
        assert_eq!(wg.peers[0].allowed_ips[0].to_string(), "10.0.0.1/32");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e =
            parse("[[wireguard.peer]]\npublic_key = \"short\"\nallowed_ips = [\"10.0.0.1/32\"]\n")
                .unwrap_err();
        assert!(
            e.to_string().contains("wireguard.peer[0].public_key"),
            "{e}"
        );
        let e = parse(&format!(
            "[[wireguard.peer]]\npublic_key = \"{PUB}\"\nendpoint = \"nohost\"\nallowed_ips = [\"10.0.0.1/32\"]\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("wireguard.peer[0].endpoint"), "{e}");
        let e = parse(&format!("[[wireguard.peer]]\npublic_key = \"{PUB}\"\n")).unwrap_err();
        assert!(
            e.to_string().contains("wireguard.peer[0].allowed_ips"),
            "{e}"
        );
        let e = parse("").unwrap_err();
        assert!(e.to_string().contains("wireguard.peer"), "{e}");
        let e = Config::from_toml(
            "[wireguard]\nprivate_key = { env = \"VOICEGATE_SURELY_UNSET_WG\" }\naddress = \"10.0.0.2/24\"\n",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("wireguard.private_key"), "{e}");
        let e = parse("mtu = 100\n").unwrap_err();
        assert!(e.to_string().contains("wireguard.mtu"), "{e}");
    }

    const ARI_FORWARD: &str = "[[wireguard.peer]]\npublic_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\n\
        allowed_ips = [\"10.0.0.1/32\"]\n\
        [[wireguard.forward]]\nlisten = \"127.0.0.1:18088\"\nto = \"10.0.0.1:8088\"\n";

    fn with_ari(ari: &str) -> Result<Config, crate::error::ConfigError> {
        Config::from_toml(
            &format!(
                "[audiosocket]\nlisten = \"127.0.0.1:9093\"\n[ari]\npassword = \"pw\"\n{ari}\n\
                 [wireguard]\nprivate_key = \"{PRIV}\"\naddress = \"10.0.0.2/24\"\n{ARI_FORWARD}"
            ),
            Path::new("x.toml"),
        )
    }

    #[test]
    fn ari_through_a_forward_defaults_external_host_to_the_tunnel_address() {
        let c = with_ari("url = \"http://127.0.0.1:18088\"").unwrap();
        let ari = c.ari.as_ref().unwrap();
        assert_eq!(ari.external_host.as_deref(), Some("10.0.0.2:9093"));
        // `localhost` names the same forward; check-config prints the effective value.
        let c = with_ari("url = \"http://localhost:18088\"").unwrap();
        assert!(
            c.to_redacted_toml()
                .contains("external_host = \"10.0.0.2:9093\""),
            "{}",
            c.to_redacted_toml()
        );
        // An explicit non-loopback value is kept.
        let c = with_ari("url = \"http://127.0.0.1:18088\"\nexternal_host = \"10.0.0.2:9999\"")
            .unwrap();
        assert_eq!(
            c.ari.unwrap().external_host.as_deref(),
            Some("10.0.0.2:9999")
        );
        // ARI on this box (not a forward): the default stays the AudioSocket listener.
        let c = with_ari("url = \"http://127.0.0.1:8088\"").unwrap();
        assert_eq!(c.ari.unwrap().external_host, None);
    }

    #[test]
    fn ari_to_a_tunnel_address_or_loopback_external_host_is_refused() {
        let e = with_ari("url = \"http://10.0.0.1:8088\"").unwrap_err();
        assert!(e.to_string().contains("`ari.url`"), "{e}");
        assert!(e.to_string().contains("[[wireguard.forward]]"), "{e}");
        let e = with_ari("url = \"http://127.0.0.1:18088\"\nexternal_host = \"127.0.0.1:9093\"")
            .unwrap_err();
        assert!(e.to_string().contains("`ari.external_host`"), "{e}");
        assert!(e.to_string().contains("10.0.0.2:9093"), "{e}");
    }

    #[test]
    fn private_key_never_printed() {
        let c = parse(&format!(
            "[[wireguard.peer]]\npublic_key = \"{PUB}\"\nallowed_ips = [\"10.0.0.1/32\"]\n"
        ))
        .unwrap();
        assert!(!c.to_redacted_toml().contains(PRIV));
        assert!(!format!("{c:?}").contains(PRIV));
    }
}
