//! Measurements of one run: latency histograms (HdrHistogram, microsecond resolution, 3
//! significant digits), live counters for the progress line, and errors counted by kind.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// What a latency sample measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// Websocket open → Socket.IO CONNECT answered.
    Connect,
    /// Message sent → gateway ack (`{success:true}` after JetStream stored it).
    Ack,
    /// Message sent → the user's own message event back.
    UserEcho,
    /// Message sent → the agent's reply event (the headline number).
    Reply,
    /// Message sent → `awaiting_user_input` after the reply.
    Idle,
    /// Message sent → the reply at every other client of the conversation.
    FanoutReply,
    /// `POST /api/conversations` → its answer.
    CreateHttp,
    /// `POST /api/conversations` sent → first `awaiting_user_input` at a client.
    CreateReady,
    /// Reconnect near the end (`latest_event_id` = head − k) of the large conversation →
    /// replay done.
    ReplayEndLarge,
    /// The same on the small conversation.
    ReplayEndSmall,
    /// Reconnect from the start (`latest_event_id` = −1) of the large conversation → done.
    ReplayStartLarge,
    /// The same on the small conversation.
    ReplayStartSmall,
    /// Raw NATS request-reply round trip.
    NatsRtt,
    /// JetStream publish → ack.
    JsAck,
    /// long: the agent's step overhead (LLM answer → its next LLM request) with at most 30
    /// messages in the chat.
    StepEarly,
    /// long: the same with at least `--long-late-messages` messages in the chat.
    StepLate,
    /// long: [`Metric::StepEarly`] up to the head of the next request (its body not read yet:
    /// the agent's own work, without the body's transfer).
    StepEarlyHead,
    /// long: [`Metric::StepLate`] up to the head of the next request.
    StepLateHead,
}

impl Metric {
    /// Every metric, in table order.
    pub const ALL: [Metric; 18] = [
        Metric::Connect,
        Metric::Ack,
        Metric::UserEcho,
        Metric::Reply,
        Metric::Idle,
        Metric::FanoutReply,
        Metric::CreateHttp,
        Metric::CreateReady,
        Metric::ReplayEndLarge,
        Metric::ReplayEndSmall,
        Metric::ReplayStartLarge,
        Metric::ReplayStartSmall,
        Metric::NatsRtt,
        Metric::JsAck,
        Metric::StepEarly,
        Metric::StepLate,
        Metric::StepEarlyHead,
        Metric::StepLateHead,
    ];

    /// JSON key and table label.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Connect => "connect_ms",
            Metric::Ack => "ack_ms",
            Metric::UserEcho => "user_echo_ms",
            Metric::Reply => "reply_ms",
            Metric::Idle => "idle_ms",
            Metric::FanoutReply => "fanout_reply_ms",
            Metric::CreateHttp => "create_http_ms",
            Metric::CreateReady => "create_ready_ms",
            Metric::ReplayEndLarge => "replay_end_large_ms",
            Metric::ReplayEndSmall => "replay_end_small_ms",
            Metric::ReplayStartLarge => "replay_start_large_ms",
            Metric::ReplayStartSmall => "replay_start_small_ms",
            Metric::NatsRtt => "floor_nats_rtt_ms",
            Metric::JsAck => "floor_js_ack_ms",
            Metric::StepEarly => "step_early_ms",
            Metric::StepLate => "step_late_ms",
            Metric::StepEarlyHead => "step_early_head_ms",
            Metric::StepLateHead => "step_late_head_ms",
        }
    }
}

/// Percentiles of one metric, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub n: u64,
}

/// Shared by every task of a run.
#[derive(Debug)]
pub struct Stats {
    hists: Mutex<BTreeMap<Metric, Histogram<u64>>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Sockets currently connected.
    pub sockets: AtomicU64,
    /// `oh_event`s received by all clients.
    pub events_in: AtomicU64,
    /// `oh_user_action`s sent.
    pub actions_out: AtomicU64,
    /// Agent replies received by drivers.
    pub replies: AtomicU64,
    /// Conversations created.
    pub created: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            hists: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            sockets: AtomicU64::new(0),
            events_in: AtomicU64::new(0),
            actions_out: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            created: AtomicU64::new(0),
        }
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"))
}

impl Stats {
    /// Records one sample (saturated at 1 h).
    pub fn record(&self, metric: Metric, d: Duration) {
        let us = u64::try_from(d.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, 3_600_000_000);
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        // In bounds by the clamp above.
        let _ = h.entry(metric).or_insert_with(new_hist).record(us);
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: &str) {
        let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *e.entry(kind.to_owned()).or_default() += 1;
    }

    /// Counts `n` errors of `kind`.
    pub fn errors_add(&self, kind: &str, n: u64) {
        if n > 0 {
            let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
            *e.entry(kind.to_owned()).or_default() += n;
        }
    }

    /// Errors so far by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Total number of errors.
    pub fn error_count(&self) -> u64 {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }

    /// Percentiles of `metric` (all zero with `n = 0` if it has no sample).
    pub fn summary(&self, metric: Metric) -> Summary {
        let h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        h.get(&metric).map(summarize).unwrap_or_default()
    }

    /// A copy of the histogram of `metric`, if it has samples.
    pub fn histogram(&self, metric: Metric) -> Option<Histogram<u64>> {
        let h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        h.get(&metric).filter(|h| !h.is_empty()).cloned()
    }

    /// Forgets every sample of `metric` (e.g. after a warm-up).
    pub fn reset(&self, metric: Metric) {
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        h.remove(&metric);
    }

    /// A snapshot of a metric that is then cleared (scale steps).
    pub fn take(&self, metric: Metric) -> Summary {
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        h.remove(&metric)
            .as_ref()
            .map(summarize)
            .unwrap_or_default()
    }

    /// Adds the samples of `other` into `metric`.
    pub fn merge(&self, metric: Metric, other: &Histogram<u64>) {
        let mut h = self.hists.lock().unwrap_or_else(|e| e.into_inner());
        // Same bounds on both sides.
        let _ = h.entry(metric).or_insert_with(new_hist).add(other);
    }

    /// Bumps a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn summarize(h: &Histogram<u64>) -> Summary {
    if h.is_empty() {
        return Summary::default();
    }
    Summary {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        n: h.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_in_ms() {
        let s = Stats::default();
        for i in 1..=1000u64 {
            s.record(Metric::Reply, Duration::from_micros(i * 10));
        }
        let r = s.summary(Metric::Reply);
        assert_eq!(r.n, 1000);
        assert!((r.p50 - 5.0).abs() < 0.01, "{r:?}");
        assert!((r.max - 10.0).abs() < 0.01, "{r:?}");
        assert_eq!(s.summary(Metric::Ack).n, 0);
        s.error("x");
        s.error("x");
        assert_eq!(s.errors()["x"], 2);
    }
}
