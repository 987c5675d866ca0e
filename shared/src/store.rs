//! JetStream: stream/bucket setup, conversation metadata, reads of a session's event log, and
//! payloads stored out of line.
//!
//! **Invariant:** a session's events are the messages of its subject `{ns}.ev.{sid}`, in stream
//! order, with dense ids 0..n (header `Oh-Event-Id`). Only the owning worker appends
//! ([`crate::journal`]); everyone may read. The work queues are in [`crate::queue`].
//!
//! Replay seek ([`Store::seek`]) is a binary search over stream sequences with direct gets,
//! bounded by the fact that ids are dense: `seq(k)` lies in
//! `[first.seq + (k - first.id), last.seq - (last.id - k)]`, so a session written without
//! interleaving costs O(1) look-ups and the worst case O(log n).
//!
//! Payloads larger than the server's `max_payload` (1 MB by default) go to the object store
//! `{ns}_blobs`; the message then carries header `Oh-Blob` and an empty body ([`Store::pack`],
//! [`Store::unpack`]). Nothing is refused silently for size.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, object_store, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::id::{SessionId, UserId};
use crate::names::Names;
use crate::wire::{
    HDR_AGENT_STATE, HDR_APPLIED_ACTION, HDR_BLOB, HDR_EPOCH, HDR_EVENT_ID, HDR_INTERRUPTS,
};

/// Why a JetStream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The NATS deployment cannot give this server's guarantees (not retried).
    #[error("{detail}")]
    Unsupported {
        /// What is wrong and what to run instead.
        detail: String,
    },
    /// Creating or opening a stream, bucket or consumer failed.
    #[error("JetStream setup of {what} failed: {source}")]
    Setup {
        /// Which object.
        what: String,
        /// Underlying error.
        #[source]
        source: async_nats::Error,
    },
    /// A read or write failed (NATS unreachable, timeout, ...).
    #[error("JetStream {op} failed: {source}")]
    Nats {
        /// Which operation.
        op: &'static str,
        /// Underlying error.
        #[source]
        source: async_nats::Error,
    },
    /// Stored data that does not have the expected shape.
    #[error("corrupt {what} in session {session}: {detail}")]
    Corrupt {
        /// What was read.
        what: &'static str,
        /// Which session.
        session: String,
        /// What is wrong.
        detail: String,
    },
}

impl StoreError {
    /// Whether the write was refused because a stream is full ([`storage_full`]).
    pub fn is_storage_full(&self) -> bool {
        match self {
            StoreError::Nats { source, .. } | StoreError::Setup { source, .. } => {
                storage_full(source.as_ref())
            }
            StoreError::Corrupt { .. } | StoreError::Unsupported { .. } => false,
        }
    }

    /// Whether trying again may succeed: NATS did not answer or refused for now (a timeout,
    /// a lost connection, a stream or consumer leader being elected). Stored data of the wrong
    /// shape or a deployment that cannot fence stays as it is.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Nats { .. } | StoreError::Setup { .. })
    }
}

pub(crate) fn nats(op: &'static str) -> impl FnOnce(async_nats::Error) -> StoreError {
    move |source| StoreError::Nats { op, source }
}

/// How long a publish answered "duplicate, sequence 0" is re-sent (same msg id) before the
/// caller gets an error.
pub(crate) const UNCONFIRMED_PATIENCE: Duration = Duration::from_secs(10);

/// Whether a publish ack confirms nothing: a clustered stream answers a msg id it holds only
/// in flight (proposed, not yet stored; never stored if its leader lost its quorum meanwhile)
/// with `duplicate` and sequence 0 (nats-server#5827, #6415; seen on 2.10.27 when the events
/// stream's leader was partitioned away, and the action was lost). Sequence 0 means "not
/// stored": the publish is re-sent with the same msg id until it gets a real sequence.
pub(crate) fn unconfirmed(ack: &jetstream::publish::PublishAck) -> bool {
    ack.sequence == 0
}

/// The error of a publish that stayed unconfirmed (see [`unconfirmed`]).
pub(crate) fn unconfirmed_error(op: &'static str) -> StoreError {
    nats(op)(boxed(std::io::Error::other(
        "JetStream did not confirm the publish (duplicate of a message still in flight)",
    )))
}

pub(crate) fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> async_nats::Error {
    Box::new(e)
}

/// Gets or creates a stream; with `apply`, an existing stream whose limits differ from
/// `config`'s is updated to them (a deployment made by an older version gets the limits).
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
    apply: bool,
) -> Result<stream::Stream, async_nats::Error> {
    let stream = js
        .get_or_create_stream(config.clone())
        .await
        .map_err(boxed)?;
    if apply {
        // The info that came with the stream (no second request). A limit of 0 in a config
        // means "none", which the server reports as -1.
        let none_if_unset = |n: i64| if n <= 0 { -1 } else { n };
        let info = &stream.cached_info().config;
        let differs = none_if_unset(info.max_messages_per_subject)
            != none_if_unset(config.max_messages_per_subject)
            || none_if_unset(info.max_bytes) != none_if_unset(config.max_bytes)
            || info.max_age != config.max_age
            || info.discard != config.discard
            || info.discard_new_per_subject != config.discard_new_per_subject
            || info.num_replicas.max(1) != config.num_replicas.max(1)
            || info.duplicate_window != config.duplicate_window;
        if differs {
            // RePublish cannot be changed on nats-server 2.9: keep the stream's own.
            let mut update = config.clone();
            update.republish.clone_from(&info.republish);
            js.update_stream(update).await.map_err(boxed)?;
        }
    }
    Ok(stream)
}

