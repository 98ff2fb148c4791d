//! Sessions and their statuses (`GET /session/:id`, `/session/status`, `/global/health`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Extra;

/// `Session` as `GET /session/:id`, `/session/:id/children` and `session.*` events carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    /// Set on children only: the session that launched this one.
    #[serde(rename = "parentID", default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The agent (newer releases only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<SessionTime>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionTime {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<i64>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of `GET /session/status` or a `session.status` event.
///
/// The map lists only non-idle sessions; a session absent from it is idle *or never started*.
/// Any type this build does not know is kept as `Other` and counts as not idle: a new state
/// the runtime invents is far more likely "working in some new way" than "done".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionStatus {
    Idle,
    Busy,
    Retry {
        attempt: Option<u64>,
        message: Option<String>,
    },
    Other(String),
}

impl SessionStatus {
    /// Reads a status object leniently (`{"type":"busy"}`); anything unreadable is `Other`.
    pub fn from_value(value: &Value) -> SessionStatus {
        match value.get("type").and_then(Value::as_str) {
            Some("idle") => SessionStatus::Idle,
            Some("busy") => SessionStatus::Busy,
            Some("retry") => SessionStatus::Retry {
                attempt: value.get("attempt").and_then(Value::as_u64),
                message: value
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            },
            Some(other) => SessionStatus::Other(other.to_owned()),
            None => SessionStatus::Other(value.to_string()),
        }
    }

    pub fn is_idle(&self) -> bool {
        matches!(self, SessionStatus::Idle)
    }

    /// "idle", "busy", "retry" or the unknown type as sent.
    pub fn name(&self) -> &str {
        match self {
            SessionStatus::Idle => "idle",
            SessionStatus::Busy => "busy",
            SessionStatus::Retry { .. } => "retry",
            SessionStatus::Other(name) => name,
        }
    }
}

impl<'de> Deserialize<'de> for SessionStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(SessionStatus::from_value(&Value::deserialize(d)?))
    }
}

impl Serialize for SessionStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = Map::new();
        map.insert("type".into(), Value::String(self.name().to_owned()));
        if let SessionStatus::Retry { attempt, message } = self {
            if let Some(a) = attempt {
                map.insert("attempt".into(), Value::from(*a));
            }
            if let Some(m) = message {
                map.insert("message".into(), Value::String(m.clone()));
            }
        }
        Value::Object(map).serialize(s)
    }
}

/// `GET /session/status`: session id → status, non-idle sessions only.
pub type StatusMap = std::collections::HashMap<String, SessionStatus>;

/// `GET /global/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    #[serde(default)]
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_unknown_type_is_not_idle() {
        let s: SessionStatus = serde_json::from_value(json!({"type": "compacting"})).unwrap();
        assert_eq!(s, SessionStatus::Other("compacting".into()));
        assert!(!s.is_idle());
        let r: SessionStatus =
            serde_json::from_value(json!({"type":"retry","attempt":2,"message":"rate","next":1}))
                .unwrap();
        assert_eq!(r.name(), "retry");
        assert_eq!(serde_json::to_value(&r).unwrap()["attempt"], 2);
    }
}
