//! Local process figures from `/proc`: resident memory (`VmRSS`), CPU time of a process
//! (`utime + stime`), and the machine's busy CPU fraction (`/proc/stat`). Linux only; a
//! process that is gone reads as `None`.

use std::path::Path;

use serde::Serialize;

/// Clock ticks per second of `/proc/*/stat` (`USER_HZ`, 100 on every Linux we run on).
const USER_HZ: f64 = 100.0;

/// A process to sample, by role.
#[derive(Debug, Clone, Serialize)]
pub struct Pid {
    /// `gateway` or `worker`.
    pub role: String,
    /// OS pid.
    pub pid: u32,
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// CPU seconds (user + system) used by `pid` so far.
pub fn cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14, stime 15.
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// `(busy, total)` jiffies of all CPUs since boot.
pub fn machine_jiffies() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Busy fraction (0..1) of all CPUs between two [`machine_jiffies`] readings.
pub fn busy_between(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<f64> {
    let ((b0, t0), (b1, t1)) = (a?, b?);
    let dt = t1.checked_sub(t0)?;
    (dt > 0).then(|| (b1.saturating_sub(b0)) as f64 / dt as f64)
}

/// Pids of `gateway*.pid` and `worker*.pid` under `<deploy_dir>/pids` (as written by
/// `deploy/local/cluster.sh`).
pub fn pids_from_deploy_dir(dir: &Path) -> Vec<Pid> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("pids")) else {
        return out;
    };
    let mut names: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    names.sort();
    for path in names {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let role = if name.starts_with("gateway") {
            "gateway"
        } else if name.starts_with("worker") {
            "worker"
        } else {
            continue;
        };
        if let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            out.push(Pid {
                role: role.to_owned(),
                pid,
            });
        }
    }
    out
}

/// Sum of `VmRSS` (KiB) of the pids with `role`.
pub fn rss_sum(pids: &[Pid], role: &str) -> u64 {
    pids.iter()
        .filter(|p| p.role == role)
        .filter_map(|p| rss_kib(p.pid))
        .sum()
}

/// Sum of CPU seconds of the pids with `role`.
pub fn cpu_sum(pids: &[Pid], role: &str) -> f64 {
    pids.iter()
        .filter(|p| p.role == role)
        .filter_map(|p| cpu_s(p.pid))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_s(me).is_some());
        assert!(machine_jiffies().is_some());
        assert_eq!(rss_kib(u32::MAX), None);
    }
}
