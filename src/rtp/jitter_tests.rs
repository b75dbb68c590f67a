//! The jitter buffer on a simulated network and clock: every packet is sent at `i × 20 ms`,
//! arrives after a per-packet delay (or never), and the buffer's clock is polled at exactly
//! its deadlines. Each frame's samples all carry the frame's number, so the output shows
//! which frame played when.

use super::*;

const SPF: usize = 160;

/// Frame `i`'s sample value: loud (above [`QUIET_PEAK`]) below 10 000, so never skipped.
fn loud(i: usize) -> i16 {
    1_000 + i as i16
}

struct Sent {
    frame: usize,
    arrive_ms: u64,
    copies: usize,
}

/// One played frame: its tick time (ms from the start), what it was, and the frame number
/// (`None` for concealment).
#[derive(Debug, Clone, Copy)]
struct Played {
    at_ms: u64,
    frame: Option<usize>,
}

/// Runs the buffer over `sent` until `end_ms`; `value` maps a frame number to its sample.
fn run(
    cfg: JitterConfig,
    mut sent: Vec<Sent>,
    end_ms: u64,
    value: impl Fn(usize) -> i16,
    ident: impl Fn(i16) -> usize,
) -> (Vec<Played>, JitterBuffer, usize) {
    let t0 = Instant::now();
    let mut jb = JitterBuffer::new(cfg);
    sent.sort_by_key(|s| s.arrive_ms);
    let mut out = Vec::new();
    let mut played = Vec::new();
    let mut max_depth = 0;
    let mut i = 0;
    loop {
        let next_arrival = sent.get(i).map(|s| t0 + Duration::from_millis(s.arrive_ms));
        let next_tick = jb.poll_timeout();
        let now = match (next_arrival, next_tick) {
            (Some(a), Some(t)) => a.min(t),
            (Some(a), None) => a,
            (None, Some(t)) => t,
            (None, None) => break,
        };
        if now > t0 + Duration::from_millis(end_ms) {
            break;
        }
        if next_arrival == Some(now) {
            let s = &sent[i];
            let samples = vec![value(s.frame); SPF];
            for _ in 0..s.copies {
                jb.insert(
                    now,
                    1000u16.wrapping_add(s.frame as u16),
                    5_000u32.wrapping_add((s.frame * SPF) as u32),
                    s.frame == 0,
                    &samples,
                );
            }
            max_depth = max_depth.max(jb.depth_frames());
            i += 1;
            continue;
        }
        if let Some(tick) = jb.poll_frame(now, &mut out) {
            assert_eq!(out.len(), SPF);
            let at_ms = (now - t0).as_millis() as u64;
            played.push(Played {
                at_ms,
                frame: (tick == Tick::Audio).then(|| ident(out[0])),
            });
        }
    }
    (played, jb, max_depth)
}

/// Deterministic pseudo-random numbers (a 64-bit LCG), so the test is the same every run.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn frames_played(p: &[Played]) -> Vec<usize> {
    p.iter().filter_map(|p| p.frame).collect()
}

#[test]
fn plays_every_frame_in_order_after_the_initial_delay() {
    let sent = (0..100)
        .map(|f| Sent {
            frame: f,
            arrive_ms: f as u64 * 20,
            copies: 1,
        })
        .collect();
    let (played, jb, _) = run(JitterConfig::new(8_000), sent, 3_000, loud, |s| {
        (s - 1_000) as usize
    });
    assert_eq!(frames_played(&played), (0..100).collect::<Vec<_>>());
    assert_eq!(
        played[0].at_ms, 40,
        "first frame after the 40 ms initial delay"
    );
    for w in played[..100].windows(2) {
        assert_eq!(w[1].at_ms - w[0].at_ms, 20, "one frame every 20 ms");
    }
    let s = jb.stats();
    assert_eq!(
        (s.packets, s.lost, s.late, s.duplicates, s.overflow),
        (100, 0, 0, 0, 0)
    );
}

