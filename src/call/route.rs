//! The router: decides what happens to each connection the AudioSocket listener
//! ([`crate::audiosocket::server`]) accepts, and accounts for each call that ends.
//!
//! [`Router`] is the listener's [`Handler`]. On accept, before a byte is read, the
//! [`Guard`] screens the source (allowlist, budget, handshakes in progress); once the call
//! id is read the call limits apply. A refused connection is closed at once and counted, no
//! agent session is ever started for it, and it leaves no call record. Refusals and failed
//! handshakes are logged as aggregated lines at most every 10 s ([`crate::health::tally`]),
//! never one line per connection. Then the [`CallDirectory`] admits the call (ARI in Stasis
//! mode, the `/next` store), [`crate::fallback::route`] may send it straight to the humans
//! (maintenance switch, open circuit breaker), and otherwise the session runs
//! ([`crate::call::session`]). The summary goes to the directory, to metrics, the breaker,
//! `/health` and the AI budget, then to the records queue. New calls use the newest
//! [`Generation`] (SIGHUP); a live call keeps the one it started with.

use crate::agent::{CallInfo, SharedAgent};
use crate::audiosocket::server::{Handler, HandshakeFailure, Incoming, ListenSettings};
use crate::call::directory::{Admission, CallDetails, CallDirectory};
use crate::call::media::{AudioSocketPort, MediaPort};
use crate::call::{CallSummary, Outcome, SessionParams};
use crate::fallback::{Breaker, FallbackConfig, FallbackReason, Route};
use crate::guard::{Guard, Handshake, Rejection};
use crate::health::tally::{Tally, WINDOW};
use crate::health::{HealthState, metrics as m};
use crate::profiles::announce::Announcements;
use crate::profiles::{Chosen, ProfileChoice, Profiles, Refusal};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// Settings of the listener and of each call.
#[derive(Debug, Clone)]
pub struct ServerParams {
    /// Time a new connection has to send its call id (`0x01`).
    pub call_id_timeout: Duration,
    /// How long live calls may go on after shutdown starts.
    pub shutdown_grace: Duration,
    /// Per-call settings.
    pub session: SessionParams,
}

impl ServerParams {
    /// The listener settings of a config.
    pub fn from_config(c: &crate::audiosocket::config::AudioSocketConfig) -> Self {
        ServerParams {
            call_id_timeout: c.call_id_timeout(),
            shutdown_grace: c.shutdown_grace(),
            session: SessionParams {
                playout_max: c.playout_max(),
                idle_timeout: c.idle_timeout(),
                ..SessionParams::default()
            },
        }
    }

    /// Gives every call the tools of `tools` (`[[tools]]`).
    pub fn with_tools(mut self, tools: Arc<crate::tools::ToolRegistry>) -> Self {
        self.session.tools = tools;
        self
    }
}

/// What new calls use: the agent, the listener and session settings, the fallback switches.
/// Replaced as a whole on reload; each call keeps the one it started with.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The agent provider.
    pub agent: SharedAgent,
    /// Listener and per-call settings.
    pub params: Arc<ServerParams>,
    /// Maintenance switch and breaker settings.
    pub fallback: FallbackConfig,
    /// The agent profiles calls choose from (`[[profiles]]`, `[profile_routing]`); `None`:
    /// every call gets `agent`.
    pub profiles: Option<Arc<Profiles>>,
}

impl Generation {
    /// `agent` with `params` and the default fallback switches (off).
    pub fn new(agent: SharedAgent, params: ServerParams) -> Self {
        Generation {
            agent,
            params: Arc::new(params),
            fallback: FallbackConfig::default(),
            profiles: None,
        }
    }

    /// With `profiles` (whose default agent should be [`Self::agent`]).
    pub fn with_profiles(mut self, profiles: Profiles) -> Self {
        self.profiles = Some(Arc::new(profiles));
        self
    }

