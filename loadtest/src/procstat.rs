//! CPU time and resident memory of a process, read from `/proc/<pid>`.

use std::time::Duration;

/// User plus system CPU time the process has used so far.
pub fn cpu_time(pid: u32) -> std::io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let total = ticks(11) + ticks(12);
    Ok(Duration::from_millis(total * 1000 / clock_ticks()))
}

/// Resident set size in bytes.
pub fn rss_bytes(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(kib * 1024)
}

fn clock_ticks() -> u64 {
    getconf("CLK_TCK").unwrap_or(100)
}

/// A system value from `getconf`.
fn getconf(name: &str) -> Option<u64> {
    let out = std::process::Command::new("getconf")
        .arg(name)
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// Kernel memory of the whole machine that sockets use, in bytes: the slab caches (where each
/// socket's `tcp_sock`, inode and file live; `Slab:` of `/proc/meminfo`) plus the pages charged
/// to TCP buffers (`mem` of the `TCP:` line of `/proc/net/sockstat`). Not in any process's RSS.
/// Machine-wide, so a delta over a run with nothing else starting is what the run's sockets took.
pub fn kernel_socket_bytes() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let slab_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    let sockstat = std::fs::read_to_string("/proc/net/sockstat")?;
    let tcp_pages = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let at = fields.iter().position(|f| *f == "mem")?;
            fields.get(at + 1)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    Ok(slab_kib * 1024 + tcp_pages * page_size())
}

fn page_size() -> u64 {
    getconf("PAGESIZE").unwrap_or(4096)
}
