//! The per-call task: owns the call's media channel ([`MediaPort`]: AudioSocket, RTP, the
//! WebSocket channel), the agent session and the playout buffer, and `select!`s over them.
//!
//! Audio path of one call (AudioSocket shown; other transports decode and encode in their
//! port):
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

use super::core::CallCore;
use super::media::MediaPort;
use crate::agent::{AgentEvent, AgentInput, CallInfo, SharedAgent, Speaker, TurnLatency};
use crate::audiosocket::SlinRate;
use crate::tools::ToolRegistry;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

/// How long a single frame write may block before the call is given up, since a peer that
/// stops reading would otherwise stall this call's clock.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Before Asterisk's first audio frame tells the call's rate, silence is sent at 8 kHz
/// after this long, so `AudioSocket()` does not hang up on 2 s of silence.
const KEEPALIVE_BEFORE_AUDIO: Duration = Duration::from_millis(500);

/// DTMF digits per second accepted from one call, sustained. A keypad sends at most about
/// 12.5 (40 ms tone, 40 ms pause); more is a flood, dropped and counted.
pub(crate) const DTMF_RATE_PER_S: u32 = 15;
/// DTMF digits accepted at once before [`DTMF_RATE_PER_S`] applies.
pub(crate) const DTMF_BURST: u32 = 20;
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
    /// Sees every agent event before the call handles it (the console's live feed).
    pub observer: Option<crate::call::directory::SharedObserver>,
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
            observer: None,
        }
    }
}

pub(crate) use crate::records::ToolCallRecord;

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
    /// Per barge-in: caller speech onset (the first speech frame's arrival, as the local
    /// detector saw it) → the first silent frame out, ms. Local barge-in only.
    pub barge_in_latencies_ms: Vec<u32>,
    /// Local pauses that nothing confirmed (playback resumed): a cough, a door, a noise.
    pub false_barge_ins: u64,
    /// Local pauses that the caller's words ended as a backchannel (playback resumed).
    pub backchannels: u64,
    /// Agent audio held by pauses and played after resuming instead of being thrown away, ms.
    pub resumed_audio_ms: u64,
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
    /// The media transport that carried the call ([`MediaPort::transport`]):
    /// `"audiosocket"`, `"rtp"`, `"websocket"`.
    pub transport: &'static str,
    /// The agent profile the call ran with (`default` for the top-level `[agent]`); `None`
    /// when it never got that far ([`crate::profiles`]).
    pub profile: Option<String>,
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
            barge_in_latencies_ms: Vec::new(),
            false_barge_ins: 0,
            backchannels: 0,
            resumed_audio_ms: 0,
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
            transport: "audiosocket",
            profile: None,
        }
    }
}

/// Runs one call to its end over its media channel `conn` (for AudioSocket, a
/// [`super::media::AudioSocketPort`] whose call id has been read already). Returns what is
/// kept of the call; it never panics on input.
pub async fn run_session<M: MediaPort>(
    conn: M,
    info: CallInfo,
    agent: SharedAgent,
    params: SessionParams,
    hangup: CancellationToken,
) -> CallSummary {
    run_session_with_input(conn, info, agent, params, hangup, None).await
}

/// Hands the call's completed turns to the observer (the console's live waterfall).
fn observe_turns(observer: Option<&crate::call::directory::SharedObserver>, core: &mut CallCore) {
    if let Some(o) = observer {
        for turn in core.take_observed_turns() {
            o.agent_event(&AgentEvent::TurnLatency(turn));
        }
    }
}

