//! The worker's LLM client (`worker::llm`) against the scripted OpenAI-compatible server
//! (`tests::llm::ScriptedLlm`): retries and their notices, errors that are final at once,
//! timeouts, cancellation mid-request and mid-backoff, tool-call parsing, the request shape,
//! metrics, and the API key staying out of Debug output, errors and logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tests::llm::{COMPLETION_TOKENS, PROMPT_TOKENS, Reply, ScriptedLlm};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use worker::llm::{
    ChatMessage, ChatRequest, ChatResponse, Llm, LlmConfig, LlmError, LlmRegistry, Metrics,
    PriceTable, RequestBody, RetryNotice, Secret,
};

const KEY: &str = "sk-test-0123456789-do-not-leak";
const MODEL: &str = "scripted-model";

fn config(base_url: &str) -> LlmConfig {
    LlmConfig {
        base_url: base_url.to_owned(),
        model: MODEL.to_owned(),
        api_key: Some(Secret::new(KEY)),
        timeout: Duration::from_secs(10),
        max_retries: 3,
        retry_min: Duration::from_millis(10),
        retry_max: Duration::from_millis(100),
        prices: PriceTable::parse(&format!("{MODEL}=2/10,other=1/1")).unwrap(),
    }
}

fn llm(cfg: &LlmConfig) -> Llm {
    LlmRegistry::new().unwrap().get(cfg).unwrap()
}

fn request() -> ChatRequest {
    ChatRequest {
        messages: vec![
            ChatMessage::system("You are a test."),
            ChatMessage::user("hi"),
        ],
        tools: vec![json!({"type": "function", "function": {
            "name": "finish", "parameters": {"type": "object", "properties": {}}}})],
    }
}

/// Runs one call, collecting the retry notices.
async fn call(
    llm: &Llm,
    req: &ChatRequest,
    cancel: &CancellationToken,
) -> (Result<ChatResponse, LlmError>, Vec<RetryNotice>) {
    let notices = Mutex::new(Vec::new());
    let on_retry = |n: RetryNotice| notices.lock().unwrap().push(n);
    let result = llm.complete(req, &on_retry, cancel).await;
    (result, notices.into_inner().unwrap())
}

fn notice(attempt: u32, max: u32, reason: &str) -> RetryNotice {
    RetryNotice {
        attempt,
        max,
        reason: reason.to_owned(),
    }
}

