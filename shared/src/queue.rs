//! The two work queues between gateways and workers, both sides of each.
//!
//! - **Actions** (`{ns}_actions`, subject `{ns}.act.{sid}`): gateways publish user actions and
//!   control requests ([`Store::publish_action`]) with a `Nats-Msg-Id` (an
//!   [`ActionMsgId`], see [`crate::msg_id`]), so a retried publish is stored once within
//!   JetStream's duplicate window. The stream has **no consumer**: it republishes every
//!   action it stored, after the store is committed, on `{ns}.act.{sid}.stored` with its
//!   sequence and the previous sequence stored on that subject (`Nats-Sequence`,
//!   `Nats-Last-Sequence`). The session's owner reads them through an [`ActionFeed`]: a core
//!   subscription to that subject, a cursor (the last sequence it handled), and direct reads
//!   ([`Store::next_action`]) whenever the previous sequence shows a gap, at a claim, or when
//!   the worker's recheck ([`Store::sessions_with_actions`]) says something waits. Handled
//!   actions are deleted ([`Store::drop_action`]). A new owner starts from the
//!   stream: whatever a dead owner left is still there, and the log's applied-action mark
//!   says what was already applied. No consumer is created, replaced or renewed per session.
//! - **Start requests** (`{ns}_work`, subject `{ns}.work.{sid}`, at most one queued per session):
//!   gateways and workers queue them ([`Store::enqueue_start`]), a queued one can be withdrawn
//!   ([`Store::withdraw_start`]), and every worker pulls from the one shared consumer `workers`
//!   ([`Store::work_consumer`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::StreamExt;

use crate::id::SessionId;
use crate::msg_id::ActionMsgId;
use crate::store::{Store, StoreError, boxed, get_first_from, nats};
use crate::wire::{HDR_SENT_AT, StartRequest};

/// One stored action (or control request), as its owner reads it.
#[derive(Debug, Clone)]
pub struct Action {
    /// Its stream sequence: the applied-action mark once it is applied.
    pub seq: u64,
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// When its publisher sent it ([`HDR_SENT_AT`]), if it said.
    pub sent_at: Option<SystemTime>,
    /// How the owner got it: `true` from its republish, `false` read from the stream (at a
    /// claim, after a gap, or on the worker's recheck).
    pub republished: bool,
    /// Its sequence is one the feed had already handed out for another action: the stream
    /// numbered anew (a single nats-server killed before it wrote what it had acknowledged
    /// forgets its newest sequences). It is new, whatever the applied-action mark says.
    pub renumbered: bool,
}

impl Action {
    fn new(seq: u64, headers: HeaderMap, payload: Bytes, republished: bool) -> Self {
        let sent_at = headers
            .get(HDR_SENT_AT)
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .map(|us| SystemTime::UNIX_EPOCH + Duration::from_micros(us));
        Action {
            seq,
            headers,
            payload,
            sent_at,
            republished,
            renumbered: false,
        }
    }

    /// Its `Nats-Msg-Id` (every action has one: [`ActionMsgId`]).
    pub fn msg_id(&self) -> Option<&str> {
        self.headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str())
    }

    /// Time since it was sent (its publisher's clock against ours; zero if ours is behind or
    /// it did not say).
    pub fn waited(&self) -> Duration {
        self.sent_at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default()
    }
}

/// What the feed does with a republished action, given its cursor.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Handled already (a copy, or read directly before its republish came).
    Skip,
    /// The next one: nothing unhandled is stored between the cursor and it.
    Take,
    /// Something stored before it was not seen (a republish lost): read from the stream.
    Gap,
}

/// `seq` arrived with `last` as the sequence stored on the session's subject just before it
/// (0: none). Anything stored after `cursor` is still there (only handled actions are purged),
/// so `last <= cursor` proves nothing unhandled lies between.
fn next_of(cursor: u64, seq: u64, last: u64) -> Next {
    if seq <= cursor {
        Next::Skip
    } else if last <= cursor {
        Next::Take
    } else {
        Next::Gap
    }
}

/// Why [`ActionFeed::next`] returned no action.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// Reading the stream failed; the feed is intact.
    #[error(transparent)]
    Read(StoreError),
    /// The subscription ended: the NATS client is closed.
    #[error("the action feed's subscription ended")]
    Ended,
}

