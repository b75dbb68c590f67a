//! A provider's quota refusal seen from outside: `voicegate run` (the real binary) with a
//! cascade agent whose Soniox fake is at its concurrency limit refuses the call's STT session
//! the way Soniox does (`{"error_code":429,"error_type":"limit_exceeded",…}`, then a close);
//! the call goes to the operators, the log says why, and `/metrics` counts it as
//! `voicegate_provider_errors_total{provider="cascade",reason="quota"}`.

use crate::cascade_fakes;
use crate::common;

use cascade_fakes::*;
use common::fixture;
use futures_util::SinkExt as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use uuid::Uuid;
use voicegate::audiosocket::SlinRate;
use voicegate::caller::{CallPlan, place_call};

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Every `voicegate_provider_errors_total` sample in `/metrics`, as rendered.
async fn provider_errors(health: std::net::SocketAddr) -> Vec<String> {
    http_get(health, "/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with("voicegate_provider_errors_total{"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soniox_concurrency_refusal_is_counted_as_quota_in_metrics() {
    let stt = SttFake::start(SttVendor::Soniox, &["hello world"], None).await;
    stt.concurrency_limit(1);
    let llm = LlmFake::start(vec![LlmReply::text("Hi.")]).await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;

    // Another call of the same Soniox project holds the only slot.
    let mut req = stt.url(SttVendor::Soniox).into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let (mut other, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    other
        .send(Message::text(
            r#"{"model":"stt-rt-v4","audio_format":"pcm_s16le","sample_rate":8000,"num_channels":1}"#,
        ))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while stt.log.lock().unwrap().active_sessions == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the other session is admitted");

    let dir = std::env::temp_dir().join(format!("vg-quota-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let body = format!(
        "[agent]\nkind = \"cascade\"\n\
         [agent.stt]\nprovider = \"soniox\"\nurl = \"{}\"\napi_key = \"{KEY}\"\n\
         [agent.llm]\nurl = \"{}\"\napi_key = \"{KEY}\"\nmodel = \"test-model\"\n\
         [agent.tts]\nurl = \"{}\"\napi_key = \"{KEY}\"\nvoice_id = \"voice1\"\n",
        stt.url(SttVendor::Soniox),
        llm.url(),
        tts.url()
    );
    let d = dir.clone();
    let mut svc = tokio::task::spawn_blocking(move || common::service::start(&d, 3, &body))
        .await
        .unwrap();
    assert!(provider_errors(svc.health).await.is_empty());

    let plan = CallPlan {
        call_id: Uuid::new_v4(),
        rate: SlinRate::Hz8000,
        speech: fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: Vec::new(),
        duration: Duration::from_secs(4),
    };
    let report = tokio::time::timeout(Duration::from_secs(20), place_call(svc.audiosocket, &plan))
        .await
        .expect("the call ends")
        .expect("the call connects");
    assert_eq!(report.audible_frames_received, 0, "no agent answered");

    let mut samples = Vec::new();
    for _ in 0..100 {
        samples = provider_errors(svc.health).await;
        if !samples.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stderr = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    let _ = svc.child.kill();
    let _ = svc.child.wait();
    assert_eq!(
        samples,
        [r#"voicegate_provider_errors_total{provider="cascade",reason="quota"} 1"#],
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("provider refused for a quota or concurrency limit")
            && stderr.contains("limit_exceeded"),
        "{stderr}"
    );
    let log = stt.log.lock().unwrap();
    assert_eq!(
        log.refused_concurrency, 1,
        "the call's session was the one refused"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
