//! voicegate against a real Asterisk 22.10.1 (issue 12), on loopback: the project's own
//! `asterisk/` dialplan and configs, real recordings, and `voicegate run` itself. See
//! `tests/real_asterisk_support/mod.rs` for the set-up and how to point the tests at an
//! Asterisk of your own (`VOICEGATE_ASTERISK`).

#[path = "common/fake_openai.rs"]
mod fake_openai;
mod real_asterisk_support;
mod skip;

use real_asterisk_support::{
    Asterisk, AsteriskSetup, PacingProbe, TestCall, Voicegate, assert_echo, percentile, read_wav,
    repo,
};
use std::time::{Duration, Instant};

/// The echo agent's delay in these tests, ms.
const ECHO_MS: usize = 300;

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

/// The OpenAI Realtime agent pointed at a loopback port with nothing listening: it fails at
/// once, like a provider that is down.
fn failing_agent() -> String {
    let closed = real_asterisk_support::free_port();
    format!(
        "[agent]\nkind = \"openai_realtime\"\nurl = \"ws://127.0.0.1:{closed}/v1/realtime\"\n\
         api_key = \"sk-test-unreachable\"\n"
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
    let Some((prefix, _serial)) =
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
    assert_echo(mode, &heard, &said, ECHO_MS * 8, 800);
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
async fn mode1_app_echoes_the_callers_speech() {
    echo_call("app", "slin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode2_driver_echoes_the_callers_speech() {
    echo_call("driver", "slin16").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode3_stasis_echoes_the_callers_speech() {
    echo_call("stasis", "slin16").await;
}

/// A failing agent (its provider unreachable): the caller reaches the operators' queue
/// member within 2 s of the call starting, in `mode`, and the record says why.
async fn failing_agent_reaches_operators(mode: &'static str) {
    let Some((prefix, _serial)) =
        real_asterisk_support::asterisk_for(&format!("failing_agent_{mode}")).await
    else {
        return;
    };
    let stasis = (mode == "stasis").then_some("slin16");
    let rig = Rig::start(&prefix, &format!("fail-{mode}"), stasis, &failing_agent()).await;
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
async fn failing_agent_mode1_reaches_the_operators() {
    failing_agent_reaches_operators("app").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_agent_mode2_reaches_the_operators() {
    failing_agent_reaches_operators("driver").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_agent_mode3_reaches_the_operators() {
    failing_agent_reaches_operators("stasis").await;
}

/// voicegate not running: modes 1 and 2 still reach the operators (`TryExec` fails,
/// `DIALSTATUS=CHANUNAVAIL`), and so does mode 3 (`STASISSTATUS=FAILED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voicegate_down_every_mode_reaches_the_operators() {
    let Some((prefix, _serial)) = real_asterisk_support::asterisk_for("voicegate_down").await
    else {
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
async fn dtmf_reaches_the_agent_once_per_digit_in_every_mode() {
    let Some((prefix, _serial)) = real_asterisk_support::asterisk_for("dtmf").await else {
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
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stasis_calls_in_a_row_and_at_once_all_bridge_and_leave_nothing() {
    let Some((prefix, _serial)) = real_asterisk_support::asterisk_for("stasis_many").await else {
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
        rig.explain_on_panic(|| assert_echo(&call.name, &heard, &said, ECHO_MS * 8, 800));
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
        assert_echo(&call.name, &ast.heard(&call.name), &said, ECHO_MS * 8, 800);
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
async fn long_echo_call_keeps_its_delay() {
    let Some((prefix, _serial)) = real_asterisk_support::asterisk_for("long_echo").await else {
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
async fn maintenance_sends_every_mode_to_the_operators() {
    let Some((prefix, _serial)) = real_asterisk_support::asterisk_for("maintenance").await else {
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
async fn openai_realtime_reply_is_heard_and_a_barge_in_truncates_it() {
    use fake_openai::{FakeOpenAi, to_wire};
    let Some((prefix, _serial)) = real_asterisk_support::asterisk_for("openai_barge_in").await
    else {
        return;
    };
    let fake = FakeOpenAi::bind(OPENAI_KEY).await;
    let agent = openai_agent(&fake.url, "instructions = \"You are a test agent.\"\n");
    let rig = Rig::start(&prefix, "openai", None, &agent).await;
    // The reply: 4.5 s of real speech the caller can be checked against.
    let mut reply = Vec::new();
    for f in [
        "vm-goodbye.wav",
        "auth-thankyou.wav",
        "hello-world.wav",
        "vm-goodbye.wav",
    ] {
        reply.extend(read_wav(&repo().join("tests/fixtures").join(f)));
    }
    let mut call = TestCall::new("openai", "app");
    call.wait_s = 5.0;
    let t0 = tokio::time::Instant::now();
    let ch = rig.ast.originate(&call).await;
    let (_, conn) = fake.accept(None, t0).await;
    let mut c = conn.expect("upgrade accepted");
    open_session(&mut c).await;
    // The caller's speech arrives through Asterisk; then the server answers, all at once.
    c.wait_for_audio_ms(1_000).await;
    c.caller_turn("item_u1", "Hello world.").await;
    c.reply(
        "resp_1",
        "item_a1",
        &to_wire(&reply, ULAW),
        800,
        "Goodbye. Thank you. Hello world. Goodbye.",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    c.send(serde_json::json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 3_000, "item_id": "item_u2"}))
        .await;
    let truncate = c.expect("conversation.item.truncate").await;
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

/// The agent's built-in tools through the real Asterisk, with the fake OpenAI Realtime
/// server as the model: it says goodbye, then calls `transfer_to_operator` or `hangup` at
/// once. The words are heard in full first; then the caller is in the operators' queue
/// (modes 1 and 3), or hung up (long before its own end).
async fn tool_ends_the_call(mode: &'static str, tool: &'static str) {
    use fake_openai::{FakeOpenAi, to_wire};
    let Some((prefix, _serial)) =
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
        &to_wire(&goodbye, ULAW),
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
async fn transfer_tool_mode1_puts_the_caller_in_the_queue() {
    tool_ends_the_call("app", "transfer_to_operator").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_tool_mode3_puts_the_caller_in_the_queue() {
    tool_ends_the_call("stasis", "transfer_to_operator").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_tool_mode1_hangs_up_after_the_goodbye() {
    tool_ends_the_call("app", "hangup").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_tool_mode3_hangs_up_after_the_goodbye() {
    tool_ends_the_call("stasis", "hangup").await;
}

/// A Stasis setup that fails for real: `external_host` points where nothing listens, so
/// Asterisk answers `externalMedia` with 500. The caller reaches the operators, and the call
/// is recorded and counted as a fallback with the reason, not as a completed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_stasis_setup_is_recorded_as_a_fallback_with_its_reason() {
    let Some((prefix, _serial)) = real_asterisk_support::asterisk_for("failed_setup").await else {
        return;
    };
    let (audiosocket, health) = Voicegate::ports();
    let ast = Asterisk::start(&prefix, "setup", globals(audiosocket, health)).await;
    let closed: std::net::SocketAddr = format!("127.0.0.1:{}", real_asterisk_support::free_port())
        .parse()
        .unwrap();
    let extra = format!("{}{}", echo_agent(), ari(&ast, closed, "slin16"));
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
