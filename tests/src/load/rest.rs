//! The REST calls the load tool makes: create a conversation, read its info and its stored
//! events (paged). Every failure is an [`RestError`], never a panic: the gateway is external
//! data.

use std::time::Duration;

use serde_json::{Value, json};
use shared::event::Event;

/// A failed REST call.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// Transport failure or timeout.
    #[error("{what}: {source}")]
    Http {
        /// Which call.
        what: &'static str,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// A non-200 answer or a body of the wrong shape.
    #[error("{what}: {detail}")]
    Bad {
        /// Which call.
        what: &'static str,
        /// Status and body, clipped.
        detail: String,
    },
}

impl RestError {
    /// Error counter name.
    pub fn kind(&self) -> String {
        match self {
            RestError::Http { what, .. } => format!("rest_{what}_http"),
            RestError::Bad { what, .. } => format!("rest_{what}_bad"),
        }
    }
}

/// REST client for a set of gateways (round-robin by index).
#[derive(Debug, Clone)]
pub struct Rest {
    http: reqwest::Client,
    token: Option<String>,
}

fn clip(s: &str) -> &str {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Rest {
    /// A client with a 60 s per-request timeout.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(token: Option<String>) -> Result<Rest, RestError> {
        crate::ensure_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build()
            .map_err(|source| RestError::Http {
                what: "client",
                source,
            })?;
        Ok(Rest { http, token })
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn json(
        &self,
        what: &'static str,
        r: reqwest::RequestBuilder,
    ) -> Result<Value, RestError> {
        let resp = self
            .auth(r)
            .send()
            .await
            .map_err(|source| RestError::Http { what, source })?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|source| RestError::Http { what, source })?;
        if !status.is_success() {
            return Err(RestError::Bad {
                what,
                detail: format!("status {status}: {}", clip(&body)),
            });
        }
        serde_json::from_str(&body).map_err(|e| RestError::Bad {
            what,
            detail: format!("not JSON ({e}): {}", clip(&body)),
        })
    }

    /// `POST /api/conversations`; returns the new id.
    ///
    /// # Errors
    /// Transport failure, non-200, or no `conversation_id`.
    pub async fn create(&self, base: &str, initial: Option<&str>) -> Result<String, RestError> {
        let body = match initial {
            Some(m) => json!({"initial_user_msg": m}),
            None => json!({}),
        };
        let v = self
            .json(
                "create",
                self.http
                    .post(format!("{base}/api/conversations"))
                    .json(&body),
            )
            .await?;
        v["conversation_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| RestError::Bad {
                what: "create",
                detail: format!("no conversation_id in {}", clip(&v.to_string())),
            })
    }

    /// `GET /api/conversations/{id}`.
    ///
    /// # Errors
    /// Transport failure or non-200.
    pub async fn info(&self, base: &str, id: &str) -> Result<Value, RestError> {
        self.json(
            "info",
            self.http.get(format!("{base}/api/conversations/{id}")),
        )
        .await
    }

    /// Id of the newest stored event (`-1` if none).
    ///
    /// # Errors
    /// Transport failure, non-200 or a malformed page.
    pub async fn head(&self, base: &str, id: &str) -> Result<i64, RestError> {
        let v = self
            .json(
                "events",
                self.http.get(format!(
                    "{base}/api/conversations/{id}/events?reverse=true&limit=1"
                )),
            )
            .await?;
        Ok(v["events"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|e| e["id"].as_i64())
            .unwrap_or(-1))
    }

    /// Every stored event, parsed, in id order (pages of 100).
    ///
    /// # Errors
    /// Transport failure, non-200, a malformed page or an event that does not parse.
    pub async fn events(&self, base: &str, id: &str) -> Result<Vec<Event>, RestError> {
        let mut out = Vec::new();
        let mut start = 0u64;
        // Bounded: at most 100,000 pages (10 M events).
        for _ in 0..100_000 {
            let v = self
                .json(
                    "events",
                    self.http.get(format!(
                        "{base}/api/conversations/{id}/events?start_id={start}&limit=100"
                    )),
                )
                .await?;
            let Some(page) = v["events"].as_array() else {
                return Err(RestError::Bad {
                    what: "events",
                    detail: "no events array".to_owned(),
                });
            };
            for raw in page {
                let ev = Event::from_value(raw.clone()).map_err(|e| RestError::Bad {
                    what: "events",
                    detail: format!("stored event does not parse: {e}"),
                })?;
                out.push(ev);
            }
            match out.last().and_then(|e| e.id) {
                Some(last) => start = last + 1,
                None => return Ok(out),
            }
            if !v["has_more"].as_bool().unwrap_or(false) || page.is_empty() {
                return Ok(out);
            }
        }
        Ok(out)
    }
}
