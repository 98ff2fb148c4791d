//! Wire types of the OpenCode runtime (sessions, statuses, messages, parts, events in every
//! envelope era, the `/global/event` wrapper).
//!
//! The runtime changes its JSON from release to release, and taskgate sits in front of many
//! releases at once. So every type here is lenient: unknown fields are kept in `extra` (a proxy
//! that re-serializes a part must not lose what it did not understand), unknown part kinds and
//! event types are kept raw, and nothing the runtime adds is ever an error.

pub mod sse;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Fields a type does not name, kept so that re-serializing loses nothing.
pub type Extra = Map<String, Value>;

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

/// One entry of `GET /session/:id/message`: the message and its parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub info: MessageInfo,
    #[serde(default)]
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    /// A role this build does not know; treated as neither a pending turn nor an answer.
    #[serde(other)]
    Other,
}

/// A message's `info`. One struct for both roles (rather than an enum) so that a role or a
/// field a newer runtime adds never makes a whole history unreadable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageInfo {
    pub id: String,
    #[serde(rename = "sessionID", default)]
    pub session_id: String,
    pub role: Role,
    #[serde(default)]
    pub time: MessageTime,
    /// Assistant only: `stop | tool-calls | length | content-filter | error | other | unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish: Option<String>,
    /// Assistant only: why the message ended badly (`MessageAbortedError`, `APIError`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<MessageError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Assistant only: the user message this answers.
    #[serde(rename = "parentID", default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl MessageInfo {
    pub fn is_user(&self) -> bool {
        self.role == Role::User
    }

    pub fn is_assistant(&self) -> bool {
        self.role == Role::Assistant
    }

    /// An assistant message that ended its *turn*: completed, and either errored or finished
    /// with a reason other than `tool-calls`/`unknown` (a `tool-calls` step is always followed
    /// by another assistant message).
    pub fn ends_turn(&self) -> bool {
        if !self.is_assistant() || self.time.completed.is_none() {
            return false;
        }
        if self.error.is_some() {
            return true;
        }
        matches!(self.finish.as_deref(), Some(f) if f != "tool-calls" && f != "unknown")
    }

    /// Ended with `MessageAbortedError` (someone cancelled the session).
    pub fn is_aborted(&self) -> bool {
        self.error
            .as_ref()
            .is_some_and(|e| e.name == "MessageAbortedError")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessageTime {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    /// Absent while the message streams. Set on every step, so on its own it does not mean
    /// the turn ended (see [`MessageInfo::ends_turn`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<i64>,
}

/// `{name, data}` as the runtime reports errors on messages and in `session.error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageError {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub data: Value,
}

impl MessageError {
    /// `data.message` when there is one, else the error's name.
    pub fn message(&self) -> String {
        self.data
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| self.name.clone())
    }
}

/// A message part. The kinds the oracle reasons about are typed; every other kind (reasoning,
/// file, patch, agent, compaction, …) is kept raw as `Other` so it round-trips untouched.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(TextPart),
    /// Boxed: a tool part is several times larger than the other kinds.
    Tool(Box<ToolPart>),
    StepStart(StepPart),
    StepFinish(StepPart),
    Other(Value),
}

impl Part {
    /// Reads a part leniently: a known kind whose body does not fit its type is kept raw.
    pub fn from_value(value: Value) -> Part {
        fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
            serde_json::from_value(v.clone()).ok()
        }
        let kind = value.get("type").and_then(Value::as_str);
        let part = match kind {
            Some("text") => typed(&value).map(Part::Text),
            Some("tool") => typed::<ToolPart>(&value).map(|t| Part::Tool(Box::new(t))),
            Some("step-start") => typed(&value).map(Part::StepStart),
            Some("step-finish") => typed(&value).map(Part::StepFinish),
            _ => None,
        };
        part.unwrap_or(Part::Other(value))
    }

    /// The part's `type` as sent ("text", "tool", …).
    pub fn kind(&self) -> &str {
        match self {
            Part::Text(_) => "text",
            Part::Tool(_) => "tool",
            Part::StepStart(_) => "step-start",
            Part::StepFinish(_) => "step-finish",
            Part::Other(v) => v.get("type").and_then(Value::as_str).unwrap_or(""),
        }
    }

    pub fn as_text(&self) -> Option<&TextPart> {
        match self {
            Part::Text(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_tool(&self) -> Option<&ToolPart> {
        match self {
            Part::Tool(t) => Some(t),
            _ => None,
        }
    }

    /// The part back as JSON (the `type` field included), e.g. for a gate that rewrites it.
    pub fn to_value(&self) -> Value {
        let (kind, body) = match self {
            Part::Text(p) => ("text", serde_json::to_value(p)),
            Part::Tool(p) => ("tool", serde_json::to_value(p.as_ref())),
            Part::StepStart(p) => ("step-start", serde_json::to_value(p)),
            Part::StepFinish(p) => ("step-finish", serde_json::to_value(p)),
            Part::Other(v) => return v.clone(),
        };
        match body {
            Ok(Value::Object(mut map)) => {
                map.insert("type".into(), Value::String(kind.to_owned()));
                Value::Object(map)
            }
            // Serializing these plain structs cannot fail; keep the kind at least.
            _ => serde_json::json!({ "type": kind }),
        }
    }
}

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Part::from_value(Value::deserialize(d)?))
    }
}

