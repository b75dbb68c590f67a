//! The `openai_realtime` agent end to end: the synthetic caller (behaving like Asterisk)
//! calls the real AudioSocket listener, whose call session talks to the agent, which talks to
//! a fake OpenAI Realtime server on 127.0.0.1 speaking the real wire format
//! (`tests/common/fake_openai.rs`, `providers.md` §1).
//!
//! Times on both sides are measured from one shared `Instant` (`t0`): the fake records when it
//! sent each event, the caller when each frame arrived (`CallReport::arrivals_ms` plus the
//! offset at which the call started).

use crate::call_logs;
use crate::common;
use crate::fake_openai;

use common::{TestServer, fixture};
use fake_openai::{FakeConn, FakeOpenAi, to_wire};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use voicegate::agent::openai_realtime::OpenAiRealtime;
use voicegate::agent::{SharedAgent, Speaker};
use voicegate::audio::convert::WireFormat;
use voicegate::audio::g711::Law;
use voicegate::audio::wav::Recording;
use voicegate::audiosocket::SlinRate;
use voicegate::call::Outcome;
use voicegate::caller::{CallPlan, CallReport, best_correlation, resample_recording, run_call};
use voicegate::config::OpenAiRealtimeConfig;
use voicegate::secret::SecretSource;

const KEY: &str = "sk-test-9f8e7d6c5b4a-secret";
const ULAW: WireFormat = WireFormat::G711(Law::Ulaw);
const PCM24: WireFormat = WireFormat::Pcm16 { rate_hz: 24_000 };

fn agent(url: &str, edit: impl FnOnce(&mut OpenAiRealtimeConfig)) -> SharedAgent {
    let mut cfg = OpenAiRealtimeConfig {
        url: url.to_owned(),
        api_key: SecretSource::Inline(KEY.into()),
        voice: "marin".into(),
        instructions: "You are a test agent.".into(),
        connect_timeout_ms: 2_000,
        ..OpenAiRealtimeConfig::default()
    };
    edit(&mut cfg);
    Arc::new(OpenAiRealtime::new(&cfg).expect("agent config"))
}

fn plan(rate: SlinRate, speech: Recording, seconds: f64) -> CallPlan {
    CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate,
        speech,
        speech_offset: Duration::from_millis(100),
        dtmf: vec![],
        duration: Duration::from_secs_f64(seconds),
    }
}

fn silence() -> Recording {
    Recording {
        rate_hz: 8_000,
        samples: vec![],
    }
}

/// Places the call; returns the report and when (ms after `t0`) the caller's clock started.
async fn call(addr: SocketAddr, plan: &CallPlan, t0: Instant) -> (CallReport, f64) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let offset_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let report = run_call(stream, plan).await.expect("call");
    (report, offset_ms)
}

/// `session.created`, check the `session.update`, confirm `formats`; returns the update.
async fn set_up(c: &mut FakeConn, formats: (WireFormat, WireFormat)) -> Value {
    c.session_created().await;
    let update = c.expect("session.update").await;
    c.session_updated(&update, formats).await;
    update
}

/// Every `n`th sample (the audio is band-limited to 4 kHz, having started at 8 kHz).
fn decimate(samples: &[i16], n: usize) -> Vec<i16> {
    samples.iter().step_by(n).copied().collect()
}

/// Correlation of what the caller heard (brought to 8 kHz) with `reference` (8 kHz), looked
/// for around where the caller first heard audio.
fn heard_correlation(report: &CallReport, reference: &[i16]) -> f64 {
    let rx = decimate(&report.received.samples, report.rate_hz as usize / 8_000);
    let first_ms = report.first_audio_ms.expect("the caller heard audio");
    let from = (((first_ms - 300.0).max(0.0) * 8.0) as usize).min(rx.len());
    best_correlation(&rx[from..], reference, 4_000).0
}

/// Where the reply `expected` (exact samples) starts in what the caller received `rx`, and
/// how many of its samples follow there unchanged (what the caller heard of it).
fn locate_reply(rx: &[i16], expected: &[i16]) -> (usize, usize) {
    let anchor = expected.iter().position(|s| s.abs() > 500).unwrap();
    let at = (0..rx.len() - 160)
        .find(|&i| rx[i..i + 160] == expected[anchor..anchor + 160])
        .expect("the reply reached the caller");
    let start = at - anchor;
    assert_eq!(start % 160, 0, "the reply starts on a frame boundary");
    let heard = rx[start..]
        .iter()
        .zip(expected)
        .take_while(|(a, b)| a == b)
        .count();
    (start, heard)
}

fn concat(names: &[&str]) -> Vec<i16> {
    names.iter().flat_map(|n| fixture(n).samples).collect()
}

fn has_transcript(t: &[(Speaker, String)], speaker: Speaker, text: &str) -> bool {
    t.iter().any(|(s, x)| *s == speaker && x == text)
}

const REPLY_TEXT: &str = "Hello world. Goodbye. Thank you.";

