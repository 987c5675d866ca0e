//! Gateway configuration (flags with `OH_*` environment fallbacks).

use std::net::SocketAddr;

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
}
