//! OpenTelemetry from the Pi to the dashboard: an agent and two hubs on Redis export to a real
//! OTLP receiver, and one trace follows a reading from the agent's batch through the hub it
//! published to, Redis, and the hub that delivered it to a dashboard.

mod common;

use std::time::Duration;

use common::collector::{Collector, Span};
use common::{Agent, AgentConfig, Hub, Redis, wait_until, watch_first};

const DEVICE: &str = "pi-traced";

/// The status line's code of a WebSocket upgrade with `token`.
fn upgrade_status(hub: &Hub, token: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(hub.addr).unwrap();
    write!(
        s,
        "GET /ws?token={token} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

fn by_id<'a>(spans: &'a [Span], id: &str) -> Option<&'a Span> {
    spans.iter().find(|s| s.span_id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_agent_through_redis_to_the_hub_that_delivers() {
    let collector = Collector::start().await;
    let redis = Redis::start();
    // Hub A exports over gRPC, configured by its settings; hub B over HTTP, configured by the
    // standard OTEL_* variables only, and it exports its metrics too.
    let hub_a = Hub::on_redis_with(
        &redis,
        "hub-a",
        &[
            ("HUB_TELEMETRY__ENDPOINT", collector.grpc.as_str()),
            ("HUB_TELEMETRY__PROTOCOL", "grpc"),
            ("HUB_TELEMETRY__SAMPLE_RATIO", "0.0"),
        ],
    );
    let hub_b = Hub::on_redis_with(
        &redis,
        "hub-b",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.http.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.0"),
            ("HUB_TELEMETRY__METRICS_INTERVAL", "300ms"),
        ],
    );
    let viewer = hub_b.token("dash", "viewer", "1h");
    let dashboard = watch_first(&hub_b, &viewer, &format!("devices.{DEVICE}"), 20);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let token = hub_a.token(DEVICE, "agent", "1h");
    let tail = format!(
        "[telemetry]\nendpoint = \"{}\"\nsample_ratio = 1.0\n",
        collector.http
    );
    let mut agent = Agent::start(&AgentConfig {
        tail: &tail,
        ..AgentConfig::new(&hub_a, &token)
    });
    let got = dashboard.await.expect("the dashboard task");
    assert!(got.len() >= 20, "the dashboard on hub B got the readings");
    // Stopping flushes what each process still buffers.
    agent.stop();
    let (mut hub_a, mut hub_b) = (hub_a, hub_b);
    hub_a.terminate();
    hub_b.terminate();

    let mut chain = None;
    wait_until(
        "a whole trace at the collector",
        Duration::from_secs(15),
        || {
            let spans = collector.spans();
            chain = spans
                .iter()
                .filter(|s| s.name == "relay.deliver" && s.instance == "hub-b")
                .find_map(|deliver| {
                    let redis_publish = by_id(&spans, &deliver.parent_id)?;
                    let publish = by_id(&spans, &redis_publish.parent_id)?;
                    let batch = by_id(&spans, &publish.parent_id)?;
                    Some([batch, publish, redis_publish, deliver].map(Span::clone))
                });
            chain.is_some()
        },
    );
    let [batch, publish, redis_publish, deliver] = chain.unwrap();

    assert_eq!(
        (batch.name.as_str(), batch.service.as_str(), batch.via),
        ("send_batch", "edge-agent", "http")
    );
    assert_eq!(batch.instance, DEVICE);
    assert!(batch.parent_id.is_empty(), "the agent starts the trace");
    assert_eq!(
        (
            publish.name.as_str(),
            publish.instance.as_str(),
            publish.via
        ),
        ("publish", "hub-a", "grpc")
    );
    assert_eq!(publish.attribute("device"), Some(DEVICE));
    assert_eq!(publish.attribute("outcome"), Some("accepted"));
    assert_eq!(
        (redis_publish.name.as_str(), redis_publish.instance.as_str()),
        ("redis.publish", "hub-a")
    );
    assert_eq!((deliver.instance.as_str(), deliver.via), ("hub-b", "http"));
    assert_eq!(
        deliver.attribute("channel"),
        Some(format!("devices.{DEVICE}").as_str())
    );
    for span in [&publish, &redis_publish, &deliver] {
        assert_eq!(
            span.trace_id, batch.trace_id,
            "{} is in the agent's trace",
            span.name
        );
    }

    // The hubs sample their own traces at 0: nothing of theirs is exported but what the agent
    // asked for.
    let spans = collector.spans();
    assert!(
        spans.iter().filter(|s| s.service == "hub").all(|s| spans
            .iter()
            .any(|b| b.name == "send_batch" && b.trace_id == s.trace_id)),
        "a hub span outside the agent's traces: {spans:#?}"
    );

    let metrics = collector.metric_names("hub-b");
    for name in [
        "hub_deliveries",
        "hub_connections",
        "hub_publish_to_deliver_seconds_count",
    ] {
        assert!(
            metrics.iter().any(|m| m == name),
            "hub B exports {name} over OTLP: {metrics:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_traces_its_connections_from_upgrade_to_close_code() {
    let collector = Collector::start().await;
    let redis = Redis::start();
    let mut hub = Hub::on_redis_with(
        &redis,
        "hub-c",
        &[
            ("HUB_TELEMETRY__ENDPOINT", collector.http.as_str()),
            ("HUB_TELEMETRY__SAMPLE_RATIO", "1.0"),
        ],
    );
    let dashboard = watch_first(&hub, &hub.token("dash", "viewer", "1h"), "fleet", 1);
    assert_eq!(upgrade_status(&hub, "not-a-token"), 401, "a refused token");
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.terminate();
    dashboard.abort();

    wait_until("connection spans", Duration::from_secs(15), || {
        let spans = collector.spans();
        spans
            .iter()
            .any(|s| s.name == "connection" && s.attribute("close.code").is_some())
            && spans
                .iter()
                .any(|s| s.attribute("auth") == Some("malformed"))
    });
    let spans = collector.spans();
    let connection = spans
        .iter()
        .find(|s| s.name == "connection" && s.attribute("close.code").is_some())
        .unwrap();
    assert_eq!(connection.attribute("role"), Some("viewer"));
    assert_eq!(
        connection.attribute("close.code"),
        Some("1012"),
        "closed by the drain"
    );
    let upgrade = by_id(&spans, &connection.parent_id).expect("its upgrade span");
    assert_eq!(upgrade.name, "ws.upgrade");
    assert_eq!(upgrade.attribute("auth"), Some("ok"));
    assert_eq!(upgrade.attribute("http.response.status_code"), Some("101"));
    let subscribe = spans
        .iter()
        .find(|s| s.name == "subscribe" && s.parent_id == connection.span_id)
        .expect("the subscribe inside the connection");
    assert_eq!(subscribe.attribute("channel"), Some("fleet"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_is_traced_as_its_traceparent_says_and_only_then_through_redis() {
    use fastwebsockets::{Frame, OpCode, Payload};

    let collector = Collector::start().await;
    let redis = Redis::start();
    // Every new trace is sampled here, so the agent's connection is traced too.
    let mut hub = Hub::on_redis_with(
        &redis,
        "hub-d",
        &[
            ("HUB_TELEMETRY__ENDPOINT", collector.http.as_str()),
            ("HUB_TELEMETRY__SAMPLE_RATIO", "1.0"),
        ],
    );
    let dialer = hub_client::Dialer::new(&hub.url(), common::dial_options()).unwrap();
    let mut ws = dialer
        .connect(&hub.token("pi-raw", "agent", "1h"))
        .await
        .unwrap()
        .socket;
    let unrecorded_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparents = [
        format!(r#""00-{unrecorded_trace}-00f067aa0ba902b7-00""#),
        r#""not-a-traceparent""#.to_owned(),
        "42".to_owned(),
    ];
    for (i, tp) in traceparents.iter().enumerate() {
        let frame = format!(
            r#"{{"type":"publish","seq":{},"traceparent":{tp},"data":{{"v":{i}}}}}"#,
            i + 1
        );
        ws.write_frame(Frame::text(Payload::Owned(frame.into_bytes())))
            .await
            .unwrap();
    }
    let mut acked = Vec::new();
    while acked.len() < 3 {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.read_frame())
            .await
            .expect("answers within 10 s")
            .unwrap();
        if frame.opcode != OpCode::Text {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
        match v["type"].as_str() {
            Some("ack") => acked.push(v["seq"].as_u64().unwrap()),
            Some("hello") => {}
            _ => panic!("every publish is accepted, whatever its traceparent: {v}"),
        }
    }
    assert_eq!(acked, [1, 2, 3]);
    hub.terminate();

    wait_until("the publish spans", Duration::from_secs(15), || {
        collector
            .spans()
            .iter()
            .filter(|s| s.name == "redis.publish")
            .count()
            >= 2
    });
    let spans = collector.spans();
    let publishes: Vec<&Span> = spans.iter().filter(|s| s.name == "publish").collect();
    let mut seqs: Vec<&str> = publishes
        .iter()
        .filter_map(|s| s.attribute("seq"))
        .collect();
    seqs.sort();
    assert_eq!(seqs, ["2", "3"], "seq 1's sender does not record its trace");
    assert!(spans.iter().all(|s| s.trace_id != unrecorded_trace));
    for publish in &publishes {
        assert!(
            publish.parent_id.is_empty(),
            "an unusable traceparent: a trace of the hub's own"
        );
    }
    let redis_publishes: Vec<&Span> = spans.iter().filter(|s| s.name == "redis.publish").collect();
    assert_eq!(
        redis_publishes.len(),
        2,
        "none for the untraced publish: {spans:#?}"
    );
    for r in redis_publishes {
        let parent = by_id(&spans, &r.parent_id).expect("its parent");
        assert_eq!(
            parent.name, "publish",
            "under the publish, never the connection"
        );
    }
}
