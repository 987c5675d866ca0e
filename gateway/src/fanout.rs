//! One core NATS subscription per session that has sockets on this gateway, shared by them
//! (never a wildcard over all sessions: a gateway's traffic grows with its own clients).
//!
//! The subscription task decodes each event once, computes its live copy (OpenHands' live
//! filter, section 3.3), and broadcasts it. Sockets keep an `Arc<Topic>`; when the last one
//! goes, the subscription ends. The broadcast is bounded: a socket that lags notices
//! (`Lagged`) and fills the gap from the log, so nothing is lost.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use futures::StreamExt;
use serde_json::value::RawValue;
use shared::event::Event;
use shared::id::SessionId;
use shared::store::Store;
use tokio::sync::{Mutex, broadcast};
use tracing::{Instrument, debug, info_span, warn};

/// One live event, decoded once per gateway.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) id: u64,
    /// What to send live; `None` if OpenHands' live filter drops it.
    pub(crate) json: Option<Box<RawValue>>,
}

pub(crate) struct Topic {
    tx: broadcast::Sender<Arc<Live>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Topic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
pub(crate) struct Fanout {
    nats: async_nats::Client,
    store: Store,
    topics: Arc<Mutex<HashMap<SessionId, Weak<Topic>>>>,
}

impl Fanout {
    pub(crate) fn new(nats: async_nats::Client, store: Store) -> Self {
        Self {
            nats,
            store,
            topics: Arc::default(),
        }
    }

    /// Joins the session's live feed. When this returns, the NATS subscription is registered
    /// at the server, so every event appended from now on will be received.
    pub(crate) async fn join(
        &self,
        sid: &SessionId,
    ) -> Result<(Arc<Topic>, broadcast::Receiver<Arc<Live>>), async_nats::Error> {
        let mut topics = self.topics.lock().await;
        if let Some(t) = topics.get(sid).and_then(Weak::upgrade) {
            let rx = t.tx.subscribe();
            return Ok((t, rx));
        }
        let sub = self
            .nats
            .subscribe(self.store.names.events_subject(sid))
            .await?;
        self.nats.flush().await?;
        let (tx, rx) = broadcast::channel(256);
        let task = tokio::spawn(
            pump(self.store.clone(), sid.clone(), sub, tx.clone())
                .instrument(info_span!("fanout", session_id = %sid)),
        );
        let topic = Arc::new(Topic { tx, task });
        topics.retain(|_, w| w.strong_count() > 0);
        topics.insert(sid.clone(), Arc::downgrade(&topic));
        metrics::gauge!("oh_gateway_session_subscriptions").set(topics.len() as f64);
        Ok((topic, rx))
    }
}

async fn pump(
    store: Store,
    sid: SessionId,
    mut sub: async_nats::Subscriber,
    tx: broadcast::Sender<Arc<Live>>,
) {
    while let Some(msg) = sub.next().await {
        let (id, payload) = match store.decode_live(&sid, &msg).await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "undecodable live event; sockets will re-read it from the log");
                continue;
            }
        };
        let json = match Event::from_json(&payload) {
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
        debug!(id, "live event");
        // No receiver means every socket left; the topic is about to be dropped.
        let _ = tx.send(Arc::new(Live { id, json }));
    }
}
