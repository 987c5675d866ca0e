//! A conversation's workspace, as OpenHands' UI reads it: `list-files`, `select-file`,
//! `upload-files`, `git/changes` and `microagents` (see [`shared::files`]).
//!
//! While a worker runs the session, the gateway asks it (core-NATS request to
//! `{ns}.wsq.{owner}.{sid}`, [`ANSWER_WITHIN`]) and returns its answer as it is; an answer
//! "not the owner" (the session moved) makes it read the owner once more. When no worker runs
//! it, files are listed and read from the session's latest workspace snapshot; uploads, git
//! changes and microagents need the running session (a clear 409 says so).

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Multipart, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use shared::files::{FilesReply, FilesRequest, NOT_OWNER, UploadFile};
use shared::id::SessionId;
use shared::snapshot::Entry;
use tracing::warn;

use crate::app::AppState;
use crate::http::{ApiError, Caller, ConvId, meta_of};

/// Longest wait for the owning worker's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/conversations/{id}/list-files", get(list_files))
        .route("/api/conversations/{id}/select-file", get(select_file))
        .route("/api/conversations/{id}/upload-files", post(upload_files))
        .route("/api/conversations/{id}/git/changes", get(git_changes))
        .route("/api/conversations/{id}/microagents", get(microagents))
}

fn reply(r: FilesReply) -> Response {
    let code = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    (code, Json(r.body)).into_response()
}

/// Asks the session's owner; `None` when no worker runs it. A payload stored out of line (a
/// large upload) is stored once; the owner deletes it once read, this function when no owner
/// read it.
async fn ask_owner(
    state: &AppState,
    sid: &SessionId,
    req: &FilesRequest,
) -> Result<Option<FilesReply>, ApiError> {
    let mut packed = None;
    let res = ask_owner_packed(state, sid, req, &mut packed).await;
    if let (Some((headers, _)), Ok(None) | Err(_)) = (&packed, &res)
        && let Err(e) = state.store.delete_payload_blob(headers).await
    {
        warn!(session_id = %sid, error = %e, "unread workspace query blob not deleted");
    }
    res
}

async fn ask_owner_packed(
    state: &AppState,
    sid: &SessionId,
    req: &FilesRequest,
    packed: &mut Option<(async_nats::HeaderMap, bytes::Bytes)>,
) -> Result<Option<FilesReply>, ApiError> {
    let payload =
        bytes::Bytes::from(serde_json::to_vec(req).map_err(|e| ApiError::Internal(e.to_string()))?);
    for _ in 0..2 {
        let mut redis = state.redis.clone();
        let Some(owner) = shared::ownership::owner(&mut redis, state.store.names(), sid).await?
        else {
            return Ok(None);
        };
        let (headers, body) = match packed {
            Some(p) => p.clone(),
            None => {
                let mut headers = async_nats::HeaderMap::new();
                let body = state.store.pack(sid, payload.clone(), &mut headers).await?;
                packed.insert((headers, body)).clone()
            }
        };
        let subject = state.store.names().files_subject(&owner, sid);
        let asked = tokio::time::timeout(
            ANSWER_WITHIN,
            state.nats.request_with_headers(subject, headers, body),
        )
        .await;
        let msg = match asked {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                warn!(session_id = %sid, worker_id = owner, error = %e, "workspace query failed");
                return Ok(Some(FilesReply::error(
                    503,
                    "the worker running this conversation did not answer; retry",
                )));
            }
            Err(_) => {
                return Ok(Some(FilesReply::error(
                    504,
                    "the worker running this conversation did not answer within 10 s",
                )));
            }
        };
        let r: FilesReply = serde_json::from_slice(&msg.payload)
            .map_err(|e| ApiError::Internal(format!("workspace answer unreadable: {e}")))?;
        if r.status != NOT_OWNER {
            return Ok(Some(r));
        }
    }
    Ok(Some(FilesReply::error(
        503,
        "the conversation is moving to another worker; retry",
    )))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    path: Option<String>,
}

#[utoipa::path(
    get, path = "/api/conversations/{id}/list-files", tag = "workspace",
    params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)"), ("path" = Option<String>, Query)),
    responses((status = 200, body = Vec<String>), crate::openapi::Errors)
)]
pub(crate) async fn list_files(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    meta_of(&state, &uid, &sid).await?;
    let req = FilesRequest::List {
        path: q.path.clone(),
    };
    if let Some(r) = ask_owner(&state, &sid, &req).await? {
        return Ok(reply(r));
    }
    Ok(reply(
        from_snapshot(&state, &sid, Lookup::List(q.path.as_deref())).await?,
    ))
}

#[derive(Debug, Deserialize)]
pub(crate) struct FileQuery {
    file: Option<String>,
}

#[utoipa::path(
    get, path = "/api/conversations/{id}/select-file", tag = "workspace",
    params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)"), ("file" = String, Query)),
    responses((status = 200, body = crate::openapi::FileContent), crate::openapi::Errors)
)]
pub(crate) async fn select_file(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let Some(file) = q.file else {
        return Err(ApiError::invalid(
            &["query", "file"],
            "Field required",
            "missing",
        ));
    };
    meta_of(&state, &uid, &sid).await?;
    let req = FilesRequest::Read { file: file.clone() };
    if let Some(r) = ask_owner(&state, &sid, &req).await? {
        return Ok(reply(r));
    }
    Ok(reply(
        from_snapshot(&state, &sid, Lookup::Read(&file)).await?,
    ))
}

/// Most files of one upload.
const MAX_UPLOAD_FILES: usize = 100;

