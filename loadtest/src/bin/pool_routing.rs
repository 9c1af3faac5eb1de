//! Interest-based routing against broadcast routing on a pool of hubs sharing Redis.
//!
//! Each hub's viewers watch a disjoint share of the devices' channels (a dashboard per site);
//! every device publishes through another hub. Under `interest` a hub receives from Redis only the
//! channels its viewers watch; under `broadcast` (one pattern subscription, as socket.io's classic
//! Redis adapter does) every hub receives every publication of every channel and drops most of
//! them. The same workload runs under both; the table shows what each hub received and the CPU
//! it spent.
//!
//!     cargo run --release -p loadtest --bin pool-routing -- --hubs 3 --devices 300 --readings 100

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use loadtest::pool::{Pool, metric};
use loadtest::procstat;
use loadtest::ws::{Client, Incoming};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    hubs: usize,
    /// Devices (one agent connection each); device d is watched on hub d % hubs.
    #[arg(long, default_value_t = 300)]
    devices: usize,
    /// Readings per device.
    #[arg(long, default_value_t = 100)]
    readings: u64,
    /// The hub binary.
    #[arg(long, default_value = "target/release/hub")]
    hub_bin: PathBuf,
    /// Longest time one run may take.
    #[arg(long, default_value = "120", value_parser = |s: &str| s.parse().map(Duration::from_secs))]
    limit: Duration,
}

struct HubFigures {
    cpu: Duration,
    received: u64,
    unwanted: u64,
}

struct Run {
    mode: &'static str,
    elapsed: Duration,
    hubs: Vec<HubFigures>,
    redis_cpu: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runs = Vec::new();
    for mode in ["interest", "broadcast"] {
        runs.push(
            run(&args, mode)
                .await
                .with_context(|| format!("{mode} run"))?,
        );
    }
    println!(
        "\n{} hubs, {} devices x {} readings ({} publications, 2 channels each: devices.<id>, fleet)",
        args.hubs,
        args.devices,
        args.readings,
        args.devices as u64 * args.readings
    );
    println!(
        "{:<10} {:>5} {:>12} {:>12} {:>10} {:>10}",
        "routing", "hub", "from redis", "unwanted", "hub cpu s", "wall s"
    );
    for r in &runs {
        for (i, h) in r.hubs.iter().enumerate() {
            println!(
                "{:<10} {:>5} {:>12} {:>12} {:>10.2} {:>10.2}",
                r.mode,
                i + 1,
                h.received,
                h.unwanted,
                h.cpu.as_secs_f64(),
                r.elapsed.as_secs_f64()
            );
        }
        println!(
            "{:<10} {:>5} {:>12} {:>12} {:>10.2}   redis cpu s {:.2}",
            r.mode,
            "all",
            total(r, |h| h.received),
            total(r, |h| h.unwanted),
            cpu(r),
            r.redis_cpu.as_secs_f64()
        );
    }
    let (interest, broadcast) = (&runs[0], &runs[1]);
    println!(
        "broadcast / interest: messages from redis x{:.2}, hub cpu x{:.2}, redis cpu x{:.2}",
        total(broadcast, |h| h.received) as f64 / total(interest, |h| h.received).max(1) as f64,
        cpu(broadcast) / cpu(interest).max(1e-9),
        broadcast.redis_cpu.as_secs_f64() / interest.redis_cpu.as_secs_f64().max(1e-9),
    );
    let json: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                r#"{{"routing":"{}","hubs":{},"devices":{},"readings":{},"received":{},"unwanted":{},"hub_cpu_s":{:.3},"redis_cpu_s":{:.3},"wall_s":{:.3}}}"#,
                r.mode, args.hubs, args.devices, args.readings, total(r, |h| h.received), total(r, |h| h.unwanted), cpu(r), r.redis_cpu.as_secs_f64(), r.elapsed.as_secs_f64()
            )
        })
        .collect();
    println!("{}", json.join("\n"));
    Ok(())
}

fn total(r: &Run, f: impl Fn(&HubFigures) -> u64) -> u64 {
    r.hubs.iter().map(f).sum()
}

fn cpu(r: &Run) -> f64 {
    r.hubs.iter().map(|h| h.cpu.as_secs_f64()).sum()
}

