//! Real processes for the agent's tests: a hub process (the workspace's `hub` binary) on a fixed
//! loopback port so it can be killed and started again, an optional private redis-server, agent
//! processes with their own storage directory, and a viewer that resumes like a dashboard.

#![allow(dead_code)]

pub mod collector;
pub mod tls_proxy;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload};
use hub_client::{DialOptions, Dialer};
use serde_json::{Value, json};

pub const SECRET: &str = "edge-agent-test-secret-of-32-bytes!!";

/// The hub binary cargo built beside the agent (`cargo test --workspace` builds both).
fn hub_bin() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_edge-agent")).with_file_name("hub");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p hub` or `cargo test --workspace`",
        path.display()
    );
    path
}

/// The agent binary: `bin`, else what `EDGE_AGENT_BIN` names (a Pi build), else the host's;
/// run through `EDGE_AGENT_RUNNER` (e.g. `qemu-aarch64`) when that is set.
pub fn agent_command(bin: Option<&Path>) -> Command {
    let bin = bin.map_or_else(
        || {
            std::env::var("EDGE_AGENT_BIN")
                .unwrap_or_else(|_| env!("CARGO_BIN_EXE_edge-agent").to_owned())
                .into()
        },
        Path::to_path_buf,
    );
    match std::env::var("EDGE_AGENT_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut parts = runner.split_whitespace();
            let mut cmd = Command::new(parts.next().unwrap_or("env"));
            cmd.args(parts).arg(bin);
            cmd
        }
        _ => Command::new(bin),
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name} {pid}");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Redis {
    dir: tempfile::TempDir,
    child: Child,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(dir.path().join("redis.sock"))
            .args(["--unixsocketperm", "700", "--dir"])
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let socket = dir.path().join("redis.sock");
        wait_until("redis-server", Duration::from_secs(10), || socket.exists());
        Redis { dir, child }
    }

    pub fn url(&self) -> String {
        format!(
            "redis+unix://{}",
            self.dir.path().join("redis.sock").display()
        )
    }

    /// `CLIENT PAUSE`: every client's commands wait for `ms` milliseconds.
    pub fn pause(&self, ms: u64) {
        let status = Command::new("redis-cli")
            .arg("-s")
            .arg(self.dir.path().join("redis.sock"))
            .args(["CLIENT", "PAUSE", &ms.to_string(), "ALL"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli is installed");
        assert!(status.success(), "CLIENT PAUSE");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hub process on a fixed port.
pub struct Hub {
    pub addr: SocketAddr,
    broker: Option<String>,
    node_id: String,
    /// More environment for the hub process.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Hub {
    /// On the embedded broker.
    pub fn start() -> Hub {
        Hub::start_with(None)
    }

    /// On Redis: its dedup state and history survive the hub process.
    pub fn on_redis(redis: &Redis) -> Hub {
        Hub::start_with(Some(redis.url()))
    }

    /// On Redis, named `node_id`, with more environment (e.g. `OTEL_*`).
    pub fn on_redis_with(redis: &Redis, node_id: &str, env: &[(&str, &str)]) -> Hub {
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Hub::start_full(Some(redis.url()), node_id, env)
    }

    /// On the embedded broker, with more environment.
    pub fn start_with_env(env: &[(&str, &str)]) -> Hub {
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Hub::start_full(None, "test-hub", env)
    }

    fn start_with(broker: Option<String>) -> Hub {
        Hub::start_full(broker, "test-hub", Vec::new())
    }

    fn start_full(broker: Option<String>, node_id: &str, env: Vec<(String, String)>) -> Hub {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut hub = Hub {
            addr,
            broker,
            node_id: node_id.to_owned(),
            env,
            child: None,
        };
        hub.spawn();
        hub
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(hub_bin());
        cmd.env("HUB_LISTEN", self.addr.to_string())
            .env("HUB_AUTH__HS256_SECRET", SECRET)
            .env("HUB_NODE_ID", &self.node_id)
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(url) = &self.broker {
            cmd.env("HUB_BROKER__URL", url);
        }
        cmd
    }

    pub fn spawn(&mut self) {
        let child = self
            .command()
            .arg("serve")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the hub");
        self.child = Some(child);
        let addr = self.addr;
        wait_until("the hub to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr).is_ok()
        });
    }

    /// SIGKILL: no drain, no close frames.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM: the hub drains, closing every connection with 1012, and exits.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            let _ = child.wait();
        }
    }

    /// SIGSTOP / SIGCONT: a hub that hangs with its connections open.
    pub fn freeze(&self, frozen: bool) {
        if let Some(child) = &self.child {
            signal(child.id(), if frozen { "STOP" } else { "CONT" });
        }
    }

    pub fn token(&self, sub: &str, role: &str, ttl: &str) -> String {
        let out = self
            .command()
            .args(["token", "--sub", sub, "--role", role, "--ttl", ttl])
            .output()
            .expect("hub token");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// One series of `/metrics`, 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(self.addr) else {
            return 0.0;
        };
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        );
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent process with its own storage directory and config file.
pub struct Agent {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    log: PathBuf,
    /// The binary, when not the default of [`agent_command`].
    bin: Option<PathBuf>,
    config: PathBuf,
    data_dir: PathBuf,
    env: Vec<(String, String)>,
}

