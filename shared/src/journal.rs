//! The fenced append to a session's event log: the writing half of the ownership protocol
//! (the lease is in [`crate::ownership`]).
//!
//! **Invariant:** every append carries `Nats-Expected-Last-Subject-Sequence` = the sequence of
//! the previous event this owner saw, so after another worker's takeover record our next append
//! is refused (`WrongLastSequence`) and the session stops here ([`AppendError::Fenced`]).
//! Each append also carries `Nats-Msg-Id = {sid}:{id}:{claim}`: a retry of the same append by
//! the same owner after an unknown outcome (timeout, reconnect) is stored once; another owner
//! (different `claim`) never collides with it.
//!
//! The user event that applies an action sent with a client `msg_id` carries it
//! ([`HDR_CLIENT_MSG_ID`]); the journal remembers the ids of the newest events (seeded from the
//! log at a claim), so a retry that JetStream no longer dedupes — it came after the duplicate
//! window, e.g. after a long outage — is recognised and not applied twice.

use std::time::Duration;

use crate::event::{Event, Source};
use crate::id::SessionId;
use crate::store::{Store, StoreError};
use crate::wire::{
    HDR_AGENT_STATE, HDR_APPLIED_ACTION, HDR_CLIENT_MSG_ID, HDR_EPOCH, HDR_EVENT_ID, HDR_INTERRUPTS,
};
use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use tracing::{debug, warn};

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another worker has taken the session over: stop at once, append nothing more.
    #[error("session {session}: fence {fence} is stale; another worker owns it")]
    Fenced { session: SessionId, fence: u64 },
    /// JetStream did not store the event (after retries).
    #[error("session {session}: append failed: {source}")]
    Publish {
        session: SessionId,
        #[source]
        source: async_nats::Error,
    },
    /// The log is full (`OH_MAX_EVENTS_PER_CONVERSATION`, or the stream's storage): JetStream
    /// refused the event. Not retried; the session cannot go on.
    #[error("session {session}: the event log is full")]
    Full { session: SessionId },
    /// The blob store failed for a large event.
    #[error("session {session}: {source}")]
    Store {
        session: SessionId,
        #[source]
        source: StoreError,
    },
}

/// The append side of one session's log, owned by the session task.
pub struct Journal {
    store: Store,
    sid: SessionId,
    subject: String,
    claim: String,
    /// Stream sequence of the last event (0: none yet).
    last_seq: u64,
    /// Id the next event gets.
    next_id: u64,
    /// Newest user action (stream sequence in the actions stream) applied so far.
    applied_action: u64,
    /// The sequence of our takeover record: this owner's epoch (0 before the takeover).
    epoch: u64,
    /// Agent state as of the last event (carried on every event in `Oh-Agent-State`).
    agent_state: Option<String>,
    /// Takeovers in the middle of the current turn without a completed step since
    /// (`Oh-Interrupts`); bounds how often an input that crashes workers is retried.
    interrupts: u32,
    /// Client `msg_id`s of the actions applied by the newest events, oldest first (bounded).
    client_msg_ids: std::collections::VecDeque<String>,
    /// The same, for lookups.
    client_msg_id_set: std::collections::HashSet<String>,
    /// The client `msg_id` the next append carries (the user event of that action).
    next_client_msg_id: Option<String>,
}

/// Client `msg_id`s a session remembers (the newest ones).
pub const CLIENT_MSG_IDS_KEPT: usize = 10_000;

impl Journal {
    /// Reads where the log stands.
    pub async fn open(store: Store, sid: SessionId, claim: String) -> Result<Self, StoreError> {
        let last = store.last_event(&sid).await?;
        let mut journal = Self::presumed_empty(store, sid, claim);
        journal.load(last.as_ref());
        Ok(journal)
    }

    /// A journal for a log presumed empty (a conversation's first start), without reading its
    /// head: if it is not, the takeover's fenced append is refused and [`Self::take_over`]
    /// reads the head then (one read less for every new conversation).
    pub fn presumed_empty(store: Store, sid: SessionId, claim: String) -> Self {
        let subject = store.0.names.events_subject(&sid);
        Self {
            store,
            subject,
            claim,
            last_seq: 0,
            next_id: 0,
            applied_action: 0,
            agent_state: None,
            interrupts: 0,
            epoch: 0,
            sid,
            client_msg_ids: std::collections::VecDeque::new(),
            client_msg_id_set: std::collections::HashSet::new(),
            next_client_msg_id: None,
        }
    }

