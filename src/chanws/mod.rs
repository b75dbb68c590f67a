//! Asterisk's WebSocket media channel (`chan_websocket`, Asterisk 20.18+, 22.8+, 23.2+):
//! the sans-IO control [`protocol`] (text and JSON control messages), one call's
//! [`connection`] (media and control over the WebSocket), the [`playout`] bookkeeping of
//! Asterisk's queue (marks, flow control, flush) and the listener Asterisk connects
//! to for `Dial(WebSocket/<connection>/...)` ([`server`]), with its `[websocket]`
//! [`config`]; and the other way round, voicegate connecting to Asterisk's
//! `/media/<connection id>` for a `WebSocket/INCOMING` channel ([`client`]). It knows the
//! wire only, never a call or an agent.

pub(crate) mod client;
pub mod config;
pub(crate) mod connection;
pub mod playout;
pub mod protocol;
pub mod server;

pub use connection::{ChannelError, Inbound, MediaChannel};
pub use protocol::{Command, ControlFormat, Event, MediaFormat, MediaStart, ParseError, Status};
