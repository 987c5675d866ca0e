//! Worker configuration (flags with `OH_*` environment fallbacks).

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::BrokerArgs;
use shared::id::WorkerId;

/// Worker flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "worker",
    about = "Runs agent sessions claimed from the work queue"
)]
pub struct Args {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// This worker's id (recorded as the owner of its sessions). Default: generated.
    #[arg(long, env = "OH_WORKER_ID")]
    pub worker_id: Option<WorkerId>,
    /// Most sessions this worker runs at once; it pulls work only while it has a free slot.
    #[arg(long, env = "OH_MAX_SESSIONS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_sessions: u32,
    /// Owner lease time-to-live in milliseconds; renewed every third of it.
    #[arg(long = "lease-ttl-ms", env = "OH_LEASE_TTL_MS", default_value = "5000", value_parser = parse_ttl)]
    pub lease_ttl: Duration,
    /// How long a drain (SIGTERM) may take before sessions are abandoned, in seconds.
    #[arg(long = "drain-timeout-s", env = "OH_DRAIN_TIMEOUT_S", default_value = "30", value_parser = parse_secs)]
    pub drain_timeout: Duration,
    /// Which agent runs sessions. `echo` is a test/demo agent that answers `echo: <message>`.
    #[arg(long, env = "OH_AGENT", default_value = "echo", value_parser = ["echo"])]
    pub agent: String,
    /// Address of the `/metrics` (Prometheus) and `/healthz` endpoint. Unset: none.
    #[arg(long, env = "OH_WORKER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ms: u64 = s.parse().map_err(|_| "expected milliseconds".to_owned())?;
    if !(300..=600_000).contains(&ms) {
        return Err("must be between 300 and 600000 ms".to_owned());
    }
    Ok(Duration::from_millis(ms))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: u64 = s.parse().map_err(|_| "expected seconds".to_owned())?;
    if secs > 3600 {
        return Err("must be at most 3600 s".to_owned());
    }
    Ok(Duration::from_secs(secs))
}
