//! `AgentSession`: one task owns one session while this worker holds its lease.
//!
//! The task is a `select!` loop over a closed set of inputs ([`Input`]): a user action from
//! the session's action feed ([`ActionFeed`]), a step of the current turn finishing, lease
//! lost, worker shutdown, the passivation check (only after `OH_CLOSE_DELAY_S` quiet: an idle
//! session has no timer work), or Redis having lost its status. A turn is a chain of steps
//! (`controller`): think (the agent decides) and act (the runtime executes); each step runs as
//! a future that owns the controller, so user actions keep being read meanwhile: a message
//! joins the conversation, a stop or pause cancels the step at once.
//!
//! **Invariant (exactly once):** an action is dropped from the stream only after its events
//! are appended, and every event carries the sequence of the newest applied action
//! (`Oh-Applied-Action`). A new owner reads the stream from its start and skips, without
//! applying, any action at or below that mark.
//!
//! **Interrupted turns:** a new owner that finds the log's agent state `running` continues the
//! turn (a runnable action left without observation gets an error observation first). The
//! interruption count travels in the log (`Oh-Interrupts`) and is reset by every completed
//! step; at [`MAX_TURN_INTERRUPTS`] the turn ends in `error` instead, so an input that crashes
//! workers cannot crash-loop.
//!
//! **Workspace:** after every turn end (before the next input) and as the session ends (stop,
//! passivation, drain, full log; after its sandbox is gone) the workspace is snapshotted
//! ([`crate::workspace`]); a fenced snapshot ends the session as lost. A new owner tells the
//! agent which file changes its restore lacks.

use serde_json::Value;
use shared::event::{ActionView, AgentState, Event, RecallType, Source, UserAction};
use shared::id::{SessionId, UserId};
use shared::ownership::{self, Lease};
use shared::presence;
use shared::queue::{Action, ActionFeed, FeedError};
use shared::status::{self, SessionState};
use shared::store::ConversationMeta;
use shared::telemetry::TraceLink;
use shared::wire::{Control, HDR_CLIENT_MSG_ID, HDR_CONTROL, HDR_USER, StartReason, StartRequest};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::Ctx;
use crate::agent::StepError;
use crate::controller::{Busy, Controller, Step, is_runnable};
use crate::workspace::{SnapError, Snapshots};
use shared::journal::{AppendError, Journal};
use shared::snapshot::SnapshotError;

/// The interruption of a turn that ends it in `error` rather than continuing it.
pub(crate) const MAX_TURN_INTERRUPTS: u32 = 2;

/// `error_id` of the notices about the workspace's snapshots.
const WORKSPACE_ERROR: &str = "AGENT_ERROR$WORKSPACE_SNAPSHOT";

/// Longest a session's last snapshot may take (drain and stop wait for it).
const FINAL_SNAPSHOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// What the agent is told when a snapshot is refused for good (not a passing NATS failure).
fn refusal(e: &SnapError) -> Option<String> {
    const MIB: u64 = 1024 * 1024;
    match e {
        SnapError::TooLarge { bytes, limit } => Some(format!(
            "The workspace holds {} MiB of files, over the snapshot limit of {} MiB \
             (OH_WORKSPACE_MAX_MIB), so it was not saved.",
            bytes.div_ceil(MIB),
            limit / MIB
        )),
        SnapError::TooMany { entries, limit } => Some(format!(
            "The workspace holds {entries} files and folders, over the snapshot limit of \
             {limit}, so it was not saved."
        )),
        SnapError::Snapshot(SnapshotError::Store(s)) if s.is_storage_full() => Some(
            "The workspace could not be saved: the server's snapshot storage is full.".to_owned(),
        ),
        _ => None,
    }
}

pub(crate) struct AgentSession {
    pub(crate) ctx: Ctx,
    pub(crate) sid: SessionId,
    pub(crate) uid: UserId,
    pub(crate) meta: ConversationMeta,
    pub(crate) journal: Journal,
    pub(crate) lease: Lease,
    /// The controller while no step runs (`None` exactly while `turn` is `Some`).
    pub(crate) ctrl: Option<Controller>,
    pub(crate) agent_state: AgentState,
    turn: Option<Turn>,
    /// Events appended while a step ran; handed to the controller when it comes back.
    inbox: Vec<Event>,
    /// The runnable action whose observation is still due.
    pending: Option<Event>,
    /// Shutdown requested: finish the current step, then hand over.
    draining: bool,
    /// The status write (Redis) in flight. The session loop drives it beside the turn, so a
    /// step never waits for Redis; writes stay in order (one at a time).
    status_write: Option<futures::future::BoxFuture<'static, bool>>,
    /// A status write is due once the one in flight is done (`true`: a full rewrite).
    status_due: Option<bool>,
    /// The workspace's snapshots (set by the claim).
    pub(crate) snapshots: Option<Snapshots>,
    /// A turn ended: snapshot the workspace before the next input.
    snapshot_due: bool,
    /// Where the user action that started the current turn is in its trace: the turn's
    /// steps and the events they append belong to that trace.
    turn_trace: TraceLink,
    /// The agent was told that snapshots are refused (too large, store full); told again
    /// only after one succeeded.
    snapshot_refused: bool,
}

