//! CI smoke of the load tool: a short run of every scenario against a real test cluster (own
//! nats-server and redis-server, the real binaries). Asserts that no event was lost,
//! duplicated, unexpected or reordered, that the log has no gap, that no error occurred and
//! that the run did its work; never a time (speed is measured by `loadtest`, BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser as _;
use futures::future::BoxFuture;
use tests::cluster::{Cluster, ClusterOpts};
use tests::load::deploy::{DeployError, Deployer, Deployment};
use tests::load::procfs::Pid;
use tests::load::{self, Args, Report};

fn args(cluster: Option<&Cluster>, gateways: usize, extra: &[&str]) -> Args {
    let mut v: Vec<String> = vec!["loadtest".into(), "--quiet".into()];
    if let Some(c) = cluster {
        let urls: Vec<String> = (0..gateways).map(|i| c.url(i)).collect();
        v.push("--gateway".into());
        v.push(urls.join(","));
    }
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    Args::try_parse_from(v).expect("smoke arguments parse")
}

fn assert_clean(r: &Report, logs: &str) {
    let table = r.table();
    assert_eq!(r.lost_events, 0, "lost events{table}{logs}");
    assert_eq!(r.duplicate_events, 0, "duplicated events{table}{logs}");
    assert_eq!(r.unexpected_events, 0, "unexpected events{table}{logs}");
    assert_eq!(r.out_of_order_clients, 0, "reordered events{table}{logs}");
    assert_eq!(r.stored_gaps, 0, "gaps in the log{table}{logs}");
    assert!(r.errors.is_empty(), "errors: {:?}{table}{logs}", r.errors);
    assert!(r.clients_checked > 0, "nothing checked{table}");
}

