//! Chat messages in, assistant messages out: the OpenAI chat-completions wire format.
//!
//! **Invariant:** only this module knows the chat-completions JSON. Requests are built from
//! [`ChatRequest`]; responses are read leniently (a missing `usage`, `content: null`, content
//! given as a list of parts, or tool-call `arguments` given as an object are all accepted), and
//! tool-call arguments are kept as the raw text the model produced: parsing them is the
//! agent's job, because a malformed one must become an error observation, not a failed call.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The system prompt.
    System,
    /// The user (including observations the agent feeds back as user text).
    User,
    /// The model.
    Assistant,
    /// The result of one tool call (`tool_call_id` says which).
    Tool,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message sent to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// Text; `None` is sent as `null` (an assistant message that only calls tools).
    pub content: Option<String>,
    /// Tool calls of an assistant message (sent only when non-empty).
    pub tool_calls: Vec<ToolCall>,
    /// For [`Role::Tool`]: the id of the call this answers.
    pub tool_call_id: Option<String>,
    /// For [`Role::Tool`]: the function name (some servers want it).
    pub name: Option<String>,
}

impl ChatMessage {
    fn plain(role: Role, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role,
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage::plain(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage::plain(Role::User, content)
    }

    /// The model's earlier answer, replayed into the history.
    pub fn assistant(message: AssistantMessage) -> ChatMessage {
        ChatMessage {
            role: Role::Assistant,
            content: message.content,
            tool_calls: message.tool_calls,
            tool_call_id: None,
            name: None,
        }
    }

    /// The result of tool call `tool_call_id` (of function `name`).
    pub fn tool(
        tool_call_id: impl Into<String>,
        name: impl Into<String>,
        content: impl Into<String>,
    ) -> ChatMessage {
        ChatMessage {
            role: Role::Tool,
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: Some(tool_call_id.into()),
            name: Some(name.into()),
        }
    }

    /// This message as the JSON text the API expects (one element of `messages`).
    pub fn wire_json(&self) -> String {
        self.to_wire().to_string()
    }

    fn to_wire(&self) -> Value {
        let mut m = Map::new();
        m.insert("role".into(), self.role.as_str().into());
        m.insert(
            "content".into(),
            self.content.clone().map_or(Value::Null, Value::String),
        );
        if !self.tool_calls.is_empty() {
            let calls = self.tool_calls.iter().map(ToolCall::to_wire).collect();
            m.insert("tool_calls".into(), Value::Array(calls));
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id".into(), id.clone().into());
        }
        if let Some(name) = &self.name {
            m.insert("name".into(), name.clone().into());
        }
        Value::Object(m)
    }
}

/// One chat-completions call: the conversation so far and the tools the model may call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    /// The messages, oldest first.
    pub messages: Vec<ChatMessage>,
    /// OpenAI function tool schemas (`{"type": "function", "function": {...}}`); when empty,
    /// neither `tools` nor `tool_choice` is sent.
    pub tools: Vec<Value>,
}

/// The model's answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AssistantMessage {
    /// Text, if any (often `None` when the model calls tools).
    pub content: Option<String>,
    /// Tool calls, in the model's order.
    pub tool_calls: Vec<ToolCall>,
}

/// One function call requested by the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The call id (`tool_call_id` of the answer).
    pub id: String,
    /// Function name.
    pub name: String,
    /// The arguments exactly as the model wrote them: normally a JSON object, but possibly
    /// malformed; the agent parses them.
    pub arguments: String,
}

impl ToolCall {
    fn to_wire(&self) -> Value {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// Token counts of one call (`usage` of the response; zeros when the server sent none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// Prompt tokens read from the provider's cache (`prompt_tokens_details.cached_tokens`).
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the provider's cache (`cache_creation_input_tokens`).
    pub cache_write_tokens: u64,
}

/// A successful call.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    /// The first choice's message.
    pub message: AssistantMessage,
    /// The first choice's `finish_reason` (`stop`, `tool_calls`, `length`, ...), if given.
    pub finish_reason: Option<String>,
    /// The response `id` (`""` if the server sent none).
    pub response_id: String,
    /// The whole response JSON, for `tool_call_metadata.model_response`.
    pub raw: Value,
    /// Token counts.
    pub usage: Usage,
    /// Time of the successful attempt, from sending to the last byte.
    pub latency: Duration,
}

