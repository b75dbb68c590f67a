//! The sans-IO call core: everything one call decides, with time passed in.
//!
//! Shaped like the tunnel core ([`crate::tunnel::core`]): the driver
//! ([`crate::call::session`]) feeds it what happened — [`CallCore::handle_caller`] (a
//! [`super::media::MediaEvent`] from the caller's side, or the read error), [`CallCore::handle_agent`] (an agent event, or `None`
//! when the agent task is gone), [`CallCore::handle_extra_input`] (DTMF from ARI),
//! [`CallCore::handle_tool_step`] — and on each deadline of [`CallCore::poll_timeout`] calls
//! [`CallCore::poll_tick`], which returns the 20 ms frame to write. The core never reads a
//! clock, never awaits and never touches a socket.
//!
//! Its outputs:
//! - **frames out**: the slin frame [`CallCore::poll_tick`] returns, one per 20 ms deadline
//!   (agent audio or silence), which the driver writes to the call's
//!   [`super::media::MediaPort`] whatever the transport; after a barge-in
//!   [`CallCore::take_flushed`] tells the driver to flush the transport too;
//! - **agent inputs**: sent with `try_send` on the agent's bounded input channel given to
//!   [`CallCore::agent_started`] (a full channel drops caller audio, counted in
//!   [`CallSummary::frames_dropped_in`]); before that, [`CallCore::poll_start_agent`] says
//!   when to start the agent (on the first audio frame, whose rate the call takes);
//! - **the end**: [`CallCore::outcome`] once decided; [`CallCore::finish`] then gives the
//!   summary, and [`CallCore::fallback`] / [`CallCore::says_goodbye`] what the driver still
//!   does (hand over to a human, send `0x00`).
//!
//! All timers are checked on the 20 ms tick, so the one deadline is the playout clock's:
//! max duration ([`SessionParams::max_duration`]) and agent silence
//! ([`SessionParams::agent_silence`]) before a frame is written, idle
//! ([`SessionParams::idle_timeout`]), terminal tools and the agent's end after it.
//!
//! Tool calls go through the per-call [`ToolRunner`]; its HTTP tools and operator transfers
//! run as tasks and come back through [`CallCore::next_tool_step`] (the one async method,
//! pending forever when no tool runs).

use super::gates::{DtmfDedup, DtmfGate, InputMeter, is_voiced, keep_dtmf};
use super::media::{MediaError, MediaEvent};
use super::session::{CallSummary, Outcome, SessionParams, ToolCallRecord};
use crate::agent::{AgentEvent, AgentInput, CallInfo, TurnLatency};
use crate::audio::bargein::{Action, BargeIn, BargeInConfig};
use crate::audio::{PlayoutBuffer, PlayoutClock, ReplyId};
use crate::audiosocket::codec::SlinRate;
use crate::fallback::FallbackReason;
use crate::tools::{Terminal, ToolRunner, runner::ToolStep};
use bytes::Bytes;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tracing::{debug, info, trace, warn};

/// Where the agent is.
#[derive(Debug)]
enum AgentState {
    /// No audio yet: the call's rate is unknown.
    NotStarted,
    /// [`CallCore::poll_start_agent`] has it (or returned it); caller audio waits here.
    Starting {
        info: Option<CallInfo>,
        first: Option<Bytes>,
    },
    /// Running: its input channel.
    Running(mpsc::Sender<AgentInput>),
    /// Its task is gone (after [`AgentEvent::Ended`]).
    Gone,
}

