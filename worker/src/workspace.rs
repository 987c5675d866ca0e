//! A session's files follow it to any worker: snapshots of the workspace folder taken at every
//! turn end, at drain and at passivation, restored when another worker claims the session.
//! The JetStream half (head, chunks, fence) is [`shared::snapshot`]; this module walks, hashes
//! and writes files.
//!
//! **Incremental.** A local index (`<OH_WORKSPACE_ROOT>/<sid>.snapshot`, outside the folder the
//! sandbox sees) remembers each file's inode, size, mtime and ctime with its chunk hashes as
//! of the last snapshot or restore; a file whose stat is unchanged is not read again, and only
//! chunks the committed manifest does not hold are stored. A snapshot of an unchanged
//! workspace is a walk of `stat` calls and no write at all. A file modified less than
//! [`RACY_NS`] before it was read is read again next time (a change within the same
//! timestamp tick would otherwise be missed).
//!
//! **Restore** makes the folder equal to the manifest: files whose local stat matches the
//! index and whose chunks match the manifest stay (a worker that holds the current snapshot
//! fetches nothing); others are fetched and written to a new file renamed into place; paths
//! the manifest lacks are removed; symlinks are recreated as text and never followed; modes
//! (the `x` bit), mtimes and empty directories are kept; everything is given to the sandbox
//! user. A session with no snapshot yet keeps its local folder as it is.
//!
//! **Consistency:** a snapshot records the newest event id of the log when it was taken (a turn
//! end, or a step boundary at drain). A new owner restores it; if the log holds file-changing
//! actions after that id (the old owner died mid-turn), the agent is told which
//! ([`lost_changes_note`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use shared::event::Event;
use shared::id::SessionId;
use shared::snapshot::{
    Body, CHUNK_BYTES, ChunkRef, Entry, Head, SnapshotError, WsPath, sha256_hex,
};
use shared::store::{Store, StoreError};
use tracing::{debug, info, warn};

/// A file modified this recently (ns) before it was hashed is hashed again next time.
const RACY_NS: i64 = 2_000_000_000;
/// Most dropped chunks a head names for its successor (the rest of a huge drop is only dropped
/// by its writer).
const MAX_GARBAGE: usize = 4096;
/// Most paths (files, folders, links) a snapshot takes: its manifest (~250 bytes a path) is
/// rewritten whole at each snapshot.
pub(crate) const MAX_ENTRIES: usize = 200_000;
/// Chunks of one file fetched at once during a restore (2 MiB).
const WRITE_BATCH: usize = 8;
/// Chunk writes (and reads) in flight at once.
const IN_FLIGHT: usize = 32;

/// Why a snapshot was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SnapError {
    /// Over `OH_WORKSPACE_MAX_MIB`: nothing stored, the previous snapshot stands.
    #[error("the workspace holds {bytes} bytes, over the snapshot limit of {limit} bytes")]
    TooLarge { bytes: u64, limit: u64 },
    /// More paths than [`MAX_ENTRIES`] (the manifest is rewritten whole at each snapshot).
    #[error("the workspace holds {entries} paths, over the snapshot limit of {limit}")]
    TooMany { entries: usize, limit: usize },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("workspace files: {0}")]
    Io(#[from] std::io::Error),
}

impl From<StoreError> for SnapError {
    fn from(e: StoreError) -> Self {
        SnapError::Snapshot(SnapshotError::Store(e))
    }
}

/// What a snapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Same entries as the committed snapshot: nothing written.
    Unchanged,
    /// A new head committed.
    Stored {
        files: u64,
        bytes: u64,
        uploaded: u64,
    },
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub(crate) struct Restored {
    /// The event id the restored snapshot reflects (`None`: there was no snapshot).
    pub(crate) event_id: Option<u64>,
    pub(crate) files: u64,
    pub(crate) fetched_files: u64,
    pub(crate) fetched_bytes: u64,
    /// The local folder was missing or empty when there was no snapshot to restore.
    pub(crate) local_empty: bool,
    /// The snapshot could not be restored (missing or corrupt chunk): what went wrong.
    pub(crate) failed: Option<String>,
}

/// Where a session's workspace and its local index live on this worker.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub(crate) dir: PathBuf,
    pub(crate) index: PathBuf,
    /// The sandbox user files are given to (`None`: the worker's own).
    pub(crate) owner: Option<(u32, u32)>,
}

