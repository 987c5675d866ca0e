//! Agent code is untrusted: a scripted LLM drives the real CodeAct agent in the real worker
//! binary through every attack on the host and the control plane, and each one is refused or
//! contained by the session's sandbox, with the observation saying so, while a second
//! session keeps answering within its usual latency.
//!
//! CI runs as root with bubblewrap installed (`deploy/setup.sh`), so these tests always run
//! there; a worker that cannot sandbox refuses to start, which fails them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::cluster::{Cluster, ClusterOpts, events_until, is_state};
use tests::llm::{Reply, ScriptedLlm};
use tests::proc::{Proc, bin_path};
use tests::sio::SioClient;

const T: Duration = Duration::from_secs(60);
const SECRET: &str = "sk-sandbox-secret-4711";

async fn cluster(llm: &ScriptedLlm, ws: &tempfile::TempDir) -> Cluster {
    Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![
            ("OH_LLM_BASE_URL", llm.base_url()),
            ("OH_LLM_MODEL", "test-model".to_owned()),
            ("OH_LLM_API_KEY", SECRET.to_owned()),
            ("OH_WORKSPACE_ROOT", ws.path().display().to_string()),
            ("OH_SANDBOX_MEMORY_MIB", "64".to_owned()),
            ("OH_SANDBOX_PIDS", "64".to_owned()),
            ("OH_SANDBOX_CPUS", "0.5".to_owned()),
        ],
        ..ClusterOpts::default()
    })
    .await
}

fn bash(command: &str) -> Reply {
    Reply::tool("execute_bash", &json!({ "command": command }))
}

/// The `run` observations of `evs`, in order.
fn runs(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .filter(|e| e["observation"] == "run")
        .map(|e| {
            let m = &e["extras"]["metadata"];
            format!(
                "{}{}{}",
                m["prefix"].as_str().unwrap_or(""),
                e["content"].as_str().unwrap_or(""),
                m["suffix"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// Host processes whose command line contains `needle`.
fn host_procs(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|b| {
                String::from_utf8_lossy(&b)
                    .replace('\0', " ")
                    .contains(needle)
            })
        })
        .count()
}

/// Control groups named after `sid` (the sandboxes of that session), in every hierarchy.
fn cgroups_of(sid: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir {
                continue;
            }
            if name.starts_with(sid) {
                found.push(e.path().display().to_string());
            } else if dir.components().count() < 8 {
                stack.push(e.path());
            }
        }
    }
    found
}

