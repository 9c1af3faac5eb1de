//! Key sets: a token's `kid` picks its key from `auth.jwks_file`, and keys rotate by editing that
//! file while the hub runs, without dropping a connection that does not use the removed key.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::process::HubProcess;
use common::{SECRET, TestHub, claims, connect, sign_with};
use hub::token::{MintError, TokenRequest, mint, unix_now};
use hub_protocol::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const OLD: &[u8] = b"the-old-key-of-the-set-32-bytes!";
const NEW: &[u8] = b"the-new-key-of-the-set-32-bytes!";

fn oct(kid: &str, secret: &[u8]) -> Value {
    json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(secret)})
}

/// Replaces the file in one rename, as a deploy tool (or a ConfigMap's symlink swap) does.
fn write_set(path: &Path, keys: &[Value]) {
    write_file(path, json!({ "keys": keys }).to_string().as_bytes());
}

fn write_file(path: &Path, bytes: &[u8]) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, bytes).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

async fn key_set_hub(path: &Path, close_on_removal: bool) -> TestHub {
    let path = path.to_owned();
    TestHub::with(move |s| {
        s.auth.hs256_secret = None;
        s.auth.jwks_file = Some(path);
        s.auth.jwks_poll = Duration::from_millis(100);
        s.auth.close_on_key_removal = close_on_removal;
    })
    .await
}

fn token_with(hub: &TestHub, sub: &str, kid: &str) -> String {
    hub.token_for(TokenRequest {
        kid: Some(kid.into()),
        ..TokenRequest::new(sub, Role::Viewer)
    })
}

async fn refusal(hub: &TestHub, token: &str) -> (u16, String) {
    match hub.try_connect(token).await {
        Ok(_) => panic!("token should be refused"),
        Err(r) => (r.status, r.body["error"].as_str().unwrap().to_owned()),
    }
}

async fn still_open(client: &mut common::Client) {
    client
        .send(json!({"type": "subscribe", "channel": "fleet"}))
        .await;
    assert_eq!(client.expect("subscribed").await["channel"], "fleet");
}

const APPLIED: &str = "hub_auth_key_reloads_total{result=\"applied\"}";
const REJECTED: &str = "hub_auth_key_reloads_total{result=\"rejected\"}";

