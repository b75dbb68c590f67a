//! A real Asterisk 22 behind ordinary WireGuard, set up exactly as `wireguard/README.md`
//! says, calling `voicegate run` through voicegate's in-process tunnel in all three modes.
//!
//! ```text
//!  netns vgaw-n-XXXX (the office box)           netns vgaw-f-XXXX (the Asterisk server)
//!  voicegate run (echo agent)                    wireguard-go vgawXXXX, wg0.conf of wireguard/
//!    [wireguard] of voicegate-wireguard.toml ◀─UDP─▶  10.0.0.1/24, UDP 51820
//!    10.0.0.2: AudioSocket 9092, /next on 9100       asterisk -C <tmp>/asterisk.conf
//!    ARI → 127.0.0.1:18088 ─ forward ─────────────▶  http.conf on 10.0.0.1:8088
//!  192.168.78.2 ───────────── veth ────────────────  192.168.78.1
//! ```
//!
//! Everything on the Asterisk side comes from the repository's files, so the documentation
//! cannot drift from what works: `wireguard/wg0.conf` (applied as `wg-quick` does: `wg
//! setconf` with the wg-quick-only keys taken out, then `Address` and `MTU` with `ip`),
//! `asterisk/extensions.conf` with the `[globals]` block of `wireguard/README.md`,
//! `asterisk/ari.conf`, and `asterisk/http.conf` bound where the forward of
//! `wireguard/voicegate-wireguard.toml` points. voicegate's config is that TOML file with only
//! the placeholders filled in (keys, the endpoint) and an echo agent.
//!
//! Each call is a Local channel originated through ARI: the caller half plays
//! `tests/fixtures/hello-world.wav` and records what it hears with `MixMonitor(…,r(…))`; the
//! other half enters `[voicegate-app]` (mode 1, `TryExec(AudioSocket(${UUID()},…))`),
//! `[voicegate-driver]` (mode 2, `Dial(AudioSocket/…/c(slin16),,g)`) or `[voicegate-stasis]`
//! (mode 3, ARI externalMedia at `[ari] external_host`, which defaults to the tunnel
//! address). The echo in the recording is compared with the speech.
//!
//! Needs root (namespaces, TUN), `apt-get install wireguard-go wireguard-tools iproute2`,
//! and Asterisk 22 installed under `/var/cache/asterisk-22.10.1` (or
//! `VOICEGATE_ASTERISK`; `../shared/asterisk/build.sh` builds it). Without them
//! it prints a `voicegate-test-skipped` line and passes, unless `VOICEGATE_REQUIRE_ALL=1`, when it fails.
//! Run: `cargo test --test suite wireguard_asterisk:: -- --nocapture`.
#![allow(clippy::disallowed_types)] // a test on real sockets and processes: real time (std::time::Instant)

use crate::common;
use crate::real_asterisk_support::ECHO_SEARCH_MS;
use crate::skip;

