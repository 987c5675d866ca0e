//! What each known action/observation type carries in `args`/`extras` (OpenHands' event
//! dataclasses): field order, JSON type, required or default. Used to validate
//! events, to fill defaults and to derive the `message` text.

use serde_json::{Map, Value, json};

use super::{EventError, Kind};

/// JSON type a known field must have.
#[derive(Debug, Clone, Copy)]
enum Ty {
    Str,
    Bool,
    Int,
    Object,
    Array,
    StrOrNull,
    IntOrNull,
    ArrayOrNull,
    ObjectOrNull,
    /// Not checked (e.g. `security_risk`, whose invalid values normalization drops).
    Any,
}

impl Ty {
    fn accepts(self, v: &Value) -> bool {
        let int = |v: &Value| v.is_i64() || v.is_u64();
        match self {
            Ty::Str => v.is_string(),
            Ty::Bool => v.is_boolean(),
            Ty::Int => int(v),
            Ty::Object => v.is_object(),
            Ty::Array => v.is_array(),
            Ty::StrOrNull => v.is_null() || v.is_string(),
            Ty::IntOrNull => v.is_null() || int(v),
            Ty::ArrayOrNull => v.is_null() || v.is_array(),
            Ty::ObjectOrNull => v.is_null() || v.is_object(),
            Ty::Any => true,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Ty::Str => "a string",
            Ty::Bool => "a boolean",
            Ty::Int => "an integer",
            Ty::Object => "an object",
            Ty::Array => "an array",
            Ty::StrOrNull => "a string or null",
            Ty::IntOrNull => "an integer or null",
            Ty::ArrayOrNull => "an array or null",
            Ty::ObjectOrNull => "an object or null",
            Ty::Any => "any value",
        }
    }
}

/// Default value of an optional field (written when filling defaults).
#[derive(Debug, Clone, Copy)]
enum Dflt {
    Null,
    False,
    True,
    Int(i64),
    Str(&'static str),
    EmptyObject,
    EmptyArray,
    /// The default `run` observation `metadata` object.
    CmdMetadata,
}

impl Dflt {
    fn value(self) -> Value {
        match self {
            Dflt::Null => Value::Null,
            Dflt::False => Value::Bool(false),
            Dflt::True => Value::Bool(true),
            Dflt::Int(n) => Value::from(n),
            Dflt::Str(s) => Value::from(s),
            Dflt::EmptyObject => Value::Object(Map::new()),
            Dflt::EmptyArray => Value::Array(Vec::new()),
            Dflt::CmdMetadata => Value::Object(default_cmd_metadata()),
        }
    }
}

/// The default `metadata` of a `run` observation (`CmdOutputMetadata()` in OpenHands).
pub(super) fn default_cmd_metadata() -> Map<String, Value> {
    let Value::Object(map) = json!({
        "exit_code": -1, "pid": -1, "username": null, "hostname": null, "working_dir": null,
        "py_interpreter_path": null, "prefix": "", "suffix": ""
    }) else {
        return Map::new();
    };
    map
}

#[derive(Debug, Clone, Copy)]
enum Presence {
    Required,
    Default(Dflt),
    /// Optional, and not written when filling defaults.
    Optional,
}

#[derive(Debug)]
struct Field {
    name: &'static str,
    ty: Ty,
    presence: Presence,
}

const fn req(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        presence: Presence::Required,
    }
}

const fn def(name: &'static str, ty: Ty, d: Dflt) -> Field {
    Field {
        name,
        ty,
        presence: Presence::Default(d),
    }
}

const fn opt(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        presence: Presence::Optional,
    }
}

const THOUGHT: Field = def("thought", Ty::Str, Dflt::Str(""));
const RISK: Field = def("security_risk", Ty::Any, Dflt::Int(-1));
const CONFIRMATION: Field = def("confirmation_state", Ty::Str, Dflt::Str("confirmed"));

