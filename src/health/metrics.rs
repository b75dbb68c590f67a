//! Prometheus metrics: the recorder, and every metric name voicegate emits.
//!
//! The `metrics` facade is used where things happen (`metrics::counter!(NAME)`); one
//! process-wide `metrics-exporter-prometheus` recorder collects them and `/metrics` renders
//! the text exposition format (version 0.0.4). Labels are low-cardinality by rule: an
//! outcome, a reason, a provider name, a direction; never a call id, a number or an address.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Gauge: calls in progress.
pub(crate) const CALLS_ACTIVE: &str = "voicegate_calls_active";
/// Counter: finished calls, label `outcome`.
pub(crate) const CALLS_TOTAL: &str = "voicegate_calls_total";
/// Counter: finished calls that had a media channel, label `transport` (`audiosocket`,
/// `websocket`, ...).
pub(crate) const CALLS_BY_TRANSPORT: &str = "voicegate_calls_by_transport_total";
/// Counter: audio frames from Asterisk.
pub(crate) const FRAMES_IN: &str = "voicegate_frames_in_total";
/// Counter: audio frames to Asterisk.
pub(crate) const FRAMES_OUT: &str = "voicegate_frames_out_total";
/// Counter: frames cut short while a reply was still streaming.
pub(crate) const UNDERRUNS: &str = "voicegate_underruns_total";
/// Frames sent as silence because the agent had nothing to say (not a fault).
pub(crate) const IDLE_FRAMES: &str = "voicegate_idle_frames_total";
/// Counter: dropped audio frames, label `direction` (`in`: agent input full; `out`: late
/// ticks skipped).
pub(crate) const FRAMES_DROPPED: &str = "voicegate_frames_dropped_total";
/// Counter: barge-ins (caller interrupted the agent).
pub(crate) const BARGE_INS: &str = "voicegate_barge_ins_total";
/// Histogram: local barge-in latency, the caller's speech onset (the first frame the
/// detector took for speech) → the first frame out without agent audio, s; confirmed
/// barge-ins only.
pub(crate) const BARGE_IN_LATENCY: &str = "voicegate_barge_in_latency_seconds";
/// Counter: local barge-in pauses nothing confirmed (playback resumed): coughs, noises.
pub(crate) const FALSE_BARGE_INS: &str = "voicegate_false_barge_ins_total";
/// Counter: local barge-in pauses the caller's words ended as a backchannel (resumed).
pub(crate) const BACKCHANNELS: &str = "voicegate_backchannels_total";
/// Counter: agent audio held by a pause and played after resuming (not thrown away), ms
/// (an integer counter, so milliseconds rather than seconds).
pub(crate) const BARGE_IN_RESUMED_AUDIO: &str =
    "voicegate_barge_in_resumed_audio_milliseconds_total";
/// Histogram: how late each playout tick fired after its 20 ms deadline, s.
pub(crate) const PLAYOUT_LATENESS: &str = "voicegate_playout_lateness_seconds";
/// Histogram: caller speech end → first agent audio of the reply, s.
pub(crate) const TURN_LATENCY: &str = "voicegate_turn_latency_seconds";
/// Counter: provider failures (calls handed to the fallback by a failing agent), labels
/// `provider` and `reason` (`quota`, `silent`, `error`; `fallback::FallbackReason::provider_reason`).
pub(crate) const PROVIDER_ERRORS: &str = "voicegate_provider_errors_total";
/// Counter: connections refused by the guard, label `reason`.
pub(crate) const GUARD_REJECTIONS: &str = "voicegate_guard_rejections_total";
/// Counter: AudioSocket connections closed before their call id, label `reason` (`closed`,
/// `timeout`, `malformed`, `not_call_id`, `nil_call_id`, `not_issued`: a call id the ARI
/// controller did not issue, in Stasis-only mode).
pub(crate) const HANDSHAKE_FAILURES: &str = "voicegate_handshake_failures_total";
/// Counter: caller audio frames dropped because they arrived faster than real time beyond
/// the allowance (`call::SessionParams::input_allowance`).
pub(crate) const INPUT_OVERRUN: &str = "voicegate_input_overrun_frames_total";
/// Counter: DTMF digits ignored, label `reason` (`rate`: faster than a keypad can send;
/// `per_call`: more than a call keeps).
pub(crate) const DTMF_DROPPED: &str = "voicegate_dtmf_dropped_total";
/// Counter: call records not written, label `reason` (`queue_full`: the writer's queue was
/// full; `spool_unavailable`: still unwritable at shutdown; `encode`: cannot be encoded).
pub(crate) const RECORDS_LOST: &str = "voicegate_records_lost_total";
/// Counter: bytes of damaged spool files moved aside into `quarantine/` at start.
pub(crate) const RECORDS_QUARANTINED_BYTES: &str = "voicegate_records_quarantined_bytes_total";
/// Counter: health-listener connections closed unanswered, label `reason`
/// (`not_allowed`, `busy`, `source_busy`).
pub(crate) const HTTP_REFUSED: &str = "voicegate_http_refused_total";
/// Counter: calls handed to the humans, label `reason`.
pub(crate) const FALLBACKS: &str = "voicegate_fallbacks_total";
/// Gauge: 1 while the circuit breaker is open.
pub(crate) const BREAKER_OPEN: &str = "voicegate_breaker_open";
/// Gauge: AI time used today (UTC), s.
pub(crate) const BUDGET_USED: &str = "voicegate_budget_used_seconds";
/// Gauge: the daily AI budget, s (`guard.daily_budget_minutes` × 60; 0 = no limit).
pub(crate) const BUDGET_LIMIT: &str = "voicegate_budget_limit_seconds";
/// Gauge: when this process started, s since the Unix epoch (a restart, by the watchdog or
/// otherwise, changes it).
pub(crate) const START_TIME: &str = "voicegate_start_time_seconds";
/// Gauge: live heap, bytes (requested sizes; [`crate::health::heap`]), refreshed by upkeep.
pub(crate) const HEAP_ALLOCATED: &str = "voicegate_heap_allocated_bytes";

