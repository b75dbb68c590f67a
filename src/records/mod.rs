//! Call records: every call leaves one, on disk before the call is forgotten.
//!
//! A record ([`CallRecord`]) is made from a finished call's plain facts ([`CallFacts`], which
//! the call module fills from its summary; records knows no call type): call id, caller number
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

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Who said something, in a transcript.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    /// The person who called.
    Caller,
    /// The voice agent.
    Agent,
}

/// A tool the agent called during the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    /// Tool name.
    pub name: String,
    /// Arguments as the JSON text the model produced.
    pub arguments: String,
}

/// A finished call's facts, as plain values: what [`CallRecord::from_facts`] keeps (cut to
/// [`bounds`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallFacts<'a> {
    /// The AudioSocket call id.
    pub(crate) call_id: Uuid,
    /// The caller's number, unmasked, when known.
    pub(crate) caller_number: Option<&'a str>,
    /// Wall-clock start.
    pub(crate) started: SystemTime,
    /// Length.
    pub(crate) duration: Duration,
    /// Agent provider name.
    pub(crate) agent: &'a str,
    /// Outcome label (see [`CallRecord::outcome`]).
    pub(crate) outcome: &'static str,
    /// Why, for fallback/rejected/errors.
    pub(crate) detail: Option<&'a str>,
    /// Sample rate of the call, Hz (0 if no audio arrived).
    pub(crate) rate_hz: u32,
    /// Times the caller interrupted the agent.
    pub(crate) barge_ins: u64,
    /// Per-turn latencies, ms.
    pub(crate) turn_latencies_ms: &'a [u32],
    /// Tools the agent called.
    pub(crate) tool_calls: &'a [ToolCallRecord],
    /// DTMF digits kept by the call.
    pub(crate) dtmf: &'a str,
    /// DTMF digits the call did not keep.
    pub(crate) dtmf_dropped: u64,
    /// The conversation.
    pub(crate) transcript: &'a [(Speaker, String)],
    /// Audio frames from Asterisk.
    pub(crate) frames_in: u64,
    /// Audio frames to Asterisk.
    pub(crate) frames_out: u64,
    /// Frames cut short while a reply streamed.
    pub(crate) underruns: u64,
    /// Local barge-in: onset → agent silent, ms, per confirmed barge-in.
    pub(crate) barge_in_latencies_ms: &'a [u32],
    /// Local barge-in pauses nothing confirmed.
    pub(crate) false_barge_ins: u64,
    /// Local barge-in pauses ended by a backchannel.
    pub(crate) backchannels: u64,
    /// Agent audio resumed after pauses, ms.
    pub(crate) resumed_audio_ms: u64,
    /// The agent profile the call ran with, if it reached one.
    pub(crate) profile: Option<&'a str>,
}

/// Local barge-in in one call (`audio::bargein`); all zero when it was off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BargeInStats {
    /// Per confirmed barge-in: caller speech onset → agent silent at the caller, ms (at most
    /// [`bounds::TURNS`]).
    pub latencies_ms: Vec<u32>,
    /// Pauses nothing confirmed (playback resumed).
    pub false_barge_ins: u64,
    /// Pauses the caller's words ended as a backchannel (playback resumed).
    pub backchannels: u64,
    /// Agent audio held by pauses and played after resuming, ms.
    pub resumed_audio_ms: u64,
}

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
    pub(crate) fn apply(&self, number: &str) -> Option<String> {
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
    /// [`crate::error::ConfigError::Invalid`] naming the key.
    pub(crate) fn validate(&self) -> Result<(), crate::error::ConfigError> {
        use crate::error::ConfigError;
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
    /// The AudioSocket call id (nil in records of refused connections written before
    /// issue 14; refusals are no longer recorded).
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
    /// Fields cut to keep the record within [`spool::MAX_RECORD_BYTES`], each with what was
    /// kept (`"dtmf: kept 256 of 5100000 digits"`); empty when nothing was cut. Added in
    /// format version 2 (version 1 records read back with it empty).
    pub truncated: Vec<String>,
    /// Local barge-in figures. Added in format version 3 (older records read back with
    /// them zero).
    pub barge_in: BargeInStats,
    /// The agent profile the call ran with (`default` for the top-level `[agent]`); `None`
    /// when it never reached one. Added in format version 3 (older records: `None`).
    pub profile: Option<String>,
}

/// Per-field bounds of a record ([`CallRecord::from_facts`] cuts beyond them and says so
/// in [`CallRecord::truncated`]); together far below [`spool::MAX_RECORD_BYTES`].
pub(crate) mod bounds {
    /// DTMF digits (the call keeps no more either: a compile-time check in `call` holds its
    /// limit to this one).
    pub(crate) const DTMF_CHARS: usize = 256;
    /// Bytes of one transcript line.
    pub(crate) const TRANSCRIPT_LINE_BYTES: usize = 4 * 1024;
    /// Bytes of the whole transcript.
    pub(crate) const TRANSCRIPT_BYTES: usize = 1024 * 1024;
    /// Tool calls, and bytes of one call's arguments.
    pub(crate) const TOOL_CALLS: usize = 256;
    /// Bytes of one tool call's arguments.
    pub(crate) const TOOL_ARGUMENT_BYTES: usize = 4 * 1024;
    /// Turn latencies.
    pub(crate) const TURNS: usize = 4096;
    /// Bytes of the outcome detail and of the caller number.
    pub(crate) const SHORT_TEXT_BYTES: usize = 1024;
}

/// `text` cut to at most `max` bytes on a character boundary; whether it was cut.
fn cut(text: &str, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text.to_owned(), false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_owned(), true)
}

