//! The owner lease of a session, in Redis, and the lists that follow leases: the should-run
//! set (sessions the sweeper resumes when they lose their owner) and per-user running slots.
//!
//! - Acquire: `SET {ns}:lease:{sid} {worker}/{nonce} NX PX ttl`.
//! - Renew: a Lua compare-and-`PEXPIRE` that never recreates a missing key (one script run
//!   renews a whole batch).
//! - Release: a Lua compare-and-`DEL`.
//!
//! The lease is for liveness and routing only. Safety (at most one writer) comes from the fence
//! in the event log: every append carries the expected last subject sequence, so a stale owner's
//! append is refused by JetStream even if Redis forgot the lease.

use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::id::{SessionId, WorkerId};
use crate::names::Names;

/// Renews every lease in `KEYS` (tokens in `ARGV[2..]`, time to live `ARGV[1]`): for each, 1 if
/// extended, 0 if another token holds it, -1 if the key is gone (never recreated here).
const RENEW: &str = r"
local out = {}
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v == ARGV[i + 1] then
    out[i] = redis.call('PEXPIRE', KEYS[i], ARGV[1])
  elseif not v then
    out[i] = -1
  else
    out[i] = 0
  end
end
return out";

/// Reserves one of a user's running-conversation slots, atomically across every worker, for
/// each `KEYS[i]` (the user's sorted set) and `ARGV[i + 4]` (the session): drop expired
/// entries, then add (or refresh) the session if it is already counted or the user is under
/// the limit `ARGV[3]`. Scores are expiry times (`ARGV[2]`; now is `ARGV[1]`), refreshed by
/// the holder's renew loop, so a crashed worker's entries free themselves; the set itself
/// lives `ARGV[4]` ms unless touched.
const RESERVE: &str = r"
local out = {}
for i = 1, #KEYS do
  local k, sid = KEYS[i], ARGV[i + 4]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', ARGV[1])
  if redis.call('ZSCORE', k, sid) or redis.call('ZCARD', k) < tonumber(ARGV[3]) then
    redis.call('ZADD', k, ARGV[2], sid)
    redis.call('PEXPIRE', k, ARGV[4])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out";

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

impl Lease {
    /// This acquisition's own nonce: unique per claim, it scopes the claim's append ids.
    pub fn claim_id(&self) -> &str {
        self.token.rsplit('/').next().unwrap_or_default()
    }
}

/// The sweeper's lock (one sweeper at a time across workers): a lease on `{ns}:sweeper` that
/// its holder keeps by renewing (or reacquiring) it.
pub fn sweeper_lock(names: &Names, worker: &WorkerId) -> Lease {
    Lease {
        key: names.sweeper_key(),
        token: new_token(worker),
    }
}

fn new_token(worker: &WorkerId) -> String {
    format!("{worker}/{}", uuid::Uuid::new_v4().simple())
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
    let token = new_token(worker);
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

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours; extended.
    Renewed,
    /// Someone else holds it: stop the session's side effects at once.
    Taken,
    /// The key is gone (expired, or Redis lost its data). Never recreated by renew; the holder
    /// may try [`reacquire`], which is safe because every append is fenced in the log.
    Missing,
}

/// Extends the lease if it is still ours; never recreates a missing key.
///
/// # Errors
/// The Redis error if the script could not be run (the lease may or may not still be ours).
pub async fn renew(
    conn: &mut ConnectionManager,
    lease: &Lease,
    ttl: Duration,
) -> redis::RedisResult<Renewal> {
    let found = renew_many(conn, &[lease], ttl).await?;
    Ok(found.first().copied().unwrap_or(Renewal::Taken))
}

/// [`renew`] for many leases in one script run (one round trip, one Redis command): what each
/// renewal found, in the order of `leases`.
///
/// # Errors
/// The Redis error if the script could not be run (none of the leases is known to be renewed).
pub async fn renew_many(
    conn: &mut ConnectionManager,
    leases: &[&Lease],
    ttl: Duration,
) -> redis::RedisResult<Vec<Renewal>> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let script = redis::Script::new(RENEW);
    let mut call = script.prepare_invoke();
    call.arg(ttl_ms(ttl));
    for lease in leases {
        call.key(&lease.key).arg(&lease.token);
    }
    let found: Vec<i64> = call.invoke_async(conn).await?;
    if found.len() != leases.len() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "lease renewal: one answer per lease expected",
        )));
    }
    Ok(found
        .into_iter()
        .map(|n| match n {
            1 => Renewal::Renewed,
            -1 => Renewal::Missing,
            _ => Renewal::Taken,
        })
        .collect())
}

