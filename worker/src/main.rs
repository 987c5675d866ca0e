//! `worker` binary: parse configuration, set up telemetry, run until SIGINT/SIGTERM.

use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// The service name on exported traces.
const SERVICE: &str = "oh-worker";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: worker::Args = shared::config::parse_or_exit();
    let _telemetry = shared::telemetry::init_tracing(
        args.broker.log_json,
        args.broker.otlp_endpoint.as_deref(),
        SERVICE,
    )
    .context("traces")?;
    let metrics = shared::telemetry::init_metrics().context("metrics")?;
    let cancel = CancellationToken::new();
    tokio::spawn(shutdown_signal(cancel.clone()));
    worker::run(args, metrics, cancel).await.context("worker")
}

async fn shutdown_signal(cancel: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = ctrl_c.await; // only SIGINT is left to wait for
            cancel.cancel();
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutdown signal received");
    cancel.cancel();
}
