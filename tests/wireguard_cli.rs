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

#[test]
fn show_renders_the_services_json() {
    use std::io::{BufRead, BufReader, Read};
    // A one-shot HTTP/1.1 server standing in for the health listener's /v1/wireguard.
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
