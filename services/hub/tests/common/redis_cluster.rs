//! A real Redis Cluster for the tests: `redis-server` processes in cluster mode on loopback
//! ports, each in its own temp dir, joined by `redis-cli --cluster create`, killed on drop.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Settings, TestHub};

pub struct RedisCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

struct Node {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

/// A port whose cluster bus port (+10000) is free too, both below the kernel's ephemeral range
/// where it leaves room. A port taken from that range and let go can be given to any outgoing
/// connection before redis-server binds it, and the node then never starts (CI saw it); below
/// the range only another listener can hold it, and this process hands each port out once.
fn free_port_pair() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let bindable = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (12_000, ephemeral_from.saturating_sub(BUS_OFFSET));
    if high > low {
        // Processes that run at once start from different places.
        let span = high - low;
        let start = (std::process::id() % u32::from(span)) as u16;
        for i in 0..span {
            let port = low + (start + i) % span;
            if !handed_out.contains(&port) && bindable(port) && bindable(port + BUS_OFFSET) {
                handed_out.insert(port);
                return port;
            }
        }
    }
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 50000 && !handed_out.contains(&port) && bindable(port + BUS_OFFSET) {
            handed_out.insert(port);
            return port;
        }
    }
}

/// Redis Cluster's bus listens this far above the client port.
const BUS_OFFSET: u16 = 10_000;

