//! The per-call task: owns the AudioSocket connection's two halves, the agent session and the
//! playout buffer, and `select!`s over them.
//!
//! Audio path of one call:
//!
//! ```text
//! Asterisk ─0x10..0x18 frame─▶ decode ─Bytes (no copy)─▶ AgentInput::Audio ─▶ agent task
//! agent task ─AgentEvent::Audio (slin, call rate)─▶ PlayoutBuffer ─20 ms tick─▶ encode ─▶ Asterisk
//! ```
//!
//! Rules it keeps: one frame every 20 ms for the whole call (silence when the agent has
//! nothing to say, since Asterisk hangs up after 2 s of silence both ways); never block on the
//! agent (`try_send`, a full input channel drops the frame and counts it); a barge-in flushes
//! the playout buffer before the next tick; a failed agent ends the session with `0x00` so the
//! dialplan's next priority (the operator queue) runs.

use crate::agent::{AgentEvent, AgentInput, CallInfo, SharedAgent, Speaker};
use crate::audio::{PlayoutBuffer, PlayoutClock, ReplyId};
use crate::audiosocket::codec::{self, CodecError, Message, SlinRate};
use bytes::BytesMut;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};
use uuid::Uuid;

/// How long a single frame write may block before the call is given up, since a peer that
/// stops reading would otherwise stall this call's clock.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Before Asterisk's first audio frame tells the call's rate, silence is sent at 8 kHz
/// after this long, so `AudioSocket()` does not hang up on 2 s of silence.
const KEEPALIVE_BEFORE_AUDIO: Duration = Duration::from_millis(500);

/// Per-call settings taken from the config.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// Bound of the playout buffer.
    pub playout_max: Duration,
    /// Close the call when Asterisk sends nothing for this long.
    pub idle_timeout: Duration,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            playout_max: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(5),
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    /// Asterisk closed the connection (the caller hung up, or the dialplan moved on).
    CallerHungUp,
    /// The agent ended the conversation; voicegate sent `0x00` after the last words played.
    AgentEnded(String),
    /// The agent failed; voicegate sent `0x00` so the dialplan reaches the operators.
    Fallback(String),
    /// Asterisk sent bytes that are not AudioSocket, or an error frame.
    ProtocolError(String),
    /// Nothing arrived from Asterisk for the idle timeout (half-open connection).
    IdleTimeout,
    /// voicegate is shutting down and the grace period ran out.
    Shutdown,
    /// Writing to Asterisk failed or blocked too long.
    WriteFailed(String),
}

/// What is kept of a finished call.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallSummary {
    /// The AudioSocket call id.
    pub call_id: Uuid,
    /// Agent provider name.
    pub agent: &'static str,
    /// Wall-clock start.
    pub started: SystemTime,
    /// Length of the call.
    pub duration: Duration,
    /// Sample rate of the call's audio, Hz (0 if no audio arrived).
    pub rate_hz: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Audio frames received from Asterisk.
    pub frames_in: u64,
    /// Audio frames sent to Asterisk (agent audio and silence).
    pub frames_out: u64,
    /// Frames of agent audio among `frames_out`.
    pub agent_frames_out: u64,
    /// Caller frames dropped because the agent's input channel was full.
    pub frames_dropped_in: u64,
    /// Agent samples dropped because the playout buffer was full.
    pub playout_overflow_samples: u64,
    /// Frames cut short while a reply was still streaming.
    pub underruns: u64,
    /// Ticks skipped because this task fell more than 60 ms behind.
    pub late_skipped_frames: u64,
    /// Times the caller interrupted the agent.
    pub barge_ins: u64,
    /// DTMF digits from the caller, in order.
    pub dtmf: String,
    /// The conversation, in order.
    pub transcript: Vec<(Speaker, String)>,
}

/// Runs one call to its end. `call_id` has been read already; `read_buf` holds any bytes
/// read after it. Returns what is kept of the call; it never panics on input.
pub async fn run_session<R, W>(
    reader: R,
    writer: W,
    read_buf: BytesMut,
    info: CallInfo,
    agent: SharedAgent,
    params: SessionParams,
    hangup: CancellationToken,
) -> CallSummary
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    run_session_with_input(reader, writer, read_buf, info, agent, params, hangup, None).await
}