    /// The profile for a call announced with `choice` ([`Profiles::choose`]); without
    /// profiles, [`Self::agent`] with the choice's variables.
    ///
    /// # Errors
    /// [`Refusal`] when `[profile_routing]` refuses the call.
    pub(crate) fn choose(&self, choice: &ProfileChoice) -> Result<Chosen, Refusal> {
        match &self.profiles {
            Some(p) => p.choose(choice),
            None => Profiles::single(self.agent.clone()).choose(choice),
        }
    }
}

impl std::fmt::Debug for dyn crate::agent::Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agent({})", self.name())
    }
}

/// Connections refused by the guard (metrics: `voicegate_guard_rejections_total{reason}`).
static REFUSED: Tally = Tally::new("AudioSocket connections refused by the guard", WINDOW);
/// Connections that closed, misbehaved or were not issued before becoming a call (metrics:
/// `voicegate_handshake_failures_total{reason}`).
static HANDSHAKES_FAILED: Tally =
    Tally::new("AudioSocket connections that did not become a call", WINDOW);
/// Summaries the records writer could not take (metrics: `voicegate_records_lost_total`).
static SUMMARIES_LOST: Tally = Tally::new("call records lost", WINDOW);

/// Where the summaries of finished calls go ([`Router::summaries`]).
#[derive(Debug, Clone)]
pub enum SummaryTx {
    /// A bounded queue (the service's records writer): when it is full the summary is
    /// dropped and counted (`voicegate_records_lost_total{reason="queue_full"}`), never held.
    Bounded(mpsc::Sender<CallSummary>),
    /// An unbounded queue, for tests and tools that drain it at once.
    Unbounded(mpsc::UnboundedSender<CallSummary>),
}

impl From<mpsc::Sender<CallSummary>> for SummaryTx {
    fn from(tx: mpsc::Sender<CallSummary>) -> Self {
        SummaryTx::Bounded(tx)
    }
}

impl From<mpsc::UnboundedSender<CallSummary>> for SummaryTx {
    fn from(tx: mpsc::UnboundedSender<CallSummary>) -> Self {
        SummaryTx::Unbounded(tx)
    }
}

impl SummaryTx {
    /// Sends one summary: never waits; a full bounded queue drops it, counted.
    pub(crate) fn send(&self, summary: CallSummary) {
        match self {
            SummaryTx::Bounded(tx) => {
                if let Err(mpsc::error::TrySendError::Full(s)) = tx.try_send(summary) {
                    ::metrics::counter!(m::RECORDS_LOST, "reason" => "queue_full").increment(1);
                    debug!(call_id = %s.call_id, "records queue full; this call's record is lost");
                    SUMMARIES_LOST.note_and_log("queue_full");
                }
            }
            SummaryTx::Unbounded(tx) => {
                let _ = tx.send(summary);
            }
        }
    }
}

/// Decides about every connection and accounts for every call; see the module docs.
/// Build it with [`Router::new`] and set the collaborators the deployment has.
#[derive(Debug)]
pub struct Router {
    /// New calls use the newest generation on this channel (reload).
    pub generation: watch::Receiver<Arc<Generation>>,
    /// Screens every connection on accept and holds the call limits and the AI budget.
    pub guard: Option<Arc<Guard>>,
    /// The circuit breaker (shared with `/health`); a fresh one never opens by itself.
    pub breaker: Arc<Breaker>,
    /// Live calls, call clocks and the agent component of `/health`; the accept loop beats
    /// `health.accept` every `Duration`.
    pub health: Option<(Arc<HealthState>, Duration)>,
    /// Asked about each call before it starts, told how each ended (ARI, `/next`).
    pub directory: Option<Arc<dyn CallDirectory>>,
    /// Where the summary of every admitted call goes once it ends (records, tests).
    /// Refused connections and failed handshakes send none.
    pub summaries: Option<SummaryTx>,
    /// The dialplan's announcements (`POST /v1/calls/{uuid}`): each call takes its own.
    pub announcements: Option<Arc<Announcements>>,
}

