//! One core NATS subscription per session that has sockets on this gateway, shared by them
//! (never a wildcard over all sessions: a gateway's traffic grows with its own clients). It is
//! `{ns}.*.{sid}`: events and status updates in one subscription (each costs ~6 KiB in the
//! client); the session's actions and start requests also match and are skipped.
//!
//! The subscription task decodes each event once, computes its live copy (OpenHands' live
//! filter), and broadcasts it. Sockets keep an `Arc<Topic>`; when the last one
//! goes, the subscription ends. The broadcast is bounded: a socket that lags notices
//! (`Lagged`) and fills the gap from the log, so nothing is lost. Core NATS delivery is at
//! most once: after a reconnect to NATS every topic broadcasts [`Feed::Resync`], and sockets
//! re-read the log's head for anything published while the connection was down. A cut
//! between NATS nodes shorter than the ping timeout drops routed messages with no reconnect
//! to tell: so a topic also resyncs when an action of its session passed by and no event
//! followed within [`EXPECT_EVENT`], and every [`TURN_SILENCE`] of silence while a turn runs.
//!
//! Presence: while a topic lives, this gateway is listed (with an expiry it refreshes) in
//! `{ns}:presence:{sid}`, which the owning worker reads to passivate sessions nobody watches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use futures::StreamExt;
use serde_json::value::RawValue;
use shared::event::{Event, ReplayClass};
use shared::id::SessionId;
use shared::presence::{self, Presence};
use shared::store::Store;
use shared::wire::HDR_AGENT_STATE;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

/// An action of the session was published (seen on the topic's own subscription): its user
/// event should follow within this, or the topic re-reads the log's head.
pub(crate) const EXPECT_EVENT: std::time::Duration = std::time::Duration::from_secs(3);

/// While the last event said the agent is `running`, silence this long re-reads the head.
pub(crate) const TURN_SILENCE: std::time::Duration = std::time::Duration::from_secs(15);

/// One live event, decoded once per gateway.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) id: u64,
    /// What to send live; `None` if OpenHands' live filter drops it.
    pub(crate) json: Option<Box<RawValue>>,
    /// What a connect's replay does with it (used by a socket that watched its session from
    /// birth, see `recent`, instead of reading the log).
    pub(crate) replayed: Replayed,
}

/// How a connect's replay treats a live event (OpenHands' replay rule, see
/// [`shared::event::ReplayClass`]), and the form it sends.
#[derive(Debug)]
pub(crate) enum Replayed {
    /// Not replayed.
    Skip,
    /// Replayed as [`Live::json`] (the live copy is the stored event, byte for byte), by the
    /// rule for `class` (`Emit` or `State`).
    AsLive { class: ReplayClass },
    /// Replayed as this stored form (a small event whose live copy differs).
    Stored {
        class: ReplayClass,
        raw: Box<RawValue>,
    },
    /// Not kept (no watch waits, or larger than [`KEPT_STORED_MAX`]): a replay reads the log.
    Unknown,
}

/// Largest stored event kept beside its different live copy for a replay from birth
/// (agent state changes and short observations; a larger one sends that replay to the log).
const KEPT_STORED_MAX: usize = 4096;

impl Replayed {
    fn of(parsed: Option<&Event>, live: Option<&RawValue>, stored: &[u8]) -> Self {
        let class = parsed.map_or(ReplayClass::Emit, Event::replay_class);
        if class == ReplayClass::Skip {
            Replayed::Skip
        } else if live.is_some_and(|l| l.get().as_bytes() == stored) {
            Replayed::AsLive { class }
        } else if stored.len() <= KEPT_STORED_MAX
            && let Some(raw) = std::str::from_utf8(stored)
                .ok()
                .and_then(|t| RawValue::from_string(t.to_owned()).ok())
        {
            Replayed::Stored { class, raw }
        } else {
            Replayed::Unknown
        }
    }
}

/// What a socket receives from its session's topic.
#[derive(Debug, Clone)]
pub(crate) enum Feed {
    /// One live event.
    Event(Arc<Live>),
    /// Events may have been missed (NATS reconnect): re-read the log up to its head.
    Resync,
    /// A status update (`status_update: true`): live only, sent as is.
    Status(Arc<Box<RawValue>>),
}

/// A session's topic and a receiver of its feed from the moment of the join.
pub(crate) type Joined = (Arc<Topic>, broadcast::Receiver<Feed>);

