//! Renewal of every lease this worker holds.
//!
//! Every `ttl/4` each held lease is renewed by compare-and-`PEXPIRE` (never recreated), up to
//! [`BATCH`] leases per Redis script run: an idle worker's cost is a few script runs per tick,
//! not one round trip per session. A lease
//! that is no longer ours cancels its session at once. A lease whose renewal keeps failing
//! (Redis unreachable, or this process starved) cancels its session once `3/4 ttl` have passed
//! since the last renewal that was *sent* and succeeded, i.e. before the lease could have
//! expired and been taken by another worker (self-fencing on the local monotonic clock); two
//! late ticks are tolerated before that.
//!
//! After a round that renewed every lease, the worker writes its heartbeat (same time to live):
//! the sweeper looks for orphaned sessions when a heartbeat is gone (`crate::sweep`).
//!
//! A worker that cannot reach NATS cannot run its sessions (no actions in, no events out), so
//! it must not keep them from the workers that can: while the NATS connection is down
//! (detected by the client's pings, every [`nats_ping_interval`]) no lease is renewed, the
//! sessions self-fence as above, and their leases expire for another worker to take.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shared::id::{SessionId, UserId};
use shared::ownership::{self, Lease, Renewal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Ctx;

struct Held {
    uid: UserId,
    lease: Lease,
    lost: CancellationToken,
    /// Told when Redis had lost the lease (and so the session's status): the session writes
    /// its whole status again.
    redis_lost: Arc<tokio::sync::Notify>,
    renewed_at: Instant,
    /// `true` while the session holds the lease. A renewal runs under this lock and does
    /// nothing once it is `false`, so one in flight while the session ends cannot take a
    /// released lease back or re-mark the session as should-run.
    live: Arc<tokio::sync::Mutex<bool>>,
}

/// The leases held by this worker.
#[derive(Clone, Default)]
pub(crate) struct Registry(Arc<Mutex<HashMap<SessionId, Held>>>);

impl Registry {
    /// Starts renewing `lease`; `lost` is cancelled when it can no longer be trusted;
    /// `redis_lost` is told when Redis had lost it (taken back: the status must be rewritten).
    pub(crate) fn insert(
        &self,
        sid: SessionId,
        uid: UserId,
        lease: Lease,
        lost: CancellationToken,
        redis_lost: Arc<tokio::sync::Notify>,
    ) {
        let held = Held {
            uid,
            lease,
            lost,
            redis_lost,
            renewed_at: Instant::now(),
            live: Arc::new(tokio::sync::Mutex::new(true)),
        };
        self.lock().insert(sid, held);
    }

    /// Stops renewing (before a release): waits for a renewal in flight to finish, so none
    /// touches Redis for this session afterwards.
    pub(crate) async fn remove(&self, sid: &SessionId) {
        let held = self.lock().remove(sid);
        if let Some(h) = held {
            *h.live.lock().await = false;
        }
    }

    /// Whether this worker holds `sid`'s lease.
    pub(crate) fn holds(&self, sid: &SessionId) -> bool {
        self.lock().contains_key(sid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Held>> {
        // A poisoned lock only means another thread panicked while holding it; the map is
        // still consistent (every operation on it is a single insert/remove).
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How many leases one Redis script run renews.
const BATCH: usize = 512;

/// Missing leases taken back at once (each is a few round trips).
const TAKE_BACK_IN_FLIGHT: usize = 64;

/// A lease to renew this tick, with its session's `live` lock held for the whole renewal.
struct Renewing {
    sid: SessionId,
    uid: UserId,
    lease: Lease,
    redis_lost: Arc<tokio::sync::Notify>,
    _live: tokio::sync::OwnedMutexGuard<bool>,
}

/// Renews a batch of leases in one script run; a missing key (expired, or Redis restarted
/// empty) is taken back with the same token when free, which is safe because the log fence,
/// not Redis, guarantees a single writer; then what Redis must know about a running session is
/// written again (should-run entry, status; the session is told to rewrite the rest of its
/// status). The users' slots (scored by expiry) are refreshed every time, in one more script
/// run. Sessions that ended meanwhile are not in `batch` (their `live` was `false`).
///
/// # Errors
/// The batch's renewal itself failed: none of its leases is known to be renewed.
async fn renew_batch(ctx: &Ctx, batch: &[Renewing]) -> redis::RedisResult<Vec<Renewed>> {
    let mut conn = ctx.redis.clone();
    let ttl = ctx.args.lease_ttl;
    let leases: Vec<&Lease> = batch.iter().map(|r| &r.lease).collect();
    let found = ownership::renew_many(&mut conn, &leases, ttl).await?;
    // Missing leases (Redis emptied: possibly all of them) are taken back concurrently, as
    // many round trips in flight as before batching, so the round stays well within 3/4 ttl.
    let mut out = Vec::with_capacity(batch.len());
    let mut missing = Vec::new();
    for (r, found) in batch.iter().zip(found) {
        let ours = match found {
            Renewal::Renewed => true,
            Renewal::Taken => false,
            Renewal::Missing => {
                missing.push(r);
                continue;
            }
        };
        out.push(Renewed {
            sid: r.sid.clone(),
            token: r.lease.token.clone(),
            ours: Ok(ours),
        });
    }
    for chunk in missing.chunks(TAKE_BACK_IN_FLIGHT) {
        let done =
            futures::future::join_all(chunk.iter().map(|r| take_back(ctx, conn.clone(), r))).await;
        out.extend(chunk.iter().zip(done).map(|(r, ours)| Renewed {
            sid: r.sid.clone(),
            token: r.lease.token.clone(),
            ours,
        }));
    }
    if let Some(limit) = ctx.args.max_conversations_per_user {
        // Refresh our entries; they cannot be refused because they are already counted,
        // unless Redis lost them, in which case we count them again (we are running anyway).
        let ours: std::collections::HashSet<&SessionId> = out
            .iter()
            .filter(|done| matches!(done.ours, Ok(true)))
            .map(|done| &done.sid)
            .collect();
        let slots: Vec<(&UserId, &SessionId)> = batch
            .iter()
            .filter(|r| ours.contains(&r.sid))
            .map(|r| (&r.uid, &r.sid))
            .collect();
        let names = ctx.store.names();
        if let Err(e) =
            ownership::reserve_user_slots(&mut conn, names, &slots, limit, ttl * 3).await
        {
            warn!(error = %e, sessions = slots.len(), "refreshing user slots failed");
        }
    }
    Ok(out)
}

/// What one session's renewal found: `Ok(true)` still ours, `Ok(false)` lost.
struct Renewed {
    sid: SessionId,
    /// The renewed lease's token: the session may have ended and been claimed here again.
    token: String,
    ours: redis::RedisResult<bool>,
}

/// A missing lease: taken back if still free, and Redis told again what it lost.
async fn take_back(
    ctx: &Ctx,
    mut conn: redis::aio::ConnectionManager,
    r: &Renewing,
) -> redis::RedisResult<bool> {
    let conn = &mut conn;
    let ttl = ctx.args.lease_ttl;
    if !ownership::reacquire(conn, &r.lease, ttl).await? {
        return Ok(false);
    }
    info!(session_id = %r.sid, "lease was missing (Redis emptied?); taken back");
    let names = ctx.store.names();
    // Redis lost what it knew of this session: it must run again after a crash.
    ownership::mark_should_run(conn, names, &r.uid, &r.sid).await?;
    shared::status::write(
        conn,
        names,
        &r.sid,
        shared::status::Update {
            state: Some(shared::status::SessionState::Running),
            worker_id: Some(ctx.worker_id.as_str()),
            ..Default::default()
        },
    )
    .await?;
    r.redis_lost.notify_one();
    Ok(true)
}

/// How often the NATS client pings its server: a silent link (a partition drops packets
/// without a reset) is noticed after a few unanswered pings (async-nats gives up on the third),
/// within about a lease's time to live.
pub(crate) fn nats_ping_interval(lease_ttl: std::time::Duration) -> std::time::Duration {
    (lease_ttl / 4).clamp(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(10),
    )
}

/// A held lease as the tick found it, before its session's `live` lock is taken.
struct Pending {
    sid: SessionId,
    uid: UserId,
    lease: Lease,
    redis_lost: Arc<tokio::sync::Notify>,
    live: Arc<tokio::sync::Mutex<bool>>,
}

pub(crate) async fn renew_loop(ctx: Ctx, cancel: CancellationToken) {
    let ttl = ctx.args.lease_ttl;
    let mut tick = tokio::time::interval(ttl / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Said once per NATS outage, not every tick.
    let mut said_down = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let nats_up = ctx.nats.connection_state() == async_nats::connection::State::Connected;
        if nats_up {
            said_down = false;
        } else if !said_down && !ctx.leases.lock().is_empty() {
            said_down = true;
            warn!("NATS unreachable: not renewing leases (the sessions fence themselves)");
        }
        let held: Vec<Pending> = if nats_up {
            ctx.leases
                .lock()
                .iter()
                .map(|(s, h)| Pending {
                    sid: s.clone(),
                    uid: h.uid.clone(),
                    lease: h.lease.clone(),
                    redis_lost: h.redis_lost.clone(),
                    live: h.live.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let sent_at = Instant::now();
        let mut results: Vec<Renewed> = Vec::new();
        let mut all_renewed = nats_up;
        let mut held = held.into_iter().peekable();
        while held.peek().is_some() {
            let mut batch = Vec::with_capacity(BATCH);
            for p in held.by_ref().take(BATCH) {
                let live = p.live.lock_owned().await;
                if *live {
                    batch.push(Renewing {
                        sid: p.sid,
                        uid: p.uid,
                        lease: p.lease,
                        redis_lost: p.redis_lost,
                        _live: live,
                    });
                } // else the session has ended and released (or is releasing) it
            }
            match renew_batch(&ctx, &batch).await {
                Ok(found) => results.extend(found),
                Err(e) => {
                    all_renewed = false;
                    warn!(error = %e, leases = batch.len(), "lease renewal failed");
                }
            }
        }
        // The heartbeat says "every lease of this worker was renewed by now": written after
        // the round, so it expires no earlier than those leases (the sweeper's cue).
        if all_renewed {
            let names = ctx.store.names();
            let mut conn = ctx.redis.clone();
            if let Err(e) = ownership::heartbeat(&mut conn, names, &ctx.worker_id, ttl).await {
                warn!(error = %e, "worker heartbeat failed");
            }
        }
        let mut map = ctx.leases.lock();
        for Renewed { sid, token, ours } in results {
            if map.get(&sid).is_none_or(|h| h.lease.token != token) {
                continue; // ended meanwhile (and perhaps claimed here again: a new lease)
            }
            match ours {
                Ok(true) => {
                    if let Some(h) = map.get_mut(&sid) {
                        h.renewed_at = sent_at;
                    }
                }
                Ok(false) => {
                    if let Some(h) = map.remove(&sid) {
                        info!(session_id = %sid, "lease lost; stopping session");
                        metrics::counter!("oh_worker_leases_lost_total").increment(1);
                        h.lost.cancel();
                    }
                }
                Err(e) => warn!(session_id = %sid, error = %e, "lease renewal failed"),
            }
        }
        let limit = ttl * 3 / 4;
        map.retain(|sid, h| {
            if h.renewed_at.elapsed() >= limit {
                warn!(session_id = %sid, "lease not renewed in time; self-fencing");
                metrics::counter!("oh_worker_leases_lost_total").increment(1);
                h.lost.cancel();
                false
            } else {
                true
            }
        });
    }
}
