//! The lost/duplicate check: what one client received against what the conversation stored.
//!
//! A client that connected with `latest_event_id = L` must receive, in order, the replay of
//! `(L, H]` by the replay rule ([`replay_order`]), where `H` is the head the gateway read at
//! connect time, then every later stored event that the live rule forwards
//! ([`Event::live_copy`]). `H` is not visible to the client, so the check tries each candidate
//! (a hint first, usually the head read just before connecting, then `L..=last`) and accepts
//! the first exact match. Without one it reports the closest candidate: ids expected but not
//! received are *lost*, ids received more than once are *duplicated*, ids received but not
//! expected are *unexpected*, and the same set in another order is *out of order*.

use std::collections::HashSet;

use shared::event::{Event, replay_order};

/// Result of checking one client.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Expected ids never received.
    pub lost: u64,
    /// Extra copies of ids received more than once.
    pub duplicate: u64,
    /// Received ids that no rule sends.
    pub unexpected: u64,
    /// 1 if the ids are right but the order is not.
    pub out_of_order: u64,
}

/// Candidates tried at most (bounds the cost on a long conversation).
const MAX_CANDIDATES: usize = 4096;

/// Ids a client connected with `latest` must receive if the gateway read head `h`.
fn expected(stored: &[Event], latest: i64, h: i64) -> Vec<u64> {
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

fn compare(want: &[u64], got: &[u64]) -> Verdict {
    if want == got {
        return Verdict::default();
    }
    let want_set: HashSet<u64> = want.iter().copied().collect();
    let mut seen = HashSet::with_capacity(got.len());
    let mut v = Verdict::default();
    for id in got {
        if !seen.insert(*id) {
            v.duplicate += 1;
        } else if !want_set.contains(id) {
            v.unexpected += 1;
        }
    }
    v.lost = want_set.iter().filter(|id| !seen.contains(id)).count() as u64;
    if v == Verdict::default() {
        v.out_of_order = 1;
    }
    v
}

/// Ids a client connected with `latest` must receive when the gateway read head `h` at
/// connect time (replay of `(latest, h]`, then the live-forwarded rest), in order.
pub fn expected_ids(stored: &[Event], latest: i64, h: i64) -> Vec<u64> {
    expected(stored, latest, h)
}

/// The highest id a client connected with `latest` is still to receive: used to wait until it
/// has caught up before its events are checked (`-1` if nothing).
pub fn expected_last(stored: &[Event], latest: i64, hint: Option<i64>) -> i64 {
    let last = stored.len() as i64 - 1;
    [hint.unwrap_or(last), latest]
        .into_iter()
        .filter_map(|h| expected(stored, latest, h).into_iter().max())
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

/// Checks the ids one client received (`got`, arrival order) against the stored events
/// (`stored`, ids `0..n`, read after the client stopped receiving). `hint` is the head read
/// just before the client connected, if known.
pub fn check_client(stored: &[Event], latest: i64, hint: Option<i64>, got: &[u64]) -> Verdict {
    let last = stored.len() as i64 - 1;
    let mut best: Option<(u64, Verdict)> = None;
    let candidates = hint
        .into_iter()
        .chain(latest.max(-1)..=last.max(latest))
        .take(MAX_CANDIDATES);
    for h in candidates {
        let v = compare(&expected(stored, latest, h), got);
        if v == Verdict::default() {
            return v;
        }
        let score = v.lost + v.duplicate + v.unexpected + v.out_of_order;
        if best.is_none_or(|(s, _)| score < s) {
            best = Some((score, v));
        }
    }
    best.map(|(_, v)| v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(id: u64, v: serde_json::Value) -> Event {
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

    #[test]
    fn exact_replay_then_live_passes() {
        let s = conversation();
        // Connected when the head was 2: replay 1 (system) then state 2, then live 3..6.
        assert_eq!(
            check_client(&s, -1, None, &[1, 2, 3, 4, 5, 6]),
            Verdict::default()
        );
        // Connected at the end: replay only.
        assert_eq!(
            check_client(&s, -1, Some(6), &[1, 3, 5, 6]),
            Verdict::default()
        );
        // Reconnect after 4.
        assert_eq!(check_client(&s, 4, None, &[5, 6]), Verdict::default());
    }

    #[test]
    fn counts_lost_and_duplicates() {
        let s = conversation();
        let v = check_client(&s, 4, None, &[6]);
        assert_eq!(v.lost, 1, "{v:?}");
        let v = check_client(&s, 4, None, &[5, 5, 6]);
        assert_eq!(v.duplicate, 1, "{v:?}");
        let v = check_client(&s, 4, None, &[6, 5]);
        assert_eq!(v.out_of_order, 1, "{v:?}");
        assert_eq!(stored_gaps(&[state(0, "loading"), state(2, "running")]), 1);
    }
}
