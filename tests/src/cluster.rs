//! A whole deployment for one test: its own nats-server and redis-server, G gateways and W
//! workers (the real binaries), a namespace of its own, and REST/Socket.IO helpers.
//!
//! By default ([`ClusterOpts::auth`]) the brokers require credentials: NATS users and Redis
//! ACL users per role, rendered from `deploy/auth/` with random passwords ([`crate::auth`]).
//! Gateways get the gateway's URLs in `OH_NATS_URL`/`OH_REDIS_URL`, workers the worker's in
//! files (`OH_NATS_URL_FILE`/`OH_REDIS_URL_FILE`), so both forms run in every test. The
//! harness itself (`nats.url()`, `redis.url()`, [`Cluster::store`]) is admin.

use std::time::Duration;

use serde_json::{Value, json};

use crate::auth::{Credentials, Role};
use crate::nats::NatsServer;
use crate::proc::{Proc, bin_path, free_port};
use crate::redis::RedisServer;
use crate::sio::{ConnectOpts, SioClient, SioError};

/// How to build a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// Number of gateways.
    pub gateways: usize,
    /// Number of workers.
    pub workers: usize,
    /// `OH_MAX_SESSIONS` of each worker.
    pub max_sessions: u32,
    /// `OH_AUTH_TOKENS` (None: single-user mode).
    pub auth_tokens: Option<String>,
    /// `OH_LEASE_TTL_MS`.
    pub lease_ttl_ms: u64,
    /// Extra environment of every worker (e.g. `OH_CLOSE_DELAY_S`, `OH_ECHO_FAULTS`).
    pub worker_env: Vec<(&'static str, String)>,
    /// Extra environment of every gateway (e.g. `OH_SOCKET_BUFFER`).
    pub gateway_env: Vec<(&'static str, String)>,
    /// Brokers with per-role users (default); `false`: anyone may connect, with every right.
    pub auth: bool,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            gateways: 2,
            workers: 2,
            max_sessions: 100,
            auth_tokens: None,
            lease_ttl_ms: 3000,
            worker_env: Vec::new(),
            gateway_env: Vec::new(),
            auth: true,
        }
    }
}

/// A running deployment. Everything is killed on drop.
pub struct Cluster {
    /// The test's NATS.
    pub nats: NatsServer,
    /// The test's Redis.
    pub redis: RedisServer,
    /// Gateway processes (index = gateway number).
    pub gateways: Vec<Proc>,
    /// Worker processes.
    pub workers: Vec<Proc>,
    /// Namespace of this deployment.
    pub namespace: String,
    gateway_ports: Vec<u16>,
    opts: ClusterOpts,
    http: reqwest::Client,
    /// The workers' URL files.
    secrets: tempfile::TempDir,
}

impl Cluster {
    /// Starts NATS, Redis, the gateways (waits for `/readyz`) and the workers (waits for
    /// `/healthz`).
    pub async fn start(opts: ClusterOpts) -> Cluster {
        let namespace = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let (nats, redis) = if opts.auth {
            let creds = Credentials::generate(&namespace);
            tokio::join!(
                NatsServer::start_with_auth(&creds),
                RedisServer::start_with_auth(&creds)
            )
        } else {
            tokio::join!(NatsServer::start(), RedisServer::start())
        };
        let secrets = tempfile::Builder::new()
            .prefix("oh-secrets-")
            .tempdir()
            .expect("create temp dir for URL files");
        for (file, url) in [
            ("worker.nats-url", nats.url_as(Role::Worker)),
            ("worker.redis-url", redis.url_as(Role::Worker)),
        ] {
            std::fs::write(secrets.path().join(file), url).expect("write URL file");
        }
        let mut c = Cluster {
            nats,
            redis,
            gateways: Vec::new(),
            workers: Vec::new(),
            namespace,
            gateway_ports: Vec::new(),
            opts: opts.clone(),
            http: crate::http_client(),
            secrets,
        };
        for _ in 0..opts.gateways {
            c.add_gateway().await;
        }
        for _ in 0..opts.workers {
            c.add_worker().await;
        }
        c
    }

