//! The load tool's own Socket.IO client: Engine.IO v4 over websocket, default namespace, one
//! tokio task per connection that reads, answers pings and handles every `oh_event` inline (no
//! event queue), with small websocket buffers. It exists because [`crate::sio::SioClient`] keeps
//! a second task-side queue per client and 128 KiB websocket buffers, and because it cannot read
//! events and wait for an ack at once, which the latency probes need (the arrival time of each
//! frame is taken when it is read, not when a test gets around to it).
//!
//! What a connection records lives in [`Probe`] (shared with the scenario) and in the task's
//! own list of received event ids, handed back by [`Client::finish`] for the lost/duplicate
//! check.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::stats::{Metric, Stats};

/// Prefix of every message the tool sends; the rest is the message's sequence number.
pub(crate) const MSG_PREFIX: &str = "lt ";

/// A conversation as the load tool sees it: its id and when each of its messages was sent.
#[derive(Debug)]
pub struct Conv {
    /// Conversation id.
    pub id: String,
    /// Send instant of message `seq` at index `seq`.
    pub sent_at: std::sync::Mutex<Vec<Instant>>,
    /// Messages below this sequence are warm-up: not recorded.
    pub warmup: u64,
}

impl Conv {
    /// A conversation with no message sent yet.
    pub fn new(id: String, warmup: u64) -> Arc<Conv> {
        Arc::new(Conv {
            id,
            sent_at: std::sync::Mutex::new(Vec::new()),
            warmup,
        })
    }

    /// Send instant of message `seq`, unless it is a warm-up message or unknown.
    fn sent(&self, seq: u64) -> Option<Instant> {
        if seq < self.warmup {
            return None;
        }
        let v = self
            .sent_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        usize::try_from(seq).ok().and_then(|i| v.get(i).copied())
    }

    /// Records the send instant of the next message and returns its sequence number.
    pub(crate) fn next_seq(&self, at: Instant) -> u64 {
        let mut v = self
            .sent_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        v.push(at);
        (v.len() - 1) as u64
    }
}

/// What one connection reports while it runs.
#[derive(Debug)]
pub(crate) struct Probe {
    /// Highest event id received (-1: none).
    pub(crate) max_id: AtomicI64,
    /// Number of `oh_event`s received.
    pub(crate) events: watch::Sender<u64>,
    /// Set once an `awaiting_user_input` state has been received.
    pub(crate) ready: watch::Sender<Option<Instant>>,
    /// Highest message sequence whose `awaiting_user_input` (after its echo) arrived.
    pub(crate) done: watch::Sender<i64>,
}

impl Probe {
    fn new() -> Arc<Probe> {
        Arc::new(Probe {
            max_id: AtomicI64::new(-1),
            events: watch::Sender::new(0),
            ready: watch::Sender::new(None),
            done: watch::Sender::new(-1),
        })
    }
}

/// How a connection measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Sends messages: ack, own user message, reply, awaiting (metrics `ack`, `user_echo`,
    /// `reply`, `idle`).
    Driver,
    /// Watches another client's messages: delivery of the reply (`fanout_reply`).
    Watcher,
    /// Records nothing per message (replay probes, idle sockets).
    Quiet,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub(crate) struct ConnectSpec {
    pub(crate) base_url: String,
    pub(crate) conv: Arc<Conv>,
    pub(crate) latest: i64,
    pub(crate) token: Option<String>,
    pub(crate) role: Role,
    pub(crate) timeout: Duration,
}

/// Why a connect failed (the kind is the error counter's name).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect_timeout")]
    Timeout,
    #[error("connect_refused: {0}")]
    Refused(String),
    #[error("connect_ws: {0}")]
    Ws(String),
    #[error("connect_protocol: {0}")]
    Protocol(String),
}

