//! The floor: what the broker alone costs on this machine, measured in the same run so our
//! figures can be given as ratios to it.
//!
//! - NATS request-reply: the tool answers its own requests on a private inbox-like subject
//!   (`_loadtest.floor.<uuid>`), one request in flight, over two connections (requester and
//!   responder), like gateway and worker.
//! - JetStream publish-ack: publishes to a throwaway file-storage stream
//!   (`loadtest_floor`, subject `loadtest.floor.<uuid>`), one in flight, awaiting each ack; the
//!   stream is deleted afterwards. Only plain streams and publish are used (async-nats 0.51's
//!   KV and account calls do not parse nats-server 2.9.10 replies). The stream's name is fixed
//!   so that the `loadtest` NATS user (`deploy/auth/nats-auth.conf.in`) may create and delete
//!   exactly this one; two floors measured at once against one server would collide.
//!
//! The URL may carry the `loadtest` user's credentials (`nats://loadtest:PASSWORD@HOST:PORT`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::stats::{Metric, Stats};

/// A floor measurement failed.
#[derive(Debug, thiserror::Error)]
#[error("floor ({what}): {detail}")]
pub struct FloorError {
    what: &'static str,
    detail: String,
}

/// The throwaway stream of the publish-ack floor.
const FLOOR_STREAM: &str = "loadtest_floor";

fn err(what: &'static str) -> impl FnOnce(String) -> FloorError {
    move |detail| FloorError { what, detail }
}

/// Measures `n` request-reply round trips and `n` JetStream publish-acks (after `n / 10`
/// warm-up rounds each) into [`Metric::NatsRtt`] and [`Metric::JsAck`].
///
/// # Errors
/// When NATS cannot be reached or a request/publish fails.
pub async fn measure(url: &str, n: usize, stats: &Arc<Stats>) -> Result<(), FloorError> {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let url = shared::creds::BrokerUrl::parse(url).map_err(err("NATS URL"))?;
    let connect = || async {
        let (opts, servers) = shared::creds::nats_connect_options(&url);
        opts.connect(servers)
            .await
            .map_err(|e| err("connect")(format!("{url}: {e}")))
    };
    let requester = connect().await?;
    let responder = connect().await?;

    let subject = format!("_loadtest.floor.{tag}");
    let mut sub = responder
        .subscribe(subject.clone())
        .await
        .map_err(|e| err("subscribe")(e.to_string()))?;
    responder
        .flush()
        .await
        .map_err(|e| err("flush")(e.to_string()))?;
    let answer = {
        let responder = responder.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Some(reply) = m.reply {
                    // A lost answer shows up as a request timeout on the other side.
                    let _ = responder.publish(reply, m.payload).await;
                }
            }
        })
    };
    let warm = n / 10;
    let payload = bytes::Bytes::from_static(&[b'x'; 128]);
    // The responder's interest may take a moment to reach the requester's side: wait (at most
    // 5 s) until a request is answered before measuring.
    let mut answered = false;
    for _ in 0..250 {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(200),
            requester.request(subject.clone(), payload.clone()),
        )
        .await
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !answered {
        answer.abort();
        return Err(err("request")("no answer within 5 s".to_owned()));
    }
    for i in 0..warm + n {
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            requester.request(subject.clone(), payload.clone()),
        )
        .await;
        match r {
            Ok(Ok(_)) if i >= warm => stats.record(Metric::NatsRtt, t.elapsed()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                answer.abort();
                return Err(err("request")(e.to_string()));
            }
            Err(_) => {
                answer.abort();
                return Err(err("request")("timed out".to_owned()));
            }
        }
    }
    answer.abort();

    let js = async_nats::jetstream::new(requester.clone());
    let stream = FLOOR_STREAM.to_owned();
    let js_subject = format!("loadtest.floor.{tag}");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec!["loadtest.floor.>".to_owned()],
        storage: async_nats::jetstream::stream::StorageType::File,
        max_messages: 100_000,
        ..Default::default()
    })
    .await
    .map_err(|e| err("create stream")(e.to_string()))?;
    let result = async {
        for i in 0..warm + n {
            let t = Instant::now();
            let ack = js
                .publish(js_subject.clone(), payload.clone())
                .await
                .map_err(|e| err("publish")(e.to_string()))?;
            tokio::time::timeout(Duration::from_secs(5), ack)
                .await
                .map_err(|_| err("publish ack")("timed out".to_owned()))?
                .map_err(|e| err("publish ack")(e.to_string()))?;
            if i >= warm {
                stats.record(Metric::JsAck, t.elapsed());
            }
        }
        Ok(())
    }
    .await;
    let deleted = js.delete_stream(&stream).await;
    result?;
    deleted.map_err(|e| err("delete stream")(e.to_string()))?;
    Ok(())
}
