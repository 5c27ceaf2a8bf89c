//! The agent protocol seen from a hand-driven WebSocket client: handshake
//! rules, fencing of stale attempts and takeover by a newer connection.

mod common;

use common::{scratch, Server};
use fleet_protocol::{
    AgentMessage, AttemptRef, AttemptReport, CommandSpec, JournalSummary, Outcome, ServerMessage, PROTOCOL_VERSION,
};
use serde_json::json;
use std::net::TcpStream;
use std::time::Duration;
use tokio_tungstenite::tungstenite::stream::MaybeTlsStream;
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

/// A WebSocket client that speaks the agent protocol by hand.
struct RawAgent {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl RawAgent {
    fn connect(server: &Server) -> RawAgent {
        let url = format!("{}/ws", server.url.replacen("http", "ws", 1));
        let (socket, _) = tungstenite::connect(url).expect("websocket connect");
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
        }
        RawAgent { socket }
    }

    fn hello(server: &Server, agent_id: &str, journal: JournalSummary) -> RawAgent {
        let mut agent = Self::connect(server);
        agent.send(&AgentMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: agent_id.into(),
            concurrency: 1,
            journal,
        });
        agent
    }

    fn send(&mut self, message: &AgentMessage) {
        let text = serde_json::to_string(message).expect("encode");
        self.socket.send(Message::text(text)).expect("send");
    }

    /// The next protocol message (control frames are skipped).
    fn receive(&mut self) -> ServerMessage {
        loop {
            match self.socket.read().expect("read from server") {
                Message::Text(text) => return serde_json::from_str(&text).expect("server message"),
                Message::Close(frame) => panic!("server closed the connection: {frame:?}"),
                _ => {}
            }
        }
    }

    /// Waits for the server to close the connection; returns its reason.
    fn closed_reason(&mut self) -> String {
        loop {
            match self.socket.read() {
                Ok(Message::Close(frame)) => return frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                Ok(Message::Text(text)) => panic!("expected the connection to close, got {text}"),
                Ok(_) => {}
                Err(e) => panic!("connection ended without a close frame: {e}"),
            }
        }
    }

    fn execute(&mut self) -> (AttemptRef, CommandSpec) {
        match self.receive() {
            ServerMessage::Execute { attempt, spec, .. } => (attempt, spec),
            other => panic!("expected Execute, got {other:?}"),
        }
    }

    fn report(&mut self, attempt: AttemptRef, took_ms: u64) {
        let outcome = Outcome { success: true, result: json!({"ok": true, "tookMs": took_ms}) };
        self.send(&AgentMessage::Result(AttemptReport { attempt, outcome }));
        match self.receive() {
            ServerMessage::Ack(acked) => assert_eq!(acked, attempt),
            other => panic!("expected Ack, got {other:?}"),
        }
    }
}

#[test]
fn protocol_violations_close_the_connection_with_a_reason() {
    let dir = scratch();
    let server = Server::start(dir.path(), 5_000);
    let hello = |version: u32, agent_id: &str, concurrency: u32| AgentMessage::Hello {
        protocol_version: version,
        agent_id: agent_id.into(),
        concurrency,
        journal: JournalSummary::default(),
    };
    let result = AgentMessage::Result(AttemptReport {
        attempt: AttemptRef { command_id: 1, attempt: 1 },
        outcome: Outcome { success: true, result: json!({}) },
    });
    let cases: Vec<(Message, &str)> = vec![
        (Message::text(serde_json::to_string(&hello(PROTOCOL_VERSION + 1, "v", 1)).unwrap()), "protocol version"),
        (Message::text(serde_json::to_string(&hello(PROTOCOL_VERSION, "bad id", 1)).unwrap()), "invalid agent id"),
        (Message::text(serde_json::to_string(&hello(PROTOCOL_VERSION, "zero", 0)).unwrap()), "concurrency"),
        (Message::text(serde_json::to_string(&result).unwrap()), "before Hello"),
        (Message::text("{not json"), "unreadable message"),
        (Message::binary(vec![1, 2, 3]), "text frames"),
    ];
    for (frame, reason) in cases {
        let mut agent = RawAgent::connect(&server);
        agent.socket.send(frame).expect("send");
        let closed = agent.closed_reason();
        assert!(closed.contains(reason), "expected {reason:?}, got {closed:?}");
    }
    assert_eq!(server.get("/agents")["agents"], json!([]), "no agent was registered");
}

#[test]
fn results_of_a_superseded_attempt_are_acknowledged_but_ignored() {
    let dir = scratch();
    let server = Server::start(dir.path(), 5_000);
    let id = server.submit(json!({"type": "DELAY", "payload": {"ms": 10}, "idempotent": true}));

    let mut first = RawAgent::hello(&server, "fence", JournalSummary::default());
    let (attempt_one, spec) = first.execute();
    assert_eq!((i64::from(attempt_one.command_id), attempt_one.attempt), (id, 1));
    assert_eq!(spec, CommandSpec::Delay { ms: 10 });
    drop(first);

    // Reconnecting with a journal that never heard of attempt 1 loses it; the
    // idempotent command comes back as attempt 2.
    let mut second = RawAgent::hello(&server, "fence", JournalSummary::default());
    let (attempt_two, _) = second.execute();
    assert_eq!((attempt_two.command_id, attempt_two.attempt), (attempt_one.command_id, 2));

    second.report(attempt_one, 111);
    let command = server.command(id);
    assert_eq!((command["status"].clone(), command["attempts"].clone()), (json!("RUNNING"), json!(2)));

    second.report(attempt_two, 222);
    let command = server.command(id);
    assert_eq!(command["status"], "COMPLETED");
    assert_eq!(command["result"]["tookMs"], 222, "the current attempt's result is kept");
    second.report(attempt_two, 333);
    assert_eq!(server.command(id)["result"]["tookMs"], 222, "a duplicate result changes nothing");
}

#[test]
fn a_newer_connection_of_the_same_agent_takes_over() {
    let dir = scratch();
    let server = Server::start(dir.path(), 5_000);
    let mut old = RawAgent::hello(&server, "twin", JournalSummary::default());
    server.wait_connected(&["twin"]);
    let id = server.submit(json!({"type": "DELAY", "payload": {"ms": 10}, "agentId": "twin"}));
    let (attempt, _) = old.execute();
    assert_eq!(i64::from(attempt.command_id), id);

    // The agent reconnects while still executing: the attempt stays RUNNING.
    let journal = JournalSummary { in_progress: vec![attempt], ..JournalSummary::default() };
    let mut new = RawAgent::hello(&server, "twin", journal);
    assert!(old.closed_reason().contains("superseded"));
    assert_eq!(server.command(id)["status"], "RUNNING");
    new.report(attempt, 10);
    assert_eq!(server.command(id)["status"], "COMPLETED");
    assert_eq!(server.command(id)["attempts"], 1);
}