/// Gauge: events waiting in a webhook's outbox, label `webhook`.
pub(crate) const WEBHOOK_BACKLOG: &str = "voicegate_webhook_backlog_events";
/// Gauge: age of the oldest event waiting in a webhook's outbox, s (0 when empty), label
/// `webhook`.
pub(crate) const WEBHOOK_OLDEST_AGE: &str = "voicegate_webhook_oldest_age_seconds";
/// Counter: events delivered (2xx), label `webhook`.
pub(crate) const WEBHOOK_DELIVERED: &str = "voicegate_webhook_delivered_total";
/// Counter: delivery attempts that failed (non-2xx, timeout, refused), label `webhook`.
pub(crate) const WEBHOOK_FAILURES: &str = "voicegate_webhook_attempt_failures_total";
/// Counter: events given up, labels `webhook` and `reason` (`full`: the outbox was over its
/// bounds, oldest dropped; `expired`: older than `max_age_h`; `unwritable`: the outbox could
/// not be written).
pub(crate) const WEBHOOK_DROPPED: &str = "voicegate_webhook_dropped_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle) and
/// registers every metric at zero so `/metrics` lists them before the first call.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let lateness = [0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16];
            let latency = [0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0];
            let barge = [0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(PLAYOUT_LATENESS.into()), &lateness)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(TURN_LATENCY.into()), &latency)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BARGE_IN_LATENCY.into()), &barge)
                });
            // Both bucket lists are non-empty literals, the only error set_buckets_for_metric has.
            let builder = builder.expect("non-empty bucket lists");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_calls();
    describe_box();
    zero_counters();
}

/// The calls' and the audio path's metrics.
fn describe_calls() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(CALLS_ACTIVE, "Calls in progress");
    describe_counter!(CALLS_TOTAL, "Finished calls by outcome");
    describe_counter!(
        CALLS_BY_TRANSPORT,
        "Finished calls by media transport (audiosocket, websocket)"
    );
    describe_counter!(FRAMES_IN, "Audio frames received from Asterisk");
    describe_counter!(FRAMES_OUT, "Audio frames sent to Asterisk");
    describe_counter!(
        UNDERRUNS,
        "Frames cut short while a reply was streaming: agent audio arrived late"
    );
    describe_counter!(
        IDLE_FRAMES,
        "Frames sent as silence while no reply streamed: the agent had nothing to say"
    );
    describe_counter!(FRAMES_DROPPED, "Dropped audio frames by direction");
    describe_counter!(BARGE_INS, "Times the caller interrupted the agent");
    describe_histogram!(PLAYOUT_LATENESS, Unit::Seconds, "Lateness of playout ticks");
    describe_histogram!(
        BARGE_IN_LATENCY,
        Unit::Seconds,
        "Caller speech onset to the agent silent at the caller (local barge-in)"
    );
    describe_counter!(FALSE_BARGE_INS, "Local barge-in pauses not confirmed");
    describe_counter!(BACKCHANNELS, "Local barge-in pauses ended by a backchannel");
    describe_counter!(
        BARGE_IN_RESUMED_AUDIO,
        Unit::Milliseconds,
        "Agent audio resumed after an unconfirmed pause"
    );
    describe_histogram!(
        TURN_LATENCY,
        Unit::Seconds,
        "Caller speech end to first agent audio"
    );
}

