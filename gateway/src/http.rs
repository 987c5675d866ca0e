//! REST API with OpenHands' V0 shapes (`/api/conversations...`), plus health, readiness and metrics.
//!
//! Every error goes through [`ApiError`]: a client mistake is a 4xx with a clear JSON body and
//! is not logged as an error; a server fault is a generic 500 (or 503 when a dependency is
//! down), logged once with detail. A conversation of another user is indistinguishable from
//! one that does not exist (404). axum's own rejections (query string, body, path) are turned
//! into `ApiError`s too, so every error body is JSON.

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use shared::event::{UserAction, load_trajectory};
use shared::id::{SessionId, UserId};
use shared::msg_id::ActionMsgId;
use shared::quota::{Capped, Verdict};
use shared::status::{self, SessionState, Status};
use shared::store::{ConversationMeta, StoreError};
use shared::wire::{Control, StartReason, StartRequest};
use tracing::{error, info, warn};

use crate::actions;
use crate::app::AppState;
use crate::limits;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/conversations", post(create).get(list))
        .route(
            "/api/conversations/{id}",
            get(get_one).delete(delete_one).patch(rename),
        )
        .route("/api/conversations/{id}/events", get(events))
        .route("/api/conversations/{id}/trajectory", get(trajectory))
        .route("/api/conversations/{id}/config", get(runtime_config))
        .route("/api/conversations/{id}/vscode-url", get(vscode_url))
        .route("/api/conversations/{id}/web-hosts", get(web_hosts))
        .route("/api/conversations/{id}/start", post(start))
        .route("/api/conversations/{id}/stop", post(stop))
        .route("/api/openapi.json", get(crate::openapi::document))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
}

async fn metrics_page(State(state): State<AppState>) -> String {
    // Tasks of sockets that closed are gone: this returns to its idle value.
    metrics::gauge!("oh_gateway_tasks").set(state.tasks.len() as f64);
    state.metrics.render()
}

/// The one error type of the REST boundary.
#[derive(Debug)]
pub(crate) enum ApiError {
    Unauthorized,
    NotFound,
    BadRequest(String),
    InvalidLimit,
    /// A request that does not match its schema: 422 with FastAPI's `HTTPValidationError`
    /// body, `{"detail": [{"loc", "msg", "type"}]}`.
    Unprocessable(Invalid),
    UnsupportedMediaType,
    TooLarge,
    /// A `replay_json` over `OH_MAX_REPLAY_MIB`.
    ReplayTooLarge {
        size: usize,
        limit: usize,
    },
    Unavailable(String),
    /// A stream is full: the write was refused (nothing stored, nothing acknowledged).
    Full(String),
    /// A per-user rate or cap (429, with `Retry-After` for a rate).
    TooMany {
        message: String,
        retry_after: Option<std::time::Duration>,
    },
    Internal(String),
}

/// One validation error, as FastAPI (pydantic) reports it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Invalid {
    /// Where: `["body", "field"]`, `["query", "name"]`, `["path", "id"]`.
    pub(crate) loc: Vec<String>,
    /// What is wrong, for a person.
    pub(crate) msg: String,
    /// What is wrong, for a program (pydantic's error types: `int_parsing`, `bool_parsing`,
    /// `enum`, `json_invalid`, `extra_forbidden`, `missing`, `value_error`, ...).
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
}

impl ApiError {
    /// A 422 for one value.
    pub(crate) fn invalid(loc: &[&str], msg: impl Into<String>, kind: &'static str) -> ApiError {
        ApiError::Unprocessable(Invalid {
            loc: loc.iter().map(|s| (*s).to_owned()).collect(),
            msg: msg.into(),
            kind,
        })
    }

