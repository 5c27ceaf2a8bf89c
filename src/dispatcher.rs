//! The `Dispatcher` actor: knows which agents are connected and routes work.
//!
//! It holds no command state of its own: on every dispatch round it asks the
//! [`Persistence`] actor to claim PENDING commands for the connected agents
//! (the database computes each agent's free capacity) and forwards the claims
//! to the agents' sessions. Its only memory is the table of live sessions,
//! which sessions re-announce on every heartbeat, so a restarted dispatcher
//! (it runs under `actix::Supervisor`) rebuilds it within one heartbeat.

use crate::clock::now_ms;
use crate::persistence::{
    AgentSlot, Assignment, AttemptsToAck, ClaimPending, ExpireOrphans, Persistence, PersistenceError, Reconcile,
    ReleaseUndelivered,
};
use crate::session::{AgentSession, Deliver, Superseded};
use crate::supervision::{guarded, FailureMode, InjectFailure};
use actix::prelude::*;
use fleet_protocol::JournalSummary;
use log::{error, info, warn};
use std::collections::HashMap;
use std::time::Duration;

/// How often the dispatcher re-runs a dispatch round and looks for orphans,
/// even when nothing told it to.
const TICK: Duration = Duration::from_secs(1);

/// Failures the dispatcher reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The persistence actor did not answer (it is restarting).
    #[error("persistence unavailable: {0}")]
    Unavailable(#[from] MailboxError),
    /// The database refused the operation.
    #[error(transparent)]
    Persistence(#[from] PersistenceError),
    /// The dispatcher failed while handling the request and is restarting.
    #[error("dispatcher failed and is restarting")]
    Restarting,
}

/// A live session of an agent.
struct ConnectedAgent {
    session_id: u64,
    concurrency: u32,
    session: Addr<AgentSession>,
}

/// A new connection said Hello: settle the agent's RUNNING commands against its
/// journal, then start routing work to this session (replacing any older one).
#[derive(Message)]
#[rtype(result = "Result<AttemptsToAck, DispatchError>")]
pub struct Register {
    /// The agent.
    pub agent_id: String,
    /// Unique, increasing id of the connection.
    pub session_id: u64,
    /// Commands the agent runs at once.
    pub concurrency: u32,
    /// The session actor.
    pub session: Addr<AgentSession>,
    /// What the agent's journal says.
    pub journal: JournalSummary,
}

/// A registered session is still alive (sent every heartbeat); lets a
/// restarted dispatcher learn its sessions again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Announce {
    /// The agent.
    pub agent_id: String,
    /// The session's id.
    pub session_id: u64,
    /// Commands the agent runs at once.
    pub concurrency: u32,
    /// The session actor.
    pub session: Addr<AgentSession>,
}

/// A session ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionClosed {
    /// The agent.
    pub agent_id: String,
    /// The session that ended.
    pub session_id: u64,
}

/// Something changed that may let more commands run (new command, result, cancel).
#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkAvailable;

/// Ids of the agents connected right now.
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct ConnectedAgents;

/// Internal: run one dispatch round now.
#[derive(Message)]
#[rtype(result = "()")]
struct RunDispatch;

/// The dispatcher actor. See the module documentation.
pub struct Dispatcher {
    persistence: Addr<Persistence>,
    grace_period: Duration,
    sessions: HashMap<String, ConnectedAgent>,
    started_at_ms: i64,
    dispatch_scheduled: bool,
}

impl Dispatcher {
    /// A dispatcher that waits `grace_period` for a disconnected agent before
    /// giving up on its RUNNING commands.
    pub fn new(persistence: Addr<Persistence>, grace_period: Duration) -> Self {
        Dispatcher {
            persistence,
            grace_period,
            sessions: HashMap::new(),
            started_at_ms: now_ms(),
            dispatch_scheduled: false,
        }
    }

    /// Runs a piece of the dispatcher's work; if it panics, the actor stops
    /// and its supervisor restarts it.
    fn guarded<R>(
        &mut self,
        ctx: &mut Context<Self>,
        work: impl FnOnce(&mut Self, &mut Context<Self>) -> R,
    ) -> Option<R> {
        match guarded(|| work(self, ctx)) {
            Ok(result) => Some(result),
            Err(panic) => {
                error!("dispatcher panicked: {panic}; restarting it");
                ctx.stop();
                None
            }
        }
    }

    fn schedule_dispatch(&mut self, ctx: &mut Context<Self>) {
        if !self.dispatch_scheduled {
            self.dispatch_scheduled = true;
            ctx.notify(RunDispatch);
        }
    }

