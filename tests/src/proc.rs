//! Child processes for end-to-end tests: finding the workspace binaries, running them as RAII
//! guards with their output captured to a log file, signalling them, and waiting for readiness.
//!
//! - [`bin_path`] finds `gateway`, `worker`, `loadtest`, ... under the cargo target dir
//!   (`CARGO_TARGET_DIR` or `<workspace>/target`, profile dir `debug`, or the one named by
//!   `OH_TEST_PROFILE`, e.g. `release`). The binaries are not built here: run
//!   `cargo build --bins` first.
//! - [`Proc`] is a child process that is SIGKILLed on drop. Its stdout and stderr go to one log
//!   file, in a private temp dir, or in `OH_TEST_LOG_DIR` when that env var is set (then the
//!   logs are kept after the test).
//! - [`free_port`] picks a currently free loopback port (racy by nature: the caller must cope
//!   with a process failing to bind it).
//!
//! Deadlines are generous and readiness is polled, never assumed after a fixed sleep.

use std::{
    ffi::OsStr,
    fs::File,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tempfile::TempDir;
use tokio::{
    process::{Child, Command},
    time::Instant,
};

/// `SIGTERM` on this platform (graceful stop / drain).
pub const SIGTERM: i32 = rustix::process::Signal::TERM.as_raw();
/// `SIGKILL` on this platform.
pub const SIGKILL: i32 = rustix::process::Signal::KILL.as_raw();
/// `SIGINT` on this platform.
pub const SIGINT: i32 = rustix::process::Signal::INT.as_raw();
/// `SIGSTOP` on this platform (freeze a process, e.g. to simulate a hung worker).
pub const SIGSTOP: i32 = rustix::process::Signal::STOP.as_raw();
/// `SIGCONT` on this platform (resume after [`SIGSTOP`]).
pub const SIGCONT: i32 = rustix::process::Signal::CONT.as_raw();

/// At most this many bytes of a log are quoted in panic messages.
pub(crate) const LOG_TAIL: usize = 64 * 1024;

/// A loopback TCP port that was free a moment ago (bind `127.0.0.1:0`, read it, close it).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// The workspace root (the parent of the `tests` crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cargo target dir: `CARGO_TARGET_DIR` if set (a relative value is taken relative to the
/// workspace root), else `<workspace root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// The profile directory to look in: `debug`, unless `OH_TEST_PROFILE` names another one
/// (`release`, or a custom profile; `dev` means `debug`).
fn profile_dir() -> String {
    match std::env::var("OH_TEST_PROFILE") {
        Ok(p) if !p.is_empty() && p != "dev" => p,
        _ => "debug".to_owned(),
    }
}

/// Like [`bin_path`], but returns the explanation instead of panicking.
pub fn try_bin_path(name: &str) -> Result<PathBuf, String> {
    let dir = target_dir().join(profile_dir());
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "binary `{name}` not found at {}; build it first with `cargo build --bins`{} \
             (CARGO_TARGET_DIR and OH_TEST_PROFILE select where to look)",
            path.display(),
            if profile_dir() == "release" {
                " --release"
            } else {
                ""
            },
        ))
    }
}

/// Path of a workspace binary (`gateway`, `worker`, `loadtest`, ...). Panics with a clear message
/// when it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    try_bin_path(name).unwrap_or_else(|e| panic!("{e}"))
}

/// Finds a system binary on `PATH`, else at the first existing `fallbacks` path.
pub fn find_system_bin(name: &str, fallbacks: &[&str]) -> Result<PathBuf, String> {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    for fallback in fallbacks {
        let candidate = PathBuf::from(fallback);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "`{name}` not found on PATH nor at {fallbacks:?}; install it (Debian package `{name}`)"
    ))
}

/// Reads at most the last `max` bytes of a file, lossily decoded; a note if it can't be read.
pub(crate) fn read_tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            let mut s = String::from_utf8_lossy(&bytes[start..]).into_owned();
            if start > 0 {
                s.insert_str(0, &format!("[... {start} bytes cut ...]\n"));
            }
            s
        }
        Err(e) => format!("[cannot read log {}: {e}]", path.display()),
    }
}

/// Opens `path` for appending and returns two handles for a child's stdout and stderr.
pub(crate) fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let file = File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log file {}: {e}", path.display()));
    let err = file
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot clone log file handle {}: {e}", path.display()));
    (Stdio::from(file), Stdio::from(err))
}

/// Appends a marker line to a log file (best effort).
pub(crate) fn log_marker(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = File::options().create(true).append(true).open(path) {
        let _ = writeln!(f, "=== oh-tests: {line} ===");
    }
}

