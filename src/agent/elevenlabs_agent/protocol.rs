//! One ElevenLabs Agents conversation as a sans-IO protocol ([`WsProtocol`]): the client
//! data after the upgrade, the metadata deadline, caller audio in chunks, the server's
//! messages (parent module's table) and the keypad, with `now` passed in. The shared driver
//! ([`crate::agent::driver`]) does the socket.

use super::{
    EARLY_AUDIO, PROVIDER, ServerMessage, Settings, TOOLS_WARNED, client_data, parse_format,
    parse_server_message, protocol_err, provider_err,
};
use crate::agent::driver::{Closed, Out, ServerMsg, SocketId, WsProtocol};
use crate::agent::keypad::Keypad;
use crate::agent::{AgentError, AgentEvent, AgentInput, CallInfo, Speaker};
use crate::audio::ReplyId;
use crate::audio::convert::{Decoder, Encoder};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::json;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::Instant;
use tracing::{debug, info, trace, warn};

/// The conversation's only socket.
const SOCKET: SocketId = 1;

/// What the conversation's audio converters are, once the metadata has named the formats.
struct Formats {
    encoder: Encoder,
    decoder: Decoder,
    chunk_bytes: usize,
}

/// Where the next agent audio belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boundary {
    /// Audio continues the current reply.
    None,
    /// The caller's turn was transcribed: the next audio starts a new reply; a tool call
    /// before it belongs to no spoken reply.
    UserTurn,
    /// The current reply was interrupted: the next audio starts a new reply; a tool call
    /// before it belongs to the interrupted reply.
    Interrupted,
}

/// One call's ElevenLabs Agents protocol.
pub(crate) struct Conversation {
    s: Arc<Settings>,
    rate_hz: u32,
    /// `conversation_initiation_client_data`, sent once the socket is open.
    client_data: String,
    url: String,
    /// Connecting and the metadata share this deadline.
    deadline: Instant,
    open: bool,
    formats: Option<Formats>,
    early: VecDeque<Bytes>,
    wire: Vec<u8>,
    reply: ReplyId,
    boundary: Boundary,
    last_interrupt: i64,
    keypad: Keypad,
    /// The agent's last reply text, held until the next turn (see the module table).
    agent_said: Option<String>,
    /// The last `error` event, for the reason of the close that follows it.
    last_error: Option<String>,
}

impl Conversation {
    /// The conversation of `call` at `url`, to be connected and to have its metadata by
    /// `deadline`.
    pub(super) fn new(s: Arc<Settings>, call: &CallInfo, url: String, deadline: Instant) -> Self {
        if !call.tools.is_empty() && !TOOLS_WARNED.swap(true, Ordering::Relaxed) {
            warn!(
                tools = call.tools.len(),
                "tools are configured: ElevenLabs sends client_tool_call only if the agent's \
                 client_events include client_tool_call (not in the default list) and the agent has \
                 client tools of the same names (`voicegate tools --format elevenlabs`)"
            );
        }
        Conversation {
            client_data: client_data(&s, call),
            s,
            rate_hz: call.rate_hz,
            url,
            deadline,
            open: false,
            formats: None,
            early: VecDeque::new(),
            wire: Vec::with_capacity(4096),
            reply: ReplyId(1),
            boundary: Boundary::UserTurn,
            last_interrupt: -1,
            keypad: Keypad::default(),
            agent_said: None,
            last_error: None,
        }
    }

    fn send(out: &mut Vec<Out>, text: String) {
        out.push(Out::Send {
            socket: SOCKET,
            text,
        });
    }

    /// Sends the encoded caller audio kept in `wire` as one `user_audio_chunk`.
    fn send_audio(&mut self, out: &mut Vec<Out>) {
        let mut text = String::with_capacity(24 + self.wire.len().div_ceil(3) * 4);
        text.push_str("{\"user_audio_chunk\":\"");
        B64.encode_string(&self.wire[..], &mut text);
        text.push_str("\"}");
        self.wire.clear();
        Self::send(out, text);
    }

    /// Typed digits as a caller turn: a `user_message` (`UserMessagePayload`), which the
    /// agent answers (a `contextual_update` would only add context, without a reply).
    fn keypad_turn(text: String, out: &mut Vec<Out>) {
        info!(text = %text, "keypad turn");
        Self::send(
            out,
            json!({"type": "user_message", "text": text}).to_string(),
        );
    }

    /// The held reply text goes to the call's record.
    fn flush_agent_said(&mut self, out: &mut Vec<Out>) {
        if let Some(text) = self.agent_said.take() {
            out.push(Out::Event(AgentEvent::Transcript {
                speaker: Speaker::Agent,
                text,
            }));
        }
    }

