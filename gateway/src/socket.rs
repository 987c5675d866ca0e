//! Socket.IO with OpenHands' connect semantics: query `conversation_id`
//! (required) and `latest_event_id` (default -1; `undefined` and `null` too, as OpenHands' UI
//! sends them); the user from `Authorization: Bearer` or the
//! connect payload `auth: {token}`. Refusals are CONNECT_ERROR packets `{message}` sent by the
//! connect middleware. Accepted sockets get the replay and then live events (`replay`).
//!
//! `oh_user_action` (and legacy `oh_action`) is validated, stored in JetStream, and only then
//! acknowledged. Every error goes to the sender only, as `oh_event` `{error: true, message}`
//! (and as the ack payload if the client asked for an ack). Errors are a [`SocketError`]: a
//! client mistake is told as is and not logged as an error; a server fault is logged once with
//! detail and the client reads a generic message (as `ApiError` on REST).
//!
//! A socket's tasks (resume check, forwarding) are spawned on the gateway's tracker and end
//! with the socket (its token, cancelled on disconnect) or on shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::event::{ack_payload, error_payload};
use shared::id::{SessionId, UserId};
use shared::msg_id::ActionMsgId;
use shared::store::StoreError;
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info_span};

use crate::actions::{self, SendError};
use crate::app::AppState;
use crate::replay::{Patience, patiently};

/// What the connect middleware learned, for the connect handler.
#[derive(Clone)]
pub(crate) struct Conn {
    pub(crate) sid: SessionId,
    pub(crate) uid: UserId,
    pub(crate) latest: i64,
    cancel: CancellationToken,
    /// Whether the connect handler has run (the socket gauge counts it once).
    counted: Arc<AtomicBool>,
    /// What the client has read (its send budget, see `sendbuf`).
    pub(crate) drain: Arc<crate::sendbuf::Drain>,
}

/// Why a connection was refused. The text is what the client sees as `err.message`.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("No conversation_id in query params")]
    NoConversation,
    #[error("Invalid conversation_id: {0}")]
    BadConversation(shared::id::IdError),
    #[error("latest_event_id must be an integer >= -1")]
    BadCursor,
    #[error("latest_event_id {latest} is beyond the newest event {head}")]
    CursorAhead { latest: i64, head: i64 },
    #[error("Invalid token")]
    BadToken,
    #[error("Conversation not found")]
    NotFound,
    #[error("Too many open connections for this user (the limit is {0}, OH_MAX_SOCKETS_PER_USER)")]
    TooManySockets(u32),
    /// A server fault (the store did not answer), logged when it is made.
    #[error("{INTERNAL_ERROR}")]
    Server,
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        metrics::counter!("oh_gateway_connect_refused_total", "reason" => "server").increment(1);
        error!(error = %e, "connect refused: store unavailable");
        Refusal::Server
    }
}

/// How long a connect's reads are tried again while NATS fails transiently (the client
/// waits rather than being refused): no new try starts later than this after the first, so
/// the middleware ends within this plus one JetStream request timeout (5 s) and a Redis round
/// trip, inside the gateway's Socket.IO connect timeout (20 s, see `app`).
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// How long after its middleware a connect must have reached `on_connect` (socketioxide runs
/// it right after the CONNECT packet; a socket that never does was dropped) before what it
/// took is given back.
const CONNECT_CONFIRM: Duration = Duration::from_secs(10);

/// Connects past the middleware that have not reached `on_connect` yet. A client that left
/// while the middleware waited (e.g. on a log read while NATS recovers) gets no CONNECT:
/// socketioxide drops that socket and runs neither `on_connect` nor `on_disconnect`, so what
/// the middleware took (the socket's drain, its slot in the user's socket set, refreshed as
/// long as it is held) is given back here after [`CONNECT_CONFIRM`].
#[derive(Default)]
pub(crate) struct Unconfirmed(Mutex<HashMap<String, Taken>>);

struct Taken {
    at: Instant,
    uid: UserId,
    member: String,
}

impl Unconfirmed {
    fn insert(&self, socket: String, uid: &UserId, member: String) {
        if let Ok(mut m) = self.0.lock() {
            let uid = uid.clone();
            m.insert(
                socket,
                Taken {
                    at: Instant::now(),
                    uid,
                    member,
                },
            );
        }
    }

    fn confirm(&self, socket: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(socket);
        }
    }

    fn expired(&self) -> Vec<(String, Taken)> {
        let Ok(mut m) = self.0.lock() else {
            return Vec::new();
        };
        let old: Vec<String> = m
            .iter()
            .filter(|(_, t)| t.at.elapsed() >= CONNECT_CONFIRM)
            .map(|(k, _)| k.clone())
            .collect();
        old.into_iter()
            .filter_map(|k| m.remove(&k).map(|t| (k, t)))
            .collect()
    }
}

