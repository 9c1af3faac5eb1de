//! Fleet views: a conflated `fleet` viewer against an exact one under heavy fleet traffic, and
//! how long a snapshot of a large fleet takes.
//!
//! 1. One hub on its embedded broker; `--devices` agents publish `--rate` readings per second in
//!    all (windows of 10 sent together, as a busy agent does). With no viewer, then `--viewers`
//!    exact `fleet` viewers, then as many with `max_rate: 2`, each phase `--seconds` long: per
//!    viewer the messages and bytes received per second, and the hub's CPU per viewer (its CPU
//!    in the phase minus the phase without viewers, over the viewers).
//! 2. A hub with `--snapshot-devices` demo devices (each reported once): the time from sending
//!    `subscribe` with `snapshot: true` on `fleet` to the last snapshot frame, on the embedded
//!    broker and on one Redis.
//!
//! ```sh
//! cargo build --release -p hub -p loadtest
//! target/release/fleet-view --devices 200 --rate 20000 --viewers 10 --seconds 10 \
//!     --snapshot-devices 10000,100000
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use loadtest::pool::{Pool, metric};
use loadtest::procstat;
use loadtest::ws::{Client, Incoming, Publisher};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// Readings per second of all devices together.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    viewers: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    snapshot_devices: Vec<usize>,
    #[arg(long, default_value = "target/release/hub")]
    hub_bin: PathBuf,
}

/// What one phase measured.
struct Phase {
    name: &'static str,
    readings_per_s: f64,
    messages_per_s: f64,
    bytes_per_s: f64,
    hub_cpu_s: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(65_536);
    views(&args).await?;
    for &devices in &args.snapshot_devices {
        for redis in [false, true] {
            snapshot(&args, devices, redis).await?;
        }
    }
    Ok(())
}

