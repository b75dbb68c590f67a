//! A call end to end through the real AudioSocket listener with the echo agent, driven by
//! the synthetic caller on a real recording.
#![allow(clippy::disallowed_types)] // a test on real sockets and processes: real time (std::time::Instant)

use crate::call_logs;
use crate::common;

use common::{TestServer, fixture};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use voicegate::agent::echo::EchoAgent;
use voicegate::audiosocket::SlinRate;
use voicegate::call::Outcome;
use voicegate::caller::{CallPlan, place_call, speech_similarity};

fn plan(rate: SlinRate, seconds: f64) -> CallPlan {
    CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate,
        speech: fixture("hello-world.wav"),
        speech_offset: Duration::from_millis(100),
        dtmf: vec![('5', Duration::from_millis(1500))],
        duration: Duration::from_secs_f64(seconds),
    }
}

/// One frame per 20 ms, never a burst. Tolerant of a loaded machine: a scheduling hiccup may
/// delay a frame, but frames must not pile up (a burst would be dropped by Asterisk).
fn assert_paced(report: &voicegate::caller::CallReport) {
    assert!(
        (18.0..=22.0).contains(&report.gap_p50_ms),
        "p50 {}",
        report.gap_p50_ms
    );
    let gaps: Vec<f64> = report.arrivals_ms.windows(2).map(|w| w[1] - w[0]).collect();
    // After a stall the playout clock sends at most MAX_LAG_FRAMES late frames back to back,
    // then skips: never a longer burst.
    let mut run = 0;
    let mut longest = 0;
    for g in &gaps {
        run = if *g < 5.0 { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let max_burst = voicegate::audio::PlayoutClock::MAX_LAG_FRAMES as usize + 1;
    assert!(
        longest <= max_burst,
        "{longest} frames arrived back to back"
    );
    let bunched = gaps.iter().filter(|&&g| g < 5.0).count();
    assert!(
        bunched * 7 <= gaps.len(),
        "{bunched} of {} frames arrived bunched",
        gaps.len()
    );
    // No audible break (single ticks delayed 100–200 ms by a loaded machine are not one).
    assert!(report.gap_max_ms < 500.0, "max gap {}", report.gap_max_ms);
}

async fn echo_comes_back(rate: SlinRate) {
    let delay = Duration::from_millis(500);
    let mut server = TestServer::start(Arc::new(EchoAgent::new(delay))).await;
    let plan = plan(rate, 3.0);
    let report = place_call(server.addr, &plan).await.expect("call");

    // Paced: one frame per 20 ms for the whole call, never a burst.
    assert!(report.frames_received >= 140, "{report:?}");
    assert_paced(&report);
    assert_eq!(report.short_frames, 0);

    // What came back is the caller's speech, delayed by the echo delay: matched window by
    // window (100 ms), tolerant of a late frame or a skipped tick on a loaded machine.
    let speech = voicegate::caller::resample_recording(&plan.speech, rate.hz()).unwrap();
    let spms = rate.hz() as usize / 1000;
    let expected_at = (plan.speech_offset + delay).as_millis() as usize * spms;
    let similarity = speech_similarity(
        &report.received.samples,
        &speech.samples,
        rate.hz(),
        expected_at,
        60 * spms,
    );
    assert!(similarity.passes(0.9), "echo: {}", similarity.describe(0.9));

    // Never early: the first audible echo comes the echo delay after the first audible
    // frame the caller sent (scheduling on a loaded machine may only make it later).
    let spf = rate.samples_per_frame();
    let lead_frames = speech
        .samples
        .chunks(spf)
        .position(|f| voicegate::audio::rms(f) > voicegate::caller::AUDIBLE_RMS)
        .expect("the recording is audible");
    let want_ms = (plan.speech_offset + delay).as_millis() as f64 + lead_frames as f64 * 20.0;
    let first = report.first_audio_ms.expect("audible audio");
    assert!(
        first >= want_ms - 25.0 && first < want_ms + 500.0,
        "first audio at {first} ms, expected about {want_ms} ms"
    );

    let summary = server.next_summary().await;
    assert_eq!(summary.call_id, plan.call_id);
    assert_eq!(summary.outcome, Outcome::CallerHungUp);
    assert_eq!(summary.rate_hz, rate.hz());
    assert_eq!(summary.dtmf, "5");
    assert!(summary.frames_in >= 140);
    server.stop.cancel();
    server.task.await.unwrap();
}

#[tokio::test]
async fn echo_call_8khz_audiosocket_app() {
    echo_comes_back(SlinRate::Hz8000).await;
}

#[tokio::test]
async fn echo_call_16khz_channel_driver() {
    echo_comes_back(SlinRate::Hz16000).await;
}

/// Every line the echo agent and the call session log during a call carries the call's id
/// (the agent's task runs inside the call's span).
#[tokio::test]
async fn every_line_of_an_echo_call_carries_its_call_id() {
    let (logs, _guard) = call_logs::capture();
    let mut server = TestServer::start(Arc::new(EchoAgent::new(Duration::from_millis(100)))).await;
    let plan = plan(SlinRate::Hz8000, 2.0);
    place_call(server.addr, &plan).await.expect("call");
    assert_eq!(server.next_summary().await.call_id, plan.call_id);
    server.stop.cancel();
    server.task.await.unwrap();
    logs.assert_every_call_line_has(plan.call_id, &["voicegate::agent::echo", "voicegate::call"]);
}

#[tokio::test]
async fn malformed_stream_closes_only_that_call() {
    let mut server = TestServer::start(Arc::new(EchoAgent::new(Duration::from_millis(100)))).await;
    let good = tokio::spawn({
        let addr = server.addr;
        async move { place_call(addr, &plan(SlinRate::Hz8000, 2.0)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A call that sends a valid id, then an unknown frame kind.
    let mut bad = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let id = uuid::Uuid::new_v4();
    let mut bytes = vec![0x01, 0, 16];
    bytes.extend_from_slice(id.as_bytes());
    bytes.extend_from_slice(&[0x10, 0, 2, 0, 0, 0x42, 0, 0]);
    bad.write_all(&bytes).await.unwrap();
    // The server closes it: read until EOF (skipping any frames it sent first).
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), bad.read_to_end(&mut sink))
        .await
        .expect("bad call closed promptly")
        .ok();
    let bad_summary = server.next_summary().await;
    assert_eq!(bad_summary.call_id, id);
    assert!(
        matches!(bad_summary.outcome, Outcome::ProtocolError(ref e) if e.contains("0x42")),
        "{:?}",
        bad_summary.outcome
    );

    // The other call went on undisturbed.
    let report = good.await.unwrap().expect("good call");
    assert!(report.frames_received >= 90, "{report:?}");
    assert_paced(&report);
    assert!(report.audible_frames_received > 20);
    server.stop.cancel();
}

#[tokio::test]
async fn connection_without_call_id_is_closed() {
    let mut params = voicegate::call::route::ServerParams::from_config(&Default::default());
    params.call_id_timeout = Duration::from_millis(200);
    let server = TestServer::start_with(Arc::new(EchoAgent::new(Duration::ZERO)), params).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(
        n, 0,
        "server sends nothing and closes a connection that never identifies itself"
    );
    server.stop.cancel();
}

#[tokio::test]
async fn shutdown_hangs_up_live_calls_after_grace() {
    let mut params = voicegate::call::route::ServerParams::from_config(&Default::default());
    params.shutdown_grace = Duration::from_millis(300);
    let mut server = TestServer::start_with(Arc::new(EchoAgent::new(Duration::ZERO)), params).await;
    let call = tokio::spawn({
        let addr = server.addr;
        async move { place_call(addr, &plan(SlinRate::Hz8000, 10.0)).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = std::time::Instant::now();
    server.stop.cancel();
    let report = tokio::time::timeout(Duration::from_secs(3), call)
        .await
        .expect("call ended by shutdown")
        .unwrap()
        .unwrap();
    let ended = stopped.elapsed();
    assert!(
        report.hangup_received,
        "live call got 0x00 when the grace period ran out"
    );
    // The live call kept its grace period (an immediate hangup fails), and no more than a
    // loaded machine's second beyond it.
    eprintln!("measured: shutdown → caller saw the hangup after {ended:?} (grace 300 ms)");
    assert!(
        ended >= Duration::from_millis(300) && ended < Duration::from_millis(1_300),
        "hung up {ended:?} after the shutdown, grace 300 ms"
    );
    assert!(report.duration_ms < 2000.0);
    assert_eq!(server.next_summary().await.outcome, Outcome::Shutdown);
    // New connections are refused once stopped.
    server.task.await.unwrap();
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
}
