//! Conversations this gateway created moments ago. OpenHands' UI creates a conversation and
//! then opens its socket at once; for [`FRESH`] after a create, this gateway knows that the
//! conversation exists and is the caller's (it wrote the metadata), and the connect does not
//! read the metadata again (one JetStream read less per new conversation).
//!
//! A delete through this gateway forgets the conversation at once. A delete through
//! another gateway within [`FRESH`] is seen here only after it: a socket opened here in that
//! window is accepted to a deleted conversation and reads an empty log (a start request it
//! causes finds no metadata and is dropped by the worker).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shared::id::{SessionId, UserId};

/// How long a create vouches for its conversation.
pub(crate) const FRESH: Duration = Duration::from_secs(10);

/// Fewest entries before expired ones are dropped.
const PRUNE_FLOOR: usize = 1024;

/// See the module doc.
#[derive(Default)]
pub(crate) struct Recent(Mutex<Table>);

#[derive(Default)]
struct Table {
    created: HashMap<SessionId, (UserId, Instant)>,
    /// Size at which expired entries are dropped next (amortised: twice the live ones).
    prune_at: usize,
}

impl Recent {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `uid` created `sid` (its metadata stored) just now.
    pub(crate) fn created(&self, sid: &SessionId, uid: &UserId) {
        let now = Instant::now();
        let mut t = self.table();
        if t.created.len() >= t.prune_at.max(PRUNE_FLOOR) {
            t.created
                .retain(|_, (_, at)| now.duration_since(*at) < FRESH);
            t.prune_at = t.created.len() * 2;
        }
        t.created.insert(sid.clone(), (uid.clone(), now));
    }

    /// Whether `uid` created `sid` through this gateway less than [`FRESH`] ago.
    pub(crate) fn fresh(&self, sid: &SessionId, uid: &UserId) -> bool {
        self.table()
            .created
            .get(sid)
            .is_some_and(|(owner, at)| owner == uid && at.elapsed() < FRESH)
    }

    /// A delete: the create vouches for nothing any more.
    pub(crate) fn forget(&self, sid: &SessionId) {
        self.table().created.remove(sid);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table().created.len()
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
        r.created(&sid, &uid);
        assert!(r.fresh(&sid, &uid));
        assert!(!r.fresh(&sid, &eve), "another user's conversation");
        assert!(!r.fresh(&other, &uid), "not created here");
        r.forget(&sid);
        assert!(!r.fresh(&sid, &uid), "deleted");
    }

    #[test]
    fn expired_entries_are_dropped_as_the_table_grows() {
        let r = Recent::default();
        let uid = UserId::parse("alice").unwrap();
        let old = Instant::now()
            .checked_sub(FRESH + Duration::from_secs(1))
            .unwrap();
        {
            let mut t = r.table();
            for _ in 0..PRUNE_FLOOR {
                t.created.insert(SessionId::generate(), (uid.clone(), old));
            }
        }
        let sid = SessionId::generate();
        r.created(&sid, &uid);
        assert_eq!(r.len(), 1, "the expired ones are gone, the new one kept");
        assert!(r.fresh(&sid, &uid));
    }
}