    /// A 422 for a JSON body that does not parse or does not match its model.
    pub(crate) fn body(e: &serde_json::Error) -> ApiError {
        let msg = e.to_string();
        let kind = if e.is_syntax() || e.is_eof() {
            "json_invalid"
        } else if msg.starts_with("unknown field") {
            "extra_forbidden"
        } else if msg.starts_with("missing field") {
            "missing"
        } else {
            "value_error"
        };
        ApiError::invalid(&["body"], msg, kind)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt { .. } => ApiError::Internal(e.to_string()),
            _ if e.is_storage_full() => {
                ApiError::Full("storage is full (a JetStream limit); nothing was stored".into())
            }
            _ => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<actions::SendError> for ApiError {
    fn from(e: actions::SendError) -> Self {
        if matches!(e, actions::SendError::QueueFull) {
            ApiError::Full(e.to_string())
        } else if e.is_server_fault() {
            ApiError::Unavailable(e.to_string())
        } else {
            ApiError::BadRequest(e.to_string())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::invalid(&["query"], e.body_text(), "value_error")
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge
        } else {
            ApiError::BadRequest(e.body_text())
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        ApiError::Unavailable(format!("redis: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::TooMany {
            message,
            retry_after,
        } = &self
        {
            let body = json!({"status": "error", "message": message});
            let mut resp = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            if let Some(wait) = retry_after
                && let Ok(v) = axum::http::HeaderValue::from_str(&wait.as_secs().max(1).to_string())
            {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
            return resp;
        }
        let (code, body) = match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, json!({"error": "Invalid token"})),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                json!({"status": "error", "message": "Conversation not found", "msg_id": "CONVERSATION$NOT_FOUND"}),
            ),
            ApiError::BadRequest(m) => (
                StatusCode::BAD_REQUEST,
                json!({"status": "error", "message": m}),
            ),
            ApiError::InvalidLimit => (StatusCode::BAD_REQUEST, json!({"detail": "Invalid limit"})),
            ApiError::Unprocessable(e) => {
                (StatusCode::UNPROCESSABLE_ENTITY, json!({"detail": [e]}))
            }
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({"detail": "Content-Type must be application/json"}),
            ),
            ApiError::ReplayTooLarge { size, limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"detail": format!("replay_json is {size} bytes; the limit is {} MiB (OH_MAX_REPLAY_MIB)", limit >> 20)}),
            ),
            ApiError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"detail": format!("request body too large; the limit is {} MiB", crate::app::MAX_BODY_BYTES >> 20)}),
            ),
            ApiError::Unavailable(detail) => {
                warn!(detail, "dependency unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "error", "message": "Service temporarily unavailable; please retry"}),
                )
            }
            ApiError::TooMany { message, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({"status": "error", "message": message}),
            ),
            ApiError::Full(m) => (
                StatusCode::INSUFFICIENT_STORAGE,
                json!({"status": "error", "message": m}),
            ),
            ApiError::Internal(detail) => {
                error!(detail, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"status": "error", "message": "Internal server error"}),
                )
            }
        };
        (code, Json(body)).into_response()
    }
}

/// The authenticated caller.
pub(crate) struct Caller(pub(crate) UserId);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(shared::config::bearer_token);
        state
            .auth
            .user_for(token)
            .map(Caller)
            .ok_or(ApiError::Unauthorized)
    }
}

/// The conversation id of the path, parsed.
pub(crate) struct ConvId(pub(crate) SessionId);

impl FromRequestParts<AppState> for ConvId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        SessionId::parse(&id)
            .map(ConvId)
            .map_err(|e| ApiError::BadRequest(format!("invalid conversation id: {e}")))
    }
}

/// A body is JSON whatever its declared type only if it declares none (FastAPI's rule);
/// another declared type is refused.
pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(declared) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let mime = declared
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || mime.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

pub(crate) async fn meta_of(
    state: &AppState,
    uid: &UserId,
    sid: &SessionId,
) -> Result<ConversationMeta, ApiError> {
    state
        .store
        .get_meta(uid, sid)
        .await?
        .ok_or(ApiError::NotFound)
}

fn now_utc() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

// ---- create ----

/// OpenHands' `InitSessionRequest`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    repository: Option<String>,
    #[schema(value_type = Option<crate::openapi::GitProvider>)]
    git_provider: Option<String>,
    selected_branch: Option<String>,
    initial_user_msg: Option<String>,
    image_urls: Option<Vec<String>>,
    replay_json: Option<String>,
    #[schema(value_type = Option<Object>)]
    suggested_task: Option<Value>,
    #[schema(value_type = Option<Object>)]
    create_microagent: Option<Value>,
    conversation_instructions: Option<String>,
    #[schema(value_type = Option<Object>)]
    mcp_config: Option<Value>,
    conversation_id: Option<String>,
}

/// OpenHands' `ProviderType` values.
pub(crate) const GIT_PROVIDERS: &[&str] = &[
    "github",
    "gitlab",
    "bitbucket",
    "azure_devops",
    "enterprise_sso",
];

