//! The CodeAct agent: an LLM with four tools, as in OpenHands: `execute_bash`,
//! `str_replace_editor`, `think` and `finish`. Each step sends the conversation (rebuilt from
//! the events) to the LLM and turns its answer into events:
//!
//! - a text answer without tool call → an agent `message` that waits for the user;
//! - a tool call → the matching action (`run`, `read`, `edit`, `think`, `finish`) carrying
//!   `tool_call_metadata` (function name, call id, the full model response) and `llm_metrics`;
//! - a malformed tool call (bad JSON, missing field, unknown tool) → an `error` observation
//!   with the same `tool_call_metadata`, fed back to the model as the tool's answer, so the
//!   conversation goes on.
//!
//! Only the first tool call of a response is executed (OpenHands executes them in turn; one
//! per step keeps every step cancellable and restartable); the others are dropped and never
//! shown to the model.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};
use shared::event::{Event, Source};
use tokio_util::sync::CancellationToken;

use super::StepError;
use crate::llm::{
    AssistantMessage, ChatMessage, ChatRequest, Llm, LlmError, RetryNotice, ToolCall,
};

/// Publishes status updates (`oh_event` with `status_update: true`) to the session's clients.
pub(crate) type Notify = Arc<dyn Fn(Value) + Send + Sync>;

pub(crate) struct CodeAct {
    pub(crate) llm: Llm,
    pub(crate) notify: Notify,
    pub(crate) workspace: String,
}

impl CodeAct {
    pub(crate) fn class(&self) -> &'static str {
        "CodeActAgent"
    }

    pub(crate) fn system_prompt(&self) -> String {
        format!(
            "You are OpenHands agent, a helpful AI assistant that can interact with a computer to \
             solve tasks.\n\nYour workspace is {ws} (also reachable as /workspace in file tool \
             paths). Use the tools: execute_bash runs a command in a persistent shell whose \
             working directory starts at the workspace; str_replace_editor views and edits \
             files inside the workspace; think records a thought; finish ends the task with a \
             message to the user. When you need the user, answer with a plain message.",
            ws = self.workspace
        )
    }

    pub(crate) fn tools(&self) -> Value {
        json!([
            {"type": "function", "function": {"name": "execute_bash",
              "description": "Execute a bash command in the terminal. Long-running commands return partial output; send an empty command with is_input true to wait, or C-c to interrupt.",
              "parameters": {"type": "object", "properties": {
                  "command": {"type": "string", "description": "The bash command to execute."},
                  "is_input": {"type": "string", "enum": ["true", "false"], "description": "If true, the command is input to the running process."},
                  "timeout": {"type": "number", "description": "Optional hard timeout in seconds."}},
                "required": ["command"]}}},
            {"type": "function", "function": {"name": "str_replace_editor",
              "description": "View, create and edit files in the workspace.",
              "parameters": {"type": "object", "properties": {
                  "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"]},
                  "path": {"type": "string"},
                  "file_text": {"type": "string"},
                  "old_str": {"type": "string"},
                  "new_str": {"type": "string"},
                  "insert_line": {"type": "integer"},
                  "view_range": {"type": "array", "items": {"type": "integer"}}},
                "required": ["command", "path"]}}},
            {"type": "function", "function": {"name": "think",
              "description": "Think about something; it is logged, nothing changes.",
              "parameters": {"type": "object", "properties": {"thought": {"type": "string"}}, "required": ["thought"]}}},
            {"type": "function", "function": {"name": "finish",
              "description": "Finish the interaction when the task is complete.",
              "parameters": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}}}
        ])
    }

    pub(crate) async fn step(
        &mut self,
        history: &[Event],
        cancel: &CancellationToken,
    ) -> Result<Vec<Event>, StepError> {
        let system = history
            .iter()
            .find(|e| e.action_type() == Some("system"))
            .and_then(|e| e.to_value()["args"]["content"].as_str().map(str::to_owned))
            .unwrap_or_else(|| self.system_prompt());
        let req = ChatRequest {
            messages: to_messages(&system, history),
            tools: self.tools().as_array().cloned().unwrap_or_default(),
        };
        let notify = self.notify.clone();
        let on_retry = move |n: RetryNotice| {
            notify(
                json!({"status_update": true, "type": "info", "id": "STATUS$LLM_RETRY",
                "message": format!("Retrying LLM request, {} / {}", n.attempt, n.max)}),
            );
        };
        let resp = match self.llm.complete(&req, &on_retry, cancel).await {
            Ok(r) => r,
            Err(LlmError::Cancelled) => return Err(StepError::Cancelled),
            Err(e) => {
                let id = e.status_id().unwrap_or("STATUS$ERROR");
                (self.notify)(json!({"status_update": true, "type": "error", "id": id,
                    "message": e.to_string()}));
                return Err(StepError::Failed {
                    reason: format!("{id}: {e}"),
                });
            }
        };
        let metrics = self.llm.metrics().snapshot_json();
        let thought = resp.message.content.clone().unwrap_or_default();
        let Some(call) = resp.message.tool_calls.first() else {
            let mut ev = Event::message(Source::Agent, thought, true);
            ev.llm_metrics = Some(metrics);
            return Ok(vec![ev]);
        };
        let meta = json!({
            "function_name": call.name,
            "tool_call_id": call.id,
            "model_response": resp.raw,
            "total_calls_in_response": resp.message.tool_calls.len(),
        });
        let mut ev = match to_action(call, &thought) {
            Ok(ev) => ev,
            Err(problem) => {
                let mut obs = Event::error_observation(
                    format!(
                        "Invalid tool call `{}`: {problem}. Fix the arguments and try again.",
                        call.name
                    ),
                    "",
                );
                obs.source = Some(Source::Agent);
                obs.tool_call_metadata = Some(meta);
                return Ok(vec![obs]);
            }
        };
        ev.tool_call_metadata = Some(meta);
        ev.llm_metrics = Some(metrics);
        Ok(vec![ev])
    }
}

