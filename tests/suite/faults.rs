//! Fault injection (issue 8): the provider, the caller side and the listener misbehave; each
//! test checks that the faulty call ends the way it should (the fallback within 2 s, or the
//! right outcome in its call record), that a healthy echo call running at the same time in
//! the same process lost no frames, and that nothing leaked: the process's open file
//! descriptors (`/proc/self/fd`) and the runtime's live tasks are back where they were.
//!
//! Each test runs in a process of its own (`rusty_fork_test!`: the test binary runs itself
//! for that one test), so the fd count of one is not disturbed by another, and four run at
//! once.

use crate::common;
use crate::fake_openai;

use bytes::BytesMut;
use common::{TestServer, fixture};
use fake_openai::{FakeConn, FakeOpenAi, to_wire};
use rusty_fork::rusty_fork_test;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use voicegate::agent::SharedAgent;
use voicegate::agent::echo::EchoAgent;
use voicegate::agent::openai_realtime::OpenAiRealtime;
use voicegate::audio::convert::WireFormat;
use voicegate::audio::g711::Law;
use voicegate::audio::wav::Recording;
use voicegate::audiosocket::SlinRate;
use voicegate::audiosocket::codec::{self, Message};
use voicegate::call::route::ServerParams;
use voicegate::call::{CallSummary, Outcome};
use voicegate::caller::{CallPlan, CallReport, place_call, run_call};
use voicegate::config::{AudioSocketConfig, OpenAiRealtimeConfig};
use voicegate::guard::{Guard, GuardConfig};
use voicegate::secret::SecretSource;

const KEY: &str = "sk-fault-test-key-0123456789";
const ULAW: WireFormat = WireFormat::G711(Law::Ulaw);

/// Runs one test body on a runtime of its own: two workers, like the service on a 2-core
/// box, so the fault's work (a burst of audio to decode) and the healthy call are scheduled
/// as they would be in production. Each test calls this inside `rusty_fork_test!`, in a
/// process of its own: the fd count ([`open_fds`]) is per process.
fn isolated(body: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(body);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

fn live_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

fn plan(speech: Recording, seconds: f64) -> CallPlan {
    CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate: SlinRate::Hz8000,
        speech,
        speech_offset: Duration::from_millis(100),
        dtmf: vec![],
        duration: Duration::from_secs_f64(seconds),
    }
}

fn echo() -> SharedAgent {
    Arc::new(EchoAgent::new(Duration::from_millis(200)))
}

fn realtime(url: &str, connect_timeout_ms: u64) -> SharedAgent {
    let cfg = OpenAiRealtimeConfig {
        url: url.to_owned(),
        api_key: SecretSource::Inline(KEY.into()),
        instructions: "You are a test agent.".into(),
        connect_timeout_ms,
        ..OpenAiRealtimeConfig::default()
    };
    Arc::new(OpenAiRealtime::new(&cfg).expect("agent config"))
}

fn params(edit: impl FnOnce(&mut ServerParams)) -> ServerParams {
    let mut p = ServerParams::from_config(&AudioSocketConfig::default());
    p.shutdown_grace = Duration::from_secs(2);
    edit(&mut p);
    p
}

/// The lock, the counts before the test, and the healthy call running beside the fault.
struct Harness {
    fds: usize,
    tasks: usize,
    echo: Option<TestServer>,
    healthy: Option<JoinHandle<CallReport>>,
    healthy_id: Option<uuid::Uuid>,
    /// The healthy call's record, when the test took it from the server itself.
    healthy_summary: Option<CallSummary>,
}

impl Harness {
    /// Counts, and starts a healthy echo call of `seconds` on an echo
    /// server of its own.
    async fn start(seconds: f64) -> Self {
        let mut h = Self::counting().await;
        let echo = TestServer::start_with(echo(), params(|_| {})).await;
        h.healthy_call(echo.addr, seconds);
        h.echo = Some(echo);
        h
    }

