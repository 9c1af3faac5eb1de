//! The agent's Debian package as an operator meets it (`scripts/package-agent.sh`): what it holds,
//! and dpkg installing, upgrading, removing and purging it in a scratch root. The maintainer
//! scripts run outside a chroot with `DPKG_ROOT` set (`dpkg --force-script-chrootless`, as
//! Debian's bootstrap tools run them), so they change that root only; the agent the package put
//! there then runs from it against a real hub.
//!
//! The package under test is `EDGE_AGENT_DEB` (a Pi build, its agent run through
//! `EDGE_AGENT_RUNNER`, e.g. `qemu-aarch64`), or else one packed here from the host's debug build.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use common::{
    Agent, Dashboard, Hub, Installed, agent_command, assert_exactly_once, stop_drained, taken,
};

const DEVICE: &str = "pi-packaged";
const UNIT: &str = "lib/systemd/system/edge-agent.service";
const ENABLED: &str = "etc/systemd/system/multi-user.target.wants/edge-agent.service";
const SETTINGS: &str = "etc/edge-agent/agent.toml";
const TOKEN: &str = "etc/edge-agent/token";
const STATE: &str = "var/lib/edge-agent";

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; its standard output.
fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn host_arch() -> String {
    run(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_owned()
}

fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        if let Ok(deb) = std::env::var("EDGE_AGENT_DEB") {
            return deb.into();
        }
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("edge-agent-package");
        let arch = host_arch();
        run(Command::new(repo.join("scripts/package-agent.sh"))
            .arg("--binary")
            .arg(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["--arch", &arch, "--out"])
            .arg(&out));
        out.join(format!(
            "edge-agent_{}_{arch}.deb",
            env!("CARGO_PKG_VERSION")
        ))
    })
}

fn field(deb: &Path, name: &str) -> String {
    run(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name))
        .trim()
        .to_owned()
}

/// The same package under a later version: what an upgrade installs.
fn later_version(deb: &Path, version: &str, dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    run(Command::new("dpkg-deb")
        .arg("--raw-extract")
        .arg(deb)
        .arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let text: String = text
        .lines()
        .map(|line| match line.strip_prefix("Version: ") {
            Some(_) => format!("Version: {version}\n"),
            None => format!("{line}\n"),
        })
        .collect();
    std::fs::write(&control, text).unwrap();
    let out = dir.join(format!("edge-agent_{version}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-z1", "--build"])
        .arg(&tree)
        .arg(&out));
    out
}

/// A scratch root with what the package looks at on a fresh Raspberry Pi OS: the user and group
/// files (user `pi`; groups `i2c`, `gpio` and `spi`) and a dpkg database that knows `passwd`.
struct Root {
    dir: tempfile::TempDir,
    /// Not root: dpkg runs under fakeroot, which keeps the owners it fakes in a file here, one
    /// session after the other.
    fakeroot: Option<tempfile::TempDir>,
}

