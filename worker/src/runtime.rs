//! The runtime of one session: a workspace directory, a persistent bash, and file tools
//! confined to the workspace.
//!
//! # Workspace
//! `<root>/<session id>`, created on [`Runtime::start`] and canonicalized (the reported paths
//! are canonical). It outlives the runtime: [`Runtime::close`] stops processes, never deletes
//! files.
//!
//! # The shell
//! One non-interactive bash per session, leader of its own session and process group, cwd =
//! the workspace, started with a *clean* environment: `PATH`, `USER`, `LOGNAME`, `TZ` and
//! `TMPDIR` are inherited, `HOME` is the workspace, plus `LANG=C.UTF-8`, `TERM=dumb`,
//! `PAGER=cat`, `GIT_PAGER=cat`, `PYTHONUNBUFFERED=1`, `DEBIAN_FRONTEND=noninteractive`,
//! `GIT_TERMINAL_PROMPT=0`. Nothing else of the worker's environment (which holds secrets such
//! as the LLM key) reaches the shell. stdout and stderr are merged.
//!
//! **Command protocol.** bash's stdin carries only our scripts. For each command we write the
//! user's text verbatim to a private file `<ctl>/command` and send one line:
//!
//! ```text
//! trap 'return 130' INT; . <ctl>/command < <ctl>/stdin; __oh_rc=$?; trap : INT; printf '\n__OH_DONE_<token>_<seq>__ %s %s\n' "$__oh_rc" "$PWD"
//! ```
//!
//! Sourcing (rather than pasting the text into bash's stdin) means any text is safe: several
//! lines, here-documents, unbalanced quotes (a syntax error, exit code 2), even a line that
//! looks like our marker; and since it runs in the shell itself, `cd`, `export`, `declare`,
//! functions and aliases persist. We read the merged output until the marker line (`token` is
//! random per runtime, `seq` per command), which gives the exit code and cwd. Output printed by
//! background processes between commands is shown with the next command's output.
//!
//! **stdin.** A command's stdin is a FIFO (`<ctl>/stdin`) whose write end we hold while it
//! runs, so it behaves like a terminal nobody types into: a command that reads stdin waits
//! (and times out, see below) instead of eating our protocol or getting EOF. `is_input` text is
//! written to that FIFO with a newline; `C-d` closes it (EOF). Background jobs (`cmd &`) get
//! `/dev/null`, as bash gives them.
//!
//! # Timeouts (OpenHands' semantics)
//! A command that has not finished when its time is up **keeps running**: [`Runtime::run`]
//! returns the output so far with `still_running` and `timed_out` set, `exit_code` -1, and a
//! `suffix` telling the model how to go on. The time is up after `timeout` when the request
//! sets one ("blocking", like OpenHands), else after `default_timeout`, or earlier after
//! `no_change_timeout` without any new output. While a command runs:
//! - `is_input` with an empty command (or a non-input empty command) waits again and returns
//!   the new output, with the `prefix` "[Below is the output of the previous command.]";
//! - `is_input` with `C-c` sends SIGINT to the shell's process group, as a terminal does: the
//!   foreground processes get it (background jobs ignore it), bash aborts the rest of the
//!   command (its INT trap returns from the sourced file) and reports exit code 130. If the
//!   command has not finished [`INTERRUPT_GRACE`] later (it ignores SIGINT), the whole shell
//!   is killed and the next command gets a fresh one in the last known cwd; the `suffix` says
//!   that environment and background processes were lost;
//! - `is_input` with `C-d` closes the command's stdin; other `C-<key>`s are not supported;
//! - `is_input` with other text is written to the command's stdin, followed by a newline;
//! - a new command is **not executed**; the output so far is returned with OpenHands' note.
//!
//! # Cancellation
//! When `cancel` fires during [`Runtime::run`], the running command gets SIGINT as for C-c;
//! if it has not finished [`CANCEL_GRACE`] later, the shell and all its processes are killed
//! (the next command transparently starts a fresh shell in the last known cwd). `run` then
//! returns [`RuntimeError::Cancelled`], within a second. Dropping the future of `run` leaves
//! the command running, as after a timeout.
//!
//! # Lifetime
//! If bash exits (`exit`, `set -e`, killed), `run` returns its exit code with a `suffix`
//! saying so; the rest of its process group is killed and the next command starts a new
//! shell. [`Runtime::close`] sends SIGTERM to every process of the shell (its process group,
//! its session, and its descendants, found through `/proc`), waits [`TERM_GRACE`], sends
//! SIGKILL, and waits until they are gone. Dropping a [`Runtime`] sends SIGKILL at once.
//! **Invariant:** a runtime has at most one shell, and no process of an earlier shell survives
//! it (a process that leaves both the session and the process tree, i.e. a daemon that
//! double-forks and calls `setsid`, is out of reach: we do not use a PID namespace).
//!
//! Between commands nobody reads the output pipe: a background process that prints more than
//! it holds (64 KiB) blocks until the next command.
//!
//! # Output
//! `content` is the output only (the trailing newlines removed), invalid UTF-8 replaced,
//! middle-truncated to `max_output_chars` with [`TRUNCATION_MARKER`]; memory stays bounded
//! whatever a command prints. Notes for the model go to `prefix` and `suffix`, as in
//! OpenHands' `metadata` (the model sees `prefix + content + suffix`).
//!
//! # File tools
//! See [`editor`]: `view`, `create`, `str_replace`, `insert`, `undo_edit`, confined to the
//! workspace.

