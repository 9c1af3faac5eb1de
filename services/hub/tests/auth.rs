//! Authentication at the upgrade: who may connect, and what a refused client is told.

mod common;

use std::time::Duration;

use common::{SECRET, TestHub, claims, connect, sign_with};
use hub::token::TokenRequest;
use hub::token::unix_now;
use hub_protocol::{Claims, Role};
use jsonwebtoken::Algorithm;

async fn refusal(hub: &TestHub, token: &str) -> (u16, String) {
    match hub.try_connect(token).await {
        Ok(_) => panic!("token should be refused"),
        Err(r) => (r.status, r.body["error"].as_str().unwrap().to_owned()),
    }
}

#[tokio::test]
async fn a_valid_token_connects_by_header_or_query_parameter() {
    let hub = TestHub::start().await;
    let token = hub.token("dash-1", Role::Viewer);
    let by_header = connect(hub.addr, "/ws", Some(&format!("Bearer {token}")))
        .await
        .unwrap();
    assert_eq!(by_header.hello["sub"], "dash-1");
    assert_eq!(by_header.hello["role"], "viewer");
    assert_eq!(by_header.hello["hub"], "test-hub");
    assert_eq!(by_header.node.as_deref(), Some("test-hub"));
    let by_query = hub.connect(&token).await;
    assert_eq!(by_query.hello["sub"], "dash-1");
}

#[tokio::test]
async fn unusable_tokens_are_refused_with_401_and_a_reason() {
    let hub = TestHub::start().await;
    let now = unix_now();

    let missing = connect(hub.addr, "/ws", None).await.err().unwrap();
    assert_eq!(
        (missing.status, missing.body["error"].as_str().unwrap()),
        (401, "missing")
    );
    assert!(missing.body["message"].as_str().unwrap().contains("Bearer"));
    let basic = connect(hub.addr, "/ws", Some("Basic dXNlcjpwYXNz"))
        .await
        .err()
        .unwrap();
    assert_eq!(basic.status, 401);

    assert_eq!(refusal(&hub, "not-a-jwt").await, (401, "malformed".into()));
    let forged = sign_with(
        &claims("d1", "viewer", now + 600),
        Algorithm::HS256,
        "some-other-secret",
    );
    assert_eq!(refusal(&hub, &forged).await, (401, "bad_signature".into()));
    let other_alg = sign_with(&claims("d1", "viewer", now + 600), Algorithm::HS512, SECRET);
    assert_eq!(
        refusal(&hub, &other_alg).await,
        (401, "wrong_algorithm".into())
    );
    let expired = hub.sign(&claims("d1", "viewer", now - 60));
    assert_eq!(refusal(&hub, &expired).await, (401, "expired".into()));
    let immature = hub.sign(&Claims {
        nbf: Some(now + 600),
        ..claims("d1", "viewer", now + 900)
    });
    assert_eq!(
        refusal(&hub, &immature).await,
        (401, "not_yet_valid".into())
    );
    let bad_device = hub.sign(&claims("pi.7", "agent", now + 600));
    assert_eq!(
        refusal(&hub, &bad_device).await,
        (401, "invalid_claims".into())
    );

    assert_eq!(
        hub.metric("hub_auth_failures_total{reason=\"expired\"}")
            .await,
        1.0
    );
    assert_eq!(
        hub.metric("hub_auth_failures_total{reason=\"missing\"}")
            .await,
        2.0
    );
    assert_eq!(hub.metric("hub_connections{role=\"viewer\"}").await, 0.0);
}

#[tokio::test]
async fn a_valid_token_whose_role_may_not_connect_gets_403() {
    let hub = TestHub::start().await;
    let admin = hub.sign(&claims("root", "admin", unix_now() + 600));
    assert_eq!(refusal(&hub, &admin).await, (403, "role_forbidden".into()));
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let hub = TestHub::with(|s| {
        s.auth.issuer = Some("fleet-auth".into());
        s.auth.audience = Some("telemetry-hub".into());
    })
    .await;
    hub.connect(&hub.token("dash", Role::Viewer)).await;
    let exp = unix_now() + 600;
    let mut c = claims("dash", "viewer", exp);
    c.iss = Some("fleet-auth".into());
    c.aud = Some("someone-else".into());
    assert_eq!(
        refusal(&hub, &hub.sign(&c)).await,
        (401, "wrong_audience".into())
    );
    c.iss = Some("rogue".into());
    c.aud = Some("telemetry-hub".into());
    assert_eq!(
        refusal(&hub, &hub.sign(&c)).await,
        (401, "wrong_issuer".into())
    );
    c.iss = None;
    assert_eq!(
        refusal(&hub, &hub.sign(&c)).await.0,
        401,
        "a required issuer must be present"
    );
    c.iss = Some("fleet-auth".into());
    c.aud = None;
    assert_eq!(
        refusal(&hub, &hub.sign(&c)).await.0,
        401,
        "a required audience must be present"
    );
}

