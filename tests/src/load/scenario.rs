//! The named scenarios. Each fills `ctx.report` and leaves every connection closed.
//!
//! - [`conversations`] is `latency`, `fanout`, `many` and one step of `scale`: create the
//!   conversations (in stages at the memory points for `many`), connect the first client of
//!   each and wait until the agent is ready, connect the other clients, drive the active
//!   conversations, then check every client's events.
//! - [`burst`]: every create at once, each followed by a client; create → ready.
//! - [`replay`]: a large and a small conversation, then timed reconnects near their end and
//!   from their start.
//! - [`scale`]: [`conversations`] once per worker count, each on a fresh deployment.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::LoadError;
use super::client::{Client, ConnectSpec, Conv, Role};
use super::deploy::Deployer;
use super::report::{MemPoint, ScaleStep};
use super::run::{
    Conn, Ctx, connect_many, cpu_mark, cpu_rates, create_many, drive, mem_point, verify, wait_ready,
};
use super::stats::{Metric, Stats};
use crate::check::{Extent, expected_ids, stored_gaps, verify_connection};

/// Stages of conversation counts: the memory points below `n`, then `n`.
fn stages(points: &[usize], n: usize, memory: bool) -> Vec<usize> {
    let mut s: Vec<usize> = if memory {
        points
            .iter()
            .copied()
            .filter(|p| *p > 0 && *p < n)
            .collect()
    } else {
        Vec::new()
    };
    s.push(n);
    s.sort_unstable();
    s.dedup();
    s
}

/// `latency`, `fanout`, `many`, and each `scale` step.
///
/// # Errors
/// Only for failures that make the run meaningless (no conversation could be created).
pub(crate) async fn conversations(ctx: &mut Ctx, memory: bool) -> Result<(), LoadError> {
    let plan = ctx.plan.clone();
    let has_pids = !ctx.pids.is_empty();
    let memory = memory && has_pids;
    let points = ctx.args.mem_points.clone();
    let mut base: Option<MemPoint> = None;
    if memory {
        let b = mem_point(&ctx.pids, 0, 0, None);
        ctx.report.memory.push(b.clone());
        base = Some(b);
        if points.iter().any(|p| *p > plan.conversations) {
            ctx.report.notes.push(format!(
                "memory points above {} conversations skipped (--conversations)",
                plan.conversations
            ));
        }
    }
    let mut firsts: Vec<Conn> = Vec::new();
    let mut convs: Vec<Arc<Conv>> = Vec::new();
    let create_conc = ctx.args.create_concurrency.unwrap_or(32);
    for stage in stages(&points, plan.conversations, memory) {
        ctx.set_phase("create");
        let new = create_many(ctx, stage - convs.len(), create_conc).await;
        let specs = new
            .iter()
            .enumerate()
            .map(|(i, (c, _))| {
                let role = if convs.len() + i < plan.active {
                    Role::Driver
                } else {
                    Role::Quiet
                };
                (c.clone(), -1, None, role)
            })
            .collect();
        convs.extend(new.into_iter().map(|(c, _)| c));
        ctx.set_phase("connect");
        let conns = connect_many(ctx, specs).await;
        ctx.set_phase("ready");
        let ready_timeout = ctx.timeout + Duration::from_millis(20 * conns.len() as u64);
        wait_ready(ctx, &conns, ready_timeout).await;
        firsts.extend(conns);
        if memory {
            // Let allocators and lazily started tasks settle before sampling.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let n = ctx.stats.sockets.load(Ordering::Relaxed);
            ctx.report
                .memory
                .push(mem_point(&ctx.pids, n, convs.len() as u64, base.as_ref()));
        }
    }
    if convs.is_empty() {
        return Err(LoadError::Setup(
            "no conversation could be created".to_owned(),
        ));
    }

    // The other clients of each conversation, told the head they connect at.
    let mut others: Vec<Conn> = Vec::new();
    if plan.clients > 1 {
        ctx.set_phase("connect");
        let mut specs = Vec::new();
        for (i, conv) in convs.iter().enumerate() {
            let head = match ctx.rest.head(&ctx.gateways[0], &conv.id).await {
                Ok(h) => Some(h),
                Err(e) => {
                    ctx.stats.error(&e.kind());
                    None
                }
            };
            let role = if i < plan.active {
                Role::Watcher
            } else {
                Role::Quiet
            };
            for _ in 1..plan.clients {
                specs.push((conv.clone(), -1, head, role));
            }
        }
        others = connect_many(ctx, specs).await;
        ctx.set_phase("ready");
        wait_ready(ctx, &others, ctx.timeout).await;
    }
    ctx.report.sockets_peak = ctx.stats.sockets.load(Ordering::Relaxed);
    if memory && plan.clients > 1 {
        ctx.report.memory.push(mem_point(
            &ctx.pids,
            ctx.report.sockets_peak,
            convs.len() as u64,
            base.as_ref(),
        ));
    }

    let (drivers, idle): (Vec<Conn>, Vec<Conn>) = firsts
        .into_iter()
        .partition(|c| c.client.role == Role::Driver && c.client.probe.ready.borrow().is_some());
    ctx.set_phase("messages");
    let before = cpu_mark(&ctx.pids);
    let sent_before = ctx.stats.actions_out.load(Ordering::Relaxed);
    let replies_before = ctx.stats.replies.load(Ordering::Relaxed);
    let (drivers, took) = drive(ctx, drivers).await;
    let after = cpu_mark(&ctx.pids);
    let secs = took.as_secs_f64().max(1e-3);
    ctx.report.measure_s = secs;
    let replies = ctx.stats.replies.load(Ordering::Relaxed) - replies_before;
    ctx.report.msgs_per_s = replies as f64 / secs;
    ctx.report.events_out_per_s =
        (ctx.stats.actions_out.load(Ordering::Relaxed) - sent_before) as f64 / secs;
    let (rates, busy) = cpu_rates(&before, &after, has_pids);
    ctx.report.cpu_per_s = rates;
    if let Some(b) = busy {
        ctx.report.extra.insert("machine_cpu_busy".into(), b);
    }

    let mut all = drivers;
    all.extend(idle);
    all.extend(others);
    verify(ctx, all).await;
    Ok(())
}

