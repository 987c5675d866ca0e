//! The user's side of OpenHands' UI: the server's client config, per-user settings, the option
//! lists the server actually supports, and custom secrets.
//!
//! - Settings (OpenHands' `Settings` model) are stored per user in Redis (`{ns}:settings:{uid}`,
//!   JSON). API keys are write-only: a read answers `null` and `llm_api_key_set`. The LLM
//!   fields are fixed into each new conversation's metadata ([`llm_choice`]), where the worker
//!   reads them; a save changes the user's next conversations, not running ones.
//! - Custom secrets are a Redis hash per user (`{ns}:secrets:{uid}`, name → `{value,
//!   description}`); values are never returned.
//!
//! Where OpenHands answers differently, ours is stricter on purpose: a `GET /api/settings`
//! with nothing stored answers the server's defaults (200) instead of 404, so the UI does not
//! insist on a settings form before the first chat; `llm_base_url` must be an `http(s)` URL and
//! `agent` one this server runs, because they take effect. `security_analyzer` is stored as
//! given (OpenHands' UI always sends `"llm"`); no analyzer runs here.

use axum::Json;
use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use shared::store::{KeptSecret, LlmChoice};
use tracing::info;

use crate::app::AppState;
use crate::http::{ApiError, Caller, require_json};

/// Agents this server runs (OpenHands' names).
pub(crate) const AGENTS: &[&str] = &["CodeActAgent"];

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/options/config", get(config))
        .route("/api/options/models", get(models))
        .route("/api/options/agents", get(agents))
        .route("/api/options/security-analyzers", get(security_analyzers))
        .route("/api/settings", get(read).post(save))
        .route("/api/secrets", get(list_secrets).post(create_secret))
        .route(
            "/api/secrets/{name}",
            put(update_secret).delete(delete_secret),
        )
}

/// What OpenHands' UI reads at load: an open-source server without billing or sign-in.
#[utoipa::path(
    get, path = "/api/options/config", tag = "settings",
    responses((status = 200, body = crate::openapi::ClientConfig), crate::openapi::Errors)
)]
pub(crate) async fn config() -> Json<Value> {
    Json(json!({
        "APP_MODE": "oss",
        "GITHUB_CLIENT_ID": "",
        "POSTHOG_CLIENT_KEY": "",
        "FEATURE_FLAGS": {
            "ENABLE_BILLING": false,
            "HIDE_LLM_SETTINGS": false,
            "ENABLE_JIRA": false,
            "ENABLE_JIRA_DC": false,
            "ENABLE_LINEAR": false,
        },
    }))
}

#[utoipa::path(
    get, path = "/api/options/models", tag = "settings",
    responses((status = 200, body = Vec<String>), crate::openapi::Errors)
)]
pub(crate) async fn models(State(state): State<AppState>) -> Json<Vec<String>> {
    Json(state.llm_models.clone())
}

#[utoipa::path(
    get, path = "/api/options/agents", tag = "settings",
    responses((status = 200, body = Vec<String>), crate::openapi::Errors)
)]
pub(crate) async fn agents() -> Json<&'static [&'static str]> {
    Json(AGENTS)
}

/// None: this server runs no security analyzer.
#[utoipa::path(
    get, path = "/api/options/security-analyzers", tag = "settings",
    responses((status = 200, body = Vec<String>), crate::openapi::Errors)
)]
pub(crate) async fn security_analyzers() -> Json<Vec<String>> {
    Json(Vec::new())
}

/// A user's stored settings (OpenHands' `Settings`; every field optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub(crate) struct Settings {
    language: Option<String>,
    agent: Option<String>,
    max_iterations: Option<i64>,
    security_analyzer: Option<String>,
    confirmation_mode: Option<bool>,
    llm_model: Option<String>,
    /// Write-only: stored, read back as null.
    #[schema(value_type = Option<String>)]
    llm_api_key: Option<KeptSecret>,
    llm_base_url: Option<String>,
    remote_runtime_resource_factor: Option<i64>,
    enable_default_condenser: Option<bool>,
    enable_sound_notifications: Option<bool>,
    enable_proactive_conversation_starters: Option<bool>,
    enable_solvability_analysis: Option<bool>,
    user_consents_to_analytics: Option<bool>,
    sandbox_base_container_image: Option<String>,
    sandbox_runtime_container_image: Option<String>,
    #[schema(value_type = Option<Object>)]
    mcp_config: Option<Value>,
    #[schema(value_type = Option<String>)]
    search_api_key: Option<KeptSecret>,
    #[schema(value_type = Option<String>)]
    sandbox_api_key: Option<KeptSecret>,
    max_budget_per_task: Option<f64>,
    condenser_max_size: Option<i64>,
    email: Option<String>,
    email_verified: Option<bool>,
    git_user_name: Option<String>,
    git_user_email: Option<String>,
    v1_enabled: Option<bool>,
}

