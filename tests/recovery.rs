//! Crash tests: real processes are SIGKILLed and restarted, and the outcome is
//! checked through the API, the database file and a local HTTP target that
//! counts real executions.

mod common;

use common::{database_statuses, scratch, wait_for, Agent, Server, Target, WAIT};
use serde_json::{json, Value};
use std::time::Duration;

const GRACE_MS: u64 = 3_000;

#[test]
fn idempotent_command_interrupted_by_an_agent_crash_runs_again() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let mut agent = Agent::start(dir.path(), &server.url, "k-1", &[]);
    let id = server.submit(json!({"type": "DELAY", "payload": {"ms": 1500}, "idempotent": true}));
    agent.wait_journal("started", id);
    agent.kill();
    agent.restart();
    let command = server.wait_status(id, &["COMPLETED", "FAILED"]);
    assert_eq!(command["status"], "COMPLETED", "{command}");
    assert_eq!(command["attempts"], 2, "{command}");
}

#[test]
fn non_idempotent_command_interrupted_by_an_agent_crash_fails_and_never_reruns() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let target = Target::start();
    let mut agent = Agent::start(dir.path(), &server.url, "k-2", &[]);
    let delay = server.submit(json!({"type": "DELAY", "payload": {"ms": 1500}}));
    let http = server.submit(json!({"type": "HTTP_GET_JSON", "payload": {"url": target.url_for("/once", 1500)}}));
    agent.wait_journal("started", delay);
    wait_for("the HTTP command to reach the target", WAIT, || (target.hits("/once") == 1).then_some(()));
    agent.kill();
    agent.restart();
    for id in [delay, http] {
        let command = server.wait_status(id, &["COMPLETED", "FAILED"]);
        assert_eq!(command["status"], "FAILED", "{command}");
        assert_eq!(command["attempts"], 1, "{command}");
        assert!(command["statusReason"].as_str().unwrap().contains("crashed"), "{command}");
    }
    // A later command proves the agent is back and has had every chance to misbehave.
    let probe = server.submit(json!({"type": "DELAY", "payload": {"ms": 1}}));
    server.wait_status(probe, &["COMPLETED"]);
    assert_eq!(target.hits("/once"), 1);
}

#[test]
fn result_finished_while_the_server_was_down_is_recovered_from_the_agent_journal() {
    let dir = scratch();
    let mut server = Server::start(dir.path(), GRACE_MS);
    let target = Target::start();
    let mut agent = Agent::start(dir.path(), &server.url, "j-1", &[]);
    let id = server.submit(json!({"type": "HTTP_GET_JSON", "payload": {"url": target.url_for("/journaled", 1000)}}));
    agent.wait_journal("started", id);
    server.kill();
    // The agent finishes, journals the result, cannot report it, and is killed.
    agent.wait_journal("finished", id);
    agent.kill();
    assert_eq!(database_statuses(server.database())[&id], ("RUNNING".to_string(), 1));

    server.restart();
    agent.restart();
    let command = server.wait_status(id, &["COMPLETED", "FAILED"]);
    assert_eq!(command["status"], "COMPLETED", "{command}");
    assert_eq!(command["attempts"], 1);
    assert_eq!(command["result"]["body"], json!({"path": "/journaled", "hit": 1}));
    assert_eq!(target.hits("/journaled"), 1, "the command was not run again");
    agent.wait_journal("acked", id);
}

#[test]
fn result_journaled_by_an_agent_that_crashed_before_reporting_it_is_recovered() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let target = Target::start();
    // Every command crashes the agent: after journaling its start, midway, or
    // after journaling its result but before sending it. Only the last leaves
    // a result to recover; keep going until that case has happened.
    let mut agent = Agent::start(dir.path(), &server.url, "rf-1", &["--random-failures=1"]);
    for n in 0..40 {
        let path = format!("/rf/{n}");
        let id = server.submit(json!({"type": "HTTP_GET_JSON", "payload": {"url": target.url_for(&path, 0)}}));
        wait_for("the agent to crash", WAIT, || (!agent.is_running()).then_some(()));
        agent.restart();
        let command = server.wait_status(id, &["COMPLETED", "FAILED"]);
        assert_eq!(command["attempts"], 1, "{command}");
        assert!(target.hits(&path) <= 1, "non-idempotent command ran twice: {command}");
        if command["status"] == "COMPLETED" {
            assert_eq!(target.hits(&path), 1);
            assert_eq!(command["result"]["body"]["path"], json!(path), "the journaled result: {command}");
            return;
        }
    }
    panic!("the agent never crashed between journaling a result and reporting it");
}

#[test]
fn server_crash_with_running_commands_loses_nothing_and_duplicates_nothing() {
    let dir = scratch();
    let mut server = Server::start(dir.path(), GRACE_MS);
    let target = Target::start();
    let _agents: Vec<Agent> =
        ["r-1", "r-2"].iter().map(|id| Agent::start(dir.path(), &server.url, id, &["--concurrency", "3"])).collect();
    server.wait_connected(&["r-1", "r-2"]);
    let ids: Vec<i64> = (0..10)
        .map(|n| {
            server.submit(json!({
                "type": "HTTP_GET_JSON",
                "payload": {"url": target.url_for(&format!("/s/{n}"), 1200)},
                "idempotent": n % 2 == 0,
            }))
        })
        .collect();
    wait_for("commands to be running", WAIT, || {
        let running = database_statuses(server.database()).values().filter(|(s, _)| s == "RUNNING").count();
        (running == 6).then_some(())
    });
    server.kill();
    let before = database_statuses(server.database());
    assert_eq!(before.len(), ids.len(), "every accepted command is in the database");

    server.restart();
    let done = server.wait_all_final(&ids, WAIT);
    for (n, command) in done.iter().enumerate() {
        assert_eq!(command["status"], "COMPLETED", "{command}");
        assert_eq!(command["attempts"], 1, "{command}");
        assert_eq!(target.hits(&format!("/s/{n}")), 1, "command {n} ran exactly once");
    }
    let after = database_statuses(server.database());
    assert!(after.values().all(|(status, attempts)| status == "COMPLETED" && *attempts == 1), "{after:?}");
}

