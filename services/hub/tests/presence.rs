//! Presence: the `presence` channel tells which devices are connected, on one hub and across a
//! pool of hubs, with the reason each went offline.

mod common;

use std::time::Duration;

use common::process::HubProcess;
use common::redis_cluster::RedisCluster;
use common::{Client, Event, RedisServer, TestHub, WAIT};
use fastwebsockets::Frame;
use hub_protocol::Role;
use serde_json::{Value, json};

/// The next `presence` message the viewer gets, other frames skipped.
async fn next_presence(viewer: &mut Client) -> Value {
    next_presence_within(viewer, WAIT).await
}

async fn next_presence_within(viewer: &mut Client, wait: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match viewer.next_within(left).await {
            Event::Frame(f) if f["type"] == "message" && f["channel"] == "presence" => return f,
            Event::Frame(_) => continue,
            other => panic!("no presence message came: {other:?}"),
        }
    }
}

/// `(device, online, hub, reason)` of a presence message, checked against its `from` and time.
fn state(message: &Value) -> (String, bool, String, String) {
    let data = &message["data"];
    assert_eq!(message["from"], data["device"], "{message}");
    let at = data["at"].as_u64().expect("`at` in ms");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        at <= now && now - at < 60_000,
        "`at` is the time of the change: {message}"
    );
    (
        data["device"].as_str().unwrap().to_owned(),
        data["online"].as_bool().unwrap(),
        data["hub"].as_str().unwrap().to_owned(),
        data["reason"].as_str().unwrap().to_owned(),
    )
}

fn expect(
    device: &str,
    online: bool,
    hub: &TestHub,
    reason: &str,
) -> (String, bool, String, String) {
    let node = hub.settings.node_id.clone().unwrap();
    (device.into(), online, node, reason.into())
}

/// A viewer watching `presence` on `watch` sees an agent of `at` come online, then go offline
/// with the reason its connection ended: a close frame, then a link that just broke.
async fn online_then_offline_with_the_reason(watch: &TestHub, at: &TestHub) {
    let mut viewer = watch.viewer("wall", &["presence"]).await;
    let mut agent = at.agent("pi-1", &[]).await;
    let online = next_presence(&mut viewer).await;
    assert_eq!(state(&online), expect("pi-1", true, at, "connected"));
    agent.send_frame(Frame::close(1000, b"bye")).await;
    let offline = next_presence(&mut viewer).await;
    assert_eq!(state(&offline), expect("pi-1", false, at, "peer_closed"));
    assert_eq!(
        offline["offset"].as_u64().unwrap(),
        online["offset"].as_u64().unwrap() + 1,
        "presence is a channel like the others: one offset per change"
    );

    let broken = at.agent("pi-2", &[]).await;
    assert_eq!(
        state(&next_presence(&mut viewer).await),
        expect("pi-2", true, at, "connected")
    );
    drop(broken);
    assert_eq!(
        state(&next_presence(&mut viewer).await),
        expect("pi-2", false, at, "connection_lost")
    );
}

/// A device connected twice (to `first` and to `second`, which may be one hub) is online from
/// its first connection until its last one ends; the first one ending says nothing.
async fn a_device_connected_twice_is_online_until_both_close(
    watch: &TestHub,
    first: &TestHub,
    second: &TestHub,
) {
    let mut viewer = watch.viewer("wall", &["presence"]).await;
    let old_link = first.agent("pi-9", &[]).await;
    assert_eq!(
        state(&next_presence(&mut viewer).await),
        expect("pi-9", true, first, "connected")
    );
    let new_link = second.agent("pi-9", &[]).await;
    let agents = "hub_connections{role=\"agent\"}";
    let open = first.metric(agents).await;
    drop(old_link);
    first.wait_for_metric(agents, open - 1.0).await;
    // A marker device: anything said about pi-9 in between would come before it.
    let marker = first.agent("marker", &[]).await;
    assert_eq!(
        state(&next_presence(&mut viewer).await),
        expect("marker", true, first, "connected"),
        "pi-9 still has a connection: nothing is said about it"
    );
    drop(new_link);
    assert_eq!(
        state(&next_presence(&mut viewer).await),
        expect("pi-9", false, second, "connection_lost")
    );
    drop(marker);
}

/// Presence needs the channel in a viewer's token like any other.
async fn presence_is_a_channel_a_token_must_grant(hub: &TestHub) {
    let mut request = hub::token::TokenRequest::new("wall", Role::Viewer);
    request.channels = vec!["fleet".into()];
    let mut viewer = hub.connect(&hub.token_for(request)).await;
    viewer
        .send(json!({"type": "subscribe", "channel": "presence", "ref": 1}))
        .await;
    let refused = viewer.expect("error").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
}

#[tokio::test]
async fn embedded_agents_come_online_and_go_offline_with_the_reason() {
    let hub = TestHub::start().await;
    online_then_offline_with_the_reason(&hub, &hub).await;
    presence_is_a_channel_a_token_must_grant(&hub).await;
}

#[tokio::test]
async fn embedded_a_device_connected_twice_is_online_until_both_close() {
    let hub = TestHub::start().await;
    a_device_connected_twice_is_online_until_both_close(&hub, &hub, &hub).await;
}

#[tokio::test]
async fn embedded_presence_takes_no_room_in_the_channel_table() {
    let hub = TestHub::start().await;
    let _viewer = hub.viewer("wall", &["presence"]).await;
    let _agent = hub.agent("pi-1", &[]).await;
    assert_eq!(hub.metric("hub_channels").await, 0.0);
}

