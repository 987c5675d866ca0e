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
//! A response with several tool calls runs them all, in order, one per step (as OpenHands
//! does): each later step takes the next call of that response that the log does not hold yet
//! ([`next_call_of_last_response`]), without asking the model again. Derived from the log, so a
//! new owner after a failover continues with the calls that are left; a user message in
//! between drops them (the model sees the new message instead).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde_json::{Value, json};
use shared::event::{
    self, ActionView, EditArgs, Event, ObservationView, ReadArgs, RunArgs, Source, StatusLevel,
    StatusUpdate, ToolCallMetadata,
};
use tokio_util::sync::CancellationToken;

use super::StepError;
use crate::llm::{
    AssistantMessage, ChatMessage, Llm, LlmError, RequestBody, RetryNotice, ToolCall,
};

/// Publishes status updates (live-only `oh_event`s) to the session's clients.
pub(crate) type Notify = Arc<dyn Fn(StatusUpdate) + Send + Sync>;

pub(crate) struct CodeAct {
    pub(crate) llm: Llm,
    pub(crate) notify: Notify,
    pub(crate) workspace: String,
    /// The chat sent to the model, kept up to date step by step.
    pub(crate) chat: Chat,
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

    /// [`CodeAct::tools`] (the same for every CodeAct) as the JSON text of a request,
    /// rendered once per process.
    fn tools_json(&self) -> &'static str {
        static TOOLS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        TOOLS.get_or_init(|| self.tools().to_string())
    }

    pub(crate) async fn step(
        &mut self,
        history: &[Event],
        cancel: &CancellationToken,
    ) -> Result<Vec<Event>, StepError> {
        if let Some(next) = next_call_of_last_response(history) {
            let mut ev = next;
            ev.llm_metrics = Some(self.llm.metrics().snapshot_json());
            return Ok(vec![ev]);
        }
        let system = history
            .iter()
            .find_map(|e| match e.action() {
                Some(ActionView::System { content }) => Some(content.to_owned()),
                _ => None,
            })
            .unwrap_or_else(|| self.system_prompt());
        self.chat.sync(history);
        let (parts, count) = self.chat.parts(&system);
        let body = RequestBody::new(self.llm.model(), parts, count, Some(self.tools_json()));
        let notify = self.notify.clone();
        let on_retry = move |n: RetryNotice| {
            notify(StatusUpdate {
                level: StatusLevel::Info,
                id: "STATUS$LLM_RETRY".into(),
                message: format!("Retrying LLM request, {} / {}", n.attempt, n.max),
            });
        };
        let resp = match self.llm.complete_body(&body, &on_retry, cancel).await {
            Ok(r) => r,
            Err(LlmError::Cancelled) => return Err(StepError::Cancelled),
            Err(e) => {
                let id = e.status_id().unwrap_or("STATUS$ERROR");
                (self.notify)(StatusUpdate {
                    level: StatusLevel::Error,
                    id: id.to_owned(),
                    message: e.to_string(),
                });
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
        let meta = ToolCallMetadata {
            function_name: call.name.clone(),
            tool_call_id: call.id.clone(),
            model_response: resp.raw,
            total_calls_in_response: resp.message.tool_calls.len(),
        };
        let mut ev = call_event(call, &thought, &meta);
        if ev.action().is_some() {
            ev.llm_metrics = Some(metrics);
        }
        Ok(vec![ev])
    }
}

/// The event of one tool call: its action, or the `error` observation of a malformed call.
fn call_event(call: &ToolCall, thought: &str, meta: &ToolCallMetadata) -> Event {
    let mut ev = match to_action(call, thought) {
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
            obs
        }
    };
    ev.set_tool_call(meta);
    ev
}

