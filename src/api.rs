//! REST handlers, the agent WebSocket endpoint and the dashboard page.
//!
//! Every error is a JSON body `{"error": "..."}` with a 4xx status for bad
//! input and 5xx when the server itself cannot answer.

use crate::dispatcher::{ConnectedAgents, Dispatcher, WorkAvailable};
use crate::lifecycle::Status;
use crate::persistence::{
    CancelCommand, CancelOutcome, CommandFilter, CountByStatus, CreateCommands, CreatedCommands, GetCommand,
    IdempotencyKey, ListAgents, ListCommands, Persistence, PersistenceError, Submission, Targets,
};
use crate::session::{AgentSession, Heartbeat};
use crate::supervision::{FailureMode, InjectFailure};
use crate::validation::{self, ValidationError};
use actix::{Addr, MailboxError};
use actix_web::http::StatusCode;
use actix_web::{error, get, post, web, HttpRequest, HttpResponse, ResponseError};
use actix_web_actors::ws;
use fleet_protocol::CommandId;
use log::error;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashSet;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest accepted WebSocket frame from an agent.
const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Default and largest page size of `GET /commands`.
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

/// Everything the handlers need.
pub struct AppState {
    /// The database actor.
    pub persistence: Addr<Persistence>,
    /// The routing actor.
    pub dispatcher: Addr<Dispatcher>,
    /// Heartbeat settings for agent sessions.
    pub heartbeat: Heartbeat,
    /// Whether `POST /admin/fail/{actor}` is enabled.
    pub fault_injection: bool,
}

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid input (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the resource's state (409).
    #[error("{0}")]
    Conflict(String),
    /// The request is well-formed but cannot be honoured (422).
    #[error("{0}")]
    Unprocessable(String),
    /// An actor is restarting; retry shortly (503).
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// The database failed (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(json!({ "error": self.to_string() }))
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::BadRequest(e.0)
    }
}

impl From<MailboxError> for ApiError {
    fn from(e: MailboxError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<PersistenceError> for ApiError {
    fn from(e: PersistenceError) -> Self {
        error!("request failed: {e}");
        ApiError::Internal(e.to_string())
    }
}

type ApiResult = Result<HttpResponse, ApiError>;

/// Registers all routes, with JSON error handlers for unparsable input.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::JsonConfig::default().limit(MAX_BODY_BYTES).error_handler(|e, _| bad_input("body", e)))
        .app_data(web::PathConfig::default().error_handler(|e, _| bad_input("path", e)))
        .app_data(web::QueryConfig::default().error_handler(|e, _| bad_input("query", e)))
        .service(dashboard)
        .service(health)
        .service(submit)
        .service(broadcast)
        .service(get_command)
        .service(list_commands)
        .service(cancel)
        .service(list_agents)
        .service(stats)
        .service(inject_failure)
        .service(openapi)
        .service(agent_socket)
        .default_service(web::to(|| async { ApiError::NotFound("no such endpoint".into()).error_response() }));
}

fn bad_input(part: &str, e: impl std::fmt::Display) -> actix_web::Error {
    error::InternalError::from_response(
        "",
        ApiError::BadRequest(format!("invalid request {part}: {e}")).error_response(),
    )
    .into()
}

#[get("/")]
async fn dashboard() -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(include_str!("dashboard.html"))
}

/// The OpenAPI 3.0 description of this REST API (hand-written, `src/openapi.json`).
#[get("/openapi.json")]
async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(include_str!("openapi.json"))
}

#[get("/health")]
async fn health(state: web::Data<AppState>) -> ApiResult {
    state.persistence.send(CountByStatus).await??;
    Ok(HttpResponse::Ok().json(json!({ "status": "ok" })))
}

/// Header that makes a submission safe to retry.
const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// Body of `POST /commands`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SubmitRequest {
    #[serde(rename = "type")]
    command_type: String,
    payload: Value,
    agent_id: Option<String>,
    #[serde(default)]
    idempotent: bool,
}

