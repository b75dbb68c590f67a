//! The AudioSocket listener: accepts Asterisk's connections, reads the call id, and runs one
//! task per call ([`crate::call::run_session`]).
//!
//! A malformed stream or a missing call id closes that connection only, logged with the peer
//! and call id; every other call goes on. Shutdown is two-staged: [`Server::run`] stops
//! accepting when `stop` is cancelled, then waits for live calls up to the grace period, then
//! cancels `hangup`, which makes each call send `0x00` and close.
//!
//! With a [`Guard`] ([`Server::with_guard`]) every connection is screened on accept, before
//! its call id is read (allowlist, budget, handshakes in progress), and checked against the
//! call limits once the id is read: a refused one is closed at once and counted, no agent
//! session is ever started for it, and it leaves no call record. Refusals and failed
//! handshakes are logged as aggregated lines at most every 10 s ([`crate::health::tally`]),
//! never one line per connection. After the call id, [`crate::fallback::route`] may send the
//! call straight to the humans (maintenance switch, open circuit breaker). New calls use the
//! newest [`Generation`] ([`Server::with_updates`], SIGHUP); a live call keeps the one it
//! started with.

use crate::agent::{CallInfo, SharedAgent};
use crate::audiosocket::codec::Message;
use crate::call::directory::{Admission, CallDetails, CallDirectory};
use crate::call::{CallSummary, Outcome, SessionParams, session::read_message};
use crate::fallback::{Breaker, FallbackConfig, Route};
use crate::guard::{Guard, Handshake, Rejection};
use crate::health::tally::{Tally, WINDOW};
use crate::health::{HealthState, metrics as m};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

/// Settings of the listener.
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
    pub fn from_config(c: &crate::config::AudioSocketConfig) -> Self {
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
}

