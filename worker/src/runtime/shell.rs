//! One bash process and the protocol to drive it.
//!
//! bash runs non-interactively (`--noprofile --norc`), as the leader of its own session and
//! process group (through `setsid` when available, else its own process group), with stdout
//! and stderr merged into one pipe that we read. Its stdin is the *command channel*: we write
//! short scripts to it, never user text (see the parent module for the command protocol).
//!
//! **Invariant:** every process this shell starts stays findable through
//! [`process::members`] of the shell's pid, so [`Shell::terminate`] and `Drop` can kill them all.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cgroup::Cgroup;
use super::output::{Capture, Marker, Scanner};
use super::process;

/// Where `setsid` may live; without it bash only gets its own process group.
const SETSID: [&str; 2] = ["/usr/bin/setsid", "/bin/setsid"];
/// How long to wait for the shell's exit status and for killed processes to disappear.
const REAP_TIMEOUT: Duration = Duration::from_secs(2);
/// Read size from the output pipe.
const CHUNK: usize = 16 * 1024;

/// A command the shell is executing (its marker line has not been seen yet).
#[derive(Debug)]
pub(super) struct Running {
    scanner: Scanner,
    /// Write end of the command's stdin (a FIFO); `None` after C-d.
    pub(super) input: Option<pipe::Sender>,
}

impl Running {
    pub(super) fn new(marker: &str, input: Option<pipe::Sender>) -> Self {
        Self {
            scanner: Scanner::new(marker),
            input,
        }
    }
}

/// How waiting for a command ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The marker line arrived: the command finished.
    Done(Marker),
    /// The deadline passed (`no_change`: because nothing was printed for that long).
    Timeout { no_change: bool },
    /// The caller's token fired; the command is untouched.
    Cancelled,
    /// bash itself exited (e.g. `exit 3`), with this code (128 + n for a signal). The rest of
    /// its process group has been killed; the shell must not be used any more.
    Exited(i64),
}

/// A running bash.
#[derive(Debug)]
pub(super) struct Shell {
    child: Child,
    /// pid of the process we started: bash (also its process group and session id), or the
    /// sandbox's launcher (its process group id). Every process of the shell is it, a
    /// descendant, or in its group or session.
    pid: i32,
    /// Process group of bash (what C-c signals): `pid`, or the sandbox reaper's pid.
    group: i32,
    /// The sandbox's control group, removed once every process is gone.
    cgroup: Option<Cgroup>,
    stdin: ChildStdin,
    out: pipe::Receiver,
    /// Output read after the last marker line (from background processes); shown with the
    /// next command's output.
    pending: Vec<u8>,
    /// The command in progress, if any (it may have outlived an earlier timeout).
    pub(super) running: Option<Running>,
    /// Every process has been killed (no need to do it again on drop).
    dead: bool,
}

impl Shell {
    /// The command for an unsandboxed bash in `cwd` with exactly `env`: the leader of its own
    /// session and process group (through `setsid` when available, else its own group).
    pub(super) fn plain_command(cwd: &Path, env: &[(&str, OsString)]) -> Command {
        let mut argv: Vec<&str> = default_sigint().to_vec();
        let setsid = SETSID.iter().find(|p| Path::new(p).is_file());
        if let Some(setsid) = setsid {
            // Not a group leader when spawned, so `setsid` calls setsid(2) and execs bash in
            // the same process: the pid we hold is bash's.
            argv.push(setsid);
        }
        argv.push("bash");
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        if setsid.is_none() {
            cmd.process_group(0);
        }
        cmd.args(["--noprofile", "--norc"])
            .current_dir(cwd)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts `cmd` (a bash, or a sandbox whose command is bash: then `sandboxed`), sends
    /// `setup`, and waits until `ready_marker` (printed by `setup`) arrives.
    pub(super) async fn spawn(
        mut cmd: Command,
        sandboxed: bool,
        cgroup: Option<Cgroup>,
        setup: &str,
        ready_marker: &str,
        timeout: Duration,
    ) -> Result<Shell, SpawnError> {
        let (reader, writer) = std::io::pipe().map_err(SpawnError::Io)?;
        let writer2 = writer.try_clone().map_err(SpawnError::Io)?;
        if sandboxed {
            // The launcher leads a process group; bash inside leads its own session.
            cmd.process_group(0);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer2))
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(SpawnError::Io)?;
        // Close our copies of the pipe's write end, so the pipe ends when the shell's
        // processes are gone.
        drop(cmd);
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or(SpawnError::NotReady("bash exited at once".into()))?;
        let stdin = child
            .stdin
            .take()
            .ok_or(SpawnError::NotReady("bash has no stdin".into()))?;
        let out = pipe::Receiver::from_owned_fd(std::os::fd::OwnedFd::from(reader))
            .map_err(SpawnError::Io)?;
        let mut shell = Shell {
            child,
            pid,
            group: pid,
            cgroup,
            stdin,
            out,
            pending: Vec::new(),
            running: Some(Running::new(ready_marker, None)),
            dead: false,
        };
        shell.send(setup).await.map_err(SpawnError::Io)?;
        let mut startup = Capture::new(2_000);
        let outcome = shell
            .wait(
                &mut startup,
                Instant::now() + timeout,
                None,
                &CancellationToken::new(),
            )
            .await
            .map_err(SpawnError::Io)?;
        match outcome {
            Outcome::Done(_) => {
                if sandboxed {
                    // launcher (bwrap) -> the namespace's PID 1 (bwrap's reaper, which made
                    // the new session and group) -> bash. PID 1 ignores the SIGINT sent to
                    // its group (no handler), bash and its foreground processes get it.
                    shell.group = process::only_child(pid).unwrap_or(pid);
                }
                Ok(shell)
            }
            Outcome::Exited(code) => Err(SpawnError::NotReady(format!(
                "bash exited with code {code}: {}",
                startup.finish()
            ))),
            Outcome::Timeout { .. } | Outcome::Cancelled => Err(SpawnError::NotReady(format!(
                "no answer within {timeout:?}"
            ))),
        }
    }

