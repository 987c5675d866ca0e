//! `shared::store` against a real nats-server: metadata, start-request dedup, the replay seek
//! over interleaved sessions (short and long ranges), and payloads stored out of line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use shared::id::{SessionId, UserId};
use shared::names::Names;
use shared::store::{ConversationMeta, Store};
use shared::wire::{HDR_EVENT_ID, StartReason, StartRequest};
use tests::nats::NatsServer;

fn names() -> Names {
    Names::new("st").unwrap()
}

async fn open(nats: &NatsServer) -> Store {
    let client = async_nats::connect(nats.url()).await.unwrap();
    Store::open(client, names()).await.unwrap()
}

fn meta(sid: &SessionId, uid: &UserId, created: &str) -> ConversationMeta {
    ConversationMeta {
        conversation_id: sid.to_string(),
        user_id: uid.to_string(),
        title: "t".into(),
        created_at: created.into(),
        last_updated_at: created.into(),
        trigger: "gui".into(),
        selected_repository: None,
        selected_branch: None,
        git_provider: None,
        pr_number: vec![],
        conversation_instructions: None,
        llm: None,
        replay_blob: None,
    }
}

#[tokio::test]
async fn metadata_is_per_user_and_listable() {
    let nats = NatsServer::start().await;
    let store = open(&nats).await;
    let (alice, bob) = (
        UserId::parse("alice").unwrap(),
        UserId::parse("bob").unwrap(),
    );
    let s1 = SessionId::generate();
    let s2 = SessionId::generate();
    store
        .put_meta(&alice, &meta(&s1, &alice, "1"))
        .await
        .unwrap();
    store
        .put_meta(&alice, &meta(&s2, &alice, "2"))
        .await
        .unwrap();
    assert_eq!(
        store
            .get_meta(&alice, &s1)
            .await
            .unwrap()
            .unwrap()
            .conversation_id,
        s1.to_string()
    );
    assert!(
        store.get_meta(&bob, &s1).await.unwrap().is_none(),
        "bob must not find alice's"
    );
    let mut listed: Vec<String> = store
        .list_meta(&alice)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.conversation_id)
        .collect();
    listed.sort();
    let mut want = vec![s1.to_string(), s2.to_string()];
    want.sort();
    assert_eq!(listed, want);
    assert!(store.list_meta(&bob).await.unwrap().is_empty());
    store.delete_meta(&alice, &s1).await.unwrap();
    assert!(store.get_meta(&alice, &s1).await.unwrap().is_none());
    assert_eq!(store.list_meta(&alice).await.unwrap().len(), 1);
}

#[tokio::test]
async fn at_most_one_start_request_is_queued_per_session() {
    let nats = NatsServer::start().await;
    let store = open(&nats).await;
    let sid = SessionId::generate();
    let uid = UserId::local();
    let req = StartRequest::new(&sid, &uid, StartReason::Start);
    assert!(store.enqueue_start(&req).await.unwrap());
    assert!(
        !store.enqueue_start(&req).await.unwrap(),
        "second request must be refused"
    );
    // Once a worker has taken (acked) it, a new one can be queued at once.
    let consumer = store.work_consumer().await.unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let msg = batch.next().await.unwrap().unwrap();
    let (decoded, dsid, _) = StartRequest::decode(&msg.payload).unwrap();
    assert_eq!((decoded.reason, dsid), (StartReason::Start, sid.clone()));
    msg.double_ack().await.unwrap();
    assert!(store.enqueue_start(&req).await.unwrap());
}