impl ServerParams {
    /// Gives every call the tools of `tools` (`[[tools]]`).
    pub fn with_tools(mut self, tools: Arc<crate::tools::ToolRegistry>) -> Self {
        self.session.tools = tools;
        self
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

/// Where the summaries of finished calls go ([`Server::with_summaries`]).
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
    pub fn send(&self, summary: CallSummary) {
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

/// A bound AudioSocket listener, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    summaries: Option<SummaryTx>,
    current: watch::Receiver<Arc<Generation>>,
    guard: Option<Arc<Guard>>,
    breaker: Arc<Breaker>,
    health: Option<(Arc<HealthState>, Duration)>,
    directory: Option<Arc<dyn CallDirectory>>,
    tunnel: Option<crate::tunnel::TunnelListener>,
}

impl std::fmt::Debug for dyn crate::agent::Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agent({})", self.name())
    }
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]).
    ///
    /// # Errors
    /// The bind error.
    pub async fn bind(
        addr: SocketAddr,
        agent: SharedAgent,
        params: ServerParams,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let params = Arc::new(params);
        // The sender is dropped: without with_updates the first generation stays in force.
        let (_tx, current) = watch::channel(Arc::new(Generation {
            agent,
            params,
            fallback: FallbackConfig::default(),
        }));
        Ok(Server {
            listener,
            summaries: None,
            current,
            guard: None,
            // Never opens (threshold 0) unless with_breaker supplies one.
            breaker: Arc::new(Breaker::new(0, Duration::from_secs(1))),
            health: None,
            directory: None,
            tunnel: None,
        })
    }

    /// Checks every connection with `guard` on accept.
    pub fn with_guard(mut self, guard: Arc<Guard>) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Uses `breaker` for the circuit breaker (shared with `/health`).
    pub fn with_breaker(mut self, breaker: Arc<Breaker>) -> Self {
        self.breaker = breaker;
        self
    }

    /// Reports live calls and progress to `health`; the accept loop beats
    /// `health.accept` every `beat`.
    pub fn with_health(mut self, health: Arc<HealthState>, beat: Duration) -> Self {
        self.health = Some((health, beat));
        self
    }

    /// New calls use the newest [`Generation`] sent on this channel (reload); its current
    /// value replaces the agent and params given to [`Server::bind`].
    pub fn with_updates(mut self, updates: watch::Receiver<Arc<Generation>>) -> Self {
        self.current = updates;
        self
    }

    /// Sends the summary of every admitted call, once it ends, to `tx` (for call records and
    /// tests). Refused connections and failed handshakes send none.
    pub fn with_summaries(mut self, tx: impl Into<SummaryTx>) -> Self {
        self.summaries = Some(tx.into());
        self
    }

    /// Asks `directory` about each call before it starts and tells it how each call ended
    /// (caller details and DTMF from ARI, Stasis-only admission, the `/next` store).
    pub fn with_directory(mut self, directory: Arc<dyn CallDirectory>) -> Self {
        self.directory = Some(directory);
        self
    }

    /// Also accepts AudioSocket calls arriving through the WireGuard tunnel on `listener`
    /// (the tunnel address and port); the guard sees their tunnel source address.
    pub fn with_tunnel(mut self, listener: crate::tunnel::TunnelListener) -> Self {
        self.tunnel = Some(listener);
        self
    }

    /// The bound address.
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts calls until `stop` is cancelled, then lets live calls finish for the grace
    /// period and hangs up the rest. Returns when every call task has ended.
    pub async fn run(mut self, stop: CancellationToken) {
        let tracker = TaskTracker::new();
        let hangup = CancellationToken::new();
        let local = self.listener.local_addr().ok();
        let first = self.current.borrow().clone();
        info!(listen = ?local, agent = first.agent.name(), "audiosocket listening");
        let beat_period = self
            .health
            .as_ref()
            .map_or(Duration::from_secs(1), |(_, p)| *p);
        let mut beat = tokio::time::interval(beat_period);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tunnel = self.tunnel.take();
        if let Some(t) = &tunnel {
            info!(listen = %t.local_addr(), "audiosocket listening inside the WireGuard tunnel");
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = beat.tick() => {
                    if let Some((health, _)) = &self.health {
                        health.accept.beat();
                    }
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                        }
                        self.spawn_call(stream, peer, &tracker, &hangup);
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                accepted = next_tunnel_connection(&mut tunnel) => match accepted {
                    Ok((stream, peer)) => self.spawn_call(stream, peer, &tracker, &hangup),
                    Err(e) => {
                        warn!(error = %e, "the WireGuard tunnel stopped; no more calls through it");
                        tunnel = None;
                    }
                },
            }
        }
        drop(self.listener);
        let grace = self.current.borrow().params.shutdown_grace;
        tracker.close();
        let live = tracker.len();
        if live > 0 {
            info!(
                live_calls = live,
                grace_s = grace.as_secs(),
                "stopped accepting; waiting for live calls"
            );
        }
        if timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                live_calls = tracker.len(),
                "grace period over; hanging up live calls"
            );
            hangup.cancel();
            tracker.wait().await;
        }
        // What the aggregated lines have not reported yet.
        for tally in [&REFUSED, &HANDSHAKES_FAILED] {
            tally.log(&tally.take_pending());
        }
        info!("audiosocket listener stopped");
    }
}

