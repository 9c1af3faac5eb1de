//! Fan-out benchmark: N viewers on `fleet`, one agent publishing ~250-byte readings at a fixed
//! rate, against a hub (embedded broker) or the `raw` ceiling server, each started here.
//!
//! ```sh
//! cargo build --release -p hub -p loadtest
//! target/release/fanout --target hub --viewers 2000 --rate 200 --seconds 10
//! target/release/fanout --target raw --viewers 2000 --rate 200 --seconds 10
//! ```
//!
//! Reports connected viewers, the connect rate, published vs delivered (loss), gaps and
//! duplicates by offset, deliveries/s, publish-to-deliver latency percentiles (HdrHistogram, from
//! a wall-clock stamp in each reading), and the server's CPU and RSS from `/proc`, as a table and
//! one JSON line. Every loop is bounded in count and time; all traffic stays on 127.0.0.0/8,
//! spread over source addresses so ephemeral ports never run out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use fastwebsockets::{Frame, OpCode, Payload};
use hdrhistogram::Histogram;
use loadtest::{procstat, raw, ws};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::watch;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    Hub,
    Raw,
    /// Node.js with the `ws` package (`loadtest/peers/ws-server.mjs`).
    NodeWs,
    /// Python with `websockets` and its `broadcast()` (`loadtest/peers/websockets_server.py`).
    PythonWebsockets,
    /// socket.io 4 on `@socket.io/redis-adapter` and a private redis-server
    /// (`loadtest/peers/socketio-server.mjs`).
    Socketio,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Hub => "hub",
            Target::Raw => "raw",
            Target::NodeWs => "node ws",
            Target::PythonWebsockets => "python websockets",
            Target::Socketio => "socket.io + redis adapter",
        }
    }

    /// The peer's program and script, under `loadtest/peers/`.
    fn peer(self) -> Option<(&'static str, &'static str)> {
        match self {
            Target::NodeWs => Some(("node", "ws-server.mjs")),
            Target::PythonWebsockets => Some(("python3", "websockets_server.py")),
            Target::Socketio => Some(("node", "socketio-server.mjs")),
            Target::Hub | Target::Raw => None,
        }
    }

    /// How this server frames an event: the hub's protocol, or socket.io's `42["event",…]`.
    fn dialect(self) -> Dialect {
        match self {
            Target::Socketio => Dialect::SocketIo,
            _ => Dialect::Hub,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Hub,
    SocketIo,
}

impl Dialect {
    fn subscribe(self) -> &'static str {
        match self {
            Dialect::Hub => r#"{"type":"subscribe","channel":"fleet"}"#,
            Dialect::SocketIo => r#"42["subscribe","fleet"]"#,
        }
    }

    fn subscribed(self) -> &'static [u8] {
        match self {
            Dialect::Hub => br#"{"type":"subscribed""#,
            Dialect::SocketIo => br#"42["subscribed""#,
        }
    }

    fn ack(self) -> &'static [u8] {
        match self {
            Dialect::Hub => br#"{"type":"ack""#,
            Dialect::SocketIo => br#"42["ack""#,
        }
    }

    fn publish(self, seq: u64, sent_us: u64, pad: &str) -> String {
        match self {
            Dialect::Hub => format!(
                r#"{{"type":"publish","seq":{seq},"data":{{"sent_us":{sent_us},"pad":"{pad}"}}}}"#
            ),
            Dialect::SocketIo => format!(
                r#"42["publish",{{"seq":{seq},"data":{{"sent_us":{sent_us},"pad":"{pad}"}}}}]"#
            ),
        }
    }
}