struct Turn {
    fut: Busy,
    cancel: CancellationToken,
}

/// How a session task starts.
pub(crate) struct Start {
    /// The log was empty: first start ever.
    pub(crate) fresh: bool,
    /// The previous owner died in the middle of a turn.
    pub(crate) interrupted: bool,
    /// User actions were already waiting.
    pub(crate) waiting: bool,
    /// What the agent must be told about its restored workspace (changes lost).
    pub(crate) workspace_note: Option<String>,
}

/// How long after it was handled an action is deleted from the stream: off the path of the
/// replies it caused (measured on `latency`: deleting at once cost ~0.15 ms per reply).
const DROP_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// What can happen to a session.
enum Input {
    Action(Box<Action>),
    StepDone(Box<(Controller, Step)>),
    LeaseLost,
    Shutdown,
    /// The status write in flight is done (`false`: it failed; the whole status is due).
    StatusWritten(bool),
    /// Quiet for `close_delay` (or a client was seen `watch_every` ago): does anyone still
    /// watch (passivation)?
    IdleCheck,
    /// Redis had lost the lease, so the status too: write all of it again.
    StatusLost,
}

/// How a session task ends.
enum End {
    /// Stopped on request or passivated: status `stopped`, lease released.
    Stopped,
    /// Worker shutting down: lease released, resume enqueued for another worker.
    Handover,
    /// Lease lost or fenced: touch nothing, another worker owns it.
    Lost,
    /// Could not append (NATS trouble): release and enqueue a resume.
    Failed,
    /// The event log is full: status `error` ([`crate::claim::FULL`]), lease released,
    /// nothing requeued; clients get a live error.
    Full,
}

impl AgentSession {
    pub(crate) fn new(
        ctx: Ctx,
        ids: (SessionId, UserId),
        meta: ConversationMeta,
        journal: Journal,
        lease: Lease,
        ctrl: Controller,
        agent_state: AgentState,
    ) -> Self {
        Self {
            ctx,
            sid: ids.0,
            uid: ids.1,
            meta,
            journal,
            lease,
            ctrl: Some(ctrl),
            agent_state,
            turn: None,
            inbox: Vec::new(),
            pending: None,
            draining: false,
            status_write: None,
            status_due: None,
            snapshots: None,
            snapshot_due: false,
            snapshot_refused: false,
            turn_trace: TraceLink::default(),
        }
    }

