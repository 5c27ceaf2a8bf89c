//! The `fleetd` binary: parses the configuration and runs the server.

use clap::Parser;
use std::process::ExitCode;

#[actix_web::main]
async fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Crash-only: a panic is a bug that leaves an actor in an unknown state, so
    // the process exits and, once restarted, recovers everything from the
    // database instead of limping on with a dead actor.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        log::error!("fleetd: panic, aborting so that a restart recovers from the database");
        std::process::abort();
    }));
    let config = fleetd::config::Config::parse();
    match fleetd::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("fleetd: {e}");
            ExitCode::FAILURE
        }
    }
}
