//! Tracing and Prometheus metrics setup, the same for both binaries.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON lines.
//! Metrics are recorded with the `metrics` facade and rendered by a Prometheus recorder whose
//! handle the binaries expose on `GET /metrics`.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. Call once, from `main`.
pub fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init fails only if a subscriber is already set (e.g. twice in one test process).
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the Prometheus recorder")]
pub struct MetricsError(#[source] metrics_exporter_prometheus::BuildError);

/// Installs the global Prometheus recorder and returns the handle that renders it.
///
/// # Errors
/// [`MetricsError`] if a recorder is already installed.
pub fn init_metrics() -> Result<PrometheusHandle, MetricsError> {
    PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ])
        .map_err(MetricsError)?
        .install_recorder()
        .map_err(MetricsError)
}