/// OpenHands' `ConversationTrigger` values.
pub(crate) const TRIGGERS: &[&str] = &[
    "resolver",
    "gui",
    "suggested_task",
    "openhands_api",
    "slack",
    "microagent_management",
    "jira",
    "jira_dc",
    "linear",
    "bitbucket",
];

/// `'a', 'b' or 'c'`, as pydantic words an enum error.
fn one_of(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The title of a new conversation: its first message's first line, shortened (as
/// OpenHands titles a conversation without an LLM), or `Conversation <id prefix>`.
fn default_title(sid: &SessionId, first_message: Option<&str>) -> String {
    const MAX: usize = 30;
    let line = first_message
        .and_then(|m| m.lines().map(str::trim).find(|l| !l.is_empty()))
        .unwrap_or_default();
    if line.is_empty() {
        return format!(
            "Conversation {}",
            &sid.as_str()[..5.min(sid.as_str().len())]
        );
    }
    match line.char_indices().nth(MAX) {
        None => line.to_owned(),
        Some((cut, _)) => format!("{}...", line[..cut].trim_end()),
    }
}

#[utoipa::path(
    post, path = "/api/conversations", tag = "conversations",
    request_body(content = CreateBody, content_type = "application/json"),
    responses((status = 200, body = crate::openapi::ConversationAnswer), crate::openapi::Errors)
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    Caller(uid): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    if !body.is_empty() {
        require_json(&headers)?;
    }
    let mut body: CreateBody = if body.is_empty() {
        serde_json::from_str("{}").map_err(|e| ApiError::Internal(e.to_string()))?
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::body(&e))?
    };
    // As OpenHands reads them: an empty replay is no replay, no images are no images.
    body.replay_json = body.replay_json.filter(|r| !r.is_empty());
    body.image_urls = body.image_urls.filter(|v| !v.is_empty());
    if let Some(p) = &body.git_provider
        && !GIT_PROVIDERS.contains(&p.as_str())
    {
        return Err(ApiError::invalid(
            &["body", "git_provider"],
            format!("Input should be {}", one_of(GIT_PROVIDERS)),
            "enum",
        ));
    }
    if body.conversation_id.is_some() {
        return Err(ApiError::BadRequest(
            "conversation_id cannot be chosen by the client".into(),
        ));
    }
    if body.replay_json.is_some() && (body.initial_user_msg.is_some() || body.image_urls.is_some())
    {
        return Err(ApiError::BadRequest(
            "replay_json cannot be combined with initial_user_msg or image_urls".into(),
        ));
    }
    let started = std::time::Instant::now();
    let sid = SessionId::generate();
    let rate = state.limits.create;
    if let Verdict::Limited(wait) = limits::take(&state, "create", &uid, rate).await {
        return Err(ApiError::TooMany {
            message: format!(
                "too many conversations created: the limit is OH_CREATE_RATE; retry in {} s",
                wait.as_secs().max(1)
            ),
            retry_after: Some(wait),
        });
    }
    let capped = match state.limits.max_stored {
        Some(cap) => {
            if !limits::admit(&state, Capped::Conversations, &uid, sid.as_str(), cap).await {
                return Err(ApiError::TooMany {
                    message: format!(
                        "you have {cap} stored conversations, the limit (OH_MAX_STORED_CONVERSATIONS_PER_USER); delete one first"
                    ),
                    retry_after: None,
                });
            }
            true
        }
        None => false,
    };
    let res = store_new(&state, &uid, &sid, body).await;
    metrics::histogram!("oh_gateway_create_seconds").record(started.elapsed());
    if res.is_err() && capped {
        limits::release(&state, Capped::Conversations, &uid, sid.as_str()).await;
    }
    res
}

