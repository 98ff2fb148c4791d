//! What one scenario run carries: the script a session answers from, the children launched so
//! far, and the user messages waiting for a session's loop. Shared by the engine (which plays
//! them) and the state (which keeps them per session).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;
use tokio::sync::oneshot;

use super::scenario::{Agent, Step};

/// The scenario agent answering a session's turns.
pub struct Script {
    pub agent: Arc<Agent>,
    pub ctx: Arc<RunCtx>,
    /// Turns handed out so far.
    pub taken: usize,
}

/// What one scenario run shares across its sessions: the children launched so far, by label.
#[derive(Default)]
pub struct RunCtx {
    pub(super) launched: Mutex<Vec<Launched>>,
}

#[derive(Clone)]
pub(super) struct Launched {
    pub(super) label: &'static str,
    pub(super) description: &'static str,
    pub(super) session: String,
    pub(super) bg_id: Option<String>,
    pub(super) at: Instant,
}

impl RunCtx {
    pub(super) fn find(&self, label: &str) -> Option<Launched> {
        self.launched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|l| l.label == label)
            .cloned()
    }

    pub(super) fn all(&self) -> Vec<Launched> {
        self.launched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn push(&self, l: Launched) {
        self.launched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(l);
    }
}

/// One user message waiting for the session's loop.
pub struct Trigger {
    pub(super) user_msg: String,
    pub(super) steps: Vec<Step>,
    pub(super) ctx: Arc<RunCtx>,
    pub(super) agent: &'static str,
    pub(super) reply: Option<oneshot::Sender<LoopOutcome>>,
}

/// How a loop ended: what `POST /session/:id/message` returns, and what the runtime injects
/// into the parent of a background child.
#[derive(Debug, Clone, Default)]
pub struct LoopOutcome {
    /// `{info, parts}` of the loop's last assistant message.
    pub message: Option<Value>,
    /// The last text the loop wrote.
    pub text: Option<String>,
    /// The assistant `error` that ended the loop.
    pub error: Option<Value>,
    pub aborted: bool,
}

/// A route named a session the runtime does not know.
#[derive(Debug, thiserror::Error)]
#[error("Session not found: {0}")]
pub struct NotFound(pub String);
