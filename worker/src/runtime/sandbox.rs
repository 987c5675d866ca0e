//! The sandbox every session's shell runs in: bubblewrap (`bwrap`, Debian's `bubblewrap`).
//!
//! **Why bubblewrap.** It is the small, audited setuid-free tool Flatpak uses to build exactly
//! this (namespaces, bind mounts, a PID-1 reaper, `--die-with-parent`), it is one Debian
//! package, and it costs a few milliseconds per start. Doing the same with raw syscalls needs
//! `unsafe` code between `fork` and `exec`, which this workspace forbids; a container runtime
//! (podman, Docker) would add a daemon or hundreds of milliseconds per session.
//!
//! **What the agent gets.** New user, mount, PID, network, IPC, UTS and cgroup namespaces
//! (`--unshare-all`), no further user namespaces inside (`--disable-userns`). A root file
//! system that is read-only: `/usr` and `/etc` bound read-only, `/bin`, `/sbin`, `/lib*` as on
//! the host, a fresh `/proc` (only the sandbox's processes) and a minimal `/dev`, its own `/tmp`
//! (tmpfs, at most the memory limit). Writable: only the session's workspace, seen as
//! [`WORKSPACE`], and `/tmp`. The shell's control files (command file, stdin FIFO) are bound
//! read-only at [`CONTROL`]. No network interface but its own loopback, so NATS, Redis, the
//! worker's metrics and every other service of the host are out of reach. With
//! `OH_SANDBOX_NETWORK=egress` (not the default: egress can carry a workspace away) the
//! sandbox reaches the outside world only through the worker's HTTP proxy and its destination
//! policy (see [`egress`](super::egress)); `none` (the default) gives it no way out at all. The environment is the runtime's clean list (no worker
//! variable, no secret). The shell is the leader of a new session (`--new-session`: no
//! terminal to inject into).
//!
//! **Who it runs as.** A worker running as root drops to `OH_SANDBOX_UID`/`OH_SANDBOX_GID`
//! (default 65534, `nobody`) through `setpriv` before `bwrap` starts, so the agent's processes
//! are an unprivileged user on the host too: a file the host keeps from that user (mode 0600 of
//! root, `/etc/shadow`) stays closed even through the read-only binds. The workspace and the
//! control files are owned by that user; the workspace root is `0711` (enter, not list). A
//! worker that is not root runs `bwrap` as itself in an unprivileged user namespace.
//!
//! **Limits.** A control group per shell (see [`cgroup`](super::cgroup)): memory, pids and
//! CPU. The launcher joins the group before it execs the sandbox. Without a writable cgroup
//! hierarchy: `prlimit` rlimits (address space and processes; weaker: the process count is per
//! user), and the startup log says so.
//!
//! **Lifetime.** Killing the sandbox's PID 1 (bwrap's reaper) makes the kernel kill every
//! process of its PID namespace, so a `setsid` or double-forked daemon cannot outlive the
//! shell; the shell's process tree (outer bwrap, reaper, bash, everything else) is what the
//! runtime signals. `--die-with-parent` kills the sandbox when the worker dies, even by
//! SIGKILL (it is tied to the worker's thread that spawned it: tokio's runtime threads live as
//! long as the runtime; the worker uses no `block_in_place`).
//!
//! **Startup.** [`Sandbox::new`] probes the whole thing once (`/bin/true` in a sandbox with a
//! scratch workspace): a machine that cannot sandbox makes the worker refuse to start, unless
//! `OH_SANDBOX=off` (logged at error level) says agent code may run unsandboxed.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::process::Command;

use super::cgroup::{Cgroup, Hierarchy, Limits};
use super::egress::EgressPolicy;

/// Where the session's workspace appears inside the sandbox.
pub(crate) const WORKSPACE: &str = "/workspace";
/// Where the shell's control files appear inside the sandbox.
pub(crate) const CONTROL: &str = "/run/oh";
/// PATH inside the sandbox (the worker's own PATH may name folders the sandbox does not have).
pub(crate) const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the egress forwarder appears inside the sandbox.
pub(crate) const NET_HELPER: &str = "/run/oh-bin/net";
/// The egress proxy's socket, in the control folder.
pub(crate) const PROXY_SOCKET: &str = "proxy.sock";
/// How long the startup probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Sandbox settings (from the worker's flags).
#[derive(Debug, Clone)]
pub(crate) struct SandboxConfig {
    /// The `bwrap` binary (`None`: found on PATH or in `/usr/bin`).
    pub(crate) bwrap: Option<PathBuf>,
    /// User and group the agent runs as when the worker is root.
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) limits: Limits,
    /// `None`: no network. `Some`: egress through the worker's proxy with this policy.
    pub(crate) egress: Option<EgressConfig>,
}

