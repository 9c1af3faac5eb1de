//! The generator against every server it compares: each peer (loadtest/peers/, installed by
//! `loadtest/peers/install.sh`) and the raw server, spread over worker processes, deliver every
//! publication to every viewer, gapless. A short run of each; the figures are compare.sh's job.

use std::process::Command;

/// Runs `fanout` with `args`, small and short; its JSON line.
fn fanout(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args([
            "--viewers",
            "20",
            "--rate",
            "20",
            "--seconds",
            "1",
            "--settle",
            "0",
        ])
        .args(args)
        .output()
        .expect("run fanout");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fanout {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line from fanout {args:?}:\n{stdout}"));
    serde_json::from_str(line).unwrap()
}

fn assert_every_publication_reached_every_viewer(run: &serde_json::Value) {
    let target = &run["target"];
    assert_eq!(run["connected"], 20, "{target}: {run}");
    assert!(run["published"].as_u64().unwrap() > 0, "{target}: {run}");
    assert_eq!(run["delivered"], run["expected"], "{target}: {run}");
    assert_eq!(run["gaps"], 0, "{target}: {run}");
    assert_eq!(run["duplicates"], 0, "{target}: {run}");
    assert_eq!(run["acked"], run["published"], "{target}: {run}");
}

#[test]
fn node_ws_delivers_every_publication_in_order() {
    assert_every_publication_reached_every_viewer(&fanout(&["--target", "node-ws"]));
}

#[test]
fn python_websockets_delivers_every_publication_in_order() {
    assert_every_publication_reached_every_viewer(&fanout(&["--target", "python-websockets"]));
}

#[test]
fn socketio_on_redis_delivers_every_publication_in_order() {
    assert_every_publication_reached_every_viewer(&fanout(&["--target", "socketio"]));
}

/// Two CPUs this process may run on (the same one twice on a machine with one).
fn two_cpus() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let mut cpus = list.split(',').flat_map(|range| {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()
    });
    let first = cpus.next().unwrap();
    let second = cpus.next().unwrap_or(first);
    format!("{first},{second}")
}

#[test]
fn viewers_spread_over_worker_processes_are_counted_whole() {
    let cpus = two_cpus();
    let run = fanout(&["--target", "raw", "--generator-cpus", &cpus]);
    let target = &run["target"];
    assert_eq!(run["connected"], 20, "{target}: {run}");
    assert_eq!(run["delivered"], run["expected"], "{run}");
    assert_eq!(run["gaps"], 0, "{run}");
    assert_eq!(run["generator_cpus"].as_array().unwrap().len(), 2, "{run}");
}
