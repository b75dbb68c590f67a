//! The guard and the human fallback through the real AudioSocket listener: strangers are
//! closed before any agent session, an unreachable provider hands the caller to the dialplan
//! (`0x00`) within 2 s, the circuit breaker opens and closes, maintenance sends every call
//! to the operators, a silent agent is given up on.
#![allow(clippy::disallowed_types)] // a test on real sockets and processes: real time (std::time::Instant)

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voicegate::agent::{
    Agent, AgentError, AgentEvent, AgentInput, AgentSession, CallInfo, SharedAgent,
};
use voicegate::audio::ReplyId;
use voicegate::audio::wav::Recording;
use voicegate::audiosocket::SlinRate;
use voicegate::audiosocket::server::Server;
use voicegate::call::route::{Generation, Router, ServerParams};
use voicegate::call::{CallSummary, Outcome};
use voicegate::caller::{CallPlan, place_call};
use voicegate::fallback::{
    Breaker, BreakerState, FallbackConfig, FallbackReason, Handed, Handover,
};
use voicegate::guard::{Guard, GuardConfig};
use voicegate::health::HealthState;

/// A test agent that counts sessions. While `provider_up`, it answers every caller frame
/// with a frame of tone (like a live provider streaming audio); otherwise it tries to open
/// the provider's WebSocket at `url`, where nothing listens, and reports the real
/// connection error. With `silent`, it connects fine but never says anything.
struct CountingAgent {
    sessions: AtomicUsize,
    provider_up: AtomicBool,
    silent: bool,
    url: String,
}

impl CountingAgent {
    fn new(provider_up: bool, silent: bool) -> Arc<Self> {
        // A port that was just free: connecting to it is refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        Arc::new(CountingAgent {
            sessions: AtomicUsize::new(0),
            provider_up: AtomicBool::new(provider_up),
            silent,
            url: format!("ws://{closed}/v1/realtime"),
        })
    }
}

impl Agent for CountingAgent {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn start(&self, _call: CallInfo) -> AgentSession {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        let (session, mut io) = voicegate::agent::session_channel();
        let up = self.provider_up.load(Ordering::SeqCst);
        let silent = self.silent;
        let url = self.url.clone();
        tokio::spawn(async move {
            if !up {
                let err = voicegate::agent::ws::connect(&url, &[], Duration::from_secs(5))
                    .await
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "connected to a closed port?".into());
                let _ = io
                    .events
                    .send(AgentEvent::Failed(AgentError::Connect {
                        provider: "counting",
                        detail: err,
                    }))
                    .await;
                return;
            }
            while let Some(input) = io.input.recv().await {
                if let AgentInput::Audio(_) = input {
                    if silent {
                        continue;
                    }
                    let samples: Vec<i16> = (0..160)
                        .map(|i| if i % 16 < 8 { 4000 } else { -4000 })
                        .collect();
                    if io
                        .events
                        .send(AgentEvent::Audio {
                            reply: ReplyId(1),
                            samples,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        session
    }
}

struct Harness {
    addr: SocketAddr,
    stop: CancellationToken,
    summaries: mpsc::UnboundedReceiver<CallSummary>,
    breaker: Arc<Breaker>,
    health: Arc<HealthState>,
    updates: tokio::sync::watch::Sender<Arc<Generation>>,
}

impl Harness {
    async fn start(agent: SharedAgent, guard: GuardConfig, fallback: FallbackConfig) -> Self {
        Self::start_with(agent, guard, fallback, None).await
    }

    async fn start_with(
        agent: SharedAgent,
        guard: GuardConfig,
        fallback: FallbackConfig,
        handover: Option<Arc<dyn Handover>>,
    ) -> Self {
        voicegate::health::metrics::install();
        let mut params = ServerParams::from_config(&Default::default());
        params.session.agent_silence = fallback.agent_silence();
        if let Some(h) = handover {
            params.session.handover = h;
        }
        let breaker = Arc::new(Breaker::from_config(&fallback));
        let health = Arc::new(HealthState::new(agent.name(), breaker.clone()));
        let (updates, rx) = tokio::sync::watch::channel(Arc::new(Generation {
            agent: agent.clone(),
            params: Arc::new(params.clone()),
            fallback,
            profiles: None,
        }));
        let (tx, summaries) = mpsc::unbounded_channel();
        let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut router = Router::new(rx);
        router.guard = Some(Arc::new(Guard::new(guard, None).unwrap()));
        router.breaker = breaker.clone();
        router.health = Some((health.clone(), Duration::from_millis(200)));
        router.summaries = Some(tx.into());
        let addr = server.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(server.run(Arc::new(router), stop.clone()));
        Harness {
            addr,
            stop,
            summaries,
            breaker,
            health,
            updates,
        }
    }

    async fn next_summary(&mut self) -> CallSummary {
        tokio::time::timeout(Duration::from_secs(10), self.summaries.recv())
            .await
            .expect("a summary in time")
            .expect("server running")
    }
}

fn plan(seconds: f64, speech: Recording) -> CallPlan {
    CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate: SlinRate::Hz8000,
        speech,
        speech_offset: Duration::ZERO,
        dtmf: vec![],
        duration: Duration::from_secs_f64(seconds),
    }
}

fn hello() -> Recording {
    common::fixture("hello-world.wav")
}

fn silence() -> Recording {
    Recording {
        rate_hz: 8000,
        samples: vec![0; 8000],
    }
}

fn allow_only_127_0_0_1() -> GuardConfig {
    GuardConfig {
        allow: vec!["127.0.0.1/32".parse().unwrap()],
        ..GuardConfig::default()
    }
}

#[tokio::test]
async fn stranger_from_127_0_0_2_is_closed_and_no_agent_session_starts() {
    let agent = CountingAgent::new(true, false);
    let mut h = Harness::start(
        agent.clone(),
        allow_only_127_0_0_1(),
        FallbackConfig::default(),
    )
    .await;

    // Connect from 127.0.0.2 like a stranger on the LAN would, and behave like Asterisk.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(h.addr).await.unwrap();
    let mut bytes = vec![0x01, 0x00, 0x10];
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(&[0x10, 0x01, 0x40]);
    bytes.extend_from_slice(&[0u8; 320]);
    let _ = stream.write_all(&bytes).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut got))
        .await
        .expect("closed promptly");
    // Closed without a byte (EOF, or a reset because our bytes were unread).
    assert!(got.is_empty(), "server sent {} bytes", got.len());
    let _ = read;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        agent.sessions.load(Ordering::SeqCst),
        0,
        "no agent session for a stranger"
    );
    let metrics = voicegate::health::metrics::render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("voicegate_guard_rejections_total{reason=\"not_allowed\"}")),
        "{metrics}"
    );
    // Strangers leave no record (only a count).
    assert!(h.summaries.try_recv().is_err());

    // The allowed address gets a real call, so the agent is wired up.
    let report = place_call(h.addr, &plan(1.0, hello())).await.unwrap();
    assert!(report.audible_frames_received > 0);
    assert_eq!(agent.sessions.load(Ordering::SeqCst), 1);
    assert_eq!(h.next_summary().await.outcome, Outcome::CallerHungUp);
    h.stop.cancel();
}