impl Node {
    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "1000"])
            // A shard whose master is gone serves nothing; the others keep working.
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_cli(self.port, &["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server :{} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `redis-cli -p port args…`, its output trimmed; `None` when it fails.
pub fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl RedisCluster {
    /// `masters` shards with no replicas, every slot covered.
    pub fn start(masters: usize) -> RedisCluster {
        RedisCluster::with_replicas(masters, 0)
    }

    /// `masters` shards, each with `replicas` replicas that take over when it fails.
    pub fn with_replicas(masters: usize, replicas: usize) -> RedisCluster {
        let mut cluster = RedisCluster::planned(masters * (1 + replicas));
        cluster.launch(replicas);
        cluster
    }

    /// Ports and directories for `nodes` nodes, none running yet: `urls` already names them.
    pub fn planned(nodes: usize) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes = (0..nodes)
            .map(|i| {
                let node_dir = dir.path().join(format!("node-{i}"));
                std::fs::create_dir_all(&node_dir).unwrap();
                Node {
                    port: free_port_pair(),
                    dir: node_dir,
                    child: None,
                }
            })
            .collect();
        RedisCluster { nodes, _dir: dir }
    }

    /// Starts every node of a planned cluster and joins them, `replicas` per master.
    pub fn launch(&mut self, replicas: usize) {
        for node in &mut self.nodes {
            node.spawn();
        }
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli is installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        self.wait_ok();
    }

    /// Waits until every running node says the cluster is ok and every replica is in sync.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let info = redis_cli(node.port, &["CLUSTER", "INFO"]).unwrap_or_default();
                let replication =
                    redis_cli(node.port, &["INFO", "replication"]).unwrap_or_default();
                let synced = !replication.contains("role:slave")
                    || replication.contains("master_link_status:up");
                if info.contains("cluster_state:ok") && synced {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster never became ok: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Seed URLs for `broker.cluster_nodes`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The port of the master that owns `key`'s slot.
    pub fn owner_of(&self, key: &str) -> u16 {
        let slot: u16 = redis_cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.parse().ok())
            .expect("CLUSTER KEYSLOT");
        self.nodes
            .iter()
            .find(|n| owns(n.port, slot))
            .map(|n| n.port)
            .expect("some node owns every slot")
    }

    /// The ports of the running masters.
    pub fn masters(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .filter(|port| {
                redis_cli(*port, &["INFO", "replication"])
                    .is_some_and(|i| i.contains("role:master"))
            })
            .collect()
    }

    /// Another master than the one at `port`.
    pub fn other_than(&self, port: u16) -> u16 {
        self.nodes
            .iter()
            .map(|n| n.port)
            .find(|p| *p != port && self.running(*p))
            .expect("another running master")
    }

    fn running(&self, port: u16) -> bool {
        self.nodes
            .iter()
            .any(|n| n.port == port && n.child.is_some())
    }

    /// Moves `key`'s slot, with every key in it, to the master at `to`, as `redis-cli --cluster
    /// reshard` does slot by slot: IMPORTING/MIGRATING, MIGRATE the keys, then the new owner
    /// announced to every node.
    pub fn migrate_slot_of(&self, key: &str, to: u16) {
        let from = self.owner_of(key);
        let slot = redis_cli(from, &["CLUSTER", "KEYSLOT", key]).expect("CLUSTER KEYSLOT");
        let id = |port| redis_cli(port, &["CLUSTER", "MYID"]).expect("CLUSTER MYID");
        let (from_id, to_id) = (id(from), id(to));
        let ok = |port, args: &[&str]| {
            let out = redis_cli(port, args).unwrap_or_default();
            assert!(!out.starts_with("ERR"), "{args:?} on :{port}: {out}");
            out
        };
        ok(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
        ok(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
        loop {
            let keys = ok(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            ok(from, &args);
        }
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            ok(node.port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
        assert_eq!(self.owner_of(key), to);
    }

    /// The port of the replica of the master at `master`.
    pub fn replica_of(&self, master: u16) -> u16 {
        let id = redis_cli(master, &["CLUSTER", "MYID"]).expect("CLUSTER MYID");
        let nodes = redis_cli(master, &["CLUSTER", "NODES"]).unwrap_or_default();
        nodes
            .lines()
            .find(|l| l.split_whitespace().nth(3) == Some(id.as_str()))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|addr| addr.split(['@', ':']).nth(1))
            .and_then(|port| port.parse().ok())
            .expect("a replica of this master")
    }

    /// Sends `signal` (`STOP`, `CONT`) to the node at `port`: a stopped replica stops
    /// replicating.
    pub fn signal(&self, port: u16, signal: &str) {
        let node = self.nodes.iter().find(|n| n.port == port).expect("a node");
        let pid = node.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    }

    /// Pauses the node's clients for `ms` (its slots stop answering, as if it hung).
    pub fn pause(&self, port: u16, ms: u64) {
        redis_cli(port, &["CLIENT", "PAUSE", &ms.to_string(), "ALL"]).expect("CLIENT PAUSE");
    }

    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            node.kill();
        }
    }
}

/// Whether the node at `port` is the master of `slot`, by its own CLUSTER SLOTS view.
fn owns(port: u16, slot: u16) -> bool {
    let Some(myself) = redis_cli(port, &["CLUSTER", "MYID"]) else {
        return false;
    };
    let nodes = redis_cli(port, &["CLUSTER", "NODES"]).unwrap_or_default();
    nodes
        .lines()
        .find(|l| l.starts_with(&myself))
        .is_some_and(|line| {
            line.split_whitespace().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            })
        })
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

impl TestHub {
    /// A hub on the Redis Cluster, with quick repair intervals for tests. Its channels are one
    /// log each (`broker.partitions = 1`), so a test can name the shard of `fleet`; tests of
    /// partitions (tests/partitions.rs) set their own.
    pub async fn on_cluster(cluster: &RedisCluster) -> TestHub {
        TestHub::on_cluster_with(cluster, |_| {}).await
    }

    pub async fn on_cluster_with(
        cluster: &RedisCluster,
        configure: impl FnOnce(&mut Settings),
    ) -> TestHub {
        let nodes = cluster.urls();
        TestHub::on_shared_redis(|s| {
            s.broker.cluster_nodes = nodes;
            s.broker.partitions = Some(1);
            configure(s);
        })
        .await
    }
}
