//! Test harness: spawns the real `fleetd` and `fleet-agent` binaries on
//! 127.0.0.1, talks to the REST API, and serves a local HTTP target that
//! counts how often each command really executed.

#![allow(dead_code)] // each test file uses a different part of the harness

use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Default time limit for waiting on a condition.
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls `condition` until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

fn binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_fleetd")).with_file_name(name);
    assert!(path.exists(), "{} is missing: run `cargo test --workspace`", path.display());
    path
}

/// Forwards a child's stderr to the test output (prefixed) and reports the
/// lines containing `needle`.
fn pipe_log(child: &mut Child, prefix: String, needle: Option<&'static str>) -> mpsc::Receiver<String> {
    let (found, receiver) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr is piped");
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{prefix}] {line}");
            if needle.is_some_and(|needle| line.contains(needle)) {
                let _ = found.send(line);
            }
        }
    });
    receiver
}

/// A scratch directory removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("fleetd-test").tempdir().expect("temp dir")
}

/// A running `fleetd` process.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    bind: String,
    database: PathBuf,
    grace_period_ms: u64,
    http: reqwest::blocking::Client,
}

impl Server {
    /// Starts a server on a free port with a fresh database in `dir`.
    pub fn start(dir: &Path, grace_period_ms: u64) -> Server {
        Self::spawn("127.0.0.1:0".into(), dir.join("fleetd.db"), grace_period_ms)
    }

    fn spawn(bind: String, database: PathBuf, grace_period_ms: u64) -> Server {
        let mut child = Command::new(binary("fleetd"))
            .args(["--bind", &bind, "--heartbeat-ms", "200", "--enable-fault-injection"])
            .arg("--database")
            .arg(&database)
            .args(["--grace-period-ms", &grace_period_ms.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleetd");
        let listening = pipe_log(&mut child, "fleetd".into(), Some("listening on http://"));
        let line = listening.recv_timeout(Duration::from_secs(30)).expect("fleetd did not start listening");
        let url = line[line.find("http://").expect("url in log line")..].trim().to_string();
        let bind = url.trim_start_matches("http://").to_string();
        let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().expect("http client");
        Server { child, url, bind, database, grace_period_ms, http }
    }

    /// SIGKILLs the server and waits for it to die.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill fleetd");
        self.child.wait().expect("reap fleetd");
    }

    /// Starts a new server process on the same port and database.
    pub fn restart(&mut self) {
        let fresh = Self::spawn(self.bind.clone(), self.database.clone(), self.grace_period_ms);
        let old = std::mem::replace(self, fresh);
        drop(old);
    }

    /// The database file.
    pub fn database(&self) -> &Path {
        &self.database
    }

    /// Sends a request and returns `(status, JSON body)`.
    pub fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.request_with_headers(method, path, body, &[])
    }

