//! A small adaptive jitter buffer for one incoming RTP stream, sans-IO: packets go in with
//! the `now` they arrived, 20 ms frames of slin samples come out on a drift-free 20 ms clock
//! whose deadline [`JitterBuffer::poll_timeout`] gives.
//!
//! - **Frames by timestamp.** A packet's samples land at their RTP timestamp (extended past
//!   the 32-bit wrap), in 20 ms slots; any packetisation works, reordering within the buffer
//!   costs nothing.
//! - **Delay.** Playout starts [`JitterConfig::initial_delay`] after the first packet (or the
//!   first after a pause). An underrun (the next frame missing, nothing after it) holds the
//!   play position and conceals, so the delay grows by 20 ms; more buffered than the target
//!   (three times the RFC 3550 interarrival jitter plus 20 ms, at least
//!   `initial_delay`) shrinks it by skipping one *quiet* frame per tick. The buffer never
//!   holds more than [`JitterConfig::max_delay`]: beyond it the oldest frames are dropped
//!   (counted in `overflow`).
//! - **Loss.** A missing frame with later ones present is lost: the last frame is repeated,
//!   fading linearly to silence over [`FADE_FRAMES`] frames (`concealed`, `lost`). After
//!   that many concealed frames in a row the stream is paused: no frames come out (so the
//!   call's idle timer sees the silence) until a packet re-anchors the clock.
//! - **Late and duplicate packets** (a frame already played or skipped; a sequence number
//!   seen among the last 1024) are dropped and counted.
//!
//! Never panics on input; allocates only while the buffer first grows (slots are reused).

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Length of a frame.
pub(crate) const FRAME: Duration = Duration::from_millis(20);

/// Concealed frames in a row before the stream pauses (100 ms): the last frame fades to
/// silence over them.
pub(crate) const FADE_FRAMES: u32 = 5;

/// A packet this many frames (1 s) away from the play position is a new stream: the
/// buffer re-anchors on it instead of calling it late or overflowing.
const RESYNC_FRAMES: i64 = 50;

/// Sequence numbers remembered for duplicate detection.
const SEQ_WINDOW: usize = 1024;

/// A frame whose samples all lie within ±this is quiet: the buffer may skip it to shrink
/// its delay.
const QUIET_PEAK: i16 = 600;

/// The buffer's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JitterConfig {
    /// The RTP clock rate in Hz (= the sample rate: 8 000 or 16 000).
    pub clock_hz: u32,
    /// Delay from the first packet to its playout (default 40 ms).
    pub initial_delay: Duration,
    /// Most audio the buffer holds (default 300 ms); at least two frames.
    pub max_delay: Duration,
}

impl JitterConfig {
    /// 40 ms initial delay, 300 ms at most (a 200 ms stall of the sender and its burst fit),
    /// at `clock_hz`.
    pub fn new(clock_hz: u32) -> Self {
        JitterConfig {
            clock_hz,
            initial_delay: Duration::from_millis(40),
            max_delay: Duration::from_millis(300),
        }
    }

    fn frame_samples(&self) -> usize {
        (self.clock_hz / 50).max(1) as usize
    }

    fn frames(&self, d: Duration) -> usize {
        (d.as_millis() / FRAME.as_millis()) as usize
    }
}

/// What one tick of the playout clock produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// A received frame.
    Audio,
    /// A concealed frame (the last one repeated, fading).
    Concealed,
}

/// Counters, since the stream began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    /// Packets accepted into the buffer.
    pub packets: u64,
    /// Packets dropped as duplicates (sequence number already seen).
    pub duplicates: u64,
    /// Packets dropped because their frame was already played or skipped.
    pub late: u64,
    /// Frames given up on (missing while later ones were there).
    pub lost: u64,
    /// Frames filled by concealment (lost frames and underruns).
    pub concealed: u64,
    /// Received frames dropped unplayed: the buffer was full, or skipped (quiet) to shrink the
    /// delay.
    pub overflow: u64,
    /// Times the stream re-anchored (start, after a pause, a jump of a second or more).
    pub anchors: u64,
}

