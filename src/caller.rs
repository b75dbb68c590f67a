//! A synthetic caller that behaves like Asterisk's AudioSocket side: connects, sends the call
//! id, streams a recording in real time as 20 ms slin frames (then silence, as Asterisk keeps
//! sending frames while the call is up), sends DTMF at given times, records everything it
//! receives, and measures the pacing of what comes back.
//!
//! Used by `voicegate call`, `voicegate selftest`, the integration tests and the load bench.

use crate::audio::resample::Resampler;
use crate::audio::wav::Recording;
use crate::audiosocket::codec::{self, Message, SlinRate};
use crate::audiosocket::{Connection, ReadError};
use bytes::BytesMut;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use uuid::Uuid;

/// RMS above which a received frame counts as audio rather than silence (slin units).
pub const AUDIBLE_RMS: f32 = 64.0;

/// What the synthetic call does.
#[derive(Debug, Clone)]
pub struct CallPlan {
    /// The call id sent in `0x01`.
    pub call_id: Uuid,
    /// Sample rate of the call (8 kHz sends kind `0x10`, 16 kHz `0x12`, …).
    pub rate: SlinRate,
    /// What the caller says; resampled to `rate` if needed.
    pub speech: Recording,
    /// Start sending the speech this long after the call id.
    pub speech_offset: Duration,
    /// DTMF digits and when to send them (from the call id).
    pub dtmf: Vec<(char, Duration)>,
    /// How long the call lasts (from the call id) before the caller hangs up.
    pub duration: Duration,
}

/// How a synthetic call ends when its [`CallPlan::duration`] is up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CallEnd {
    /// Close the connection, as Asterisk does when the caller hangs up (it never sends
    /// `0x00`; `docs/asterisk.md`). The default.
    #[default]
    Close,
    /// Send `0x00` (hangup, `res_audiosocket.h`) and wait for the far end to close, as an
    /// AudioSocket client other than Asterisk may.
    Hangup,
    /// Send `0xFF` (error) with this code and wait for the far end to close.
    Error(u8),
}

/// Late input frames like a busy Asterisk's: frames leave on the 20 ms grid but each one
/// may be sent late, so gaps between frames are p50 20 ms, p99 about 27 ms, max
/// `20 + max_late_ms` (47 ms with [`InputJitter::busy_asterisk`]), and a late frame is
/// followed by a short gap (observed on Asterisk 22.10.1 with a parallel build running,
/// `docs/asterisk.md`). Deterministic for a seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputJitter {
    /// Picks the pseudo-random lateness sequence.
    pub seed: u64,
    /// Latest a frame is sent after its grid slot, ms.
    pub max_late_ms: u64,
}

impl InputJitter {
    /// The gaps measured on a busy box: p99 27 ms, max 47 ms.
    pub fn busy_asterisk(seed: u64) -> Self {
        InputJitter {
            seed,
            max_late_ms: 27,
        }
    }

    /// How late frame `n` leaves after its grid slot, ms: 0–2 ms for 97 % of frames,
    /// 3–7 ms for 2 %, 8–`max_late_ms` for 1 %.
    pub fn late_ms(&self, n: u64) -> u64 {
        // splitmix64 of (seed, n): cheap, stateless, well spread.
        let mut z = self
            .seed
            .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let (pick, within) = (z % 1000, z >> 32);
        let band = |lo: u64, hi: u64| lo + within % (hi.max(lo) - lo + 1);
        match pick {
            0..970 => band(0, 2.min(self.max_late_ms)),
            970..990 => band(3.min(self.max_late_ms), 7.min(self.max_late_ms)),
            _ => band(8.min(self.max_late_ms), self.max_late_ms),
        }
    }
}

/// What a synthetic call does beyond its [`CallPlan`] (kept apart so the plan's many
/// literals stay as they are): input jitter and how it ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallOptions {
    /// Send input frames late like a busy Asterisk (default: on the grid).
    pub input_jitter: Option<InputJitter>,
    /// How the caller ends the call.
    pub end: CallEnd,
}

