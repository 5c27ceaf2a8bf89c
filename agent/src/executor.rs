//! Runs the commands a server asks for: `DELAY` and `HTTP_GET_JSON`.

use std::time::{Duration, Instant};

use fleet_protocol::{CommandSpec, Outcome};
use serde_json::{json, Value};

/// Most response-body bytes an `HTTP_GET_JSON` command reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most characters of a non-JSON body reported back.
pub const MAX_BODY_SNIPPET_CHARS: usize = 4096;
/// Deadline for a whole `HTTP_GET_JSON` request, body included.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Failure to set up the executor.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The HTTP client could not be built.
    #[error("cannot build HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
}

/// Called once in the middle of an execution; used to inject crashes.
pub type MidwayHook = Box<dyn FnOnce() + Send>;

/// Executes command specs; cheap to clone and share between tasks.
#[derive(Debug, Clone)]
pub struct Executor {
    http: reqwest::Client,
}

impl Executor {
    /// Creates an executor with its HTTP client.
    pub fn new() -> Result<Self, ExecutorError> {
        let http = reqwest::Client::builder().timeout(HTTP_TIMEOUT).build()?;
        Ok(Executor { http })
    }

    /// Runs `spec` to completion. `midway`, if given, is called part-way
    /// through: after a random fraction of a delay, or after an HTTP request
    /// completed but before its outcome is returned.
    pub async fn execute(&self, spec: &CommandSpec, midway: Option<MidwayHook>) -> Outcome {
        match spec {
            CommandSpec::Delay { ms } => delay(*ms, midway).await,
            CommandSpec::HttpGetJson { url } => {
                let outcome = self.http_get_json(url).await;
                if let Some(hook) = midway {
                    hook();
                }
                outcome
            }
        }
    }

    async fn http_get_json(&self, url: &str) -> Outcome {
        let mut response = match self.http.get(url).send().await {
            Ok(response) => response,
            Err(error) => return http_failure(None, 0, &error),
        };
        let status = response.status().as_u16();
        let mut body = Vec::new();
        let mut truncated = false;
        loop {
            match response.chunk().await {
                Ok(None) => break,
                Ok(Some(chunk)) => {
                    let room = MAX_BODY_BYTES - body.len();
                    if chunk.len() > room {
                        body.extend_from_slice(&chunk[..room]);
                        truncated = true;
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Err(error) => return http_failure(Some(status), body.len(), &error),
            }
        }
        Outcome {
            success: true,
            result: json!({
                "status": status,
                "body": describe_body(&body, truncated),
                "truncated": truncated,
                "bytesReturned": body.len(),
                "error": null,
            }),
        }
    }
}

/// Sleeps `ms` milliseconds, calling `midway` after a random fraction of it.
async fn delay(ms: u64, midway: Option<MidwayHook>) -> Outcome {
    let started = Instant::now();
    let total = Duration::from_millis(ms);
    match midway {
        Some(hook) => {
            let first_part = total.mul_f64(rand::random::<f64>());
            tokio::time::sleep(first_part).await;
            hook();
            tokio::time::sleep(total.saturating_sub(first_part)).await;
        }
        None => tokio::time::sleep(total).await,
    }
    let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Outcome { success: true, result: json!({"ok": true, "tookMs": took_ms}) }
}

/// The JSON reported as `body`: the parsed document when the complete body is
/// JSON, otherwise a (lossy UTF-8) snippet of it as a string.
fn describe_body(body: &[u8], truncated: bool) -> Value {
    if !truncated {
        if let Ok(document) = serde_json::from_slice::<Value>(body) {
            return document;
        }
    }
    Value::String(String::from_utf8_lossy(body).chars().take(MAX_BODY_SNIPPET_CHARS).collect())
}

fn http_failure(status: Option<u16>, bytes_returned: usize, error: &reqwest::Error) -> Outcome {
    Outcome {
        success: false,
        result: json!({
            "status": status,
            "body": null,
            "truncated": false,
            "bytesReturned": bytes_returned,
            "error": error_chain(error),
        }),
    }
}

/// `error` and its sources, joined with `: ` (reqwest hides the useful part
/// of the message, e.g. "connection refused", in the source chain).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Serves one HTTP response on 127.0.0.1 and returns its URL.
    fn serve_once(status_line: &'static str, body: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let head = format!("HTTP/1.1 {status_line}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        });
        format!("http://{address}/data")
    }

    fn http(url: String) -> CommandSpec {
        CommandSpec::HttpGetJson { url }
    }

    #[tokio::test]
    async fn delay_reports_measured_time_and_calls_the_hook() {
        let called = Arc::new(AtomicBool::new(false));
        let flag = called.clone();
        let hook: MidwayHook = Box::new(move || flag.store(true, Ordering::SeqCst));
        let outcome = Executor::new().unwrap().execute(&CommandSpec::Delay { ms: 30 }, Some(hook)).await;
        assert!(outcome.success);
        assert_eq!(outcome.result["ok"], json!(true));
        assert!(outcome.result["tookMs"].as_u64().unwrap() >= 30, "{outcome:?}");
        assert!(called.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn json_body_is_parsed() {
        let url = serve_once("200 OK", br#"{"hello":[1,2]}"#.to_vec());
        let outcome = Executor::new().unwrap().execute(&http(url), None).await;
        assert_eq!(
            outcome,
            Outcome {
                success: true,
                result: json!({"status": 200, "body": {"hello": [1, 2]}, "truncated": false,
                               "bytesReturned": 15, "error": null}),
            }
        );
    }

    #[tokio::test]
    async fn error_status_still_succeeds_with_text_body() {
        let url = serve_once("404 Not Found", b"nope".to_vec());
        let outcome = Executor::new().unwrap().execute(&http(url), None).await;
        assert!(outcome.success);
        assert_eq!(outcome.result["status"], json!(404));
        assert_eq!(outcome.result["body"], json!("nope"));
    }

    #[tokio::test]
    async fn large_body_is_truncated() {
        let url = serve_once("200 OK", vec![b'x'; MAX_BODY_BYTES + 10_000]);
        let outcome = Executor::new().unwrap().execute(&http(url), None).await;
        assert!(outcome.success);
        assert_eq!(outcome.result["truncated"], json!(true));
        assert_eq!(outcome.result["bytesReturned"], json!(MAX_BODY_BYTES));
        assert_eq!(outcome.result["body"].as_str().unwrap().len(), MAX_BODY_SNIPPET_CHARS);
    }

    #[tokio::test]
    async fn transport_errors_fail_the_command() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let executor = Executor::new().unwrap();
        for url in [format!("http://127.0.0.1:{port}/"), "not a url".to_string()] {
            let outcome = executor.execute(&http(url), None).await;
            assert!(!outcome.success);
            assert_eq!(outcome.result["status"], Value::Null);
            assert_eq!(outcome.result["bytesReturned"], json!(0));
            assert!(outcome.result["error"].as_str().is_some_and(|e| !e.is_empty()), "{outcome:?}");
        }
    }
}
