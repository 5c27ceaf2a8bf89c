//! The WebSocket connection to the server: connect, say `Hello`, relay
//! `Execute`/`Ack` to the agent state and results back, reconnect forever.

use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::{AgentMessage, ServerMessage, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::time::{interval, sleep, sleep_until, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

use crate::state::{AgentState, ExecuteDecision};

/// How often the agent pings the server.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long an unacknowledged result waits before being sent again.
pub const RESEND_AFTER: Duration = Duration::from_secs(2);
/// How often pending results are checked for resending.
const RESEND_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// First reconnect backoff.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a connection attempt or a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The server URL is not `http(s)://` or `ws(s)://`.
    #[error("server URL must start with http://, https://, ws:// or wss://: {0}")]
    InvalidServerUrl(String),
    /// Connecting took longer than the server timeout.
    #[error("timed out connecting")]
    ConnectTimeout,
    /// A WebSocket error (boxed: it is large).
    #[error("websocket: {0}")]
    WebSocket(Box<tungstenite::Error>),
    /// A message could not be serialized (should never happen).
    #[error("cannot serialize message: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The server closed the connection (with its reason, if it gave one).
    #[error("server closed the connection{0}")]
    ClosedByServer(String),
    /// Nothing arrived from the server for too long.
    #[error("no frame from the server for {0:?}")]
    ServerSilent(Duration),
}

impl From<tungstenite::Error> for ConnectionError {
    fn from(error: tungstenite::Error) -> Self {
        ConnectionError::WebSocket(Box::new(error))
    }
}

/// The WebSocket endpoint for server base URL `server`
/// (`http://h:p` becomes `ws://h:p/ws`, `https` becomes `wss`).
pub fn websocket_url(server: &str) -> Result<String, ConnectionError> {
    let server = server.trim().trim_end_matches('/');
    let (scheme, rest) =
        server.split_once("://").ok_or_else(|| ConnectionError::InvalidServerUrl(server.to_string()))?;
    let ws_scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        _ => return Err(ConnectionError::InvalidServerUrl(server.to_string())),
    };
    if rest.is_empty() {
        return Err(ConnectionError::InvalidServerUrl(server.to_string()));
    }
    Ok(format!("{ws_scheme}://{rest}/ws"))
}

/// Everything a connection needs besides the shared state.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// WebSocket URL, see [`websocket_url`].
    pub url: String,
    /// This agent's id.
    pub agent_id: String,
    /// Concurrency announced in `Hello`.
    pub concurrency: u32,
    /// Silence after which the server is considered gone.
    pub server_timeout: Duration,
    /// Cap of the reconnect backoff.
    pub max_backoff: Duration,
}

/// Connects to the server and serves it, reconnecting with exponential
/// backoff and full jitter whenever the connection fails or ends.
pub async fn run_forever(settings: ConnectionSettings, state: Arc<AgentState>) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        match connect(&settings).await {
            Err(error) => log::warn!("cannot connect to {}: {error}", settings.url),
            Ok(socket) => {
                log::info!("connected to {}", settings.url);
                let mut session = Session { socket, settings: &settings, state: &state, hello_sent: false };
                let error = session.serve().await;
                if session.hello_sent {
                    backoff = INITIAL_BACKOFF;
                }
                log::warn!("disconnected from {}: {error}", settings.url);
                let _ = session.socket.close(None).await;
            }
        }
        let pause = backoff.mul_f64(rand::thread_rng().gen_range(0.0..=1.0));
        sleep(pause).await;
        backoff = (backoff * 2).min(settings.max_backoff.max(INITIAL_BACKOFF));
    }
}

async fn connect(settings: &ConnectionSettings) -> Result<Socket, ConnectionError> {
    match tokio::time::timeout(settings.server_timeout, connect_async(settings.url.as_str())).await {
        Ok(Ok((socket, _response))) => Ok(socket),
        Ok(Err(error)) => Err(error.into()),
        Err(_elapsed) => Err(ConnectionError::ConnectTimeout),
    }
}

/// One established connection.
struct Session<'a> {
    socket: Socket,
    settings: &'a ConnectionSettings,
    state: &'a Arc<AgentState>,
    hello_sent: bool,
}

