//! The controller of one session: the agent, what it has seen, and the two kinds of steps of a
//! turn. A step is a future that owns the controller while it runs and hands it back with its
//! result, so the session task can keep reading user actions (and cancel the step) meanwhile.
//!
//! - `think`: the agent decides the next events (an LLM call for an LLM agent).
//! - `act`: the runtime executes a runnable action and yields its observation.
//!
//! Both honour a cancellation token: stop/pause from the user takes effect within a second,
//! also in the middle of an LLM call or a command.

use std::future::Future;
use std::pin::Pin;

use shared::event::{ActionView, CmdObservation, EditObservation, Event, Source};
use shared::id::SessionId;
use tokio_util::sync::CancellationToken;

use crate::agent::{AgentImpl, StepError};
use crate::runtime::{CmdRequest, EditCommand, Runtime, RuntimeConfig, RuntimeError};

/// What a step produced.
pub(crate) enum Step {
    /// The agent's next events (actions, or observations such as a tool-call error).
    Think(Result<Vec<Event>, StepError>),
    /// The observation of the executed action.
    Acted(Vec<Event>),
}

/// A running step: resolves to the controller and the step's result.
pub(crate) type Busy = Pin<Box<dyn Future<Output = (Controller, Step)> + Send>>;

/// The agent side of a session.
pub(crate) struct Controller {
    pub(crate) agent: AgentImpl,
    /// Every event of the conversation so far, in id order.
    pub(crate) history: Vec<Event>,
    /// Steps taken in the current turn.
    pub(crate) iterations: u32,
    /// Most steps per turn before the turn ends in `error`.
    pub(crate) max_iterations: u32,
    /// Most LLM spend (USD) for the conversation, if limited.
    pub(crate) max_budget: Option<f64>,
    /// The session's runtime, started on the first action that needs it.
    pub(crate) runtime: Option<Runtime>,
    pub(crate) runtime_cfg: RuntimeConfig,
    pub(crate) sid: SessionId,
    /// Knowledge files recalled by trigger (LLM agents only; empty otherwise).
    pub(crate) knowledge: std::sync::Arc<[crate::memory::Knowledge]>,
    /// Whether user messages trigger a recall (LLM agents).
    pub(crate) recalls: bool,
}

/// True for actions the runtime executes (their observation completes the step).
pub(crate) fn is_runnable(ev: &Event) -> bool {
    matches!(
        ev.action_type(),
        Some("run" | "run_ipython" | "read" | "write" | "edit" | "think" | "browse")
    )
}

impl Controller {
    /// The agent decides the next events.
    pub(crate) fn think(mut self, cancel: CancellationToken) -> Busy {
        Box::pin(async move {
            let res = tokio::select! {
                r = self.agent.step(&self.history, &cancel) => r,
                () = cancel.cancelled() => Err(StepError::Cancelled),
            };
            (self, Step::Think(res))
        })
    }

    /// The runtime executes `action` (already appended, with its id). A cancelled action
    /// yields no observation (the stop path records that it was not executed).
    pub(crate) fn act(mut self, action: Event, cancel: CancellationToken) -> Busy {
        Box::pin(async move {
            let obs = self.execute(&action, &cancel).await;
            (self, Step::Acted(obs.into_iter().collect()))
        })
    }

    /// The budget is spent (checked between steps).
    pub(crate) fn over_budget(&self) -> Option<(f64, f64)> {
        let max = self.max_budget?;
        let spent = self.agent.accumulated_cost()?;
        (spent >= max).then_some((spent, max))
    }

    async fn runtime(&mut self) -> Result<&mut Runtime, RuntimeError> {
        if self.runtime.is_none() {
            self.runtime = Some(Runtime::start(&self.runtime_cfg, &self.sid).await?);
        }
        // Just set when it was missing.
        self.runtime.as_mut().ok_or(RuntimeError::Closed)
    }

    /// The session's workspace folder.
    pub(crate) fn workspace(&self) -> std::path::PathBuf {
        self.runtime.as_ref().map_or_else(
            || self.runtime_cfg.root.join(self.sid.as_str()),
            |rt| rt.workspace().to_path_buf(),
        )
    }