/// Action types and their `args`, in OpenHands field order.
static ACTIONS: &[(&str, &[Field])] = &[
    (
        "message",
        &[
            req("content", Ty::Str),
            def("file_urls", Ty::ArrayOrNull, Dflt::Null),
            def("image_urls", Ty::ArrayOrNull, Dflt::Null),
            def("wait_for_response", Ty::Bool, Dflt::False),
            RISK,
        ],
    ),
    (
        "system",
        &[
            req("content", Ty::Str),
            def("tools", Ty::ArrayOrNull, Dflt::Null),
            opt("openhands_version", Ty::StrOrNull),
            def("agent_class", Ty::StrOrNull, Dflt::Null),
        ],
    ),
    (
        "run",
        &[
            req("command", Ty::Str),
            def("is_input", Ty::Bool, Dflt::False),
            THOUGHT,
            def("blocking", Ty::Bool, Dflt::False),
            def("is_static", Ty::Bool, Dflt::False),
            def("cwd", Ty::StrOrNull, Dflt::Null),
            def("hidden", Ty::Bool, Dflt::False),
            CONFIRMATION,
            RISK,
        ],
    ),
    (
        "run_ipython",
        &[
            req("code", Ty::Str),
            THOUGHT,
            def("include_extra", Ty::Bool, Dflt::True),
            CONFIRMATION,
            RISK,
            def("kernel_init_code", Ty::Str, Dflt::Str("")),
        ],
    ),
    (
        "read",
        &[
            req("path", Ty::Str),
            def("start", Ty::Int, Dflt::Int(0)),
            def("end", Ty::Int, Dflt::Int(-1)),
            THOUGHT,
            RISK,
            def("impl_source", Ty::Str, Dflt::Str("default")),
            def("view_range", Ty::ArrayOrNull, Dflt::Null),
        ],
    ),
    (
        "write",
        &[
            req("path", Ty::Str),
            req("content", Ty::Str),
            def("start", Ty::Int, Dflt::Int(0)),
            def("end", Ty::Int, Dflt::Int(-1)),
            THOUGHT,
            RISK,
        ],
    ),
    (
        "edit",
        &[
            req("path", Ty::Str),
            def("command", Ty::Str, Dflt::Str("")),
            def("file_text", Ty::StrOrNull, Dflt::Null),
            def("old_str", Ty::StrOrNull, Dflt::Null),
            def("new_str", Ty::StrOrNull, Dflt::Null),
            def("insert_line", Ty::IntOrNull, Dflt::Null),
            def("content", Ty::Str, Dflt::Str("")),
            def("start", Ty::Int, Dflt::Int(1)),
            def("end", Ty::Int, Dflt::Int(-1)),
            THOUGHT,
            RISK,
            def("impl_source", Ty::Str, Dflt::Str("oh_aci")),
        ],
    ),
    (
        "browse",
        &[
            req("url", Ty::Str),
            THOUGHT,
            RISK,
            def("return_axtree", Ty::Bool, Dflt::False),
        ],
    ),
    (
        "browse_interactive",
        &[
            req("browser_actions", Ty::Str),
            THOUGHT,
            def("browsergym_send_msg_to_user", Ty::Str, Dflt::Str("")),
            RISK,
            def("return_axtree", Ty::Bool, Dflt::False),
        ],
    ),
    (
        "call_tool_mcp",
        &[
            req("name", Ty::Str),
            def("arguments", Ty::Object, Dflt::EmptyObject),
            THOUGHT,
            RISK,
        ],
    ),
    ("think", &[THOUGHT]),
    (
        "finish",
        &[
            def("final_thought", Ty::Str, Dflt::Str("")),
            def("outputs", Ty::Object, Dflt::EmptyObject),
            THOUGHT,
        ],
    ),
    (
        "reject",
        &[def("outputs", Ty::Object, Dflt::EmptyObject), THOUGHT],
    ),
    (
        "delegate",
        &[req("agent", Ty::Str), req("inputs", Ty::Object), THOUGHT],
    ),
    (
        "change_agent_state",
        &[req("agent_state", Ty::Str), THOUGHT],
    ),
    (
        "recall",
        &[
            req("recall_type", Ty::Str),
            def("query", Ty::Str, Dflt::Str("")),
            THOUGHT,
        ],
    ),
    (
        "condensation",
        &[
            def("forgotten_event_ids", Ty::ArrayOrNull, Dflt::Null),
            def("forgotten_events_start_id", Ty::IntOrNull, Dflt::Null),
            def("forgotten_events_end_id", Ty::IntOrNull, Dflt::Null),
            def("summary", Ty::StrOrNull, Dflt::Null),
            def("summary_offset", Ty::IntOrNull, Dflt::Null),
        ],
    ),
    ("condensation_request", &[]),
    (
        "task_tracking",
        &[
            def("command", Ty::Str, Dflt::Str("view")),
            def("task_list", Ty::Array, Dflt::EmptyArray),
            THOUGHT,
        ],
    ),
    ("loop_recovery", &[req("option", Ty::Int)]),
    ("null", &[]),
];