/// The next tool call of the model's newest response that has no event in the log yet, as
/// its event; `None` when all ran, the response had one call, or a user spoke since.
pub(crate) fn next_call_of_last_response(history: &[Event]) -> Option<Event> {
    let last = history.iter().rev().find(|e| {
        (e.source == Some(Source::Agent) && e.tool_call().is_some())
            || (e.source == Some(Source::User) && e.message_content().is_some())
    })?;
    if last.source == Some(Source::User) {
        return None;
    }
    let response = last
        .tool_call_metadata
        .as_ref()?
        .get("model_response")?
        .clone();
    let calls: Vec<ToolCall> = response
        .pointer("/choices/0/message/tool_calls")?
        .as_array()?
        .iter()
        .filter_map(|c| {
            Some(ToolCall {
                id: c.get("id")?.as_str()?.to_owned(),
                name: c.pointer("/function/name")?.as_str()?.to_owned(),
                arguments: c
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or("{}")
                    .to_owned(),
            })
        })
        .collect();
    if calls.len() < 2 {
        return None;
    }
    let seen: std::collections::HashSet<&str> = history
        .iter()
        .filter_map(|e| e.tool_call().map(|c| c.tool_call_id))
        .collect();
    let call = calls.iter().find(|c| !seen.contains(c.id.as_str()))?;
    let meta = ToolCallMetadata {
        function_name: call.name.clone(),
        tool_call_id: call.id.clone(),
        total_calls_in_response: calls.len(),
        model_response: response,
    };
    Some(call_event(call, "", &meta))
}

/// A tool call as an OpenHands action (source agent). The error says what is wrong with the
/// call's arguments, for the model.
fn to_action(call: &ToolCall, thought: &str) -> Result<Event, String> {
    let args: Value = serde_json::from_str(&call.arguments)
        .map_err(|e| format!("arguments are not valid JSON ({e})"))?;
    let args = ToolArgs(&args);
    Ok(match call.name.as_str() {
        "execute_bash" => Event::run(RunArgs {
            command: args.need("command")?,
            is_input: args.is_input()?,
            thought,
            timeout: args.timeout()?,
        }),
        "str_replace_editor" => {
            let command = args.need("command")?;
            let path = args.need("path")?;
            match command {
                "view" => Event::read(ReadArgs {
                    path,
                    view_range: args.view_range()?,
                    thought,
                }),
                "create" | "str_replace" | "insert" | "undo_edit" => Event::edit(EditArgs {
                    path,
                    command,
                    file_text: args.opt("file_text", Value::as_str, "a string")?,
                    old_str: args.opt("old_str", Value::as_str, "a string")?,
                    new_str: args.opt("new_str", Value::as_str, "a string")?,
                    insert_line: args.opt("insert_line", Value::as_i64, "an integer")?,
                    thought,
                }),
                other => return Err(format!("unknown editor command `{other}`")),
            }
        }
        "think" => Event::think(args.need("thought")?),
        "finish" => Event::finish(args.need("message")?, thought),
        other => return Err(format!("unknown tool `{other}`")),
    })
}

/// A tool call's arguments object, read with the errors the model is shown.
struct ToolArgs<'a>(&'a Value);

impl<'a> ToolArgs<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn need(&self, k: &str) -> Result<&'a str, String> {
        self.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("missing string argument `{k}`"))
    }

    /// An optional argument: absent or null is `None`, another JSON type an error.
    fn opt<T>(
        &self,
        k: &str,
        read: impl Fn(&'a Value) -> Option<T>,
        what: &str,
    ) -> Result<Option<T>, String> {
        self.get(k)
            .map(|v| read(v).ok_or_else(|| format!("`{k}` must be {what}")))
            .transpose()
    }

    fn is_input(&self) -> Result<bool, String> {
        match self.get("is_input") {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(v)) if v == "true" => Ok(true),
            Some(Value::String(v)) if v == "false" => Ok(false),
            Some(other) => Err(format!("`is_input` must be true or false, not {other}")),
        }
    }

    fn timeout(&self) -> Result<Option<f64>, String> {
        match self.get("timeout") {
            None => Ok(None),
            Some(t) => match t.as_f64() {
                Some(t) if t.is_finite() && t > 0.0 => Ok(Some(t)),
                _ => Err("`timeout` must be a positive number of seconds".into()),
            },
        }
    }

    fn view_range(&self) -> Result<Option<(i64, i64)>, String> {
        let Some(v) = self.get("view_range") else {
            return Ok(None);
        };
        v.as_array()
            .filter(|r| r.len() == 2)
            .and_then(|r| Some((r[0].as_i64()?, r[1].as_i64()?)))
            .map(Some)
            .ok_or_else(|| "`view_range` must be two line numbers, e.g. [1, 40]".into())
    }
}