impl Server {
    /// Screens a new connection (the guard, with the tunnel address as the source for tunnel
    /// connections) and runs it in its own task: the call id, the call limits, the call.
    fn spawn_call<S>(
        &self,
        stream: S,
        peer: SocketAddr,
        tracker: &TaskTracker,
        hangup: &CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let generation = self.current.borrow().clone();
        let handshake = match &self.guard {
            None => None,
            Some(guard) => match guard.screen(peer.ip(), SystemTime::now()) {
                Ok(h) => Some(h),
                Err(rejection) => {
                    // A plain close is enough: nothing was read.
                    drop(stream);
                    refuse(peer, rejection);
                    return;
                }
            },
        };
        let ctx = CallContext {
            generation,
            breaker: self.breaker.clone(),
            guard: self.guard.clone(),
            health: self.health.as_ref().map(|(h, _)| h.clone()),
        };
        let hangup = hangup.clone();
        let summaries = self.summaries.clone();
        let directory = self.directory.clone();
        tracker.spawn(async move {
            let summary = handle_connection(stream, peer, handshake, &ctx, hangup, directory).await;
            if let Some(summary) = summary {
                ctx.account(&summary).await;
                if let Some(tx) = summaries {
                    tx.send(summary);
                }
            }
        });
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

/// Counts a connection that closed, timed out or misbehaved before its call id.
fn handshake_failed(peer: SocketAddr, reason: &'static str) {
    ::metrics::counter!(m::HANDSHAKE_FAILURES, "reason" => reason).increment(1);
    debug!(%peer, reason, "connection closed before a call id");
    HANDSHAKES_FAILED.note_and_log(reason);
}

/// The next connection through the tunnel, or never when there is no tunnel listener.
async fn next_tunnel_connection(
    tunnel: &mut Option<crate::tunnel::TunnelListener>,
) -> std::io::Result<(crate::tunnel::TunnelStream, SocketAddr)> {
    match tunnel {
        Some(t) => t.accept().await,
        None => std::future::pending().await,
    }
}

/// What a call task shares with the listener.
struct CallContext {
    generation: Arc<Generation>,
    breaker: Arc<Breaker>,
    guard: Option<Arc<Guard>>,
    health: Option<Arc<HealthState>>,
}

impl CallContext {
    /// Metrics, breaker, health and budget bookkeeping for a finished call.
    async fn account(&self, s: &CallSummary) {
        let (label, _) = crate::records::outcome_label(&s.outcome);
        ::metrics::counter!(m::CALLS_TOTAL, "outcome" => label).increment(1);
        ::metrics::counter!(m::UNDERRUNS).increment(s.underruns);
        ::metrics::counter!(m::IDLE_FRAMES).increment(s.idle_frames);
        ::metrics::counter!(m::FRAMES_DROPPED, "direction" => "in").increment(s.frames_dropped_in);
        ::metrics::counter!(m::FRAMES_DROPPED, "direction" => "out")
            .increment(s.late_skipped_frames);
        ::metrics::counter!(m::BARGE_INS).increment(s.barge_ins);
        let latency = ::metrics::histogram!(m::TURN_LATENCY);
        for ms in &s.turn_latencies_ms {
            latency.record(*ms as f64 / 1000.0);
        }
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
                if let Some(h) = &self.health {
                    h.set_component(
                        crate::health::component::AGENT,
                        crate::health::Component::new(
                            crate::health::ComponentStatus::Down,
                            format!("{}: {reason}", s.agent),
                        ),
                    );
                }
            }
        } else if s.agent_frames_out > 0 || matches!(s.outcome, Outcome::AgentEnded(_)) {
            self.breaker.record_success();
            if let Some(h) = &self.health {
                h.set_component(
                    crate::health::component::AGENT,
                    crate::health::Component::new(
                        crate::health::ComponentStatus::Ok,
                        format!("{}: last call served", s.agent),
                    ),
                );
            }
        }
        let open = matches!(
            self.breaker.state(),
            crate::fallback::BreakerState::Open { .. }
        );
        ::metrics::gauge!(m::BREAKER_OPEN).set(if open { 1.0 } else { 0.0 });
        if let Some(guard) = &self.guard {
            if s.agent_time > Duration::ZERO {
                let now = SystemTime::now();
                guard.charge(s.agent_time, now);
                ::metrics::gauge!(m::BUDGET_USED).set(guard.budget_used(now).as_secs_f64());
                let guard = guard.clone();
                match tokio::task::spawn_blocking(move || guard.save_budget()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "cannot save the AI budget"),
                    Err(e) => warn!(error = %e, "budget save task failed"),
                }
            }
        }
    }
}