pub(crate) mod cgroup;
mod editor;
pub(crate) mod egress;
mod output;
mod process;
pub(crate) mod sandbox;
#[cfg(test)]
mod sandbox_tests;
mod shell;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shared::id::SessionId;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub(crate) use editor::{EditCommand, EditError, EditOutput};

use editor::Editor;
use output::Capture;
use sandbox::Sandbox;
use shell::{Outcome, Running, Shell, SpawnError};

/// How long a new bash may take to answer its first marker.
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// After SIGINT for a cancel, how long the command may take to finish before the shell is
/// killed.
pub(crate) const CANCEL_GRACE: Duration = Duration::from_millis(300);
/// After a `C-c` from the model, how long the command may take to finish before the shell is
/// killed.
pub(crate) const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// Between SIGTERM and SIGKILL on close.
pub(crate) const TERM_GRACE: Duration = Duration::from_millis(500);
/// How long writing `is_input` text may block (the command does not read its input).
const INPUT_TIMEOUT: Duration = Duration::from_secs(2);

const COMMAND_FILE: &str = "command";
const STDIN_FIFO: &str = "stdin";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const CONTINUE_PREFIX: &str = "[Below is the output of the previous command.]\n";

/// Settings shared by every runtime of a worker.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeConfig {
    /// Parent of the session workspaces (`OH_WORKSPACE_ROOT`).
    pub(crate) root: PathBuf,
    /// Time a command gets when the request sets none.
    pub(crate) default_timeout: Duration,
    /// Without a request timeout, a command that prints nothing for this long is returned as
    /// still running (OpenHands: 10 to 30 s).
    pub(crate) no_change_timeout: Duration,
    /// Cap of `content` (and of file views), in characters.
    pub(crate) max_output_chars: usize,
    /// Largest file the file tools read or write.
    pub(crate) max_file_bytes: u64,
    /// The sandbox shells run in (`None`: unsandboxed, `OH_SANDBOX=off`, and unit tests of
    /// the shell protocol).
    pub(crate) sandbox: Option<Arc<Sandbox>>,
}

impl RuntimeConfig {
    /// Defaults: 120 s per command, 30 s without output, 30 000 characters, 10 MiB files.
    pub(crate) fn new(root: PathBuf) -> Self {
        Self {
            root,
            default_timeout: Duration::from_secs(120),
            no_change_timeout: Duration::from_secs(30),
            max_output_chars: 30_000,
            max_file_bytes: 10 * 1024 * 1024,
            sandbox: None,
        }
    }

    /// Runs the shells in `sandbox`.
    pub(crate) fn with_sandbox(mut self, sandbox: Option<Arc<Sandbox>>) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// The workspace of `session` as the agent sees it (`/workspace` in a sandbox).
    pub(crate) fn agent_workspace(&self, session: &SessionId) -> String {
        match self.sandbox {
            Some(_) => sandbox::WORKSPACE.to_owned(),
            None => self.root.join(session.as_str()).display().to_string(),
        }
    }
}

