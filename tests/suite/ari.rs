//! voicegate against a fake Asterisk (REST + events WebSocket + the externalMedia AudioSocket
//! side, `fake_ari`): Stasis calls end to end, transfers, DTMF, the events link dropping,
//! caller lookup for `AudioSocket()` calls, and clean-up counts.

use crate::common;
use crate::fake_ari;

use common::fixture;
use fake_ari::{FakeAri, PASS, wait_until};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use voicegate::agent::{
    Agent, AgentEndpoint, AgentError, AgentEvent, AgentInput, AgentSession, CallInfo,
};
use voicegate::ari::{AriError, LinkState};
use voicegate::audio::ReplyId;
use voicegate::audiosocket::SlinRate;
use voicegate::audiosocket::server::Server;
use voicegate::call::next::NextStore;
use voicegate::call::route::{Generation, Router, ServerParams};
use voicegate::call::stasis::{self, AriRuntime, Controller, Hooks, Unserved};
use voicegate::call::{CallSummary, Outcome};
use voicegate::caller::{CallPlan, place_call, resample_recording, speech_similarity};
use voicegate::config::{AriConfig, AriFormat, AriMode};
use voicegate::fallback::FallbackReason;
use voicegate::secret::SecretSource;

/// What a test agent does once the caller's audio starts.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Plays the caller's audio straight back.
    Echo,
    /// Echoes, then fails after this long (provider dropped).
    Fail(Duration),
    /// Echoes, then ends the conversation after this long.
    End(Duration),
    /// Echoes, then calls the `transfer_to_operator` tool after this long: the session ends
    /// with `Operator("dialplan")` and the controller `continue`s a Stasis caller (the live
    /// path, as with a real provider's tool call).
    Transfer(Duration),
    /// Cycles Echo, Fail, End, Transfer by call.
    Mixed,
    /// The real OpenAI Realtime agent, configured for a provider nobody listens for.
    Unreachable,
}

#[derive(Default)]
struct AgentLog {
    started: AtomicU64,
    ended: AtomicU64,
    infos: Mutex<Vec<CallInfo>>,
    dtmf: Mutex<Vec<(uuid::Uuid, char)>>,
}

struct TestAgent {
    behaviour: Behaviour,
    log: Arc<AgentLog>,
}

impl Agent for TestAgent {
    fn name(&self) -> &'static str {
        "test"
    }

    fn start(&self, call: CallInfo) -> AgentSession {
        if let Behaviour::Unreachable = self.behaviour {
            // Not a test agent: its session is the real provider's, counted by nobody here.
            self.log.infos.lock().unwrap().push(call.clone());
            return unreachable_provider().start(call);
        }
        let (session, endpoint) = voicegate::agent::session_channel();
        let n = self.log.started.fetch_add(1, Ordering::SeqCst);
        let behaviour = match self.behaviour {
            Behaviour::Mixed => {
                let after = Duration::from_millis(600);
                [
                    Behaviour::Echo,
                    Behaviour::Fail(after),
                    Behaviour::End(after),
                    Behaviour::Transfer(after),
                ][n as usize % 4]
            }
            b => b,
        };
        tokio::spawn(run_agent(behaviour, call, endpoint, self.log.clone()));
        session
    }
}

async fn run_agent(
    behaviour: Behaviour,
    call: CallInfo,
    mut io: AgentEndpoint,
    log: Arc<AgentLog>,
) {
    log.infos.lock().unwrap().push(call.clone());
    let mut deadline: Option<Instant> = None;
    let mut acted = false;
    let mut samples = Vec::new();
    loop {
        let due = deadline.filter(|_| !acted);
        tokio::select! {
            input = io.input.recv() => match input {
                Some(AgentInput::Audio(bytes)) => {
                    if deadline.is_none() {
                        deadline = Some(Instant::now() + match behaviour {
                            Behaviour::Fail(d) | Behaviour::End(d) | Behaviour::Transfer(d) => d,
                            _ => Duration::from_secs(86_400),
                        });
                    }
                    if acted {
                        // Done talking: an ending call's playout drains.
                        continue;
                    }
                    samples.clear();
                    voicegate::audio::slin_from_le_bytes(&bytes, &mut samples);
                    let _ = io.events.try_send(AgentEvent::Audio { reply: ReplyId(0), samples: samples.clone() });
                }
                Some(AgentInput::Dtmf(d)) => log.dtmf.lock().unwrap().push((call.call_id, d)),
                Some(_) => {}
                None => break,
            },
            () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                acted = true;
                match behaviour {
                    Behaviour::Fail(_) => {
                        let _ = io.events.send(AgentEvent::Failed(AgentError::Provider {
                            provider: "test", detail: "provider dropped the session".into() })).await;
                    }
                    Behaviour::End(_) => {
                        let _ = io.events.send(AgentEvent::Ended { reason: "goodbye".into() }).await;
                    }
                    Behaviour::Transfer(_) => {
                        let _ = io.events.send(AgentEvent::ToolCall {
                            call_id: "t1".into(),
                            name: voicegate::tools::TRANSFER_TO_OPERATOR.into(),
                            arguments: "{}".into(),
                            reply: None,
                        }).await;
                    }
                    Behaviour::Echo | Behaviour::Mixed | Behaviour::Unreachable => {}
                }
            }
        }
    }
    log.ended.fetch_add(1, Ordering::SeqCst);
}

/// The tools an installer configures for operators: `transfer_to_operator`.
fn transfer_tool() -> voicegate::tools::ToolRegistry {
    let config = voicegate::config::Config::from_toml(
        "[[tools]]\nkind = \"transfer_to_operator\"\n",
        std::path::Path::new("test.toml"),
    )
    .expect("config");
    voicegate::tools::ToolRegistry::from_config(&config.tools).expect("tools")
}

/// The OpenAI Realtime agent pointed at a loopback port with nothing listening.
fn unreachable_provider() -> voicegate::agent::openai_realtime::OpenAiRealtime {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = voicegate::config::OpenAiRealtimeConfig {
        url: format!("ws://{closed}/v1/realtime"),
        api_key: SecretSource::Inline("sk-test-unreachable".into()),
        ..Default::default()
    };
    voicegate::agent::openai_realtime::OpenAiRealtime::new(&cfg).unwrap()
}

struct Harness {
    fake: FakeAri,
    addr: SocketAddr,
    stop: CancellationToken,
    server_stop: CancellationToken,
    summaries: mpsc::UnboundedReceiver<CallSummary>,
    rt: AriRuntime,
    next: Arc<NextStore>,
    log: Arc<AgentLog>,
    speech: Vec<i16>,
    /// Callers the controller reported as sent to the operators before a session ran.
    unserved: Arc<Mutex<Vec<Unserved>>>,
    /// What the controller's route hook answers for new callers (`None`: the agent).
    route: Arc<Mutex<Option<FallbackReason>>>,
}

impl Harness {
    async fn start(
        behaviour: Behaviour,
        rate: SlinRate,
        tweak: impl FnOnce(&mut AriConfig),
    ) -> Harness {
        let speech = resample_recording(&fixture("hello-world.wav"), rate.hz())
            .unwrap()
            .samples;
        let fake = FakeAri::start(speech, rate).await;
        Self::start_on(fake, behaviour, rate, tweak).await
    }

