//! The worker: claims sessions from the JetStream work queue while it has free slots and runs
//! one [`session`] task per claimed session.
//!
//! Layout:
//! - `config`: the worker's flags.
//! - `claim`: pulls start requests within capacity, takes the lease, fences the log, spawns.
//! - `lease`: renews every held lease; a lost lease cancels its session.
//! - `session`: `AgentSession`, one task per session, driven by user actions.
//! - `sweep`: queues a resume for sessions that should run but lost their owner.
//! - `cleanup`: removes the workspace of a deleted conversation.
//! - `workspace`: snapshots of a session's files in JetStream (incremental) and their restore.
//! - `controller`: the steps of a turn (think, act) as futures that own the controller.
//! - `agent`: the agent trait, the CodeAct agent, replay, and the `echo` test/demo agent.
//! - `memory`: recall of workspace instructions and knowledge on user messages.
//! - `llm`: the OpenAI-compatible LLM client; `runtime`: the session's shell and file tools,
//!   in a bubblewrap sandbox (`runtime::sandbox`) with control-group limits (`runtime::cgroup`).
//! - `files`: answers the gateway's workspace queries (file list and contents, uploads, git
//!   changes, microagents) for the sessions this worker owns.
//! - `bench`: the sandbox benchmark of the `sandbox-bench` binary; `snapshot_bench`: the
//!   workspace snapshot benchmark of `snapshot-bench`.

mod actions;
mod agent;
#[doc(hidden)]
pub mod bench;
mod claim;
mod cleanup;
pub mod config;
mod controller;
mod files;
mod lease;
pub mod llm;
mod memory;
mod metrics_catalog;
pub(crate) mod runtime;
mod session;
#[doc(hidden)]
pub mod snapshot_bench;
mod sweep;
mod workspace;

use std::sync::Arc;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use config::Args;
use shared::id::WorkerId;
use shared::store::Store;

/// Everything a session task needs, shared by all tasks of this worker.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) nats: async_nats::Client,
    pub(crate) llm: Option<llm::LlmRegistry>,
    pub(crate) store: Store,
    pub(crate) redis: redis::aio::ConnectionManager,
    pub(crate) worker_id: WorkerId,
    pub(crate) args: Arc<Args>,
    pub(crate) leases: lease::Registry,
    /// The action feeds of the sessions this worker runs, for the recheck.
    pub(crate) feeds: actions::Feeds,
    /// `OH_KNOWLEDGE_DIR`'s files, read once at startup and shared by every session.
    pub(crate) knowledge: Arc<[memory::Knowledge]>,
    /// The sandbox agent code runs in (`None`: `OH_SANDBOX=off`).
    pub(crate) sandbox: Option<Arc<runtime::sandbox::Sandbox>>,
}