/// An agent as a package installed it: its binary, settings file and storage directory, and
/// the environment its systemd unit sets.
pub struct Installed {
    pub bin: PathBuf,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub env: Vec<(String, String)>,
}

pub struct AgentConfig<'a> {
    pub url: String,
    pub token: &'a str,
    pub interval: &'a str,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    /// More lines for the `[hub]` table.
    pub hub_extra: &'a str,
    /// More tables at the end of the file.
    pub tail: &'a str,
}

impl<'a> AgentConfig<'a> {
    pub fn new(hub: &Hub, token: &'a str) -> Self {
        AgentConfig {
            url: hub.url(),
            token,
            interval: "20ms",
            max_bytes: 8 * 1024 * 1024,
            segment_bytes: 64 * 1024,
            hub_extra: "",
            tail: "",
        }
    }
}

impl Agent {
    pub fn start(config: &AgentConfig<'_>) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), config.token).unwrap();
        let toml = format!(
            r#"
[hub]
url = "{url}"
backoff_base = "50ms"
backoff_cap = "500ms"
auth_backoff = "30s"
dead_after = "2s"
publish_rate = 500.0
{hub_extra}

[auth]
token_file = "{dir}/token"

[storage]
dir = "{dir}/data"
max_bytes = {max_bytes}
segment_bytes = {segment_bytes}
fsync_interval = "100ms"

[[sensors]]
kind = "simulated"
interval = "{interval}"
{tail}
"#,
            url = config.url,
            dir = dir.path().display(),
            max_bytes = config.max_bytes,
            segment_bytes = config.segment_bytes,
            interval = config.interval,
            hub_extra = config.hub_extra,
            tail = config.tail,
        );
        std::fs::write(dir.path().join("agent.toml"), toml).unwrap();
        let log = dir.path().join("agent.log");
        let mut agent = Agent {
            config: dir.path().join("agent.toml"),
            data_dir: dir.path().join("data"),
            dir,
            child: None,
            log,
            bin: None,
            env: Vec::new(),
        };
        agent.spawn();
        agent
    }

