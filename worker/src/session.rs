//! `AgentSession`: one task owns one session while this worker holds its lease.
//!
//! The task is a `select!` loop over a closed set of inputs ([`Input`]): a user action from the
//! session's durable action consumer, lease lost, or worker shutdown. Every input is handled to
//! completion before the next is taken, so events of one turn are contiguous.
//!
//! **Invariant (exactly once):** an action is acked only after all its events are appended, and
//! every event carries the sequence of the newest applied action (`Oh-Applied-Action`). A new
//! owner reads that from the last event and acks, without applying, any redelivered action at
//! or below it.

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use serde_json::Value;
use shared::event::{AgentState, Event, UserAction};
use shared::id::{SessionId, UserId};
use shared::ownership::{self, Lease};
use shared::status::{self, SessionState};
use shared::store::ConversationMeta;
use shared::wire::{Control, HDR_CONTROL, StartReason, StartRequest};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Ctx;
use crate::agent::Agent;
use shared::journal::{AppendError, Journal};

pub(crate) struct AgentSession<A: Agent> {
    pub(crate) ctx: Ctx,
    pub(crate) sid: SessionId,
    pub(crate) uid: UserId,
    pub(crate) meta: ConversationMeta,
    pub(crate) journal: Journal,
    pub(crate) lease: Lease,
    pub(crate) agent: A,
    pub(crate) agent_state: AgentState,
}

/// How a session task starts.
pub(crate) struct Start {
    /// The log was empty: first start ever.
    pub(crate) fresh: bool,
    /// The previous owner died in the middle of a turn.
    pub(crate) interrupted: bool,
    /// User actions already waiting.
    pub(crate) pending: u64,
}

/// What can happen to a session.
enum Input {
    Action(Box<jetstream::Message>),
    LeaseLost,
    Shutdown,
    /// Time to check whether anyone still watches (passivation).
    IdleCheck,
}

/// How a session task ends.
enum End {
    /// Stopped on request: status `stopped`, lease released.
    Stopped,
    /// Worker shutting down: lease released, resume enqueued for another worker.
    Handover,
    /// Lease lost or fenced: touch nothing, another worker owns it.
    Lost,
    /// Could not append (NATS trouble): release and enqueue a resume.
    Failed,
}

impl<A: Agent> AgentSession<A> {
    pub(crate) async fn run(
        mut self,
        mut actions: pull::Stream,
        start: Start,
        lost: CancellationToken,
        shutdown: CancellationToken,
    ) {
        let close_delay = self.ctx.args.close_delay;
        // The same tick refreshes the status hash, so it follows reality within a lease
        // period even after Redis lost it.
        let check_every = if close_delay.is_zero() {
            self.ctx.args.lease_ttl
        } else {
            (close_delay / 4).min(self.ctx.args.lease_ttl)
        }
        .clamp(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(5),
        );
        let mut idle_tick = tokio::time::interval(check_every);
        idle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_activity = std::time::Instant::now();
        let end = match self.start(start).await {
            Err(e) => self.on_append_error(e),
            Ok(()) => loop {
                // Cancel-safety: `lost`/`shutdown` are tokens; `actions.next()` is cancel-safe
                // (a message not yet returned stays in the consumer and is redelivered).
                let input = tokio::select! {
                    biased;
                    () = lost.cancelled() => Input::LeaseLost,
                    () = shutdown.cancelled() => Input::Shutdown,
                    _ = idle_tick.tick() => Input::IdleCheck,
                    m = actions.next() => match m {
                        Some(Ok(m)) => Input::Action(Box::new(m)),
                        Some(Err(e)) => {
                            warn!(error = %e, "action consumer error");
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            continue;
                        }
                        None => {
                            warn!("action consumer ended");
                            break End::Failed;
                        }
                    },
                };
                match input {
                    Input::LeaseLost => break End::Lost,
                    Input::Shutdown => break End::Handover,
                    Input::IdleCheck => {
                        self.publish_full_status().await;
                        if close_delay.is_zero() {
                            continue;
                        }
                        if self.agent_state == AgentState::Running || self.watched().await {
                            last_activity = std::time::Instant::now();
                        } else if last_activity.elapsed() >= close_delay {
                            info!(
                                idle_s = last_activity.elapsed().as_secs(),
                                "no client and agent idle; passivating"
                            );
                            metrics::counter!("oh_worker_passivations_total").increment(1);
                            if let Err(e) = self.set_state(AgentState::Stopped).await {
                                break self.on_append_error(e);
                            }
                            break End::Stopped;
                        }
                    }
                    Input::Action(msg) => {
                        last_activity = std::time::Instant::now();
                        match self.on_action(*msg).await {
                            Ok(None) => {}
                            Ok(Some(end)) => break end,
                            Err(e) => break self.on_append_error(e),
                        }
                    }
                }
            },
        };
        self.finish(end).await;
    }

