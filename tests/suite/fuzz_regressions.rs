//! Inputs the fuzzers flagged, kept as regression tests through the same public entry points
//! the fuzz targets use (`fuzz/fuzz_targets/`).

use voicegate::agent::cascade::config::{SttConfig, SttProvider};
use voicegate::agent::cascade::stt;
use voicegate::secret::Secret;

/// libFuzzer's `slow-unit-d19997bddb34914cffd5889c338609636364ec01`, once committed under
/// `fuzz/`: a `cascade_stt` input (first byte 0x00 = Soniox at 8 kHz), mutated from
/// `fuzz/corpus/cascade_stt/soniox`, then 86 NUL-separated messages, most of them empty.
/// libFuzzer writes `slow-unit-*` when one execution exceeds `-report_slow_units` (10 s of
/// wall-clock time). Replayed through the target's code it takes about 1 ms (debug build),
/// linear in its size; nothing in the Soniox parser (nor the other vendors', which the first
/// byte could pick) does more than one JSON parse per message. The slowness was the shared,
/// loaded machine the run had (a stalled process), not the input; see docs/fuzzing.md.
const SLOW_UNIT: &[u8] =
    b"\x00{\"tokens\": [{\"text\": \"roc_^ \"t<\x0a\x00#e\"\": [{10, \"end\x7fms\": 10\
      0, \"col_audio_proc\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
      \x00\x00\x00\x00\x00\x00\x00\x00_ \"t<\x0a\x00#e\"\": [{\"text\": \"Hel\", \"sta\
      rt_ms\": 10, \"end\x7fms\": 100, \"col_audio_proc_ : \"bad key\"}";

/// The target's own steps (`fuzz/fuzz_targets/cascade_stt.rs`): the first byte picks the
/// vendor and rate, the rest is NUL-separated messages to one protocol instance.
fn run_cascade_stt(data: &[u8]) -> (usize, usize, usize) {
    let (&pick, rest) = data.split_first().expect("non-empty");
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
    let (mut messages, mut refused) = (0, 0);
    for msg in rest.split(|&b| b == 0) {
        if let Ok(text) = std::str::from_utf8(msg) {
            messages += 1;
            refused += usize::from(proto.on_text(text, &mut out).is_err());
        }
    }
    (messages, refused, out.len())
}

/// Every message of the slow unit is malformed JSON or empty: each vendor's parser refuses
/// it without emitting anything, message by message.
#[test]
fn cascade_stt_slow_unit_is_refused_message_by_message() {
    for pick in [0x00u8, 0x01, 0x02, 0x03, 0x80] {
        let mut data = SLOW_UNIT.to_vec();
        data[0] = pick;
        let (messages, refused, emitted) = run_cascade_stt(&data);
        assert_eq!(messages, 86, "vendor byte {pick:#04x}");
        assert_eq!(
            emitted, 0,
            "vendor byte {pick:#04x}: nothing from malformed input"
        );
        assert!(
            refused >= 4,
            "vendor byte {pick:#04x}: the non-empty malformed messages are errors ({refused})"
        );
    }
    assert_eq!(SLOW_UNIT.len(), 249);
}