impl Router {
    /// A router whose calls use the newest generation of `generation`, with no guard, a
    /// breaker that never opens, no health, no directory and no summaries.
    pub fn new(generation: watch::Receiver<Arc<Generation>>) -> Self {
        Router {
            generation,
            guard: None,
            // Never opens (threshold 0) unless the service supplies its own.
            breaker: Arc::new(Breaker::new(0, Duration::from_secs(1))),
            health: None,
            directory: None,
            summaries: None,
            announcements: None,
        }
    }

    /// A router whose calls all use `generation` (no reload): for tests and the self-test.
    pub fn fixed(generation: Generation) -> Self {
        // The sender is dropped: the receiver keeps its value.
        Router::new(watch::channel(Arc::new(generation)).1)
    }
}

/// What [`Router::screen`] let through: the generation current on accept and the guard's
/// handshake slot.
#[derive(Debug)]
pub struct Ticket {
    generation: Arc<Generation>,
    handshake: Option<Handshake>,
}

impl Handler for Router {
    type Ticket = Ticket;

    fn screen(&self, peer: SocketAddr) -> Option<Ticket> {
        let handshake = match &self.guard {
            None => None,
            Some(guard) => match guard.screen(peer.ip(), SystemTime::now()) {
                Ok(h) => Some(h),
                Err(rejection) => {
                    // A plain close is enough: nothing was read.
                    refuse(peer, rejection);
                    return None;
                }
            },
        };
        Some(Ticket {
            generation: self.generation.borrow().clone(),
            handshake,
        })
    }

    fn handshake_failed(&self, peer: SocketAddr, why: HandshakeFailure) {
        handshake_failed(peer, why.label());
    }

    async fn call(&self, incoming: Incoming, ticket: Ticket, hangup: CancellationToken) {
        let Incoming {
            stream,
            peer,
            call_id,
        } = incoming;
        self.take_call(AudioSocketPort::new(stream), call_id, peer, ticket, hangup)
            .await;
    }

    fn settings(&self) -> ListenSettings {
        let g = self.generation.borrow();
        ListenSettings {
            call_id_timeout: g.params.call_id_timeout,
            shutdown_grace: g.params.shutdown_grace,
        }
    }

    fn beat_period(&self) -> Duration {
        self.health
            .as_ref()
            .map_or(Duration::from_secs(1), |(_, p)| *p)
    }

    fn beat(&self) {
        if let Some((health, _)) = &self.health {
            health.accept.beat();
        }
    }

    fn stopped(&self) {
        // What the aggregated lines have not reported yet.
        for tally in [&REFUSED, &HANDSHAKES_FAILED] {
            tally.log(&tally.take_pending());
        }
    }
}

/// Counts a refused connection; strangers only at debug, the others in an aggregated line.
fn refuse(peer: SocketAddr, rejection: Rejection) {
    ::metrics::counter!(m::GUARD_REJECTIONS, "reason" => rejection.label()).increment(1);
    if rejection == Rejection::NotAllowed {
        // Strangers are only counted: logging each would let a scan fill the disk.
        debug!(%peer, "connection from outside the allowlist closed");
        return;
    }
    debug!(%peer, reason = rejection.label(), "connection refused by the guard");
    REFUSED.note_and_log(rejection.label());
}

/// Counts a connection that closed, timed out or misbehaved before becoming a call.
fn handshake_failed(peer: SocketAddr, reason: &'static str) {
    ::metrics::counter!(m::HANDSHAKE_FAILURES, "reason" => reason).increment(1);
    debug!(%peer, reason, "connection closed before a call id");
    HANDSHAKES_FAILED.note_and_log(reason);
}

impl Router {
    /// Runs one call that [`Handler::screen`] let through, over any media transport: the call
    /// limits (the ticket's handshake slot is admitted or refused here), then in the call's
    /// span the directory, the fallback route, the session, and the accounting (metrics,
    /// breaker, `/health`, budget, records). Each transport's listener calls this with its
    /// [`MediaPort`] once it knows the call id; the AudioSocket listener does through
    /// [`Handler::call`]. `peer` is the media source (for the logs and refusals).
    pub(crate) async fn take_call<M: MediaPort>(
        &self,
        media: M,
        call_id: uuid::Uuid,
        peer: SocketAddr,
        ticket: Ticket,
        hangup: CancellationToken,
    ) {
        self.take_call_with_choice(media, call_id, peer, None, ticket, hangup)
            .await;
    }

