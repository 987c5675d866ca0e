//! The sweeper: finds sessions that should be running but have no owner (their worker died
//! or was cut off and its lease expired) and queues a resume for each. One sweeper at a time
//! across all workers, chosen by a Redis lock; the resume requests are deduplicated by the work
//! queue (at most one per session), so a second sweeper would only cost a little work.
//!
//! Looking for orphans costs O(sessions) (the should-run set against the leases), so it runs
//! only when one may exist. Every tick the sweeper checks what is cheap: the heartbeats of the
//! workers (`ownership::heartbeat`, written after each renewal round that renewed all of a
//! worker's leases, with the leases' time to live) and the sweep-due marker (set by a worker
//! that let go of a session without queueing its resume). It looks for orphans when a worker's
//! heartbeat is gone (each tick for two lease lifetimes: its leases expire by then, the last
//! ones taken after its last heartbeat included), when asked, when it becomes the sweeper, and
//! every [`FULL_EVERY`] whatever happens (a lease lost any other way). An idle deployment
//! costs a few small commands per tick, not a pass over every session.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shared::ownership::{self, Lease, Renewal};
use shared::wire::{StartReason, StartRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Ctx;

/// How often the sweeper looks.
pub(crate) fn interval(ctx: &Ctx) -> Duration {
    (ctx.args.lease_ttl / 3).min(Duration::from_secs(1))
}

/// The longest time between two looks for orphans.
pub(crate) const FULL_EVERY: Duration = Duration::from_secs(10);

/// What the sweeper remembers between ticks.
#[derive(Default)]
struct Watch {
    /// When it last looked for orphans (`None`: not since it became the sweeper).
    last_look: Option<Instant>,
    /// Workers whose heartbeat is gone, since when.
    silent: HashMap<String, Instant>,
}

pub(crate) async fn sweep_loop(ctx: Ctx, cancel: CancellationToken) {
    let every = interval(&ctx);
    let lock = ownership::sweeper_lock(ctx.store.names(), &ctx.worker_id);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = Watch::default();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match hold(&ctx, &lock, every * 3).await {
            Ok(true) => {
                if let Err(e) = sweep_tick(&ctx, &mut watch).await {
                    warn!(error = %e, "sweep failed");
                    watch.last_look = None; // look on the next tick
                }
            }
            Ok(false) => watch = Watch::default(),
            Err(e) => debug!(error = %e, "sweeper lock unavailable"),
        }
    }
}

/// One tick of the sweeper holding the lock: looks for orphans if one may exist.
async fn sweep_tick(ctx: &Ctx, watch: &mut Watch) -> anyhow::Result<()> {
    let mut conn = ctx.redis.clone();
    let names = ctx.store.names();
    let now = Instant::now();
    let (asked, silent) = ownership::sweep_cues(&mut conn, names).await?;
    // A worker heard again is no longer watched as silent; a newly silent one is.
    watch.silent.retain(|w, _| silent.contains(w));
    for w in silent {
        if let std::collections::hash_map::Entry::Vacant(e) = watch.silent.entry(w) {
            info!(worker_id = %e.key(), "worker heartbeat gone; looking for its sessions");
            e.insert(now);
        }
    }
    // Silent for two lease lifetimes: every lease it held has expired and been looked for.
    let window = ctx.args.lease_ttl * 2;
    let done: Vec<String> = watch
        .silent
        .iter()
        .filter(|(_, since)| now.duration_since(**since) > window)
        .map(|(w, _)| w.clone())
        .collect();
    let look = asked
        || !watch.silent.is_empty()
        || watch
            .last_look
            .is_none_or(|t| now.duration_since(t) >= FULL_EVERY);
    if look {
        sweep_once(ctx).await?;
        watch.last_look = Some(now);
        metrics::counter!("oh_worker_sweeps_total").increment(1);
    }
    if !done.is_empty() {
        ownership::forget_workers(&mut conn, names, &done).await?;
        for w in &done {
            watch.silent.remove(w);
        }
    }
    Ok(())
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