    /// pid of bash's process group leader (bash, or the sandbox's reaper), as the worker
    /// sees it.
    pub(super) fn launcher_pid(&self) -> i32 {
        self.pid
    }

    pub(super) fn group_pid(&self) -> i32 {
        self.group
    }

    /// OOM kills in the shell's sandbox so far (0 without a control group).
    pub(super) fn oom_kills(&self) -> u64 {
        self.cgroup.as_ref().map_or(0, Cgroup::oom_kills)
    }

    /// Whether every process of the shell has been killed (it must be replaced).
    pub(super) fn is_dead(&self) -> bool {
        self.dead
    }

    /// Writes `script` to bash's command channel.
    pub(super) async fn send(&mut self, script: &str) -> std::io::Result<()> {
        self.stdin.write_all(script.as_bytes()).await?;
        self.stdin.flush().await
    }

    /// Reads output of the running command into `capture` until its marker line, the
    /// deadline (`hard`, or `no_change` after the last output), `cancel`, or the shell's exit.
    /// Output that arrived since the last command is shown first. Cancel-safe with respect to
    /// output: nothing read is lost, the command keeps running.
    ///
    /// # Errors
    /// Reading the output pipe failed.
    pub(super) async fn wait(
        &mut self,
        capture: &mut Capture,
        hard: Instant,
        no_change: Option<Duration>,
        cancel: &CancellationToken,
    ) -> std::io::Result<Outcome> {
        // Disjoint borrows of the fields, so that `running` stays in place: if this future is
        // dropped, the command simply keeps running.
        let Shell {
            child,
            pid,
            out,
            pending,
            running,
            dead,
            ..
        } = self;
        let Some(run) = running.as_mut() else {
            // Nothing runs: there is nothing to wait for.
            return Ok(Outcome::Timeout { no_change: false });
        };
        let earlier = std::mem::take(pending);
        if let Some((marker, rest)) = run.scanner.feed(&earlier, capture) {
            *pending = rest;
            *running = None;
            return Ok(Outcome::Done(marker));
        }
        let mut buf = vec![0u8; CHUNK];
        let mut last_output = Instant::now();
        loop {
            let quiet_deadline = no_change.map_or(hard, |d| hard.min(later(last_output, d)));
            let event = tokio::select! {
                biased;
                () = cancel.cancelled() => Event::Cancelled,
                read = out.read(&mut buf) => match read {
                    Ok(0) => Event::Eof,
                    Ok(n) => Event::Output(n),
                    Err(e) => return Err(e),
                },
                status = child.wait() => Event::Exited(status.map_or(-1, exit_code)),
                () = tokio::time::sleep_until(quiet_deadline) => Event::Deadline,
            };
            match event {
                Event::Output(n) => {
                    last_output = Instant::now();
                    if let Some((marker, rest)) = run.scanner.feed(&buf[..n], capture) {
                        *pending = rest;
                        *running = None;
                        return Ok(Outcome::Done(marker));
                    }
                }
                Event::Cancelled => return Ok(Outcome::Cancelled),
                Event::Deadline => {
                    run.scanner.show_held(capture);
                    return Ok(Outcome::Timeout {
                        no_change: quiet_deadline < hard,
                    });
                }
                Event::Eof => {
                    // Every writer is gone, so bash is too: collect its status.
                    let status = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await;
                    let code = match status {
                        Ok(Ok(s)) => exit_code(s),
                        _ => -1,
                    };
                    run.scanner.flush(capture);
                    *running = None;
                    kill_all(*pid, child, dead);
                    return Ok(Outcome::Exited(code));
                }
                Event::Exited(code) => {
                    // Kill what is left first, so the pipe stops filling, then take what it
                    // holds.
                    kill_all(*pid, child, dead);
                    let mut outcome = Outcome::Exited(code);
                    while let Ok(n) = out.try_read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if let Some((marker, _)) = run.scanner.feed(&buf[..n], capture) {
                            // The command finished just before bash exited (e.g. killed).
                            outcome = Outcome::Done(marker);
                            break;
                        }
                    }
                    run.scanner.flush(capture);
                    *running = None;
                    return Ok(outcome);
                }
            }
        }
    }

    /// Sends SIGINT to bash's process group, as a terminal does for C-c. bash traps it; the
    /// command's foreground processes get it; background jobs ignore it (POSIX: asynchronous
    /// lists of a shell without job control ignore SIGINT).
    pub(super) fn interrupt(&self) {
        process::signal_group(self.group, Signal::INT);
    }

    /// Stops every process of the shell: SIGTERM, up to `grace` for bash to exit, then
    /// SIGKILL, then waits (bounded) until they are gone.
    /// With a zero `grace`, SIGKILL comes at once.
    pub(super) async fn terminate(mut self, grace: Duration) {
        let mut victims = process::members(self.pid);
        if !grace.is_zero() {
            process::signal(self.pid, &victims, Signal::TERM);
            // Timing out here is the normal case for processes that ignore SIGTERM.
            let _ = tokio::time::timeout(grace, self.child.wait()).await;
        }
        for pid in process::members(self.pid) {
            if !victims.contains(&pid) {
                victims.push(pid);
            }
        }
        process::signal(self.pid, &victims, Signal::KILL);
        self.dead = true;
        // bash was SIGKILLed: its status arrives at once unless the system is stuck.
        let _ = tokio::time::timeout(REAP_TIMEOUT, self.child.wait()).await;
        let deadline = Instant::now() + REAP_TIMEOUT;
        while victims.iter().any(|&p| process::is_alive(p)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(group) = self.cgroup.take() {
            remove_cgroup(group).await;
        }
    }

    /// SIGKILLs every process of the shell at once, without waiting.
    pub(super) fn kill_now(&mut self) {
        kill_all(self.pid, &mut self.child, &mut self.dead);
    }
}