/// One `execute_bash` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CmdRequest {
    /// bash text (any number of lines), or with `is_input` the text or key for the running
    /// command (`""` to wait for more output, `C-c`, `C-d`).
    pub(crate) command: String,
    /// The text is input for the running command, not a new command.
    pub(crate) is_input: bool,
    /// Time to wait before returning a still-running command; also disables the no-output
    /// timeout (OpenHands' "blocking"). `None`: `default_timeout` and `no_change_timeout`.
    pub(crate) timeout: Option<Duration>,
}

/// What a command printed and how it ended (the `run` observation's content and metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CmdOutput {
    /// Merged stdout/stderr, truncated in the middle to `max_output_chars`.
    pub(crate) content: String,
    /// Exit code; -1 while the command still runs, or when it was not run or was killed.
    pub(crate) exit_code: i64,
    /// Working directory after the command (the last known one if it still runs).
    pub(crate) cwd: String,
    /// pid of the session's bash (-1 if none).
    pub(crate) pid: i64,
    /// The command is still running (timeout, or input sent and not finished).
    pub(crate) still_running: bool,
    /// The command's time was up before it finished.
    pub(crate) timed_out: bool,
    /// Note shown to the model before `content` (`metadata.prefix`).
    pub(crate) prefix: String,
    /// Note shown to the model after `content` (`metadata.suffix`).
    pub(crate) suffix: String,
}

/// Why the runtime could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RuntimeError {
    /// The workspace directory could not be created or resolved.
    #[error("cannot create workspace {path}")]
    Workspace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The shell's private control files could not be prepared.
    #[error("cannot prepare the shell's control files")]
    Control(#[source] std::io::Error),
    /// bash could not be started.
    #[error("cannot start bash in {cwd}")]
    Spawn {
        cwd: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// bash started but did not answer.
    #[error("bash in {cwd} did not become ready: {reason}")]
    NotReady { cwd: PathBuf, reason: String },
    /// Talking to the shell failed.
    #[error("shell I/O failed while {op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// `cancel` fired; the command was interrupted or killed.
    #[error("cancelled")]
    Cancelled,
    /// [`Runtime::close`] was called.
    #[error("the runtime is closed")]
    Closed,
}

/// How long to wait for a command.
#[derive(Debug, Clone, Copy)]
struct Timing {
    hard: Duration,
    no_change: Option<Duration>,
}

/// The runtime of one session (see the module docs).
#[derive(Debug)]
pub(crate) struct Runtime {
    session: SessionId,
    cfg: RuntimeConfig,
    /// Canonical workspace directory.
    workspace: PathBuf,
    /// Private directory with the command file and the stdin FIFO; removed on drop.
    ctl: tempfile::TempDir,
    /// Random part of every marker, so no output can fake one.
    token: String,
    /// Number of the last marker issued.
    seq: u64,
    /// `None` before the first command after a kill, and after close.
    shell: Option<Shell>,
    /// Last known working directory, as the shell sees it (a new shell starts there).
    cwd: PathBuf,
    /// The workspace as the shell sees it (`/workspace` in a sandbox).
    view: PathBuf,
    /// The control folder as the shell sees it.
    ctl_view: PathBuf,
    editor: Editor,
    closed: bool,
    /// OOM kills of the current shell's sandbox already reported.
    oom_seen: u64,
    /// The session's egress proxy (`OH_SANDBOX_NETWORK=egress`), stopped with the runtime.
    proxy: Option<tokio_util::task::AbortOnDropHandle<()>>,
}

/// Creates `dir` (and its parents) if needed and gives it `mode`: `0700` (a session's files
/// are the worker's, or the sandbox user's, alone) or `0711` for a root the sandbox user must
/// enter (an older root made `0755` is tightened too).
async fn private_dir(dir: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .await?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).await
}

