//! The local subscribers of one channel and delivery to them.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;

use crate::outbox::{Outbound, Outbox, SendError};

/// Subscribers of one channel on this hub. A dense list keeps delivery a linear walk; the index
/// makes unsubscribe O(1) during a reconnect storm.
#[derive(Default)]
pub struct Subscribers {
    list: Vec<Outbox>,
    index: HashMap<u64, usize>,
}

/// What one delivery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub delivered: usize,
    /// Subscribers found too slow: closed with 4008 and removed.
    pub slow: usize,
}

impl Subscribers {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    #[cfg(test)]
    pub fn contains(&self, id: u64) -> bool {
        self.index.contains_key(&id)
    }

    pub fn insert(&mut self, outbox: Outbox) -> bool {
        if self.index.contains_key(&outbox.id()) {
            return false;
        }
        self.index.insert(outbox.id(), self.list.len());
        self.list.push(outbox);
        true
    }

    pub fn remove(&mut self, id: u64) -> bool {
        let Some(i) = self.index.remove(&id) else {
            return false;
        };
        self.list.swap_remove(i);
        if let Some(moved) = self.list.get(i) {
            self.index.insert(moved.id(), i);
        }
        true
    }

    /// Queues the same encoded frame to every subscriber: a reference count each, no copy.
    pub fn deliver(&mut self, frame: &Bytes, published_at: Instant) -> Delivery {
        let mut result = Delivery::default();
        let mut i = 0;
        while i < self.list.len() {
            let item = Outbound {
                frames: frame.clone(),
                count: 1,
                published_at: Some(published_at),
            };
            match self.list[i].push(item) {
                Ok(()) => {
                    result.delivered += 1;
                    i += 1;
                }
                Err(err) => {
                    if err == SendError::SlowConsumer {
                        result.slow += 1;
                    }
                    // Its connection is closing; it unsubscribes itself too, which is then a no-op.
                    let id = self.list[i].id();
                    self.remove(id);
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_shares_bytes_and_drops_slow_subscribers() {
        let mut subs = Subscribers::default();
        let (fast, mut fast_rx) = Outbox::new(1, 8);
        let (slow, _slow_rx) = Outbox::new(2, 1);
        subs.insert(fast);
        subs.insert(slow.clone());
        let frame = Bytes::from_static(b"frame");
        assert_eq!(
            subs.deliver(&frame, Instant::now()),
            Delivery {
                delivered: 2,
                slow: 0
            }
        );
        assert_eq!(
            subs.deliver(&frame, Instant::now()),
            Delivery {
                delivered: 1,
                slow: 1
            }
        );
        assert_eq!(subs.len(), 1);
        assert!(slow.is_closed());
        let got = fast_rx.try_recv().unwrap();
        assert_eq!(
            got.frames.as_ptr(),
            frame.as_ptr(),
            "same bytes, not a copy"
        );
    }

    #[test]
    fn remove_keeps_the_index_consistent() {
        let mut subs = Subscribers::default();
        let outboxes: Vec<_> = (0..4).map(|id| Outbox::new(id, 1).0).collect();
        for o in &outboxes {
            subs.insert(o.clone());
        }
        assert!(subs.remove(0));
        assert!(!subs.remove(0));
        assert!(subs.remove(3));
        assert!(subs.contains(1) && subs.contains(2));
        assert!(subs.remove(2) && subs.remove(1));
        assert!(subs.is_empty());
    }
}