    /// [`Harness::start`] against a prepared fake (which streams the same fixture).
    async fn start_on(
        fake: FakeAri,
        behaviour: Behaviour,
        rate: SlinRate,
        tweak: impl FnOnce(&mut AriConfig),
    ) -> Harness {
        let speech = resample_recording(&fixture("hello-world.wav"), rate.hz())
            .unwrap()
            .samples;
        let log = Arc::new(AgentLog::default());
        let agent = Arc::new(TestAgent {
            behaviour,
            log: log.clone(),
        });
        let (tx, summaries) = mpsc::unbounded_channel();
        let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        // A `sales` profile beside the default, both this agent (the call's `variables`
        // tell which ran).
        let profiles = voicegate::profiles::Profiles::single(agent.clone())
            .with_profile("sales", agent.clone());
        let mut router = Router::fixed(
            Generation::new(
                agent.clone(),
                ServerParams {
                    shutdown_grace: Duration::from_millis(300),
                    ..ServerParams::from_config(&Default::default())
                }
                .with_tools(Arc::new(transfer_tool())),
            )
            .with_profiles(profiles),
        );
        router.summaries = Some(tx.into());
        let addr = server.local_addr().unwrap();
        let mut cfg = AriConfig {
            url: fake.url(),
            password: SecretSource::Inline(PASS.into()),
            format: if rate == SlinRate::Hz8000 {
                AriFormat::Slin
            } else {
                AriFormat::Slin16
            },
            reconnect_initial_ms: 100,
            reconnect_max_ms: 800,
            ping_interval_ms: 1_000,
            transfer_confirm_ms: 1_000,
            ..AriConfig::default()
        };
        tweak(&mut cfg);
        cfg.validate().expect("test config is valid");
        let stop = CancellationToken::new();
        let next = Arc::new(NextStore::new());
        let unserved = Arc::new(Mutex::new(Vec::new()));
        let route = Arc::new(Mutex::new(None));
        let hooks = Hooks {
            route: Some(Arc::new({
                let route = route.clone();
                move || route.lock().unwrap().clone()
            })),
            report: Some(Arc::new({
                let unserved = unserved.clone();
                move |u| unserved.lock().unwrap().push(u)
            })),
        };
        let mut rt = stasis::start(&cfg, addr, next.clone(), hooks, stop.clone()).unwrap();
        router.directory = Some(Arc::new(rt.controller.clone()));
        let server_stop = CancellationToken::new();
        let router = Arc::new(router);
        if let Some(rtp) = rt.rtp_calls.take() {
            // `ari.media = "rtp"`: the controller's RTP calls, through the same router.
            let grace = Duration::from_millis(300);
            let serve =
                voicegate::call::media_rtp::serve(router.clone(), rtp, server_stop.clone(), grace);
            tokio::spawn(serve);
        }
        tokio::spawn(server.run(router, server_stop.clone()));
        if cfg.mode == AriMode::Stasis {
            fake.wait_ws().await;
        }
        Harness {
            fake,
            addr,
            stop,
            server_stop,
            summaries,
            rt,
            next,
            log,
            speech,
            unserved,
            route,
        }
    }

    fn ctl(&self) -> &Controller {
        &self.rt.controller
    }

    async fn next_summary(&mut self) -> CallSummary {
        tokio::time::timeout(Duration::from_secs(10), self.summaries.recv())
            .await
            .expect("a call summary in time")
            .expect("server running")
    }

    /// Waits until every bridge and externalMedia channel created is gone and the
    /// controller tracks no call.
    async fn wait_clean(&self) {
        let f = &self.fake;
        wait_until(Duration::from_secs(15), || {
            f.count(&f.counts.bridges_created) == f.count(&f.counts.bridges_destroyed)
                && f.count(&f.counts.media_created) == f.count(&f.counts.media_destroyed)
                && f.live_bridges() == 0
                && self.ctl().tracked_calls() == 0
                && self.log.started.load(Ordering::SeqCst) == self.log.ended.load(Ordering::SeqCst)
        })
        .await;
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server_stop.cancel();
        self.stop.cancel();
    }
}

async fn wait_bridged(h: &Harness, calls: usize) {
    wait_until(Duration::from_secs(10), || {
        h.fake
            .media_reports()
            .iter()
            .filter(|r| r.frames_sent > 0)
            .count()
            >= calls
    })
    .await;
}

#[tokio::test]
async fn stasis_call_with_echo_agent_dtmf_and_cleanup() {
    let mut h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |_| {}).await;
    let t0 = Instant::now();
    let caller = h.fake.new_caller("+15551234567", "Alice Example");
    wait_bridged(&h, 1).await;
    eprintln!(
        "measured: StasisStart → audio flowing in {:?} (20 ms polling)",
        t0.elapsed()
    );
    sleep(Duration::from_millis(2_500)).await;
    h.fake.press(&caller, '7');
    sleep(Duration::from_millis(400)).await;
    // If the bridge also passes the key on as 0x03, the agent still hears it once.
    h.fake.press_with_passthrough(&caller, '8');
    sleep(Duration::from_millis(400)).await;
    h.fake.caller_hangs_up(&caller);
    h.wait_clean().await;

    let summary = h.next_summary().await;
    assert_eq!(summary.outcome, Outcome::CallerHungUp, "{summary:?}");
    assert_eq!(summary.rate_hz, 16_000);
    assert_eq!(summary.dtmf, "78");
    // The agent knew who called, at the wideband rate externalMedia asked for.
    let info = h.log.infos.lock().unwrap()[0].clone();
    assert_eq!(info.call_id, summary.call_id);
    assert_eq!(info.caller_number.as_deref(), Some("+15551234567"));
    assert_eq!(info.caller_name.as_deref(), Some("Alice Example"));
    assert_eq!(info.rate_hz, 16_000);
    assert_eq!(
        *h.log.dtmf.lock().unwrap(),
        vec![(summary.call_id, '7'), (summary.call_id, '8')]
    );

    // The caller heard themself: what the media side received is its own speech.
    // The fake's media side marks the close once its reader has seen it, a moment after
    // the summary on a loaded machine.
    wait_until(Duration::from_secs(5), || h.fake.media_reports()[0].closed).await;
    let report = &h.fake.media_reports()[0];
    assert_eq!(report.call_id, Some(summary.call_id));
    assert!(report.closed, "externalMedia socket closed after clean-up");
    assert!(report.frames_received > 100, "{}", report.frames_received);
    // Over the first second of speech, 100 ms window by window (16 samples per ms): each
    // window found within 60 ms of where the previous one was, the first 0–100 ms late, so
    // a tick skipped on a loaded machine shifts the echo without failing the test.
    let n = h.speech.len().min(16 * 1_000);
    let similarity = speech_similarity(&report.received, &h.speech[..n], 16_000, 16 * 40, 16 * 60);
    assert!(similarity.passes(0.9), "echo: {}", similarity.describe(0.9));

    let f = &h.fake;
    assert_eq!(f.count(&f.counts.bridges_created), 1);
    assert_eq!(f.count(&f.counts.media_created), 1);
    assert!(
        f.continued().is_empty(),
        "a caller who hangs up is not transferred"
    );
    let stats = h.ctl().stats();
    assert_eq!(
        (stats.calls, stats.bridges_created, stats.media_created),
        (1, 1, 1)
    );
    assert_eq!((stats.bridges_destroyed, stats.media_destroyed), (1, 1));
}

