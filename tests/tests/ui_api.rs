//! What OpenHands' web UI needs beyond the conversation core, end to end (real gateway and
//! worker binaries, the test's own NATS and Redis): reopening a conversation while its stop is
//! still in progress, a start that can never succeed, and the endpoints answered from a
//! conversation's log and metadata.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use tests::cluster::{Cluster, ClusterOpts, events_until, is_echo, is_state};

const T: Duration = Duration::from_secs(30);

async fn one_worker() -> Cluster {
    Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await
}

fn ready(v: &Value) -> bool {
    v["status"] == "RUNNING" && v["agent_state"] == "awaiting_user_input"
}

/// The UI stops a conversation and reopens it at once: `/start` comes while the stopping
/// worker still holds the lease (so it answers RUNNING and queues nothing). The stopping
/// owner sees the start request behind its stop and queues a start again: the conversation
/// ends up running and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_start_during_the_stop_ends_running() {
    let ws = tempfile::tempdir().unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![
            ("OH_WORKSPACE_ROOT", ws.path().display().to_string()),
            ("OH_TEST_SNAPSHOT_PAUSE_MS", "1500".to_owned()),
        ],
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, Some("hello"), None).await;
    c.wait_info(0, &sid, None, T, ready).await;
    let path = |op: &str| format!("/api/conversations/{sid}/{op}");
    // The stopping owner holds the lease until its last workspace snapshot is stored; with a
    // changed workspace and the snapshot hook's pause that takes 1.5 s, so /start comes while
    // it still holds it (on a fast machine a bare stop lets go within one HTTP round trip).
    // Retry the pair until the race was hit, a few times at most.
    let mut raced = false;
    for round in 0..5u32 {
        // (The echo agent starts no runtime, so the folder may not exist yet.)
        let dir = ws.path().join(&sid);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("changed-{round}.txt")),
            format!("round {round}\n"),
        )
        .unwrap();
        let (code, stopped) = c.post(0, &path("stop"), &json!({}), None).await;
        assert_eq!(code, 200, "{stopped}");
        let (code, started) = c
            .post(0, &path("start"), &json!({"providers_set": []}), None)
            .await;
        assert_eq!(code, 200, "{started}");
        raced = started["conversation_status"] == "RUNNING";
        // Either way it must end up running again.
        c.wait_info(0, &sid, None, T, ready).await;
        if raced {
            break;
        }
    }
    assert!(raced, "/start never came while the owner held the lease");
    // The log shows the stop and a later start (a new takeover record after `stopped`);
    // the status may still read running from before the stop, so wait for the log.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let evs = c.all_events(0, &sid, None).await;
        let restarted = evs
            .iter()
            .rposition(|e| is_state(e, "stopped"))
            .is_some_and(|at| evs[at..].iter().any(|e| is_state(e, "loading")));
        if restarted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no start after the last stop: {evs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.wait_info(0, &sid, None, T, ready).await;
    // And it answers.
    let mut sock = c.connect(0, &sid, Some(-1), None).await.expect("connect");
    sock.emit(
        "oh_user_action",
        &json!({"action": "message", "args": {"content": "again"}}),
    )
    .await
    .expect("emit");
    events_until(&mut sock, T, |e| is_echo(e, "again")).await;
}

/// A stored conversation whose replay can never start (here a trajectory made empty behind
/// the gateway's back: create refuses such a one) is tried a bounded number of times and
/// then ends in `error` with the reason, instead of being requeued forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_always_fails_ends_in_error_with_the_reason() {
    let c = one_worker().await;
    let sid = c.create(0, None, None).await;
    c.wait_info(0, &sid, None, T, ready).await;
    let (code, _) = c
        .post(
            0,
            &format!("/api/conversations/{sid}/stop"),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(code, 200);
    c.wait_info(0, &sid, None, T, |v| v["status"] == "STOPPED")
        .await;
    let takeovers = |evs: &[Value]| evs.iter().filter(|e| is_state(e, "loading")).count();
    let before = takeovers(&c.all_events(0, &sid, None).await);

    // Poison it: a replay trajectory with nothing to replay.
    let store = c.store().await;
    let parsed = shared::id::SessionId::parse(&sid).unwrap();
    let uid = shared::id::UserId::local(); // single-user mode
    let blob = store.put_replay(&parsed, b"[]").await.unwrap();
    let updated = store
        .update_meta(&uid, &parsed, |m| m.replay_blob = Some(blob.clone()))
        .await
        .unwrap();
    assert!(updated.is_some(), "metadata not found for {uid}");

    let (code, v) = c
        .post(
            0,
            &format!("/api/conversations/{sid}/start"),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let info = c
        .wait_info(0, &sid, None, T, |v| v["status"] == "ERROR")
        .await;
    let reason = info["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("AGENT_ERROR$START_FAILED")
            && reason.contains("must start with a user message"),
        "{info}"
    );
    let tries = takeovers(&c.all_events(0, &sid, None).await) - before;
    assert!((1..=3).contains(&tries), "{tries} tries");
    // Nothing tries again by itself.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        takeovers(&c.all_events(0, &sid, None).await) - before,
        tries,
        "tried again after ending in error"
    );
    assert_eq!(c.info(0, &sid, None).await["status"], "ERROR");
}

