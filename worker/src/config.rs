//! Worker configuration (flags with `OH_*` environment fallbacks).

use std::net::SocketAddr;
use std::time::Duration;

use shared::config::BrokerArgs;
use shared::id::WorkerId;

/// Worker flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "worker",
    about = "Runs agent sessions claimed from the work queue"
)]
pub struct Args {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// This worker's id (recorded as the owner of its sessions). Default: generated.
    #[arg(long, env = "OH_WORKER_ID")]
    pub worker_id: Option<WorkerId>,
    /// Most sessions this worker runs at once; it pulls work only while it has a free slot.
    #[arg(long, env = "OH_MAX_SESSIONS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_sessions: u32,
    /// Owner lease time-to-live in milliseconds; renewed every quarter of it.
    #[arg(long = "lease-ttl-ms", env = "OH_LEASE_TTL_MS", default_value = "5000", value_parser = parse_ttl)]
    pub lease_ttl: Duration,
    /// How long a drain (SIGTERM) may take before sessions are abandoned, in seconds.
    #[arg(long = "drain-timeout-s", env = "OH_DRAIN_TIMEOUT_S", default_value = "30", value_parser = parse_secs)]
    pub drain_timeout: Duration,
    /// Most running conversations per user (OpenHands' `max_concurrent_conversations`),
    /// exact across workers. A start beyond it is refused: the session goes to `error` with
    /// reason `AGENT_ERROR$TOO_MANY_CONVERSATIONS`. Unset: no limit.
    #[arg(long, env = "OH_MAX_CONVERSATIONS_PER_USER", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_conversations_per_user: Option<u32>,
    /// Seconds without any connected client (and the agent not running) after which a session
    /// is passivated: state kept in the log, lease and slot released. 0 disables.
    #[arg(long = "close-delay-s", env = "OH_CLOSE_DELAY_S", default_value = "300", value_parser = parse_secs)]
    pub close_delay: Duration,
    /// Test hook of the echo agent: a message `/crash` aborts the worker process mid-step
    /// (to test failover and poison input). Never enable in production.
    #[arg(long, env = "OH_ECHO_FAULTS", default_value_t = false)]
    pub echo_faults: bool,
    /// Test hook: milliseconds a snapshot waits before writing its head (a window in which a
    /// test pauses the worker, to show that a zombie's late write is fenced). Never set in
    /// production.
    #[arg(
        long,
        env = "OH_TEST_SNAPSHOT_PAUSE_MS",
        default_value_t = 0,
        hide = true
    )]
    pub test_snapshot_pause_ms: u64,
    /// Most steps (LLM call plus action) in one turn before it ends in `error`.
    #[arg(long, env = "OH_MAX_ITERATIONS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_iterations: u32,
    /// Which agent runs sessions: `codeact` (LLM-driven; needs `OH_LLM_BASE_URL`) or `echo`, a
    /// test/demo agent that answers `echo: <message>`. Default: `codeact` when an LLM is
    /// configured, else `echo`.
    #[arg(long, env = "OH_AGENT", value_parser = ["echo", "codeact"])]
    pub agent: Option<String>,
    /// Base URL of an OpenAI-compatible API (vLLM, Ollama, a hosted one), e.g.
    /// `http://127.0.0.1:8000/v1`. Unset: no LLM.
    #[arg(long, env = "OH_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,
    /// Model name sent to the LLM API.
    #[arg(long, env = "OH_LLM_MODEL", default_value = "gpt-4o")]
    pub llm_model: String,
    /// API key for the LLM (a secret: never logged, never in an event or API answer).
    #[arg(long, env = "OH_LLM_API_KEY", hide_env_values = true)]
    pub llm_api_key: Option<crate::llm::Secret>,
    /// Limit of one LLM request attempt, in seconds.
    #[arg(long = "llm-timeout-s", env = "OH_LLM_TIMEOUT_S", default_value = "300", value_parser = parse_secs)]
    pub llm_timeout: Duration,
    /// Retries of a failed LLM request (429, 5xx, connection errors, timeouts).
    #[arg(long, env = "OH_LLM_NUM_RETRIES", default_value_t = 5)]
    pub llm_num_retries: u32,
    /// Backoff before the first LLM retry (ms); doubled each retry.
    #[arg(long = "llm-retry-min-wait-ms", env = "OH_LLM_RETRY_MIN_WAIT_MS", default_value = "8000", value_parser = parse_ms)]
    pub llm_retry_min: Duration,
    /// Cap of the LLM retry backoff (ms).
    #[arg(long = "llm-retry-max-wait-ms", env = "OH_LLM_RETRY_MAX_WAIT_MS", default_value = "64000", value_parser = parse_ms)]
    pub llm_retry_max: Duration,
    /// Prices per million tokens: `model=input/output,model2=input/output` (USD).
    #[arg(long, env = "OH_LLM_PRICES", default_value = "")]
    pub llm_prices: crate::llm::PriceTable,
    /// Most USD one conversation may spend on the LLM before its turn ends in `error`
    /// (checked between steps). Unset: no budget.
    #[arg(long, env = "OH_MAX_BUDGET_PER_TASK")]
    pub max_budget_per_task: Option<f64>,
    /// Folder under which each session gets its workspace folder.
    #[arg(long, env = "OH_WORKSPACE_ROOT", default_value = "/tmp/oh-workspaces")]
    pub workspace_root: std::path::PathBuf,
    /// Largest workspace (MiB of file contents) snapshotted to JetStream so that its files
    /// follow the session to another worker. Over it, the agent gets an error event, the
    /// previous snapshot stands, and the session keeps working.
    #[arg(long, env = "OH_WORKSPACE_MAX_MIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub workspace_max_mib: u64,
    /// Folder of knowledge files (`*.md` with a `triggers:` list in a front matter) recalled
    /// when a user message mentions a trigger. Unset: none.
    #[arg(long, env = "OH_KNOWLEDGE_DIR")]
    pub knowledge_dir: Option<std::path::PathBuf>,
    /// Address of the `/metrics` (Prometheus) and `/healthz` endpoint. Unset: none.
    #[arg(long, env = "OH_WORKER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// A file holding the LLM API key (read once at startup; takes precedence over
    /// `OH_LLM_API_KEY`, and keeps the key out of the process environment).
    #[arg(long, env = "OH_LLM_API_KEY_FILE")]
    pub llm_api_key_file: Option<std::path::PathBuf>,
    /// Where agent code runs: `bwrap` (a bubblewrap sandbox per session: namespaces, no
    /// network, read-only system, resource limits) or `off` (as the worker's own user, with
    /// its access to the control plane: only for trusted single-user setups; logged as an
    /// error). A machine that cannot sandbox makes the worker refuse to start.
    #[arg(long, env = "OH_SANDBOX", default_value = "bwrap", value_parser = ["bwrap", "off"])]
    pub sandbox: String,
    /// The bubblewrap binary. Default: `bwrap` on PATH, else `/usr/bin/bwrap`.
    #[arg(long, env = "OH_SANDBOX_BWRAP")]
    pub sandbox_bwrap: Option<std::path::PathBuf>,
    /// The sandbox's network: `none` (no way out at all; the default, since egress can carry
    /// a workspace away) or `egress` (HTTP/HTTPS through the worker's proxy, which refuses
    /// the control plane and every non-global address).
    #[arg(long, env = "OH_SANDBOX_NETWORK", default_value = "none", value_parser = ["none", "egress"])]
    pub sandbox_network: String,
    /// Networks (CIDR, comma-separated) the egress proxy allows although they are not
    /// globally routable, e.g. an internal package mirror. Control-plane addresses stay
    /// refused.
    #[arg(long, env = "OH_SANDBOX_EGRESS_ALLOW", value_delimiter = ',')]
    pub sandbox_egress_allow: Vec<ipnet::IpNet>,
    /// The `oh-sandbox-net` forwarder. Default: next to the worker's binary.
    #[arg(long, env = "OH_SANDBOX_NET_HELPER")]
    pub sandbox_net_helper: Option<std::path::PathBuf>,
    /// User id agent code runs as when the worker runs as root.
    #[arg(long, env = "OH_SANDBOX_UID", default_value_t = 65534)]
    pub sandbox_uid: u32,
    /// Group id agent code runs as when the worker runs as root.
    #[arg(long, env = "OH_SANDBOX_GID", default_value_t = 65534)]
    pub sandbox_gid: u32,
    /// Memory of one session's sandbox in MiB (processes, page cache and its `/tmp`).
    #[arg(long, env = "OH_SANDBOX_MEMORY_MIB", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
    pub sandbox_memory_mib: u64,
    /// Most processes and threads in one session's sandbox.
    #[arg(long, env = "OH_SANDBOX_PIDS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(8..=1_000_000))]
    pub sandbox_pids: u32,
    /// CPU of one session's sandbox, in cores.
    #[arg(long, env = "OH_SANDBOX_CPUS", default_value_t = 1.0, value_parser = parse_cpus)]
    pub sandbox_cpus: f64,
}

