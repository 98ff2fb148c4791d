//! Claims: the one room that knows what a completion claim looks like, which child it speaks
//! of, and how the truth about it is written down. Both faces call it: the client face (the
//! gate: tool parts in event streams and message history) and the model face (tool results in
//! requests to the model provider).
//!
//! - [`recognise`]: the claim formats (docs/claims.md): OpenCode's own `task` / `task_status`
//!   outputs and injected `<task …>` results, oh-my-opencode's `background_output`, launch texts
//!   and wake messages, and Claude-style `TaskOutput`.
//! - [`links`]: `bg_…` → `ses_…` links learned from launches, with the oracle's watcher as the
//!   fallback.
//! - [`render`]: a verdict in words, and `metadata.taskgate` on a released part.
//!
//! This room does no I/O and knows nothing of HTTP, holds or the runtime's reads: whether a
//! claim is *true* is the oracle's business.

pub mod links;
pub mod recognise;
pub mod render;

pub use links::Links;

/// The tool names whose results can claim a child is done, by default (`gate.claim_tools`,
/// `model.claim_tools`).
pub const DEFAULT_TOOLS: [&str; 5] = [
    "task",
    "task_status",
    "background_output",
    "mcp_background_output",
    "TaskOutput",
];
pub use recognise::{message_text, tool_part, tool_result};

/// What a claim says about its child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Claimed {
    Completed,
    Error,
    Cancelled,
}

/// How a claim names its child.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "by", content = "id", rename_all = "snake_case")]
pub enum ChildLink {
    /// A runtime session id (`ses_…`).
    Session(String),
    /// An oh-my-opencode background task id (`bg_…`), resolved through launches seen earlier.
    Background(String),
}

/// Where the claim was found (for `/_taskgate/holds`, metrics and docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// OpenCode `task` part marked completed (a background launch, or a foreground child).
    Task,
    /// OpenCode `task_status` output `state: …`.
    TaskStatus,
    /// oh-my-opencode `background_output` ("Task Result" or a status table).
    BackgroundOutput,
    /// Claude-style `TaskOutput` (`<status>completed</status>`).
    TaskOutput,
    /// The runtime's injected `<task id=… state=…>` result message.
    Injection,
    /// oh-my-opencode parent wake (`[BACKGROUND TASK COMPLETED]`, …).
    Wake,
    /// oh-my-opencode forced-background `SUPERVISED TASK COMPLETED SUCCESSFULLY`.
    Supervised,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Task => "task",
            Source::TaskStatus => "task_status",
            Source::BackgroundOutput => "background_output",
            Source::TaskOutput => "task_output",
            Source::Injection => "injection",
            Source::Wake => "wake",
            Source::Supervised => "supervised",
        }
    }
}

/// A completion claim: what it says and about which children.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Claim {
    pub source: Source,
    pub claimed: Claimed,
    /// Never empty: a claim that names no child cannot be checked and is not reported.
    pub children: Vec<ChildLink>,
}

/// The configured claim tool names. A name also matches with an `mcp_` prefix, since tools may
/// arrive through an MCP bridge under that name.
#[derive(Debug, Clone)]
pub struct ClaimTools {
    names: Vec<String>,
}

impl ClaimTools {
    pub fn new(names: &[String]) -> ClaimTools {
        ClaimTools {
            names: names.to_vec(),
        }
    }

    /// The canonical (unprefixed) name of `tool` if it is a claim tool.
    pub fn canonical<'a>(&self, tool: &'a str) -> Option<&'a str> {
        if self.names.iter().any(|n| n == tool) {
            return Some(tool.strip_prefix("mcp_").unwrap_or(tool));
        }
        let bare = tool.strip_prefix("mcp_")?;
        self.names.iter().any(|n| n == bare).then_some(bare)
    }
}
