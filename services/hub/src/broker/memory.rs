//! The embedded broker: channels, history and deduplication in this process.
//!
//! Each channel's offset, history and subscribers sit under one mutex, so an append and its
//! fan-out, or a replay and the subscriber joining the live list, happen as one step. Locks are
//! std mutexes held for synchronous work only, never across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use hub_protocol::{Position, ServerFrame, Since};

use hub_protocol::presence::CHANNEL as PRESENCE;
use serde_json::value::RawValue;

use super::presence::{LocalPresence, PresenceChange, presence_data};
use super::{Broker, BrokerError, Publication, PublishOutcome, SubscribeOutcome, new_epoch, pack};
use crate::config::HistorySettings;
use crate::fanout::Subscribers;
use crate::frame;
use crate::metrics::Metrics;
use crate::outbox::Outbox;

pub struct MemoryBroker {
    inner: Arc<Inner>,
}

struct Inner {
    channels: RwLock<HashMap<Box<str>, Mutex<Channel>>>,
    devices: Mutex<HashMap<Box<str>, DeviceSeq>>,
    /// The `presence` channel and the counts it follows, under one lock so that messages come
    /// in the order of the changes. It is the broker's own channel, outside the table: it
    /// always exists and takes no room from `limits.max_channels`.
    presence: Mutex<PresenceLog>,
    /// This hub's name, the `hub` of its presence messages.
    node_id: Arc<str>,
    history: HistorySettings,
    /// At most this many channels are held (`limits.max_channels`).
    max_channels: usize,
    metrics: Arc<Metrics>,
}

struct PresenceLog {
    local: LocalPresence,
    channel: Channel,
}

struct DeviceSeq {
    last_seq: u64,
    seen: Instant,
}

struct Entry {
    offset: u64,
    frame: Bytes,
    at: Instant,
}

/// A device's latest message on a channel, for snapshots.
struct Latest {
    frame: Bytes,
    offset: u64,
    at: Instant,
}

struct Channel {
    epoch: String,
    offset: u64,
    history: VecDeque<Entry>,
    /// Per device, bounded by `history.snapshot_devices`.
    latest: HashMap<Box<str>, Latest>,
    subscribers: Subscribers,
    active: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Channel {
    fn new(now: Instant) -> Self {
        Channel {
            epoch: new_epoch(),
            offset: 0,
            history: VecDeque::new(),
            latest: HashMap::new(),
            subscribers: Subscribers::default(),
            active: now,
        }
    }

    fn trim(&mut self, limits: &HistorySettings, now: Instant) {
        while self.history.len() > limits.size {
            self.history.pop_front();
        }
        while self
            .history
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) > limits.ttl)
        {
            self.history.pop_front();
        }
    }

    /// Keeps `frame` as `device`'s latest message. Past `max` devices the least recently heard
    /// sixteenth goes at once, so a fleet larger than the store costs one scan per 1/16 of it.
    fn remember(&mut self, device: &str, frame: &Bytes, now: Instant, max: usize) {
        let latest = Latest {
            frame: frame.clone(),
            offset: self.offset,
            at: now,
        };
        if let Some(held) = self.latest.get_mut(device) {
            *held = latest;
            return;
        }
        if self.latest.len() >= max {
            let mut offsets: Vec<u64> = self.latest.values().map(|l| l.offset).collect();
            let cut = (offsets.len() / 16).max(1).min(offsets.len()) - 1;
            let (_, oldest_kept, _) = offsets.select_nth_unstable(cut);
            let cutoff = *oldest_kept;
            self.latest.retain(|_, l| l.offset > cutoff);
        }
        self.latest.insert(device.into(), latest);
    }

    /// The latest messages of devices heard within `max_age` (any, without one), oldest first.
    fn snapshot_items(&mut self, max_age: Option<Duration>, now: Instant) -> Vec<Bytes> {
        if let Some(max_age) = max_age {
            self.latest
                .retain(|_, l| now.saturating_duration_since(l.at) <= max_age);
        }
        let mut items: Vec<(u64, Bytes)> = self
            .latest
            .values()
            .map(|l| (l.offset, frame::payload(&l.frame)))
            .collect();
        items.sort_unstable_by_key(|(offset, _)| *offset);
        items.into_iter().map(|(_, payload)| payload).collect()
    }

    /// Decides what a subscribe with `since` can replay: `(recovered, first offset to replay)`.
    fn recovery(&self, since: Option<&Position>) -> (bool, Option<u64>) {
        let Some(pos) = since else {
            return (false, None);
        };
        if pos.epoch != self.epoch || pos.offset > self.offset {
            return (false, None);
        }
        if pos.offset == self.offset {
            return (true, None);
        }
        match self.history.front() {
            Some(first) if first.offset <= pos.offset + 1 => (true, Some(pos.offset + 1)),
            _ => (false, None),
        }
    }
}