/// Test 1: a GA session on an 8 kHz call in μ-law both ways, with barge-in.
#[tokio::test]
async fn ga_ulaw_call_paced_reply_and_barge_in_truncates_what_was_heard() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(agent(&fake.url, |_| {})).await;
    let speech = fixture("hello-world.wav");
    let reply_audio = concat(&["hello-world.wav", "vm-goodbye.wav", "auth-thankyou.wav"]);
    let reply_ms = reply_audio.len() as f64 / 8.0;
    let reply_wire = to_wire(&reply_audio, ULAW);
    let plan = plan(SlinRate::Hz8000, speech.clone(), 6.0);
    let t0 = Instant::now();

    let fake_side = async {
        let (hs, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        let update = set_up(&mut c, (ULAW, ULAW)).await;
        // The caller's 1.4 s of speech (from 100 ms), then the turn the server VAD detects.
        c.wait_for_audio_ms(1_700).await;
        c.caller_turn("item_u1", "Hello world.").await;
        // 3.2 s of reply as 100 ms deltas, back to back.
        let (reply_first, reply_last) = c
            .reply("resp_1", "item_a1", &reply_wire, 800, REPLY_TEXT)
            .await;
        // The caller hears about a second of it, then talks over it.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let t_ss = c
            .send(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 2_900, "item_id": "item_u2"}))
            .await;
        let truncate = c.expect("conversation.item.truncate").await;
        c.send(
            json!({"type": "conversation.item.truncated", "item_id": truncate["item_id"],
                      "content_index": 0, "audio_end_ms": truncate["audio_end_ms"]}),
        )
        .await;
        c.drain(Duration::from_secs(10)).await;
        (hs, update, c, reply_first, reply_last, t_ss, truncate)
    };
    let ((hs, update, c, reply_first, reply_last, t_ss, truncate), (report, offset)) =
        tokio::join!(fake_side, call(server.addr, &plan, t0));

    // The upgrade and the session.update the fake received (GA shapes, §1.1, §1.2).
    assert_eq!(
        hs.authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(hs.beta, None, "GA sends no OpenAI-Beta header");
    assert_eq!(hs.uri, "/v1/realtime?model=gpt-realtime");
    let s = &update["session"];
    assert_eq!(s["type"], "realtime");
    assert_eq!(s["instructions"], "You are a test agent.");
    assert_eq!(s["audio"]["input"]["format"]["type"], "audio/pcmu");
    assert_eq!(s["audio"]["output"]["format"]["type"], "audio/pcmu");
    assert_eq!(s["audio"]["output"]["voice"], "marin");
    let td = &s["audio"]["input"]["turn_detection"];
    assert_eq!(td["type"], "server_vad");
    assert_eq!(td["prefix_padding_ms"], 300);
    assert_eq!(td["silence_duration_ms"], 500);
    assert!((td["threshold"].as_f64().unwrap() - 0.5).abs() < 1e-6);
    assert_eq!(
        s["audio"]["input"]["transcription"]["model"],
        "gpt-4o-mini-transcribe"
    );

    // What the fake heard is the caller's recording (μ-law decoded), 100 ms in.
    let odd: Vec<(usize, usize)> = c
        .append_sizes
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, n)| n != 160)
        .collect();
    // One append per caller frame; only the recording's last, partial frame is shorter.
    assert!(
        odd.len() <= 1 && odd.iter().all(|&(_, n)| n == speech.samples.len() % 160),
        "20 ms μ-law appends; others: {odd:?} of {}",
        c.append_sizes.len()
    );
    let (corr, lag) = best_correlation(&c.audio_in, &speech.samples, 2_400);
    assert!(corr > 0.9, "caller audio correlation {corr}");
    assert!(
        (lag - 800).abs() <= 160,
        "caller speech at {} ms, sent at 100 ms",
        lag / 8
    );

    // The set-up (not the check): the fake sent the reply as a burst, much faster than
    // real time, so what follows checks voicegate's pacing, not the fake's.
    assert!(
        reply_last - reply_first < reply_ms / 4.0,
        "precondition: fake sent {reply_ms} ms of reply in {} ms",
        reply_last - reply_first
    );

    // Find the reply in what the caller received: exact μ-law samples, from a frame start.
    assert_eq!(report.short_frames, 0);
    let expected: Vec<i16> = reply_audio
        .iter()
        .map(|&s| Law::Ulaw.decode(Law::Ulaw.encode(s)))
        .collect();
    let rx = &report.received.samples;
    let (start, heard) = locate_reply(rx, &expected);
    let heard_frames = heard / 160;
    let first = start / 160;
    let last = first + heard_frames - 1;
    let heard_ms = heard_frames as f64 * 20.0;
    assert!(
        heard_ms >= 500.0 && heard_ms <= reply_ms - 1_000.0,
        "caller heard {heard_ms} ms of a {reply_ms} ms reply before barging in"
    );
    assert!(
        rx[(last + 1) * 160..(last + 2) * 160]
            .iter()
            .all(|&s| s == 0),
        "silence after the flush"
    );

    // Paced: the reply's frames arrived one per 20 ms, not in a burst.
    let t = |i: usize| report.arrivals_ms[i] + offset;
    let span = t(last) - t(first);
    let want = (heard_frames - 1) as f64 * 20.0;
    assert!(
        span >= want - 40.0 && span <= want + 200.0,
        "{heard_frames} reply frames over {span} ms"
    );
    let mut gaps: Vec<f64> = (first + 1..=last).map(|i| t(i) - t(i - 1)).collect();
    gaps.sort_by(f64::total_cmp);
    let p50 = gaps[gaps.len() / 2];
    assert!((17.0..=23.0).contains(&p50), "reply gap p50 {p50} ms");
    assert!(
        (18.0..=22.0).contains(&report.gap_p50_ms),
        "call gap p50 {}",
        report.gap_p50_ms
    );
    // Never ahead of real time on the caller's wire: reply frame k not before 20·k − 40 ms
    // after the first (a burst passed through, or 10 ms pacing, fails at once).
    let ahead = (first..=last)
        .map(|i| (i - first) as f64 * 20.0 - (t(i) - t(first)))
        .fold(f64::MIN, f64::max);
    assert!(
        ahead <= 40.0,
        "a reply frame arrived {ahead:.1} ms ahead of 20 ms pacing"
    );
    // Tolerant of a loaded machine: a hiccup may delay a frame, but frames never bunch up.
    let bunched = gaps.iter().filter(|&&g| g < 5.0).count();
    assert!(
        bunched * 20 <= gaps.len(),
        "{bunched} of {} reply frames bunched",
        gaps.len()
    );
    // No audible break (single ticks delayed 100–200 ms by a loaded machine are not one).
    assert!(
        report.gap_max_ms < 500.0,
        "call gap max {}",
        report.gap_max_ms
    );
    assert!(
        t(first) >= reply_first,
        "no audio before the reply was sent"
    );
    assert!(
        t(first) - reply_first < 500.0,
        "first reply audio {} ms after it was sent",
        t(first) - reply_first
    );

    eprintln!(
        "reply {reply_ms} ms sent in {:.1} ms; first reply audio {:.1} ms after; caller heard {heard_ms} ms; \
         audio_end_ms {}; last reply frame {:+.1} ms from speech_started; reply frames p50 {p50:.1} ms; \
         call gaps p50 {:.1} p99 {:.1} max {:.1} ms",
        reply_last - reply_first,
        t(first) - reply_first,
        truncate["audio_end_ms"],
        t(last) - t_ss,
        report.gap_p50_ms,
        report.gap_p99_ms,
        report.gap_max_ms
    );

    // The flush: the last reply frame left within one frame (plus jitter) of speech_started,
    // and the reply was still playing right up to it.
    const JITTER_MS: f64 = 50.0;
    assert!(
        t(last) <= t_ss + 20.0 + JITTER_MS,
        "reply audio still arrived {} ms after speech_started",
        t(last) - t_ss
    );
    assert!(
        t(last) >= t_ss - 20.0 - JITTER_MS,
        "reply stopped {} ms before speech_started",
        t_ss - t(last)
    );

    // The truncate names the item and what the caller really heard, within one frame.
    assert_eq!(truncate["item_id"], "item_a1");
    assert_eq!(truncate["content_index"], 0);
    let audio_end_ms = truncate["audio_end_ms"].as_f64().expect("audio_end_ms");
    assert!(
        (audio_end_ms - heard_ms).abs() <= 20.0,
        "audio_end_ms {audio_end_ms}, caller heard {heard_ms}"
    );
    // The server's VAD cancels its own response (§1.6): no response.cancel from us.
    assert!(
        c.events.iter().all(|e| e["type"] != "response.cancel"),
        "{:?}",
        c.events
    );

    let summary = server.next_summary().await;
    assert_eq!(summary.agent, "openai_realtime");
    assert_eq!(summary.outcome, Outcome::CallerHungUp);
    assert_eq!(summary.barge_ins, 1);
    assert!(
        has_transcript(&summary.transcript, Speaker::Caller, "Hello world."),
        "{:?}",
        summary.transcript
    );
    assert!(
        has_transcript(&summary.transcript, Speaker::Agent, REPLY_TEXT),
        "{:?}",
        summary.transcript
    );
    server.stop.cancel();
}

