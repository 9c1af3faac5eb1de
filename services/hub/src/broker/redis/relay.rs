//! The relay: this hub's one pub/sub connection to Redis.
//!
//! It subscribes to a channel's Redis topic only while a local client is subscribed to the
//! channel (interest-based routing, reference counted through [`Local`]), hands each envelope to
//! [`Local::offer`], and repairs what pub/sub loses: a gap in offsets is filled from the stream
//! before anything after it is delivered, a periodic position check catches channels whose last
//! message was lost, and after a reconnect every channel is resynchronised. Joins and leaves are
//! commands processed in order by this one task, so SUBSCRIBE and UNSUBSCRIBE never race.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use observability::RootSampler;
use observability::propagation::{self, Remote};
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind};
use tokio::sync::{mpsc, oneshot};
use tracing::field::Empty;
use tracing::{Instrument, Span, info, info_span, warn};

use super::local::{Local, Offer};
use super::store::{Envelope, Store, channel_of, pubsub_channel};
use crate::broker::BrokerError;
use crate::broker::now_ms;
use crate::config::{BrokerSettings, Routing};
use crate::metrics::Metrics;

pub enum Command {
    /// Make the channel live here; answered once it is.
    Join {
        channel: String,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    /// The channel lost its last local subscriber.
    Leave { channel: String },
}

/// What the relay tells the broker about its link, for `/readyz`.
#[derive(Debug, Default)]
pub struct LinkHealth {
    /// The pub/sub link is up.
    pub connected: AtomicBool,
    /// Cluster: live channels waiting for their shard.
    pub pending: AtomicUsize,
}

/// How the relay reaches Redis pub/sub.
pub enum Transport {
    /// One Redis: SUBSCRIBE on one pub/sub connection.
    Single(redis::Client),
    /// A Redis Cluster: SSUBSCRIBE, each topic at the shard that owns its slot, messages as
    /// RESP3 pushes. The seed nodes, and the limit for connecting and for each command.
    Cluster {
        nodes: Vec<String>,
        timeout: Duration,
    },
}

/// One pub/sub connection and where its messages arrive.
enum Link {
    Single {
        sink: PubSubSink,
        stream: PubSubStream,
    },
    Cluster {
        connection: ClusterConnection,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
    },
}

/// What came from pub/sub.
enum Event {
    Message(redis::Msg),
    /// The pub/sub connection is gone.
    Lost(&'static str),
    /// Cluster: the connection to one shard dropped. The client reconnects it by itself; which
    /// subscriptions it held is not said.
    ShardLost,
    /// The server dropped this topic's subscription: on a cluster, its slot moved to another
    /// shard (or we left it ourselves).
    Dropped(String),
    Other,
}

impl Link {
    async fn subscribe(&mut self, topics: &[String]) -> redis::RedisResult<()> {
        match self {
            Link::Single { sink, .. } => sink.subscribe(topics).await,
            // One topic per SSUBSCRIBE: the topics of one command must share a slot.
            Link::Cluster { connection, .. } => {
                for topic in topics {
                    connection.ssubscribe(topic).await?;
                }
                Ok(())
            }
        }
    }

    /// Subscribes each topic on its own, all at once, each within `timeout`; one result per
    /// topic, in order. (One Redis: one SUBSCRIBE for all.)
    async fn subscribe_each(
        &mut self,
        topics: &[String],
        timeout: Duration,
    ) -> Vec<Result<(), BrokerError>> {
        let Link::Cluster { connection, .. } = self else {
            let one = match tokio::time::timeout(timeout, self.subscribe(topics)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timed out".to_owned()),
            };
            return topics
                .iter()
                .map(|_| one.as_ref().map_or(Ok(()), |e| Err(unavailable(e))))
                .collect();
        };
        // One multiplexed connection per node carries them all; every one waits at most
        // `timeout`, together.
        let each = topics.iter().map(|topic| {
            let (mut connection, topic) = (connection.clone(), topic.clone());
            async move {
                match tokio::time::timeout(timeout, connection.ssubscribe(topic)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(unavailable(e)),
                    Err(_) => Err(unavailable("timed out")),
                }
            }
        });
        futures_util::future::join_all(each).await
    }

    async fn unsubscribe(&mut self, topic: &str) -> redis::RedisResult<()> {
        match self {
            Link::Single { sink, .. } => sink.unsubscribe(topic).await,
            Link::Cluster { connection, .. } => connection.sunsubscribe(topic).await,
        }
    }