#[tokio::test]
async fn a_rotation_adds_a_key_then_removes_the_old_one_and_closes_its_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_set(&path, &[oct("old", OLD)]);
    let hub = key_set_hub(&path, true).await;
    assert_eq!(hub.metric("hub_auth_keys").await, 1.0);
    let old_token = token_with(&hub, "wall-1", "old");
    let mut on_old = hub.connect(&old_token).await;

    // 1. Add the new key: tokens of both verify.
    write_set(&path, &[oct("old", OLD), oct("new", NEW)]);
    hub.wait_for_metric(APPLIED, 1.0).await;
    assert_eq!(hub.metric("hub_auth_keys").await, 2.0);
    let new_token = token_with(&hub, "wall-2", "new");
    let mut on_new = hub.connect(&new_token).await;
    hub.connect(&old_token).await;
    still_open(&mut on_old).await;

    // 2. Remove the old key: its live connections close (4004, get a new token) and its
    // tokens are refused; the new key's connections do not notice.
    write_set(&path, &[oct("new", NEW)]);
    hub.wait_for_metric(APPLIED, 2.0).await;
    assert_eq!(on_old.expect_close().await, 4004);
    assert_eq!(
        refusal(&hub, &old_token).await,
        (401, "bad_signature".into())
    );
    still_open(&mut on_new).await;
    hub.connect(&new_token).await;
    assert_eq!(
        hub.metric("hub_disconnects_total{reason=\"key_removed\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_broken_or_missing_key_file_keeps_the_keys_the_hub_has() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_set(&path, &[oct("new", NEW)]);
    let hub = key_set_hub(&path, true).await;
    let token = token_with(&hub, "wall-1", "new");
    let mut live = hub.connect(&token).await;

    let broken: [&[u8]; 4] = [
        b"{\"keys\": [",
        br#"{"keys": [{"kty": "oct", "k": "c2hvcnQ"}]}"#, // no kid
        br#"{"keys": [{"kty": "oct", "kid": "short", "k": "c2hvcnQ"}]}"#, // 5 bytes
        br#"{"keys": [{"kty": "oct", "kid": "x", "alg": "RS256", "k": "c2hvcnQ"}]}"#,
    ];
    for (n, garbage) in broken.iter().enumerate() {
        write_file(&path, garbage);
        hub.wait_for_metric(REJECTED, (n + 1) as f64).await;
        hub.connect(&token).await;
    }
    std::fs::remove_file(&path).unwrap();
    hub.wait_for_metric(REJECTED, 5.0).await;
    hub.connect(&token).await;
    still_open(&mut live).await;
    assert_eq!(hub.metric(APPLIED).await, 0.0);
    assert_eq!(hub.metric("hub_auth_keys").await, 1.0);

    // Fixed again: taken at once.
    write_set(&path, &[oct("new", NEW), oct("old", OLD)]);
    hub.wait_for_metric(APPLIED, 1.0).await;
    hub.connect(&token_with(&hub, "wall-2", "old")).await;
}

#[tokio::test]
async fn without_close_on_key_removal_a_connection_lives_until_its_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_set(&path, &[oct("old", OLD), oct("new", NEW)]);
    let hub = key_set_hub(&path, false).await;
    let old_token = token_with(&hub, "wall-1", "old");
    let mut on_old = hub.connect(&old_token).await;
    write_set(&path, &[oct("new", NEW)]);
    hub.wait_for_metric(APPLIED, 1.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    still_open(&mut on_old).await;
    assert_eq!(
        refusal(&hub, &old_token).await,
        (401, "bad_signature".into())
    );
}

#[tokio::test]
async fn a_kid_picks_a_key_of_the_set_and_no_kid_means_the_single_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_set(&path, &[oct("new", NEW)]);
    let set_path = path.clone();
    let hub = TestHub::with(move |s| s.auth.jwks_file = Some(set_path)).await;
    let now = unix_now();
    let c = claims("wall-1", "viewer", now + 600);
    let signed = |secret: &[u8], kid: Option<&str>| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &c, &EncodingKey::from_secret(secret)).unwrap()
    };
    // The single key, without a kid (as every token minted before the set existed).
    hub.connect(&sign_with(&c, Algorithm::HS256, SECRET)).await;
    hub.connect(&signed(NEW, Some("new"))).await;
    for (secret, kid) in [
        (NEW, None),                      // a set's key is only ever picked by its kid
        (SECRET.as_bytes(), Some("new")), // the kid's key, not the single one
        (NEW, Some("gone")),              // no such key
    ] {
        assert_eq!(
            refusal(&hub, &signed(secret, kid)).await,
            (401, "bad_signature".into()),
            "kid {kid:?}"
        );
    }
    // A JWKS key verifies its own algorithm only.
    let mut header = Header::new(Algorithm::HS512);
    header.kid = Some("new".into());
    let hs512 = jsonwebtoken::encode(&header, &c, &EncodingKey::from_secret(NEW)).unwrap();
    assert_eq!(refusal(&hub, &hs512).await, (401, "wrong_algorithm".into()));
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}");
    out.stdout
}

/// A P-256 key pair: the private key's PEM file and the public key as a JWK.
fn ec_key(dir: &Path, kid: &str) -> (PathBuf, Value) {
    let private = dir.join(format!("{kid}.key"));
    let private_s = private.to_str().unwrap();
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        private_s,
    ]);
    // A P-256 SubjectPublicKeyInfo ends with the point: 0x04, x (32 bytes), y (32 bytes).
    let der = openssl(&["pkey", "-in", private_s, "-pubout", "-outform", "DER"]);
    let point = &der[der.len() - 64..];
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[..32]),
        "y": URL_SAFE_NO_PAD.encode(&point[32..]),
    });
    (private, jwk)
}

