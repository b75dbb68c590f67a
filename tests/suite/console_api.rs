//! The console's actions through its HTTP API against `voicegate run` (the browser test,
//! tests/suite/console_browser.rs, covers the page in mode 1): in Stasis mode a take-over moves the
//! caller to the operators with ARI `continue` (tests/fake_ari: Asterisk's REST and events
//! shapes) and the record says `transferred` / `supervisor`; in AudioSocket mode a hang-up
//! makes `/next` answer `hangup`; the console is off unless enabled, and a login beyond the
//! rate limit is refused without a password check. The summary on the handover cards:
//! tests/suite/console_summary.rs.

use crate::common;
use crate::fake_ari;

use fake_ari::{FakeAri, PASS, wait_until};
use std::time::Duration;
use uuid::Uuid;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, place_call};

use common::console::{
    PASSWORD, Svc, act, console_section, live_calls, login, request, start, try_login,
};

fn records(svc: &Svc) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("--config")
        .arg(&svc.started.config)
        .args(["records", "export"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stasis_take_over_continues_the_caller_to_the_operators() {
    let speech = common::fixture("hello-world.wav");
    let fake = FakeAri::start(speech.samples.clone(), SlinRate::Hz8000).await;
    let body = format!(
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n[ari]\nurl = \"{}\"\npassword = \"{PASS}\"\n\
         format = \"slin\"\n{}",
        fake.url(),
        console_section()
    );
    let svc = start("stasis", body).await;
    let health = svc.started.health;
    fake.wait_ws().await;
    let (cookie, csrf) = login(health).await;
    let caller = fake.new_caller("+15550001234", "Erika Mustermann");
    wait_until(Duration::from_secs(10), || {
        fake.media_reports()
            .first()
            .is_some_and(|r| r.frames_received > 50)
    })
    .await;
    let calls = live_calls(health, &cookie).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["mode"], "stasis");
    assert_eq!(calls[0]["caller"], "+15550001234");
    let id = calls[0]["id"].as_str().unwrap().to_owned();
    // Without the CSRF token: refused, nothing happens.
    let (code, _, _) = request(
        health,
        &format!("POST /console/api/calls/{id}/takeover HTTP/1.1\r\ncookie: {cookie}"),
        "",
    )
    .await;
    assert_eq!(code, 403);
    let unknown = Uuid::new_v4();
    let path = format!("/console/api/calls/{unknown}/takeover");
    assert_eq!(act(health, &cookie, &csrf, &path).await, 404);
    let path = format!("/console/api/calls/{id}/takeover");
    assert_eq!(act(health, &cookie, &csrf, &path).await, 204);
    wait_until(Duration::from_secs(10), || !fake.continued().is_empty()).await;
    let continued = fake.continued();
    assert_eq!(continued.len(), 1, "{continued:?}");
    assert_eq!(continued[0].channel, caller);
    assert_eq!(continued[0].context, "voicegate-transfer");
    let mut recs = Vec::new();
    wait_until(Duration::from_secs(10), || {
        recs = records(&svc);
        !recs.is_empty()
    })
    .await;
    assert_eq!(recs[0]["outcome"], "transferred", "{}", recs[0]);
    assert_eq!(recs[0]["detail"], "supervisor", "{}", recs[0]);
    assert_eq!(live_calls(health, &cookie).await.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audiosocket_hang_up_answers_hangup_to_the_dialplan_and_logins_are_limited() {
    let body = format!(
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n{}",
        console_section()
    );
    let svc = start("hangup", body).await;
    let (health, to) = (svc.started.health, svc.started.audiosocket);
    let (cookie, csrf) = login(health).await;
    let id = Uuid::new_v4();
    let plan = CallPlan {
        call_id: id,
        rate: SlinRate::Hz8000,
        speech: common::fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: Vec::new(),
        duration: Duration::from_secs(30),
    };
    let call = tokio::spawn(async move { place_call(to, &plan).await });
    let mut seen = false;
    for _ in 0..50 {
        if live_calls(health, &cookie)
            .await
            .iter()
            .any(|c| c["id"] == id.to_string())
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the call shows up live");
    let path = format!("/console/api/calls/{id}/hangup");
    assert_eq!(act(health, &cookie, &csrf, &path).await, 204);
    let report = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ends")
        .unwrap()
        .unwrap();
    assert!(report.hangup_received, "{report:?}");
    let (_, _, next) = request(health, &format!("GET /v1/calls/{id}/next HTTP/1.1"), "").await;
    assert_eq!(next, "hangup");
    // The login allowance: 5 attempts at once, then one per 12 s. Wrong passwords soon
    // meet 429 (a password check takes a while in a debug build, so a token may refill
    // meanwhile); right after, the right password is refused too, unchecked.
    let mut limited = false;
    for _ in 0..10 {
        let (code, head) = try_login(health, "wrong").await;
        if code == 429 {
            assert!(
                head.to_ascii_lowercase().contains("retry-after: 12"),
                "{head}"
            );
            limited = true;
            break;
        }
        assert_eq!(code, 401, "{head}");
    }
    assert!(limited, "10 wrong passwords in a row were all checked");
    let (code, head) = try_login(health, PASSWORD).await;
    assert_eq!(code, 429, "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_off_by_default() {
    let svc = start("off", "[agent]\nkind = \"echo\"\n".into()).await;
    let health = svc.started.health;
    for path in ["/console", "/console/api/state", "/console/app.js"] {
        let (code, _, _) = request(health, &format!("GET {path} HTTP/1.1"), "").await;
        assert_eq!(code, 404, "{path}");
    }
}
