//! The cascade's conversation on virtual time: `now` is passed in, every output and every
//! timing is asserted exactly. Outputs are written as short lines (`"tts text 1 Hello."`)
//! so that a whole exchange reads as a script.

use super::*;
use crate::agent::keypad::DIGIT_GAP;

const PROMPT: &str = "Be brief. The caller is {caller}.";

fn protocol(edit: impl FnOnce(&mut CascadeConfig)) -> CascadeProtocol {
    let mut cfg = CascadeConfig::default();
    edit(&mut cfg);
    let call = CallInfo {
        call_id: uuid::Uuid::nil(),
        rate_hz: 8_000,
        caller_number: None,
        caller_name: None,
        tools: Vec::new(),
        variables: [("caller".to_owned(), "Ada".to_owned())].into(),
    };
    CascadeProtocol::new(&cfg, PROMPT, &call)
}

fn system() -> Value {
    json!({"role": "system", "content": "Be brief. The caller is Ada."})
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// `out` as one line per output.
fn show(out: &[CascadeOut]) -> Vec<String> {
    out.iter()
        .map(|o| match o {
            CascadeOut::SttAudio(b) if b.iter().all(|&x| x == 0) => {
                format!("stt zeros {}", b.len())
            }
            CascadeOut::SttAudio(b) => format!("stt audio {}", b.len()),
            CascadeOut::SttFinalize {
                trailing_silence_ms,
            } => format!("stt finalize {trailing_silence_ms}"),
            CascadeOut::TtsConnect => "tts connect".into(),
            CascadeOut::LlmStart { llm, .. } => format!("llm start {}", llm.0),
            CascadeOut::LlmDrop { llm } => format!("llm drop {}", llm.0),
            CascadeOut::TtsOpen { reply } => format!("tts open {}", reply.0),
            CascadeOut::TtsText { reply, text } => format!("tts text {} {text}", reply.0),
            CascadeOut::TtsFinish { reply } => format!("tts finish {}", reply.0),
            CascadeOut::TtsDrop { reply } => format!("tts drop {}", reply.0),
            CascadeOut::Event(ev) => show_event(ev),
            CascadeOut::Fail(e) => format!("fail {e}"),
        })
        .collect()
}

fn show_event(ev: &AgentEvent) -> String {
    match ev {
        AgentEvent::Audio { reply, samples } => format!("audio {} {}", reply.0, samples.len()),
        AgentEvent::ReplyDone { reply } => format!("reply done {}", reply.0),
        AgentEvent::SpeechStarted => "speech started".into(),
        AgentEvent::Transcript { speaker, text } => format!("{speaker:?}: {text}"),
        AgentEvent::ToolCall {
            call_id,
            name,
            arguments,
            reply,
        } => format!("tool call {call_id} {name}({arguments}) of {reply:?}"),
        AgentEvent::TurnLatency(l) => format!(
            "latency {}: stt {:?} llm {:?} tts {:?}",
            l.reply, l.stt_final_ms, l.llm_first_token_ms, l.tts_first_audio_ms
        ),
        other => format!("{other:?}"),
    }
}

/// The messages of the LLM request `out` starts (exactly one).
fn request(out: &[CascadeOut]) -> Vec<Value> {
    let starts: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            CascadeOut::LlmStart { messages, .. } => Some(messages.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), 1, "{:?}", show(out));
    starts.into_iter().next().unwrap_or_default()
}

fn start(p: &mut CascadeProtocol, now: Instant) -> Vec<String> {
    let mut out = Vec::new();
    p.start(now, &mut out);
    show(&out)
}

fn stt_raw(p: &mut CascadeProtocol, now: Instant, ev: SttEvent) -> Vec<CascadeOut> {
    let mut out = Vec::new();
    p.handle_stt(now, ev, &mut out);
    out
}

fn stt(p: &mut CascadeProtocol, now: Instant, ev: SttEvent) -> Vec<String> {
    show(&stt_raw(p, now, ev))
}

