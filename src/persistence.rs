//! The `Persistence` actor: the only owner of the SQLite database.
//!
//! It runs on its own arbiter thread (diesel is blocking) under an
//! `actix::Supervisor`, so all database work is serialized through one
//! connection and every state transition is one transaction. On any database
//! error the actor stops itself; the supervisor restarts it with the same
//! mailbox (no queued message is lost) and it reopens the database.

use crate::clock::{now_ms, serialize_rfc3339};
use crate::lifecycle::{resolve_lost_attempt, LostAttempt, Status};
use crate::schema::{agents, commands, submissions};
use crate::supervision::{guarded, FailureMode, InjectFailure};
use actix::prelude::*;
use diesel::dsl::count_star;
use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use fleet_protocol::{AttemptRef, AttemptReport, CommandId, CommandSpec, JournalSummary};
use log::{error, info, warn};
use serde::Serialize;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

/// The migrations in `migrations/`, embedded in the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Failures of the persistence layer.
#[derive(Debug, thiserror::Error)]
pub enum PersistenceError {
    /// The database file could not be opened.
    #[error("cannot open database: {0}")]
    Connection(#[from] diesel::ConnectionError),
    /// A query failed.
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
    /// Applying the embedded migrations failed.
    #[error("cannot apply migrations: {0}")]
    Migration(String),
    /// A database operation panicked.
    #[error("panicked: {0}")]
    Panicked(String),
    /// A stored row does not decode (hand-edited or corrupted database).
    #[error("corrupt row: {0}")]
    CorruptRow(String),
}

/// Opens `database` with durable settings (WAL, synchronous=FULL).
pub fn open(database: &str) -> Result<SqliteConnection, PersistenceError> {
    let mut conn = SqliteConnection::establish(database)?;
    diesel::connection::SimpleConnection::batch_execute(
        &mut conn,
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
    )?;
    Ok(conn)
}

/// Creates or upgrades the schema of `database`; called once at boot.
pub fn migrate(database: &str) -> Result<(), PersistenceError> {
    let mut conn = open(database)?;
    let applied = conn.run_pending_migrations(MIGRATIONS).map_err(|e| PersistenceError::Migration(e.to_string()))?;
    for migration in applied {
        info!("applied migration {migration}");
    }
    Ok(())
}

/// Which agents a new command is for.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Any connected agent (least loaded first).
    AnyAgent,
    /// One command per listed agent.
    Agents(Vec<String>),
    /// One command per agent the server has ever seen.
    AllKnownAgents,
}

/// A command as stored, decoded.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandRecord {
    /// Command id.
    #[serde(rename = "commandId")]
    pub id: CommandId,
    /// What to run.
    #[serde(flatten)]
    pub spec: CommandSpec,
    /// Whether running it twice is harmless.
    pub idempotent: bool,
    /// The agent the operator asked for, if any.
    pub target_agent_id: Option<String>,
    /// The agent running it or that ran it last.
    #[serde(rename = "agentId")]
    pub assigned_agent_id: Option<String>,
    /// Lifecycle status.
    pub status: Status,
    /// Number of times it was handed to an agent (the current fencing token).
    pub attempts: i32,
    /// The result reported by the agent, once final.
    pub result: Option<Value>,
    /// Why the server moved it, when it did so without a result.
    pub status_reason: Option<String>,
    /// Creation time, milliseconds since the Unix epoch.
    #[serde(rename = "createdAt", serialize_with = "serialize_rfc3339")]
    pub created_at_ms: i64,
    /// Last transition time, milliseconds since the Unix epoch.
    #[serde(rename = "updatedAt", serialize_with = "serialize_rfc3339")]
    pub updated_at_ms: i64,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = commands)]
