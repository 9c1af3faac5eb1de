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
//! Frames that are not live messages (`subscribed`, snapshots, replays) keep their place: they
//! go after the messages pending when they came, and before any message that came after them.
//! They are offered like the rest and wait while the connection's queue is full; the broker
//! sizes replays and snapshots for the connection's queue, not the feed's, so each one fits
//! once the queue has drained.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::metrics::Metrics;
use crate::outbox::{CloseReason, Outbound, Outbox, Queue, SendError};

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
    /// Starts the task for a subscription of `connection` (needs a Tokio runtime).
    pub fn start(connection: &Outbox, max_rate: f64, metrics: Arc<Metrics>) -> Conflation {
        let (feed, rx) = Outbox::feeding(connection, FEED_ITEMS, FEED_BYTES);
        let stopped = Arc::new(Mutex::new(false));
        let task = Task {
            rx,
            feed: feed.clone(),
            connection: connection.clone(),
            period: Duration::from_secs_f64(1.0 / max_rate),
            stopped: stopped.clone(),
            pending: HashMap::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            arrivals: 0,
            metrics,
        };
        tokio::spawn(task.run());
        Conflation { feed, stopped }
    }

    pub fn feed(&self) -> &Outbox {
        &self.feed
    }

    /// Nothing more of this subscription reaches the connection after this returns, and the
    /// task ends (with what it held) as soon as it is scheduled.
    pub fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.feed.close(CloseReason::Gone);
    }
}

struct Task {
    rx: Queue,
    feed: Outbox,
    connection: Outbox,
    period: Duration,
    stopped: Arc<Mutex<bool>>,
    /// The newest unsent live message per device, with the order it arrived in: they are sent
    /// in that order, so each partition's offsets still only grow.
    pending: HashMap<Box<str>, (u64, Bytes)>,
    /// What must reach the connection, in this order, before any pending message: frames that
    /// are not live messages, and the messages that were pending when one came.
    held: VecDeque<Outbound>,
    held_bytes: usize,
    arrivals: u64,
    metrics: Arc<Metrics>,
}

/// Whether the task goes on.
enum Flow {
    Go,
    Stop,
}

impl Task {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let closed = self.connection.closed_owned();
        tokio::pin!(closed);
        let feed_closed = self.feed.closed_owned();
        tokio::pin!(feed_closed);
        loop {
            // The tick before the feed: a feed that is never empty must not starve the sending.
            let flow = tokio::select! {
                biased;
                _ = &mut closed => Flow::Stop,
                _ = &mut feed_closed => {
                    if !self.is_stopped() {
                        // The feed overflowed: this hub cannot keep up with the channel.
                        self.connection
                            .close(CloseReason::Hub(hub_protocol::CloseCode::SlowConsumer));
                    }
                    Flow::Stop
                }
                _ = tick.tick() => self.flush(),
                item = self.rx.recv() => match item {
                    None => Flow::Stop,
                    Some(item) => self.take(item),
                },
            };
            if let Flow::Stop = flow {
                return;
            }
        }
    }

    fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps a live message as its device's pending one; holds anything else after what is
    /// pending, and sends what is held as far as the connection takes it.
    fn take(&mut self, item: Outbound) -> Flow {
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
            return Flow::Go;
        }
        let all = self.pending_sorted();
        let mut start = 0;
        while start < all.len() {
            let (chunk, end) = chunk_of(&all, start);
            self.hold(chunk);
            start = end;
        }
        self.hold(item);
        if self.held_bytes > FEED_BYTES {
            // Control frames pile up faster than the connection takes them.
            self.connection
                .close(CloseReason::Hub(hub_protocol::CloseCode::SlowConsumer));
            return Flow::Stop;
        }
        self.send_held()
    }

    fn hold(&mut self, item: Outbound) {
        self.held_bytes += item.frames.len();
        self.held.push_back(item);
    }

    /// Every pending message, oldest first.
    fn pending_sorted(&mut self) -> Vec<(Box<str>, (u64, Bytes))> {
        let mut all: Vec<_> = self.pending.drain().collect();
        all.sort_unstable_by_key(|(_, (arrival, _))| *arrival);
        all
    }

    /// Offers what is held, in order, until the connection's queue is full.
    fn send_held(&mut self) -> Flow {
        while let Some(item) = self.held.pop_front() {
            let len = item.frames.len();
            match self.send(item) {
                Ok(()) => self.held_bytes -= len,
                Err((SendError::SlowConsumer, item)) => {
                    self.held.push_front(item);
                    return Flow::Go;
                }
                Err((SendError::Closed, _)) => return Flow::Stop,
            }
        }
        Flow::Go
    }

    /// Every period: what is held, then every pending message; what the connection's queue has
    /// no room for waits, and a pending message is replaced by a newer one meanwhile.
    fn flush(&mut self) -> Flow {
        if let Flow::Stop = self.send_held() {
            return Flow::Stop;
        }
        if !self.held.is_empty() || self.pending.is_empty() {
            return Flow::Go;
        }
        let mut all = self.pending_sorted();
        let mut start = 0;
        let mut flow = Flow::Go;
        while start < all.len() {
            let (item, end) = chunk_of(&all, start);
            match self.send(item) {
                Ok(()) => start = end,
                Err((SendError::SlowConsumer, _)) => break,
                Err((SendError::Closed, _)) => {
                    flow = Flow::Stop;
                    break;
                }
            }
        }
        self.pending.extend(all.drain(start..));
        flow
    }

    /// Offers `item` to the connection unless the subscription was stopped; a full queue only
    /// refuses it.
    fn send(&self, item: Outbound) -> Result<(), (SendError, Outbound)> {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        if *stopped {
            return Err((SendError::Closed, item));
        }
        self.connection.offer(item)
    }
}