/// Stores a new conversation (replay, metadata, initial message) and queues its start.
async fn store_new(
    state: &AppState,
    uid: &UserId,
    sid: &SessionId,
    body: CreateBody,
) -> Result<Response, ApiError> {
    let (state, uid, sid) = (state.clone(), uid.clone(), sid.clone());
    let initial = if body.initial_user_msg.is_some() || body.image_urls.is_some() {
        let action = UserAction::message(
            body.initial_user_msg.clone().unwrap_or_default(),
            body.image_urls.clone().unwrap_or_default(),
        );
        Some(actions::checked_size(action.to_json())?)
    } else {
        None
    };
    let mut replay_blob = None;
    if let Some(replay) = &body.replay_json {
        if replay.len() > state.max_replay_bytes {
            return Err(ApiError::ReplayTooLarge {
                size: replay.len(),
                limit: state.max_replay_bytes,
            });
        }
        // A trajectory that could never start (no user message first) is refused here, not
        // left to fail every claim.
        let events = load_trajectory(replay.as_bytes())
            .and_then(shared::event::replay_items)
            .map_err(|e| ApiError::BadRequest(format!("invalid replay_json: {e}")))?;
        let name = state.store.put_replay(&sid, replay.as_bytes()).await?;
        info!(session_id = %sid, events = events.len(), "replay trajectory stored");
        replay_blob = Some(name);
    }
    let trigger = if body.suggested_task.is_some() {
        "suggested_task"
    } else if body.create_microagent.is_some() {
        "microagent_management"
    } else if state.auth.is_single_user() {
        "gui"
    } else {
        "openhands_api"
    };
    let now = now_utc();
    let meta = ConversationMeta {
        conversation_id: sid.to_string(),
        user_id: uid.to_string(),
        title: default_title(&sid, body.initial_user_msg.as_deref()),
        created_at: now.clone(),
        last_updated_at: now,
        trigger: trigger.to_owned(),
        selected_repository: body.repository,
        selected_branch: body.selected_branch,
        git_provider: body.git_provider,
        pr_number: Vec::new(),
        conversation_instructions: body.conversation_instructions,
        replay_blob,
        llm: crate::settings::llm_choice(&state, &uid).await?,
    };
    let _ = (
        &body.mcp_config,
        &body.suggested_task,
        &body.create_microagent,
    ); // accepted, not used yet
    // The session's live feed is joined before its start request is queued (beside the
    // metadata write): it then holds every event of the session, and the creator's first
    // socket replays from it without reading the log (see `recent`). Best effort.
    let (stored, watch) = tokio::join!(state.store.put_meta(&uid, &meta), state.fanout.watch(&sid));
    stored?;
    let watch = watch
        .map(crate::recent::Watch::new)
        .inspect_err(|e| warn!(session_id = %sid, error = %e, "joining a new conversation's feed failed; its socket will read the log"))
        .ok();
    let has_initial = initial.is_some();
    if let Some(payload) = initial {
        let msg_id = ActionMsgId::initial(&sid);
        actions::send_stored_only(&state, &sid, &uid, payload, &msg_id).await?;
    }
    // The request carries the metadata (the claim does not read it back) and whether an
    // action was stored before it (with none, the claim does not look).
    let req = StartRequest::create(&meta, &sid, &uid, has_initial);
    actions::enqueue_request(&state, &sid, req).await?;
    state.recent.created(&sid, &uid, watch);
    metrics::counter!("oh_gateway_conversations_created_total").increment(1);
    Ok(Json(json!({
        "status": "ok",
        "conversation_id": sid.to_string(),
        "message": null,
        "conversation_status": "STARTING",
    }))
    .into_response())
}

// ---- read ----

async fn info(state: &AppState, meta: &ConversationMeta) -> Result<Value, ApiError> {
    let sid =
        SessionId::parse(&meta.conversation_id).map_err(|e| ApiError::Internal(e.to_string()))?;
    let (mut r1, mut r2) = (state.redis.clone(), state.redis.clone());
    let names = state.store.names();
    let (st, owner) = tokio::try_join!(
        status::read(&mut r1, names, &sid),
        shared::ownership::owner(&mut r2, names, &sid),
    )?;
    Ok(conversation_info(meta, &st, owner.as_deref()))
}

