//! The broker: where publications get their offsets, are kept for recovery and reach subscribers.
//!
//! Connection code talks only to the [`Broker`] trait. The embedded [`MemoryBroker`] serves a
//! single hub with no other process; a Redis broker for a pool of hubs implements the same
//! contract, so connections never know which one they use.
//!
//! The contract every broker keeps:
//! - `publish` is atomic per reading: the duplicate check on (device, `seq`), then for each
//!   target channel the next offset, the history append and the fan-out. A publication may hold
//!   several readings (an agent that pipelines); they are checked in order, each against the one
//!   before it too. It returns only once the readings are stored, so an `ack` is never sent for
//!   something that could be lost.
//! - `subscribe` queues the `subscribed` frame and any replay onto the subscriber *before* it can
//!   receive a live message, so the client sees offsets with no gap and no duplicate.
//! - Offsets of a channel are gapless within an epoch; a new epoch means history was lost.
//! - Presence: a device is online on the `presence` channel from its first agent connection to
//!   any hub until its last one ends, and offline with the reason of that last close (or
//!   `hub_gone`, once the hub holding it stops renewing its lease).

pub mod memory;
pub mod presence;
pub mod redis;

use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use hub_protocol::Since;
use serde_json::value::RawValue;
use tracing::Span;

pub use self::redis::RedisBroker;
use crate::outbox::{Outbound, Outbox};
pub use memory::MemoryBroker;
pub use presence::PresenceChange;

/// Replays are queued in items of about this size, so a replay larger than the outbound queue
/// still fits in it.
const REPLAY_CHUNK: usize = 256 * 1024;

/// One or more readings of one device, in the order it sent them: a publication that the
/// broker stores with one call per channel, however many readings it holds.
#[derive(Debug)]
pub struct Publication<'a> {
    pub device: &'a str,
    /// Target channels, in append order (see `hub_protocol::channel::publication_channels`).
    pub channels: &'a [String],
    pub readings: &'a [Reading<'a>],
    /// When the first of them arrived.
    pub received_at: Instant,
}

/// One reading of a [`Publication`].
#[derive(Debug)]
pub struct Reading<'a> {
    pub seq: u64,
    pub data: &'a RawValue,
    /// The reading's own `publish` span, disabled when it is not traced. Broker spans are
    /// children of the first traced reading's, and each traced reading's trace travels on with
    /// it to the hubs that deliver it.
    pub span: &'a Span,
}
/// A fresh epoch: 64 random bits, so a channel that lost its history is never taken for the one
/// before.
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Wall-clock time, ms since the Unix epoch (0 for a clock before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    Accepted,
    /// `seq` was not above the last accepted one: acknowledged, not published again.
    Duplicate,
}

/// The snapshot frames of one channel (or partition, `part`) as of `(epoch, offset)`: `items`
/// are the latest `message` JSON of each device, oldest first. At most `max` of them and
/// `budget` bytes are sent, the newest kept; frames hold about [`REPLAY_CHUNK`] each. `cut`: the
/// items are already short of the channel's (the store stopped reading them). Returns the
/// frames and what they hold.
pub(crate) fn snapshot_frames<B: AsRef<[u8]>>(
    at: &SnapshotAt<'_>,
    items: &[B],
    cut: bool,
    max: usize,
    budget: usize,
) -> (Vec<Bytes>, SnapshotSize) {
    let mut keep = 0;
    let mut bytes = 0usize;
    for item in items.iter().rev() {
        let len = item.as_ref().len() + 1;
        if keep == max || bytes + len > budget {
            break;
        }
        bytes += len;
        keep += 1;
    }
    let kept = &items[items.len() - keep..];
    let truncated = cut || keep < items.len();
    let SnapshotAt {
        channel,
        part,
        epoch,
        offset,
    } = *at;
    let write_frame = |chunk: &[B], more: bool| {
        let size: usize = chunk.iter().map(|i| i.as_ref().len() + 1).sum();
        crate::frame::text(size + channel.len() + epoch.len() + 96, |buf| {
            buf.extend_from_slice(b"{\"type\":\"snapshot\",\"channel\":");
            // A channel name and an epoch are plain strings; they always serialise.
            let _ = serde_json::to_writer(&mut *buf, channel);
            if let Some(part) = part {
                buf.extend_from_slice(format!(",\"part\":{part}").as_bytes());
            }
            buf.extend_from_slice(b",\"epoch\":");
            let _ = serde_json::to_writer(&mut *buf, epoch);
            buf.extend_from_slice(format!(",\"offset\":{offset},\"items\":[").as_bytes());
            for (k, item) in chunk.iter().enumerate() {
                if k > 0 {
                    buf.push(b',');
                }
                buf.extend_from_slice(item.as_ref());
            }
            buf.push(b']');
            if more {
                buf.extend_from_slice(b",\"more\":true");
            }
            if truncated && !more {
                buf.extend_from_slice(b",\"truncated\":true");
            }
            buf.push(b'}');
        })
    };
    let mut frames = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (k, item) in kept.iter().enumerate() {
        let len = item.as_ref().len() + 1;
        if k > start && size + len > REPLAY_CHUNK {
            frames.push(write_frame(&kept[start..k], true));
            start = k;
            size = 0;
        }
        size += len;
    }
    frames.push(write_frame(&kept[start..], false));
    let size = SnapshotSize {
        devices: keep,
        bytes: frames.iter().map(Bytes::len).sum(),
        truncated,
    };
    (frames, size)
}

