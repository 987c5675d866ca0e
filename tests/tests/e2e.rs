//! End-to-end: the real `gateway` and `worker` binaries, the test's own nats-server and
//! redis-server, real Socket.IO clients (our Rust client and the JavaScript socket.io-client).
//! Issue 2's "must show" list, one test each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use shared::event::{Event, replay_order};
use tests::check::check_client;
use tests::cluster::{Cluster, ClusterOpts, events_until, ids, is_echo, is_state};
use tests::sio::SioError;

const T: Duration = Duration::from_secs(30);

async fn say(c: &tests::sio::SioClient, text: &str) -> Value {
    let acks = c
        .emit_with_ack(
            "oh_user_action",
            &json!({"action": "message", "args": {"content": text}}),
            T,
        )
        .await
        .expect("ack");
    acks.into_iter().next().unwrap_or(Value::Null)
}

fn strictly_increasing(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

/// Invariant 1 across gateways: two clients on two gateways see the same live events,
/// each exactly once and in order, and both get the echo of a message sent by either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inv1_two_gateways_two_workers_share_one_conversation() {
    let c = Cluster::start(ClusterOpts::default()).await;
    let sid = c.create(0, Some("hello"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.expect("connect a");
    let mut b = c.connect(1, &sid, None, None).await.expect("connect b");
    let mut got_a = events_until(&mut a, T, |e| is_echo(e, "hello")).await;
    let mut got_b = events_until(&mut b, T, |e| is_echo(e, "hello")).await;
    let echo_id = got_a.last().unwrap()["id"].as_u64().unwrap();
    assert_eq!(got_b.last().unwrap()["id"].as_u64().unwrap(), echo_id);

    let ack = say(&a, "from a").await;
    assert_eq!(ack["success"], true, "ack: {ack}");
    got_a.extend(events_until(&mut a, T, |e| is_echo(e, "from a")).await);
    got_b.extend(events_until(&mut b, T, |e| is_echo(e, "from a")).await);
    let ack = say(&b, "from b").await;
    assert_eq!(ack["success"], true, "ack: {ack}");
    got_a.extend(events_until(&mut a, T, |e| is_echo(e, "from b")).await);
    got_b.extend(events_until(&mut b, T, |e| is_echo(e, "from b")).await);

    let stored = c.all_events(0, &sid, None).await;
    for got in [&got_a, &got_b] {
        // Exactly the replay of what existed at connect (OpenHands' rule holds the last
        // agent_state_changed back to the end of the replay), then live events in order.
        check_client(&stored, -1, got);
        // Each client saw both user messages (echoed back with source user) exactly once.
        for text in ["from a", "from b"] {
            let n = got
                .iter()
                .filter(|e| {
                    e["source"] == "user"
                        && e["action"] == "message"
                        && e["args"]["content"] == text
                })
                .count();
            assert_eq!(n, 1, "user message {text:?} seen {n} times");
        }
    }
    // After the first echo both were live: they must have seen exactly the same events.
    let live =
        |got: &[Value]| -> Vec<u64> { ids(got).into_iter().filter(|i| *i > echo_id).collect() };
    assert_eq!(live(&got_a), live(&got_b));
    // And those are exactly the stored events after the echo that the live rule forwards.
    let expected: Vec<u64> = stored
        .iter()
        .filter_map(|v| Event::from_value(v.clone()).ok())
        .filter(|e| e.id.is_some_and(|i| i > echo_id) && e.live_copy().is_some())
        .filter_map(|e| e.id)
        .filter(|i| *i <= *live(&got_a).last().unwrap())
        .collect();
    assert_eq!(live(&got_a), expected);
    // Stored ids are 0..n with no gap.
    let all = ids(&stored);
    assert_eq!(all, (0..all.len() as u64).collect::<Vec<_>>());
}

/// Reconnect on the other gateway with `latest_event_id = k`: exactly the events after k (by
/// the replay rule), in order, then live ones with no gap and no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inv1_reconnect_with_latest_event_id_on_other_gateway() {
    let c = Cluster::start(ClusterOpts::default()).await;
    let sid = c.create(0, Some("one"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.expect("connect");
    events_until(&mut a, T, |e| is_echo(e, "one")).await;
    for t in ["two", "three"] {
        say(&a, t).await;
        events_until(&mut a, T, |e| is_echo(e, t)).await;
    }
    events_until(&mut a, T, |e| is_state(e, "awaiting_user_input")).await;
    a.close().await;

    let stored: Vec<Event> = c
        .all_events(0, &sid, None)
        .await
        .into_iter()
        .map(|v| Event::from_value(v).expect("stored event parses"))
        .collect();
    let k = stored
        .iter()
        .find(|e| {
            e.action_type() == Some("message") && e.to_value()["args"]["content"] == "echo: two"
        })
        .and_then(|e| e.id)
        .expect("echo two stored");
    let after: Vec<Event> = stored
        .iter()
        .filter(|e| e.id.unwrap() > k)
        .cloned()
        .collect();
    let expected: Vec<u64> = replay_order(&after).iter().map(|e| e.id.unwrap()).collect();
    assert!(
        expected.len() >= 3,
        "test needs a real replay: {expected:?}"
    );

    let mut b = c
        .connect(1, &sid, Some(k as i64), None)
        .await
        .expect("reconnect");
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let (name, ev) = b.next_event(T).await.expect("replayed event");
        if name == "oh_event" {
            got.push(ev);
        }
    }
    assert_eq!(ids(&got), expected, "replay after {k}");
    // Nothing more is replayed.
    assert!(matches!(
        b.next_event(Duration::from_millis(500)).await,
        Err(SioError::Timeout(_))
    ));

    // Then live events continue after the head, in order.
    let head = stored.last().unwrap().id.unwrap();
    say(&b, "four").await;
    let live = events_until(&mut b, T, |e| is_state(e, "awaiting_user_input")).await;
    let live_ids = ids(&live);
    assert!(
        live_ids[0] > head && strictly_increasing(&live_ids),
        "live ids {live_ids:?} after head {head}"
    );
    assert!(live.iter().any(|e| is_echo(e, "four")));

    // A cursor at the head replays nothing; beyond the head is refused with a clear message.
    let mut at_head = c
        .connect(0, &sid, Some(*live_ids.last().unwrap() as i64), None)
        .await
        .expect("at head");
    assert!(matches!(
        at_head.next_event(Duration::from_millis(500)).await,
        Err(SioError::Timeout(_))
    ));
    match c.connect(0, &sid, Some(1_000_000), None).await {
        Err(SioError::ConnectRefused { message, .. }) => {
            assert!(message.contains("beyond"), "{message}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("cursor beyond the head was accepted"),
    }
}

async fn statuses(c: &Cluster, sids: &[String]) -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    for s in sids {
        let v = c.info(0, s, None).await;
        out.push((
            s.clone(),
            v["session_status"].as_str().unwrap_or("").to_owned(),
            v["worker_id"].as_str().map(str::to_owned),
        ));
    }
    out
}

fn count(st: &[(String, String, Option<String>)], state: &str) -> usize {
    st.iter().filter(|(_, s, _)| s == state).count()
}

/// Capacity is explicit: 50 conversations on 2 workers x 10 slots: 20 run, 30 wait queued,
/// none fails; stopping 5 running ones lets 5 queued ones start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_fifty_conversations_on_twenty_slots() {
    let c = Cluster::start(ClusterOpts {
        max_sessions: 10,
        ..ClusterOpts::default()
    })
    .await;
    let creates = (0..50).map(|i| c.create(i % 2, Some("hi"), None));
    let sids: Vec<String> = futures::future::join_all(creates).await;
    assert_eq!(sids.iter().collect::<BTreeSet<_>>().len(), 50);

    let deadline = tokio::time::Instant::now() + T;
    let mut st = statuses(&c, &sids).await;
    while count(&st, "running") < 20 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        st = statuses(&c, &sids).await;
    }
    assert_eq!(count(&st, "running"), 20, "{st:?}{}", c.logs());
    // It stays that way: no worker takes more than its slots.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = statuses(&c, &sids).await;
    assert_eq!(count(&st, "running"), 20, "{st:?}");
    assert_eq!(count(&st, "queued"), 30, "{st:?}");
    for w in ["w0", "w1"] {
        let n = st
            .iter()
            .filter(|(_, s, o)| s == "running" && o.as_deref() == Some(w))
            .count();
        assert_eq!(n, 10, "worker {w} runs {n}: {st:?}");
    }
    let queued_info = c
        .info(
            0,
            &st.iter().find(|(_, s, _)| s == "queued").unwrap().0,
            None,
        )
        .await;
    assert_eq!(queued_info["status"], "STARTING");
    assert_eq!(queued_info["worker_id"], Value::Null);

    let to_stop: Vec<String> = st
        .iter()
        .filter(|(_, s, _)| s == "running")
        .take(5)
        .map(|(s, _, _)| s.clone())
        .collect();
    for s in &to_stop {
        let (code, v) = c
            .post(1, &format!("/api/conversations/{s}/stop"), &json!({}), None)
            .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["conversation_status"], "RUNNING");
    }
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let st = statuses(&c, &sids).await;
        let (r, q, s) = (
            count(&st, "running"),
            count(&st, "queued"),
            count(&st, "stopped"),
        );
        if r == 20 && q == 25 && s == 5 {
            for id in &to_stop {
                assert!(st.iter().any(|(x, state, _)| x == id && state == "stopped"));
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "running {r} queued {q} stopped {s}: {st:?}{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A stopped conversation's log ends with agent_state_changed: stopped.
    let evs = c.all_events(0, &to_stop[0], None).await;
    assert!(is_state(evs.last().unwrap(), "stopped"), "{:?}", evs.last());
}

const ALICE: &str = "token-alice-1";
const BOB: &str = "token-bob-22";

/// One gateway and one worker, users alice and bob.
async fn two_user_cluster() -> Cluster {
    Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        auth_tokens: Some(format!("{ALICE}=alice,{BOB}=bob")),
        ..ClusterOpts::default()
    })
    .await
}

