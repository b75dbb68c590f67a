//! `voicegate run` with a `[wireguard]` section: a remote "Asterisk" (an in-test tunnel peer)
//! calls it through the tunnel, and `/v1/wireguard` and `voicegate wg show` report the peer.
#![allow(clippy::disallowed_types)] // a test on real sockets and processes: real time (std::time::Instant)

use crate::common;
use crate::tunnel_support;

use base64::Engine as _;
use boringtun::x25519::PublicKey;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, run_call_on, speech_similarity};
use voicegate::tunnel::Tunnel;

const BIN: &str = env!("CARGO_BIN_EXE_voicegate");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_answers_calls_through_its_wireguard_tunnel() {
    let b64 = base64::engine::general_purpose::STANDARD;
    let vg_secret = tunnel_support::secret(42);
    let vg_public = PublicKey::from(&vg_secret);
    let pbx_public = PublicKey::from(&tunnel_support::secret(41));
    let (as_port, health_port, wg_port) = (free_port(), free_port(), free_udp_port());

    let dir = std::env::temp_dir().join(format!("vg-wg-service-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("wg.key");
    std::fs::write(&key_file, b64.encode(vg_secret.to_bytes())).unwrap();
    let cfg = dir.join("voicegate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[audiosocket]
listen = "127.0.0.1:{as_port}"
shutdown_grace_s = 1
[health]
listen = "127.0.0.1:{health_port}"
[state]
dir = "{state}"
[guard]
allow = ["127.0.0.1/32", "10.0.0.1/32"]
[agent]
kind = "echo"
delay_ms = 200
[wireguard]
private_key = {{ file = "{key}" }}
address = "10.0.0.2/24"
listen_port = {wg_port}
[[wireguard.peer]]
public_key = "{pbx}"
allowed_ips = ["10.0.0.1/32"]
"#,
            state = dir.join("state").display(),
            key = key_file.display(),
            pbx = b64.encode(pbx_public.as_bytes()),
        ),
    )
    .unwrap();
    let mut service = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "run"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", health_port)).is_err() {
        assert!(Instant::now() < deadline, "service did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The PBX side: an in-process peer that knows voicegate's UDP endpoint.
    let stop = CancellationToken::new();
    let (pbx, _) = Tunnel::spawn(
        tunnel_support::spec(
            41,
            "10.0.0.1",
            vg_public,
            "10.0.0.2",
            Some(format!("127.0.0.1:{wg_port}").parse().unwrap()),
            Some(25),
        ),
        stop.clone(),
    )
    .await
    .unwrap();
    let stream = pbx
        .connect(format!("10.0.0.2:{as_port}").parse().unwrap())
        .await
        .unwrap();
    let plan = CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate: SlinRate::Hz8000,
        speech: common::fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: Vec::new(),
        duration: Duration::from_secs(3),
    };
    let report = run_call_on(stream, &plan)
        .await
        .expect("call through the tunnel");
    let similarity = speech_similarity(
        &report.received.samples,
        &plan.speech.samples,
        8000,
        2400,
        480,
    );
    assert!(
        similarity.passes(0.9),
        "echo through the tunnel: {}",
        similarity.describe(0.9)
    );

    // The dialplan's question after the call, asked through the tunnel at the tunnel
    // address and the health port, as `[voicegate-next]` does with VOICEGATE_HTTP.
    let mut http = pbx
        .connect(format!("10.0.0.2:{health_port}").parse().unwrap())
        .await
        .expect("health port through the tunnel");
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        http.write_all(
            format!(
                "GET /v1/calls/{}/next HTTP/1.1\r\nhost: 10.0.0.2\r\nconnection: close\r\n\r\n",
                plan.call_id
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), http.read_to_string(&mut answer))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // The echo agent never ends a call itself: the caller goes to the operators.
        assert!(answer.ends_with("\r\n\r\noperator"), "{answer}");
    }
    // `/health` names the peer with its handshake and last packet.
    let health: serde_json::Value = {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", health_port)).unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1;
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let tunnel = &health["components"]["tunnel"];
    let detail = tunnel["detail"].as_str().unwrap();
    assert!(
        detail.contains("10.0.0.1/32: handshake") && detail.contains("last packet"),
        "{tunnel}"
    );

    // The service reports the peer, as JSON and as `wg show`.
    let out = Command::new(BIN)
        .args([
            "wg",
            "show",
            "--health",
            &format!("127.0.0.1:{health_port}"),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peer = &stats["peers"][0];
    assert_eq!(peer["public_key"], b64.encode(pbx_public.as_bytes()));
    assert!(peer["handshakes"].as_u64().unwrap() >= 1, "{stats}");
    assert!(peer["rx_bytes"].as_u64().unwrap() > 100 * 320, "{stats}");
    let text = Command::new(BIN)
        .args([
            "wg",
            "show",
            "--health",
            &format!("127.0.0.1:{health_port}"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("latest handshake"), "{text}");

    stop.cancel();
    let _ = Command::new("kill")
        .args(["-TERM", &service.id().to_string()])
        .status();
    common::service::exit_within(&mut service, Duration::from_secs(10))
        .expect("service did not stop");
}