fn openssl(args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl {args:?}");
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_against_a_public_key() {
    let dir = tempfile::tempdir().unwrap();
    for (name, keygen) in [
        (
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
        ),
        (
            "ec",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
        ),
    ] {
        let private = dir.path().join(format!("{name}.key"));
        let public = dir.path().join(format!("{name}.pub"));
        let private_s = private.to_str().unwrap();
        let mut args = vec!["genpkey", "-out", private_s];
        args.extend_from_slice(keygen);
        openssl(&args);
        openssl(&[
            "pkey",
            "-in",
            private_s,
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);
        let hub = TestHub::with(|s| {
            s.auth.hs256_secret = None;
            s.auth.public_key_file = Some(public.clone());
            s.auth.private_key_file = Some(private.clone());
        })
        .await;
        let token = hub.token("pi-1", Role::Agent);
        let alg = if name == "rsa" { "RS256" } else { "ES256" };
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().alg,
            alg.parse().unwrap()
        );
        let client = hub.connect(&token).await;
        assert_eq!(client.hello["last_seq"], 0);
        // A token signed with the public key as an HMAC secret is the classic confusion attack.
        let pem = std::fs::read_to_string(&public).unwrap();
        let confused = sign_with(
            &claims("pi-1", "agent", unix_now() + 600),
            Algorithm::HS256,
            &pem,
        );
        assert_eq!(
            refusal(&hub, &confused).await,
            (401, "wrong_algorithm".into())
        );
    }
}

#[tokio::test]
async fn channel_claims_and_the_configured_default_limit_what_a_viewer_subscribes_to() {
    let hub = TestHub::with(|s| s.auth.viewer_channels = Some(vec!["fleet".into()])).await;
    let mut request = TokenRequest::new("ops", Role::Viewer);
    request.channels = vec!["devices.*".into()];
    let mut scoped = hub.connect(&hub.token_for(request)).await;
    scoped.subscribe("devices.pi-1", None).await;
    scoped
        .send(serde_json::json!({"type": "subscribe", "channel": "fleet", "ref": "r1"}))
        .await;
    let refused = scoped.expect("error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("forbidden"), Some("r1"))
    );

    let mut default = hub.connect(&hub.token("wall", Role::Viewer)).await;
    default.subscribe("fleet", None).await;
    default
        .send(serde_json::json!({"type": "subscribe", "channel": "devices.pi-1"}))
        .await;
    assert_eq!(default.expect("error").await["code"], "forbidden");
}

#[tokio::test]
async fn a_connection_is_closed_with_4001_when_its_token_expires() {
    let hub = TestHub::with(|s| s.auth.leeway = Duration::ZERO).await;
    let mut request = TokenRequest::new("short-lived", Role::Viewer);
    request.ttl = Duration::from_secs(2);
    let mut client = hub.connect(&hub.token_for(request)).await;
    client.subscribe("fleet", None).await;
    assert_eq!(client.expect_close().await, 4001);
    // Other connections are unaffected.
    hub.viewer("long-lived", &["fleet"]).await;
}

#[tokio::test]
async fn a_token_expiring_past_what_the_clock_holds_connects_and_works() {
    // Allowed to live that long (by default it may not: auth.max_token_lifetime).
    let hub = TestHub::with(|s| s.auth.max_token_lifetime = Duration::MAX).await;
    for exp in [1 << 63, u64::MAX] {
        let mut agent = hub
            .connect(&hub.sign(&claims("pi-far", "agent", exp)))
            .await;
        assert_eq!(agent.hello["expires_at"], exp);
        let seq = agent.hello["last_seq"].as_u64().unwrap() + 1;
        assert_eq!(
            agent.publish(seq, serde_json::json!({"v": 1})).await["type"],
            "ack"
        );
    }
}
