//! The tunnel's I/O shell end to end on loopback UDP: two in-process tunnels, an AudioSocket
//! call with a real recording through one, and HTTP-style requests the other way.

use crate::common;
use crate::tunnel_support;

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voicegate::agent::echo::EchoAgent;
use voicegate::audiosocket::SlinRate;
use voicegate::call::Outcome;
use voicegate::caller::{CallPlan, resample_recording, run_call_on, speech_similarity};

/// What the rest of voicegate needs of a tunnel stream, checked at compile time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audiosocket_call_through_the_tunnel_echoes_back() {
    let stop = CancellationToken::new();
    let (pbx, vg) = tunnel_support::loopback_pair(&stop).await;
    // voicegate accepts calls on its tunnel address, like its LAN listener.
    let listener = vg.listen(9092).await.unwrap();
    assert_eq!(listener.local_addr().to_string(), "10.0.0.2:9092");
    let (tx, mut summaries) = mpsc::unbounded_channel();
    let delay = Duration::from_millis(500);
    tunnel_support::serve_audiosocket(listener, Arc::new(EchoAgent::new(delay)), tx);

    // The PBX side calls through its own tunnel.
    let stream = pbx.connect("10.0.0.2:9092".parse().unwrap()).await.unwrap();
    assert_eq!(stream.peer_addr().to_string(), "10.0.0.2:9092");
    let plan = CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate: SlinRate::Hz8000,
        speech: common::fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: vec![('7', Duration::from_millis(1000))],
        duration: Duration::from_secs(3),
    };
    let report = run_call_on(stream, &plan).await.expect("call");
    assert!(report.frames_received >= 140, "{report:?}");
    let speech = resample_recording(&plan.speech, 8000).unwrap();
    let expected_at = (plan.speech_offset + delay).as_millis() as usize * 8;
    // 100 ms windows, each within 60 ms of the previous one's lag (a skipped tick on a
    // loaded machine shifts the echo; it does not break it).
    let similarity = speech_similarity(
        &report.received.samples,
        &speech.samples,
        8000,
        expected_at,
        480,
    );
    assert!(similarity.passes(0.9), "echo: {}", similarity.describe(0.9));

    let (summary, peer) = tokio::time::timeout(Duration::from_secs(10), summaries.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.call_id, plan.call_id);
    assert_eq!(summary.outcome, Outcome::CallerHungUp);
    assert_eq!(summary.dtmf, "7");
    assert_eq!(
        peer.ip().to_string(),
        "10.0.0.1",
        "the caller's tunnel address"
    );

    let stats = vg.stats().await.unwrap();
    let p = &stats.peers[0];
    assert!(
        p.handshakes >= 1 && p.last_handshake_age_s.unwrap() < 30.0,
        "{stats:?}"
    );
    assert!(
        p.rx_bytes > 150 * 336 && p.tx_bytes > 150 * 336,
        "{stats:?}"
    );
    assert_eq!(p.endpoint, Some(pbx.udp_addr().to_string()));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_connections_carry_requests_and_bulk_data() {
    let stop = CancellationToken::new();
    let (pbx, vg) = tunnel_support::loopback_pair(&stop).await;
    // An HTTP/1.1 server on the PBX's tunnel address, like ARI on 8088.
    let mut http = pbx.listen(8088).await.unwrap();
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            let (mut s, peer) = http.accept().await.unwrap();
            assert_eq!(peer.ip().to_string(), "10.0.0.2");
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    assert!(n > 0, "request cut short");
                    req.extend_from_slice(&buf[..n]);
                }
                let body = vec![b'x'; 300_000];
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).await.unwrap();
                s.write_all(&body).await.unwrap();
                s.shutdown().await.unwrap();
                String::from_utf8(req).unwrap()
            });
        }
    });
    for _ in 0..2 {
        let mut s = vg.connect("10.0.0.1:8088".parse().unwrap()).await.unwrap();
        s.write_all(b"GET /ari/asterisk/info HTTP/1.1\r\nhost: 10.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.unwrap();
        assert!(resp.starts_with(b"HTTP/1.1 200 OK\r\n"));
        let body_at = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(resp.len() - body_at, 300_000, "the whole body arrived");
        assert!(resp[body_at..].iter().all(|&b| b == b'x'));
    }
    server.await.unwrap();

    // Nothing listens on this port: the far stack resets, connect fails fast.
    let e = vg.connect("10.0.0.1:1".parse().unwrap()).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // No peer routes this address.
    let e = vg
        .connect("10.9.9.9:80".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::HostUnreachable, "{e}");
    stop.cancel();
}