/// Settings of `OH_SANDBOX_NETWORK=egress`.
#[derive(Debug, Clone)]
pub(crate) struct EgressConfig {
    pub(crate) policy: EgressPolicy,
    /// The `oh-sandbox-net` forwarder (`None`: next to the worker's own binary).
    pub(crate) helper: Option<PathBuf>,
}

/// Why the machine cannot sandbox.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SandboxError {
    #[error("bubblewrap (bwrap) not found: install Debian's bubblewrap package")]
    NoBwrap,
    #[error("{0} (OH_SANDBOX_BWRAP) is not a file")]
    NotFound(PathBuf),
    #[error("the egress forwarder {0} (OH_SANDBOX_NET_HELPER) is not a file")]
    NoNetHelper(PathBuf),
    #[error("setpriv not found (util-linux): a root worker needs it to drop privileges")]
    NoSetpriv,
    #[error("the sandbox probe failed: {0}")]
    Probe(String),
}

/// How the limits are enforced.
#[derive(Debug)]
enum Enforcement {
    Cgroups(Hierarchy),
    /// `prlimit` binary; the reason cgroups are not used.
    Rlimits(PathBuf, String),
    /// Neither cgroups nor `prlimit`: only namespaces.
    None(String),
}

/// A way to start sandboxed shells (one per worker; see the module docs).
#[derive(Debug)]
pub(crate) struct Sandbox {
    bwrap: PathBuf,
    /// `setpriv` and the ids to drop to, when the worker is root.
    drop_to: Option<(PathBuf, u32, u32)>,
    limits: Limits,
    enforcement: Enforcement,
    /// `--ro-bind`/`--symlink` arguments for the system folders.
    system: Vec<OsString>,
    /// Numbers the control groups of this worker.
    seq: AtomicU64,
    /// The forwarder binary and the policy, with `OH_SANDBOX_NETWORK=egress`.
    egress: Option<(PathBuf, std::sync::Arc<EgressPolicy>)>,
    /// A copy of the forwarder the sandbox user can reach (removed with the worker).
    _helper_copy: Option<tempfile::TempDir>,
}

/// A prepared sandboxed shell: the command to spawn, and its control group (removed when the
/// shell is gone).
#[derive(Debug)]
pub(crate) struct Launch {
    pub(crate) command: Command,
    pub(crate) cgroup: Option<Cgroup>,
}

impl Sandbox {
    /// Finds the tools, sets up the control-group hierarchy and probes a sandbox once.
    ///
    /// # Errors
    /// [`SandboxError`] when this machine cannot run sandboxes.
    pub(crate) async fn new(cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        let bwrap = match &cfg.bwrap {
            Some(p) if p.is_file() => p.clone(),
            Some(p) => return Err(SandboxError::NotFound(p.clone())),
            None => find_bin("bwrap").ok_or(SandboxError::NoBwrap)?,
        };
        let drop_to = if rustix::process::geteuid().is_root() {
            let setpriv = find_bin("setpriv").ok_or(SandboxError::NoSetpriv)?;
            Some((setpriv, cfg.uid, cfg.gid))
        } else {
            None
        };
        let enforcement = match Hierarchy::setup() {
            Ok(h) => Enforcement::Cgroups(h),
            Err(why) => match find_bin("prlimit") {
                Some(p) => Enforcement::Rlimits(p, why),
                None => Enforcement::None(why),
            },
        };
        let mut helper_copy = None;
        let egress = match &cfg.egress {
            None => None,
            Some(e) => {
                let helper = match &e.helper {
                    Some(p) => p.clone(),
                    None => std::env::current_exe()
                        .map_err(|err| SandboxError::Probe(err.to_string()))?
                        .with_file_name("oh-sandbox-net"),
                };
                if !helper.is_file() {
                    return Err(SandboxError::NoNetHelper(helper));
                }
                // bwrap runs as the sandbox user, who may not be able to enter the folders
                // of the worker's own binary (a 0700 checkout): it gets a copy it can read.
                let err = |e: std::io::Error| SandboxError::Probe(format!("forwarder copy: {e}"));
                let dir = tempfile::Builder::new()
                    .prefix("oh-sandbox-bin-")
                    .tempdir()
                    .map_err(err)?;
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                    .map_err(err)?;
                let copy = dir.path().join("oh-sandbox-net");
                std::fs::copy(&helper, &copy).map_err(err)?;
                std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
                    .map_err(err)?;
                helper_copy = Some(dir);
                Some((copy, std::sync::Arc::new(e.policy.clone())))
            }
        };
        let sandbox = Sandbox {
            bwrap,
            drop_to,
            limits: cfg.limits,
            enforcement,
            system: system_mounts(Path::new("/")),
            seq: AtomicU64::new(0),
            egress,
            _helper_copy: helper_copy,
        };
        sandbox.probe().await?;
        Ok(sandbox)
    }

