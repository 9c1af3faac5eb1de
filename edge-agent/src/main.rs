//! `edge-agent`: the binary a fleet operator installs on every Pi.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use edge_agent::config::Settings;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Reads sensors and pushes readings to a telemetry hub"
)]
struct Cli {
    /// Settings file [default: /etc/edge-agent/agent.toml, if it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read only the simulated source (no hardware needed).
    #[arg(long)]
    simulate: bool,
    /// Validate the settings, print them with secrets masked, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.simulate {
        // SAFETY: single-threaded here; nothing else reads the environment yet.
        unsafe { std::env::set_var("AGENT_SIMULATE", "true") };
    }
    let settings = Settings::load(cli.config.as_deref()).context("invalid configuration")?;
    if cli.check_config {
        print!("{}", settings.to_masked_toml());
        edge_agent::agent::device_id(&settings.token()?)
            .context("the token does not name a device")?;
        return Ok(());
    }
    // One thread: a Pi Zero has one core, and the agent's work is small. Sensor reads and log
    // writes run on a few blocking threads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(4)
        .enable_all()
        .build()?;
    let device = settings
        .token()
        .ok()
        .and_then(|t| edge_agent::agent::device_id(&t).ok())
        .unwrap_or_else(|| "unknown".to_owned());
    let telemetry = {
        let _entered = runtime.enter();
        observability::init(
            &observability::Identity {
                service: "edge-agent",
                instance: &device,
                version: env!("CARGO_PKG_VERSION"),
            },
            settings.log.format,
            &settings.telemetry,
            runtime.handle(),
        )
        .context("cannot set up logs and telemetry")?
    };
    let roots = telemetry.roots();
    let result = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Installed before anything else: a SIGTERM during start-up still stops cleanly.
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            on_signal.cancel();
        });
        edge_agent::agent::run(settings, roots, shutdown).await
    });
    telemetry.shutdown(&runtime);
    result
}
