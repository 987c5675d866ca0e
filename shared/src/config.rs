//! Configuration shared by both binaries: clap flags with environment fallbacks
//! (flag > env > default), parsed into typed values once at startup.
//!
//! Bad configuration ends the process with one line naming the setting and exit code 2
//! ([`parse_or_exit`]).

use std::collections::HashMap;
use std::sync::Arc;

use crate::creds::{BrokerUrl, parse_url_file};
use crate::id::UserId;
use crate::names::Names;

/// Where NATS and Redis are, with this process's credentials, and the namespace of every name
/// in them.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// NATS server URL (JetStream enabled), with the role's user:
    /// `nats://USER:PASSWORD@HOST:PORT`. Never logged with its password.
    #[arg(long, env = "OH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: BrokerUrl,
    /// File holding the NATS URL (read once at startup; wins over `OH_NATS_URL`), so the
    /// password stays out of the environment.
    #[arg(long, env = "OH_NATS_URL_FILE", value_parser = parse_url_file)]
    pub nats_url_file: Option<BrokerUrl>,
    /// Redis URL, with the role's ACL user: `redis://USER:PASSWORD@HOST:PORT`.
    #[arg(long, env = "OH_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: BrokerUrl,
    /// File holding the Redis URL (read once at startup; wins over `OH_REDIS_URL`).
    #[arg(long, env = "OH_REDIS_URL_FILE", value_parser = parse_url_file)]
    pub redis_url_file: Option<BrokerUrl>,
    /// Prefix of every subject, stream, bucket and key (tests use one per test).
    #[arg(long = "namespace", env = "OH_NAMESPACE", default_value = "oh", value_parser = parse_names)]
    pub names: Names,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "OH_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    /// OpenTelemetry traces: base URL of an OTLP/HTTP receiver (a collector, Jaeger, Tempo),
    /// e.g. `http://otel-collector:4318`; spans are posted to `<base>/v1/traces` as protobuf.
    /// Unset: no traces (and no trace headers on NATS messages).
    #[arg(long, env = "OH_OTLP_ENDPOINT", value_parser = crate::telemetry::parse_otlp_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// Most events in one conversation's log; a full log refuses more (the client gets an
    /// error). Give every process the same value.
    #[arg(long, env = "OH_MAX_EVENTS_PER_CONVERSATION", default_value_t = 100_000, value_parser = clap::value_parser!(i64).range(100..=100_000_000))]
    pub max_events_per_conversation: i64,
    /// Bytes (MiB) of actions the queue holds before it refuses more (workers take them in
    /// milliseconds; this bounds a backlog with no worker).
    #[arg(long, env = "OH_QUEUE_MAX_MIB", default_value_t = 1024, value_parser = clap::value_parser!(i64).range(1..=1_048_576))]
    pub queue_max_mib: i64,
    /// Hours after which an action or start request no worker took is discarded.
    #[arg(long, env = "OH_QUEUE_MAX_AGE_H", default_value_t = 168, value_parser = clap::value_parser!(u64).range(1..=87_600))]
    pub queue_max_age_h: u64,
    /// Copies JetStream keeps of every stream (event logs, queues, metadata, snapshots,
    /// blobs): 1 on a single nats-server, 3 (or 5) on a cluster, so losing a node loses
    /// nothing. Applies when a stream is created (and, by workers, to existing streams).
    #[arg(long, env = "OH_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub stream_replicas: u8,
    /// Seconds within which JetStream stores one copy of messages that share a msg id (client
    /// retries, append retries). Retries of a user action after it are still applied once: its
    /// owner checks the client's msg id against the log.
    #[arg(long, env = "OH_DUPLICATE_WINDOW_S", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub duplicate_window_s: u64,
}

impl BrokerArgs {
    /// The NATS URL in effect (`OH_NATS_URL_FILE`'s, else `OH_NATS_URL`).
    pub fn nats(&self) -> &BrokerUrl {
        self.nats_url_file.as_ref().unwrap_or(&self.nats_url)
    }

    /// The Redis URL in effect (`OH_REDIS_URL_FILE`'s, else `OH_REDIS_URL`).
    pub fn redis(&self) -> &BrokerUrl {
        self.redis_url_file.as_ref().unwrap_or(&self.redis_url)
    }

