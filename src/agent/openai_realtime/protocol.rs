//! One OpenAI Realtime call as a sans-IO protocol ([`WsProtocol`]): set-up of each session
//! (connect, `session.created`, `session.update`, `session.updated`, each within its
//! deadline), the live session (uplink, downlink, barge-in, keypad, tools, idle prompts,
//! responses one at a time) and the renewal beside it, with `now` passed in. The shared
//! driver ([`crate::agent::driver`]) does the sockets; the steps are those of the parent
//! module's docs.

use super::{
    Formats, Goodbye, HISTORY_ITEMS, LevelCheck, MAX_REPLIES, PROVIDER, RENEW_RETRY, Reply,
    Responses, SETUP_BUFFER_FRAMES, ServerEvent, Settings, TAIL_FLUSH_MS, confirmed_formats,
    describe_error, goodbye_response, greeting_response, history_item, is_fatal, requested_format,
    scrub, session_update,
};
use crate::agent::driver::{Out, ServerMsg, SocketId, WsProtocol};
use crate::agent::keypad::Keypad;
use crate::agent::{AgentError, AgentEvent, AgentInput, CallInfo, Speaker};
use crate::audio::ReplyId;
use crate::audio::convert::{Decoder, Encoder, WireFormat};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::time::Instant;
use tracing::{debug, info, trace, warn};

/// Where the set-up of one session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The socket is being connected; `session.created` is next.
    Connecting,
    /// Connected; waiting for `session.created`.
    Created,
    /// `session.update` sent; waiting for `session.updated`.
    Updated,
}

impl Stage {
    fn waiting_for(self) -> &'static str {
        match self {
            Stage::Connecting | Stage::Created => "session.created",
            Stage::Updated => "session.updated",
        }
    }
}

/// A session being set up on `socket`; fails at `deadline`.
#[derive(Debug, Clone, Copy)]
struct SetUp {
    socket: SocketId,
    stage: Stage,
    deadline: Instant,
}

/// The renewal session beside the live one (module doc of the parent, 9).
#[derive(Debug, Clone, Copy)]
enum Renewal {
    /// The first session is not ready yet.
    Off,
    /// A renewal session is set up at `at`.
    Waiting { at: Instant },
    /// It is being set up.
    SettingUp(SetUp),
    /// It is ready on `socket`, waiting for a quiet moment.
    Ready { socket: SocketId, formats: Formats },
}

/// One call's OpenAI Realtime protocol.
pub(crate) struct Realtime {
    s: Arc<Settings>,
    call_rate_hz: u32,
    requested: WireFormat,
    /// The live session's socket.
    socket: SocketId,
    /// The next socket number.
    next_socket: SocketId,
    /// The first session's set-up, until it is ready.
    setup: Option<SetUp>,
    /// Caller audio that arrived during the first set-up.
    early: VecDeque<Bytes>,
    renewal: Renewal,
    formats: Formats,
    enc: Encoder,
    dec: Decoder,
    /// Encoded caller audio of one frame (reused).
    wire_in: Vec<u8>,
    /// Decoded provider audio of one delta (reused).
    wire_out: Vec<u8>,
    replies: VecDeque<Reply>,
    next_reply: u64,
    /// A pcm16 delta of odd length was seen (logged once).
    odd_delta_seen: bool,
    /// Sanity check of the output format on the call's first agent audio.
    level: LevelCheck,
    /// Keypad digits not yet sent as a caller turn.
    keypad: Keypad,
    /// `response.create`s, one at a time.
    responses: Responses,
    /// The conversation so far, for a renewed session (last [`HISTORY_ITEMS`]).
    history: VecDeque<(Speaker, String)>,
    /// Between `speech_started` and `speech_stopped`.
    caller_speaking: bool,
    /// `input_audio_buffer.timeout_triggered` since the caller last spoke.
    idle_prompts: u32,
    /// The goodbye to a silent caller.
    goodbye: Goodbye,
}

fn convert_error(e: crate::audio::resample::ResampleError) -> AgentError {
    AgentError::Protocol {
        provider: PROVIDER,
        detail: format!("cannot convert the confirmed audio format: {e}"),
    }
}