impl Runtime {
    /// Creates `<root>/<session>` (both `0700`) and starts the session's shell there.
    ///
    /// # Errors
    /// The workspace or the control files cannot be created, or bash does not start.
    pub(crate) async fn start(
        cfg: &RuntimeConfig,
        session: &SessionId,
    ) -> Result<Runtime, RuntimeError> {
        let dir = cfg.root.join(session.as_str());
        let ws_err = |source| RuntimeError::Workspace {
            path: dir.clone(),
            source,
        };
        let sandbox = cfg.sandbox.as_deref();
        let root_mode = sandbox.map_or(0o700, Sandbox::workspace_root_mode);
        private_dir(&cfg.root, root_mode).await.map_err(ws_err)?;
        private_dir(&dir, 0o700).await.map_err(ws_err)?;
        let workspace = tokio::fs::canonicalize(&dir).await.map_err(ws_err)?;
        let ctl = tempfile::Builder::new()
            .prefix("oh-runtime-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .map_err(RuntimeError::Control)?;
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            ctl.path().join(STDIN_FIFO),
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        )
        .map_err(|e| RuntimeError::Control(e.into()))?;
        let command_file = ctl.path().join(COMMAND_FILE);
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&command_file)
                .map_err(RuntimeError::Control)?;
        }
        let (view, ctl_view, editor) = match sandbox {
            Some(sb) => {
                sb.hand_over(&workspace).map_err(ws_err)?;
                for p in [ctl.path(), &ctl.path().join(STDIN_FIFO), &command_file] {
                    sb.hand_over(p).map_err(RuntimeError::Control)?;
                }
                let view = PathBuf::from(sandbox::WORKSPACE);
                let editor =
                    Editor::new(workspace.clone(), cfg.max_file_bytes, cfg.max_output_chars)
                        .sandboxed(view.clone(), sb.owner());
                (view, PathBuf::from(sandbox::CONTROL), editor)
            }
            None => (
                workspace.clone(),
                ctl.path().to_path_buf(),
                Editor::new(workspace.clone(), cfg.max_file_bytes, cfg.max_output_chars),
            ),
        };
        let mut rt = Runtime {
            session: session.clone(),
            editor,
            cfg: cfg.clone(),
            cwd: view.clone(),
            view,
            ctl_view,
            workspace,
            ctl,
            token: uuid::Uuid::new_v4().simple().to_string(),
            seq: 0,
            shell: None,
            closed: false,
            oom_seen: 0,
            proxy: None,
        };
        if let Some(policy) = sandbox.and_then(Sandbox::egress) {
            let path = rt.ctl.path().join(sandbox::PROXY_SOCKET);
            let owner = sandbox.and_then(Sandbox::owner);
            let listener = egress::bind(&path, owner).map_err(RuntimeError::Control)?;
            rt.proxy = Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
                egress::serve(listener, policy.clone(), session.clone()),
            )));
        }
        rt.shell().await?;
        debug!(session_id = %rt.session, workspace = %rt.workspace.display(), "runtime started");
        Ok(rt)
    }

    /// Proportional set size of every process of the shell, in KiB (for the benchmark).
    pub(crate) fn shell_pss_kib(&self) -> u64 {
        self.shell.as_ref().map_or(0, |s| {
            process::members(s.launcher_pid())
                .into_iter()
                .map(process::pss_kib)
                .sum()
        })
    }

    /// The session's workspace directory (canonical).
    pub(crate) fn workspace(&self) -> &Path {
        &self.workspace
    }

    /// Runs a command, or interacts with the running one (see the module docs for timeouts,
    /// input and cancellation). Mistakes of the caller (input without a running command, a
    /// new command while one runs) are answered with an explanatory output, not an error.
    ///
    /// # Errors
    /// [`RuntimeError::Cancelled`] when `cancel` fired, [`RuntimeError::Closed`] after
    /// [`close`](Self::close), or a failure to (re)start or talk to bash.
    pub(crate) async fn run(
        &mut self,
        req: &CmdRequest,
        cancel: &CancellationToken,
    ) -> Result<CmdOutput, RuntimeError> {
        if self.closed {
            return Err(RuntimeError::Closed);
        }
        let timing = match req.timeout {
            Some(t) => Timing {
                hard: t,
                no_change: None,
            },
            None => Timing {
                hard: self.cfg.default_timeout,
                no_change: Some(self.cfg.no_change_timeout),
            },
        };
        let running = self.shell.as_ref().is_some_and(|s| s.running.is_some());
        let text = req.command.as_str();
        if req.is_input {
            if !running {
                return Ok(self.note("ERROR: No previous running command to interact with."));
            }
            return self.interact(text, timing, cancel).await;
        }
        if running {
            if text.trim().is_empty() {
                return self
                    .wait(
                        Capture::new(self.cfg.max_output_chars),
                        timing,
                        cancel,
                        Mode::Continue,
                    )
                    .await;
            }
            // Maybe it finished meanwhile: then its last output precedes the new command's.
            let mut carry = Capture::new(self.cfg.max_output_chars);
            let poll = poll_timing();
            match self
                .wait_raw(&mut carry, poll, &CancellationToken::new())
                .await?
            {
                Outcome::Done(marker) => self.cwd = PathBuf::from(marker.cwd),
                Outcome::Exited(_) => self.shell = None,
                Outcome::Timeout { .. } | Outcome::Cancelled => {
                    let mut o = self
                        .output(
                            carry,
                            Outcome::Timeout { no_change: false },
                            Mode::Continue,
                            poll,
                        )
                        .await?;
                    o.suffix = not_executed(text);
                    o.timed_out = false;
                    return Ok(o);
                }
            }
            return self.execute(text, carry, timing, cancel).await;
        }
        if text.trim().is_empty() {
            return Ok(self.note("ERROR: No previous running command to retrieve logs from."));
        }
        self.execute(
            text,
            Capture::new(self.cfg.max_output_chars),
            timing,
            cancel,
        )
        .await
    }

    /// Runs one `str_replace_editor` command on the workspace.
    ///
    /// # Errors
    /// [`EditError`], whose message is meant for the model (an `error` observation).
    pub(crate) async fn edit(&mut self, cmd: &EditCommand) -> Result<EditOutput, EditError> {
        self.editor.run(cmd).await
    }

    /// Stops every process of the session (SIGTERM, then SIGKILL after [`TERM_GRACE`]) and
    /// waits until they are gone. Idempotent; afterwards [`run`](Self::run) returns
    /// [`RuntimeError::Closed`]. The workspace is kept.
    pub(crate) async fn close(&mut self) {
        self.closed = true;
        self.proxy = None;
        if let Some(shell) = self.shell.take() {
            shell.terminate(TERM_GRACE).await;
            debug!(session_id = %self.session, "runtime closed");
        }
    }

    /// The live shell, started first if there is none (or it died).
    async fn shell(&mut self) -> Result<&mut Shell, RuntimeError> {
        if self.shell.as_ref().is_none_or(Shell::is_dead) {
            // Dropping a dead shell kills whatever it left.
            self.shell = None;
            let cwd = self.cwd.clone();
            let marker = self.next_marker();
            // The new shell starts in the last known folder if it still exists.
            // With egress, the forwarder to the worker's proxy runs in the background (it
            // ignores C-c, as background jobs do) and listens before the first command.
            let net = if self.proxy.is_some() {
                format!(
                    "{helper} {addr} {sock} </dev/null >/dev/null 2>&1 &\nfor __oh_i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do (exec 3<>/dev/tcp/{host}/{port}) 2>/dev/null && break; sleep 0.05; done\nunset __oh_i\n",
                    helper = sandbox::NET_HELPER,
                    addr = egress::PROXY_ADDR,
                    sock = quote(&self.ctl_view.join(sandbox::PROXY_SOCKET)),
                    host = "127.0.0.1",
                    port = 3128,
                )
            } else {
                String::new()
            };
            let setup = format!(
                "exec 2>&1\ntrap : INT\n{net}cd -- {} 2>/dev/null || cd -- {}\nunset OLDPWD\nprintf '\\n{marker} %s %s\\n' \"$?\" \"$PWD\"\n",
                quote(&cwd),
                quote(&self.view),
            );
            let env = self.env();
            let (command, cgroup, sandboxed) = match &self.cfg.sandbox {
                Some(sb) => {
                    let launch = sb
                        .launch(
                            self.session.as_str(),
                            &self.workspace,
                            self.ctl.path(),
                            &env,
                            &["bash", "--noprofile", "--norc"],
                        )
                        .map_err(|source| RuntimeError::Spawn {
                            cwd: cwd.clone(),
                            source,
                        })?;
                    (launch.command, launch.cgroup, true)
                }
                None => (Shell::plain_command(&self.workspace, &env), None, false),
            };
            let shell = Shell::spawn(command, sandboxed, cgroup, &setup, &marker, STARTUP_TIMEOUT)
                .await
                .map_err(|e| match e {
                    SpawnError::Io(source) => RuntimeError::Spawn {
                        cwd: cwd.clone(),
                        source,
                    },
                    SpawnError::NotReady(reason) => RuntimeError::NotReady {
                        cwd: cwd.clone(),
                        reason,
                    },
                })?;
            debug!(session_id = %self.session, pid = shell.group_pid(), cwd = %cwd.display(), "shell started");
            self.oom_seen = 0;
            self.cwd = cwd;
            return Ok(self.shell.insert(shell));
        }
        // Checked just above: a live shell is there.
        self.shell.as_mut().ok_or(RuntimeError::Closed)
    }

    fn next_marker(&mut self) -> String {
        self.seq += 1;
        format!("__OH_DONE_{}_{}__", self.token, self.seq)
    }

    fn env(&self) -> Vec<(&'static str, OsString)> {
        let sandboxed = self.cfg.sandbox.is_some();
        let path = if sandboxed {
            sandbox::PATH.into()
        } else {
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into())
        };
        let mut env: Vec<(&'static str, OsString)> =
            vec![("HOME", self.view.clone().into_os_string()), ("PATH", path)];
        if sandboxed {
            env.push(("TMPDIR", "/tmp".into()));
            env.push(("USER", "agent".into()));
        }
        if self.proxy.is_some() {
            let url = format!("http://{}", egress::PROXY_ADDR);
            for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                env.push((k, url.clone().into()));
            }
            for k in ["NO_PROXY", "no_proxy"] {
                env.push((k, "localhost,127.0.0.1,::1".into()));
            }
        }
        for (k, v) in [
            ("LANG", "C.UTF-8"),
            ("TERM", "dumb"),
            ("PAGER", "cat"),
            ("GIT_PAGER", "cat"),
            ("PYTHONUNBUFFERED", "1"),
            ("DEBIAN_FRONTEND", "noninteractive"),
            ("GIT_TERMINAL_PROMPT", "0"),
        ] {
            env.push((k, v.into()));
        }
        let inherited: &[&'static str] = if sandboxed {
            &["TZ"]
        } else {
            &["USER", "LOGNAME", "TZ", "TMPDIR"]
        };
        for &k in inherited {
            if let Some(v) = std::env::var_os(k) {
                env.push((k, v));
            }
        }
        env
    }

    /// Starts `text` as a new command and waits for it.
    async fn execute(
        &mut self,
        text: &str,
        capture: Capture,
        timing: Timing,
        cancel: &CancellationToken,
    ) -> Result<CmdOutput, RuntimeError> {
        if text.contains('\0') {
            return Ok(self.note("ERROR: The command contains a NUL byte, which bash cannot run."));
        }
        let command_file = self.ctl.path().join(COMMAND_FILE);
        let fifo = self.ctl.path().join(STDIN_FIFO);
        tokio::fs::write(&command_file, text)
            .await
            .map_err(|source| RuntimeError::Io {
                op: "writing the command file",
                source,
            })?;
        let marker = self.next_marker();
        let script = format!(
            "trap 'return 130' INT; . {} < {}; __oh_rc=$?; trap : INT; printf '\\n{marker} %s %s\\n' \"$__oh_rc\" \"$PWD\"\n",
            quote(&self.ctl_view.join(COMMAND_FILE)),
            quote(&self.ctl_view.join(STDIN_FIFO)),
        );
        // A shell that died since the last command is replaced; one that dies while we send
        // is replaced once more.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let input = open_input(&fifo)?;
            let shell = self.shell().await?;
            shell.running = Some(Running::new(&marker, Some(input)));
            match shell.send(&script).await {
                Ok(()) => break,
                Err(source) if attempts >= 2 => {
                    return Err(RuntimeError::Io {
                        op: "sending a command",
                        source,
                    });
                }
                Err(e) => {
                    warn!(session_id = %self.session, error = %e, "shell gone; starting a new one");
                    self.shell = None;
                }
            }
        }
        self.wait(capture, timing, cancel, Mode::Run).await
    }

    /// Handles `is_input` while a command runs.
    async fn interact(
        &mut self,
        text: &str,
        timing: Timing,
        cancel: &CancellationToken,
    ) -> Result<CmdOutput, RuntimeError> {
        let capture = Capture::new(self.cfg.max_output_chars);
        let key = text.trim();
        if key.is_empty() {
            return self.wait(capture, timing, cancel, Mode::Continue).await;
        }
        if key == "C-c" {
            if let Some(shell) = &self.shell {
                shell.interrupt();
            }
            let grace = Timing {
                hard: INTERRUPT_GRACE,
                no_change: None,
            };
            return self.wait(capture, grace, cancel, Mode::Interrupt).await;
        }
        let fifo = self.ctl.path().join(STDIN_FIFO);
        let Some(run) = self.shell.as_mut().and_then(|s| s.running.as_mut()) else {
            return Ok(self.note("ERROR: No previous running command to interact with."));
        };
        if key == "C-d" {
            run.input = None;
            return self.wait(capture, timing, cancel, Mode::Continue).await;
        }
        if key.len() == 3 && key.starts_with("C-") {
            let mut o = self
                .wait(capture, poll_timing(), cancel, Mode::Continue)
                .await?;
            o.suffix = format!(
                "\n[The key {key} is not supported: send C-c to interrupt the command, C-d to close its input, or text followed by a newline.]"
            );
            o.timed_out = false;
            return Ok(o);
        }
        let input = match &mut run.input {
            Some(input) => input,
            None => run.input.insert(open_input(&fifo)?),
        };
        let line = format!("{text}\n");
        let delivered = tokio::time::timeout(INPUT_TIMEOUT, input.write_all(line.as_bytes()))
            .await
            .is_ok_and(|r| r.is_ok());
        let mut o = self.wait(capture, timing, cancel, Mode::Continue).await?;
        if !delivered {
            o.suffix.push_str(
                "\n[The input could not be delivered completely: the command does not read its input.]",
            );
        }
        Ok(o)
    }

    /// Waits for the running command and turns the outcome into an output.
    async fn wait(
        &mut self,
        mut capture: Capture,
        timing: Timing,
        cancel: &CancellationToken,
        mode: Mode,
    ) -> Result<CmdOutput, RuntimeError> {
        let outcome = self.wait_raw(&mut capture, timing, cancel).await?;
        if let Outcome::Cancelled = outcome {
            self.abort().await;
            return Err(RuntimeError::Cancelled);
        }
        self.output(capture, outcome, mode, timing).await
    }

    async fn wait_raw(
        &mut self,
        capture: &mut Capture,
        timing: Timing,
        cancel: &CancellationToken,
    ) -> Result<Outcome, RuntimeError> {
        let Some(shell) = self.shell.as_mut() else {
            return Ok(Outcome::Exited(-1));
        };
        let deadline = shell::later(Instant::now(), timing.hard);
        shell
            .wait(capture, deadline, timing.no_change, cancel)
            .await
            .map_err(|source| RuntimeError::Io {
                op: "reading command output",
                source,
            })
    }

    /// Maps an outcome (never `Cancelled`) of waiting `timing` to the output.
    async fn output(
        &mut self,
        capture: Capture,
        outcome: Outcome,
        mode: Mode,
        timing: Timing,
    ) -> Result<CmdOutput, RuntimeError> {
        let prefix = match mode {
            Mode::Run => String::new(),
            Mode::Continue | Mode::Interrupt => CONTINUE_PREFIX.to_owned(),
        };
        let oom = self.shell.as_ref().map_or(0, Shell::oom_kills);
        let oom_note = if oom > self.oom_seen {
            self.oom_seen = oom;
            let limit = self
                .cfg
                .sandbox
                .as_deref()
                .map_or(0, |sb| sb.limits().memory_bytes >> 20);
            format!(
                "\n[A process was killed: the sandbox's memory limit ({limit} MiB) was reached.]"
            )
        } else {
            String::new()
        };
        let (exit_code, still_running, timed_out, suffix) = match outcome {
            Outcome::Done(marker) => {
                self.cwd = PathBuf::from(marker.cwd);
                let code = marker.exit_code;
                let suffix = match mode {
                    Mode::Interrupt => {
                        format!("\n[The command completed with exit code {code}. CTRL+C was sent.]")
                    }
                    Mode::Run | Mode::Continue => {
                        format!("\n[The command completed with exit code {code}.]")
                    }
                };
                (code, false, false, suffix)
            }
            Outcome::Timeout { no_change } if mode != Mode::Interrupt => {
                (-1, true, true, timeout_note(&timing, no_change))
            }
            Outcome::Timeout { .. } => {
                warn!(session_id = %self.session, "command ignored SIGINT; killing the shell");
                if let Some(shell) = self.shell.take() {
                    shell.terminate(Duration::ZERO).await;
                }
                let suffix = format!(
                    "\n[The command did not stop after CTRL+C, so it was killed together with its shell. {}]",
                    self.new_shell_note()
                );
                (-1, false, false, suffix)
            }
            Outcome::Exited(code) => {
                self.shell = None;
                let suffix = format!(
                    "\n[The shell exited with code {code}. {}]",
                    self.new_shell_note()
                );
                (code, false, false, suffix)
            }
            Outcome::Cancelled => return Err(RuntimeError::Cancelled),
        };
        if self.shell.as_ref().is_some_and(Shell::is_dead) {
            self.shell = None;
        }
        Ok(CmdOutput {
            content: capture.finish(),
            exit_code,
            cwd: self.cwd.display().to_string(),
            pid: self.pid(),
            still_running,
            timed_out,
            prefix,
            suffix: oom_note + &suffix,
        })
    }

    /// After `cancel`: interrupt the command; kill the shell if that is not enough.
    async fn abort(&mut self) {
        let Some(shell) = self.shell.as_mut() else {
            return;
        };
        shell.interrupt();
        let mut sink = Capture::new(1_000);
        let deadline = Instant::now() + CANCEL_GRACE;
        let outcome = shell
            .wait(&mut sink, deadline, None, &CancellationToken::new())
            .await;
        match outcome {
            Ok(Outcome::Done(marker)) if !shell.is_dead() => {
                self.cwd = PathBuf::from(marker.cwd);
            }
            _ => {
                debug!(session_id = %self.session, "cancelled command did not stop; killing the shell");
                if let Some(shell) = self.shell.take() {
                    shell.terminate(Duration::ZERO).await;
                }
            }
        }
    }

    fn new_shell_note(&self) -> String {
        format!(
            "A new shell will start in {} for the next command; environment variables, functions and background processes of the old one are gone.",
            self.cwd.display()
        )
    }

    fn pid(&self) -> i64 {
        self.shell.as_ref().map_or(-1, |s| i64::from(s.group_pid()))
    }

    /// An output that only carries a message (nothing was run).
    fn note(&self, message: &str) -> CmdOutput {
        CmdOutput {
            content: message.to_owned(),
            exit_code: -1,
            cwd: self.cwd.display().to_string(),
            pid: self.pid(),
            still_running: self.shell.as_ref().is_some_and(|s| s.running.is_some()),
            timed_out: false,
            prefix: String::new(),
            suffix: String::new(),
        }
    }
}