/// The box's metrics: providers, guard, fallback, budget, records, webhooks.
fn describe_box() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(PROVIDER_ERRORS, "Agent provider failures");
    describe_counter!(GUARD_REJECTIONS, "Connections refused by the guard");
    describe_counter!(FALLBACKS, "Calls handed to the operators by reason");
    describe_gauge!(BREAKER_OPEN, "1 while the circuit breaker is open");
    describe_gauge!(BUDGET_USED, Unit::Seconds, "AI time used today (UTC)");
    describe_gauge!(BUDGET_LIMIT, Unit::Seconds, "Daily AI budget (0: no limit)");
    describe_gauge!(START_TIME, Unit::Seconds, "Process start, Unix time");
    describe_gauge!(HEAP_ALLOCATED, Unit::Bytes, "Live heap allocations");
    describe_counter!(
        HANDSHAKE_FAILURES,
        "AudioSocket connections closed before a call id"
    );
    describe_counter!(
        INPUT_OVERRUN,
        "Caller frames dropped for arriving faster than real time"
    );
    describe_counter!(DTMF_DROPPED, "DTMF digits ignored by reason");
    describe_counter!(RECORDS_LOST, "Call records not written by reason");
    describe_counter!(
        RECORDS_QUARANTINED_BYTES,
        Unit::Bytes,
        "Damaged spool bytes moved aside"
    );
    describe_counter!(
        HTTP_REFUSED,
        "Health-listener connections closed unanswered"
    );
    describe_gauge!(WEBHOOK_BACKLOG, "Events waiting in a webhook outbox");
    describe_gauge!(
        WEBHOOK_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest event waiting in a webhook outbox"
    );
    describe_counter!(WEBHOOK_DELIVERED, "Webhook events delivered");
    describe_counter!(WEBHOOK_FAILURES, "Webhook delivery attempts that failed");
    describe_counter!(WEBHOOK_DROPPED, "Webhook events given up by reason");
}

/// Series present from the start (a rate over a missing series is no data, not zero).
fn zero_counters() {
    metrics::counter!(INPUT_OVERRUN).increment(0);
    metrics::counter!(RECORDS_LOST, "reason" => "queue_full").increment(0);
    metrics::gauge!(CALLS_ACTIVE).set(0.0);
    metrics::counter!(FRAMES_IN).increment(0);
    metrics::counter!(FRAMES_OUT).increment(0);
    metrics::counter!(UNDERRUNS).increment(0);
    metrics::counter!(IDLE_FRAMES).increment(0);
    metrics::counter!(FRAMES_DROPPED, "direction" => "in").increment(0);
    metrics::counter!(FRAMES_DROPPED, "direction" => "out").increment(0);
    metrics::counter!(BARGE_INS).increment(0);
    metrics::counter!(FALSE_BARGE_INS).increment(0);
    metrics::counter!(BACKCHANNELS).increment(0);
    metrics::counter!(BARGE_IN_RESUMED_AUDIO).increment(0);
    metrics::gauge!(BREAKER_OPEN).set(0.0);
    metrics::gauge!(BUDGET_USED).set(0.0);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!(START_TIME).set(started);
}

/// How often histogram samples are folded into their buckets when nobody scrapes `/metrics`.
pub(crate) const UPKEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded histogram samples into buckets every [`UPKEEP_PERIOD`] until the runtime
/// stops. The exporter keeps every raw sample until upkeep runs; with a playout-lateness
/// sample per frame per call, memory would grow without bound on a box nobody scrapes.
pub(crate) fn spawn_upkeep() -> tokio::task::JoinHandle<()> {
    let handle = install();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_PERIOD);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep(&handle);
        }
    })
}

/// The Prometheus text of every metric (runs the recorder's upkeep first).
pub fn render() -> String {
    let handle = install();
    upkeep(&handle);
    handle.render()
}

fn upkeep(handle: &PrometheusHandle) {
    metrics::gauge!(HEAP_ALLOCATED).set(crate::health::heap::allocated_bytes() as f64);
    handle.run_upkeep();
}
