//! The real agent end to end (issue 5): the CodeAct agent in the real worker binary, talking
//! to a scripted OpenAI-compatible server (the production LLM client unchanged), executing in
//! the session's runtime, observed through the gateway by a Socket.IO client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::check::check_log;
use tests::cluster::{Cluster, ClusterOpts, events_until, is_state};
use tests::llm::{Reply, ScriptedLlm};
use tests::sio::SioClient;

const T: Duration = Duration::from_secs(30);

async fn cluster(llm: &ScriptedLlm, workspaces: &tempfile::TempDir, workers: usize) -> Cluster {
    Cluster::start(ClusterOpts {
        gateways: 1,
        workers,
        lease_ttl_ms: 1500,
        worker_env: vec![
            ("OH_LLM_BASE_URL", llm.base_url()),
            ("OH_LLM_MODEL", "test-model".to_owned()),
            ("OH_LLM_API_KEY", "sk-test-secret-123".to_owned()),
            ("OH_LLM_RETRY_MIN_WAIT_MS", "10".to_owned()),
            ("OH_LLM_RETRY_MAX_WAIT_MS", "50".to_owned()),
            ("OH_WORKSPACE_ROOT", workspaces.path().display().to_string()),
        ],
        ..ClusterOpts::default()
    })
    .await
}

async fn start(c: &Cluster, msg: &str) -> (String, SioClient) {
    let sid = c.create(0, Some(msg), None).await;
    let client = c.connect(0, &sid, None, None).await.unwrap();
    (sid, client)
}

fn obs<'a>(evs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    evs.iter().filter(|e| e["observation"] == kind).collect()
}

/// (a) execute_bash runs in the session's workspace; the `run` observation has the output and
/// exit code 0; `finish` ends the turn in `finished`. The API key never reaches an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_a_command_and_finishes() {
    let llm = ScriptedLlm::start(vec![
        Reply::tool("execute_bash", &json!({"command": "echo hi > f && cat f"})),
        Reply::tool("finish", &json!({"message": "done"})),
    ])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let c = cluster(&llm, &ws, 1).await;
    let (sid, mut a) = start(&c, "make a file f with hi").await;
    let got = events_until(&mut a, T, |e| is_state(e, "finished")).await;
    let run = obs(&got, "run");
    assert_eq!(run.len(), 1, "{got:#?}");
    assert_eq!(run[0]["content"].as_str().unwrap().trim(), "hi");
    assert_eq!(run[0]["extras"]["metadata"]["exit_code"], 0);
    assert_eq!(run[0]["success"], true);
    let action = got.iter().find(|e| e["action"] == "run").unwrap();
    assert_eq!(
        action["tool_call_metadata"]["function_name"],
        "execute_bash"
    );
    assert_eq!(run[0]["cause"], action["id"]);
    assert!(
        action["llm_metrics"]["accumulated_token_usage"]["prompt_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(got.iter().any(|e| e["action"] == "finish"));
    // The file is in the session's own workspace.
    assert_eq!(
        std::fs::read_to_string(ws.path().join(&sid).join("f"))
            .unwrap()
            .trim(),
        "hi"
    );
    // The model saw the command's output as the tool's answer.
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 2);
    let tool_msg = reqs[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap();
    assert!(
        tool_msg["content"].as_str().unwrap().contains("hi"),
        "{tool_msg}"
    );
    assert_eq!(
        llm.authorizations()[0].as_deref(),
        Some("Bearer sk-test-secret-123")
    );
    let stored = c.all_events(0, &sid, None).await;
    assert!(
        !serde_json::to_string(&stored)
            .unwrap()
            .contains("sk-test-secret-123")
    );
    assert!(
        !c.logs().contains("sk-test-secret-123"),
        "the key was logged"
    );
}

fn sleepers(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .replace('\0', " ")
                        .contains(marker)
                })
                .unwrap_or(false)
        })
        .count()
}