fn parse_cpus(s: &str) -> Result<f64, String> {
    let cpus: f64 = s
        .parse()
        .map_err(|_| "expected a number of cores".to_owned())?;
    if !(0.01..=1024.0).contains(&cpus) {
        return Err("must be between 0.01 and 1024".to_owned());
    }
    Ok(cpus)
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ms: u64 = s.parse().map_err(|_| "expected milliseconds".to_owned())?;
    if !(300..=600_000).contains(&ms) {
        return Err("must be between 300 and 600000 ms".to_owned());
    }
    Ok(Duration::from_millis(ms))
}

fn parse_ms(s: &str) -> Result<Duration, String> {
    let ms: u64 = s.parse().map_err(|_| "expected milliseconds".to_owned())?;
    Ok(Duration::from_millis(ms))
}

impl Args {
    /// The agent this worker runs: `OH_AGENT`, else `codeact` with an LLM, else `echo`.
    pub fn agent_kind(&self) -> &str {
        match (&self.agent, &self.llm_base_url) {
            (Some(a), _) => a,
            (None, Some(_)) => "codeact",
            (None, None) => "echo",
        }
    }

    /// The sandbox settings (`None` with `OH_SANDBOX=off`); `control_plane`: the addresses
    /// of NATS and Redis, which egress never reaches.
    pub(crate) fn sandbox_config(
        &self,
        control_plane: Vec<std::net::IpAddr>,
    ) -> Option<crate::runtime::sandbox::SandboxConfig> {
        let egress =
            (self.sandbox_network == "egress").then(|| crate::runtime::sandbox::EgressConfig {
                policy: crate::runtime::egress::EgressPolicy {
                    allow: self.sandbox_egress_allow.clone(),
                    control_plane,
                },
                helper: self.sandbox_net_helper.clone(),
            });
        (self.sandbox != "off").then_some(crate::runtime::sandbox::SandboxConfig {
            bwrap: self.sandbox_bwrap.clone(),
            uid: self.sandbox_uid,
            gid: self.sandbox_gid,
            limits: crate::runtime::cgroup::Limits {
                memory_bytes: self.sandbox_memory_mib << 20,
                pids: self.sandbox_pids,
                cpus: self.sandbox_cpus,
            },
            egress,
        })
    }