/// Gives back what unconfirmed connects took, every [`CONNECT_CONFIRM`], until `cancel`.
pub(crate) async fn confirm_loop(state: AppState, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(CONNECT_CONFIRM) => {}
        }
        for (socket, t) in state.unconfirmed.expired() {
            metrics::counter!("oh_gateway_connects_abandoned_total").increment(1);
            debug!(%socket, user_id = %t.uid, "connect never completed; what it took is given back");
            release(&state, &socket, &t.uid, &t.member).await;
        }
    }
}

/// What a client reads when the server failed; the detail is in the log.
pub(crate) const INTERNAL_ERROR: &str = "internal error; try again";

/// Why a socket request failed.
#[derive(Debug, thiserror::Error)]
enum SocketError {
    /// The client's mistake: a payload that is not JSON.
    #[error("invalid action: payload is not JSON ({0})")]
    NotJson(String),
    /// The client's mistake: the action is refused (invalid, too large, bad or reused
    /// `msg_id`); the text says which.
    #[error(transparent)]
    Refused(SendError),
    /// A server fault (NATS did not store the action); logged, never shown.
    #[error("{INTERNAL_ERROR}")]
    Server(SendError),
}

impl From<SendError> for SocketError {
    fn from(e: SendError) -> Self {
        if e.is_server_fault() {
            SocketError::Server(e)
        } else {
            SocketError::Refused(e)
        }
    }
}

impl SocketError {
    /// Logs it once: a server fault at `error` with its detail, a client mistake at `debug`.
    fn log(&self) {
        match self {
            SocketError::Server(detail) => error!(error = %detail, "action not stored"),
            client => debug!(message = %client, "action refused"),
        }
    }
}

pub(crate) fn register(io: &SocketIo, cancel: CancellationToken) {
    let handler = move |s: SocketRef, state: State<AppState>| {
        let cancel = cancel.clone();
        async move { on_connect(s, state, cancel) }
    };
    io.ns("/", handler.with(authorize));
}

fn query_params(s: &SocketRef) -> Vec<(String, String)> {
    let q = s.req_parts().uri.query().unwrap_or("");
    url_decode_pairs(q)
}