impl Realtime {
    /// The protocol of one call with settings `s` (the call's tools already among them).
    ///
    /// # Errors
    /// [`AgentError::Protocol`] if the call's rate cannot be converted to the format asked
    /// for.
    pub(super) fn new(s: Arc<Settings>, call: &CallInfo) -> Result<Self, AgentError> {
        let requested = requested_format(&s, call.rate_hz);
        let formats = Formats {
            input: requested,
            output: requested,
        };
        Ok(Realtime {
            call_rate_hz: call.rate_hz,
            requested,
            socket: 1,
            next_socket: 2,
            setup: None,
            early: VecDeque::with_capacity(SETUP_BUFFER_FRAMES),
            renewal: Renewal::Off,
            formats,
            enc: Encoder::new(call.rate_hz, requested).map_err(convert_error)?,
            dec: Decoder::new(requested, call.rate_hz).map_err(convert_error)?,
            wire_in: Vec::with_capacity(1024),
            wire_out: Vec::with_capacity(16 * 1024),
            replies: VecDeque::with_capacity(MAX_REPLIES),
            next_reply: 1,
            odd_delta_seen: false,
            level: LevelCheck::default(),
            keypad: Keypad::default(),
            responses: Responses::default(),
            history: VecDeque::with_capacity(HISTORY_ITEMS),
            caller_speaking: false,
            idle_prompts: 0,
            goodbye: Goodbye::No,
            s,
        })
    }

    /// Opens socket `socket` and starts its set-up clock.
    fn open(&self, now: Instant, socket: SocketId, out: &mut Vec<Out>) -> SetUp {
        debug!(url = %self.s.url, socket, "connecting");
        out.push(Out::Open {
            socket,
            url: self.s.url.clone(),
            headers: vec![(
                "Authorization".into(),
                format!("Bearer {}", self.s.api_key.expose()),
            )],
            timeout: self.s.connect_timeout,
        });
        // Connecting and session.created share one deadline; session.updated gets its own.
        SetUp {
            socket,
            stage: Stage::Connecting,
            deadline: now + self.s.connect_timeout,
        }
    }

    fn send(&self, out: &mut Vec<Out>, v: &Value) {
        out.push(Out::Send {
            socket: self.socket,
            text: v.to_string(),
        });
    }

    /// One step of a session's set-up; `Some(formats)` once it is ready.
    fn set_up_step(
        &self,
        now: Instant,
        su: &mut SetUp,
        msg: ServerMsg<'_>,
        out: &mut Vec<Out>,
    ) -> Result<Option<Formats>, AgentError> {
        let kind = su.stage.waiting_for();
        let text = match msg {
            ServerMsg::Opened => {
                su.stage = Stage::Created;
                return Ok(None);
            }
            ServerMsg::Closed(c) if su.stage == Stage::Connecting => {
                return Err(AgentError::Connect {
                    provider: PROVIDER,
                    detail: scrub(&c.detail, &self.s.api_key),
                });
            }
            ServerMsg::Closed(c) => {
                return Err(AgentError::Provider {
                    provider: PROVIDER,
                    detail: scrub(&c.detail, &self.s.api_key),
                });
            }
            ServerMsg::Text(t) => t,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| AgentError::Protocol {
            provider: PROVIDER,
            detail: format!("server event is not JSON: {e}"),
        })?;
        match v.get("type").and_then(Value::as_str) {
            Some("session.created") if su.stage == Stage::Created => {
                out.push(Out::Send {
                    socket: su.socket,
                    text: session_update(&self.s, self.requested).to_string(),
                });
                su.stage = Stage::Updated;
                su.deadline = now + self.s.connect_timeout;
                Ok(None)
            }
            Some("session.updated") if su.stage == Stage::Updated => {
                let session = v.get("session").unwrap_or(&Value::Null);
                let f = confirmed_formats(session, self.requested);
                if f.input != self.requested || f.output != self.requested {
                    info!(requested = ?self.requested, input = ?f.input, output = ?f.output, "server chose other audio formats; using them");
                }
                Ok(Some(f))
            }
            Some("error") => Err(AgentError::Provider {
                provider: PROVIDER,
                detail: format!(
                    "error while waiting for {kind}: {}",
                    describe_error(v.get("error"), &self.s.api_key)
                ),
            }),
            other => {
                debug!(event = ?other, waiting_for = kind, "event during set-up ignored");
                Ok(None)
            }
        }
    }