/// Invariants 6 and 7: bad input gets a clear error to that client only; the process keeps
/// serving; the session's events are unchanged; a user never sees another user's conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inv6_inv7_bad_input_and_foreign_conversations() {
    let c = two_user_cluster().await;
    let sid = c.create(0, Some("hi"), Some(ALICE)).await;
    c.wait_info(0, &sid, Some(ALICE), T, |v| {
        v["agent_state"] == "awaiting_user_input"
    })
    .await;

    let refused = |r: Result<tests::sio::SioClient, SioError>| match r {
        Err(SioError::ConnectRefused { message, .. }) => message,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    };
    // Socket refusals, each with a clear message.
    let m = refused(
        tests::sio::SioClient::connect(
            tests::sio::ConnectOpts::new(c.url(0))
                .header("Authorization", format!("Bearer {ALICE}")),
        )
        .await,
    );
    assert!(m.contains("conversation_id"), "{m}");
    let unknown = uuid::Uuid::new_v4().simple().to_string();
    assert_eq!(
        refused(c.connect(0, &unknown, None, Some(ALICE)).await),
        "Conversation not found"
    );
    assert_eq!(
        refused(c.connect(0, &sid, None, Some(BOB)).await),
        "Conversation not found"
    );
    assert_eq!(
        refused(c.connect(0, &sid, None, None).await),
        "Invalid token"
    );
    assert!(
        refused(c.connect(0, "bad.id", None, Some(ALICE)).await)
            .contains("Invalid conversation_id")
    );
    assert!(refused(c.connect(0, &sid, Some(-7), Some(ALICE)).await).contains("latest_event_id"));
    // OpenHands' UI sends an unset cursor as `undefined`: the same replay as -1.
    let last = c
        .all_events(0, &sid, Some(ALICE))
        .await
        .last()
        .and_then(|l| l["id"].as_u64());
    let mut replays = Vec::new();
    for cursor in ["undefined", "-1"] {
        let mut sock = tests::sio::SioClient::connect(
            tests::sio::ConnectOpts::new(c.url(0))
                .query("conversation_id", &sid)
                .query("latest_event_id", cursor)
                .header("Authorization", format!("Bearer {ALICE}")),
        )
        .await
        .unwrap_or_else(|e| panic!("latest_event_id={cursor} refused: {e}"));
        let got = events_until(&mut sock, T, |e| e["id"].as_u64() == last).await;
        replays.push(tests::cluster::ids(&got));
    }
    assert!(!replays[0].is_empty());
    assert_eq!(replays[0], replays[1]);
    let auth_in_payload = tests::sio::SioClient::connect(
        tests::sio::ConnectOpts::new(c.url(0))
            .query("conversation_id", &sid)
            .auth(json!({"token": ALICE})),
    )
    .await;
    assert!(auth_in_payload.is_ok(), "auth payload token refused");

    // REST: another user's conversation does not exist for them.
    let (code, _) = c
        .get(0, &format!("/api/conversations/{sid}"), Some(BOB))
        .await;
    assert_eq!(code, 404);
    let (code, _) = c
        .get(0, &format!("/api/conversations/{sid}/events"), Some(BOB))
        .await;
    assert_eq!(code, 404);
    let (code, _) = c
        .post(
            0,
            &format!("/api/conversations/{sid}/stop"),
            &json!({}),
            Some(BOB),
        )
        .await;
    assert_eq!(code, 404);
    let (code, v) = c
        .delete(0, &format!("/api/conversations/{sid}"), Some(BOB))
        .await;
    assert_eq!((code, v), (200, json!(false)));
    let (code, _) = c.get(0, "/api/conversations", None).await;
    assert_eq!(code, 401);
    let (_, list) = c.get(0, "/api/conversations", Some(BOB)).await;
    assert_eq!(list["results"], json!([]));
    let (_, list) = c.get(0, "/api/conversations", Some(ALICE)).await;
    assert_eq!(list["results"][0]["conversation_id"], sid);

    let before = c.all_events(0, &sid, Some(ALICE)).await;
    let mut a = c
        .connect(0, &sid, Some(before.len() as i64 - 1), Some(ALICE))
        .await
        .expect("alice");
    let mut other = c
        .connect(0, &sid, Some(before.len() as i64 - 1), Some(ALICE))
        .await
        .expect("alice 2");
    let huge = "x".repeat(4 * 1024 * 1024 + 10);
    let cases: Vec<(Value, &str)> = vec![
        (json!("just a string"), "object"),
        (json!(42), "object"),
        (json!({"action": "frobnicate", "args": {}}), "frobnicate"),
        (
            json!({"observation": "run", "content": "", "extras": {}}),
            "action",
        ),
        (
            json!({"id": 3, "action": "message", "args": {"content": "x"}}),
            "id",
        ),
        (
            json!({"action": "message", "args": {"content": 5}}),
            "content",
        ),
        (
            json!({"action": "message", "args": {"content": huge}}),
            "4 MiB",
        ),
    ];
    for (payload, needle) in cases {
        let ack = a
            .emit_with_ack("oh_user_action", &payload, T)
            .await
            .expect("ack of a bad action");
        let ack = ack.into_iter().next().unwrap_or(Value::Null);
        assert_eq!(ack["error"], true, "{ack}");
        let msg = ack["message"].as_str().unwrap_or_default().to_owned();
        assert!(
            msg.contains(needle),
            "error {msg:?} should mention {needle:?}"
        );
        let (name, ev) = a.next_event(T).await.expect("error event");
        assert_eq!((name.as_str(), &ev["error"]), ("oh_event", &json!(true)));
        assert_eq!(ev["message"], ack["message"]);
    }
    // The legacy event name is validated the same way.
    a.emit("oh_action", &json!([1, 2])).await.unwrap();
    let (_, ev) = a.next_event(T).await.expect("error event");
    assert_eq!(ev["error"], true);
    // Errors went to the sender only.
    assert!(matches!(
        other.next_event(Duration::from_millis(300)).await,
        Err(SioError::Timeout(_))
    ));
    // Nothing was stored.
    assert_eq!(c.all_events(0, &sid, Some(ALICE)).await, before);

    // The connection and the process keep serving: a large (2 MiB, out-of-line) message works.
    let big = "y".repeat(2 * 1024 * 1024);
    let ack = say(&a, &big).await;
    assert_eq!(ack["success"], true);
    let got = events_until(&mut a, T, |e| is_echo(e, &big)).await;
    assert!(
        got.iter()
            .any(|e| e["source"] == "user" && e["args"]["content"] == big.as_str())
    );
    events_until(&mut other, T, |e| is_echo(e, &big)).await;
    let after = c.all_events(0, &sid, Some(ALICE)).await;
    assert_eq!(&after[..before.len()], &before[..]);
}