async fn views(args: &Args) -> anyhow::Result<()> {
    let per_device = (args.rate as f64 / args.devices as f64).max(1.0);
    let publish_rate = format!("{}", (per_device * 4.0).ceil());
    let pool = Pool::embedded(
        &args.hub_bin,
        &[
            ("HUB_LIMITS__PUBLISH_RATE", &publish_rate),
            ("HUB_LIMITS__PUBLISH_BURST", "1000"),
            ("HUB_HISTORY__SIZE", "100"),
        ],
    )?;
    let hub = &pool.hubs[0];
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut agents = Vec::new();
    for d in 0..args.devices {
        let token = pool.token(&format!("pi-{d:04}"), "agent")?;
        let client = Client::connect(hub.addr, &token).await?;
        let (stop, acked) = (stop.clone(), acked.clone());
        // Windows of 10 readings, paced to the device's share of the rate.
        let period = Duration::from_secs_f64(10.0 / per_device);
        agents.push(tokio::spawn(async move {
            publish(Publisher::new(client), period, &stop, &acked).await
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seconds = Duration::from_secs(args.seconds);
    let pid = hub.child.id();
    let mut phases = Vec::new();
    for (name, viewers, max_rate) in [
        ("no viewer", 0, None),
        ("exact", args.viewers, None),
        ("conflated, max_rate 2", args.viewers, Some(2)),
    ] {
        let token = pool.token("wall", "viewer")?;
        let received = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let done = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..viewers {
            let mut viewer = Client::connect(hub.addr, &token).await?;
            let subscribe = match max_rate {
                Some(rate) => {
                    format!(r#"{{"type":"subscribe","channel":"fleet","max_rate":{rate}}}"#)
                }
                None => r#"{"type":"subscribe","channel":"fleet"}"#.to_owned(),
            };
            viewer.send(&subscribe).await?;
            let (received, done) = (received.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(200), viewer.next()).await {
                        Ok(Ok(Incoming::Text(text))) => {
                            received.0.fetch_add(1, Ordering::Relaxed);
                            received.1.fetch_add(text.len() as u64, Ordering::Relaxed);
                        }
                        Ok(_) => break,
                        Err(_) => {}
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (messages0, bytes0) = (
            received.0.load(Ordering::Relaxed),
            received.1.load(Ordering::Relaxed),
        );
        let acked0 = acked.load(Ordering::Relaxed);
        let cpu0 = procstat::cpu_time(pid)?;
        let started = Instant::now();
        tokio::time::sleep(seconds).await;
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = procstat::cpu_time(pid)?.saturating_sub(cpu0).as_secs_f64();
        let per_viewer = viewers.max(1) as f64;
        phases.push(Phase {
            name,
            readings_per_s: (acked.load(Ordering::Relaxed) - acked0) as f64 / elapsed,
            messages_per_s: (received.0.load(Ordering::Relaxed) - messages0) as f64
                / elapsed
                / per_viewer,
            bytes_per_s: (received.1.load(Ordering::Relaxed) - bytes0) as f64
                / elapsed
                / per_viewer,
            hub_cpu_s: cpu / elapsed,
        });
        done.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = task.await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for agent in agents {
        agent.await??;
    }
    let disconnects = metric(&hub.metrics().await?, "hub_slow_consumer_disconnects_total");
    println!(
        "\n{} devices, {} readings/s asked, {} viewers of fleet per phase, {} s each; one hub, embedded broker",
        args.devices, args.rate, args.viewers, args.seconds
    );
    println!(
        "{:<24} {:>12} {:>14} {:>14} {:>12} {:>16}",
        "phase", "readings/s", "msgs/s/viewer", "KB/s/viewer", "hub CPU", "CPU/viewer (ms/s)"
    );
    let base = phases[0].hub_cpu_s;
    for p in &phases {
        let per_viewer = if p.name == "no viewer" {
            0.0
        } else {
            (p.hub_cpu_s - base) / args.viewers as f64 * 1000.0
        };
        println!(
            "{:<24} {:>12.0} {:>14.0} {:>14.1} {:>11.0}% {:>16.1}",
            p.name,
            p.readings_per_s,
            p.messages_per_s,
            p.bytes_per_s / 1024.0,
            p.hub_cpu_s * 100.0,
            per_viewer
        );
        println!(
            "{{\"bench\":\"fleet-view\",\"phase\":\"{}\",\"readings_per_s\":{:.0},\"messages_per_s_per_viewer\":{:.1},\"bytes_per_s_per_viewer\":{:.0},\"hub_cpu\":{:.3},\"cpu_ms_per_s_per_viewer\":{:.2}}}",
            p.name, p.readings_per_s, p.messages_per_s, p.bytes_per_s, p.hub_cpu_s, per_viewer
        );
    }
    println!("slow-consumer disconnects over the run: {disconnects}");
    Ok(())
}

/// Sends windows of 10 publishes every `period` and reads their acks, until `stop`.
async fn publish(
    mut agent: Publisher,
    period: Duration,
    stop: &AtomicBool,
    acked: &AtomicU64,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let window: Vec<String> = (0..10)
            .map(|_| {
                seq += 1;
                format!(r#"{{"type":"publish","seq":{seq},"data":{{"sensor":"bench","metrics":{{"t":{{"value":{},"unit":"C"}}}}}}}}"#, seq % 100)
            })
            .collect();
        agent.send_together(&window).await?;
        for _ in 0..10 {
            match agent.next().await? {
                Incoming::Text(t) if t.starts_with(br#"{"type":"ack""#) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                Incoming::Text(t) => bail!("publish refused: {}", String::from_utf8_lossy(&t)),
                Incoming::Closed(code) => bail!("agent closed: {code}"),
            }
        }
    }
    Ok(())
}

/// A hub with `devices` demo devices, each reported once; the snapshot of `fleet`, timed.
async fn snapshot(args: &Args, devices: usize, redis: bool) -> anyhow::Result<()> {
    let devices_text = devices.to_string();
    let env = [
        ("HUB_DEMO__DEVICES", devices_text.as_str()),
        ("HUB_DEMO__INTERVAL", "1h"),
        ("HUB_LIMITS__OUTBOUND_QUEUE_BYTES", "268435456"),
        ("HUB_HISTORY__SIZE", "10"),
        // A channel per device, and room over the 100,000 of the default.
        ("HUB_LIMITS__MAX_CHANNELS", "1000000"),
        ("HUB_HISTORY__SNAPSHOT_DEVICES", "1000000"),
        // A snapshot script of 100,000 devices takes longer than the default 2 s.
        ("HUB_BROKER__TIMEOUT", "30s"),
    ];
    let pool = match redis {
        true => Pool::start(&args.hub_bin, 1, &env)?,
        false => Pool::embedded(&args.hub_bin, &env)?,
    };
    let hub = &pool.hubs[0];
    let token = pool.token("wall", "viewer")?;
    // The demo's first round is in once a snapshot holds every device; then one is timed.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let taken = take_snapshot(hub.addr, &token).await?;
        if taken.items >= devices {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the demo's {devices} devices never all reported ({} did)",
                taken.items
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let Taken {
        took,
        items,
        bytes,
        frames,
        truncated,
    } = take_snapshot(hub.addr, &token).await?;
    let broker = if redis { "one Redis" } else { "embedded" };
    println!(
        "snapshot of {devices} devices ({broker}): {:.0} ms, {items} items, {:.1} MB in {frames} frames{}",
        took.as_secs_f64() * 1000.0,
        bytes as f64 / 1e6,
        if truncated { ", TRUNCATED" } else { "" }
    );
    println!(
        "{{\"bench\":\"snapshot\",\"devices\":{devices},\"broker\":\"{broker}\",\"ms\":{:.1},\"items\":{items},\"bytes\":{bytes},\"frames\":{frames}}}",
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}

struct Taken {
    took: Duration,
    items: usize,
    bytes: usize,
    frames: usize,
    truncated: bool,
}

/// A new viewer's snapshot of `fleet`: from sending the subscribe to its last frame.
async fn take_snapshot(addr: std::net::SocketAddr, token: &str) -> anyhow::Result<Taken> {
    let mut viewer = Client::connect(addr, token).await?;
    let started = Instant::now();
    viewer
        .send(r#"{"type":"subscribe","channel":"fleet","snapshot":true}"#)
        .await?;
    let (mut items, mut bytes, mut frames) = (0usize, 0usize, 0usize);
    let mut truncated = false;
    loop {
        let text = match viewer.next().await.context("snapshot")? {
            Incoming::Text(text) => text,
            Incoming::Closed(code) => bail!("viewer closed: {code}"),
        };
        if text.starts_with(br#"{"type":"error""#) {
            bail!("snapshot refused: {}", String::from_utf8_lossy(&text));
        }
        if !text.starts_with(br#"{"type":"snapshot""#) {
            continue;
        }
        let frame: serde_json::Value = serde_json::from_slice(&text)?;
        items += frame["items"].as_array().map_or(0, Vec::len);
        bytes += text.len();
        frames += 1;
        truncated |= frame["truncated"] == true;
        if frame["more"] != true {
            break;
        }
    }
    Ok(Taken {
        took: started.elapsed(),
        items,
        bytes,
        frames,
        truncated,
    })
}