    /// [`Self::take_call`] for a transport that carries the call's profile and details
    /// itself (the WebSocket media channel's `v(profile=...,caller=...)`): `choice` fills
    /// what the directory (Stasis) left unsaid, and the dialplan's announce what both did.
    pub(crate) async fn take_call_with_choice<M: MediaPort>(
        &self,
        media: M,
        call_id: uuid::Uuid,
        peer: SocketAddr,
        choice: Option<ProfileChoice>,
        ticket: Ticket,
        hangup: CancellationToken,
    ) {
        // The call limits apply from here; the handshake slot is freed either way.
        let _permit = match ticket.handshake.map(Handshake::admit).transpose() {
            Ok(p) => p,
            Err(rejection) => {
                refuse(peer, rejection);
                return;
            }
        };
        let span = info_span!("call", %call_id, %peer, transport = media.transport());
        let generation = ticket.generation;
        let summary = self
            .run_call(media, call_id, peer, choice, &generation, hangup)
            .instrument(span.clone())
            .await;
        if let Some(summary) = summary {
            self.account(&summary).instrument(span).await;
            if let Some(tx) = &self.summaries {
                tx.send(summary);
            }
        }
    }

    /// Inside the call's span: the directory, the fallback route, the session. `None` if
    /// the directory refused the call.
    async fn run_call<M: MediaPort>(
        &self,
        conn: M,
        call_id: uuid::Uuid,
        peer: SocketAddr,
        from_transport: Option<ProfileChoice>,
        generation: &Generation,
        hangup: CancellationToken,
    ) -> Option<CallSummary> {
        // The directory may end this call alone; the server's hangup still ends every call.
        let end = hangup.child_token();
        let mut details = match &self.directory {
            Some(d) => match d.admit(call_id, end.clone()).await {
                Admission::Accept(details) => details,
                Admission::Reject => {
                    handshake_failed(peer, "not_issued");
                    return None;
                }
            },
            None => CallDetails::default(),
        };
        // The profile: what the directory (Stasis), the transport (the WebSocket media
        // channel's query) or the dialplan's announce said, in that order, with the caller's
        // details from ARI where they left them out.
        let mut choice = details.profile.take().unwrap_or_default();
        if let Some(t) = from_transport {
            choice = choice.or(t);
        }
        if let Some(a) = &self.announcements
            && let Some(announced) = a.take(call_id, tokio::time::Instant::now())
        {
            choice = choice.or(announced);
        }
        choice.caller_number = choice.caller_number.or(details.caller_number.clone());
        choice.caller_name = choice.caller_name.or(details.caller_name.clone());
        let chosen = match generation.choose(&choice) {
            Ok(c) => c,
            Err(refusal) => {
                let mut summary = refuse_profile(conn, call_id, generation, &refusal).await;
                summary.caller_number = choice.caller_number;
                if let Some(d) = &self.directory {
                    d.finished(&mut summary);
                }
                return Some(summary);
            }
        };
        info!(profile = %chosen.name, "call started");
        let info = CallInfo {
            call_id,
            rate_hz: 0,
            caller_number: choice.caller_number.clone(),
            caller_name: choice.caller_name.clone(),
            tools: Vec::new(),
            variables: chosen.variables.clone(),
        };
        let route = crate::fallback::route(&generation.fallback, &self.breaker);
        let mut summary = match (route, self.admit_profile(&chosen)) {
            (Route::Fallback(reason), _) | (Route::Agent, Err(reason)) => {
                to_operators(conn, info, generation, reason).await
            }
            (Route::Agent, Ok(_permit)) => {
                self.session(conn, info, details, &chosen, generation, end)
                    .await
            }
        };
        summary.profile = Some(chosen.name);
        if let Some(d) = &self.directory {
            d.finished(&mut summary);
        }
        Some(summary)
    }

