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
//!
//! Abuse bounds (issue 14; `docs/limits.md`): caller audio arriving faster than real time
//! beyond [`SessionParams::input_allowance`] is dropped before it reaches the agent and
//! counted (`voicegate_input_overrun_frames_total`), so no queue behind the session (agent
//! channel, delay lines, encoders, WebSockets) sees more than real time plus that allowance;
//! DTMF is accepted at most at a keypad's pace ([`DTMF_RATE_PER_S`], burst
//! [`DTMF_BURST`]) and at most [`MAX_DTMF_KEPT`] digits are kept per call; digits are logged
//! at debug only.

use crate::agent::{AgentEvent, AgentInput, CallInfo, SharedAgent, Speaker, TurnLatency};
use crate::audio::{PlayoutBuffer, PlayoutClock, ReplyId};
use crate::audiosocket::codec::{self, CodecError, Message, SlinRate};
use crate::tools::{Terminal, ToolRegistry, ToolRunner, runner::ToolStep};
use bytes::BytesMut;
use std::sync::Arc;
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

/// DTMF digits per second accepted from one call, sustained. A keypad sends at most about
/// 12.5 (40 ms tone, 40 ms pause); more is a flood, dropped and counted.
pub const DTMF_RATE_PER_S: u32 = 15;
/// DTMF digits accepted at once before [`DTMF_RATE_PER_S`] applies.
pub const DTMF_BURST: u32 = 20;
/// DTMF digits kept in a call's summary and record; later digits still reach the agent
/// (within the rate) and are counted in [`CallSummary::dtmf_dropped`].
pub const MAX_DTMF_KEPT: usize = 256;

/// Per-call settings taken from the config.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// How far caller audio may run ahead of real time (a burst after network jitter)
    /// before frames are dropped and counted (default 1 s).
    pub input_allowance: Duration,
    /// Before Asterisk's first audio frame, silence goes out at 8 kHz after this long
    /// (default 500 ms; zero for calls whose media must be prompted, see
    /// [`crate::call::directory::CallDetails::media_at_once`]).
    pub keepalive_before_audio: Duration,
    /// Bound of the playout buffer.
    pub playout_max: Duration,
    /// Close the call when Asterisk sends nothing for this long.
    pub idle_timeout: Duration,
    /// Longest call (`guard.max_call_s`); then `0x00` so the dialplan moves on. `None`: no limit.
    pub max_duration: Option<Duration>,
    /// No agent audio for this long while the caller is silent and nothing plays hands the
    /// call to the fallback (`fallback.agent_silence_s`). `None`: off.
    pub agent_silence: Option<Duration>,
    /// How a failed call reaches a human before the session sends `0x00`.
    pub handover: crate::fallback::SharedHandover,
    /// Beaten on every playout tick, so the watchdog sees call clocks make progress.
    pub clock: Option<std::sync::Arc<crate::health::Heartbeat>>,
    /// The tools the agent may call (declared to it through [`CallInfo::tools`]).
    pub tools: Arc<ToolRegistry>,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            input_allowance: Duration::from_secs(1),
            keepalive_before_audio: KEEPALIVE_BEFORE_AUDIO,
            playout_max: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(5),
            max_duration: None,
            agent_silence: None,
            handover: std::sync::Arc::new(crate::fallback::DialplanHandover),
            clock: None,
            tools: Arc::new(ToolRegistry::empty()),
        }
    }
}

/// Mean absolute slin amplitude above which a caller frame counts as speech (about
/// -40 dBFS), for the agent-silence timer and turn latencies.
const VOICED_MEAN_ABS: u32 = 330;

/// Whether a slin little-endian frame holds speech rather than silence or line noise.
fn is_voiced(payload: &[u8]) -> bool {
    let n = payload.len() / 2;
    if n == 0 {
        return false;
    }
    let sum: u32 = payload
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]).unsigned_abs() as u32)
        .sum();
    sum / n as u32 > VOICED_MEAN_ABS
}

