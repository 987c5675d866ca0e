//! Constructors for every event the server writes itself: lifecycle events, the agent's
//! actions (from its tool calls), the runtime's and memory's observations, and the live-only
//! `oh_event` payloads (status updates, errors to one client). Callers pass typed values;
//! OpenHands' defaults are filled in its field order and `message` is derived, so a built
//! event is what OpenHands would have written.

use serde_json::{Map, Number, Value};

use super::{AgentState, Event, Kind, Source};

/// The tool call that produced an agent event (`tool_call_metadata`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallMetadata {
    /// The tool (function) the model called, e.g. `execute_bash`.
    pub function_name: String,
    /// The model's id of the call; the observation answering it carries it too.
    pub tool_call_id: String,
    /// The model's whole response (OpenAI chat-completions shape); the call's arguments are
    /// read back from it ([`super::ToolCall::arguments`]).
    pub model_response: Value,
    /// How many tool calls that response had.
    pub total_calls_in_response: usize,
}

impl ToolCallMetadata {
    fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("function_name".into(), self.function_name.clone().into());
        m.insert("tool_call_id".into(), self.tool_call_id.clone().into());
        m.insert("model_response".into(), self.model_response.clone());
        m.insert(
            "total_calls_in_response".into(),
            self.total_calls_in_response.into(),
        );
        Value::Object(m)
    }
}

/// A `run` action's arguments (`execute_bash`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunArgs<'a> {
    /// The command line (or, with `is_input`, the input sent to the running command).
    pub command: &'a str,
    /// The command is input to the process still running.
    pub is_input: bool,
    /// The agent's reasoning shown with the action.
    pub thought: &'a str,
    /// Hard timeout in seconds, if the agent set one.
    pub timeout: Option<f64>,
}

/// A `read` action's arguments (`str_replace_editor view`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadArgs<'a> {
    /// File or directory to view.
    pub path: &'a str,
    /// First and last line to show (1-based; last `-1` = to the end).
    pub view_range: Option<(i64, i64)>,
    /// The agent's reasoning shown with the action.
    pub thought: &'a str,
}

/// An `edit` action's arguments (`str_replace_editor create|str_replace|insert|undo_edit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EditArgs<'a> {
    /// File to edit.
    pub path: &'a str,
    /// `create`, `str_replace`, `insert` or `undo_edit`.
    pub command: &'a str,
    /// `create`: the whole file.
    pub file_text: Option<&'a str>,
    /// `str_replace`: the text to replace.
    pub old_str: Option<&'a str>,
    /// `str_replace`/`insert`: the new text.
    pub new_str: Option<&'a str>,
    /// `insert`: the line after which `new_str` goes.
    pub insert_line: Option<i64>,
    /// The agent's reasoning shown with the action.
    pub thought: &'a str,
}

/// A command's result as a `run` observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdObservation<'a> {
    /// The command that ran.
    pub command: &'a str,
    /// Its (possibly truncated) output.
    pub content: &'a str,
    /// Exit code; -1 while it still runs or when it was killed.
    pub exit_code: i64,
    /// pid of the shell (-1 if none).
    pub pid: i64,
    /// Working directory afterwards.
    pub working_dir: &'a str,
    /// Note shown to the model before the output.
    pub prefix: &'a str,
    /// Note shown to the model after the output.
    pub suffix: &'a str,
}

/// A file edit's result as an `edit` observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EditObservation<'a> {
    /// What the model sees.
    pub content: &'a str,
    /// The absolute path acted on.
    pub path: &'a str,
    /// The file existed before.
    pub prev_exist: bool,
    /// Content before the change.
    pub old_content: Option<&'a str>,
    /// Content after the change.
    pub new_content: Option<&'a str>,
}

/// What a `recall` asks memory for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecallType {
    /// The first user message: workspace instructions and triggered knowledge.
    WorkspaceContext,
    /// Later messages: triggered knowledge only.
    Knowledge,
}

impl RecallType {
    fn as_str(self) -> &'static str {
        match self {
            Self::WorkspaceContext => "workspace_context",
            Self::Knowledge => "knowledge",
        }
    }
}

/// One knowledge file whose trigger word appeared in the user's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecalledKnowledge {
    /// The knowledge file's name.
    pub name: String,
    /// The trigger that matched.
    pub trigger: String,
    /// Its text, given to the model.
    pub content: String,
}

