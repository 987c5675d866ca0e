//! The sandbox benchmark behind `sandbox-bench` (a binary of this crate): what a sandbox
//! costs a session, measured on the real runtime with and without bubblewrap in one run.
//!
//! - **start**: [`Runtime::start`] until the shell answers its first marker (workspace, control
//!   files, control group, `setpriv` + `bwrap` + bash), per session;
//! - **command**: the round trip of `echo hi` through the shell protocol (write the command
//!   file, source it, read the marker), per command;
//! - **memory**: proportional set size (PSS, `/proc/<pid>/smaps_rollup`) of every process of
//!   an idle session's shell (launcher, reaper, bash), so shared library pages are split
//!   between sessions rather than counted once per process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::id::SessionId;
use tokio_util::sync::CancellationToken;

use crate::runtime::cgroup::Limits;
use crate::runtime::sandbox::{Sandbox, SandboxConfig};
use crate::runtime::{CmdRequest, Runtime, RuntimeConfig};

/// Numbers of one mode (sandboxed or not).
#[derive(Debug, Clone)]
pub struct ModeResult {
    /// `sandboxed` or `plain`.
    pub mode: &'static str,
    /// Start time per session: p50, p99.
    pub start_p50: Duration,
    pub start_p99: Duration,
    /// `echo` round trip: p50, p99.
    pub cmd_p50: Duration,
    pub cmd_p99: Duration,
    /// PSS of an idle session's processes, KiB (mean over the sessions).
    pub idle_pss_kib: u64,
}

/// Runs `sessions` runtimes and `commands` echoes in each mode.
///
/// # Errors
/// The sandbox cannot be set up, or a runtime fails.
pub async fn run(sessions: usize, commands: usize) -> anyhow::Result<Vec<ModeResult>> {
    let cfg = SandboxConfig {
        bwrap: None,
        uid: 65534,
        gid: 65534,
        limits: Limits {
            memory_bytes: 2048 << 20,
            pids: 512,
            cpus: 1.0,
        },
        egress: None,
    };
    let sandbox = Arc::new(Sandbox::new(&cfg).await?);
    eprintln!("sandbox: {}", sandbox.describe());
    let mut out = Vec::new();
    for (mode, sb) in [("plain", None), ("sandboxed", Some(sandbox))] {
        let root = tempfile::tempdir()?;
        let rcfg = RuntimeConfig::new(root.path().join("ws")).with_sandbox(sb);
        let mut starts = Vec::new();
        let mut runtimes = Vec::new();
        for i in 0..sessions {
            let sid = SessionId::parse(&format!("bench-{mode}-{i}"))?;
            let t0 = Instant::now();
            let rt = Runtime::start(&rcfg, &sid).await?;
            starts.push(t0.elapsed());
            runtimes.push(rt);
        }
        let mut cmds = Vec::new();
        let req = CmdRequest {
            command: "echo hi".to_owned(),
            is_input: false,
            timeout: Some(Duration::from_secs(30)),
        };
        let never = CancellationToken::new();
        let n = runtimes.len();
        for i in 0..commands {
            let rt = &mut runtimes[i % n];
            let t0 = Instant::now();
            let o = rt.run(&req, &never).await?;
            cmds.push(t0.elapsed());
            anyhow::ensure!(o.content == "hi", "unexpected output {o:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pss: u64 = runtimes.iter().map(|rt| rt.shell_pss_kib()).sum();
        for rt in &mut runtimes {
            rt.close().await;
        }
        out.push(ModeResult {
            mode,
            start_p50: pct(&mut starts, 50),
            start_p99: pct(&mut starts, 99),
            cmd_p50: pct(&mut cmds, 50),
            cmd_p99: pct(&mut cmds, 99),
            idle_pss_kib: pss / sessions.max(1) as u64,
        });
    }
    Ok(out)
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v.get((v.len().saturating_sub(1)) * p / 100)
        .copied()
        .unwrap_or_default()
}