    /// Runs an installed agent (its own binary, settings and storage); output goes to a temp dir.
    pub fn start_installed(installed: Installed) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("agent.log");
        let mut agent = Agent {
            dir,
            child: None,
            log,
            bin: Some(installed.bin),
            config: installed.config,
            data_dir: installed.data_dir,
            env: installed.env,
        };
        agent.spawn();
        agent
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = agent_command(self.bin.as_deref())
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent");
        self.child = Some(child);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// What the agent has logged so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: the agent syncs its log and exits 0.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(status.success(), "agent exit: {status}\n{}", self.output());
                    return;
                }
                assert!(Instant::now() < deadline, "agent did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The log as the agent left it (the agent must be stopped).
    pub fn log_stats(&self) -> edge_agent::store::Stats {
        let settings = edge_agent::store::StoreConfig {
            dir: self.data_dir(),
            max_bytes: 1 << 30,
            segment_bytes: 64 * 1024,
            fsync: edge_agent::store::FsyncPolicy::Always,
        };
        edge_agent::store::Log::open(settings).unwrap().stats()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How many messages a [`watch`] waits for; `usize::MAX` until the test knows.
pub type Target = std::sync::Arc<std::sync::atomic::AtomicUsize>;

pub fn target(n: usize) -> Target {
    std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(n))
}

/// Follows a channel in the background as a dashboard does: reconnects and resumes with
/// `since` until it has `target` messages and nothing more arrives for 500 ms (so extra
/// messages, duplicates included, are seen), or 60 s pass. Checks offsets are gapless and
/// unique and every resume recovered. Returns each message's `data` from the channel's first
/// one (a viewer that subscribes late resumes from offset 0), in arrival order.
pub fn watch(
    hub: &Hub,
    token: &str,
    channel: &str,
    target: Target,
) -> tokio::task::JoinHandle<Vec<Value>> {
    let (url, token, channel) = (hub.url(), token.to_owned(), channel.to_owned());
    tokio::spawn(async move { follow(url, token, channel, target, |_| false).await })
}

/// A dashboard following a channel from now on, told at the end how many readings to expect.
pub struct Dashboard {
    expected: Target,
    task: tokio::task::JoinHandle<Vec<Value>>,
}

impl Dashboard {
    pub fn follow(hub: &Hub, channel: &str) -> Dashboard {
        let expected = target(usize::MAX);
        let task = watch(
            hub,
            &hub.token("dash", "viewer", "1h"),
            channel,
            expected.clone(),
        );
        Dashboard { expected, task }
    }

    /// Waits for `n` readings and a quiet moment after them; returns all it received.
    pub async fn readings(self, n: u64) -> Vec<Value> {
        self.expected
            .store(n as usize, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("the dashboard task")
    }
}

/// Like [`watch`], but returns as soon as `count` messages arrived (the stream goes on).
pub fn watch_first(
    hub: &Hub,
    token: &str,
    channel: &str,
    count: usize,
) -> tokio::task::JoinHandle<Vec<Value>> {
    let (url, token, channel) = (hub.url(), token.to_owned(), channel.to_owned());
    let target = self::target(count);
    tokio::spawn(
        async move { follow(url, token, channel, target, move |seen| seen >= count).await },
    )
}

/// How the tests' own clients dial: the agent's timeout, no TLS.
pub fn dial_options() -> DialOptions {
    DialOptions {
        timeout: Some(Duration::from_secs(2)),
        ..DialOptions::default()
    }
}

/// The dashboard loop of [`watch`] and [`watch_first`]: returns once `target` messages are in
/// and nothing more came for a while, or as soon as `enough(messages so far)` says so.
async fn follow(
    url: String,
    token: String,
    channel: String,
    target: Target,
    enough: impl Fn(usize) -> bool,
) -> Vec<Value> {
    use std::sync::atomic::Ordering;
    let dialer = Dialer::new(&url, dial_options()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let quiet = Duration::from_millis(500);
    let mut seen = Vec::new();
    let mut position: Option<(String, u64)> = None;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "got {} of {} messages on {channel}",
            seen.len(),
            target.load(Ordering::SeqCst)
        );
        let Ok(hub_client::Connected { socket: mut ws, .. }) = dialer.connect(&token).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut subscribe = json!({"type": "subscribe", "channel": channel});
        if let Some((epoch, offset)) = &position {
            subscribe["since"] = json!({"epoch": epoch, "offset": offset});
        }
        let text = subscribe.to_string().into_bytes();
        if ws
            .write_frame(Frame::text(Payload::Owned(text)))
            .await
            .is_err()
        {
            continue;
        }
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{channel}: {} messages, then nothing more for too long",
                seen.len()
            );
            let frame = match tokio::time::timeout(quiet, ws.read_frame()).await {
                Err(_) if seen.len() >= target.load(Ordering::SeqCst) => return seen,
                Err(_) => continue,
                Ok(Err(_)) => break,
                Ok(Ok(frame)) => frame,
            };
            match frame.opcode {
                OpCode::Close => break,
                OpCode::Text => {}
                _ => continue,
            }
            let v: Value = serde_json::from_slice(&frame.payload).unwrap();
            match v["type"].as_str() {
                Some("subscribed") => {
                    let epoch = v["epoch"].as_str().unwrap().to_owned();
                    match &position {
                        // A recovered resume replays from `since` on: keep it.
                        Some((old, _)) => assert!(
                            v["recovered"] == true && *old == epoch,
                            "the viewer lost messages: {v}"
                        ),
                        // Readings published before this subscribe (the agent can reconnect
                        // first): start over from the channel's beginning, which history holds.
                        None if v["offset"].as_u64() > Some(0) => {
                            position = Some((epoch, 0));
                            break;
                        }
                        None => position = Some((epoch, 0)),
                    }
                }
                Some("message") => {
                    let offset = v["offset"].as_u64().unwrap();
                    let (_, last) = position.as_mut().expect("subscribed first");
                    assert_eq!(offset, *last + 1, "offsets are gapless and unique");
                    *last = offset;
                    seen.push(v["data"].clone());
                    if enough(seen.len()) {
                        return seen;
                    }
                }
                _ => {}
            }
        }
    }
}

