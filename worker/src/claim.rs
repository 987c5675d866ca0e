//! Claiming sessions: pull start requests from the shared work-queue consumer only while this
//! worker has a free slot, then for each: read metadata, take the Redis lease, fence the log
//! with a takeover record, bind the session's action consumer, start the session task, and
//! only then ack the request. A failure before the ack NAKs it, so another worker (or we,
//! later) retries; a crash before the ack lets JetStream redeliver it after `ack_wait`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use shared::event::{AgentState, Event, StatusUpdate};
use shared::id::{SessionId, UserId};
use shared::journal::{AppendError, Journal};
use shared::ownership::{self, Lease};
use shared::queue::ActionFeed;
use shared::status::{self, SessionState};
use shared::store::{ConversationMeta, StoreError};
use shared::wire::{StartReason, StartRequest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Ctx;
use crate::agent::{AgentImpl, CodeAct, Echo, Notify, Replay};
use crate::controller::Controller;
use crate::llm::LlmSetupError;
use crate::runtime::RuntimeConfig;
use crate::session::{AgentSession, Start};
use crate::workspace::{self, Place, Snapshots};

/// Most events of a conversation loaded into a new owner's controller.
const HISTORY_LIMIT: u64 = 2000;

/// Reason recorded when a user is at `OH_MAX_CONVERSATIONS_PER_USER`.
pub(crate) const TOO_MANY: &str = "AGENT_ERROR$TOO_MANY_CONVERSATIONS: too many conversations are running for this user; stop one and start this one again";

pub(crate) async fn pull_loop(ctx: Ctx, sessions: TaskTracker, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(ctx.args.max_sessions as usize));
    let mut backoff = Duration::from_millis(100);
    let mut work: Option<PullConsumer> = None;
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

/// How often [`queue_depth_loop`] reads the start queue's depth.
const QUEUE_DEPTH_EVERY: Duration = Duration::from_secs(15);

/// Keeps `oh_worker_start_queue_pending` (start requests no worker has taken yet) current:
/// one consumer-info request per worker every [`QUEUE_DEPTH_EVERY`], also while this worker
/// is full and pulls nothing (when a growing queue matters most).
pub(crate) async fn queue_depth_loop(ctx: Ctx, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(QUEUE_DEPTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut consumer: Option<PullConsumer> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = match consumer.as_mut() {
            Some(c) => c,
            None => match ctx.store.work_consumer().await {
                Ok(c) => consumer.insert(c),
                Err(e) => {
                    debug!(error = %e, "start queue depth: consumer not found");
                    continue;
                }
            },
        };
        match c.info().await {
            Ok(info) => {
                metrics::gauge!("oh_worker_start_queue_pending").set(info.num_pending as f64);
            }
            Err(e) => {
                debug!(error = %e, "start queue depth not read");
                consumer = None;
            }
        }
    }
}

/// Pulls up to `n` start requests. The consumer handle is looked up once and kept; a failed
/// fetch drops it, so the next one looks it up again (e.g. after a NATS restart).
async fn fetch(
    ctx: &Ctx,
    handle: &mut Option<PullConsumer>,
    n: usize,
) -> Result<Vec<jetstream::Message>, async_nats::Error> {
    let consumer = match handle {
        Some(c) => c,
        None => handle.insert(ctx.store.work_consumer().await?),
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
    match try_claim(
        ctx,
        sessions,
        cancel,
        &req,
        sid.clone(),
        uid.clone(),
        permit,
    )
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
            metrics::counter!("oh_worker_claims_total", "result" => "failed").increment(1);
            let tries = msg.info().map_or(1, |i| i.delivered.max(1));
            if e.is_the_conversations() && tries >= MAX_START_FAILURES {
                // It would fail the same way forever: end it with the reason, visibly.
                let reason = format!("AGENT_ERROR$START_FAILED: {e}");
                warn!(parent: &span, error = %e, tries, "start failed every try; conversation ends in error");
                match mark_error(ctx, &sid, &uid, "AGENT_ERROR$START_FAILED", &reason).await {
                    Ok(()) => {
                        let _ = msg.ack_with(AckKind::Term).await; // a redelivery fails the same way
                    }
                    Err(re) => {
                        warn!(parent: &span, error = %re, "error status not written; request goes back to the queue");
                        let _ = msg.ack_with(AckKind::Nak(Some(retry_delay(tries)))).await;
                    }
                }
                return;
            }
            warn!(parent: &span, error = %e, tries, "claim failed; request goes back to the queue");
            let _ = msg.ack_with(AckKind::Nak(Some(retry_delay(tries)))).await; // see above
        }
    }
}