    pub(crate) async fn run(
        mut self,
        mut actions: ActionFeed,
        start: Start,
        (lost, redis_lost): (CancellationToken, std::sync::Arc<tokio::sync::Notify>),
        shutdown: CancellationToken,
    ) {
        use tokio::time::Instant;
        let close_delay = self.ctx.args.close_delay;
        // Passivation is looked at only once the session has been quiet for `close_delay` (no
        // timer work while it is busy or idle for less); a watched one is looked at again
        // every `watch_every`. Quiet time counts from the last action, step, or check that
        // found a client.
        let watch_every = (close_delay / 4).clamp(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(60),
        );
        let far = std::time::Duration::from_secs(365 * 24 * 3600);
        let idle_check = tokio::time::sleep(if close_delay.is_zero() {
            far
        } else {
            close_delay
        });
        tokio::pin!(idle_check);
        let mut quiet_since = Instant::now();
        let mut was_watched = false;
        let mut shutdown_seen = false;
        let started = std::time::Instant::now();
        let first = self.start(start).await;
        metrics::histogram!("oh_worker_claim_phase_seconds", "phase" => "first_events")
            .record(started.elapsed());
        let end = match first {
            Err(e) => self.on_append_error(e),
            Ok(()) => loop {
                // Cancel-safety: `lost`/`shutdown` are tokens; `actions.next()` is cancel-safe
                // (nothing is taken until it returns); the step future is kept in `self.turn`
                // and polled again next time.
                let turn = &mut self.turn;
                let status_write = &mut self.status_write;
                let input = tokio::select! {
                    biased;
                    () = lost.cancelled() => Input::LeaseLost,
                    () = shutdown.cancelled(), if !shutdown_seen => Input::Shutdown,
                    out = async {
                        match turn.as_mut() {
                            Some(t) => (&mut t.fut).await,
                            None => std::future::pending().await,
                        }
                    } => Input::StepDone(Box::new(out)),
                    ok = async {
                        match status_write.as_mut() {
                            Some(w) => w.await,
                            None => std::future::pending().await,
                        }
                    } => Input::StatusWritten(ok),
                    () = &mut idle_check, if !close_delay.is_zero() => Input::IdleCheck,
                    () = redis_lost.notified() => Input::StatusLost,
                    m = actions.next(), if !self.draining => match m {
                        Ok(a) => Input::Action(Box::new(a)),
                        Err(FeedError::Read(e)) => {
                            warn!(error = %e, "reading actions failed");
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            continue;
                        }
                        Err(FeedError::Ended) => {
                            warn!("action feed ended");
                            break End::Failed;
                        }
                    },
                };
                match input {
                    Input::LeaseLost => break End::Lost,
                    Input::StatusWritten(ok) => {
                        self.status_write = None;
                        if !ok {
                            self.queue_status_write(true);
                        }
                        self.next_status_write();
                    }
                    Input::Shutdown => {
                        shutdown_seen = true;
                        self.draining = true;
                        if self.turn.is_none() {
                            break End::Handover;
                        }
                        info!("draining: finishing the current step before handing over");
                    }
                    Input::StatusLost => self.publish_full_status(),
                    Input::StepDone(out) => {
                        self.turn = None;
                        let (ctrl, step) = *out;
                        quiet_since = Instant::now();
                        idle_check.as_mut().reset(quiet_since + close_delay);
                        let span = info_span!("record_step");
                        self.turn_trace.adopt(&span);
                        match self.on_step(ctrl, step).instrument(span).await {
                            Ok(()) => {}
                            Err(e) => break self.on_append_error(e),
                        }
                        if self.draining && self.turn.is_some() {
                            // At a step boundary: stop here, the next owner continues.
                            if let Some(t) = self.turn.take() {
                                t.cancel.cancel();
                            }
                            break End::Handover;
                        }
                        if self.draining {
                            break End::Handover;
                        }
                    }
                    Input::IdleCheck => {
                        let now = Instant::now();
                        if self.turn.is_some() || self.agent_state == AgentState::Running {
                            quiet_since = now;
                            idle_check.as_mut().reset(now + close_delay);
                        } else if self.watched().await {
                            was_watched = true;
                            quiet_since = now;
                            idle_check.as_mut().reset(now + watch_every);
                        } else if std::mem::take(&mut was_watched) {
                            // The client left since the last check: quiet from now on (never
                            // early, at most `watch_every` late).
                            quiet_since = now;
                            idle_check.as_mut().reset(now + close_delay);
                        } else if now.duration_since(quiet_since) >= close_delay {
                            info!(
                                idle_s = now.duration_since(quiet_since).as_secs(),
                                "no client and agent idle; passivating"
                            );
                            metrics::counter!("oh_worker_passivations_total").increment(1);
                            if let Err(e) = self.set_state(AgentState::Stopped, "").await {
                                break self.on_append_error(e);
                            }
                            break End::Stopped;
                        } else {
                            idle_check.as_mut().reset(quiet_since + close_delay);
                        }
                    }
                    Input::Action(msg) => {
                        quiet_since = Instant::now();
                        idle_check.as_mut().reset(quiet_since + close_delay);
                        // The gateway's trace of this action continues here (and in the
                        // turn it starts, and on the events they append).
                        let span = info_span!("apply_action");
                        shared::telemetry::continue_trace(&span, Some(&msg.headers));
                        match self.on_action(*msg).instrument(span).await {
                            Ok(None) => {}
                            Ok(Some(end)) => break end,
                            Err(e) => break self.on_append_error(e),
                        }
                    }
                }
                if self.snapshot_due
                    && self.turn.is_none()
                    && let Some(end) = self.turn_end_snapshot().await
                {
                    break end;
                }
            },
        };
        if let Some(t) = self.turn.take() {
            // Ending with a step in flight (lease lost, fenced): stop it; nothing is appended.
            t.cancel.cancel();
            let (ctrl, _) = t.fut.await;
            self.ctrl = Some(ctrl);
        }
        // The runtime goes with the session: every process of it is killed.
        if let Some(rt) = self.ctrl.as_mut().and_then(|c| c.runtime.as_mut()) {
            rt.close().await;
        }
        let end = match end {
            // The files as the session leaves them, for whichever worker runs it next. Not
            // after a failed append (NATS trouble): the handback must not wait for timeouts,
            // and the next owner tells the agent what the last turn-end snapshot lacks.
            End::Stopped | End::Handover | End::Full => self.final_snapshot(end).await,
            other => other,
        };
        self.finish(end).await;
    }

    /// Appends an event and records it in the conversation the controller sees.
    async fn append(&mut self, ev: Event) -> Result<Event, AppendError> {
        let stored = self.journal.append(ev).await?;
        match self.ctrl.as_mut() {
            Some(c) => c.history.push(stored.clone()),
            None => self.inbox.push(stored.clone()),
        }
        Ok(stored)
    }