/// A reading's identity: its whole JSON. Two readings of a busy agent can share a millisecond,
/// but not also every random-walk value and the agent's counters; a reading published twice is
/// the same bytes.
pub fn reading_key(data: &Value) -> String {
    data.to_string()
}

/// Stops the agent, and starts and stops it again until its log holds nothing unacknowledged
/// (bounded); returns how many readings it ever took.
pub fn stop_drained(agent: &mut Agent) -> edge_agent::store::Stats {
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1000));
        agent.stop();
        let stats = agent.log_stats();
        if stats.pending_records == 0 {
            return stats;
        }
        agent.spawn();
    }
    panic!("the agent never drained its log\n{}", agent.output());
}

/// How many readings the agent took in all its runs: its last seq, less the seqs it passed over.
/// It logs each such gap as `skipped_seqs`: at open after an unclean stop (the gap below the
/// `last_seq` it opened at), a renumbering, or a hub that knows later seqs. A start killed before
/// it appended anything opens at the same gap again and reports it again, so the gaps at open are
/// counted as seq ranges, each seq once.
pub fn taken(agent: &Agent, stats: &edge_agent::store::Stats) -> u64 {
    let field = |line: &str, name: &str| -> Option<u64> {
        let rest = line.split(&format!(" {name}=")).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let mut at_open = std::collections::BTreeSet::new();
    let mut elsewhere = 0;
    for line in agent.output().lines() {
        let Some(skipped) = field(line, "skipped_seqs") else {
            continue;
        };
        match field(line, "last_seq").filter(|_| line.contains("log opened")) {
            Some(opened_at) => {
                at_open.insert((opened_at - skipped, opened_at));
            }
            None => elsewhere += skipped,
        }
    }
    // Gaps at open only ever grow upwards; merge overlapping ranges.
    let mut passed_over = 0;
    let mut covered_to = 0;
    for (from, to) in at_open {
        let from = from.max(covered_to);
        if to > from {
            passed_over += to - from;
            covered_to = to;
        }
    }
    stats.last_seq - passed_over - elsewhere
}

/// Every reading exactly once: as many distinct readings as the agent took, none twice.
pub fn assert_exactly_once(got: &[Value], taken: u64) {
    assert_eq!(
        got.len() as u64,
        taken,
        "as many deliveries as readings taken"
    );
    let distinct: std::collections::BTreeSet<_> = got.iter().map(reading_key).collect();
    assert_eq!(distinct.len(), got.len(), "a reading arrived twice");
}
