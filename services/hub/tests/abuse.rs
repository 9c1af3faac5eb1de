//! Bad input, floods and slow consumers: each gets its documented error or close code, and the hub
//! keeps serving everyone else.

mod common;

use std::time::Duration;

use common::{Event, TestHub, offsets};
use fastwebsockets::{Frame, OpCode, Payload};
use hub_protocol::Role;
use serde_json::{Value, json};

/// The hub still serves a new client end to end.
async fn assert_healthy(hub: &TestHub) {
    assert_eq!(hub.get("/healthz").await.0, 200);
    let mut viewer = hub.viewer("probe", &["devices.probe"]).await;
    let mut agent = hub.agent("probe", &[]).await;
    let seq = agent.hello["last_seq"].as_u64().unwrap() + 1;
    assert_eq!(agent.publish(seq, json!({"ok": true})).await["type"], "ack");
    assert_eq!(viewer.expect("message").await["data"], json!({"ok": true}));
}

#[tokio::test]
async fn malformed_frames_get_an_error_and_the_connection_stays_open() {
    let hub = TestHub::start().await;
    let mut client = hub.viewer("v", &[]).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    for (text, code) in [
        ("{not json", "bad_frame"),
        ("[1,2,3]", "bad_frame"),
        (r#"{"channel":"fleet"}"#, "bad_frame"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"type":"subscribe"}"#, "bad_frame"),
        (
            r#"{"type":"subscribe","channel":"bad channel!"}"#,
            "invalid_channel",
        ),
        (
            r#"{"type":"subscribe","channel":"fleet","since":{"epoch":1}}"#,
            "bad_frame",
        ),
    ] {
        client.send_text(text).await;
        let error = client.expect("error").await;
        assert_eq!(error["code"], code, "for {text}");
        assert!(!error["message"].as_str().unwrap().is_empty());
    }
    for (text, code) in [
        (r#"{"type":"publish","seq":1,"data":[1]}"#, "bad_frame"),
        (r#"{"type":"publish","seq":1,"data":"warm"}"#, "bad_frame"),
        (r#"{"type":"publish","data":{}}"#, "bad_frame"),
        (r#"{"type":"publish","seq":-4,"data":{}}"#, "bad_frame"),
    ] {
        agent.send_text(text).await;
        assert_eq!(agent.expect("error").await["code"], code, "for {text}");
    }
    client.subscribe("fleet", None).await;
    assert_eq!(agent.publish(1, json!({"v": 1})).await["type"], "ack");
    assert_eq!(client.expect("message").await["data"], json!({"v": 1}));
}

#[tokio::test]
async fn errors_for_frames_that_do_not_decode_still_echo_their_ref_and_seq() {
    let hub = TestHub::start().await;
    let mut viewer = hub.viewer("v", &[]).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    viewer.send_text(r#"{"type":"dance","ref":{"n":7}}"#).await;
    let error = viewer.expect("error").await;
    assert_eq!(
        (&error["code"], &error["ref"]),
        (&json!("unknown_type"), &json!({"n": 7}))
    );
    viewer.send_text(r#"{"type":"subscribe","ref":"s1"}"#).await;
    let error = viewer.expect("error").await;
    assert_eq!(
        (&error["code"], &error["ref"]),
        (&json!("bad_frame"), &json!("s1"))
    );

    agent
        .send_text(r#"{"type":"publish","seq":9,"data":[1],"ref":3}"#)
        .await;
    let error = agent.expect("error").await;
    assert_eq!(
        (&error["code"], &error["seq"], &error["ref"]),
        (&json!("bad_frame"), &json!(9), &json!(3))
    );
}

#[tokio::test]
async fn a_seq_outside_1_to_2_pow_53_minus_1_is_refused_and_cannot_wedge_the_device() {
    let hub = TestHub::start().await;
    let mut agent = hub.agent("pi-1", &[]).await;
    for seq in [0, hub_protocol::MAX_SEQ + 1, u64::MAX] {
        let reply = agent.publish(seq, json!({"v": 1})).await;
        assert_eq!(
            (&reply["code"], &reply["seq"]),
            (&json!("bad_frame"), &json!(seq)),
            "{seq}"
        );
    }
    assert_eq!(agent.publish(1, json!({"v": 1})).await["type"], "ack");
    let again = hub.agent("pi-1", &[]).await;
    assert_eq!(
        again.hello["last_seq"], 1,
        "nothing out of range was remembered"
    );
}

#[tokio::test]
async fn a_ref_longer_than_256_bytes_is_refused_without_being_echoed() {
    let hub = TestHub::start().await;
    let mut viewer = hub.viewer("v", &[]).await;
    let long = "x".repeat(64 * 1024 - 100);
    viewer
        .send(json!({"type": "subscribe", "channel": "fleet", "ref": long}))
        .await;
    let error = viewer.expect("error").await;
    assert_eq!(error["code"], "bad_frame");
    assert!(error.get("ref").is_none());
    assert!(error.to_string().len() < 512, "{error}");
}

#[tokio::test]
async fn a_binary_frame_is_closed_with_1003() {
    let hub = TestHub::start().await;
    let mut client = hub.viewer("v", &["fleet"]).await;
    client
        .send_frame(Frame::binary(Payload::Borrowed(b"\x00\x01")))
        .await;
    assert_eq!(client.expect_close().await, 1003);
    assert_healthy(&hub).await;
    hub.wait_for_metric("hub_disconnects_total{reason=\"unsupported_data\"}", 1.0)
        .await;
}

#[tokio::test]
async fn an_oversize_message_is_closed_with_1009_whole_or_fragmented() {
    let hub = TestHub::with(|s| s.limits.max_message_bytes = 1024).await;
    let mut exact = hub.agent("pi-1", &[]).await;
    let fits = format!(
        r#"{{"type":"publish","seq":1,"data":{{"pad":"{}"}}}}"#,
        "x".repeat(1024 - 44)
    );
    assert_eq!(fits.len(), 1024);
    exact.send_text(&fits).await;
    assert_eq!(exact.expect("ack").await["seq"], 1);

    let mut whole = hub.viewer("v1", &[]).await;
    whole
        .send_text(&format!(
            r#"{{"type":"subscribe","channel":"{}"}}"#,
            "x".repeat(2000)
        ))
        .await;
    assert_eq!(whole.expect_close().await, 1009);

    // Each fragment is small; together they pass the limit.
    let mut fragmented = hub.viewer("v2", &[]).await;
    let part = vec![b' '; 600];
    fragmented
        .send_frame(Frame::new(
            false,
            OpCode::Text,
            None,
            Payload::Borrowed(&part),
        ))
        .await;
    fragmented
        .send_frame(Frame::new(
            false,
            OpCode::Continuation,
            None,
            Payload::Borrowed(&part),
        ))
        .await;
    assert_eq!(fragmented.expect_close().await, 1009);
    assert_healthy(&hub).await;
}

#[tokio::test]
async fn fragmented_messages_within_the_limit_are_joined() {
    let hub = TestHub::start().await;
    let mut client = hub.viewer("v", &[]).await;
    let text = br#"{"type":"subscribe","channel":"fleet"}"#;
    client
        .send_frame(Frame::new(
            false,
            OpCode::Text,
            None,
            Payload::Borrowed(&text[..10]),
        ))
        .await;
    client
        .send_frame(Frame::new(
            false,
            OpCode::Continuation,
            None,
            Payload::Borrowed(&text[10..20]),
        ))
        .await;
    client
        .send_frame(Frame::new(
            true,
            OpCode::Continuation,
            None,
            Payload::Borrowed(&text[20..]),
        ))
        .await;
    assert_eq!(client.expect("subscribed").await["channel"], "fleet");
}

#[tokio::test]
async fn subscriptions_past_the_limit_are_refused() {
    let hub = TestHub::with(|s| s.limits.max_subscriptions = 2).await;
    let mut client = hub.viewer("v", &["fleet", "devices.a"]).await;
    client
        .send(json!({"type": "subscribe", "channel": "devices.b", "ref": "third"}))
        .await;
    let error = client.expect("error").await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("too_many_subscriptions"), Some("third"))
    );
    client
        .send(json!({"type": "subscribe", "channel": "fleet"}))
        .await;
    assert_eq!(client.expect("error").await["code"], "already_subscribed");
    client
        .send(json!({"type": "unsubscribe", "channel": "devices.a"}))
        .await;
    client.expect("unsubscribed").await;
    client.subscribe("devices.b", None).await;
}

#[tokio::test]
async fn a_publish_flood_is_refused_then_cut_off_with_4029() {
    let hub = TestHub::with(|s| {
        s.limits.publish_rate = 5.0;
        s.limits.publish_burst = 5;
    })
    .await;
    let mut fleet = hub.viewer("v", &["fleet"]).await;
    let mut agent = hub.agent("flood", &[]).await;
    for seq in 1..=40 {
        agent
            .send(json!({"type": "publish", "seq": seq, "data": {"n": seq}}))
            .await;
    }
    let (mut acked, mut limited) = (0, 0);
    let code = loop {
        match agent.next().await {
            Event::Frame(f) if f["type"] == "ack" => acked += 1,
            Event::Frame(f) if f["code"] == "rate_limited" => limited += 1,
            Event::Closed(code) => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, 4029);
    assert!(acked >= 5, "the burst is accepted: {acked}");
    assert!(
        limited >= 1,
        "refusals are explained before the cut: {limited}"
    );
    assert_eq!(
        fleet.messages(acked).await.len(),
        acked,
        "every acked reading was delivered"
    );
    assert!(matches!(
        fleet.next_within(Duration::from_millis(200)).await,
        Event::Timeout
    ));
    assert_healthy(&hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_while_100_fast_ones_receive_everything() {
    const READINGS: u64 = 400;
    let hub = TestHub::with(|s| {
        s.limits.outbound_queue = 32;
        s.limits.socket_send_buffer = Some(32 * 1024);
        s.limits.publish_rate = 100_000.0;
    })
    .await;
    let mut fast = Vec::new();
    for i in 0..100 {
        fast.push(hub.viewer(&format!("fast-{i}"), &["fleet"]).await);
    }
    let path = format!("/ws?token={}", hub.token("slow", Role::Viewer));
    let mut slow = common::connect_with(hub.addr, &path, None, Some(4096))
        .await
        .unwrap();
    slow.subscribe("fleet", None).await;
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut viewer| {
            tokio::spawn(async move {
                let got = viewer.messages(READINGS as usize).await;
                common::offsets(&got)
            })
        })
        .collect();

    let mut agent = hub.agent("pi-1", &[]).await;
    let pad = "x".repeat(2048);
    for seq in 1..=READINGS {
        assert_eq!(
            agent.publish(seq, json!({"n": seq, "pad": pad})).await["type"],
            "ack"
        );
    }
    for reader in readers {
        assert_eq!(reader.await.unwrap(), (1..=READINGS).collect::<Vec<_>>());
    }
    assert!(hub.metric("hub_delivery_drops_total").await >= 1.0);
    hub.wait_for_metric("hub_slow_consumer_disconnects_total", 1.0)
        .await;
    // The slow one finds its stream ended: by a 4008 close if it reads in time, else by EOF.
    let end = loop {
        match slow.next().await {
            Event::Frame(_) => continue,
            other => break other,
        }
    };
    assert!(matches!(end, Event::Closed(4008) | Event::Gone), "{end:?}");
    assert_healthy(&hub).await;
}

#[tokio::test]
async fn connections_past_the_cap_or_the_connect_rate_are_refused() {
    let capped = TestHub::with(|s| s.limits.max_connections = 2).await;
    let _a = capped.viewer("a", &[]).await;
    let b = capped.viewer("b", &[]).await;
    let refused = capped
        .try_connect(&capped.token("c", Role::Viewer))
        .await
        .err()
        .unwrap();
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (503, Some("max_connections"))
    );
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    capped.viewer("c", &[]).await;

    let throttled = TestHub::with(|s| {
        s.limits.connect_rate = 0.01;
        s.limits.connect_burst = 3;
    })
    .await;
    for i in 0..3 {
        throttled.viewer(&format!("v{i}"), &[]).await;
    }
    let refused = throttled
        .try_connect(&throttled.token("v4", Role::Viewer))
        .await
        .err()
        .unwrap();
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (429, Some("connect_rate"))
    );
    assert_eq!(
        throttled
            .metric("hub_connections_refused_total{reason=\"connect_rate\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_flood_of_upgrades_without_a_valid_token_does_not_use_up_the_connect_rate() {
    let hub = TestHub::with(|s| {
        s.limits.connect_rate = 0.01;
        s.limits.connect_burst = 3;
    })
    .await;
    let forged = common::sign_with(
        &common::claims("pi-forged", "agent", hub::token::unix_now() + 600),
        jsonwebtoken::Algorithm::HS256,
        "not-the-hub-secret-not-the-hub-secret",
    );
    for i in 0..40 {
        let path = if i % 2 == 0 {
            "/ws".to_owned()
        } else {
            format!("/ws?token={forged}")
        };
        let refused = common::connect(hub.addr, &path, None).await.err().unwrap();
        assert_eq!(refused.status, 401, "{:?}", refused.body);
    }
    // The devices reconnecting after an outage still get the whole budget.
    for i in 0..3 {
        hub.agent(&format!("pi-{i}"), &[]).await;
    }
    let refused = hub
        .try_connect(&hub.token("pi-3", Role::Agent))
        .await
        .err()
        .unwrap();
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (429, Some("connect_rate"))
    );
}

#[tokio::test]
async fn one_identity_cannot_take_more_than_its_share_of_connections() {
    let hub = TestHub::with(|s| {
        s.limits.max_connections_per_agent = 2;
        s.limits.max_connections_per_viewer = 3;
    })
    .await;
    let agents = [hub.agent("pi-1", &[]).await, hub.agent("pi-1", &[]).await];
    let mut viewers = Vec::new();
    for _ in 0..3 {
        viewers.push(hub.viewer("wall", &[]).await);
    }
    for (token, what) in [
        (hub.token("pi-1", Role::Agent), "a third connection of pi-1"),
        (
            hub.token("wall", Role::Viewer),
            "a fourth connection of wall",
        ),
    ] {
        let refused = hub.try_connect(&token).await.err().unwrap();
        assert_eq!(
            (refused.status, refused.body["error"].as_str()),
            (429, Some("identity_connections")),
            "{what}"
        );
    }
    hub.agent("pi-2", &[]).await;
    hub.viewer("other", &[]).await;
    drop(agents);
    drop(viewers.pop());
    // A closed connection gives its share back once the hub has seen it go.
    for (token, role) in [
        (hub.token("pi-1", Role::Agent), "agent"),
        (hub.token("wall", Role::Viewer), "viewer"),
    ] {
        let deadline = tokio::time::Instant::now() + common::WAIT;
        while hub.try_connect(&token).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the {role} share came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        hub.metric("hub_connections_refused_total{reason=\"identity_connections\"}")
            .await
            >= 2.0
    );
}

#[tokio::test]
async fn a_device_gets_its_publish_rate_once_across_all_its_connections() {
    let hub = TestHub::with(|s| {
        s.limits.publish_rate = 0.001;
        s.limits.publish_burst = 5;
    })
    .await;
    let mut first = hub.agent("pi-1", &[]).await;
    let mut second = hub.agent("pi-1", &[]).await;
    let mut acked = 0;
    for seq in 1..=10u64 {
        let agent = if seq % 2 == 0 {
            &mut first
        } else {
            &mut second
        };
        match agent.publish(seq, json!({"n": seq})).await["type"].as_str() {
            Some("ack") => acked += 1,
            _ => break,
        }
    }
    assert_eq!(acked, 5, "the burst is the device's, not each connection's");
    let mut other = hub.agent("pi-2", &[]).await;
    assert_eq!(other.publish(1, json!({"n": 1})).await["type"], "ack");
}

#[tokio::test]
async fn a_peer_that_sends_its_own_pings_is_alive_without_answering_the_hubs() {
    let hub = TestHub::with(|s| {
        s.ws.ping_interval = Duration::from_millis(200);
        s.ws.pong_timeout = Duration::from_millis(300);
    })
    .await;
    let mut pinger = hub.viewer("pinger", &["fleet"]).await;
    pinger.ws.set_auto_pong(false);
    let until = tokio::time::Instant::now() + Duration::from_millis(2000);
    while tokio::time::Instant::now() < until {
        pinger
            .send_frame(Frame::new(
                true,
                OpCode::Ping,
                None,
                Payload::Borrowed(b"hi"),
            ))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still open: it answers what it is sent.
    let mut agent = hub.agent("pi-1", &[]).await;
    agent.publish(1, json!({"n": 1})).await;
    loop {
        match pinger.next().await {
            Event::Frame(f) if f["type"] == "message" => break,
            Event::Frame(_) => continue,
            other => panic!("the pinging client was closed: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed_with_4002() {
    let hub = TestHub::with(|s| {
        s.ws.ping_interval = Duration::from_millis(200);
        s.ws.pong_timeout = Duration::from_millis(300);
    })
    .await;
    let mut live = hub.viewer("live", &["fleet"]).await;
    let mut silent = hub.viewer("silent", &["fleet"]).await;
    silent.ws.set_auto_pong(false);
    // `live` keeps reading (and so answering pings) for well past the timeout.
    assert!(matches!(
        live.next_within(Duration::from_millis(1500)).await,
        Event::Timeout
    ));
    // `silent` read nothing meanwhile, so it answered no ping.
    assert_eq!(silent.expect_close().await, 4002);
    assert!(matches!(
        live.next_within(Duration::from_millis(300)).await,
        Event::Timeout
    ));
}

#[tokio::test]
async fn after_a_refused_publish_later_seqs_are_refused_until_it_is_resent() {
    let hub = TestHub::with(|s| {
        s.limits.publish_rate = 20.0;
        s.limits.publish_burst = 2;
    })
    .await;
    let mut fleet = hub.viewer("v", &["fleet"]).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    // Pipelined: the burst takes 1 and 2; 3 is rate limited, so 4 must not overtake it (3 would
    // then count as a duplicate and be lost).
    for seq in 1..=4 {
        agent
            .send(json!({"type": "publish", "seq": seq, "data": {"n": seq}}))
            .await;
    }
    let mut replies = Vec::new();
    for _ in 1..=4 {
        let Event::Frame(f) = agent.next().await else {
            panic!("the agent's connection ended");
        };
        replies.push((f["seq"].as_u64(), f["type"].clone(), f["code"].clone()));
    }
    assert_eq!(
        replies,
        [
            (Some(1), json!("ack"), Value::Null),
            (Some(2), json!("ack"), Value::Null),
            (Some(3), json!("error"), json!("rate_limited")),
            (Some(4), json!("error"), json!("rate_limited")),
        ]
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    for seq in 3..=4 {
        let reply = agent.publish(seq, json!({"n": seq})).await;
        assert_eq!(
            (reply["type"].as_str(), reply["seq"].as_u64()),
            (Some("ack"), Some(seq))
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(offsets(&fleet.messages(4).await), [1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_stops_reading_cannot_pin_memory_with_replays() {
    let hub = TestHub::with(|s| {
        s.limits.outbound_queue_bytes = 1024 * 1024;
        s.limits.socket_send_buffer = Some(32 * 1024);
        s.limits.publish_rate = 100_000.0;
    })
    .await;
    let mut agent = hub.agent("pi-1", &[]).await;
    let pad = "x".repeat(1000);
    for seq in 1..=400 {
        agent.publish(seq, json!({"n": seq, "pad": pad})).await;
    }
    let epoch = hub.viewer("v", &[]).await.subscribe("fleet", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    // ~400 KB of history replayed on every resubscribe, to a client that reads nothing.
    let path = format!("/ws?token={}", hub.token("greedy", Role::Viewer));
    let mut greedy = common::connect_with(hub.addr, &path, None, Some(4096))
        .await
        .unwrap();
    for _ in 0..30 {
        greedy
            .send(json!({"type": "subscribe", "channel": "fleet",
                "since": {"epoch": epoch, "offset": 0}}))
            .await;
        greedy
            .send(json!({"type": "unsubscribe", "channel": "fleet"}))
            .await;
    }
    hub.wait_for_metric("hub_slow_consumer_disconnects_total", 1.0)
        .await;
    assert_healthy(&hub).await;
}

#[tokio::test]
async fn a_resume_whose_replay_would_not_fit_the_queue_is_answered_not_recovered() {
    let hub = TestHub::with(common::small_queue).await;
    common::a_resume_whose_replay_would_not_fit_the_queue_is_answered_not_recovered(&hub).await;
}

#[tokio::test]
async fn subscribes_past_the_rate_are_refused_then_cut_off_with_4029() {
    let hub = TestHub::with(|s| {
        s.limits.subscribe_rate = 0.001;
        s.limits.subscribe_burst = 10;
    })
    .await;
    let mut churner = hub.viewer("churner", &[]).await;
    for i in 0..10 {
        churner.subscribe(&format!("devices.d{i}"), None).await;
        // Unsubscribes are never refused: they only free what a subscribe took.
        churner
            .send(json!({"type": "unsubscribe", "channel": format!("devices.d{i}")}))
            .await;
        churner.expect("unsubscribed").await;
    }
    churner
        .send(json!({"type": "subscribe", "channel": "devices.d9", "ref": "r9"}))
        .await;
    let refused = churner.expect("error").await;
    assert_eq!(
        (&refused["code"], &refused["ref"]),
        (&json!("rate_limited"), &json!("r9"))
    );
    for i in 0..20 {
        churner
            .send(json!({"type": "subscribe", "channel": format!("devices.x{i}")}))
            .await;
    }
    assert_eq!(churner.expect_close().await, 4029);
    // Another connection has its own budget.
    hub.viewer("calm", &["fleet"]).await;
}

#[tokio::test]
async fn subscribing_to_names_nobody_publishes_leaves_nothing_behind() {
    let hub = TestHub::start().await;
    let mut agent = hub.agent("pi-1", &[]).await;
    agent.publish(1, json!({"n": 1})).await;
    assert_eq!(
        hub.metric("hub_channels").await,
        2.0,
        "devices.pi-1 and fleet"
    );
    let mut viewer = hub.viewer("v", &[]).await;
    for i in 0..50 {
        viewer.subscribe(&format!("devices.ghost-{i}"), None).await;
    }
    viewer.subscribe("devices.pi-1", None).await;
    assert_eq!(hub.metric("hub_channels").await, 52.0);
    drop(viewer);
    hub.wait_for_metric("hub_channels", 2.0).await;
}

#[tokio::test]
async fn the_channel_table_is_bounded_and_viewers_cannot_fill_it_against_publications() {
    let hub = TestHub::with(|s| s.limits.max_channels = 8).await;
    let mut first = hub.agent("pi-1", &[]).await;
    assert_eq!(first.publish(1, json!({"n": 1})).await["type"], "ack");
    // Subscribes may fill three quarters (6), with names nobody publishes.
    let mut viewer = hub.viewer("v", &[]).await;
    for name in ["devices.a", "devices.b", "devices.c", "devices.d"] {
        viewer.subscribe(name, None).await;
    }
    viewer
        .send(json!({"type": "subscribe", "channel": "devices.e", "ref": 5}))
        .await;
    let full = viewer.expect("error").await;
    assert_eq!(
        (&full["code"], &full["ref"]),
        (&json!("unavailable"), &json!(5))
    );
    assert!(
        full["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_channels")
    );
    // The rest is the publications': two more devices fit, a third is refused whole and kept by
    // its agent.
    for device in ["pi-2", "pi-3"] {
        let mut agent = hub.agent(device, &[]).await;
        assert_eq!(
            agent.publish(1, json!({"n": 1})).await["type"],
            "ack",
            "{device}"
        );
    }
    let mut last = hub.agent("pi-4", &[]).await;
    let refused = last.publish(1, json!({"n": 1})).await;
    assert_eq!(
        (&refused["code"], &refused["seq"]),
        (&json!("unavailable"), &json!(1))
    );
    assert_eq!(hub.metric("hub_channel_table_full_total").await, 2.0);

    viewer
        .send(json!({"type": "unsubscribe", "channel": "devices.a"}))
        .await;
    viewer.expect("unsubscribed").await;
    assert_eq!(last.publish(1, json!({"n": 1})).await["type"], "ack");
}