/// What the synthetic call observed.
#[derive(Debug, Clone, Serialize)]
pub struct CallReport {
    /// The call id.
    pub call_id: Uuid,
    /// Sample rate, Hz.
    pub rate_hz: u32,
    /// Audio frames sent.
    pub frames_sent: u64,
    /// Audio frames received.
    pub frames_received: u64,
    /// Received frames whose RMS exceeds [`AUDIBLE_RMS`].
    pub audible_frames_received: u64,
    /// From the call id to the first audible frame back, ms.
    pub first_audio_ms: Option<f64>,
    /// Median gap between received frames, ms.
    pub gap_p50_ms: f64,
    /// 99th percentile gap between received frames, ms.
    pub gap_p99_ms: f64,
    /// Largest gap between received frames, ms.
    pub gap_max_ms: f64,
    /// Gaps longer than 30 ms (a frame arrived late or is missing).
    pub underruns: u64,
    /// Frames whose size was not a full 20 ms.
    pub short_frames: u64,
    /// The far end sent `0x00`.
    pub hangup_received: bool,
    /// The far end closed the connection before the caller hung up.
    pub closed_by_peer: bool,
    /// Milliseconds from the call id to the end of the call.
    pub duration_ms: f64,
    /// With [`CallEnd::Hangup`] or [`CallEnd::Error`]: ms from sending that frame until the
    /// far end closed; `None` if it was not sent or the far end kept the connection open
    /// for 3 s.
    pub closed_after_end_frame_ms: Option<f64>,
    /// Everything received, concatenated, at `rate_hz`.
    #[serde(skip)]
    pub received: Recording,
    /// Arrival time of each received frame, ms from the call id.
    #[serde(skip)]
    pub arrivals_ms: Vec<f64>,
}

/// Why a synthetic call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Could not connect.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Target.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed mid-call.
    #[error("call failed: {0}")]
    Io(#[from] std::io::Error),
    /// The far end sent something that is not AudioSocket.
    #[error("far end sent invalid audiosocket: {0}")]
    Protocol(String),
    /// The recording cannot be resampled to the call's rate.
    #[error(transparent)]
    Resample(#[from] crate::audio::resample::ResampleError),
}

/// Resamples `speech` to `rate_hz`, flushing the resampler's tail.
///
/// # Errors
/// If rubato cannot convert between the rates.
pub fn resample_recording(
    speech: &Recording,
    rate_hz: u32,
) -> Result<Recording, crate::audio::resample::ResampleError> {
    if speech.rate_hz == rate_hz {
        return Ok(speech.clone());
    }
    let mut r = Resampler::new(speech.rate_hz, rate_hz)?;
    let mut out = Vec::with_capacity(
        speech.samples.len() * rate_hz as usize / speech.rate_hz as usize + 1024,
    );
    r.process(&speech.samples, &mut out);
    // Push zeros through so the filter delay and the last partial chunk come out.
    r.process(&vec![0; speech.rate_hz as usize / 10], &mut out);
    let want = speech.samples.len() as u64 * rate_hz as u64 / speech.rate_hz as u64;
    out.truncate(want as usize);
    Ok(Recording {
        rate_hz,
        samples: out,
    })
}

/// Places one call to `addr` following `plan`.
///
/// # Errors
/// [`CallError`] on connect or protocol failures.
pub async fn place_call(addr: SocketAddr, plan: &CallPlan) -> Result<CallReport, CallError> {
    place_call_with(addr, plan, CallOptions::default()).await
}

/// [`place_call`] with [`CallOptions`] (input jitter, hangup or error frame at the end).
///
/// # Errors
/// [`CallError`] on connect or protocol failures.
pub async fn place_call_with(
    addr: SocketAddr,
    plan: &CallPlan,
    options: CallOptions,
) -> Result<CallReport, CallError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| CallError::Connect { addr, source })?;
    stream.set_nodelay(true)?;
    run_call_on_with(stream, plan, options).await
}

/// Places one call over an already connected stream (a TCP connection, or one through the
/// WireGuard tunnel).
///
/// # Errors
/// [`CallError`] on I/O or protocol failures.
pub async fn run_call(stream: TcpStream, plan: &CallPlan) -> Result<CallReport, CallError> {
    stream.set_nodelay(true)?;
    run_call_on(stream, plan).await
}

/// Places one call over any connected byte stream, e.g. a
/// [`crate::tunnel::TunnelStream`] through the WireGuard tunnel.
///
/// # Errors
/// [`CallError`] on I/O or protocol failures.
pub async fn run_call_on<S>(stream: S, plan: &CallPlan) -> Result<CallReport, CallError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    run_call_on_with(stream, plan, CallOptions::default()).await
}

