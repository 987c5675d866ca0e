//! Message ids of user actions, both sides: the `Nats-Msg-Id` formats under which gateways
//! publish actions ([`ActionMsgId`]; JetStream stores a second publish with the same id within
//! its duplicate window only once), and the guard on a client's own `msg_id`
//! ([`claim_client_msg_id`]): the first action sent with it wins and a different action under
//! the same id is refused rather than silently dropped by that dedup. (Events have their own
//! id format, owned by [`crate::journal`].)

use redis::aio::ConnectionManager;
use serde_json::Value;

use crate::id::{SessionId, UserId};
use crate::names::Names;

/// The `Nats-Msg-Id` of a published action: what makes its retries idempotent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionMsgId {
    id: String,
    /// The client's own `msg_id`, for an action sent with one.
    client: Option<String>,
}

impl ActionMsgId {
    /// A new id, for an action published once (control requests, client actions without
    /// their own id).
    pub fn fresh() -> Self {
        Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            client: None,
        }
    }

    /// The id of a conversation's initial message: created twice (a retried create), stored
    /// once.
    pub fn initial(sid: &SessionId) -> Self {
        Self {
            id: format!("{sid}:initial"),
            client: None,
        }
    }

    /// The id of an action the client sent with its own `msg_id` (already validated): the
    /// client's retries are stored once. Scoped by user and session, so two clients' ids never
    /// collide.
    pub fn client(uid: &UserId, sid: &SessionId, client_msg_id: &str) -> Self {
        Self {
            id: format!("{uid}:{sid}:{client_msg_id}"),
            client: Some(client_msg_id.to_owned()),
        }
    }

    /// The client's own `msg_id`, if the action was sent with one (it travels in
    /// [`crate::wire::HDR_CLIENT_MSG_ID`] so the owner can recognise a retry JetStream no
    /// longer dedupes).
    pub fn client_msg_id(&self) -> Option<&str> {
        self.client.as_deref()
    }

    /// The header value.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

/// A client's `msg_id` recorded for one action (see [`claim_client_msg_id`]).
#[derive(Debug)]
pub struct ClientMsgIdClaim {
    key: String,
    digest: String,
    /// This call recorded the digest (first use of the id).
    first: bool,
}

/// What [`claim_client_msg_id`] found.
#[derive(Debug)]
pub enum ClientMsgId {
    /// First use, or a retry of the same action: publish it.
    Ok(ClientMsgIdClaim),
    /// The id was used for a different action within the duplicate window: refuse this one.
    Conflict,
}

/// Records the digest of `action` under the client's `msg_id`, or finds the one recorded
/// first. "The same action" is the same JSON value (object key order does not matter). One
/// Redis round trip (`SET NX GET`); the record outlives JetStream's duplicate window.
///
/// # Errors
/// The Redis error if the command could not be run (the caller may publish anyway: JetStream
/// still stores an id once).
pub async fn claim_client_msg_id(
    conn: &mut ConnectionManager,
    names: &Names,
    (uid, sid): (&UserId, &SessionId),
    client_msg_id: &str,
    action: &Value,
    window: std::time::Duration,
) -> redis::RedisResult<ClientMsgId> {
    let digest = crate::snapshot::sha256_hex(canonical(action).as_bytes());
    let key = names.msg_id_key(uid, sid, client_msg_id);
    // Outlives JetStream's window, which starts later (when the message is stored).
    let hold = window + std::time::Duration::from_secs(30);
    let hold = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
    // SET NX ... GET: the previous digest if the id was taken, nil if this call took it.
    let previous: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&digest)
        .arg("NX")
        .arg("GET")
        .arg("PX")
        .arg(hold)
        .query_async(conn)
        .await?;
    Ok(match previous {
        Some(first) if first != digest => ClientMsgId::Conflict,
        previous => ClientMsgId::Ok(ClientMsgIdClaim {
            key,
            digest,
            first: previous.is_none(),
        }),
    })
}

/// Deletes the key only while it still holds our digest.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Gives a first-used `msg_id` back after its action was not stored, so the client may send
/// another action under it. Compare-and-delete: a retry that re-took it keeps it.
///
/// # Errors
/// The Redis error if the script could not be run (the record expires by itself).
pub async fn release_client_msg_id(
    conn: &mut ConnectionManager,
    claim: ClientMsgIdClaim,
) -> redis::RedisResult<()> {
    if !claim.first {
        return Ok(());
    }
    redis::Script::new(RELEASE)
        .key(&claim.key)
        .arg(&claim.digest)
        .invoke_async::<i64>(conn)
        .await
        .map(drop)
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

    #[test]
    fn action_msg_ids_are_scoped() {
        let (sid, uid) = (
            SessionId::parse("s1").unwrap(),
            UserId::parse("u1").unwrap(),
        );
        assert_eq!(ActionMsgId::initial(&sid).as_str(), "s1:initial");
        assert_eq!(ActionMsgId::client(&uid, &sid, "m").as_str(), "u1:s1:m");
        assert_ne!(ActionMsgId::fresh(), ActionMsgId::fresh());
    }
}
