//! A fake OpenAI Realtime server on 127.0.0.1:0 that speaks the real wire format
//! (`providers.md` §1): a WebSocket upgrade on `/v1/realtime?model=…` whose headers it checks
//! and records, JSON events in both directions, base64 audio in μ-law or pcm16.
//!
//! Shapes come from openai-python `src/openai/types/realtime/` (GA): `session_update_event.py`,
//! `realtime_session_create_request.py`, `realtime_audio_formats.py`,
//! `response_created_event.py`, `response_done_event.py`, `realtime_error_event.py` /
//! `realtime_error.py` (`{type, code, message, param, event_id}`). Like the real server it
//! is strict where a client can go wrong:
//! - a handshake with `OpenAI-Beta: realtime=v1` (the removed preview interface) is refused
//!   with `beta_api_shape_disabled`;
//! - one response at a time per conversation: a `response.create` while a response is active
//!   (from an accepted `response.create` until its `response.done`) is answered with the
//!   error `conversation_already_has_active_response`, message text as the server words it
//!   (quoted in openai/openai-agents-python#1466, pipecat-ai/pipecat#3960), `event_id` the
//!   client event's, and is otherwise dropped (the test never sees it as an event);
//! - `response.cancel` answers `response.done` with status `cancelled` while a response is
//!   active, else the error `response_cancel_not_active`.
//!
//! The fake has no script of its own: a test accepts a connection and drives it event by
//! event with [`FakeConn`], so every scenario reads as the conversation it is. Caller audio
//! (`input_audio_buffer.append`) is decoded and collected as it arrives in whatever format
//! the test confirmed in `session.updated`.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use voicegate::audio::convert::WireFormat;
use voicegate::audio::g711::Law;

/// How long the fake waits for any single client event before failing the test.
pub(crate) const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the client sent in its upgrade request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Handshake {
    /// Path and query, e.g. `/v1/realtime?model=gpt-realtime`.
    pub uri: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `OpenAI-Beta` header.
    pub beta: Option<String>,
}

/// The listening fake.
pub(crate) struct FakeOpenAi {
    listener: TcpListener,
    /// `ws://127.0.0.1:PORT/v1/realtime` (the agent appends `?model=`).
    pub url: String,
    /// The Authorization header a client must send, like the real server: `Bearer <key>`.
    pub expected_auth: String,
}

impl FakeOpenAi {
    pub(crate) async fn bind(api_key: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let addr = listener.local_addr().expect("fake address");
        FakeOpenAi {
            listener,
            url: format!("ws://{addr}/v1/realtime"),
            expected_auth: format!("Bearer {api_key}"),
        }
    }

    /// Accepts one client. The upgrade is refused with 401 if the key is wrong (as OpenAI
    /// does), or with `refuse` if given; then `None` is returned with the handshake seen.
    pub(crate) async fn accept(
        &self,
        refuse: Option<StatusCode>,
        t0: Instant,
    ) -> (Handshake, Option<FakeConn>) {
        let (tcp, _) = tokio::time::timeout(EVENT_TIMEOUT, self.listener.accept())
            .await
            .expect("the agent connects in time")
            .expect("accept");
        tcp.set_nodelay(true).unwrap();
        let seen = Arc::new(Mutex::new(Handshake::default()));
        let expected = self.expected_auth.clone();
        let record = seen.clone();
        // The signature is tungstenite's `Callback`; its error type is an HTTP response.
        #[allow(clippy::result_large_err)]
        let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let hs = Handshake {
                uri: req.uri().to_string(),
                authorization: header("authorization"),
                beta: header("openai-beta"),
            };
            let auth_ok = hs.authorization.as_deref() == Some(expected.as_str());
            let beta = hs.beta.is_some();
            *record.lock().unwrap() = hs;
            let status = match refuse {
                Some(s) => Some(s),
                None if !auth_ok => Some(StatusCode::UNAUTHORIZED),
                None if beta => Some(StatusCode::BAD_REQUEST),
                None => None,
            };
            let body = if beta && auth_ok {
                r#"{"error":{"type":"invalid_request_error","code":"beta_api_shape_disabled","message":"The beta Realtime API shape is disabled; use the GA interface.","param":null,"event_id":null}}"#
            } else {
                r#"{"error":{"type":"invalid_request_error","code":"invalid_api_key","message":"Incorrect API key provided."}}"#
            };
            match status {
                Some(status) => {
                    let mut e = ErrorResponse::new(Some(body.to_owned()));
                    *e.status_mut() = status;
                    Err(e)
                }
                None => Ok(resp),
            }
        };
        let ws = tokio_tungstenite::accept_hdr_async(tcp, callback).await;
        let hs = seen.lock().unwrap().clone();
        match ws {
            Ok(ws) => (
                hs,
                Some(FakeConn {
                    ws,
                    t0,
                    input_format: WireFormat::G711(Law::Ulaw),
                    audio_in: Vec::new(),
                    append_sizes: Vec::new(),
                    events: Vec::new(),
                    active_response: None,
                    rejected: Vec::new(),
                    next_event_id: 0,
                }),
            ),
            Err(_) => (hs, None),
        }
    }
}