/// (b) Stop during `sleep`: state `stopped` within 1 s, and the process is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_a_command_takes_effect_within_a_second() {
    let llm = ScriptedLlm::start(vec![Reply::tool(
        "execute_bash",
        &json!({"command": "sleep 31.77"}),
    )])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let c = cluster(&llm, &ws, 1).await;
    let (_sid, mut a) = start(&c, "wait a while").await;
    events_until(&mut a, T, |e| e["action"] == "run").await;
    let deadline = Instant::now() + T;
    while sleepers("sleep 31.77") == 0 {
        assert!(Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    a.emit(
        "oh_user_action",
        &json!({"action": "change_agent_state", "args": {"agent_state": "stopped"}}),
    )
    .await
    .unwrap();
    let got = events_until(&mut a, T, |e| is_state(e, "stopped")).await;
    let took = t0.elapsed();
    assert!(took <= Duration::from_secs(1), "stop took {took:?}");
    let errors = obs(&got, "error");
    assert_eq!(
        errors[0]["extras"]["error_id"], "AGENT_ERROR$ERROR_ACTION_NOT_EXECUTED_STOPPED",
        "{got:#?}"
    );
    assert_eq!(sleepers("sleep 31.77"), 0, "the command survived the stop");
    eprintln!("stop took {took:?}");
}

/// (c) Two 429s then success: two retry status updates reach the client, then the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_retried_and_announced() {
    let llm = ScriptedLlm::start(vec![
        Reply::Status(429, None),
        Reply::Status(429, None),
        Reply::text("the answer"),
    ])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let c = cluster(&llm, &ws, 1).await;
    // Status updates are live-only: the client listens before the message is sent (with the
    // message in the create request, the retries could all happen before it joined).
    let sid = c.create(0, None, None).await;
    c.wait_info(0, &sid, None, T, |v| {
        v["agent_state"] == "awaiting_user_input"
    })
    .await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    tests::check::say_reliably(&a, "question", "m1").await;
    let got = events_until(&mut a, T, |e| {
        e["action"] == "message" && e["source"] == "agent"
    })
    .await;
    let retries: Vec<&Value> = got
        .iter()
        .filter(|e| e["id"] == "STATUS$LLM_RETRY")
        .collect();
    assert_eq!(retries.len(), 2, "{got:#?}");
    assert_eq!(retries[0]["status_update"], true);
    assert_eq!(retries[1]["message"], "Retrying LLM request, 2 / 5");
    assert_eq!(got.last().unwrap()["args"]["content"], "the answer");
    assert_eq!(llm.requests().len(), 3);
}

