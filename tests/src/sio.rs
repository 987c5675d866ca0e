//! A small Socket.IO v5 / Engine.IO v4 client, websocket transport only, default namespace `/`
//! only, no binary attachments. Used by the end-to-end and fault tests and the soak tool
//! (through [`crate::cluster::Cluster::connect`]); light: one tokio task per client and bounded
//! channels. The load tool has its own leaner client ([`crate::load::client`]).
//!
//! Wire summary (what a server like python-socketio or socketioxide sends):
//! - URL `ws://HOST/socket.io/?EIO=4&transport=websocket&<query>`.
//! - The server opens with the engine OPEN packet `0{"sid":..,"pingInterval":..,"pingTimeout":..}`;
//!   the client sends CONNECT `40` or `40<auth json>`; the server answers `40{"sid":..}` or
//!   CONNECT_ERROR `44{"message":..,"data":..}` ([`SioError::ConnectRefused`]). Events sent before
//!   the CONNECT answer (python-socketio sends the replay first) are kept and delivered after it.
//! - Engine ping `2` is answered with pong `3` by the client task. If no ping arrives within
//!   `pingInterval + pingTimeout` the client considers the server gone, like socket.io-client.
//! - EVENT `42["name",arg]` (optionally `42<id>[..]`) is delivered in order by
//!   [`SioClient::next_event`] (first argument only; `Null` if none; an ack requested by the
//!   server is not answered). ACK `43<id>[..]` completes [`SioClient::emit_with_ack`].
//! - DISCONNECT `41`, engine CLOSE `1`, a close frame or a socket error end the client:
//!   [`SioClient::next_event`] then returns [`SioError::Disconnected`] (after the queued events),
//!   and [`SioClient::disconnect_reason`] says why.
//!
//! Malformed or unsupported frames never panic: they surface as [`SioError::Protocol`] from
//! `next_event`, and the connection stays usable.
//!
//! Back-pressure: incoming events are queued in a bounded channel
//! ([`ConnectOpts::event_buffer`]); when it is full the client task stops reading the socket
//! (and so stops answering pings) until the test consumes events.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        Message,
        client::IntoClientRequest,
        http::{HeaderName, HeaderValue},
        protocol::WebSocketConfig,
    },
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What JavaScript's `encodeURIComponent` escapes: all but `A-Z a-z 0-9 - _ . ! ~ * ' ( )`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Largest websocket message and frame accepted from the server (and sent).
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Everything that can go wrong with a [`SioClient`].
#[derive(Debug, thiserror::Error)]
pub enum SioError {
    /// The base URL or a header could not be used.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The websocket could not be opened or failed during the handshake.
    #[error("websocket: {0}")]
    Ws(String),
    /// The server refused the Socket.IO CONNECT (CONNECT_ERROR `44{"message":..,"data":..}`).
    #[error("connect refused: {message}")]
    ConnectRefused {
        /// `message` of the CONNECT_ERROR payload.
        message: String,
        /// `data` of the CONNECT_ERROR payload, if any.
        data: Option<Value>,
    },
    /// The operation did not finish in time; the string says which one.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The connection is closed (server disconnect, close frame, socket error, ping timeout or
    /// [`SioClient::close`]); see [`SioClient::disconnect_reason`].
    #[error("disconnected")]
    Disconnected,
    /// The server sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// How to connect. `ConnectOpts::new(base_url)` plus the builder methods, or fill the fields.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    /// `http://HOST:PORT` (or `ws://`); `https`/`wss` need TLS, which is not compiled in.
    pub base_url: String,
    /// Engine.IO path, default `/socket.io/`.
    pub path: String,
    /// Extra query parameters, e.g. `conversation_id`, `latest_event_id`; encoded here like
    /// JavaScript's `encodeURIComponent`, as socket.io-client does.
    pub query: Vec<(String, String)>,
    /// Payload of the CONNECT packet (`40{...}`), if any.
    pub auth: Option<Value>,
    /// Extra HTTP headers of the upgrade request, e.g. `Authorization`.
    pub headers: Vec<(String, String)>,
    /// Deadline for the whole connect (websocket + handshake). Default 10 s.
    pub timeout: Duration,
    /// Capacity of the incoming event queue. Default 1024.
    pub event_buffer: usize,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        ConnectOpts {
            base_url: "http://127.0.0.1:3000".to_owned(),
            path: "/socket.io/".to_owned(),
            query: Vec::new(),
            auth: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            event_buffer: 1024,
        }
    }
}

