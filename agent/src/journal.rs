//! Durable, append-only journal of command attempts (JSON lines).
//!
//! Every entry is written and `sync_data()`'d before the recording function
//! returns, so after a crash the journal tells exactly which attempts were
//! started, which finished (and with what outcome) and which the server has
//! acknowledged. Opening a journal replays it and compacts it, dropping every
//! acknowledged attempt; a long-running agent compacts it again whenever
//! acknowledged entries pile up.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use fleet_protocol::{Attempt, AttemptRef, AttemptReport, CommandId, Outcome};
use serde::{Deserialize, Serialize};

/// Failure to read, write or compact the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O operation on the journal file failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Another process holds the journal.
    #[error("journal {0} is in use by another agent process")]
    InUse(PathBuf),
    /// An entry could not be serialized (should never happen).
    #[error("cannot serialize journal entry: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
enum Entry {
    #[serde(rename_all = "camelCase")]
    Started { command_id: CommandId, attempt: Attempt, idempotent: bool },
    #[serde(rename_all = "camelCase")]
    Finished { command_id: CommandId, attempt: Attempt, outcome: Outcome },
    #[serde(rename_all = "camelCase")]
    Acked { command_id: CommandId, attempt: Attempt },
}

impl Entry {
    fn attempt_ref(&self) -> AttemptRef {
        let (command_id, attempt) = match self {
            Entry::Started { command_id, attempt, .. }
            | Entry::Finished { command_id, attempt, .. }
            | Entry::Acked { command_id, attempt } => (*command_id, *attempt),
        };
        AttemptRef { command_id, attempt }
    }
}

/// Lines after which an open journal is compacted, if most of them are about
/// acknowledged attempts.
const COMPACT_AFTER_LINES: usize = 1_000;

/// What the journal knows about one attempt.
#[derive(Debug, Default)]
struct ReplayedAttempt {
    /// `Some(idempotent)` once a `started` entry was seen.
    started: Option<bool>,
    finished: Option<Outcome>,
    acked: bool,
}

/// Unacknowledged attempts found when a journal is opened.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recovered {
    /// Attempts that finished but whose result the server never acknowledged.
    pub finished: Vec<AttemptReport>,
    /// Attempts a previous process started and never finished.
    pub interrupted: Vec<AttemptRef>,
}

/// An open journal, ready to record new entries.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Unacknowledged attempts: what a compaction keeps.
    live: HashMap<AttemptRef, ReplayedAttempt>,
    /// Lines in the file now.
    lines: usize,
    /// Exclusive lock on `<journal>.lock`, held while the journal is open.
    _lock: File,
}

impl Journal {
    /// Opens (or creates) the journal at `path`, replays it, compacts it and
    /// returns it together with the unacknowledged attempts it contained.
    pub fn open(path: &Path) -> Result<(Journal, Recovered), JournalError> {
        let io_error = |source| JournalError::Io { path: path.to_path_buf(), source };
        let lock = lock_journal(path)?;
        let (order, mut live) = replay(path).map_err(io_error)?;
        live.retain(|_, state| !state.acked);

        let mut recovered = Recovered::default();
        for attempt_ref in order {
            let Some(state) = live.get(&attempt_ref) else { continue };
            match &state.finished {
                Some(outcome) => {
                    recovered.finished.push(AttemptReport { attempt: attempt_ref, outcome: outcome.clone() })
                }
                None => recovered.interrupted.push(attempt_ref),
            }
        }
        let lines = compact(path, &live)?;
        let file = open_for_append(path)?;
        Ok((Journal { path: path.to_path_buf(), file, live, lines, _lock: lock }, recovered))
    }

    /// Durably records that `attempt` is about to be executed.
    pub fn record_started(&mut self, attempt: AttemptRef, idempotent: bool) -> Result<(), JournalError> {
        self.append(&Entry::Started { command_id: attempt.command_id, attempt: attempt.attempt, idempotent })?;
        self.live.entry(attempt).or_default().started = Some(idempotent);
        Ok(())
    }

    /// Durably records how an attempt ended.
    pub fn record_finished(&mut self, report: &AttemptReport) -> Result<(), JournalError> {
        self.append(&Entry::Finished {
            command_id: report.attempt.command_id,
            attempt: report.attempt.attempt,
            outcome: report.outcome.clone(),
        })?;
        self.live.entry(report.attempt).or_default().finished = Some(report.outcome.clone());
        Ok(())
    }

