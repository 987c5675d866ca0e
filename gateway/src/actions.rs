//! What a gateway writes: validated user actions (and control requests) on the session's
//! action subject, and start requests on its work subject. Used by both the socket and REST.

use async_nats::HeaderMap;
use bytes::Bytes;
use serde_json::Value;
use shared::event::{ActionError, UserAction};
use shared::id::{SessionId, UserId};
use shared::queue::ActionMsgId;
use shared::status::{self, SessionState};
use shared::wire::{Control, HDR_CONTROL, HDR_USER, StartReason, StartRequest};
use tracing::warn;

use crate::app::{AppState, MAX_ACTION_BYTES};

/// Why an action was not accepted. Every variant is the caller's to see.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("action too large: {size} bytes; the limit is {limit} bytes (4 MiB)", limit = MAX_ACTION_BYTES)]
    TooLarge { size: usize },
    #[error("invalid action: {0}")]
    Invalid(#[from] ActionError),
    #[error("invalid action: msg_id must be 1-64 characters of [A-Za-z0-9_-]")]
    BadMsgId,
    #[error("action not stored (JetStream): {0}; please retry")]
    Unavailable(String),
    #[error(
        "msg_id {0:?} was already used for a different action in the last 2 minutes; the first one was kept and this one was not stored"
    )]
    MsgIdConflict(String),
}

/// A validated action, ready to publish.
pub(crate) struct Validated {
    /// The action JSON to store (without `msg_id`).
    pub(crate) raw: Bytes,
    /// The client's own id for this action, if it gave one: retries with the same id are
    /// stored once (JetStream dedup window, 2 minutes).
    pub(crate) client_msg_id: Option<String>,
}

/// Validates `payload` (an `oh_user_action` dict, optionally with a top-level `msg_id`).
pub(crate) fn validate(payload: &Value) -> Result<Validated, SendError> {
    let raw = serde_json::to_vec(payload).map_err(|e| SendError::Unavailable(e.to_string()))?;
    if raw.len() > MAX_ACTION_BYTES {
        return Err(SendError::TooLarge { size: raw.len() });
    }
    if let Some(obj) = payload.as_object()
        && let Some(id) = obj.get("msg_id")
    {
        let id = id
            .as_str()
            .and_then(|s| shared::id::SessionId::parse(s).ok())
            .ok_or(SendError::BadMsgId)?;
        let mut stripped = obj.clone();
        stripped.remove("msg_id");
        let stripped = Value::Object(stripped);
        UserAction::parse(&stripped)?;
        let raw =
            serde_json::to_vec(&stripped).map_err(|e| SendError::Unavailable(e.to_string()))?;
        return Ok(Validated {
            raw: Bytes::from(raw),
            client_msg_id: Some(id.to_string()),
        });
    }
    UserAction::parse(payload)?;
    Ok(Validated {
        raw: Bytes::from(raw),
        client_msg_id: None,
    })
}

/// Publishes a validated action and waits for JetStream to store it. Returns the stream
/// sequence. If no worker owns the session, a start request is queued too.
pub(crate) async fn send(
    state: &AppState,
    sid: &SessionId,
    uid: &UserId,
    payload: Bytes,
    msg_id: &ActionMsgId,
) -> Result<u64, SendError> {
    let mut headers = HeaderMap::new();
    headers.insert(HDR_USER, uid.as_str());
    // The owner lookup runs beside the publish, not after it: no extra round trip on the
    // path of every message. A start request queued for a publish that then fails is harmless.
    let (seq, ()) = tokio::join!(
        publish(state, sid, payload, headers, msg_id),
        ensure_running(state, sid, uid)
    );
    seq
}

/// Publishes a validated action without checking that the session runs (the caller queues
/// the start itself, e.g. at creation).
pub(crate) async fn send_stored_only(
    state: &AppState,
    sid: &SessionId,
    uid: &UserId,
    payload: Bytes,
    msg_id: &ActionMsgId,
) -> Result<u64, SendError> {
    let mut headers = HeaderMap::new();
    headers.insert(HDR_USER, uid.as_str());
    publish(state, sid, payload, headers, msg_id).await
}

/// A client's own `msg_id` taken for one action (see [`claim_msg_id`]).
pub(crate) struct MsgIdClaim {
    key: String,
    digest: String,
    /// This call recorded the digest (first use of the id).
    first: bool,
}

