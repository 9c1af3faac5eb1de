//! The Redis broker: hubs share offsets, history and deduplication through Redis and relay every
//! publication to each other with pub/sub, so any hub can serve any client.
//!
//! - [`store`]: keys, the publish script and the reads (history, positions).
//! - [`relay`]: the pub/sub connection, interest-based subscriptions and gap repair.
//! - [`local`]: this hub's channels and subscribers.
//! - [`partition`]: `fleet` and `groups.<g>` split into partitions, each its own log in its own
//!   slot; everything below this module works on internal names and never knows.
//! - [`presence`]: this hub's presence lease and changes, written by a task of its own.
//!
//! A publish is acknowledged once the script has appended it in Redis. It then reaches every
//! hub, this one included, through pub/sub; no hub delivers its own publications directly, so
//! all hubs deliver the same offsets in the same order.

pub mod local;
pub mod partition;
pub mod presence;
pub mod relay;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hub_protocol::{Position, Since};
use observability::RootSampler;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, Span, info_span};

use self::local::{Attach, Local};
use self::partition::Partitions;
use self::presence::Presence;
use self::relay::{Command, LinkHealth, Relay, Transport, catch_up};
use self::store::{Commands, Store};
use super::{Broker, BrokerError, PresenceChange, Publication, PublishOutcome, SubscribeOutcome};
use crate::config::{BrokerSettings, ConfigError, Settings};
use crate::metrics::Metrics;

/// See `RedisBroker::snapshots`.
const SNAPSHOTS_AT_ONCE: usize = 2;

/// How long Redis keeps the epoch of a channel nobody has published to once no hub watches it.
const IDLE_CHANNEL_TTL: Duration = Duration::from_secs(60);

pub struct RedisBroker {
    store: Arc<Store>,
    local: Arc<Local>,
    commands: mpsc::Sender<Command>,
    health: Arc<LinkHealth>,
    metrics: Arc<Metrics>,
    timeout: Duration,
    /// Spans are exported: traced publications carry their trace context through Redis.
    roots: RootSampler,
    max_channels: usize,
    snapshot_devices: usize,
    /// Snapshot scripts this hub runs at once: each reads a whole channel's latest values and
    /// holds Redis meanwhile (about 8 ms per 1,000 devices measured), so viewers subscribing
    /// together take turns instead of stacking them.
    snapshots: tokio::sync::Semaphore,
    partitions: Partitions,
    presence: Presence,
}

impl RedisBroker {
    /// Sets up the connections and starts the relay, on one Redis (`broker.url`) or a Redis
    /// Cluster (`broker.cluster_nodes`); Redis need not be reachable yet. When `roots` exports
    /// spans, traced publications carry their trace context through Redis to every hub.
    pub fn new(
        settings: &Settings,
        node_id: &str,
        metrics: Arc<Metrics>,
        roots: RootSampler,
    ) -> Result<Self, ConfigError> {
        let broker = &settings.broker;
        let (commands, transport) = match &broker.url {
            Some(url) => single(url, broker)?,
            None => cluster(&broker.cluster_nodes, broker)?,
        };
        let store = Arc::new(Store::new(
            commands,
            settings.history.clone(),
            IDLE_CHANNEL_TTL.max(10 * broker.position_check),
            broker.timeout,
            metrics.clone(),
        ));
        let local = Arc::new(Local::new(metrics.clone()));
        let (commands, receiver) = mpsc::channel(4096);
        let health = Arc::new(LinkHealth::default());
        let relay = Relay::new(
            transport,
            store.clone(),
            local.clone(),
            receiver,
            health.clone(),
            metrics.clone(),
            broker,
        )
        .tracing(roots);
        tokio::spawn(relay.run());
        let presence = Presence::start(store.clone(), node_id, &settings.presence, metrics.clone());
        Ok(RedisBroker {
            store,
            local,
            commands,
            health,
            metrics,
            timeout: broker.timeout,
            roots,
            max_channels: settings.limits.max_channels,
            snapshot_devices: settings.history.snapshot_devices,
            snapshots: tokio::sync::Semaphore::new(SNAPSHOTS_AT_ONCE),
            partitions: Partitions::new(broker.partitions()),
            presence,
        })
    }

