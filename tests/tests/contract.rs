//! The API contract: schemathesis (PyPI, pinned) fuzzes every operation of the gateway's own
//! OpenAPI document (`/api/openapi.json`) against a live deployment (real gateway and worker
//! binaries, the test's NATS and Redis, tokens on): no answer may be a 5xx, and every answer's
//! status, content type and body must match the document.
//!
//! schemathesis is installed once into `target/schemathesis-venv` (a Python venv; a file lock
//! keeps concurrent test binaries from installing twice).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::cluster::{Cluster, ClusterOpts};

const SCHEMATHESIS: &str = "schemathesis==4.32.5";

fn venv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/schemathesis-venv")
}

/// The `schemathesis` executable, installed if missing.
fn schemathesis() -> PathBuf {
    let dir = venv();
    let bin = dir.join("bin/schemathesis");
    let lock_path = std::env::temp_dir().join("oh-tests-schemathesis.lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .expect("lock file");
    lock.lock().expect("lock");
    let ok = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("4.32.5"));
    if !ok {
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .output()
            .expect("python3 (Debian: apt-get install python3 python3-venv)");
        assert!(
            out.status.success(),
            "python3 -m venv failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(dir.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                SCHEMATHESIS,
            ])
            .output()
            .expect("pip");
        assert!(
            out.status.success(),
            "pip install {SCHEMATHESIS} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(lock);
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_the_openapi_document() {
    let st = tokio::task::spawn_blocking(schemathesis).await.unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        auth_tokens: Some("contract-token=alice".into()),
        gateway_env: vec![
            // The fuzzer creates many conversations: the per-user rates would answer most
            // of its requests with 429 (documented, but then little else is exercised).
            ("OH_CREATE_RATE", "off".into()),
            ("OH_MESSAGE_RATE", "off".into()),
        ],
        ..ClusterOpts::default()
    })
    .await;
    let (code, doc) = c.get(0, "/api/openapi.json", None).await;
    assert_eq!(code, 200);
    assert_eq!(doc["openapi"], "3.1.0", "{doc}");
    let url = format!("{}/api/openapi.json", c.url(0));
    // Real conversations for the `{id}` of most requests (a running one, a stopped one), so
    // the fuzzer reaches past the 404 of an unknown id.
    let token = Some("contract-token");
    let running = c.create(0, Some("hello"), token).await;
    let stopped = c.create(0, None, token).await;
    c.wait_info(
        0,
        &stopped,
        token,
        std::time::Duration::from_secs(30),
        |v| v["status"] == "RUNNING",
    )
    .await;
    c.post(
        0,
        &format!("/api/conversations/{stopped}/stop"),
        &serde_json::json!({}),
        token,
    )
    .await;
    let report = tempfile::tempdir().unwrap();
    let config = report.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[dictionaries.conversations]\nvalues = [\"{running}\", \"{stopped}\"]\n\n\
             [parameters]\n\"path.id\" = {{ dictionary = \"conversations\", probability = 0.8 }}\n"
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(&st)
        .arg("--config-file")
        .arg(&config)
        .args([
            "run",
            &url,
            "--url",
            &c.url(0),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "40",
            "--seed",
            "20261128",
            "--workers",
            "2",
            "--no-color",
            "--generation-database",
            "none",
            "--header",
            "Authorization: Bearer contract-token",
            "--report",
            "junit",
            "--report-dir",
        ])
        .arg(report.path())
        // Its caches stay out of the source tree.
        .current_dir(report.path())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "schemathesis found failures (above); gateway and worker logs:\n{}",
        c.logs()
    );
    // The summary names how much ran: make sure it ran at all.
    assert!(stdout.contains("passed"), "no summary: {stdout}");
}
