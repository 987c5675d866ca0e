//! Messages that cross NATS between gateway and worker, other than the events themselves
//! (whose JSON lives in [`crate::event`]).
//!
//! - A **start request** ([`StartRequest`], JSON) on the session's work subject asks any worker
//!   with a free slot to run the session. At most one is queued per session.
//! - A **user action** on the session's action subject carries the validated `oh_user_action`
//!   JSON as its payload, with [`HDR_USER`] naming the user and `Nats-Msg-Id` for dedup. A
//!   control request (stop) is an action message with [`HDR_CONTROL`] set and an empty payload.
//! - Every **event** message carries [`HDR_EVENT_ID`] (its per-session id) and
//!   [`HDR_APPLIED_ACTION`] (the stream sequence of the newest user action applied so far),
//!   so the last event alone tells a new owner where the session stands.
//! - A payload stored out of line carries [`HDR_BLOB`] (object name) and an empty body.

use serde::{Deserialize, Serialize};

use crate::id::{SessionId, UserId};

/// Header: per-session event id of an event message.
pub const HDR_EVENT_ID: &str = "Oh-Event-Id";
/// Header: stream sequence of the newest action applied when this event was appended.
pub const HDR_APPLIED_ACTION: &str = "Oh-Applied-Action";
/// Header: the writer's epoch (stream sequence of its takeover record) on every event after
/// the takeover; on the takeover record itself, the sequence it fences off.
pub const HDR_EPOCH: &str = "Oh-Epoch";
/// Header: the agent state as of this event (so the last event tells a new owner whether a
/// turn was interrupted).
pub const HDR_AGENT_STATE: &str = "Oh-Agent-State";
/// Header: how many times the current turn was interrupted (its owner died mid-turn) without
/// a completed step since; absent means 0.
pub const HDR_INTERRUPTS: &str = "Oh-Interrupts";
/// Header: the user who sent an action.
pub const HDR_USER: &str = "Oh-User";
/// Header: a control request in the action stream (value: [`Control`] as a string).
pub const HDR_CONTROL: &str = "Oh-Control";
/// Header: the payload is stored in the blob object store under this name.
pub const HDR_BLOB: &str = "Oh-Blob";
/// Header: the client's own `msg_id` of an action, and of the user event that applied it, so
/// a retry that arrives after JetStream's duplicate window is recognised in the log.
pub const HDR_CLIENT_MSG_ID: &str = "Oh-Client-Msg-Id";
/// Header: when an action was sent (the publisher's clock, microseconds since the Unix epoch),
/// for the owner's action-wait histogram (a republished message carries no store time).
pub const HDR_SENT_AT: &str = "Oh-Sent-At";

/// Why a session should be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartReason {
    /// Created by `POST /api/conversations`.
    Create,
    /// `POST /api/conversations/{id}/start`, or a client connected/acted on a stopped session.
    Start,
    /// Its owner went away (failover, drain).
    Resume,
}

/// A request, on the session's work subject, for some worker to run the session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartRequest {
    /// The session to run.
    pub session_id: SessionIdWire,
    /// Its owner (locates the metadata).
    pub user_id: UserIdWire,
    /// Why.
    pub reason: StartReason,
    /// When it was enqueued (ms since the Unix epoch).
    pub requested_at_ms: i64,
    /// A create's metadata as the gateway stored it a moment before, so that the claim of a
    /// conversation's first start does not read it back. Only on [`StartReason::Create`]
    /// requests (a later start reads what is stored then); a worker uses it only if it names
    /// the request's session and user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<crate::store::ConversationMeta>,
    /// A create's request whose create stored no action before it (no initial message):
    /// the claim of that first start does not read the action stream for actions stored
    /// before its feed subscribed. One a client sent in that window (the conversation is
    /// still starting) is found by the next action's gap or the worker's recheck (within 2 s).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_actions: bool,
}

/// Largest metadata (JSON bytes) a create's start request carries.
pub const CARRIED_META_MAX: usize = 16 * 1024;

/// A [`SessionId`] as it travels in JSON (validated again on receipt).
pub type SessionIdWire = String;
/// A [`UserId`] as it travels in JSON (validated again on receipt).
pub type UserIdWire = String;

/// Why a wire message was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not the expected JSON.
    #[error("malformed {what}: {source}")]
    Json {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A field held an invalid id.
    #[error("malformed {what}: {source}")]
    Id {
        /// What was being decoded.
        what: &'static str,
        /// The id error.
        #[source]
        source: crate::id::IdError,
    },
}

impl StartRequest {
    /// A new request stamped with the current time.
    pub fn new(sid: &SessionId, uid: &UserId, reason: StartReason) -> Self {
        Self {
            session_id: sid.to_string(),
            user_id: uid.to_string(),
            reason,
            requested_at_ms: chrono::Utc::now().timestamp_millis(),
            meta: None,
            no_actions: false,
        }
    }

