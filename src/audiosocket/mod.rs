//! AudioSocket, Asterisk's TCP audio protocol: the sans-IO [`codec`], the framing over a
//! byte stream ([`connection`]) and the TCP listener ([`server`]). It knows the wire only,
//! never a call or an agent.

pub mod codec;
pub mod config;
pub mod connection;
pub mod server;

pub use codec::{Message, SlinRate};
pub use connection::{Connection, ReadError, read_message};