/// (d) Malformed tool arguments become an error observation fed back to the model; the
/// conversation goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tool_arguments_become_an_error_observation() {
    let llm = ScriptedLlm::start(vec![
        Reply::ToolCall {
            name: "execute_bash".into(),
            arguments: "{not json".into(),
        },
        Reply::text("recovered"),
    ])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let c = cluster(&llm, &ws, 1).await;
    let (_sid, mut a) = start(&c, "go").await;
    let got = events_until(&mut a, T, |e| is_state(e, "awaiting_user_input")).await;
    let errors = obs(&got, "error");
    assert_eq!(errors.len(), 1, "{got:#?}");
    assert!(
        errors[0]["content"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    assert!(
        got.iter()
            .any(|e| e["action"] == "message" && e["args"]["content"] == "recovered")
    );
    let second = &llm.requests()[1];
    let tool = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap();
    assert!(
        tool["content"].as_str().unwrap().contains("ERROR"),
        "{tool}"
    );
}

/// (e) kill -9 of the owner between two steps: the turn continues on another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_continues_on_another_worker_after_kill9_between_steps() {
    let llm = ScriptedLlm::start(vec![
        Reply::tool("execute_bash", &json!({"command": "echo step1"})),
        Reply::delayed(
            Duration::from_secs(20),
            Reply::tool("finish", &json!({"message": "late"})),
        ),
        Reply::tool("finish", &json!({"message": "continued"})),
    ])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let mut c = cluster(&llm, &ws, 2).await;
    let (sid, mut a) = start(&c, "two steps").await;
    events_until(&mut a, T, |e| e["observation"] == "run").await;
    // The second LLM call is in flight (delayed): kill its worker.
    let deadline = Instant::now() + T;
    while llm.requests().len() < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let owner = c.info(0, &sid, None).await["worker_id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.workers[Cluster::worker_index(&owner)].kill9().await;
    let got = events_until(&mut a, T, |e| is_state(e, "finished")).await;
    let finish = got.iter().find(|e| e["action"] == "finish").unwrap();
    assert_eq!(finish["args"]["final_thought"], "continued");
    let new_owner = c.info(0, &sid, None).await["worker_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_owner, owner);
    let stored = c.all_events(0, &sid, None).await;
    assert_eq!(
        stored.iter().filter(|e| e["action"] == "run").count(),
        1,
        "step 1 ran again"
    );
    check_log(&c, &sid).await;
}

/// (g) A file edit outside the workspace is refused with an error observation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_outside_the_workspace_are_refused() {
    let target = format!("/tmp/oh-escape-{}", uuid::Uuid::new_v4().simple());
    let llm = ScriptedLlm::start(vec![
        Reply::tool(
            "str_replace_editor",
            &json!({"command": "create", "path": target, "file_text": "x"}),
        ),
        Reply::tool(
            "str_replace_editor",
            &json!({"command": "create", "path": "../escape.txt", "file_text": "x"}),
        ),
        Reply::tool(
            "str_replace_editor",
            &json!({"command": "create", "path": "/workspace/inside.txt", "file_text": "ok"}),
        ),
        Reply::text("done"),
    ])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let c = cluster(&llm, &ws, 1).await;
    let (sid, mut a) = start(&c, "write files").await;
    let got = events_until(&mut a, T, |e| is_state(e, "awaiting_user_input")).await;
    let errors = obs(&got, "error");
    assert_eq!(errors.len(), 2, "{got:#?}");
    assert!(!std::path::Path::new(&target).exists());
    assert!(!ws.path().join("escape.txt").exists());
    assert_eq!(
        std::fs::read_to_string(ws.path().join(&sid).join("inside.txt")).unwrap(),
        "ok"
    );
    assert_eq!(obs(&got, "edit").len(), 1);
}

fn fixture(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/openhands")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

/// (f) Every OpenHands fixture trajectory (`tests/fixtures/openhands`) replays (through the
/// real runtime, no LLM) to the state OpenHands reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_trajectories_replay_to_their_end_state() {
    let ws = tempfile::tempdir().unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![("OH_WORKSPACE_ROOT", ws.path().display().to_string())],
        ..ClusterOpts::default()
    })
    .await;
    for name in [
        "basic.json",
        "basic_interactions.json",
        "wrong_initial_state.json",
    ] {
        let (code, v) = c
            .post(
                0,
                "/api/conversations",
                &json!({"replay_json": fixture(name)}),
                None,
            )
            .await;
        assert_eq!(code, 200, "{name}: {v}");
        let sid = v["conversation_id"].as_str().unwrap().to_owned();
        let mut a = c.connect(0, &sid, None, None).await.unwrap();
        let got = events_until(&mut a, T, |e| {
            is_state(e, "finished") || is_state(e, "error")
        })
        .await;
        assert!(
            is_state(got.last().unwrap(), "finished"),
            "{name}: {got:#?}"
        );
        // Replay never stopped for user input mid-way.
        let stored = c.all_events(0, &sid, None).await;
        assert!(
            !stored.iter().any(|e| is_state(e, "awaiting_user_input")),
            "{name}"
        );
        match name {
            "basic.json" => {
                assert!(ws.path().join(&sid).join("game_2048.py").exists(), "{name}");
                assert_eq!(obs(&stored, "edit").len(), 1, "{name}");
            }
            "basic_interactions.json" => {
                let users: Vec<&str> = stored
                    .iter()
                    .filter(|e| e["source"] == "user" && e["action"] == "message")
                    .map(|e| e["args"]["content"].as_str().unwrap())
                    .collect();
                assert_eq!(
                    users,
                    [
                        "what's 1+1?",
                        "No, I mean by Goldbach's conjecture!",
                        "Finish please"
                    ]
                );
            }
            _ => {
                // The recorded `mv` succeeded; in a fresh workspace it fails, and the replay
                // goes on with its own (new) observation.
                let run = obs(&stored, "run");
                assert_eq!(run.len(), 1, "{name}");
                assert_ne!(run[0]["extras"]["metadata"]["exit_code"], 0, "{name}");
            }
        }
    }
    // A trajectory that is not one is refused at creation with a clear error.
    let (code, v) = c
        .post(
            0,
            "/api/conversations",
            &json!({"replay_json": fixture("output.jsonl")}),
            None,
        )
        .await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("replay_json"),
        "{v}"
    );
}