impl Root {
    fn new() -> Root {
        let dir = tempfile::tempdir().unwrap();
        for sub in [
            "etc",
            "var/lib/dpkg/info",
            "var/lib/dpkg/updates",
            "var/lib/dpkg/triggers",
        ] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let files = [
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/bash\npi:x:1000:1000:,,,:/home/pi:/bin/bash\n",
            ),
            (
                "etc/group",
                "root:x:0:\ni2c:x:998:pi\ngpio:x:997:pi\nspi:x:999:pi\npi:x:1000:\n",
            ),
            (
                "etc/shadow",
                "root:*:20000:0:99999:7:::\npi:*:20000:0:99999:7:::\n",
            ),
            (
                "etc/gshadow",
                "root:*::\ni2c:!::pi\ngpio:!::pi\nspi:!::pi\npi:!::\n",
            ),
            ("var/lib/dpkg/available", ""),
        ];
        for (path, text) in files {
            std::fs::write(dir.path().join(path), text).unwrap();
        }
        let arch = field(package(), "Architecture");
        let status = format!(
            "Package: passwd\nStatus: install ok installed\nPriority: required\n\
             Architecture: {arch}\nVersion: 1:4.13+dfsg1-1\nDescription: users and groups\n"
        );
        std::fs::write(dir.path().join("var/lib/dpkg/status"), status).unwrap();
        let fakeroot = (run(Command::new("id").arg("-u")).trim() != "0").then(|| {
            assert!(
                output(Command::new("sh").args(["-c", "command -v fakeroot"]))
                    .status
                    .success(),
                "dpkg installs files owned by root: run the tests as root, or install fakeroot"
            );
            tempfile::tempdir().unwrap()
        });
        let root = Root { dir, fakeroot };
        if arch != host_arch() {
            root.dpkg(&["--add-architecture", &arch]);
        }
        root
    }

    fn path(&self, path: &str) -> PathBuf {
        self.dir.path().join(path)
    }

    /// `program` as root: itself, or under fakeroot with the owners faked so far.
    fn as_root(&self, program: &str) -> Command {
        let Some(state) = &self.fakeroot else {
            return Command::new(program);
        };
        let owners = state.path().join("owners");
        let mut cmd = Command::new("fakeroot");
        if owners.exists() {
            cmd.arg("-i").arg(&owners);
        }
        cmd.arg("-s").arg(owners).arg("--").arg(program);
        cmd
    }

    /// dpkg on this root, which must succeed; what it and the maintainer scripts printed.
    fn dpkg(&self, args: &[&str]) -> String {
        let mut cmd = self.as_root("dpkg");
        cmd.arg(format!("--root={}", self.dir.path().display()))
            .args(["--force-script-chrootless", "--log=/dev/null"])
            .args(args);
        let out = output(&mut cmd);
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{cmd:?}: {}\n{printed}", out.status);
        printed
    }

    /// The group owning a file, as dpkg and the maintainer scripts left it.
    fn gid(&self, path: &str) -> String {
        run(self
            .as_root("stat")
            .args(["--format=%g"])
            .arg(self.path(path)))
        .trim()
        .to_owned()
    }

    fn install(&self, deb: &Path) -> String {
        self.dpkg(&["--install", deb.to_str().unwrap()])
    }

    /// `installed 0.1.0`, `config-files 0.1.0`, or `not-installed` for a package dpkg forgot.
    fn status(&self) -> String {
        let out = output(
            Command::new("dpkg-query")
                .arg(format!(
                    "--admindir={}",
                    self.path("var/lib/dpkg").display()
                ))
                .args(["--showformat=${db:Status-Status} ${Version}", "--show"])
                .arg("edge-agent"),
        );
        match String::from_utf8_lossy(&out.stdout).trim() {
            "" => "not-installed".to_owned(),
            status => status.to_owned(),
        }
    }

    /// The fields of a line of `/etc/passwd` or `/etc/group`.
    fn entry(&self, file: &str, name: &str) -> Option<Vec<String>> {
        std::fs::read_to_string(self.path(file))
            .unwrap()
            .lines()
            .map(|line| line.split(':').map(str::to_owned).collect::<Vec<_>>())
            .find(|fields| fields[0] == name)
    }

    fn members(&self, group: &str) -> Vec<String> {
        let entry = self.entry("etc/group", group).expect("the group");
        entry[3].split(',').map(str::to_owned).collect()
    }

    /// The agent as its unit runs it: the installed binary, settings and state directory.
    fn agent(&self) -> Installed {
        let path = |p: &str| self.path(p).display().to_string();
        Installed {
            bin: self.path("usr/bin/edge-agent"),
            config: self.path(SETTINGS),
            data_dir: self.path(STATE),
            env: vec![
                ("AGENT_AUTH__TOKEN_FILE".into(), path(TOKEN)),
                ("AGENT_STORAGE__DIR".into(), path(STATE)),
            ],
        }
    }
}

fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_package_holds_the_agent_its_unit_and_its_settings_as_a_conffile_all_owned_by_root() {
    let deb = package();
    assert_eq!(field(deb, "Package"), "edge-agent");
    assert_eq!(field(deb, "Version"), env!("CARGO_PKG_VERSION"));
    let arch = field(deb, "Architecture");
    assert!(
        ["arm64", "armhf", host_arch().as_str()].contains(&arch.as_str()),
        "{arch}"
    );
    assert!(field(deb, "Installed-Size").parse::<u64>().unwrap() > 1000);

    // mode, owner, size, date, time, path
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(deb));
    let entries: Vec<Vec<&str>> = listing
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let mode_of = |path: &str| {
        entries
            .iter()
            .find(|e| e[5] == path)
            .map(|e| e[0])
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
    };
    assert_eq!(mode_of("./usr/bin/edge-agent"), "-rwxr-xr-x");
    for file in [
        "./lib/systemd/system/edge-agent.service",
        "./etc/edge-agent/agent.toml",
        "./usr/share/doc/edge-agent/agent.example.toml",
        "./usr/share/doc/edge-agent/edge-agent.md",
        "./usr/share/doc/edge-agent/copyright",
    ] {
        assert_eq!(mode_of(file), "-rw-r--r--", "{file}");
    }
    assert_eq!(mode_of("./"), "drwxr-xr-x");
    assert!(
        entries.iter().all(|e| e[1] == "root/root"),
        "all owned by root:\n{listing}"
    );
    assert!(
        !listing.contains("./etc/edge-agent/token"),
        "a token is the operator's, never the package's"
    );

    let control = |member: &str| run(Command::new("dpkg-deb").arg("--info").arg(deb).arg(member));
    assert_eq!(control("conffiles").trim(), "/etc/edge-agent/agent.toml");
    for script in ["postinst", "prerm", "postrm"] {
        let text = control(script);
        assert!(text.starts_with("#!/bin/sh\n"), "{script}");
        run(Command::new("sh").args(["-n", "-c", &text]));
    }
}

