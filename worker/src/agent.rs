//! The agent behind a session: given the conversation so far, it decides the next events.
//! [`Agent`] is the seam; [`AgentImpl`] is the closed set of implementations (enum dispatch,
//! because an async trait method is not object-safe).
//!
//! - [`Echo`]: a **test/demo agent** that answers every user message with `echo: <message>`
//!   and never calls an LLM or a runtime.

mod codeact;

use std::future::Future;

pub(crate) use codeact::{Chat, CodeAct, Notify};

use shared::event::{ActionView, AgentState, Event, Source};
use tokio_util::sync::CancellationToken;

/// Why a step produced no events.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    /// Stop or pause from the user, or shutdown.
    #[error("cancelled")]
    Cancelled,
    /// The step failed for good; the turn ends in `error` with this reason.
    #[error("{reason}")]
    Failed {
        /// Shown to the user as `agent_state_changed.extras.reason`.
        reason: String,
    },
}

/// One agent.
pub(crate) trait Agent: Send + 'static {
    /// `agent_class` of the `system` event.
    fn class(&self) -> &'static str;
    /// The system prompt recorded in the session's first `system` event.
    fn system_prompt(&self) -> String;
    /// Tool schemas recorded in the `system` event.
    fn tools(&self) -> Option<serde_json::Value> {
        None
    }
    /// The next events of the current turn, given every event so far. Empty: nothing to do
    /// (the turn ends waiting for the user). Must return soon after `cancel` fires.
    fn step(
        &mut self,
        history: &[Event],
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Vec<Event>, StepError>> + Send;
}

/// Test/demo agent: for each user message X not yet answered, one agent `message` action
/// `echo: X` (waiting for the user). With `faults` on (`OH_ECHO_FAULTS`, tests only), the
/// message `/crash` aborts the process in the middle of the step, like a poison input would,
/// and `/slow MS` makes the step take MS milliseconds (at most 60 s; cancellable), so a test
/// can act on a worker in the middle of a step.
#[derive(Debug, Default)]
pub(crate) struct Echo {
    pub(crate) faults: bool,
}

impl Agent for Echo {
    fn class(&self) -> &'static str {
        "EchoAgent"
    }

    fn system_prompt(&self) -> String {
        "You are the echo test agent: you repeat every user message, prefixed with 'echo: '."
            .to_owned()
    }

    async fn step(
        &mut self,
        history: &[Event],
        cancel: &CancellationToken,
    ) -> Result<Vec<Event>, StepError> {
        // The user messages of the current turn: after the last agent message or the last end
        // of a turn (a state other than running/loading).
        let turn_boundary = |e: &&Event| {
            (e.source == Some(Source::Agent) && e.action_type() == Some("message"))
                || e.agent_state()
                    .is_some_and(|s| !matches!(s, AgentState::Running | AgentState::Loading))
        };
        let unanswered: Vec<&Event> = history
            .iter()
            .rev()
            .take_while(|e| !turn_boundary(e))
            .filter(|e| e.source == Some(Source::User) && e.action_type() == Some("message"))
            .collect();
        let mut out = Vec::new();
        for user in unanswered.into_iter().rev() {
            let content = user.message_content().unwrap_or_default();
            if self.faults && content == "/crash" {
                tracing::error!("echo agent fault hook: aborting the worker mid-step");
                std::process::abort();
            }
            if let Some(ms) = content
                .strip_prefix("/slow ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .filter(|_| self.faults)
            {
                let pause = std::time::Duration::from_millis(ms.min(60_000));
                tokio::select! {
                    () = cancel.cancelled() => return Err(StepError::Cancelled),
                    () = tokio::time::sleep(pause) => {}
                }
            }
            out.push(Event::message(
                Source::Agent,
                format!("echo: {content}"),
                true,
            ));
        }
        Ok(out)
    }
}

/// Replays a trajectory (`replay_json`) with OpenHands' rules: each step takes
/// the next action of the list instead of asking the model; the runtime executes it for real,
/// producing fresh observations (the list's own observations are never reused). When the list
/// is exhausted, the inner agent (if any) takes over.
pub(crate) struct Replay {
    /// The first user message of the trajectory; appended when the conversation starts.
    pub(crate) initial: Option<Event>,
    /// The actions still to replay.
    pub(crate) queue: std::collections::VecDeque<Event>,
    pub(crate) inner: Option<Box<AgentImpl>>,
}

