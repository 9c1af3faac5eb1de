//! Conflated subscriptions: `"max_rate": r` gives each device's latest message at most `r` times
//! a second, and a viewer that falls behind sees fewer values instead of being cut off.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Event, RedisServer, TestHub, connect_with};
use hub_protocol::Role;
use serde_json::{Value, json};

const READINGS: u64 = 1500;

/// A viewer whose socket takes a few kilobytes and who does not read while it is sent to.
async fn stalled_viewer(hub: &TestHub, subscribe: Value) -> Client {
    let token = hub.token("wall", Role::Viewer);
    let mut viewer = connect_with(hub.addr, &format!("/ws?token={token}"), None, Some(4096))
        .await
        .unwrap();
    viewer.send(subscribe).await;
    assert_eq!(viewer.expect("subscribed").await["channel"], "fleet");
    viewer
}

/// One device publishes 1,500 readings at about 500/s. A viewer of `fleet` with `max_rate: 2`
/// that does not read meanwhile is not cut off, then gets about two messages a second (each
/// with its real offset) ending with the device's last reading; an exact viewer in the same
/// place is closed as a slow consumer.
async fn a_conflated_viewer_gets_the_latest_values_at_its_rate_and_is_never_cut_off(hub: &TestHub) {
    let mut conflated = stalled_viewer(
        hub,
        json!({"type": "subscribe", "channel": "fleet", "max_rate": 2}),
    )
    .await;
    let mut exact = stalled_viewer(hub, json!({"type": "subscribe", "channel": "fleet"})).await;
    let mut agent = hub.agent("pi-fast", &[]).await;
    // A second device now and then: pending messages of several devices go out in the order
    // they came, so offsets still only grow.
    let mut other = hub.agent("pi-other", &[]).await;
    let started = Instant::now();
    let pad = "x".repeat(500);
    for seq in 1..=READINGS {
        let reading = json!({"n": seq, "pad": pad});
        assert_eq!(agent.publish(seq, reading).await["type"], "ack");
        if seq % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if seq % 50 == 0 {
            let ack = other.publish(seq / 50, json!({"other": seq})).await;
            assert_eq!(ack["type"], "ack");
        }
    }
    // The exact viewer fell behind and was cut: by a 4008 it may still read, or just EOF.
    loop {
        match exact.next_within(Duration::from_secs(5)).await {
            Event::Frame(_) => continue,
            Event::Closed(code) => {
                assert_eq!(code, 4008);
                break;
            }
            Event::Gone => break,
            Event::Timeout => panic!("the exact viewer was never cut off"),
        }
    }
    assert_eq!(hub.metric("hub_slow_consumer_disconnects_total").await, 1.0);

    let mut got: Vec<Value> = Vec::new();
    loop {
        match conflated.next_within(Duration::from_secs(2)).await {
            Event::Frame(f) if f["type"] == "message" => {
                let last = f["data"]["n"] == READINGS;
                got.push(f);
                if last {
                    break;
                }
            }
            other => panic!("the conflated viewer lost its stream: {other:?}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let offsets: Vec<u64> = got.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "in order, real offsets: {offsets:?}"
    );
    assert!(
        (got.len() as f64) <= 2.0 * 2.0 * elapsed + 3.0,
        "{} messages of two devices in {elapsed:.1} s at max_rate 2",
        got.len()
    );
    assert!(
        hub.metric("hub_conflated_messages_total").await >= (READINGS as f64) * 0.9,
        "nearly every reading was replaced by a newer one instead of queued"
    );
    // Still subscribed and open: the next reading arrives too.
    assert_eq!(
        agent
            .publish(READINGS + 1, json!({"n": READINGS + 1}))
            .await["type"],
        "ack"
    );
    loop {
        let next = conflated.expect("message").await;
        if next["from"] == "pi-fast" {
            assert_eq!(next["data"]["n"], READINGS + 1);
            break;
        }
    }
}

/// With a snapshot, a conflated fleet view is complete at once, then conflated.
async fn a_conflated_subscription_can_start_with_a_snapshot(hub: &TestHub) {
    for d in 0..3 {
        let mut agent = hub.agent(&format!("pi-{d}"), &[]).await;
        assert_eq!(agent.publish(1, json!({"n": d})).await["type"], "ack");
    }
    let mut viewer = hub.viewer("wall", &[]).await;
    viewer
        .send(json!({"type": "subscribe", "channel": "fleet", "snapshot": true, "max_rate": 1}))
        .await;
    viewer.expect("subscribed").await;
    let snapshot = viewer.expect("snapshot").await;
    let from: Vec<&str> = snapshot["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["from"].as_str().unwrap())
        .collect();
    for d in ["pi-0", "pi-1", "pi-2"] {
        assert!(from.contains(&d), "{d} in {from:?}");
    }
    viewer
        .send(json!({"type": "unsubscribe", "channel": "fleet"}))
        .await;
    viewer.expect("unsubscribed").await;
}

/// A conflated subscribe's snapshot is cut to what the viewer's connection may queue, like an
/// exact one's, and is not the reason the connection closes (its feed would take 8 MiB).
async fn a_conflated_snapshot_fits_the_connection(hub: &TestHub) {
    let pad = "y".repeat(900);
    for d in 0..150 {
        let mut agent = hub.agent(&format!("pi-big-{d}"), &[]).await;
        let ack = agent.publish(1, json!({"n": d, "pad": pad})).await;
        assert_eq!(ack["type"], "ack");
    }
    let mut viewer = hub.viewer("wall-big", &[]).await;
    viewer
        .send(json!({"type": "subscribe", "channel": "fleet", "snapshot": true, "max_rate": 2}))
        .await;
    assert_eq!(viewer.expect("subscribed").await["recovered"], true);
    let mut bytes = 0;
    loop {
        let snapshot = viewer.expect("snapshot").await;
        bytes += snapshot.to_string().len();
        if snapshot["more"] != true {
            assert_eq!(snapshot["truncated"], true, "150 KB do not fit in 32 KiB");
            break;
        }
    }
    let budget = hub.settings.limits.outbound_queue_bytes / 2;
    assert!(bytes <= budget + 1024, "{bytes} bytes of snapshot");
    // Still open, and conflated live values follow.
    let mut agent = hub.agent("pi-big-0", &[]).await;
    assert_eq!(agent.publish(2, json!({"n": 1000})).await["type"], "ack");
    let next = viewer.expect("message").await;
    assert_eq!(next["data"]["n"], 1000);
}

#[tokio::test]
async fn embedded_a_conflated_snapshot_fits_the_connection() {
    let hub = TestHub::with(small_queue).await;
    a_conflated_snapshot_fits_the_connection(&hub).await;
}

#[tokio::test]
async fn redis_a_conflated_snapshot_fits_the_connection() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, small_queue).await;
    a_conflated_snapshot_fits_the_connection(&hub).await;
}

fn small_queue(s: &mut hub::Settings) {
    s.limits.max_message_bytes = 16 * 1024;
    s.limits.outbound_queue_bytes = 64 * 1024;
}

fn fast_publishers(s: &mut hub::Settings) {
    s.limits.publish_rate = 100_000.0;
    s.limits.outbound_queue = 64;
    s.limits.socket_send_buffer = Some(4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_conflated_viewer_gets_the_latest_values_at_its_rate() {
    let hub = TestHub::with(fast_publishers).await;
    a_conflated_viewer_gets_the_latest_values_at_its_rate_and_is_never_cut_off(&hub).await;
    a_conflated_subscription_can_start_with_a_snapshot(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_conflated_viewer_gets_the_latest_values_at_its_rate() {
    let redis = RedisServer::start();
    let hub = TestHub::on_redis_with(&redis, fast_publishers).await;
    a_conflated_viewer_gets_the_latest_values_at_its_rate_and_is_never_cut_off(&hub).await;
    a_conflated_subscription_can_start_with_a_snapshot(&hub).await;
}

#[tokio::test]
async fn a_max_rate_out_of_range_is_refused() {
    let hub = TestHub::start().await;
    let mut viewer = hub.viewer("wall", &[]).await;
    for rate in [json!(0), json!(1000), json!(-1)] {
        viewer
            .send(json!({"type": "subscribe", "channel": "fleet", "max_rate": rate}))
            .await;
        let refused = viewer.expect("error").await;
        assert_eq!(refused["code"], "bad_frame", "{refused}");
    }
}