    fn closed(&mut self, c: Closed, out: &mut Vec<Out>) {
        if !self.open {
            return out.push(Out::Fail(AgentError::Connect {
                provider: PROVIDER,
                detail: c.detail,
            }));
        }
        match c.frame {
            Some((1000, reason)) => {
                info!(reason = %reason, "elevenlabs ended the conversation");
                self.flush_agent_said(out);
                out.push(Out::Event(AgentEvent::Ended {
                    reason: format!("elevenlabs closed the conversation: {reason}"),
                }));
                out.push(Out::Stop);
            }
            Some((code, reason)) => {
                let error = self
                    .last_error
                    .take()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                out.push(Out::Fail(provider_err(format!(
                    "closed with code {code}: {reason}{error}"
                ))));
            }
            None => out.push(Out::Fail(provider_err(c.detail))),
        }
    }

    fn on_metadata(&mut self, input: &str, output: &str, id: &str) -> Result<(), AgentError> {
        let (Some(out_fmt), Some(in_fmt)) = (parse_format(output), parse_format(input)) else {
            return Err(protocol_err(format!(
                "unusable audio formats: input {input:?}, output {output:?}"
            )));
        };
        let encoder =
            Encoder::new(self.rate_hz, in_fmt).map_err(|e| protocol_err(e.to_string()))?;
        let decoder =
            Decoder::new(out_fmt, self.rate_hz).map_err(|e| protocol_err(e.to_string()))?;
        info!(
            conversation_id = id,
            input, output, "elevenlabs conversation started"
        );
        let mut f = Formats {
            encoder,
            decoder,
            chunk_bytes: in_fmt.bytes_per_ms() * self.s.chunk_ms as usize,
        };
        for bytes in self.early.drain(..) {
            f.encoder.encode_le_bytes(&bytes, &mut self.wire);
        }
        self.formats = Some(f);
        Ok(())
    }

    fn on_audio(
        &mut self,
        id: i64,
        b64: Option<String>,
        out: &mut Vec<Out>,
    ) -> Result<(), AgentError> {
        if id <= self.last_interrupt {
            trace!(event_id = id, "audio from before the interruption dropped");
            return Ok(());
        }
        let Some(f) = self.formats.as_mut() else {
            return Err(protocol_err(
                "audio before conversation_initiation_metadata",
            ));
        };
        let Some(b64) = b64 else { return Ok(()) };
        let bytes = B64
            .decode(b64)
            .map_err(|e| protocol_err(format!("audio base64: {e}")))?;
        let mut samples = Vec::with_capacity(8192);
        f.decoder.decode(&bytes, &mut samples);
        if self.boundary != Boundary::None {
            self.reply = ReplyId(self.reply.0 + 1);
            self.boundary = Boundary::None;
        }
        if !samples.is_empty() {
            out.push(Out::Event(AgentEvent::Audio {
                reply: self.reply,
                samples,
            }));
        }
        Ok(())
    }

    /// A client tool call, tied to the reply being spoken or the one just interrupted.
    fn on_tool_call(&mut self, id: String, name: String, arguments: String, out: &mut Vec<Out>) {
        let tied = match self.boundary {
            Boundary::UserTurn => None,
            Boundary::None | Boundary::Interrupted => Some(self.reply),
        };
        info!(tool = name.as_str(), "elevenlabs: client tool call");
        out.push(Out::Event(AgentEvent::ToolCall {
            call_id: id,
            name,
            arguments,
            reply: tied,
        }));
    }

    /// One server message; an error ends the conversation.
    /// ElevenLabs cut the agent off: audio of that event and before is dropped.
    fn on_interruption(&mut self, event_id: i64, out: &mut Vec<Out>) {
        self.last_interrupt = self.last_interrupt.max(event_id);
        if let Some(f) = self.formats.as_mut() {
            f.decoder.reset();
        }
        self.boundary = Boundary::Interrupted;
        debug!(event_id, "elevenlabs: interruption");
        out.push(Out::Event(AgentEvent::SpeechStarted));
    }

    /// An `error` event: kept for the close that follows a fatal one (with `code`).
    fn on_error(
        &mut self,
        kind: &str,
        code: Option<i64>,
        error_type: Option<String>,
        reason: Option<String>,
    ) {
        let error_type = error_type.unwrap_or_default();
        let reason = reason.unwrap_or_default();
        warn!(
            kind,
            code,
            error_type = error_type.as_str(),
            reason = reason.as_str(),
            "elevenlabs reported an error"
        );
        let code = code.unwrap_or(0);
        self.last_error = Some(format!("error_event {code}: {error_type}: {reason}"));
    }