    /// Uses `formats` for the caller's and the agent's audio from now on.
    fn use_formats(&mut self, formats: Formats) -> Result<(), AgentError> {
        if formats.input != self.formats.input {
            self.enc = Encoder::new(self.call_rate_hz, formats.input).map_err(convert_error)?;
        }
        if formats.output != self.formats.output {
            self.dec = Decoder::new(formats.output, self.call_rate_hz).map_err(convert_error)?;
        }
        self.formats = formats;
        Ok(())
    }

    /// The first session is ready: the greeting, then the caller audio kept meanwhile.
    fn ready(&mut self, now: Instant, formats: Formats, out: &mut Vec<Out>) {
        info!(input = ?formats.input, output = ?formats.output, "openai realtime session ready");
        if let Err(e) = self.use_formats(formats) {
            out.push(Out::Fail(e));
            return;
        }
        self.renewal = Renewal::Waiting {
            at: now + self.s.session_renew,
        };
        if let Some(greeting) = &self.s.greeting {
            debug!("asking for the greeting");
            self.responses.want(greeting_response(greeting));
            self.send_wanted_response(out);
        }
        for frame in std::mem::take(&mut self.early) {
            self.append(&frame, out);
        }
    }

    /// The first session's set-up got `msg`.
    fn on_set_up(&mut self, now: Instant, msg: ServerMsg<'_>, out: &mut Vec<Out>) {
        let Some(mut su) = self.setup else { return };
        match self.set_up_step(now, &mut su, msg, out) {
            Ok(None) => self.setup = Some(su),
            Ok(Some(formats)) => {
                self.setup = None;
                self.ready(now, formats, out);
            }
            Err(e) => out.push(Out::Fail(e)),
        }
    }

    /// The renewal session's set-up got `msg`.
    fn on_renewal(&mut self, now: Instant, mut su: SetUp, msg: ServerMsg<'_>, out: &mut Vec<Out>) {
        self.renewal = match self.set_up_step(now, &mut su, msg, out) {
            Ok(None) => Renewal::SettingUp(su),
            Ok(Some(formats)) => Renewal::Ready {
                socket: su.socket,
                formats,
            },
            Err(e) => self.renewal_failed(now, su.socket, &e, out),
        };
    }

    fn renewal_failed(
        &self,
        now: Instant,
        socket: SocketId,
        e: &AgentError,
        out: &mut Vec<Out>,
    ) -> Renewal {
        warn!(error = %e, retry_in = ?RENEW_RETRY, "renewal session failed");
        out.push(Out::Close { socket });
        Renewal::Waiting {
            at: now + RENEW_RETRY,
        }
    }

    /// The live session ended with `e`: the call goes on in the renewal session if it is
    /// ready, else the session fails.
    fn live_ended(&mut self, now: Instant, e: AgentError, out: &mut Vec<Out>) {
        if matches!(self.renewal, Renewal::Ready { .. }) {
            info!(error = %e, "the session ended; switching to the renewed one");
            self.switch_session(now, out);
        } else {
            out.push(Out::Fail(e));
        }
    }

    /// Nothing is under way that a session switch would cut.
    fn quiet(&self) -> bool {
        let r = &self.responses;
        !r.active
            && !r.requested
            && r.wanted.is_none()
            && r.open_calls.is_empty()
            && !self.caller_speaking
            && self.keypad.is_empty()
            && self.replies.iter().all(|r| r.done || r.cancelled)
    }

    fn maybe_switch(&mut self, now: Instant, out: &mut Vec<Out>) {
        if matches!(self.renewal, Renewal::Ready { .. }) && self.quiet() {
            self.switch_session(now, out);
        }
    }

