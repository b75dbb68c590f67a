//! Fuzzes the AudioSocket decoder: arbitrary bytes, delivered in arbitrary pieces, must never
//! panic; every decoded message must re-encode to exactly the bytes it was decoded from.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use voicegate::audiosocket::codec::{decode, encode};

fuzz_target!(|data: &[u8]| {
    // The first byte picks where TCP splits the stream.
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let cut = (split as usize).min(stream.len());
    let mut buf = BytesMut::from(&stream[..cut]);
    let mut consumed = 0usize;
    let mut fed = cut;
    loop {
        let before = buf.len();
        match decode(&mut buf) {
            Ok(Some(message)) => {
                let frame_len = before - buf.len();
                let mut again = BytesMut::new();
                encode(&message, &mut again);
                assert_eq!(&again[..], &stream[consumed..consumed + frame_len]);
                consumed += frame_len;
            }
            Ok(None) if fed < stream.len() => {
                buf.extend_from_slice(&stream[fed..]);
                fed = stream.len();
            }
            Ok(None) | Err(_) => break,
        }
    }
});