    /// Counts; the test starts the healthy call ([`Self::healthy_call`]) on the listener
    /// under test.
    async fn counting() -> Self {
        Harness {
            fds: open_fds(),
            tasks: live_tasks(),
            echo: None,
            healthy: None,
            healthy_id: None,
            healthy_summary: None,
        }
    }

    fn healthy_call(&mut self, addr: SocketAddr, seconds: f64) {
        let p = plan(fixture("hello-world.wav"), seconds);
        self.healthy_id = Some(p.call_id);
        self.healthy = Some(tokio::spawn(async move {
            place_call(addr, &p).await.expect("the healthy call")
        }));
    }

    /// Waits for the healthy call's record on `server` and keeps it for [`Self::finish`].
    async fn healthy_summary(&mut self, server: &mut TestServer) -> CallSummary {
        let s = record_of(server, self.healthy_id.expect("a healthy call")).await;
        self.healthy_summary = Some(s.clone());
        s
    }

    /// Waits for the healthy call and checks it lost nothing, stops every server, and
    /// checks that fds and tasks are back to their counts.
    ///
    /// "Lost nothing" is [`common::assert_no_frame_lost`], against voicegate's own counts.
    async fn finish(mut self, mut servers: Vec<TestServer>) {
        let report = self
            .healthy
            .take()
            .expect("a healthy call")
            .await
            .expect("healthy call task");
        let summary = match self.healthy_summary.take() {
            Some(s) => s,
            None => {
                let server = match self.echo.as_mut() {
                    Some(echo) => echo,
                    None => &mut servers[0],
                };
                record_of(server, self.healthy_id.expect("a healthy call")).await
            }
        };
        common::assert_no_frame_lost(&report, &summary);
        assert!(
            report.frames_received + 10 >= report.frames_sent,
            "voicegate sent far fewer frames than the call lasted: {} for {}",
            report.frames_received,
            report.frames_sent
        );
        assert_eq!(report.short_frames, 0);
        assert!(!report.hangup_received, "the healthy call was hung up");
        assert!(
            report.audible_frames_received > 20,
            "the healthy call heard its echo"
        );
        for s in servers.into_iter().chain(self.echo.take()) {
            s.stop.cancel();
            tokio::time::timeout(Duration::from_secs(10), s.task)
                .await
                .expect("the server stops")
                .expect("server task");
        }
        // Closed sockets and finished tasks go away shortly after; poll, don't sleep long.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (fds, tasks) = (open_fds(), live_tasks());
            if fds <= self.fds && tasks <= self.tasks {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "leak: {fds} fds (before {}), {tasks} tasks (before {})",
                self.fds,
                self.tasks
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// [`summary_of`], failing the test after 10 s instead of waiting forever.
async fn record_of(server: &mut TestServer, id: uuid::Uuid) -> CallSummary {
    tokio::time::timeout(Duration::from_secs(10), summary_of(server, id))
        .await
        .expect("the call's record")
}

/// The summary of call `id` (other calls' summaries are skipped).
async fn summary_of(server: &mut TestServer, id: uuid::Uuid) -> CallSummary {
    loop {
        let s = server.next_summary().await;
        if s.call_id == id {
            return s;
        }
    }
}

/// Places `plan` and returns the report and when (ms after `t0`) the call started.
async fn call(addr: SocketAddr, plan: &CallPlan, t0: Instant) -> (CallReport, f64) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let offset = t0.elapsed().as_secs_f64() * 1000.0;
    (run_call(stream, plan).await.expect("call"), offset)
}

/// The faulty call reached the fallback: `0x00` within 2 s of `failed_at` (ms after `t0`),
/// and a call record with a fallback outcome and reason. Returns the reason.
/// What voicegate put on the AudioSocket wire while the provider misbehaved: 20 ms frames
/// at 20 ms pacing (median gap 18–22 ms), and never ahead of real time (frame `i` not
/// before `20·i − 60` ms after the first: a burst passed through, or 10 ms pacing, fails),
/// whatever the provider sent and however fast.
fn assert_paced_on_the_wire(what: &str, report: &CallReport) {
    assert_eq!(report.short_frames, 0, "{what}: {report:?}");
    let a = &report.arrivals_ms;
    assert!(a.len() >= 40, "{what}: only {} frames", a.len());
    assert!(
        (18.0..=22.0).contains(&report.gap_p50_ms),
        "{what}: frame gap p50 {} ms",
        report.gap_p50_ms
    );
    let ahead = (0..a.len())
        .map(|i| (i as f64 * 20.0 - (a[i] - a[0]), i))
        .fold((f64::MIN, 0), |m, x| if x.0 > m.0 { x } else { m });
    eprintln!(
        "measured: {what}: {} frames, gap p50 {:.1} p99 {:.1} max {:.1} ms, at most {:.1} ms ahead of real time (frame {})",
        a.len(),
        report.gap_p50_ms,
        report.gap_p99_ms,
        report.gap_max_ms,
        ahead.0,
        ahead.1
    );
    assert!(
        ahead.0 <= 60.0,
        "{what}: frame {} arrived {:.1} ms ahead of 20 ms pacing",
        ahead.1,
        ahead.0
    );
}

async fn assert_fallback(
    server: &mut TestServer,
    plan: &CallPlan,
    report: &CallReport,
    offset: f64,
    failed_at: f64,
) -> String {
    assert!(report.hangup_received, "the caller got 0x00: {report:?}");
    let ended = offset + report.duration_ms;
    assert!(
        ended - failed_at < 2_000.0,
        "call ended {} ms after the failure",
        ended - failed_at
    );
    let s = summary_of(server, plan.call_id).await;
    assert!(s.frames_in > 0, "{s:?}");
    assert!(s.fallback.is_some(), "the record names the fallback: {s:?}");
    match s.outcome {
        Outcome::Fallback(reason) => {
            assert!(!reason.contains(KEY), "the key leaked: {reason}");
            reason
        }
        other => panic!("expected a fallback, got {other:?}"),
    }
}

/// `session.created` → `session.update` → `session.updated` with μ-law both ways.
async fn set_up(c: &mut FakeConn) {
    c.session_created().await;
    let update = c.expect("session.update").await;
    c.session_updated(&update, (ULAW, ULAW)).await;
}

fn ulaw_reply(seconds: f64) -> Vec<u8> {
    let r = fixture("hello-world.wav");
    let r = voicegate::caller::resample_recording(&r, 8_000).expect("resample");
    let mut out = Vec::new();
    while (out.len() as f64) < seconds * 8_000.0 {
        out.extend(to_wire(&r.samples, ULAW));
    }
    out.truncate((seconds * 8_000.0) as usize);
    out
}

// ---------------------------------------------------------------------------------------
// The provider
// ---------------------------------------------------------------------------------------

rusty_fork_test! {
    /// Nothing listens at the provider's address: connection refused.
    #[test]
    fn provider_refuses_the_connection() {
        isolated(provider_refuses_the_connection_body());
    }
}

async fn provider_refuses_the_connection_body() {
    let h = Harness::start(3.0).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = TestServer::start(realtime(
        &format!("ws://127.0.0.1:{port}/v1/realtime"),
        2_000,
    ))
    .await;
    let p = plan(fixture("hello-world.wav"), 8.0);
    let t0 = Instant::now();
    let (report, offset) = call(server.addr, &p, t0).await;
    let reason = assert_fallback(&mut server, &p, &report, offset, offset).await;
    assert!(reason.contains("connect"), "{reason}");
    h.finish(vec![server]).await;
}

rusty_fork_test! {
    /// The provider accepts the WebSocket and then says nothing: the connect timeout.
    #[test]
    fn provider_accepts_then_never_answers() {
        isolated(provider_accepts_then_never_answers_body());
    }
}

async fn provider_accepts_then_never_answers_body() {
    let h = Harness::start(3.0).await;
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(realtime(&fake.url, 500)).await;
    let p = plan(fixture("hello-world.wav"), 8.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        let accepted = c.now_ms();
        c.drain(Duration::from_secs(3)).await;
        accepted
    };
    let (accepted, (report, offset)) = tokio::join!(fake_side, call(server.addr, &p, t0));
    let reason = assert_fallback(&mut server, &p, &report, offset, accepted + 500.0).await;
    assert!(reason.contains("session.created"), "{reason}");
    drop(fake);
    h.finish(vec![server]).await;
}

rusty_fork_test! {
    /// The provider's connection drops (no close frame) in the middle of a reply.
    #[test]
    fn provider_drops_mid_sentence() {
        isolated(provider_drops_mid_sentence_body());
    }
}

async fn provider_drops_mid_sentence_body() {
    let h = Harness::start(4.0).await;
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(realtime(&fake.url, 2_000)).await;
    let p = plan(fixture("hello-world.wav"), 8.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c).await;
        c.wait_for_audio_ms(300).await;
        // Half a sentence: response.created and two 200 ms deltas, then the line goes.
        let audio = ulaw_reply(0.4);
        c.send(serde_json::json!({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress", "output": []}}))
            .await;
        for chunk in audio.chunks(1_600) {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(chunk);
            c.send(
                serde_json::json!({"type": "response.output_audio.delta", "response_id": "resp_1",
                "item_id": "item_1", "output_index": 0, "content_index": 0, "delta": b64}),
            )
            .await;
        }
        let t = c.now_ms();
        drop(c);
        t
    };
    let (dropped, (report, offset)) = tokio::join!(fake_side, call(server.addr, &p, t0));
    let reason = assert_fallback(&mut server, &p, &report, offset, dropped).await;
    assert!(reason.contains("closed"), "{reason}");
    drop(fake);
    h.finish(vec![server]).await;
}

rusty_fork_test! {
    /// Malformed JSON, a binary frame and events of the wrong shape are ignored: the call goes
    /// on and a later reply still plays; then the provider closes with 1011 and the call falls
    /// back, the code in its record.
    #[test]
    fn provider_sends_malformed_json_then_closes_with_an_error_code() {
        isolated(provider_sends_malformed_json_then_closes_with_an_error_code_body());
    }
}

async fn provider_sends_malformed_json_then_closes_with_an_error_code_body() {
    let h = Harness::start(5.0).await;
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(realtime(&fake.url, 2_000)).await;
    let p = plan(fixture("hello-world.wav"), 10.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c).await;
        c.wait_for_audio_ms(300).await;
        for junk in [
            r#"{"type": "response.output_audio.delta", "delta": "#,
            "not json at all",
            r#"{"type": 5}"#,
            r#"{"type": "response.output_audio.delta", "item_id": "x", "delta": "!!not base64!!"}"#,
            r#"{"type": "error", "error": "a string, not an object"}"#,
            r#"{"type": "session.updated", "session": {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 4000000000}}}}}"#,
            "[]",
            "",
        ] {
            c.send_raw(WsMessage::Text(junk.into())).await;
        }
        c.send_raw(WsMessage::Binary(vec![0xff; 64].into())).await;
        c.reply("resp_1", "item_1", &ulaw_reply(1.0), 1_600, "still here")
            .await;
        // The caller is still saying "Hello, world." over the reply: local barge-in pauses
        // it, nothing confirms, and it resumes 700 ms later (twice, if the caller is still
        // talking at the resume: 1 s of reply + 1.4 s of pauses); 4 s lets it play out on a
        // loaded machine too (2.5 s left ~100 ms of slack).
        c.drain(Duration::from_millis(4_000)).await;
        let t = c.now_ms();
        c.close_with(1011, "internal server error").await;
        t
    };
    let (closed, (report, offset)) = tokio::join!(fake_side, call(server.addr, &p, t0));
    assert!(
        report.audible_frames_received >= 40,
        "the reply after the junk played: {} audible frames",
        report.audible_frames_received
    );
    let reason = assert_fallback(&mut server, &p, &report, offset, closed).await;
    assert!(reason.contains("1011"), "{reason}");
    drop(fake);
    h.finish(vec![server]).await;
}

rusty_fork_test! {
    /// The provider confirms μ-law but sends pcm16 at 24 kHz (and odd-length deltas): the call
    /// neither panics nor stalls (its frames stay paced), and a close with 1008 falls back.
    #[test]
    fn provider_sends_audio_in_another_format_than_agreed() {
        isolated(provider_sends_audio_in_another_format_than_agreed_body());
    }
}

async fn provider_sends_audio_in_another_format_than_agreed_body() {
    let h = Harness::start(5.0).await;
    let fake = FakeOpenAi::bind(KEY).await;
    let mut server = TestServer::start(realtime(&fake.url, 2_000)).await;
    let p = plan(fixture("hello-world.wav"), 10.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c).await;
        c.wait_for_audio_ms(300).await;
        let speech = fixture("hello-world.wav");
        let pcm24 = voicegate::caller::resample_recording(&speech, 24_000).expect("resample");
        let mut wire = to_wire(&pcm24.samples, WireFormat::Pcm16 { rate_hz: 24_000 });
        wire.truncate(48_000 * 2 + 1);
        c.reply("resp_1", "item_1", &wire, 4_801, "noise").await;
        c.drain(Duration::from_millis(2_500)).await;
        let t = c.now_ms();
        c.close_with(1008, "policy violation").await;
        t
    };
    let (closed, (report, offset)) = tokio::join!(fake_side, call(server.addr, &p, t0));
    assert!(
        report.gap_max_ms < 1_000.0 && report.short_frames == 0,
        "the faulty call's own frames kept coming: {report:?}"
    );
    assert_paced_on_the_wire("audio in another format", &report);
    let reason = assert_fallback(&mut server, &p, &report, offset, closed).await;
    assert!(reason.contains("1008"), "{reason}");
    drop(fake);
    h.finish(vec![server]).await;
}

rusty_fork_test! {
    /// A minute of audio as fast as the socket takes it: the playout buffer stays within its
    /// bound (2 s here) and counts the rest as overflow; then a close falls back.
    #[test]
    fn provider_floods_a_minute_of_audio_and_memory_stays_bounded() {
        isolated(provider_floods_a_minute_of_audio_and_memory_stays_bounded_body());
    }
}

async fn provider_floods_a_minute_of_audio_and_memory_stays_bounded_body() {
    let h = Harness::start(5.0).await;
    let fake = FakeOpenAi::bind(KEY).await;
    let bound = Duration::from_secs(2);
    let mut server = TestServer::start_with(
        realtime(&fake.url, 2_000),
        params(|p| p.session.playout_max = bound),
    )
    .await;
    let p = plan(fixture("hello-world.wav"), 12.0);
    let t0 = Instant::now();
    let fake_side = async {
        let (_, conn) = fake.accept(None, t0).await;
        let mut c = conn.expect("upgrade accepted");
        set_up(&mut c).await;
        c.wait_for_audio_ms(300).await;
        let minute = ulaw_reply(60.0);
        let sent_from = c.now_ms();
        c.reply("resp_1", "item_1", &minute, 8_000, "flood").await;
        let sent_in = c.now_ms() - sent_from;
        c.drain(Duration::from_millis(1_000)).await;
        let t = c.now_ms();
        c.close_with(1011, "flood over").await;
        (t, sent_in)
    };
    let ((closed, sent_in), (report, offset)) = tokio::join!(fake_side, call(server.addr, &p, t0));
    // The set-up (not the check): the fake did flood, a minute of audio well ahead of time.
    assert!(
        sent_in < 30_000.0,
        "precondition: the fake sent its minute in {sent_in} ms"
    );
    // The check: what voicegate did with it on the caller's wire.
    assert_paced_on_the_wire("a minute of audio flooded", &report);
    assert!(report.hangup_received);
    let ended = offset + report.duration_ms;
    assert!(
        ended - closed < 2_000.0,
        "fallback {} ms after the close",
        ended - closed
    );
    let s = summary_of(&mut server, p.call_id).await;
    assert!(matches!(s.outcome, Outcome::Fallback(_)), "{:?}", s.outcome);
    // What was played plus what the buffer could hold is all that was kept; the rest of the
    // minute was counted as overflow, never stored.
    let played = s.agent_frames_out * 160;
    let kept_max = played + 8 * bound.as_millis() as u64 + 160;
    assert!(
        s.playout_overflow_samples + kept_max >= 60 * 8_000,
        "overflow {} + kept ≤ {kept_max} must cover the minute",
        s.playout_overflow_samples
    );
    assert!(s.playout_overflow_samples > 40 * 8_000, "{s:?}");
    drop(fake);
    h.finish(vec![server]).await;
}

// ---------------------------------------------------------------------------------------
// The caller side
// ---------------------------------------------------------------------------------------

/// Sends the call id and `frames` frames of 8 kHz silence on `stream`.
async fn start_raw_call(stream: &mut TcpStream, id: uuid::Uuid, frames: usize) {
    let mut out = BytesMut::new();
    codec::encode(&Message::CallId(id), &mut out);
    for _ in 0..frames {
        codec::encode_audio_samples(SlinRate::Hz8000, &[0i16; 160], &mut out);
    }
    stream.write_all(&out).await.expect("write");
}

/// Reads until the server closes; returns whether a `0x00` came first and how long it took.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (bool, Duration) {
    let t = Instant::now();
    let mut buf = BytesMut::with_capacity(4096);
    let mut hangup = false;
    loop {
        match tokio::time::timeout_at(
            t + limit,
            voicegate::audiosocket::read_message(stream, &mut buf),
        )
        .await
        {
            Err(_) => panic!("the server did not close within {limit:?}"),
            Ok(Ok(Some(Message::Hangup))) => hangup = true,
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) | Ok(Err(_)) => return (hangup, t.elapsed()),
        }
    }
}

