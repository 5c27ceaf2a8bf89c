//! Server configuration, from command-line flags or `FLEETD_*` environment variables.

use crate::session::Heartbeat;
use clap::Parser;
use std::time::Duration;

/// fleetd control server.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the log says which).
    #[arg(long, env = "FLEETD_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// SQLite database file (created and migrated at boot).
    #[arg(long, env = "FLEETD_DATABASE", default_value = "fleetd.db")]
    pub database: String,
    /// How long a disconnected agent may take to come back before its RUNNING
    /// commands are settled without it (milliseconds).
    #[arg(long, env = "FLEETD_GRACE_PERIOD_MS", default_value_t = 30_000)]
    pub grace_period_ms: u64,
    /// Interval between WebSocket pings to agents (milliseconds).
    #[arg(long, env = "FLEETD_HEARTBEAT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub heartbeat_ms: u64,
    /// Missed heartbeats after which an agent connection is considered dead.
    #[arg(long, env = "FLEETD_HEARTBEAT_MISSES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub heartbeat_misses: u32,
    /// Enable `POST /admin/fail/{dispatcher|persistence}` (failure drills and tests).
    #[arg(long, env = "FLEETD_ENABLE_FAULT_INJECTION")]
    pub enable_fault_injection: bool,
}

impl Config {
    /// The grace period as a duration.
    pub fn grace_period(&self) -> Duration {
        Duration::from_millis(self.grace_period_ms)
    }

    /// Heartbeat interval and timeout for agent sessions.
    pub fn heartbeat(&self) -> Heartbeat {
        let interval = Duration::from_millis(self.heartbeat_ms);
        Heartbeat { interval, timeout: interval * self.heartbeat_misses }
    }
}
