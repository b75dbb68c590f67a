//! Calls: the router that admits and accounts for them ([`route`]), the sans-IO call core
//! ([`core`]), its tokio driver ([`session`]) and what is kept of a call ([`CallSummary`]).

pub mod core;
pub mod directory;
mod gates;
pub mod next;
pub mod record;
pub mod route;
pub mod session;

pub use session::{CallSummary, Outcome, SessionParams, run_session};
