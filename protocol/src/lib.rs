//! Wire protocol between the fleetd control server and its agents.
//!
//! Every WebSocket text frame carries exactly one JSON message. The agent
//! speaks first with [`AgentMessage::Hello`]; afterwards the server pushes
//! [`ServerMessage::Execute`] and the agent answers with
//! [`AgentMessage::Result`], which the server confirms with
//! [`ServerMessage::Ack`]. Liveness uses WebSocket ping/pong frames.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Server-assigned identifier of a command.
pub type CommandId = i32;

/// Attempt number of a command: incremented each time the server hands the
/// command to an agent. It is the fencing token that lets the server ignore
/// late or duplicate results from an attempt it has already given up on.
pub type Attempt = i32;

/// Version of this protocol, sent in [`AgentMessage::Hello`]; the server
/// refuses agents that speak another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest agent id the server accepts.
pub const MAX_AGENT_ID_LEN: usize = 64;

/// Whether `id` is an acceptable agent id: 1 to [`MAX_AGENT_ID_LEN`] ASCII
/// letters, digits, `-`, `_` or `.`.
pub fn is_valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_AGENT_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What a command asks an agent to do, serialized as
/// `{"type": "DELAY", "payload": {"ms": 500}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum CommandSpec {
    /// Sleep for `ms` milliseconds; result `{ok, tookMs}`.
    #[serde(rename = "DELAY")]
    Delay {
        /// Milliseconds to sleep.
        ms: u64,
    },
    /// GET `url` and report `{status, body, truncated, bytesReturned, error}`.
    #[serde(rename = "HTTP_GET_JSON")]
    HttpGetJson {
        /// An `http://` or `https://` URL.
        url: String,
    },
}

impl CommandSpec {
    /// The command type as it appears on the wire and in the database.
    pub fn type_name(&self) -> &'static str {
        match self {
            CommandSpec::Delay { .. } => "DELAY",
            CommandSpec::HttpGetJson { .. } => "HTTP_GET_JSON",
        }
    }
}

/// How an execution ended: the command's final status and its result JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// `true` when the command completed, `false` when it failed.
    pub success: bool,
    /// Command-specific result (for a failure it holds an `error` field).
    pub result: Value,
}

/// One attempt of one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRef {
    /// The command.
    pub command_id: CommandId,
    /// The attempt the agent was given.
    pub attempt: Attempt,
}

/// The outcome of one attempt, as reported by an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptReport {
    /// The command and attempt this outcome belongs to.
    #[serde(flatten)]
    pub attempt: AttemptRef,
    /// How the execution ended.
    pub outcome: Outcome,
}

/// What the agent's journal says, sent in [`AgentMessage::Hello`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JournalSummary {
    /// Attempts this agent process is executing right now.
    pub in_progress: Vec<AttemptRef>,
    /// Attempts that finished but whose result the server has not acknowledged.
    pub finished: Vec<AttemptReport>,
    /// Attempts a previous agent process started and never finished (it crashed).
    pub interrupted: Vec<AttemptRef>,
}

/// Messages from an agent to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum AgentMessage {
    /// First message on every connection: who the agent is and what it knows.
    #[serde(rename_all = "camelCase")]
    Hello {
        /// [`PROTOCOL_VERSION`] of the agent.
        protocol_version: u32,
        /// Stable agent id (see [`is_valid_agent_id`]).
        agent_id: String,
        /// How many commands the agent runs at once.
        concurrency: u32,
        /// The agent's journal, so the server can settle its RUNNING commands.
        journal: JournalSummary,
    },
    /// The outcome of an attempt; repeated until the server acknowledges it.
    Result(AttemptReport),
}

/// Messages from the server to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ServerMessage {
    /// Run this attempt of a command.
    #[serde(rename_all = "camelCase")]
    Execute {
        /// Which command and attempt.
        #[serde(flatten)]
        attempt: AttemptRef,
        /// Whether running the command twice is harmless.
        idempotent: bool,
        /// What to do.
        spec: CommandSpec,
    },
    /// The server has settled this attempt; the agent may forget it.
    Ack(AttemptRef),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn command_spec_uses_type_and_payload() {
        let spec: CommandSpec = serde_json::from_value(json!({"type": "DELAY", "payload": {"ms": 5}})).unwrap();
        assert_eq!(spec, CommandSpec::Delay { ms: 5 });
        assert_eq!(
            serde_json::to_value(CommandSpec::HttpGetJson { url: "http://x".into() }).unwrap(),
            json!({"type": "HTTP_GET_JSON", "payload": {"url": "http://x"}})
        );
    }

    #[test]
    fn messages_round_trip() {
        let attempt = AttemptRef { command_id: 7, attempt: 2 };
        let messages = vec![
            AgentMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_id: "a-1".into(),
                concurrency: 3,
                journal: JournalSummary {
                    in_progress: vec![attempt],
                    finished: vec![AttemptReport {
                        attempt,
                        outcome: Outcome { success: true, result: json!({"ok": true}) },
                    }],
                    interrupted: vec![],
                },
            },
            AgentMessage::Result(AttemptReport {
                attempt,
                outcome: Outcome { success: false, result: json!({"error": "x"}) },
            }),
        ];
        for message in messages {
            let text = serde_json::to_string(&message).unwrap();
            assert_eq!(serde_json::from_str::<AgentMessage>(&text).unwrap(), message);
        }
        let execute = ServerMessage::Execute { attempt, idempotent: true, spec: CommandSpec::Delay { ms: 1 } };
        let text = serde_json::to_string(&execute).unwrap();
        assert!(text.contains("\"commandId\":7"), "{text}");
        assert_eq!(serde_json::from_str::<ServerMessage>(&text).unwrap(), execute);
    }

    #[test]
    fn agent_ids_are_checked() {
        assert!(is_valid_agent_id("agent-1.eu_west"));
        assert!(!is_valid_agent_id(""));
        assert!(!is_valid_agent_id("has space"));
        assert!(!is_valid_agent_id(&"a".repeat(MAX_AGENT_ID_LEN + 1)));
    }
}