/// The fields a save keeps when the body has them `null` or absent (OpenHands' rule).
const KEPT_WHEN_ABSENT: &[&str] = &[
    "llm_api_key",
    "llm_model",
    "llm_base_url",
    "search_api_key",
    "user_consents_to_analytics",
];

async fn stored(state: &AppState, uid: &shared::id::UserId) -> Result<Option<Settings>, ApiError> {
    let mut redis = state.redis.clone();
    let raw: Option<String> = redis::cmd("GET")
        .arg(state.store.names().settings_key(uid))
        .query_async(&mut redis)
        .await?;
    raw.map(|s| {
        serde_json::from_str(&s)
            .map_err(|e| ApiError::Internal(format!("stored settings of {uid} unreadable: {e}")))
    })
    .transpose()
}

/// The LLM a new conversation of `uid` uses, from their settings (`None`: the worker's).
pub(crate) async fn llm_choice(
    state: &AppState,
    uid: &shared::id::UserId,
) -> Result<Option<LlmChoice>, ApiError> {
    let Some(s) = stored(state, uid).await? else {
        return Ok(None);
    };
    let choice = LlmChoice {
        model: s.llm_model.filter(|m| !m.is_empty()),
        base_url: s.llm_base_url.filter(|u| !u.is_empty()),
        api_key: s.llm_api_key,
    };
    Ok((choice != LlmChoice::default()).then_some(choice))
}

#[utoipa::path(
    get, path = "/api/settings", tag = "settings",
    responses((status = 200, body = crate::openapi::SettingsView), crate::openapi::Errors)
)]
pub(crate) async fn read(
    State(state): State<AppState>,
    Caller(uid): Caller,
) -> Result<Json<Value>, ApiError> {
    let s = stored(&state, &uid).await?.unwrap_or_else(|| Settings {
        language: Some("en".into()),
        agent: Some(AGENTS[0].into()),
        llm_model: state.llm_models.first().cloned(),
        confirmation_mode: Some(false),
        user_consents_to_analytics: Some(false),
        ..Settings::default()
    });
    let (llm_key_set, search_key_set) = (s.llm_api_key.is_some(), s.search_api_key.is_some());
    let mut v = serde_json::to_value(Settings {
        llm_api_key: None,
        search_api_key: None,
        sandbox_api_key: None,
        ..s
    })
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Value::Object(m) = &mut v {
        for (k, default) in [
            ("enable_default_condenser", true),
            ("enable_sound_notifications", false),
            ("enable_proactive_conversation_starters", true),
            ("enable_solvability_analysis", true),
            ("confirmation_mode", false),
            ("user_consents_to_analytics", false),
        ] {
            if m.get(k).is_none_or(Value::is_null) {
                m.insert(k.into(), json!(default));
            }
        }
        m.insert("secrets_store".into(), json!({"provider_tokens": {}}));
        m.insert("provider_tokens_set".into(), json!({}));
        m.insert("llm_api_key_set".into(), json!(llm_key_set));
        m.insert("search_api_key_set".into(), json!(search_key_set));
    }
    Ok(Json(v))
}

/// One field of `body`, typed: a 422 at `["body", field]` if it has the wrong type.
fn parse_settings(body: &Map<String, Value>) -> Result<Settings, ApiError> {
    let known = serde_json::to_value(Settings::default())
        .ok()
        .and_then(|v| v.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()))
        .unwrap_or_default();
    let mut fields = Map::new();
    for (k, v) in body {
        if !known.contains(k) {
            continue; // OpenHands ignores keys it does not know (the UI echoes GET-only ones)
        }
        let one: Map<String, Value> = [(k.clone(), v.clone())].into_iter().collect();
        serde_json::from_value::<Settings>(Value::Object(one))
            .map_err(|e| ApiError::invalid(&["body", k], e.to_string(), "type_error"))?;
        fields.insert(k.clone(), v.clone());
    }
    serde_json::from_value(Value::Object(fields)).map_err(|e| ApiError::body(&e))
}