/// What memory recalled for a user message (a `recall` observation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecallContext {
    /// What was asked for.
    pub recall_type: RecallType,
    /// The workspace's instructions (`AGENTS.md`), on the first message.
    pub repo_instructions: String,
    /// Today's date, `YYYY-MM-DD`.
    pub date: String,
    /// The conversation's own instructions, if it was created with some.
    pub conversation_instructions: String,
    /// The workspace folder.
    pub working_dir: String,
    /// Triggered knowledge.
    pub knowledge: Vec<RecalledKnowledge>,
}

/// Severity of a [`StatusUpdate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusLevel {
    /// Progress, e.g. an LLM retry.
    Info,
    /// A failure the user should see.
    Error,
}

/// A live-only `oh_event` status update (`status_update: true`), e.g. `STATUS$LLM_RETRY`:
/// forwarded to connected clients, never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    /// Severity.
    pub level: StatusLevel,
    /// The UI's message id, e.g. `STATUS$LLM_RETRY`.
    pub id: String,
    /// Text for the user.
    pub message: String,
}

impl StatusUpdate {
    /// The `oh_event` payload.
    pub fn to_json(&self) -> String {
        let level = match self.level {
            StatusLevel::Info => "info",
            StatusLevel::Error => "error",
        };
        let mut m = Map::new();
        m.insert("status_update".into(), true.into());
        m.insert("type".into(), level.into());
        m.insert("id".into(), self.id.clone().into());
        m.insert("message".into(), self.message.clone().into());
        Value::Object(m).to_string()
    }
}

/// The `oh_event` payload (and acknowledgement) that tells one client its request failed:
/// `{"error": true, "message": ...}`.
pub fn error_payload(message: &str) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), true.into());
    m.insert("message".into(), message.into());
    Value::Object(m)
}

/// The acknowledgement of a stored user action: `{"success": true, "seq": ...}`.
pub fn ack_payload(seq: u64) -> Value {
    let mut m = Map::new();
    m.insert("success".into(), true.into());
    m.insert("seq".into(), seq.into());
    Value::Object(m)
}