/// Rename, trajectory, runtime config, VS Code URL and web hosts, with a running worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_side_endpoints() {
    let c = one_worker().await;
    let sid = c
        .create(0, Some("Fix the flaky test in CI\nsecond line"), None)
        .await;
    let info = c.wait_info(0, &sid, None, T, ready).await;
    // Titled from its first message's first line, shortened.
    assert_eq!(info["title"], "Fix the flaky test in CI", "{info}");

    let base = format!("/api/conversations/{sid}");
    let (code, traj) = c.get(0, &format!("{base}/trajectory"), None).await;
    assert_eq!(code, 200, "{traj}");
    let traj = traj["trajectory"]
        .as_array()
        .expect("trajectory list")
        .clone();
    let events = c.all_events(0, &sid, None).await;
    assert_eq!(traj, events, "the trajectory is the log");
    assert!(
        traj.iter()
            .any(|e| is_echo(e, "Fix the flaky test in CI\nsecond line"))
    );

    let (code, cfg) = c.get(0, &format!("{base}/config"), None).await;
    assert_eq!(
        (code, cfg),
        (200, json!({"runtime_id": null, "session_id": sid}))
    );
    let (code, vs) = c.get(0, &format!("{base}/vscode-url"), None).await;
    assert_eq!((code, vs), (200, json!({"vscode_url": null})));
    let (code, hosts) = c.get(0, &format!("{base}/web-hosts"), None).await;
    assert_eq!((code, hosts), (200, json!({"hosts": {}})));

    // Rename: stored, listed, refused when empty or for an unknown conversation.
    let patch = |path: String, body: Value| {
        let url = format!("{}{path}", c.url(0));
        async move {
            let r = tests::http_client()
                .patch(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (code, v) = patch(base.clone(), json!({"title": "  Renamed  "})).await;
    assert_eq!((code, v), (200, json!(true)));
    assert_eq!(c.info(0, &sid, None).await["title"], "Renamed");
    let (_, list) = c.get(0, "/api/conversations", None).await;
    assert_eq!(list["results"][0]["title"], "Renamed");
    let (code, v) = patch(base.clone(), json!({"title": "   "})).await;
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["detail"][0]["loc"], json!(["body", "title"]), "{v}");
    let other = shared::id::SessionId::generate();
    let (code, _) = patch(format!("/api/conversations/{other}"), json!({"title": "x"})).await;
    assert_eq!(code, 404);
    // A deleted conversation cannot be renamed back into existence.
    let (code, _) = c.delete(0, &base, None).await;
    assert_eq!(code, 200);
    let (code, _) = patch(base.clone(), json!({"title": "ghost"})).await;
    assert_eq!(code, 404);
    let (code, _) = c.get(0, &base, None).await;
    assert_eq!(code, 404);
}

/// Settings the UI saves take effect: the user's model, base URL and key apply to their next
/// conversation (the worker has no LLM of its own here: it runs the echo agent otherwise),
/// not to one created before; the key is never read back. A base URL at the control plane
/// is refused: that conversation ends in error. Secrets round-trip through the gateway's
/// Redis user (its ACL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_llm_settings_apply_to_their_new_conversations() {
    let llm = tests::llm::ScriptedLlm::start(vec![tests::llm::Reply::tool(
        "finish",
        &json!({"message": "hello from your model"}),
    )])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![("OH_WORKSPACE_ROOT", ws.path().display().to_string())],
        ..ClusterOpts::default()
    })
    .await;
    let before = c.create(0, Some("before"), None).await;
    c.wait_info(0, &before, None, T, ready).await;

    let (code, v) = c
        .post(
            0,
            "/api/settings",
            &json!({"llm_model": "user-model", "llm_base_url": llm.base_url(),
                    "llm_api_key": "sk-user-key", "language": "en", "search_api_key": ""}),
            None,
        )
        .await;
    assert_eq!((code, v), (200, json!({"message": "Settings stored"})));
    let (code, s) = c.get(0, "/api/settings", None).await;
    assert_eq!(code, 200, "{s}");
    assert_eq!(s["llm_model"], "user-model");
    assert_eq!(s["llm_api_key"], Value::Null, "the key is write-only: {s}");
    assert_eq!(s["llm_api_key_set"], true);
    assert!(!s.to_string().contains("sk-user-key"));

    let sid = c.create(0, Some("hi"), None).await;
    let mut sock = c.connect(0, &sid, Some(-1), None).await.expect("connect");
    let got = events_until(&mut sock, T, |e| is_state(e, "finished")).await;
    assert!(
        got.iter()
            .any(|e| e["action"] == "finish" && e.to_string().contains("hello from your model")),
        "{got:#?}"
    );
    let req = &llm.requests()[0];
    assert_eq!(req["model"], "user-model", "{req}");
    assert_eq!(
        llm.authorizations()[0].as_deref(),
        Some("Bearer sk-user-key")
    );
    // The conversation created before the save still runs the worker's own (echo) agent.
    let mut old = c
        .connect(0, &before, Some(-1), None)
        .await
        .expect("connect");
    old.emit(
        "oh_user_action",
        &json!({"action": "message", "args": {"content": "still echo"}}),
    )
    .await
    .expect("emit");
    events_until(&mut old, T, |e| is_echo(e, "still echo")).await;
    assert_eq!(
        llm.requests().len(),
        1,
        "the old conversation called the LLM"
    );

    // A base URL at the control plane: refused by the worker, the conversation ends in error.
    let (code, _) = c
        .post(
            0,
            "/api/settings",
            &json!({"llm_base_url": format!("http://127.0.0.1:{}/v1", c.nats.port())}),
            None,
        )
        .await;
    assert_eq!(code, 200);
    let bad = c.create(0, Some("hi"), None).await;
    let info = c
        .wait_info(0, &bad, None, T, |v| v["status"] == "ERROR")
        .await;
    assert!(
        info["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("control plane"),
        "{info}"
    );

    // Secrets: create, list (no values), rename, delete.
    let (code, v) = c
        .post(
            0,
            "/api/secrets",
            &json!({"name": "API_TOKEN", "value": "s3cret", "description": "d"}),
            None,
        )
        .await;
    assert_eq!(
        (code, v),
        (201, json!({"message": "Secret created successfully"}))
    );
    let (code, v) = c
        .post(
            0,
            "/api/secrets",
            &json!({"name": "API_TOKEN", "value": "x"}),
            None,
        )
        .await;
    assert_eq!(code, 400, "{v}");
    let put = tests::http_client()
        .put(format!("{}/api/secrets/API_TOKEN", c.url(0)))
        .json(&json!({"name": "RENAMED", "description": "e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 200);
    let (code, v) = c.get(0, "/api/secrets", None).await;
    assert_eq!(
        (code, v),
        (
            200,
            json!({"custom_secrets": [{"name": "RENAMED", "description": "e"}]})
        )
    );
    let (code, _) = c.delete(0, "/api/secrets/RENAMED", None).await;
    assert_eq!(code, 200);
    let (code, _) = c.delete(0, "/api/secrets/RENAMED", None).await;
    assert_eq!(code, 404);
}

/// A multipart/form-data body with one `files` part per `(name, bytes)`.
fn multipart(files: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "oh-test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn sh(dir: &std::path::Path, script: &str) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The workspace views of OpenHands' UI, answered by the owning worker while the session runs
/// (uploads, file list and contents, git changes computed in the sandbox, microagents) and
/// from the latest snapshot once it is stopped (list and contents; the rest say it must run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_files_from_the_owner_and_from_the_snapshot() {
    let ws = tempfile::tempdir().unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![("OH_WORKSPACE_ROOT", ws.path().display().to_string())],
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, Some("hello"), None).await;
    c.wait_info(0, &sid, None, T, ready).await;
    let base = format!("{}/api/conversations/{sid}", c.url(0));
    let http = tests::http_client();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{base}/{path}");
        async move {
            let r = http.get(url).send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };

    // Upload: two files written, bad names skipped with a reason.
    let (ct, body) = multipart(&[
        ("notes.txt", b"first line\nsecond line\n"),
        ("blob.bin", &[0u8, 159, 146, 150]),
        ("..", b"x"),
    ]);
    let r = http
        .post(format!("{base}/upload-files"))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let up: Value = r.json().await.unwrap();
    assert_eq!(
        up["uploaded_files"],
        json!(["/workspace/notes.txt", "/workspace/blob.bin"]),
        "{up}"
    );
    assert_eq!(up["skipped_files"][0]["name"], "..", "{up}");
    // The agent's side of the sandbox may change them: they belong to its user.
    let root = ws.path().join(&sid);
    assert_eq!(
        std::fs::read(root.join("notes.txt")).unwrap(),
        b"first line\nsecond line\n"
    );
    {
        use std::os::unix::fs::MetadataExt;
        let owner = |p: &std::path::Path| std::fs::metadata(p).unwrap().uid();
        assert_eq!(
            owner(&root.join("notes.txt")),
            owner(&root),
            "owned as the workspace"
        );
    }

    // A file over NATS' message size travels through the blob store, which keeps nothing
    // once the owner has read it.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (ct, body) = multipart(&[("big.bin", &big)]);
    let r = http
        .post(format!("{base}/upload-files"))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(std::fs::read(root.join("big.bin")).unwrap(), big);
    {
        use futures::StreamExt;
        let js = async_nats::jetstream::new(c.nats.connect().await);
        let names = shared::names::Names::new(&c.namespace).unwrap();
        let bucket = js.get_object_store(names.blob_bucket()).await.unwrap();
        let mut list = bucket.list().await.unwrap();
        while let Some(info) = list.next().await {
            let info = info.unwrap();
            assert!(
                info.deleted || !info.name.starts_with(&format!("{sid}.")),
                "blob left behind: {}",
                info.name
            );
        }
    }
    std::fs::remove_file(root.join("big.bin")).unwrap();

    // A git repository with one commit, then changes; AGENTS.md for the microagents.
    sh(
        &root,
        "export GIT_CONFIG_COUNT=3 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*' \
           GIT_CONFIG_KEY_1=user.email GIT_CONFIG_VALUE_1=t@t GIT_CONFIG_KEY_2=user.name GIT_CONFIG_VALUE_2=t \
         && git init -q . && git add notes.txt && git commit -qm init \
         && echo more >> notes.txt && mkdir -p src && echo 'fn main(){}' > src/main.rs \
         && echo 'Run make test.' > AGENTS.md && chown -R 65534:65534 .",
    );
    let (code, list) = get("list-files".into()).await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(
        list,
        json!(["src/", "AGENTS.md", "blob.bin", "notes.txt"]),
        "no .git"
    );
    let (code, list) = get("list-files?path=src".into()).await;
    assert_eq!((code, list), (200, json!(["src/main.rs"])));
    let (code, file) = get("select-file?file=/workspace/notes.txt".into()).await;
    assert_eq!(
        (code, file),
        (200, json!({"code": "first line\nsecond line\nmore\n"}))
    );
    let (code, v) = get("select-file?file=blob.bin".into()).await;
    assert_eq!(code, 415, "{v}");
    let (code, v) = get("select-file?file=../../etc/passwd".into()).await;
    assert_eq!(code, 400, "{v}");
    let (code, v) = get("select-file".into()).await;
    assert_eq!(code, 422, "{v}");
    let (code, changes) = get("git/changes".into()).await;
    assert_eq!(code, 200, "{changes}");
    assert_eq!(
        changes,
        json!([
            {"status": "A", "path": "AGENTS.md"},
            {"status": "A", "path": "blob.bin"},
            {"status": "M", "path": "notes.txt"},
            {"status": "A", "path": "src/main.rs"},
        ])
    );
    let (code, m) = get("microagents".into()).await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["microagents"][0]["type"], "repo", "{m}");
    assert_eq!(m["microagents"][0]["content"], "Run make test.\n");

    // Stopped: read from the snapshot taken at the stop.
    let (code, _) = c
        .post(
            0,
            &format!("/api/conversations/{sid}/stop"),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(code, 200);
    c.wait_info(0, &sid, None, T, |v| v["status"] == "STOPPED")
        .await;
    let (code, list) = get("list-files".into()).await;
    assert_eq!(
        (code, list),
        (200, json!(["src/", "AGENTS.md", "blob.bin", "notes.txt"]))
    );
    let (code, file) = get("select-file?file=notes.txt".into()).await;
    assert_eq!(
        (code, file),
        (200, json!({"code": "first line\nsecond line\nmore\n"}))
    );
    let (code, v) = get("select-file?file=missing.txt".into()).await;
    assert_eq!(code, 404, "{v}");
    for path in ["git/changes", "microagents"] {
        let (code, v) = get(path.into()).await;
        assert_eq!(code, 409, "{path}: {v}");
        assert!(v["error"].as_str().unwrap().contains("not running"), "{v}");
    }
    // Someone else's conversation is not found.
    let other = shared::id::SessionId::generate();
    let r = http
        .get(format!("{}/api/conversations/{other}/list-files", c.url(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}
