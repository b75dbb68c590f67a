//! Shared helpers for the integration tests: fixtures and a server on 127.0.0.1:0.
#![allow(dead_code)]

pub(crate) mod console;
pub(crate) mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use voicegate::agent::SharedAgent;
use voicegate::audio::wav::Recording;
use voicegate::audiosocket::server::Server;
use voicegate::call::CallSummary;
use voicegate::call::route::{Generation, Router, ServerParams};
use voicegate::config::AudioSocketConfig;

/// A real recording from `tests/fixtures`.
pub(crate) fn fixture(name: &str) -> Recording {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    voicegate::wavfile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A running AudioSocket server on an ephemeral loopback port.
pub(crate) struct TestServer {
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    pub summaries: mpsc::UnboundedReceiver<CallSummary>,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub(crate) async fn start(agent: SharedAgent) -> Self {
        Self::start_with(
            agent,
            ServerParams::from_config(&AudioSocketConfig::default()),
        )
        .await
    }

    pub(crate) async fn start_with(agent: SharedAgent, params: ServerParams) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let server = Server::bind("127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind loopback");
        let mut router = Router::fixed(Generation::new(agent, params));
        router.summaries = Some(tx.into());
        let addr = server.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(std::sync::Arc::new(router), stop.clone()));
        TestServer {
            addr,
            stop,
            summaries: rx,
            task,
        }
    }

    /// The summary of the next call that ends.
    pub(crate) async fn next_summary(&mut self) -> CallSummary {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.summaries.recv())
            .await
            .expect("a call summary in time")
            .expect("server still running")
    }
}

/// A call beside a fault lost no frame, counted at both ends of each direction: every frame
/// the caller sent was read by voicegate (a frame or two may be in flight when the caller
/// hangs up) and none was dropped on the way to the agent, every frame voicegate sent reached
/// the caller, and frames kept flowing (no gap of a second). Comparing with voicegate's own
/// counts, rather than caller-sent with caller-received, keeps a slow start or end of the
/// session, or a late tick voicegate skipped by design on a loaded machine, from passing for
/// a loss.
pub(crate) fn assert_no_frame_lost(report: &voicegate::caller::CallReport, summary: &CallSummary) {
    assert_no_frame_lost_counts(
        report.frames_sent,
        report.frames_received,
        report.gap_max_ms,
        summary,
    );
}

/// [`assert_no_frame_lost`] from the far side's own counts: frames it sent and received, and
/// the largest gap between the frames it received, ms (the fake Asterisk's externalMedia
/// side reports these without a `CallReport`).
pub(crate) fn assert_no_frame_lost_counts(
    sent: u64,
    received: u64,
    gap_max_ms: f64,
    summary: &CallSummary,
) {
    assert!(
        summary.frames_in + 3 >= sent && summary.frames_in <= sent,
        "caller frames lost: sent {sent}, read {}",
        summary.frames_in
    );
    assert_eq!(summary.frames_dropped_in, 0, "{summary:?}");
    assert!(
        received + 3 >= summary.frames_out && received <= summary.frames_out,
        "frames to the caller lost: sent {}, got {received}",
        summary.frames_out
    );
    assert!(gap_max_ms < 1_000.0, "{gap_max_ms} ms gap");
}

/// The name libtest knows `test` by, for a test binary that runs one of its own tests as a
/// child process (`--exact <name>`): `module_path` is the caller's `module_path!()`, whose
/// first part is the binary's crate and the rest the modules libtest puts before the name.
pub(crate) fn test_name(module_path: &str, test: &str) -> String {
    match module_path.split_once("::") {
        Some((_, modules)) => format!("{modules}::{test}"),
        None => test.to_owned(),
    }
}
