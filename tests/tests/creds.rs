//! Control-plane credentials end to end: brokers with a user per role (rendered from
//! `deploy/auth/`, as every [`Cluster`] starts them), probed with real clients. Nobody gets in
//! without credentials; a gateway's credentials cannot append to an event log, delete or
//! change streams, or run administrative Redis commands; an action or start request published
//! with them in another user's name is not applied; a worker's cannot publish user actions or
//! metadata; the load tool's reach only its floor. The whole flow runs with role credentials
//! without a single permission violation, and no process logs a password.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream;
use serde_json::json;
use tests::auth::Role;
use tests::cluster::{Cluster, ClusterOpts, events_until, is_echo, is_state};

const T: Duration = Duration::from_secs(30);
const ALICE: &str = "token-alice-1";
const BOB: &str = "token-bob-22";

/// A JetStream context with a short timeout: a refused request gets no answer at all.
fn js(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client)
}

/// Whether a JetStream publish was refused (error, or no ack).
async fn js_publish_refused(js: &jetstream::Context, subject: String) -> bool {
    match js.publish(subject, bytes::Bytes::from_static(b"{}")).await {
        Err(_) => true,
        Ok(ack) => ack.await.is_err(),
    }
}

/// A Redis command's error code (`NOAUTH`, `NOPERM`, ...), `None` if it succeeded.
async fn redis_refusal(url: &str, cmd: &redis::Cmd) -> Option<String> {
    let client = redis::Client::open(url).unwrap();
    let mut con = match client.get_multiplexed_async_connection().await {
        Ok(con) => con,
        Err(e) => return Some(e.code().unwrap_or("connect").to_owned()),
    };
    match cmd.query_async::<redis::Value>(&mut con).await {
        Ok(_) => None,
        Err(e) => Some(e.code().unwrap_or("other").to_owned()),
    }
}

fn cmd(args: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

/// Asserts that `role` may run none of the administrative Redis commands.
async fn assert_no_redis_admin(c: &Cluster, role: Role) {
    let url = c.redis.url_as(role);
    for args in [
        &["FLUSHALL"][..],
        &["FLUSHDB"],
        &["KEYS", "*"],
        &["CONFIG", "GET", "*"],
        &["ACL", "LIST"],
        &["DEBUG", "SLEEP", "0"],
        &["SHUTDOWN", "NOSAVE"],
        &["SCRIPT", "FLUSH"],
    ] {
        let refused = redis_refusal(&url, &cmd(args)).await;
        // DEBUG is also off server-wide (`enable-debug-command no`), which answers first.
        let expected = if args[0] == "DEBUG" { "ERR" } else { "NOPERM" };
        assert_eq!(
            refused.as_deref(),
            Some(expected),
            "{role:?} may run {args:?}"
        );
    }
    // Keys outside the namespace are out of reach too.
    let refused = redis_refusal(&url, &cmd(&["GET", "other:lease:x"])).await;
    assert_eq!(refused.as_deref(), Some("NOPERM"), "{role:?} reads other:*");
}

/// Asserts that `role` cannot delete the event log nor create streams of other names; nor
/// purge it unless `may_purge` (gateways: DELETE of a conversation), nor change its
/// configuration unless `may_update` (workers: they bring the limits to the configured ones).
async fn assert_event_stream_protected(c: &Cluster, role: Role, may_purge: bool, may_update: bool) {
    let client = tests::nats::connect_url(&c.nats.url_as(role))
        .await
        .unwrap();
    let js = js(client);
    let events = format!("{}_events", c.namespace);
    assert!(
        js.delete_stream(&events).await.is_err(),
        "{role:?} deleted the event stream"
    );
    let admin = c.nats.connect().await;
    let admin = jetstream::new(admin);
    if !may_update {
        let mut config = admin
            .get_stream(&events)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .clone();
        config.max_age = Duration::from_secs(1);
        assert!(
            js.update_stream(config).await.is_err(),
            "{role:?} changed the event stream"
        );
    }
    if !may_purge {
        let purge = js.get_stream_no_info(&events).await.unwrap().purge().await;
        assert!(purge.is_err(), "{role:?} purged the event stream");
    }
    let info = admin
        .get_stream(&events)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        info.config.max_age,
        Duration::ZERO,
        "the stream was changed"
    );
    for other in ["loadtest_floor", "x_events"] {
        let created = js
            .create_stream(jetstream::stream::Config {
                name: other.to_owned(),
                subjects: vec![format!("{other}.>")],
                ..Default::default()
            })
            .await;
        assert!(created.is_err(), "{role:?} created stream {other}");
    }
}

