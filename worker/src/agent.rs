//! The agent behind a session. [`Agent`] is the seam the real (LLM-driven) agent will plug
//! into; for now the only implementation is [`Echo`], a **test/demo agent** that answers every
//! user message with `echo: <message>` and never calls an LLM or a runtime.

use std::future::Future;

use shared::event::{Event, Source};

/// One agent: turns a user message into the agent's events.
pub(crate) trait Agent: Send + 'static {
    /// `agent_class` of the `system` event.
    fn class(&self) -> &'static str;
    /// The system prompt recorded in the session's first `system` event.
    fn system_prompt(&self) -> String;
    /// One turn for a user message: the events to append, in order.
    fn on_message(&mut self, content: &str) -> impl Future<Output = Vec<Event>> + Send;
}

/// Test/demo agent: for each user message X, one agent `message` action `echo: X`.
/// With `faults` on (`OH_ECHO_FAULTS`, tests only), the message `/crash` aborts the process in
/// the middle of the step, like a poison input would.
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

    async fn on_message(&mut self, content: &str) -> Vec<Event> {
        if self.faults && content == "/crash" {
            tracing::error!("echo agent fault hook: aborting the worker mid-step");
            std::process::abort();
        }
        vec![Event::message(
            Source::Agent,
            format!("echo: {content}"),
            true,
        )]
    }
}