impl MemoryBroker {
    /// Creates the broker and its housekeeping task (needs a Tokio runtime).
    pub fn new(
        history: HistorySettings,
        max_channels: usize,
        node_id: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let inner = Arc::new(Inner {
            channels: RwLock::new(HashMap::new()),
            devices: Mutex::new(HashMap::new()),
            presence: Mutex::new(PresenceLog {
                local: LocalPresence::default(),
                channel: Channel::new(Instant::now()),
            }),
            node_id,
            history,
            max_channels,
            metrics,
        });
        let period =
            (inner.history.ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        tokio::spawn(sweep(Arc::downgrade(&inner), period));
        MemoryBroker { inner }
    }

    /// Number of channels held (tests, metrics).
    #[cfg(test)]
    pub fn channel_count(&self) -> usize {
        self.inner
            .channels
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Inner {
    /// Runs `f` on the channel, creating it if asked.
    fn with_channel<R>(
        &self,
        name: &str,
        create: bool,
        f: impl FnOnce(&mut Channel) -> R,
    ) -> Option<R> {
        {
            let map = self.channels.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(ch) = map.get(name) {
                return Some(f(&mut lock(ch)));
            }
        }
        if !create {
            return None;
        }
        let mut map = self
            .channels
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let ch = map
            .entry(name.into())
            .or_insert_with(|| Mutex::new(Channel::new(Instant::now())));
        Some(f(ch.get_mut().unwrap_or_else(PoisonError::into_inner)))
    }

    /// Makes room for every channel in `names` that does not exist yet, or refuses them all, so
    /// that a publication is stored in all its channels or in none. `limit` is the table size
    /// this caller may fill: subscribes (any viewer can invent names) leave the last quarter of
    /// `max_channels` to publications. Racing creators can pass the bound by as many channels as
    /// there are of them at once; it bounds memory, not a count.
    fn ensure_room(&self, names: &[impl AsRef<str>], limit: usize) -> Result<(), BrokerError> {
        {
            let map = self.channels.read().unwrap_or_else(PoisonError::into_inner);
            if names.iter().all(|n| map.contains_key(n.as_ref())) {
                return Ok(());
            }
        }
        let mut map = self
            .channels
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let missing = names
            .iter()
            .filter(|n| !map.contains_key(n.as_ref()))
            .count();
        if map.len() + missing > limit {
            self.metrics.channel_table_full.inc();
            return Err(BrokerError::ChannelTableFull {
                max: self.max_channels,
            });
        }
        let now = Instant::now();
        for name in names {
            map.entry(name.as_ref().into())
                .or_insert_with(|| Mutex::new(Channel::new(now)));
        }
        self.metrics.channels.set(map.len() as i64);
        Ok(())
    }

    fn publish(&self, p: &Publication<'_>) -> Result<Vec<PublishOutcome>, BrokerError> {
        let now = Instant::now();
        // Held across the appends so that two connections of one device cannot interleave.
        let mut devices = lock(&self.devices);
        let mut last = self.remembered(&devices, p.device, now);
        if p.readings.iter().any(|r| r.seq > last) {
            self.ensure_room(p.channels, self.max_channels)?;
        }
        let mut outcomes = Vec::with_capacity(p.readings.len());
        for reading in p.readings {
            if reading.seq <= last {
                outcomes.push(PublishOutcome::Duplicate);
                continue;
            }
            for channel in p.channels {
                self.with_channel(channel, true, |ch| {
                    self.append(ch, channel, p.device, reading.data, p.received_at, now)
                });
            }
            last = reading.seq;
            outcomes.push(PublishOutcome::Accepted);
        }
        let remembered = DeviceSeq {
            last_seq: last,
            seen: now,
        };
        match devices.get_mut(p.device) {
            Some(d) => *d = remembered,
            None => {
                devices.insert(p.device.into(), remembered);
            }
        }
        Ok(outcomes)
    }

    /// The device's last accepted seq, forgotten `meta_ttl` after its last publish whether or not
    /// the sweep has run yet (the Redis broker forgets at that moment too).
    fn remembered(
        &self,
        devices: &HashMap<Box<str>, DeviceSeq>,
        device: &str,
        now: Instant,
    ) -> u64 {
        devices
            .get(device)
            .filter(|d| now.saturating_duration_since(d.seen) <= self.history.meta_ttl)
            .map_or(0, |d| d.last_seq)
    }

    fn append(
        &self,
        ch: &mut Channel,
        name: &str,
        device: &str,
        data: &RawValue,
        received_at: Instant,
        now: Instant,
    ) {
        ch.offset += 1;
        ch.active = now;
        let message = ServerFrame::Message {
            channel: name.into(),
            part: None,
            epoch: ch.epoch.as_str().into(),
            offset: ch.offset,
            from: device.into(),
            data,
        };
        let encoded = frame::text(data.get().len() + name.len() + 96, |buf| {
            message.write_json(buf)
        });
        if self.history.size > 0 {
            ch.history.push_back(Entry {
                offset: ch.offset,
                frame: encoded.clone(),
                at: now,
            });
            ch.trim(&self.history, now);
        }
        ch.remember(device, &encoded, now, self.history.snapshot_devices);
        let delivery = ch.subscribers.deliver(&encoded, received_at);
        self.metrics.deliveries.add(delivery.delivered as u64);
        self.metrics.delivery_drops.add(delivery.slow as u64);
    }

    /// Counts the change and appends the presence message it makes, if any, to `presence`.
    fn presence(&self, device: &str, change: PresenceChange) {
        let mut log = lock(&self.presence);
        let Some(transition) = log.local.change(device, change, super::now_ms()) else {
            return;
        };
        let data = presence_data(device, &self.node_id, &transition);
        let now = Instant::now();
        self.append(&mut log.channel, PRESENCE, device, &data, now, now);
        let state = if transition.online {
            "online"
        } else {
            "offline"
        };
        self.metrics.presence_changes.inc(state);
    }

    /// Runs `f` on the channel a subscribe names, under its lock: `presence`, or one of the table,
    /// made if there is room for it.
    fn subscribing(
        &self,
        name: &str,
        f: impl FnOnce(&mut Channel) -> Result<SubscribeOutcome, BrokerError>,
    ) -> Result<SubscribeOutcome, BrokerError> {
        if name == PRESENCE {
            return f(&mut lock(&self.presence).channel);
        }
        let for_subscribes = self.max_channels - self.max_channels / 4;
        self.ensure_room(&[name], for_subscribes)?;
        self.with_channel(name, true, f)
            .unwrap_or_else(|| Err(BrokerError::Unavailable("channel vanished".into())))
    }

    fn subscribe(
        &self,
        name: &str,
        since: Option<&Position>,
        outbox: &Outbox,
    ) -> Result<SubscribeOutcome, BrokerError> {
        self.subscribing(name, |ch| self.attach(ch, name, since, outbox))
    }

    fn subscribe_with_snapshot(
        &self,
        name: &str,
        outbox: &Outbox,
    ) -> Result<SubscribeOutcome, BrokerError> {
        self.subscribing(name, |ch| self.attach_snapshot(ch, name, outbox))
    }

    /// Queues `subscribed` and the snapshot as of the channel's offset, then adds the subscriber
    /// to the live list: all under the channel's lock, so the live stream starts right after it.
    fn attach_snapshot(
        &self,
        ch: &mut Channel,
        name: &str,
        outbox: &Outbox,
    ) -> Result<SubscribeOutcome, BrokerError> {
        let now = Instant::now();
        ch.trim(&self.history, now);
        ch.active = now;
        let items = ch.snapshot_items(latest_max_age(name, &self.history), now);
        let at = super::SnapshotAt {
            channel: name,
            part: None,
            epoch: &ch.epoch,
            offset: ch.offset,
        };
        let (frames, size) = super::snapshot_frames(
            &at,
            &items,
            false,
            self.history.snapshot_devices,
            super::replay_budget(outbox),
        );
        let refs: Vec<&Bytes> = frames.iter().collect();
        // The snapshot joins the live stream with nothing missed.
        Self::join(
            (&ch.epoch, ch.offset, &mut ch.subscribers),
            name,
            true,
            &refs,
            outbox,
        )?;
        Ok(SubscribeOutcome {
            epoch: ch.epoch.clone(),
            offset: ch.offset,
            recovered: true,
            replayed: 0,
            replayed_bytes: 0,
            snapshot: Some(size),
        })
    }

    /// Queues `subscribed` and `frames` (a replay or a snapshot) on the subscriber, then adds it
    /// to the live list: called under the channel's lock.
    fn join(
        (epoch, offset, subscribers): (&str, u64, &mut Subscribers),
        name: &str,
        recovered: bool,
        frames: &[&Bytes],
        outbox: &Outbox,
    ) -> Result<(), BrokerError> {
        let subscribed = frame::server(&ServerFrame::Subscribed {
            channel: name.into(),
            part: None,
            parts: None,
            epoch: epoch.into(),
            offset,
            recovered,
        });
        for item in pack(subscribed, frames) {
            outbox.push(item).map_err(|_| BrokerError::SlowConsumer)?;
        }
        subscribers.insert(outbox.clone());
        Ok(())
    }

    /// Queues the `subscribed` frame and the replay, then adds the subscriber to the live list.
    fn attach(
        &self,
        ch: &mut Channel,
        name: &str,
        since: Option<&Position>,
        outbox: &Outbox,
    ) -> Result<SubscribeOutcome, BrokerError> {
        let now = Instant::now();
        ch.trim(&self.history, now);
        ch.active = now;
        let (recovered, from) = ch.recovery(since);
        let replay: Vec<&Bytes> = match from {
            Some(from) => ch
                .history
                .iter()
                .filter(|e| e.offset >= from)
                .map(|e| &e.frame)
                .collect(),
            None => Vec::new(),
        };
        let (recovered, replay) =
            super::within_budget(recovered, replay, super::replay_budget(outbox));
        let live = (ch.epoch.as_str(), ch.offset, &mut ch.subscribers);
        Self::join(live, name, recovered, &replay, outbox)?;
        Ok(SubscribeOutcome {
            epoch: ch.epoch.clone(),
            offset: ch.offset,
            recovered,
            replayed: replay.len(),
            replayed_bytes: replay.iter().map(|f| f.len()).sum(),
            snapshot: None,
        })
    }

    /// Stops delivery to `subscriber`. A channel nobody ever published to goes with its last
    /// subscriber: subscribing to made-up names leaves nothing behind.
    fn unsubscribe(&self, name: &str, subscriber: u64) {
        if name == PRESENCE {
            lock(&self.presence).channel.subscribers.remove(subscriber);
            return;
        }
        let unused = self.with_channel(name, false, |ch| {
            ch.subscribers.remove(subscriber);
            ch.subscribers.is_empty() && ch.offset == 0
        });
        if unused != Some(true) {
            return;
        }
        let mut map = self
            .channels
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let still_unused = map.get_mut(name).is_some_and(|ch| {
            let ch = ch.get_mut().unwrap_or_else(PoisonError::into_inner);
            ch.subscribers.is_empty() && ch.offset == 0
        });
        if still_unused {
            map.remove(name);
            self.metrics.channels.set(map.len() as i64);
        }
    }

    fn sweep(&self, now: Instant) {
        let meta_ttl = self.history.meta_ttl;
        let mut map = self
            .channels
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, ch| {
            let ch = ch.get_mut().unwrap_or_else(PoisonError::into_inner);
            ch.trim(&self.history, now);
            ch.latest
                .retain(|_, l| now.saturating_duration_since(l.at) <= meta_ttl);
            !(ch.subscribers.is_empty()
                && ch.history.is_empty()
                && now.saturating_duration_since(ch.active) > meta_ttl)
        });
        self.metrics.channels.set(map.len() as i64);
        drop(map);
        lock(&self.devices).retain(|_, d| now.saturating_duration_since(d.seen) <= meta_ttl);
        // Presence's latest values do not age: see `latest_max_age`.
        lock(&self.presence).channel.trim(&self.history, now);
    }
}

/// How long a device's latest message on `channel` stays in snapshots after it was published:
/// `history.meta_ttl`, except on `presence`, whose message is the device's state until the
/// next one, however long that is (a device online for days has no newer message).
fn latest_max_age(channel: &str, history: &HistorySettings) -> Option<Duration> {
    (channel != PRESENCE).then_some(history.meta_ttl)
}

async fn sweep(inner: Weak<Inner>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.sweep(Instant::now());
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(
        &self,
        publication: &Publication<'_>,
    ) -> Result<Vec<PublishOutcome>, BrokerError> {
        self.inner.publish(publication)
    }

    async fn subscribe(
        &self,
        channel: &str,
        since: Option<&Since>,
        subscriber: &Outbox,
    ) -> Result<SubscribeOutcome, BrokerError> {
        // Every channel here is one log: a partitioned `since` cannot resume it.
        self.inner
            .subscribe(channel, since.and_then(|s| s.part(0, 1)), subscriber)
    }

    async fn subscribe_with_snapshot(
        &self,
        channel: &str,
        subscriber: &Outbox,
    ) -> Result<SubscribeOutcome, BrokerError> {
        self.inner.subscribe_with_snapshot(channel, subscriber)
    }

    fn unsubscribe(&self, channel: &str, subscriber: u64) {
        self.inner.unsubscribe(channel, subscriber);
    }

    async fn last_seq(&self, device: &str) -> Result<u64, BrokerError> {
        let devices = lock(&self.inner.devices);
        Ok(self.inner.remembered(&devices, device, Instant::now()))
    }

    fn presence(&self, device: &str, change: PresenceChange) {
        self.inner.presence(device, change);
    }

    fn is_ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Reading;
    use crate::server::metric_labels;
    use hub_protocol::ServerFrame;
    use serde_json::value::RawValue;

    fn broker(size: usize) -> MemoryBroker {
        let history = HistorySettings {
            size,
            ..HistorySettings::default()
        };
        MemoryBroker::new(
            history,
            1000,
            "hub-a".into(),
            Arc::new(Metrics::new(metric_labels())),
        )
    }

    fn publish(b: &MemoryBroker, seq: u64) -> PublishOutcome {
        let outcomes = publish_all(b, &[seq]);
        assert_eq!(outcomes.len(), 1);
        outcomes[0]
    }

    /// One publication of the readings `seqs`, in that order.
    fn publish_all(b: &MemoryBroker, seqs: &[u64]) -> Vec<PublishOutcome> {
        let data: Vec<Box<RawValue>> = seqs
            .iter()
            .map(|seq| RawValue::from_string(format!("{{\"n\":{seq}}}")).unwrap())
            .collect();
        let span = tracing::Span::none();
        let readings: Vec<Reading<'_>> = seqs
            .iter()
            .zip(&data)
            .map(|(&seq, data)| Reading {
                seq,
                data,
                span: &span,
            })
            .collect();
        let channels = vec!["devices.d1".to_string(), "fleet".to_string()];
        let p = Publication {
            device: "d1",
            channels: &channels,
            readings: &readings,
            received_at: Instant::now(),
        };
        b.inner.publish(&p).unwrap()
    }

    /// Splits queued items back into the JSON texts of their frames.
    fn frames(rx: &mut crate::outbox::Queue) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(item) = rx.try_recv() {
            let mut b = &item.frames[..];
            while !b.is_empty() {
                let (len, head) = match b[1] {
                    126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                    127 => (
                        u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    n => (n as usize, 2),
                };
                out.push(String::from_utf8(b[head..head + len].to_vec()).unwrap());
                b = &b[head + len..];
            }
        }
        out
    }

    fn offsets(texts: &[String]) -> Vec<u64> {
        texts
            .iter()
            .filter_map(|t| match ServerFrame::parse(t.as_bytes()).unwrap() {
                ServerFrame::Message { offset, .. } => Some(offset),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn duplicates_are_not_published_again() {
        let b = broker(10);
        assert_eq!(publish(&b, 1), PublishOutcome::Accepted);
        assert_eq!(publish(&b, 1), PublishOutcome::Duplicate);
        assert_eq!(
            publish(&b, 5),
            PublishOutcome::Accepted,
            "gaps in seq are allowed"
        );
        assert_eq!(publish(&b, 4), PublishOutcome::Duplicate);
        assert_eq!(b.last_seq("d1").await.unwrap(), 5);
    }

    #[tokio::test]
    async fn each_reading_of_a_batch_is_judged_against_the_device_and_the_readings_before_it() {
        use PublishOutcome::{Accepted, Duplicate};
        let b = broker(10);
        let (sub, mut rx) = Outbox::new(1, 64);
        b.subscribe("fleet", None, &sub).await.unwrap();
        assert_eq!(publish(&b, 2), Accepted);
        assert_eq!(
            publish_all(&b, &[1, 3, 3, 2, 5, 4, 6]),
            [
                Duplicate, Accepted, Duplicate, Duplicate, Accepted, Duplicate, Accepted
            ]
        );
        assert_eq!(b.last_seq("d1").await.unwrap(), 6);
        assert_eq!(offsets(&frames(&mut rx)), [1, 2, 3, 4], "2, 3, 5, 6");
        assert_eq!(publish_all(&b, &[6, 5]), [Duplicate, Duplicate]);
    }

    #[tokio::test]
    async fn subscribe_since_replays_exactly_the_missed_messages_then_goes_live() {
        let b = broker(10);
        let (first, mut first_rx) = Outbox::new(1, 64);
        let sub = b.subscribe("fleet", None, &first).await.unwrap();
        assert!(!sub.recovered);
        for seq in 1..=5 {
            publish(&b, seq);
        }
        assert_eq!(offsets(&frames(&mut first_rx)), [1, 2, 3, 4, 5]);

        let (second, mut rx) = Outbox::new(2, 64);
        let since = Position {
            epoch: sub.epoch.clone(),
            offset: 2,
        };
        let outcome = b
            .subscribe("fleet", Some(&Since::from(since.clone())), &second)
            .await
            .unwrap();
        assert!(outcome.recovered);
        assert_eq!(outcome.replayed, 3);
        publish(&b, 6);
        let texts = frames(&mut rx);
        assert!(texts[0].contains("\"type\":\"subscribed\""));
        assert_eq!(offsets(&texts), [3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn recovery_fails_on_stale_epoch_or_a_gap_older_than_history() {
        let b = broker(3);
        let (o, _rx) = Outbox::new(1, 64);
        let epoch = b.subscribe("fleet", None, &o).await.unwrap().epoch;
        for seq in 1..=10 {
            publish(&b, seq);
        }
        let (late, _late_rx) = Outbox::new(2, 64);
        let old = Position {
            epoch: epoch.clone(),
            offset: 2,
        };
        let outcome = b
            .subscribe("fleet", Some(&Since::from(old.clone())), &late)
            .await
            .unwrap();
        assert_eq!((outcome.recovered, outcome.replayed), (false, 0));

        let (other, _other_rx) = Outbox::new(3, 64);
        let stale = Position {
            epoch: "not-the-epoch".into(),
            offset: 9,
        };
        assert!(
            !b.subscribe("fleet", Some(&Since::from(stale.clone())), &other)
                .await
                .unwrap()
                .recovered
        );

        let (edge, _edge_rx) = Outbox::new(4, 64);
        let covered = Position { epoch, offset: 7 };
        let outcome = b
            .subscribe("fleet", Some(&Since::from(covered.clone())), &edge)
            .await
            .unwrap();
        assert_eq!((outcome.recovered, outcome.replayed), (true, 3));
    }

    #[tokio::test]
    async fn replay_larger_than_the_queue_fits_in_chunks() {
        let b = broker(1000);
        for seq in 1..=1000 {
            publish(&b, seq);
        }
        let (o, mut rx) = Outbox::new(1, 4);
        let epoch = b
            .subscribe("devices.d1", None, &Outbox::new(9, 1).0)
            .await
            .unwrap()
            .epoch;
        let outcome = b
            .subscribe(
                "devices.d1",
                Some(&Since::from(Position { epoch, offset: 0 })),
                &o,
            )
            .await
            .unwrap();
        assert_eq!(outcome.replayed, 1000);
        assert_eq!(offsets(&frames(&mut rx)), (1..=1000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn idle_empty_channels_are_swept() {
        let history = HistorySettings {
            size: 10,
            ttl: Duration::from_millis(1),
            meta_ttl: Duration::from_millis(1),
            ..HistorySettings::default()
        };
        let b = MemoryBroker::new(
            history,
            1000,
            "hub-a".into(),
            Arc::new(Metrics::new(metric_labels())),
        );
        publish(&b, 1);
        assert_eq!(b.channel_count(), 2);
        b.inner.sweep(Instant::now() + Duration::from_secs(1));
        assert_eq!(b.channel_count(), 0);
        assert_eq!(b.last_seq("d1").await.unwrap(), 0);
    }
}
