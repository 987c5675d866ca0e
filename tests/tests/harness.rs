//! Tests of the test helpers themselves: real nats-server and redis-server guards, child
//! processes, the Rust Socket.IO client (against an in-test socketioxide server and a scripted
//! raw websocket server) and the official JavaScript client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{future::Future, net::SocketAddr, os::unix::process::ExitStatusExt, time::Duration};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use socketioxide::{
    SocketIo,
    extract::{AckSender, Data, SocketRef, TryData},
    handler::ConnectHandler,
};
use tests::{
    js::{ensure_js_client, run_js_converse},
    nats::NatsServer,
    proc::{self, Proc},
    redis::RedisServer,
    sio::{ConnectOpts, SioClient, SioError},
};
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_tungstenite::tungstenite::Message;

/// Generous: the target is a loaded 2-core machine.
const T: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// In-test socketioxide server

struct TestServer {
    addr: SocketAddr,
    io: SocketIo,
    task: JoinHandle<()>,
}

impl TestServer {
    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the server has no connected socket.
    async fn wait_no_sockets(&self) {
        let deadline = Instant::now() + T;
        while !self.io.sockets().is_empty() {
            assert!(Instant::now() < deadline, "server still has sockets");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Refuses `?refuse=1` / `conversation_id=refuse`, auth `{"token":"bad"}` and
/// `Authorization: Bearer bad`.
async fn refuse_middleware(s: SocketRef, TryData(auth): TryData<Value>) -> Result<(), Refused> {
    let parts = s.req_parts();
    let query = parts.uri.query().unwrap_or_default();
    if query
        .split('&')
        .any(|kv| kv == "refuse=1" || kv == "conversation_id=refuse")
    {
        return Err(Refused("go away"));
    }
    if auth.is_ok_and(|a| a.get("token") == Some(&json!("bad"))) {
        return Err(Refused("bad token"));
    }
    let authorization = parts.headers.get("authorization");
    if authorization.is_some_and(|v| v.as_bytes() == b"Bearer bad") {
        return Err(Refused("bad bearer"));
    }
    Ok(())
}

async fn on_connect(s: SocketRef, TryData(auth): TryData<Value>) {
    let parts = s.req_parts();
    let authorization = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let query = parts.uri.query().map(str::to_owned);
    // Emitted right in the connect handler: the client must not lose it.
    s.emit(
        "welcome",
        &json!({"auth": auth.ok(), "authorization": authorization, "query": query}),
    )
    .ok();
    s.on("echo", async |s: SocketRef, Data(v): Data<Value>| {
        s.emit("echo", &v).ok();
    });
    s.on("echo_ack", async |Data(v): Data<Value>, ack: AckSender| {
        ack.send(&json!({"got": v})).ok();
    });
    s.on("len_ack", async |Data(v): Data<Value>, ack: AckSender| {
        ack.send(&v.as_str().map(str::len)).ok();
    });
    s.on("bye", async |s: SocketRef| {
        s.disconnect().ok();
    });
    // A toy agent: echoes user messages the way converse.mjs expects.
    s.on(
        "oh_user_action",
        async |s: SocketRef, Data(v): Data<Value>| {
            let text = v["args"]["content"].as_str().unwrap_or_default().to_owned();
            s.emit(
                "oh_event",
                &json!({"id": 0, "source": "user", "action": "message", "args": {"content": text}}),
            )
            .ok();
            s.emit(
                "oh_event",
                &json!({"id": 1, "source": "agent", "action": "message",
                    "args": {"content": format!("echo: {text}")}}),
            )
            .ok();
        },
    );
}

/// A socketioxide server on a random port; `ping` = (interval, timeout).
async fn sio_server(ping: Option<(Duration, Duration)>) -> TestServer {
    let mut builder = SocketIo::builder().max_payload(32 << 20);
    if let Some((interval, timeout)) = ping {
        builder = builder.ping_interval(interval).ping_timeout(timeout);
    }
    let (layer, io) = builder.build_layer();
    io.ns("/", on_connect.with(refuse_middleware));
    let app = axum::Router::new()
        .route("/health", axum::routing::get(async || "ok"))
        .layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    TestServer { addr, io, task }
}

async fn connect(server: &TestServer) -> SioClient {
    SioClient::connect(ConnectOpts::new(server.base_url()).timeout(T))
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Scripted raw websocket server (for what socketioxide never sends)

type RawWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Accepts one websocket connection and runs `script` on it.
async fn raw_server<F, Fut>(script: F) -> (SocketAddr, JoinHandle<()>)
where
    F: FnOnce(RawWs) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        script(ws).await;
    });
    (addr, task)
}

fn open_packet(ping_interval: u64, ping_timeout: u64) -> Message {
    Message::text(format!(
        r#"0{{"sid":"eng1","upgrades":[],"pingInterval":{ping_interval},"pingTimeout":{ping_timeout},"maxPayload":1000000}}"#
    ))
}

async fn expect_text(ws: &mut RawWs, want: &str) {
    loop {
        match tokio::time::timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), want);
                return;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// nats

#[tokio::test]
async fn nats_server_acks_jetstream_publish_and_keeps_it_across_restart() {
    use async_nats::jetstream::{self, stream};

    let mut nats = NatsServer::start().await;
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));
    let port = nats.port();
    let pid = nats.pid().expect("running");

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "HARNESS".to_owned(),
        subjects: vec!["harness.>".to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let ack = js
        .publish("harness.a", "hello".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.sequence, 1, "log:\n{}", nats.log());

    nats.restart().await;
    assert_eq!(nats.port(), port);
    assert_ne!(nats.pid(), Some(pid));

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let stored = js
        .get_stream("HARNESS")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap_or_else(|e| panic!("message lost across restart: {e}; log:\n{}", nats.log()));
    assert_eq!(stored.subject.as_str(), "harness.a");
    assert_eq!(stored.payload.as_ref(), b"hello");

    nats.kill().await;
    assert_eq!(nats.pid(), None);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
    assert!(nats.log().contains("Server is ready"));
}