pub(crate) struct Topic {
    tx: broadcast::Sender<Feed>,
    /// A create's watch waits for its first socket: live events keep their stored form
    /// ([`Replayed::Stored`]) until it comes ([`Topic::born`]); not after (the broadcast keeps
    /// its last events for the topic's life).
    watched: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    presence: Presence,
    sid: SessionId,
    tasks: TaskTracker,
}

impl Topic {
    /// The watch's first socket has taken what it needs: live events no longer keep their
    /// stored form.
    pub(crate) fn born(&self) {
        self.watched.store(false, Ordering::Release);
    }
}

impl Drop for Topic {
    fn drop(&mut self) {
        self.task.abort();
        metrics::gauge!("oh_gateway_session_subscriptions").decrement(1.0);
        let presence = self.presence.clone();
        let sid = self.sid.clone();
        // Best effort: an entry left behind expires by itself.
        self.tasks
            .spawn(async move { leave(&presence, &sid).await });
    }
}

/// Sleeps until `t`; forever if `None`.
async fn until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Lists this gateway on sessions (best effort: an entry left behind or missed expires or is
/// refreshed by itself).
async fn enter(presence: &Presence, sids: &[SessionId]) {
    if let Err(e) = presence.enter(sids).await {
        warn!(error = %e, "presence refresh failed");
    }
}

async fn leave(presence: &Presence, sid: &SessionId) {
    if let Err(e) = presence.leave(sid).await {
        warn!(session_id = %sid, error = %e, "presence removal failed; it will expire");
    }
}

#[derive(Clone)]
pub(crate) struct Fanout {
    nats: async_nats::Client,
    /// Shared, not cloned per topic: a `Store` is ~7.5 KiB, and every topic's `pump` task
    /// holds it for the session's life (heaptrack: ~15 KiB per idle session with a clone).
    store: Arc<Store>,
    presence: Presence,
    topics: Arc<std::sync::Mutex<Topics>>,
    /// The gateway's task tracker (see `app`).
    tasks: TaskTracker,
}

impl Fanout {
    pub(crate) fn new(
        nats: async_nats::Client,
        store: Store,
        redis: redis::aio::ConnectionManager,
        gateway_id: &str,
        tasks: TaskTracker,
    ) -> Self {
        let presence = Presence::new(redis, store.names().clone(), gateway_id);
        Self {
            nats,
            store: Arc::new(store),
            presence,
            topics: Arc::default(),
            tasks,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Topics> {
        self.topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn live_topics(&self) -> Vec<Arc<Topic>> {
        self.table()
            .map
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Tells every socket to re-read the log each time `reconnected` fires (a NATS
    /// reconnect, or a subscription that fell behind), until `cancel`.
    pub(crate) async fn resync_loop(
        self,
        mut reconnected: tokio::sync::mpsc::Receiver<()>,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                r = reconnected.recv() => if r.is_none() { return },
            }
            info!(
                "NATS (re)connected or a subscription fell behind; resyncing live sockets from the log"
            );
            self.resync_all();
        }
    }

    /// Tells every socket to re-read the log (after a NATS reconnect).
    fn resync_all(&self) {
        let topics = self.live_topics();
        metrics::counter!("oh_gateway_resyncs_total").increment(topics.len() as u64);
        for t in topics {
            // No receiver: the topic is going away anyway.
            let _ = t.tx.send(Feed::Resync);
        }
    }

    /// Refreshes this gateway's presence on every session it has sockets for, forever.
    pub(crate) async fn presence_loop(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(presence::REFRESH);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sids: Vec<SessionId> = self.live_topics().iter().map(|t| t.sid.clone()).collect();
            enter(&self.presence, &sids).await;
        }
    }

    /// Joins the session's live feed. When this returns, the NATS subscription is registered
    /// at the server, so every event appended from now on will be received.
    pub(crate) async fn join(&self, sid: &SessionId) -> Result<Joined, async_nats::Error> {
        self.join_as(sid, false).await
    }

    /// [`Self::join`] for a create's watch (see `recent`): until [`Topic::born`], live events
    /// keep what a replay needs.
    pub(crate) async fn watch(&self, sid: &SessionId) -> Result<Joined, async_nats::Error> {
        self.join_as(sid, true).await
    }

    async fn join_as(&self, sid: &SessionId, watch: bool) -> Result<Joined, async_nats::Error> {
        if let Some(joined) = self.table().joined(sid) {
            return Ok(joined);
        }
        // Subscribed with no lock held: joins of other sessions do not wait for this one's
        // round trip (they did, one after another, with 1,000 creates at once). Two joins of
        // the same session may both subscribe; the second to finish drops its subscription.
        let sub = self
            .nats
            .subscribe(self.store.names().session_subjects(sid))
            .await?;
        self.nats.flush().await?;
        let mut topics = self.table();
        if let Some(joined) = topics.joined(sid) {
            return Ok(joined); // `sub` is dropped: unsubscribed
        }
        let (tx, rx) = broadcast::channel(16);
        let watched = Arc::new(AtomicBool::new(watch));
        let task = self.tasks.spawn(
            pump(
                Arc::clone(&self.store),
                sid.clone(),
                sub,
                tx.clone(),
                Arc::clone(&watched),
            )
            .instrument(info_span!("fanout", session_id = %sid)),
        );
        let topic = Arc::new(Topic {
            tx,
            watched,
            task,
            presence: self.presence.clone(),
            sid: sid.clone(),
            tasks: self.tasks.clone(),
        });
        metrics::gauge!("oh_gateway_session_subscriptions").increment(1.0);
        topics.insert(sid, &topic);
        drop(topics);
        // Off the connect path (one Redis round trip less before the replay): the refresh
        // loop rewrites every entry within PRESENCE_REFRESH anyway.
        let presence = self.presence.clone();
        let entered = sid.clone();
        self.tasks
            .spawn(async move { enter(&presence, std::slice::from_ref(&entered)).await });
        Ok((topic, rx))
    }
}

/// The topics by session. Entries of ended topics are dropped in one pass once the map has
/// doubled since the last pass (not on every join: a pass is O(sessions)).
#[derive(Default)]
struct Topics {
    map: HashMap<SessionId, Weak<Topic>>,
    prune_at: usize,
}

/// Fewest entries before ended ones are dropped.
const PRUNE_FLOOR: usize = 1024;

impl Topics {
    /// A live topic of `sid`, with a new receiver.
    fn joined(&self, sid: &SessionId) -> Option<Joined> {
        let t = self.map.get(sid).and_then(Weak::upgrade)?;
        let rx = t.tx.subscribe();
        Some((t, rx))
    }

    fn insert(&mut self, sid: &SessionId, topic: &Arc<Topic>) {
        if self.map.len() >= self.prune_at.max(PRUNE_FLOOR) {
            self.map.retain(|_, w| w.strong_count() > 0);
            self.prune_at = self.map.len() * 2;
        }
        self.map.insert(sid.clone(), Arc::downgrade(topic));
    }
}

async fn pump(
    store: Arc<Store>,
    sid: SessionId,
    mut sub: async_nats::Subscriber,
    tx: broadcast::Sender<Feed>,
    watched: Arc<AtomicBool>,
) {
    let status_subject = store.names().status_subject(&sid);
    let events_subject = store.names().events_subject(&sid);
    let actions_subject = store.names().actions_subject(&sid);
    // When to re-read the log's head if nothing arrives (see the module doc).
    let mut check_at: Option<tokio::time::Instant> = None;
    let mut running = false;
    // When the oldest action not yet followed by an event passed by (reply latency).
    let mut action_at: Option<std::time::Instant> = None;
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m {
                Some(m) => m,
                None => return,
            },
            () = until(check_at) => {
                debug!("no event where one was expected; sockets re-read the log's head");
                metrics::counter!("oh_gateway_silence_resyncs_total").increment(1);
                // No receiver: every socket left.
                let _ = tx.send(Feed::Resync);
                check_at = running.then(|| tokio::time::Instant::now() + TURN_SILENCE);
                continue;
            }
        };
        if msg.subject.as_str() == actions_subject {
            action_at.get_or_insert_with(std::time::Instant::now);
            let due = tokio::time::Instant::now() + EXPECT_EVENT;
            check_at = Some(check_at.map_or(due, |t| t.min(due)));
            continue;
        }
        if msg.subject.as_str() == status_subject {
            let raw = std::str::from_utf8(&msg.payload)
                .ok()
                .and_then(|t| RawValue::from_string(t.to_owned()).ok());
            match raw {
                // No receiver: every socket left.
                Some(raw) => {
                    let _ = tx.send(Feed::Status(Arc::new(raw)));
                }
                None => warn!("status update is not JSON; dropped"),
            }
            continue;
        }
        if msg.subject.as_str() != events_subject {
            continue; // the session's start requests
        }
        if let Some(at) = action_at.take() {
            // From the action's publish to the first event after it, as this gateway saw them.
            metrics::histogram!("oh_gateway_reply_seconds").record(at.elapsed());
        }
        running = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(HDR_AGENT_STATE))
            .is_some_and(|s| s.as_str() == shared::event::AgentState::Running.as_str());
        check_at = running.then(|| tokio::time::Instant::now() + TURN_SILENCE);
        // An event that carries a trace (traces on) gets a span in it, open until it is
        // broadcast; others cost nothing.
        let _fanout_span = match msg.headers.as_ref() {
            Some(h) if h.get(shared::telemetry::TRACEPARENT).is_some() => {
                let span = tracing::info_span!("fanout", session_id = %sid, receivers = tx.receiver_count());
                shared::telemetry::continue_trace(&span, Some(h));
                span
            }
            _ => tracing::Span::none(),
        };
        // Boxed: decoding may read the object store, a large future this long-lived task
        // would otherwise carry in every idle session (heaptrack: ~20 KiB per session).
        let (id, payload) = match Box::pin(store.decode_live(&sid, &msg)).await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "undecodable live event; sockets will re-read it from the log");
                continue;
            }
        };
        let parsed = Event::from_json(&payload);
        let json = match &parsed {
            Ok(ev) => ev
                .live_copy()
                .and_then(|c| RawValue::from_string(c.to_json()).ok()),
            Err(e) => {
                warn!(id, error = %e, "stored event does not parse; forwarding as stored");
                std::str::from_utf8(&payload)
                    .ok()
                    .and_then(|s| RawValue::from_string(s.to_owned()).ok())
            }
        };
        let replayed = if watched.load(Ordering::Acquire) {
            Replayed::of(parsed.as_ref().ok(), json.as_deref(), &payload)
        } else {
            Replayed::Unknown
        };
        debug!(id, "live event");
        // No receiver means every socket left; the topic is about to be dropped.
        let _ = tx.send(Feed::Event(Arc::new(Live { id, json, replayed })));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The replayed form of a stored event, as the pump computes it.
    fn replayed(stored: &str) -> Replayed {
        let ev = Event::from_json(stored.as_bytes());
        let live = ev
            .as_ref()
            .ok()
            .and_then(Event::live_copy)
            .map(|c| RawValue::from_string(c.to_json()).unwrap());
        Replayed::of(ev.as_ref().ok(), live.as_deref(), stored.as_bytes())
    }

    fn stored(json: &str) -> String {
        Event::from_json(json.as_bytes()).unwrap().to_json()
    }

    #[test]
    fn a_live_event_keeps_its_stored_form_only_where_the_replay_needs_it() {
        // An agent's event goes out live as stored: nothing kept beside it.
        let agent = stored(
            r#"{"id":1,"timestamp":"2026-01-01T00:00:00","source":"agent","message":"hi","action":"message","args":{"content":"hi"}}"#,
        );
        assert!(matches!(
            replayed(&agent),
            Replayed::AsLive {
                class: ReplayClass::Emit
            }
        ));
        // An environment's state change goes out live as the agent's: the stored form is kept.
        let state = stored(
            r#"{"id":2,"timestamp":"2026-01-01T00:00:00","source":"environment","message":"","observation":"agent_state_changed","content":"","extras":{"agent_state":"loading","reason":""}}"#,
        );
        match replayed(&state) {
            Replayed::Stored {
                class: ReplayClass::State,
                raw,
            } => assert_eq!(raw.get(), state),
            other => panic!("{other:?}"),
        }
        // Not replayed at all.
        let null = stored(
            r#"{"id":3,"timestamp":"2026-01-01T00:00:00","source":"agent","message":"","observation":"null","content":"","extras":{}}"#,
        );
        assert!(matches!(replayed(&null), Replayed::Skip));
        // A large one whose live copy differs is not kept: that replay reads the log.
        let big = stored(&format!(
            r#"{{"id":4,"timestamp":"2026-01-01T00:00:00","source":"environment","message":"","observation":"run","content":"{}","extras":{{"command":"ls","exit_code":0}}}}"#,
            "x".repeat(KEPT_STORED_MAX)
        ));
        assert!(matches!(replayed(&big), Replayed::Unknown));
    }
}
