//! Per-socket forwarding: replay of the events after `latest_event_id`, then live events,
//! merged by id with no gap and no duplicate.
//!
//! Order of operations (it closes OpenHands' race, where an event appended
//! between the replay and the subscription was lost):
//! 1. join the session's live feed (the NATS subscription is registered at the server);
//! 2. read the head of the log;
//! 3. replay `(latest_event_id, head]` with the replay rule (skip null/recall actions,
//!    only the last `agent_state_changed`, sent last);
//! 4. forward live events with id > head in order (OpenHands' live filter). A live event that skips
//!    ids (dropped core-NATS message, lagging broadcast) first fills the gap from the log.
//!
//! Sends are bounded: in packets by socketioxide's per-socket buffer (`OH_SOCKET_BUFFER`) and
//! in bytes by the socket's [`Budget`] (`OH_SOCKET_BUFFER_MIB`, see `sendbuf`); when either is
//! full we wait for the client to read, and a client that stays full for
//! `OH_SLOW_CLIENT_TIMEOUT_MS` is disconnected (it resumes by replay with its cursor), so a
//! slow client never slows others or grows memory without bound. The log is read in pages of
//! at most [`PAGE_BYTES`] (plus one event), one page at a time, each sent before the next is
//! read: a socket replaying a large history holds one page and its budget, never the history.
//!
//! Memory: this task lives as long as its socket and mostly waits on the live feed, but a
//! future is as large as its largest await point. The rare ones (joining the feed, reading the
//! log, replaying, filling a gap) are boxed, so an idle socket's task holds only the small
//! live-wait state (heaptrack: ~7 KiB per socket before, see BENCHMARKS.md `many`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use shared::event::{Event, ReplayClass, ReplayRule};
use shared::id::SessionId;
use shared::store::{StoreError, StoredEvent};
use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::app::AppState;
use crate::fanout::{Feed, Live, Replayed};
use crate::recent::Watch;
use crate::sendbuf::Budget;

/// Most events read from the log at once.
const CHUNK: usize = 512;
/// Most payload bytes read from the log at once (plus one event), per socket.
const PAGE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("client gone")]
    Gone,
    #[error("client too slow; disconnected")]
    Slow,
    #[error("event log unavailable: {0}")]
    Store(#[from] StoreError),
}

/// What a slow client reads (if it reads on) before it is disconnected.
const SLOW_CLIENT: &str = "disconnected: this client did not read its events within \
     OH_SLOW_CLIENT_TIMEOUT_MS; reconnect with latest_event_id to resume";

/// Disconnects a socket. socketioxide refuses while the socket's packet buffer is full (its
/// DISCONNECT packet is queued too), so this retries until there is room or the socket is
/// gone (Engine.IO's heartbeat, whose ping cannot be queued either, closes it by then).
async fn disconnect(socket: &SocketRef) {
    while socket.connected() {
        match socket.clone().disconnect() {
            Err(SocketError::InternalChannelFull) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => return, // closed, or closing already
        }
    }
}

/// Runs until the socket disconnects or `cancel` fires.
pub(crate) async fn forward(
    state: AppState,
    socket: SocketRef,
    conn: &crate::socket::Conn,
    cancel: CancellationToken,
) {
    let mut budget = Budget::new(Arc::clone(&conn.drain), state.socket_buffer_bytes);
    match run(&state, &socket, conn, &cancel, &mut budget).await {
        Ok(()) | Err(ForwardError::Gone) => {}
        Err(ForwardError::Slow) => {
            metrics::counter!("oh_gateway_slow_client_disconnects_total").increment(1);
            warn!(
                queued_bytes = budget.pending(),
                "slow client disconnected: its send buffer stayed full for OH_SLOW_CLIENT_TIMEOUT_MS"
            );
            // The reason comes last in its queue (if there is room: best effort), then the
            // disconnect; it resumes by replay with its cursor.
            let _ = socket.emit("oh_event", &shared::event::error_payload(SLOW_CLIENT));
            disconnect(&socket).await;
        }
        Err(e) => {
            // A server fault: the detail is logged, the client reads the generic message.
            error!(error = %e, "forwarding failed; disconnecting so the client resumes by replay");
            let _ = socket.emit(
                "oh_event",
                &shared::event::error_payload(crate::socket::INTERNAL_ERROR),
            ); // best effort: the socket is closed next anyway
            let _ = socket.disconnect();
        }
    }
}