/// [`run_session`] with a second source of agent input besides the media channel
/// (DTMF from ARI `ChannelDtmfReceived` in Stasis mode): each [`AgentInput::Dtmf`] is counted
/// in [`CallSummary::dtmf`] and forwarded like a `0x03` digit; other inputs are forwarded as
/// they are. Inputs arriving before the agent starts (first audio) are dropped.
///
/// This is the thin tokio driver of the [`CallCore`]: it owns the connection, the agent's
/// event channel and the one timer, and passes what happens to the core with the time.
pub(crate) async fn run_session_with_input<M: MediaPort>(
    mut conn: M,
    info: CallInfo,
    agent: SharedAgent,
    params: SessionParams,
    hangup: CancellationToken,
    mut extra_input: Option<mpsc::Receiver<AgentInput>>,
) -> CallSummary {
    let (handover, beat) = (params.handover.clone(), params.clock.clone());
    let observer = params.observer.clone();
    let (reference, live) = (agent.wants_playout_reference(), agent.live_playout());
    let mut core = CallCore::new(Instant::now(), info, agent.name(), reference, live, params);
    if let Some(cfg) = agent.barge_in() {
        core.set_barge_in(cfg);
    }
    let m_frames_out = metrics::counter!(crate::health::metrics::FRAMES_OUT);
    let m_lateness = metrics::histogram!(crate::health::metrics::PLAYOUT_LATENESS);
    let mut events: Option<mpsc::Receiver<AgentEvent>> = None;
    // One timer for the whole call, re-armed after each event (no timer churn per event).
    let tick = sleep_until(core.poll_timeout());
    tokio::pin!(tick);
    while core.outcome().is_none() {
        tokio::select! {
            biased;
            () = hangup.cancelled() => core.handle_shutdown(),
            () = &mut tick => {
                let now = Instant::now();
                m_lateness.record(now.saturating_duration_since(core.poll_timeout()).as_secs_f64());
                if let Some(beat) = &beat {
                    beat.beat();
                }
                let rate = core.rate();
                if let Some(frame) = core.poll_tick(now) {
                    match write_frame(&mut conn, rate, frame).await {
                        Ok(()) => m_frames_out.increment(1),
                        Err(e) => write_failed(&mut conn, &mut core, e),
                    }
                }
            }
            read = conn.read() => core.handle_caller(Instant::now(), read),
            step = core.next_tool_step() => {
                if let (Some(o), crate::tools::runner::ToolStep::Answer(r)) = (&observer, &step) {
                    o.tool_result(r);
                }
                core.handle_tool_step(step);
            }
            ev = next_event(&mut events) => {
                if ev.is_none() {
                    events = None;
                }
                if let (Some(o), Some(ev)) = (&observer, &ev) {
                    o.agent_event(ev);
                }
                core.handle_agent(Instant::now(), ev);
            }
            input = next_extra(&mut extra_input) => match input {
                Some(input) => core.handle_extra_input(Instant::now(), input),
                None => extra_input = None,
            },
        }
        observe_turns(observer.as_ref(), &mut core);
        if core.take_flushed() {
            if let Err(e) = bounded(WRITE_TIMEOUT, conn.flushed()).await {
                core.handle_flush_error(e);
            }
        }
        if let Some(info) = core.poll_start_agent() {
            let session = agent.start(info);
            core.agent_started(session.input);
            events = Some(session.events);
        }
        tick.as_mut().reset(core.poll_timeout());
    }
    close(&mut conn, &core, handover).await;
    drop(events);
    let mut summary = core.finish(Instant::now());
    summary.transport = conn.transport();
    summary
}

/// Hands a failed call to a human, then says goodbye (AudioSocket `0x00`) unless the caller
/// hung up or the socket failed, then closes.
async fn close<M: MediaPort>(
    conn: &mut M,
    core: &CallCore,
    handover: crate::fallback::SharedHandover,
) {
    if let Some(reason) = core.fallback() {
        match timeout(
            crate::fallback::HANDOVER_TIMEOUT,
            handover.hand_over(core.info(), reason),
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
    if core.says_goodbye() {
        let _ = timeout(WRITE_TIMEOUT, conn.hang_up()).await;
    }
    let _ = timeout(WRITE_TIMEOUT, conn.close()).await;
}

/// A write failed (`error`): first hands the core what the caller's side sent before it
/// went (already in the socket, so polled once each, never waited for). A caller who hung
/// up, by a hangup message, a WebSocket close or a clean EOF, often breaks the write that
/// races it (the peer's reset after its close gives `EPIPE`); the call then ends as that
/// hang-up, not as a failed write.
fn write_failed<M: MediaPort>(conn: &mut M, core: &mut CallCore, error: String) {
    use futures_util::FutureExt as _;
    // A bound, so a peer still streaming cannot keep the failed call here.
    for _ in 0..64 {
        if core.outcome().is_some() {
            break;
        }
        match conn.read().now_or_never() {
            Some(read) => core.handle_caller(Instant::now(), read),
            None => break,
        }
    }
    core.handle_write_error(error);
}

async fn write_frame<M: MediaPort>(
    conn: &mut M,
    rate: SlinRate,
    samples: &[i16],
) -> Result<(), String> {
    bounded(WRITE_TIMEOUT, conn.write_frame(rate, samples)).await
}

/// A write that may block at most `limit`: a peer that stops reading would otherwise stall
/// this call's clock.
async fn bounded(
    limit: Duration,
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), String> {
    match timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("write blocked for more than {limit:?}")),
    }
}

