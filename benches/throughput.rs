//! Server throughput benchmark: `cargo bench -p fleetd --bench throughput`.
//!
//! Starts the real `fleetd` binary on 127.0.0.1 with a fresh database,
//! connects simulated agents that answer every `Execute` at once (so the
//! numbers measure the server: REST, SQLite transactions with fsync, actor
//! messaging and WebSocket I/O, not command execution), submits commands over
//! REST and reports submission and completion rates.
//!
//! Environment: `BENCH_AGENTS` (default 20), `BENCH_CONCURRENCY` per agent
//! (default 8), `BENCH_COMMANDS` (default 2000), `BENCH_CLIENTS` parallel
//! REST clients (default 16).

use fleet_protocol::{AgentMessage, AttemptReport, JournalSummary, Outcome, ServerMessage, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Starts fleetd and returns it with its base URL.
fn start_server(database: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetd"))
        .args(["--bind", "127.0.0.1:0", "--database"])
        .arg(database)
        .env("RUST_LOG", "warn,fleetd=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fleetd");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let url = loop {
        let line = lines.next().expect("fleetd exited").expect("read log");
        if let Some(at) = line.find("http://") {
            break line[at..].trim().to_string();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, url)
}

/// A simulated agent: completes every command immediately.
async fn simulated_agent(url: String, id: String, concurrency: u32) {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("{}/ws", url.replacen("http", "ws", 1)))
        .await
        .expect("agent connects");
    let hello = AgentMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: id,
        concurrency,
        journal: JournalSummary::default(),
    };
    socket.send(Message::text(serde_json::to_string(&hello).unwrap())).await.expect("hello");
    while let Some(Ok(frame)) = socket.next().await {
        let Message::Text(text) = frame else { continue };
        if let Ok(ServerMessage::Execute { attempt, .. }) = serde_json::from_str(&text) {
            let outcome = Outcome { success: true, result: json!({"ok": true, "tookMs": 0}) };
            let result = AgentMessage::Result(AttemptReport { attempt, outcome });
            if socket.send(Message::text(serde_json::to_string(&result).unwrap())).await.is_err() {
                return;
            }
        }
    }
}

async fn completed(http: &reqwest::Client, url: &str) -> u64 {
    let stats: Value = http.get(format!("{url}/stats")).send().await.unwrap().json().await.unwrap();
    stats["commands"]["COMPLETED"].as_u64().unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let agents = setting("BENCH_AGENTS", 20);
    let concurrency = setting("BENCH_CONCURRENCY", 8) as u32;
    let commands = setting("BENCH_COMMANDS", 2000);
    let clients = setting("BENCH_CLIENTS", 16);
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut server, url) = start_server(&dir.path().join("bench.db"));
    let http = reqwest::Client::new();

    for n in 0..agents {
        tokio::spawn(simulated_agent(url.clone(), format!("bench-{n}"), concurrency));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats: Value = http.get(format!("{url}/stats")).send().await.unwrap().json().await.unwrap();
        if stats["agents"]["connected"].as_u64() == Some(agents as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "agents did not connect: {stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let submitters: Vec<_> = (0..clients)
        .map(|client| {
            let (http, url) = (http.clone(), url.clone());
            let share = commands / clients + usize::from(client < commands % clients);
            tokio::spawn(async move {
                for _ in 0..share {
                    let response = http
                        .post(format!("{url}/commands"))
                        .json(&json!({"type": "DELAY", "payload": {"ms": 0}, "idempotent": true}))
                        .send()
                        .await
                        .expect("submit");
                    assert_eq!(response.status(), 201);
                }
            })
        })
        .collect();
    for submitter in submitters {
        submitter.await.expect("submitter");
    }
    let submitted_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while completed(&http, &url).await < commands as u64 {
        assert!(Instant::now() < deadline, "commands did not complete");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let completed_in = started.elapsed();
    let _ = server.kill();
    let _ = server.wait();

    let rate = |elapsed: Duration| commands as f64 / elapsed.as_secs_f64();
    println!("{agents} agents x {concurrency} slots, {commands} commands, {clients} REST clients");
    println!("submitted in {submitted_in:.2?} ({:.0} commands/s)", rate(submitted_in));
    println!("all completed in {completed_in:.2?} ({:.0} commands/s end to end)", rate(completed_in));
}