// ---------------------------------------------------------------------------------------------
// redis

#[tokio::test]
async fn redis_server_set_get_and_restart_comes_back_empty() {
    use redis::AsyncCommands;

    let mut server = RedisServer::start().await;
    let port = server.port();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    let pid = server.pid().expect("running");

    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let () = con.set("harness:k", "v").await.unwrap();
    let got: Option<String> = con.get("harness:k").await.unwrap();
    assert_eq!(got.as_deref(), Some("v"));

    server.restart().await;
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), Some(pid));
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let got: Option<String> = con.get("harness:k").await.unwrap();
    assert_eq!(got, None, "restart must come back empty");

    server.kill().await;
    assert_eq!(server.pid(), None);
    assert!(!server.log().is_empty());
}

// ---------------------------------------------------------------------------------------------
// proc

async fn wait_log(p: &Proc, needle: &str) {
    let deadline = Instant::now() + T;
    while !p.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in log:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn proc_captures_output_and_obeys_signals() {
    let mut p = Proc::spawn(
        "sh",
        std::path::Path::new("/bin/sh"),
        &[
            "-c",
            "echo out-$OH_HARNESS; echo err-$OH_HARNESS >&2; exec sleep 600",
        ],
        &[("OH_HARNESS", "x1".to_owned())],
    );
    assert_eq!(p.name(), "sh");
    wait_log(&p, "out-x1").await;
    wait_log(&p, "err-x1").await;
    assert!(p.pid().is_some());

    p.signal(proc::SIGSTOP).unwrap();
    p.signal(proc::SIGCONT).unwrap();
    assert_eq!(p.wait_exit(Duration::from_millis(100)).await, None);
    p.signal(proc::SIGTERM).unwrap();
    let status = p.wait_exit(T).await.expect("exits on SIGTERM");
    assert_eq!(status.signal(), Some(proc::SIGTERM));
    assert_eq!(p.pid(), None);
    assert!(p.signal(proc::SIGTERM).is_err());

    let mut q = Proc::spawn("sleeper", std::path::Path::new("sleep"), &["600"], &[]);
    q.kill9().await;
    assert_eq!(q.pid(), None);
}

#[tokio::test]
async fn proc_wait_http_ok_polls_until_200() {
    let server = sio_server(None).await;
    let url = format!("{}/health", server.base_url());
    proc::wait_http_ok(&url, T).await.unwrap();

    let mut p = Proc::spawn("sleeper", std::path::Path::new("sleep"), &["600"], &[]);
    p.wait_http_ok(&url, T).await;

    let dead = format!("http://127.0.0.1:{}/health", proc::free_port());
    let err = proc::wait_http_ok(&dead, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.contains("did not answer 200"), "{err}");
}

#[test]
fn bin_path_explains_how_to_build_a_missing_binary() {
    let err = proc::try_bin_path("no-such-binary-oh").unwrap_err();
    assert!(err.contains("cargo build --bins"), "{err}");
    assert!(proc::target_dir().is_absolute());
    assert_ne!(proc::free_port(), 0);
}

// ---------------------------------------------------------------------------------------------
// sio against socketioxide

#[tokio::test]
async fn sio_connect_receives_event_emitted_in_connect_handler() {
    let server = sio_server(None).await;
    let opts = ConnectOpts::new(server.base_url())
        .query("conversation_id", "c 1")
        .query("latest_event_id", "-1")
        .header("Authorization", "Bearer good")
        .auth(json!({"token": "good"}))
        .timeout(T);
    let mut c = SioClient::connect(opts).await.unwrap();
    assert!(!c.sid().is_empty());
    assert!(c.is_connected());

    let (name, data) = c.next_event(T).await.unwrap();
    assert_eq!(name, "welcome");
    assert_eq!(data["auth"], json!({"token": "good"}));
    assert_eq!(data["authorization"], json!("Bearer good"));
    let query = data["query"].as_str().unwrap();
    assert!(
        query.contains("conversation_id=c%201") && query.contains("latest_event_id=-1"),
        "{query}"
    );
    assert!(query.starts_with("EIO=4&transport=websocket"), "{query}");

    let err = c.next_event(Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(err, SioError::Timeout(_)), "{err:?}");
    assert!(matches!(c.try_next(), Ok(None)));

    c.emit("echo", &json!({"n": 1})).await.unwrap();
    let ev = c.wait_event(T, |name, _| name == "echo").await.unwrap();
    assert_eq!(ev.1, json!({"n": 1}));

    c.close().await;
    server.wait_no_sockets().await;
}

#[tokio::test]
async fn sio_emit_with_ack_returns_server_ack_data() {
    let server = sio_server(None).await;
    let mut c = connect(&server).await;
    c.wait_event(T, |n, _| n == "welcome").await.unwrap();
    for i in 0..3 {
        let ack = c
            .emit_with_ack("echo_ack", &json!({"i": i}), T)
            .await
            .unwrap();
        assert_eq!(ack, vec![json!({"got": {"i": i}})]);
    }
    // An event the server never acks times out, distinctly.
    let err = c
        .emit_with_ack("echo", &json!(1), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, SioError::Timeout(_)), "{err:?}");
}