/// The jitter buffer of one stream.
#[derive(Debug)]
pub struct JitterBuffer {
    cfg: JitterConfig,
    spf: usize,
    max_frames: usize,
    /// Slots from the play position on; `None` = no sample arrived for that frame yet.
    slots: VecDeque<Option<Vec<i16>>>,
    spare: Vec<Vec<i16>>,
    /// Frame index ((extended timestamp − `phase`) / samples per frame) of `slots[0]`.
    next: i64,
    /// The timestamp (mod samples per frame) at which frames start: the anchoring packet's.
    phase: i64,
    /// The last timestamp seen and its extension, to extend the next one.
    ts: Option<(u32, i64)>,
    /// Next playout deadline; `None` before the first packet and while paused.
    deadline: Option<Instant>,
    /// When the clock was anchored, for the jitter estimate's arrival times.
    epoch: Option<Instant>,
    last_transit: Option<f64>,
    /// RFC 3550 §6.4.1 interarrival jitter, in samples.
    jitter: f64,
    last: Vec<i16>,
    run: u32,
    /// The highest sequence number seen (extended) and a bitmap of the last [`SEQ_WINDOW`].
    seq: Option<(u16, i64)>,
    seen: Vec<u64>,
    stats: JitterStats,
}

impl JitterBuffer {
    /// An empty buffer.
    pub(crate) fn new(cfg: JitterConfig) -> Self {
        let spf = cfg.frame_samples();
        JitterBuffer {
            cfg,
            spf,
            max_frames: cfg.frames(cfg.max_delay).max(2),
            slots: VecDeque::new(),
            spare: Vec::new(),
            next: 0,
            phase: 0,
            ts: None,
            deadline: None,
            epoch: None,
            last_transit: None,
            jitter: 0.0,
            last: vec![0; spf],
            run: 0,
            seq: None,
            seen: vec![0; SEQ_WINDOW / 64],
            stats: JitterStats::default(),
        }
    }

    /// An empty buffer that carries on counting from `stats` (a new stream of one call).
    pub(crate) fn with_stats(cfg: JitterConfig, stats: JitterStats) -> Self {
        JitterBuffer {
            stats,
            ..Self::new(cfg)
        }
    }

    /// The settings.
    pub(crate) fn config(&self) -> JitterConfig {
        self.cfg
    }

    /// The counters.
    pub(crate) fn stats(&self) -> JitterStats {
        self.stats
    }

    /// The RFC 3550 interarrival jitter estimate.
    pub(crate) fn jitter(&self) -> Duration {
        Duration::from_secs_f64(self.jitter / f64::from(self.cfg.clock_hz))
    }

    /// Audio buffered ahead of the play position (received or not yet), in frames.
    #[cfg(test)]
    pub(crate) fn depth_frames(&self) -> usize {
        self.slots.len()
    }

    /// The delay the buffer aims at, in frames.
    pub(crate) fn target_frames(&self) -> usize {
        let jitter_ms = self.jitter().as_secs_f64() * 1000.0;
        let want = ((3.0 * jitter_ms + 20.0) / 20.0).ceil() as usize;
        want.max(self.cfg.frames(self.cfg.initial_delay))
            .clamp(1, self.max_frames)
    }