/// Wire compatibility: the JavaScript socket.io-client (what the OpenHands frontend uses)
/// completes create -> connect -> message -> echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compat_javascript_socketio_client_converses() {
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, None, None).await;
    let events = tests::js::run_js_converse(&c.url(0), &sid, "hi from js", None, T)
        .await
        .unwrap_or_else(|e| panic!("{e}{}", c.logs()));
    assert!(
        events.iter().any(|e| is_echo(e, "hi from js")),
        "{events:#?}"
    );
    // The replay of what existed at connect, then live events: no gap, no duplicate.
    let stored = c.all_events(0, &sid, None).await;
    check_client(&stored, -1, &events);
}

/// An action emitted the moment `connect` completes is handled (socketioxide runs connect
/// handlers in a task of their own; the event handlers must already be on the socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_emitted_right_after_connect_is_handled() {
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, None, None).await;
    for i in 0..40 {
        let a = c.connect(0, &sid, None, None).await.expect("connect");
        let acks = a
            .emit_with_ack(
                "oh_user_action",
                &json!({"action": "message", "args": {"content": format!("quick {i}")}}),
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|e| panic!("connection {i}: no ack for the first action: {e}"));
        assert_eq!(
            acks.first().map(|a| &a["success"]),
            Some(&json!(true)),
            "{acks:?}"
        );
        a.close().await;
    }
    let stored = c.all_events(0, &sid, None).await;
    for i in 0..40 {
        assert_eq!(tests::check::count_user(&stored, &format!("quick {i}")), 1);
    }
}