/// Why we wait for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A new command.
    Run,
    /// More output of a command started earlier.
    Continue,
    /// After C-c: a timeout means SIGINT did not stop it.
    Interrupt,
}

/// Take what is there, wait for nothing.
fn poll_timing() -> Timing {
    Timing {
        hard: Duration::ZERO,
        no_change: None,
    }
}

/// Opens the write end of the commands' stdin FIFO (read-write, so it never blocks).
fn open_input(fifo: &Path) -> Result<pipe::Sender, RuntimeError> {
    pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(fifo)
        .map_err(|source| RuntimeError::Io {
            op: "opening the command's stdin",
            source,
        })
}

/// `path` as one single-quoted bash word.
fn quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

fn timeout_note(timing: &Timing, no_change: bool) -> String {
    let how = "You may wait longer to see additional output by sending empty command '' with `is_input` true, send other input to the current process with `is_input` true, send C-c with `is_input` true to interrupt it, or use the timeout parameter in execute_bash for future commands.";
    match (no_change, timing.no_change) {
        (true, Some(quiet)) => format!(
            "\n[The command has no new output after {} seconds. {how}]",
            quiet.as_secs_f64()
        ),
        _ => format!(
            "\n[The command timed out after {} seconds. {how}]",
            timing.hard.as_secs_f64()
        ),
    }
}

fn not_executed(command: &str) -> String {
    format!(
        "\n[Your command \"{command}\" is NOT executed. The previous command is still running - You CANNOT send new commands until the previous command is completed. By setting `is_input` to `true`, you can interact with the current process: You may wait longer to see additional output of the previous command by sending empty command '', send other commands to interact with the current process, send keys (\"C-c\", \"C-d\") to interrupt/kill the previous command before sending your new command, or use the timeout parameter in execute_bash for future commands.]"
    )
}