    /// The hosts of the NATS and Redis URLs (`scheme://[user[:pass]@]host[:port]`, several
    /// NATS URLs comma-separated), with their default ports.
    pub(crate) fn control_plane_hosts(&self) -> Vec<(String, u16)> {
        let mut hosts = Vec::new();
        for (urls, default_port) in [(self.broker.nats(), 4222), (self.broker.redis(), 6379)] {
            for url in urls.expose().split(',') {
                let rest = url.trim().split_once("://").map_or(url.trim(), |(_, r)| r);
                let authority = rest.split('/').next().unwrap_or_default();
                let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
                let (host, port) = match authority.strip_prefix('[') {
                    Some(v6) => match v6.split_once(']') {
                        Some((h, p)) => (h, p.strip_prefix(':')),
                        None => continue,
                    },
                    None => match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    },
                };
                let port = port.and_then(|p| p.parse().ok()).unwrap_or(default_port);
                if !host.is_empty() {
                    hosts.push((host.to_owned(), port));
                }
            }
        }
        hosts
    }

    /// Reads secrets given as files (`OH_LLM_API_KEY_FILE`).
    ///
    /// # Errors
    /// A secret file cannot be read or is empty.
    pub fn load_secret_files(&mut self) -> anyhow::Result<()> {
        if let Some(path) = &self.llm_api_key_file {
            let key = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("OH_LLM_API_KEY_FILE {}: {e}", path.display()))?;
            let key = key.trim();
            if key.is_empty() {
                anyhow::bail!("OH_LLM_API_KEY_FILE {} is empty", path.display());
            }
            self.llm_api_key = Some(crate::llm::Secret::new(key));
        }
        Ok(())
    }

    /// The LLM of a conversation: the user's choice (from their settings, fixed at creation)
    /// over the worker's own. The worker's API key never goes to a base URL the user chose;
    /// a base URL at the control plane (NATS, Redis) is refused.
    ///
    /// # Errors
    /// [`crate::llm::LlmSetupError::BaseUrl`] for a base URL at the control plane.
    pub(crate) fn llm_config_for(
        &self,
        choice: Option<&shared::store::LlmChoice>,
    ) -> Result<Option<crate::llm::LlmConfig>, crate::llm::LlmSetupError> {
        let Some(choice) = choice else {
            return Ok(self.llm_config());
        };
        let own = self.llm_base_url.as_deref();
        let (base_url, api_key) = match choice.base_url.as_deref() {
            Some(url) if Some(url) != own => {
                if self.is_control_plane(url) {
                    return Err(crate::llm::LlmSetupError::BaseUrl {
                        reason: "it points at the server's control plane (NATS or Redis)".into(),
                    });
                }
                let key = choice
                    .api_key
                    .as_ref()
                    .map(|k| crate::llm::Secret::new(k.expose()));
                (url.to_owned(), key)
            }
            _ => match own {
                Some(url) => (
                    url.to_owned(),
                    match &choice.api_key {
                        Some(k) => Some(crate::llm::Secret::new(k.expose())),
                        None => self.llm_api_key.clone(),
                    },
                ),
                None => return Ok(None),
            },
        };
        Ok(self
            .llm_config()
            .map_or_else(
                || {
                    Some(crate::llm::LlmConfig {
                        base_url: base_url.clone(),
                        model: self.llm_model.clone(),
                        api_key: api_key.clone(),
                        timeout: self.llm_timeout,
                        max_retries: self.llm_num_retries,
                        retry_min: self.llm_retry_min,
                        retry_max: self.llm_retry_max,
                        prices: self.llm_prices.clone(),
                    })
                },
                |own| {
                    Some(crate::llm::LlmConfig {
                        base_url: base_url.clone(),
                        api_key: api_key.clone(),
                        ..own
                    })
                },
            )
            .map(|mut cfg| {
                if let Some(m) = &choice.model {
                    cfg.model.clone_from(m);
                }
                cfg
            }))
    }

    /// Whether `url` names a NATS or Redis address of this worker (loopback names equal).
    fn is_control_plane(&self, url: &str) -> bool {
        let Ok(u) = reqwest::Url::parse(url) else {
            return false; // refused later as an invalid URL
        };
        let Some(port) = u.port_or_known_default() else {
            return false;
        };
        let host = u.host_str().unwrap_or_default().trim_matches(['[', ']']);
        let loopback = |h: &str| {
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        };
        self.control_plane_hosts()
            .iter()
            .any(|(h, p)| *p == port && (h == host || (loopback(h) && loopback(host))))
    }

    /// The LLM settings, if an LLM is configured.
    pub fn llm_config(&self) -> Option<crate::llm::LlmConfig> {
        Some(crate::llm::LlmConfig {
            base_url: self.llm_base_url.clone()?,
            model: self.llm_model.clone(),
            api_key: self.llm_api_key.clone(),
            timeout: self.llm_timeout,
            max_retries: self.llm_num_retries,
            retry_min: self.llm_retry_min,
            retry_max: self.llm_retry_max,
            prices: self.llm_prices.clone(),
        })
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: u64 = s.parse().map_err(|_| "expected seconds".to_owned())?;
    if secs > 3600 {
        return Err("must be at most 3600 s".to_owned());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn control_plane_hosts_come_from_every_broker_url() {
        let args = Args::try_parse_from([
            "worker",
            "--nats-url",
            "nats://gw:secret@nats-0.example:4223,nats://10.0.0.7",
            "--redis-url",
            "redis://:pw@[fd00::5]:6380/0",
        ])
        .expect("args");
        assert_eq!(
            args.control_plane_hosts(),
            [
                ("nats-0.example".to_owned(), 4223),
                ("10.0.0.7".to_owned(), 4222),
                ("fd00::5".to_owned(), 6380)
            ]
        );
    }

    #[test]
    fn sandbox_settings_are_validated() {
        for bad in [
            vec!["--sandbox", "docker"],
            vec!["--sandbox-network", "host"],
            vec!["--sandbox-egress-allow", "10.0.0.0/33"],
            vec!["--sandbox-cpus", "0"],
            vec!["--sandbox-memory-mib", "1"],
        ] {
            let argv = std::iter::once("worker").chain(bad.iter().copied());
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?} accepted");
        }
        let args = Args::try_parse_from(["worker"]).expect("defaults");
        assert_eq!(
            (args.sandbox.as_str(), args.sandbox_network.as_str()),
            ("bwrap", "none")
        );
    }
}