#[tokio::test]
async fn call_limit_refuses_the_extra_call_without_an_agent_or_a_record() {
    let agent = CountingAgent::new(true, false);
    let mut h = Harness::start(
        agent.clone(),
        GuardConfig {
            max_calls: 1,
            ..GuardConfig::default()
        },
        FallbackConfig::default(),
    )
    .await;
    let first = tokio::spawn({
        let addr = h.addr;
        async move { place_call(addr, &plan(2.0, hello())).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = place_call(h.addr, &plan(2.0, hello())).await;
    // The second connection is closed without audio (or the write fails on the reset).
    if let Ok(r) = second {
        assert_eq!(r.frames_received, 0);
        assert!(r.duration_ms < 1500.0, "{r:?}");
    }
    // Refusals are counted, not recorded (issue 14): the next summary is the first call's.
    let metrics = voicegate::health::metrics::render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("voicegate_guard_rejections_total{reason=\"global_limit\"}")),
        "{metrics}"
    );
    first.await.unwrap().unwrap();
    assert_eq!(h.next_summary().await.outcome, Outcome::CallerHungUp);
    assert!(
        h.summaries.try_recv().is_err(),
        "no record of the refused call"
    );
    assert_eq!(agent.sessions.load(Ordering::SeqCst), 1);
    h.stop.cancel();
}

#[tokio::test]
async fn provider_unreachable_caller_gets_0x00_within_2s() {
    let agent = CountingAgent::new(false, false);
    let mut h = Harness::start(
        agent.clone(),
        GuardConfig::default(),
        FallbackConfig::default(),
    )
    .await;
    let started = Instant::now();
    let report = place_call(h.addr, &plan(6.0, hello())).await.unwrap();
    let took = started.elapsed();
    eprintln!("provider unreachable: 0x00 after {took:?}");
    assert!(
        report.hangup_received,
        "dialplan fall-through needs 0x00: {report:?}"
    );
    assert!(took < Duration::from_secs(2), "handed over after {took:?}");
    let s = h.next_summary().await;
    assert!(
        matches!(s.outcome, Outcome::Fallback(ref e) if e.contains("cannot connect")),
        "{:?}",
        s.outcome
    );
    assert!(matches!(s.fallback, Some(FallbackReason::AgentFailed(_))));
    h.stop.cancel();
}

/// A stand-in for a transfer handover (the ARI issue plugs one in the same way): records
/// which call it was asked to hand over, and says it transferred it.
struct RecordingHandover(mpsc::UnboundedSender<(uuid::Uuid, FallbackReason)>);

impl Handover for RecordingHandover {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn hand_over<'a>(
        &'a self,
        call: &'a CallInfo,
        reason: &'a FallbackReason,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Handed> + Send + 'a>> {
        let _ = self.0.send((call.call_id, reason.clone()));
        Box::pin(async { Handed::Transferred })
    }
}

#[tokio::test]
async fn a_pluggable_handover_is_asked_before_the_session_closes() {
    let agent = CountingAgent::new(false, false);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let h = Harness::start_with(
        agent,
        GuardConfig::default(),
        FallbackConfig::default(),
        Some(Arc::new(RecordingHandover(tx))),
    )
    .await;
    let p = plan(6.0, hello());
    let started = Instant::now();
    let report = place_call(h.addr, &p).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(report.hangup_received);
    let (id, reason) = rx.try_recv().expect("handover asked");
    assert_eq!(id, p.call_id);
    assert!(matches!(reason, FallbackReason::AgentFailed(_)));
    h.stop.cancel();
}

#[tokio::test]
async fn circuit_breaker_opens_after_k_failures_and_closes_after_cooldown_and_success() {
    let agent = CountingAgent::new(false, false);
    let fallback = FallbackConfig {
        breaker_failures: 2,
        breaker_cooldown_s: 1,
        ..FallbackConfig::default()
    };
    let mut h = Harness::start(agent.clone(), GuardConfig::default(), fallback).await;
    for _ in 0..2 {
        let r = place_call(h.addr, &plan(4.0, hello())).await.unwrap();
        assert!(r.hangup_received);
        h.next_summary().await;
    }
    assert!(matches!(h.breaker.state(), BreakerState::Open { .. }));
    let report = h.health.report();
    assert!(matches!(report.breaker, BreakerState::Open { .. }));
    assert!(
        report.components["agent"]
            .detail
            .contains("circuit breaker open"),
        "{report:?}"
    );
    // Open: the next call goes straight to the fallback, no agent session.
    let started = Instant::now();
    let r = place_call(h.addr, &plan(4.0, hello())).await.unwrap();
    assert!(r.hangup_received);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(agent.sessions.load(Ordering::SeqCst), 2);
    let s = h.next_summary().await;
    assert_eq!(s.fallback, Some(FallbackReason::BreakerOpen));

    // After the cool-down, with the provider back, a served call closes the breaker.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    agent.provider_up.store(true, Ordering::SeqCst);
    let r = place_call(h.addr, &plan(1.0, hello())).await.unwrap();
    assert!(r.audible_frames_received > 0);
    assert_eq!(h.next_summary().await.outcome, Outcome::CallerHungUp);
    assert_eq!(h.breaker.state(), BreakerState::Closed);
    assert_eq!(agent.sessions.load(Ordering::SeqCst), 3);
    h.stop.cancel();
}

#[tokio::test]
async fn maintenance_switch_sends_every_call_to_operators_without_an_agent() {
    let agent = CountingAgent::new(true, false);
    let mut h = Harness::start(
        agent.clone(),
        GuardConfig::default(),
        FallbackConfig::default(),
    )
    .await;
    // Flip the switch as a reload would.
    let current = h.updates.borrow().clone();
    h.updates.send_replace(Arc::new(Generation {
        fallback: FallbackConfig {
            maintenance: true,
            ..FallbackConfig::default()
        },
        ..(*current).clone()
    }));
    let started = Instant::now();
    let r = place_call(h.addr, &plan(4.0, hello())).await.unwrap();
    assert!(r.hangup_received);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(r.frames_received, 0, "0x00 at once, no audio");
    assert_eq!(agent.sessions.load(Ordering::SeqCst), 0);
    let s = h.next_summary().await;
    assert_eq!(s.fallback, Some(FallbackReason::Maintenance));
    // Maintenance is not a provider failure.
    assert_eq!(h.breaker.state(), BreakerState::Closed);
    h.stop.cancel();
}

#[tokio::test]
async fn silent_agent_hands_the_waiting_caller_to_the_fallback() {
    let agent = CountingAgent::new(true, true);
    let mut h = Harness::start(
        agent.clone(),
        GuardConfig::default(),
        FallbackConfig {
            agent_silence_s: 1,
            ..FallbackConfig::default()
        },
    )
    .await;
    let r = place_call(h.addr, &plan(6.0, silence())).await.unwrap();
    assert!(r.hangup_received, "{r:?}");
    assert!(r.duration_ms < 3000.0, "{r:?}");
    let s = h.next_summary().await;
    assert_eq!(s.fallback, Some(FallbackReason::AgentSilent));
    assert!(s.duration >= Duration::from_millis(900), "{:?}", s.duration);
    h.stop.cancel();
}