    /// Moves the call to the renewal session: the transcript so far as conversation items,
    /// then caller audio goes there; the old socket is closed.
    fn switch_session(&mut self, now: Instant, out: &mut Vec<Out>) {
        let Renewal::Ready { socket, formats } = self.renewal else {
            return;
        };
        let old = std::mem::replace(&mut self.socket, socket);
        if let Err(e) = self.use_formats(formats) {
            out.push(Out::Fail(e));
            return;
        }
        for item in &self.history {
            self.send(out, &history_item(item));
        }
        // The old session's items are gone with it.
        self.replies.clear();
        self.responses = Responses::default();
        info!(
            items = self.history.len(),
            "session renewed: the conversation goes on in a new session"
        );
        out.push(Out::Close { socket: old });
        self.renewal = Renewal::Waiting {
            at: now + self.s.session_renew,
        };
    }

    /// Remembers one transcript line for a renewed session.
    fn remember(&mut self, speaker: Speaker, text: &str) {
        if self.history.len() == HISTORY_ITEMS {
            self.history.pop_front();
        }
        self.history.push_back((speaker, text.to_owned()));
    }

    /// Sends the wanted `response.create`, if its turn has come.
    fn send_wanted_response(&mut self, out: &mut Vec<Out>) {
        if let Some(event) = self.responses.poll() {
            debug!(event_id = ?event.get("event_id"), "response.create");
            self.send(out, &event);
        } else if self.responses.wanted.is_some() {
            debug!("response.create waits for the active response to finish");
        }
    }

    /// Sends one caller frame as `input_audio_buffer.append`.
    fn append(&mut self, frame: &[u8], out: &mut Vec<Out>) {
        self.wire_in.clear();
        self.enc.encode_le_bytes(frame, &mut self.wire_in);
        if self.wire_in.is_empty() {
            // The resampler is still filling its first chunk.
            return;
        }
        // One allocation per frame: the message text, which the socket takes ownership of.
        const HEAD: &str = r#"{"type":"input_audio_buffer.append","audio":""#;
        let mut text = String::with_capacity(HEAD.len() + self.wire_in.len().div_ceil(3) * 4 + 2);
        text.push_str(HEAD);
        BASE64.encode_string(&self.wire_in, &mut text);
        text.push_str("\"}");
        trace!(bytes = self.wire_in.len(), "append");
        out.push(Out::Send {
            socket: self.socket,
            text,
        });
    }

    /// A keypad digit. The first one of a turn stops the agent talking: the call flushes its
    /// playout (and answers with what was heard, which truncates the item) and the
    /// response is cancelled, since server VAD heard nothing to cancel it.
    fn on_dtmf(&mut self, now: Instant, digit: char, out: &mut Vec<Out>) {
        debug!(digit = %digit, "dtmf");
        // A reply is being heard: still streaming, or streamed and not yet played out.
        if self.keypad.is_empty()
            && self.replies.iter().any(|r| !r.cancelled)
            && self.interrupt(out)
        {
            self.send(out, &json!({"type": "response.cancel"}));
        }
        if let Some(text) = self.keypad.push_at(digit, now) {
            self.keypad_turn(text, out);
        }
    }

    /// Barge-in: tells the call first ([`AgentEvent::SpeechStarted`]: it flushes its playout
    /// and answers with what was heard), then drops the replies still streaming. Returns
    /// whether a reply was still streaming.
    fn interrupt(&mut self, out: &mut Vec<Out>) -> bool {
        out.push(Out::Event(AgentEvent::SpeechStarted));
        let mut streaming = false;
        for r in self.replies.iter_mut().filter(|r| !r.done) {
            r.cancelled = true;
            streaming = true;
        }
        if streaming {
            self.dec.reset();
        }
        streaming
    }