/// (a) Without credentials (or with a wrong password) neither broker lets a client in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_refuse_clients_without_credentials() {
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await;
    let anonymous = tests::nats::connect_url(&c.nats.anonymous_url()).await;
    assert!(anonymous.is_err(), "NATS let an anonymous client in");
    let wrong = c.nats.url_as(Role::Gateway).replace(
        c.nats.credentials().unwrap().password(Role::Gateway),
        "not-the-password",
    );
    let err = tests::nats::connect_url(&wrong).await.unwrap_err();
    assert!(!err.contains("not-the-password"), "{err}");
    let anonymous = c.redis.anonymous_url();
    for args in [&["PING"][..], &["KEYS", "*"], &["FLUSHALL"]] {
        let refused = redis_refusal(&anonymous, &cmd(args)).await;
        assert_eq!(refused.as_deref(), Some("NOAUTH"), "{args:?} answered");
    }
    let wrong = c.redis.url_as(Role::Worker).replace(
        c.nats.credentials().unwrap().password(Role::Worker),
        "not-the-password",
    );
    assert!(redis_refusal(&wrong, &cmd(&["PING"])).await.is_some());
    // The deployment itself, with its role credentials, is up.
    let (code, _) = c.get(0, "/readyz", None).await;
    assert_eq!(code, 200);
}

/// (b) A gateway's credentials cannot append to an event log (JetStream or core publish),
/// delete or change the event stream, or run administrative Redis commands; it cannot take
/// a lease either. The log is unchanged and the server logged the violations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_credentials_cannot_write_the_event_log_or_administer_the_brokers() {
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, Some("hello"), None).await;
    let mut client = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut client, T, |e| is_echo(e, "hello")).await;
    // The turn's last event (after the echo) is stored too before counting.
    events_until(&mut client, T, |e| is_state(e, "awaiting_user_input")).await;
    let before = c.all_events(0, &sid, None).await.len();

    let gw = tests::nats::connect_url(&c.nats.url_as(Role::Gateway))
        .await
        .unwrap();
    let subject = format!("{}.ev.{sid}", c.namespace);
    assert!(
        js_publish_refused(&js(gw.clone()), subject.clone()).await,
        "a gateway appended to an event log"
    );
    gw.publish(subject.clone(), bytes::Bytes::from_static(b"{}"))
        .await
        .unwrap();
    gw.flush().await.unwrap();
    assert_event_stream_protected(&c, Role::Gateway, true, false).await;
    assert_no_redis_admin(&c, Role::Gateway).await;
    let lease = format!("{}:lease:{sid}", c.namespace);
    let refused = redis_refusal(
        &c.redis.url_as(Role::Gateway),
        &cmd(&["SET", &lease, "gw/1"]),
    )
    .await;
    assert_eq!(
        refused.as_deref(),
        Some("NOPERM"),
        "a gateway wrote a lease"
    );

    tests::check::settle(&mut client, "still_fine").await;
    let after = c.all_events(0, &sid, None).await;
    assert_eq!(
        after.len(),
        before + 4,
        "only the new message's events were added: {:#?}",
        &after[before.saturating_sub(3)..]
    );
    let log = c.nats.log();
    assert!(
        log.contains(&format!(
            "Publish Violation - User \"gateway\", Subject \"{subject}\""
        )),
        "{log}"
    );
}

/// (c) With a gateway's credentials, an action naming bob published onto alice's action
/// subject, and start requests naming bob for alice's conversation, are not applied to it
/// (the worker applies only actions naming the conversation's owner and finds no metadata of
/// bob's); alice's conversation goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_credentials_cannot_act_in_another_users_conversation() {
    use shared::msg_id::ActionMsgId;
    use shared::wire::{HDR_USER, StartReason, StartRequest};
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        auth_tokens: Some(format!("{ALICE}=alice,{BOB}=bob")),
        ..ClusterOpts::default()
    })
    .await;
    let alice = c.create(0, None, Some(ALICE)).await;
    let mut client = c.connect(0, &alice, None, Some(ALICE)).await.unwrap();
    tests::check::settle(&mut client, "before").await;

    let gw = tests::nats::connect_url(&c.nats.url_as(Role::Gateway))
        .await
        .unwrap();
    let names = shared::names::Names::new(&c.namespace).unwrap();
    let store = shared::store::Store::open(gw, names).await.unwrap();
    let sid = shared::id::SessionId::parse(&alice).unwrap();
    let bob = shared::id::UserId::parse("bob").unwrap();
    let mut as_bob = async_nats::HeaderMap::new();
    as_bob.insert(HDR_USER, "bob");
    let action = json!({"action": "message", "args": {"content": "injected as bob"}});
    store
        .publish_action(
            &sid,
            bytes::Bytes::from(action.to_string()),
            as_bob,
            &ActionMsgId::fresh(),
        )
        .await
        .unwrap();
    for reason in [StartReason::Start, StartReason::Resume] {
        // Queued or refused as a duplicate: either way no worker may run it as bob's.
        store
            .enqueue_start(&StartRequest::new(&sid, &bob, reason))
            .await
            .unwrap();
    }
    tests::check::settle(&mut client, "after").await;
    let stored = c.all_events(0, &alice, Some(ALICE)).await;
    let text = serde_json::to_string(&stored).unwrap();
    assert!(
        !text.contains("injected"),
        "an injected action left a trace"
    );
    assert_eq!(tests::check::count_echoes(&stored, "after"), 1);
    let (code, list) = c.get(0, "/api/conversations", Some(BOB)).await;
    assert_eq!(code, 200);
    assert_eq!(list["results"], json!([]), "bob got a conversation: {list}");
    let info = c.info(0, &alice, Some(ALICE)).await;
    assert_eq!(info["session_status"], "running", "{info}");
}