/// One turn of `bob`: a command in its own sandbox, then a text answer; the time from the
/// message to the answer.
async fn bob_turn(llm: &ScriptedLlm, bob: &mut SioClient, i: usize) -> Duration {
    llm.push(bash(&format!("echo bob-{i}")));
    llm.push(Reply::text(format!("bob answer {i}")));
    let t0 = Instant::now();
    bob.emit(
        "oh_user_action",
        &json!({"action": "message", "args": {"content": format!("turn {i}")}}),
    )
    .await
    .unwrap();
    let want = format!("bob answer {i}");
    let got = events_until(bob, T, |e| {
        e["action"] == "message" && e["source"] == "agent" && e["args"]["content"] == want
    })
    .await;
    let outs = runs(&got);
    assert!(
        outs.iter().any(|o| o.starts_with(&format!("bob-{i}"))),
        "{outs:?}"
    );
    t0.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_of_agent_code_is_refused_or_contained() {
    let llm = ScriptedLlm::start(Vec::new()).await;
    let ws = tempfile::tempdir().unwrap();
    let c = cluster(&llm, &ws).await;

    // Bob: a session with a file of its own, and its usual latency.
    llm.push(bash("echo bob-secret > bob.txt"));
    llm.push(Reply::text("bob ready"));
    let bob_sid = c.create(0, Some("set up"), None).await;
    let mut bob = c.connect(0, &bob_sid, None, None).await.unwrap();
    events_until(&mut bob, T, |e| {
        e["action"] == "message" && e["args"]["content"] == "bob ready"
    })
    .await;
    let mut baseline = Vec::new();
    for i in 0..5 {
        baseline.push(bob_turn(&llm, &mut bob, i).await);
    }

    // Alice's agent tries everything.
    let nats = c.nats.port();
    let redis = c.redis.port();
    let gateway = c.gateway_port(0);
    let bob_host = ws.path().join(&bob_sid).display().to_string();
    let attacks = [
        // 0: the worker's environment and /proc.
        "env | grep -c OH_; cat /proc/1/environ /proc/self/environ | tr '\\0' '\\n' | grep -c OH_; ls /proc | grep -c '^[0-9]'; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c sk-".to_owned(),
        // 1: the control plane and every loopback service of the host.
        format!(
            "for p in {nats} {redis} {gateway}; do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>&1 && echo OPEN-$p; done; echo probed"
        ),
        // 2: another session's workspace and processes.
        format!("cat {bob_host}/bob.txt; ls {bob_host}; ls /proc/*/cwd 2>/dev/null | grep -c bob"),
        // 3: writing outside /workspace.
        "touch /etc/pwned /usr/bin/pwned /pwned; echo ok > /workspace/inside && cat /workspace/inside".to_owned(),
        // 4: a setsid daemon meant to outlive the session.
        "(setsid sleep 4242 >/dev/null 2>&1 &); (nohup setsid sleep 4243 >/dev/null 2>&1 &); echo started".to_owned(),
        // 5: a memory hog (limit 64 MiB).
        "head -c 400M /dev/zero | tail -n 1 > /dev/null; echo rc=$?".to_owned(),
        // 6: a fork bomb (limit 64 processes, half a core); it stays behind, running.
        "b(){ b|b& }; b".to_owned(),
    ];
    for a in &attacks {
        llm.push(bash(a));
    }
    llm.push(Reply::tool("finish", &json!({"message": "attacks done"})));
    let alice_sid = c.create(0, Some("attack"), None).await;
    let mut alice = c.connect(0, &alice_sid, None, None).await.unwrap();
    let got = events_until(&mut alice, T, |e| is_state(e, "finished")).await;
    let outs = runs(&got);
    assert_eq!(outs.len(), attacks.len(), "{outs:#?}");
    for (i, o) in outs.iter().enumerate() {
        eprintln!("attack {i}: {}", o.replace('\n', " | "));
    }

    // 0: no variable of the worker, no secret, only the sandbox's processes.
    let lines: Vec<&str> = outs[0].lines().collect();
    assert_eq!(&lines[..2], ["0", "0"], "{}", outs[0]);
    let procs: usize = lines[2].parse().unwrap();
    assert!(
        procs <= 8,
        "the sandbox sees {procs} processes: {}",
        outs[0]
    );
    assert_eq!(lines[3], "0", "{}", outs[0]);
    // 1: every port refused, none open.
    assert!(!outs[1].contains("OPEN-"), "{}", outs[1]);
    assert_eq!(
        outs[1].matches("Connection refused").count(),
        6,
        "{}",
        outs[1]
    );
    // 2: bob's files and processes are not there.
    assert!(!outs[2].contains("bob-secret"), "{}", outs[2]);
    assert!(outs[2].contains("No such file or directory"), "{}", outs[2]);
    // 3: read-only everywhere but the workspace.
    for p in ["/etc/pwned", "/usr/bin/pwned", "/pwned"] {
        assert!(
            outs[3].contains(&format!("'{p}': Read-only file system")),
            "{}",
            outs[3]
        );
        assert!(
            !std::path::Path::new(p).exists(),
            "{p} was written on the host"
        );
    }
    assert!(outs[3].contains("\nok"), "{}", outs[3]);
    // 4: the daemons run (for now) inside the sandbox.
    assert_eq!(host_procs("sleep 4242") + host_procs("sleep 4243"), 2);
    // 5: the hog was killed, and the observation says why.
    assert!(
        outs[5].contains("memory limit (64 MiB) was reached"),
        "{}",
        outs[5]
    );
    assert!(!outs[5].contains("rc=0"), "{}", outs[5]);
    // The secret reached no event, no log line.
    let stored = serde_json::to_string(&c.all_events(0, &alice_sid, None).await).unwrap();
    assert!(!stored.contains(SECRET));
    assert!(!c.logs().contains(SECRET), "the key was logged");

    // 6: with the bomb going off in alice's sandbox, bob answers as usual.
    let mut during = Vec::new();
    for i in 5..10 {
        during.push(bob_turn(&llm, &mut bob, i).await);
    }
    // The bomb is really going off, and held at the limit.
    let in_bomb: Vec<u64> = cgroups_of(&alice_sid)
        .iter()
        .filter_map(|g| std::fs::read_to_string(format!("{g}/pids.current")).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    assert!(
        in_bomb.iter().any(|&n| (32..=64).contains(&n)),
        "processes in alice's sandbox: {in_bomb:?}"
    );
    let (b, d) = (median(baseline), median(during));
    eprintln!("bob's turn: median {b:?} before, {d:?} during the fork bomb");
    assert!(
        d <= b * 3 + Duration::from_millis(300),
        "bob slowed from {b:?} to {d:?}"
    );
    let metrics = reqwest::get(c.url(0) + "/healthz").await.unwrap();
    assert!(metrics.status().is_success());

    // Stopping alice kills everything her sandbox started, and its control group.
    assert!(!cgroups_of(&alice_sid).is_empty(), "no control group found");
    alice
        .emit(
            "oh_user_action",
            &json!({"action": "change_agent_state", "args": {"agent_state": "stopped"}}),
        )
        .await
        .unwrap();
    let (status, _) = c
        .post(
            0,
            &format!("/api/conversations/{alice_sid}/stop"),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = host_procs("sleep 4242") + host_procs("sleep 4243");
        let groups = cgroups_of(&alice_sid);
        if left == 0 && groups.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after stop: {left} daemons, control groups {groups:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Bob is untouched.
    assert!(bob_turn(&llm, &mut bob, 10).await < T);
}

/// A worker that cannot sandbox refuses to start, with one clear reason; `OH_SANDBOX=off`
/// is the explicit, loudly logged way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_sandbox_refuses_to_start() {
    let env = [
        ("OH_NATS_URL", "nats://127.0.0.1:1".to_owned()),
        ("OH_REDIS_URL", "redis://127.0.0.1:1".to_owned()),
        ("OH_SANDBOX_BWRAP", "/nonexistent/bwrap".to_owned()),
    ];
    let mut p = Proc::spawn("worker-nobwrap", &bin_path("worker"), &[], &env);
    let status = p
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the worker exits");
    assert!(!status.success());
    let log = p.log();
    assert!(log.contains("agent code cannot be sandboxed"), "{log}");
    assert!(log.contains("OH_SANDBOX=off"), "{log}");
}

/// `OH_SANDBOX_NETWORK=egress`: the agent reaches an allowed server through the worker's proxy
/// (plain HTTP and CONNECT), while the control plane, the metadata address and a direct
/// connection stay refused, each with the reason in the observation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_goes_through_the_proxy_and_never_reaches_the_control_plane() {
    // "The outside world": a server on 127.0.0.2, allowed by OH_SANDBOX_EGRESS_ALLOW.
    let outside = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = outside.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = outside.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = "hello-egress\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    let llm = ScriptedLlm::start(Vec::new()).await;
    let ws = tempfile::tempdir().unwrap();
    let c = Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 1,
        worker_env: vec![
            ("OH_LLM_BASE_URL", llm.base_url()),
            ("OH_WORKSPACE_ROOT", ws.path().display().to_string()),
            ("OH_SANDBOX_NETWORK", "egress".to_owned()),
            (
                "OH_SANDBOX_EGRESS_ALLOW",
                "127.0.0.2/32,127.0.0.1/32".to_owned(),
            ),
        ],
        ..ClusterOpts::default()
    })
    .await;
    let nats = c.nats.port();
    let commands = [
        format!("curl -sS -m 10 http://127.0.0.2:{port}/a"),
        format!("curl -sS -m 10 -p http://127.0.0.2:{port}/b"),
        format!("curl -sS -m 10 --noproxy '' http://127.0.0.1:{nats}/"),
        "curl -sS -m 10 http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("curl -sS -m 5 --noproxy '*' http://127.0.0.2:{port}/c; echo rc=$?"),
    ];
    for cmd in &commands {
        llm.push(bash(cmd));
    }
    llm.push(Reply::tool("finish", &json!({"message": "done"})));
    let sid = c.create(0, Some("fetch"), None).await;
    let mut a = c.connect(0, &sid, None, None).await.unwrap();
    let got = events_until(&mut a, T, |e| is_state(e, "finished")).await;
    let outs = runs(&got);
    for (i, o) in outs.iter().enumerate() {
        eprintln!("egress {i}: {}", o.replace('\n', " | "));
    }
    assert_eq!(outs.len(), commands.len(), "{outs:#?}");
    assert!(outs[0].starts_with("hello-egress"), "{}", outs[0]);
    assert!(outs[1].starts_with("hello-egress"), "{}", outs[1]);
    // The allow list names 127.0.0.1, but the control plane stays closed.
    assert!(outs[2].contains("a control-plane address"), "{}", outs[2]);
    assert!(outs[3].contains("link-local"), "{}", outs[3]);
    assert!(!outs[4].contains("hello-egress"), "{}", outs[4]);
    assert!(!outs[4].contains("rc=0"), "{}", outs[4]);
    server.abort();
}