    async fn join(&self, channel: &str) -> Result<(), BrokerError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Join {
            channel: channel.to_owned(),
            reply,
        };
        let wait = async {
            self.commands
                .send(command)
                .await
                .map_err(|_| BrokerError::Unavailable("broker stopped".into()))?;
            answer
                .await
                .map_err(|_| BrokerError::Unavailable("broker stopped".into()))?
        };
        tokio::time::timeout(2 * self.timeout, wait)
            .await
            .unwrap_or_else(|_| Err(BrokerError::Unavailable("redis: join timed out".into())))
    }

    fn leave(&self, channel: &str) {
        // A full command queue only delays the UNSUBSCRIBE: the relay ignores topics nobody wants.
        let _ = self.commands.try_send(Command::Leave {
            channel: channel.to_owned(),
        });
    }

    async fn attach(
        &self,
        channel: &str,
        since: Option<&Position>,
        outbox: &crate::outbox::Outbox,
        budget: usize,
        lead: &[Bytes],
    ) -> Result<SubscribeOutcome, BrokerError> {
        // On a busy channel delivery moves on while history is read: keep what was read and
        // fetch only the tail, for a bounded time, then attach without recovery.
        let mut history: Option<Vec<store::Entry>> = None;
        let deadline = tokio::time::Instant::now() + 2 * self.timeout;
        let mut beyond_redis = false;
        let mut beyond_budget = false;
        loop {
            let give_up = beyond_redis || beyond_budget || tokio::time::Instant::now() >= deadline;
            match self.local.attach(
                channel,
                since,
                outbox,
                history.as_deref(),
                give_up,
                budget,
                lead,
            )? {
                Attach::Done(outcome) => return Ok(outcome),
                Attach::NeedHistory { after, upto } => {
                    let read = history.get_or_insert_with(Vec::new);
                    let from = read.last().map_or(after, |e| e.offset).max(after);
                    let held: usize = read.iter().map(|e| e.message.len()).sum();
                    let budget = budget.saturating_sub(held);
                    let (more, too_big) = self
                        .store
                        .range_within(channel, from, Some(upto), budget)
                        .await?;
                    read.extend(more);
                    // A replay the subscriber's queue could never take: attach without it.
                    beyond_budget |= too_big;
                }
                Attach::Behind { upto } => {
                    if let Some((epoch, _)) = self.local.position(channel) {
                        let (_, remote) = self.store.position(channel).await?;
                        // A `since` past what Redis holds cannot be recovered.
                        beyond_redis = remote < upto;
                        let upto = upto.min(remote);
                        catch_up(
                            &self.store,
                            &self.local,
                            channel,
                            &epoch,
                            upto,
                            &self.metrics,
                        )
                        .await?;
                    }
                }
            }
        }
    }
}