#[tokio::test]
async fn sio_refusing_middleware_yields_connect_refused() {
    let server = sio_server(None).await;
    let cases = [
        ConnectOpts::new(server.base_url()).query("refuse", "1"),
        ConnectOpts::new(server.base_url()).auth(json!({"token": "bad"})),
        ConnectOpts::new(server.base_url()).header("authorization", "Bearer bad"),
    ];
    let want = ["go away", "bad token", "bad bearer"];
    for (opts, want) in cases.into_iter().zip(want) {
        match SioClient::connect(opts.timeout(T)).await {
            Err(SioError::ConnectRefused { message, data }) => {
                assert_eq!(message, want);
                assert_eq!(data, None);
            }
            other => panic!("expected ConnectRefused({want}), got {other:?}"),
        }
    }
}

#[tokio::test]
async fn sio_five_mib_payload_round_trips() {
    let server = sio_server(None).await;
    let mut c = connect(&server).await;
    c.wait_event(T, |n, _| n == "welcome").await.unwrap();
    let big = "x".repeat(5 << 20);
    let ack = c.emit_with_ack("len_ack", &json!(big), T).await.unwrap();
    assert_eq!(ack, vec![json!(5 << 20)]);
    c.emit("echo", &json!(big)).await.unwrap();
    let (name, data) = c.next_event(T).await.unwrap();
    assert_eq!(name, "echo");
    assert_eq!(data.as_str().map(str::len), Some(5 << 20));
}

