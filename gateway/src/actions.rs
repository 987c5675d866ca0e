//! What a gateway writes: validated user actions (and control requests) on the session's
//! action subject, and start requests on its work subject. Used by both the socket and REST.

use async_nats::HeaderMap;
use bytes::Bytes;
use serde_json::Value;
use shared::event::{ActionError, UserAction};
use shared::id::{SessionId, UserId};
use shared::msg_id::{self, ActionMsgId, ClientMsgId, ClientMsgIdClaim};
use shared::status::{self, SessionState};
use shared::wire::{Control, HDR_CONTROL, HDR_USER, StartReason, StartRequest};
use tracing::warn;

use crate::app::{AppState, MAX_ACTION_BYTES};

/// Why an action was not accepted: the caller's mistake (the text is for the client), or
/// [`SendError::Unavailable`], a server fault whose text is for the log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("action too large: {size} bytes; the limit is {limit} bytes (4 MiB)", limit = MAX_ACTION_BYTES)]
    TooLarge { size: usize },
    #[error("invalid action: {0}")]
    Invalid(#[from] ActionError),
    #[error("invalid action: msg_id must be 1-64 characters of [A-Za-z0-9_-]")]
    BadMsgId,
    #[error("action not stored (JetStream): {0}")]
    Unavailable(String),
    #[error(
        "action not stored: the server's action queue is full (OH_QUEUE_MAX_MIB); try again later"
    )]
    QueueFull,
    #[error(
        "too many actions: the limit is OH_MESSAGE_RATE; retry in {} s",
        .0.as_secs().max(1)
    )]
    RateLimited(std::time::Duration),
    #[error(
        "msg_id {0:?} was already used for a different action in the last 2 minutes; the first one was kept and this one was not stored"
    )]
    MsgIdConflict(String),
}

impl SendError {
    /// Whether the server failed (rather than the caller).
    pub(crate) fn is_server_fault(&self) -> bool {
        matches!(self, SendError::Unavailable(_))
    }
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

/// A server-built action's JSON, refused like a client's if it is over the size limit.
pub(crate) fn checked_size(json: String) -> Result<Bytes, SendError> {
    if json.len() > MAX_ACTION_BYTES {
        return Err(SendError::TooLarge { size: json.len() });
    }
    Ok(Bytes::from(json))
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

/// A client's own `msg_id` may be reused only for the same action: the first action sent with
/// it wins (JetStream stores it once) and a different one under the same id within the
/// duplicate window is refused with [`SendError::MsgIdConflict`] before anything is
/// published. One Redis round trip, for actions that carry a `msg_id` only. If Redis does not
/// answer, the action goes through (JetStream still stores an id once).
pub(crate) async fn claim_msg_id(
    state: &AppState,
    sid: &SessionId,
    uid: &UserId,
    client_msg_id: &str,
    action: &Value,
) -> Result<Option<ClientMsgIdClaim>, SendError> {
    let mut redis = state.redis.clone();
    let names = state.store.names();
    let window = state.store.duplicate_window();
    let claim =
        msg_id::claim_client_msg_id(&mut redis, names, (uid, sid), client_msg_id, action, window);
    match claim.await {
        Ok(ClientMsgId::Ok(claim)) => Ok(Some(claim)),
        Ok(ClientMsgId::Conflict) => {
            metrics::counter!("oh_gateway_msg_id_conflicts_total").increment(1);
            Err(SendError::MsgIdConflict(client_msg_id.to_owned()))
        }
        Err(e) => {
            warn!(session_id = %sid, error = %e, "msg_id check skipped (Redis)");
            Ok(None)
        }
    }
}

/// Gives a first-used `msg_id` back after its action was not stored (see
/// [`msg_id::release_client_msg_id`]).
pub(crate) async fn release_msg_id(state: &AppState, claim: ClientMsgIdClaim) {
    let mut redis = state.redis.clone();
    if let Err(e) = msg_id::release_client_msg_id(&mut redis, claim).await {
        warn!(error = %e, "msg_id release failed; it expires by itself");
    }
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
    mut headers: HeaderMap,
    msg_id: &ActionMsgId,
) -> Result<u64, SendError> {
    // The worker that applies the action continues the caller's trace.
    shared::telemetry::inject_trace(&mut headers);
    let started = std::time::Instant::now();
    let res = state
        .store
        .publish_action(sid, payload, headers, msg_id)
        .await;
    metrics::histogram!("oh_gateway_action_publish_seconds").record(started.elapsed());
    match res {
        Ok(seq) => Ok(seq),
        Err(e) if e.is_storage_full() => {
            metrics::counter!("oh_gateway_action_publish_failed_total", "reason" => "full")
                .increment(1);
            warn!(session_id = %sid, "action queue full; action refused");
            Err(SendError::QueueFull)
        }
        Err(e) => {
            metrics::counter!("oh_gateway_action_publish_failed_total", "reason" => "error")
                .increment(1);
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
    enqueue_request(state, sid, StartRequest::new(sid, uid, reason)).await
}

/// [`enqueue`] for a request already built (a create's carries its metadata).
pub(crate) async fn enqueue_request(
    state: &AppState,
    sid: &SessionId,
    req: StartRequest,
) -> Result<bool, shared::store::StoreError> {
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
