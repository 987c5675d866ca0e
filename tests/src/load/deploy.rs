//! Starting and stopping deployments for the tool: [`Deployer`] is what the `scale` scenario
//! (and `--deploy`) needs; [`ScriptDeployer`] drives `deploy/local/cluster.sh` with a private
//! `OH_DEPLOY_DIR`, its own gateway port and a fresh namespace per start, and removes that
//! namespace's streams and Redis keys after the stop (brokers given by URL), or the data of
//! the brokers `cluster.sh` ran itself, with a user per role, in that dir (the default). Tests plug in a [`crate::cluster::Cluster`]
//! instead.

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;

use super::procfs::{Pid, pids_from_deploy_dir};

/// A running deployment.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Gateway base URLs.
    pub gateways: Vec<String>,
    /// Local pids to sample.
    pub pids: Vec<Pid>,
}

/// A deployment could not be started or stopped.
#[derive(Debug, thiserror::Error)]
#[error("deployment: {0}")]
pub struct DeployError(pub String);

/// Starts and stops deployments of `workers` workers.
pub trait Deployer: Send {
    /// Starts a deployment with `workers` workers and waits until its gateways are ready.
    fn start(&mut self, workers: usize) -> BoxFuture<'_, Result<Deployment, DeployError>>;
    /// Stops the current deployment (and cleans up after it).
    fn stop(&mut self) -> BoxFuture<'_, Result<(), DeployError>>;
}

/// `deploy/local/cluster.sh` with its own state dir, port and namespace.
#[derive(Debug, Clone)]
pub struct ScriptDeployer {
    /// Path of `cluster.sh`.
    pub script: PathBuf,
    /// `OH_DEPLOY_DIR`.
    pub dir: PathBuf,
    /// `OH_GATEWAY_PORT` (first gateway).
    pub port: u16,
    /// Gateways per deployment.
    pub gateways: usize,
    /// `OH_NATS_URL` (admin credentials); `None`: `cluster.sh` runs its own.
    pub nats_url: Option<String>,
    /// `OH_REDIS_URL` (admin credentials); `None`: `cluster.sh` runs its own.
    pub redis_url: Option<String>,
    /// `OH_MAX_SESSIONS` of each worker.
    pub max_sessions: u32,
    /// Keep the namespace's streams and keys after stopping.
    pub keep: bool,
    /// More environment for `cluster.sh` (its `OH_*` variables reach the binaries).
    pub extra_env: Vec<(String, String)>,
    namespace: Option<String>,
}

impl ScriptDeployer {
    /// A deployer; nothing runs until [`Deployer::start`].
    pub fn new(
        script: PathBuf,
        dir: PathBuf,
        port: u16,
        gateways: usize,
        broker: (Option<String>, Option<String>),
        max_sessions: u32,
    ) -> Self {
        ScriptDeployer {
            script,
            dir,
            port,
            gateways,
            nats_url: broker.0,
            redis_url: broker.1,
            max_sessions,
            keep: false,
            extra_env: Vec::new(),
            namespace: None,
        }
    }

    async fn run_script(&self, args: &[String], ns: &str) -> Result<(), DeployError> {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&self.script)
            .args(args)
            .env("OH_DEPLOY_DIR", &self.dir)
            .env("OH_GATEWAY_PORT", self.port.to_string())
            .env("OH_NAMESPACE", ns)
            // Its own brokers (when no URLs are given) next to its gateway port, so they do not
            // collide with a local cluster's (4223, 6380).
            .env(
                "OH_DEPLOY_NATS_PORT",
                (u32::from(self.port) + 2000).to_string(),
            )
            .env(
                "OH_DEPLOY_REDIS_PORT",
                (u32::from(self.port) + 2001).to_string(),
            )
            .env("OH_MAX_SESSIONS", self.max_sessions.to_string())
            .env("OH_WORKER_ID_PREFIX", ns)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        for (var, url) in [
            ("OH_NATS_URL", &self.nats_url),
            ("OH_REDIS_URL", &self.redis_url),
        ] {
            match url {
                Some(u) => cmd.env(var, u),
                None => cmd.env_remove(var),
            };
        }
        let out = tokio::time::timeout(Duration::from_secs(900), cmd.output())
            .await
            .map_err(|_| DeployError(format!("{} {args:?} timed out", self.script.display())))?
            .map_err(|e| DeployError(format!("{}: {e}", self.script.display())))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(DeployError(format!(
                "{} {args:?} failed ({}): {}{}",
                self.script.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }

    /// Deletes the namespace's streams (`{ns}_*`, `OBJ_{ns}_*`) and Redis keys (`{ns}:*`); for
    /// brokers `cluster.sh` ran itself (stopped with the deployment), their data dirs.
    async fn cleanup(&self, ns: &str) -> Result<(), DeployError> {
        let e = |x: String| DeployError(format!("cleanup of namespace {ns}: {x}"));
        let (Some(nats_url), Some(redis_url)) = (&self.nats_url, &self.redis_url) else {
            for dir in ["nats", "redis"] {
                let path = self.dir.join(dir);
                if path.exists() {
                    std::fs::remove_dir_all(&path)
                        .map_err(|x| e(format!("{}: {x}", path.display())))?;
                }
            }
            return Ok(());
        };
        let nats = crate::nats::connect_url(nats_url).await.map_err(e)?;
        let js = async_nats::jetstream::new(nats);
        for stream in [
            format!("{ns}_events"),
            format!("{ns}_actions"),
            format!("{ns}_work"),
            format!("{ns}_meta"),
            format!("OBJ_{ns}_blobs"),
        ] {
            // A stream that was never created is fine.
            let _ = js.delete_stream(&stream).await;
        }
        let client = redis::Client::open(redis_url.as_str()).map_err(|x| e(x.to_string()))?;
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|x| e(x.to_string()))?;
        let mut cursor: u64 = 0;
        // Bounded: at most 100,000 SCAN rounds.
        for _ in 0..100_000 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{ns}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .map_err(|x| e(x.to_string()))?;
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut con)
                    .await
                    .map_err(|x| e(x.to_string()))?;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(())
    }
}

impl Deployer for ScriptDeployer {
    fn start(&mut self, workers: usize) -> BoxFuture<'_, Result<Deployment, DeployError>> {
        Box::pin(async move {
            let ns = format!("lt{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
            self.namespace = Some(ns.clone());
            let args = vec![
                "start".to_owned(),
                "-g".to_owned(),
                self.gateways.to_string(),
                "-w".to_owned(),
                workers.to_string(),
            ];
            self.run_script(&args, &ns).await?;
            let gateways = (0..self.gateways)
                .map(|i| format!("http://127.0.0.1:{}", usize::from(self.port) + i))
                .collect();
            Ok(Deployment {
                gateways,
                pids: pids_from_deploy_dir(&self.dir),
            })
        })
    }

    fn stop(&mut self) -> BoxFuture<'_, Result<(), DeployError>> {
        Box::pin(async move {
            let Some(ns) = self.namespace.take() else {
                return Ok(());
            };
            self.run_script(&["stop".to_owned()], &ns).await?;
            if self.keep {
                return Ok(());
            }
            self.cleanup(&ns).await
        })
    }
}
