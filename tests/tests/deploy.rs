//! The deployment artifacts against the real binaries: the metric names the dashboard and
//! alerts use (`deploy/monitoring/metrics.txt`) are exactly the ones a gateway and a worker
//! export, the worker's readiness endpoint, and the offline validation of every manifest,
//! the compose file and the alert rules (`deploy/validate.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use tests::cluster::{Cluster, ClusterOpts};
use tests::proc::free_port;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `# TYPE <name> <kind>` lines of a Prometheus text page, for names starting with `oh_`.
fn exported(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("oh_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitored_metrics_are_exactly_the_exported_ones() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![("OH_WORKER_METRICS_ADDR", metrics_addr.clone())],
        ..ClusterOpts::default()
    })
    .await;
    let http = tests::http_client();
    let page = |url: String| {
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.text().await.unwrap()
        }
    };
    // Straight after start, before any conversation: every series is there already.
    let mut live = exported(&page(format!("{}/metrics", c.url(0))).await);
    let gateway_count = live.len();
    live.extend(exported(
        &page(format!("http://{metrics_addr}/metrics")).await,
    ));
    assert!(
        gateway_count > 10 && live.len() > gateway_count + 10,
        "{live:?}"
    );

    let listed: BTreeSet<String> =
        std::fs::read_to_string(repo().join("deploy/monitoring/metrics.txt"))
            .expect("deploy/monitoring/metrics.txt")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
    let missing: Vec<_> = listed.difference(&live).collect();
    let unlisted: Vec<_> = live.difference(&listed).collect();
    assert!(
        missing.is_empty() && unlisted.is_empty(),
        "listed but not exported: {missing:?}; exported but not listed: {unlisted:?}"
    );

    // The worker's readiness: NATS and Redis up, not draining.
    let r = http
        .get(format!("http://{metrics_addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"nats": true, "redis": true, "draining": false})
    );
}

/// Every Kubernetes manifest (kubernetes-validate, offline schemas), the compose file, the
/// Prometheus configuration, the alert rules and their unit tests (promtool), and the
/// dashboard's JSON and metric names.
#[test]
fn deploy_artifacts_validate() {
    let out = std::process::Command::new("bash")
        .arg(repo().join("deploy/validate.sh"))
        .current_dir(repo())
        .output()
        .expect("run deploy/validate.sh");
    assert!(
        out.status.success(),
        "deploy/validate.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `oh_worker_start_queue_pending` shows starts no worker could take: one worker with room for
/// one session, three conversations; two wait, and the full worker still reports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_queue_depth_is_reported_while_workers_are_full() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        max_sessions: 1,
        worker_env: vec![("OH_WORKER_METRICS_ADDR", metrics_addr.clone())],
        ..ClusterOpts::default()
    })
    .await;
    for _ in 0..3 {
        c.create(0, None, None).await;
    }
    let http = tests::http_client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let page = http
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let pending = page
            .lines()
            .find_map(|l| l.strip_prefix("oh_worker_start_queue_pending "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        let active = page
            .lines()
            .find_map(|l| l.strip_prefix("oh_worker_sessions_active "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if pending == Some(2.0) && active == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pending {pending:?}, active {active:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
