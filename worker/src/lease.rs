//! Renewal of every lease this worker holds.
//!
//! Every `ttl/4` each held lease is renewed by compare-and-`PEXPIRE` (never recreated). A lease
//! that is no longer ours cancels its session at once. A lease whose renewal keeps failing
//! (Redis unreachable, or this process starved) cancels its session once `3/4 ttl` have passed
//! since the last renewal that was *sent* and succeeded, i.e. before the lease could have
//! expired and been taken by another worker (self-fencing on the local monotonic clock); two
//! late ticks are tolerated before that.
//!
//! A worker that cannot reach NATS cannot run its sessions (no actions in, no events out), so
//! it must not keep them from the workers that can: while the NATS connection is down
//! (detected by the client's pings, every [`nats_ping_interval`]) no lease is renewed, the
//! sessions self-fence as above, and their leases expire for another worker to take.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
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

/// Renews one lease; a missing key (expired, or Redis restarted empty) is taken back with the
/// same token when free, which is safe because the log fence, not Redis, guarantees a single
/// writer; then what Redis must know about a running session is written again (should-run
/// entry, status; the session is told to rewrite the rest of its status). The user's slot
/// (scored by expiry) is refreshed every time. `None`: the session ended meanwhile and nothing
/// was done.
async fn renew_one(
    ctx: &Ctx,
    sid: &SessionId,
    uid: &UserId,
    lease: &Lease,
    live: &tokio::sync::Mutex<bool>,
    redis_lost: &tokio::sync::Notify,
) -> redis::RedisResult<Option<bool>> {
    let live = live.lock().await;
    if !*live {
        return Ok(None); // the session has ended and released (or is releasing) it
    }
    let mut conn = ctx.redis.clone();
    let ttl = ctx.args.lease_ttl;
    let ours = match ownership::renew(&mut conn, lease, ttl).await? {
        Renewal::Renewed => true,
        Renewal::Taken => false,
        Renewal::Missing => {
            let back = ownership::reacquire(&mut conn, lease, ttl).await?;
            if back {
                info!(session_id = %sid, "lease was missing (Redis emptied?); taken back");
                let names = ctx.store.names();
                // Redis lost what it knew of this session: it must run again after a crash.
                ownership::mark_should_run(&mut conn, names, uid, sid).await?;
                shared::status::write(
                    &mut conn,
                    names,
                    sid,
                    shared::status::Update {
                        state: Some(shared::status::SessionState::Running),
                        worker_id: Some(ctx.worker_id.as_str()),
                        ..Default::default()
                    },
                )
                .await?;
                redis_lost.notify_one();
            }
            back
        }
    };
    if ours {
        let names = ctx.store.names();
        if let Some(limit) = ctx.args.max_conversations_per_user {
            // Refresh our entry; it cannot be refused because it is already counted, unless
            // Redis lost it, in which case we count it again (we are running anyway).
            let _ =
                ownership::reserve_user_slot(&mut conn, names, uid, sid, limit, ttl * 3).await?;
        }
    }
    Ok(Some(ours))
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
        type Renewing = (
            SessionId,
            UserId,
            Lease,
            Arc<tokio::sync::Mutex<bool>>,
            Arc<tokio::sync::Notify>,
        );
        let nats_up = ctx.nats.connection_state() == async_nats::connection::State::Connected;
        if nats_up {
            said_down = false;
        } else if !said_down && !ctx.leases.lock().is_empty() {
            said_down = true;
            warn!("NATS unreachable: not renewing leases (the sessions fence themselves)");
        }
        let held: Vec<Renewing> = if nats_up {
            ctx.leases
                .lock()
                .iter()
                .map(|(s, h)| {
                    (
                        s.clone(),
                        h.uid.clone(),
                        h.lease.clone(),
                        h.live.clone(),
                        h.redis_lost.clone(),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let sent_at = Instant::now();
        let results: Vec<(SessionId, redis::RedisResult<Option<bool>>)> =
            futures::stream::iter(held)
                .map(|(sid, uid, lease, live, redis_lost)| {
                    let ctx = ctx.clone();
                    async move {
                        let r = renew_one(&ctx, &sid, &uid, &lease, &live, &redis_lost).await;
                        (sid, r)
                    }
                })
                .buffer_unordered(64)
                .collect()
                .await;
        let mut map = ctx.leases.lock();
        for (sid, res) in results {
            match res {
                Ok(None) => {} // ended meanwhile
                Ok(Some(true)) => {
                    if let Some(h) = map.get_mut(&sid) {
                        h.renewed_at = sent_at;
                    }
                }
                Ok(Some(false)) => {
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