#[post("/commands")]
async fn submit(state: web::Data<AppState>, req: HttpRequest, body: web::Json<Value>) -> ApiResult {
    let request: SubmitRequest = parse_body(&body)?;
    let targets = match request.agent_id {
        Some(agent) => {
            validation::agent_id(&agent)?;
            Targets::Agents(vec![agent])
        }
        None => Targets::AnyAgent,
    };
    let submission = submission(&req, &body, &request.command_type, &request.payload, request.idempotent, targets)?;
    let (status, created) = create(&state, submission).await?;
    let command_id = created.first().map(|(_, id)| *id);
    Ok(HttpResponse::build(status).json(json!({ "commandId": command_id })))
}

/// Body of `POST /commands/broadcast`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BroadcastRequest {
    #[serde(rename = "type")]
    command_type: String,
    payload: Value,
    agent_ids: Option<Vec<String>>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    idempotent: bool,
}

#[post("/commands/broadcast")]
async fn broadcast(state: web::Data<AppState>, req: HttpRequest, body: web::Json<Value>) -> ApiResult {
    let request: BroadcastRequest = parse_body(&body)?;
    let targets = match (request.agent_ids, request.all) {
        (Some(ids), false) => Targets::Agents(validation::broadcast_agents(ids)?),
        (None, true) => Targets::AllKnownAgents,
        _ => return Err(ApiError::BadRequest("give exactly one of agentIds or all: true".into())),
    };
    let submission = submission(&req, &body, &request.command_type, &request.payload, request.idempotent, targets)?;
    let (status, created) = create(&state, submission).await?;
    if created.is_empty() {
        return Err(ApiError::Conflict("no agent has ever registered; nothing to broadcast to".into()));
    }
    let commands: Vec<Value> = created.iter().map(|(agent, id)| json!({ "agentId": agent, "commandId": id })).collect();
    let ids: Vec<CommandId> = created.iter().map(|(_, id)| *id).collect();
    Ok(HttpResponse::build(status).json(json!({ "commandIds": ids, "commands": commands })))
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    T::deserialize(body).map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
}

/// Validates a command and builds its submission to `targets`.
fn submission(
    req: &HttpRequest,
    body: &Value,
    command_type: &str,
    payload: &Value,
    idempotent: bool,
    targets: Targets,
) -> Result<CreateCommands, ApiError> {
    Ok(CreateCommands {
        spec: validation::command_spec(command_type, payload)?,
        idempotent,
        targets,
        idempotency_key: idempotency_key(req, body)?,
    })
}

/// The request's `Idempotency-Key`, paired with the request it protects.
fn idempotency_key(req: &HttpRequest, body: &Value) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(header) = req.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key =
        header.to_str().ok().filter(|key| (1..=255).contains(&key.len())).ok_or_else(|| {
            ApiError::BadRequest(format!("{IDEMPOTENCY_KEY} must be 1 to 255 visible ASCII characters"))
        })?;
    Ok(Some(IdempotencyKey { key: key.to_string(), request: format!("{} {body}", req.path()) }))
}

/// Creates the commands (or replays an earlier identical submission) and
/// wakes the dispatcher; answers 201 for new commands, 200 for a replay.
async fn create(state: &AppState, submission: CreateCommands) -> Result<(StatusCode, CreatedCommands), ApiError> {
    match state.persistence.send(submission).await?? {
        Submission::Created(created) => {
            state.dispatcher.do_send(WorkAvailable);
            Ok((StatusCode::CREATED, created))
        }
        Submission::Replayed(created) => Ok((StatusCode::OK, created)),
        Submission::KeyReused => {
            Err(ApiError::Unprocessable(format!("this {IDEMPOTENCY_KEY} was already used for a different request")))
        }
    }
}

#[get("/commands/{id}")]
async fn get_command(state: web::Data<AppState>, id: web::Path<CommandId>) -> ApiResult {
    let id = id.into_inner();
    match state.persistence.send(GetCommand(id)).await?? {
        Some(record) => Ok(HttpResponse::Ok().json(record)),
        None => Err(ApiError::NotFound(format!("no command {id}"))),
    }
}

