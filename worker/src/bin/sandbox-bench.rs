//! `sandbox-bench [sessions] [commands]`: what the bubblewrap sandbox costs a session (start
//! time, `echo` round trip, idle memory), sandboxed vs plain in one run; prints a Markdown
//! table for BENCHMARKS.md. Needs what the worker needs to sandbox (root: bwrap and setpriv).

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let sessions: usize = args
        .next()
        .map_or(Ok(50), |a| a.parse())
        .context("sessions")?;
    let commands: usize = args
        .next()
        .map_or(Ok(2000), |a| a.parse())
        .context("commands")?;
    let results = worker::bench::run(sessions.max(1), commands.max(1)).await?;
    println!("{sessions} sessions, {commands} `echo hi` commands per mode");
    println!();
    println!("| mode | start p50 | start p99 | echo p50 | echo p99 | idle PSS per session |");
    println!("|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.3} ms | {:.3} ms | {} KiB |",
            r.mode,
            r.start_p50.as_secs_f64() * 1e3,
            r.start_p99.as_secs_f64() * 1e3,
            r.cmd_p50.as_secs_f64() * 1e3,
            r.cmd_p99.as_secs_f64() * 1e3,
            r.idle_pss_kib
        );
    }
    Ok(())
}