#[test]
fn five_percent_loss_with_jitter_is_concealed_frame_for_frame() {
    let mut rng = Lcg(7);
    let mut lost = Vec::new();
    let mut sent = Vec::new();
    for f in 0..1_000usize {
        let jitter = rng.next() % 16; // 0–15 ms
        if f > 0 && f < 999 && rng.next() % 100 < 5 {
            lost.push(f);
            continue;
        }
        sent.push(Sent {
            frame: f,
            arrive_ms: f as u64 * 20 + jitter,
            copies: 1,
        });
    }
    assert!(
        (35..=65).contains(&lost.len()),
        "about 5 % lost: {}",
        lost.len()
    );
    let (played, jb, _) = run(JitterConfig::new(8_000), sent, 30_000, loud, |s| {
        (s - 1_000) as usize
    });
    // Every frame that arrived plays once, in order; every lost one is one concealed frame
    // in its place.
    let until_last: Vec<_> = played
        .iter()
        .take_while(|p| p.frame != Some(999))
        .chain(played.iter().find(|p| p.frame == Some(999)))
        .collect();
    assert_eq!(until_last.len(), 1_000);
    for (f, p) in until_last.iter().enumerate() {
        if lost.contains(&f) {
            assert_eq!(p.frame, None, "frame {f} was lost: concealed");
        } else {
            assert_eq!(p.frame, Some(f));
        }
    }
    let s = jb.stats();
    assert_eq!(s.lost, lost.len() as u64);
    assert_eq!(
        s.concealed,
        lost.len() as u64 + FADE_FRAMES as u64,
        "each loss once, then the fade after the last packet"
    );
    assert_eq!((s.late, s.duplicates, s.overflow), (0, 0, 0));
    assert!(
        jb.jitter() > Duration::from_millis(1) && jb.jitter() < Duration::from_millis(15),
        "{:?}",
        jb.jitter()
    );
}

#[test]
fn reordered_packets_play_in_order() {
    // From frame 2 on, each odd frame arrives 5 ms before the even one sent before it.
    let sent = (0..200)
        .map(|f| {
            let t = f as u64 * 20;
            let arrive_ms = if f % 2 == 0 && f > 0 { t + 25 } else { t };
            Sent {
                frame: f,
                arrive_ms,
                copies: 1,
            }
        })
        .collect();
    let (played, jb, _) = run(JitterConfig::new(8_000), sent, 10_000, loud, |s| {
        (s - 1_000) as usize
    });
    assert_eq!(frames_played(&played), (0..200).collect::<Vec<_>>());
    assert_eq!((jb.stats().lost, jb.stats().late), (0, 0));
}

#[test]
fn duplicates_are_dropped_and_counted() {
    let sent = (0..200)
        .map(|f| Sent {
            frame: f,
            arrive_ms: f as u64 * 20,
            copies: 3,
        })
        .collect();
    let (played, jb, _) = run(JitterConfig::new(8_000), sent, 10_000, loud, |s| {
        (s - 1_000) as usize
    });
    assert_eq!(frames_played(&played), (0..200).collect::<Vec<_>>());
    assert_eq!(jb.stats().duplicates, 400);
    assert_eq!(jb.stats().packets, 200);
}

#[test]
fn a_late_packet_is_dropped_counted_and_concealed() {
    let sent = (0..100)
        .map(|f| Sent {
            frame: f,
            arrive_ms: f as u64 * 20 + if f == 50 { 100 } else { 0 },
            copies: 1,
        })
        .collect();
    let (played, jb, _) = run(JitterConfig::new(8_000), sent, 5_000, loud, |s| {
        (s - 1_000) as usize
    });
    let f = frames_played(&played);
    assert!(!f.contains(&50));
    assert_eq!(f.len(), 99);
    assert_eq!((jb.stats().late, jb.stats().lost), (1, 1));
}