fn check(s: &Settings) -> Result<(), ApiError> {
    if let Some(url) = s.llm_base_url.as_deref().filter(|u| !u.is_empty()) {
        let ok = url::Url::parse(url)
            .ok()
            .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            return Err(ApiError::invalid(
                &["body", "llm_base_url"],
                "llm_base_url must be an absolute http:// or https:// URL, e.g. https://api.example.com/v1",
                "value_error",
            ));
        }
    }
    if s.llm_model
        .as_deref()
        .is_some_and(|m| m.chars().count() > 256)
    {
        return Err(ApiError::invalid(
            &["body", "llm_model"],
            "llm_model must have at most 256 characters",
            "string_too_long",
        ));
    }
    if let Some(a) = s.agent.as_deref()
        && !AGENTS.contains(&a)
    {
        return Err(ApiError::invalid(
            &["body", "agent"],
            format!("this server runs the agents {AGENTS:?}"),
            "enum",
        ));
    }
    if s.condenser_max_size.is_some_and(|n| n < 20) {
        return Err(ApiError::invalid(
            &["body", "condenser_max_size"],
            "Value error, condenser_max_size must be at least 20",
            "value_error",
        ));
    }
    if s.max_iterations.is_some_and(|n| n < 1) || s.max_budget_per_task.is_some_and(|b| b < 0.0) {
        return Err(ApiError::invalid(
            &["body"],
            "max_iterations must be at least 1 and max_budget_per_task not negative",
            "value_error",
        ));
    }
    Ok(())
}

#[utoipa::path(
    post, path = "/api/settings", tag = "settings",
    request_body(content = Settings, content_type = "application/json"),
    responses((status = 200, body = crate::openapi::Message), crate::openapi::Errors)
)]
pub(crate) async fn save(
    State(state): State<AppState>,
    Caller(uid): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body?;
    require_json(&headers)?;
    let body: Map<String, Value> = serde_json::from_slice(&body).map_err(|e| ApiError::body(&e))?;
    let mut new = parse_settings(&body)?;
    if let Some(old) = stored(&state, &uid).await? {
        let absent = |k: &str| body.get(k).is_none_or(Value::is_null);
        for k in KEPT_WHEN_ABSENT {
            if absent(k) {
                match *k {
                    "llm_api_key" => new.llm_api_key.clone_from(&old.llm_api_key),
                    "llm_model" => new.llm_model.clone_from(&old.llm_model),
                    "llm_base_url" => new.llm_base_url.clone_from(&old.llm_base_url),
                    "search_api_key" => new.search_api_key.clone_from(&old.search_api_key),
                    _ => new.user_consents_to_analytics = old.user_consents_to_analytics,
                }
            }
        }
    }
    // An empty key clears it.
    new.llm_api_key = new.llm_api_key.filter(|k| !k.expose().is_empty());
    new.search_api_key = new.search_api_key.filter(|k| !k.expose().is_empty());
    new.sandbox_api_key = new.sandbox_api_key.filter(|k| !k.expose().is_empty());
    check(&new)?;
    let json = serde_json::to_string(&new).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut redis = state.redis.clone();
    redis::cmd("SET")
        .arg(state.store.names().settings_key(&uid))
        .arg(json)
        .query_async::<()>(&mut redis)
        .await?;
    info!(user_id = %uid, "settings stored");
    Ok(Json(json!({"message": "Settings stored"})))
}

// ---- custom secrets ----

#[derive(Debug, Serialize, Deserialize)]
struct KeptValue {
    value: KeptSecret,
    #[serde(default)]
    description: Option<String>,
}

/// The secret named in the path, checked.
pub(crate) struct SecretName(String);

impl FromRequestParts<AppState> for SecretName {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, ApiError> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        check_name(&name, &["path", "name"])?;
        Ok(SecretName(name))
    }
}

/// Secret names become environment variable names: 1-64 of `[A-Za-z0-9_]`, not starting with
/// a digit.
fn check_name(name: &str, loc: &[&str]) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            loc,
            "a secret name is 1-64 characters of A-Z, a-z, 0-9 and _, not starting with a digit",
            "value_error",
        ))
    }
}

fn message(code: StatusCode, key: &str, text: String) -> Response {
    (code, Json(json!({ key: text }))).into_response()
}

