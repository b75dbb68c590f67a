//! `voicegate wg genkey | pubkey | show` as an installer runs them.

use std::io::Write as _;
use std::process::{Command, Stdio};

fn voicegate(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run voicegate");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn pubkey_of_a_known_key_matches_wg() {
    // Reference pair made with wireguard-tools 1.0.20210914: `wg genkey | tee k | wg pubkey`.
    let (ok, out, err) = voicegate(
        &["wg", "pubkey"],
        "IF7rg2tPXiGB37woxL4pw78YWqXeNxcrf1JhbeEoCkk=\n",
    );
    assert!(ok, "{err}");
    assert_eq!(out, "fSAaMcDhvJvU5Ia8Ji45HUTVZUTNVV6TTzkt3rYzN3w=\n");
    let (ok, _, err) = voicegate(&["wg", "pubkey"], "garbage\n");
    assert!(!ok);
    assert!(err.contains("base64"), "{err}");
}

#[test]
fn genkey_output_is_accepted_by_wg_and_gives_the_same_pubkey() {
    let (ok, key, err) = voicegate(&["wg", "genkey"], "");
    assert!(ok, "{err}");
    assert_eq!(key.trim().len(), 44);
    let (ok, ours, _) = voicegate(&["wg", "pubkey"], &key);
    assert!(ok);
    match Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(mut wg) => {
            wg.stdin.take().unwrap().write_all(key.as_bytes()).unwrap();
            let theirs = wg.wait_with_output().unwrap();
            assert!(theirs.status.success());
            assert_eq!(String::from_utf8(theirs.stdout).unwrap(), ours);
        }
        Err(_) => {
            eprintln!("wg (wireguard-tools) not installed: compared with the fixed pair only")
        }
    }
}

/// A one-shot HTTP/1.1 server standing in for the health listener's `/v1/wireguard`
/// (hyper's shape: status line, headers, body); returns its address and the request line.
fn one_shot_wireguard_json() -> (std::net::SocketAddr, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let body = r#"{"interface":"voicegate","public_key":"fSAaMcDhvJvU5Ia8Ji45HUTVZUTNVV6TTzkt3rYzN3w=","address":"10.0.0.2/24","listen_port":51820,"dropped_datagrams":0,"peers":[{"public_key":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=","endpoint":"192.0.2.1:51820","allowed_ips":["10.0.0.1/32"],"last_handshake_age_s":12.5,"handshakes":1,"rx_bytes":4096,"tx_bytes":100,"persistent_keepalive_s":25}]}"#;
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let _ = reader.read_to_end(&mut Vec::new());
        request_line
    });
    (addr, server)
}

#[test]
fn show_renders_the_services_json() {
    let (addr, server) = one_shot_wireguard_json();
    let (ok, out, err) = voicegate(&["wg", "show", "--health", &addr.to_string()], "");
    assert!(ok, "{err}");
    assert_eq!(server.join().unwrap(), "GET /v1/wireguard HTTP/1.1\r\n");
    assert!(
        out.contains("peer: HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="),
        "{out}"
    );
    assert!(out.contains("latest handshake: 12 seconds ago"), "{out}");
    assert!(
        out.contains("transfer: 4.00 KiB received, 100 B sent"),
        "{out}"
    );

    // Nothing listening: a clear error, not a panic.
    let (ok, _, err) = voicegate(&["wg", "show", "--health", &addr.to_string()], "");
    assert!(!ok);
    assert!(err.contains("is the service running"), "{err}");
}

fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vg-wg-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("voicegate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn show_asks_the_health_listener_named_in_the_config() {
    // `--config` …
    let (addr, server) = one_shot_wireguard_json();
    let cfg = temp_config("show", &format!("[health]\nlisten = \"{addr}\"\n"));
    let (ok, out, err) = voicegate(&["--config", cfg.to_str().unwrap(), "wg", "show"], "");
    assert!(ok, "{err}");
    assert_eq!(server.join().unwrap(), "GET /v1/wireguard HTTP/1.1\r\n");
    assert!(out.contains("latest handshake: 12 seconds ago"), "{out}");
    // … and VOICEGATE_CONFIG; a wildcard listen address is asked on loopback.
    let (addr, server) = one_shot_wireguard_json();
    let cfg = temp_config(
        "show-env",
        &format!("[health]\nlisten = \"0.0.0.0:{}\"\n", addr.port()),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .args(["wg", "show", "--json"])
        .env("VOICEGATE_CONFIG", &cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.join().unwrap(), "GET /v1/wireguard HTTP/1.1\r\n");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"handshakes\":1"));
    // A config that does not load: exit 64 naming the key, nothing asked.
    let cfg = temp_config("show-bad", "[health]\nlisten = \"nowhere\"\n");
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .args(["--config", cfg.to_str().unwrap(), "wg", "show"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}

/// The voicegate side of a remote Asterisk as `wireguard/voicegate-wireguard.toml` describes
/// it (ARI through a loopback forward), with `ari_extra` added to `[ari]`.
fn tunnel_ari_config(name: &str, ari_extra: &str) -> std::path::PathBuf {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/wireguard/voicegate-wireguard.toml"
    ))
    .unwrap()
    .replace(
        "{ file = \"/etc/voicegate/wireguard.key\" }",
        "\"IF7rg2tPXiGB37woxL4pw78YWqXeNxcrf1JhbeEoCkk=\"",
    )
    .replace(
        "<ASTERISK_PUBLIC_KEY>",
        "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
    )
    .replace(
        "password = { env = \"VOICEGATE_ARI_PASSWORD\" }",
        "password = \"pw\"",
    )
    .replace("[ari]\n", &format!("[ari]\n{ari_extra}\n"));
    temp_config(name, &doc)
}

#[test]
fn check_config_points_stasis_through_the_tunnel_at_the_tunnel_address() {
    let cfg = tunnel_ari_config("stasis", "");
    let (ok, out, err) = voicegate(&["--config", cfg.to_str().unwrap(), "check-config"], "");
    assert!(ok, "{err}");
    assert!(out.contains("url = \"http://127.0.0.1:18088\""), "{out}");
    assert!(out.contains("external_host = \"10.0.0.2:9092\""), "{out}");

    // Asterisk told to connect to its own loopback: refused, exit 64, naming the key.
    let cfg = tunnel_ari_config("loopback", "external_host = \"127.0.0.1:9092\"");
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .args(["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`ari.external_host`"), "{err}");
}
