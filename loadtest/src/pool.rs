//! A private pool for benchmarks: one redis-server on a unix socket (or a Redis Cluster of
//! redis-server processes on loopback ports, or none: one hub on its embedded broker) and hub
//! processes on ephemeral loopback ports, all in one temp dir, killed on drop.

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
    /// The redis-server processes: one, or a cluster's masters.
    pub redis: Vec<Child>,
    pub hubs: Vec<Hub>,
    hub_bin: PathBuf,
    secret: String,
}

impl Hub {
    /// The hub's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/metrics")
            .header("host", "hub")
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let res = sender.send_request(req).await?;
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// One series of a `/metrics` text (name with any labels, as written), 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

impl Pool {
    /// Starts redis and `hubs` hubs with the extra settings `env` (`HUB_*` variables).
    pub fn start(hub_bin: &Path, hubs: usize, env: &[(&str, &str)]) -> anyhow::Result<Pool> {
        Pool::start_on(hub_bin, hubs, 0, env)
    }

    /// As [`Pool::start`], on a Redis Cluster of `masters` masters when `masters > 0`.
    pub fn start_on(
        hub_bin: &Path,
        hubs: usize,
        masters: usize,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Pool> {
        let dir = tempfile::tempdir()?;
        let (redis, broker) = if masters == 0 {
            let (redis, url) = single_redis(dir.path())?;
            (vec![redis], ("HUB_BROKER__URL", url))
        } else {
            let (redis, nodes) = redis_cluster(dir.path(), masters)?;
            (redis, ("HUB_BROKER__CLUSTER_NODES", nodes))
        };
        let mut pool = Pool::empty(hub_bin, dir, redis);
        for i in 0..hubs {
            pool.spawn_hub(i, Some((broker.0, &broker.1)), env)?;
        }
        Ok(pool)
    }

    /// One hub on its embedded broker: no Redis.
    pub fn embedded(hub_bin: &Path, env: &[(&str, &str)]) -> anyhow::Result<Pool> {
        let mut pool = Pool::empty(hub_bin, tempfile::tempdir()?, Vec::new());
        pool.spawn_hub(0, None, env)?;
        Ok(pool)
    }

    fn empty(hub_bin: &Path, dir: tempfile::TempDir, redis: Vec<Child>) -> Pool {
        Pool {
            dir,
            redis,
            hubs: Vec::new(),
            hub_bin: hub_bin.to_owned(),
            secret: "loadtest-secret-loadtest-secret-0".to_owned(),
        }
    }

    fn spawn_hub(
        &mut self,
        i: usize,
        broker: Option<(&str, &str)>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        if !self.hub_bin.exists() {
            bail!(
                "{} not found: cargo build --release -p hub",
                self.hub_bin.display()
            );
        }
        let mut command = Command::new(&self.hub_bin);
        command
            .env("HUB_LISTEN", "127.0.0.1:0")
            .env("HUB_NODE_ID", format!("hub-{}", i + 1))
            .env("HUB_AUTH__HS256_SECRET", &self.secret)
            .env("RUST_LOG", "warn,hub::server=info");
        if let Some((key, value)) = broker {
            command.env(key, value);
        }
        let mut child = command
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting hub")?;
        let addr = listening_addr(&mut child)?;
        self.hubs.push(Hub { addr, child });
        Ok(())
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

/// One redis-server on a unix socket in `dir`, no persistence; its URL.
pub fn single_redis(dir: &Path) -> anyhow::Result<(Child, String)> {
    let socket = dir.join("redis.sock");
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
        .arg(dir)
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
    Ok((redis, format!("redis+unix://{}", socket.display())))
}

/// A Redis Cluster of `masters` masters on loopback ports, no replicas, no persistence; its
/// seed URLs, comma-separated.
fn redis_cluster(dir: &Path, masters: usize) -> anyhow::Result<(Vec<Child>, String)> {
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..masters {
        // The cluster bus listens on port + 10000.
        let port = loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            if port < 50000 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
                break port;
            }
        };
        let node_dir = dir.join(format!("redis-{i}"));
        std::fs::create_dir_all(&node_dir)?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&node_dir)
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        children.push(child);
        wait_until_ok(port, "PING", "PONG")?;
        addrs.push(format!("127.0.0.1:{port}"));
    }
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .context("redis-cli --cluster create")?;
    if !out.status.success() {
        bail!(
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for addr in &addrs {
        let port: u16 = addr.rsplit(':').next().unwrap_or("0").parse()?;
        wait_until_ok(port, "CLUSTER INFO", "cluster_state:ok")?;
    }
    let urls: Vec<String> = addrs.iter().map(|a| format!("redis://{a}")).collect();
    Ok((children, urls.join(",")))
}

/// Waits up to 20 s for `redis-cli -p port command` to print `expected`.
fn wait_until_ok(port: u16, command: &str, expected: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(command.split(' '))
            .output();
        if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(expected)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("redis on :{port} never answered {command} with {expected}");
        }
        std::thread::sleep(Duration::from_millis(20));
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
    // The last lines it wrote, for the error if it never listens.
    let mut said = std::collections::VecDeque::with_capacity(20);
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.split("addr=").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or("").parse()?;
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(addr);
        }
        if said.len() == 20 {
            said.pop_front();
        }
        said.push_back(line);
    }
    let said: Vec<String> = said.into();
    bail!("the server exited before listening:\n{}", said.join("\n"))
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
        for redis in &mut self.redis {
            let _ = redis.kill();
            let _ = redis.wait();
        }
    }
}
