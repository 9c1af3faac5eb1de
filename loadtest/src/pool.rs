//! A private pool for benchmarks: one redis-server on a unix socket and hub processes on
//! ephemeral loopback ports, all in one temp dir, killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub struct Hub {
    pub addr: SocketAddr,
    pub child: Child,
}

pub struct Pool {
    pub dir: tempfile::TempDir,
    pub redis: Child,
    pub hubs: Vec<Hub>,
    hub_bin: PathBuf,
    secret: String,
}

impl Pool {
    /// Starts redis and `hubs` hubs with the extra settings `env` (`HUB_*` variables).
    pub fn start(hub_bin: &Path, hubs: usize, env: &[(&str, &str)]) -> anyhow::Result<Pool> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("redis.sock");
        let redis = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("redis-server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let secret = "loadtest-secret-loadtest-secret-0".to_owned();
        let url = format!("redis+unix://{}", socket.display());
        let mut pool = Pool {
            dir,
            redis,
            hubs: Vec::new(),
            hub_bin: hub_bin.to_owned(),
            secret,
        };
        for i in 0..hubs {
            let mut child = Command::new(hub_bin)
                .env("HUB_LISTEN", "127.0.0.1:0")
                .env("HUB_NODE_ID", format!("hub-{}", i + 1))
                .env("HUB_BROKER__URL", &url)
                .env("HUB_AUTH__HS256_SECRET", &pool.secret)
                .env("RUST_LOG", "warn,hub::server=info")
                .envs(env.iter().copied())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting hub")?;
            let addr = listening_addr(&mut child)?;
            pool.hubs.push(Hub { addr, child });
        }
        Ok(pool)
    }

    /// A token the pool accepts, minted by the hub binary.
    pub fn token(&self, sub: &str, role: &str) -> anyhow::Result<String> {
        let out = Command::new(&self.hub_bin)
            .args(["token", "--sub", sub, "--role", role, "--ttl", "2h"])
            .env("HUB_AUTH__HS256_SECRET", &self.secret)
            .output()?;
        if !out.status.success() {
            bail!("hub token: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }
}

/// A binary of this workspace built beside the running one (`target/release/<name>`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing: cargo build --release -p {name}",
            path.display()
        );
    }
    Ok(path)
}

/// Reads the hub's stderr until it logs its address, then drains the rest in the background.
pub fn listening_addr(child: &mut Child) -> anyhow::Result<SocketAddr> {
    let stderr = child.stderr.take().context("hub stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.split("addr=").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or("").parse()?;
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(addr);
        }
    }
    bail!("hub exited before listening")
}

/// SIGTERM, then SIGKILL if `child` has not exited within `grace`: a hub drains and flushes
/// its telemetry on SIGTERM.
pub fn stop(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Pool {
    fn drop(&mut self) {
        for hub in &mut self.hubs {
            stop(&mut hub.child, Duration::from_secs(3));
        }
        let _ = self.redis.kill();
        let _ = self.redis.wait();
    }
}