fn llm(p: &mut CascadeProtocol, now: Instant, id: u64, ev: LlmEvent) -> Vec<String> {
    let mut out = Vec::new();
    p.handle_llm(now, LlmId(id), ev, &mut out);
    show(&out)
}

fn text(p: &mut CascadeProtocol, now: Instant, id: u64, delta: &str) -> Vec<String> {
    llm(p, now, id, LlmEvent::Text(delta.into()))
}

fn done() -> LlmEvent {
    LlmEvent::Done {
        finish_reason: Some("stop".into()),
    }
}

fn tts(p: &mut CascadeProtocol, now: Instant, reply: u64, ev: TtsEvent) -> Vec<String> {
    let mut out = Vec::new();
    p.handle_tts(now, ReplyId(reply), ev, &mut out);
    show(&out)
}

fn input_raw(p: &mut CascadeProtocol, now: Instant, i: AgentInput) -> Vec<CascadeOut> {
    let mut out = Vec::new();
    p.handle_input(now, i, &mut out);
    out
}

fn input(p: &mut CascadeProtocol, now: Instant, i: AgentInput) -> Vec<String> {
    show(&input_raw(p, now, i))
}

fn timeout(p: &mut CascadeProtocol, now: Instant) -> Vec<String> {
    let mut out = Vec::new();
    p.handle_timeout(now, &mut out);
    show(&out)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The caller's turn `words` ends at `now`: reply 1 starts with its LLM request 1.
fn first_turn(p: &mut CascadeProtocol, now: Instant, words: &str) {
    let out = stt(p, now, SttEvent::EndOfTurn(words.into()));
    assert_eq!(
        out,
        [&format!("Caller: {words}"), "llm start 1", "tts open 1"]
    );
}

/// `n` frames of 20 ms of agent audio played to the caller.
fn play(p: &mut CascadeProtocol, now: Instant, n: usize) {
    for _ in 0..n {
        assert!(input(p, now, AgentInput::Playout(vec![1_000; 160])).is_empty());
    }
}

#[test]
fn a_turn_goes_from_the_stt_through_the_llm_and_the_tts_to_the_call() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    assert_eq!(start(&mut p, t0), ["tts connect"]);
    let out = stt_raw(
        &mut p,
        t0,
        SttEvent::EndOfTurn("  What time is it? ".into()),
    );
    assert_eq!(
        show(&out),
        ["Caller: What time is it?", "llm start 1", "tts open 1"]
    );
    assert_eq!(request(&out), [system(), user("What time is it?")]);
    // Sentences go to the TTS as soon as they are complete.
    let t1 = t0 + ms(200);
    assert!(text(&mut p, t1, 1, "It is ").is_empty());
    assert_eq!(text(&mut p, t1, 1, "noon. Any"), ["tts text 1 It is noon."]);
    assert!(text(&mut p, t1, 1, "thing else?").is_empty());
    assert_eq!(
        llm(&mut p, t1 + ms(50), 1, done()),
        ["llm drop 1", "tts text 1 Anything else?", "tts finish 1"]
    );
    // The first audio carries the turn's latency, from the end of the caller's speech (no
    // voiced frame here: the STT's end of turn).
    let t2 = t0 + ms(600);
    assert_eq!(
        tts(&mut p, t2, 1, TtsEvent::Audio(vec![0; 160])),
        [
            "latency 1: stt Some(0) llm Some(200) tts Some(600)",
            "audio 1 160"
        ]
    );
    assert_eq!(
        tts(&mut p, t2, 1, TtsEvent::Audio(vec![0; 320])),
        ["audio 1 320"]
    );
    assert_eq!(
        tts(&mut p, t2, 1, TtsEvent::Done),
        ["tts drop 1", "reply done 1"]
    );
    assert_eq!(
        input(&mut p, t2, AgentInput::PlayedOut { reply: ReplyId(1) }),
        ["Agent: It is noon. Anything else?"]
    );
    // The reply is in the history of the next turn.
    let out = stt_raw(&mut p, t2 + ms(900), SttEvent::EndOfTurn("Thanks.".into()));
    assert_eq!(show(&out), ["Caller: Thanks.", "llm start 2", "tts open 2"]);
    assert_eq!(
        request(&out),
        [
            system(),
            user("What time is it?"),
            assistant("It is noon. Anything else?"),
            user("Thanks.")
        ]
    );
}

