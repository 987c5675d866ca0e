//! The OpenHands event model: the wire JSON of actions and observations, as OpenHands'
//! `event_to_dict`/`event_from_dict` write and read it. This is the only module that knows
//! that JSON shape.
//!
//! Layout:
//! - [`Event`]: one stored event dict, with the common top-level fields and a [`Kind`]
//!   (action with `args`, or observation with `content`/`extras`).
//! - [`Event::from_json`]/[`Event::from_value`] parse and validate; [`Event::normalize`]
//!   applies the tolerance rules for old data and client payloads as a separate
//!   step; [`load_trajectory`] does both for a `replay_json` array.
//! - [`UserAction`]: a validated `oh_user_action` payload; [`AgentState`]: the state strings.
//! - [`Event::live_copy`] (live forwarding filter, 3.3) and [`replay_order`] (replay on
//!   connect, 2.5) are pure functions over events.
//!
//! Invariants:
//! - Parsing then serializing is an exact round trip of the JSON value: unknown top-level
//!   keys are kept in [`Event::extra`] and unknown `args`/`extras` keys stay in their maps,
//!   `timeout` keeps its int-or-float form, nothing is normalized behind the caller's back.
//! - Serialization writes keys in OpenHands order (`id`, `timestamp`, `source`, `message`,
//!   `cause`, `action`|`observation`, `tool_call_metadata`, `llm_metrics`, then `args`,
//!   `timeout` or `content`, `extras`, `success`, then unknown keys); null top-level fields
//!   are omitted and `message` is always written.
//! - Only known action/observation types parse; known fields are type-checked and required
//!   fields (those without a default in OpenHands) must be present. The legacy flat format
//!   (fields next to the type tag instead of inside `args`/`extras`) is refused.

mod agent_state;
mod build;
mod normalize;
mod pyliteral;
mod schema;
#[cfg(test)]
mod tests;
mod user_action;
mod view;

use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

pub use agent_state::AgentState;
pub use build::{
    CmdObservation, EditArgs, EditObservation, ReadArgs, RecallContext, RecallType,
    RecalledKnowledge, RunArgs, StatusLevel, StatusUpdate, ToolCallMetadata, ack_payload,
    error_payload,
};
pub use user_action::{ActionError, UserAction};
pub use view::{ActionView, ObservationView, RecallView, ToolCall};

/// Who produced an event (`source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `agent`: the agent (and, in the sent copy, environment feedback to agent actions).
    Agent,
    /// `user`: the user (client actions, recall actions).
    User,
    /// `environment`: the server, runtime or memory.
    Environment,
}

impl Source {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::User => "user",
            Self::Environment => "environment",
        }
    }

    fn from_wire(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(Self::Agent),
            "user" => Some(Self::User),
            "environment" => Some(Self::Environment),
            _ => None,
        }
    }
}

/// Action or observation, with the fields that belong to each.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `"action": <type>` with its fields in `args`.
    Action {
        /// The type tag, e.g. `message`, `run`.
        action: String,
        /// All fields of the action type (unknown keys kept).
        args: Map<String, Value>,
        /// Hard timeout in seconds, int or float exactly as read.
        timeout: Option<Number>,
    },
    /// `"observation": <type>` with its main text in `content` and other fields in `extras`.
    Observation {
        /// The type tag, e.g. `run`, `agent_state_changed`.
        observation: String,
        /// Main text; `""` if none.
        content: String,
        /// All other fields of the observation type (unknown keys kept).
        extras: Map<String, Value>,
        /// `run`/`run_ipython` only.
        success: Option<bool>,
    },
}

