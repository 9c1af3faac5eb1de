//! Publications reach every subscribed channel, in order, and a client that was away resumes
//! with `since` and sees every offset exactly once.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Event, TestHub, offsets};
use hub_protocol::Role;
use serde_json::json;

#[tokio::test]
async fn a_reading_reaches_its_device_the_fleet_and_its_group_channels() {
    let hub = TestHub::start().await;
    let mut device = hub.viewer("v1", &["devices.pi-1"]).await;
    let mut fleet = hub.viewer("v2", &["fleet"]).await;
    let mut group = hub.viewer("v3", &["groups.north"]).await;
    let mut other = hub.viewer("v4", &["devices.pi-2", "groups.south"]).await;
    let mut agent = hub.agent("pi-1", &["north"]).await;
    assert_eq!(agent.hello["last_seq"], 0);

    for seq in 1..=3 {
        let ack = agent
            .publish(seq, json!({"cpu_temp": {"value": 40 + seq, "unit": "C"}}))
            .await;
        assert_eq!(ack, json!({"type": "ack", "seq": seq}));
    }
    for viewer in [&mut device, &mut fleet, &mut group] {
        let got = viewer.messages(3).await;
        assert_eq!(offsets(&got), [1, 2, 3]);
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m["from"], "pi-1");
            assert_eq!(
                m["data"],
                json!({"cpu_temp": {"value": 41 + i, "unit": "C"}})
            );
        }
    }
    assert_eq!(device.messages(0).await.len(), 0);
    assert!(matches!(
        other.next_within(Duration::from_millis(300)).await,
        Event::Timeout
    ));

    assert_eq!(
        hub.metric("hub_publications_total{result=\"accepted\"}")
            .await,
        3.0
    );
    assert_eq!(hub.metric("hub_deliveries_total").await, 9.0);
    assert!(hub.metric("hub_publish_to_deliver_seconds_count").await >= 1.0);
}

#[tokio::test]
async fn an_agent_publishes_as_itself_only_and_viewers_do_not_publish() {
    let hub = TestHub::start().await;
    let mut fleet = hub.viewer("v", &["fleet"]).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    agent
        .send(json!({"type": "publish", "seq": 1, "device": "pi-2", "data": {"t": 1}}))
        .await;
    let refused = agent.expect("error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["seq"].as_u64()),
        (Some("forbidden"), Some(1))
    );
    agent
        .send(json!({"type": "publish", "seq": 2, "device": "pi-1", "data": {"t": 2}}))
        .await;
    assert_eq!(agent.expect("ack").await["seq"], 2);
    agent
        .send(json!({"type": "subscribe", "channel": "fleet"}))
        .await;
    assert_eq!(agent.expect("error").await["code"], "forbidden");

    let mut viewer = hub.connect(&hub.token("pi-1", Role::Viewer)).await;
    assert_eq!(
        viewer.publish(3, json!({"t": 3})).await["code"],
        "forbidden"
    );

    let got = fleet.messages(1).await;
    assert_eq!(
        (got[0]["from"].as_str(), got[0]["data"]["t"].as_u64()),
        (Some("pi-1"), Some(2))
    );
    assert!(matches!(
        fleet.next_within(Duration::from_millis(200)).await,
        Event::Timeout
    ));
}