pub use crate::records::ToolCallRecord;

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
    /// The agent handed the caller to a human (`transfer_to_operator`); voicegate sent
    /// `0x00` after the words before it played. The detail says how: `dialplan` (the
    /// dialplan's next priority queues the caller) or the transfer's name (`ari`).
    Operator(String),
    /// voicegate is shutting down and the grace period ran out.
    Shutdown,
    /// Writing to Asterisk failed or blocked too long.
    WriteFailed(String),
    /// The call reached `guard.max_call_s`; voicegate sent `0x00`.
    MaxDuration,
    /// The guard refused the connection before any agent started; the reason label. Not
    /// produced since refusals are counted rather than recorded (`docs/limits.md`); kept so
    /// older records keep their label.
    Rejected(String),
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
    /// Underruns: frames cut short while a reply was still streaming — the agent's audio
    /// arrived late (network, a slow provider, a late echo frame).
    pub underruns: u64,
    /// Frames sent with no agent audio while no reply was streaming — the agent had nothing
    /// to say (listening, thinking). Not a fault; kept apart from `underruns`.
    pub idle_frames: u64,
    /// Ticks skipped because this task fell more than 60 ms behind.
    pub late_skipped_frames: u64,
    /// Times the caller interrupted the agent.
    pub barge_ins: u64,
    /// DTMF digits from the caller, in order (at most [`MAX_DTMF_KEPT`]).
    pub dtmf: String,
    /// DTMF digits not kept in [`Self::dtmf`]: beyond [`MAX_DTMF_KEPT`] or faster than
    /// [`DTMF_RATE_PER_S`].
    pub dtmf_dropped: u64,
    /// Caller frames dropped because they arrived faster than real time beyond
    /// [`SessionParams::input_allowance`].
    pub input_overrun_frames: u64,
    /// The conversation, in order.
    pub transcript: Vec<(Speaker, String)>,
    /// The caller's number, when known (ARI); masked or dropped by the records config.
    pub caller_number: Option<String>,
    /// Per turn: caller speech end (last voiced frame) → first audio of the agent's reply, ms.
    pub turn_latencies_ms: Vec<u32>,
    /// Tools the agent called, in order.
    pub tool_calls: Vec<ToolCallRecord>,
    /// Why the call went to the humans, when it did.
    pub fallback: Option<crate::fallback::FallbackReason>,
    /// How long an agent session was up (charged to the daily AI budget).
    pub agent_time: Duration,
    /// Per-turn latency, for agents that report it ([`AgentEvent::TurnLatency`]).
    pub turns: Vec<TurnLatency>,
}

impl CallSummary {
    /// The summary of a call that never reached an agent (refused by the guard, or sent
    /// straight to the fallback): zero counters, `started` now.
    pub fn without_agent(call_id: Uuid, agent: &'static str, outcome: Outcome) -> Self {
        CallSummary {
            call_id,
            agent,
            started: SystemTime::now(),
            duration: Duration::ZERO,
            rate_hz: 0,
            outcome,
            frames_in: 0,
            frames_out: 0,
            agent_frames_out: 0,
            frames_dropped_in: 0,
            playout_overflow_samples: 0,
            underruns: 0,
            idle_frames: 0,
            late_skipped_frames: 0,
            barge_ins: 0,
            dtmf: String::new(),
            dtmf_dropped: 0,
            input_overrun_frames: 0,
            transcript: Vec::new(),
            caller_number: None,
            turn_latencies_ms: Vec::new(),
            tool_calls: Vec::new(),
            fallback: None,
            agent_time: Duration::ZERO,
            turns: Vec::new(),
        }
    }
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
    let start = Instant::now();
    let mut s = CallSummary::without_agent(info.call_id, agent.name(), Outcome::CallerHungUp);
    s.caller_number = info.caller_number.clone();
    let m_frames_in = metrics::counter!(crate::health::metrics::FRAMES_IN);
    let m_frames_out = metrics::counter!(crate::health::metrics::FRAMES_OUT);
    let m_lateness = metrics::histogram!(crate::health::metrics::PLAYOUT_LATENESS);
    let mut agent_started: Option<Instant> = None;
    // The agent-silence timer: agent start, agent audio, or caller speech resets it.
    let mut last_activity = start;
    // For turn latency: the caller's last voiced frame since the previous reply began.
    let mut caller_voiced_at: Option<Instant> = None;
    let mut last_reply: Option<ReplyId> = None;
    // Agents with their own VAD get every played frame as an echo reference.
    let playout_reference = agent.wants_playout_reference();
    let live_playout = agent.live_playout();
    // A reply's latency waits here for its first frame on the wire: (latency, when received).
    let mut pending_latency: Option<(TurnLatency, Instant)> = None;