/// Test 1b: barge-in while the server is still streaming the reply. Deltas of the
/// interrupted item that were already in flight are dropped, the server's cancelled
/// `response.done` ends it, and the truncate still says what the caller heard.
#[tokio::test]
async fn barge_in_mid_stream_drops_late_deltas() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(agent(&fake.url, |_| {})).await;
    let early = concat(&["hello-world.wav", "vm-goodbye.wav"]);
    let late = fixture("auth-thankyou.wav").samples;
    let plan = plan(SlinRate::Hz8000, fixture("hello-world.wav"), 5.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c, (ULAW, ULAW)).await;
        c.wait_for_audio_ms(1_700).await;
        c.caller_turn("item_u1", "Hello world.").await;
        let ids = json!({"response_id": "resp_1", "item_id": "item_a1", "output_index": 0, "content_index": 0});
        let delta = |audio: &[i16]| {
            use base64::Engine as _;
            let mut v = ids.clone();
            v["type"] = json!("response.output_audio.delta");
            v["delta"] =
                json!(base64::engine::general_purpose::STANDARD.encode(to_wire(audio, ULAW)));
            v
        };
        c.send(json!({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "output": []}})).await;
        c.send(json!({"type": "response.output_item.added", "response_id": "resp_1", "output_index": 0,
                      "item": {"id": "item_a1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}})).await;
        for chunk in early.chunks(800) {
            c.send(delta(chunk)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        let t_ss = c
            .send(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 2_500, "item_id": "item_u2"}))
            .await;
        // Generated before the server saw the caller's speech: must never be played.
        for chunk in late.chunks(800) {
            c.send(delta(chunk)).await;
        }
        let mut done = ids.clone();
        done["type"] = json!("response.output_audio.done");
        c.send(done).await;
        c.send(json!({"type": "response.done", "response": {"id": "resp_1", "status": "cancelled",
                      "status_details": {"type": "cancelled", "reason": "turn_detected"}, "output": []}})).await;
        let truncate = c.expect("conversation.item.truncate").await;
        c.drain(Duration::from_secs(10)).await;
        (t_ss, truncate, c)
    };
    let ((t_ss, truncate, c), (report, offset)) =
        tokio::join!(fake_side, call(server.addr, &plan, t0));

    let expected: Vec<i16> = early
        .iter()
        .map(|&s| Law::Ulaw.decode(Law::Ulaw.encode(s)))
        .collect();
    let rx = &report.received.samples;
    let (start, heard) = locate_reply(rx, &expected);
    let heard_frames = heard / 160;
    let last = start / 160 + heard_frames - 1;
    let heard_ms = heard_frames as f64 * 20.0;
    assert!(
        heard_ms >= 300.0 && heard_ms < early.len() as f64 / 8.0 - 500.0,
        "heard {heard_ms} ms"
    );
    let t_last = report.arrivals_ms[last] + offset;
    assert!(
        (t_last - t_ss).abs() <= 70.0,
        "last reply frame {} ms from speech_started",
        t_last - t_ss
    );
    // Nothing after the flush: neither the rest of the early audio nor the late deltas.
    assert!(
        rx[(last + 1) * 160..].iter().all(|&s| s == 0),
        "only silence after the barge-in"
    );
    assert_eq!(truncate["item_id"], "item_a1");
    let audio_end_ms = truncate["audio_end_ms"].as_f64().unwrap();
    assert!(
        (audio_end_ms - heard_ms).abs() <= 20.0,
        "audio_end_ms {audio_end_ms}, heard {heard_ms}"
    );
    assert!(c.events.iter().all(|e| e["type"] != "response.cancel"));
    let summary = server.next_summary().await;
    assert_eq!(summary.barge_ins, 1);
    assert_eq!(summary.outcome, Outcome::CallerHungUp);
    server.stop.cancel();
}

/// Test 1c: local barge-in on the wire. The caller says "Thank you." over a reply; the server
/// VAD answers realistically late (once it has 300 ms of the caller's speech, plus 50 ms of
/// network). The call has paused the reply before that, at the caller; `speech_started` then
/// confirms, and the truncate names what was heard before the pause, not before the flush.
#[tokio::test]
async fn local_barge_in_pauses_before_speech_started_and_truncates_at_the_pause() {
    let fake = FakeOpenAi::bind(KEY).await;
    // The caller leg has no echo (a softphone with its own canceller): docs/bargein.md says
    // to lower `echo_return_max` to 0.2 on such trunks. With the default 0.6 the gate waits
    // for the caller to be louder than 0.6 x the agent's last 400 ms, and when that comes
    // depends on how the two voices line up in time, which moves with the machine's load.
    let mut server =
        TestServer::start(agent(&fake.url, |c| c.barge_in.echo_return_max = 0.2)).await;
    let reply_audio = concat(&["hello-world.wav", "vm-goodbye.wav", "hello-world.wav"]);
    let voice = fixture("auth-thankyou.wav");
    // The voice's onset: its first 10 ms above RMS 100.
    let onset = voice
        .samples
        .chunks(80)
        .position(|c| voicegate::audio::rms(c) > 100.0)
        .unwrap() as f64
        * 10.0;
    let mut p = plan(SlinRate::Hz8000, voice, 5.0);
    p.speech_offset = Duration::from_millis(1_500);
    let onset_ms = 1_500.0 + onset;
    let wire = to_wire(&reply_audio, ULAW);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c, (ULAW, ULAW)).await;
        c.reply("resp_1", "item_a1", &wire, 800, REPLY_TEXT).await;
        // The server VAD: 300 ms of the caller's speech, then 50 ms on the way back.
        c.wait_for_audio_ms(onset_ms as u64 + 300).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t_ss = c
            .send(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": onset_ms as u64, "item_id": "item_u2"}))
            .await;
        let truncate = c.expect("conversation.item.truncate").await;
        c.drain(Duration::from_secs(10)).await;
        (t_ss, truncate)
    };
    let ((t_ss, truncate), (report, offset)) = tokio::join!(fake_side, call(server.addr, &p, t0));

    let expected: Vec<i16> = reply_audio
        .iter()
        .map(|&s| Law::Ulaw.decode(Law::Ulaw.encode(s)))
        .collect();
    let rx = &report.received.samples;
    let (start, heard) = locate_reply(rx, &expected);
    let heard_frames = heard / 160;
    let heard_ms = heard_frames as f64 * 20.0;
    let silent = start / 160 + heard_frames;
    // The caller's clock: the frame after the last heard one is the first silent one.
    let silent_at = report.arrivals_ms[silent];
    let latency = silent_at - onset_ms;
    eprintln!(
        "onset at {onset_ms} ms; agent silent at the caller {latency:.1} ms after it; \
         speech_started {:.1} ms after it; heard {heard_ms} ms; audio_end_ms {}",
        t_ss - offset - onset_ms,
        truncate["audio_end_ms"]
    );
    assert!(
        silent_at + offset < t_ss,
        "paused at {:.1} ms, after speech_started at {t_ss:.1} ms",
        silent_at + offset
    );
    assert!(latency > 0.0, "silent {latency} ms before the onset");
    // Nothing after the pause reached the caller: the flush confirmed it.
    assert!(rx[silent * 160..].iter().all(|&s| s == 0));
    let audio_end_ms = truncate["audio_end_ms"].as_f64().unwrap();
    assert_eq!(truncate["item_id"], "item_a1");
    assert!(
        (audio_end_ms - heard_ms).abs() <= 20.0,
        "audio_end_ms {audio_end_ms}, heard {heard_ms}"
    );
    let summary = server.next_summary().await;
    assert_eq!((summary.barge_ins, summary.false_barge_ins), (1, 0));
    assert_eq!(summary.barge_in_latencies_ms.len(), 1, "{summary:?}");
    server.stop.cancel();
}

/// Test 2: with a greeting the agent speaks first; the caller says nothing.
#[tokio::test]
async fn greeting_is_spoken_first_without_caller_speech() {
    let greeting = "Thank you for calling.";
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server =
        TestServer::start(agent(&fake.url, |c| c.greeting = Some(greeting.into()))).await;
    let audio = fixture("auth-thankyou.wav");
    let wire = to_wire(&audio.samples, ULAW);
    let plan = plan(SlinRate::Hz8000, silence(), 3.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c, (ULAW, ULAW)).await;
        // The first thing after set-up is the agent's own turn.
        let create = c.expect("response.create").await;
        let sent = c.reply("resp_g", "item_g", &wire, 800, greeting).await;
        c.drain(Duration::from_secs(10)).await;
        (create, c, sent.0)
    };
    let ((create, c, reply_sent), (report, offset)) =
        tokio::join!(fake_side, call(server.addr, &plan, t0));

    let instructions = create["response"]["instructions"].as_str().unwrap_or("");
    assert!(instructions.contains(greeting), "{create}");
    assert!(
        c.audio_in.iter().all(|&s| s.abs() < 64),
        "the caller was silent"
    );
    let first = report.first_audio_ms.expect("the greeting was heard") + offset;
    assert!(
        first >= reply_sent && first - reply_sent < 500.0,
        "greeting heard at {first} ms, sent at {reply_sent}"
    );
    let expected: Vec<i16> = audio
        .samples
        .iter()
        .map(|&s| Law::Ulaw.decode(Law::Ulaw.encode(s)))
        .collect();
    let corr = heard_correlation(&report, &expected);
    assert!(corr > 0.95, "greeting correlation {corr}");
    let summary = server.next_summary().await;
    assert!(
        has_transcript(&summary.transcript, Speaker::Agent, greeting),
        "{:?}",
        summary.transcript
    );
    server.stop.cancel();
}