impl RedisBroker {
    /// Every internal channel behind one subscription (one, or each partition), or none: all are
    /// registered and their joins queued at once (the relay runs them in turn), then attached
    /// in order, each with its own `subscribed` frame and replay, all replays within one
    /// budget. A failure undoes the ones already done; the client, which may have seen some of
    /// their `subscribed` frames, gets the error and holds no subscription.
    ///
    /// With `snapshot`, each one's snapshot is read (its position and latest messages in one
    /// script) once it is joined, and it is attached as a resume from that position: the
    /// snapshot goes after `subscribed`, then whatever was published since it, then live.
    async fn subscribe_names(
        &self,
        names: &[String],
        since: Option<&Since>,
        subscriber: &crate::outbox::Outbox,
        snapshot: bool,
    ) -> Result<SubscribeOutcome, BrokerError> {
        let undo = |attached: &[String], joining: &[String]| {
            for name in attached {
                if self.local.remove_subscriber(name, subscriber.id()) {
                    self.leave(name);
                }
            }
            for name in joining {
                if self.local.abandon(name) {
                    self.leave(name);
                }
            }
        };
        for (k, name) in names.iter().enumerate() {
            if let Err(e) = self.local.register(name, self.max_channels) {
                undo(&[], &names[..k]);
                return Err(e);
            }
        }
        let joined = futures_util::future::join_all(names.iter().map(|n| self.join(n))).await;
        if let Some(e) = joined.into_iter().find_map(Result::err) {
            undo(&[], names);
            return Err(e);
        }
        let parts = names.len() as u32;
        // One budget for all the partitions' replays: each might fit alone while all of them do
        // not, and the client would be closed as a slow consumer on every resume.
        let mut budget = crate::broker::replay_budget(subscriber);
        let mut total: Option<SubscribeOutcome> = None;
        for (k, name) in names.iter().enumerate() {
            let attached = if snapshot {
                self.attach_snapshot(name, subscriber, budget).await
            } else {
                let position = since.and_then(|s| s.part(k as u32, parts));
                self.attach(name, position, subscriber, budget, &[]).await
            };
            match attached {
                Ok(outcome) => {
                    let snapshot_bytes = outcome.snapshot.map_or(0, |s| s.bytes);
                    budget = budget.saturating_sub(outcome.replayed_bytes + snapshot_bytes);
                    match &mut total {
                        None => total = Some(outcome),
                        Some(total) => {
                            total.recovered &= outcome.recovered;
                            total.replayed += outcome.replayed;
                            total.replayed_bytes += outcome.replayed_bytes;
                            if let (Some(all), Some(one)) = (&mut total.snapshot, outcome.snapshot)
                            {
                                all.devices += one.devices;
                                all.bytes += one.bytes;
                                all.truncated |= one.truncated;
                            }
                        }
                    }
                }
                Err(e) => {
                    undo(&names[..k], &names[k..]);
                    return Err(e);
                }
            }
        }
        total.ok_or_else(|| BrokerError::Unavailable("a channel with no partitions".into()))
    }

    /// Reads `name`'s snapshot within `budget` and attaches the subscriber as of it.
    ///
    /// An eighth of the budget is kept for what was published between the snapshot's offset
    /// and the live stream's: a busy channel's relay is that far ahead while the snapshot's
    /// reply is read, and a snapshot that took it all would leave the seam unrecoverable.
    async fn attach_snapshot(
        &self,
        name: &str,
        subscriber: &crate::outbox::Outbox,
        budget: usize,
    ) -> Result<SubscribeOutcome, BrokerError> {
        let for_snapshot = budget - budget / 8;
        let (epoch, offset, items, cut) = {
            // Bounded: a subscribe waiting here keeps its connection's frames unread.
            let turn = tokio::time::timeout(2 * self.timeout, self.snapshots.acquire())
                .await
                .map_err(|_| BrokerError::Unavailable("too many snapshots at once".into()))?;
            let _turn = turn.map_err(|_| BrokerError::Unavailable("broker stopped".into()))?;
            self.store.snapshot(name, for_snapshot).await?
        };
        let (channel, partition) = partition::parse(name);
        let part = partition.map(|(part, _)| part);
        let at = crate::broker::SnapshotAt {
            channel,
            part,
            epoch: &epoch,
            offset,
        };
        let (frames, size) =
            crate::broker::snapshot_frames(&at, &items, cut, self.snapshot_devices, for_snapshot);
        let position = Position { epoch, offset };
        let budget = budget.saturating_sub(size.bytes);
        let mut outcome = self
            .attach(name, Some(&position), subscriber, budget, &frames)
            .await?;
        outcome.snapshot = Some(size);
        Ok(outcome)
    }
}

/// One Redis: a connection pool for commands and a client for the pub/sub connection.
fn single(url: &str, broker: &BrokerSettings) -> Result<(Commands, Transport), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        key: "broker.url",
        message,
    };
    let client = redis::Client::open(url).map_err(|e| invalid(format!("`{url}`: {e}")))?;
    // redis-rs answers a command slower than its own default (500 ms) with a timeout: the
    // settings' timeout is the one that applies (a large snapshot takes longer).
    let connections = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(broker.timeout))
        .set_connection_timeout(Some(broker.timeout));
    let manager = deadpool_redis::Manager::new_with_config(url, connections)
        .map_err(|e| invalid(format!("`{url}`: {e}")))?;
    let pool = deadpool_redis::Pool::builder(manager)
        .max_size(broker.pool_size)
        .wait_timeout(Some(broker.timeout))
        .create_timeout(Some(broker.timeout))
        .recycle_timeout(Some(broker.timeout))
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    Ok((Commands::Single(pool), Transport::Single(client)))
}

