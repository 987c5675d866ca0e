//! Task discipline: a socket's tasks end with the socket (the task and subscription gauges
//! return to their idle values after many connects and disconnects), and shutdown closes the
//! remaining sockets and joins every task before `gateway::run` returns. The gateway runs
//! in-process (its metrics recorder is this binary's), on real NATS and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clap::Parser;
use tests::nats::NatsServer;
use tests::redis::RedisServer;
use tests::sio::{ConnectOpts, SioClient};
use tokio_util::sync::CancellationToken;

/// The value of an unlabelled gauge in a Prometheus page (0 if absent).
fn gauge(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(http: &reqwest::Client, base: &str) -> String {
    http.get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics page")
}

/// `(tasks, subscriptions, sockets)` from the gauges.
fn gauges(page: &str) -> (f64, f64, f64) {
    (
        gauge(page, "oh_gateway_tasks"),
        gauge(page, "oh_gateway_session_subscriptions"),
        gauge(page, "oh_gateway_sockets"),
    )
}

/// Polls until the gauges satisfy `ok`; panics with the last values.
async fn wait_gauges(http: &reqwest::Client, base: &str, ok: impl Fn((f64, f64, f64)) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = gauges(&metrics(http, base).await);
        if ok(got) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "(tasks, subscriptions, sockets) = {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_tasks_end_with_their_sockets_and_shutdown_joins_the_rest() {
    let (nats, redis) = tokio::join!(NatsServer::start(), RedisServer::start());
    let port = tests::proc::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let args = gateway::Args::try_parse_from([
        "gateway",
        "--nats-url",
        &nats.url(),
        "--redis-url",
        &redis.url(),
        "--gateway-addr",
        &format!("127.0.0.1:{port}"),
    ])
    .expect("arguments");
    let recorder = shared::telemetry::init_metrics().expect("the only recorder of this binary");
    let cancel = CancellationToken::new();
    let gateway = tokio::spawn(gateway::run(args, recorder, cancel.clone()));
    tests::proc::wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(20))
        .await
        .expect("gateway ready");
    let http = tests::http_client();
    let mut sids = Vec::new();
    for _ in 0..3 {
        let v: serde_json::Value = http
            .post(format!("{base}/api/conversations"))
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("create")
            .json()
            .await
            .expect("create answer");
        sids.push(v["conversation_id"].as_str().expect("id").to_owned());
    }
    // Each create joined its conversation's feed for a first socket (see `recent`); with no
    // socket coming, the watches are dropped after FRESH (10 s).
    let subs = gauges(&metrics(&http, &base).await).1;
    assert_eq!(subs, 3.0, "a feed joined per create");
    wait_gauges(&http, &base, |(_, subs, _)| subs == 0.0).await;
    // Idle: the presence, resync and socket-closing tasks.
    let idle = gauge(&metrics(&http, &base).await, "oh_gateway_tasks");
    assert!(idle >= 3.0, "idle tasks {idle}");

    let connect = |sid: String| {
        let base = base.clone();
        async move {
            SioClient::connect(ConnectOpts::new(base).query("conversation_id", sid))
                .await
                .expect("connect")
        }
    };
    for round in 0..3 {
        // All at once: joins of the same session race (one subscription each is kept).
        let clients =
            futures::future::join_all((0..12).map(|i| connect(sids[i % sids.len()].clone()))).await;
        // Per socket a forwarding task, per session a subscription pump (a socket is counted
        // by its connect handler, which may run just after the client saw CONNECT).
        wait_gauges(&http, &base, |(tasks, subs, sockets)| {
            tasks >= idle + 12.0 + 3.0 && subs == 3.0 && sockets == 12.0
        })
        .await;
        for c in clients {
            c.close().await;
        }
        wait_gauges(&http, &base, |g| g == (idle, 0.0, 0.0)).await;
        println!("round {round}: back to {idle} tasks");
    }

    // Shutdown with sockets open: they are closed, every task is joined, `run` returns.
    let mut open = Vec::new();
    for sid in &sids {
        open.push(connect(sid.clone()).await);
    }
    cancel.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(10), gateway)
        .await
        .expect("gateway::run returns within 10 s of cancel");
    ended.expect("not panicked").expect("clean exit");
    // The close was sent before `run` returned; each client notices it as its reader gets it.
    for c in &open {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while c.is_connected() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!c.is_connected(), "socket left open after shutdown");
    }
}