#[tokio::test]
async fn a_resent_publish_is_acked_but_not_published_twice() {
    let hub = TestHub::start().await;
    let mut fleet = hub.viewer("v", &["fleet"]).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    assert_eq!(
        agent.publish(1, json!({"n": 1})).await,
        json!({"type": "ack", "seq": 1})
    );
    assert_eq!(
        agent.publish(1, json!({"n": 1})).await,
        json!({"type": "ack", "seq": 1, "duplicate": true})
    );
    drop(agent);
    // After a reconnect the hub tells the agent where it stands.
    let mut again = hub.agent("pi-1", &[]).await;
    assert_eq!(again.hello["last_seq"], 1);
    assert_eq!(again.publish(1, json!({"n": 1})).await["duplicate"], true);
    assert_eq!(
        again.publish(2, json!({"n": 2})).await["duplicate"],
        json!(null)
    );
    assert_eq!(offsets(&fleet.messages(2).await), [1, 2]);
    assert!(matches!(
        fleet.next_within(Duration::from_millis(200)).await,
        Event::Timeout
    ));
    assert_eq!(
        hub.metric("hub_publications_total{result=\"duplicate\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn subscribe_since_replays_exactly_the_missed_messages_then_continues_live() {
    let hub = TestHub::start().await;
    let mut agent = hub.agent("pi-1", &[]).await;
    let mut first = hub.connect(&hub.token("dash", Role::Viewer)).await;
    let subscribed = first.subscribe("devices.pi-1", None).await;
    assert_eq!(
        (
            subscribed["offset"].as_u64(),
            subscribed["recovered"].as_bool()
        ),
        (Some(0), Some(false))
    );
    let epoch = subscribed["epoch"].as_str().unwrap().to_owned();
    for seq in 1..=3 {
        agent.publish(seq, json!({"n": seq})).await;
    }
    assert_eq!(offsets(&first.messages(3).await), [1, 2, 3]);
    drop(first);

    for seq in 4..=6 {
        agent.publish(seq, json!({"n": seq})).await;
    }
    let mut back = hub.connect(&hub.token("dash", Role::Viewer)).await;
    let resumed = back.subscribe("devices.pi-1", Some((&epoch, 3))).await;
    assert_eq!(resumed["recovered"], true);
    assert_eq!(resumed["epoch"], epoch.as_str());
    assert_eq!(resumed["offset"], 6);
    agent.publish(7, json!({"n": 7})).await;
    let got = back.messages(4).await;
    assert_eq!(offsets(&got), [4, 5, 6, 7]);
    assert_eq!(got[0]["data"], json!({"n": 4}));
    assert!(matches!(
        back.next_within(Duration::from_millis(200)).await,
        Event::Timeout
    ));

    let mut current = hub.connect(&hub.token("dash", Role::Viewer)).await;
    assert_eq!(
        current.subscribe("devices.pi-1", Some((&epoch, 7))).await["recovered"],
        true
    );
    assert_eq!(
        hub.metric("hub_recoveries_total{result=\"recovered\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn resume_reports_not_recovered_for_a_stale_epoch_or_a_gap_older_than_history() {
    let hub = TestHub::with(|s| s.history.size = 5).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    let mut viewer = hub.viewer("v", &[]).await;
    let epoch = viewer.subscribe("fleet", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    for seq in 1..=20 {
        agent.publish(seq, json!({"n": seq})).await;
    }
    viewer.messages(20).await;

    let mut late = hub.viewer("late", &[]).await;
    let outcome = late.subscribe("fleet", Some((&epoch, 2))).await;
    assert_eq!(
        (outcome["recovered"].as_bool(), outcome["offset"].as_u64()),
        (Some(false), Some(20))
    );
    agent.publish(21, json!({"n": 21})).await;
    assert_eq!(
        offsets(&late.messages(1).await),
        [21],
        "nothing is replayed, live continues"
    );

    let mut stale = hub.viewer("stale", &[]).await;
    assert_eq!(
        stale
            .subscribe("fleet", Some(("0000000000000000", 20)))
            .await["recovered"],
        false
    );
    let mut covered = hub.viewer("covered", &[]).await;
    assert_eq!(
        covered.subscribe("fleet", Some((&epoch, 17))).await["recovered"],
        true
    );
    assert_eq!(offsets(&covered.messages(4).await), [18, 19, 20, 21]);
    assert_eq!(
        hub.metric("hub_recoveries_total{result=\"not_recovered\"}")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_reconnecting_during_a_stream_sees_every_offset_exactly_once() {
    const READINGS: u64 = 300;
    let hub = TestHub::with(|s| s.limits.publish_rate = 100_000.0).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    let publisher = tokio::spawn(async move {
        for seq in 1..=READINGS {
            assert_eq!(agent.publish(seq, json!({"n": seq})).await["type"], "ack");
            if seq % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    let mut seen = Vec::new();
    let mut position: Option<(String, u64)> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.last() != Some(&READINGS) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream did not complete"
        );
        let mut viewer = hub.viewer("v", &[]).await;
        let since = position.as_ref().map(|(e, o)| (e.as_str(), *o));
        let subscribed = viewer.subscribe("devices.pi-1", since).await;
        if position.is_some() {
            assert_eq!(subscribed["recovered"], true);
        }
        let epoch = subscribed["epoch"].as_str().unwrap().to_owned();
        // Take a few messages, then drop the connection mid-stream.
        for _ in 0..37 {
            match viewer.next_within(Duration::from_millis(500)).await {
                Event::Frame(m) => {
                    let offset = m["offset"].as_u64().unwrap();
                    seen.push(offset);
                    position = Some((epoch.clone(), offset));
                }
                _ => break,
            }
            if seen.last() == Some(&READINGS) {
                break;
            }
        }
        if position.is_none() {
            position = Some((epoch, subscribed["offset"].as_u64().unwrap()));
        }
    }
    publisher.await.unwrap();
    let first = seen[0];
    let expected: Vec<u64> = (first..first + seen.len() as u64).collect();
    assert_eq!(
        seen, expected,
        "gapless and duplicate-free across reconnects"
    );
    assert!(
        seen.len() > 100,
        "most of the stream was watched: {}",
        seen.len()
    );
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), seen.len());
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let hub = TestHub::start().await;
    let mut agent = hub.agent("pi-1", &[]).await;
    let mut viewer = hub.viewer("v", &["fleet"]).await;
    agent.publish(1, json!({})).await;
    viewer.messages(1).await;
    viewer
        .send(json!({"type": "unsubscribe", "channel": "fleet"}))
        .await;
    assert_eq!(viewer.expect("unsubscribed").await["channel"], "fleet");
    agent.publish(2, json!({})).await;
    assert!(matches!(
        viewer.next_within(Duration::from_millis(200)).await,
        Event::Timeout
    ));
    viewer
        .send(json!({"type": "unsubscribe", "channel": "fleet", "ref": 7}))
        .await;
    let error = viewer.expect("error").await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_u64()),
        (Some("not_subscribed"), Some(7))
    );
    assert_eq!(hub.metric("hub_subscriptions").await, 0.0);
}

#[tokio::test]
async fn a_ping_behind_a_batch_does_not_hold_its_acks() {
    let hub = TestHub::start().await;
    common::a_ping_behind_a_batch_does_not_hold_its_acks(&hub).await;
}

#[tokio::test]
async fn publishes_sent_together_are_stored_as_one_and_answered_in_order() {
    let hub = TestHub::start().await;
    common::publishes_sent_together_are_stored_as_one_and_answered_in_order(&hub).await;
}

#[tokio::test]
async fn a_device_silent_past_meta_ttl_starts_over_on_every_channel() {
    let hub = TestHub::with(|s| s.history.meta_ttl = Duration::from_secs(1)).await;
    common::a_device_silent_past_meta_ttl_starts_over_on_every_channel(&hub).await;
}

#[tokio::test]
async fn a_group_named_twice_in_a_token_is_published_to_once() {
    let hub = TestHub::start().await;
    let mut group = hub.viewer("v", &["groups.north"]).await;
    let mut agent = hub.agent("pi-1", &["north", "north"]).await;
    assert_eq!(agent.publish(1, json!({"n": 1})).await["type"], "ack");
    assert_eq!(agent.publish(2, json!({"n": 2})).await["type"], "ack");
    assert_eq!(offsets(&group.messages(2).await), [1, 2]);
    assert!(matches!(
        group.next_within(Duration::from_millis(300)).await,
        Event::Timeout
    ));
}
