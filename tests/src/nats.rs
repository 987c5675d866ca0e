//! A real `nats-server -js` per test, as an RAII guard.
//!
//! [`NatsServer::start`] runs `nats-server -js -a 127.0.0.1 -p <free port> -sd <private dir>`
//! (found on `PATH`, else `/usr/sbin/nats-server`), logs to `nats.log` in its private temp dir,
//! and returns once a TCP connect and a JetStream account-info request (`$JS.API.INFO`) both succeed and the
//! server answering is the one just started (its server id appears in its own log). The process
//! is SIGKILLed on drop. [`NatsServer::kill`] and [`NatsServer::restart`] keep the port and the
//! store dir, which the failover and NATS-restart tests need. The default `max_payload` is kept.
//!
//! [`NatsServer::start_with_auth`] adds `-c auth.conf` with the deployment's users
//! ([`crate::auth::Credentials::nats_config`]); then [`NatsServer::url`] carries the admin's
//! credentials, [`NatsServer::url_as`] a role's, and [`NatsServer::connect`] connects as admin
//! (async-nats ignores a URL's userinfo; [`shared::creds::nats_connect_options`] moves it).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tempfile::TempDir;
use tokio::{
    process::{Child, Command},
    time::Instant,
};

use crate::auth::{Credentials, Role};
use crate::proc::{
    LOG_TAIL, find_system_bin, free_port, kill_and_wait, kill_in_drop, log_marker, log_stdio,
    read_tail,
};

/// How long a start or restart may take before the test fails.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// A running (or killed) `nats-server` with JetStream, on a fixed loopback port and store dir.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    dir: TempDir,
    auth: Option<Credentials>,
}

impl NatsServer {
    /// Starts a server on a free port with a private store dir and waits until it is ready.
    /// Panics (with the server log) if it does not become ready within 20 s.
    pub async fn start() -> NatsServer {
        Self::start_inner(None).await
    }

    /// [`NatsServer::start`] with authentication: only the users of `creds`, each with its
    /// role's permissions, may connect.
    pub async fn start_with_auth(creds: &Credentials) -> NatsServer {
        Self::start_inner(Some(creds.clone())).await
    }

    async fn start_inner(auth: Option<Credentials>) -> NatsServer {
        let bin = find_system_bin("nats-server", &["/usr/sbin/nats-server"])
            .unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("oh-nats-")
            .tempdir()
            .expect("create temp dir for nats-server");
        std::fs::create_dir_all(dir.path().join("store")).expect("create nats store dir");
        if let Some(creds) = &auth {
            std::fs::write(dir.path().join(AUTH_CONF), creds.nats_config())
                .expect("write nats auth config");
        }
        let mut errors = Vec::new();
        // Another process may grab the "free" port before nats-server binds it: try a few ports.
        for _ in 0..5 {
            let port = free_port();
            match launch(&bin, port, dir.path(), auth.as_ref(), READY_DEADLINE).await {
                Ok(child) => {
                    return NatsServer {
                        child: Some(child),
                        port,
                        bin,
                        dir,
                        auth,
                    };
                }
                Err(e) => errors.push(format!("port {port}: {e}")),
            }
        }
        panic!(
            "nats-server did not start: {errors:#?}\nlog:\n{}",
            read_tail(&dir.path().join("nats.log"), LOG_TAIL)
        );
    }

    /// `nats://127.0.0.1:PORT`, with the admin's credentials on a server with authentication.
    pub fn url(&self) -> String {
        match &self.auth {
            Some(_) => self.url_as(Role::Admin),
            None => self.anonymous_url(),
        }
    }

    /// `nats://USER:PASSWORD@127.0.0.1:PORT` of a role (no credentials on a server without
    /// authentication).
    pub fn url_as(&self, role: Role) -> String {
        match &self.auth {
            Some(creds) => format!("nats://{}127.0.0.1:{}", creds.userinfo(role), self.port),
            None => self.anonymous_url(),
        }
    }