/// `burst`: every create at once (or `--create-concurrency`), each followed by one client.
pub(crate) async fn burst(ctx: &mut Ctx) -> Result<(), LoadError> {
    let n = ctx.plan.conversations;
    let conc = ctx.args.create_concurrency.unwrap_or(n).max(1);
    let counter = match (&ctx.args.floor_nats, ctx.args.count_js_ops) {
        (Some(url), true) => Some(
            crate::load::jsops::OpCounter::start(url)
                .await
                .map_err(LoadError::Setup)?,
        ),
        (None, true) => return Err(LoadError::Setup("--count-js-ops needs --floor-nats".into())),
        _ => None,
    };
    let start = Instant::now();
    ctx.set_phase("burst");
    let futs = (0..n).map(|_| {
        let base = ctx.next_gateway();
        let rest = ctx.rest.clone();
        let stats = ctx.stats.clone();
        let token = ctx.args.token.clone();
        let timeout = ctx.timeout;
        async move {
            let t0 = Instant::now();
            let id = match rest.create(&base, None).await {
                Ok(id) => id,
                Err(e) => {
                    stats.error(&e.kind());
                    return None;
                }
            };
            stats.record(Metric::CreateHttp, t0.elapsed());
            Stats::inc(&stats.created);
            let spec = ConnectSpec {
                base_url: base,
                conv: Conv::new(id, 0),
                latest: -1,
                token,
                role: Role::Quiet,
                timeout,
            };
            let client = Client::connect(spec, stats.clone()).await.ok()?;
            let mut rx = client.probe.ready.subscribe();
            let ready = tokio::time::timeout(timeout * 4, rx.wait_for(Option::is_some))
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|r| *r);
            match ready {
                Some(at) => stats.record(Metric::CreateReady, at.duration_since(t0)),
                None => stats.error("ready_timeout"),
            }
            Some((Conn { client, hint: None }, ready))
        }
    });
    let done: Vec<(Conn, Option<Instant>)> =
        futures::StreamExt::collect(futures::StreamExt::filter_map(
            futures::StreamExt::buffer_unordered(futures::stream::iter(futs), conc),
            |x| async move { x },
        ))
        .await;
    let last_ready = done.iter().filter_map(|(_, r)| *r).max();
    if let Some(last) = last_ready {
        ctx.report.extra.insert(
            "all_running_s".into(),
            last.duration_since(start).as_secs_f64(),
        );
    }
    let ready = done.iter().filter(|(_, r)| r.is_some()).count();
    if let Some(counter) = counter {
        // Create → running (the clients' connects and first replays included).
        let ops = counter.finish();
        let per = |v: u64| v as f64 / ready.max(1) as f64;
        ctx.report
            .extra
            .insert("js_ops_per_conversation".into(), per(ops.values().sum()));
        for (k, v) in ops {
            ctx.report.extra.insert(format!("js_ops {k}"), per(v));
        }
    }
    ctx.report.extra.insert("ready".into(), ready as f64);
    ctx.report.extra.insert("created".into(), done.len() as f64);
    ctx.report.sockets_peak = ctx.stats.sockets.load(Ordering::Relaxed);
    verify(ctx, done.into_iter().map(|(c, _)| c).collect()).await;
    Ok(())
}