    async fn psubscribe(&mut self, pattern: &str) -> redis::RedisResult<()> {
        match self {
            Link::Single { sink, .. } => sink.psubscribe(pattern).await,
            // The settings refuse broadcast routing on a cluster: sharded pub/sub has no
            // patterns.
            Link::Cluster { .. } => Ok(()),
        }
    }

    async fn next(&mut self) -> Event {
        match self {
            Link::Single { stream, .. } => match stream.next().await {
                Some(message) => Event::Message(message),
                None => Event::Lost("connection closed"),
            },
            Link::Cluster { pushes, .. } => {
                let Some(push) = pushes.recv().await else {
                    return Event::Lost("cluster connection closed");
                };
                match push.kind {
                    PushKind::SMessage | PushKind::Message => {
                        redis::Msg::from_push_info(push).map_or(Event::Other, Event::Message)
                    }
                    PushKind::Disconnection => Event::ShardLost,
                    PushKind::SUnsubscribe => match push.data.first() {
                        Some(redis::Value::BulkString(topic)) => {
                            Event::Dropped(String::from_utf8_lossy(topic).into_owned())
                        }
                        _ => Event::Other,
                    },
                    _ => Event::Other,
                }
            }
        }
    }
}

pub struct Relay {
    pub transport: Transport,
    pub store: Arc<Store>,
    pub local: Arc<Local>,
    pub commands: mpsc::Receiver<Command>,
    pub health: Arc<LinkHealth>,
    pub metrics: Arc<Metrics>,
    pub position_check: Duration,
    pub timeout: Duration,
    pub routing: Routing,
    /// Continues the traces that arrive in envelopes when spans are exported.
    pub roots: RootSampler,
    /// Redis topics this connection is subscribed to.
    subscribed: HashSet<String>,
    /// Cluster: live channels whose shard did not take the subscription after a reconnect
    /// (it is down); tried again at every position check. Their subscribers wait; every other
    /// channel is served meanwhile.
    pending: HashSet<String>,
    /// Cluster: a shard's connection dropped since the last check; every subscription is
    /// renewed then (one SSUBSCRIBE each), since which ones that shard held is unknown.
    resync: bool,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Every hub channel's topic, for `broker.routing = "broadcast"`.
const BROADCAST_PATTERN: &str = "tl:{*}:pub";

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("redis pub/sub: {e}"))
}

impl Relay {
    pub fn new(
        transport: Transport,
        store: Arc<Store>,
        local: Arc<Local>,
        commands: mpsc::Receiver<Command>,
        health: Arc<LinkHealth>,
        metrics: Arc<Metrics>,
        settings: &BrokerSettings,
    ) -> Self {
        Relay {
            transport,
            store,
            local,
            commands,
            health,
            metrics,
            position_check: settings.position_check,
            timeout: settings.timeout,
            routing: settings.routing,
            roots: RootSampler::off(),
            subscribed: HashSet::new(),
            pending: HashSet::new(),
            resync: false,
        }
    }

    /// Continues the traces that envelopes carry when `roots` exports spans.
    pub fn tracing(mut self, roots: RootSampler) -> Self {
        self.roots = roots;
        self
    }

    /// Runs until the broker is dropped (its command sender closes).
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            match self.run_connection(&mut first).await {
                Ok(()) => return,
                Err(e) => {
                    if self.health.connected.swap(false, Ordering::AcqRel) {
                        warn!(error = %e, "redis pub/sub lost; reconnecting");
                    }
                }
            }
            // Joins that arrive while Redis is away fail fast instead of waiting for it.
            let deadline = tokio::time::sleep(jitter(backoff));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    command = self.commands.recv() => match command {
                        None => return,
                        Some(Command::Join { reply, .. }) => {
                            let _ = reply.send(Err(unavailable("not connected")));
                        }
                        Some(Command::Leave { .. }) => {}
                    }
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn open(&self) -> Result<Link, BrokerError> {
        match &self.transport {
            Transport::Single(client) => {
                let pubsub = self.timed(client.get_async_pubsub()).await?;
                let (sink, stream) = pubsub.split();
                Ok(Link::Single { sink, stream })
            }
            Transport::Cluster { nodes, timeout } => {
                let (tx, pushes) = mpsc::unbounded_channel();
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(*timeout)
                    .response_timeout(*timeout)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(tx)
                    .build()
                    .map_err(unavailable)?;
                let connection = self.timed(client.get_async_connection()).await?;
                Ok(Link::Cluster { connection, pushes })
            }
        }
    }

