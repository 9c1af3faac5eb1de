//! Conflated subscriptions (`"max_rate"`): each device's latest message, at most `max_rate`
//! times a second, for a viewer that cannot or need not take every reading.
//!
//! The broker delivers to a *feed*, an [`Outbox`] of the subscription's own, like to any
//! subscriber; a task takes everything from it at once and keeps, per device, only the newest
//! live message it has not sent yet. Every `1 / max_rate` seconds it offers those to the
//! connection's outbox; what the outbox has no room for stays pending and is replaced by newer
//! messages meanwhile. Memory is bounded by the number of devices on the channel, not by the
//! publish rate, and the subscriber is never closed as a slow consumer for falling behind: it
//! sees fewer intermediate values. Messages keep their real offsets, so a conflated stream has
//! gaps by design.
//!
//! Frames that are not live messages (`subscribed`, snapshots, replays) are passed on at once
//! and in order, after the messages pending before them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::outbox::{CloseReason, Outbound, Outbox};

/// The feed's bounds: the task drains it continuously, so it fills only if this hub cannot
/// keep up with the channel at all, and then the connection is closed as a slow consumer.
const FEED_ITEMS: usize = 4096;
const FEED_BYTES: usize = 16 * 1024 * 1024;
/// Pending messages are sent in queue items of about this size.
const FLUSH_CHUNK: usize = 64 * 1024;

/// One conflated subscription: give [`Conflation::feed`] to the broker as the subscriber, and
/// call [`Conflation::stop`] once it is unsubscribed.
pub struct Conflation {
    feed: Outbox,
    stopped: Arc<Mutex<bool>>,
}

impl Conflation {
    /// Starts the task for a subscription of `connection` (needs a Tokio runtime). The feed has
    /// the connection's id, which is how the broker knows the subscriber.
    pub fn start(connection: &Outbox, max_rate: f64, metrics: Arc<Metrics>) -> Conflation {
        let (feed, rx) = Outbox::bounded(connection.id(), FEED_ITEMS, FEED_BYTES);
        let stopped = Arc::new(Mutex::new(false));
        let task = Task {
            rx,
            feed: feed.clone(),
            connection: connection.clone(),
            period: Duration::from_secs_f64(1.0 / max_rate),
            stopped: stopped.clone(),
            pending: HashMap::new(),
            arrivals: 0,
            metrics,
        };
        tokio::spawn(task.run());
        Conflation { feed, stopped }
    }

    pub fn feed(&self) -> &Outbox {
        &self.feed
    }

    /// Nothing more of this subscription reaches the connection after this returns.
    pub fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.feed.close(CloseReason::Gone);
    }
}

struct Task {
    rx: mpsc::Receiver<Outbound>,
    feed: Outbox,
    connection: Outbox,
    period: Duration,
    stopped: Arc<Mutex<bool>>,
    /// The newest unsent live message per device, with the order it arrived in: they are sent
    /// in that order, so each partition's offsets still only grow.
    pending: HashMap<Box<str>, (u64, Bytes)>,
    arrivals: u64,
    metrics: Arc<Metrics>,
}

impl Task {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let closed = self.connection.closed_owned();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                biased;
                _ = &mut closed => return,
                item = self.rx.recv() => {
                    let Some(item) = item else { return };
                    self.feed.taken(item.frames.len());
                    if !self.take(item) {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if !self.flush() {
                        return;
                    }
                }
            }
            if self.feed.is_closed()
                && !*self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
            {
                // The feed overflowed: this hub cannot keep up with the channel.
                self.connection
                    .close(CloseReason::Hub(hub_protocol::CloseCode::SlowConsumer));
                return;
            }
        }
    }

    /// Keeps a live message as its device's pending one, or passes anything else on after what
    /// is pending. False once the subscription or the connection has ended.
    fn take(&mut self, item: Outbound) -> bool {
        let live = item.published_at.is_some() && item.count == 1;
        if let Some(device) = live.then(|| device_of(&item.frames)).flatten() {
            self.arrivals += 1;
            let entry = (self.arrivals, item.frames.clone());
            match self.pending.get_mut(device) {
                Some(held) => {
                    *held = entry;
                    self.metrics.conflated.inc();
                }
                None => {
                    self.pending.insert(device.into(), entry);
                }
            }
            return true;
        }
        // Older than what follows: they go first, or not at all.
        if !self.flush() {
            return false;
        }
        let dropped = self.pending.len();
        self.pending.clear();
        self.metrics.conflated.add(dropped as u64);
        self.send(item, true)
    }

    /// Offers every pending message, in items of about [`FLUSH_CHUNK`]; from the first the
    /// outbox has no room for, they stay pending. False once the subscription or the connection
    /// has ended.
    fn flush(&mut self) -> bool {
        let mut all: Vec<(Box<str>, (u64, Bytes))> = self.pending.drain().collect();
        all.sort_unstable_by_key(|(_, (arrival, _))| *arrival);
        let mut start = 0;
        while start < all.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < all.len() && (end == start || bytes + all[end].1.1.len() <= FLUSH_CHUNK) {
                bytes += all[end].1.1.len();
                end += 1;
            }
            let mut frames = BytesMut::with_capacity(bytes);
            for (_, (_, frame)) in &all[start..end] {
                frames.extend_from_slice(frame);
            }
            let item = Outbound {
                frames: frames.freeze(),
                count: (end - start) as u32,
                published_at: None,
            };
            if !self.send(item, false) {
                break;
            }
            start = end;
        }
        self.pending.extend(all.drain(start..));
        !self.connection.is_closed()
            && !*self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` unless the subscription was stopped; `must` items (control frames) close
    /// a connection whose queue is full, as for any subscriber, pending messages only wait.
    fn send(&self, item: Outbound, must: bool) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        if *stopped {
            return false;
        }
        let queued = match must {
            true => self.connection.push(item),
            false => self.connection.offer(item),
        };
        queued.is_ok()
    }
}

/// The device of a `message` frame as the hub encodes it: `"from"` comes before `data`, so its
/// first occurrence is the field itself, and a device id never holds a quote.
fn device_of(frame: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b",\"from\":\"";
    let start = frame.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = frame[start..].iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&frame[start..start + len]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_is_read_from_the_from_field_not_from_the_data() {
        let frame = br#"..{"type":"message","channel":"fleet","epoch":"e","offset":3,"from":"pi-7","data":{"a":1,"from":"evil"}}"#;
        assert_eq!(device_of(frame), Some("pi-7"));
        assert_eq!(device_of(br#"{"type":"subscribed"}"#), None);
    }
}