#[utoipa::path(
    post, path = "/api/conversations/{id}/upload-files", tag = "workspace", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    request_body(content = crate::openapi::UploadForm, content_type = "multipart/form-data"),
    responses((status = 200, body = crate::openapi::Uploaded), crate::openapi::Errors)
)]
pub(crate) async fn upload_files(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::invalid(
            &["body"],
            format!("a multipart/form-data body is expected: {e}"),
            "missing",
        )
    })?;
    meta_of(&state, &uid, &sid).await?;
    let mut files = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return Err(ApiError::invalid(
                    &["body", "files"],
                    e.body_text(),
                    "value_error",
                ));
            }
        };
        if field.name() != Some("files") {
            continue;
        }
        let name = field.file_name().unwrap_or_default().to_owned();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError::invalid(&["body", "files"], e.body_text(), "value_error"))?;
        files.push(UploadFile {
            name,
            content_b64: base64::engine::general_purpose::STANDARD.encode(&bytes),
        });
        if files.len() > MAX_UPLOAD_FILES {
            return Err(ApiError::invalid(
                &["body", "files"],
                format!("at most {MAX_UPLOAD_FILES} files per upload"),
                "too_long",
            ));
        }
    }
    if files.is_empty() {
        return Err(ApiError::invalid(
            &["body", "files"],
            "Field required",
            "missing",
        ));
    }
    match ask_owner(&state, &sid, &FilesRequest::Upload { files }).await? {
        Some(r) => Ok(reply(r)),
        None => Ok(not_running("upload files")),
    }
}

#[utoipa::path(
    get, path = "/api/conversations/{id}/git/changes", tag = "workspace", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    responses((status = 200, body = Vec<crate::openapi::GitChange>), crate::openapi::Errors)
)]
pub(crate) async fn git_changes(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
) -> Result<Response, ApiError> {
    meta_of(&state, &uid, &sid).await?;
    match ask_owner(&state, &sid, &FilesRequest::GitChanges).await? {
        Some(r) => Ok(reply(r)),
        None => Ok(not_running("see its git changes")),
    }
}

#[utoipa::path(
    get, path = "/api/conversations/{id}/microagents", tag = "workspace", params(("id" = String, Path, description = "Conversation id (1-64 of A-Z, a-z, 0-9, _ and -)")),
    responses((status = 200, body = crate::openapi::Microagents), crate::openapi::Errors)
)]
pub(crate) async fn microagents(
    State(state): State<AppState>,
    Caller(uid): Caller,
    ConvId(sid): ConvId,
) -> Result<Response, ApiError> {
    meta_of(&state, &uid, &sid).await?;
    match ask_owner(&state, &sid, &FilesRequest::Microagents).await? {
        Some(r) => Ok(reply(r)),
        None => Ok(not_running("see its microagents")),
    }
}

fn not_running(what: &str) -> Response {
    reply(FilesReply::error(
        409,
        format!("The conversation is not running: start it to {what}"),
    ))
}

enum Lookup<'a> {
    List(Option<&'a str>),
    Read(&'a str),
}

/// Lists or reads from the session's latest workspace snapshot.
async fn from_snapshot(
    state: &AppState,
    sid: &SessionId,
    what: Lookup<'_>,
) -> Result<FilesReply, ApiError> {
    let asked = match &what {
        Lookup::List(p) => p.unwrap_or_default(),
        Lookup::Read(f) => f,
    };
    let parts = match shared::files::relative_parts(asked) {
        Ok(p) => p,
        Err(e) => return Ok(FilesReply::error(400, e.to_string())),
    };
    let head = state.store.snapshot_head(sid).await?;
    let body = match head {
        Some((_, head)) if head.has_snapshot() => state.store.get_body(sid, &head).await?,
        _ => Default::default(),
    };
    let target = parts.join("/");
    // No component may be a link (as the worker answers).
    for i in 1..=parts.len() {
        let prefix = parts[..i].join("/");
        if body
            .entries
            .iter()
            .any(|e| matches!(e, Entry::Link { .. }) && e.path().0 == prefix.as_bytes())
        {
            return Ok(FilesReply::error(
                400,
                format!("{asked}: a symbolic link is not followed"),
            ));
        }
    }
    match what {
        Lookup::List(path) => {
            let entries = body.entries.iter().filter_map(|e| {
                let p = std::str::from_utf8(&e.path().0).ok()?;
                let (parent, name) = p.rsplit_once('/').unwrap_or(("", p));
                (parent == target).then(|| (name.to_owned(), matches!(e, Entry::Dir { .. })))
            });
            Ok(FilesReply::ok(json!(shared::files::listing(path, entries))))
        }
        Lookup::Read(file) => {
            let Some(Entry::File { size, chunks, .. }) = body
                .entries
                .iter()
                .find(|e| e.path().0 == target.as_bytes())
            else {
                return Ok(FilesReply::error(404, format!("File not found: {file}")));
            };
            if *size > shared::files::MAX_READ_BYTES {
                return Ok(FilesReply::error(
                    413,
                    format!("{file} holds {size} bytes; at most 10 MiB are shown"),
                ));
            }
            let mut bytes = Vec::with_capacity(usize::try_from(*size).unwrap_or(0));
            for sha in chunks {
                bytes.extend_from_slice(&state.store.get_chunk(sid, sha).await?);
            }
            Ok(match shared::files::text_of(&bytes) {
                Some(text) => FilesReply::ok(json!({ "code": text })),
                None => FilesReply::error(415, format!("Unable to open binary file: {file}")),
            })
        }
    }
}