/// The conversation as the chat messages' wire JSON, converted from scratch: the system
/// prompt, user messages, the agent's messages and tool calls, and each tool call's
/// observation as the tool's answer. A tool call without an observation (interrupted) gets a
/// synthetic answer so the request stays valid. (Tests; a step uses [`Chat`].)
#[cfg(test)]
pub(crate) fn to_messages(system: &str, history: &[Event]) -> Vec<String> {
    let mut chat = Chat::default();
    chat.sync(history);
    chat.wire(system)
}

/// The chat sent to the model, kept up to date step by step: only the events added since the
/// last step are converted, each message is rendered to its wire JSON once, and the rendered
/// messages are kept joined in one buffer that each request sends as it is (a part of its
/// body), so a step's cost does not grow with the conversation's length (beyond sending it).
/// A history that is not an extension of the one seen (another controller's) is converted
/// again from the start.
#[derive(Debug, Default)]
pub(crate) struct Chat {
    /// Events converted so far, and the id of the last of them.
    seen: usize,
    last_id: Option<u64>,
    /// The messages after the system prompt (without the synthetic answer of an open call),
    /// their wire JSON joined by commas, as of the last request: shared with that request's
    /// body while it is sent, appended to in place afterwards.
    sent: Bytes,
    /// Messages added since, each after a comma if anything comes before it.
    added: String,
    /// Messages in `sent` and `added`.
    count: usize,
    /// Tool call (event id) → (call id, function name).
    call_of: HashMap<u64, (String, String)>,
    /// The newest tool call, while it has no answer.
    open: Option<(String, String)>,
}

impl Chat {
    /// Converts the events of `history` not converted yet.
    pub(crate) fn sync(&mut self, history: &[Event]) {
        let extends = self.seen <= history.len()
            && (self.seen == 0 || history[self.seen - 1].id == self.last_id);
        if !extends {
            *self = Chat::default();
        }
        for ev in &history[self.seen..] {
            self.push_event(ev);
        }
        self.seen = history.len();
        self.last_id = history.last().and_then(|e| e.id);
    }

    /// The request's messages as parts of a [`RequestBody`], and how many: `system`, the
    /// conversation, and the synthetic answer of a call still open.
    pub(crate) fn parts(&mut self, system: &str) -> (Vec<Bytes>, usize) {
        self.flush();
        let mut parts = vec![Bytes::from(ChatMessage::system(system).wire_json())];
        if self.count > 0 {
            parts.push(Bytes::from_static(b","));
            parts.push(self.sent.clone());
        }
        let mut count = 1 + self.count;
        if let Some(m) = self.pending_answer() {
            parts.push(Bytes::from(format!(",{}", m.wire_json())));
            count += 1;
        }
        (parts, count)
    }

    /// Appends what was added to `sent`: in place once no request body holds `sent` any more
    /// (the previous step's request is over by the next step), else into a copy.
    fn flush(&mut self) {
        if self.added.is_empty() {
            return;
        }
        let mut buf = match std::mem::take(&mut self.sent).try_into_mut() {
            Ok(buf) => buf,
            Err(shared) => BytesMut::from(&shared[..]),
        };
        buf.extend_from_slice(self.added.as_bytes());
        self.added.clear();
        self.sent = buf.freeze();
    }

    /// Each message of the request, as its wire JSON (tests).
    #[cfg(test)]
    pub(crate) fn wire(&mut self, system: &str) -> Vec<String> {
        let (parts, count) = self.parts(system);
        let text = String::from_utf8(parts.concat()).unwrap();
        let list: Vec<Box<serde_json::value::RawValue>> =
            serde_json::from_str(&format!("[{text}]")).unwrap();
        assert_eq!(list.len(), count, "{text}");
        list.into_iter().map(|m| m.get().to_owned()).collect()
    }

