//! The console's handover summary (issue 18, item 3): a handover card gets its three-line
//! summary from a Chat Completions endpoint (tests/cascade_fakes' `LlmFake`, OpenAI's wire
//! format) after the caller was handed over, never before: the transfer does not wait.

use crate::cascade_fakes;
use crate::common;

use std::time::Duration;
use uuid::Uuid;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, place_call};

use common::console::{act, console_section, live_calls, login, request, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_card_gets_its_summary_after_the_transfer_not_before() {
    const SUMMARY: &str =
        "Caller wants an invoice corrected.\nNothing looked up yet.\nOpen: the refund.";
    let llm = cascade_fakes::LlmFake::start(vec![cascade_fakes::LlmReply::text(SUMMARY)]).await;
    // The model takes its time: the transfer must not wait for it.
    llm.first_token_delay(Duration::from_secs(3));
    let body = format!(
        "[agent]\nkind = \"echo\"\ndelay_ms = 100\n{}[console.summary]\nurl = \"{}\"\n\
         api_key = \"sk-summary\"\nmodel = \"gpt-4o-mini\"\n",
        console_section(),
        llm.url()
    );
    let svc = start("summary", body).await;
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
    let path = format!("/console/api/calls/{id}/takeover");
    let t0 = tokio::time::Instant::now();
    assert_eq!(act(health, &cookie, &csrf, &path).await, 204);
    let report = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ends")
        .unwrap()
        .unwrap();
    assert!(report.hangup_received, "{report:?}");
    let handed = t0.elapsed();
    assert!(
        handed < Duration::from_secs(2),
        "the transfer waited: {handed:?}"
    );
    let cards = |body: &str| -> Vec<serde_json::Value> { serde_json::from_str(body).unwrap() };
    // The card is written as the session ends, a moment after the caller's hang-up: the
    // first time it shows, it has no summary yet (the LLM's first token is 3 s away).
    let mut first = Vec::new();
    for _ in 0..50 {
        let (_, _, body) = request(
            health,
            &format!("GET /console/api/handovers HTTP/1.1\r\ncookie: {cookie}"),
            "",
        )
        .await;
        first = cards(&body);
        if !first.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!first.is_empty(), "the handover card shows up");
    assert!(first[0]["summary"].is_null(), "no summary yet: {first:?}");
    let mut summary = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, _, body) = request(
            health,
            &format!("GET /console/api/handovers HTTP/1.1\r\ncookie: {cookie}"),
            "",
        )
        .await;
        summary = cards(&body)[0]["summary"].clone();
        if !summary.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(summary, SUMMARY);
    let log = llm.log.lock().unwrap();
    assert_eq!(log.requests.len(), 1);
    let req = &log.requests[0];
    assert!(
        req.headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("authorization") && v == "Bearer sk-summary"),
        "{:?}",
        req.headers
    );
    assert_eq!(req.body["model"], "gpt-4o-mini");
    let user = req.body["messages"][1]["content"].as_str().unwrap();
    assert!(
        user.contains("Why it goes to an operator: supervisor"),
        "{user}"
    );
}