/// Reply 1 says "Hello there. How are you today?", 3 s of audio aligned at 100 ms a
/// character, its LLM request still open.
fn talking(p: &mut CascadeProtocol, t0: Instant) {
    start(p, t0);
    first_turn(p, t0, "Hi.");
    assert_eq!(
        text(p, t0, 1, "Hello there. How are you today?"),
        ["tts text 1 Hello there."]
    );
    let chars = "Hello there. How are you today?"
        .chars()
        .enumerate()
        .map(|(i, c)| (i as u64 * 100, c))
        .collect();
    assert!(tts(p, t0, 1, TtsEvent::Chars(chars)).is_empty());
    assert_eq!(
        tts(p, t0, 1, TtsEvent::Audio(vec![0; 24_000])),
        [
            "latency 1: stt Some(0) llm Some(0) tts Some(0)",
            "audio 1 24000"
        ]
    );
}

#[test]
fn a_new_turn_over_the_reply_barges_in_and_keeps_only_the_heard_words() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    talking(&mut p, t0);
    // 1.4 s played: 14 characters, "Hello there. H", cut back to whole words.
    play(&mut p, t0, 70);
    let out = stt_raw(&mut p, t0 + ms(1_400), SttEvent::EndOfTurn("Wait.".into()));
    assert_eq!(
        show(&out),
        [
            "llm drop 1",
            "tts drop 1",
            "speech started",
            "Agent: Hello there.",
            "Caller: Wait.",
            "llm start 2",
            "tts open 2"
        ]
    );
    assert_eq!(
        request(&out),
        [
            system(),
            user("Hi."),
            assistant("Hello there."),
            user("Wait.")
        ]
    );
    // The cancelled request's and stream's late events are ignored.
    assert!(text(&mut p, t0, 1, "Fine.").is_empty());
    assert!(tts(&mut p, t0, 1, TtsEvent::Done).is_empty());
}

#[test]
fn the_calls_flush_keeps_the_heard_words_and_a_silent_flush_nothing() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    talking(&mut p, t0);
    // The call flushed after 1.35 s: "Hello there. H" → "Hello there.".
    let heard = AgentInput::Interrupted {
        reply: ReplyId(1),
        heard_ms: 1_350,
    };
    assert_eq!(
        input(&mut p, t0, heard),
        ["Agent: Hello there.", "llm drop 1", "tts drop 1"]
    );
    let out = stt_raw(&mut p, t0 + ms(2_000), SttEvent::EndOfTurn("And?".into()));
    assert_eq!(
        request(&out),
        [
            system(),
            user("Hi."),
            assistant("Hello there."),
            user("And?")
        ]
    );
    // Flushed before a word was heard: the reply leaves no trace.
    let t1 = t0 + ms(2_000);
    assert!(text(&mut p, t1 + ms(100), 2, "Well, ").is_empty());
    assert_eq!(
        tts(&mut p, t1 + ms(250), 2, TtsEvent::Audio(vec![0; 800])),
        [
            "latency 2: stt Some(0) llm Some(100) tts Some(250)",
            "audio 2 800"
        ]
    );
    let heard = AgentInput::Interrupted {
        reply: ReplyId(2),
        heard_ms: 40,
    };
    assert_eq!(input(&mut p, t0, heard), ["llm drop 2", "tts drop 2"]);
    let out = stt_raw(&mut p, t0 + ms(3_000), SttEvent::EndOfTurn("So?".into()));
    assert_eq!(
        request(&out),
        [
            system(),
            user("Hi."),
            assistant("Hello there."),
            user("And?"),
            user("So?")
        ]
    );
}