/// Reads the call id, takes a call slot and runs the call. Returns `None` if the connection
/// never became a call.
async fn handle_connection<S>(
    stream: S,
    peer: SocketAddr,
    handshake: Option<Handshake>,
    ctx: &CallContext,
    hangup: CancellationToken,
    directory: Option<Arc<dyn CallDirectory>>,
) -> Option<CallSummary>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let agent = ctx.generation.agent.clone();
    let params: &ServerParams = &ctx.generation.params;
    // One task owns both halves, so the split's lock is never contended.
    let (mut reader, writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(2048);
    let call_id = match timeout(params.call_id_timeout, read_message(&mut reader, &mut buf)).await {
        // Asterisk sends a real UUID (`AudioSocket()` and externalMedia refuse an invalid
        // one); 16 zero bytes is a forged or broken client.
        Ok(Ok(Some(Message::CallId(id)))) if id.is_nil() => {
            handshake_failed(peer, "nil_call_id");
            return None;
        }
        Ok(Ok(Some(Message::CallId(id)))) => id,
        Ok(Ok(Some(other))) => {
            debug!(%peer, first = ?kind_name(&other), "first message is not a call id");
            handshake_failed(peer, "not_call_id");
            return None;
        }
        Ok(Ok(None)) => {
            handshake_failed(peer, "closed");
            return None;
        }
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "malformed stream before the call id");
            handshake_failed(peer, "malformed");
            return None;
        }
        Err(_) => {
            handshake_failed(peer, "timeout");
            return None;
        }
    };
    // The call limits apply from here; the handshake slot is freed either way.
    let _permit = match handshake.map(Handshake::admit).transpose() {
        Ok(p) => p,
        Err(rejection) => {
            refuse(peer, rejection);
            return None;
        }
    };
    let span = info_span!("call", call_id = %call_id, %peer);
    async move {
        // The directory may end this call alone; the server's hangup still ends every call.
        let end = hangup.child_token();
        let details = match &directory {
            Some(d) => match d.admit(call_id, end.clone()).await {
                Admission::Accept(details) => details,
                Admission::Reject => {
                    handshake_failed(peer, "not_issued");
                    return None;
                }
            },
            None => CallDetails::default(),
        };
        info!("call started");
        let info = CallInfo {
            call_id,
            rate_hz: 0,
            caller_number: details.caller_number,
            caller_name: details.caller_name,
            tools: Vec::new(),
        };
        if let Route::Fallback(reason) =
            crate::fallback::route(&ctx.generation.fallback, &ctx.breaker)
        {
            let mut writer = writer;
            info!(%reason, "call sent straight to the operators");
            let handover = params.session.handover.clone();
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
            let mut out = BytesMut::with_capacity(3);
            crate::audiosocket::codec::encode(&Message::Hangup, &mut out);
            let _ = timeout(Duration::from_secs(2), writer.write_all(&out)).await;
            let _ = timeout(Duration::from_secs(2), writer.shutdown()).await;
            let mut s = CallSummary::without_agent(
                call_id,
                agent.name(),
                Outcome::Fallback(reason.to_string()),
            );
            s.fallback = Some(reason);
            if let Some(d) = &directory {
                d.finished(&mut s);
            }
            return Some(s);
        }
        let mut session = params.session.clone();
        if details.media_at_once {
            session.keepalive_before_audio = Duration::ZERO;
        }
        if let Some(h) = &ctx.health {
            session.clock = Some(h.call_clocks.clone());
            h.call_started();
        }
        let mut summary = crate::call::session::run_session_with_input(
            reader,
            writer,
            buf,
            info,
            agent,
            session,
            end,
            details.extra_input,
        )
        .await;
        if let Some(d) = &directory {
            d.finished(&mut summary);
        }
        if let Some(h) = &ctx.health {
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
        Some(summary)
    }
    .instrument(span)
    .await
}

fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Hangup => "hangup",
        Message::CallId(_) => "call id",
        Message::Dtmf(_) => "dtmf",
        Message::Audio { .. } => "audio",
        Message::Error(_) => "error",
    }
}