struct CommandRow {
    id: i32,
    command_type: String,
    payload: String,
    idempotent: bool,
    target_agent_id: Option<String>,
    assigned_agent_id: Option<String>,
    status: String,
    attempts: i32,
    result: Option<String>,
    status_reason: Option<String>,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl TryFrom<CommandRow> for CommandRecord {
    type Error = PersistenceError;

    fn try_from(row: CommandRow) -> Result<Self, Self::Error> {
        let corrupt = |what: &str| PersistenceError::CorruptRow(format!("command {}: {what}", row.id));
        let payload: Value = serde_json::from_str(&row.payload).map_err(|_| corrupt("payload"))?;
        let spec = serde_json::from_value(serde_json::json!({"type": row.command_type, "payload": payload}))
            .map_err(|_| corrupt("type or payload"))?;
        let status = row.status.parse().map_err(|_| corrupt("status"))?;
        let result = match &row.result {
            Some(text) => Some(serde_json::from_str(text).map_err(|_| corrupt("result"))?),
            None => None,
        };
        Ok(CommandRecord {
            id: row.id,
            spec,
            idempotent: row.idempotent,
            target_agent_id: row.target_agent_id,
            assigned_agent_id: row.assigned_agent_id,
            status,
            attempts: row.attempts,
            result,
            status_reason: row.status_reason,
            created_at_ms: row.created_at_ms,
            updated_at_ms: row.updated_at_ms,
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = commands)]
struct NewCommandRow<'a> {
    command_type: &'a str,
    payload: &'a str,
    idempotent: bool,
    target_agent_id: Option<&'a str>,
    status: &'a str,
    attempts: i32,
    created_at_ms: i64,
    updated_at_ms: i64,
}

/// An agent as stored, with its current load.
#[derive(Debug, Clone, Serialize, Queryable)]
#[serde(rename_all = "camelCase")]
pub struct AgentRecord {
    /// Agent id.
    pub id: String,
    /// Commands it runs at once.
    pub concurrency: i32,
    /// First registration, milliseconds since the Unix epoch.
    #[serde(rename = "firstSeen", serialize_with = "serialize_rfc3339")]
    pub first_seen_ms: i64,
    /// Last heartbeat or message, milliseconds since the Unix epoch.
    #[serde(rename = "lastSeen", serialize_with = "serialize_rfc3339")]
    pub last_seen_ms: i64,
}

/// A connected agent and how many commands it may run at once.
#[derive(Debug, Clone)]
pub struct AgentSlot {
    /// Agent id.
    pub agent_id: String,
    /// Its concurrency limit.
    pub concurrency: u32,
}

/// A command attempt just handed to an agent.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// The agent that must run it.
    pub agent_id: String,
    /// Command and attempt number.
    pub attempt: AttemptRef,
    /// Whether it is idempotent.
    pub idempotent: bool,
    /// What to run.
    pub spec: CommandSpec,
}

/// Result of a cancellation request.
#[derive(Debug)]
pub enum CancelOutcome {
    /// The command was PENDING and is now CANCELLED.
    Cancelled(Box<CommandRecord>),
    /// No such command.
    NotFound,
    /// The command is past PENDING.
    TooLate(Status),
}

/// Filter and page for listing commands.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    /// Only commands in this status.
    pub status: Option<Status>,
    /// Only commands targeted at or assigned to this agent.
    pub agent_id: Option<String>,
    /// Page size.
    pub limit: i64,
    /// Commands to skip (newest first).
    pub offset: i64,
}

/// Outcome of [`Reconcile`]: what the server can now acknowledge to the agent.
pub type AttemptsToAck = Vec<AttemptRef>;

/// Commands created by one submission: `(target agent, command id)` pairs.
pub type CreatedCommands = Vec<(Option<String>, CommandId)>;

/// A client-chosen key that makes a submission safe to retry.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    /// The `Idempotency-Key` header.
    pub key: String,
    /// Canonical text of the request, to detect a key reused for another request.
    pub request: String,
}

/// What a submission did.
#[derive(Debug)]
pub enum Submission {
    /// New commands were created.
    Created(CreatedCommands),
    /// The idempotency key was seen before with the same request: these are
    /// the commands it created then; nothing new was created.
    Replayed(CreatedCommands),
    /// The idempotency key was used before for a different request.
    KeyReused,
}

/// Inserts a command for each target, at most once per idempotency key.
#[derive(Debug, Message)]
#[rtype(result = "Result<Submission, PersistenceError>")]
pub struct CreateCommands {
    /// What to run.
    pub spec: CommandSpec,
    /// Whether running it twice is harmless.
    pub idempotent: bool,
    /// Who should run it.
    pub targets: Targets,
    /// Makes retrying the submission safe.
    pub idempotency_key: Option<IdempotencyKey>,
}

/// Reads one command.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<CommandRecord>, PersistenceError>")]
pub struct GetCommand(pub CommandId);

/// Lists commands, newest first.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<CommandRecord>, PersistenceError>")]
pub struct ListCommands(pub CommandFilter);

/// Lists known agents with the number of commands each is running.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<(AgentRecord, i64)>, PersistenceError>")]
pub struct ListAgents;

/// Counts commands per status.
#[derive(Debug, Message)]
#[rtype(result = "Result<HashMap<Status, i64>, PersistenceError>")]
pub struct CountByStatus;

/// Cancels a PENDING command.
#[derive(Debug, Message)]
#[rtype(result = "Result<CancelOutcome, PersistenceError>")]
pub struct CancelCommand(pub CommandId);

/// Settles an agent's RUNNING commands against its journal when it connects.
#[derive(Debug, Message)]
#[rtype(result = "Result<AttemptsToAck, PersistenceError>")]
pub struct Reconcile {
    /// The agent.
    pub agent_id: String,
    /// Its concurrency limit.
    pub concurrency: u32,
    /// What its journal says.
    pub journal: JournalSummary,
}

