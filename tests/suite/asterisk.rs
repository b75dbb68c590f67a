//! voicegate against a real Asterisk 22.10.1 (issue 12), on loopback: the project's own
//! `asterisk/` dialplan and configs, real recordings, and `voicegate run` itself. See
//! `tests/real_asterisk_support/mod.rs` for the set-up and how to point the tests at an
//! Asterisk of your own (`VOICEGATE_ASTERISK`).
#![allow(clippy::disallowed_types)] // a test on real sockets and processes: real time (std::time::Instant)

use crate::fake_openai;
use crate::real_asterisk_support;

use real_asterisk_support::{
    Asterisk, AsteriskSetup, PacingProbe, TestCall, Voicegate, assert_echo, percentile, read_wav,
    repo,
};
use std::time::{Duration, Instant};

/// The echo agent's delay in these tests, ms.
const ECHO_MS: usize = 300;

/// [`real_asterisk_support::ECHO_SEARCH_MS`] in samples at 8 kHz.
const ECHO_SEARCH: usize = real_asterisk_support::ECHO_SEARCH_MS * 8;

fn echo_agent() -> String {
    format!("[agent]\nkind = \"echo\"\ndelay_ms = {ECHO_MS}\n")
}

/// An `[ari]` table for Stasis mode against `ast`, externalMedia pointed at `external`.
fn ari(ast: &Asterisk, external: std::net::SocketAddr, format: &str) -> String {
    format!(
        "[ari]\nurl = \"{}\"\nusername = \"voicegate\"\npassword = \"{}\"\nmode = \"stasis\"\n\
         format = \"{format}\"\nexternal_host = \"{external}\"\n",
        ast.url(),
        real_asterisk_support::ARI_PASSWORD
    )
}

/// The OpenAI Realtime agent pointed at a loopback port that refuses connections (`closed`,
/// held by the caller for the test): it fails at once, like a provider that is down.
fn failing_agent(closed: &real_asterisk_support::RefusingPort) -> String {
    format!(
        "[agent]\nkind = \"openai_realtime\"\nurl = \"ws://{}/v1/realtime\"\n\
         api_key = \"sk-test-unreachable\"\n",
        closed.addr
    )
}

/// The fake OpenAI Realtime server's key.
const OPENAI_KEY: &str = "sk-test-real-asterisk";

/// G.711 μ-law: what the OpenAI Realtime agent uses on an 8 kHz call.
const ULAW: voicegate::audio::convert::WireFormat =
    voicegate::audio::convert::WireFormat::G711(voicegate::audio::g711::Law::Ulaw);

/// `[agent]` for the OpenAI Realtime agent against the fake at `url`, plus `extra` TOML.
fn openai_agent(url: &str, extra: &str) -> String {
    format!(
        "[agent]\nkind = \"openai_realtime\"\nurl = \"{url}\"\napi_key = \"{OPENAI_KEY}\"\n{extra}"
    )
}

/// The barge-in script of the OpenAI Realtime tests: places `call`, opens the fake's session,
/// waits for 1 s of the caller's audio, answers with 4.5 s of real speech (8 kHz: `reply`)
/// at once, and 1.5 s later says the caller started speaking. Returns the call's channel,
/// the reply, the `conversation.item.truncate` voicegate sent, and the session (kept open:
/// dropping it would end the call as an agent failure).
async fn reply_then_barge_in(
    ast: &Asterisk,
    fake: &fake_openai::FakeOpenAi,
    call: &TestCall,
) -> (String, Vec<i16>, serde_json::Value, fake_openai::FakeConn) {
    let mut reply = Vec::new();
    for f in [
        "vm-goodbye.wav",
        "auth-thankyou.wav",
        "hello-world.wav",
        "vm-goodbye.wav",
    ] {
        reply.extend(read_wav(&repo().join("tests/fixtures").join(f)));
    }
    let t0 = tokio::time::Instant::now();
    let ch = ast.originate(call).await;
    let (_, conn) = fake.accept(None, t0).await;
    let mut c = conn.expect("upgrade accepted");
    open_session(&mut c).await;
    // The caller's speech arrives through Asterisk; then the server answers, all at once.
    c.wait_for_audio_ms(1_000).await;
    c.caller_turn("item_u1", "Hello world.").await;
    c.reply(
        "resp_1",
        "item_a1",
        &fake_openai::to_wire(&reply, ULAW),
        800,
        "Goodbye. Thank you. Hello world. Goodbye.",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    c.send(serde_json::json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 3_000, "item_id": "item_u2"}))
        .await;
    let truncate = c.expect("conversation.item.truncate").await;
    (ch, reply, truncate, c)
}

/// `session.created`, the agent's `session.update`, `session.updated` confirming μ-law both
/// ways; returns the update.
async fn open_session(c: &mut fake_openai::FakeConn) -> serde_json::Value {
    c.session_created().await;
    let update = c.expect("session.update").await;
    c.session_updated(&update, (ULAW, ULAW)).await;
    update
}

fn globals(host: std::net::SocketAddr, http: std::net::SocketAddr) -> AsteriskSetup {
    AsteriskSetup {
        globals: vec![
            ("VOICEGATE_HOST".into(), host.to_string()),
            ("VOICEGATE_HTTP".into(), http.to_string()),
        ],
        extra_dialplan: String::new(),
    }
}

fn fixture_samples() -> Vec<i16> {
    read_wav(&repo().join("tests/fixtures/hello-world.wav"))
}

/// voicegate and Asterisk wired together for `mode`: a pacing probe between them, the
/// dialplan's globals pointing at voicegate, and in Stasis mode `[ari]` pointing at Asterisk
/// with externalMedia sent through the probe.
struct Rig {
    ast: Asterisk,
    vg: Voicegate,
    probe: PacingProbe,
}

impl Rig {
    /// Runs `check`; if it panics, prints both logs first (which call, what happened).
    fn explain_on_panic<T>(&self, check: impl FnOnce() -> T) -> T {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("--- voicegate log ---\n{}", self.vg.log.lock().unwrap());
                eprintln!("--- asterisk log ---\n{}", self.ast.log());
                std::panic::resume_unwind(e)
            }
        }
    }

    async fn start(
        prefix: &std::path::Path,
        name: &str,
        stasis_format: Option<&str>,
        agent: &str,
    ) -> Rig {
        let (audiosocket, health) = Voicegate::ports();
        let probe = PacingProbe::start(audiosocket).await;
        let ast = Asterisk::start(prefix, name, globals(probe.addr, health)).await;
        let extra = match stasis_format {
            Some(f) => format!("{agent}{}", ari(&ast, probe.addr, f)),
            None => agent.to_owned(),
        };
        let vg = Voicegate::start_on(name, audiosocket, health, &extra).await;
        if stasis_format.is_some() {
            ast.wait_app_registered().await;
        }
        Rig { ast, vg, probe }
    }
}