/// [`run_call_on`] with [`CallOptions`].
///
/// # Errors
/// [`CallError`] on I/O or protocol failures.
pub(crate) async fn run_call_on_with<S>(
    stream: S,
    plan: &CallPlan,
    options: CallOptions,
) -> Result<CallReport, CallError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let speech = resample_recording(&plan.speech, plan.rate.hz())?;
    let (reader, writer) = tokio::io::split(stream);
    let (reader, mut writer) = (Connection::new(reader), Connection::new(writer));
    let start = Instant::now();
    writer.write_message(&Message::CallId(plan.call_id)).await?;
    let reader_task = tokio::spawn(receive(reader, plan.rate, start));
    let jitter = options.input_jitter;
    let (frames_sent, write_error) =
        send(&mut writer, plan, &speech, start, jitter, &reader_task).await;
    // A write refused because the far end already closed (EPIPE, RST) is its hangup, even
    // when the reader has not seen the close yet: that race is lost on a slow machine.
    let peer_closed = write_error.as_ref().is_some_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
        )
    });
    let hung_up_by_us = !peer_closed && !reader_task.is_finished();
    let closed_after_end_frame_ms = if hung_up_by_us {
        send_end_frame(&mut writer, options.end, &reader_task).await
    } else {
        None
    };
    let _ = writer.shutdown().await;
    drop(writer);
    // The far end closes after our FIN; don't wait forever if it doesn't.
    let mut received = match tokio::time::timeout(Duration::from_secs(3), reader_task).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => return Err(CallError::Protocol(format!("reader task: {join}"))),
        Err(_) => {
            return Err(CallError::Protocol(
                "far end did not close after hangup".into(),
            ));
        }
    };
    std::mem::replace(&mut received.result, Ok(()))?;
    if let Some(e) = write_error {
        if hung_up_by_us {
            return Err(CallError::Io(e));
        }
    }
    let mut report = received.report(plan, frames_sent, !hung_up_by_us, start);
    report.closed_after_end_frame_ms = closed_after_end_frame_ms;
    Ok(report)
}

/// Ends the call with the AudioSocket frame `end` asks for (none for [`CallEnd::Close`]),
/// then waits up to 3 s for the far end to close on its own (no FIN from us meanwhile).
/// Returns how long that took, ms, if it did.
async fn send_end_frame<W, T>(
    writer: &mut Connection<W>,
    end: CallEnd,
    reader_task: &tokio::task::JoinHandle<T>,
) -> Option<f64>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let frame = match end {
        CallEnd::Close => return None,
        CallEnd::Hangup => Message::Hangup,
        CallEnd::Error(code) => Message::Error(code),
    };
    writer.write_message(&frame).await.ok()?;
    let sent = Instant::now();
    while !reader_task.is_finished() && sent.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    reader_task
        .is_finished()
        .then(|| sent.elapsed().as_secs_f64() * 1000.0)
}

/// What the caller's reader saw.
struct Received {
    result: Result<(), CallError>,
    samples: Vec<i16>,
    /// Arrival of each audio frame, ms since the call started.
    arrivals: Vec<f64>,
    audible: u64,
    first_audio: Option<f64>,
    short: u64,
    hangup: bool,
}

/// Reads what the far end sends until it hangs up or closes.
async fn receive<R>(mut reader: Connection<R>, rate: SlinRate, start: Instant) -> Received
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut r = Received {
        result: Ok(()),
        samples: Vec::new(),
        arrivals: Vec::new(),
        audible: 0,
        first_audio: None,
        short: 0,
        hangup: false,
    };
    let mut samples = Vec::with_capacity(rate.samples_per_frame());
    r.result = loop {
        match reader.read_message().await {
            Ok(Some(Message::Audio { payload, .. })) => {
                let t = start.elapsed().as_secs_f64() * 1000.0;
                r.arrivals.push(t);
                if payload.len() != rate.bytes_per_frame() {
                    r.short += 1;
                }
                samples.clear();
                crate::audio::slin_from_le_bytes(&payload, &mut samples);
                if crate::audio::rms(&samples) > AUDIBLE_RMS {
                    r.audible += 1;
                    r.first_audio.get_or_insert(t);
                }
                r.samples.extend_from_slice(&samples);
            }
            Ok(Some(Message::Hangup)) => {
                r.hangup = true;
                break Ok(());
            }
            Ok(Some(other)) => break Err(CallError::Protocol(format!("unexpected {other:?}"))),
            Ok(None) => break Ok(()),
            Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                break Ok(());
            }
            Err(e) => break Err(CallError::Protocol(e.to_string())),
        }
    };
    r
}

