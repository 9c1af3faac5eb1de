use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hub::Settings;
use hub::revocation::{RevocationError, RevocationRequest, RevocationStore};
use hub::token::{TokenRequest, mint};
use hub_protocol::Role;

/// Telemetry hub: authenticates WebSocket clients and fans readings out to dashboards.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML settings file; `HUB_*` environment variables override it.
    #[arg(long, short, global = true, env = "HUB_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (the default).
    Serve,
    /// Print a token signed with the configured key.
    Token {
        /// Identity: the device id for agents.
        #[arg(long)]
        sub: String,
        /// `agent`, `viewer` or `admin` (the /admin endpoints).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Lifetime, e.g. `1h`, `30d`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Agents: groups whose channels also get the readings (comma-separated).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Viewers: channel patterns it may subscribe to (comma-separated; default: the hub's).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Sign with this key of `auth.jwks_file` (its `kid` goes in the token's header).
        #[arg(long)]
        kid: Option<String>,
    },
    /// Void tokens at once on every hub of the pool: all of a device's (or viewer's) issued
    /// before a time, or one by its `jti`. Written where the hubs read it (Redis, or
    /// auth.revocations_file); each hub applies it within auth.revocation_poll.
    Revoke {
        /// Every token of this `sub` issued before `--before`.
        #[arg(long, conflicts_with = "jti", required_unless_present = "jti")]
        sub: Option<String>,
        /// Unix seconds or RFC 3339 (`2026-12-04T10:00:00Z`); default now.
        #[arg(long, requires = "sub", value_parser = parse_time)]
        before: Option<u64>,
        /// The one token with this `jti`.
        #[arg(long)]
        jti: Option<String>,
        /// When that token expires (its `exp`), so the entry can go then; default the longest a
        /// token may live (auth.max_token_lifetime).
        #[arg(long, requires = "jti", value_parser = parse_time)]
        until: Option<u64>,
    },
    /// Exit 0 if GET URL answers 200 within two seconds (container health checks without a shell).
    Probe {
        #[arg(default_value = "http://127.0.0.1:8080/healthz")]
        url: hyper::Uri,
    },
}

/// jemalloc: a connection's buffers come from size-class slabs, untouched pages stay out of
/// RSS, and memory freed after a reconnect storm goes back to the system. 1.1 KiB less per
/// idle connection than glibc malloc, same fan-out (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("`{s}` is not a role: use agent, viewer or admin"))
}

/// Unix seconds, or an RFC 3339 time.
fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(seconds) = s.parse() {
        return Ok(seconds);
    }
    let at = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("`{s}` is neither unix seconds nor RFC 3339: {e}"))?;
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| format!("`{s}` is before 1970"))
}

fn revoke(settings: &Settings, request: RevocationRequest) -> anyhow::Result<()> {
    let now = hub::token::unix_now();
    let entry = request
        .into_revocation(&settings.auth, now)
        .map_err(anyhow::Error::msg)?;
    let store = RevocationStore::from_settings(settings)?.ok_or(RevocationError::NoStore)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(store.add(&entry, now))?;
    println!("{}", serde_json::to_string(&entry)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Probe { url }) = &cli.command {
        return probe(url);
    }
    let settings = Settings::load(cli.config.as_deref()).context("invalid configuration")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Token {
            sub,
            role,
            ttl,
            groups,
            channels,
            kid,
        } => {
            let request = TokenRequest {
                sub,
                role,
                ttl,
                groups,
                channels,
                kid,
            };
            println!("{}", mint(&settings.auth, &request)?);
            Ok(())
        }
        Command::Revoke {
            sub,
            before,
            jti,
            until,
        } => revoke(
            &settings,
            RevocationRequest {
                sub,
                before,
                jti,
                expires_at: until,
            },
        ),
        Command::Serve => serve(settings),
        Command::Probe { .. } => unreachable!("handled before loading settings"),
    }
}

fn probe(url: &hyper::Uri) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(async {
        let host = url.host().context("the URL needs a host")?;
        let port = url.port_u16().unwrap_or(80);
        let check = async {
            let stream = tokio::net::TcpStream::connect((host, port)).await?;
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            let path = url.path_and_query().map_or("/", |p| p.as_str());
            let request = hyper::Request::get(path)
                .header(hyper::header::HOST, host)
                .body(http_body_util::Empty::<bytes::Bytes>::new())?;
            anyhow::Ok(sender.send_request(request).await?.status())
        };
        tokio::time::timeout(Duration::from_secs(2), check)
            .await
            .context("timed out")?
    })?;
    anyhow::ensure!(status == hyper::StatusCode::OK, "{url} answered {status}");
    Ok(())
}

fn serve(mut settings: Settings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Resolved once: logs, traces and `hello` frames must name the same node.
    let node_id = settings.resolved_node_id();
    settings.node_id = Some(node_id.clone());
    let telemetry = {
        let _entered = runtime.enter();
        observability::init(
            &observability::Identity {
                service: "hub",
                instance: &node_id,
                version: env!("CARGO_PKG_VERSION"),
            },
            settings.log.format,
            &settings.telemetry,
            runtime.handle(),
        )
        .context("cannot set up logs and telemetry")?
    };
    raise_fd_limit(settings.limits.max_connections);
    let export = hub::OtelExport {
        roots: telemetry.roots(),
        meter: telemetry.meter("hub"),
    };
    let result = runtime.block_on(async {
        let server = hub::Server::bind_with(settings, export).await?;
        server.run(hub::shutdown::signal()).await;
        anyhow::Ok(())
    });
    telemetry.shutdown(&runtime);
    result
}

/// Each connection holds a socket: lift the soft open-file limit to the hard one (containers and
/// systemd often start at 1024 soft) and say when even that is below `max_connections`.
fn raise_fd_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < max_connections as u64 + 64 => tracing::warn!(
            limit,
            max_connections,
            "open-file limit is below limits.max_connections; raise the hard limit (LimitNOFILE, ulimit -n)"
        ),
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}
