//! OpenTelemetry traces across processes (real gateway and worker binaries exporting OTLP/HTTP
//! to the test's receiver): one user message is one trace, from the gateway's socket handler
//! through JetStream to the owning worker (its LLM call and the command it runs), and back
//! through the events it appends to the gateway that fans them out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use tests::cluster::{Cluster, ClusterOpts, events_until, is_state};
use tests::llm::{Reply, ScriptedLlm};
use tests::otlp::{OtlpReceiver, Span};

const T: Duration = Duration::from_secs(30);

fn named<'a>(spans: &'a [Span], service: &str, name: &str, trace: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.service == service && s.name == name && s.trace_id == trace)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_is_one_trace_across_gateway_and_worker() {
    let otlp = OtlpReceiver::start().await;
    let llm = ScriptedLlm::start(vec![
        Reply::tool("execute_bash", &json!({"command": "echo traced"})),
        Reply::tool("finish", &json!({"message": "done"})),
        Reply::tool("finish", &json!({"message": "second"})),
    ])
    .await;
    let ws = tempfile::tempdir().unwrap();
    let traced = |mut env: Vec<(&'static str, String)>| {
        env.push(("OH_OTLP_ENDPOINT", otlp.endpoint()));
        env.push(("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()));
        env
    };
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: traced(vec![
            ("OH_LLM_BASE_URL", llm.base_url()),
            ("OH_LLM_MODEL", "test-model".to_owned()),
            ("OH_WORKSPACE_ROOT", ws.path().display().to_string()),
        ]),
        gateway_env: traced(Vec::new()),
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, None, None).await;
    c.wait_info(0, &sid, None, T, |v| {
        v["status"] == "RUNNING" && v["agent_state"] == "awaiting_user_input"
    })
    .await;
    let mut sock = c.connect(0, &sid, Some(-1), None).await.expect("connect");
    let say = |text: &str| json!({"action": "message", "args": {"content": text}});
    sock.emit("oh_user_action", &say("run it"))
        .await
        .expect("emit");
    events_until(&mut sock, T, |e| is_state(e, "finished")).await;

    // The gateway's span of that message, and the trace it starts.
    let deadline = tokio::time::Instant::now() + T;
    let (spans, trace) = loop {
        let spans = otlp.spans();
        let found = spans
            .iter()
            .filter(|s| s.service == "oh-gateway" && s.name == "action")
            .find_map(|a| {
                let t = &a.trace_id;
                // Exported in batches: wait for every step (think, act, think) too.
                let complete = ["apply_action", "complete", "runtime"]
                    .iter()
                    .all(|n| !named(&spans, "oh-worker", n, t).is_empty())
                    && named(&spans, "oh-worker", "agent_step", t).len() >= 3
                    && named(&spans, "oh-gateway", "fanout", t).len() >= 5;
                complete.then(|| t.clone())
            });
        if let Some(t) = found {
            break (spans, t);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no complete trace of the message; spans: {:#?}",
            spans
                .iter()
                .map(|s| (&s.service, &s.name, &s.trace_id))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(otlp.undecodable(), 0);
    let by_id = |id: &str| {
        spans
            .iter()
            .find(|s| s.span_id == id && s.trace_id == trace)
    };

    // socket → JetStream → worker: the worker's span is a direct child of the gateway's.
    let action = named(&spans, "oh-gateway", "action", &trace);
    assert_eq!(action.len(), 1, "one gateway action span: {action:#?}");
    assert_eq!(action[0].attribute("session_id"), Some(sid.as_str()));
    let applied = named(&spans, "oh-worker", "apply_action", &trace);
    assert_eq!(applied.len(), 1, "{applied:#?}");
    assert_eq!(
        applied[0].parent_id, action[0].span_id,
        "worker span's parent"
    );

    // worker → LLM / runtime: the turn's steps hang under the action that started it.
    let steps = named(&spans, "oh-worker", "agent_step", &trace);
    assert!(steps.len() >= 3, "think, act, think: {steps:#?}");
    for s in &steps {
        assert_eq!(s.parent_id, applied[0].span_id, "{s:#?}");
    }
    for name in ["complete", "runtime"] {
        for s in named(&spans, "oh-worker", name, &trace) {
            let parent = by_id(&s.parent_id).expect("parent in the trace");
            assert_eq!(parent.name, "agent_step", "{name}'s parent: {parent:#?}");
        }
    }
    let runtime = named(&spans, "oh-worker", "runtime", &trace);
    assert_eq!(runtime[0].attribute("action"), Some("run"));

    // append → fan-out: the gateway continues the trace on the events the worker appended
    // (user message, state changes, the command and its output, finish).
    let fanouts = named(&spans, "oh-gateway", "fanout", &trace);
    assert!(fanouts.len() >= 5, "{} fan-out spans", fanouts.len());
    for f in &fanouts {
        let parent = by_id(&f.parent_id).expect("fan-out's parent in the trace");
        assert_eq!(parent.service, "oh-worker", "{f:#?} <- {parent:#?}");
    }

    // A second message is a trace of its own.
    sock.emit("oh_user_action", &say("again"))
        .await
        .expect("emit");
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let spans = otlp.spans();
        let actions: Vec<&Span> = spans
            .iter()
            .filter(|s| s.service == "oh-gateway" && s.name == "action")
            .collect();
        if let Some(second) = actions.iter().find(|s| s.trace_id != trace)
            && !named(&spans, "oh-worker", "apply_action", &second.trace_id).is_empty()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second message has no trace of its own"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