/// Hubs of one pool, each with its own node id and a quick presence lease.
async fn pool_hub(redis: &RedisServer, node: &str) -> TestHub {
    let node = node.to_owned();
    TestHub::on_redis_with(redis, |s| {
        s.node_id = Some(node);
        s.presence.heartbeat = Duration::from_millis(100);
        s.presence.hub_ttl = Duration::from_millis(500);
    })
    .await
}

#[tokio::test]
async fn pool_an_agent_on_one_hub_is_seen_online_and_offline_through_another() {
    let redis = RedisServer::start();
    let a = pool_hub(&redis, "hub-a").await;
    let b = pool_hub(&redis, "hub-b").await;
    online_then_offline_with_the_reason(&a, &b).await;
    presence_is_a_channel_a_token_must_grant(&a).await;
}

#[tokio::test]
async fn pool_a_device_on_two_hubs_is_online_until_both_connections_close() {
    let redis = RedisServer::start();
    let a = pool_hub(&redis, "hub-a").await;
    let b = pool_hub(&redis, "hub-b").await;
    a_device_connected_twice_is_online_until_both_close(&a, &a, &b).await;
    a_device_connected_twice_is_online_until_both_close(&a, &b, &b).await;
}

#[tokio::test]
async fn pool_a_killed_hubs_devices_go_offline_within_the_lease_and_a_beat() {
    let redis = RedisServer::start();
    let watch = pool_hub(&redis, "hub-a").await;
    let mut viewer = watch.viewer("wall", &["presence"]).await;
    let url = redis.url();
    let victim = HubProcess::start_with(&[
        ("HUB_BROKER__URL", &url),
        ("HUB_NODE_ID", "hub-victim"),
        ("HUB_PRESENCE__HEARTBEAT", "100ms"),
        ("HUB_PRESENCE__HUB_TTL", "500ms"),
    ]);
    let token = watch.token("pi-k", Role::Agent);
    let _agent = common::connect(victim.addr, &format!("/ws?token={token}"), None)
        .await
        .unwrap();
    let online = state(&next_presence(&mut viewer).await);
    assert_eq!(
        online,
        ("pi-k".into(), true, "hub-victim".into(), "connected".into())
    );

    victim.signal("KILL");
    let killed = tokio::time::Instant::now();
    let offline = next_presence(&mut viewer).await;
    let took = killed.elapsed();
    assert_eq!(
        state(&offline),
        ("pi-k".into(), false, "hub-victim".into(), "hub_gone".into())
    );
    // hub_ttl (500 ms) + a surviving hub's heartbeat (100 ms), with room for a busy machine.
    assert!(
        took < Duration::from_millis(2_000),
        "offline after {took:?}"
    );
}

#[tokio::test]
async fn pool_a_hub_that_drains_takes_its_devices_offline_at_once() {
    let redis = RedisServer::start();
    let watch = pool_hub(&redis, "hub-a").await;
    let mut viewer = watch.viewer("wall", &["presence"]).await;
    // A lease far longer than the test: only the drain can end it in time.
    let leaving = TestHub::on_redis_with(&redis, |s| {
        s.node_id = Some("hub-leaving".into());
        s.presence.hub_ttl = Duration::from_secs(60);
    })
    .await;
    let _agent = leaving.agent("pi-d", &[]).await;
    assert!(state(&next_presence(&mut viewer).await).1);
    leaving.shutdown().await;
    assert_eq!(
        state(&next_presence_within(&mut viewer, Duration::from_secs(3)).await),
        (
            "pi-d".into(),
            false,
            "hub-leaving".into(),
            "service_restart".into()
        )
    );
}

#[tokio::test]
async fn pool_a_hub_taken_for_dead_announces_its_devices_again() {
    let redis = RedisServer::start();
    let a = pool_hub(&redis, "hub-a").await;
    let b = pool_hub(&redis, "hub-b").await;
    let mut viewer = a.viewer("wall", &["presence"]).await;
    let _agent = b.agent("pi-s", &[]).await;
    assert!(state(&next_presence(&mut viewer).await).1);
    // As if hub-b had been cut off from Redis past its lease: the others take it for dead.
    let mut redis_conn = redis.connection();
    let hubs: Vec<String> = redis::cmd("ZRANGE")
        .arg("tl:{presence}:hubs")
        .arg(0)
        .arg(-1)
        .query(&mut redis_conn)
        .unwrap();
    let instance = hubs
        .iter()
        .find(|h| h.starts_with("hub-b/"))
        .expect("hub-b holds a lease");
    let _: () = redis::cmd("ZADD")
        .arg("tl:{presence}:hubs")
        .arg(0)
        .arg(instance)
        .query(&mut redis_conn)
        .unwrap();
    assert_eq!(
        state(&next_presence(&mut viewer).await),
        ("pi-s".into(), false, "hub-b".into(), "hub_gone".into())
    );
    assert_eq!(
        state(&next_presence(&mut viewer).await),
        expect("pi-s", true, &b, "connected"),
        "the device is still connected to hub-b, which says so again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_presence_works_across_hubs_as_on_one_redis() {
    let cluster = RedisCluster::start(3);
    let hub = |node: &'static str| {
        TestHub::on_cluster_with(&cluster, move |s| {
            s.node_id = Some(node.into());
            // `fleet` split as in production: presence is one channel all the same.
            s.broker.partitions = None;
            s.presence.heartbeat = Duration::from_millis(100);
            s.presence.hub_ttl = Duration::from_millis(500);
        })
    };
    let a = hub("hub-a").await;
    let b = hub("hub-b").await;
    online_then_offline_with_the_reason(&a, &b).await;
    a_device_connected_twice_is_online_until_both_close(&a, &a, &b).await;
}
