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
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use fastwebsockets::{Frame, OpCode, Payload};
use hdrhistogram::Histogram;
use loadtest::{procstat, raw, ws};
use tokio::sync::watch;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    Hub,
    Raw,
}

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

fn start_server(args: &Args, sink: Option<SocketAddr>) -> anyhow::Result<Server> {
    let (program, extra): (PathBuf, Vec<&str>) = match args.target {
        Target::Hub => (loadtest::pool::sibling_binary("hub")?, vec!["serve"]),
        Target::Raw => (std::env::current_exe()?, vec!["--raw-server"]),
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
    if args.target == Target::Raw || args.hubs <= 1 {
        let server = start_server(args, sink)?;
        return Ok(Servers {
            addrs: vec![server.addr],
            pids: vec![server.child.id()],
            _single: Some(server),
            pool: None,
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

async fn viewer(
    addr: SocketAddr,
    from: IpAddr,
    token: String,
    mut stop: watch::Receiver<bool>,
    connected: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> anyhow::Result<Seen> {
    let mut client = match ws::Client::connect_from(addr, Some(from), &token).await {
        Ok(c) => c,
        Err(e) => {
            failed.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    client
        .send(r#"{"type":"subscribe","channel":"fleet"}"#)
        .await?;
    connected.fetch_add(1, Ordering::Relaxed);
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
        let Some(offset) = number_after(p, br#""offset":"#) else {
            continue;
        };
        if p.starts_with(br#"{"type":"subscribed""#) {
            last = Some(offset);
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

/// Publishes at `rate` for `seconds`; returns how many were sent and acknowledged.
async fn publisher(addr: SocketAddr, token: &str, args: &Args) -> anyhow::Result<(u64, u64)> {
    let client = ws::Client::connect(addr, token).await?;
    let (mut reader, mut writer) = client.into_inner().split(tokio::io::split);
    let acked = Arc::new(AtomicU64::new(0));
    let counting = acked.clone();
    let reads = tokio::spawn(async move {
        let mut ignore = |_: Frame<'_>| std::future::ready(Ok::<(), std::io::Error>(()));
        while let Ok(frame) = reader.read_frame(&mut ignore).await {
            if frame.opcode == OpCode::Text && frame.payload.starts_with(br#"{"type":"ack""#) {
                counting.fetch_add(1, Ordering::Relaxed);
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
        let due = (started.elapsed().as_secs_f64() * args.rate) as u64;
        while sent < due {
            sent += 1;
            let frame = format!(
                r#"{{"type":"publish","seq":{sent},"data":{{"sent_us":{},"pad":"{pad}"}}}}"#,
                now_us()
            );
            writer
                .write_frame(Frame::text(Payload::Owned(frame.into_bytes())))
                .await?;
        }
    }
    // Acks of the last publications.
    let deadline = Instant::now() + Duration::from_secs(5);
    while args.target == Target::Hub && acked.load(Ordering::Relaxed) < sent {
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
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(r) = args.trace_sample
        && !(0.0..=1.0).contains(&r)
    {
        bail!("--trace-sample must be within 0.0..=1.0");
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
        (None, Target::Raw) => ("raw".to_owned(), "raw".to_owned()),
    };
    let rss_idle = rss_of(&pids)?;

    // Ramp up at a bounded connect rate.
    let (stop_tx, stop_rx) = watch::channel(false);
    let connected = Arc::new(AtomicU64::new(0));
    let connect_failures = Arc::new(AtomicU64::new(0));
    let base = rand::random::<u16>() as usize;
    let ramp = Instant::now();
    let ramp_cpu0 = cpu_of(&pids)?;
    let mut viewers = Vec::with_capacity(args.viewers);
    for i in 0..args.viewers {
        let due = Duration::from_secs_f64(i as f64 / args.connect_rate);
        if let Some(wait) = due.checked_sub(ramp.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        viewers.push(tokio::spawn(viewer(
            addrs[i % addrs.len()],
            source(base, i),
            viewer_token.clone(),
            stop_rx.clone(),
            connected.clone(),
            connect_failures.clone(),
        )));
    }
    let ramp_deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::Relaxed) + connect_failures.load(Ordering::Relaxed)
        < args.viewers as u64
    {
        if Instant::now() > ramp_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ramp_time = ramp.elapsed();
    let ramp_cpu = cpu_of(&pids)? - ramp_cpu0;
    let ramp_cpu_pct = 100.0 * ramp_cpu.as_secs_f64() / ramp_time.as_secs_f64();
    let connected_n = connected.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss_of(&pids)?;

    let cpu0 = cpu_of(&pids)?;
    let t0 = Instant::now();
    let (published, acked) = publisher(addrs[0], &agent_token, &args).await?;
    let publish_time = t0.elapsed();
    let cpu = cpu_of(&pids)? - cpu0;
    // Let deliveries drain (bounded).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_end = rss_of(&pids)?;
    let _ = stop_tx.send(true);

    let mut total = Seen::default();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut failed = 0;
    for v in viewers {
        match v.await {
            Ok(Ok(seen)) => {
                total.received += seen.received;
                total.gaps += seen.gaps;
                total.duplicates += seen.duplicates;
                if let Some(h) = seen.latency_us {
                    latency.add(h)?;
                }
            }
            _ => failed += 1,
        }
    }
    let expected = published * connected_n;
    let deliveries_per_s = total.received as f64 / publish_time.as_secs_f64();
    let p = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let per_conn = rss_connected.saturating_sub(rss_idle) as f64 / connected_n.max(1) as f64;
    let cpu_pct = 100.0 * cpu.as_secs_f64() / publish_time.as_secs_f64();
    let mut name = match args.target {
        Target::Hub if args.hubs > 1 => format!("{} hubs on redis", args.hubs),
        Target::Hub => "hub".to_owned(),
        Target::Raw => "raw".to_owned(),
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
        })
    );
    Ok(())
}
