//! Every NATS subject, JetStream stream/consumer/bucket name and Redis key, in one place,
//! all derived from the namespace (`OH_NAMESPACE`, default `oh`), so that two deployments (or
//! two tests) can share one NATS and one Redis without seeing each other.
//!
//! | what | name |
//! |---|---|
//! | events of a session (durable log) | stream `{ns}_events`, subject `{ns}.ev.{sid}` |
//! | status updates (live only) | core subject `{ns}.st.{sid}` |
//! | user actions not yet applied | stream `{ns}_actions` (work queue, no consumer), subject `{ns}.act.{sid}`, each stored action republished by the stream on `{ns}.act.{sid}.stored` |
//! | start/resume requests | stream `{ns}_work` (work queue, one per session at a time), subject `{ns}.work.{sid}`, consumer `workers` |
//! | conversation metadata | stream `{ns}_meta`, subject `{ns}.meta.{uid}.{sid}`, one message each |
//! | workspace snapshots (head and content chunks) | stream `{ns}_ws`, subjects `{ns}.ws.{sid}.h` (head) and `{ns}.ws.{sid}.c.{sha256}` (one chunk each) |
//! | large payloads stored out of line | object store `{ns}_blobs`, objects `{sid}.{uuid}` and `replay.{sid}` |
//! | owner lease | Redis `{ns}:lease:{sid}` |
//! | live status | Redis hash `{ns}:status:{sid}` |
//! | sessions that should run (sweeper) | Redis set `{ns}:should_run` of `{sid}:{uid}` |
//! | a user's running sessions | Redis sorted set `{ns}:user_running:{uid}` |
//! | sweeper lock | Redis `{ns}:sweeper` |
//! | gateways with sockets on a session | Redis sorted set `{ns}:presence:{sid}` |
//! | first action sent under a client `msg_id` | Redis `{ns}:msgid:{uid}:{sid}:{msg_id}` |

use crate::id::{IdError, SessionId, UserId};

/// Why a namespace was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("namespace must be 1-32 characters of [a-z0-9_-]")]
pub struct NamespaceError;

/// All names of one deployment, derived from its namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    ns: String,
}

