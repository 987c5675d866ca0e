//! A recorded workload and its checker, for fault scenarios: one client per conversation keeps
//! sending messages (each with its own msg id, retried with the same id until a gateway
//! acknowledges it, through any gateway), waits for each echo, and reconnects — to the next
//! gateway, from the newest id it has — whenever its connection dies or stalls. Everything is
//! recorded: every connection's cursor and the events it received, every message and whether
//! and when it was acknowledged and answered.
//!
//! [`check`] then holds the history against the stored logs (fault plan C1–C5):
//! - **C1** every acknowledged message is stored exactly once (an unacknowledged one at most
//!   once), **C4** and answered exactly once;
//! - **C2** every connection received an ordered, gap-free, duplicate-free replay-then-live
//!   prefix of the log ([`verify_connection`]);
//! - **C3** the raw log's ids are dense and its epochs never interleave ([`verify_log`]);
//! - **C5** no conversation is left `running`, and the longest wait of any acknowledged message
//!   for its answer is reported (a scenario bounds it).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::event::Event;
use shared::store::StoredEvent;

use crate::check::{Extent, stored_gaps, verify_connection, verify_log};
use crate::cluster::{ids, is_echo};
use crate::sio::{ConnectOpts, SioClient, SioError};

/// How long a send waits for its ack before it is retried.
const ACK_WAIT: Duration = Duration::from_secs(8);
/// How long a client waits for an answer before it reconnects elsewhere.
const ECHO_WAIT: Duration = Duration::from_secs(20);
/// How long a message is retried before the client gives up on it (it stays "unacknowledged").
const SEND_FOR: Duration = Duration::from_secs(120);

/// One message a client sent.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Its text (its msg id: the text with `-` for spaces).
    pub text: String,
    /// When it was first sent, from the workload's start.
    pub at: Duration,
    /// How long until a gateway acknowledged it (`None`: never).
    pub acked_after: Option<Duration>,
    /// How long until its answer reached this client (`None`: not seen by this client).
    pub answered_after: Option<Duration>,
    /// Refusals and errors seen while sending it (ack bodies, timeouts).
    pub errors: Vec<String>,
    /// The actions-stream sequence its ack named.
    pub acked_seq: Option<u64>,
}

/// One client's history.
#[derive(Debug, Clone, Default)]
pub struct ClientHistory {
    /// Its conversation.
    pub sid: String,
    /// Its connections: the cursor used and the events received, in order.
    pub connections: Vec<(i64, Vec<Value>)>,
    /// What it sent.
    pub sent: Vec<Sent>,
    /// Connection attempts that failed.
    pub failed_connects: usize,
    /// Each connection: its gateway, when it was made and why it ended (for diagnosis).
    pub links: Vec<String>,
}

/// Clients at work; [`Workload::stop`] returns their histories.
pub struct Workload {
    stop: Arc<AtomicBool>,
    answered: Arc<Vec<AtomicUsize>>,
    tasks: Vec<tokio::task::JoinHandle<ClientHistory>>,
}

impl Workload {
    /// Starts one client per conversation in `sids`, client `i` on gateway `i % urls.len()`
    /// first, with bearer `token`, pausing `think` between messages.
    pub fn start(sids: &[String], urls: Vec<String>, token: &str, think: Duration) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let answered: Arc<Vec<AtomicUsize>> =
            Arc::new(sids.iter().map(|_| AtomicUsize::new(0)).collect());
        let started = Instant::now();
        let tasks = sids
            .iter()
            .enumerate()
            .map(|(i, sid)| {
                let (stop, sid, urls, token, answered) = (
                    stop.clone(),
                    sid.clone(),
                    urls.clone(),
                    token.to_owned(),
                    answered.clone(),
                );
                tokio::spawn(async move {
                    let ctx = Ctx {
                        i,
                        urls,
                        token,
                        think,
                        stop,
                        answered,
                        started,
                    };
                    client(ctx, sid).await
                })
            })
            .collect();
        Workload {
            stop,
            answered,
            tasks,
        }
    }

    /// Whether every client has had at least `n` answers.
    pub fn all_answered(&self, n: usize) -> bool {
        self.answered.iter().all(|a| a.load(Ordering::Relaxed) >= n)
    }

    /// Answers received so far, over all clients.
    pub fn answers(&self) -> usize {
        self.answered
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    /// Stops every client (each finishes the message in hand, bounded by the send and answer
    /// waits) and returns the histories.
    pub async fn stop(self) -> Vec<ClientHistory> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.expect("client task"));
        }
        out
    }
}