fn conversation_info(meta: &ConversationMeta, st: &Status, owner: Option<&str>) -> Value {
    // The lease is authoritative for "running"; the status hash adds detail (and survives
    // nothing: after Redis is emptied, a session without a lease reads as stopped).
    let state = match (owner, st.state) {
        (Some(_), _) => SessionState::Running,
        (None, Some(SessionState::Running)) | (None, None) => SessionState::Stopped,
        (None, Some(s)) => s,
    };
    let agent_state = st.agent_state.as_deref();
    let (status, runtime_status) = match state {
        SessionState::Queued => ("STARTING", Value::Null),
        SessionState::Running if agent_state == Some("loading") || agent_state.is_none() => {
            ("STARTING", json!("STATUS$STARTING_RUNTIME"))
        }
        SessionState::Running => ("RUNNING", json!("STATUS$READY")),
        SessionState::Stopped => ("STOPPED", Value::Null),
        SessionState::Error => ("ERROR", json!("STATUS$ERROR")),
    };
    let url = format!("/api/conversations/{}", meta.conversation_id);
    json!({
        "conversation_id": meta.conversation_id,
        "title": meta.title,
        "last_updated_at": meta.last_updated_at,
        "status": status,
        "runtime_status": runtime_status,
        "selected_repository": meta.selected_repository,
        "selected_branch": meta.selected_branch,
        "git_provider": meta.git_provider,
        "trigger": meta.trigger,
        "num_connections": 0,
        "url": if status == "STOPPED" { Value::Null } else { json!(url) },
        "session_api_key": null,
        "created_at": meta.created_at,
        "pr_number": meta.pr_number,
        "conversation_version": "V0",
        "sub_conversation_ids": [],
        "worker_id": owner,
        "session_status": state.as_str(),
        "agent_state": agent_state,
        "reason": st.reason,
    })
}

#[utoipa::path(
    get, path = "/api/conversations/{id}", tag = "conversations", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    responses((status = 200, body = crate::openapi::ConversationInfo), crate::openapi::Errors)
)]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
) -> Result<Json<Value>, ApiError> {
    let meta = meta_of(&state, &uid, &sid).await?;
    Ok(Json(info(&state, &meta).await?))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    limit: Option<i64>,
    page_id: Option<String>,
    selected_repository: Option<String>,
    conversation_trigger: Option<String>,
}

#[utoipa::path(
    get, path = "/api/conversations", tag = "conversations",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100),
        ("page_id" = Option<String>, Query),
        ("selected_repository" = Option<String>, Query),
        ("conversation_trigger" = Option<String>, Query),
    ),
    responses((status = 200, body = crate::openapi::ConversationPage), crate::openapi::Errors)
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Caller(uid): Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::InvalidLimit);
    }
    let limit = usize::try_from(limit).unwrap_or(20);
    let offset = match q.page_id.as_deref() {
        None | Some("") => 0,
        Some(p) => base64::engine::general_purpose::STANDARD
            .decode(p)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| ApiError::BadRequest("invalid page_id".into()))?,
    };
    if let Some(t) = &q.conversation_trigger
        && !TRIGGERS.contains(&t.as_str())
    {
        return Err(ApiError::invalid(
            &["query", "conversation_trigger"],
            format!("Input should be {}", one_of(TRIGGERS)),
            "enum",
        ));
    }
    let mut all = state.store.list_meta(&uid).await?;
    all.retain(|m| {
        q.selected_repository
            .as_ref()
            .is_none_or(|r| m.selected_repository.as_ref() == Some(r))
            && q.conversation_trigger
                .as_ref()
                .is_none_or(|t| &m.trigger == t)
    });
    all.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then(b.conversation_id.cmp(&a.conversation_id))
    });
    let page: Vec<&ConversationMeta> = all.iter().skip(offset).take(limit).collect();
    let results = futures::future::try_join_all(page.iter().map(|m| info(&state, m))).await?;
    let end = offset.saturating_add(limit);
    let next = (end < all.len())
        .then(|| base64::engine::general_purpose::STANDARD.encode(end.to_string()));
    Ok(Json(json!({"results": results, "next_page_id": next})))
}

#[derive(Debug, Deserialize)]
pub(crate) struct EventsQuery {
    start_id: Option<String>,
    end_id: Option<String>,
    reverse: Option<String>,
    limit: Option<String>,
}

fn parse_opt<T: std::str::FromStr>(v: Option<&str>, name: &str) -> Result<Option<T>, ApiError> {
    match v {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            ApiError::invalid(
                &["query", name],
                format!("{name} must be a non-negative integer"),
                "int_parsing",
            )
        }),
    }
}

/// A boolean query parameter, read as pydantic reads one (case-insensitive `true/1/yes/on/t/y`
/// and `false/0/no/off/f/n`); anything else is a 422, not a silent `false`.
fn parse_bool(v: Option<&str>, name: &str) -> Result<Option<bool>, ApiError> {
    let Some(s) = v else { return Ok(None) };
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" | "t" | "y" => Ok(Some(true)),
        "false" | "0" | "no" | "off" | "f" | "n" => Ok(Some(false)),
        _ => Err(ApiError::invalid(
            &["query", name],
            "Input should be a valid boolean, unable to interpret input",
            "bool_parsing",
        )),
    }
}

