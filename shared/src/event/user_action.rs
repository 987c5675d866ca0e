//! [`UserAction`]: a validated client payload (`oh_user_action`).

use std::sync::LazyLock;

use serde_json::{Map, Value};

use super::{AgentState, Event, EventError, Kind, Source};

/// Why a client payload was refused as a user action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The payload is not a JSON object.
    #[error("user action is not a JSON object")]
    NotAnObject,
    /// No string `action` key (observations are refused).
    #[error("user action has no `action` type (observations are not accepted)")]
    NotAnAction,
    /// The payload carries an `id`: only the server assigns ids.
    #[error("user action must not carry an `id`")]
    HasId,
    /// The action type has no event class.
    #[error("unknown action type `{0}`")]
    UnknownAction(String),
    /// Missing or mistyped fields (or the legacy flat format).
    #[error("invalid `{action}` action: {reason}")]
    InvalidArgs {
        /// The action type.
        action: String,
        /// What is wrong.
        reason: String,
    },
}

/// A client action, parsed with the stored-event rules, normalized and with
/// every default field filled. Client-supplied `source`, `timestamp` and `message` are
/// dropped: the append path sets them ([`UserAction::into_event`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UserAction {
    /// Invariant: a known action type, with no id, timestamp or source.
    event: Event,
}

impl UserAction {
    /// Validates a client payload.
    ///
    /// # Errors
    /// [`ActionError::NotAnObject`], [`ActionError::HasId`], [`ActionError::NotAnAction`]
    /// (no string `action`, e.g. an observation), [`ActionError::UnknownAction`], and
    /// [`ActionError::InvalidArgs`] for anything else the event parser refuses.
    pub fn parse(value: &Value) -> Result<UserAction, ActionError> {
        let Value::Object(map) = value else {
            return Err(ActionError::NotAnObject);
        };
        if map.contains_key("id") {
            return Err(ActionError::HasId);
        }
        let Some(Value::String(action)) = map.get("action") else {
            return Err(ActionError::NotAnAction);
        };
        let event = Event::from_value(value.clone()).map_err(|e| match e {
            EventError::UnknownAction(t) => ActionError::UnknownAction(t),
            other => ActionError::InvalidArgs {
                action: action.clone(),
                reason: other.to_string(),
            },
        })?;
        let mut event = event.normalize().with_defaults();
        event.id = None;
        event.timestamp = None;
        event.source = None;
        event.message = String::new();
        Ok(UserAction { event })
    }

    /// The action type, e.g. `message`.
    pub fn action_type(&self) -> &str {
        self.event.action_type().unwrap_or_default()
    }

    /// The normalized args (defaults filled).
    pub fn args(&self) -> &Map<String, Value> {
        // Never used: the event is always an action (type invariant).
        static EMPTY: LazyLock<Map<String, Value>> = LazyLock::new(Map::new);
        match &self.event.kind {
            Kind::Action { args, .. } => args,
            Kind::Observation { .. } => &EMPTY,
        }
    }

    /// The text of a `message` action.
    pub fn as_message(&self) -> Option<&str> {
        (self.action_type() == "message")
            .then(|| self.args().get("content").and_then(Value::as_str))
            .flatten()
    }

    /// The requested state of a `change_agent_state` action.
    pub fn as_change_agent_state(&self) -> Option<AgentState> {
        (self.action_type() == "change_agent_state")
            .then(|| self.args().get("agent_state").and_then(Value::as_str))
            .flatten()
            .map(AgentState::from_wire)
    }

    /// A user `message` built by the server (e.g. a conversation's initial message), with the
    /// URLs of its images.
    pub fn message(content: impl Into<String>, image_urls: Vec<String>) -> UserAction {
        let mut event = Event::message(Source::User, content, false);
        event.source = None;
        event.message = String::new();
        if let Kind::Action { args, .. } = &mut event.kind {
            args.insert("image_urls".into(), image_urls.into());
        }
        UserAction { event }
    }

    /// The validated payload as compact JSON (no id, timestamp or source); parsing it again
    /// with [`UserAction::parse`] gives the same action.
    pub fn to_json(&self) -> String {
        self.event.to_json()
    }

    /// The event to store: source `user`, the given id and timestamp, derived `message`.
    pub fn into_event(self, id: u64, timestamp: String) -> Event {
        let mut event = self.event.with_meta(id, timestamp, Source::User);
        event.message = event.derived_message();
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_built_message_is_a_valid_user_action() {
        let action = UserAction::message("hello", vec!["http://x/a.png".into()]);
        let value: Value = serde_json::from_str(&action.to_json()).unwrap();
        assert_eq!(UserAction::parse(&value).unwrap(), action);
        assert_eq!(action.as_message(), Some("hello"));
        assert_eq!(value["args"]["image_urls"][0], "http://x/a.png");
        assert!(
            value.get("source").is_none(),
            "the append path sets the source"
        );
        let stored = action.into_event(3, "2026-11-28T00:00:00".into());
        assert_eq!(stored.source, Some(Source::User));
        assert_eq!(stored.message, "hello");
    }
}