async fn run(
    state: &AppState,
    socket: &SocketRef,
    conn: &crate::socket::Conn,
    cancel: &CancellationToken,
    budget: &mut Budget,
) -> Result<(), ForwardError> {
    let (sid, latest) = (&conn.sid, conn.latest);
    let started = Instant::now();
    let mut cursor;
    // Live items taken from the feed before the log was read (see `from_birth`).
    let mut early = Vec::new();
    let watch = state
        .recent
        .take_watch(sid, &conn.uid)
        .and_then(Watch::take);
    let (_topic, mut rx) = match watch {
        Some((topic, mut rx)) => {
            let birth = from_birth(&mut rx, latest);
            topic.born();
            match birth {
                Birth::Replay(backlog) => {
                    metrics::counter!("oh_gateway_replays_from_birth_total", "source" => "feed")
                        .increment(1);
                    cursor =
                        Box::pin(replay_backlog(state, socket, &backlog, latest, budget)).await?;
                }
                Birth::ReadLog(taken) => {
                    metrics::counter!("oh_gateway_replays_from_birth_total", "source" => "log")
                        .increment(1);
                    early = taken;
                    cursor = Box::pin(replay_log(state, socket, sid, latest, budget)).await?;
                }
            }
            (topic, rx)
        }
        None => {
            let joined = Box::pin(state.fanout.join(sid))
                .await
                .map_err(|e| ForwardError::Store(nats_err(e)))?;
            cursor = Box::pin(replay_log(state, socket, sid, latest, budget)).await?;
            joined
        }
    };
    metrics::histogram!("oh_gateway_replay_seconds").record(started.elapsed());
    let mut early = early.into_iter();
    loop {
        let live = match early.next() {
            Some(item) => item,
            None => tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                r = rx.recv() => r,
            },
        };
        match live {
            Ok(Feed::Event(live)) => {
                let id = i64::try_from(live.id).unwrap_or(i64::MAX);
                if id <= cursor {
                    continue;
                }
                if id > cursor + 1 {
                    Box::pin(catch_up(
                        state,
                        socket,
                        sid,
                        &mut cursor,
                        Some(live.id - 1),
                        budget,
                    ))
                    .await?;
                }
                send_live(socket, &live, state.slow_client_timeout, budget).await?;
                cursor = id;
            }
            Ok(Feed::Status(raw)) => send(socket, &raw, state.slow_client_timeout, budget).await?,
            Ok(Feed::Resync) | Err(RecvError::Lagged(_)) => {
                debug!("live feed may have missed events; filling from the log");
                Box::pin(catch_up(state, socket, sid, &mut cursor, None, budget)).await?;
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}

/// Reads the log's head and replays `(latest, head]`; returns the new cursor.
async fn replay_log(
    state: &AppState,
    socket: &SocketRef,
    sid: &SessionId,
    latest: i64,
    budget: &mut Budget,
) -> Result<i64, ForwardError> {
    let head = patient(socket, || Box::pin(state.store.last_event(sid))).await?;
    match head {
        Some(head) if i64::try_from(head.id).unwrap_or(i64::MAX) > latest => {
            let from = u64::try_from(latest + 1).unwrap_or(0);
            Box::pin(replay(state, socket, sid, from, &head, budget)).await?;
            Ok(i64::try_from(head.id).unwrap_or(i64::MAX))
        }
        _ => Ok(latest),
    }
}

/// What a feed joined before its session's first event holds when the first socket comes.
#[derive(Debug)]
enum Birth {
    /// Every event so far, in order from id 0, each with its replayed form at hand: replay
    /// these (the log's head is the last of them) and read nothing.
    Replay(Vec<Arc<Live>>),
    /// Something is missing (a lag, a resync, a skipped id, a large event whose stored form
    /// was not kept, or a client cursor): read the log as any connect does; the items taken
    /// from the feed follow the replay as live ones (one may not be stored yet when the head
    /// is read).
    ReadLog(Vec<Result<Feed, RecvError>>),
}

/// Takes what a feed joined before its session's first event has received so far.
fn from_birth(rx: &mut tokio::sync::broadcast::Receiver<Feed>, latest: i64) -> Birth {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut taken = Vec::new();
    let mut complete = latest == -1;
    loop {
        match rx.try_recv() {
            Ok(item) => taken.push(Ok(item)),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Lagged(n)) => {
                complete = false;
                taken.push(Err(RecvError::Lagged(n)));
            }
            Err(TryRecvError::Closed) => {
                complete = false;
                taken.push(Err(RecvError::Closed));
                break;
            }
        }
    }
    if !complete {
        return Birth::ReadLog(taken);
    }
    let mut backlog: Vec<Arc<Live>> = Vec::with_capacity(taken.len());
    for item in &taken {
        match item {
            Ok(Feed::Event(live)) => {
                let next = backlog.last().map_or(0, |l| l.id + 1);
                if live.id < next {
                    continue; // a copy (an append retried)
                }
                if live.id != next || matches!(live.replayed, Replayed::Unknown) {
                    return Birth::ReadLog(taken);
                }
                backlog.push(Arc::clone(live));
            }
            // Before the connect, as if the socket had come a moment later.
            Ok(Feed::Status(_)) => {}
            Ok(Feed::Resync) | Err(_) => return Birth::ReadLog(taken),
        }
    }
    Birth::Replay(backlog)
}

/// Sends `backlog` (every event from id 0, see [`Birth::Replay`]) with the replay rule, as
/// [`replay`] sends the same events read from the log; returns the new cursor.
async fn replay_backlog(
    state: &AppState,
    socket: &SocketRef,
    backlog: &[Arc<Live>],
    latest: i64,
    budget: &mut Budget,
) -> Result<i64, ForwardError> {
    let mut rule = ReplayRule::default();
    for live in backlog {
        let (class, raw): (_, &RawValue) = match &live.replayed {
            Replayed::Skip | Replayed::Unknown => continue,
            Replayed::AsLive { class } => match &live.json {
                Some(raw) => (*class, raw),
                None => continue,
            },
            Replayed::Stored { class, raw } => (*class, raw),
        };
        if let Some(raw) = rule.take(class, raw) {
            send(socket, raw, state.slow_client_timeout, budget).await?;
        }
    }
    if let Some(raw) = rule.finish() {
        send(socket, raw, state.slow_client_timeout, budget).await?;
    }
    Ok(backlog
        .last()
        .map_or(latest, |l| i64::try_from(l.id).unwrap_or(i64::MAX)))
}

fn nats_err(e: async_nats::Error) -> StoreError {
    StoreError::Nats {
        op: "subscribe",
        source: e,
    }
}

/// Replays ids `from..=head.id` with the replay rule ([`ReplayRule`]).
async fn replay(
    state: &AppState,
    socket: &SocketRef,
    sid: &SessionId,
    from: u64,
    head: &StoredEvent,
    budget: &mut Budget,
) -> Result<(), ForwardError> {
    let mut rule = ReplayRule::default();
    let to = head.id;
    let mut next = from;
    let mut after = None;
    while next <= to {
        let want = usize::try_from(to - next + 1).unwrap_or(CHUNK).min(CHUNK);
        let batch = patient(socket, || page(state, sid, next, after, want, Some(head))).await?;
        if batch.is_empty() {
            break;
        }
        for ev in &batch {
            if ev.id > to {
                break;
            }
            next = ev.id + 1;
            after = Some(ev.seq);
            let Some(raw) = raw_of(ev) else { continue };
            // An event that does not parse is sent as stored.
            let class =
                Event::from_json(&ev.payload).map_or(ReplayClass::Emit, |e| e.replay_class());
            if let Some(raw) = rule.take(class, raw) {
                send(socket, &raw, state.slow_client_timeout, budget).await?;
            }
        }
    }
    if let Some(raw) = rule.finish() {
        send(socket, &raw, state.slow_client_timeout, budget).await?;
    }
    Ok(())
}

/// The next page of the log: events from id `next` on, found by search on the first page and
/// then read on after the previous page's last stream sequence (`after`). `head`, the log's
/// newest event if already read, is not read again.
async fn page(
    state: &AppState,
    sid: &SessionId,
    next: u64,
    after: Option<u64>,
    want: usize,
    head: Option<&StoredEvent>,
) -> Result<Vec<StoredEvent>, StoreError> {
    match after {
        None => {
            let store = &state.store;
            store.read_page_to(sid, next, head, want, PAGE_BYTES).await
        }
        Some(seq) => state.store.read_after(sid, seq, want, PAGE_BYTES).await,
    }
}

/// How long a catch-up keeps retrying a log that does not answer (e.g. JetStream still
/// recovering after a NATS restart) before the client is disconnected to resume by replay.
const CATCH_UP_PATIENCE: Duration = Duration::from_secs(15);

/// How long a log read is tried again while JetStream fails transiently (a request timed out
/// with a thousand replays starting at once, a leader being elected, NATS reconnecting), with
/// jittered backoff so reads that failed together do not come back together. No new try
/// starts after the deadline; a try itself is bounded by the JetStream request timeout.
/// Errors that would recur (corrupt data, an unusable deployment) are not tried again.
pub(crate) struct Patience {
    until: Instant,
    pause: Duration,
    /// The counter's `read` label: which path retried.
    read: &'static str,
}

impl Patience {
    pub(crate) fn new(within: Duration, read: &'static str) -> Self {
        Patience {
            until: Instant::now() + within,
            pause: Duration::from_millis(100),
            read,
        }
    }

    /// Whether `e` may go away if the read is tried again after the next pause.
    fn allows(&self, e: &StoreError) -> bool {
        e.is_transient() && Instant::now() + self.pause * 3 / 2 < self.until
    }

    /// Counts a retry and waits the (jittered) pause before it.
    async fn wait(&mut self, e: &StoreError) {
        metrics::counter!("oh_gateway_log_read_retries_total", "read" => self.read).increment(1);
        debug!(error = %e, read = self.read, "event log read failed; retrying");
        tokio::time::sleep(self.pause.mul_f64(rand::random_range(0.5..1.5))).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(2));
    }
}

