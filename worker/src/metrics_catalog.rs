//! Every metric the worker exports (names, help, known label values), registered at startup
//! ([`shared::telemetry::register`]); `deploy/monitoring/metrics.txt` lists the same names for
//! the dashboard and alerts, and a test checks both against a live `/metrics`.

use shared::telemetry::{Kind, MetricDef};

const fn def(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    label: Option<(&'static str, &'static [&'static str])>,
) -> MetricDef {
    MetricDef {
        name,
        kind,
        help,
        label,
    }
}

const SNAPSHOT_RESULTS: &[&str] = &["stored", "unchanged", "too_large", "fenced", "failed"];

/// The worker's metrics.
pub(crate) const METRICS: &[MetricDef] = &[
    def(
        "oh_worker_sessions_active",
        Kind::Gauge,
        "Sessions this worker runs.",
        None,
    ),
    def(
        "oh_worker_draining",
        Kind::Gauge,
        "1 while the worker drains (SIGTERM), else 0.",
        None,
    ),
    def(
        "oh_worker_start_queue_pending",
        Kind::Gauge,
        "Start requests no worker has taken yet (read every 15 s).",
        None,
    ),
    def(
        "oh_worker_claims_total",
        Kind::Counter,
        "Start requests handled, by result (started; failed; later: retried; skipped: not to run).",
        Some(("result", &["started", "failed", "later", "skipped"])),
    ),
    def(
        "oh_worker_claim_phase_seconds",
        Kind::Histogram,
        "Time of each phase of a claim (queued, lease, history, workspace, takeover, ...).",
        Some(("phase", &["queued", "first_events"])),
    ),
    def(
        "oh_worker_action_wait_seconds",
        Kind::Histogram,
        "An action's publish until its owner took it.",
        None,
    ),
    def(
        "oh_worker_action_apply_seconds",
        Kind::Histogram,
        "Applying an action (events appended, handled actions dropped).",
        None,
    ),
    def(
        "oh_worker_actions_taken_total",
        Kind::Counter,
        "Actions taken by their owner, by how: republished by the stream, or read from it \
         (at a claim, after a missed republish, on the recheck).",
        Some(("via", &["republish", "read"])),
    ),
    def(
        "oh_worker_events_appended_total",
        Kind::Counter,
        "Events appended to logs.",
        None,
    ),
    def(
        "oh_worker_fenced_total",
        Kind::Counter,
        "Writes refused because another worker took the session over (fencing).",
        None,
    ),
    def(
        "oh_worker_leases_lost_total",
        Kind::Counter,
        "Session leases lost.",
        None,
    ),
    def(
        "oh_worker_passivations_total",
        Kind::Counter,
        "Idle sessions with no client passivated.",
        None,
    ),
    def(
        "oh_worker_sweeper_resumes_total",
        Kind::Counter,
        "Sessions resumed after their worker died (failovers).",
        None,
    ),
    def(
        "oh_worker_sweeps_total",
        Kind::Counter,
        "Passes of the sweeper over every should-run session (a worker went silent, a sweep was asked for, or the periodic pass).",
        None,
    ),
    def(
        "oh_worker_interrupted_turns_total",
        Kind::Counter,
        "Turns found interrupted by a worker's death.",
        None,
    ),
    def(
        "oh_worker_duplicate_actions_total",
        Kind::Counter,
        "Redelivered actions recognised as applied.",
        None,
    ),
    def(
        "oh_worker_foreign_actions_total",
        Kind::Counter,
        "Actions dropped for not naming the conversation's owner.",
        None,
    ),
    def(
        "oh_worker_logs_full_total",
        Kind::Counter,
        "Appends refused by a full log.",
        None,
    ),
    def(
        "oh_worker_snapshots_total",
        Kind::Counter,
        "Workspace snapshots, by result.",
        Some(("result", SNAPSHOT_RESULTS)),
    ),
    def(
        "oh_worker_snapshot_seconds",
        Kind::Histogram,
        "Workspace snapshot time, by result.",
        Some(("result", SNAPSHOT_RESULTS)),
    ),
    def(
        "oh_worker_snapshot_bytes_uploaded_total",
        Kind::Counter,
        "Bytes of workspace chunks uploaded.",
        None,
    ),
    def(
        "oh_worker_snapshot_chunks_dropped_total",
        Kind::Counter,
        "Workspace chunks no snapshot uses any more, deleted.",
        None,
    ),
    def(
        "oh_worker_restore_seconds",
        Kind::Histogram,
        "Restoring a workspace from its snapshot.",
        None,
    ),
    def(
        "oh_worker_restore_bytes_total",
        Kind::Counter,
        "Bytes fetched to restore workspaces.",
        None,
    ),
    def(
        "oh_worker_workspaces_removed_total",
        Kind::Counter,
        "Local workspaces removed (deleted conversations, stale copies).",
        None,
    ),
    def(
        "oh_worker_egress_connections_total",
        Kind::Counter,
        "Sandbox connections through the egress proxy, by outcome.",
        Some(("outcome", &["connected", "failed", "refused"])),
    ),
    def(
        "oh_worker_files_queries_total",
        Kind::Counter,
        "Workspace queries (file list, contents, uploads, git) answered, by status.",
        Some(("status", &["200"])),
    ),
    def(
        "oh_worker_llm_requests_total",
        Kind::Counter,
        "LLM requests, by result (ok; retry: failed and retried; error: failed for good).",
        Some(("result", &["ok", "retry", "error"])),
    ),
    def(
        "oh_worker_llm_seconds",
        Kind::Histogram,
        "LLM request time.",
        None,
    ),
];