/// `ari.media = "rtp"` against the fake's chan_rtp side (issue 16): externalMedia is asked
/// for `encapsulation=rtp&transport=udp&format=slin16` at one of voicegate's RTP ports, the
/// caller hears their own speech back over RTP, the summary says `rtp`, and clean-up leaves
/// no channel, bridge or session.
#[tokio::test]
async fn stasis_call_over_rtp_echoes_and_cleans_up() {
    let lo = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port().clamp(1024, 65_000)
    };
    let mut h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |c| {
        c.media = voicegate::ari::config::AriMedia::Rtp;
        c.rtp_ports = format!("{lo}-{}", lo + 3);
    })
    .await;
    let caller = h.fake.new_caller("+15551234567", "Alice Example");
    wait_bridged(&h, 1).await;
    sleep(Duration::from_millis(2_500)).await;
    h.fake.caller_hangs_up(&caller);
    h.wait_clean().await;
    let summary = h.next_summary().await;
    assert_eq!(summary.outcome, Outcome::CallerHungUp, "{summary:?}");
    assert_eq!((summary.rate_hz, summary.transport), (16_000, "rtp"));
    let report = &h.fake.media_reports()[0];
    assert_eq!(report.call_id, Some(summary.call_id));
    assert!(report.frames_received > 100, "{}", report.frames_received);
    let n = h.speech.len().min(16 * 1_000);
    let similarity = speech_similarity(&report.received, &h.speech[..n], 16_000, 16 * 80, 16 * 80);
    assert!(
        similarity.passes(0.9),
        "echo over RTP: {}",
        similarity.describe(0.9)
    );
    // Paced at 20 ms: no two packets together, no frame skipped in the median.
    let mut gaps = report.gaps_ms.clone();
    gaps.sort_by(f64::total_cmp);
    let p50 = gaps[gaps.len() / 2];
    assert!((18.0..=22.0).contains(&p50), "median gap {p50} ms");
    assert_eq!(h.ctl().stats().rtp_calls, 1);
}

/// The dialplan chooses a Stasis call's profile with the channel variable
/// `VOICEGATE_PROFILE` or the `Stasis(voicegate,<profile>)` argument; neither: the default.
#[tokio::test]
async fn stasis_profile_comes_from_the_channel_variable_or_the_stasis_argument() {
    let mut h = Harness::start(Behaviour::Echo, SlinRate::Hz8000, |c| {
        c.profile_variable = Some(stasis::PROFILE_VARIABLE.into());
    })
    .await;
    type Caller<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let callers: [Caller; 3] = [
        (&[], &[("VOICEGATE_PROFILE", "sales")], "sales"),
        (&["sales"], &[], "sales"),
        (&[], &[], "default"),
    ];
    for (i, (args, vars, expected)) in callers.into_iter().enumerate() {
        let number = format!("+1555000{i}");
        let caller = h
            .fake
            .new_caller_with("voicegate", &number, "Ann", args, vars);
        wait_bridged(&h, i + 1).await;
        h.fake.caller_hangs_up(&caller);
        let summary = h.next_summary().await;
        assert_eq!(summary.profile.as_deref(), Some(expected), "caller {i}");
        let info = h.log.infos.lock().unwrap()[i].clone();
        assert_eq!(info.call_id, summary.call_id);
        assert_eq!(info.variables["profile"], expected, "caller {i}");
        assert_eq!(info.variables["caller_number"], number);
    }
    h.wait_clean().await;
}

#[tokio::test]
async fn agent_failure_transfers_to_the_operator_context() {
    let mut h = Harness::start(
        Behaviour::Fail(Duration::from_millis(800)),
        SlinRate::Hz16000,
        |_| {},
    )
    .await;
    let caller = h.fake.new_caller("+15550001111", "Bob");
    let summary = h.next_summary().await;
    let ended = Instant::now();
    assert!(
        matches!(summary.outcome, Outcome::Fallback(_)),
        "{:?}",
        summary.outcome
    );
    wait_until(Duration::from_secs(5), || !h.fake.continued().is_empty()).await;
    eprintln!(
        "measured: agent failure → ARI continue in {:?} (20 ms polling)",
        ended.elapsed()
    );
    let c = &h.fake.continued()[0];
    assert_eq!(c.channel, caller);
    assert_eq!(
        (
            c.context.as_str(),
            c.extension.as_str(),
            c.priority.as_str()
        ),
        ("voicegate-transfer", "s", "1")
    );
    h.wait_clean().await;
    assert!(
        h.fake.channel_exists(&caller),
        "the caller is in the queue, not hung up"
    );
    assert_eq!(h.ctl().stats().transfers, 1);
    assert_eq!(h.next.answer(&summary.call_id.to_string()), "operator");
}

/// Issue 5's promise on the ARI path: the provider is unreachable, and the caller is moved
/// to the operator context within about two seconds of their audio starting.
#[tokio::test]
async fn unreachable_provider_hands_the_stasis_caller_to_operators_within_2s() {
    let mut h = Harness::start(Behaviour::Unreachable, SlinRate::Hz16000, |_| {}).await;
    let started = Instant::now();
    let caller = h.fake.new_caller("+15550003333", "Dave");
    wait_until(Duration::from_secs(5), || !h.fake.continued().is_empty()).await;
    let took = started.elapsed();
    eprintln!("measured: StasisStart → ARI continue with the provider unreachable: {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(h.fake.continued()[0].channel, caller);
    assert_eq!(h.fake.continued()[0].context, "voicegate-transfer");
    let summary = h.next_summary().await;
    assert!(
        matches!(summary.outcome, Outcome::Fallback(_)),
        "{:?}",
        summary.outcome
    );
    h.wait_clean().await;
}

/// The real Asterisk's race (issue 12): the externalMedia channel enters the application
/// after the REST reply. Every call of a run waits for that `StasisStart` before bridging,
/// so none is sent to the operators by mistake; the fake answers `addChannel` with 422 for
/// a channel not yet in the application, as Asterisk does.
#[tokio::test]
async fn stasis_setup_waits_for_the_media_channel_to_join() {
    let mut h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |_| {}).await;
    for i in 0..10 {
        let caller = h.fake.new_caller(&format!("+1555000{i:04}"), "Late");
        wait_bridged(&h, i + 1).await;
        h.fake.caller_hangs_up(&caller);
        let summary = h.next_summary().await;
        assert_eq!(
            summary.outcome,
            Outcome::CallerHungUp,
            "call {i}: {summary:?}"
        );
        assert!(summary.fallback.is_none(), "call {i}: {summary:?}");
    }
    h.wait_clean().await;
    assert!(h.fake.continued().is_empty(), "{:?}", h.fake.continued());
    assert!(h.unserved.lock().unwrap().is_empty());
    assert_eq!(h.ctl().stats().bridges_created, 10);
}