#[tokio::test]
async fn two_429s_then_success_announce_two_retries_then_answer() {
    let server = ScriptedLlm::start(vec![
        Reply::Status(429, None),
        Reply::Status(429, None),
        Reply::text("hello"),
    ])
    .await;
    let llm = llm(&config(&server.base_url()));
    let (result, notices) = call(&llm, &request(), &CancellationToken::new()).await;
    let response = result.unwrap();
    assert_eq!(response.message.content.as_deref(), Some("hello"));
    assert_eq!(
        notices,
        [notice(1, 3, "HTTP 429"), notice(2, 3, "HTTP 429")]
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert!(
        requests.iter().all(|r| *r == requests[0]),
        "same body each time"
    );
    // Only the successful attempt counts in the metrics.
    assert_eq!(
        llm.metrics().accumulated_token_usage().prompt_tokens,
        PROMPT_TOKENS
    );
}

#[tokio::test]
async fn retry_after_is_honoured_and_capped_by_retry_max() {
    let server = ScriptedLlm::start(vec![Reply::Status(429, Some(1)), Reply::text("ok")]).await;
    let mut cfg = config(&server.base_url());
    cfg.retry_max = Duration::from_secs(5);
    let start = Instant::now();
    let (result, notices) = call(&llm(&cfg), &request(), &CancellationToken::new()).await;
    result.unwrap();
    assert_eq!(notices.len(), 1);
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "{:?}",
        start.elapsed()
    );

    server.push(Reply::Status(429, Some(600)));
    server.push(Reply::text("ok"));
    cfg.retry_max = Duration::from_millis(200);
    let start = Instant::now();
    let (result, _) = call(&llm(&cfg), &request(), &CancellationToken::new()).await;
    result.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn auth_failures_are_final_at_once() {
    for status in [401, 403] {
        let server = ScriptedLlm::start(vec![Reply::Status(status, None), Reply::text("no")]).await;
        let (result, notices) = call(
            &llm(&config(&server.base_url())),
            &request(),
            &CancellationToken::new(),
        )
        .await;
        let err = result.unwrap_err();
        assert!(
            matches!(err, LlmError::Auth { status: s, .. } if s == status),
            "{err:?}"
        );
        assert_eq!(err.status_id(), Some("STATUS$ERROR_LLM_AUTHENTICATION"));
        assert!(notices.is_empty());
        assert_eq!(server.requests().len(), 1);
        assert_eq!(server.remaining(), 1);
    }
}

#[tokio::test]
async fn other_client_errors_and_bad_bodies_are_final_at_once() {
    let server = ScriptedLlm::start(vec![
        Reply::Status(400, None),
        Reply::Raw(200, "this is not json".into()),
        Reply::Raw(
            200,
            r#"{"object": "chat.completion", "choices": []}"#.into(),
        ),
    ])
    .await;
    let llm = llm(&config(&server.base_url()));
    let cancel = CancellationToken::new();
    let (result, notices) = call(&llm, &request(), &cancel).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, LlmError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("Invalid request."), "{err}");
    for _ in 0..2 {
        let (result, more) = call(&llm, &request(), &cancel).await;
        let err = result.unwrap_err();
        assert!(matches!(err, LlmError::BadResponse(_)), "{err:?}");
        assert!(more.is_empty());
    }
    assert!(notices.is_empty());
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn server_errors_are_retried_until_exhausted() {
    let server = ScriptedLlm::start(vec![
        Reply::Status(500, None),
        Reply::Status(502, None),
        Reply::Status(503, None),
        Reply::text("too late"),
    ])
    .await;
    let mut cfg = config(&server.base_url());
    cfg.max_retries = 2;
    let (result, notices) = call(&llm(&cfg), &request(), &CancellationToken::new()).await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            LlmError::Server {
                status: 503,
                attempts: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        notices,
        [notice(1, 2, "HTTP 500"), notice(2, 2, "HTTP 502")]
    );
    assert_eq!(server.remaining(), 1);
}

#[tokio::test]
async fn rate_limit_that_persists_is_reported_after_retries() {
    let server = ScriptedLlm::start(vec![Reply::Status(429, None); 2]).await;
    let mut cfg = config(&server.base_url());
    cfg.max_retries = 1;
    let (result, notices) = call(&llm(&cfg), &request(), &CancellationToken::new()).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, LlmError::RateLimited { attempts: 2, .. }),
        "{err:?}"
    );
    assert_eq!(err.status_id(), None);
    assert_eq!(notices.len(), 1);
}

#[tokio::test]
async fn connection_errors_are_retried_then_reported() {
    let port = tests::proc::free_port(); // bound and released: nothing listens there
    let mut cfg = config(&format!("http://127.0.0.1:{port}/v1"));
    cfg.max_retries = 2;
    let (result, notices) = call(&llm(&cfg), &request(), &CancellationToken::new()).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, LlmError::Connection { attempts: 3, .. }),
        "{err:?}"
    );
    assert_eq!(
        notices,
        [
            notice(1, 2, "connection error"),
            notice(2, 2, "connection error")
        ]
    );
}