/// One call's state; see the module docs.
#[derive(Debug)]
pub struct CallCore {
    params: SessionParams,
    info: CallInfo,
    s: CallSummary,
    start: Instant,
    agent: AgentState,
    agent_started: Option<Instant>,
    playout_reference: bool,
    live_playout: bool,
    /// Live playout only: samples of silence underruns wrote in the stream's place, to be
    /// taken back from the backlog that follows (so a late frame does not add its lateness
    /// to the delay for the rest of the call).
    live_debt: usize,
    /// The agent-silence timer: agent start, agent audio, or caller speech resets it.
    last_activity: Instant,
    /// For turn latency: the caller's last voiced frame since the previous reply began.
    caller_voiced_at: Option<Instant>,
    last_reply: Option<ReplyId>,
    /// A reply's latency waits here for its first frame on the wire: (latency, when received).
    pending_latency: Option<(TurnLatency, Instant)>,
    /// The agent reports its own turns ([`AgentEvent::TurnLatency`]: the cascade).
    agent_reports_turns: bool,
    /// Turns complete with their first frame on the wire, for an observer (the console's
    /// live waterfall): [`Self::take_observed_turns`].
    observed_turns: Vec<TurnLatency>,
    rate: Option<SlinRate>,
    playout: PlayoutBuffer,
    frame: Vec<i16>,
    /// Set by a barge-in that flushed the playout; the driver tells the transport.
    flushed: bool,
    clock: PlayoutClock,
    last_input: Instant,
    /// After ReplyDone, tell the agent when the reply has been fully heard.
    awaiting_played_out: Option<ReplyId>,
    /// Set when the agent ended the call: hang up once the playout buffer is empty.
    ending: Option<String>,
    tools: ToolRunner,
    /// In Stasis mode a digit may arrive twice: ARI and `0x03` through the bridge.
    dtmf_dedup: DtmfDedup,
    dtmf_gate: DtmfGate,
    input_meter: InputMeter,
    outcome: Option<Outcome>,
    /// Local barge-in ([`Self::set_barge_in`]); `None`: only the provider's event stops playback.
    barge: Option<BargeIn>,
    /// Scratch for the caller frame as samples (local barge-in).
    caller_samples: Vec<i16>,
    /// A barge-in is silencing the agent: the caller's speech onset, for the latency taken at
    /// the first silent frame, and whether it is confirmed (a pause may yet resume).
    silencing: Option<(Instant, bool)>,
    /// The latency of a pause not confirmed yet, ms: recorded if it is, dropped if it resumes.
    pause_latency_ms: Option<u32>,
}

impl CallCore {
    /// A call whose call id was read at `now`. `agent_name` goes into the summary;
    /// `playout_reference` sends every frame written to the agent
    /// ([`crate::agent::Agent::wants_playout_reference`]); `live_playout` drops the audio of
    /// ticks the clock skipped ([`crate::agent::Agent::live_playout`]).
    pub fn new(
        now: Instant,
        mut info: CallInfo,
        agent_name: &'static str,
        playout_reference: bool,
        live_playout: bool,
        params: SessionParams,
    ) -> Self {
        let mut s = CallSummary::without_agent(info.call_id, agent_name, Outcome::CallerHungUp);
        s.caller_number = info.caller_number.clone();
        info.tools = params.tools.specs();
        let tools = ToolRunner::new(params.tools.clone(), &info);
        CallCore {
            s,
            start: now,
            agent: AgentState::NotStarted,
            agent_started: None,
            playout_reference,
            live_playout,
            live_debt: 0,
            last_activity: now,
            caller_voiced_at: None,
            last_reply: None,
            pending_latency: None,
            agent_reports_turns: false,
            observed_turns: Vec::new(),
            rate: None,
            playout: PlayoutBuffer::new(8_000, params.playout_max),
            frame: vec![0; SlinRate::Hz8000.samples_per_frame()],
            flushed: false,
            clock: PlayoutClock::new(now + params.keepalive_before_audio),
            last_input: now,
            awaiting_played_out: None,
            ending: None,
            tools,
            dtmf_dedup: DtmfDedup::default(),
            dtmf_gate: DtmfGate::new(now),
            input_meter: InputMeter::new(params.input_allowance, now),
            outcome: None,
            barge: None,
            caller_samples: Vec::with_capacity(SlinRate::Hz16000.samples_per_frame()),
            silencing: None,
            pause_latency_ms: None,
            info,
            params,
        }
    }

    /// Turns on local barge-in ([`crate::audio::bargein`]): the caller's voice over the
    /// agent pauses playout at once; the provider's event (or the caller's words) confirms
    /// within the window, or playback resumes. Call before the first frame.
    pub(crate) fn set_barge_in(&mut self, cfg: BargeInConfig) {
        self.barge = cfg.enabled.then(|| BargeIn::new(cfg));
    }

    /// The call's sample rate: the first caller audio's, 8 kHz before it.
    pub fn rate(&self) -> SlinRate {
        self.rate.unwrap_or(SlinRate::Hz8000)
    }

    /// Whether a barge-in flushed the playout since the last call: the driver then tells
    /// the transport ([`super::media::MediaPort::flushed`]).
    pub(crate) fn take_flushed(&mut self) -> bool {
        std::mem::take(&mut self.flushed)
    }