/// Takes a missing lease back with the same token (`SET NX PX`). `false` if someone else got
/// it first.
///
/// # Errors
/// The Redis error if the command could not be run.
pub async fn reacquire(
    conn: &mut ConnectionManager,
    lease: &Lease,
    ttl: Duration,
) -> redis::RedisResult<bool> {
    let set: Option<String> = redis::cmd("SET")
        .arg(&lease.key)
        .arg(&lease.token)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms(ttl))
        .query_async(conn)
        .await?;
    Ok(set.is_some())
}

/// Counts `sid` among `uid`'s running conversations if that keeps them at or under `limit`
/// (exact across workers: one Lua script). `hold` is how long the entry lives unless
/// refreshed (again by this call, from the renew loop). `false`: the user is at the limit.
///
/// # Errors
/// The Redis error if the script could not be run.
pub async fn reserve_user_slot(
    conn: &mut ConnectionManager,
    names: &Names,
    uid: &crate::id::UserId,
    sid: &SessionId,
    limit: u32,
    hold: Duration,
) -> redis::RedisResult<bool> {
    let got = reserve_user_slots(conn, names, &[(uid, sid)], limit, hold).await?;
    Ok(got.first().copied().unwrap_or(false))
}

/// [`reserve_user_slot`] for many sessions in one script run: whether each is counted, in the
/// order of `slots`.
///
/// # Errors
/// The Redis error if the script could not be run.
pub async fn reserve_user_slots(
    conn: &mut ConnectionManager,
    names: &Names,
    slots: &[(&crate::id::UserId, &SessionId)],
    limit: u32,
    hold: Duration,
) -> redis::RedisResult<Vec<bool>> {
    if slots.is_empty() {
        return Ok(Vec::new());
    }
    let now = chrono::Utc::now().timestamp_millis();
    let hold_ms = i64::try_from(hold.as_millis()).unwrap_or(i64::MAX / 4);
    let script = redis::Script::new(RESERVE);
    let mut call = script.prepare_invoke();
    call.arg(now)
        .arg(now.saturating_add(hold_ms))
        .arg(limit)
        .arg(hold_ms.saturating_mul(4));
    for (uid, sid) in slots {
        call.key(names.user_running_key(uid)).arg(sid.as_str());
    }
    let got: Vec<i64> = call.invoke_async(conn).await?;
    if got.len() != slots.len() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "user slots: one answer per session expected",
        )));
    }
    Ok(got.into_iter().map(|n| n == 1).collect())
}

/// Gives back a user slot (session ended).
///
/// # Errors
/// The Redis error if the command could not be run.
pub async fn release_user_slot(
    conn: &mut ConnectionManager,
    names: &Names,
    uid: &crate::id::UserId,
    sid: &SessionId,
) -> redis::RedisResult<()> {
    redis::cmd("ZREM")
        .arg(names.user_running_key(uid))
        .arg(sid.as_str())
        .query_async(conn)
        .await
}

/// A member of the should-run set: `{sid}:{uid}` (neither id can contain `:`).
fn should_run_member(sid: &SessionId, uid: &crate::id::UserId) -> String {
    format!("{sid}:{uid}")
}

/// The sessions that should be running and have no lease (their owner died or let go without
/// stopping them): the sweeper's work list. Two round trips, whatever the number of sessions
/// (O(sessions): the sweeper runs it only when an orphan may exist, see `worker::sweep`).
/// Members that do not parse are skipped.
///
/// # Errors
/// The Redis error if a command could not be run.
pub async fn orphans(
    conn: &mut ConnectionManager,
    names: &Names,
) -> redis::RedisResult<Vec<(SessionId, crate::id::UserId)>> {
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(names.should_run_key())
        .query_async(conn)
        .await?;
    let parsed: Vec<(SessionId, crate::id::UserId)> = members
        .iter()
        .filter_map(|m| {
            let (s, u) = m.split_once(':')?;
            Some((SessionId::parse(s).ok()?, crate::id::UserId::parse(u).ok()?))
        })
        .collect();
    if parsed.is_empty() {
        return Ok(parsed);
    }
    let mut pipe = redis::pipe();
    for (sid, _) in &parsed {
        pipe.cmd("EXISTS").arg(names.lease_key(sid));
    }
    let owned: Vec<bool> = pipe.query_async(conn).await?;
    Ok(parsed
        .into_iter()
        .zip(owned)
        .filter_map(|(pair, owned)| (!owned).then_some(pair))
        .collect())
}

/// A worker's heartbeat, written after a renewal round that renewed every lease it holds:
/// lives `ttl` (the leases' own), and lists the worker among those the sweeper watches.
///
/// # Errors
/// The Redis error if a command could not be run.
pub async fn heartbeat(
    conn: &mut ConnectionManager,
    names: &Names,
    worker: &WorkerId,
    ttl: Duration,
) -> redis::RedisResult<()> {
    redis::pipe()
        .cmd("SET")
        .arg(names.worker_alive_key(worker))
        .arg(1)
        .arg("PX")
        .arg(ttl_ms(ttl))
        .ignore()
        .cmd("SADD")
        .arg(names.workers_key())
        .arg(worker.as_str())
        .ignore()
        .query_async(conn)
        .await
}

