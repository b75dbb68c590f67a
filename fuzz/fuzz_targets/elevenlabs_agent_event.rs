//! Fuzzes the ElevenLabs Agents server-message parser (`providers.md` §2): any text must
//! parse or fail without a panic; the formats it names and the audio it carries are then
//! handled as the session loop handles them (format names, base64, G.711/PCM decoding).
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use libfuzzer_sys::fuzz_target;
use voicegate::agent::elevenlabs_agent::{ServerMessage, parse_format, parse_server_message};
use voicegate::audio::convert::{Decoder, WireFormat};
use voicegate::audio::g711::Law;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_server_message(text) {
        Ok(ServerMessage::Metadata {
            input_format,
            output_format,
            ..
        }) => {
            for name in [input_format, output_format] {
                if let Some(format) = parse_format(&name) {
                    let _ = Decoder::new(format, 8_000);
                }
            }
        }
        Ok(ServerMessage::Audio {
            audio_base_64: Some(b64),
            ..
        }) => {
            if let Ok(bytes) = B64.decode(b64) {
                let mut samples = Vec::new();
                for format in [
                    WireFormat::G711(Law::Ulaw),
                    WireFormat::Pcm16 { rate_hz: 16_000 },
                ] {
                    // Invariant: both formats are supported for an 8 kHz call.
                    let mut decoder = Decoder::new(format, 8_000).expect("supported format");
                    decoder.decode(&bytes, &mut samples);
                }
            }
        }
        _ => {}
    }
});
