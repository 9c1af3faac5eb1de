//! Footprint of the edge agent: RSS and CPU of a real agent process sending readings to a real
//! hub (embedded broker) on loopback, at a given reading rate.
//!
//! ```sh
//! cargo build --release -p hub -p edge-agent -p loadtest
//! target/release/agent-footprint --seconds 60 --interval 1s
//! # a Pi build, under qemu-user (scripts/build-agent.sh aarch64)
//! target/release/agent-footprint --runner qemu-aarch64 \
//!     --agent target/aarch64-unknown-linux-gnu/release/edge-agent
//! ```
//!
//! Under qemu-user the measured process is qemu with the agent inside it: its RSS is the
//! agent's pages plus qemu's own (translated code, its heap), an upper bound for a Pi; its CPU
//! time is the emulator's and says nothing about a Pi's.
//!
//! Prints a table and one JSON line. Bounded: runs `--seconds` after a warm-up, then stops both.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use loadtest::procstat;

#[derive(Parser)]
struct Args {
    /// Measured period, after a 5 s warm-up.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Interval of the simulated sensor: one reading per interval.
    #[arg(long, default_value = "1s")]
    interval: String,
    /// The agent binary [default: the `edge-agent` beside this tool].
    #[arg(long)]
    agent: Option<std::path::PathBuf>,
    /// Runs the agent through this command, e.g. `qemu-aarch64` or `qemu-arm` for a Pi build.
    #[arg(long)]
    runner: Option<String>,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let hub_bin = loadtest::pool::sibling_binary("hub")?;
    let agent_bin = match args.agent.clone() {
        Some(path) => path,
        None => loadtest::pool::sibling_binary("edge-agent")?,
    };
    let dir = tempfile::tempdir()?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let secret = "agent-footprint-secret-of-32-bytes!!";
    let hub_env = |cmd: &mut Command| {
        cmd.env("HUB_LISTEN", format!("127.0.0.1:{port}"))
            .env("HUB_AUTH__HS256_SECRET", secret)
            .env("RUST_LOG", "warn");
    };
    let mut cmd = Command::new(&hub_bin);
    hub_env(&mut cmd);
    let _hub = Killed(cmd.arg("serve").stdout(Stdio::null()).spawn()?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the hub did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cmd = Command::new(&hub_bin);
    hub_env(&mut cmd);
    let token = cmd
        .args([
            "token",
            "--sub",
            "footprint",
            "--role",
            "agent",
            "--ttl",
            "2h",
        ])
        .output()?;
    std::fs::write(dir.path().join("token"), &token.stdout)?;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\nurl = \"ws://127.0.0.1:{port}/ws\"\n[auth]\ntoken_file = \"{d}/token\"\n\
             [storage]\ndir = \"{d}/data\"\n[[sensors]]\nkind = \"simulated\"\ninterval = \"{i}\"\n",
            d = dir.path().display(),
            i = args.interval
        ),
    )?;
    let mut command = match args.runner.as_deref().map(str::split_whitespace) {
        Some(mut runner) => {
            let mut cmd = Command::new(runner.next().context("--runner is empty")?);
            cmd.args(runner).arg(&agent_bin);
            cmd
        }
        None => Command::new(&agent_bin),
    };
    let agent = Killed(
        command
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let pid = agent.0.id();
    std::thread::sleep(Duration::from_secs(5));
    let (cpu0, t0) = (procstat::cpu_time(pid)?, Instant::now());
    let mut rss_max = 0;
    while t0.elapsed() < Duration::from_secs(args.seconds) {
        rss_max = rss_max.max(procstat::rss_bytes(pid).context("agent gone")?);
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu = procstat::cpu_time(pid)? - cpu0;
    let wall = t0.elapsed();
    let rss_end = procstat::rss_bytes(pid)?;
    let cpu_pct = 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    let runner = args.runner.as_deref().unwrap_or("none");
    println!(
        "agent footprint, simulated sensor every {}, runner {runner}",
        args.interval
    );
    println!("  measured       {:>8.1} s", wall.as_secs_f64());
    println!("  CPU            {:>8.3} % of one core", cpu_pct);
    println!("  RSS max        {:>8.2} MiB", rss_max as f64 / 1048576.0);
    println!("  RSS at end     {:>8.2} MiB", rss_end as f64 / 1048576.0);
    println!(
        "{}",
        serde_json::json!({"bench": "agent-footprint", "interval": args.interval, "runner": runner,
            "seconds": wall.as_secs_f64(), "cpu_percent": cpu_pct,
            "rss_max_bytes": rss_max, "rss_end_bytes": rss_end})
    );
    Ok(())
}