impl Session<'_> {
    /// Says `Hello`, then relays messages until the connection fails.
    async fn serve(&mut self) -> ConnectionError {
        match self.serve_until_error().await {
            Ok(never) => match never {},
            Err(error) => error,
        }
    }

    async fn serve_until_error(&mut self) -> Result<std::convert::Infallible, ConnectionError> {
        let hello = AgentMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: self.settings.agent_id.clone(),
            concurrency: self.settings.concurrency,
            journal: self.state.hello_summary(),
        };
        self.send(&hello).await?;
        self.hello_sent = true;

        let mut ping_tick = interval(PING_INTERVAL);
        ping_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut resend_tick = interval(RESEND_CHECK_INTERVAL);
        resend_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                frame = self.socket.next() => {
                    let frame = match frame {
                        None => return Err(ConnectionError::ClosedByServer(String::new())),
                        Some(frame) => frame?,
                    };
                    last_heard = Instant::now();
                    match frame {
                        Message::Text(text) => self.handle_text(&text).await?,
                        Message::Close(frame) => {
                            let reason = frame.map(|frame| format!(": {}", frame.reason)).unwrap_or_default();
                            return Err(ConnectionError::ClosedByServer(reason));
                        }
                        Message::Binary(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                }
                () = self.state.results_ready() => self.send_due_results().await?,
                _ = resend_tick.tick() => self.send_due_results().await?,
                _ = ping_tick.tick() => self.socket.send(Message::Ping(Vec::new())).await?,
                () = sleep_until(last_heard + self.settings.server_timeout) => {
                    return Err(ConnectionError::ServerSilent(self.settings.server_timeout));
                }
            }
        }
    }

    async fn handle_text(&mut self, text: &str) -> Result<(), ConnectionError> {
        let message = match serde_json::from_str::<ServerMessage>(text) {
            Ok(message) => message,
            Err(error) => {
                log::warn!("ignoring unparsable server message ({error}): {text:.200}");
                return Ok(());
            }
        };
        match message {
            ServerMessage::Execute { attempt, idempotent, spec } => {
                match self.state.execute(attempt, idempotent, spec) {
                    ExecuteDecision::Started => {}
                    ExecuteDecision::ResendResult(report) => {
                        log::info!(
                            "command {} attempt {} already finished; resending its result",
                            attempt.command_id,
                            attempt.attempt
                        );
                        self.send(&AgentMessage::Result(report)).await?;
                    }
                    ExecuteDecision::Refused(report) => self.send(&AgentMessage::Result(report)).await?,
                    ExecuteDecision::Ignore => log::info!(
                        "ignoring execute of command {} attempt {}: already known",
                        attempt.command_id,
                        attempt.attempt
                    ),
                }
            }
            ServerMessage::Ack(attempt) => self.state.acknowledge(attempt),
        }
        Ok(())
    }

    async fn send_due_results(&mut self) -> Result<(), ConnectionError> {
        for report in self.state.results_to_send(RESEND_AFTER) {
            self.send(&AgentMessage::Result(report)).await?;
        }
        Ok(())
    }

    async fn send(&mut self, message: &AgentMessage) -> Result<(), ConnectionError> {
        let text = serde_json::to_string(message)?;
        self.socket.send(Message::Text(text)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::Executor;
    use crate::journal::Journal;
    use fleet_protocol::{AttemptRef, CommandSpec, JournalSummary};
    use tokio::net::TcpListener;
    use tokio_tungstenite::accept_async;

    async fn next_message(socket: &mut WebSocketStream<TcpStream>) -> AgentMessage {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
                .await
                .expect("agent went silent")
                .expect("agent hung up")
                .expect("websocket error");
            if let Message::Text(text) = frame {
                return serde_json::from_str(&text).expect("agent sent invalid JSON");
            }
        }
    }

    async fn send(socket: &mut WebSocketStream<TcpStream>, message: &ServerMessage) {
        socket.send(Message::Text(serde_json::to_string(message).unwrap())).await.unwrap();
    }

    #[tokio::test]
    async fn agent_executes_reports_and_reconnects() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, recovered) = Journal::open(&dir.path().join("agent.journal")).unwrap();
        let state = AgentState::new(journal, recovered, 2, Executor::new().unwrap(), None);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = ConnectionSettings {
            url: websocket_url(&format!("http://{}", listener.local_addr().unwrap())).unwrap(),
            agent_id: "test-agent".into(),
            concurrency: 2,
            server_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_millis(200),
        };
        let agent = tokio::spawn(run_forever(settings, state));

        let mut socket = accept_async(listener.accept().await.unwrap().0).await.unwrap();
        let hello = next_message(&mut socket).await;
        assert_eq!(
            hello,
            AgentMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_id: "test-agent".into(),
                concurrency: 2,
                journal: JournalSummary::default(),
            }
        );
        let attempt = AttemptRef { command_id: 9, attempt: 1 };
        let execute = ServerMessage::Execute { attempt, idempotent: true, spec: CommandSpec::Delay { ms: 20 } };
        socket.send(Message::Text("not json".into())).await.unwrap();
        send(&mut socket, &execute).await;
        let AgentMessage::Result(report) = next_message(&mut socket).await else { panic!("expected a result") };
        assert_eq!(report.attempt, attempt);
        assert!(report.outcome.success);

        // A duplicate Execute gets the stored result, not a second execution.
        send(&mut socket, &execute).await;
        assert_eq!(next_message(&mut socket).await, AgentMessage::Result(report.clone()));

        // Unacknowledged results come back in the next Hello.
        drop(socket);
        let mut socket = accept_async(listener.accept().await.unwrap().0).await.unwrap();
        let AgentMessage::Hello { journal, .. } = next_message(&mut socket).await else { panic!("expected hello") };
        assert_eq!(journal.finished, vec![report]);

        send(&mut socket, &ServerMessage::Ack(attempt)).await;
        socket.close(None).await.unwrap();
        drop(socket);
        let mut socket = accept_async(listener.accept().await.unwrap().0).await.unwrap();
        let AgentMessage::Hello { journal, .. } = next_message(&mut socket).await else { panic!("expected hello") };
        assert_eq!(journal, JournalSummary::default());
        agent.abort();
    }

    #[test]
    fn server_urls_map_to_websocket_urls() {
        assert_eq!(websocket_url("http://127.0.0.1:8080").unwrap(), "ws://127.0.0.1:8080/ws");
        assert_eq!(websocket_url("https://fleet.example/").unwrap(), "wss://fleet.example/ws");
        assert_eq!(websocket_url("ws://h:1").unwrap(), "ws://h:1/ws");
        assert!(websocket_url("127.0.0.1:8080").is_err());
        assert!(websocket_url("ftp://h").is_err());
        assert!(websocket_url("http://").is_err());
    }
}