fn object<const N: usize>(fields: [(&str, Value); N]) -> Map<String, Value> {
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn opt_str(v: Option<&str>) -> Value {
    v.map_or(Value::Null, Value::from)
}

impl Event {
    fn build(kind: Kind, source: Option<Source>) -> Event {
        let mut event = Event {
            id: None,
            timestamp: None,
            source,
            message: String::new(),
            cause: None,
            kind,
            tool_call_metadata: None,
            llm_metrics: None,
            extra: Map::new(),
        }
        .with_defaults();
        event.message = event.derived_message();
        event
    }

    fn new_action(action: &str, args: Map<String, Value>, source: Option<Source>) -> Event {
        Self::build(
            Kind::Action {
                action: action.to_owned(),
                args,
                timeout: None,
            },
            source,
        )
    }

    fn new_observation(
        observation: &str,
        content: String,
        extras: Map<String, Value>,
        source: Option<Source>,
    ) -> Event {
        Self::build(
            Kind::Observation {
                observation: observation.to_owned(),
                content,
                extras,
                success: None,
            },
            source,
        )
    }

    /// A `message` action (all default args filled; `message` is the content).
    pub fn message(source: Source, content: impl Into<String>, wait_for_response: bool) -> Event {
        let args = object([
            ("content", Value::String(content.into())),
            ("wait_for_response", wait_for_response.into()),
        ]);
        Self::new_action("message", args, Some(source))
    }

    /// The `system` action (source `agent`) carrying the system prompt and tool schemas.
    pub fn system(
        content: impl Into<String>,
        tools: Option<Value>,
        agent_class: &str,
        openhands_version: &str,
    ) -> Event {
        let args = object([
            ("content", Value::String(content.into())),
            ("tools", tools.unwrap_or(Value::Null)),
            ("openhands_version", openhands_version.into()),
            ("agent_class", agent_class.into()),
        ]);
        Self::new_action("system", args, Some(Source::Agent))
    }

    /// A `change_agent_state` action as the server builds it (source `environment`;
    /// message `Agent state changed to <state>`).
    pub fn change_agent_state(state: AgentState) -> Event {
        let args = object([("agent_state", state.as_str().into())]);
        Self::new_action("change_agent_state", args, Some(Source::Environment))
    }

    /// An agent `run` action (a shell command).
    pub fn run(args: RunArgs<'_>) -> Event {
        let mut event = Self::new_action(
            "run",
            object([
                ("command", args.command.into()),
                ("is_input", args.is_input.into()),
                ("thought", args.thought.into()),
            ]),
            Some(Source::Agent),
        );
        if let Kind::Action { timeout, .. } = &mut event.kind {
            *timeout = args.timeout.and_then(Number::from_f64);
        }
        event
    }

    /// An agent `read` action (`str_replace_editor view`).
    pub fn read(args: ReadArgs<'_>) -> Event {
        let range = args
            .view_range
            .map_or(Value::Null, |(a, b)| Value::from(vec![a, b]));
        let args = object([
            ("path", args.path.into()),
            ("thought", args.thought.into()),
            ("impl_source", "oh_aci".into()),
            ("view_range", range),
        ]);
        Self::new_action("read", args, Some(Source::Agent))
    }

    /// An agent `edit` action (`str_replace_editor` changing a file).
    pub fn edit(args: EditArgs<'_>) -> Event {
        let args = object([
            ("path", args.path.into()),
            ("command", args.command.into()),
            ("thought", args.thought.into()),
            ("impl_source", "oh_aci".into()),
            ("file_text", opt_str(args.file_text)),
            ("old_str", opt_str(args.old_str)),
            ("new_str", opt_str(args.new_str)),
            (
                "insert_line",
                args.insert_line.map_or(Value::Null, Value::from),
            ),
        ]);
        Self::new_action("edit", args, Some(Source::Agent))
    }

    /// An agent `think` action.
    pub fn think(thought: &str) -> Event {
        Self::new_action(
            "think",
            object([("thought", thought.into())]),
            Some(Source::Agent),
        )
    }

    /// An agent `finish` action: the task is done; `final_thought` is the message to the user.
    pub fn finish(final_thought: &str, thought: &str) -> Event {
        let args = object([
            ("final_thought", final_thought.into()),
            ("outputs", Value::Object(Map::new())),
            ("thought", thought.into()),
        ]);
        Self::new_action("finish", args, Some(Source::Agent))
    }

    /// A `recall` action (source `user`): memory is asked about a user message.
    pub fn recall(query: &str, recall_type: RecallType) -> Event {
        let args = object([
            ("recall_type", recall_type.as_str().into()),
            ("query", query.into()),
            ("thought", "".into()),
        ]);
        Self::new_action("recall", args, Some(Source::User))
    }

    /// An `agent_state_changed` observation (source `environment`, content and message
    /// `""`, extras `{agent_state, reason}`).
    pub fn agent_state_changed(state: AgentState, reason: impl Into<String>) -> Event {
        let extras = object([
            ("agent_state", state.as_str().into()),
            ("reason", Value::String(reason.into())),
        ]);
        Self::new_observation(
            "agent_state_changed",
            String::new(),
            extras,
            Some(Source::Environment),
        )
    }

    /// An `error` observation (`message` is the content; `error_id` e.g.
    /// `AGENT_ERROR$ERROR_ACTION_NOT_EXECUTED_STOPPED`, or `""`). No source: the append path
    /// or the caller sets it.
    pub fn error_observation(content: impl Into<String>, error_id: &str) -> Event {
        let extras = object([("error_id", error_id.into())]);
        Self::new_observation("error", content.into(), extras, None)
    }

    /// The `think` observation that answers a `think` action.
    pub fn think_observation() -> Event {
        Self::new_observation(
            "think",
            "Your thought has been logged.".into(),
            Map::new(),
            None,
        )
    }

    /// A `run` observation: a command's result (`success` is exit code 0).
    pub fn run_observation(out: CmdObservation<'_>) -> Event {
        let metadata = object([
            ("exit_code", out.exit_code.into()),
            ("pid", out.pid.into()),
            ("username", Value::Null),
            ("hostname", Value::Null),
            ("working_dir", out.working_dir.into()),
            ("py_interpreter_path", Value::Null),
            ("prefix", out.prefix.into()),
            ("suffix", out.suffix.into()),
        ]);
        let extras = object([
            ("command", out.command.into()),
            ("metadata", Value::Object(metadata)),
            ("hidden", false.into()),
        ]);
        let mut event = Self::new_observation("run", out.content.to_owned(), extras, None);
        if let Kind::Observation { success, .. } = &mut event.kind {
            *success = Some(out.exit_code == 0);
        }
        event
    }

    /// A `read` observation: a file or directory view.
    pub fn read_observation(content: &str, path: &str) -> Event {
        let extras = object([("path", path.into()), ("impl_source", "oh_aci".into())]);
        Self::new_observation("read", content.to_owned(), extras, None)
    }

    /// An `edit` observation: a file change's result.
    pub fn edit_observation(out: EditObservation<'_>) -> Event {
        let extras = object([
            ("path", out.path.into()),
            ("prev_exist", out.prev_exist.into()),
            ("old_content", opt_str(out.old_content)),
            ("new_content", opt_str(out.new_content)),
            ("impl_source", "oh_aci".into()),
            ("diff", Value::Null),
            ("_diff_cache", Value::Null),
        ]);
        Self::new_observation("edit", out.content.to_owned(), extras, None)
    }

    /// A `recall` observation (source `environment`): what memory found.
    pub fn recall_observation(found: &RecallContext) -> Event {
        let knowledge = found
            .knowledge
            .iter()
            .map(|k| {
                Value::Object(object([
                    ("name", k.name.as_str().into()),
                    ("trigger", k.trigger.as_str().into()),
                    ("content", k.content.as_str().into()),
                ]))
            })
            .collect::<Vec<_>>();
        let extras = object([
            ("recall_type", found.recall_type.as_str().into()),
            ("repo_name", Value::Null),
            ("repo_directory", Value::Null),
            ("repo_branch", Value::Null),
            ("repo_instructions", found.repo_instructions.as_str().into()),
            ("runtime_hosts", Value::Object(Map::new())),
            ("additional_agent_instructions", "".into()),
            ("date", found.date.as_str().into()),
            ("custom_secrets_descriptions", Value::Object(Map::new())),
            (
                "conversation_instructions",
                found.conversation_instructions.as_str().into(),
            ),
            ("working_dir", found.working_dir.as_str().into()),
            ("microagent_knowledge", Value::Array(knowledge)),
        ]);
        Self::new_observation("recall", String::new(), extras, Some(Source::Environment))
    }

    /// A `null` observation (source `environment`): e.g. a recall that found nothing.
    pub fn null_observation() -> Event {
        Self::new_observation("null", String::new(), Map::new(), Some(Source::Environment))
    }

    /// Sets the tool call that produced this event.
    pub fn set_tool_call(&mut self, meta: &ToolCallMetadata) {
        self.tool_call_metadata = Some(meta.to_value());
    }

    /// Sets `wait_for_response` of a `message` action (no effect on other events).
    pub fn set_wait_for_response(&mut self, wait: bool) {
        if let Kind::Action { action, args, .. } = &mut self.kind
            && action == "message"
        {
            args.insert("wait_for_response".into(), wait.into());
        }
    }

    /// Marks this event as the answer to the event with id `action_id` (`cause`).
    pub fn set_cause(&mut self, action_id: Option<u64>) {
        self.cause = action_id.and_then(|i| i64::try_from(i).ok());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::event::{ActionView, ObservationView};

    /// A built event is valid OpenHands JSON: it parses back to itself.
    fn reparsed(event: &Event) -> Event {
        let back = Event::from_json(event.to_json().as_bytes()).unwrap();
        assert_eq!(&back, event);
        back
    }

    #[test]
    fn agent_actions_are_openhands_json_and_read_back_through_views() {
        let run = RunArgs {
            command: "ls -la",
            is_input: false,
            thought: "look",
            timeout: Some(2.5),
        };
        let ev = reparsed(&Event::run(run));
        assert_eq!(
            ev.to_value(),
            json!({"message": "Running command: ls -la", "source": "agent", "action": "run",
                "args": {"command": "ls -la", "is_input": false, "thought": "look",
                    "blocking": false, "is_static": false, "cwd": null, "hidden": false,
                    "confirmation_state": "confirmed", "security_risk": -1},
                "timeout": 2.5})
        );
        assert_eq!(ev.action(), Some(ActionView::Run(run)));
        assert_eq!(ev.thought(), "look");

        let read = ReadArgs {
            path: "/workspace/a.txt",
            view_range: Some((1, 40)),
            thought: "",
        };
        let ev = reparsed(&Event::read(read));
        assert_eq!(ev.to_value()["args"]["view_range"], json!([1, 40]));
        assert_eq!(ev.action(), Some(ActionView::Read(read)));

        let edit = EditArgs {
            path: "a.txt",
            command: "str_replace",
            file_text: None,
            old_str: Some("a"),
            new_str: Some("b"),
            insert_line: None,
            thought: "fix",
        };
        let ev = reparsed(&Event::edit(edit));
        assert_eq!(ev.to_value()["args"]["file_text"], Value::Null);
        assert_eq!(ev.action(), Some(ActionView::Edit(edit)));

        let ev = reparsed(&Event::finish("done", "all good"));
        assert_eq!(ev.to_value()["args"]["final_thought"], "done");
        assert_eq!(ev.action(), Some(ActionView::Finish));
        assert_eq!(
            reparsed(&Event::think("hm")).action(),
            Some(ActionView::Think)
        );

        let ev = reparsed(&Event::message(Source::Agent, "hi", true));
        assert_eq!(ev.message_content(), Some("hi"));
        assert!(matches!(
            ev.action(),
            Some(ActionView::Message {
                wait_for_response: true,
                ..
            })
        ));
        let mut ev = ev;
        ev.set_wait_for_response(false);
        assert_eq!(ev.to_value()["args"]["wait_for_response"], false);
    }

    #[test]
    fn runtime_observations_are_openhands_json_and_read_back() {
        let out = CmdObservation {
            command: "false",
            content: "",
            exit_code: 1,
            pid: 42,
            working_dir: "/ws",
            prefix: "",
            suffix: "[done]",
        };
        let mut ev = Event::run_observation(out);
        ev.set_cause(Some(7));
        let ev = reparsed(&ev);
        let v = ev.to_value();
        assert_eq!(v["success"], false);
        assert_eq!(v["cause"], 7);
        assert_eq!(
            v["extras"]["metadata"],
            json!({"exit_code": 1, "pid": 42, "username": null, "hostname": null,
                "working_dir": "/ws", "py_interpreter_path": null, "prefix": "",
                "suffix": "[done]"})
        );
        assert_eq!(ev.observation(), Some(ObservationView::Run(out)));

        let ev = reparsed(&Event::edit_observation(EditObservation {
            content: "ok",
            path: "/ws/a",
            prev_exist: true,
            old_content: Some("a"),
            new_content: Some("b"),
        }));
        assert_eq!(ev.to_value()["extras"]["impl_source"], "oh_aci");
        assert_eq!(
            reparsed(&Event::read_observation("1\tx", "/ws/a")).to_value()["extras"]["path"],
            "/ws/a"
        );
        assert_eq!(
            Event::error_observation("bad", "").observation(),
            Some(ObservationView::Error { content: "bad" })
        );
    }

    #[test]
    fn recall_round_trip() {
        let action = reparsed(&Event::recall("deploy", RecallType::Knowledge));
        assert_eq!(action.source, Some(Source::User));
        assert_eq!(action.action(), Some(ActionView::Recall));
        let found = RecallContext {
            recall_type: RecallType::WorkspaceContext,
            repo_instructions: "Run make.".into(),
            date: "2026-11-28".into(),
            conversation_instructions: String::new(),
            working_dir: "/ws".into(),
            knowledge: vec![RecalledKnowledge {
                name: "k8s".into(),
                trigger: "deploy".into(),
                content: "Use kubectl.".into(),
            }],
        };
        let obs = reparsed(&Event::recall_observation(&found));
        let Some(ObservationView::Recall(view)) = obs.observation() else {
            panic!("not a recall: {obs:?}");
        };
        assert_eq!(view.repo_instructions(), "Run make.");
        assert_eq!(view.knowledge().collect::<Vec<_>>(), ["Use kubectl."]);
        assert!(reparsed(&Event::null_observation()).is_null());
    }

    #[test]
    fn tool_call_metadata_finds_its_arguments() {
        let meta = ToolCallMetadata {
            function_name: "execute_bash".into(),
            tool_call_id: "call_2".into(),
            model_response: json!({"choices": [{"message": {"tool_calls": [
                {"id": "call_1", "function": {"name": "think", "arguments": "{}"}},
                {"id": "call_2", "function": {"name": "execute_bash",
                    "arguments": "{\"command\":\"ls\"}"}}]}}]}),
            total_calls_in_response: 2,
        };
        let mut ev = Event::think("");
        assert!(ev.tool_call().is_none());
        ev.set_tool_call(&meta);
        let ev = reparsed(&ev);
        let call = ev.tool_call().unwrap();
        assert_eq!(call.function_name, "execute_bash");
        assert_eq!(call.tool_call_id, "call_2");
        assert_eq!(call.arguments(), Some("{\"command\":\"ls\"}"));
        assert_eq!(
            ev.to_value()["tool_call_metadata"]["total_calls_in_response"],
            2
        );
    }

    #[test]
    fn live_only_payloads() {
        let update = StatusUpdate {
            level: StatusLevel::Info,
            id: "STATUS$LLM_RETRY".into(),
            message: "Retrying".into(),
        };
        let v: Value = serde_json::from_str(&update.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"status_update": true, "type": "info", "id": "STATUS$LLM_RETRY",
                "message": "Retrying"})
        );
        assert_eq!(error_payload("no"), json!({"error": true, "message": "no"}));
        assert_eq!(ack_payload(3), json!({"success": true, "seq": 3}));
    }
}
