//! Deliberate crashes for `--kill-after` and `--random-failures`, used to
//! exercise the system's crash recovery.

use std::io::Write;

use fleet_protocol::AttemptRef;
use rand::Rng;

/// Where in an attempt's life an injected crash happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Right after journaling `started`, before executing.
    AfterStarted,
    /// In the middle of execution, before anything is journaled.
    MidExecution,
    /// After journaling `finished`, before sending the result.
    AfterFinished,
}

/// Decides, per executed command, whether and where to crash.
#[derive(Debug, Clone, Copy)]
pub struct RandomFailures {
    probability: f64,
}

impl RandomFailures {
    /// Crashes with `probability` (clamped to `[0, 1]`) per command.
    pub fn new(probability: f64) -> Self {
        RandomFailures { probability: probability.clamp(0.0, 1.0) }
    }

    /// Draws the crash point for one command, if it is to crash at all.
    pub fn draw(&self) -> Option<CrashPoint> {
        let mut rng = rand::thread_rng();
        if !rng.gen_bool(self.probability) {
            return None;
        }
        Some(match rng.gen_range(0..3) {
            0 => CrashPoint::AfterStarted,
            1 => CrashPoint::MidExecution,
            _ => CrashPoint::AfterFinished,
        })
    }
}

/// Logs an injected crash of `attempt` at `point`, then aborts the process.
pub fn crash_at(point: CrashPoint, attempt: AttemptRef) -> ! {
    let when = match point {
        CrashPoint::AfterStarted => "after journaling started, before executing",
        CrashPoint::MidExecution => "in the middle of execution",
        CrashPoint::AfterFinished => "after journaling finished, before sending the result",
    };
    crash(&format!("random failure: crashing {when} (command {} attempt {})", attempt.command_id, attempt.attempt))
}

/// Logs `reason` as an error, flushes stderr and aborts the process.
pub fn crash(reason: &str) -> ! {
    log::error!("{reason}; aborting");
    log::logger().flush();
    let _ = std::io::stderr().flush();
    std::process::abort()
}