/// (d) The whole flow with role credentials: create, messages, a payload stored out of line,
/// a long replay (ordered consumer), reconnect on another gateway, stop, start, delete. No
/// permission is missing (no violation in the NATS log, nothing in Redis' ACL log) and no
/// process logs a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_flow_runs_with_role_credentials_and_no_password_is_logged() {
    let c = Cluster::start(ClusterOpts {
        gateways: 2,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, Some("hello"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut a, T, |e| is_echo(e, "hello")).await;
    for i in 0..16 {
        tests::check::settle(&mut a, &format!("message_{i}")).await;
    }
    // Over the inline limit (about 1 MB): through the object store both ways.
    let big = "x".repeat(1_100_000);
    tests::check::say_reliably(&a, &big, "big").await;
    events_until(&mut a, T, |e| is_echo(e, &big)).await;
    a.close().await;
    // More than 64 events: reads of the whole log go through an ordered consumer.
    let all = c.all_events(1, &sid, None).await;
    assert!(all.len() > 64, "{}", all.len());
    let mut b = c.connect(1, &sid, Some(-1), None).await.unwrap();
    events_until(&mut b, T, |e| is_echo(e, &big)).await;
    tests::check::settle(&mut b, "after_the_replay").await;

    let (code, _) = c
        .post(
            1,
            &format!("/api/conversations/{sid}/stop"),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(code, 200);
    events_until(&mut b, T, |e| is_state(e, "stopped")).await;
    let (code, _) = c
        .post(
            0,
            &format!("/api/conversations/{sid}/start"),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(code, 200);
    tests::check::settle(&mut b, "after_the_restart").await;
    b.close().await;
    let (code, deleted) = c
        .delete(0, &format!("/api/conversations/{sid}"), None)
        .await;
    assert_eq!((code, deleted), (200, json!(true)));
    let (code, _) = c.get(0, &format!("/api/conversations/{sid}"), None).await;
    assert_eq!(code, 404);

    let log = c.nats.log();
    assert!(
        !log.contains("Violation"),
        "a role lacks a permission:\n{log}"
    );
    let acl_log: redis::Value = {
        let client = redis::Client::open(c.redis.url()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        cmd(&["ACL", "LOG"]).query_async(&mut con).await.unwrap()
    };
    assert_eq!(
        acl_log,
        redis::Value::Array(vec![]),
        "Redis refused a command of a role"
    );
    let creds = c.nats.credentials().unwrap();
    let logs = c.logs();
    for role in tests::auth::Role::ALL {
        assert!(
            !logs.contains(creds.password(role)),
            "a process logged the {role:?} password"
        );
    }
}

/// (e) A worker's credentials cannot do what only a gateway does (publish a user action,
/// write metadata, list itself on a session), nor delete or purge the event stream, nor run
/// administrative Redis commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_credentials_cannot_act_as_a_gateway_or_administer_the_brokers() {
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..ClusterOpts::default()
    })
    .await;
    let sid = c.create(0, Some("hello"), None).await;
    let mut client = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut client, T, |e| is_echo(e, "hello")).await;
    let worker = tests::nats::connect_url(&c.nats.url_as(Role::Worker))
        .await
        .unwrap();
    let js = js(worker);
    let ns = &c.namespace;
    for subject in [format!("{ns}.act.{sid}"), format!("{ns}.meta.local.{sid}")] {
        assert!(
            js_publish_refused(&js, subject.clone()).await,
            "a worker published to {subject}"
        );
    }
    assert_event_stream_protected(&c, Role::Worker, false, true).await;
    assert_no_redis_admin(&c, Role::Worker).await;
    let presence = format!("{ns}:presence:{sid}");
    let refused = redis_refusal(
        &c.redis.url_as(Role::Worker),
        &cmd(&["ZADD", &presence, "1", "fake-gateway"]),
    )
    .await;
    assert_eq!(refused.as_deref(), Some("NOPERM"));
    tests::check::settle(&mut client, "still_fine").await;
}

/// The load tool's credentials measure the broker floor and reach nothing of a deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_credentials_reach_only_the_floor() {
    let creds = tests::auth::Credentials::generate("lt1");
    let nats = tests::nats::NatsServer::start_with_auth(&creds).await;
    let stats = std::sync::Arc::new(tests::load::stats::Stats::default());
    tests::load::floor::measure(&nats.url_as(Role::Loadtest), 20, &stats)
        .await
        .unwrap();
    let lt = tests::nats::connect_url(&nats.url_as(Role::Loadtest))
        .await
        .unwrap();
    let js = js(lt);
    for subject in ["lt1.act.abc", "lt1.ev.abc", "lt1.work.abc"] {
        assert!(js_publish_refused(&js, subject.to_owned()).await);
    }
    let log = nats.log();
    // Every violation is one of the probes above: the floor itself needed nothing more.
    let violations: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    assert!(
        violations.iter().all(|l| l.contains("Subject \"lt1.")),
        "{violations:#?}"
    );
}