/// One event dict as stored and sent (`oh_event`).
///
/// Build it by parsing ([`Event::from_json`]) or with a constructor ([`Event::message`],
/// [`Event::change_agent_state`], ...) followed by [`Event::with_meta`] on the append path.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Per-conversation id (0, 1, 2, ...); `None` until appended.
    pub id: Option<u64>,
    /// Server local time, ISO 8601 without zone (see [`now_timestamp`]).
    pub timestamp: Option<String>,
    /// Who produced the event.
    pub source: Option<Source>,
    /// Human-readable summary; always serialized (`""` when empty).
    pub message: String,
    /// For observations: id of the action they answer.
    pub cause: Option<i64>,
    /// Action or observation fields.
    pub kind: Kind,
    /// Tool call that produced the event (object).
    pub tool_call_metadata: Option<Value>,
    /// Metrics snapshot of agent actions (object).
    pub llm_metrics: Option<Value>,
    /// Unknown top-level keys, kept and written back after the known ones. Must not hold a
    /// key the model owns (such keys are skipped when serializing).
    pub extra: Map<String, Value>,
}

/// Why an event (or a trajectory) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The bytes are not JSON.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON is not an object.
    #[error("event is not a JSON object")]
    NotAnObject,
    /// Neither `action` nor `observation` key.
    #[error("event has neither an `action` nor an `observation` key")]
    MissingType,
    /// Both `action` and `observation` keys.
    #[error("event has both an `action` and an `observation` key")]
    BothTypes,
    /// The `action`/`observation` tag is not a string.
    #[error("`{key}` must be a string")]
    TagNotString {
        /// `action` or `observation`.
        key: &'static str,
    },
    /// An action type without an event class (including `start`, `pause`, `resume`, `stop`,
    /// `push`, `send_pr`).
    #[error("unknown action type `{0}`")]
    UnknownAction(String),
    /// An observation type without an event class (including `chat`, `message`).
    #[error("unknown observation type `{0}`")]
    UnknownObservation(String),
    /// Old flat dump: the fields sit next to the type tag instead of inside `args`/`extras`.
    #[error("legacy flat event format: fields of `{event_type}` are outside `{wrapper}` ({})", keys.join(", "))]
    LegacyFlat {
        /// The action/observation type.
        event_type: String,
        /// `args` or `extras`.
        wrapper: &'static str,
        /// The keys found next to the tag.
        keys: Vec<String>,
    },
    /// A required field is missing.
    #[error("`{event_type}` event: missing required field `{field}`")]
    MissingField {
        /// The action/observation type.
        event_type: String,
        /// Path of the field, e.g. `args.command`.
        field: String,
    },
    /// A known field has the wrong JSON type.
    #[error("`{event_type}` event: field `{field}` must be {expected}")]
    FieldType {
        /// The action/observation type.
        event_type: String,
        /// Path of the field, e.g. `args.content` or `timeout`.
        field: String,
        /// What was expected, e.g. `a string`.
        expected: &'static str,
    },
    /// A trajectory is not a JSON array.
    #[error("trajectory is not a JSON array of events")]
    NotAnArray,
    /// A trajectory to replay whose first replayable item is not a message (or that has none).
    #[error("a replay trajectory must start with a user message")]
    ReplayStart,
    /// One item of a trajectory failed.
    #[error("trajectory item {index}: {source}")]
    Item {
        /// Index of the item in the array.
        index: usize,
        /// What was wrong with it.
        #[source]
        source: Box<EventError>,
    },
}

/// What connect-replay does with a stored event (OpenHands' replay rule on connect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayClass {
    /// Not replayed: `null` actions/observations and `recall` actions.
    Skip,
    /// `agent_state_changed`: only the last one of the range is sent, after all others.
    State,
    /// Sent unchanged, in id order.
    Emit,
}

/// Top-level fields of an event before they are checked, gathered in one pass.
#[derive(Default)]
struct RawEvent {
    id: Option<Value>,
    timestamp: Option<Value>,
    source: Option<Value>,
    message: Option<Value>,
    cause: Option<Value>,
    tag: Option<Value>,
    tool_call_metadata: Option<Value>,
    llm_metrics: Option<Value>,
    /// `args` or `extras`.
    wrapper: Option<Value>,
    timeout: Option<Value>,
    content: Option<Value>,
    success: Option<Value>,
    extra: Map<String, Value>,
}

/// Drops an explicit JSON `null` (null top-level fields are treated as absent).
fn present(v: Option<Value>) -> Option<Value> {
    v.filter(|v| !v.is_null())
}