    /// Claims work for every connected agent and forwards it. The actor waits
    /// for the round to finish before handling other messages, so the set of
    /// sessions cannot change under it.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        self.dispatch_scheduled = false;
        if self.sessions.is_empty() {
            return;
        }
        let slots = self
            .sessions
            .iter()
            .map(|(agent_id, agent)| AgentSlot { agent_id: agent_id.clone(), concurrency: agent.concurrency })
            .collect();
        let round = self.persistence.send(ClaimPending(slots)).into_actor(self).map(|claimed, act, ctx| {
            act.guarded(ctx, |act, _| match claimed {
                Ok(Ok(assignments)) => act.deliver(assignments),
                Ok(Err(e)) => error!("dispatch round failed: {e}"),
                Err(e) => error!("dispatch round failed: persistence unavailable: {e}"),
            });
        });
        ctx.wait(round);
    }

    /// Forwards claimed attempts to their agents' sessions. An attempt whose
    /// session is already gone provably never reached the agent: it goes back
    /// to PENDING.
    fn deliver(&self, assignments: Vec<Assignment>) {
        for assignment in assignments {
            let undelivered = match self.sessions.get(&assignment.agent_id) {
                Some(agent) => match agent.session.try_send(Deliver(assignment)) {
                    Ok(()) => None,
                    Err(SendError::Full(delivery)) => {
                        agent.session.do_send(delivery);
                        None
                    }
                    Err(SendError::Closed(Deliver(assignment))) => Some(assignment),
                },
                None => Some(assignment),
            };
            if let Some(assignment) = undelivered {
                warn!("command {} could not be sent to {}", assignment.attempt.command_id, assignment.agent_id);
                self.persistence.do_send(ReleaseUndelivered(assignment.attempt));
            }
        }
    }

    /// Applies the recovery rule to RUNNING commands of agents gone for longer
    /// than the grace period (counted from this actor's start at the earliest).
    fn expire_orphans(&mut self, ctx: &mut Context<Self>) {
        let grace_ms = i64::try_from(self.grace_period.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        if now - self.started_at_ms < grace_ms {
            return;
        }
        let request =
            ExpireOrphans { connected: self.sessions.keys().cloned().collect(), seen_before_ms: now - grace_ms };
        let expire = self.persistence.send(request).into_actor(self).map(|expired, act, ctx| match expired {
            Ok(Ok(0)) => {}
            Ok(Ok(count)) => {
                warn!("settled {count} RUNNING command(s) of agents gone past the grace period");
                act.schedule_dispatch(ctx);
            }
            Ok(Err(e)) => error!("expiring orphaned commands failed: {e}"),
            Err(e) => error!("expiring orphaned commands failed: persistence unavailable: {e}"),
        });
        ctx.spawn(expire);
    }

    fn connect(&mut self, agent_id: String, agent: ConnectedAgent) {
        if let Some(previous) = self.sessions.insert(agent_id, agent) {
            previous.session.do_send(Superseded);
        }
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.started_at_ms = now_ms();
        ctx.run_interval(TICK, |act, ctx| {
            act.guarded(ctx, |act, ctx| {
                act.dispatch(ctx);
                act.expire_orphans(ctx);
            });
        });
    }
}

impl Supervised for Dispatcher {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        warn!("dispatcher restarting: forgetting sessions until they announce themselves again");
        self.sessions.clear();
        self.dispatch_scheduled = false;
    }
}

impl Handler<Register> for Dispatcher {
    type Result = AtomicResponse<Self, Result<AttemptsToAck, DispatchError>>;

    fn handle(&mut self, msg: Register, _ctx: &mut Context<Self>) -> Self::Result {
        // Stop routing to an older connection of this agent before settling its
        // journal, so nothing is sent to the old connection afterwards.
        if let Some(previous) = self.sessions.remove(&msg.agent_id) {
            previous.session.do_send(Superseded);
        }
        let reconcile =
            Reconcile { agent_id: msg.agent_id.clone(), concurrency: msg.concurrency, journal: msg.journal };
        AtomicResponse::new(Box::pin(self.persistence.send(reconcile).into_actor(self).map(
            move |settled, act, ctx| {
                let acks = settled??;
                let registered = act.guarded(ctx, |act, ctx| {
                    info!(
                        "agent {} registered (session {}, concurrency {})",
                        msg.agent_id, msg.session_id, msg.concurrency
                    );
                    let agent = ConnectedAgent {
                        session_id: msg.session_id,
                        concurrency: msg.concurrency,
                        session: msg.session,
                    };
                    act.connect(msg.agent_id, agent);
                    act.schedule_dispatch(ctx);
                });
                registered.map(|()| acks).ok_or(DispatchError::Restarting)
            },
        )))
    }
}

impl Handler<Announce> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: Announce, ctx: &mut Context<Self>) {
        self.guarded(ctx, |act, ctx| {
            let newer = act.sessions.get(&msg.agent_id).is_none_or(|known| known.session_id < msg.session_id);
            if newer {
                info!("agent {} announced session {}", msg.agent_id, msg.session_id);
                let agent =
                    ConnectedAgent { session_id: msg.session_id, concurrency: msg.concurrency, session: msg.session };
                act.connect(msg.agent_id, agent);
                act.schedule_dispatch(ctx);
            }
        });
    }
}

impl Handler<SessionClosed> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: SessionClosed, ctx: &mut Context<Self>) {
        self.guarded(ctx, |act, _| {
            if act.sessions.get(&msg.agent_id).is_some_and(|agent| agent.session_id == msg.session_id) {
                info!("agent {} disconnected", msg.agent_id);
                act.sessions.remove(&msg.agent_id);
            }
        });
    }
}

impl Handler<WorkAvailable> for Dispatcher {
    type Result = ();

    fn handle(&mut self, _: WorkAvailable, ctx: &mut Context<Self>) {
        self.schedule_dispatch(ctx);
    }
}

impl Handler<RunDispatch> for Dispatcher {
    type Result = ();

    fn handle(&mut self, _: RunDispatch, ctx: &mut Context<Self>) {
        self.guarded(ctx, Self::dispatch);
    }
}

impl Handler<ConnectedAgents> for Dispatcher {
    type Result = Vec<String>;

    fn handle(&mut self, _: ConnectedAgents, _ctx: &mut Context<Self>) -> Vec<String> {
        self.sessions.keys().cloned().collect()
    }
}

impl Handler<InjectFailure> for Dispatcher {
    type Result = ();

    fn handle(&mut self, InjectFailure(mode): InjectFailure, ctx: &mut Context<Self>) {
        warn!("dispatcher: injected failure ({mode:?})");
        match mode {
            FailureMode::Stop => ctx.stop(),
            FailureMode::Panic => {
                self.guarded(ctx, |_, _| panic!("injected panic"));
            }
        }
    }
}