/// A request body in parts, sent one after another as one body of known length
/// (`Content-Length`, not chunked): a long chat's messages, kept by their owner between steps
/// (see `codeact::Chat`), go out as they are instead of being copied into a new buffer on
/// every request.
#[derive(Debug, Clone)]
pub struct RequestBody {
    parts: Vec<Bytes>,
    len: u64,
    messages: usize,
}

impl RequestBody {
    /// `{"model":…,"messages":[…],"tools":…,"tool_choice":"auto"}` around `messages`, the JSON
    /// of `count` messages joined by commas, given in parts (in order, the commas included);
    /// `tools_json`, the tools' JSON array, is left out when `None`.
    pub fn new(model: &str, messages: Vec<Bytes>, count: usize, tools_json: Option<&str>) -> Self {
        let head = format!("{{\"model\":{},\"messages\":[", Value::from(model));
        let mut tail = String::from("]");
        if let Some(tools) = tools_json {
            tail.push_str(",\"tools\":");
            tail.push_str(tools);
            tail.push_str(",\"tool_choice\":\"auto\"");
        }
        tail.push('}');
        let mut parts = Vec::with_capacity(messages.len() + 2);
        parts.push(Bytes::from(head));
        parts.extend(messages.into_iter().filter(|p| !p.is_empty()));
        parts.push(Bytes::from(tail));
        let len = parts.iter().map(|p| p.len() as u64).sum();
        RequestBody {
            parts,
            len,
            messages: count,
        }
    }

    /// Messages in the chat.
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// The body for one attempt (the parts are shared, not copied).
    pub(super) fn http(&self) -> reqwest::Body {
        reqwest::Body::wrap(Parts {
            parts: self.parts.iter().cloned().collect(),
            left: self.len,
        })
    }

    /// The whole body in one buffer.
    #[cfg(test)]
    pub(super) fn joined(&self) -> Vec<u8> {
        self.parts.concat()
    }
}

/// [`RequestBody`]'s parts as an HTTP body: one data frame per part, exact size known.
struct Parts {
    parts: std::collections::VecDeque<Bytes>,
    left: u64,
}

impl http_body::Body for Parts {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = self.parts.pop_front();
        if let Some(part) = &next {
            self.left = self.left.saturating_sub(part.len() as u64);
        }
        std::task::Poll::Ready(next.map(|p| Ok(http_body::Frame::data(p))))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

/// The request body of `messages` for `model` (each message rendered once, joined once).
pub(super) fn request_body(model: &str, messages: &[ChatMessage], tools: &[Value]) -> RequestBody {
    let mut joined = String::new();
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            joined.push(',');
        }
        joined.push_str(&m.wire_json());
    }
    let tools_json = (!tools.is_empty()).then(|| Value::Array(tools.to_vec()).to_string());
    RequestBody::new(
        model,
        vec![Bytes::from(joined)],
        messages.len(),
        tools_json.as_deref(),
    )
}

/// What [`parse_response`] reads out of a response.
#[derive(Debug)]
pub(super) struct Parsed {
    pub(super) message: AssistantMessage,
    pub(super) finish_reason: Option<String>,
    pub(super) response_id: String,
    pub(super) usage: Usage,
}

