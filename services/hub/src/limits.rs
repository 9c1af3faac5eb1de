//! Admission control: token buckets for publish floods and reconnect storms, and the cap on open
//! connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A classic token bucket: `rate` tokens per second, at most `burst` saved up.
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

    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a new connection was turned away before authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    ConnectRate,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::ConnectRate => "connect_rate",
        }
    }
}

/// Admits new WebSocket connections within `max` open and the connect rate.
pub struct ConnectionGate {
    max: usize,
    open: AtomicUsize,
    rate: Mutex<TokenBucket>,
}

/// Holds one slot of the gate until dropped.
pub struct ConnectionPermit(Arc<ConnectionGate>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionGate {
    pub fn new(max: usize, rate: f64, burst: u32) -> Arc<Self> {
        Arc::new(ConnectionGate {
            max,
            open: AtomicUsize::new(0),
            rate: Mutex::new(TokenBucket::new(rate, burst)),
        })
    }

    pub fn admit(self: &Arc<Self>) -> Result<ConnectionPermit, Refusal> {
        let reserved = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        if reserved.is_err() {
            return Err(Refusal::MaxConnections);
        }
        let permit = ConnectionPermit(self.clone());
        let admitted = self
            .rate
            .lock()
            .map(|mut bucket| bucket.try_take(Instant::now()))
            .unwrap_or(true);
        if admitted {
            Ok(permit)
        } else {
            Err(Refusal::ConnectRate)
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
    fn gate_caps_open_connections_and_frees_on_drop() {
        let gate = ConnectionGate::new(2, 1000.0, 1000);
        let a = gate.admit().unwrap();
        let _b = gate.admit().unwrap();
        assert_eq!(gate.admit().err(), Some(Refusal::MaxConnections));
        drop(a);
        assert!(gate.admit().is_ok());
    }

    #[test]
    fn gate_limits_connect_rate() {
        let gate = ConnectionGate::new(100, 0.001, 2);
        let _a = gate.admit().unwrap();
        let _b = gate.admit().unwrap();
        assert_eq!(gate.admit().err(), Some(Refusal::ConnectRate));
        assert_eq!(gate.open(), 2, "a refused connection holds no slot");
    }
}
