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

use shared::event::Event;
use tokio_util::sync::CancellationToken;

use crate::agent::{AgentImpl, StepError};

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

    /// The runtime executes `action` (already appended, with its id).
    pub(crate) fn act(self, action: Event, cancel: CancellationToken) -> Busy {
        Box::pin(async move {
            let obs = if cancel.is_cancelled() {
                Vec::new()
            } else {
                vec![unsupported(&action)]
            };
            (self, Step::Acted(obs))
        })
    }
}

fn unsupported(action: &Event) -> Event {
    let mut obs = Event::error_observation(
        format!(
            "The action `{}` cannot be executed by this agent's runtime.",
            action.action_type().unwrap_or("?")
        ),
        "AGENT_ERROR$ERROR_ACTION_NOT_EXECUTED_ERROR",
    );
    obs.cause = action.id.and_then(|i| i64::try_from(i).ok());
    obs
}
