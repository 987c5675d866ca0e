//! Router tests: REST validation driven through the gateway's real router with `oneshot`
//! (no listener), against real NATS and Redis started per test. Each case asserts the status
//! code and the JSON error body.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use clap::Parser;
use serde_json::{Value, json};
use tests::nats::NatsServer;
use tests::redis::RedisServer;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const ALICE: &str = "alice-token";
const BOB: &str = "bob-token";

/// A gateway router on its own NATS and Redis; its tasks stop when this is dropped.
struct Gw {
    router: Router,
    cancel: CancellationToken,
    nats: NatsServer,
    _redis: RedisServer,
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Gw {
    async fn start() -> Gw {
        Gw::start_with(&[]).await
    }

    async fn start_with(extra: &[&str]) -> Gw {
        let (nats, redis) = tokio::join!(NatsServer::start(), RedisServer::start());
        let tokens = format!("{ALICE}=alice,{BOB}=bob");
        let (nats_url, redis_url) = (nats.url(), redis.url());
        let mut argv = vec![
            "gateway",
            "--nats-url",
            &nats_url,
            "--redis-url",
            &redis_url,
            "--auth-tokens",
            &tokens,
        ];
        argv.extend_from_slice(extra);
        let args = gateway::Args::try_parse_from(argv).expect("arguments");
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let cancel = CancellationToken::new();
        let router = gateway::router(&args, metrics, &cancel)
            .await
            .expect("gateway router");
        Gw {
            router,
            cancel,
            nats,
            _redis: redis,
        }
    }

    /// Sends one request; returns the status and the body as JSON (`Null` if empty, a string
    /// if not JSON).
    async fn call(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let code = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (code, body)
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.call(request("GET", path, token, None, Body::empty()))
            .await
    }

    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> (StatusCode, Value) {
        self.call(request("POST", path, token, content_type, body.into()))
            .await
    }

    /// Creates a conversation for `token`'s user; returns its id.
    async fn create(&self, token: &str) -> String {
        let (code, v) = self
            .post("/api/conversations", Some(token), Some(JSON), "{}")
            .await;
        assert_eq!(code, StatusCode::OK, "{v}");
        v["conversation_id"].as_str().expect("id").to_owned()
    }
}

const JSON: &str = "application/json";

fn request(
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Body,
) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    b.body(body).expect("request")
}

/// `{"detail": "..."}` or FastAPI's `{"detail": [{"loc", "msg", "type"}]}` contains `needle`.
fn detail_mentions(v: &Value, needle: &str) -> bool {
    match &v["detail"] {
        Value::String(d) => d.contains(needle),
        Value::Array(errors) => errors
            .iter()
            .any(|e| e["msg"].as_str().is_some_and(|m| m.contains(needle))),
        _ => false,
    }
}

