//! The ElevenLabs Agents provider against a fake ElevenLabs server speaking the real
//! Conversational AI WebSocket format (providers.md §2) on 127.0.0.1:0, with calls through
//! the real AudioSocket listener driven by real recordings.

// tungstenite's handshake callback returns its own large `Result`.
#![allow(clippy::result_large_err)]

use crate::call_logs;
use crate::common;
use crate::support;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::{TestServer, fixture};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::{HttpServer, Reply};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use voicegate::agent::Speaker;
use voicegate::audio::g711::Law;
use voicegate::audiosocket::SlinRate;
use voicegate::call::Outcome;
use voicegate::call::route::ServerParams;
use voicegate::caller::{CallPlan, CallReport, best_correlation, place_call, resample_recording};
use voicegate::config::{AgentConfig, Config, ElevenlabsAgentConfig};
use voicegate::tools::ToolRegistry;

/// A fake ElevenLabs Agents server: hands each accepted conversation to the test.
///
/// Shapes and rules from elevenlabs/packages `schemas/agent.asyncapi.yaml`: every client
/// message must be one of the contract's client messages with its required fields
/// (`UserAudioPayload`, `PongPayload`, `UserMessagePayload`, `ClientToolResultPayload`,
/// `ContextualUpdatePayload`, `ConversationInitiationPayload`, …); anything else gets an
/// `error` event (`ErrorPayload`: `error_event` with `code` 1008, `error_type`
/// `invalid_message`) and a close with 1008, as the server does. With
/// [`FakeEleven::forbid_overrides`], a `conversation_config_override` is refused the same way
/// with `override_error` (the agent's security settings allow no overrides).
struct FakeEleven {
    addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<FakeConn>,
    overrides_allowed: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeEleven {
    /// From now on, conversations refuse client overrides.
    fn forbid_overrides(&self) {
        self.overrides_allowed
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let overrides_allowed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let allowed = overrides_allowed.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mut uri = String::new();
                let accepted = tokio_tungstenite::accept_hdr_async(
                    stream,
                    |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                        uri = req.uri().to_string();
                        Ok(resp)
                    },
                )
                .await;
                if let Ok(ws) = accepted {
                    let _ = tx.send(FakeConn {
                        ws,
                        uri,
                        audio: Vec::new(),
                        chunk_sizes: Vec::new(),
                        control: VecDeque::new(),
                        overrides_allowed: allowed.load(std::sync::atomic::Ordering::Relaxed),
                        refused: None,
                    });
                }
            }
        });
        FakeEleven {
            addr,
            conns: rx,
            overrides_allowed,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/convai/conversation", self.addr)
    }

    async fn next_conn(&mut self) -> FakeConn {
        tokio::time::timeout(Duration::from_secs(5), self.conns.recv())
            .await
            .expect("voicegate connected in time")
            .expect("fake running")
    }
}

/// One conversation on the fake server.
struct FakeConn {
    ws: WebSocketStream<TcpStream>,
    /// Request target of the upgrade (path and query).
    uri: String,
    /// Caller audio received, decoded from base64, in the negotiated input format.
    audio: Vec<u8>,
    /// Bytes in each `user_audio_chunk`.
    chunk_sizes: Vec<usize>,
    /// Messages other than audio, not yet taken.
    control: VecDeque<Value>,
    /// Whether `conversation_config_override` is accepted.
    overrides_allowed: bool,
    /// Why the fake closed the conversation with 1008, if it did.
    refused: Option<String>,
}

