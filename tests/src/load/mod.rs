//! The load tool (`loadtest` binary, issue 3): drives conversations over real Socket.IO
//! against any deployment, measures latency per message (sent → own message back → agent
//! reply → `awaiting_user_input`), connect, create → ready and reconnect-and-replay times,
//! throughput, memory per socket and per session and CPU, checks that no client lost or got
//! a duplicate event, and compares the figures with the raw NATS floor.
//!
//! Layout:
//! - [`args`]: the command line ([`Args`]) and per-scenario defaults ([`args::Plan`]).
//! - [`client`]: a light Socket.IO client (one task per connection, events handled inline).
//! - [`stats`]: HdrHistograms, counters, errors by kind. Each client's events are checked
//!   against the log by [`crate::check::verify_connection`] (replay and live rules).
//! - [`rest`]: REST calls. [`floor`]: the NATS floor. [`procfs`]: RSS and CPU from `/proc`.
//! - [`deploy`]: deployments through `deploy/local/cluster.sh` ([`deploy::Deployer`]).
//! - `run`: building blocks (create, connect, wait ready, drive, verify, progress line).
//! - `scenario`: `latency`, `fanout`, `many`, `burst`, `replay`, `scale`.
//! - [`report`]: the result ([`Report`], the `--out` JSON), final table, SVG plot.
//!
//! Every wait is bounded by `--timeout-s` (or a multiple), every loop by a count or a
//! deadline: the tool always stops by itself.

pub mod args;
pub mod client;
pub mod deploy;
pub mod floor;
pub mod jsops;
pub mod procfs;
pub mod report;
pub mod rest;
mod run;
mod scenario;
pub mod stats;
pub mod stub_llm;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

pub use args::{Args, Scenario};
pub use report::Report;

use deploy::{DeployError, Deployer, ScriptDeployer};
use procfs::Pid;
use rest::{Rest, RestError};
use run::Ctx;
use stats::Stats;
use std::sync::Arc;
use stub_llm::StubLlm;