use skip::skip;

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use voicegate::audio::wav::Recording;
use voicegate::caller::{Similarity, speech_similarity};
use voicegate::tunnel::keys;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_voicegate");

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What the test set up outside the process; torn down on drop, also on panic.
struct Lab {
    far: String,
    near: String,
    iface: String,
    dir: PathBuf,
    asterisk: Option<(PathBuf, Child)>,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some((bin, mut child)) = self.asterisk.take() {
            let conf = self.dir.join("asterisk/asterisk.conf");
            let _ = Command::new(bin)
                .args(["-C", conf.to_str().unwrap_or(""), "-rx", "core stop now"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            for _ in 0..50 {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.far, &self.near] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.iface));
        if std::env::var_os("VOICEGATE_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Lab {
    fn print_logs(&self) {
        for log in ["voicegate.log", "asterisk/log/messages.log"] {
            let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("--- {log} (last lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs `f` on a short-lived thread that entered network namespace `ns`; sockets made
/// there stay in that namespace.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// One HTTP/1.1 request from inside namespace `ns` (a new connection, `connection: close`);
/// returns the status and the body.
fn http(ns: &str, to: SocketAddr, method: &str, target: &str) -> std::io::Result<(u16, String)> {
    let mut c = in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
    })?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        c,
        "{method} {target} HTTP/1.1\r\nhost: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    // Read the head, then exactly Content-Length bytes (Asterisk may keep the socket open).
    let mut reader = std::io::BufReader::new(c);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut reader, &mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    Ok((status, body))
}

/// Applies `wireguard/wg0.conf` as `wg-quick up` does, on a wireguard-go interface.
fn wg_quick_up(lab: &mut Lab, wg0: &str) -> Result<(), String> {
    let mut address = None;
    let mut mtu = None;
    let mut setconf = String::new();
    for line in wg0.lines() {
        let (key, value) = match line.split_once('=') {
            Some((k, v)) if !line.trim_start().starts_with('#') => (k.trim(), v.trim()),
            _ => {
                setconf.push_str(line);
                setconf.push('\n');
                continue;
            }
        };
        match key {
            // wg-quick's own keys: not for `wg setconf`.
            "Address" => address = Some(value.to_owned()),
            "MTU" => mtu = Some(value.to_owned()),
            "DNS" | "Table" | "PreUp" | "PostUp" | "PreDown" | "PostDown" | "SaveConfig" => {}
            _ => {
                setconf.push_str(line);
                setconf.push('\n');
            }
        }
    }
    let conf = lab.dir.join("wg0.setconf");
    std::fs::write(&conf, setconf).map_err(|e| e.to_string())?;
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.far, "wireguard-go", &lab.iface])
        .env("WG_PROCESS_FOREGROUND", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("wireguard-go: {e}"))?;
    // Kept by the lab at once, so that its drop stops it whatever happens next.
    lab.children.push(child);
    let sock = format!("/var/run/wireguard/{}.sock", lab.iface);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !Path::new(&sock).exists() {
        if Instant::now() > deadline {
            return Err("wireguard-go did not start (TUN forbidden?)".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = &lab.far;
    run(&[
        "ip",
        "netns",
        "exec",
        f,
        "wg",
        "setconf",
        &lab.iface,
        conf.to_str().unwrap(),
    ])?;
    let address = address.ok_or("wg0.conf has no Address")?;
    run(&["ip", "-n", f, "addr", "add", &address, "dev", &lab.iface])?;
    if let Some(mtu) = mtu {
        run(&["ip", "-n", f, "link", "set", &lab.iface, "mtu", &mtu])?;
    }
    run(&["ip", "-n", f, "link", "set", &lab.iface, "up"])
}

/// The namespaces and the veth between them.
fn namespaces(tag: &str, dir: PathBuf) -> Result<Lab, String> {
    let lab = Lab {
        far: format!("vgaw-f-{tag}"),
        near: format!("vgaw-n-{tag}"),
        iface: format!("vgaw{tag}"),
        dir,
        asterisk: None,
        children: Vec::new(),
    };
    run(&["ip", "netns", "add", &lab.far])?;
    run(&["ip", "netns", "add", &lab.near])?;
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun does not exist".into());
    }
    let (vf, vn) = (format!("vaf{tag}"), format!("van{tag}"));
    run(&[
        "ip", "link", "add", &vf, "netns", &lab.far, "type", "veth", "peer", "name", &vn, "netns",
        &lab.near,
    ])?;
    for (n, dev, addr) in [
        (&lab.far, &vf, "192.168.78.1/24"),
        (&lab.near, &vn, "192.168.78.2/24"),
    ] {
        run(&["ip", "-n", n, "addr", "add", addr, "dev", dev])?;
        run(&["ip", "-n", n, "link", "set", dev, "up"])?;
        run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
    }
    Ok(lab)
}

/// `key = value` of an INI-style file (first match, `#`/`;` comments skipped).
fn ini_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with(['#', ';']))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
}

/// The `[globals]` lines of the README block that starts with `; extensions_voicegate.conf
/// [globals] through the tunnel`.
fn readme_globals() -> Vec<(String, String)> {
    let readme = repo_file("wireguard/README.md");
    let start = readme
        .find("; extensions_voicegate.conf [globals] through the tunnel")
        .expect("wireguard/README.md has the [globals] block");
    let block = &readme[start
        ..readme[start..]
            .find("```")
            .map_or(readme.len(), |e| start + e)];
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with(';') && !l.is_empty())
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The Asterisk config directory: `asterisk.conf` with its `[directories]` in `dir`, and the
/// repository's dialplan, ARI and HTTP files adapted as the README says.
fn asterisk_config(
    dir: &Path,
    prefix: &Path,
    http_bind: SocketAddr,
    ari_password: &str,
) -> PathBuf {
    let etc = dir.join("asterisk");
    for sub in ["", "lib", "spool", "run", "log"] {
        std::fs::create_dir_all(etc.join(sub)).unwrap();
    }
    let d = etc.display();
    let p = prefix.display();
    std::fs::write(
        etc.join("asterisk.conf"),
        format!(
            "[directories]\nastetcdir => {d}\nastmoddir => {p}/lib/asterisk/modules\n\
             astvarlibdir => {d}/lib\nastdbdir => {d}/lib\nastkeydir => {d}/lib\n\
             astdatadir => {p}/var/lib/asterisk\nastagidir => {d}/lib\nastspooldir => {d}/spool\n\
             astrundir => {d}/run\nastlogdir => {d}/log\nastsbindir => {p}/sbin\n\
             [options]\nverbose = 3\n"
        ),
    )
    .unwrap();
    std::fs::write(etc.join("modules.conf"), "[modules]\nautoload = yes\n").unwrap();
    std::fs::write(
        etc.join("logger.conf"),
        "[general]\n[logfiles]\nmessages.log => notice,warning,error,verbose\n",
    )
    .unwrap();
    // http.conf of asterisk/, bound to the tunnel as the README says (the forward's `to`).
    let mut http = String::new();
    for line in repo_file("asterisk/http.conf").lines() {
        match line.split_once('=').map(|(k, _)| k.trim()) {
            Some("bindaddr") => http.push_str(&format!("bindaddr = {}\n", http_bind.ip())),
            Some("bindport") => http.push_str(&format!("bindport = {}\n", http_bind.port())),
            _ => {
                http.push_str(line);
                http.push('\n');
            }
        }
    }
    std::fs::write(etc.join("http.conf"), http).unwrap();
    let ari = repo_file("asterisk/ari.conf");
    let old = ini_value(&ari, "password").expect("asterisk/ari.conf has a password");
    std::fs::write(etc.join("ari.conf"), ari.replace(&old, ari_password)).unwrap();
    // The dialplan of asterisk/, [globals] pointed at the tunnel by the README's block.
    let globals = readme_globals();
    assert!(
        globals.iter().any(|(k, _)| k == "VOICEGATE_HOST"),
        "{globals:?}"
    );
    let mut dialplan = String::new();
    for line in repo_file("asterisk/extensions.conf").lines() {
        let replaced = line
            .split_once('=')
            .and_then(|(k, _)| globals.iter().find(|(g, _)| g == k.trim()));
        match replaced {
            Some((k, v)) => dialplan.push_str(&format!("{k}={v}\n")),
            None => {
                dialplan.push_str(line);
                dialplan.push('\n');
            }
        }
    }
    // The test's caller: records what it hears (r), waits, says its line, listens on.
    let rec = dir.join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let r = rec.display();
    dialplan.push_str(&format!(
        "\n[vg-test-caller]\n\
         exten => _X!,1,Answer()\n \
         same => n,MixMonitor({r}/mix-${{EXTEN}}.wav,r({r}/heard-${{EXTEN}}.wav))\n \
         same => n,Wait(1)\n \
         same => n,Playback({r}/speech)\n \
         same => n,Wait(4)\n \
         same => n,Hangup()\n"
    ));
    std::fs::write(etc.join("extensions.conf"), dialplan).unwrap();
    voicegate::wavfile::save(&common::fixture("hello-world.wav"), &rec.join("speech.wav")).unwrap();
    etc.join("asterisk.conf")
}

/// voicegate's config: `wireguard/voicegate-wireguard.toml` with its placeholders filled in,
/// after the few lines every install has (state directory, agent).
fn voicegate_config(
    dir: &Path,
    private_key: &str,
    asterisk_public: &str,
    endpoint: &str,
    ari_password: &str,
) -> PathBuf {
    let key_file = dir.join("wireguard.key");
    std::fs::write(&key_file, private_key).unwrap();
    // The ARI password from a file rather than the environment (both are documented forms).
    let password_file = dir.join("ari.password");
    std::fs::write(&password_file, ari_password).unwrap();
    let doc = repo_file("wireguard/voicegate-wireguard.toml");
    assert!(doc.contains("pbx.example.net:51820"));
    let doc = doc
        .replace("/etc/voicegate/wireguard.key", key_file.to_str().unwrap())
        .replace("<ASTERISK_PUBLIC_KEY>", asterisk_public)
        .replace("pbx.example.net:51820", endpoint)
        .replace(
            "{ env = \"VOICEGATE_ARI_PASSWORD\" }",
            &format!("{{ file = \"{}\" }}", password_file.display()),
        );
    let path = dir.join("voicegate.toml");
    std::fs::write(
        &path,
        format!(
            "[state]\ndir = \"{}\"\n[agent]\nkind = \"echo\"\ndelay_ms = 200\n[log]\nlevel = \"info\"\n{doc}",
            dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not in {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// [`speech_similarity`] of `heard` against `speech`, starting at the lag (0–4 s) where
/// their 10 ms energy envelopes match best and following it ±[`ECHO_SEARCH_MS`] ms from window
/// to window; returns the similarity and the starting lag in samples.
fn echo_similarity(heard: &Recording, speech: &Recording) -> (Similarity, usize) {
    let rate = heard.rate_hz;
    let frame = rate as usize / 100;
    let envelope = |x: &[i16]| -> Vec<f64> {
        x.chunks(frame)
            .map(|c| c.iter().map(|&s| f64::from(s).abs()).sum::<f64>() / c.len() as f64)
            .collect()
    };
    let (h, s) = (envelope(&heard.samples), envelope(&speech.samples));
    let lag_frames = (0..400usize)
        .map(|lag| {
            let score: f64 = s.iter().zip(h.iter().skip(lag)).map(|(a, b)| a * b).sum();
            (score, lag)
        })
        .fold((f64::MIN, 0), |best, c| if c.0 > best.0 { c } else { best })
        .1;
    let lag = lag_frames * frame;
    (
        speech_similarity(
            &heard.samples,
            &speech.samples,
            rate,
            lag,
            rate as usize * ECHO_SEARCH_MS / 1000,
        ),
        lag,
    )
}

/// Originates one call through ARI (from the Asterisk side of the lab) into `context` and
/// returns what the caller heard once it hung up.
fn call(lab: &Lab, ari: SocketAddr, key: &str, context: &str, n: u32, formats: &str) -> Recording {
    let target = format!(
        "/ari/channels?endpoint=Local/s@{context}&context=vg-test-caller&extension={n}&priority=1\
         &formats={formats}&timeout=30&api_key={key}"
    );
    let (status, body) = http(&lab.far, ari, "POST", &target).expect("originate");
    assert_eq!(status, 200, "originate {context}: {body}");
    let channel: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = channel["id"].as_str().unwrap().to_owned();
    wait_for(
        &format!("the {context} call to end"),
        Duration::from_secs(40),
        || {
            let (status, _) = http(
                &lab.far,
                ari,
                "GET",
                &format!("/ari/channels/{id}?api_key={key}"),
            )
            .ok()?;
            (status == 404).then_some(())
        },
    );
    let heard = lab.dir.join(format!("rec/heard-{n}.wav"));
    wait_for("the recording", Duration::from_secs(20), || {
        voicegate::wavfile::open(&heard)
            .ok()
            .filter(|r| !r.samples.is_empty())
    })
}

#[test]
fn calls_in_all_three_modes_through_the_tunnel_to_a_real_asterisk() {
    let prefix = PathBuf::from(
        std::env::var("VOICEGATE_ASTERISK")
            .unwrap_or_else(|_| "/var/cache/asterisk-22.10.1".into()),
    );
    let asterisk = prefix.join("sbin/asterisk");
    if !asterisk.exists() {
        return skip(
            "calls_in_all_three_modes_through_the_tunnel_to_a_real_asterisk",
            &format!(
                "no Asterisk at {} (/work/shared/asterisk/build.sh builds it)",
                asterisk.display()
            ),
        );
    }
    let missing: Vec<&str> = ["ip", "wireguard-go", "wg"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        return skip(
            "calls_in_all_three_modes_through_the_tunnel_to_a_real_asterisk",
            &format!(
                "{missing:?} not installed: apt-get install wireguard-go wireguard-tools iproute2"
            ),
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(
            "calls_in_all_three_modes_through_the_tunnel_to_a_real_asterisk",
            "needs root (network namespaces, TUN)",
        );
    }

    let tag = format!("{:04x}", std::process::id() & 0xffff);
    let dir = std::env::temp_dir().join(format!("vg-wg-asterisk-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut lab = match namespaces(&tag, dir.clone()) {
        Ok(lab) => lab,
        Err(e) => {
            return skip(
                "calls_in_all_three_modes_through_the_tunnel_to_a_real_asterisk",
                &format!("network namespaces not allowed: {e}"),
            );
        }
    };

    // Keys, made as the README says (either tool makes either key).
    let ast_private = keys::generate_private_key().unwrap();
    let ast_public = keys::public_key_of(ast_private.expose()).unwrap();
    let vg_private = keys::generate_private_key().unwrap();
    let vg_public = keys::public_key_of(vg_private.expose()).unwrap();

    // The Asterisk server's WireGuard: wireguard/wg0.conf.
    let wg0 = repo_file("wireguard/wg0.conf")
        .replace("<ASTERISK_PRIVATE_KEY>", ast_private.expose())
        .replace("<VOICEGATE_PUBLIC_KEY>", &vg_public);
    if let Err(e) = wg_quick_up(&mut lab, &wg0) {
        return skip(
            "calls_in_all_three_modes_through_the_tunnel_to_a_real_asterisk",
            &format!("wireguard-go in a namespace: {e}"),
        );
    }
    let listen_port = ini_value(&wg0, "ListenPort").expect("wg0.conf ListenPort");

    // voicegate's config, and where its ARI forward says Asterisk's HTTP server is.
    let password = format!("pw-{tag}-{}", std::process::id());
    let vg_toml = voicegate_config(
        &dir,
        vg_private.expose(),
        &ast_public,
        &format!("192.168.78.1:{listen_port}"),
        &password,
    );
    let config = voicegate::config::Config::load(Some(&vg_toml)).expect("the documented config");
    let wg = config.wireguard.as_ref().unwrap();
    let ari_cfg = config.ari.as_ref().unwrap();
    let forward = wg.forwards[wg
        .forward_for_url(&ari_cfg.url)
        .expect("ARI through a forward")]
    .clone();
    assert_eq!(
        ari_cfg.external_host.as_deref(),
        Some("10.0.0.2:9092"),
        "Stasis through the tunnel connects to the tunnel address"
    );

    // Asterisk, in the far namespace, with the repository's dialplan and ARI user.
    let conf = asterisk_config(&dir, &prefix, forward.to, &password);
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.far])
        .arg(&asterisk)
        .args(["-C", conf.to_str().unwrap(), "-f"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start asterisk");
    lab.asterisk = Some((asterisk.clone(), child));
    wait_for("asterisk to boot", Duration::from_secs(120), || {
        let out = Command::new(&asterisk)
            .args(["-C", conf.to_str().unwrap(), "-rx", "core waitfullybooted"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains("fully booted")
            .then_some(())
    });

    // voicegate, in the near namespace.
    let log = std::fs::File::create(dir.join("voicegate.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.near, BIN, "--config"])
        .arg(&vg_toml)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start voicegate");
    lab.children.push(child);
    let health: SocketAddr = format!("127.0.0.1:{}", config.health.listen.port())
        .parse()
        .unwrap();
    // Up when the tunnel has a handshake and the ARI events link (through the forward) is.
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("tunnel and ARI up", Duration::from_secs(30), || {
            let (_, body) = http(&lab.near, health, "GET", "/health").ok()?;
            let h: serde_json::Value = serde_json::from_str(&body).ok()?;
            let c = &h["components"];
            (c["tunnel"]["status"] == "ok" && c["ari"]["status"] == "ok").then_some(())
        })
    }));
    if ok.is_err() {
        lab.print_logs();
        panic!("voicegate did not come up");
    }

    let speech = common::fixture("hello-world.wav");
    let ari = forward.to;
    let key = format!("voicegate:{password}");
    let mut results = Vec::new();
    for (n, (context, formats)) in [
        ("voicegate-app", "slin"),
        ("voicegate-driver", "slin16"),
        ("voicegate-stasis", "slin16"),
    ]
    .into_iter()
    .enumerate()
    {
        let heard = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            call(&lab, ari, &key, context, n as u32 + 1, formats)
        }))
        .unwrap_or_else(|e| {
            lab.print_logs();
            std::panic::resume_unwind(e)
        });
        let (similarity, lag) = echo_similarity(&heard, &speech);
        let describe = similarity.describe(0.8);
        eprintln!(
            "{context}: echo {describe} at {} ms",
            lag * 1000 / heard.rate_hz as usize
        );
        results.push((context, similarity.passes(0.8), describe));
    }
    let failed: Vec<_> = results.iter().filter(|(_, ok, _)| !ok).collect();
    if !failed.is_empty() {
        lab.print_logs();
    }
    assert!(
        failed.is_empty(),
        "the echo through the tunnel must carry the speech: {results:?}"
    );

    // The tunnel reports the peer and the calls' traffic.
    let (_, body) = http(&lab.near, health, "GET", "/v1/wireguard").unwrap();
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        stats["peers"][0]["rx_bytes"].as_u64().unwrap() > 3 * 100 * 320,
        "{stats}"
    );
}
