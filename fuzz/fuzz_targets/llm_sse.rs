//! Fuzzes the Chat Completions stream reader (`providers.md` §7): SSE framing, chunk JSON
//! and tool-call assembly over arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicegate::agent::cascade::llm::inspect_stream;

fuzz_target!(|data: &[u8]| {
    let _ = inspect_stream(data);
});
