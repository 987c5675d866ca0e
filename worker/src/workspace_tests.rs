//! Snapshots and restores against a real `nats-server -js`: what a restore gives back, what
//! an unchanged or slightly changed workspace costs, the fence against an earlier owner,
//! collection of chunks, the size cap, and restores that must not write through symlinks.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use ::tests::nats::NatsServer;
use shared::id::SessionId;
use shared::names::Names;
use shared::store::Store;

use super::*;

const MAX: u64 = 1 << 30;

async fn store(nats: &NatsServer) -> Store {
    let names = Names::new(&format!(
        "u{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ))
    .expect("namespace");
    Store::open(nats.connect().await, names)
        .await
        .expect("store")
}

fn new_sid() -> SessionId {
    SessionId::parse(&uuid::Uuid::new_v4().simple().to_string()).expect("sid")
}

/// A workspace with every kind of thing a snapshot must keep.
fn populate(dir: &Path) {
    std::fs::create_dir_all(dir.join("tree/a/b")).expect("mkdir");
    std::fs::create_dir_all(dir.join("empty")).expect("mkdir");
    std::fs::write(dir.join("text.txt"), "hello\nworld\n").expect("write");
    let binary: Vec<u8> = (0..600_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("bin.dat"), &binary).expect("write");
    std::fs::write(dir.join("tool.sh"), "#!/bin/sh\necho ok\n").expect("write");
    std::fs::set_permissions(dir.join("tool.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::set_permissions(dir.join("text.txt"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    std::fs::write(dir.join("tree/a/b/deep.txt"), "deep").expect("write");
    std::os::unix::fs::symlink("text.txt", dir.join("link.txt")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", dir.join("outside")).expect("symlink");
    std::fs::write(dir.join(std::ffi::OsStr::from_bytes(b"raw-\xff-name")), "x").expect("write");
}

/// Everything a comparison looks at: kind, mode, content (or target) and a file's mtime.
fn tree(dir: &Path) -> BTreeMap<Vec<u8>, String> {
    let mut out = BTreeMap::new();
    for (path, found) in walk(dir).expect("walk") {
        let full = dir.join(rel_path(&path));
        let desc = match found {
            Found::Dir { mode } => format!("dir {mode:o}"),
            Found::Link { target } => format!("link {:?}", target.0),
            Found::File(stat) => format!(
                "file {:o} {} {}",
                stat.mode,
                stat.mtime_ns,
                sha256_hex(&std::fs::read(&full).expect("read"))
            ),
        };
        out.insert(path.0, desc);
    }
    out
}

fn place(root: &Path, sid: &SessionId) -> Place {
    Place::new(root, sid, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_on_another_machine_gives_back_every_file_as_it_was() {
    let nats = NatsServer::start().await;
    let store = store(&nats).await;
    let (a, b) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let sid = new_sid();
    let mut owner = Snapshots::fresh(store.clone(), sid.clone(), place(a.path(), &sid), 10, MAX);
    populate(&a.path().join(sid.as_str()));
    let taken = owner.snapshot(Some(7)).await.expect("snapshot");
    let Taken::Stored { files, bytes, .. } = taken else {
        panic!("{taken:?}");
    };
    assert_eq!(files, 5);
    assert_eq!(bytes, 12 + 600_000 + 18 + 4 + 1);

    // Another worker (another root) takes over: everything comes back.
    let (next, restored) =
        Snapshots::take_over(store.clone(), sid.clone(), place(b.path(), &sid), 20, MAX)
            .await
            .expect("take over");
    assert_eq!(restored.event_id, Some(7));
    assert_eq!(restored.fetched_files, 5);
    assert!(restored.failed.is_none());
    assert_eq!(
        tree(&a.path().join(sid.as_str())),
        tree(&b.path().join(sid.as_str()))
    );
    let restored_dir = b.path().join(sid.as_str());
    assert_eq!(
        std::fs::read_link(restored_dir.join("outside")).expect("link"),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        std::fs::read_to_string(restored_dir.join("link.txt")).expect("read"),
        "hello\nworld\n"
    );
    assert_eq!(
        std::fs::metadata(restored_dir.join("tool.sh"))
            .expect("stat")
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(next.head().epoch, 20);
    assert_eq!(next.head().snapshot_epoch, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_incremental_and_a_local_copy_is_not_fetched_again() {
    let nats = NatsServer::start().await;
    let store = store(&nats).await;
    let a = tempfile::tempdir().expect("tmp");
    let sid = new_sid();
    let dir = a.path().join(sid.as_str());
    let mut owner = Snapshots::fresh(store.clone(), sid.clone(), place(a.path(), &sid), 10, MAX);
    populate(&dir);
    owner.snapshot(Some(1)).await.expect("first");
    // Files hashed within the racy window are hashed again once; after that, nothing changes.
    owner.snapshot(Some(2)).await.expect("second");
    assert_eq!(
        owner.snapshot(Some(3)).await.expect("third"),
        Taken::Unchanged
    );

    // One line changed in one small file: only that file's chunk (and the manifest) is stored.
    std::fs::write(dir.join("tree/a/b/deep.txt"), "deeper").expect("write");
    let Taken::Stored { uploaded, .. } = owner.snapshot(Some(4)).await.expect("changed") else {
        panic!("not stored");
    };
    let manifest: u64 = owner.head().body.iter().map(|c| c.len).sum();
    assert_eq!(
        uploaded,
        6 + manifest,
        "only the changed file and the manifest"
    );

    // The same worker takes the session back: nothing to fetch.
    let (_, restored) =
        Snapshots::take_over(store.clone(), sid.clone(), place(a.path(), &sid), 20, MAX)
            .await
            .expect("take over");
    assert_eq!(restored.fetched_files, 0, "{restored:?}");
    assert_eq!(restored.event_id, Some(4));
    assert_eq!(
        std::fs::read_to_string(dir.join("tree/a/b/deep.txt")).expect("read"),
        "deeper"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_owner_cannot_replace_a_newer_owners_snapshot() {
    let nats = NatsServer::start().await;
    let store = store(&nats).await;
    let (a, b) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let sid = new_sid();
    let mut zombie = Snapshots::fresh(store.clone(), sid.clone(), place(a.path(), &sid), 10, MAX);
    populate(&a.path().join(sid.as_str()));
    zombie
        .snapshot(Some(5))
        .await
        .expect("zombie's snapshot while it owned the session");

    let (mut owner, _) =
        Snapshots::take_over(store.clone(), sid.clone(), place(b.path(), &sid), 20, MAX)
            .await
            .expect("take over");
    std::fs::write(b.path().join(sid.as_str()).join("new.txt"), "owner").expect("write");
    owner.snapshot(Some(9)).await.expect("owner's snapshot");

    // The zombie wakes with changes of its own: refused.
    std::fs::write(a.path().join(sid.as_str()).join("zombie.txt"), "zombie").expect("write");
    let err = zombie
        .snapshot(Some(6))
        .await
        .expect_err("zombie must be fenced");
    assert!(
        matches!(err, SnapError::Snapshot(SnapshotError::Fenced { .. })),
        "{err}"
    );
    let (_, head) = store
        .snapshot_head(&sid)
        .await
        .expect("head")
        .expect("exists");
    assert_eq!(
        (head.epoch, head.snapshot_epoch, head.event_id),
        (20, 20, Some(9))
    );
    let body = store.get_body(&sid, &head).await.expect("body");
    let paths: HashSet<&[u8]> = body.entries.iter().map(|e| e.path().0.as_slice()).collect();
    assert!(paths.contains(b"new.txt".as_slice()));
    assert!(!paths.contains(b"zombie.txt".as_slice()));

    // Before any snapshot of the new owner, its takeover alone fences the earlier one.
    let other = new_sid();
    let mut early = Snapshots::fresh(
        store.clone(),
        other.clone(),
        place(a.path(), &other),
        10,
        MAX,
    );
    let _ = Snapshots::take_over(
        store.clone(),
        other.clone(),
        place(b.path(), &other),
        20,
        MAX,
    )
    .await
    .expect("take over with no snapshot");
    populate(&a.path().join(other.as_str()));
    let err = early
        .snapshot(Some(1))
        .await
        .expect_err("fenced by the takeover alone");
    assert!(
        matches!(err, SnapError::Snapshot(SnapshotError::Fenced { .. })),
        "{err}"
    );
    assert!(
        store
            .snapshot_head(&other)
            .await
            .expect("head")
            .expect("head")
            .1
            .body
            .is_empty(),
        "the fenced writer's snapshot was committed"
    );
}

/// Chunks held only by older manifests are dropped; a chunk stored again after an older owner
/// planned to drop it survives that owner's late drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreferenced_chunks_are_collected_and_delete_leaves_nothing() {
    let nats = NatsServer::start().await;
    let store = store(&nats).await;
    let a = tempfile::tempdir().expect("tmp");
    let sid = new_sid();
    let dir = a.path().join(sid.as_str());
    let mut owner = Snapshots::fresh(store.clone(), sid.clone(), place(a.path(), &sid), 10, MAX);
    populate(&dir);
    owner.snapshot(Some(1)).await.expect("snapshot");
    std::fs::remove_file(dir.join("bin.dat")).expect("rm");
    std::fs::write(dir.join("text.txt"), "changed").expect("write");
    owner.snapshot(Some(2)).await.expect("snapshot");
    let stored: HashSet<String> = store
        .stored_chunks(&sid)
        .await
        .expect("list")
        .into_iter()
        .collect();
    let (_, head) = store
        .snapshot_head(&sid)
        .await
        .expect("head")
        .expect("exists");
    let body = store.get_body(&sid, &head).await.expect("body");
    let held: HashSet<String> = body
        .chunks
        .keys()
        .cloned()
        .chain(head.body.iter().map(|c| c.sha.clone()))
        .collect();
    assert_eq!(stored, held);
    assert!(body.entries.iter().all(|e| e.path().0 != b"bin.dat"));

    // A late drop bounded by an older sequence leaves a newer copy alone.
    let sha = sha256_hex(b"same bytes");
    let old = store
        .put_chunk(&sid, &sha, bytes::Bytes::from_static(b"same bytes"))
        .await
        .expect("put");
    let new = store
        .put_chunk(&sid, &sha, bytes::Bytes::from_static(b"same bytes"))
        .await
        .expect("put");
    assert!(new > old);
    store.drop_chunk(&sid, &sha, old).await.expect("drop");
    assert_eq!(
        store
            .get_chunk(&sid, &sha)
            .await
            .expect("still there")
            .as_ref(),
        b"same bytes"
    );
    store.drop_chunk(&sid, &sha, new).await.expect("drop");
    assert!(store.get_chunk(&sid, &sha).await.is_err());

    store.purge_snapshots(&sid).await.expect("purge");
    assert!(store.stored_chunks(&sid).await.expect("list").is_empty());
    assert!(store.snapshot_head(&sid).await.expect("head").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_over_the_cap_is_refused_and_the_previous_snapshot_stands() {
    let nats = NatsServer::start().await;
    let store = store(&nats).await;
    let a = tempfile::tempdir().expect("tmp");
    let sid = new_sid();
    let dir = a.path().join(sid.as_str());
    let mut owner = Snapshots::fresh(
        store.clone(),
        sid.clone(),
        place(a.path(), &sid),
        10,
        1 << 20,
    );
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("small"), "small").expect("write");
    owner.snapshot(Some(1)).await.expect("snapshot");
    std::fs::write(dir.join("big"), vec![7u8; 2 << 20]).expect("write");
    let err = owner.snapshot(Some(2)).await.expect_err("over the cap");
    assert!(
        matches!(err, SnapError::TooLarge { bytes, limit } if bytes == (2 << 20) + 5 && limit == 1 << 20),
        "{err}"
    );
    let (_, head) = store
        .snapshot_head(&sid)
        .await
        .expect("head")
        .expect("exists");
    assert_eq!(head.event_id, Some(1));
    assert_eq!(head.files, 1);
    std::fs::remove_file(dir.join("big")).expect("rm");
    std::fs::write(dir.join("small"), "smaller").expect("write");
    assert!(matches!(
        owner.snapshot(Some(3)).await.expect("fits again"),
        Taken::Stored { .. }
    ));
}

/// A restore removes what the snapshot lacks and never writes through a symlink the local
/// folder holds where the snapshot has a folder or a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_replaces_local_symlinks_instead_of_following_them() {
    let nats = NatsServer::start().await;
    let store = store(&nats).await;
    let (a, b, outside) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let sid = new_sid();
    let mut owner = Snapshots::fresh(store.clone(), sid.clone(), place(a.path(), &sid), 10, MAX);
    populate(&a.path().join(sid.as_str()));
    owner.snapshot(Some(1)).await.expect("snapshot");
    // What another worker's folder holds: links where the snapshot has a folder and a file,
    // and a file the snapshot does not have.
    let local = b.path().join(sid.as_str());
    std::fs::create_dir_all(&local).expect("mkdir");
    std::os::unix::fs::symlink(outside.path(), local.join("tree")).expect("symlink");
    std::fs::write(outside.path().join("victim"), "keep").expect("write");
    std::os::unix::fs::symlink(outside.path().join("victim"), local.join("text.txt"))
        .expect("symlink");
    std::fs::write(local.join("stale.txt"), "stale").expect("write");
    let (_, restored) =
        Snapshots::take_over(store.clone(), sid.clone(), place(b.path(), &sid), 20, MAX)
            .await
            .expect("take over");
    assert!(restored.failed.is_none());
    assert_eq!(tree(&a.path().join(sid.as_str())), tree(&local));
    assert_eq!(
        std::fs::read_to_string(outside.path().join("victim")).expect("read"),
        "keep"
    );
    assert_eq!(
        std::fs::read_dir(outside.path()).expect("ls").count(),
        1,
        "nothing written outside"
    );
    assert!(
        std::fs::symlink_metadata(local.join("tree"))
            .expect("stat")
            .is_dir()
    );
    assert!(!local.join("stale.txt").exists());
}

#[test]
fn the_agent_is_told_which_changes_were_lost() {
    use shared::event::{EditArgs, ReadArgs, RunArgs};
    let ev = |id: u64, action: &str| {
        let mut e = match action {
            "run" => Event::run(RunArgs {
                command: "x",
                is_input: false,
                thought: "",
                timeout: None,
            }),
            "edit" => Event::edit(EditArgs {
                path: "/workspace/f",
                command: "create",
                file_text: Some(""),
                old_str: None,
                new_str: None,
                insert_line: None,
                thought: "",
            }),
            _ => Event::read(ReadArgs {
                path: "/workspace/f",
                view_range: None,
                thought: "",
            }),
        };
        e.id = Some(id);
        e
    };
    let history = vec![ev(3, "run"), ev(5, "edit"), ev(6, "read"), ev(8, "run")];
    let at = |event_id| Restored {
        event_id,
        ..Restored::default()
    };
    let note = lost_changes_note(&at(Some(4)), &history).expect("note");
    assert!(
        note.contains("snapshot taken at event 4") && note.contains("events 5, 8"),
        "{note}"
    );
    assert!(lost_changes_note(&at(Some(8)), &history).is_none());
    // No snapshot: told only if this worker's folder was empty too.
    assert!(lost_changes_note(&at(None), &history).is_none());
    let empty = Restored {
        local_empty: true,
        ..Restored::default()
    };
    assert!(
        lost_changes_note(&empty, &history)
            .expect("note")
            .contains("events 3, 5, 8")
    );
}

/// A writer that dies between its head write and its drops: the head names what it made
/// unreferenced, and the next owner drops exactly that at takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_a_dead_writer_left_unreferenced_are_dropped_by_the_next_owner() {
    let nats = NatsServer::start().await;
    let store = store(&nats).await;
    let (a, b) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let sid = new_sid();
    let mut owner = Snapshots::fresh(store.clone(), sid.clone(), place(a.path(), &sid), 10, MAX);
    populate(&a.path().join(sid.as_str()));
    owner.snapshot(Some(1)).await.expect("snapshot");
    // The dead writer's view: its head is written, naming `orphan` as garbage it never dropped.
    let sha = sha256_hex(b"orphan");
    let seq = store
        .put_chunk(&sid, &sha, bytes::Bytes::from_static(b"orphan"))
        .await
        .expect("put");
    let (head_seq, mut head) = store
        .snapshot_head(&sid)
        .await
        .expect("head")
        .expect("head");
    head.garbage = vec![shared::snapshot::ChunkRef {
        sha: sha.clone(),
        seq,
        len: 6,
    }];
    store
        .write_snapshot_head(&sid, &head, head_seq)
        .await
        .expect("head write");
    let before = store.stored_chunks(&sid).await.expect("list").len();
    let (_, restored) =
        Snapshots::take_over(store.clone(), sid.clone(), place(b.path(), &sid), 20, MAX)
            .await
            .expect("take over");
    assert!(restored.failed.is_none());
    let after: HashSet<String> = store
        .stored_chunks(&sid)
        .await
        .expect("list")
        .into_iter()
        .collect();
    assert_eq!(after.len(), before - 1);
    assert!(!after.contains(&sha));
    assert_eq!(
        tree(&a.path().join(sid.as_str())),
        tree(&b.path().join(sid.as_str()))
    );
}

/// More paths than the limit: refused before anything is read (the manifest would be rewritten
/// whole at every snapshot).
#[test]
fn a_workspace_with_too_many_paths_is_refused() {
    let a = tempfile::tempdir().expect("tmp");
    populate(a.path());
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let res = scan(a.path(), &Index::default(), &BTreeMap::new(), (MAX, 5), &tx);
    assert!(
        matches!(
            res,
            Err(SnapError::TooMany {
                entries: 11,
                limit: 5
            })
        ),
        "{:?}",
        res.err()
    );
}