impl CallRecord {
    /// The record of a finished call, caller number per `numbers`. Fields beyond [`bounds`]
    /// are cut and named in [`CallRecord::truncated`], so a record is never lost for being
    /// large.
    pub(crate) fn from_facts(s: &CallFacts<'_>, numbers: CallerNumbers) -> Self {
        let started = s
            .started
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let outcome = s.outcome;
        let mut truncated = Vec::new();
        let detail = s.detail.map(|d| {
            let (d, was) = cut(d, bounds::SHORT_TEXT_BYTES);
            if was {
                truncated.push(format!("detail: kept {} bytes", d.len()));
            }
            d
        });
        let caller_number = s
            .caller_number
            .and_then(|n| numbers.apply(n))
            .map(|n| cut(&n, bounds::SHORT_TEXT_BYTES).0);
        let (dtmf, _) = cut(s.dtmf, bounds::DTMF_CHARS);
        let dtmf_total = s.dtmf.len() as u64 + s.dtmf_dropped;
        if dtmf.len() as u64 != dtmf_total {
            truncated.push(format!("dtmf: kept {} of {dtmf_total} digits", dtmf.len()));
        }
        let transcript = bounded_transcript(s.transcript, &mut truncated);
        let tool_calls = bounded_tool_calls(s.tool_calls, &mut truncated);
        let turns = s.turn_latencies_ms.len().min(bounds::TURNS);
        if turns < s.turn_latencies_ms.len() {
            truncated.push(format!(
                "turn_latencies_ms: kept {turns} of {}",
                s.turn_latencies_ms.len()
            ));
        }
        let barge_ins = s.barge_in_latencies_ms.len().min(bounds::TURNS);
        if barge_ins < s.barge_in_latencies_ms.len() {
            truncated.push(format!(
                "barge_in.latencies_ms: kept {barge_ins} of {}",
                s.barge_in_latencies_ms.len()
            ));
        }
        CallRecord {
            call_id: s.call_id,
            caller_number,
            started_unix_ms: started.as_millis() as u64,
            ended_unix_ms: (started + s.duration).as_millis() as u64,
            duration_ms: s.duration.as_millis() as u64,
            agent: s.agent.to_owned(),
            outcome: outcome.to_owned(),
            detail,
            rate_hz: s.rate_hz,
            barge_ins: s.barge_ins,
            turn_latencies_ms: s.turn_latencies_ms[..turns].to_vec(),
            tool_calls,
            dtmf,
            transcript,
            frames_in: s.frames_in,
            frames_out: s.frames_out,
            underruns: s.underruns,
            truncated,
            barge_in: BargeInStats {
                latencies_ms: s.barge_in_latencies_ms[..barge_ins].to_vec(),
                false_barge_ins: s.false_barge_ins,
                backchannels: s.backchannels,
                resumed_audio_ms: s.resumed_audio_ms,
            },
            profile: s.profile.map(|p| cut(p, bounds::SHORT_TEXT_BYTES).0),
        }
    }
}

/// The transcript within [`bounds::TRANSCRIPT_BYTES`], each line within
/// [`bounds::TRANSCRIPT_LINE_BYTES`]; what was cut is noted in `truncated`.
fn bounded_transcript(
    lines: &[(Speaker, String)],
    truncated: &mut Vec<String>,
) -> Vec<TranscriptLine> {
    let mut transcript = Vec::new();
    let mut transcript_bytes = 0;
    let mut lines_cut = 0;
    for (speaker, text) in lines {
        let (text, was) = cut(text, bounds::TRANSCRIPT_LINE_BYTES);
        lines_cut += was as usize;
        if transcript_bytes + text.len() > bounds::TRANSCRIPT_BYTES {
            break;
        }
        transcript_bytes += text.len();
        transcript.push(TranscriptLine {
            speaker: *speaker,
            text,
        });
    }
    if transcript.len() < lines.len() || lines_cut > 0 {
        truncated.push(format!(
            "transcript: kept {} of {} lines, {lines_cut} lines cut to {} bytes",
            transcript.len(),
            lines.len(),
            bounds::TRANSCRIPT_LINE_BYTES
        ));
    }
    transcript
}

/// At most [`bounds::TOOL_CALLS`] tool calls, each argument text within
/// [`bounds::TOOL_ARGUMENT_BYTES`]; what was cut is noted in `truncated`.
fn bounded_tool_calls(
    calls: &[ToolCallRecord],
    truncated: &mut Vec<String>,
) -> Vec<ToolCallRecord> {
    let mut args_cut = 0;
    let tool_calls: Vec<ToolCallRecord> = calls
        .iter()
        .take(bounds::TOOL_CALLS)
        .map(|t| {
            let (arguments, was) = cut(&t.arguments, bounds::TOOL_ARGUMENT_BYTES);
            args_cut += was as usize;
            ToolCallRecord {
                name: cut(&t.name, bounds::SHORT_TEXT_BYTES).0,
                arguments,
            }
        })
        .collect();
    if tool_calls.len() < calls.len() || args_cut > 0 {
        truncated.push(format!(
            "tool_calls: kept {} of {}, {args_cut} argument texts cut",
            tool_calls.len(),
            calls.len()
        ));
    }
    tool_calls
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