impl Place {
    pub(crate) fn new(root: &Path, sid: &SessionId, owner: Option<(u32, u32)>) -> Self {
        Place {
            dir: root.join(sid.as_str()),
            index: index_path(root, sid),
            owner,
        }
    }
}

/// The local index file of a session (removed with its workspace).
pub(crate) fn index_path(root: &Path, sid: &SessionId) -> PathBuf {
    root.join(format!("{sid}.snapshot"))
}

/// The snapshots of one session as its owner sees them: the committed head and manifest, and
/// the local index.
pub(crate) struct Snapshots {
    store: Store,
    sid: SessionId,
    place: Place,
    epoch: u64,
    max_bytes: u64,
    /// Sequence of the head this owner last wrote or read (the fence of its next write).
    head_seq: u64,
    head: Head,
    /// Stream sequence of every chunk the committed manifest holds (shared with the scan).
    chunks: Arc<BTreeMap<String, u64>>,
    /// Shared with the scan and the index writer (both on blocking threads).
    index: Arc<Index>,
    /// Test hook `OH_TEST_SNAPSHOT_PAUSE_MS`: a wait before each head write.
    pause: std::time::Duration,
}

/// The local index: what each file's stat was when its chunks were computed.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Index {
    files: HashMap<WsPath, Known>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Known {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    chunks: Vec<String>,
}