    /// One connection's lifetime. `Ok` only when the broker is gone.
    async fn run_connection(&mut self, first: &mut bool) -> Result<(), BrokerError> {
        let mut link = self.open().await?;
        self.subscribed.clear();
        self.pending.clear();
        self.resync = false;
        self.health.pending.store(0, Ordering::Release);
        let names = self.local.names();
        match (&link, self.routing) {
            (_, Routing::Broadcast) => self.timed(link.psubscribe(BROADCAST_PATTERN)).await?,
            (Link::Single { .. }, Routing::Interest) => {
                for chunk in names.chunks(256) {
                    let topics: Vec<String> = chunk.iter().map(|c| pubsub_channel(c)).collect();
                    self.timed(link.subscribe(&topics)).await?;
                    self.subscribed.extend(chunk.iter().cloned());
                }
            }
            // Shard by shard: one that is down holds back only its own channels.
            (Link::Cluster { .. }, Routing::Interest) => {
                self.pending.extend(names.iter().cloned());
                self.retry_pending(&mut link).await;
            }
        }
        if !*first {
            self.metrics.broker_reconnects.inc();
        }
        *first = false;
        // Whatever was published while we were away is in the streams.
        self.check_positions(&self.served_positions()).await?;
        self.health.connected.store(true, Ordering::Release);
        info!(channels = names.len(), "redis pub/sub connected");

        let mut check = tokio::time::interval(self.position_check);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            tokio::select! {
                event = link.next() => match event {
                    Event::Message(message) => self.dispatch(&message).await,
                    Event::Lost(why) => return Err(unavailable(why)),
                    // Handled at the next check, once however many arrive meanwhile.
                    Event::ShardLost => self.resync = true,
                    Event::Dropped(topic) => self.moved(&mut link, &topic).await,
                    Event::Other => {}

                },
                command = self.commands.recv() => match command {
                    None => return Ok(()),
                    Some(Command::Join { channel, reply }) => {
                        // A failed join fails that subscribe only; a broken connection shows
                        // itself as the end of the stream.
                        let _ = reply.send(self.join(&mut link, &channel).await);
                    }
                    Some(Command::Leave { channel }) => self.leave(&mut link, &channel).await?,
                },
                _ = check.tick() => {
                    if std::mem::take(&mut self.resync) {
                        warn!("a redis shard's connection dropped; renewing every subscription");
                        let all: Vec<String> = self.subscribed.drain().collect();
                        self.pending.extend(all);
                    }
                    self.retry_pending(&mut link).await;
                    if let Err(e) = self.check_positions(&self.served_positions()).await {
                        warn!(error = %e, "position check failed; retrying next tick");
                    }
                    self.release_unwanted(&mut link).await?;
                }
            }
        }
    }

    /// Subscribes the pending channels that are still wanted, each on its own; those whose
    /// shard answers are repaired from history and served from now on.
    async fn retry_pending(&mut self, link: &mut Link) {
        if self.pending.is_empty() {
            return;
        }
        let (wanted, unwanted): (Vec<String>, Vec<String>) = self
            .pending
            .drain()
            .partition(|channel| self.local.contains(channel));
        // They may still be subscribed at their shard (a resync marks every channel): the next
        // release of unwanted topics unsubscribes them.
        self.subscribed.extend(unwanted);
        let topics: Vec<String> = wanted.iter().map(|c| pubsub_channel(c)).collect();
        let mut taken = Vec::new();
        let mut failed = None;
        // All at once, each within the timeout: a shard that hangs costs one round one timeout,
        // however many channels wait for it.
        for (channel, result) in wanted
            .into_iter()
            .zip(link.subscribe_each(&topics, self.timeout).await)
        {
            match result {
                Ok(()) => taken.push(channel),
                Err(e) => {
                    failed = Some(e);
                    self.pending.insert(channel);
                }
            }
        }
        self.metrics
            .broker_pending_channels
            .set(self.pending.len() as i64);
        self.health
            .pending
            .store(self.pending.len(), Ordering::Release);
        if let Some(e) = failed {
            warn!(channels = self.pending.len(), error = %e,
                "channels wait for their redis shard; retrying");
        }
        if taken.is_empty() {
            return;
        }
        self.subscribed.extend(taken.iter().cloned());
        let positions: Vec<_> = self
            .local
            .positions()
            .into_iter()
            .filter(|(name, _, _)| taken.contains(name))
            .collect();
        if let Err(e) = self.check_positions(&positions).await {
            warn!(error = %e, "position check failed; retrying next tick");
        }
    }

    /// The live channels' positions, less those waiting for their shard (checked once taken):
    /// a dead shard must not cost every check a timeout.
    fn served_positions(&self) -> Vec<(String, String, u64)> {
        let mut positions = self.local.positions();
        positions.retain(|(name, _, _)| !self.pending.contains(name));
        positions
    }

