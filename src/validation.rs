//! Validation of operator input: command types, payloads and agent ids.

use fleet_protocol::{is_valid_agent_id, CommandSpec, MAX_AGENT_ID_LEN};
use serde_json::Value;

/// Longest accepted `DELAY` (one hour).
pub const MAX_DELAY_MS: u64 = 3_600_000;
/// Longest accepted `HTTP_GET_JSON` URL.
pub const MAX_URL_LEN: usize = 2048;
/// Most agents one broadcast may name.
pub const MAX_BROADCAST_AGENTS: usize = 1000;

/// Why a request was rejected; the message is shown to the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

fn invalid(message: impl Into<String>) -> ValidationError {
    ValidationError(message.into())
}

/// Builds a command from its `type` and `payload`, checking both.
pub fn command_spec(command_type: &str, payload: &Value) -> Result<CommandSpec, ValidationError> {
    let fields = payload.as_object().ok_or_else(|| invalid("payload must be a JSON object"))?;
    let only = |allowed: &str| match fields.keys().find(|key| key.as_str() != allowed) {
        Some(extra) => Err(invalid(format!("unexpected field payload.{extra} for {command_type}"))),
        None => Ok(()),
    };
    match command_type {
        "DELAY" => {
            only("ms")?;
            let ms = fields.get("ms").ok_or_else(|| invalid("DELAY needs payload.ms"))?;
            let ms = ms
                .as_u64()
                .filter(|ms| *ms <= MAX_DELAY_MS)
                .ok_or_else(|| invalid(format!("payload.ms must be an integer from 0 to {MAX_DELAY_MS}, got {ms}")))?;
            Ok(CommandSpec::Delay { ms })
        }
        "HTTP_GET_JSON" => {
            only("url")?;
            let url = fields
                .get("url")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("HTTP_GET_JSON needs payload.url as a string"))?;
            check_url(url)?;
            Ok(CommandSpec::HttpGetJson { url: url.to_string() })
        }
        other => Err(invalid(format!("unknown command type {other:?} (expected DELAY or HTTP_GET_JSON)"))),
    }
}

fn check_url(url: &str) -> Result<(), ValidationError> {
    if url.len() > MAX_URL_LEN {
        return Err(invalid(format!("payload.url is longer than {MAX_URL_LEN} characters")));
    }
    let parsed = url::Url::parse(url).map_err(|e| invalid(format!("payload.url is not a valid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(invalid("payload.url must be an http:// or https:// URL with a host"));
    }
    Ok(())
}

/// Checks one agent id.
pub fn agent_id(id: &str) -> Result<(), ValidationError> {
    if is_valid_agent_id(id) {
        Ok(())
    } else {
        Err(invalid(format!("invalid agent id {id:?}: use 1 to {MAX_AGENT_ID_LEN} letters, digits, '-', '_' or '.'")))
    }
}

/// Checks a broadcast's agent list and removes duplicates, keeping order.
pub fn broadcast_agents(ids: Vec<String>) -> Result<Vec<String>, ValidationError> {
    if ids.is_empty() {
        return Err(invalid("agentIds must not be empty"));
    }
    if ids.len() > MAX_BROADCAST_AGENTS {
        return Err(invalid(format!("at most {MAX_BROADCAST_AGENTS} agentIds per broadcast")));
    }
    let mut unique = Vec::with_capacity(ids.len());
    for id in ids {
        agent_id(&id)?;
        if !unique.contains(&id) {
            unique.push(id);
        }
    }
    Ok(unique)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_valid_commands() {
        assert_eq!(command_spec("DELAY", &json!({"ms": 0})), Ok(CommandSpec::Delay { ms: 0 }));
        assert_eq!(
            command_spec("HTTP_GET_JSON", &json!({"url": "https://example.com/x?y=1"})),
            Ok(CommandSpec::HttpGetJson { url: "https://example.com/x?y=1".into() })
        );
    }

    #[test]
    fn rejects_bad_delays() {
        for payload in
            [json!({"ms": -1}), json!({"ms": 1.5}), json!({"ms": "10"}), json!({}), json!({"ms": MAX_DELAY_MS + 1})]
        {
            assert!(command_spec("DELAY", &payload).is_err(), "{payload}");
        }
        assert!(command_spec("DELAY", &json!({"ms": 1, "extra": true})).is_err());
        assert!(command_spec("DELAY", &json!([1])).is_err());
    }

    #[test]
    fn rejects_bad_urls() {
        for url in ["ftp://example.com", "file:///etc/passwd", "not a url", "http://"] {
            assert!(command_spec("HTTP_GET_JSON", &json!({"url": url})).is_err(), "{url}");
        }
        let long = format!("http://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(command_spec("HTTP_GET_JSON", &json!({"url": long})).is_err());
        assert!(command_spec("HTTP_GET_JSON", &json!({"url": 5})).is_err());
    }

    #[test]
    fn rejects_unknown_types() {
        let error = command_spec("SHELL", &json!({})).unwrap_err();
        assert!(error.0.contains("unknown command type"), "{error}");
    }

    #[test]
    fn broadcast_lists_are_checked_and_deduplicated() {
        assert_eq!(
            broadcast_agents(vec!["a".into(), "b".into(), "a".into()]),
            Ok(vec!["a".to_string(), "b".to_string()])
        );
        assert!(broadcast_agents(vec![]).is_err());
        assert!(broadcast_agents(vec!["bad id".into()]).is_err());
    }
}
