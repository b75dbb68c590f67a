//! What a finished call leaves: its [`CallSummary`] as the plain facts `records` keeps
//! ([`crate::records::CallFacts`]), and each [`Outcome`]'s record label.

use crate::call::session::MAX_DTMF_KEPT;
use crate::call::{CallSummary, Outcome};
use crate::records::{CallFacts, CallRecord, CallerNumbers};

// The call keeps no more DTMF digits than a record holds.
const _: () = assert!(MAX_DTMF_KEPT <= crate::records::bounds::DTMF_CHARS);

impl Outcome {
    /// The record label and detail: `completed`, `agent_ended`, `fallback`,
    /// `protocol_error`, `idle_timeout`, `shutdown`, `write_failed`, `max_duration`,
    /// `rejected`, `transferred`.
    pub fn label(&self) -> (&'static str, Option<&str>) {
        match self {
            Outcome::CallerHungUp => ("completed", None),
            Outcome::AgentEnded(r) => ("agent_ended", Some(r)),
            Outcome::Fallback(r) => ("fallback", Some(r)),
            Outcome::ProtocolError(r) => ("protocol_error", Some(r)),
            Outcome::IdleTimeout => ("idle_timeout", None),
            Outcome::Shutdown => ("shutdown", None),
            Outcome::WriteFailed(r) => ("write_failed", Some(r)),
            Outcome::MaxDuration => ("max_duration", None),
            Outcome::Rejected(r) => ("rejected", Some(r)),
            Outcome::Operator(r) => ("transferred", Some(r)),
        }
    }
}

impl CallSummary {
    /// The call's facts as `records` takes them.
    pub(crate) fn facts(&self) -> CallFacts<'_> {
        let (outcome, detail) = self.outcome.label();
        CallFacts {
            call_id: self.call_id,
            caller_number: self.caller_number.as_deref(),
            started: self.started,
            duration: self.duration,
            agent: self.agent,
            outcome,
            detail,
            rate_hz: self.rate_hz,
            barge_ins: self.barge_ins,
            turn_latencies_ms: &self.turn_latencies_ms,
            tool_calls: &self.tool_calls,
            dtmf: &self.dtmf,
            dtmf_dropped: self.dtmf_dropped,
            transcript: &self.transcript,
            frames_in: self.frames_in,
            frames_out: self.frames_out,
            underruns: self.underruns,
            barge_in_latencies_ms: &self.barge_in_latencies_ms,
            false_barge_ins: self.false_barge_ins,
            backchannels: self.backchannels,
            resumed_audio_ms: self.resumed_audio_ms,
            profile: self.profile.as_deref(),
        }
    }

    /// The call's record, caller number per `numbers` ([`CallRecord::from_facts`]).
    pub fn record(&self, numbers: CallerNumbers) -> CallRecord {
        CallRecord::from_facts(&self.facts(), numbers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Speaker, ToolCallRecord, spool};
    use uuid::Uuid;

    #[test]
    fn a_huge_summary_makes_a_cut_record_that_fits_and_says_so() {
        let mut s = CallSummary::without_agent(Uuid::from_u128(7), "echo", Outcome::CallerHungUp);
        s.dtmf = "1".repeat(MAX_DTMF_KEPT);
        s.dtmf_dropped = 5_100_000;
        s.transcript = vec![(Speaker::Caller, "ü".repeat(10_000)); 2_000];
        s.tool_calls = vec![
            ToolCallRecord {
                name: "t".into(),
                arguments: "x".repeat(100_000)
            };
            1_000
        ];
        s.turn_latencies_ms = vec![1; 100_000];
        let r = s.record(CallerNumbers::Full);
        let frame = spool::encode_frame(&r).expect("fits");
        assert!(frame.len() < spool::MAX_RECORD_BYTES, "{}", frame.len());
        assert_eq!(r.dtmf.len(), 256);
        assert!(
            r.truncated
                .iter()
                .any(|t| t == "dtmf: kept 256 of 5100256 digits"),
            "{:?}",
            r.truncated
        );
        assert_eq!(r.truncated.len(), 4, "{:?}", r.truncated);
        // A small call is kept whole and says nothing.
        let small = CallSummary::without_agent(Uuid::from_u128(8), "echo", Outcome::CallerHungUp);
        assert!(small.record(CallerNumbers::Full).truncated.is_empty());
    }
}
