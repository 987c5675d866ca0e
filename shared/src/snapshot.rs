//! Workspace snapshots in JetStream: the storage half (the worker's `workspace` module walks,
//! hashes and restores the files).
//!
//! One stream, `{ns}_ws`, one message per subject (a newer message on a subject replaces the
//! older one):
//! - `{ns}.ws.{sid}.c.{sha256}`: a content chunk (at most [`CHUNK_BYTES`]) of the session's
//!   files, or of its manifest, named by the SHA-256 of its bytes. A chunk is stored once per
//!   session however many files or snapshots hold it; a reader checks the hash.
//! - `{ns}.ws.{sid}.h`: the **head**: the epoch of its writer, the event id the snapshot
//!   reflects, and the chunks of the manifest ([`Body`]: every path with its mode, size,
//!   mtime, chunk list or symlink target, and the stream sequence of each chunk).
//!
//! **Fence (invariant):** the head is written only with `Nats-Expected-Last-Subject-Sequence`
//! = the head sequence its writer last saw. A new owner rewrites the head at takeover
//! ([`Store::take_over_snapshots`], its epoch in it) before it restores, so a zombie's later
//! head write fails ([`SnapshotError::Fenced`]), exactly as its event appends do.
//!
//! **Collection:** after a head write commits, its writer drops the chunks the previous
//! manifest held and the new one does not, each purge bounded by the chunk's own sequence
//! ([`Store::drop_chunk`]): a chunk stored again later (a newer message on the subject) is
//! never removed by an older owner's late purge. The head names the chunks it made
//! unreferenced ([`Head::garbage`]), so that the next owner drops them at takeover if the
//! writer died before it did. Chunks stored by a snapshot that never committed (its writer
//! died or was fenced) stay until a later snapshot stores the same content or the conversation
//! is deleted. DELETE purges `{ns}.ws.{sid}.>`.
//!
//! Why a stream and not the JetStream object store: per-session subjects make DELETE one
//! filtered purge, a chunk's existence and content one direct get, and its removal one purge;
//! object names are base64 inside the object store's subjects (no per-session filter) and each
//! object costs a metadata message besides its chunks. Chunks are scoped to their session (no
//! dedupe across conversations): one user cannot learn from timings or refusals whether
//! another holds some content.

use std::collections::BTreeMap;
use std::future::Future;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::id::SessionId;
use crate::store::{Store, StoreError, boxed, nats};

/// Largest chunk of a file (and of a manifest): files are cut at fixed offsets.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        use std::fmt::Write;
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A stored chunk: its hash, stream sequence and length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// SHA-256 (hex) of the bytes.
    pub sha: String,
    /// Stream sequence of the message holding it.
    pub seq: u64,
    /// Bytes.
    pub len: u64,
}

/// The head of a session's snapshots (`{ns}.ws.{sid}.h`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The epoch (takeover sequence of the event log) of the owner that wrote this head.
    pub epoch: u64,
    /// The epoch that took the snapshot (older than `epoch` after a takeover rewrote the head).
    #[serde(default)]
    pub snapshot_epoch: u64,
    /// The newest event of the log when the snapshot was taken: the files are as of this
    /// event. `None` with no snapshot yet.
    #[serde(default)]
    pub event_id: Option<u64>,
    /// When the snapshot was taken (RFC 3339).
    #[serde(default)]
    pub taken_at: String,
    /// Regular files in it.
    #[serde(default)]
    pub files: u64,
    /// Bytes of those files.
    #[serde(default)]
    pub bytes: u64,
    /// SHA-256 of the manifest's entries (equal entries: nothing changed).
    #[serde(default)]
    pub entries_sha: String,
    /// The manifest's chunks, in order; empty when there is no snapshot yet.
    #[serde(default)]
    pub body: Vec<ChunkRef>,
    /// Chunks this head made unreferenced (the previous manifest's, not in this one): its
    /// writer drops them right after writing it; a new owner drops them again at takeover, in
    /// case the writer died in between.
    #[serde(default)]
    pub garbage: Vec<ChunkRef>,
}

impl Head {
    /// A head that holds no snapshot (written at a takeover before any snapshot exists).
    pub fn empty(epoch: u64) -> Self {
        Head {
            epoch,
            snapshot_epoch: 0,
            event_id: None,
            taken_at: String::new(),
            files: 0,
            bytes: 0,
            entries_sha: String::new(),
            body: Vec::new(),
            garbage: Vec::new(),
        }
    }

    /// Whether a snapshot was ever taken.
    pub fn has_snapshot(&self) -> bool {
        !self.body.is_empty()
    }
}

/// The manifest of one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    /// Every path of the workspace, sorted (parents before children).
    pub entries: Vec<Entry>,
    /// The stream sequence of every chunk the entries name.
    pub chunks: BTreeMap<String, u64>,
}

