//! Starting `[[webhooks]]`: opens each outbox, spawns its delivery task and puts itself
//! between the finished calls and the records writer, so every summary becomes a
//! `call.ended` event in each outbox (fsync'd) before it goes on to the records.

use crate::call::CallSummary;
use crate::health::HealthState;
use crate::webhooks::WebhookConfig;
use crate::webhooks::deliver::{Webhook, deliver};
use anyhow::Context as _;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::error;

/// Opens every webhook and starts its delivery; returns the summaries for the records
/// writer (`summaries` itself when there is no webhook). The delivery tasks stop with
/// `stop`; an event in flight then stays in the outbox and is sent again after a restart.
///
/// # Errors
/// A secret cannot be resolved, an outbox cannot be opened, or the HTTP client cannot be
/// built.
pub(crate) fn start(
    hooks: &[WebhookConfig],
    state_dir: &Path,
    health: &Arc<HealthState>,
    summaries: mpsc::Receiver<CallSummary>,
    stop: &CancellationToken,
) -> anyhow::Result<mpsc::Receiver<CallSummary>> {
    if hooks.is_empty() {
        return Ok(summaries);
    }
    let client = crate::tls::http_client_builder()
        .build()
        .context("building the webhook HTTP client")?;
    let mut opened = Vec::with_capacity(hooks.len());
    for c in hooks {
        let hook = Webhook::open(c.clone(), state_dir, health.clone())?;
        tokio::spawn(deliver(hook.clone(), client.clone(), stop.clone()));
        opened.push(hook);
    }
    let (tx, rx) = mpsc::channel(super::RECORDS_QUEUE);
    tokio::spawn(tee(summaries, opened, tx));
    Ok(rx)
}

/// Puts every summary's event in each outbox, then passes the summary on to the records
/// writer (gone when records are off: then only the webhooks get it).
async fn tee(
    mut summaries: mpsc::Receiver<CallSummary>,
    hooks: Vec<Arc<Webhook>>,
    records: mpsc::Sender<CallSummary>,
) {
    while let Some(summary) = summaries.recv().await {
        let call_id = summary.call_id;
        let events: Vec<_> = hooks
            .iter()
            .map(|h| {
                let record = summary.record(h.config().caller_numbers);
                crate::webhooks::call_ended_event(&record, summary.agent_time)
            })
            .collect();
        let hs = hooks.clone();
        let written = tokio::task::spawn_blocking(move || {
            for (h, event) in hs.iter().zip(events) {
                match event {
                    // Errors are counted and shown in /health by enqueue_blocking.
                    Ok(body) => drop(h.enqueue_blocking(&call_id.to_string(), &body)),
                    Err(e) => error!(%call_id, error = %e, "call event cannot be encoded"),
                }
            }
        })
        .await;
        if let Err(e) = written {
            error!(%call_id, error = %e, "webhook outbox task failed");
        }
        // Records off: nobody receives; the webhooks still got the event.
        let _ = records.send(summary).await;
    }
}