#[tokio::test]
async fn slow_attempts_time_out_and_are_retried() {
    let server = ScriptedLlm::start(vec![
        Reply::delayed(Duration::from_secs(5), Reply::text("slow")),
        Reply::text("fast"),
        Reply::delayed(Duration::from_secs(5), Reply::text("slow")),
        Reply::delayed(Duration::from_secs(5), Reply::text("slow")),
    ])
    .await;
    let mut cfg = config(&server.base_url());
    cfg.timeout = Duration::from_millis(300);
    cfg.max_retries = 1;
    let llm = llm(&cfg);
    let cancel = CancellationToken::new();
    let (result, notices) = call(&llm, &request(), &cancel).await;
    assert_eq!(result.unwrap().message.content.as_deref(), Some("fast"));
    assert_eq!(notices, [notice(1, 1, "timeout")]);
    let (result, _) = call(&llm, &request(), &cancel).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, LlmError::Timeout { attempts: 2, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn cancel_mid_request_returns_within_1s() {
    let server = ScriptedLlm::start(vec![Reply::delayed(
        Duration::from_secs(30),
        Reply::text("late"),
    )])
    .await;
    let llm = llm(&config(&server.base_url()));
    let cancel = CancellationToken::new();
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
            Instant::now()
        })
    };
    let (result, notices) = call(&llm, &request(), &cancel).await;
    let cancelled_at = canceller.await.unwrap();
    assert!(matches!(result, Err(LlmError::Cancelled)), "{result:?}");
    assert!(cancelled_at.elapsed() < Duration::from_secs(1));
    assert!(notices.is_empty());
    assert_eq!(server.requests().len(), 1, "the request was in flight");
    assert_eq!(llm.metrics().recorded_calls(), 0);
}

