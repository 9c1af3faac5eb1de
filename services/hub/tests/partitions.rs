//! `fleet` and `groups.<g>` split into partitions (`broker.partitions`): each partition is its own
//! log with its own epoch and offsets in its own hash slot, a device always writes to the same
//! one, and a subscriber gets every partition, each with its own `subscribed` frame, and resumes
//! them with a position per partition.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::redis_cluster::{RedisCluster, redis_cli};
use common::{Client, Event, RedisServer, TestHub};
use serde_json::{Value, json};

/// Subscribes and reads the `subscribed` frames of every partition (one for a one-log channel),
/// and the messages that come among them (each partition's replay follows its frame).
async fn subscribe_replay(
    client: &mut Client,
    channel: &str,
    since: Option<Value>,
) -> (Vec<Value>, Vec<Value>) {
    let mut frame = json!({"type": "subscribe", "channel": channel});
    if let Some(since) = since {
        frame["since"] = since;
    }
    client.send(frame).await;
    let (mut subscribed, mut messages) = (Vec::new(), Vec::new());
    loop {
        let frame = match client.next().await {
            Event::Frame(frame) => frame,
            other => panic!("subscribing to {channel}: {other:?}"),
        };
        match frame["type"].as_str() {
            Some("subscribed") => subscribed.push(frame),
            Some("message") => messages.push(frame),
            _ => panic!("subscribing to {channel}: {frame}"),
        }
        let parts = subscribed[0]["parts"].as_u64().unwrap_or(1);
        if subscribed.len() as u64 == parts {
            return (subscribed, messages);
        }
    }
}

/// The `subscribed` frames of a subscribe that nothing is replayed to.
async fn subscribe_all(client: &mut Client, channel: &str, since: Option<Value>) -> Vec<Value> {
    let (subscribed, messages) = subscribe_replay(client, channel, since).await;
    assert!(messages.is_empty(), "{messages:?}");
    subscribed
}

/// What a dashboard keeps per partition: the last epoch and offset it saw.
#[derive(Default)]
struct Positions(BTreeMap<u64, (String, u64)>);

impl Positions {
    fn see(&mut self, frame: &Value) {
        let part = frame["part"]
            .as_u64()
            .expect("a partitioned frame names its part");
        let epoch = frame["epoch"].as_str().unwrap().to_owned();
        self.0
            .insert(part, (epoch, frame["offset"].as_u64().unwrap()));
    }

    fn since(&self) -> Value {
        let partitions: Vec<Value> = self
            .0
            .values()
            .map(|(epoch, offset)| json!({"epoch": epoch, "offset": offset}))
            .collect();
        json!({ "partitions": partitions })
    }
}

/// Publishes readings `1..=count` of each device, one device after the other.
async fn publish_from(hub: &TestHub, devices: &[String], count: u64, first: u64) {
    for device in devices {
        let mut agent = hub.agent(device, &["north"]).await;
        for seq in first..first + count {
            let reply = agent.publish(seq, json!({"d": device, "n": seq})).await;
            assert_eq!(reply["type"], "ack", "{reply}");
        }
    }
}