/// Bad configuration: one line naming the setting, exit code 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_2_naming_the_setting() {
    let cases: [(&str, &str, &str, &str); 9] = [
        ("gateway", "OH_AUTH_TOKENS", "no-equals-sign", "auth-tokens"),
        ("gateway", "OH_REQUEST_TIMEOUT_S", "0", "request-timeout-s"),
        (
            "gateway",
            "OH_GATEWAY_ADDR",
            "0.0.0.0:0",
            "allow-single-user-on-network",
        ),
        (
            "gateway",
            "OH_ALLOWED_ORIGINS",
            "evil.example",
            "allowed-origins",
        ),
        ("gateway", "OH_NAMESPACE", "Bad.NS", "namespace"),
        ("worker", "OH_MAX_SESSIONS", "0", "max-sessions"),
        ("worker", "OH_LEASE_TTL_MS", "abc", "lease-ttl-ms"),
        // A malformed broker URL is refused without showing it (it may hold a password).
        (
            "gateway",
            "OH_REDIS_URL",
            "gateway:secret-pw@127.0.0.1:6379",
            "redis-url",
        ),
        (
            "worker",
            "OH_NATS_URL_FILE",
            "/nonexistent/oh-url",
            "nats-url-file",
        ),
    ];
    for (bin, var, value, flag) in cases {
        let out = tokio::process::Command::new(tests::proc::bin_path(bin))
            .env(var, value)
            .output()
            .await
            .expect("run binary");
        assert_eq!(out.status.code(), Some(2), "{bin} {var}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{bin} {var}: {err}");
        assert!(err.contains(flag), "{bin} {var}: {err}");
        assert!(!err.contains("secret-pw"), "{bin} {var}: {err}");
    }
}