/// An externalMedia channel that never enters the application: after
/// `media_join_timeout_ms` the caller goes to the operators, and the call is counted as a
/// fallback with the reason (not as a completed call).
#[tokio::test]
async fn media_channel_that_never_joins_sends_the_caller_to_the_operators_with_a_reason() {
    let mut h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |c| {
        c.media_join_timeout_ms = 400;
    })
    .await;
    h.fake.media_join(fake_ari::MediaJoin::Never);
    let caller = h.fake.new_caller("+15550004444", "Eve");
    let started = Instant::now();
    wait_until(Duration::from_secs(5), || !h.fake.continued().is_empty()).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert_eq!(h.fake.continued()[0].channel, caller);
    assert_eq!(h.fake.continued()[0].context, "voicegate-transfer");
    // The media connected (Asterisk dials out at once), so a session ran: its summary says
    // why the caller went to the operators.
    let summary = h.next_summary().await;
    match (&summary.outcome, &summary.fallback) {
        (Outcome::Fallback(detail), Some(FallbackReason::SetupFailed(why))) => {
            assert!(detail.contains("stasis setup failed"), "{detail}");
            assert!(why.contains("no StasisStart within 400 ms"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(summary.fallback.as_ref().unwrap().label(), "setup_failed");
    h.wait_clean().await;
    assert!(
        h.unserved.lock().unwrap().is_empty(),
        "counted once, by its session"
    );
    assert_eq!(h.next.answer(&summary.call_id.to_string()), "operator");
}

/// With the breaker open (or maintenance on), a Stasis caller goes to the operators at once:
/// no answer, no bridge, no externalMedia channel; the controller reports the caller so it
/// is recorded and counted with the reason.
#[tokio::test]
async fn routed_to_operators_at_once_creates_nothing() {
    let h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |_| {}).await;
    *h.route.lock().unwrap() = Some(FallbackReason::BreakerOpen);
    let caller = h.fake.new_caller("+15550005555", "Frank");
    wait_until(Duration::from_secs(5), || !h.fake.continued().is_empty()).await;
    assert_eq!(h.fake.continued()[0].channel, caller);
    h.wait_clean().await;
    let f = &h.fake;
    assert_eq!(
        (
            f.count(&f.counts.bridges_created),
            f.count(&f.counts.media_created)
        ),
        (0, 0)
    );
    let unserved = h.unserved.lock().unwrap().clone();
    assert_eq!(unserved.len(), 1, "{unserved:?}");
    assert_eq!(unserved[0].reason, FallbackReason::BreakerOpen);
    assert_eq!(unserved[0].caller_number.as_deref(), Some("+15550005555"));
    assert_eq!(h.log.started.load(Ordering::SeqCst), 0, "no agent session");
}

#[tokio::test]
async fn transfer_request_is_retried_once_with_the_configured_target() {
    let mut h = Harness::start(
        Behaviour::Transfer(Duration::from_millis(800)),
        SlinRate::Hz8000,
        |c| {
            c.transfer_context = "support-queue".into();
            c.transfer_extension = "100".into();
            c.transfer_priority = 2;
        },
    )
    .await;
    h.fake.fail_continue(1);
    let caller = h.fake.new_caller("+15550002222", "Carol");
    let summary = h.next_summary().await;
    assert_eq!(summary.rate_hz, 8_000);
    // The tool ended the session for the operators; the controller then moved the caller.
    assert_eq!(summary.outcome, Outcome::Operator("dialplan".into()));
    assert_eq!(summary.caller_number.as_deref(), Some("+15550002222"));
    h.wait_clean().await;
    let continued = h.fake.continued();
    assert_eq!(continued.len(), 1, "{continued:?}");
    assert_eq!(continued[0].channel, caller);
    assert_eq!(
        (
            continued[0].context.as_str(),
            continued[0].extension.as_str(),
            continued[0].priority.as_str()
        ),
        ("support-queue", "100", "2")
    );
    let stats = h.ctl().stats();
    assert_eq!((stats.transfers, stats.transfer_failures), (1, 0));
    assert!(h.fake.channel_exists(&caller));
}

#[tokio::test]
async fn transfer_failing_twice_hangs_up_instead_of_silence() {
    let mut h = Harness::start(
        Behaviour::Fail(Duration::from_millis(500)),
        SlinRate::Hz16000,
        |_| {},
    )
    .await;
    h.fake.fail_continue(2);
    let caller = h.fake.new_caller("+15550003333", "Dan");
    let summary = h.next_summary().await;
    assert!(
        matches!(&summary.outcome, Outcome::Fallback(r) if r.contains("provider dropped the session")),
        "{:?}",
        summary.outcome
    );
    h.wait_clean().await;
    wait_until(Duration::from_secs(5), || !h.fake.channel_exists(&caller)).await;
    let stats = h.ctl().stats();
    assert_eq!(
        (stats.transfers, stats.transfer_failures, stats.hangups),
        (0, 1, 1)
    );
}

#[tokio::test]
async fn events_socket_dropped_and_restored_mid_call() {
    let mut h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |_| {}).await;
    let caller = h.fake.new_caller("+15550004444", "Erin");
    wait_bridged(&h, 1).await;
    sleep(Duration::from_millis(500)).await;
    let mut state = h.rt.link.state.clone();
    assert_eq!(*state.borrow(), LinkState::Up);

    // Asterisk goes away for 2 s: the socket closes cleanly, upgrades are refused.
    let attempts_before = h.rt.link.attempts();
    h.fake.refuse_ws(true);
    h.fake.drop_ws();
    state.wait_for(|s| *s != LinkState::Up).await.unwrap();
    let frames_at_drop = h.fake.media_reports()[0].frames_received;
    sleep(Duration::from_secs(2)).await;
    let refused = h.rt.link.attempts() - attempts_before;
    // Backoff 100, 200, 400, 800, 800 ms: about 4 attempts in 2 s; a busy loop makes hundreds.
    eprintln!("measured: {refused} reconnect attempts in 2 s while refused");
    assert!((2..=8).contains(&refused), "{refused} attempts in 2 s");

    // A server that accepts and closes at once (cleanly) must not cause a busy loop either.
    h.fake.refuse_ws(false);
    h.fake.close_ws_at_once(true);
    let before = h.rt.link.attempts();
    sleep(Duration::from_secs(2)).await;
    let quick = h.rt.link.attempts() - before;
    eprintln!("measured: {quick} reconnect attempts in 2 s against a closing server");
    assert!(
        (1..=6).contains(&quick),
        "{quick} attempts in 2 s against a closing server"
    );

    h.fake.close_ws_at_once(false);
    wait_link(&mut state, LinkState::Up, 5, "link restored").await;
    h.fake.wait_ws().await;
    // The call went on throughout.
    let frames_now = h.fake.media_reports()[0].frames_received;
    assert!(
        frames_now >= frames_at_drop + 150,
        "{frames_at_drop} → {frames_now} frames"
    );
    // Events flow again.
    h.fake.press(&caller, '3');
    wait_until(Duration::from_secs(3), || {
        !h.log.dtmf.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(h.log.dtmf.lock().unwrap()[0].1, '3');
    h.fake.caller_hangs_up(&caller);
    h.wait_clean().await;
    assert_eq!(h.next_summary().await.outcome, Outcome::CallerHungUp);
}

#[tokio::test]
async fn caller_gone_while_events_link_was_down_is_cleaned_up_on_reconnect() {
    let h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |_| {}).await;
    let caller = h.fake.new_caller("+15550005555", "Finn");
    wait_bridged(&h, 1).await;
    let mut state = h.rt.link.state.clone();
    h.fake.refuse_ws(true);
    h.fake.drop_ws();
    state.wait_for(|s| *s != LinkState::Up).await.unwrap();
    // The caller hangs up while voicegate cannot hear about it.
    h.fake.caller_hangs_up(&caller);
    sleep(Duration::from_millis(300)).await;
    h.fake.refuse_ws(false);
    h.wait_clean().await;
}

#[tokio::test]
async fn orphans_of_a_previous_run_are_handed_to_the_operators() {
    // Asterisk still holds what a crashed voicegate left; a new voicegate connects.
    let speech = resample_recording(&fixture("hello-world.wav"), 16_000)
        .unwrap()
        .samples;
    let fake = FakeAri::start(speech, SlinRate::Hz16000).await;
    let (caller, media, _bridge) = fake.orphans_from_previous_run();
    let h = Harness::start_on(fake, Behaviour::Echo, SlinRate::Hz16000, |_| {}).await;
    wait_until(Duration::from_secs(10), || {
        !h.fake.continued().is_empty()
            && !h.fake.channel_exists(&media)
            && h.fake.live_bridges() == 0
    })
    .await;
    let c = &h.fake.continued()[0];
    assert_eq!(
        (c.channel.as_str(), c.context.as_str()),
        (caller.as_str(), "voicegate-transfer")
    );
    let f = &h.fake;
    assert_eq!(f.count(&f.counts.bridges_destroyed), 1);
    assert_eq!(f.count(&f.counts.media_destroyed), 1);
    // A call that starts meanwhile is not mistaken for an orphan.
    let live = h.fake.new_caller("+15550006666", "Live");
    wait_bridged(&h, 1).await;
    sleep(Duration::from_millis(2_500)).await;
    assert_eq!(h.fake.continued().len(), 1, "the live call was left alone");
    h.fake.caller_hangs_up(&live);
    h.wait_clean().await;
}

#[tokio::test]
async fn shutdown_hands_live_stasis_callers_to_the_operators() {
    let mut h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |_| {}).await;
    let caller = h.fake.new_caller("+15550007777", "Hana");
    wait_bridged(&h, 1).await;
    sleep(Duration::from_millis(300)).await;
    // SIGTERM: the listener stops, the grace period (300 ms here) runs out.
    let stopped = Instant::now();
    h.server_stop.cancel();
    assert_eq!(h.next_summary().await.outcome, Outcome::Shutdown);
    // Not before the grace period ran out (an immediate hangup fails), nor long after.
    let ended = stopped.elapsed();
    eprintln!("measured: shutdown → session ended after {ended:?} (grace 300 ms)");
    assert!(
        ended >= Duration::from_millis(300) && ended < Duration::from_millis(1_300),
        "session ended {ended:?} after the shutdown, grace 300 ms"
    );
    assert!(
        h.ctl().settle(Duration::from_secs(8)).await,
        "transfers settled"
    );
    let c = h.fake.continued();
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].channel.as_str(), c[0].context.as_str()),
        (caller.as_str(), "voicegate-transfer")
    );
    h.wait_clean().await;
}