/// A FastAPI `HTTPValidationError`: one error at `loc` of pydantic type `kind`.
fn assert_validation_error(v: &Value, loc: &[&str], kind: &str) {
    let errors = v["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("detail is no list: {v}"));
    assert_eq!(errors.len(), 1, "{v}");
    assert_eq!(errors[0]["loc"], json!(loc), "{v}");
    assert_eq!(errors[0]["type"], kind, "{v}");
    assert!(
        errors[0]["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_validates_body_and_content_type() {
    let gw = Gw::start().await;
    let create = |ct: Option<&'static str>, body: &'static str| {
        gw.post("/api/conversations", Some(ALICE), ct, body)
    };

    let (code, v) = create(Some(JSON), "{not json").await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(detail_mentions(&v, "key must be a string"), "{v}");

    let (code, v) = create(Some(JSON), r#"{"initial_user_msg": "hi", "colour": 1}"#).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(detail_mentions(&v, "unknown field `colour`"), "{v}");

    let (code, v) = create(Some(JSON), r#"{"initial_user_msg": 5}"#).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(detail_mentions(&v, "invalid type"), "{v}");

    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let (code, v) = create(Some(ct), r#"{"initial_user_msg": "hi"}"#).await;
        assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}: {v}");
        assert_eq!(
            v,
            json!({"detail": "Content-Type must be application/json"})
        );
    }

    let (code, v) = create(Some(JSON), r#"{"conversation_id": "abc"}"#).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["status"], "error");
    assert!(
        v["message"].as_str().unwrap().contains("conversation_id"),
        "{v}"
    );

    let (code, v) = create(
        Some(JSON),
        r#"{"replay_json": "[]", "initial_user_msg": "x"}"#,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("replay_json"),
        "{v}"
    );

    let (code, v) = create(Some(JSON), r#"{"replay_json": "not a trajectory"}"#).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("invalid replay_json"),
        "{v}"
    );

    // Trajectories that could never start (issue 12's poison start): empty, or the agent's
    // action first. Refused at creation with the reason, nothing queued.
    let agent_first = serde_json::to_string(&serde_json::json!([
        {"id": 1, "source": "agent", "action": "run",
         "args": {"command": "ls", "is_input": false, "thought": ""}, "message": "ls"}
    ]))
    .unwrap();
    for replay in ["[]".to_owned(), agent_first] {
        let body = serde_json::json!({ "replay_json": replay }).to_string();
        let (code, v) = gw
            .post("/api/conversations", Some(ALICE), Some(JSON), body)
            .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("must start with a user message"),
            "{v}"
        );
    }

    // Over the 32 MiB body limit.
    let huge = format!(
        r#"{{"initial_user_msg": "{}"}}"#,
        "x".repeat(33 * 1024 * 1024)
    );
    let (code, v) = gw
        .post("/api/conversations", Some(ALICE), Some(JSON), huge)
        .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(detail_mentions(&v, "32 MiB"), "{v}");

    // A replay_json over OH_MAX_REPLAY_MIB (default 8): refused before anything is stored.
    let replay = format!(r#"{{"replay_json": "[{}]"}}"#, " ".repeat(9 * 1024 * 1024));
    let (code, v) = gw
        .post("/api/conversations", Some(ALICE), Some(JSON), replay)
        .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(detail_mentions(&v, "OH_MAX_REPLAY_MIB"), "{v}");

    // Accepted: an empty body, JSON without a declared type (FastAPI's rule), `+json` types.
    for (ct, body) in [
        (Some(JSON), ""),
        (None, r#"{"initial_user_msg": "hi"}"#),
        (Some("application/json; charset=utf-8"), "{}"),
        (Some("application/vnd.api+json"), "{}"),
    ] {
        let (code, v) = create(ct, body).await;
        assert_eq!(code, StatusCode::OK, "{ct:?} {body:?}: {v}");
        assert_eq!(v["conversation_status"], "STARTING");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_invalid_token_is_401() {
    let gw = Gw::start().await;
    let sid = gw.create(ALICE).await;
    let unauthorized = json!({"error": "Invalid token"});
    let paths = [
        "/api/conversations".to_owned(),
        format!("/api/conversations/{sid}"),
        format!("/api/conversations/{sid}/events"),
    ];
    for path in &paths {
        for token in [None, Some("wrong"), Some("")] {
            let (code, v) = gw.get(path, token).await;
            assert_eq!(
                (code, &v),
                (StatusCode::UNAUTHORIZED, &unauthorized),
                "{path}"
            );
        }
    }
    // Not a bearer header at all.
    let req = Request::builder()
        .uri("/api/conversations")
        .header(header::AUTHORIZATION, format!("Basic {ALICE}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        gw.call(req).await,
        (StatusCode::UNAUTHORIZED, unauthorized.clone())
    );
    for path in [
        "/api/conversations".to_owned(),
        format!("/api/conversations/{sid}/stop"),
    ] {
        let (code, v) = gw.post(&path, None, Some(JSON), "{}").await;
        assert_eq!(
            (code, &v),
            (StatusCode::UNAUTHORIZED, &unauthorized),
            "{path}"
        );
    }
    // Health and metrics need no token.
    assert_eq!(gw.get("/healthz", None).await.0, StatusCode::OK);
    assert_eq!(
        gw.get("/readyz", None).await,
        (StatusCode::OK, json!({"nats": true, "redis": true}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_unknown_and_foreign_ids() {
    let gw = Gw::start().await;
    let sid = gw.create(ALICE).await;
    for bad in ["bad.id", "a%20b", &"x".repeat(65), "%E2%9C%93"] {
        for suffix in ["", "/events", "/start", "/stop"] {
            let path = format!("/api/conversations/{bad}{suffix}");
            let (code, v) = if suffix == "/start" || suffix == "/stop" {
                gw.post(&path, Some(ALICE), None, "").await
            } else {
                gw.get(&path, Some(ALICE)).await
            };
            assert_eq!(code, StatusCode::BAD_REQUEST, "{path}: {v}");
            assert_eq!(v["status"], "error", "{path}: {v}");
            assert!(
                v["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("invalid conversation id"),
                "{path}: {v}"
            );
        }
    }
    let not_found = json!({"status": "error", "message": "Conversation not found", "msg_id": "CONVERSATION$NOT_FOUND"});
    let unknown = uuid::Uuid::new_v4().simple().to_string();
    for (id, token) in [(unknown.as_str(), ALICE), (sid.as_str(), BOB)] {
        for path in [
            format!("/api/conversations/{id}"),
            format!("/api/conversations/{id}/events"),
        ] {
            assert_eq!(
                gw.get(&path, Some(token)).await,
                (StatusCode::NOT_FOUND, not_found.clone()),
                "{path}"
            );
        }
        let path = format!("/api/conversations/{id}/stop");
        assert_eq!(
            gw.post(&path, Some(token), None, "").await,
            (StatusCode::NOT_FOUND, not_found.clone())
        );
        let req = request(
            "DELETE",
            &format!("/api/conversations/{id}"),
            Some(token),
            None,
            Body::empty(),
        );
        assert_eq!(gw.call(req).await, (StatusCode::OK, json!(false)));
    }
    // The owner still sees it.
    let (code, v) = gw
        .get(&format!("/api/conversations/{sid}"), Some(ALICE))
        .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["conversation_id"], sid.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_parameters_are_checked() {
    let gw = Gw::start().await;
    let mut created = Vec::new();
    for _ in 0..3 {
        created.push(gw.create(ALICE).await);
    }
    let invalid_limit = json!({"detail": "Invalid limit"});
    for q in ["limit=0", "limit=101", "limit=-1"] {
        let r = gw
            .get(&format!("/api/conversations?{q}"), Some(ALICE))
            .await;
        assert_eq!(r, (StatusCode::BAD_REQUEST, invalid_limit.clone()), "{q}");
    }
    let (code, v) = gw.get("/api/conversations?limit=ten", Some(ALICE)).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(detail_mentions(&v, "limit"), "{v}");
    for page in ["%%%", "bm90IGEgbnVtYmVy"] {
        let r = gw
            .get(&format!("/api/conversations?page_id={page}"), Some(ALICE))
            .await;
        assert_eq!(
            r,
            (
                StatusCode::BAD_REQUEST,
                json!({"status": "error", "message": "invalid page_id"})
            ),
            "{page}"
        );
    }
    // Good paging walks every conversation once.
    let (code, first) = gw.get("/api/conversations?limit=2", Some(ALICE)).await;
    assert_eq!(code, StatusCode::OK, "{first}");
    assert_eq!(first["results"].as_array().unwrap().len(), 2);
    let next = first["next_page_id"].as_str().expect("next page");
    let (_, second) = gw
        .get(
            &format!("/api/conversations?limit=2&page_id={next}"),
            Some(ALICE),
        )
        .await;
    assert_eq!(second["results"].as_array().unwrap().len(), 1);
    assert_eq!(second["next_page_id"], Value::Null);
    let mut seen: Vec<String> = first["results"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["results"].as_array().unwrap())
        .map(|c| c["conversation_id"].as_str().unwrap().to_owned())
        .collect();
    seen.sort();
    created.sort();
    assert_eq!(seen, created);

    let events = format!("/api/conversations/{}/events", created[0]);
    for q in ["limit=abc", "limit=101", "limit=-5"] {
        let r = gw.get(&format!("{events}?{q}"), Some(ALICE)).await;
        assert_eq!(r, (StatusCode::BAD_REQUEST, invalid_limit.clone()), "{q}");
    }
    for (q, name) in [("start_id=-1", "start_id"), ("end_id=x", "end_id")] {
        let r = gw.get(&format!("{events}?{q}"), Some(ALICE)).await;
        assert_eq!(r.0, StatusCode::UNPROCESSABLE_ENTITY, "{q}");
        assert_validation_error(&r.1, &["query", name], "int_parsing");
    }
    // No worker runs here, so the log is empty.
    let r = gw
        .get(
            &format!("{events}?start_id=0&limit=5&reverse=true"),
            Some(ALICE),
        )
        .await;
    assert_eq!(
        r,
        (StatusCode::OK, json!({"events": [], "has_more": false}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_answers_503() {
    let mut gw = Gw::start_with(&["--request-timeout-s", "1"]).await;
    gw.create(ALICE).await;
    // With NATS gone, reading the conversations waits for a reconnect (the client's own
    // request timeout is longer): the router's limit answers first.
    gw.nats.kill().await;
    let started = std::time::Instant::now();
    let (code, body) = gw.get("/api/conversations", Some(ALICE)).await;
    let took = started.elapsed();
    assert_eq!((code, body), (StatusCode::SERVICE_UNAVAILABLE, Value::Null));
    assert!(
        took >= std::time::Duration::from_millis(900) && took < std::time::Duration::from_secs(4),
        "answered after {took:?}"
    );
    // Requests that need neither NATS nor Redis are unaffected.
    assert_eq!(gw.get("/healthz", None).await.0, StatusCode::OK);
}

/// Issue 12's contract defects, each as OpenHands answers (a client written for it works):
/// 422 bodies are `HTTPValidationError`s, booleans read as pydantic reads them, an empty
/// replay or image list counts as absent, `git_provider` and `conversation_trigger` are
/// enums, list filters filter, and the last page of a huge `page_id` is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openhands_contract_defects() {
    let gw = Gw::start().await;
    let post = |body: Value| {
        gw.post(
            "/api/conversations",
            Some(ALICE),
            Some(JSON),
            body.to_string(),
        )
    };
    // Bodies: JSON that does not parse, an unknown field, a wrong type.
    let (code, v) = gw
        .post("/api/conversations", Some(ALICE), Some(JSON), "{not json")
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_validation_error(&v, &["body"], "json_invalid");
    let (_, v) = post(json!({"colour": 1})).await;
    assert_validation_error(&v, &["body"], "extra_forbidden");
    // git_provider: a known provider, echoed; another is refused.
    let (code, v) = post(json!({"git_provider": "sourceforge"})).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_validation_error(&v, &["body", "git_provider"], "enum");
    let (code, v) = post(json!({"git_provider": "gitlab", "repository": "a/b"})).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    let with_repo = v["conversation_id"].as_str().unwrap().to_owned();
    let (_, info) = gw
        .get(&format!("/api/conversations/{with_repo}"), Some(ALICE))
        .await;
    assert_eq!(info["git_provider"], "gitlab", "{info}");
    // An empty replay is no replay; no images are no images (so no conflict with a replay).
    let (code, v) = post(json!({"replay_json": ""})).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    let (code, v) = post(json!({"replay_json": "", "initial_user_msg": "hi"})).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    let (code, v) = post(json!({"image_urls": [], "replay_json": ""})).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    let replay = json!([{"id": 0, "source": "user", "action": "message",
        "args": {"content": "hi", "image_urls": [], "wait_for_response": false}, "message": "hi"}])
    .to_string();
    let (code, v) = post(json!({"image_urls": [], "replay_json": replay})).await;
    assert_eq!(code, StatusCode::OK, "{v}");

    // List filters (5 conversations of ALICE now, one with repository a/b).
    let (_, all) = gw.get("/api/conversations?limit=100", Some(ALICE)).await;
    assert_eq!(all["results"].as_array().unwrap().len(), 5, "{all}");
    let (_, only) = gw
        .get("/api/conversations?selected_repository=a/b", Some(ALICE))
        .await;
    let ids: Vec<&str> = only["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["conversation_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![with_repo.as_str()], "{only}");
    let (_, none) = gw
        .get("/api/conversations?conversation_trigger=slack", Some(ALICE))
        .await;
    assert_eq!(none["results"], json!([]), "{none}");
    let (_, api) = gw
        .get(
            "/api/conversations?conversation_trigger=openhands_api",
            Some(ALICE),
        )
        .await;
    assert_eq!(api["results"].as_array().unwrap().len(), 5, "{api}");
    let (code, v) = gw
        .get(
            "/api/conversations?conversation_trigger=carrier_pigeon",
            Some(ALICE),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_validation_error(&v, &["query", "conversation_trigger"], "enum");

    // Query strings that do not parse: JSON 422s, never text/plain.
    for q in ["limit=ten", "limit=1&limit=2", "limit=%ZZ"] {
        let resp = gw
            .router
            .clone()
            .oneshot(request(
                "GET",
                &format!("/api/conversations?{q}"),
                Some(ALICE),
                None,
                Body::empty(),
            ))
            .await
            .unwrap();
        let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY, "{q}");
        assert_eq!(ct.as_ref().map(|v| v.to_str().unwrap()), Some(JSON), "{q}");
    }

    // The page after the last representable offset is empty, not a page further back.
    let last = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        u64::MAX.to_string(),
    );
    let (code, v) = gw
        .get(&format!("/api/conversations?page_id={last}"), Some(ALICE))
        .await;
    assert_eq!(
        (code, v),
        (StatusCode::OK, json!({"results": [], "next_page_id": null}))
    );

    // `reverse` as pydantic reads a bool; junk is a 422 (no worker runs: the log is empty).
    let events = format!("/api/conversations/{with_repo}/events");
    for yes in ["yes", "on", "TRUE", "1", "f", "off"] {
        let (code, v) = gw
            .get(&format!("{events}?reverse={yes}"), Some(ALICE))
            .await;
        assert_eq!(code, StatusCode::OK, "{yes}: {v}");
    }
    let (code, v) = gw
        .get(&format!("{events}?reverse=maybe"), Some(ALICE))
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_validation_error(&v, &["query", "reverse"], "bool_parsing");
}

/// What OpenHands' UI reads at load and in its settings screens: client config, settings
/// (defaults before any save, stored per user, keys write-only, OpenHands' merge rules,
/// checked where they take effect), the option lists, secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_options_and_secrets() {
    let gw = Gw::start().await;
    let (code, cfg) = gw.get("/api/options/config", Some(ALICE)).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(cfg["APP_MODE"], "oss");
    assert_eq!(cfg["GITHUB_CLIENT_ID"], "");
    assert_eq!(cfg["POSTHOG_CLIENT_KEY"], "");
    for flag in [
        "ENABLE_BILLING",
        "HIDE_LLM_SETTINGS",
        "ENABLE_JIRA",
        "ENABLE_JIRA_DC",
        "ENABLE_LINEAR",
    ] {
        assert_eq!(cfg["FEATURE_FLAGS"][flag], false, "{flag}");
    }
    assert_eq!(
        gw.get("/api/options/models", Some(ALICE)).await,
        (StatusCode::OK, json!(["gpt-4o"]))
    );
    assert_eq!(
        gw.get("/api/options/agents", Some(ALICE)).await,
        (StatusCode::OK, json!(["CodeActAgent"]))
    );
    assert_eq!(
        gw.get("/api/options/security-analyzers", Some(ALICE)).await,
        (StatusCode::OK, json!([]))
    );

    // Before any save: the server's defaults, as the UI needs them.
    let (code, s) = gw.get("/api/settings", Some(ALICE)).await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(s["provider_tokens_set"], json!({}));
    assert_eq!(s["user_consents_to_analytics"], false);
    assert_eq!(s["confirmation_mode"], false);
    assert_eq!(s["llm_model"], "gpt-4o");
    assert_eq!(s["language"], "en");
    assert_eq!(s["llm_api_key_set"], false);

    let save = |token: &'static str, body: Value| {
        gw.post("/api/settings", Some(token), Some(JSON), body.to_string())
    };
    let (code, v) = save(
        ALICE,
        json!({"llm_model": "m1", "llm_api_key": "sk-alice",
        "llm_base_url": "https://llm.example/v1", "language": "fr", "provider_tokens_set": {}}),
    )
    .await;
    assert_eq!(
        (code, v),
        (StatusCode::OK, json!({"message": "Settings stored"}))
    );
    let (_, s) = gw.get("/api/settings", Some(ALICE)).await;
    assert_eq!(
        (s["llm_model"].as_str(), s["language"].as_str()),
        (Some("m1"), Some("fr"))
    );
    assert_eq!(s["llm_api_key"], Value::Null);
    assert_eq!(s["llm_api_key_set"], true);
    assert!(!s.to_string().contains("sk-alice"), "{s}");
    // Per user.
    let (_, b) = gw.get("/api/settings", Some(BOB)).await;
    assert_eq!(
        (b["llm_model"].as_str(), b["llm_api_key_set"].as_bool()),
        (Some("gpt-4o"), Some(false))
    );
    // A save without the key (or model, base URL) keeps them; other fields are replaced.
    save(ALICE, json!({"language": "de"})).await;
    let (_, s) = gw.get("/api/settings", Some(ALICE)).await;
    assert_eq!(
        (
            s["llm_model"].as_str(),
            s["llm_base_url"].as_str(),
            s["llm_api_key_set"].as_bool(),
            s["language"].as_str()
        ),
        (
            Some("m1"),
            Some("https://llm.example/v1"),
            Some(true),
            Some("de")
        )
    );
    // What OpenHands' UI sends from its LLM page (confirmation mode off: `security_analyzer`
    // falls back to its hard-coded "llm") is stored.
    let (code, v) = save(
        ALICE,
        json!({"llm_model": "m1", "security_analyzer": "llm",
        "confirmation_mode": false, "search_api_key": "", "provider_tokens_set": {}}),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    let (_, s) = gw.get("/api/settings", Some(ALICE)).await;
    assert_eq!(s["security_analyzer"], "llm");
    // An empty key clears it.
    save(ALICE, json!({"llm_api_key": ""})).await;
    let (_, s) = gw.get("/api/settings", Some(ALICE)).await;
    assert_eq!(s["llm_api_key_set"], false);

    // Checked where they take effect.
    for (body, loc, kind) in [
        (
            json!({"llm_base_url": "ftp://x"}),
            "llm_base_url",
            "value_error",
        ),
        (
            json!({"llm_base_url": "not a url"}),
            "llm_base_url",
            "value_error",
        ),
        (json!({"agent": "BrowsingAgent"}), "agent", "enum"),
        (
            json!({"condenser_max_size": 5}),
            "condenser_max_size",
            "value_error",
        ),
        (
            json!({"confirmation_mode": "maybe"}),
            "confirmation_mode",
            "type_error",
        ),
        (
            json!({"max_iterations": "x"}),
            "max_iterations",
            "type_error",
        ),
    ] {
        let (code, v) = save(ALICE, body.clone()).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_validation_error(&v, &["body", loc], kind);
    }
    let (code, v) = gw
        .post("/api/settings", Some(ALICE), Some(JSON), "[1]")
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (code, _) = gw.get("/api/settings", None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);

    // Secrets: names are environment variable names; values never come back.
    let secret = |body: Value| gw.post("/api/secrets", Some(ALICE), Some(JSON), body.to_string());
    let (code, v) = secret(json!({"name": "GH_TOKEN", "value": "ghp_secret"})).await;
    assert_eq!(
        (code, v),
        (
            StatusCode::CREATED,
            json!({"message": "Secret created successfully"})
        )
    );
    let (code, v) = secret(json!({"name": "GH_TOKEN", "value": "other"})).await;
    assert_eq!(
        (code, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"message": "Secret GH_TOKEN already exists"})
        )
    );
    for bad in ["", "1ABC", "with space", "x-y"] {
        let (code, v) = secret(json!({"name": bad, "value": "v"})).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {v}");
        assert_validation_error(&v, &["body", "name"], "value_error");
    }
    let (code, v) = secret(json!({"name": "NO_VALUE"})).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    secret(json!({"name": "B", "value": "v", "description": "bee"})).await;
    let (code, v) = gw.get("/api/secrets", Some(ALICE)).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        v,
        json!({"custom_secrets": [{"name": "B", "description": "bee"}, {"name": "GH_TOKEN", "description": ""}]})
    );
    assert!(!v.to_string().contains("ghp_secret"));
    assert_eq!(
        gw.get("/api/secrets", Some(BOB)).await.1,
        json!({"custom_secrets": []})
    );
    let put = |path: &str, body: Value| {
        gw.call(request(
            "PUT",
            path,
            Some(ALICE),
            Some(JSON),
            Body::from(body.to_string()),
        ))
    };
    let (code, v) = put("/api/secrets/GH_TOKEN", json!({"name": "B"})).await;
    assert_eq!(
        (code, v),
        (
            StatusCode::BAD_REQUEST,
            json!({"message": "Secret B already exists"})
        )
    );
    let (code, _) = put(
        "/api/secrets/GH_TOKEN",
        json!({"name": "GITHUB_TOKEN", "description": "gh"}),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let (code, v) = put("/api/secrets/MISSING", json!({"name": "X"})).await;
    assert_eq!(
        (code, v),
        (
            StatusCode::NOT_FOUND,
            json!({"error": "Secret with ID MISSING not found"})
        )
    );
    let (_, v) = gw.get("/api/secrets", Some(ALICE)).await;
    assert_eq!(
        v["custom_secrets"][1],
        json!({"name": "GITHUB_TOKEN", "description": "gh"})
    );
    let del = |path: &str| gw.call(request("DELETE", path, Some(ALICE), None, Body::empty()));
    assert_eq!(del("/api/secrets/B").await.0, StatusCode::OK);
    assert_eq!(del("/api/secrets/B").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        gw.get("/api/secrets", Some(ALICE)).await.1["custom_secrets"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

/// The API contract is served (no token needed), is OpenAPI 3.1, and documents every REST
/// route with its methods (schemathesis checks the answers against it: `tests/contract.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route() {
    let gw = Gw::start().await;
    let (code, doc) = gw.get("/api/openapi.json", None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let mut got: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect();
    got.sort();
    let c = "/api/conversations";
    let mut want: Vec<String> = [
        format!("POST {c}"),
        format!("GET {c}"),
        format!("GET {c}/{{id}}"),
        format!("PATCH {c}/{{id}}"),
        format!("DELETE {c}/{{id}}"),
        format!("GET {c}/{{id}}/events"),
        format!("GET {c}/{{id}}/trajectory"),
        format!("GET {c}/{{id}}/config"),
        format!("GET {c}/{{id}}/vscode-url"),
        format!("GET {c}/{{id}}/web-hosts"),
        format!("POST {c}/{{id}}/start"),
        format!("POST {c}/{{id}}/stop"),
        format!("GET {c}/{{id}}/list-files"),
        format!("GET {c}/{{id}}/select-file"),
        format!("POST {c}/{{id}}/upload-files"),
        format!("GET {c}/{{id}}/git/changes"),
        format!("GET {c}/{{id}}/microagents"),
        "GET /api/options/config".into(),
        "GET /api/options/models".into(),
        "GET /api/options/agents".into(),
        "GET /api/options/security-analyzers".into(),
        "GET /api/settings".into(),
        "POST /api/settings".into(),
        "GET /api/secrets".into(),
        "POST /api/secrets".into(),
        "PUT /api/secrets/{name}".into(),
        "DELETE /api/secrets/{name}".into(),
        "GET /readyz".into(),
    ]
    .into_iter()
    .collect();
    want.sort();
    assert_eq!(got, want);
    // Every documented route answers something other than 404/405 on this router.
    for route in &want {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path
            .replace("{id}", "0123456789abcdef0123456789abcdef")
            .replace("{name}", "X");
        let (code, _) = gw
            .call(request(
                method,
                &path,
                Some(ALICE),
                Some(JSON),
                Body::from("{}"),
            ))
            .await;
        assert!(
            code != StatusCode::METHOD_NOT_ALLOWED
                && !(code == StatusCode::NOT_FOUND && path.contains("options")),
            "{route}: {code}"
        );
    }
}