/// REST with OpenHands shapes: paged list, events (forward, reverse, limits), stop/start
/// (resume on a worker with events continuing at the next id), delete, health and metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_list_events_lifecycle_delete() {
    let mut c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await;
    let mut sids = Vec::new();
    for i in 0..3 {
        sids.push(c.create(0, Some(&format!("m{i}")), None).await);
    }
    let (code, page1) = c.get(0, "/api/conversations?limit=2", None).await;
    assert_eq!(code, 200, "{page1}");
    assert_eq!(page1["results"].as_array().unwrap().len(), 2);
    let next = page1["next_page_id"]
        .as_str()
        .expect("next page")
        .to_owned();
    let (_, page2) = c
        .get(
            0,
            &format!("/api/conversations?limit=2&page_id={next}"),
            None,
        )
        .await;
    assert_eq!(page2["results"].as_array().unwrap().len(), 1);
    assert_eq!(page2["next_page_id"], Value::Null);
    let mut listed: Vec<String> = page1["results"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["results"].as_array().unwrap())
        .map(|v| v["conversation_id"].as_str().unwrap().to_owned())
        .collect();
    // Newest first.
    assert_eq!(listed, sids.iter().rev().cloned().collect::<Vec<_>>());
    listed.sort();
    let info = c
        .wait_info(0, &sids[0], None, T, |v| {
            v["agent_state"] == "awaiting_user_input"
        })
        .await;
    for key in [
        "conversation_id",
        "title",
        "last_updated_at",
        "status",
        "runtime_status",
        "created_at",
        "url",
        "trigger",
    ] {
        assert!(info.get(key).is_some(), "missing {key}: {info}");
    }
    assert_eq!(
        (info["status"].as_str(), info["runtime_status"].as_str()),
        (Some("RUNNING"), Some("STATUS$READY"))
    );
    assert_eq!(info["conversation_version"], "V0");
    assert_eq!(info["worker_id"], "w0");

    let sid = &sids[0];
    let all = c.all_events(0, sid, None).await;
    let n = all.len() as u64;
    assert!(n >= 6, "{all:#?}");
    let (_, v) = c
        .get(
            0,
            &format!("/api/conversations/{sid}/events?start_id=1&limit=2"),
            None,
        )
        .await;
    assert_eq!(ids(v["events"].as_array().unwrap()), vec![1, 2]);
    assert_eq!(v["has_more"], true);
    let (_, v) = c
        .get(
            0,
            &format!("/api/conversations/{sid}/events?reverse=true&limit=3"),
            None,
        )
        .await;
    assert_eq!(
        ids(v["events"].as_array().unwrap()),
        vec![n - 1, n - 2, n - 3]
    );
    assert_eq!(v["has_more"], true);
    let (_, v) = c
        .get(
            0,
            &format!("/api/conversations/{sid}/events?start_id=2&end_id=3&limit=100"),
            None,
        )
        .await;
    assert_eq!(ids(v["events"].as_array().unwrap()), vec![2, 3]);
    assert_eq!(v["has_more"], false);
    for bad in ["limit=101", "limit=-1", "limit=x"] {
        let (code, v) = c
            .get(0, &format!("/api/conversations/{sid}/events?{bad}"), None)
            .await;
        assert_eq!(
            (code, v),
            (400, json!({"detail": "Invalid limit"})),
            "{bad}"
        );
    }
    let (code, _) = c.get(0, "/api/conversations/not.an.id", None).await;
    assert_eq!(code, 400);
    let (code, v) = c
        .post(0, "/api/conversations", &json!({"bogus": 1}), None)
        .await;
    assert_eq!(code, 422, "{v}");

    // Stop, then start again: resumed with events continuing at the next id.
    let (_, v) = c
        .post(
            0,
            &format!("/api/conversations/{sid}/stop"),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(v["message"], "Conversation stopped successfully");
    c.wait_info(0, sid, None, T, |v| {
        v["status"] == "STOPPED" && v["worker_id"].is_null()
    })
    .await;
    let (_, v) = c
        .post(
            0,
            &format!("/api/conversations/{sid}/stop"),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(v["message"], "Conversation was not running");
    let (_, v) = c
        .post(
            0,
            &format!("/api/conversations/{sid}/start"),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(v["conversation_status"], "STARTING");
    c.wait_info(0, sid, None, T, |v| {
        v["agent_state"] == "awaiting_user_input"
    })
    .await;
    let resumed = c.all_events(0, sid, None).await;
    assert_eq!(ids(&resumed), (0..resumed.len() as u64).collect::<Vec<_>>());
    assert!(is_state(&resumed[all.len()], "stopped"));
    assert!(
        is_state(&resumed[all.len() + 1], "loading"),
        "takeover record after resume"
    );
    assert!(
        !resumed[all.len()..].iter().any(|e| e["action"] == "system"),
        "system only on first start"
    );

    // Delete: gone for good.
    let (code, v) = c
        .delete(0, &format!("/api/conversations/{sid}"), None)
        .await;
    assert_eq!((code, v), (200, json!(true)));
    let (code, _) = c.get(0, &format!("/api/conversations/{sid}"), None).await;
    assert_eq!(code, 404);
    let (_, list) = c.get(0, "/api/conversations", None).await;
    assert_eq!(list["results"].as_array().unwrap().len(), 2);
    // A socket right after a create is let in without a metadata read (the gateway wrote it);
    // a delete in between takes that back at once.
    let young = c.create(0, None, None).await;
    let (code, _) = c
        .delete(0, &format!("/api/conversations/{young}"), None)
        .await;
    assert_eq!(code, 200);
    match c.connect(0, &young, None, None).await {
        Err(SioError::ConnectRefused { message, .. }) => {
            assert_eq!(message, "Conversation not found");
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a socket was let into a deleted conversation"),
    }

    let (code, v) = c.get(0, "/readyz", None).await;
    assert_eq!((code, v), (200, json!({"nats": true, "redis": true})));
    let metrics = tests::http_client()
        .get(format!("{}/metrics", c.url(0)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("oh_gateway_conversations_created_total 4"),
        "{metrics}"
    );
    // Not ready while Redis is down.
    c.redis.kill().await;
    let (code, v) = c.get(0, "/readyz", None).await;
    assert_eq!((code, v), (503, json!({"nats": true, "redis": false})));
}

/// The browser path is closed to other web pages: a foreign `Origin` is refused on REST and on
/// both Socket.IO transports, a foreign `Host` (DNS rebinding) is refused, a non-JSON body is
/// refused (no "simple request" can create a conversation), and none of them stores anything;
/// the gateway's own origin and plain clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_path_refuses_foreign_origins_hosts_and_simple_requests() {
    use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await;
    let http = reqwest::Client::new();
    let url = c.url(0);
    let create = |origin: Option<&str>, host: Option<&str>, ctype: &str| {
        let mut req = http
            .post(format!("{url}/api/conversations"))
            .header("content-type", ctype)
            .body(r#"{"initial_user_msg":"run: touch /tmp/pwned"}"#);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(h) = host {
            req = req.header("host", h);
        }
        req.send()
    };
    let json = "application/json";
    let foreign = create(Some("http://evil.example"), None, json)
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    let body: Value = foreign.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("OH_ALLOWED_ORIGINS"),
        "{body}"
    );
    let rebound = create(None, Some("evil.example:3000"), json).await.unwrap();
    assert_eq!(rebound.status(), 403);
    let simple = create(None, None, "text/plain").await.unwrap();
    assert_eq!(simple.status(), 415);
    let (_, list) = c.get(0, "/api/conversations", None).await;
    assert_eq!(list["results"], json!([]), "nothing was created: {list}");

    // The gateway's own origin is served, and so is a client with no Origin.
    let own = create(Some(&url), None, json).await.unwrap();
    assert_eq!(own.status(), 200, "{:?}", own.text().await);
    let sid = c.create(0, None, None).await;

    // Socket.IO: long-polling handshake and websocket upgrade from a foreign page.
    let polling = http
        .get(format!(
            "{url}/socket.io/?EIO=4&transport=polling&conversation_id={sid}&latest_event_id=-1"
        ))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(polling.status(), 403);
    let ws_url = format!(
        "ws://127.0.0.1:{}/socket.io/?EIO=4&transport=websocket&conversation_id={sid}&latest_event_id=-1",
        c.gateway_port(0)
    );
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("websocket from a foreign origin was not refused: {other:?}"),
    }
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("origin", url.parse().unwrap());
    let own_ws = tokio_tungstenite::connect_async(req).await;
    assert!(own_ws.is_ok(), "same-origin websocket refused: {own_ws:?}");
    // And a real client converses as before.
    let client = c.connect(0, &sid, None, None).await.unwrap();
    assert_eq!(say(&client, "still served").await["success"], true);
}

/// An action published straight to a conversation's action subject (what a process with
/// access to NATS could do) is applied only if it names the conversation's owner: one naming
/// another user, or no user, is dropped without a trace in the conversation, and the owner's
/// own messages go on being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_naming_another_user_are_not_applied() {
    use shared::msg_id::ActionMsgId;
    use shared::wire::HDR_USER;
    let c = two_user_cluster().await;
    let alice = c.create(0, None, Some(ALICE)).await;
    let mut client = c.connect(0, &alice, None, Some(ALICE)).await.unwrap();
    tests::check::settle(&mut client, "before").await;
    let store = c.store().await;
    let sid = shared::id::SessionId::parse(&alice).unwrap();
    let action = |text: &str| {
        bytes::Bytes::from(json!({"action": "message", "args": {"content": text}}).to_string())
    };
    let mut as_bob = async_nats::HeaderMap::new();
    as_bob.insert(HDR_USER, "bob");
    for (headers, text) in [
        (as_bob, "injected as bob"),
        (async_nats::HeaderMap::new(), "injected as nobody"),
    ] {
        store
            .publish_action(&sid, action(text), headers, &ActionMsgId::fresh())
            .await
            .unwrap();
    }
    // Actions are applied in order: once this one is answered, the two before it were handled.
    tests::check::settle(&mut client, "after").await;
    let stored = c.all_events(0, &alice, Some(ALICE)).await;
    let text = serde_json::to_string(&stored).unwrap();
    assert!(
        !text.contains("injected"),
        "an injected action left a trace: {text}"
    );
    assert_eq!(tests::check::count_echoes(&stored, "after"), 1);
}

