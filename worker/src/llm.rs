//! The LLM client: an OpenAI-compatible chat-completions client with tool calling, retries,
//! cancellation and `llm_metrics` accounting, one [`Llm`] per conversation.
//!
//! Layout:
//! - `config`: [`LlmConfig`], [`Secret`] (the API key) and the [`PriceTable`].
//! - `message`: [`ChatRequest`] and [`ChatResponse`] and the wire JSON they map to.
//! - `metrics`: [`Metrics`], OpenHands' `llm_metrics` object.
//!
//! A call ([`Llm::complete`]) POSTs `{"model", "messages", "tools", "tool_choice": "auto"}` to
//! `{base_url}/chat/completions` (non-streaming), with `Authorization: Bearer <key>` when a
//! key is set.
//!
//! **Retries.** HTTP 429, 5xx, connection errors and attempt timeouts are retried up to
//! `max_retries` times. Before each retry the caller's `on_retry` gets a [`RetryNotice`]
//! (retry `n` of `max_retries`), then the call sleeps `retry_min · 2^(n-1)` plus up to 25 %
//! jitter, capped at `retry_max`; a 429's `Retry-After: <seconds>` replaces that delay (still
//! capped at `retry_max`). 401 and 403 fail at once with [`LlmError::Auth`]; every other 4xx
//! and 3xx fails at once with [`LlmError::Rejected`]; an unreadable 2xx body fails at once with
//! [`LlmError::BadResponse`].
//!
//! **Cancellation.** The cancellation token is watched during the request and during the
//! backoff sleep; when it fires, the request is dropped (its connection closed) and the call
//! returns [`LlmError::Cancelled`] at once.
//!
//! **Invariant: the key never leaves the `Authorization` header.** It is held in a
//! [`Secret`] (prints `<redacted>`, not serializable), sent with reqwest's sensitive-header
//! marking, never put in a tracing field, and scrubbed from every server-provided text that
//! goes into an [`LlmError`]. Redirects are not followed, so the header can't be replayed to
//! another host.
//!
//! **TLS.** `https://` uses rustls with the *ring* provider (already in the build for NATS)
//! and the platform verifier (the system's CA store), configured here explicitly instead of
//! through a process-wide default provider.

mod config;
mod message;
mod metrics;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use rustls_platform_verifier::BuilderVerifierExt as _;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use config::{LlmConfig, ModelPrice, PriceParseError, PriceTable, Secret};
pub use message::{
    AssistantMessage, ChatMessage, ChatRequest, ChatResponse, RequestBody, Role, ToolCall, Usage,
};
pub use metrics::{Cost, MAX_LIST_LEN, Metrics, ResponseLatency, TokenUsage};

/// Longest server-provided error text kept in an [`LlmError`].
const DETAIL_MAX_CHARS: usize = 300;

/// Builds [`Llm`]s that share one HTTP client (connection pool, TLS setup). One per worker.
#[derive(Debug, Clone)]
pub struct LlmRegistry {
    http: reqwest::Client,
}