/// A session's actions, in stream order, each once, as its owner reads them: republished
/// actions while they arrive in order, reads from the stream otherwise.
pub struct ActionFeed {
    store: Store,
    sid: SessionId,
    stored: async_nats::Subscriber,
    recheck: Arc<tokio::sync::Notify>,
    /// The last sequence handed out.
    cursor: u64,
    /// The stream may hold actions after `cursor` that no republish announced.
    read_due: bool,
    /// The recheck saw actions stored and none follows the cursor: look for one handled but
    /// not dropped.
    sweep_due: bool,
    /// Read at the claim, handed out first.
    first: Option<Action>,
    /// The newest actions handed out (sequence, msg id): a sequence at or below the cursor
    /// that comes with another msg id was numbered anew by the stream.
    handed: std::collections::VecDeque<(u64, Option<String>)>,
}

/// How many handed-out actions a feed remembers (to tell a renumbered action from a copy).
const HANDED_REMEMBERED: usize = 256;

impl ActionFeed {
    /// Reads the first action waiting (kept for [`Self::next`]); `true` if there is one.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn look(&mut self) -> Result<bool, StoreError> {
        if self.first.is_none() && self.read_due {
            self.first = self.store.next_action(&self.sid, self.cursor).await?;
            // Nothing stored yet: from here on every action is announced (the subscription
            // came first), or found by a gap or the recheck.
            self.read_due = self.first.is_some();
        }
        Ok(self.first.is_some())
    }

    /// Takes it that nothing was stored before the feed subscribed (a conversation's first
    /// start whose create stored no action): no read until a republish shows a gap or the
    /// worker's recheck finds something.
    pub fn presume_none(&mut self) {
        self.read_due = false;
    }

    /// The next action. Cancel-safe: nothing is consumed until it returns (the cursor moves
    /// only then; a republish not yet taken stays in the subscription).
    ///
    /// # Errors
    /// [`FeedError::Read`] if a read failed (try again later), [`FeedError::Ended`] if the
    /// subscription ended (the client is closing).
    pub async fn next(&mut self) -> Result<Action, FeedError> {
        let action = self.take().await?;
        if self.handed.len() == HANDED_REMEMBERED {
            self.handed.pop_front();
        }
        self.handed
            .push_back((action.seq, action.msg_id().map(str::to_owned)));
        Ok(action)
    }

    /// Whether `a`, at or below the cursor, is not the action handed out at its sequence
    /// (and so new: see [`Action::renumbered`]). Unknown sequences below the oldest
    /// remembered one count as copies.
    fn renumbered(&self, a: &Action) -> bool {
        match self.handed.iter().rev().find(|(seq, _)| *seq == a.seq) {
            Some((_, id)) => id.as_deref() != a.msg_id(),
            None => self
                .handed
                .front()
                .is_some_and(|(oldest, _)| a.seq > *oldest),
        }
    }

    async fn take(&mut self) -> Result<Action, FeedError> {
        if let Some(first) = self.first.take() {
            self.cursor = first.seq;
            return Ok(first);
        }
        loop {
            if self.read_due {
                match self
                    .store
                    .next_action(&self.sid, self.cursor)
                    .await
                    .map_err(FeedError::Read)?
                {
                    Some(a) => {
                        // What the recheck saw may be just this one.
                        self.sweep_due = false;
                        self.cursor = a.seq;
                        return Ok(a);
                    }
                    None => self.read_due = false,
                }
            }
            if std::mem::take(&mut self.sweep_due)
                && let Some(left) = self
                    .store
                    .next_action(&self.sid, 0)
                    .await
                    .map_err(FeedError::Read)?
                && left.seq <= self.cursor
            {
                let mut left = left;
                if self.renumbered(&left) {
                    left.renumbered = true;
                    self.cursor = left.seq;
                    self.read_due = true;
                    return Ok(left);
                }
                // Handled here but still stored (its drop failed): handed out again; the
                // session handles it as a repeat (skipped by the applied-action mark) and
                // drops it. The cursor stays.
                return Ok(left);
            }
            tokio::select! {
                m = self.stored.next() => {
                    let Some(m) = m else {
                        return Err(FeedError::Ended);
                    };
                    let headers = m.headers.unwrap_or_default();
                    let num = |name: &str| headers.get(name).and_then(|v| v.as_str().parse::<u64>().ok());
                    let (Some(seq), Some(last)) =
                        (num("Nats-Sequence"), num("Nats-Last-Sequence"))
                    else {
                        // Not the stream's republish (no one else may publish here): look.
                        self.read_due = true;
                        continue;
                    };
                    match next_of(self.cursor, seq, last) {
                        Next::Skip => {
                            let mut a = Action::new(seq, headers, m.payload, true);
                            if self.renumbered(&a) {
                                // Taken from here on: what follows it is read, in order.
                                a.renumbered = true;
                                self.cursor = seq;
                                self.read_due = true;
                                return Ok(a);
                            }
                        }
                        Next::Take => {
                            self.cursor = seq;
                            return Ok(Action::new(seq, headers, m.payload, true));
                        }
                        Next::Gap => self.read_due = true,
                    }
                }
                () = self.recheck.notified() => {
                    self.read_due = true;
                    self.sweep_due = true;
                }
            }
        }
    }

    /// Makes the next [`Self::next`] read the stream (the worker's recheck found actions
    /// stored for this session).
    pub fn recheck(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.recheck)
    }
}

