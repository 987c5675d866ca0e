//! Presence: which gateways have sockets on a session, both sides of it.
//!
//! A gateway lists itself in the Redis sorted set `{ns}:presence:{sid}` while it has sockets on
//! the session ([`Presence::enter`], refreshed every [`REFRESH`]; [`Presence::leave`] when the
//! last socket goes). Each entry's score is its expiry time, so a crashed gateway's entry stops
//! counting by itself, and the key itself expires when no gateway refreshes it. The owning
//! worker reads it ([`is_watched`]) to passivate sessions nobody watches.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::id::SessionId;
use crate::names::Names;

/// How long an entry counts without a refresh.
const TTL_MS: i64 = 15_000;
/// How often a gateway refreshes its entries (well inside [`TTL_MS`]).
pub const REFRESH: Duration = Duration::from_secs(5);

/// One gateway's entries in the presence sets.
#[derive(Clone)]
pub struct Presence {
    redis: ConnectionManager,
    names: Names,
    gateway_id: Arc<str>,
}

impl Presence {
    /// The presence of gateway `gateway_id`.
    pub fn new(redis: ConnectionManager, names: Names, gateway_id: &str) -> Self {
        Self {
            redis,
            names,
            gateway_id: Arc::from(gateway_id),
        }
    }

    /// Lists (or refreshes) this gateway on each session, in one round trip.
    ///
    /// # Errors
    /// The Redis error if the pipeline could not be run (entries expire by themselves).
    pub async fn enter(&self, sids: &[SessionId]) -> redis::RedisResult<()> {
        if sids.is_empty() {
            return Ok(());
        }
        let expiry = chrono::Utc::now().timestamp_millis() + TTL_MS;
        let mut pipe = redis::pipe();
        for sid in sids {
            let key = self.names.presence_key(sid);
            pipe.cmd("ZADD")
                .arg(&key)
                .arg(expiry)
                .arg(&*self.gateway_id)
                .ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(TTL_MS * 2).ignore();
        }
        pipe.query_async(&mut self.redis.clone()).await
    }

    /// Removes this gateway from a session.
    ///
    /// # Errors
    /// The Redis error if the command could not be run (the entry expires by itself).
    pub async fn leave(&self, sid: &SessionId) -> redis::RedisResult<()> {
        redis::cmd("ZREM")
            .arg(self.names.presence_key(sid))
            .arg(&*self.gateway_id)
            .query_async(&mut self.redis.clone())
            .await
    }
}

/// Whether some gateway has a socket on the session (an entry that has not expired). A read
/// only: stale entries go with the key's own expiry.
///
/// # Errors
/// The Redis error if the command could not be run.
pub async fn is_watched(
    conn: &mut ConnectionManager,
    names: &Names,
    sid: &SessionId,
) -> redis::RedisResult<bool> {
    let now = chrono::Utc::now().timestamp_millis();
    let n: i64 = redis::cmd("ZCOUNT")
        .arg(names.presence_key(sid))
        .arg(format!("({now}"))
        .arg("+inf")
        .query_async(conn)
        .await?;
    Ok(n > 0)
}