    /// When [`Self::poll_tick`] is next due: the playout clock's deadline.
    pub fn poll_timeout(&self) -> Instant {
        self.clock.deadline()
    }

    /// How the call ended, once decided; the driver then stops and calls [`Self::finish`].
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// What the agent is told about the call (rate known after the first audio).
    pub(crate) fn info(&self) -> &CallInfo {
        &self.info
    }

    /// The summary so far (counters update as the call goes).
    pub fn summary(&self) -> &CallSummary {
        &self.s
    }

    /// The agent to start, once: after the first audio frame fixed the call's rate.
    pub fn poll_start_agent(&mut self) -> Option<CallInfo> {
        match &mut self.agent {
            AgentState::Starting { info, .. } => info.take(),
            _ => None,
        }
    }

    /// The agent asked for by [`Self::poll_start_agent`] runs; `input` is its input channel.
    /// The caller audio that started it is sent now.
    pub fn agent_started(&mut self, input: mpsc::Sender<AgentInput>) {
        if let AgentState::Starting { first, .. } = &mut self.agent {
            let first = first.take();
            self.agent = AgentState::Running(input);
            if let Some(payload) = first {
                self.send_audio(payload);
            }
        }
    }

    /// Ends the call for shutdown (the grace period ran out).
    pub(crate) fn handle_shutdown(&mut self) {
        self.end(Outcome::Shutdown);
    }

    /// Writing the frame [`Self::poll_tick`] returned failed or blocked (`error`): the frame
    /// is not counted and the call ends, whatever else that tick decided, unless the caller
    /// had already hung up (the driver hands the core what arrived before the failed write:
    /// a hang-up is what breaks that write).
    pub(crate) fn handle_write_error(&mut self, error: String) {
        self.s.frames_out = self.s.frames_out.saturating_sub(1);
        if self.outcome != Some(Outcome::CallerHungUp) {
            self.outcome = Some(Outcome::WriteFailed(error));
        }
    }

    /// Telling the transport about a flush ([`Self::take_flushed`]) failed or blocked: the
    /// call ends as a failed write.
    pub(crate) fn handle_flush_error(&mut self, error: String) {
        self.outcome = Some(Outcome::WriteFailed(error));
    }

