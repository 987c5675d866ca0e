//! Conversations this gateway created moments ago. OpenHands' UI creates a conversation and
//! then opens its socket at once; for [`FRESH`] after a create, this gateway knows that the
//! conversation exists and is the caller's (it wrote the metadata), and the connect does not
//! read the metadata again (one JetStream read less per new conversation).
//!
//! The create also joins the session's live feed before it queues the start request, so the
//! feed holds every event of the session from its first (a [`Watch`] kept here). The first
//! socket within [`FRESH`] takes it over: what the watch received is the log so far, and the
//! socket replays it from there instead of reading the log (see `replay`). A watch nobody
//! took is dropped when its entry expires ([`Recent::expire`], every second).
//!
//! A delete through this gateway forgets the conversation at once. A delete through
//! another gateway within [`FRESH`] is seen here only after it: a socket opened here in that
//! window is accepted to a deleted conversation and reads an empty log (a start request it
//! causes finds no metadata and is dropped by the worker).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shared::id::{SessionId, UserId};

use crate::fanout::Joined;

/// How long a create vouches for its conversation.
pub(crate) const FRESH: Duration = Duration::from_secs(10);

/// A session's live feed, joined before its first event could exist. Dropped untaken (its
/// entry expired, or deleted), it tells the topic to stop keeping events' stored forms.
pub(crate) struct Watch(Option<Joined>);

impl Watch {
    pub(crate) fn new(joined: Joined) -> Self {
        Self(Some(joined))
    }

    /// The topic and the receiver that has held every event since the create; the taker
    /// calls [`crate::fanout::Topic::born`] once it has drained what it needs.
    pub(crate) fn take(mut self) -> Option<Joined> {
        self.0.take()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some((topic, _)) = &self.0 {
            topic.born();
        }
    }
}

/// See the module doc. `W` is what a create leaves for the first socket ([`Watch`]).
pub(crate) struct Recent<W = Watch>(Mutex<HashMap<SessionId, Entry<W>>>);

struct Entry<W> {
    uid: UserId,
    at: Instant,
    watch: Option<W>,
}

impl<W> Default for Recent<W> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<W> Recent<W> {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Entry<W>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `uid` created `sid` (its metadata stored) just now; `watch`, if any, is its live feed
    /// joined before its start request was queued.
    pub(crate) fn created(&self, sid: &SessionId, uid: &UserId, watch: Option<W>) {
        let entry = Entry {
            uid: uid.clone(),
            at: Instant::now(),
            watch,
        };
        let old = self.table().insert(sid.clone(), entry);
        drop(old); // outside the lock
    }

    /// Whether `uid` created `sid` through this gateway less than [`FRESH`] ago.
    pub(crate) fn fresh(&self, sid: &SessionId, uid: &UserId) -> bool {
        self.table()
            .get(sid)
            .is_some_and(|e| e.uid == *uid && e.at.elapsed() < FRESH)
    }

    /// The create's watch of `sid`, for the first socket of its creator within [`FRESH`].
    pub(crate) fn take_watch(&self, sid: &SessionId, uid: &UserId) -> Option<W> {
        let mut t = self.table();
        let e = t.get_mut(sid)?;
        if e.uid != *uid || e.at.elapsed() >= FRESH {
            return None;
        }
        e.watch.take()
    }

    /// A delete: the create vouches for nothing any more.
    pub(crate) fn forget(&self, sid: &SessionId) {
        let old = self.table().remove(sid);
        drop(old); // outside the lock
    }

    /// Drops the entries older than [`FRESH`], and with them the watches no socket took.
    pub(crate) fn expire(&self) {
        let mut gone = Vec::new();
        {
            let mut t = self.table();
            t.retain(|_, e| {
                let keep = e.at.elapsed() < FRESH;
                if !keep {
                    gone.push(e.watch.take());
                }
                keep
            });
        }
        drop(gone); // outside the lock: dropping a watch may end its topic
    }

    /// Runs [`Self::expire`] every second until `cancel`.
    pub(crate) async fn expire_loop(&self, cancel: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => self.expire(),
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_vouches_for_its_owner_until_forgotten() {
        let r = Recent::default();
        let (sid, other) = (SessionId::generate(), SessionId::generate());
        let (uid, eve) = (
            UserId::parse("alice").unwrap(),
            UserId::parse("eve").unwrap(),
        );
        let r: Recent<u32> = r;
        r.created(&sid, &uid, Some(7));
        assert!(r.fresh(&sid, &uid));
        assert!(!r.fresh(&sid, &eve), "another user's conversation");
        assert_eq!(
            r.take_watch(&sid, &eve),
            None,
            "another user's conversation"
        );
        assert_eq!(r.take_watch(&sid, &uid), Some(7));
        assert_eq!(r.take_watch(&sid, &uid), None, "taken by the first socket");
        assert!(
            r.fresh(&sid, &uid),
            "still vouched for after its watch was taken"
        );
        assert!(!r.fresh(&other, &uid), "not created here");
        r.forget(&sid);
        assert!(!r.fresh(&sid, &uid), "deleted");
    }

    #[test]
    fn expired_entries_and_their_watches_are_dropped() {
        let r: Recent<std::sync::Arc<()>> = Recent::default();
        let uid = UserId::parse("alice").unwrap();
        let old = Instant::now()
            .checked_sub(FRESH + Duration::from_secs(1))
            .unwrap();
        let watch = std::sync::Arc::new(());
        let stale = SessionId::generate();
        r.table().insert(
            stale.clone(),
            Entry {
                uid: uid.clone(),
                at: old,
                watch: Some(std::sync::Arc::clone(&watch)),
            },
        );
        assert!(!r.fresh(&stale, &uid), "too old to vouch");
        assert_eq!(r.take_watch(&stale, &uid), None, "too old to hand over");
        let sid = SessionId::generate();
        r.created(&sid, &uid, None);
        r.expire();
        assert_eq!(r.len(), 1, "the expired one is gone, the new one kept");
        assert!(r.fresh(&sid, &uid));
        assert_eq!(
            std::sync::Arc::strong_count(&watch),
            1,
            "its watch was dropped"
        );
    }
}