    /// Lifecycle events after the takeover record: the `system` event on first start; an
    /// interrupted turn becomes an error observation and agent state `error` (the step is not
    /// retried, so an input that crashes workers cannot crash-loop); then
    /// `awaiting_user_input` unless user actions are already waiting.
    async fn start(&mut self, start: Start) -> Result<(), AppendError> {
        let Start {
            fresh,
            interrupted,
            pending,
        } = start;
        if interrupted {
            warn!("previous owner stopped in the middle of a turn; reporting it");
            metrics::counter!("oh_worker_interrupted_turns_total").increment(1);
            self.journal
                .append(Event::error_observation(
                    "The agent's step was interrupted because the worker running it stopped. \
                     The step was not retried; send a message to continue.",
                    "AGENT_ERROR$ERROR_ACTION_NOT_EXECUTED_ERROR",
                ))
                .await?;
            self.journal
                .append(Event::agent_state_changed(
                    AgentState::Error,
                    "interrupted: the worker running this step stopped",
                ))
                .await?;
            self.agent_state = AgentState::Error;
            self.publish_status().await;
            return Ok(());
        }
        if fresh {
            let sys = Event::system(
                self.agent.system_prompt(),
                None,
                self.agent.class(),
                env!("CARGO_PKG_VERSION"),
            );
            let mut sys = sys;
            sys.source = Some(shared::event::Source::Agent);
            self.journal.append(sys).await?;
        }
        if pending == 0 {
            self.journal
                .append(Event::change_agent_state(AgentState::AwaitingUserInput))
                .await?;
            self.set_state(AgentState::AwaitingUserInput).await?;
        }
        self.publish_status().await;
        Ok(())
    }