    /// One line for the startup log: what isolates and what limits.
    pub(crate) fn describe(&self) -> String {
        let user = match &self.drop_to {
            Some((_, uid, gid)) => format!("uid {uid} gid {gid}"),
            None => "the worker's uid in a user namespace".to_owned(),
        };
        let limits = match &self.enforcement {
            Enforcement::Cgroups(h) => format!("cgroup {} limits", h.version()),
            Enforcement::Rlimits(_, why) => format!("rlimits only ({why})"),
            Enforcement::None(why) => format!("no resource limits ({why}; no prlimit)"),
        };
        let net = match &self.egress {
            None => "no network",
            Some(_) => "egress through the worker's proxy",
        };
        format!(
            "bubblewrap, all namespaces, {net}, as {user}, {limits}: memory {} MiB, {} pids, {} CPUs",
            self.limits.memory_bytes >> 20,
            self.limits.pids,
            self.limits.cpus
        )
    }

    /// The egress policy, when sandboxes reach the outside world through the proxy.
    pub(crate) fn egress(&self) -> Option<&std::sync::Arc<EgressPolicy>> {
        self.egress.as_ref().map(|(_, p)| p)
    }

    /// What one sandbox may use.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// The user the sandbox's files must belong to (`None`: the worker's own).
    pub(crate) fn owner(&self) -> Option<(u32, u32)> {
        self.drop_to.as_ref().map(|(_, uid, gid)| (*uid, *gid))
    }

    /// Prepares the workspace root for this sandbox: with a dropped uid the sandbox user must
    /// be able to enter it (`0711`: enter, not list).
    pub(crate) fn workspace_root_mode(&self) -> u32 {
        if self.drop_to.is_some() { 0o711 } else { 0o700 }
    }

    /// The command that starts `program args` in a sandbox over `workspace` (host path), with
    /// the control folder `ctl` and exactly `env`; `name` names its control group.
    ///
    /// # Errors
    /// The control group could not be made.
    pub(crate) fn launch(
        &self,
        name: &str,
        workspace: &Path,
        ctl: &Path,
        env: &[(&str, OsString)],
        program: &[&str],
    ) -> std::io::Result<Launch> {
        // SIGINT at its default for everything below, so bash can trap C-c.
        let mut argv: Vec<OsString> = super::shell::default_sigint()
            .iter()
            .map(OsString::from)
            .collect();
        let mut cgroup = None;
        match &self.enforcement {
            Enforcement::Cgroups(h) => {
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                let group = h.create(&format!("{name}-{n}"), &self.limits)?;
                // The launcher joins the group, then execs the rest: nothing runs outside.
                argv.extend(["/bin/sh", "-c", JOIN_SCRIPT, "oh-join"].map(OsString::from));
                argv.extend(group.procs_files().into_iter().map(PathBuf::into_os_string));
                argv.push("--".into());
                cgroup = Some(group);
            }
            Enforcement::Rlimits(prlimit, _) => {
                argv.push(prlimit.clone().into_os_string());
                argv.push(format!("--as={}", self.limits.memory_bytes).into());
                argv.push(format!("--nproc={}", self.limits.pids).into());
                argv.push("--".into());
            }
            Enforcement::None(_) => {}
        }
        if let Some((setpriv, uid, gid)) = &self.drop_to {
            argv.push(setpriv.clone().into_os_string());
            argv.push(format!("--reuid={uid}").into());
            argv.push(format!("--regid={gid}").into());
            argv.extend(["--clear-groups", "--"].map(OsString::from));
        }
        argv.push(self.bwrap.clone().into_os_string());
        argv.extend(self.bwrap_args(workspace, ctl));
        argv.push("--".into());
        argv.extend(program.iter().map(OsString::from));
        let (first, rest) = argv.split_first().ok_or(std::io::ErrorKind::InvalidInput)?;
        let mut command = Command::new(first);
        command
            .args(rest)
            .current_dir("/")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)));
        Ok(Launch { command, cgroup })
    }

    /// bwrap's options (see the module docs).
    fn bwrap_args(&self, workspace: &Path, ctl: &Path) -> Vec<OsString> {
        let mut a: Vec<OsString> = [
            "--unshare-user",
            "--unshare-all",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--hostname",
            "sandbox",
        ]
        .map(OsString::from)
        .to_vec();
        a.extend(self.system.iter().cloned());
        a.extend(["--proc", "/proc", "--dev", "/dev", "--size"].map(OsString::from));
        a.push(self.limits.memory_bytes.to_string().into());
        a.extend(["--tmpfs", "/tmp", "--bind"].map(OsString::from));
        a.push(workspace.as_os_str().to_owned());
        a.push(WORKSPACE.into());
        a.push("--ro-bind".into());
        a.push(ctl.as_os_str().to_owned());
        a.push(CONTROL.into());
        if let Some((helper, _)) = &self.egress {
            a.push("--ro-bind".into());
            a.push(helper.as_os_str().to_owned());
            a.push(NET_HELPER.into());
        }
        a.extend(["--remount-ro", "/", "--chdir", WORKSPACE].map(OsString::from));
        a
    }

    /// Runs `/bin/true` in a sandbox over a scratch workspace.
    async fn probe(&self) -> Result<(), SandboxError> {
        let err = |e: &dyn std::fmt::Display| SandboxError::Probe(e.to_string());
        let scratch = tempfile::Builder::new()
            .prefix("oh-sandbox-probe-")
            .tempdir()
            .map_err(|e| err(&e))?;
        let ws = scratch.path().join("ws");
        let ctl = scratch.path().join("ctl");
        for d in [&ws, &ctl] {
            std::fs::create_dir(d).map_err(|e| err(&e))?;
            self.hand_over(d).map_err(|e| err(&e))?;
        }
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o711))
            .map_err(|e| err(&e))?;
        let env = [("PATH", OsString::from(PATH))];
        let mut launch = self
            .launch("probe", &ws, &ctl, &env, &["/bin/true"])
            .map_err(|e| err(&e))?;
        launch.command.kill_on_drop(true);
        let out = tokio::time::timeout(PROBE_TIMEOUT, launch.command.output())
            .await
            .map_err(|_| SandboxError::Probe(format!("no answer within {PROBE_TIMEOUT:?}")))?
            .map_err(|e| err(&e))?;
        if let Some(g) = &launch.cgroup {
            g.remove();
        }
        if !out.status.success() {
            return Err(SandboxError::Probe(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Runs `program` once in a sandbox over `workspace` (a host folder) and returns its
    /// output; killed after `timeout`.
    ///
    /// # Errors
    /// The sandbox could not start, or `timeout` passed.
    pub(crate) async fn run_once(
        &self,
        name: &str,
        workspace: &Path,
        program: &[&str],
        timeout: std::time::Duration,
    ) -> std::io::Result<std::process::Output> {
        let scratch = tempfile::Builder::new()
            .prefix("oh-sandbox-once-")
            .tempdir()?;
        let ctl = scratch.path().join("ctl");
        std::fs::create_dir(&ctl)?;
        self.hand_over(&ctl)?;
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o711))?;
        let env = [
            ("PATH", OsString::from(PATH)),
            ("HOME", OsString::from("/tmp")),
        ];
        let mut launch = self.launch(name, workspace, &ctl, &env, program)?;
        launch.command.kill_on_drop(true);
        let out = tokio::time::timeout(timeout, launch.command.output()).await;
        if let Some(g) = &launch.cgroup {
            g.remove();
        }
        out.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "sandboxed command timed out")
        })?
    }

    /// Gives `path` to the sandbox user (when the worker drops privileges), keeping its mode.
    ///
    /// # Errors
    /// `chown` failed.
    pub(crate) fn hand_over(&self, path: &Path) -> std::io::Result<()> {
        match self.owner() {
            Some((uid, gid)) => std::os::unix::fs::lchown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }
}