/// One accepted client connection.
pub(crate) struct FakeConn {
    ws: WebSocketStream<TcpStream>,
    /// Times are reported in ms since this instant (shared with the test's caller).
    pub t0: Instant,
    /// How `input_audio_buffer.append` audio is decoded (the format confirmed).
    pub input_format: WireFormat,
    /// Caller audio received, decoded to slin at `input_format`'s rate.
    pub audio_in: Vec<i16>,
    /// Bytes of each append, decoded from base64.
    pub append_sizes: Vec<usize>,
    /// Every client event other than appends, in order (rejected `response.create`s too).
    pub events: Vec<Value>,
    /// The response in progress: set by an accepted `response.create` (`"pending"`) or a
    /// `response.created` the fake sends, cleared by the `response.done` it sends.
    pub active_response: Option<String>,
    /// The `response.create` events refused because a response was active.
    pub rejected: Vec<Value>,
    next_event_id: u64,
}

impl FakeConn {
    /// ms since `t0`.
    pub(crate) fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }

    /// Sends one server event; returns the time it was sent (ms since `t0`). Tracks the
    /// active response from the `response.created` / `response.done` it sends.
    pub(crate) async fn send(&mut self, v: Value) -> f64 {
        match v["type"].as_str() {
            Some("response.created") => {
                self.active_response = v["response"]["id"].as_str().map(str::to_owned);
            }
            Some("response.done") => self.active_response = None,
            _ => {}
        }
        let t = self.now_ms();
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("fake send");
        t
    }

    /// Sends one WebSocket message as it is (malformed JSON, a binary frame: fault tests).
    pub(crate) async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("fake send");
    }

    /// Closes the session with a close frame of `code` and `reason` (RFC 6455 §7.4), as the
    /// real server does on a server error (1011) or policy violation (1008).
    pub(crate) async fn close_with(&mut self, code: u16, reason: &str) {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.to_owned().into(),
        };
        let _ = self.ws.close(Some(frame)).await;
    }

    /// Receives the next client event other than an append (appends are decoded into
    /// `audio_in` on the way). `None` when the client closed.
    pub(crate) async fn next_event(&mut self) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
                .await
                .expect("a client event in time");
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            };
            let v: Value = serde_json::from_str(&text).expect("client events are JSON");
            let kind = v["type"]
                .as_str()
                .expect("client event has a type")
                .to_owned();
            if kind == "input_audio_buffer.append" {
                self.take_append(&v);
                continue;
            }
            self.events.push(v.clone());
            if !self.server_rules(&v).await {
                continue;
            }
            return Some(v);
        }
    }

    /// What the real server does on its own with a client event; `false` if the event was
    /// refused (the test does not see it).
    async fn server_rules(&mut self, v: &Value) -> bool {
        match v["type"].as_str() {
            Some("response.create") => {
                if let Some(active) = self.active_response.clone() {
                    self.rejected.push(v.clone());
                    let message = format!(
                        "Conversation already has an active response in progress: {active}. Wait until the response is finished before creating a new one."
                    );
                    self.server_error(
                        "conversation_already_has_active_response",
                        &message,
                        v.get("event_id"),
                    )
                    .await;
                    return false;
                }
                self.active_response = Some("pending".to_owned());
                true
            }
            Some("response.cancel") => {
                match self.active_response.clone() {
                    Some(id) => {
                        let event_id = self.event_id();
                        self.send(json!({"type": "response.done", "event_id": event_id,
                            "response": {"id": id, "object": "realtime.response", "status": "cancelled",
                                         "status_details": {"type": "cancelled", "reason": "client_cancelled"}, "output": []}}))
                            .await;
                    }
                    None => {
                        self.server_error(
                            "response_cancel_not_active",
                            "Cancellation failed: no active response found",
                            v.get("event_id"),
                        )
                        .await;
                    }
                }
                true
            }
            _ => true,
        }
    }

    fn event_id(&mut self) -> String {
        self.next_event_id += 1;
        format!("event_fake_{}", self.next_event_id)
    }

    /// The session reaches its time limit, as OpenAI ends one at 60 minutes: an `error`
    /// with code `session_expired`, then a close with 1001 (going away).
    pub(crate) async fn expire(&mut self) {
        self.server_error(
            "session_expired",
            "Your session hit the maximum duration of 60 minutes.",
            None,
        )
        .await;
        self.close_with(1001, "session expired").await;
    }

    /// An `error` event in the real shape (`realtime_error_event.py`).
    pub(crate) async fn server_error(
        &mut self,
        code: &str,
        message: &str,
        client_event: Option<&Value>,
    ) {
        let id = self.event_id();
        self.send(json!({"type": "error", "event_id": id, "error": {
            "type": "invalid_request_error", "code": code, "message": message, "param": null,
            "event_id": client_event.cloned().unwrap_or(Value::Null)}}))
            .await;
    }

    fn take_append(&mut self, v: &Value) {
        use base64::Engine as _;
        let b64 = v["audio"].as_str().expect("append carries audio");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("append audio is base64");
        self.append_sizes.push(bytes.len());
        match self.input_format {
            WireFormat::G711(law) => self.audio_in.extend(bytes.iter().map(|&b| law.decode(b))),
            WireFormat::Pcm16 { .. } => {
                assert!(bytes.len() % 2 == 0, "pcm16 append of odd length");
                self.audio_in.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|b| i16::from_le_bytes([b[0], b[1]])),
                )
            }
        }
    }

    /// The next non-append event, which must be of type `kind`.
    pub(crate) async fn expect(&mut self, kind: &str) -> Value {
        let v = self
            .next_event()
            .await
            .unwrap_or_else(|| panic!("client closed while the fake expected {kind}"));
        assert_eq!(v["type"], kind, "expected {kind}, got {v}");
        v
    }

    /// Reads (collecting appends) until `ms` of caller audio has arrived. Panics if another
    /// event arrives meanwhile.
    pub(crate) async fn wait_for_audio_ms(&mut self, ms: u64) {
        let want = (self.input_format.rate_hz() as u64 * ms / 1000) as usize;
        while self.audio_in.len() < want {
            if let Some(v) = self.next_event_with_audio_only().await {
                panic!("unexpected client event while waiting for audio: {v}");
            }
        }
    }

    async fn next_event_with_audio_only(&mut self) -> Option<Value> {
        let before = self.append_sizes.len();
        loop {
            let msg = tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
                .await
                .expect("caller audio in time");
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    panic!("client closed while the fake waited for audio")
                }
                Some(Ok(_)) => continue,
            };
            let v: Value = serde_json::from_str(&text).expect("client events are JSON");
            if v["type"] == "input_audio_buffer.append" {
                self.take_append(&v);
                if self.append_sizes.len() > before {
                    return None;
                }
            } else {
                self.events.push(v.clone());
                return Some(v);
            }
        }
    }

    /// Reads every remaining client event until the client closes (or `limit` passes),
    /// applying the server's rules to each (a `response.create` may be refused).
    pub(crate) async fn drain(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).expect("client events are JSON");
                    if v["type"] == "input_audio_buffer.append" {
                        self.take_append(&v);
                    } else {
                        self.events.push(v.clone());
                        self.server_rules(&v).await;
                    }
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                    return;
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// `session.created`, as the server sends it first.
    pub(crate) async fn session_created(&mut self) {
        let session = json!({"id": "sess_fake_1", "object": "realtime.session", "type": "realtime",
                             "model": "gpt-realtime"});
        self.send(json!({"type": "session.created", "event_id": "ev_c1", "session": session}))
            .await;
    }

    /// Answers a `session.update` with `session.updated` holding the effective session:
    /// the update's session with `formats` (input, output) in place of what was asked.
    pub(crate) async fn session_updated(
        &mut self,
        update: &Value,
        formats: (WireFormat, WireFormat),
    ) {
        let mut session = update["session"].clone();
        assert_eq!(session["type"], "realtime", "a GA session.update: {update}");
        session["id"] = json!("sess_fake_1");
        session["audio"]["input"]["format"] = ga_format(formats.0);
        session["audio"]["output"]["format"] = ga_format(formats.1);
        self.input_format = formats.0;
        self.send(json!({"type": "session.updated", "event_id": "ev_u1", "session": session}))
            .await;
    }

    /// The events of a caller turn under server VAD (§1.4), with its transcript.
    pub(crate) async fn caller_turn(&mut self, item_id: &str, transcript: &str) {
        self.send(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 100, "item_id": item_id})).await;
        self.send(json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1500, "item_id": item_id})).await;
        self.send(json!({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": null})).await;
        self.send(json!({
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id, "content_index": 0, "transcript": transcript,
        }))
        .await;
    }

    /// One spoken reply in the order the real server sends it (`providers.md` §1.4):
    /// `audio` (wire bytes in the output format) as deltas of `chunk` bytes, back to back,
    /// with the transcript's words interleaved as transcript deltas. Returns the send times
    /// (ms since `t0`) of the first and the last event.
    pub(crate) async fn reply(
        &mut self,
        response_id: &str,
        item_id: &str,
        audio: &[u8],
        chunk: usize,
        transcript: &str,
    ) -> (f64, f64) {
        use base64::Engine as _;
        let (audio_delta, audio_done, tr_delta, tr_done) = (
            "response.output_audio.delta",
            "response.output_audio.done",
            "response.output_audio_transcript.delta",
            "response.output_audio_transcript.done",
        );
        let ids = json!({"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0});
        let with = |mut v: Value| {
            for (k, x) in ids.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let item = json!({"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": "in_progress", "content": []});
        let first = self
            .send(json!({"type": "response.created", "response": {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": []}}))
            .await;
        self.send(json!({"type": "response.output_item.added", "response_id": response_id, "output_index": 0, "item": item}))
            .await;
        self.send(
            json!({"type": "conversation.item.added", "previous_item_id": null, "item": item}),
        )
        .await;
        let part_type = "output_audio";
        self.send(with(json!({"type": "response.content_part.added", "part": {"type": part_type, "transcript": ""}})))
            .await;
        let mut words = transcript.split_inclusive(' ');
        for piece in audio.chunks(chunk) {
            let b64 = base64::engine::general_purpose::STANDARD.encode(piece);
            self.send(with(json!({"type": audio_delta, "delta": b64})))
                .await;
            if let Some(w) = words.next() {
                self.send(with(json!({"type": tr_delta, "delta": w}))).await;
            }
        }
        for w in words {
            self.send(with(json!({"type": tr_delta, "delta": w}))).await;
        }
        self.send(with(json!({"type": audio_done}))).await;
        self.send(with(json!({"type": tr_done, "transcript": transcript})))
            .await;
        self.send(with(json!({"type": "response.content_part.done", "part": {"type": part_type, "transcript": transcript}})))
            .await;
        let done_item = json!({"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": "completed",
                               "content": [{"type": part_type, "transcript": transcript}]});
        self.send(json!({"type": "response.output_item.done", "response_id": response_id, "output_index": 0, "item": done_item}))
            .await;
        self.send(json!({"type": "conversation.item.done", "item": done_item}))
            .await;
        let last = self
            .send(json!({"type": "response.done", "response": {"id": response_id, "object": "realtime.response", "status": "completed",
                          "status_details": null, "output": [done_item]}}))
            .await;
        (first, last)
    }
}

/// A GA format object (§1.2).
pub(crate) fn ga_format(f: WireFormat) -> Value {
    match f {
        WireFormat::G711(Law::Ulaw) => json!({"type": "audio/pcmu"}),
        WireFormat::G711(Law::Alaw) => json!({"type": "audio/pcma"}),
        WireFormat::Pcm16 { rate_hz } => json!({"type": "audio/pcm", "rate": rate_hz}),
    }
}

/// slin samples as wire bytes of `format` (the samples must already be at its rate).
pub(crate) fn to_wire(samples: &[i16], format: WireFormat) -> Vec<u8> {
    match format {
        WireFormat::G711(law) => samples.iter().map(|&s| law.encode(s)).collect(),
        WireFormat::Pcm16 { .. } => samples.iter().flat_map(|s| s.to_le_bytes()).collect(),
    }
}