    /// A slot in the chosen profile's own limits (`[profiles.limits]`), held for the
    /// call; `None` without a guard.
    ///
    /// # Errors
    /// [`FallbackReason::ProfileLimit`] when the profile is at its `max_calls` or has
    /// spent its `daily_budget_minutes`.
    fn admit_profile(
        &self,
        chosen: &Chosen,
    ) -> Result<Option<crate::guard::ProfilePermit>, FallbackReason> {
        let Some(guard) = &self.guard else {
            return Ok(None);
        };
        guard
            .admit_profile(&chosen.name, &chosen.limits, SystemTime::now())
            .map(Some)
            .map_err(|limit| FallbackReason::ProfileLimit {
                profile: chosen.name.clone(),
                limit,
            })
    }

    /// Runs the session and logs how it ended.
    async fn session<M: MediaPort>(
        &self,
        conn: M,
        info: CallInfo,
        details: CallDetails,
        chosen: &Chosen,
        generation: &Generation,
        end: CancellationToken,
    ) -> CallSummary {
        let mut session = generation.params.session.clone();
        if details.media_at_once {
            session.keepalive_before_audio = Duration::ZERO;
        }
        session.observer = details.observer;
        session.max_duration = chosen.limits.max_call(session.max_duration);
        if let Some(tools) = &chosen.tools {
            session.tools = tools.clone();
        }
        let health = self.health.as_ref().map(|(h, _)| h);
        if let Some(h) = health {
            session.clock = Some(h.call_clocks.clone());
            h.call_started();
        }
        let agent = chosen.agent.clone();
        let extra = details.extra_input;
        let summary =
            crate::call::session::run_session_with_input(conn, info, agent, session, end, extra)
                .await;
        if let Some(h) = health {
            h.call_ended();
        }
        match &summary.outcome {
            Outcome::ProtocolError(e) => warn!(error = %e, "malformed stream; call closed"),
            Outcome::Fallback(e) => warn!(error = %e, "call handed to the fallback"),
            _ => {}
        }
        info!(
            outcome = ?summary.outcome,
            duration_ms = summary.duration.as_millis() as u64,
            frames_in = summary.frames_in,
            frames_out = summary.frames_out,
            underruns = summary.underruns,
            idle_frames = summary.idle_frames,
            late_skipped_frames = summary.late_skipped_frames,
            barge_ins = summary.barge_ins,
            "call ended"
        );
        summary
    }
}

/// Closes a call `[profile_routing]` refuses (`0x00`, close) before any agent session; its
/// summary says `rejected` with the reason.
async fn refuse_profile<M: MediaPort>(
    mut conn: M,
    call_id: uuid::Uuid,
    generation: &Generation,
    refusal: &Refusal,
) -> CallSummary {
    warn!(reason = %refusal, "call refused: {}", refusal.label());
    let _ = timeout(Duration::from_secs(2), conn.hang_up()).await;
    let _ = timeout(Duration::from_secs(2), conn.close()).await;
    let outcome = Outcome::Rejected(format!("profile: {refusal}"));
    let mut s = CallSummary::without_agent(call_id, generation.agent.name(), outcome);
    s.transport = conn.transport();
    s
}

/// Sends a call straight to the humans (maintenance, open breaker): the handover, `0x00`,
/// close. No agent session is opened.
async fn to_operators<M: MediaPort>(
    mut conn: M,
    info: CallInfo,
    generation: &Generation,
    reason: FallbackReason,
) -> CallSummary {
    info!(%reason, "call sent straight to the operators");
    let handover = generation.params.session.handover.clone();
    if timeout(
        crate::fallback::HANDOVER_TIMEOUT,
        handover.hand_over(&info, &reason),
    )
    .await
    .is_err()
    {
        warn!(
            via = handover.name(),
            "fallback handover timed out; dialplan fall-through"
        );
    }
    let _ = timeout(Duration::from_secs(2), conn.hang_up()).await;
    let _ = timeout(Duration::from_secs(2), conn.close()).await;
    let outcome = Outcome::Fallback(reason.to_string());
    let mut s = CallSummary::without_agent(info.call_id, generation.agent.name(), outcome);
    s.caller_number = info.caller_number.clone();
    s.fallback = Some(reason);
    s.transport = conn.transport();
    s
}