impl ConnectOpts {
    /// Defaults with the given base URL.
    pub fn new(base_url: impl Into<String>) -> Self {
        ConnectOpts {
            base_url: base_url.into(),
            ..ConnectOpts::default()
        }
    }

    /// Adds a query parameter.
    pub fn query(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.query.push((key.into(), value.into()));
        self
    }

    /// Adds an HTTP header to the upgrade request.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the CONNECT payload.
    pub fn auth(mut self, auth: Value) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Sets the connect deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The websocket URL this connects to.
    pub fn ws_url(&self) -> Result<String, SioError> {
        let mut url = reqwest::Url::parse(&self.base_url)
            .map_err(|e| SioError::InvalidRequest(format!("base_url {:?}: {e}", self.base_url)))?;
        let scheme = match url.scheme() {
            "http" | "ws" => "ws",
            "https" | "wss" => "wss",
            other => {
                return Err(SioError::InvalidRequest(format!(
                    "unsupported scheme {other:?} in {:?}",
                    self.base_url
                )));
            }
        };
        url.set_scheme(scheme)
            .map_err(|()| SioError::InvalidRequest(format!("cannot use scheme {scheme}")))?;
        url.set_path(&self.path);
        let mut query = String::from("EIO=4&transport=websocket");
        for (k, v) in &self.query {
            query.push('&');
            query.extend(utf8_percent_encode(k, URI_COMPONENT));
            query.push('=');
            query.extend(utf8_percent_encode(v, URI_COMPONENT));
        }
        url.set_query(Some(&query));
        Ok(url.into())
    }
}

/// One event received from the server, or an error to report in order.
type Incoming = Result<(String, Value), SioError>;

#[derive(Default)]
struct AckTable {
    closed: bool,
    pending: HashMap<u64, oneshot::Sender<Vec<Value>>>,
}

#[derive(Default)]
struct Shared {
    acks: Mutex<AckTable>,
    reason: Mutex<Option<String>>,
}

impl Shared {
    fn acks(&self) -> std::sync::MutexGuard<'_, AckTable> {
        self.acks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connected Socket.IO client (default namespace). Dropping it closes the connection.
pub struct SioClient {
    sid: String,
    engine_sid: String,
    out_tx: mpsc::Sender<Message>,
    events_rx: mpsc::Receiver<Incoming>,
    early: VecDeque<Incoming>,
    shared: Arc<Shared>,
    next_ack: AtomicU64,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for SioClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SioClient")
            .field("sid", &self.sid)
            .field("engine_sid", &self.engine_sid)
            .finish_non_exhaustive()
    }
}

impl SioClient {
    /// Opens the websocket and performs the Engine.IO and Socket.IO handshakes within
    /// `opts.timeout`.
    pub async fn connect(opts: ConnectOpts) -> Result<SioClient, SioError> {
        let timeout = opts.timeout;
        tokio::time::timeout(timeout, connect_inner(opts))
            .await
            .unwrap_or_else(|_| Err(SioError::Timeout(format!("connect within {timeout:?}"))))
    }

    /// The Socket.IO session id from the CONNECT answer.
    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// The Engine.IO session id from the OPEN packet.
    pub fn engine_sid(&self) -> &str {
        &self.engine_sid
    }

    /// `false` once the connection has ended (events may still be queued).
    pub fn is_connected(&self) -> bool {
        !self.task.is_finished()
    }