#[test]
fn installing_creates_a_system_user_in_the_sensor_groups_and_enables_the_hardened_unit() {
    let root = Root::new();
    root.install(package());
    assert_eq!(
        root.status(),
        format!("installed {}", env!("CARGO_PKG_VERSION"))
    );

    let user = root.entry("etc/passwd", "edge-agent").expect("the user");
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid < 1000, "a system user: {user:?}");
    assert_eq!(&user[5..], ["/var/lib/edge-agent", "/usr/sbin/nologin"]);
    assert!(root.members("i2c").contains(&"edge-agent".to_owned()));
    assert!(root.members("gpio").contains(&"edge-agent".to_owned()));
    assert!(
        !root.members("spi").contains(&"edge-agent".to_owned()),
        "the unit allows no SPI device, so the user gets no SPI group"
    );
    assert!(root.entry("etc/shadow", "edge-agent").is_some());

    assert_eq!(
        std::fs::read_link(root.path(ENABLED)).expect("enabled"),
        Path::new("/").join(UNIT)
    );
    let unit = std::fs::read_to_string(root.path(UNIT)).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let bin = exec.split_whitespace().next().unwrap();
    assert_eq!(mode(&root.path(bin.trim_start_matches('/'))), 0o755);
    // The settings may hold a token: the service's group reads them, nobody else.
    assert_eq!(root.gid(SETTINGS), user[3]);
    assert_eq!(mode(&root.path(SETTINGS)), 0o640);
    // systemd's own reading of the unit: every key known, and its exposure score (0 is
    // locked down, 10 is none) at most 2.0.
    let security = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(format!("--root={}", root.dir.path().display()))
            .arg("edge-agent.service"),
    );
    let stdout = String::from_utf8_lossy(&security.stdout);
    let stderr = String::from_utf8_lossy(&security.stderr);
    assert!(
        security.status.success() && stderr.trim().is_empty(),
        "{stdout}\n{stderr}"
    );

    // The settings as shipped are valid: the installed agent reads them.
    let hub = Hub::start();
    std::fs::write(root.path(TOKEN), hub.token(DEVICE, "agent", "1h")).unwrap();
    let agent = root.agent();
    let checked = run(agent_command(Some(&agent.bin))
        .arg("--config")
        .arg(&agent.config)
        .arg("--check-config")
        .envs(agent.env.iter().map(|(k, v)| (k, v))));
    assert!(
        checked.contains("url = \"wss://telemetry.example.com/ws\""),
        "{checked}"
    );
}