/// Why the LLM client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LlmSetupError {
    /// The TLS configuration (system CA store) could not be loaded.
    #[error("cannot set up TLS for LLM requests")]
    Tls(#[source] rustls::Error),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client for LLM requests")]
    Client(#[source] reqwest::Error),
    /// The base URL is not an absolute `http://` or `https://` URL.
    #[error("LLM base URL is invalid: {reason} (expected e.g. http://127.0.0.1:8000/v1)")]
    BaseUrl {
        /// What is wrong with it (the URL itself is not repeated: it may hold credentials).
        reason: String,
    },
}

impl LlmRegistry {
    /// Builds the shared HTTP client.
    ///
    /// # Errors
    /// [`LlmSetupError::Tls`] if the system CA store can't be loaded, [`LlmSetupError::Client`]
    /// if the client can't be built.
    pub fn new() -> Result<LlmRegistry, LlmSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(LlmSetupError::Tls)?
            .with_platform_verifier()
            .map_err(LlmSetupError::Tls)?
            .with_no_client_auth();
        // reqwest is built without HTTP/2 here. The config is handed over as a value of
        // reqwest's own rustls type: were the versions ever to diverge, `build` fails ("unknown
        // TLS backend"), which `tests::https_is_supported` catches.
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("openhands-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(LlmSetupError::Client)?;
        Ok(LlmRegistry { http })
    }

    /// A client for one conversation, with empty metrics.
    ///
    /// # Errors
    /// [`LlmSetupError::BaseUrl`] if `config.base_url` is not an `http(s)://` URL.
    pub fn get(&self, config: &LlmConfig) -> Result<Llm, LlmSetupError> {
        let base = config.base_url.trim().trim_end_matches('/');
        let endpoint = reqwest::Url::parse(&format!("{base}/chat/completions")).map_err(|e| {
            LlmSetupError::BaseUrl {
                reason: e.to_string(),
            }
        })?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host().is_none() {
            return Err(LlmSetupError::BaseUrl {
                reason: format!("scheme {:?} is not http or https", endpoint.scheme()),
            });
        }
        Ok(Llm {
            http: self.http.clone(),
            endpoint,
            model: config.model.clone(),
            api_key: config.api_key.clone(),
            timeout: config.timeout,
            max_retries: config.max_retries,
            retry_min: config.retry_min,
            retry_max: config.retry_max.max(config.retry_min),
            price: config.prices.get(&config.model),
            metrics: Metrics::new(config.model.clone()),
        })
    }
}

/// One conversation's LLM: endpoint, model, key, retry policy, and the metrics of its calls.
#[derive(Debug)]
pub struct Llm {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    model: String,
    api_key: Option<Secret>,
    timeout: Duration,
    max_retries: u32,
    retry_min: Duration,
    retry_max: Duration,
    /// `None`: the model is not in the price table, its calls cost 0.
    price: Option<ModelPrice>,
    metrics: Metrics,
}

/// A retry about to happen; the agent announces it as a `STATUS$LLM_RETRY` status update,
/// "Retrying LLM request, {attempt} / {max}".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryNotice {
    /// Which retry this is, from 1 to `max`.
    pub attempt: u32,
    /// The configured `max_retries`.
    pub max: u32,
    /// Why the previous attempt failed, e.g. `HTTP 429` or `timeout` (no secrets).
    pub reason: String,
}

/// Why a call failed. `Display` never contains the API key.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// 401 or 403: the key is missing, wrong or not allowed. Not retried.
    #[error("LLM authentication failed (HTTP {status}): {detail}")]
    Auth {
        /// 401 or 403.
        status: u16,
        /// The server's message, shortened and with the key scrubbed.
        detail: String,
    },
    /// Still 429 after every retry.
    #[error("LLM rate limit (HTTP 429) after {attempts} attempts: {detail}")]
    RateLimited {
        /// Requests made.
        attempts: u32,
        /// The server's last message, shortened and with the key scrubbed.
        detail: String,
    },
    /// Still 5xx after every retry.
    #[error("LLM server error (HTTP {status}) after {attempts} attempts: {detail}")]
    Server {
        /// The last status.
        status: u16,
        /// Requests made.
        attempts: u32,
        /// The server's last message, shortened and with the key scrubbed.
        detail: String,
    },
    /// Another 3xx/4xx (bad request, unknown model, context too long, ...). Not retried.
    #[error("LLM request rejected (HTTP {status}): {detail}")]
    Rejected {
        /// The status.
        status: u16,
        /// The server's message, shortened and with the key scrubbed.
        detail: String,
    },
    /// The server could not be reached (or the connection broke) on every attempt.
    #[error("cannot reach the LLM server after {attempts} attempts")]
    Connection {
        /// Requests made.
        attempts: u32,
        /// The last transport error (without the URL).
        #[source]
        source: reqwest::Error,
    },
    /// Every attempt took longer than the timeout.
    #[error("LLM request timed out after {attempts} attempts of {timeout:?} each")]
    Timeout {
        /// Requests made.
        attempts: u32,
        /// The per-attempt timeout.
        timeout: Duration,
    },
    /// A 2xx response that is not a usable chat completion. Not retried.
    #[error("unusable LLM response: {0}")]
    BadResponse(String),
    /// The cancellation token fired (stop, pause or shutdown).
    #[error("LLM request cancelled")]
    Cancelled,
}