/// Test 3: a tool call goes to the call session and its result comes back as
/// `function_call_output`, followed by `response.create`; a non-fatal `error` before it does
/// not end the call.
#[tokio::test]
async fn tool_call_round_trip_and_non_fatal_error() {
    let (logs, _guard) = call_logs::capture();
    let fake = FakeOpenAi::bind(KEY).await;
    let tool = json!({"type": "function", "name": "get_time", "description": "The current time",
                      "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}});
    let cfg = OpenAiRealtimeConfig {
        url: fake.url.clone(),
        api_key: SecretSource::Inline(KEY.into()),
        ..OpenAiRealtimeConfig::default()
    };
    let agent: SharedAgent = Arc::new(
        OpenAiRealtime::new(&cfg)
            .expect("agent config")
            .with_tools(vec![tool.clone()]),
    );
    let mut server = TestServer::start(agent).await;
    let audio = fixture("vm-goodbye.wav");
    let wire = to_wire(&audio.samples, ULAW);
    let plan = plan(SlinRate::Hz8000, silence(), 3.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        let update = set_up(&mut c, (ULAW, ULAW)).await;
        assert_eq!(
            update["session"]["tools"],
            json!([tool]),
            "the tool is declared"
        );
        assert_eq!(update["session"]["tool_choice"], "auto");
        c.send(json!({"type": "error", "event_id": "ev_e1", "error": {"type": "invalid_request_error",
              "code": "response_cancel_not_active", "message": "Cancellation failed: no active response found.", "param": null, "event_id": null}}))
            .await;
        let call_item = json!({"id": "item_f1", "type": "function_call", "status": "in_progress", "call_id": "call_42", "name": "get_time", "arguments": ""});
        c.send(json!({"type": "response.created", "response": {"id": "resp_f", "status": "in_progress", "output": []}})).await;
        c.send(json!({"type": "response.output_item.added", "response_id": "resp_f", "output_index": 0, "item": call_item})).await;
        c.send(json!({"type": "response.function_call_arguments.delta", "response_id": "resp_f", "item_id": "item_f1",
                      "output_index": 0, "call_id": "call_42", "delta": "{\"tz\":"})).await;
        c.send(json!({"type": "response.function_call_arguments.done", "response_id": "resp_f", "item_id": "item_f1",
                      "output_index": 0, "call_id": "call_42", "name": "get_time", "arguments": "{\"tz\":\"UTC\"}"})).await;
        c.send(json!({"type": "response.done", "response": {"id": "resp_f", "status": "completed", "output": [call_item]}})).await;
        let output = c.expect("conversation.item.create").await;
        let create = c.expect("response.create").await;
        // The model then speaks about the result.
        c.reply("resp_2", "item_a2", &wire, 800, "Goodbye.").await;
        c.drain(Duration::from_secs(10)).await;
        (output, create)
    };
    let ((output, create), (report, _)) = tokio::join!(fake_side, call(server.addr, &plan, t0));

    let item = &output["item"];
    assert_eq!(item["type"], "function_call_output");
    assert_eq!(item["call_id"], "call_42");
    let result: Value = serde_json::from_str(item["output"].as_str().expect("output is a string"))
        .expect("output is JSON");
    assert!(
        result["error"].as_str().unwrap_or("").contains("get_time"),
        "{result}"
    );
    assert_eq!(create["type"], "response.create");
    assert!(
        report.audible_frames_received > 20,
        "the reply after the tool was heard"
    );
    let summary = server.next_summary().await;
    assert_eq!(
        summary.outcome,
        Outcome::CallerHungUp,
        "a non-fatal error does not end the call"
    );
    server.stop.cancel();
    server.task.await.unwrap();
    // Every line of the call, the agent's and the tool runner's, carries the call id.
    logs.assert_every_call_line_has(
        plan.call_id,
        &["voicegate::agent::openai_realtime", "voicegate::tools"],
    );
}

/// A session with one declared tool, `get_time` (not in the call's registry, so each call
/// is answered at once with an "unknown tool" result).
fn tool_agent(url: &str) -> SharedAgent {
    let tool = json!({"type": "function", "name": "get_time", "description": "The current time",
                      "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}});
    let cfg = OpenAiRealtimeConfig {
        url: url.to_owned(),
        api_key: SecretSource::Inline(KEY.into()),
        ..OpenAiRealtimeConfig::default()
    };
    Arc::new(
        OpenAiRealtime::new(&cfg)
            .expect("agent config")
            .with_tools(vec![tool]),
    )
}

/// The events of a response that calls `get_time` once per id in `call_ids`, up to (not
/// including) its `response.done`.
async fn function_calls(c: &mut FakeConn, response_id: &str, call_ids: &[&str]) {
    c.send(json!({"type": "response.created", "response": {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": []}})).await;
    for (i, call_id) in call_ids.iter().enumerate() {
        let item_id = format!("item_{call_id}");
        let item = json!({"id": item_id, "type": "function_call", "status": "in_progress", "call_id": call_id, "name": "get_time", "arguments": ""});
        c.send(json!({"type": "response.output_item.added", "response_id": response_id, "output_index": i, "item": item})).await;
        c.send(json!({"type": "response.function_call_arguments.done", "response_id": response_id, "item_id": item_id,
                      "output_index": i, "call_id": call_id, "name": "get_time", "arguments": "{\"tz\":\"UTC\"}"})).await;
    }
}

/// Test 3b: tool outputs that come back while the response that called the tools is still
/// active wait for its `response.done`; two parallel calls get ONE `response.create`, after
/// both outputs. The fake refuses a `response.create` during an active response as the
/// server does, so sending it at once (the old behaviour) fails here.
#[tokio::test]
async fn tool_outputs_wait_for_response_done_and_parallel_calls_get_one_create() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(tool_agent(&fake.url)).await;
    let wire = to_wire(&fixture("vm-goodbye.wav").samples, ULAW);
    let plan = plan(SlinRate::Hz8000, silence(), 3.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c, (ULAW, ULAW)).await;
        function_calls(&mut c, "resp_f", &["call_a", "call_b"]).await;
        let first = c.expect("conversation.item.create").await;
        let second = c.expect("conversation.item.create").await;
        // The response is still active: nothing more may come.
        c.drain(Duration::from_millis(300)).await;
        let before_done = c.events.len();
        c.send(json!({"type": "response.done", "response": {"id": "resp_f", "object": "realtime.response", "status": "completed", "output": []}})).await;
        let create = c.expect("response.create").await;
        c.reply("resp_2", "item_a2", &wire, 800, "It is noon.")
            .await;
        c.drain(Duration::from_secs(10)).await;
        (first, second, before_done, create, c)
    };
    let ((first, second, before_done, create, c), (report, _)) =
        tokio::join!(fake_side, call(server.addr, &plan, t0));

    let ids: Vec<&str> = [&first, &second]
        .iter()
        .map(|e| e["item"]["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["call_a", "call_b"]);
    assert!(c.rejected.is_empty(), "refused: {:?}", c.rejected);
    assert_eq!(
        before_done, 3,
        "only the two outputs before response.done: {:?}",
        c.events
    );
    let creates = c
        .events
        .iter()
        .filter(|e| e["type"] == "response.create")
        .count();
    assert_eq!(creates, 1, "one response.create for both outputs");
    assert!(create["event_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(
        report.audible_frames_received > 20,
        "the reply after the tools was heard"
    );
    assert_eq!(server.next_summary().await.outcome, Outcome::CallerHungUp);
    server.stop.cancel();
}

/// Test 3c: the server starts a response of its own (server VAD heard the caller) just as
/// voicegate sends `response.create` for a tool output: the server refuses it with
/// `conversation_already_has_active_response`; voicegate sends it again after that
/// response's `response.done`, so the tool result is still spoken.
#[tokio::test]
async fn response_create_refused_by_an_active_response_is_sent_after_its_done() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(tool_agent(&fake.url)).await;
    let wire = to_wire(&fixture("vm-goodbye.wav").samples, ULAW);
    let plan = plan(SlinRate::Hz8000, silence(), 3.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c, (ULAW, ULAW)).await;
        function_calls(&mut c, "resp_f", &["call_a"]).await;
        c.send(json!({"type": "response.done", "response": {"id": "resp_f", "object": "realtime.response", "status": "completed", "output": []}})).await;
        c.expect("conversation.item.create").await;
        // Server VAD starts a response before it reads voicegate's response.create.
        c.send(json!({"type": "response.created", "response": {"id": "resp_vad", "object": "realtime.response", "status": "in_progress", "output": []}})).await;
        c.drain(Duration::from_millis(300)).await;
        let refused = c.rejected.len();
        c.send(json!({"type": "response.done", "response": {"id": "resp_vad", "object": "realtime.response", "status": "completed", "output": []}})).await;
        let again = c.expect("response.create").await;
        c.reply("resp_2", "item_a2", &wire, 800, "It is noon.")
            .await;
        c.drain(Duration::from_secs(10)).await;
        (refused, again, c)
    };
    let ((refused, again, c), (report, _)) = tokio::join!(fake_side, call(server.addr, &plan, t0));

    assert_eq!(
        refused, 1,
        "the first response.create met the active response"
    );
    assert_eq!(c.rejected.len(), 1, "and only that one");
    assert_ne!(c.rejected[0]["event_id"], again["event_id"]);
    assert!(
        report.audible_frames_received > 20,
        "the tool result was spoken"
    );
    assert_eq!(server.next_summary().await.outcome, Outcome::CallerHungUp);
    server.stop.cancel();
}

/// Test 3d: sessions end at their time limit (here a fake that expires them after 5 s;
/// OpenAI: 60 min). The agent sets up a new session before that, carries the conversation
/// over as items, switches when nothing is being said, and the call goes on there: no
/// fallback, no gap, the old socket closed by voicegate before it expired.
#[tokio::test]
async fn session_is_renewed_before_it_expires_and_the_call_goes_on() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(agent(&fake.url, |c| c.session_renew_s = 2)).await;
    let first = to_wire(&fixture("vm-goodbye.wav").samples, ULAW);
    let second_reply = fixture("auth-thankyou.wav").samples;
    let second = to_wire(&second_reply, ULAW);
    let plan = plan(SlinRate::Hz8000, fixture("hello-world.wav"), 9.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c1 = conn.expect("upgrade accepted");
        let expires_at = Instant::now() + Duration::from_secs(5);
        set_up(&mut c1, (ULAW, ULAW)).await;
        c1.wait_for_audio_ms(1_700).await;
        c1.caller_turn("item_u1", "Hello world.").await;
        c1.reply("resp_1", "item_a1", &first, 800, "Goodbye.").await;
        // The renewal connects while the first session is still live.
        let old = async {
            let r = tokio::time::timeout_at(expires_at, c1.drain(Duration::from_secs(10))).await;
            if r.is_err() {
                c1.expire().await;
            }
            r.is_ok()
        };
        let new = async {
            let (hs2, conn2) = fake.accept(None, t0).await;
            let mut c2 = conn2.expect("renewal upgrade accepted");
            assert_eq!(
                hs2.authorization.as_deref(),
                Some(format!("Bearer {KEY}").as_str())
            );
            set_up(&mut c2, (ULAW, ULAW)).await;
            let user = c2.expect("conversation.item.create").await;
            let agent_item = c2.expect("conversation.item.create").await;
            let switched_ms = c2.now_ms();
            c2.wait_for_audio_ms(300).await;
            c2.caller_turn("item_u2", "Thanks.").await;
            let (sent2, _) = c2
                .reply("resp_2", "item_a2", &second, 800, "Thank you.")
                .await;
            c2.drain(Duration::from_secs(10)).await;
            (user, agent_item, switched_ms, sent2)
        };
        let (closed, (user, agent_item, switched_ms, sent2)) = tokio::join!(old, new);
        (closed, user, agent_item, switched_ms, sent2)
    };
    let ((closed_before_expiry, user, agent_item, switched_ms, sent2), (report, offset)) =
        tokio::join!(fake_side, call(server.addr, &plan, t0));

    assert!(
        closed_before_expiry,
        "voicegate left the old session before it expired"
    );
    assert_eq!(
        user["item"],
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello world."}]})
    );
    assert_eq!(
        agent_item["item"],
        json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Goodbye."}]})
    );
    assert!(
        switched_ms > 2_000.0,
        "renewed after session_renew_s: {switched_ms}"
    );
    // The new session's reply reached the caller, with no hole in the stream.
    let c = heard_correlation_after(&report, &second_reply, sent2 - offset);
    assert!(c > 0.85, "second session's reply correlation {c}");
    assert!(report.gap_max_ms < 500.0, "max gap {}", report.gap_max_ms);
    let summary = server.next_summary().await;
    assert_eq!(summary.outcome, Outcome::CallerHungUp);
    assert!(has_transcript(
        &summary.transcript,
        Speaker::Agent,
        "Thank you."
    ));
    server.stop.cancel();
}

/// Correlation of what the caller heard from `from_ms` (call time) on with `reference`.
fn heard_correlation_after(report: &CallReport, reference: &[i16], from_ms: f64) -> f64 {
    let rx = decimate(&report.received.samples, report.rate_hz as usize / 8_000);
    let from = ((from_ms.max(0.0) * 8.0) as usize).min(rx.len());
    best_correlation(&rx[from..], reference, 8_000).0
}

/// Test 3e: a caller who stays silent. With `idle_timeout_ms` the server reports
/// `input_audio_buffer.timeout_triggered` and answers with a prompt of its own; after
/// `idle_prompts` (2) such prompts the next one is followed by a goodbye voicegate asks for,
/// and once it is said the call ends (the agent ended it, not a fallback).
#[tokio::test]
async fn a_silent_caller_is_prompted_then_told_goodbye() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(agent(&fake.url, |c| {
        c.idle_timeout_ms = Some(6_000);
        c.idle_prompts = 2;
    }))
    .await;
    let prompt = to_wire(&fixture("auth-thankyou.wav").samples, ULAW);
    let plan = plan(SlinRate::Hz8000, silence(), 12.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        let update = set_up(&mut c, (ULAW, ULAW)).await;
        for n in 1..=3 {
            c.wait_for_audio_ms(200 * n).await;
            c.send(
                json!({"type": "input_audio_buffer.timeout_triggered", "audio_start_ms": 0,
                          "audio_end_ms": 6000, "item_id": format!("item_t{n}")}),
            )
            .await;
            // The server's own response to the timeout.
            c.reply(
                &format!("resp_p{n}"),
                &format!("item_p{n}"),
                &prompt,
                800,
                "Are you still there?",
            )
            .await;
        }
        let bye = c.expect("response.create").await;
        c.reply("resp_bye", "item_bye", &prompt, 800, "Goodbye.")
            .await;
        c.drain(Duration::from_secs(10)).await;
        (update, bye, c)
    };
    let ((update, bye, c), (report, _)) = tokio::join!(fake_side, call(server.addr, &plan, t0));

    assert_eq!(
        update["session"]["audio"]["input"]["turn_detection"]["idle_timeout_ms"],
        6_000
    );
    assert!(
        bye["response"]["instructions"]
            .as_str()
            .unwrap()
            .contains("goodbye"),
        "{bye}"
    );
    let creates = c
        .events
        .iter()
        .filter(|e| e["type"] == "response.create")
        .count();
    assert_eq!(
        creates, 1,
        "only the goodbye was asked for; the prompts were the server's"
    );
    assert!(c.rejected.is_empty(), "{:?}", c.rejected);
    assert!(report.hangup_received, "voicegate ended the call");
    let summary = server.next_summary().await;
    assert_eq!(
        summary.outcome,
        Outcome::AgentEnded("the caller stayed silent".into())
    );
    server.stop.cancel();
}

/// Test 4a: a 16 kHz call: pcm16 at 24 kHz both ways, GA shapes and event names only (no
/// `OpenAI-Beta` header, which the real server and the fake refuse).
#[tokio::test]
async fn wideband_call_uses_pcm16_24k() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server =
        TestServer::start(agent(&fake.url, |c| c.model = "gpt-realtime-mini".into())).await;
    let speech = fixture("hello-world.wav");
    let reply = fixture("vm-goodbye.wav");
    let reply24 = resample_recording(&reply, 24_000).unwrap();
    let wire = to_wire(&reply24.samples, PCM24);
    let plan = plan(SlinRate::Hz16000, speech.clone(), 4.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (hs, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        let update = set_up(&mut c, (PCM24, PCM24)).await;
        c.wait_for_audio_ms(1_700).await;
        c.caller_turn("item_u1", "Hello world.").await;
        c.reply("resp_1", "item_a1", &wire, 4_800, "Goodbye.").await;
        c.drain(Duration::from_secs(10)).await;
        (hs, update, c)
    };
    let ((hs, update, c), (report, _)) = tokio::join!(fake_side, call(server.addr, &plan, t0));

    assert_eq!(hs.beta, None, "no preview header");
    assert_eq!(hs.uri, "/v1/realtime?model=gpt-realtime-mini");
    let s = &update["session"];
    assert_eq!(s["type"], "realtime");
    for gone in [
        "input_audio_format",
        "output_audio_format",
        "modalities",
        "voice",
    ] {
        assert!(s.get(gone).is_none(), "no beta field {gone}: {s}");
    }
    let pcm = json!({"type": "audio/pcm", "rate": 24000});
    assert_eq!(s["audio"]["input"]["format"], pcm);
    assert_eq!(s["audio"]["output"]["format"], pcm);
    assert_eq!(s["audio"]["output"]["voice"], "marin");
    assert_eq!(
        s["audio"]["input"]["transcription"]["model"],
        "gpt-4o-mini-transcribe"
    );

    // 20 ms of pcm16 at 24 kHz per append, and it is the caller's speech.
    assert!(
        c.append_sizes.iter().all(|&n| n == 960),
        "{:?}",
        &c.append_sizes[..4]
    );
    let (corr, _) = best_correlation(&decimate(&c.audio_in, 3), &speech.samples, 2_400);
    assert!(corr > 0.85, "caller audio correlation {corr}");
    // The caller heard the reply, converted to 16 kHz.
    let corr = heard_correlation(&report, &reply.samples);
    assert!(corr > 0.85, "reply correlation {corr}");
    assert!(
        (18.0..=22.0).contains(&report.gap_p50_ms),
        "gap p50 {}",
        report.gap_p50_ms
    );
    let summary = server.next_summary().await;
    assert!(
        has_transcript(&summary.transcript, Speaker::Agent, "Goodbye."),
        "{:?}",
        summary.transcript
    );
    assert!(has_transcript(
        &summary.transcript,
        Speaker::Caller,
        "Hello world."
    ));
    server.stop.cancel();
}

/// Test 4b: GA on an 8 kHz call asks for μ-law, but the server confirms pcm at 24 kHz: the
/// agent uses what `session.updated` says, both ways.
#[tokio::test]
async fn ga_uses_the_format_the_server_confirms() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(agent(&fake.url, |_| {})).await;
    let speech = fixture("hello-world.wav");
    let reply = fixture("auth-thankyou.wav");
    let wire = to_wire(&resample_recording(&reply, 24_000).unwrap().samples, PCM24);
    let plan = plan(SlinRate::Hz8000, speech.clone(), 4.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        let update = set_up(&mut c, (PCM24, PCM24)).await;
        c.wait_for_audio_ms(1_700).await;
        c.reply("resp_1", "item_a1", &wire, 4_800, "Thank you.")
            .await;
        c.drain(Duration::from_secs(10)).await;
        (update, c)
    };
    let ((update, c), (report, _)) = tokio::join!(fake_side, call(server.addr, &plan, t0));

    assert_eq!(
        update["session"]["audio"]["input"]["format"]["type"], "audio/pcmu",
        "asked for μ-law"
    );
    assert!(
        c.append_sizes.iter().all(|&n| n == 960),
        "sent pcm16 24 kHz as confirmed: {:?}",
        &c.append_sizes[..4]
    );
    let (corr, _) = best_correlation(&decimate(&c.audio_in, 3), &speech.samples, 2_400);
    assert!(corr > 0.85, "caller audio correlation {corr}");
    let corr = heard_correlation(&report, &reply.samples);
    assert!(corr > 0.85, "reply correlation {corr}");
    server.next_summary().await;
    server.stop.cancel();
}

/// A failed provider: the call falls back (0x00 to Asterisk) within 2 s of the failure.
async fn assert_fallback(
    server: &mut TestServer,
    report: &CallReport,
    offset: f64,
    failed_at: f64,
) -> String {
    assert!(report.hangup_received, "the caller got 0x00: {report:?}");
    let ended = offset + report.duration_ms;
    assert!(
        ended - failed_at < 2_000.0,
        "call ended {} ms after the failure",
        ended - failed_at
    );
    let summary = server.next_summary().await;
    match summary.outcome {
        Outcome::Fallback(reason) => {
            assert!(!reason.contains("9f8e7d6c5b4a"), "the key leaked: {reason}");
            reason
        }
        other => panic!("expected a fallback, got {other:?}"),
    }
}

/// Test 5a: the server refuses the upgrade (a wrong key gets 401).
#[tokio::test]
async fn refused_upgrade_falls_back() {
    let fake = FakeOpenAi::bind("sk-the-right-key").await;
    let mut server = TestServer::start(agent(&fake.url, |_| {})).await;
    let plan = plan(SlinRate::Hz8000, fixture("hello-world.wav"), 5.0);
    let t0 = Instant::now();
    let fake_side = async { fake.accept(None, t0).await };
    let ((hs, conn), (report, offset)) = tokio::join!(fake_side, call(server.addr, &plan, t0));
    assert!(conn.is_none());
    assert_eq!(
        hs.authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    let reason = assert_fallback(&mut server, &report, offset, 0.0).await;
    assert!(reason.contains("401"), "{reason}");
    server.stop.cancel();
}

/// Test 5b: the server drops the connection mid-call (no close frame).
#[tokio::test]
async fn connection_lost_mid_call_falls_back() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(agent(&fake.url, |_| {})).await;
    let plan = plan(SlinRate::Hz8000, fixture("hello-world.wav"), 6.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c, (ULAW, ULAW)).await;
        c.wait_for_audio_ms(500).await;
        let t = c.now_ms();
        drop(c);
        t
    };
    let (closed_at, (report, offset)) = tokio::join!(fake_side, call(server.addr, &plan, t0));
    let reason = assert_fallback(&mut server, &report, offset, closed_at).await;
    assert!(reason.contains("closed"), "{reason}");
    server.stop.cancel();
}

/// Test 5c: no `session.created` within the connect timeout.
#[tokio::test]
async fn silent_server_times_out_and_falls_back() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(agent(&fake.url, |c| c.connect_timeout_ms = 400)).await;
    let plan = plan(SlinRate::Hz8000, fixture("hello-world.wav"), 5.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        let accepted = c.now_ms();
        c.drain(Duration::from_secs(5)).await;
        accepted
    };
    let (accepted_at, (report, offset)) = tokio::join!(fake_side, call(server.addr, &plan, t0));
    let reason = assert_fallback(&mut server, &report, offset, accepted_at + 400.0).await;
    assert!(reason.contains("session.created"), "{reason}");
    server.stop.cancel();
}

/// Test 5d: a fatal `error` event (the session cap, §1.8) ends the call with a fallback, and
/// the key the error message echoes reaches neither the log nor the call record.
#[tokio::test]
async fn fatal_error_event_falls_back_and_the_key_never_reaches_the_log() {
    // Current-thread runtime: every task of this test logs on this thread.
    let (logs, _guard) = call_logs::capture();

    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(agent(&fake.url, |_| {})).await;
    let plan = plan(SlinRate::Hz8000, fixture("hello-world.wav"), 6.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c, (ULAW, ULAW)).await;
        c.wait_for_audio_ms(400).await;
        let t = c
            .send(json!({"type": "error", "event_id": "ev_x", "error": {"type": "invalid_request_error", "code": "session_expired",
                  "message": format!("Your session hit the maximum duration of 60 minutes. (key {KEY})"), "param": null, "event_id": null}}))
            .await;
        c.drain(Duration::from_secs(5)).await;
        t
    };
    let (error_at, (report, offset)) = tokio::join!(fake_side, call(server.addr, &plan, t0));
    let reason = assert_fallback(&mut server, &report, offset, error_at).await;
    assert!(reason.contains("session_expired"), "{reason}");
    server.stop.cancel();
    let text = logs.text();
    assert!(text.contains("session_expired"), "the failure is logged");
    assert!(
        !text.contains("9f8e7d6c5b4a"),
        "the key reached the log:\n{text}"
    );
}

/// Keypad digits while the agent talks: the reply stops (truncated at what was heard), and
/// the digits reach the model as one user message with a response asked for.
#[tokio::test]
async fn keypad_digits_interrupt_and_become_a_user_message() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(agent(&fake.url, |_| {})).await;
    let reply_audio = concat(&["hello-world.wav", "vm-goodbye.wav", "auth-thankyou.wav"]);
    let reply_frames = reply_audio.len() / 160;
    let reply_wire = to_wire(&reply_audio, ULAW);
    let mut plan = plan(SlinRate::Hz8000, silence(), 4.0);
    plan.dtmf = vec![
        ('4', Duration::from_millis(1_500)),
        ('2', Duration::from_millis(1_650)),
        ('#', Duration::from_millis(1_800)),
    ];
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c, (ULAW, ULAW)).await;
        // The agent greets with 3.2 s of audio, sent as a burst.
        c.reply("resp_1", "item_a1", &reply_wire, 800, REPLY_TEXT)
            .await;
        let truncate = c.expect("conversation.item.truncate").await;
        let item = c.expect("conversation.item.create").await;
        let create = c.expect("response.create").await;
        c.drain(Duration::from_secs(10)).await;
        (truncate, item, create)
    };
    let ((truncate, item, create), (report, _)) =
        tokio::join!(fake_side, call(server.addr, &plan, t0));

    // Cut at what the caller heard: the greeting started at once, the first digit 1.5 s in.
    assert_eq!(truncate["item_id"], "item_a1");
    let end = truncate["audio_end_ms"].as_u64().unwrap();
    assert!((1_000..=1_700).contains(&end), "audio_end_ms {end}");
    assert!(
        (report.audible_frames_received as usize) < reply_frames * 2 / 3,
        "{} of {reply_frames} reply frames heard",
        report.audible_frames_received
    );
    assert_eq!(
        item["item"],
        json!({"type": "message", "role": "user",
               "content": [{"type": "input_text", "text": "(The caller typed 42# on the phone keypad.)"}]})
    );
    assert_eq!(create["type"], "response.create");
    let summary = server.next_summary().await;
    assert_eq!(summary.dtmf, "42#");
    assert!(has_transcript(
        &summary.transcript,
        Speaker::Caller,
        "(The caller typed 42# on the phone keypad.)"
    ));
    server.stop.cancel();
}
