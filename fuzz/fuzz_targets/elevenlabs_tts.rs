//! Fuzzes the ElevenLabs TTS WebSocket message reader (`providers.md` §3): JSON, base64
//! audio and character alignment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicegate::agent::cascade::tts::inspect_message;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = inspect_message(text);
    }
});
