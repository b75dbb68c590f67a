//! Capped exponential backoff, sans-IO: the one retry schedule of every reconnect loop (the
//! ARI events link, the ARI reconcile passes).
//!
//! [`Backoff::next_wait`] gives the wait before the next attempt — `initial`, then doubled per
//! failed attempt up to `max` — and [`Backoff::reset`] starts over after a success. No
//! jitter: each loop retries one server on the LAN, so there is no herd to spread.

use std::time::Duration;

/// A capped exponential backoff schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max` (`max` below `initial` is raised to it).
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
        }
    }

    /// The wait before the next attempt; the one after it is doubled (at most `max`).
    pub(crate) fn next_wait(&mut self) -> Duration {
        let wait = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        wait
    }

    /// The wait [`Self::next_wait`] would give, without moving on.
    pub(crate) fn peek(&self) -> Duration {
        self.current
    }

    /// Back to `initial` (after a success).
    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(500), ms(3000));
        let waits: Vec<_> = (0..6).map(|_| b.next_wait()).collect();
        assert_eq!(
            waits,
            [ms(500), ms(1000), ms(2000), ms(3000), ms(3000), ms(3000)]
        );
        b.reset();
        assert_eq!(b.peek(), ms(500));
        assert_eq!(b.next_wait(), ms(500));
        // A cap below the start holds at the start; no overflow near Duration::MAX.
        assert_eq!(Backoff::new(ms(800), ms(100)).next_wait(), ms(800));
        let mut huge = Backoff::new(Duration::MAX / 2, Duration::MAX);
        huge.next_wait();
        assert_eq!(huge.next_wait(), Duration::MAX - Duration::from_nanos(1));
    }
}