impl Event {
    /// Parses one event dict from JSON bytes. Does not normalize (see [`Event::normalize`]).
    ///
    /// # Errors
    /// [`EventError::Json`] for invalid JSON, otherwise as [`Event::from_value`].
    pub fn from_json(bytes: &[u8]) -> Result<Event, EventError> {
        Self::from_value(serde_json::from_slice(bytes)?)
    }

    /// Parses one event dict. Does not normalize (see [`Event::normalize`]).
    ///
    /// # Errors
    /// - [`EventError::NotAnObject`], [`EventError::MissingType`], [`EventError::BothTypes`],
    ///   [`EventError::TagNotString`] when it is not an event dict;
    /// - [`EventError::UnknownAction`]/[`EventError::UnknownObservation`] for types without an
    ///   event class;
    /// - [`EventError::LegacyFlat`] for the old flat format;
    /// - [`EventError::MissingField`]/[`EventError::FieldType`] for missing required fields or
    ///   known fields of the wrong JSON type (top level or inside `args`/`extras`).
    pub fn from_value(value: Value) -> Result<Event, EventError> {
        let Value::Object(map) = value else {
            return Err(EventError::NotAnObject);
        };
        let is_action = match (map.contains_key("action"), map.contains_key("observation")) {
            (true, true) => return Err(EventError::BothTypes),
            (false, false) => return Err(EventError::MissingType),
            (is_action, _) => is_action,
        };
        let mut raw = RawEvent::default();
        for (key, value) in map {
            let slot = match (key.as_str(), is_action) {
                ("id", _) => &mut raw.id,
                ("timestamp", _) => &mut raw.timestamp,
                ("source", _) => &mut raw.source,
                ("message", _) => &mut raw.message,
                ("cause", _) => &mut raw.cause,
                ("tool_call_metadata", _) => &mut raw.tool_call_metadata,
                ("llm_metrics", _) => &mut raw.llm_metrics,
                ("action", true) | ("observation", false) => &mut raw.tag,
                ("args", true) | ("extras", false) => &mut raw.wrapper,
                ("timeout", true) => &mut raw.timeout,
                ("content", false) => &mut raw.content,
                ("success", false) => &mut raw.success,
                _ => {
                    raw.extra.insert(key, value);
                    continue;
                }
            };
            *slot = Some(value);
        }
        Self::from_raw(raw, is_action)
    }

    fn from_raw(raw: RawEvent, is_action: bool) -> Result<Event, EventError> {
        let (tag_key, wrapper_key) = if is_action {
            ("action", "args")
        } else {
            ("observation", "extras")
        };
        let Some(Value::String(event_type)) = raw.tag else {
            return Err(EventError::TagNotString { key: tag_key });
        };
        if is_action && !schema::is_known_action(&event_type) {
            return Err(EventError::UnknownAction(event_type));
        }
        if !is_action && !schema::is_known_observation(&event_type) {
            return Err(EventError::UnknownObservation(event_type));
        }
        if raw.wrapper.is_none() && !raw.extra.is_empty() {
            return Err(EventError::LegacyFlat {
                event_type,
                wrapper: wrapper_key,
                keys: raw.extra.keys().cloned().collect(),
            });
        }
        let wrong = |field: &str, expected: &'static str| EventError::FieldType {
            event_type: event_type.clone(),
            field: field.to_owned(),
            expected,
        };

