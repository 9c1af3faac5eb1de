//! The agent as a fleet runs it: real agent processes (simulated sensor) against real hub
//! processes, killed and restarted under them. Every reading the agent took must reach a
//! dashboard exactly once, except those the log's size bound dropped, which are counted.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::tls_proxy::TlsProxy;
use common::{
    Agent, AgentConfig, Dashboard, Hub, Redis, assert_exactly_once, reading_key, stop_drained,
    taken, wait_until, watch_first,
};

const DEVICE: &str = "pi-test";

fn channel() -> String {
    format!("devices.{DEVICE}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_arrive_at_a_subscriber_in_order() {
    let hub = Hub::start();
    let watching = watch_first(&hub, &hub.token("dash", "viewer", "1h"), &channel(), 20);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let token = hub.token(DEVICE, "agent", "1h");
    let mut agent = Agent::start(&AgentConfig::new(&hub, &token));
    let got = watching.await.unwrap();
    agent.stop();

    assert!(got.len() >= 20);
    assert!(
        got.iter()
            .all(|d| d["device"] == DEVICE && d["sensor"] == "simulated"),
        "{:?}",
        got[0]
    );
    let clocks: Vec<u64> = got.iter().map(|d| d["mono_ms"].as_u64().unwrap()).collect();
    assert!(
        clocks.windows(2).all(|w| w[0] < w[1]),
        "in order: {clocks:?}"
    );
    let first = &got[0];
    assert_eq!(first["metrics"]["cpu_temp"]["unit"], "C", "{first}");
    assert!(first["clock_synced"].is_boolean());
    assert!(first["ts"].as_u64() > Some(1_700_000_000_000));
    let health = &got.last().unwrap()["agent"];
    assert!(
        health["buffered"].is_u64() && health["dropped"] == 0 && health["connects"] == 1,
        "the agent's health rides along: {health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_its_own_metrics_when_asked() {
    let hub = Hub::start();
    let token = hub.token(DEVICE, "agent", "1h");
    let port = common::free_port();
    let tail = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut config = AgentConfig::new(&hub, &token);
    config.tail = &tail;
    let mut agent = Agent::start(&config);
    let scrape = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text.split_once("\r\n\r\n")?.1.to_owned())
    };
    let mut body = String::new();
    wait_until(
        "acked readings in /metrics",
        Duration::from_secs(15),
        || {
            body = scrape().unwrap_or_default();
            body.lines().any(|l| {
                l.strip_prefix("edge_agent_acked_readings_total ")
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|v| v > 0)
            })
        },
    );
    agent.stop();
    for series in [
        "edge_agent_buffered_readings",
        "edge_agent_dropped_readings_total 0",
        "edge_agent_connects_total 1",
        "edge_agent_last_ack_age_seconds",
    ] {
        assert!(body.contains(series), "{series} in {body}");
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus)");
    {
        use std::io::Write;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
    }
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_and_restarted_mid_stream_loses_and_duplicates_nothing() {
    let redis = Redis::start();
    let mut hub = Hub::on_redis(&redis);
    let dashboard = Dashboard::follow(&hub, &channel());
    let token = hub.token(DEVICE, "agent", "1h");
    let mut agent = Agent::start(&AgentConfig::new(&hub, &token));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Killed outright, then drained (1012: the agent comes back within a second).
    for drained in [false, true] {
        if drained {
            hub.terminate();
        } else {
            hub.kill();
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        hub.spawn();
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let stats = stop_drained(&mut agent);
    let got = dashboard.readings(stats.last_seq).await;

    assert_eq!(stats.dropped_total, 0);
    assert_exactly_once(&got, stats.last_seq);
    let out = agent.output();
    assert!(out.matches("connected").count() >= 3, "{out}");
    assert!(
        out.contains("code=1012"),
        "the drain was seen as such: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_hangs_is_noticed_by_the_agents_own_timeout() {
    let hub = Hub::start();
    let dashboard = Dashboard::follow(&hub, &channel());
    let token = hub.token(DEVICE, "agent", "1h");
    let mut agent = Agent::start(&AgentConfig::new(&hub, &token));
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Connections stay open but nothing comes back: no acks, no pings.
    hub.freeze(true);
    wait_until(
        "the agent to give up on the link",
        Duration::from_secs(10),
        || agent.output().contains("nothing from the hub for"),
    );
    hub.freeze(false);
    let stats = stop_drained(&mut agent);
    let got = dashboard.readings(stats.last_seq).await;
    assert_exactly_once(&got, stats.last_seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_batch_and_restarted_loses_and_duplicates_nothing() {
    let mut hub = Hub::start();
    let token = hub.token(DEVICE, "agent", "1h");
    // A backlog while the hub is away: the agent sends it in windows when it comes back.
    hub.kill();
    let mut config = AgentConfig::new(&hub, &token);
    config.interval = "5ms";
    let mut agent = Agent::start(&config);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    hub.spawn();
    let dashboard = Dashboard::follow(&hub, &channel());
    // Killed while windows of readings are in flight, several times.
    for pause in [150, 60, 250] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        agent.kill();
        agent.spawn();
    }
    let stats = stop_drained(&mut agent);
    let taken = taken(&agent, &stats);
    let got = dashboard.readings(taken).await;

    assert!(taken > 200, "a real backlog: {taken}");
    assert_eq!(stats.dropped_total, 0);
    assert_exactly_once(&got, taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_link_down_and_a_small_log_the_oldest_are_dropped_counted_and_the_rest_delivered()
{
    let mut hub = Hub::start();
    let token = hub.token(DEVICE, "agent", "1h");
    hub.kill();
    let mut config = AgentConfig::new(&hub, &token);
    config.interval = "5ms";
    config.max_bytes = 32 * 1024;
    config.segment_bytes = 8 * 1024;
    let mut agent = Agent::start(&config);
    // Far more than 32 KiB of readings (each about 300 bytes) while the link is down.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    agent.stop();
    let offline = agent.log_stats();
    assert!(offline.dropped_total > 0, "the bound was reached");
    assert!(offline.pending_records > 0);

    hub.spawn();
    let dashboard = Dashboard::follow(&hub, &channel());
    agent.spawn();
    let stats = stop_drained(&mut agent);
    let got = dashboard
        .readings(stats.last_seq - stats.dropped_total)
        .await;

    // Online the log drains; a starved box (CI) can still hit the small bound while it does,
    // and then those drops are counted too. A reading dropped while in flight may still have
    // been accepted: the count bounds the loss from above, and nothing arrives twice.
    assert!(stats.dropped_total >= offline.dropped_total);
    let kept = stats.last_seq - stats.dropped_total;
    assert!(
        (kept..=stats.last_seq).contains(&(got.len() as u64)),
        "{} delivered, {kept} kept of {} taken",
        got.len(),
        stats.last_seq
    );
    let distinct: BTreeSet<_> = got.iter().map(reading_key).collect();
    assert_eq!(distinct.len(), got.len(), "a reading arrived twice");
    assert!(agent.output().contains("dropped"), "{}", agent.output());
}

/// A backlog goes out a window at a time, each window in one write: the hub stores a window as
/// one publication, so catching up after an outage costs the broker a fraction of the calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_reaches_the_hub_in_windows_stored_as_few_publications() {
    let mut hub = Hub::start();
    let token = hub.token(DEVICE, "agent", "1h");
    hub.kill();
    let mut config = AgentConfig::new(&hub, &token);
    config.interval = "5ms";
    let mut agent = Agent::start(&config);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.stop();
    let backlog = agent.log_stats().pending_records;
    assert!(backlog >= 100, "a backlog of {backlog}");

    // Online it takes few readings more: what the hub sees is the backlog.
    let config_file = agent.dir.path().join("agent.toml");
    let toml = std::fs::read_to_string(&config_file).unwrap();
    std::fs::write(
        &config_file,
        toml.replace(r#"interval = "5ms""#, r#"interval = "1h""#),
    )
    .unwrap();
    hub.spawn();
    let dashboard = Dashboard::follow(&hub, &channel());
    agent.spawn();
    let stats = stop_drained(&mut agent);
    let got = dashboard.readings(taken(&agent, &stats)).await;
    assert_exactly_once(&got, taken(&agent, &stats));

    let readings = hub.metric("hub_publish_batch_readings_sum");
    let publications = hub.metric("hub_publish_batch_readings_count");
    assert!(readings >= backlog as f64, "{readings} of {backlog}");
    // Windows of at least 8 (32 right after connecting); one sent a reading at a time
    // made about 4 per publication, by the luck of what the hub read at once.
    assert!(
        publications * 6.0 <= readings,
        "{readings} readings took {publications} publications"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_is_cut_off_and_the_agent_carries_on() {
    let mut hub = Hub::start();
    let token = hub.token(DEVICE, "agent", "1h");
    hub.kill();
    let mut agent = Agent::start(&AgentConfig::new(&hub, &token));
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.kill();
    // A power cut in the middle of a write: half a record header and garbage at the end.
    let segment = std::fs::read_dir(agent.data_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .max()
        .expect("a segment file");
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.extend_from_slice(&[0x2a, 0x00, 0x00, 0x00, 0xde, 0xad]);
    std::fs::write(&segment, bytes).unwrap();
    let before = agent.log_stats().last_seq;

    hub.spawn();
    let dashboard = Dashboard::follow(&hub, &channel());
    agent.spawn();
    let stats = stop_drained(&mut agent);
    let taken = taken(&agent, &stats);
    let got = dashboard.readings(taken).await;
    assert!(stats.last_seq > before);
    assert_exactly_once(&got, taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_reported_and_retried_only_after_the_auth_backoff() {
    let hub = Hub::start();
    let token = hub.token(DEVICE, "agent", "1s");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut agent = Agent::start(&AgentConfig::new(&hub, &token));
    wait_until("the refusal in the log", Duration::from_secs(10), || {
        agent.output().contains("refused this device's token")
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(agent.is_running(), "the agent keeps running");
    assert_eq!(
        hub.metric("hub_auth_failures_total{reason=\"expired\"}"),
        1.0,
        "one attempt, then the long auth backoff (30 s here)"
    );
    let out = agent.output();
    assert!(out.contains("expired"), "the reason is logged: {out}");
    agent.stop();
    assert!(agent.log_stats().pending_records > 0, "readings are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_token_in_the_file_refreshes_the_connection_instead_of_reconnecting() {
    let hub = Hub::start_with_env(&[("HUB_AUTH__LEEWAY", "0s")]);
    let short = hub.token(DEVICE, "agent", "4s");
    let mut agent = Agent::start(&AgentConfig::new(&hub, &short));
    wait_until("connected", Duration::from_secs(10), || {
        hub.metric("hub_connections{role=\"agent\"}") == 1.0
    });
    std::fs::write(
        agent.dir.path().join("token"),
        hub.token(DEVICE, "agent", "1h"),
    )
    .unwrap();
    let refreshed = || hub.metric("hub_token_refreshes_total{result=\"refreshed\"}") == 1.0;
    for _ in 0..100 {
        if refreshed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refreshed(), "no refresh: {}", agent.output());
    // Past the first token's expiry: the same connection, still publishing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let acked = agent_acked(&hub);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(agent_acked(&hub) > acked, "readings still flow");
    assert_eq!(
        hub.metric("hub_connections_opened_total{role=\"agent\"}"),
        1.0
    );
    assert_eq!(
        hub.metric("hub_disconnects_total{reason=\"token_expired\"}"),
        0.0
    );
    agent.stop();
    assert!(
        agent.output().contains("the hub took the new token"),
        "{}",
        agent.output()
    );
}

fn agent_acked(hub: &Hub) -> f64 {
    hub.metric("hub_publications_total{result=\"accepted\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_another_key_is_refused_the_same_way() {
    let hub = Hub::start();
    // Signed with another key: the hub answers 401 bad_signature.
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwaS10ZXN0Iiwicm9sZSI6ImFnZW50IiwiZXhwIjo0MTAyNDQ0ODAwfQ.c2lnbmF0dXJl";
    let mut agent = Agent::start(&AgentConfig::new(&hub, forged));
    wait_until("the refusal in the log", Duration::from_secs(10), || {
        agent.output().contains("refused this device's token")
    });
    assert!(agent.output().contains("401"), "{}", agent.output());
    assert!(agent.is_running());
    agent.stop();
}

#[test]
fn check_config_prints_the_effective_settings_with_the_token_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwaS0wNyJ9.c2VjcmV0LXNpZ25hdHVyZQ";
    std::fs::write(
        &file,
        format!("[auth]\ntoken = \"{token}\"\n[[sensors]]\nkind = \"cpu_temp\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .env("AGENT_HUB__URL", "wss://hub.example.com/ws")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("url = \"wss://hub.example.com/ws\""),
        "env wins: {text}"
    );
    assert!(!text.contains("c2VjcmV0"), "token masked: {text}");
    assert!(text.contains("cpu_temp"), "{text}");

    std::fs::write(&file, "[hub]\nurl = \"http://nope\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ws://"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_disk_was_wiped_renumbers_its_readings_above_what_the_hub_knows() {
    let redis = Redis::start();
    let mut hub = Hub::on_redis(&redis);
    let dashboard = Dashboard::follow(&hub, &channel());
    let token = hub.token(DEVICE, "agent", "1h");
    let mut agent = Agent::start(&AgentConfig::new(&hub, &token));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = stop_drained(&mut agent).last_seq;

    // A new SD card: the log starts again at seq 1, and takes readings before it can reach the
    // hub, which remembers seqs up to `before` for this device.
    std::fs::remove_dir_all(agent.data_dir()).unwrap();
    hub.kill();
    agent.spawn();
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.spawn();
    let after = stop_drained(&mut agent);
    let got = dashboard.readings(after.last_seq).await;

    assert!(after.last_seq > before, "numbered above the hub's last_seq");
    assert_exactly_once(&got, after.last_seq);
    assert_eq!(
        hub.metric("hub_publications_total{result=\"duplicate\"}"),
        0.0,
        "nothing was mistaken for a duplicate"
    );
    assert!(agent.output().contains("renumbered"), "{}", agent.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_agent_that_connects_while_redis_cannot_answer_loses_nothing() {
    let redis = Redis::start();
    // A short broker timeout, well inside the 5 s stall below: the hub gives up on Redis while
    // it still stalls, however slowly a busy machine starts the agent.
    let hub = Hub::on_redis_with(&redis, "hub-stalled", &[("HUB_BROKER__TIMEOUT", "500ms")]);
    let dashboard = Dashboard::follow(&hub, &channel());
    let token = hub.token(DEVICE, "agent", "1h");
    let mut agent = Agent::start(&AgentConfig::new(&hub, &token));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = stop_drained(&mut agent).last_seq;

    // A new SD card, and the hub's Redis stalls (longer than broker.timeout) just as the agent
    // connects: the hub cannot say which seqs it has from this device.
    std::fs::remove_dir_all(agent.data_dir()).unwrap();
    redis.pause(5000);
    agent.spawn();
    wait_until(
        "the hub to turn the agent away with 1013",
        Duration::from_secs(10),
        || agent.output().contains("code=1013"),
    );
    let after = stop_drained(&mut agent);
    let taken = taken(&agent, &after);
    let got = dashboard.readings(taken).await;

    assert!(after.last_seq > before, "numbered above the hub's last_seq");
    assert_exactly_once(&got, taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reaches_a_hub_over_wss_trusting_a_configured_ca_only() {
    let hub = Hub::start();
    let proxy = TlsProxy::start(&hub);
    let token = hub.token(DEVICE, "agent", "1h");
    let watching = watch_first(&hub, &hub.token("dash", "viewer", "1h"), &channel(), 5);
    let mut config = AgentConfig::new(&hub, &token);
    config.url = format!("wss://localhost:{}/ws", proxy.port);
    let ca_line = format!("ca_file = \"{}\"", proxy.ca().display());
    config.hub_extra = &ca_line;
    let mut agent = Agent::start(&config);
    let got = watching.await.unwrap();
    agent.stop();
    assert!(got.len() >= 5);

    // Without the CA the system roots do not know this certificate: the agent says why.
    let mut config = AgentConfig::new(&hub, &token);
    config.url = format!("wss://localhost:{}/ws", proxy.port);
    let mut untrusted = Agent::start(&config);
    wait_until("a TLS error in the log", Duration::from_secs(10), || {
        untrusted.output().contains("TLS with localhost")
    });
    untrusted.stop();
}