/// Engine.IO's ping, which a socket.io client answers with `3`.
const ENGINE_IO_PING: &[u8] = b"2";
const ENGINE_IO_PONG: &str = "3";

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "hub")]
    target: Target,
    #[arg(long, default_value_t = 1000)]
    viewers: usize,
    /// Publications per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long to publish.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Approximate size of a reading's `data`, in bytes.
    #[arg(long, default_value_t = 250)]
    payload: usize,
    /// New viewer connections per second while ramping up.
    #[arg(long, default_value_t = 5000.0)]
    connect_rate: f64,
    /// Pin the server processes (hubs, redis-server, or the raw server) to this CPU.
    #[arg(long)]
    server_cpu: Option<usize>,
    /// With `--target hub`: this many hubs sharing a private redis-server; viewers are spread
    /// over them, the agent publishes through the first.
    #[arg(long, default_value_t = 1)]
    hubs: usize,
    /// Hubs export traces over OTLP/HTTP to a sink in this process, sampling new traces at this
    /// ratio (0.0–1.0); unset: tracing off.
    #[arg(long)]
    trace_sample: Option<f64>,
    /// How long to wait after the last viewer connected before measuring memory per
    /// connection. The hub gives back the buffers of an idle connection once a ping interval
    /// (20 s by default): `--settle 22` measures connections that have been idle that long.
    #[arg(long, default_value_t = 0.5)]
    settle: f64,
    /// Spread the viewers over worker processes, one pinned to each of these CPUs (e.g.
    /// `2,3,4,5`); the publisher stays in this process. Unset: all viewers in this process.
    #[arg(long, value_delimiter = ',')]
    generator_cpus: Vec<usize>,
    /// Internal: run as a worker of another generator process.
    #[arg(long, hide = true)]
    worker: bool,
    #[arg(long, hide = true, default_value = "")]
    worker_addrs: String,
    #[arg(long, hide = true, default_value = "")]
    worker_token: String,
    #[arg(long, hide = true, default_value_t = 0)]
    worker_source_base: usize,
    /// Internal: run the raw ceiling server.
    #[arg(long, hide = true)]
    raw_server: bool,
}

const SECRET: &str = "fanout-benchmark-secret-of-32-bytes!";

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        loadtest::pool::stop(&mut self.child, Duration::from_secs(3));
    }
}

/// The hub's environment for OTLP export to `sink`, when tracing is on.
fn tracing_env(args: &Args, sink: Option<SocketAddr>) -> Vec<(String, String)> {
    match (args.trace_sample, sink) {
        (Some(ratio), Some(addr)) => vec![
            ("HUB_TELEMETRY__ENDPOINT".into(), format!("http://{addr}")),
            ("HUB_TELEMETRY__SAMPLE_RATIO".into(), ratio.to_string()),
        ],
        _ => Vec::new(),
    }
}

