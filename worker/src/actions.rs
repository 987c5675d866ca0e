//! The worker's half of action delivery beside each session's [`ActionFeed`]: one recheck for
//! all of its sessions.
//!
//! A session learns of new actions from the stream's republishes (core NATS: at most once). One
//! lost (a reconnect, a route between NATS nodes down for a moment) is noticed by the next one
//! of the same session (its previous sequence shows the gap), but the last one of a burst has
//! no successor. So every [`RECHECK_EVERY`] the worker asks the stream, in one request, which
//! sessions have actions stored, and tells those it owns to read the stream. Idle sessions
//! cost nothing: no timer, pull or heartbeat per session.
//!
//! [`ActionFeed`]: shared::queue::ActionFeed

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::id::SessionId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::Ctx;

/// How often the worker looks for stored actions its sessions were not told about.
pub(crate) const RECHECK_EVERY: Duration = Duration::from_secs(2);

/// The recheck handle of every session this worker runs.
#[derive(Clone, Default)]
pub(crate) struct Feeds(Arc<Mutex<HashMap<SessionId, Arc<Notify>>>>);

impl Feeds {
    pub(crate) fn insert(&self, sid: SessionId, recheck: Arc<Notify>) {
        self.lock().insert(sid, recheck);
    }

    /// Forgets `sid`'s feed if it is still `recheck` (a later claim of the same session on
    /// this worker may have registered its own meanwhile).
    pub(crate) fn remove(&self, sid: &SessionId, recheck: &Arc<Notify>) {
        let mut feeds = self.lock();
        if feeds.get(sid).is_some_and(|n| Arc::ptr_eq(n, recheck)) {
            feeds.remove(sid);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Notify>>> {
        // A poisoned lock only means another thread panicked while holding it; the map is
        // still consistent (single inserts and removes).
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wakes the feeds of `sids` that run here.
    fn wake(&self, sids: &[SessionId]) {
        let feeds = self.lock();
        for n in sids.iter().filter_map(|sid| feeds.get(sid)) {
            n.notify_one();
        }
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Every [`RECHECK_EVERY`]: which sessions have actions stored; those running here read them.
pub(crate) async fn recheck_loop(ctx: Ctx, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(RECHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if ctx.feeds.is_empty() {
            continue;
        }
        match ctx.store.sessions_with_actions().await {
            Ok(sids) => {
                failing = false;
                ctx.feeds.wake(&sids);
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "looking for stored actions failed");
                }
                failing = true;
            }
        }
    }
}
