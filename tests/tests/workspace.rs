//! A session's files follow it to another worker (issue 10): the real CodeAct agent in the real
//! worker binary, driven by a scripted LLM, writes files in its sandbox; the session moves by
//! kill -9, drain and passivation to workers with another `OH_WORKSPACE_ROOT` (standing in for
//! another machine), and the agent's own `ls`/`cat` there show the files as of the last
//! completed turn. A paused zombie's late snapshot is fenced; a workspace over the cap gets a
//! clear error event; DELETE leaves nothing of the snapshots.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::id::SessionId;
use tests::check::check_log;
use tests::cluster::{Cluster, ClusterOpts, events_until, is_state};
use tests::llm::{Reply, ScriptedLlm};
use tests::proc::{SIGCONT, SIGSTOP, SIGTERM};
use tests::sio::SioClient;

const T: Duration = Duration::from_secs(60);

/// Writes one of everything a snapshot must keep.
const WRITE: &str = "mkdir -p tree/a/b emptydir && printf 'hello\\nworld\\n' > text.txt && \
    chmod 640 text.txt && head -c 300000 /dev/urandom > bin.dat && sha256sum bin.dat > bin.sum && \
    printf '#!/bin/sh\\necho run-ok\\n' > tool.sh && chmod 755 tool.sh && ln -s text.txt link.txt && \
    echo deep > tree/a/b/deep.txt && echo written";

/// Shows them (the agent's own view, from inside its sandbox on the new worker).
const CHECK: &str = "ls -l text.txt tool.sh link.txt; cat text.txt; sha256sum -c bin.sum; ./tool.sh; \
    ls -ld emptydir tree/a/b; cat tree/a/b/deep.txt; ls lost.txt 2>&1; echo checked";

fn bash(command: &str) -> Reply {
    Reply::tool("execute_bash", &json!({ "command": command }))
}

fn finish(msg: &str) -> Reply {
    Reply::tool("finish", &json!({ "message": msg }))
}

