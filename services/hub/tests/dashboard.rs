//! What the browser dashboard relies on: its files served by the hub itself, a way to tell a
//! refused token from an unreachable hub, and demo devices for a first run.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::TestHub;
use hub_protocol::Role;

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary() {
    let hub = TestHub::start().await;
    let (status, page) = hub.get("/").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("fleet-client.js") || page.contains("dashboard.js"),
        "{page}"
    );
    for file in ["/dashboard.js", "/fleet-client.js", "/dashboard.css"] {
        let (status, body) = hub.get(file).await;
        assert_eq!(status, 200, "{file}");
        assert!(!body.is_empty(), "{file}");
    }
    assert_eq!(hub.get("/nope.js").await.0, 404);
}

#[tokio::test]
async fn a_plain_get_tells_a_refused_token_from_a_good_one() {
    let hub = TestHub::start().await;
    let good = hub.token("dash", Role::Viewer);
    let (status, body) = hub.get(&format!("/ws?token={good}")).await;
    assert_eq!((status, body.contains("upgrade_required")), (426, true));
    let (status, body) = hub.get("/ws?token=not.a.jwt").await;
    assert_eq!(status, 401);
    assert!(body.contains("\"error\":\"malformed\""), "{body}");
    // Without a token the answer stays "speak WebSocket".
    assert_eq!(hub.get("/ws").await.0, 426);
}

#[tokio::test]
async fn demo_devices_publish_readings_in_the_agents_format() {
    let hub = TestHub::with(|s| {
        s.demo.devices = 3;
        s.demo.interval = Duration::from_millis(50);
    })
    .await;
    let mut viewer = hub.viewer("v", &["fleet"]).await;
    let messages = viewer.messages(9).await;
    let devices: BTreeSet<_> = messages
        .iter()
        .map(|m| m["data"]["device"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        devices,
        BTreeSet::from(["demo-01".into(), "demo-02".into(), "demo-03".into()])
    );
    let data = &messages[0]["data"];
    assert_eq!(data["metrics"]["cpu_temp"]["unit"], "C", "{data}");
    assert!(data["ts"].as_u64().is_some() && data["clock_synced"] == true);
    assert_eq!(messages[0]["from"], data["device"]);
}