impl Replay {
    /// Builds the replay of `trajectory`, skipping the items already replayed in `history`.
    pub(crate) fn new(
        trajectory: Vec<Event>,
        history: &[Event],
        inner: Option<AgentImpl>,
    ) -> Result<Replay, String> {
        let mut items = shared::event::replay_items(trajectory).map_err(|e| e.to_string())?;
        let mut initial = items.remove(0);
        initial.source = Some(Source::User);
        let mut queue: std::collections::VecDeque<Event> = items
            .into_iter()
            .filter(|e| e.action_type().is_some())
            .map(|mut e| {
                e.id = None;
                e.timestamp = None;
                e.cause = None;
                e
            })
            .collect();
        let n = queue.len();
        for (i, e) in queue.iter_mut().enumerate() {
            let waits = matches!(
                e.action(),
                Some(ActionView::Message {
                    wait_for_response: true,
                    ..
                })
            );
            if waits && i + 1 < n {
                e.set_wait_for_response(false);
            }
        }
        // Resuming: skip what the log shows was replayed already (every non-environment
        // action after the first user message, except our own lifecycle events).
        let started = history
            .iter()
            .any(|e| e.source == Some(Source::User) && e.action_type() == Some("message"));
        if started {
            let first_user = history
                .iter()
                .position(|e| e.source == Some(Source::User) && e.action_type() == Some("message"))
                .unwrap_or(0);
            let done = history[first_user + 1..]
                .iter()
                .filter(|e| {
                    e.source != Some(Source::Environment)
                        && e.action_type().is_some_and(|a| {
                            !matches!(a, "system" | "recall" | "change_agent_state")
                        })
                })
                .count();
            for _ in 0..done.min(queue.len()) {
                queue.pop_front();
            }
        }
        Ok(Replay {
            initial: (!started).then_some(initial),
            queue,
            inner: inner.map(Box::new),
        })
    }
}

/// The agents a session can run.
pub(crate) enum AgentImpl {
    Echo(Echo),
    CodeAct(Box<CodeAct>),
    Replay(Box<Replay>),
}

impl AgentImpl {
    pub(crate) fn class(&self) -> &'static str {
        match self {
            AgentImpl::Echo(a) => a.class(),
            AgentImpl::CodeAct(a) => a.class(),
            AgentImpl::Replay(r) => r.inner.as_ref().map_or("ReplayAgent", |i| i.class()),
        }
    }
    pub(crate) fn system_prompt(&self) -> String {
        match self {
            AgentImpl::Echo(a) => a.system_prompt(),
            AgentImpl::CodeAct(a) => a.system_prompt(),
            AgentImpl::Replay(r) => r.inner.as_ref().map_or_else(
                || "Replaying a recorded trajectory.".to_owned(),
                |i| i.system_prompt(),
            ),
        }
    }
    pub(crate) fn tools(&self) -> Option<serde_json::Value> {
        match self {
            AgentImpl::Echo(a) => a.tools(),
            AgentImpl::CodeAct(a) => Some(a.tools()),
            AgentImpl::Replay(r) => r.inner.as_ref().and_then(|i| i.tools()),
        }
    }
    pub(crate) fn step<'a>(
        &'a mut self,
        history: &'a [Event],
        cancel: &'a CancellationToken,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Vec<Event>, StepError>> + Send + 'a>> {
        Box::pin(async move {
            match self {
                AgentImpl::Echo(a) => a.step(history, cancel).await,
                AgentImpl::CodeAct(a) => a.step(history, cancel).await,
                AgentImpl::Replay(r) => match r.queue.pop_front() {
                    Some(ev) => Ok(vec![ev]),
                    None => match r.inner.as_mut() {
                        Some(inner) => inner.step(history, cancel).await,
                        None => Ok(Vec::new()),
                    },
                },
            }
        })
    }
    /// The LLM metrics so far, if this agent uses an LLM (for the budget check).
    pub(crate) fn accumulated_cost(&self) -> Option<f64> {
        match self {
            AgentImpl::Echo(_) => None,
            AgentImpl::CodeAct(a) => Some(a.llm.metrics().accumulated_cost()),
            AgentImpl::Replay(r) => r.inner.as_ref().and_then(|i| i.accumulated_cost()),
        }
    }
    /// The replay's initial user message, once (appended when a replay conversation starts).
    pub(crate) fn take_initial(&mut self) -> Option<Event> {
        match self {
            AgentImpl::Replay(r) => r.initial.take(),
            _ => None,
        }
    }
}
