//! Fuzzes the ElevenLabs TTS WebSocket messages (`providers.md` §3: JSON, base64 audio,
//! character alignment, errors, `isFinal`) through the socket task's own handler
//! (`tts::fuzz_server_messages`, built with `--cfg fuzzing`), one message per line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicegate::agent::cascade::tts::fuzz_server_messages;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let lines: Vec<&str> = text.lines().collect();
        let _ = fuzz_server_messages(&lines);
    }
});