/// How long the publisher waits before re-sending an unconfirmed action.
const RESEND_AFTER: Duration = Duration::from_millis(500);

impl Store {
    /// Publishes an action (or control request, empty payload) to the session's action
    /// subject and waits for JetStream to store it. A payload over the inline limit goes to
    /// the blob store first. Returns the stream sequence.
    ///
    /// # Errors
    /// [`StoreError`] if the payload or the message was not stored: the caller must not
    /// acknowledge the action.
    pub async fn publish_action(
        &self,
        sid: &SessionId,
        payload: Bytes,
        mut headers: HeaderMap,
        msg_id: &ActionMsgId,
    ) -> Result<u64, StoreError> {
        if let Some(client) = msg_id.client_msg_id() {
            headers.insert(crate::wire::HDR_CLIENT_MSG_ID, client);
        }
        let sent_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        headers.insert(HDR_SENT_AT, sent_at.to_string().as_str());
        let payload = self.pack(sid, payload, &mut headers).await?;
        let started = std::time::Instant::now();
        loop {
            let msg = PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .message_id(msg_id.as_str());
            let ack = self
                .0
                .js
                .send_publish(self.0.names.actions_subject(sid), msg)
                .await
                .map_err(|e| nats("publish action")(boxed(e)))?;
            let ack = ack.await.map_err(|e| nats("publish action")(boxed(e)))?;
            if !crate::store::unconfirmed(&ack) {
                return Ok(ack.sequence);
            }
            // An earlier try of this msg id is in flight and may never be stored: ask again
            // until JetStream names its sequence (or stores this one).
            tracing::warn!(session_id = %sid, "action publish not confirmed (sequence 0); re-sending");
            if started.elapsed() >= crate::store::UNCONFIRMED_PATIENCE {
                return Err(crate::store::unconfirmed_error("publish action"));
            }
            tokio::time::sleep(RESEND_AFTER).await;
        }
    }

