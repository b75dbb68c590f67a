//! ARI, the Asterisk REST Interface: the REST [`client`], the [`events`] WebSocket, the JSON
//! [`model`] and the `[ari]` [`config`]. The protocol only: the Stasis application that joins
//! a caller to a call (and looks up callers of `AudioSocket()` calls) is
//! `call::stasis`, one layer up.
//!
//! What a real Asterisk 22 does on the wire is in `asterisk.md`; the parts this module
//! relies on: externalMedia connects to voicegate at once with `data` as the call id, audio
//! flows once both channels are in a mixing bridge, every control request on a channel outside
//! Stasis answers 409, `continue` is confirmed by `StasisEnd`.
//!
//! Never: a password in a log line or URL; an agent, session or call type (this layer knows
//! the protocol, not what a call is).

pub(crate) mod client;
pub mod config;
pub(crate) mod events;
#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod model;

pub use client::{AriClient, AriError};
pub use events::{EventLink, LinkState};
pub use model::{Channel, Event};