/// Runs the worker until `cancel` fires, then drains: stops pulling, hands every session back
/// to the queue, and returns.
///
/// # Errors
/// Startup failures (NATS, Redis, JetStream setup, metrics listener).
pub async fn run(
    mut args: Args,
    metrics: PrometheusHandle,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    shared::telemetry::register(metrics_catalog::METRICS);
    let worker_id = args.worker_id.clone().unwrap_or_else(WorkerId::generate);
    info!(worker_id = %worker_id, max_sessions = args.max_sessions, "worker starting");
    // Other processes of this user cannot read our memory or /proc/<pid>/environ.
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        warn!(error = %e, "cannot make the worker non-dumpable");
    }
    args.load_secret_files()?;
    let mut control_plane = Vec::new();
    for (host, port) in args.control_plane_hosts() {
        if let Ok(addrs) = tokio::net::lookup_host((host.as_str(), port)).await {
            control_plane.extend(addrs.map(|a| a.ip()));
        }
    }
    let sandbox = match args.sandbox_config(control_plane) {
        Some(cfg) => {
            let sb = runtime::sandbox::Sandbox::new(&cfg).await.context(
                "agent code cannot be sandboxed on this machine (set OH_SANDBOX=off to run it \
                 unsandboxed, as the worker's user, with access to the control plane)",
            )?;
            info!(sandbox = %sb.describe(), "agent code is sandboxed");
            Some(Arc::new(sb))
        }
        None => {
            error!(
                "OH_SANDBOX=off: agent code runs UNSANDBOXED as the worker's user; it can read \
                 the worker's files and reach NATS, Redis and every local service"
            );
            None
        }
    };
    let (nats_options, nats_servers) = shared::creds::nats_connect_options(args.broker.nats());
    let client = nats_options
        .name(format!("worker {worker_id}"))
        .ping_interval(lease::nats_ping_interval(args.lease_ttl))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(nats_servers)
        .await
        .with_context(|| format!("connect NATS at {}", args.broker.nats()))?;
    let store = shared::store::open_patiently(
        || {
            Store::open_with(
                client.clone(),
                args.broker.names.clone(),
                args.broker.store_limits(),
            )
        },
        shared::store::SETUP_PATIENCE,
    )
    .await
    .context("JetStream setup")?;
    // Also without an LLM of its own: a user's settings may name one for their conversations.
    let llm = match args.agent_kind() {
        "codeact" => {
            if args.llm_base_url.is_none() {
                anyhow::bail!("OH_AGENT=codeact needs an LLM: set OH_LLM_BASE_URL");
            }
            Some(llm::LlmRegistry::new().context("LLM client setup")?)
        }
        _ => match llm::LlmRegistry::new() {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "no LLM client: conversations run the echo agent");
                None
            }
        },
    };
    info!(agent = args.agent_kind(), "agent selected");
    let redis = shared::ownership::connect(args.broker.redis())
        .await
        .with_context(|| format!("connect Redis at {}", args.broker.redis()))?;
    let ctx = Ctx {
        nats: client,
        llm,
        store,
        redis,
        worker_id,
        leases: lease::Registry::default(),
        feeds: actions::Feeds::default(),
        knowledge: args
            .knowledge_dir
            .as_deref()
            .map(memory::load_knowledge)
            .unwrap_or_default()
            .into(),
        sandbox,
        args: Arc::new(args),
    };

    metrics::gauge!("oh_worker_draining").set(0.0);
    let sessions = TaskTracker::new();
    let mut core = JoinSet::new();
    if let Some(addr) = ctx.args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind metrics address {addr}"))?;
        let (ready_ctx, draining) = (ctx.clone(), cancel.clone());
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let m = metrics.clone();
                    async move { m.render() }
                }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route(
                "/readyz",
                axum::routing::get(move || readyz(ready_ctx.clone(), draining.clone())),
            );
        // Served through the drain (metrics, and /readyz saying it drains) until the end.
        core.spawn(async move {
            let _ = axum::serve(listener, app).await; // a metrics endpoint failure is not worth stopping sessions for
        });
    }
    core.spawn(lease::renew_loop(ctx.clone(), cancel.child_token()));
    core.spawn(sweep::sweep_loop(ctx.clone(), cancel.child_token()));
    core.spawn(actions::recheck_loop(ctx.clone(), cancel.child_token()));
    core.spawn(claim::queue_depth_loop(ctx.clone(), cancel.child_token()));
    core.spawn(cleanup::workspace_gc(ctx.clone(), cancel.child_token()));
    core.spawn(files::serve(ctx.clone(), cancel.child_token()));
    core.spawn(claim::pull_loop(
        ctx.clone(),
        sessions.clone(),
        cancel.child_token(),
    ));

    tokio::select! {
        () = cancel.cancelled() => info!("draining"),
        Some(done) = core.join_next() => error!(?done, "core loop ended early"),
    }
    cancel.cancel();
    metrics::gauge!("oh_worker_draining").set(1.0);
    sessions.close();
    let drain = ctx.args.drain_timeout;
    let drained = tokio::time::timeout(drain, sessions.wait()).await.is_ok();
    if !drained {
        error!(left = sessions.len(), "drain timeout: abandoning sessions");
    }
    core.shutdown().await;
    if drained {
        // Every session was handed back: the sweeper need not look for ours. (Abandoned
        // ones are found once the heartbeat expires.)
        let mut conn = ctx.redis.clone();
        if let Err(e) =
            shared::ownership::retire(&mut conn, ctx.store.names(), &ctx.worker_id).await
        {
            warn!(error = %e, "could not retire the worker's heartbeat; it expires");
        }
    }
    info!("worker stopped");
    Ok(())
}

/// `GET /readyz`: 200 while this worker takes sessions (NATS connected, Redis answers, not
/// draining), else 503; the body says which part is missing.
async fn readyz(ctx: Ctx, draining: CancellationToken) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let nats = ctx.nats.connection_state() == async_nats::connection::State::Connected;
    let mut conn = ctx.redis.clone();
    let redis = redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok();
    let draining = draining.is_cancelled();
    let code = if nats && redis && !draining {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({"nats": nats, "redis": redis, "draining": draining});
    (code, axum::Json(body)).into_response()
}
