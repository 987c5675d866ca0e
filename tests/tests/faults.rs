//! Fault tests (issue 4): real processes killed, paused, restarted; the invariants (numbered
//! as in ARCHITECTURE.md, "Invariants → tests") checked on what clients received and on the
//! raw log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::event::Event;
use shared::id::SessionId;
use tests::check::{check_client, check_log, count_echoes, count_user, say_reliably, settle};
use tests::cluster::{Cluster, ClusterOpts, events_until, ids, is_echo, is_state};
use tests::proc::{SIGCONT, SIGSTOP, SIGTERM};
use tests::sio::{SioClient, SioError};

const T: Duration = Duration::from_secs(30);
const TTL_MS: u64 = 1500;

fn opts() -> ClusterOpts {
    ClusterOpts {
        lease_ttl_ms: TTL_MS,
        ..ClusterOpts::default()
    }
}

async fn owner(c: &Cluster, sid: &str) -> Option<String> {
    c.info(0, sid, None).await["worker_id"]
        .as_str()
        .map(str::to_owned)
}

/// Invariant 4 (failover): kill -9 of the owner mid-conversation: the session runs on the
/// other worker within lease_ttl + 2 s; messages sent during the outage are answered exactly
/// once; the client sees no gap and no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inv4_kill9_owner_fails_over_within_ttl_plus_2s() {
    let mut c = Cluster::start(opts()).await;
    let sid = c.create(0, Some("m0"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    let mut got = events_until(&mut a, T, |e| is_echo(e, "m0")).await;
    got.extend(events_until(&mut a, T, |e| is_state(e, "awaiting_user_input")).await);
    let old = owner(&c, &sid).await.expect("owned");
    let old_i = Cluster::worker_index(&old);
    c.workers[old_i].kill9().await;
    let killed_at = Instant::now();
    // Messages during the outage: stored by JetStream, answered after failover.
    say_reliably(&a, "during 1", "d1").await;
    say_reliably(&a, "during 2", "d2").await;
    let new = loop {
        if let Some(w) = owner(&c, &sid).await.filter(|w| *w != old) {
            break w;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "no failover{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let took = killed_at.elapsed();
    assert!(
        took <= Duration::from_millis(TTL_MS) + Duration::from_secs(2),
        "failover took {took:?} (ttl {TTL_MS} ms)"
    );
    got.extend(events_until(&mut a, T, |e| is_echo(e, "during 2")).await);
    say_reliably(&a, "after", "a1").await;
    got.extend(events_until(&mut a, T, |e| is_echo(e, "after")).await);
    let stored = c.all_events(0, &sid, None).await;
    for t in ["m0", "during 1", "during 2", "after"] {
        assert_eq!(count_user(&stored, t), 1, "user message {t:?}");
        assert_eq!(count_echoes(&stored, t), 1, "echo of {t:?}");
    }
    check_client(&stored, -1, &got);
    check_log(&c, &sid).await;
    assert_ne!(new, old);
    eprintln!("failover took {took:?}");
}

/// The sum of a counter over the workers' `/metrics` pages that answer.
async fn counter_sum(addrs: &[String], name: &str) -> f64 {
    let http = tests::http_client();
    let mut sum = 0.0;
    for a in addrs {
        let Ok(r) = http.get(format!("http://{a}/metrics")).send().await else {
            continue; // a killed worker
        };
        let page = r.text().await.unwrap_or_default();
        sum += page
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    sum
}

/// The sweeper passes over every should-run session only when an orphan may exist: not on
/// every tick of an idle deployment; at once when a worker asks for it (the sweep-due marker);
/// on every tick after a worker's heartbeat is gone, so a killed owner's session still fails
/// over within `ttl + 2 s`; and the dead worker is forgotten afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_looks_only_when_an_orphan_may_exist() {
    let mut c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 0,
        ..opts()
    })
    .await;
    let addrs: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", tests::proc::free_port()))
        .collect();
    for a in &addrs {
        c.add_worker_with(vec![("OH_WORKER_METRICS_ADDR", a.clone())])
            .await;
    }
    let names = shared::names::Names::new(&c.namespace).unwrap();
    let mut redis = redis::Client::open(c.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut sids = Vec::new();
    for i in 0..4 {
        let sid = c.create(0, Some(&format!("m{i}")), None).await;
        c.wait_info(0, &sid, None, T, |v| {
            v["agent_state"] == "awaiting_user_input"
        })
        .await;
        sids.push(sid);
    }
    // Both workers heartbeat.
    let deadline = Instant::now() + T;
    loop {
        let workers: Vec<String> = redis::cmd("SMEMBERS")
            .arg(names.workers_key())
            .query_async(&mut redis)
            .await
            .unwrap();
        if workers.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "workers listed: {workers:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Idle: the sweeper ticks every 0.5 s (ttl 1.5 s) but passes at most once in 4 s (its
    // first pass, or the periodic one every 10 s).
    let idle0 = counter_sum(&addrs, "oh_worker_sweeps_total").await;
    assert!(idle0 >= 1.0, "the sweeper's first pass");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let idle1 = counter_sum(&addrs, "oh_worker_sweeps_total").await;
    assert!(idle1 - idle0 <= 1.0, "{idle0} -> {idle1} passes while idle");

    // Asked: a pass within a few ticks, and the marker is taken.
    let _: () = redis::cmd("SET")
        .arg(names.sweep_due_key())
        .arg(1)
        .query_async(&mut redis)
        .await
        .unwrap();
    let asked_at = Instant::now();
    while counter_sum(&addrs, "oh_worker_sweeps_total").await <= idle1 {
        assert!(
            asked_at.elapsed() < Duration::from_secs(3),
            "no pass when asked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Option<String> = redis::cmd("GET")
        .arg(names.sweep_due_key())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(left, None);

    // A worker killed: its sessions fail over within ttl + 2 s, the survivor passes on
    // several ticks, and forgets the dead worker once its leases are all gone.
    let sid = &sids[0];
    let old = owner(&c, sid).await.expect("owned");
    let old_i = Cluster::worker_index(&old);
    let survivor = addrs[1 - old_i].clone();
    let before = counter_sum(std::slice::from_ref(&survivor), "oh_worker_sweeps_total").await;
    c.workers[old_i].kill9().await;
    let killed_at = Instant::now();
    let moved = loop {
        if let Some(w) = owner(&c, sid).await.filter(|w| *w != old) {
            break w;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "no failover{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let took = killed_at.elapsed();
    assert!(
        took <= Duration::from_millis(TTL_MS) + Duration::from_secs(2),
        "failover took {took:?} (ttl {TTL_MS} ms)"
    );
    assert_ne!(moved, old);
    for sid in &sids {
        c.wait_info(0, sid, None, T, |v| {
            v["worker_id"].as_str().is_some_and(|w| w != old)
                && v["agent_state"] == "awaiting_user_input"
        })
        .await;
    }
    let deadline = Instant::now() + T;
    loop {
        let workers: Vec<String> = redis::cmd("SMEMBERS")
            .arg(names.workers_key())
            .query_async(&mut redis)
            .await
            .unwrap();
        if !workers.contains(&old) {
            assert_eq!(workers, vec![moved.clone()]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead worker still listed: {workers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = counter_sum(std::slice::from_ref(&survivor), "oh_worker_sweeps_total").await;
    // Two lease lifetimes (3 s) of ticks every 0.5 s after the heartbeat expired.
    assert!(
        after - before >= 4.0,
        "{before} -> {after} passes after the kill"
    );
}

/// Invariant 2 (zombie): SIGSTOP the owner past its lease; another worker takes over and
/// appends; SIGCONT: the old owner appends nothing more (fenced) and drops the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inv2_paused_owner_is_fenced_after_takeover() {
    let c = Cluster::start(ClusterOpts {
        worker_env: vec![("OH_ECHO_FAULTS", "true".to_owned())],
        ..opts()
    })
    .await;
    let sid = c.create(0, Some("m0"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut a, T, |e| is_echo(e, "m0")).await;
    events_until(&mut a, T, |e| is_state(e, "awaiting_user_input")).await;
    let old = owner(&c, &sid).await.unwrap();
    let zombie = &c.workers[Cluster::worker_index(&old)];
    // Frozen in the middle of a step: when it wakes, it has a reply to append.
    say_reliably(&a, "/slow 2000", "s1").await;
    events_until(&mut a, T, |e| is_state(e, "running")).await;
    zombie.signal(SIGSTOP).unwrap();
    let deadline = Instant::now() + T;
    while owner(&c, &sid).await.is_none_or(|w| w == old) {
        assert!(Instant::now() < deadline, "no takeover{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new owner continues the interrupted turn; then a message while the zombie sleeps.
    events_until(&mut a, T, |e| is_echo(e, "/slow 2000")).await;
    say_reliably(&a, "while frozen", "f1").await;
    events_until(&mut a, T, |e| is_echo(e, "while frozen")).await;
    zombie.signal(SIGCONT).unwrap();
    tokio::time::sleep(Duration::from_millis(TTL_MS + 1000)).await;
    say_reliably(&a, "after thaw", "f2").await;
    events_until(&mut a, T, |e| is_echo(e, "after thaw")).await;
    let evs = check_log(&c, &sid).await;
    let stored = c.all_events(0, &sid, None).await;
    // The step the zombie was in answered once, by the new owner (the zombie's own reply,
    // ready when it woke, never reached the log).
    for t in ["/slow 2000", "while frozen", "after thaw"] {
        assert_eq!(count_user(&stored, t), 1, "{t}");
        assert_eq!(count_echoes(&stored, t), 1, "{t}");
    }
    // The zombie let go: it is alive, it logged the loss, and it owns nothing.
    let log = zombie.log();
    assert!(
        log.contains("fenced") || log.contains("lease lost") || log.contains("self-fencing"),
        "{log}"
    );
    assert_ne!(owner(&c, &sid).await.as_deref(), Some(old.as_str()));
    assert!(evs.len() >= 10);
}

/// The lease scripts against a real Redis. The renew loop's batch: one script run renews some
/// leases, reports one held under another token as taken and an expired one as missing (never
/// recreating it), each in its place; the batched user-slot refresh counts each session once
/// and refuses one beyond the limit. The sweeper's script returns exactly the should-run
/// sessions without a lease.
#[tokio::test]
async fn lease_scripts_answer_for_each_session_on_its_own() {
    use shared::ownership::{self, Renewal};
    let redis_srv = tests::redis::RedisServer::start().await;
    let names = shared::names::Names::new("batch").unwrap();
    let redis_url = shared::creds::BrokerUrl::parse(&redis_srv.url()).unwrap();
    let mut conn = ownership::connect(&redis_url).await.unwrap();
    let (w1, w2) = (
        shared::id::WorkerId::parse("w1").unwrap(),
        shared::id::WorkerId::parse("w2").unwrap(),
    );
    let ttl = Duration::from_secs(5);
    let sids: Vec<SessionId> = (0..700).map(|_| SessionId::generate()).collect();
    let mut leases = Vec::new();
    for (i, sid) in sids.iter().enumerate() {
        // The first two expire before the renewal; the rest live 1 s unless renewed.
        let life = Duration::from_millis(if i < 2 { 200 } else { 1000 });
        let l = ownership::acquire(&mut conn, &names, sid, &w1, life)
            .await
            .unwrap()
            .unwrap();
        leases.push(l);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // sids[0] expired and was taken by w2; sids[1] expired and stays free.
    let taken = ownership::acquire(&mut conn, &names, &sids[0], &w2, ttl)
        .await
        .unwrap()
        .unwrap();
    let batch: Vec<&ownership::Lease> = leases.iter().collect();
    let found = ownership::renew_many(&mut conn, &batch, ttl).await.unwrap();
    assert_eq!(found.len(), batch.len());
    assert_eq!(found[0], Renewal::Taken, "held by w2 under another token");
    assert_eq!(found[1], Renewal::Missing, "expired and free");
    assert!(
        found[2..].iter().all(|f| *f == Renewal::Renewed),
        "{found:?}"
    );
    // Renewed means the new time to live, not the 1 s they were acquired with.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let again = ownership::renew_many(&mut conn, &batch[2..], ttl)
        .await
        .unwrap();
    assert!(again.iter().all(|f| *f == Renewal::Renewed), "{again:?}");
    // Missing stays missing (renewal never recreates), taken stays w2's.
    let exists: bool = redis::cmd("EXISTS")
        .arg(&leases[1].key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists);
    let holder: String = redis::cmd("GET")
        .arg(&taken.key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(holder, taken.token);
    assert!(
        ownership::renew_many(&mut conn, &[], ttl)
            .await
            .unwrap()
            .is_empty()
    );

    // User slots, batched: u1 may run 2; three of its sessions in one run: the third refused;
    // refreshing the two counted ones (again in one run) keeps them.
    let u1 = shared::id::UserId::parse("u1").unwrap();
    let slots: Vec<(&shared::id::UserId, &SessionId)> =
        sids[..3].iter().map(|s| (&u1, s)).collect();
    let got = ownership::reserve_user_slots(&mut conn, &names, &slots, 2, ttl)
        .await
        .unwrap();
    assert_eq!(got, vec![true, true, false]);
    let got = ownership::reserve_user_slots(&mut conn, &names, &slots[..2], 2, ttl)
        .await
        .unwrap();
    assert_eq!(got, vec![true, true]);
    let counted: u64 = redis::cmd("ZCARD")
        .arg(names.user_running_key(&u1))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counted, 2);

    // Orphans: sids[1] (expired, free) and sids[5] (released) have no lease; sids[0] is w2's,
    // the rest are ours. A member that does not parse is skipped.
    assert!(ownership::release(&mut conn, &leases[5]).await.unwrap());
    let u2 = shared::id::UserId::parse("u2").unwrap();
    for sid in &sids[..10] {
        ownership::mark_should_run(&mut conn, &names, &u2, sid)
            .await
            .unwrap();
    }
    let _: i64 = redis::cmd("SADD")
        .arg(names.should_run_key())
        .arg("not a member")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut orphans = ownership::orphans(&mut conn, &names).await.unwrap();
    orphans.sort();
    let mut want = vec![(sids[1].clone(), u2.clone()), (sids[5].clone(), u2.clone())];
    want.sort();
    assert_eq!(orphans, want);
}

/// Invariant 2 under contention: 50 concurrent claims of one session: exactly one lease
/// holder; and of 50 concurrent takeovers of the log, only the last epoch can append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inv2_fifty_concurrent_claims_one_owner_per_epoch() {
    let nats = tests::nats::NatsServer::start().await;
    let redis_srv = tests::redis::RedisServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let names = shared::names::Names::new("claims").unwrap();
    let store = shared::store::Store::open(client, names.clone())
        .await
        .unwrap();
    let sid = SessionId::generate();
    let redis_url = shared::creds::BrokerUrl::parse(&redis_srv.url()).unwrap();
    let conn = shared::ownership::connect(&redis_url).await.unwrap();
    let ttl = Duration::from_secs(5);
    let leases = futures::future::join_all((0..50).map(|i| {
        let (mut conn, names, sid) = (conn.clone(), names.clone(), sid.clone());
        async move {
            let w = shared::id::WorkerId::parse(&format!("w{i}")).unwrap();
            shared::ownership::acquire(&mut conn, &names, &sid, &w, ttl)
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(
        leases.iter().filter(|l| l.is_some()).count(),
        1,
        "exactly one lease holder"
    );

    let mut journals = futures::future::join_all((0..50).map(|i| {
        let (store, sid) = (store.clone(), sid.clone());
        async move {
            let mut j = shared::journal::Journal::open(store, sid, format!("c{i}"))
                .await
                .unwrap();
            let epoch = j
                .take_over(Event::agent_state_changed(
                    shared::event::AgentState::Loading,
                    "",
                ))
                .await
                .ok();
            (j, epoch)
        }
    }))
    .await;
    let epochs: Vec<u64> = journals.iter().filter_map(|(_, e)| *e).collect();
    let mut uniq = epochs.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(
        uniq.len(),
        epochs.len(),
        "two claims got the same epoch: {epochs:?}"
    );
    // Now every claimant tries to append: only the holder of the newest epoch may.
    let newest = *uniq.last().unwrap();
    let mut ok = Vec::new();
    for (j, e) in journals.iter_mut() {
        let res = j
            .append(Event::message(shared::event::Source::Agent, "x", false))
            .await;
        match res {
            Ok(_) => ok.push(*e),
            Err(shared::journal::AppendError::Fenced { .. }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, vec![Some(newest)], "only the newest epoch appends");
    let evs = store.read_from(&sid, 0, 1000).await.unwrap();
    assert_eq!(
        evs.iter().map(|e| e.id).collect::<Vec<_>>(),
        (0..evs.len() as u64).collect::<Vec<_>>()
    );
}

/// Invariant 5: kill -9 of a gateway: its client resumes on the other gateway with no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inv5_kill9_gateway_client_resumes_elsewhere() {
    let mut c = Cluster::start(opts()).await;
    let sid = c.create(0, Some("m0"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    let mut got = events_until(&mut a, T, |e| is_echo(e, "m0")).await;
    say_reliably(&a, "before", "b1").await;
    got.extend(events_until(&mut a, T, |e| is_echo(e, "before")).await);
    c.gateways[0].kill9().await;
    // The client notices and reconnects to the other gateway from its last id.
    let deadline = Instant::now() + T;
    loop {
        match a.next_event(Duration::from_millis(200)).await {
            Err(SioError::Disconnected) => break,
            Ok((_, ev)) => got.push(ev),
            Err(_) => assert!(Instant::now() < deadline, "never noticed the dead gateway"),
        }
    }
    let last = ids(&got).into_iter().max().unwrap();
    let mut b = c.connect(1, &sid, Some(last as i64), None).await.unwrap();
    say_reliably(&b, "after", "a1").await;
    let got2 = events_until(&mut b, T, |e| is_echo(e, "after")).await;
    let stored = c.all_events(1, &sid, None).await;
    check_client(&stored, -1, &got);
    check_client(&stored, last as i64, &got2);
    assert_eq!(count_echoes(&stored, "after"), 1);
}

/// Invariant 8: nats-server kill -9 and restart on the same store, then redis-server restart
/// empty: the system recovers by itself; nothing acknowledged is lost; no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inv8_nats_and_redis_restarts_recover_by_themselves() {
    let mut c = Cluster::start(opts()).await;
    let sid = c.create(0, Some("m0"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    let mut got = events_until(&mut a, T, |e| is_echo(e, "m0")).await;
    say_reliably(&a, "one", "n1").await;
    got.extend(events_until(&mut a, T, |e| is_echo(e, "one")).await);

    c.nats.kill().await;
    c.nats.restart().await;
    say_reliably(&a, "after nats", "n2").await;
    got.extend(events_until(&mut a, T, |e| is_echo(e, "after nats")).await);

    c.redis.restart().await; // comes back empty
    say_reliably(&a, "after redis", "n3").await;
    got.extend(events_until(&mut a, T, |e| is_echo(e, "after redis")).await);
    // Ownership and status are rebuilt within a lease period.
    c.wait_info(0, &sid, None, T, |v| {
        v["session_status"] == "running"
            && v["worker_id"].is_string()
            && v["agent_state"] == "awaiting_user_input"
    })
    .await;

    let stored = c.all_events(0, &sid, None).await;
    for t in ["m0", "one", "after nats", "after redis"] {
        assert_eq!(count_user(&stored, t), 1, "{t}");
        assert_eq!(count_echoes(&stored, t), 1, "{t}");
    }
    check_client(&stored, -1, &got);
    check_log(&c, &sid).await;
}

/// Drain: SIGTERM of a worker under load, then a rolling restart of all workers one by one
/// while clients keep talking: 0 lost, 0 duplicated, no client error; workers exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_rolling_restart_under_load_loses_nothing() {
    let mut c = Cluster::start(opts()).await;
    let n = 6;
    let mut sids = Vec::new();
    for _ in 0..n {
        sids.push(c.create(0, None, None).await);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, sid) in sids.iter().enumerate() {
        let mut client = c.connect(i % 2, sid, None, None).await.unwrap();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut sent = Vec::new();
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = format!("c{i} m{k}");
                say_reliably(&client, &text, &format!("c{i}m{k}")).await;
                got.extend(events_until(&mut client, T, |e| is_echo(e, &text)).await);
                sent.push(text);
                k += 1;
            }
            let errors = got.iter().filter(|e| e.get("error").is_some()).count();
            (sent, got, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Roll every worker: SIGTERM, it exits 0 after handing its sessions over, a new one starts.
    for i in 0..2 {
        c.workers[i].signal(SIGTERM).unwrap();
        let status = c.workers[i]
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("drained in time");
        assert!(status.success(), "worker {i} exit {status:?}{}", c.logs());
        c.add_worker().await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for (t, sid) in tasks.into_iter().zip(&sids) {
        let (sent, got, errors) = t.await.unwrap();
        assert_eq!(errors, 0, "client saw errors");
        let stored = c.all_events(0, sid, None).await;
        for text in &sent {
            assert_eq!(count_user(&stored, text), 1, "{text}");
            assert_eq!(count_echoes(&stored, text), 1, "{text}");
        }
        check_client(&stored, -1, &got);
        check_log(&c, sid).await;
        total += sent.len();
    }
    assert!(total >= 2 * n, "too little load to mean anything: {total}");
    eprintln!("{total} messages through a rolling restart");
}

/// Idle passivation after OH_CLOSE_DELAY_S with no client, then resume on the next connect
/// on another worker (the first one is gone) with the conversation intact; bad cursors get
/// defined answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passivation_and_resume_with_state_intact() {
    let mut c = Cluster::start(ClusterOpts {
        worker_env: vec![("OH_CLOSE_DELAY_S", "1".to_owned())],
        ..opts()
    })
    .await;
    let sid = c.create(0, Some("m0"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut a, T, |e| is_echo(e, "m0")).await;
    // Connected: never passivated.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(c.info(0, &sid, None).await["session_status"], "running");
    let first = owner(&c, &sid).await.expect("owned");
    a.close().await;
    let v = c
        .wait_info(0, &sid, None, T, |v| v["session_status"] == "stopped")
        .await;
    assert_eq!(v["worker_id"], Value::Null);
    let before = c.all_events(0, &sid, None).await;
    assert!(is_state(before.last().unwrap(), "stopped"));
    // The worker that ran it goes away: the state must come from the log, not its memory.
    c.workers[Cluster::worker_index(&first)].kill9().await;
    // Bad cursors: defined refusals, never a silent gap.
    for bad in ["-2", "abc", "1.5"] {
        let r = SioClient::connect(
            tests::sio::ConnectOpts::new(c.url(1))
                .query("conversation_id", &sid)
                .query("latest_event_id", bad),
        )
        .await;
        assert!(
            matches!(r, Err(SioError::ConnectRefused { .. })),
            "cursor {bad}"
        );
    }
    // Connecting resumes it; history intact, ids continue, no second system event.
    let mut b = c
        .connect(1, &sid, Some(before.len() as i64 - 1), None)
        .await
        .unwrap();
    c.wait_info(1, &sid, None, T, |v| {
        v["agent_state"] == "awaiting_user_input"
    })
    .await;
    let second = owner(&c, &sid).await.expect("owned again");
    assert_ne!(second, first, "resumed on the worker that was killed");
    say_reliably(&b, "back", "r1").await;
    let got = events_until(&mut b, T, |e| is_echo(e, "back")).await;
    assert!(ids(&got)[0] >= before.len() as u64);
    let after = c.all_events(0, &sid, None).await;
    assert_eq!(&after[..before.len()], &before[..]);
    assert_eq!(after.iter().filter(|e| e["action"] == "system").count(), 1);
    check_log(&c, &sid).await;
}

/// Poison input: a step that crashes its worker is continued once on another worker (a
/// crash between steps must not lose the turn), and the second interruption ends the turn in
/// `error` with a reason: bounded, never a crash loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_step_ends_in_error_not_a_crash_loop() {
    let mut c = Cluster::start(ClusterOpts {
        workers: 3,
        worker_env: vec![("OH_ECHO_FAULTS", "true".to_owned())],
        ..opts()
    })
    .await;
    let sid = c.create(0, Some("m0"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut a, T, |e| is_echo(e, "m0")).await;
    say_reliably(&a, "/crash", "p1").await;
    let got = events_until(&mut a, T, |e| is_state(e, "error")).await;
    let state = got.last().unwrap();
    let reason = state["extras"]["reason"].as_str().unwrap();
    assert!(reason.contains("interrupted 2 times"), "{state}");
    assert!(got.iter().any(|e| e["observation"] == "error"));
    // Two workers died on the poison input; the third runs the session and keeps serving it.
    say_reliably(&a, "still here", "p2").await;
    events_until(&mut a, T, |e| is_echo(e, "still here")).await;
    let alive = c
        .workers
        .iter_mut()
        .filter_map(|w| w.try_exit_status().is_none().then_some(()))
        .count();
    assert_eq!(alive, 1);
    let stored = c.all_events(0, &sid, None).await;
    assert_eq!(count_user(&stored, "/crash"), 1);
    let errors = stored.iter().filter(|e| is_state(e, "error")).count();
    assert_eq!(errors, 1, "the poison step was retried");
    check_log(&c, &sid).await;
}

/// Per-user limit (OH_MAX_CONVERSATIONS_PER_USER), exact across workers: with a limit of 2,
/// of 6 conversations started at once exactly 2 run; the others are refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_limit_is_exact_across_workers() {
    let c = Cluster::start(ClusterOpts {
        worker_env: vec![("OH_MAX_CONVERSATIONS_PER_USER", "2".to_owned())],
        ..opts()
    })
    .await;
    let sids: Vec<String> =
        futures::future::join_all((0..6).map(|i| c.create(i % 2, None, None))).await;
    let deadline = Instant::now() + T;
    let mut states: BTreeMap<String, usize>;
    let mut seen: Vec<Value>;
    loop {
        states = BTreeMap::new();
        seen = Vec::new();
        for s in &sids {
            let v = c.info(0, s, None).await;
            *states
                .entry(v["session_status"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
            seen.push(json!([
                v["session_status"],
                v["worker_id"],
                v["agent_state"],
                v["reason"]
            ]));
        }
        // Settled: nothing queued, and every running session's claim has finished (it wrote its
        // agent state); while a claim is still deciding, its lease alone reads as running.
        let claiming = seen.iter().any(|v| v[0] == "running" && v[2].is_null());
        if !states.contains_key("queued") && !claiming {
            break;
        }
        assert!(Instant::now() < deadline, "{states:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        states.get("running"),
        Some(&2),
        "{states:?} {seen:?}\n{}",
        c.logs()
    );
    assert_eq!(states.get("error"), Some(&4), "{states:?}");
    let mut reason = None;
    for s in &sids {
        let v = c.info(0, s, None).await;
        if v["session_status"] == "error" {
            reason = v["reason"].as_str().map(str::to_owned);
        }
    }
    let reason = reason.unwrap_or_default();
    assert!(reason.contains("TOO_MANY_CONVERSATIONS"), "{reason}");
}

/// A client retrying an action with the same msg_id (e.g. after a timeout) is stored once; a
/// different action under an id already used is refused with a clear error, and the first
/// one is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_retries_with_same_msg_id_are_stored_once() {
    let c = Cluster::start(ClusterOpts {
        gateways: 2,
        workers: 1,
        ..opts()
    })
    .await;
    let sid = c.create(0, None, None).await;
    let a = c.connect(0, &sid, None, None).await.unwrap();
    let mut b = c.connect(1, &sid, None, None).await.unwrap();
    for _ in 0..3 {
        say_reliably(&a, "once", "same-id").await;
        say_reliably(&b, "once", "same-id").await; // even through another gateway
    }
    events_until(&mut b, T, |e| is_echo(e, "once")).await;
    settle(&mut b, "sentinel-1").await;
    let stored = c.all_events(0, &sid, None).await;
    assert_eq!(count_user(&stored, "once"), 1);
    assert_eq!(count_echoes(&stored, "once"), 1);
    // The same action with its keys in another order is the same action: a retry, acked.
    let again = a
        .emit_with_ack(
            "oh_user_action",
            &json!({"msg_id": "same-id", "args": {"content": "once"}, "action": "message"}),
            T,
        )
        .await
        .unwrap();
    assert_eq!(again[0]["success"], true, "{again:?}");
    // The same id with a different action: the first one wins, and the sender is told.
    for client in [&a, &b] {
        let conflict = client
            .emit_with_ack(
                "oh_user_action",
                &json!({"action": "message", "args": {"content": "other"}, "msg_id": "same-id"}),
                T,
            )
            .await
            .unwrap();
        assert_eq!(conflict[0]["error"], true, "{conflict:?}");
        let message = conflict[0]["message"].as_str().unwrap_or_default();
        assert!(message.contains("already used"), "{message}");
    }
    // A new id is a new action.
    say_reliably(&a, "other", "new-id").await;
    events_until(&mut b, T, |e| is_echo(e, "other")).await;
    settle(&mut b, "sentinel-2").await;
    let stored = c.all_events(0, &sid, None).await;
    assert_eq!(count_user(&stored, "once"), 1);
    assert_eq!(count_user(&stored, "other"), 1);
    let bad = a
        .emit_with_ack(
            "oh_user_action",
            &json!({"action": "message", "args": {"content": "x"}, "msg_id": "a.b"}),
            T,
        )
        .await
        .unwrap();
    assert_eq!(bad[0]["error"], true);
}

/// Rolling deploy of gateways: SIGTERM closes every socket and exits 0 promptly; the clients
/// resume on the other gateway with no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sigterm_closes_sockets_and_clients_resume() {
    let mut c = Cluster::start(opts()).await;
    let sid = c.create(0, Some("m0"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    let got = events_until(&mut a, T, |e| is_echo(e, "m0")).await;
    c.gateways[0].signal(SIGTERM).unwrap();
    let status = c.gateways[0]
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("gateway exits");
    assert!(status.success(), "{status:?}");
    let mut got1 = got;
    loop {
        match a.next_event(T).await {
            Ok((_, ev)) => got1.push(ev),
            Err(SioError::Disconnected) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let last = ids(&got1).into_iter().max().unwrap();
    let mut b = c.connect(1, &sid, Some(last as i64), None).await.unwrap();
    say_reliably(&b, "after", "g1").await;
    let mut got2 = events_until(&mut b, T, |e| is_echo(e, "after")).await;
    // The turn's last event: live, or held back to the end of a replay that raced the turn.
    got2.extend(events_until(&mut b, T, |e| is_state(e, "awaiting_user_input")).await);
    let stored = c.all_events(1, &sid, None).await;
    check_client(&stored, -1, &got1);
    check_client(&stored, last as i64, &got2);
}

/// A slow client (stops reading) is disconnected at its buffer budget without slowing the
/// others, and resumes by replay with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_disconnected_and_resumes_by_replay() {
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        gateway_env: vec![
            ("OH_SOCKET_BUFFER", "32".to_owned()),
            ("OH_SLOW_CLIENT_TIMEOUT_MS", "500".to_owned()),
        ],
        ..opts()
    })
    .await;
    let sid = c.create(0, None, None).await;
    c.wait_info(0, &sid, None, T, |v| {
        v["agent_state"] == "awaiting_user_input"
    })
    .await;
    // A client that stops reading: a raw websocket with a tiny receive window.
    let mut slow = RawSlowClient::connect(c.gateway_port(0), &sid).await;
    let mut fast = c.connect(0, &sid, None, None).await.unwrap();
    let big = "z".repeat(256 * 1024);
    let mut fast_got = Vec::new();
    for k in 0..60 {
        let text = format!("{k} {big}");
        say_reliably(&fast, &text, &format!("s{k}")).await;
        fast_got.extend(events_until(&mut fast, T, |e| is_echo(e, &text)).await);
    }
    // The fast client completed every turn while the slow one sat on a full buffer: one
    // stalled socket does not hold the others back.
    // The slow client reads what it had, then finds itself disconnected.
    let mut slow_got = slow.drain_until_closed(T).await;
    // If it reads on, the last thing it gets is why it was disconnected.
    if slow_got.last().is_some_and(|e| e["error"] == true) {
        let reason = slow_got.pop().unwrap();
        assert!(
            reason["message"]
                .as_str()
                .unwrap()
                .contains("OH_SLOW_CLIENT_TIMEOUT_MS"),
            "{reason}"
        );
    }
    let stored = c.all_events(0, &sid, None).await;
    assert!(
        ids(&slow_got).len() < stored.len(),
        "the slow client got everything: not slow"
    );
    let last = ids(&slow_got).into_iter().max().map_or(-1, |m| m as i64);
    let mut again = c.connect(0, &sid, Some(last), None).await.unwrap();
    let rest = events_until(&mut again, T, |e| is_state(e, "awaiting_user_input")).await;
    check_client(&stored, -1, &slow_got);
    check_client(&stored, last, &rest);
    check_client(&stored, -1, &fast_got);
    let metrics = tests::http_client()
        .get(format!("{}/metrics", c.url(0)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("oh_gateway_slow_client_disconnects_total 1"),
        "{metrics}"
    );
}

/// A connect or replay whose log read fails (nats-server frozen past the JetStream request
/// timeout) is tried again until the log answers: the clients that connected meanwhile get
/// their exact replay and the live events after it, not an error. (A reconnect storm on a busy cluster
/// timed such reads out, and each of those clients got an error and a disconnect.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_log_read_times_out_is_tried_again() {
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        ..opts()
    })
    .await;
    let created = Instant::now();
    let sid = c.create(0, Some("m0"), None).await;
    // A holds the session's feed on the gateway, so B's join needs no NATS round trip; and
    // B connects within 10 s of the create through the creating gateway, which vouches for
    // the conversation without reading its metadata. So B's first NATS request is the
    // replay's read of the log.
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut a, T, |e| is_echo(e, "m0")).await;
    assert!(
        created.elapsed() < Duration::from_secs(8),
        "the first turn took {:?}: too late for the create to vouch for B",
        created.elapsed()
    );
    let nats = c.nats.pid().expect("nats-server pid");
    tests::proc::send_signal(nats, SIGSTOP).unwrap();
    let frozen = Instant::now();
    // B connects with no cursor: its connect reads nothing, its replay reads the log. C
    // connects with cursor 0: its connect reads the log's head (to refuse a cursor beyond it).
    let client = |cursor: Option<i64>| {
        let mut o = tests::sio::ConnectOpts::new(c.url(0))
            .query("conversation_id", sid.clone())
            .timeout(Duration::from_secs(30));
        if let Some(l) = cursor {
            o = o.query("latest_event_id", l.to_string());
        }
        tokio::spawn(async move {
            let mut s = SioClient::connect(o).await.expect("connect");
            // Until the turn's closing state change, which a replay holds back and sends last.
            let mut got: Vec<Value> = Vec::new();
            while !got.iter().any(|e| is_echo(e, "after"))
                || !got
                    .last()
                    .is_some_and(|e| is_state(e, "awaiting_user_input"))
            {
                got.extend(
                    events_until(&mut s, Duration::from_secs(60), |e| {
                        is_echo(e, "after") || is_state(e, "awaiting_user_input")
                    })
                    .await,
                );
            }
            got
        })
    };
    let b = client(None);
    let c0 = client(Some(0));
    // Frozen until both reads failed (each after the JetStream request timeout, 5 s) and
    // were tried again: C's connect check and B's replay.
    let gateway = format!("127.0.0.1:{}", c.gateway_port(0));
    let retried = |read: &'static str| {
        let gateway = gateway.clone();
        async move {
            let name = format!("oh_gateway_log_read_retries_total{{read=\"{read}\"}}");
            counter_sum(&[gateway], &name).await
        }
    };
    while retried("connect").await < 1.0 || retried("replay").await < 1.0 {
        assert!(
            frozen.elapsed() < Duration::from_secs(15),
            "the reads were not tried again while NATS was frozen{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tests::proc::send_signal(nats, SIGCONT).unwrap();
    let thawed = frozen.elapsed();
    say_reliably(&a, "after", "r1").await;
    let got = b.await.expect("client B");
    let got_c = c0.await.expect("client C");
    let took = frozen.elapsed();
    let stored = c.all_events(0, &sid, None).await;
    // `check_client` refuses an event without an id: the error a failed replay sends.
    check_client(&stored, -1, &got);
    check_client(&stored, 0, &got_c);
    println!(
        "nats-server frozen {:.1} s: B's replay of {} events and C's of {} arrived after {} + {} retried reads (replay + connect), {:.1} s after the freeze",
        thawed.as_secs_f64(),
        got.len(),
        got_c.len(),
        retried("replay").await,
        retried("connect").await,
        took.as_secs_f64()
    );
}

/// A client that leaves while its connect waits on the log (nats-server frozen) is never
/// connected (socketioxide drops a socket whose CONNECT cannot be sent, running neither
/// handler): what its connect took, the user's only socket slot here, is given back, so the
/// user's next connect is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_abandoned_while_it_waited_gives_its_socket_slot_back() {
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        gateway_env: vec![("OH_MAX_SOCKETS_PER_USER", "1".to_owned())],
        ..opts()
    })
    .await;
    let sid = c.create(0, None, None).await;
    c.wait_info(0, &sid, None, T, |v| {
        v["agent_state"] == "awaiting_user_input"
    })
    .await;
    let gateway = format!("127.0.0.1:{}", c.gateway_port(0));
    let nats = c.nats.pid().expect("nats-server pid");
    tests::proc::send_signal(nats, SIGSTOP).unwrap();
    let frozen = Instant::now();
    // With a cursor, the connect reads the log's head: it waits while NATS is frozen.
    let leaving = tokio::spawn(SioClient::connect(
        tests::sio::ConnectOpts::new(c.url(0))
            .query("conversation_id", sid.clone())
            .query("latest_event_id", "0")
            .timeout(Duration::from_secs(60)),
    ));
    while counter_sum(
        std::slice::from_ref(&gateway),
        "oh_gateway_log_read_retries_total{read=\"connect\"}",
    )
    .await
        < 1.0
    {
        assert!(
            frozen.elapsed() < Duration::from_secs(15),
            "the connect's read was not tried again{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The client leaves (its connection closes), then the log answers and the middleware
    // takes the user's slot for a socket that will never be connected.
    leaving.abort();
    let _ = leaving.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    tests::proc::send_signal(nats, SIGCONT).unwrap();
    let thawed = Instant::now();
    // The abandoned connect's next try comes within its backoff (≤ 3 s): let it take the slot.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut refused = 0;
    let mut next = loop {
        match c.connect(0, &sid, None, None).await {
            Ok(s) => break s,
            Err(SioError::ConnectRefused { message, .. }) if message.contains("Too many") => {
                refused += 1;
            }
            Err(e) => panic!("unexpected connect error: {e:?}"),
        }
        assert!(
            thawed.elapsed() < Duration::from_secs(40),
            "the abandoned connect's slot was never given back ({refused} refusals){}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(refused >= 1, "the abandoned connect never held the slot");
    let abandoned = counter_sum(&[gateway], "oh_gateway_connects_abandoned_total").await;
    assert!(
        abandoned >= 1.0,
        "no connect counted as abandoned{}",
        c.logs()
    );
    // The admitted socket is a working one.
    events_until(&mut next, T, |e| is_state(e, "awaiting_user_input")).await;
    println!(
        "abandoned connect: slot back {:.1} s after NATS answered ({refused} refusals meanwhile)",
        thawed.elapsed().as_secs_f64()
    );
}

/// A Socket.IO client over a raw websocket whose TCP receive buffer is tiny, so that when it
/// stops reading the server's send queue fills quickly.
struct RawSlowClient {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
}

impl RawSlowClient {
    async fn connect(port: u16, sid: &str) -> Self {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let stream = sock.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let url = format!(
            "ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket&conversation_id={sid}"
        );
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        let open = ws.next().await.unwrap().unwrap();
        assert!(open.to_text().unwrap().starts_with('0'), "{open:?}");
        ws.send(Message::text("40")).await.unwrap();
        loop {
            let m = ws.next().await.unwrap().unwrap();
            if m.to_text().unwrap_or("").starts_with("40") {
                return RawSlowClient { ws };
            }
        }
    }

    /// Reads everything until the server closes the connection; returns the `oh_event`s.
    async fn drain_until_closed(&mut self, timeout: Duration) -> Vec<Value> {
        use futures::StreamExt;
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("the slow client was never disconnected"),
                Ok(None) | Ok(Some(Err(_))) => return got,
                Ok(Some(Ok(m))) => {
                    if m.is_close() {
                        return got;
                    }
                    let text = m.to_text().unwrap_or("");
                    if let Some(body) = text.strip_prefix("42") {
                        let v: Value = serde_json::from_str(body).unwrap();
                        if v[0] == "oh_event" {
                            got.push(v[1].clone());
                        }
                    } else if text == "41" {
                        return got;
                    }
                }
            }
        }
    }
}
