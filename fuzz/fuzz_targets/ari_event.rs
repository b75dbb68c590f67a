//! Fuzzes the ARI event parser (Asterisk's `/ari/events` WebSocket messages).
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicegate::ari::Event;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Event::parse(text);
    }
});