    fn on_message(&mut self, message: ServerMessage, out: &mut Vec<Out>) -> Result<(), AgentError> {
        match message {
            ServerMessage::Metadata {
                conversation_id,
                input_format,
                output_format,
            } => {
                self.on_metadata(&input_format, &output_format, &conversation_id)?;
                if !self.wire.is_empty() {
                    self.send_audio(out);
                }
            }
            ServerMessage::Audio {
                event_id,
                audio_base_64,
            } => self.on_audio(event_id, audio_base_64, out)?,
            ServerMessage::Interruption { event_id } => self.on_interruption(event_id, out),
            ServerMessage::Ping { event_id } => {
                Self::send(
                    out,
                    json!({"type": "pong", "event_id": event_id}).to_string(),
                );
            }
            ServerMessage::UserTranscript { text } => {
                self.boundary = Boundary::UserTurn;
                self.flush_agent_said(out);
                if let Some(text) = text {
                    out.push(Out::Event(AgentEvent::Transcript {
                        speaker: Speaker::Caller,
                        text,
                    }));
                }
            }
            ServerMessage::AgentResponse { text } => {
                if let Some(t) = std::mem::replace(&mut self.agent_said, text) {
                    out.push(Out::Event(AgentEvent::Transcript {
                        speaker: Speaker::Agent,
                        text: t,
                    }));
                }
            }
            ServerMessage::AgentResponseCorrection { corrected } => {
                debug!("elevenlabs: agent response corrected after an interruption");
                if let Some(c) = corrected {
                    // What the caller heard; nothing at all when cut before a word.
                    self.agent_said = (!c.trim().is_empty()).then_some(c);
                }
            }
            ServerMessage::ToolCall {
                tool_call_id,
                tool_name,
                arguments,
            } => self.on_tool_call(tool_call_id, tool_name, arguments, out),
            ServerMessage::MalformedToolCall => {
                warn!("client_tool_call without tool_name or tool_call_id; ignored");
            }
            ServerMessage::Error {
                kind,
                code,
                error_type,
                reason,
            } => self.on_error(&kind, code, error_type, reason),
            ServerMessage::Other { kind } => {
                trace!(kind = kind.as_str(), "elevenlabs event ignored")
            }
        }
        Ok(())
    }
}

impl WsProtocol for Conversation {
    fn start(&mut self, now: Instant, out: &mut Vec<Out>) {
        out.push(Out::Open {
            socket: SOCKET,
            url: self.url.clone(),
            headers: Vec::new(),
            timeout: self.deadline.saturating_duration_since(now),
        });
    }

    fn handle_input(&mut self, now: Instant, input: AgentInput, out: &mut Vec<Out>) {
        match input {
            AgentInput::Audio(bytes) => match self.formats.as_mut() {
                None => {
                    if self.early.len() == (EARLY_AUDIO.as_millis() / 20) as usize {
                        self.early.pop_front();
                    }
                    self.early.push_back(bytes);
                }
                Some(f) => {
                    f.encoder.encode_le_bytes(&bytes, &mut self.wire);
                    if self.wire.len() >= f.chunk_bytes {
                        self.send_audio(out);
                    }
                }
            },
            AgentInput::ToolResult { call_id, output } => {
                let is_error = crate::tools::http::is_error_result(&output);
                let msg = json!({
                    "type": "client_tool_result",
                    "tool_call_id": call_id,
                    "result": output,
                    "is_error": is_error,
                });
                debug!(tool_call_id = %call_id, is_error, "client_tool_result");
                Self::send(out, msg.to_string());
            }
            AgentInput::Dtmf(d) => {
                debug!(digit = %d, "dtmf");
                if let Some(text) = self.keypad.push_at(d, now) {
                    Self::keypad_turn(text, out);
                }
            }
            // Playout frames come only to agents that ask for them; this one does not.
            AgentInput::Interrupted { .. }
            | AgentInput::PlayedOut { .. }
            | AgentInput::Playout(_) => {}
        }
    }

    fn handle_server(
        &mut self,
        _now: Instant,
        _socket: SocketId,
        msg: ServerMsg<'_>,
        out: &mut Vec<Out>,
    ) {
        match msg {
            ServerMsg::Opened => {
                self.open = true;
                Self::send(out, self.client_data.clone());
                debug!("elevenlabs conversation opened; waiting for metadata");
            }
            ServerMsg::Closed(c) => self.closed(c, out),
            ServerMsg::Text(text) => {
                let Ok(message) = parse_server_message(text) else {
                    warn!(
                        len = text.len(),
                        "elevenlabs sent a message that is not JSON; ignored"
                    );
                    return;
                };
                if let Err(e) = self.on_message(message, out) {
                    out.push(Out::Fail(e));
                }
            }
        }
    }

    fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Out>) {
        if self.formats.is_none() && now >= self.deadline {
            return out.push(Out::Fail(AgentError::Timeout {
                provider: PROVIDER,
                detail: "no conversation_initiation_metadata".into(),
            }));
        }
        if self.keypad.deadline().is_some_and(|d| now >= d) {
            if let Some(text) = self.keypad.take() {
                Self::keypad_turn(text, out);
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let metadata = self.formats.is_none().then_some(self.deadline);
        [metadata, self.keypad.deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    fn finish(&mut self, out: &mut Vec<Out>) {
        // The call is over; the record may still take the last reply's text.
        self.flush_agent_said(out);
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
