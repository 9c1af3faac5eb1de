//! Ingest of a pool: agents publishing as fast as their acks allow through the hubs, onto one
//! Redis and onto Redis Clusters, in one run. Each agent sends a window of `--batch` publishes in
//! one write and waits for their acks, as the edge agent does when it is behind. Reports readings
//! acknowledged per second, the Redis CPU-seconds of each shard, the Redis CPU per reading per
//! target channel, the mean publication the hubs stored (from their `/metrics`), and the shard
//! imbalance (busiest shard over the mean). On a 2-core machine wall-clock scaling cannot show;
//! the CPU per reading and per shard do. Clusters run once per `--partitions` value (`fleet`
//! split into that many logs; 1 is the single hot slot), one instance with 1.
//!
//!     cargo build --release -p hub -p loadtest
//!     target/release/ingest --hubs 3 --devices 600 --readings 500 --masters 0,3,6 \
//!         --batch 1,10,100 --partitions 1,16

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use loadtest::pool::{Pool, metric};
use loadtest::procstat;
use loadtest::ws::{Client, Incoming, Publisher};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    hubs: usize,
    /// Devices, one agent connection each, spread over the hubs.
    #[arg(long, default_value_t = 60)]
    devices: usize,
    /// Readings per device and run (rounded down to a multiple of the batch).
    #[arg(long, default_value_t = 300)]
    readings: u64,
    /// The Redis setups to compare: 0 is one instance, N a cluster of N masters.
    #[arg(long, value_delimiter = ',', default_value = "0,3,6")]
    masters: Vec<usize>,
    /// `broker.partitions` values to run each cluster with.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    partitions: Vec<u32>,
    /// Publishes an agent sends in one write before it waits for their acks.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    batch: Vec<u64>,
    /// The hub binary.
    #[arg(long, default_value = "target/release/hub")]
    hub_bin: PathBuf,
    /// Longest time one run may take.
    #[arg(long, default_value = "120", value_parser = |s: &str| s.parse().map(Duration::from_secs))]
    limit: Duration,
}

/// Channels each reading goes to: `devices.<id>` and `fleet`.
const CHANNELS_PER_READING: f64 = 2.0;

struct Run {
    masters: usize,
    partitions: u32,
    batch: u64,
    /// Readings per publication the hubs stored.
    stored_batch: f64,
    acked: u64,
    elapsed: Duration,
    /// Redis CPU of each shard (one entry for one instance).
    shards: Vec<Duration>,
}

impl Run {
    fn redis_cpu(&self) -> f64 {
        self.shards.iter().map(Duration::as_secs_f64).sum()
    }

    fn us_per_reading_channel(&self) -> f64 {
        self.redis_cpu() * 1e6 / (self.acked as f64 * CHANNELS_PER_READING).max(1.0)
    }