    /// The typed digits as a user message, and a response to it (§1.7's
    /// `conversation.item.create` with `input_text`).
    fn keypad_turn(&mut self, text: String, out: &mut Vec<Out>) {
        info!(text = %text, "keypad turn");
        let item = json!({
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": text}]},
        });
        self.send(out, &item);
        self.responses.want(json!({"type": "response.create"}));
        self.send_wanted_response(out);
        self.remember(Speaker::Caller, &text);
        out.push(Out::Event(AgentEvent::Transcript {
            speaker: Speaker::Caller,
            text,
        }));
    }

    /// The call heard `heard_ms` of `reply` before the caller interrupted it.
    fn on_interrupted(&mut self, reply: ReplyId, heard_ms: u64, out: &mut Vec<Out>) {
        let Some(r) = self.replies.iter().find(|r| r.id == reply) else {
            debug!(reply = reply.0, "interrupted reply is no longer known");
            return;
        };
        // audio_end_ms beyond the item's real length is an error (§1.3); the tail flush and
        // resampling can make the call side a little longer.
        let wire_ms = (r.wire_bytes / self.formats.output.bytes_per_ms()) as u64;
        if r.done && heard_ms >= wire_ms {
            debug!(item_id = %r.item_id, "the caller heard all of the reply; nothing to truncate");
            self.replies.retain(|r| r.id.0 > reply.0);
            return;
        }
        let audio_end_ms = heard_ms.min(wire_ms);
        info!(item_id = %r.item_id, audio_end_ms, "truncating the interrupted reply");
        let truncate = json!({
            "type": "conversation.item.truncate",
            "item_id": r.item_id,
            "content_index": 0,
            "audio_end_ms": audio_end_ms,
        });
        self.replies.retain(|r| r.id.0 > reply.0);
        self.send(out, &truncate);
    }

    fn live_input(&mut self, now: Instant, input: AgentInput, out: &mut Vec<Out>) {
        match input {
            AgentInput::Audio(frame) => self.append(&frame, out),
            AgentInput::Interrupted { reply, heard_ms } => {
                self.on_interrupted(reply, heard_ms, out)
            }
            // Playout frames come only to agents that ask for them; this one does not.
            AgentInput::Playout(_) => {}
            AgentInput::PlayedOut { reply } => {
                self.replies.retain(|r| r.id.0 > reply.0 || !r.done);
            }
            AgentInput::ToolResult { call_id, output } => {
                debug!(call_id = %call_id, "tool result");
                let item = json!({
                    "type": "conversation.item.create",
                    "item": {"type": "function_call_output", "call_id": call_id, "output": output},
                });
                self.send(out, &item);
                self.responses.on_tool_output(&call_id);
                self.responses.want(json!({"type": "response.create"}));
                self.send_wanted_response(out);
            }
            AgentInput::Dtmf(digit) => self.on_dtmf(now, digit, out),
        }
    }

