//! The oracle: the truth about session trees. (Interface; filled in by issue 3.)
//!
//! It watches the runtime's events, reads the runtime when needed (coalesced: one upstream read
//! per tree per interval however many wait), and decides with one pure function, the terminal
//! rule, whether a tree is done. It knows nothing of HTTP clients.

pub mod rule;

use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::WaitArgs;
use crate::config::Config;

/// A session as the runtime addresses it: its id and, when the runtime serves several
/// directories, the directory it lives in (`?directory=` on reads).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionRef {
    pub id: String,
    pub directory: Option<String>,
}

/// What the terminal rule says about a session tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "lowercase")]
pub enum Verdict {
    /// Some session of the tree is still working; `session` is the one that is, `reason` says
    /// which clause of the rule failed.
    Running { session: String, reason: String },
    /// The whole tree is done; `text` is the last text part of the root's last assistant message.
    Completed { text: Option<String> },
    /// A session of the tree failed (assistant error, or finish error/length with no text).
    Failed { session: String, message: String },
    /// A session of the tree was aborted (`MessageAbortedError`).
    Aborted { session: String, message: String },
    /// The runtime could not be asked. Never released as completed.
    Unknown { reason: String },
}

impl Verdict {
    /// Completed, failed or aborted: nothing in the tree will change any more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Verdict::Completed { .. } | Verdict::Failed { .. } | Verdict::Aborted { .. }
        )
    }

    /// The verdict's name, for metrics and logs: "running", "completed", …
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Running { .. } => "running",
            Verdict::Completed { .. } => "completed",
            Verdict::Failed { .. } => "failed",
            Verdict::Aborted { .. } => "aborted",
            Verdict::Unknown { .. } => "unknown",
        }
    }
}

/// One session of a tree as last read, for `taskgate wait` and `/_taskgate/holds`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionSummary {
    pub id: String,
    pub parent: Option<String>,
    pub agent: Option<String>,
    pub title: Option<String>,
    /// "busy", "idle", "retry", … as the status map says (idle when absent).
    pub status: String,
}

/// A verdict with what it was decided from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The tree had background work (a background launch or a child that outlived its parent's
    /// turn). Only such trees wait out the settle window.
    pub background: bool,
    pub sessions: Vec<SessionSummary>,
}

#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    /// The deadline passed first; the last decision read is attached.
    #[error("deadline passed while the tree was still running")]
    Deadline(Box<Decision>),
    /// The wait was cancelled (shutdown).
    #[error("cancelled")]
    Cancelled,
}

/// The oracle's handle; cheap to clone, shared by the gate, the model face and `taskgate wait`.
#[derive(Clone)]
pub struct Oracle {}

impl Oracle {
    /// An oracle that reads the runtime named in `config.proxy.upstream` with
    /// `config.upstream_auth`, settling for `config.gate.settle_window`.
    pub fn new(_config: &Config) -> Oracle {
        unimplemented!("issue 3")
    }

    /// Starts the watcher (one `/global/event` subscription, reconnecting) until `shutdown`.
    pub fn start(&self, _shutdown: CancellationToken) {
        unimplemented!("issue 3")
    }

    /// The verdict now, from a fresh (coalesced) read. No settle window.
    pub async fn decide(&self, _session: &SessionRef) -> Decision {
        unimplemented!("issue 3")
    }

    /// Waits until the tree is terminal: the verdict must hold for the settle window (trees with
    /// background work only) and be re-read before it is returned. Cancel-safe.
    pub async fn wait_terminal(
        &self,
        _session: &SessionRef,
        _deadline: Option<Instant>,
    ) -> Result<Decision, OracleError> {
        unimplemented!("issue 3")
    }

    /// The poll interval, so callers can bound how stale a decision may be.
    pub fn poll_interval(&self) -> Duration {
        unimplemented!("issue 3")
    }
}

/// `taskgate wait`.
pub async fn wait_command(_args: WaitArgs) -> ExitCode {
    unimplemented!("issue 3")
}