/// Writes one frame every 20 ms on a deadline grid (each late by `jitter`'s gap, if any),
/// speech then silence, with the DTMF of the plan, until the plan's end or the reader
/// finished. Returns the frames sent and the
/// write error that stopped it.
async fn send<W, T>(
    writer: &mut Connection<W>,
    plan: &CallPlan,
    speech: &Recording,
    start: Instant,
    jitter: Option<InputJitter>,
    reader_task: &tokio::task::JoinHandle<T>,
) -> (u64, Option<std::io::Error>)
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let rate = plan.rate;
    let spf = rate.samples_per_frame();
    let speech_start_frame = (plan.speech_offset.as_millis() / 20) as usize;
    let total_frames = (plan.duration.as_millis() / 20) as usize;
    let mut dtmf: Vec<(char, Duration)> = plan.dtmf.clone();
    dtmf.sort_by_key(|d| d.1);
    let mut dtmf = dtmf.into_iter().peekable();
    let mut frames_sent = 0u64;
    let silence = vec![0i16; spf];
    let mut out = BytesMut::with_capacity(64);
    for n in 0..total_frames {
        let due = start + Duration::from_millis(20 * n as u64);
        let late = jitter.map_or(0, |j| j.late_ms(n as u64));
        sleep_until(due + Duration::from_millis(late)).await;
        if reader_task.is_finished() {
            break;
        }
        out.clear();
        while let Some((digit, _)) = dtmf.next_if(|(_, at)| start + *at <= due) {
            codec::encode(&Message::Dtmf(digit), &mut out);
        }
        let chunk = n
            .checked_sub(speech_start_frame)
            .and_then(|i| speech.samples.chunks(spf).nth(i))
            .unwrap_or(&silence);
        codec::encode_audio_samples(rate, chunk, &mut out);
        if let Err(e) = writer.write_encoded(&out).await {
            return (frames_sent, Some(e));
        }
        frames_sent += 1;
    }
    (frames_sent, None)
}

impl Received {
    /// The report of the call: pacing percentiles of the arrivals and what was heard.
    fn report(
        self,
        plan: &CallPlan,
        frames_sent: u64,
        closed_by_peer: bool,
        start: Instant,
    ) -> CallReport {
        let mut gaps: Vec<f64> = self.arrivals.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if gaps.is_empty() {
                0.0
            } else {
                gaps[((gaps.len() - 1) as f64 * p).round() as usize]
            }
        };
        let rate = plan.rate;
        CallReport {
            call_id: plan.call_id,
            rate_hz: rate.hz(),
            frames_sent,
            frames_received: self.arrivals.len() as u64,
            audible_frames_received: self.audible,
            first_audio_ms: self.first_audio,
            gap_p50_ms: pct(0.5),
            gap_p99_ms: pct(0.99),
            gap_max_ms: gaps.last().copied().unwrap_or(0.0),
            underruns: gaps.iter().filter(|&&g| g > 30.0).count() as u64,
            short_frames: self.short,
            hangup_received: self.hangup,
            closed_by_peer,
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            closed_after_end_frame_ms: None,
            received: Recording {
                rate_hz: rate.hz(),
                samples: self.samples,
            },
            arrivals_ms: self.arrivals,
        }
    }
}

/// Parses a DTMF schedule entry such as `1@2.5s` or `#@3` (seconds).
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_dtmf(spec: &str) -> Result<(char, Duration), String> {
    let (digit, at) = spec
        .split_once('@')
        .ok_or_else(|| format!("dtmf `{spec}`: expected DIGIT@SECONDS, e.g. 1@2.5s"))?;
    let mut chars = digit.chars();
    let d = match (chars.next(), chars.next()) {
        (Some(d), None) if d.is_ascii() && codec::is_dtmf_digit(d as u8) => d,
        _ => return Err(format!("dtmf `{spec}`: `{digit}` is not one of 0-9*#A-D")),
    };
    let secs: f64 = at
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("dtmf `{spec}`: `{at}` is not a number of seconds"))?;
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("dtmf `{spec}`: time out of range"));
    }
    Ok((d, Duration::from_secs_f64(secs)))
}

