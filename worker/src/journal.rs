//! The fenced append to a session's event log.
//!
//! **Invariant:** every append carries `Nats-Expected-Last-Subject-Sequence` = the sequence of
//! the previous event this owner saw, so after another worker's takeover record our next append
//! is refused (`WrongLastSequence`) and the session stops here ([`AppendError::Fenced`]).
//! Each append also carries `Nats-Msg-Id = {sid}:{id}:{claim}`: a retry of the same append by
//! the same owner after an unknown outcome (timeout, reconnect) is stored once; another owner
//! (different `claim`) never collides with it.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use shared::event::{Event, Source};
use shared::id::SessionId;
use shared::store::{Store, StoreError};
use shared::wire::{HDR_APPLIED_ACTION, HDR_EVENT_ID};
use tracing::{debug, warn};

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppendError {
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
    /// The blob store failed for a large event.
    #[error("session {session}: {source}")]
    Store {
        session: SessionId,
        #[source]
        source: StoreError,
    },
}

/// The append side of one session's log, owned by the session task.
pub(crate) struct Journal {
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
    /// The sequence of our takeover record: this owner's epoch.
    epoch: u64,
}

impl Journal {
    /// Reads where the log stands.
    pub(crate) async fn open(
        store: Store,
        sid: SessionId,
        claim: String,
    ) -> Result<Self, StoreError> {
        let last = store.last_event(&sid).await?;
        let subject = store.names.events_subject(&sid);
        Ok(Self {
            store,
            subject,
            claim,
            last_seq: last.as_ref().map_or(0, |l| l.seq),
            next_id: last.as_ref().map_or(0, |l| l.id + 1),
            applied_action: last.as_ref().map_or(0, |l| l.applied_action),
            epoch: 0,
            sid,
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.next_id == 0
    }
    pub(crate) fn applied_action(&self) -> u64 {
        self.applied_action
    }
    pub(crate) fn last_id(&self) -> Option<u64> {
        self.next_id.checked_sub(1)
    }

    /// Appends the takeover record (fencing every earlier owner); its sequence is the epoch.
    pub(crate) async fn take_over(&mut self, record: Event) -> Result<u64, AppendError> {
        self.append(record).await?;
        self.epoch = self.last_seq;
        Ok(self.epoch)
    }

    /// Marks user action `seq` as applied by the next append.
    pub(crate) fn mark_applied(&mut self, seq: u64) {
        self.applied_action = self.applied_action.max(seq);
    }

    /// Appends one event: assigns its id and timestamp (source defaults to environment),
    /// publishes it fenced, and returns its id.
    pub(crate) async fn append(&mut self, mut ev: Event) -> Result<u64, AppendError> {
        let id = self.next_id;
        ev.id = Some(id);
        ev.timestamp = Some(shared::event::now_timestamp());
        if ev.source.is_none() {
            ev.source = Some(Source::Environment);
        }
        let payload = bytes::Bytes::from(ev.to_json());
        let mut headers = HeaderMap::new();
        headers.insert(HDR_EVENT_ID, id.to_string().as_str());
        headers.insert(HDR_APPLIED_ACTION, self.applied_action.to_string().as_str());
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
                .js
                .send_publish(self.subject.clone(), publish)
                .await
            {
                Ok(fut) => fut.await,
                Err(e) => Err(e),
            };
            match res {
                Ok(ack) => {
                    if ack.duplicate {
                        debug!(session_id = %self.sid, id, "append was already stored (retry)");
                    }
                    self.last_seq = ack.sequence;
                    self.next_id = id + 1;
                    metrics::counter!("oh_worker_events_appended_total").increment(1);
                    return Ok(id);
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(AppendError::Fenced {
                        session: self.sid.clone(),
                        fence: self.last_seq,
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