#[test]
fn commands_of_an_agent_that_never_returns_are_settled_after_the_grace_period() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let mut lost = Agent::start(dir.path(), &server.url, "g-lost", &[]);
    server.wait_connected(&["g-lost"]);
    let idempotent = server.submit(json!({"type": "DELAY", "payload": {"ms": 60_000}, "idempotent": true}));
    let unsafe_id = server.submit(json!({"type": "DELAY", "payload": {"ms": 60_000}}));
    lost.wait_journal("started", idempotent);
    lost.wait_journal("started", unsafe_id);
    lost.kill();

    let failed = server.wait_status(unsafe_id, &["FAILED"]);
    assert!(failed["statusReason"].as_str().unwrap().contains("grace period"), "{failed}");
    let requeued = server.wait_status(idempotent, &["PENDING"]);
    assert_eq!(requeued["attempts"], 1);

    let _rescuer = Agent::start(dir.path(), &server.url, "g-rescuer", &[]);
    let rerun = server.wait_status(idempotent, &["RUNNING"]);
    assert_eq!((rerun["agentId"].clone(), rerun["attempts"].clone()), (json!("g-rescuer"), json!(2)));
}

#[test]
fn partitioned_agent_is_noticed_and_its_late_result_is_ignored() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let mut frozen = Agent::start(dir.path(), &server.url, "p-frozen", &[]);
    server.wait_connected(&["p-frozen"]);
    let id = server.submit(json!({"type": "DELAY", "payload": {"ms": 2000}, "idempotent": true}));
    frozen.wait_journal("started", id);
    frozen.signal("-STOP");

    server.wait_disconnected("p-frozen");
    server.wait_status(id, &["PENDING"]);
    let _healthy = Agent::start(dir.path(), &server.url, "p-healthy", &[]);
    let done = server.wait_status(id, &["COMPLETED"]);
    assert_eq!((done["agentId"].clone(), done["attempts"].clone()), (json!("p-healthy"), json!(2)));

    // The partition heals: the frozen agent finishes attempt 1 and reports it.
    frozen.signal("-CONT");
    frozen.wait_journal("acked", id);
    server.wait_connected(&["p-frozen", "p-healthy"]);
    let after = server.command(id);
    assert_eq!((after["agentId"].clone(), after["attempts"].clone()), (json!("p-healthy"), json!(2)));
    assert_eq!(after["result"], done["result"], "the stale result changed nothing");
    frozen.kill();
}

/// Runs three agents with failure flags under a restart loop until every
/// command is final, then checks that every idempotent command completed and
/// no non-idempotent command executed twice. Returns how many times agents
/// had to be restarted.
fn converge_despite_crashes(agent_flags: &[&str]) -> usize {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let target = Target::start();
    let mut agents: Vec<Agent> =
        ["c-1", "c-2", "c-3"].iter().map(|id| Agent::start(dir.path(), &server.url, id, agent_flags)).collect();
    let http_commands = (0..24).map(|n| {
        let path = format!("/c/{n}");
        let command = json!({"type": "HTTP_GET_JSON", "payload": {"url": target.url_for(&path, 300)}});
        (command, Some(path))
    });
    let delays = (0..6).map(|_| (json!({"type": "DELAY", "payload": {"ms": 300}}), None));
    let submitted: Vec<(i64, bool, Option<String>)> = http_commands
        .chain(delays)
        .enumerate()
        .map(|(n, (mut command, path))| {
            let idempotent = n % 2 == 0;
            command["idempotent"] = json!(idempotent);
            (server.submit(command), idempotent, path)
        })
        .collect();
    let ids: Vec<i64> = submitted.iter().map(|(id, _, _)| *id).collect();

    let mut restarts = 0;
    let done = wait_for("every command to reach a final status", Duration::from_secs(240), || {
        for agent in agents.iter_mut() {
            if agent.is_running() {
                continue;
            }
            agent.restart();
            restarts += 1;
        }
        let commands: Vec<Value> = ids.iter().map(|id| server.command(*id)).collect();
        commands.iter().all(|c| matches!(c["status"].as_str(), Some("COMPLETED" | "FAILED"))).then_some(commands)
    });
    for ((id, idempotent, path), command) in submitted.iter().zip(&done) {
        let completed = command["status"] == "COMPLETED";
        if *idempotent {
            assert!(completed, "idempotent command {id} is retried until it completes: {command}");
        }
        if let Some(path) = path {
            let hits = target.hits(path);
            if *idempotent {
                assert!(hits >= 1, "{command}");
            } else {
                assert!(hits <= 1, "non-idempotent command {id} executed {hits} times: {command}");
                assert!(!completed || hits == 1, "{command}");
            }
        }
    }
    restarts
}

#[test]
fn fleet_converges_with_agents_killed_every_second() {
    let restarts = converge_despite_crashes(&["--kill-after", "1", "--concurrency", "2"]);
    assert!(restarts >= 1, "--kill-after really killed agents");
}

#[test]
fn fleet_converges_with_random_agent_crashes() {
    let restarts = converge_despite_crashes(&["--random-failures", "--concurrency", "2"]);
    assert!(restarts >= 1, "--random-failures really crashed agents");
}
