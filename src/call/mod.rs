//! One call: the per-call task ([`session`]) and what is kept of it ([`CallSummary`]).

pub mod session;

pub use session::{CallSummary, Outcome, SessionParams, run_session};
pub mod directory;
pub mod next;
pub mod record;
