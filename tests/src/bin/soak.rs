//! Soak test with a nemesis (outside CI): a whole deployment of its own (nats-server,
//! redis-server, gateways and workers from the debug or `OH_TEST_PROFILE` build), clients that
//! keep talking, and a nemesis that kill -9s a random worker or gateway every 20-40 s and
//! starts a replacement. At the end every conversation is checked: each acknowledged message
//! stored and answered exactly once, every connection's events an exact replay-then-live
//! sequence of the log (no loss, no duplicate, no reordering), epochs never interleaved, and no
//! conversation stuck running.
//!
//! `cargo build --bins && cargo run -p tests --bin soak` with, optionally,
//! `OH_SOAK_SECONDS` (600), `OH_SOAK_CONVERSATIONS` (12), `OH_SOAK_THINK_MS` (100, pause
//! between a client's messages), `OH_SOAK_SEED`. Prints a report
//! (Markdown) and exits non-zero if any check fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::HashMap;

use shared::event::Event;
use tests::check::{Extent, read_log, stored_gaps, verify_connection, verify_log};
use tests::cluster::{Cluster, ClusterOpts, ids, is_echo};
use tests::sio::SioError;
use tokio::sync::RwLock;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One client's history: its connections (cursor used, events received) and what it sent.
#[derive(Default)]
struct History {
    connections: Vec<(i64, Vec<Value>)>,
    sent: Vec<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = env_u64("OH_SOAK_SECONDS", 600);
    let n = env_u64("OH_SOAK_CONVERSATIONS", 12) as usize;
    let seed = env_u64("OH_SOAK_SEED", 7);
    let cluster = Cluster::start(ClusterOpts {
        gateways: 2,
        workers: 3,
        lease_ttl_ms: 2000,
        ..ClusterOpts::default()
    })
    .await;
    let cluster = Arc::new(RwLock::new(cluster));
    let mut sids = Vec::new();
    for _ in 0..n {
        sids.push(cluster.read().await.create(0, None, None).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut clients = Vec::new();
    for (i, sid) in sids.iter().enumerate() {
        let (cluster, stop, sid) = (cluster.clone(), stop.clone(), sid.clone());
        clients.push(tokio::spawn(async move {
            client(i, &cluster, &sid, &stop).await
        }));
    }
    // The nemesis.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = Vec::new();
    let deadline = started + Duration::from_secs(seconds);
    loop {
        let wait = Duration::from_secs(rng.random_range(20..=40));
        if Instant::now() + wait >= deadline {
            tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
            break;
        }
        tokio::time::sleep(wait).await;
        let mut c = cluster.write().await;
        let alive_workers: Vec<usize> = (0..c.workers.len())
            .filter(|i| c.workers[*i].try_exit_status().is_none())
            .collect();
        let alive_gateways: Vec<usize> = (0..c.gateways.len())
            .filter(|i| c.gateways[*i].try_exit_status().is_none())
            .collect();
        let kill_gateway = rng.random_bool(0.4) && alive_gateways.len() > 1;
        if kill_gateway {
            let g = alive_gateways[rng.random_range(0..alive_gateways.len())];
            c.gateways[g].kill9().await;
            c.add_gateway().await;
            kills.push(format!(
                "{:>4}s kill -9 gateway{g}",
                started.elapsed().as_secs()
            ));
        } else {
            let w = alive_workers[rng.random_range(0..alive_workers.len())];
            c.workers[w].kill9().await;
            c.add_worker().await;
            kills.push(format!(
                "{:>4}s kill -9 worker w{w}",
                started.elapsed().as_secs()
            ));
        }
        eprintln!("nemesis: {}", kills.last().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let mut histories = Vec::new();
    for c in clients {
        histories.push(c.await.expect("client task"));
    }
    // Checks.
    let c = cluster.read().await;
    let (mut sent, mut lost, mut dup, mut reordered, mut stuck, mut epoch_faults) =
        (0, 0, 0, 0, 0, 0);
    for (sid, h) in sids.iter().zip(&histories) {
        let stored = c.all_events(alive_gateway(&c), sid, None).await;
        // Exactly once: count every user message and every echo in one pass.
        let mut users: HashMap<&str, usize> = HashMap::new();
        let mut echoes: HashMap<&str, usize> = HashMap::new();
        for e in &stored {
            if e["action"] != "message" {
                continue;
            }
            let content = e["args"]["content"].as_str().unwrap_or_default();
            match e["source"].as_str() {
                Some("user") => *users.entry(content).or_default() += 1,
                Some("agent") => {
                    if let Some(t) = content.strip_prefix("echo: ") {
                        *echoes.entry(t).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        for text in &h.sent {
            sent += 1;
            let count = |m: &HashMap<&str, usize>| m.get(text.as_str()).copied().unwrap_or(0);
            match (count(&users), count(&echoes)) {
                (1, 1) => {}
                (u, e) if u == 0 || e == 0 => lost += 1,
                _ => dup += 1,
            }
        }
        let events: Vec<Event> = stored
            .iter()
            .filter_map(|v| Event::from_value(v.clone()).ok())
            .collect();
        for (latest, got) in &h.connections {
            let verdict = if events.len() == stored.len() && stored_gaps(&events) == 0 {
                verify_connection(&events, *latest, None, &ids(got), Extent::Prefix)
                    .map_err(|v| v.to_string())
            } else {
                Err("the stored log does not parse or has gaps".to_owned())
            };
            if let Err(why) = verdict {
                eprintln!("{sid}: connection after {latest}: {why}");
                reordered += 1;
            }
        }
        if let Err(v) = verify_log(&read_log(&c, sid).await) {
            eprintln!("{sid}: raw log: {v}");
            epoch_faults += 1;
        }
        let info = c.info(alive_gateway(&c), sid, None).await;
        if info["agent_state"] == "running" {
            stuck += 1;
        }
    }
    let connections: usize = histories.iter().map(|h| h.connections.len()).sum();
    println!("## Soak report\n");
    println!(
        "- duration: {} s, conversations: {n}, seed: {seed}",
        started.elapsed().as_secs()
    );
    println!("- nemesis actions: {}", kills.len());
    for k in &kills {
        println!("  - {k}");
    }
    println!("- messages sent and acknowledged: {sent}; client connections: {connections}");
    println!(
        "- lost: {lost}, duplicated: {dup}, reordered/gapped connections: {reordered}, epoch faults: {epoch_faults}, stuck running: {stuck}"
    );
    let ok = lost == 0 && dup == 0 && reordered == 0 && epoch_faults == 0 && stuck == 0 && sent > 0;
    println!("- result: {}", if ok { "PASS" } else { "FAIL" });
    // `exit` runs no destructors: stop the deployment's processes first (every client task
    // holding the cluster has ended).
    drop(c);
    match Arc::try_unwrap(cluster) {
        Ok(cluster) => drop(cluster.into_inner()),
        Err(_) => eprintln!("soak: deployment still shared; its processes may outlive us"),
    }
    std::process::exit(if ok { 0 } else { 1 });
}

fn alive_gateway(c: &Cluster) -> usize {
    (0..c.gateways.len())
        .rev()
        .find(|i| {
            std::path::Path::new(&format!("/proc/{}", c.gateways[*i].pid().unwrap_or(0))).exists()
        })
        .unwrap_or(0)
}

/// One client: talks until `stop`, reconnecting (to any live gateway, from its newest id)
/// whenever its gateway dies.
async fn client(i: usize, cluster: &RwLock<Cluster>, sid: &str, stop: &AtomicBool) -> History {
    let think = Duration::from_millis(env_u64("OH_SOAK_THINK_MS", 100));
    let mut h = History::default();
    let mut k = 0;
    let mut latest: i64 = -1;
    'connect: while !stop.load(Ordering::Relaxed) {
        let conn = {
            let c = cluster.read().await;
            let g = alive_gateway(&c);
            c.connect(g, sid, Some(latest), None).await
        };
        let mut sock = match conn {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        h.connections.push((latest, Vec::new()));
        let got = &mut h.connections.last_mut().unwrap().1;
        loop {
            if stop.load(Ordering::Relaxed) {
                break 'connect;
            }
            let text = format!("c{i} m{k}");
            let msg_id = format!("c{i}m{k}");
            // Sending: retried (same id) until stored; the gateway may die meanwhile, and
            // then the retry goes through another gateway (same id: stored once).
            if !send_stored(&sock, &text, &msg_id).await {
                latest = ids(got).into_iter().max().map_or(latest, |m| m as i64);
                continue 'connect;
            }
            if !h.sent.contains(&text) {
                h.sent.push(text.clone());
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match sock
                    .next_event(deadline.saturating_duration_since(Instant::now()))
                    .await
                {
                    Ok((name, ev)) if name == "oh_event" => {
                        let done = is_echo(&ev, &text);
                        got.push(ev);
                        if done {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(SioError::Disconnected) | Err(SioError::Timeout(_)) => {
                        latest = ids(got).into_iter().max().map_or(latest, |m| m as i64);
                        continue 'connect;
                    }
                    Err(_) => {}
                }
            }
            k += 1;
            tokio::time::sleep(think).await;
        }
    }
    h
}

/// Sends until JetStream stored it (ack `success`); `false` if the connection is gone.
async fn send_stored(sock: &tests::sio::SioClient, text: &str, msg_id: &str) -> bool {
    let payload =
        serde_json::json!({"action": "message", "args": {"content": text}, "msg_id": msg_id});
    for _ in 0..50 {
        if !sock.is_connected() {
            return false;
        }
        match sock
            .emit_with_ack("oh_user_action", &payload, Duration::from_secs(8))
            .await
        {
            Ok(acks) if acks.first().is_some_and(|a| a["success"] == true) => return true,
            Err(SioError::Disconnected) => return false,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    false
}