    // Known once the first audio frame arrives; until then only keepalive silence at 8 kHz.
    let mut rate: Option<SlinRate> = None;
    let mut agent_session = None;
    let mut playout = PlayoutBuffer::new(8_000, params.playout_max);
    let mut frame: Vec<i16> = vec![0; SlinRate::Hz8000.samples_per_frame()];
    let mut out = BytesMut::with_capacity(4 + SlinRate::Hz8000.bytes_per_frame());
    let mut clock = PlayoutClock::new(start + params.keepalive_before_audio);
    let mut last_input = start;
    // After ReplyDone, tell the agent when the reply has been fully heard.
    let mut awaiting_played_out: Option<ReplyId> = None;
    // Set when the agent ended the call: hang up once the playout buffer is empty.
    let mut ending: Option<String> = None;
    info.tools = params.tools.specs();
    let mut tools = ToolRunner::new(params.tools.clone(), &info);

    // In Stasis mode a digit may arrive twice: ARI ChannelDtmfReceived and 0x03 through the bridge.
    let mut dtmf_dedup = DtmfDedup::default();
    let mut dtmf_gate = DtmfGate::new(start);
    let mut input_meter = InputMeter::new(params.input_allowance, start);
    let m_overrun = metrics::counter!(crate::health::metrics::INPUT_OVERRUN);