fn start_server(
    args: &Args,
    sink: Option<SocketAddr>,
    redis_socket: Option<&str>,
) -> anyhow::Result<Server> {
    let peers = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers");
    let (program, extra): (PathBuf, Vec<String>) = match (args.target, args.target.peer()) {
        (Target::Hub, _) => (loadtest::pool::sibling_binary("hub")?, vec!["serve".into()]),
        (Target::Raw, _) => (std::env::current_exe()?, vec!["--raw-server".into()]),
        (_, Some((program, script))) => {
            let script = peers.join(script);
            if program == "node" && !peers.join("node_modules").exists() {
                bail!(
                    "{} needs its packages: (cd {} && npm ci)",
                    script.display(),
                    peers.display()
                );
            }
            (program.into(), vec![script.display().to_string()])
        }
        (_, None) => bail!("no program for target {}", args.target.name()),
    };
    let mut cmd = match args.server_cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(&program);
            c
        }
        None => Command::new(&program),
    };
    let big = "10000000";
    cmd.args(&extra)
        .env("HUB_LISTEN", "127.0.0.1:0")
        .env("HUB_AUTH__HS256_SECRET", SECRET)
        .env("HUB_LIMITS__MAX_CONNECTIONS", big)
        .env("HUB_LIMITS__CONNECT_RATE", big)
        .env("HUB_LIMITS__CONNECT_BURST", big)
        // Every simulated viewer shares one token: one identity holding all the connections.
        .env("HUB_LIMITS__MAX_CONNECTIONS_PER_VIEWER", big)
        .env("HUB_LIMITS__PUBLISH_RATE", big)
        .env("HUB_LIMITS__PUBLISH_BURST", big)
        .env("RUST_LOG", "warn,hub::server=info")
        .envs(tracing_env(args, sink))
        .envs(redis_socket.map(|path| ("REDIS_SOCKET", path)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("start the server")?;
    let addr = loadtest::pool::listening_addr(&mut child)?;
    Ok(Server { child, addr })
}

/// What the generator talks to, and the processes whose CPU and memory it measures.
struct Servers {
    addrs: Vec<SocketAddr>,
    pids: Vec<u32>,
    _single: Option<Server>,
    pool: Option<loadtest::pool::Pool>,
    /// socket.io's redis-server, stopped after the server (dropped in field order).
    _redis: Option<PrivateRedis>,
}

/// A redis-server of this run only, in its own temp dir.
struct PrivateRedis {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pin(pid: u32, cpu: Option<usize>) -> anyhow::Result<()> {
    if let Some(cpu) = cpu {
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
            .stdout(Stdio::null())
            .status()?
            .success();
        if !ok {
            bail!("taskset -p {pid} failed");
        }
    }
    Ok(())
}

fn start_servers(args: &Args, sink: Option<SocketAddr>) -> anyhow::Result<Servers> {
    if args.target == Target::Socketio {
        let dir = tempfile::tempdir()?;
        let (child, url) = loadtest::pool::single_redis(dir.path())?;
        let redis = PrivateRedis { child, _dir: dir };
        pin(redis.child.id(), args.server_cpu)?;
        let socket = url.trim_start_matches("redis+unix://").to_owned();
        let server = start_server(args, None, Some(&socket))?;
        return Ok(Servers {
            addrs: vec![server.addr],
            pids: vec![server.child.id(), redis.child.id()],
            _single: Some(server),
            pool: None,
            _redis: Some(redis),
        });
    }
    if args.target != Target::Hub || args.hubs <= 1 {
        let server = start_server(args, sink, None)?;
        return Ok(Servers {
            addrs: vec![server.addr],
            pids: vec![server.child.id()],
            _single: Some(server),
            pool: None,
            _redis: None,
        });
    }
    let big = "10000000";
    let tracing = tracing_env(args, sink);
    let mut env = vec![
        ("HUB_LIMITS__MAX_CONNECTIONS", big),
        ("HUB_LIMITS__CONNECT_RATE", big),
        ("HUB_LIMITS__CONNECT_BURST", big),
        ("HUB_LIMITS__PUBLISH_RATE", big),
        ("HUB_LIMITS__PUBLISH_BURST", big),
    ];
    env.extend(tracing.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let pool =
        loadtest::pool::Pool::start(&loadtest::pool::sibling_binary("hub")?, args.hubs, &env)?;
    let mut pids: Vec<u32> = pool.hubs.iter().map(|h| h.child.id()).collect();
    pids.extend(pool.redis.iter().map(|r| r.id()));
    for &pid in &pids {
        pin(pid, args.server_cpu)?;
    }
    Ok(Servers {
        addrs: pool.hubs.iter().map(|h| h.addr).collect(),
        pids,
        _single: None,
        pool: Some(pool),
        _redis: None,
    })
}

fn cpu_of(pids: &[u32]) -> anyhow::Result<Duration> {
    pids.iter()
        .map(|&p| procstat::cpu_time(p).map_err(anyhow::Error::from))
        .sum()
}

fn rss_of(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter()
        .map(|&p| procstat::rss_bytes(p).map_err(anyhow::Error::from))
        .sum()
}

fn token(sub: &str, role: &str) -> anyhow::Result<String> {
    let out = Command::new(loadtest::pool::sibling_binary("hub")?)
        .args(["token", "--sub", sub, "--role", role, "--ttl", "2h"])
        .env("HUB_AUTH__HS256_SECRET", SECRET)
        .output()?;
    if !out.status.success() {
        bail!("hub token: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Source address of the `i`th connection: 2,000 per address, from a base drawn per run, so
/// neither the ~28,000 ephemeral ports of an address nor the TIME_WAIT entries left by the
/// previous run (60 s) slow down connecting.
fn source(base: usize, i: usize) -> IpAddr {
    let k = base + i / 2_000;
    IpAddr::V4(Ipv4Addr::new(
        127,
        2 + (k / 250 % 250) as u8,
        0,
        (k % 250 + 1) as u8,
    ))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The number after `"key":` in a frame, without parsing the JSON (the generator must stay
/// cheaper than what it measures).
fn number_after(frame: &[u8], key: &[u8]) -> Option<u64> {
    let at = frame.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = frame[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

#[derive(Default)]
struct Seen {
    received: u64,
    gaps: u64,
    duplicates: u64,
    latency_us: Option<Histogram<u64>>,
}

async fn connect(
    dialect: Dialect,
    addr: SocketAddr,
    from: Option<IpAddr>,
    token: &str,
) -> anyhow::Result<ws::Client> {
    match dialect {
        Dialect::Hub => ws::Client::connect_from(addr, from, token).await,
        Dialect::SocketIo => ws::Client::connect_socketio_from(addr, from).await,
    }
}

async fn viewer(
    dialect: Dialect,
    addr: SocketAddr,
    from: IpAddr,
    token: String,
    mut stop: watch::Receiver<bool>,
    connected: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> anyhow::Result<Seen> {
    let mut client = match connect(dialect, addr, Some(from), &token).await {
        Ok(c) => c,
        Err(e) => {
            failed.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    if let Err(e) = client.send(dialect.subscribe()).await {
        failed.fetch_add(1, Ordering::Relaxed);
        return Err(e);
    }
    // Counted once `subscribed` is here: from then on every publication reaches it.
    let mut counted = false;
    let result = viewing(dialect, client, &mut stop, &connected, &mut counted).await;
    if !counted {
        failed.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// A subscribed viewer's reading loop, until `stop`.
async fn viewing(
    dialect: Dialect,
    client: ws::Client,
    stop: &mut watch::Receiver<bool>,
    connected: &AtomicU64,
    counted: &mut bool,
) -> anyhow::Result<Seen> {
    let mut ws = client.into_inner();
    let mut seen = Seen {
        latency_us: Some(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        ..Seen::default()
    };
    let mut last: Option<u64> = None;
    loop {
        let frame = tokio::select! {
            _ = stop.changed() => return Ok(seen),
            frame = ws.read_frame() => frame?,
        };
        if frame.opcode == OpCode::Close {
            bail!("closed by the server");
        }
        if frame.opcode != OpCode::Text {
            continue;
        }
        let p = &frame.payload[..];
        if dialect == Dialect::SocketIo && p == ENGINE_IO_PING {
            ws.write_frame(Frame::text(Payload::Borrowed(ENGINE_IO_PONG.as_bytes())))
                .await?;
            continue;
        }
        let Some(offset) = number_after(p, br#""offset":"#) else {
            continue;
        };
        if p.starts_with(dialect.subscribed()) {
            last = Some(offset);
            if !*counted {
                *counted = true;
                connected.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        if let Some(sent) = number_after(p, br#""sent_us":"#)
            && let Some(h) = seen.latency_us.as_mut()
        {
            let _ = h.record(now_us().saturating_sub(sent).max(1));
        }
        seen.received += 1;
        match last {
            Some(l) if offset <= l => seen.duplicates += 1,
            Some(l) if offset > l + 1 => seen.gaps += offset - l - 1,
            _ => {}
        }
        last = Some(last.map_or(offset, |l| l.max(offset)));
    }
}

/// How the viewers connect: the same for every process of the generator.
#[derive(Clone)]
struct Plan {
    dialect: Dialect,
    addrs: Vec<SocketAddr>,
    token: String,
    /// New connections per second, over all processes.
    connect_rate: f64,
    /// First source address (see [`source`]).
    base: usize,
}

/// What all viewers saw.
struct Totals {
    seen: Seen,
    latency: Histogram<u64>,
    /// Viewers that failed to connect or were cut off.
    failed: u64,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// Viewers in this process.
struct LocalViewers {
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<Seen>>>,
    stop: watch::Sender<bool>,
    connected: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl LocalViewers {
    /// Opens `count` viewers at the plan's connect rate (returns once all are started).
    async fn start(plan: &Plan, count: usize) -> LocalViewers {
        let (stop, stop_rx) = watch::channel(false);
        let connected = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let ramp = Instant::now();
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            let due = Duration::from_secs_f64(i as f64 / plan.connect_rate);
            if let Some(wait) = due.checked_sub(ramp.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            handles.push(tokio::spawn(viewer(
                plan.dialect,
                plan.addrs[i % plan.addrs.len()],
                source(plan.base, i),
                plan.token.clone(),
                stop_rx.clone(),
                connected.clone(),
                failed.clone(),
            )));
        }
        LocalViewers {
            handles,
            stop,
            connected,
            failed,
        }
    }

    /// Waits until every viewer connected or failed, for at most `limit`: (connected, failed).
    async fn ramped(&self, limit: Duration) -> (u64, u64) {
        let deadline = Instant::now() + limit;
        let count = self.handles.len() as u64;
        loop {
            let (c, f) = (
                self.connected.load(Ordering::Relaxed),
                self.failed.load(Ordering::Relaxed),
            );
            if c + f >= count || Instant::now() > deadline {
                return (c, f);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) -> anyhow::Result<Totals> {
        let _ = self.stop.send(true);
        let mut totals = Totals {
            seen: Seen::default(),
            latency: histogram()?,
            failed: 0,
        };
        for handle in self.handles {
            match handle.await {
                Ok(Ok(seen)) => {
                    totals.seen.received += seen.received;
                    totals.seen.gaps += seen.gaps;
                    totals.seen.duplicates += seen.duplicates;
                    if let Some(h) = seen.latency_us {
                        totals.latency.add(h)?;
                    }
                }
                _ => totals.failed += 1,
            }
        }
        Ok(totals)
    }
}

/// Viewers spread over worker processes (`--generator-cpus`), each pinned to its own CPU, so
/// that a machine with more cores measures the server and not the generator's one core. A
/// worker reports on its stdout: one JSON line once its viewers are connected, and one with
/// what they saw once its stdin says `stop`.
struct Workers {
    children: Vec<Worker>,
}

struct Worker {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Workers {
    fn start(args: &Args, plan: &Plan) -> anyhow::Result<Workers> {
        let cpus = &args.generator_cpus;
        let exe = std::env::current_exe()?;
        let addrs: Vec<String> = plan.addrs.iter().map(|a| a.to_string()).collect();
        let mut children = Vec::with_capacity(cpus.len());
        let mut base = plan.base;
        for (w, cpu) in cpus.iter().enumerate() {
            // The first workers take one viewer more when the count does not divide.
            let count = args.viewers / cpus.len() + usize::from(w < args.viewers % cpus.len());
            let mut child = tokio::process::Command::new("taskset")
                .args(["-c", &cpu.to_string()])
                .arg(&exe)
                .args(["--worker", "--target"])
                .arg(
                    args.target
                        .to_possible_value()
                        .map_or("hub".into(), |v| v.get_name().to_owned()),
                )
                .args(["--viewers", &count.to_string()])
                .args([
                    "--connect-rate",
                    &(plan.connect_rate / cpus.len() as f64).to_string(),
                ])
                .args(["--worker-addrs", &addrs.join(",")])
                .args(["--worker-token", &plan.token])
                .args(["--worker-source-base", &base.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("start a generator worker")?;
            // Source addresses of its own: 2,000 connections each (see `source`).
            base += count / 2_000 + 1;
            let stdout = child.stdout.take().context("worker stdout")?;
            children.push(Worker {
                child,
                lines: tokio::io::BufReader::new(stdout).lines(),
            });
        }
        Ok(Workers { children })
    }

    async fn ramped(&mut self, limit: Duration) -> anyhow::Result<(u64, u64)> {
        let (mut connected, mut failed) = (0, 0);
        for worker in &mut self.children {
            let report = worker.report(limit).await?;
            connected += report["connected"].as_u64().unwrap_or(0);
            failed += report["failed"].as_u64().unwrap_or(0);
        }
        Ok((connected, failed))
    }

    async fn finish(mut self) -> anyhow::Result<Totals> {
        let mut totals = Totals {
            seen: Seen::default(),
            latency: histogram()?,
            failed: 0,
        };
        for worker in &mut self.children {
            let stdin = worker.child.stdin.as_mut().context("worker stdin")?;
            stdin.write_all(b"stop\n").await?;
            stdin.flush().await?;
        }
        for worker in &mut self.children {
            let report = worker.report(Duration::from_secs(30)).await?;
            let count = |key: &str| report[key].as_u64().unwrap_or(0);
            totals.seen.received += count("received");
            totals.seen.gaps += count("gaps");
            totals.seen.duplicates += count("duplicates");
            totals.failed += count("failed");
            for pair in report["latency_us"].as_array().into_iter().flatten() {
                if let (Some(value), Some(n)) = (pair[0].as_u64(), pair[1].as_u64()) {
                    totals.latency.record_n(value, n)?;
                }
            }
        }
        for worker in &mut self.children {
            let _ = tokio::time::timeout(Duration::from_secs(5), worker.child.wait()).await;
        }
        Ok(totals)
    }
}

impl Worker {
    /// The worker's next JSON line, within `limit`.
    async fn report(&mut self, limit: Duration) -> anyhow::Result<serde_json::Value> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .context("a generator worker did not report in time")??
            .context("a generator worker exited")?;
        Ok(serde_json::from_str(&line)?)
    }
}

enum Viewers {
    Local(LocalViewers),
    Workers(Workers),
}

impl Viewers {
    async fn ramped(&mut self, limit: Duration) -> anyhow::Result<(u64, u64)> {
        match self {
            Viewers::Local(local) => Ok(local.ramped(limit).await),
            Viewers::Workers(workers) => workers.ramped(limit).await,
        }
    }

    async fn finish(self) -> anyhow::Result<Totals> {
        match self {
            Viewers::Local(local) => local.finish().await,
            Viewers::Workers(workers) => workers.finish().await,
        }
    }
}

/// A worker process of the generator: its share of the viewers, reported as JSON lines.
async fn worker(args: Args) -> anyhow::Result<()> {
    let addrs = args
        .worker_addrs
        .split(',')
        .map(|a| a.parse())
        .collect::<Result<Vec<SocketAddr>, _>>()
        .context("--worker-addrs")?;
    if addrs.is_empty() {
        bail!("--worker-addrs names no server");
    }
    let plan = Plan {
        dialect: args.target.dialect(),
        addrs,
        token: args.worker_token.clone(),
        connect_rate: args.connect_rate,
        base: args.worker_source_base,
    };
    let viewers = LocalViewers::start(&plan, args.viewers).await;
    let (connected, failed) = viewers.ramped(Duration::from_secs(60)).await;
    println!(
        "{}",
        serde_json::json!({"connected": connected, "failed": failed})
    );
    // Until the parent says stop (or is gone), bounded by the longest run it can ask for.
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let _ = tokio::time::timeout(Duration::from_secs(3_600), stdin.next_line()).await;
    let totals = viewers.finish().await?;
    let latency: Vec<[u64; 2]> = totals
        .latency
        .iter_recorded()
        .map(|v| [v.value_iterated_to(), v.count_at_value()])
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "received": totals.seen.received, "gaps": totals.seen.gaps,
            "duplicates": totals.seen.duplicates, "failed": totals.failed,
            "latency_us": latency,
        })
    );
    Ok(())
}

/// Publishes at `rate` for `seconds`; returns how many were sent and acknowledged.
async fn publisher(addr: SocketAddr, token: &str, args: &Args) -> anyhow::Result<(u64, u64)> {
    let dialect = args.target.dialect();
    let client = connect(dialect, addr, None, token).await?;
    let (mut reader, mut writer) = client.into_inner().split(tokio::io::split);
    let acked = Arc::new(AtomicU64::new(0));
    let counting = acked.clone();
    // socket.io's pings are answered from the writing loop below.
    let pinged = Arc::new(AtomicBool::new(false));
    let ping_seen = pinged.clone();
    let reads = tokio::spawn(async move {
        let mut ignore = |_: Frame<'_>| std::future::ready(Ok::<(), std::io::Error>(()));
        while let Ok(frame) = reader.read_frame(&mut ignore).await {
            if frame.opcode != OpCode::Text {
                continue;
            }
            if frame.payload.starts_with(dialect.ack()) {
                counting.fetch_add(1, Ordering::Relaxed);
            } else if dialect == Dialect::SocketIo && &frame.payload[..] == ENGINE_IO_PING {
                ping_seen.store(true, Ordering::Relaxed);
            }
        }
    });
    let pad = "x".repeat(args.payload.saturating_sub(40));
    let started = Instant::now();
    let end = Duration::from_secs(args.seconds);
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while started.elapsed() < end {
        tick.tick().await;
        if pinged.swap(false, Ordering::Relaxed) {
            writer
                .write_frame(Frame::text(Payload::Borrowed(ENGINE_IO_PONG.as_bytes())))
                .await?;
        }
        let due = (started.elapsed().as_secs_f64() * args.rate) as u64;
        while sent < due {
            sent += 1;
            let frame = dialect.publish(sent, now_us(), &pad);
            writer
                .write_frame(Frame::text(Payload::Owned(frame.into_bytes())))
                .await?;
        }
    }
    // Acks of the last publications.
    let deadline = Instant::now() + Duration::from_secs(5);
    while args.target != Target::Raw && acked.load(Ordering::Relaxed) < sent {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reads.abort();
    Ok((sent, acked.load(Ordering::Relaxed)))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.raw_server {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(async {
            let listener = raw::bind("127.0.0.1:0".parse()?).await?;
            raw::serve(listener, 4096).await
        });
    }
    if let Ok(limit) = rlimit::increase_nofile_limit(u64::MAX)
        && (limit as usize) < args.viewers + 64
    {
        bail!("open-file limit {limit} is below {} viewers", args.viewers);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.worker {
        return runtime.block_on(worker(args));
    }
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(r) = args.trace_sample
        && !(0.0..=1.0).contains(&r)
    {
        bail!("--trace-sample must be within 0.0..=1.0");
    }
    if !(args.connect_rate > 0.0 && args.connect_rate.is_finite()) {
        bail!("--connect-rate must be a positive number");
    }
    if !(0.0..=120.0).contains(&args.settle) {
        bail!("--settle must be within 0..=120 seconds");
    }
    let sink = match args.trace_sample {
        Some(_) if args.target == Target::Hub => Some(loadtest::otlp_sink::Sink::start().await?),
        _ => None,
    };
    let servers = start_servers(&args, sink.as_ref().map(|s| s.addr))?;
    let pids = servers.pids.clone();
    let addrs = servers.addrs.clone();
    let (viewer_token, agent_token) = match (&servers.pool, args.target) {
        (Some(pool), _) => (
            pool.token("bench-viewer", "viewer")?,
            pool.token("bench-agent", "agent")?,
        ),
        (None, Target::Hub) => (
            token("bench-viewer", "viewer")?,
            token("bench-agent", "agent")?,
        ),
        // The raw server and the peers take no token.
        (None, _) => ("none".to_owned(), "none".to_owned()),
    };
    let rss_idle = rss_of(&pids)?;
    let kernel_before = procstat::kernel_socket_bytes()?;

    // Ramp up at a bounded connect rate.
    let ramp = Instant::now();
    let ramp_cpu0 = cpu_of(&pids)?;
    let plan = Plan {
        dialect: args.target.dialect(),
        addrs: addrs.clone(),
        token: viewer_token.clone(),
        connect_rate: args.connect_rate,
        base: rand::random::<u16>() as usize,
    };
    let mut viewers = if args.generator_cpus.is_empty() {
        Viewers::Local(LocalViewers::start(&plan, args.viewers).await)
    } else {
        Viewers::Workers(Workers::start(&args, &plan)?)
    };
    // The ramp's own length (workers start theirs when spawned), then a minute for stragglers.
    let ramp_limit =
        Duration::from_secs_f64(args.viewers as f64 / args.connect_rate) + Duration::from_secs(70);
    let (connected_n, _) = viewers.ramped(ramp_limit).await?;
    let ramp_time = ramp.elapsed();
    let ramp_cpu = cpu_of(&pids)? - ramp_cpu0;
    let ramp_cpu_pct = 100.0 * ramp_cpu.as_secs_f64() / ramp_time.as_secs_f64();
    let idle_cpu0 = cpu_of(&pids)?;
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let idle_cpu = cpu_of(&pids)? - idle_cpu0;
    let rss_connected = rss_of(&pids)?;
    let kernel = procstat::kernel_socket_bytes()?.saturating_sub(kernel_before);

    let cpu0 = cpu_of(&pids)?;
    let t0 = Instant::now();
    let (published, acked) = publisher(addrs[0], &agent_token, &args).await?;
    let publish_time = t0.elapsed();
    let cpu = cpu_of(&pids)? - cpu0;
    // Let deliveries drain (bounded).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_end = rss_of(&pids)?;
    let Totals {
        seen: total,
        latency,
        failed,
    } = viewers.finish().await?;
    let expected = published * connected_n;
    let deliveries_per_s = total.received as f64 / publish_time.as_secs_f64();
    let p = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let per_conn = rss_connected.saturating_sub(rss_idle) as f64 / connected_n.max(1) as f64;
    let cpu_pct = 100.0 * cpu.as_secs_f64() / publish_time.as_secs_f64();
    let idle_cpu_pct = match args.settle {
        s if s > 0.0 => 100.0 * idle_cpu.as_secs_f64() / s,
        _ => 0.0,
    };
    // Loopback: both ends of every connection are this machine's sockets.
    let kernel_per_conn = kernel as f64 / connected_n.max(1) as f64;
    let mut name = match args.target {
        Target::Hub if args.hubs > 1 => format!("{} hubs on redis", args.hubs),
        target => target.name().to_owned(),
    };
    if let (Some(ratio), Some(_)) = (args.trace_sample, &sink) {
        name.push_str(&format!(" traced@{ratio}"));
    }
    // The batch processor exports every 5 s: stop the hubs so they flush what they hold.
    drop(servers);
    let spans_exported = match &sink {
        Some(sink) => {
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut last = u64::MAX;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let now = sink.counts.spans.load(Ordering::Relaxed);
                if now == last {
                    break;
                }
                last = now;
            }
            Some(sink.counts.spans.load(Ordering::Relaxed))
        }
        None => None,
    };
    println!(
        "fan-out to {name}: {} viewers, {} pub/s for {} s",
        args.viewers, args.rate, args.seconds
    );
    println!(
        "  connected        {connected_n} ({failed} failed or cut off) in {:.2} s = {:.0} conn/s, server CPU {ramp_cpu_pct:.0} %",
        ramp_time.as_secs_f64(),
        connected_n as f64 / ramp_time.as_secs_f64()
    );
    println!("  published        {published} (acked {acked})");
    println!(
        "  delivered        {} of {expected} expected, loss {}",
        total.received,
        expected.saturating_sub(total.received)
    );
    println!("  gaps / dups      {} / {}", total.gaps, total.duplicates);
    println!("  deliveries/s     {deliveries_per_s:.0}");
    println!(
        "  latency ms       p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        p(0.5),
        p(0.9),
        p(0.99),
        p(0.999),
        latency.max() as f64 / 1000.0
    );
    println!("  server CPU       {cpu_pct:.0} % of one core while publishing");
    if args.settle > 0.0 {
        println!(
            "  idle             {idle_cpu_pct:.2} % of one core over {:.1} s with every viewer connected; kernel memory +{:.1} MiB ({:.1} KiB/conn, both ends: slab and TCP buffers)",
            args.settle,
            kernel as f64 / 1048576.0,
            kernel_per_conn / 1024.0
        );
    }
    if let Some(spans) = spans_exported {
        println!("  spans exported   {spans} (OTLP/HTTP, to this process)");
    }
    println!(
        "  server RSS       idle {:.1} MiB, connected {:.1} MiB ({:.1} KiB/conn), end {:.1} MiB",
        rss_idle as f64 / 1048576.0,
        rss_connected as f64 / 1048576.0,
        per_conn / 1024.0,
        rss_end as f64 / 1048576.0
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "fanout", "target": name, "hubs": args.hubs, "viewers": args.viewers, "connected": connected_n,
            "rate": args.rate, "seconds": args.seconds, "published": published, "acked": acked,
            "expected": expected, "delivered": total.received, "gaps": total.gaps,
            "duplicates": total.duplicates, "deliveries_per_s": deliveries_per_s,
            "connect_per_s": connected_n as f64 / ramp_time.as_secs_f64(),
            "connect_server_cpu_percent": ramp_cpu_pct,
            "latency_ms": {"p50": p(0.5), "p90": p(0.9), "p99": p(0.99), "p999": p(0.999),
                "max": latency.max() as f64 / 1000.0},
            "server_cpu_percent": cpu_pct, "rss_idle": rss_idle, "rss_connected": rss_connected,
            "rss_per_connection": per_conn, "rss_end": rss_end,
            "trace_sample": args.trace_sample, "spans_exported": spans_exported,
            "generator_cpus": args.generator_cpus, "settle_s": args.settle,
            "idle_cpu_percent": idle_cpu_pct, "kernel_bytes": kernel,
            "kernel_bytes_per_connection": kernel_per_conn,
        })
    );
    Ok(())
}
