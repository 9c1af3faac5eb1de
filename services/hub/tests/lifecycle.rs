//! Start, probes, configuration errors and graceful shutdown, in process and as the real binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{ENV, HubProcess, hub_command};
use common::{SECRET, TestHub, http_get};
use serde_json::json;

#[tokio::test]
async fn probes_and_metrics_answer_over_plain_http() {
    let hub = TestHub::start().await;
    assert_eq!(hub.get("/healthz").await, (200, "ok\n".into()));
    assert_eq!(hub.get("/readyz").await, (200, "ready\n".into()));
    let (status, metrics) = hub.get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "hub_connections",
        "hub_frames_received_total",
        "hub_frames_sent_total",
        "hub_deliveries_total",
        "hub_delivery_drops_total",
        "hub_slow_consumer_disconnects_total",
        "hub_auth_failures_total",
        "hub_publish_to_deliver_seconds",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing"
        );
    }
    let (status, body) = hub.get("/nowhere").await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"],
        "not_found"
    );
    assert_eq!(
        hub.get("/ws").await.0,
        426,
        "a plain GET on /ws is told to upgrade"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_sends_the_restart_code_to_every_client() {
    let hub = TestHub::start().await;
    let mut clients = Vec::new();
    for i in 0..40 {
        clients.push(hub.viewer(&format!("v{i}"), &["fleet"]).await);
    }
    let mut agent = hub.agent("pi-1", &[]).await;
    agent.publish(1, json!({"n": 1})).await;
    clients.push(agent);
    let stopping = tokio::spawn(hub.shutdown());
    for mut client in clients {
        assert_eq!(client.expect_close().await, 1012);
    }
    stopping.await.unwrap();
}

/// Runs `cmd` to completion; a hub that starts instead of refusing its settings is killed and
/// fails the test rather than hanging it.
fn exits_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not exit: it should have refused its settings");
        }
    }
}

fn mint(args: &[&str]) -> String {
    let out = hub_command(ENV).arg("token").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn the_binary_mints_tokens_serves_them_and_drains_on_sigterm() {
    let mut hub = HubProcess::start();
    let viewer = mint(&[
        "--sub",
        "wall",
        "--role",
        "viewer",
        "--ttl",
        "10m",
        "--channels",
        "fleet",
    ]);
    let agent = mint(&["--sub", "pi-9", "--role", "agent", "--groups", "north,lab"]);
    let mut dash = common::connect(hub.addr, &format!("/ws?token={viewer}"), None)
        .await
        .unwrap();
    dash.subscribe("fleet", None).await;
    let bearer = format!("Bearer {agent}");
    let mut pi = common::connect(hub.addr, "/ws", Some(&bearer))
        .await
        .unwrap();
    assert_eq!(pi.publish(1, json!({"t": 20.5})).await["type"], "ack");
    assert_eq!(dash.expect("message").await["data"], json!({"t": 20.5}));
    assert_eq!(http_get(hub.addr, "/readyz").await.0, 200);

    hub.signal("TERM");
    assert_eq!(dash.expect_close().await, 1012);
    assert_eq!(pi.expect_close().await, 1012);
    assert!(hub.wait(Duration::from_secs(10)).success());
}

#[test]
fn invalid_configuration_fails_at_start_naming_the_key() {
    for (env, key) in [
        (vec![("HUB_LISTEN", "127.0.0.1:0")], "auth.hs256_secret"),
        (
            vec![("HUB_AUTH__HS256_SECRET", "short")],
            "auth.hs256_secret",
        ),
        (
            vec![
                ("HUB_AUTH__HS256_SECRET", SECRET),
                ("HUB_LIMITS__MAX_CONNECTIONS", "lots"),
            ],
            "limits.max_connections",
        ),
        (
            vec![
                ("HUB_AUTH__HS256_SECRET", SECRET),
                ("HUB_BROKER__URL", "postgres://127.0.0.1:1"),
            ],
            "broker.url",
        ),
    ] {
        let out = exits_within(hub_command(&env), Duration::from_secs(10));
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "expected `{key}` in: {stderr}");
    }
    // Minting with a weak key is refused too.
    let mut cmd = hub_command(&[("HUB_AUTH__HS256_SECRET", "short")]);
    cmd.args(["token", "--sub", "pi-1", "--role", "agent"]);
    let out = exits_within(cmd, Duration::from_secs(10));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.hs256_secret"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.toml");
    std::fs::write(&file, "[ws]\nping_interval = \"often\"\n").unwrap();
    let mut cmd = hub_command(&[("HUB_AUTH__HS256_SECRET", SECRET)]);
    cmd.arg("--config").arg(&file);
    let out = exits_within(cmd, Duration::from_secs(10));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ws.ping_interval"));
}

#[tokio::test]
async fn a_hub_process_starts_without_redis_and_becomes_ready_when_redis_appears() {
    let mut redis = common::RedisServer::unstarted(false);
    let url = redis.url();
    let hub =
        HubProcess::start_with(&[("HUB_BROKER__URL", &url), ("HUB_BROKER__TIMEOUT", "300ms")]);
    assert_eq!(
        http_get(hub.addr, "/healthz").await.0,
        200,
        "alive without Redis"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        http_get(hub.addr, "/readyz").await.0,
        503,
        "not ready without Redis"
    );
    redis.spawn();
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_get(hub.addr, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent = mint(&["--sub", "pi-1", "--role", "agent"]);
    let mut pi = common::connect(hub.addr, &format!("/ws?token={agent}"), None)
        .await
        .unwrap();
    assert_eq!(pi.publish(1, json!({"t": 1})).await["type"], "ack");
}

#[tokio::test]
async fn metrics_pass_promtool_after_traffic() {
    let hub = TestHub::start().await;
    let mut viewer = hub.viewer("v", &["fleet"]).await;
    let mut agent = hub.agent("pi-1", &[]).await;
    agent.publish(1, json!({"n": 1})).await;
    viewer.messages(1).await;
    let (status, body) = hub.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("hub_publications_total{result=\"accepted\"} 1"),
        "{body}"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus)");
    {
        use std::io::Write;
        let mut stdin = promtool.stdin.take().unwrap();
        stdin.write_all(body.as_bytes()).unwrap();
    }
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut child = hub_command(ENV)
        .env("HUB_LOG__FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let listening = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .take(20)
        .map(|line| serde_json::from_str::<serde_json::Value>(&line).expect("a JSON line"))
        .find(|v| v["message"] == "hub listening");
    let _ = child.kill();
    let _ = child.wait();
    let listening = listening.expect("the listening line");
    assert_eq!(listening["level"], "INFO");
    assert!(
        listening["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );
}