#[test]
fn a_group_of_the_name_left_behind_becomes_the_users_group() {
    let root = Root::new();
    let groups = std::fs::read_to_string(root.path("etc/group")).unwrap();
    std::fs::write(root.path("etc/group"), groups + "edge-agent:x:990:\n").unwrap();
    let gshadow = std::fs::read_to_string(root.path("etc/gshadow")).unwrap();
    std::fs::write(root.path("etc/gshadow"), gshadow + "edge-agent:!::\n").unwrap();
    root.install(package());
    let user = root.entry("etc/passwd", "edge-agent").expect("the user");
    assert_eq!(user[3], "990");
    assert_eq!(
        root.status(),
        format!("installed {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_unit_left_by_a_manual_install_is_named_since_it_would_override_the_packages() {
    let root = Root::new();
    let manual = root.path("etc/systemd/system/edge-agent.service");
    std::fs::create_dir_all(manual.parent().unwrap()).unwrap();
    std::fs::write(&manual, "[Service]\nExecStart=/usr/local/bin/edge-agent\n").unwrap();
    let printed = root.install(package());
    assert!(
        printed.contains("/etc/systemd/system/edge-agent.service overrides the package's unit"),
        "{printed}"
    );
    let clean = Root::new();
    let printed = clean.install(package());
    assert!(!printed.contains("overrides"), "{printed}");
    assert!(
        !printed.contains("no group"),
        "Pi OS has both groups: {printed}"
    );
}

#[test]
fn removing_keeps_the_log_and_the_settings_and_purging_deletes_them() {
    let root = Root::new();
    root.install(package());
    std::fs::write(root.path(TOKEN), "token").unwrap();
    let log = root.path(STATE).join("segment-0000000000000001.log");
    std::fs::create_dir_all(root.path(STATE)).unwrap();
    std::fs::write(&log, b"unsent readings").unwrap();

    root.dpkg(&["--remove", "edge-agent"]);
    assert_eq!(
        root.status(),
        format!("config-files {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(!exists(&root.path("usr/bin/edge-agent")));
    assert!(!exists(&root.path(UNIT)));
    assert!(exists(&root.path(SETTINGS)) && exists(&root.path(TOKEN)) && exists(&log));
    let mask = root.path("etc/systemd/system/edge-agent.service");
    assert_eq!(
        std::fs::read_link(&mask).expect("masked"),
        Path::new("/dev/null")
    );

    // Installed again, it is enabled again and finds its log.
    root.install(package());
    assert!(!exists(&mask), "the removal's mask is lifted");
    assert!(exists(&root.path(ENABLED)) && exists(&log));

    root.dpkg(&["--purge", "edge-agent"]);
    assert_eq!(root.status(), "not-installed");
    assert!(!exists(&root.path("etc/edge-agent")), "settings and token");
    assert!(!exists(&root.path(STATE)), "the log");
    assert!(!exists(&root.path(ENABLED)) && !exists(&mask));
    assert!(
        root.entry("etc/passwd", "edge-agent").is_some(),
        "the user stays: files it owned may remain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_the_operators_settings_and_sends_the_readings_logged_before_it() {
    let root = Root::new();
    root.install(package());
    let mut hub = Hub::start();
    // The operator's settings: this hub, and a fast simulated source besides the built-in ones.
    let shipped = std::fs::read_to_string(root.path(SETTINGS)).unwrap();
    let settings = shipped.replace("wss://telemetry.example.com/ws", &hub.url())
        + "\n[[sensors]]\nkind = \"simulated\"\ninterval = \"20ms\"\n";
    assert_ne!(settings, shipped);
    std::fs::write(root.path(SETTINGS), &settings).unwrap();
    std::fs::write(root.path(TOKEN), hub.token(DEVICE, "agent", "1h")).unwrap();
    std::fs::set_permissions(root.path(TOKEN), std::fs::Permissions::from_mode(0o600)).unwrap();

    // The uplink is down: readings wait in the log, then the agent is stopped for the upgrade
    // (under qemu on a busy machine its start can take a while: wait for a backlog, bounded).
    hub.kill();
    let mut agent = Agent::start_installed(root.agent());
    let mut before = edge_agent::store::Stats::default();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        agent.stop();
        before = agent.log_stats();
        if before.pending_records >= 20 {
            break;
        }
        agent.spawn();
    }
    assert!(
        before.pending_records >= 20,
        "unsent readings: {before:?}\n{}",
        agent.output()
    );

    let later = format!("{}+upgrade", env!("CARGO_PKG_VERSION"));
    let scratch = tempfile::tempdir().unwrap();
    root.install(&later_version(package(), &later, scratch.path()));
    assert_eq!(root.status(), format!("installed {later}"));
    assert_eq!(
        std::fs::read_to_string(root.path(SETTINGS)).unwrap(),
        settings,
        "the operator's edits survive"
    );
    let group = root.entry("etc/group", "edge-agent").expect("the group");
    assert_eq!(root.gid(TOKEN), group[2], "the service can read it");
    assert_eq!(mode(&root.path(TOKEN)), 0o640);
    assert_eq!(agent.log_stats().pending_records, before.pending_records);

    // The upgraded agent sends what the old one logged, then goes on.
    hub.spawn();
    let dashboard = Dashboard::follow(&hub, &format!("devices.{DEVICE}"));
    agent.spawn();
    let stats = stop_drained(&mut agent);
    let taken = taken(&agent, &stats);
    let got = dashboard.readings(taken).await;
    assert!(stats.last_seq > before.last_seq, "the new agent reads too");
    assert_exactly_once(&got, taken);
}
