//! voicegate: answers Asterisk calls with a cloud voice agent.
//!
//! Asterisk hands a call over AudioSocket (TCP); voicegate streams the caller's audio to a
//! voice agent and plays the agent's audio back, one 20 ms frame every 20 ms, with barge-in.
//! See `docs/architecture.md` for one frame's path through these modules.
//!
//! - [`audiosocket`]: the sans-IO wire codec and the TCP listener.
//! - [`chanws`]: Asterisk's WebSocket media channel (`chan_websocket`): control protocol
//!   and listener.
//! - [`rtp`]: sans-IO RTP for ARI externalMedia over UDP (header, G.711/L16, jitter buffer).
//! - [`call`]: the per-call task that owns all of a call's state.
//! - [`audio`]: G.711, resampling, the playout buffer and clock.
//! - [`agent`]: the voice-agent interface and its providers.
//! - [`ari`]: the Asterisk REST Interface: Stasis mode, transfers, caller lookup.
//! - [`caller`]: a synthetic caller that behaves like Asterisk (`voicegate call`, `selftest`).
//! - [`config`], [`secret`], [`tls`]: configuration, secrets, TLS for cloud connections.
//! - [`guard`], [`fallback`], [`health`], [`records`]: the appliance: port guard and budget,
//!   the human fallback and circuit breaker, watchdog/health/metrics, call records.
//! - [`webhooks`]: each call's signed event to the CRM through an on-disk outbox.
//! - [`tools`]: tools the agent can call (HTTP lookups, hangup, transfer to an operator).
//! - [`tunnel`]: WireGuard inside the process (boringtun + smoltcp) to reach a remote Asterisk.
//!
//! Panic policy: input from the network never panics; a panic is a broken invariant, and
//! each `expect` names the invariant it relies on.

// No unsafe code but the counting allocator (`health::heap`, which allows it for itself).
#![deny(unsafe_code)]

pub mod agent;
pub mod app;
pub mod ari;
pub mod audio;
pub mod audiosocket;
mod backoff;
pub mod call;
pub mod caller;
pub mod chanws;
pub mod config;
pub mod console;
mod error;
pub mod fallback;
pub mod guard;
pub mod health;
pub mod profiles;
pub mod records;
pub mod rtp;
pub mod secret;
pub mod selftest;
pub mod tls;
pub mod tools;
pub mod tunnel;
pub mod wavfile;
mod webhooks;
