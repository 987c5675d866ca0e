//! Command line of `loadtest` (every flag has a per-scenario default, see [`Plan`]).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Named scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// 1 conversation, 1 client, 1 message in flight: the reply latency.
    Latency,
    /// 1 conversation, 1,000 clients: delivery of every event to every client.
    Fanout,
    /// N idle conversations (one socket each) with 1% active; memory per socket and session.
    Many,
    /// 1,000 conversations created at once: create → ready, time until all run.
    Burst,
    /// Reconnect at the end of a 10,000-event conversation vs a 10-event one, and from start.
    Replay,
    /// The same load over 1, 2 and 4 workers, deployed through `deploy/local/cluster.sh`.
    Scale,
    /// One CodeAct conversation grown past 1,000 events against the tool's own instant LLM:
    /// the agent's step overhead (LLM time excluded) early vs late in the conversation.
    Long,
}

impl Scenario {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Latency => "latency",
            Scenario::Fanout => "fanout",
            Scenario::Many => "many",
            Scenario::Burst => "burst",
            Scenario::Replay => "replay",
            Scenario::Scale => "scale",
            Scenario::Long => "long",
        }
    }
}

/// `loadtest`: drives conversations over real Socket.IO against any deployment, checks that
/// no event is lost or duplicated, and reports latency percentiles, throughput, memory per
/// socket/session and ratios to the raw NATS floor.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadtest", version)]
pub struct Args {
    /// Scenario to run.
    #[arg(long, value_enum, default_value = "latency")]
    pub scenario: Scenario,
    /// Gateway base URL; repeat or comma-separate for several (clients are spread round-robin).
    #[arg(
        long = "gateway",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:3000"
    )]
    pub gateways: Vec<String>,
    /// Bearer token for REST and Socket.IO (deployments with `OH_AUTH_TOKENS`).
    #[arg(long, env = "OH_LOAD_TOKEN")]
    pub token: Option<String>,
    /// Conversations (scenario default: latency/fanout 1, many 10000, burst 1000, scale 100).
    #[arg(long)]
    pub conversations: Option<usize>,
    /// Clients per conversation (default: fanout 1000, others 1).
    #[arg(long)]
    pub clients: Option<usize>,
    /// Percentage of conversations that send messages (many: 1; others 100).
    #[arg(long)]
    pub active_pct: Option<f64>,
    /// Messages per second per active conversation; 0 = back to back. One message is in
    /// flight per conversation at a time (the next is sent after `awaiting_user_input`).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Messages per active conversation (0 = until `--duration-s`).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Length of the message phase in seconds (when `--messages` is 0).
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// First messages of each conversation left out of the histograms.
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Spread socket connects evenly over this many seconds (0: as fast as
    /// `--connect-concurrency` allows).
    #[arg(long, default_value_t = 0.0)]
    pub ramp_s: f64,
    /// Socket connects in flight at once.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// REST creates in flight at once (burst: all at once unless set).
    #[arg(long)]
    pub create_concurrency: Option<usize>,
    /// replay: events of the large conversation.
    #[arg(long, default_value_t = 10_000)]
    pub replay_events: u64,
    /// replay: events of the small conversation.
    #[arg(long, default_value_t = 10)]
    pub replay_small_events: u64,
    /// replay: reconnects measured per case (the full replay of the large one uses a tenth).
    #[arg(long, default_value_t = 200)]
    pub reconnects: usize,
    /// replay: "at the end" means `latest_event_id = head - this`.
    #[arg(long, default_value_t = 4)]
    pub replay_tail: u64,
    /// long: grow the conversation to this many events.
    #[arg(long, default_value_t = 1_200)]
    pub long_events: u64,
    /// long: agent steps (a `think` tool call and its observation) per user message.
    #[arg(long, default_value_t = 20)]
    pub long_steps_per_turn: u32,
    /// long: a step counts as late once the chat sent to the LLM has this many messages (and
    /// as early while it has at most 30).
    #[arg(long, default_value_t = 1_000)]
    pub long_late_messages: usize,
    /// long: address of the tool's own OpenAI-compatible LLM (answers at once, records the
    /// time between its answer and the agent's next request). The deployment's workers must
    /// use it: `OH_LLM_BASE_URL=http://ADDR/v1` (set for `--deploy`). Port 0: any free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub llm_listen: std::net::SocketAddr,
    /// scale: worker counts to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub scale_workers: Vec<usize>,
    /// Measure the raw NATS floor (request-reply, JetStream publish-ack) against this NATS.
    #[arg(long)]
    pub floor_nats: Option<String>,
    /// burst: also count the broker operations (JetStream API requests, acks, stream
    /// publishes) per new conversation, observed on `--floor-nats` (which must see every
    /// subject). The observer adds load: use a run of its own for this.
    #[arg(long)]
    pub count_js_ops: bool,
    /// Samples per floor measurement.
    #[arg(long, default_value_t = 2000)]
    pub floor_samples: usize,
    /// Gateway pid to sample RSS/CPU of (repeatable).
    #[arg(long = "gateway-pid")]
    pub gateway_pids: Vec<u32>,
    /// Worker pid to sample RSS/CPU of (repeatable).
    #[arg(long = "worker-pid")]
    pub worker_pids: Vec<u32>,
    /// Read gateway/worker pids from `<dir>/pids` (a `deploy/local/cluster.sh` state dir).
    #[arg(long, env = "OH_DEPLOY_DIR")]
    pub deploy_dir: Option<PathBuf>,
    /// many: socket counts at which memory is sampled.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,5000,10000")]
    pub mem_points: Vec<usize>,
    /// Start a deployment for this run with `deploy/local/cluster.sh` (always for `scale`).
    #[arg(long)]
    pub deploy: bool,
    /// Gateways of a deployment the tool starts.
    #[arg(long, default_value_t = 1)]
    pub deploy_gateways: usize,
    /// Workers of a deployment the tool starts (not `scale`).
    #[arg(long, default_value_t = 2)]
    pub deploy_workers: usize,
    /// First gateway port of a deployment the tool starts.
    #[arg(long, default_value_t = 3100)]
    pub deploy_port: u16,
    /// `OH_DEPLOY_DIR` of a deployment the tool starts (default `/tmp/oh-loadtest-deploy`).
    #[arg(long)]
    pub deploy_state_dir: Option<PathBuf>,
    /// `deploy/local/cluster.sh` (default: the one of this workspace).
    #[arg(long)]
    pub deploy_script: Option<PathBuf>,
    /// NATS of a deployment the tool starts (with credentials of a user that may do
    /// everything: admin). Default: `cluster.sh` runs its own with a user per role.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Redis of a deployment the tool starts (admin credentials). Default: `cluster.sh` runs
    /// its own with a user per role.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// `OH_MAX_SESSIONS` per worker of a deployment the tool starts.
    #[arg(long, default_value_t = 20_000)]
    pub max_sessions: u32,
    /// Keep the namespace's streams and keys after a deployment the tool started.
    #[arg(long)]
    pub keep: bool,
    /// Deadline of one wait (a reply, a connect, readiness of one conversation), seconds.
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// Write the JSON result here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the SVG latency plot here (default: `--out` with `.svg`).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// Scenario parameters after defaults.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    /// Conversations.
    pub conversations: usize,
    /// Clients per conversation.
    pub clients: usize,
    /// Active conversations.
    pub active: usize,
    /// Messages per second per active conversation (0: back to back).
    pub rate: f64,
    /// Messages per active conversation (0: until the duration).
    pub messages: u64,
    /// Message phase length, seconds.
    pub duration_s: f64,
    /// Warm-up messages per conversation.
    pub warmup: u64,
}