/// [`run_session`] with a second source of agent input besides the AudioSocket stream
/// (DTMF from ARI `ChannelDtmfReceived` in Stasis mode): each [`AgentInput::Dtmf`] is counted
/// in [`CallSummary::dtmf`] and forwarded like a `0x03` digit; other inputs are forwarded as
/// they are. Inputs arriving before the agent starts (first audio) are dropped.
#[allow(clippy::too_many_arguments)] // run_session's arguments plus the one input
pub async fn run_session_with_input<R, W>(
    mut reader: R,
    mut writer: W,
    mut read_buf: BytesMut,
    mut info: CallInfo,
    agent: SharedAgent,
    params: SessionParams,
    hangup: CancellationToken,
    mut extra_input: Option<mpsc::Receiver<AgentInput>>,
) -> CallSummary
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let started = SystemTime::now();
    let start = Instant::now();
    let mut s = CallSummary {
        call_id: info.call_id,
        agent: agent.name(),
        started,
        duration: Duration::ZERO,
        rate_hz: 0,
        outcome: Outcome::CallerHungUp,
        frames_in: 0,
        frames_out: 0,
        agent_frames_out: 0,
        frames_dropped_in: 0,
        playout_overflow_samples: 0,
        underruns: 0,
        late_skipped_frames: 0,
        barge_ins: 0,
        dtmf: String::new(),
        transcript: Vec::new(),
    };

    // Known once the first audio frame arrives; until then only keepalive silence at 8 kHz.
    let mut rate: Option<SlinRate> = None;
    let mut agent_session = None;
    let mut playout = PlayoutBuffer::new(8_000, params.playout_max);
    let mut frame: Vec<i16> = vec![0; SlinRate::Hz8000.samples_per_frame()];
    let mut out = BytesMut::with_capacity(4 + SlinRate::Hz8000.bytes_per_frame());
    let mut clock = PlayoutClock::new(start + KEEPALIVE_BEFORE_AUDIO);
    let mut last_input = start;
    // After ReplyDone, tell the agent when the reply has been fully heard.
    let mut awaiting_played_out: Option<ReplyId> = None;
    // Set when the agent ended the call: hang up once the playout buffer is empty.
    let mut ending: Option<String> = None;

    // In Stasis mode a digit may arrive twice: ARI ChannelDtmfReceived and 0x03 through the bridge.
    let mut dtmf_dedup = DtmfDedup::default();

    // One timer for the whole call, re-armed each tick (no timer churn per event).
    let tick = sleep_until(clock.deadline());
    tokio::pin!(tick);
    let outcome = loop {
        tokio::select! {
            biased;
            () = hangup.cancelled() => break Outcome::Shutdown,
            () = &mut tick => {
                let tick_rate = rate.unwrap_or(SlinRate::Hz8000);
                let popped = playout.pop_frame(&mut frame);
                if popped.agent_samples > 0 {
                    s.agent_frames_out += 1;
                }
                s.underruns += popped.underrun as u64;
                out.clear();
                codec::encode_audio_samples(tick_rate, &frame, &mut out);
                if let Err(e) = write_frame(&mut writer, &out).await {
                    break Outcome::WriteFailed(e);
                }
                s.frames_out += 1;
                let now = Instant::now();
                clock.advance(now);
                tick.as_mut().reset(clock.deadline());
                // Checked once per tick: a half-open connection sends nothing.
                if now.duration_since(last_input) > params.idle_timeout {
                    break Outcome::IdleTimeout;
                }
                trace!(queued_ms = playout.queued().as_millis() as u64, "frame out");
                if playout.is_empty() {
                    if let (Some(reply), Some(agent)) = (awaiting_played_out.take(), agent_session.as_ref()) {
                        let agent: &crate::agent::AgentSession = agent;
                        let _ = agent.input.try_send(AgentInput::PlayedOut { reply });
                    }
                    if let Some(reason) = ending.take() {
                        break Outcome::AgentEnded(reason);
                    }
                }
            }
            read = read_message(&mut reader, &mut read_buf) => {
                last_input = Instant::now();
                match read {
                    Ok(Some(Message::Audio { rate: r, payload })) => {
                        s.frames_in += 1;
                        if rate.is_none() {
                            rate = Some(r);
                            s.rate_hz = r.hz();
                            info.rate_hz = r.hz();
                            playout = PlayoutBuffer::new(r.hz(), params.playout_max);
                            frame = vec![0; r.samples_per_frame()];
                            out = BytesMut::with_capacity(4 + r.bytes_per_frame());
                            // Start the 20 ms grid now: first agent audio goes out promptly.
                            clock = PlayoutClock::new(Instant::now());
                            tick.as_mut().reset(clock.deadline());
                            debug!(rate_hz = r.hz(), "first audio; starting agent");
                            agent_session = Some(agent.start(info.clone()));
                        } else if rate != Some(r) {
                            trace!(rate_hz = r.hz(), "frame at another rate ignored");
                            continue;
                        }
                        if let Some(a) = agent_session.as_ref() {
                            let a: &crate::agent::AgentSession = a;
                            match a.input.try_send(AgentInput::Audio(payload)) {
                                Ok(()) => {}
                                Err(TrySendError::Full(_)) => s.frames_dropped_in += 1,
                                Err(TrySendError::Closed(_)) => {}
                            }
                        }
                    }
                    Ok(Some(Message::Dtmf(d))) => {
                        if dtmf_dedup.duplicate(d, false, Instant::now()) {
                            continue;
                        }
                        info!(digit = %d, "dtmf");
                        s.dtmf.push(d);
                        if let Some(a) = agent_session.as_ref() {
                            let a: &crate::agent::AgentSession = a;
                            let _ = a.input.try_send(AgentInput::Dtmf(d));
                        }
                    }
                    Ok(Some(Message::Hangup)) | Ok(None) => break Outcome::CallerHungUp,
                    Ok(Some(Message::Error(code))) => break Outcome::ProtocolError(format!("asterisk sent error frame, code {code}")),
                    Ok(Some(Message::CallId(id))) => break Outcome::ProtocolError(format!("second call id {id}")),
                    Err(ReadError::Codec(e)) => break Outcome::ProtocolError(e.to_string()),
                    Err(ReadError::Io(e)) => break Outcome::ProtocolError(format!("read: {e}")),
                }
            }
            ev = next_event(&mut agent_session) => match ev {
                Some(AgentEvent::Audio { reply, samples }) => {
                    playout.push(reply, &samples);
                }
                Some(AgentEvent::ReplyDone { reply }) => {
                    playout.mark_reply_complete();
                    awaiting_played_out = Some(reply);
                }
                Some(AgentEvent::SpeechStarted) => {
                    let flushed = playout.flush();
                    awaiting_played_out = None;
                    if let Some(reply) = flushed.reply {
                        s.barge_ins += 1;
                        info!(reply = reply.0, heard_ms = flushed.heard_ms, dropped_ms = flushed.dropped_samples as u64 * 1000 / playout.rate_hz() as u64, "barge-in: playout flushed");
                        if let Some(a) = agent_session.as_ref() {
                            let a: &crate::agent::AgentSession = a;
                            let _ = a.input.try_send(AgentInput::Interrupted { reply, heard_ms: flushed.heard_ms });
                        }
                    }
                }
                Some(AgentEvent::Transcript { speaker, text }) => {
                    info!(?speaker, text = %text, "transcript");
                    s.transcript.push((speaker, text));
                }
                Some(AgentEvent::ToolCall { call_id, name, .. }) => {
                    warn!(tool = %name, "agent asked for a tool that is not configured");
                    if let Some(a) = agent_session.as_ref() {
                        let a: &crate::agent::AgentSession = a;
                        let output = serde_json::json!({"error": format!("unknown tool {name}")}).to_string();
                        let _ = a.input.try_send(AgentInput::ToolResult { call_id, output });
                    }
                }
                Some(AgentEvent::Ended { reason }) => {
                    info!(reason = %reason, "agent ended the call");
                    if playout.is_empty() {
                        break Outcome::AgentEnded(reason);
                    }
                    ending = Some(reason);
                }
                Some(AgentEvent::Failed(e)) => {
                    warn!(error = %e, "agent failed; handing the call to the dialplan fallback");
                    break Outcome::Fallback(e.to_string());
                }
                None => {
                    warn!("agent task ended without a reason; handing the call to the fallback");
                    break Outcome::Fallback("agent task ended".into());
                }
            },
            input = next_extra(&mut extra_input) => match input {
                Some(input) => {
                    if let AgentInput::Dtmf(d) = input {
                        if dtmf_dedup.duplicate(d, true, Instant::now()) {
                            continue;
                        }
                        info!(digit = %d, "dtmf (ari)");
                        s.dtmf.push(d);
                    }
                    if let Some(a) = agent_session.as_ref() {
                        let a: &crate::agent::AgentSession = a;
                        let _ = a.input.try_send(input);
                    }
                }
                None => extra_input = None,
            },
        }
    };

    // Asterisk returns from AudioSocket() on 0x00 or a close; for anything but the caller's
    // own hangup say goodbye explicitly, then close.
    if !matches!(outcome, Outcome::CallerHungUp | Outcome::WriteFailed(_)) {
        out.clear();
        codec::encode(&Message::Hangup, &mut out);
        let _ = write_frame(&mut writer, &out).await;
    }
    let _ = timeout(WRITE_TIMEOUT, writer.shutdown()).await;
    drop(agent_session);
    s.outcome = outcome;
    s.duration = start.elapsed();
    s.playout_overflow_samples = playout.overflow_samples();
    s.late_skipped_frames = clock.skipped_frames();
    s
}

