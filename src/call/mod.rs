//! Calls: the router that admits and accounts for them ([`route`]), the sans-IO call core
//! ([`core`]), its tokio driver ([`session`]) over any media transport ([`media`]; RTP in
//! [`media_rtp`]), what is kept of a call ([`CallSummary`]) and
//! the ARI Stasis application that joins a caller to a call ([`stasis`]).

pub mod core;
pub(crate) mod directory;
mod gates;
pub mod media;
pub mod media_rtp;
pub mod media_ws;
pub mod next;
pub mod record;
pub mod route;
pub mod session;
pub mod stasis;

pub use media::{AudioSocketPort, MediaError, MediaEvent, MediaPort};
pub use session::{CallSummary, Outcome, SessionParams, run_session};
