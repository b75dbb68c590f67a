//! The audio payload formats voicegate speaks over RTP, and their conversion from and to slin
//! samples (`i16`, the call's native form).
//!
//! | format   | RTP payload type            | clock    | 20 ms payload | sample encoding          |
//! |----------|-----------------------------|----------|---------------|--------------------------|
//! | `ulaw`   | 0 (PCMU, RFC 3551 §4.5.14)  | 8 000 Hz | 160 bytes     | G.711 μ-law, 1 byte      |
//! | `alaw`   | 8 (PCMA, RFC 3551 §4.5.14)  | 8 000 Hz | 160 bytes     | G.711 A-law, 1 byte      |
//! | `slin16` | 118 (L16/16000)             | 16 000 Hz| 640 bytes     | 16-bit **big-endian**    |
//!
//! Payload types are Asterisk's static table (`main/rtp_engine.c`, `add_static_payload`):
//! chan_rtp's `UnicastRTP` channel, which ARI externalMedia creates, sends and expects
//! these. L16 is in network byte order (RFC 3551 §4.5.11; Asterisk byte-swaps it in
//! `res_rtp_asterisk.c`). G.711 goes through the `audio-codec-algorithms` crate, as in
//! `audio::g711`.

use audio_codec_algorithms::{decode_alaw, decode_ulaw, encode_alaw, encode_ulaw};

/// An RTP audio payload format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RtpFormat {
    /// G.711 μ-law, PT 0, 8 kHz.
    Ulaw,
    /// G.711 A-law, PT 8, 8 kHz.
    Alaw,
    /// 16-bit linear, big-endian, PT 118, 16 kHz.
    Slin16,
}

impl RtpFormat {
    /// The RTP payload type Asterisk uses for this format.
    pub(crate) const fn payload_type(self) -> u8 {
        match self {
            RtpFormat::Ulaw => 0,
            RtpFormat::Alaw => 8,
            RtpFormat::Slin16 => 118,
        }
    }

    /// The RTP clock rate in Hz (also the sample rate).
    pub const fn clock_hz(self) -> u32 {
        match self {
            RtpFormat::Ulaw | RtpFormat::Alaw => 8_000,
            RtpFormat::Slin16 => 16_000,
        }
    }

    /// Samples in 20 ms (160 or 320).
    pub const fn samples_per_frame(self) -> usize {
        (self.clock_hz() / 50) as usize
    }

    /// Payload bytes per sample (1 for G.711, 2 for L16).
    #[cfg(test)]
    pub(crate) const fn bytes_per_sample(self) -> usize {
        match self {
            RtpFormat::Ulaw | RtpFormat::Alaw => 1,
            RtpFormat::Slin16 => 2,
        }
    }

    /// Appends the samples of `payload` to `out`. An odd trailing byte of L16 is ignored.
    pub fn decode(self, payload: &[u8], out: &mut Vec<i16>) {
        match self {
            RtpFormat::Ulaw => out.extend(payload.iter().map(|&b| decode_ulaw(b))),
            RtpFormat::Alaw => out.extend(payload.iter().map(|&b| decode_alaw(b))),
            RtpFormat::Slin16 => out.extend(
                payload
                    .chunks_exact(2)
                    .map(|c| i16::from_be_bytes([c[0], c[1]])),
            ),
        }
    }

    /// Appends the payload for `samples` to `out`.
    pub(crate) fn encode(self, samples: &[i16], out: &mut Vec<u8>) {
        match self {
            RtpFormat::Ulaw => out.extend(samples.iter().map(|&s| encode_ulaw(s))),
            RtpFormat::Alaw => out.extend(samples.iter().map(|&s| encode_alaw(s))),
            RtpFormat::Slin16 => {
                for s in samples {
                    out.extend_from_slice(&s.to_be_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_codes_and_sizes() {
        let mut out = Vec::new();
        RtpFormat::Ulaw.encode(&[0; 160], &mut out);
        assert!(out.iter().all(|&b| b == 0xFF));
        out.clear();
        RtpFormat::Alaw.encode(&[0; 160], &mut out);
        assert!(out.iter().all(|&b| b == 0xD5));
        out.clear();
        RtpFormat::Slin16.encode(&[0x0102; 320], &mut out);
        assert_eq!(out.len(), 640);
        assert_eq!(&out[..2], &[0x01, 0x02], "L16 is big-endian");
    }

    #[test]
    fn each_format_round_trips_closely() {
        let samples: Vec<i16> = (0..320)
            .map(|i| ((i * 97) % 20_000 - 10_000) as i16)
            .collect();
        for f in [RtpFormat::Ulaw, RtpFormat::Alaw, RtpFormat::Slin16] {
            let mut payload = Vec::new();
            f.encode(&samples, &mut payload);
            assert_eq!(payload.len(), samples.len() * f.bytes_per_sample());
            let mut back = Vec::new();
            f.decode(&payload, &mut back);
            for (a, b) in samples.iter().zip(&back) {
                let tol = i32::from(*a).abs() / 16 + 16;
                assert!(
                    (i32::from(*a) - i32::from(*b)).abs() <= tol,
                    "{f:?}: {a} -> {b}"
                );
            }
        }
    }
}