/// Appends an event the way a journal does (without its fence), so that sessions interleave.
async fn append(js: &jetstream::Context, sid: &SessionId, id: u64, body: &str) {
    let mut h = HeaderMap::new();
    h.insert(HDR_EVENT_ID, id.to_string().as_str());
    let payload = format!(
        r#"{{"id":{id},"source":"agent","message":"{body}","action":"message","args":{{"content":"{body}"}}}}"#
    );
    js.publish_with_headers(names().events_subject(sid), h, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Pages bounded in bytes (the gateway's replay): each page stops at the event that reaches
/// the byte limit, `read_after` goes on exactly where the previous page stopped (direct gets
/// and the consumer path alike), and the whole log comes back once, in order.
#[tokio::test]
async fn byte_bounded_pages_cover_the_log_exactly_once() {
    let nats = NatsServer::start().await;
    let store = open(&nats).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let (a, b) = (SessionId::generate(), SessionId::generate());
    let body = "p".repeat(10_000);
    for id in 0..200u64 {
        append(&js, &a, id, &body).await;
        if id % 3 == 0 {
            append(&js, &b, id / 3, "b").await;
        }
    }
    let size = store.read_from(&a, 0, 1).await.unwrap()[0].payload.len();
    for (want, max_bytes) in [(20usize, 35_000usize), (150, 95_000), (500, 1)] {
        let mut ids = Vec::new();
        let mut page = store.read_page(&a, 0, want, max_bytes).await.unwrap();
        while let Some(last) = page.last() {
            let n = page.len();
            assert!(
                n <= want && (n - 1) * size < max_bytes,
                "page of {n} events"
            );
            if n < want && last.id < 199 {
                assert!(
                    n * size >= max_bytes,
                    "a short page stops at the byte limit"
                );
            }
            ids.extend(page.iter().map(|e| e.id));
            let seq = last.seq;
            page = store.read_after(&a, seq, want, max_bytes).await.unwrap();
        }
        assert_eq!(
            ids,
            (0..200).collect::<Vec<_>>(),
            "want {want}, {max_bytes} B"
        );
    }
}

/// A replay that has read the log's head passes it on (`read_page_to`): the page is the same,
/// event for event, and the head is read neither to bound the page nor as its last event (a
/// new conversation's replay costs one direct get per event before the head; none at all when
/// the replay starts at the head).
#[tokio::test]
async fn a_page_read_to_a_known_head_is_the_same_and_reads_less() {
    let nats = NatsServer::start().await;
    // The store's own connection: after each read it publishes a marker, which the observer
    // sees after every request that connection sent before it (one publisher's messages
    // reach a subscriber in order), so the count is exact however loaded the machine.
    let reader = async_nats::connect(nats.url()).await.unwrap();
    let store = Store::open(reader.clone(), names()).await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let (a, b) = (SessionId::generate(), SessionId::generate());
    for id in 0..10u64 {
        append(&js, &a, id, "a").await;
        append(&js, &b, id, "b").await;
    }
    let head = store.last_event(&a).await.unwrap().expect("head");
    assert_eq!(head.id, 9);
    let mut seen = client.subscribe(">").await.unwrap();
    client.flush().await.unwrap();
    let mut marker = 0u32;
    let mut counted = async || {
        marker += 1;
        let subject = format!("marker.{marker}");
        reader.publish(subject.clone(), Bytes::new()).await.unwrap();
        reader.flush().await.unwrap();
        let mut gets = 0usize;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), seen.next())
                .await
                .expect("the marker arrives")
                .expect("subscription open");
            if m.subject.as_str() == subject {
                return gets;
            }
            if m.subject.as_str().starts_with("$JS.API.DIRECT.GET.") {
                gets += 1;
            }
        }
    };
    // The server may route the reader's first messages after a new subscription by what it
    // had cached for that connection: one read and a marker settle it before counting.
    store.last_event(&a).await.unwrap();
    counted().await;
    for from in [0u64, 1, 5, 8, 9] {
        let plain = store.read_page(&a, from, 64, usize::MAX).await.unwrap();
        let plain_gets = counted().await;
        let known = store
            .read_page_to(&a, from, Some(&head), 64, usize::MAX)
            .await
            .unwrap();
        let known_gets = counted().await;
        let key = |v: &[shared::store::StoredEvent]| -> Vec<(u64, u64, Bytes)> {
            v.iter().map(|e| (e.id, e.seq, e.payload.clone())).collect()
        };
        assert_eq!(key(&known), key(&plain), "from {from}");
        assert_eq!(known.len(), usize::try_from(10 - from).unwrap());
        // The head is read neither as the page's bound nor as its last event; a page that
        // starts at the head reads nothing. From the first event: one get per event before
        // the head (the first, then the next ones).
        let expected = match from {
            9 => 0,
            _ => plain_gets - 2,
        };
        assert_eq!(
            known_gets, expected,
            "from {from} (plain read: {plain_gets})"
        );
        if from == 0 {
            assert_eq!((plain_gets, known_gets), (11, 9));
        }
    }
}

