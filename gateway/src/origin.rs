//! The browser boundary: which web origins may call the gateway, and under which host names it
//! answers. It closes two ways a web page the user visits could drive the gateway:
//!
//! - **Cross-origin requests** (a page on `evil.example` posting to `127.0.0.1:3000`, or
//!   opening a Socket.IO connection to it): a request with an `Origin` header is served only if
//!   that origin is the gateway's own (the `Host` it was called by), a loopback origin
//!   (`localhost`, `127.0.0.0/8`, `[::1]`), or listed in `OH_ALLOWED_ORIGINS`. The literal
//!   origin `null` (sandboxed frames, files) is refused.
//! - **DNS rebinding** (`evil.example` re-resolved to `127.0.0.1`, so the page is "same
//!   origin"): the `Host` header must be an IP literal, `localhost`, or the host of an allowed
//!   origin. A deployment reached by name lists its public origin, e.g.
//!   `OH_ALLOWED_ORIGINS=https://oh.example.com`.
//!
//! `OH_ALLOWED_ORIGINS=*` turns both checks off (every origin, every host). Health probes
//! (`/healthz`, `/readyz`) and `/metrics` are exempt: they carry no user data and are called by
//! internal names. Non-browser clients send no `Origin` and call by address or an allowed name.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::debug;

/// The parsed `OH_ALLOWED_ORIGINS`.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins {
    /// `*`: no checks.
    any: bool,
    /// Allowed origins, lowercased `scheme://host[:port]`.
    origins: Vec<String>,
    /// Their host names (lowercased, no port): also accepted as `Host`.
    hosts: Vec<String>,
}

impl AllowedOrigins {
    /// Parses a comma-separated list of origins (`scheme://host[:port]`), or `*`.
    ///
    /// # Errors
    /// A message naming the entry that is not an origin.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                out.any = true;
                continue;
            }
            let lower = entry.to_ascii_lowercase();
            let host = lower
                .strip_prefix("http://")
                .or_else(|| lower.strip_prefix("https://"))
                .filter(|rest| !rest.is_empty() && !rest.contains('/'))
                .ok_or_else(|| {
                    format!("{entry:?} is not an origin (scheme://host[:port], no path)")
                })?;
            out.hosts.push(host_name(host).to_owned());
            out.origins.push(lower);
        }
        Ok(out)
    }

    /// Whether the gateway answers under this `Host` header.
    fn host_ok(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        self.any
            || is_localhost(&name)
            || name.parse::<IpAddr>().is_ok()
            || self.hosts.contains(&name)
    }

    /// Whether a request from `origin` to the gateway called as `host` is served.
    fn origin_ok(&self, origin: &str, host: Option<&str>) -> bool {
        if self.any {
            return true;
        }
        let origin = origin.to_ascii_lowercase();
        let Some(authority) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false; // `null`, or not a web origin
        };
        let same = host.is_some_and(|h| h.eq_ignore_ascii_case(authority));
        let name = host_name(authority);
        let loopback =
            is_localhost(name) || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        same || loopback || self.origins.contains(&origin)
    }
}

/// clap value parser for [`AllowedOrigins`].
///
/// # Errors
/// See [`AllowedOrigins::parse`].
pub fn parse_allowed_origins(s: &str) -> Result<AllowedOrigins, String> {
    AllowedOrigins::parse(s)
}

/// The host name of `host[:port]` or `[v6]:port` (brackets removed).
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// `localhost` and its subdomains, which resolve to loopback only. (Any IP literal is a safe
/// `Host`, since it cannot be rebound; only a loopback one is a local origin.)
fn is_localhost(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost")
}

/// Refuses a request from a foreign origin or under a foreign host name (see the module doc).
pub(crate) async fn guard(allowed: Arc<AllowedOrigins>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return next.run(req).await;
    }
    match refusal(&allowed, req.headers()) {
        None => next.run(req).await,
        Some(message) => {
            debug!(path, message, "refused by the origin/host check");
            metrics::counter!("oh_gateway_origin_refusals_total").increment(1);
            let body = json!({"status": "error", "message": message});
            (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
        }
    }
}

fn refusal(allowed: &AllowedOrigins, headers: &HeaderMap) -> Option<String> {
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
    let host = text(header::HOST);
    if let Some(host) = host
        && !allowed.host_ok(host)
    {
        return Some(format!(
            "host {host:?} is not served; list the gateway's origin in OH_ALLOWED_ORIGINS"
        ));
    }
    match text(header::ORIGIN) {
        Some(origin) if !allowed.origin_ok(origin, host) => Some(format!(
            "origin {origin:?} is not allowed; list it in OH_ALLOWED_ORIGINS"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(allowed: &str, host: Option<&str>, origin: Option<&str>) -> bool {
        let mut h = HeaderMap::new();
        if let Some(host) = host {
            h.insert(header::HOST, host.parse().unwrap());
        }
        if let Some(origin) = origin {
            h.insert(header::ORIGIN, origin.parse().unwrap());
        }
        refusal(&AllowedOrigins::parse(allowed).unwrap(), &h).is_some()
    }

    #[test]
    fn default_serves_local_and_same_origin_only() {
        for (host, origin) in [
            (Some("127.0.0.1:3000"), None),
            (Some("localhost:3000"), Some("http://localhost:3000")),
            (Some("127.0.0.1:3000"), Some("http://127.0.0.1:3000")),
            (Some("127.0.0.1:3000"), Some("http://localhost:5173")), // a local dev server
            (Some("[::1]:3000"), Some("http://[::1]:3000")),
            (Some("10.0.0.5:3000"), Some("http://10.0.0.5:3000")), // same origin by address
            (None, None),
        ] {
            assert!(!refused("", host, origin), "{host:?} {origin:?}");
        }
        for (host, origin) in [
            (Some("127.0.0.1:3000"), Some("http://evil.example")),
            (Some("127.0.0.1:3000"), Some("null")),
            (Some("127.0.0.1:3000"), Some("http://10.1.2.3")), // another machine's page
            (Some("evil.example:3000"), Some("http://evil.example:3000")), // rebinding
            (Some("evil.example:3000"), None),
        ] {
            assert!(refused("", host, origin), "{host:?} {origin:?}");
        }
    }

    #[test]
    fn listed_origins_and_their_hosts_are_served() {
        let list = "https://oh.example.com, http://ui.example:8080";
        assert!(!refused(
            list,
            Some("oh.example.com"),
            Some("https://oh.example.com")
        ));
        assert!(!refused(
            list,
            Some("127.0.0.1:3000"),
            Some("http://ui.example:8080")
        ));
        assert!(refused(
            list,
            Some("127.0.0.1:3000"),
            Some("http://ui.example:9090")
        ));
        assert!(refused(list, Some("other.example"), None));
        assert!(!refused(
            "*",
            Some("any.example"),
            Some("http://evil.example")
        ));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["oh.example.com", "ftp://x", "https://x/path", "https://"] {
            assert!(AllowedOrigins::parse(bad).is_err(), "{bad}");
        }
    }
}
