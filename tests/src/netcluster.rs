//! A whole deployment across network namespaces ([`crate::netns`]): three clustered
//! `nats-server` nodes (JetStream, routes between hosts, every stream with 3 replicas), one
//! Redis, two gateways and three workers, each process on a host of its own, and the test's
//! clients on host `c`. The nemesis works on hosts ([`NetCluster::net`]: cut, loss, slow) and on
//! processes (kill, pause, restart, a wall-clock offset for workers).
//!
//! | host | address | runs |
//! |---|---|---|
//! | `n1`..`n3` | 10.99.0.11-13 | nats-server (client port 4222, routes 6222) |
//! | `redis` | 10.99.0.20 | redis-server 6379 |
//! | `g1`, `g2` | 10.99.0.31-32 | gateway on 8000 |
//! | `w1`..`w3` | 10.99.0.41-43 | worker (metrics 9100) |
//! | `c` | 10.99.0.50 | the test: clients, checks, admin connections |
//!
//! The test must run on a current-thread tokio runtime (`#[tokio::test]`): [`NetCluster::start`]
//! moves the test's thread onto host `c` for the cluster's lifetime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::id::SessionId;
use shared::names::Names;
use shared::store::{Store, StoreLimits};
use tempfile::TempDir;

use crate::auth::{Credentials, Role};
use crate::history::Stored;
use crate::netns::{Net, NsGuard};
use crate::proc::{Proc, bin_path, find_system_bin};

/// The clients' bearer token (user `alice`).
pub const TOKEN: &str = "netcluster-token-alice";
/// Replicas of every stream.
pub const REPLICAS: u8 = 3;
/// The NATS cluster's nodes.
pub const NATS_NODES: usize = 3;

const HOSTS: &[(&str, u8)] = &[
    ("n1", 11),
    ("n2", 12),
    ("n3", 13),
    ("redis", 20),
    ("g1", 31),
    ("g2", 32),
    ("w1", 41),
    ("w2", 42),
    ("w3", 43),
    ("c", 50),
];

