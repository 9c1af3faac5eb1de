//! Revocation: `hub revoke` and `POST /admin/revocations` void a device's tokens (or one token)
//! at once on every hub: live connections close with 4003, reconnects are refused, and the list
//! survives hub and Redis restarts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::process::hub_command;
use common::{Client, RedisServer, SECRET, TestHub, http_request};
use hub::token::TokenRequest;
use hub_protocol::Role;
use serde_json::{Value, json};

/// The longest a revocation may take to reach a connection: `auth.revocation_poll` (500 ms) and
/// a busy machine's scheduling; the issue asks for a second, the bound leaves CI room.
const APPLIED_WITHIN: Duration = Duration::from_secs(2);

async fn refusal(hub: &TestHub, token: &str) -> (u16, String) {
    match hub.try_connect(token).await {
        Ok(_) => panic!("token should be refused"),
        Err(r) => (r.status, r.body["error"].as_str().unwrap().to_owned()),
    }
}

/// The hub closes `client` with `code` within [`APPLIED_WITHIN`] of `since`.
async fn closed_with(client: &mut Client, code: u16, since: Instant) -> Duration {
    assert_eq!(client.expect_close().await, code);
    let took = since.elapsed();
    assert!(took < APPLIED_WITHIN, "applied after {took:?}");
    took
}

async fn still_open(client: &mut Client) {
    client
        .send(json!({"type": "refresh", "token": "x", "ref": "probe"}))
        .await;
    assert_eq!(client.expect("error").await["ref"], "probe");
}

fn admin_token(hub: &TestHub) -> String {
    hub.token("ops-console", Role::Admin)
}

