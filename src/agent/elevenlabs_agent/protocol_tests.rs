//! The ElevenLabs Agents protocol on virtual time: `now` is passed in, every timing
//! assertion is exact. Message shapes as in `tests/suite/elevenlabs_agent.rs`'s fake
//! (elevenlabs/packages `schemas/agent.asyncapi.yaml`).

use super::*;
use crate::agent::config::ElevenlabsAgentConfig;
use crate::agent::elevenlabs_agent::ElevenlabsAgent;
use serde_json::Value;
use std::time::Duration;

fn conversation(t0: Instant) -> Conversation {
    let cfg = ElevenlabsAgentConfig {
        url: "ws://127.0.0.1:9/v1/convai/conversation".into(),
        agent_id: "agent_42".into(),
        ..Default::default()
    };
    let agent = ElevenlabsAgent::from_config(&cfg).expect("config");
    let call = CallInfo {
        call_id: uuid::Uuid::nil(),
        rate_hz: 8_000,
        caller_number: Some("+15550100".into()),
        caller_name: None,
        tools: Vec::new(),
        variables: Default::default(),
    };
    let deadline = t0 + agent.settings.connect_timeout;
    Conversation::new(agent.settings, &call, "ws://127.0.0.1:9/c".into(), deadline)
}

fn sent(out: &[Out]) -> Vec<Value> {
    out.iter()
        .filter_map(|o| match o {
            Out::Send { text, .. } => Some(serde_json::from_str(text).expect("JSON")),
            _ => None,
        })
        .collect()
}

fn server(c: &mut Conversation, now: Instant, v: Value) -> Vec<Out> {
    let mut out = Vec::new();
    let text = v.to_string();
    c.handle_server(now, SOCKET, ServerMsg::Text(&text), &mut out);
    out
}

fn metadata() -> Value {
    json!({"type": "conversation_initiation_metadata", "conversation_initiation_metadata_event": {
        "conversation_id": "conv_1", "agent_output_audio_format": "ulaw_8000", "user_input_audio_format": "ulaw_8000"}})
}

fn opened(c: &mut Conversation, t0: Instant) -> Vec<Out> {
    let mut out = Vec::new();
    c.start(t0, &mut out);
    c.handle_server(t0, SOCKET, ServerMsg::Opened, &mut out);
    out
}

fn fail_text(out: &[Out]) -> Option<String> {
    out.iter().find_map(|o| match o {
        Out::Fail(e) => Some(e.to_string()),
        _ => None,
    })
}

#[test]
fn client_data_first_and_the_metadata_deadline_is_exact() {
    let t0 = Instant::now();
    let mut c = conversation(t0);
    let deadline = c.deadline;
    let out = opened(&mut c, t0);
    assert!(matches!(&out[0], Out::Open { timeout, .. } if *timeout == deadline - t0));
    let first = sent(&out);
    assert_eq!(first[0]["type"], "conversation_initiation_client_data");
    assert_eq!(first[0]["dynamic_variables"]["caller_number"], "+15550100");
    assert_eq!(c.poll_timeout(), Some(deadline));
    let mut out = Vec::new();
    c.handle_timeout(deadline - Duration::from_millis(1), &mut out);
    assert!(out.is_empty());
    c.handle_timeout(deadline, &mut out);
    assert!(
        fail_text(&out)
            .unwrap()
            .contains("conversation_initiation_metadata")
    );
}

#[test]
fn early_caller_audio_goes_out_after_the_metadata_and_pings_are_answered() {
    let t0 = Instant::now();
    let mut c = conversation(t0);
    opened(&mut c, t0);
    let mut out = Vec::new();
    for _ in 0..5 {
        c.handle_input(t0, AgentInput::Audio(Bytes::from(vec![0u8; 320])), &mut out);
    }
    assert!(out.is_empty(), "nothing before the formats are known");
    let out = server(&mut c, t0, metadata());
    let chunk = sent(&out);
    assert_eq!(chunk.len(), 1);
    // 5 frames of 20 ms in μ-law: 800 bytes, base64.
    let b64 = chunk[0]["user_audio_chunk"].as_str().unwrap();
    assert_eq!(B64.decode(b64).unwrap().len(), 800);
    assert_eq!(c.poll_timeout(), None, "no deadline once the metadata came");
    let out = server(
        &mut c,
        t0,
        json!({"type": "ping", "ping_event": {"event_id": 7, "ping_ms": 50}}),
    );
    assert_eq!(sent(&out), [json!({"type": "pong", "event_id": 7})]);
}