rusty_fork_test! {
    /// The peer stops sending without a FIN (half-open): the idle timeout ends the call.
    #[test]
    fn half_open_caller_is_closed_by_the_idle_timeout() {
        isolated(half_open_caller_is_closed_by_the_idle_timeout_body());
    }
}

async fn half_open_caller_is_closed_by_the_idle_timeout_body() {
    let mut h = Harness::counting().await;
    let mut server = TestServer::start_with(
        echo(),
        params(|p| p.session.idle_timeout = Duration::from_secs(1)),
    )
    .await;
    h.healthy_call(server.addr, 4.0);
    let id = uuid::Uuid::new_v4();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    start_raw_call(&mut s, id, 10).await;
    // Silence from here on, the socket left open: what a vanished peer looks like.
    let (hangup, took) = read_to_close(&mut s, Duration::from_secs(4)).await;
    assert!(hangup, "0x00 before the close");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    let sum = summary_of(&mut server, id).await;
    assert_eq!(sum.outcome, Outcome::IdleTimeout);
    assert_eq!(sum.frames_in, 10);
    drop(s);
    h.finish(vec![server]).await;
}

rusty_fork_test! {
    /// Slowloris: a byte per second, before the call id (the call-id timeout) and inside a
    /// frame after it (the idle timeout: only whole frames count as input).
    #[test]
    fn slowloris_is_cut_off() {
        isolated(slowloris_is_cut_off_body());
    }
}

