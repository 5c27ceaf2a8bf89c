//! Command lifecycle: the statuses and the one rule for attempts whose fate is unknown.
//!
//! ```text
//! PENDING ──claim──▶ RUNNING ──result──▶ COMPLETED | FAILED
//!    │                  │
//!    └──cancel──▶ CANCELLED
//!                       └──attempt lost──▶ PENDING (idempotent) | FAILED (not idempotent)
//! ```

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// Where a command is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Waiting for an agent.
    Pending,
    /// Handed to exactly one agent, under attempt number `attempts`.
    Running,
    /// Finished successfully (final).
    Completed,
    /// Finished unsuccessfully or was lost while not idempotent (final).
    Failed,
    /// Cancelled by an operator before it ran (final).
    Cancelled,
}

impl Status {
    /// All statuses, in lifecycle order.
    pub const ALL: [Status; 5] =
        [Status::Pending, Status::Running, Status::Completed, Status::Failed, Status::Cancelled];

    /// The name stored in the database and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Running => "RUNNING",
            Status::Completed => "COMPLETED",
            Status::Failed => "FAILED",
            Status::Cancelled => "CANCELLED",
        }
    }

    /// Whether no further transition can happen.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of [`Status::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?} (expected one of PENDING, RUNNING, COMPLETED, FAILED, CANCELLED)")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| UnknownStatus(name.to_string()))
    }
}

/// Why the server gave up on a RUNNING attempt without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostAttempt {
    /// The agent's journal says the attempt started and never finished.
    Interrupted,
    /// The agent reconnected and its journal has no record of the attempt.
    UnknownToAgent,
    /// The agent stayed away longer than the grace period.
    AgentGone,
    /// The agent's connection closed before the attempt could be sent to it:
    /// the command provably never ran.
    NeverDelivered,
}

impl LostAttempt {
    fn describe(self) -> &'static str {
        match self {
            LostAttempt::Interrupted => "the agent crashed while executing it",
            LostAttempt::UnknownToAgent => "the agent reconnected without any record of receiving it",
            LostAttempt::AgentGone => "the agent did not come back within the grace period",
            LostAttempt::NeverDelivered => "the agent disconnected before the command could be sent to it",
        }
    }
}

/// What happens to a RUNNING command whose attempt was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The new status: PENDING (to run again) or FAILED.
    pub status: Status,
    /// Human-readable reason, stored with the command.
    pub reason: String,
}

/// The recovery rule: an idempotent command goes back to PENDING and runs
/// again; a non-idempotent one may already have had its effect, so it is
/// FAILED for an operator to review and never handed out a second time
/// (unless it provably never left the server).
pub fn resolve_lost_attempt(idempotent: bool, why: LostAttempt) -> Resolution {
    if idempotent || why == LostAttempt::NeverDelivered {
        Resolution { status: Status::Pending, reason: format!("requeued: {}", why.describe()) }
    } else {
        Resolution {
            status: Status::Failed,
            reason: format!(
                "not idempotent and its outcome is unknown: {}; review before resubmitting",
                why.describe()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_parse_case_insensitively_and_round_trip() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>().unwrap(), status);
            assert_eq!(status.as_str().to_lowercase().parse::<Status>().unwrap(), status);
        }
        assert!("DONE".parse::<Status>().is_err());
    }

    #[test]
    fn only_completed_failed_and_cancelled_are_final() {
        let finals: Vec<_> = Status::ALL.into_iter().filter(|s| s.is_final()).collect();
        assert_eq!(finals, vec![Status::Completed, Status::Failed, Status::Cancelled]);
    }

    #[test]
    fn lost_idempotent_attempts_are_requeued() {
        for why in [LostAttempt::Interrupted, LostAttempt::UnknownToAgent, LostAttempt::AgentGone] {
            let resolution = resolve_lost_attempt(true, why);
            assert_eq!(resolution.status, Status::Pending);
            assert!(resolution.reason.starts_with("requeued"));
        }
    }

    #[test]
    fn undelivered_attempts_are_requeued_even_when_not_idempotent() {
        for idempotent in [true, false] {
            assert_eq!(resolve_lost_attempt(idempotent, LostAttempt::NeverDelivered).status, Status::Pending);
        }
    }

    #[test]
    fn lost_non_idempotent_attempts_fail_for_review() {
        for why in [LostAttempt::Interrupted, LostAttempt::UnknownToAgent, LostAttempt::AgentGone] {
            let resolution = resolve_lost_attempt(false, why);
            assert_eq!(resolution.status, Status::Failed);
            assert!(resolution.reason.contains(why.describe()));
        }
    }
}
