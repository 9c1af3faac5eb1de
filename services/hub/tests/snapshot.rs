//! Snapshots: `subscribe` with `"snapshot": true` starts with the latest message of every device
//! on the channel, and the live stream goes on from exactly there.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::redis_cluster::RedisCluster;
use common::{Client, Event, RedisServer, TestHub, WAIT};
use serde_json::{Value, json};

const DEVICES: usize = 500;
/// Devices that keep publishing while the late viewer subscribes.
const BUSY: usize = 20;
/// Each device's readings are `{"n": 1..}`; the busy ones go on to `LAST`.
const LAST: u64 = 15;

/// What a snapshot subscriber saw: per partition (0 for a one-log channel) the snapshot's
/// position, the snapshot's items, then the live messages.
#[derive(Debug, Default)]
struct Seen {
    positions: BTreeMap<u64, u64>,
    items: Vec<Value>,
    live: Vec<Value>,
    truncated: bool,
    /// `recovered` of each `subscribed`: true when the snapshot joins the stream.
    recovered: Vec<bool>,
}

fn part_of(frame: &Value) -> u64 {
    frame["part"].as_u64().unwrap_or(0)
}

/// Subscribes with a snapshot and reads the `subscribed` and `snapshot` frames of every
/// partition, with any live messages that came between them.
async fn subscribe_with_snapshot(viewer: &mut Client, channel: &str) -> Seen {
    viewer
        .send(json!({"type": "subscribe", "channel": channel, "snapshot": true}))
        .await;
    let mut seen = Seen::default();
    let mut parts = None;
    let mut complete = 0;
    while parts != Some(complete) {
        match viewer.next().await {
            Event::Frame(f) if f["type"] == "subscribed" => {
                seen.recovered.push(f["recovered"] == true);
                parts = Some(f["parts"].as_u64().unwrap_or(1));
            }
            Event::Frame(f) if f["type"] == "snapshot" => {
                assert_eq!(f["channel"], channel);
                let offset = f["offset"].as_u64().unwrap();
                let part = part_of(&f);
                if let Some(before) = seen.positions.insert(part, offset) {
                    assert_eq!(before, offset, "one position per partition's snapshot");
                }
                for item in f["items"].as_array().unwrap() {
                    assert_eq!(item["type"], "message");
                    assert_eq!(part_of(item), part);
                    assert!(
                        item["offset"].as_u64().unwrap() <= offset,
                        "{item} after {offset}"
                    );
                    seen.items.push(item.clone());
                }
                seen.truncated |= f["truncated"] == true;
                if f["more"] != true {
                    complete += 1;
                }
            }
            Event::Frame(f) if f["type"] == "message" => seen.live.push(f),
            other => panic!("expected the snapshot, got {other:?}"),
        }
    }
    seen
}

/// Reads live messages until `done` says every device got what it should.
async fn read_live(viewer: &mut Client, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    let deadline = tokio::time::Instant::now() + 3 * WAIT;
    while !done(seen) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match viewer.next_within(left).await {
            Event::Frame(f) if f["type"] == "message" => seen.live.push(f),
            Event::Frame(_) => {}
            other => panic!("the live stream stopped: {other:?}"),
        }
    }
}

fn n(message: &Value) -> u64 {
    message["data"]["n"].as_u64().unwrap()
}

