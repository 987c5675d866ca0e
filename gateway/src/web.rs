//! The web UI served at `/`, from the gateway's own origin. Two modes, chosen at startup:
//!
//! - **Built-in page** (`OH_WEB_ROOT` unset): `GET /` answers `gateway/web/index.html`,
//!   compiled into the binary (one file, no third-party code): list, create, open, stop and
//!   resume conversations, chat, every `oh_event` shown once (deduplicated by event id across
//!   reloads and reconnects), over a minimal Socket.IO v4 client of its own.
//! - **A built single-page app** (`OH_WEB_ROOT=<folder>`, e.g. the OpenHands frontend's
//!   build): its files are served (tower-http's `ServeDir`, which refuses paths leaving the
//!   folder), and any other path gets its `index.html` with 200, so the app's client-side
//!   routes (`/conversations/abc`) survive a reload. A folder without `index.html` is a
//!   configuration error at startup ([`parse_web_root`]).
//!
//! **Invariant:** the UI never shadows the gateway's own paths: `/api/...`, `/socket.io/...`,
//! `/healthz`, `/readyz` and `/metrics` are never answered with a file or `index.html`; an
//! unknown one is a JSON 404 (`{"detail": "Not Found"}`, FastAPI's). HTML answers carry
//! `Cache-Control: no-cache`, so a new deployment's page is picked up at once.
//!
//! The page calls the API and opens its socket on the origin it was loaded from, which
//! `origin` serves (an `Origin` equal to the `Host` it was called by). A deployment reached by
//! a host name must list that name's origin in `OH_ALLOWED_ORIGINS` anyway (DNS rebinding),
//! and then the page works under it too.

use std::path::{Path, PathBuf};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tower::ServiceExt;
use tower_http::services::{ServeDir, ServeFile};

/// The environment variable naming the folder of a built single-page app.
const WEB_ROOT_ENV: &str = "OH_WEB_ROOT";

/// The built-in page.
const BUILT_IN_PAGE: &str = include_str!("../web/index.html");

/// Path prefixes that belong to the gateway, never to the UI.
const GATEWAY_PREFIXES: [&str; 2] = ["/api", "/socket.io"];
/// Exact paths that belong to the gateway.
const GATEWAY_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Which UI the gateway serves.
#[derive(Debug)]
pub(crate) enum Web {
    /// `gateway/web/index.html` at `/`.
    BuiltIn,
    /// The files of this folder (checked by [`parse_web_root`]), `index.html` for any other
    /// path.
    Root(PathBuf),
}

impl Web {
    /// The UI for a checked web root (see [`parse_web_root`]), or the built-in page.
    pub(crate) fn new(root: Option<PathBuf>) -> Self {
        root.map_or(Web::BuiltIn, Web::Root)
    }
}

/// Checks a web root: an existing folder holding an `index.html` file. Returns it made
/// absolute, so the files served do not depend on the working directory.
///
/// # Errors
/// A message naming `OH_WEB_ROOT` and saying what is wrong with the folder (also as a clap
/// value parser).
pub(crate) fn parse_web_root(s: &str) -> Result<PathBuf, String> {
    let path = Path::new(s);
    let meta = std::fs::metadata(path).map_err(|e| format!("{WEB_ROOT_ENV} {s:?}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("{WEB_ROOT_ENV} {s:?} is not a folder"));
    }
    let root = std::fs::canonicalize(path).map_err(|e| format!("{WEB_ROOT_ENV} {s:?}: {e}"))?;
    if !root.join("index.html").is_file() {
        return Err(format!(
            "{WEB_ROOT_ENV} {s:?} has no index.html (the entry page of the app to serve)"
        ));
    }
    Ok(root)
}

/// The UI's routes, to merge into the gateway's router. The built-in page adds only `GET /`;
/// a web root adds `/` and a catch-all, which axum matches after every more specific route,
/// so the REST routes keep precedence and no router-wide fallback is taken.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>(web: Web) -> Router<S> {
    match web {
        Web::BuiltIn => Router::new().route("/", get(built_in_page)),
        Web::Root(root) => {
            tracing::info!(web_root = %root.display(), "serving the web app of OH_WEB_ROOT at /");
            let index = root.join("index.html");
            let files = ServeDir::new(root).fallback(ServeFile::new(index));
            let serve = move |req: Request| serve_file(files.clone(), req);
            Router::new()
                .route("/", any(serve.clone()))
                .route("/{*path}", any(serve))
        }
    }
}

async fn built_in_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        BUILT_IN_PAGE,
    )
        .into_response()
}

/// Whether `path` belongs to the gateway rather than to the UI.
fn is_gateway_path(path: &str) -> bool {
    GATEWAY_PATHS.contains(&path)
        || GATEWAY_PREFIXES.iter().any(|p| {
            path.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}

async fn serve_file(files: ServeDir<ServeFile>, req: Request) -> Response {
    if is_gateway_path(req.uri().path()) {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"detail": "Not Found"})),
        )
            .into_response();
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response();
    }
    let mut res = match files.oneshot(req).await {
        Ok(res) => res.into_response(),
        Err(never) => match never {},
    };
    let html = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if html {
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_paths_are_never_the_ui() {
        for p in [
            "/api",
            "/api/",
            "/api/nope",
            "/api/conversations/x/y",
            "/socket.io",
            "/socket.io/",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(is_gateway_path(p), "{p}");
        }
        for p in [
            "/",
            "/app.js",
            "/apis",
            "/api.js",
            "/conversations/abc",
            "/healthz/x",
            "/metrics.html",
        ] {
            assert!(!is_gateway_path(p), "{p}");
        }
    }

    #[test]
    fn a_web_root_needs_a_folder_with_index_html() {
        let dir = std::env::temp_dir().join(format!("oh-web-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir); // left over by an earlier run, or absent
        std::fs::create_dir_all(&dir).unwrap();
        let s = dir.to_str().unwrap();
        assert!(parse_web_root(s).unwrap_err().contains("no index.html"));
        std::fs::write(dir.join("index.html"), "<p>app</p>").unwrap();
        assert_eq!(parse_web_root(s).unwrap(), dir.canonicalize().unwrap());
        let file = dir.join("index.html");
        assert!(
            parse_web_root(file.to_str().unwrap())
                .unwrap_err()
                .contains("not a folder")
        );
        assert!(parse_web_root(dir.join("missing").to_str().unwrap()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_built_in_page_is_one_self_contained_file() {
        assert!(BUILT_IN_PAGE.starts_with("<!doctype html>"));
        // No third-party code: nothing is loaded from anywhere else (the icon is a data URL,
        // so the browser does not ask for `/favicon.ico`).
        assert!(BUILT_IN_PAGE.contains(r#"<link rel="icon" href="data:,">"#));
        for outside in [
            "<script src",
            "stylesheet",
            "@import",
            "url(",
            "http://",
            "https://",
        ] {
            assert!(!BUILT_IN_PAGE.contains(outside), "{outside}");
        }
    }
}
