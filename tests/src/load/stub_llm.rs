//! The `long` scenario's LLM: an OpenAI-compatible `POST /v1/chat/completions` that answers
//! at once, so what it measures between its answer and the agent's next request is the
//! agent's own step overhead (append the action, run it, append the observation, build and
//! send the next chat), with no LLM time in it.
//!
//! It is stateless about the conversation: it reads the chat it is sent. After a user message
//! it answers `steps` `think` tool calls in a row (each answered by a `think` observation, a
//! `tool` message), then a plain `echo: <user message>`, which ends the turn (the load
//! client's reply). A request whose last message is a tool answer continues a turn: the time
//! since this server's previous answer is one step's overhead, recorded as early (chat of at
//! most [`EARLY_MESSAGES`] messages) or late (at least `late` messages), twice: up to the
//! request's whole arrival (body read), and up to its head (the agent's own work, without the
//! body's transfer and this server's reading of it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::stats::{Metric, Stats};

/// A step counts as early while the chat has at most this many messages.
pub const EARLY_MESSAGES: usize = 30;

struct Shared {
    steps: u32,
    late: usize,
    stats: Arc<Stats>,
    /// When the previous answer left.
    answered_at: Mutex<Option<Instant>>,
    /// Largest chat seen (messages).
    pub(crate) largest: AtomicU64,
    calls: AtomicU64,
}

/// A running stub; stopped on drop.
pub struct StubLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl StubLlm {
    /// Listens on `listen` (port 0: any free port).
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(
        listen: SocketAddr,
        steps: u32,
        late: usize,
        stats: Arc<Stats>,
    ) -> std::io::Result<StubLlm> {
        let shared = Arc::new(Shared {
            steps,
            late,
            stats,
            answered_at: Mutex::new(None),
            largest: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(StubLlm { addr, shared, task })
    }

    /// `http://ADDR/v1`: the workers' `OH_LLM_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Messages in the largest chat received.
    pub fn largest_chat(&self) -> u64 {
        self.shared.largest.load(Ordering::Relaxed)
    }
}

impl Drop for StubLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn chat(State(shared): State<Arc<Shared>>, body: Body) -> Response {
    // The request's head is here; its body (the whole chat) is still to be read.
    let head = Instant::now();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return (StatusCode::BAD_REQUEST, "body not read").into_response();
    };
    let arrived = Instant::now();
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let messages = req["messages"].as_array().map_or(&[][..], Vec::as_slice);
    shared
        .largest
        .fetch_max(messages.len() as u64, Ordering::Relaxed);
    let last_user = messages.iter().rposition(|m| m["role"] == "user");
    let continuing = messages.last().is_some_and(|m| m["role"] == "tool");
    if continuing {
        let previous = shared.answered_at.lock().ok().and_then(|a| *a);
        if let Some(at) = previous {
            let overhead = arrived.saturating_duration_since(at);
            let to_head = head.saturating_duration_since(at);
            if messages.len() <= EARLY_MESSAGES {
                shared.stats.record(Metric::StepEarly, overhead);
                shared.stats.record(Metric::StepEarlyHead, to_head);
            } else if messages.len() >= shared.late {
                shared.stats.record(Metric::StepLate, overhead);
                shared.stats.record(Metric::StepLateHead, to_head);
            }
        }
    }
    let done_steps = last_user.map_or(0, |u| {
        messages[u..]
            .iter()
            .filter(|m| m["role"] == "assistant" && m["tool_calls"].is_array())
            .count()
    });
    let n = shared.calls.fetch_add(1, Ordering::Relaxed) + 1;
    let message = if done_steps < shared.steps as usize {
        json!({"role": "assistant", "content": null, "tool_calls": [{
            "id": format!("call_{n}"), "type": "function",
            "function": {"name": "think", "arguments": json!({"thought": format!("step {}", done_steps + 1)}).to_string()},
        }]})
    } else {
        let said = last_user
            .and_then(|u| messages[u]["content"].as_str())
            .unwrap_or_default();
        json!({"role": "assistant", "content": format!("echo: {said}")})
    };
    let finish = if message["tool_calls"].is_array() {
        "tool_calls"
    } else {
        "stop"
    };
    let answer = json!({
        "id": format!("chatcmpl-stub-{n}"), "object": "chat.completion", "created": 0,
        "model": req["model"].clone(),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    })
    .to_string();
    // Freed before the answer leaves (and is stamped): dropping a long chat parsed into a
    // `Value` takes this server milliseconds, which are not the agent's.
    drop(req);
    drop(body);
    if let Ok(mut at) = shared.answered_at.lock() {
        *at = Some(Instant::now());
    }
    ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
}