    fn end(&mut self, outcome: Outcome) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
    }

    fn agent_input(&self) -> Option<&mpsc::Sender<AgentInput>> {
        match &self.agent {
            AgentState::Running(tx) => Some(tx),
            _ => None,
        }
    }

    fn try_send(&self, input: AgentInput) {
        if let Some(tx) = self.agent_input() {
            let _ = tx.try_send(input);
        }
    }

    fn deliver(&mut self, answer: crate::tools::ToolResult) {
        if let AgentState::Running(tx) = &self.agent {
            self.tools.deliver(tx, answer);
        }
    }

    /// What Asterisk sent at `now` (`Ok(None)`: it closed the connection).
    pub fn handle_caller(&mut self, now: Instant, read: Result<Option<MediaEvent>, MediaError>) {
        if self.outcome.is_some() {
            return;
        }
        self.last_input = now;
        match read {
            Ok(Some(MediaEvent::Audio { rate, payload })) => {
                self.on_caller_audio(now, rate, payload);
            }
            Ok(Some(MediaEvent::Dtmf(d))) => {
                if !self.dtmf_dedup.duplicate(d, false, now)
                    && keep_dtmf(&mut self.dtmf_gate, &mut self.s, d, now)
                {
                    self.try_send(AgentInput::Dtmf(d));
                }
            }
            Ok(Some(MediaEvent::Hangup)) | Ok(None) => self.end(Outcome::CallerHungUp),
            Err(MediaError::Protocol(e)) => self.end(Outcome::ProtocolError(e)),
            Err(e @ MediaError::Io(_)) => self.end(Outcome::ProtocolError(e.to_string())),
        }
    }

    fn on_caller_audio(&mut self, now: Instant, rate: SlinRate, payload: Bytes) {
        self.s.frames_in += 1;
        metrics::counter!(crate::health::metrics::FRAMES_IN).increment(1);
        if is_voiced(&payload) {
            self.last_activity = now;
            self.caller_voiced_at = Some(now);
        }
        match self.rate {
            None => self.first_audio(now, rate),
            Some(r) if r != rate => {
                trace!(rate_hz = rate.hz(), "frame at another rate ignored");
                return;
            }
            Some(_) => {}
        }
        if !self.input_meter.admit(payload.len() / 2, rate.hz(), now) {
            if self.s.input_overrun_frames == 0 {
                warn!(
                    allowance_ms = self.params.input_allowance.as_millis() as u64,
                    "caller audio arrives faster than real time; dropping the excess"
                );
            }
            self.s.input_overrun_frames += 1;
            metrics::counter!(crate::health::metrics::INPUT_OVERRUN).increment(1);
            return;
        }
        self.detect_barge_in(now, &payload);
        self.send_audio(payload);
    }

    /// Local barge-in: the caller frame through the echo-gated detector; pause on speech.
    fn detect_barge_in(&mut self, now: Instant, payload: &[u8]) {
        let Some(b) = self.barge.as_mut() else {
            return;
        };
        self.caller_samples.clear();
        crate::audio::slin_from_le_bytes(payload, &mut self.caller_samples);
        let audible = !self.playout.is_empty() && !self.playout.is_paused();
        // The frame was recorded over the time before it arrived.
        let len = self.caller_samples.len() as u64 * 1_000_000 / self.playout.rate_hz() as u64;
        let began = now.checked_sub(Duration::from_micros(len)).unwrap_or(now);
        if b.caller(now, began, &self.caller_samples, audible) == Some(Action::Pause) {
            self.playout.pause();
            self.silencing = Some((b.onset().unwrap_or(now), false));
            self.pause_latency_ms = None;
            debug!(
                queued_ms = self.playout.queued().as_millis() as u64,
                "barge-in: caller speech over the agent; playout paused"
            );
        }
    }

    /// The barge-in state's answer: flush, or resume (a false barge-in or a backchannel).
    fn barge_action(&mut self, action: Option<Action>) {
        match action {
            Some(Action::Flush) => self.barge_in(),
            Some(Action::Resume { backchannel }) => {
                let held_ms = self.playout.queued().as_millis() as u64;
                self.playout.resume();
                self.silencing = None;
                self.pause_latency_ms = None;
                self.s.resumed_audio_ms += held_ms;
                if backchannel {
                    self.s.backchannels += 1;
                } else {
                    self.s.false_barge_ins += 1;
                }
                info!(
                    held_ms,
                    backchannel, "barge-in not confirmed: playout resumed"
                );
            }
            Some(Action::Pause) | None => {}
        }
    }

    /// The first audio frame: the call takes its rate, the 20 ms grid starts now, and the
    /// agent is asked for.
    fn first_audio(&mut self, now: Instant, r: SlinRate) {
        self.rate = Some(r);
        self.s.rate_hz = r.hz();
        self.info.rate_hz = r.hz();
        self.playout = PlayoutBuffer::new(r.hz(), self.params.playout_max);
        self.frame = vec![0; r.samples_per_frame()];
        // Start the 20 ms grid now: first agent audio goes out promptly.
        self.clock = PlayoutClock::new(now);
        debug!(rate_hz = r.hz(), "first audio; starting agent");
        self.agent = AgentState::Starting {
            info: Some(self.info.clone()),
            first: None,
        };
        self.agent_started = Some(now);
        self.last_activity = now;
    }

    fn send_audio(&mut self, payload: Bytes) {
        match &mut self.agent {
            AgentState::Running(tx) => match tx.try_send(AgentInput::Audio(payload)) {
                Ok(()) | Err(TrySendError::Closed(_)) => {}
                Err(TrySendError::Full(_)) => self.s.frames_dropped_in += 1,
            },
            AgentState::Starting { first, .. } => *first = Some(payload),
            AgentState::NotStarted | AgentState::Gone => {}
        }
    }

    /// Input for the agent from outside the AudioSocket stream (ARI), at `now`: a DTMF
    /// digit is de-duplicated against `0x03`, rate-gated and counted like one; other inputs
    /// are forwarded. Dropped before the agent starts.
    pub fn handle_extra_input(&mut self, now: Instant, input: AgentInput) {
        if self.outcome.is_some() {
            return;
        }
        if let AgentInput::Dtmf(d) = input {
            if self.dtmf_dedup.duplicate(d, true, now)
                || !keep_dtmf(&mut self.dtmf_gate, &mut self.s, d, now)
            {
                return;
            }
        }
        self.try_send(input);
    }

    /// The next finished tool task (an HTTP result or a transfer's end); pending forever
    /// when none runs. Cancel-safe.
    pub(crate) async fn next_tool_step(&mut self) -> ToolStep {
        self.tools.next_step().await
    }

    /// A tool task finished.
    pub(crate) fn handle_tool_step(&mut self, step: ToolStep) {
        match step {
            ToolStep::Answer(answer) => self.deliver(answer),
        }
    }
}

