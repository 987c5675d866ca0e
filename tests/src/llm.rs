//! A scripted OpenAI-compatible chat-completions server, as an RAII guard.
//!
//! [`ScriptedLlm::start`] serves `POST /v1/chat/completions` on `127.0.0.1:<free port>`
//! (the OS picks the port; no race) and answers each request with the next [`Reply`] of its
//! script, in order. Every request body is recorded ([`ScriptedLlm::requests`]), and so are its
//! `Authorization` header ([`ScriptedLlm::authorizations`]) and its framing
//! ([`ScriptedLlm::framings`]).
//!
//! Successful replies are real-looking `chat.completion` objects: `id` (`chatcmpl-scripted-N`),
//! `object`, `created`, `model` (echoed from the request), one choice with
//! `message{role, content, tool_calls[{id, type: "function", function{name, arguments}}]}`,
//! `finish_reason` (`stop` or `tool_calls`), and `usage` with fixed counts
//! ([`PROMPT_TOKENS`], [`COMPLETION_TOKENS`]) so tests can compute costs. Tool-call ids are
//! `call_N`, unique per server.
//!
//! **When the script is exhausted** the server answers with a `finish` tool call whose
//! arguments are `{"message": "script exhausted"}`, so an agent loop always terminates.
//!
//! The server task is aborted on drop; a reply that is still sleeping in a [`Reply::Delay`]
//! ends with the test's runtime.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// `usage.prompt_tokens` of every successful reply.
pub const PROMPT_TOKENS: u64 = 100;
/// `usage.completion_tokens` of every successful reply.
pub const COMPLETION_TOKENS: u64 = 20;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// An assistant message with this content (`finish_reason: stop`).
    Text(String),
    /// One tool call; `arguments` is sent verbatim (it may be malformed on purpose).
    ToolCall {
        /// Function name.
        name: String,
        /// Raw arguments text.
        arguments: String,
    },
    /// Several tool calls `(name, arguments)` in one message.
    ToolCalls(Vec<(String, String)>),
    /// An error status with an OpenAI-style error body, plus `Retry-After: <secs>` if given.
    Status(u16, Option<u64>),
    /// Any status with this exact body (`application/json`), e.g. a malformed completion.
    Raw(u16, String),
    /// The inner reply, after a delay (to test timeouts and cancellation mid-call).
    Delay(Duration, Box<Reply>),
}

impl Reply {
    /// [`Reply::Text`].
    pub fn text(content: impl Into<String>) -> Reply {
        Reply::Text(content.into())
    }

    /// [`Reply::ToolCall`] with `arguments` serialized from JSON.
    pub fn tool(name: impl Into<String>, arguments: &Value) -> Reply {
        Reply::ToolCall {
            name: name.into(),
            arguments: arguments.to_string(),
        }
    }

    /// [`Reply::Delay`].
    pub fn delayed(delay: Duration, reply: Reply) -> Reply {
        Reply::Delay(delay, Box::new(reply))
    }
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Value>>,
    authorizations: Mutex<Vec<Option<String>>>,
    framings: Mutex<Vec<Framing>>,
    /// Numbers responses and tool calls.
    counter: AtomicU64,
}

/// How a request body was framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framing {
    /// The `Content-Length` header, if sent.
    pub content_length: Option<u64>,
    /// The `Transfer-Encoding` header (e.g. `chunked`), if sent.
    pub transfer_encoding: Option<String>,
    /// Bytes of body received.
    pub received: u64,
}

impl Shared {
    fn next_number(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A running scripted server; stopped on drop.
pub struct ScriptedLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl ScriptedLlm {
    /// Starts a server that answers with `script`, one reply per request.
    pub async fn start(script: Vec<Reply>) -> ScriptedLlm {
        let shared = Arc::new(Shared {
            script: Mutex::new(script.into()),
            ..Shared::default()
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the scripted LLM");
        let addr = listener
            .local_addr()
            .expect("local_addr of a bound listener");
        let task = tokio::spawn(async move {
            // Ends only when aborted on drop; an accept error would end it early and the test
            // would see connection errors.
            let _ = axum::serve(listener, app).await;
        });
        ScriptedLlm { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT/v1` (what `OH_LLM_BASE_URL` should be).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request body received so far, in order (a body that is not JSON is recorded as a
    /// JSON string).
    pub fn requests(&self) -> Vec<Value> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The `Authorization` header of every request so far, in order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.shared.authorizations.lock().unwrap().clone()
    }

    /// The framing of every request so far, in order.
    pub fn framings(&self) -> Vec<Framing> {
        self.shared.framings.lock().unwrap().clone()
    }

    /// Appends a reply to the script.
    pub fn push(&self, reply: Reply) {
        self.shared.script.lock().unwrap().push_back(reply);
    }

    /// Replies not used yet.
    pub fn remaining(&self) -> usize {
        self.shared.script.lock().unwrap().len()
    }
}

impl Drop for ScriptedLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for ScriptedLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedLlm")
            .field("addr", &self.addr)
            .field("requests", &self.shared.requests.lock().unwrap().len())
            .field("remaining", &self.remaining())
            .finish()
    }
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    shared.framings.lock().unwrap().push(Framing {
        content_length: text(header::CONTENT_LENGTH).and_then(|v| v.parse().ok()),
        transfer_encoding: text(header::TRANSFER_ENCODING),
        received: body.len() as u64,
    });
    let body: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("scripted")
        .to_owned();
    shared.requests.lock().unwrap().push(body);
    shared.authorizations.lock().unwrap().push(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    );
    let mut reply = shared
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| Reply::ToolCall {
            name: "finish".into(),
            arguments: json!({"message": "script exhausted"}).to_string(),
        });
    while let Reply::Delay(delay, inner) = reply {
        tokio::time::sleep(delay).await;
        reply = *inner;
    }
    respond(&shared, &model, reply)
}

fn respond(shared: &Shared, model: &str, reply: Reply) -> Response {
    let calls = match reply {
        Reply::Text(content) => return completion(shared, model, Some(content), Vec::new()),
        Reply::ToolCall { name, arguments } => vec![(name, arguments)],
        Reply::ToolCalls(calls) => calls,
        Reply::Status(status, retry_after) => return error(status, retry_after),
        Reply::Raw(status, body) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            return (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        }
        Reply::Delay(..) => unreachable!("delays are unwrapped by the caller"),
    };
    let calls = calls
        .into_iter()
        .map(|(name, arguments)| {
            json!({
                "id": format!("call_{}", shared.next_number()),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            })
        })
        .collect();
    completion(shared, model, None, calls)
}

fn completion(
    shared: &Shared,
    model: &str,
    content: Option<String>,
    calls: Vec<Value>,
) -> Response {
    let finish_reason = if calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    let mut message = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let body = json!({
        "id": format!("chatcmpl-scripted-{}", shared.next_number()),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        },
    });
    axum::Json(body).into_response()
}

fn error(status: u16, retry_after: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, message) = match status {
        401 => ("invalid_request_error", "Incorrect API key provided."),
        403 => (
            "permission_denied",
            "You are not allowed to use this model.",
        ),
        429 => (
            "rate_limit_exceeded",
            "Rate limit reached. Please try again later.",
        ),
        400..=499 => ("invalid_request_error", "Invalid request."),
        _ => (
            "server_error",
            "The server had an error while processing your request.",
        ),
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    let mut response = (code, axum::Json(body)).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