#[utoipa::path(
    get, path = "/api/conversations/{id}/events", tag = "conversations",
    params(
        ("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)"),
        ("start_id" = Option<u64>, Query),
        ("end_id" = Option<u64>, Query),
        ("reverse" = Option<bool>, Query),
        ("limit" = Option<i64>, Query, minimum = 0, maximum = 100),
    ),
    responses((status = 200, body = crate::openapi::EventPage), crate::openapi::Errors)
)]
pub(crate) async fn events(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    meta_of(&state, &uid, &sid).await?;
    let limit: i64 = match q.limit.as_deref() {
        None | Some("") => 20,
        Some(s) => s.parse().map_err(|_| ApiError::InvalidLimit)?,
    };
    if !(0..=100).contains(&limit) {
        return Err(ApiError::InvalidLimit);
    }
    let limit = usize::try_from(limit).unwrap_or(20);
    let start: u64 = parse_opt(q.start_id.as_deref(), "start_id")?.unwrap_or(0);
    let end: Option<u64> = parse_opt(q.end_id.as_deref(), "end_id")?;
    let reverse = parse_bool(q.reverse.as_deref(), "reverse")?.unwrap_or(false);
    let Some(head) = state.store.last_event(&sid).await? else {
        return Ok(events_body(&[], false));
    };
    let end = end.unwrap_or(head.id).min(head.id);
    if start > end || limit == 0 {
        return Ok(events_body(&[], start <= end));
    }
    let (events, has_more) = if reverse {
        let lo = start.max(end.saturating_sub(limit as u64));
        let want = usize::try_from(end - lo + 1).unwrap_or(limit + 1);
        let mut evs = state.store.read_from(&sid, lo, want).await?;
        evs.retain(|e| e.id <= end);
        evs.reverse();
        let more = evs.len() > limit;
        evs.truncate(limit);
        (evs, more)
    } else {
        let mut evs = state.store.read_from(&sid, start, limit + 1).await?;
        evs.retain(|e| e.id <= end);
        let more = evs.len() > limit;
        evs.truncate(limit);
        (evs, more)
    };
    let raws: Vec<Box<RawValue>> = events
        .iter()
        .filter_map(|e| std::str::from_utf8(&e.payload).ok())
        .filter_map(|s| RawValue::from_string(s.to_owned()).ok())
        .collect();
    Ok(events_body(&raws, has_more))
}

fn events_body(events: &[Box<RawValue>], has_more: bool) -> Response {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        events: &'a [Box<RawValue>],
        has_more: bool,
    }
    Json(Body { events, has_more }).into_response()
}

/// Most events a trajectory export holds (the newest are kept if a log is longer).
const TRAJECTORY_LIMIT: usize = 100_000;

/// The whole event log, as OpenHands exports it: `{"trajectory": [event, ...]}`.
#[utoipa::path(
    get, path = "/api/conversations/{id}/trajectory", tag = "conversations", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    responses((status = 200, body = crate::openapi::Trajectory), crate::openapi::Errors)
)]
pub(crate) async fn trajectory(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
) -> Result<Response, ApiError> {
    meta_of(&state, &uid, &sid).await?;
    let from = match state.store.last_event(&sid).await? {
        Some(head) => head.id.saturating_sub(TRAJECTORY_LIMIT as u64 - 1),
        None => 0,
    };
    let events = state.store.read_from(&sid, from, TRAJECTORY_LIMIT).await?;
    let raws: Vec<Box<RawValue>> = events
        .iter()
        .filter_map(|e| std::str::from_utf8(&e.payload).ok())
        .filter_map(|s| RawValue::from_string(s.to_owned()).ok())
        .collect();
    #[derive(serde::Serialize)]
    struct Body {
        trajectory: Vec<Box<RawValue>>,
    }
    Ok(Json(Body { trajectory: raws }).into_response())
}

/// The runtime of a conversation. The runtime is the owning worker's sandbox, which has no
/// id a client could use elsewhere (OpenHands' UI asks `/api/v1/sandboxes` for a non-null one).
#[utoipa::path(
    get, path = "/api/conversations/{id}/config", tag = "conversations", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    responses((status = 200, body = crate::openapi::RuntimeConfig), crate::openapi::Errors)
)]
pub(crate) async fn runtime_config(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
) -> Result<Json<Value>, ApiError> {
    meta_of(&state, &uid, &sid).await?;
    Ok(Json(
        json!({"runtime_id": null, "session_id": sid.to_string()}),
    ))
}

