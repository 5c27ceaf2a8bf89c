//! End-to-end tests of the REST API with real server and agent processes.

mod common;

use common::{scratch, Agent, Server, Target, WAIT};
use serde_json::{json, Value};
use std::collections::HashSet;

const GRACE_MS: u64 = 5_000;

#[test]
fn bad_input_gets_400_with_a_json_error() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let bad_commands = [
        json!({"type": "SHELL", "payload": {}}),
        json!({"type": "DELAY", "payload": {"ms": -5}}),
        json!({"type": "DELAY", "payload": {"ms": 10_000_000_000u64}}),
        json!({"type": "DELAY", "payload": {"ms": "soon"}}),
        json!({"type": "HTTP_GET_JSON", "payload": {"url": "ftp://127.0.0.1/x"}}),
        json!({"type": "HTTP_GET_JSON", "payload": {}}),
        json!({"type": "DELAY", "payload": {"ms": 1}, "agentId": "not valid!"}),
        json!({"type": "DELAY", "payload": {"ms": 1}, "surprise": 1}),
        json!({"payload": {"ms": 1}}),
        json!({"type": "DELAY", "payload": {"ms": 1}, "padding": "x".repeat(100_000)}),
    ];
    for command in bad_commands {
        let (status, body) = server.request("POST", "/commands", Some(command.clone()));
        assert_eq!(status, 400, "{command} -> {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    }
    let bad_broadcasts = [
        json!({"type": "DELAY", "payload": {"ms": 1}}),
        json!({"type": "DELAY", "payload": {"ms": 1}, "agentIds": []}),
        json!({"type": "DELAY", "payload": {"ms": 1}, "agentIds": ["a"], "all": true}),
    ];
    for broadcast in bad_broadcasts {
        let (status, body) = server.request("POST", "/commands/broadcast", Some(broadcast.clone()));
        assert_eq!(status, 400, "{broadcast} -> {body}");
    }
    let (status, body) = server.request(
        "POST",
        "/commands/broadcast",
        Some(json!({"type": "DELAY", "payload": {"ms": 1}, "all": true})),
    );
    assert_eq!(status, 409, "broadcast to all with no agent registered: {body}");
    for path in ["/commands/abc", "/commands?status=DONE", "/commands?limit=0", "/commands?offset=-1"] {
        let (status, body) = server.request("GET", path, None);
        assert_eq!(status, 400, "{path} -> {body}");
        assert!(body["error"].is_string());
    }
    for (method, path) in [("GET", "/commands/999"), ("POST", "/commands/999/cancel"), ("GET", "/nowhere")] {
        let (status, body) = server.request(method, path, None);
        assert_eq!(status, 404, "{path} -> {body}");
        assert!(body["error"].is_string());
    }
    assert_eq!(server.get("/stats")["commands"]["PENDING"], json!(0), "nothing bad was stored");
}

#[test]
fn pending_commands_can_be_cancelled_once() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let id = server.submit(json!({"type": "DELAY", "payload": {"ms": 10}, "agentId": "nobody"}));
    assert_eq!(server.command(id)["status"], "PENDING");
    let (status, body) = server.request("POST", &format!("/commands/{id}/cancel"), None);
    assert_eq!((status, body["status"].clone()), (200, json!("CANCELLED")), "{body}");
    let (status, body) = server.request("POST", &format!("/commands/{id}/cancel"), None);
    assert_eq!(status, 409, "{body}");
    let listed = server.get("/commands?status=CANCELLED&agentId=nobody");
    let ids: Vec<i64> =
        listed["commands"].as_array().unwrap().iter().map(|c| c["commandId"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![id]);
}

#[test]
fn a_retried_submission_with_an_idempotency_key_creates_nothing_new() {
    let dir = scratch();
    let mut server = Server::start(dir.path(), GRACE_MS);
    let command = json!({"type": "DELAY", "payload": {"ms": 5}, "agentId": "k-agent"});
    let submit = |server: &Server, command: &Value, key: &str| {
        server.request_with_headers("POST", "/commands", Some(command.clone()), &[("Idempotency-Key", key)])
    };
    let (status, first) = submit(&server, &command, "order-17");
    assert_eq!(status, 201, "{first}");
    // The key is stored in the same transaction as the command: it survives a crash.
    server.kill();
    server.restart();
    let (status, retried) = submit(&server, &command, "order-17");
    assert_eq!((status, &retried), (200, &first));
    let (status, other) = submit(&server, &json!({"type": "DELAY", "payload": {"ms": 6}}), "order-17");
    assert_eq!(status, 422, "{other}");
    let (status, second) = submit(&server, &command, "order-18");
    assert_eq!(status, 201, "{second}");
    assert_ne!(second, first);
    let (status, body) = submit(&server, &command, "");
    assert_eq!(status, 400, "{body}");
    assert_eq!(server.get("/stats")["commands"]["PENDING"], json!(2), "one command per key");

    let _agent = Agent::start(dir.path(), &server.url, "k-agent", &[]);
    server.wait_connected(&["k-agent"]);
    let broadcast = json!({"type": "DELAY", "payload": {"ms": 5}, "all": true});
    let (status, first) = server.request_with_headers(
        "POST",
        "/commands/broadcast",
        Some(broadcast.clone()),
        &[("Idempotency-Key", "b-1")],
    );
    assert_eq!(status, 201, "{first}");
    let (status, again) =
        server.request_with_headers("POST", "/commands/broadcast", Some(broadcast), &[("Idempotency-Key", "b-1")]);
    assert_eq!((status, &again), (200, &first));
}

#[test]
fn offline_agent_receives_its_queued_commands_when_it_connects() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let ids: Vec<i64> = (0..3)
        .map(|_| server.submit(json!({"type": "DELAY", "payload": {"ms": 20}, "agentId": "late-agent"})))
        .collect();
    for id in &ids {
        assert_eq!(server.command(*id)["status"], "PENDING");
    }
    let _agent = Agent::start(dir.path(), &server.url, "late-agent", &[]);
    for command in server.wait_all_final(&ids, WAIT) {
        assert_eq!(command["status"], "COMPLETED", "{command}");
        assert_eq!(command["agentId"], "late-agent");
        assert_eq!(command["result"]["ok"], json!(true));
        assert!(command["result"]["tookMs"].as_u64().is_some_and(|ms| ms >= 20), "{command}");
    }
}

