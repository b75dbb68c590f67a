//! Behaviours the README promises, checked through the running service (`voicegate run` as
//! a child process, its real listeners on 127.0.0.1:0) or the real command: the guard's
//! `max_call_s`, call records (caller-number masking, no secret), the daily AI budget and
//! `max_calls_per_source`, `/health` going bad, a caller hanging up during Stasis set-up,
//! `selftest` and `tools --format` (issue 20 item 4).
#![allow(clippy::disallowed_types)] // a test on real sockets and processes: real time (std::time::Instant)

use crate::common;
use crate::fake_ari;
use crate::fake_openai;

use common::fixture;
use fake_ari::{FakeAri, MediaJoin, PASS, wait_until};
use fake_openai::FakeOpenAi;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use uuid::Uuid;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, place_call};

const BIN: &str = env!("CARGO_BIN_EXE_voicegate");

/// `voicegate run` as a child process with its own state directory, started and waited for
/// (`READY=1` on a notify socket, which also names the bound ports).
struct Svc {
    child: Child,
    dir: PathBuf,
    config: PathBuf,
    audiosocket: SocketAddr,
    health: SocketAddr,
}

impl Svc {
    /// Starts the binary with `body` appended to a loopback config (listeners on port 0,
    /// state in the test's own directory). Blocks while waiting: call from `spawn_blocking`
    /// when a fake runs on the test's runtime.
    fn start_blocking(name: &str, body: &str, state_files: &[(&str, String)]) -> Svc {
        let dir = std::env::temp_dir().join(format!("vg-promise-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        for (file, text) in state_files {
            std::fs::write(dir.join("state").join(file), text).unwrap();
        }
        let started = common::service::start(&dir, 3, body);
        Svc {
            child: started.child,
            audiosocket: started.audiosocket,
            health: started.health,
            dir,
            config: started.config,
        }
    }

    async fn start(name: &str, body: &str, state_files: &[(&str, String)]) -> Svc {
        let (name, body) = (name.to_owned(), body.to_owned());
        let files: Vec<(String, String)> = state_files
            .iter()
            .map(|(f, t)| ((*f).to_owned(), t.clone()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let files: Vec<(&str, String)> =
                files.iter().map(|(f, t)| (f.as_str(), t.clone())).collect();
            Svc::start_blocking(&name, &body, &files)
        })
        .await
        .unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// GET `path` on the health listener: status and body.
    async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.health, path).await
    }

    /// `/health` as JSON, with its HTTP status.
    async fn health(&self) -> (u16, serde_json::Value) {
        let (status, body) = self.get("/health").await;
        (
            status,
            serde_json::from_str(&body).expect("/health is JSON"),
        )
    }

    /// The value of the sample `name{labels}` (exactly as rendered) in `/metrics`, 0 if absent.
    async fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .filter(|rest| rest.starts_with(' '))
                    .map(|rest| rest.trim().parse::<f64>().unwrap())
            })
            .unwrap_or(0.0)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// SIGTERM, then waits (up to 20 s) for a clean exit.
    async fn stop(&mut self) {
        self.signal("TERM");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert!(s.success(), "exit {s:?}; stderr: {}", self.stderr());
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "no exit on SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `voicegate records export` for this service's config: one JSON object per record,
    /// and the raw bytes of every spool file.
    fn records(&self) -> (Vec<serde_json::Value>, Vec<u8>) {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(["records", "export"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let records = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        let mut raw = Vec::new();
        for e in std::fs::read_dir(self.dir.join("state/records")).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                raw.extend(std::fs::read(p).unwrap());
            }
        }
        (records, raw)
    }
}

impl Drop for Svc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTP/1.1 GET (the listener closes after one response): status and body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("an HTTP answer in time")
        .unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// A synthetic 8 kHz call of `seconds` with the hello-world recording.
fn plan(call_id: Uuid, seconds: f64) -> CallPlan {
    CallPlan {
        call_id,
        rate: SlinRate::Hz8000,
        speech: fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: Vec::new(),
        duration: Duration::from_secs_f64(seconds),
    }
}