/// Why the contract refuses client message `v` (`None`: it is fine).
fn contract_violation(v: &Value, overrides_allowed: bool) -> Option<(&'static str, String)> {
    let field = |name: &str| v.get(name);
    let invalid = |what: &str| Some(("invalid_message", format!("{what}: {v}")));
    match v["type"].as_str() {
        Some("pong") if !field("event_id").is_some_and(Value::is_i64) => {
            invalid("pong needs an integer event_id")
        }
        Some("user_message") if !field("text").is_some_and(|t| t.is_string() || t.is_null()) => {
            invalid("user_message needs text")
        }
        Some("contextual_update") if !field("text").is_some_and(Value::is_string) => {
            invalid("contextual_update needs text")
        }
        Some("client_tool_result")
            if !(field("tool_call_id").is_some_and(Value::is_string)
                && field("result").is_some_and(Value::is_string)
                && field("is_error").is_some_and(Value::is_boolean)) =>
        {
            invalid("client_tool_result needs tool_call_id, result (string), is_error")
        }
        Some("conversation_initiation_client_data")
            if !overrides_allowed && field("conversation_config_override").is_some() =>
        {
            Some((
                "override_error",
                "Override for field 'agent' is not allowed by config.".to_owned(),
            ))
        }
        Some(
            "pong"
            | "user_message"
            | "user_activity"
            | "feedback"
            | "client_tool_result"
            | "mcp_tool_approval_result"
            | "contextual_update"
            | "conversation_initiation_client_data"
            | "multimodal_message",
        ) => None,
        _ => invalid("unknown client message"),
    }
}

impl FakeConn {
    async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send to voicegate");
    }

    /// Reads one message from voicegate, sorting audio from control messages. `false` when
    /// the connection is gone.
    async fn read_one(&mut self) -> bool {
        match self.ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("voicegate sends JSON");
                if let Some(b64) = v.get("user_audio_chunk") {
                    assert!(v.get("type").is_none(), "audio chunks carry no type (§2.3)");
                    let bytes = B64
                        .decode(b64.as_str().expect("base64 string"))
                        .expect("valid base64");
                    self.chunk_sizes.push(bytes.len());
                    self.audio.extend_from_slice(&bytes);
                } else {
                    if let Some((error_type, message)) =
                        contract_violation(&v, self.overrides_allowed)
                    {
                        let e = json!({"type": "error", "error_event": {"code": 1008,
                            "message": message, "error_type": error_type, "reason": error_type}});
                        let _ = self.ws.send(Message::text(e.to_string())).await;
                        let _ = self
                            .ws
                            .close(Some(CloseFrame {
                                code: CloseCode::Policy,
                                reason: error_type.into(),
                            }))
                            .await;
                        self.refused = Some(message);
                        return false;
                    }
                    self.control.push_back(v);
                }
                true
            }
            Some(Ok(_)) => true,
            _ => false,
        }
    }

    /// The next control message (audio keeps being collected meanwhile).
    async fn next_control(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(v) = self.control.pop_front() {
                    return v;
                }
                assert!(self.read_one().await, "voicegate closed the conversation");
            }
        })
        .await
        .expect("a control message in time")
    }

    /// Reads until at least `bytes` of caller audio arrived.
    async fn collect_audio(&mut self, bytes: usize) {
        tokio::time::timeout(Duration::from_secs(8), async {
            while self.audio.len() < bytes {
                assert!(self.read_one().await, "voicegate closed the conversation");
            }
        })
        .await
        .expect("caller audio in time")
    }

    /// Keeps reading in the background (so voicegate's sends never block) until closed.
    fn pump(mut self) -> tokio::task::JoinHandle<FakeConn> {
        tokio::spawn(async move {
            while self.read_one().await {}
            self
        })
    }

    async fn metadata(&mut self, format: &str) {
        self.send(json!({
            "type": "conversation_initiation_metadata",
            "conversation_initiation_metadata_event": {
                "conversation_id": "conv_test",
                "agent_output_audio_format": format,
                "user_input_audio_format": format,
            }
        }))
        .await;
    }

    /// Sends `samples` (8 kHz slin) as agent audio in `format`, in 100 ms events, all at
    /// once (faster than real time). Returns the next free event id.
    async fn speak(&mut self, format: &str, samples: &[i16], first_event_id: i64) -> i64 {
        let wire = encode(format, samples);
        self.speak_wire(format, &wire, first_event_id).await
    }

    /// As [`Self::speak`], with audio already in `format`.
    async fn speak_wire(&mut self, format: &str, wire: &[u8], first_event_id: i64) -> i64 {
        let per_100ms = bytes_per_ms(format) * 100;
        let mut id = first_event_id;
        for chunk in wire.chunks(per_100ms) {
            self.send(json!({"type": "audio", "audio_event": {"audio_base_64": B64.encode(chunk), "event_id": id}}))
                .await;
            id += 1;
        }
        id
    }

    async fn close(&mut self, code: CloseCode, reason: &str) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code,
                reason: reason.to_owned().into(),
            }))
            .await;
        // Let the close handshake finish.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.read_one().await {}
        })
        .await;
    }
}