    fn common_env(&self, role: Role) -> Vec<(&'static str, String)> {
        let file = |name: &str| self.secrets.path().join(name).display().to_string();
        let mut env = match role {
            Role::Worker => vec![
                ("OH_NATS_URL_FILE", file("worker.nats-url")),
                ("OH_REDIS_URL_FILE", file("worker.redis-url")),
            ],
            _ => vec![
                ("OH_NATS_URL", self.nats.url_as(role)),
                ("OH_REDIS_URL", self.redis.url_as(role)),
            ],
        };
        env.extend([
            ("OH_NAMESPACE", self.namespace.clone()),
            ("RUST_LOG", "info,async_nats=warn".to_owned()),
        ]);
        if let Some(t) = &self.opts.auth_tokens {
            env.push(("OH_AUTH_TOKENS", t.clone()));
        }
        env
    }

    /// Starts one more gateway and waits until it is ready.
    pub async fn add_gateway(&mut self) -> usize {
        let port = free_port();
        let mut env = self.common_env(Role::Gateway);
        env.push(("OH_GATEWAY_ADDR", format!("127.0.0.1:{port}")));
        env.extend(self.opts.gateway_env.iter().cloned());
        let i = self.gateways.len();
        let mut p = Proc::spawn(&format!("gateway{i}"), &bin_path("gateway"), &[], &env);
        p.wait_http_ok(
            &format!("http://127.0.0.1:{port}/readyz"),
            Duration::from_secs(30),
        )
        .await;
        self.gateways.push(p);
        self.gateway_ports.push(port);
        i
    }

    /// Starts one more worker and waits until it is ready: its `/healthz` (on
    /// `OH_WORKER_METRICS_ADDR`) answers once NATS, JetStream and Redis are connected, right
    /// before its claim loop starts.
    pub async fn add_worker(&mut self) -> usize {
        self.add_worker_with(Vec::new()).await
    }

