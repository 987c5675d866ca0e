//! The two work queues between gateways and workers, both sides of each.
//!
//! - **Actions** (`{ns}_actions`, subject `{ns}.act.{sid}`): gateways publish user actions and
//!   control requests ([`Store::publish_action`]) with a `Nats-Msg-Id` (an
//!   [`ActionMsgId`], see [`crate::msg_id`]), so a
//!   retried publish is stored once within JetStream's duplicate window. The session's owner
//!   reads them, one at a time and acked after they are applied, through the durable consumer
//!   `act_{sid}` ([`Store::create_action_consumer`], [`Store::replace_action_consumer`]). A new
//!   owner replaces the consumer, so a dead owner's unacked action comes back at once.
//! - **Start requests** (`{ns}_work`, subject `{ns}.work.{sid}`, at most one queued per session):
//!   gateways and workers queue them ([`Store::enqueue_start`]), a queued one can be withdrawn
//!   ([`Store::withdraw_start`]), and every worker pulls from the one shared consumer `workers`
//!   ([`Store::work_consumer`]).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer};
use bytes::Bytes;

use crate::id::SessionId;
use crate::msg_id::ActionMsgId;
use crate::store::{Store, StoreError, boxed, nats};
use crate::wire::StartRequest;

/// A session's action feed, as its owner reads it.
pub struct ActionFeed {
    /// The actions, one at a time; each is acked after it is applied.
    pub messages: consumer::pull::Stream,
    /// Actions waiting when the feed was opened.
    pub pending: u64,
}

/// How long an action may stay unacked with its owner before JetStream redelivers it.
const ACTION_ACK_WAIT: Duration = Duration::from_secs(30);
/// Pull expiry of the owner's feed: after a NATS restart an outstanding pull is re-issued
/// within it.
const ACTION_PULL_EXPIRY: Duration = Duration::from_secs(5);

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
        let payload = self.pack(sid, payload, &mut headers).await?;
        let started = std::time::Instant::now();
        loop {
            let msg = PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .message_id(msg_id.as_str());
            let ack = self
                .js
                .send_publish(self.names.actions_subject(sid), msg)
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
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn action_consumer_config(&self, sid: &SessionId) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(self.names.actions_consumer(sid)),
            filter_subject: self.names.actions_subject(sid),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACTION_ACK_WAIT,
            // One at a time: an action is applied before the next is read.
            max_ack_pending: 1,
            ..Default::default()
        }
    }

    /// Creates the session's action consumer, for a session that has never had an owner.
    ///
    /// # Errors
    /// [`StoreError`] if JetStream refused (e.g. it exists already with another config).
    pub async fn create_action_consumer(
        &self,
        sid: &SessionId,
    ) -> Result<consumer::PullConsumer, StoreError> {
        self.actions
            .create_consumer(self.action_consumer_config(sid))
            .await
            .map_err(|e| nats("create action consumer")(boxed(e)))
    }

    /// Deletes the previous owner's action consumer (its unacked action comes back at once)
    /// and creates a new one.
    ///
    /// # Errors
    /// [`StoreError`] if either step failed.
    pub async fn replace_action_consumer(
        &self,
        sid: &SessionId,
    ) -> Result<consumer::PullConsumer, StoreError> {
        self.delete_action_consumer(sid).await?;
        self.create_action_consumer(sid).await
    }

    /// Deletes the session's action consumer if it has one (a takeover; DELETE, where the
    /// durable consumer would otherwise outlive its conversation).
    pub(crate) async fn delete_action_consumer(&self, sid: &SessionId) -> Result<(), StoreError> {
        match self
            .actions
            .delete_consumer(&self.names.actions_consumer(sid))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e.kind()) => Ok(()),
            Err(e) => Err(nats("delete action consumer")(boxed(e))),
        }
    }

    /// Actions of the session not yet acknowledged by its owner (queued or in flight); 0 if it
    /// has no consumer.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn actions_waiting(&self, sid: &SessionId) -> Result<u64, StoreError> {
        let info = match self
            .actions
            .consumer_info(self.names.actions_consumer(sid))
            .await
        {
            Ok(info) => info,
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
                return Ok(0);
            }
            Err(e) => return Err(nats("action consumer info")(boxed(e))),
        };
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    /// Starts reading a session's actions through its consumer.
    ///
    /// # Errors
    /// [`StoreError`] if the pull could not start.
    pub async fn action_feed(
        &self,
        consumer: consumer::PullConsumer,
    ) -> Result<ActionFeed, StoreError> {
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .stream()
            .max_messages_per_batch(1)
            .expires(ACTION_PULL_EXPIRY)
            .messages()
            .await
            .map_err(|e| nats("pull actions")(boxed(e)))?;
        Ok(ActionFeed { messages, pending })
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
            .js
            .publish(self.names.work_subject(&sid), req.encode())
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
        self.work
            .purge()
            .filter(self.names.work_subject(sid))
            .await
            .map_err(|e| nats("withdraw start request")(boxed(e)))?;
        Ok(())
    }

    /// The pull consumer every worker takes start requests from.
    ///
    /// # Errors
    /// [`StoreError`] if NATS failed.
    pub async fn work_consumer(&self) -> Result<consumer::PullConsumer, StoreError> {
        self.work
            .get_consumer(self.names.work_consumer())
            .await
            .map_err(nats("work consumer"))
    }
}

fn is_not_found(kind: &jetstream::stream::ConsumerErrorKind) -> bool {
    matches!(kind, jetstream::stream::ConsumerErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND)
}
