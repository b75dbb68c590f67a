//! Fuzzes the config parser and validator (`voicegate.toml`). Secrets named by `env` or
//! `credential` and files named by `*_file` keys are looked up like at start-up; the
//! validator must reject, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicegate::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_toml(text, std::path::Path::new("fuzz.toml"));
    }
});