    /// Lifecycle events after the takeover record: the `system` event on first start; an
    /// interrupted turn is continued (or ends in `error` if interrupted too often); otherwise
    /// `awaiting_user_input` unless user actions are already waiting.
    async fn start(&mut self, start: Start) -> Result<(), AppendError> {
        let Start {
            fresh,
            interrupted,
            waiting,
            workspace_note,
        } = start;
        if interrupted {
            let n = self.journal.interrupts() + 1;
            metrics::counter!("oh_worker_interrupted_turns_total").increment(1);
            if let Some(action) = self.unanswered_action() {
                let mut obs = Event::error_observation(
                    "The worker running this action stopped before it finished; its result is \
                     unknown and it was not run again.",
                    "AGENT_ERROR$ERROR_ACTION_NOT_EXECUTED_ERROR",
                );
                obs.cause = action.id.and_then(|i| i64::try_from(i).ok());
                self.append(obs).await?;
            }
            // After the interrupted call's answer, so the model sees the call answered first.
            self.tell_workspace(workspace_note).await?;
            if n >= MAX_TURN_INTERRUPTS {
                warn!(
                    interrupts = n,
                    "turn interrupted too often; ending it in error"
                );
                self.append(Event::error_observation(
                    format!(
                        "The agent's turn was interrupted {n} times (its worker stopped each \
                         time); it was not retried again. Send a message to continue."
                    ),
                    "AGENT_ERROR$ERROR_ACTION_NOT_EXECUTED_ERROR",
                ))
                .await?;
                self.end_turn_error(&format!(
                    "interrupted {n} times: the worker running this turn stopped each time"
                ))
                .await?;
            } else {
                warn!(
                    interrupts = n,
                    "previous owner stopped mid-turn; continuing the turn"
                );
                self.journal.set_interrupts(n);
                self.set_state(AgentState::Running, "").await?;
                self.schedule_think();
            }
            self.publish_status();
            return Ok(());
        }
        self.tell_workspace(workspace_note).await?;
        if fresh {
            let (prompt, tools, class) = match self.ctrl.as_ref() {
                Some(c) => (c.agent.system_prompt(), c.agent.tools(), c.agent.class()),
                None => (String::new(), None, "unknown"),
            };
            let mut sys = Event::system(prompt, tools, class, env!("CARGO_PKG_VERSION"));
            sys.source = Some(Source::Agent);
            self.append(sys).await?;
        }
        if let Some(initial) = self.ctrl.as_mut().and_then(|c| c.agent.take_initial()) {
            // A replay conversation starts with the trajectory's first user message.
            self.journal.note_state(AgentState::Running.as_str());
            self.append(initial).await?;
            self.set_state(AgentState::Running, "").await?;
            self.schedule_think();
            self.publish_status();
            return Ok(());
        }
        if !waiting {
            self.append(Event::change_agent_state(AgentState::AwaitingUserInput))
                .await?;
            self.set_state(AgentState::AwaitingUserInput, "").await?;
        }
        self.publish_status();
        Ok(())
    }

    /// A session that started with actions waiting stays `loading` until one starts a turn;
    /// one that started none (a control, a redelivery) leaves it for `awaiting_user_input`.
    async fn leave_loading(&mut self) -> Result<(), AppendError> {
        if self.agent_state == AgentState::Loading && self.turn.is_none() {
            self.append(Event::change_agent_state(AgentState::AwaitingUserInput))
                .await?;
            self.set_state(AgentState::AwaitingUserInput, "").await?;
        }
        Ok(())
    }

    /// The newest runnable action in the conversation that has no observation yet.
    fn unanswered_action(&self) -> Option<Event> {
        let history = &self.ctrl.as_ref()?.history;
        let action = history.iter().rev().find(|e| is_runnable(e))?;
        let id = i64::try_from(action.id?).ok()?;
        let answered = history
            .iter()
            .any(|e| e.cause == Some(id) && e.observation_type().is_some());
        (!answered).then(|| action.clone())
    }

    fn schedule_think(&mut self) {
        let Some(ctrl) = self.ctrl.take() else {
            return; // a step already runs
        };
        let cancel = CancellationToken::new();
        let span = info_span!("agent_step", kind = "think");
        self.turn_trace.adopt(&span);
        self.turn = Some(Turn {
            fut: Box::pin(ctrl.think(cancel.clone()).instrument(span)),
            cancel,
        });
    }

    fn schedule_act(&mut self, action: Event) {
        let Some(ctrl) = self.ctrl.take() else {
            return;
        };
        let cancel = CancellationToken::new();
        let span = info_span!("agent_step", kind = "act");
        self.turn_trace.adopt(&span);
        self.turn = Some(Turn {
            fut: Box::pin(ctrl.act(action, cancel.clone()).instrument(span)),
            cancel,
        });
    }

    /// Cancels the running step (if any) and waits for it to hand the controller back; the
    /// pending action gets an error observation.
    async fn interrupt_turn(&mut self) -> Result<(), AppendError> {
        if let Some(t) = self.turn.take() {
            t.cancel.cancel();
            let (mut ctrl, _) = t.fut.await;
            ctrl.history.append(&mut self.inbox);
            self.ctrl = Some(ctrl);
        }
        if let Some(action) = self.pending.take() {
            let mut obs = Event::error_observation(
                "Stop button pressed. The action has not been executed.",
                "AGENT_ERROR$ERROR_ACTION_NOT_EXECUTED_STOPPED",
            );
            obs.cause = action.id.and_then(|i| i64::try_from(i).ok());
            self.append(obs).await?;
        }
        Ok(())
    }

