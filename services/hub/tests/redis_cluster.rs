//! Hubs on a real Redis Cluster (redis-server processes in cluster mode on loopback): each
//! channel lives in its own slot, publications go to every slot they touch, and the relay
//! follows the channels it watches over sharded pub/sub.

mod common;

use std::time::Duration;

use common::redis_cluster::RedisCluster;
use common::{TestHub, offsets};
use serde_json::json;

/// The messages of `channel` among `got`.
fn of(got: &[serde_json::Value], channel: &str) -> Vec<serde_json::Value> {
    got.iter()
        .filter(|m| m["channel"] == channel)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hub_delivers_every_reading_across_shards_in_offset_order() {
    let cluster = RedisCluster::start(3);
    let hubs = [
        TestHub::on_cluster(&cluster).await,
        TestHub::on_cluster(&cluster).await,
    ];
    let channels = ["fleet", "devices.pi-1", "groups.north"];
    let mut viewers = Vec::new();
    for hub in &hubs {
        viewers.push(hub.viewer("v", &channels).await);
    }
    let mut agent = hubs[0].agent("pi-1", &["north"]).await;
    for seq in 1..=30 {
        let reply = agent.publish(seq, json!({"n": seq})).await;
        assert_eq!(reply["type"], "ack", "{reply}");
        assert_ne!(reply["duplicate"], true, "{reply}");
    }
    let again = agent.publish(12, json!({"n": 12})).await;
    assert_eq!(
        again["duplicate"], true,
        "a resend is acknowledged, not stored twice"
    );
    for viewer in &mut viewers {
        let got = viewer.messages(90).await;
        for channel in channels {
            let messages = of(&got, channel);
            assert_eq!(
                offsets(&messages),
                (1..=30).collect::<Vec<_>>(),
                "{channel}"
            );
            assert_eq!(messages[11]["data"], json!({"n": 12}));
        }
        assert!(
            matches!(
                viewer.next_within(Duration::from_millis(300)).await,
                common::Event::Timeout
            ),
            "nothing more, the duplicate included"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_cut_off_at_one_shard_is_completed_by_its_resend_and_never_doubled() {
    let cluster = RedisCluster::start(3);
    let fleet_shard = cluster.owner_of("tl:{fleet}:meta");
    // A device whose own channel lives on another shard than `fleet`.
    let device = (1..100)
        .map(|n| format!("pi-{n}"))
        .find(|d| cluster.owner_of(&format!("tl:{{devices.{d}}}:meta")) != fleet_shard)
        .expect("some device channel lives elsewhere");
    let own = format!("devices.{device}");
    let hub = TestHub::on_cluster(&cluster).await;
    let watcher = TestHub::on_cluster(&cluster).await;
    let mut viewer = watcher.viewer("v", &["fleet", &own]).await;
    let mut agent = hub.agent(&device, &[]).await;
    assert_eq!(agent.publish(1, json!({"n": 1})).await["type"], "ack");

    // `fleet`'s shard stops answering: seq 2 is not stored everywhere in time (fleet takes it
    // once the pause ends, the device's channel never does), and the agent is told to resend.
    cluster.pause(fleet_shard, 2500);
    let refused = agent.publish(2, json!({"n": 2})).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("unavailable"))
    );
    tokio::time::sleep(Duration::from_millis(2700)).await;
    // The link drops before the resend: the hub tells the new connection what every channel
    // has, so the agent resends 2 instead of taking it for stored.
    drop(agent);
    let mut agent = hub.agent(&device, &[]).await;
    assert_eq!(agent.hello["last_seq"], 1, "{}", agent.hello);
    let resent = agent.publish(2, json!({"n": 2})).await;
    assert_eq!(resent["type"], "ack", "{resent}");
    assert_eq!(agent.publish(3, json!({"n": 3})).await["type"], "ack");

    let got = viewer.messages(6).await;
    for channel in ["fleet", own.as_str()] {
        let messages = of(&got, channel);
        assert_eq!(
            offsets(&messages),
            [1, 2, 3],
            "{channel}: each reading once, in order"
        );
    }
    assert!(matches!(
        viewer.next_within(Duration::from_millis(500)).await,
        common::Event::Timeout
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_channel_follows_its_slot_to_another_shard_without_a_gap() {
    let cluster = RedisCluster::start(3);
    let hub = TestHub::on_cluster(&cluster).await;
    // No position check to fall back on: live delivery must follow the slot.
    let watcher = TestHub::on_cluster_with(&cluster, |s| {
        s.broker.position_check = Duration::from_secs(600);
    })
    .await;
    let key = "tl:{devices.pi-1}:meta";
    let to = cluster.other_than(cluster.owner_of(key));
    // The viewer also watches channels of the shard the slot moves to: after the move that
    // shard holds several of its subscriptions, in different slots.
    let neighbours: Vec<String> = (2..200)
        .map(|n| format!("devices.pi-{n}"))
        .filter(|c| cluster.owner_of(&format!("tl:{{{c}}}:meta")) == to)
        .take(3)
        .collect();
    let mut channels = vec!["devices.pi-1"];
    channels.extend(neighbours.iter().map(String::as_str));
    let mut viewer = watcher.viewer("v", &channels).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    for seq in 1..=10 {
        assert_eq!(agent.publish(seq, json!({"n": seq})).await["type"], "ack");
    }
    assert_eq!(
        offsets(&viewer.messages(10).await),
        (1..=10).collect::<Vec<_>>()
    );

    // The slot of `devices.pi-1` (its history, offsets and the device's seq) moves shards.
    // Under traffic: the agent publishes 11..=60 while the slot moves.
    let publisher = tokio::spawn(async move {
        for seq in 11..=60 {
            // A command that meets the slot mid-move may be refused: the agent resends.
            let mut reply = agent.publish(seq, json!({"n": seq})).await;
            for _ in 0..50 {
                if reply["type"] == "ack" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                reply = agent.publish(seq, json!({"n": seq})).await;
            }
            assert_eq!(reply["type"], "ack", "{reply}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::task::block_in_place(|| cluster.migrate_slot_of(key, to));
    publisher.await.unwrap();
    let after = viewer.messages(50).await;
    assert_eq!(
        offsets(&after),
        (11..=60).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    assert_eq!(after[0]["epoch"], after[49]["epoch"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_is_down_holds_back_only_its_own_channels() {
    let mut cluster = RedisCluster::start(3);
    let victim = cluster.other_than(cluster.owner_of("tl:{fleet}:meta"));
    let shard_of = |d: &str| cluster.owner_of(&format!("tl:{{devices.{d}}}:meta"));
    let devices: Vec<String> = (1..200).map(|n| format!("pi-{n}")).collect();
    let alive = devices
        .iter()
        .find(|d| shard_of(d) != victim)
        .unwrap()
        .clone();
    let lost = devices
        .iter()
        .find(|d| shard_of(d) == victim)
        .unwrap()
        .clone();
    let hub = TestHub::on_cluster(&cluster).await;
    let watcher = TestHub::on_cluster(&cluster).await;
    let (alive_channel, lost_channel) = (format!("devices.{alive}"), format!("devices.{lost}"));
    let mut viewer = watcher
        .viewer("v", &["fleet", &alive_channel, &lost_channel])
        .await;
    let mut alive_agent = hub.agent(&alive, &[]).await;
    let mut lost_agent = hub.agent(&lost, &[]).await;
    assert_eq!(alive_agent.publish(1, json!({"n": 1})).await["type"], "ack");
    assert_eq!(lost_agent.publish(1, json!({"n": 1})).await["type"], "ack");
    assert_eq!(viewer.messages(4).await.len(), 4);

    cluster.kill(victim);
    let refused = lost_agent.publish(2, json!({"n": 2})).await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    for seq in 2..=5 {
        let reply = alive_agent.publish(seq, json!({"n": seq})).await;
        assert_eq!(reply["type"], "ack", "the other shards serve on: {reply}");
    }
    let got = viewer.messages(8).await;
    assert_eq!(offsets(&of(&got, &alive_channel)), [2, 3, 4, 5]);
    assert_eq!(offsets(&of(&got, "fleet")), [3, 4, 5, 6]);

    watcher
        .wait_for_metric("hub_broker_pending_channels", 1.0)
        .await;
    let (status, body) = watcher.get("/readyz").await;
    assert_eq!(status, 200, "the hub serves what it can");
    assert!(body.contains("degraded"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_stream_fails_over_and_every_acknowledged_reading_is_delivered_or_announced()
 {
    let mut cluster = RedisCluster::with_replicas(3, 1);
    let hub = TestHub::on_cluster(&cluster).await;
    let watcher = TestHub::on_cluster(&cluster).await;
    let mut viewer = watcher.viewer("v", &["fleet"]).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    let mut acked = Vec::new();
    let publish_until_acked = async |agent: &mut common::Client, seq: u64| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let reply = agent.publish(seq, json!({"n": seq})).await;
            if reply["type"] == "ack" {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{seq} never acknowledged: {reply}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    for seq in 1..=10 {
        publish_until_acked(&mut agent, seq).await;
        acked.push(seq);
    }
    cluster.kill(cluster.owner_of("tl:{fleet}:meta"));
    for seq in 11..=30 {
        publish_until_acked(&mut agent, seq).await;
        acked.push(seq);
    }

    // Every acknowledged reading arrives once, in order; what the failover lost of them (writes
    // the replica had not received) is announced by a `subscribed` with recovered: false.
    let mut seen: Vec<u64> = Vec::new();
    let mut announced = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.last() != Some(&30) {
        assert!(tokio::time::Instant::now() < deadline, "got {seen:?}");
        match viewer.next().await {
            common::Event::Frame(f) if f["type"] == "message" => {
                seen.push(f["data"]["n"].as_u64().unwrap());
            }
            common::Event::Frame(f) if f["type"] == "subscribed" => {
                assert_eq!(f["recovered"], false, "{f}");
                announced = true;
            }
            common::Event::Timeout => {}
            other => panic!("{other:?}"),
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, seen, "in order, none twice");
    if !announced {
        assert_eq!(seen, acked, "with nothing announced, nothing is missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_sent_together_are_stored_as_one_and_answered_in_order() {
    let cluster = RedisCluster::start(3);
    let hub = TestHub::on_cluster_with(&cluster, |_| {}).await;
    common::publishes_sent_together_are_stored_as_one_and_answered_in_order(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_silent_past_meta_ttl_starts_over_on_every_channel() {
    // `fleet` and `groups.north` stay busy (their guards remember the silent device's old seqs)
    // while the device's own record expires: its new incarnation is new everywhere at once.
    let cluster = RedisCluster::start(3);
    let hub =
        TestHub::on_cluster_with(&cluster, |s| s.history.meta_ttl = Duration::from_secs(1)).await;
    common::a_device_silent_past_meta_ttl_starts_over_on_every_channel(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_starts_before_its_cluster_and_becomes_ready_when_it_forms() {
    let mut cluster = RedisCluster::planned(3);
    let nodes = cluster.urls();
    let hub = TestHub::with(|s| {
        s.broker.cluster_nodes = nodes;
        s.broker.timeout = Duration::from_millis(500);
        s.broker.position_check = Duration::from_millis(200);
    })
    .await;
    hub.wait_ready(false).await;
    let token = hub.token("v", hub_protocol::Role::Viewer);
    let refused = hub.try_connect(&token).await.err().expect("refused");
    assert_eq!(refused.body["error"], "revocations_unknown");

    cluster.launch(0);
    hub.wait_ready(true).await;
    let mut viewer = hub.connect(&token).await;
    viewer.subscribe("fleet", None).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    assert_eq!(agent.publish(1, json!({})).await["type"], "ack");
    assert_eq!(offsets(&viewer.messages(1).await), [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_readings_a_failover_loses_are_announced_as_a_new_epoch() {
    let mut cluster = RedisCluster::with_replicas(3, 1);
    let master = cluster.owner_of("tl:{fleet}:meta");
    let replica = cluster.replica_of(master);
    let hub = TestHub::on_cluster(&cluster).await;
    let watcher = TestHub::on_cluster(&cluster).await;
    let mut viewer = watcher.viewer("v", &["fleet"]).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    for seq in 1..=5 {
        assert_eq!(agent.publish(seq, json!({"n": seq})).await["type"], "ack");
    }
    let live = viewer.messages(5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The replica is cut off (stopped, its link dropped by the master); fleet's master
    // acknowledges and delivers 6..=8, then dies.
    cluster.signal(replica, "STOP");
    common::redis_cluster::redis_cli(master, &["CLIENT", "KILL", "TYPE", "replica"])
        .expect("CLIENT KILL");
    for seq in 6..=8 {
        assert_eq!(agent.publish(seq, json!({"n": seq})).await["type"], "ack");
    }
    assert_eq!(offsets(&viewer.messages(3).await), [6, 7, 8]);
    cluster.kill(master);
    cluster.signal(replica, "CONT");

    // The promoted replica's fleet ends at 5: the hub notices it fell below what it delivered
    // and starts a new epoch, which subscribers are told about.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let notice = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new epoch announced"
        );
        match viewer.next().await {
            common::Event::Frame(f) if f["type"] == "subscribed" => break f,
            common::Event::Timeout => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(notice["recovered"], false, "{notice}");
    assert_ne!(notice["epoch"], live[0]["epoch"], "{notice}");
}