    /// Takes where the log stands from its newest event (`None`: empty log).
    fn load(&mut self, last: Option<&crate::store::StoredEvent>) {
        self.last_seq = last.map_or(0, |l| l.seq);
        self.next_id = last.map_or(0, |l| l.id + 1);
        self.applied_action = last.map_or(0, |l| l.applied_action);
        self.agent_state = last.and_then(|l| l.agent_state.clone());
        self.interrupts = last.map_or(0, |l| l.interrupts);
    }

    pub fn is_empty(&self) -> bool {
        self.next_id == 0
    }
    pub fn applied_action(&self) -> u64 {
        self.applied_action
    }
    pub fn last_id(&self) -> Option<u64> {
        self.next_id.checked_sub(1)
    }

    /// This owner's epoch: the stream sequence of its takeover record.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The agent state as of the newest event, as recorded in the log.
    pub fn agent_state(&self) -> Option<&str> {
        self.agent_state.as_deref()
    }

    /// Appends the takeover record, fencing every earlier owner; its sequence is the epoch.
    /// If a stale owner slipped an append in between our read and our takeover, we re-read the
    /// head and try again (we hold the lease, so the other writer is the zombie).
    ///
    /// # Errors
    /// [`AppendError`] if the record cannot be stored.
    pub async fn take_over(&mut self, record: Event) -> Result<u64, AppendError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            // The takeover record carries its own future sequence as epoch only after the
            // fact; until then it announces the epoch it replaces.
            match self.append(record.clone()).await {
                Ok(_) => {
                    self.epoch = self.last_seq;
                    return Ok(self.epoch);
                }
                Err(AppendError::Fenced { .. }) if attempts < 5 => {
                    let last = self.store.last_event(&self.sid).await.map_err(|source| {
                        AppendError::Store {
                            session: self.sid.clone(),
                            source,
                        }
                    })?;
                    self.load(last.as_ref());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Remembers the client `msg_id`s of `events` (read from the log at a claim, oldest first).
    pub fn remember_client_msg_ids(&mut self, events: &[crate::store::StoredEvent]) {
        for id in events.iter().filter_map(|e| e.client_msg_id.as_deref()) {
            self.remember(id.to_owned());
        }
    }

    fn remember(&mut self, id: String) {
        if self.client_msg_id_set.insert(id.clone()) {
            self.client_msg_ids.push_back(id);
            if self.client_msg_ids.len() > CLIENT_MSG_IDS_KEPT
                && let Some(old) = self.client_msg_ids.pop_front()
            {
                self.client_msg_id_set.remove(&old);
            }
        }
    }

    /// Whether an action with this client `msg_id` was already applied (within the newest
    /// [`CLIENT_MSG_IDS_KEPT`] ids).
    pub fn applied_client_msg_id(&self, id: &str) -> bool {
        self.client_msg_id_set.contains(id)
    }

    /// The next append is the user event of an action sent with this client `msg_id`.
    pub fn tag_next(&mut self, id: &str) {
        self.next_client_msg_id = Some(id.to_owned());
    }

    /// Records the controller's state for the headers of the next events, e.g. `running` as
    /// soon as a user message is accepted, so that a crash before the `agent_state_changed`
    /// event still reads as an interrupted turn to the next owner.
    pub fn note_state(&mut self, state: &str) {
        self.agent_state = Some(state.to_owned());
    }

    /// Interruptions of the current turn so far, as recorded in the log.
    pub fn interrupts(&self) -> u32 {
        self.interrupts
    }

    /// Sets the interruption count carried by the next events (0 once a step completes).
    pub fn set_interrupts(&mut self, n: u32) {
        self.interrupts = n;
    }

    /// Marks user action `seq` as applied by the next append.
    pub fn mark_applied(&mut self, seq: u64) {
        self.applied_action = self.applied_action.max(seq);
    }

    /// Appends one event: assigns its id and timestamp (source defaults to environment),
    /// publishes it fenced, and returns it as stored.
    ///
    /// # Errors
    /// [`AppendError::Fenced`] if another worker took over; other variants if JetStream did
    /// not store it.
    pub async fn append(&mut self, mut ev: Event) -> Result<Event, AppendError> {
        let id = self.next_id;
        ev.id = Some(id);
        ev.timestamp = Some(crate::event::now_timestamp());
        if ev.source.is_none() {
            ev.source = Some(Source::Environment);
        }
        // The takeover record (`epoch == 0`, see below) changes no turn: it carries the state
        // it found, so a claim that dies right after it still leaves a `running` turn for the
        // next owner to continue (its own `loading` would read as a turn that ended).
        let agent_state = ev
            .agent_state()
            .filter(|_| self.epoch != 0)
            .map(|s| s.as_str().to_owned())
            .or_else(|| self.agent_state.clone());
        let payload = bytes::Bytes::from(ev.to_json());
        let mut headers = HeaderMap::new();
        headers.insert(HDR_EVENT_ID, id.to_string().as_str());
        headers.insert(HDR_APPLIED_ACTION, self.applied_action.to_string().as_str());
        // The takeover record is written before its own sequence is known: it carries the
        // sequence it fences off (`last_seq`); every later event carries the epoch itself.
        let epoch = if self.epoch == 0 {
            self.last_seq
        } else {
            self.epoch
        };
        headers.insert(HDR_EPOCH, epoch.to_string().as_str());
        if let Some(state) = &agent_state {
            headers.insert(HDR_AGENT_STATE, state.as_str());
        }
        if self.interrupts > 0 {
            headers.insert(HDR_INTERRUPTS, self.interrupts.to_string().as_str());
        }
        let client_msg_id = self.next_client_msg_id.take();
        if let Some(cid) = &client_msg_id {
            headers.insert(HDR_CLIENT_MSG_ID, cid.as_str());
        }
        // Gateways fanning the event out continue the trace of what caused it.
        crate::telemetry::inject_trace(&mut headers);
        let payload = self
            .store
            .pack(&self.sid, payload, &mut headers)
            .await
            .map_err(|source| AppendError::Store {
                session: self.sid.clone(),
                source,
            })?;
        let msg_id = format!("{}:{id}:{}", self.sid, self.claim);
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let publish = PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .message_id(&msg_id)
                .expected_last_subject_sequence(self.last_seq);
            let res = match self
                .store
                .0
                .js
                .send_publish(self.subject.clone(), publish)
                .await
            {
                Ok(fut) => fut.await,
                Err(e) => Err(e),
            };
            match res {
                Ok(ack) if crate::store::unconfirmed(&ack) && attempt < 20 => {
                    // A retry of this append while the first try is in flight: its outcome is
                    // unknown (see `store::unconfirmed`); ask again with the same msg id.
                    warn!(session_id = %self.sid, id, attempt, "append not confirmed (sequence 0); re-sending");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(ack) if crate::store::unconfirmed(&ack) => {
                    return Err(AppendError::Store {
                        session: self.sid.clone(),
                        source: crate::store::unconfirmed_error("append"),
                    });
                }
                Ok(ack) => {
                    if ack.duplicate {
                        debug!(session_id = %self.sid, id, "append was already stored (retry)");
                    }
                    self.last_seq = ack.sequence;
                    self.next_id = id + 1;
                    self.agent_state = agent_state;
                    if let Some(cid) = client_msg_id {
                        self.remember(cid);
                    }
                    metrics::counter!("oh_worker_events_appended_total").increment(1);
                    return Ok(ev);
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(AppendError::Fenced {
                        session: self.sid.clone(),
                        fence: self.last_seq,
                    });
                }
                Err(e) if crate::store::storage_full(&e) => {
                    return Err(AppendError::Full {
                        session: self.sid.clone(),
                    });
                }
                Err(e)
                    if attempt < 8
                        && matches!(
                            e.kind(),
                            PublishErrorKind::TimedOut
                                | PublishErrorKind::BrokenPipe
                                | PublishErrorKind::StreamNotFound
                                | PublishErrorKind::Other
                        ) =>
                {
                    warn!(session_id = %self.sid, id, attempt, error = %e, "append failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(AppendError::Publish {
                        session: self.sid.clone(),
                        source: Box::new(e),
                    });
                }
            }
        }
    }
}