/// Runs a log read that sends nothing, again while `patience` allows (then the caller fails:
/// a socket is disconnected to resume by replay, a connect is refused). Nothing was sent from
/// a failed read, so a retry neither repeats nor skips an event. `None` when `alive` turned
/// false meanwhile (the client left).
pub(crate) async fn patiently<T, F>(
    patience: &mut Patience,
    alive: impl Fn() -> bool,
    mut read: impl FnMut() -> F,
) -> Option<Result<T, StoreError>>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    loop {
        match read().await {
            Err(e) if patience.allows(&e) => {
                if !alive() {
                    return None;
                }
                patience.wait(&e).await;
            }
            other => return Some(other),
        }
    }
}

/// [`patiently`] for a replay's read, [`CATCH_UP_PATIENCE`] each.
async fn patient<T, F>(socket: &SocketRef, read: impl FnMut() -> F) -> Result<T, ForwardError>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut patience = Patience::new(CATCH_UP_PATIENCE, "replay");
    Ok(patiently(&mut patience, || socket.connected(), read)
        .await
        .ok_or(ForwardError::Gone)??)
}

/// Sends what the live feed missed with the live filter ([`shared::event::Event::live_copy`]): the events after `cursor` up to
/// `to` (a gap before a live event), or up to the log's head (`None`: after a NATS reconnect
/// or a lagging broadcast). `cursor` follows every event sent, so a retry after a failed read
/// neither repeats nor skips one.
async fn catch_up(
    state: &AppState,
    socket: &SocketRef,
    sid: &SessionId,
    cursor: &mut i64,
    to: Option<u64>,
    budget: &mut Budget,
) -> Result<(), ForwardError> {
    // `fill` sends as it reads; `cursor` follows every event sent, so a retry goes on from
    // the first event not sent.
    let mut patience = Patience::new(CATCH_UP_PATIENCE, "catch_up");
    loop {
        match fill(state, socket, sid, cursor, to, budget).await {
            Err(ForwardError::Store(e)) if patience.allows(&e) => {
                if !socket.connected() {
                    return Err(ForwardError::Gone);
                }
                patience.wait(&e).await;
            }
            other => return other,
        }
    }
}