fn terminal_outcome(t: Terminal) -> Outcome {
    match t {
        Terminal::Hangup => Outcome::AgentEnded("agent hung up (hangup tool)".into()),
        Terminal::Operator { detail } => Outcome::Operator(detail),
    }
}

impl CallCore {
    /// What the agent said at `now`; `None`: its event channel closed (its task is gone).
    pub fn handle_agent(&mut self, now: Instant, event: Option<AgentEvent>) {
        if self.outcome.is_some() {
            return;
        }
        match event {
            Some(AgentEvent::Audio { reply, samples }) => self.agent_audio(now, reply, &samples),
            Some(AgentEvent::ReplyDone { reply }) => {
                self.tools.on_reply_done(reply);
                self.playout.mark_reply_complete();
                self.awaiting_played_out = Some(reply);
            }
            Some(AgentEvent::TurnLatency(lat)) => {
                self.agent_reports_turns = true;
                if let Some((old, _)) = self.pending_latency.replace((lat, now)) {
                    self.s.turns.push(old);
                }
            }
            Some(AgentEvent::SpeechStarted) => match self.barge.as_mut() {
                Some(b) => {
                    let action = b.provider_started();
                    self.barge_action(action);
                }
                None => self.barge_in(),
            },
            Some(AgentEvent::Transcript { speaker, text }) => {
                info!(?speaker, text = %text, "transcript");
                if speaker == crate::agent::Speaker::Caller {
                    let action = self.barge.as_mut().and_then(|b| b.caller_text(&text));
                    self.barge_action(action);
                }
                self.s.transcript.push((speaker, text));
            }
            Some(AgentEvent::ToolCall {
                call_id,
                name,
                arguments,
                reply,
            }) => {
                self.s.tool_calls.push(ToolCallRecord {
                    name: name.clone(),
                    arguments: arguments.clone(),
                });
                if let Some(answer) = self
                    .tools
                    .on_tool_call(call_id, &name, &arguments, reply, now)
                {
                    self.deliver(answer);
                }
            }
            Some(AgentEvent::Ended { reason }) => {
                info!(reason = %reason, "agent ended the call");
                if self.playout.is_empty() {
                    self.end(Outcome::AgentEnded(reason));
                } else {
                    self.ending = Some(reason);
                }
            }
            Some(AgentEvent::Failed(e)) => {
                warn!(error = %e, "agent failed; handing the call to the dialplan fallback");
                self.fail(FallbackReason::AgentFailed(e.to_string()), e.to_string());
            }
            None => self.agent_gone(),
        }
    }

    fn fail(&mut self, reason: FallbackReason, detail: String) {
        self.s.fallback = Some(reason);
        self.end(Outcome::Fallback(detail));
    }

    fn agent_gone(&mut self) {
        if self.ending.is_some() {
            // The agent said Ended and its task finished: let the playout drain.
            self.agent = AgentState::Gone;
            return;
        }
        warn!("agent task ended without a reason; handing the call to the fallback");
        let why = "agent task ended";
        self.fail(FallbackReason::AgentFailed(why.into()), why.into());
    }

    /// The caller started speaking: flush the playout before the next tick and tell the
    /// agent how much of its reply was heard.
    fn barge_in(&mut self) {
        if let Some((lat, _)) = self.pending_latency.take() {
            self.s.turns.push(lat);
        }
        let was_paused = self.playout.is_paused();
        let flushed = self.playout.flush();
        self.live_debt = 0;
        self.flushed = true;
        self.awaiting_played_out = None;
        if let Some(b) = self.barge.as_mut() {
            b.flushed();
            if let Some(ms) = self.pause_latency_ms.take() {
                self.s.barge_in_latencies_ms.push(ms);
            } else if let Some((_, confirmed)) = self.silencing.as_mut() {
                *confirmed = true;
            } else if !was_paused && flushed.dropped_samples > 0 {
                // Not paused before: the agent goes silent on the next frame.
                self.silencing = b.onset().map(|t| (t, true));
            }
        }
        if let Some(answer) = self.tools.on_barge_in(flushed.reply) {
            self.deliver(answer);
        }
        if let Some(reply) = flushed.reply {
            self.s.barge_ins += 1;
            let dropped_ms = flushed.dropped_samples as u64 * 1000 / self.playout.rate_hz() as u64;
            info!(
                reply = reply.0,
                heard_ms = flushed.heard_ms,
                dropped_ms,
                "barge-in: playout flushed"
            );
            self.try_send(AgentInput::Interrupted {
                reply,
                heard_ms: flushed.heard_ms,
            });
        }
    }
}