fn bytes_per_ms(format: &str) -> usize {
    match format {
        "ulaw_8000" => 8,
        "pcm_16000" => 32,
        other => panic!("test format {other}"),
    }
}

/// 8 kHz slin → the wire format, the way ElevenLabs would send it.
fn encode(format: &str, samples: &[i16]) -> Vec<u8> {
    let mut out = Vec::new();
    match format {
        "ulaw_8000" => Law::Ulaw.encode_into(samples, &mut out),
        "pcm_16000" => {
            let rec = voicegate::audio::wav::Recording {
                rate_hz: 8_000,
                samples: samples.to_vec(),
            };
            let up = resample_recording(&rec, 16_000).unwrap();
            voicegate::audio::slin_to_le_bytes(&up.samples, &mut out);
        }
        other => panic!("test format {other}"),
    }
    out
}

/// The wire format → slin at the format's rate.
fn decode(format: &str, bytes: &[u8]) -> Vec<i16> {
    let mut out = Vec::new();
    match format {
        "ulaw_8000" => Law::Ulaw.decode_into(bytes, &mut out),
        "pcm_16000" => voicegate::audio::slin_from_le_bytes(bytes, &mut out),
        other => panic!("test format {other}"),
    }
    out
}

fn config(url: String) -> ElevenlabsAgentConfig {
    ElevenlabsAgentConfig {
        url,
        agent_id: "agent_42".into(),
        prompt: Some("You answer the phone for a tyre shop.".into()),
        first_message: Some("Привіт! Чим можу допомогти?".into()),
        language: Some("uk".into()),
        ..Default::default()
    }
}

async fn server(cfg: ElevenlabsAgentConfig, tools: ToolRegistry) -> TestServer {
    let agent = voicegate::agent::from_config(&AgentConfig::ElevenlabsAgent(cfg)).expect("agent");
    let params = ServerParams::from_config(&Default::default()).with_tools(Arc::new(tools));
    TestServer::start_with(agent, params).await
}

fn plan(seconds: f64) -> CallPlan {
    CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate: SlinRate::Hz8000,
        speech: fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: vec![],
        duration: Duration::from_secs_f64(seconds),
    }
}

fn call(server: &TestServer, plan: &CallPlan) -> tokio::task::JoinHandle<CallReport> {
    let addr = server.addr;
    let plan = plan.clone();
    tokio::spawn(async move { place_call(addr, &plan).await.expect("call") })
}

/// Correlation of `needle` with the caller's received audio, searched around `around_ms`
/// (± `window_ms`) from the call's start.
/// `needle` is 8 kHz; it is resampled to the call's rate.
fn heard(report: &CallReport, needle: &[i16], around_ms: u64, window_ms: u64) -> f64 {
    let rx = &report.received.samples;
    let spms = report.rate_hz as u64 / 1000;
    let needle = voicegate::audio::wav::Recording {
        rate_hz: 8_000,
        samples: needle.to_vec(),
    };
    let needle = resample_recording(&needle, report.rate_hz).unwrap().samples;
    let start = (around_ms.saturating_sub(window_ms) * spms) as usize;
    if start >= rx.len() {
        return 0.0;
    }
    best_correlation(&rx[start..], &needle, (2 * window_ms * spms) as usize).0
}