    /// Durably records that the server acknowledged `attempt`.
    /// Compacts the file when acknowledged entries make up most of it.
    pub fn record_acked(&mut self, attempt: AttemptRef) -> Result<(), JournalError> {
        self.append(&Entry::Acked { command_id: attempt.command_id, attempt: attempt.attempt })?;
        self.live.remove(&attempt);
        if self.lines > COMPACT_AFTER_LINES && self.lines > 4 * self.live.len() {
            self.lines = compact(&self.path, &self.live)?;
            self.file = open_for_append(&self.path)?;
        }
        Ok(())
    }

    fn append(&mut self, entry: &Entry) -> Result<(), JournalError> {
        let mut line = serde_json::to_string(entry)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|source| JournalError::Io { path: self.path.clone(), source })?;
        self.lines += 1;
        Ok(())
    }
}

/// Takes an exclusive lock on `<journal>.lock` so that two agent processes
/// never share (and corrupt) one journal.
fn lock_journal(path: &Path) -> Result<File, JournalError> {
    let lock_path = with_suffix(path, ".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| JournalError::Io { path: lock_path.clone(), source })?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(JournalError::InUse(path.to_path_buf())),
        Err(fs::TryLockError::Error(source)) => Err(JournalError::Io { path: lock_path, source }),
    }
}

/// `path` with `suffix` appended to its file name (`a.journal` → `a.journal.tmp`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Reads every entry of the journal (a missing file is an empty journal) and
/// folds them per attempt, remembering the order attempts first appeared in.
fn replay(path: &Path) -> io::Result<(Vec<AttemptRef>, HashMap<AttemptRef, ReplayedAttempt>)> {
    let mut order = Vec::new();
    let mut attempts: HashMap<AttemptRef, ReplayedAttempt> = HashMap::new();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok((order, attempts)),
        Err(error) => return Err(error),
    };
    let mut reader = BufReader::new(file);
    let mut raw_line = Vec::new();
    let mut line_number = 0;
    loop {
        raw_line.clear();
        if reader.read_until(b'\n', &mut raw_line)? == 0 {
            break;
        }
        line_number += 1;
        let is_last = !raw_line.ends_with(b"\n") || reader.fill_buf()?.is_empty();
        if raw_line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let entry: Entry = match serde_json::from_slice(&raw_line) {
            Ok(entry) => entry,
            Err(error) => {
                let position = if is_last { "last line (torn write?)" } else { "line" };
                log::warn!("journal {}: skipping unreadable {position} {line_number}: {error}", path.display());
                continue;
            }
        };
        let attempt_ref = entry.attempt_ref();
        let state = attempts.entry(attempt_ref).or_insert_with(|| {
            order.push(attempt_ref);
            ReplayedAttempt::default()
        });
        match entry {
            Entry::Started { idempotent, .. } => state.started = Some(idempotent),
            Entry::Finished { outcome, .. } => state.finished = Some(outcome),
            Entry::Acked { .. } => state.acked = true,
        }
    }
    Ok((order, attempts))
}

fn open_for_append(path: &Path) -> Result<File, JournalError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| JournalError::Io { path: path.to_path_buf(), source })
}

/// The entries that describe `live` attempts, in attempt order.
fn entries_of(live: &HashMap<AttemptRef, ReplayedAttempt>) -> Vec<Entry> {
    let mut attempts: Vec<(&AttemptRef, &ReplayedAttempt)> = live.iter().collect();
    attempts.sort_by_key(|(attempt, _)| (attempt.command_id, attempt.attempt));
    let mut entries = Vec::new();
    for (attempt, state) in attempts {
        let (command_id, attempt) = (attempt.command_id, attempt.attempt);
        if let Some(idempotent) = state.started {
            entries.push(Entry::Started { command_id, attempt, idempotent });
        }
        if let Some(outcome) = &state.finished {
            entries.push(Entry::Finished { command_id, attempt, outcome: outcome.clone() });
        }
    }
    entries
}

/// Atomically replaces the journal with the entries of the `live` attempts:
/// write `<journal>.tmp`, fsync it, rename it over the journal, fsync the
/// directory. Returns the number of lines written.
fn compact(path: &Path, live: &HashMap<AttemptRef, ReplayedAttempt>) -> Result<usize, JournalError> {
    let tmp_path = with_suffix(path, ".tmp");
    let tmp_error = |source| JournalError::Io { path: tmp_path.clone(), source };

    let entries = entries_of(live);
    let mut contents = String::new();
    for entry in &entries {
        contents.push_str(&serde_json::to_string(entry)?);
        contents.push('\n');
    }
    let mut tmp = File::create(&tmp_path).map_err(tmp_error)?;
    tmp.write_all(contents.as_bytes()).and_then(|()| tmp.sync_all()).map_err(tmp_error)?;
    drop(tmp);
    fs::rename(&tmp_path, path).map_err(tmp_error)?;
    sync_parent_dir(path).map_err(|source| JournalError::Io { path: path.to_path_buf(), source })?;
    Ok(entries.len())
}