/// Slowloris: connections that never finish their request headers are closed after
/// `OH_HEADER_READ_TIMEOUT_S`, and the gateway keeps answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        gateway_env: vec![("OH_HEADER_READ_TIMEOUT_S", "1".to_owned())],
        ..ClusterOpts::default()
    })
    .await;
    let addr = format!("127.0.0.1:{}", c.gateway_port(0));
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(b"GET /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .unwrap();
        slow.push(tcp);
    }
    let started = std::time::Instant::now();
    let (code, _) = c.get(0, "/healthz", None).await;
    assert_eq!(
        code, 200,
        "the gateway answers while half-sent requests wait"
    );
    for mut tcp in slow {
        let mut buf = [0u8; 256];
        // Closed (EOF or reset), possibly after a 408: never an answer to the request.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => assert!(
                        !buf[..n].starts_with(b"HTTP/1.1 2"),
                        "a half-sent request was answered"
                    ),
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a half-sent request was kept open");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the timeout"
    );
    // On a new connection: the harness's pooled one (from `/healthz` above) sat idle past the
    // same 1 s header timeout, so the gateway may just have closed it.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let res = fresh
        .get(format!("{}/api/conversations", c.url(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
}

/// How many direct gets (`$JS.API.DIRECT.GET.*`) the observer has seen after settling.
async fn direct_gets_after(seen: &mut async_nats::Subscriber, settle: Duration) -> usize {
    use futures::StreamExt;
    let mut n = 0;
    while let Ok(Some(m)) = tokio::time::timeout(settle, seen.next()).await {
        if m.subject.as_str().starts_with("$JS.API.DIRECT.GET.") {
            n += 1;
        }
    }
    n
}

/// The create's gateway joins the new conversation's feed before its start request: its first
/// socket replays what that feed received, reads nothing from the log, and gets exactly what a
/// socket replaying from the log gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_right_after_its_create_replays_from_the_feed_without_reading_the_log() {
    use futures::StreamExt;
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await;
    let observer = c.nats.connect().await;
    let mut gets = observer.subscribe("$JS.API.DIRECT.GET.>").await.unwrap();
    let mut events = observer
        .subscribe(format!("{}.ev.*", c.namespace))
        .await
        .unwrap();
    observer.flush().await.unwrap();
    // Warm-up (and the observer's own check): a second socket reads the log.
    let warm = c.create(0, Some("warm"), None).await;
    let mut first = c.connect(0, &warm, None, None).await.expect("connect");
    events_until(&mut first, T, |e| is_echo(e, "warm")).await;
    let mut second = c.connect(0, &warm, None, None).await.expect("connect");
    events_until(&mut second, T, |e| is_echo(e, "warm")).await;
    assert!(
        direct_gets_after(&mut gets, Duration::from_millis(500)).await > 0,
        "a socket replaying from the log reads it, and the observer sees it"
    );
    while tokio::time::timeout(Duration::from_millis(100), events.next())
        .await
        .is_ok()
    {}

    // A conversation with no initial message: its claim reads nothing either (metadata
    // carried, empty log presumed, no action stored before its request).
    let sid = c.create(0, None, None).await;
    let ready = format!("{}.ev.{sid}", c.namespace);
    tokio::time::timeout(T, async {
        while let Some(m) = events.next().await {
            if m.subject.as_str() == ready
                && String::from_utf8_lossy(&m.payload).contains("awaiting_user_input")
            {
                return;
            }
        }
    })
    .await
    .expect("the new session is ready");
    // Its events are in the log before the first socket comes: they are replayed. (The
    // gateway's own subscription may get them a moment after this observer: an event it has
    // not yet when the socket comes is sent live, as one appended after a head read would be.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut a = c.connect(0, &sid, None, None).await.expect("connect a");
    let got_a = events_until(&mut a, T, |e| is_state(e, "awaiting_user_input")).await;
    assert_eq!(
        direct_gets_after(&mut gets, Duration::from_millis(500)).await,
        0,
        "neither the claim nor the first socket read a stream"
    );
    let stored = c.all_events(0, &sid, None).await;
    assert!(stored.len() >= 3, "system, state changes: {stored:?}");
    check_client(&stored, -1, &got_a);
    // A second socket replays the same from the log.
    let mut b = c.connect(0, &sid, None, None).await.expect("connect b");
    let got_b = events_until(&mut b, T, |e| is_state(e, "awaiting_user_input")).await;
    assert_eq!(got_a, got_b, "the feed's replay is the log's");
    // And the first socket goes on live.
    let ack = say(&a, "after").await;
    assert_eq!(ack["success"], true, "ack: {ack}");
    let live = events_until(&mut a, T, |e| is_echo(e, "after")).await;
    let mut all = got_a.clone();
    all.extend(live);
    check_client(&c.all_events(0, &sid, None).await, -1, &all);
    let metrics = tests::http_client()
        .get(format!("{}/metrics", c.url(0)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"oh_gateway_replays_from_birth_total{source="feed"} 2"#),
        "{metrics}"
    );
}

/// A conversation created with no message, whose client sends one before any worker has
/// claimed it: the claim does not look for stored actions (its create said none), and the
/// worker's recheck finds the message anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_before_the_first_claim_is_answered() {
    let mut c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 0,
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, None, None).await;
    let a = c.connect(0, &sid, None, None).await.expect("connect");
    let ack = say(&a, "early").await;
    assert_eq!(ack["success"], true, "stored with no worker up: {ack}");
    c.add_worker().await;
    let mut a = a;
    let got = events_until(&mut a, T, |e| is_echo(e, "early")).await;
    check_client(&c.all_events(0, &sid, None).await, -1, &got);
}
