//! Agent profiles in the real binary: the dialplan's announce on the health listener
//! (`POST /v1/calls/{uuid}` over HTTP, as `CURL()` sends it) chooses the profile of the
//! AudioSocket call that follows, the call record keeps it, and a SIGHUP reload picks up a
//! changed `[[profiles]]` for new calls (`unknown_profile = "refuse"` makes the old name
//! refused after it); a profile's `[profiles.limits] max_calls` sends the call over it to
//! the operators, counting live calls across a reload.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, place_call};

fn config(profile: &str) -> String {
    format!(
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n\
         [[profiles]]\nname = \"{profile}\"\n[profiles.agent]\nkind = \"echo\"\ndelay_ms = 200\n\
         [profile_routing]\nunknown_profile = \"refuse\"\n"
    )
}

/// `POST /v1/calls/{id}` with a form body, the way Asterisk's `CURL(url,data)` sends it; the
/// status code.
async fn announce(health: SocketAddr, id: Uuid, body: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(health).await.unwrap();
    let req = format!(
        "POST /v1/calls/{id} HTTP/1.1\r\nHost: {health}\r\nUser-Agent: asterisk-libcurl-agent/1.0\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split(' ').nth(1).unwrap().parse().unwrap()
}

fn plan(call_id: Uuid) -> CallPlan {
    CallPlan {
        call_id,
        rate: SlinRate::Hz8000,
        speech: common::fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: Vec::new(),
        duration: Duration::from_millis(1200),
    }
}

/// The records in the spool, as `voicegate records export` prints them (JSON lines).
fn records(dir: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .args(["records", "export", "--dir"])
        .arg(dir.join("state/records"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn wait_records(dir: &Path, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        let r = records(dir);
        if r.len() >= n {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{n} records: {:?}", records(dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_profiles_are_recorded_and_a_reload_changes_them() {
    let dir: PathBuf = std::env::temp_dir().join(format!("vg-profiles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.clone();
    let mut svc =
        tokio::task::spawn_blocking(move || common::service::start(&d, 1, &config("sales")))
            .await
            .unwrap();

    // Call 1: announced as `sales`.
    let first = Uuid::new_v4();
    let form = "profile=sales&caller_number=%2B4930123&called_number=200&var_customer=C-17";
    assert_eq!(announce(svc.health, first, form).await, 204);
    let report = place_call(svc.audiosocket, &plan(first)).await.unwrap();
    assert!(report.audible_frames_received > 10, "{report:?}");
    let r = wait_records(&dir, 1).await;
    assert_eq!(r[0]["call_id"], first.to_string());
    assert_eq!(r[0]["profile"], "sales");
    assert_eq!(r[0]["outcome"], "completed");

    // Reload with the profile renamed `support`.
    std::fs::write(
        &svc.config,
        std::fs::read_to_string(&svc.config)
            .unwrap()
            .replace("\"sales\"", "\"support\""),
    )
    .unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", &svc.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let log = dir.join("stderr.log");
    for _ in 0..100 {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("config reloaded")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("config reloaded")
    );

    // Call 2: `support` now exists; call 3: `sales` is gone and refused.
    let second = Uuid::new_v4();
    assert_eq!(announce(svc.health, second, "profile=support").await, 204);
    place_call(svc.audiosocket, &plan(second)).await.unwrap();
    let third = Uuid::new_v4();
    assert_eq!(announce(svc.health, third, "profile=sales").await, 204);
    let refused = place_call(svc.audiosocket, &plan(third)).await.unwrap();
    assert!(
        refused.hangup_received && refused.frames_received == 0,
        "{refused:?}"
    );
    let r = wait_records(&dir, 3).await;
    let of = |id: Uuid| record_of(&r, id);
    assert_eq!(of(second)["profile"], "support");
    assert_eq!(of(third)["outcome"], "rejected");
    assert!(of(third)["profile"].is_null());
    assert!(of(third)["detail"].as_str().unwrap().contains("sales"));

    let _ = svc.child.kill();
    let _ = svc.child.wait();
    std::fs::remove_dir_all(&dir).ok();
}

/// Sends SIGHUP and waits for the `n`th "config reloaded" line in the service's log.
async fn reload(svc: &common::service::Started, dir: &Path, n: usize) {
    let ok = Command::new("kill")
        .args(["-HUP", &svc.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let log = dir.join("stderr.log");
    let count = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("config reloaded")
            .count()
    };
    for _ in 0..200 {
        if count() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "reload {n} not logged: {}",
        std::fs::read_to_string(&log).unwrap()
    );
}

fn edit(config: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(from), "{from} in {text}");
    std::fs::write(config, text.replace(from, to)).unwrap();
}

/// `[profiles.limits] max_calls` in the real binary: the live call of the config before a
/// reload still counts after it, and a reload that raises the limit admits the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profiles_call_limit_counts_across_a_reload_and_a_reload_changes_it() {
    let dir: PathBuf = std::env::temp_dir().join(format!("vg-prof-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let body = "[agent]\nkind = \"echo\"\ndelay_ms = 100\n\
         [[profiles]]\nname = \"sales\"\n[profiles.agent]\nkind = \"echo\"\ndelay_ms = 200\n\
         [profiles.limits]\nmax_calls = 1\n";
    let d = dir.clone();
    let mut svc = tokio::task::spawn_blocking(move || common::service::start(&d, 1, body))
        .await
        .unwrap();

    // Call A: sales, long enough to stay live through two reloads and two more calls.
    let a = Uuid::new_v4();
    assert_eq!(announce(svc.health, a, "profile=sales").await, 204);
    let mut long = plan(a);
    long.duration = Duration::from_secs(12);
    let audiosocket = svc.audiosocket;
    let call_a = tokio::spawn(async move { place_call(audiosocket, &long).await.unwrap() });
    let log = dir.join("stderr.log");
    for _ in 0..200 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains("call started") && l.contains(&a.to_string()))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A reload that leaves the limit: A still counts, so B goes to the operators.
    edit(&svc.config, "delay_ms = 200", "delay_ms = 150");
    reload(&svc, &dir, 1).await;
    let b = Uuid::new_v4();
    assert_eq!(announce(svc.health, b, "profile=sales").await, 204);
    let refused = place_call(svc.audiosocket, &plan(b)).await.unwrap();
    assert!(
        refused.hangup_received && refused.audible_frames_received == 0,
        "{refused:?}"
    );

    // A reload that raises it: C gets its agent while A is still live.
    edit(&svc.config, "max_calls = 1", "max_calls = 2");
    reload(&svc, &dir, 2).await;
    let c = Uuid::new_v4();
    assert_eq!(announce(svc.health, c, "profile=sales").await, 204);
    let served = place_call(svc.audiosocket, &plan(c)).await.unwrap();
    assert!(served.audible_frames_received > 10, "{served:?}");
    assert!(
        !call_a.is_finished(),
        "call A ended before C: the test proves nothing"
    );
    call_a.await.unwrap();

    let r = wait_records(&dir, 3).await;
    let of = |id: Uuid| record_of(&r, id);
    assert_eq!(of(a)["outcome"], "completed");
    assert_eq!(of(b)["outcome"], "fallback");
    assert_eq!(of(b)["profile"], "sales");
    assert_eq!(
        of(b)["detail"],
        "profile \"sales\": the profile's call limit is reached"
    );
    assert_eq!(of(c)["outcome"], "completed");
    assert_eq!(of(c)["profile"], "sales");

    let _ = svc.child.kill();
    let _ = svc.child.wait();
    std::fs::remove_dir_all(&dir).ok();
}

/// The exported record of call `id`.
fn record_of(records: &[serde_json::Value], id: Uuid) -> serde_json::Value {
    records
        .iter()
        .find(|x| x["call_id"] == id.to_string())
        .unwrap_or_else(|| panic!("no record of {id}"))
        .clone()
}