/// Connects from `source` (a loopback address), sends a call id and one audio frame, and
/// returns the bytes voicegate sent before closing (a refused connection: 0), reading for
/// at most `limit`.
async fn probe_call(to: SocketAddr, source: &str, limit: Duration) -> (usize, bool) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(to).await.unwrap();
    let mut hello = vec![0x01, 0x00, 0x10];
    hello.extend_from_slice(Uuid::new_v4().as_bytes());
    hello.extend_from_slice(&[0x10, 0x01, 0x40]);
    hello.extend_from_slice(&[0u8; 320]);
    let _ = s.write_all(&hello).await;
    let mut got = 0;
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await
    .is_ok();
    (got, closed)
}

/// `guard.max_call_s`: a call longer than the limit gets `0x00` at the limit, and the
/// running service's record says `max_duration`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_call_s_hands_the_call_back_and_records_max_duration() {
    let mut svc = Svc::start(
        "maxdur",
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n[guard]\nmax_call_s = 10\n",
        &[],
    )
    .await;
    let id = Uuid::new_v4();
    let report = place_call(svc.audiosocket, &plan(id, 14.0)).await.unwrap();
    assert!(report.hangup_received, "{report:?}");
    assert!(
        (10_000.0..11_500.0).contains(&report.duration_ms),
        "the call ended {} ms after its id, limit 10 s",
        report.duration_ms
    );
    svc.stop().await;
    let (records, _) = svc.records();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["call_id"], id.to_string());
    assert_eq!(r["outcome"], "max_duration", "{r}");
    let d = r["duration_ms"].as_u64().unwrap();
    assert!((9_900..11_000).contains(&d), "recorded duration {d} ms");
}

/// `[records] caller_numbers = "masked"` / `"omit"` in the running service: the caller's
/// number (from ARI lookup) is kept as its last four digits or not at all, and no record
/// holds a key (the agent's API key, the ARI password), even for a call whose agent failed
/// on that key (OpenAI's 401).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_mask_or_omit_the_caller_number_and_hold_no_secret() {
    const NUMBER: &str = "+4915112345678";
    const KEY: &str = "sk-proj-ThisKeyMustNeverBeRecorded0123";
    for policy in ["masked", "omit"] {
        let fake = FakeAri::start(Vec::new(), SlinRate::Hz8000).await;
        // The agent's key is refused by the fake OpenAI (401), so the call goes to the
        // operators with a detail: the path where an error could carry a key.
        let openai = FakeOpenAi::bind("sk-another-key").await;
        let body = format!(
            "[agent]\nkind = \"openai_realtime\"\napi_key = \"{KEY}\"\nurl = \"{}\"\n\
             [ari]\nurl = \"{}\"\npassword = \"{PASS}\"\nmode = \"lookup\"\n\
             [records]\ncaller_numbers = \"{policy}\"\n",
            openai.url,
            fake.url()
        );
        let mut svc = Svc::start(&format!("records-{policy}"), &body, &[]).await;
        let id = Uuid::new_v4();
        fake.new_audiosocket_caller(
            NUMBER,
            "Erika Mustermann",
            "AudioSocket",
            &format!("{id},{}", svc.audiosocket),
        );
        let to = svc.audiosocket;
        let call = tokio::spawn(async move { place_call(to, &plan(id, 3.0)).await });
        let (hs, conn) = openai.accept(None, tokio::time::Instant::now()).await;
        assert!(conn.is_none(), "the fake refuses the key");
        assert_eq!(hs.authorization.as_deref(), Some(&*format!("Bearer {KEY}")));
        let report = call.await.unwrap().unwrap();
        assert!(report.hangup_received, "handed to the dialplan: {report:?}");
        svc.stop().await;
        let (records, raw) = svc.records();
        assert_eq!(records.len(), 1, "{records:?}");
        let r = &records[0];
        assert_eq!(r["call_id"], id.to_string());
        match policy {
            "masked" => assert_eq!(r["caller_number"], "**********5678", "{r}"),
            _ => assert!(r["caller_number"].is_null(), "{r}"),
        }
        let text = serde_json::to_string(&records).unwrap();
        let raw = String::from_utf8_lossy(&raw);
        for secret in [KEY, PASS, NUMBER, "12345678"] {
            assert!(!text.contains(secret), "{secret} in {text}");
            assert!(!raw.contains(secret), "{secret} in the spool");
        }
    }
}