/// Tries of a start that fails for a reason of the conversation itself (its replay, its LLM
/// settings, a corrupt record) before the conversation ends in `error`.
const MAX_START_FAILURES: i64 = 3;

/// Delay before a failed start is tried again: 0.5 s, doubling to at most 10 s, so a
/// dependency outage does not spin (each try appends a takeover record).
fn retry_delay(tries: i64) -> Duration {
    let doublings = u32::try_from(tries.saturating_sub(1).clamp(0, 5)).unwrap_or(5);
    Duration::from_millis(500 * (1u64 << doublings)).min(Duration::from_secs(10))
}

enum Claimed {
    Started,
    Skip(&'static str),
    Later,
}

/// Why a claim failed; the start request goes back to the queue.
#[derive(Debug, thiserror::Error)]
enum ClaimError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("takeover record: {0}")]
    Takeover(#[from] AppendError),
    #[error(transparent)]
    Llm(#[from] LlmSetupError),
    #[error("replay trajectory: {0}")]
    Trajectory(#[from] shared::event::EventError),
    #[error("replay trajectory: {0}")]
    Replay(String),
    #[error("workspace restore: {0}")]
    Workspace(#[from] crate::workspace::SnapError),
}

impl ClaimError {
    /// A fault of the conversation itself (it fails the same way on every worker), not of a
    /// dependency that may come back.
    fn is_the_conversations(&self) -> bool {
        match self {
            ClaimError::Trajectory(_) | ClaimError::Replay(_) | ClaimError::Llm(_) => true,
            ClaimError::Store(e) => matches!(e, StoreError::Corrupt { .. }),
            _ => false,
        }
    }
}

async fn try_claim(
    ctx: &Ctx,
    sessions: &TaskTracker,
    cancel: &CancellationToken,
    req: &StartRequest,
    sid: SessionId,
    uid: UserId,
    permit: OwnedSemaphorePermit,
) -> Result<Claimed, ClaimError> {
    let mut redis = ctx.redis.clone();
    let mut phases = Phases::new();
    // A create's request carries the metadata just stored (a delete withdraws the request).
    let meta = match req.carried_meta(&sid, &uid) {
        Some(meta) => meta.clone(),
        None => match ctx.store.get_meta(&uid, &sid).await? {
            Some(meta) => meta,
            None => {
                ownership::unmark_should_run(&mut redis, ctx.store.names(), &uid, &sid).await?;
                return Ok(Claimed::Skip("conversation deleted"));
            }
        },
    };
    phases.mark("meta");
    let lease = match take_lease(ctx, req, &sid, &uid).await? {
        Ok(lease) => lease,
        Err(not_now) => return Ok(not_now),
    };
    phases.mark("lease");
    // Renewal starts now, not after the (possibly slow) takeover and history read: the lease
    // must not run out while the claim is still in progress.
    let lost = CancellationToken::new();
    let redis_lost = Arc::new(tokio::sync::Notify::new());
    ctx.leases.insert(
        sid.clone(),
        uid.clone(),
        lease.clone(),
        lost.clone(),
        Arc::clone(&redis_lost),
    );
    let mut claim = Claim {
        ctx,
        reason: req.reason,
        nothing_stored_before: req.nothing_stored_before(),
        sid,
        uid,
        lease,
        phases,
    };
    match claim.start(meta).await {
        Ok(ready) => {
            claim.spawn(ready, sessions, cancel.clone(), (lost, redis_lost), permit);
            Ok(Claimed::Started)
        }
        Err(ClaimError::Takeover(AppendError::Full { .. })) => {
            // Not a fault to retry: the conversation cannot take another event.
            claim.abandon().await;
            mark_full(ctx, &claim.sid, &claim.uid).await?;
            Ok(Claimed::Skip("the conversation's event log is full"))
        }
        Err(e) => {
            claim.abandon().await;
            Err(e)
        }
    }
}

/// The reason of a conversation whose event log is full.
pub(crate) const FULL: &str = "AGENT_ERROR$CONVERSATION_FULL: this conversation has reached its event limit (OH_MAX_EVENTS_PER_CONVERSATION); start a new conversation";

/// Records that a conversation's log is full: status `error` with [`FULL`], it no longer
/// should run (nothing requeues it; a new message is refused the same way), and connected
/// clients get a live error (the log itself takes nothing more).
pub(crate) async fn mark_full(ctx: &Ctx, sid: &SessionId, uid: &UserId) -> redis::RedisResult<()> {
    warn!(session_id = %sid, "event log full; conversation stopped");
    metrics::counter!("oh_worker_logs_full_total").increment(1);
    mark_error(ctx, sid, uid, "AGENT_ERROR$CONVERSATION_FULL", FULL).await
}

/// Ends a conversation in `error` with `reason`: it no longer should run (nothing requeues
/// it; `/start` tries again), and connected clients get a live error status.
async fn mark_error(
    ctx: &Ctx,
    sid: &SessionId,
    uid: &UserId,
    id: &str,
    reason: &str,
) -> redis::RedisResult<()> {
    let names = ctx.store.names();
    let update = StatusUpdate {
        level: shared::event::StatusLevel::Error,
        id: id.to_owned(),
        message: reason.to_owned(),
    };
    if let Err(e) = ctx
        .nats
        .publish(names.status_subject(sid), update.to_json().into())
        .await
    {
        warn!(error = %e, "error notice not sent");
    }
    let mut redis = ctx.redis.clone();
    ownership::unmark_should_run(&mut redis, names, uid, sid).await?;
    status::write(
        &mut redis,
        names,
        sid,
        status::Update {
            state: Some(SessionState::Error),
            worker_id: Some(""),
            reason: Some(reason),
            ..Default::default()
        },
    )
    .await
}

/// Takes the session's lease (and, with a per-user limit, a slot of its user); `Err` says
/// what to do with the request when that is not possible now.
async fn take_lease(
    ctx: &Ctx,
    req: &StartRequest,
    sid: &SessionId,
    uid: &UserId,
) -> Result<Result<Lease, Claimed>, ClaimError> {
    let names = ctx.store.names();
    let mut redis = ctx.redis.clone();
    let Some(lease) =
        ownership::acquire(&mut redis, names, sid, &ctx.worker_id, ctx.args.lease_ttl).await?
    else {
        // Someone runs it. A resume request may have come before the old owner's lease
        // expired: try again shortly; other requests are satisfied.
        return Ok(Err(if req.reason == StartReason::Resume {
            Claimed::Later
        } else {
            Claimed::Skip("already running")
        }));
    };
    let Some(limit) = ctx.args.max_conversations_per_user else {
        return Ok(Ok(lease));
    };
    let hold = ctx.args.lease_ttl * 3;
    if ownership::reserve_user_slot(&mut redis, names, uid, sid, limit, hold).await? {
        return Ok(Ok(lease));
    }
    let _ = ownership::release(&mut redis, &lease).await; // expires by itself otherwise
    info!(
        limit,
        "user at the running-conversation limit; start refused"
    );
    status::write(
        &mut redis,
        names,
        sid,
        status::Update {
            state: Some(SessionState::Error),
            worker_id: Some(""),
            reason: Some(TOO_MANY),
            ..Default::default()
        },
    )
    .await?;
    Ok(Err(Claimed::Skip("user at the running-conversation limit")))
}

/// A session whose lease this worker holds, on its way to running: each step below is one
/// phase of `oh_worker_claim_phase_seconds`.
struct Claim<'a> {
    ctx: &'a Ctx,
    reason: StartReason,
    /// The create stored no action before its request (see `StartRequest::no_actions`).
    nothing_stored_before: bool,
    sid: SessionId,
    uid: UserId,
    lease: Lease,
    phases: Phases,
}

/// The log fenced for this claim, and what its head said.
struct Fenced {
    journal: Journal,
    epoch: u64,
    /// Nobody ever appended before our takeover record: a conversation's first start.
    fresh: bool,
    /// The previous owner died in the middle of a turn.
    interrupted: bool,
}

/// Everything the session task needs, built.
struct Ready {
    session: AgentSession,
    actions: ActionFeed,
    start: Start,
    epoch: u64,
}

impl Claim<'_> {
    /// The steps from lease to a session ready to run.
    async fn start(&mut self, meta: ConversationMeta) -> Result<Ready, ClaimError> {
        // Subscribed first, so the republish of an action stored during the claim reaches
        // the feed; the look after the takeover reads what was stored before.
        let mut actions = self.ctx.store.action_feed(&self.sid).await?;
        let mut fenced = self.fence().await?;
        // A conversation's first start whose create stored no action has nothing to look
        // for (one sent while it starts comes by a gap or the recheck).
        let waiting = if fenced.fresh && self.nothing_stored_before {
            actions.presume_none();
            false
        } else {
            actions.look().await?
        };
        self.phases.mark("actions");
        let history = self.history(&mut fenced.journal, fenced.fresh).await?;
        self.phases.mark("history");
        let (snapshots, workspace_note) =
            self.workspace(fenced.fresh, fenced.epoch, &history).await?;
        self.phases.mark("workspace");
        info!(
            epoch = fenced.epoch,
            fresh = fenced.fresh,
            interrupted = fenced.interrupted,
            waiting,
            reason = ?self.reason,
            "claimed"
        );
        self.publish_running(&fenced.journal).await?;
        self.phases.mark("status");
        let ctrl = self.controller(&meta, history).await?;
        let start = Start {
            fresh: fenced.fresh,
            interrupted: fenced.interrupted,
            waiting,
            workspace_note,
        };
        let mut session = AgentSession::new(
            self.ctx.clone(),
            (self.sid.clone(), self.uid.clone()),
            meta,
            fenced.journal,
            self.lease.clone(),
            ctrl,
            AgentState::Loading,
        );
        session.snapshots =
            Some(snapshots.with_pause(Duration::from_millis(self.ctx.args.test_snapshot_pause_ms)));
        Ok(Ready {
            session,
            actions,
            start,
            epoch: fenced.epoch,
        })
    }

    /// Appends the takeover record (the new epoch fences every earlier owner).
    async fn fence(&mut self) -> Result<Fenced, ClaimError> {
        let store = &self.ctx.store;
        let claim_id = self.lease.claim_id().to_owned();
        // A conversation's first start presumes an empty log (the takeover's fence finds out
        // otherwise and reads the head then); any other start reads the head first.
        let mut journal = if self.reason == StartReason::Create {
            Journal::presumed_empty(store.clone(), self.sid.clone(), claim_id)
        } else {
            Journal::open(store.clone(), self.sid.clone(), claim_id).await?
        };
        self.phases.mark("log_head");
        let empty = journal.is_empty();
        let takeover = Event::agent_state_changed(AgentState::Loading, "");
        let epoch = journal.take_over(takeover).await?;
        // Still a first start only if nobody appended before our takeover record.
        let fresh = empty && journal.last_id() == Some(0);
        // The state the takeover record carried forward: the turn as the last owner left it
        // (read after the append, which re-reads the head if another claim got in first).
        let interrupted = journal.agent_state() == Some(AgentState::Running.as_str());
        self.phases.mark("takeover");
        Ok(Fenced {
            journal,
            epoch,
            fresh,
            interrupted,
        })
    }

    /// The conversation so far, for the agent (events are the state). Bounded: a claim stays
    /// cheap however long the conversation (the agent sees at most the newest
    /// `HISTORY_LIMIT` events after a move). A first start has only its takeover record.
    async fn history(&self, journal: &mut Journal, fresh: bool) -> Result<Vec<Event>, ClaimError> {
        if fresh {
            return Ok(Vec::new());
        }
        let from = journal
            .last_id()
            .map_or(0, |l| l.saturating_sub(HISTORY_LIMIT));
        let stored = self
            .ctx
            .store
            .read_from(&self.sid, from, usize::MAX)
            .await?;
        // Retries of these actions are recognised even after JetStream's duplicate window.
        journal.remember_client_msg_ids(&stored);
        Ok(stored
            .iter()
            .filter_map(|e| Event::from_json(&e.payload).ok())
            .collect())
    }

    /// The session's files: a first start has none; a takeover fences the previous owner's
    /// snapshot writes and restores the newest snapshot into this worker's folder (fetching
    /// only what differs from what it holds). Returns what the agent must be told, if
    /// anything (file changes after the snapshot were lost).
    async fn workspace(
        &self,
        fresh: bool,
        epoch: u64,
        history: &[Event],
    ) -> Result<(Snapshots, Option<String>), ClaimError> {
        let ctx = self.ctx;
        let owner = ctx.sandbox.as_ref().and_then(|s| s.owner());
        let place = Place::new(&ctx.args.workspace_root, &self.sid, owner);
        let max = ctx.args.workspace_max_mib.saturating_mul(1024 * 1024);
        let store = ctx.store.clone();
        if fresh {
            let snaps = Snapshots::fresh(store, self.sid.clone(), place, epoch, max);
            return Ok((snaps, None));
        }
        let (snaps, restored) =
            Snapshots::take_over(store, self.sid.clone(), place, epoch, max).await?;
        Ok((snaps, workspace::lost_changes_note(&restored, history)))
    }

    /// Should-run (the sweeper resumes it if we die) and status `running`, together.
    async fn publish_running(&self, journal: &Journal) -> Result<(), ClaimError> {
        let names = self.ctx.store.names();
        let (mut redis, mut redis2) = (self.ctx.redis.clone(), self.ctx.redis.clone());
        tokio::try_join!(
            ownership::mark_should_run(&mut redis, names, &self.uid, &self.sid),
            status::write(
                &mut redis2,
                names,
                &self.sid,
                status::Update {
                    state: Some(SessionState::Running),
                    agent_state: Some(AgentState::Loading.as_str()),
                    worker_id: Some(self.ctx.worker_id.as_str()),
                    last_event_id: journal.last_id(),
                    reason: Some(""),
                },
            )
        )?;
        Ok(())
    }

    /// The agent (CodeAct with an LLM, else echo; wrapped in a replay for `replay_json`
    /// conversations) and the controller around it.
    async fn controller(
        &self,
        meta: &ConversationMeta,
        history: Vec<Event>,
    ) -> Result<Controller, ClaimError> {
        let ctx = self.ctx;
        let runtime_cfg =
            RuntimeConfig::new(ctx.args.workspace_root.clone()).with_sandbox(ctx.sandbox.clone());
        let echo_chosen = ctx.args.agent.as_deref() == Some("echo");
        let agent = match (&ctx.llm, ctx.args.llm_config_for(meta.llm.as_ref())?) {
            (Some(registry), Some(cfg)) if !echo_chosen => {
                let llm = registry.get(&cfg)?;
                if let Some(m) = last_metrics(&history) {
                    // The conversation's spend so far, from the newest agent action.
                    llm.metrics().restore(m);
                }
                AgentImpl::CodeAct(Box::new(CodeAct {
                    llm,
                    notify: self.notifier(),
                    workspace: runtime_cfg.agent_workspace(&self.sid),
                    chat: crate::agent::Chat::default(),
                }))
            }
            _ => AgentImpl::Echo(Echo {
                faults: ctx.args.echo_faults,
            }),
        };
        // Memory recalls serve LLM agents only.
        let recalls = matches!(agent, AgentImpl::CodeAct(_));
        let agent = match &meta.replay_blob {
            None => agent,
            Some(name) => {
                let bytes = ctx.store.get_blob(name).await?;
                let trajectory = shared::event::load_trajectory(&bytes)?;
                let inner = match agent {
                    AgentImpl::Echo(_) => None,
                    other => Some(other),
                };
                AgentImpl::Replay(Box::new(
                    Replay::new(trajectory, &history, inner).map_err(ClaimError::Replay)?,
                ))
            }
        };
        Ok(Controller {
            agent,
            iterations: turn_iterations(&history),
            history,
            max_iterations: ctx.args.max_iterations,
            max_budget: ctx.args.max_budget_per_task,
            runtime: None,
            runtime_cfg,
            sid: self.sid.clone(),
            knowledge: Arc::clone(&ctx.knowledge),
            recalls,
        })
    }

    /// Publishes the agent's status updates on the session's live status subject.
    fn notifier(&self) -> Notify {
        let nats = self.ctx.nats.clone();
        let subject = self.ctx.store.names().status_subject(&self.sid);
        Arc::new(move |update: StatusUpdate| {
            let (nats, subject) = (nats.clone(), subject.clone());
            let payload = bytes::Bytes::from(update.to_json());
            // Status updates are live only: losing one is acceptable.
            tokio::spawn(async move {
                let _ = nats.publish(subject, payload).await;
            });
        })
    }

    /// Starts the session task; the slot is given back when it ends.
    fn spawn(
        self,
        ready: Ready,
        sessions: &TaskTracker,
        shutdown: CancellationToken,
        (lost, redis_lost): (CancellationToken, Arc<tokio::sync::Notify>),
        permit: OwnedSemaphorePermit,
    ) {
        let span = info_span!("session", session_id = %self.sid, user_id = %self.uid,
            worker_id = %self.ctx.worker_id, epoch = ready.epoch);
        let (feeds, sid, recheck) = (self.ctx.feeds.clone(), self.sid, ready.actions.recheck());
        feeds.insert(sid.clone(), Arc::clone(&recheck));
        sessions.spawn(
            async move {
                metrics::gauge!("oh_worker_sessions_active").increment(1.0);
                ready
                    .session
                    .run(ready.actions, ready.start, (lost, redis_lost), shutdown)
                    .await;
                feeds.remove(&sid, &recheck);
                metrics::gauge!("oh_worker_sessions_active").decrement(1.0);
                drop(permit);
            }
            .instrument(span),
        );
    }

    /// A failed claim lets go of what it took (all of it also expires by itself).
    async fn abandon(&self) {
        let mut redis = self.ctx.redis.clone();
        self.ctx.leases.remove(&self.sid).await;
        let _ = ownership::release(&mut redis, &self.lease).await; // expires by itself otherwise
        let names = self.ctx.store.names();
        if self.ctx.args.max_conversations_per_user.is_some() {
            let _ = ownership::release_user_slot(&mut redis, names, &self.uid, &self.sid).await; // expires too
        }
        // Nobody queued its resume: the sweeper finds it (at its periodic pass if this fails).
        let _ = ownership::request_sweep(&mut redis, names).await;
    }
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