/// Hands PENDING commands to connected agents with free capacity.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Assignment>, PersistenceError>")]
pub struct ClaimPending(pub Vec<AgentSlot>);

/// Stores an agent's result if its attempt is still the current one.
/// Returns whether it was accepted (`false` for a stale or duplicate result).
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, PersistenceError>")]
pub struct RecordResult {
    /// The reporting agent.
    pub agent_id: String,
    /// The outcome.
    pub report: AttemptReport,
}

/// Applies the recovery rule to RUNNING commands of agents that are not
/// connected and were last seen before `seen_before_ms`.
#[derive(Debug, Message)]
#[rtype(result = "Result<usize, PersistenceError>")]
pub struct ExpireOrphans {
    /// Agents connected right now (never expired).
    pub connected: Vec<String>,
    /// Cut-off for `last_seen_ms`.
    pub seen_before_ms: i64,
}

/// Puts an attempt that could not be sent to its agent back to PENDING.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), PersistenceError>")]
pub struct ReleaseUndelivered(pub AttemptRef);

/// Records that an agent was just heard from.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), PersistenceError>")]
pub struct TouchAgent(pub String);

/// The persistence actor. See the module documentation.
pub struct Persistence {
    database: String,
    conn: Option<SqliteConnection>,
}

impl Persistence {
    /// An actor for the database at `database` (opened lazily).
    pub fn new(database: String) -> Self {
        Persistence { database, conn: None }
    }

    /// Runs `operation` on the connection; on failure stops the actor so that
    /// its supervisor restarts it (and `restarting` drops the connection).
    fn run<T>(
        &mut self,
        ctx: &mut Context<Self>,
        operation: impl FnOnce(&mut SqliteConnection) -> Result<T, PersistenceError>,
    ) -> Result<T, PersistenceError> {
        let result = guarded(|| match &mut self.conn {
            Some(conn) => operation(conn),
            None => open(&self.database).and_then(|conn| operation(self.conn.insert(conn))),
        })
        .unwrap_or_else(|panic| Err(PersistenceError::Panicked(panic)));
        if let Err(e) = &result {
            error!("persistence failure: {e}; restarting the persistence actor");
            ctx.stop();
        }
        result
    }
}

impl Actor for Persistence {
    type Context = Context<Self>;
}

impl Supervised for Persistence {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        warn!("persistence actor restarting; reopening {}", self.database);
        self.conn = None;
    }
}

fn load_command(conn: &mut SqliteConnection, id: CommandId) -> Result<Option<CommandRecord>, PersistenceError> {
    commands::table
        .find(id)
        .select(CommandRow::as_select())
        .first(conn)
        .optional()?
        .map(CommandRecord::try_from)
        .transpose()
}

fn insert_command(
    conn: &mut SqliteConnection,
    spec: &CommandSpec,
    idempotent: bool,
    target: Option<&str>,
) -> Result<CommandId, PersistenceError> {
    let payload = match serde_json::to_value(spec) {
        Ok(Value::Object(mut fields)) => fields.remove("payload").unwrap_or(Value::Null),
        _ => Value::Null,
    };
    let now = now_ms();
    let id = diesel::insert_into(commands::table)
        .values(NewCommandRow {
            command_type: spec.type_name(),
            payload: &payload.to_string(),
            idempotent,
            target_agent_id: target,
            status: Status::Pending.as_str(),
            attempts: 0,
            created_at_ms: now,
            updated_at_ms: now,
        })
        .returning(commands::id)
        .get_result(conn)?;
    Ok(id)
}

/// Applies the recovery rule to one RUNNING attempt, if it is still current.
fn settle_lost_attempt(
    conn: &mut SqliteConnection,
    attempt: AttemptRef,
    idempotent: bool,
    why: LostAttempt,
) -> QueryResult<()> {
    let resolution = resolve_lost_attempt(idempotent, why);
    let current = commands::table
        .find(attempt.command_id)
        .filter(commands::status.eq(Status::Running.as_str()))
        .filter(commands::attempts.eq(attempt.attempt));
    let now = now_ms();
    let changed = if resolution.status == Status::Pending {
        diesel::update(current)
            .set((
                commands::status.eq(resolution.status.as_str()),
                commands::assigned_agent_id.eq(None::<String>),
                commands::status_reason.eq(&resolution.reason),
                commands::updated_at_ms.eq(now),
            ))
            .execute(conn)?
    } else {
        diesel::update(current)
            .set((
                commands::status.eq(resolution.status.as_str()),
                commands::status_reason.eq(&resolution.reason),
                commands::updated_at_ms.eq(now),
            ))
            .execute(conn)?
    };
    if changed == 1 {
        warn!(
            "command {} attempt {} lost: now {} ({})",
            attempt.command_id, attempt.attempt, resolution.status, resolution.reason
        );
    }
    Ok(())
}