/// Builds a conversation of at least `events` events with back-to-back messages; returns
/// it (its driver closed and checked).
async fn build_conversation(ctx: &mut Ctx, events: u64) -> Result<Arc<Conv>, LoadError> {
    let created = create_many(ctx, 1, 1).await;
    let Some((conv, _)) = created.into_iter().next() else {
        return Err(LoadError::Setup("create failed".to_owned()));
    };
    // Every message is warm-up: building is not measured.
    let conv = Conv::new(conv.id.clone(), u64::MAX);
    let mut conns = connect_many(ctx, vec![(conv.clone(), -1, None, Role::Driver)]).await;
    wait_ready(ctx, &conns, ctx.timeout).await;
    let Some(conn) = conns.pop() else {
        return Err(LoadError::Setup("connect failed".to_owned()));
    };
    let target = i64::try_from(events).unwrap_or(i64::MAX) - 1;
    let mut done = conn.client.probe.done.subscribe();
    // Bounded: at most `events` messages (each adds several events).
    for _ in 0..events {
        if conn.client.probe.max_id.load(Ordering::Relaxed) >= target {
            break;
        }
        let seq = conv.next_seq(Instant::now());
        if !conn.client.send_message(seq).await {
            return Err(LoadError::Setup("send failed while building".to_owned()));
        }
        Stats::inc(&ctx.stats.actions_out);
        let want = i64::try_from(seq).unwrap_or(i64::MAX);
        if tokio::time::timeout(ctx.timeout, done.wait_for(|d| *d >= want))
            .await
            .is_err()
        {
            return Err(LoadError::Setup(format!(
                "no reply to message {seq} while building {}",
                conv.id
            )));
        }
    }
    verify(ctx, vec![conn]).await;
    Ok(conv)
}

