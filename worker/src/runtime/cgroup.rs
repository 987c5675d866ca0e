//! Resource limits of one sandbox as a control group (Linux cgroups, v2 or v1).
//!
//! A worker makes one parent group, `oh-sandbox-<pid>-<n>`, beside itself in each hierarchy it
//! may write (its own cgroup path from `/proc/self/cgroup`, under the mount points from
//! `/proc/self/mounts`), and one child group per sandboxed shell in it. The child's limits are
//! `memory` (the OOM killer acts inside the group only), `pids` (a fork bomb gets `EAGAIN`)
//! and `cpu` (a quota per period). A process joins the group *before* it execs the sandbox
//! (the launcher writes its own pid into `cgroup.procs`), so nothing of the sandbox ever runs
//! outside it.
//!
//! - **v2** (a `cgroup2` mount whose `cgroup.controllers` has `memory` and `pids`): the parent
//!   group enables the controllers for its children. If the worker's own group holds
//!   processes, the kernel refuses that ("no internal processes"); the worker then moves
//!   itself into a leaf `oh-worker` first, as container init systems do.
//! - **v1** (one mount per controller, as on this project's CI machines): a parent and a child
//!   group in each of the `memory`, `pids` and `cpu` hierarchies.
//!
//! Parent groups of workers that are gone (their pid no longer runs) are removed at startup;
//! a child is removed when its shell is gone ([`Cgroup::remove`]). Nothing here is required
//! for isolation (namespaces do that): without a writable hierarchy the sandbox falls back to
//! rlimits, and the startup log says which applies.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// What one sandbox may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limits {
    /// Memory (resident, page cache and the sandbox's tmpfs) in bytes.
    pub(crate) memory_bytes: u64,
    /// Processes and threads.
    pub(crate) pids: u32,
    /// CPU time as a number of cores (e.g. 1.0).
    pub(crate) cpus: f64,
}

/// Period of the CPU quota, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The hierarchies a worker may make sandbox groups in.
#[derive(Debug, Clone)]
pub(crate) enum Hierarchy {
    /// cgroup v2: the worker's parent group.
    V2(PathBuf),
    /// cgroup v1: the parent group in the `memory`, `pids` and `cpu` hierarchies.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
}

impl Hierarchy {
    /// Finds a writable hierarchy and makes this worker's parent group in it (removing those
    /// of workers that are gone). `None` with the reason when there is none.
    pub(crate) fn setup() -> Result<Hierarchy, String> {
        let mounts = fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        // One parent per `Sandbox` (a worker has one; tests make several in one process).
        static INSTANCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let parent_name = format!("oh-sandbox-{}-{n}", std::process::id());
        if let Some(v2) = v2_mount(&mounts) {
            let own_path = own_path(&own, "").unwrap_or_default();
            let own_dir = join_rel(&v2, &own_path);
            let controllers = fs::read_to_string(own_dir.join("cgroup.controllers"))
                .or_else(|_| fs::read_to_string(v2.join("cgroup.controllers")))
                .unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") {
                return setup_v2(&own_dir, &parent_name).map_err(|e| format!("cgroup v2: {e}"));
            }
        }
        let v1 = |controller: &str| -> Result<PathBuf, String> {
            let mount = v1_mount(&mounts, controller)
                .ok_or_else(|| format!("no cgroup hierarchy with the {controller} controller"))?;
            let own_path = own_path(&own, controller).unwrap_or_default();
            let own_dir = join_rel(&mount, &own_path);
            sweep_gone(&own_dir);
            let parent = own_dir.join(&parent_name);
            fs::create_dir_all(&parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            Ok(parent)
        };
        Ok(Hierarchy::V1 {
            memory: v1("memory")?,
            pids: v1("pids")?,
            cpu: v1("cpu")?,
        })
    }