/// The launcher: writes its own pid into each `cgroup.procs` file given before `--`, then
/// execs the rest of its arguments.
const JOIN_SCRIPT: &str =
    r#"while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@""#;

/// `--ro-bind`/`--symlink` arguments that reproduce the host's system folders under `root`
/// (`/usr` and `/etc` bound read-only; `/bin`, `/sbin`, `/lib`, `/lib32`, `/lib64` as
/// symlinks where the host has symlinks (merged /usr), else bound read-only).
fn system_mounts(root: &Path) -> Vec<OsString> {
    let mut args = Vec::new();
    for name in [
        "usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32",
    ] {
        let host = root.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        let at = OsString::from(format!("/{name}"));
        if meta.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(&host) {
                args.push("--symlink".into());
                args.push(target.into_os_string());
                args.push(at);
            }
        } else if meta.is_dir() {
            args.push("--ro-bind".into());
            args.push(host.into_os_string());
            args.push(at);
        }
    }
    args
}

/// `name` on PATH, else in `/usr/bin` or `/bin`.
fn find_bin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_folders_are_bound_or_linked_as_on_the_host() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join("usr")).expect("usr");
        std::fs::create_dir(root.path().join("etc")).expect("etc");
        std::os::unix::fs::symlink("usr/bin", root.path().join("bin")).expect("bin");
        let args = system_mounts(root.path());
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let usr = root.path().join("usr").display().to_string();
        let etc = root.path().join("etc").display().to_string();
        assert_eq!(
            args,
            [
                "--ro-bind",
                usr.as_str(),
                "/usr",
                "--ro-bind",
                etc.as_str(),
                "/etc",
                "--symlink",
                "usr/bin",
                "/bin"
            ]
        );
    }
}