    /// `nats://127.0.0.1:PORT`, without credentials.
    pub fn anonymous_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The users of a server with authentication.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.auth.as_ref()
    }

    /// A client connected as admin (or anonymously on a server without authentication).
    pub async fn connect(&self) -> async_nats::Client {
        connect_url(&self.url())
            .await
            .unwrap_or_else(|e| panic!("connect NATS as admin: {e}"))
    }

    /// The TCP port (stable across [`NatsServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The OS pid while running, `None` after [`NatsServer::kill`].
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The JetStream store dir (`-sd`), kept across restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server log so far (all runs), for failure messages.
    pub fn log(&self) -> String {
        read_tail(&self.dir.path().join("nats.log"), usize::MAX)
    }

    /// SIGKILLs the server and waits until it is gone. No-op if it is not running.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_wait(&mut child).await;
        }
    }

    /// Kills the server if it runs, then starts it again on the same port and store dir and
    /// waits until it is ready. Panics (with the log) if it does not come back within 20 s.
    pub async fn restart(&mut self) {
        self.kill().await;
        let deadline = Instant::now() + READY_DEADLINE;
        let mut errors = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match launch(
                &self.bin,
                self.port,
                self.dir.path(),
                self.auth.as_ref(),
                left,
            )
            .await
            {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) => errors.push(e),
            }
            if Instant::now() >= deadline {
                panic!(
                    "nats-server did not restart on port {}: {errors:#?}\nlog:\n{}",
                    self.port,
                    read_tail(&self.dir.path().join("nats.log"), LOG_TAIL)
                );
            }
            // The port may still be held briefly; try again.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_in_drop(child, Duration::from_secs(2));
        }
    }
}

/// Connects to a NATS URL, with the credentials it carries (`user:password@`).
///
/// # Errors
/// The connect error (never naming the password).
pub async fn connect_url(url: &str) -> Result<async_nats::Client, String> {
    let url = shared::creds::BrokerUrl::parse(url)?;
    let (opts, servers) = shared::creds::nats_connect_options(&url);
    opts.connection_timeout(Duration::from_secs(2))
        .connect(servers)
        .await
        .map_err(|e| format!("connect {url}: {e}"))
}

/// The file, in the server's private dir, holding its users.
const AUTH_CONF: &str = "auth.conf";

/// Spawns nats-server and waits until it is ready; on failure the child is killed.
async fn launch(
    bin: &Path,
    port: u16,
    dir: &Path,
    auth: Option<&Credentials>,
    deadline: Duration,
) -> Result<Child, String> {
    let log = dir.join("nats.log");
    log_marker(&log, &format!("starting nats-server on port {port}"));
    let (out, err) = log_stdio(&log);
    let store = dir.join("store");
    let mut cmd = Command::new(bin);
    if auth.is_some() {
        cmd.arg("-c").arg(dir.join(AUTH_CONF));
    }
    let admin = auth.map(|c| c.userinfo(Role::Admin)).unwrap_or_default();
    let mut child = cmd
        .arg("-js")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&store)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    match wait_ready(&mut child, port, &admin, &log, deadline).await {
        Ok(()) => Ok(child),
        Err(e) => {
            kill_and_wait(&mut child).await;
            Err(e)
        }
    }
}

async fn wait_ready(
    child: &mut Child,
    port: u16,
    userinfo: &str,
    log: &Path,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("nats-server exited early: {status}"));
        }
        let last = match probe(port, userinfo).await {
            Ok(server_id) => {
                // Make sure the answer came from our process, not another test's server that
                // took the port first.
                let ours = std::fs::read_to_string(log)
                    .map(|l| l.contains(&server_id))
                    .unwrap_or(false);
                if ours {
                    return Ok(());
                }
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "nats-server exited early ({status}); port {port} is used by another server"
                    ));
                }
                format!("server id {server_id} not (yet) in our log")
            }
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("not ready within {timeout:?}; last probe: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// TCP connect, then a JetStream account-info request (as the user of `userinfo`, if any).
/// Returns the server id.
async fn probe(port: u16, userinfo: &str) -> Result<String, String> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await;
    match tcp {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("tcp connect: {e}")),
        Err(_) => return Err("tcp connect timed out".to_owned()),
    }
    let check = async {
        let client = connect_url(&format!("nats://{userinfo}127.0.0.1:{port}"))
            .await
            .map_err(|e| format!("nats connect: {e}"))?;
        // A raw `$JS.API.INFO` request: async-nats 0.51's `query_account()` cannot parse the
        // account info of nats-server 2.9.
        let resp = client
            .request("$JS.API.INFO", bytes::Bytes::new())
            .await
            .map_err(|e| format!("jetstream account info: {e}"))?;
        let info: serde_json::Value = serde_json::from_slice(&resp.payload)
            .map_err(|e| format!("jetstream account info is not JSON: {e}"))?;
        if info.get("error").is_some()
            || info["type"] != "io.nats.jetstream.api.v1.account_info_response"
        {
            return Err(format!("jetstream not ready: {info}"));
        }
        Ok::<_, String>(client.server_info().server_id)
    };
    tokio::time::timeout(Duration::from_secs(5), check)
        .await
        .unwrap_or_else(|_| Err("nats probe timed out".to_owned()))
}