    // One timer for the whole call, re-armed each tick (no timer churn per event).
    let tick = sleep_until(clock.deadline());
    tokio::pin!(tick);
    let outcome = loop {
        tokio::select! {
            biased;
            () = hangup.cancelled() => break Outcome::Shutdown,
            () = &mut tick => {
                let now = Instant::now();
                m_lateness.record(now.saturating_duration_since(clock.deadline()).as_secs_f64());
                if let Some(beat) = &params.clock {
                    beat.beat();
                }
                if params.max_duration.is_some_and(|max| now - start >= max) {
                    break Outcome::MaxDuration;
                }
                if agent_session.is_some()
                    && playout.is_empty()
                    && params.agent_silence.is_some_and(|limit| now - last_activity >= limit)
                {
                    warn!("no agent audio while the caller waits; handing the call to the fallback");
                    s.fallback = Some(crate::fallback::FallbackReason::AgentSilent);
                    break Outcome::Fallback(crate::fallback::FallbackReason::AgentSilent.to_string());
                }
                let tick_rate = rate.unwrap_or(SlinRate::Hz8000);
                let popped = playout.pop_frame(&mut frame);
                if popped.agent_samples > 0 {
                    s.agent_frames_out += 1;
                }
                s.underruns += popped.underrun as u64;
                s.idle_frames += (popped.agent_samples == 0 && !popped.underrun) as u64;
                out.clear();
                codec::encode_audio_samples(tick_rate, &frame, &mut out);
                if let Err(e) = write_frame(&mut writer, &out).await {
                    break Outcome::WriteFailed(e);
                }
                s.frames_out += 1;
                m_frames_out.increment(1);
                if playout_reference {
                    if let Some(a) = agent_session.as_ref() {
                        let a: &crate::agent::AgentSession = a;
                        let _ = a.input.try_send(AgentInput::Playout(frame.clone()));
                    }
                }
                if popped.agent_samples > 0 {
                    if let Some((mut lat, at)) = pending_latency.take_if(|(l, _)| playout.heard_ms(ReplyId(l.reply)) > 0) {
                        lat.first_frame_ms = lat.tts_first_audio_ms.map(|t| t + at.elapsed().as_millis() as u64);
                        info!(reply = lat.reply, first_frame_ms = ?lat.first_frame_ms, "first frame of the reply on the wire");
                        s.turns.push(lat);
                    }
                }
                let skipped = clock.skipped_frames();
                clock.advance(now);
                if live_playout && clock.skipped_frames() > skipped {
                    // A live stream (the echo) keeps its timing: the skipped ticks' audio goes.
                    let n = (clock.skipped_frames() - skipped) as usize * playout.samples_per_frame();
                    let dropped = playout.discard(n);
                    debug!(skipped = clock.skipped_frames() - skipped, dropped_samples = dropped, "clock skipped ticks; live audio dropped");
                }
                tick.as_mut().reset(clock.deadline());
                // Checked once per tick: a half-open connection sends nothing.
                if now.duration_since(last_input) > params.idle_timeout {
                    break Outcome::IdleTimeout;
                }
                trace!(queued_ms = playout.queued().as_millis() as u64, "frame out");
                if let Some(a) = agent_session.as_ref() {
                    tools.retry_unsent(&a.input);
                }
                if tools.terminal_pending() {
                    match tools.poll_terminal(playout.is_empty(), Instant::now()) {
                        Some(Terminal::Hangup) => break Outcome::AgentEnded("agent hung up (hangup tool)".into()),
                        Some(Terminal::Operator { detail }) => break Outcome::Operator(detail),
                        None => {}
                    }
                }
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
                        m_frames_in.increment(1);
                        if is_voiced(&payload) {
                            last_activity = last_input;
                            caller_voiced_at = Some(last_input);
                        }
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
                            agent_started = Some(Instant::now());
                            last_activity = Instant::now();
                        } else if rate != Some(r) {
                            trace!(rate_hz = r.hz(), "frame at another rate ignored");
                            continue;
                        }
                        if !input_meter.admit(payload.len() / 2, r.hz(), last_input) {
                            if s.input_overrun_frames == 0 {
                                warn!(allowance_ms = params.input_allowance.as_millis() as u64, "caller audio arrives faster than real time; dropping the excess");
                            }
                            s.input_overrun_frames += 1;
                            m_overrun.increment(1);
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
                        if !keep_dtmf(&mut dtmf_gate, &mut s, d, Instant::now()) {
                            continue;
                        }
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
            step = tools.next_step() => match step {
                ToolStep::Answer(answer) => {
                    if let Some(a) = agent_session.as_ref() {
                        tools.deliver(&a.input, answer);
                    }
                }
                ToolStep::End(Terminal::Hangup) => break Outcome::AgentEnded("agent hung up (hangup tool)".into()),
                ToolStep::End(Terminal::Operator { detail }) => break Outcome::Operator(detail),
            },
            ev = next_event(&mut agent_session) => match ev {
                Some(AgentEvent::Audio { reply, samples }) => {
                    let now = Instant::now();
                    last_activity = now;
                    if last_reply != Some(reply) {
                        last_reply = Some(reply);
                        if let Some(spoke) = caller_voiced_at.take() {
                            s.turn_latencies_ms.push((now - spoke).as_millis().min(u32::MAX as u128) as u32);
                        }
                    }
                    playout.push(reply, &samples);
                    tools.on_agent_audio(Instant::now());
                }
                Some(AgentEvent::ReplyDone { reply }) => {
                    tools.on_reply_done(reply);
                    playout.mark_reply_complete();
                    awaiting_played_out = Some(reply);
                }
                Some(AgentEvent::TurnLatency(lat)) => {
                    if let Some((old, _)) = pending_latency.replace((lat, Instant::now())) {
                        s.turns.push(old);
                    }
                }
                Some(AgentEvent::SpeechStarted) => {
                    if let Some((lat, _)) = pending_latency.take() {
                        s.turns.push(lat);
                    }
                    let flushed = playout.flush();
                    awaiting_played_out = None;
                    if let (Some(answer), Some(a)) = (tools.on_barge_in(flushed.reply), agent_session.as_ref()) {
                        tools.deliver(&a.input, answer);
                    }
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
                Some(AgentEvent::ToolCall { call_id, name, arguments, reply }) => {
                    s.tool_calls.push(ToolCallRecord { name: name.clone(), arguments: arguments.clone() });
                    if let (Some(answer), Some(a)) = (tools.on_tool_call(call_id, &name, &arguments, reply, Instant::now()), agent_session.as_ref()) {
                        tools.deliver(&a.input, answer);
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
                    s.fallback = Some(crate::fallback::FallbackReason::AgentFailed(e.to_string()));
                    break Outcome::Fallback(e.to_string());
                }
                None if ending.is_some() => {
                    // The agent said Ended and its task finished: let the playout drain.
                    agent_session = None;
                }
                None => {
                    warn!("agent task ended without a reason; handing the call to the fallback");
                    s.fallback = Some(crate::fallback::FallbackReason::AgentFailed("agent task ended".into()));
                    break Outcome::Fallback("agent task ended".into());
                }
            },
            input = next_extra(&mut extra_input) => match input {
                Some(input) => {
                    if let AgentInput::Dtmf(d) = input {
                        if dtmf_dedup.duplicate(d, true, Instant::now()) {
                            continue;
                        }
                        if !keep_dtmf(&mut dtmf_gate, &mut s, d, Instant::now()) {
                            continue;
                        }
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

    if let Some(reason) = &s.fallback {
        let handover = params.handover.clone();
        match timeout(
            crate::fallback::HANDOVER_TIMEOUT,
            handover.hand_over(&info, reason),
        )
        .await
        {
            Ok(handed) => debug!(?handed, via = handover.name(), "fallback handover"),
            Err(_) => warn!(
                via = handover.name(),
                "fallback handover timed out; dialplan fall-through"
            ),
        }
    }
    // Asterisk returns from AudioSocket() on 0x00 or a close; for anything but the caller's
    // own hangup say goodbye explicitly, then close.
    if !matches!(outcome, Outcome::CallerHungUp | Outcome::WriteFailed(_)) {
        out.clear();
        codec::encode(&Message::Hangup, &mut out);
        let _ = write_frame(&mut writer, &out).await;
    }
    let _ = timeout(WRITE_TIMEOUT, writer.shutdown()).await;
    drop(agent_session);
    if let Some((lat, _)) = pending_latency.take() {
        s.turns.push(lat);
    }
    s.outcome = outcome;
    s.duration = start.elapsed();
    s.agent_time = agent_started.map_or(Duration::ZERO, |t| t.elapsed());
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

/// Lets a digit through [`DtmfGate`] and keeps it in the summary (up to [`MAX_DTMF_KEPT`]);
/// false when it is dropped for the rate. Digits are logged at debug; floods as one WARN
/// line at the first drop and a count in the summary and `voicegate_dtmf_dropped_total`.
fn keep_dtmf(gate: &mut DtmfGate, s: &mut CallSummary, d: char, now: Instant) -> bool {
    let reason = if !gate.admit(now) {
        "rate"
    } else if s.dtmf.len() >= MAX_DTMF_KEPT {
        "per_call"
    } else {
        debug!(digit = %d, "dtmf");
        s.dtmf.push(d);
        return true;
    };
    if s.dtmf_dropped == 0 {
        warn!(
            reason,
            "DTMF beyond the per-call bounds; further digits are only counted"
        );
    }
    s.dtmf_dropped += 1;
    metrics::counter!(crate::health::metrics::DTMF_DROPPED, "reason" => reason).increment(1);
    // Past the per-call limit a digit still reaches the agent; past the rate it does not.
    reason == "per_call"
}

/// Token bucket for DTMF digits: [`DTMF_BURST`] at once, then [`DTMF_RATE_PER_S`].
#[derive(Debug)]
struct DtmfGate {
    /// Tokens in thousandths of a digit.
    milli_tokens: u64,
    at: Instant,
}

impl DtmfGate {
    fn new(now: Instant) -> Self {
        DtmfGate {
            milli_tokens: DTMF_BURST as u64 * 1000,
            at: now,
        }
    }

    fn admit(&mut self, now: Instant) -> bool {
        let elapsed_ms = now.saturating_duration_since(self.at).as_millis() as u64;
        self.at = now;
        self.milli_tokens =
            (self.milli_tokens + elapsed_ms * DTMF_RATE_PER_S as u64).min(DTMF_BURST as u64 * 1000);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

/// Meters caller audio against real time: a token bucket of audio time, refilled by wall
/// time and holding at most the allowance. A frame that would overdraw it is dropped.
#[derive(Debug)]
struct InputMeter {
    /// Audio time that may still arrive ahead of real time, µs.
    credit_us: u64,
    cap_us: u64,
    at: Instant,
}

impl InputMeter {
    fn new(allowance: Duration, now: Instant) -> Self {
        let cap_us = allowance.as_micros() as u64;
        InputMeter {
            credit_us: cap_us,
            cap_us,
            at: now,
        }
    }

    /// Whether a frame of `samples` at `rate_hz` arriving at `now` is within real time plus
    /// the allowance; it is charged when it is.
    fn admit(&mut self, samples: usize, rate_hz: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_micros() as u64;
        self.at = now;
        self.credit_us = (self.credit_us + elapsed).min(self.cap_us);
        let cost = samples as u64 * 1_000_000 / rate_hz.max(1) as u64;
        if cost > self.credit_us {
            return false;
        }
        self.credit_us -= cost;
        true
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
    fn input_faster_than_real_time_is_cut_to_the_allowance() {
        let t = Instant::now();
        let mut m = InputMeter::new(Duration::from_millis(200), t);
        // Real time (a 20 ms frame every 20 ms) always passes, for an hour.
        for i in 1..=180_000u64 {
            assert!(m.admit(160, 8000, t + Duration::from_millis(20 * i)));
        }
        // A burst after a stall: the allowance (10 frames), then nothing until time passes.
        let t2 = t + Duration::from_secs(4_000);
        let passed = (0..1000).filter(|_| m.admit(160, 8000, t2)).count();
        assert_eq!(passed, 10);
        assert!(m.admit(160, 8000, t2 + Duration::from_millis(20)));
        assert!(!m.admit(160, 8000, t2 + Duration::from_millis(20)));
        // The cost is audio time, not frames: one 1 s frame at 192 kHz costs 1 s.
        let mut m = InputMeter::new(Duration::from_millis(1000), t);
        assert!(m.admit(192_000, 192_000, t));
        assert!(!m.admit(192, 192_000, t));
    }

    #[test]
    fn dtmf_gate_allows_a_keypad_and_cuts_a_flood() {
        let t = Instant::now();
        let mut g = DtmfGate::new(t);
        // A fast human: 10 digits per second for a minute.
        for i in 0..600u64 {
            assert!(g.admit(t + Duration::from_millis(100 * i)));
        }
        // A flood: 10 000 digits in one second pass at most burst + rate.
        let t2 = t + Duration::from_secs(100);
        let passed = (0..10_000u64)
            .filter(|i| g.admit(t2 + Duration::from_micros(100 * i)))
            .count() as u32;
        assert!(passed <= DTMF_BURST + DTMF_RATE_PER_S, "{passed}");
        assert!(passed >= DTMF_BURST, "{passed}");
    }

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
