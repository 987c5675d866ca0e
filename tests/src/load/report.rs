//! What a run reports: [`Report`] (serialized as the `--out` JSON), the final table, and the
//! SVG percentile plot of the latency distributions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use super::args::Plan;
use super::stats::{Metric, Stats, Summary};
use crate::check::Violation;

/// Floor figures (`--floor-nats`), milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Floor {
    /// NATS request-reply p50.
    pub nats_rtt_p50: f64,
    /// NATS request-reply p99.
    pub nats_rtt_p99: f64,
    /// JetStream publish-ack p50.
    pub js_ack_p50: f64,
    /// JetStream publish-ack p99.
    pub js_ack_p99: f64,
}

/// Memory at one point of the `many` ramp (or at the start and end of other scenarios).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemPoint {
    /// Connected sockets.
    pub sockets: u64,
    /// Conversations running (idle sessions).
    pub sessions: u64,
    /// Sum of gateway `VmRSS`, KiB.
    pub gateway_rss_kib: u64,
    /// Sum of worker `VmRSS`, KiB.
    pub worker_rss_kib: u64,
    /// `VmRSS` of the load tool itself, KiB.
    pub loadtest_rss_kib: u64,
    /// (gateway RSS − RSS at 0) / sockets.
    pub gateway_kib_per_socket: Option<f64>,
    /// (worker RSS − RSS at 0) / sessions.
    pub worker_kib_per_session: Option<f64>,
    /// (load tool RSS − RSS at 0) / sockets.
    pub loadtest_kib_per_socket: Option<f64>,
}

/// One step of the `scale` scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScaleStep {
    /// Workers in this step.
    pub workers: usize,
    /// Messages answered per second (all conversations).
    pub msgs_per_s: f64,
    /// Throughput relative to the first step.
    pub speedup: f64,
    /// Reply latency in this step.
    pub reply_ms: Summary,
    /// Busy fraction of all CPUs of the machine during the step (1.0 = saturated).
    pub machine_cpu_busy: Option<f64>,
    /// CPU seconds per second, by role (`gateway`, `worker`, `loadtest`).
    pub cpu_per_s: BTreeMap<String, f64>,
    /// Errors in this step.
    pub errors: u64,
}

/// Everything a run measured. The `--out` JSON is this struct; the per-metric summaries are
/// flattened to top-level keys (`reply_ms`, `connect_ms`, ...).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// The parameters used.
    pub plan: Option<Plan>,
    /// Gateways driven.
    pub gateways: Vec<String>,
    /// Wall time of the whole run, seconds.
    pub duration_s: f64,
    /// Length of the message phase, seconds.
    pub measure_s: f64,
    /// Per-metric percentiles, milliseconds (flattened: `reply_ms`, `ack_ms`, ...).
    #[serde(flatten)]
    pub metrics: BTreeMap<String, Summary>,
    /// Floor figures, if measured.
    pub floor_ms: Option<Floor>,
    /// Our figures over the floor's (`reply_p50_over_nats_rtt_p50`, ...).
    pub ratios: BTreeMap<String, f64>,
    /// Events expected by the replay/live rules but not received, over all clients.
    pub lost_events: u64,
    /// Extra copies of events received more than once, over all clients.
    pub duplicate_events: u64,
    /// Received events no rule sends.
    pub unexpected_events: u64,
    /// Clients that got the right events in the wrong order.
    pub out_of_order_clients: u64,
    /// Gaps in stored ids (should be 0..n).
    pub stored_gaps: u64,
    /// Clients whose events were checked.
    pub clients_checked: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Agent replies received by drivers.
    pub messages: u64,
    /// Replies per second during the message phase.
    pub msgs_per_s: f64,
    /// `oh_event`s received by clients per second (whole run).
    pub events_in_per_s: f64,
    /// `oh_user_action`s sent per second during the message phase.
    pub events_out_per_s: f64,
    /// Most sockets connected at once.
    pub sockets_peak: u64,
    /// Memory samples.
    pub memory: Vec<MemPoint>,
    /// CPU seconds per second of the run, by role.
    pub cpu_per_s: BTreeMap<String, f64>,
    /// `scale` steps.
    pub scale: Vec<ScaleStep>,
    /// Scenario-specific figures (burst: `all_running_s`; replay: `end_ratio_large_over_small`...).
    pub extra: BTreeMap<String, f64>,
    /// Remarks (scaled-down points, skipped measurements).
    pub notes: Vec<String>,
    /// The histograms behind the summaries (for the plot); not serialized.
    #[serde(skip)]
    pub histograms: Option<std::sync::Arc<Stats>>,
}