fn action(json: Value) -> Result<Event, String> {
    Event::from_value(json)
        .map(|e| e.with_defaults())
        .map_err(|e| e.to_string())
}

/// A tool call as an OpenHands action (source agent).
fn to_action(call: &ToolCall, thought: &str) -> Result<Event, String> {
    let args: Value = serde_json::from_str(&call.arguments)
        .map_err(|e| format!("arguments are not valid JSON ({e})"))?;
    let s = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_owned);
    let need = |k: &str| s(k).ok_or_else(|| format!("missing string argument `{k}`"));
    let mut ev = match call.name.as_str() {
        "execute_bash" => {
            let is_input = match args.get("is_input") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(v)) if v == "true" => true,
                Some(Value::String(v)) if v == "false" => false,
                Some(other) => {
                    return Err(format!("`is_input` must be true or false, not {other}"));
                }
            };
            let mut j = json!({"action": "run", "args": {
                "command": need("command")?, "is_input": is_input, "thought": thought}});
            match args.get("timeout") {
                None | Some(Value::Null) => {}
                Some(t) => match t.as_f64() {
                    Some(t) if t.is_finite() && t > 0.0 => j["timeout"] = json!(t),
                    _ => return Err("`timeout` must be a positive number of seconds".into()),
                },
            }
            action(j)?
        }
        "str_replace_editor" => {
            let command = need("command")?;
            let path = need("path")?;
            match command.as_str() {
                "view" => action(
                    json!({"action": "read", "args": {"path": path, "thought": thought,
                    "impl_source": "oh_aci", "view_range": args.get("view_range").cloned().unwrap_or(Value::Null)}}),
                )?,
                "create" | "str_replace" | "insert" | "undo_edit" => {
                    action(json!({"action": "edit", "args": {
                    "path": path, "command": command, "thought": thought, "impl_source": "oh_aci",
                    "file_text": args.get("file_text").cloned().unwrap_or(Value::Null),
                    "old_str": args.get("old_str").cloned().unwrap_or(Value::Null),
                    "new_str": args.get("new_str").cloned().unwrap_or(Value::Null),
                    "insert_line": args.get("insert_line").cloned().unwrap_or(Value::Null)}}))?
                }
                other => return Err(format!("unknown editor command `{other}`")),
            }
        }
        "think" => action(json!({"action": "think", "args": {"thought": need("thought")?}}))?,
        "finish" => action(json!({"action": "finish", "args": {
            "final_thought": need("message")?, "outputs": {}, "thought": thought}}))?,
        other => return Err(format!("unknown tool `{other}`")),
    };
    ev.source = Some(Source::Agent);
    ev.message = ev.derived_message();
    Ok(ev)
}

