//! Tracing and Prometheus metrics setup, the same for both binaries.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON lines.
//! Metrics are recorded with the `metrics` facade and rendered by a Prometheus recorder whose
//! handle the binaries expose on `GET /metrics`.

use async_nats::HeaderMap;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP trace exporter: {0}")]
pub struct TracingError(String);

/// Keeps the trace exporter alive; dropping it (at the end of `main`) sends the spans still
/// buffered.
#[must_use = "dropping the guard stops the trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace export shutdown: {e}");
        }
    }
}

/// `OH_OTLP_ENDPOINT`: an `http(s)://host[:port][/path]` base URL, kept without a trailing `/`.
///
/// # Errors
/// A line naming what is wrong.
pub fn parse_otlp_endpoint(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("{s:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        return Err(format!("{s:?} has no host"));
    }
    Ok(s.to_owned())
}

/// Installs the global tracing subscriber: logs to stderr (filtered by `RUST_LOG`, default
/// `info`), and, with `otlp` set, the same spans exported as OpenTelemetry traces of service
/// `service` (batched; the `OTEL_BSP_*` variables tune the batching). Call once, from `main`.
///
/// # Errors
/// [`TracingError`] if the exporter cannot be built.
pub fn init_tracing(
    json: bool,
    otlp: Option<&str>,
    service: &'static str,
) -> Result<Telemetry, TracingError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let provider = match otlp {
        Some(base) => {
            // The exporter's HTTP client (reqwest with rustls, built without a default crypto
            // provider in this workspace) needs a process-wide provider: ring, as NATS uses.
            // Already installed (a second call) is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(format!("{base}/v1/traces"))
                .build()
                .map_err(|e| TracingError(e.to_string()))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    // try_init fails only if a subscriber is already set (e.g. twice in one test process).
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(Telemetry { provider })
}

/// The header that carries a message's trace context (W3C `traceparent`).
pub const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// NATS headers as the propagator's carrier (writing).
struct HeadersOut<'a>(&'a mut HeaderMap);

impl Injector for HeadersOut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// NATS headers as the propagator's carrier (reading).
struct HeadersIn<'a>(&'a HeaderMap);

impl Extractor for HeadersIn<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(async_nats::HeaderValue::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// Adds the current span's trace context to a NATS message's headers (nothing when traces are
/// off or no span is recorded), so the process that handles the message continues the trace.
pub fn inject_trace(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeadersOut(headers));
    }
}

/// A reference to a span's place in a trace, kept to make later spans its children without
/// keeping it open (an exported span is sent when it closes). Empty when traces are off.
#[derive(Debug, Clone, Default)]
pub struct TraceLink(Option<opentelemetry::Context>);

impl TraceLink {
    /// The current span's place (empty if it is not recorded in a trace).
    pub fn current() -> TraceLink {
        let cx = tracing::Span::current().context();
        TraceLink(cx.span().span_context().is_valid().then_some(cx))
    }

    /// Makes `span` a child of the linked span in the trace (nothing if empty).
    pub fn adopt(&self, span: &tracing::Span) {
        if let Some(cx) = &self.0 {
            let _ = span.set_parent(cx.clone());
        }
    }
}

/// Makes `span` a child of the trace context a NATS message carries, if it carries a valid
/// one (a missing or malformed `traceparent` leaves the span a root: never an error).
pub fn continue_trace(span: &tracing::Span, headers: Option<&HeaderMap>) {
    let Some(headers) = headers else { return };
    if headers.get(TRACEPARENT).is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeadersIn(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the Prometheus recorder")]
pub struct MetricsError(#[source] metrics_exporter_prometheus::BuildError);

/// Installs the global Prometheus recorder and returns the handle that renders it.
///
/// # Errors
/// [`MetricsError`] if a recorder is already installed.
pub fn init_metrics() -> Result<PrometheusHandle, MetricsError> {
    PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ])
        .map_err(MetricsError)?
        .install_recorder()
        .map_err(MetricsError)
}

/// What a metric is, for [`register`].
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Distribution of values (seconds unless the name says otherwise).
    Histogram,
}

/// One metric a binary exports: its name, kind, help text, and the values of its one label
/// (if it has one) known in advance.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// Prometheus name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// `# HELP` text.
    pub help: &'static str,
    /// Label name and its values, each registered at zero.
    pub label: Option<(&'static str, &'static [&'static str])>,
}

/// Describes every metric of a binary and registers each series at zero, so that `/metrics`
/// lists all of them from the start (dashboards and alerts see a 0, not a missing series).
pub fn register(defs: &[MetricDef]) {
    for d in defs {
        let labels: Vec<Vec<(&'static str, &'static str)>> = match d.label {
            Some((key, values)) => values.iter().map(|v| vec![(key, *v)]).collect(),
            None => vec![Vec::new()],
        };
        match d.kind {
            Kind::Counter => {
                metrics::describe_counter!(d.name, d.help);
                for l in &labels {
                    metrics::counter!(d.name, l).increment(0);
                }
            }
            Kind::Gauge => {
                metrics::describe_gauge!(d.name, d.help);
                for l in &labels {
                    metrics::gauge!(d.name, l).increment(0.0);
                }
            }
            Kind::Histogram => {
                metrics::describe_histogram!(d.name, metrics::Unit::Seconds, d.help);
                for l in &labels {
                    let _ = metrics::histogram!(d.name, l);
                }
            }
        }
    }
}
