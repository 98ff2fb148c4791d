//! Runtime events in every envelope era, and the `/global/event` wrapper. The envelope stays in
//! here: callers get an [`Event`] or a part to rewrite in place.

use serde_json::{Map, Value};

use super::{MessageInfo, Part, Session, SessionStatus};

/// One runtime event, whatever its envelope era:
/// A `{type, properties}`, B the same plus `message.part.delta`, C `{id, type, properties}`,
/// and `/global/event`'s wrapper `{directory, project, payload: event}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `evt_…` (era C only).
    pub id: Option<String>,
    /// `session.status`, `message.part.updated`, … (unknown types are kept).
    pub kind: String,
    pub properties: Value,
    /// From the `/global/event` wrapper.
    pub directory: Option<String>,
    /// From the `/global/event` wrapper.
    pub project: Option<String>,
}

impl Event {
    /// Parses one SSE `data:` payload. `None` for anything that is not an event the runtime's
    /// clients act on: not JSON, no `type`, or a `/global/event` `sync` payload (a replication
    /// record that duplicates the event sent next to it).
    pub fn parse(json: &[u8]) -> Option<Event> {
        let value: Value = serde_json::from_slice(json).ok()?;
        Event::from_value(value)
    }

    /// [`Event::parse`] for an already-parsed value.
    pub fn from_value(mut value: Value) -> Option<Event> {
        let wrapper = value.get("payload").is_some_and(Value::is_object);
        let (directory, project) = if wrapper {
            let s = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_owned);
            let pair = (s("directory"), s("project"));
            value = value.get_mut("payload").map(Value::take)?;
            pair
        } else {
            (None, None)
        };
        let kind = value.get("type")?.as_str()?.to_owned();
        if kind == "sync" {
            return None;
        }
        let id = value.get("id").and_then(Value::as_str).map(str::to_owned);
        let properties = value
            .get_mut("properties")
            .map(Value::take)
            .unwrap_or_else(|| Value::Object(Map::new()));
        Some(Event {
            id,
            kind,
            properties,
            directory,
            project,
        })
    }

    /// The `properties.part` of a `message.part.updated` event as sent (bare, or inside the
    /// `/global/event` wrapper), to rewrite a part in place without touching the envelope.
    pub fn part_in(raw: &mut Value) -> Option<&mut Value> {
        let event = match raw.get("payload").is_some_and(Value::is_object) {
            true => raw.get_mut("payload")?,
            false => raw,
        };
        event.get_mut("properties")?.get_mut("part")
    }

    /// A `session.error` for `session` in the envelope of `like` (same era, same
    /// `/global/event` wrapper), for telling a client why something it waits for will not come.
    pub fn session_error(like: &Event, session: &str, name: &str, message: &str) -> Event {
        Event {
            id: like.id.as_ref().map(|_| format!("evt_taskgate_{session}")),
            kind: "session.error".to_owned(),
            properties: serde_json::json!({
                "sessionID": session,
                "error": {"name": name, "data": {"message": message}},
            }),
            directory: like.directory.clone(),
            project: like.project.clone(),
        }
    }

    /// The event as the runtime would send it: `{id?, type, properties}`, inside
    /// `{directory, project, payload}` when `global`.
    pub fn to_value(&self, global: bool) -> Value {
        let mut event = serde_json::json!({"type": self.kind, "properties": self.properties});
        if let Some(id) = &self.id {
            event["id"] = Value::String(id.clone());
        }
        if !global {
            return event;
        }
        serde_json::json!({"directory": self.directory, "project": self.project, "payload": event})
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The session the event is about: `properties.sessionID`, else `info.sessionID` (messages),
    /// else `info.id` (sessions), else `part.sessionID`.
    pub fn session_id(&self) -> Option<&str> {
        let p = &self.properties;
        fn s(v: Option<&Value>) -> Option<&str> {
            v.and_then(Value::as_str)
        }
        s(p.get("sessionID"))
            .or_else(|| s(p.get("info").and_then(|i| i.get("sessionID"))))
            .or_else(|| {
                s(p.get("info").and_then(|i| i.get("id"))).filter(|id| id.starts_with("ses_"))
            })
            .or_else(|| s(p.get("part").and_then(|i| i.get("sessionID"))))
    }

    /// `session.status`: the new status.
    pub fn status(&self) -> Option<SessionStatus> {
        (self.kind == "session.status")
            .then(|| self.properties.get("status").map(SessionStatus::from_value))
            .flatten()
    }

    /// `session.idle` (sent right after status idle, for children too).
    pub fn is_idle(&self) -> bool {
        self.kind == "session.idle"
    }

    /// `message.part.updated`: the part.
    pub fn part(&self) -> Option<Part> {
        (self.kind == "message.part.updated")
            .then(|| self.properties.get("part").cloned().map(Part::from_value))
            .flatten()
    }

    /// `message.updated`: the message's info.
    pub fn message_info(&self) -> Option<MessageInfo> {
        if self.kind != "message.updated" {
            return None;
        }
        serde_json::from_value(self.properties.get("info")?.clone()).ok()
    }

    /// `session.created|updated|deleted`: the session.
    pub fn session_info(&self) -> Option<Session> {
        if !matches!(
            self.kind.as_str(),
            "session.created" | "session.updated" | "session.deleted"
        ) {
            return None;
        }
        serde_json::from_value(self.properties.get("info")?.clone()).ok()
    }

    /// Whether this event can change a session's terminal verdict. Streaming text
    /// (`message.part.delta`, text part updates), heartbeats and diffs cannot; reacting to them
    /// would re-read a busy tree on every token.
    pub fn affects_verdict(&self) -> bool {
        match self.kind.as_str() {
            "session.status"
            | "session.idle"
            | "session.error"
            | "session.created"
            | "session.updated"
            | "session.deleted"
            | "message.updated"
            | "message.removed"
            | "message.part.removed" => true,
            "message.part.updated" => self
                .properties
                .get("part")
                .and_then(|p| p.get("type"))
                .and_then(Value::as_str)
                .is_some_and(|t| t != "text" && t != "reasoning"),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_eras_and_wrapper() {
        // Era A: no id, delta on the part update, session id only on the part.
        let a = Event::parse(
            br#"{"type":"message.part.updated","properties":{"part":{"id":"prt_1","sessionID":"ses_a","messageID":"msg_1","type":"text","text":"hi"},"delta":"hi"}}"#,
        )
        .unwrap();
        assert_eq!(a.session_id(), Some("ses_a"));
        assert_eq!(a.part().unwrap().as_text().unwrap().text, "hi");
        assert!(
            !a.affects_verdict(),
            "streaming text must not trigger reads"
        );
        // Era C with the /global/event wrapper.
        let c = Event::parse(
            br#"{"directory":"/p","project":"global","payload":{"id":"evt_1","type":"session.status","properties":{"sessionID":"ses_c","status":{"type":"busy"}}}}"#,
        )
        .unwrap();
        assert_eq!(c.id.as_deref(), Some("evt_1"));
        assert_eq!(c.directory.as_deref(), Some("/p"));
        assert_eq!(c.status(), Some(SessionStatus::Busy));
        assert_eq!(c.session_id(), Some("ses_c"));
        // Session events without properties.sessionID: the info's id.
        let s = Event::parse(br#"{"type":"session.updated","properties":{"info":{"id":"ses_s","parentID":"ses_p","title":"t"}}}"#).unwrap();
        assert_eq!(s.session_id(), Some("ses_s"));
        assert_eq!(
            s.session_info().unwrap().parent_id.as_deref(),
            Some("ses_p")
        );
        // A message's id is not a session id.
        let m = Event::parse(br#"{"type":"message.updated","properties":{"info":{"id":"msg_1","sessionID":"ses_m","role":"assistant","time":{"created":1}}}}"#).unwrap();
        assert_eq!(m.session_id(), Some("ses_m"));
        assert!(m.message_info().unwrap().is_assistant());
        let d = Event::parse(br#"{"id":"evt_2","type":"message.part.delta","properties":{"sessionID":"ses_d","messageID":"msg_1","partID":"prt_1","field":"text","delta":"lau"}}"#).unwrap();
        assert_eq!(d.session_id(), Some("ses_d"));
        // sync payloads, garbage and unknown types.
        assert!(
            Event::parse(br#"{"directory":"/p","payload":{"type":"sync","syncEvent":{}}}"#)
                .is_none()
        );
        assert!(Event::parse(b"not json").is_none());
        let u = Event::parse(br#"{"type":"brand.new","properties":{"x":1}}"#).unwrap();
        assert_eq!(u.kind(), "brand.new");
        assert_eq!(u.session_id(), None);
    }
}
