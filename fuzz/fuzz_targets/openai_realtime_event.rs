//! Fuzzes the OpenAI Realtime server-event reader (`providers.md` §1): any text must parse
//! or fail without a panic, and its audio, formats and error description must be handled.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicegate::agent::openai_realtime::inspect_server_event;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = inspect_server_event(text);
    }
});