async fn admin(hub: &TestHub, method: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let (status, text) = http_request(
        hub.addr,
        method,
        "/admin/revocations",
        token,
        &body.to_string(),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn jti_of(token: &str) -> String {
    jsonwebtoken::dangerous::insecure_decode::<Value>(token)
        .unwrap()
        .claims["jti"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `hub revoke` as an operator runs it, against `env`'s store.
fn revoke_cli(env: &[(&str, &str)], args: &[&str]) -> String {
    let mut all = vec![("HUB_AUTH__HS256_SECRET", SECRET)];
    all.extend_from_slice(env);
    let out = hub_command(&all).arg("revoke").args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hub revoke {args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn file_hub(path: &Path) -> TestHub {
    let path = path.to_owned();
    TestHub::with(move |s| s.auth.revocations_file = Some(path)).await
}

#[tokio::test]
async fn embedded_hub_revoke_closes_the_devices_connections_and_refuses_it_until_reprovisioned() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("revocations.json");
    let hub = file_hub(&file).await;
    let stolen = hub.token("pi-07", Role::Agent);
    let mut first = hub.connect(&stolen).await;
    let mut second = hub.connect(&stolen).await;
    let mut neighbour = hub.agent("pi-08", &[]).await;
    // Tokens are dated in seconds: the revocation's `before` must be after this one's `iat`.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let file_s = file.to_str().unwrap();
    let asked = Instant::now();
    let printed = revoke_cli(
        &[("HUB_AUTH__REVOCATIONS_FILE", file_s)],
        &["--sub", "pi-07"],
    );
    assert!(printed.contains("\"sub\":\"pi-07\""), "{printed}");
    let took = closed_with(&mut first, 4003, asked).await;
    closed_with(&mut second, 4003, asked).await;
    println!("both connections of pi-07 closed {took:?} after `hub revoke`");
    assert_eq!(refusal(&hub, &stolen).await, (401, "revoked".into()));
    assert_eq!(neighbour.publish(1, json!({"t": 1})).await["type"], "ack");
    assert_eq!(hub.metric("hub_revocations").await, 1.0);
    assert_eq!(
        hub.metric("hub_disconnects_total{reason=\"revoked\"}")
            .await,
        2.0
    );
    // The device, provisioned again, connects with its new token.
    let mut again = hub.connect(&hub.token("pi-07", Role::Agent)).await;
    still_open(&mut again).await;

    // The list is the file's: a hub started afterwards refuses the old token from its start.
    hub.shutdown().await;
    let restarted = file_hub(&file).await;
    assert_eq!(refusal(&restarted, &stolen).await, (401, "revoked".into()));
}

#[tokio::test]
async fn the_admin_endpoint_takes_admin_tokens_only_and_revokes_one_token_by_jti() {
    let dir = tempfile::tempdir().unwrap();
    let hub = file_hub(&dir.path().join("revocations.json")).await;
    let viewer = hub.token("wall", Role::Viewer);
    let admin_token = admin_token(&hub);
    let body = json!({"sub": "pi-07"});
    assert_eq!(admin(&hub, "POST", None, body.clone()).await.0, 401);
    let (status, answer) = admin(&hub, "POST", Some(&viewer), body.clone()).await;
    assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden")));
    for bad in [
        json!({}),
        json!({"sub": "a", "jti": "b"}),
        json!({"device": "x"}),
    ] {
        let (status, answer) = admin(&hub, "POST", Some(&admin_token), bad.clone()).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
    // An admin token opens no WebSocket.
    assert_eq!(refusal(&hub, &admin_token).await.0, 403);

    let one = hub.token("wall-2", Role::Viewer);
    let other = hub.token("wall-2", Role::Viewer);
    let mut revoked = hub.connect(&one).await;
    let mut kept = hub.connect(&other).await;
    let asked = Instant::now();
    let (status, answer) = admin(
        &hub,
        "POST",
        Some(&admin_token),
        json!({"jti": jti_of(&one)}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    closed_with(&mut revoked, 4003, asked).await;
    still_open(&mut kept).await;
    assert_eq!(refusal(&hub, &one).await, (401, "revoked".into()));
    hub.connect(&other).await;

    let (status, listed) = admin(&hub, "GET", Some(&admin_token), json!(null)).await;
    assert_eq!(status, 200);
    assert_eq!(listed["revocations"][0]["jti"], jti_of(&one), "{listed}");
}

#[tokio::test]
async fn the_embedded_broker_without_a_file_says_it_keeps_no_revocations() {
    let hub = TestHub::start().await;
    let (status, answer) = admin(&hub, "POST", Some(&admin_token(&hub)), json!({"sub": "x"})).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("unavailable"))
    );
    let out = hub_command(&[("HUB_AUTH__HS256_SECRET", SECRET)])
        .args(["revoke", "--sub", "pi-07"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("auth.revocations_file"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_hub_of_a_pool_closes_the_device_on_every_hub_and_survives_restarts() {
    let mut redis = RedisServer::start_persistent();
    let hubs = [
        TestHub::on_redis(&redis).await,
        TestHub::on_redis(&redis).await,
        TestHub::on_redis(&redis).await,
    ];
    let stolen = hubs[0].token("pi-07", Role::Agent);
    let mut on_each = Vec::new();
    for hub in &hubs {
        on_each.push(hub.connect(&stolen).await);
    }
    let mut neighbour = hubs[1].agent("pi-08", &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let asked = Instant::now();
    let (status, answer) = admin(
        &hubs[0],
        "POST",
        Some(&admin_token(&hubs[0])),
        json!({"sub": "pi-07"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut slowest = Duration::ZERO;
    for client in &mut on_each {
        slowest = slowest.max(closed_with(client, 4003, asked).await);
    }
    println!("pi-07 closed on all 3 hubs within {slowest:?} of the POST");
    for hub in &hubs {
        assert_eq!(refusal(hub, &stolen).await, (401, "revoked".into()));
    }
    assert_eq!(neighbour.publish(1, json!({"t": 1})).await["type"], "ack");

    // `hub revoke` against the same Redis: by jti, for a viewer's token.
    let viewer = hubs[2].token("wall", Role::Viewer);
    let mut watching = hubs[2].connect(&viewer).await;
    let url = redis.url();
    let asked = Instant::now();
    revoke_cli(&[("HUB_BROKER__URL", &url)], &["--jti", &jti_of(&viewer)]);
    closed_with(&mut watching, 4003, asked).await;

    // A hub that starts later, and one after Redis restarted (it persists), still refuse.
    let [a, b, c] = hubs;
    for hub in [a, b, c] {
        hub.shutdown().await;
    }
    redis.restart();
    let late = TestHub::on_redis(&redis).await;
    assert_eq!(refusal(&late, &stolen).await, (401, "revoked".into()));
    assert_eq!(refusal(&late, &viewer).await, (401, "revoked".into()));
    late.connect(&late.token("pi-07", Role::Agent)).await;
}

#[tokio::test]
async fn a_hub_that_cannot_read_its_revocations_takes_no_upgrade_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("revocations.json");
    std::fs::write(&file, b"{ not json").unwrap();
    let hub = file_hub(&file).await;
    let token = hub.token("pi-07", Role::Agent);
    let refused = hub.try_connect(&token).await.err().expect("refused");
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (503, Some("revocations_unknown"))
    );
    assert_eq!(hub.get("/readyz").await.0, 503);
    std::fs::remove_file(&file).unwrap(); // no file: no revocations
    hub.wait_ready(true).await;
    hub.connect(&token).await;
}

#[tokio::test]
async fn a_token_longer_lived_than_max_token_lifetime_is_refused_and_iat_can_be_required() {
    let hub = TestHub::with(|s| {
        s.auth.max_token_lifetime = Duration::from_secs(3600);
        s.auth.require_iat = true;
    })
    .await;
    let mut long = common::claims("pi-1", "agent", hub::token::unix_now() + 7200);
    long.iat = Some(hub::token::unix_now());
    let long = hub.sign(&long);
    assert_eq!(refusal(&hub, &long).await, (401, "invalid_claims".into()));
    let without_iat = hub.sign(&common::claims(
        "pi-1",
        "agent",
        hub::token::unix_now() + 60,
    ));
    assert_eq!(
        refusal(&hub, &without_iat).await,
        (401, "invalid_claims".into())
    );
    let mut future = common::claims("pi-1", "agent", hub::token::unix_now() + 600);
    future.iat = Some(hub::token::unix_now() + 300);
    assert_eq!(
        refusal(&hub, &hub.sign(&future)).await,
        (401, "invalid_claims".into())
    );
    hub.connect(&hub.token("pi-1", Role::Agent)).await;
    // hub token will not mint what the hubs refuse.
    let too_long = TokenRequest {
        ttl: Duration::from_secs(7200),
        ..TokenRequest::new("pi-1", Role::Agent)
    };
    assert!(matches!(
        hub::token::mint(&hub.settings.auth, &too_long),
        Err(hub::token::MintError::TooLong(..))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_revocations_live_in_one_slot_and_reach_every_hub() {
    let cluster = common::redis_cluster::RedisCluster::start(3);
    let a = TestHub::on_cluster_with(&cluster, |_| {}).await;
    let b = TestHub::on_cluster_with(&cluster, |_| {}).await;
    let stolen = a.token("pi-07", Role::Agent);
    let mut on_b = b.connect(&stolen).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let asked = Instant::now();
    let (status, answer) = admin(&a, "POST", Some(&admin_token(&a)), json!({"sub": "pi-07"})).await;
    assert_eq!(status, 200, "{answer}");
    closed_with(&mut on_b, 4003, asked).await;
    assert_eq!(refusal(&a, &stolen).await, (401, "revoked".into()));
}
