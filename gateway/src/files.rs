//! A conversation's workspace, as OpenHands' UI reads it: file list, file contents, uploads,
//! git changes and microagents, answered by the session's owning worker over NATS.

use axum::Router;

use crate::app::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
}