#[test]
fn a_backchannel_while_the_agent_talks_is_not_a_turn() {
    let mut p = protocol(|c| c.barge_in.backchannels = vec!["uh-huh".into()]);
    let t0 = Instant::now();
    talking(&mut p, t0);
    assert!(stt(&mut p, t0, SttEvent::Interim("uh-huh".into())).is_empty());
    assert_eq!(
        stt(&mut p, t0, SttEvent::EndOfTurn("Uh-huh.".into())),
        ["Caller: Uh-huh."]
    );
    // The reply goes on.
    assert_eq!(
        llm(&mut p, t0, 1, done()),
        [
            "llm drop 1",
            "tts text 1 How are you today?",
            "tts finish 1"
        ]
    );
}

#[test]
fn a_tool_call_goes_to_the_call_and_its_result_into_the_next_request() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    start(&mut p, t0);
    first_turn(&mut p, t0, "What time is it?");
    let call = ToolCallRequest {
        id: "call_1".into(),
        name: "get_time".into(),
        arguments: "{\"tz\":\"UTC\"}".into(),
    };
    assert_eq!(
        llm(&mut p, t0, 1, LlmEvent::ToolCalls(vec![call])),
        ["tool call call_1 get_time({\"tz\":\"UTC\"}) of Some(ReplyId(1))"]
    );
    assert_eq!(llm(&mut p, t0, 1, done()), ["llm drop 1", "tts finish 1"]);
    // The reply said nothing; the next request waits for the result.
    assert_eq!(
        tts(&mut p, t0, 1, TtsEvent::Done),
        ["tts drop 1", "reply done 1"]
    );
    let result = AgentInput::ToolResult {
        call_id: "call_1".into(),
        output: "{\"time\":\"12:00\"}".into(),
    };
    let out = input_raw(&mut p, t0 + ms(300), result);
    assert_eq!(show(&out), ["llm start 2", "tts open 2"]);
    assert_eq!(
        request(&out),
        [
            system(),
            user("What time is it?"),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\":\"UTC\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "call_1", "content": "{\"time\":\"12:00\"}"}),
        ]
    );
    // A result nobody asked for changes nothing.
    let stray = AgentInput::ToolResult {
        call_id: "call_9".into(),
        output: "{}".into(),
    };
    assert!(input(&mut p, t0, stray).is_empty());
    assert_eq!(
        text(&mut p, t0, 2, "It is noon. "),
        ["tts text 2 It is noon."]
    );
}

#[test]
fn a_turn_before_a_tool_result_answers_the_call_with_a_placeholder() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    start(&mut p, t0);
    first_turn(&mut p, t0, "Book it.");
    let call = ToolCallRequest {
        id: "call_1".into(),
        name: "book".into(),
        arguments: "{}".into(),
    };
    llm(&mut p, t0, 1, LlmEvent::ToolCalls(vec![call]));
    llm(&mut p, t0, 1, done());
    tts(&mut p, t0, 1, TtsEvent::Done);
    let out = stt_raw(&mut p, t0, SttEvent::EndOfTurn("Hello?".into()));
    assert_eq!(show(&out), ["Caller: Hello?", "llm start 2", "tts open 2"]);
    assert_eq!(
        request(&out)[3],
        json!({"role": "tool", "tool_call_id": "call_1",
        "content": "{\"error\":\"no result: the caller spoke again before it came\"}"})
    );
    // Its late result is ignored.
    let late = AgentInput::ToolResult {
        call_id: "call_1".into(),
        output: "{}".into(),
    };
    assert!(input(&mut p, t0, late).is_empty());
}

