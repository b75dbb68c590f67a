//! The integration tests, in one test binary (issue 15): cargo runs test binaries one after
//! another, so tests in separate binaries never overlap, and a binary with one long test left
//! the rest of the machine idle. Here every test waits beside the others (eight at a time,
//! `.cargo/config.toml`), each module one former `tests/<name>.rs`: `cargo test --test suite
//! <name>::` runs one of them.
//!
//! Kept apart: `image_boot` (an `#[ignore]`d test `.ci/run` runs once it has built the
//! image), and `tests/firmware` (this suite's `echo_call` and `appliance_guard` modules
//! alone, which `.ci/run` builds and runs for aarch64 under qemu-user).

#[path = "../common/call_logs.rs"]
mod call_logs;
#[path = "../cascade_fakes/mod.rs"]
mod cascade_fakes;
#[path = "../common/mod.rs"]
mod common;
#[path = "../fake_ari/mod.rs"]
mod fake_ari;
#[path = "../common/fake_openai.rs"]
mod fake_openai;
#[path = "../real_asterisk_support/mod.rs"]
mod real_asterisk_support;
#[path = "../skip/mod.rs"]
mod skip;
#[path = "../support/mod.rs"]
mod support;
#[path = "../tunnel_support/mod.rs"]
mod tunnel_support;

mod abuse;
mod agent_configs;
mod appliance_guard;
mod appliance_notify;
mod ari;
mod asterisk;
mod asterisk_configs;
mod cascade;
mod cascade_call_ids;
mod cascade_pushback;
mod cli;
mod console_api;
mod console_browser;
mod console_summary;
mod echo_call;
mod elevenlabs_agent;
mod faults;
mod fuzz_regressions;
mod layers;
mod monitoring;
mod nftables;
mod openai_realtime;
mod profile_limits;
mod profiles;
mod profiles_service;
mod promises;
mod provider_quota;
mod records_kill;
mod systemd_units;
mod tools;
mod tunnel_loopback;
mod tunnel_service;
mod webhooks;
mod wireguard_asterisk;
mod wireguard_cli;
mod wireguard_interop;

/// Every scenario of [`asterisk`] (a real Asterisk), in a process of its own: this test
/// binary run again for the `#[ignore]`d tests of that module, four at a time (the 20 + 10 Stasis calls, which sort
/// first, beside three scenarios in their [`real_asterisk_support::AT_ONCE`] slots). In the
/// suite's own process the scenarios would hold libtest's threads while they wait for a slot,
/// and the rest of the suite would wait behind them; in their own process they run beside it.
/// The child's output is printed here; any scenario that fails fails this test. Its name sorts
/// first, so the longest run of the suite starts at once.
#[test]
fn a_real_asterisk_passes_every_scenario_in_a_process_of_its_own() {
    let child = || {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.arg("asterisk::").arg("--ignored");
        cmd
    };
    let list = child().args(["--list", "--format=terse"]).output().unwrap();
    let listed = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count();
    let out = child().arg("--test-threads=4").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or("no test result");
    assert!(
        out.status.success(),
        "the real-Asterisk scenarios: {summary}"
    );
    assert!(
        listed >= 30 && summary.contains(&format!(" {listed} passed; 0 failed")),
        "every one of the {listed} scenarios ran and passed: {summary}"
    );
}