impl CallCore {
    /// Runs the tick due at [`Self::poll_timeout`] if `now` has reached it: checks the call
    /// limits, pops the next 20 ms of playout and returns its slin samples at
    /// [`Self::rate`], to be written at once.
    /// `None` when no tick is due, or the call ended before a frame (then
    /// [`Self::outcome`] says why). A frame may come with an end decided after it (idle,
    /// a terminal tool, the agent's end): write it, then stop.
    pub fn poll_tick(&mut self, now: Instant) -> Option<&[i16]> {
        if self.outcome.is_some() || now < self.clock.deadline() {
            return None;
        }
        if self
            .params
            .max_duration
            .is_some_and(|max| now - self.start >= max)
        {
            self.end(Outcome::MaxDuration);
            return None;
        }
        if self.agent_input().is_some()
            && self.playout.is_empty()
            && (self.params.agent_silence).is_some_and(|l| now - self.last_activity >= l)
        {
            warn!("no agent audio while the caller waits; handing the call to the fallback");
            self.fail(
                FallbackReason::AgentSilent,
                FallbackReason::AgentSilent.to_string(),
            );
            return None;
        }
        let action = self.barge.as_mut().and_then(|b| b.poll(now));
        self.barge_action(action);
        self.pop_frame(now);
        self.after_frame(now);
        Some(&self.frame)
    }

    fn pop_frame(&mut self, now: Instant) {
        self.pay_live_debt();
        let popped = self.playout.pop_frame(&mut self.frame);
        if self.live_playout && popped.underrun {
            self.live_debt += self.frame.len() - popped.agent_samples;
        }
        if popped.agent_samples > 0 {
            self.s.agent_frames_out += 1;
        }
        self.s.underruns += popped.underrun as u64;
        self.s.idle_frames += (popped.agent_samples == 0 && !popped.underrun) as u64;
        if let Some(b) = self.barge.as_mut() {
            b.reference(&self.frame);
            if popped.agent_samples == 0 {
                if let Some((onset, confirmed)) = self.silencing.take() {
                    let ms = now.saturating_duration_since(onset).as_millis();
                    let ms = ms.min(u32::MAX as u128) as u32;
                    if confirmed {
                        self.s.barge_in_latencies_ms.push(ms);
                    } else {
                        self.pause_latency_ms = Some(ms);
                    }
                }
            }
        }
        self.s.frames_out += 1;
        if self.playout_reference {
            self.try_send(AgentInput::Playout(self.frame.clone()));
        }
        if popped.agent_samples > 0 {
            let playout = &self.playout;
            let heard =
                |(l, _): &mut (TurnLatency, Instant)| playout.heard_ms(ReplyId(l.reply)) > 0;
            if let Some((mut lat, at)) = self.pending_latency.take_if(heard) {
                let since = (now - at).as_millis() as u64;
                lat.first_frame_ms = lat.tts_first_audio_ms.map(|t| t + since);
                info!(reply = lat.reply, first_frame_ms = ?lat.first_frame_ms, "first frame of the reply on the wire");
                self.observed_turns.push(lat.clone());
                self.s.turns.push(lat);
            }
        }
    }

    /// A live stream (the echo) keeps its timing across an underrun: the audio that came
    /// late is dropped from what is queued beyond this frame, never from this frame itself
    /// (that would only make another underrun). Counted as underruns already.
    fn pay_live_debt(&mut self) {
        if self.live_debt == 0 {
            return;
        }
        let spare = self
            .playout
            .len()
            .saturating_sub(self.playout.samples_per_frame());
        let n = self.live_debt.min(spare);
        if n > 0 {
            self.live_debt -= self.playout.discard(n);
            trace!(dropped_samples = n, "live audio after an underrun dropped");
        }
    }