    /// `v2` or `v1`, for the startup log.
    pub(crate) fn version(&self) -> &'static str {
        match self {
            Hierarchy::V2(_) => "v2",
            Hierarchy::V1 { .. } => "v1",
        }
    }

    /// Makes the group `name` with `limits`.
    ///
    /// # Errors
    /// A directory or limit file could not be written.
    pub(crate) fn create(&self, name: &str, limits: &Limits) -> io::Result<Cgroup> {
        let quota = cpu_quota_us(limits.cpus);
        let group = match self {
            Hierarchy::V2(parent) => {
                let dir = parent.join(name);
                let group = Cgroup {
                    dirs: vec![dir.clone()],
                };
                fs::create_dir(&dir)?;
                let result = (|| -> io::Result<()> {
                    fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
                    // Best effort: not every kernel has swap accounting.
                    let _ = fs::write(dir.join("memory.swap.max"), "0");
                    fs::write(dir.join("pids.max"), limits.pids.to_string())?;
                    if dir.join("cpu.max").exists() {
                        fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
                    }
                    Ok(())
                })();
                result.map(|()| group)?
            }
            Hierarchy::V1 { memory, pids, cpu } => {
                let group = Cgroup {
                    dirs: vec![memory.join(name), pids.join(name), cpu.join(name)],
                };
                for dir in &group.dirs {
                    fs::create_dir(dir)?;
                }
                let [m, p, c] = [&group.dirs[0], &group.dirs[1], &group.dirs[2]];
                fs::write(
                    m.join("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                )?;
                fs::write(p.join("pids.max"), limits.pids.to_string())?;
                fs::write(c.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                fs::write(c.join("cpu.cfs_quota_us"), quota.to_string())?;
                group
            }
        };
        Ok(group)
    }
}

/// One sandbox's group (a directory per hierarchy).
#[derive(Debug)]
pub(crate) struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// The `cgroup.procs` files a process writes its pid to, to join the group.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Whether a process is still in the group.
    pub(crate) fn is_populated(&self) -> bool {
        self.dirs
            .iter()
            .any(|d| fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty()))
    }

    /// Removes the group's directories; `false` if some remain (a process is still in it).
    pub(crate) fn remove(&self) -> bool {
        let mut all = true;
        for dir in &self.dirs {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => all = false,
            }
        }
        all
    }

    /// The memory limit's OOM kills so far (v2 `memory.events`, v1 `memory.oom_control`).
    pub(crate) fn oom_kills(&self) -> u64 {
        let Some(dir) = self.dirs.first() else {
            return 0;
        };
        let text = fs::read_to_string(dir.join("memory.events"))
            .or_else(|_| fs::read_to_string(dir.join("memory.oom_control")))
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == "oom_kill")
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

fn cpu_quota_us(cpus: f64) -> u64 {
    // Clamped to what the kernel accepts (at least 1 ms per period).
    let q = (cpus * CPU_PERIOD_US as f64).round();
    if q.is_finite() && q >= 1_000.0 {
        q as u64
    } else {
        1_000
    }
}

fn setup_v2(own_dir: &Path, parent_name: &str) -> io::Result<Hierarchy> {
    sweep_gone(own_dir);
    let parent = own_dir.join(parent_name);
    fs::create_dir_all(&parent)?;
    let enable = |dir: &Path| fs::write(dir.join("cgroup.subtree_control"), "+memory +pids +cpu");
    if enable(own_dir).is_err() {
        // "No internal processes": move ourselves into a leaf, then delegate.
        let leaf = own_dir.join("oh-worker");
        fs::create_dir_all(&leaf)?;
        fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())?;
        enable(own_dir)?;
    }
    enable(&parent)?;
    Ok(Hierarchy::V2(parent))
}

/// Removes `oh-sandbox-<pid>-<n>` groups under `dir` whose worker is gone, with their empty
/// children (a group that still holds a process stays).
fn sweep_gone(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("oh-sandbox-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let parent = entry.path();
        if let Ok(children) = fs::read_dir(&parent) {
            for child in children.flatten() {
                if child.path().is_dir() {
                    let _ = fs::remove_dir(child.path()); // busy: a process still runs there
                }
            }
        }
        let _ = fs::remove_dir(&parent);
    }
}

/// The mount point of the cgroup2 hierarchy, if any.
fn v2_mount(mounts: &str) -> Option<PathBuf> {
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
}

/// The mount point of the v1 hierarchy with `controller`.
fn v1_mount(mounts: &str, controller: &str) -> Option<PathBuf> {
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| {
            f.get(2) == Some(&"cgroup")
                && f.get(3)
                    .is_some_and(|o| o.split(',').any(|x| x == controller))
        })
        .and_then(|f| f.get(1).map(PathBuf::from))
}

/// This process's path in the hierarchy with `controller` (`""`: the v2 line `0::path`).
fn own_path(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        matches.then(|| path.to_owned())
    })
}

fn join_rel(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
        cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
        cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0\n\
        cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
        cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n\
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
    const CGROUP: &str = "8:pids:/\n4:memory:/process_api/5a9f\n1:cpu:/\n0::/\n";

    #[test]
    fn mounts_and_own_paths_are_parsed() {
        assert_eq!(
            v1_mount(MOUNTS, "cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu"))
        );
        assert_eq!(
            v1_mount(MOUNTS, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(v1_mount(MOUNTS, "freezer"), None);
        assert_eq!(
            v2_mount(MOUNTS),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            own_path(CGROUP, "memory").as_deref(),
            Some("/process_api/5a9f")
        );
        assert_eq!(own_path(CGROUP, "pids").as_deref(), Some("/"));
        assert_eq!(own_path(CGROUP, "").as_deref(), Some("/"));
        assert_eq!(
            join_rel(Path::new("/sys/fs/cgroup/memory"), "/process_api/5a9f"),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/5a9f")
        );
    }

    #[test]
    fn cpu_quota_is_clamped() {
        assert_eq!(cpu_quota_us(1.0), 100_000);
        assert_eq!(cpu_quota_us(0.5), 50_000);
        assert_eq!(cpu_quota_us(0.0), 1_000);
        assert_eq!(cpu_quota_us(f64::NAN), 1_000);
    }
}
