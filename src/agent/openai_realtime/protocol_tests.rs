//! The OpenAI Realtime protocol on virtual time: `now` is passed in, every timing assertion
//! is exact. Event shapes as in `tests/common/fake_openai.rs` (openai-python
//! `src/openai/types/realtime/`).

use super::*;
use crate::agent::config::OpenAiRealtimeConfig;
use crate::agent::driver::Closed;
use crate::agent::openai_realtime::OpenAiRealtime;
use crate::secret::SecretSource;
use std::time::Duration;

const KEY: &str = "sk-proto-test-key-4242";

fn protocol(edit: impl FnOnce(&mut OpenAiRealtimeConfig)) -> Realtime {
    let mut cfg = OpenAiRealtimeConfig {
        url: "ws://127.0.0.1:9/v1/realtime".into(),
        api_key: SecretSource::Inline(KEY.into()),
        instructions: "Be brief.".into(),
        ..OpenAiRealtimeConfig::default()
    };
    edit(&mut cfg);
    let agent = OpenAiRealtime::new(&cfg).expect("config");
    let call = CallInfo {
        call_id: uuid::Uuid::nil(),
        rate_hz: 8_000,
        caller_number: None,
        caller_name: None,
        tools: Vec::new(),
        variables: Default::default(),
    };
    Realtime::new(agent.settings, &call).expect("protocol")
}

/// The JSON messages of `out` written to `socket`.
fn sent(out: &[Out], socket: SocketId) -> Vec<Value> {
    out.iter()
        .filter_map(|o| match o {
            Out::Send { socket: s, text } if *s == socket => {
                Some(serde_json::from_str(text).expect("JSON"))
            }
            _ => None,
        })
        .collect()
}

fn types(out: &[Out], socket: SocketId) -> Vec<String> {
    sent(out, socket)
        .iter()
        .map(|v| v["type"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn server(p: &mut Realtime, now: Instant, socket: SocketId, ev: Value) -> Vec<Out> {
    let mut out = Vec::new();
    let text = ev.to_string();
    p.handle_server(now, socket, ServerMsg::Text(&text), &mut out);
    out
}

fn input(p: &mut Realtime, now: Instant, i: AgentInput) -> Vec<Out> {
    let mut out = Vec::new();
    p.handle_input(now, i, &mut out);
    out
}

fn timeout(p: &mut Realtime, now: Instant) -> Vec<Out> {
    let mut out = Vec::new();
    p.handle_timeout(now, &mut out);
    out
}

fn updated() -> Value {
    json!({"type": "session.updated", "session": {"type": "realtime",
        "audio": {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}}})
}

/// Sets up `socket` at `now` (connected, created, updated); returns what was sent on it.
fn set_up(p: &mut Realtime, now: Instant, socket: SocketId) -> Vec<Out> {
    let mut out = Vec::new();
    p.handle_server(now, socket, ServerMsg::Opened, &mut out);
    out.extend(server(p, now, socket, json!({"type": "session.created"})));
    out.extend(server(p, now, socket, updated()));
    out
}

fn ready(p: &mut Realtime, t0: Instant) -> Vec<Out> {
    let mut out = Vec::new();
    p.start(t0, &mut out);
    out.extend(set_up(p, t0, 1));
    out
}

fn response(kind: &str, id: &str) -> Value {
    json!({"type": kind, "response": {"id": id, "status": if kind == "response.done" {"completed"} else {"in_progress"}, "output": []}})
}

fn fails(out: &[Out]) -> Option<String> {
    out.iter().find_map(|o| match o {
        Out::Fail(e) => Some(e.to_string()),
        _ => None,
    })
}

#[test]
fn set_up_deadlines_are_exact() {
    let mut p = protocol(|c| c.connect_timeout_ms = 2_000);
    let t0 = Instant::now();
    let mut out = Vec::new();
    p.start(t0, &mut out);
    assert!(
        matches!(&out[..], [Out::Open { socket: 1, headers, timeout, .. }]
        if headers[0].1 == format!("Bearer {KEY}") && *timeout == Duration::from_secs(2))
    );
    // Connecting and session.created share one deadline.
    assert_eq!(p.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    let mut out = Vec::new();
    p.handle_server(
        t0 + Duration::from_millis(300),
        1,
        ServerMsg::Opened,
        &mut out,
    );
    assert_eq!(p.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    let t1 = t0 + Duration::from_millis(900);
    let out = server(&mut p, t1, 1, json!({"type": "session.created"}));
    assert_eq!(types(&out, 1), ["session.update"]);
    // session.updated gets its own.
    assert_eq!(p.poll_timeout(), Some(t1 + Duration::from_secs(2)));
    // Caller audio meanwhile is kept, not sent.
    let frame = Bytes::from(vec![0u8; 320]);
    assert!(input(&mut p, t1, AgentInput::Audio(frame)).is_empty());
    let due = t1 + Duration::from_secs(2);
    assert!(fails(&timeout(&mut p, due - Duration::from_millis(1))).is_none());
    let failed = fails(&timeout(&mut p, due)).expect("set-up timed out");
    assert!(failed.contains("no session.updated within 2s"), "{failed}");
}

#[test]
fn caller_audio_kept_during_set_up_is_sent_once_ready() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    let mut out = Vec::new();
    p.start(t0, &mut out);
    for _ in 0..3 {
        input(&mut p, t0, AgentInput::Audio(Bytes::from(vec![0u8; 320])));
    }
    let out = set_up(&mut p, t0, 1);
    assert_eq!(
        types(&out, 1),
        [
            "session.update",
            "input_audio_buffer.append",
            "input_audio_buffer.append",
            "input_audio_buffer.append"
        ]
    );
}

#[test]
fn response_create_waits_for_response_done_and_is_retried_after_a_refusal() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    ready(&mut p, t0);
    server(&mut p, t0, 1, response("response.created", "resp_1"));
    let out = server(
        &mut p,
        t0,
        1,
        json!({"type": "response.function_call_arguments.done",
        "response_id": "resp_1", "item_id": "item_f", "output_index": 0, "call_id": "call_1",
        "name": "get_time", "arguments": "{}"}),
    );
    assert!(out.iter().any(
        |o| matches!(o, Out::Event(AgentEvent::ToolCall { call_id, .. }) if call_id == "call_1")
    ));
    // The output goes at once; its response.create waits for the active response.
    let out = input(
        &mut p,
        t0,
        AgentInput::ToolResult {
            call_id: "call_1".into(),
            output: "{}".into(),
        },
    );
    assert_eq!(types(&out, 1), ["conversation.item.create"]);
    let out = server(&mut p, t0, 1, response("response.done", "resp_1"));
    let creates = sent(&out, 1);
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0]["type"], "response.create");
    assert_eq!(creates[0]["event_id"], "vg_response_create_1");
    // The server started a response of its own meanwhile and refuses ours: it goes again
    // after that response's response.done, and not before.
    let out = server(
        &mut p,
        t0,
        1,
        json!({"type": "error", "event_id": "ev_1", "error": {
        "type": "invalid_request_error", "code": "conversation_already_has_active_response",
        "message": "Conversation already has an active response in progress: resp_2.",
        "param": null, "event_id": "vg_response_create_1"}}),
    );
    assert!(out.is_empty(), "{out:?}");
    let out = server(&mut p, t0, 1, response("response.created", "resp_2"));
    assert!(sent(&out, 1).is_empty());
    let out = server(&mut p, t0, 1, response("response.done", "resp_2"));
    let again = sent(&out, 1);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["type"], "response.create");
    assert_eq!(again[0]["event_id"], "vg_response_create_2");
}