#[tokio::test]
async fn hub_token_mints_with_a_public_key_of_the_set_from_its_private_half() {
    let dir = tempfile::tempdir().unwrap();
    let (private, jwk) = ec_key(dir.path(), "ec-2026");
    let (other_private, _) = ec_key(dir.path(), "other");
    let path = dir.path().join("jwks.json");
    // An encryption key in the same file is not a verification key, and is left out.
    let enc = json!({"kty": "oct", "kid": "enc", "use": "enc", "k": "c2hvcnQ"});
    write_set(&path, &[jwk, enc]);
    let set_path = path.clone();
    let hub = TestHub::with(move |s| {
        s.auth.hs256_secret = None;
        s.auth.jwks_file = Some(set_path);
        s.auth.private_key_file = Some(private);
    })
    .await;
    let request = TokenRequest {
        kid: Some("ec-2026".into()),
        ..TokenRequest::new("pi-1", Role::Agent)
    };
    let token = hub.token_for(request.clone());
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(
        (header.alg, header.kid.as_deref()),
        (Algorithm::ES256, Some("ec-2026"))
    );
    assert_eq!(hub.connect(&token).await.hello["sub"], "pi-1");
    assert_eq!(hub.metric("hub_auth_keys").await, 1.0);

    let mut auth = hub.settings.auth.clone();
    auth.private_key_file = Some(other_private);
    assert!(matches!(
        mint(&auth, &request),
        Err(MintError::WrongPrivateKey(_))
    ));
    assert!(matches!(
        mint(&auth, &TokenRequest::new("pi-1", Role::Agent)),
        Err(MintError::KidNeeded)
    ));
    let unknown = TokenRequest {
        kid: Some("enc".into()),
        ..request
    };
    assert!(matches!(
        mint(&auth, &unknown),
        Err(MintError::UnknownKid(_))
    ));
}

#[test]
fn a_hub_does_not_start_on_a_key_file_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let start = |path: &Path| {
        let out = common::process::hub_command(&[
            ("HUB_LISTEN", "127.0.0.1:0"),
            ("HUB_AUTH__JWKS_FILE", path.to_str().unwrap()),
        ])
        .output()
        .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = start(&path);
    assert!(missing.contains("auth.jwks_file"), "{missing}");
    write_set(&path, &[oct("dup", NEW), oct("dup", OLD)]);
    let duplicate = start(&path);
    assert!(
        duplicate.contains("two keys have `kid` `dup`"),
        "{duplicate}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_key_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_set(&path, &[oct("old", OLD)]);
    let path_s = path.to_str().unwrap();
    let hub = HubProcess::start_with(&[
        ("HUB_AUTH__JWKS_FILE", path_s),
        ("HUB_AUTH__JWKS_POLL", "1h"),
    ]);
    let auth = hub::config::AuthSettings {
        jwks_file: Some(path.clone()),
        ..Default::default()
    };
    let token = |kid: &str| {
        mint(
            &auth,
            &TokenRequest {
                kid: Some(kid.into()),
                ..TokenRequest::new("wall-1", Role::Viewer)
            },
        )
        .unwrap()
    };
    let connects = |token: String| async move {
        connect(hub.addr, &format!("/ws?token={token}"), None)
            .await
            .is_ok()
    };
    assert!(connects(token("old")).await);
    write_set(&path, &[oct("old", OLD), oct("new", NEW)]);
    let new = token("new");
    assert!(!connects(new.clone()).await, "polled only hourly");
    hub.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !connects(new.clone()).await {
        assert!(std::time::Instant::now() < deadline, "SIGHUP reloads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(connects(token("old")).await);
}

#[tokio::test]
async fn a_connection_refreshed_onto_the_new_key_survives_the_old_keys_removal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_set(&path, &[oct("old", OLD), oct("new", NEW)]);
    let hub = key_set_hub(&path, true).await;
    let mut moved = hub.connect(&token_with(&hub, "wall-1", "old")).await;
    let mut stayed = hub.connect(&token_with(&hub, "wall-1", "old")).await;
    moved
        .send(json!({"type": "refresh", "token": token_with(&hub, "wall-1", "new")}))
        .await;
    moved.expect("refreshed").await;
    write_set(&path, &[oct("new", NEW)]);
    assert_eq!(stayed.expect_close().await, 4004);
    still_open(&mut moved).await;
}