/// Query of `GET /commands`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    agent_id: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

#[get("/commands")]
async fn list_commands(state: web::Data<AppState>, query: web::Query<ListQuery>) -> ApiResult {
    let query = query.into_inner();
    let status = match query.status {
        Some(name) => Some(name.parse::<Status>().map_err(|e| ApiError::BadRequest(e.to_string()))?),
        None => None,
    };
    if let Some(agent) = &query.agent_id {
        validation::agent_id(agent)?;
    }
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be 1..={MAX_PAGE}")));
    }
    let offset = query.offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::BadRequest("offset must not be negative".into()));
    }
    let filter = CommandFilter { status, agent_id: query.agent_id, limit, offset };
    let commands = state.persistence.send(ListCommands(filter)).await??;
    Ok(HttpResponse::Ok().json(json!({ "commands": commands, "limit": limit, "offset": offset })))
}

#[post("/commands/{id}/cancel")]
async fn cancel(state: web::Data<AppState>, id: web::Path<CommandId>) -> ApiResult {
    let id = id.into_inner();
    match state.persistence.send(CancelCommand(id)).await?? {
        CancelOutcome::Cancelled(record) => Ok(HttpResponse::Ok().json(record)),
        CancelOutcome::NotFound => Err(ApiError::NotFound(format!("no command {id}"))),
        CancelOutcome::TooLate(status) => {
            Err(ApiError::Conflict(format!("command {id} is {status}; only PENDING commands can be cancelled")))
        }
    }
}

#[get("/agents")]
async fn list_agents(state: web::Data<AppState>) -> ApiResult {
    let connected: HashSet<String> = state.dispatcher.send(ConnectedAgents).await?.into_iter().collect();
    let agents: Vec<Value> = state
        .persistence
        .send(ListAgents)
        .await??
        .into_iter()
        .map(|(agent, running)| {
            let connected = connected.contains(&agent.id);
            let mut view = json!(agent);
            view["connected"] = json!(connected);
            view["running"] = json!(running);
            view
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "agents": agents })))
}

#[get("/stats")]
async fn stats(state: web::Data<AppState>) -> ApiResult {
    let counts = state.persistence.send(CountByStatus).await??;
    let connected = state.dispatcher.send(ConnectedAgents).await?.len();
    let known = state.persistence.send(ListAgents).await??.len();
    let by_status: serde_json::Map<String, Value> = Status::ALL
        .into_iter()
        .map(|status| (status.as_str().to_string(), json!(counts.get(&status).copied().unwrap_or(0))))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "commands": by_status,
        "agents": { "known": known, "connected": connected },
    })))
}

/// Query of `POST /admin/fail/{actor}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailureQuery {
    #[serde(default)]
    mode: FailureMode,
}

#[post("/admin/fail/{actor}")]
async fn inject_failure(
    state: web::Data<AppState>,
    actor: web::Path<String>,
    query: web::Query<FailureQuery>,
) -> ApiResult {
    if !state.fault_injection {
        return Err(ApiError::NotFound("fault injection is disabled (start with --enable-fault-injection)".into()));
    }
    let failure = InjectFailure(query.into_inner().mode);
    match actor.as_str() {
        "dispatcher" => state.dispatcher.do_send(failure),
        "persistence" => state.persistence.do_send(failure),
        other => return Err(ApiError::NotFound(format!("no actor {other:?} (dispatcher or persistence)"))),
    }
    Ok(HttpResponse::Accepted().json(json!({ "failed": actor.as_str() })))
}

#[get("/ws")]
async fn agent_socket(
    state: web::Data<AppState>,
    req: HttpRequest,
    stream: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let session = AgentSession::new(state.dispatcher.clone(), state.persistence.clone(), state.heartbeat);
    ws::WsResponseBuilder::new(session, &req, stream).frame_size(MAX_FRAME_BYTES).start()
}