/// Normalised cross-correlation of `a` against `b` at the best lag in `max_lag` samples
/// (either direction): 1.0 for identical waveforms, near 0 for unrelated ones. Returns
/// `(correlation, lag)`, where a positive lag means `a` is `b` delayed by `lag` samples.
pub fn best_correlation(a: &[i16], b: &[i16], max_lag: usize) -> (f64, isize) {
    best_correlation_in(a, b, -(max_lag as isize)..=(max_lag as isize))
}

/// [`best_correlation`] over the lags in `lags` only (samples; positive: `a` lags `b`).
pub(crate) fn best_correlation_in(
    a: &[i16],
    b: &[i16],
    lags: std::ops::RangeInclusive<isize>,
) -> (f64, isize) {
    let mut best = (0.0, 0isize);
    let energy = |x: &[i16]| x.iter().map(|&s| s as f64 * s as f64).sum::<f64>();
    for lag in lags {
        let (x, y) = if lag >= 0 {
            let l = lag as usize;
            if l >= a.len() {
                continue;
            }
            (&a[l..], b)
        } else {
            let l = (-lag) as usize;
            if l >= b.len() {
                continue;
            }
            (a, &b[l..])
        };
        let n = x.len().min(y.len());
        if n == 0 {
            continue;
        }
        let (x, y) = (&x[..n], &y[..n]);
        let denom = (energy(x) * energy(y)).sqrt();
        if denom == 0.0 {
            continue;
        }
        let dot: f64 = x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum();
        let c = dot / denom;
        if c > best.0 {
            best = (c, lag);
        }
    }
    best
}

/// One voiced 100 ms window of the reference, matched against the received audio by
/// [`speech_similarity`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowMatch {
    /// Index of the window in the reference: it covers samples `index * rate_hz / 10` up to
    /// the next window.
    pub index: usize,
    /// Normalised correlation at the best lag: 1.0 identical, unrelated audio stays well
    /// under 0.5, 0.0 when no lag fitted inside `received`.
    pub correlation: f64,
    /// The lag (samples) at which it matched: positive when `received` carries it later.
    pub lag: isize,
}

/// What [`speech_similarity`] found, window by window: the single implementation behind
/// every "the echo is the caller's own speech" check (tests, `voicegate selftest`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Similarity {
    /// Sample rate (Hz) of both signals.
    pub rate_hz: u32,
    /// The voiced windows (RMS above 300), in reference order.
    pub windows: Vec<WindowMatch>,
}

impl Similarity {
    /// Number of voiced windows in the reference.
    pub(crate) fn voiced(&self) -> usize {
        self.windows.len()
    }

    /// Number of voiced windows whose correlation is at least `threshold`.
    pub(crate) fn count_at_least(&self, threshold: f64) -> usize {
        self.windows
            .iter()
            .filter(|w| w.correlation >= threshold)
            .count()
    }

    /// How many voiced windows must reach the threshold: 95 % of them (rounded up), except
    /// that a recording under 20 windows may lose one (a single late frame or skipped tick
    /// on a loaded machine); never fewer than one.
    pub(crate) fn required(&self) -> usize {
        let n = self.voiced();
        (n * 19).div_ceil(20).min(n.saturating_sub(1)).max(1)
    }

    /// True when the reference has a voiced window and at least [`Similarity::required`]
    /// of its voiced windows reach `threshold` (a correlation, 0–1).
    pub fn passes(&self, threshold: f64) -> bool {
        self.voiced() > 0 && self.count_at_least(threshold) >= self.required()
    }

    /// The window with the lowest correlation, `None` without voiced windows.
    pub(crate) fn worst(&self) -> Option<WindowMatch> {
        self.windows
            .iter()
            .copied()
            .min_by(|a, b| a.correlation.total_cmp(&b.correlation))
    }

    /// The median correlation of the voiced windows (0.0 without any): a summary for
    /// display only; [`Similarity::passes`] is the check.
    pub(crate) fn median(&self) -> f64 {
        let mut c: Vec<f64> = self.windows.iter().map(|w| w.correlation).collect();
        if c.is_empty() {
            return 0.0;
        }
        c.sort_by(f64::total_cmp);
        c[c.len() / 2]
    }