/// Reads the first choice and the usage of a chat.completion object.
///
/// # Errors
/// A description of what is missing (no `choices`, no `message`, a tool call without a name).
pub(super) fn parse_response(raw: &Value) -> Result<Parsed, String> {
    if let Some(err) = raw.get("error").filter(|e| !e.is_null()) {
        let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(format!("error object in a success response: {msg}"));
    }
    let choice = raw
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or("no choices in the response")?;
    let message = choice
        .get("message")
        .filter(|m| m.is_object())
        .ok_or("no message in the first choice")?;
    let content = match message.get("content") {
        Some(Value::String(s)) => Some(s.clone()),
        // Content parts: keep the text ones.
        Some(Value::Array(parts)) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<String>(),
        ),
        _ => None,
    };
    let mut tool_calls = Vec::new();
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        for (i, call) in calls.iter().enumerate() {
            let function = call.get("function").unwrap_or(&Value::Null);
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| format!("tool call {i} has no function name"))?;
            let arguments = match function.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => String::new(),
                Some(other) => other.to_string(),
            };
            let id = call
                .get("id")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty())
                .map_or_else(|| format!("call_{i}"), str::to_owned);
            tool_calls.push(ToolCall {
                id,
                name: name.to_owned(),
                arguments,
            });
        }
    }
    let usage = raw.get("usage").unwrap_or(&Value::Null);
    let count = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    Ok(Parsed {
        message: AssistantMessage {
            content,
            tool_calls,
        },
        finish_reason: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
        response_id: raw
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        usage: Usage {
            prompt_tokens: count(usage.get("prompt_tokens")),
            completion_tokens: count(usage.get("completion_tokens")),
            cache_read_tokens: count(
                usage
                    .pointer("/prompt_tokens_details/cached_tokens")
                    .or_else(|| usage.get("cache_read_input_tokens")),
            ),
            cache_write_tokens: count(usage.get("cache_creation_input_tokens")),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_body_has_openai_shape_and_omits_empty_tools() {
        let call = ToolCall {
            id: "call_1".into(),
            name: "execute_bash".into(),
            arguments: r#"{"command":"ls"}"#.into(),
        };
        let req = ChatRequest {
            messages: vec![
                ChatMessage::system("sys"),
                ChatMessage::user("hi"),
                ChatMessage::assistant(AssistantMessage {
                    content: None,
                    tool_calls: vec![call],
                }),
                ChatMessage::tool("call_1", "execute_bash", "out"),
            ],
            tools: Vec::new(),
        };
        let body = request_body("m", &req.messages, &req.tools);
        assert_eq!(body.messages(), 4);
        let body: Value = serde_json::from_slice(&body.joined()).unwrap();
        assert_eq!(
            body,
            json!({"model": "m", "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "execute_bash", "arguments": "{\"command\":\"ls\"}"}}]},
                {"role": "tool", "content": "out", "tool_call_id": "call_1", "name": "execute_bash"},
            ]})
        );
        let with_tools = ChatRequest {
            tools: vec![json!({"type": "function", "function": {"name": "finish"}})],
            ..req
        };
        let body = request_body("m", &with_tools.messages, &with_tools.tools);
        let body: Value = serde_json::from_slice(&body.joined()).unwrap();
        assert_eq!(body["tool_choice"], "auto");
        assert_eq!(body["tools"][0]["function"]["name"], "finish");
    }

    #[test]
    fn response_parsing_is_lenient() {
        let raw = json!({
            "id": "r1",
            "choices": [{"message": {"role": "assistant",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                "tool_calls": [
                    {"function": {"name": "think", "arguments": {"thought": "x"}}},
                    {"id": "c2", "function": {"name": "finish", "arguments": "{oops"}},
                ]},
                "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                      "prompt_tokens_details": {"cached_tokens": 5}},
        });
        let p = parse_response(&raw).unwrap();
        assert_eq!(p.message.content.as_deref(), Some("ab"));
        assert_eq!(p.message.tool_calls[0].id, "call_0");
        assert_eq!(p.message.tool_calls[0].arguments, r#"{"thought":"x"}"#);
        assert_eq!(p.message.tool_calls[1].arguments, "{oops");
        assert_eq!(p.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(p.response_id, "r1");
        assert_eq!(
            p.usage,
            Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
                cache_read_tokens: 5,
                cache_write_tokens: 0
            }
        );
        let bare = json!({"choices": [{"message": {"content": null}}]});
        let p = parse_response(&bare).unwrap();
        assert_eq!(p.message, AssistantMessage::default());
        assert_eq!(p.usage, Usage::default());
    }

    #[test]
    fn response_without_choices_or_names_is_rejected() {
        for bad in [
            json!({}),
            json!({"choices": []}),
            json!({"choices": [{}]}),
            json!({"choices": [{"message": {"tool_calls": [{"function": {}}]}}]}),
            json!({"error": {"message": "boom"}}),
        ] {
            assert!(parse_response(&bad).is_err(), "{bad}");
        }
    }
}
