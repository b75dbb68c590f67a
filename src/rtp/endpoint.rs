//! One call's RTP endpoint, sans-IO: datagrams in ([`RtpEndpoint::handle_datagram`]) with
//! their source address and `now`; 20 ms frames of slin samples out of the jitter buffer
//! ([`RtpEndpoint::poll_frame`] at [`RtpEndpoint::poll_timeout`]); frames to send turned into
//! datagrams ([`RtpEndpoint::send_frame`]).
//!
//! Receiving: only datagrams from the call's own Asterisk address (`UNICASTRTP_LOCAL_ADDRESS`
//! : `UNICASTRTP_LOCAL_PORT`) count; any other source is dropped and counted (`foreign`),
//! as is anything that is not RTP (`malformed`) or carries another payload type
//! (`other_payload`: RFC 4733 DTMF events among them — in Stasis mode the digits reach the
//! call through ARI). A new SSRC (Asterisk changes it when the bridge changes) re-anchors the
//! jitter buffer.
//!
//! Sending ([`RtpSender`]): one packet per frame given, sequence numbers +1 and timestamps
//! plus the samples per packet without a gap (silence is sent too, so the stream is continuous),
//! the marker bit on the first packet of each talkspurt (a frame that is not all zeros
//! after one that was, RFC 3551 §4.1). Pacing — one frame every 20 ms — is the caller's:
//! the call core's playout clock.

use super::format::RtpFormat;
use super::jitter::{JitterBuffer, JitterConfig, JitterStats, Tick};
use super::packet::{RtpHeader, parse};
use std::net::SocketAddr;
use tokio::time::Instant;

/// Counters of the receiving side (the jitter buffer's are in [`RtpStats::jitter`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtpStats {
    /// Datagrams from an address other than the call's Asterisk, dropped.
    pub foreign: u64,
    /// Datagrams that are not RTP, dropped.
    pub malformed: u64,
    /// RTP packets of another payload type, dropped.
    pub other_payload: u64,
    /// SSRC changes seen.
    pub ssrc_changes: u64,
    /// Packets sent.
    pub sent: u64,
    /// The jitter buffer's counters.
    pub jitter: JitterStats,
}

/// Why a datagram was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// It came from another address.
    Foreign,
    /// It is not RTP.
    Malformed,
    /// Its payload type is not the call's format.
    OtherPayload(u8),
}

/// The sending side: sequence numbers, timestamps, the marker bit.
#[derive(Debug, Clone)]
pub struct RtpSender {
    format: RtpFormat,
    ssrc: u32,
    sequence: u16,
    timestamp: u32,
    talking: bool,
    payload: Vec<u8>,
}

impl RtpSender {
    /// A sender for `format` starting at `sequence` and `timestamp` (random, RFC 3550 §5.1)
    /// with source `ssrc`.
    pub fn new(format: RtpFormat, ssrc: u32, sequence: u16, timestamp: u32) -> Self {
        RtpSender {
            format,
            ssrc,
            sequence,
            timestamp,
            talking: false,
            payload: Vec::with_capacity(format.samples_per_frame() * 2),
        }
    }

    /// Appends the datagram for `samples` (slin at the format's rate) to `out`, and moves
    /// sequence and timestamp on.
    pub fn packet(&mut self, samples: &[i16], out: &mut Vec<u8>) {
        let silent = samples.iter().all(|&s| s == 0);
        let mut h = RtpHeader::new(
            self.format.payload_type(),
            self.sequence,
            self.timestamp,
            self.ssrc,
        );
        h.marker = !silent && !self.talking;
        self.talking = !silent;
        self.payload.clear();
        self.format.encode(samples, &mut self.payload);
        h.emit(&self.payload, out);
        self.sequence = self.sequence.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(samples.len() as u32);
    }
}

/// One call's RTP endpoint.
#[derive(Debug)]
pub struct RtpEndpoint {
    format: RtpFormat,
    peer: SocketAddr,
    ssrc_in: Option<u32>,
    jitter: JitterBuffer,
    sender: RtpSender,
    decoded: Vec<i16>,
    stats: RtpStats,
}