/// `replay`: reconnect-and-replay time near the end and from the start of a large and a small
/// conversation.
pub(crate) async fn replay(ctx: &mut Ctx) -> Result<(), LoadError> {
    ctx.set_phase("build");
    let large = build_conversation(ctx, ctx.args.replay_events).await?;
    let small = build_conversation(ctx, ctx.args.replay_small_events).await?;
    let reps = ctx.args.reconnects.max(1);
    let tail = i64::try_from(ctx.args.replay_tail).unwrap_or(4);
    let base = ctx.gateways[0].clone();
    let mut sizes = Vec::new();
    for (conv, end_metric, start_metric) in [
        (&large, Metric::ReplayEndLarge, Metric::ReplayStartLarge),
        (&small, Metric::ReplayEndSmall, Metric::ReplayStartSmall),
    ] {
        let stored = ctx.rest.events(&base, &conv.id).await?;
        ctx.report.stored_gaps += stored_gaps(&stored);
        let head = stored.len() as i64 - 1;
        sizes.push(stored.len());
        let start_reps = if conv.id == large.id {
            (reps / 10).max(1)
        } else {
            reps
        };
        for (metric, latest, n) in [
            (end_metric, (head - tail).max(-1), reps),
            (start_metric, -1, start_reps),
        ] {
            ctx.set_phase(metric.key().trim_end_matches("_ms"));
            let want = expected_ids(&stored, latest, head);
            for _ in 0..n {
                let t0 = Instant::now();
                let spec = ConnectSpec {
                    base_url: ctx.next_gateway(),
                    conv: conv.clone(),
                    latest,
                    token: ctx.args.token.clone(),
                    role: Role::Quiet,
                    timeout: ctx.timeout,
                };
                let Ok(client) = Client::connect(spec, ctx.stats.clone()).await else {
                    continue;
                };
                let mut rx = client.probe.events.subscribe();
                let count = want.len() as u64;
                match tokio::time::timeout(ctx.timeout, rx.wait_for(|n| *n >= count)).await {
                    Ok(Ok(_)) => ctx.stats.record(metric, t0.elapsed()),
                    _ => ctx.stats.error("replay_timeout"),
                }
                let got = client.finish().await;
                let verdict =
                    verify_connection(&stored, latest, Some(head), &got, Extent::Complete);
                ctx.report.count_client(&verdict);
            }
        }
    }
    let s = |m| ctx.stats.summary(m);
    let (el, es) = (s(Metric::ReplayEndLarge), s(Metric::ReplayEndSmall));
    let (sl, ss) = (s(Metric::ReplayStartLarge), s(Metric::ReplayStartSmall));
    let extra = &mut ctx.report.extra;
    extra.insert(
        "large_events".into(),
        sizes.first().copied().unwrap_or(0) as f64,
    );
    extra.insert(
        "small_events".into(),
        sizes.get(1).copied().unwrap_or(0) as f64,
    );
    if es.p50 > 0.0 {
        extra.insert("end_p50_large_over_small".into(), el.p50 / es.p50);
        extra.insert("end_p99_large_over_small".into(), el.p99 / es.p99);
    }
    if ss.p50 > 0.0 {
        extra.insert("start_p50_large_over_small".into(), sl.p50 / ss.p50);
    }
    if sl.p50 > 0.0 {
        let n = sizes.first().copied().unwrap_or(0) as f64;
        extra.insert("full_replay_events_per_s".into(), n / (sl.p50 / 1000.0));
    }
    Ok(())
}