impl LlmError {
    /// The OpenHands RuntimeStatus id to report this failure with, as
    /// OpenHands' controller maps LLM exceptions. `None` for [`LlmError::Cancelled`] (not a
    /// failure) and [`LlmError::RateLimited`], after which OpenHands puts the agent in state
    /// `rate_limited` instead of `error`.
    pub fn status_id(&self) -> Option<&'static str> {
        match self {
            LlmError::Auth { .. } => Some("STATUS$ERROR_LLM_AUTHENTICATION"),
            LlmError::Rejected { status: 402, .. } => Some("STATUS$ERROR_LLM_OUT_OF_CREDITS"),
            LlmError::Server { status: 503, .. }
            | LlmError::Connection { .. }
            | LlmError::Timeout { .. } => Some("STATUS$ERROR_LLM_SERVICE_UNAVAILABLE"),
            LlmError::Server { .. } => Some("STATUS$ERROR_LLM_INTERNAL_SERVER_ERROR"),
            LlmError::Rejected { .. } | LlmError::BadResponse(_) => Some("STATUS$ERROR"),
            LlmError::RateLimited { .. } | LlmError::Cancelled => None,
        }
    }
}

/// How one attempt failed.
enum Failure {
    /// Worth another attempt.
    Retry {
        kind: Retryable,
        retry_after: Option<Duration>,
    },
    /// Final.
    Fatal(LlmError),
}

enum Retryable {
    RateLimited { detail: String },
    Server { status: u16, detail: String },
    Connection(reqwest::Error),
    Timeout,
}

impl Retryable {
    fn reason(&self) -> String {
        match self {
            Retryable::RateLimited { .. } => "HTTP 429".to_owned(),
            Retryable::Server { status, .. } => format!("HTTP {status}"),
            Retryable::Connection(_) => "connection error".to_owned(),
            Retryable::Timeout => "timeout".to_owned(),
        }
    }

    fn into_error(self, attempts: u32, timeout: Duration) -> LlmError {
        match self {
            Retryable::RateLimited { detail } => LlmError::RateLimited { attempts, detail },
            Retryable::Server { status, detail } => LlmError::Server {
                status,
                attempts,
                detail,
            },
            Retryable::Connection(source) => LlmError::Connection { attempts, source },
            Retryable::Timeout => LlmError::Timeout { attempts, timeout },
        }
    }
}

