//! A real `redis-server` per test, as an RAII guard.
//!
//! [`RedisServer::start`] runs `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no
//! --dir <private dir>` (found on `PATH`, else `/usr/bin/redis-server`), logs to `redis.log` in
//! its private temp dir, and returns once `PING` answers and `INFO server` reports the pid of
//! the process just started. Nothing is persisted, so [`RedisServer::restart`] (same port) comes
//! back empty, like a failed-over Redis that lost its data. SIGKILLed on drop.
//!
//! [`RedisServer::start_with_auth`] adds `--aclfile users.acl` with the deployment's ACL users
//! ([`crate::auth::Credentials::redis_acl`]; the `default` user is off); then
//! [`RedisServer::url`] carries the admin's credentials and [`RedisServer::url_as`] a role's.

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

/// A running (or killed) `redis-server` on a fixed loopback port, without persistence.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    dir: TempDir,
    auth: Option<Credentials>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`. Panics (with the
    /// server log) if it is not ready within 20 s.
    pub async fn start() -> RedisServer {
        Self::start_inner(None).await
    }

    /// [`RedisServer::start`] with the ACL users of `creds` only (`default` disabled).
    pub async fn start_with_auth(creds: &Credentials) -> RedisServer {
        Self::start_inner(Some(creds.clone())).await
    }

    async fn start_inner(auth: Option<Credentials>) -> RedisServer {
        let bin = find_system_bin("redis-server", &["/usr/bin/redis-server"])
            .unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("oh-redis-")
            .tempdir()
            .expect("create temp dir for redis-server");
        if let Some(creds) = &auth {
            std::fs::write(dir.path().join(ACL_FILE), creds.redis_acl())
                .expect("write redis ACL file");
        }
        let mut errors = Vec::new();
        for _ in 0..5 {
            let port = free_port();
            match launch(&bin, port, dir.path(), auth.as_ref(), READY_DEADLINE).await {
                Ok(child) => {
                    return RedisServer {
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
            "redis-server did not start: {errors:#?}\nlog:\n{}",
            read_tail(&dir.path().join("redis.log"), LOG_TAIL)
        );
    }

    /// `redis://127.0.0.1:PORT`, with the admin's credentials on a server with ACL users.
    pub fn url(&self) -> String {
        self.url_as(Role::Admin)
    }

    /// `redis://USER:PASSWORD@127.0.0.1:PORT` of a role (no credentials on a server without
    /// ACL users).
    pub fn url_as(&self, role: Role) -> String {
        let userinfo = self
            .auth
            .as_ref()
            .map(|c| c.userinfo(role))
            .unwrap_or_default();
        format!("redis://{userinfo}127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT`, without credentials.
    pub fn anonymous_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TCP port (stable across [`RedisServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The OS pid while running, `None` after [`RedisServer::kill`].
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The server log so far (all runs), for failure messages.
    pub fn log(&self) -> String {
        read_tail(&self.dir.path().join("redis.log"), usize::MAX)
    }

    /// SIGKILLs the server and waits until it is gone. No-op if it is not running.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_wait(&mut child).await;
        }
    }

    /// Kills the server if it runs, then starts it again on the same port; it comes back empty.
    /// Panics (with the log) if it is not ready within 20 s.
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
                    "redis-server did not restart on port {}: {errors:#?}\nlog:\n{}",
                    self.port,
                    read_tail(&self.dir.path().join("redis.log"), LOG_TAIL)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_in_drop(child, Duration::from_secs(2));
        }
    }
}

/// The file, in the server's private dir, holding its ACL users.
const ACL_FILE: &str = "users.acl";

async fn launch(
    bin: &Path,
    port: u16,
    dir: &Path,
    auth: Option<&Credentials>,
    deadline: Duration,
) -> Result<Child, String> {
    let log = dir.join("redis.log");
    log_marker(&log, &format!("starting redis-server on port {port}"));
    let (out, err) = log_stdio(&log);
    let mut cmd = Command::new(bin);
    if auth.is_some() {
        cmd.arg("--aclfile").arg(dir.join(ACL_FILE));
    }
    let admin = auth.map(|c| c.userinfo(Role::Admin)).unwrap_or_default();
    let mut child = cmd
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    match wait_ready(&mut child, port, &admin, deadline).await {
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
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited early: {status}"));
        }
        let last = match probe(port, userinfo).await {
            Ok(pid) if Some(pid) == child.id() => return Ok(()),
            Ok(pid) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "redis-server exited early ({status}); port {port} is used by pid {pid}"
                    ));
                }
                format!("answered by pid {pid}, not ours")
            }
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("not ready within {timeout:?}; last probe: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `PING`, then `INFO server` (as the user of `userinfo`, if any); returns the server's pid.
async fn probe(port: u16, userinfo: &str) -> Result<u32, String> {
    let check = async {
        let client = ::redis::Client::open(format!("redis://{userinfo}127.0.0.1:{port}"))
            .map_err(|e| format!("redis client: {e}"))?;
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("redis connect: {e}"))?;
        let pong: String = ::redis::cmd("PING")
            .query_async(&mut con)
            .await
            .map_err(|e| format!("PING: {e}"))?;
        if pong != "PONG" {
            return Err(format!("PING answered {pong:?}"));
        }
        let info: String = ::redis::cmd("INFO")
            .arg("server")
            .query_async(&mut con)
            .await
            .map_err(|e| format!("INFO server: {e}"))?;
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse::<u32>().ok())
            .ok_or_else(|| "INFO server has no process_id".to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), check)
        .await
        .unwrap_or_else(|_| Err("redis probe timed out".to_owned()))
}