#[test]
fn a_200_ms_burst_loses_nothing_and_the_delay_comes_back_down() {
    // Frames 50–59 are held 200 ms and arrive together with frame 60; frames from 100 on are
    // quiet (the caller stops talking), so the buffer may skip some to shrink its delay.
    let value = |f: usize| {
        if f < 100 {
            loud(f)
        } else {
            (f as i16 - 100) % 500
        }
    };
    let ident = |s: i16| -> usize { if s >= 1_000 { (s - 1_000) as usize } else { 0 } };
    let sent = (0..600)
        .map(|f| {
            let t = f as u64 * 20;
            let arrive_ms = if (50..60).contains(&f) { 60 * 20 } else { t };
            Sent {
                frame: f,
                arrive_ms,
                copies: 1,
            }
        })
        .collect();
    let cfg = JitterConfig::new(8_000);
    let (played, jb, max_depth) = run(cfg, sent, 20_000, value, ident);
    let loud_frames: Vec<_> = frames_played(&played)
        .into_iter()
        .filter(|&f| f > 0)
        .take(99)
        .collect();
    assert_eq!(
        loud_frames,
        (1..100).collect::<Vec<_>>(),
        "every loud frame once, in order"
    );
    let s = jb.stats();
    assert_eq!((s.lost, s.late), (0, 0), "a held burst is played, not lost");
    assert!(
        s.concealed <= 2 * u64::from(FADE_FRAMES), // the stall's fade, and the end's
        "concealed {}",
        s.concealed
    );
    assert!(max_depth <= cfg.frames(cfg.max_delay), "depth {max_depth}");
    // Loud frame 99 plays at most 200 ms + the initial delay after it was sent.
    let p99 = played.iter().find(|p| p.frame == Some(99)).unwrap();
    assert!(
        p99.at_ms - 99 * 20 <= 240 + 20,
        "delay after the burst {} ms",
        p99.at_ms - 99 * 20
    );
    // After the quiet frames, the buffer is back near its target.
    assert!(
        jb.depth_frames() <= jb.target_frames() + 3,
        "depth {} target {}",
        jb.depth_frames(),
        jb.target_frames()
    );
    assert!(
        s.overflow > 0,
        "quiet frames were skipped to shrink the delay"
    );
}

#[test]
fn sequence_and_timestamp_wrap_around() {
    let t0 = Instant::now();
    let mut jb = JitterBuffer::new(JitterConfig::new(8_000));
    let mut out = Vec::new();
    let mut got = Vec::new();
    for f in 0..20u32 {
        let now = t0 + FRAME * f;
        let seq = 65_530u16.wrapping_add(f as u16);
        let ts = (u32::MAX - 500).wrapping_add(f * SPF as u32);
        jb.insert(now, seq, ts, false, &[loud(f as usize); SPF]);
        while let Some(t) = jb.poll_timeout().filter(|t| *t <= now) {
            if jb.poll_frame(t, &mut out) == Some(Tick::Audio) {
                got.push((out[0] - 1_000) as usize);
            }
        }
    }
    assert_eq!(got, (0..18).collect::<Vec<_>>());
    assert_eq!(jb.stats().late + jb.stats().lost + jb.stats().duplicates, 0);
}

#[test]
fn a_pause_stops_the_clock_and_the_next_packet_re_anchors_it() {
    // 1 s of audio, 2 s of nothing (timestamps jump as Asterisk's do), 1 s of audio.
    let sent = (0..50)
        .chain(150..200)
        .map(|f| Sent {
            frame: f,
            arrive_ms: f as u64 * 20,
            copies: 1,
        })
        .collect();
    let (played, jb, _) = run(JitterConfig::new(8_000), sent, 10_000, loud, |s| {
        (s - 1_000) as usize
    });
    assert_eq!(
        frames_played(&played),
        (0..50).chain(150..200).collect::<Vec<_>>()
    );
    let s = jb.stats();
    assert_eq!(s.anchors, 2);
    assert_eq!(s.lost, 0, "a pause is not loss");
    assert_eq!(
        s.concealed,
        2 * u64::from(FADE_FRAMES),
        "a fade after each stretch"
    );
    // Nothing came out during the pause beyond the fade.
    let gap = played
        .iter()
        .filter(|p| p.at_ms > 1_200 && p.at_ms < 3_000)
        .count();
    assert_eq!(gap, 0);
}

#[test]
fn samples_split_across_packets_land_at_their_timestamps() {
    // 10 ms packets (80 samples) fill 20 ms frames.
    let t0 = Instant::now();
    let mut jb = JitterBuffer::new(JitterConfig::new(8_000));
    for p in 0..8u32 {
        let samples: Vec<i16> = (0..80).map(|k| (p * 80 + k) as i16).collect();
        jb.insert(
            t0 + Duration::from_millis(u64::from(p) * 10),
            p as u16,
            p * 80,
            false,
            &samples,
        );
    }
    let mut out = Vec::new();
    let mut all = Vec::new();
    while let Some(t) = jb
        .poll_timeout()
        .filter(|t| *t <= t0 + Duration::from_millis(100))
    {
        if jb.poll_frame(t, &mut out) == Some(Tick::Audio) {
            all.extend_from_slice(&out);
        }
    }
    assert_eq!(all, (0..640).map(|k| k as i16).collect::<Vec<_>>());
}