/// SIGKILLs every process of the shell led by `pid` (once: `dead` records it).
fn kill_all(pid: i32, child: &mut Child, dead: &mut bool) {
    if *dead {
        return;
    }
    let victims = process::members(pid);
    process::signal(pid, &victims, Signal::KILL);
    // Also covered by the group kill; this one is for bash itself if /proc was unreadable.
    let _ = child.start_kill();
    *dead = true;
}

/// `env --default-signal=INT`, where coreutils has it: the command after it starts with
/// SIGINT at its default disposition even if the worker was started with SIGINT ignored (a
/// background job of a script, `nohup`): bash cannot trap a signal ignored at its start, and
/// C-c would do nothing. Empty where `env` lacks the option. Every exec keeps it (dispositions
/// other than handlers are inherited).
pub(super) fn default_sigint() -> &'static [&'static str] {
    static PREFIX: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| {
        let args = ["/usr/bin/env", "--default-signal=INT"];
        let ok = std::process::Command::new(args[0])
            .args([args[1], "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok { args.to_vec() } else { Vec::new() }
    })
}

/// `at + d`, saturating far in the future instead of overflowing (`d` may come from a model).
pub(super) fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl Drop for Shell {
    fn drop(&mut self) {
        self.kill_now();
        if let Some(group) = self.cgroup.take() {
            // The processes were just SIGKILLed; the group empties within milliseconds.
            if !group.remove()
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                rt.spawn(remove_cgroup(group));
            }
        }
    }
}

/// Removes a sandbox's control group once its processes are gone (bounded wait).
async fn remove_cgroup(group: Cgroup) {
    let deadline = Instant::now() + REAP_TIMEOUT;
    while !group.remove() {
        if Instant::now() >= deadline {
            tracing::warn!(
                populated = group.is_populated(),
                "sandbox control group left behind"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One wake-up of [`Shell::wait`].
enum Event {
    Cancelled,
    Output(usize),
    Eof,
    Exited(i64),
    Deadline,
}

/// Why a shell could not be started.
#[derive(Debug, thiserror::Error)]
pub(super) enum SpawnError {
    #[error("I/O error")]
    Io(#[source] std::io::Error),
    #[error("{0}")]
    NotReady(String),
}

/// bash's convention: the exit code, or 128 + the signal number.
fn exit_code(status: ExitStatus) -> i64 {
    match (status.code(), status.signal()) {
        (Some(code), _) => i64::from(code),
        (None, Some(sig)) => 128 + i64::from(sig),
        (None, None) => -1,
    }
}
