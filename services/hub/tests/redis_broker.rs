//! Hubs sharing one Redis: every hub delivers every publication with the same offsets, clients
//! resume on any hub, and what pub/sub or Redis itself loses is repaired or reported.

mod common;

use std::time::Duration;

use common::{Event, RedisServer, TestHub, offsets};
use hub_protocol::Role;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hub_delivers_every_reading_in_offset_order() {
    let redis = RedisServer::start();
    let hubs = [
        TestHub::on_redis(&redis).await,
        TestHub::on_redis(&redis).await,
        TestHub::on_redis(&redis).await,
    ];
    let mut viewers = Vec::new();
    for hub in &hubs {
        viewers.push(
            hub.viewer("v", &["fleet", "devices.pi-1", "groups.north"])
                .await,
        );
    }
    let mut agent = hubs[0].agent("pi-1", &["north"]).await;
    for seq in 1..=50 {
        assert_eq!(agent.publish(seq, json!({"n": seq})).await["type"], "ack");
    }
    for viewer in &mut viewers {
        let got = viewer.messages(150).await;
        for channel in ["fleet", "devices.pi-1", "groups.north"] {
            let of: Vec<_> = got
                .iter()
                .filter(|m| m["channel"] == channel)
                .cloned()
                .collect();
            assert_eq!(offsets(&of), (1..=50).collect::<Vec<_>>(), "{channel}");
            assert_eq!(of[9]["data"], json!({"n": 10}));
        }
        assert!(matches!(
            viewer.next_within(Duration::from_millis(300)).await,
            Event::Timeout
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_hub_with_exactly_what_it_missed() {
    let redis = RedisServer::start();
    let (a, b, c) = (
        TestHub::on_redis(&redis).await,
        TestHub::on_redis(&redis).await,
        TestHub::on_redis(&redis).await,
    );
    let mut agent = b.agent("pi-1", &[]).await;
    let mut viewer = a.viewer("v", &[]).await;
    let epoch = viewer.subscribe("devices.pi-1", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    for seq in 1..=5 {
        agent.publish(seq, json!({"n": seq})).await;
    }
    assert_eq!(offsets(&viewer.messages(5).await), [1, 2, 3, 4, 5]);
    drop(viewer);
    for seq in 6..=10 {
        agent.publish(seq, json!({"n": seq})).await;
    }
    let mut resumed = c.viewer("v", &[]).await;
    let subscribed = resumed.subscribe("devices.pi-1", Some((&epoch, 5))).await;
    assert_eq!(
        (
            subscribed["recovered"].as_bool(),
            subscribed["epoch"].as_str()
        ),
        (Some(true), Some(epoch.as_str()))
    );
    agent.publish(11, json!({"n": 11})).await;
    assert_eq!(offsets(&resumed.messages(6).await), [6, 7, 8, 9, 10, 11]);
    assert!(matches!(
        resumed.next_within(Duration::from_millis(300)).await,
        Event::Timeout
    ));
    // The agent's last seq is known to every hub.
    assert_eq!(a.agent("pi-1", &[]).await.hello["last_seq"], 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_publishing_into_one_channel_keep_offsets_gapless_and_unique() {
    let redis = RedisServer::start();
    let (a, b, c) = (
        TestHub::on_redis(&redis).await,
        TestHub::on_redis(&redis).await,
        TestHub::on_redis(&redis).await,
    );
    let mut watcher = c.viewer("v", &["fleet"]).await;
    let mut tasks = Vec::new();
    for (hub, device) in [(&a, "pi-1"), (&b, "pi-2")] {
        let mut agent = hub.agent(device, &[]).await;
        tasks.push(tokio::spawn(async move {
            for seq in 1..=100 {
                assert_eq!(agent.publish(seq, json!({"seq": seq})).await["type"], "ack");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let got = watcher.messages(200).await;
    assert_eq!(offsets(&got), (1..=200).collect::<Vec<_>>());
    for device in ["pi-1", "pi-2"] {
        let seqs: Vec<u64> = got
            .iter()
            .filter(|m| m["from"] == device)
            .map(|m| m["data"]["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (1..=100).collect::<Vec<_>>(),
            "each device's readings in its own order"
        );
    }
}

fn subscribers_of(redis: &RedisServer, channel: &str) -> i64 {
    let topic = format!("tl:{{{channel}}}:pub");
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&topic)
        .query(&mut redis.connection())
        .unwrap();
    n
}

async fn wait_for_subscribers(redis: &RedisServer, channel: &str, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while subscribers_of(redis, channel) != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{channel} never had {n} hub subscribers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_hub_receives_only_the_channels_its_clients_watch() {
    let redis = RedisServer::start();
    let (a, b) = (
        TestHub::on_redis(&redis).await,
        TestHub::on_redis(&redis).await,
    );
    let mut on_a = a.viewer("v", &["fleet", "devices.pi-9"]).await;
    let _on_b = b.viewer("v", &["fleet"]).await;
    assert_eq!(subscribers_of(&redis, "fleet"), 2);
    assert_eq!(
        subscribers_of(&redis, "devices.pi-9"),
        1,
        "hub B has no devices.pi-9 viewer"
    );
    assert_eq!(subscribers_of(&redis, "groups.x"), 0);
    on_a.send(json!({"type": "unsubscribe", "channel": "devices.pi-9"}))
        .await;
    on_a.expect("unsubscribed").await;
    wait_for_subscribers(&redis, "devices.pi-9", 0).await;
    drop(on_a);
    wait_for_subscribers(&redis, "fleet", 1).await;
}

/// Appends a message to `channel` the way the publish script does, but without PUBLISH: what
/// subscribers see when Redis drops a pub/sub message.
fn append_silently(redis: &RedisServer, channel: &str, device: &str) -> u64 {
    let mut conn = redis.connection();
    let meta = format!("tl:{{{channel}}}:meta");
    let epoch: String = redis::cmd("HGET")
        .arg(&meta)
        .arg("epoch")
        .query(&mut conn)
        .unwrap();
    let offset: u64 = redis::cmd("HINCRBY")
        .arg(&meta)
        .arg("offset")
        .arg(1)
        .query(&mut conn)
        .unwrap();
    let message = json!({"type": "message", "channel": channel, "epoch": epoch, "offset": offset,
        "from": device, "data": {"lost": true}})
    .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let _: String = redis::cmd("XADD")
        .arg(format!("tl:{{{channel}}}:log"))
        .arg(format!("{offset}-0"))
        .arg("t")
        .arg(now)
        .arg("m")
        .arg(message)
        .query(&mut conn)
        .unwrap();
    offset
}

#[tokio::test]
async fn messages_lost_by_pubsub_are_filled_from_history() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis(&redis).await;
    let mut viewer = hub.viewer("v", &["fleet"]).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    agent.publish(1, json!({"n": 1})).await;
    assert_eq!(offsets(&viewer.messages(1).await), [1]);

    // A lost message on a channel that then goes quiet: the position check finds it.
    assert_eq!(append_silently(&redis, "fleet", "ghost"), 2);
    let repaired = viewer.expect("message").await;
    assert_eq!(
        (
            repaired["offset"].as_u64(),
            repaired["data"]["lost"].as_bool()
        ),
        (Some(2), Some(true))
    );

    // A lost message followed by a live one: the gap is filled before the live one.
    assert_eq!(append_silently(&redis, "fleet", "ghost"), 3);
    agent.publish(2, json!({"n": 2})).await;
    let got = viewer.messages(2).await;
    assert_eq!(offsets(&got), [3, 4]);
    assert_eq!(got[1]["data"], json!({"n": 2}));
    assert!(hub.metric("hub_gap_fills_total").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarting_with_its_data_changes_no_epoch_and_loses_nothing_acked() {
    let mut redis = RedisServer::start_persistent();
    let hub = TestHub::on_redis(&redis).await;
    let mut viewer = hub.viewer("v", &[]).await;
    let epoch = viewer.subscribe("fleet", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut agent = hub.agent("pi-1", &[]).await;
    for seq in 1..=5 {
        agent.publish(seq, json!({"n": seq})).await;
    }
    viewer.messages(5).await;

    redis.kill();
    hub.wait_ready(false).await;
    let refused = agent.publish(6, json!({"n": 6})).await;
    assert_eq!(
        (refused["code"].as_str(), refused["seq"].as_u64()),
        (Some("unavailable"), Some(6))
    );
    redis.spawn();
    hub.wait_ready(true).await;
    // The agent resends what was not acknowledged.
    assert_eq!(agent.publish(6, json!({"n": 6})).await["type"], "ack");
    let message = viewer.expect("message").await;
    assert_eq!(
        (message["offset"].as_u64(), message["epoch"].as_str()),
        (Some(6), Some(epoch.as_str()))
    );
    assert_eq!(hub.metric("hub_history_misses_total").await, 0.0);
    assert!(hub.metric("hub_broker_reconnects_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_its_data_changes_the_epoch_and_tells_live_subscribers() {
    let mut redis = RedisServer::start();
    let hub = TestHub::on_redis(&redis).await;
    let mut viewer = hub.viewer("v", &[]).await;
    let epoch = viewer.subscribe("fleet", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut agent = hub.agent("pi-1", &[]).await;
    for seq in 1..=3 {
        agent.publish(seq, json!({"n": seq})).await;
    }
    viewer.messages(3).await;

    redis.restart();
    hub.wait_ready(true).await;
    let mut seq = 4;
    let ack = loop {
        let reply = agent.publish(seq, json!({"n": seq})).await;
        if reply["type"] == "ack" {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        seq += 1;
    };
    assert_eq!(ack["duplicate"], json!(null));
    // Subscribers learn the new epoch and that history was lost, then get the new stream.
    let notice = viewer.expect("subscribed").await;
    assert_eq!(notice["recovered"], false);
    let new_epoch = notice["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new_epoch, epoch);
    let message = viewer.expect("message").await;
    assert_eq!(
        (message["offset"].as_u64(), message["epoch"].as_str()),
        (Some(1), Some(new_epoch.as_str()))
    );

    let mut late = hub.viewer("late", &[]).await;
    assert_eq!(
        late.subscribe("fleet", Some((&epoch, 3))).await["recovered"],
        false
    );
}

#[tokio::test]
async fn redis_losing_delivered_writes_but_keeping_the_epoch_starts_a_new_epoch() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis(&redis).await;
    let mut viewer = hub.viewer("v", &[]).await;
    let epoch = viewer.subscribe("fleet", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut agent = hub.agent("pi-1", &[]).await;
    for seq in 1..=5 {
        agent.publish(seq, json!({"n": seq})).await;
    }
    viewer.messages(5).await;
    // What a failover to a lagging replica looks like: the same epoch, an older offset.
    let _: () = redis::cmd("HSET")
        .arg("tl:{fleet}:meta")
        .arg("offset")
        .arg(2)
        .query(&mut redis.connection())
        .unwrap();
    let notice = viewer.expect("subscribed").await;
    assert_eq!(notice["recovered"], false);
    let new_epoch = notice["epoch"].as_str().unwrap().to_owned();
    assert_ne!(
        new_epoch, epoch,
        "offsets 3..5 would be reused: the epoch must change"
    );
    agent.publish(6, json!({"n": 6})).await;
    let message = viewer.expect("message").await;
    assert_eq!(
        (message["epoch"].as_str(), message["offset"].as_u64()),
        (Some(new_epoch.as_str()), Some(3))
    );
}

#[tokio::test]
async fn a_hub_starts_without_redis_and_becomes_ready_when_it_appears() {
    let mut redis = RedisServer::unstarted(false);
    let hub = TestHub::with(|s| {
        s.broker.url = Some(redis.url());
        s.broker.timeout = Duration::from_millis(500);
    })
    .await;
    hub.wait_ready(false).await;
    // Until the hub has read the pool's revocations it cannot tell a revoked token: it takes
    // none, and says why.
    let token = hub.token("v", Role::Viewer);
    let refused = hub.try_connect(&token).await.err().expect("refused");
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (503, Some("revocations_unknown"))
    );
    redis.spawn();
    hub.wait_ready(true).await;
    let mut viewer = hub.connect(&token).await;
    viewer.subscribe("fleet", None).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    // An agent's connect asks Redis for its last seq, as early as Redis is back.
    let errors_before_publish = hub.metric("hub_redis_errors_total").await;
    assert_eq!(agent.publish(1, json!({})).await["type"], "ack");
    assert_eq!(offsets(&viewer.messages(1).await), [1]);
    assert!(
        hub.metric("hub_redis_command_seconds_count").await >= 2.0,
        "Redis commands are timed"
    );
    assert_eq!(
        hub.metric("hub_redis_errors_total").await,
        errors_before_publish,
        "the publish went through"
    );
}

#[tokio::test]
async fn broadcast_routing_delivers_the_same_stream_but_sends_every_hub_everything() {
    let redis = RedisServer::start();
    let broadcast = |s: &mut hub::Settings| s.broker.routing = hub::config::Routing::Broadcast;
    let (a, b) = (
        TestHub::on_redis_with(&redis, broadcast).await,
        TestHub::on_redis_with(&redis, broadcast).await,
    );
    let mut viewer = a.viewer("v", &["devices.pi-1"]).await;
    let _elsewhere = b.viewer("w", &["devices.pi-2"]).await;
    let mut agent = b.agent("pi-1", &[]).await;
    for seq in 1..=20 {
        agent.publish(seq, json!({"n": seq})).await;
    }
    assert_eq!(
        offsets(&viewer.messages(20).await),
        (1..=20).collect::<Vec<_>>()
    );
    // Hub B watches only devices.pi-2, yet receives all of pi-1's readings (devices.pi-1, fleet)
    // and pi-1's presence message.
    b.wait_for_metric("hub_broker_unwanted_messages_total", 41.0)
        .await;
}

#[tokio::test]
async fn a_gap_longer_than_history_delivers_what_history_still_has_after_announcing_the_hole() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis(&redis).await;
    let mut viewer = hub.viewer("v", &["fleet"]).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    agent.publish(1, json!({"n": 1})).await;
    assert_eq!(offsets(&viewer.messages(1).await), [1]);

    // Pub/sub loses offsets 2..=6 and history keeps only the last three of them.
    for _ in 2..=6 {
        append_silently(&redis, "fleet", "ghost");
    }
    let _: i64 = redis::cmd("XTRIM")
        .arg("tl:{fleet}:log")
        .arg("MAXLEN")
        .arg(3)
        .query(&mut redis.connection())
        .unwrap();
    agent.publish(2, json!({"n": 2})).await;

    let hole = viewer.expect("subscribed").await;
    assert_eq!(
        (hole["recovered"].as_bool(), hole["offset"].as_u64()),
        (Some(false), Some(3)),
        "the hub says 2 and 3 are gone for good"
    );
    let rest = viewer.messages(4).await;
    assert_eq!(offsets(&rest), [4, 5, 6, 7]);
    assert_eq!(rest[3]["data"], json!({"n": 2}));
    assert!(hub.metric("hub_history_misses_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_a_busy_channel_still_recovers() {
    let redis = RedisServer::start();
    let (publishing, resuming) = (
        TestHub::on_redis(&redis).await,
        TestHub::on_redis(&redis).await,
    );
    let mut first = publishing.viewer("v", &[]).await;
    let epoch = first.subscribe("fleet", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut agent = publishing.agent("pi-0", &[]).await;
    for seq in 1..=5 {
        agent.publish(seq, json!({"n": seq})).await;
    }
    assert_eq!(offsets(&first.messages(5).await), [1, 2, 3, 4, 5]);
    drop(first);

    // Three agents keep the channel moving while the viewer resumes on the other hub.
    let count = 400;
    let agents: Vec<_> = (1..=3)
        .map(|n| {
            let (addr, token) = (
                publishing.addr,
                publishing.token(&format!("pi-{n}"), Role::Agent),
            );
            tokio::spawn(async move {
                common::publish_all(addr, &token, &format!("pi-{n}"), count, Duration::ZERO).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut resumed = resuming.viewer("v", &[]).await;
    let subscribed = resumed.subscribe("fleet", Some((&epoch, 5))).await;
    assert_eq!(subscribed["recovered"].as_bool(), Some(true));
    for task in agents {
        task.await.unwrap();
    }
    let total = 5 + 3 * count;
    let got = resumed.messages((total - 5) as usize).await;
    assert_eq!(offsets(&got), (6..=total).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_sent_together_are_stored_as_one_and_answered_in_order() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis(&redis).await;
    common::publishes_sent_together_are_stored_as_one_and_answered_in_order(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_silent_past_meta_ttl_starts_over_on_every_channel() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, |s| s.history.meta_ttl = Duration::from_secs(1)).await;
    common::a_device_silent_past_meta_ttl_starts_over_on_every_channel(&hub).await;
}

#[tokio::test]
async fn a_group_named_twice_in_a_token_is_published_to_once() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis(&redis).await;
    let mut group = hub.viewer("v", &["groups.north"]).await;
    let mut agent = hub.agent("pi-1", &["north", "north"]).await;
    assert_eq!(agent.publish(1, json!({"n": 1})).await["type"], "ack");
    assert_eq!(offsets(&group.messages(1).await), [1]);
    assert!(matches!(
        group.next_within(Duration::from_millis(500)).await,
        Event::Timeout
    ));
}

fn pttl(redis: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query(&mut redis.connection())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_to_a_channel_nobody_publishes_leaves_no_lasting_key() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis(&redis).await;
    let mut viewer = hub.viewer("v", &["devices.ghost"]).await;
    let ttl = pttl(&redis, "tl:{devices.ghost}:meta");
    assert!(ttl > 0 && ttl <= 60_000, "PTTL {ttl}");
    let mut agent = hub.agent("pi-1", &[]).await;
    agent.publish(1, json!({"n": 1})).await;
    assert!(
        pttl(&redis, "tl:{fleet}:meta") > 3_600_000,
        "published channels keep meta_ttl"
    );
    viewer
        .send(json!({"type": "unsubscribe", "channel": "devices.ghost"}))
        .await;
    viewer.expect("unsubscribed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_channel_keeps_its_epoch_until_its_first_reading() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, |s| s.history.meta_ttl = Duration::from_secs(2)).await;
    let mut viewer = hub.connect(&hub.token("v", Role::Viewer)).await;
    let epoch = viewer.subscribe("devices.pi-late", None).await["epoch"].clone();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut agent = hub.agent("pi-late", &[]).await;
    agent.publish(1, json!({"n": 1})).await;
    let first = viewer.expect("message").await;
    assert_eq!((&first["epoch"], &first["offset"]), (&epoch, &json!(1)));
}

#[tokio::test]
async fn the_channel_table_of_a_hub_is_bounded() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, |s| s.limits.max_channels = 2).await;
    let mut viewer = hub.viewer("v", &["fleet", "devices.a"]).await;
    viewer
        .send(json!({"type": "subscribe", "channel": "devices.b", "ref": 1}))
        .await;
    let full = viewer.expect("error").await;
    assert_eq!(full["code"], "unavailable");
    assert!(
        full["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_channels")
    );
    viewer
        .send(json!({"type": "unsubscribe", "channel": "devices.a"}))
        .await;
    viewer.expect("unsubscribed").await;
    viewer.subscribe("devices.b", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_whose_replay_would_not_fit_the_queue_is_answered_not_recovered() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, common::small_queue).await;
    common::a_resume_whose_replay_would_not_fit_the_queue_is_answered_not_recovered(&hub).await;
}
