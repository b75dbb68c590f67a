//! Call records: every call leaves one, on disk before the call is forgotten.
//!
//! A record ([`CallRecord`]) is made from the call's [`CallSummary`]: call id, caller number
//! (kept, masked or dropped per [`CallerNumbers`]), start and end, duration, agent, outcome
//! and detail, barge-ins, per-turn latencies, tool calls, DTMF and the transcript. Never an
//! API key: nothing in a summary holds one.
//!
//! The spool ([`spool`]) is a directory of append-only files `calls-NNNNNNNN.vgr` under the
//! state directory (`<state>/records/`): an 8-byte file magic, then frames of
//! `length: u32 LE | crc32: u32 LE | payload`, the payload being a format version byte and
//! the record in `postcard`. Each append is fsync'd. A torn last frame (a crash mid-write,
//! `kill -9`) is detected by length or checksum, skipped by readers and cut off before the
//! next append, so it never corrupts the records before it. Files rotate by size and the
//! oldest are deleted beyond `keep_files`.
//!
//! `voicegate records list|export` reads them back (export: JSON lines).

pub mod spool;

use crate::agent::Speaker;
use crate::call::session::ToolCallRecord;
use crate::call::{CallSummary, Outcome};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};
use uuid::Uuid;

/// What records keep of the caller's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallerNumbers {
    /// The whole number (default).
    #[default]
    Full,
    /// Only the last four digits (`*******1234`).
    Masked,
    /// Nothing.
    Omit,
}

impl CallerNumbers {
    /// Applies the policy to a number.
    pub fn apply(&self, number: &str) -> Option<String> {
        match self {
            CallerNumbers::Full => Some(number.to_owned()),
            CallerNumbers::Omit => None,
            CallerNumbers::Masked => {
                let n = number.chars().count();
                Some(
                    number
                        .chars()
                        .enumerate()
                        .map(|(i, c)| if i + 4 < n { '*' } else { c })
                        .collect(),
                )
            }
        }
    }
}

/// `[records]` in the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordsConfig {
    /// Keep call records (default true).
    pub enabled: bool,
    /// Spool directory (default `<state dir>/records`).
    pub dir: Option<PathBuf>,
    /// Start a new spool file beyond this size, bytes (default 8 MiB).
    pub max_file_bytes: u64,
    /// Spool files kept; older ones are deleted (default 16).
    pub keep_files: u32,
    /// Caller numbers: `full` (default), `masked` (last four digits), `omit`.
    pub caller_numbers: CallerNumbers,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig {
            enabled: true,
            dir: None,
            max_file_bytes: 8 * 1024 * 1024,
            keep_files: 16,
            caller_numbers: CallerNumbers::Full,
        }
    }
}

impl RecordsConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`crate::config::ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        use crate::config::ConfigError;
        if self.max_file_bytes < 64 * 1024 {
            return Err(ConfigError::invalid(
                "records.max_file_bytes",
                "must be at least 65536",
            ));
        }
        if self.keep_files == 0 {
            return Err(ConfigError::invalid(
                "records.keep_files",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The spool directory for a state directory.
    pub fn spool_dir(&self, state_dir: &std::path::Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| state_dir.join("records"))
    }
}

/// One line of a transcript.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscriptLine {
    /// Who spoke.
    pub speaker: Speaker,
    /// What was said.
    pub text: String,
}

/// What is kept of one call. Field order is the postcard format: append new fields at the
/// end and bump [`spool::FORMAT_VERSION`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The AudioSocket call id (nil for a connection refused before it sent one).
    pub call_id: Uuid,
    /// The caller's number after masking, when known.
    pub caller_number: Option<String>,
    /// Start, ms since the Unix epoch (UTC).
    pub started_unix_ms: u64,
    /// End, ms since the Unix epoch (UTC).
    pub ended_unix_ms: u64,
    /// Length, ms.
    pub duration_ms: u64,
    /// Agent provider name.
    pub agent: String,
    /// `completed`, `agent_ended`, `fallback`, `rejected`, `max_duration`, `protocol_error`,
    /// `idle_timeout`, `shutdown`, `write_failed`.
    pub outcome: String,
    /// Why, for fallback/rejected/errors.
    pub detail: Option<String>,
    /// Sample rate of the call, Hz (0 if no audio arrived).
    pub rate_hz: u32,
    /// Times the caller interrupted the agent.
    pub barge_ins: u64,
    /// Caller speech end → first agent audio, per turn, ms.
    pub turn_latencies_ms: Vec<u32>,
    /// Tools the agent called.
    pub tool_calls: Vec<ToolCallRecord>,
    /// DTMF digits.
    pub dtmf: String,
    /// The conversation.
    pub transcript: Vec<TranscriptLine>,
    /// Audio frames from / to Asterisk.
    pub frames_in: u64,
    /// Audio frames to Asterisk.
    pub frames_out: u64,
    /// Frames cut short while a reply streamed.
    pub underruns: u64,
}

/// The record label and detail of an outcome.
pub fn outcome_label(o: &Outcome) -> (&'static str, Option<String>) {
    match o {
        Outcome::CallerHungUp => ("completed", None),
        Outcome::AgentEnded(r) => ("agent_ended", Some(r.clone())),
        Outcome::Fallback(r) => ("fallback", Some(r.clone())),
        Outcome::ProtocolError(r) => ("protocol_error", Some(r.clone())),
        Outcome::IdleTimeout => ("idle_timeout", None),
        Outcome::Shutdown => ("shutdown", None),
        Outcome::WriteFailed(r) => ("write_failed", Some(r.clone())),
        Outcome::MaxDuration => ("max_duration", None),
        Outcome::Rejected(r) => ("rejected", Some(r.clone())),
        Outcome::Operator(r) => ("transferred", Some(r.clone())),
    }
}

impl CallRecord {
    /// The record of a finished call, caller number per `numbers`.
    pub fn from_summary(s: &CallSummary, numbers: CallerNumbers) -> Self {
        let started = s
            .started
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let (outcome, detail) = outcome_label(&s.outcome);
        CallRecord {
            call_id: s.call_id,
            caller_number: s.caller_number.as_deref().and_then(|n| numbers.apply(n)),
            started_unix_ms: started.as_millis() as u64,
            ended_unix_ms: (started + s.duration).as_millis() as u64,
            duration_ms: s.duration.as_millis() as u64,
            agent: s.agent.to_owned(),
            outcome: outcome.to_owned(),
            detail,
            rate_hz: s.rate_hz,
            barge_ins: s.barge_ins,
            turn_latencies_ms: s.turn_latencies_ms.clone(),
            tool_calls: s.tool_calls.clone(),
            dtmf: s.dtmf.clone(),
            transcript: s
                .transcript
                .iter()
                .map(|(speaker, text)| TranscriptLine {
                    speaker: *speaker,
                    text: text.clone(),
                })
                .collect(),
            frames_in: s.frames_in,
            frames_out: s.frames_out,
            underruns: s.underruns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking() {
        assert_eq!(
            CallerNumbers::Masked.apply("+4930123456").as_deref(),
            Some("*******3456")
        );
        assert_eq!(CallerNumbers::Masked.apply("12").as_deref(), Some("12"));
        assert_eq!(CallerNumbers::Omit.apply("+4930123456"), None);
        assert_eq!(
            CallerNumbers::Full.apply("+4930123456").as_deref(),
            Some("+4930123456")
        );
    }
}