    async fn on_step(&mut self, mut ctrl: Controller, step: Step) -> Result<(), AppendError> {
        ctrl.history.append(&mut self.inbox);
        self.ctrl = Some(ctrl);
        match step {
            Step::Think(Err(StepError::Cancelled)) => {}
            Step::Think(Err(StepError::Failed { reason })) => {
                warn!(reason, "agent step failed");
                self.end_turn_error(&reason).await?;
            }
            Step::Think(Ok(events)) => {
                let mut last = None;
                for ev in events {
                    last = Some(self.append(ev).await?);
                }
                match last {
                    None => self.end_turn(AgentState::AwaitingUserInput).await?,
                    Some(ev) if ev.action_type() == Some("finish") => {
                        self.end_turn(AgentState::Finished).await?;
                    }
                    Some(ev) if ev.action_type() == Some("reject") => {
                        self.end_turn(AgentState::Rejected).await?;
                    }
                    Some(ev)
                        if ev.source == Some(Source::Agent)
                            && matches!(
                                ev.action(),
                                Some(ActionView::Message {
                                    wait_for_response: true,
                                    ..
                                })
                            ) =>
                    {
                        self.end_turn(AgentState::AwaitingUserInput).await?;
                    }
                    Some(ev) if is_runnable(&ev) => {
                        self.pending = Some(ev.clone());
                        self.schedule_act(ev);
                    }
                    Some(_) => self.step_done().await?,
                }
            }
            Step::Acted(observations) => {
                for obs in observations {
                    self.append(obs).await?;
                }
                self.pending = None;
                self.step_done().await?;
            }
        }
        self.publish_status();
        Ok(())
    }

    /// A step completed: count it, then think again (or stop at the iteration limit).
    async fn step_done(&mut self) -> Result<(), AppendError> {
        self.journal.set_interrupts(0);
        let Some(ctrl) = self.ctrl.as_mut() else {
            return Ok(());
        };
        ctrl.iterations += 1;
        if let Some((spent, max)) = ctrl.over_budget() {
            return self
                .end_turn_error(&format!(
                    "RuntimeError: Agent reached maximum budget for conversation. Current \
                     budget: {spent:.4}, max budget: {max:.4}"
                ))
                .await;
        }
        if ctrl.iterations >= ctrl.max_iterations {
            let max = ctrl.max_iterations;
            return self
                .end_turn_error(&format!(
                    "RuntimeError: Agent reached maximum iteration in this turn. Current \
                     iteration: {max}, max iteration: {max}"
                ))
                .await;
        }
        self.schedule_think();
        Ok(())
    }

    async fn end_turn(&mut self, state: AgentState) -> Result<(), AppendError> {
        self.journal.set_interrupts(0);
        if let Some(c) = self.ctrl.as_mut() {
            c.iterations = 0;
        }
        self.set_state(state, "").await
    }

    async fn end_turn_error(&mut self, reason: &str) -> Result<(), AppendError> {
        self.journal.set_interrupts(0);
        if let Some(c) = self.ctrl.as_mut() {
            c.iterations = 0;
        }
        self.set_state(AgentState::Error, reason).await
    }

    /// Drops a handled action (applied, skipped or refused) from the stream, off the
    /// session's path. A drop that fails is harmless: the worker's recheck finds it stored
    /// and it comes back as a repeat, and the applied-action mark keeps anyone from applying
    /// it twice.
    fn drop_handled(&self, seq: u64) {
        let (store, sid) = (self.ctx.store.clone(), self.sid.clone());
        tokio::spawn(async move {
            // Later, not beside the appends of the reply this action just caused.
            tokio::time::sleep(DROP_AFTER).await;
            if let Err(e) = store.drop_action(seq).await {
                warn!(session_id = %sid, error = %e, "handled action not dropped");
            }
        });
    }