/// The newest message on `subject`, `None` if there is none. On a replicated stream
/// (`leader`) it is asked of the stream's leader (`STREAM.MSG.GET`): a direct get may be
/// answered by any replica, including one still catching up after a restart or a partition,
/// whose newest message can be older than what the leader has acknowledged — a stale head, a
/// page that starts in the wrong place. A single server answers direct gets exactly.
pub(crate) async fn get_last(
    stream: &stream::Stream,
    leader: bool,
    subject: String,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>, async_nats::Error> {
    if leader {
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(boxed(e)),
        }
    } else {
        match stream.direct_get_last_for_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(boxed(e)),
        }
    }
}

/// The first message on `subject` at or after stream sequence `seq` (see [`get_last`]).
pub(crate) async fn get_first_from(
    stream: &stream::Stream,
    leader: bool,
    subject: String,
    seq: u64,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>, async_nats::Error> {
    if leader {
        match stream
            .get_first_raw_message_by_subject(&subject, seq.max(1))
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(boxed(e)),
        }
    } else {
        let res = if seq <= 1 {
            stream.direct_get_first_for_subject(subject).await
        } else {
            stream.direct_get_next_for_subject(subject, Some(seq)).await
        };
        match res {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(boxed(e)),
        }
    }
}

/// Runs `open` until it succeeds, for at most `patience`: a process started beside a NATS
/// cluster that is still electing its leaders (JetStream answers "temporarily unavailable")
/// waits for it instead of exiting. An [`StoreError::Unsupported`] deployment is not retried.
///
/// # Errors
/// The last error once `patience` is spent, or at once an unsupported deployment.
pub async fn open_patiently<F, Fut>(mut open: F, patience: Duration) -> Result<Store, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Store, StoreError>>,
{
    let started = std::time::Instant::now();
    loop {
        match open().await {
            Ok(store) => return Ok(store),
            Err(e @ StoreError::Unsupported { .. }) => return Err(e),
            Err(e) if started.elapsed() >= patience => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "JetStream not ready; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// How long a process waits at startup for JetStream to become ready.
pub const SETUP_PATIENCE: Duration = Duration::from_secs(60);

/// Whether a clustered nats-server of `version` checks `Nats-Expected-Last-Subject-Sequence`
/// against appends still in flight (2.9.21 and later; nats-server#4320). A single server
/// always did. An unreadable version counts as too old.
pub fn serializes_fenced_appends(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (
        parts.next().flatten(),
        parts.next().flatten(),
        parts.next().flatten(),
    ) {
        (Some(major), Some(minor), Some(patch)) => (major, minor, patch) >= (2, 9, 21),
        _ => false,
    }
}

/// Conversation metadata (durable, in the KV bucket). Field names follow OpenHands'
/// `ConversationMetadata`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationMeta {
    /// Conversation id.
    pub conversation_id: String,
    /// Owner.
    pub user_id: String,
    /// Title (default `Conversation <first 5 chars>`).
    pub title: String,
    /// Creation time, ISO 8601 UTC with `Z`.
    pub created_at: String,
    /// Last update, ISO 8601 UTC with `Z`.
    pub last_updated_at: String,
    /// How it was created (`gui`, `openhands_api`, ...).
    pub trigger: String,
    /// Repository, as given at creation.
    #[serde(default)]
    pub selected_repository: Option<String>,
    /// Branch, as given at creation.
    #[serde(default)]
    pub selected_branch: Option<String>,
    /// Git provider, as given at creation.
    #[serde(default)]
    pub git_provider: Option<String>,
    /// PR numbers.
    #[serde(default)]
    pub pr_number: Vec<i64>,
    /// Extra instructions given at creation.
    #[serde(default)]
    pub conversation_instructions: Option<String>,
    /// Name of the blob holding the `replay_json` trajectory, if one was given.
    #[serde(default)]
    pub replay_blob: Option<String>,
    /// The LLM its user chose in their settings when it was created (unset: the worker's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmChoice>,
}

/// A user's choice of LLM, fixed into a conversation at its creation.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LlmChoice {
    /// Model name sent to the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Base URL of an OpenAI-compatible API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The user's API key for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<KeptSecret>,
}

/// A secret kept in storage (a user's API key): stored as its text, printed as `<redacted>`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct KeptSecret(String);

impl KeptSecret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> KeptSecret {
        KeptSecret(value.into())
    }

    /// The secret itself: only to hand it to the client that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for KeptSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One event read back from the log.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Stream sequence (the fence value of the next append).
    pub seq: u64,
    /// Per-session event id.
    pub id: u64,
    /// Newest user-action sequence applied as of this event.
    pub applied_action: u64,
    /// Writer's epoch (see [`crate::wire::HDR_EPOCH`]).
    pub epoch: u64,
    /// Agent state as of this event.
    pub agent_state: Option<String>,
    /// Interruptions of the current turn (see [`crate::wire::HDR_INTERRUPTS`]).
    pub interrupts: u32,
    /// The client `msg_id` of the action this event applied (a user event), if it had one.
    pub client_msg_id: Option<String>,
    /// The event JSON as stored (blob already resolved).
    pub payload: Bytes,
}

/// A page reader's ephemeral consumer, deleted on drop off the reader's path (a delete is a
/// meta-group round trip on a cluster; the page is read by then). Best effort: one left
/// behind (no runtime, NATS unreachable) goes away by itself when inactive.
struct PageConsumer {
    events: jetstream::stream::Stream,
    name: String,
}

