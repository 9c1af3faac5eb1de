//! Fault drills on a real pool: `nginx/local-cluster.sh` starts redis-server (or a Redis Cluster of
//! three masters), three hub processes and nginx on loopback; clients that reconnect and resume
//! like real ones must end with every reading exactly once whatever is killed under them.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Followed, connect, follow, publish_all};
use hub::config::AuthSettings;
use hub::token::{TokenRequest, mint};
use hub_protocol::Role;
use serde_json::Value;

struct Cluster {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
    nginx: SocketAddr,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../nginx/local-cluster.sh")
}

/// What the pool's hubs share.
#[derive(Clone, Copy)]
enum Redis {
    One,
    /// A Redis Cluster of three masters.
    Cluster,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_on(Redis::One)
    }

    fn start_on(redis: Redis) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let masters = match redis {
            Redis::One => "0",
            Redis::Cluster => "3",
        };
        let out = Command::new("bash")
            .arg(script())
            .args(["start", "--hubs", "3", "--redis-cluster", masters, "--dir"])
            .arg(dir.path())
            .env("HUB_BIN", env!("CARGO_BIN_EXE_hub"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("cluster.env")).unwrap();
        let env: HashMap<_, _> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let nginx = env["NGINX_ADDR"].parse().unwrap();
        Cluster { dir, env, nginx }
    }

    fn run(&self, command: &str) {
        let status = Command::new("bash")
            .arg(script())
            .args([command, "--dir"])
            .arg(self.dir.path())
            .status();
        assert!(status.unwrap().success(), "{command}");
    }

    fn token(&self, sub: &str, role: Role) -> String {
        let auth = AuthSettings {
            hs256_secret: Some(self.env["HUB_AUTH__HS256_SECRET"].clone()),
            ..Default::default()
        };
        mint(&auth, &TokenRequest::new(sub, role)).unwrap()
    }

    fn signal_hub(&self, hub: &str, signal: &str) {
        let pid = &self.env[&format!("HUB_{}_PID", hub.trim_start_matches("hub-"))];
        assert!(
            Command::new("kill")
                .args([&format!("-{signal}"), pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Which hub nginx sends each of a few client ids to.
    async fn placement(&self, token: &str) -> HashMap<String, Vec<String>> {
        let mut by_hub: HashMap<String, Vec<String>> = HashMap::new();
        for i in 0..60 {
            let client = format!("client-{i}");
            let c = connect(
                self.nginx,
                &format!("/ws?client={client}&token={token}"),
                None,
            )
            .await
            .unwrap();
            by_hub
                .entry(c.hello["hub"].as_str().unwrap().to_owned())
                .or_default()
                .push(client);
        }
        by_hub
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", "--dir"])
            .arg(self.dir.path())
            .status();
    }
}

/// Seqs of device `pi-1`'s readings as a follower saw them.
fn seqs(seen: &Followed) -> Vec<u64> {
    seen.messages
        .iter()
        .map(|m| m["data"]["seq"].as_u64().unwrap())
        .collect()
}

fn assert_exactly_once(seen: &Followed, count: u64) {
    assert_eq!(seen.holes, 0, "no resume was refused: {seen:?}");
    let offsets: Vec<u64> = seen
        .messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        offsets,
        (1..=count).collect::<Vec<_>>(),
        "gapless, in order, no duplicate"
    );
    assert_eq!(seqs(seen), (1..=count).collect::<Vec<_>>());
}

/// Two followers on each hub of `devices.pi-1`; the agent publishes `count` readings while
/// `fault` runs once a third of them is out.
async fn drill(
    cluster: &Cluster,
    count: u64,
    fault: impl FnOnce(&str),
) -> (Vec<(String, Followed)>, common::Published) {
    let viewer = cluster.token("wall", Role::Viewer);
    let placement = cluster.placement(&viewer).await;
    assert_eq!(
        placement.len(),
        3,
        "client ids spread over every hub: {placement:?}"
    );
    let mut followers = Vec::new();
    for (hub, clients) in &placement {
        for client in clients.iter().take(2) {
            let (addr, token, client, hub) =
                (cluster.nginx, viewer.clone(), client.clone(), hub.clone());
            followers.push(tokio::spawn(async move {
                let seen = follow(addr, &token, &client, "devices.pi-1", |m| {
                    m.len() as u64 >= count
                })
                .await;
                (hub, seen)
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agent = cluster.token("pi-1", Role::Agent);
    let addr = cluster.nginx;
    let publisher = tokio::spawn(async move {
        publish_all(addr, &agent, "agent-1", count, Duration::from_millis(4)).await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    fault("hub-2");
    let published = publisher.await.unwrap();
    let mut results = Vec::new();
    for f in followers {
        results.push(f.await.unwrap());
    }
    (results, published)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_lands_on_the_same_hub_while_it_lives() {
    let cluster = Cluster::start();
    let token = cluster.token("wall", Role::Viewer);
    let mut hubs = BTreeSet::new();
    // Twelve ids: the hash ring depends on the hubs' ephemeral ports, so a handful could all
    // land on one hub by chance.
    for i in 0..12 {
        let client = format!("client-{i}");
        let path = format!("/ws?client={client}&token={token}");
        let first = connect(cluster.nginx, &path, None).await.unwrap().hello["hub"].clone();
        for _ in 0..3 {
            let again = connect(cluster.nginx, &path, None).await.unwrap();
            assert_eq!(again.hello["hub"], first, "{client} moved");
        }
        hubs.insert(first.as_str().unwrap().to_owned());
    }
    assert!(hubs.len() >= 2, "different clients spread: {hubs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_published_on_two_hubs_reach_viewers_on_all_three_in_one_order() {
    two_hubs_publishing_at_once(Redis::One).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_readings_published_on_two_hubs_reach_viewers_on_all_three_in_one_order()
{
    two_hubs_publishing_at_once(Redis::Cluster).await;
}

async fn two_hubs_publishing_at_once(redis: Redis) {
    let cluster = Cluster::start_on(redis);
    let viewer = cluster.token("wall", Role::Viewer);
    let placement = cluster.placement(&viewer).await;
    let mut followers = Vec::new();
    for clients in placement.values() {
        let (addr, token, client) = (cluster.nginx, viewer.clone(), clients[0].clone());
        followers.push(tokio::spawn(async move {
            follow(addr, &token, &client, "fleet", |m| m.len() >= 200).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Two agents whose client ids nginx sends to two different hubs publish at once.
    let mut hubs = placement.keys();
    let (first, second) = (hubs.next().unwrap().clone(), hubs.next().unwrap().clone());
    let mut agents = Vec::new();
    for (device, hub) in [("pi-1", first), ("pi-2", second)] {
        let client = placement[&hub][0].clone();
        let (addr, token) = (cluster.nginx, cluster.token(device, Role::Agent));
        agents.push(tokio::spawn(async move {
            let report = publish_all(addr, &token, &client, 100, Duration::ZERO).await;
            assert_eq!(report.hubs, [hub]);
        }));
    }
    for agent in agents {
        agent.await.unwrap();
    }
    let mut orders = Vec::new();
    for f in followers {
        let seen = f.await.unwrap();
        // On a cluster `fleet` is split into partitions: one order per partition, offsets
        // gapless in each.
        let mut by_part: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for m in &seen.messages {
            let part = m["part"].as_u64().unwrap_or(0);
            by_part
                .entry(part)
                .or_default()
                .push(m["offset"].as_u64().unwrap());
        }
        for offsets in by_part.values() {
            assert_eq!(offsets, &(1..=offsets.len() as u64).collect::<Vec<_>>());
        }
        assert_eq!(by_part.values().map(Vec::len).sum::<usize>(), 200);
        for device in ["pi-1", "pi-2"] {
            let mine: Vec<u64> = seen
                .messages
                .iter()
                .filter(|m| m["from"] == device)
                .map(|m| m["data"]["seq"].as_u64().unwrap())
                .collect();
            assert_eq!(mine, (1..=100).collect::<Vec<_>>());
        }
        let mut order: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
        for m in &seen.messages {
            let part = m["part"].as_u64().unwrap_or(0);
            order.entry(part).or_default().push(m["from"].clone());
        }
        orders.push(order);
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "every hub delivers each partition in the same order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_mid_stream_loses_nothing() {
    a_hub_killed_mid_stream(Redis::One).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_hub_killed_mid_stream_loses_nothing() {
    a_hub_killed_mid_stream(Redis::Cluster).await;
}

async fn a_hub_killed_mid_stream(redis: Redis) {
    let cluster = Cluster::start_on(redis);
    let (results, _) = drill(&cluster, 300, |hub| cluster.signal_hub(hub, "KILL")).await;
    for (hub, seen) in &results {
        assert_exactly_once(seen, 300);
        if hub == "hub-2" {
            assert!(
                seen.hubs.len() >= 2 && seen.hubs[1..].iter().all(|h| h != "hub-2"),
                "{seen:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stopped_with_sigterm_sends_its_clients_elsewhere_with_1012() {
    a_hub_stopped_with_sigterm(Redis::One).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_hub_stopped_with_sigterm_sends_its_clients_elsewhere_with_1012() {
    a_hub_stopped_with_sigterm(Redis::Cluster).await;
}

async fn a_hub_stopped_with_sigterm(redis: Redis) {
    let cluster = Cluster::start_on(redis);
    let (results, _) = drill(&cluster, 300, |hub| cluster.signal_hub(hub, "TERM")).await;
    for (hub, seen) in &results {
        assert_exactly_once(seen, 300);
        if hub == "hub-2" {
            assert_eq!(seen.closes.first(), Some(&1012), "{seen:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarting_mid_stream_loses_no_acknowledged_reading() {
    redis_restarting_mid_stream(Redis::One).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_redis_restarting_mid_stream_loses_no_acknowledged_reading() {
    redis_restarting_mid_stream(Redis::Cluster).await;
}

async fn redis_restarting_mid_stream(redis: Redis) {
    let cluster = Cluster::start_on(redis);
    let (results, published) = drill(&cluster, 300, |_| {
        cluster.run("redis-stop");
        std::thread::sleep(Duration::from_millis(700));
        cluster.run("redis-start");
    })
    .await;
    assert!(
        published.retried > 0,
        "publishes during the outage were refused and resent"
    );
    for (_, seen) in &results {
        assert_exactly_once(seen, 300);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_door_serves_the_dashboard_and_logs_no_token() {
    let cluster = Cluster::start();
    let token = cluster.token("wall", Role::Viewer);
    for path in ["/", "/dashboard.js", "/dashboard.css", "/fleet-client.js"] {
        let (status, body) =
            common::http_get(cluster.nginx, &format!("{path}?token={token}")).await;
        assert_eq!(status, 200, "{path}");
        assert!(!body.is_empty(), "{path}");
    }
    for inside in ["/metrics", "/readyz", "/healthz"] {
        assert_eq!(
            common::http_get(cluster.nginx, inside).await.0,
            404,
            "{inside} is not public"
        );
    }
    let mut viewer = connect(
        cluster.nginx,
        &format!("/ws?client=wall-1&token={token}"),
        None,
    )
    .await
    .unwrap();
    viewer.subscribe("fleet", None).await;
    drop(viewer);
    let log = cluster.dir.path().join("nginx-access.log");
    let mut text = String::new();
    for _ in 0..50 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("GET /ws") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        text.contains("GET /ws") && text.contains("GET /dashboard.js"),
        "{text}"
    );
    assert!(
        !text.contains(&token) && !text.contains("token="),
        "a token in the access log:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_past_the_front_doors_request_limit_gets_429() {
    let cluster = Cluster::start();
    // Far past the burst (500) within a second, all from 127.0.0.1: nginx answers some itself.
    let mut statuses = std::collections::BTreeMap::new();
    let tasks: Vec<_> = (0..800)
        .map(|_| {
            let addr = cluster.nginx;
            tokio::spawn(async move { connect(addr, "/ws", None).await.err().map(|r| r.status) })
        })
        .collect();
    for task in tasks {
        *statuses.entry(task.await.unwrap()).or_insert(0) += 1;
    }
    assert!(
        statuses.get(&Some(429)).copied().unwrap_or(0) > 0,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&Some(401)).copied().unwrap_or(0) > 0,
        "the hubs answered the rest: {statuses:?}"
    );
}