    /// Why the connection ended, once it has.
    pub fn disconnect_reason(&self) -> Option<String> {
        self.shared
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends `42["event",data]`. Returns once queued for sending.
    pub async fn emit(&self, event: &str, data: &Value) -> Result<(), SioError> {
        let text = encode_event(None, event, data)?;
        self.out_tx
            .send(Message::text(text))
            .await
            .map_err(|_| SioError::Disconnected)
    }

    /// Sends `42<n>["event",data]` and waits for the matching `43<n>[...]`, returning its
    /// arguments.
    pub async fn emit_with_ack(
        &self,
        event: &str,
        data: &Value,
        timeout: Duration,
    ) -> Result<Vec<Value>, SioError> {
        let id = self.next_ack.fetch_add(1, Ordering::Relaxed);
        let text = encode_event(Some(id), event, data)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut acks = self.shared.acks();
            if acks.closed {
                return Err(SioError::Disconnected);
            }
            acks.pending.insert(id, tx);
        }
        let wait = async {
            self.out_tx
                .send(Message::text(text))
                .await
                .map_err(|_| SioError::Disconnected)?;
            rx.await.map_err(|_| SioError::Disconnected)
        };
        let res = tokio::time::timeout(timeout, wait).await;
        match res {
            Ok(Ok(args)) => Ok(args),
            Ok(Err(e)) => {
                self.shared.acks().pending.remove(&id);
                Err(e)
            }
            Err(_) => {
                self.shared.acks().pending.remove(&id);
                Err(SioError::Timeout(format!(
                    "ack {id} for {event:?} within {timeout:?}"
                )))
            }
        }
    }

    /// The next event `(name, first argument)` in arrival order, waiting at most `timeout`.
    /// [`SioError::Timeout`] if none came, [`SioError::Disconnected`] once the connection has
    /// ended and the queue is drained, [`SioError::Protocol`] for a frame that could not be
    /// understood (the connection stays usable).
    pub async fn next_event(&mut self, timeout: Duration) -> Result<(String, Value), SioError> {
        if let Some(item) = self.early.pop_front() {
            return item;
        }
        match tokio::time::timeout(timeout, self.events_rx.recv()).await {
            Err(_) => Err(SioError::Timeout(format!("next event within {timeout:?}"))),
            Ok(None) => Err(SioError::Disconnected),
            Ok(Some(item)) => item,
        }
    }

    /// An event if one is queued now: `Ok(None)` if none, `Err(Disconnected)` once the
    /// connection has ended and the queue is drained.
    pub fn try_next(&mut self) -> Result<Option<(String, Value)>, SioError> {
        if let Some(item) = self.early.pop_front() {
            return item.map(Some);
        }
        match self.events_rx.try_recv() {
            Ok(item) => item.map(Some),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(SioError::Disconnected),
        }
    }

