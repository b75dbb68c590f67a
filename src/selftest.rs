//! `voicegate selftest`: the on-site check an installer runs after flashing. Starts the
//! service in-process on an ephemeral loopback port with the given config, places one
//! synthetic call with a short real recording built into the binary, and judges the result.
//! With the `echo` agent the speech must come back (correlation); with a cloud agent some
//! agent audio must come back, which exercises the real provider end to end.

use crate::audio::wav::Recording;
use crate::audiosocket::SlinRate;
use crate::audiosocket::server::Server;
use crate::call::route::{Generation, Router, ServerParams};
use crate::caller::{CallPlan, CallReport, place_call, speech_similarity};
use crate::config::{AgentConfig, Config};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The built-in recording: Asterisk's "hello-world" prompt, 1.4 s, 8 kHz mono
/// (asterisk-core-sounds-en, CC BY-SA 3.0; see `tests/fixtures/ATTRIBUTION.md`).
static BUILTIN_WAV: &[u8] = include_bytes!("../tests/fixtures/hello-world.wav");

/// The recording built into the binary (8 kHz mono slin).
pub fn builtin_recording() -> Recording {
    // The file is part of the build and checked by the tests.
    Recording::read(std::io::Cursor::new(BUILTIN_WAV)).expect("built-in WAV is valid")
}

/// One check of the self-test.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked, in words.
    pub what: String,
    /// Whether it held.
    pub ok: bool,
}

/// The self-test's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct SelftestOutcome {
    /// Agent provider used.
    pub agent: String,
    /// Echo similarity of what came back to what was said: the median of the 100 ms
    /// windows' correlations, 0–1 (echo agent only; the check itself needs 95 % of the
    /// windows ≥ 0.8, see [`crate::caller::Similarity::passes`]).
    pub correlation: Option<f64>,
    /// Every check made.
    pub checks: Vec<Check>,
    /// All checks held.
    pub passed: bool,
    /// The synthetic call's report.
    #[serde(skip)]
    pub report: CallReport,
}

/// Runs the self-test with `config` (its listener address is replaced by an ephemeral
/// loopback port) and a call of `length`.
///
/// # Errors
/// If the service cannot start or the call cannot be placed.
pub async fn run(config: &Config, length: Duration) -> anyhow::Result<SelftestOutcome> {
    let agent = crate::agent::from_config(&config.agent)?;
    let agent_name = agent.name().to_owned();
    let params = ServerParams::from_config(&config.audiosocket).with_tools(std::sync::Arc::new(
        crate::tools::ToolRegistry::from_config(&config.tools)?,
    ));
    let router = Router::fixed(Generation::new(agent, params));
    let server = Server::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = server.local_addr()?;
    let stop = CancellationToken::new();
    let serving = tokio::spawn(server.run(std::sync::Arc::new(router), stop.clone()));

    let speech = builtin_recording();
    let plan = CallPlan {
        call_id: uuid::Uuid::new_v4(),
        rate: SlinRate::Hz8000,
        speech: speech.clone(),
        speech_offset: Duration::from_millis(200),
        dtmf: Vec::new(),
        duration: length.max(Duration::from_millis(speech.duration_ms() + 1500)),
    };
    let report = place_call(addr, &plan).await;
    stop.cancel();
    let _ = serving.await;
    let report = report?;

    let mut checks = vec![
        Check {
            what: format!(
                "{} frames received for {} sent",
                report.frames_received, report.frames_sent
            ),
            ok: report.frames_received + 5 >= report.frames_sent,
        },
        Check {
            what: format!("pacing p99 {:.2} ms within 20 ± 2 ms", report.gap_p99_ms),
            ok: (18.0..=22.0).contains(&report.gap_p99_ms),
        },
        Check {
            what: format!(
                "agent audio came back ({} audible frames)",
                report.audible_frames_received
            ),
            ok: report.audible_frames_received >= 10,
        },
    ];
    let mut correlation = None;
    if let AgentConfig::Echo(e) = &config.agent {
        let offset = (plan.speech_offset + e.delay()).as_millis() as usize * 8;
        // Window by window (100 ms), so one late frame does not fail an installer's check.
        let c = speech_similarity(
            &report.received.samples,
            &speech.samples,
            8_000,
            offset,
            480,
        );
        correlation = Some(c.median());
        checks.push(Check {
            what: format!("echo matches the recording: {}", c.describe(0.8)),
            ok: c.passes(0.8),
        });
    }
    let passed = checks.iter().all(|c| c.ok);
    Ok(SelftestOutcome {
        agent: agent_name,
        correlation,
        checks,
        passed,
        report,
    })
}
