//! The agent's shared state: the journal plus the attempts it is running,
//! has finished, or found interrupted, shared by the execution tasks and
//! whichever connection is current.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fleet_protocol::{AttemptRef, AttemptReport, CommandSpec, JournalSummary, Outcome};
use tokio::sync::{Notify, Semaphore};

use crate::executor::{Executor, MidwayHook};
use crate::faults::{crash_at, CrashPoint, RandomFailures};
use crate::journal::{Journal, Recovered};

/// What to do about an `Execute` message.
#[derive(Debug)]
pub enum ExecuteDecision {
    /// The attempt was journaled and is now running.
    Started,
    /// The attempt already finished: send this result again.
    ResendResult(AttemptReport),
    /// The attempt could not be journaled, so it was not run: report this
    /// failure (sent once, not journaled; if it is lost the server settles the
    /// attempt as unknown to the agent, which is the truth).
    Refused(AttemptReport),
    /// The attempt is already running or was interrupted: do nothing.
    Ignore,
}

/// A finished attempt waiting for the server's acknowledgement.
#[derive(Debug)]
struct PendingResult {
    report: AttemptReport,
    /// When it was last sent on the current connection (`None`: not yet).
    last_sent: Option<Instant>,
}

#[derive(Debug)]
struct Attempts {
    journal: Journal,
    in_progress: HashSet<AttemptRef>,
    finished: HashMap<AttemptRef, PendingResult>,
    interrupted: HashSet<AttemptRef>,
}

/// Shared agent state; clone the `Arc` to share it.
#[derive(Debug)]
pub struct AgentState {
    attempts: Mutex<Attempts>,
    results_ready: Notify,
    execution_slots: Arc<Semaphore>,
    executor: Executor,
    random_failures: Option<RandomFailures>,
}

fn sorted<T>(mut items: Vec<T>, key: impl Fn(&T) -> AttemptRef) -> Vec<T> {
    items.sort_by_key(|item| {
        let attempt = key(item);
        (attempt.command_id, attempt.attempt)
    });
    items
}