/// One path found on disk.
#[derive(Debug, Clone)]
enum Found {
    Dir { mode: u32 },
    File(FileStat),
    Link { target: WsPath },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStat {
    mode: u32,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl FileStat {
    fn of(md: &std::fs::Metadata) -> Self {
        FileStat {
            mode: md.mode() & 0o777,
            ino: md.ino(),
            size: md.size(),
            mtime_ns: md
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(md.mtime_nsec()),
            ctime_ns: md
                .ctime()
                .saturating_mul(1_000_000_000)
                .saturating_add(md.ctime_nsec()),
        }
    }

    fn matches(&self, k: &Known) -> bool {
        self.ino == k.ino
            && self.size == k.size
            && self.mtime_ns == k.mtime_ns
            && self.ctime_ns == k.ctime_ns
    }

    fn known(&self, chunks: Vec<String>) -> Known {
        let now = now_ns();
        Known {
            ino: self.ino,
            size: self.size,
            // Modified within the racy window: never matches, so it is read again next time.
            mtime_ns: if now - self.mtime_ns < RACY_NS {
                -1
            } else {
                self.mtime_ns
            },
            ctime_ns: self.ctime_ns,
            chunks,
        }
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Every path under `dir` (not following symlinks), sorted (parents first). Sockets, FIFOs and
/// devices are skipped. A missing `dir` is empty.
fn walk(dir: &Path) -> std::io::Result<Vec<(WsPath, Found)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let read = match std::fs::read_dir(dir.join(&rel)) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && rel.as_os_str().is_empty() => {
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        for ent in read {
            let ent = ent?;
            let path = rel.join(ent.file_name());
            let md = ent.metadata()?; // lstat: `DirEntry::metadata` does not follow links
            let ft = md.file_type();
            let key = WsPath(path.as_os_str().as_bytes().to_vec());
            if ft.is_dir() {
                out.push((
                    key,
                    Found::Dir {
                        mode: md.mode() & 0o777,
                    },
                ));
                stack.push(path);
            } else if ft.is_file() {
                out.push((key, Found::File(FileStat::of(&md))));
            } else if ft.is_symlink() {
                let target = std::fs::read_link(dir.join(&path))?;
                out.push((
                    key,
                    Found::Link {
                        target: WsPath(target.as_os_str().as_bytes().to_vec()),
                    },
                ));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn rel_path(p: &WsPath) -> PathBuf {
    PathBuf::from(std::ffi::OsStr::from_bytes(&p.0))
}

/// The scan of a snapshot: the entries (and their hash), the new index, and the chunks sent
/// for storage.
struct Scan {
    entries: Vec<Entry>,
    entries_sha: String,
    index: Index,
    files: u64,
    bytes: u64,
}

/// Walks the workspace, reads the files whose stat changed and sends every chunk `known` does
/// not hold to `tx` (once each).
fn scan(
    dir: &Path,
    old: &Index,
    known: &BTreeMap<String, u64>,
    (max_bytes, max_entries): (u64, usize),
    tx: &tokio::sync::mpsc::Sender<(String, Bytes)>,
) -> Result<Scan, SnapError> {
    let found = walk(dir)?;
    if found.len() > max_entries {
        return Err(SnapError::TooMany {
            entries: found.len(),
            limit: max_entries,
        });
    }
    let bytes: u64 = found
        .iter()
        .map(|(_, f)| match f {
            Found::File(s) => s.size,
            _ => 0,
        })
        .sum();
    if bytes > max_bytes {
        return Err(SnapError::TooLarge {
            bytes,
            limit: max_bytes,
        });
    }
    let mut sent = HashSet::new();
    let mut scan = Scan {
        entries: Vec::with_capacity(found.len()),
        entries_sha: String::new(),
        index: Index::default(),
        files: 0,
        bytes: 0,
    };
    for (path, f) in found {
        match f {
            Found::Dir { mode } => scan.entries.push(Entry::Dir { path, mode }),
            Found::Link { target } => scan.entries.push(Entry::Link { path, target }),
            Found::File(stat) => {
                // Unchanged since its chunks were computed, and those chunks are stored.
                let cached = old
                    .files
                    .get(&path)
                    .filter(|k| stat.matches(k) && k.chunks.iter().all(|c| known.contains_key(c)));
                let (chunks, size) = match cached {
                    Some(k) => (k.chunks.clone(), stat.size),
                    None => {
                        let mut file = match std::fs::OpenOptions::new()
                            .read(true)
                            .custom_flags(nofollow())
                            .open(dir.join(rel_path(&path)))
                        {
                            Ok(f) => f,
                            // Gone since the walk (a process still writes): not in this snapshot.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(e.into()),
                        };
                        read_chunks(&mut file, known, &mut sent, tx)?
                    }
                };
                scan.files += 1;
                scan.bytes += size;
                scan.index
                    .files
                    .insert(path.clone(), stat.known(chunks.clone()));
                scan.entries.push(Entry::File {
                    path,
                    mode: stat.mode,
                    size,
                    mtime_ns: stat.mtime_ns,
                    chunks,
                });
            }
        }
    }
    scan.entries_sha = sha256_hex(&serde_json::to_vec(&scan.entries).unwrap_or_default());
    Ok(scan)
}

/// `O_NOFOLLOW`: a file tool never opens through a symlink.
fn nofollow() -> i32 {
    i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0)
}

/// Reads a file in [`CHUNK_BYTES`] pieces; sends the new ones. Returns the chunks and the
/// bytes read.
fn read_chunks(
    file: &mut std::fs::File,
    known: &BTreeMap<String, u64>,
    sent: &mut HashSet<String>,
    tx: &tokio::sync::mpsc::Sender<(String, Bytes)>,
) -> Result<(Vec<String>, u64), SnapError> {
    let mut chunks = Vec::new();
    let mut size = 0u64;
    loop {
        let mut buf = Vec::with_capacity(CHUNK_BYTES);
        let n = Read::by_ref(file)
            .take(CHUNK_BYTES as u64)
            .read_to_end(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        let sha = sha256_hex(&buf);
        if !known.contains_key(&sha) && sent.insert(sha.clone()) {
            tx.blocking_send((sha.clone(), Bytes::from(buf)))
                .map_err(|_| std::io::Error::other("chunk upload stopped"))?;
        }
        chunks.push(sha);
        if n < CHUNK_BYTES {
            break;
        }
    }
    Ok((chunks, size))
}

impl Snapshots {
    /// A first start: nothing stored yet, nothing to restore. (A stale local index is harmless:
    /// with nothing committed, every file is read.)
    pub(crate) fn fresh(
        store: Store,
        sid: SessionId,
        place: Place,
        epoch: u64,
        max_bytes: u64,
    ) -> Self {
        Snapshots {
            store,
            sid,
            place,
            epoch,
            max_bytes,
            head_seq: 0,
            head: Head::empty(epoch),
            chunks: Arc::default(),
            index: Arc::default(),
            pause: std::time::Duration::ZERO,
        }
    }

    /// A takeover: fences every earlier owner's snapshot writes, then makes the local folder
    /// the newest snapshot (fetching only what differs).
    ///
    /// # Errors
    /// [`SnapError`] if NATS failed (the claim is retried) or the local folder cannot be
    /// written. A missing or corrupt chunk is not an error: [`Restored::failed`] says it.
    pub(crate) async fn take_over(
        store: Store,
        sid: SessionId,
        place: Place,
        epoch: u64,
        max_bytes: u64,
    ) -> Result<(Self, Restored), SnapError> {
        let started = Instant::now();
        let (head_seq, head) = store.take_over_snapshots(&sid, epoch).await?;
        let mut me = Snapshots {
            store,
            sid,
            place,
            epoch,
            max_bytes,
            head_seq,
            head,
            chunks: Arc::default(),
            index: Arc::default(),
            pause: std::time::Duration::ZERO,
        };
        if !me.head.has_snapshot() {
            // Nothing stored yet: the local folder (if this machine has one) is all there is.
            let local_empty =
                std::fs::read_dir(&me.place.dir).map_or(true, |mut d| d.next().is_none());
            me.collect_garbage().await;
            return Ok((
                me,
                Restored {
                    local_empty,
                    ..Restored::default()
                },
            ));
        }
        let body = match me.store.get_body(&me.sid, &me.head).await {
            Ok(b) => b,
            Err(e @ StoreError::Corrupt { .. }) => {
                warn!(error = %e, "snapshot manifest unreadable; keeping the local folder");
                return Ok((
                    me,
                    Restored {
                        failed: Some(e.to_string()),
                        ..Restored::default()
                    },
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let mut restored = me.restore(body.entries).await?;
        restored.event_id = me.head.event_id;
        me.chunks = Arc::new(body.chunks);
        me.collect_garbage().await;
        metrics::histogram!("oh_worker_restore_seconds").record(started.elapsed());
        metrics::counter!("oh_worker_restore_bytes_total").increment(restored.fetched_bytes);
        info!(
            snapshot_event = ?restored.event_id,
            files = restored.files,
            fetched_files = restored.fetched_files,
            fetched_bytes = restored.fetched_bytes,
            ms = started.elapsed().as_millis() as u64,
            "workspace restored"
        );
        Ok((me, restored))
    }

    /// Makes the local folder equal to a manifest's `entries`.
    async fn restore(&mut self, entries: Vec<Entry>) -> Result<Restored, SnapError> {
        let place = self.place.clone();
        let entries = Arc::new(entries);
        let fetch = {
            let (place, entries) = (place.clone(), Arc::clone(&entries));
            tokio::task::spawn_blocking(move || prepare(&place, &entries))
                .await
                .map_err(std::io::Error::other)??
        };
        let mut restored = Restored {
            files: entries
                .iter()
                .filter(|e| matches!(e, Entry::File { .. }))
                .count() as u64,
            ..Restored::default()
        };
        // Fetch and write what differs, a few files at a time.
        let results: Vec<(usize, Result<u64, SnapError>)> = futures::stream::iter(fetch)
            .map(|i| {
                let store = self.store.clone();
                let sid = self.sid.clone();
                let dir = place.dir.clone();
                let entry = entries[i].clone();
                async move { (i, write_file(&store, &sid, &dir, &entry).await) }
            })
            .buffer_unordered(IN_FLIGHT / 2)
            .collect()
            .await;
        let mut left_out = HashSet::new();
        for (i, r) in results {
            match r {
                Ok(n) => {
                    restored.fetched_files += 1;
                    restored.fetched_bytes += n;
                }
                Err(SnapError::Snapshot(SnapshotError::Store(e @ StoreError::Corrupt { .. }))) => {
                    warn!(error = %e, "snapshot chunk unreadable; file left out");
                    restored.failed.get_or_insert_with(|| e.to_string());
                    left_out.insert(i);
                }
                Err(e) => return Err(e),
            }
        }
        let index = {
            let (place, entries) = (place.clone(), Arc::clone(&entries));
            tokio::task::spawn_blocking(move || finish_restore(&place, &entries, &left_out))
                .await
                .map_err(std::io::Error::other)??
        };
        self.index = Arc::new(index);
        self.save_index().await;
        Ok(restored)
    }

    /// Drops the chunks the newest head says its writer made unreferenced: a writer that died
    /// between its head write and its drops leaves them there. Bounded by their sequences, so a
    /// chunk stored again since is kept.
    async fn collect_garbage(&self) {
        let garbage: Vec<(String, u64)> = self
            .head
            .garbage
            .iter()
            .map(|c| (c.sha.clone(), c.seq))
            .collect();
        if !garbage.is_empty() {
            debug!(n = garbage.len(), "dropping chunks the previous owner left");
            self.drop_chunks(garbage).await;
        }
    }

    async fn drop_chunks(&self, chunks: Vec<(String, u64)>) {
        let n = chunks.len() as u64;
        let failed = futures::stream::iter(chunks)
            .map(|(sha, seq)| async move { self.store.drop_chunk(&self.sid, &sha, seq).await })
            .buffer_unordered(IN_FLIGHT)
            .filter(|r| std::future::ready(r.is_err()))
            .count()
            .await;
        if failed > 0 {
            warn!(
                failed,
                "some unreferenced snapshot chunks were not dropped (dropped at the next takeover)"
            );
        }
        metrics::counter!("oh_worker_snapshot_chunks_dropped_total").increment(n - failed as u64);
    }

    /// Snapshots the workspace as of event `event_id`.
    ///
    /// # Errors
    /// [`SnapError::TooLarge`] (nothing stored), `Fenced` (a newer owner took over: stop),
    /// or a NATS or file error (the previous snapshot stands).
    pub(crate) async fn snapshot(&mut self, event_id: Option<u64>) -> Result<Taken, SnapError> {
        let started = Instant::now();
        let res = self.snapshot_inner(event_id).await;
        let result = match &res {
            Ok(Taken::Unchanged) => "unchanged",
            Ok(Taken::Stored { .. }) => "stored",
            Err(SnapError::TooLarge { .. } | SnapError::TooMany { .. }) => "too_large",
            Err(SnapError::Snapshot(SnapshotError::Fenced { .. })) => "fenced",
            Err(_) => "failed",
        };
        metrics::counter!("oh_worker_snapshots_total", "result" => result).increment(1);
        metrics::histogram!("oh_worker_snapshot_seconds", "result" => result)
            .record(started.elapsed());
        if let Ok(Taken::Stored {
            files,
            bytes,
            uploaded,
        }) = res
        {
            metrics::counter!("oh_worker_snapshot_bytes_uploaded_total").increment(uploaded);
            debug!(
                files,
                bytes,
                uploaded,
                us = started.elapsed().as_micros() as u64,
                "workspace snapshot stored"
            );
        }
        res
    }

    async fn snapshot_inner(&mut self, event_id: Option<u64>) -> Result<Taken, SnapError> {
        if !self.head.has_snapshot() && !self.place.dir.exists() {
            // No folder and nothing stored (e.g. a session that never ran a command).
            return Ok(Taken::Unchanged);
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Bytes)>(IN_FLIGHT);
        let (known, old) = (Arc::clone(&self.chunks), Arc::clone(&self.index));
        let (dir, max_bytes) = (self.place.dir.clone(), self.max_bytes);
        let job = tokio::task::spawn_blocking(move || {
            scan(&dir, &old, &known, (max_bytes, MAX_ENTRIES), &tx)
        });
        // Store new chunks while the scan goes on.
        let mut uploaded: HashMap<String, u64> = HashMap::new();
        let mut uploaded_bytes = 0u64;
        let mut inflight = futures::stream::FuturesUnordered::new();
        let mut upload_err = None;
        loop {
            tokio::select! {
                next = rx.recv(), if inflight.len() < IN_FLIGHT && upload_err.is_none() => match next {
                    Some((sha, bytes)) => {
                        uploaded_bytes += bytes.len() as u64;
                        let put = self.store.put_chunk(&self.sid, &sha, bytes);
                        inflight.push(async move { put.await.map(|seq| (sha, seq)) });
                    }
                    None => break,
                },
                Some(done) = inflight.next() => match done {
                    Ok((sha, seq)) => { uploaded.insert(sha, seq); }
                    Err(e) => { upload_err = Some(e); rx.close(); }
                },
                else => break,
            }
        }
        while let Some(done) = inflight.next().await {
            match done {
                Ok((sha, seq)) => {
                    uploaded.insert(sha, seq);
                }
                Err(e) => upload_err = Some(e),
            }
        }
        let res = job.await.map_err(std::io::Error::other)?;
        let scan = match (res, upload_err) {
            (Ok(s), None) => s,
            (res, err) => {
                self.forget(uploaded).await;
                return Err(match err {
                    Some(e) => e.into(),
                    None => res
                        .err()
                        .unwrap_or_else(|| std::io::Error::other("scan").into()),
                });
            }
        };
        // The index caches what each file's stat stands for, committed or not.
        self.index = Arc::new(scan.index);
        let sha = scan.entries_sha;
        if sha == self.head.entries_sha || (!self.head.has_snapshot() && scan.entries.is_empty()) {
            return Ok(Taken::Unchanged);
        }
        let mut table = BTreeMap::new();
        for e in &scan.entries {
            if let Entry::File { chunks, .. } = e {
                for c in chunks {
                    let seq = uploaded.get(c).or_else(|| self.chunks.get(c)).copied();
                    match seq {
                        Some(s) => {
                            table.insert(c.clone(), s);
                        }
                        None => {
                            self.forget(uploaded).await;
                            return Err(std::io::Error::other(format!(
                                "chunk {c} neither stored nor known"
                            ))
                            .into());
                        }
                    }
                }
            }
        }
        let body = Body {
            entries: scan.entries,
            chunks: table,
        };
        let body_refs = match self.store.put_body(&self.sid, &body).await {
            Ok(r) => r,
            Err(e) => {
                self.forget(uploaded).await;
                return Err(e.into());
            }
        };
        // What this head makes unreferenced: dropped right after it commits, and named in it
        // so that the next owner drops them if this one dies in between.
        let held: HashSet<&str> = body
            .chunks
            .keys()
            .map(String::as_str)
            .chain(body_refs.iter().map(|c| c.sha.as_str()))
            .collect();
        let stale: Vec<ChunkRef> = self
            .chunks
            .iter()
            .map(|(s, q)| ChunkRef {
                sha: s.clone(),
                seq: *q,
                len: 0,
            })
            .chain(self.head.body.iter().cloned())
            .filter(|c| !held.contains(c.sha.as_str()))
            .collect();
        let head = Head {
            garbage: stale.iter().take(MAX_GARBAGE).cloned().collect(),
            epoch: self.epoch,
            snapshot_epoch: self.epoch,
            event_id,
            taken_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            files: scan.files,
            bytes: scan.bytes,
            entries_sha: sha,
            body: body_refs,
        };
        if !self.pause.is_zero() {
            info!(
                ms = self.pause.as_millis() as u64,
                "test hook: pausing before the snapshot head write"
            );
            tokio::time::sleep(self.pause).await;
        }
        let seq = match self
            .store
            .write_snapshot_head(&self.sid, &head, self.head_seq)
            .await
        {
            Ok(seq) => seq,
            // Fenced: what we stored stays unreferenced (dropped with the conversation); the
            // new owner's next snapshot replaces any chunk it shares with ours.
            Err(e) => return Err(e.into()),
        };
        // Committed. Drop what only the previous manifest held, each bounded by its sequence.
        let (files, bytes) = (head.files, head.bytes);
        self.head_seq = seq;
        self.head = head;
        self.chunks = Arc::new(body.chunks);
        self.drop_chunks(stale.into_iter().map(|c| (c.sha, c.seq)).collect())
            .await;
        self.save_index().await;
        let uploaded = uploaded_bytes + self.head.body.iter().map(|c| c.len).sum::<u64>();
        Ok(Taken::Stored {
            files,
            bytes,
            uploaded,
        })
    }

    /// Drops chunks stored by a snapshot that was then abandoned.
    async fn forget(&self, uploaded: HashMap<String, u64>) {
        let stale: Vec<(String, u64)> = uploaded
            .into_iter()
            .filter(|(s, _)| !self.chunks.contains_key(s))
            .collect();
        self.drop_chunks(stale).await;
    }

    async fn save_index(&self) {
        let (path, index) = (self.place.index.clone(), Arc::clone(&self.index));
        let res = tokio::task::spawn_blocking(move || {
            let bytes = serde_json::to_vec(&*index).map_err(std::io::Error::other)?;
            let tmp = path.with_extension("snapshot.tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            std::fs::rename(&tmp, &path)
        })
        .await;
        if let Ok(Err(e)) | Err(e) = res.map_err(std::io::Error::other) {
            warn!(error = %e, "local snapshot index not written (the next restore fetches everything)");
        }
    }

    /// Sets the test hook `OH_TEST_SNAPSHOT_PAUSE_MS`.
    pub(crate) fn with_pause(mut self, pause: std::time::Duration) -> Self {
        self.pause = pause;
        self
    }

    /// The head as committed (tests and logs).
    pub(crate) fn head(&self) -> &Head {
        &self.head
    }
}

/// First half of a restore (blocking): removes what the manifest lacks or holds as another
/// kind, creates directories and symlinks, and lists the files to fetch (indexes into
/// `entries`).
fn prepare(place: &Place, entries: &[Entry]) -> Result<Vec<usize>, SnapError> {
    // The index is rewritten at the end: a crash meanwhile leaves none (every file is then
    // compared with the manifest by content next time).
    let old: Index = std::fs::read(&place.index)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&place.index);
    let dir = &place.dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let local: BTreeMap<WsPath, Found> = walk(dir)?.into_iter().collect();
    let wanted: HashMap<&WsPath, &Entry> = entries.iter().map(|e| (e.path(), e)).collect();
    // Remove, children before parents (reverse order); a removed folder takes its children.
    let mut removed: Vec<&WsPath> = Vec::new();
    for (path, found) in local.iter().rev() {
        let keep = match (found, wanted.get(path)) {
            (Found::Dir { .. }, Some(Entry::Dir { .. })) => true,
            (Found::File(_), Some(Entry::File { .. })) => true,
            (Found::Link { target }, Some(Entry::Link { target: t, .. })) => target == t,
            _ => false,
        };
        if keep {
            continue;
        }
        let full = dir.join(rel_path(path));
        let res = match found {
            Found::Dir { .. } => std::fs::remove_dir_all(&full),
            _ => std::fs::remove_file(&full),
        };
        match res {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    let gone: HashSet<&WsPath> = removed.into_iter().collect();
    let present = |p: &WsPath| local.contains_key(p) && !gone.contains(p);
    let mut fetch = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let full = dir.join(rel_path(e.path()));
        match e {
            Entry::Dir { .. } => {
                if !present(e.path()) {
                    std::fs::DirBuilder::new().mode(0o700).create(&full)?;
                }
            }
            Entry::Link { target, .. } => {
                if !present(e.path()) {
                    std::os::unix::fs::symlink(rel_path(target), &full)?;
                }
            }
            Entry::File {
                path, chunks, size, ..
            } => {
                let same = present(path)
                    && match (local.get(path), old.files.get(path)) {
                        (Some(Found::File(stat)), Some(k)) if stat.matches(k) => {
                            &k.chunks == chunks
                        }
                        // Unknown to the index (or changed since): the same bytes need no fetch.
                        (Some(Found::File(stat)), _) if stat.size == *size => {
                            same_content(&full, chunks).unwrap_or(false)
                        }
                        _ => false,
                    };
                if !same {
                    fetch.push(i);
                }
            }
        }
    }
    Ok(fetch)
}

/// Whether the file at `path` holds exactly `chunks` (hashed locally: cheaper than a fetch).
fn same_content(path: &Path, chunks: &[String]) -> std::io::Result<bool> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow())
        .open(path)?;
    let mut buf = Vec::with_capacity(CHUNK_BYTES);
    for want in chunks {
        buf.clear();
        Read::by_ref(&mut file)
            .take(CHUNK_BYTES as u64)
            .read_to_end(&mut buf)?;
        if sha256_hex(&buf) != *want {
            return Ok(false);
        }
    }
    // Nothing after the last chunk.
    Ok(file.read(&mut [0u8; 1])? == 0)
}

/// Fetches one file's chunks and writes it (a new file renamed over the path); returns its
/// size.
async fn write_file(
    store: &Store,
    sid: &SessionId,
    dir: &Path,
    entry: &Entry,
) -> Result<u64, SnapError> {
    let Entry::File { path, chunks, .. } = entry else {
        return Ok(0);
    };
    let full = dir.join(rel_path(path));
    let tmp = {
        let mut name = full
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(format!(".oh-restore-{}", uuid::Uuid::new_v4().simple()));
        full.with_file_name(name)
    };
    // Chunks are fetched a batch at a time (in parallel) and written by one blocking call
    // per batch; the first creates the new file, the last renames it into place.
    let mut file: Option<std::fs::File> = None;
    let mut n = 0u64;
    let res: Result<(), SnapError> = async {
        for batch in chunks.chunks(WRITE_BATCH) {
            let parts =
                futures::future::try_join_all(batch.iter().map(|sha| store.get_chunk(sid, sha)))
                    .await?;
            n += parts.iter().map(|p| p.len() as u64).sum::<u64>();
            let (open, tmp) = (file.take(), tmp.clone());
            file = Some(
                tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                    let mut f = match open {
                        Some(f) => f,
                        None => create_new(&tmp)?,
                    };
                    for p in parts {
                        f.write_all(&p)?;
                    }
                    Ok(f)
                })
                .await
                .map_err(std::io::Error::other)??,
            );
        }
        let (open, tmp, full) = (file.take(), tmp.clone(), full.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if open.is_none() {
                create_new(&tmp)?; // an empty file
            }
            drop(open);
            std::fs::rename(&tmp, &full)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(())
    }
    .await;
    match res {
        Ok(()) => Ok(n),
        Err(e) => {
            drop(file);
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

/// A new file for a restore: `0600`, never through a symlink, never over an existing path.
fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nofollow())
        .open(path)
}

/// Second half of a restore (blocking): modes, mtimes, ownership; returns the new index.
fn finish_restore(
    place: &Place,
    entries: &[Entry],
    left_out: &HashSet<usize>,
) -> Result<Index, SnapError> {
    let dir = &place.dir;
    let own = |p: &Path| -> std::io::Result<()> {
        match place.owner {
            Some((uid, gid)) => std::os::unix::fs::lchown(p, Some(uid), Some(gid)),
            None => Ok(()),
        }
    };
    own(dir)?;
    for (i, e) in entries.iter().enumerate() {
        let full = dir.join(rel_path(e.path()));
        match e {
            Entry::File { mode, mtime_ns, .. } => {
                if left_out.contains(&i) {
                    continue;
                }
                own(&full)?;
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode & 0o777))?;
                set_mtime(&full, *mtime_ns)?;
            }
            Entry::Link { .. } => own(&full)?,
            Entry::Dir { .. } => own(&full)?,
        }
    }
    // Directory modes last, children first (a read-only folder must not block its files).
    for e in entries.iter().rev() {
        if let Entry::Dir { path, mode } = e {
            std::fs::set_permissions(
                dir.join(rel_path(path)),
                std::fs::Permissions::from_mode(mode & 0o777),
            )?;
        }
    }
    let mut index = Index::default();
    let chunks_of: HashMap<&WsPath, &Vec<String>> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| !left_out.contains(i))
        .filter_map(|(_, e)| match e {
            Entry::File { path, chunks, .. } => Some((path, chunks)),
            _ => None,
        })
        .collect();
    for (path, found) in walk(dir)? {
        if let (Found::File(stat), Some(chunks)) = (found, chunks_of.get(&path)) {
            index.files.insert(path, stat.known((*chunks).clone()));
        }
    }
    Ok(index)
}

/// Sets a file's mtime without opening it or following a symlink (`mtime_ns` < 0: left).
fn set_mtime(path: &Path, mtime_ns: i64) -> std::io::Result<()> {
    if mtime_ns < 0 {
        return Ok(());
    }
    let times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: mtime_ns / 1_000_000_000,
            tv_nsec: mtime_ns % 1_000_000_000,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(std::io::Error::from)
}

/// What the agent is told after a restore, if anything: file changes after the snapshot are
/// gone (the previous owner stopped before its next snapshot), or the snapshot could not be
/// read.
pub(crate) fn lost_changes_note(restored: &Restored, history: &[Event]) -> Option<String> {
    if let Some(why) = &restored.failed {
        return Some(format!(
            "The workspace could not be fully restored from its snapshot ({why}); some files may \
             be missing or older than expected. Check the files you rely on."
        ));
    }
    let after = |id: u64| restored.event_id.is_none_or(|e| id > e);
    let lost: Vec<u64> = history
        .iter()
        .filter(|e| {
            matches!(
                e.action_type(),
                Some("run" | "run_ipython" | "write" | "edit")
            )
        })
        .filter_map(|e| e.id)
        .filter(|&id| after(id))
        .collect();
    if lost.is_empty() {
        return None;
    }
    let ids = lost
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match restored.event_id {
        Some(at) => Some(format!(
            "This conversation moved to another worker. Its workspace was restored from the \
             snapshot taken at event {at} (the last completed turn or step); changes to files \
             made by the actions after it (events {ids}) are not in the workspace. Check the \
             files before relying on them."
        )),
        None if restored.local_empty => Some(format!(
            "This conversation moved to another worker before any snapshot of its workspace was \
             taken: the workspace is empty, and the files written by earlier actions (events \
             {ids}) are gone."
        )),
        None => None,
    }
}

#[cfg(test)]
#[path = "workspace_tests.rs"]
mod tests;