#[test]
fn broadcast_reaches_every_agent_once() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let names = ["b-1", "b-2", "b-3"];
    let _agents: Vec<Agent> = names.iter().map(|id| Agent::start(dir.path(), &server.url, id, &[])).collect();
    server.wait_connected(&names);

    let (status, body) = server.request(
        "POST",
        "/commands/broadcast",
        Some(json!({"type": "DELAY", "payload": {"ms": 10}, "all": true})),
    );
    assert_eq!(status, 201, "{body}");
    let (status, listed) = server.request(
        "POST",
        "/commands/broadcast",
        Some(json!({"type": "DELAY", "payload": {"ms": 10}, "agentIds": ["b-1", "b-3", "b-1"]})),
    );
    assert_eq!(status, 201, "{listed}");

    for (response, expected) in [(&body, vec!["b-1", "b-2", "b-3"]), (&listed, vec!["b-1", "b-3"])] {
        let ids: Vec<i64> = response["commandIds"].as_array().unwrap().iter().map(|id| id.as_i64().unwrap()).collect();
        let done = server.wait_all_final(&ids, WAIT);
        let ran_on: HashSet<&str> = done.iter().map(|c| c["agentId"].as_str().unwrap()).collect();
        assert_eq!(ran_on, expected.into_iter().collect::<HashSet<_>>());
        assert!(done.iter().all(|c| c["status"] == "COMPLETED" && c["attempts"] == 1), "{done:?}");
    }
}

#[test]
fn untargeted_commands_spread_over_agents_and_report_http_results() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let target = Target::start();
    let _agents: Vec<Agent> =
        ["s-1", "s-2"].iter().map(|id| Agent::start(dir.path(), &server.url, id, &["--concurrency", "2"])).collect();
    server.wait_connected(&["s-1", "s-2"]);
    let ids: Vec<i64> = (0..8)
        .map(|n| {
            server.submit(
                json!({"type": "HTTP_GET_JSON", "payload": {"url": target.url_for(&format!("/spread/{n}"), 300)}}),
            )
        })
        .collect();
    let done = server.wait_all_final(&ids, WAIT);
    for (n, command) in done.iter().enumerate() {
        assert_eq!(command["status"], "COMPLETED", "{command}");
        let result = &command["result"];
        assert_eq!(result["status"], 200, "{command}");
        assert_eq!(result["body"]["path"], json!(format!("/spread/{n}")));
        assert_eq!(result["truncated"], false);
        assert!(result["bytesReturned"].as_u64().is_some_and(|b| b > 0));
        assert!(result["error"].is_null());
        assert_eq!(target.hits(&format!("/spread/{n}")), 1);
    }
    let used: HashSet<&str> = done.iter().map(|c| c["agentId"].as_str().unwrap()).collect();
    assert_eq!(used.len(), 2, "least-loaded routing used both agents: {done:?}");
}

