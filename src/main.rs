//! The `fleetd` binary: parses the configuration and runs the server.

use clap::Parser;
use std::process::ExitCode;

#[actix_web::main]
async fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    fleetd::supervision::install_panic_hook();
    let config = fleetd::config::Config::parse();
    match fleetd::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("fleetd: {e}");
            ExitCode::FAILURE
        }
    }
}
