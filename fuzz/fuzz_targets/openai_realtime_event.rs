//! Fuzzes the OpenAI Realtime protocol as it runs in a call (`providers.md` §1): arbitrary
//! server messages, one per line, go through `handle_server` of the sans-IO protocol, in a
//! session's set-up and in the live session, with its timers; nothing may panic. The hook
//! exists only under `--cfg fuzzing` (cargo-fuzz sets it), so a plain `cargo check` of this
//! crate builds an empty target.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    #[cfg(fuzzing)]
    voicegate::agent::openai_realtime::fuzz_server_messages(data);
    #[cfg(not(fuzzing))]
    let _ = data;
});