impl Serialize for Part {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

/// Ids every part carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartIds {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "sessionID", default)]
    pub session_id: String,
    #[serde(rename = "messageID", default)]
    pub message_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextPart {
    #[serde(flatten)]
    pub ids: PartIds,
    #[serde(default)]
    pub text: String,
    /// Set on text the runtime wrote itself (e.g. the injected `<task … state="completed">`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepPart {
    #[serde(flatten)]
    pub ids: PartIds,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolPart {
    #[serde(flatten)]
    pub ids: PartIds,
    #[serde(rename = "callID", default)]
    pub call_id: String,
    /// The tool's name (`task`, `background_output`, `mcp_…`).
    #[serde(default)]
    pub tool: String,
    pub state: ToolState,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Where a tool call is: `pending → running → completed | error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolStatus {
    Pending,
    Running,
    Completed,
    Error,
    /// A status this build does not know; not counted as running.
    #[serde(other)]
    Other,
}

/// A tool part's `state`. One struct for every status: which fields are present depends on
/// the status (`output` only when completed, `error` only on error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolState {
    pub status: ToolStatus,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Extra>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<ToolTime>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolTime {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<i64>,
}

impl ToolPart {
    /// Still executing (`pending` or `running`).
    pub fn is_open(&self) -> bool {
        matches!(self.state.status, ToolStatus::Pending | ToolStatus::Running)
    }

    fn metadata_str(&self, key: &str) -> Option<&str> {
        self.state.metadata.as_ref()?.get(key)?.as_str()
    }

    /// The child session this call runs in: `state.metadata.sessionId` (set while `running`).
    pub fn child_session_id(&self) -> Option<&str> {
        self.metadata_str("sessionId")
    }

    /// oh-my-opencode's `bg_…` id, when the plugin made this call.
    pub fn background_task_id(&self) -> Option<&str> {
        self.metadata_str("backgroundTaskId")
    }

    /// The child this call launched in the background, if it did: OpenCode's own
    /// `metadata.background: true` (or an output `<task id=… state="running">`), or an
    /// oh-my-opencode launch (`<task_metadata>` with a `background_task_id`).
    pub fn background_launch(&self) -> Option<BackgroundLaunch> {
        if self.state.status != ToolStatus::Completed {
            return None;
        }
        let output = self.state.output.as_deref().unwrap_or("");
        let flagged = self
            .state
            .metadata
            .as_ref()
            .and_then(|m| m.get("background"))
            .and_then(Value::as_bool)
            == Some(true);
        let running_tag = task_tags(output).into_iter().find(|t| t.state == "running");
        if flagged || running_tag.is_some() {
            let child = self
                .child_session_id()
                .map(str::to_owned)
                .or_else(|| running_tag.map(|t| t.id));
            return child.map(|child| BackgroundLaunch {
                child,
                style: LaunchStyle::Native,
            });
        }
        let omo = omo_launch(output)?;
        Some(BackgroundLaunch {
            child: self
                .child_session_id()
                .map(str::to_owned)
                .unwrap_or(omo.session_id),
            style: LaunchStyle::OhMyOpencode {
                task_id: omo.background_task_id,
            },
        })
    }
}

/// A background child a tool call started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackgroundLaunch {
    pub child: String,
    pub style: LaunchStyle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchStyle {
    /// OpenCode's `task` with `background: true`: answered by an injected
    /// `<task id=… state="completed|error">` user message.
    Native,
    /// oh-my-opencode's `task(run_in_background=true)` / `call_omo_agent`: answered when the
    /// child is done and the parent ends a later turn.
    OhMyOpencode { task_id: Option<String> },
}

/// One `<task id="…" state="…">` opening tag (OpenCode 1.18 task output and injected results).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskTag {
    pub id: String,
    pub state: String,
}

/// Every task report in `text`, in order: each `<task id="…" state="…">` opening tag (1.17 and
/// later; attribute order is free), then the 1.15 line form `task_id: ses_… (…)` with a
/// `state: …` line (launch results and injected results of that era alike).
pub fn task_tags(text: &str) -> Vec<TaskTag> {
    let mut tags = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<task ") {
        let after = &rest[start + "<task ".len()..];
        let Some(end) = after.find('>') else { break };
        let attrs = &after[..end];
        if let (Some(id), Some(state)) = (attr(attrs, "id"), attr(attrs, "state")) {
            tags.push(TaskTag { id, state });
        }
        rest = &after[end..];
    }
    let line = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
    };
    if let (Some(id), Some(state)) = (line("task_id:"), line("state:")) {
        if id.starts_with("ses_") && !tags.iter().any(|t| t.id == id) {
            tags.push(TaskTag {
                id: id.to_owned(),
                state: state.to_owned(),
            });
        }
    }
    tags
}

fn attr(attrs: &str, name: &str) -> Option<String> {
    let needle = format!("{name}=\"");
    let mut search = attrs;
    loop {
        let at = search.find(&needle)?;
        // Reject a match inside a longer name (`xid="…"`).
        let boundary = at == 0 || search[..at].ends_with(char::is_whitespace);
        let value = &search[at + needle.len()..];
        if boundary {
            let end = value.find('"')?;
            return Some(value[..end].to_owned());
        }
        search = value;
    }
}

/// What an oh-my-opencode launch result names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OmoLaunch {
    pub session_id: String,
    pub background_task_id: Option<String>,
}

/// Reads an oh-my-opencode background launch from a tool output: `Background task launched`
/// with a `<task_metadata>` block (`session_id:`, `background_task_id:`), or `call_omo_agent`'s
/// `Background agent task launched` with `Session ID:`/`Task ID:` lines.
pub fn omo_launch(output: &str) -> Option<OmoLaunch> {
    let line_value = |key: &str| {
        output.lines().find_map(|l| {
            l.trim()
                .strip_prefix(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        })
    };
    if output.contains("Background task launched") {
        let session_id = line_value("session_id:")?;
        return Some(OmoLaunch {
            session_id,
            background_task_id: line_value("background_task_id:"),
        });
    }
    if output.contains("Background agent task launched") {
        let session_id = line_value("Session ID:")?;
        return Some(OmoLaunch {
            session_id,
            background_task_id: line_value("Task ID:"),
        });
    }
    None
}

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

    /// `session.error`: the error (also sent on abort, as `MessageAbortedError`).
    pub fn error(&self) -> Option<MessageError> {
        if self.kind != "session.error" {
            return None;
        }
        serde_json::from_value(self.properties.get("error")?.clone()).ok()
    }

    /// `message.part.delta` (era B and later): a streamed piece of one part's field. Era A sends
    /// the same as `delta` next to the whole part in `message.part.updated`.
    pub fn part_delta(&self) -> Option<PartDelta> {
        if self.kind != "message.part.delta" {
            return None;
        }
        serde_json::from_value(self.properties.clone()).ok()
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

/// The body of a `message.part.delta` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartDelta {
    #[serde(rename = "sessionID", default)]
    pub session_id: String,
    #[serde(rename = "messageID", default)]
    pub message_id: String,
    #[serde(rename = "partID", default)]
    pub part_id: String,
    /// The part field the text is appended to (`text`).
    #[serde(default)]
    pub field: String,
    #[serde(default)]
    pub delta: String,
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
        assert_eq!(d.part_delta().unwrap().delta, "lau");
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

    #[test]
    fn unknown_parts_and_fields_round_trip() {
        let raw = json!({"id":"prt_9","type":"reasoning","text":"hmm","weird":[1]});
        let p: Part = serde_json::from_value(raw.clone()).unwrap();
        assert!(matches!(p, Part::Other(_)));
        assert_eq!(serde_json::to_value(&p).unwrap(), raw);
        let tool = json!({"id":"prt_1","sessionID":"ses_1","messageID":"msg_1","type":"tool",
            "callID":"c","tool":"task","newField":true,
            "state":{"status":"running","input":{"a":1},"metadata":{"sessionId":"ses_child"},"time":{"start":1}}});
        let p: Part = serde_json::from_value(tool.clone()).unwrap();
        let t = p.as_tool().unwrap();
        assert!(t.is_open());
        assert_eq!(t.child_session_id(), Some("ses_child"));
        assert_eq!(serde_json::to_value(&p).unwrap(), tool);
    }

    #[test]
    fn task_tags_and_launches() {
        let tags = task_tags("x <task state=\"completed\" id=\"ses_1\">\n<task_result>r</task_result></task> <task id=\"ses_2\" state=\"error\">");
        assert_eq!(
            tags,
            vec![
                TaskTag {
                    id: "ses_1".into(),
                    state: "completed".into()
                },
                TaskTag {
                    id: "ses_2".into(),
                    state: "error".into()
                }
            ]
        );
        let omo = "Background task launched.\n\nBackground Task ID: bg_04817ab3\nStatus: pending\n<task_metadata>\nsession_id: ses_k\nbackground_task_id: bg_04817ab3\nsubagent: Sisyphus-Junior\n</task_metadata>";
        assert_eq!(
            omo_launch(omo),
            Some(OmoLaunch {
                session_id: "ses_k".into(),
                background_task_id: Some("bg_04817ab3".into())
            })
        );
        let agent = "Background agent task launched successfully.\n\nTask ID: bg_1\nSession ID: ses_g\nStatus: pending";
        assert_eq!(omo_launch(agent).unwrap().session_id, "ses_g");
        assert_eq!(omo_launch("Task Result\n\nSession ID: ses_x"), None);
    }
}
