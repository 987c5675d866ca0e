//! Claiming sessions: pull start requests from the shared work-queue consumer only while this
//! worker has a free slot, then for each: read metadata, take the Redis lease, fence the log
//! with a takeover record, bind the session's action consumer, start the session task, and
//! only then ack the request. A failure before the ack NAKs it, so another worker (or we,
//! later) retries; a crash before the ack lets JetStream redeliver it after `ack_wait`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use shared::event::{AgentState, Event, StatusUpdate};
use shared::id::{SessionId, UserId};
use shared::ownership;
use shared::status::{self, SessionState};
use shared::wire::{StartReason, StartRequest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Ctx;
use crate::agent::{AgentImpl, CodeAct, Echo, Notify, Replay};
use crate::controller::Controller;
use crate::runtime::RuntimeConfig;
use crate::session::{AgentSession, Start};
use shared::journal::Journal;

/// Most events of a conversation loaded into a new owner's controller.
const HISTORY_LIMIT: u64 = 2000;

/// Reason recorded when a user is at `OH_MAX_CONVERSATIONS_PER_USER`.
pub(crate) const TOO_MANY: &str = "AGENT_ERROR$TOO_MANY_CONVERSATIONS: too many conversations are running for this user; stop one and start this one again";

pub(crate) async fn pull_loop(ctx: Ctx, sessions: TaskTracker, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(ctx.args.max_sessions as usize));
    let mut backoff = Duration::from_millis(100);
    let mut work: Option<consumer::PullConsumer> = None;
    loop {
        // Capacity first: never pull work we cannot run.
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let mut permits = vec![first];
        while permits.len() < 32 {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let batch = fetch(&ctx, &mut work, permits.len()).await;
        let msgs = match batch {
            Ok(m) => {
                backoff = Duration::from_millis(100);
                m
            }
            Err(e) => {
                work = None;
                warn!(error = %e, "fetching start requests failed");
                drop(permits);
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if cancel.is_cancelled() {
            // Draining: give back what this last fetch brought, for another worker at once
            // (possibly our own sessions' resume requests).
            for msg in msgs {
                let _ = msg.ack_with(AckKind::Nak(None)).await; // else redelivered after ack_wait
            }
            return;
        }
        for msg in msgs {
            let Some(permit) = permits.pop() else { break };
            let (ctx, tracker, cancel) = (ctx.clone(), sessions.clone(), cancel.clone());
            sessions.spawn(async move { claim(&ctx, &tracker, &cancel, msg, permit).await });
        }
        // Unused permits go back to the pool here.
    }
}

/// Pulls up to `n` start requests. The consumer handle is looked up once and kept; a failed
/// fetch drops it, so the next one looks it up again (e.g. after a NATS restart).
async fn fetch(
    ctx: &Ctx,
    handle: &mut Option<consumer::PullConsumer>,
    n: usize,
) -> Result<Vec<jetstream::Message>, async_nats::Error> {
    let consumer = match handle {
        Some(c) => c,
        None => handle.insert(
            ctx.store
                .work()
                .get_consumer(ctx.store.names.work_consumer())
                .await?,
        ),
    };
    let mut batch = consumer
        .fetch()
        .max_messages(n)
        .expires(Duration::from_secs(2))
        .messages()
        .await?;
    let mut out = Vec::with_capacity(n);
    while let Some(m) = batch.next().await {
        out.push(m?);
    }
    Ok(out)
}

async fn claim(
    ctx: &Ctx,
    sessions: &TaskTracker,
    cancel: &CancellationToken,
    msg: jetstream::Message,
    permit: OwnedSemaphorePermit,
) {
    let (req, sid, uid) = match StartRequest::decode(&msg.payload) {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, subject = %msg.subject, "dropping malformed start request");
            let _ = msg.ack_with(AckKind::Term).await; // best effort: it would fail again anyway
            return;
        }
    };
    if let Ok(info) = msg.info() {
        // How long the request waited in the queue (clocks of NATS and this host).
        metrics::histogram!("oh_worker_claim_phase_seconds", "phase" => "queued")
            .record(since_published(&info));
    }
    let span = info_span!("claim", session_id = %sid, user_id = %uid, worker_id = %ctx.worker_id);
    match try_claim(ctx, sessions, cancel, &req, sid, uid, permit)
        .instrument(span.clone())
        .await
    {
        Ok(Claimed::Started) => {
            metrics::counter!("oh_worker_claims_total", "result" => "started").increment(1);
            if let Err(e) = msg.double_ack().await {
                // The session runs; a redelivered request will find the lease taken and be acked.
                warn!(parent: &span, error = %e, "ack of start request failed");
            }
        }
        Ok(Claimed::Skip(why)) => {
            debug!(parent: &span, why, "start request needs nothing");
            metrics::counter!("oh_worker_claims_total", "result" => "skipped").increment(1);
            let _ = msg.ack().await; // nothing to redo if this ack is lost
        }
        Ok(Claimed::Later) => {
            metrics::counter!("oh_worker_claims_total", "result" => "later").increment(1);
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await; // redelivered after ack_wait otherwise
        }
        Err(e) => {
            warn!(parent: &span, error = %e, "claim failed; request goes back to the queue");
            metrics::counter!("oh_worker_claims_total", "result" => "failed").increment(1);
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                .await; // see above
        }
    }
}

enum Claimed {
    Started,
    Skip(&'static str),
    Later,
}

async fn try_claim(
    ctx: &Ctx,
    sessions: &TaskTracker,
    cancel: &CancellationToken,
    req: &StartRequest,
    sid: SessionId,
    uid: UserId,
    permit: OwnedSemaphorePermit,
) -> anyhow::Result<Claimed> {
    let store = &ctx.store;
    let names = &store.names;
    let mut redis = ctx.redis.clone();
    let mut phases = Phases::new();
    let Some(meta) = store.get_meta(&uid, &sid).await? else {
        ownership::unmark_should_run(&mut redis, names, &uid, &sid).await?;
        return Ok(Claimed::Skip("conversation deleted"));
    };
    phases.mark("meta");
    let Some(lease) =
        ownership::acquire(&mut redis, names, &sid, &ctx.worker_id, ctx.args.lease_ttl).await?
    else {
        // Someone runs it. A resume request may have come before the old owner's lease
        // expired: try again shortly; other requests are satisfied.
        return Ok(if req.reason == StartReason::Resume {
            Claimed::Later
        } else {
            Claimed::Skip("already running")
        });
    };
    if let Some(limit) = ctx.args.max_conversations_per_user {
        let hold = ctx.args.lease_ttl * 3;
        if !ownership::reserve_user_slot(&mut redis, names, &uid, &sid, limit, hold).await? {
            let _ = ownership::release(&mut redis, &lease).await; // expires by itself otherwise
            info!(
                limit,
                "user at the running-conversation limit; start refused"
            );
            status::write(
                &mut redis,
                names,
                &sid,
                status::Update {
                    state: Some(SessionState::Error),
                    worker_id: Some(""),
                    reason: Some(TOO_MANY),
                    ..Default::default()
                },
            )
            .await?;
            return Ok(Claimed::Skip("user at the running-conversation limit"));
        }
    }
    phases.mark("lease");
    // Renewal starts now, not after the (possibly slow) takeover and history read: the lease
    // must not run out while the claim is still in progress.
    let lost = CancellationToken::new();
    ctx.leases
        .insert(sid.clone(), uid.clone(), lease.clone(), lost.clone());
    match start_session(
        ctx,
        sessions,
        cancel,
        req,
        (&sid, &uid),
        meta,
        &lease,
        lost,
        permit,
        phases,
    )
    .await
    {
        Ok(()) => Ok(Claimed::Started),
        Err(e) => {
            ctx.leases.remove(&sid).await;
            let _ = ownership::release(&mut redis, &lease).await; // expires by itself otherwise
            if ctx.args.max_conversations_per_user.is_some() {
                let _ = ownership::release_user_slot(&mut redis, names, &uid, &sid).await; // expires too
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn start_session(
    ctx: &Ctx,
    sessions: &TaskTracker,
    cancel: &CancellationToken,
    req: &StartRequest,
    (sid, uid): (&SessionId, &UserId),
    meta: shared::store::ConversationMeta,
    lease: &ownership::Lease,
    lost: CancellationToken,
    permit: OwnedSemaphorePermit,
    mut phases: Phases,
) -> anyhow::Result<()> {
    let (sid, uid) = (sid.clone(), uid.clone());
    let store = &ctx.store;
    let names = &store.names;
    let mut redis = ctx.redis.clone();
    let claim_id = lease
        .token
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let result = async {
        let mut journal = Journal::open(store.clone(), sid.clone(), claim_id).await?;
        phases.mark("log_head");
        let empty = journal.is_empty();
        // The previous owner died in the middle of a turn if the log's state says running.
        let interrupted = journal.agent_state() == Some(AgentState::Running.as_str());
        let config = consumer::pull::Config {
            durable_name: Some(names.actions_consumer(&sid)),
            filter_subject: names.actions_subject(&sid),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1,
            ..Default::default()
        };
        let takeover = Event::agent_state_changed(AgentState::Loading, "");
        // A conversation's first start has no earlier owner whose consumer must go first: its
        // action consumer is created beside the takeover append (one round trip less).
        let (epoch, early) = if empty {
            let (epoch, consumer) = tokio::join!(
                journal.take_over(takeover),
                store.actions().create_consumer(config.clone())
            );
            (epoch?, Some(consumer))
        } else {
            (journal.take_over(takeover).await?, None)
        };
        // Still a first start only if nobody appended before our takeover record.
        let fresh = empty && journal.last_id() == Some(0);
        phases.mark("takeover");
        let consumer: consumer::PullConsumer = match early {
            Some(Ok(consumer)) if fresh => consumer,
            _ => {
                // A previous owner's consumer goes, so its unacked actions come back at once.
                match store
                    .actions()
                    .delete_consumer(&names.actions_consumer(&sid))
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_not_found(&e.kind()) => {}
                    Err(e) => {
                        return Err(anyhow::Error::new(e).context("delete old action consumer"));
                    }
                }
                store.actions().create_consumer(config).await?
            }
        };
        phases.mark("consumer");
        let pending = consumer.cached_info().num_pending;
        // Short pull expiry: after a NATS restart an outstanding pull is re-issued within it.
        let actions = consumer
            .stream()
            .max_messages_per_batch(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        phases.mark("pull");
        // The conversation so far, for the agent (events are the state: see ARCHITECTURE.md).
        // Bounded: a claim must stay cheap however long the conversation (the agent sees at
        // most the newest HISTORY_LIMIT events after a move).
        let from = journal
            .last_id()
            .map_or(0, |l| l.saturating_sub(HISTORY_LIMIT));
        // A first start has nothing but its own takeover record: no read.
        let history: Vec<Event> = if fresh {
            Vec::new()
        } else {
            store
                .read_from(&sid, from, usize::MAX)
                .await?
                .iter()
                .filter_map(|e| Event::from_json(&e.payload).ok())
                .collect()
        };
        phases.mark("history");
        anyhow::Ok((
            journal,
            fresh,
            interrupted,
            epoch,
            actions,
            pending,
            history,
        ))
    }
    .await;
    let (journal, fresh, interrupted, epoch, actions, pending, history) = result?;
    info!(epoch, fresh, interrupted, pending, reason = ?req.reason, "claimed");
    let mut redis2 = redis.clone();
    tokio::try_join!(
        ownership::mark_should_run(&mut redis, names, &uid, &sid),
        status::write(
            &mut redis2,
            names,
            &sid,
            status::Update {
                state: Some(SessionState::Running),
                agent_state: Some(AgentState::Loading.as_str()),
                worker_id: Some(ctx.worker_id.as_str()),
                last_event_id: journal.last_id(),
                reason: Some(""),
            },
        )
    )?;
    phases.mark("status");
    let runtime_cfg = RuntimeConfig::new(ctx.args.workspace_root.clone());
    let agent = match (&ctx.llm, ctx.args.llm_config()) {
        (Some(registry), Some(cfg)) => {
            let llm = registry.get(&cfg)?;
            if let Some(m) = last_metrics(&history) {
                // The conversation's spend so far, from the newest agent action.
                llm.metrics().restore(m);
            }
            let nats = ctx.nats.clone();
            let subject = names.status_subject(&sid);
            let notify: Notify = Arc::new(move |update: StatusUpdate| {
                let (nats, subject) = (nats.clone(), subject.clone());
                let payload = bytes::Bytes::from(update.to_json());
                // Status updates are live only: losing one is acceptable.
                tokio::spawn(async move {
                    let _ = nats.publish(subject, payload).await;
                });
            });
            AgentImpl::CodeAct(Box::new(CodeAct {
                llm,
                notify,
                workspace: runtime_cfg.root.join(sid.as_str()).display().to_string(),
            }))
        }
        _ => AgentImpl::Echo(Echo {
            faults: ctx.args.echo_faults,
        }),
    };
    let agent = match &meta.replay_blob {
        None => agent,
        Some(name) => {
            let bytes = store.get_blob(name).await?;
            let trajectory = shared::event::load_trajectory(&bytes)?;
            let inner = match agent {
                AgentImpl::Echo(_) => None,
                other => Some(other),
            };
            AgentImpl::Replay(Box::new(
                Replay::new(trajectory, &history, inner).map_err(anyhow::Error::msg)?,
            ))
        }
    };
    let iterations = turn_iterations(&history);
    let ctrl = Controller {
        agent,
        history,
        iterations,
        max_iterations: ctx.args.max_iterations,
        max_budget: ctx.args.max_budget_per_task,
        runtime: None,
        runtime_cfg,
        sid: sid.clone(),
        knowledge: Arc::clone(&ctx.knowledge),
        recalls: ctx.llm.is_some(),
    };
    let session = AgentSession::new(
        ctx.clone(),
        (sid.clone(), uid.clone()),
        meta,
        journal,
        lease.clone(),
        ctrl,
        AgentState::Loading,
    );
    let span =
        info_span!("session", session_id = %sid, user_id = %uid, worker_id = %ctx.worker_id, epoch);
    let shutdown = cancel.clone();
    sessions.spawn(
        async move {
            metrics::gauge!("oh_worker_sessions_active").increment(1.0);
            session
                .run(
                    actions,
                    Start {
                        fresh,
                        interrupted,
                        pending,
                    },
                    lost,
                    shutdown,
                )
                .await;
            metrics::gauge!("oh_worker_sessions_active").decrement(1.0);
            drop(permit);
        }
        .instrument(span),
    );
    Ok(())
}

/// Time since JetStream stored a message (its clock against ours; zero if ours is behind).
pub(crate) fn since_published(info: &jetstream::message::Info<'_>) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let published = u128::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0);
    Duration::from_nanos(u64::try_from(now.saturating_sub(published)).unwrap_or(u64::MAX))
}

/// Time spent in each phase of a claim, as `oh_worker_claim_phase_seconds{phase}` (where a
/// slow start spends its time).
struct Phases {
    last: std::time::Instant,
}

impl Phases {
    fn new() -> Self {
        Self {
            last: std::time::Instant::now(),
        }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        metrics::histogram!("oh_worker_claim_phase_seconds", "phase" => phase)
            .record(now.duration_since(self.last));
        self.last = now;
    }
}

fn is_not_found(kind: &jetstream::stream::ConsumerErrorKind) -> bool {
    matches!(kind, jetstream::stream::ConsumerErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND)
}

/// The `llm_metrics` of the newest agent action that has them.
fn last_metrics(history: &[Event]) -> Option<crate::llm::Metrics> {
    history
        .iter()
        .rev()
        .find_map(|e| e.llm_metrics.clone())
        .and_then(|m| serde_json::from_value(m).ok())
}

/// Steps already taken in the current turn (agent actions since the last user message), so a
/// turn continued on another worker keeps its iteration count.
fn turn_iterations(history: &[Event]) -> u32 {
    let n = history
        .iter()
        .rev()
        .take_while(|e| {
            !(e.source == Some(shared::event::Source::User) && e.action_type() == Some("message"))
        })
        .filter(|e| {
            e.source == Some(shared::event::Source::Agent)
                && e.action_type()
                    .is_some_and(|a| a != "message" && a != "system")
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}