#[test]
fn session_is_renewed_at_the_configured_time_before_the_60_minute_limit() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    ready(&mut p, t0);
    let renew = Duration::from_secs(OpenAiRealtimeConfig::default().session_renew_s);
    assert!(renew < Duration::from_secs(3_600));
    server(
        &mut p,
        t0,
        1,
        json!({"type": "conversation.item.input_audio_transcription.completed",
        "item_id": "item_u", "content_index": 0, "transcript": "What time is it?"}),
    );
    assert_eq!(p.poll_timeout(), Some(t0 + renew));
    assert!(timeout(&mut p, t0 + renew - Duration::from_millis(1)).is_empty());
    let t1 = t0 + renew;
    let out = timeout(&mut p, t1);
    assert!(matches!(&out[..], [Out::Open { socket: 2, .. }]), "{out:?}");
    // The renewal session's set-up runs beside the live one, on its own deadline.
    assert_eq!(p.poll_timeout(), Some(t1 + Duration::from_millis(1_500)));
    let frame = || AgentInput::Audio(Bytes::from(vec![0u8; 320]));
    assert_eq!(
        types(&input(&mut p, t1, frame()), 1),
        ["input_audio_buffer.append"]
    );
    // Ready at a quiet moment: the transcript goes into it, the old socket closes.
    let t2 = t1 + Duration::from_millis(400);
    let out = set_up(&mut p, t2, 2);
    assert_eq!(
        types(&out, 2),
        ["session.update", "conversation.item.create"]
    );
    assert_eq!(
        sent(&out, 2)[1]["item"]["content"][0]["text"],
        "What time is it?"
    );
    assert!(out.iter().any(|o| matches!(o, Out::Close { socket: 1 })));
    assert_eq!(
        types(&input(&mut p, t2, frame()), 2),
        ["input_audio_buffer.append"]
    );
    assert_eq!(p.poll_timeout(), Some(t2 + renew));
}