impl ConnectError {
    /// Error counter name.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ConnectError::Timeout => "connect_timeout",
            ConnectError::Refused(_) => "connect_refused",
            ConnectError::Ws(_) => "connect_ws",
            ConnectError::Protocol(_) => "connect_protocol",
        }
    }
}

enum Cmd {
    Text(String),
}

/// A connected client. Dropping it aborts the connection task.
pub(crate) struct Client {
    pub(crate) conv: Arc<Conv>,
    pub(crate) latest: i64,
    pub(crate) role: Role,
    pub(crate) probe: Arc<Probe>,
    cmd: Option<mpsc::Sender<Cmd>>,
    task: Option<JoinHandle<Vec<u64>>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_url(base: &str, conv: &str, latest: i64) -> String {
    let rest = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("ws://"))
        .unwrap_or(base)
        .trim_end_matches('/');
    // Conversation ids are [A-Za-z0-9_-]: nothing to escape.
    format!(
        "ws://{rest}/socket.io/?EIO=4&transport=websocket&conversation_id={conv}&latest_event_id={latest}"
    )
}

async fn read_text(ws: &mut Ws) -> Result<Utf8Bytes, ConnectError> {
    loop {
        match ws.next().await {
            None => return Err(ConnectError::Ws("closed during handshake".to_owned())),
            Some(Err(e)) => return Err(ConnectError::Ws(e.to_string())),
            Some(Ok(Message::Text(t))) => return Ok(t),
            Some(Ok(Message::Close(_))) => {
                return Err(ConnectError::Ws("closed during handshake".to_owned()));
            }
            Some(Ok(_)) => {}
        }
    }
}

impl Client {
    /// Connects (websocket, Engine.IO OPEN, Socket.IO CONNECT) within `spec.timeout`, records
    /// the `connect` metric and starts the connection task.
    pub(crate) async fn connect(
        spec: ConnectSpec,
        stats: Arc<Stats>,
    ) -> Result<Client, ConnectError> {
        let started = Instant::now();
        let timeout = spec.timeout;
        let probe = Probe::new();
        let handshake = tokio::time::timeout(timeout, handshake(&spec))
            .await
            .unwrap_or(Err(ConnectError::Timeout));
        let (ws, early, liveness) = match handshake {
            Ok(x) => x,
            Err(e) => {
                stats.error(e.kind());
                return Err(e);
            }
        };
        stats.record(Metric::Connect, started.elapsed());
        stats.sockets.fetch_add(1, Ordering::Relaxed);
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let task = tokio::spawn(run(Task {
            ws,
            cmd_rx,
            early,
            liveness,
            conv: spec.conv.clone(),
            role: spec.role,
            probe: probe.clone(),
            stats,
            ids: Vec::new(),
            last_reply: None,
            next_ack: 0,
        }));
        Ok(Client {
            conv: spec.conv,
            latest: spec.latest,
            role: spec.role,
            probe,
            cmd: Some(cmd_tx),
            task: Some(task),
        })
    }