/// Why a run could not be carried out (lost events and timeouts are results, not errors).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A REST call needed to set up the run failed.
    #[error(transparent)]
    Rest(#[from] RestError),
    /// A deployment could not be started or stopped.
    #[error(transparent)]
    Deploy(#[from] DeployError),
    /// The floor could not be measured.
    #[error(transparent)]
    Floor(#[from] floor::FloorError),
    /// Anything else that makes the run meaningless.
    #[error("{0}")]
    Setup(String),
}

/// The default deployer of `scale` and `--deploy`: `deploy/local/cluster.sh` of this
/// workspace (or `--deploy-script`), state in `--deploy-state-dir`.
pub fn script_deployer(args: &Args) -> ScriptDeployer {
    let script = args
        .deploy_script
        .clone()
        .unwrap_or_else(|| crate::proc::workspace_root().join("deploy/local/cluster.sh"));
    let dir = args
        .deploy_state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/tmp/oh-loadtest-deploy"));
    let mut d = ScriptDeployer::new(
        script,
        dir,
        args.deploy_port,
        args.deploy_gateways.max(1),
        (args.nats_url.clone(), args.redis_url.clone()),
        args.max_sessions,
    );
    d.keep = args.keep;
    d
}

/// Pids named on the command line, else those of `--deploy-dir`.
fn given_pids(args: &Args) -> Vec<Pid> {
    let mut pids: Vec<Pid> = args
        .gateway_pids
        .iter()
        .map(|p| Pid {
            role: "gateway".into(),
            pid: *p,
        })
        .chain(args.worker_pids.iter().map(|p| Pid {
            role: "worker".into(),
            pid: *p,
        }))
        .collect();
    if pids.is_empty()
        && let Some(dir) = &args.deploy_dir
    {
        pids = procfs::pids_from_deploy_dir(dir);
    }
    pids
}

/// Runs the scenario of `args`. `scale` and `--deploy` use `deployer` (default:
/// [`script_deployer`]).
///
/// # Errors
/// When the run cannot be carried out at all (see [`LoadError`]); lost events, timeouts
/// and refused connects are counted in the report instead.
pub async fn run(args: Args, deployer: Option<Box<dyn Deployer>>) -> Result<Report, LoadError> {
    let started = Instant::now();
    let rest = Rest::new(args.token.clone())?;
    let stats = Arc::new(Stats::default());
    // `long`: the tool's own LLM, before the deployment (its workers must use it).
    let llm = if args.scenario == Scenario::Long {
        let llm = StubLlm::start(
            args.llm_listen,
            args.long_steps_per_turn,
            args.long_late_messages,
            stats.clone(),
        )
        .await
        .map_err(|e| LoadError::Setup(format!("LLM stub on {}: {e}", args.llm_listen)))?;
        Some(llm)
    } else {
        None
    };
    let mut deployer: Box<dyn Deployer> = deployer.unwrap_or_else(|| {
        let mut d = script_deployer(&args);
        if let Some(llm) = &llm {
            d.extra_env = vec![
                ("OH_AGENT".to_owned(), "codeact".to_owned()),
                ("OH_LLM_BASE_URL".to_owned(), llm.base_url()),
            ];
        }
        Box::new(d)
    });
    let mut gateways: Vec<String> = args
        .gateways
        .iter()
        .map(|g| g.trim_end_matches('/').to_owned())
        .filter(|g| !g.is_empty())
        .collect();
    let mut pids = given_pids(&args);
    let deployed = args.deploy && args.scenario != Scenario::Scale;
    if deployed {
        let d = deployer.start(args.deploy_workers.max(1)).await?;
        gateways = d.gateways;
        pids = d.pids;
    }
    if gateways.is_empty() {
        return Err(LoadError::Setup("no gateway given (--gateway)".to_owned()));
    }
    let mut ctx = Ctx::new(args.clone(), gateways, pids, rest, stats);
    ctx.report.scenario = args.scenario.name().to_owned();
    ctx.report.plan = Some(ctx.plan.clone());
    ctx.report.gateways = ctx.gateways.clone();
    let progress = run::spawn_progress(&ctx);

    let result = async {
        if let Some(url) = &args.floor_nats {
            ctx.set_phase("floor");
            floor::measure(url, args.floor_samples, &ctx.stats).await?;
        }
        match args.scenario {
            Scenario::Latency | Scenario::Fanout => scenario::conversations(&mut ctx, false).await,
            Scenario::Many => scenario::conversations(&mut ctx, true).await,
            Scenario::Burst => scenario::burst(&mut ctx).await,
            Scenario::Replay => scenario::replay(&mut ctx).await,
            Scenario::Scale => scenario::scale(&mut ctx, deployer.as_mut()).await,
            Scenario::Long => match &llm {
                Some(llm) => scenario::long(&mut ctx, llm).await,
                None => Err(LoadError::Setup("no LLM stub".to_owned())),
            },
        }
    }
    .await;
    if let Some(p) = progress {
        p.abort();
        if !args.quiet {
            eprintln!();
        }
    }
    if deployed && let Err(e) = deployer.stop().await {
        ctx.report.notes.push(e.to_string());
    }
    result?;

    let elapsed = started.elapsed().as_secs_f64();
    let stats = ctx.stats.clone();
    let report = &mut ctx.report;
    report.collect(&stats);
    report.duration_s = elapsed;
    report.messages = stats.replies.load(Ordering::Relaxed);
    report.events_in_per_s = stats.events_in.load(Ordering::Relaxed) as f64 / elapsed.max(1e-3);
    report.histograms = Some(stats);
    Ok(ctx.report)
}

/// Writes the JSON (`--out`) and the SVG plot (`--plot`, else `--out` with `.svg`).
///
/// # Errors
/// When a file cannot be written.
pub fn write_outputs(args: &Args, report: &Report) -> Result<(), String> {
    if let Some(out) = &args.out {
        let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        std::fs::write(out, json + "\n").map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let plot_path = args
        .plot
        .clone()
        .or_else(|| args.out.as_ref().map(|o| o.with_extension("svg")));
    if let (Some(path), Some(stats)) = (plot_path, &report.histograms) {
        let title = format!("loadtest {}: latency by percentile", report.scenario);
        report::plot(stats, &title, &path)?;
    }
    Ok(())
}
