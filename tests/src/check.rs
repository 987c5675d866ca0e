//! The invariant checks, one core each, shared by the tests, the load tool and the soak tool:
//!
//! - [`verify_connection`]: what one client received against the stored log (invariant 1). A
//!   client that connected with `latest_event_id = L` must receive, in order, the replay of
//!   `(L, H]` by the replay rule ([`replay_order`]), where `H` is the head the gateway read at
//!   connect time, then every later stored event that the live rule forwards
//!   ([`Event::live_copy`]). `H` is not visible to the client, so every candidate is tried (a
//!   hint first) and the first exact match accepted. Without one, the [`Violation`] describes
//!   the closest candidate: the first position where it differs, ids expected but not received
//!   (*lost*), received more than once (*duplicated*), received but not expected
//!   (*unexpected*), or the right set in another order (*out of order*).
//! - [`verify_log`]: the raw log (invariants 1 and 2): ids dense from 0, and epochs never go
//!   back (after a takeover that fences epoch `e`, no event of an older epoch).
//! - [`count_user`], [`count_echoes`]: "exactly once" counts of user messages and echoes
//!   (invariant 3), taken after a [`settle`] sentinel.
//!
//! The cores return verdicts (the load tool adds them up, the soak tool reports them); the
//! `check_*` wrappers panic with the verdict's description, for tests.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::event::{Event, replay_order};
use shared::id::SessionId;
use shared::store::StoredEvent;

use crate::cluster::{Cluster, events_until, ids, is_echo};
use crate::sio::SioClient;

const T: Duration = Duration::from_secs(30);

/// Candidate heads tried at most (bounds the cost on a long conversation).
const MAX_CANDIDATES: usize = 4096;

/// How much of the replay-then-live sequence a connection must have received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// All of it, up to the end of the stored log (the client caught up before the check).
    Complete,
    /// All of it up to the newest id received: the client stopped reading at an event it
    /// waited for, and later live events are not expected.
    UpToLastReceived,
    /// A prefix of it: the connection was cut short (its gateway died, or the client stopped).
    Prefix,
}

/// Why a connection's events are no replay-then-live sequence of the log, described against
/// the closest candidate head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "received ids are no replay-then-live sequence of the log after {latest}; closest: head \
     {head} at connect, which differs first at position {position} (expected {}, received {}); \
     lost {lost}, duplicated {duplicate}, unexpected {unexpected}{}",
    OrNothing(*expected),
    OrNothing(*received),
    if *out_of_order { ", out of order" } else { "" }
)]
pub struct Violation {
    /// The connection's `latest_event_id`.
    pub latest: i64,
    /// The candidate head compared.
    pub head: i64,
    /// First position (in arrival order) where received and expected differ.
    pub position: usize,
    /// Id expected there, if any.
    pub expected: Option<u64>,
    /// Id received there, if any.
    pub received: Option<u64>,
    /// Expected ids never received.
    pub lost: u64,
    /// Extra copies of ids received more than once.
    pub duplicate: u64,
    /// Received ids that no rule sends.
    pub unexpected: u64,
    /// The ids are right, the order is not.
    pub out_of_order: bool,
}

/// An optional id, shown as `nothing` when absent.
struct OrNothing(Option<u64>);

impl fmt::Display for OrNothing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => f.write_str("nothing"),
        }
    }
}

impl Violation {
    fn score(&self) -> u64 {
        self.lost + self.duplicate + self.unexpected + u64::from(self.out_of_order)
    }
}

/// Ids a client connected with `latest` must receive when the gateway read head `h` at
/// connect time (replay of `(latest, h]`, then the live-forwarded rest), in order. Assumes
/// the stored ids are dense (see [`stored_gaps`]).
pub fn expected_ids(stored: &[Event], latest: i64, h: i64) -> Vec<u64> {
    let start = usize::try_from(latest + 1).unwrap_or(0).min(stored.len());
    let split = usize::try_from(h + 1)
        .unwrap_or(0)
        .clamp(start, stored.len());
    let mut out: Vec<u64> = replay_order(&stored[start..split])
        .into_iter()
        .filter_map(|e| e.id)
        .collect();
    out.extend(
        stored[split..]
            .iter()
            .filter(|e| e.live_copy().is_some())
            .filter_map(|e| e.id),
    );
    out
}