    async fn on_action(&mut self, msg: Action) -> Result<Option<End>, AppendError> {
        let seq = msg.seq;
        // From the gateway's publish to this owner (clocks of the gateway and this host).
        let waited = msg.waited();
        metrics::histogram!("oh_worker_action_wait_seconds").record(waited);
        let via = if msg.republished { "republish" } else { "read" };
        metrics::counter!("oh_worker_actions_taken_total", "via" => via).increment(1);
        if waited > std::time::Duration::from_secs(2) {
            warn!(
                seq,
                via,
                waited_ms = waited.as_millis(),
                "action reached its owner late"
            );
        }
        let headers = msg.headers.clone();
        let sender = headers.get(HDR_USER).map(|v| v.as_str());
        if sender != Some(self.uid.as_str()) {
            // Only the conversation's owner acts on it: an action naming another user (or
            // none) did not come from a gateway acting for the owner. Dropped, not recorded,
            // so a foreign publisher cannot write into the conversation either.
            warn!(
                seq,
                sender, "action not from the conversation's owner; dropped"
            );
            metrics::counter!("oh_worker_foreign_actions_total").increment(1);
            self.drop_handled(seq);
            return Ok(None);
        }
        if msg.renumbered {
            warn!(
                seq,
                applied = self.journal.applied_action(),
                "the actions stream numbered this action anew (NATS lost writes it had \
                 acknowledged); applying it"
            );
        } else if seq <= self.journal.applied_action() {
            // Applied (a stop, a start too) by an earlier owner, or here, and not yet dropped:
            // don't apply twice.
            info!(seq, "action already applied; dropping it");
            self.leave_loading().await?;
            self.drop_handled(seq);
            return Ok(None);
        }
        if let Some(ctl) = headers.get(HDR_CONTROL) {
            match Control::parse(ctl.as_str()) {
                Some(Control::Stop) => {
                    self.journal.mark_applied(seq);
                    self.interrupt_turn().await?;
                    if self.agent_state != AgentState::Stopped {
                        self.set_state(AgentState::Stopped, "").await?;
                    }
                    // Dropped before the session ends (bounded: NATS may be away), so a start
                    // right after does not find it again; `finish` looks for actions after it
                    // (its sequence is the mark).
                    let drop = self.ctx.store.drop_action(seq);
                    match tokio::time::timeout(std::time::Duration::from_secs(2), drop).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %e, "stop not dropped"),
                        Err(_) => warn!("stop not dropped within 2 s"),
                    }
                    return Ok(Some(End::Stopped));
                }
                Some(Control::Start) => {
                    // Running already (a start that found it only loading lets it wait).
                    self.journal.mark_applied(seq);
                    self.leave_loading().await?;
                    self.drop_handled(seq);
                    return Ok(None);
                }
                None => {
                    warn!(control = ctl.as_str(), "unknown control request; ignored");
                    self.drop_handled(seq);
                    return Ok(None);
                }
            }
        }
        let client_msg_id = headers
            .get(HDR_CLIENT_MSG_ID)
            .map(|v| v.as_str().to_owned());
        if let Some(cid) = &client_msg_id
            && self.journal.applied_client_msg_id(cid)
        {
            // A client's retry stored again after JetStream's duplicate window (a long outage
            // ate the first answer): the log says it was applied.
            info!(
                seq,
                client_msg_id = cid.as_str(),
                "action already applied (client msg id); dropping the retry"
            );
            metrics::counter!("oh_worker_duplicate_actions_total").increment(1);
            self.journal.mark_applied(seq);
            self.leave_loading().await?;
            self.drop_handled(seq);
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let payload = match self.ctx.store.unpack(&headers, msg.payload.clone()).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "action payload unreadable");
                self.journal.mark_applied(seq);
                self.append(Event::error_observation(
                    format!("Your action could not be read: {e}"),
                    "",
                ))
                .await?;
                self.drop_handled(seq);
                return Ok(None);
            }
        };
        let parsed = serde_json::from_slice::<Value>(&payload)
            .map_err(|e| e.to_string())
            .and_then(|v| UserAction::parse(&v).map_err(|e| e.to_string()));
        self.journal.mark_applied(seq);
        match parsed {
            Err(reason) => {
                // The gateway validates first; this is a second line for foreign publishers.
                warn!(seq, reason, "invalid action in the action stream");
                self.append(Event::error_observation(
                    format!("Invalid action: {reason}"),
                    "",
                ))
                .await?;
            }
            Ok(action) => {
                if let Some(cid) = &client_msg_id {
                    // The user event (apply's first append) records it.
                    self.journal.tag_next(cid);
                }
                self.apply(action).await?
            }
        }
        self.drop_handled(seq);
        if let Err(e) = self.ctx.store.delete_payload_blob(&headers).await {
            warn!(error = %e, "applied action's blob not deleted");
        }
        self.publish_status();
        metrics::histogram!("oh_worker_action_apply_seconds").record(started.elapsed());
        Ok(None)
    }

    async fn apply(&mut self, action: UserAction) -> Result<(), AppendError> {
        let is_message = action.as_message().is_some();
        let new_state = action.as_change_agent_state();
        if is_message {
            // From here on a crash reads as an interrupted turn to the next owner.
            self.journal.note_state(AgentState::Running.as_str());
        }
        let query = action.as_message().map(str::to_owned);
        self.append(action.into_event(0, String::new())).await?;
        if let Some(query) = query {
            self.recall(&query).await?;
        }
        if is_message {
            if self.agent_state != AgentState::Running {
                self.set_state(AgentState::Running, "").await?;
            }
            if self.turn.is_none() {
                if let Some(c) = self.ctrl.as_mut() {
                    c.iterations = 0;
                }
                // This message starts a turn: its trace (apply_action's span) is the turn's.
                self.turn_trace = TraceLink::current();
                self.schedule_think();
            }
        } else if let Some(state) = new_state {
            match state {
                AgentState::Stopped | AgentState::Paused | AgentState::Error => {
                    self.interrupt_turn().await?;
                    if state != self.agent_state {
                        self.set_state(state, "").await?;
                    }
                }
                s if s != self.agent_state => self.set_state(s, "").await?,
                _ => {}
            }
        }
        Ok(())
    }

    /// OpenHands' recall after a user message (LLM agents): a `recall` action (source user)
    /// answered by a `recall` observation, or a `null` one when nothing was found.
    async fn recall(&mut self, query: &str) -> Result<(), AppendError> {
        let Some(ctrl) = self.ctrl.as_ref().filter(|c| c.recalls) else {
            return Ok(());
        };
        let first = !ctrl
            .history
            .iter()
            .any(|e| e.action_type() == Some("recall"));
        let extras = crate::memory::recall(
            &ctrl.workspace(),
            &ctrl.knowledge,
            query,
            first,
            self.meta.conversation_instructions.as_deref(),
        );
        let recall_type = if first {
            RecallType::WorkspaceContext
        } else {
            RecallType::Knowledge
        };
        let action = self.append(Event::recall(query, recall_type)).await?;
        let mut obs = match extras {
            Some(found) => Event::recall_observation(&found),
            None => Event::null_observation(),
        };
        obs.set_cause(action.id);
        self.append(obs).await?;
        Ok(())
    }

    async fn set_state(&mut self, state: AgentState, reason: &str) -> Result<(), AppendError> {
        self.append(Event::agent_state_changed(state.clone(), reason))
            .await?;
        if !matches!(state, AgentState::Running | AgentState::Loading) {
            // A turn ended (or never started): the files are as the agent left them.
            self.snapshot_due = true;
        }
        self.agent_state = state;
        // Redis' status follows every change of state (there is no periodic refresh).
        self.publish_status();
        Ok(())
    }

    /// Tells the agent (an error observation it sees) what happened to its files on the way
    /// to this worker.
    async fn tell_workspace(&mut self, note: Option<String>) -> Result<(), AppendError> {
        if let Some(note) = note {
            warn!(note, "workspace changes lost in the move");
            self.append(Event::error_observation(note, WORKSPACE_ERROR))
                .await?;
        }
        Ok(())
    }

    /// The snapshot at a turn end. `Some` if the session must end (fenced).
    async fn turn_end_snapshot(&mut self) -> Option<End> {
        self.snapshot_due = false;
        let event_id = self.journal.last_id();
        let res = self.snapshots.as_mut()?.snapshot(event_id).await;
        match res {
            Ok(_) => {
                self.snapshot_refused = false;
                None
            }
            Err(SnapError::Snapshot(SnapshotError::Fenced { .. })) => {
                warn!("snapshot fenced: another worker took over; stopping here");
                metrics::counter!("oh_worker_fenced_total").increment(1);
                Some(End::Lost)
            }
            Err(e) => {
                let Some(why) = refusal(&e) else {
                    // NATS trouble: the previous snapshot stands; the next turn end retries.
                    warn!(error = %e, "workspace snapshot failed");
                    return None;
                };
                warn!(error = %e, "workspace snapshot refused");
                if self.snapshot_refused {
                    return None;
                }
                self.snapshot_refused = true;
                let at = self
                    .snapshots
                    .as_ref()
                    .and_then(|s| s.head().event_id)
                    .map_or_else(|| "none yet".to_owned(), |id| format!("event {id}"));
                let note = format!(
                    "{why} Until then this conversation's files do not follow it to another \
                     worker: if it moves, the workspace is restored from the last snapshot \
                     ({at}). Remove files you do not need (build outputs, downloads, caches) \
                     to have them saved again."
                );
                match self
                    .append(Event::error_observation(note, WORKSPACE_ERROR))
                    .await
                {
                    Ok(_) => {
                        self.publish_status();
                        None
                    }
                    Err(e) => Some(self.on_append_error(e)),
                }
            }
        }
    }

    /// The snapshot as the session ends (stop, passivation, drain, failure), bounded in time
    /// (a drain must finish). Fenced: the session was lost after all.
    async fn final_snapshot(&mut self, end: End) -> End {
        let event_id = self.journal.last_id();
        let Some(snaps) = self.snapshots.as_mut() else {
            return end;
        };
        match tokio::time::timeout(FINAL_SNAPSHOT_TIMEOUT, snaps.snapshot(event_id)).await {
            Ok(Ok(_)) => end,
            Ok(Err(SnapError::Snapshot(SnapshotError::Fenced { .. }))) => {
                warn!("snapshot fenced: another worker took over");
                metrics::counter!("oh_worker_fenced_total").increment(1);
                End::Lost
            }
            Ok(Err(e)) => {
                warn!(error = %e, "workspace snapshot at the end of the session failed; the previous one stands");
                end
            }
            Err(_) => {
                warn!(
                    "workspace snapshot at the end of the session timed out; the previous one stands"
                );
                end
            }
        }
    }

    /// Queues a status write (agent state, last event id); see `status_write`.
    fn publish_status(&mut self) {
        self.queue_status_write(false);
    }

    /// True if some gateway has a client connected to this session (presence entries that
    /// have not expired).
    async fn watched(&mut self) -> bool {
        let mut conn = self.ctx.redis.clone();
        let res = presence::is_watched(&mut conn, self.ctx.store.names(), &self.sid).await;
        match res {
            Ok(watched) => watched,
            Err(e) => {
                // Unknown: keep the session rather than passivate on a Redis hiccup.
                warn!(error = %e, "presence check failed");
                true
            }
        }
    }

    /// Queues a rewrite of every field of the status hash (it may have been lost with Redis).
    fn publish_full_status(&mut self) {
        self.queue_status_write(true);
    }

    fn queue_status_write(&mut self, full: bool) {
        self.status_due = Some(full || self.status_due == Some(true));
        self.next_status_write();
    }

    /// Starts the due status write if none is in flight. It reads the state now: a write
    /// queued while another was in flight carries the newest state when it starts.
    fn next_status_write(&mut self) {
        if self.status_write.is_some() {
            return;
        }
        let Some(full) = self.status_due.take() else {
            return;
        };
        let mut redis = self.ctx.redis.clone();
        let names = self.ctx.store.names().clone();
        let sid = self.sid.clone();
        let worker_id = self.ctx.worker_id.to_string();
        let agent_state = self.agent_state.as_str().to_owned();
        let last_event_id = self.journal.last_id();
        self.status_write = Some(Box::pin(async move {
            let res = status::write(
                &mut redis,
                &names,
                &sid,
                status::Update {
                    state: full.then_some(SessionState::Running),
                    worker_id: full.then_some(worker_id.as_str()),
                    agent_state: Some(&agent_state),
                    last_event_id,
                    reason: None,
                },
            )
            .await;
            match res {
                Ok(()) => true,
                Err(e) => {
                    // Written again in full, after a pause (Redis away: once a second).
                    warn!(error = %e, "status update failed");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    false
                }
            }
        }));
    }

    fn on_append_error(&self, e: AppendError) -> End {
        match e {
            AppendError::Fenced { .. } => {
                warn!(error = %e, "fenced: another worker took over; stopping here");
                metrics::counter!("oh_worker_fenced_total").increment(1);
                End::Lost
            }
            AppendError::Full { .. } => End::Full,
            other => {
                warn!(error = %other, "append failed; handing the session back");
                End::Failed
            }
        }
    }

    /// After a stop: a message or `/start` that reached the action stream while the lease was
    /// still held (so its gateway queued no start) starts the session again. Checked after the
    /// lease is released; anything later finds no owner and queues a start itself.
    async fn restart_if_asked(&mut self, redis: &mut redis::aio::ConnectionManager) {
        match self
            .ctx
            .store
            .next_action(&self.sid, self.journal.applied_action())
            .await
        {
            Ok(None) => {}
            Ok(Some(next)) => {
                info!(
                    seq = next.seq,
                    "actions arrived during the stop; starting again"
                );
                let req = StartRequest::new(&self.sid, &self.uid, StartReason::Start);
                match self.ctx.store.enqueue_start(&req).await {
                    Ok(_) => {
                        let names = self.ctx.store.names();
                        let queued = status::Update {
                            state: Some(SessionState::Queued),
                            ..Default::default()
                        };
                        if let Err(e) = status::write(redis, names, &self.sid, queued).await {
                            warn!(error = %e, "status update failed");
                        }
                    }
                    Err(e) => warn!(error = %e, "start request after the stop not confirmed"),
                }
            }
            Err(e) => warn!(error = %e, "actions after the stop not counted"),
        }
    }

    async fn finish(mut self, end: End) {
        // The last write in flight lands before the final one below; a session that is no
        // longer ours writes nothing more (the new owner's status stands).
        if let Some(w) = self.status_write.take()
            && !matches!(end, End::Lost)
        {
            w.await;
        }
        let names = self.ctx.store.names();
        let mut redis = self.ctx.redis.clone();
        self.ctx.leases.remove(&self.sid).await;
        if matches!(end, End::Lost) {
            return;
        }
        if let Err(e) = ownership::release(&mut redis, &self.lease).await {
            warn!(error = %e, "lease release failed; it will expire");
        }
        let slots = async {
            if self.ctx.args.max_conversations_per_user.is_some() {
                ownership::release_user_slot(&mut redis.clone(), names, &self.uid, &self.sid)
                    .await?;
            }
            if matches!(end, End::Stopped) {
                ownership::unmark_should_run(&mut redis.clone(), names, &self.uid, &self.sid)
                    .await?;
            }
            if matches!(end, End::Full) {
                crate::claim::mark_full(&self.ctx, &self.sid, &self.uid).await?;
            }
            redis::RedisResult::Ok(())
        };
        if let Err(e) = slots.await {
            warn!(error = %e, "releasing the user slot failed; it will expire");
        }
        if matches!(end, End::Full) {
            // `mark_full` wrote the status.
            info!(end = "full", title = %self.meta.title, "session ended");
            return;
        }
        let state = match end {
            End::Stopped => SessionState::Stopped,
            _ => SessionState::Queued,
        };
        let res = status::write(
            &mut redis,
            names,
            &self.sid,
            status::Update {
                state: Some(state),
                worker_id: Some(""),
                agent_state: Some(self.agent_state.as_str()),
                last_event_id: self.journal.last_id(),
                ..Default::default()
            },
        )
        .await;
        if let Err(e) = res {
            warn!(error = %e, "status update failed");
        }
        if matches!(end, End::Handover | End::Failed) {
            let req = StartRequest::new(&self.sid, &self.uid, StartReason::Resume);
            if let Err(e) = self.ctx.store.enqueue_start(&req).await {
                warn!(error = %e, "resume request not confirmed; asking the sweeper");
                let _ = ownership::request_sweep(&mut redis, self.ctx.store.names()).await;
            }
        }
        if matches!(end, End::Stopped) {
            self.restart_if_asked(&mut redis).await;
        }
        info!(
            end = match end {
                End::Stopped => "stopped",
                End::Handover => "handed over",
                End::Failed => "failed",
                End::Lost => "lost",
                End::Full => "full",
            },
            title = %self.meta.title,
            "session ended"
        );
    }
}
