//! Every metric the gateway exports (names, help, known label values), registered at startup
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

/// The gateway's metrics.
pub(crate) const METRICS: &[MetricDef] = &[
    def(
        "oh_gateway_sockets",
        Kind::Gauge,
        "Connected Socket.IO clients.",
        None,
    ),
    def(
        "oh_gateway_session_subscriptions",
        Kind::Gauge,
        "Sessions this gateway subscribes to (one per session with sockets here).",
        None,
    ),
    def(
        "oh_gateway_tasks",
        Kind::Gauge,
        "Tokio tasks alive in the gateway.",
        None,
    ),
    def(
        "oh_gateway_actions_total",
        Kind::Counter,
        "User actions from sockets, by result (stored in JetStream, refused with an error to the client, failed on the server side).",
        Some(("result", &["stored", "refused", "failed"])),
    ),
    def(
        "oh_gateway_create_seconds",
        Kind::Histogram,
        "A conversation's create (limits, metadata, initial message, start request), as the gateway handled it.",
        None,
    ),
    def(
        "oh_gateway_action_publish_seconds",
        Kind::Histogram,
        "Publish of an action until JetStream stored it.",
        None,
    ),
    def(
        "oh_gateway_action_publish_failed_total",
        Kind::Counter,
        "Actions JetStream did not store, by reason (queue full, error).",
        Some(("reason", &["full", "error"])),
    ),
    def(
        "oh_gateway_reply_seconds",
        Kind::Histogram,
        "An action's publish until the first event after it, as this gateway saw them (reply latency).",
        None,
    ),
    def(
        "oh_gateway_events_sent_total",
        Kind::Counter,
        "Events sent to sockets.",
        None,
    ),
    def(
        "oh_gateway_replay_seconds",
        Kind::Histogram,
        "Replay of a conversation's history to a connecting socket.",
        None,
    ),
    def(
        "oh_gateway_conversations_created_total",
        Kind::Counter,
        "Conversations created.",
        None,
    ),
    def(
        "oh_gateway_connect_refused_total",
        Kind::Counter,
        "Socket connections refused, by reason.",
        Some(("reason", &["not_found", "server"])),
    ),
    def(
        "oh_gateway_slow_client_disconnects_total",
        Kind::Counter,
        "Sockets disconnected for not reading their events in time.",
        None,
    ),
    def(
        "oh_gateway_rate_limited_total",
        Kind::Counter,
        "Requests refused by a per-user rate limit, by kind.",
        Some(("kind", &["create", "message"])),
    ),
    def(
        "oh_gateway_user_cap_refusals_total",
        Kind::Counter,
        "Requests refused by a per-user cap, by cap.",
        Some(("cap", &["conversations", "sockets"])),
    ),
    def(
        "oh_gateway_resyncs_total",
        Kind::Counter,
        "Sockets that re-read the log after a NATS reconnect or a lag.",
        None,
    ),
    def(
        "oh_gateway_silence_resyncs_total",
        Kind::Counter,
        "Re-reads of a log's head after an expected event did not come.",
        None,
    ),
    def(
        "oh_gateway_gap_fills_total",
        Kind::Counter,
        "Gaps in a socket's event sequence filled from the log.",
        None,
    ),
    def(
        "oh_gateway_replays_from_birth_total",
        Kind::Counter,
        "First sockets of a conversation created through this gateway moments before, by where their replay came from: the feed joined at the create (`feed`, no log read) or the log (`log`: something was missing).",
        Some(("source", &["feed", "log"])),
    ),
    def(
        "oh_gateway_connects_abandoned_total",
        Kind::Counter,
        "Connects whose client left while the connect middleware waited (socketioxide never completed them); their socket slot and drain were given back.",
        None,
    ),
    def(
        "oh_gateway_log_read_retries_total",
        Kind::Counter,
        "Reads of the event log tried again after a transient JetStream failure (a timeout, a leader election), by path: a connect's checks, a replay, a live catch-up.",
        Some(("read", &["connect", "replay", "catch_up"])),
    ),
    def(
        "oh_gateway_msg_id_conflicts_total",
        Kind::Counter,
        "Actions refused for reusing a client msg_id with different content.",
        None,
    ),
    def(
        "oh_gateway_origin_refusals_total",
        Kind::Counter,
        "Requests refused for their Origin.",
        None,
    ),
];