/// Metrics shown in the plot (the floor is drawn for reference).
const PLOTTED: [Metric; 17] = [
    Metric::Reply,
    Metric::UserEcho,
    Metric::Ack,
    Metric::Idle,
    Metric::FanoutReply,
    Metric::Connect,
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

impl Report {
    /// Adds one client's verdict ([`crate::check::verify_connection`]) to the counts.
    pub fn count_client(&mut self, verdict: &Result<(), Violation>) {
        self.clients_checked += 1;
        if let Err(v) = verdict {
            self.lost_events += v.lost;
            self.duplicate_events += v.duplicate;
            self.unexpected_events += v.unexpected;
            self.out_of_order_clients += u64::from(v.out_of_order);
        }
    }

    /// Fills the per-metric summaries, floor and ratios from `stats`.
    pub fn collect(&mut self, stats: &Stats) {
        for m in Metric::ALL {
            let s = stats.summary(m);
            if s.n > 0 || m == Metric::Reply {
                self.metrics.insert(m.key().to_owned(), s);
            }
        }
        let (rtt, ack) = (stats.summary(Metric::NatsRtt), stats.summary(Metric::JsAck));
        if rtt.n > 0 && ack.n > 0 {
            self.floor_ms = Some(Floor {
                nats_rtt_p50: rtt.p50,
                nats_rtt_p99: rtt.p99,
                js_ack_p50: ack.p50,
                js_ack_p99: ack.p99,
            });
            let reply = stats.summary(Metric::Reply);
            if reply.n > 0 {
                self.ratios
                    .insert("reply_p50_over_nats_rtt_p50".into(), reply.p50 / rtt.p50);
                self.ratios
                    .insert("reply_p50_over_js_ack_p50".into(), reply.p50 / ack.p50);
                self.ratios
                    .insert("reply_p99_over_nats_rtt_p99".into(), reply.p99 / rtt.p99);
            }
        }
        self.errors = stats.errors();
    }

    /// The final table and figures, as printed at the end of a run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nscenario {}  ({:.1} s; {} gateway(s))",
            self.scenario,
            self.duration_s,
            self.gateways.len()
        );
        let _ = writeln!(
            s,
            "{:<24}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "metric (ms)", "n", "p50", "p90", "p99", "p99.9", "max"
        );
        for m in Metric::ALL {
            if let Some(v) = self.metrics.get(m.key()).filter(|v| v.n > 0) {
                let _ = writeln!(
                    s,
                    "{:<24}{:>9}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>10.3}",
                    m.key().trim_end_matches("_ms"),
                    v.n,
                    v.p50,
                    v.p90,
                    v.p99,
                    v.p999,
                    v.max
                );
            }
        }
        for (k, v) in &self.ratios {
            let _ = writeln!(s, "ratio {k}: {v:.2}");
        }
        for (k, v) in &self.extra {
            let _ = writeln!(s, "{k}: {v:.3}");
        }
        let _ = writeln!(
            s,
            "messages {} ({:.1}/s) | events in {:.0}/s | actions out {:.1}/s | sockets peak {}",
            self.messages,
            self.msgs_per_s,
            self.events_in_per_s,
            self.events_out_per_s,
            self.sockets_peak
        );
        let _ = writeln!(
            s,
            "checked {} client(s): lost {} | duplicated {} | unexpected {} | out of order {} | stored gaps {}",
            self.clients_checked,
            self.lost_events,
            self.duplicate_events,
            self.unexpected_events,
            self.out_of_order_clients,
            self.stored_gaps
        );
        if !self.memory.is_empty() {
            let _ = writeln!(
                s,
                "{:>8}{:>9}{:>14}{:>14}{:>12}{:>14}{:>12}",
                "sockets",
                "sessions",
                "gateway KiB",
                "KiB/socket",
                "worker KiB",
                "KiB/session",
                "tool KiB"
            );
            for p in &self.memory {
                let f = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.1}"));
                let _ = writeln!(
                    s,
                    "{:>8}{:>9}{:>14}{:>14}{:>12}{:>14}{:>12}",
                    p.sockets,
                    p.sessions,
                    p.gateway_rss_kib,
                    f(p.gateway_kib_per_socket),
                    p.worker_rss_kib,
                    f(p.worker_kib_per_session),
                    p.loadtest_rss_kib
                );
            }
        }
        for st in &self.scale {
            let _ = writeln!(
                s,
                "scale workers {}: {:.1} msgs/s (x{:.2}), reply p50 {:.2} ms p99 {:.2} ms, machine CPU busy {}, cpu/s {:?}, errors {}",
                st.workers,
                st.msgs_per_s,
                st.speedup,
                st.reply_ms.p50,
                st.reply_ms.p99,
                st.machine_cpu_busy
                    .map_or("-".to_owned(), |b| format!("{:.0}%", b * 100.0)),
                st.cpu_per_s,
                st.errors
            );
        }
        if !self.cpu_per_s.is_empty() {
            let _ = writeln!(s, "cpu seconds per second: {:?}", self.cpu_per_s);
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "errors: none");
        } else {
            let _ = writeln!(s, "errors: {:?}", self.errors);
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}

/// Draws the percentile distribution of every plotted metric with samples.
///
/// # Errors
/// When the file cannot be written.
pub fn plot(stats: &Stats, title: &str, path: &Path) -> Result<(), String> {
    let series: Vec<(Metric, Vec<(f64, f64)>)> = PLOTTED
        .iter()
        .filter_map(|m| stats.histogram(*m).map(|h| (*m, h)))
        .map(|(m, h)| {
            let pts = h
                .iter_quantiles(2)
                .map(|v| {
                    let q = v.quantile_iterated_to().min(0.99999);
                    (1.0 / (1.0 - q), v.value_iterated_to() as f64 / 1000.0)
                })
                .collect();
            (m, pts)
        })
        .collect();
    if series.is_empty() {
        return Err("no latency samples to plot".to_owned());
    }
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(0.01_f64, f64::max)
        * 1.5;
    let ymin = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(f64::MAX, f64::min)
        .clamp(0.001, 1.0)
        / 1.5;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    let e = |x: &dyn std::fmt::Display| format!("plot {}: {x}", path.display());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1.0_f64..100_000.0).log_scale(), (ymin..ymax).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms, log)")
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 1.0 / x);
            if p < 1.0 {
                "0%".to_owned()
            } else {
                format!("{p:.3}%")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_owned()
            }
        })
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (m, pts)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let label = m.key().trim_end_matches("_ms");
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