/// Today's UTC day number, as `budget.json` stores it.
fn utc_day() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400
}

/// `guard.daily_budget_minutes`: the listener charges each call's AI time to the day's
/// budget (persisted in `budget.json`), and once it is spent new connections are closed
/// before their call id is read, so the dialplan sends them to the operators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_budget_is_charged_by_calls_and_then_closes_new_ones() {
    // 1 minute a day, 56 s already used today: one 5 s call spends the rest.
    let budget = format!("{{\"day\": {}, \"used_ms\": 56000}}", utc_day());
    let mut svc = Svc::start(
        "budget",
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n[guard]\ndaily_budget_minutes = 1\n",
        &[("budget.json", budget)],
    )
    .await;
    let report = place_call(svc.audiosocket, &plan(Uuid::new_v4(), 5.0))
        .await
        .unwrap();
    assert!(
        report.audible_frames_received > 20,
        "the first call is served: {report:?}"
    );
    // The charge lands when the call's summary is accounted.
    let path = svc.dir.join("state/budget.json");
    wait_until(Duration::from_secs(10), || {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["used_ms"].as_u64().unwrap() >= 60_000
    })
    .await;
    let (got, closed) = probe_call(svc.audiosocket, "127.0.0.1", Duration::from_secs(5)).await;
    assert!(
        closed && got == 0,
        "budget spent: closed without a byte (got {got}, closed {closed})"
    );
    assert_eq!(
        svc.metric("voicegate_guard_rejections_total{reason=\"budget_spent\"}")
            .await,
        1.0
    );
    svc.stop().await;
}

/// `guard.max_calls_per_source`: with 2, a third concurrent call from the same address is
/// closed after its call id, while one from another address is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_calls_per_source_closes_the_extra_call_from_that_source_only() {
    let mut svc = Svc::start(
        "persource",
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n[guard]\nmax_calls_per_source = 2\n",
        &[],
    )
    .await;
    let to = svc.audiosocket;
    let calls: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { place_call(to, &plan(Uuid::new_v4(), 4.0)).await }))
        .collect();
    let (_, health) = svc.health().await;
    let mut live = health["live_calls"].as_u64().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while live < 2 {
        assert!(tokio::time::Instant::now() < deadline, "two live calls");
        tokio::time::sleep(Duration::from_millis(20)).await;
        live = svc.health().await.1["live_calls"].as_u64().unwrap();
    }
    let (got, closed) = probe_call(to, "127.0.0.1", Duration::from_secs(3)).await;
    assert!(
        closed && got == 0,
        "third call from 127.0.0.1 is closed (got {got} bytes, closed {closed})"
    );
    // Another source is not limited by 127.0.0.1's calls; it gets audio (silence or echo)
    // until the probe gives up.
    let (got, closed) = probe_call(to, "127.0.0.2", Duration::from_secs(2)).await;
    assert!(
        !closed && got > 0,
        "a call from 127.0.0.2 is served (got {got} bytes, closed {closed})"
    );
    for c in calls {
        let r = c.await.unwrap().unwrap();
        assert!(r.audible_frames_received > 20, "{r:?}");
    }
    assert_eq!(
        svc.metric("voicegate_guard_rejections_total{reason=\"source_limit\"}")
            .await,
        1.0
    );
    svc.stop().await;
}