impl AgentState {
    /// Builds the state from a freshly opened journal and what it recovered.
    pub fn new(
        journal: Journal,
        recovered: Recovered,
        concurrency: usize,
        executor: Executor,
        random_failures: Option<RandomFailures>,
    ) -> Arc<Self> {
        let finished = recovered
            .finished
            .into_iter()
            .map(|report| (report.attempt, PendingResult { report, last_sent: None }))
            .collect();
        Arc::new(AgentState {
            attempts: Mutex::new(Attempts {
                journal,
                in_progress: HashSet::new(),
                finished,
                interrupted: recovered.interrupted.into_iter().collect(),
            }),
            results_ready: Notify::new(),
            execution_slots: Arc::new(Semaphore::new(concurrency)),
            executor,
            random_failures,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Attempts> {
        // A panic while holding the lock leaves the maps consistent enough
        // (every change is a single insert/remove), so keep going.
        self.attempts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The journal summary for a `Hello`; marks every pending result as sent
    /// now, since the `Hello` carries them.
    pub fn hello_summary(&self) -> JournalSummary {
        let mut attempts = self.lock();
        let now = Instant::now();
        for pending in attempts.finished.values_mut() {
            pending.last_sent = Some(now);
        }
        JournalSummary {
            in_progress: sorted(attempts.in_progress.iter().copied().collect(), |a| *a),
            finished: sorted(attempts.finished.values().map(|pending| pending.report.clone()).collect(), |report| {
                report.attempt
            }),
            interrupted: sorted(attempts.interrupted.iter().copied().collect(), |a| *a),
        }
    }

    /// Resolves when a new result may be ready to send.
    pub async fn results_ready(&self) {
        self.results_ready.notified().await
    }

    /// Pending results never sent on this connection or last sent at least
    /// `resend_after` ago; marks them as sent now.
    pub fn results_to_send(&self, resend_after: Duration) -> Vec<AttemptReport> {
        let mut attempts = self.lock();
        let now = Instant::now();
        let due = attempts
            .finished
            .values_mut()
            .filter(|pending| pending.last_sent.is_none_or(|sent| now.duration_since(sent) >= resend_after));
        let reports = due
            .map(|pending| {
                pending.last_sent = Some(now);
                pending.report.clone()
            })
            .collect();
        sorted(reports, |report| report.attempt)
    }

    /// Handles an `Execute`: unless the attempt is already known, journals
    /// `started` (durably, before returning) and spawns its execution.
    pub fn execute(self: &Arc<Self>, attempt: AttemptRef, idempotent: bool, spec: CommandSpec) -> ExecuteDecision {
        {
            let mut attempts = self.lock();
            if let Some(pending) = attempts.finished.get(&attempt) {
                return ExecuteDecision::ResendResult(pending.report.clone());
            }
            if attempts.in_progress.contains(&attempt) || attempts.interrupted.contains(&attempt) {
                return ExecuteDecision::Ignore;
            }
            if let Err(error) = attempts.journal.record_started(attempt, idempotent) {
                log::error!("not executing command {} attempt {}: {error}", attempt.command_id, attempt.attempt);
                let result = serde_json::json!({ "error": format!("agent could not journal the command, so did not run it: {error}") });
                return ExecuteDecision::Refused(AttemptReport {
                    attempt,
                    outcome: Outcome { success: false, result },
                });
            }
            attempts.in_progress.insert(attempt);
        }
        let crash_point = self.random_failures.and_then(|failures| failures.draw());
        if crash_point == Some(CrashPoint::AfterStarted) {
            crash_at(CrashPoint::AfterStarted, attempt);
        }
        log::info!("executing command {} attempt {}: {}", attempt.command_id, attempt.attempt, spec.type_name());
        let state = Arc::clone(self);
        tokio::spawn(async move {
            // The semaphore is never closed, so acquiring only fails in theory.
            let _slot = state.execution_slots.clone().acquire_owned().await.ok();
            let midway: Option<MidwayHook> = (crash_point == Some(CrashPoint::MidExecution))
                .then(|| Box::new(move || crash_at(CrashPoint::MidExecution, attempt)) as MidwayHook);
            let outcome = state.executor.execute(&spec, midway).await;
            state.finish(AttemptReport { attempt, outcome }, crash_point);
        });
        ExecuteDecision::Started
    }

    /// Journals `finished` for an attempt and queues its result for sending.
    fn finish(&self, report: AttemptReport, crash_point: Option<CrashPoint>) {
        let attempt = report.attempt;
        {
            let mut attempts = self.lock();
            if let Err(error) = attempts.journal.record_finished(&report) {
                log::error!(
                    "result of command {} attempt {} not journaled: {error}",
                    attempt.command_id,
                    attempt.attempt
                );
            }
            if crash_point == Some(CrashPoint::AfterFinished) {
                crash_at(CrashPoint::AfterFinished, attempt);
            }
            attempts.in_progress.remove(&attempt);
            log::info!(
                "finished command {} attempt {}: success={}",
                attempt.command_id,
                attempt.attempt,
                report.outcome.success
            );
            attempts.finished.insert(attempt, PendingResult { report, last_sent: None });
        }
        self.results_ready.notify_one();
    }

    /// Handles an `Ack`: journals it and forgets the attempt.
    pub fn acknowledge(&self, attempt: AttemptRef) {
        let mut attempts = self.lock();
        if let Err(error) = attempts.journal.record_acked(attempt) {
            log::warn!("ack of command {} attempt {} not journaled: {error}", attempt.command_id, attempt.attempt);
        }
        attempts.finished.remove(&attempt);
        attempts.interrupted.remove(&attempt);
        attempts.in_progress.remove(&attempt);
        log::info!("server acknowledged command {} attempt {}", attempt.command_id, attempt.attempt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attempt(command_id: i32, attempt: i32) -> AttemptRef {
        AttemptRef { command_id, attempt }
    }

    fn open_state(path: &std::path::Path) -> Arc<AgentState> {
        let (journal, recovered) = Journal::open(path).unwrap();
        AgentState::new(journal, recovered, 2, Executor::new().unwrap(), None)
    }

    #[tokio::test]
    async fn execution_is_journaled_reported_and_forgotten_after_ack() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.journal");
        let state = open_state(&path);
        let first = attempt(5, 1);

        assert!(matches!(state.execute(first, true, CommandSpec::Delay { ms: 50 }), ExecuteDecision::Started));
        assert_eq!(state.hello_summary().in_progress, vec![first]);
        assert!(matches!(state.execute(first, true, CommandSpec::Delay { ms: 50 }), ExecuteDecision::Ignore));

        state.results_ready().await;
        let sent = state.results_to_send(Duration::from_secs(2));
        assert_eq!(sent.len(), 1);
        assert!(sent[0].outcome.success);
        assert!(state.results_to_send(Duration::from_secs(2)).is_empty(), "not due yet");
        assert_eq!(state.results_to_send(Duration::ZERO).len(), 1, "resent when due");
        assert!(matches!(state.execute(first, true, CommandSpec::Delay { ms: 50 }), ExecuteDecision::ResendResult(_)));

        // A restarted agent still knows the unacknowledged result.
        drop(state);
        let restarted = open_state(&path);
        let summary = restarted.hello_summary();
        assert_eq!(summary.finished, sent);
        assert!(summary.interrupted.is_empty());

        restarted.acknowledge(first);
        assert_eq!(restarted.hello_summary(), JournalSummary::default());
        drop(restarted);
        assert_eq!(open_state(&path).hello_summary(), JournalSummary::default());
    }

    #[tokio::test]
    async fn interrupted_attempts_are_reported_never_executed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.journal");
        {
            let (mut journal, _) = Journal::open(&path).unwrap();
            journal.record_started(attempt(1, 2), false).unwrap();
            journal.record_started(attempt(3, 1), true).unwrap();
            journal
                .record_finished(&AttemptReport {
                    attempt: attempt(3, 1),
                    outcome: Outcome { success: true, result: json!({}) },
                })
                .unwrap();
        }
        let state = open_state(&path);
        let summary = state.hello_summary();
        assert_eq!(summary.interrupted, vec![attempt(1, 2)]);
        assert_eq!(summary.finished.len(), 1);
        assert!(matches!(state.execute(attempt(1, 2), false, CommandSpec::Delay { ms: 1 }), ExecuteDecision::Ignore));
        state.acknowledge(attempt(1, 2));
        assert!(state.hello_summary().interrupted.is_empty());
    }
}