/// Which channel (or partition) a snapshot is of, and as of which position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SnapshotAt<'a> {
    pub channel: &'a str,
    pub part: Option<u32>,
    pub epoch: &'a str,
    pub offset: u64,
}

/// What a snapshot held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSize {
    pub devices: usize,
    /// Bytes of its frames, counted against the subscribe's [`replay_budget`].
    pub bytes: usize,
    /// Devices were left out, over `history.snapshot_devices` or the subscriber's queue.
    pub truncated: bool,
}

/// What a subscription started with; the `subscribed` frame with these values is already queued.
/// A channel split into partitions has one such frame per partition: `epoch` and `offset` are
/// then partition 0's, `recovered` says whether every partition recovered, and `replayed` counts
/// them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOutcome {
    pub epoch: String,
    pub offset: u64,
    /// `since` was given and every missed message was replayed.
    pub recovered: bool,
    pub replayed: usize,
    /// Bytes of the replay, counted against the subscribe's [`replay_budget`].
    pub replayed_bytes: usize,
    /// What the snapshot held, when one was asked for.
    pub snapshot: Option<SnapshotSize>,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Nothing was stored; the client may retry.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The subscriber's queue could not take the replay; it is being closed as a slow consumer.
    #[error("subscriber too slow to take the replay")]
    SlowConsumer,
    /// A new channel would pass `limits.max_channels`; nothing was stored, retry later.
    #[error("this hub holds state for {max} channels already (limits.max_channels); retry later")]
    ChannelTableFull { max: usize },
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// One outcome per reading, in order; an error means none of them may be acknowledged.
    async fn publish(
        &self,
        publication: &Publication<'_>,
    ) -> Result<Vec<PublishOutcome>, BrokerError>;

    async fn subscribe(
        &self,
        channel: &str,
        since: Option<&Since>,
        subscriber: &Outbox,
    ) -> Result<SubscribeOutcome, BrokerError>;

    /// As `subscribe` without `since`, with the snapshot frames queued after `subscribed`: the
    /// latest message of each device on the channel as of the position the live stream starts
    /// after (see `ServerFrame::Snapshot`).
    async fn subscribe_with_snapshot(
        &self,
        channel: &str,
        subscriber: &Outbox,
    ) -> Result<SubscribeOutcome, BrokerError>;

    /// Stops delivery to `subscriber`; a no-op if it is not subscribed.
    fn unsubscribe(&self, channel: &str, subscriber: u64);

    /// The highest `seq` accepted from `device`, 0 if none is remembered.
    async fn last_seq(&self, device: &str) -> Result<u64, BrokerError>;

    /// Counts an agent connection of `device` starting or ending on this hub and publishes, on
    /// `presence`, the change it makes to the device's state. Never waits: the Redis broker
    /// writes changes from a task of its own.
    fn presence(&self, device: &str, change: PresenceChange);

    /// The hub's connections are all closed (shutdown): presence changes still unwritten are
    /// written, within the broker's timeout, and the hub leaves the pool's presence.
    async fn drained(&self) {}

    /// Whether the broker can take publications now (feeds `/readyz`).
    fn is_ready(&self) -> bool;

    /// What works only in part while the broker is ready (a Redis Cluster shard that is down),
    /// for `/readyz` to say.
    fn degraded(&self) -> Option<String> {
        None
    }
}

/// The bytes one subscribe may replay: half of the subscriber's queue. The partitions of one
/// channel share it.
pub(crate) fn replay_budget(subscriber: &Outbox) -> usize {
    subscriber.replay_budget()
}

