//! Fuzzes the chan_websocket control-message parsers (Asterisk's WebSocket media channel:
//! events from Asterisk, commands as its fakes read them) in both formats, and the playout
//! bookkeeping fed whatever events they yield.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voicegate::chanws::playout::Playout;
use voicegate::chanws::protocol::{Command, ControlFormat, Event};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let mut playout = Playout::new(1);
        for format in [ControlFormat::PlainText, ControlFormat::Json] {
            if let Ok(e) = Event::parse(text, format) {
                playout.frame_sent();
                playout.on_event(&e);
                let _ = Event::parse(&e.render(format, "1.1"), format);
            }
            let _ = Command::parse(text, format);
        }
    }
});
