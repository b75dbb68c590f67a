//! Fuzzes the RTP parser and one call's endpoint: arbitrary datagrams must never panic;
//! every datagram that parses re-emits to the same bytes (padding filler aside); the
//! endpoint (parse → payload type → decode → jitter buffer → playout) takes any sequence of
//! them, from the call's peer or a stranger, at any spacing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use voicegate::rtp::jitter::JitterConfig;
use voicegate::rtp::packet::parse;
use voicegate::rtp::{RtpEndpoint, RtpFormat, RtpSender};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the format; then records of `gap_ms: u8 | len: u8 | bytes`.
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let format = [RtpFormat::Ulaw, RtpFormat::Alaw, RtpFormat::Slin16][usize::from(pick % 3)];
    let peer = "127.0.0.1:17000".parse().unwrap();
    let stranger = "127.0.0.1:17001".parse().unwrap();
    let mut ep = RtpEndpoint::new(
        format,
        peer,
        JitterConfig::new(format.clock_hz()),
        RtpSender::new(format, 1, 0, 0),
    );
    let t0 = tokio::time::Instant::now();
    let mut now = t0;
    let mut out = Vec::new();
    while let [gap, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (datagram, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_millis(u64::from(*gap));
        if let Ok(p) = parse(datagram) {
            let mut again = Vec::new();
            p.header.emit(p.payload, &mut again);
            let keep = datagram.len() - usize::from(p.header.padding);
            assert_eq!(again.len(), datagram.len());
            assert_eq!(&again[..keep], &datagram[..keep]);
        }
        let from = if gap & 0x80 != 0 { stranger } else { peer };
        let _ = ep.handle_datagram(now, from, datagram);
        while let Some(t) = ep.poll_timeout().filter(|t| *t <= now) {
            if ep.poll_frame(t, &mut out).is_some() {
                assert_eq!(out.len(), format.samples_per_frame());
            }
        }
    }
    assert!(ep.stats().jitter.packets < 1 << 20);
});