    /// The server dropped a topic's subscription (its slot moved to another shard): subscribes
    /// again, at the new owner, and fills from history what was published there meanwhile.
    async fn moved(&mut self, link: &mut Link, topic: &str) {
        let Some(channel) = channel_of(topic).map(str::to_owned) else {
            return;
        };
        if !self.subscribed.remove(&channel) || !self.local.contains(&channel) {
            return;
        }
        info!(
            channel,
            "subscription moved with its slot; subscribing at the new owner"
        );
        // As any channel waiting for its shard: subscribed and repaired now if it answers, else
        // at the next check.
        self.pending.insert(channel);
        self.retry_pending(link).await;
    }
    async fn timed<T>(
        &self,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BrokerError> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| unavailable("timed out"))?
            .map_err(unavailable)
    }

    async fn join(&mut self, link: &mut Link, channel: &str) -> Result<(), BrokerError> {
        if self.local.is_live(channel) {
            return Ok(());
        }
        if !self.local.contains(channel) {
            // The subscriber gave up while the join was queued.
            return Err(unavailable("subscribe abandoned"));
        }
        if self.routing == Routing::Interest && !self.subscribed.contains(channel) {
            self.timed(link.subscribe(&[pubsub_channel(channel)]))
                .await?;
            self.subscribed.insert(channel.to_owned());
        }
        // Read after SUBSCRIBE took effect: everything above this offset arrives by pub/sub,
        // and everything this task dispatched before is at or below it.
        let (epoch, offset) = self.store.position(channel).await?;
        self.local.set_live(channel, &epoch, offset);
        Ok(())
    }

    async fn leave(&mut self, link: &mut Link, channel: &str) -> Result<(), BrokerError> {
        if !self.local.contains(channel) && self.subscribed.remove(channel) {
            let left = self.timed(link.unsubscribe(&pubsub_channel(channel))).await;
            match (left, &link) {
                (Ok(()), _) => {}
                // One Redis: the link itself is in doubt.
                (Err(e), Link::Single { .. }) => return Err(e),
                // A cluster: only that shard is; its unwanted messages are dropped on arrival
                // until the next reconnect.
                (Err(e), Link::Cluster { .. }) => {
                    warn!(channel, error = %e, "could not unsubscribe at its redis shard");
                }
            }
        }
        Ok(())
    }

    /// Unsubscribes topics no local client wants any more (a `Leave` dropped by a full command
    /// queue ends up here).
    async fn release_unwanted(&mut self, link: &mut Link) -> Result<(), BrokerError> {
        let unwanted: Vec<String> = self
            .subscribed
            .iter()
            .filter(|c| !self.local.contains(c))
            .cloned()
            .collect();
        for channel in unwanted {
            self.leave(link, &channel).await?;
        }
        Ok(())
    }

    async fn dispatch(&self, message: &redis::Msg) {
        let Some(channel) = channel_of(message.get_channel_name()) else {
            return;
        };
        self.metrics.broker_messages.inc();
        if !self.local.contains(channel) {
            self.metrics.broker_unwanted.inc();
            return;
        }
        let Some(envelopes) = Envelope::parse_all(message.get_payload_bytes()) else {
            warn!(channel, "unreadable envelope on redis pub/sub");
            return;
        };
        for envelope in &envelopes {
            let age = Duration::from_millis(now_ms().saturating_sub(envelope.published_ms));
            let published_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            // One span per traced publication, never per delivery.
            let span = match envelope.traceparent.map(propagation::remote_parent) {
                Some(Remote::Recorded(parent)) => {
                    let span = self.roots.remote_child_span(|| {
                        info_span!(
                            parent: None,
                            "relay.deliver",
                            channel,
                            offset = envelope.offset,
                            age_ms = age.as_millis() as u64,
                        )
                    });
                    propagation::adopt(&span, parent);
                    span
                }
                _ => Span::none(),
            };
            deliver(
                &self.store,
                &self.local,
                channel,
                envelope,
                published_at,
                &self.metrics,
            )
            .instrument(span)
            .await;
        }
    }

    /// Compares live channels (name, epoch, delivered offset) with Redis and repairs what
    /// differs.
    async fn check_positions(
        &self,
        positions: &[(String, String, u64)],
    ) -> Result<(), BrokerError> {
        for chunk in positions.chunks(256) {
            let names: Vec<String> = chunk.iter().map(|(n, _, _)| n.clone()).collect();
            let remote = self.store.positions(&names).await?;
            let idle: Vec<&str> = chunk
                .iter()
                .zip(&remote)
                .filter(|(_, r)| r.as_ref().is_some_and(|(_, offset)| *offset == 0))
                .map(|((name, _, _), _)| name.as_str())
                .collect();
            self.store.keep_idle(&idle).await?;
            for ((channel, epoch, offset), remote) in chunk.iter().zip(remote) {
                let Some((remote_epoch, remote_offset)) = remote else {
                    continue;
                };
                if remote_epoch == *epoch && remote_offset < *offset {
                    // The history up to here belongs to the lost timeline: restart after it.
                    warn!(
                        channel,
                        delivered = offset,
                        remote_offset,
                        "redis lost delivered writes; new epoch"
                    );
                    let renewed = self
                        .store
                        .renew_rewound_epoch(channel, epoch, *offset)
                        .await?;
                    // None: the channel vanished meanwhile; the next check sees what came instead.
                    if !renewed.is_empty() {
                        self.local.change_epoch(channel, &renewed, remote_offset);
                    }
                } else if remote_epoch != *epoch {
                    self.local.change_epoch(channel, &remote_epoch, 0);
                    catch_up(
                        &self.store,
                        &self.local,
                        channel,
                        &remote_epoch,
                        remote_offset,
                        &self.metrics,
                    )
                    .await?;
                } else if remote_offset > *offset {
                    catch_up(
                        &self.store,
                        &self.local,
                        channel,
                        epoch,
                        remote_offset,
                        &self.metrics,
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }
}

/// Delivers one envelope, first filling any gap before it from the stream.
pub async fn deliver(
    store: &Store,
    local: &Local,
    channel: &str,
    envelope: &Envelope<'_>,
    published_at: Instant,
    metrics: &Metrics,
) {
    for _ in 0..3 {
        match local.offer(
            channel,
            envelope.epoch,
            envelope.offset,
            envelope.message,
            published_at,
        ) {
            Offer::EpochChanged => {
                // Only switch to an epoch Redis still has: envelopes of a timeline that was
                // just renewed away may still be queued.
                match store.positions(&[channel.to_owned()]).await {
                    Ok(current)
                        if current
                            .first()
                            .and_then(|p| p.as_ref())
                            .is_some_and(|(e, _)| e == envelope.epoch) =>
                    {
                        local.change_epoch(channel, envelope.epoch, 0)
                    }
                    _ => return,
                }
            }
            Offer::Gap { .. } => {
                if catch_up(
                    store,
                    local,
                    channel,
                    envelope.epoch,
                    envelope.offset - 1,
                    metrics,
                )
                .await
                .is_err()
                {
                    // Redis is unreachable: the position check repairs this once it is back.
                    return;
                }
            }
            Offer::Delivered | Offer::Stale | Offer::Unknown => return,
        }
    }
}

/// Brings the channel's delivered position up to `upto` from history; where history no longer
/// has the messages, subscribers are told (`recovered: false`) and delivery skips ahead.
pub async fn catch_up(
    store: &Store,
    local: &Local,
    channel: &str,
    epoch: &str,
    upto: u64,
    metrics: &Metrics,
) -> Result<(), BrokerError> {
    // A child of a traced delivery or resume; untraced callers (the position check) make none.
    let span = if Span::current().is_disabled() {
        Span::none()
    } else {
        info_span!("gap_fill", channel, upto, filled = Empty)
    };
    async move {
        let Some((current_epoch, after)) = local.position(channel) else {
            return Ok(());
        };
        if current_epoch != epoch || after >= upto {
            return Ok(());
        }
        let entries: Vec<_> = store
            .range(channel, after, Some(upto))
            .await?
            .into_iter()
            .filter(|e| carries_epoch(&e.message, epoch))
            .collect();
        // History may have lost the oldest of the missing messages (trimmed, expired, or a new
        // epoch that does not start at 1): announce that hole, then deliver what is still there.
        if let Some(first) = entries.first()
            && first.offset > after + 1
        {
            local.skip_to(channel, epoch, first.offset - 1);
        }
        let now = Instant::now();
        for entry in &entries {
            local.offer(channel, epoch, entry.offset, &entry.message, now);
        }
        metrics.gap_fills.inc();
        Span::current().record("filled", entries.len());
        if local
            .position(channel)
            .is_some_and(|(e, o)| e == epoch && o < upto)
        {
            local.skip_to(channel, epoch, upto);
        }
        Ok(())
    }
    .instrument(span)
    .await
}

/// Whether a stored `message` JSON belongs to `epoch` (history read across a Redis reset).
fn carries_epoch(message: &[u8], epoch: &str) -> bool {
    let needle = format!("\"epoch\":\"{epoch}\"");
    message
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}