/// The highest id a client connected with `latest` is still to receive: used to wait until it
/// has caught up before its events are checked (`-1` if nothing).
pub fn expected_last(stored: &[Event], latest: i64, hint: Option<i64>) -> i64 {
    let last = stored.len() as i64 - 1;
    [hint.unwrap_or(last), latest]
        .into_iter()
        .filter_map(|h| expected_ids(stored, latest, h).into_iter().max())
        .max()
        .map_or(-1, |m| i64::try_from(m).unwrap_or(i64::MAX))
}

/// Number of stored ids missing from `0..n` (a gap in the log is lost for every client).
pub fn stored_gaps(stored: &[Event]) -> u64 {
    stored
        .iter()
        .enumerate()
        .filter(|(i, e)| e.id != Some(*i as u64))
        .count() as u64
}

/// `got` against `want`; `None` if equal.
fn compare(latest: i64, head: i64, want: &[u64], got: &[u64]) -> Option<Violation> {
    if want == got {
        return None;
    }
    let position = want
        .iter()
        .zip(got)
        .position(|(w, g)| w != g)
        .unwrap_or(want.len().min(got.len()));
    let want_set: HashSet<u64> = want.iter().copied().collect();
    let mut seen = HashSet::with_capacity(got.len());
    let (mut duplicate, mut unexpected) = (0, 0);
    for id in got {
        if !seen.insert(*id) {
            duplicate += 1;
        } else if !want_set.contains(id) {
            unexpected += 1;
        }
    }
    let lost = want_set.iter().filter(|id| !seen.contains(id)).count() as u64;
    Some(Violation {
        latest,
        head,
        position,
        expected: want.get(position).copied(),
        received: got.get(position).copied(),
        lost,
        duplicate,
        unexpected,
        out_of_order: lost == 0 && duplicate == 0 && unexpected == 0,
    })
}

/// Checks the ids one client received (`got`, arrival order) against the stored events
/// (`stored`, ids `0..n`, read after the client stopped receiving). `hint` is the head read
/// just before the client connected, if known; `extent` says how much it must have received.
///
/// # Errors
/// The [`Violation`] of the closest candidate head when no head explains `got`.
pub fn verify_connection(
    stored: &[Event],
    latest: i64,
    hint: Option<i64>,
    got: &[u64],
    extent: Extent,
) -> Result<(), Violation> {
    let last_stored = stored.len() as i64 - 1;
    let last_got = got
        .iter()
        .max()
        .map_or(-1, |m| i64::try_from(*m).unwrap_or(i64::MAX));
    // A connection that received less than all cannot have read a head beyond what it got:
    // the replay ends with the newest non-skipped event of `(latest, head]`.
    let last_head = match extent {
        Extent::Complete => last_stored.max(latest),
        Extent::UpToLastReceived | Extent::Prefix => last_got.min(last_stored).max(latest),
    };
    let candidates = hint
        .into_iter()
        .filter(|h| *h <= last_head)
        .chain(latest.max(-1)..=last_head)
        .take(MAX_CANDIDATES);
    let mut best: Option<Violation> = None;
    for h in candidates {
        let mut want = expected_ids(stored, latest, h);
        match extent {
            Extent::Complete => {}
            Extent::UpToLastReceived => {
                want.retain(|id| i64::try_from(*id).is_ok_and(|id| id <= last_got));
            }
            Extent::Prefix => want.truncate(got.len()),
        }
        let Some(v) = compare(latest, h, &want, got) else {
            return Ok(());
        };
        if best.as_ref().is_none_or(|b| v.score() < b.score()) {
            best = Some(v);
        }
    }
    match best {
        Some(v) => Err(v),
        None => Ok(()),
    }
}

/// Why a raw log breaks invariant 1 (dense ids) or 2 (one appender per epoch).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogViolation {
    /// Ids are not `0..n`.
    #[error("ids not dense: position {position} holds id {id}")]
    Gap { position: u64, id: u64 },
    /// A stored payload is no event.
    #[error("event {id} does not parse: {reason}")]
    Unparsable { id: u64, reason: String },
    /// A takeover record fences an epoch older than the current one.
    #[error("takeover {id} fences {fenced} < current epoch {epoch}")]
    TakeoverGoesBack { id: u64, fenced: u64, epoch: u64 },
    /// An event written by an appender whose epoch was taken over (or not yet started).
    #[error("event {id} written under epoch {written} after epoch {epoch} took over")]
    StaleEpoch { id: u64, written: u64, epoch: u64 },
}