#[test]
fn an_eager_end_of_turn_confirmed_by_the_same_words_is_the_reply() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    start(&mut p, t0);
    let eager = SttEvent::EagerEndOfTurn("What time is it?".into());
    let out = stt_raw(&mut p, t0, eager);
    assert_eq!(show(&out), ["llm start 1"]);
    assert_eq!(request(&out), [system(), user("What time is it?")]);
    // Nothing of it reaches the TTS before the end of turn.
    assert!(text(&mut p, t0 + ms(100), 1, "It is noon. ").is_empty());
    assert!(text(&mut p, t0 + ms(120), 1, "Any").is_empty());
    let t1 = t0 + ms(400);
    assert_eq!(
        stt(&mut p, t1, SttEvent::EndOfTurn("What time is it?".into())),
        [
            "Caller: What time is it?",
            "tts open 1",
            "tts text 1 It is noon."
        ]
    );
    assert!(text(&mut p, t1, 1, "thing else?").is_empty());
    assert_eq!(
        llm(&mut p, t1, 1, done()),
        ["llm drop 1", "tts text 1 Anything else?", "tts finish 1"]
    );
    // Its first token counts from the end of turn, when the reply took it.
    assert_eq!(
        tts(&mut p, t1 + ms(300), 1, TtsEvent::Audio(vec![0; 160])),
        [
            "latency 1: stt Some(0) llm Some(0) tts Some(300)",
            "audio 1 160"
        ]
    );
}

#[test]
fn an_eager_end_of_turn_that_ended_before_the_turn_is_replayed_whole() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    start(&mut p, t0);
    stt(&mut p, t0, SttEvent::EagerEndOfTurn("Hi.".into()));
    assert!(text(&mut p, t0, 1, "Hello.").is_empty());
    assert!(llm(&mut p, t0, 1, done()).is_empty());
    // The driver reports the end of the finished stream; it changes nothing.
    let ended = LlmEvent::Failed(AgentError::Provider {
        provider: "chat_completions",
        detail: "llm task ended".into(),
    });
    assert!(llm(&mut p, t0, 1, ended).is_empty());
    assert_eq!(
        stt(&mut p, t0, SttEvent::EndOfTurn("Hi.".into())),
        [
            "Caller: Hi.",
            "tts open 1",
            "llm drop 1",
            "tts text 1 Hello.",
            "tts finish 1"
        ]
    );
}

#[test]
fn an_eager_end_of_turn_with_other_words_is_requested_again() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    start(&mut p, t0);
    assert_eq!(
        stt(&mut p, t0, SttEvent::EagerEndOfTurn("What time".into())),
        ["llm start 1"]
    );
    assert!(text(&mut p, t0, 1, "Soon. ").is_empty());
    let out = stt_raw(&mut p, t0, SttEvent::EndOfTurn("What time is it?".into()));
    assert_eq!(
        show(&out),
        [
            "Caller: What time is it?",
            "llm drop 1",
            "llm start 2",
            "tts open 1"
        ]
    );
    assert_eq!(request(&out), [system(), user("What time is it?")]);
    // The replaced request is forgotten.
    assert!(text(&mut p, t0, 1, "Later. ").is_empty());
    assert_eq!(text(&mut p, t0, 2, "Noon. "), ["tts text 1 Noon."]);
}

#[test]
fn a_newer_eager_end_of_turn_replaces_the_older_and_turn_resumed_cancels_it() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    start(&mut p, t0);
    stt(&mut p, t0, SttEvent::EagerEndOfTurn("What".into()));
    assert_eq!(
        stt(&mut p, t0, SttEvent::EagerEndOfTurn("What time".into())),
        ["llm start 2", "llm drop 1"]
    );
    assert_eq!(stt(&mut p, t0, SttEvent::TurnResumed), ["llm drop 2"]);
    assert!(text(&mut p, t0, 2, "Noon. ").is_empty());
    assert!(stt(&mut p, t0, SttEvent::TurnResumed).is_empty());
    let out = stt_raw(&mut p, t0, SttEvent::EndOfTurn("What time is it?".into()));
    assert_eq!(
        show(&out),
        ["Caller: What time is it?", "llm start 3", "tts open 1"]
    );
    assert_eq!(request(&out), [system(), user("What time is it?")]);
}

#[test]
fn no_eager_request_while_a_reply_runs() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    talking(&mut p, t0);
    assert!(stt(&mut p, t0, SttEvent::EagerEndOfTurn("Stop.".into())).is_empty());
}