    fn imbalance(&self) -> f64 {
        let mean = self.redis_cpu() / self.shards.len().max(1) as f64;
        let max = self
            .shards
            .iter()
            .map(Duration::as_secs_f64)
            .fold(0.0, f64::max);
        max / mean.max(1e-9)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.batch.iter().any(|&b| b == 0 || b > args.readings) {
        bail!("--batch must be between 1 and --readings");
    }
    let mut runs = Vec::new();
    for &masters in &args.masters {
        let partitions = if masters == 0 {
            &[1][..]
        } else {
            &args.partitions[..]
        };
        for &parts in partitions {
            let name = format!("{} P={parts}", setup(masters));
            let parts_text = parts.to_string();
            let pool = Pool::start_on(
                &args.hub_bin,
                args.hubs,
                masters,
                &[
                    ("HUB_LIMITS__PUBLISH_RATE", "1000000"),
                    ("HUB_LIMITS__PUBLISH_BURST", "1000000"),
                    ("HUB_LIMITS__CONNECT_RATE", "100000"),
                    ("HUB_BROKER__PARTITIONS", &parts_text),
                ],
            )
            .with_context(|| format!("starting {name}"))?;
            for &batch in &args.batch {
                let mut run = run(&args, &pool, masters, batch)
                    .await
                    .with_context(|| format!("batch {batch} on {name}"))?;
                run.partitions = parts;
                runs.push(run);
            }
        }
    }
    println!(
        "\n{} hubs, {} devices x {} readings, each to devices.<id> and fleet, sent as acks allow",
        args.hubs, args.devices, args.readings
    );
    println!(
        "{:<14} {:>5} {:>6} {:>8} {:>10} {:>12} {:>14} {:>18} {:>10}  shards (redis cpu s)",
        "redis",
        "parts",
        "batch",
        "stored",
        "acked",
        "readings/s",
        "redis cpu s",
        "us/reading/chan",
        "max/mean"
    );
    for r in &runs {
        let shards: Vec<String> = r
            .shards
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect();
        println!(
            "{:<14} {:>5} {:>6} {:>8.1} {:>10} {:>12.0} {:>14.2} {:>18.1} {:>10.2}  {}",
            setup(r.masters),
            r.partitions,
            r.batch,
            r.stored_batch,
            r.acked,
            r.acked as f64 / r.elapsed.as_secs_f64(),
            r.redis_cpu(),
            r.us_per_reading_channel(),
            r.imbalance(),
            shards.join(" ")
        );
    }
    for r in &runs {
        println!(
            r#"{{"bench":"ingest","masters":{},"partitions":{},"batch":{},"stored_batch":{:.2},"hubs":{},"devices":{},"readings":{},"acked":{},"wall_s":{:.3},"redis_cpu_s":{:.3},"us_per_reading_channel":{:.2},"imbalance":{:.3}}}"#,
            r.masters,
            r.partitions,
            r.batch,
            r.stored_batch,
            args.hubs,
            args.devices,
            args.readings,
            r.acked,
            r.elapsed.as_secs_f64(),
            r.redis_cpu(),
            r.us_per_reading_channel(),
            r.imbalance()
        );
    }
    Ok(())
}

fn setup(masters: usize) -> String {
    match masters {
        0 => "one instance".to_owned(),
        n => format!("cluster x{n}"),
    }
}

/// Readings and publications the hubs have stored so far.
async fn stored(pool: &Pool) -> anyhow::Result<(f64, f64)> {
    let mut readings = 0.0;
    let mut publications = 0.0;
    for hub in &pool.hubs {
        let text = hub.metrics().await?;
        readings += metric(&text, "hub_publish_batch_readings_sum");
        publications += metric(&text, "hub_publish_batch_readings_count");
    }
    Ok((readings, publications))
}

async fn run(args: &Args, pool: &Pool, masters: usize, batch: u64) -> anyhow::Result<Run> {
    let readings = args.readings / batch * batch;
    let mut agents = Vec::new();
    for d in 0..args.devices {
        let hub = &pool.hubs[d % args.hubs];
        // A device of its own per run: its seqs start at 1.
        let token = pool.token(&format!("pi-b{batch}-{d}"), "agent")?;
        agents.push(Publisher::new(Client::connect(hub.addr, &token).await?));
    }
    let cpu = |pool: &Pool| -> std::io::Result<Vec<Duration>> {
        pool.redis
            .iter()
            .map(|r| procstat::cpu_time(r.id()))
            .collect()
    };
    let stored_before = stored(pool).await?;
    let before = cpu(pool)?;
    let start = Instant::now();
    let publishers: Vec<_> = agents
        .into_iter()
        .map(|mut agent| {
            tokio::spawn(async move {
                let mut window = Vec::new();
                for first in (1..=readings).step_by(batch as usize) {
                    window.clear();
                    window.extend((first..first + batch).map(|seq| {
                        format!(r#"{{"type":"publish","seq":{seq},"data":{{"v":{seq}}}}}"#)
                    }));
                    agent.send_together(&window).await?;
                    for seq in first..first + batch {
                        match agent.next().await? {
                            Incoming::Text(t) if t.starts_with(br#"{"type":"ack""#) => {}
                            Incoming::Text(t) => {
                                bail!("publish {seq}: {}", String::from_utf8_lossy(&t))
                            }
                            Incoming::Closed(code) => bail!("closed with {code}"),
                        }
                    }
                }
                anyhow::Ok(readings)
            })
        })
        .collect();
    let mut acked = 0;
    for publisher in publishers {
        acked += tokio::time::timeout(args.limit, publisher)
            .await
            .context("the run took longer than --limit")???;
    }
    let elapsed = start.elapsed();
    let after = cpu(pool)?;
    let stored_after = stored(pool).await?;
    let shards = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let stored_batch =
        (stored_after.0 - stored_before.0) / (stored_after.1 - stored_before.1).max(1.0);
    Ok(Run {
        masters,
        partitions: 1,
        batch,
        stored_batch,
        acked,
        elapsed,
        shards,
    })
}