/// 500 devices publish; a viewer subscribing with a snapshot while 20 of them keep publishing
/// gets every device's latest value in the snapshot, then each later reading exactly once: per
/// partition the live offsets go on from the snapshot's with no gap and no repeat, and per
/// device the snapshot's value is followed by exactly the readings after it.
async fn a_late_viewer_gets_every_latest_value_then_each_later_reading_once(hub: &TestHub) {
    let mut agents = Vec::with_capacity(DEVICES);
    for d in 0..DEVICES {
        let mut agent = hub.agent(&format!("pi-{d:03}"), &[]).await;
        for seq in 1..=2 {
            let ack = agent.publish(seq, json!({"n": seq})).await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        agents.push(agent);
    }
    let busy: Vec<Client> = agents.drain(..BUSY).collect();
    let publishing = tokio::spawn(async move {
        let mut busy = busy;
        for seq in 3..=LAST {
            for agent in &mut busy {
                assert_eq!(agent.publish(seq, json!({"n": seq})).await["type"], "ack");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        busy
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut viewer = hub.viewer("wall", &[]).await;
    let mut seen = subscribe_with_snapshot(&mut viewer, "fleet").await;
    let _busy = publishing.await.unwrap();
    assert!(
        seen.recovered.iter().all(|r| *r),
        "the snapshot joins the stream"
    );

    let mut latest: HashMap<String, u64> = HashMap::new();
    for item in &seen.items {
        let device = item["from"].as_str().unwrap().to_owned();
        assert!(
            latest.insert(device, n(item)).is_none(),
            "one item per device: {item}"
        );
    }
    assert_eq!(latest.len(), DEVICES, "every device is in the snapshot");
    assert!(!seen.truncated);
    for (device, value) in &latest {
        let quiet = device.as_str() >= format!("pi-{BUSY:03}").as_str();
        if quiet {
            assert_eq!(*value, 2, "{device}'s latest reading");
        }
    }
    let finished = |seen: &Seen| {
        let mut last: HashMap<&str, u64> = HashMap::new();
        for m in seen.items.iter().chain(&seen.live) {
            last.insert(m["from"].as_str().unwrap(), n(m));
        }
        (0..BUSY).all(|d| last.get(format!("pi-{d:03}").as_str()) == Some(&LAST))
    };
    read_live(&mut viewer, &mut seen, finished).await;

    let mut next: BTreeMap<u64, u64> = seen.positions.iter().map(|(p, o)| (*p, o + 1)).collect();
    for m in &seen.live {
        let expected = next.get_mut(&part_of(m)).expect("a known partition");
        assert_eq!(
            m["offset"].as_u64().unwrap(),
            *expected,
            "no gap, no repeat: {m}"
        );
        *expected += 1;
        let device = m["from"].as_str().unwrap();
        let before = latest.insert(device.to_owned(), n(m)).unwrap();
        assert_eq!(
            n(m),
            before + 1,
            "{device}: the reading after the snapshot's, once"
        );
    }

    // Presence keeps one state per device: all 500 are online.
    let presence = subscribe_with_snapshot(&mut viewer, "presence").await;
    let online = presence
        .items
        .iter()
        .filter(|m| m["data"]["online"] == true)
        .count();
    assert_eq!(online, DEVICES, "every connected device, once");
}

/// A snapshot larger than half the viewer's queue sends the newest devices that fit and says
/// it was cut.
async fn a_snapshot_too_big_for_the_queue_keeps_the_newest_and_says_so(hub: &TestHub) {
    for d in 0..DEVICES {
        let mut agent = hub.agent(&format!("pi-{d:03}"), &[]).await;
        let padding = "x".repeat(200);
        let ack = agent.publish(1, json!({"n": d, "pad": padding})).await;
        assert_eq!(ack["type"], "ack");
    }
    let mut viewer = hub.viewer("wall", &[]).await;
    let seen = subscribe_with_snapshot(&mut viewer, "fleet").await;
    assert!(seen.truncated, "cut to the queue");
    let kept = seen.items.len();
    assert!(kept > 0 && kept < DEVICES, "{kept} of {DEVICES}");
    let mut values: Vec<u64> = seen.items.iter().map(n).collect();
    values.sort_unstable();
    let newest: Vec<u64> = ((DEVICES - kept) as u64..DEVICES as u64).collect();
    assert_eq!(values, newest, "the devices heard last");
}

fn tight_queue(s: &mut hub::Settings) {
    s.limits.max_message_bytes = 1024;
    s.limits.outbound_queue_bytes = 64 * 1024;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_late_viewer_gets_every_latest_value_then_each_later_reading_once() {
    let hub = TestHub::start().await;
    a_late_viewer_gets_every_latest_value_then_each_later_reading_once(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_snapshot_too_big_for_the_queue_keeps_the_newest() {
    let hub = TestHub::with(tight_queue).await;
    a_snapshot_too_big_for_the_queue_keeps_the_newest_and_says_so(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_late_viewer_gets_every_latest_value_then_each_later_reading_once() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis(&redis).await;
    a_late_viewer_gets_every_latest_value_then_each_later_reading_once(&hub).await;
}

/// After Redis lost writes the channel starts a new epoch; the latest values kept from the lost
/// timeline are not in its snapshots (their offsets belong to the old epoch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_snapshot_holds_only_the_current_epochs_values() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis(&redis).await;
    let mut agent = hub.agent("pi-lost", &[]).await;
    assert_eq!(agent.publish(1, json!({"n": 1})).await["type"], "ack");
    // As a rewind does (`REWOUND`): the channel gets a new epoch, its latest values stay.
    let _: () = redis::cmd("HSET")
        .arg("tl:{fleet}:meta")
        .arg("epoch")
        .arg("new-epoch")
        .arg("offset")
        .arg(0)
        .query(&mut redis.connection())
        .unwrap();
    let mut viewer = hub.viewer("wall", &[]).await;
    let seen = subscribe_with_snapshot(&mut viewer, "fleet").await;
    assert!(
        seen.items.is_empty(),
        "old epoch's values: {:?}",
        seen.items
    );
    let mut other = hub.agent("pi-new", &[]).await;
    assert_eq!(other.publish(1, json!({"n": 2})).await["type"], "ack");
    let mut late = hub.viewer("late", &[]).await;
    let seen = subscribe_with_snapshot(&mut late, "fleet").await;
    let from: Vec<&str> = seen
        .items
        .iter()
        .map(|m| m["from"].as_str().unwrap())
        .collect();
    assert_eq!(from, ["pi-new"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_partitioned_fleet_snapshots_each_partition_and_joins_each_stream() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, |s| s.broker.partitions = Some(4)).await;
    a_late_viewer_gets_every_latest_value_then_each_later_reading_once(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_snapshot_too_big_for_the_queue_keeps_the_newest() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, tight_queue).await;
    a_snapshot_too_big_for_the_queue_keeps_the_newest_and_says_so(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_late_viewer_gets_every_latest_value_then_each_later_reading_once() {
    let cluster = RedisCluster::start(3);
    let hub = TestHub::on_cluster_with(&cluster, |s| s.broker.partitions = None).await;
    a_late_viewer_gets_every_latest_value_then_each_later_reading_once(&hub).await;
}

/// The store keeps at most `history.snapshot_devices` devices per channel, the least recently
/// heard leaving first, and a device silent for `history.meta_ttl` leaves the snapshot; but not
/// on `presence`, where a device online longer than that is still online.
async fn the_latest_value_store_is_bounded_and_forgets_silent_devices(hub: &TestHub) {
    let max = hub.settings.history.snapshot_devices;
    for d in 0..3 * max {
        let mut agent = hub.agent(&format!("pi-{d:03}"), &[]).await;
        assert_eq!(agent.publish(1, json!({"n": d})).await["type"], "ack");
    }
    let mut viewer = hub.viewer("wall", &[]).await;
    let seen = subscribe_with_snapshot(&mut viewer, "fleet").await;
    let values: Vec<u64> = seen.items.iter().map(n).collect();
    assert!(values.len() <= max, "{values:?}");
    let newest = (3 * max - 1) as u64;
    assert!(
        values.contains(&newest),
        "the device heard last is kept: {values:?}"
    );
    assert!(
        !values.contains(&0),
        "the one heard first is gone: {values:?}"
    );

    let _connected = hub.agent("pi-long", &[]).await;

    tokio::time::sleep(hub.settings.history.meta_ttl + Duration::from_millis(200)).await;
    let mut late = hub.viewer("late", &[]).await;
    let seen = subscribe_with_snapshot(&mut late, "fleet").await;
    assert!(
        seen.items.is_empty(),
        "silent past meta_ttl: {:?}",
        seen.items
    );
    let presence = subscribe_with_snapshot(&mut late, "presence").await;
    let long = presence
        .items
        .iter()
        .find(|m| m["from"] == "pi-long")
        .unwrap_or_else(|| panic!("pi-long is in presence: {:?}", presence.items));
    assert_eq!(long["data"]["online"], true, "{long}");
}

fn small_store(s: &mut hub::Settings) {
    s.history.snapshot_devices = 40;
    s.history.meta_ttl = Duration::from_secs(2);
    // Beats well inside meta_ttl, as the defaults are (2 s against 24 h).
    s.presence.heartbeat = Duration::from_millis(100);
    s.presence.hub_ttl = Duration::from_millis(500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_the_latest_value_store_is_bounded_and_forgets_silent_devices() {
    let hub = TestHub::with(small_store).await;
    the_latest_value_store_is_bounded_and_forgets_silent_devices(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_the_latest_value_store_is_bounded_and_forgets_silent_devices() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, small_store).await;
    the_latest_value_store_is_bounded_and_forgets_silent_devices(&hub).await;
}
