//! The real `hub` binary as a child process, for what only a process can show: signals, exit
//! codes, a hub killed without a goodbye.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::SECRET;

/// The real `hub` binary with `env`, its stderr followed until it reports its address.
pub struct HubProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
}

pub const ENV: &[(&str, &str)] = &[
    ("HUB_LISTEN", "127.0.0.1:0"),
    ("HUB_AUTH__HS256_SECRET", SECRET),
    ("HUB_SHUTDOWN__DRAIN_TIMEOUT", "5s"),
    ("RUST_LOG", "info"),
];

pub fn hub_command(env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hub"));
    cmd.env_clear().envs(env.iter().copied());
    cmd
}

impl HubProcess {
    pub fn start() -> HubProcess {
        HubProcess::start_with(&[])
    }

    /// The binary with `ENV` plus `extra`.
    pub fn start_with(extra: &[(&str, &str)]) -> HubProcess {
        let mut command = hub_command(ENV);
        command.envs(extra.iter().copied());
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("addr=").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("hub reports its address");
        HubProcess {
            child,
            addr: addr.parse().unwrap(),
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status();
        assert!(status.unwrap().success());
    }

    pub fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "hub did not exit in {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