        let id = match present(raw.id) {
            None => None,
            Some(v) if v.as_i64() == Some(-1) => None, // OpenHands' "no id" sentinel
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| wrong("id", "a non-negative integer"))?,
            ),
        };
        let timestamp = match present(raw.timestamp) {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(wrong("timestamp", "a string")),
        };
        let source = match present(raw.source) {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(Source::from_wire)
                    .ok_or_else(|| wrong("source", "`agent`, `user` or `environment`"))?,
            ),
        };
        let message = match present(raw.message) {
            None => String::new(),
            Some(Value::String(s)) => s,
            Some(_) => return Err(wrong("message", "a string")),
        };
        let cause = match present(raw.cause) {
            None => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| wrong("cause", "an integer"))?),
        };
        let object = |v: Option<Value>, field: &str| match present(v) {
            None => Ok(None),
            Some(v) if v.is_object() => Ok(Some(v)),
            Some(_) => Err(wrong(field, "an object")),
        };
        let tool_call_metadata = object(raw.tool_call_metadata, "tool_call_metadata")?;
        let llm_metrics = object(raw.llm_metrics, "llm_metrics")?;
        let wrapper = match object(raw.wrapper, wrapper_key)? {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        };

        let kind = if is_action {
            let timeout = match present(raw.timeout) {
                None => None,
                Some(Value::Number(n)) => Some(n),
                Some(_) => return Err(wrong("timeout", "a number")),
            };
            Kind::Action {
                action: event_type,
                args: wrapper,
                timeout,
            }
        } else {
            let content = match present(raw.content) {
                None => String::new(),
                Some(Value::String(s)) => s,
                Some(_) => return Err(wrong("content", "a string")),
            };
            let success = match present(raw.success) {
                None => None,
                Some(Value::Bool(b)) => Some(b),
                Some(_) => return Err(wrong("success", "a boolean")),
            };
            Kind::Observation {
                observation: event_type,
                content,
                extras: wrapper,
                success,
            }
        };
        schema::validate(&kind, &normalize::view(&kind))?;

        Ok(Event {
            id,
            timestamp,
            source,
            message,
            cause,
            kind,
            tool_call_metadata,
            llm_metrics,
            extra: raw.extra,
        })
    }

    /// The event as a JSON value (keys in OpenHands order).
    #[allow(
        clippy::expect_used,
        reason = "states an invariant, not about outside data"
    )]
    pub fn to_value(&self) -> Value {
        // Invariant: `Serialize for Event` never fails and writes a map with string keys,
        // the only cases where `serde_json::to_value` can fail.
        serde_json::to_value(self).expect("an Event always serializes to a JSON object")
    }

    /// The event as compact JSON (keys in OpenHands order).
    #[allow(
        clippy::expect_used,
        reason = "states an invariant, not about outside data"
    )]
    pub fn to_json(&self) -> String {
        // Invariant: as in `to_value`.
        serde_json::to_string(self).expect("an Event always serializes to JSON")
    }

    /// Applies OpenHands' tolerance rules for old data and client payloads:
    /// - action args: `timestamp` becomes the event timestamp if it has none (and is dropped
    ///   from args); `is_confirmed` → `confirmation_state`; `images_urls` → `image_urls`;
    ///   `keep_prompt`, `task_completed` and an invalid `security_risk` are dropped; the
    ///   `print(file_editor(**{...}))` form of `translated_ipython_code` is parsed and merged
    ///   into args (then `command: "view"` is removed from a `read`), and the field dropped;
    /// - observation extras: `exit_code`/`command_id` move to `metadata.exit_code`/`.pid`,
    ///   `formatted_output_and_error` is dropped, `run` observations get a complete default
    ///   `metadata`; a missing `success` of `run`/`run_ipython` is derived as OpenHands does.
    pub fn normalize(mut self) -> Event {
        match &mut self.kind {
            Kind::Action { action, args, .. } => {
                let ts = normalize::action_args(action, args);
                if self.timestamp.is_none() {
                    self.timestamp = ts;
                }
            }
            Kind::Observation {
                observation,
                extras,
                success,
                ..
            } => {
                normalize::observation_extras(observation, extras);
                if success.is_none() {
                    *success = match observation.as_str() {
                        "run" => Some(
                            extras
                                .get("metadata")
                                .and_then(|m| m.get("exit_code"))
                                .and_then(Value::as_i64)
                                == Some(0),
                        ),
                        "run_ipython" => Some(true),
                        _ => None,
                    };
                }
            }
        }
        self
    }

    /// Fills every missing `args`/`extras` field that has a default in OpenHands, in its
    /// field order (unknown keys follow), as OpenHands writes a freshly built event.
    pub fn with_defaults(mut self) -> Event {
        schema::fill_defaults(&mut self.kind);
        self
    }

    /// Sets what the append path assigns: id, timestamp and source.
    pub fn with_meta(mut self, id: u64, timestamp: String, source: Source) -> Event {
        self.id = Some(id);
        self.timestamp = Some(timestamp);
        self.source = Some(source);
        self
    }

    /// The `message` text OpenHands derives from the event's type and fields
    /// (per action/observation type), e.g. `Running command: ls`.
    pub fn derived_message(&self) -> String {
        schema::derive_message(&self.kind)
    }

    /// The action type tag, if this is an action.
    pub fn action_type(&self) -> Option<&str> {
        match &self.kind {
            Kind::Action { action, .. } => Some(action),
            Kind::Observation { .. } => None,
        }
    }

    /// The observation type tag, if this is an observation.
    pub fn observation_type(&self) -> Option<&str> {
        match &self.kind {
            Kind::Observation { observation, .. } => Some(observation),
            Kind::Action { .. } => None,
        }
    }

    /// The new state, if this is an `agent_state_changed` observation.
    pub fn agent_state(&self) -> Option<AgentState> {
        match &self.kind {
            Kind::Observation {
                observation,
                extras,
                ..
            } if observation == "agent_state_changed" => extras
                .get("agent_state")
                .and_then(Value::as_str)
                .map(AgentState::from_wire),
            _ => None,
        }
    }

    /// Whether this is a `null` action or observation.
    pub fn is_null(&self) -> bool {
        self.action_type() == Some("null") || self.observation_type() == Some("null")
    }

    /// The copy sent to connected clients when this event is appended (OpenHands' live
    /// filter), or
    /// `None` if it is not forwarded live:
    /// - `null` actions/observations: not sent;
    /// - source `agent`/`user`: sent unchanged;
    /// - source `environment` `run`, `agent_state_changed` and `recall` observations, and any
    ///   other `error` observation: sent with `source` rewritten to `agent`;
    /// - anything else: not sent (still replayed on connect).
    pub fn live_copy(&self) -> Option<Event> {
        if self.is_null() {
            return None;
        }
        let as_agent = || {
            let mut copy = self.clone();
            copy.source = Some(Source::Agent);
            Some(copy)
        };
        match (self.source, self.observation_type()) {
            (Some(Source::Agent | Source::User), _) => Some(self.clone()),
            (Some(Source::Environment), Some("run" | "agent_state_changed" | "recall")) => {
                as_agent()
            }
            (_, Some("error")) => as_agent(),
            _ => None,
        }
    }

    /// How connect-replay treats this event.
    pub fn replay_class(&self) -> ReplayClass {
        if self.is_null() || self.action_type() == Some("recall") {
            ReplayClass::Skip
        } else if self.observation_type() == Some("agent_state_changed") {
            ReplayClass::State
        } else {
            ReplayClass::Emit
        }
    }
}

