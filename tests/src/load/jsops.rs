//! `--count-js-ops`: what a scenario costs the broker, counted from the broker itself. An
//! observer connection subscribes to every subject (`>`) and sorts each message: JetStream API
//! requests (`$JS.API.<call>`), acks (`$JS.ACK.`), and stream publishes (a message on a
//! deployment subject `{ns}.<kind>...` that asks for an ack). Core-only traffic (status
//! updates, the stream's republishes, replies) is not an operation, nor is a consumer's
//! delivery of a stored message: it keeps its subject and carries its ack subject as reply
//! (`$JS.ACK.…`), so it looks like a publish but is the answer to a pull already counted.
//! The observer's own subscription costs the server a copy of every message: count in a run
//! of its own, not in a timed one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;

/// Counts until [`OpCounter::finish`].
pub struct OpCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Which kind of broker operation a message on `subject` (with its reply subject, if any) is;
/// `None` for traffic that is not one.
pub fn kind(subject: &str, reply: Option<&str>) -> Option<String> {
    if let Some(call) = subject.strip_prefix("$JS.API.") {
        // `DIRECT.GET.<stream>[.<subject>]`, `STREAM.MSG.GET.<stream>`,
        // `CONSUMER.MSG.NEXT.<stream>.<consumer>`, ...: the call without its arguments.
        let words: Vec<&str> = call.split('.').collect();
        let n = match words.first() {
            Some(&"DIRECT") => 2,
            Some(&"STREAM" | &"CONSUMER") if words.get(1) == Some(&"MSG") => 3,
            _ => 2,
        };
        return Some(format!("api {}", words[..n.min(words.len())].join(".")));
    }
    if subject.starts_with("$JS.ACK.") {
        return Some("ack".to_owned());
    }
    let reply = reply?;
    if subject.starts_with('$') || subject.starts_with("_INBOX.") || reply.starts_with("$JS.ACK.") {
        return None;
    }
    // `{ns}.<kind>.…` published with a reply subject: a JetStream publish.
    let mut words = subject.split('.');
    let (_, kind) = (words.next()?, words.next()?);
    Some(format!("publish {kind}"))
}

impl OpCounter {
    /// Starts counting on the NATS at `url` (a user that may subscribe to everything).
    ///
    /// # Errors
    /// If NATS cannot be reached or the subscription is refused.
    pub async fn start(url: &str) -> Result<OpCounter, String> {
        let url = shared::creds::BrokerUrl::parse(url)
            .map_err(|e| format!("count-js-ops NATS URL: {e}"))?;
        let (opts, servers) = shared::creds::nats_connect_options(&url);
        let client = opts
            .connect(servers)
            .await
            .map_err(|e| format!("count-js-ops connect to {url}: {e}"))?;
        let mut sub = client
            .subscribe(">")
            .await
            .map_err(|e| format!("count-js-ops subscribe: {e}"))?;
        client
            .flush()
            .await
            .map_err(|e| format!("count-js-ops flush: {e}"))?;
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let c = Arc::clone(&counts);
        let task = tokio::spawn(async move {
            let _client = client; // kept open while counting
            while let Some(m) = sub.next().await {
                if let Some(k) = kind(m.subject.as_str(), m.reply.as_deref()) {
                    let mut map = c.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    *map.entry(k).or_insert(0) += 1;
                }
            }
        });
        Ok(OpCounter { counts, task })
    }

    /// Stops counting; the operations by kind.
    pub fn finish(self) -> BTreeMap<String, u64> {
        self.task.abort();
        let map = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::kind;

    #[test]
    fn messages_are_sorted_into_operations() {
        let k = |s: &str, r: bool| kind(s, r.then_some("_INBOX.a.b"));
        assert_eq!(
            k("$JS.API.DIRECT.GET.t_events", true).as_deref(),
            Some("api DIRECT.GET")
        );
        assert_eq!(
            k("$JS.API.DIRECT.GET.t_meta.t.meta.u.s", true).as_deref(),
            Some("api DIRECT.GET")
        );
        assert_eq!(
            k("$JS.API.STREAM.MSG.DELETE.t_actions", true).as_deref(),
            Some("api STREAM.MSG.DELETE")
        );
        assert_eq!(
            k("$JS.API.CONSUMER.MSG.NEXT.t_work.workers", true).as_deref(),
            Some("api CONSUMER.MSG.NEXT")
        );
        assert_eq!(
            k("$JS.API.STREAM.INFO.t_actions", true).as_deref(),
            Some("api STREAM.INFO")
        );
        assert_eq!(
            k("$JS.ACK.t_work.workers.1.2.3.4.5", true).as_deref(),
            Some("ack")
        );
        assert_eq!(k("t.ev.abc", true).as_deref(), Some("publish ev"));
        assert_eq!(k("t.meta.u.abc", true).as_deref(), Some("publish meta"));
        // Not operations: core status updates, republishes, replies.
        assert_eq!(k("t.st.abc", false), None);
        assert_eq!(k("t.act.abc.stored", false), None);
        assert_eq!(k("_INBOX.x.y", false), None);
        // A pull consumer's delivery of a stored start request: not a second publish.
        assert_eq!(
            kind("t.work.abc", Some("$JS.ACK.t_work.workers.1.2.2.17.0")),
            None
        );
    }
}