    /// Sends a request with extra headers and returns `(status, JSON body)`.
    pub fn request_with_headers(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let url = format!("{}{}", self.url, path);
        let request = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            other => panic!("unsupported method {other}"),
        };
        let request = headers.iter().fold(request, |request, (name, value)| request.header(*name, *value));
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        let response = request.send().expect("request to fleetd");
        let status = response.status().as_u16();
        let text = response.text().expect("response body");
        let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON body from {path}: {text}"));
        (status, body)
    }

    /// `GET path`, expecting 200.
    pub fn get(&self, path: &str) -> Value {
        let (status, body) = self.request("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Submits a command, expecting 201; returns its id.
    pub fn submit(&self, command: Value) -> i64 {
        let (status, body) = self.request("POST", "/commands", Some(command));
        assert_eq!(status, 201, "submit: {body}");
        body["commandId"].as_i64().expect("commandId")
    }

    /// The command's current state.
    pub fn command(&self, id: i64) -> Value {
        self.get(&format!("/commands/{id}"))
    }

    /// Waits until the command is in one of `statuses`; returns it.
    pub fn wait_status(&self, id: i64, statuses: &[&str]) -> Value {
        wait_for(&format!("command {id} to be {statuses:?}"), WAIT, || {
            let command = self.command(id);
            statuses.contains(&command["status"].as_str()?).then_some(command)
        })
    }

    /// Waits until each command is final; returns them.
    pub fn wait_all_final(&self, ids: &[i64], timeout: Duration) -> Vec<Value> {
        wait_for("all commands to be final", timeout, || {
            let commands: Vec<Value> = ids.iter().map(|id| self.command(*id)).collect();
            commands
                .iter()
                .all(|c| matches!(c["status"].as_str(), Some("COMPLETED" | "FAILED" | "CANCELLED")))
                .then_some(commands)
        })
    }

    /// Waits until the server lists exactly these agents as connected.
    pub fn wait_connected(&self, agent_ids: &[&str]) {
        wait_for(&format!("agents {agent_ids:?} to be connected"), WAIT, || {
            let connected = self.agents_connected();
            agent_ids.iter().all(|id| connected.get(*id) == Some(&true)).then_some(())
        })
    }

    /// Waits until the server lists the agent as known but not connected.
    pub fn wait_disconnected(&self, agent_id: &str) {
        wait_for(&format!("agent {agent_id} to be disconnected"), WAIT, || {
            (self.agents_connected().get(agent_id) == Some(&false)).then_some(())
        })
    }

    /// Every known agent and whether it is connected, per `GET /agents`.
    fn agents_connected(&self) -> HashMap<String, bool> {
        let agents = self.get("/agents");
        agents["agents"]
            .as_array()
            .expect("agents list")
            .iter()
            .filter_map(|agent| Some((agent["id"].as_str()?.to_string(), agent["connected"].as_bool()?)))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `fleet-agent` process.
pub struct Agent {
    child: Child,
    /// The agent's id.
    pub id: String,
    /// Its journal file.
    pub journal: PathBuf,
    server_url: String,
    extra_args: Vec<String>,
}

impl Agent {
    /// Starts agent `id` against `server_url`, journaling into `dir`.
    pub fn start(dir: &Path, server_url: &str, id: &str, extra_args: &[&str]) -> Agent {
        let journal = dir.join(format!("{id}.journal"));
        let extra_args: Vec<String> = extra_args.iter().map(|arg| arg.to_string()).collect();
        let child = Self::spawn(server_url, id, &journal, &extra_args);
        Agent { child, id: id.to_string(), journal, server_url: server_url.to_string(), extra_args }
    }

    fn spawn(server_url: &str, id: &str, journal: &Path, extra_args: &[String]) -> Child {
        let mut child = Command::new(binary("fleet-agent"))
            .args(["--server", server_url, "--id", id, "--max-backoff-ms", "300", "--server-timeout-secs", "3"])
            .arg("--journal")
            .arg(journal)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleet-agent");
        pipe_log(&mut child, id.to_string(), None);
        child
    }

    /// SIGKILLs the agent and waits for it to die.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        self.child.wait().expect("reap fleet-agent");
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the process: to its peers it
    /// looks like a network partition.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Whether the process is still alive (reaps it if not).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts a new process with the same id, journal and flags.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.server_url, &self.id, &self.journal, &self.extra_args);
    }

    /// The journal's text.
    pub fn journal_text(&self) -> String {
        std::fs::read_to_string(&self.journal).unwrap_or_default()
    }

    /// Waits until the journal has an entry of `event` for `command_id`.
    pub fn wait_journal(&self, event: &str, command_id: i64) {
        wait_for(&format!("{} journal to record {event} of command {command_id}", self.id), WAIT, || {
            self.journal_text()
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .any(|entry| entry["event"] == json!(event) && entry["commandId"] == json!(command_id))
                .then_some(())
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local HTTP server for `HTTP_GET_JSON` commands. `GET /any/path?delay_ms=N`
/// answers `{"path": ..., "hit": n}` after N ms and counts hits per path, so a
/// test knows exactly how many times each command really executed.
pub struct Target {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    hits: Arc<Mutex<HashMap<String, u32>>>,
}

impl Target {
    /// Starts the target on a free port.
    pub fn start() -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind target");
        let url = format!("http://{}", listener.local_addr().expect("target address"));
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let counter = Arc::clone(&hits);
        thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let counter = Arc::clone(&counter);
                thread::spawn(move || serve_target(stream, &counter));
            }
        });
        Target { url, hits }
    }

    /// URL of `path` that answers after `delay_ms`.
    pub fn url_for(&self, path: &str, delay_ms: u64) -> String {
        format!("{}{path}?delay_ms={delay_ms}", self.url)
    }

    /// How many requests `path` received.
    pub fn hits(&self, path: &str) -> u32 {
        self.hits.lock().expect("hits lock").get(path).copied().unwrap_or(0)
    }
}

fn serve_target(mut stream: TcpStream, hits: &Mutex<HashMap<String, u32>>) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(clone) => clone,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut header = String::new();
    while reader.read_line(&mut header).map(|n| n > 2).unwrap_or(false) {
        header.clear();
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let delay_ms: u64 =
        query.split('&').find_map(|pair| pair.strip_prefix("delay_ms=")).and_then(|ms| ms.parse().ok()).unwrap_or(0);
    let hit = {
        let mut hits = hits.lock().expect("hits lock");
        let count = hits.entry(path.to_string()).or_insert(0);
        *count += 1;
        *count
    };
    thread::sleep(Duration::from_millis(delay_ms));
    let body = json!({ "path": path, "hit": hit }).to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.flush();
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
}

/// Reads `(status, attempts)` of every command straight from the database file.
pub fn database_statuses(database: &Path) -> HashMap<i64, (String, i32)> {
    use diesel::prelude::*;
    use fleetd::schema::commands;
    let mut conn = SqliteConnection::establish(database.to_str().expect("utf-8 path")).expect("open database");
    commands::table
        .select((commands::id, commands::status, commands::attempts))
        .load::<(i32, String, i32)>(&mut conn)
        .expect("read commands")
        .into_iter()
        .map(|(id, status, attempts)| (i64::from(id), (status, attempts)))
        .collect()
}