/// Asterisk's 422s are kept in Asterisk's own words: "Channel not in this bridge" for a
/// `removeChannel` of a channel that is not there (`res/ari/resource_bridges.c`), not the
/// "not in Stasis" of a 409.
#[tokio::test]
async fn a_422_keeps_asterisks_message() {
    let h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |_| {}).await;
    let c = h.ctl().client();
    let bridge = c.create_bridge("voicegate-test").await.expect("bridge");
    let caller = h.fake.new_caller("+15550006666", "Grace");
    let err = c.remove_channel(&bridge.id, &caller).await.unwrap_err();
    match &err {
        AriError::Unprocessable { message, .. } => {
            assert_eq!(message, "Channel not in this bridge")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().ends_with("Channel not in this bridge"),
        "{err}"
    );
    h.fake.caller_hangs_up(&caller);
}

#[tokio::test]
async fn stasis_only_listener_rejects_unknown_call_ids() {
    let h = Harness::start(Behaviour::Echo, SlinRate::Hz8000, |c| c.stasis_only = true).await;
    let plan = CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate: SlinRate::Hz8000,
        speech: fixture("hello-world.wav"),
        speech_offset: Duration::ZERO,
        dtmf: vec![],
        duration: Duration::from_secs(2),
    };
    let report = place_call(h.addr, &plan).await.expect("call");
    assert!(report.closed_by_peer);
    assert_eq!(report.frames_received, 0, "a stranger gets no audio");
    assert!(
        report.duration_ms < 1_000.0,
        "closed at once: {} ms",
        report.duration_ms
    );
    assert_eq!(
        h.log.started.load(Ordering::SeqCst),
        0,
        "no agent session for a stranger"
    );
    assert_eq!(h.ctl().stats().rejected, 1);
}

#[tokio::test]
async fn audiosocket_calls_get_caller_info_and_dtmf_but_cannot_be_controlled() {
    let h = Harness::start(Behaviour::Echo, SlinRate::Hz8000, |c| {
        c.mode = AriMode::Lookup
    })
    .await;
    let port = h.addr.port();
    for (rate, app, data, number) in [
        (
            SlinRate::Hz8000,
            "AudioSocket",
            "{id},127.0.0.1:{port}",
            "+4930111",
        ),
        (
            SlinRate::Hz16000,
            "Dial",
            "AudioSocket/127.0.0.1:{port}/{id}/c(slin16),,g",
            "+4930222",
        ),
    ] {
        let id = uuid::Uuid::new_v4();
        let data = data
            .replace("{id}", &id.to_string())
            .replace("{port}", &port.to_string());
        let channel = h.fake.new_audiosocket_caller(number, "Gerd", app, &data);
        let plan = CallPlan {
            call_id: id,
            rate,
            speech: fixture("hello-world.wav"),
            speech_offset: Duration::from_millis(100),
            dtmf: vec![('4', Duration::from_millis(800))],
            duration: Duration::from_millis(1_500),
        };
        let report = place_call(h.addr, &plan).await.expect("call");
        assert!(report.audible_frames_received > 10);
        wait_until(Duration::from_secs(3), || {
            h.log
                .dtmf
                .lock()
                .unwrap()
                .iter()
                .any(|(c, d)| *c == id && *d == '4')
        })
        .await;
        let info = h
            .log
            .infos
            .lock()
            .unwrap()
            .iter()
            .find(|i| i.call_id == id)
            .cloned()
            .unwrap();
        assert_eq!(info.caller_number.as_deref(), Some(number));
        assert_eq!(info.caller_name.as_deref(), Some("Gerd"));
        // ARI cannot move a channel that is not in Stasis: 409, like a real Asterisk.
        let err = h
            .ctl()
            .client()
            .continue_in_dialplan(&channel, "voicegate-transfer", "s", 1)
            .await
            .unwrap_err();
        assert!(matches!(err, AriError::NotInStasis { .. }), "{err}");
        assert_eq!(
            h.ctl()
                .client()
                .variable(&channel, "CALLERID(num)")
                .await
                .unwrap(),
            number
        );
        h.ctl()
            .client()
            .hangup(&channel)
            .await
            .expect("DELETE works outside Stasis");
    }
    assert_eq!(h.fake.status_409_count(), 2);
    let lists = h.fake.count(&h.fake.counts.channels_list_requests);
    assert!(lists <= 2, "{lists} GET /channels for 2 calls");
    assert_eq!(h.ctl().stats().lookups_fetched, lists);
}

#[tokio::test]
async fn cleanup_counts_after_50_calls() {
    let mut h = Harness::start(Behaviour::Mixed, SlinRate::Hz16000, |_| {}).await;
    let mut callers = Vec::new();
    for batch in 0..5 {
        let ids: Vec<String> = (0..10)
            .map(|i| h.fake.new_caller(&format!("+1555000{batch}{i:02}"), "Load"))
            .collect();
        wait_bridged(&h, (batch + 1) * 10).await;
        sleep(Duration::from_millis(1_500)).await;
        // Echo callers hang up themselves; the others were transferred or hung up by then.
        for id in &ids {
            h.fake.caller_hangs_up(id);
        }
        callers.extend(ids);
    }
    h.wait_clean().await;
    let f = &h.fake;
    assert_eq!(f.count(&f.counts.bridges_created), 50);
    assert_eq!(f.count(&f.counts.bridges_destroyed), 50);
    assert_eq!(f.count(&f.counts.media_created), 50);
    assert_eq!(f.count(&f.counts.media_destroyed), 50);
    assert_eq!(h.log.started.load(Ordering::SeqCst), 50);
    assert_eq!(
        h.log.ended.load(Ordering::SeqCst),
        50,
        "every provider session ended"
    );
    let mut outcomes = std::collections::HashMap::new();
    for _ in 0..50 {
        let s = h.next_summary().await;
        let key = match s.outcome {
            Outcome::Fallback(_) => "fallback",
            Outcome::AgentEnded(_) => "ended",
            Outcome::Operator(_) => "operator",
            Outcome::CallerHungUp => "hung up",
            _ => "other",
        };
        *outcomes.entry(key).or_insert(0) += 1;
    }
    // Agents 0, 4, 8, … echo; 1, 5, … fail (13); 2, 6, … end (12); 3, 7, … transfer (12).
    assert_eq!(outcomes.get("fallback"), Some(&13), "{outcomes:?}");
    assert_eq!(outcomes.get("ended"), Some(&12), "{outcomes:?}");
    assert_eq!(outcomes.get("operator"), Some(&12), "{outcomes:?}");
    assert_eq!(outcomes.get("hung up"), Some(&13), "{outcomes:?}");
    // Failed agents and transfer requests (13 + 12) went to the operators.
    assert_eq!(h.fake.continued().len(), 25);
    let stats = h.ctl().stats();
    assert_eq!(stats.transfers, 25);
    assert_eq!(stats.hangups, 12);
    assert_eq!(stats.transfer_failures, 0);
    assert_eq!(h.ctl().tracked_calls(), 0);
}