#[utoipa::path(
    get, path = "/api/secrets", tag = "settings",
    responses((status = 200, body = crate::openapi::SecretList), crate::openapi::Errors)
)]
pub(crate) async fn list_secrets(
    State(state): State<AppState>,
    Caller(uid): Caller,
) -> Result<Json<Value>, ApiError> {
    let mut redis = state.redis.clone();
    let all: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(state.store.names().secrets_key(&uid))
        .query_async(&mut redis)
        .await?;
    let mut out: Vec<Value> = all
        .into_iter()
        .map(|(name, raw)| {
            let description = serde_json::from_str::<KeptValue>(&raw)
                .ok()
                .and_then(|v| v.description)
                .unwrap_or_default();
            json!({"name": name, "description": description})
        })
        .collect();
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(Json(json!({ "custom_secrets": out })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct NewSecret {
    name: String,
    value: String,
    #[serde(default)]
    description: Option<String>,
}

#[utoipa::path(
    post, path = "/api/secrets", tag = "settings",
    request_body(content = NewSecret, content_type = "application/json"),
    responses((status = 201, body = crate::openapi::Message), crate::openapi::Errors)
)]
pub(crate) async fn create_secret(
    State(state): State<AppState>,
    Caller(uid): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    require_json(&headers)?;
    let s: NewSecret = serde_json::from_slice(&body).map_err(|e| ApiError::body(&e))?;
    check_name(&s.name, &["body", "name"])?;
    let kept = KeptValue {
        value: KeptSecret::new(s.value),
        description: Some(s.description.unwrap_or_default()),
    };
    let raw = serde_json::to_string(&kept).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut redis = state.redis.clone();
    let added: bool = redis::cmd("HSETNX")
        .arg(state.store.names().secrets_key(&uid))
        .arg(&s.name)
        .arg(raw)
        .query_async(&mut redis)
        .await?;
    Ok(if added {
        info!(user_id = %uid, name = s.name, "secret created");
        message(
            StatusCode::CREATED,
            "message",
            "Secret created successfully".into(),
        )
    } else {
        message(
            StatusCode::BAD_REQUEST,
            "message",
            format!("Secret {} already exists", s.name),
        )
    })
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct SecretUpdate {
    name: String,
    #[serde(default)]
    description: Option<String>,
}

/// Renames a secret and/or changes its description, atomically (its value is kept).
const RENAME: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
if ARGV[1] ~= ARGV[2] and redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return -1 end
redis.call('HDEL', KEYS[1], ARGV[1])
local o = cjson.decode(v)
o['description'] = ARGV[3]
redis.call('HSET', KEYS[1], ARGV[2], cjson.encode(o))
return 1
";

#[utoipa::path(
    put, path = "/api/secrets/{name}", tag = "settings", params(("name" = String, Path)),
    request_body(content = SecretUpdate, content_type = "application/json"),
    responses((status = 200, body = crate::openapi::Message), crate::openapi::Errors)
)]
pub(crate) async fn update_secret(
    State(state): State<AppState>,
    Caller(uid): Caller,
    SecretName(old): SecretName,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    require_json(&headers)?;
    let u: SecretUpdate = serde_json::from_slice(&body).map_err(|e| ApiError::body(&e))?;
    check_name(&u.name, &["body", "name"])?;
    let mut redis = state.redis.clone();
    let done: i64 = redis::Script::new(RENAME)
        .key(state.store.names().secrets_key(&uid))
        .arg(&old)
        .arg(&u.name)
        .arg(u.description.unwrap_or_default())
        .invoke_async(&mut redis)
        .await?;
    Ok(match done {
        1 => message(
            StatusCode::OK,
            "message",
            "Secret updated successfully".into(),
        ),
        -1 => message(
            StatusCode::BAD_REQUEST,
            "message",
            format!("Secret {} already exists", u.name),
        ),
        _ => message(
            StatusCode::NOT_FOUND,
            "error",
            format!("Secret with ID {old} not found"),
        ),
    })
}

#[utoipa::path(
    delete, path = "/api/secrets/{name}", tag = "settings", params(("name" = String, Path)),
    responses((status = 200, body = crate::openapi::Message), crate::openapi::Errors)
)]
pub(crate) async fn delete_secret(
    State(state): State<AppState>,
    Caller(uid): Caller,
    SecretName(name): SecretName,
) -> Result<Response, ApiError> {
    let mut redis = state.redis.clone();
    let removed: i64 = redis::cmd("HDEL")
        .arg(state.store.names().secrets_key(&uid))
        .arg(&name)
        .query_async(&mut redis)
        .await?;
    Ok(if removed == 1 {
        message(
            StatusCode::OK,
            "message",
            "Secret deleted successfully".into(),
        )
    } else {
        message(
            StatusCode::NOT_FOUND,
            "error",
            format!("Secret with ID {name} not found"),
        )
    })
}
