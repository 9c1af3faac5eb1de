//! Reconnect delays: exponential backoff with full jitter (a fleet that lost its hub at once
//! must not come back at once).

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// A delay uniformly drawn from `[0, min(cap, base * 2^attempt)]`; each call doubles the
    /// ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }

    /// The current ceiling, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// After a connection that worked for a while.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A short random delay: after a hub restart (1012) the other hubs are healthy, but not every
/// agent should arrive in the same millisecond.
pub fn soon() -> Duration {
    rand::rng().random_range(Duration::ZERO..=Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_up_to_the_cap_and_delays_stay_under_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling.as_millis());
            assert!(b.next_delay() <= ceiling);
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn many_attempts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(60));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 10);
    }
}