/// `scale`: the same load on fresh deployments of each worker count.
pub(crate) async fn scale(ctx: &mut Ctx, deployer: &mut dyn Deployer) -> Result<(), LoadError> {
    let counts = ctx.args.scale_workers.clone();
    let mut first: Option<f64> = None;
    for w in counts {
        ctx.set_phase(&format!("deploy w={w}"));
        let dep = deployer.start(w).await?;
        let mut step = Ctx::new(
            ctx.args.clone(),
            dep.gateways.clone(),
            dep.pids.clone(),
            ctx.rest.clone(),
            ctx.stats.clone(),
        );
        step.phase = ctx.phase.clone();
        ctx.stats.reset(Metric::Reply);
        let errors_before = ctx.stats.error_count();
        let result = conversations(&mut step, false).await;
        let stopped = deployer.stop().await;
        result?;
        if let Err(e) = stopped {
            ctx.report.notes.push(format!("workers={w}: {e}"));
        }
        let r = &step.report;
        let speed = r.msgs_per_s;
        let base = *first.get_or_insert(speed);
        ctx.report.scale.push(ScaleStep {
            workers: w,
            msgs_per_s: speed,
            speedup: if base > 0.0 { speed / base } else { 0.0 },
            reply_ms: ctx.stats.summary(Metric::Reply),
            machine_cpu_busy: r.extra.get("machine_cpu_busy").copied(),
            cpu_per_s: r.cpu_per_s.clone(),
            errors: ctx.stats.error_count() - errors_before,
        });
        let rep = &mut ctx.report;
        rep.lost_events += r.lost_events;
        rep.duplicate_events += r.duplicate_events;
        rep.unexpected_events += r.unexpected_events;
        rep.out_of_order_clients += r.out_of_order_clients;
        rep.stored_gaps += r.stored_gaps;
        rep.clients_checked += r.clients_checked;
        rep.sockets_peak = rep.sockets_peak.max(r.sockets_peak);
        rep.measure_s += r.measure_s;
    }
    if let (Some(a), Some(b)) = (ctx.report.scale.first(), ctx.report.scale.last()) {
        let ratio = if a.msgs_per_s > 0.0 {
            b.msgs_per_s / a.msgs_per_s
        } else {
            0.0
        };
        ctx.report.extra.insert(
            format!("throughput_{}w_over_{}w", b.workers, a.workers),
            ratio,
        );
    }
    Ok(())
}

/// `long`: a CodeAct conversation of `--long-steps-per-turn` think steps per message, grown to
/// `--long-events`; the LLM stub records each step's overhead (its answer → the agent's next
/// request) once the chat has `--long-late-messages` messages, and, on three fresh
/// conversations of one turn afterwards (the deployment warm), while it is short. The
/// client's events are checked like every other scenario's.
pub(crate) async fn long(ctx: &mut Ctx, llm: &super::stub_llm::StubLlm) -> Result<(), LoadError> {
    ctx.set_phase("long");
    let conv = build_conversation(ctx, ctx.args.long_events).await?;
    let stored = ctx.rest.events(&ctx.gateways[0], &conv.id).await?;
    ctx.report.stored_gaps += stored_gaps(&stored);
    // Early steps measured again on fresh conversations, now that the deployment is warm
    // (the long one's first steps come right after start-up): one turn each.
    ctx.set_phase("short");
    ctx.stats.reset(Metric::StepEarly);
    ctx.stats.reset(Metric::StepEarlyHead);
    for _ in 0..3 {
        let short = build_conversation(ctx, 8).await?;
        let stored = ctx.rest.events(&ctx.gateways[0], &short.id).await?;
        ctx.report.stored_gaps += stored_gaps(&stored);
    }
    let s = |m| ctx.stats.summary(m);
    let (early, late) = (s(Metric::StepEarly), s(Metric::StepLate));
    let extra = &mut ctx.report.extra;
    extra.insert("long_events".into(), stored.len() as f64);
    extra.insert(
        "long_largest_chat_messages".into(),
        llm.largest_chat() as f64,
    );
    if early.n > 0 && late.n > 0 && early.p50 > 0.0 {
        extra.insert("step_late_over_early_p50".into(), late.p50 / early.p50);
        let (early, late) = (s(Metric::StepEarlyHead), s(Metric::StepLateHead));
        if early.p50 > 0.0 {
            extra.insert("step_late_over_early_head_p50".into(), late.p50 / early.p50);
        }
    } else {
        ctx.report.notes.push(format!(
            "long: {} early and {} late steps measured (late needs a chat of {} messages: raise --long-events)",
            early.n, late.n, ctx.args.long_late_messages
        ));
    }
    Ok(())
}