    /// Sends message `seq` as `oh_user_action` with ack id `seq`.
    pub(crate) async fn send_message(&self, seq: u64) -> bool {
        let payload = serde_json::json!({
            "action": "message",
            "args": {"content": format!("{MSG_PREFIX}{seq}")},
        });
        let text = format!(r#"42{seq}["oh_user_action",{payload}]"#);
        match &self.cmd {
            Some(tx) => tx.send(Cmd::Text(text)).await.is_ok(),
            None => false,
        }
    }

    /// Closes the connection (Socket.IO DISCONNECT and a close frame) and returns the ids of
    /// every `oh_event` received, in arrival order.
    pub(crate) async fn finish(mut self) -> Vec<u64> {
        self.cmd = None;
        let Some(mut task) = self.task.take() else {
            return Vec::new();
        };
        match tokio::time::timeout(Duration::from_secs(10), &mut task).await {
            Ok(Ok(ids)) => ids,
            Ok(Err(_)) => Vec::new(),
            Err(_) => {
                task.abort();
                Vec::new()
            }
        }
    }
}

async fn handshake(spec: &ConnectSpec) -> Result<(Ws, Vec<Utf8Bytes>, Duration), ConnectError> {
    let url = ws_url(&spec.base_url, &spec.conv.id, spec.latest);
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Ws(format!("{url}: {e}")))?;
    if let Some(t) = &spec.token {
        let v = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|e| ConnectError::Ws(format!("token: {e}")))?;
        req.headers_mut().insert("authorization", v);
    }
    // Small buffers: thousands of idle clients in one process.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
        .await
        .map_err(|e| ConnectError::Ws(e.to_string()))?;
    let open = read_text(&mut ws).await?;
    let open: Value = open
        .strip_prefix('0')
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| ConnectError::Protocol("no engine OPEN".to_owned()))?;
    let ping = open["pingInterval"].as_u64().unwrap_or(25_000);
    let ping_timeout = open["pingTimeout"].as_u64().unwrap_or(20_000);
    ws.send(Message::text("40"))
        .await
        .map_err(|e| ConnectError::Ws(e.to_string()))?;
    let mut early = Vec::new();
    loop {
        let t = read_text(&mut ws).await?;
        if t.as_str() == "2" {
            ws.send(Message::text("3"))
                .await
                .map_err(|e| ConnectError::Ws(e.to_string()))?;
        } else if t.starts_with("40") {
            break;
        } else if let Some(err) = t.strip_prefix("44") {
            let msg = serde_json::from_str::<Value>(err)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| err.to_owned());
            return Err(ConnectError::Refused(msg));
        } else if t.starts_with("42") {
            early.push(t);
        } else if t.as_str() == "1" || t.starts_with("41") {
            return Err(ConnectError::Ws("closed by the server".to_owned()));
        }
    }
    Ok((
        ws,
        early,
        Duration::from_millis(ping.saturating_add(ping_timeout)),
    ))
}

struct Task {
    ws: Ws,
    cmd_rx: mpsc::Receiver<Cmd>,
    early: Vec<Utf8Bytes>,
    liveness: Duration,
    conv: Arc<Conv>,
    role: Role,
    probe: Arc<Probe>,
    stats: Arc<Stats>,
    ids: Vec<u64>,
    /// Sequence of the last reply seen whose `awaiting_user_input` has not come yet.
    last_reply: Option<u64>,
    next_ack: u64,
}

async fn run(mut t: Task) -> Vec<u64> {
    let early = std::mem::take(&mut t.early);
    for text in early {
        t.on_text(text.as_str(), Instant::now());
    }
    let silence = tokio::time::sleep(t.liveness);
    tokio::pin!(silence);
    let reason: Option<&'static str> = loop {
        tokio::select! {
            cmd = t.cmd_rx.recv() => match cmd {
                Some(Cmd::Text(s)) => {
                    if t.ws.send(Message::text(s)).await.is_err() {
                        break Some("send_failed");
                    }
                }
                None => {
                    // Best effort: the server notices the close either way.
                    let _ = t.ws.send(Message::text("41")).await;
                    let _ = t.ws.close(None).await;
                    break None;
                }
            },
            msg = t.ws.next() => {
                let now = Instant::now();
                let text = match msg {
                    Some(Ok(Message::Text(s))) => s,
                    Some(Ok(Message::Close(_))) | None => break Some("disconnected"),
                    Some(Err(_)) => break Some("ws_error"),
                    Some(Ok(_)) => continue,
                };
                silence.as_mut().reset(tokio::time::Instant::now() + t.liveness);
                match text.as_str() {
                    "2" => {
                        if t.ws.send(Message::text("3")).await.is_err() {
                            break Some("send_failed");
                        }
                    }
                    "1" => break Some("disconnected"),
                    s if s.starts_with("41") => break Some("disconnected"),
                    s => t.on_text(s, now),
                }
            },
            () = &mut silence => break Some("ping_timeout"),
        }
    };
    t.stats.sockets.fetch_sub(1, Ordering::Relaxed);
    if let Some(kind) = reason {
        t.stats.error(kind);
    }
    t.ids
}