impl Names {
    /// Builds the names for a namespace.
    ///
    /// # Errors
    /// [`NamespaceError`] unless the namespace is 1-32 characters of `[a-z0-9_-]`.
    pub fn new(ns: &str) -> Result<Self, NamespaceError> {
        let ok = !ns.is_empty()
            && ns.len() <= 32
            && ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(NamespaceError);
        }
        Ok(Self { ns: ns.to_owned() })
    }

    /// The namespace itself.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// Stream holding every session's events.
    pub fn events_stream(&self) -> String {
        format!("{}_events", self.ns)
    }
    /// Subject of one session's events.
    pub fn events_subject(&self, sid: &SessionId) -> String {
        format!("{}.ev.{sid}", self.ns)
    }
    /// Subjects of [`Self::events_stream`].
    pub fn events_subjects(&self) -> String {
        format!("{}.ev.*", self.ns)
    }

    /// Core NATS subject of a session's status updates (`oh_event` payloads with
    /// `status_update: true`): live only, never stored or replayed.
    pub fn status_subject(&self, sid: &SessionId) -> String {
        format!("{}.st.{sid}", self.ns)
    }

    /// Every core subject of one session (`{ns}.*.{sid}`): its events and status updates, and
    /// also its actions and start requests, which a subscriber tells apart by subject and
    /// ignores. One subscription per watched session instead of two (gateway memory).
    pub fn session_subjects(&self, sid: &SessionId) -> String {
        format!("{}.*.{sid}", self.ns)
    }

    /// Work-queue stream of user actions.
    pub fn actions_stream(&self) -> String {
        format!("{}_actions", self.ns)
    }
    /// Subject of one session's actions.
    pub fn actions_subject(&self, sid: &SessionId) -> String {
        format!("{}.act.{sid}", self.ns)
    }
    /// Core subject announcing that a conversation was deleted (workers remove its workspace).
    pub fn deleted_subject(&self, sid: &SessionId) -> String {
        format!("{}.gone.{sid}", self.ns)
    }
    /// Stream of the workspace snapshots (heads and chunks of every session).
    pub fn workspace_stream(&self) -> String {
        format!("{}_ws", self.ns)
    }
    /// Subjects of [`Self::workspace_stream`].
    pub fn workspace_subjects(&self) -> String {
        format!("{}.ws.>", self.ns)
    }
    /// Every subject of one session's snapshots (head and chunks): DELETE purges this.
    pub fn workspace_session_subjects(&self, sid: &SessionId) -> String {
        format!("{}.ws.{sid}.>", self.ns)
    }
    /// The head of a session's snapshots: the newest manifest's address and its epoch.
    pub fn workspace_head_subject(&self, sid: &SessionId) -> String {
        format!("{}.ws.{sid}.h", self.ns)
    }
    /// One content chunk of a session's workspace, by the SHA-256 (hex) of its bytes.
    pub fn workspace_chunk_subject(&self, sid: &SessionId, sha: &str) -> String {
        format!("{}.ws.{sid}.c.{sha}", self.ns)
    }
    /// Every chunk subject of one session.
    pub fn workspace_chunk_subjects(&self, sid: &SessionId) -> String {
        format!("{}.ws.{sid}.c.*", self.ns)
    }
    /// Workspace queries to worker `worker_id` about `sid` ([`crate::files`]).
    pub fn files_subject(&self, worker_id: &str, sid: &SessionId) -> String {
        format!("{}.wsq.{worker_id}.{sid}", self.ns)
    }
    /// Every workspace query to worker `worker_id`.
    pub fn files_subjects(&self, worker_id: &str) -> String {
        format!("{}.wsq.{worker_id}.*", self.ns)
    }
    /// Every [`Self::deleted_subject`].
    pub fn deleted_subjects(&self) -> String {
        format!("{}.gone.*", self.ns)
    }
    /// Subjects of [`Self::actions_stream`].
    pub fn actions_subjects(&self) -> String {
        format!("{}.act.*", self.ns)
    }
    /// Where the actions stream republishes each action it stored (with its sequence and the
    /// session's previous one): the owner's live feed. Four tokens, so a gateway's
    /// [`Self::session_subjects`] does not receive them.
    pub fn actions_stored_subject(&self, sid: &SessionId) -> String {
        format!("{}.act.{sid}.stored", self.ns)
    }
    /// The actions stream's republish mapping: source and destination of
    /// [`Self::actions_stored_subject`].
    pub fn actions_republish(&self) -> (String, String) {
        (
            self.actions_subjects(),
            format!("{}.act.{{{{wildcard(1)}}}}.stored", self.ns),
        )
    }

    /// Work-queue stream of start/resume requests.
    pub fn work_stream(&self) -> String {
        format!("{}_work", self.ns)
    }
    /// Subject of one session's start request.
    pub fn work_subject(&self, sid: &SessionId) -> String {
        format!("{}.work.{sid}", self.ns)
    }
    /// Subjects of [`Self::work_stream`].
    pub fn work_subjects(&self) -> String {
        format!("{}.work.*", self.ns)
    }
    /// The one pull consumer shared by all workers.
    pub fn work_consumer(&self) -> &'static str {
        "workers"
    }
    /// Parses the session id back out of a work subject.
    ///
    /// # Errors
    /// [`IdError`] if the subject does not end in a valid session id.
    pub fn session_of_work_subject(&self, subject: &str) -> Result<SessionId, IdError> {
        let prefix = format!("{}.work.", self.ns);
        SessionId::parse(subject.strip_prefix(&prefix).unwrap_or(""))
    }

    /// The session an actions subject (`{ns}.act.{sid}`) belongs to.
    ///
    /// # Errors
    /// [`IdError`] if the subject is not one of this namespace's actions subjects.
    pub fn session_of_actions_subject(&self, subject: &str) -> Result<SessionId, IdError> {
        let prefix = format!("{}.act.", self.ns);
        SessionId::parse(subject.strip_prefix(&prefix).unwrap_or(""))
    }

    /// Stream of conversation metadata (one message per conversation, last one wins).
    pub fn meta_bucket(&self) -> String {
        format!("{}_meta", self.ns)
    }
    /// Subjects of [`Self::meta_bucket`].
    pub fn meta_subjects(&self) -> String {
        format!("{}.meta.*.*", self.ns)
    }
    /// Subject of one conversation's metadata. The user is part of it, so a lookup with the
    /// caller's own user id can only ever find the caller's own conversations.
    pub fn meta_subject(&self, uid: &UserId, sid: &SessionId) -> String {
        format!("{}.meta.{uid}.{sid}", self.ns)
    }
    /// Subject filter of all metadata of one user.
    pub fn meta_user_filter(&self, uid: &UserId) -> String {
        format!("{}.meta.{uid}.*", self.ns)
    }
    /// Prefix of [`Self::meta_subject`] for one user.
    pub fn meta_user_prefix(&self, uid: &UserId) -> String {
        format!("{}.meta.{uid}.", self.ns)
    }

    /// Object store for payloads too large for one NATS message.
    pub fn blob_bucket(&self) -> String {
        format!("{}_blobs", self.ns)
    }
    /// Blob of one payload stored out of line (unique per payload; named in header `Oh-Blob`).
    pub fn payload_blob(&self, sid: &SessionId) -> String {
        format!("{sid}.{}", uuid::Uuid::new_v4().simple())
    }
    /// Blob of a conversation's `replay_json` trajectory (named in its metadata).
    pub fn replay_blob(&self, sid: &SessionId) -> String {
        format!("replay.{sid}")
    }

    /// Redis hash of a user's token bucket for `kind` (`create`, `message`).
    pub fn rate_key(&self, kind: &str, uid: &UserId) -> String {
        format!("{}:rate:{kind}:{uid}", self.ns)
    }
    /// Redis string: a user's settings (JSON, OpenHands' `Settings` model).
    pub fn settings_key(&self, uid: &UserId) -> String {
        format!("{}:settings:{uid}", self.ns)
    }
    /// Redis hash: a user's custom secrets, name → JSON `{value, description}`.
    pub fn secrets_key(&self, uid: &UserId) -> String {
        format!("{}:secrets:{uid}", self.ns)
    }
    /// Redis sorted set of a user's stored conversations (for the per-user cap).
    pub fn user_conversations_key(&self, uid: &UserId) -> String {
        format!("{}:convs:{uid}", self.ns)
    }
    /// Redis sorted set of a user's open sockets, scored by expiry (for the per-user cap).
    pub fn user_sockets_key(&self, uid: &UserId) -> String {
        format!("{}:sockets:{uid}", self.ns)
    }

    /// Redis key of a session's owner lease.
    pub fn lease_key(&self, sid: &SessionId) -> String {
        format!("{}:lease:{sid}", self.ns)
    }
    /// Redis set of the workers that renew leases (the sweeper watches their heartbeats).
    pub fn workers_key(&self) -> String {
        format!("{}:workers", self.ns)
    }
    /// Redis key of a worker's heartbeat: written after each round in which it renewed every
    /// lease it holds, with the leases' time to live.
    pub fn worker_alive_key(&self, worker: &crate::id::WorkerId) -> String {
        format!("{}:alive:{worker}", self.ns)
    }
    /// Redis key set when a worker let go of a session that should run without queueing its
    /// resume: the sweeper looks at once instead of at its next periodic pass.
    pub fn sweep_due_key(&self) -> String {
        format!("{}:sweep_due", self.ns)
    }
    /// Redis set of `{sid}:{uid}` that should be running (the sweeper's work list).
    pub fn should_run_key(&self) -> String {
        format!("{}:should_run", self.ns)
    }
    /// Redis sorted set of a user's running sessions (score: expiry ms).
    pub fn user_running_key(&self, uid: &UserId) -> String {
        format!("{}:user_running:{uid}", self.ns)
    }
    /// Redis key of the sweeper's lock (one sweeper at a time across workers).
    pub fn sweeper_key(&self) -> String {
        format!("{}:sweeper", self.ns)
    }
    /// Digest of the action first sent with a client `msg_id` (the first write wins and a
    /// different payload under the same id is refused, not dropped).
    pub fn msg_id_key(&self, uid: &UserId, sid: &SessionId, msg_id: &str) -> String {
        format!("{}:msgid:{uid}:{sid}:{msg_id}", self.ns)
    }
    /// Redis sorted set of the gateways with sockets on a session (score: expiry ms).
    pub fn presence_key(&self, sid: &SessionId) -> String {
        format!("{}:presence:{sid}", self.ns)
    }
    /// Redis hash of a session's live status.
    pub fn status_key(&self, sid: &SessionId) -> String {
        format!("{}:status:{sid}", self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_namespaced_and_round_trip() {
        let n = Names::new("t1").unwrap();
        let sid = SessionId::parse("abc123").unwrap();
        let uid = UserId::parse("alice").unwrap();
        assert_eq!(n.events_subject(&sid), "t1.ev.abc123");
        assert_eq!(n.actions_subject(&sid), "t1.act.abc123");
        assert_eq!(n.actions_stored_subject(&sid), "t1.act.abc123.stored");
        assert_eq!(
            n.actions_republish(),
            (
                "t1.act.*".to_owned(),
                "t1.act.{{wildcard(1)}}.stored".to_owned()
            )
        );
        assert_eq!(n.work_subject(&sid), "t1.work.abc123");
        assert_eq!(n.meta_subject(&uid, &sid), "t1.meta.alice.abc123");
        assert_eq!(n.meta_user_filter(&uid), "t1.meta.alice.*");
        assert_eq!(n.lease_key(&sid), "t1:lease:abc123");
        assert_eq!(n.session_of_work_subject("t1.work.abc123").unwrap(), sid);
        assert!(n.session_of_work_subject("t2.work.abc123").is_err());
        assert_eq!(n.session_of_actions_subject("t1.act.abc123").unwrap(), sid);
        assert!(
            n.session_of_actions_subject("t1.act.abc123.stored")
                .is_err()
        );
        for bad in ["", "A", "a.b", "a b", &"x".repeat(33)] {
            assert_eq!(Names::new(bad), Err(NamespaceError), "{bad:?}");
        }
    }
}