async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> Result<(), String> {
    match timeout(WRITE_TIMEOUT, writer.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("write blocked for more than {WRITE_TIMEOUT:?}")),
    }
}

async fn next_event(session: &mut Option<crate::agent::AgentSession>) -> Option<AgentEvent> {
    match session {
        Some(s) => s.events.recv().await,
        None => std::future::pending().await,
    }
}

/// Drops the second copy of a DTMF digit that arrives from both sources of a Stasis call:
/// ARI `ChannelDtmfReceived` and AudioSocket `0x03` through the bridge (the same key press
/// seen twice). A digit repeated from the same source is a new key press and always passes.
#[derive(Debug, Default)]
struct DtmfDedup {
    /// Last digit, whether it came from ARI, when.
    last: Option<(char, bool, Instant)>,
}

impl DtmfDedup {
    /// Two copies of one key press arrive within this of each other.
    const WINDOW: Duration = Duration::from_millis(1_000);

    /// True if `digit` from this source, arriving at `now`, is the other source's copy of
    /// the last digit.
    fn duplicate(&mut self, digit: char, from_ari: bool, now: Instant) -> bool {
        if let Some((d, src, at)) = self.last {
            if d == digit && src != from_ari && now.duration_since(at) <= Self::WINDOW {
                self.last = None;
                return true;
            }
        }
        self.last = Some((digit, from_ari, now));
        false
    }
}

async fn next_extra(extra: &mut Option<mpsc::Receiver<AgentInput>>) -> Option<AgentInput> {
    match extra {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Why reading a message failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not AudioSocket.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads the next message. `Ok(None)` is a clean close between frames; a close in the middle
/// of a frame is an error. Cancel-safe: bytes read stay in `buf`.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Message>, ReadError> {
    loop {
        if let Some(m) = codec::decode(buf)? {
            return Ok(Some(m));
        }
        buf.reserve(1024);
        if reader.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed inside a frame ({} bytes pending)",
                        buf.len()
                    ),
                )))
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtmf_seen_by_both_sources_counts_once() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut d = DtmfDedup::default();
        assert!(!d.duplicate('5', true, ms(0)));
        assert!(
            d.duplicate('5', false, ms(300)),
            "0x03 copy of an ARI digit"
        );
        assert!(
            !d.duplicate('5', false, ms(900)),
            "a second press of the same key"
        );
        assert!(
            !d.duplicate('5', false, ms(1_200)),
            "same source again: a new press"
        );
        assert!(!d.duplicate('5', true, ms(2_500)), "too late to be a copy");
        assert!(!d.duplicate('6', false, ms(2_600)), "another key");
    }
}
