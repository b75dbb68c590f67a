//! The part of the integration suite that `.ci/run` runs for aarch64 under qemu-user
//! (docs/firmware.md): `tests/suite`'s `echo_call` and `appliance_guard` modules, built
//! alone (the whole suite would add minutes of cross-building). `test = false` in
//! Cargo.toml: `cargo test --all-targets` runs these tests in the suite, natively;
//! `cargo test --target aarch64-unknown-linux-musl --test firmware` runs this binary.

#[path = "../suite/appliance_guard.rs"]
mod appliance_guard;
#[path = "../common/call_logs.rs"]
mod call_logs;
#[path = "../common/mod.rs"]
mod common;
#[path = "../suite/echo_call.rs"]
mod echo_call;