impl Args {
    /// Parameters of the chosen scenario, flags over scenario defaults.
    pub fn plan(&self) -> Plan {
        let (conv, clients, pct, rate, msgs, dur, warm) = match self.scenario {
            Scenario::Latency => (1, 1, 100.0, 0.0, 2000, 60.0, 100),
            Scenario::Fanout => (1, 1000, 100.0, 2.0, 0, 30.0, 2),
            Scenario::Many => (10_000, 1, 1.0, 1.0, 0, 60.0, 1),
            Scenario::Burst => (1000, 1, 0.0, 0.0, 0, 0.0, 0),
            Scenario::Replay => (2, 1, 100.0, 0.0, 0, 0.0, 0),
            Scenario::Scale => (100, 1, 100.0, 0.0, 0, 20.0, 2),
            Scenario::Long => (1, 1, 100.0, 0.0, 0, 0.0, 0),
        };
        let conversations = self.conversations.unwrap_or(conv).max(1);
        let pct = self.active_pct.unwrap_or(pct).clamp(0.0, 100.0);
        let active = if pct <= 0.0 {
            0
        } else {
            ((conversations as f64 * pct / 100.0).round() as usize).clamp(1, conversations)
        };
        Plan {
            conversations,
            clients: self.clients.unwrap_or(clients).max(1),
            active,
            rate: self.rate.unwrap_or(rate).max(0.0),
            messages: self.messages.unwrap_or(msgs),
            duration_s: self.duration_s.unwrap_or(dur).max(0.0),
            warmup: self.warmup.unwrap_or(warm),
        }
    }
}
