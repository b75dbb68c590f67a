//! The console in a real browser (issue 18): Debian's headless Chromium driven over
//! WebDriver (chromedriver, `fantoccini`) against `voicegate run` with a fake OpenAI
//! Realtime agent (tests/common/fake_openai.rs) and the synthetic caller (`src/caller.rs`).
//!
//! One test walks a supervisor's shift: a wrong password is refused, the right one logs in
//! (the cookie is HttpOnly and SameSite=Strict, an action without the CSRF token is
//! refused), a live call appears with its transcript lines, take-over sends it to the
//! operators (outcome `operator`, reason `supervisor`; `/next` answers `operator`; the record
//! says so), the handover card shows what was said, maintenance is switched on and the next
//! call goes straight to the operators without reaching the agent, and the switch survives a
//! restart. Screenshots go to `target/console-screenshots/`.
//!
//! Needs `chromium` and `chromedriver` (Debian `chromium`, `chromium-driver`; `.ci/run`
//! installs them); Chromium runs with `--headless=new --no-sandbox` (the tests run as root).

use crate::common;
use crate::fake_openai;
use crate::skip;

use fake_openai::{FakeOpenAi, to_wire};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;
use voicegate::audio::convert::WireFormat;
use voicegate::audio::g711::Law;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, place_call};

const PASSWORD: &str = "a long supervisor passphrase";
const KEY: &str = "sk-console-test";
const ULAW: WireFormat = WireFormat::G711(Law::Ulaw);
const CALLER_SAID: &str = "I was charged twice on my last invoice.";
const AGENT_SAID: &str = "I am sorry to hear that, let me look at your invoice.";

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn chromedriver(log: &Path) -> Driver {
    // A port the kernel just gave out and took back: chromedriver takes no port 0.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .arg(format!("--log-path={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    driver
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            // No background networking, component updates, sync or QUIC: on a box without
            // the internet Chromium's own connections are refused, many at a time.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-quic",
                     "--window-size=1280,1000", format!("--user-data-dir={}", profile.display())],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

/// Waits until the text of `css` contains `needle` (the page re-renders: elements are
/// looked up again each time).
async fn wait_text(c: &Client, css: &str, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if t.contains(needle) {
                    return t;
                }
                last = t;
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    panic!("{css} never showed {needle:?}; last: {last:?}");
}

/// Clicks `css`, again if the page re-rendered it meanwhile.
async fn click(c: &Client, css: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.find(Locator::Css(css)).await {
            Ok(e) => match e.click().await {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("click {css}: {e}"),
                Err(_) => {}
            },
            Err(e) if Instant::now() > deadline => panic!("find {css}: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn shot(c: &Client, name: &str) -> PathBuf {
    let path = screenshots().join(name);
    std::fs::write(&path, c.screenshot().await.unwrap()).unwrap();
    path
}

async fn http(addr: SocketAddr, req: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    )
    .await
}

fn plan(call_id: Uuid, seconds: u64) -> CallPlan {
    CallPlan {
        call_id,
        rate: SlinRate::Hz8000,
        speech: common::fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: Vec::new(),
        duration: Duration::from_secs(seconds),
    }
}

fn start(dir: &Path, body: &str) -> common::service::Started {
    let _ = std::fs::remove_file(dir.join("notify.sock"));
    common::service::start(dir, 3, body)
}

/// SIGTERM, then waits for a clean exit: 20 s at most, then SIGKILL and a failure.
fn stop(child: &mut Child) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let Some(status) = common::service::exit_within(child, Duration::from_secs(20)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("voicegate still running 20 s after SIGTERM");
    };
    assert!(status.success(), "voicegate exit after SIGTERM: {status:?}");
}