async fn run(args: &Args, mode: &'static str) -> anyhow::Result<Run> {
    let pool = Pool::start(
        &args.hub_bin,
        args.hubs,
        &[
            ("HUB_BROKER__ROUTING", mode),
            ("HUB_LIMITS__PUBLISH_RATE", "1000000"),
            ("HUB_LIMITS__MAX_SUBSCRIPTIONS", "1000"),
            ("HUB_LIMITS__CONNECT_RATE", "100000"),
        ],
    )?;
    let viewer_token = pool.token("bench-viewer", "viewer")?;
    // One viewer per hub, watching the devices assigned to that hub.
    let mut viewers = Vec::new();
    for (i, hub) in pool.hubs.iter().enumerate() {
        let mut client = Client::connect(hub.addr, &viewer_token).await?;
        let mine: Vec<usize> = (0..args.devices).filter(|d| d % args.hubs == i).collect();
        for d in &mine {
            client
                .send(&format!(
                    r#"{{"type":"subscribe","channel":"devices.pi-{d}"}}"#
                ))
                .await?;
            expect(&mut client, b"subscribed").await?;
        }
        viewers.push((client, mine.len() as u64 * args.readings));
    }
    let mut agents = Vec::new();
    for d in 0..args.devices {
        let hub = &pool.hubs[(d + 1) % args.hubs];
        agents.push((
            Client::connect(hub.addr, &pool.token(&format!("pi-{d}"), "agent")?).await?,
            args.readings,
        ));
    }
    let before: Vec<Duration> = pool
        .hubs
        .iter()
        .map(|h| procstat::cpu_time(h.child.id()))
        .collect::<Result<_, _>>()?;
    let redis_before = procstat::cpu_time(pool.redis[0].id())?;
    let start = Instant::now();
    let deadline = start + args.limit;

    let publishers: Vec<_> = agents
        .into_iter()
        .map(|(mut agent, count)| {
            tokio::spawn(async move {
                for seq in 1..=count {
                    agent
                        .send(&format!(
                            r#"{{"type":"publish","seq":{seq},"data":{{"v":{seq}}}}}"#
                        ))
                        .await?;
                    expect(&mut agent, b"ack").await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let readers: Vec<_> = viewers
        .into_iter()
        .map(|(mut viewer, expected)| {
            tokio::spawn(async move {
                let mut got = 0;
                while got < expected {
                    expect(&mut viewer, b"message").await?;
                    got += 1;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in publishers.into_iter().chain(readers) {
        tokio::time::timeout_at(deadline.into(), task)
            .await
            .context("run exceeded --limit")???;
    }
    let elapsed = start.elapsed();

    let mut hubs = Vec::new();
    for (hub, before) in pool.hubs.iter().zip(before) {
        // Messages for channels nobody here watches may still be in flight: wait until settled.
        let mut metrics = hub.metrics().await?;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let again = hub.metrics().await?;
            let settled = metric(&again, "hub_broker_messages_total")
                == metric(&metrics, "hub_broker_messages_total");
            metrics = again;
            if settled {
                break;
            }
        }
        hubs.push(HubFigures {
            cpu: procstat::cpu_time(hub.child.id())?.saturating_sub(before),
            received: metric(&metrics, "hub_broker_messages_total") as u64,
            unwanted: metric(&metrics, "hub_broker_unwanted_messages_total") as u64,
        });
    }
    let redis_cpu = procstat::cpu_time(pool.redis[0].id())?.saturating_sub(redis_before);
    Ok(Run {
        mode,
        elapsed,
        hubs,
        redis_cpu,
    })
}

/// Reads until a frame of `kind` arrives; an error frame or a close fails the run.
async fn expect(client: &mut Client, kind: &[u8]) -> anyhow::Result<()> {
    let prefix = [&br#"{"type":""#[..], kind, b"\""].concat();
    match client.next().await? {
        Incoming::Text(t) if t.starts_with(&prefix) => Ok(()),
        Incoming::Text(t) => bail!(
            "expected {}, got {}",
            String::from_utf8_lossy(kind),
            String::from_utf8_lossy(&t)
        ),
        Incoming::Closed(code) => bail!("closed with {code}"),
    }
}