/// The conversation as chat messages: the system prompt, user messages, the agent's messages
/// and tool calls, and each tool call's observation as the tool's answer. A tool call without
/// an observation (interrupted) gets a synthetic answer so the request stays valid.
pub(crate) fn to_messages(system: &str, history: &[Event]) -> Vec<ChatMessage> {
    let mut out = vec![ChatMessage::system(system)];
    let mut call_of: HashMap<u64, (String, String)> = HashMap::new();
    let mut open: Option<(String, String)> = None;
    let close_open = |out: &mut Vec<ChatMessage>, open: &mut Option<(String, String)>| {
        if let Some((id, name)) = open.take() {
            out.push(ChatMessage::tool(
                id,
                name,
                "(no result: the action was interrupted)",
            ));
        }
    };
    for ev in history {
        let v = ev.to_value();
        let meta = ev.tool_call_metadata.as_ref();
        if let (Some(meta), Some(_)) = (meta, ev.action_type()) {
            let id = meta["tool_call_id"].as_str().unwrap_or_default().to_owned();
            let name = meta["function_name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let arguments =
                find_arguments(&meta["model_response"], &id).unwrap_or_else(|| "{}".into());
            close_open(&mut out, &mut open);
            let thought = v["args"]["thought"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            out.push(ChatMessage::assistant(AssistantMessage {
                content: thought,
                tool_calls: vec![ToolCall {
                    id: id.clone(),
                    name: name.clone(),
                    arguments,
                }],
            }));
            if let Some(evid) = ev.id {
                call_of.insert(evid, (id.clone(), name.clone()));
            }
            open = Some((id, name));
            continue;
        }
        if ev.observation_type().is_some() {
            // The answer to a tool call: by cause, or (malformed call) by its own metadata.
            let by_cause = ev
                .cause
                .and_then(|c| u64::try_from(c).ok())
                .and_then(|c| call_of.get(&c).cloned());
            let by_meta = meta.map(|m| {
                (
                    m["tool_call_id"].as_str().unwrap_or_default().to_owned(),
                    m["function_name"].as_str().unwrap_or_default().to_owned(),
                )
            });
            if let Some((id, name)) = by_cause.clone() {
                if open.as_ref().is_some_and(|(o, _)| *o == id) {
                    open = None;
                }
                out.push(ChatMessage::tool(id, name, observation_text(&v)));
                continue;
            }
            if let Some((id, name)) = by_meta {
                close_open(&mut out, &mut open);
                let thought = None;
                out.push(ChatMessage::assistant(AssistantMessage {
                    content: thought,
                    tool_calls: vec![ToolCall {
                        id: id.clone(),
                        name: name.clone(),
                        arguments: find_arguments(
                            &meta.map_or(Value::Null, |m| m["model_response"].clone()),
                            &id,
                        )
                        .unwrap_or_else(|| "{}".into()),
                    }],
                }));
                out.push(ChatMessage::tool(id, name, observation_text(&v)));
                continue;
            }
            if ev.observation_type() == Some("recall") {
                let instr = v["extras"]["repo_instructions"]
                    .as_str()
                    .unwrap_or_default();
                let knowledge: Vec<String> = v["extras"]["microagent_knowledge"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|k| k["content"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if !instr.is_empty() || !knowledge.is_empty() {
                    close_open(&mut out, &mut open);
                    out.push(ChatMessage::user(format!(
                        "<WORKSPACE_CONTEXT>\n{instr}\n{}\n</WORKSPACE_CONTEXT>",
                        knowledge.join("\n")
                    )));
                }
            }
            continue;
        }
        if ev.action_type() == Some("message") {
            close_open(&mut out, &mut open);
            let content = v["args"]["content"].as_str().unwrap_or_default().to_owned();
            match ev.source {
                Some(Source::User) => out.push(ChatMessage::user(content)),
                Some(Source::Agent) => out.push(ChatMessage::assistant(AssistantMessage {
                    content: Some(content),
                    tool_calls: Vec::new(),
                })),
                _ => {}
            }
        }
    }
    close_open(&mut out, &mut open);
    out
}

fn find_arguments(model_response: &Value, call_id: &str) -> Option<String> {
    model_response["choices"][0]["message"]["tool_calls"]
        .as_array()?
        .iter()
        .find(|c| c["id"] == call_id)
        .and_then(|c| c["function"]["arguments"].as_str())
        .map(str::to_owned)
}

/// What the model sees of an observation.
fn observation_text(v: &Value) -> String {
    let content = v["content"].as_str().unwrap_or_default();
    match v["observation"].as_str() {
        Some("run") => {
            let m = &v["extras"]["metadata"];
            let prefix = m["prefix"].as_str().unwrap_or_default();
            let suffix = m["suffix"].as_str().unwrap_or_default();
            let cwd = m["working_dir"].as_str().unwrap_or_default();
            format!(
                "{prefix}{content}{suffix}\n[Current working directory: {cwd}]\n[Command finished with exit code {}]",
                m["exit_code"]
            )
        }
        Some("error") => format!("ERROR: {content}"),
        _ => content.to_owned(),
    }
}

#[cfg(test)]
mod tests;
