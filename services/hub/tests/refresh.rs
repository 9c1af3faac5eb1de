//! `refresh`: a connection takes a new token of the same identity and lives on to its expiry,
//! so short-lived tokens do not mean reconnects.

mod common;

use std::time::Duration;

use common::{Client, Event, TestHub, claims};
use hub::token::{TokenRequest, unix_now};
use hub_protocol::Role;
use serde_json::json;

fn request(sub: &str, role: Role, ttl: Duration) -> TokenRequest {
    TokenRequest {
        ttl,
        ..TokenRequest::new(sub, role)
    }
}

async fn exact_expiry_hub() -> TestHub {
    TestHub::with(|s| s.auth.leeway = Duration::ZERO).await
}

async fn still_open(client: &mut Client) {
    client
        .send(json!({"type": "subscribe", "channel": "fleet", "ref": "probe"}))
        .await;
    let answer = client.expect("subscribed").await;
    assert_eq!(answer["channel"], "fleet");
    client
        .send(json!({"type": "unsubscribe", "channel": "fleet"}))
        .await;
    client.expect("unsubscribed").await;
}

async fn closed_within(client: &mut Client, wait: Duration) -> u16 {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_within(left).await {
            Event::Closed(code) => return code,
            Event::Frame(_) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_refreshed_connection_outlives_its_first_token() {
    let hub = exact_expiry_hub().await;
    let short = hub.token_for(request("wall", Role::Viewer, Duration::from_secs(2)));
    let mut refreshed = hub.connect(&short).await;
    let mut kept = hub.connect(&short).await;
    let long = hub.token_for(request("wall", Role::Viewer, Duration::from_secs(3600)));
    let expected = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&long)
        .unwrap()
        .claims["exp"]
        .clone();
    refreshed
        .send(json!({"type": "refresh", "token": long, "ref": 7}))
        .await;
    let answer = refreshed.expect("refreshed").await;
    assert_eq!(answer["expires_at"], expected);
    assert_eq!(answer["ref"], 7);

    // The other connection of the same token closes at its expiry; this one goes on.
    assert_eq!(closed_within(&mut kept, Duration::from_secs(5)).await, 4001);
    still_open(&mut refreshed).await;
    assert_eq!(
        hub.metric("hub_token_refreshes_total{result=\"refreshed\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_agent_refreshes_too_and_keeps_publishing() {
    let hub = exact_expiry_hub().await;
    let short = hub.token_for(request("pi-1", Role::Agent, Duration::from_secs(2)));
    let mut agent = hub.connect(&short).await;
    let long = hub.token_for(request("pi-1", Role::Agent, Duration::from_secs(3600)));
    agent.send(json!({"type": "refresh", "token": long})).await;
    agent.expect("refreshed").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(agent.publish(1, json!({"t": 1})).await["type"], "ack");
}

#[tokio::test]
async fn a_refresh_that_does_not_verify_or_changes_the_identity_is_refused_and_changes_nothing() {
    let hub = exact_expiry_hub().await;
    let short = hub.token_for(request("wall", Role::Viewer, Duration::from_secs(2)));
    let mut viewer = hub.connect(&short).await;
    let ttl = Duration::from_secs(3600);
    let narrower = TokenRequest {
        channels: vec!["devices.*".into()],
        ..request("wall", Role::Viewer, ttl)
    };
    let expired = hub.sign(&claims("wall", "viewer", unix_now() - 10));
    for (token, code, says) in [
        ("not-a-jwt".to_owned(), "bad_token", "malformed"),
        (expired, "bad_token", "expired"),
        (
            hub.token_for(request("someone-else", Role::Viewer, ttl)),
            "forbidden",
            "sub",
        ),
        (
            hub.token_for(request("wall", Role::Agent, ttl)),
            "forbidden",
            "role",
        ),
        (hub.token_for(narrower), "forbidden", "channels"),
    ] {
        viewer
            .send(json!({"type": "refresh", "token": token}))
            .await;
        let refused = viewer.expect("error").await;
        assert_eq!(refused["code"], code, "{refused}");
        let message = refused["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
    viewer.send(json!({"type": "refresh"})).await;
    assert_eq!(viewer.expect("error").await["code"], "bad_frame");
    // The first token's expiry still holds.
    assert_eq!(
        closed_within(&mut viewer, Duration::from_secs(5)).await,
        4001
    );
    assert_eq!(
        hub.metric("hub_token_refreshes_total{result=\"refused\"}")
            .await,
        5.0
    );
}
