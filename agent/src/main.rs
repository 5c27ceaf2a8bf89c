//! `fleet-agent`: connects to a fleetd server, executes the commands it
//! pushes and journals every step durably so that crashes lose nothing.

mod connection;
mod executor;
mod faults;
mod journal;
mod state;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use rand::Rng;

use crate::connection::{ConnectionError, ConnectionSettings};
use crate::executor::{Executor, ExecutorError};
use crate::faults::RandomFailures;
use crate::journal::{Journal, JournalError};
use crate::state::AgentState;

/// Command-line options; every flag can also be set through `FLEET_AGENT_*`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Base URL of the fleetd server.
    #[arg(long, env = "FLEET_AGENT_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Agent id; defaults to the one stored in `<journal>.id`, generated on first start.
    #[arg(long, env = "FLEET_AGENT_ID")]
    id: Option<String>,
    /// Path of the durable journal.
    #[arg(long, env = "FLEET_AGENT_JOURNAL", default_value = "fleet-agent.journal")]
    journal: PathBuf,
    /// Commands executed at once.
    #[arg(long, env = "FLEET_AGENT_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// Crash (abort) after running this many seconds.
    #[arg(long, env = "FLEET_AGENT_KILL_AFTER", value_name = "SECONDS")]
    kill_after: Option<u64>,
    /// Crash at a random point of each command with this probability.
    #[arg(long, env = "FLEET_AGENT_RANDOM_FAILURES", value_name = "P", num_args = 0..=1,
          default_missing_value = "0.3", value_parser = parse_probability)]
    random_failures: Option<f64>,
    /// Cap of the reconnect backoff, in milliseconds.
    #[arg(long, env = "FLEET_AGENT_MAX_BACKOFF_MS", default_value_t = 5000)]
    max_backoff_ms: u64,
    /// Reconnect when nothing is heard from the server for this many seconds.
    #[arg(long, env = "FLEET_AGENT_SERVER_TIMEOUT_SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..))]
    server_timeout_secs: u64,
}

fn parse_probability(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("expected a probability between 0 and 1, got {text:?}")),
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
enum StartupError {
    #[error("invalid agent id {0:?}: use 1 to 64 ASCII letters, digits, '-', '_' or '.'")]
    InvalidAgentId(String),
    #[error("agent id file {path}: {source}")]
    IdFile { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            log::error!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), StartupError> {
    let url = connection::websocket_url(&cli.server)?;
    let agent_id = resolve_agent_id(cli.id, &cli.journal)?;
    let (journal, recovered) = Journal::open(&cli.journal)?;
    log::info!(
        "agent {agent_id}: journal {} has {} unacknowledged result(s) and {} interrupted attempt(s)",
        cli.journal.display(),
        recovered.finished.len(),
        recovered.interrupted.len()
    );
    let random_failures = cli.random_failures.map(RandomFailures::new);
    if let Some(probability) = cli.random_failures {
        log::warn!("random failures enabled: each command crashes the agent with probability {probability}");
    }
    if let Some(seconds) = cli.kill_after {
        log::warn!("the agent will crash after {seconds}s (--kill-after)");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            faults::crash(&format!("--kill-after {seconds}s elapsed"));
        });
    }
    let state = AgentState::new(
        journal,
        recovered,
        usize::try_from(cli.concurrency).unwrap_or(usize::MAX),
        Executor::new()?,
        random_failures,
    );
    let settings = ConnectionSettings {
        url,
        agent_id,
        concurrency: cli.concurrency,
        server_timeout: Duration::from_secs(cli.server_timeout_secs),
        max_backoff: Duration::from_millis(cli.max_backoff_ms),
    };
    connection::run_forever(settings, state).await;
    Ok(())
}

/// The agent id: `--id` if given, else the one stored next to the journal,
/// else a freshly generated one that is stored (durably) for next time.
fn resolve_agent_id(flag: Option<String>, journal: &Path) -> Result<String, StartupError> {
    let id_path = journal::with_suffix(journal, ".id");
    let id_error = |source| StartupError::IdFile { path: id_path.clone(), source };

    let id = match flag {
        Some(id) => id,
        None => match fs::read_to_string(&id_path) {
            Ok(stored) => stored.trim().to_string(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let id = format!("agent-{:012x}", rand::thread_rng().gen_range(0..1u64 << 48));
                let mut file = File::create(&id_path).map_err(id_error)?;
                writeln!(file, "{id}").and_then(|()| file.sync_all()).map_err(id_error)?;
                journal::sync_parent_dir(&id_path).map_err(id_error)?;
                log::info!("generated agent id {id} (stored in {})", id_path.display());
                id
            }
            Err(error) => return Err(id_error(error)),
        },
    };
    if fleet_protocol::is_valid_agent_id(&id) {
        Ok(id)
    } else {
        Err(StartupError::InvalidAgentId(id))
    }
}