impl Drop for PageConsumer {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (events, name) = (self.events.clone(), std::mem::take(&mut self.name));
            rt.spawn(async move {
                let _ = events.delete_consumer(&name).await;
            });
        }
    }
}

/// Handles to every stream and bucket of one namespace. Cheap to clone (one `Arc`): sessions,
/// feeds and tasks each keep one.
#[derive(Clone)]
pub struct Store(pub(crate) Arc<Handles>);

/// What a [`Store`] shares among its clones.
pub(crate) struct Handles {
    pub(crate) js: jetstream::Context,
    pub(crate) names: Names,
    events: stream::Stream,
    pub(crate) actions: stream::Stream,
    pub(crate) work: stream::Stream,
    meta: stream::Stream,
    /// Workspace snapshots ([`crate::snapshot`]).
    pub(crate) workspaces: stream::Stream,
    blobs: object_store::ObjectStore,
    inline_limit: usize,
    duplicate_window: Duration,
    /// Reads of single messages go to each stream's leader (replicated streams; see
    /// [`get_last`]).
    pub(crate) leader_reads: bool,
}

/// Storage limits of the streams (`OH_MAX_EVENTS_PER_CONVERSATION`, `OH_QUEUE_MAX_MIB`,
/// `OH_QUEUE_MAX_AGE_H`). A full stream refuses the publish (discard `New`): the writer gets
/// an error ([`storage_full`]), never a false ack, and nothing stored is dropped. The event
/// logs have no age limit (replay must be exact); the action and work queues do, since an
/// entry nobody took for that long is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most events in one conversation's log.
    pub max_events_per_conversation: i64,
    /// Bytes the action queue may hold (actions not yet taken by a worker).
    pub queue_max_bytes: i64,
    /// Age after which an untaken action or start request is discarded.
    pub queue_max_age: Duration,
    /// Replicas of every stream (`OH_STREAM_REPLICAS`; 1 on a single server).
    pub replicas: usize,
    /// JetStream's duplicate window (`OH_DUPLICATE_WINDOW_S`): retries with one msg id within
    /// it are stored once; later ones are caught by the owner against the log.
    pub duplicate_window: Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_events_per_conversation: 100_000,
            queue_max_bytes: 1 << 30,
            queue_max_age: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
            duplicate_window: DUPLICATE_WINDOW,
        }
    }
}

/// Whether a JetStream publish failed because a stream is full (its bytes, its messages or a
/// conversation's events): error code 10077, "maximum ... exceeded". Not retryable: the
/// caller reports it.
pub fn storage_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(js) = err.downcast_ref::<async_nats::jetstream::Error>() {
            return js.error_code() == async_nats::jetstream::ErrorCode::STREAM_STORE_FAILED;
        }
        cur = err.source();
    }
    false
}

/// How long a published message may wait for its JetStream ack.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Where a read starts: its first event (as fetched by the search) and the newest id.
struct Bounds {
    start: StoredEvent,
    last_id: u64,
}

/// JetStream's duplicate window on every stream: a publish with a `Nats-Msg-Id` seen within it
/// is acknowledged without being stored again.
/// The default duplicate window (JetStream's own default).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

impl Store {
    /// Creates (or opens) every stream and bucket of the namespace. Idempotent; both binaries
    /// call it at startup.
    ///
    /// # Errors
    /// [`StoreError::Setup`] naming what could not be created.
    pub async fn open(client: async_nats::Client, names: Names) -> Result<Self, StoreError> {
        Self::open_inner(client, names, StoreLimits::default(), false).await
    }

    /// [`Store::open`], and brings the streams' limits to `limits` (workers do this at startup;
    /// every process should be given the same limits).
    ///
    /// # Errors
    /// [`StoreError::Setup`] naming what could not be created or updated.
    pub async fn open_with(
        client: async_nats::Client,
        names: Names,
        limits: StoreLimits,
    ) -> Result<Self, StoreError> {
        Self::open_inner(client, names, limits, true).await
    }

    /// [`Store::open`] creating missing streams with `limits` but never changing an existing
    /// stream: the gateway's NATS user may not update streams (only workers bring their limits
    /// to the configured ones).
    ///
    /// # Errors
    /// [`StoreError::Setup`] naming what could not be found or created.
    pub async fn open_keeping_limits(
        client: async_nats::Client,
        names: Names,
        limits: StoreLimits,
    ) -> Result<Self, StoreError> {
        Self::open_inner(client, names, limits, false).await
    }