    /// One server event of the live session.
    fn handle_event(&mut self, now: Instant, text: &str, out: &mut Vec<Out>) {
        let ev: ServerEvent<'_> = match serde_json::from_str(text) {
            Ok(ev) => ev,
            Err(e) => {
                warn!(error = %e, "server event not understood; ignored");
                return;
            }
        };
        match ev.kind.as_ref() {
            "response.output_audio.delta" => self.on_audio_delta(&ev, out),
            "response.output_audio.done" => self.audio_done(&ev.item_id, out),
            "input_audio_buffer.speech_started" => {
                self.caller_speaking = true;
                self.idle_prompts = 0;
                if self.goodbye == Goodbye::AfterResponse {
                    self.goodbye = Goodbye::No;
                }
                // The server cancels its own response (interrupt_response).
                self.interrupt(out);
                debug!("caller started speaking");
            }
            "conversation.item.input_audio_transcription.completed" => {
                self.transcript(Speaker::Caller, ev.transcript.as_deref(), out)
            }
            "response.output_audio_transcript.done" => {
                self.transcript(Speaker::Agent, ev.transcript.as_deref(), out)
            }
            "response.function_call_arguments.done" => self.on_function_call(ev, out),
            "error" => self.on_error(now, ev.error.as_ref(), out),
            "response.created" => self.on_response_created(ev.response.as_ref()),
            "response.done" => self.on_response_done(ev.response.as_ref(), out),
            "session.updated" => {
                if let Some(session) = &ev.session {
                    let now = confirmed_formats(session, self.formats.input);
                    if now != self.formats {
                        warn!(formats = ?now, "session.updated changed the audio formats mid-call; keeping the first ones");
                    }
                }
            }
            "input_audio_buffer.timeout_triggered" => self.on_idle_timeout(),
            "input_audio_buffer.speech_stopped" => {
                self.caller_speaking = false;
                debug!("caller stopped speaking");
            }
            "input_audio_buffer.committed" | "conversation.item.truncated" => {
                debug!(event = %ev.kind, "event")
            }
            other => trace!(event = other, "event ignored"),
        }
    }

    fn transcript(&mut self, speaker: Speaker, text: Option<&str>, out: &mut Vec<Out>) {
        let Some(t) = text.map(str::trim).filter(|t| !t.is_empty()) else {
            return;
        };
        self.remember(speaker, t);
        out.push(Out::Event(AgentEvent::Transcript {
            speaker,
            text: t.to_owned(),
        }));
    }

    fn on_function_call(&mut self, ev: ServerEvent<'_>, out: &mut Vec<Out>) {
        let (Some(call_id), Some(name)) = (ev.call_id, ev.name) else {
            warn!("function call without call_id or name; ignored");
            return;
        };
        info!(tool = %name, call_id = %call_id, "tool call");
        self.responses.on_function_call(&call_id);
        // Tied to the spoken reply of the same response, if it had one.
        let reply = (!ev.response_id.is_empty())
            .then(|| {
                self.replies
                    .iter()
                    .find(|r| r.response_id == ev.response_id)
            })
            .flatten()
            .map(|r| r.id);
        out.push(Out::Event(AgentEvent::ToolCall {
            call_id,
            name,
            arguments: ev.arguments.unwrap_or_else(|| "{}".into()),
            reply,
        }));
    }

    fn on_error(&mut self, now: Instant, error: Option<&Value>, out: &mut Vec<Out>) {
        let detail = describe_error(error, &self.s.api_key);
        if self.responses.on_error(error) {
            info!(error = %detail, "response.create refused while a response is active; sent again after its response.done");
            return;
        }
        if is_fatal(error) {
            let e = AgentError::Provider {
                provider: PROVIDER,
                detail,
            };
            self.live_ended(now, e, out);
            return;
        }
        warn!(error = %detail, "openai realtime error; the session goes on");
    }

    fn on_response_created(&mut self, response: Option<&Value>) {
        let ours = self.responses.requested;
        self.responses.on_created();
        if ours && self.goodbye == Goodbye::Asked {
            let id = response
                .and_then(|r| r.get("id"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            self.goodbye = Goodbye::Speaking(id);
        }
    }

    fn on_response_done(&mut self, response: Option<&Value>, out: &mut Vec<Out>) {
        self.responses.on_done();
        if self.goodbye == Goodbye::AfterResponse {
            self.goodbye = Goodbye::Asked;
            self.responses.want(goodbye_response());
        }
        let field = |name: &str| {
            response
                .and_then(|r| r.get(name))
                .and_then(Value::as_str)
                .unwrap_or("")
        };
        if matches!(&self.goodbye, Goodbye::Speaking(g) if g == field("id")) {
            info!("goodbye said after the caller stayed silent; ending the call");
            let reason = "the caller stayed silent".to_owned();
            out.push(Out::Event(AgentEvent::Ended { reason }));
            out.push(Out::Stop);
            return;
        }
        self.send_wanted_response(out);
        let status = field("status");
        if status == "failed" {
            let details = response.and_then(|r| r.pointer("/status_details/error"));
            warn!(error = %describe_error(details, &self.s.api_key), "response failed");
        } else {
            debug!(status, "response done");
        }
    }

    fn on_idle_timeout(&mut self) {
        self.idle_prompts += 1;
        if self.idle_prompts > self.s.idle_prompts && self.goodbye == Goodbye::No {
            info!(
                prompts = self.idle_prompts - 1,
                "the caller stays silent; the goodbye follows this prompt"
            );
            // The server answers the timeout with a response of its own; the goodbye is
            // asked for after it, so the next response.created is the goodbye's.
            self.goodbye = Goodbye::AfterResponse;
        } else {
            info!("the caller has been silent for idle_timeout_ms; the model prompts them");
        }
    }

    /// The reply for `item_id`, made on its first delta.
    fn reply_for(&mut self, item_id: &str) -> &mut Reply {
        let pos = match self.replies.iter().position(|r| r.item_id == item_id) {
            Some(p) => p,
            None => {
                if self.replies.len() == MAX_REPLIES {
                    self.replies.pop_front();
                }
                let id = ReplyId(self.next_reply);
                self.next_reply += 1;
                debug!(reply = id.0, item_id, "new reply");
                self.replies.push_back(Reply {
                    id,
                    item_id: item_id.to_owned(),
                    response_id: String::new(),
                    wire_bytes: 0,
                    done: false,
                    cancelled: false,
                });
                self.replies.len() - 1
            }
        };
        &mut self.replies[pos]
    }

    fn on_audio_delta(&mut self, ev: &ServerEvent<'_>, out: &mut Vec<Out>) {
        if ev.item_id.is_empty() {
            warn!("audio delta without item_id; ignored");
            return;
        }
        if !ev.response_id.is_empty() {
            let r = self.reply_for(&ev.item_id);
            if r.response_id.is_empty() {
                r.response_id = ev.response_id.to_string();
            }
        }
        self.audio_delta(&ev.item_id, &ev.delta, out);
    }

    fn audio_delta(&mut self, item_id: &str, delta: &str, out: &mut Vec<Out>) {
        self.wire_out.clear();
        if let Err(e) = BASE64.decode_vec(delta, &mut self.wire_out) {
            warn!(error = %e, "audio delta is not base64; ignored");
            return;
        }
        let format = self.formats.output;
        let len = self.wire_out.len();
        let reply = self.reply_for(item_id);
        if reply.cancelled || reply.done {
            trace!(item_id, "delta of an interrupted or finished reply dropped");
            return;
        }
        reply.wire_bytes += len;
        let id = reply.id;
        self.check_format(format);
        // Samples at the call rate for this delta's duration, plus resampler slack.
        let mut samples = Vec::with_capacity(
            self.wire_out.len() * self.call_rate_hz as usize / 1000 / format.bytes_per_ms() + 512,
        );
        self.dec.decode(&self.wire_out, &mut samples);
        if !samples.is_empty() {
            out.push(Out::Event(AgentEvent::Audio { reply: id, samples }));
        }
    }

    /// Logs signs that the confirmed output format is not what the audio is.
    fn check_format(&mut self, format: WireFormat) {
        if matches!(format, WireFormat::Pcm16 { .. })
            && self.wire_out.len() % 2 == 1
            && !self.odd_delta_seen
        {
            self.odd_delta_seen = true;
            warn!(
                bytes = self.wire_out.len(),
                "pcm16 audio delta of odd length: the confirmed output format may be wrong"
            );
        }
        if let Some(rms) = self.level.feed(&self.wire_out, format) {
            warn!(
                rms = rms as u64,
                format = ?format,
                "agent audio is far louder than speech: the confirmed output format may be wrong"
            );
        }
    }

    fn audio_done(&mut self, item_id: &str, out: &mut Vec<Out>) {
        let Some(pos) = self.replies.iter().position(|r| r.item_id == item_id) else {
            return;
        };
        let reply = &mut self.replies[pos];
        if reply.done {
            return;
        }
        reply.done = true;
        if reply.cancelled {
            return;
        }
        let id = reply.id;
        let format = self.formats.output;
        if format.rate_hz() != self.call_rate_hz {
            // Push wire silence through the resampler so the reply's last samples come out.
            let silence: u8 = match format {
                WireFormat::G711(law) => law.encode(0),
                WireFormat::Pcm16 { .. } => 0,
            };
            self.wire_out.clear();
            self.wire_out
                .resize(format.bytes_per_ms() * TAIL_FLUSH_MS, silence);
            let mut tail = Vec::new();
            self.dec.decode(&self.wire_out, &mut tail);
            self.dec.reset();
            if !tail.is_empty() {
                out.push(Out::Event(AgentEvent::Audio {
                    reply: id,
                    samples: tail,
                }));
            }
        }
        out.push(Out::Event(AgentEvent::ReplyDone { reply: id }));
    }
}

impl WsProtocol for Realtime {
    fn start(&mut self, now: Instant, out: &mut Vec<Out>) {
        self.setup = Some(self.open(now, self.socket, out));
    }

    fn handle_input(&mut self, now: Instant, input: AgentInput, out: &mut Vec<Out>) {
        if self.setup.is_none() {
            self.live_input(now, input, out);
            self.maybe_switch(now, out);
            return;
        }
        // Caller audio that arrives while connecting is kept and sent once the session is
        // ready.
        match input {
            AgentInput::Audio(frame) => {
                if self.early.len() == SETUP_BUFFER_FRAMES {
                    self.early.pop_front();
                }
                self.early.push_back(frame);
            }
            other => debug!(input = ?other, "input before the session is ready ignored"),
        }
    }

    fn handle_server(
        &mut self,
        now: Instant,
        socket: SocketId,
        msg: ServerMsg<'_>,
        out: &mut Vec<Out>,
    ) {
        if self.setup.is_some_and(|su| su.socket == socket) {
            return self.on_set_up(now, msg, out);
        }
        match self.renewal {
            Renewal::SettingUp(su) if su.socket == socket => {
                self.on_renewal(now, su, msg, out);
                return self.maybe_switch(now, out);
            }
            Renewal::Ready { socket: s, .. } if s == socket => {
                if let ServerMsg::Closed(c) = msg {
                    let e = AgentError::Provider {
                        provider: PROVIDER,
                        detail: scrub(&c.detail, &self.s.api_key),
                    };
                    self.renewal = self.renewal_failed(now, socket, &e, out);
                }
                return;
            }
            _ => {}
        }
        if socket != self.socket {
            trace!(socket, "message of a closed session ignored");
            return;
        }
        match msg {
            ServerMsg::Text(text) => self.handle_event(now, text, out),
            ServerMsg::Closed(c) => {
                let e = AgentError::Provider {
                    provider: PROVIDER,
                    detail: scrub(&c.detail, &self.s.api_key),
                };
                return self.live_ended(now, e, out);
            }
            ServerMsg::Opened => {}
        }
        self.maybe_switch(now, out);
    }

    fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Out>) {
        if let Some(su) = self.setup {
            if now >= su.deadline {
                out.push(Out::Fail(AgentError::Timeout {
                    provider: PROVIDER,
                    detail: format!(
                        "no {} within {:?}",
                        su.stage.waiting_for(),
                        self.s.connect_timeout
                    ),
                }));
            }
            return;
        }
        match self.renewal {
            Renewal::Waiting { at } if now >= at => {
                info!("setting up a new session before this one reaches its time limit");
                let socket = self.next_socket;
                self.next_socket += 1;
                self.renewal = Renewal::SettingUp(self.open(now, socket, out));
            }
            Renewal::SettingUp(su) if now >= su.deadline => {
                let e = AgentError::Timeout {
                    provider: PROVIDER,
                    detail: format!(
                        "no {} within {:?}",
                        su.stage.waiting_for(),
                        self.s.connect_timeout
                    ),
                };
                self.renewal = self.renewal_failed(now, su.socket, &e, out);
            }
            _ => {}
        }
        if self.keypad.deadline().is_some_and(|d| now >= d) {
            if let Some(text) = self.keypad.take() {
                self.keypad_turn(text, out);
            }
        }
        self.maybe_switch(now, out);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        if let Some(su) = self.setup {
            return Some(su.deadline);
        }
        let renewal = match self.renewal {
            Renewal::Waiting { at } => Some(at),
            Renewal::SettingUp(su) => Some(su.deadline),
            Renewal::Off | Renewal::Ready { .. } => None,
        };
        [renewal, self.keypad.deadline()]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
