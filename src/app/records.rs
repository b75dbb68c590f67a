//! The call-records writer: every finished call's summary becomes a record in the spool
//! (`records::spool`), and a spool that cannot be written is retried, never given up while
//! the service runs.

use crate::call::CallSummary;
use crate::health::{Component, ComponentStatus, HealthState, component};
use crate::records::CallRecord;
use crate::records::CallerNumbers;
use crate::records::spool::{Spool, SpoolError};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{error, info};

/// How often the records writer retries a spool it cannot open or write.
pub const RECORDS_RETRY: Duration = Duration::from_secs(2);

/// Where and how [`write_records`] keeps records.
#[derive(Debug, Clone)]
pub struct RecordsWriter {
    /// The spool directory.
    pub dir: PathBuf,
    /// `records.max_file_bytes`.
    pub max_file_bytes: u64,
    /// `records.keep_files`.
    pub keep_files: u32,
    /// `records.caller_numbers`.
    pub numbers: CallerNumbers,
    /// Wait between attempts while the spool cannot be opened or written.
    pub retry: Duration,
}

/// Counts `n` records given up, by reason.
fn lost(reason: &'static str, n: u64) {
    ::metrics::counter!(crate::health::metrics::RECORDS_LOST, "reason" => reason).increment(n);
}

/// What one attempt to write the record in hand came to.
enum Attempt {
    /// Written, or given up for good (cannot be encoded): take the next one.
    Done,
    /// The channel is closed and drained.
    Closed,
    /// The spool failed: reopen it after a pause.
    Failed(String),
}

/// The writer's state between attempts.
struct Writer {
    w: RecordsWriter,
    health: Arc<HealthState>,
    spool: Option<Arc<Mutex<Spool>>>,
    pending: Option<(uuid::Uuid, CallRecord)>,
    degraded: bool,
}

/// Writes every summary from `rx` as a record, until `rx` closes and is drained.
///
/// The spool is opened at once and reopened after any failure, every `w.retry`, so a disk
/// that was full or read-only at start is used as soon as it works again. Meanwhile
/// `/health` has `records` degraded with the reason, the record in hand waits and later ones
/// wait in the bounded queue (full: dropped and counted by the listener). A record is only
/// given up (`voicegate_records_lost_total{reason}`) when it cannot be encoded, or at
/// shutdown while the spool still does not work.
pub async fn write_records(
    mut rx: mpsc::Receiver<CallSummary>,
    w: RecordsWriter,
    health: Arc<HealthState>,
) {
    let mut writer = Writer {
        w,
        health,
        spool: None,
        pending: None,
        degraded: false,
    };
    loop {
        let failure = match writer.attempt(&mut rx).await {
            Attempt::Done => continue,
            Attempt::Closed => return,
            Attempt::Failed(why) => why,
        };
        // The spool failed: reopen it (which also cuts a partial write) after a pause.
        writer.spool = None;
        writer.failed(&failure);
        if rx.is_closed() {
            // Shutting down (every sender is gone): this attempt was the last one.
            let left = rx.len() as u64 + writer.pending.is_some() as u64;
            if left > 0 {
                error!(dir = %writer.w.dir.display(), records = left, "shutting down with call records unwritten; lost");
                lost("spool_unavailable", left);
            }
            return;
        }
        tokio::time::sleep(writer.w.retry).await;
    }
}

impl Writer {
    /// Opens the spool if it is not open, else writes the record in hand (taking the next
    /// one from `rx` first when there is none).
    async fn attempt(&mut self, rx: &mut mpsc::Receiver<CallSummary>) -> Attempt {
        let Some(spool) = self.spool.clone() else {
            return self.open().await;
        };
        if self.pending.is_none() {
            match rx.recv().await {
                Some(summary) => {
                    let record = summary.record(self.w.numbers);
                    self.pending = Some((summary.call_id, record));
                }
                None => return Attempt::Closed,
            }
        }
        // pending is Some: set just above or kept from a failed attempt.
        let (call_id, record) = self.pending.clone().expect("a record in hand");
        let written = tokio::task::spawn_blocking(move || {
            // Only this task appends, one record at a time: the lock is never contended,
            // and open() repairs whatever a panic inside append left.
            let mut spool = spool.lock().unwrap_or_else(|p| p.into_inner());
            spool.append(&record)
        })
        .await;
        match written {
            Ok(Ok(())) => {
                self.pending = None;
                Attempt::Done
            }
            Ok(Err(e @ (SpoolError::TooLarge(_) | SpoolError::Encode(_)))) => {
                // Cannot happen after from_facts's bounds; never retried.
                error!(%call_id, error = %e, "call record cannot be encoded; lost");
                lost("encode", 1);
                self.pending = None;
                Attempt::Done
            }
            Ok(Err(e)) => Attempt::Failed(e.to_string()),
            Err(e) => Attempt::Failed(format!("records task: {e}")),
        }
    }

    /// Opens the spool; `/health` says so.
    async fn open(&mut self) -> Attempt {
        let (dir, max, keep) = (self.w.dir.clone(), self.w.max_file_bytes, self.w.keep_files);
        match tokio::task::spawn_blocking(move || Spool::open(&dir, max, keep)).await {
            Ok(Ok(s)) => {
                info!(dir = %self.w.dir.display(), quarantined_bytes = s.quarantined_bytes(), "call records spool open");
                self.set(
                    ComponentStatus::Ok,
                    format!("writing to {}", self.w.dir.display()),
                );
                self.degraded = false;
                self.spool = Some(Arc::new(Mutex::new(s)));
                Attempt::Done
            }
            Ok(Err(e)) => Attempt::Failed(e.to_string()),
            Err(e) => Attempt::Failed(format!("records task: {e}")),
        }
    }

    /// Logs the first failure of a run of them; `/health` shows each.
    fn failed(&mut self, failure: &str) {
        if !self.degraded {
            self.degraded = true;
            error!(dir = %self.w.dir.display(), error = %failure, "call records cannot be written; retrying");
        }
        self.set(
            ComponentStatus::Degraded,
            format!(
                "cannot write records: {failure}; retrying every {} ms",
                self.w.retry.as_millis()
            ),
        );
    }

    fn set(&self, status: ComponentStatus, detail: String) {
        self.health
            .set_component(component::RECORDS, Component::new(status, detail));
    }
}