/// Observation types and their `extras`, in OpenHands field order.
static OBSERVATIONS: &[(&str, &[Field])] = &[
    (
        "run",
        &[
            req("command", Ty::Str),
            def("metadata", Ty::ObjectOrNull, Dflt::CmdMetadata),
            def("hidden", Ty::Bool, Dflt::False),
        ],
    ),
    (
        "run_ipython",
        &[
            req("code", Ty::Str),
            def("image_urls", Ty::ArrayOrNull, Dflt::Null),
        ],
    ),
    (
        "read",
        &[
            req("path", Ty::Str),
            def("impl_source", Ty::Str, Dflt::Str("default")),
        ],
    ),
    ("write", &[req("path", Ty::Str)]),
    (
        "edit",
        &[
            def("path", Ty::Str, Dflt::Str("")),
            def("prev_exist", Ty::Bool, Dflt::False),
            def("old_content", Ty::StrOrNull, Dflt::Null),
            def("new_content", Ty::StrOrNull, Dflt::Null),
            def("impl_source", Ty::Str, Dflt::Str("llm_based_edit")),
            def("diff", Ty::StrOrNull, Dflt::Null),
            def("_diff_cache", Ty::Any, Dflt::Null),
        ],
    ),
    (
        "browse",
        &[
            req("url", Ty::Str),
            req("trigger_by_action", Ty::Str),
            opt("screenshot", Ty::Str),
        ],
    ),
    ("error", &[def("error_id", Ty::Str, Dflt::Str(""))]),
    (
        "agent_state_changed",
        &[
            req("agent_state", Ty::Str),
            def("reason", Ty::Str, Dflt::Str("")),
        ],
    ),
    (
        "recall",
        &[
            req("recall_type", Ty::Str),
            def("repo_name", Ty::Any, Dflt::Str("")),
            def("repo_directory", Ty::Any, Dflt::Str("")),
            def("repo_branch", Ty::Any, Dflt::Str("")),
            def("repo_instructions", Ty::Any, Dflt::Str("")),
            def("runtime_hosts", Ty::Any, Dflt::EmptyObject),
            def("additional_agent_instructions", Ty::Any, Dflt::Str("")),
            def("date", Ty::Any, Dflt::Str("")),
            def("custom_secrets_descriptions", Ty::Any, Dflt::EmptyObject),
            def("conversation_instructions", Ty::Any, Dflt::Str("")),
            def("working_dir", Ty::Any, Dflt::Str("")),
            def("microagent_knowledge", Ty::Any, Dflt::EmptyArray),
        ],
    ),
    ("user_rejected", &[]),
    ("think", &[]),
    ("condense", &[]),
    ("delegate", &[req("outputs", Ty::Object)]),
    ("success", &[]),
    (
        "mcp",
        &[
            def("name", Ty::Str, Dflt::Str("")),
            def("arguments", Ty::Object, Dflt::EmptyObject),
        ],
    ),
    ("download", &[req("file_path", Ty::Str)]),
    (
        "task_tracking",
        &[
            def("command", Ty::Str, Dflt::Str("")),
            def("task_list", Ty::Array, Dflt::EmptyArray),
        ],
    ),
    ("loop_detection", &[]),
    ("null", &[]),
];

