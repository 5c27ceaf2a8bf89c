//! Command-line behaviour of the `fleet-agent` binary. (Having an integration
//! test also makes `cargo test --workspace` build the binary that the server's
//! end-to-end tests spawn.)

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn agent(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fleet-agent"));
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

fn run(args: &[&str]) -> Output {
    agent(args).output().expect("run fleet-agent")
}

#[test]
fn invalid_flags_are_rejected_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("a.journal");
    let journal = journal.to_str().unwrap();
    for (args, message) in [
        (vec!["--id", "no spaces allowed", "--journal", journal], "invalid agent id"),
        (vec!["--random-failures=1.5", "--journal", journal], "probability"),
        (vec!["--concurrency", "0", "--journal", journal], "concurrency"),
        (vec!["--server", "ftp://127.0.0.1:1", "--journal", journal], "server URL"),
    ] {
        let output = run(&args);
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn generated_agent_id_is_persisted_next_to_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("a.journal");
    let id_file = dir.path().join("a.journal.id");
    // Nothing listens on port 1: the agent keeps retrying until killed.
    let mut child = agent(&["--server", "http://127.0.0.1:1", "--journal", journal.to_str().unwrap()])
        .spawn()
        .expect("spawn fleet-agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let written = loop {
        match std::fs::read_to_string(&id_file) {
            Ok(text) if text.ends_with('\n') => break text,
            _ => assert!(Instant::now() < deadline, "agent id file was not written"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let id = written.trim().to_string();
    assert!(id.starts_with("agent-") && fleet_protocol::is_valid_agent_id(&id), "{id}");
}