/// One echo call in `mode`; checks the echo and voicegate's pacing as Asterisk gets it.
async fn echo_call(mode: &'static str, format: &'static str) {
    let Some((prefix, _slot)) =
        real_asterisk_support::asterisk_for(&format!("echo_call_{mode}")).await
    else {
        return;
    };
    let stasis = (mode == "stasis").then_some(if format == "slin16" { "slin16" } else { "slin" });
    let rig = Rig::start(&prefix, mode, stasis, &echo_agent()).await;
    let (ast, vg, probe) = (&rig.ast, &rig.vg, &rig.probe);
    let call = TestCall::new(&format!("echo-{mode}"), mode);
    let ch = ast.originate(&call).await;
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    ast.wait_no_channels(Duration::from_secs(10)).await;
    let heard = ast.heard(&call.name);
    let said = fixture_samples();
    assert_echo(mode, &heard, &said, ECHO_MS * 8, ECHO_SEARCH);
    let gaps = probe.gaps_ms(0);
    let (p50, p99) = (percentile(&gaps, 0.5), percentile(&gaps, 0.99));
    eprintln!(
        "{mode}: voicegate pacing at Asterisk: {} frames, p50 {p50:.1} ms, p99 {p99:.1} ms",
        gaps.len() + 1
    );
    assert!(gaps.len() > 100, "{} frames", gaps.len());
    assert!((19.0..=21.0).contains(&p50), "p50 {p50}");
    let records = vg.wait_records(1, Duration::from_secs(5)).await;
    assert_eq!(records[0].outcome, "completed", "{:?}", records[0]);
    let errors = ast.errors();
    assert!(errors.is_empty(), "Asterisk errors: {errors:#?}");
    // Included into a dialplan that has its own [incoming], [operators], [default] and
    // [transfer-to-operator], the project's file shadows nothing and is shadowed by nothing.
    assert!(ast.shadowed().is_empty(), "{:#?}", ast.shadowed());
    let dialplan = ast.cli("dialplan show incoming");
    assert!(
        dialplan.contains("the PBX's own incoming context"),
        "{dialplan}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn mode1_app_echoes_the_callers_speech() {
    echo_call("app", "slin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn mode2_driver_echoes_the_callers_speech() {
    echo_call("driver", "slin16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn mode3_stasis_echoes_the_callers_speech() {
    echo_call("stasis", "slin16").await;
}

/// The `[ari]` table for Stasis mode with externalMedia over RTP (issue 16) in `format`:
/// voicegate's RTP sockets on 127.0.0.1, ports from a range starting at a free one.
fn ari_rtp(ast: &Asterisk, audiosocket: std::net::SocketAddr, format: &str) -> String {
    let lo = real_asterisk_support::free_port().clamp(1024, 65_000);
    format!(
        "{}media = \"rtp\"\nrtp_ports = \"{lo}-{}\"\n",
        ari(ast, audiosocket, format),
        lo + 20
    )
}

/// A value of `key=` in the last voicegate log line containing `what`.
fn log_field(log: &str, what: &str, key: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains(what))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let v: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    v.parse().ok()
}

/// One Stasis echo call with `media = "rtp"` in `format` (`alaw`, `ulaw`): the caller hears
/// their own speech back (window by window), the record says `completed`, and voicegate's
/// send pacing, measured at its socket (the gaps between its `send_to`s; Asterisk's ARI
/// has no RTP statistics for chan_rtp's channels without its `g` option: 404 "RTP info not
/// found"), is one packet per 20 ms: p50 within 20 ± 1 ms (as the AudioSocket modes at
/// Asterisk), and drift-free: the mean gap, first to last packet, within 20 ± 0.5 ms (a late
/// tick is caught up by the next ones, so this holds on a loaded machine; a sender that
/// lost or doubled frames, or ran at another rate, moves it), and no tick a whole frame late
/// at p99 (≤ 40 ms). The finer spread is the machine's scheduling as much as voicegate's: on
/// the shared 2-core box a tick late by some ms is caught up by a shorter next gap, or by a
/// packet sent at once when it is over 20 ms late (p1 8.1 ms and p99 33.6 ms seen with a CPU
/// hog beside the test), so p1 is printed, not bounded, and the issue's 20 ± 2 ms p99 is
/// checked where it is measured alone: `cargo bench --bench load -- --transport rtp`
/// (docs/performance.md: p99 21.04 ms at 100 calls).
async fn rtp_echo_call(format: &'static str) {
    let name = format!("rtp_{format}");
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for(&name).await else {
        return;
    };
    let (audiosocket, health) = Voicegate::ports();
    let ast = Asterisk::start(&prefix, &name, globals(audiosocket, health)).await;
    let extra = format!("{}{}", echo_agent(), ari_rtp(&ast, audiosocket, format));
    let vg = Voicegate::start_on(&name, audiosocket, health, &extra).await;
    ast.wait_app_registered().await;
    let call = TestCall::new(&name, "stasis");
    let ch = ast.originate(&call).await;
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    ast.wait_no_channels(Duration::from_secs(10)).await;
    let log = vg.log.lock().unwrap().clone();
    let explain = |ok: bool, what: &str| {
        if !ok {
            eprintln!(
                "--- voicegate log ---\n{log}\n--- asterisk log ---\n{}",
                ast.log()
            );
            panic!("{name}: {what}");
        }
    };
    let heard = ast.heard(&call.name);
    let said = fixture_samples();
    let echoed =
        std::panic::catch_unwind(|| assert_echo(&name, &heard, &said, ECHO_MS * 8, ECHO_SEARCH));
    explain(echoed.is_ok(), "no echo");
    // At voicegate's socket: the gaps between its sends.
    let p50 = log_field(&log, "rtp stream ended", "send_gap_p50_ms").unwrap_or(f64::NAN);
    let p99 = log_field(&log, "rtp stream ended", "send_gap_p99_ms").unwrap_or(f64::NAN);
    let p1 = log_field(&log, "rtp stream ended", "send_gap_p1_ms").unwrap_or(f64::NAN);
    let gaps = log_field(&log, "rtp stream ended", "send_gaps").unwrap_or(0.0);
    let mean = log_field(&log, "rtp stream ended", "send_gap_mean_ms").unwrap_or(f64::NAN);
    eprintln!(
        "{name}: voicegate pacing at its socket: {gaps} gaps, p1 {p1:.2} ms, p50 {p50:.2} ms, \
         p99 {p99:.2} ms, mean {mean:.3} ms"
    );
    explain(gaps > 100.0, "too few packets sent");
    explain(
        (19.0..=21.0).contains(&p50),
        "p50 send gap outside 20 ± 1 ms",
    );
    explain(
        (19.5..=20.5).contains(&mean),
        "mean send gap outside 20 ± 0.5 ms (frames lost, doubled or paced at another rate)",
    );
    explain(p99 <= 40.0, "p99 send gap over a frame late (40 ms)");
    let records = vg.wait_records(1, Duration::from_secs(5)).await;
    explain(
        records[0].outcome == "completed",
        "the record's outcome is not completed",
    );
    let metrics = vg.metrics().await;
    let sent = metrics
        .lines()
        .find(|l| l.starts_with("voicegate_rtp_packets_total{direction=\"out\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    explain(
        sent > 100.0,
        "voicegate_rtp_packets_total{direction=\"out\"} not counted",
    );
    let errors = ast.errors();
    explain(errors.is_empty(), &format!("Asterisk errors: {errors:#?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn stasis_rtp_alaw_echoes_the_callers_speech() {
    rtp_echo_call("alaw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn stasis_rtp_ulaw_echoes_the_callers_speech() {
    rtp_echo_call("ulaw").await;
}

/// One Stasis echo call with `media = "websocket"` (issue 16): Asterisk creates a
/// `WebSocket/INCOMING` channel for externalMedia (`transport=websocket`,
/// `connection_type=server`), voicegate connects to Asterisk's own
/// `/media/<MEDIA_WEBSOCKET_CONNECTION_ID>` and the call runs as every other: the caller
/// hears their own speech back (window by window), the record says `completed`, the call is
/// counted under `transport="websocket"`, and nothing is left behind (no channel, no bridge).
async fn ws_externalmedia_echo_call(format: &'static str) {
    let name = format!("ariws_{format}");
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for(&name).await else {
        return;
    };
    let (audiosocket, health) = Voicegate::ports();
    let ast = Asterisk::start(&prefix, &name, globals(audiosocket, health)).await;
    let extra = format!(
        "{}{}media = \"websocket\"\n",
        echo_agent(),
        ari(&ast, audiosocket, format)
    );
    let vg = Voicegate::start_on(&name, audiosocket, health, &extra).await;
    ast.wait_app_registered().await;
    let call = TestCall::new(&name, "stasis");
    let ch = ast.originate(&call).await;
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    ast.wait_no_channels(Duration::from_secs(10)).await;
    let log = vg.log.lock().unwrap().clone();
    let explain = |ok: bool, what: &str| {
        if !ok {
            eprintln!(
                "--- voicegate log ---\n{log}\n--- asterisk log ---\n{}",
                ast.log()
            );
            panic!("{name}: {what}");
        }
    };
    let heard = ast.heard(&call.name);
    let said = fixture_samples();
    let echoed =
        std::panic::catch_unwind(|| assert_echo(&name, &heard, &said, ECHO_MS * 8, ECHO_SEARCH));
    explain(echoed.is_ok(), "no echo");
    explain(
        log.contains("websocket media connected") && log.contains("transport=\"websocket\""),
        "the call did not run over the media WebSocket",
    );
    let records = vg.wait_records(1, Duration::from_secs(5)).await;
    explain(
        records[0].outcome == "completed",
        "the record's outcome is not completed",
    );
    explain(
        records[0].caller_number.as_deref() == Some(call.number.as_str()),
        "the caller's number did not reach the record",
    );
    let metrics = vg.metrics().await;
    explain(
        metrics.contains("voicegate_calls_by_transport_total{transport=\"websocket\"} 1"),
        "not counted under transport=websocket",
    );
    let line = log.lines().find(|l| l.contains("chan_websocket playout"));
    eprintln!("{name}: {}", line.unwrap_or("no playout line"));
    let bridges = ast
        .ari(reqwest::Method::GET, "/bridges", &[])
        .await
        .unwrap();
    explain(bridges == serde_json::json!([]), "bridges left");
    let errors = ast.errors();
    explain(errors.is_empty(), &format!("Asterisk errors: {errors:#?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn stasis_websocket_slin16_echoes_the_callers_speech() {
    ws_externalmedia_echo_call("slin16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn stasis_websocket_slin_echoes_the_callers_speech() {
    ws_externalmedia_echo_call("slin").await;
}

/// `Dial(WebSocket/INCOMING/...)` from the project's dialplan (`VOICEGATE_MODE=websocket-in`,
/// issue 16): the pre-dial handler announces `MEDIA_WEBSOCKET_CONNECTION_ID` to voicegate's
/// `POST /v1/websocket/<id>`, voicegate connects to Asterisk's `/media/<id>`, and the caller
/// hears their own speech back (window by window); the record says `completed` with the
/// caller's number from the announcement, the call is counted under `transport="websocket"`,
/// and no channel is left. With voicegate's allowlist refusing nothing but its HTTP side
/// down, the caller reaches the operators at once (the handler hangs the channel up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn websocket_incoming_dial_echoes_the_callers_speech() {
    let name = "wsin";
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for(name).await else {
        return;
    };
    let (audiosocket, health) = Voicegate::ports();
    let mut setup = globals(audiosocket, health);
    for (k, v) in [
        ("VOICEGATE_WS_CODEC", "slin16"),
        ("VOICEGATE_WS_FORMAT", "json"),
    ] {
        setup.globals.push((k.into(), v.into()));
    }
    let ast = Asterisk::start(&prefix, name, setup).await;
    let ws = format!("127.0.0.1:{}", real_asterisk_support::free_port());
    let extra = format!(
        "{}[websocket]\nlisten = \"{ws}\"\nasterisk_url = \"{}\"\n",
        echo_agent(),
        ast.url()
    );
    let mut vg = Voicegate::start_on(name, audiosocket, health, &extra).await;
    let call = TestCall::new(name, "websocket-in");
    let ch = ast.originate(&call).await;
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    ast.wait_no_channels(Duration::from_secs(10)).await;
    let log = vg.log.lock().unwrap().clone();
    let explain = |ok: bool, what: &str| {
        if !ok {
            eprintln!(
                "--- voicegate log ---\n{log}\n--- asterisk log ---\n{}",
                ast.log()
            );
            panic!("{name}: {what}");
        }
    };
    let said = fixture_samples();
    let echoed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_echo(
            name,
            &ast.heard(&call.name),
            &said,
            ECHO_MS * 8,
            ECHO_SEARCH,
        )
    }));
    explain(echoed.is_ok(), "no echo");
    explain(
        log.contains("chan_websocket INCOMING call connected"),
        "voicegate did not connect to /media",
    );
    let records = vg.wait_records(1, Duration::from_secs(5)).await;
    explain(
        records[0].outcome == "completed",
        "the record's outcome is not completed",
    );
    explain(
        records[0].caller_number.as_deref() == Some(call.number.as_str()),
        "the caller's number did not come with the announcement",
    );
    let metrics = vg.metrics().await;
    explain(
        metrics.contains("voicegate_calls_by_transport_total{transport=\"websocket\"} 1"),
        "not counted under transport=websocket",
    );
    explain(
        ast.operator_log().is_empty(),
        "the caller went to the operators",
    );
    let errors = ast.errors();
    explain(errors.is_empty(), &format!("Asterisk errors: {errors:#?}"));
    // voicegate down: the announcement fails, the handler hangs the waiting channel up and
    // the caller reaches the operators well before the Dial's 10 s backstop.
    vg.stop();
    let down = TestCall::new("wsin-down", "websocket-in");
    let started = Instant::now();
    let ch = ast.originate(&down).await;
    ast.wait_operator_calls(1, Duration::from_secs(8), "websocket-in")
        .await;
    let took = started.elapsed();
    eprintln!("{name}: voicegate down, operators after {took:?}");
    explain(
        took < Duration::from_secs(5),
        "the caller waited for the Dial timeout",
    );
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
}

/// A failing agent (its provider unreachable): the caller reaches the operators' queue
/// member within 2 s of the call starting, in `mode`, and the record says why.
async fn failing_agent_reaches_operators(mode: &'static str) {
    let Some((prefix, _slot)) =
        real_asterisk_support::asterisk_for(&format!("failing_agent_{mode}")).await
    else {
        return;
    };
    let stasis = (mode == "stasis").then_some("slin16");
    let closed = real_asterisk_support::refusing_port();
    let agent = failing_agent(&closed);
    let rig = Rig::start(&prefix, &format!("fail-{mode}"), stasis, &agent).await;
    let (ast, vg) = (&rig.ast, &rig.vg);
    let call = TestCall::new(&format!("fail-{mode}"), mode);
    let started = Instant::now();
    let ch = ast.originate(&call).await;
    ast.wait_operator_calls(1, Duration::from_secs(10), mode)
        .await;
    let took = started.elapsed();
    eprintln!("{mode}: failing agent → operator answered in {took:?}");
    assert!(took < Duration::from_secs(2), "{mode}: {took:?}");
    assert_eq!(ast.operator_log(), vec![call.number.clone()]);
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    let records = vg.wait_records(1, Duration::from_secs(5)).await;
    assert_eq!(records[0].outcome, "fallback", "{:?}", records[0]);
    assert!(
        records[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("cannot connect to openai_realtime")),
        "{:?}",
        records[0]
    );
    if mode != "stasis" {
        // The dialplan asked voicegate what next (CURL) and got the operators.
        assert!(
            ast.log().contains("voicegate next: \"operator\""),
            "{}",
            ast.log()
        );
    }
    let metrics = vg.metrics().await;
    assert!(
        metrics.contains("voicegate_fallbacks_total{reason=\"agent_failed\"} 1"),
        "{metrics}"
    );
    let errors = ast.errors();
    assert!(errors.is_empty(), "Asterisk errors: {errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn failing_agent_mode1_reaches_the_operators() {
    failing_agent_reaches_operators("app").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn failing_agent_mode2_reaches_the_operators() {
    failing_agent_reaches_operators("driver").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn failing_agent_mode3_reaches_the_operators() {
    failing_agent_reaches_operators("stasis").await;
}

/// voicegate not running: modes 1 and 2 still reach the operators (`TryExec` fails,
/// `DIALSTATUS=CHANUNAVAIL`), and so does mode 3 (`STASISSTATUS=FAILED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn voicegate_down_every_mode_reaches_the_operators() {
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("voicegate_down").await else {
        return;
    };
    let (audiosocket, health) = Voicegate::ports();
    let ast = Asterisk::start(&prefix, "down", globals(audiosocket, health)).await;
    for (i, mode) in ["app", "driver", "stasis"].into_iter().enumerate() {
        let call = TestCall::new(&format!("down-{mode}"), mode);
        let ch = ast.originate(&call).await;
        ast.wait_operator_calls(i + 1, Duration::from_secs(5), mode)
            .await;
        assert_eq!(ast.operator_log()[i], call.number);
        ast.wait_gone(&ch, Duration::from_secs(20)).await;
        ast.wait_no_channels(Duration::from_secs(10)).await;
    }
    // Mode 1 logs AudioSocket's own connection ERROR: that is Asterisk reporting voicegate
    // down, not a config error; nothing else may be an ERROR.
    let errors: Vec<_> = ast
        .errors()
        .into_iter()
        .filter(|l| !l.contains("app_audiosocket.c") && !l.contains("res_audiosocket.c"))
        .collect();
    assert!(errors.is_empty(), "Asterisk errors: {errors:#?}");
}

/// DTMF sent by the caller (`SendDTMF(123#)` after the recording) reaches the agent
/// exactly once per digit, in every mode (in Stasis mode Asterisk reports each digit twice:
/// as AudioSocket `0x03` on the media leg and as ARI `ChannelDtmfReceived`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn dtmf_reaches_the_agent_once_per_digit_in_every_mode() {
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("dtmf").await else {
        return;
    };
    for mode in ["app", "driver", "stasis"] {
        let stasis = (mode == "stasis").then_some("slin16");
        let rig = Rig::start(&prefix, &format!("dtmf-{mode}"), stasis, &echo_agent()).await;
        let mut call = TestCall::new(&format!("dtmf-{mode}"), mode);
        call.dtmf = "123#".into();
        let ch = rig.ast.originate(&call).await;
        rig.ast.wait_gone(&ch, Duration::from_secs(20)).await;
        let records = rig.vg.wait_records(1, Duration::from_secs(5)).await;
        assert_eq!(records[0].dtmf, "123#", "{mode}: {:?}", records[0]);
    }
}

/// Stasis mode at the real Asterisk's pace: 20 calls in a row and 10 at once all bridge and
/// echo (none handed to the operators by the externalMedia race), and afterwards Asterisk
/// has no bridge and no channel left.
///
/// The longest scenario (about 75 s: 30 calls at the real pace), so it takes no slot and
/// runs beside the others from the start (its name sorts first; libtest starts tests in
/// name order). One echo call at a time is light, and its checks (the echo within
/// ±100 ms, the records, what Asterisk has left) do not depend on the machine's load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn calls_in_a_row_and_at_once_in_stasis_all_bridge_and_leave_nothing() {
    let Some(prefix) = real_asterisk_support::asterisk_prefix("stasis_many") else {
        return;
    };
    let in_a_row: usize = std::env::var("VOICEGATE_STASIS_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let rig = Rig::start(&prefix, "many", Some("slin"), &echo_agent()).await;
    let (ast, vg) = (&rig.ast, &rig.vg);
    let said = fixture_samples();
    for i in 0..in_a_row {
        let mut call = TestCall::new(&format!("row{i}"), "stasis");
        call.wait_s = 1.0;
        let ch = ast.originate(&call).await;
        ast.wait_gone(&ch, Duration::from_secs(20)).await;
        ast.wait_no_channels(Duration::from_secs(10)).await;
        let heard = ast.heard(&call.name);
        rig.explain_on_panic(|| assert_echo(&call.name, &heard, &said, ECHO_MS * 8, ECHO_SEARCH));
    }
    let mut calls = Vec::new();
    for i in 0..10 {
        let mut call = TestCall::new(&format!("once{i}"), "stasis");
        call.wait_s = 1.0;
        let ch = ast.originate(&call).await;
        calls.push((call, ch));
    }
    for (_, ch) in &calls {
        ast.wait_gone(ch, Duration::from_secs(30)).await;
    }
    ast.wait_no_channels(Duration::from_secs(10)).await;
    for (call, _) in &calls {
        assert_echo(
            &call.name,
            &ast.heard(&call.name),
            &said,
            ECHO_MS * 8,
            ECHO_SEARCH,
        );
    }
    let records = vg
        .wait_records(in_a_row + 10, Duration::from_secs(10))
        .await;
    let completed = records.iter().filter(|r| r.outcome == "completed").count();
    eprintln!(
        "stasis: {completed} of {} calls completed with the agent",
        records.len()
    );
    assert_eq!(completed, in_a_row + 10, "{records:#?}");
    assert!(ast.operator_log().is_empty(), "{:?}", ast.operator_log());
    let bridges = ast
        .ari(reqwest::Method::GET, "/bridges", &[])
        .await
        .unwrap();
    assert_eq!(bridges, serde_json::json!([]), "bridges left");
    assert!(
        ast.cli("core show channels").contains("0 active channels"),
        "{}",
        ast.cli("core show channels")
    );
    let errors = ast.errors();
    assert!(errors.is_empty(), "Asterisk errors: {errors:#?}");
}

/// A 14 s call in mode 1: the echo's delay stays within ±30 ms of the configured delay over
/// the whole call (issue 12: late frames from Asterisk used to add up to +80 ms of lag).
/// Run it with a parallel build on the machine to see it hold under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn long_echo_call_keeps_its_delay() {
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("long_echo").await else {
        return;
    };
    let rig = Rig::start(&prefix, "long", None, &echo_agent()).await;
    // 14 s of real speech: the three fixtures, over and over, each padded to whole frames.
    let mut speech = Vec::new();
    while speech.len() < 14 * 8_000 {
        for f in ["hello-world.wav", "auth-thankyou.wav", "vm-goodbye.wav"] {
            let mut s = read_wav(&repo().join("tests/fixtures").join(f));
            s.resize(s.len().div_ceil(160) * 160, 0);
            speech.extend(s);
        }
    }
    speech.truncate(14 * 8_000);
    let wav = rig.ast.dir.0.join("long-speech.wav");
    real_asterisk_support::write_wav(&wav, &speech);
    let mut call = TestCall::new("long", "app");
    call.wav = wav.with_extension("");
    call.wait_s = 1.0;
    let ch = rig.ast.originate(&call).await;
    rig.ast.wait_gone(&ch, Duration::from_secs(40)).await;
    rig.ast.wait_no_channels(Duration::from_secs(10)).await;
    let heard = rig.ast.heard("long");
    let matches = rig.explain_on_panic(|| assert_echo("long", &heard, &speech, ECHO_MS * 8, 400));
    let lags: Vec<i64> = matches.iter().map(|(_, l)| *l as i64 / 8).collect();
    let (lo, hi) = (lags.iter().min().unwrap(), lags.iter().max().unwrap());
    eprintln!("long: echo delay over 14 s: {lo}..{hi} ms (configured {ECHO_MS} ms)");
    rig.explain_on_panic(|| {
        for (i, l) in lags.iter().enumerate() {
            assert!(
                (l - ECHO_MS as i64).abs() <= 30,
                "window {i}: echo delay {l} ms, configured {ECHO_MS} ms: {lags:?}"
            );
        }
    });
}

/// The maintenance switch (`[fallback] maintenance = true`): in modes 1 and 2 voicegate ends
/// the session at once and the dialplan asks `/v1/calls/{id}/next` through `CURL()`; in
/// Stasis mode voicegate `continue`s the caller at once with nothing set up. Every caller
/// reaches the operators and the record says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn maintenance_sends_every_mode_to_the_operators() {
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("maintenance").await else {
        return;
    };
    let agent = format!("{}[fallback]\nmaintenance = true\n", echo_agent());
    let rig = Rig::start(&prefix, "maint", Some("slin16"), &agent).await;
    for (i, mode) in ["app", "driver", "stasis"].into_iter().enumerate() {
        let call = TestCall::new(&format!("maint-{mode}"), mode);
        let ch = rig.ast.originate(&call).await;
        rig.ast
            .wait_operator_calls(i + 1, Duration::from_secs(5), mode)
            .await;
        rig.ast.wait_gone(&ch, Duration::from_secs(20)).await;
        rig.ast.wait_no_channels(Duration::from_secs(10)).await;
    }
    // The dialplan's question and voicegate's answer, as Asterisk logged them.
    let next = rig
        .ast
        .log()
        .matches("voicegate next: \"operator\"")
        .count();
    assert_eq!(next, 2, "{}", rig.ast.log());
    let records = rig.vg.wait_records(3, Duration::from_secs(5)).await;
    for r in &records {
        assert_eq!(r.outcome, "fallback", "{r:?}");
        assert_eq!(r.detail.as_deref(), Some("maintenance"), "{r:?}");
    }
    // Stasis: the caller went to the operators at once, with no bridge and no media channel
    // (nothing was created to be left over), and the metrics say why.
    assert!(!rig.vg.log.lock().unwrap().contains("stasis call bridged"));
    let metrics = rig.vg.metrics().await;
    assert!(
        metrics.contains("voicegate_fallbacks_total{reason=\"maintenance\"} 3"),
        "{metrics}"
    );
}

/// The OpenAI Realtime agent through the real Asterisk (mode 1, G.711 μ-law on the wire),
/// against the fake Realtime server: the caller hears the reply; when the server's VAD says
/// the caller started speaking, the playout stops at once and voicegate truncates the reply
/// at what the caller heard, and what the caller heard ends there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn openai_realtime_reply_is_heard_and_a_barge_in_truncates_it() {
    use fake_openai::FakeOpenAi;
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("openai_barge_in").await else {
        return;
    };
    let fake = FakeOpenAi::bind(OPENAI_KEY).await;
    let agent = openai_agent(&fake.url, "instructions = \"You are a test agent.\"\n");
    let rig = Rig::start(&prefix, "openai", None, &agent).await;
    // The reply: 4.5 s of real speech the caller can be checked against.
    let mut call = TestCall::new("openai", "app");
    call.wait_s = 5.0;
    let (ch, reply, truncate, _c) = reply_then_barge_in(&rig.ast, &fake, &call).await;
    assert_eq!(truncate["item_id"], "item_a1", "{truncate}");
    let heard_ms = truncate["audio_end_ms"].as_u64().expect("audio_end_ms");
    eprintln!("openai: reply truncated at {heard_ms} ms");
    assert!(
        (1_000..=2_200).contains(&heard_ms),
        "heard {heard_ms} ms of the reply"
    );
    rig.ast.wait_gone(&ch, Duration::from_secs(20)).await;
    rig.ast.wait_no_channels(Duration::from_secs(10)).await;
    let heard = rig.ast.heard("openai");
    // What the caller heard is the reply up to the truncation, and not past it: find the
    // reply's start, then compare window by window.
    let first = &reply[..1_600];
    let (corr, at) =
        voicegate::caller::best_correlation(&heard, first, heard.len().saturating_sub(1_600));
    assert!(corr > 0.9, "the reply reached the caller: corr {corr}");
    assert!(at >= 0, "reply found at {at}");
    let heard_part = &heard[at as usize..];
    let cut = heard_ms as usize * 8;
    // Lags tracked within 50 ms per window: a late tick on a loaded machine shifts the rest.
    let before =
        real_asterisk_support::window_matches(heard_part, &reply[..cut - 800], 8_000, 0, 400);
    let after = real_asterisk_support::window_matches(
        heard_part,
        &reply[cut + 1_600..],
        8_000,
        cut + 1_600,
        400,
    );
    let good = |m: &[(f64, isize)]| m.iter().filter(|(c, _)| *c >= 0.8).count();
    eprintln!(
        "openai: before the cut {}/{} windows heard, after it {}/{}",
        good(&before),
        before.len(),
        good(&after),
        after.len()
    );
    // All but one window: a late tick on a loaded machine may garble one.
    assert!(good(&before) + 1 >= before.len(), "{before:?}");
    assert_eq!(
        good(&after),
        0,
        "audio after the truncation reached the caller: {after:?}"
    );
}

/// Barge-in over RTP (issue 16): a Stasis call with `media = "rtp"` in μ-law, the fake OpenAI
/// Realtime server as the model. Its 4.5 s reply reaches the caller; 1.5 s in, the server
/// says the caller started speaking; voicegate cuts the playout at once (nothing is queued
/// below the call core on RTP) and truncates the reply at what was heard: the caller hears
/// the reply up to `audio_end_ms` and nothing after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn rtp_barge_in_truncates_the_openai_reply_at_what_was_heard() {
    use fake_openai::FakeOpenAi;
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("rtp_barge_in").await else {
        return;
    };
    let fake = FakeOpenAi::bind(OPENAI_KEY).await;
    let (audiosocket, health) = Voicegate::ports();
    let ast = Asterisk::start(&prefix, "rtpbarge", globals(audiosocket, health)).await;
    let agent = openai_agent(&fake.url, "instructions = \"You are a test agent.\"\n");
    let extra = format!("{agent}{}", ari_rtp(&ast, audiosocket, "ulaw"));
    let vg = Voicegate::start_on("rtpbarge", audiosocket, health, &extra).await;
    ast.wait_app_registered().await;
    let mut call = TestCall::new("rtpbarge", "stasis");
    call.wait_s = 5.0;
    let (ch, reply, truncate, _c) = reply_then_barge_in(&ast, &fake, &call).await;
    assert_eq!(truncate["item_id"], "item_a1", "{truncate}");
    let heard_ms = truncate["audio_end_ms"].as_u64().expect("audio_end_ms");
    eprintln!("rtpbarge: reply truncated at {heard_ms} ms");
    assert!(
        (1_000..=2_200).contains(&heard_ms),
        "heard {heard_ms} ms of the reply"
    );
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    ast.wait_no_channels(Duration::from_secs(10)).await;
    let heard = ast.heard("rtpbarge");
    let first = &reply[..1_600];
    let (corr, at) =
        voicegate::caller::best_correlation(&heard, first, heard.len().saturating_sub(1_600));
    assert!(
        corr > 0.9,
        "the reply reached the caller: corr {corr}\n{}",
        vg.log.lock().unwrap()
    );
    assert!(at >= 0, "reply found at {at}");
    let heard_part = &heard[at as usize..];
    let cut = heard_ms as usize * 8;
    let before =
        real_asterisk_support::window_matches(heard_part, &reply[..cut - 800], 8_000, 0, 400);
    let after = real_asterisk_support::window_matches(
        heard_part,
        &reply[cut + 1_600..],
        8_000,
        cut + 1_600,
        400,
    );
    let good = |m: &[(f64, isize)]| m.iter().filter(|(c, _)| *c >= 0.8).count();
    eprintln!(
        "rtpbarge: before the cut {}/{} windows heard, after it {}/{}",
        good(&before),
        before.len(),
        good(&after),
        after.len()
    );
    assert!(good(&before) + 1 >= before.len(), "{before:?}");
    assert_eq!(
        good(&after),
        0,
        "audio after the truncation reached the caller: {after:?}"
    );
}

/// The agent's built-in tools through the real Asterisk, with the fake OpenAI Realtime
/// server as the model: it says goodbye, then calls `transfer_to_operator` or `hangup` at
/// once. The words are heard in full first; then the caller is in the operators' queue
/// (modes 1 and 3), or hung up (long before its own end).
async fn tool_ends_the_call(mode: &'static str, tool: &'static str) {
    use fake_openai::FakeOpenAi;
    let Some((prefix, _slot)) =
        real_asterisk_support::asterisk_for(&format!("tool_{tool}_{mode}")).await
    else {
        return;
    };
    let fake = FakeOpenAi::bind(OPENAI_KEY).await;
    let agent = openai_agent(
        &fake.url,
        "[[tools]]\nkind = \"transfer_to_operator\"\n[[tools]]\nkind = \"hangup\"\n",
    );
    // Stasis at 8 kHz: the agent talks G.711 μ-law like in mode 1.
    let stasis = (mode == "stasis").then_some("slin");
    let rig = Rig::start(&prefix, &format!("{tool}-{mode}"), stasis, &agent).await;
    let goodbye = read_wav(&repo().join("tests/fixtures/vm-goodbye.wav"));
    let mut call = TestCall::new(&format!("{tool}-{mode}"), mode);
    call.wait_s = 8.0;
    let t0 = tokio::time::Instant::now();
    let started = Instant::now();
    let ch = rig.ast.originate(&call).await;
    let (_, conn) = fake.accept(None, t0).await;
    let mut c = conn.expect("upgrade accepted");
    let update = open_session(&mut c).await;
    let names: Vec<_> = update["session"]["tools"]
        .as_array()
        .expect("tools declared")
        .iter()
        .map(|t| t["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(names.contains(&tool.to_owned()), "{names:?}");
    c.wait_for_audio_ms(500).await;
    c.reply(
        "resp_1",
        "item_a1",
        &fake_openai::to_wire(&goodbye, ULAW),
        800,
        "Goodbye.",
    )
    .await;
    let call_item = serde_json::json!({"id": "item_f1", "type": "function_call", "status": "completed",
        "call_id": "call_1", "name": tool, "arguments": "{}"});
    c.send(serde_json::json!({"type": "response.created", "response": {"id": "resp_2", "status": "in_progress", "output": []}})).await;
    c.send(serde_json::json!({"type": "response.output_item.added", "response_id": "resp_2", "output_index": 0, "item": call_item})).await;
    c.send(serde_json::json!({"type": "response.function_call_arguments.done", "response_id": "resp_2", "item_id": "item_f1",
        "output_index": 0, "call_id": "call_1", "name": tool, "arguments": "{}"})).await;
    c.send(serde_json::json!({"type": "response.done", "response": {"id": "resp_2", "status": "completed", "output": [call_item]}})).await;
    rig.ast.wait_gone(&ch, Duration::from_secs(20)).await;
    let gone_after = started.elapsed();
    rig.ast.wait_no_channels(Duration::from_secs(10)).await;
    let heard = rig.ast.heard(&call.name);
    // The goodbye was heard in full before the call moved on.
    let (corr, at) = voicegate::caller::best_correlation(&heard, &goodbye[..4_000], heard.len());
    assert!(corr > 0.9 && at >= 0, "goodbye not heard: corr {corr}");
    rig.explain_on_panic(|| {
        real_asterisk_support::assert_echo(tool, &heard[at as usize..], &goodbye, 0, 80)
    });
    let records = rig.vg.wait_records(1, Duration::from_secs(5)).await;
    let r = &records[0];
    match tool {
        "transfer_to_operator" => {
            assert_eq!(rig.ast.operator_log(), vec![call.number.clone()], "{r:?}");
            assert_eq!(r.outcome, "transferred", "{r:?}");
        }
        _ => {
            assert!(rig.ast.operator_log().is_empty());
            assert_eq!(r.outcome, "agent_ended", "{r:?}");
            // Hung up by voicegate, not by the caller's own end (8 s after the playback).
            assert!(gone_after < Duration::from_secs(8), "{gone_after:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn transfer_tool_mode1_puts_the_caller_in_the_queue() {
    tool_ends_the_call("app", "transfer_to_operator").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn transfer_tool_mode3_puts_the_caller_in_the_queue() {
    tool_ends_the_call("stasis", "transfer_to_operator").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn hangup_tool_mode1_hangs_up_after_the_goodbye() {
    tool_ends_the_call("app", "hangup").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn hangup_tool_mode3_hangs_up_after_the_goodbye() {
    tool_ends_the_call("stasis", "hangup").await;
}

/// A Stasis setup that fails for real: `external_host` points where nothing listens, so
/// Asterisk answers `externalMedia` with 500. The caller reaches the operators, and the call
/// is recorded and counted as a fallback with the reason, not as a completed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn failed_stasis_setup_is_recorded_as_a_fallback_with_its_reason() {
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("failed_setup").await else {
        return;
    };
    let (audiosocket, health) = Voicegate::ports();
    let ast = Asterisk::start(&prefix, "setup", globals(audiosocket, health)).await;
    let closed = real_asterisk_support::refusing_port();
    let extra = format!("{}{}", echo_agent(), ari(&ast, closed.addr, "slin16"));
    let vg = Voicegate::start_on("setup", audiosocket, health, &extra).await;
    ast.wait_app_registered().await;
    let call = TestCall::new("setup", "stasis");
    let ch = ast.originate(&call).await;
    ast.wait_operator_calls(1, Duration::from_secs(5), "setup")
        .await;
    assert_eq!(ast.operator_log(), vec![call.number.clone()]);
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    let records = vg.wait_records(1, Duration::from_secs(5)).await;
    let r = &records[0];
    assert_eq!(r.outcome, "fallback", "{r:?}");
    assert!(
        r.detail
            .as_deref()
            .is_some_and(|d| d.starts_with("stasis setup failed") && d.contains("externalMedia")),
        "{r:?}"
    );
    let metrics = vg.metrics().await;
    assert!(
        metrics.contains("voicegate_fallbacks_total{reason=\"setup_failed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("voicegate_calls_total{outcome=\"fallback\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("voicegate_calls_total{outcome=\"completed\"}"),
        "{metrics}"
    );
}

/// Many boxes (docs/many-boxes.md): two voicegate instances behind one Asterisk dialplan
/// (`[voicegate-pair]` in asterisk/extensions.conf, mode 1). Calls alternate between them;
/// box A is stopped (SIGTERM, as for an update) while it carries a call; no caller is lost:
/// the call in progress goes to the operators when A's shutdown grace ends, and every later
/// call is served by box B, also the one the round robin sent to A (the dialplan fails over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn two_boxes_behind_one_dialplan_lose_no_call_when_one_stops() {
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("two_boxes").await else {
        return;
    };
    let (a_as, a_http) = Voicegate::ports();
    let (b_as, b_http) = Voicegate::ports();
    let setup = AsteriskSetup {
        globals: vec![
            ("VOICEGATE_HOST".into(), a_as.to_string()),
            ("VOICEGATE_HTTP".into(), a_http.to_string()),
            ("VOICEGATE_HOST_B".into(), b_as.to_string()),
            ("VOICEGATE_HTTP_B".into(), b_http.to_string()),
        ],
        extra_dialplan: String::new(),
    };
    let ast = Asterisk::start(&prefix, "pair", setup).await;
    let mut a = Voicegate::start_on("pair-a", a_as, a_http, &echo_agent()).await;
    let b = Voicegate::start_on("pair-b", b_as, b_http, &echo_agent()).await;
    let said = fixture_samples();
    let served = |name: &str| {
        let call = TestCall::new(name, "pair");
        (call.number.clone(), call)
    };
    // Both boxes up: the round robin sends call 1 to B, call 2 to A; each echoes.
    for (i, name) in ["pair-one", "pair-two"].into_iter().enumerate() {
        let (_, call) = served(name);
        let ch = ast.originate(&call).await;
        ast.wait_gone(&ch, Duration::from_secs(20)).await;
        ast.wait_no_channels(Duration::from_secs(10)).await;
        assert_echo(name, &ast.heard(name), &said, ECHO_MS * 8, ECHO_SEARCH);
        let box_ = if i == 0 { &b } else { &a };
        box_.wait_records(1, Duration::from_secs(5)).await;
    }
    assert_eq!((a.records().len(), b.records().len()), (1, 1));
    // Call 3 to B; call 4 to A, which is stopped while it carries it.
    let (_, three) = served("pair-three");
    let ch = ast.originate(&three).await;
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    ast.wait_no_channels(Duration::from_secs(10)).await;
    let (four_number, mut four) = served("pair-four");
    four.wait_s = 6.0;
    let ch4 = ast.originate(&four).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.metrics().await.contains("voicegate_calls_active 1") {
        assert!(Instant::now() < deadline, "call 4 never reached box A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop();
    ast.wait_operator_calls(1, Duration::from_secs(10), "call 4 after box A stopped")
        .await;
    assert_eq!(ast.operator_log(), vec![four_number]);
    ast.wait_gone(&ch4, Duration::from_secs(20)).await;
    ast.wait_no_channels(Duration::from_secs(10)).await;
    // Box A is down: call 5 (B's turn) and call 6 (A's turn, failed over) both reach B.
    for name in ["pair-five", "pair-six"] {
        let (_, call) = served(name);
        let ch = ast.originate(&call).await;
        ast.wait_gone(&ch, Duration::from_secs(20)).await;
        ast.wait_no_channels(Duration::from_secs(10)).await;
        assert_echo(name, &ast.heard(name), &said, ECHO_MS * 8, ECHO_SEARCH);
    }
    let records = b.wait_records(4, Duration::from_secs(5)).await;
    assert!(
        records.iter().all(|r| r.outcome == "completed"),
        "{records:?}\n--- box B's log ---\n{}\n--- asterisk log ---\n{}",
        b.log.lock().unwrap(),
        ast.log()
    );
    assert_eq!(a.records().len(), 2, "box A had calls 2 and 4");
    assert_eq!(
        ast.operator_log().len(),
        1,
        "only call 4 reached the operators"
    );
    // Box A, down, was skipped on its /health answer, before any AudioSocket() to it: a
    // refused AudioSocket connection in Asterisk 22.10.1 closes its socket twice, and the
    // second close can take another thread's file (here the caller leg's MixMonitor, whose
    // WAV data then reached box B in the middle of call 6's AudioSocket stream: 1 run in 5
    // under load before the health check).
    let log = ast.log();
    assert!(
        log.contains(r#"Return("Local/pair@vg-test-callee-"#) && log.contains(r#"", "DOWN")"#),
        "box A was not found down by its /health"
    );
    assert!(
        !log.contains("Failed to connect to AudioSocket service"),
        "an AudioSocket() was tried on the stopped box"
    );
    // Box A's stop ends call 4's AudioSocket from voicegate's side: Asterisk may log that
    // as an AudioSocket ERROR; nothing else may.
    let errors: Vec<_> = ast
        .errors()
        .into_iter()
        .filter(|l| !l.contains("app_audiosocket.c") && !l.contains("res_audiosocket.c"))
        .collect();
    assert!(errors.is_empty(), "Asterisk errors: {errors:#?}");
}

/// Mode 4, the WebSocket media channel: Asterisk set up with the project's dialplan and
/// `websocket_client.conf` (its uri moved to the test's voicegate), voicegate with
/// `[websocket]` and the same credentials. Returns both.
async fn websocket_rig(
    prefix: &std::path::Path,
    name: &str,
    codec: &str,
    control: &str,
    voicegate_extra: &str,
) -> (Asterisk, Voicegate) {
    let (audiosocket, health) = Voicegate::ports();
    let ws = format!("127.0.0.1:{}", real_asterisk_support::free_port());
    let mut setup = globals(audiosocket, health);
    for (k, v) in [
        ("VOICEGATE_WS_HOST", ws.as_str()),
        ("VOICEGATE_WS_CODEC", codec),
        ("VOICEGATE_WS_FORMAT", control),
    ] {
        setup.globals.push((k.into(), v.into()));
    }
    let ast = Asterisk::start(prefix, name, setup).await;
    let extra = format!(
        "{voicegate_extra}[websocket]\nlisten = \"{ws}\"\nusername = \"asterisk\"\npassword = \"change-me\"\n"
    );
    let vg = Voicegate::start_on(name, audiosocket, health, &extra).await;
    (ast, vg)
}

/// One echo call over `Dial(WebSocket/voicegate/c(<codec>)f(<control>)...)`: the caller hears
/// its own speech back, window by window; the record says websocket, the caller number
/// came through `v(caller=...)`, and Asterisk's playout queue stayed shallow (what the
/// marks measured).
async fn websocket_echo_call(codec: &'static str, control: &'static str) {
    let Some((prefix, _slot)) =
        real_asterisk_support::asterisk_for(&format!("websocket_echo_{codec}")).await
    else {
        return;
    };
    let name = format!("ws-{codec}");
    let (ast, vg) = websocket_rig(&prefix, &name, codec, control, &echo_agent()).await;
    let call = TestCall::new(&format!("echo-{name}"), "websocket");
    let ch = ast.originate(&call).await;
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    ast.wait_no_channels(Duration::from_secs(10)).await;
    let heard = ast.heard(&call.name);
    let said = fixture_samples();
    let explain = |check: &dyn Fn()| {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)).is_err() {
            eprintln!("--- voicegate log ---\n{}", vg.log.lock().unwrap());
            eprintln!("--- asterisk log ---\n{}", ast.log());
            panic!("{name} failed");
        }
    };
    explain(&|| {
        assert_echo(&name, &heard, &said, ECHO_MS * 8, ECHO_SEARCH);
    });
    let records = vg.wait_records(1, Duration::from_secs(5)).await;
    assert_eq!(records[0].outcome, "completed", "{:?}", records[0]);
    assert_eq!(
        records[0].caller_number.as_deref(),
        Some(call.number.as_str())
    );
    let log = vg.log.lock().unwrap().clone();
    assert!(log.contains(&format!("format={codec}")), "{log}");
    // The playout line: frames confirmed heard through MEDIA_MARK_PROCESSED, and how deep
    // Asterisk's queue got with voicegate pacing at 20 ms.
    let line = log
        .lines()
        .find(|l| l.contains("chan_websocket playout"))
        .expect("playout line");
    eprintln!("{name}: {line}");
    let field = |k: &str| -> u64 {
        let at = line
            .find(&format!("{k}="))
            .unwrap_or_else(|| panic!("{k} in {line}"));
        line[at + k.len() + 1..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(field("marks_processed") > 20, "{line}");
    assert!(field("frames_heard") + 10 >= field("frames_sent"), "{line}");
    // A paced sender keeps Asterisk's queue at a few frames (mark spacing included).
    assert!(field("playout_max_unconfirmed_frames") <= 12, "{line}");
    assert_eq!(field("frames_held_back"), 0, "{line}");
    let metrics = vg.metrics().await;
    assert!(
        metrics.contains("voicegate_calls_by_transport_total{transport=\"websocket\"} 1"),
        "{metrics}"
    );
    let errors = ast.errors();
    assert!(errors.is_empty(), "Asterisk errors: {errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn mode4_websocket_8k_plain_text_echoes_the_callers_speech() {
    websocket_echo_call("slin", "plain-text").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn mode4_websocket_16k_json_echoes_the_callers_speech() {
    websocket_echo_call("slin16", "json").await;
}

/// A stranger (voicegate's allowlist does not hold Asterisk's address) gets no upgrade, no
/// agent session and no record; Asterisk's Dial fails and the caller reaches the operators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn mode4_websocket_from_a_stranger_reaches_the_operators_without_a_session() {
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("websocket_stranger").await
    else {
        return;
    };
    let extra = format!("{}[guard]\nallow = [\"10.9.9.9/32\"]\n", echo_agent());
    let (ast, vg) = websocket_rig(&prefix, "ws-stranger", "slin16", "plain-text", &extra).await;
    let call = TestCall::new("ws-stranger", "websocket");
    let ch = ast.originate(&call).await;
    ast.wait_operator_calls(1, Duration::from_secs(10), "stranger")
        .await;
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(vg.records().is_empty(), "{:?}", vg.records());
    let log = vg.log.lock().unwrap().clone();
    assert!(!log.contains("call started"), "{log}");
    assert!(!log.contains("chan_websocket call"), "{log}");
    // (The health listener refuses strangers too, so /metrics is not asked here.)
    assert!(
        log.contains("connection from outside the allowlist closed"),
        "{log}"
    );
}

/// Barge-in over the WebSocket media channel, with the fake OpenAI Realtime server as the
/// agent: the reply is heard up to the barge-in, voicegate sends `FLUSH_MEDIA`, the
/// truncate says what was heard, and nothing of the reply after the cut reaches the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn mode4_websocket_barge_in_flushes_asterisks_queue_and_truncates() {
    use fake_openai::FakeOpenAi;
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("websocket_barge_in").await
    else {
        return;
    };
    let fake = FakeOpenAi::bind(OPENAI_KEY).await;
    let agent = openai_agent(&fake.url, "instructions = \"You are a test agent.\"\n");
    let (ast, vg) = websocket_rig(&prefix, "ws-barge", "slin", "plain-text", &agent).await;
    let mut call = TestCall::new("ws-barge", "websocket");
    call.wait_s = 5.0;
    let (ch, reply, truncate, _c) = reply_then_barge_in(&ast, &fake, &call).await;
    let heard_ms = truncate["audio_end_ms"].as_u64().expect("audio_end_ms");
    eprintln!("ws-barge: reply truncated at {heard_ms} ms");
    assert!(
        (1_000..=2_200).contains(&heard_ms),
        "heard {heard_ms} ms of the reply"
    );
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    ast.wait_no_channels(Duration::from_secs(10)).await;
    let heard = ast.heard("ws-barge");
    let (corr, at) = voicegate::caller::best_correlation(
        &heard,
        &reply[..1_600],
        heard.len().saturating_sub(1_600),
    );
    assert!(corr > 0.9, "the reply reached the caller: corr {corr}");
    let heard_part = &heard[at.max(0) as usize..];
    let cut = heard_ms as usize * 8;
    let before =
        real_asterisk_support::window_matches(heard_part, &reply[..cut - 800], 8_000, 0, 400);
    let after = real_asterisk_support::window_matches(
        heard_part,
        &reply[cut + 1_600..],
        8_000,
        cut + 1_600,
        400,
    );
    let good = |m: &[(f64, isize)]| m.iter().filter(|(c, _)| *c >= 0.8).count();
    eprintln!(
        "ws-barge: before the cut {}/{} windows heard, after it {}/{}",
        good(&before),
        before.len(),
        good(&after),
        after.len()
    );
    assert!(good(&before) + 1 >= before.len(), "{before:?}");
    assert_eq!(
        good(&after),
        0,
        "audio after the truncation reached the caller: {after:?}"
    );
    // voicegate told Asterisk to drop its queue at the barge-in; what that queue held
    // (unconfirmed frames at the flush) stays within a few frames when paced at 20 ms.
    let log = vg.log.lock().unwrap().clone();
    let line = log
        .lines()
        .find(|l| l.contains("chan_websocket playout"))
        .expect("playout line");
    eprintln!("ws-barge: {line}");
    let field = |k: &str| -> u64 {
        let at = line.find(&format!(" {k}=")).unwrap() + k.len() + 2;
        line[at..].split(' ').next().unwrap().parse().unwrap()
    };
    // One FLUSH_MEDIA per flush of the playout (the core may flush again at the reply's
    // end); each found at most the mark spacing plus a frame or two unconfirmed.
    assert!(field("flushes") >= 1, "{line}");
    assert!(field("frames_flushed") <= 7 * field("flushes"), "{line}");
}
/// Agent profiles in mode 4 against the real Asterisk: the shipped dialplan's
/// `[voicegate-websocket]` puts `profile=${VOICEGATE_PROFILE}` in the dial string's `v()`,
/// chan_websocket sends it in the URI query, and the call runs with that profile (its
/// record says so; with `unannounced = "refuse"` a lost profile would be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn mode4_websocket_v_profile_chooses_the_profile() {
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("websocket_profile").await
    else {
        return;
    };
    let (audiosocket, health) = Voicegate::ports();
    let ws = format!("127.0.0.1:{}", real_asterisk_support::free_port());
    let mut setup = globals(audiosocket, health);
    for (k, v) in [
        ("VOICEGATE_WS_HOST", ws.as_str()),
        ("VOICEGATE_WS_CODEC", "slin16"),
        ("VOICEGATE_WS_FORMAT", "json"),
        ("VOICEGATE_PROFILE", "sales"),
    ] {
        setup.globals.push((k.into(), v.into()));
    }
    let ast = Asterisk::start(&prefix, "ws-profile", setup).await;
    let config = format!(
        "{}[[profiles]]\nname = \"sales\"\nuse_tools = []\n[profiles.agent]\nkind = \"echo\"\n\
         delay_ms = 300\n[profiles.limits]\nmax_calls = 1\n\
         [profile_routing]\nunknown_profile = \"refuse\"\nunannounced = \"refuse\"\n\
         [websocket]\nlisten = \"{ws}\"\nusername = \"asterisk\"\npassword = \"change-me\"\n",
        echo_agent()
    );
    let vg = Voicegate::start_on("ws-profile", audiosocket, health, &config).await;
    let call = TestCall::new("profile-ws", "websocket");
    let ch = ast.originate(&call).await;
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    let records = vg.wait_records(1, Duration::from_secs(5)).await;
    if records[0].profile.as_deref() != Some("sales") {
        eprintln!("--- voicegate log ---\n{}", vg.log.lock().unwrap());
        eprintln!("--- asterisk log ---\n{}", ast.log());
    }
    let r = &records[0];
    assert_eq!(r.profile.as_deref(), Some("sales"), "{r:?}");
    assert_eq!(r.outcome, "completed", "{r:?}");
    assert_eq!(r.caller_number.as_deref(), Some(call.number.as_str()));
    let errors = ast.errors();
    assert!(errors.is_empty(), "Asterisk errors: {errors:#?}");
}

/// Agent profiles in mode 1 against the real Asterisk: with `VOICEGATE_ANNOUNCE=on` the
/// shipped dialplan's `[voicegate-announce]` POSTs the profile with `CURL()` before
/// `AudioSocket()`, and the call runs with it (its record says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_real_asterisk_passes_every_scenario_in_a_process_of_its_own"]
async fn mode1_announce_chooses_the_profile() {
    let Some((prefix, _slot)) = real_asterisk_support::asterisk_for("profile_announce").await
    else {
        return;
    };
    let (audiosocket, health) = Voicegate::ports();
    let probe = PacingProbe::start(audiosocket).await;
    let mut setup = globals(probe.addr, health);
    for (k, v) in [
        ("VOICEGATE_ANNOUNCE", "on"),
        ("VOICEGATE_PROFILE", "sales"),
        ("VOICEGATE_VAR_customer", "C 17"),
    ] {
        setup.globals.push((k.into(), v.into()));
    }
    let ast = Asterisk::start(&prefix, "app", setup).await;
    let config = format!(
        "{}[[profiles]]\nname = \"sales\"\n[profiles.agent]\nkind = \"echo\"\ndelay_ms = 300\n\
         [profile_routing]\nunknown_profile = \"refuse\"\nunannounced = \"refuse\"\n",
        echo_agent()
    );
    let vg = Voicegate::start_on("app", audiosocket, health, &config).await;
    let call = TestCall::new("profile-app", "app");
    let ch = ast.originate(&call).await;
    ast.wait_gone(&ch, Duration::from_secs(20)).await;
    let records = vg.wait_records(1, Duration::from_secs(5)).await;
    if records[0].profile.is_none() {
        eprintln!("--- voicegate log ---\n{}", vg.log.lock().unwrap());
        eprintln!("--- asterisk log ---\n{}", ast.log());
    }
    assert_eq!(
        records[0].profile.as_deref(),
        Some("sales"),
        "{:?}",
        records[0]
    );
    assert_eq!(records[0].outcome, "completed", "{:?}", records[0]);
    let errors = ast.errors();
    assert!(errors.is_empty(), "Asterisk errors: {errors:#?}");
}