/// The messages of `all` from `start` that fit one queue item of about [`FLUSH_CHUNK`] (at
/// least one), and where the next item starts.
fn chunk_of(all: &[(Box<str>, (u64, Bytes))], start: usize) -> (Outbound, usize) {
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
    (item, end)
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

    fn live(device: &str, n: u64) -> Outbound {
        let frame = format!(
            r#"{{"type":"message","channel":"fleet","epoch":"e","offset":{n},"from":"{device}","data":{{}}}}"#
        );
        Outbound {
            frames: Bytes::from(frame),
            count: 1,
            published_at: Some(std::time::Instant::now()),
        }
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(crate::server::metric_labels()))
    }

    #[tokio::test]
    async fn a_stopped_subscription_ends_its_task_at_once_even_at_the_slowest_rate() {
        let (connection, _rx) = Outbox::bounded(1, 16, 1 << 20);
        let conflation = Conflation::start(&connection, hub_protocol::client::MIN_RATE, metrics());
        conflation.feed().push(live("pi-1", 1)).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!conflation.feed().is_unread());
        conflation.stop();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(conflation.feed().is_unread(), "the task ended");
        assert!(!connection.is_closed(), "the connection goes on");
    }

    #[tokio::test]
    async fn a_frame_that_is_not_live_waits_for_room_after_the_pending_ones_and_closes_nothing() {
        // Room for two items: the first tick sends two devices' values, the third waits.
        let (connection, mut rx) = Outbox::bounded(1, 2, 1 << 20);
        let conflation = Conflation::start(&connection, 100.0, metrics());
        let feed = conflation.feed();
        feed.push(Outbound::control(Bytes::from_static(b"[subscribed]")))
            .unwrap();
        for d in 0..3 {
            feed.push(live(&format!("pi-{d}"), d)).unwrap();
        }
        feed.push(Outbound::control(Bytes::from_static(b"[hole]")))
            .unwrap();
        feed.push(live("pi-0", 9)).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!connection.is_closed(), "a full queue closes nothing");
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while got.len() < 4 && tokio::time::Instant::now() < deadline {
            if let Ok(Some(item)) =
                tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
            {
                got.push(String::from_utf8(item.frames.to_vec()).unwrap());
            }
        }
        assert_eq!(got[0], "[subscribed]");
        // The three pending before the hole, in their order, then the hole, then what came after.
        let offsets = |s: &str| {
            s.match_indices("\"offset\":")
                .map(|(i, _)| s.as_bytes()[i + 9] - b'0')
                .collect::<Vec<_>>()
        };
        assert_eq!(offsets(&got[1]), [0, 1, 2], "{got:?}");
        assert_eq!(got[2], "[hole]");
        assert_eq!(offsets(&got[3]), [9]);
    }
}