async fn conversation(format: &str, call_rate: SlinRate) {
    let mut fake = FakeEleven::start().await;
    let mut server = server(config(fake.url()), ToolRegistry::empty()).await;
    let mut p = plan(6.0);
    p.rate = call_rate;
    p.dtmf = vec![('5', Duration::from_millis(1000))];
    // Encoded before the call: the test runtime's one thread must keep the call going.
    let thanks = fixture("auth-thankyou.wav").samples;
    let thanks_wire = encode(format, &thanks);
    let t0 = Instant::now();
    let caller = call(&server, &p);
    let mut conn = fake.next_conn().await;
    assert!(
        conn.uri.starts_with("/v1/convai/conversation?"),
        "{}",
        conn.uri
    );
    assert!(conn.uri.contains("agent_id=agent_42"), "{}", conn.uri);

    // The first message: client data with dynamic variables and overrides (§2.2).
    let init = conn.next_control().await;
    assert_eq!(init["type"], "conversation_initiation_client_data");
    assert_eq!(init["dynamic_variables"]["call_id"], p.call_id.to_string());
    assert_eq!(init["dynamic_variables"]["caller_number"], "unknown");
    let over = &init["conversation_config_override"]["agent"];
    assert_eq!(
        over["prompt"]["prompt"],
        "You answer the phone for a tyre shop."
    );
    assert_eq!(over["first_message"], "Привіт! Чим можу допомогти?");
    assert_eq!(over["language"], "uk");
    assert!(
        conn.audio.is_empty(),
        "no audio before the formats are known"
    );

    conn.metadata(format).await;
    conn.send(json!({"type": "ping", "ping_event": {"event_id": 7, "ping_ms": null}}))
        .await;
    let pong = conn.next_control().await;
    assert_eq!(pong, json!({"type": "pong", "event_id": 7}));

    // The caller's speech arrives in the agent's input format.
    let bpm = bytes_per_ms(format);
    conn.collect_audio(1_700 * bpm).await;
    assert_eq!(conn.audio.len() % (bpm / 8), 0);
    for &size in &conn.chunk_sizes[1..] {
        assert!(
            size >= 40 * bpm && size < 80 * bpm,
            "chunk of {size} bytes is not ~40 ms"
        );
    }
    // Compared after the call: the test runtime has one thread and must keep the call going.
    let uplink = decode(format, &conn.audio);
    // The DTMF digit reached the agent as a caller turn it answers (a user_message, 1 s
    // after the digit), not as silent context.
    let turn = conn.next_control().await;
    assert_eq!(turn["type"], "user_message");
    assert_eq!(turn["text"], "(The caller pressed the phone key 5.)");

    // The agent answers, faster than real time.
    conn.send(json!({"type": "user_transcript", "user_transcription_event": {"user_transcript": "Hello, world."}})).await;
    conn.send(
        json!({"type": "agent_response", "agent_response_event": {"agent_response": "Thank you."}}),
    )
    .await;
    let sent_at = t0.elapsed().as_millis() as u64;
    conn.speak_wire(format, &thanks_wire, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The agent ends the conversation: voicegate lets the reply play out, then hangs up.
    conn.close(CloseCode::Normal, "conversation ended").await;

    let report = tokio::time::timeout(Duration::from_secs(6), caller)
        .await
        .expect("call ended")
        .unwrap();
    assert!(report.hangup_received, "0x00 after the agent ended");
    if let Some(first) = report.first_audio_ms {
        eprintln!(
            "{format} on a {} Hz call: first agent audio sent at {sent_at} ms, first audible frame at the caller at {first:.0} ms (the recording starts with 100 ms below the audible threshold)",
            call_rate.hz()
        );
    }
    let c = heard(&report, &thanks, sent_at, 300);
    assert!(
        c > 0.9,
        "the agent's reply reached the caller (correlation {c})"
    );
    let rate = if format == "ulaw_8000" { 8_000 } else { 16_000 };
    let speech = resample_recording(&fixture("hello-world.wav"), rate).unwrap();
    // The speech starts 100 ms into the call; compare its first second, within 150 ms.
    let needle = &speech.samples[..rate as usize];
    let (corr, lag) = best_correlation(&uplink, needle, rate as usize * 3 / 20);
    assert!(
        corr > 0.9,
        "caller speech reached the agent (correlation {corr})"
    );
    assert!(
        lag >= 0 && (lag as usize) < rate as usize * 3 / 20,
        "lag {lag}"
    );

    // No hole the caller would hear as a break (a loaded machine delays single ticks by
    // 100–200 ms; those are not what this checks).
    assert!(
        report.gap_max_ms < 500.0,
        "paced playout, max gap {}",
        report.gap_max_ms
    );
    let s = server.next_summary().await;
    assert_eq!(s.agent, "elevenlabs_agent");
    assert!(
        matches!(&s.outcome, Outcome::AgentEnded(r) if r.contains("conversation ended")),
        "{:?}",
        s.outcome
    );
    assert!(
        s.transcript
            .contains(&(Speaker::Caller, "Hello, world.".into()))
    );
    assert!(
        s.transcript
            .contains(&(Speaker::Agent, "Thank you.".into()))
    );
    server.stop.cancel();
}

#[tokio::test]
async fn conversation_in_ulaw_8000() {
    conversation("ulaw_8000", SlinRate::Hz8000).await;
}

#[tokio::test]
async fn conversation_in_ulaw_8000_on_a_16khz_call() {
    conversation("ulaw_8000", SlinRate::Hz16000).await;
}

#[tokio::test]
async fn conversation_in_pcm_16000_taken_from_the_metadata() {
    conversation("pcm_16000", SlinRate::Hz8000).await;
}

#[tokio::test]
async fn interruption_flushes_playout_and_drops_stale_audio() {
    let mut fake = FakeEleven::start().await;
    let mut server = server(config(fake.url()), ToolRegistry::empty()).await;
    let p = plan(5.0);
    let t0 = Instant::now();
    let caller = call(&server, &p);
    let mut conn = fake.next_conn().await;
    conn.next_control().await;
    conn.metadata("ulaw_8000").await;
    // A long reply (4.1 s), all at once.
    let long = fixture("invalid.wav").samples;
    conn.send(json!({"type": "agent_response", "agent_response_event": {
        "agent_response": "Our opening hours are nine to five on weekdays and ten to two on Saturdays.", "event_id": 1}}))
        .await;
    let next_id = conn.speak("ulaw_8000", &long, 1).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The caller talks over it.
    conn.send(json!({"type": "interruption", "interruption_event": {"event_id": next_id - 1}}))
        .await;
    // The server says what the caller actually heard of that reply.
    conn.send(json!({"type": "agent_response_correction", "agent_response_correction_event": {
        "original_agent_response": "Our opening hours are nine to five on weekdays and ten to two on Saturdays.",
        "corrected_agent_response": "Our opening hours are", "event_id": next_id}}))
        .await;
    conn.send(json!({"type": "user_transcript", "user_transcription_event": {"user_transcript": "Thanks.", "event_id": next_id}}))
        .await;
    // Audio generated before the interruption that arrives late must not play: 1 s of it.
    conn.speak("ulaw_8000", &long[8_000..16_000], next_id - 10)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let thanks = fixture("auth-thankyou.wav").samples;
    let sent_at = t0.elapsed().as_millis() as u64;
    conn.speak("ulaw_8000", &thanks, next_id).await;
    let pump = conn.pump();

    let report = caller.await.unwrap();
    let s = server.next_summary().await;
    assert_eq!(s.barge_ins, 1, "playout flushed once");
    // The record keeps what the caller heard, not what the agent meant to say.
    let agent_lines: Vec<&str> = s
        .transcript
        .iter()
        .filter(|(who, _)| *who == Speaker::Agent)
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(agent_lines, ["Our opening hours are"]);
    // About 1 s of the long reply plus the 0.96 s answer were heard (1.5 s audible
    // measured); without the flush (4.1 s more) or with the stale audio (+1 s: 2.5 s
    // measured) there would be more.
    let audible_ms = report.audible_frames_received * 20;
    assert!(audible_ms < 2_000, "heard {audible_ms} ms of agent audio");
    let c = heard(&report, &thanks, sent_at, 500);
    assert!(
        c > 0.9,
        "the reply after the interruption played (correlation {c})"
    );
    assert_eq!(s.outcome, Outcome::CallerHungUp);
    server.stop.cancel();
    drop(pump);
}

fn tools_registry(http: SocketAddr) -> ToolRegistry {
    let text = format!(
        r#"
[[tools]]
name = "search_tires"
description = "Find tyres in stock by size"
url = "http://{http}/tires"
[tools.parameters]
type = "object"
required = ["size"]
[tools.parameters.properties.size]
type = "string"

[[tools]]
kind = "hangup"
"#
    );
    let c = Config::from_toml(&text, Path::new("t.toml")).unwrap();
    ToolRegistry::from_config(&c.tools).unwrap()
}

#[tokio::test]
async fn client_tool_calls_round_trip_and_hangup_follows_the_goodbye() {
    let (logs, _guard) = call_logs::capture();
    let stock = json!({"in_stock": 4, "brand": "Nokian"});
    let mut http = HttpServer::start(Reply::Json(stock.to_string())).await;
    let mut fake = FakeEleven::start().await;
    let mut server = server(config(fake.url()), tools_registry(http.addr)).await;
    let p = plan(10.0);
    let caller = call(&server, &p);
    let mut conn = fake.next_conn().await;
    conn.next_control().await;
    conn.metadata("ulaw_8000").await;

    let asked = Instant::now();
    conn.send(json!({"type": "client_tool_call", "client_tool_call": {
        "tool_name": "search_tires", "tool_call_id": "tc_1", "parameters": {"size": "205/55 R16"}}}))
        .await;
    let req = http.next_request().await;
    let body = req.json();
    assert_eq!(body["arguments"]["size"], "205/55 R16");
    assert_eq!(body["call_id"], p.call_id.to_string());
    assert_eq!(body["tool_call_id"], "tc_1");
    let result = conn.next_control().await;
    eprintln!(
        "client_tool_call -> HTTP tool -> client_tool_result: {} ms",
        asked.elapsed().as_millis()
    );
    assert_eq!(result["type"], "client_tool_result");
    assert_eq!(result["tool_call_id"], "tc_1");
    assert_eq!(result["is_error"], false);
    let text = result["result"]
        .as_str()
        .expect("result is a string (§2.3)");
    assert_eq!(serde_json::from_str::<Value>(text).unwrap(), stock);

    // A tool the agent knows but voicegate does not: an error result.
    conn.send(json!({"type": "client_tool_call", "client_tool_call": {
        "tool_name": "book_appointment", "tool_call_id": "tc_2", "parameters": {}}}))
        .await;
    let result = conn.next_control().await;
    assert_eq!(result["tool_call_id"], "tc_2");
    assert_eq!(result["is_error"], true);

    // Goodbye, then the hangup tool: the caller hears all of it, then 0x00.
    let goodbye = fixture("vm-goodbye.wav").samples;
    conn.speak("ulaw_8000", &goodbye, 1).await;
    conn.send(json!({"type": "client_tool_call", "client_tool_call": {
        "tool_name": "hangup", "tool_call_id": "tc_3", "parameters": {}}}))
        .await;
    let pump = conn.pump();
    let report = tokio::time::timeout(Duration::from_secs(6), caller)
        .await
        .expect("ended")
        .unwrap();
    assert!(report.hangup_received);
    let rx = &report.received.samples;
    let tail = &goodbye[goodbye.len() - 2_400..];
    let from = rx.len().saturating_sub(8_000);
    let (c, _) = best_correlation(&rx[from..], tail, 8_000);
    assert!(
        c > 0.9,
        "the end of the goodbye was played before the hangup (correlation {c})"
    );
    let s = server.next_summary().await;
    assert_eq!(
        s.outcome,
        Outcome::AgentEnded("agent hung up (hangup tool)".into())
    );
    server.stop.cancel();
    drop(pump);
    // Every line of the call, the agent's and the tool runner's, carries the call id.
    logs.assert_every_call_line_has(
        p.call_id,
        &["voicegate::agent::elevenlabs_agent", "voicegate::tools"],
    );
}

async fn falls_back(
    server: &mut TestServer,
    caller: tokio::task::JoinHandle<CallReport>,
    detail: &str,
) {
    let report = tokio::time::timeout(Duration::from_secs(6), caller)
        .await
        .expect("call ended")
        .unwrap();
    assert!(
        report.hangup_received,
        "0x00 sends the caller to the dialplan fallback"
    );
    let s = server.next_summary().await;
    assert!(
        matches!(&s.outcome, Outcome::Fallback(e) if e.contains(detail)),
        "{:?}",
        s.outcome
    );
}

#[tokio::test]
async fn provider_error_close_ends_in_fallback() {
    let mut fake = FakeEleven::start().await;
    let mut server = server(config(fake.url()), ToolRegistry::empty()).await;
    let p = plan(8.0);
    let caller = call(&server, &p);
    let mut conn = fake.next_conn().await;
    conn.next_control().await;
    conn.metadata("ulaw_8000").await;
    conn.collect_audio(400 * 8).await;
    conn.close(CloseCode::Error, "internal error").await;
    falls_back(&mut server, caller, "1011").await;
    server.stop.cancel();
}

/// The agent does not allow the overrides voicegate sends: the server answers with an
/// `error_event` (`override_error`) and closes with 1008; the call falls back and the record
/// names the code, the type and the reason.
#[tokio::test]
async fn refused_overrides_end_in_fallback_naming_the_error() {
    let mut fake = FakeEleven::start().await;
    fake.forbid_overrides();
    let mut server = server(config(fake.url()), ToolRegistry::empty()).await;
    let caller = call(&server, &plan(8.0));
    let mut conn = fake.next_conn().await;
    assert!(!conn.read_one().await, "the fake closes the conversation");
    assert!(conn.refused.is_some());
    falls_back(&mut server, caller, "error_event 1008: override_error").await;
    server.stop.cancel();
}

#[tokio::test]
async fn dropped_connection_ends_in_fallback() {
    let mut fake = FakeEleven::start().await;
    let mut server = server(config(fake.url()), ToolRegistry::empty()).await;
    let caller = call(&server, &plan(8.0));
    let mut conn = fake.next_conn().await;
    conn.next_control().await;
    conn.metadata("ulaw_8000").await;
    conn.collect_audio(200 * 8).await;
    drop(conn); // TCP closed without a close frame
    falls_back(&mut server, caller, "elevenlabs_agent").await;
    server.stop.cancel();
}

#[tokio::test]
async fn missing_metadata_and_refused_connection_end_in_fallback() {
    let mut fake = FakeEleven::start().await;
    let mut cfg = config(fake.url());
    cfg.connect_timeout_ms = 500;
    let mut server = server(cfg, ToolRegistry::empty()).await;
    let caller = call(&server, &plan(8.0));
    let _conn = fake.next_conn().await; // accepts, never answers
    falls_back(&mut server, caller, "conversation_initiation_metadata").await;
    server.stop.cancel();

    let mut server = server_refused().await;
    let caller = call(&server, &plan(8.0));
    falls_back(&mut server, caller, "cannot connect").await;
    server.stop.cancel();
}

async fn server_refused() -> TestServer {
    // A port nothing listens on.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    server(
        config(format!("ws://{addr}/v1/convai/conversation")),
        ToolRegistry::empty(),
    )
    .await
}

