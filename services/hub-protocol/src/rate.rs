//! The token bucket behind the protocol's rate limits (`limits.publish_rate`/`publish_burst`,
//! `limits.subscribe_rate`/`subscribe_burst`): the hub enforces them with it, and a client that
//! paces itself with the same arithmetic stays under them.

use std::time::{Duration, Instant};

/// A classic token bucket: `rate` tokens per second, at most `burst` saved up, full at start.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whole tokens there are now, for a caller that sends a batch: it then calls
    /// [`TokenBucket::take`] once per item sent.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens.floor() as usize
    }

    /// How long until `n` tokens are saved up (never more than the burst can hold).
    pub fn time_until(&mut self, n: usize, now: Instant) -> Duration {
        self.refill(now);
        let short = (n as f64).min(self.burst) - self.tokens;
        if short <= 0.0 || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(short / self.rate).unwrap_or(Duration::MAX)
    }

    /// Spends one token counted by [`TokenBucket::available`].
    pub fn take(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10.0, 3);
        assert!((0..3).all(|_| b.try_take(start)));
        assert!(!b.try_take(start));
        assert!(b.try_take(start + Duration::from_millis(110)));
        assert!(!b.try_take(start + Duration::from_millis(110)));
    }

    #[test]
    fn a_batch_spends_what_is_available_and_no_more() {
        let start = Instant::now();
        let mut b = TokenBucket::new(100.0, 5);
        assert_eq!(b.available(start), 5);
        (0..5).for_each(|_| b.take());
        assert_eq!(b.available(start), 0);
        assert_eq!(b.available(start + Duration::from_millis(25)), 2);
        assert_eq!(
            b.available(start + Duration::from_secs(60)),
            5,
            "capped at the burst"
        );
    }

    #[test]
    fn the_wait_for_a_window_is_what_the_rate_needs_to_fill_it() {
        let start = Instant::now();
        let mut b = TokenBucket::new(50.0, 32);
        assert_eq!(b.time_until(8, start), Duration::ZERO);
        (0..32).for_each(|_| b.take());
        let secs = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
        assert_eq!(secs(b.time_until(8, start)), 0.16);
        assert_eq!(secs(b.time_until(100, start)), 0.64, "at most a full burst");
    }
}