/// A Redis Cluster: one client for commands, another (RESP3, for sharded pub/sub pushes) for
/// the relay.
fn cluster(
    nodes: &[String],
    broker: &BrokerSettings,
) -> Result<(Commands, Transport), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        key: "broker.cluster_nodes",
        message,
    };
    let commands = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
        .connection_timeout(broker.timeout)
        .response_timeout(broker.timeout)
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    let transport = Transport::Cluster {
        nodes: nodes.to_vec(),
        timeout: broker.timeout,
    };
    let commands = Commands::Cluster(Box::new(store::Cluster {
        client: commands,
        connection: std::sync::Mutex::new(None),
    }));
    Ok((commands, transport))
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, p: &Publication<'_>) -> Result<Vec<PublishOutcome>, BrokerError> {
        // A `redis.publish` span under each traced reading's publish span, all open for the one
        // store call: every traced reading's trace shows the Redis work that stored it, and its
        // context rides in its envelope to every hub.
        let spans: Vec<Span> = p
            .readings
            .iter()
            .map(|r| {
                if r.span.is_disabled() {
                    return Span::none();
                }
                r.span.in_scope(|| {
                    self.roots.child_span(|| {
                        info_span!(
                            "redis.publish",
                            channels = p.channels.len(),
                            readings = p.readings.len()
                        )
                    })
                })
            })
            .collect();
        let contexts: Vec<Option<String>> = spans
            .iter()
            .map(observability::propagation::traceparent)
            .collect();
        let current = spans
            .iter()
            .find(|s| !s.is_disabled())
            .cloned()
            .unwrap_or_else(Span::none);
        let appends: Vec<store::Append<'_>> = p
            .readings
            .iter()
            .zip(&contexts)
            .map(|(r, traceparent)| store::Append {
                seq: r.seq,
                data: r.data,
                traceparent: traceparent.as_deref(),
            })
            .collect();
        let targets: Vec<String>;
        let channels = if self.partitions.parts() == 1 {
            p.channels
        } else {
            targets = p
                .channels
                .iter()
                .map(|c| self.partitions.target(c, p.device))
                .collect();
            &targets
        };
        let appended = self
            .store
            .publish(p.device, channels, &appends)
            .instrument(current)
            .await?;
        drop(spans);
        Ok(appended
            .into_iter()
            .map(|appended| {
                if appended {
                    PublishOutcome::Accepted
                } else {
                    PublishOutcome::Duplicate
                }
            })
            .collect())
    }

    async fn subscribe(
        &self,
        channel: &str,
        since: Option<&Since>,
        subscriber: &crate::outbox::Outbox,
    ) -> Result<SubscribeOutcome, BrokerError> {
        let names = self.partitions.names(channel);
        self.subscribe_names(&names, since, subscriber, false).await
    }

    async fn subscribe_with_snapshot(
        &self,
        channel: &str,
        subscriber: &crate::outbox::Outbox,
    ) -> Result<SubscribeOutcome, BrokerError> {
        let names = self.partitions.names(channel);
        self.subscribe_names(&names, None, subscriber, true).await
    }

    fn unsubscribe(&self, channel: &str, subscriber: u64) {
        for name in self.partitions.names(channel).iter() {
            if self.local.remove_subscriber(name, subscriber) {
                self.leave(name);
            }
        }
    }

    async fn last_seq(&self, device: &str) -> Result<u64, BrokerError> {
        self.store.last_seq(device).await
    }

    fn presence(&self, device: &str, change: PresenceChange) {
        self.presence.change(device, change);
    }

    async fn drained(&self) {
        self.presence.leave(2 * self.timeout).await;
    }

    fn is_ready(&self) -> bool {
        self.health.connected.load(Ordering::Acquire)
    }

    fn degraded(&self) -> Option<String> {
        let pending = self.health.pending.load(Ordering::Acquire);
        (pending > 0).then(|| format!("{pending} channels wait for their redis shard"))
    }
}
