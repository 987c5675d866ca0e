//! Building blocks shared by the scenarios: create conversations, connect clients (ramped,
//! round-robin over the gateways), wait until they are ready, drive messages, sample memory
//! and CPU, and check every client's events against the log at the end.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::args::{Args, Plan};
use super::client::{Client, ConnectSpec, Conv, Role};
use super::procfs::{self, Pid};
use super::report::{MemPoint, Report};
use super::rest::Rest;
use super::stats::{Metric, Stats};
use crate::check::{Extent, Violation, expected_last, stored_gaps, verify_connection};

/// Everything a scenario works with.
pub(crate) struct Ctx {
    pub(crate) args: Args,
    pub(crate) plan: Plan,
    pub(crate) gateways: Vec<String>,
    pub(crate) rest: Rest,
    pub(crate) stats: Arc<Stats>,
    pub(crate) pids: Vec<Pid>,
    pub(crate) timeout: Duration,
    pub(crate) report: Report,
    pub(crate) phase: Arc<std::sync::Mutex<String>>,
    rr: AtomicUsize,
}

impl Ctx {
    pub(crate) fn new(
        args: Args,
        gateways: Vec<String>,
        pids: Vec<Pid>,
        rest: Rest,
        stats: Arc<Stats>,
    ) -> Ctx {
        let plan = args.plan();
        let timeout = Duration::from_secs_f64(args.timeout_s.max(0.1));
        Ctx {
            args,
            plan,
            gateways,
            rest,
            stats,
            pids,
            timeout,
            report: Report::default(),
            phase: Arc::new(std::sync::Mutex::new("start".to_owned())),
            rr: AtomicUsize::new(0),
        }
    }

    /// The next gateway, round-robin.
    pub(crate) fn next_gateway(&self) -> String {
        let i = self.rr.fetch_add(1, Ordering::Relaxed);
        self.gateways[i % self.gateways.len()].clone()
    }

    pub(crate) fn set_phase(&self, p: &str) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = p.to_owned();
    }
}

/// A client plus what the check needs to know about its connect.
pub(crate) struct Conn {
    pub(crate) client: Client,
    /// Head read before connecting, if known.
    pub(crate) hint: Option<i64>,
}

/// Creates `n` conversations (`concurrency` creates in flight), round-robin over the gateways.
/// Returns each with the instant its create was sent; failures are counted as errors.
pub(crate) async fn create_many(
    ctx: &Ctx,
    n: usize,
    concurrency: usize,
) -> Vec<(Arc<Conv>, Instant)> {
    let futs = (0..n).map(|_| {
        let base = ctx.next_gateway();
        async move {
            let t0 = Instant::now();
            match ctx.rest.create(&base, None).await {
                Ok(id) => {
                    ctx.stats.record(Metric::CreateHttp, t0.elapsed());
                    Stats::inc(&ctx.stats.created);
                    Some((Conv::new(id, ctx.plan.warmup), t0))
                }
                Err(e) => {
                    ctx.stats.error(&e.kind());
                    None
                }
            }
        }
    });
    futures::stream::iter(futs)
        .buffer_unordered(concurrency.max(1))
        .filter_map(|x| async move { x })
        .collect()
        .await
}

/// Connects one client per spec (ramped over `--ramp-s`, `--connect-concurrency` at once).
/// Failures are counted as errors and left out.
pub(crate) async fn connect_many(
    ctx: &Ctx,
    specs: Vec<(Arc<Conv>, i64, Option<i64>, Role)>,
) -> Vec<Conn> {
    let n = specs.len().max(1);
    let start = tokio::time::Instant::now();
    let ramp = Duration::from_secs_f64(ctx.args.ramp_s.max(0.0));
    let futs = specs
        .into_iter()
        .enumerate()
        .map(|(i, (conv, latest, hint, role))| {
            let spec = ConnectSpec {
                base_url: ctx.next_gateway(),
                conv,
                latest,
                token: ctx.args.token.clone(),
                role,
                timeout: ctx.timeout,
            };
            let at = start + ramp.mul_f64(i as f64 / n as f64);
            let stats = ctx.stats.clone();
            async move {
                tokio::time::sleep_until(at).await;
                Client::connect(spec, stats)
                    .await
                    .ok()
                    .map(|client| Conn { client, hint })
            }
        });
    futures::stream::iter(futs)
        .buffer_unordered(ctx.args.connect_concurrency.max(1))
        .filter_map(|x| async move { x })
        .collect()
        .await
}