    async fn open_inner(
        client: async_nats::Client,
        names: Names,
        limits: StoreLimits,
        apply: bool,
    ) -> Result<Self, StoreError> {
        let js = jetstream::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .build(client.clone());
        let setup = |what: &str| {
            let what = what.to_owned();
            move |e: async_nats::Error| StoreError::Setup { what, source: e }
        };
        let dup = limits.duplicate_window;
        let events = ensure_stream(
            &js,
            stream::Config {
                name: names.events_stream(),
                subjects: vec![names.events_subjects()],
                storage: stream::StorageType::File,
                num_replicas: limits.replicas,
                allow_direct: true,
                duplicate_window: dup,
                // A full log refuses the append; nothing old is ever dropped.
                max_messages_per_subject: limits.max_events_per_conversation,
                discard: stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                ..Default::default()
            },
            apply,
        )
        .await
        .map_err(|e| setup(&names.events_stream())(e))?;
        // Read after a JetStream request: the server's INFO has arrived by now.
        let info = client.server_info();
        if info.cluster.is_some() && !serializes_fenced_appends(&info.version) {
            return Err(StoreError::Unsupported {
                detail: format!(
                    "nats-server {} in a cluster ({:?}) does not serialize appends that expect a \
                     last subject sequence (nats-server#4320, fixed in 2.9.21): two owners of a \
                     session could both write. Run nats-server 2.9.21 or newer on every node",
                    info.version, info.cluster
                ),
            });
        }
        let actions = ensure_stream(
            &js,
            stream::Config {
                name: names.actions_stream(),
                subjects: vec![names.actions_subjects()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: limits.replicas,
                allow_direct: true,
                duplicate_window: dup,
                // The owner's live feed (`queue::ActionFeed`): each action once stored.
                republish: Some(stream::Republish {
                    source: names.actions_republish().0,
                    destination: names.actions_republish().1,
                    headers_only: false,
                }),
                max_bytes: limits.queue_max_bytes,
                max_age: limits.queue_max_age,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            },
            apply,
        )
        .await
        .map_err(|e| setup(&names.actions_stream())(e))?;
        if apply && actions.cached_info().config.republish.is_none() {
            // nats-server 2.9 cannot add RePublish to an existing stream.
            tracing::error!(
                stream = names.actions_stream(),
                "the actions stream was created without RePublish (by an older version): \
                 actions reach their owners only through the workers' recheck, within 2 s. \
                 Recreate it to restore immediate delivery: stop the gateways, let the workers \
                 apply what is queued, delete the stream (`nats stream rm`), start again"
            );
        }
        let work = ensure_stream(
            &js,
            stream::Config {
                name: names.work_stream(),
                subjects: vec![names.work_subjects()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: limits.replicas,
                max_messages_per_subject: 1,
                discard: stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                duplicate_window: dup,
                max_age: limits.queue_max_age,
                ..Default::default()
            },
            apply,
        )
        .await
        .map_err(|e| setup(&names.work_stream())(e))?;
        // Make sure the shared work consumer exists before anyone publishes.
        work.get_or_create_consumer(
            names.work_consumer(),
            consumer::pull::Config {
                durable_name: Some(names.work_consumer().to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                // A claim takes milliseconds; a request stuck with a dead worker comes back
                // after this. Redelivery while a slow claim still runs is harmless: the
                // second claimant finds the lease taken.
                ack_wait: Duration::from_secs(5),
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| setup("work consumer")(boxed(e)))?;
        // Metadata: one message per conversation on `{ns}.meta.{uid}.{sid}` (last one wins).
        // This is what a KV bucket is, built directly on a stream because async-nats' KV
        // setup does not parse nats-server 2.9's replies.
        let meta = js
            .get_or_create_stream(stream::Config {
                name: names.meta_bucket(),
                subjects: vec![names.meta_subjects()],
                storage: stream::StorageType::File,
                num_replicas: limits.replicas,
                max_messages_per_subject: 1,
                allow_direct: true,
                allow_rollup: true,
                deny_delete: false,
                duplicate_window: dup,
                ..Default::default()
            })
            .await
            .map_err(|e| setup(&names.meta_bucket())(boxed(e)))?;
        // Workspace snapshots: one message per subject (a head, or a chunk by its hash), the
        // newest replacing the older; no age limit (a conversation's files live as long as it).
        let workspaces = ensure_stream(
            &js,
            stream::Config {
                name: names.workspace_stream(),
                subjects: vec![names.workspace_subjects()],
                storage: stream::StorageType::File,
                num_replicas: limits.replicas,
                max_messages_per_subject: 1,
                allow_direct: true,
                duplicate_window: dup,
                ..Default::default()
            },
            false,
        )
        .await
        .map_err(|e| setup(&names.workspace_stream())(e))?;
        let blobs = match js.get_object_store(names.blob_bucket()).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: names.blob_bucket(),
                    storage: stream::StorageType::File,
                    num_replicas: limits.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| setup(&names.blob_bucket())(boxed(e)))?,
        };
        // Read after the setup above has talked to the server: with
        // `retry_on_initial_connect` the client may not have had the server's INFO earlier
        // (then `max_payload` reads 0 and every payload over 1 KiB would go out of line).
        let max_payload = match client.server_info().max_payload {
            0 => 1024 * 1024, // nats-server's default
            n => n,
        };
        let inline_limit = max_payload.saturating_sub(16 * 1024).max(1024);
        Ok(Self(Arc::new(Handles {
            js,
            names,
            events,
            actions,
            work,
            meta,
            workspaces,
            blobs,
            inline_limit,
            duplicate_window: limits.duplicate_window,
            leader_reads: limits.replicas > 1,
        })))
    }

    /// The names of this store's namespace (subjects for core NATS subscribers, Redis keys).
    pub fn names(&self) -> &Names {
        &self.0.names
    }
    /// Largest payload sent inline; larger ones go to the blob store.
    pub fn inline_limit(&self) -> usize {
        self.0.inline_limit
    }

    // ---- metadata ----

    /// Reads a conversation's metadata; `None` if it does not exist *for this user*.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed or the stored value is corrupt.
    pub async fn get_meta(
        &self,
        uid: &UserId,
        sid: &SessionId,
    ) -> Result<Option<ConversationMeta>, StoreError> {
        let subject = self.0.names.meta_subject(uid, sid);
        let v = match get_last(&self.0.meta, self.0.leader_reads, subject).await {
            Ok(Some(m)) if m.payload.is_empty() => None,
            Ok(Some(m)) => Some(m.payload),
            Ok(None) => None,
            Err(e) => return Err(nats("metadata get")(e)),
        };
        match v {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        what: "metadata",
                        session: sid.to_string(),
                        detail: e.to_string(),
                    })
            }
        }
    }

    /// Writes a conversation's metadata.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn put_meta(&self, uid: &UserId, meta: &ConversationMeta) -> Result<(), StoreError> {
        let sid = SessionId::parse(&meta.conversation_id).map_err(|e| StoreError::Corrupt {
            what: "metadata",
            session: meta.conversation_id.clone(),
            detail: e.to_string(),
        })?;
        let bytes = serde_json::to_vec(meta).map_err(|e| nats("metadata encode")(boxed(e)))?;
        let ack = self
            .0
            .js
            .publish(self.0.names.meta_subject(uid, &sid), bytes.into())
            .await
            .map_err(|e| nats("metadata put")(boxed(e)))?;
        ack.await.map_err(|e| nats("metadata put")(boxed(e)))?;
        Ok(())
    }

    /// Changes a conversation's metadata with `change`, only if nobody wrote (or deleted) it
    /// in between (compare-and-set on the subject's last sequence, retried on a race).
    /// Returns the new metadata, or `None` if the conversation does not exist for this user.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed, the stored value is corrupt, or the races did not end.
    pub async fn update_meta(
        &self,
        uid: &UserId,
        sid: &SessionId,
        change: impl Fn(&mut ConversationMeta),
    ) -> Result<Option<ConversationMeta>, StoreError> {
        let subject = self.0.names.meta_subject(uid, sid);
        for _ in 0..5 {
            // The leader's copy: the sequence must be the newest.
            let Some(last) = get_last(&self.0.meta, true, subject.clone())
                .await
                .map_err(nats("metadata get"))?
            else {
                return Ok(None);
            };
            if last.payload.is_empty() {
                return Ok(None);
            }
            let mut meta: ConversationMeta =
                serde_json::from_slice(&last.payload).map_err(|e| StoreError::Corrupt {
                    what: "metadata",
                    session: sid.to_string(),
                    detail: e.to_string(),
                })?;
            change(&mut meta);
            let bytes = serde_json::to_vec(&meta).map_err(|e| nats("metadata encode")(boxed(e)))?;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                last.sequence.to_string().as_str(),
            );
            let sent = self
                .0
                .js
                .publish_with_headers(subject.clone(), headers, bytes.into())
                .await
                .map_err(|e| nats("metadata put")(boxed(e)))?;
            match sent.await {
                Ok(_) => return Ok(Some(meta)),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence => {}
                Err(e) => return Err(nats("metadata put")(boxed(e))),
            }
        }
        Err(nats("metadata put")(boxed(std::io::Error::other(
            "metadata changed concurrently five times in a row",
        ))))
    }

    /// Deletes a conversation's metadata.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn delete_meta(&self, uid: &UserId, sid: &SessionId) -> Result<(), StoreError> {
        self.0
            .meta
            .purge()
            .filter(self.0.names.meta_subject(uid, sid))
            .await
            .map_err(|e| nats("metadata purge")(boxed(e)))?;
        Ok(())
    }

    /// Every conversation of a user (unordered). Costs O(that user's conversations).
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn list_meta(&self, uid: &UserId) -> Result<Vec<ConversationMeta>, StoreError> {
        let mut subjects = self
            .0
            .meta
            .info_with_subjects(self.0.names.meta_user_filter(uid))
            .await
            .map_err(|e| nats("metadata list")(boxed(e)))?;
        let prefix = self.0.names.meta_user_prefix(uid);
        let mut out = Vec::new();
        while let Some(item) = subjects.next().await {
            let (subject, _) = item.map_err(|e| nats("metadata list")(boxed(e)))?;
            let Some(Ok(sid)) = subject.strip_prefix(&prefix).map(SessionId::parse) else {
                continue;
            };
            if let Some(meta) = self.get_meta(uid, &sid).await? {
                out.push(meta);
            }
        }
        Ok(out)
    }

    /// JetStream's duplicate window of the streams (as configured here).
    pub fn duplicate_window(&self) -> Duration {
        self.0.duplicate_window
    }

    // ---- event log ----

    fn to_stored(&self, sid: &SessionId, m: &StoredParts) -> Result<Meta, StoreError> {
        let corrupt = |detail: &str| StoreError::Corrupt {
            what: "event message",
            session: sid.to_string(),
            detail: detail.to_owned(),
        };
        let id = header_u64(&m.headers, HDR_EVENT_ID).ok_or_else(|| corrupt("no Oh-Event-Id"))?;
        Ok(Meta {
            id,
            applied_action: header_u64(&m.headers, HDR_APPLIED_ACTION).unwrap_or(0),
            epoch: header_u64(&m.headers, HDR_EPOCH).unwrap_or(0),
            agent_state: m
                .headers
                .get(HDR_AGENT_STATE)
                .map(|v| v.as_str().to_owned()),
            interrupts: header_u64(&m.headers, HDR_INTERRUPTS)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            client_msg_id: m
                .headers
                .get(crate::wire::HDR_CLIENT_MSG_ID)
                .map(|v| v.as_str().to_owned()),
        })
    }

    async fn direct(
        &self,
        sid: &SessionId,
        which: Which,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let subject = self.0.names.events_subject(sid);
        let leader = self.0.leader_reads;
        let res = match which {
            Which::First => get_first_from(&self.0.events, leader, subject, 1).await,
            Which::Last => get_last(&self.0.events, leader, subject).await,
            Which::NextFrom(seq) => get_first_from(&self.0.events, leader, subject, seq).await,
        };
        let msg = match res {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(e) => return Err(nats("event read")(e)),
        };
        let parts = StoredParts {
            headers: msg.headers,
        };
        let meta = self.to_stored(sid, &parts)?;
        let payload = self.unpack(&parts.headers, msg.payload).await?;
        Ok(Some(meta.into_event(msg.sequence, payload)))
    }

    /// The newest event of a session, or `None` if it has none.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed or the message is corrupt.
    pub async fn last_event(&self, sid: &SessionId) -> Result<Option<StoredEvent>, StoreError> {
        self.direct(sid, Which::Last).await
    }

    /// The stream sequence of event `id` of a session, `None` if there is no such event.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed or the log is not dense.
    pub async fn seek(&self, sid: &SessionId, id: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.bounds(sid, id, None).await?.map(|b| b.start.seq))
    }

    /// For event `id` of a session (or the oldest one kept, if `id` is older): where it is and
    /// the newest event's id, `None` if the log has nothing at or after `id`. Binary search over
    /// stream sequences with direct gets; `head`, the newest event if the caller has read it,
    /// saves reading it again (and every read when `id` is the head itself).
    async fn bounds(
        &self,
        sid: &SessionId,
        id: u64,
        head: Option<&StoredEvent>,
    ) -> Result<Option<Bounds>, StoreError> {
        if let Some(head) = head
            && head.id == id
        {
            // A log is trimmed only from its oldest end: its head is always there.
            return Ok(Some(Bounds {
                start: head.clone(),
                last_id: head.id,
            }));
        }
        let Some(first) = self.direct(sid, Which::First).await? else {
            return Ok(None);
        };
        let last = match head {
            Some(head) => head.clone(),
            None => match self.direct(sid, Which::Last).await? {
                Some(last) => last,
                None => return Ok(None),
            },
        };
        if id > last.id {
            return Ok(None);
        }
        if id <= first.id {
            return Ok(Some(Bounds {
                start: first,
                last_id: last.id,
            }));
        }
        let mut lo = first.seq + (id - first.id);
        let mut hi = last.seq - (last.id - id);
        while lo <= hi {
            let mid = lo + (hi - lo) / 2;
            let Some(m) = self.direct(sid, Which::NextFrom(mid)).await? else {
                break;
            };
            match m.id.cmp(&id) {
                std::cmp::Ordering::Equal => {
                    return Ok(Some(Bounds {
                        start: m,
                        last_id: last.id,
                    }));
                }
                std::cmp::Ordering::Less => lo = m.seq + 1,
                std::cmp::Ordering::Greater => {
                    if mid == 0 {
                        break;
                    }
                    hi = mid - 1;
                }
            }
        }
        Err(StoreError::Corrupt {
            what: "event log",
            session: sid.to_string(),
            detail: format!("event id {id} missing between {} and {}", first.id, last.id),
        })
    }

    /// Reads up to `max` events of a session in id order, starting at id `from` (inclusive).
    /// Short ranges (what exists after `from`, capped at `max`) use direct gets; long ones an
    /// ordered consumer (one round trip per batch).
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed or the log is corrupt.
    pub async fn read_from(
        &self,
        sid: &SessionId,
        from: u64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.read_page(sid, from, max, usize::MAX).await
    }

    /// Like [`Store::read_from`], but also bounded in bytes: it stops after the event that
    /// brings the page's payloads to `max_bytes` (so a page holds at least one event, and at
    /// most `max_bytes` plus one event), and reads ahead from the server at most about that
    /// much. Readers that hold a page per client (the gateway's replay) use it so a large
    /// history is never in memory at once.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed or the log is corrupt.
    pub async fn read_page(
        &self,
        sid: &SessionId,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.read_page_to(sid, from, None, max, max_bytes).await
    }

    /// Like [`Store::read_page`], with the newest event already read by the caller (`head`,
    /// e.g. a replay's end): it is not read again, neither to find the page's bounds nor as
    /// the page's last event. A short new conversation's replay then costs one direct get per
    /// event before the head.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed or the log is corrupt.
    pub async fn read_page_to(
        &self,
        sid: &SessionId,
        from: u64,
        head: Option<&StoredEvent>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let mut bytes = 0usize;
        let mut full = |ev: &StoredEvent| {
            bytes = bytes.saturating_add(ev.payload.len());
            bytes >= max_bytes
        };
        let Some(Bounds { start, last_id }) = self.bounds(sid, from, head).await? else {
            return Ok(out);
        };
        let start_seq = start.seq;
        let want = usize::try_from(last_id.saturating_sub(start.id) + 1)
            .unwrap_or(usize::MAX)
            .min(max);
        if want <= 64 {
            // The search already fetched the first event.
            let mut seq = start.seq + 1;
            let done = full(&start);
            out.push(start);
            if done {
                return Ok(out);
            }
            while out.len() < want {
                // The log is dense: the event after the head's predecessor is the head.
                let known = head.filter(|h| out.last().is_some_and(|l| l.id + 1 == h.id));
                let ev = match known {
                    Some(head) => head.clone(),
                    None => match self.direct(sid, Which::NextFrom(seq)).await? {
                        Some(ev) => ev,
                        None => break,
                    },
                };
                seq = ev.seq + 1;
                let done = full(&ev);
                out.push(ev);
                if done {
                    break;
                }
            }
            return Ok(out);
        }
        if max_bytes != usize::MAX {
            return self
                .read_bounded(sid, start_seq, want, max_bytes, out, full)
                .await;
        }
        let consumer = self
            .0
            .events
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.0.names.events_subject(sid),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start_seq,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| nats("replay consumer")(boxed(e)))?;
        let mut msgs = consumer
            .messages()
            .await
            .map_err(|e| nats("replay consumer")(boxed(e)))?;
        while out.len() < want {
            let next = tokio::time::timeout(ACK_TIMEOUT, msgs.next())
                .await
                .map_err(|e| nats("replay read")(boxed(e)))?;
            let Some(msg) = next else { break };
            let msg = msg.map_err(|e| nats("replay read")(boxed(e)))?;
            let seq = msg
                .info()
                .map(|i| i.stream_sequence)
                .map_err(|e| nats("replay read")(e))?;
            if seq < start_seq || out.last().is_some_and(|l| seq <= l.seq) {
                // Not ours to return: async-nats recreates an ordered consumer that lost its
                // server before delivering anything with `DeliverPolicy::All` (the start
                // sequence is forgotten), so the subject comes again from its first event;
                // and a recreated consumer may deliver again what it had. Each event of the
                // range once, in order.
                continue;
            }
            let headers = msg.headers.clone().unwrap_or_default();
            let parts = StoredParts { headers };
            let meta = self.to_stored(sid, &parts)?;
            let payload = self.unpack(&parts.headers, msg.payload.clone()).await?;
            out.push(meta.into_event(seq, payload));
        }
        Ok(out)
    }

    /// The events of a session stored after stream sequence `seq` (the `seq` of the last event
    /// of a previous page), bounded like [`Store::read_page`]: the next page of a reader that
    /// goes on where it stopped, without searching for its start again.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed or the log is corrupt.
    pub async fn read_after(
        &self,
        sid: &SessionId,
        seq: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let mut bytes = 0usize;
        let mut full = |ev: &StoredEvent| {
            bytes = bytes.saturating_add(ev.payload.len());
            bytes >= max_bytes
        };
        if max <= 64 {
            let mut next = seq + 1;
            while out.len() < max {
                let Some(ev) = self.direct(sid, Which::NextFrom(next)).await? else {
                    break;
                };
                next = ev.seq + 1;
                let done = full(&ev);
                out.push(ev);
                if done {
                    break;
                }
            }
            return Ok(out);
        }
        self.read_bounded(sid, seq + 1, max, max_bytes, out, full)
            .await
    }

    /// The consumer path of a byte-bounded [`Store::read_page`]: an ephemeral pull consumer
    /// whose batches are bounded in bytes, so the client never buffers much more than a page.
    async fn read_bounded(
        &self,
        sid: &SessionId,
        start_seq: u64,
        want: usize,
        max_bytes: usize,
        mut out: Vec<StoredEvent>,
        mut full: impl FnMut(&StoredEvent) -> bool,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let consumer = self
            .0
            .events
            .create_consumer(consumer::pull::Config {
                filter_subject: self.0.names.events_subject(sid),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start_seq,
                },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(10),
                memory_storage: true,
                // One copy: a page reader lives for one request, and a consumer replicated
                // on a cluster costs a Raft group per page.
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("page consumer")(boxed(e)))?;
        // Deleted when this read ends, however it ends (read, failed or dropped).
        let _delete = PageConsumer {
            events: self.0.events.clone(),
            name: consumer.cached_info().name.clone(),
        };
        if consumer.cached_info().num_pending == 0 {
            // Nothing stored after the start: do not wait for what does not exist yet.
            return Ok(out);
        }
        // A batch must fit the largest message (the server refuses a pull whose byte limit is
        // below the next message's size); an inline payload is at most `inline_limit`.
        let batch_bytes = max_bytes.max(self.0.inline_limit + 64 * 1024);
        let mut msgs = consumer
            .stream()
            .max_messages_per_batch(want.min(1000))
            .max_bytes_per_batch(batch_bytes)
            .messages()
            .await
            .map_err(|e| nats("page consumer")(boxed(e)))?;
        while out.len() < want {
            let next = tokio::time::timeout(ACK_TIMEOUT, msgs.next())
                .await
                .map_err(|e| nats("page read")(boxed(e)))?;
            let Some(msg) = next else { break };
            let msg = msg.map_err(|e| nats("page read")(boxed(e)))?;
            let (seq, pending) = msg
                .info()
                .map(|i| (i.stream_sequence, i.pending))
                .map_err(|e| nats("page read")(e))?;
            if out.last().is_some_and(|l| seq <= l.seq) || seq < start_seq {
                // Delivered again: a consumer whose leader moved to another node of a cluster
                // (its delivered position is replicated lazily without acks) starts over from
                // an older one. Each event once, in order.
                if pending == 0 {
                    break;
                }
                continue;
            }
            let headers = msg.headers.clone().unwrap_or_default();
            let parts = StoredParts { headers };
            let meta = self.to_stored(sid, &parts)?;
            let payload = self.unpack(&parts.headers, msg.payload.clone()).await?;
            let ev = meta.into_event(seq, payload);
            // Nothing more stored: stop rather than wait for what does not exist yet.
            let done = full(&ev) || pending == 0;
            out.push(ev);
            if done {
                break;
            }
        }
        Ok(out)
    }

    /// Decodes an event message received live (core subscription): its id and resolved payload.
    ///
    /// # Errors
    /// [`StoreError`] if the message is not an event message or its blob cannot be read.
    pub async fn decode_live(
        &self,
        sid: &SessionId,
        msg: &async_nats::Message,
    ) -> Result<(u64, Bytes), StoreError> {
        let headers = msg.headers.clone().unwrap_or_default();
        let parts = StoredParts { headers };
        let meta = self.to_stored(sid, &parts)?;
        let payload = self.unpack(&parts.headers, msg.payload.clone()).await?;
        Ok((meta.id, payload))
    }

    // ---- blobs ----

    /// Prepares a payload for publishing: returns it unchanged if it fits in one message,
    /// otherwise stores it in the blob store and returns an empty body plus the `Oh-Blob`
    /// header to add.
    ///
    /// # Errors
    /// [`StoreError`] if the blob could not be stored.
    pub async fn pack(
        &self,
        sid: &SessionId,
        payload: Bytes,
        headers: &mut HeaderMap,
    ) -> Result<Bytes, StoreError> {
        if payload.len() <= self.0.inline_limit {
            return Ok(payload);
        }
        let name = self.0.names.payload_blob(sid);
        self.0
            .blobs
            .put(name.as_str(), &mut payload.as_ref())
            .await
            .map_err(|e| nats("blob put")(boxed(e)))?;
        headers.insert(HDR_BLOB, name.as_str());
        Ok(Bytes::new())
    }

    /// Resolves a payload that may be stored out of line.
    ///
    /// # Errors
    /// [`StoreError`] if the blob is missing or unreadable.
    pub async fn unpack(&self, headers: &HeaderMap, payload: Bytes) -> Result<Bytes, StoreError> {
        match headers.get(HDR_BLOB) {
            Some(name) => self.get_blob(name.as_str()).await,
            None => Ok(payload),
        }
    }

    /// Stores a conversation's `replay_json` trajectory; returns the blob's name, which its
    /// metadata records.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn put_replay(&self, sid: &SessionId, data: &[u8]) -> Result<String, StoreError> {
        let name = self.0.names.replay_blob(sid);
        let mut reader = data;
        self.0
            .blobs
            .put(name.as_str(), &mut reader)
            .await
            .map_err(|e| nats("blob put")(boxed(e)))?;
        Ok(name)
    }

    /// Reads a named blob.
    ///
    /// # Errors
    /// [`StoreError`] if it is missing or NATS failed.
    pub async fn get_blob(&self, name: &str) -> Result<Bytes, StoreError> {
        let mut obj = self
            .0
            .blobs
            .get(name)
            .await
            .map_err(|e| nats("blob get")(boxed(e)))?;
        let mut buf = Vec::new();
        obj.read_to_end(&mut buf)
            .await
            .map_err(|e| nats("blob read")(boxed(e)))?;
        Ok(Bytes::from(buf))
    }

    /// Deletes the out-of-line payload a message's headers name, if any (an applied action's:
    /// its content lives on in the event made from it). A blob already gone is fine.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn delete_payload_blob(&self, headers: &HeaderMap) -> Result<(), StoreError> {
        let Some(name) = headers.get(HDR_BLOB) else {
            return Ok(());
        };
        self.delete_blob(name.as_str()).await
    }

    async fn delete_blob(&self, name: &str) -> Result<(), StoreError> {
        match self.0.blobs.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(nats("delete blob")(boxed(e))),
        }
    }

    /// Deletes everything stored for a session: its events, pending actions,
    /// start request, workspace snapshots, `replay_json` trajectory and every payload stored
    /// out of line (named `{sid}.*`; found by listing the bucket, which holds only payloads
    /// over NATS' message size).
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn purge_session(&self, sid: &SessionId) -> Result<(), StoreError> {
        self.0
            .events
            .purge()
            .filter(self.0.names.events_subject(sid))
            .await
            .map_err(|e| nats("purge events")(boxed(e)))?;
        self.drop_all_actions(sid).await?;
        self.0
            .work
            .purge()
            .filter(self.0.names.work_subject(sid))
            .await
            .map_err(|e| nats("purge work")(boxed(e)))?;
        self.purge_snapshots(sid).await?;
        self.delete_blob(&self.0.names.replay_blob(sid)).await?;
        let prefix = format!("{sid}.");
        let mut list = self
            .0
            .blobs
            .list()
            .await
            .map_err(|e| nats("list blobs")(boxed(e)))?;
        let mut names = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| nats("list blobs")(boxed(e)))?;
            if info.name.starts_with(&prefix) && !info.deleted {
                names.push(info.name);
            }
        }
        for name in names {
            self.delete_blob(&name).await?;
        }
        Ok(())
    }
}

struct StoredParts {
    headers: HeaderMap,
}

struct Meta {
    id: u64,
    applied_action: u64,
    epoch: u64,
    agent_state: Option<String>,
    interrupts: u32,
    client_msg_id: Option<String>,
}

impl Meta {
    fn into_event(self, seq: u64, payload: Bytes) -> StoredEvent {
        StoredEvent {
            seq,
            id: self.id,
            applied_action: self.applied_action,
            epoch: self.epoch,
            agent_state: self.agent_state,
            interrupts: self.interrupts,
            client_msg_id: self.client_msg_id,
            payload,
        }
    }
}

enum Which {
    First,
    Last,
    NextFrom(u64),
}

/// Reads a numeric header.
pub fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name).and_then(|v| v.as_str().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::serializes_fenced_appends;

    #[test]
    fn clustered_fencing_needs_2_9_21() {
        for (v, ok) in [
            ("2.9.10", false),
            ("2.9.20", false),
            ("2.9.21", true),
            ("2.10.27", true),
            ("v2.11.0-beta.1", true),
            ("3.0.0", true),
            ("2.9", false),
            ("", false),
        ] {
            assert_eq!(serializes_fenced_appends(v), ok, "{v}");
        }
    }
}