    /// Paths as the model writes them: `/workspace/...` (OpenHands' convention) is the
    /// session's workspace.
    fn map_path(&self, path: &str) -> String {
        let ws = self.workspace();
        match path.strip_prefix("/workspace") {
            Some("") => ws.display().to_string(),
            Some(rest) if rest.starts_with('/') => {
                ws.join(rest.trim_start_matches('/')).display().to_string()
            }
            _ => path.to_owned(),
        }
    }

    #[tracing::instrument(name = "runtime", skip_all, fields(action = action.action_type().unwrap_or_default()))]
    async fn execute(&mut self, action: &Event, cancel: &CancellationToken) -> Option<Event> {
        if cancel.is_cancelled() {
            return None;
        }
        let obs: Result<Event, String> = match action.action() {
            Some(ActionView::Think) => Ok(Event::think_observation()),
            Some(ActionView::Run(run)) => {
                let req = CmdRequest {
                    command: run.command.to_owned(),
                    is_input: run.is_input,
                    timeout: run
                        .timeout
                        .and_then(|t| std::time::Duration::try_from_secs_f64(t).ok()),
                };
                let out = match self.runtime().await {
                    Ok(rt) => rt.run(&req, cancel).await,
                    Err(e) => Err(e),
                };
                match out {
                    Err(RuntimeError::Cancelled) => return None,
                    Err(e) => Err(format!("The command could not be run: {e}")),
                    Ok(out) => Ok(Event::run_observation(CmdObservation {
                        command: &req.command,
                        content: &out.content,
                        exit_code: out.exit_code,
                        pid: out.pid,
                        working_dir: &out.cwd,
                        prefix: &out.prefix,
                        suffix: &out.suffix,
                    })),
                }
            }
            Some(ActionView::Read(read)) => {
                let cmd = EditCommand::View {
                    path: self.map_path(read.path),
                    view_range: read.view_range,
                };
                self.edit(&cmd)
                    .await
                    .map(|out| Event::read_observation(&out.content, &out.path))
            }
            Some(ActionView::Edit(edit)) => {
                let path = self.map_path(edit.path);
                let text = |s: Option<&str>| s.unwrap_or_default().to_owned();
                let cmd = match edit.command {
                    "create" => Ok(EditCommand::Create {
                        path,
                        file_text: text(edit.file_text),
                    }),
                    "str_replace" => Ok(EditCommand::StrReplace {
                        path,
                        old_str: text(edit.old_str),
                        new_str: text(edit.new_str),
                    }),
                    "insert" => Ok(EditCommand::Insert {
                        path,
                        insert_line: edit.insert_line.unwrap_or(0),
                        new_str: text(edit.new_str),
                    }),
                    "undo_edit" => Ok(EditCommand::UndoEdit { path }),
                    other => Err(format!("Unsupported edit command {other:?}.")),
                };
                match cmd {
                    Err(e) => Err(e),
                    Ok(cmd) => self.edit(&cmd).await.map(|out| {
                        Event::edit_observation(EditObservation {
                            content: &out.content,
                            path: &out.path,
                            prev_exist: out.prev_exist,
                            old_content: out.old_content.as_deref(),
                            new_content: out.new_content.as_deref(),
                        })
                    }),
                }
            }
            _ => Err(format!(
                "The action `{}` cannot be executed by this runtime.",
                action.action_type().unwrap_or("?")
            )),
        };
        let mut obs = obs.unwrap_or_else(|message| Event::error_observation(message, ""));
        obs.source = Some(Source::Agent);
        obs.set_cause(action.id);
        obs.tool_call_metadata = action.tool_call_metadata.clone();
        Some(obs)
    }

    async fn edit(&mut self, cmd: &EditCommand) -> Result<crate::runtime::EditOutput, String> {
        match self.runtime().await {
            Ok(rt) => rt.edit(cmd).await.map_err(|e| e.to_string()),
            Err(e) => Err(format!("The runtime could not start: {e}")),
        }
    }
}
