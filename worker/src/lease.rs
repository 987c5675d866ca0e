//! Renewal of every lease this worker holds.
//!
//! Every `ttl/4` each held lease is renewed by compare-and-`PEXPIRE` (never recreated). A lease
//! that is no longer ours cancels its session at once. A lease whose renewal keeps failing
//! (Redis unreachable, or this process starved) cancels its session once `3/4 ttl` have passed
//! since the last renewal that was *sent* and succeeded, i.e. before the lease could have
//! expired and been taken by another worker (self-fencing on the local monotonic clock); two
//! late ticks are tolerated before that.

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
    renewed_at: Instant,
}

/// The leases held by this worker.
#[derive(Clone, Default)]
pub(crate) struct Registry(Arc<Mutex<HashMap<SessionId, Held>>>);

impl Registry {
    /// Starts renewing `lease`; `lost` is cancelled when it can no longer be trusted.
    pub(crate) fn insert(
        &self,
        sid: SessionId,
        uid: UserId,
        lease: Lease,
        lost: CancellationToken,
    ) {
        let held = Held {
            uid,
            lease,
            lost,
            renewed_at: Instant::now(),
        };
        self.lock().insert(sid, held);
    }

    /// Stops renewing (before a release).
    pub(crate) fn remove(&self, sid: &SessionId) {
        self.lock().remove(sid);
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
/// writer. Also refreshes what Redis must know about a running session, so it is rebuilt
/// after Redis loses its data: the should-run entry, the user's slot, the status.
async fn renew_one(
    ctx: &Ctx,
    sid: &SessionId,
    uid: &UserId,
    lease: &Lease,
) -> redis::RedisResult<bool> {
    let mut conn = ctx.redis.clone();
    let ttl = ctx.args.lease_ttl;
    let ours = match ownership::renew(&mut conn, lease, ttl).await? {
        Renewal::Renewed => true,
        Renewal::Taken => false,
        Renewal::Missing => {
            let back = ownership::reacquire(&mut conn, lease, ttl).await?;
            if back {
                info!(session_id = %sid, "lease was missing (Redis emptied?); taken back");
                let names = &ctx.store.names;
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
            }
            back
        }
    };
    if ours {
        let names = &ctx.store.names;
        ownership::mark_should_run(&mut conn, names, uid, sid).await?;
        if let Some(limit) = ctx.args.max_conversations_per_user {
            // Refresh our entry; it cannot be refused because it is already counted, unless
            // Redis lost it, in which case we count it again (we are running anyway).
            let _ =
                ownership::reserve_user_slot(&mut conn, names, uid, sid, limit, ttl * 3).await?;
        }
    }
    Ok(ours)
}

pub(crate) async fn renew_loop(ctx: Ctx, cancel: CancellationToken) {
    let ttl = ctx.args.lease_ttl;
    let mut tick = tokio::time::interval(ttl / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let held: Vec<(SessionId, UserId, Lease)> = ctx
            .leases
            .lock()
            .iter()
            .map(|(s, h)| (s.clone(), h.uid.clone(), h.lease.clone()))
            .collect();
        let sent_at = Instant::now();
        let results: Vec<(SessionId, redis::RedisResult<bool>)> = futures::stream::iter(held)
            .map(|(sid, uid, lease)| {
                let ctx = ctx.clone();
                async move {
                    let r = renew_one(&ctx, &sid, &uid, &lease).await;
                    (sid, r)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let mut map = ctx.leases.lock();
        for (sid, res) in results {
            match res {
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
