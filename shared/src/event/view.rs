//! Typed read access to an event's fields: what an action asks for ([`ActionView`]), what an
//! observation reports ([`ObservationView`]) and the tool call behind it ([`ToolCall`]).
//! Views borrow from the event; a field that is missing or has another JSON type reads as
//! OpenHands' default for it.

use serde_json::{Map, Value};

use super::build::{CmdObservation, EditArgs, ReadArgs, RunArgs};
use super::{Event, Kind};

/// What an action asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActionView<'a> {
    /// A chat message (from the user or the agent).
    Message {
        /// The text.
        content: &'a str,
        /// An agent message that waits for the user's answer.
        wait_for_response: bool,
    },
    /// The system prompt.
    System {
        /// The prompt.
        content: &'a str,
    },
    /// A shell command.
    Run(RunArgs<'a>),
    /// A file or directory view.
    Read(ReadArgs<'a>),
    /// A file change.
    Edit(EditArgs<'a>),
    /// A logged thought.
    Think,
    /// The task is done.
    Finish,
    /// The task is refused.
    Reject,
    /// A memory lookup for a user message.
    Recall,
    /// Any other action type (its tag).
    Other(&'a str),
}

/// What an observation reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObservationView<'a> {
    /// A command's result.
    Run(CmdObservation<'a>),
    /// Something failed.
    Error {
        /// What failed.
        content: &'a str,
    },
    /// What memory recalled.
    Recall(RecallView<'a>),
    /// Any other observation type: its tag and content.
    Other {
        /// The type tag.
        observation: &'a str,
        /// Its main text.
        content: &'a str,
    },
}

/// The parts of a `recall` observation the agent shows the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecallView<'a> {
    extras: &'a Map<String, Value>,
}

impl<'a> RecallView<'a> {
    /// The workspace's instructions (`""` if none).
    pub fn repo_instructions(&self) -> &'a str {
        text(self.extras, "repo_instructions")
    }

    /// The text of each triggered knowledge item.
    pub fn knowledge(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.extras
            .get("microagent_knowledge")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|k| k.get("content").and_then(Value::as_str))
    }
}

/// The tool call behind an event (`tool_call_metadata`), read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToolCall<'a> {
    /// The tool the model called.
    pub function_name: &'a str,
    /// The model's id of the call.
    pub tool_call_id: &'a str,
    model_response: Option<&'a Value>,
}

impl<'a> ToolCall<'a> {
    /// The call's arguments (a JSON string) as the model sent them, found in its response.
    pub fn arguments(&self) -> Option<&'a str> {
        self.model_response?
            .get("choices")?
            .get(0)?
            .get("message")?
            .get("tool_calls")?
            .as_array()?
            .iter()
            .find(|c| c.get("id").and_then(Value::as_str) == Some(self.tool_call_id))?
            .get("function")?
            .get("arguments")?
            .as_str()
    }
}

fn text<'a>(map: &'a Map<String, Value>, key: &str) -> &'a str {
    map.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn opt_text<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str)
}

fn flag(map: &Map<String, Value>, key: &str) -> bool {
    map.get(key).and_then(Value::as_bool).unwrap_or(false)
}

impl Event {
    /// What this action asks for, or `None` for an observation.
    pub fn action(&self) -> Option<ActionView<'_>> {
        let Kind::Action {
            action,
            args,
            timeout,
        } = &self.kind
        else {
            return None;
        };
        let thought = text(args, "thought");
        Some(match action.as_str() {
            "message" => ActionView::Message {
                content: text(args, "content"),
                wait_for_response: flag(args, "wait_for_response"),
            },
            "system" => ActionView::System {
                content: text(args, "content"),
            },
            "run" => ActionView::Run(RunArgs {
                command: text(args, "command"),
                is_input: flag(args, "is_input"),
                thought,
                timeout: timeout.as_ref().and_then(serde_json::Number::as_f64),
            }),
            "read" => ActionView::Read(ReadArgs {
                path: text(args, "path"),
                view_range: args
                    .get("view_range")
                    .and_then(Value::as_array)
                    .and_then(|r| Some((r.first()?.as_i64()?, r.get(1)?.as_i64()?))),
                thought,
            }),
            "edit" => ActionView::Edit(EditArgs {
                path: text(args, "path"),
                command: text(args, "command"),
                file_text: opt_text(args, "file_text"),
                old_str: opt_text(args, "old_str"),
                new_str: opt_text(args, "new_str"),
                insert_line: args.get("insert_line").and_then(Value::as_i64),
                thought,
            }),
            "think" => ActionView::Think,
            "finish" => ActionView::Finish,
            "reject" => ActionView::Reject,
            "recall" => ActionView::Recall,
            other => ActionView::Other(other),
        })
    }

    /// The agent's reasoning shown with an action (`thought`; `""` if none).
    pub fn thought(&self) -> &str {
        match &self.kind {
            Kind::Action { args, .. } => text(args, "thought"),
            Kind::Observation { .. } => "",
        }
    }

    /// The content of a user or agent `message` action.
    pub fn message_content(&self) -> Option<&str> {
        match self.action()? {
            ActionView::Message { content, .. } => Some(content),
            _ => None,
        }
    }

    /// What this observation reports, or `None` for an action.
    pub fn observation(&self) -> Option<ObservationView<'_>> {
        let Kind::Observation {
            observation,
            content,
            extras,
            ..
        } = &self.kind
        else {
            return None;
        };
        Some(match observation.as_str() {
            "run" => {
                let meta = extras.get("metadata");
                let num = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_i64);
                let field = |k: &str| {
                    meta.and_then(|m| m.get(k))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                };
                ObservationView::Run(CmdObservation {
                    command: text(extras, "command"),
                    content,
                    exit_code: num("exit_code").unwrap_or(-1),
                    pid: num("pid").unwrap_or(-1),
                    working_dir: field("working_dir"),
                    prefix: field("prefix"),
                    suffix: field("suffix"),
                })
            }
            "error" => ObservationView::Error { content },
            "recall" => ObservationView::Recall(RecallView { extras }),
            other => ObservationView::Other {
                observation: other,
                content,
            },
        })
    }

    /// The tool call that produced this event, if it records one.
    pub fn tool_call(&self) -> Option<ToolCall<'_>> {
        let meta = self.tool_call_metadata.as_ref()?.as_object()?;
        Some(ToolCall {
            function_name: text(meta, "function_name"),
            tool_call_id: text(meta, "tool_call_id"),
            model_response: meta.get("model_response"),
        })
    }
}