/// Keys written by the model itself; an [`Event::extra`] key among them is not written.
fn is_owned_key(key: &str, kind: &Kind) -> bool {
    matches!(
        key,
        "id" | "timestamp"
            | "source"
            | "message"
            | "cause"
            | "action"
            | "observation"
            | "tool_call_metadata"
            | "llm_metrics"
    ) || match kind {
        Kind::Action { .. } => matches!(key, "args" | "timeout"),
        Kind::Observation { .. } => matches!(key, "content" | "extras" | "success"),
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        if let Some(id) = self.id {
            map.serialize_entry("id", &id)?;
        }
        if let Some(ts) = &self.timestamp {
            map.serialize_entry("timestamp", ts)?;
        }
        if let Some(source) = self.source {
            map.serialize_entry("source", source.as_str())?;
        }
        map.serialize_entry("message", &self.message)?;
        if let Some(cause) = self.cause {
            map.serialize_entry("cause", &cause)?;
        }
        match &self.kind {
            Kind::Action { action, .. } => map.serialize_entry("action", action)?,
            Kind::Observation { observation, .. } => {
                map.serialize_entry("observation", observation)?;
            }
        }
        for (key, value) in [
            ("tool_call_metadata", &self.tool_call_metadata),
            ("llm_metrics", &self.llm_metrics),
        ] {
            if let Some(v) = value.as_ref().filter(|v| !v.is_null()) {
                map.serialize_entry(key, v)?;
            }
        }
        match &self.kind {
            Kind::Action { args, timeout, .. } => {
                map.serialize_entry("args", args)?;
                if let Some(t) = timeout {
                    map.serialize_entry("timeout", t)?;
                }
            }
            Kind::Observation {
                content,
                extras,
                success,
                ..
            } => {
                map.serialize_entry("content", content)?;
                map.serialize_entry("extras", extras)?;
                if let Some(s) = success {
                    map.serialize_entry("success", s)?;
                }
            }
        }
        for (key, value) in &self.extra {
            if !is_owned_key(key, &self.kind) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Event::from_value(value).map_err(D::Error::custom)
    }
}

/// Reads a trajectory (`replay_json`): a JSON array of event dicts, each parsed
/// and normalized.
///
/// # Errors
/// [`EventError::Json`] for invalid JSON, [`EventError::NotAnArray`] when it is not an
/// array, [`EventError::Item`] naming the index of the first bad item.
pub fn load_trajectory(bytes: &[u8]) -> Result<Vec<Event>, EventError> {
    let Value::Array(items) = serde_json::from_slice(bytes)? else {
        return Err(EventError::NotAnArray);
    };
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            Event::from_value(item)
                .map(Event::normalize)
                .map_err(|e| EventError::Item {
                    index,
                    source: Box::new(e),
                })
        })
        .collect()
}

