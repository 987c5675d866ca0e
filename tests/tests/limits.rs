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
/// deleted once its event is stored, and DELETE removes every blob of the conversation, and
/// its workspace on the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_and_workspaces_are_collected_after_apply_and_on_delete() {
    use futures::StreamExt;
    let ws = tempfile::tempdir().unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![("OH_WORKSPACE_ROOT", ws.path().display().to_string())],
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
    // The client leaves (a connected socket keeps the gateway's expiring presence entry).
    a.close().await;
    let (status, _) = c
        .delete(0, &format!("/api/conversations/{sid}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(blobs_of(sid.clone()).await, 0, "DELETE leaves no blob");
    // Nor anything else: no message on any of its subjects, no Redis key.
    let id = shared::id::SessionId::parse(&sid).unwrap();
    let uid = shared::id::UserId::parse("local").unwrap();
    for (stream, subject) in [
        (names.events_stream(), names.events_subject(&id)),
        (names.actions_stream(), names.actions_subject(&id)),
        (names.work_stream(), names.work_subject(&id)),
        (names.meta_bucket(), names.meta_subject(&uid, &id)),
    ] {
        let st = js.get_stream(&stream).await.unwrap();
        let info = st.info_with_subjects(&subject).await.unwrap();
        let left: Vec<_> = info.collect().await;
        assert!(left.is_empty(), "{subject} still holds messages: {left:?}");
    }
    let mut actions = js.get_stream(names.actions_stream()).await.unwrap();
    assert_eq!(
        actions.info().await.unwrap().state.consumer_count,
        0,
        "actions are read without consumers"
    );
    let mut redis = redis::Client::open(c.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*{sid}*"))
            .query_async(&mut redis)
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "Redis keys left: {keys:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(names.should_run_key())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        !members.iter().any(|m| m.contains(&sid)),
        "still in the should-run set: {members:?}"
    );

    // A replayed trajectory writes files in the workspace; DELETE removes the folder.
    let trajectory = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/openhands/basic.json"),
    )
    .unwrap();
    let (code, v) = c
        .post(
            0,
            "/api/conversations",
            &json!({"replay_json": trajectory}),
            None,
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let sid = v["conversation_id"].as_str().unwrap().to_owned();
    let mut r = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut r, T, |e| tests::cluster::is_state(e, "finished")).await;
    let dir = ws.path().join(&sid);
    assert!(dir.join("game_2048.py").exists());
    let (status, _) = c
        .delete(0, &format!("/api/conversations/{sid}"), None)
        .await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.exists() {
        assert!(Instant::now() < deadline, "the workspace outlived DELETE");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Per-user rates and caps hold exactly across two gateways: creates (token bucket), stored
/// conversations, open sockets and actions; each refusal is a clear error to that caller only
/// (REST 429 with `Retry-After` for a rate; a refused connect; an action error), and another
/// user is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_rates_and_caps_are_exact_across_gateways() {
    let env = vec![
        ("OH_CREATE_RATE", "6/min,6".to_owned()),
        ("OH_MAX_STORED_CONVERSATIONS_PER_USER", "3".to_owned()),
        ("OH_MAX_SOCKETS_PER_USER", "2".to_owned()),
        ("OH_MESSAGE_RATE", "6/min,4".to_owned()),
    ];
    let c = Cluster::start(ClusterOpts {
        gateways: 2,
        workers: 1,
        auth_tokens: Some("token-alice=alice,token-bob=bob".to_owned()),
        gateway_env: env,
        ..ClusterOpts::default()
    })
    .await;
    // Bob: 10 creates at once over both gateways. 6 tokens: 3 stored (the cap), 3 refused by
    // the cap, 4 by the rate.
    let creates = (0..10).map(|i| {
        let c = &c;
        async move {
            c.post(i % 2, "/api/conversations", &json!({}), Some("token-bob"))
                .await
        }
    });
    let results = futures::future::join_all(creates).await;
    let count = |pred: &dyn Fn(&(u16, Value)) -> bool| results.iter().filter(|r| pred(r)).count();
    let msg = |r: &(u16, Value)| r.1["message"].as_str().unwrap_or_default().to_owned();
    assert_eq!(count(&|r| r.0 == 200), 3, "{results:?}");
    assert_eq!(
        count(&|r| r.0 == 429 && msg(r).contains("stored conversations")),
        3,
        "{results:?}"
    );
    assert_eq!(
        count(&|r| r.0 == 429 && msg(r).contains("OH_CREATE_RATE")),
        4,
        "{results:?}"
    );
    // The rate refusal says when to come back.
    let r = reqwest::Client::new()
        .post(c.url(1) + "/api/conversations")
        .bearer_auth("token-bob")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "Retry-After {retry}");

    // Alice is not affected by Bob; deleting frees a stored slot.
    let mut alice = Vec::new();
    for i in 0..3 {
        alice.push(c.create(i % 2, None, Some("token-alice")).await);
    }
    let (code, v) = c
        .post(0, "/api/conversations", &json!({}), Some("token-alice"))
        .await;
    assert_eq!(code, 429, "{v}");
    let (code, _) = c
        .delete(
            1,
            &format!("/api/conversations/{}", alice[2]),
            Some("token-alice"),
        )
        .await;
    assert_eq!(code, 200);
    alice[2] = c.create(0, None, Some("token-alice")).await;

    // Sockets: two (one per gateway), the third refused; closing one lets it in.
    let s1 = c
        .connect(0, &alice[0], None, Some("token-alice"))
        .await
        .unwrap();
    let s2 = c
        .connect(1, &alice[1], None, Some("token-alice"))
        .await
        .unwrap();
    let third = c.connect(0, &alice[2], None, Some("token-alice")).await;
    let err = match third {
        Ok(_) => panic!("a third socket was admitted"),
        Err(e) => format!("{e:?}"),
    };
    assert!(err.contains("Too many open connections"), "{err}");
    // Bob's sockets are his own.
    let bob_sid = results
        .iter()
        .find(|r| r.0 == 200)
        .and_then(|r| r.1["conversation_id"].as_str())
        .unwrap()
        .to_owned();
    let bob_sock = c
        .connect(1, &bob_sid, None, Some("token-bob"))
        .await
        .unwrap();
    s2.close().await;
    let deadline = Instant::now() + T;
    let s3 = loop {
        match c.connect(0, &alice[2], None, Some("token-alice")).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "never admitted again: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // Actions: 4 tokens; the 5th and 6th are refused to that socket, not stored.
    let mut verdicts = Vec::new();
    for i in 0..6 {
        let acks = s1
            .emit_with_ack(
                "oh_user_action",
                &json!({"action": "message", "args": {"content": format!("a{i}")}}),
                T,
            )
            .await
            .unwrap();
        verdicts.push(acks.into_iter().next().unwrap_or(Value::Null));
    }
    let ok = verdicts.iter().filter(|a| a["success"] == true).count();
    let limited = verdicts
        .iter()
        .filter(|a| {
            a["error"] == true
                && a["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("OH_MESSAGE_RATE")
        })
        .count();
    assert_eq!((ok, limited), (4, 2), "{verdicts:?}");
    // Bob's actions have their own bucket.
    let acks = bob_sock
        .emit_with_ack(
            "oh_user_action",
            &json!({"action": "message", "args": {"content": "hi"}}),
            T,
        )
        .await
        .unwrap();
    assert_eq!(acks[0]["success"], true, "{acks:?}");
    drop(s3);
}

/// A large history replayed to many clients that never read stays within the per-socket byte
/// budget (`OH_SOCKET_BUFFER_MIB`, default 4 MiB): the replay reads the log in pages and
/// queues no more than the budget per socket, so the gateway's memory stays bounded, it keeps
/// answering `/healthz`, other clients are served, and each stalled client is disconnected as
/// a slow one once `OH_SLOW_CLIENT_TIMEOUT_MS` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_clients_that_never_read_is_bounded_in_bytes() {
    const CLIENTS: usize = 30;
    /// Growth of the gateway's resident memory allowed while the clients are stalled.
    const BOUND_MIB: u64 = 330;
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        gateway_env: vec![("OH_SLOW_CLIENT_TIMEOUT_MS", "15000".to_owned())],
        ..ClusterOpts::default()
    })
    .await;
    // A 30 MiB history: 30 messages of 512 KiB and their echoes (stored inline).
    let sid = c.create(0, None, None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    let big = "h".repeat(512 * 1024);
    for i in 0..30 {
        let text = format!("{i} {big}");
        a.emit(
            "oh_user_action",
            &json!({"action": "message", "args": {"content": text}}),
        )
        .await
        .unwrap();
        events_until(&mut a, T, |e| is_echo(e, &text)).await;
    }
    a.close().await;
    let gateway = &c.gateways[0];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = gateway.rss_kib().unwrap();

    let mut stalled = Vec::new();
    for _ in 0..CLIENTS {
        stalled.push(NeverReads::connect(c.gateway_port(0), &sid).await);
    }
    // While they sit on full buffers: memory, health, and another client's conversation.
    let other = c.create(0, Some("still here"), None).await;
    let mut b = c.connect(0, &other, None, None).await.unwrap();
    events_until(&mut b, T, |e| is_echo(e, "still here")).await;
    let mut peak = base;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        peak = peak.max(gateway.rss_kib().unwrap());
        let health = tests::http_client()
            .get(format!("{}/healthz", c.url(0)))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .unwrap();
        assert!(health.status().is_success());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let acks = b
        .emit_with_ack(
            "oh_user_action",
            &json!({"action": "message", "args": {"content": "and again"}}),
            T,
        )
        .await
        .unwrap();
    assert_eq!(acks[0]["success"], true, "{acks:?}");
    events_until(&mut b, T, |e| is_echo(e, "and again")).await;
    let growth_mib = peak.saturating_sub(base) / 1024;
    eprintln!(
        "gateway RSS: {} MiB before, peak {} MiB with {CLIENTS} stalled replays of a 30 MiB history (+{growth_mib} MiB)",
        base / 1024,
        peak / 1024
    );
    assert!(
        growth_mib < BOUND_MIB,
        "gateway grew by {growth_mib} MiB (bound {BOUND_MIB})"
    );
    // Clients that read get the whole history (far over the budget) on every transport: the
    // budget follows what they read, and never takes them for slow ones.
    let last = format!("29 {big}");
    let mut reader = c.connect(0, &sid, None, None).await.unwrap();
    let got = events_until(&mut reader, T, |e| is_echo(e, &last)).await;
    assert!(got.len() >= 60, "{} events", got.len());
    for transports in ["polling", "polling,websocket"] {
        let got = tests::js::run_js_converse_over(&c.url(0), &sid, transports, None, T, transports)
            .await
            .unwrap_or_else(|e| panic!("{transports}: {}", &e[e.len().saturating_sub(2000)..]));
        assert!(
            got.iter().any(|e| is_echo(e, &last)),
            "{transports}: no full replay"
        );
    }
    // Past OH_SLOW_CLIENT_TIMEOUT_MS every stalled client is disconnected as a slow one.
    let want = format!("oh_gateway_slow_client_disconnects_total {CLIENTS}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = tests::http_client()
            .get(format!("{}/metrics", c.url(0)))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains(&want) {
            break;
        }
        assert!(Instant::now() < deadline, "not all disconnected: {metrics}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // One reads on: a prefix of the replay, then the reason, then the end.
    let got = stalled.pop().unwrap().read_until_closed().await;
    let reason = got.last().unwrap();
    assert_eq!(reason["error"], true, "{reason}");
    assert!(
        reason["message"]
            .as_str()
            .unwrap()
            .contains("OH_SLOW_CLIENT_TIMEOUT_MS"),
        "{reason}"
    );
    assert!(got.len() > 1 && got.len() < 60, "{} events", got.len());
    drop(stalled);
}

/// A Socket.IO client over a raw websocket that connects with `latest_event_id=-1` and then
/// never reads (its TCP receive buffer is tiny).
struct NeverReads {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
}

impl NeverReads {
    async fn connect(port: u16, sid: &str) -> Self {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let stream = sock.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let url = format!(
            "ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket&conversation_id={sid}&latest_event_id=-1"
        );
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        let open = ws.next().await.unwrap().unwrap();
        assert!(open.to_text().unwrap().starts_with('0'), "{open:?}");
        ws.send(Message::text("40")).await.unwrap();
        loop {
            let m = ws.next().await.unwrap().unwrap();
            if m.to_text().unwrap_or("").starts_with("40") {
                return NeverReads { ws };
            }
        }
    }

    /// Reads on until the server closes the connection; returns the `oh_event`s.
    async fn read_until_closed(mut self) -> Vec<Value> {
        use futures::StreamExt;
        let mut got = Vec::new();
        loop {
            let m = match tokio::time::timeout(T, self.ws.next()).await {
                Err(_) => panic!("never closed"),
                Ok(None | Some(Err(_))) => return got,
                Ok(Some(Ok(m))) => m,
            };
            let text = m.to_text().unwrap_or("");
            if let Some(body) = text.strip_prefix("42") {
                let v: Value = serde_json::from_str(body).unwrap();
                got.push(v[1].clone());
            } else if m.is_close() || text == "41" {
                return got;
            }
        }
    }
}