/// Memory: the first user message recalls the workspace's AGENTS.md; a later message that
/// mentions a knowledge trigger recalls that knowledge; both reach the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_recalls_workspace_instructions_and_knowledge() {
    let llm = ScriptedLlm::start(vec![
        Reply::text("first answer"),
        Reply::text("second answer"),
    ])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let kdir = tempfile::tempdir().unwrap();
    std::fs::write(
        kdir.path().join("k8s.md"),
        "---\ntriggers:\n- kubernetes\n---\nUse kubectl apply.\n",
    )
    .unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![
            ("OH_LLM_BASE_URL", llm.base_url()),
            ("OH_WORKSPACE_ROOT", ws.path().display().to_string()),
            ("OH_KNOWLEDGE_DIR", kdir.path().display().to_string()),
        ],
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, None, None).await;
    c.wait_info(0, &sid, None, T, |v| {
        v["agent_state"] == "awaiting_user_input"
    })
    .await;
    std::fs::create_dir_all(ws.path().join(&sid)).unwrap();
    std::fs::write(
        ws.path().join(&sid).join("AGENTS.md"),
        "Always run make test.",
    )
    .unwrap();
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    tests::check::say_reliably(&a, "hello", "m1").await;
    events_until(&mut a, T, |e| e["args"]["content"] == "first answer").await;
    tests::check::say_reliably(&a, "deploy to kubernetes", "m2").await;
    events_until(&mut a, T, |e| e["args"]["content"] == "second answer").await;
    let stored = c.all_events(0, &sid, None).await;
    let recalls = obs(&stored, "recall");
    assert_eq!(recalls.len(), 2, "{stored:#?}");
    assert_eq!(recalls[0]["extras"]["recall_type"], "workspace_context");
    assert_eq!(
        recalls[0]["extras"]["repo_instructions"],
        "Always run make test."
    );
    assert_eq!(
        recalls[1]["extras"]["microagent_knowledge"][0]["name"],
        "k8s"
    );
    assert_eq!(stored.iter().filter(|e| e["action"] == "recall").count(), 2);
    let reqs = llm.requests();
    assert!(reqs[0].to_string().contains("Always run make test."));
    assert!(reqs[1].to_string().contains("Use kubectl apply."));
}

/// `max_iterations` ends a turn that does not finish in `error`, with a clear reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iteration_limit_ends_the_turn_in_error() {
    let llm = ScriptedLlm::start(vec![
        Reply::tool("execute_bash", &json!({"command": "echo 1"})),
        Reply::tool("execute_bash", &json!({"command": "echo 2"})),
        Reply::tool("execute_bash", &json!({"command": "echo 3"})),
    ])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![
            ("OH_LLM_BASE_URL", llm.base_url()),
            ("OH_WORKSPACE_ROOT", ws.path().display().to_string()),
            ("OH_MAX_ITERATIONS", "2".to_owned()),
        ],
        ..ClusterOpts::default()
    })
    .await;
    let (_sid, mut a) = start(&c, "loop").await;
    let got = events_until(&mut a, T, |e| is_state(e, "error")).await;
    let reason = got.last().unwrap()["extras"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("maximum iteration"), "{reason}");
    assert_eq!(obs(&got, "run").len(), 2);
    assert_eq!(llm.requests().len(), 2);
}

/// A response with several tool calls runs them all, in order, as OpenHands does: two
/// commands (the second sees the first's file) and `finish`, from one model answer; the model
/// is asked once, and each action names its place in that response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_call_of_a_response_runs_in_order() {
    let llm = ScriptedLlm::start(vec![Reply::ToolCalls(vec![
        (
            "execute_bash".into(),
            json!({"command": "echo one > a"}).to_string(),
        ),
        (
            "execute_bash".into(),
            json!({"command": "cat a; echo two"}).to_string(),
        ),
        ("finish".into(), json!({"message": "both ran"}).to_string()),
    ])])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let c = cluster(&llm, &ws, 1).await;
    let (sid, mut a) = start(&c, "run two commands").await;
    let got = events_until(&mut a, T, |e| is_state(e, "finished")).await;
    let runs: Vec<&Value> = got.iter().filter(|e| e["action"] == "run").collect();
    assert_eq!(runs.len(), 2, "{got:#?}");
    assert_eq!(runs[0]["args"]["command"], "echo one > a");
    assert_eq!(runs[1]["args"]["command"], "cat a; echo two");
    let outputs: Vec<String> = obs(&got, "run")
        .iter()
        .map(|o| o["content"].as_str().unwrap().trim().to_owned())
        .collect();
    assert_eq!(outputs, ["", "one\ntwo"], "{got:#?}");
    let finish = got
        .iter()
        .find(|e| e["action"] == "finish")
        .expect("finish");
    let ids: Vec<&Value> = runs
        .iter()
        .chain(std::iter::once(&finish))
        .map(|e| &e["tool_call_metadata"]["tool_call_id"])
        .collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");
    for e in runs.iter().chain(std::iter::once(&finish)) {
        assert_eq!(e["tool_call_metadata"]["total_calls_in_response"], 3);
    }
    assert_eq!(llm.requests().len(), 1, "the model was asked again");
    // The log holds them in the same order.
    let stored = check_log(&c, &sid).await;
    assert!(!stored.is_empty());
}