async fn fill(
    state: &AppState,
    socket: &SocketRef,
    sid: &SessionId,
    cursor: &mut i64,
    to: Option<u64>,
    budget: &mut Budget,
) -> Result<(), ForwardError> {
    let to = match to {
        Some(to) => to,
        None => match state.store.last_event(sid).await? {
            Some(head) => head.id,
            None => return Ok(()),
        },
    };
    let mut after = None;
    loop {
        let next = u64::try_from(*cursor + 1).unwrap_or(0);
        if next > to {
            break;
        }
        let want = usize::try_from(to - next + 1).unwrap_or(CHUNK).min(CHUNK);
        let batch = page(state, sid, next, after, want, None).await?;
        let before = *cursor;
        for ev in &batch {
            if ev.id > to {
                break;
            }
            after = Some(ev.seq);
            let live = match Event::from_json(&ev.payload) {
                Ok(e) => e
                    .live_copy()
                    .and_then(|c| RawValue::from_string(c.to_json()).ok()),
                Err(_) => raw_of(ev),
            };
            if let Some(raw) = live {
                send(socket, &raw, state.slow_client_timeout, budget).await?;
            }
            *cursor = i64::try_from(ev.id).unwrap_or(i64::MAX);
        }
        if *cursor == before {
            break; // nothing left in range (or trimmed below `next`): no endless re-read
        }
    }
    metrics::counter!("oh_gateway_gap_fills_total").increment(1);
    Ok(())
}

