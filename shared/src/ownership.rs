//! The owner lease of a session, in Redis (reliability.md §3).
//!
//! - Acquire: `SET {ns}:lease:{sid} {worker}/{nonce} NX PX ttl`.
//! - Renew: a Lua compare-and-`PEXPIRE` that never recreates a missing key.
//! - Release: a Lua compare-and-`DEL`.
//!
//! The lease is for liveness and routing only. Safety (at most one writer) comes from the fence
//! in the event log: every append carries the expected last subject sequence, so a stale owner's
//! append is refused by JetStream even if Redis forgot the lease.

use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::id::{SessionId, WorkerId};
use crate::names::Names;

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// A lease this process holds (or held) on a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The Redis key.
    pub key: String,
    /// The unique value that proves it is ours: `{worker}/{nonce}`.
    pub token: String,
}

/// Tries to take the lease of `sid` for `worker`.
///
/// Returns `None` if someone else holds it.
///
/// # Errors
/// The Redis error if the command could not be run.
pub async fn acquire(
    conn: &mut ConnectionManager,
    names: &Names,
    sid: &SessionId,
    worker: &WorkerId,
    ttl: Duration,
) -> redis::RedisResult<Option<Lease>> {
    let key = names.lease_key(sid);
    let token = format!("{worker}/{}", uuid::Uuid::new_v4().simple());
    let set: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms(ttl))
        .query_async(conn)
        .await?;
    Ok(set.map(|_| Lease { key, token }))
}

/// Extends the lease if it is still ours. `false` means it is lost (expired or taken): the
/// holder must stop the session's side effects at once.
///
/// # Errors
/// The Redis error if the script could not be run (the lease may or may not still be ours).
pub async fn renew(
    conn: &mut ConnectionManager,
    lease: &Lease,
    ttl: Duration,
) -> redis::RedisResult<bool> {
    let n: i64 = redis::Script::new(RENEW)
        .key(&lease.key)
        .arg(&lease.token)
        .arg(ttl_ms(ttl))
        .invoke_async(conn)
        .await?;
    Ok(n == 1)
}

/// Deletes the lease if it is still ours; `false` if it was not.
///
/// # Errors
/// The Redis error if the script could not be run.
pub async fn release(conn: &mut ConnectionManager, lease: &Lease) -> redis::RedisResult<bool> {
    let n: i64 = redis::Script::new(RELEASE)
        .key(&lease.key)
        .arg(&lease.token)
        .invoke_async(conn)
        .await?;
    Ok(n == 1)
}

/// The worker that holds the lease of `sid` now, if any.
///
/// # Errors
/// The Redis error if the lookup failed.
pub async fn owner(
    conn: &mut ConnectionManager,
    names: &Names,
    sid: &SessionId,
) -> redis::RedisResult<Option<String>> {
    let v: Option<String> = redis::cmd("GET")
        .arg(names.lease_key(sid))
        .query_async(conn)
        .await?;
    Ok(v.map(|t| t.split('/').next().unwrap_or_default().to_owned()))
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Opens a Redis connection manager (reconnects by itself) with bounded timeouts.
///
/// # Errors
/// The Redis error if the URL is invalid or the first connection fails.
pub async fn connect(url: &str) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_with_config(client, cfg).await
}