#[test]
fn keypad_digits_become_a_turn_at_the_deadline_or_on_hash() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    start(&mut p, t0);
    assert_eq!(p.poll_timeout(), None);
    assert!(input(&mut p, t0, AgentInput::Dtmf('4')).is_empty());
    assert_eq!(p.poll_timeout(), Some(t0 + DIGIT_GAP));
    let t1 = t0 + ms(500);
    assert!(input(&mut p, t1, AgentInput::Dtmf('2')).is_empty());
    let due = t1 + DIGIT_GAP;
    assert_eq!(p.poll_timeout(), Some(due));
    assert!(timeout(&mut p, due - ms(1)).is_empty());
    assert_eq!(
        timeout(&mut p, due),
        [
            "Caller: (The caller typed 42 on the phone keypad.)",
            "llm start 1",
            "tts open 1"
        ]
    );
    assert_eq!(p.poll_timeout(), None);
    assert!(timeout(&mut p, due + ms(5)).is_empty());
    // `#` ends the turn at once; the reply that was waiting for its LLM is superseded.
    let t2 = due + ms(100);
    assert!(input(&mut p, t2, AgentInput::Dtmf('7')).is_empty());
    assert_eq!(
        input(&mut p, t2, AgentInput::Dtmf('#')),
        [
            "llm drop 1",
            "tts drop 1",
            "speech started",
            "Caller: (The caller typed 7# on the phone keypad.)",
            "llm start 2",
            "tts open 2"
        ]
    );
    assert_eq!(p.poll_timeout(), None);
}

#[test]
fn the_first_digit_stops_the_agent_talking() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    talking(&mut p, t0);
    play(&mut p, t0, 10);
    assert_eq!(
        input(&mut p, t0, AgentInput::Dtmf('1')),
        ["llm drop 1", "tts drop 1", "speech started"]
    );
    assert!(input(&mut p, t0, AgentInput::Dtmf('2')).is_empty());
    // The call's flush after 0.2 s: "Hello" was not finished, nothing was heard.
    let flushed = AgentInput::Interrupted {
        reply: ReplyId(1),
        heard_ms: 200,
    };
    assert!(input(&mut p, t0, flushed).is_empty());
    let out = p.poll_timeout().map(|due| timeout(&mut p, due));
    assert_eq!(
        out.unwrap_or_default(),
        [
            "Caller: (The caller typed 12 on the phone keypad.)",
            "llm start 2",
            "tts open 2"
        ]
    );
}

#[test]
fn the_greeting_is_spoken_first_and_kept_in_the_history() {
    let mut p = protocol(|c| c.greeting = Some("Hello {caller}, how can I help?".into()));
    let t0 = Instant::now();
    assert_eq!(
        start(&mut p, t0),
        [
            "tts connect",
            "tts open 1",
            "tts text 1 Hello Ada, how can I help?",
            "tts finish 1"
        ]
    );
    // No turn, no latency.
    assert_eq!(
        tts(&mut p, t0, 1, TtsEvent::Audio(vec![0; 160])),
        ["audio 1 160"]
    );
    assert_eq!(
        tts(&mut p, t0, 1, TtsEvent::Done),
        ["tts drop 1", "reply done 1"]
    );
    assert_eq!(
        input(&mut p, t0, AgentInput::PlayedOut { reply: ReplyId(1) }),
        ["Agent: Hello Ada, how can I help?"]
    );
    let out = stt_raw(&mut p, t0 + ms(2_000), SttEvent::EndOfTurn("Hours?".into()));
    // The greeting made no LLM request: this is the first.
    assert_eq!(show(&out), ["Caller: Hours?", "llm start 1", "tts open 2"]);
    assert_eq!(
        request(&out),
        [
            system(),
            assistant("Hello Ada, how can I help?"),
            user("Hours?")
        ]
    );
}