impl Llm {
    /// The model name sent with every request.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Cost, token usage and latencies of every successful call so far.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sends `req` and returns the model's answer, retrying as the module doc describes.
    /// `on_retry` is called before each retry's backoff sleep. Returns soon after `cancel`
    /// fires, whatever the call is doing. A successful call is recorded in [`Llm::metrics`].
    ///
    /// # Errors
    /// [`LlmError::Auth`] and [`LlmError::Rejected`] at once; [`LlmError::RateLimited`],
    /// [`LlmError::Server`], [`LlmError::Connection`] and [`LlmError::Timeout`] once the
    /// retries are spent; [`LlmError::BadResponse`] for an unusable 2xx body;
    /// [`LlmError::Cancelled`] when `cancel` fires.
    pub async fn complete(
        &self,
        req: &ChatRequest,
        on_retry: &(dyn Fn(RetryNotice) + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<ChatResponse, LlmError> {
        let body = message::request_body(&self.model, &req.messages, &req.tools);
        self.complete_body(&body, on_retry, cancel).await
    }

    /// [`Llm::complete`] with the body already built ([`RequestBody::new`] for this client's
    /// [`Llm::model`]): an agent that keeps its chat rendered between steps sends a long
    /// conversation without rebuilding or copying it.
    ///
    /// # Errors
    /// As [`Llm::complete`].
    #[tracing::instrument(name = "complete", skip_all, fields(model = %self.model, messages = body.messages()))]
    pub async fn complete_body(
        &self,
        body: &RequestBody,
        on_retry: &(dyn Fn(RetryNotice) + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<ChatResponse, LlmError> {
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            debug!(attempt, messages = body.messages(), "LLM request");
            // Cancel-safe: dropping the request future closes its connection.
            let started = Instant::now();
            let outcome = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(LlmError::Cancelled),
                outcome = self.attempt(body) => outcome,
            };
            let result = match &outcome {
                Ok(_) => "ok",
                Err(Failure::Retry { .. }) if attempt <= self.max_retries => "retry",
                Err(_) => "error",
            };
            ::metrics::counter!("oh_worker_llm_requests_total", "result" => result).increment(1);
            ::metrics::histogram!("oh_worker_llm_seconds").record(started.elapsed());
            let (kind, retry_after) = match outcome {
                Ok(response) => {
                    self.metrics.record(
                        &self.model,
                        self.price,
                        response.usage,
                        response.latency,
                        &response.response_id,
                    );
                    debug!(
                        attempt,
                        latency_ms = response.latency.as_millis(),
                        prompt_tokens = response.usage.prompt_tokens,
                        completion_tokens = response.usage.completion_tokens,
                        tool_calls = response.message.tool_calls.len(),
                        "LLM response"
                    );
                    return Ok(response);
                }
                Err(Failure::Fatal(err)) => return Err(err),
                Err(Failure::Retry { kind, retry_after }) => (kind, retry_after),
            };
            if attempt > self.max_retries {
                return Err(kind.into_error(attempt, self.timeout));
            }
            let jitter = rand::rng().random_range(0.0..0.25);
            let delay = backoff(self.retry_min, self.retry_max, attempt, retry_after, jitter);
            let notice = RetryNotice {
                attempt,
                max: self.max_retries,
                reason: kind.reason(),
            };
            warn!(
                retry = attempt,
                max = self.max_retries,
                reason = %notice.reason,
                delay_ms = delay.as_millis(),
                "LLM request failed; retrying"
            );
            on_retry(notice);
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(LlmError::Cancelled),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One request and its classification.
    async fn attempt(&self, body: &RequestBody) -> Result<ChatResponse, Failure> {
        let start = Instant::now();
        let mut request = self
            .http
            .post(self.endpoint.clone())
            .timeout(self.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.http());
        if let Some(key) = &self.api_key {
            // `bearer_auth` marks the header sensitive (kept out of reqwest's own Debug).
            request = request.bearer_auth(key.expose());
        }
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        let latency = start.elapsed();
        if status.is_success() {
            let raw: Value = serde_json::from_slice(&bytes).map_err(|e| {
                Failure::Fatal(LlmError::BadResponse(format!("body is not JSON: {e}")))
            })?;
            let parsed = message::parse_response(&raw)
                .map_err(|e| Failure::Fatal(LlmError::BadResponse(self.scrub(&e))))?;
            return Ok(ChatResponse {
                message: parsed.message,
                finish_reason: parsed.finish_reason,
                response_id: parsed.response_id,
                raw,
                usage: parsed.usage,
                latency,
            });
        }
        let detail = self.scrub(&error_detail(&bytes));
        let code = status.as_u16();
        Err(match code {
            401 | 403 => Failure::Fatal(LlmError::Auth {
                status: code,
                detail,
            }),
            429 => Failure::Retry {
                kind: Retryable::RateLimited { detail },
                retry_after,
            },
            500..=599 => Failure::Retry {
                kind: Retryable::Server {
                    status: code,
                    detail,
                },
                retry_after: None,
            },
            _ => Failure::Fatal(LlmError::Rejected {
                status: code,
                detail,
            }),
        })
    }

    fn transport(&self, err: reqwest::Error) -> Failure {
        // The URL is dropped: it is config, and a base URL may carry credentials.
        let err = err.without_url();
        if err.is_timeout() {
            Failure::Retry {
                kind: Retryable::Timeout,
                retry_after: None,
            }
        } else if err.is_builder() {
            Failure::Fatal(LlmError::Connection {
                attempts: 1,
                source: err,
            })
        } else {
            Failure::Retry {
                kind: Retryable::Connection(err),
                retry_after: None,
            }
        }
    }

    /// `text` shortened, with the key (should a server echo it) replaced by `<redacted>`.
    fn scrub(&self, text: &str) -> String {
        let mut out: String = text.chars().take(DETAIL_MAX_CHARS).collect();
        if let Some(key) = self.api_key.as_ref().map(Secret::expose)
            && !key.is_empty()
        {
            // Scrub the full text first, so truncation can't leave half a key behind.
            out = text
                .replace(key, "<redacted>")
                .chars()
                .take(DETAIL_MAX_CHARS)
                .collect();
        }
        out
    }
}

/// The server's error message: `error.message` of an OpenAI error body, else the body text.
fn error_detail(body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error").filter(|e| e.is_string()))
            .and_then(Value::as_str)
    });
    match message {
        Some(m) => m.trim().to_owned(),
        None => String::from_utf8_lossy(body).trim().to_owned(),
    }
}

/// `Retry-After` in seconds (integer or decimal); an HTTP date is ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: f64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// Delay before retry number `retry` (1-based): `min · 2^(retry-1) · (1 + jitter)`, or the
/// server's `Retry-After`, capped at `max` either way.
fn backoff(
    min: Duration,
    max: Duration,
    retry: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    if let Some(after) = retry_after {
        return after.min(max);
    }
    let exp = 2u32.saturating_pow(retry.saturating_sub(1).min(31));
    let base = min.saturating_mul(exp).min(max);
    base.mul_f64(1.0 + jitter.clamp(0.0, 1.0)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff(min, max, 1, None, 0.0), min);
        assert_eq!(backoff(min, max, 2, None, 0.0), Duration::from_millis(200));
        assert_eq!(backoff(min, max, 3, None, 0.2), Duration::from_millis(480));
        assert_eq!(backoff(min, max, 5, None, 0.0), max);
        assert_eq!(backoff(min, max, 90, None, 0.2), max);
        let after = Some(Duration::from_secs(3));
        assert_eq!(backoff(min, max, 1, after, 0.0), max);
        let after = Some(Duration::from_millis(300));
        assert_eq!(backoff(min, max, 1, after, 0.2), Duration::from_millis(300));
    }

    #[test]
    fn retry_after_reads_seconds_only() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(RETRY_AFTER, "0.5".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "-1".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn error_detail_prefers_openai_message() {
        assert_eq!(
            error_detail(br#"{"error": {"message": "bad key", "type": "x"}}"#),
            "bad key"
        );
        assert_eq!(error_detail(b" plain text "), "plain text");
    }

    fn config(base_url: &str) -> LlmConfig {
        LlmConfig {
            base_url: base_url.into(),
            model: "m".into(),
            api_key: Some(Secret::new("sk-abc")),
            timeout: Duration::from_secs(5),
            max_retries: 0,
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(1),
            prices: PriceTable::default(),
        }
    }

    #[test]
    fn base_url_is_validated_without_echoing_it() {
        let reg = LlmRegistry::new().unwrap();
        let llm = reg.get(&config("http://127.0.0.1:8000/v1/")).unwrap();
        assert_eq!(
            llm.endpoint.as_str(),
            "http://127.0.0.1:8000/v1/chat/completions"
        );
        for bad in ["", "127.0.0.1:8000", "ftp://sk-abc@host/v1", "not a url"] {
            let err = reg.get(&config(bad)).unwrap_err();
            assert!(
                matches!(err, LlmSetupError::BaseUrl { .. }),
                "{bad}: {err:?}"
            );
            assert!(!err.to_string().contains("sk-abc"), "{err}");
        }
    }

    #[test]
    fn scrub_removes_the_key_and_truncates() {
        let reg = LlmRegistry::new().unwrap();
        let llm = reg.get(&config("http://127.0.0.1:1/v1")).unwrap();
        assert_eq!(llm.scrub("bad key sk-abc!"), "bad key <redacted>!");
        let long = "x".repeat(1000) + "sk-abc";
        assert_eq!(llm.scrub(&long).chars().count(), DETAIL_MAX_CHARS);
    }

    /// The agent's step future must be `Send`, so `complete`'s must be too.
    #[test]
    fn complete_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let reg = LlmRegistry::new().unwrap();
        let llm = reg.get(&config("http://127.0.0.1:1/v1")).unwrap();
        let (req, cancel) = (ChatRequest::default(), CancellationToken::new());
        let fut = llm.complete(&req, &|_| {}, &cancel);
        assert_send(&fut);
    }

    /// TLS is compiled in: an `https://` call reaches the handshake (and fails there against a
    /// plain-TCP peer) instead of failing as an unsupported scheme or a client build error.
    #[tokio::test]
    async fn https_is_supported() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            // Accept one connection and close it without speaking TLS.
            if let Ok((sock, _)) = listener.accept().await {
                drop(sock);
            }
        });
        let reg = LlmRegistry::new().unwrap();
        let llm = reg
            .get(&config(&format!("https://127.0.0.1:{port}/v1")))
            .unwrap();
        let err = llm
            .complete(&ChatRequest::default(), &|_| {}, &CancellationToken::new())
            .await
            .unwrap_err();
        let LlmError::Connection {
            attempts: 1,
            source,
        } = &err
        else {
            panic!("expected a connection error, got {err:?}");
        };
        // Without TLS support this would be a builder error ("scheme is not http").
        assert!(source.is_connect() && !source.is_builder(), "{source:?}");
        server.await.unwrap();
    }
}
