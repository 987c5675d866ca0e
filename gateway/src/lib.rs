//! The gateway: holds client sockets (Socket.IO, OpenHands protocol) and the REST API.
//! Stateless: every conversation's data lives in JetStream and Redis, so any gateway serves
//! any conversation and a gateway can die at any moment without losing anything.
//!
//! Layout:
//! - `config`: flags.
//! - `app`: shared state and the assembled router.
//! - `http`: REST handlers and `ApiError`.
//! - `socket`: Socket.IO connect (auth, validation), `oh_user_action`, errors to the sender.
//! - `replay`: per-socket forwarding: replay after `latest_event_id`, then live, merged by id.
//! - `fanout`: one NATS subscription per session with local sockets, shared by them.
//! - `actions`: validated user actions published to JetStream; start requests.
//! - `serve`: the HTTP server loop (axum's, with a header-read timeout).
//! - `origin`: the browser boundary (allowed origins, served host names).
//! - `limits`: per-user rates and caps (creates, actions, stored conversations, sockets).
//! - `settings`: the user's side of OpenHands' UI: client config, settings, options, secrets.
//! - `openapi`: the OpenAPI 3.1 document of every REST route (`/api/openapi.json`).
//! - `web`: the web UI at `/` (the built-in page, or a built app from `OH_WEB_ROOT`).

mod actions;
mod app;
pub mod config;
mod fanout;
mod files;
mod http;
mod limits;
mod metrics_catalog;
mod openapi;
pub mod origin;
mod recent;
mod replay;
mod sendbuf;
mod serve;
mod settings;
mod socket;
mod web;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Args;

/// How long shutdown waits for the gateway's own tasks after the HTTP server stopped. Each one
/// ends on `cancel` or with its socket; this bounds a NATS or Redis call still in flight.
const TASKS_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves until `cancel` fires, then shuts down gracefully: stops accepting, closes every
/// socket, waits for in-flight requests, then for every task the gateway spawned (bounded).
///
/// # Errors
/// Startup failures (NATS, Redis, JetStream setup, bind).
pub async fn run(
    args: Args,
    metrics: PrometheusHandle,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    shared::telemetry::register(metrics_catalog::METRICS);
    let (router, tasks) = start(&args, metrics, &cancel).await?;
    let listener =
        listen(args.gateway_addr).with_context(|| format!("bind {}", args.gateway_addr))?;
    info!(addr = %args.gateway_addr, single_user = args.auth_tokens.is_single_user(), "gateway listening");
    serve::serve(listener, router, args.header_read_timeout, cancel.clone()).await;
    // Whatever ended the server, the tasks see `cancel` and end.
    cancel.cancel();
    tasks.close();
    if tokio::time::timeout(TASKS_GRACE, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            left = tasks.len(),
            "gateway tasks still running after the grace period; leaving them"
        );
    }
    info!("gateway stopped");
    Ok(())
}

/// The gateway's whole router (REST, Socket.IO, health, metrics), connected to NATS and
/// Redis, with its background tasks running until `cancel`. [`run`] serves the same router;
/// tests drive it directly (`tower::ServiceExt::oneshot`).
///
/// # Errors
/// Startup failures (NATS, Redis, JetStream setup).
pub async fn router(
    args: &Args,
    metrics: PrometheusHandle,
    cancel: &CancellationToken,
) -> anyhow::Result<axum::Router> {
    Ok(start(args, metrics, cancel).await?.0)
}

/// Connects, starts the background tasks, and builds the router; returns it with the tracker
/// of every task the gateway spawns.
async fn start(
    args: &Args,
    metrics: PrometheusHandle,
    cancel: &CancellationToken,
) -> anyhow::Result<(axum::Router, TaskTracker)> {
    let web = web::Web::new(args.web_root.clone());
    let gateway_id = format!("gw-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let (reconnected_tx, reconnected) = tokio::sync::mpsc::channel::<()>(1);
    let (nats_options, nats_servers) = shared::creds::nats_connect_options(args.broker.nats());
    let client = nats_options
        .name(format!("gateway {gateway_id} {}", args.gateway_addr))
        .event_callback(move |ev| {
            let tx = reconnected_tx.clone();
            async move {
                // After a reconnect, or when the client dropped messages of a subscription that
                // fell behind (slow consumer), sockets re-read the log. Full means a resync is
                // already pending; one is enough.
                if matches!(
                    ev,
                    async_nats::Event::Connected | async_nats::Event::SlowConsumer(_)
                ) {
                    let _ = tx.try_send(());
                }
            }
        })
        // A silent link (a partition drops packets, no reset) is noticed after a few unanswered
        // pings; the client then moves to another server of the list.
        .ping_interval(std::time::Duration::from_secs(2))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(nats_servers)
        .await
        .with_context(|| format!("connect NATS at {}", args.broker.nats()))?;
    // Workers bring existing streams to the configured limits; a gateway only creates missing
    // ones (its NATS user may not update streams).
    let store = shared::store::open_patiently(
        || {
            shared::store::Store::open_keeping_limits(
                client.clone(),
                args.broker.names.clone(),
                args.broker.store_limits(),
            )
        },
        shared::store::SETUP_PATIENCE,
    )
    .await
    .context("JetStream setup")?;
    let redis = shared::ownership::connect(args.broker.redis())
        .await
        .with_context(|| format!("connect Redis at {}", args.broker.redis()))?;
    let state = app::AppState::new((client, store, redis), args, metrics, &gateway_id);
    let tasks = state.tasks.clone();
    let fanout = state.fanout.clone();
    tasks.spawn(fanout.clone().presence_loop(cancel.clone()));
    tasks.spawn(fanout.resync_loop(reconnected, cancel.clone()));
    tasks.spawn(limits::refresh_loop(state.clone(), cancel.clone()));
    tasks.spawn(socket::confirm_loop(state.clone(), cancel.clone()));
    let expiring = state.clone();
    let until = cancel.clone();
    tasks.spawn(async move { expiring.recent.expire_loop(until).await });
    info!(gateway_id, "gateway connected to NATS and Redis");
    let router = app::router(
        state,
        args.socket_buffer as usize,
        args.request_timeout,
        args.allowed_origins.clone(),
        web,
        cancel.clone(),
    );
    Ok((router, tasks))
}

/// Pending connections the kernel queues for us (capped by `net.core.somaxconn`). Tokio's
/// default of 1,024 overflowed when 1,000 clients connected at once (`burst`): dropped SYNs
/// come back after the 1 s retransmit timeout.
const LISTEN_BACKLOG: u32 = 8192;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
