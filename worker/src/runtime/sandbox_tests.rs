//! The runtime inside the bubblewrap sandbox: isolation, limits and lifetime, against a real
//! `bwrap`. As root (CI) a machine that cannot sandbox fails these tests; elsewhere they are
//! skipped with a message.

use std::sync::Arc;
use std::time::Duration;

use shared::id::SessionId;
use tempfile::TempDir;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cgroup::Limits;
use super::sandbox::{Sandbox, SandboxConfig};
use super::*;

const SLOW: Duration = Duration::from_secs(30);

const LIMITS: Limits = Limits {
    memory_bytes: 256 << 20,
    pids: 64,
    cpus: 1.0,
};

/// A sandbox with `limits`, or `None` (skip) where this machine cannot sandbox and we are not
/// root.
async fn sandbox(limits: Limits) -> Option<Arc<Sandbox>> {
    let cfg = SandboxConfig {
        bwrap: None,
        uid: 65534,
        gid: 65534,
        limits,
        egress: None,
    };
    match Sandbox::new(&cfg).await {
        Ok(sb) => Some(Arc::new(sb)),
        Err(e) if !rustix::process::geteuid().is_root() => {
            eprintln!("skipped: cannot sandbox here ({e}); CI runs these tests as root");
            None
        }
        Err(e) => panic!("root must be able to sandbox (install bubblewrap): {e}"),
    }
}

async fn start(tmp: &TempDir, sb: &Arc<Sandbox>, id: &str) -> Runtime {
    let cfg = RuntimeConfig::new(tmp.path().join("ws")).with_sandbox(Some(sb.clone()));
    let session = SessionId::parse(id).expect("valid id");
    Runtime::start(&cfg, &session)
        .await
        .expect("sandboxed runtime starts")
}

async fn run(rt: &mut Runtime, command: &str) -> CmdOutput {
    let req = CmdRequest {
        command: command.to_owned(),
        is_input: false,
        timeout: Some(SLOW),
    };
    rt.run(&req, &CancellationToken::new()).await.expect("run")
}

/// Host pids whose command line contains `needle`.
fn host_pids(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (cmd.contains(needle) && process::is_alive(pid)).then_some(pid)
    })
    .collect()
}

/// Host pids whose command line contains `needle`, once there are `n` (they may still be
/// exec-ing when the command that started them returns).
async fn wait_host_pids(needle: &str, n: usize) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = host_pids(needle);
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn all_gone(pids: &[i32]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| process::is_alive(p)) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test]
async fn the_agent_sees_only_its_workspace_and_no_worker_state() {
    let Some(sb) = sandbox(LIMITS).await else {
        return;
    };
    let tmp = TempDir::new().expect("tmp");
    let mut other = start(&tmp, &sb, "sess-other").await;
    run(&mut other, "echo secret > mine.txt").await;
    let mut rt = start(&tmp, &sb, "sess-1").await;

    let o = run(&mut rt, "pwd; echo hi > a.txt && cat /workspace/a.txt").await;
    assert_eq!(o.content, "/workspace\nhi", "{o:?}");
    assert_eq!(o.cwd, "/workspace");
    let host_file = rt.workspace().join("a.txt");
    assert_eq!(
        std::fs::read_to_string(&host_file).expect("on host"),
        "hi\n"
    );

    // No variable of the worker: exactly the runtime's list.
    let o = run(&mut rt, "env | cut -d= -f1 | sort | tr '\\n' ' '").await;
    assert_eq!(
        o.content.trim(),
        "DEBIAN_FRONTEND GIT_PAGER GIT_TERMINAL_PROMPT HOME LANG PAGER PATH PWD PYTHONUNBUFFERED SHLVL TERM TMPDIR USER _",
        "{o:?}"
    );
    // Only the sandbox's own processes; the worker's are not there to read.
    let me = std::process::id();
    let o = run(
        &mut rt,
        &format!("ls /proc | grep -c '^[0-9]'; cat /proc/{me}/environ; cat /proc/1/environ | tr '\\0' ' '"),
    )
    .await;
    let count: usize = o
        .content
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .expect("count");
    assert!(count <= 6, "sandbox sees {count} processes: {o:?}");
    assert!(
        !o.content.contains("CARGO"),
        "worker environment visible: {o:?}"
    );
    // The system is read-only; other workspaces and the host's folders are not there.
    let other_host = other.workspace().display().to_string();
    let o = run(
        &mut rt,
        &format!(
            "touch /etc/x /usr/x /x; cat {other_host}/mine.txt; ls /root /work /home; echo done"
        ),
    )
    .await;
    for needle in [
        "'/etc/x': Read-only",
        "'/usr/x': Read-only",
        "'/x': Read-only",
    ] {
        assert!(o.content.contains(needle), "{needle}: {o:?}");
    }
    assert!(!o.content.contains("secret"), "{o:?}");
    assert!(o.content.contains("No such file"), "{o:?}");
    if rustix::process::geteuid().is_root() {
        let o = run(&mut rt, "id -u; head -c 1 /etc/shadow").await;
        assert!(o.content.starts_with("65534\n"), "{o:?}");
        assert!(o.content.contains("Permission denied"), "{o:?}");
    }
    // Its own /tmp.
    run(&mut rt, "echo t > /tmp/t").await;
    let o = run(&mut other, "cat /tmp/t").await;
    assert!(o.content.contains("No such file"), "{o:?}");
    rt.close().await;
    other.close().await;
}