    async fn on_action(&mut self, msg: jetstream::Message) -> Result<Option<End>, AppendError> {
        let seq = match msg.info() {
            Ok(i) => i.stream_sequence,
            Err(e) => {
                warn!(error = %e, "action without JetStream info; ignored");
                return Ok(None);
            }
        };
        let headers = msg.headers.clone().unwrap_or_default();
        if let Some(ctl) = headers.get(HDR_CONTROL) {
            match Control::parse(ctl.as_str()) {
                Some(Control::Stop) => {
                    if self.agent_state != AgentState::Stopped {
                        self.journal.mark_applied(seq);
                        self.set_state(AgentState::Stopped).await?;
                    }
                    ack(&msg).await;
                    return Ok(Some(End::Stopped));
                }
                None => {
                    warn!(control = ctl.as_str(), "unknown control request; ignored");
                    ack(&msg).await;
                    return Ok(None);
                }
            }
        }
        if seq <= self.journal.applied_action() {
            // Applied by an earlier owner that died before acking: don't apply twice.
            info!(seq, "action already applied; acking redelivery");
            ack(&msg).await;
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let payload = match self.ctx.store.unpack(&headers, msg.payload.clone()).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "action payload unreadable");
                self.journal.mark_applied(seq);
                self.journal
                    .append(Event::error_observation(
                        format!("Your action could not be read: {e}"),
                        "",
                    ))
                    .await?;
                ack(&msg).await;
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
                self.journal
                    .append(Event::error_observation(
                        format!("Invalid action: {reason}"),
                        "",
                    ))
                    .await?;
            }
            Ok(action) => self.apply(action).await?,
        }
        ack(&msg).await;
        self.publish_status().await;
        metrics::histogram!("oh_worker_action_apply_seconds").record(started.elapsed());
        Ok(None)
    }

    async fn apply(&mut self, action: UserAction) -> Result<(), AppendError> {
        let message = action.as_message().map(str::to_owned);
        let new_state = action.as_change_agent_state();
        if message.is_some() {
            self.journal.note_state(AgentState::Running.as_str());
        }
        self.journal
            .append(action.into_event(0, String::new()))
            .await?;
        if let Some(content) = message {
            if self.agent_state != AgentState::Running {
                self.set_state(AgentState::Running).await?;
            }
            for ev in self.agent.on_message(&content).await {
                self.journal.append(ev).await?;
            }
            self.set_state(AgentState::AwaitingUserInput).await?;
        } else if let Some(state) = new_state
            && state != self.agent_state
        {
            self.set_state(state).await?;
        }
        Ok(())
    }

    /// True if some gateway has a client connected to this session (presence entries that
    /// have not expired).
    async fn watched(&self) -> bool {
        let mut conn = self.ctx.redis.clone();
        let key = self.ctx.store.names.presence_key(&self.sid);
        let now = chrono::Utc::now().timestamp_millis();
        let res: redis::RedisResult<(i64, i64)> = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now)
            .cmd("ZCARD")
            .arg(&key)
            .query_async(&mut conn)
            .await;
        match res {
            Ok((_, n)) => n > 0,
            Err(e) => {
                // Unknown: keep the session rather than passivate on a Redis hiccup.
                warn!(error = %e, "presence check failed");
                true
            }
        }
    }

    async fn set_state(&mut self, state: AgentState) -> Result<(), AppendError> {
        self.journal
            .append(Event::agent_state_changed(state.clone(), ""))
            .await?;
        self.agent_state = state;
        Ok(())
    }

    async fn publish_status(&self) {
        let mut redis = self.ctx.redis.clone();
        let res = status::write(
            &mut redis,
            &self.ctx.store.names,
            &self.sid,
            status::Update {
                agent_state: Some(self.agent_state.as_str()),
                last_event_id: self.journal.last_id(),
                ..Default::default()
            },
        )
        .await;
        if let Err(e) = res {
            warn!(error = %e, "status update failed");
        }
    }

    /// Rewrites every field of the status hash (it may have been lost with Redis).
    async fn publish_full_status(&self) {
        let mut redis = self.ctx.redis.clone();
        let res = status::write(
            &mut redis,
            &self.ctx.store.names,
            &self.sid,
            status::Update {
                state: Some(SessionState::Running),
                worker_id: Some(self.ctx.worker_id.as_str()),
                agent_state: Some(self.agent_state.as_str()),
                last_event_id: self.journal.last_id(),
                reason: None,
            },
        )
        .await;
        if let Err(e) = res {
            warn!(error = %e, "status refresh failed");
        }
    }

    fn on_append_error(&self, e: AppendError) -> End {
        match e {
            AppendError::Fenced { .. } => {
                warn!(error = %e, "fenced: another worker took over; stopping here");
                metrics::counter!("oh_worker_fenced_total").increment(1);
                End::Lost
            }
            other => {
                warn!(error = %other, "append failed; handing the session back");
                End::Failed
            }
        }
    }

    async fn finish(self, end: End) {
        let names = &self.ctx.store.names;
        let mut redis = self.ctx.redis.clone();
        self.ctx.leases.remove(&self.sid);
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
            redis::RedisResult::Ok(())
        };
        if let Err(e) = slots.await {
            warn!(error = %e, "releasing the user slot failed; it will expire");
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
                warn!(error = %e, "resume request not confirmed");
            }
        }
        info!(
            end = match end {
                End::Stopped => "stopped",
                End::Handover => "handed over",
                End::Failed => "failed",
                End::Lost => "lost",
            },
            title = %self.meta.title,
            "session ended"
        );
    }
}

async fn ack(msg: &jetstream::Message) {
    if let Err(e) = msg.ack().await {
        // Redelivery is harmless: the applied-action mark makes it a no-op.
        warn!(error = %e, "action ack failed");
    }
}