/// How to build a [`NetCluster`].
#[derive(Debug, Clone)]
pub struct NetOpts {
    /// Workers started (at most 3: hosts `w1`..`w3`).
    pub workers: usize,
    /// Gateways started (at most 2: hosts `g1`, `g2`).
    pub gateways: usize,
    /// `OH_LEASE_TTL_MS` of the workers.
    pub lease_ttl_ms: u64,
    /// Extra environment of every worker.
    pub worker_env: Vec<(&'static str, String)>,
    /// Extra environment of every gateway.
    pub gateway_env: Vec<(&'static str, String)>,
    /// `jetstream.max_file_store` of every NATS node (bytes).
    pub nats_max_file_store: u64,
    /// The nats-server binary (default: [`cluster_nats_bin`]).
    pub nats_bin: Option<PathBuf>,
    /// Run the workers under libfaketime, their wall clocks offset by
    /// [`NetCluster::clock_file`]s (`+0` at start). (Redis cannot run under libfaketime —
    /// jemalloc's clock calls recurse into it — see [`NetCluster::redis_clock_jump`].)
    pub faketime: bool,
}

impl Default for NetOpts {
    fn default() -> Self {
        NetOpts {
            workers: 3,
            gateways: 2,
            lease_ttl_ms: 3000,
            worker_env: Vec::new(),
            gateway_env: Vec::new(),
            nats_max_file_store: 16 << 30,
            faketime: false,
            nats_bin: None,
        }
    }
}

/// Whether this machine can run the namespace tests. Returns the reason to skip; panics
/// instead when `OH_REQUIRE_NETNS=1` (the test script sets it: CI must run them).
pub fn skip_reason() -> Option<String> {
    match crate::netns::available() {
        Ok(()) => None,
        Err(e) => {
            if std::env::var("OH_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
                panic!("OH_REQUIRE_NETNS=1 but network namespaces are impossible here: {e}");
            }
            eprintln!("SKIP: network namespaces are impossible here: {e}");
            Some(e)
        }
    }
}

/// A running deployment across hosts. Processes are killed, then the namespaces removed, on
/// drop.
pub struct NetCluster {
    /// NATS node `i` runs on host `n{i+1}` (`None` while killed).
    pub nats: Vec<Option<Proc>>,
    /// Redis (`None` while killed).
    pub redis: Option<Proc>,
    /// Gateway `i` runs on host `g{i+1}`.
    pub gateways: Vec<Option<Proc>>,
    /// Worker `i` (id `w{i}`) runs on host `w{i+1}`.
    pub workers: Vec<Option<Proc>>,
    /// Namespace of every name in NATS and Redis.
    pub namespace: String,
    creds: Credentials,
    opts: NetOpts,
    dir: TempDir,
    http: reqwest::Client,
    /// The network and its faults.
    pub net: Net,
    _on_client_host: NsGuard,
}

impl NetCluster {
    /// Creates the hosts, starts the NATS cluster, Redis, two gateways and the workers, and
    /// waits until every one is ready. `None` (with a printed reason) where namespaces are
    /// impossible ([`skip_reason`]).
    pub async fn start(opts: NetOpts) -> Option<NetCluster> {
        if skip_reason().is_some() {
            return None;
        }
        let net = Net::create(HOSTS);
        let on_client = net.enter("c");
        let namespace = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let creds = Credentials::generate(&namespace);
        let dir = tempfile::Builder::new()
            .prefix("oh-netcluster-")
            .tempdir()
            .expect("create the cluster's dir");
        let mut c = NetCluster {
            nats: (0..NATS_NODES).map(|_| None).collect(),
            redis: None,
            gateways: vec![None, None],
            workers: Vec::new(),
            namespace,
            creds,
            opts: opts.clone(),
            dir,
            http: http_client(),
            net,
            _on_client_host: on_client,
        };
        for i in 0..NATS_NODES {
            c.spawn_nats(i);
        }
        c.start_redis().await;
        // A fresh cluster now and then elects no metadata leader ("JetStream cluster no
        // metadata leader" for minutes), or has one that places no stream on 3 peers ("no
        // suitable peers for placement" for over a minute); it is bootstrapped again, from
        // empty stores, once.
        let mut ready = true;
        for i in 0..NATS_NODES {
            ready = ready && c.nats_ready(i, Duration::from_secs(30)).await.is_ok();
        }
        if ready && let Err(e) = c.placement_ready(Duration::from_secs(30)).await {
            eprintln!("netcluster: {e}");
            ready = false;
        }
        if !ready {
            eprintln!("netcluster: JetStream not ready in 30 s; bootstrapping again");
            for i in 0..NATS_NODES {
                c.kill_nats(i).await;
                let _ = std::fs::remove_dir_all(c.node_dir(i).join("store"));
            }
            for i in 0..NATS_NODES {
                c.spawn_nats(i);
            }
        }
        for i in 0..NATS_NODES {
            c.wait_nats(i).await;
        }
        if let Err(e) = c.placement_ready(Duration::from_secs(60)).await {
            panic!("{e}\n{}", c.logs());
        }
        for (file, url) in [
            ("worker.nats-url", c.nats_url(Role::Worker)),
            ("worker.redis-url", c.redis_url(Role::Worker)),
        ] {
            std::fs::write(c.dir.path().join(file), url).expect("write a URL file");
        }
        for g in 0..opts.gateways.min(2) {
            c.start_gateway(g).await;
        }
        for w in 0..opts.workers.min(3) {
            c.workers.push(None);
            c.start_worker(w, Vec::new()).await;
        }
        Some(c)
    }

    /// `nats://user:pw@10.99.0.11:4222,...` of a role: every node (a client fails over
    /// between them).
    pub fn nats_url(&self, role: Role) -> String {
        (0..NATS_NODES)
            .map(|i| {
                format!(
                    "nats://{}{}:4222",
                    self.creds.userinfo(role),
                    self.net.addr(&nats_host(i))
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Redis URL of a role.
    pub fn redis_url(&self, role: Role) -> String {
        format!(
            "redis://{}{}:6379",
            self.creds.userinfo(role),
            self.net.addr("redis")
        )
    }

    /// Base URL of gateway `g`.
    pub fn url(&self, g: usize) -> String {
        format!("http://{}:8000", self.net.addr(&gateway_host(g)))
    }

    /// Base URLs of both gateways.
    pub fn urls(&self) -> Vec<String> {
        (0..self.gateways.len()).map(|g| self.url(g)).collect()
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(nats_host(i))
    }

    fn spawn_nats(&mut self, i: usize) {
        let host = nats_host(i);
        let dir = self.node_dir(i);
        std::fs::create_dir_all(dir.join("store")).expect("create a node's store");
        let addr = self.net.addr(&host);
        let routes: Vec<String> = (0..NATS_NODES)
            .filter(|j| *j != i)
            .map(|j| format!("\"nats-route://{}:6222\"", self.net.addr(&nats_host(j))))
            .collect();
        let conf = format!(
            "server_name: \"{host}\"\nlisten: \"{addr}:4222\"\n\
             jetstream {{ store_dir: \"{}\", max_file_store: {} }}\n\
             cluster {{ name: \"oh\", listen: \"{addr}:6222\", routes: [{}] }}\n\
             http: \"{addr}:8222\"\n{}\n",
            dir.join("store").display(),
            self.opts.nats_max_file_store,
            routes.join(", "),
            self.creds.nats_config()
        );
        let path = dir.join("nats.conf");
        std::fs::write(&path, conf).expect("write a node's config");
        let bin = self.opts.nats_bin.clone().unwrap_or_else(cluster_nats_bin);
        let p = self.net.on(&host, || {
            Proc::spawn(&host, &bin, &["-c", &path.display().to_string()], &[])
        });
        self.nats[i] = Some(p);
    }

    /// Waits until node `i` answers a JetStream request (which needs a meta leader: a quorum
    /// of nodes).
    pub async fn wait_nats(&mut self, i: usize) {
        if let Err(e) = self.nats_ready(i, Duration::from_secs(60)).await {
            panic!("{} not ready in 60 s: {e}\n{}", nats_host(i), self.logs());
        }
    }

    /// [`NetCluster::wait_nats`] for at most `timeout`, returning the last failure.
    async fn nats_ready(&mut self, i: usize, timeout: Duration) -> Result<(), String> {
        let url = format!(
            "nats://{}{}:4222",
            self.creds.userinfo(Role::Admin),
            self.net.addr(&nats_host(i))
        );
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.nats[i].as_mut().and_then(Proc::try_exit_status) {
                panic!("{} exited ({status})\n{}", nats_host(i), self.logs());
            }
            match js_info(&url).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last)
    }

    /// Waits until the cluster places a 3-replica stream (created, then deleted): every node
    /// has joined the metadata group with its storage.
    async fn placement_ready(&self, timeout: Duration) -> Result<(), String> {
        let url = format!(
            "nats://{}{}:4222",
            self.creds.userinfo(Role::Admin),
            self.net.addr(&nats_host(0))
        );
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let probe = async {
                let client = crate::nats::connect_url(&url).await?;
                let js = async_nats::jetstream::new(client);
                let name = format!("{}_placement_probe", self.namespace);
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{}.placement-probe", self.namespace)],
                    num_replicas: NATS_NODES,
                    max_bytes: 1024 * 1024,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("an R{NATS_NODES} stream cannot be placed: {e}"))?;
                js.delete_stream(&name)
                    .await
                    .map_err(|e| format!("probe stream not deleted: {e}"))?;
                Ok::<(), String>(())
            };
            match tokio::time::timeout(Duration::from_secs(10), probe).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(_) => last = "placement probe timed out".to_owned(),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(format!("JetStream not ready in {timeout:?}: {last}"))
    }

    /// SIGKILLs NATS node `i`.
    pub async fn kill_nats(&mut self, i: usize) {
        if let Some(mut p) = self.nats[i].take() {
            p.kill9().await;
        }
    }

    /// Starts NATS node `i` again with its store and waits until it answers.
    pub async fn restart_nats(&mut self, i: usize) {
        self.kill_nats(i).await;
        self.spawn_nats(i);
        self.wait_nats(i).await;
    }

    /// Starts (or starts again, empty) Redis and waits for it.
    pub async fn start_redis(&mut self) {
        if let Some(mut p) = self.redis.take() {
            p.kill9().await;
        }
        let dir = self.dir.path().join("redis");
        std::fs::create_dir_all(&dir).expect("create redis dir");
        let acl = dir.join("users.acl");
        std::fs::write(&acl, self.creds.redis_acl()).expect("write the ACL file");
        let bin = find_system_bin("redis-server", &["/usr/bin/redis-server"])
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = self.net.addr("redis").to_string();
        let args = [
            "--bind",
            &addr,
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--aclfile",
            &acl.display().to_string(),
            "--dir",
            &dir.display().to_string(),
        ];
        let p = self
            .net
            .on("redis", || Proc::spawn("redis", &bin, &args, &[]));
        self.redis = Some(p);
        let url = self.redis_url(Role::Admin);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.redis_admin(&url).await {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => panic!("redis not ready: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn redis_admin(&self, url: &str) -> Result<::redis::aio::MultiplexedConnection, String> {
        let client = ::redis::Client::open(url).map_err(|e| e.to_string())?;
        let mut con = tokio::time::timeout(
            Duration::from_secs(3),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        let _: String = ::redis::cmd("PING")
            .query_async(&mut con)
            .await
            .map_err(|e| e.to_string())?;
        Ok(con)
    }

    /// `FLUSHALL` on Redis (as admin).
    pub async fn flushall(&self) {
        let mut con = self
            .redis_admin(&self.redis_url(Role::Admin))
            .await
            .unwrap_or_else(|e| panic!("redis admin: {e}"));
        let _: String = ::redis::cmd("FLUSHALL")
            .query_async(&mut con)
            .await
            .expect("FLUSHALL");
    }

    /// What a jump of Redis' wall clock by `secs` does to the keys (Redis times expiry by its
    /// wall clock): forward, every key whose time to live is under `secs` expires at once and
    /// the rest lose `secs`; backward, every expiring key lives `secs` longer. Returns the keys
    /// that expired.
    pub async fn redis_clock_jump(&self, secs: i64) -> usize {
        let mut con = self
            .redis_admin(&self.redis_url(Role::Admin))
            .await
            .unwrap_or_else(|e| panic!("redis admin: {e}"));
        let script = ::redis::Script::new(
            r"
local expired = 0
local cursor = '0'
repeat
  local r = redis.call('SCAN', cursor, 'COUNT', 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do
    local ttl = redis.call('PTTL', k)
    if ttl > 0 then
      local left = ttl - tonumber(ARGV[1])
      if left <= 0 then
        redis.call('DEL', k)
        expired = expired + 1
      else
        redis.call('PEXPIRE', k, left)
      end
    end
  end
until cursor == '0'
return expired",
        );
        script
            .arg(secs * 1000)
            .invoke_async(&mut con)
            .await
            .expect("the clock jump script")
    }

    fn common_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OH_NAMESPACE", self.namespace.clone()),
            ("OH_STREAM_REPLICAS", REPLICAS.to_string()),
            ("OH_AUTH_TOKENS", format!("{TOKEN}=alice")),
            ("RUST_LOG", "info,async_nats=warn".to_owned()),
            // Errors without anyhow's backtrace (panics keep theirs): short log tails.
            ("RUST_LIB_BACKTRACE", "0".to_owned()),
        ]
    }

    /// Starts gateway `g` on its host and waits for `/readyz`.
    pub async fn start_gateway(&mut self, g: usize) {
        if let Some(mut p) = self.gateways[g].take() {
            p.kill9().await;
        }
        let host = gateway_host(g);
        let mut env = self.common_env();
        env.extend([
            ("OH_NATS_URL", self.nats_url(Role::Gateway)),
            ("OH_REDIS_URL", self.redis_url(Role::Gateway)),
            ("OH_GATEWAY_ADDR", format!("{}:8000", self.net.addr(&host))),
            // Fault tests, not rate tests: every client is user alice.
            ("OH_MESSAGE_RATE", "off".to_owned()),
            ("OH_CREATE_RATE", "off".to_owned()),
        ]);
        env.extend(self.opts.gateway_env.iter().cloned());
        let bin = bin_path("gateway");
        let mut p = self.net.on(&host, || Proc::spawn(&host, &bin, &[], &env));
        p.wait_http_ok(&format!("{}/readyz", self.url(g)), Duration::from_secs(60))
            .await;
        self.gateways[g] = Some(p);
    }

    /// Starts worker `w` (id `w{w}`, host `w{w+1}`) with `extra` settings and waits for
    /// `/healthz`. With `faketime`, its wall clock is offset by the contents of
    /// [`NetCluster::clock_file`] (`+0`, `+30s`, `-30s`: read on every call; its monotonic
    /// clock is left alone).
    pub async fn start_worker(&mut self, w: usize, extra: Vec<(&'static str, String)>) {
        if let Some(mut p) = self.workers[w].take() {
            p.kill9().await;
        }
        let mut p = self.spawn_worker(w, extra);
        let host = worker_host(w);
        p.wait_http_ok(
            &format!("http://{}:9100/healthz", self.net.addr(&host)),
            Duration::from_secs(60),
        )
        .await;
        self.workers[w] = Some(p);
    }

    /// Starts worker `w` on its host without waiting for it (e.g. to watch it refuse to run).
    pub fn spawn_worker(&self, w: usize, extra: Vec<(&'static str, String)>) -> Proc {
        let host = worker_host(w);
        let root = self.dir.path().join(format!("workspaces-{host}"));
        let mut env = self.common_env();
        let file = |n: &str| self.dir.path().join(n).display().to_string();
        env.extend([
            ("OH_NATS_URL_FILE", file("worker.nats-url")),
            ("OH_REDIS_URL_FILE", file("worker.redis-url")),
            ("OH_WORKER_ID", format!("w{w}")),
            ("OH_LEASE_TTL_MS", self.opts.lease_ttl_ms.to_string()),
            ("OH_DRAIN_TIMEOUT_S", "10".to_owned()),
            ("OH_WORKSPACE_ROOT", root.display().to_string()),
            (
                "OH_WORKER_METRICS_ADDR",
                format!("{}:9100", self.net.addr(&host)),
            ),
        ]);
        env.extend(self.opts.worker_env.iter().cloned());
        if self.opts.faketime {
            env.extend(self.faketime_env(&host));
        }
        env.extend(extra);
        let bin = bin_path("worker");
        self.net.on(&host, || Proc::spawn(&host, &bin, &[], &env))
    }

    /// The file whose contents offset the wall clock of a faketime process on `host` (`w1`,
    /// `redis`): `+0`, `+30s`, `-30s`, read on every clock call.
    pub fn clock_file(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("clock-{host}"))
    }

    /// Moves the wall clock of the process on `host` to `offset` (e.g. `+30s`) from now on.
    pub fn set_clock(&self, host: &str, offset: &str) {
        std::fs::write(self.clock_file(host), format!("{offset}\n")).expect("write a clock file");
    }

    /// Settings that run a process under libfaketime with [`NetCluster::clock_file`] (`+0`
    /// to start): only the wall clock moves, the monotonic clock is left alone. Panics if
    /// libfaketime is missing (deploy/setup.sh installs it).
    fn faketime_env(&self, host: &str) -> Vec<(&'static str, String)> {
        let lib = [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libfaketime (Debian package faketime; deploy/setup.sh installs it)");
        self.set_clock(host, "+0");
        vec![
            ("LD_PRELOAD", lib.to_owned()),
            (
                "FAKETIME_TIMESTAMP_FILE",
                self.clock_file(host).display().to_string(),
            ),
            ("FAKETIME_NO_CACHE", "1".to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ]
    }

    /// The worker's process (panics if it is not running).
    pub fn worker(&self, w: usize) -> &Proc {
        self.workers[w].as_ref().expect("worker running")
    }

    /// Index of the worker whose id is `id` (`w0`..`w2`).
    pub fn worker_index(id: &str) -> usize {
        id.trim_start_matches('w').parse().expect("worker id w<N>")
    }

    /// An admin connection to the whole NATS cluster.
    pub async fn admin_nats(&self) -> async_nats::Client {
        crate::nats::connect_url(&self.nats_url(Role::Admin))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The deployment's JetStream data as admin (never changes a stream's settings).
    pub async fn store(&self) -> Store {
        let names = Names::new(&self.namespace).expect("namespace");
        let limits = StoreLimits {
            replicas: usize::from(REPLICAS),
            ..StoreLimits::default()
        };
        // Right after a heal the cluster may still be electing ("temporarily unavailable").
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Store::open_keeping_limits(self.admin_nats().await, names.clone(), limits).await {
                Ok(store) => return store,
                Err(e) if Instant::now() > deadline => panic!("open the store: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// The node (`0..3`) that leads stream `{ns}_{suffix}` (e.g. `events`), from stream info.
    pub async fn stream_leader(&self, suffix: &str) -> Option<usize> {
        let client = self.admin_nats().await;
        let subject = format!("$JS.API.STREAM.INFO.{}_{suffix}", self.namespace);
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(subject, bytes::Bytes::new()),
        )
        .await
        .ok()?
        .ok()?;
        let info: Value = serde_json::from_slice(&resp.payload).ok()?;
        let leader = info["cluster"]["leader"].as_str()?;
        (0..NATS_NODES).find(|i| nats_host(*i) == leader)
    }

    /// Consumers of stream `{ns}_{suffix}` (stream info, from its leader).
    pub async fn consumer_count(&self, suffix: &str) -> Option<u64> {
        let client = self.admin_nats().await;
        let subject = format!("$JS.API.STREAM.INFO.{}_{suffix}", self.namespace);
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(subject, bytes::Bytes::new()),
        )
        .await
        .ok()?
        .ok()?;
        let info: Value = serde_json::from_slice(&resp.payload).ok()?;
        info["state"]["consumer_count"].as_u64()
    }

    /// Last sequence of stream `{ns}_{suffix}` in node `i`'s own copy (its monitoring port,
    /// `/jsz`): a follower that is behind reports less than the leader.
    pub async fn node_last_seq(&self, i: usize, suffix: &str) -> Option<u64> {
        let url = format!(
            "http://{}:8222/jsz?accounts=true&streams=true",
            self.net.addr(&nats_host(i))
        );
        let v: Value = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let name = format!("{}_{suffix}", self.namespace);
        v["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == name.as_str())
            .and_then(|s| s["state"]["last_seq"].as_u64())
    }

    /// Tails of every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let all = self
            .nats
            .iter()
            .chain(std::iter::once(&self.redis))
            .chain(self.gateways.iter())
            .chain(self.workers.iter())
            .flatten();
        for p in all {
            s.push_str(&format!("\n===== {} =====\n{}", p.name(), p.log_tail(5000)));
        }
        s
    }

    async fn request(
        &self,
        method: reqwest::Method,
        g: usize,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url(g)))
            .bearer_auth(TOKEN)
            .timeout(Duration::from_secs(10));
        if let Some(b) = body {
            r = r.json(b);
        }
        let resp = r.send().await.map_err(|e| e.to_string())?;
        let code = resp.status().as_u16();
        Ok((code, resp.json().await.unwrap_or(Value::Null)))
    }

    /// GET on gateway `g`.
    pub async fn get(&self, g: usize, path: &str) -> Result<(u16, Value), String> {
        self.request(reqwest::Method::GET, g, path, None).await
    }

    /// POST (JSON) on gateway `g`.
    pub async fn post(&self, g: usize, path: &str, body: &Value) -> Result<(u16, Value), String> {
        self.request(reqwest::Method::POST, g, path, Some(body))
            .await
    }

    /// Creates a conversation through gateway `g`; its id.
    pub async fn create(&self, g: usize) -> String {
        match self.post(g, "/api/conversations", &json!({})).await {
            Ok((200, v)) => v["conversation_id"]
                .as_str()
                .expect("conversation_id")
                .to_owned(),
            other => panic!("create failed: {other:?}{}", self.logs()),
        }
    }

    /// Every stored event of a conversation (REST, paged), through the first gateway that
    /// answers. Retried for a minute: right after a heal the streams may still be electing
    /// their leaders, and a read then fails with an error (never a wrong answer).
    pub async fn all_events(&self, sid: &str) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut failures = Vec::new();
        while Instant::now() < deadline {
            if let Some(evs) = self.all_events_once(sid, &mut failures).await {
                return evs;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let last: Vec<&String> = failures.iter().rev().take(4).collect();
        panic!(
            "no gateway returned the events of {sid} within 60 s (last failures: {last:?}){}",
            self.logs()
        );
    }

    /// One try of [`NetCluster::all_events`] through each gateway in turn.
    async fn all_events_once(&self, sid: &str, failures: &mut Vec<String>) -> Option<Vec<Value>> {
        'gateway: for g in 0..self.gateways.len() {
            let mut out = Vec::new();
            let mut start = 0;
            loop {
                let path = format!("/api/conversations/{sid}/events?start_id={start}&limit=100");
                let v = match self.get(g, &path).await {
                    Ok((200, v)) => v,
                    other => {
                        failures.push(format!("g{}: {other:?}", g + 1));
                        continue 'gateway;
                    }
                };
                let evs = v["events"].as_array().cloned().unwrap_or_default();
                if let Some(first) = evs.first()
                    && first["id"].as_u64() != Some(start)
                {
                    eprintln!(
                        "REST PAGE ANOMALY {sid} via g{}: asked start_id={start}, got first id {} last id {} ({} events)",
                        g + 1,
                        first["id"],
                        evs.last().map(|l| l["id"].clone()).unwrap_or_default(),
                        evs.len()
                    );
                }
                if let Some(last) = evs.last() {
                    start = last["id"].as_u64().expect("id") + 1;
                }
                out.extend(evs);
                if !v["has_more"].as_bool().unwrap_or(false) {
                    return Some(out);
                }
            }
        }
        None
    }

    /// What is stored of each conversation, for [`crate::history::check`].
    pub async fn read_stored(&self, sids: &[String]) -> HashMap<String, Stored> {
        let store = self.store().await;
        let mut out = HashMap::new();
        for sid in sids {
            let id = SessionId::parse(sid).expect("session id");
            // Right after a heal the cluster may still be electing: retry for a while.
            let deadline = Instant::now() + Duration::from_secs(30);
            let raw = loop {
                match store.read_from(&id, 0, 1_000_000).await {
                    Ok(raw) => break raw,
                    Err(e) if Instant::now() > deadline => {
                        panic!("read the raw log of {sid}: {e}{}", self.logs())
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            };
            let events = self.all_events(sid).await;
            let agent_state = self.info(sid).await["agent_state"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            out.insert(
                sid.clone(),
                Stored {
                    events,
                    raw,
                    agent_state,
                },
            );
        }
        out
    }

    /// `GET /api/conversations/{sid}` through the first gateway that answers; retried for
    /// 60 s (after a heal, JetStream may still be electing leaders: the gateways answer 503).
    pub async fn info(&self, sid: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for g in 0..self.gateways.len() {
                if let Ok((200, v)) = self.get(g, &format!("/api/conversations/{sid}")).await {
                    return v;
                }
            }
            if Instant::now() > deadline {
                panic!("no gateway answered for {sid}{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A nats-server that fences correctly in a cluster (2.9.21 or later, nats-server#4320):
/// `OH_NATS_CLUSTER_BIN`, else the one `deploy/nats-server-cluster.sh` installs (Debian 13's),
/// else whatever `nats-server` is on the machine (then clustered tests fail at the workers'
/// version check if it is older).
pub fn cluster_nats_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OH_NATS_CLUSTER_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let tools = std::env::var_os("OH_TOOLS_DIR").unwrap_or_else(|| "/opt/oh-tools".into());
    let p = PathBuf::from(tools).join("nats-server-trixie/usr/sbin/nats-server");
    if p.exists() {
        return p;
    }
    find_system_bin("nats-server", &["/usr/sbin/nats-server"]).unwrap_or_else(|e| panic!("{e}"))
}

/// Host of NATS node `i`.
pub fn nats_host(i: usize) -> String {
    format!("n{}", i + 1)
}

/// Host of gateway `g`.
pub fn gateway_host(g: usize) -> String {
    format!("g{}", g + 1)
}

/// Host of worker `w`.
pub fn worker_host(w: usize) -> String {
    format!("w{}", w + 1)
}

fn http_client() -> reqwest::Client {
    crate::ensure_tls_provider();
    reqwest::Client::builder().build().expect("an HTTP client")
}

/// One JetStream account-info request to one server.
async fn js_info(url: &str) -> Result<(), String> {
    let check = async {
        let client = crate::nats::connect_url(url).await?;
        let resp = client
            .request("$JS.API.INFO", bytes::Bytes::new())
            .await
            .map_err(|e| format!("account info: {e}"))?;
        let info: Value =
            serde_json::from_slice(&resp.payload).map_err(|e| format!("not JSON: {e}"))?;
        if info.get("error").is_some() {
            return Err(format!("jetstream not ready: {info}"));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), check)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}