#[test]
fn a_provider_failure_ends_the_session_and_nothing_follows() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    start(&mut p, t0);
    first_turn(&mut p, t0, "Hi.");
    let failed = TtsEvent::Failed(AgentError::Provider {
        provider: "elevenlabs_tts",
        detail: "tts task ended".into(),
    });
    assert_eq!(
        tts(&mut p, t0, 1, failed),
        ["fail elevenlabs_tts error: tts task ended"]
    );
    assert!(text(&mut p, t0, 1, "Hello. ").is_empty());
    assert!(stt(&mut p, t0, SttEvent::EndOfTurn("Hi?".into())).is_empty());
    assert!(input(&mut p, t0, AgentInput::Dtmf('1')).is_empty());
}

#[test]
fn caller_audio_goes_to_the_stt_and_an_empty_turn_is_no_turn() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    start(&mut p, t0);
    let frame = Bytes::from(vec![0u8; 320]);
    assert_eq!(
        input(&mut p, t0, AgentInput::Audio(frame)),
        ["stt zeros 320"]
    );
    assert!(stt(&mut p, t0, SttEvent::EndOfTurn("  ".into())).is_empty());
    assert!(stt(&mut p, t0, SttEvent::Interim("Hel".into())).is_empty());
}

/// One 20 ms caller frame at 8 kHz of constant `level`.
fn caller(level: i16) -> AgentInput {
    let bytes: Vec<u8> = std::iter::repeat_n(level.to_le_bytes(), 160)
        .flatten()
        .collect();
    AgentInput::Audio(Bytes::from(bytes))
}

/// Ten loud caller frames over the agent's echo (200 ms, the VAD's `min_speech_ms`): the
/// first nine may be echo, so the STT hears zeros and they are kept; the tenth starts the
/// caller's speech and the STT gets the kept frames and itself.
fn speak_over(p: &mut CascadeProtocol, now: Instant) -> Vec<String> {
    for _ in 0..9 {
        assert_eq!(input(p, now, caller(4_000)), ["stt zeros 320"]);
    }
    input(p, now, caller(4_000))
}

#[test]
fn words_heard_as_the_callers_voice_confirm_a_barge_in() {
    let mut p = protocol(|_| {});
    let t0 = Instant::now();
    talking(&mut p, t0);
    play(&mut p, t0, 5);
    // Local barge-in is on: the VAD alone does not interrupt.
    assert_eq!(speak_over(&mut p, t0), vec!["stt audio 320"; 10]);
    // Words 1.5 s after the last voiced frame are not taken for the caller's.
    assert!(stt(&mut p, t0 + ms(1_500), SttEvent::Interim("Wait".into())).is_empty());
    let t1 = t0 + ms(1_600);
    assert_eq!(input(&mut p, t1, caller(4_000)), ["stt audio 320"]);
    assert_eq!(
        stt(&mut p, t1 + ms(1_499), SttEvent::Interim("Wait".into())),
        ["llm drop 1", "tts drop 1", "speech started"]
    );
    // The call's flush after 100 ms played: nothing whole was heard.
    let flushed = AgentInput::Interrupted {
        reply: ReplyId(1),
        heard_ms: 100,
    };
    assert!(input(&mut p, t1, flushed).is_empty());
}

#[test]
fn without_local_barge_in_the_vad_interrupts_and_its_end_finalizes_the_stt() {
    let mut p = protocol(|c| c.barge_in.enabled = false);
    let t0 = Instant::now();
    talking(&mut p, t0);
    play(&mut p, t0, 5);
    let mut want = vec!["llm drop 1", "tts drop 1", "speech started"];
    want.extend(vec!["stt audio 320"; 10]);
    assert_eq!(speak_over(&mut p, t0), want);
    // `hang_ms` (400 ms) of quiet ends the speech: the STT is asked to finalize.
    for _ in 0..19 {
        assert_eq!(input(&mut p, t0, caller(30)), ["stt audio 320"]);
    }
    assert_eq!(
        input(&mut p, t0, caller(30)),
        ["stt finalize 400", "stt zeros 320"]
    );
}
