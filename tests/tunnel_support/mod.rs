//! Shared by the tunnel tests and the tunnel bench: tunnels on loopback, and an AudioSocket
//! server that accepts calls arriving through a tunnel exactly as `handle_connection` in
//! `src/audiosocket/server.rs` does for TCP (read the call id, then run the call session).
#![allow(dead_code)]

use boringtun::x25519::{PublicKey, StaticSecret};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voicegate::agent::{CallInfo, SharedAgent};
use voicegate::audiosocket::Connection;
use voicegate::audiosocket::codec::Message;
use voicegate::call::{AudioSocketPort, CallSummary, SessionParams, run_session};
use voicegate::tunnel::{CoreSpec, PeerSpec, Tunnel, TunnelListener, TunnelSpec};

/// A fixed private key (the test's own; never used outside tests).
pub(crate) fn secret(seed: u8) -> StaticSecret {
    StaticSecret::from([seed; 32])
}

/// Spec for one side: `me` at `addr`/24, one peer at `peer_ip`/32.
pub(crate) fn spec(
    me: u8,
    addr: &str,
    peer_public: PublicKey,
    peer_ip: &str,
    endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
) -> TunnelSpec {
    TunnelSpec {
        core: CoreSpec {
            private_key: secret(me),
            address: format!("{addr}/24").parse().unwrap(),
            mtu: 1420,
            listen_port: 0,
            peers: vec![PeerSpec {
                public_key: peer_public,
                preshared_key: None,
                endpoint,
                allowed_ips: vec![format!("{peer_ip}/32").parse().unwrap()],
                persistent_keepalive: keepalive,
            }],
        },
        endpoint_names: vec![None],
        bind: "127.0.0.1:0".parse().unwrap(),
    }
}

/// Two in-process tunnels on loopback UDP: the PBX side (10.0.0.1, listens) and the
/// voicegate side (10.0.0.2, knows the PBX endpoint, persistent keepalive 25 s).
pub(crate) async fn loopback_pair(stop: &CancellationToken) -> (Tunnel, Tunnel) {
    let pbx_pub = PublicKey::from(&secret(11));
    let vg_pub = PublicKey::from(&secret(12));
    let (pbx, _) = Tunnel::spawn(
        spec(11, "10.0.0.1", vg_pub, "10.0.0.2", None, None),
        stop.clone(),
    )
    .await
    .expect("pbx tunnel");
    let (vg, _) = Tunnel::spawn(
        spec(
            12,
            "10.0.0.2",
            pbx_pub,
            "10.0.0.1",
            Some(pbx.udp_addr()),
            Some(25),
        ),
        stop.clone(),
    )
    .await
    .expect("voicegate tunnel");
    (pbx, vg)
}

/// Accepts AudioSocket calls from `listener` and runs each with `agent`; sends each
/// finished call's summary and the caller's tunnel address to `summaries`.
pub(crate) fn serve_audiosocket(
    mut listener: TunnelListener,
    agent: SharedAgent,
    summaries: mpsc::UnboundedSender<(CallSummary, SocketAddr)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let agent = agent.clone();
            let summaries = summaries.clone();
            tokio::spawn(async move {
                let mut conn = Connection::new(stream);
                let read = tokio::time::timeout(Duration::from_secs(2), conn.read_message()).await;
                let Ok(Ok(Some(Message::CallId(call_id)))) = read else {
                    eprintln!("connection from {peer} sent no call id");
                    return;
                };
                let info = CallInfo {
                    call_id,
                    rate_hz: 0,
                    caller_number: None,
                    caller_name: None,
                    tools: Vec::new(),
                    variables: Default::default(),
                };
                let summary = run_session(
                    AudioSocketPort::new(conn),
                    info,
                    agent,
                    SessionParams::default(),
                    CancellationToken::new(),
                )
                .await;
                let _ = summaries.send((summary, peer));
            });
        }
    })
}