/// One path of a workspace, relative to its root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Entry {
    /// A directory (kept even when empty).
    Dir {
        /// Path.
        path: WsPath,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Path.
        path: WsPath,
        /// Permission bits (executables keep their `x`).
        mode: u32,
        /// Bytes.
        size: u64,
        /// Modification time, nanoseconds since the epoch.
        mtime_ns: i64,
        /// Its content: chunk hashes in order.
        chunks: Vec<String>,
    },
    /// A symbolic link, stored as its target text (never followed).
    Link {
        /// Path.
        path: WsPath,
        /// Target, as `readlink` gives it.
        target: WsPath,
    },
}

impl Entry {
    /// Its path.
    pub fn path(&self) -> &WsPath {
        match self {
            Entry::Dir { path, .. } | Entry::File { path, .. } | Entry::Link { path, .. } => path,
        }
    }
}

/// A path (or link target) as bytes: file names need not be UTF-8. Serialized as the string
/// itself, or `b64:` and its base64 when it is not UTF-8 (or starts with `b64:`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WsPath(pub Vec<u8>);

const B64: &str = "b64:";

impl Serialize for WsPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        match std::str::from_utf8(&self.0) {
            Ok(text) if !text.starts_with(B64) => s.serialize_str(text),
            _ => s.serialize_str(&format!(
                "{B64}{}",
                base64::engine::general_purpose::STANDARD.encode(&self.0)
            )),
        }
    }
}