/// A replay larger than `budget` (see [`replay_budget`]) could never be queued: the resume is
/// then answered as one history cannot cover (`recovered: false`, nothing replayed), instead of
/// closing the client as a slow consumer every time it comes back.
pub(crate) fn within_budget<B: AsRef<[u8]>>(
    recovered: bool,
    replay: Vec<B>,
    budget: usize,
) -> (bool, Vec<B>) {
    let bytes: usize = replay.iter().map(|f| f.as_ref().len()).sum();
    if bytes > budget {
        (false, Vec::new())
    } else {
        (recovered, replay)
    }
}

/// Packs the `subscribed` frame and the replay into as few queue items as fit [`REPLAY_CHUNK`].
pub(crate) fn pack(subscribed: Bytes, replay: &[&Bytes]) -> Vec<Outbound> {
    if replay.is_empty() {
        return vec![Outbound::control(subscribed)];
    }
    let mut items = Vec::new();
    let mut buf = BytesMut::with_capacity(REPLAY_CHUNK);
    buf.extend_from_slice(&subscribed);
    let mut count = 1;
    for frame in replay {
        if !buf.is_empty() && buf.len() + frame.len() > REPLAY_CHUNK {
            items.push(Outbound {
                frames: buf.split().freeze(),
                count,
                published_at: None,
            });
            count = 0;
        }
        buf.extend_from_slice(frame);
        count += 1;
    }
    items.push(Outbound {
        frames: buf.freeze(),
        count,
        published_at: None,
    });
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use hub_protocol::ServerFrame;

    /// The payloads of frames made by `frame::text`.
    fn texts(frames: &[Bytes]) -> Vec<String> {
        frames
            .iter()
            .map(|f| String::from_utf8(crate::frame::payload(f).to_vec()).unwrap())
            .collect()
    }

    fn item(n: usize) -> String {
        format!(
            r#"{{"type":"message","channel":"fleet","epoch":"e","offset":{n},"from":"d{n}","data":{{"pad":"{}"}}}}"#,
            "x".repeat(200)
        )
    }

    #[test]
    fn a_large_snapshot_comes_in_frames_of_a_chunk_all_but_the_last_saying_more() {
        let items: Vec<String> = (1..=3000).map(item).collect();
        let at = SnapshotAt {
            channel: "fleet",
            part: Some(3),
            epoch: "e",
            offset: 3000,
        };
        let (frames, size) = snapshot_frames(&at, &items, false, usize::MAX, usize::MAX);
        assert!(frames.len() > 1, "{} bytes in one frame", size.bytes);
        assert_eq!((size.devices, size.truncated), (3000, false));
        let mut offsets = Vec::new();
        for (k, text) in texts(&frames).iter().enumerate() {
            assert!(text.len() <= REPLAY_CHUNK + 512);
            match ServerFrame::parse(text.as_bytes()).unwrap() {
                ServerFrame::Snapshot {
                    part,
                    offset,
                    items,
                    more,
                    truncated,
                    ..
                } => {
                    assert_eq!((part, offset, truncated), (Some(3), 3000, false));
                    assert_eq!(more, k + 1 < frames.len());
                    let items: Vec<serde_json::Value> = serde_json::from_str(items.get()).unwrap();
                    offsets.extend(items.iter().map(|i| i["offset"].as_u64().unwrap()));
                }
                other => panic!("not a snapshot: {other:?}"),
            }
        }
        assert_eq!(
            offsets,
            (1..=3000).collect::<Vec<u64>>(),
            "every item once, in order"
        );
    }

    #[test]
    fn a_snapshot_over_its_limits_keeps_the_newest_and_says_it_was_cut() {
        let items: Vec<String> = (1..=100).map(item).collect();
        let at = SnapshotAt {
            channel: "fleet",
            part: None,
            epoch: "e",
            offset: 100,
        };
        let (frames, size) = snapshot_frames(&at, &items, false, 10, usize::MAX);
        assert_eq!((size.devices, size.truncated), (10, true));
        let text = &texts(&frames)[0];
        assert!(text.contains(r#""offset":91,"#) && !text.contains(r#""offset":90,"#));
        assert!(text.ends_with(r#","truncated":true}"#), "{text}");
        let (_, size) = snapshot_frames(&at, &items, false, 100, 5 * items[0].len());
        assert_eq!(
            (size.devices, size.truncated),
            (4, true),
            "the bytes bound it too"
        );
        let (frames, size) = snapshot_frames(&at, &items[..0], true, 100, 100);
        assert_eq!((size.devices, size.truncated, frames.len()), (0, true, 1));
    }
}
