//! The sweeper: finds sessions that should be running but have no owner (their worker died
//! or was cut off and its lease expired) and queues a resume for each. One sweeper at a time
//! across all workers, chosen by a Redis lock; the resume requests are deduplicated by the work
//! queue (at most one per session), so a second sweeper would only cost a little work.

use std::time::Duration;

use shared::ownership::{self, Lease, Renewal};
use shared::wire::{StartReason, StartRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Ctx;

/// How often the sweeper looks.
pub(crate) fn interval(ctx: &Ctx) -> Duration {
    (ctx.args.lease_ttl / 3).min(Duration::from_secs(1))
}

pub(crate) async fn sweep_loop(ctx: Ctx, cancel: CancellationToken) {
    let every = interval(&ctx);
    let lock = ownership::sweeper_lock(ctx.store.names(), &ctx.worker_id);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match hold(&ctx, &lock, every * 3).await {
            Ok(true) => {
                if let Err(e) = sweep_once(&ctx).await {
                    warn!(error = %e, "sweep failed");
                }
            }
            Ok(false) => {}
            Err(e) => debug!(error = %e, "sweeper lock unavailable"),
        }
    }
}

async fn hold(ctx: &Ctx, lock: &Lease, ttl: Duration) -> redis::RedisResult<bool> {
    let mut conn = ctx.redis.clone();
    match ownership::renew(&mut conn, lock, ttl).await? {
        Renewal::Renewed => Ok(true),
        Renewal::Taken => Ok(false),
        Renewal::Missing => ownership::reacquire(&mut conn, lock, ttl).await,
    }
}

async fn sweep_once(ctx: &Ctx) -> anyhow::Result<()> {
    let mut conn = ctx.redis.clone();
    for (sid, uid) in ownership::orphans(&mut conn, ctx.store.names()).await? {
        let req = StartRequest::new(&sid, &uid, StartReason::Resume);
        match ctx.store.enqueue_start(&req).await {
            Ok(true) => {
                info!(session_id = %sid, user_id = %uid, "owner-less session; resume queued");
                metrics::counter!("oh_worker_sweeper_resumes_total").increment(1);
            }
            Ok(false) => {}
            Err(e) => warn!(session_id = %sid, error = %e, "resume request failed"),
        }
    }
    Ok(())
}