/// The items of a trajectory a replay acts on, in order: none of the environment's, no null
/// events, no leading `system` action. The first is the conversation's first user message.
///
/// # Errors
/// [`EventError::ReplayStart`] if the first of them is not a message, or there is none (a
/// conversation created with it could never start: refused at creation).
pub fn replay_items(trajectory: Vec<Event>) -> Result<Vec<Event>, EventError> {
    let mut items: Vec<Event> = trajectory
        .into_iter()
        .filter(|e| e.source != Some(Source::Environment))
        .filter(|e| !e.is_null())
        .collect();
    if items.first().and_then(Event::action_type) == Some("system") {
        items.remove(0);
    }
    if items.first().and_then(Event::action_type) != Some("message") {
        return Err(EventError::ReplayStart);
    }
    Ok(items)
}

/// OpenHands' replay rule as it goes, for a replay that sends while it reads: skipped events
/// are left out, every other event but `agent_state_changed` is sent at once in id order, and
/// the range's last `agent_state_changed` is held and sent after all others. `T` is what the
/// caller sends (an event, its raw JSON).
#[derive(Debug)]
pub struct ReplayRule<T> {
    held: Option<T>,
}

impl<T> Default for ReplayRule<T> {
    fn default() -> Self {
        ReplayRule { held: None }
    }
}

impl<T> ReplayRule<T> {
    /// Takes the next event of the range (of class `class`): returns it if it is to be sent
    /// now; a state change is held instead (replacing the one held before), a skipped event
    /// dropped.
    pub fn take(&mut self, class: ReplayClass, item: T) -> Option<T> {
        match class {
            ReplayClass::Skip => None,
            ReplayClass::State => {
                self.held = Some(item);
                None
            }
            ReplayClass::Emit => Some(item),
        }
    }

    /// The held state change, sent last (after the range's last event was taken).
    pub fn finish(self) -> Option<T> {
        self.held
    }
}

/// The events connect-replay sends for a range of stored events, in order ([`ReplayRule`]).
/// `events` is the range to replay (ids `>= latest_event_id + 1`, in id order).
pub fn replay_order(events: &[Event]) -> Vec<&Event> {
    let mut rule = ReplayRule::default();
    let mut out: Vec<&Event> = events
        .iter()
        .filter_map(|e| rule.take(e.replay_class(), e))
        .collect();
    out.extend(rule.finish());
    out
}

/// The current server local time as OpenHands writes event timestamps:
/// `2025-11-28T13:41:11.259454` (microseconds, no zone; no fraction when it is exactly 0,
/// like Python's `isoformat`).
pub fn now_timestamp() -> String {
    format_timestamp(chrono::Local::now().naive_local())
}

fn format_timestamp(t: chrono::NaiveDateTime) -> String {
    use chrono::Timelike as _;
    if t.nanosecond() / 1_000 == 0 {
        t.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    }
}