async fn cluster(gateways: usize, workers: usize) -> Cluster {
    Cluster::start(ClusterOpts {
        gateways,
        workers,
        max_sessions: 500,
        ..ClusterOpts::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_latency_loses_nothing() {
    let c = cluster(1, 1).await;
    let a = args(
        Some(&c),
        1,
        &["--scenario", "latency", "--messages", "30", "--warmup", "2"],
    );
    let r = load::run(a, None).await.expect("run");
    assert_clean(&r, &c.logs());
    assert_eq!(r.messages, 32, "{}", r.table());
    assert_eq!(r.metrics["reply_ms"].n, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_fanout_every_client_gets_every_event_once() {
    let c = cluster(2, 1).await;
    let a = args(
        Some(&c),
        2,
        &[
            "--scenario",
            "fanout",
            "--clients",
            "40",
            "--messages",
            "5",
            "--rate",
            "0",
            "--warmup",
            "0",
        ],
    );
    let r = load::run(a, None).await.expect("run");
    assert_clean(&r, &c.logs());
    assert_eq!(r.clients_checked, 40);
    // 39 watchers saw each of the 5 replies.
    assert_eq!(r.metrics["fanout_reply_ms"].n, 39 * 5, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_many_idle_conversations_and_memory_points() {
    let c = cluster(1, 2).await;
    let gw = c.gateways[0].pid().expect("gateway pid").to_string();
    let w0 = c.workers[0].pid().expect("worker pid").to_string();
    let w1 = c.workers[1].pid().expect("worker pid").to_string();
    let a = args(
        Some(&c),
        1,
        &[
            "--scenario",
            "many",
            "--conversations",
            "40",
            "--active-pct",
            "10",
            "--messages",
            "3",
            "--rate",
            "0",
            "--mem-points",
            "0,20",
            "--gateway-pid",
            &gw,
            "--worker-pid",
            &w0,
            "--worker-pid",
            &w1,
        ],
    );
    let r = load::run(a, None).await.expect("run");
    assert_clean(&r, &c.logs());
    assert_eq!(r.clients_checked, 40);
    assert_eq!(r.metrics["reply_ms"].n, 4 * 3, "{}", r.table());
    let socket_counts: Vec<u64> = r.memory.iter().map(|p| p.sockets).collect();
    assert_eq!(socket_counts, vec![0, 20, 40], "{}", r.table());
    assert!(r.memory[2].gateway_rss_kib > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_burst_every_conversation_gets_ready() {
    let c = cluster(2, 2).await;
    let a = args(
        Some(&c),
        2,
        &["--scenario", "burst", "--conversations", "60"],
    );
    let r = load::run(a, None).await.expect("run");
    assert_clean(&r, &c.logs());
    assert_eq!(r.metrics["create_ready_ms"].n, 60, "{}", r.table());
    assert_eq!(r.clients_checked, 60);
}

/// `--count-js-ops`: what a new conversation costs the broker, sorted by operation; no
/// JetStream consumer is created or read per conversation (actions arrive by republish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_burst_counts_broker_operations_per_conversation() {
    let c = cluster(1, 1).await;
    let url = c.nats.url();
    let a = args(
        Some(&c),
        1,
        &[
            "--scenario",
            "burst",
            "--conversations",
            "20",
            "--create-concurrency",
            "4",
            "--count-js-ops",
            "--floor-nats",
            &url,
            "--floor-samples",
            "20",
        ],
    );
    let r = load::run(a, None).await.expect("run");
    assert_clean(&r, &c.logs());
    let per = |k: &str| r.extra.get(&format!("js_ops {k}")).copied().unwrap_or(0.0);
    let ops: Vec<_> = r
        .extra
        .iter()
        .filter(|(k, _)| k.starts_with("js_ops"))
        .collect();
    // The takeover record, the system event and awaiting_user_input of each.
    assert!(per("publish ev") >= 3.0, "{ops:?}");
    assert!(
        per("publish meta") >= 1.0 && per("publish work") >= 1.0,
        "{ops:?}"
    );
    assert_eq!(
        per("api CONSUMER.CREATE"),
        0.0,
        "a consumer per conversation: {ops:?}"
    );
    assert!(
        r.extra["js_ops_per_conversation"] <= 20.0,
        "more broker operations than expected: {ops:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_replay_reconnects_get_exactly_the_replay() {
    let c = cluster(2, 1).await;
    let a = args(
        Some(&c),
        2,
        &[
            "--scenario",
            "replay",
            "--replay-events",
            "200",
            "--replay-small-events",
            "10",
            "--reconnects",
            "10",
        ],
    );
    let r = load::run(a, None).await.expect("run");
    assert_clean(&r, &c.logs());
    assert!(r.extra["large_events"] >= 200.0, "{}", r.table());
    assert_eq!(r.metrics["replay_end_large_ms"].n, 10);
    assert_eq!(r.metrics["replay_start_small_ms"].n, 10);
}

/// `scale` through test clusters instead of `deploy/local/cluster.sh`.
#[derive(Default)]
struct ClusterDeployer {
    current: Option<Cluster>,
}

impl Deployer for ClusterDeployer {
    fn start(&mut self, workers: usize) -> BoxFuture<'_, Result<Deployment, DeployError>> {
        Box::pin(async move {
            let c = cluster(1, workers).await;
            let mut pids = vec![Pid {
                role: "gateway".into(),
                pid: c.gateways[0].pid().expect("pid"),
            }];
            pids.extend(c.workers.iter().map(|w| Pid {
                role: "worker".into(),
                pid: w.pid().expect("pid"),
            }));
            let d = Deployment {
                gateways: vec![c.url(0)],
                pids,
            };
            self.current = Some(c);
            Ok(d)
        })
    }

    fn stop(&mut self) -> BoxFuture<'_, Result<(), DeployError>> {
        Box::pin(async move {
            self.current = None;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_scale_steps_lose_nothing() {
    let a = args(
        None,
        1,
        &[
            "--scenario",
            "scale",
            "--scale-workers",
            "1,2",
            "--conversations",
            "10",
            "--duration-s",
            "2",
        ],
    );
    let r = load::run(a, Some(Box::new(ClusterDeployer::default())))
        .await
        .expect("run");
    assert_clean(&r, "");
    assert_eq!(r.scale.len(), 2, "{}", r.table());
    assert!(r.scale.iter().all(|s| s.msgs_per_s > 0.0), "{}", r.table());
}

/// Issue 4: a rolling restart of every worker (SIGTERM, drain, a new one) while the load tool
/// runs: every client's events checked against the log, 0 lost, 0 duplicated, no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_worker_restart_while_the_load_tool_runs() {
    let mut c = cluster(1, 2).await;
    let a = args(
        Some(&c),
        1,
        &[
            "--scenario",
            "many",
            "--conversations",
            "6",
            "--active-pct",
            "100",
            "--messages",
            "0",
            "--rate",
            "5",
            "--duration-s",
            "8",
            "--mem-points",
            "0",
        ],
    );
    let run = tokio::spawn(load::run(a, None));
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    for i in 0..2 {
        c.workers[i].signal(tests::proc::SIGTERM).unwrap();
        let status = c.workers[i]
            .wait_exit(std::time::Duration::from_secs(15))
            .await
            .expect("drained in time");
        assert!(status.success(), "worker {i} exit {status:?}{}", c.logs());
        c.add_worker().await;
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    let r = run.await.expect("load task").expect("run");
    assert_clean(&r, &c.logs());
    assert!(
        r.messages >= 30,
        "too little load to mean anything{}",
        r.table()
    );
}

/// `long`: a CodeAct conversation against the tool's own LLM stub (on a port chosen here, given
/// to the workers), grown past a chat of 60 messages; early and late steps are measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_long_conversation_measures_early_and_late_steps() {
    let port = tests::proc::free_port();
    let ws = tempfile::tempdir().unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![
            ("OH_AGENT", "codeact".to_owned()),
            ("OH_LLM_BASE_URL", format!("http://127.0.0.1:{port}/v1")),
            ("OH_WORKSPACE_ROOT", ws.path().display().to_string()),
        ],
        ..ClusterOpts::default()
    })
    .await;
    let listen = format!("127.0.0.1:{port}");
    let a = args(
        Some(&c),
        1,
        &[
            "--scenario",
            "long",
            "--long-events",
            "120",
            "--long-steps-per-turn",
            "10",
            "--long-late-messages",
            "60",
            "--llm-listen",
            &listen,
        ],
    );
    let r = load::run(a, None).await.expect("run");
    assert_clean(&r, &c.logs());
    assert!(r.extra["long_events"] >= 120.0, "{}", r.table());
    assert!(
        r.extra["long_largest_chat_messages"] >= 60.0,
        "{}",
        r.table()
    );
    assert!(r.metrics["step_early_ms"].n >= 5, "{}", r.table());
    assert!(r.metrics["step_late_ms"].n >= 1, "{}", r.table());
    assert!(
        r.extra.contains_key("step_late_over_early_p50"),
        "{}",
        r.table()
    );
    // Each step also up to the next request's head: one per step, never after its arrival.
    for (head, whole) in [
        ("step_early_head_ms", "step_early_ms"),
        ("step_late_head_ms", "step_late_ms"),
    ] {
        let (h, w) = (&r.metrics[head], &r.metrics[whole]);
        assert_eq!(h.n, w.n, "{}", r.table());
        assert!(h.p50 <= w.p50 && h.max <= w.max, "{}", r.table());
    }
    assert!(r.extra.contains_key("step_late_over_early_head_p50"));
}
