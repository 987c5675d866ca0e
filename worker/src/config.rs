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
    /// Most running conversations per user (OpenHands' `max_concurrent_conversations`),
    /// exact across workers. A start beyond it is refused: the session goes to `error` with
    /// reason `AGENT_ERROR$TOO_MANY_CONVERSATIONS`. Unset: no limit.
    #[arg(long, env = "OH_MAX_CONVERSATIONS_PER_USER", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_conversations_per_user: Option<u32>,
    /// Seconds without any connected client (and the agent not running) after which a session
    /// is passivated: state kept in the log, lease and slot released. 0 disables.
    #[arg(long = "close-delay-s", env = "OH_CLOSE_DELAY_S", default_value = "300", value_parser = parse_secs)]
    pub close_delay: Duration,
    /// Test hook of the echo agent: a message `/crash` aborts the worker process mid-step
    /// (to test failover and poison input). Never enable in production.
    #[arg(long, env = "OH_ECHO_FAULTS", default_value_t = false)]
    pub echo_faults: bool,
    /// Most steps (LLM call plus action) in one turn before it ends in `error`.
    #[arg(long, env = "OH_MAX_ITERATIONS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_iterations: u32,
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