/// SIGKILLs a child and waits for it (no-op if it has already exited).
pub(crate) async fn kill_and_wait(child: &mut Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Sends SIGKILL and reaps synchronously for at most `wait`, for use in `Drop` so that a temp dir
/// is not removed while the process still writes into it.
pub(crate) fn kill_in_drop(child: &mut Child, wait: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = child.start_kill();
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            _ => return,
        }
    }
}

/// Sends signal `sig` to process `pid`.
pub fn send_signal(pid: u32, sig: i32) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| bad("invalid pid"))?;
    let sig = rustix::process::Signal::from_named_raw(sig).ok_or_else(|| bad("unknown signal"))?;
    rustix::process::kill_process(pid, sig)?;
    Ok(())
}

/// Polls `GET url` until it answers 200, for at most `timeout`.
pub async fn wait_http_ok(url: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    crate::ensure_tls_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| format!("reqwest client: {e}"))?;
    loop {
        let last = match client.get(url).send().await {
            Ok(resp) if resp.status() == reqwest::StatusCode::OK => return Ok(()),
            Ok(resp) => format!("status {}", resp.status()),
            Err(e) => format!("error: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "GET {url} did not answer 200 within {timeout:?}; last: {last}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

static LOG_SEQ: AtomicU64 = AtomicU64::new(0);

/// A child process that is SIGKILLed when dropped; stdout and stderr go to one log file.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
    _dir: Option<TempDir>,
}

impl Proc {
    /// Starts `bin` with `args` and extra `envs` (added to the inherited environment;
    /// `RUST_BACKTRACE=1` unless given). Must be called inside a tokio runtime. Panics if the
    /// process can't be started.
    pub fn spawn(name: &str, bin: &Path, args: &[&str], envs: &[(&str, String)]) -> Proc {
        let seq = LOG_SEQ.fetch_add(1, Ordering::Relaxed);
        let file_name = format!("{name}-{}-{seq}.log", std::process::id());
        let (dir, log_path) = match std::env::var_os("OH_TEST_LOG_DIR") {
            Some(d) if !d.is_empty() => {
                let d = PathBuf::from(d);
                std::fs::create_dir_all(&d)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
                (None, d.join(file_name))
            }
            _ => {
                let tmp = tempfile::Builder::new()
                    .prefix(&format!("oh-{name}-"))
                    .tempdir()
                    .expect("create temp dir for a process log");
                let path = tmp.path().join(file_name);
                (Some(tmp), path)
            }
        };
        log_marker(
            &log_path,
            &format!("starting {name}: {} {}", bin.display(), args.join(" ")),
        );
        let (out, err) = log_stdio(&log_path);
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        if !envs.iter().any(|(k, _)| *k == "RUST_BACKTRACE") {
            cmd.env("RUST_BACKTRACE", "1");
        }
        for (k, v) in envs {
            cmd.env(k, OsStr::new(v));
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", bin.display()));
        Proc {
            name: name.to_owned(),
            child,
            log_path,
            _dir: dir,
        }
    }

    /// The name given to [`Proc::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS pid, or `None` once the exit has been collected.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resident memory of the process (`VmRSS`, KiB), `None` once it is gone.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// SIGKILLs the process and waits until it is gone.
    pub async fn kill9(&mut self) {
        kill_and_wait(&mut self.child).await;
    }

    /// Sends signal `sig` (e.g. [`SIGTERM`], [`SIGSTOP`], [`SIGCONT`]). Fails if the process
    /// has already been reaped.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        let pid = self.pid().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} has already exited", self.name),
            )
        })?;
        send_signal(pid, sig)
    }

    /// Waits at most `timeout` for the process to exit; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// `Some(status)` if the process has exited, without waiting.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The whole log (stdout and stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("[cannot read log {}: {e}]", self.log_path.display()))
    }

    /// The last `max_bytes` of the log, for failure messages.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        read_tail(&self.log_path, max_bytes)
    }

    /// Where the log is written.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Polls `GET url` until 200 within `timeout`. Panics with the process log if it does not
    /// come, or at once if the process exits meanwhile.
    pub async fn wait_http_ok(&mut self, url: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                panic!(
                    "{} exited ({status}) while waiting for {url}; log:\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL)
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let step = left.min(Duration::from_secs(1));
            if wait_http_ok(url, step).await.is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: GET {url} did not answer 200 within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_tail(LOG_TAIL)
                );
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        kill_in_drop(&mut self.child, Duration::from_secs(2));
    }
}