/// Waits (each at most `timeout`, all concurrently) until every client saw
/// `awaiting_user_input`; returns how many did. The others count as `ready_timeout`.
pub(crate) async fn wait_ready(ctx: &Ctx, conns: &[Conn], timeout: Duration) -> usize {
    let futs = conns.iter().map(|c| {
        let mut rx = c.client.probe.ready.subscribe();
        async move {
            tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
                .await
                .is_ok_and(|r| r.is_ok())
        }
    });
    let ok = futures::future::join_all(futs)
        .await
        .into_iter()
        .filter(|x| *x)
        .count();
    ctx.stats
        .errors_add("ready_timeout", (conns.len() - ok) as u64);
    ok
}

/// Drives every `Role::Driver` connection: one message in flight per conversation, at the
/// plan's rate, for its message count or duration. Returns the connections and the wall time
/// of the phase.
pub(crate) async fn drive(ctx: &Ctx, drivers: Vec<Conn>) -> (Vec<Conn>, Duration) {
    let plan = &ctx.plan;
    let n = drivers.len().max(1);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(plan.duration_s);
    let interval = (plan.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / plan.rate));
    let futs = drivers.into_iter().enumerate().map(|(i, conn)| {
        let stats = ctx.stats.clone();
        let timeout = ctx.timeout;
        let (messages, warmup) = (plan.messages, plan.warmup);
        async move {
            let mut done = conn.client.probe.done.subscribe();
            // Spread the first sends of paced conversations over one interval.
            let mut next = tokio::time::Instant::now()
                + interval.map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / n as f64));
            let mut k = 0u64;
            // Bounded by the message count or the deadline (plus warm-up messages).
            loop {
                let now = tokio::time::Instant::now();
                if messages > 0 && k >= messages + warmup {
                    break;
                }
                if messages == 0 && now >= deadline && k >= warmup {
                    break;
                }
                if k > 100_000_000 {
                    break;
                }
                if let Some(iv) = interval {
                    tokio::time::sleep_until(next).await;
                    next = (next + iv).max(tokio::time::Instant::now());
                }
                let seq = conn.client.conv.next_seq(Instant::now());
                if !conn.client.send_message(seq).await {
                    stats.error("send_failed");
                    break;
                }
                Stats::inc(&stats.actions_out);
                let want = i64::try_from(seq).unwrap_or(i64::MAX);
                match tokio::time::timeout(timeout, done.wait_for(|d| *d >= want)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => {
                        stats.error("driver_disconnected");
                        break;
                    }
                    Err(_) => {
                        stats.error("reply_timeout");
                        break;
                    }
                }
                k += 1;
            }
            conn
        }
    });
    let conns = futures::future::join_all(futs).await;
    (conns, started.elapsed())
}