    /// Opens the owner's feed of a session's actions: subscribes to their republishes. The
    /// first [`ActionFeed::look`] (or [`ActionFeed::next`]) reads the stream from its start:
    /// actions a previous owner handled but did not drop come back, and the applied-action
    /// mark tells the owner to skip them.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn action_feed(&self, sid: &SessionId) -> Result<ActionFeed, StoreError> {
        let stored = self
            .0
            .js
            .client()
            .subscribe(self.0.names.actions_stored_subject(sid))
            .await
            .map_err(|e| nats("subscribe actions")(boxed(e)))?;
        Ok(ActionFeed {
            store: self.clone(),
            sid: sid.clone(),
            stored,
            recheck: Arc::new(tokio::sync::Notify::new()),
            cursor: 0,
            read_due: true,
            sweep_due: false,
            first: None,
            handed: std::collections::VecDeque::new(),
        })
    }

    /// The first action of the session stored after sequence `after`, if any (read from the
    /// stream's leader on a replicated stream).
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn next_action(
        &self,
        sid: &SessionId,
        after: u64,
    ) -> Result<Option<Action>, StoreError> {
        let subject = self.0.names.actions_subject(sid);
        match get_first_from(&self.0.actions, self.0.leader_reads, subject, after + 1).await {
            Ok(Some(m)) => Ok(Some(Action::new(m.sequence, m.headers, m.payload, false))),
            Ok(None) => Ok(None),
            Err(e) => Err(nats("read action")(e)),
        }
    }

    /// Removes one handled action from the stream (the work queue's ack). One message at a
    /// time, never a purge: nats-server 2.9 forgets the last sequence of a stream that a
    /// purge left empty if it is killed (it then numbers new messages from 1 again, below
    /// every owner's cursor and applied-action mark); a deleted message keeps it.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed (harmless: the worker's recheck finds the action still
    /// stored and it is dropped again, and the applied-action mark keeps it from being
    /// applied twice). An action already gone is no error.
    pub async fn drop_action(&self, seq: u64) -> Result<(), StoreError> {
        #[derive(serde::Deserialize)]
        struct Deleted {}
        // `no_erase`: marked deleted, not overwritten on disk (async-nats' `delete_message`
        // asks for the secure erase, which costs the server ~0.3 ms of disk work per action
        // and held up the next appends: +0.7 ms on every reply).
        let res: Result<jetstream::response::Response<Deleted>, _> = self
            .0
            .js
            .request(
                format!("STREAM.MSG.DELETE.{}", self.0.names.actions_stream()),
                &serde_json::json!({"seq": seq, "no_erase": true}),
            )
            .await;
        match res {
            Ok(jetstream::response::Response::Ok(_)) => Ok(()),
            Ok(jetstream::response::Response::Err { error })
                if [
                    jetstream::ErrorCode::NO_MESSAGE_FOUND,
                    jetstream::ErrorCode::SEQUENCE_NOT_FOUND,
                    jetstream::ErrorCode::STREAM_MESSAGE_DELETE_FAILED,
                ]
                .contains(&error.error_code()) =>
            {
                Ok(())
            }
            Ok(jetstream::response::Response::Err { error }) => {
                Err(nats("drop handled action")(boxed(error)))
            }
            Err(e) => Err(nats("drop handled action")(boxed(e))),
        }
    }

    /// Removes every action of the session (DELETE of the conversation), one message at a
    /// time (see [`Self::drop_action`]).
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub(crate) async fn drop_all_actions(&self, sid: &SessionId) -> Result<(), StoreError> {
        let mut after = 0;
        while let Some(a) = self.next_action(sid, after).await? {
            self.drop_action(a.seq).await?;
            after = a.seq;
        }
        Ok(())
    }

    /// Every session with actions stored (unhandled, or handled and not yet dropped): one
    /// request for the whole stream, whose subjects are only those with messages.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn sessions_with_actions(&self) -> Result<Vec<SessionId>, StoreError> {
        let mut subjects = self
            .0
            .actions
            .info_with_subjects(self.0.names.actions_subjects())
            .await
            .map_err(|e| nats("actions stored")(boxed(e)))?;
        let mut out = Vec::new();
        while let Some(item) = subjects.next().await {
            let (subject, _) = item.map_err(|e| nats("actions stored")(boxed(e)))?;
            if let Ok(sid) = self.0.names.session_of_actions_subject(&subject) {
                out.push(sid);
            }
        }
        Ok(out)
    }

    /// Queues a start request for the session. Returns `false` if one is already queued (the
    /// work stream keeps at most one per session: `discard_new_per_subject`).
    ///
    /// # Errors
    /// [`StoreError`] if JetStream did not confirm the request.
    pub async fn enqueue_start(&self, req: &StartRequest) -> Result<bool, StoreError> {
        let sid = SessionId::parse(&req.session_id).map_err(|e| StoreError::Corrupt {
            what: "start request",
            session: req.session_id.clone(),
            detail: e.to_string(),
        })?;
        let res = match self
            .0
            .js
            .publish(self.0.names.work_subject(&sid), req.encode())
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match res {
            Ok(_) => Ok(true),
            Err(e)
                if e.kind() == PublishErrorKind::Other
                    && std::error::Error::source(&e)
                        .and_then(|s| s.downcast_ref::<jetstream::Error>())
                        .is_some_and(|j| {
                            j.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED
                        }) =>
            {
                Ok(false)
            }
            Err(e) => Err(nats("start request")(boxed(e))),
        }
    }

    /// Withdraws the session's queued start request, if any.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn withdraw_start(&self, sid: &SessionId) -> Result<(), StoreError> {
        self.0
            .work
            .purge()
            .filter(self.0.names.work_subject(sid))
            .await
            .map_err(|e| nats("withdraw start request")(boxed(e)))?;
        Ok(())
    }

    /// The pull consumer every worker takes start requests from.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn work_consumer(&self) -> Result<consumer::PullConsumer, StoreError> {
        self.0
            .work
            .get_consumer(self.0.names.work_consumer())
            .await
            .map_err(nats("work consumer"))
    }
}

#[cfg(test)]
mod tests {
    use super::{Next, next_of};

    #[test]
    fn a_republish_is_taken_only_when_nothing_unhandled_precedes_it() {
        // In order: its previous one was handled (or none is stored: dropped, or the first).
        assert_eq!(next_of(5, 9, 5), Next::Take);
        assert_eq!(next_of(5, 9, 0), Next::Take);
        assert_eq!(next_of(5, 9, 3), Next::Take);
        assert_eq!(next_of(0, 1, 0), Next::Take);
        // Something stored after the cursor came first: read the stream.
        assert_eq!(next_of(5, 9, 7), Next::Gap);
        assert_eq!(next_of(0, 9, 4), Next::Gap);
        // Already handled (read directly before its republish came).
        assert_eq!(next_of(9, 9, 5), Next::Skip);
        assert_eq!(next_of(9, 4, 0), Next::Skip);
    }
}
