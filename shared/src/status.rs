//! Live status of a session: a Redis hash `{ns}:status:{sid}` written by whoever changes it
//! (gateway: queued/stopped on request; worker: running, agent state, last event id).
//! Cheap to read for REST; rebuildable, never the source of truth for events.

use std::collections::HashMap;

use redis::aio::ConnectionManager;

use crate::id::SessionId;
use crate::names::Names;

/// Where a session is in its life, as far as scheduling goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// A start request waits in the work queue for a worker with a free slot.
    Queued,
    /// A worker runs it.
    Running,
    /// Not running; the next start or connect resumes it.
    Stopped,
    /// Start failed; `reason` says why.
    Error,
}

impl SessionState {
    /// Stored string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Error => "error",
        }
    }
    /// Parses a stored string.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "stopped" => Self::Stopped,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

/// A snapshot of the status hash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Scheduling state (None: never recorded, e.g. after Redis was emptied).
    pub state: Option<SessionState>,
    /// The agent state string (OpenHands `AgentState`).
    pub agent_state: Option<String>,
    /// Owner recorded with the status (the lease is authoritative).
    pub worker_id: Option<String>,
    /// Last update, ms since the Unix epoch.
    pub updated_ms: Option<i64>,
    /// Newest event id appended.
    pub last_event_id: Option<u64>,
    /// Error text when `state` is `error`.
    pub reason: Option<String>,
}

/// Reads the status of a session.
///
/// # Errors
/// The Redis error if the read failed.
pub async fn read(
    conn: &mut ConnectionManager,
    names: &Names,
    sid: &SessionId,
) -> redis::RedisResult<Status> {
    let map: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(names.status_key(sid))
        .query_async(conn)
        .await?;
    Ok(Status {
        state: map.get("state").and_then(|s| SessionState::parse(s)),
        agent_state: map.get("agent_state").cloned(),
        worker_id: map.get("worker_id").filter(|w| !w.is_empty()).cloned(),
        updated_ms: map.get("updated_ms").and_then(|s| s.parse().ok()),
        last_event_id: map.get("last_event_id").and_then(|s| s.parse().ok()),
        reason: map.get("reason").filter(|r| !r.is_empty()).cloned(),
    })
}

/// Fields to set in one write; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Update<'a> {
    /// New scheduling state.
    pub state: Option<SessionState>,
    /// New agent state.
    pub agent_state: Option<&'a str>,
    /// New owner (`Some("")` clears it).
    pub worker_id: Option<&'a str>,
    /// Newest event id.
    pub last_event_id: Option<u64>,
    /// Error text (`Some("")` clears it).
    pub reason: Option<&'a str>,
}

/// Writes the given fields (and `updated_ms`) in one `HSET`.
///
/// # Errors
/// The Redis error if the write failed.
pub async fn write(
    conn: &mut ConnectionManager,
    names: &Names,
    sid: &SessionId,
    up: Update<'_>,
) -> redis::RedisResult<()> {
    let mut cmd = redis::cmd("HSET");
    cmd.arg(names.status_key(sid))
        .arg("updated_ms")
        .arg(chrono::Utc::now().timestamp_millis());
    if let Some(s) = up.state {
        cmd.arg("state").arg(s.as_str());
    }
    if let Some(a) = up.agent_state {
        cmd.arg("agent_state").arg(a);
    }
    if let Some(w) = up.worker_id {
        cmd.arg("worker_id").arg(w);
    }
    if let Some(id) = up.last_event_id {
        cmd.arg("last_event_id").arg(id);
    }
    if let Some(r) = up.reason {
        cmd.arg("reason").arg(r);
    }
    cmd.query_async::<()>(conn).await
}

/// Deletes the status of a session (conversation deleted).
///
/// # Errors
/// The Redis error if the delete failed.
pub async fn delete(
    conn: &mut ConnectionManager,
    names: &Names,
    sid: &SessionId,
) -> redis::RedisResult<()> {
    redis::cmd("DEL")
        .arg(names.status_key(sid))
        .query_async::<()>(conn)
        .await
}