/// Closes every connection and checks what each received against its conversation's log
/// (read once per conversation after waiting, at most 15 s in all, for the clients to catch
/// up). Adds lost/duplicate/... counts to the report.
pub(crate) async fn verify(ctx: &mut Ctx, conns: Vec<Conn>) {
    ctx.set_phase("verify");
    let mut by_conv: HashMap<String, Vec<Conn>> = HashMap::new();
    for c in conns {
        by_conv.entry(c.client.conv.id.clone()).or_default().push(c);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let base = ctx.gateways[0].clone();
    let rest = ctx.rest.clone();
    let stats = ctx.stats.clone();
    let futs = by_conv.into_iter().map(|(id, conns)| {
        let (base, rest, stats) = (base.clone(), rest.clone(), stats.clone());
        async move {
            let stored = match rest.events(&base, &id).await {
                Ok(s) => s,
                Err(e) => {
                    stats.error(&e.kind());
                    return (0, Vec::new());
                }
            };
            let mut verdicts = Vec::with_capacity(conns.len());
            for c in conns {
                let target = expected_last(&stored, c.client.latest, c.hint);
                let mut rx = c.client.probe.events.subscribe();
                let probe = c.client.probe.clone();
                let caught_up = || probe.max_id.load(Ordering::Relaxed) >= target;
                // Bounded by the shared deadline.
                while !caught_up() {
                    if tokio::time::timeout_at(deadline, rx.changed())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    if rx.has_changed().is_err() && !caught_up() {
                        break;
                    }
                }
                let (latest, hint) = (c.client.latest, c.hint);
                let got = c.client.finish().await;
                verdicts.push(verify_connection(
                    &stored,
                    latest,
                    hint,
                    &got,
                    Extent::Complete,
                ));
            }
            (stored_gaps(&stored), verdicts)
        }
    });
    let results: Vec<(u64, Vec<Result<(), Violation>>)> = futures::stream::iter(futs)
        .buffer_unordered(32)
        .collect()
        .await;
    for (gaps, verdicts) in results {
        ctx.report.stored_gaps += gaps;
        for verdict in &verdicts {
            ctx.report.count_client(verdict);
        }
    }
}

/// RSS now, relative to `base` (the point at 0) where given.
pub(crate) fn mem_point(
    pids: &[Pid],
    sockets: u64,
    sessions: u64,
    base: Option<&MemPoint>,
) -> MemPoint {
    let mut p = MemPoint {
        sockets,
        sessions,
        gateway_rss_kib: procfs::rss_sum(pids, "gateway"),
        worker_rss_kib: procfs::rss_sum(pids, "worker"),
        loadtest_rss_kib: procfs::rss_kib(std::process::id()).unwrap_or(0),
        ..MemPoint::default()
    };
    if let Some(b) = base {
        let per =
            |now: u64, then: u64, n: u64| (n > 0).then(|| (now as f64 - then as f64) / n as f64);
        p.gateway_kib_per_socket = per(p.gateway_rss_kib, b.gateway_rss_kib, sockets);
        p.worker_kib_per_session = per(p.worker_rss_kib, b.worker_rss_kib, sessions);
        p.loadtest_kib_per_socket = per(p.loadtest_rss_kib, b.loadtest_rss_kib, sockets);
    }
    p
}

/// CPU seconds by role (`gateway`, `worker`, `loadtest`) and machine jiffies, for rates.
#[derive(Debug, Clone)]
pub(crate) struct CpuMark {
    at: Instant,
    by_role: Vec<(&'static str, f64)>,
    machine: Option<(u64, u64)>,
}

pub(crate) fn cpu_mark(pids: &[Pid]) -> CpuMark {
    CpuMark {
        at: Instant::now(),
        by_role: vec![
            ("gateway", procfs::cpu_sum(pids, "gateway")),
            ("worker", procfs::cpu_sum(pids, "worker")),
            ("loadtest", procfs::cpu_s(std::process::id()).unwrap_or(0.0)),
        ],
        machine: procfs::machine_jiffies(),
    }
}

/// CPU seconds per second by role between two marks, and the machine's busy fraction.
pub(crate) fn cpu_rates(
    a: &CpuMark,
    b: &CpuMark,
    has_pids: bool,
) -> (std::collections::BTreeMap<String, f64>, Option<f64>) {
    let dt = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let rates = a
        .by_role
        .iter()
        .zip(&b.by_role)
        .filter(|((role, _), _)| has_pids || *role == "loadtest")
        .map(|((role, x), (_, y))| ((*role).to_owned(), (y - x) / dt))
        .collect();
    (rates, procfs::busy_between(a.machine, b.machine))
}

/// The live progress line (stderr): once a second on a terminal (rewritten in place), every
/// 5 s otherwise. Runs until aborted.
pub(crate) fn spawn_progress(ctx: &Ctx) -> Option<tokio::task::JoinHandle<()>> {
    if ctx.args.quiet {
        return None;
    }
    let stats = ctx.stats.clone();
    let phase = ctx.phase.clone();
    let tty = std::io::stderr().is_terminal();
    let every = Duration::from_secs(if tty { 1 } else { 5 });
    Some(tokio::spawn(async move {
        let start = Instant::now();
        let mut last = (0u64, 0u64, Instant::now());
        loop {
            tokio::time::sleep(every).await;
            let ev = stats.events_in.load(Ordering::Relaxed);
            let out = stats.actions_out.load(Ordering::Relaxed);
            let dt = last.2.elapsed().as_secs_f64().max(1e-3);
            let r = stats.summary(Metric::Reply);
            let line = format!(
                "[{:>6.1}s] {:<10} sockets {:>6} | created {:>6} | sent {:>7} ({:>6.1}/s) | replies {:>7} | events in {:>7.0}/s | errors {:>4} | reply p50 {:.2} ms p99 {:.2} ms",
                start.elapsed().as_secs_f64(),
                phase.lock().map(|p| p.clone()).unwrap_or_default(),
                stats.sockets.load(Ordering::Relaxed),
                stats.created.load(Ordering::Relaxed),
                out,
                (out - last.1) as f64 / dt,
                stats.replies.load(Ordering::Relaxed),
                (ev - last.0) as f64 / dt,
                stats.error_count(),
                r.p50,
                r.p99,
            );
            last = (ev, out, Instant::now());
            if tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
        }
    }))
}