fn devices(n: usize) -> Vec<String> {
    (0..n).map(|d| format!("pi-{d}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_one_subscribed_frame_per_partition_and_one_unsubscribed() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, |s| s.broker.partitions = Some(4)).await;
    let mut viewer = hub
        .connect(&hub.token("v", hub_protocol::Role::Viewer))
        .await;
    let frames = subscribe_all(&mut viewer, "fleet", None).await;
    let parts: Vec<(Value, Value, Value)> = frames
        .iter()
        .map(|f| (f["channel"].clone(), f["part"].clone(), f["parts"].clone()))
        .collect();
    assert_eq!(
        parts,
        (0..4)
            .map(|k| (json!("fleet"), json!(k), json!(4)))
            .collect::<Vec<_>>()
    );
    // A device's own channel has one writer and stays one log.
    let own = subscribe_all(&mut viewer, "devices.pi-1", None).await;
    assert_eq!(own.len(), 1);
    assert!(own[0].get("part").is_none(), "{}", own[0]);

    viewer
        .send(json!({"type": "unsubscribe", "channel": "fleet"}))
        .await;
    assert_eq!(viewer.expect("unsubscribed").await["channel"], "fleet");
    publish_from(&hub, &devices(8), 1, 1).await;
    assert_eq!(viewer.expect("message").await["channel"], "devices.pi-1");
    assert!(
        matches!(
            viewer.next_within(Duration::from_millis(300)).await,
            Event::Timeout
        ),
        "no fleet message after the unsubscribe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_of_a_fleet_spread_over_the_shards_and_reach_every_hub_once_each() {
    let cluster = RedisCluster::start(3);
    // The cluster default: 16 partitions.
    let default = |s: &mut hub::Settings| s.broker.partitions = None;
    let hubs = [
        TestHub::on_cluster_with(&cluster, default).await,
        TestHub::on_cluster_with(&cluster, default).await,
    ];
    let mut viewer = hubs[1]
        .connect(&hubs[1].token("v", hub_protocol::Role::Viewer))
        .await;
    let subscribed = subscribe_all(&mut viewer, "fleet", None).await;
    assert_eq!(subscribed.len(), 16);
    let group = subscribe_all(&mut viewer, "groups.north", None).await;
    assert_eq!(group.len(), 16);

    let fleet = devices(24);
    publish_from(&hubs[0], &fleet, 5, 1).await;
    let got = viewer.messages(2 * 24 * 5).await;
    for channel in ["fleet", "groups.north"] {
        let mut readings = BTreeSet::new();
        let mut by_part: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        let mut part_of_device: BTreeMap<String, u64> = BTreeMap::new();
        for m in got.iter().filter(|m| m["channel"] == channel) {
            let part = m["part"].as_u64().unwrap();
            let device = m["from"].as_str().unwrap().to_owned();
            assert!(
                readings.insert((device.clone(), m["data"]["n"].as_u64().unwrap())),
                "{m} twice"
            );
            by_part
                .entry(part)
                .or_default()
                .push(m["offset"].as_u64().unwrap());
            let first = *part_of_device.entry(device).or_insert(part);
            assert_eq!(first, part, "a device always writes to one partition");
        }
        assert_eq!(readings.len(), 24 * 5, "{channel}: every reading");
        for (part, offsets) in &by_part {
            let expected: Vec<u64> = (1..=offsets.len() as u64).collect();
            assert_eq!(
                offsets, &expected,
                "{channel} part {part}: gapless, in order"
            );
        }
        assert!(by_part.len() > 4, "24 devices use many partitions");
    }
    assert!(matches!(
        viewer.next_within(Duration::from_millis(300)).await,
        Event::Timeout
    ));

    // Every master holds some of fleet's partitions: no shard takes the whole fleet.
    for port in cluster.masters() {
        let keys = redis_cli(port, &["--scan", "--pattern", "tl:{fleet#*}:meta"]);
        let held = keys.as_deref().unwrap_or("").lines().count();
        assert!(held >= 4, "master {port} holds {held} of 16 partitions");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_with_a_position_per_partition_misses_nothing_and_repeats_nothing() {
    let cluster = RedisCluster::start(3);
    let hub = TestHub::on_cluster_with(&cluster, |s| s.broker.partitions = Some(6)).await;
    let watcher = TestHub::on_cluster_with(&cluster, |s| s.broker.partitions = Some(6)).await;
    let token = watcher.token("v", hub_protocol::Role::Viewer);
    let mut viewer = watcher.connect(&token).await;
    let mut positions = Positions::default();
    for frame in subscribe_all(&mut viewer, "fleet", None).await {
        positions.see(&frame);
    }
    let fleet = devices(12);
    publish_from(&hub, &fleet, 3, 1).await;
    for m in viewer.messages(12 * 3).await {
        positions.see(&m);
    }
    drop(viewer);

    // Published while the dashboard is away: it must get exactly these on resume.
    publish_from(&hub, &fleet, 4, 4).await;
    let mut viewer = watcher.connect(&token).await;
    let (resumed, mut replay) =
        subscribe_replay(&mut viewer, "fleet", Some(positions.since())).await;
    assert_eq!(resumed.len(), 6);
    assert!(
        resumed.iter().all(|f| f["recovered"] == true),
        "{resumed:?}"
    );
    let rest = 12 * 4 - replay.len();
    replay.extend(viewer.messages(rest).await);
    let mut seen = BTreeSet::new();
    for m in &replay {
        let n = m["data"]["n"].as_u64().unwrap();
        assert!((4..=7).contains(&n), "only what was missed: {m}");
        assert!(seen.insert((m["from"].to_string(), n)), "{m} twice");
        let (_, last) = &positions.0[&m["part"].as_u64().unwrap()];
        assert!(m["offset"].as_u64().unwrap() > *last, "{m} was seen before");
    }
    assert_eq!(seen.len(), 12 * 4, "no gap");
    assert!(matches!(
        viewer.next_within(Duration::from_millis(300)).await,
        Event::Timeout
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_written_for_another_number_of_partitions_is_answered_not_recovered() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, |s| s.broker.partitions = Some(4)).await;
    publish_from(&hub, &devices(4), 2, 1).await;
    let token = hub.token("v", hub_protocol::Role::Viewer);
    let mut viewer = hub.connect(&token).await;
    let positions: Vec<Value> = subscribe_all(&mut viewer, "fleet", None)
        .await
        .iter()
        .map(|f| json!({"epoch": f["epoch"], "offset": f["offset"]}))
        .collect();

    for wrong in [
        json!({"epoch": positions[0]["epoch"], "offset": 0}),
        json!({"partitions": positions[..3]}),
    ] {
        let mut viewer = hub.connect(&token).await;
        let frames = subscribe_all(&mut viewer, "fleet", Some(wrong.clone())).await;
        assert_eq!(frames.len(), 4);
        assert!(
            frames.iter().all(|f| f["recovered"] == false),
            "{wrong}: {frames:?}"
        );
    }
    let mut viewer = hub.connect(&token).await;
    let right = json!({ "partitions": positions });
    let frames = subscribe_all(&mut viewer, "fleet", Some(right)).await;
    assert!(frames.iter().all(|f| f["recovered"] == true), "{frames:?}");
    assert_eq!(
        hub.metric("hub_recoveries_total{result=\"not_recovered\"}")
            .await,
        2.0,
        "each wrong resume counts once, not once per partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partitions_of_one_resume_share_one_replay_budget() {
    let redis = RedisServer::start();
    // A 64 KiB queue: one subscribe may replay 32 KiB, whatever the number of partitions.
    let hub = TestHub::on_redis_with(&redis, |s| {
        common::small_queue(s);
        s.broker.partitions = Some(4);
    })
    .await;
    let token = hub.token("v", hub_protocol::Role::Viewer);
    let mut viewer = hub.connect(&token).await;
    let start: Vec<Value> = subscribe_all(&mut viewer, "fleet", None)
        .await
        .iter()
        .map(|f| json!({"epoch": f["epoch"], "offset": f["offset"]}))
        .collect();
    // 48 readings of about 1.1 KB: each partition's share fits 32 KiB, all of them do not.
    let pad = "x".repeat(1000);
    for device in devices(16) {
        let mut agent = hub.agent(&device, &[]).await;
        for seq in 1..=3 {
            let reply = agent.publish(seq, json!({"n": seq, "pad": pad})).await;
            assert_eq!(reply["type"], "ack", "{reply}");
        }
    }
    let mut late = hub.connect(&token).await;
    let (frames, mut replay) =
        subscribe_replay(&mut late, "fleet", Some(json!({ "partitions": start }))).await;
    let recovered: Vec<bool> = frames.iter().map(|f| f["recovered"] == true).collect();
    assert!(recovered.contains(&true), "{frames:?}");
    assert!(
        recovered.contains(&false),
        "the partitions past the budget are answered not recovered: {frames:?}"
    );
    let expected: u64 = frames
        .iter()
        .zip(&start)
        .filter(|(f, _)| f["recovered"] == true)
        .map(|(f, s)| f["offset"].as_u64().unwrap() - s["offset"].as_u64().unwrap())
        .sum();
    let missing = expected as usize - replay.len();
    replay.extend(late.messages(missing).await);
    let bytes: usize = replay.iter().map(|m| m.to_string().len()).sum();
    assert!(bytes <= 32 * 1024, "{bytes} bytes replayed");
    agent_after(&hub).await;
    assert_eq!(
        late.expect("message").await["from"],
        "pi-late",
        "still live"
    );
}

/// One more reading, from a device of its own.
async fn agent_after(hub: &TestHub) {
    let mut agent = hub.agent("pi-late", &[]).await;
    assert_eq!(agent.publish(1, json!({})).await["type"], "ack");
}
