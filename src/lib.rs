//! fleetd: the control server of a fault-tolerant command-execution fleet.
//!
//! Architecture (one module per actor):
//! - [`persistence`]: the `Persistence` actor, sole owner of the SQLite database;
//! - [`dispatcher`]: the `Dispatcher` actor, which routes PENDING commands to agents;
//! - [`session`]: one `AgentSession` actor per agent WebSocket connection;
//! - [`api`]: REST handlers and the dashboard, talking to the actors by message.

pub mod api;
pub mod clock;
pub mod config;
pub mod dispatcher;
pub mod lifecycle;
pub mod persistence;
pub mod schema;
pub mod session;
pub mod supervision;
pub mod validation;

use actix::{Arbiter, Supervisor};
use actix_web::{web, App, HttpServer};
use config::Config;
use log::info;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Database(#[from] persistence::PersistenceError),
    /// Binding or serving HTTP failed.
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
}

/// Migrates the database, starts the supervised actors and serves HTTP until shutdown.
pub async fn run(config: Config) -> Result<(), ServerError> {
    persistence::migrate(&config.database)?;
    let database = config.database.clone();
    let persistence_arbiter = Arbiter::new();
    let persistence =
        Supervisor::start_in_arbiter(&persistence_arbiter.handle(), move |_| persistence::Persistence::new(database));
    let grace_period = config.grace_period();
    let dispatcher_persistence = persistence.clone();
    let dispatcher = Supervisor::start(move |_| dispatcher::Dispatcher::new(dispatcher_persistence, grace_period));
    let state = web::Data::new(api::AppState {
        persistence,
        dispatcher,
        heartbeat: config.heartbeat(),
        fault_injection: config.enable_fault_injection,
    });
    let server =
        HttpServer::new(move || App::new().app_data(state.clone()).configure(api::configure)).bind(&config.bind)?;
    for address in server.addrs() {
        info!("listening on http://{address}");
    }
    info!("database {}, grace period {:?}, heartbeat {:?}", config.database, grace_period, config.heartbeat().interval);
    server.run().await?;
    persistence_arbiter.stop();
    Ok(())
}