/// Checks a raw log (every stored event of a session, in order): ids dense from 0, and every
/// event written under the current epoch, where a takeover (`agent_state_changed: loading`)
/// fences at least the epoch so far and starts the epoch of its own sequence.
///
/// # Errors
/// The first [`LogViolation`].
pub fn verify_log(evs: &[StoredEvent]) -> Result<(), LogViolation> {
    for (position, e) in (0u64..).zip(evs) {
        if e.id != position {
            return Err(LogViolation::Gap { position, id: e.id });
        }
    }
    let mut epoch = 0;
    for e in evs {
        let ev = Event::from_json(&e.payload).map_err(|err| LogViolation::Unparsable {
            id: e.id,
            reason: err.to_string(),
        })?;
        let takeover = ev.agent_state().is_some_and(|s| s.as_str() == "loading");
        if takeover {
            if e.epoch < epoch {
                return Err(LogViolation::TakeoverGoesBack {
                    id: e.id,
                    fenced: e.epoch,
                    epoch,
                });
            }
            epoch = e.seq;
        } else if e.epoch != epoch {
            return Err(LogViolation::StaleEpoch {
                id: e.id,
                written: e.epoch,
                epoch,
            });
        }
    }
    Ok(())
}

/// Every stored event of `sid`, straight from JetStream (panics if it cannot be read).
pub async fn read_log(c: &Cluster, sid: &str) -> Vec<StoredEvent> {
    let store = c.store().await;
    let sid = SessionId::parse(sid).expect("session id");
    store
        .read_from(&sid, 0, 1_000_000)
        .await
        .expect("read the raw log")
}

/// [`verify_log`] on `sid`'s raw log, panicking on a violation; returns the log.
pub async fn check_log(c: &Cluster, sid: &str) -> Vec<StoredEvent> {
    let evs = read_log(c, sid).await;
    if let Err(v) = verify_log(&evs) {
        panic!("raw log of {sid}: {v}");
    }
    evs
}

/// The stored events (REST JSON) as events, asserting dense ids.
fn parse_stored(stored: &[Value]) -> Vec<Event> {
    let events: Vec<Event> = stored
        .iter()
        .map(|v| Event::from_value(v.clone()).expect("stored event parses"))
        .collect();
    assert_eq!(stored_gaps(&events), 0, "stored ids are not dense");
    events
}

fn assert_connection(stored: &[Value], latest: i64, got: &[Value], extent: Extent) {
    let got_ids = ids(got);
    if let Err(v) = verify_connection(&parse_stored(stored), latest, None, &got_ids, extent) {
        panic!("received ids {got_ids:?}: {v}");
    }
}

/// Invariant 1 on one connection made with `latest_event_id = latest` that read until an event
/// it waited for: what the client received must be exactly OpenHands' replay of
/// `(latest, h]` followed by the live-forwarded events of `(h, last]`, for some head `h` at
/// connect time and `last` the newest id received: no gap, no duplicate, in order.
pub fn check_client(stored: &[Value], latest: i64, got: &[Value]) {
    assert_connection(stored, latest, got, Extent::UpToLastReceived);
}

/// [`check_client`] for a connection that was cut short (its gateway died, or the client
/// stopped): what it received must be a prefix of such a sequence.
pub fn check_client_prefix(stored: &[Value], latest: i64, got: &[Value]) {
    assert_connection(stored, latest, got, Extent::Prefix);
}

