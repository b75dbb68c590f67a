//! Fuzzes the cascade's streaming STT message parsers (Soniox §5, Deepgram §6 and Flux,
//! ElevenLabs Scribe §4): the first byte picks the vendor, the rest is a sequence of text messages
//! separated by NUL bytes, fed to one protocol instance (so turn state carries over).
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicegate::agent::cascade::config::{SttConfig, SttProvider};
use voicegate::agent::cascade::stt;
use voicegate::secret::Secret;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (provider, model) = match pick % 4 {
        0 => (SttProvider::Soniox, None),
        1 => (SttProvider::Deepgram, None),
        2 => (SttProvider::Deepgram, Some("flux-general-en".to_owned())),
        _ => (SttProvider::Elevenlabs, None),
    };
    let cfg = SttConfig {
        provider,
        model,
        ..SttConfig::default()
    };
    let rate = if pick & 0x80 != 0 { 16_000 } else { 8_000 };
    let mut proto = stt::protocol(&cfg, Secret::new("fuzz-key"), rate);
    let mut out = Vec::new();
    for msg in rest.split(|&b| b == 0) {
        if let Ok(text) = std::str::from_utf8(msg) {
            let _ = proto.on_text(text, &mut out);
        }
    }
});
