//! The `AgentSession` actor: one per agent WebSocket connection.
//!
//! It translates between the wire protocol and actor messages, keeps the
//! connection alive with ping/pong heartbeats and closes it when the agent
//! goes silent for longer than the client timeout.

use crate::dispatcher::{Announce, Dispatcher, Register, SessionClosed, WorkAvailable};
use crate::persistence::{Assignment, Persistence, RecordResult, TouchAgent};
use actix::prelude::*;
use actix_web_actors::ws;
use fleet_protocol::{is_valid_agent_id, AgentMessage, AttemptRef, AttemptReport, ServerMessage, PROTOCOL_VERSION};
use log::{debug, error, info, warn};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Largest concurrency an agent may announce.
pub const MAX_AGENT_CONCURRENCY: u32 = 1024;

/// Source of unique, increasing session ids (a newer session of an agent wins).
static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// Heartbeat timing of a session.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    /// How often the server pings the agent.
    pub interval: Duration,
    /// How long the agent may stay silent before the connection is dropped.
    pub timeout: Duration,
}

/// Push an attempt to the agent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver(pub Assignment);

/// A newer connection of the same agent took over: close this one.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Superseded;

/// Identity of a session once the agent said Hello.
struct Registration {
    agent_id: String,
    concurrency: u32,
}

/// The session actor. See the module documentation.
pub struct AgentSession {
    session_id: u64,
    registration: Option<Registration>,
    dispatcher: Addr<Dispatcher>,
    persistence: Addr<Persistence>,
    heartbeat: Heartbeat,
    last_heard: Instant,
}

impl AgentSession {
    /// A session for a freshly accepted connection.
    pub fn new(dispatcher: Addr<Dispatcher>, persistence: Addr<Persistence>, heartbeat: Heartbeat) -> Self {
        AgentSession {
            session_id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            registration: None,
            dispatcher,
            persistence,
            heartbeat,
            last_heard: Instant::now(),
        }
    }

    fn send(ctx: &mut ws::WebsocketContext<Self>, message: &ServerMessage) {
        match serde_json::to_string(message) {
            Ok(text) => ctx.text(text),
            Err(e) => error!("cannot encode {message:?}: {e}"),
        }
    }

    fn reject(&self, ctx: &mut ws::WebsocketContext<Self>, reason: String) {
        warn!("session {}: closing: {reason}", self.session_id);
        ctx.close(Some(ws::CloseReason { code: ws::CloseCode::Policy, description: Some(reason) }));
        ctx.stop();
    }

    fn on_message(&mut self, message: AgentMessage, ctx: &mut ws::WebsocketContext<Self>) {
        match (message, &self.registration) {
            (AgentMessage::Hello { protocol_version, agent_id, concurrency, journal }, None) => {
                if protocol_version != PROTOCOL_VERSION {
                    return self.reject(
                        ctx,
                        format!(
                            "protocol version {protocol_version} is not supported (server speaks {PROTOCOL_VERSION})"
                        ),
                    );
                }
                if !is_valid_agent_id(&agent_id) {
                    return self.reject(ctx, format!("invalid agent id {agent_id:?}"));
                }
                if !(1..=MAX_AGENT_CONCURRENCY).contains(&concurrency) {
                    return self.reject(ctx, format!("concurrency must be 1..={MAX_AGENT_CONCURRENCY}"));
                }
                let register = Register {
                    agent_id: agent_id.clone(),
                    session_id: self.session_id,
                    concurrency,
                    session: ctx.address(),
                    journal,
                };
                // Handle nothing else from this agent until its journal is settled.
                ctx.wait(self.dispatcher.send(register).into_actor(self).map(move |settled, act, ctx| match settled {
                    Ok(Ok(acks)) => {
                        acks.into_iter().for_each(|attempt| Self::send(ctx, &ServerMessage::Ack(attempt)));
                        act.registration = Some(Registration { agent_id, concurrency });
                    }
                    Ok(Err(e)) => act.reject(ctx, format!("registration failed: {e}")),
                    Err(e) => act.reject(ctx, format!("registration failed: dispatcher unavailable: {e}")),
                }));
            }
            (AgentMessage::Hello { .. }, Some(_)) => self.reject(ctx, "second Hello on one connection".into()),
            (AgentMessage::Result(_), None) => self.reject(ctx, "Result before Hello".into()),
            (AgentMessage::Result(report), Some(registration)) => {
                self.record_result(registration.agent_id.clone(), report, ctx)
            }
        }
    }