/// The real AudioSocket server takes calls from its tunnel listener exactly as from TCP,
/// and its guard judges them by their tunnel source address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_listener_answers_tunnel_calls_under_the_guard() {
    use voicegate::audiosocket::server::Server;
    use voicegate::call::route::{Generation, Router, ServerParams};
    use voicegate::guard::{Guard, GuardConfig};
    let stop = CancellationToken::new();
    let (pbx, vg) = tunnel_support::loopback_pair(&stop).await;
    let serve = |allow: &str, listener| {
        let guard = GuardConfig {
            allow: vec![allow.parse().unwrap()],
            ..GuardConfig::default()
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let params = ServerParams::from_config(&Default::default());
        async move {
            let server = Server::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap()
                .with_tunnel(listener);
            let agent = Arc::new(EchoAgent::new(Duration::from_millis(200)));
            let mut router = Router::fixed(Generation::new(agent, params));
            router.guard = Some(Arc::new(Guard::new(guard, None).unwrap()));
            router.summaries = Some(tx.into());
            let stop = CancellationToken::new();
            tokio::spawn(server.run(Arc::new(router), stop.clone()));
            (stop, rx)
        }
    };
    let plan = CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate: SlinRate::Hz8000,
        speech: common::fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: Vec::new(),
        duration: Duration::from_secs(2),
    };

    // Allowed: the PBX's tunnel address.
    let (server_stop, mut summaries) = serve("10.0.0.1/32", vg.listen(9092).await.unwrap()).await;
    let stream = pbx.connect("10.0.0.2:9092".parse().unwrap()).await.unwrap();
    let report = run_call_on(stream, &plan).await.expect("call");
    assert!(report.audible_frames_received > 20, "{report:?}");
    let summary = tokio::time::timeout(Duration::from_secs(5), summaries.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.call_id, plan.call_id);
    server_stop.cancel();

    // Not allowed: only loopback is; the tunnel caller is closed before any audio.
    let (server_stop, _summaries) = serve("127.0.0.1/32", vg.listen(9093).await.unwrap()).await;
    let mut stream = pbx.connect("10.0.0.2:9093".parse().unwrap()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "a stranger gets nothing, not even silence");
    server_stop.cancel();
    stop.cancel();
}

/// A loopback forward carries a plain HTTP client (reqwest, as the ARI client uses) to a
/// server inside the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_forward_carries_http_to_the_far_side() {
    let stop = CancellationToken::new();
    let (pbx, vg) = tunnel_support::loopback_pair(&stop).await;
    let mut http = pbx.listen(8088).await.unwrap();
    tokio::spawn(async move {
        let (mut s, _) = http.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            req.extend_from_slice(&buf[..n]);
        }
        assert!(req.starts_with(b"GET /ari/asterisk/info "));
        let body = br#"{"system":{"version":"22.10.1"}}"#;
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let (local, _task) = voicegate::tunnel::forward::forward(
        vg.clone(),
        "127.0.0.1:0".parse().unwrap(),
        "10.0.0.1:8088".parse().unwrap(),
        stop.clone(),
    )
    .await
    .unwrap();
    voicegate::tls::install_crypto_provider();
    let client = voicegate::tls::http_client_builder().build().unwrap();
    let body: serde_json::Value = client
        .get(format!("http://{local}/ari/asterisk/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["system"]["version"], "22.10.1");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_host_names_are_resolved() {
    use boringtun::x25519::PublicKey;
    let stop = CancellationToken::new();
    let pbx_pub = PublicKey::from(&tunnel_support::secret(21));
    let vg_pub = PublicKey::from(&tunnel_support::secret(22));
    let (pbx, _) = voicegate::tunnel::Tunnel::spawn(
        tunnel_support::spec(21, "10.0.0.1", vg_pub, "10.0.0.2", None, None),
        stop.clone(),
    )
    .await
    .unwrap();
    // voicegate knows the PBX only by name, as `endpoint = "pbx.example.net:51820"`.
    let mut spec = tunnel_support::spec(22, "10.0.0.2", pbx_pub, "10.0.0.1", None, Some(25));
    spec.endpoint_names = vec![Some(format!("localhost:{}", pbx.udp_addr().port()))];
    let (vg, _) = voicegate::tunnel::Tunnel::spawn(spec, stop.clone())
        .await
        .unwrap();
    let mut up = false;
    for _ in 0..50 {
        let s = vg.stats().await.unwrap();
        if s.peers[0].handshakes >= 1 {
            assert_eq!(s.peers[0].endpoint, Some(pbx.udp_addr().to_string()));
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        up,
        "handshake after resolving the name: {:?}",
        vg.stats().await
    );
    stop.cancel();
}