fn url_decode_pairs(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn bearer(s: &SocketRef, auth: Option<&Value>) -> Option<String> {
    let header = s
        .req_parts()
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(shared::config::bearer_token)
        .map(str::to_owned);
    header.or_else(|| {
        auth.and_then(|a| a.get("token"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    })
}

async fn authorize(
    s: SocketRef,
    State(state): State<AppState>,
    TryData(auth): TryData<Value>,
) -> Result<(), Refusal> {
    let params = query_params(&s);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let uid = state
        .auth
        .user_for(bearer(&s, auth.as_ref().ok()).as_deref())
        .ok_or(Refusal::BadToken)?;
    let raw_sid = get("conversation_id")
        .filter(|v| !v.is_empty())
        .ok_or(Refusal::NoConversation)?;
    let sid = SessionId::parse(raw_sid).map_err(Refusal::BadConversation)?;
    let latest = match get("latest_event_id") {
        // OpenHands' UI reconnecting before any event arrived sends its unset cursor as
        // `undefined`; OpenHands reads that (and `null`) as -1: replay everything.
        None | Some("" | "undefined" | "null") => -1,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= -1)
            .ok_or(Refusal::BadCursor)?,
    };
    // Reads are tried again while NATS fails transiently (a reconnect storm, an election):
    // the client waits rather than being refused, within one deadline for the connect.
    let mut patience = Patience::new(CONNECT_PATIENCE, "connect");
    // A conversation this gateway created moments ago is known to exist (see `recent`).
    if !state.recent.fresh(&sid, &uid)
        && patiently(&mut patience, || true, || state.store.get_meta(&uid, &sid))
            .await
            .ok_or(Refusal::Server)??
            .is_none()
    {
        metrics::counter!("oh_gateway_connect_refused_total", "reason" => "not_found").increment(1);
        return Err(Refusal::NotFound);
    }
    if latest >= 0 {
        let head = patiently(&mut patience, || true, || state.store.last_event(&sid))
            .await
            .ok_or(Refusal::Server)??
            .map_or(-1, |h| i64::try_from(h.id).unwrap_or(i64::MAX));
        if latest > head {
            return Err(Refusal::CursorAhead { latest, head });
        }
    }
    let member = socket_member(&state, &s);
    if let Some(cap) = state.limits.max_sockets {
        if !crate::limits::admit(&state, shared::quota::Capped::Sockets, &uid, &member, cap).await {
            return Err(Refusal::TooManySockets(cap));
        }
        state.held_sockets.insert(member.clone(), uid.clone());
    }
    let drain = Arc::new(crate::sendbuf::Drain::for_socket(s.req_parts()));
    state.drains.insert(s.id.to_string(), Arc::clone(&drain));
    state.unconfirmed.insert(s.id.to_string(), &uid, member);
    s.extensions.insert(Conn {
        sid,
        uid,
        latest,
        cancel: CancellationToken::new(),
        counted: Arc::new(AtomicBool::new(false)),
        drain,
    });
    // Handlers go on here, before the CONNECT packet is sent: socketioxide runs the connect
    // handler in a task of its own, and an event the client emits right after `connect` could
    // otherwise reach a socket with no handler and be dropped.
    s.on("oh_user_action", on_action);
    s.on("oh_action", on_action);
    s.on_disconnect(on_disconnect);
    Ok(())
}

fn on_connect(s: SocketRef, State(state): State<AppState>, shutdown: CancellationToken) {
    let Some(conn) = s.extensions.get::<Conn>() else {
        // The middleware always inserts it before the handler runs.
        let _ = s.disconnect();
        return;
    };
    state.unconfirmed.confirm(&s.id.to_string());
    if !conn.counted.swap(true, Ordering::Relaxed) {
        metrics::gauge!("oh_gateway_sockets").increment(1.0);
    }
    let span = info_span!("socket", session_id = %conn.sid, user_id = %conn.uid, sid = %s.id);
    let cancel = conn.cancel.clone();
    let st = state.clone();
    let tasks = state.tasks.clone();
    let (sid, uid) = (conn.sid.clone(), conn.uid.clone());
    tasks.spawn(
        async move {
            // Connecting to a conversation that no worker runs resumes it.
            actions::ensure_running(&st, &sid, &uid).await;
        }
        .instrument(span.clone()),
    );
    tasks.spawn(
        async move {
            tokio::select! {
                () = crate::replay::forward(state, s, &conn, cancel) => {}
                () = shutdown.cancelled() => {}
            }
        }
        .instrument(span),
    );
}

/// This socket's member in its user's socket set.
fn socket_member(state: &AppState, s: &SocketRef) -> String {
    format!("{}:{}", state.gateway_id, s.id)
}

/// Gives back what a connect took: its drain, and its slot in the user's socket set.
async fn release(state: &AppState, socket: &str, uid: &UserId, member: &str) {
    state.drains.remove(socket);
    if state.limits.max_sockets.is_some() {
        state.held_sockets.remove(member);
        let set = shared::quota::Capped::Sockets;
        crate::limits::release(state, set, uid, member).await;
    }
}

async fn on_disconnect(s: SocketRef, State(state): State<AppState>) {
    if let Some(conn) = s.extensions.get::<Conn>() {
        conn.cancel.cancel();
        state.unconfirmed.confirm(&s.id.to_string());
        release(
            &state,
            &s.id.to_string(),
            &conn.uid,
            &socket_member(&state, &s),
        )
        .await;
        // Counted once by whichever of connect and disconnect comes first.
        if conn.counted.swap(true, Ordering::Relaxed) {
            metrics::gauge!("oh_gateway_sockets").decrement(1.0);
        }
    }
}

async fn on_action(
    s: SocketRef,
    State(state): State<AppState>,
    TryData(data): TryData<Value>,
    ack: AckSender,
) {
    let Some(conn) = s.extensions.get::<Conn>() else {
        return;
    };
    let span = info_span!("action", session_id = %conn.sid, user_id = %conn.uid, sid = %s.id);
    let result = async {
        let payload = data.map_err(|e| SocketError::NotJson(e.to_string()))?;
        let valid = actions::validate(&payload)?;
        let rate = state.limits.message;
        if let shared::quota::Verdict::Limited(wait) =
            crate::limits::take(&state, "message", &conn.uid, rate).await
        {
            return Err(SendError::RateLimited(wait).into());
        }
        let (msg_id, claim) = match &valid.client_msg_id {
            Some(id) => {
                let claim =
                    actions::claim_msg_id(&state, &conn.sid, &conn.uid, id, &payload).await?;
                (ActionMsgId::client(&conn.uid, &conn.sid, id), claim)
            }
            None => (ActionMsgId::fresh(), None),
        };
        let sent = actions::send(&state, &conn.sid, &conn.uid, valid.raw, &msg_id).await;
        if sent.is_err()
            && let Some(claim) = claim
        {
            actions::release_msg_id(&state, claim).await;
        }
        Ok::<_, SocketError>(sent?)
    }
    .instrument(span.clone())
    .await;
    match result {
        Ok(seq) => {
            metrics::counter!("oh_gateway_actions_total", "result" => "stored").increment(1);
            let _ = ack.send(&ack_payload(seq)); // no ack requested is fine
        }
        Err(e) => {
            let result = match e {
                SocketError::Server(_) => "failed",
                _ => "refused",
            };
            metrics::counter!("oh_gateway_actions_total", "result" => result).increment(1);
            span.in_scope(|| e.log());
            let body = error_payload(&e.to_string());
            let _ = s.emit("oh_event", &body); // the sender may be gone; nothing else to tell
            let _ = ack.send(&body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let p = url_decode_pairs("conversation_id=ab%2Fc&latest_event_id=-1&x=a+b&bad=%zz");
        assert_eq!(p[0], ("conversation_id".into(), "ab/c".into()));
        assert_eq!(p[1], ("latest_event_id".into(), "-1".into()));
        assert_eq!(p[2], ("x".into(), "a b".into()));
        assert_eq!(p[3], ("bad".into(), "%zz".into()));
    }
}
