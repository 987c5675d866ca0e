//! Storage limits (fault-plan row 18): a full stream refuses the write and the caller gets a
//! clear error, never a false acknowledgement; nothing stored is dropped; other conversations
//! keep working.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::check::check_log;
use tests::cluster::{Cluster, ClusterOpts, events_until, is_echo};

const T: Duration = Duration::from_secs(30);

/// A conversation whose log reaches `OH_MAX_EVENTS_PER_CONVERSATION` stops with a clear
/// error (live, and in its status), keeps every event it had, does not crash-loop, and
/// refuses later messages the same way; another conversation is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_conversation_log_stops_with_a_clear_error_and_loses_nothing() {
    let limit = ("OH_MAX_EVENTS_PER_CONVERSATION", "100".to_owned());
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![limit.clone()],
        gateway_env: vec![limit],
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, None, None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    let mut full_notice = None;
    let started = Instant::now();
    'send: for i in 0..200 {
        let text = format!("m{i}");
        a.emit(
            "oh_user_action",
            &json!({"action": "message", "args": {"content": text}}),
        )
        .await
        .unwrap();
        // The echo, or the notice that the log is full.
        loop {
            let (_, ev) = a.next_event(T).await.unwrap();
            if ev["id"] == "AGENT_ERROR$CONVERSATION_FULL" {
                full_notice = Some(ev);
                break 'send;
            }
            if is_echo(&ev, &text) {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120));
    }
    let notice = full_notice.expect("the client is told the log is full");
    assert_eq!(notice["status_update"], true);
    assert_eq!(notice["type"], "error");
    assert!(
        notice["message"]
            .as_str()
            .unwrap()
            .contains("OH_MAX_EVENTS_PER_CONVERSATION"),
        "{notice}"
    );
    // Every stored event is still there, dense, exactly the limit.
    let stored = check_log(&c, &sid).await;
    assert_eq!(stored.len(), 100, "the log holds exactly the limit");
    let info = c
        .wait_info(0, &sid, None, T, |i| i["status"] == "ERROR")
        .await;
    assert!(
        info.to_string().contains("CONVERSATION_FULL"),
        "the status says why: {info}"
    );
    // A later message is refused the same way, without a crash loop.
    a.emit(
        "oh_user_action",
        &json!({"action": "message", "args": {"content": "one more"}}),
    )
    .await
    .unwrap();
    let ev = events_until(&mut a, T, |e| e["id"] == "AGENT_ERROR$CONVERSATION_FULL").await;
    assert!(!ev.is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.all_events(0, &sid, None).await.len(), 100);
    let logs = c.logs();
    let fulls = logs.matches("event log full; conversation stopped").count();
    assert!((1..=3).contains(&fulls), "{fulls} full-log stops: a loop?");
    // Another conversation works.
    let other = c.create(0, Some("hello"), None).await;
    let mut b = c.connect(0, &other, None, None).await.unwrap();
    events_until(&mut b, T, |e| is_echo(e, "hello")).await;
}

/// With no worker to take actions, a full action queue (`OH_QUEUE_MAX_MIB`) refuses the next
/// action with a clear error on Socket.IO (`error: true`, never `success`) and 507 on REST;
/// what was acknowledged before is kept and runs once a worker comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_action_queue_refuses_instead_of_acknowledging() {
    let limit = ("OH_QUEUE_MAX_MIB", "1".to_owned());
    let mut c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 0,
        worker_env: vec![limit.clone()],
        gateway_env: vec![limit],
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, None, None).await;
    let a = c.connect(0, &sid, None, None).await.unwrap();
    // ~300 KiB each, sent inline (under NATS' max payload): the fourth cannot fit in 1 MiB.
    let big = "x".repeat(300 * 1024);
    assert!(c.store().await.inline_limit() > big.len() + 1024);
    let mut acked = Vec::new();
    let mut refused: Option<Value> = None;
    for i in 0..10 {
        let text = format!("{i}:{big}");
        let acks = a
            .emit_with_ack(
                "oh_user_action",
                &json!({"action": "message", "args": {"content": text}}),
                T,
            )
            .await
            .unwrap();
        let ack = acks.into_iter().next().unwrap_or(Value::Null);
        if ack["error"] == true {
            refused = Some(ack);
            break;
        }
        assert_eq!(ack["success"], true, "{ack}");
        acked.push(i);
    }
    let refused = refused.expect("the queue never filled");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("queue is full"),
        "{refused}"
    );
    assert!((1..10).contains(&acked.len()), "{acked:?}");
    // REST says 507, with a JSON error.
    let (status, body) = c
        .post(
            0,
            "/api/conversations",
            &json!({"initial_user_msg": big}),
            None,
        )
        .await;
    assert_eq!(status, 507, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("full"),
        "{body}"
    );
    // A worker comes: every acknowledged action runs, exactly once, in order.
    c.add_worker().await;
    let mut b = c.connect(0, &sid, None, None).await.unwrap();
    let last = format!("{}:{big}", acked.last().unwrap());
    let got = events_until(&mut b, Duration::from_secs(60), |e| is_echo(e, &last)).await;
    let echoed: Vec<&Value> = got
        .iter()
        .filter(|e| e["source"] == "agent" && e["action"] == "message")
        .collect();
    assert_eq!(echoed.len(), acked.len(), "each acknowledged action once");
}

/// Payloads over NATS' message size live in the blob store: an applied action's blob is
/// deleted once its event is stored, and DELETE removes every blob of the conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_collected_after_apply_and_on_delete() {
    use futures::StreamExt;
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await;
    let client = c.nats.connect().await;
    let js = async_nats::jetstream::new(client);
    let names = shared::names::Names::new(&c.namespace).unwrap();
    let bucket = js.get_object_store(names.blob_bucket()).await.unwrap();
    let blobs_of = |sid: String| {
        let bucket = bucket.clone();
        async move {
            let mut list = bucket.list().await.unwrap();
            let mut n = 0;
            while let Some(info) = list.next().await {
                let info = info.unwrap();
                if info.name.starts_with(&format!("{sid}.")) && !info.deleted {
                    n += 1;
                }
            }
            n
        }
    };
    let sid = c.create(0, None, None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    let big = "y".repeat(1536 * 1024);
    let acks = a
        .emit_with_ack(
            "oh_user_action",
            &json!({"action": "message", "args": {"content": big}}),
            T,
        )
        .await
        .unwrap();
    assert_eq!(acks.first().map(|a| &a["success"]), Some(&json!(true)));
    events_until(&mut a, T, |e| is_echo(e, &big)).await;
    // The user message and the echo are events with blobs; the action's blob is gone.
    let deadline = Instant::now() + T;
    while blobs_of(sid.clone()).await != 2 {
        assert!(
            Instant::now() < deadline,
            "blobs: {}",
            blobs_of(sid.clone()).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = c
        .delete(0, &format!("/api/conversations/{sid}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(blobs_of(sid.clone()).await, 0, "DELETE leaves no blob");
}