/// RUNNING attempts assigned to `agent_id`, with their idempotency flag.
fn running_attempts(conn: &mut SqliteConnection, agent_id: &str) -> QueryResult<Vec<(AttemptRef, bool)>> {
    let rows: Vec<(i32, i32, bool)> = commands::table
        .filter(commands::status.eq(Status::Running.as_str()))
        .filter(commands::assigned_agent_id.eq(agent_id))
        .select((commands::id, commands::attempts, commands::idempotent))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|(command_id, attempt, idempotent)| (AttemptRef { command_id, attempt }, idempotent))
        .collect())
}

fn upsert_agent(conn: &mut SqliteConnection, agent_id: &str, concurrency: i32) -> QueryResult<()> {
    let now = now_ms();
    diesel::insert_into(agents::table)
        .values((
            agents::id.eq(agent_id),
            agents::concurrency.eq(concurrency),
            agents::first_seen_ms.eq(now),
            agents::last_seen_ms.eq(now),
        ))
        .on_conflict(agents::id)
        .do_update()
        .set((agents::concurrency.eq(concurrency), agents::last_seen_ms.eq(now)))
        .execute(conn)?;
    Ok(())
}

/// Stores `report` if its attempt is the command's current RUNNING attempt on `agent_id`.
fn record_result(conn: &mut SqliteConnection, agent_id: &str, report: &AttemptReport) -> QueryResult<bool> {
    let status = if report.outcome.success { Status::Completed } else { Status::Failed };
    let changed = diesel::update(
        commands::table
            .find(report.attempt.command_id)
            .filter(commands::status.eq(Status::Running.as_str()))
            .filter(commands::attempts.eq(report.attempt.attempt))
            .filter(commands::assigned_agent_id.eq(agent_id)),
    )
    .set((
        commands::status.eq(status.as_str()),
        commands::result.eq(report.outcome.result.to_string()),
        commands::updated_at_ms.eq(now_ms()),
    ))
    .execute(conn)?;
    if changed == 1 {
        info!("command {} attempt {} {} on {agent_id}", report.attempt.command_id, report.attempt.attempt, status);
    } else {
        info!(
            "ignored stale result for command {} attempt {} from {agent_id}",
            report.attempt.command_id, report.attempt.attempt
        );
    }
    Ok(changed == 1)
}

impl Handler<CreateCommands> for Persistence {
    type Result = Result<Submission, PersistenceError>;

    fn handle(&mut self, msg: CreateCommands, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| conn.transaction(|conn| create_commands(conn, msg)))
    }
}

fn create_commands(conn: &mut SqliteConnection, msg: CreateCommands) -> Result<Submission, PersistenceError> {
    if let Some(idempotency) = &msg.idempotency_key {
        let earlier: Option<(String, String)> = submissions::table
            .find(&idempotency.key)
            .select((submissions::request, submissions::created_commands))
            .first(conn)
            .optional()?;
        if let Some((request, created)) = earlier {
            if request != idempotency.request {
                return Ok(Submission::KeyReused);
            }
            let created = serde_json::from_str(&created)
                .map_err(|_| PersistenceError::CorruptRow(format!("submission {:?}", idempotency.key)))?;
            return Ok(Submission::Replayed(created));
        }
    }
    let targets: Vec<Option<String>> = match msg.targets {
        Targets::AnyAgent => vec![None],
        Targets::Agents(ids) => ids.into_iter().map(Some).collect(),
        Targets::AllKnownAgents => {
            agents::table.select(agents::id).order(agents::id).load::<String>(conn)?.into_iter().map(Some).collect()
        }
    };
    let mut created = Vec::with_capacity(targets.len());
    for target in targets {
        let id = insert_command(conn, &msg.spec, msg.idempotent, target.as_deref())?;
        info!("command {id} created: {} for {}", msg.spec.type_name(), target.as_deref().unwrap_or("any agent"));
        created.push((target, id));
    }
    // An empty broadcast is refused by the API, so it is not remembered either.
    if let Some(idempotency) = msg.idempotency_key.filter(|_| !created.is_empty()) {
        diesel::insert_into(submissions::table)
            .values((
                submissions::idempotency_key.eq(idempotency.key),
                submissions::request.eq(idempotency.request),
                submissions::created_commands.eq(serde_json::json!(created).to_string()),
                submissions::created_at_ms.eq(now_ms()),
            ))
            .execute(conn)?;
    }
    Ok(Submission::Created(created))
}

impl Handler<GetCommand> for Persistence {
    type Result = Result<Option<CommandRecord>, PersistenceError>;

    fn handle(&mut self, msg: GetCommand, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| load_command(conn, msg.0))
    }
}

impl Handler<ListCommands> for Persistence {
    type Result = Result<Vec<CommandRecord>, PersistenceError>;