/// Fsyncs the directory containing `path`, making a rename or create durable.
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attempt(command_id: CommandId, attempt: Attempt) -> AttemptRef {
        AttemptRef { command_id, attempt }
    }

    fn report(attempt_ref: AttemptRef) -> AttemptReport {
        AttemptReport {
            attempt: attempt_ref,
            outcome: Outcome { success: true, result: json!({"ok": true, "tookMs": 1}) },
        }
    }

    #[test]
    fn a_journal_cannot_be_opened_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (journal, _) = Journal::open(&path).unwrap();
        assert!(matches!(Journal::open(&path), Err(JournalError::InUse(_))));
        drop(journal);
        assert!(Journal::open(&path).is_ok());
    }

    #[test]
    fn missing_file_is_an_empty_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (_, recovered) = Journal::open(&dir.path().join("j")).unwrap();
        assert_eq!(recovered, Recovered::default());
    }

    #[test]
    fn replay_classifies_attempts_and_compaction_drops_acked_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.journal");
        {
            let (mut journal, _) = Journal::open(&path).unwrap();
            journal.record_started(attempt(1, 1), true).unwrap();
            journal.record_started(attempt(2, 1), false).unwrap();
            journal.record_started(attempt(3, 1), true).unwrap();
            journal.record_finished(&report(attempt(1, 1))).unwrap();
            journal.record_finished(&report(attempt(3, 1))).unwrap();
            journal.record_acked(attempt(3, 1)).unwrap();
        }
        let expected = Recovered { finished: vec![report(attempt(1, 1))], interrupted: vec![attempt(2, 1)] };
        let (_, recovered) = Journal::open(&path).unwrap();
        assert_eq!(recovered, expected);

        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains("\"commandId\":3"), "{text}");
        assert!(text.starts_with(r#"{"event":"started","commandId":1,"attempt":1,"idempotent":true}"#));
        assert!(!dir.path().join("agent.journal.tmp").exists());

        // Reopening the compacted journal yields the same state.
        let (_, recovered) = Journal::open(&path).unwrap();
        assert_eq!(recovered, expected);
    }

    #[test]
    fn torn_last_line_and_garbled_middle_line_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.journal");
        fs::write(
            &path,
            concat!(
                r#"{"event":"started","commandId":1,"attempt":1,"idempotent":true}"#,
                "\n",
                "garbage\n",
                r#"{"event":"started","commandId":2,"attempt":4,"idempotent":false}"#,
                "\n",
                r#"{"event":"finished","commandId":2,"attem"#,
            ),
        )
        .unwrap();
        let (mut journal, recovered) = Journal::open(&path).unwrap();
        assert_eq!(recovered.interrupted, vec![attempt(1, 1), attempt(2, 4)]);
        assert!(recovered.finished.is_empty());

        // New entries land on their own line after compaction.
        journal.record_acked(attempt(1, 1)).unwrap();
        drop(journal);
        let (_, recovered) = Journal::open(&path).unwrap();
        assert_eq!(recovered.interrupted, vec![attempt(2, 4)]);
    }

    #[test]
    fn a_long_running_journal_compacts_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.journal");
        let (mut journal, _) = Journal::open(&path).unwrap();
        journal.record_started(attempt(0, 1), false).unwrap();
        let rounds = COMPACT_AFTER_LINES / 3 + 10;
        for command_id in 1..=rounds {
            let command_id = CommandId::try_from(command_id).unwrap();
            journal.record_started(attempt(command_id, 1), true).unwrap();
            journal.record_finished(&report(attempt(command_id, 1))).unwrap();
            journal.record_acked(attempt(command_id, 1)).unwrap();
        }
        let lines = fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < COMPACT_AFTER_LINES / 2, "{lines} lines: the journal was compacted");
        journal.record_finished(&report(attempt(0, 1))).unwrap();
        drop(journal);
        let (_, recovered) = Journal::open(&path).unwrap();
        assert_eq!(recovered, Recovered { finished: vec![report(attempt(0, 1))], interrupted: vec![] });
    }
}