#[tokio::test]
async fn the_host_network_and_loopback_services_are_unreachable() {
    let Some(sb) = sandbox(LIMITS).await else {
        return;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp, &sb, "sess-net").await;
    let o = run(
        &mut rt,
        &format!("(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>&1; echo rc=$?; ls /sys/class/net 2>&1 | tr '\\n' ' '"),
    )
    .await;
    assert!(o.content.contains("Connection refused"), "{o:?}");
    assert!(o.content.contains("rc=1"), "{o:?}");
    let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(accepted.is_err(), "the host's listener was reached");
    rt.close().await;
}

#[tokio::test]
async fn setsid_and_double_forked_daemons_die_with_the_session() {
    let Some(sb) = sandbox(LIMITS).await else {
        return;
    };
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp, &sb, "sess-escape").await;
    run(
        &mut rt,
        "setsid sleep 3131 & (setsid sleep 3132 &); nohup sleep 3133 >/dev/null 2>&1 & disown; echo ok",
    )
    .await;
    let mut pids = Vec::new();
    for n in ["sleep 3131", "sleep 3132", "sleep 3133"] {
        let found = wait_host_pids(n, 1).await;
        assert_eq!(found.len(), 1, "{n}: {found:?}");
        pids.extend(found);
    }
    rt.close().await;
    assert!(all_gone(&pids).await, "a daemon survived close: {pids:?}");

    // The same when the runtime is only dropped (the worker's session task ends).
    let mut rt = start(&tmp, &sb, "sess-escape2").await;
    run(&mut rt, "(setsid sleep 3134 &); echo ok").await;
    let pids = wait_host_pids("sleep 3134", 1).await;
    assert_eq!(pids.len(), 1);
    drop(rt);
    assert!(all_gone(&pids).await, "a daemon survived drop: {pids:?}");
}

#[tokio::test]
async fn a_fork_bomb_hits_the_process_limit_and_the_memory_hog_is_killed() {
    let limits = Limits {
        memory_bytes: 64 << 20,
        pids: 32,
        cpus: 1.0,
    };
    let Some(sb) = sandbox(limits).await else {
        return;
    };
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp, &sb, "sess-limits").await;
    // Bounded, so that a missing limit fails the test instead of the machine. (perl, not a
    // bash loop: bash retries a failed fork for 15 s.)
    let o = run(
        &mut rt,
        r#"perl -e '$0 = "sleep 3141"; for (1..100) { my $p = fork; if (!defined $p) { print "fork: $!\n"; last } if ($p == 0) { sleep 3141; exit } } sleep 3141' >/dev/null 2>&1 & sleep 0.5; pgrep -c -f 'sleep 3141'"#,
    )
    .await;
    let started: usize = o
        .content
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        (8..32).contains(&started),
        "the pids limit (32) did not hold: {started} processes ran: {o:?}"
    );
    assert_eq!(host_pids("sleep 3141").len(), started);
    let o = run(
        &mut rt,
        "pkill -f 'sleep 3141'; sleep 0.2; pgrep -c -f 'sleep 3141'",
    )
    .await;
    assert_eq!(o.content, "0", "{o:?}");

    let o = run(
        &mut rt,
        "head -c 400M /dev/zero | tail -n 1 > /dev/null; echo rc=$?",
    )
    .await;
    assert!(
        o.content.contains("Killed") || !o.content.contains("rc=0"),
        "a 400 MiB hog ran under a 64 MiB limit: {o:?}"
    );
    if sb.describe().contains("cgroup") {
        assert!(
            o.suffix.contains("memory limit (64 MiB)"),
            "the observation says why: {o:?}"
        );
    }
    // The session still works.
    let o = run(&mut rt, "echo still here").await;
    assert_eq!(o.content, "still here");
    rt.close().await;
}

#[tokio::test]
async fn ctrl_c_reaches_the_command_inside_the_sandbox() {
    let Some(sb) = sandbox(LIMITS).await else {
        return;
    };
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp, &sb, "sess-ctrlc").await;
    let req = CmdRequest {
        command: "sleep 30".to_owned(),
        is_input: false,
        timeout: Some(Duration::from_millis(300)),
    };
    let o = rt.run(&req, &CancellationToken::new()).await.expect("run");
    assert!(o.still_running, "{o:?}");
    let started = Instant::now();
    let ctrl_c = CmdRequest {
        command: "C-c".to_owned(),
        is_input: true,
        timeout: Some(SLOW),
    };
    let o = rt
        .run(&ctrl_c, &CancellationToken::new())
        .await
        .expect("C-c");
    assert_eq!(o.exit_code, 130, "{o:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let o = run(&mut rt, "cd /tmp && echo $PWD").await;
    assert_eq!(o.content, "/tmp");
    let t0 = Instant::now();
    rt.close().await;
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "close took {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn file_tools_show_sandbox_paths_and_leave_files_the_shell_can_change() {
    let Some(sb) = sandbox(LIMITS).await else {
        return;
    };
    let tmp = TempDir::new().expect("tmp");
    let mut rt = start(&tmp, &sb, "sess-edit").await;
    let out = rt
        .edit(&EditCommand::Create {
            path: "/workspace/src/a.txt".to_owned(),
            file_text: "one\n".to_owned(),
        })
        .await
        .expect("create");
    assert_eq!(out.path, "/workspace/src/a.txt");
    let o = run(
        &mut rt,
        "echo two >> src/a.txt && touch src/b && cat src/a.txt",
    )
    .await;
    assert_eq!(o.content, "one\ntwo", "{o:?}");
    rt.close().await;
}