    /// The streams' storage limits.
    pub fn store_limits(&self) -> crate::store::StoreLimits {
        crate::store::StoreLimits {
            max_events_per_conversation: self.max_events_per_conversation,
            queue_max_bytes: self.queue_max_mib << 20,
            queue_max_age: std::time::Duration::from_secs(self.queue_max_age_h * 3600),
            replicas: usize::from(self.stream_replicas),
            duplicate_window: std::time::Duration::from_secs(self.duplicate_window_s),
        }
    }
}

fn parse_names(s: &str) -> Result<Names, String> {
    Names::new(s).map_err(|e| e.to_string())
}

/// Bearer tokens and the users they stand for (`OH_AUTH_TOKENS=token=user,token2=user2`).
/// Empty means single-user mode: every caller is user `local`.
#[derive(Debug, Clone, Default)]
pub struct AuthTokens(Arc<HashMap<[u8; 32], UserId>>);

/// Tokens are kept and looked up by their SHA-256: the time a lookup takes depends on the
/// digest, not on how many leading bytes of a real token a guess got right.
fn digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// The token of an `Authorization` header value: `Bearer <token>`, the scheme in any case.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl AuthTokens {
    /// Parses `token=user,token2=user2`. Empty string: single-user mode.
    ///
    /// # Errors
    /// A message naming the bad entry.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut map = HashMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((token, user)) = entry.split_once('=') else {
                return Err("expected token=user entries separated by ','".to_owned());
            };
            let token = token.trim();
            if token.len() < 8 {
                return Err("tokens must be at least 8 characters".to_owned());
            }
            let user = UserId::parse(user.trim()).map_err(|e| e.to_string())?;
            if map.insert(digest(token), user).is_some() {
                return Err("a token appears twice".to_owned());
            }
        }
        Ok(Self(Arc::new(map)))
    }

    /// True when no tokens are configured (single-user mode).
    pub fn is_single_user(&self) -> bool {
        self.0.is_empty()
    }

    /// The user a presented token stands for. In single-user mode every caller (with or
    /// without a token) is [`UserId::local`].
    pub fn user_for(&self, token: Option<&str>) -> Option<UserId> {
        if self.is_single_user() {
            return Some(UserId::local());
        }
        token.and_then(|t| self.0.get(&digest(t)).cloned())
    }
}

/// clap value parser for [`AuthTokens`].
///
/// # Errors
/// See [`AuthTokens::parse`].
pub fn parse_auth_tokens(s: &str) -> Result<AuthTokens, String> {
    AuthTokens::parse(s)
}

/// Parses the process arguments; on error prints one line naming the setting and exits with
/// code 2 (help and version print normally and exit 0).
pub fn parse_or_exit<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                // Printing help can only fail if stdout is gone; nothing left to report then.
                let _ = err.print();
                std::process::exit(0);
            }
            let text = err.to_string();
            let mut line = text
                .lines()
                .next()
                .unwrap_or("invalid configuration")
                .to_owned();
            // A broker URL may hold a password: name the setting and the reason, not the value.
            if let Some(clap::error::ContextValue::String(arg)) =
                err.get(clap::error::ContextKind::InvalidArg)
                && arg.contains("-url")
            {
                let reason = std::error::Error::source(&err)
                    .map(ToString::to_string)
                    .unwrap_or_default();
                line = format!("error: invalid value for '{arg}' (not shown): {reason}");
            }
            eprintln!("{line} (flags also read their OH_* environment variable; see --help)");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn auth_tokens_parse_and_refuse() {
        let t = AuthTokens::parse("secret-aaa=alice, secret-bbb=bob").unwrap();
        assert_eq!(t.user_for(Some("secret-aaa")).unwrap().as_str(), "alice");
        assert_eq!(t.user_for(Some("nope")), None);
        assert_eq!(t.user_for(None), None);
        let single = AuthTokens::parse("").unwrap();
        assert_eq!(single.user_for(None), Some(UserId::local()));
        assert!(AuthTokens::parse("novalue").is_err());
        assert!(AuthTokens::parse("short=bob").is_err());
        assert!(AuthTokens::parse("secret-aaa=al.ice").is_err());
        assert!(AuthTokens::parse("secret-aaa=a,secret-aaa=b").is_err());
    }
}