    fn handle(&mut self, ListCommands(filter): ListCommands, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| {
            let mut query = commands::table.select(CommandRow::as_select()).into_boxed();
            if let Some(status) = filter.status {
                query = query.filter(commands::status.eq(status.as_str()));
            }
            if let Some(agent) = filter.agent_id {
                query =
                    query.filter(commands::assigned_agent_id.eq(agent.clone()).or(commands::target_agent_id.eq(agent)));
            }
            query
                .order(commands::id.desc())
                .limit(filter.limit)
                .offset(filter.offset)
                .load(conn)?
                .into_iter()
                .map(CommandRecord::try_from)
                .collect()
        })
    }
}

impl Handler<ListAgents> for Persistence {
    type Result = Result<Vec<(AgentRecord, i64)>, PersistenceError>;

    fn handle(&mut self, _: ListAgents, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| {
            let running: HashMap<Option<String>, i64> = commands::table
                .filter(commands::status.eq(Status::Running.as_str()))
                .group_by(commands::assigned_agent_id)
                .select((commands::assigned_agent_id, count_star()))
                .load(conn)?
                .into_iter()
                .collect();
            let agents: Vec<AgentRecord> = agents::table.order(agents::id).load(conn)?;
            Ok(agents
                .into_iter()
                .map(|agent| {
                    let load = running.get(&Some(agent.id.clone())).copied().unwrap_or(0);
                    (agent, load)
                })
                .collect())
        })
    }
}

impl Handler<CountByStatus> for Persistence {
    type Result = Result<HashMap<Status, i64>, PersistenceError>;

    fn handle(&mut self, _: CountByStatus, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| {
            let rows: Vec<(String, i64)> =
                commands::table.group_by(commands::status).select((commands::status, count_star())).load(conn)?;
            let mut counts: HashMap<Status, i64> = Status::ALL.into_iter().map(|s| (s, 0)).collect();
            for (status, count) in rows {
                let status = status.parse().map_err(|e| PersistenceError::CorruptRow(format!("{e}")))?;
                counts.insert(status, count);
            }
            Ok(counts)
        })
    }
}

impl Handler<CancelCommand> for Persistence {
    type Result = Result<CancelOutcome, PersistenceError>;

    fn handle(&mut self, CancelCommand(id): CancelCommand, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| {
            conn.transaction(|conn| {
                let changed =
                    diesel::update(commands::table.find(id).filter(commands::status.eq(Status::Pending.as_str())))
                        .set((
                            commands::status.eq(Status::Cancelled.as_str()),
                            commands::status_reason.eq("cancelled by operator"),
                            commands::updated_at_ms.eq(now_ms()),
                        ))
                        .execute(conn)?;
                Ok(match load_command(conn, id)? {
                    None => CancelOutcome::NotFound,
                    Some(record) if changed == 1 => {
                        info!("command {id} cancelled");
                        CancelOutcome::Cancelled(Box::new(record))
                    }
                    Some(record) => CancelOutcome::TooLate(record.status),
                })
            })
        })
    }
}

impl Handler<Reconcile> for Persistence {
    type Result = Result<AttemptsToAck, PersistenceError>;

    fn handle(&mut self, msg: Reconcile, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| conn.transaction(|conn| reconcile(conn, msg)))
    }
}

/// Settles the agent's RUNNING commands against its journal: stores finished
/// results, leaves attempts it is still running alone, and applies the
/// recovery rule to the rest. Returns the journal entries to acknowledge.
fn reconcile(conn: &mut SqliteConnection, msg: Reconcile) -> Result<AttemptsToAck, PersistenceError> {
    let concurrency = i32::try_from(msg.concurrency).unwrap_or(i32::MAX);
    upsert_agent(conn, &msg.agent_id, concurrency)?;
    let journal = msg.journal;
    let mut acks = Vec::new();
    for report in &journal.finished {
        record_result(conn, &msg.agent_id, report)?;
        acks.push(report.attempt);
    }
    let still_running: HashSet<AttemptRef> = journal.in_progress.iter().copied().collect();
    let interrupted: HashSet<AttemptRef> = journal.interrupted.iter().copied().collect();
    for (attempt, idempotent) in running_attempts(conn, &msg.agent_id)? {
        if still_running.contains(&attempt) {
            continue;
        }
        let why = if interrupted.contains(&attempt) { LostAttempt::Interrupted } else { LostAttempt::UnknownToAgent };
        settle_lost_attempt(conn, attempt, idempotent, why)?;
    }
    acks.extend(journal.interrupted);
    Ok(acks)
}

impl Handler<ClaimPending> for Persistence {
    type Result = Result<Vec<Assignment>, PersistenceError>;

