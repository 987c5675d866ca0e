//! Gateway configuration (flags with `OH_*` environment fallbacks).

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::{AuthTokens, BrokerArgs, parse_auth_tokens};

use crate::origin::{AllowedOrigins, parse_allowed_origins};

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
    /// Bytes a socket may have queued for sending (MiB): events are not queued beyond it
    /// until the client has read (at most one event more), and a client that stays there for
    /// `OH_SLOW_CLIENT_TIMEOUT_MS` is disconnected like a slow one (it resumes by replay).
    #[arg(long, env = "OH_SOCKET_BUFFER_MIB", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub socket_buffer_mib: u32,
    /// How long a client may leave its send buffer full before it is disconnected (ms).
    #[arg(long = "slow-client-timeout-ms", env = "OH_SLOW_CLIENT_TIMEOUT_MS", default_value = "10000", value_parser = parse_ms)]
    pub slow_client_timeout: Duration,
    /// Limit of one REST request (s); a request still running then is answered 503. Socket.IO
    /// (websockets, long-polling) is not subject to it.
    #[arg(long = "request-timeout-s", env = "OH_REQUEST_TIMEOUT_S", default_value = "30", value_parser = parse_secs)]
    pub request_timeout: Duration,
    /// Most time a client may take to send a request's headers (s); the connection is then
    /// closed (slow or half-sent requests; idle keep-alive connections likewise).
    #[arg(long = "header-read-timeout-s", env = "OH_HEADER_READ_TIMEOUT_S", default_value = "10", value_parser = parse_secs)]
    pub header_read_timeout: Duration,
    /// Web origins allowed to call the gateway besides its own and loopback ones, e.g.
    /// `https://oh.example.com` (whose host name is then also served); `*` allows any origin
    /// and host. See `gateway::origin`.
    #[arg(long, env = "OH_ALLOWED_ORIGINS", default_value = "", value_parser = parse_allowed_origins)]
    pub allowed_origins: AllowedOrigins,
    /// Serve single-user mode (no `OH_AUTH_TOKENS`) on a non-loopback address. Off: such a
    /// start is refused, since anyone who reaches the address would be the one user.
    #[arg(long, env = "OH_ALLOW_SINGLE_USER_ON_NETWORK", default_value_t = false)]
    pub allow_single_user_on_network: bool,
    /// A built single-page app to serve at `/` (a folder with `index.html`; any other path that
    /// is not the gateway's own gets its `index.html`). Unset: the built-in page.
    #[arg(long, env = "OH_WEB_ROOT", value_parser = crate::web::parse_web_root)]
    pub web_root: Option<std::path::PathBuf>,
    /// Model names offered to the UI (`GET /api/options/models`, comma-separated); the first
    /// is a new user's default. Any model the configured OpenAI-compatible API serves works.
    #[arg(
        long,
        env = "OH_LLM_MODELS",
        default_value = "gpt-4o",
        value_delimiter = ','
    )]
    pub llm_models: Vec<String>,
    /// Largest `replay_json` trajectory a create accepts (MiB); a larger one gets 413. It is
    /// stored and replayed as events, so it bounds what one request can make the system hold.
    #[arg(long, env = "OH_MAX_REPLAY_MIB", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=30))]
    pub max_replay_mib: u32,
    /// Conversations a user may create per minute, exact across gateways: `off`, `N/min` or
    /// `N/s`, optionally `,BURST`. Default: `60/min,20` with `OH_AUTH_TOKENS`, else `off`.
    #[arg(long, env = "OH_CREATE_RATE", value_parser = crate::limits::parse_rate)]
    pub create_rate: Option<shared::quota::Rate>,
    /// Actions (`oh_user_action`) a user may send per minute, same form. Default:
    /// `600/min,60` with `OH_AUTH_TOKENS`, else `off`.
    #[arg(long, env = "OH_MESSAGE_RATE", value_parser = crate::limits::parse_rate)]
    pub message_rate: Option<shared::quota::Rate>,
    /// Stored conversations per user (0: no cap). Default: 1000 with `OH_AUTH_TOKENS`, else
    /// no cap.
    #[arg(long, env = "OH_MAX_STORED_CONVERSATIONS_PER_USER")]
    pub max_stored_conversations_per_user: Option<u32>,
    /// Open Socket.IO connections per user over all gateways (0: no cap). Default: 100 with
    /// `OH_AUTH_TOKENS`, else no cap.
    #[arg(long, env = "OH_MAX_SOCKETS_PER_USER")]
    pub max_sockets_per_user: Option<u32>,
}

impl Args {
    /// The per-user limits in force: the settings, or the defaults of the mode.
    pub(crate) fn limits(&self) -> crate::limits::Limits {
        use crate::limits as l;
        let multi = !self.auth_tokens.is_single_user();
        let rate = |set: Option<shared::quota::Rate>, default| {
            set.unwrap_or(if multi {
                default
            } else {
                shared::quota::Rate::OFF
            })
        };
        let cap = |set: Option<u32>, default| match set {
            Some(0) => None,
            Some(n) => Some(n),
            None => multi.then_some(default),
        };
        l::Limits {
            create: rate(self.create_rate, l::DEFAULT_CREATE),
            message: rate(self.message_rate, l::DEFAULT_MESSAGE),
            max_stored: cap(
                self.max_stored_conversations_per_user,
                l::DEFAULT_MAX_STORED,
            ),
            max_sockets: cap(self.max_sockets_per_user, l::DEFAULT_MAX_SOCKETS),
        }
    }

    /// Checks that span several settings.
    ///
    /// # Errors
    /// One line naming the settings, for `main` to print before exiting with code 2.
    pub fn validate(&self) -> Result<(), String> {
        if self.auth_tokens.is_single_user()
            && !self.gateway_addr.ip().is_loopback()
            && !self.allow_single_user_on_network
        {
            return Err(format!(
                "error: single-user mode (no OH_AUTH_TOKENS) on non-loopback address {}: set \
                 --auth-tokens, bind --gateway-addr to loopback, or set \
                 --allow-single-user-on-network",
                self.gateway_addr
            ));
        }
        Ok(())
    }
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