#[test]
fn a_renewal_waits_for_the_active_response_and_a_failed_one_is_retried() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    ready(&mut p, t0);
    let renew = Duration::from_secs(OpenAiRealtimeConfig::default().session_renew_s);
    // The first renewal fails to connect: another one 30 s later.
    let t1 = t0 + renew;
    timeout(&mut p, t1);
    let mut out = Vec::new();
    p.handle_server(
        t1,
        2,
        ServerMsg::Closed(Closed::because("connect: refused")),
        &mut out,
    );
    assert!(out.iter().any(|o| matches!(o, Out::Close { socket: 2 })));
    assert!(fails(&out).is_none(), "the call goes on");
    assert_eq!(p.poll_timeout(), Some(t1 + RENEW_RETRY));
    let t2 = t1 + RENEW_RETRY;
    let out = timeout(&mut p, t2);
    assert!(matches!(&out[..], [Out::Open { socket: 3, .. }]), "{out:?}");
    // Ready while the agent speaks: no switch until that response is done.
    server(&mut p, t2, 1, response("response.created", "resp_1"));
    let out = set_up(&mut p, t2, 3);
    assert!(
        !out.iter().any(|o| matches!(o, Out::Close { .. })),
        "{out:?}"
    );
    let out = server(&mut p, t2, 1, response("response.done", "resp_1"));
    assert!(
        out.iter().any(|o| matches!(o, Out::Close { socket: 1 })),
        "{out:?}"
    );
}

#[test]
fn the_live_session_ending_with_a_renewal_ready_switches_instead_of_failing() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    ready(&mut p, t0);
    let t1 = t0 + Duration::from_secs(OpenAiRealtimeConfig::default().session_renew_s);
    timeout(&mut p, t1);
    // The caller is speaking, so the switch waits ...
    server(
        &mut p,
        t1,
        1,
        json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "item_u"}),
    );
    set_up(&mut p, t1, 2);
    // ... until the old session expires: the call goes on in the new one.
    let out = server(
        &mut p,
        t1,
        1,
        json!({"type": "error", "event_id": "ev_x", "error": {
        "type": "invalid_request_error", "code": "session_expired",
        "message": "Your session hit the maximum duration of 60 minutes.", "param": null, "event_id": null}}),
    );
    assert!(fails(&out).is_none(), "{out:?}");
    assert!(out.iter().any(|o| matches!(o, Out::Close { socket: 1 })));
    // Without a renewal ready, the same error fails the session.
    let mut q = protocol(|_| {});
    ready(&mut q, t0);
    let mut out = Vec::new();
    q.handle_server(
        t0,
        1,
        ServerMsg::Closed(Closed::because("server closed the connection")),
        &mut out,
    );
    assert!(fails(&out).expect("failed").contains("closed"));
}

#[test]
fn a_silent_caller_is_prompted_then_told_goodbye_and_the_call_ends() {
    let mut p = protocol(|c| {
        c.idle_timeout_ms = Some(6_000);
        c.idle_prompts = 1;
    });
    let t0 = Instant::now();
    ready(&mut p, t0);
    let idle = json!({"type": "input_audio_buffer.timeout_triggered", "audio_start_ms": 0, "audio_end_ms": 6000, "item_id": "item_i"});
    // The first timeout: the server's own response prompts the caller.
    assert!(sent(&server(&mut p, t0, 1, idle.clone()), 1).is_empty());
    server(&mut p, t0, 1, response("response.created", "resp_p1"));
    assert!(
        sent(
            &server(&mut p, t0, 1, response("response.done", "resp_p1")),
            1
        )
        .is_empty()
    );
    // The second: after the server's prompt, voicegate asks for the goodbye.
    server(&mut p, t0, 1, idle);
    server(&mut p, t0, 1, response("response.created", "resp_p2"));
    let out = server(&mut p, t0, 1, response("response.done", "resp_p2"));
    let create = sent(&out, 1);
    assert_eq!(create.len(), 1);
    assert!(
        create[0]["response"]["instructions"]
            .as_str()
            .unwrap()
            .contains("goodbye")
    );
    server(&mut p, t0, 1, response("response.created", "resp_bye"));
    let out = server(&mut p, t0, 1, response("response.done", "resp_bye"));
    assert!(
        matches!(&out[..], [Out::Event(AgentEvent::Ended { reason }), Out::Stop] if reason.contains("silent")),
        "{out:?}"
    );
}

#[test]
fn keypad_digits_become_a_turn_exactly_one_gap_after_the_last() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    ready(&mut p, t0);
    let t1 = t0 + Duration::from_secs(5);
    input(&mut p, t1, AgentInput::Dtmf('4'));
    let t2 = t1 + Duration::from_millis(600);
    input(&mut p, t2, AgentInput::Dtmf('2'));
    let due = t2 + crate::agent::keypad::DIGIT_GAP;
    assert_eq!(p.poll_timeout(), Some(due));
    assert!(sent(&timeout(&mut p, due - Duration::from_millis(1)), 1).is_empty());
    let out = timeout(&mut p, due);
    assert_eq!(
        types(&out, 1),
        ["conversation.item.create", "response.create"]
    );
    assert_eq!(
        sent(&out, 1)[0]["item"]["content"][0]["text"],
        "(The caller typed 42 on the phone keypad.)"
    );
}