/// The service's child process, killed if the test fails before [`stop`].
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_logs_in_watches_a_call_takes_it_over_and_switches_maintenance() {
    const TEST: &str =
        "console_browser::supervisor_logs_in_watches_a_call_takes_it_over_and_switches_maintenance";
    for tool in ["chromium", "chromedriver"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return skip::skip(
                TEST,
                &format!("{tool} not installed (apt-get install chromium chromium-driver)"),
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("vg-console-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let phc = voicegate::console::auth::PasswordHash::hash(PASSWORD).unwrap();
    let openai = FakeOpenAi::bind(KEY).await;
    let body = format!(
        "[agent]\nkind = \"openai_realtime\"\napi_key = \"{KEY}\"\nurl = \"{}\"\n\
         [records]\ncaller_numbers = \"masked\"\n\
         [console]\nenabled = true\npassword_hash = \"{phc}\"\n",
        openai.url
    );
    let svc = {
        let (dir, body) = (dir.clone(), body.clone());
        tokio::task::spawn_blocking(move || start(&dir, &body))
            .await
            .unwrap()
    };
    let mut child = Service(svc.child);
    let health = svc.health;
    let driver = chromedriver(&dir.join("chromedriver.log")).await;
    let c = browser(&driver, &dir.join("profile")).await;
    let console = format!("http://{health}/console");
    let mut shots = Vec::new();

    // A wrong password is refused; the right one logs in.
    c.goto(&console).await.unwrap();
    c.wait().for_element(Locator::Id("password")).await.unwrap();
    c.find(Locator::Id("password"))
        .await
        .unwrap()
        .send_keys("wrong password")
        .await
        .unwrap();
    click(&c, "#login-button").await;
    wait_text(
        &c,
        "#login-error",
        "Wrong password.",
        Duration::from_secs(10),
    )
    .await;
    shots.push(shot(&c, "1-login-refused.png").await);
    let shown = |id: &'static str| {
        let c = c.clone();
        async move {
            let e = c.find(Locator::Id(id)).await.unwrap();
            e.is_displayed().await.unwrap()
        }
    };
    assert!(shown("login").await, "the login form");
    assert!(
        !shown("nav").await && !shown("live").await,
        "still logged out"
    );
    c.find(Locator::Id("password"))
        .await
        .unwrap()
        .send_keys(PASSWORD)
        .await
        .unwrap();
    click(&c, "#login-button").await;
    wait_text(&c, "#nav", "Live calls", Duration::from_secs(10)).await;
    wait_text(&c, "#no-calls", "No live calls.", Duration::from_secs(10)).await;
    assert!(
        !shown("login").await,
        "the login form is gone once logged in"
    );

    // The session cookie: HttpOnly (the page's script cannot read it), SameSite=Strict.
    let script_sees = c.execute("return document.cookie", vec![]).await.unwrap();
    assert!(
        !script_sees.as_str().unwrap_or("").contains("vg_console"),
        "{script_sees}"
    );
    let cookie = c
        .get_all_cookies()
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.name() == "vg_console")
        .expect("the session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    assert!(
        format!("{:?}", cookie.same_site()).contains("Strict"),
        "{cookie:?}"
    );
    let session = format!("vg_console={}", cookie.value());
    // An action with the cookie but without (or with a wrong) CSRF token is refused.
    for token in ["", "x-csrf-token: forged\r\n"] {
        let (code, _) = http(
            health,
            &format!("POST /console/api/maintenance HTTP/1.1\r\nhost: x\r\ncookie: {session}\r\n{token}content-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{{\"on\":true}}"),
        )
        .await;
        assert_eq!(code, 403, "no CSRF token: refused");
    }
    assert_eq!(
        get(health, "/console/api/state").await.0,
        401,
        "no cookie: 401"
    );

    // A live call: it appears with the transcript the agent reports.
    let id = Uuid::new_v4();
    let to = svc.audiosocket;
    let call = tokio::spawn(async move { place_call(to, &plan(id, 40)).await });
    let reply = to_wire(&common::fixture("auth-thankyou.wav").samples, ULAW);
    let agent = tokio::spawn(async move {
        let (_, conn) = openai.accept(None, Instant::now()).await;
        let mut conn = conn.expect("upgrade accepted");
        conn.session_created().await;
        let update = conn.expect("session.update").await;
        conn.session_updated(&update, (ULAW, ULAW)).await;
        conn.wait_for_audio_ms(1_700).await;
        conn.caller_turn("item_u1", CALLER_SAID).await;
        conn.reply("resp_1", "item_a1", &reply, 800, AGENT_SAID)
            .await;
        conn.drain(Duration::from_secs(30)).await;
        openai
    });
    let row = format!("tr[data-id='{id}']");
    wait_text(&c, &row, &id.to_string()[..8], Duration::from_secs(15)).await;
    click(&c, &row).await;
    wait_text(
        &c,
        "#transcript",
        &format!("Caller: {CALLER_SAID}"),
        Duration::from_secs(15),
    )
    .await;
    wait_text(
        &c,
        "#transcript",
        &format!("Agent: {AGENT_SAID}"),
        Duration::from_secs(15),
    )
    .await;
    // The live waterfall: a speech-to-speech turn has no STT/LLM/TTS stages, only the end
    // of the caller's speech → the reply's first frame, in ms.
    let turns = wait_text(&c, "#turns tbody", "–", Duration::from_secs(15)).await;
    let cells: Vec<&str> = turns.split_whitespace().collect();
    assert!(
        cells.len() == 5 && cells[1..4] == ["–", "–", "–"] && cells[4].parse::<u64>().is_ok(),
        "turn row: {turns:?}"
    );
    shots.push(shot(&c, "2-live-call-transcript.png").await);

    // Take over: the caller is handed back to the dialplan, which asks /next: operator.
    click(&c, "#takeover").await;
    let report = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ends soon after the take-over")
        .unwrap()
        .unwrap();
    assert!(report.hangup_received, "0x00 to the dialplan: {report:?}");
    assert!(report.duration_ms < 30_000.0, "{report:?}");
    wait_text(
        &c,
        "#detail-outcome",
        "operator (supervisor)",
        Duration::from_secs(10),
    )
    .await;
    shots.push(shot(&c, "3-taken-over.png").await);
    let (_, next) = get(health, &format!("/v1/calls/{id}/next")).await;
    assert_eq!(next, "operator");
    let openai = agent.await.unwrap();

    // The handover card holds what the caller said, and who took the call over.
    click(&c, "button[data-tab='handovers']").await;
    let card = wait_text(&c, "#cards", CALLER_SAID, Duration::from_secs(10)).await;
    assert!(
        card.contains("supervisor") && card.contains("taken over by session"),
        "{card}"
    );
    shots.push(shot(&c, "4-handover-card.png").await);

    // The history from the records spool: the call, its outcome and transcript.
    click(&c, "button[data-tab='history']").await;
    let mut rows = String::new();
    for _ in 0..50 {
        click(&c, "#search button[type='submit']").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        rows = c
            .find(Locator::Css("#records"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if rows.contains("transferred (supervisor)") {
            break;
        }
    }
    assert!(
        rows.contains("transferred (supervisor)") && rows.contains(CALLER_SAID),
        "{rows}"
    );
    shots.push(shot(&c, "5-history.png").await);
    // The same as a CSV download (the session cookie, as the link sends it).
    let (code, csv) = http(
        health,
        &format!("GET /console/api/history?format=csv&outcome=transferred HTTP/1.1\r\nhost: x\r\ncookie: {session}\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(code, 200, "{csv}");
    let line = csv
        .lines()
        .find(|l| l.starts_with(&id.to_string()))
        .unwrap_or_else(|| panic!("{csv}"));
    assert!(
        line.contains("\"transferred\",\"supervisor\"") && line.contains(CALLER_SAID),
        "{line}"
    );

    // Maintenance on: the next call goes straight to the operators; no agent session opens.
    click(&c, "button[data-tab='live']").await;
    click(&c, "#maintenance").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, h) = get(health, "/health").await;
        let h: Value = serde_json::from_str(&h).unwrap();
        if h["maintenance"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "maintenance never on: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id2 = Uuid::new_v4();
    let report = place_call(svc.audiosocket, &plan(id2, 10)).await.unwrap();
    assert!(
        report.hangup_received && report.duration_ms < 5_000.0,
        "{report:?}"
    );
    let (_, next) = get(health, &format!("/v1/calls/{id2}/next")).await;
    assert_eq!(next, "operator");
    click(&c, "button[data-tab='handovers']").await;
    wait_text(&c, "#cards", "maintenance", Duration::from_secs(10)).await;
    shots.push(shot(&c, "6-maintenance-handover.png").await);
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            openai.accept(None, Instant::now())
        )
        .await
        .is_err(),
        "no agent session for a call in maintenance"
    );

    // The audit log names every action: who, which call.
    let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("voicegate::audit"))
        .collect();
    assert!(
        audit.iter().any(|l| l.contains("take_over")
            && l.contains(&id.to_string())
            && l.contains("from 127.0.0.1")),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("maintenance") && l.contains("on=true")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|l| l.contains("login failed")),
        "{audit:#?}"
    );
    assert!(!log.contains(PASSWORD));

    // The switch was saved: after a restart new calls still go to the operators.
    c.close().await.unwrap();
    drop(driver);
    stop(&mut child.0);
    let svc = {
        let (dir, body) = (dir.clone(), body.clone());
        tokio::task::spawn_blocking(move || start(&dir, &body))
            .await
            .unwrap()
    };
    let mut child = Service(svc.child);
    let (_, h) = get(svc.health, "/health").await;
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["maintenance"], true, "{h}");
    stop(&mut child.0);
    for s in &shots {
        eprintln!("screenshot: {}", s.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