async fn slowloris_is_cut_off_body() {
    let mut h = Harness::counting().await;
    let mut server = TestServer::start_with(
        echo(),
        params(|p| {
            p.call_id_timeout = Duration::from_millis(1_500);
            p.session.idle_timeout = Duration::from_secs(2);
        }),
    )
    .await;
    h.healthy_call(server.addr, 6.0);
    let slow = |mut s: TcpStream, bytes: Vec<u8>| async move {
        let t = Instant::now();
        let mut probe = vec![0u8; 16 * 1024];
        for b in bytes {
            if s.write_all(&[b]).await.is_err() {
                return t.elapsed();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            // A closed connection shows up as EOF (or a reset) once what was sent is read.
            loop {
                match tokio::time::timeout(Duration::from_millis(5), s.read(&mut probe)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return t.elapsed(),
                    Ok(Ok(_)) => continue,
                    Err(_) => break,
                }
            }
        }
        panic!("the slow connection was never closed");
    };
    // Before the call id.
    let mut id_bytes = BytesMut::new();
    let before_id = uuid::Uuid::new_v4();
    codec::encode(&Message::CallId(before_id), &mut id_bytes);
    let a = TcpStream::connect(server.addr).await.unwrap();
    // After the call id and two frames: a frame header then its payload a byte a second.
    let after_id = uuid::Uuid::new_v4();
    let mut b = TcpStream::connect(server.addr).await.unwrap();
    start_raw_call(&mut b, after_id, 2).await;
    let mut frame = BytesMut::new();
    codec::encode_audio_samples(SlinRate::Hz8000, &[0i16; 160], &mut frame);
    let (ta, tb) = tokio::join!(slow(a, id_bytes.to_vec()), slow(b, frame.to_vec()));
    assert!(ta < Duration::from_secs(4), "before the call id: {ta:?}");
    assert!(tb < Duration::from_secs(5), "inside a frame: {tb:?}");
    let sum = summary_of(&mut server, after_id).await;
    assert_eq!(sum.outcome, Outcome::IdleTimeout);
    h.finish(vec![server]).await;
}

rusty_fork_test! {
    /// 1,000 connections from 127.0.0.2 against an allowlist of 127.0.0.1/32: every one is
    /// closed at once with nothing read or written, no agent starts, no record is written, and
    /// the allowed call on the same listener goes on.
    #[test]
    fn flood_from_a_disallowed_address_is_refused() {
        isolated(flood_from_a_disallowed_address_is_refused_body());
    }
}

async fn flood_from_a_disallowed_address_is_refused_body() {
    let mut h = Harness::counting().await;
    let guard = Arc::new(
        Guard::new(
            GuardConfig {
                allow: vec!["127.0.0.1/32".parse().unwrap()],
                ..GuardConfig::default()
            },
            None,
        )
        .expect("guard"),
    );
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let srv = voicegate::audiosocket::server::Server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut router = voicegate::call::route::Router::fixed(
        voicegate::call::route::Generation::new(echo(), params(|_| {})),
    );
    router.guard = Some(guard.clone());
    router.summaries = Some(tx.into());
    let addr = srv.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(srv.run(std::sync::Arc::new(router), stop.clone()));
    let mut server = TestServer {
        addr,
        stop,
        summaries: rx,
        task,
    };
    h.healthy_call(addr, 4.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused = 0;
    for _batch in 0..10 {
        let mut tasks = Vec::new();
        for _ in 0..100 {
            tasks.push(tokio::spawn(async move {
                let sock = TcpSocket::new_v4().unwrap();
                sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                let mut s = sock.connect(addr).await.expect("tcp connect");
                let mut id = BytesMut::new();
                codec::encode(&Message::CallId(uuid::Uuid::new_v4()), &mut id);
                let _ = s.write_all(&id).await;
                let mut buf = [0u8; 64];
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                )
            }));
        }
        for t in tasks {
            refused += t.await.unwrap() as usize;
        }
    }
    assert_eq!(refused, 1_000, "every stranger was closed without a byte");
    assert!(guard.live_calls() <= 1, "only the healthy call is live");
    // The healthy call's own record is the only one: strangers leave none.
    let s = h.healthy_summary(&mut server).await;
    assert_eq!(s.outcome, Outcome::CallerHungUp, "{s:?}");
    assert!(
        server.summaries.try_recv().is_err(),
        "no record for the strangers"
    );
    h.finish(vec![server]).await;
}

rusty_fork_test! {
    /// Frames of length 0 are harmless; a frame declaring 65,535 bytes is refused before it
    /// is buffered and ends that call only.
    #[test]
    fn frames_of_length_zero_and_65535() {
        isolated(frames_of_length_zero_and_65535_body());
    }
}

async fn frames_of_length_zero_and_65535_body() {
    let mut h = Harness::counting().await;
    let mut server = TestServer::start_with(echo(), params(|_| {})).await;
    h.healthy_call(server.addr, 4.0);
    let id = uuid::Uuid::new_v4();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    start_raw_call(&mut s, id, 5).await;
    for _ in 0..5 {
        s.write_all(&[0x10, 0x00, 0x00]).await.unwrap();
    }
    start_raw_call_frames(&mut s, 5).await;
    let mut huge = vec![0x10, 0xFF, 0xFF];
    huge.extend(std::iter::repeat_n(0u8, 1_000));
    s.write_all(&huge).await.unwrap();
    let (hangup, took) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert!(hangup, "0x00 before the close");
    assert!(took < Duration::from_secs(2));
    let sum = summary_of(&mut server, id).await;
    match &sum.outcome {
        Outcome::ProtocolError(e) => assert!(e.contains("65535"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(sum.frames_in, 15, "the empty frames were read as frames");
    drop(s);
    h.finish(vec![server]).await;
}

async fn start_raw_call_frames(stream: &mut TcpStream, frames: usize) {
    let mut out = BytesMut::new();
    for _ in 0..frames {
        codec::encode_audio_samples(SlinRate::Hz8000, &[0i16; 160], &mut out);
    }
    stream.write_all(&out).await.expect("write");
}

rusty_fork_test! {
    /// Audio of the wrong size: short even frames are carried; an odd length (not slin) ends
    /// that call with a protocol error.
    #[test]
    fn audio_of_the_wrong_size() {
        isolated(audio_of_the_wrong_size_body());
    }
}

async fn audio_of_the_wrong_size_body() {
    let mut h = Harness::counting().await;
    let mut server = TestServer::start_with(echo(), params(|_| {})).await;
    h.healthy_call(server.addr, 4.0);
    let id = uuid::Uuid::new_v4();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    start_raw_call(&mut s, id, 3).await;
    let mut out = BytesMut::new();
    for n in [2usize, 100, 318, 322, 640] {
        out.extend_from_slice(&[0x10]);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend(std::iter::repeat_n(0u8, n));
    }
    out.extend_from_slice(&[0x10, 0x00, 0xA1]);
    out.extend(std::iter::repeat_n(0u8, 161));
    s.write_all(&out).await.unwrap();
    let (hangup, _) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert!(hangup);
    let sum = summary_of(&mut server, id).await;
    match &sum.outcome {
        Outcome::ProtocolError(e) => assert!(e.contains("161"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(sum.frames_in, 8, "3 good and 5 odd-sized but even frames");
    drop(s);
    h.finish(vec![server]).await;
}

rusty_fork_test! {
    /// The caller hangs up in the middle of a frame: that call ends with a protocol error.
    #[test]
    fn hangup_mid_frame() {
        isolated(hangup_mid_frame_body());
    }
}

async fn hangup_mid_frame_body() {
    let mut h = Harness::counting().await;
    let mut server = TestServer::start_with(echo(), params(|_| {})).await;
    h.healthy_call(server.addr, 4.0);
    let id = uuid::Uuid::new_v4();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    start_raw_call(&mut s, id, 5).await;
    let mut frame = BytesMut::new();
    codec::encode_audio_samples(SlinRate::Hz8000, &[0i16; 160], &mut frame);
    s.write_all(&frame[..100]).await.unwrap();
    s.shutdown().await.unwrap();
    let sum = summary_of(&mut server, id).await;
    match &sum.outcome {
        Outcome::ProtocolError(e) => assert!(e.contains("inside a frame"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(sum.frames_in, 5);
    drop(s);
    h.finish(vec![server]).await;
}