async fn cluster(llm: &ScriptedLlm, extra: Vec<(&'static str, String)>) -> Cluster {
    let mut worker_env = vec![
        ("OH_LLM_BASE_URL", llm.base_url()),
        ("OH_LLM_MODEL", "test-model".to_owned()),
        ("OH_LLM_API_KEY", "sk-test".to_owned()),
    ];
    worker_env.extend(extra);
    Cluster::start(ClusterOpts {
        gateways: 1,
        workers: 0,
        lease_ttl_ms: 1500,
        worker_env,
        ..ClusterOpts::default()
    })
    .await
}

/// A worker on its own "machine": a workspace root of its own.
async fn machine(
    c: &mut Cluster,
    root: &tempfile::TempDir,
    extra: &[(&'static str, String)],
) -> usize {
    let mut env = vec![("OH_WORKSPACE_ROOT", root.path().display().to_string())];
    env.extend(extra.iter().cloned());
    c.add_worker_with(env).await
}

async fn say(client: &SioClient, text: &str) {
    client
        .emit(
            "oh_user_action",
            &json!({"action": "message", "args": {"content": text}}),
        )
        .await
        .unwrap();
}

/// Output of the last `run` observation among `evs`.
fn last_run(evs: &[Value]) -> String {
    evs.iter()
        .rev()
        .find(|e| e["observation"] == "run")
        .map(|e| e["content"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

async fn owner(c: &Cluster, sid: &str) -> String {
    c.info(0, sid, None).await["worker_id"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

async fn wait_owner(c: &Cluster, sid: &str, want: usize) {
    let want = format!("w{want}");
    c.wait_info(0, sid, None, T, |v| v["worker_id"] == want.as_str())
        .await;
}

/// The files of turn 1, as the agent's `CHECK` on another worker shows them.
fn assert_turn_one_files(out: &str) {
    for want in [
        "-rw-r----- ",
        "-rwxr-xr-x ",
        "link.txt -> text.txt",
        "hello\nworld\n",
        "bin.dat: OK",
        "run-ok",
        "emptydir",
        "tree/a/b",
        "deep",
        "checked",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

fn workspace_notes(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .filter(|e| {
            e["observation"] == "error"
                && e["extras"]["error_id"] == "AGENT_ERROR$WORKSPACE_SNAPSHOT"
        })
        .map(|e| e["content"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// kill -9 of the owner in the middle of turn 2 (after it removed a file and wrote another):
/// the new owner, on another root, restores turn 1's end; the agent is told which changes
/// were lost, and its `ls`/`cat` show exactly turn 1's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_follow_a_killed_owner_to_another_machine_as_of_the_last_turn() {
    let llm = ScriptedLlm::start(vec![
        bash(WRITE),
        finish("written"),
        bash("rm text.txt && echo partial > lost.txt && echo changed"),
        Reply::delayed(Duration::from_secs(30), finish("never")),
        bash(CHECK),
        finish("checked"),
    ])
    .await;
    let (ra, rb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut c = cluster(&llm, Vec::new()).await;
    let a = machine(&mut c, &ra, &[]).await;
    let sid = c.create(0, Some("write files"), None).await;
    let mut client = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut client, T, |e| is_state(e, "finished")).await;
    assert!(ra.path().join(&sid).join("bin.dat").exists());
    let b = machine(&mut c, &rb, &[]).await;
    say(&client, "change them").await;
    let got = events_until(&mut client, T, |e| e["observation"] == "run").await;
    assert!(last_run(&got).contains("changed"));
    let deadline = Instant::now() + T;
    while llm.requests().len() < 4 {
        assert!(
            Instant::now() < deadline,
            "turn 2 never reached its second step"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(owner(&c, &sid).await, format!("w{a}"));
    let t0 = Instant::now();
    c.workers[a].kill9().await;
    let got = events_until(&mut client, T, |e| is_state(e, "finished")).await;
    eprintln!(
        "kill -9 → turn finished on the other machine: {:?}",
        t0.elapsed()
    );
    assert_eq!(owner(&c, &sid).await, format!("w{b}"));
    let out = last_run(&got);
    assert_turn_one_files(&out);
    assert!(out.contains("lost.txt': No such file"), "{out}");
    // The new machine holds the files; the agent was told what was lost, and saw it.
    assert!(rb.path().join(&sid).join("tree/a/b/deep.txt").exists());
    let notes = workspace_notes(&c.all_events(0, &sid, None).await);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("restored from the snapshot taken at event"),
        "{notes:?}"
    );
    let reqs = llm.requests();
    let told = reqs[4]["messages"].as_array().unwrap().iter().any(|m| {
        m["role"] == "user"
            && m["content"]
                .as_str()
                .is_some_and(|t| t.starts_with("ERROR: This conversation moved"))
    });
    assert!(told, "the model was not told: {:#}", reqs[4]["messages"]);
    check_log(&c, &sid).await;
}

/// Drain (SIGTERM) moves the session to a second machine, passivation and a stopped worker to
/// a third: each time the agent finds every file, including those written on the machine
/// before. Nothing is lost, so the agent is told nothing. DELETE then leaves no chunk or head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_follow_drain_and_passivation_and_delete_removes_every_snapshot() {
    let llm = ScriptedLlm::start(vec![
        bash(WRITE),
        finish("written"),
        bash(&format!("{CHECK}; echo second > second.txt")),
        finish("checked on b"),
        bash(&format!("{CHECK}; cat second.txt")),
        finish("checked on c"),
    ])
    .await;
    let roots: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut c = cluster(&llm, vec![("OH_CLOSE_DELAY_S", "1".to_owned())]).await;
    let a = machine(&mut c, &roots[0], &[]).await;
    let sid = c.create(0, Some("write files"), None).await;
    let mut client = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut client, T, |e| is_state(e, "finished")).await;

    // Drain: a takes its last snapshot and hands over to b.
    let b = machine(&mut c, &roots[1], &[]).await;
    let t0 = Instant::now();
    c.workers[a].signal(SIGTERM).unwrap();
    assert!(c.workers[a].wait_exit(T).await.is_some_and(|s| s.success()));
    wait_owner(&c, &sid, b).await;
    eprintln!("drain → owned by the other machine: {:?}", t0.elapsed());
    say(&client, "check on b").await;
    let got = events_until(&mut client, T, |e| is_state(e, "finished")).await;
    assert_turn_one_files(&last_run(&got));

    // Passivation: no client for OH_CLOSE_DELAY_S; b stops; the next connect resumes on c.
    client.close().await;
    c.wait_info(0, &sid, None, T, |v| v["session_status"] == "stopped")
        .await;
    let cc = machine(&mut c, &roots[2], &[]).await;
    c.workers[b].signal(SIGTERM).unwrap();
    assert!(c.workers[b].wait_exit(T).await.is_some_and(|s| s.success()));
    let head = c.all_events(0, &sid, None).await.len() as i64 - 1;
    let mut client = c.connect(0, &sid, Some(head), None).await.unwrap();
    wait_owner(&c, &sid, cc).await;
    say(&client, "check on c").await;
    let got = events_until(&mut client, T, |e| is_state(e, "finished")).await;
    let out = last_run(&got);
    assert_turn_one_files(&out);
    assert!(out.contains("second"), "{out}");
    assert!(roots[2].path().join(&sid).join("second.txt").exists());
    let evs = c.all_events(0, &sid, None).await;
    assert!(
        workspace_notes(&evs).is_empty(),
        "{:?}",
        workspace_notes(&evs)
    );
    check_log(&c, &sid).await;

    // DELETE: no head, no chunk left; the running worker's folder is gone.
    let store = c.store().await;
    let id = SessionId::parse(&sid).unwrap();
    assert!(!store.stored_chunks(&id).await.unwrap().is_empty());
    client.close().await;
    let (status, _) = c
        .delete(0, &format!("/api/conversations/{sid}"), None)
        .await;
    assert_eq!(status, 200);
    assert!(store.snapshot_head(&id).await.unwrap().is_none());
    assert!(store.stored_chunks(&id).await.unwrap().is_empty());
    let deadline = Instant::now() + T;
    while roots[2].path().join(&sid).exists()
        || roots[2].path().join(format!("{sid}.snapshot")).exists()
    {
        assert!(
            Instant::now() < deadline,
            "workspace of the deleted conversation stays"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Snapshots, restores, collection and DELETE needed nothing beyond the roles' rights.
    let log = c.nats.log();
    assert!(
        !log.contains("Violation"),
        "a role lacks a permission:\n{log}"
    );
}

/// A worker paused (SIGSTOP) in the middle of its snapshot, after its turn ended, wakes after
/// another worker took the session over and snapshotted a later turn: its late head write is
/// refused, and the stored snapshot is the new owner's, in epoch and content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_zombie_cannot_overwrite_the_new_owners_snapshot() {
    let llm = ScriptedLlm::start(vec![
        bash("echo one > one.txt && echo ok"),
        finish("one"),
        bash("echo two > two.txt && echo ok"),
        finish("two"),
    ])
    .await;
    let (ra, rb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut c = cluster(&llm, Vec::new()).await;
    // a waits 4 s before each head write: the window in which it is paused.
    let a = machine(
        &mut c,
        &ra,
        &[("OH_TEST_SNAPSHOT_PAUSE_MS", "4000".to_owned())],
    )
    .await;
    let sid = c.create(0, Some("one"), None).await;
    let mut client = c.connect(0, &sid, None, None).await.unwrap();
    events_until(&mut client, T, |e| is_state(e, "finished")).await;
    // Paused once its turn-end snapshot has stored its chunks and waits to write the head.
    let deadline = Instant::now() + T;
    while !c.workers[a]
        .log()
        .contains("pausing before the snapshot head write")
    {
        assert!(Instant::now() < deadline, "no snapshot started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.workers[a].signal(SIGSTOP).unwrap();
    let b = machine(&mut c, &rb, &[]).await;
    wait_owner(&c, &sid, b).await;
    say(&client, "two").await;
    loop {
        let got = events_until(&mut client, T, |e| is_state(e, "finished")).await;
        if got.iter().any(|e| e["action"] == "finish") {
            break;
        }
    }
    let store = c.store().await;
    let id = SessionId::parse(&sid).unwrap();
    // b's snapshot of turn 2 is stored (the turn end snapshot follows the state change).
    let deadline = Instant::now() + T;
    let before = loop {
        if let Some((_, h)) = store.snapshot_head(&id).await.unwrap()
            && h.has_snapshot()
        {
            break h;
        }
        assert!(Instant::now() < deadline, "no snapshot from the new owner");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The zombie wakes: its pause ends and it tries to write its head of turn 1.
    c.workers[a].signal(SIGCONT).unwrap();
    let deadline = Instant::now() + T;
    while !c.workers[a].log().contains("snapshot fenced") {
        assert!(
            Instant::now() < deadline,
            "the zombie never tried: {}",
            c.workers[a].log_tail(4000)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, head) = store.snapshot_head(&id).await.unwrap().unwrap();
    assert_eq!(head, before, "the zombie changed the head");
    let epochs: Vec<u64> = store
        .read_from(&id, 0, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.epoch)
        .collect();
    let (first, last) = (epochs[0], *epochs.iter().max().unwrap());
    assert!(last > first);
    assert_eq!((head.epoch, head.snapshot_epoch), (last, last));
    let body = store.get_body(&id, &head).await.unwrap();
    let paths: Vec<&[u8]> = body.entries.iter().map(|e| e.path().0.as_slice()).collect();
    assert!(paths.contains(&b"two.txt".as_slice()), "{paths:?}");
    assert!(
        !paths.contains(&b"one.txt".as_slice()),
        "the zombie's file is in the snapshot"
    );
    check_log(&c, &sid).await;
}

/// Over `OH_WORKSPACE_MAX_MIB`: a clear error event (the model sees it too), the session keeps
/// working, and once the workspace fits again it is snapshotted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_over_the_cap_gets_a_clear_error_and_the_session_keeps_working() {
    let llm = ScriptedLlm::start(vec![
        bash("head -c 2000000 /dev/zero > big.bin && echo small > small.txt && echo ok"),
        finish("big"),
        bash("rm big.bin && echo fine"),
        finish("small"),
    ])
    .await;
    let ra = tempfile::tempdir().unwrap();
    let mut c = cluster(&llm, vec![("OH_WORKSPACE_MAX_MIB", "1".to_owned())]).await;
    machine(&mut c, &ra, &[]).await;
    let sid = c.create(0, Some("big"), None).await;
    let mut client = c.connect(0, &sid, None, None).await.unwrap();
    let got = events_until(&mut client, T, |e| {
        e["observation"] == "error" && e["extras"]["error_id"] == "AGENT_ERROR$WORKSPACE_SNAPSHOT"
    })
    .await;
    let note = got.last().unwrap()["content"].as_str().unwrap().to_owned();
    assert!(
        note.contains(
            "holds 2 MiB of files, over the snapshot limit of 1 MiB (OH_WORKSPACE_MAX_MIB)"
        ),
        "{note}"
    );
    say(&client, "make it small").await;
    let got = events_until(&mut client, T, |e| is_state(e, "finished")).await;
    assert!(last_run(&got).contains("fine"));
    let told = llm.requests()[2]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| {
            m["role"] == "user"
                && m["content"]
                    .as_str()
                    .is_some_and(|t| t.contains("over the snapshot limit"))
        });
    assert!(told, "the model was not told");
    let store = c.store().await;
    let id = SessionId::parse(&sid).unwrap();
    let deadline = Instant::now() + T;
    loop {
        if let Some((_, h)) = store.snapshot_head(&id).await.unwrap()
            && h.files == 1
        {
            break;
        }
        assert!(Instant::now() < deadline, "no snapshot once it fits");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(workspace_notes(&c.all_events(0, &sid, None).await).len(), 1);
    check_log(&c, &sid).await;
}