async fn connect(url: &str, sid: &str, latest: i64, token: &str) -> Result<SioClient, SioError> {
    let o = ConnectOpts::new(url)
        .query("conversation_id", sid)
        .query("latest_event_id", latest.to_string())
        .header("Authorization", format!("Bearer {token}"))
        .timeout(Duration::from_secs(5));
    SioClient::connect(o).await
}

struct Ctx {
    i: usize,
    urls: Vec<String>,
    token: String,
    think: Duration,
    stop: Arc<AtomicBool>,
    answered: Arc<Vec<AtomicUsize>>,
    started: Instant,
}

async fn client(ctx: Ctx, sid: String) -> ClientHistory {
    let Ctx {
        i,
        urls,
        token,
        think,
        stop,
        answered,
        started,
    } = ctx;
    let mut h = ClientHistory {
        sid: sid.clone(),
        ..ClientHistory::default()
    };
    let mut gw = i % urls.len();
    let mut latest: i64 = -1;
    let mut k = 0;
    // The message in hand: sent (maybe acknowledged) but its answer not yet seen.
    let mut pending: Option<usize> = None;
    'connect: loop {
        // A message in hand for too long is given up: if it was acknowledged and never
        // answered, the check reports it lost.
        if pending.is_some_and(|p| h.sent[p].at + SEND_FOR < started.elapsed()) {
            pending = None;
        }
        if stop.load(Ordering::Relaxed) && pending.is_none() {
            break;
        }
        let mut sock = match connect(&urls[gw], &sid, latest, &token).await {
            Ok(s) => s,
            Err(_) => {
                h.failed_connects += 1;
                gw = (gw + 1) % urls.len();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        h.connections.push((latest, Vec::new()));
        h.links.push(format!(
            "g{} at {:.1} s from {latest}",
            gw + 1,
            started.elapsed().as_secs_f64()
        ));
        let conn = h.connections.len() - 1;
        macro_rules! reconnect {
            ($why:expr) => {{
                let why = $why;
                h.links[conn].push_str(&format!(
                    ", left at {:.1} s: {why}",
                    started.elapsed().as_secs_f64()
                ));
                latest = ids(&h.connections[conn].1)
                    .into_iter()
                    .max()
                    .map_or(latest, |m| m as i64);
                gw = (gw + 1) % urls.len();
                continue 'connect;
            }};
        }
        loop {
            let p = match pending {
                Some(p) => p,
                None => {
                    if stop.load(Ordering::Relaxed) {
                        break 'connect;
                    }
                    let text = format!("c{i} m{k}");
                    k += 1;
                    h.sent.push(Sent {
                        text,
                        at: started.elapsed(),
                        acked_after: None,
                        answered_after: None,
                        errors: Vec::new(),
                        acked_seq: None,
                    });
                    pending = Some(h.sent.len() - 1);
                    h.sent.len() - 1
                }
            };
            // Send until acknowledged (the same msg id each time: stored once).
            while h.sent[p].acked_after.is_none() {
                if h.sent[p].at + SEND_FOR < started.elapsed() {
                    // Given up: it stays unacknowledged (stored at most once, checked).
                    continue 'connect;
                }
                let text = h.sent[p].text.clone();
                let msg_id = text.replace(' ', "-");
                let payload =
                    json!({"action": "message", "args": {"content": text}, "msg_id": msg_id});
                match sock
                    .emit_with_ack("oh_user_action", &payload, ACK_WAIT)
                    .await
                {
                    Ok(acks) if acks.first().is_some_and(|a| a["success"] == true) => {
                        h.sent[p].acked_after = Some(started.elapsed() - h.sent[p].at);
                        h.sent[p].acked_seq = acks.first().and_then(|a| a["seq"].as_u64());
                    }
                    Ok(acks) => {
                        h.sent[p].errors.push(format!("{acks:?}"));
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Err(e) => {
                        h.sent[p].errors.push(e.to_string());
                        reconnect!(format!("send failed: {e}"));
                    }
                }
            }
            // Wait for its answer (it may also have arrived on an earlier connection).
            let text = h.sent[p].text.clone();
            let seen = h
                .connections
                .iter()
                .flat_map(|c| &c.1)
                .any(|e| is_echo(e, &text));
            if !seen {
                let deadline = Instant::now() + ECHO_WAIT;
                loop {
                    match sock
                        .next_event(deadline.saturating_duration_since(Instant::now()))
                        .await
                    {
                        Ok((name, ev)) if name == "oh_event" && ev.get("id").is_none() => {
                            // A notice (e.g. a refusal), not a stored event.
                            h.sent[p].errors.push(ev.to_string());
                        }
                        Ok((name, ev)) if name == "oh_event" => {
                            let done = is_echo(&ev, &text);
                            h.connections[conn].1.push(ev);
                            if done {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(e @ (SioError::Disconnected | SioError::Timeout(_))) => {
                            reconnect!(format!("waiting for the answer: {e}"))
                        }
                        Err(_) => {}
                    }
                }
            }
            h.sent[p].answered_after = Some(started.elapsed() - h.sent[p].at);
            answered[i].fetch_add(1, Ordering::Relaxed);
            pending = None;
            let until = Instant::now() + think;
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(
                    until
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(100)),
                )
                .await;
            }
        }
    }
    h
}

/// What [`check`] found.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    /// Messages acknowledged.
    pub acked: usize,
    /// Messages never acknowledged (given up or in hand at the end).
    pub unacked: usize,
    /// Acknowledged messages not stored, or stored but never answered.
    pub lost: usize,
    /// Messages stored or answered more than once.
    pub duplicated: usize,
    /// Connections whose events are no ordered gap-free prefix of the log.
    pub reordered: usize,
    /// Logs with gaps or interleaved epochs.
    pub epoch_faults: usize,
    /// Conversations left `running`.
    pub stuck: usize,
    /// Connections made.
    pub connections: usize,
    /// The longest an acknowledged message waited for its answer (as its client saw it).
    pub max_answer: Duration,
    /// The longest a message waited for its ack.
    pub max_ack: Duration,
    /// What went wrong, one line each.
    pub problems: Vec<String>,
    /// The message behind `max_answer`: where its time went.
    pub slowest: String,
}

impl Verdict {
    /// No message lost or duplicated, no connection reordered, no epoch fault, none stuck.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.epoch_faults == 0
            && self.stuck == 0
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "acked {}, unacked {}, connections {}; lost {}, duplicated {}, reordered {}, epoch faults {}, stuck {}; longest ack wait {:.2} s, longest answer wait {:.2} s",
            self.acked,
            self.unacked,
            self.connections,
            self.lost,
            self.duplicated,
            self.reordered,
            self.epoch_faults,
            self.stuck,
            self.max_ack.as_secs_f64(),
            self.max_answer.as_secs_f64()
        )?;
        if !self.slowest.is_empty() {
            write!(f, "\n  slowest answer: {}", self.slowest)?;
        }
        for p in self.problems.iter().take(20) {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// One conversation as stored: its events (REST JSON), its raw log, and its `agent_state`.
pub struct Stored {
    /// Events as the REST API returns them.
    pub events: Vec<Value>,
    /// The raw log (headers: epochs, applied actions).
    pub raw: Vec<StoredEvent>,
    /// `agent_state` of `GET /api/conversations/{id}`.
    pub agent_state: String,
}

/// The raw log around the user event carrying `text` (what a lost answer's neighbours were):
/// each event's id, stream sequence, epoch, applied action, state, interrupts and kind.
fn around(s: &Stored, text: &str) -> String {
    let is_it = |r: &StoredEvent| {
        serde_json::from_slice::<Value>(&r.payload).is_ok_and(|e| {
            e["source"] == "user" && e["action"] == "message" && e["args"]["content"] == text
        })
    };
    let Some(at) = s.raw.iter().position(is_it) else {
        return String::new();
    };
    let mut out = String::from("; raw log around it:");
    for r in &s.raw[at.saturating_sub(3)..(at + 12).min(s.raw.len())] {
        let e: Value = serde_json::from_slice(&r.payload).unwrap_or_default();
        let kind = e["action"]
            .as_str()
            .map(|a| format!("action {a}"))
            .or_else(|| {
                e["observation"]
                    .as_str()
                    .map(|o| format!("observation {o}"))
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "\n    id {} seq {} epoch {} applied {} state {:?} interrupts {} {} {} {}",
            r.id,
            r.seq,
            r.epoch,
            r.applied_action,
            r.agent_state,
            r.interrupts,
            e["source"].as_str().unwrap_or("-"),
            kind,
            e["message"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(60)
                .collect::<String>()
        ));
    }
    out
}

/// Where the slowest answer's time went: when it was sent, acked and answered (client side),
/// how far apart the worker stored the message and its answer (the events' timestamps), and
/// how many connections its client made.
fn slowest(h: &ClientHistory, s: &Stored, m: &Sent) -> String {
    let stamp = |source: &str, content: &str| {
        s.events
            .iter()
            .find(|e| {
                e["action"] == "message" && e["source"] == source && e["args"]["content"] == content
            })
            .and_then(|e| e["timestamp"].as_str().map(str::to_owned))
    };
    let stored = stamp("user", &m.text);
    let answered = stamp("agent", &format!("echo: {}", m.text));
    let secs =
        |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
    format!(
        "{} {:?} sent at {:.2} s, acked after {}, answered after {}; stored {} answered {} (worker clocks); connections: {}",
        h.sid,
        m.text,
        m.at.as_secs_f64(),
        secs(m.acked_after),
        secs(m.answered_after),
        stored.unwrap_or_default(),
        answered.unwrap_or_default(),
        h.links.join("; ")
    )
}

/// Holds `histories` against what is stored (`stored[sid]`).
pub fn check(histories: &[ClientHistory], stored: &HashMap<String, Stored>) -> Verdict {
    let mut v = Verdict::default();
    for h in histories {
        let Some(s) = stored.get(&h.sid) else {
            v.problems.push(format!("{}: not read", h.sid));
            v.lost += h.sent.iter().filter(|m| m.acked_after.is_some()).count();
            continue;
        };
        let mut users: HashMap<&str, usize> = HashMap::new();
        let mut echoes: HashMap<&str, usize> = HashMap::new();
        for e in &s.events {
            if e["action"] != "message" {
                continue;
            }
            let content = e["args"]["content"].as_str().unwrap_or_default();
            match e["source"].as_str() {
                Some("user") => *users.entry(content).or_default() += 1,
                Some("agent") => {
                    if let Some(t) = content.strip_prefix("echo: ") {
                        *echoes.entry(t).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        for m in &h.sent {
            let count = |c: &HashMap<&str, usize>| c.get(m.text.as_str()).copied().unwrap_or(0);
            let (u, e) = (count(&users), count(&echoes));
            if let Some(a) = m.acked_after {
                v.acked += 1;
                v.max_ack = v.max_ack.max(a);
                if let Some(ans) = m.answered_after
                    && ans > v.max_answer
                {
                    v.max_answer = ans;
                    v.slowest = slowest(h, s, m);
                }
                if u == 0 || e == 0 {
                    v.lost += 1;
                    v.problems.push(format!(
                        "{}: acknowledged {:?} (action seq {:?}) stored {u}x, answered {e}x{}",
                        h.sid,
                        m.text,
                        m.acked_seq,
                        around(s, &m.text)
                    ));
                    continue;
                }
            } else {
                v.unacked += 1;
                if let Some(last) = m.errors.last() {
                    v.problems.push(format!(
                        "{}: {:?} never acknowledged ({} tries; last: {last})",
                        h.sid,
                        m.text,
                        m.errors.len()
                    ));
                }
                // Stored without an ack is allowed (the ack was lost), answered only if stored.
                if e > u {
                    v.lost += 1;
                    v.problems
                        .push(format!("{}: {:?} answered but not stored", h.sid, m.text));
                    continue;
                }
            }
            if u > 1 || e > 1 {
                v.duplicated += 1;
                // Where: each copy's id, and in the raw log its stream sequence and epoch.
                let at: Vec<String> = s
                    .events
                    .iter()
                    .filter(|ev| {
                        ev["action"] == "message"
                            && ev["source"] == "user"
                            && ev["args"]["content"] == m.text.as_str()
                    })
                    .filter_map(|ev| ev["id"].as_u64())
                    .map(|id| match s.raw.iter().find(|r| r.id == id) {
                        Some(r) => format!("id {id} (seq {}, epoch {})", r.seq, r.epoch),
                        None => format!("id {id} (not in the raw log)"),
                    })
                    .collect();
                v.problems.push(format!(
                    "{}: {:?} stored {u}x, answered {e}x: {}; raw log {} events, REST {}",
                    h.sid,
                    m.text,
                    at.join(", "),
                    s.raw.len(),
                    s.events.len()
                ));
            }
        }
        let events: Vec<Event> = s
            .events
            .iter()
            .filter_map(|e| Event::from_value(e.clone()).ok())
            .collect();
        let parsed = events.len() == s.events.len() && stored_gaps(&events) == 0;
        for (latest, got) in &h.connections {
            v.connections += 1;
            let verdict = if parsed {
                verify_connection(&events, *latest, None, &ids(got), Extent::Prefix)
                    .map_err(|e| e.to_string())
            } else {
                Err("the stored log does not parse or has gaps".to_owned())
            };
            if let Err(why) = verdict {
                v.reordered += 1;
                v.problems
                    .push(format!("{}: connection after {latest}: {why}", h.sid));
            }
        }
        if let Err(e) = verify_log(&s.raw) {
            v.epoch_faults += 1;
            v.problems.push(format!("{}: raw log: {e}", h.sid));
        }
        if s.agent_state == "running" {
            v.stuck += 1;
            v.problems.push(format!("{}: left running", h.sid));
        }
    }
    v
}
