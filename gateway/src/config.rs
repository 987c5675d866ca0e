//! Gateway configuration (flags with `OH_*` environment fallbacks).

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::{AuthTokens, BrokerArgs, parse_auth_tokens};

/// Gateway flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "gateway",
    about = "Socket.IO and REST gateway for agent conversations"
)]
pub struct Args {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Address to listen on (REST, Socket.IO at /socket.io, /metrics, /healthz, /readyz).
    #[arg(long, env = "OH_GATEWAY_ADDR", default_value = "127.0.0.1:3000")]
    pub gateway_addr: SocketAddr,
    /// Bearer tokens: `token=user,token2=user2`. Unset or empty: single-user mode (user `local`).
    #[arg(long, env = "OH_AUTH_TOKENS", default_value = "", value_parser = parse_auth_tokens, hide_env_values = true)]
    pub auth_tokens: AuthTokens,
    /// Packets a socket may have queued for sending; a client that keeps it full for
    /// `OH_SLOW_CLIENT_TIMEOUT_MS` is disconnected (it resumes by replay).
    #[arg(long, env = "OH_SOCKET_BUFFER", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    pub socket_buffer: u32,
    /// How long a client may leave its send buffer full before it is disconnected (ms).
    #[arg(long = "slow-client-timeout-ms", env = "OH_SLOW_CLIENT_TIMEOUT_MS", default_value = "10000", value_parser = parse_ms)]
    pub slow_client_timeout: Duration,
    /// Limit of one REST request (s); a request still running then is answered 503. Socket.IO
    /// (websockets, long-polling) is not subject to it.
    #[arg(long = "request-timeout-s", env = "OH_REQUEST_TIMEOUT_S", default_value = "30", value_parser = parse_secs)]
    pub request_timeout: Duration,
}

fn parse_ms(s: &str) -> Result<Duration, String> {
    let ms: u64 = s.parse().map_err(|_| "expected milliseconds".to_owned())?;
    if !(100..=600_000).contains(&ms) {
        return Err("must be between 100 and 600000 ms".to_owned());
    }
    Ok(Duration::from_millis(ms))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: u64 = s.parse().map_err(|_| "expected seconds".to_owned())?;
    if !(1..=3600).contains(&secs) {
        return Err("must be between 1 and 3600 s".to_owned());
    }
    Ok(Duration::from_secs(secs))
}
