//! Messages and their parts (`GET /session/:id/message`), the tool state machine, and what a
//! tool part says about the children it started.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::text::{omo_launch, task_tags};
use super::Extra;

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
    /// A part as the runtime sends it (`{"type":"tool",…}`), read in place; `None` for any
    /// other part or one that does not have a tool part's shape.
    pub fn from_part(part: &Value) -> Option<ToolPart> {
        if part.get("type").and_then(Value::as_str) != Some("tool") {
            return None;
        }
        ToolPart::deserialize(part).ok()
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