    /// When [`Self::poll_frame`] next has a frame to give; `None` until a packet arrives.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// A packet's samples (already decoded), with its RTP sequence number and timestamp,
    /// arrived at `now`. `marker` is the packet's M bit (a talkspurt starts).
    pub(crate) fn insert(
        &mut self,
        now: Instant,
        sequence: u16,
        timestamp: u32,
        marker: bool,
        samples: &[i16],
    ) {
        if !self.first_sighting(sequence) {
            self.stats.duplicates += 1;
            return;
        }
        let ext = match self.ts {
            None => i64::from(timestamp),
            Some((last, last_ext)) => last_ext + i64::from(timestamp.wrapping_sub(last) as i32),
        };
        self.ts = Some((timestamp, ext));
        self.update_jitter(now, ext);
        let spf = self.spf as i64;
        let mut idx = (ext - self.phase).div_euclid(spf);
        let far = (idx - self.next).abs() >= RESYNC_FRAMES;
        let restart = marker && self.slots.iter().all(Option::is_none);
        if self.deadline.is_none() || far || (restart && idx != self.next) {
            // Frames start at this packet's first sample.
            self.phase = ext.rem_euclid(spf);
            idx = (ext - self.phase).div_euclid(spf);
            self.anchor(now, idx);
        }
        if idx < self.next {
            self.stats.late += 1;
            return;
        }
        self.stats.packets += 1;
        self.make_room(idx);
        let mut at =
            (idx - self.next) as usize * self.spf + (ext - self.phase).rem_euclid(spf) as usize;
        for chunk in samples.chunks(self.spf) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (slot, off) = (at / self.spf, at % self.spf);
                if slot >= self.max_frames {
                    return; // a packet longer than the buffer: keep what fits
                }
                let n = rest.len().min(self.spf - off);
                self.slot_mut(slot)[off..off + n].copy_from_slice(&rest[..n]);
                rest = &rest[n..];
                at += n;
            }
        }
    }

    /// The frame due at `now`, written into `out` (cleared first, then `clock_hz / 50`
    /// samples), or `None` when nothing is due (before [`Self::poll_timeout`], or paused).
    pub(crate) fn poll_frame(&mut self, now: Instant, out: &mut Vec<i16>) -> Option<Tick> {
        let deadline = self.deadline?;
        if now < deadline {
            return None;
        }
        // Drift-free: the next deadline is one frame on, unless we fell 3 frames behind.
        let mut d = deadline + FRAME;
        if now > d + 2 * FRAME {
            d = now + FRAME;
        }
        self.deadline = Some(d);
        self.shrink();
        out.clear();
        match self.slots.front() {
            Some(Some(_)) => {
                let frame = self
                    .slots
                    .pop_front()
                    .flatten()
                    .expect("front slot checked present");
                out.extend_from_slice(&frame);
                self.last.copy_from_slice(&frame);
                self.spare.push(frame);
                self.next += 1;
                self.run = 0;
                Some(Tick::Audio)
            }
            _ => {
                let later = self.slots.iter().skip(1).any(Option::is_some);
                if later {
                    self.stats.lost += 1;
                    if let Some(None) = self.slots.pop_front() {
                        self.next += 1;
                    }
                }
                // An underrun holds the play position: the delay grows by this frame.
                self.conceal(out)
            }
        }
    }

    /// Fills `out` with the last frame faded by the run of concealed frames; pauses the
    /// stream after [`FADE_FRAMES`].
    fn conceal(&mut self, out: &mut Vec<i16>) -> Option<Tick> {
        self.run += 1;
        if self.run > FADE_FRAMES {
            self.pause();
            return None;
        }
        self.stats.concealed += 1;
        let n = self.spf as f32;
        let fade = FADE_FRAMES as f32;
        for (i, &s) in self.last.iter().enumerate() {
            // Linear from (1 - (run-1)/FADE) to (1 - run/FADE) over the frame.
            let g = 1.0 - ((self.run - 1) as f32 + i as f32 / n) / fade;
            out.push((f32::from(s) * g.max(0.0)) as i16);
        }
        Some(Tick::Concealed)
    }

    /// Nothing came for a while: stop the clock until the next packet.
    fn pause(&mut self) {
        self.deadline = None;
        self.run = 0;
        self.last.fill(0);
        while let Some(s) = self.slots.pop_front() {
            self.spare.extend(s);
        }
    }

    /// Starts the clock on frame `idx`, `initial_delay` from `now` (more if the jitter
    /// estimate asks for it).
    fn anchor(&mut self, now: Instant, idx: i64) {
        self.stats.anchors += 1;
        while let Some(s) = self.slots.pop_front() {
            if s.is_some() {
                self.stats.overflow += 1;
            }
            self.spare.extend(s);
        }
        self.next = idx;
        self.run = 0;
        let delay = FRAME * self.target_frames() as u32;
        self.deadline = Some(now + delay.max(self.cfg.initial_delay));
        self.epoch.get_or_insert(now);
    }

    /// Grows `slots` to hold frame `idx`, dropping the oldest frames when that would exceed
    /// `max_delay`.
    fn make_room(&mut self, idx: i64) {
        while idx - self.next >= self.max_frames as i64 {
            if let Some(s) = self.slots.pop_front() {
                if s.is_some() {
                    self.stats.overflow += 1;
                }
                self.spare.extend(s);
            }
            self.next += 1;
        }
        while (self.slots.len() as i64) <= idx - self.next {
            self.slots.push_back(None);
        }
    }

    /// Skips one quiet frame when more is buffered than the target and two frames.
    fn shrink(&mut self) {
        let received = self
            .slots
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |p| p + 1);
        if received <= self.target_frames() + 2 {
            return;
        }
        if let Some(Some(f)) = self.slots.front() {
            if f.iter().all(|s| s.unsigned_abs() <= QUIET_PEAK as u16) {
                self.stats.overflow += 1;
                let f = self
                    .slots
                    .pop_front()
                    .flatten()
                    .expect("front slot checked present");
                self.spare.push(f);
                self.next += 1;
            }
        }
    }

    fn slot_mut(&mut self, slot: usize) -> &mut [i16] {
        let spf = self.spf;
        while self.slots.len() <= slot {
            self.slots.push_back(None);
        }
        let entry = &mut self.slots[slot];
        if entry.is_none() {
            let mut v = self.spare.pop().unwrap_or_default();
            v.clear();
            v.resize(spf, 0);
            *entry = Some(v);
        }
        entry.as_mut().expect("slot filled just above")
    }

    /// RFC 3550 §6.4.1: J += (|D| − J) / 16, D the change in transit time, in samples.
    fn update_jitter(&mut self, now: Instant, ext_ts: i64) {
        let Some(epoch) = self.epoch else {
            return;
        };
        let arrival =
            now.saturating_duration_since(epoch).as_secs_f64() * f64::from(self.cfg.clock_hz);
        let transit = arrival - ext_ts as f64;
        if let Some(last) = self.last_transit {
            let d = (transit - last).abs();
            // A jump of a second or more is a new stream, not jitter.
            if d < f64::from(self.cfg.clock_hz) {
                self.jitter += (d - self.jitter) / 16.0;
            }
        }
        self.last_transit = Some(transit);
    }

    /// Records `sequence`; false if it was seen among the last [`SEQ_WINDOW`].
    fn first_sighting(&mut self, sequence: u16) -> bool {
        let ext = match self.seq {
            None => i64::from(sequence),
            Some((last, last_ext)) => last_ext + i64::from(sequence.wrapping_sub(last) as i16),
        };
        let highest = self.seq.map_or(ext, |(_, h)| h);
        let window = SEQ_WINDOW as i64;
        if ext > highest {
            // Clear the bits of the numbers the window moves past.
            for s in (highest + 1).max(ext - window + 1)..=ext {
                self.set_seen(s, false);
            }
            self.seq = Some((sequence, ext));
        } else if highest - ext >= window {
            return false; // too old to tell: treat as a duplicate rather than replay it
        } else if self.seq.is_none() {
            self.seq = Some((sequence, ext));
        }
        if self.is_seen(ext) {
            return false;
        }
        self.set_seen(ext, true);
        true
    }

    fn bit(ext: i64) -> (usize, u64) {
        let i = ext.rem_euclid(SEQ_WINDOW as i64) as usize;
        (i / 64, 1 << (i % 64))
    }

    fn is_seen(&self, ext: i64) -> bool {
        let (w, b) = Self::bit(ext);
        self.seen[w] & b != 0
    }

    fn set_seen(&mut self, ext: i64, on: bool) {
        let (w, b) = Self::bit(ext);
        if on {
            self.seen[w] |= b;
        } else {
            self.seen[w] &= !b;
        }
    }
}

#[cfg(test)]
#[path = "jitter_tests.rs"]
mod tests;
