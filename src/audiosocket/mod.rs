//! AudioSocket, Asterisk's TCP audio protocol: the sans-IO [`codec`] and the TCP [`server`].

pub mod codec;
pub mod config;
pub mod server;

pub use codec::{Message, SlinRate};