#[tokio::test]
async fn cancel_during_backoff_returns_within_1s() {
    let server = ScriptedLlm::start(vec![Reply::Status(500, None), Reply::text("never")]).await;
    let mut cfg = config(&server.base_url());
    cfg.retry_min = Duration::from_secs(60);
    cfg.retry_max = Duration::from_secs(60);
    let llm = llm(&cfg);
    let cancel = CancellationToken::new();
    let notices = Arc::new(Mutex::new(Vec::new()));
    let on_retry = {
        let notices = notices.clone();
        let cancel = cancel.clone();
        move |n: RetryNotice| {
            notices.lock().unwrap().push(n);
            // Announced before the sleep: cancel from here, as a user's stop would.
            cancel.cancel();
        }
    };
    let start = Instant::now();
    let result = llm.complete(&request(), &on_retry, &cancel).await;
    assert!(matches!(result, Err(LlmError::Cancelled)), "{result:?}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(*notices.lock().unwrap(), [notice(1, 3, "HTTP 500")]);
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn already_cancelled_call_sends_nothing() {
    let server = ScriptedLlm::start(vec![Reply::text("unused")]).await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (result, _) = call(&llm(&config(&server.base_url())), &request(), &cancel).await;
    assert!(matches!(result, Err(LlmError::Cancelled)), "{result:?}");
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn tool_calls_are_parsed_and_malformed_arguments_kept_raw() {
    let server = ScriptedLlm::start(vec![
        Reply::ToolCalls(vec![
            (
                "execute_bash".into(),
                r#"{"command": "echo hi > f && cat f"}"#.into(),
            ),
            ("think".into(), r#"{"thought": "unterminated"#.into()),
        ]),
        Reply::ToolCall {
            name: "finish".into(),
            arguments: "not json at all".into(),
        },
    ])
    .await;
    let llm = llm(&config(&server.base_url()));
    let cancel = CancellationToken::new();
    let (result, _) = call(&llm, &request(), &cancel).await;
    let response = result.unwrap();
    let calls = &response.message.tool_calls;
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].name, "execute_bash");
    assert_eq!(calls[0].arguments, r#"{"command": "echo hi > f && cat f"}"#);
    assert_eq!(calls[1].name, "think");
    assert_eq!(calls[1].arguments, r#"{"thought": "unterminated"#);
    assert_ne!(calls[0].id, calls[1].id);
    assert_eq!(response.message.content, None);
    assert_eq!(response.finish_reason.as_deref(), Some("tool_calls"));
    // `raw` is the whole chat.completion, for tool_call_metadata.model_response.
    assert_eq!(response.raw["object"], "chat.completion");
    assert_eq!(response.raw["model"], MODEL);
    assert_eq!(
        response.raw["id"],
        Value::String(response.response_id.clone())
    );
    assert_eq!(
        response.raw["choices"][0]["message"]["tool_calls"][0]["id"],
        Value::String(calls[0].id.clone())
    );

    let (result, _) = call(&llm, &request(), &cancel).await;
    let calls = result.unwrap().message.tool_calls;
    assert_eq!(calls[0].arguments, "not json at all");

    // The script is exhausted: a `finish` call ends any agent loop.
    let (result, _) = call(&llm, &request(), &cancel).await;
    let calls = result.unwrap().message.tool_calls;
    assert_eq!(calls[0].name, "finish");
    let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
    assert_eq!(args, json!({"message": "script exhausted"}));
}

#[tokio::test]
async fn request_carries_model_messages_tools_and_key() {
    let server = ScriptedLlm::start(vec![]).await;
    let cfg = config(&server.base_url());
    let cancel = CancellationToken::new();
    let (result, _) = call(&llm(&cfg), &request(), &cancel).await;
    result.unwrap();
    let no_tools = ChatRequest {
        tools: Vec::new(),
        ..request()
    };
    let keyless = LlmConfig {
        api_key: None,
        ..cfg
    };
    let (result, _) = call(&llm(&keyless), &no_tools, &cancel).await;
    result.unwrap();

    let requests = server.requests();
    assert_eq!(
        requests[0],
        json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a test."},
                {"role": "user", "content": "hi"},
            ],
            "tools": request().tools,
            "tool_choice": "auto",
        })
    );
    assert!(requests[1].get("tools").is_none());
    assert!(requests[1].get("tool_choice").is_none());
    assert_eq!(
        server.authorizations(),
        [Some(format!("Bearer {KEY}")), None]
    );
}

/// A body given in parts (as a long chat sends its kept messages) arrives as one JSON body
/// framed by `Content-Length` (not chunked: some OpenAI-compatible servers refuse that), the
/// same as one built whole.
#[tokio::test]
async fn a_body_in_parts_is_sent_whole_with_its_length() {
    let server = ScriptedLlm::start(vec![]).await;
    let cfg = config(&server.base_url());
    let llm = llm(&cfg);
    let cancel = CancellationToken::new();
    let parts = vec![
        bytes::Bytes::from(ChatMessage::system("You are a test.").wire_json()),
        bytes::Bytes::from_static(b","),
        bytes::Bytes::from(format!(
            "{},{}",
            ChatMessage::user("hi").wire_json(),
            ChatMessage::user("again").wire_json()
        )),
        bytes::Bytes::new(),
    ];
    let tools = Value::Array(request().tools).to_string();
    let body = RequestBody::new(llm.model(), parts, 3, Some(&tools));
    llm.complete_body(&body, &|_| {}, &cancel).await.unwrap();
    let (result, _) = call(&llm, &request(), &cancel).await;
    result.unwrap();
    let requests = server.requests();
    assert_eq!(
        requests[0],
        json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a test."},
                {"role": "user", "content": "hi"},
                {"role": "user", "content": "again"},
            ],
            "tools": request().tools,
            "tool_choice": "auto",
        })
    );
    for f in server.framings() {
        assert_eq!(f.transfer_encoding, None, "{f:?}");
        assert_eq!(f.content_length, Some(f.received), "{f:?}");
    }
    assert_eq!(server.framings().len(), 2);
}