    /// One line for a failure message or a report, e.g. `18/19 voiced 100 ms windows ≥ 0.90
    /// (need 18), worst 0.41 at 700 ms (lag 305 ms), median 0.97`.
    pub fn describe(&self, threshold: f64) -> String {
        let ms = |samples: isize| samples * 1000 / self.rate_hz.max(1) as isize;
        let worst = self.worst().map_or("none".to_string(), |w| {
            format!(
                "{:.2} at {} ms (lag {} ms)",
                w.correlation,
                w.index * 100,
                ms(w.lag)
            )
        });
        format!(
            "{}/{} voiced 100 ms windows ≥ {threshold:.2} (need {}), worst {worst}, median {:.2}",
            self.count_at_least(threshold),
            self.voiced(),
            self.required(),
            self.median()
        )
    }
}

/// How well `received` carries the speech in `reference`, tolerant of the small timing
/// shifts a real audio path adds (a late frame, a skipped tick): the reference is cut into
/// 100 ms windows; each voiced window (RMS above 300) is matched against `received` at the
/// best lag within `search` samples of where the previous window matched (the first around
/// `expected_lag`). Returns every voiced window's match; check it with
/// [`Similarity::passes`] (≥ 95 % of the windows at the threshold), which a half-garbled
/// echo fails. `rate_hz` is the sample rate of both; lags are in samples.
pub fn speech_similarity(
    received: &[i16],
    reference: &[i16],
    rate_hz: u32,
    expected_lag: usize,
    search: usize,
) -> Similarity {
    let window = (rate_hz as usize / 10).max(1);
    let mut lag = expected_lag as isize;
    let mut windows = Vec::new();
    for (i, chunk) in reference.chunks_exact(window).enumerate() {
        if crate::audio::rms(chunk) < 300.0 {
            continue;
        }
        let offset = (i * window) as isize;
        let lo = (lag - search as isize).max(-offset);
        let hi = lag + search as isize;
        // Correlate this window alone: received[offset + l ..] against the chunk.
        let mut best = (0.0f64, lag);
        for l in lo..=hi {
            let start = offset + l;
            if start < 0 || start as usize + window > received.len() {
                continue;
            }
            let seg = &received[start as usize..start as usize + window];
            let (c, _) = best_correlation_in(seg, chunk, 0..=0);
            if c > best.0 {
                best = (c, l);
            }
        }
        lag = best.1;
        windows.push(WindowMatch {
            index: i,
            correlation: best.0,
            lag: best.1,
        });
    }
    Similarity { rate_hz, windows }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_tracks_small_shifts_and_rejects_other_audio() {
        // A voiced reference: a varying tone, 1 s at 8 kHz.
        let reference: Vec<i16> = (0..8000)
            .map(|i| ((i as f32 * (0.05 + (i / 800) as f32 * 0.01)).sin() * 6000.0) as i16)
            .collect();
        // Delayed by 500 ms, with 40 ms of silence inserted half way (a skipped tick).
        let mut received = vec![0i16; 4000];
        received.extend_from_slice(&reference[..4000]);
        received.extend(std::iter::repeat_n(0, 320));
        received.extend_from_slice(&reference[4000..]);
        let s = speech_similarity(&received, &reference, 8000, 4000, 480);
        assert!(s.passes(0.9), "{}", s.describe(0.9));
        assert_eq!(s.voiced(), 10);
        let other: Vec<i16> = (0..12000)
            .map(|i| (((i * 7919) % 4001) as i16) - 2000)
            .collect();
        let s = speech_similarity(&other, &reference, 8000, 4000, 480);
        assert!(!s.passes(0.5), "{}", s.describe(0.5));
        let s = speech_similarity(&received, &[0; 800], 8000, 0, 10);
        assert!(!s.passes(0.0) && s.worst().is_none());
    }

    #[test]
    fn similarity_follows_a_reanchor_jump_within_its_search() {
        // The recording the real-Asterisk scenarios play (Asterisk core sounds, CC BY-SA 3.0).
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hello-world.wav");
        let reference = crate::wavfile::open(&path).expect("fixture").samples;
        let half = reference.len() / 2;
        let mut voiced_in_half = 0;
        for (jump, wide, narrow_passes) in [(1_320, 2_000, false), (0, 800, true)] {
            // Echoed 320 ms late; half way, a caller frame 165 ms late moves the rest of the
            // echo 165 ms later (the echo agent's re-anchor: the gap is echoed as a gap).
            let mut received = vec![0i16; 2_560];
            received.extend_from_slice(&reference[..half]);
            received.extend(std::iter::repeat_n(0, jump));
            received.extend_from_slice(&reference[half..]);
            let s = speech_similarity(&received, &reference, 8000, 2_400, wide);
            assert!(s.passes(0.9), "{}", s.describe(0.9));
            assert_eq!(s.windows.last().map(|w| w.lag), Some(2_560 + jump as isize));
            let narrow = speech_similarity(&received, &reference, 8000, 2_400, 800);
            assert_eq!(
                narrow.passes(0.8),
                narrow_passes,
                "{}",
                narrow.describe(0.8)
            );
            voiced_in_half = s.windows.iter().filter(|w| w.index * 800 >= half).count();
        }
        assert!(voiced_in_half >= 3, "the jump must come before speech");
        // Unrelated audio still fails at the wide search.
        let other: Vec<i16> = (0..reference.len() + 4_000)
            .map(|i| (((i * 7919) % 4001) as i16) - 2000)
            .collect();
        let s = speech_similarity(&other, &reference, 8000, 2_400, 2_000);
        assert!(!s.passes(0.5), "{}", s.describe(0.5));
    }

    #[test]
    fn similarity_fails_a_half_garbled_echo_and_names_the_worst_window() {
        // 2 s of voiced reference, echoed 500 ms late with every other 100 ms window
        // replaced by unrelated noise: the median stays high, the check must fail.
        let reference: Vec<i16> = (0..16000)
            .map(|i| ((i as f32 * (0.05 + (i / 800) as f32 * 0.01)).sin() * 6000.0) as i16)
            .collect();
        let mut received = vec![0i16; 4000];
        received.extend_from_slice(&reference);
        let clean = speech_similarity(&received, &reference, 8000, 4000, 480);
        assert!(clean.passes(0.9), "{}", clean.describe(0.9));
        for w in (0..20).step_by(2) {
            for (k, s) in received[4000 + w * 800..4000 + (w + 1) * 800]
                .iter_mut()
                .enumerate()
            {
                *s = ((((k + w) * 7919) % 4001) as i16) - 2000;
            }
        }
        let garbled = speech_similarity(&received, &reference, 8000, 4000, 480);
        assert!(garbled.median() > 0.9, "{}", garbled.describe(0.9));
        assert!(!garbled.passes(0.9), "{}", garbled.describe(0.9));
        assert!(garbled.worst().unwrap().correlation < 0.5);
        assert_eq!(garbled.worst().unwrap().index % 2, 0);
    }

    #[test]
    fn dtmf_specs() {
        assert_eq!(
            parse_dtmf("1@2.5s").unwrap(),
            ('1', Duration::from_millis(2500))
        );
        assert_eq!(parse_dtmf("#@3").unwrap(), ('#', Duration::from_secs(3)));
        assert!(parse_dtmf("x@1").is_err());
        assert!(parse_dtmf("1").is_err());
        assert!(parse_dtmf("1@soon").is_err());
    }

    #[test]
    fn correlation_finds_the_lag() {
        let b: Vec<i16> = (0..4000)
            .map(|i| (((i * 7919) % 2000) as i16) - 1000)
            .collect();
        let mut a = vec![0i16; 123];
        a.extend_from_slice(&b);
        let (c, lag) = best_correlation(&a, &b, 200);
        assert_eq!(lag, 123);
        assert!(c > 0.99);
        let noise: Vec<i16> = (0..4000)
            .map(|i| (((i * 104729 + 7) % 3001) as i16) - 1500)
            .collect();
        assert!(best_correlation(&noise, &b, 50).0 < 0.3);
    }

    /// The send schedule of [`InputJitter::busy_asterisk`] has the gaps measured on a busy
    /// Asterisk: p50 20 ms, p99 27 ± 2 ms, max 47 ms, and no drift off the 20 ms grid.
    #[test]
    fn busy_asterisk_jitter_has_the_measured_gaps() {
        for seed in [1, 2, 3] {
            let j = InputJitter::busy_asterisk(seed);
            let sent: Vec<u64> = (0..20_000u64).map(|n| 20 * n + j.late_ms(n)).collect();
            let mut gaps: Vec<u64> = sent.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
            gaps.sort_unstable();
            let pct = |p: f64| gaps[((gaps.len() - 1) as f64 * p).round() as usize];
            assert_eq!(pct(0.5), 20, "seed {seed}");
            assert!(
                (25..=29).contains(&pct(0.99)),
                "seed {seed}: p99 {}",
                pct(0.99)
            );
            assert_eq!(*gaps.last().unwrap(), 47, "seed {seed}");
            assert!((0..20_000).all(|n| j.late_ms(n) <= 27));
        }
    }
}