/// `/health` answers 503 with `ready: false` while the service shuts down (a live call still
/// draining in its grace period), after 200 while it served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_and_not_ready_while_shutting_down() {
    let mut svc = Svc::start("health503", "[agent]\nkind = \"echo\"\n", &[]).await;
    let (status, h) = svc.health().await;
    assert_eq!(
        (status, &h["ready"]),
        (200, &serde_json::json!(true)),
        "{h}"
    );
    let to = svc.audiosocket;
    let call = tokio::spawn(async move { place_call(to, &plan(Uuid::new_v4(), 6.0)).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while svc.health().await.1["live_calls"] != 1 {
        assert!(tokio::time::Instant::now() < deadline, "a live call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    svc.signal("TERM");
    // Within the 3 s grace the call is still live and the listener answers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let (status, h) = loop {
        let (status, h) = svc.health().await;
        if status != 200 {
            break (status, h);
        }
        assert!(tokio::time::Instant::now() < deadline, "still 200: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["ready"], false, "{h}");
    assert_eq!(h["live_calls"], 1, "the call drains meanwhile: {h}");
    let _ = call.await.unwrap();
    svc.stop().await;
}

/// The `ari` component of `/health` goes `down` when the events WebSocket drops and stays
/// away (Asterisk refusing it), and back to `ok` once it is up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_shows_ari_down_while_the_events_link_is_down() {
    let fake = FakeAri::start(Vec::new(), SlinRate::Hz8000).await;
    let body = format!(
        "[agent]\nkind = \"echo\"\n[ari]\nurl = \"{}\"\npassword = \"{PASS}\"\n\
         reconnect_initial_ms = 1000\nreconnect_max_ms = 1000\n",
        fake.url()
    );
    let mut svc = Svc::start("aridown", &body, &[]).await;
    fake.wait_ws().await;
    let ari = |h: &serde_json::Value| h["components"]["ari"]["status"].clone();
    let wait_ari = |want: &'static str| {
        let svc = &svc;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let (status, h) = svc.health().await;
                if ari(&h) == want {
                    return (status, h);
                }
                assert!(tokio::time::Instant::now() < deadline, "ari {want}: {h}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_ari("ok").await;
    fake.refuse_ws(true);
    fake.drop_ws();
    let (_, h) = wait_ari("down").await;
    assert!(
        h["components"]["ari"]["detail"]
            .as_str()
            .unwrap()
            .contains("down"),
        "{h}"
    );
    fake.refuse_ws(false);
    wait_ari("ok").await;
    svc.stop().await;
}

/// A caller who hangs up while voicegate sets up the Stasis call (after the bridge and the
/// externalMedia channel exist, before that channel joins the application): everything
/// voicegate created is deleted, no session runs, and the running service records the call
/// as not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_hanging_up_during_stasis_setup_leaves_nothing_and_is_recorded() {
    let fake = FakeAri::start(Vec::new(), SlinRate::Hz16000).await;
    fake.media_join(MediaJoin::Never);
    let body = format!(
        "[agent]\nkind = \"echo\"\n[ari]\nurl = \"{}\"\npassword = \"{PASS}\"\n",
        fake.url()
    );
    let mut svc = Svc::start("stasishangup", &body, &[]).await;
    fake.wait_ws().await;
    let caller = fake.new_caller("+15551230000", "Early Leaver");
    wait_until(Duration::from_secs(5), || {
        fake.count(&fake.counts.media_created) == 1 && fake.count(&fake.counts.bridges_created) == 1
    })
    .await;
    fake.caller_hangs_up(&caller);
    wait_until(Duration::from_secs(5), || {
        fake.count(&fake.counts.media_destroyed) == 1
            && fake.count(&fake.counts.bridges_destroyed) == 1
            && fake.live_bridges() == 0
    })
    .await;
    let (_, h) = svc.health().await;
    assert_eq!(h["live_calls"], 0, "{h}");
    svc.stop().await;
    let (records, _) = svc.records();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["caller_number"], "+15551230000", "{r}");
    // The caller hung up ("completed" is that outcome's record label); no audio ever came,
    // so no agent session was opened (it starts on the first audio frame).
    assert_eq!(r["outcome"], "completed", "{r}");
    assert_eq!(
        (&r["frames_in"], &r["rate_hz"]),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "{r}"
    );
    assert!(r["duration_ms"].as_u64().unwrap() < 3_000, "{r}");
}

/// `voicegate selftest` as an installer runs it: the exit code is the verdict (0 passed,
/// 1 failed); with the echo agent every check but pacing holds (pacing p99 within 20 ± 2 ms
/// is the installer's check of an idle box: under the test suite's load it may miss), and
/// with an agent nobody answers for, the agent-audio check fails and so does the command.
#[test]
fn selftest_command_exit_code_is_its_verdict() {
    let dir = std::env::temp_dir().join(format!("vg-promise-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let echo = dir.join("echo.toml");
    std::fs::write(&echo, "[agent]\nkind = \"echo\"\ndelay_ms = 200\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", echo.to_str().unwrap(), "selftest", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let passed = v["selftest"]["passed"].as_bool().unwrap();
    assert_eq!(out.status.code(), Some(if passed { 0 } else { 1 }), "{v}");
    let checks = v["selftest"]["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 4, "{v}");
    for c in checks {
        let what = c["what"].as_str().unwrap();
        assert!(c["ok"] == true || what.starts_with("pacing"), "{v}");
    }
    assert!(v["selftest"]["correlation"].as_f64().unwrap() >= 0.8, "{v}");
    assert_eq!(v["selftest"]["agent"], "echo");

    // An OpenAI agent at a loopback port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cloud = dir.join("cloud.toml");
    std::fs::write(
        &cloud,
        format!(
            "[agent]\nkind = \"openai_realtime\"\napi_key = \"sk-x\"\nurl = \"ws://{closed}/v1/realtime\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "--config",
            cloud.to_str().unwrap(),
            "selftest",
            "--seconds",
            "2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("agent audio came back"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `voicegate tools --format openai-realtime|chat-completions` print the declarations those
/// APIs take (OpenAI Realtime `session.tools[]`: `{type, name, description, parameters}`;
/// Chat Completions `tools[]`: `{type, function: {name, description, parameters}}`); an
/// unknown format is a usage error (exit 2) naming the accepted ones.
#[test]
fn tools_command_prints_each_format_and_refuses_an_unknown_one() {
    let dir = std::env::temp_dir().join(format!("vg-promise-tools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("tools.toml");
    std::fs::write(
        &cfg,
        "[[tools]]\nname = \"search_tires\"\ndescription = \"Find tyres.\"\nurl = \"http://127.0.0.1:9/t\"\n[[tools]]\nkind = \"hangup\"\n",
    )
    .unwrap();
    let run = |format: &str| {
        Command::new(BIN)
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "tools",
                "--format",
                format,
            ])
            .output()
            .unwrap()
    };
    for format in ["openai-realtime", "chat-completions"] {
        let out = run(format);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let tools = v.as_array().expect("a JSON array");
        assert_eq!(tools.len(), 2, "{format}: {v}");
        for t in tools {
            assert_eq!(t["type"], "function", "{format}: {t}");
            let decl = if format == "openai-realtime" {
                assert!(t.get("function").is_none(), "{t}");
                t
            } else {
                &t["function"]
            };
            assert!(decl["name"].is_string(), "{format}: {t}");
            assert!(decl["description"].is_string(), "{format}: {t}");
            assert_eq!(decl["parameters"]["type"], "object", "{format}: {t}");
        }
        assert_eq!(
            tools[0].get("name").or(tools[0]["function"].get("name")),
            Some(&serde_json::json!("search_tires"))
        );
    }
    let out = run("anthropic");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("openai-realtime") && err.contains("elevenlabs"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `tunnel` component goes `down` once the peer's last handshake is 180 s old
/// (WireGuard's Reject-After-Time), on the tunnel core's virtual clock: two cores handshake,
/// then the link is cut and time runs on in the core's 250 ms timer steps.
#[test]
fn tunnel_health_goes_down_180_s_after_the_last_handshake() {
    use voicegate::health::ComponentStatus;
    use voicegate::tunnel::core::{CoreSpec, PeerSpec, TunnelCore};
    let key = |b: u8| boringtun::x25519::StaticSecret::from([b; 32]);
    let spec = |me: u8, peer: u8, addr: &str, peer_ip: &str, endpoint: Option<&str>| CoreSpec {
        private_key: key(me),
        address: format!("{addr}/24").parse().unwrap(),
        mtu: 1420,
        listen_port: 51820,
        peers: vec![PeerSpec {
            public_key: boringtun::x25519::PublicKey::from(&key(peer)),
            preshared_key: None,
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: vec![format!("{peer_ip}/32").parse().unwrap()],
            persistent_keepalive: None,
        }],
    };
    let (a_udp, b_udp): (SocketAddr, SocketAddr) = (
        "192.0.2.2:51820".parse().unwrap(),
        "192.0.2.1:51820".parse().unwrap(),
    );
    let t0 = std::time::Instant::now();
    let mut a = TunnelCore::new(
        spec(1, 2, "10.0.0.2", "10.0.0.1", Some("192.0.2.1:51820")),
        t0,
    )
    .unwrap();
    let mut b = TunnelCore::new(spec(2, 1, "10.0.0.1", "10.0.0.2", None), t0).unwrap();
    let silent_after = Duration::from_secs(3);
    let status = |a: &TunnelCore, at: Duration| a.stats(t0 + at).health(silent_after).status;
    assert_eq!(
        status(&a, Duration::ZERO),
        ComponentStatus::Down,
        "no handshake yet"
    );
    a.initiate_handshake(t0, 0);
    // Deliver everything both ways until quiet: the handshake completes at t0.
    for _ in 0..10 {
        while let Some(t) = a.poll_transmit() {
            b.handle_datagram(t0, a_udp, &t.payload);
        }
        while let Some(t) = b.poll_transmit() {
            a.handle_datagram(t0, b_udp, &t.payload);
        }
    }
    assert_eq!(a.stats(t0).peers[0].handshakes, 1);
    assert_eq!(status(&a, Duration::ZERO), ComponentStatus::Ok);
    // The link is cut: A's retries (rekey) go nowhere. Time runs on in timer ticks.
    let mut at = Duration::ZERO;
    while at < Duration::from_secs(182) {
        at += Duration::from_millis(250);
        a.handle_timeout(t0 + at);
        while a.poll_transmit().is_some() {}
        if at == Duration::from_secs(179) {
            assert_eq!(
                status(&a, at),
                ComponentStatus::Ok,
                "179 s after the handshake"
            );
        }
    }
    let c = a.stats(t0 + at).health(silent_after);
    assert_eq!(c.status, ComponentStatus::Down, "{}", c.detail);
    assert!(c.detail.contains("0 of 1 peers up"), "{}", c.detail);
}

// ---- Fakes that push back (issue 20 item 6), through the running service ----

/// The fake Asterisk honours `app=` like a real one: voicegate configured with
/// `ari.app = "vg-east"` subscribes to that application only, leaves a caller of another
/// application alone, and creates its externalMedia channel in its own application (else the
/// channel's `StasisStart` would never reach it and the caller would go to the operators).
/// The call's events come in the real order (`ChannelHangupRequest`, `ChannelLeftBridge`,
/// `StasisEnd`, `ChannelDestroyed`), voicegate never puts a channel in a second bridge, and
/// cleans up everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stasis_call_in_a_named_app_with_real_event_order() {
    let speech = fixture("hello-world.wav");
    let fake = FakeAri::start(speech.samples.clone(), SlinRate::Hz8000).await;
    let body = format!(
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n[ari]\nurl = \"{}\"\npassword = \"{PASS}\"\n\
         app = \"vg-east\"\nformat = \"slin\"\n",
        fake.url()
    );
    let mut svc = Svc::start("pushback-app", &body, &[]).await;
    fake.wait_ws().await;
    assert_eq!(fake.count(&fake.counts.ws_without_app), 0);
    let stranger = fake.new_caller_in("other-app", "+15550000001", "Other App");
    let caller = fake.new_caller_in("vg-east", "+15550000002", "Our Caller");
    // Our caller is bridged with a media channel that joined vg-east, and hears the echo.
    wait_until(Duration::from_secs(10), || {
        fake.media_reports()
            .first()
            .is_some_and(|r| r.frames_received > 100)
    })
    .await;
    assert_eq!(fake.count(&fake.counts.bridges_created), 1);
    assert_eq!(fake.count(&fake.counts.media_created), 1);
    fake.caller_hangs_up(&caller);
    wait_until(Duration::from_secs(5), || {
        fake.count(&fake.counts.media_destroyed) == 1 && fake.live_bridges() == 0
    })
    .await;
    // The other application's caller was never touched.
    assert!(fake.channel_exists(&stranger));
    assert!(fake.continued().is_empty());
    assert_eq!(fake.count(&fake.counts.bridge_moves), 0);
    let report = fake.media_reports()[0].clone();
    let similarity =
        voicegate::caller::speech_similarity(&report.received, &speech.samples, 8000, 800, 480);
    assert!(similarity.passes(0.9), "echo: {}", similarity.describe(0.9));
    svc.stop().await;
    let (records, _) = svc.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "completed", "{}", records[0]);
    assert_eq!(records[0]["caller_number"], "+15550000002");
}

/// Input frames late like a busy Asterisk's (p99 27 ms, max 47 ms, bunched after a late
/// one), from the synthetic caller and from the fake Asterisk's externalMedia side: voicegate
/// takes every frame (none dropped as "ahead of real time") and the echo comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jittery_input_loses_no_frame() {
    use voicegate::caller::{CallOptions, InputJitter, place_call_with, speech_similarity};
    let speech = fixture("hello-world.wav");
    let fake = FakeAri::start(speech.samples.clone(), SlinRate::Hz8000).await;
    fake.media_jitter(Some(InputJitter::busy_asterisk(7)));
    let body = format!(
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n[ari]\nurl = \"{}\"\npassword = \"{PASS}\"\n\
         format = \"slin\"\n",
        fake.url()
    );
    let mut svc = Svc::start("pushback-jitter", &body, &[]).await;
    fake.wait_ws().await;

    // The synthetic caller (an AudioSocket() call, admitted without Stasis).
    let id = Uuid::new_v4();
    let options = CallOptions {
        input_jitter: Some(InputJitter::busy_asterisk(3)),
        ..CallOptions::default()
    };
    let report = place_call_with(svc.audiosocket, &plan(id, 4.0), options)
        .await
        .unwrap();
    let similarity = speech_similarity(&report.received.samples, &speech.samples, 8000, 1600, 480);
    assert!(similarity.passes(0.9), "echo: {}", similarity.describe(0.9));

    // A Stasis call whose media side is late the same way.
    let caller = fake.new_caller("+15550000003", "Busy Box");
    wait_until(Duration::from_secs(10), || {
        fake.media_reports()
            .first()
            .is_some_and(|r| r.frames_sent > 150)
    })
    .await;
    fake.caller_hangs_up(&caller);
    wait_until(Duration::from_secs(5), || {
        fake.media_reports().first().is_some_and(|r| r.closed)
    })
    .await;
    let media = fake.media_reports()[0].clone();
    svc.stop().await;
    let (records, _) = svc.records();
    assert_eq!(records.len(), 2, "{records:?}");
    let synthetic = records
        .iter()
        .find(|r| r["call_id"] == id.to_string())
        .unwrap();
    assert_eq!(
        synthetic["frames_in"].as_u64().unwrap(),
        report.frames_sent,
        "every late frame taken: {synthetic}"
    );
    let stasis = records
        .iter()
        .find(|r| r["call_id"] != id.to_string())
        .unwrap();
    let taken = stasis["frames_in"].as_u64().unwrap();
    assert!(
        taken + 1 >= media.frames_sent && taken <= media.frames_sent,
        "{taken} frames taken of {} sent (the last may cross the hangup)",
        media.frames_sent
    );
}

/// A caller that ends with an AudioSocket hangup (`0x00`) or error (`0xFF`) frame and then
/// waits: voicegate closes the connection at once and records `completed` or
/// `protocol_error` with the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_and_error_frames_from_the_caller_end_the_call_at_once() {
    use voicegate::caller::{CallEnd, CallOptions, place_call_with};
    let mut svc = Svc::start("pushback-frames", "[agent]\nkind = \"echo\"\n", &[]).await;
    let (hangup_id, error_id) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, end) in [(hangup_id, CallEnd::Hangup), (error_id, CallEnd::Error(7))] {
        let options = CallOptions {
            end,
            ..CallOptions::default()
        };
        let report = place_call_with(svc.audiosocket, &plan(id, 2.0), options)
            .await
            .unwrap();
        let after = report
            .closed_after_end_frame_ms
            .unwrap_or_else(|| panic!("{end:?}: voicegate kept the connection open 3 s"));
        assert!(after < 1000.0, "{end:?}: closed {after} ms after the frame");
    }
    svc.stop().await;
    let (records, _) = svc.records();
    let by_id = |id: Uuid| {
        records
            .iter()
            .find(|r| r["call_id"] == id.to_string())
            .unwrap_or_else(|| panic!("record of {id}: {records:?}"))
    };
    assert_eq!(by_id(hangup_id)["outcome"], "completed");
    let e = by_id(error_id);
    assert_eq!(e["outcome"], "protocol_error", "{e}");
    assert!(e["detail"].as_str().unwrap().contains("code 7"), "{e}");
}