impl RtpEndpoint {
    /// An endpoint talking `format` with Asterisk at `peer`; `sender` numbers what it sends.
    pub fn new(
        format: RtpFormat,
        peer: SocketAddr,
        jitter: JitterConfig,
        sender: RtpSender,
    ) -> Self {
        RtpEndpoint {
            format,
            peer,
            ssrc_in: None,
            jitter: JitterBuffer::new(jitter),
            sender,
            decoded: Vec::with_capacity(format.samples_per_frame()),
            stats: RtpStats::default(),
        }
    }

    /// The address datagrams must come from and are sent to.
    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Counters.
    pub fn stats(&self) -> RtpStats {
        RtpStats {
            jitter: self.jitter.stats(),
            ..self.stats
        }
    }

    /// A datagram from `from` arrived at `now`.
    ///
    /// # Errors
    /// [`Dropped`] says why it was not taken (each reason is counted).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), Dropped> {
        if from != self.peer {
            self.stats.foreign += 1;
            return Err(Dropped::Foreign);
        }
        let Ok(p) = parse(datagram) else {
            self.stats.malformed += 1;
            return Err(Dropped::Malformed);
        };
        let h = p.header;
        if h.payload_type != self.format.payload_type() {
            self.stats.other_payload += 1;
            return Err(Dropped::OtherPayload(h.payload_type));
        }
        if self.ssrc_in.is_some_and(|s| s != h.ssrc) {
            self.stats.ssrc_changes += 1;
            let cfg = self.jitter.config();
            let kept = self.jitter.stats();
            self.jitter = JitterBuffer::with_stats(cfg, kept);
        }
        self.ssrc_in = Some(h.ssrc);
        self.decoded.clear();
        self.format.decode(p.payload, &mut self.decoded);
        self.jitter
            .insert(now, h.sequence, h.timestamp, h.marker, &self.decoded);
        Ok(())
    }

    /// The frame due at `now` into `out`; see [`JitterBuffer::poll_frame`].
    pub fn poll_frame(&mut self, now: Instant, out: &mut Vec<i16>) -> Option<Tick> {
        self.jitter.poll_frame(now, out)
    }

    /// When a frame is next due; `None` while nothing is coming.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.jitter.poll_timeout()
    }

    /// Appends the datagram carrying `samples` (one 20 ms frame at the format's rate) to
    /// `out`; send it to [`Self::peer`].
    pub(crate) fn send_frame(&mut self, samples: &[i16], out: &mut Vec<u8>) {
        self.stats.sent += 1;
        self.sender.packet(samples, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn asterisk() -> SocketAddr {
        "127.0.0.1:17000".parse().unwrap()
    }

    fn endpoint(format: RtpFormat) -> RtpEndpoint {
        RtpEndpoint::new(
            format,
            asterisk(),
            JitterConfig::new(format.clock_hz()),
            RtpSender::new(format, 0x1234, 100, 9_000),
        )
    }

    fn pcma(seq: u16, ts: u32, ssrc: u32, value: i16) -> Vec<u8> {
        let mut payload = Vec::new();
        RtpFormat::Alaw.encode(&[value; 160], &mut payload);
        let mut d = Vec::new();
        RtpHeader::new(8, seq, ts, ssrc).emit(&payload, &mut d);
        d
    }

    #[test]
    fn a_foreign_source_is_dropped_and_never_heard() {
        let t0 = Instant::now();
        let mut ep = endpoint(RtpFormat::Alaw);
        let stranger: SocketAddr = "127.0.0.2:17000".parse().unwrap();
        let other_port: SocketAddr = "127.0.0.1:17001".parse().unwrap();
        for i in 0..10u16 {
            let now = t0 + Duration::from_millis(u64::from(i) * 20);
            assert_eq!(
                ep.handle_datagram(now, stranger, &pcma(i, u32::from(i) * 160, 7, 8_000)),
                Err(Dropped::Foreign)
            );
            assert_eq!(
                ep.handle_datagram(now, other_port, &pcma(i, u32::from(i) * 160, 7, 8_000)),
                Err(Dropped::Foreign)
            );
        }
        assert_eq!(ep.stats().foreign, 20);
        assert_eq!(ep.poll_timeout(), None, "nothing buffered, no clock");
        // The real source is heard; the stranger's packets interleaved change nothing.
        let mut heard = Vec::new();
        let mut out = Vec::new();
        for i in 0..10u16 {
            let now = t0 + Duration::from_millis(u64::from(i) * 20);
            ep.handle_datagram(now, asterisk(), &pcma(i, u32::from(i) * 160, 1, 100))
                .unwrap();
            let _ = ep.handle_datagram(now, stranger, &pcma(i, u32::from(i) * 160, 7, 8_000));
            while let Some(t) = ep.poll_timeout().filter(|t| *t <= now) {
                if ep.poll_frame(t, &mut out) == Some(Tick::Audio) {
                    heard.push(out[0]);
                }
            }
        }
        assert_eq!(heard.len(), 8);
        assert!(heard.iter().all(|&s| (s - 100).abs() < 16), "{heard:?}");
        assert_eq!(ep.stats().foreign, 30);
    }

    #[test]
    fn other_payloads_and_garbage_are_counted() {
        let t0 = Instant::now();
        let mut ep = endpoint(RtpFormat::Ulaw);
        assert_eq!(
            ep.handle_datagram(t0, asterisk(), &pcma(1, 0, 1, 0)),
            Err(Dropped::OtherPayload(8))
        );
        assert_eq!(
            ep.handle_datagram(t0, asterisk(), b"hello"),
            Err(Dropped::Malformed)
        );
        let s = ep.stats();
        assert_eq!((s.other_payload, s.malformed, s.jitter.packets), (1, 1, 0));
    }

    #[test]
    fn sender_numbers_continuously_and_marks_talkspurts() {
        let mut s = RtpSender::new(RtpFormat::Ulaw, 0xABCD, u16::MAX - 1, u32::MAX - 159);
        let speech = [500i16; 160];
        let silence = [0i16; 160];
        let mut seen = Vec::new();
        for frame in [&silence, &speech, &speech, &silence, &speech] {
            let mut d = Vec::new();
            s.packet(frame, &mut d);
            let p = parse(&d).unwrap();
            assert_eq!(
                (p.header.payload_type, p.header.ssrc, p.payload.len()),
                (0, 0xABCD, 160)
            );
            seen.push((p.header.sequence, p.header.timestamp, p.header.marker));
        }
        assert_eq!(
            seen,
            vec![
                (u16::MAX - 1, u32::MAX - 159, false),
                (u16::MAX, 0, true),
                (0, 160, false),
                (1, 320, false),
                (2, 480, true),
            ]
        );
    }

    #[test]
    fn slin16_round_trips_through_the_endpoint() {
        let t0 = Instant::now();
        let mut tx = RtpSender::new(RtpFormat::Slin16, 5, 0, 0);
        let mut ep = endpoint(RtpFormat::Slin16);
        let mut out = Vec::new();
        let mut heard = Vec::new();
        for i in 0..5i16 {
            let now = t0 + Duration::from_millis(i as u64 * 20);
            let samples: Vec<i16> = (0..320).map(|k| k * 7 - 1000 * i).collect();
            let mut d = Vec::new();
            tx.packet(&samples, &mut d);
            assert_eq!(d.len(), 12 + 640);
            ep.handle_datagram(now, asterisk(), &d).unwrap();
            while let Some(t) = ep.poll_timeout().filter(|t| *t <= now) {
                if ep.poll_frame(t, &mut out) == Some(Tick::Audio) {
                    heard.push(out.clone());
                }
            }
        }
        assert_eq!(heard.len(), 3);
        assert_eq!(heard[0], (0..320).map(|k| k * 7).collect::<Vec<i16>>());
    }

    #[test]
    fn a_new_ssrc_re_anchors_the_buffer() {
        let t0 = Instant::now();
        let mut ep = endpoint(RtpFormat::Alaw);
        ep.handle_datagram(t0, asterisk(), &pcma(10, 1600, 1, 100))
            .unwrap();
        ep.handle_datagram(
            t0 + Duration::from_millis(20),
            asterisk(),
            &pcma(5000, 90_000, 2, 100),
        )
        .unwrap();
        let s = ep.stats();
        assert_eq!((s.ssrc_changes, s.jitter.packets, s.jitter.late), (1, 2, 0));
    }
}