/// Sends a message with a client msg id, retrying (same id) until JetStream stored it.
pub async fn say_reliably(c: &SioClient, text: &str, msg_id: &str) {
    let deadline = Instant::now() + T;
    loop {
        let payload = json!({"action": "message", "args": {"content": text}, "msg_id": msg_id});
        match c
            .emit_with_ack("oh_user_action", &payload, Duration::from_secs(8))
            .await
        {
            Ok(acks) if acks.first().is_some_and(|a| a["success"] == true) => return,
            Ok(acks) => assert!(Instant::now() < deadline, "never stored: {acks:?}"),
            Err(e) => assert!(Instant::now() < deadline, "never stored: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends one more message (`text`, also its msg id) and waits for its echo. A session handles
/// its actions in order, so when this returns everything sent before it has been stored and
/// answered: a sentinel to count after, instead of a sleep. Returns the events received.
pub async fn settle(c: &mut SioClient, text: &str) -> Vec<Value> {
    say_reliably(c, text, text).await;
    events_until(c, T, |e| is_echo(e, text)).await
}

/// Agent echoes of `text` in `stored`.
pub fn count_echoes(stored: &[Value], text: &str) -> usize {
    stored.iter().filter(|e| is_echo(e, text)).count()
}

/// User messages `text` in `stored`.
pub fn count_user(stored: &[Value], text: &str) -> usize {
    stored
        .iter()
        .filter(|e| {
            e["source"] == "user" && e["action"] == "message" && e["args"]["content"] == text
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: u64, v: Value) -> Event {
        let mut v = v;
        v["id"] = json!(id);
        Event::from_value(v).unwrap()
    }

    fn state(id: u64, s: &str) -> Event {
        ev(
            id,
            json!({"source":"environment","observation":"agent_state_changed","content":"","extras":{"agent_state":s}}),
        )
    }

    fn msg(id: u64, src: &str, text: &str) -> Event {
        ev(
            id,
            json!({"source":src,"action":"message","args":{"content":text}}),
        )
    }

    fn conversation() -> Vec<Event> {
        vec![
            state(0, "loading"),
            ev(
                1,
                json!({"source":"environment","action":"system","args":{"content":"sys"}}),
            ),
            state(2, "awaiting_user_input"),
            msg(3, "user", "hi"),
            state(4, "running"),
            msg(5, "agent", "echo: hi"),
            state(6, "awaiting_user_input"),
        ]
    }

    fn complete(s: &[Event], latest: i64, hint: Option<i64>, got: &[u64]) -> Result<(), Violation> {
        verify_connection(s, latest, hint, got, Extent::Complete)
    }

    #[test]
    fn exact_replay_then_live_passes() {
        let s = conversation();
        // Connected when the head was 2: replay 1 (system) then state 2, then live 3..6.
        assert_eq!(complete(&s, -1, None, &[1, 2, 3, 4, 5, 6]), Ok(()));
        // Connected at the end: replay only.
        assert_eq!(complete(&s, -1, Some(6), &[1, 3, 5, 6]), Ok(()));
        // Reconnect after 4.
        assert_eq!(complete(&s, 4, None, &[5, 6]), Ok(()));
    }

    #[test]
    fn counts_lost_and_duplicates() {
        let s = conversation();
        let v = complete(&s, 4, None, &[6]).unwrap_err();
        assert_eq!(v.lost, 1, "{v:?}");
        assert_eq!((v.position, v.expected, v.received), (0, Some(5), Some(6)));
        let v = complete(&s, 4, None, &[5, 5, 6]).unwrap_err();
        assert_eq!(v.duplicate, 1, "{v:?}");
        let v = complete(&s, 4, None, &[6, 5]).unwrap_err();
        assert!(v.out_of_order, "{v:?}");
        assert!(v.to_string().contains("out of order"), "{v}");
        assert_eq!(stored_gaps(&[state(0, "loading"), state(2, "running")]), 1);
    }

    #[test]
    fn shorter_extents_accept_what_a_stopped_client_received() {
        let s = conversation();
        // Stopped at the echo: the final state is not expected, but nothing before it missing.
        let got = [1, 2, 3, 4, 5];
        assert!(complete(&s, -1, None, &got).is_err());
        assert_eq!(
            verify_connection(&s, -1, None, &got, Extent::UpToLastReceived),
            Ok(())
        );
        let gap = [1, 2, 3, 5];
        let v = verify_connection(&s, -1, None, &gap, Extent::UpToLastReceived).unwrap_err();
        assert_eq!((v.expected, v.received), (Some(4), Some(5)), "{v}");
        // Cut short in the middle of the replay.
        assert_eq!(
            verify_connection(&s, -1, None, &[1], Extent::Prefix),
            Ok(())
        );
        assert_eq!(
            verify_connection(&s, -1, None, &[1, 3, 2], Extent::Prefix),
            Ok(())
        );
        assert!(verify_connection(&s, -1, None, &[1, 1], Extent::Prefix).is_err());
    }
}
