//! RTP (RFC 3550) for ARI externalMedia with `encapsulation=rtp&transport=udp`, sans-IO:
//! the packet header ([`packet`]), the payload formats and their slin conversion
//! ([`format`](mod@format): G.711 A-law and μ-law at 8 kHz, L16 at 16 kHz), a small adaptive jitter
//! buffer ([`jitter`]) and one call's endpoint that ties them together with the source check
//! and the sender's numbering ([`endpoint`]), and send pacing as seen at the socket
//! ([`pacing`]). No sockets and no clock: `now` is passed in.
//! The UDP socket and the call live above (`call::media_rtp`); like `audiosocket`, this
//! module knows the wire only, never a call or an agent.

pub(crate) mod endpoint;
pub(crate) mod format;
pub mod jitter;
pub(crate) mod pacing;
pub mod packet;

pub use endpoint::{Dropped, RtpEndpoint, RtpSender, RtpStats};
pub use format::RtpFormat;
pub use jitter::{JitterBuffer, JitterConfig, JitterStats, Tick};
