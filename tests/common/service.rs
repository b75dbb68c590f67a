//! `voicegate run` as a child process for the integration tests: a loopback config in the
//! test's own directory, started and waited for (`READY=1` on a notify socket, whose
//! `STATUS=` names the bound ports).

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A started service: the child, its directory and config, and the bound listeners.
pub(crate) struct Started {
    pub child: Child,
    pub config: PathBuf,
    pub audiosocket: SocketAddr,
    pub health: SocketAddr,
}

/// Starts `voicegate run` in `dir` (state under `dir/state`, stderr in `dir/stderr.log`)
/// with `body` appended to a config whose listeners are on `127.0.0.1:0`, and waits for
/// `READY=1` (20 s at most; the panic quotes stderr).
pub(crate) fn start(dir: &Path, shutdown_grace_s: u32, body: &str) -> Started {
    let config = dir.join("voicegate.toml");
    let text = format!(
        "[audiosocket]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_s = {shutdown_grace_s}\n\
         [health]\nlisten = \"127.0.0.1:0\"\n\
         [state]\ndir = \"{}\"\n{body}",
        dir.join("state").display()
    );
    std::fs::write(&config, text).unwrap();
    let sock = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&sock).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("NOTIFY_SOCKET", &sock)
        .env_remove("WATCHDOG_USEC")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let status = loop {
        let n = notify.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "READY=1 from voicegate: {e}; stderr: {}",
                std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
            )
        });
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        if m.contains("READY=1") {
            break m;
        }
    };
    let addr = |key: &str| -> SocketAddr {
        status
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .unwrap()
            .split("; ")
            .find_map(|p| p.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {status}"))
            .parse()
            .unwrap()
    };
    Started {
        child,
        config,
        audiosocket: addr("audiosocket "),
        health: addr("health "),
    }
}

/// Waits for `child` to exit, polling every 20 ms: its status, or `None` if it still runs
/// after `within` (the caller says what that means; the child is left running).
pub(crate) fn exit_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    #[allow(clippy::disallowed_types)] // a real process: real time
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        #[allow(clippy::disallowed_types)]
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