#[tokio::test]
async fn seek_and_read_over_interleaved_sessions() {
    let nats = NatsServer::start().await;
    let store = open(&nats).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let (a, b) = (SessionId::generate(), SessionId::generate());
    // a: 0..300, interleaved with b in irregular runs, so sequences and ids diverge.
    let (mut ia, mut ib) = (0u64, 0u64);
    while ia < 300 {
        for _ in 0..(ia % 7 + 1) {
            append(&js, &a, ia, "a").await;
            ia += 1;
        }
        for _ in 0..(ib % 5 + 2) {
            append(&js, &b, ib, "b").await;
            ib += 1;
        }
    }
    for k in [0u64, 1, 2, 17, 64, 150, 299] {
        let seq = store.seek(&a, k).await.unwrap().expect("seek");
        let ev = &store.read_from(&a, k, 1).await.unwrap()[0];
        assert_eq!((ev.id, ev.seq), (k, seq));
    }
    assert_eq!(store.seek(&a, ia).await.unwrap(), None, "beyond the head");
    // Short range (direct gets) and long range (ordered consumer) return exactly the ids asked.
    let short: Vec<u64> = store
        .read_from(&a, 10, 20)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(short, (10..30).collect::<Vec<_>>());
    let long: Vec<u64> = store
        .read_from(&a, 5, 250)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(long, (5..255).collect::<Vec<_>>());
    let tail: Vec<u64> = store
        .read_from(&b, ib - 3, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(tail, (ib - 3..ib).collect::<Vec<_>>());
    let last = store.last_event(&a).await.unwrap().unwrap();
    assert_eq!(last.id, ia - 1);
    assert!(
        store
            .last_event(&SessionId::generate())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn payloads_over_max_payload_go_out_of_line_and_come_back() {
    let nats = NatsServer::start().await;
    let store = open(&nats).await;
    let sid = SessionId::generate();
    let big = Bytes::from(vec![b'z'; 3 * 1024 * 1024]);
    let mut h = HeaderMap::new();
    let body = store.pack(&sid, big.clone(), &mut h).await.unwrap();
    assert!(body.is_empty());
    assert!(h.get(shared::wire::HDR_BLOB).is_some());
    assert_eq!(store.unpack(&h, body).await.unwrap(), big);
    // Small payloads stay inline.
    let mut h2 = HeaderMap::new();
    let small = store
        .pack(&sid, Bytes::from_static(b"{}"), &mut h2)
        .await
        .unwrap();
    assert_eq!(&small[..], b"{}");
    assert!(h2.get(shared::wire::HDR_BLOB).is_none());
}

#[tokio::test]
async fn purging_a_session_deletes_its_replay_trajectory() {
    let nats = NatsServer::start().await;
    let store = open(&nats).await;
    let (a, b) = (SessionId::generate(), SessionId::generate());
    let name_a = store.put_replay(&a, b"[1]").await.unwrap();
    let name_b = store.put_replay(&b, b"[2]").await.unwrap();
    store.purge_session(&a).await.unwrap();
    assert!(
        store.get_blob(&name_a).await.is_err(),
        "a's trajectory is gone"
    );
    assert_eq!(
        &store.get_blob(&name_b).await.unwrap()[..],
        b"[2]",
        "b's is kept"
    );
    // A session without a trajectory purges too.
    store.purge_session(&SessionId::generate()).await.unwrap();
}

/// A claim that dies right after its takeover record (`loading`) leaves the turn as it found
/// it: the next owner still reads `running` and continues the turn. (The mixed-nemesis soak
/// lost an answer this way: two takeovers in a row read as a turn that had ended.)
#[tokio::test]
async fn a_takeover_record_keeps_the_turn_state_for_the_next_owner() {
    use shared::event::{AgentState, Event, Source};
    use shared::journal::Journal;
    let nats = NatsServer::start().await;
    let store = open(&nats).await;
    let sid = SessionId::generate();
    let takeover = || Event::agent_state_changed(AgentState::Loading, "");

    let mut a = Journal::open(store.clone(), sid.clone(), "a".into())
        .await
        .unwrap();
    a.take_over(takeover()).await.unwrap();
    a.append(Event::agent_state_changed(
        AgentState::AwaitingUserInput,
        "",
    ))
    .await
    .unwrap();
    // A user message accepted: the turn runs (as the session notes it), then the owner dies.
    a.note_state(AgentState::Running.as_str());
    a.append(Event::message(Source::User, "hi", true))
        .await
        .unwrap();

    let mut b = Journal::open(store.clone(), sid.clone(), "b".into())
        .await
        .unwrap();
    assert_eq!(b.agent_state(), Some("running"));
    b.take_over(takeover()).await.unwrap();
    assert_eq!(b.agent_state(), Some("running"), "as the takeover found it");
    // b dies here, before it continues the turn.

    let mut c = Journal::open(store.clone(), sid.clone(), "c".into())
        .await
        .unwrap();
    assert_eq!(
        c.agent_state(),
        Some("running"),
        "still an interrupted turn"
    );
    c.take_over(takeover()).await.unwrap();
    c.append(Event::agent_state_changed(
        AgentState::AwaitingUserInput,
        "",
    ))
    .await
    .unwrap();
    let d = Journal::open(store.clone(), sid.clone(), "d".into())
        .await
        .unwrap();
    assert_eq!(d.agent_state(), Some("awaiting_user_input"));
    // The records themselves still say `loading` (what a client sees).
    let evs = store.read_from(&sid, 0, 100).await.unwrap();
    let loading = evs
        .iter()
        .filter(|e| String::from_utf8_lossy(&e.payload).contains("\"loading\""))
        .count();
    assert_eq!(loading, 3);
}

/// A first start presumes an empty log and skips reading its head; a log that is not empty
/// after all (a start request delivered again after the session ran) is found by the
/// takeover's fence, read, and taken over in order.
#[tokio::test]
async fn a_takeover_presuming_an_empty_log_finds_out_and_continues_it() {
    use shared::event::{AgentState, Event};
    use shared::journal::Journal;
    let nats = NatsServer::start().await;
    let store = open(&nats).await;
    let sid = SessionId::generate();
    let takeover = || Event::agent_state_changed(AgentState::Loading, "");

    // Truly empty: the record is event 0.
    let mut a = Journal::presumed_empty(store.clone(), sid.clone(), "a".into());
    let epoch_a = a.take_over(takeover()).await.unwrap();
    assert_eq!(a.last_id(), Some(0));
    a.append(Event::agent_state_changed(
        AgentState::AwaitingUserInput,
        "",
    ))
    .await
    .unwrap();

    // Not empty: refused at sequence 0, then read and appended after event 1.
    let mut b = Journal::presumed_empty(store.clone(), sid.clone(), "b".into());
    let epoch_b = b.take_over(takeover()).await.unwrap();
    assert!(epoch_b > epoch_a);
    assert_eq!(b.last_id(), Some(2), "after the two events already there");
    assert_eq!(b.agent_state(), Some("awaiting_user_input"));
    // The earlier owner is fenced.
    assert!(
        a.append(Event::agent_state_changed(AgentState::Running, ""))
            .await
            .is_err()
    );
    let ids: Vec<u64> = store
        .read_from(&sid, 0, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, vec![0, 1, 2]);
}