#[test]
fn an_interruption_drops_stale_audio_and_starts_a_new_reply() {
    let t0 = Instant::now();
    let mut c = conversation(t0);
    opened(&mut c, t0);
    server(&mut c, t0, metadata());
    let audio = |id: i64| json!({"type": "audio", "audio_event": {"audio_base_64": B64.encode([0xffu8; 160]), "event_id": id}});
    let reply_of = |out: &[Out]| match out {
        [Out::Event(AgentEvent::Audio { reply, .. })] => Some(*reply),
        _ => None,
    };
    let first = reply_of(&server(&mut c, t0, audio(1))).expect("audio");
    let out = server(
        &mut c,
        t0,
        json!({"type": "interruption", "interruption_event": {"event_id": 2}}),
    );
    assert!(matches!(&out[..], [Out::Event(AgentEvent::SpeechStarted)]));
    assert!(
        server(&mut c, t0, audio(2)).is_empty(),
        "audio of the interrupted reply"
    );
    let next = reply_of(&server(&mut c, t0, audio(3))).expect("audio");
    assert_eq!(next.0, first.0 + 1);
}

#[test]
fn a_normal_close_ends_the_call_and_another_fails_it_naming_the_error() {
    let t0 = Instant::now();
    let mut c = conversation(t0);
    opened(&mut c, t0);
    server(&mut c, t0, metadata());
    server(
        &mut c,
        t0,
        json!({"type": "agent_response", "agent_response_event": {"agent_response": "Goodbye!"}}),
    );
    let mut out = Vec::new();
    let close = |code: u16, reason: &str| Closed {
        frame: Some((code, reason.into())),
        detail: String::new(),
    };
    c.handle_server(t0, SOCKET, ServerMsg::Closed(close(1000, "done")), &mut out);
    assert!(
        matches!(&out[..], [
        Out::Event(AgentEvent::Transcript { speaker: Speaker::Agent, text }),
        Out::Event(AgentEvent::Ended { .. }),
        Out::Stop,
    ] if text == "Goodbye!"),
        "{out:?}"
    );

    let mut c = conversation(t0);
    opened(&mut c, t0);
    server(
        &mut c,
        t0,
        json!({"type": "error", "error_event": {"code": 1008, "error_type": "override_error",
        "reason": "Override for field 'first_message' is not allowed by config."}}),
    );
    let mut out = Vec::new();
    c.handle_server(
        t0,
        SOCKET,
        ServerMsg::Closed(close(1008, "policy")),
        &mut out,
    );
    let e = fail_text(&out).unwrap();
    assert!(
        e.contains("closed with code 1008") && e.contains("error_event 1008: override_error"),
        "{e}"
    );
}

#[test]
fn keypad_digits_become_one_user_message_a_gap_after_the_last() {
    let t0 = Instant::now();
    let mut c = conversation(t0);
    opened(&mut c, t0);
    server(&mut c, t0, metadata());
    let mut out = Vec::new();
    let t1 = t0 + Duration::from_secs(3);
    c.handle_input(t1, AgentInput::Dtmf('7'), &mut out);
    let due = t1 + crate::agent::keypad::DIGIT_GAP;
    assert_eq!(c.poll_timeout(), Some(due));
    c.handle_timeout(due - Duration::from_millis(1), &mut out);
    assert!(out.is_empty());
    c.handle_timeout(due, &mut out);
    assert_eq!(
        sent(&out),
        [json!({"type": "user_message", "text": "(The caller pressed the phone key 7.)"})]
    );
}