    fn pending_answer(&self) -> Option<ChatMessage> {
        self.open.as_ref().map(|(id, name)| {
            ChatMessage::tool(
                id.clone(),
                name.clone(),
                "(no result: the action was interrupted)",
            )
        })
    }

    fn push_message(&mut self, m: ChatMessage) {
        if self.count > 0 {
            self.added.push(',');
        }
        self.added.push_str(&m.wire_json());
        self.count += 1;
    }

    fn close_open(&mut self) {
        if let Some(m) = self.pending_answer() {
            self.open = None;
            self.push_message(m);
        }
    }

    fn push_event(&mut self, ev: &Event) {
        let call = ev.tool_call();
        if let (Some(call), Some(_)) = (call, ev.action()) {
            let (id, name) = (call.tool_call_id.to_owned(), call.function_name.to_owned());
            self.close_open();
            let thought = Some(ev.thought())
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            self.push_message(ChatMessage::assistant(AssistantMessage {
                content: thought,
                tool_calls: vec![llm_call(call)],
            }));
            if let Some(evid) = ev.id {
                self.call_of.insert(evid, (id.clone(), name.clone()));
            }
            self.open = Some((id, name));
            return;
        }
        if let Some(obs) = ev.observation() {
            // The answer to a tool call: by cause, or (malformed call) by its own metadata.
            let by_cause = ev
                .cause
                .and_then(|c| u64::try_from(c).ok())
                .and_then(|c| self.call_of.get(&c).cloned());
            if let Some((id, name)) = by_cause {
                if self.open.as_ref().is_some_and(|(o, _)| *o == id) {
                    self.open = None;
                }
                self.push_message(ChatMessage::tool(id, name, observation_text(obs)));
                return;
            }
            if let Some(call) = call {
                self.close_open();
                self.push_message(ChatMessage::assistant(AssistantMessage {
                    content: None,
                    tool_calls: vec![llm_call(call)],
                }));
                self.push_message(ChatMessage::tool(
                    call.tool_call_id,
                    call.function_name,
                    observation_text(obs),
                ));
                return;
            }
            if let (ObservationView::Error { content }, None) = (&obs, ev.cause) {
                // A notice from the server (workspace restored, snapshot refused, ...): shown
                // to the model as OpenHands shows an error observation without a tool call.
                self.close_open();
                self.push_message(ChatMessage::user(format!("ERROR: {content}")));
                return;
            }
            if let ObservationView::Recall(recall) = obs {
                let instr = recall.repo_instructions();
                let knowledge: Vec<&str> = recall.knowledge().collect();
                if !instr.is_empty() || !knowledge.is_empty() {
                    self.close_open();
                    self.push_message(ChatMessage::user(format!(
                        "<WORKSPACE_CONTEXT>\n{instr}\n{}\n</WORKSPACE_CONTEXT>",
                        knowledge.join("\n")
                    )));
                }
            }
            return;
        }
        if let Some(content) = ev.message_content() {
            self.close_open();
            match ev.source {
                Some(Source::User) => self.push_message(ChatMessage::user(content)),
                Some(Source::Agent) => {
                    self.push_message(ChatMessage::assistant(AssistantMessage {
                        content: Some(content.to_owned()),
                        tool_calls: Vec::new(),
                    }))
                }
                _ => {}
            }
        }
    }
}

/// A recorded tool call as the LLM client sends it back to the model.
fn llm_call(call: event::ToolCall<'_>) -> ToolCall {
    ToolCall {
        id: call.tool_call_id.to_owned(),
        name: call.function_name.to_owned(),
        arguments: call.arguments().unwrap_or("{}").to_owned(),
    }
}

/// What the model sees of an observation.
fn observation_text(obs: ObservationView<'_>) -> String {
    match obs {
        ObservationView::Run(run) => format!(
            "{}{}{}\n[Current working directory: {}]\n[Command finished with exit code {}]",
            run.prefix, run.content, run.suffix, run.working_dir, run.exit_code
        ),
        ObservationView::Error { content } => format!("ERROR: {content}"),
        ObservationView::Recall(_) => String::new(),
        ObservationView::Other { content, .. } => content.to_owned(),
    }
}

#[cfg(test)]
mod tests;