    /// [`Cluster::add_worker`] with settings of its own (after [`ClusterOpts::worker_env`], so
    /// they win), e.g. another `OH_WORKSPACE_ROOT` standing in for another machine.
    pub async fn add_worker_with(&mut self, extra: Vec<(&'static str, String)>) -> usize {
        let i = self.workers.len();
        let mut env = self.common_env(Role::Worker);
        env.push(("OH_WORKER_ID", format!("w{i}")));
        env.push(("OH_MAX_SESSIONS", self.opts.max_sessions.to_string()));
        env.push(("OH_LEASE_TTL_MS", self.opts.lease_ttl_ms.to_string()));
        env.push(("OH_DRAIN_TIMEOUT_S", "10".to_owned()));
        env.push((
            "OH_WORKER_METRICS_ADDR",
            format!("127.0.0.1:{}", free_port()),
        ));
        env.extend(self.opts.worker_env.iter().cloned());
        env.extend(extra);
        // The last setting wins (a test may choose its own address).
        let addr = env
            .iter()
            .rev()
            .find(|(k, _)| *k == "OH_WORKER_METRICS_ADDR")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let mut p = Proc::spawn(&format!("worker{i}"), &bin_path("worker"), &[], &env);
        p.wait_http_ok(&format!("http://{addr}/healthz"), Duration::from_secs(30))
            .await;
        self.workers.push(p);
        i
    }

    /// Index of the worker whose id (`w{i}`) is `id`.
    pub fn worker_index(id: &str) -> usize {
        id.trim_start_matches('w').parse().expect("worker id w<N>")
    }

    /// A direct handle on the deployment's JetStream data (for checks on the raw log).
    pub async fn store(&self) -> shared::store::Store {
        let client = self.nats.connect().await;
        let names = shared::names::Names::new(&self.namespace).expect("namespace");
        shared::store::Store::open(client, names)
            .await
            .expect("store")
    }

    /// Port of gateway `i`.
    pub fn gateway_port(&self, i: usize) -> u16 {
        self.gateway_ports[i]
    }

    /// Base URL of gateway `i`.
    pub fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.gateway_ports[i])
    }

    /// Logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in self.gateways.iter().chain(self.workers.iter()) {
            s.push_str(&format!("\n===== {} =====\n{}", p.name(), p.log_tail(6000)));
        }
        s
    }

    fn req(
        &self,
        method: reqwest::Method,
        gw: usize,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.url(gw)));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// `POST /api/conversations` on gateway `gw`; returns (status code, body).
    pub async fn post(
        &self,
        gw: usize,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::POST, gw, path, token)
            .json(body)
            .send()
            .await
            .expect("POST");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    /// GET on gateway `gw`; returns (status code, body).
    pub async fn get(&self, gw: usize, path: &str, token: Option<&str>) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::GET, gw, path, token)
            .send()
            .await
            .expect("GET");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    /// DELETE on gateway `gw`; returns (status code, body).
    pub async fn delete(&self, gw: usize, path: &str, token: Option<&str>) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::DELETE, gw, path, token)
            .send()
            .await
            .expect("DELETE");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    /// Creates a conversation (optionally with an initial message); returns its id.
    pub async fn create(&self, gw: usize, initial: Option<&str>, token: Option<&str>) -> String {
        let body = match initial {
            Some(m) => json!({"initial_user_msg": m}),
            None => json!({}),
        };
        let (code, v) = self.post(gw, "/api/conversations", &body, token).await;
        assert_eq!(code, 200, "create failed: {v}");
        v["conversation_id"]
            .as_str()
            .expect("conversation_id")
            .to_owned()
    }

    /// `GET /api/conversations/{id}` body (panics on non-200).
    pub async fn info(&self, gw: usize, sid: &str, token: Option<&str>) -> Value {
        let (code, v) = self
            .get(gw, &format!("/api/conversations/{sid}"), token)
            .await;
        assert_eq!(code, 200, "get {sid}: {v}");
        v
    }

    /// Every stored event of a conversation, via the REST events endpoint (paged).
    pub async fn all_events(&self, gw: usize, sid: &str, token: Option<&str>) -> Vec<Value> {
        let mut out = Vec::new();
        let mut start = 0;
        loop {
            let (code, v) = self
                .get(
                    gw,
                    &format!("/api/conversations/{sid}/events?start_id={start}&limit=100"),
                    token,
                )
                .await;
            assert_eq!(code, 200, "events: {v}");
            let evs = v["events"].as_array().cloned().unwrap_or_default();
            if let Some(last) = evs.last() {
                start = last["id"].as_u64().expect("id") + 1;
            }
            out.extend(evs);
            if !v["has_more"].as_bool().unwrap_or(false) {
                return out;
            }
        }
    }

    /// Polls `GET /api/conversations/{id}` until `pred` holds (or panics after `timeout`).
    pub async fn wait_info<F: Fn(&Value) -> bool>(
        &self,
        gw: usize,
        sid: &str,
        token: Option<&str>,
        timeout: Duration,
        pred: F,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.info(gw, sid, token).await;
            if pred(&v) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "conversation {sid} never reached the expected state; last: {v}{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Socket.IO connect to gateway `gw` for `sid`.
    pub async fn connect(
        &self,
        gw: usize,
        sid: &str,
        latest: Option<i64>,
        token: Option<&str>,
    ) -> Result<SioClient, SioError> {
        let mut o = ConnectOpts::new(self.url(gw)).query("conversation_id", sid);
        if let Some(l) = latest {
            o = o.query("latest_event_id", l.to_string());
        }
        if let Some(t) = token {
            o = o.header("Authorization", format!("Bearer {t}"));
        }
        SioClient::connect(o).await
    }
}

/// Receives `oh_event`s until one satisfies `pred`; returns all received (including it).
pub async fn events_until<F: Fn(&Value) -> bool>(
    c: &mut SioClient,
    timeout: Duration,
    pred: F,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_event(left).await {
            Ok((name, data)) if name == "oh_event" => {
                let done = pred(&data);
                got.push(data);
                if done {
                    return got;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("waiting for an event: {e}; got so far: {got:#?}"),
        }
    }
}

/// True for the agent's echo of `text`.
pub fn is_echo(ev: &Value, text: &str) -> bool {
    ev["source"] == "agent"
        && ev["action"] == "message"
        && ev["args"]["content"] == format!("echo: {text}")
}

/// True for an `agent_state_changed` to `state`.
pub fn is_state(ev: &Value, state: &str) -> bool {
    ev["observation"] == "agent_state_changed" && ev["extras"]["agent_state"] == state
}

/// The ids of events (panics on an event without a numeric id).
pub fn ids(evs: &[Value]) -> Vec<u64> {
    evs.iter()
        .map(|e| {
            e["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("event without id: {e}"))
        })
        .collect()
}