fn raw_of(ev: &StoredEvent) -> Option<Box<RawValue>> {
    let s = std::str::from_utf8(&ev.payload).ok()?;
    RawValue::from_string(s.to_owned()).ok()
}

async fn send_live(
    socket: &SocketRef,
    live: &Arc<Live>,
    stall_limit: Duration,
    budget: &mut Budget,
) -> Result<(), ForwardError> {
    match &live.json {
        Some(raw) => send(socket, raw, stall_limit, budget).await,
        None => Ok(()),
    }
}

/// Emits one `oh_event`, waiting while the socket's buffer is full in packets or bytes (at
/// most `stall_limit`).
async fn send(
    socket: &SocketRef,
    raw: &RawValue,
    stall_limit: Duration,
    budget: &mut Budget,
) -> Result<(), ForwardError> {
    let mut stalled_since: Option<Instant> = None;
    loop {
        if !budget.full(socket.transport_type() == socketioxide::TransportType::Websocket) {
            match socket.emit("oh_event", raw) {
                Ok(()) => {
                    budget.queued(raw.get().len());
                    metrics::counter!("oh_gateway_events_sent_total").increment(1);
                    return Ok(());
                }
                Err(SendError::Socket(SocketError::InternalChannelFull)) => {}
                Err(_) => return Err(ForwardError::Gone),
            }
        } else if !socket.connected() {
            return Err(ForwardError::Gone);
        }
        let since = *stalled_since.get_or_insert_with(Instant::now);
        if since.elapsed() > stall_limit {
            return Err(ForwardError::Slow);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