/// A client's own `msg_id` may be reused only for the same action: the first action sent with
/// it wins (JetStream stores it once) and a different one under the same id within the
/// duplicate window is refused with [`SendError::MsgIdConflict`] before anything is
/// published. "The same action" is the same JSON value (key order does not matter). Costs one
/// Redis round trip, for actions that carry a `msg_id` only. If Redis does not answer, the
/// action goes through (JetStream still stores an id once).
pub(crate) async fn claim_msg_id(
    state: &AppState,
    sid: &SessionId,
    uid: &UserId,
    client_msg_id: &str,
    action: &Value,
) -> Result<Option<MsgIdClaim>, SendError> {
    use sha2::Digest;
    let digest = hex(&sha2::Sha256::digest(canonical(action).as_bytes()));
    let key = state.store.names().msg_id_key(uid, sid, client_msg_id);
    // Outlives JetStream's window, which starts later (when the message is stored).
    let hold = shared::store::DUPLICATE_WINDOW + std::time::Duration::from_secs(30);
    let hold = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
    let mut redis = state.redis.clone();
    // SET NX ... GET: the previous digest if the id was taken, nil if this call took it.
    let res: redis::RedisResult<Option<String>> = redis::cmd("SET")
        .arg(&key)
        .arg(&digest)
        .arg("NX")
        .arg("GET")
        .arg("PX")
        .arg(hold)
        .query_async(&mut redis)
        .await;
    match res {
        Ok(Some(first)) if first != digest => {
            metrics::counter!("oh_gateway_msg_id_conflicts_total").increment(1);
            Err(SendError::MsgIdConflict(client_msg_id.to_owned()))
        }
        Ok(previous) => Ok(Some(MsgIdClaim {
            key,
            digest,
            first: previous.is_none(),
        })),
        Err(e) => {
            warn!(session_id = %sid, error = %e, "msg_id check skipped (Redis)");
            Ok(None)
        }
    }
}

/// Gives a first-used `msg_id` back after its action was not stored, so the client may send
/// another action under it. Compare-and-delete: a retry that re-took it keeps it.
pub(crate) async fn release_msg_id(state: &AppState, claim: MsgIdClaim) {
    if !claim.first {
        return;
    }
    // The lease's compare-and-delete: the key goes only if it still holds our digest.
    let held = shared::ownership::Lease {
        key: claim.key,
        token: claim.digest,
    };
    let mut redis = state.redis.clone();
    if let Err(e) = shared::ownership::release(&mut redis, &held).await {
        warn!(error = %e, "msg_id release failed; it expires by itself");
    }
}

/// JSON with object keys sorted, for a digest that does not depend on key order.
fn canonical(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sorted(&m[k])))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}"); // writing to a String cannot fail
        s
    })
}

/// Publishes a control request (ordered with the user's actions).
pub(crate) async fn send_control(
    state: &AppState,
    sid: &SessionId,
    uid: &UserId,
    ctl: Control,
) -> Result<u64, SendError> {
    let mut headers = HeaderMap::new();
    headers.insert(HDR_USER, uid.as_str());
    headers.insert(HDR_CONTROL, ctl.as_str());
    publish(state, sid, Bytes::new(), headers, &ActionMsgId::fresh()).await
}

async fn publish(
    state: &AppState,
    sid: &SessionId,
    payload: Bytes,
    headers: HeaderMap,
    msg_id: &ActionMsgId,
) -> Result<u64, SendError> {
    let started = std::time::Instant::now();
    let res = state
        .store
        .publish_action(sid, payload, headers, msg_id)
        .await;
    metrics::histogram!("oh_gateway_action_publish_seconds").record(started.elapsed());
    match res {
        Ok(seq) => Ok(seq),
        Err(e) => {
            metrics::counter!("oh_gateway_action_publish_failed_total").increment(1);
            Err(SendError::Unavailable(e.to_string()))
        }
    }
}

/// Queues a start request unless a worker owns the session. Best effort: a failure is logged,
/// the action itself is already stored and runs when the session next starts.
pub(crate) async fn ensure_running(state: &AppState, sid: &SessionId, uid: &UserId) {
    let mut redis = state.redis.clone();
    match shared::ownership::owner(&mut redis, state.store.names(), sid).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            if let Err(e) = enqueue(state, sid, uid, StartReason::Start).await {
                warn!(session_id = %sid, error = %e, "start request failed");
            }
        }
        Err(e) => warn!(session_id = %sid, error = %e, "owner lookup failed"),
    }
}

/// Marks the session queued and puts a start request in the work queue (at most one queued
/// per session). Returns `false` if one was already queued.
pub(crate) async fn enqueue(
    state: &AppState,
    sid: &SessionId,
    uid: &UserId,
    reason: StartReason,
) -> Result<bool, shared::store::StoreError> {
    let req = StartRequest::new(sid, uid, reason);
    let queued = state.store.enqueue_start(&req).await?;
    if queued {
        let mut redis = state.redis.clone();
        let res = status::write(
            &mut redis,
            state.store.names(),
            sid,
            status::Update {
                state: Some(SessionState::Queued),
                ..Default::default()
            },
        )
        .await;
        if let Err(e) = res {
            warn!(session_id = %sid, error = %e, "status write failed");
        }
    }
    Ok(queued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_ignores_key_order_only() {
        let a = serde_json::json!({"b": 1, "a": {"d": [2, {"y": 1, "x": 0}], "c": 3}});
        let b = serde_json::json!({"a": {"c": 3, "d": [2, {"x": 0, "y": 1}]}, "b": 1});
        assert_eq!(canonical(&a), canonical(&b));
        let c = serde_json::json!({"a": {"c": 3, "d": [{"x": 0, "y": 1}, 2]}, "b": 1});
        assert_ne!(canonical(&a), canonical(&c), "array order matters");
    }
}