impl<'de> Deserialize<'de> for WsPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let text = String::deserialize(d)?;
        match text.strip_prefix(B64) {
            Some(enc) => base64::engine::general_purpose::STANDARD
                .decode(enc)
                .map(WsPath)
                .map_err(serde::de::Error::custom),
            None => Ok(WsPath(text.into_bytes())),
        }
    }
}

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A newer owner rewrote the head: this writer is fenced and must stop.
    #[error("snapshot head of session {session} was rewritten by a newer owner")]
    Fenced {
        /// Which session.
        session: String,
    },
    /// NATS failed (or the store is full: [`StoreError::is_storage_full`]).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    fn corrupt(sid: &SessionId, what: &'static str, detail: impl ToString) -> StoreError {
        StoreError::Corrupt {
            what,
            session: sid.to_string(),
            detail: detail.to_string(),
        }
    }

    /// The session's snapshot head and its stream sequence; `None` if it has none.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed or the head is not a [`Head`].
    pub async fn snapshot_head(&self, sid: &SessionId) -> Result<Option<(u64, Head)>, StoreError> {
        let subject = self.0.names.workspace_head_subject(sid);
        match crate::store::get_last(&self.0.workspaces, self.0.leader_reads, subject).await {
            Ok(Some(m)) => {
                let head = serde_json::from_slice(&m.payload)
                    .map_err(|e| Self::corrupt(sid, "snapshot head", e))?;
                Ok(Some((m.sequence, head)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(nats("snapshot head read")(e)),
        }
    }

    /// Writes the head if the stored one is still the one at `expected` (0: none yet);
    /// returns the new head's sequence.
    ///
    /// # Errors
    /// [`SnapshotError::Fenced`] if another writer's head came in between; [`StoreError`] if
    /// NATS failed.
    pub async fn write_snapshot_head(
        &self,
        sid: &SessionId,
        head: &Head,
        expected: u64,
    ) -> Result<u64, SnapshotError> {
        let payload =
            serde_json::to_vec(head).map_err(|e| Self::corrupt(sid, "snapshot head", e))?;
        let publish = PublishMessage::build()
            .payload(payload.into())
            .expected_last_subject_sequence(expected);
        let res = match self
            .0
            .js
            .send_publish(self.0.names.workspace_head_subject(sid), publish)
            .await
        {
            Ok(fut) => fut.await,
            Err(e) => Err(e),
        };
        match res {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(SnapshotError::Fenced {
                    session: sid.to_string(),
                })
            }
            Err(e) => Err(nats("snapshot head write")(boxed(e)).into()),
        }
    }

    /// A new owner's takeover of the snapshots: rewrites the head with `epoch` (the same
    /// snapshot, or an empty head if there is none), so that any earlier owner's next head
    /// write fails. Returns the head's new sequence and the snapshot to restore.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed; [`SnapshotError::Fenced`] only if writers kept
    /// racing (a newer owner took over meanwhile).
    pub async fn take_over_snapshots(
        &self,
        sid: &SessionId,
        epoch: u64,
    ) -> Result<(u64, Head), SnapshotError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (expected, mut head) = match self.snapshot_head(sid).await? {
                Some((seq, head)) => (seq, head),
                None => (0, Head::empty(epoch)),
            };
            if head.epoch > epoch {
                return Err(SnapshotError::Fenced {
                    session: sid.to_string(),
                });
            }
            head.epoch = epoch;
            match self.write_snapshot_head(sid, &head, expected).await {
                Ok(seq) => return Ok((seq, head)),
                // An earlier owner's write landed between our read and write: read again.
                Err(SnapshotError::Fenced { .. }) if attempts < 5 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores one chunk; the future resolves to its stream sequence once JetStream has it.
    /// Publishes are pipelined: call this for many chunks, then await them.
    pub fn put_chunk(
        &self,
        sid: &SessionId,
        sha: &str,
        bytes: Bytes,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send + 'static {
        let js = self.0.js.clone();
        let subject = self.0.names.workspace_chunk_subject(sid, sha);
        async move {
            let ack = js
                .publish(subject, bytes)
                .await
                .map_err(|e| nats("snapshot chunk write")(boxed(e)))?
                .await
                .map_err(|e| nats("snapshot chunk write")(boxed(e)))?;
            Ok(ack.sequence)
        }
    }

    /// Reads one chunk and checks its hash.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if it is missing or its bytes do not match its name.
    pub async fn get_chunk(&self, sid: &SessionId, sha: &str) -> Result<Bytes, StoreError> {
        let subject = self.0.names.workspace_chunk_subject(sid, sha);
        let msg =
            match crate::store::get_last(&self.0.workspaces, self.0.leader_reads, subject).await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(Self::corrupt(
                        sid,
                        "snapshot chunk",
                        format!("{sha} is missing"),
                    ));
                }
                Err(e) => return Err(nats("snapshot chunk read")(e)),
            };
        if sha256_hex(&msg.payload) != sha {
            return Err(Self::corrupt(
                sid,
                "snapshot chunk",
                format!("{sha} does not match its bytes"),
            ));
        }
        Ok(msg.payload)
    }

    /// Removes chunk `sha` if it is still the message at `seq` (a newer copy stays).
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn drop_chunk(&self, sid: &SessionId, sha: &str, seq: u64) -> Result<(), StoreError> {
        self.0
            .workspaces
            .purge()
            .filter(self.0.names.workspace_chunk_subject(sid, sha))
            .sequence(seq + 1)
            .await
            .map_err(|e| nats("snapshot chunk drop")(boxed(e)))?;
        Ok(())
    }

    /// Every chunk stored for the session (their hashes).
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn stored_chunks(&self, sid: &SessionId) -> Result<Vec<String>, StoreError> {
        let filter = self.0.names.workspace_chunk_subjects(sid);
        let prefix = filter.trim_end_matches('*').to_owned();
        let mut subjects = self
            .0
            .workspaces
            .info_with_subjects(filter)
            .await
            .map_err(|e| nats("snapshot chunk list")(boxed(e)))?;
        let mut out = Vec::new();
        while let Some(s) = subjects.next().await {
            let (subject, _count) = s.map_err(|e| nats("snapshot chunk list")(boxed(e)))?;
            if let Some(sha) = subject.strip_prefix(&prefix) {
                out.push(sha.to_owned());
            }
        }
        Ok(out)
    }

    /// Stores a manifest as chunks; returns them in order.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn put_body(
        &self,
        sid: &SessionId,
        body: &Body,
    ) -> Result<Vec<ChunkRef>, StoreError> {
        let bytes = Bytes::from(
            serde_json::to_vec(body).map_err(|e| Self::corrupt(sid, "snapshot manifest", e))?,
        );
        let mut pending = Vec::new();
        for piece in bytes.chunks(CHUNK_BYTES) {
            let sha = sha256_hex(piece);
            let len = piece.len() as u64;
            let put = self.put_chunk(sid, &sha, bytes.slice_ref(piece));
            pending.push(async move { put.await.map(|seq| ChunkRef { sha, seq, len }) });
        }
        futures::future::try_join_all(pending).await
    }

    /// Reads the manifest a head names.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed or a chunk is missing or corrupt.
    pub async fn get_body(&self, sid: &SessionId, head: &Head) -> Result<Body, StoreError> {
        let parts =
            futures::future::try_join_all(head.body.iter().map(|c| self.get_chunk(sid, &c.sha)))
                .await?;
        let bytes = parts.concat();
        serde_json::from_slice(&bytes).map_err(|e| Self::corrupt(sid, "snapshot manifest", e))
    }

    /// Removes every snapshot of a session (head and chunks).
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn purge_snapshots(&self, sid: &SessionId) -> Result<(), StoreError> {
        self.0
            .workspaces
            .purge()
            .filter(self.0.names.workspace_session_subjects(sid))
            .await
            .map_err(|e| nats("purge snapshots")(boxed(e)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_utf8_and_raw_bytes() {
        for raw in [
            b"a/b.txt".to_vec(),
            vec![b'x', 0xff, 0xfe],
            b"b64:looks-encoded".to_vec(),
        ] {
            let json = serde_json::to_string(&WsPath(raw.clone())).unwrap_or_default();
            let back: WsPath = serde_json::from_str(&json).unwrap_or(WsPath(Vec::new()));
            assert_eq!(back.0, raw, "{json}");
        }
        assert_eq!(
            serde_json::to_string(&WsPath(b"src/main.rs".to_vec())).unwrap_or_default(),
            "\"src/main.rs\""
        );
    }

    #[test]
    fn sha256_hex_is_the_standard_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