#[tokio::test]
async fn sio_answers_pings_and_stays_connected() {
    let ms = Duration::from_millis(300);
    let server = sio_server(Some((ms, ms))).await;
    let mut c = connect(&server).await;
    c.wait_event(T, |n, _| n == "welcome").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(c.is_connected(), "reason: {:?}", c.disconnect_reason());
    assert_eq!(server.io.sockets().len(), 1);
    let ack = c
        .emit_with_ack("echo_ack", &json!("alive"), T)
        .await
        .unwrap();
    assert_eq!(ack, vec![json!({"got": "alive"})]);
}

#[tokio::test]
async fn sio_server_disconnect_is_visible_from_next_event() {
    let server = sio_server(None).await;
    let mut c = connect(&server).await;
    c.wait_event(T, |n, _| n == "welcome").await.unwrap();
    c.emit("bye", &Value::Null).await.unwrap();
    let err = c.next_event(T).await.unwrap_err();
    assert!(matches!(err, SioError::Disconnected), "{err:?}");
    assert!(!c.is_connected() || c.disconnect_reason().is_some());
    let err = c.emit_with_ack("echo_ack", &json!(1), T).await.unwrap_err();
    assert!(matches!(err, SioError::Disconnected), "{err:?}");
    assert!(matches!(
        c.emit("echo", &json!(1)).await,
        Err(SioError::Disconnected)
    ));
    assert!(matches!(c.try_next(), Err(SioError::Disconnected)));
}