/// What the sweeper checks every tick, in two round trips: whether a sweep was asked for since
/// the last call (the request is cleared), and the listed workers whose heartbeat is gone
/// (their leases have expired or are about to).
///
/// # Errors
/// The Redis error if a command could not be run.
pub async fn sweep_cues(
    conn: &mut ConnectionManager,
    names: &Names,
) -> redis::RedisResult<(bool, Vec<String>)> {
    let (asked, workers): (Option<String>, Vec<String>) = redis::pipe()
        .cmd("GETDEL")
        .arg(names.sweep_due_key())
        .cmd("SMEMBERS")
        .arg(names.workers_key())
        .query_async(conn)
        .await?;
    let asked = asked.is_some();
    if workers.is_empty() {
        return Ok((asked, workers));
    }
    // A member that is not a worker id is never alive: it is forgotten like a silent worker.
    let ids: Vec<Option<WorkerId>> = workers.iter().map(|w| WorkerId::parse(w).ok()).collect();
    let mut pipe = redis::pipe();
    for id in ids.iter().flatten() {
        pipe.cmd("EXISTS").arg(names.worker_alive_key(id));
    }
    let mut alive = if ids.iter().any(Option::is_some) {
        pipe.query_async::<Vec<bool>>(conn).await?.into_iter()
    } else {
        Vec::new().into_iter()
    };
    let silent = workers
        .into_iter()
        .zip(ids)
        .filter_map(|(w, id)| {
            let alive = id.is_some() && alive.next().unwrap_or(false);
            (!alive).then_some(w)
        })
        .collect();
    Ok((asked, silent))
}

/// Takes workers off the watched list (silent long enough that their leases are swept; one
/// that is alive after all puts itself back with its next heartbeat).
///
/// # Errors
/// The Redis error if the command could not be run.
pub async fn forget_workers(
    conn: &mut ConnectionManager,
    names: &Names,
    workers: &[String],
) -> redis::RedisResult<()> {
    if workers.is_empty() {
        return Ok(());
    }
    redis::cmd("SREM")
        .arg(names.workers_key())
        .arg(workers)
        .query_async(conn)
        .await
}

/// A worker leaving cleanly (its sessions handed back): no heartbeat, off the watched list.
///
/// # Errors
/// The Redis error if a command could not be run.
pub async fn retire(
    conn: &mut ConnectionManager,
    names: &Names,
    worker: &WorkerId,
) -> redis::RedisResult<()> {
    redis::pipe()
        .cmd("DEL")
        .arg(names.worker_alive_key(worker))
        .ignore()
        .cmd("SREM")
        .arg(names.workers_key())
        .arg(worker.as_str())
        .ignore()
        .query_async(conn)
        .await
}

/// Asks the sweeper to look now: a session that should run was let go of without its resume
/// being queued (a claim abandoned, a resume request not confirmed).
///
/// # Errors
/// The Redis error if the command could not be run.
pub async fn request_sweep(conn: &mut ConnectionManager, names: &Names) -> redis::RedisResult<()> {
    redis::cmd("SET")
        .arg(names.sweep_due_key())
        .arg(1)
        .query_async(conn)
        .await
}

/// Records that `sid` should be running (the sweeper resumes it if it loses its owner).
///
/// # Errors
/// The Redis error if the command could not be run.
pub async fn mark_should_run(
    conn: &mut ConnectionManager,
    names: &Names,
    uid: &crate::id::UserId,
    sid: &SessionId,
) -> redis::RedisResult<()> {
    redis::cmd("SADD")
        .arg(names.should_run_key())
        .arg(should_run_member(sid, uid))
        .query_async(conn)
        .await
}

/// Records that `sid` should no longer run (stopped, passivated, deleted).
///
/// # Errors
/// The Redis error if the command could not be run.
pub async fn unmark_should_run(
    conn: &mut ConnectionManager,
    names: &Names,
    uid: &crate::id::UserId,
    sid: &SessionId,
) -> redis::RedisResult<()> {
    redis::cmd("SREM")
        .arg(names.should_run_key())
        .arg(should_run_member(sid, uid))
        .query_async(conn)
        .await
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

/// Opens a Redis connection manager (reconnects by itself) with bounded timeouts, as the
/// URL's ACL user (`redis://USER:PASSWORD@HOST:PORT`).
///
/// # Errors
/// The Redis error if the URL is invalid, the credentials are refused or the first connection
/// fails.
pub async fn connect(url: &crate::creds::BrokerUrl) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(url.expose())?;
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_with_config(client, cfg).await
}