fn lookup(table: &'static [(&str, &'static [Field])], ty: &str) -> Option<&'static [Field]> {
    table.iter().find(|(name, _)| *name == ty).map(|(_, f)| *f)
}

/// Whether `ty` is a known action type (one with an event class in OpenHands).
pub(super) fn is_known_action(ty: &str) -> bool {
    lookup(ACTIONS, ty).is_some()
}

/// Whether `ty` is a known observation type.
pub(super) fn is_known_observation(ty: &str) -> bool {
    lookup(OBSERVATIONS, ty).is_some()
}

/// Checks required fields and JSON types of the known fields in `args`/`extras`.
/// `map` must already be normalized (legacy keys rewritten). Unknown keys are accepted.
pub(super) fn validate(kind: &Kind, map: &Map<String, Value>) -> Result<(), EventError> {
    let (type_name, wrapper, fields) = match kind {
        Kind::Action { action, .. } => (action, "args", lookup(ACTIONS, action)),
        Kind::Observation { observation, .. } => {
            (observation, "extras", lookup(OBSERVATIONS, observation))
        }
    };
    for field in fields.unwrap_or_default() {
        match map.get(field.name) {
            None if matches!(field.presence, Presence::Required) => {
                return Err(EventError::MissingField {
                    event_type: type_name.clone(),
                    field: format!("{wrapper}.{}", field.name),
                });
            }
            Some(v) if !field.ty.accepts(v) => {
                return Err(EventError::FieldType {
                    event_type: type_name.clone(),
                    field: format!("{wrapper}.{}", field.name),
                    expected: field.ty.expected(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Rewrites `args`/`extras` so every known field with a default is present, in OpenHands
/// field order; unknown keys follow in their original order.
pub(super) fn fill_defaults(kind: &mut Kind) {
    let (fields, map) = match kind {
        Kind::Action { action, args, .. } => (lookup(ACTIONS, action), args),
        Kind::Observation {
            observation,
            extras,
            ..
        } => (lookup(OBSERVATIONS, observation), extras),
    };
    let Some(fields) = fields else { return };
    let mut rest = std::mem::take(map);
    for field in fields {
        let value = match (rest.shift_remove(field.name), field.presence) {
            (Some(v), _) => v,
            (None, Presence::Default(d)) => d.value(),
            (None, _) => continue,
        };
        map.insert(field.name.to_owned(), value);
    }
    map.extend(rest);
}

fn text<'a>(map: &'a Map<String, Value>, key: &str) -> &'a str {
    map.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Renders a value the way a Python f-string would show it, close enough for a summary.
fn show(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

/// The `message` text OpenHands derives from an event's type and fields.
pub(super) fn derive_message(kind: &Kind) -> String {
    match kind {
        Kind::Action { action, args, .. } => action_message(action, args),
        Kind::Observation {
            observation,
            content,
            extras,
            ..
        } => observation_message(observation, content, extras),
    }
}

fn action_message(ty: &str, args: &Map<String, Value>) -> String {
    match ty {
        "message" | "system" => text(args, "content").to_owned(),
        "run" => format!("Running command: {}", text(args, "command")),
        "run_ipython" => format!("Running Python code interactively: {}", text(args, "code")),
        "read" => format!("Reading file: {}", text(args, "path")),
        "write" => format!("Writing file: {}", text(args, "path")),
        "browse" => format!("I am browsing the URL: {}", text(args, "url")),
        "browse_interactive" => format!(
            "I am interacting with the browser:\n```\n{}\n```",
            text(args, "browser_actions")
        ),
        "call_tool_mcp" => format!(
            "I am interacting with the MCP server with name:\n```\n{}\n```\nand arguments:\n```\n{}\n```",
            text(args, "name"),
            show(args.get("arguments"))
        ),
        "think" => format!("I am thinking...: {}", text(args, "thought")),
        "finish" => match text(args, "thought") {
            "" => "All done! What's next on the agenda?".to_owned(),
            thought => thought.to_owned(),
        },
        "reject" => {
            let reason = args.get("outputs").and_then(|o| o.get("reason"));
            match reason {
                Some(r) => format!("Task is rejected by the agent. Reason: {}", show(Some(r))),
                None => "Task is rejected by the agent.".to_owned(),
            }
        }
        "delegate" => format!(
            "I'm asking {} for help with this task.",
            text(args, "agent")
        ),
        "change_agent_state" => {
            format!("Agent state changed to {}", text(args, "agent_state"))
        }
        "recall" => {
            let query: String = text(args, "query").chars().take(50).collect();
            format!("Retrieving content for: {query}")
        }
        "condensation" => condensation_message(args),
        "condensation_request" => {
            "Requesting a condensation of the conversation history.".to_owned()
        }
        "task_tracking" => match args
            .get("task_list")
            .and_then(Value::as_array)
            .map(Vec::len)
        {
            None | Some(0) => "Clearing the task list.".to_owned(),
            Some(1) => "Managing 1 task item.".to_owned(),
            Some(n) => format!("Managing {n} task items."),
        },
        "null" => "No action".to_owned(),
        // edit, loop_recovery and anything unknown
        _ => String::new(),
    }
}

fn condensation_message(args: &Map<String, Value>) -> String {
    if let Some(summary) = args.get("summary").and_then(Value::as_str)
        && !summary.is_empty()
    {
        return format!("Summary: {summary}");
    }
    let ids: Vec<i64> = match args.get("forgotten_event_ids").and_then(Value::as_array) {
        Some(ids) => ids.iter().filter_map(Value::as_i64).collect(),
        None => {
            let start = args
                .get("forgotten_events_start_id")
                .and_then(Value::as_i64);
            let end = args.get("forgotten_events_end_id").and_then(Value::as_i64);
            match (start, end) {
                (Some(s), Some(e)) => (s..=e).collect(),
                _ => Vec::new(),
            }
        }
    };
    let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("Condenser is dropping the events: [{}]", ids.join(", "))
}

fn observation_message(ty: &str, content: &str, extras: &Map<String, Value>) -> String {
    match ty {
        "run" => {
            let exit_code = extras
                .get("metadata")
                .and_then(|m| m.get("exit_code"))
                .and_then(Value::as_i64)
                .unwrap_or(-1);
            format!(
                "Command `{}` executed with exit code {exit_code}.",
                text(extras, "command")
            )
        }
        "run_ipython" => "Code executed in IPython cell.".to_owned(),
        "read" => format!("I read the file {}.", text(extras, "path")),
        "write" => format!("I wrote to the file {}.", text(extras, "path")),
        "edit" => format!("I edited the file {}.", text(extras, "path")),
        "browse" => format!("Visited {}", text(extras, "url")),
        "recall" => match text(extras, "recall_type") {
            "workspace_context" => "Added workspace context".to_owned(),
            _ => "Added microagent knowledge".to_owned(),
        },
        "download" => format!(
            "Downloaded the file at location: {}",
            text(extras, "file_path")
        ),
        "null" => "No observation".to_owned(),
        "agent_state_changed" | "delegate" | "loop_detection" => String::new(),
        // error, user_rejected, think, condense, success, mcp, task_tracking, unknown
        _ => content.to_owned(),
    }
}
