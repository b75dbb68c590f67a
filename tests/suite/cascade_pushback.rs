//! The cascade agent against fakes that push back like the vendors (issue 20 item 6): an LLM
//! whose first token comes late, an LLM that refuses a history with a tool call and no result
//! (OpenAI's 400), a TTS socket that refuses a wrong key and closes after its inactivity
//! timeout (ElevenLabs' `invalid_api_key` and `input_timeout_exceeded`, 1008 closes).

use crate::cascade_fakes;
use crate::common;

use cascade_fakes::*;
use common::{TestServer, fixture};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use voicegate::agent::cascade::tts::{TtsCommand, TtsEvent, TtsSettings};
use voicegate::agent::cascade::{CascadeAgent, ToolSpec};
use voicegate::agent::{Agent, AgentEvent, AgentInput, CallInfo};
use voicegate::audiosocket::SlinRate;
use voicegate::call::Outcome;
use voicegate::secret::{Secret, SecretSource};

/// The model takes 1.5 s to its first token: the caller still hears the reply, the call ends
/// normally, and the recorded turn latency includes the model's wait (it is measured from the
/// caller's words to the agent's audio, not from the first token).
#[tokio::test]
async fn late_first_token_is_waited_for_and_counted_in_the_turn_latency() {
    let stt = SttFake::start(SttVendor::Deepgram, &["hello world"], None).await;
    let llm = LlmFake::start(vec![LlmReply::text("Good morning.")]).await;
    llm.first_token_delay(Duration::from_millis(1500));
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let agent = CascadeAgent::new(&config(SttVendor::Deepgram, &stt, &llm, &tts), vec![]).unwrap();
    let mut server = TestServer::start(Arc::new(agent)).await;
    let (first_tx, _rx) = watch::channel(None);
    let caller = EchoCaller {
        rate: SlinRate::Hz8000,
        speech: fixture("hello-world.wav").samples,
        speech_at_ms: 200,
        barge: None,
        echo: None,
        noise_rms: 30.0,
        duration_ms: 7_000,
    };
    let report = caller
        .run(server.addr, uuid::Uuid::new_v4(), first_tx)
        .await;
    let summary = server.next_summary().await;
    server.stop.cancel();
    assert_eq!(summary.outcome, Outcome::CallerHungUp);
    let first = report.first_audio_ms.expect("the caller heard the reply");
    let request_at = llm.log.lock().unwrap().requests[0].at;
    assert!(request_at.elapsed() > Duration::from_millis(1500));
    assert_eq!(summary.turn_latencies_ms.len(), 1, "{summary:?}");
    let latency = summary.turn_latencies_ms[0];
    assert!(
        (1500..4000).contains(&latency),
        "turn latency {latency} ms with a 1.5 s first token (first audio at {first} ms)"
    );
}