    fn handle(&mut self, ClaimPending(slots): ClaimPending, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| conn.transaction(|conn| claim_pending(conn, &slots)))
    }
}

/// An agent's capacity during one claim round.
struct Load {
    agent_id: String,
    concurrency: i64,
    running: i64,
}

impl Load {
    fn free(&self) -> i64 {
        self.concurrency - self.running
    }
}

fn claim_pending(conn: &mut SqliteConnection, slots: &[AgentSlot]) -> Result<Vec<Assignment>, PersistenceError> {
    let mut loads = Vec::with_capacity(slots.len());
    for slot in slots {
        let running: i64 = commands::table
            .filter(commands::status.eq(Status::Running.as_str()))
            .filter(commands::assigned_agent_id.eq(&slot.agent_id))
            .count()
            .get_result(conn)?;
        loads.push(Load { agent_id: slot.agent_id.clone(), concurrency: i64::from(slot.concurrency), running });
    }
    let mut assignments = Vec::new();
    // Commands addressed to a specific agent go to that agent only.
    for load in &mut loads {
        if load.free() <= 0 {
            continue;
        }
        let ids: Vec<i32> = commands::table
            .filter(commands::status.eq(Status::Pending.as_str()))
            .filter(commands::target_agent_id.eq(&load.agent_id))
            .order(commands::id)
            .limit(load.free())
            .select(commands::id)
            .load(conn)?;
        for id in ids {
            assignments.push(assign(conn, id, &load.agent_id)?);
            load.running += 1;
        }
    }
    // Commands for any agent go to the least loaded agent, oldest first.
    let total_free: i64 = loads.iter().map(|l| l.free().max(0)).sum();
    if total_free > 0 {
        let ids: Vec<i32> = commands::table
            .filter(commands::status.eq(Status::Pending.as_str()))
            .filter(commands::target_agent_id.is_null())
            .order(commands::id)
            .limit(total_free)
            .select(commands::id)
            .load(conn)?;
        for id in ids {
            let Some(load) = loads
                .iter_mut()
                .filter(|l| l.free() > 0)
                .min_by(|a, b| (a.running * b.concurrency).cmp(&(b.running * a.concurrency)))
            else {
                break;
            };
            assignments.push(assign(conn, id, &load.agent_id)?);
            load.running += 1;
        }
    }
    Ok(assignments)
}

/// Moves PENDING command `id` to RUNNING on `agent_id` under a new attempt number.
fn assign(conn: &mut SqliteConnection, id: CommandId, agent_id: &str) -> Result<Assignment, PersistenceError> {
    let row: CommandRow =
        diesel::update(commands::table.find(id).filter(commands::status.eq(Status::Pending.as_str())))
            .set((
                commands::status.eq(Status::Running.as_str()),
                commands::assigned_agent_id.eq(agent_id),
                commands::attempts.eq(commands::attempts + 1),
                commands::status_reason.eq(None::<String>),
                commands::updated_at_ms.eq(now_ms()),
            ))
            .returning(CommandRow::as_returning())
            .get_result(conn)?;
    let record = CommandRecord::try_from(row)?;
    info!("command {id} attempt {} assigned to {agent_id}", record.attempts);
    Ok(Assignment {
        agent_id: agent_id.to_string(),
        attempt: AttemptRef { command_id: id, attempt: record.attempts },
        idempotent: record.idempotent,
        spec: record.spec,
    })
}

impl Handler<RecordResult> for Persistence {
    type Result = Result<bool, PersistenceError>;

    fn handle(&mut self, msg: RecordResult, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| Ok(record_result(conn, &msg.agent_id, &msg.report)?))
    }
}

impl Handler<ExpireOrphans> for Persistence {
    type Result = Result<usize, PersistenceError>;

    fn handle(&mut self, msg: ExpireOrphans, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| conn.transaction(|conn| Ok(expire_orphans(conn, &msg)?)))
    }
}

/// Applies the recovery rule to RUNNING commands of disconnected agents last
/// seen before the cut-off; returns how many it settled.
fn expire_orphans(conn: &mut SqliteConnection, msg: &ExpireOrphans) -> QueryResult<usize> {
    let orphans: Vec<(i32, i32, bool)> = commands::table
        .inner_join(agents::table.on(commands::assigned_agent_id.eq(agents::id.nullable())))
        .filter(commands::status.eq(Status::Running.as_str()))
        .filter(agents::last_seen_ms.lt(msg.seen_before_ms))
        .filter(agents::id.ne_all(&msg.connected))
        .select((commands::id, commands::attempts, commands::idempotent))
        .load(conn)?;
    for &(command_id, attempt, idempotent) in &orphans {
        settle_lost_attempt(conn, AttemptRef { command_id, attempt }, idempotent, LostAttempt::AgentGone)?;
    }
    Ok(orphans.len())
}