impl Router {
    /// Metrics, breaker, health and budget bookkeeping for a finished call.
    async fn account(&self, s: &CallSummary) {
        count_call(s);
        if let Some(reason) = &s.fallback {
            ::metrics::counter!(m::FALLBACKS, "reason" => reason.label()).increment(1);
            if reason.is_provider_failure() {
                let why = reason.provider_reason();
                if why == "quota" {
                    warn!(provider = s.agent, error = %reason, "provider refused for a quota or concurrency limit");
                }
                ::metrics::counter!(m::PROVIDER_ERRORS, "provider" => s.agent, "reason" => why)
                    .increment(1);
                self.breaker.record_failure();
                self.agent_health(
                    crate::health::ComponentStatus::Down,
                    format!("{}: {reason}", s.agent),
                );
            }
        } else if s.agent_frames_out > 0 || matches!(s.outcome, Outcome::AgentEnded(_)) {
            self.breaker.record_success();
            self.agent_health(
                crate::health::ComponentStatus::Ok,
                format!("{}: last call served", s.agent),
            );
        }
        let open = matches!(
            self.breaker.state(),
            crate::fallback::BreakerState::Open { .. }
        );
        ::metrics::gauge!(m::BREAKER_OPEN).set(if open { 1.0 } else { 0.0 });
        if let Some(guard) = &self.guard {
            charge_budget(guard, s.profile.as_deref(), s.agent_time).await;
        }
    }

    fn agent_health(&self, status: crate::health::ComponentStatus, detail: String) {
        if let Some((h, _)) = &self.health {
            h.set_component(
                crate::health::component::AGENT,
                crate::health::Component::new(status, detail),
            );
        }
    }
}

/// The per-call counters of a summary into the metrics.
fn count_call(s: &CallSummary) {
    let (label, _) = s.outcome.label();
    ::metrics::counter!(m::CALLS_TOTAL, "outcome" => label).increment(1);
    ::metrics::counter!(m::CALLS_BY_TRANSPORT, "transport" => s.transport).increment(1);
    ::metrics::counter!(m::UNDERRUNS).increment(s.underruns);
    ::metrics::counter!(m::IDLE_FRAMES).increment(s.idle_frames);
    ::metrics::counter!(m::FRAMES_DROPPED, "direction" => "in").increment(s.frames_dropped_in);
    ::metrics::counter!(m::FRAMES_DROPPED, "direction" => "out").increment(s.late_skipped_frames);
    ::metrics::counter!(m::BARGE_INS).increment(s.barge_ins);
    ::metrics::counter!(m::FALSE_BARGE_INS).increment(s.false_barge_ins);
    ::metrics::counter!(m::BACKCHANNELS).increment(s.backchannels);
    ::metrics::counter!(m::BARGE_IN_RESUMED_AUDIO).increment(s.resumed_audio_ms);
    let barge = ::metrics::histogram!(m::BARGE_IN_LATENCY);
    for ms in &s.barge_in_latencies_ms {
        barge.record(*ms as f64 / 1000.0);
    }
    let latency = ::metrics::histogram!(m::TURN_LATENCY);
    for ms in &s.turn_latencies_ms {
        latency.record(*ms as f64 / 1000.0);
    }
}

/// Charges an agent session's time to the day's AI budget (and to its profile's share)
/// and saves it.
async fn charge_budget(guard: &Arc<Guard>, profile: Option<&str>, agent_time: Duration) {
    if agent_time == Duration::ZERO {
        return;
    }
    let now = SystemTime::now();
    guard.charge_profile(profile, agent_time, now);
    ::metrics::gauge!(m::BUDGET_USED).set(guard.budget_used(now).as_secs_f64());
    let guard = guard.clone();
    match tokio::task::spawn_blocking(move || guard.save_budget()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "cannot save the AI budget"),
        Err(e) => warn!(error = %e, "budget save task failed"),
    }
}
