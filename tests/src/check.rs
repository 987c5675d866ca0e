//! Checks shared by the fault tests and the soak tool: what a client received against the
//! stored log (invariant 1), the raw log's density and epochs (invariants 1 and 2), and
//! "exactly once" counts of user messages and echoes (invariant 3).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::event::Event;
use shared::id::SessionId;

use crate::cluster::{Cluster, ids, is_echo};
use crate::sio::SioClient;

const T: Duration = Duration::from_secs(30);

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

pub fn count_echoes(stored: &[Value], text: &str) -> usize {
    stored.iter().filter(|e| is_echo(e, text)).count()
}

pub fn count_user(stored: &[Value], text: &str) -> usize {
    stored
        .iter()
        .filter(|e| {
            e["source"] == "user" && e["action"] == "message" && e["args"]["content"] == text
        })
        .count()
}

/// Checks the raw log: ids dense from 0, and epochs never go back (C3: after a takeover with
/// epoch e, no event of an older epoch).
pub async fn check_log(c: &Cluster, sid: &str) -> Vec<shared::store::StoredEvent> {
    let store = c.store().await;
    let sid = SessionId::parse(sid).unwrap();
    let evs = store.read_from(&sid, 0, 100_000).await.unwrap();
    let idv: Vec<u64> = evs.iter().map(|e| e.id).collect();
    assert_eq!(
        idv,
        (0..evs.len() as u64).collect::<Vec<_>>(),
        "ids not dense"
    );
    let mut epoch = 0;
    for e in &evs {
        let ev = Event::from_json(&e.payload).unwrap();
        let takeover = ev.agent_state().is_some_and(|s| s.as_str() == "loading");
        if takeover {
            // A takeover record carries the sequence it fences off: at least the epoch so far.
            assert!(
                e.epoch >= epoch,
                "takeover {} fences {} < current epoch {epoch}",
                e.id,
                e.epoch
            );
            epoch = e.seq;
        } else {
            assert_eq!(
                e.epoch, epoch,
                "event {} written under epoch {} after epoch {epoch} took over",
                e.id, e.epoch
            );
        }
    }
    evs
}

/// Invariant 1 on one connection made with `latest_event_id = latest`: what the client
/// received must be exactly OpenHands' replay of `(latest, h]` followed by the live-forwarded
/// events of `(h, last]`, for some head `h` at connect time: no gap, no duplicate, in order.
pub fn check_client(stored: &[Value], latest: i64, got: &[Value]) {
    check_connection(stored, latest, got, false);
}

/// [`check_client`] for a connection that was cut short (its gateway died, or the client
/// stopped): what it received must be a prefix of such a sequence.
pub fn check_client_prefix(stored: &[Value], latest: i64, got: &[Value]) {
    check_connection(stored, latest, got, true);
}

fn check_connection(stored: &[Value], latest: i64, got: &[Value], prefix: bool) {
    let events: Vec<Event> = stored
        .iter()
        .map(|v| Event::from_value(v.clone()).expect("stored event parses"))
        .collect();
    assert!(
        events
            .iter()
            .enumerate()
            .all(|(i, e)| e.id == Some(i as u64)),
        "stored ids are not dense"
    );
    let live: Vec<bool> = events.iter().map(|e| e.live_copy().is_some()).collect();
    let got_ids = ids(got);
    let last = got_ids.iter().copied().max().unwrap_or(0) as usize;
    let first = usize::try_from(latest + 1).unwrap_or(0);
    // The head at connect time is the newest replayed id: `latest` (nothing replayed) or one
    // of the received ids. Try them in order; a connection made early matches at once.
    let mut candidates: Vec<i64> = got_ids
        .iter()
        .map(|i| *i as i64)
        .filter(|i| *i > latest)
        .collect();
    candidates.push(latest);
    candidates.sort_unstable();
    candidates.dedup();
    for h in candidates {
        let h_end = usize::try_from(h + 1).unwrap_or(0).min(events.len());
        let replay = if first < h_end {
            shared::event::replay_order(&events[first..h_end])
        } else {
            Vec::new()
        };
        let live_ids = (h_end..=last.min(events.len().saturating_sub(1))).filter(|i| live[*i]);
        let want = replay
            .iter()
            .filter_map(|e| e.id)
            .chain(live_ids.map(|i| i as u64));
        let mut want = want;
        let matches = if prefix {
            got_ids.iter().all(|g| want.next() == Some(*g))
        } else {
            want.eq(got_ids.iter().copied())
        };
        if matches {
            return;
        }
    }
    panic!("received ids {got_ids:?} are no replay-then-live sequence of the log after {latest}");
}