/// An AudioSocket server without ARI (modes 1 and 2), with the `/next` store as directory,
/// and a minimal HTTP listener serving `NextStore::route` as the health listener will.
async fn plain_server(
    behaviour: Behaviour,
) -> (
    SocketAddr,
    SocketAddr,
    Arc<NextStore>,
    mpsc::UnboundedReceiver<CallSummary>,
    CancellationToken,
) {
    let agent = Arc::new(TestAgent {
        behaviour,
        log: Arc::new(AgentLog::default()),
    });
    let next = Arc::new(NextStore::new());
    let (tx, rx) = mpsc::unbounded_channel();
    let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut router = Router::fixed(Generation::new(
        agent,
        ServerParams::from_config(&Default::default()),
    ));
    router.summaries = Some(tx.into());
    router.directory = Some(Arc::new(next.clone()));
    let addr = server.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(Arc::new(router), stop.clone()));
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let store = next.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = http.accept().await {
            let mut buf = vec![0u8; 2048];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
            let (status, body) = match store.route(&path) {
                Some(body) => ("200 OK", body),
                None => ("404 Not Found", String::new()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    (addr, http_addr, next, rx, stop)
}

async fn get_next(http: SocketAddr, id: &str) -> String {
    // What the dialplan's ${CURL(http://127.0.0.1:9100/v1/calls/${AS_UUID}/next)} fetches.
    voicegate::tls::http_client_builder()
        .build()
        .unwrap()
        .get(format!("http://{http}/v1/calls/{id}/next"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn next_endpoint_answers_for_modes_1_and_2() {
    for (behaviour, rate, want) in [
        // Mode 1, AudioSocket() app at 8 kHz: the agent said goodbye → hang up.
        (
            Behaviour::End(Duration::from_millis(400)),
            SlinRate::Hz8000,
            "hangup",
        ),
        // Mode 2, channel driver with c(slin16): the agent failed → operators.
        (
            Behaviour::Fail(Duration::from_millis(400)),
            SlinRate::Hz16000,
            "operator",
        ),
    ] {
        let (addr, http, next, mut summaries, stop) = plain_server(behaviour).await;
        let plan = CallPlan {
            call_id: uuid::Uuid::new_v4(),
            rate,
            speech: fixture("hello-world.wav"),
            speech_offset: Duration::ZERO,
            dtmf: vec![],
            duration: Duration::from_secs(4),
        };
        let report = place_call(addr, &plan).await.expect("call");
        assert!(
            report.hangup_received,
            "voicegate ended the session with 0x00"
        );
        let summary = summaries.recv().await.unwrap();
        assert_eq!(summary.call_id, plan.call_id);
        assert_eq!(get_next(http, &plan.call_id.to_string()).await, want);
        // Unknown and malformed ids: operators, as an empty answer would.
        assert_eq!(
            get_next(http, &uuid::Uuid::new_v4().to_string()).await,
            "operator"
        );
        assert_eq!(get_next(http, "not-a-uuid").await, "operator");
        // A queue the agent chose wins over the default.
        next.set(
            plan.call_id,
            voicegate::call::next::Next::target("sales").unwrap(),
        );
        assert_eq!(get_next(http, &plan.call_id.to_string()).await, "sales");
        stop.cancel();
    }
}

#[tokio::test]
async fn wrong_credentials_are_reported_and_retried_with_backoff() {
    let fake = FakeAri::start(Vec::new(), SlinRate::Hz16000).await;
    let client = voicegate::ari::AriClient::new(
        &fake.url(),
        fake_ari::USER,
        voicegate::secret::Secret::new("wrong"),
        Duration::from_secs(1),
    )
    .unwrap();
    let err = client.channels().await.unwrap_err();
    assert!(matches!(err, AriError::Status { status: 401, .. }), "{err}");
    assert!(
        !err.to_string().contains("wrong"),
        "no secret in errors: {err}"
    );
    let cfg = AriConfig {
        url: fake.url(),
        password: SecretSource::Inline("wrong".into()),
        reconnect_initial_ms: 100,
        reconnect_max_ms: 400,
        ..AriConfig::default()
    };
    let stop = CancellationToken::new();
    let rt = stasis::start(
        &cfg,
        "127.0.0.1:9092".parse().unwrap(),
        Arc::new(NextStore::new()),
        Hooks::default(),
        stop.clone(),
    )
    .unwrap();
    sleep(Duration::from_secs(2)).await;
    let attempts = rt.link.attempts();
    assert!((2..=8).contains(&attempts), "{attempts} attempts in 2 s");
    assert_ne!(*rt.link.state.borrow(), LinkState::Up);
    stop.cancel();
}

/// Issue 8, "ARI hanging": Asterisk's HTTP server accepts connections and reads requests but
/// never answers, while the events WebSocket stays up and delivers. What voicegate does,
/// precisely: a new Stasis caller's `answer` times out after `request_timeout_ms`, setup
/// fails, the transfer to the operators (`continue`, twice) times out, the hangup times out,
/// and the call is given up (`transfer_failures` 1, `given_up` 1, nothing tracked): four
/// requests. The caller is remembered, not forgotten: reconcile passes retry it, the first
/// `RETRY_INITIAL` (2 s) after the give-up, then with a doubling wait, each costing a single
/// `GET /channels` while ARI stays hung. Once ARI answers, the next pass `continue`s the
/// caller to the operators, with the events link untouched (no reconnect needed). Calls
/// already in progress never wait on ARI.
#[tokio::test]
async fn ari_rest_hanging_gives_up_then_retries_until_the_caller_reaches_the_operators() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let mut h = Harness::start(Behaviour::Echo, SlinRate::Hz8000, |c| {
        c.request_timeout_ms = TIMEOUT.as_millis() as u64;
    })
    .await;
    // A healthy AudioSocket echo call on the same server, admitted while ARI still answers.
    let plan = CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate: SlinRate::Hz8000,
        speech: fixture("hello-world.wav"),
        speech_offset: Duration::ZERO,
        dtmf: vec![],
        duration: Duration::from_secs(12),
    };
    let addr = h.addr;
    let healthy = tokio::spawn(async move { place_call(addr, &plan).await.expect("healthy call") });
    wait_until(Duration::from_secs(5), || {
        h.log.started.load(Ordering::SeqCst) == 1
    })
    .await;
    let link_attempts = h.rt.link.attempts();
    let ws_attempts = h.fake.count(&h.fake.counts.ws_attempts);

    h.fake.hang_rest(true);
    let t0 = Instant::now();
    let caller = h.fake.new_caller("+15550006666", "Gina");
    wait_until(Duration::from_secs(10), || {
        h.ctl().stats().transfer_failures == 1
            && h.ctl().tracked_calls() == 0
            && h.ctl().given_up_callers() == 1
    })
    .await;
    let gave_up = t0.elapsed();
    let gave_up_at = Instant::now();
    eprintln!("measured: hung ARI, StasisStart → call given up: {gave_up:?} (timeout {TIMEOUT:?})");
    let path = format!("/ari/channels/{caller}");
    let mut expected = vec![
        format!("POST {path}/answer"),
        format!("POST {path}/continue"),
        format!("POST {path}/continue"),
        format!("DELETE {path}"),
    ];
    assert_eq!(h.fake.hung_requests(), expected);
    assert!(
        gave_up >= TIMEOUT * 4 && gave_up < TIMEOUT * 4 + Duration::from_secs(2),
        "{gave_up:?}"
    );
    assert_eq!(h.ctl().stats().given_up, 1);

    // No busy loop: the first retry waits RETRY_INITIAL, so nothing is asked for 3/4 of it.
    sleep(stasis::RETRY_INITIAL * 3 / 4).await;
    assert_eq!(h.fake.hung_requests(), expected);
    // Then one pass: a single GET /channels, which hangs too.
    wait_until(Duration::from_secs(5), || h.fake.hung_requests().len() > 4).await;
    let first_retry = gave_up_at.elapsed();
    eprintln!("measured: hung ARI, give-up → first retry pass: {first_retry:?}");
    // Not before RETRY_INITIAL (the pass is scheduled that long after the give-up; the
    // give-up was seen by a 20 ms poll, a loaded machine's poll later), and not much later.
    assert!(
        first_retry >= stasis::RETRY_INITIAL - Duration::from_millis(250)
            && first_retry < stasis::RETRY_INITIAL + Duration::from_millis(1_500),
        "first retry {first_retry:?} after the give-up, RETRY_INITIAL {:?}",
        stasis::RETRY_INITIAL
    );
    expected.push("GET /ari/channels".into());
    assert_eq!(h.fake.hung_requests(), expected);
    // The next pass waits twice as long (after this one timed out): nothing for RETRY_INITIAL.
    sleep(stasis::RETRY_INITIAL).await;
    assert_eq!(h.fake.hung_requests(), expected);
    let stats = h.ctl().stats();
    assert_eq!((stats.transfers, stats.hangups), (0, 0));
    assert!(h.fake.channel_exists(&caller) && h.fake.continued().is_empty());
    assert_eq!(h.ctl().given_up_callers(), 1);

    // ARI answers again; the events link is left as it is.
    h.fake.hang_rest(false);
    let recovered = Instant::now();
    wait_until(Duration::from_secs(10), || !h.fake.continued().is_empty()).await;
    eprintln!(
        "measured: hung ARI, REST back → caller continued to the operators in {:?} ({:?} after StasisStart)",
        recovered.elapsed(),
        t0.elapsed()
    );
    let continued = h.fake.continued();
    assert_eq!(continued.len(), 1, "{continued:?}");
    assert_eq!(
        (
            continued[0].channel.as_str(),
            continued[0].context.as_str(),
            continued[0].extension.as_str(),
            continued[0].priority.as_str()
        ),
        (caller.as_str(), "voicegate-transfer", "s", "1")
    );
    wait_until(Duration::from_secs(3), || h.ctl().given_up_callers() == 0).await;
    let stats = h.ctl().stats();
    assert_eq!((stats.transfers, stats.hangups, stats.given_up), (1, 0, 1));
    assert!(h.fake.channel_exists(&caller), "in the queue, not hung up");
    assert_eq!(
        h.rt.link.attempts(),
        link_attempts,
        "the events link never reconnected"
    );
    assert_eq!(h.fake.count(&h.fake.counts.ws_attempts), ws_attempts);
    assert_eq!(*h.rt.link.state.borrow(), LinkState::Up);
    // Once handed over, no more retries.
    let after = h.fake.hung_requests().len();
    sleep(Duration::from_secs(1)).await;
    assert_eq!(h.fake.hung_requests().len(), after);
    assert_eq!(h.fake.continued().len(), 1);

    let report = healthy.await.expect("healthy call task");
    let summary = h.next_summary().await;
    assert_eq!(summary.call_id, report.call_id);
    eprintln!(
        "measured: healthy call during hung ARI: caller sent {}, voicegate read {}; voicegate sent {}, caller got {}; max gap {:.1} ms",
        report.frames_sent,
        summary.frames_in,
        summary.frames_out,
        report.frames_received,
        report.gap_max_ms
    );
    assert_no_frame_lost(&report, &summary);
}

/// ARI hangs while a Stasis call is live and its agent ends the call: the `DELETE` of the
/// caller times out twice, and so do the clean-up requests (bridge, externalMedia channel).
/// The caller is given up on for a hangup; once ARI answers, a reconcile pass hangs the
/// caller up (no transfer: the agent had said goodbye) and its orphan step removes the
/// leftover bridge and externalMedia channel, so nothing is left behind.
#[tokio::test]
async fn ari_rest_hanging_at_the_end_of_a_call_leaves_nothing_behind_once_it_answers() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let mut h = Harness::start(
        Behaviour::End(Duration::from_millis(1_500)),
        SlinRate::Hz16000,
        |c| c.request_timeout_ms = TIMEOUT.as_millis() as u64,
    )
    .await;
    let caller = h.fake.new_caller("+15550005656", "Mia");
    wait_bridged(&h, 1).await;
    h.fake.hang_rest(true);
    let summary = h.next_summary().await;
    assert!(
        matches!(summary.outcome, Outcome::AgentEnded(_)),
        "{:?}",
        summary.outcome
    );
    wait_until(Duration::from_secs(10), || {
        h.ctl().given_up_callers() == 1 && h.ctl().tracked_calls() == 0
    })
    .await;
    let hung = h.fake.hung_requests();
    assert_eq!(
        hung.iter()
            .filter(|r| **r == format!("DELETE /ari/channels/{caller}"))
            .count(),
        2,
        "{hung:?}"
    );
    assert!(h.fake.channel_exists(&caller) && h.fake.live_bridges() == 1);

    h.fake.hang_rest(false);
    let recovered = Instant::now();
    let f = &h.fake;
    wait_until(Duration::from_secs(15), || {
        !f.channel_exists(&caller)
            && f.live_bridges() == 0
            && f.count(&f.counts.media_destroyed) == 1
    })
    .await;
    eprintln!(
        "measured: hung ARI at the end of a call, REST back → caller hung up and leftovers removed in {:?}",
        recovered.elapsed()
    );
    assert!(
        f.continued().is_empty(),
        "the agent ended the call: no transfer"
    );
    let stats = h.ctl().stats();
    assert_eq!((stats.given_up, stats.hangups, stats.transfers), (1, 1, 0));
    assert_eq!(h.ctl().given_up_callers(), 0);
    assert_eq!(h.next.answer(&summary.call_id.to_string()), "hangup");
}

/// The healthy call beside a fault lost nothing ([`common::assert_no_frame_lost`]), lasted
/// its whole length and heard its echo.
fn assert_no_frame_lost(report: &voicegate::caller::CallReport, summary: &CallSummary) {
    common::assert_no_frame_lost(report, summary);
    assert!(
        report.frames_received + 10 >= report.frames_sent,
        "voicegate sent far fewer frames than the call lasted: {} for {}",
        report.frames_received,
        report.frames_sent
    );
    assert!(report.audible_frames_received > 20 && !report.hangup_received);
}

/// Waits up to `secs` s for the events link to reach `want`; fails the test with `what`.
async fn wait_link(
    state: &mut tokio::sync::watch::Receiver<LinkState>,
    want: LinkState,
    secs: u64,
    what: &str,
) {
    tokio::time::timeout(Duration::from_secs(secs), state.wait_for(|s| *s == want))
        .await
        .expect(what)
        .expect("the events task is running");
}

/// The periodic reconcile pass: events are lost while the link stays up (nothing to
/// reconnect), and the pass every `reconcile_interval_ms` still finds the caller who hung up
/// and cleans the call up; a live call beside it is left alone.
#[tokio::test]
async fn periodic_reconcile_cleans_up_a_call_whose_stasis_end_was_lost() {
    const INTERVAL: Duration = Duration::from_secs(1);
    let h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |c| {
        c.reconcile_interval_ms = INTERVAL.as_millis() as u64;
    })
    .await;
    let live = h.fake.new_caller("+15550001212", "Kim");
    wait_bridged(&h, 1).await;
    let gone = h.fake.new_caller("+15550003434", "Lou");
    wait_bridged(&h, 2).await;
    let reconciles = h.ctl().stats().reconciles;
    let attempts = h.rt.link.attempts();
    h.fake.lose_events(true);
    let t0 = Instant::now();
    h.fake.caller_hangs_up(&gone);
    wait_until(Duration::from_secs(10), || h.ctl().tracked_calls() == 1).await;
    let took = t0.elapsed();
    eprintln!(
        "measured: StasisEnd lost, call cleaned up by the periodic pass in {took:?} (interval {INTERVAL:?})"
    );
    h.fake.lose_events(false);
    assert!(h.ctl().stats().reconciles > reconciles);
    assert_eq!(h.rt.link.attempts(), attempts, "no reconnect involved");
    assert_eq!(*h.rt.link.state.borrow(), LinkState::Up);
    // The lost call's bridge and externalMedia channel are gone; the live call is untouched.
    let f = &h.fake;
    wait_until(Duration::from_secs(5), || {
        f.count(&f.counts.bridges_destroyed) == 1 && f.count(&f.counts.media_destroyed) == 1
    })
    .await;
    assert!(f.continued().is_empty());
    wait_until(Duration::from_secs(5), || f.media_reports()[1].closed).await;
    sleep(INTERVAL * 2).await;
    assert!(
        !f.media_reports()[0].closed,
        "the live call's media is still up"
    );
    assert_eq!(h.ctl().tracked_calls(), 1);
    h.fake.caller_hangs_up(&live);
    h.wait_clean().await;
}

/// Issue 8, "ARI: events WebSocket closed", its quiet form: the TCP connection stays open but
/// Asterisk sends nothing on it and reads nothing (no pong, no Close, no FIN). voicegate's
/// pings find it: no frame for two ping intervals marks the link down (reported on the link
/// state that `/health` mirrors), it reconnects with its backoff (a reconnect that goes
/// silent too is dropped the same way, and the wait doubles), and the reconcile pass after
/// each reconnect finds what the silent link hid: a caller who hung up meanwhile is cleaned
/// up. A live Stasis call in the same bridge setup loses no frame throughout.
#[tokio::test]
async fn events_socket_going_silent_is_detected_by_ping_and_reconnected() {
    const PING: Duration = Duration::from_millis(500);
    const BACKOFF: Duration = Duration::from_secs(1);
    let mut h = Harness::start(Behaviour::Echo, SlinRate::Hz16000, |c| {
        c.ping_interval_ms = PING.as_millis() as u64;
        c.reconnect_initial_ms = BACKOFF.as_millis() as u64;
        c.reconnect_max_ms = 4_000;
    })
    .await;
    let states: Arc<Mutex<Vec<(Instant, LinkState)>>> = Arc::default();
    {
        let mut rx = h.rt.link.state.clone();
        rx.wait_for(|s| *s == LinkState::Up).await.unwrap();
        let states = states.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let s = *rx.borrow_and_update();
                states.lock().unwrap().push((Instant::now(), s));
            }
        });
    }
    let live = h.fake.new_caller("+15550008888", "Ines");
    wait_bridged(&h, 1).await;
    let other = h.fake.new_caller("+15550009999", "Jon");
    wait_bridged(&h, 2).await;
    // Pongs keep a quiet but healthy link up: several ping intervals, no drop.
    sleep(PING * 3).await;
    assert_eq!(*h.rt.link.state.borrow(), LinkState::Up);
    assert!(
        states.lock().unwrap().is_empty(),
        "{:?}",
        states.lock().unwrap()
    );
    let reconciles = h.ctl().stats().reconciles;
    let mut state = h.rt.link.state.clone();

    // The fault: the events socket goes silent; then the second caller hangs up, and its
    // StasisEnd goes nowhere.
    h.fake.silence_ws(true);
    let t0 = Instant::now();
    h.fake.caller_hangs_up(&other);
    wait_link(&mut state, LinkState::Down, 10, "a silent link is detected").await;
    let detected = t0.elapsed();
    eprintln!("measured: events socket silent → link down in {detected:?} (ping {PING:?})");
    assert!(
        detected >= PING && detected < PING * 3 + Duration::from_secs(3),
        "{detected:?}"
    );
    // Nothing told voicegate about the hangup yet (the reconnect is a second away).
    assert_eq!(h.ctl().tracked_calls(), 2);
    assert_eq!(h.ctl().stats().reconciles, reconciles);

    // It reconnects after its backoff; that connection goes silent too and is dropped again.
    wait_link(&mut state, LinkState::Up, 10, "reconnected").await;
    // The pass after the reconnect lists the channels: the hung-up caller is cleaned up.
    wait_until(Duration::from_secs(5), || h.ctl().tracked_calls() == 1).await;
    assert!(h.ctl().stats().reconciles > reconciles);
    h.fake.silence_ws(false);
    wait_link(
        &mut state,
        LinkState::Down,
        10,
        "the silent reconnect is detected too",
    )
    .await;
    wait_link(&mut state, LinkState::Up, 15, "link restored").await;
    h.fake.wait_ws().await;
    let restored = t0.elapsed();
    eprintln!("measured: silence → link down twice → a working link in {restored:?}");
    // The working link stays up: pongs answer the pings again.
    sleep(PING * 4).await;
    assert_eq!(*h.rt.link.state.borrow(), LinkState::Up);
    assert_eq!(h.fake.count(&h.fake.counts.ws_silenced), 2);

    // Backoff: each Down lasted at least about its wait (1 s, then 2 s), never a busy loop.
    let log = states.lock().unwrap().clone();
    let waits: Vec<Duration> = log
        .iter()
        .enumerate()
        .filter(|(_, (_, s))| *s == LinkState::Down)
        .filter_map(|(i, (at, _))| {
            log[i + 1..]
                .iter()
                .find(|(_, s)| *s != LinkState::Down)
                .map(|(next, _)| *next - *at)
        })
        .collect();
    eprintln!("measured: waits before each reconnect: {waits:?}");
    assert_eq!(waits.len(), 2, "{log:?}");
    assert!(
        waits[0] >= BACKOFF / 2 && waits[1] >= BACKOFF,
        "{waits:?} (backoff {BACKOFF:?}, doubled)"
    );
    let attempts = h.rt.link.attempts();
    assert_eq!(attempts, 3, "first connect and two reconnects");

    // Events flow again, and the live call went on throughout.
    h.fake.press(&live, '5');
    wait_until(Duration::from_secs(3), || {
        h.log.dtmf.lock().unwrap().iter().any(|(_, d)| *d == '5')
    })
    .await;
    h.fake.caller_hangs_up(&live);
    h.wait_clean().await;
    let live_id = h.fake.media_reports()[0].call_id.expect("call id");
    let mut summary = None;
    for _ in 0..2 {
        let s = h.next_summary().await;
        if s.call_id == live_id {
            summary = Some(s);
        }
    }
    let summary = summary.expect("the live call's summary");
    let report = h.fake.media_reports()[0].clone();
    eprintln!(
        "measured: live Stasis call through the silence: Asterisk sent {}, voicegate read {}; voicegate sent {}, Asterisk got {}; max gap {:.1} ms",
        report.frames_sent,
        summary.frames_in,
        summary.frames_out,
        report.frames_received,
        report.gap_max_ms
    );
    assert_eq!(summary.outcome, Outcome::CallerHungUp);
    common::assert_no_frame_lost_counts(
        report.frames_sent,
        report.frames_received,
        report.gap_max_ms,
        &summary,
    );
    assert!(report.frames_received > 200, "{}", report.frames_received);
}