#[test]
fn unreachable_http_target_fails_the_command_with_an_error() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let _agent = Agent::start(dir.path(), &server.url, "e-1", &[]);
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let id =
        server.submit(json!({"type": "HTTP_GET_JSON", "payload": {"url": format!("http://127.0.0.1:{closed_port}/")}}));
    let command = server.wait_status(id, &["COMPLETED", "FAILED"]);
    assert_eq!(command["status"], "FAILED", "{command}");
    assert!(command["result"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{command}");
}

/// Makes an actor fail mid-flight and checks that work submitted before and
/// after the failure still completes.
fn survives_actor_failure(actor: &str, mode: &str) {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let _agent = Agent::start(dir.path(), &server.url, "f-1", &["--concurrency", "2"]);
    server.wait_connected(&["f-1"]);
    let mut ids: Vec<i64> =
        (0..4).map(|_| server.submit(json!({"type": "DELAY", "payload": {"ms": 300}, "idempotent": true}))).collect();
    let (status, body) = server.request("POST", &format!("/admin/fail/{actor}?mode={mode}"), None);
    assert_eq!(status, 202, "{body}");
    ids.extend((0..4).map(|_| server.submit(json!({"type": "DELAY", "payload": {"ms": 50}}))));
    let done = server.wait_all_final(&ids, WAIT);
    assert!(done.iter().all(|c| c["status"] == "COMPLETED" && c["attempts"] == 1), "{done:?}");
    server.wait_connected(&["f-1"]);
}

#[test]
fn commands_complete_after_the_dispatcher_fails() {
    survives_actor_failure("dispatcher", "stop");
}

#[test]
fn commands_complete_after_the_dispatcher_panics() {
    survives_actor_failure("dispatcher", "panic");
}

#[test]
fn commands_complete_after_the_persistence_actor_fails() {
    survives_actor_failure("persistence", "stop");
}

#[test]
fn commands_complete_after_the_persistence_actor_panics() {
    survives_actor_failure("persistence", "panic");
}

#[test]
fn fault_injection_rejects_unknown_actors_and_modes() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let (status, body) = server.request("POST", "/admin/fail/session", None);
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.request("POST", "/admin/fail/dispatcher?mode=explode", None);
    assert_eq!(status, 400, "{body}");
    assert_eq!(server.get("/health"), json!({"status": "ok"}));
}

#[test]
fn stats_and_agents_describe_the_fleet() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let mut agent = Agent::start(dir.path(), &server.url, "st-1", &[]);
    server.wait_connected(&["st-1"]);
    let id = server.submit(json!({"type": "DELAY", "payload": {"ms": 1}}));
    server.wait_status(id, &["COMPLETED"]);
    let stats = server.get("/stats");
    assert_eq!(stats["commands"]["COMPLETED"], 1, "{stats}");
    assert_eq!(stats["agents"], json!({"known": 1, "connected": 1}));
    agent.kill();
    server.wait_disconnected("st-1");
    assert_eq!(server.get("/health"), json!({"status": "ok"}));
}

#[test]
fn openapi_document_describes_every_route() {
    let dir = scratch();
    let server = Server::start(dir.path(), GRACE_MS);
    let document = server.get("/openapi.json");
    assert!(document["openapi"].as_str().is_some_and(|version| version.starts_with("3.")), "{}", document["openapi"]);

    let paths = document["paths"].as_object().expect("paths");
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort_unstable();
    assert_eq!(
        documented,
        [
            "/admin/fail/{actor}",
            "/agents",
            "/commands",
            "/commands/broadcast",
            "/commands/{id}",
            "/commands/{id}/cancel",
            "/health",
            "/openapi.json",
            "/stats",
        ]
    );

    // Every GET without a body or path parameter answers 200 on the live server.
    let takes_path_parameter = |item: &Value| {
        item["parameters"].as_array().is_some_and(|parameters| parameters.iter().any(|p| p["in"] == "path"))
    };
    let mut called = Vec::new();
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("path item") {
            let plain = method == "get"
                && operation.get("requestBody").is_none()
                && !path.contains('{')
                && !takes_path_parameter(item)
                && !takes_path_parameter(operation);
            if plain {
                assert!(operation["responses"]["200"].is_object(), "GET {path} documents no 200");
                server.get(path);
                called.push(path.as_str());
            }
        }
    }
    assert_eq!(called.len(), 5, "{called:?}");

    // Every $ref points to an existing schema.
    fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::Object(fields) => {
                for (key, field) in fields {
                    match (key.as_str(), field) {
                        ("$ref", Value::String(target)) => found.push(target),
                        _ => refs(field, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| refs(item, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(&document, &mut found);
    assert!(!found.is_empty());
    let schemas = document["components"]["schemas"].as_object().expect("components.schemas");
    for target in found {
        let name = target.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("unexpected $ref {target}"));
        assert!(schemas.contains_key(name), "$ref {target} names no schema");
    }
}