impl Task {
    fn on_text(&mut self, s: &str, now: Instant) {
        if let Some(rest) = s.strip_prefix("43") {
            self.on_ack(rest, now);
        } else if let Some(rest) = s.strip_prefix("42") {
            match serde_json::from_str::<Value>(rest) {
                Ok(Value::Array(mut a)) if a.len() >= 2 && a[0] == "oh_event" => {
                    let data = a.swap_remove(1);
                    self.on_event(&data, now);
                }
                Ok(_) => {}
                Err(_) => self.stats.error("bad_frame"),
            }
        }
    }

    fn on_ack(&mut self, rest: &str, now: Instant) {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let Ok(seq) = rest[..digits].parse::<u64>() else {
            self.stats.error("bad_frame");
            return;
        };
        let ok = serde_json::from_str::<Value>(&rest[digits..])
            .ok()
            .is_some_and(|v| v[0]["success"] == true);
        if !ok {
            self.stats.error("ack_failed");
            return;
        }
        self.next_ack = self.next_ack.max(seq + 1);
        if let Some(sent) = self.conv.sent(seq) {
            self.stats.record(Metric::Ack, now - sent);
        }
    }

    fn on_event(&mut self, ev: &Value, now: Instant) {
        self.stats.events_in.fetch_add(1, Ordering::Relaxed);
        if ev.get("error") == Some(&Value::Bool(true)) {
            self.stats.error("error_event");
            return;
        }
        let Some(id) = ev["id"].as_u64() else {
            self.stats.error("event_without_id");
            return;
        };
        self.ids.push(id);
        let id_i = i64::try_from(id).unwrap_or(i64::MAX);
        self.probe.max_id.fetch_max(id_i, Ordering::Relaxed);
        self.probe.events.send_modify(|n| *n += 1);
        if ev["action"] == "message" {
            let content = ev["args"]["content"].as_str().unwrap_or_default();
            let (agent, text) = match ev["source"].as_str() {
                Some("agent") => (true, content.strip_prefix("echo: ").unwrap_or_default()),
                Some("user") => (false, content),
                _ => return,
            };
            let Some(seq) = text
                .strip_prefix(MSG_PREFIX)
                .and_then(|n| n.parse::<u64>().ok())
            else {
                return;
            };
            let sent = self.conv.sent(seq);
            let record = |m: Metric| {
                if let Some(sent) = sent {
                    self.stats.record(m, now - sent);
                }
            };
            match (self.role, agent) {
                (Role::Driver, false) => record(Metric::UserEcho),
                (Role::Driver, true) => {
                    record(Metric::Reply);
                    self.stats.replies.fetch_add(1, Ordering::Relaxed);
                    self.last_reply = Some(seq);
                }
                (Role::Watcher, true) => record(Metric::FanoutReply),
                _ => {}
            }
        } else if ev["observation"] == "agent_state_changed"
            && ev["extras"]["agent_state"] == "awaiting_user_input"
        {
            self.probe.ready.send_if_modified(|r| {
                if r.is_none() {
                    *r = Some(now);
                    true
                } else {
                    false
                }
            });
            if let Some(seq) = self.last_reply.take() {
                if let Some(sent) = self.conv.sent(seq) {
                    self.stats.record(Metric::Idle, now - sent);
                }
                self.probe
                    .done
                    .send_replace(i64::try_from(seq).unwrap_or(i64::MAX));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_url() {
        assert_eq!(
            ws_url("http://127.0.0.1:3000/", "abc", -1),
            "ws://127.0.0.1:3000/socket.io/?EIO=4&transport=websocket&conversation_id=abc&latest_event_id=-1"
        );
    }
}