#[tokio::test]
async fn private_agent_connects_through_a_signed_url() {
    let mut fake = FakeEleven::start().await;
    let signed = format!(
        "ws://{}/v1/convai/conversation?agent_id=agent_42&token=tok123",
        fake.addr
    );
    let mut http = HttpServer::start(Reply::Json(json!({"signed_url": signed}).to_string())).await;
    let mut cfg = config("wss://unused.invalid/v1/convai/conversation".into());
    cfg.api_key = Some(voicegate::secret::SecretSource::Inline("xi-secret".into()));
    cfg.signed_url_endpoint = format!("http://{}/v1/convai/conversation/get-signed-url", http.addr);
    let mut server = server(cfg, ToolRegistry::empty()).await;
    let caller = call(&server, &plan(3.0));
    let req = http.next_request().await;
    assert_eq!(req.method, "GET");
    assert_eq!(
        req.target,
        "/v1/convai/conversation/get-signed-url?agent_id=agent_42"
    );
    assert_eq!(
        req.headers.get("xi-api-key").map(String::as_str),
        Some("xi-secret")
    );
    let mut conn = fake.next_conn().await;
    assert!(conn.uri.contains("token=tok123"), "{}", conn.uri);
    assert_eq!(
        conn.next_control().await["type"],
        "conversation_initiation_client_data"
    );
    conn.metadata("ulaw_8000").await;
    let pump = conn.pump();
    let report = caller.await.unwrap();
    assert!(!report.hangup_received);
    assert_eq!(server.next_summary().await.outcome, Outcome::CallerHungUp);
    server.stop.cancel();
    drop(pump);
}
