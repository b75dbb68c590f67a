//! Send pacing as measured at the socket: the gaps between consecutive packets, in a
//! fixed histogram of 0.25 ms bins up to 100 ms (anything longer counts in the last bin).
//! Sans-IO: the caller passes the `now` of each send. No allocation after creation.

use std::time::Duration;
use tokio::time::Instant;

/// Width of one bin.
const BIN: Duration = Duration::from_micros(250);
/// Bins: 0–100 ms.
const BINS: usize = 400;

/// Gaps between sends.
#[derive(Debug, Clone)]
pub(crate) struct GapHistogram {
    first: Option<Instant>,
    last: Option<Instant>,
    bins: Box<[u32; BINS]>,
    count: u32,
}

impl Default for GapHistogram {
    fn default() -> Self {
        GapHistogram {
            first: None,
            last: None,
            bins: Box::new([0; BINS]),
            count: 0,
        }
    }
}

impl GapHistogram {
    /// A packet went out at `now`.
    pub(crate) fn record(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        if let Some(last) = self.last.replace(now) {
            let gap = now.saturating_duration_since(last);
            let bin = ((gap.as_micros() / BIN.as_micros()) as usize).min(BINS - 1);
            self.bins[bin] += 1;
            self.count += 1;
        }
    }

    /// Gaps recorded (one fewer than the packets).
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// The mean gap: first to last send over the gaps; `None` before two packets. A
    /// drift-free sender keeps it at the frame time (20 ms) however late single ticks are,
    /// since a late tick is caught up by the next ones.
    pub(crate) fn mean(&self) -> Option<Duration> {
        let span = self.last?.saturating_duration_since(self.first?);
        (self.count > 0).then(|| span / self.count)
    }

    /// The `q` quantile (0.0–1.0) of the gaps, to the bin's middle (±0.125 ms); `None`
    /// before two packets.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * f64::from(self.count)).ceil() as u32).max(1);
        let mut seen = 0;
        for (i, &n) in self.bins.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(BIN * i as u32 + BIN / 2);
            }
        }
        Some(BIN * BINS as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_steady_stream_with_one_late_packet() {
        let t0 = Instant::now();
        let mut h = GapHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        assert_eq!(h.mean(), None);
        let mut t = t0;
        for i in 0..200 {
            t += if i == 100 {
                Duration::from_millis(30)
            } else {
                Duration::from_millis(20)
            };
            h.record(t);
        }
        assert_eq!(h.count(), 199);
        // 198 gaps of 20 ms and one of 30 ms.
        assert_eq!(h.mean(), Some(Duration::from_millis(3_990) / 199));
        let p50 = h.quantile(0.5).unwrap();
        assert!(
            p50 >= Duration::from_micros(19_875) && p50 <= Duration::from_micros(20_125),
            "{p50:?}"
        );
        assert_eq!(
            h.quantile(0.99),
            h.quantile(0.5),
            "one gap in 199 is above p99"
        );
        let max = h.quantile(1.0).unwrap();
        assert!(
            max >= Duration::from_millis(30) && max < Duration::from_micros(30_250),
            "{max:?}"
        );
    }
}