    /// Agent audio: the turn's latency on a new reply, then into the playout buffer.
    fn agent_audio(&mut self, now: Instant, reply: ReplyId, samples: &[i16]) {
        self.last_activity = now;
        if self.last_reply != Some(reply) {
            self.last_reply = Some(reply);
            if let Some(spoke) = self.caller_voiced_at.take() {
                let ms = (now - spoke).as_millis().min(u32::MAX as u128) as u32;
                self.s.turn_latencies_ms.push(ms);
                if !self.agent_reports_turns {
                    // Speech-to-speech: end of the caller's speech → the reply's
                    // first audio, which goes out on the next tick.
                    self.observed_turns.push(TurnLatency {
                        reply: reply.0,
                        first_frame_ms: Some(u64::from(ms)),
                        ..TurnLatency::default()
                    });
                }
            }
        }
        self.playout.push(reply, samples);
        self.tools.on_agent_audio(now);
    }

    /// Turns completed since the last call, each with its first frame on the wire: the
    /// cascade's full turn (STT final → LLM first token → TTS first audio → first frame, ms
    /// from the end of the caller's speech), or for a speech-to-speech agent the end of the
    /// caller's speech → the reply's first audio (`first_frame_ms` alone).
    pub(crate) fn take_observed_turns(&mut self) -> Vec<TurnLatency> {
        std::mem::take(&mut self.observed_turns)
    }

    /// The clock, the idle check, tools and the agent's end, after a frame.
    fn after_frame(&mut self, now: Instant) {
        let skipped = self.clock.skipped_frames();
        self.clock.advance(now);
        let newly = self.clock.skipped_frames() - skipped;
        if self.live_playout && newly > 0 {
            // A live stream (the echo) keeps its timing: the skipped ticks' audio goes.
            let n = newly as usize * self.playout.samples_per_frame();
            let dropped = self.playout.discard(n);
            debug!(
                skipped = newly,
                dropped_samples = dropped,
                "clock skipped ticks; live audio dropped"
            );
        }
        // Checked once per tick: a half-open connection sends nothing.
        if now.duration_since(self.last_input) > self.params.idle_timeout {
            self.end(Outcome::IdleTimeout);
            return;
        }
        trace!(
            queued_ms = self.playout.queued().as_millis() as u64,
            "frame out"
        );
        if let AgentState::Running(tx) = &self.agent {
            self.tools.retry_unsent(tx);
        }
        if self.tools.terminal_pending() {
            if let Some(t) = self.tools.poll_terminal(self.playout.is_empty(), now) {
                self.end(terminal_outcome(t));
                return;
            }
        }
        if self.playout.is_empty() {
            if let Some(reply) = self.awaiting_played_out.take() {
                self.try_send(AgentInput::PlayedOut { reply });
            }
            if let Some(reason) = self.ending.take() {
                self.end(Outcome::AgentEnded(reason));
            }
        }
    }

    /// Why the call goes to a human, when it does: the driver hands it over
    /// ([`crate::fallback::Handover`]) before closing.
    pub(crate) fn fallback(&self) -> Option<&FallbackReason> {
        self.s.fallback.as_ref()
    }

    /// Whether the driver sends `0x00` before closing: for every end but the caller's own
    /// hangup and a failed write (Asterisk returns from `AudioSocket()` on `0x00` or a close).
    pub(crate) fn says_goodbye(&self) -> bool {
        !matches!(
            self.outcome,
            None | Some(Outcome::CallerHungUp | Outcome::WriteFailed(_))
        )
    }

    /// The summary of the call, closed at `now`. An undecided call counts as shut down.
    pub fn finish(mut self, now: Instant) -> CallSummary {
        if let Some((lat, _)) = self.pending_latency.take() {
            self.s.turns.push(lat);
        }
        self.s.outcome = self.outcome.take().unwrap_or(Outcome::Shutdown);
        self.s.duration = now - self.start;
        self.s.agent_time = self.agent_started.map_or(Duration::ZERO, |t| now - t);
        self.s.playout_overflow_samples = self.playout.overflow_samples();
        self.s.late_skipped_frames = self.clock.skipped_frames();
        self.s
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "bargein_tests.rs"]
mod bargein_tests;
