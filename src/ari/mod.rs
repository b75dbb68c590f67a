//! ARI, the Asterisk REST Interface: the REST [`client`], the [`events`] WebSocket, the JSON
//! [`model`], and the [`controller`] that runs voicegate's Stasis application and looks up
//! callers of `AudioSocket()` calls.
//!
//! What a real Asterisk 22 does on the wire is in `asterisk.md`; the parts this module
//! relies on: externalMedia connects to voicegate at once with `data` as the call id, audio
//! flows once both channels are in a mixing bridge, every control request on a channel outside
//! Stasis answers 409, `continue` is confirmed by `StasisEnd`.
//!
//! Never: a password in a log line or URL, a caller left in silence when a transfer fails
//! (retry once, then hang up, logged), a bridge or externalMedia channel left behind.

pub mod client;
pub mod config;
pub mod controller;
pub mod events;
pub mod model;

pub use client::{AriClient, AriError};
pub use controller::{AriRuntime, AriSettings, AriStats, Controller};
pub use events::{EventLink, LinkState};
pub use model::{Channel, Event};