async fn next_event(events: &mut Option<mpsc::Receiver<AgentEvent>>) -> Option<AgentEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_extra(extra: &mut Option<mpsc::Receiver<AgentInput>>) -> Option<AgentInput> {
    match extra {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The driver on tokio's paused clock over an in-memory stream, with the synthetic
    //! caller on the other end: the whole call path without a socket, so pacing and
    //! timeouts are exact (virtual time; no assertion depends on machine load).

    use super::*;
    use crate::agent::echo::EchoAgent;
    use crate::audio::wav::Recording;
    use crate::audiosocket::{Connection, Message, SlinRate};
    use crate::call::media::AudioSocketPort;
    use crate::caller::{CallPlan, CallReport, run_call_on};

    fn hello() -> Recording {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hello-world.wav"
        );
        crate::wavfile::open(std::path::Path::new(path)).expect("fixture")
    }

    fn plan(rate: SlinRate, seconds: f64) -> CallPlan {
        CallPlan {
            call_id: Uuid::from_u128(42),
            rate,
            speech: hello(),
            speech_offset: Duration::from_millis(100),
            dtmf: vec![('5', Duration::from_millis(1500))],
            duration: Duration::from_secs_f64(seconds),
        }
    }

    fn info(call_id: Uuid) -> CallInfo {
        CallInfo {
            call_id,
            rate_hz: 0,
            caller_number: None,
            caller_name: None,
            tools: Vec::new(),
            variables: Default::default(),
        }
    }

    /// Runs `plan` against a session of `agent` with `params`; the caller's report and the
    /// session's summary.
    async fn call(
        plan: &CallPlan,
        agent: SharedAgent,
        params: SessionParams,
        hangup: CancellationToken,
    ) -> (CallReport, CallSummary) {
        let (caller_end, server_end) = tokio::io::duplex(64 * 1024);
        let session = tokio::spawn(async move {
            let mut conn = Connection::new(server_end);
            let first = conn.read_message().await.expect("call id");
            let Some(Message::CallId(id)) = first else {
                panic!("{first:?}")
            };
            run_session(AudioSocketPort::new(conn), info(id), agent, params, hangup).await
        });
        let report = run_call_on(caller_end, plan).await.expect("call");
        (report, session.await.expect("session task"))
    }

    /// echo_call's `echo_comes_back` with exact timing: a frame every 20.000 ms, the echo
    /// exactly the echo delay later.
    async fn echo_comes_back(rate: SlinRate) {
        let delay = Duration::from_millis(500);
        let plan = plan(rate, 3.0);
        let agent = Arc::new(EchoAgent::new(delay));
        let (report, summary) = call(
            &plan,
            agent,
            SessionParams::default(),
            CancellationToken::new(),
        )
        .await;
        assert!(report.frames_received >= 149, "{report:?}");
        // Exact up to the f64 ms arithmetic of the report.
        let exact = |ms: f64| (ms - 20.0).abs() < 1e-6;
        assert!(
            exact(report.gap_p50_ms) && exact(report.gap_p99_ms),
            "{report:?}"
        );
        assert!(exact(report.gap_max_ms), "never a burst, never a gap");
        assert!(report.arrivals_ms.windows(2).all(|w| exact(w[1] - w[0])));
        assert_eq!(report.short_frames, 0);
        let speech = crate::caller::resample_recording(&plan.speech, rate.hz()).unwrap();
        let spms = rate.hz() as usize / 1000;
        let expected_at = (plan.speech_offset + delay).as_millis() as usize * spms;
        let similarity = crate::caller::speech_similarity(
            &report.received.samples,
            &speech.samples,
            rate.hz(),
            expected_at,
            60 * spms,
        );
        assert!(similarity.passes(0.9), "echo: {}", similarity.describe(0.9));
        let spf = rate.samples_per_frame();
        let lead = speech.samples.chunks(spf);
        let lead_frames = lead
            .clone()
            .position(|f| crate::audio::rms(f) > crate::caller::AUDIBLE_RMS)
            .expect("audible");
        let want_ms = (plan.speech_offset + delay).as_millis() as f64 + lead_frames as f64 * 20.0;
        let first = report.first_audio_ms.expect("audible audio");
        // The echo hands each frame to the playout CUSHION (40 ms) before its slot; on the
        // 20 ms grid the first audible one goes out one tick early, never more than the
        // 25 ms the socket test allows, and never late.
        assert!(
            (want_ms - 25.0..=want_ms).contains(&first),
            "first audio at {first} ms, expected {want_ms} ms"
        );
        assert_eq!(summary.call_id, plan.call_id);
        assert_eq!(summary.outcome, Outcome::CallerHungUp);
        assert_eq!(summary.rate_hz, rate.hz());
        assert_eq!(summary.dtmf, "5");
        assert_eq!(summary.frames_in, 150);
        assert_eq!(summary.late_skipped_frames, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn echo_call_8khz_paced_exactly() {
        echo_comes_back(SlinRate::Hz8000).await;
    }

    #[tokio::test(start_paused = true)]
    async fn echo_call_16khz_paced_exactly() {
        echo_comes_back(SlinRate::Hz16000).await;
    }

    #[tokio::test(start_paused = true)]
    async fn max_duration_sends_goodbye_at_exactly_the_limit() {
        let params = SessionParams {
            max_duration: Some(Duration::from_millis(1_000)),
            ..SessionParams::default()
        };
        let agent = Arc::new(EchoAgent::new(Duration::ZERO));
        let (report, summary) = call(
            &plan(SlinRate::Hz8000, 5.0),
            agent,
            params,
            CancellationToken::new(),
        )
        .await;
        assert!(report.hangup_received, "0x00 at the limit");
        assert!(report.closed_by_peer);
        let last = report.arrivals_ms.last().copied();
        assert_eq!(last, Some(980.0), "frames 0..=980 ms, none at the limit");
        assert_eq!(summary.duration, Duration::from_millis(1_000));
        assert_eq!(summary.outcome, Outcome::MaxDuration);
        assert_eq!(summary.frames_out, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_caller_is_closed_by_the_idle_timeout_exactly() {
        let params = SessionParams {
            idle_timeout: Duration::from_millis(1_000),
            ..SessionParams::default()
        };
        let (mut caller, server_end) = tokio::io::duplex(64 * 1024);
        let session = tokio::spawn(async move {
            let conn = AudioSocketPort::new(Connection::new(server_end));
            let agent = Arc::new(EchoAgent::new(Duration::ZERO));
            run_session(
                conn,
                info(Uuid::from_u128(5)),
                agent,
                params,
                CancellationToken::new(),
            )
            .await
        });
        let t0 = Instant::now();
        let mut conn = Connection::new(&mut caller);
        for n in 0..10u64 {
            tokio::time::sleep_until(t0 + Duration::from_millis(20 * n)).await;
            conn.write_audio(SlinRate::Hz8000, &[0; 160]).await.unwrap();
        }
        // Silence from here on, the stream left open: what a vanished peer looks like.
        let mut hangup_at = None;
        while let Some(m) = conn.read_message().await.unwrap() {
            if m == Message::Hangup {
                hangup_at = Some(t0.elapsed());
            }
        }
        // Last input at 180 ms; the first tick more than 1000 ms later is at 1200 ms.
        assert_eq!(
            hangup_at,
            Some(Duration::from_millis(1_200)),
            "0x00 before the close"
        );
        let s = session.await.unwrap();
        assert_eq!(s.outcome, Outcome::IdleTimeout);
        assert_eq!(s.frames_in, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn hangup_token_sends_goodbye_and_ends_as_shutdown() {
        let hangup = CancellationToken::new();
        let t0 = Instant::now();
        tokio::spawn({
            let hangup = hangup.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                hangup.cancel();
            }
        });
        let agent = Arc::new(EchoAgent::new(Duration::ZERO));
        let (report, summary) = call(
            &plan(SlinRate::Hz8000, 10.0),
            agent,
            SessionParams::default(),
            hangup,
        )
        .await;
        assert!(report.hangup_received, "live call got 0x00");
        assert_eq!(summary.outcome, Outcome::Shutdown);
        // Frames every 20 ms up to the hangup at 700 ms: the last at 680 ms.
        assert_eq!(report.arrivals_ms.last().copied(), Some(680.0));
        assert!(t0.elapsed() >= Duration::from_millis(700));
        assert_eq!(summary.duration, Duration::from_millis(700));
    }
}
