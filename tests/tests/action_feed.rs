//! Action delivery without consumers (`shared::queue::ActionFeed`) against a real nats-server:
//! the stream's republish in order, a missed republish found by the next one's previous
//! sequence, the recheck for the last one, drops of handled actions; and through the real
//! binaries, a conversation that still answers while the stream republishes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use shared::id::SessionId;
use shared::msg_id::ActionMsgId;
use shared::names::Names;
use shared::queue::{Action, ActionFeed};
use shared::store::Store;
use tests::cluster::{Cluster, ClusterOpts, events_until, is_echo};
use tests::nats::NatsServer;

async fn publish(store: &Store, sid: &SessionId, body: &str) -> u64 {
    store
        .publish_action(
            sid,
            Bytes::from(body.to_owned()),
            HeaderMap::new(),
            &ActionMsgId::fresh(),
        )
        .await
        .unwrap()
}

/// The actions stream as a version without republish created it (nats-server 2.9 cannot add
/// RePublish to an existing stream): no action is announced; the owner finds them by reading.
async fn actions_stream_without_republish(js: &jetstream::Context, names: &Names) {
    js.create_stream(jetstream::stream::Config {
        name: names.actions_stream(),
        subjects: vec![names.actions_subjects()],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// What the stream republishes for a stored action (headers and payload), sent by the test
/// itself: the announcement a feed gets when an earlier one was lost.
async fn announce(
    client: &async_nats::Client,
    names: &Names,
    sid: &SessionId,
    seq: u64,
    last: u64,
) {
    announce_as(client, names, sid, seq, last, None).await;
}

/// [`announce`] with the announced action's `Nats-Msg-Id`.
async fn announce_as(
    client: &async_nats::Client,
    names: &Names,
    sid: &SessionId,
    seq: u64,
    last: u64,
    msg_id: Option<&str>,
) {
    let mut h = HeaderMap::new();
    if let Some(id) = msg_id {
        h.insert("Nats-Msg-Id", id);
    }
    h.insert("Nats-Sequence", seq.to_string().as_str());
    h.insert("Nats-Last-Sequence", last.to_string().as_str());
    client
        .publish_with_headers(
            names.actions_stored_subject(sid),
            h,
            Bytes::from_static(b"announced"),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
}

async fn next(feed: &mut ActionFeed) -> Action {
    tokio::time::timeout(Duration::from_secs(5), feed.next())
        .await
        .expect("an action within 5 s")
        .unwrap()
}

async fn nothing_within(feed: &mut ActionFeed, wait: Duration) {
    if let Ok(got) = tokio::time::timeout(wait, feed.next()).await {
        panic!("no action expected, got {got:?}");
    }
}

#[tokio::test]
async fn the_feed_takes_each_action_once_in_order() {
    let nats = NatsServer::start().await;
    let names = Names::new("af").unwrap();
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    let store = Store::open(client, names.clone()).await.unwrap();
    let (sid, other) = (SessionId::generate(), SessionId::generate());

    // Stored before the owner came: read at the claim, then from the stream while more wait.
    let a1 = publish(&store, &sid, "a1").await;
    let a2 = publish(&store, &sid, "a2").await;
    let mut feed = store.action_feed(&sid).await.unwrap();
    assert!(feed.look().await.unwrap(), "a1 waits");
    for (want, body) in [(a1, "a1"), (a2, "a2")] {
        let got = next(&mut feed).await;
        assert_eq!((got.seq, got.republished), (want, false), "{body}");
        assert_eq!(&got.payload[..], body.as_bytes());
    }
    nothing_within(&mut feed, Duration::from_millis(200)).await;

    // Live: republished, in order; another session's are never seen here.
    let a3 = publish(&store, &sid, "a3").await;
    publish(&store, &other, "x").await;
    let a4 = publish(&store, &sid, "a4").await;
    for (want, body) in [(a3, "a3"), (a4, "a4")] {
        let got = next(&mut feed).await;
        assert_eq!((got.seq, got.republished), (want, true), "{body}");
        assert_eq!(&got.payload[..], body.as_bytes());
        assert!(got.sent_at.is_some(), "the publisher's time travels along");
    }
    nothing_within(&mut feed, Duration::from_millis(200)).await;

    // Dropped ones are gone; one handled but not dropped (its drop failed) comes back once on
    // the worker's recheck, which lists the sessions with actions stored.
    for seq in [a1, a2, a3] {
        store.drop_action(seq).await.unwrap();
    }
    let waiting = store.sessions_with_actions().await.unwrap();
    assert!(
        waiting.contains(&sid) && waiting.contains(&other),
        "{waiting:?}"
    );
    feed.recheck().notify_one();
    let got = next(&mut feed).await;
    assert_eq!(got.seq, a4, "the leftover is handed out again");
    nothing_within(&mut feed, Duration::from_millis(200)).await;
    store.drop_action(a4).await.unwrap();
    store.drop_action(a4).await.unwrap(); // already gone: no error
    assert_eq!(
        store.sessions_with_actions().await.unwrap(),
        vec![other.clone()]
    );
    assert!(store.next_action(&sid, 0).await.unwrap().is_none());

    // A new owner's feed starts from the stream: what the old one left comes back (the log's
    // applied-action mark decides whether it was applied), then live ones.
    let a5 = publish(&store, &sid, "a5").await;
    let mut second = store.action_feed(&sid).await.unwrap();
    assert!(second.look().await.unwrap());
    assert_eq!(next(&mut second).await.seq, a5);
    nothing_within(&mut second, Duration::from_millis(200)).await;
    let a6 = publish(&store, &sid, "a6").await;
    let got = next(&mut second).await;
    assert_eq!((got.seq, got.republished), (a6, true));

    // Deleting a conversation deletes its actions one by one; the stream's sequence goes on.
    store.purge_session(&other).await.unwrap();
    store.drop_action(a5).await.unwrap();
    store.drop_action(a6).await.unwrap();
    let left = store.sessions_with_actions().await.unwrap();
    assert!(left.is_empty(), "{left:?} vs {sid} {other}");
    let mut stream = js.get_stream(names.actions_stream()).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.consumer_count, 0, "no consumer anywhere");
    assert_eq!(info.state.last_sequence, a6);
}

#[tokio::test]
async fn missed_announcements_are_made_up_by_reading_the_stream() {
    let nats = NatsServer::start().await;
    let names = Names::new("ag").unwrap();
    let client = nats.connect().await;
    let js = jetstream::new(client.clone());
    actions_stream_without_republish(&js, &names).await;
    let store = Store::open(client.clone(), names.clone()).await.unwrap();
    let sid = SessionId::generate();
    let mut feed = store.action_feed(&sid).await.unwrap();
    assert!(!feed.look().await.unwrap());

    // a1 and a2 announced nothing; a3's announcement says a2 came before it: the feed reads
    // a1, a2, a3 from the stream, in order, and takes none of them twice.
    let a1 = publish(&store, &sid, "a1").await;
    let a2 = publish(&store, &sid, "a2").await;
    let a3 = publish(&store, &sid, "a3").await;
    nothing_within(&mut feed, Duration::from_millis(200)).await;
    announce(&client, &names, &sid, a3, a2).await;
    let mut a3_id = None;
    for (want, body) in [(a1, "a1"), (a2, "a2"), (a3, "a3")] {
        let got = next(&mut feed).await;
        assert_eq!((got.seq, &got.payload[..]), (want, body.as_bytes()));
        assert!(!got.republished);
        a3_id = got.msg_id().map(str::to_owned);
    }
    // A late copy (the same msg id): skipped.
    announce_as(&client, &names, &sid, a3, a2, a3_id.as_deref()).await;
    nothing_within(&mut feed, Duration::from_millis(200)).await;

    // The last one of a burst has no successor: only the recheck finds it.
    let a4 = publish(&store, &sid, "a4").await;
    nothing_within(&mut feed, Duration::from_millis(300)).await;
    assert!(store.sessions_with_actions().await.unwrap().contains(&sid));
    feed.recheck().notify_one();
    assert_eq!(next(&mut feed).await.seq, a4);
    nothing_within(&mut feed, Duration::from_millis(200)).await;

    // An announcement in order is taken as it is (nothing unhandled before it).
    let a5 = publish(&store, &sid, "a5").await;
    announce(&client, &names, &sid, a5, a4).await;
    let got = next(&mut feed).await;
    assert_eq!(
        (got.seq, got.republished, &got.payload[..]),
        (a5, true, &b"announced"[..])
    );
    assert!(!got.renumbered);

    // A sequence already handed out, announced again with another msg id: the stream numbered
    // anew (a single nats-server killed before writing what it acknowledged forgets its
    // newest sequences): a new action, taken whatever the cursor says. The same msg id again
    // is a copy, skipped.
    announce_as(&client, &names, &sid, a5, 0, Some("another")).await;
    let got = next(&mut feed).await;
    assert_eq!((got.seq, got.renumbered), (a5, true));
    announce_as(&client, &names, &sid, a5, 0, Some("another")).await;
    nothing_within(&mut feed, Duration::from_millis(200)).await;
}

/// Through the binaries: a deployment whose actions stream announces nothing (created by an
/// older version) still answers every message, in order (the worker's recheck reads them),
/// and handled actions leave the stream.
#[tokio::test]
async fn a_conversation_answers_when_no_action_is_announced() {
    let mut c = Cluster::start(ClusterOpts {
        gateways: 0,
        workers: 0,
        ..Default::default()
    })
    .await;
    let names = Names::new(&c.namespace).unwrap();
    let js = jetstream::new(c.nats.connect().await);
    actions_stream_without_republish(&js, &names).await;
    c.add_gateway().await;
    c.add_worker().await;
    let sid = c.create(0, None, None).await;
    let mut a = c.connect(0, &sid, None, None).await.expect("connect");
    // Each stored (acked) before the next is sent: the stream's order is the sending order.
    for text in ["one", "two", "three"] {
        a.emit_with_ack(
            "oh_user_action",
            &serde_json::json!({"action":"message","args":{"content":text}}),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    }
    let got = events_until(&mut a, Duration::from_secs(15), |e| is_echo(e, "three")).await;
    let at = |t: &str| got.iter().position(|e| is_echo(e, t));
    assert!(
        at("one").is_some() && at("one") < at("two") && at("two") < at("three"),
        "answered in order: {got:#?}{}",
        c.logs()
    );
    assert!(
        c.workers[0].log().contains("created without RePublish"),
        "the worker says why actions are slow"
    );

    // Every handled action is dropped from the stream.
    let store = c.store().await;
    let id = SessionId::parse(&sid).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.next_action(&id, 0).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handled actions still stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
