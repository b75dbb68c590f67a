//! Every log line of a cascade call carries its call id: the cascade's conversation and its
//! STT, LLM and TTS tasks run inside the call's span. Against the fakes of
//! `tests/cascade_fakes` (Deepgram, Chat Completions, ElevenLabs TTS), in a test binary of
//! its own so that no other test's tasks log at the same time.

use crate::call_logs;
use crate::cascade_fakes;
use crate::common;

use cascade_fakes::*;
use common::{TestServer, fixture};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use voicegate::agent::Speaker;
use voicegate::agent::cascade::CascadeAgent;
use voicegate::audiosocket::SlinRate;

const REPLY: &str = "Hello! This is the voicegate test line. How can I help you today?";

/// Every line the cascade's tasks (its conversation, the STT, LLM and TTS tasks) and the
/// call session log during a call carries the call's id.
#[tokio::test]
async fn every_line_of_a_cascade_call_carries_its_call_id() {
    let (logs, _guard) = call_logs::capture();
    let stt = SttFake::start(SttVendor::Deepgram, &["hello world"], None).await;
    let llm = LlmFake::start(vec![LlmReply::text(REPLY)]).await;
    let clip = fixture("vm-goodbye.wav");
    let tts = TtsFake::start(clip.clone(), false).await;
    let agent = CascadeAgent::new(&config(SttVendor::Deepgram, &stt, &llm, &tts), vec![]).unwrap();
    let mut server = TestServer::start(Arc::new(agent)).await;
    let (first_tx, mut first_rx) = watch::channel(None);
    let caller = EchoCaller {
        rate: SlinRate::Hz8000,
        speech: clip_at(&fixture("hello-world.wav"), 8_000),
        speech_at_ms: 200,
        barge: None,
        echo: None,
        noise_rms: 30.0,
        duration_ms: 6_500,
    };
    let call_id = uuid::Uuid::new_v4();
    let call = tokio::spawn(caller.run(server.addr, call_id, first_tx));
    tokio::time::timeout(Duration::from_secs(10), first_rx.wait_for(|v| v.is_some()))
        .await
        .expect("agent audio reached the caller")
        .unwrap();
    call.await.unwrap();
    let summary = server.next_summary().await;
    assert_eq!(summary.call_id, call_id);
    // The whole turn ran (so each stage had its say in the log).
    assert!(summary.transcript.contains(&(Speaker::Agent, REPLY.into())));
    server.stop.cancel();
    server.task.await.unwrap();
    logs.assert_every_call_line_has(
        call_id,
        &[
            "voicegate::agent::cascade::stt",
            "voicegate::agent::cascade::llm",
            "voicegate::agent::cascade::tts",
            "voicegate::call",
        ],
    );
}