    /// A create's request, carrying the metadata just stored if it is small (at most
    /// [`CARRIED_META_MAX`] bytes of JSON: a request stays far below NATS' message limit;
    /// larger metadata is read back by the claim). `initial`: the create stored an initial
    /// message (see [`Self::no_actions`]).
    pub fn create(
        meta: &crate::store::ConversationMeta,
        sid: &SessionId,
        uid: &UserId,
        initial: bool,
    ) -> Self {
        let small = serde_json::to_vec(meta).is_ok_and(|v| v.len() <= CARRIED_META_MAX);
        Self {
            meta: small.then(|| meta.clone()),
            no_actions: !initial,
            ..Self::new(sid, uid, StartReason::Create)
        }
    }

    /// Whether the claim may skip its look for actions stored before its feed (a create's
    /// request that says its create stored none, see [`Self::no_actions`]).
    pub fn nothing_stored_before(&self) -> bool {
        self.no_actions && self.reason == StartReason::Create
    }

    /// The metadata carried by a create's request, if it names `sid` and `uid`.
    pub fn carried_meta(
        &self,
        sid: &SessionId,
        uid: &UserId,
    ) -> Option<&crate::store::ConversationMeta> {
        self.meta.as_ref().filter(|m| {
            self.reason == StartReason::Create
                && m.conversation_id == sid.as_str()
                && m.user_id == uid.as_str()
        })
    }

    /// Decodes and validates a request received from NATS.
    ///
    /// # Errors
    /// [`WireError`] if the payload is not a valid start request.
    pub fn decode(payload: &[u8]) -> Result<(Self, SessionId, UserId), WireError> {
        let req: Self = serde_json::from_slice(payload).map_err(|source| WireError::Json {
            what: "start request",
            source,
        })?;
        let sid = SessionId::parse(&req.session_id).map_err(|source| WireError::Id {
            what: "start request",
            source,
        })?;
        let uid = UserId::parse(&req.user_id).map_err(|source| WireError::Id {
            what: "start request",
            source,
        })?;
        Ok((req, sid, uid))
    }

    /// The JSON payload.
    pub fn encode(&self) -> bytes::Bytes {
        // Strings, integers and lists of them always serialize.
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Control requests carried in the action stream (ordered with the user's actions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop the session: agent `stopped`, runtime closed, lease released.
    Stop,
    /// Run the session: nothing for a running one; after a `Stop`, it makes the stopping
    /// owner queue a start again (`/start` while the stop is in progress).
    Start,
}

impl Control {
    /// Header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Stop => "stop",
            Control::Start => "start",
        }
    }
    /// Parses a header value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stop" => Some(Control::Stop),
            "start" => Some(Control::Start),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ConversationMeta;

    fn meta(sid: &SessionId, uid: &UserId) -> ConversationMeta {
        ConversationMeta {
            conversation_id: sid.to_string(),
            user_id: uid.to_string(),
            title: "t".into(),
            created_at: "2026-11-29T00:00:00Z".into(),
            last_updated_at: "2026-11-29T00:00:00Z".into(),
            trigger: "gui".into(),
            selected_repository: Some("o/r".into()),
            selected_branch: None,
            git_provider: None,
            pr_number: vec![],
            conversation_instructions: Some("be brief".into()),
            replay_blob: None,
            llm: None,
        }
    }

    #[test]
    fn a_create_carries_its_metadata_and_only_for_its_own_session() {
        let (sid, uid) = (SessionId::generate(), UserId::parse("alice").unwrap());
        let req = StartRequest::create(&meta(&sid, &uid), &sid, &uid, false);
        assert!(req.nothing_stored_before());
        let (back, s2, u2) = StartRequest::decode(&req.encode()).unwrap();
        assert_eq!((&back, &s2, &u2), (&req, &sid, &uid));
        assert_eq!(back.carried_meta(&sid, &uid), Some(&meta(&sid, &uid)));
        // Not for another session or user, nor on any other kind of request.
        let other = SessionId::generate();
        assert_eq!(back.carried_meta(&other, &uid), None);
        assert_eq!(
            back.carried_meta(&sid, &UserId::parse("eve").unwrap()),
            None
        );
        let resume = StartRequest {
            reason: StartReason::Resume,
            ..back
        };
        assert_eq!(resume.carried_meta(&sid, &uid), None);
        assert!(
            !resume.nothing_stored_before(),
            "only a create's request says so"
        );
        let with_message = StartRequest::create(&meta(&sid, &uid), &sid, &uid, true);
        assert!(!with_message.nothing_stored_before());
        // Other requests carry none, and one written without the field reads as none.
        let plain = StartRequest::new(&sid, &uid, StartReason::Start);
        assert!(!String::from_utf8_lossy(&plain.encode()).contains("meta"));
        let old = format!(
            r#"{{"session_id":"{sid}","user_id":"alice","reason":"create","requested_at_ms":1}}"#
        );
        let (old, _, _) = StartRequest::decode(old.as_bytes()).unwrap();
        assert_eq!(old.carried_meta(&sid, &uid), None);
        assert!(
            !old.nothing_stored_before(),
            "an older gateway's create: look"
        );
        // Large metadata stays behind (the claim reads it).
        let mut big = meta(&sid, &uid);
        big.conversation_instructions = Some("x".repeat(CARRIED_META_MAX));
        let req = StartRequest::create(&big, &sid, &uid, false);
        assert_eq!(req.carried_meta(&sid, &uid), None);
        assert!(req.encode().len() < 1024);
    }
}