    /// Skips events until one satisfies `pred(name, data)`, within an overall `timeout`.
    /// Protocol errors are skipped too; timeout and disconnect are returned.
    pub async fn wait_event<F>(
        &mut self,
        timeout: Duration,
        mut pred: F,
    ) -> Result<(String, Value), SioError>
    where
        F: FnMut(&str, &Value) -> bool,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Ok((name, data)) if pred(&name, &data) => return Ok((name, data)),
                Ok(_) | Err(SioError::Protocol(_)) => {}
                Err(SioError::Timeout(_)) => {
                    return Err(SioError::Timeout(format!(
                        "matching event within {timeout:?}"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends DISCONNECT `41`, closes the websocket and waits (up to 5 s) for the client task.
    pub async fn close(self) {
        let SioClient {
            out_tx,
            events_rx,
            task,
            ..
        } = self;
        // The task sends `41` and a close frame when the sender side is gone.
        drop(out_tx);
        // Unblock the task if it waits for room in the event queue.
        drop(events_rx);
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// `42[<event>,<data>]` or `42<id>[...]`, serialised without cloning `data`.
fn encode_event(id: Option<u64>, event: &str, data: &Value) -> Result<String, SioError> {
    let name = serde_json::to_string(event).map_err(|e| SioError::Protocol(e.to_string()))?;
    let data = serde_json::to_string(data).map_err(|e| SioError::Protocol(e.to_string()))?;
    let mut s = String::with_capacity(name.len() + data.len() + 24);
    s.push_str("42");
    if let Some(id) = id {
        s.push_str(&id.to_string());
    }
    s.push('[');
    s.push_str(&name);
    s.push(',');
    s.push_str(&data);
    s.push(']');
    Ok(s)
}

/// At most the first 80 bytes of `s` (on a char boundary), for error messages.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A Socket.IO packet of the default namespace.
#[derive(Debug, PartialEq)]
enum Packet {
    Connect(Option<Value>),
    Disconnect,
    Event {
        name: String,
        data: Value,
    },
    Ack {
        id: u64,
        args: Vec<Value>,
    },
    ConnectError {
        message: String,
        data: Option<Value>,
    },
}

/// What an engine frame means to the client.
#[derive(Debug, PartialEq)]
enum Frame {
    Ping,
    Pong,
    Noop,
    Close,
    Message(Packet),
}

/// Parses one Engine.IO v4 text frame (one packet per websocket message).
fn parse_frame(text: &str) -> Result<Frame, String> {
    let mut chars = text.chars();
    match chars.next() {
        Some('2') => Ok(Frame::Ping),
        Some('3') => Ok(Frame::Pong),
        Some('6') => Ok(Frame::Noop),
        Some('1') => Ok(Frame::Close),
        Some('4') => parse_packet(chars.as_str()).map(Frame::Message),
        Some('0') => Err("unexpected engine OPEN packet".to_owned()),
        Some(c) => Err(format!("unknown engine packet type {c:?}")),
        None => Err("empty frame".to_owned()),
    }
}

fn parse_packet(s: &str) -> Result<Packet, String> {
    let short = || format!("{:?}", clip(s));
    let (kind, mut rest) = match s.chars().next() {
        Some(c) => (c, &s[c.len_utf8()..]),
        None => return Err("empty socket.io packet".to_owned()),
    };
    if rest.starts_with('/') {
        let (ns, after) = rest.split_once(',').unwrap_or((rest, ""));
        if ns != "/" {
            return Err(format!(
                "packet for namespace {ns} not supported: {}",
                short()
            ));
        }
        rest = after;
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = if digits > 0 {
        Some(
            rest[..digits]
                .parse::<u64>()
                .map_err(|e| format!("bad packet id: {e}: {}", short()))?,
        )
    } else {
        None
    };
    let payload = &rest[digits..];
    let json = |p: &str| -> Result<Value, String> {
        serde_json::from_str(p).map_err(|e| format!("bad JSON ({e}) in packet {}", short()))
    };
    match kind {
        '0' => Ok(Packet::Connect(if payload.is_empty() {
            None
        } else {
            Some(json(payload)?)
        })),
        '1' => Ok(Packet::Disconnect),
        '2' => {
            let Value::Array(mut args) = json(payload)? else {
                return Err(format!("EVENT payload is not an array: {}", short()));
            };
            if args.is_empty() {
                return Err(format!("EVENT without a name: {}", short()));
            }
            let Value::String(name) = args.remove(0) else {
                return Err(format!("EVENT name is not a string: {}", short()));
            };
            let data = if args.is_empty() {
                Value::Null
            } else {
                args.swap_remove(0)
            };
            Ok(Packet::Event { name, data })
        }
        '3' => {
            let id = id.ok_or_else(|| format!("ACK without an id: {}", short()))?;
            let Value::Array(args) = json(payload)? else {
                return Err(format!("ACK payload is not an array: {}", short()));
            };
            Ok(Packet::Ack { id, args })
        }
        '4' => {
            let v = if payload.is_empty() {
                Value::Null
            } else {
                json(payload)?
            };
            let (message, data) = match v {
                Value::Object(mut m) => {
                    let message = match m.remove("message") {
                        Some(Value::String(s)) => s,
                        Some(other) => other.to_string(),
                        None => String::new(),
                    };
                    (message, m.remove("data"))
                }
                Value::String(s) => (s, None),
                other => (other.to_string(), None),
            };
            Ok(Packet::ConnectError { message, data })
        }
        '5' | '6' => Err(format!("binary packets are not supported: {}", short())),
        c => Err(format!("unknown socket.io packet type {c:?}: {}", short())),
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenPacket {
    sid: String,
    ping_interval: u64,
    ping_timeout: u64,
}

async fn read_text(ws: &mut Ws) -> Result<String, SioError> {
    loop {
        match ws.next().await {
            None => return Err(SioError::Disconnected),
            Some(Err(e)) => return Err(SioError::Ws(e.to_string())),
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(_))) => return Err(SioError::Disconnected),
            Some(Ok(Message::Binary(_))) => {
                return Err(SioError::Protocol(
                    "binary frame during handshake".to_owned(),
                ));
            }
            Some(Ok(_)) => {}
        }
    }
}

async fn connect_inner(opts: ConnectOpts) -> Result<SioClient, SioError> {
    let url = opts.ws_url()?;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| SioError::InvalidRequest(format!("{url}: {e}")))?;
    for (k, v) in &opts.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| SioError::InvalidRequest(format!("header name {k:?}: {e}")))?;
        let value = HeaderValue::from_str(v)
            .map_err(|e| SioError::InvalidRequest(format!("header {k} value: {e}")))?;
        request.headers_mut().append(name, value);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE));
    let (mut ws, _resp) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .map_err(|e| SioError::Ws(format!("{url}: {e}")))?;

    // Engine.IO OPEN.
    let open = read_text(&mut ws).await?;
    let open: OpenPacket = open
        .strip_prefix('0')
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| {
            SioError::Protocol(format!("expected engine OPEN, got {:?}", clip(&open)))
        })?;

    // Socket.IO CONNECT.
    let connect = match &opts.auth {
        Some(auth) => format!("40{auth}"),
        None => "40".to_owned(),
    };
    ws.send(Message::text(connect))
        .await
        .map_err(|e| SioError::Ws(e.to_string()))?;
    let mut early = VecDeque::new();
    let sid = loop {
        let text = read_text(&mut ws).await?;
        match parse_frame(&text) {
            Ok(Frame::Ping) => ws
                .send(Message::text("3"))
                .await
                .map_err(|e| SioError::Ws(e.to_string()))?,
            Ok(Frame::Pong | Frame::Noop) => {}
            Ok(Frame::Close) => return Err(SioError::Disconnected),
            Ok(Frame::Message(Packet::Connect(v))) => {
                break v
                    .as_ref()
                    .and_then(|v| v.get("sid"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
            }
            Ok(Frame::Message(Packet::ConnectError { message, data })) => {
                return Err(SioError::ConnectRefused { message, data });
            }
            Ok(Frame::Message(Packet::Disconnect)) => return Err(SioError::Disconnected),
            // Events before CONNECT (python-socketio sends the replay first): keep them.
            Ok(Frame::Message(Packet::Event { name, data })) => early.push_back(Ok((name, data))),
            Ok(Frame::Message(Packet::Ack { .. })) => {}
            Err(e) => early.push_back(Err(SioError::Protocol(e))),
        }
    };

    let shared = Arc::new(Shared::default());
    let (out_tx, out_rx) = mpsc::channel(64);
    let (events_tx, events_rx) = mpsc::channel(opts.event_buffer.max(1));
    let liveness = Duration::from_millis(open.ping_interval.saturating_add(open.ping_timeout));
    let task = tokio::spawn(run(ws, out_rx, events_tx, shared.clone(), liveness));
    Ok(SioClient {
        sid,
        engine_sid: open.sid,
        out_tx,
        events_rx,
        early,
        shared,
        next_ack: AtomicU64::new(0),
        task,
    })
}

/// The client task: writes queued packets, answers pings, routes events and acks.
async fn run(
    mut ws: Ws,
    mut out_rx: mpsc::Receiver<Message>,
    events_tx: mpsc::Sender<Incoming>,
    shared: Arc<Shared>,
    liveness: Duration,
) {
    let silence = tokio::time::sleep(liveness);
    tokio::pin!(silence);
    let reason = loop {
        tokio::select! {
            out = out_rx.recv() => match out {
                Some(msg) => {
                    if let Err(e) = ws.send(msg).await {
                        break format!("send failed: {e}");
                    }
                }
                None => {
                    let _ = ws.send(Message::text("41")).await;
                    let _ = ws.close(None).await;
                    break "closed by the client".to_owned();
                }
            },
            incoming = ws.next() => {
                let text = match incoming {
                    None => break "websocket closed".to_owned(),
                    Some(Err(e)) => break format!("websocket error: {e}"),
                    Some(Ok(Message::Close(frame))) => break format!("close frame: {frame:?}"),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        let err = SioError::Protocol("binary frames are not supported".to_owned());
                        if events_tx.send(Err(err)).await.is_err() {
                            break "client dropped".to_owned();
                        }
                        continue;
                    }
                    Some(Ok(_)) => continue,
                };
                silence.as_mut().reset(tokio::time::Instant::now() + liveness);
                let item = match parse_frame(text.as_str()) {
                    Ok(Frame::Ping) => {
                        if let Err(e) = ws.send(Message::text("3")).await {
                            break format!("pong failed: {e}");
                        }
                        continue;
                    }
                    Ok(Frame::Pong | Frame::Noop) => continue,
                    Ok(Frame::Close) => break "engine close from the server".to_owned(),
                    Ok(Frame::Message(Packet::Disconnect)) => {
                        break "disconnected by the server".to_owned();
                    }
                    Ok(Frame::Message(Packet::ConnectError { message, .. })) => {
                        break format!("connect error after connect: {message}");
                    }
                    Ok(Frame::Message(Packet::Connect(_))) => continue,
                    Ok(Frame::Message(Packet::Ack { id, args })) => {
                        if let Some(tx) = shared.acks().pending.remove(&id) {
                            let _ = tx.send(args);
                        }
                        continue;
                    }
                    Ok(Frame::Message(Packet::Event { name, data })) => Ok((name, data)),
                    Err(e) => Err(SioError::Protocol(e)),
                };
                if events_tx.send(item).await.is_err() {
                    break "client dropped".to_owned();
                }
            },
            () = &mut silence => {
                break format!("no ping from the server within {liveness:?}");
            }
        }
    };
    *shared.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
    {
        let mut acks = shared.acks();
        acks.closed = true;
        acks.pending.clear();
    }
    drop(events_tx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_frames() {
        let cases: Vec<(&str, Result<Frame, ()>)> = vec![
            ("2", Ok(Frame::Ping)),
            ("3", Ok(Frame::Pong)),
            ("6", Ok(Frame::Noop)),
            ("1", Ok(Frame::Close)),
            ("41", Ok(Frame::Message(Packet::Disconnect))),
            (
                r#"40{"sid":"abc"}"#,
                Ok(Frame::Message(Packet::Connect(Some(json!({"sid":"abc"}))))),
            ),
            (
                r#"42["oh_event",{"id":1}]"#,
                Ok(Frame::Message(Packet::Event {
                    name: "oh_event".into(),
                    data: json!({"id":1}),
                })),
            ),
            (
                r#"4212["x"]"#,
                Ok(Frame::Message(Packet::Event {
                    name: "x".into(),
                    data: Value::Null,
                })),
            ),
            (
                r#"43/,7[{"ok":true},2]"#,
                Ok(Frame::Message(Packet::Ack {
                    id: 7,
                    args: vec![json!({"ok":true}), json!(2)],
                })),
            ),
            (
                r#"44{"message":"no","data":{"msg_id":"X"}}"#,
                Ok(Frame::Message(Packet::ConnectError {
                    message: "no".into(),
                    data: Some(json!({"msg_id":"X"})),
                })),
            ),
            ("", Err(())),
            ("9", Err(())),
            ("42", Err(())),
            ("42[", Err(())),
            ("42[1]", Err(())),
            ("42[]", Err(())),
            ("42{}", Err(())),
            ("43[1]", Err(())),
            ("43999999999999999999999[1]", Err(())),
            ("451-[\"x\",{\"_placeholder\":true,\"num\":0}]", Err(())),
            ("42/admin,[\"x\"]", Err(())),
            ("4é", Err(())),
        ];
        for (text, want) in cases {
            let got = parse_frame(text).map_err(|_| ());
            assert_eq!(got, want, "frame {text:?}");
        }
    }

    #[test]
    fn encodes_events() {
        let s = encode_event(None, "oh_user_action", &json!({"a":"b\"c"})).unwrap();
        assert_eq!(s, r#"42["oh_user_action",{"a":"b\"c"}]"#);
        let s = encode_event(Some(12), "e", &Value::Null).unwrap();
        assert_eq!(s, r#"4212["e",null]"#);
    }

    #[test]
    fn builds_ws_url() {
        let opts = ConnectOpts::new("http://127.0.0.1:3000")
            .query("conversation_id", "a b&c+é")
            .query("latest_event_id", "-1");
        assert_eq!(
            opts.ws_url().unwrap(),
            "ws://127.0.0.1:3000/socket.io/?EIO=4&transport=websocket&conversation_id=a%20b%26c%2B%C3%A9&latest_event_id=-1"
        );
        assert!(ConnectOpts::new("ftp://x").ws_url().is_err());
        assert!(ConnectOpts::new("not a url").ws_url().is_err());
    }
}