/// No VS Code server runs beside a session.
#[utoipa::path(
    get, path = "/api/conversations/{id}/vscode-url", tag = "conversations", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    responses((status = 200, body = crate::openapi::VscodeUrl), crate::openapi::Errors)
)]
pub(crate) async fn vscode_url(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
) -> Result<Json<Value>, ApiError> {
    meta_of(&state, &uid, &sid).await?;
    Ok(Json(json!({"vscode_url": null})))
}

/// Sandboxes publish no ports: no web hosts.
#[utoipa::path(
    get, path = "/api/conversations/{id}/web-hosts", tag = "conversations", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    responses((status = 200, body = crate::openapi::WebHosts), crate::openapi::Errors)
)]
pub(crate) async fn web_hosts(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
) -> Result<Json<Value>, ApiError> {
    meta_of(&state, &uid, &sid).await?;
    Ok(Json(json!({"hosts": {}})))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RenameBody {
    /// 1-200 characters, not only spaces.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    title: String,
}

/// Longest title, in characters.
const MAX_TITLE_CHARS: usize = 200;

/// Renames a conversation (`PATCH`, `{"title": ...}`): `true`, or 404.
#[utoipa::path(
    patch, path = "/api/conversations/{id}", tag = "conversations", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    request_body(content = RenameBody, content_type = "application/json"),
    responses((status = 200, body = bool, content_type = "application/json"), crate::openapi::Errors)
)]
pub(crate) async fn rename(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body?;
    require_json(&headers)?;
    let body: RenameBody = serde_json::from_slice(&body).map_err(|e| ApiError::body(&e))?;
    let title = body.title.trim().to_owned();
    if title.is_empty() || title.chars().count() > MAX_TITLE_CHARS {
        return Err(ApiError::invalid(
            &["body", "title"],
            format!("the title must have 1 to {MAX_TITLE_CHARS} characters (not only spaces)"),
            "string_length",
        ));
    }
    let now = now_utc();
    let updated = state
        .store
        .update_meta(&uid, &sid, |m| {
            m.title.clone_from(&title);
            m.last_updated_at.clone_from(&now);
        })
        .await?;
    match updated {
        Some(_) => {
            info!(session_id = %sid, user_id = %uid, "conversation renamed");
            Ok(Json(json!(true)))
        }
        None => Err(ApiError::NotFound),
    }
}

// ---- lifecycle ----

#[utoipa::path(
    post, path = "/api/conversations/{id}/start", tag = "conversations", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    responses((status = 200, body = crate::openapi::ConversationAnswer), crate::openapi::Errors)
)]
pub(crate) async fn start(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
) -> Result<Json<Value>, ApiError> {
    meta_of(&state, &uid, &sid).await?;
    let mut redis = state.redis.clone();
    let owner = shared::ownership::owner(&mut redis, state.store.names(), &sid).await?;
    let status = if owner.is_some() {
        // Ordered after a stop that may be in progress: its owner then queues a start again.
        actions::send_control(&state, &sid, &uid, Control::Start).await?;
        "RUNNING"
    } else {
        actions::enqueue(&state, &sid, &uid, StartReason::Start).await?;
        "STARTING"
    };
    Ok(Json(
        json!({"status": "ok", "conversation_id": sid.to_string(), "message": null, "conversation_status": status}),
    ))
}

/// Stops a session: a running one gets a stop request in its action stream (ordered after
/// the user's actions); a queued one loses its start request.
async fn stop_session(
    state: &AppState,
    uid: &UserId,
    sid: &SessionId,
) -> Result<Option<&'static str>, ApiError> {
    let mut redis = state.redis.clone();
    let names = state.store.names();
    if shared::ownership::owner(&mut redis, names, sid)
        .await?
        .is_some()
    {
        actions::send_control(state, sid, uid, Control::Stop).await?;
        return Ok(Some("RUNNING"));
    }
    let st = status::read(&mut redis, names, sid).await?;
    if st.state == Some(SessionState::Queued) {
        state
            .store
            .withdraw_start(sid)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        status::write(
            &mut redis,
            names,
            sid,
            status::Update {
                state: Some(SessionState::Stopped),
                ..Default::default()
            },
        )
        .await?;
        return Ok(Some("STARTING"));
    }
    Ok(None)
}