    /// Stores a result, then acknowledges it. Without an acknowledgement the
    /// agent keeps resending, so a failure here loses nothing.
    fn record_result(&self, agent_id: String, report: AttemptReport, ctx: &mut ws::WebsocketContext<Self>) {
        let attempt: AttemptRef = report.attempt;
        let record = self.persistence.send(RecordResult { agent_id, report });
        ctx.spawn(record.into_actor(self).map(move |recorded, act, ctx| match recorded {
            Ok(Ok(_accepted)) => {
                Self::send(ctx, &ServerMessage::Ack(attempt));
                act.dispatcher.do_send(WorkAvailable);
            }
            Ok(Err(e)) => error!("cannot record result of command {}: {e}", attempt.command_id),
            Err(e) => error!("cannot record result of command {}: {e}", attempt.command_id),
        }));
    }

    fn beat(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if self.last_heard.elapsed() > self.heartbeat.timeout {
            warn!("session {}: agent silent for {:?}, dropping connection", self.session_id, self.heartbeat.timeout);
            ctx.stop();
            return;
        }
        ctx.ping(b"");
        if let Some(registration) = &self.registration {
            self.dispatcher.do_send(Announce {
                agent_id: registration.agent_id.clone(),
                session_id: self.session_id,
                concurrency: registration.concurrency,
                session: ctx.address(),
            });
            self.persistence.do_send(TouchAgent(registration.agent_id.clone()));
        }
    }
}

impl Actor for AgentSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        debug!("session {} opened", self.session_id);
        ctx.run_interval(self.heartbeat.interval, |act, ctx| act.beat(ctx));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(registration) = self.registration.take() {
            info!("session {} of agent {} closed", self.session_id, registration.agent_id);
            self.persistence.do_send(TouchAgent(registration.agent_id.clone()));
            self.dispatcher.do_send(SessionClosed { agent_id: registration.agent_id, session_id: self.session_id });
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for AgentSession {
    fn handle(&mut self, frame: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return self.reject(ctx, format!("protocol error: {e}")),
        };
        self.last_heard = Instant::now();
        match frame {
            ws::Message::Ping(bytes) => ctx.pong(&bytes),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Text(text) => match serde_json::from_str::<AgentMessage>(&text) {
                Ok(message) => self.on_message(message, ctx),
                Err(e) => self.reject(ctx, format!("unreadable message: {e}")),
            },
            ws::Message::Binary(_) | ws::Message::Continuation(_) => {
                self.reject(ctx, "only text frames are accepted".into())
            }
            ws::Message::Close(reason) => {
                debug!("session {}: agent closed the connection: {reason:?}", self.session_id);
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}

impl Handler<Deliver> for AgentSession {
    type Result = ();

    fn handle(&mut self, Deliver(assignment): Deliver, ctx: &mut Self::Context) {
        info!(
            "pushing command {} attempt {} to {}",
            assignment.attempt.command_id, assignment.attempt.attempt, assignment.agent_id
        );
        Self::send(
            ctx,
            &ServerMessage::Execute {
                attempt: assignment.attempt,
                idempotent: assignment.idempotent,
                spec: assignment.spec,
            },
        );
    }
}

impl Handler<Superseded> for AgentSession {
    type Result = ();

    fn handle(&mut self, _: Superseded, ctx: &mut Self::Context) {
        // The newer session owns the agent now: do not report this one as closed.
        self.registration = None;
        self.reject(ctx, "superseded by a newer connection of the same agent".into());
    }
}