impl Handler<ReleaseUndelivered> for Persistence {
    type Result = Result<(), PersistenceError>;

    fn handle(&mut self, ReleaseUndelivered(attempt): ReleaseUndelivered, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| Ok(settle_lost_attempt(conn, attempt, false, LostAttempt::NeverDelivered)?))
    }
}

impl Handler<TouchAgent> for Persistence {
    type Result = Result<(), PersistenceError>;

    fn handle(&mut self, TouchAgent(agent_id): TouchAgent, ctx: &mut Context<Self>) -> Self::Result {
        self.run(ctx, |conn| {
            diesel::update(agents::table.find(agent_id)).set(agents::last_seen_ms.eq(now_ms())).execute(conn)?;
            Ok(())
        })
    }
}

impl Handler<InjectFailure> for Persistence {
    type Result = ();

    fn handle(&mut self, InjectFailure(mode): InjectFailure, ctx: &mut Context<Self>) {
        warn!("persistence actor: injected failure ({mode:?})");
        match mode {
            FailureMode::Stop => ctx.stop(),
            FailureMode::Panic => {
                let _ = self.run(ctx, |_| -> Result<(), PersistenceError> { panic!("injected panic") });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_protocol::Outcome;
    use serde_json::json;

    fn database() -> (tempfile::TempDir, SqliteConnection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.db");
        let path = path.to_str().unwrap();
        migrate(path).unwrap();
        let conn = open(path).unwrap();
        (dir, conn)
    }

    fn create(conn: &mut SqliteConnection, idempotent: bool, targets: Targets) -> Vec<CommandId> {
        let msg = CreateCommands { spec: CommandSpec::Delay { ms: 1 }, idempotent, targets, idempotency_key: None };
        match create_commands(conn, msg).unwrap() {
            Submission::Created(created) => created.into_iter().map(|(_, id)| id).collect(),
            other => panic!("expected new commands, got {other:?}"),
        }
    }

    fn slot(agent_id: &str, concurrency: u32) -> AgentSlot {
        AgentSlot { agent_id: agent_id.into(), concurrency }
    }

    fn register(conn: &mut SqliteConnection, agent_id: &str, journal: JournalSummary) -> AttemptsToAck {
        reconcile(conn, Reconcile { agent_id: agent_id.into(), concurrency: 4, journal }).unwrap()
    }

    fn status(conn: &mut SqliteConnection, id: CommandId) -> (Status, i32, Option<String>) {
        let record = load_command(conn, id).unwrap().unwrap();
        (record.status, record.attempts, record.assigned_agent_id)
    }

    fn report(attempt: AttemptRef, success: bool) -> AttemptReport {
        AttemptReport { attempt, outcome: Outcome { success, result: json!({"n": attempt.attempt}) } }
    }

    #[test]
    fn claims_respect_targets_capacity_and_load() {
        let (_dir, mut conn) = database();
        let for_b = create(&mut conn, false, Targets::Agents(vec!["b".into()]));
        let anyone = (0..4).flat_map(|_| create(&mut conn, false, Targets::AnyAgent)).collect::<Vec<_>>();
        let claimed = claim_pending(&mut conn, &[slot("a", 2), slot("b", 2)]).unwrap();

        let on = |agent: &str| {
            claimed.iter().filter(|a| a.agent_id == agent).map(|a| a.attempt.command_id).collect::<Vec<_>>()
        };
        assert!(on("b").contains(&for_b[0]), "targeted command goes to its agent");
        assert_eq!((on("a").len(), on("b").len()), (2, 2), "no agent gets more than its capacity");
        assert!(claimed.iter().all(|a| a.attempt.attempt == 1));
        assert_eq!(
            status(&mut conn, anyone[0]),
            (Status::Running, 1, Some("a".into())),
            "oldest first, least loaded first"
        );
        let left: Vec<_> = anyone.iter().filter(|id| status(&mut conn, **id).0 == Status::Pending).collect();
        assert_eq!(left.len(), 1);
        assert!(claim_pending(&mut conn, &[slot("a", 2), slot("b", 2)]).unwrap().is_empty(), "everyone is full");
    }

    #[test]
    fn results_are_fenced_by_attempt_and_agent() {
        let (_dir, mut conn) = database();
        let id = create(&mut conn, true, Targets::AnyAgent)[0];
        let attempt = claim_pending(&mut conn, &[slot("a", 1)]).unwrap()[0].attempt;
        let stale = AttemptRef { attempt: attempt.attempt - 1, ..attempt };
        assert!(!record_result(&mut conn, "a", &report(stale, true)).unwrap());
        assert!(!record_result(&mut conn, "intruder", &report(attempt, true)).unwrap());
        assert_eq!(status(&mut conn, id).0, Status::Running);
        assert!(record_result(&mut conn, "a", &report(attempt, false)).unwrap());
        assert!(!record_result(&mut conn, "a", &report(attempt, true)).unwrap(), "a final status never changes");
        assert_eq!(status(&mut conn, id).0, Status::Failed);
    }

    #[test]
    fn reconcile_settles_running_commands_against_the_journal() {
        let (_dir, mut conn) = database();
        let ids: Vec<CommandId> = [true, false, true, false, true, false]
            .into_iter()
            .flat_map(|idempotent| create(&mut conn, idempotent, Targets::AnyAgent))
            .collect();
        register(&mut conn, "a", JournalSummary::default());
        let attempts: Vec<AttemptRef> =
            claim_pending(&mut conn, &[slot("a", 6)]).unwrap().into_iter().map(|a| a.attempt).collect();
        let journal = JournalSummary {
            finished: vec![report(attempts[0], true), report(attempts[1], true)],
            in_progress: vec![attempts[2]],
            interrupted: vec![attempts[3], attempts[4]],
        };
        let acks = register(&mut conn, "a", journal);
        assert_eq!(acks, vec![attempts[0], attempts[1], attempts[3], attempts[4]]);
        let statuses: Vec<Status> = ids.iter().map(|id| status(&mut conn, *id).0).collect();
        assert_eq!(
            statuses,
            vec![
                Status::Completed, // finished: result stored, no re-run
                Status::Completed,
                Status::Running, // still running in the agent
                Status::Failed,  // interrupted, not idempotent
                Status::Pending, // interrupted, idempotent: runs again
                Status::Failed,  // unknown to the agent, not idempotent
            ]
        );
        assert_eq!(status(&mut conn, ids[4]).2, None, "a requeued command is assigned to nobody");
        let reason = load_command(&mut conn, ids[5]).unwrap().unwrap().status_reason.unwrap();
        assert!(reason.contains("without any record"), "{reason}");
    }

    #[test]
    fn undelivered_attempts_go_back_to_pending_even_when_not_idempotent() {
        let (_dir, mut conn) = database();
        let id = create(&mut conn, false, Targets::AnyAgent)[0];
        let attempt = claim_pending(&mut conn, &[slot("a", 1)]).unwrap()[0].attempt;
        settle_lost_attempt(&mut conn, attempt, false, LostAttempt::NeverDelivered).unwrap();
        assert_eq!(status(&mut conn, id), (Status::Pending, 1, None));
        let again = claim_pending(&mut conn, &[slot("b", 1)]).unwrap()[0].attempt;
        assert_eq!(again.attempt, 2, "the next attempt gets a new fencing token");
    }

    #[test]
    fn orphans_expire_only_for_disconnected_agents_past_the_cutoff() {
        let (_dir, mut conn) = database();
        let ids: Vec<CommandId> = (0..2).flat_map(|_| create(&mut conn, false, Targets::AnyAgent)).collect();
        register(&mut conn, "gone", JournalSummary::default());
        register(&mut conn, "here", JournalSummary::default());
        claim_pending(&mut conn, &[slot("gone", 1), slot("here", 1)]).unwrap();
        let future = now_ms() + 1_000;
        let connected = vec!["here".to_string()];
        let too_early = ExpireOrphans { connected: connected.clone(), seen_before_ms: now_ms() - 60_000 };
        assert_eq!(expire_orphans(&mut conn, &too_early).unwrap(), 0);
        assert_eq!(expire_orphans(&mut conn, &ExpireOrphans { connected, seen_before_ms: future }).unwrap(), 1);
        let settled: Vec<(Status, Option<String>)> = ids
            .iter()
            .map(|id| {
                let (status, _, agent) = status(&mut conn, *id);
                (status, agent)
            })
            .collect();
        assert!(settled.contains(&(Status::Failed, Some("gone".into()))), "{settled:?}");
        assert!(settled.contains(&(Status::Running, Some("here".into()))), "{settled:?}");
    }

    #[test]
    fn idempotency_keys_replay_or_refuse() {
        let (_dir, mut conn) = database();
        let submit = |conn: &mut SqliteConnection, request: &str| {
            let key = IdempotencyKey { key: "k".into(), request: request.into() };
            let msg = CreateCommands {
                spec: CommandSpec::Delay { ms: 1 },
                idempotent: false,
                targets: Targets::AnyAgent,
                idempotency_key: Some(key),
            };
            create_commands(conn, msg).unwrap()
        };
        let Submission::Created(first) = submit(&mut conn, "same") else { panic!("expected a new command") };
        let Submission::Replayed(again) = submit(&mut conn, "same") else { panic!("expected a replay") };
        assert_eq!(first, again);
        assert!(matches!(submit(&mut conn, "different"), Submission::KeyReused));
        let count: i64 = commands::table.count().get_result(&mut conn).unwrap();
        assert_eq!(count, 1);
    }
}