#[utoipa::path(
    post, path = "/api/conversations/{id}/stop", tag = "conversations", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    responses((status = 200, body = crate::openapi::ConversationAnswer), crate::openapi::Errors)
)]
pub(crate) async fn stop(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
) -> Result<Json<Value>, ApiError> {
    meta_of(&state, &uid, &sid).await?;
    Ok(Json(match stop_session(&state, &uid, &sid).await? {
        Some(before) => json!({"status": "ok", "conversation_id": sid.to_string(),
            "message": "Conversation stopped successfully", "conversation_status": before}),
        None => json!({"status": "ok", "conversation_id": sid.to_string(),
            "message": "Conversation was not running", "conversation_status": "STOPPED"}),
    }))
}

#[utoipa::path(
    delete, path = "/api/conversations/{id}", tag = "conversations", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    responses((status = 200, body = bool, content_type = "application/json", description = "true if it existed"), crate::openapi::Errors)
)]
pub(crate) async fn delete_one(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
) -> Result<Json<Value>, ApiError> {
    if state.store.get_meta(&uid, &sid).await?.is_none() {
        return Ok(Json(json!(false)));
    }
    state.recent.forget(&sid);
    state.store.delete_meta(&uid, &sid).await?;
    if stop_session(&state, &uid, &sid).await? == Some("RUNNING") {
        // Wait (bounded) for the owner to let go, so its last events are purged too.
        let mut redis = state.redis.clone();
        for _ in 0..50 {
            if shared::ownership::owner(&mut redis, state.store.names(), &sid)
                .await?
                .is_none()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    state.store.purge_session(&sid).await?;
    // Workers remove the workspace (best effort: a worker that misses this keeps the folder,
    // which no conversation references any more).
    let gone = state.store.names().deleted_subject(&sid);
    if let Err(e) = state.nats.publish(gone, bytes::Bytes::new()).await {
        warn!(session_id = %sid, error = %e, "workspace removal notice not sent");
    }
    if state.limits.max_stored.is_some() {
        limits::release(&state, Capped::Conversations, &uid, sid.as_str()).await;
    }
    let mut redis = state.redis.clone();
    status::delete(&mut redis, state.store.names(), &sid).await?;
    shared::ownership::unmark_should_run(&mut redis, state.store.names(), &uid, &sid).await?;
    Ok(Json(json!(true)))
}

#[utoipa::path(
    get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, body = crate::openapi::Readiness), (status = 503, body = crate::openapi::Readiness))
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let nats_ok = state.nats.connection_state() == async_nats::connection::State::Connected;
    let mut redis = state.redis.clone();
    let redis_ok = redis::cmd("PING")
        .query_async::<String>(&mut redis)
        .await
        .is_ok();
    let code = if nats_ok && redis_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({"nats": nats_ok, "redis": redis_ok}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_read_as_pydantic_reads_them() {
        for yes in ["true", "True", "TRUE", "1", "yes", "on", "t", "Y"] {
            assert_eq!(
                parse_bool(Some(yes), "r").ok().flatten(),
                Some(true),
                "{yes}"
            );
        }
        for no in ["false", "0", "no", "OFF", "f", "n"] {
            assert_eq!(
                parse_bool(Some(no), "r").ok().flatten(),
                Some(false),
                "{no}"
            );
        }
        assert!(matches!(parse_bool(None, "r"), Ok(None)));
        for junk in ["", "maybe", "2", "truee"] {
            assert!(
                matches!(parse_bool(Some(junk), "r"), Err(ApiError::Unprocessable(_))),
                "{junk}"
            );
        }
    }

    #[test]
    fn titles_come_from_the_first_message() {
        let sid = SessionId::parse("abcdef0123456789abcdef0123456789")
            .unwrap_or_else(|_| SessionId::generate());
        assert_eq!(default_title(&sid, Some("\n  Fix it \nmore")), "Fix it");
        assert_eq!(
            default_title(
                &sid,
                Some("a message that is longer than thirty characters")
            ),
            "a message that is longer than..."
        );
        assert_eq!(
            default_title(&sid, Some("é".repeat(40).as_str())),
            format!("{}...", "é".repeat(30))
        );
        assert!(default_title(&sid, None).starts_with("Conversation "));
        assert!(default_title(&sid, Some("  \n ")).starts_with("Conversation "));
    }
}