#[tokio::test]
async fn metrics_accumulate_tokens_and_cost_and_restore() {
    let server = ScriptedLlm::start(vec![]).await;
    let cfg = config(&server.base_url());
    let llm = llm(&cfg);
    let cancel = CancellationToken::new();
    for _ in 0..2 {
        call(&llm, &request(), &cancel).await.0.unwrap();
    }
    let per_call = (PROMPT_TOKENS as f64 * 2.0 + COMPLETION_TOKENS as f64 * 10.0) / 1e6;
    let snap = llm.metrics().snapshot_json();
    assert!(
        (snap["accumulated_cost"].as_f64().unwrap() - 2.0 * per_call).abs() < 1e-12,
        "{snap}"
    );
    assert_eq!(snap["max_budget_per_task"], Value::Null);
    let usage = &snap["accumulated_token_usage"];
    assert_eq!(usage["model"], MODEL);
    assert_eq!(usage["prompt_tokens"], 2 * PROMPT_TOKENS);
    assert_eq!(usage["completion_tokens"], 2 * COMPLETION_TOKENS);
    assert_eq!(usage["per_turn_token"], PROMPT_TOKENS + COMPLETION_TOKENS);
    for list in ["costs", "response_latencies", "token_usages"] {
        assert_eq!(
            snap[list],
            json!([]),
            "{list} is trimmed in event snapshots"
        );
    }
    let full = llm.metrics().full_json();
    assert_eq!(full["costs"].as_array().unwrap().len(), 2);
    assert_eq!(full["response_latencies"].as_array().unwrap().len(), 2);
    assert_eq!(
        full["token_usages"][0]["response_id"],
        server_response_id(&full)
    );

    // Snapshot, restore elsewhere, keep counting.
    let saved = serde_json::to_string(llm.metrics()).unwrap();
    let other = self::llm(&cfg);
    other
        .metrics()
        .restore(serde_json::from_str::<Metrics>(&saved).unwrap());
    call(&other, &request(), &cancel).await.0.unwrap();
    assert_eq!(
        other.metrics().accumulated_token_usage().prompt_tokens,
        3 * PROMPT_TOKENS
    );
    assert!((other.metrics().accumulated_cost() - 3.0 * per_call).abs() < 1e-12);

    // A model that is not in the price table costs nothing.
    let unpriced = self::llm(&LlmConfig {
        model: "unpriced".into(),
        ..cfg
    });
    call(&unpriced, &request(), &cancel).await.0.unwrap();
    assert_eq!(unpriced.metrics().accumulated_cost(), 0.0);
    assert_eq!(
        unpriced
            .metrics()
            .accumulated_token_usage()
            .completion_tokens,
        COMPLETION_TOKENS
    );
}

fn server_response_id(full: &Value) -> Value {
    full["response_latencies"][0]["response_id"].clone()
}

/// A `Write` into a shared buffer, for capturing logs.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn api_key_is_never_in_debug_errors_or_logs() {
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .finish();
    // This test's runtime is current-thread, so the default holds for the whole test.
    let _guard = tracing::subscriber::set_default(subscriber);

    // A server that echoes the key in its error message.
    let echo = format!(r#"{{"error": {{"message": "Incorrect API key provided: {KEY}"}}}}"#);
    let server = ScriptedLlm::start(vec![
        Reply::Status(500, None),
        Reply::Status(429, Some(0)),
        Reply::text("fine"),
        Reply::Raw(401, echo),
    ])
    .await;
    let cfg = config(&server.base_url());
    let llm = llm(&cfg);
    let cancel = CancellationToken::new();
    let (result, notices) = call(&llm, &request(), &cancel).await;
    result.unwrap();
    let (result, _) = call(&llm, &request(), &cancel).await;
    let err = result.unwrap_err();
    assert!(matches!(err, LlmError::Auth { status: 401, .. }));

    let shown = [
        format!("{cfg:?}"),
        format!("{cfg:#?}"),
        format!("{llm:?}"),
        format!("{err}"),
        format!("{err:?}"),
        format!("{notices:?}"),
        llm.metrics().full_json().to_string(),
        String::from_utf8(logs.0.lock().unwrap().clone()).unwrap(),
    ];
    for text in &shown {
        assert!(!text.contains(KEY), "key leaked: {text}");
    }
    assert!(
        err.to_string()
            .contains("Incorrect API key provided: <redacted>")
    );
    assert!(
        shown[7].contains("LLM request failed; retrying"),
        "logs captured"
    );
    // ... while the server did get it.
    assert_eq!(server.authorizations()[0], Some(format!("Bearer {KEY}")));
}