/// The caller speaks again while a tool call is unanswered: the next request's history must
/// still be one OpenAI accepts (each `tool_calls` id answered by a `tool` message), so the
/// caller gets an answer instead of a 400 and a fallback.
#[tokio::test]
async fn caller_speaking_over_an_unanswered_tool_call_keeps_the_history_valid() {
    let stt = SttFake::start(
        SttVendor::Deepgram,
        &["do you have winter tyres", "hello are you there"],
        None,
    )
    .await;
    let llm = LlmFake::start(vec![
        LlmReply::Stream {
            events: tool_events("call_1", "search_tires", r#"{"size":"205/55 R16"}"#),
            hold_after: None,
        },
        LlmReply::text("Yes, I am here."),
    ])
    .await;
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let tools = vec![ToolSpec {
        name: "search_tires".into(),
        description: "Search the tyre stock".into(),
        parameters: serde_json::json!({"type":"object","properties":{"size":{"type":"string"}}}),
    }];
    let agent = CascadeAgent::new(&config(SttVendor::Deepgram, &stt, &llm, &tts), tools).unwrap();
    let mut s = agent.start(CallInfo {
        tools: Vec::new(),
        variables: Default::default(),
        call_id: uuid::Uuid::new_v4(),
        rate_hz: 8_000,
        caller_number: None,
        caller_name: None,
    });
    // Speech, 1.5 s of silence, the same speech again, then silence (10 ms per 20 ms frame,
    // as fast as the STT fake takes it).
    let tx = s.input.clone();
    let feeder = tokio::spawn(async move {
        let speech = fixture("hello-world.wav").samples;
        let silence = vec![0i16; 12_000];
        let line: Vec<i16> = [&speech[..], &silence, &speech, &silence, &silence].concat();
        for f in line.chunks(160) {
            let mut b = Vec::new();
            voicegate::audio::slin_to_le_bytes(f, &mut b);
            if tx.send(AgentInput::Audio(b.into())).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::future::pending::<()>().await;
    });
    let mut tool_called = false;
    let mut audio = 0usize;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(15), s.events.recv())
            .await
            .expect("an agent event in time")
            .expect("agent alive");
        match ev {
            // The tool is never answered (the caller talks over it).
            AgentEvent::ToolCall { .. } => tool_called = true,
            AgentEvent::Audio { samples, .. } => audio += samples.len(),
            AgentEvent::ReplyDone { .. } if audio > 0 => break,
            AgentEvent::Failed(e) => panic!("the agent failed: {e}"),
            _ => {}
        }
    }
    feeder.abort();
    assert!(tool_called);
    // The second stream's end is logged a few ms after its last event.
    for _ in 0..100 {
        if llm.log.lock().unwrap().completed.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let l = llm.log.lock().unwrap();
    assert_eq!(l.requests.len(), 2);
    assert_eq!(l.completed, vec![0, 1], "both requests were accepted");
    let m = l.requests[1].body["messages"].as_array().unwrap();
    assert_eq!(m[3]["role"], "tool", "{m:?}");
    assert_eq!(m[3]["tool_call_id"], "call_1", "{m:?}");
    assert_eq!(m[4]["content"], "hello are you there", "{m:?}");
}

fn tts_settings(tts: &TtsFake, key: &str) -> TtsSettings {
    TtsSettings {
        cfg: voicegate::agent::cascade::config::TtsConfig {
            url: tts.url(),
            api_key: SecretSource::Inline(key.into()),
            voice_id: "voice1".into(),
            ..Default::default()
        },
        key: Secret::new(key),
    }
}

/// Runs one reply on `call` and returns (audio samples, failure).
async fn one_reply(
    call: &mut voicegate::agent::cascade::tts::TtsCall,
    text: &str,
) -> (usize, Option<String>) {
    let mut reply = call.start();
    reply.text.send(TtsCommand::Text(text.into())).unwrap();
    reply.text.send(TtsCommand::Finish).unwrap();
    let mut audio = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), reply.events.recv()).await {
            Ok(Some(TtsEvent::Audio(a))) => audio += a.len(),
            Ok(Some(TtsEvent::Done)) => return (audio, None),
            Ok(Some(TtsEvent::Failed(e))) => return (audio, Some(e.to_string())),
            Ok(Some(TtsEvent::Chars(_))) => {}
            Ok(None) => return (audio, Some("events closed".into())),
            Err(_) => panic!("the reply neither finished nor failed within 5 s"),
        }
    }
}

/// A wrong ElevenLabs key: the socket opens, the vendor answers `invalid_api_key` and closes
/// with 1008; the reply fails at once with that reason (rather than the caller waiting in
/// silence).
#[tokio::test]
async fn tts_wrong_key_fails_the_reply_with_the_vendors_reason() {
    let tts = TtsFake::start(fixture("vm-goodbye.wav"), false).await;
    let mut call = tts_settings(&tts, "sk_wrong").call(8_000);
    call.connect();
    let (audio, failed) = one_reply(&mut call, "Hello there.").await;
    assert_eq!(audio, 0);
    let e = failed.expect("the reply failed");
    assert!(
        e.contains("Invalid API key") || e.contains("invalid_api_key"),
        "{e}"
    );
    assert_eq!(tts.log.lock().unwrap().errors, vec!["invalid xi-api-key"]);
}

/// The TTS socket, opened early and left without text past its inactivity timeout, is closed
/// by the vendor (`input_timeout_exceeded`, 1008): the next reply is still spoken in full.
#[tokio::test]
async fn tts_socket_closed_for_inactivity_does_not_lose_the_next_reply() {
    let clip = fixture("vm-goodbye.wav");
    let tts = TtsFake::start(clip.clone(), false).await;
    tts.inactivity_timeout(Some(Duration::from_millis(400)));
    let mut call = tts_settings(&tts, KEY).call(8_000);
    call.connect();
    let (audio, failed) = one_reply(&mut call, "First.").await;
    assert_eq!((audio, failed), (clip_at(&clip, 8_000).len(), None));
    // The caller talks for a while; the socket idles past the vendor's timeout.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(tts.log.lock().unwrap().timed_out >= 1, "the fake timed out");
    let (audio, failed) = one_reply(&mut call, "Second.").await;
    assert_eq!(failed, None);
    assert_eq!(audio, clip_at(&clip, 8_000).len(), "the whole second reply");
    assert!(tts.log.lock().unwrap().errors.is_empty());
}
