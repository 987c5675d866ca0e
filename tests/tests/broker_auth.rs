//! NATS and Redis that require credentials: the processes take them in their URLs
//! (`nats://user:password@…`, which async-nats itself ignores, so the binaries pass them as
//! options), everything works, a client without them is refused by both servers, and the
//! password appears in no log. (Per-role users with subject permissions and Redis ACLs are the
//! next step; see `docs/credentials/research.md`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tests::cluster::{Cluster, ClusterOpts, events_until, is_echo};

const T: Duration = Duration::from_secs(30);
const PASSWORD: &str = "broker-pw-93f1c2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_urls_work_and_clients_without_them_are_refused() {
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        broker_password: Some(PASSWORD.to_owned()),
        ..ClusterOpts::default()
    })
    .await;
    assert!(c.nats.url().contains(PASSWORD));
    // The whole path works with credentials.
    let sid = c.create(0, Some("hello"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut a, T, |e| is_echo(e, "hello")).await;

    // Without them: NATS refuses the connection, Redis every command.
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(format!("nats://127.0.0.1:{}", c.nats.port()))
        .await;
    let err = anonymous.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.to_lowercase().contains("authorization"),
        "anonymous NATS client: {err:?}"
    );
    let wrong = async_nats::ConnectOptions::with_user_and_password("oh".into(), "nope".into())
        .connection_timeout(Duration::from_secs(2))
        .connect(format!("nats://127.0.0.1:{}", c.nats.port()))
        .await;
    assert!(wrong.is_err(), "a wrong password was accepted");
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", c.redis.port())).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let res: redis::RedisResult<Vec<String>> =
        redis::cmd("KEYS").arg("*").query_async(&mut con).await;
    let err = res.expect_err("anonymous Redis command").to_string();
    assert!(err.contains("NOAUTH"), "{err}");

    assert!(!c.logs().contains(PASSWORD), "the password was logged");
}
