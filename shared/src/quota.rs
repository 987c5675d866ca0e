//! Per-user limits that hold exactly across gateways: each is one Redis script, so the check
//! and the update are one atomic step whichever gateway runs it.
//!
//! - **Rate** ([`take`]): a token bucket per user and kind (`create`, `message`) in
//!   `{ns}:rate:{kind}:{uid}`: `burst` tokens, refilled at `per_minute`; the script reads
//!   Redis' own clock (`TIME`), so gateways' clocks do not matter. Refused: the seconds until
//!   a token is back.
//! - **Capped sets** ([`admit`]/[`release`]): the user's stored conversations
//!   (`{ns}:convs:{uid}`, members are conversation ids, no expiry) and open sockets
//!   (`{ns}:sockets:{uid}`, members `{gateway}:{socket}` scored by an expiry the owning
//!   gateway refreshes, so a dead gateway's sockets stop counting after [`SOCKET_TTL`]).
//!
//! Redis is rebuildable state: if it is emptied, the buckets refill and the sets start
//! empty (conversations created before are not counted until the set is rebuilt, which
//! [`admit`] callers may do from the metadata stream).

use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::id::UserId;
use crate::names::Names;

/// How long a socket counts without its gateway refreshing it.
pub const SOCKET_TTL: Duration = Duration::from_secs(60);

/// A rate: `per_minute` tokens refilled, at most `burst` at once. `per_minute == 0`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

impl Rate {
    /// No limit.
    pub const OFF: Rate = Rate {
        per_minute: 0,
        burst: 0,
    };

    /// Whether this rate limits anything.
    pub fn is_off(&self) -> bool {
        self.per_minute == 0
    }
}

/// Token bucket: KEYS[1] bucket; ARGV rate per minute, burst. Returns {1, 0} if a token was
/// taken, else {0, milliseconds until one is back}.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per_ms = tonumber(ARGV[1]) / 60000
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + (now - at) * per_ms)
local ok = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  ok = 1
else
  wait = math.ceil((1 - tokens) / per_ms)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / per_ms) + 1000)
return {ok, wait}
";

/// Capped set: KEYS[1] set (a sorted set); ARGV cap, member, expiry in ms (0: never).
/// Drops expired members, then adds `member` if it is there already or the set is under
/// `cap`. Returns 1 if admitted, 0 if at the cap.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[3])
local score = '+inf'
if ttl > 0 then score = now + ttl end
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], score, ARGV[2])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], score, ARGV[2])
return 1
";

/// What a limited request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Over the rate: retry after this long.
    Limited(Duration),
}

/// Takes one token of `kind` for `uid` (see the module docs).
///
/// # Errors
/// Redis failed.
pub async fn take<C: ConnectionLike>(
    redis: &mut C,
    names: &Names,
    kind: &str,
    uid: &UserId,
    rate: Rate,
) -> redis::RedisResult<Verdict> {
    if rate.is_off() {
        return Ok(Verdict::Allowed);
    }
    let (ok, wait_ms): (i64, i64) = redis::Script::new(TAKE)
        .key(names.rate_key(kind, uid))
        .arg(rate.per_minute)
        .arg(rate.burst.max(1))
        .invoke_async(redis)
        .await?;
    Ok(if ok == 1 {
        Verdict::Allowed
    } else {
        Verdict::Limited(Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)))
    })
}

/// Which capped set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capped {
    /// Stored conversations (never expire; removed on delete).
    Conversations,
    /// Open sockets (expire unless refreshed).
    Sockets,
}

fn key(names: &Names, set: Capped, uid: &UserId) -> String {
    match set {
        Capped::Conversations => names.user_conversations_key(uid),
        Capped::Sockets => names.user_sockets_key(uid),
    }
}

/// Adds `member` to the user's `set` unless it holds `cap` members already (a member that is
/// there is refreshed). Returns whether it was admitted.
///
/// # Errors
/// Redis failed.
pub async fn admit<C: ConnectionLike>(
    redis: &mut C,
    names: &Names,
    set: Capped,
    uid: &UserId,
    member: &str,
    cap: u32,
) -> redis::RedisResult<bool> {
    let ttl_ms = match set {
        Capped::Conversations => 0,
        Capped::Sockets => u64::try_from(SOCKET_TTL.as_millis()).unwrap_or(60_000),
    };
    let admitted: i64 = redis::Script::new(ADMIT)
        .key(key(names, set, uid))
        .arg(cap)
        .arg(member)
        .arg(ttl_ms)
        .invoke_async(redis)
        .await?;
    Ok(admitted == 1)
}

/// Refreshes sockets this gateway still holds (their expiry moves on).
///
/// # Errors
/// Redis failed.
pub async fn refresh_sockets<C: ConnectionLike>(
    redis: &mut C,
    names: &Names,
    held: &[(UserId, String)],
) -> redis::RedisResult<()> {
    if held.is_empty() {
        return Ok(());
    }
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(redis).await?;
    let expiry = secs * 1000 + micros / 1000 + u64::try_from(SOCKET_TTL.as_millis()).unwrap_or(0);
    let mut pipe = redis::pipe();
    for (uid, member) in held {
        pipe.cmd("ZADD")
            .arg(names.user_sockets_key(uid))
            .arg("XX")
            .arg(expiry)
            .arg(member)
            .ignore();
    }
    pipe.query_async(redis).await
}

/// Removes `member` from the user's `set`.
///
/// # Errors
/// Redis failed.
pub async fn release<C: ConnectionLike>(
    redis: &mut C,
    names: &Names,
    set: Capped,
    uid: &UserId,
    member: &str,
) -> redis::RedisResult<()> {
    redis::cmd("ZREM")
        .arg(key(names, set, uid))
        .arg(member)
        .query_async(redis)
        .await
}