#[tokio::test]
async fn sio_connect_to_nothing_fails_fast() {
    let opts = ConnectOpts::new(format!("http://127.0.0.1:{}", proc::free_port())).timeout(T);
    let err = SioClient::connect(opts).await.unwrap_err();
    assert!(matches!(err, SioError::Ws(_)), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// sio against a scripted server

#[tokio::test]
async fn sio_keeps_events_sent_before_connect_and_survives_malformed_frames() {
    let (addr, task) = raw_server(async |mut ws: RawWs| {
        ws.send(open_packet(25_000, 20_000)).await.unwrap();
        expect_text(&mut ws, "40").await;
        // python-socketio sends the replay before the CONNECT answer.
        ws.send(Message::text(r#"42["replay",{"id":0}]"#))
            .await
            .unwrap();
        ws.send(Message::text(r#"40{"sid":"s1"}"#)).await.unwrap();
        for bad in ["42garbage", "4", "9", r#"42/admin,["x"]"#] {
            ws.send(Message::text(bad)).await.unwrap();
        }
        ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
        ws.send(Message::text(r#"42["live",{"id":1}]"#))
            .await
            .unwrap();
        // The client must answer an engine ping.
        ws.send(Message::text("2")).await.unwrap();
        expect_text(&mut ws, "3").await;
        ws.send(Message::text("41")).await.unwrap();
        let _ = tokio::time::timeout(T, ws.next()).await;
    })
    .await;
    let mut c = SioClient::connect(ConnectOpts::new(format!("http://{addr}")).timeout(T))
        .await
        .unwrap();
    assert_eq!(c.sid(), "s1");
    assert_eq!(c.engine_sid(), "eng1");
    assert_eq!(
        c.next_event(T).await.unwrap(),
        ("replay".to_owned(), json!({"id": 0}))
    );
    for _ in 0..5 {
        let err = c.next_event(T).await.unwrap_err();
        assert!(matches!(err, SioError::Protocol(_)), "{err:?}");
    }
    assert_eq!(
        c.next_event(T).await.unwrap(),
        ("live".to_owned(), json!({"id": 1}))
    );
    let err = c.next_event(T).await.unwrap_err();
    assert!(matches!(err, SioError::Disconnected), "{err:?}");
    let reason = c.disconnect_reason().unwrap();
    assert!(reason.contains("disconnected by the server"), "{reason}");
    task.await.unwrap();
}

#[tokio::test]
async fn sio_connect_error_carries_message_and_data() {
    let (addr, _task) = raw_server(async |mut ws: RawWs| {
        ws.send(open_packet(25_000, 20_000)).await.unwrap();
        expect_text(&mut ws, r#"40{"token":"t"}"#).await;
        ws.send(Message::text(r#"42["replay",{"id":0}]"#)).await.unwrap();
        ws.send(Message::text(
            r#"44{"message":"Settings not found","data":{"msg_id":"CONFIGURATION$SETTINGS_NOT_FOUND"}}"#,
        ))
        .await
        .unwrap();
        let _ = tokio::time::timeout(T, ws.next()).await;
    })
    .await;
    let opts = ConnectOpts::new(format!("http://{addr}"))
        .auth(json!({"token": "t"}))
        .timeout(T);
    match SioClient::connect(opts).await {
        Err(SioError::ConnectRefused { message, data }) => {
            assert_eq!(message, "Settings not found");
            assert_eq!(
                data,
                Some(json!({"msg_id": "CONFIGURATION$SETTINGS_NOT_FOUND"}))
            );
        }
        other => panic!("expected ConnectRefused, got {other:?}"),
    }
}

#[tokio::test]
async fn sio_detects_a_server_that_stops_pinging() {
    let (addr, _task) = raw_server(async |mut ws: RawWs| {
        ws.send(open_packet(200, 200)).await.unwrap();
        expect_text(&mut ws, "40").await;
        ws.send(Message::text(r#"40{"sid":"s1"}"#)).await.unwrap();
        // Silence (no pings) but keep the socket open.
        let _ = tokio::time::timeout(T, ws.next()).await;
    })
    .await;
    let mut c = SioClient::connect(ConnectOpts::new(format!("http://{addr}")).timeout(T))
        .await
        .unwrap();
    let err = c.next_event(T).await.unwrap_err();
    assert!(matches!(err, SioError::Disconnected), "{err:?}");
    let reason = c.disconnect_reason().unwrap();
    assert!(reason.contains("no ping"), "{reason}");
}

#[tokio::test]
async fn sio_connect_times_out_on_a_silent_server() {
    let (addr, _task) = raw_server(async |mut ws: RawWs| {
        let _ = tokio::time::timeout(T, ws.next()).await;
    })
    .await;
    let opts = ConnectOpts::new(format!("http://{addr}")).timeout(Duration::from_millis(500));
    let err = SioClient::connect(opts).await.unwrap_err();
    assert!(matches!(err, SioError::Timeout(_)), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// js

#[tokio::test]
async fn js_client_installs_and_converses_with_a_socketio_server() {
    let dir = tokio::task::spawn_blocking(ensure_js_client).await.unwrap();
    assert!(
        dir.join("node_modules/socket.io-client/package.json")
            .is_file()
    );
    let out = std::process::Command::new("node")
        .args([
            "--input-type=module",
            "-e",
            "import { io } from 'socket.io-client'; if (typeof io !== 'function') process.exit(1);",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let server = sio_server(None).await;
    let events = run_js_converse(&server.base_url(), "conv-1", "hello there", Some("good"), T)
        .await
        .unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["source"], "user");
    assert_eq!(events[1]["args"]["content"], "echo: hello there");

    let err = run_js_converse(&server.base_url(), "refuse", "x", None, T)
        .await
        .unwrap_err();
    assert!(
        err.contains("connect_error") && err.contains("go away"),
        "{err}"
    );
    let err = run_js_converse(&server.base_url(), "conv-2", "x", Some("bad"), T)
        .await
        .unwrap_err();
    assert!(err.contains("bad bearer"), "{err}");
}
