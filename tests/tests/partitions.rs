//! Across machines (issue 11): every process on a host of its own (network namespaces on a
//! bridge), a 3-node NATS cluster with every stream on 3 replicas, and a nemesis that cuts
//! links, kills and pauses processes, empties Redis and skews a worker's clock, while clients
//! keep talking. Each scenario checks the recorded history against the stored logs (C1–C5:
//! no acknowledged message lost or duplicated, every connection an ordered gap-free prefix,
//! no epoch interleaving, nothing stuck) and prints its recovery times.
//!
//! The tests skip (with a message) where namespaces are impossible; `scripts/test.sh` sets
//! `OH_REQUIRE_NETNS=1`, so in CI they run or fail. They live in `across_machines` so the
//! suite can run them in a phase of their own, one at a time (each is a whole cluster of
//! eleven processes; beside the other end-to-end tests on two cores their timings are not
//! the system's).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod across_machines {

    use std::time::{Duration, Instant};

    use tests::history::{ClientHistory, Verdict, Workload, check};
    use tests::netcluster::{NetCluster, NetOpts, TOKEN, gateway_host, nats_host, worker_host};

    const THINK: Duration = Duration::from_millis(150);
    /// Traffic before a fault.
    const WARM: Duration = Duration::from_secs(3);
    /// C5: the longest any acknowledged message may wait for its answer through a fault (lease
    /// TTL 3 s, failure detection, claim, and the client's own reconnect after 20 s without an
    /// answer: a gateway whose NATS node was isolated has been seen to leave an answer to that).
    const BOUND: Duration = Duration::from_secs(45);

    async fn sessions(c: &NetCluster, n: usize) -> Vec<String> {
        let mut sids = Vec::new();
        for i in 0..n {
            sids.push(c.create(i % 2).await);
        }
        sids
    }

    fn workload(c: &NetCluster, sids: &[String]) -> Workload {
        Workload::start(sids, c.urls(), TOKEN, THINK)
    }

    /// Stops the clients, checks the history (panics with the verdict and the logs on a
    /// violation), and returns the verdict.
    async fn finish(c: &NetCluster, name: &str, sids: &[String], w: Workload) -> Verdict {
        let histories: Vec<ClientHistory> = w.stop().await;
        let stored = c.read_stored(sids).await;
        let v = check(&histories, &stored);
        println!("[{name}] {v}");
        assert!(v.clean(), "[{name}] {v}{}", c.logs());
        assert!(v.acked > 0, "[{name}] nothing was acknowledged{}", c.logs());
        v
    }

    /// The owner of `sid` as the gateway reports it (`worker_id`), if any.
    async fn owner(c: &NetCluster, sid: &str) -> Option<usize> {
        c.info(sid).await["worker_id"]
            .as_str()
            .map(NetCluster::worker_index)
    }

    /// Waits until every conversation answers a fresh message through gateway `g`; the time it
    /// took (recovery as a client sees it).
    async fn all_answer(c: &NetCluster, sids: &[String], g: usize, bound: Duration) -> Duration {
        let t0 = Instant::now();
        let probe = Workload::start(sids, vec![c.url(g)], TOKEN, Duration::from_secs(3600));
        // One message each: stop as soon as every client has its answer.
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if t0.elapsed() > bound {
                break;
            }
            if probe.all_answered(1) {
                break;
            }
        }
        let hs = probe.stop().await;
        let took = t0.elapsed();
        for h in &hs {
            assert!(
                h.sent.first().is_some_and(|m| m.answered_after.is_some()),
                "{} did not answer within {bound:?}: {:?}{}",
                h.sid,
                h.sent.first(),
                c.logs()
            );
        }
        took
    }

    #[tokio::test]
    async fn cluster_without_faults_is_clean() {
        let Some(c) = NetCluster::start(NetOpts::default()).await else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(Duration::from_secs(8)).await;
        finish(&c, "no faults", &sids, w).await;
        let _ = (
            gateway_host(0),
            nats_host(0),
            worker_host(0),
            owner(&c, &sids[0]).await,
        );
        let took = all_answer(&c, &sids, 1, Duration::from_secs(30)).await;
        println!(
            "[no faults] all answer through g2 in {:.2} s",
            took.as_secs_f64()
        );
    }

    /// The owner of each conversation.
    async fn owners(c: &NetCluster, sids: &[String]) -> Vec<Option<usize>> {
        let mut out = Vec::new();
        for sid in sids {
            out.push(owner(c, sid).await);
        }
        out
    }

    /// The worker owning the most conversations, and those conversations.
    async fn busiest(c: &NetCluster, sids: &[String]) -> (usize, Vec<String>) {
        let own = owners(c, sids).await;
        let w = (0..3)
            .max_by_key(|w| own.iter().filter(|o| **o == Some(*w)).count())
            .expect("three workers");
        let mine = sids
            .iter()
            .zip(&own)
            .filter(|(_, o)| **o == Some(w))
            .map(|(s, _)| s.clone())
            .collect();
        (w, mine)
    }

    /// Waits until none of `sids` is owned by worker `w` any more (each owned by another); the
    /// time it took.
    async fn owned_elsewhere(
        c: &NetCluster,
        sids: &[String],
        w: usize,
        bound: Duration,
    ) -> Duration {
        let t0 = Instant::now();
        loop {
            let own = owners(c, sids).await;
            if own.iter().all(|o| o.is_some_and(|o| o != w)) {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < bound,
                "sessions {sids:?} still on w{w} (owners {own:?}) after {bound:?}{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn secs(d: Duration) -> String {
        format!("{:.2} s", d.as_secs_f64())
    }

    /// Row 10: a worker cut from Redis (NATS still reachable) stops renewing, fences its sessions
    /// itself before its leases expire, and they move to the other workers.
    #[tokio::test]
    async fn worker_cut_from_redis_fences_itself_and_its_sessions_move() {
        let name = "worker x redis";
        let Some(c) = NetCluster::start(NetOpts::default()).await else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        let (victim, mine) = busiest(&c, &sids).await;
        assert!(!mine.is_empty());
        c.net.cut_both(&worker_host(victim), "redis");
        let moved = owned_elsewhere(&c, &mine, victim, BOUND).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.net.heal_all();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let v = finish(&c, name, &sids, w).await;
        let log = c.worker(victim).log();
        assert!(
            log.contains("self-fencing"),
            "w{victim} did not fence itself:\n{log}"
        );
        println!(
            "[{name}] {} sessions of w{victim} owned elsewhere after {}; longest answer wait {}",
            mine.len(),
            secs(moved),
            secs(v.max_answer)
        );
        assert!(v.max_answer <= BOUND, "[{name}] {v}");
    }

    /// Row 10, the reverse: a worker cut from every NATS node (Redis still reachable) cannot
    /// append; it notices the silent link by its pings, stops renewing, and its sessions move.
    #[tokio::test]
    async fn worker_cut_from_nats_releases_its_sessions() {
        let name = "worker x nats";
        let Some(c) = NetCluster::start(NetOpts::default()).await else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        let (victim, mine) = busiest(&c, &sids).await;
        for n in 0..3 {
            c.net.cut_both(&worker_host(victim), &nats_host(n));
        }
        let moved = owned_elsewhere(&c, &mine, victim, BOUND).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.net.heal_all();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let v = finish(&c, name, &sids, w).await;
        let log = c.worker(victim).log();
        assert!(
            log.contains("NATS unreachable"),
            "w{victim} never noticed:\n{log}"
        );
        println!(
            "[{name}] {} sessions of w{victim} owned elsewhere after {}; longest answer wait {}",
            mine.len(),
            secs(moved),
            secs(v.max_answer)
        );
        assert!(v.max_answer <= BOUND, "[{name}] {v}");
    }

    /// Row 10: a gateway cut from NATS answers its clients' sends with errors (never a false
    /// ack), reports itself unready, and the clients carry on through the other gateway.
    #[tokio::test]
    async fn gateway_cut_from_nats_errors_to_its_clients_who_move() {
        let name = "gateway x nats";
        let Some(c) = NetCluster::start(NetOpts::default()).await else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        let before = w.answers();
        let t0 = Instant::now();
        for n in 0..3 {
            c.net.cut_both(&gateway_host(0), &nats_host(n));
        }
        // The gateway notices (pings) and says so to its load balancer.
        let unready = loop {
            if let Ok((503, _)) = c.get(0, "/readyz").await {
                break t0.elapsed();
            }
            assert!(t0.elapsed() < BOUND, "g1 stayed ready{}", c.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        tokio::time::sleep(Duration::from_secs(8)).await;
        let during = w.answers() - before;
        c.net.heal_all();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let histories = w.stop().await;
        let errors: usize = histories
            .iter()
            .flat_map(|h| &h.sent)
            .filter(|m| !m.errors.is_empty())
            .count();
        let stored = c.read_stored(&sids).await;
        let v = check(&histories, &stored);
        println!("[{name}] {v}");
        assert!(v.clean(), "[{name}] {v}{}", c.logs());
        assert!(
            during > 0,
            "[{name}] no answer while g1 was cut: clients did not move"
        );
        assert!(
            errors > 0,
            "[{name}] no client saw an error from the cut gateway"
        );
        println!(
            "[{name}] g1 unready after {}; {during} answers through g2 during the cut; {errors} sends saw an error first; longest answer wait {}",
            secs(unready),
            secs(v.max_answer)
        );
        assert!(v.max_answer <= BOUND, "[{name}] {v}");
    }

    /// Row 10: a gateway isolated from everything (its clients too): clients time out, connect
    /// to the other gateway from their newest event, and miss nothing.
    #[tokio::test]
    async fn isolated_gateway_clients_resume_elsewhere() {
        let name = "gateway isolated";
        let Some(c) = NetCluster::start(NetOpts::default()).await else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        c.net.isolate(&gateway_host(0));
        let t0 = Instant::now();
        let before = w.answers();
        // Every client answered again (those on g2 never stopped; those on g1 moved).
        while w.answers() < before + 2 * sids.len() {
            assert!(
                t0.elapsed() < BOUND,
                "[{name}] clients did not resume{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        c.net.heal_all();
        let v = finish(&c, name, &sids, w).await;
        println!(
            "[{name}] longest answer wait {} (clients of g1 give up after 8-20 s of silence)",
            secs(v.max_answer)
        );
        assert!(v.max_answer <= BOUND, "[{name}] {v}");
    }

    /// The node leading the events stream is killed: JetStream elects another leader among the
    /// two left, appends carry on (retried with the same msg ids), the node comes back and
    /// catches up.
    #[tokio::test]
    async fn events_stream_leader_killed_and_restarted() {
        let name = "stream leader killed";
        let Some(mut c) = NetCluster::start(NetOpts::default()).await else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        let leader = c
            .stream_leader("events")
            .await
            .expect("events stream leader");
        let t0 = Instant::now();
        c.kill_nats(leader).await;
        let new_leader = loop {
            if let Some(l) = c.stream_leader("events").await
                && l != leader
            {
                break l;
            }
            assert!(t0.elapsed() < BOUND, "[{name}] no new leader{}", c.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let elected = t0.elapsed();
        tokio::time::sleep(Duration::from_secs(6)).await;
        c.restart_nats(leader).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let v = finish(&c, name, &sids, w).await;
        println!(
            "[{name}] {} killed; {} leads after {}; longest answer wait {}",
            nats_host(leader),
            nats_host(new_leader),
            secs(elected),
            secs(v.max_answer)
        );
        assert!(v.max_answer <= BOUND, "[{name}] {v}");
    }

    /// The events stream's leader is partitioned from everyone, then healed: the majority elects
    /// a new leader; the old one, alone, can commit nothing (no quorum), so nothing it
    /// acknowledges is lost.
    #[tokio::test]
    async fn events_stream_leader_partitioned_away_then_healed() {
        let name = "stream leader partitioned";
        let Some(c) = NetCluster::start(NetOpts::default()).await else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        let leader = c
            .stream_leader("events")
            .await
            .expect("events stream leader");
        let t0 = Instant::now();
        c.net.isolate(&nats_host(leader));
        let new_leader = loop {
            if let Some(l) = c.stream_leader("events").await
                && l != leader
            {
                break l;
            }
            assert!(t0.elapsed() < BOUND, "[{name}] no new leader{}", c.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let elected = t0.elapsed();
        tokio::time::sleep(Duration::from_secs(6)).await;
        c.net.heal_all();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let v = finish(&c, name, &sids, w).await;
        println!(
            "[{name}] {} isolated; {} leads after {}; longest answer wait {}",
            nats_host(leader),
            nats_host(new_leader),
            secs(elected),
            secs(v.max_answer)
        );
        assert!(v.max_answer <= BOUND, "[{name}] {v}");
    }

    /// A node that leads nothing of ours is isolated, then healed: the majority goes on without
    /// it, and after the heal it serves again (a client connected only to it reads the log).
    #[tokio::test]
    async fn minority_node_isolated_then_healed() {
        let name = "minority node isolated";
        let Some(c) = NetCluster::start(NetOpts::default()).await else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        let leader = c
            .stream_leader("events")
            .await
            .expect("events stream leader");
        let minority = (0..3).find(|n| *n != leader).expect("a follower");
        c.net.isolate(&nats_host(minority));
        tokio::time::sleep(Duration::from_secs(8)).await;
        c.net.heal_all();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let v = finish(&c, name, &sids, w).await;
        // The healed node's own copy of the events stream catches up with the leader's.
        let t0 = Instant::now();
        let caught_up = loop {
            let leader = c.stream_leader("events").await.expect("a leader");
            let (l, m) = (
                c.node_last_seq(leader, "events").await,
                c.node_last_seq(minority, "events").await,
            );
            if l.is_some() && l == m {
                break t0.elapsed();
            }
            assert!(
                t0.elapsed() < BOUND,
                "[{name}] {} never caught up: {m:?} vs leader {l:?}",
                nats_host(minority)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!(
            "[{name}] {} isolated 8 s; its copy caught up {} after the heal check began; longest answer wait {}",
            nats_host(minority),
            secs(caught_up),
            secs(v.max_answer)
        );
        assert!(v.max_answer <= BOUND, "[{name}] {v}");
    }

    /// Row 8: Redis forgets everything under load — `FLUSHALL`, then replaced by an empty server
    /// (a failover to a replica that missed the last writes). Redis is rebuildable state: leases
    /// are retaken (the epoch comes from the log, so no split writes), status is rebuilt, clients
    /// keep streaming (Redis is not on the event path).
    #[tokio::test]
    async fn redis_flushed_and_replaced_under_load() {
        let name = "redis emptied";
        let Some(mut c) = NetCluster::start(NetOpts::default()).await else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        c.flushall().await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        let before = w.answers();
        let t0 = Instant::now();
        c.start_redis().await;
        while !w.all_answered(1) || w.answers() < before + 2 * sids.len() {
            assert!(
                t0.elapsed() < BOUND,
                "[{name}] no answers after the replacement{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resumed = t0.elapsed();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let v = finish(&c, name, &sids, w).await;
        // Ownership is known again for every conversation.
        let own = owners(&c, &sids).await;
        assert!(own.iter().all(Option::is_some), "[{name}] owners {own:?}");
        println!(
            "[{name}] FLUSHALL, then an empty Redis: answers again {} after the replacement; longest answer wait {}",
            secs(resumed),
            secs(v.max_answer)
        );
        assert!(v.max_answer <= BOUND, "[{name}] {v}");
    }

    /// Row 9: wall-clock jumps of ±30 s on every worker (libfaketime), then on the Redis host.
    /// Leases are timed on the monotonic clock and by Redis, so a worker's jump changes nothing
    /// (no failover). Redis cannot run under libfaketime, so its +30 s jump is applied as what it
    /// does — every lease expires at once — then -30 s; sessions may move, but two workers never
    /// both write (C3) and nothing is lost.
    #[tokio::test]
    async fn clock_jumps_on_workers_and_redis() {
        let name = "clock jumps";
        let Some(c) = NetCluster::start(NetOpts {
            faketime: true,
            ..NetOpts::default()
        })
        .await
        else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        let before = owners(&c, &sids).await;
        for offset in ["+30s", "-30s", "+0"] {
            for wk in 0..3 {
                c.set_clock(&worker_host(wk), offset);
            }
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        let after = owners(&c, &sids).await;
        assert_eq!(
            before,
            after,
            "[{name}] a worker's clock jump moved sessions{}",
            c.logs()
        );
        let answers = w.answers();
        let expired = c.redis_clock_jump(30).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        c.redis_clock_jump(-30).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            w.answers() > answers,
            "[{name}] no answers after Redis' jump"
        );
        let v = finish(&c, name, &sids, w).await;
        // The jumps took effect: the workers' event timestamps went back in time at the -30 s.
        let events = c.all_events(&sids[0]).await;
        let stamps: Vec<&str> = events
            .iter()
            .filter_map(|e| e["timestamp"].as_str())
            .collect();
        assert!(
            stamps.windows(2).any(|w| w[0] > w[1]),
            "[{name}] the workers' clocks never jumped back: {stamps:?}"
        );
        let moved = owners(&c, &sids)
            .await
            .iter()
            .zip(&after)
            .filter(|(a, b)| a != b)
            .count();
        println!(
            "[{name}] workers ±30 s: 0 of {} sessions moved; Redis +30 s: {expired} keys expired, {moved} sessions moved; longest answer wait {}",
            sids.len(),
            secs(v.max_answer)
        );
        assert!(v.max_answer <= BOUND, "[{name}] {v}");
    }

    /// nats-server before 2.9.21 does not serialize fenced appends in a cluster (nats-server#4320);
    /// Debian 12's is 2.9.10. A worker pointed at such a cluster refuses to start, naming why,
    /// instead of running with a fence that two owners can both pass.
    #[tokio::test]
    async fn worker_refuses_a_cluster_whose_nats_cannot_fence() {
        let old = match tests::proc::find_system_bin("nats-server", &["/usr/sbin/nats-server"]) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let version = std::process::Command::new(&old)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let v = version.trim_start_matches("nats-server: v");
        if shared::store::serializes_fenced_appends(v) {
            println!("SKIP: the machine's nats-server ({version}) fences correctly in a cluster");
            return;
        }
        let Some(c) = NetCluster::start(NetOpts {
            workers: 0,
            gateways: 0,
            nats_bin: Some(old),
            ..NetOpts::default()
        })
        .await
        else {
            return;
        };
        let mut p = c.spawn_worker(0, Vec::new());
        let status = p.wait_exit(Duration::from_secs(60)).await;
        let log = p.log();
        assert!(
            status.is_some_and(|s| !s.success()),
            "the worker ran against {version}: {status:?}\n{log}"
        );
        assert!(log.contains("nats-server#4320"), "{log}");
        println!("[old nats] worker refused nats-server {v} in a cluster");
    }

    /// One nemesis action of the mixed soak.
    #[derive(Debug, Clone, Copy)]
    enum Fault {
        KillWorker,
        PauseWorker,
        KillNats,
        IsolateNats,
        WorkerRedisCut,
        WorkerNatsCut,
        GatewayNatsCut,
        IsolateGateway,
        KillGateway,
        FlushRedis,
        LossyWorker,
        SlowGateway,
        WorkerClock,
        RedisClock,
    }

    const FAULTS: [Fault; 14] = [
        Fault::KillWorker,
        Fault::PauseWorker,
        Fault::KillNats,
        Fault::IsolateNats,
        Fault::WorkerRedisCut,
        Fault::WorkerNatsCut,
        Fault::GatewayNatsCut,
        Fault::IsolateGateway,
        Fault::KillGateway,
        Fault::FlushRedis,
        Fault::LossyWorker,
        Fault::SlowGateway,
        Fault::WorkerClock,
        Fault::RedisClock,
    ];

    fn env_u64(name: &str, default: u64) -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// Row 20: a mixed nemesis with a fixed seed while clients talk: one fault at a time (kill,
    /// pause, partitions of every kind, node loss, lossy and slow links, Redis amnesia, clock
    /// jumps), each held 4-10 s, healed, then a pause. Then every conversation is checked. 3
    /// minutes by default; `OH_NEMESIS_SECONDS=1800` for the long run, `OH_NEMESIS_SEED` to vary
    /// it, `OH_NEMESIS_REPORT=path` to write the report (Markdown; the 30-minute one is
    /// `bench/nemesis-soak.md`).
    #[tokio::test]
    async fn mixed_nemesis_soak() {
        use rand::{Rng, SeedableRng};
        let name = "mixed nemesis";
        let seconds = env_u64("OH_NEMESIS_SECONDS", 180);
        let seed = env_u64("OH_NEMESIS_SEED", 11);
        let Some(mut c) = NetCluster::start(NetOpts {
            faketime: true,
            ..NetOpts::default()
        })
        .await
        else {
            return;
        };
        let sids = sessions(&c, 8).await;
        let w = workload(&c, &sids);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let t0 = Instant::now();
        let mut log: Vec<String> = Vec::new();
        while t0.elapsed() < Duration::from_secs(seconds) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(2000..5000))).await;
            let fault = FAULTS[rng.random_range(0..FAULTS.len())];
            let hold = Duration::from_millis(rng.random_range(4000..10_000));
            let wk = rng.random_range(0..3);
            let node = rng.random_range(0..3);
            let gw = rng.random_range(0..2);
            let at = t0.elapsed().as_secs();
            let what = match fault {
                Fault::KillWorker => {
                    if let Some(mut p) = c.workers[wk].take() {
                        p.kill9().await;
                    }
                    tokio::time::sleep(hold).await;
                    c.start_worker(wk, Vec::new()).await;
                    format!("kill -9 worker w{wk}, restarted after {}", secs(hold))
                }
                Fault::PauseWorker => {
                    let p = c.worker(wk);
                    p.signal(tests::proc::SIGSTOP).expect("SIGSTOP");
                    tokio::time::sleep(hold).await;
                    c.worker(wk).signal(tests::proc::SIGCONT).expect("SIGCONT");
                    format!("SIGSTOP worker w{wk} for {}", secs(hold))
                }
                Fault::KillNats => {
                    c.kill_nats(node).await;
                    tokio::time::sleep(hold).await;
                    c.restart_nats(node).await;
                    format!(
                        "kill -9 {}, restarted after {}",
                        nats_host(node),
                        secs(hold)
                    )
                }
                Fault::IsolateNats => {
                    c.net.isolate(&nats_host(node));
                    tokio::time::sleep(hold).await;
                    format!("isolate {} for {}", nats_host(node), secs(hold))
                }
                Fault::WorkerRedisCut => {
                    c.net.cut_both(&worker_host(wk), "redis");
                    tokio::time::sleep(hold).await;
                    format!("cut w{wk} <-> redis for {}", secs(hold))
                }
                Fault::WorkerNatsCut => {
                    for n in 0..3 {
                        c.net.cut_both(&worker_host(wk), &nats_host(n));
                    }
                    tokio::time::sleep(hold).await;
                    format!("cut w{wk} <-> NATS for {}", secs(hold))
                }
                Fault::GatewayNatsCut => {
                    for n in 0..3 {
                        c.net.cut(&nats_host(n), &gateway_host(gw));
                    }
                    tokio::time::sleep(hold).await;
                    format!("cut NATS -> g{} (one way) for {}", gw + 1, secs(hold))
                }
                Fault::IsolateGateway => {
                    c.net.isolate(&gateway_host(gw));
                    tokio::time::sleep(hold).await;
                    format!("isolate g{} for {}", gw + 1, secs(hold))
                }
                Fault::KillGateway => {
                    if let Some(mut p) = c.gateways[gw].take() {
                        p.kill9().await;
                    }
                    tokio::time::sleep(hold).await;
                    c.start_gateway(gw).await;
                    format!("kill -9 g{}, restarted after {}", gw + 1, secs(hold))
                }
                Fault::FlushRedis => {
                    c.flushall().await;
                    "FLUSHALL on Redis".to_owned()
                }
                Fault::LossyWorker => {
                    c.net.loss(&worker_host(wk), 20);
                    tokio::time::sleep(hold).await;
                    format!("20% packet loss into w{wk} for {}", secs(hold))
                }
                Fault::SlowGateway => {
                    c.net.slow(&gateway_host(gw), Some(256));
                    tokio::time::sleep(hold).await;
                    c.net.slow(&gateway_host(gw), None);
                    format!("g{} sends at 256 kbit/s for {}", gw + 1, secs(hold))
                }
                Fault::WorkerClock => {
                    let off = if rng.random_bool(0.5) { "+30s" } else { "-30s" };
                    c.set_clock(&worker_host(wk), off);
                    tokio::time::sleep(hold).await;
                    c.set_clock(&worker_host(wk), "+0");
                    format!("w{wk} wall clock {off} for {}", secs(hold))
                }
                Fault::RedisClock => {
                    let n = c.redis_clock_jump(30).await;
                    format!("Redis clock +30 s ({n} keys expired)")
                }
            };
            c.net.heal_all();
            eprintln!("nemesis {at:>5}s: {what}");
            log.push(format!("{at:>5} s: {what}"));
        }
        c.net.heal_all();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let histories = w.stop().await;
        let stored = c.read_stored(&sids).await;
        let v = check(&histories, &stored);
        let report = format!(
            "# Mixed-nemesis soak (issue 11, fault plan row 20)\n\n\
         Command: `OH_NEMESIS_SECONDS={seconds} OH_NEMESIS_SEED={seed} cargo test -p tests --test partitions mixed_nemesis_soak -- --nocapture`\n\n\
         Deployment: 3 nats-server nodes (JetStream cluster, every stream R3), Redis, 2 gateways, 3 workers (echo agent, lease TTL 3 s), each on its own network namespace; {} clients, one per conversation, 150 ms between messages.\n\n\
         - duration: {} s, seed {seed}, faults: {}\n- result: {v}\n- verdict: {}\n\n## Faults\n\n```\n{}\n```\n",
            sids.len(),
            t0.elapsed().as_secs(),
            log.len(),
            if v.clean() && v.acked > 0 {
                "PASS"
            } else {
                "FAIL"
            },
            log.join("\n")
        );
        println!("{report}");
        if let Ok(path) = std::env::var("OH_NEMESIS_REPORT") {
            std::fs::write(&path, &report).expect("write the report");
        }
        assert!(v.clean(), "[{name}] {v}{}", c.logs());
        assert!(v.acked > 0, "[{name}] nothing acknowledged");
        assert!(v.max_answer <= Duration::from_secs(60), "[{name}] {v}");
    }

    /// Row 13: 1,000 clients reconnect at once, each to a random gateway with a random cursor into
    /// one of 20 conversations: each receives exactly the replay its cursor asks for (C2), and
    /// the JetStream consumers the replays used are gone afterwards.
    #[tokio::test]
    async fn thousand_clients_reconnect_at_once_with_random_cursors() {
        use rand::{Rng, SeedableRng};
        use shared::event::Event;
        use tests::check::{Extent, expected_ids, verify_connection};
        use tests::sio::{ConnectOpts, SioClient};
        let name = "reconnect storm";
        // Every client is user alice: lift the per-user socket cap (a limits test, not this one).
        let Some(c) = NetCluster::start(NetOpts {
            gateway_env: vec![("OH_MAX_SOCKETS_PER_USER", "5000".to_owned())],
            ..NetOpts::default()
        })
        .await
        else {
            return;
        };
        let sids = sessions(&c, 20).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(Duration::from_secs(6)).await;
        finish(&c, "reconnect storm: history", &sids, w).await;
        // The last turn's closing state change lands after its answer.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stored = c.read_stored(&sids).await;
        let logs: Vec<Vec<Event>> = sids
            .iter()
            .map(|s| {
                stored[s]
                    .events
                    .iter()
                    .map(|e| Event::from_value(e.clone()).expect("event"))
                    .collect()
            })
            .collect();
        let baseline = c.consumer_count("events").await.expect("consumer count");
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let n = 1000;
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let k = rng.random_range(0..sids.len());
            let last = logs[k].len() as i64 - 1;
            let cursor = rng.random_range(-1..=last);
            let url = c.url(rng.random_range(0..2));
            let sid = sids[k].clone();
            let want = expected_ids(&logs[k], cursor, last).len();
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let o = ConnectOpts::new(url)
                    .query("conversation_id", sid)
                    .query("latest_event_id", cursor.to_string())
                    .header("Authorization", format!("Bearer {TOKEN}"))
                    .timeout(Duration::from_secs(30));
                let mut sock = SioClient::connect(o).await.expect("connect");
                let mut got = Vec::new();
                let mut errors = Vec::new();
                while got.len() < want && started.elapsed() < Duration::from_secs(30) {
                    if let Ok((ev, v)) = sock.next_event(Duration::from_secs(1)).await
                        && ev == "oh_event"
                    {
                        match v["id"].as_u64() {
                            Some(id) => got.push(id),
                            None => errors.push(v.to_string()),
                        }
                    }
                }
                let took = started.elapsed();
                // Nothing more may come after the replay.
                if let Ok((ev, v)) = sock.next_event(Duration::from_millis(200)).await
                    && ev == "oh_event"
                {
                    got.push(v["id"].as_u64().unwrap_or(u64::MAX));
                }
                sock.close().await;
                (k, cursor, got, errors, took)
            }));
        }
        let mut took = Vec::new();
        let mut bad = Vec::new();
        for t in tasks {
            let (k, cursor, got, errors, d) = t.await.expect("client task");
            took.push(d);
            if !errors.is_empty() {
                bad.push(format!("{} after {cursor}: errors {errors:?}", sids[k]));
            } else if let Err(v) = verify_connection(&logs[k], cursor, None, &got, Extent::Complete)
            {
                bad.push(format!("{} after {cursor}: {v}", sids[k]));
            }
        }
        let all = t0.elapsed();
        took.sort();
        let pct = |p: usize| took[(took.len() * p / 100).min(took.len() - 1)];
        assert!(
            bad.is_empty(),
            "[{name}] {} of {n} replays wrong: {:?}{}",
            bad.len(),
            &bad[..bad.len().min(5)],
            c.logs()
        );
        // Replays leave no consumer behind.
        let t1 = Instant::now();
        let after = loop {
            let now = c.consumer_count("events").await.expect("consumer count");
            if now <= baseline || t1.elapsed() > Duration::from_secs(30) {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(
            after <= baseline,
            "[{name}] consumers {baseline} before, {after} after"
        );
        // How many reads timed out under the storm and were tried again (reported).
        let mut retries = 0.0;
        for g in 0..2 {
            if let Ok(r) = tests::http_client()
                .get(format!("{}/metrics", c.url(g)))
                .send()
                .await
                && let Ok(text) = r.text().await
            {
                retries += text
                    .lines()
                    .filter(|l| l.starts_with("oh_gateway_log_read_retries_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>();
            }
        }
        println!(
            "[{name}] {n} clients, 20 conversations, random cursors and gateways: all exact; resume p50 {}, p99 {}, max {}; all done in {}; event-stream consumers {baseline} before, {after} after; log reads retried {retries}",
            secs(pct(50)),
            secs(pct(99)),
            secs(took[took.len() - 1]),
            secs(all)
        );
    }

    /// Row 18: the cluster's storage runs out (another stream fills every node's
    /// `max_file_store`) under load: sends are refused with an error, never acknowledged without a
    /// stored copy; once space is freed every conversation answers again.
    #[tokio::test]
    async fn storage_exhaustion_refuses_then_recovers() {
        let name = "storage full";
        let queue = vec![("OH_QUEUE_MAX_MIB", "4".to_owned())];
        let Some(c) = NetCluster::start(NetOpts {
            nats_max_file_store: 96 << 20,
            worker_env: queue.clone(),
            gateway_env: queue,
            ..NetOpts::default()
        })
        .await
        else {
            return;
        };
        let sids = sessions(&c, 4).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        // Fill the disk with a stream of our own (R3, like the deployment's).
        let nats = c.admin_nats().await;
        let js = async_nats::jetstream::new(nats);
        let filler = format!("{}_filler", c.namespace);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: filler.clone(),
            subjects: vec![format!("filler.{}", c.namespace)],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("create the filler stream");
        let chunk = bytes::Bytes::from(vec![7u8; 256 * 1024]);
        let t0 = Instant::now();
        let mut filled = 0usize;
        let refusal = loop {
            let r = js
                .publish(format!("filler.{}", c.namespace), chunk.clone())
                .await;
            let r = match r {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match r {
                Ok(()) => filled += chunk.len(),
                Err(e) => break e,
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "[{name}] never full"
            );
        };
        println!(
            "[{name}] filler refused after {} MiB: {refusal}",
            filled >> 20
        );
        let before = w.answers();
        tokio::time::sleep(Duration::from_secs(8)).await;
        let during = w.answers() - before;
        // Free the space.
        // A node over its limit steps its JetStream down for a while: the delete is retried.
        let t1 = Instant::now();
        loop {
            match js.delete_stream(&filler).await {
                Ok(_) => break,
                // An earlier attempt whose answer timed out did it.
                Err(e) if e.to_string().contains("stream not found") => break,
                Err(e) => {
                    assert!(
                        t1.elapsed() < Duration::from_secs(120),
                        "[{name}] the filler could not be deleted: {e}{}",
                        c.logs()
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        println!("[{name}] filler deleted after {}", secs(t1.elapsed()));
        let freed = Instant::now();
        let mark = w.answers();
        while w.answers() < mark + 2 * sids.len() {
            assert!(
                freed.elapsed() < BOUND,
                "[{name}] no recovery after space was freed{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let recovered = freed.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let histories = w.stop().await;
        let refused: usize = histories
            .iter()
            .flat_map(|h| &h.sent)
            .filter(|m| !m.errors.is_empty())
            .count();
        let stored = c.read_stored(&sids).await;
        let v = check(&histories, &stored);
        println!("[{name}] {v}");
        assert!(v.clean(), "[{name}] {v}{}", c.logs());
        assert!(
            refused > 0,
            "[{name}] no send was refused while the disk was full"
        );
        println!(
            "[{name}] {during} answers while full, {refused} sends refused with an error first; answers again {} after space was freed",
            secs(recovered)
        );
    }

    /// Row 6: NATS unreachable for longer than the duplicate window, then a retry storm. Acks from
    /// NATS to a gateway are cut (its publishes are stored, their answers lost) for 10 s with a
    /// 2 s window: the clients' retries — same msg ids, through either gateway — are stored again
    /// by JetStream, and the owner recognises them in the log and applies each action once.
    #[tokio::test]
    async fn retries_after_the_duplicate_window_are_applied_once() {
        let name = "beyond the duplicate window";
        let window = vec![("OH_DUPLICATE_WINDOW_S", "2".to_owned())];
        let Some(c) = NetCluster::start(NetOpts {
            worker_env: window.clone(),
            gateway_env: window,
            ..NetOpts::default()
        })
        .await
        else {
            return;
        };
        let sids = sessions(&c, 6).await;
        let w = workload(&c, &sids);
        tokio::time::sleep(WARM).await;
        for n in 0..3 {
            c.net.cut(&nats_host(n), &gateway_host(0));
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        c.net.heal_all();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let v = finish(&c, name, &sids, w).await;
        let caught: usize = c
            .workers
            .iter()
            .flatten()
            .map(|p| {
                p.log()
                    .matches("action already applied (client msg id)")
                    .count()
            })
            .sum();
        println!(
            "[{name}] {caught} retries stored again after the 2 s window were recognised in the log; longest answer wait {}",
            secs(v.max_answer)
        );
        assert!(
            caught > 0,
            "[{name}] no retry outlived the window: the scenario did not happen{}",
            c.logs()
        );
        assert!(v.max_answer <= BOUND, "[{name}] {v}");
    }
}
