//! Where the model face learns the truth about a child: the [`Oracle`] in production, a scripted
//! double in tests. A trait, so the hold-and-rewrite logic can be tested without a runtime.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;
use tokio::time::Instant;

use crate::holds::{HoldKind, Holds};
use crate::oracle::client::ClientError;
use crate::oracle::{Oracle, OracleError, SessionRef, Verdict};

/// What the runtime says about a child's tree when the hold ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub verdict: Verdict,
    /// The tree was not terminal when first asked: whatever the claim said then was premature,
    /// even if the tree has finished since.
    pub premature: bool,
    /// The deadline passed (or taskgate is shutting down) before the tree was terminal.
    pub timed_out: bool,
    /// How long ago the child session was created, when known.
    pub started_ago: Option<Duration>,
    /// How long ago the still-working session (the one the verdict names) last changed.
    pub last_activity_ago: Option<Duration>,
}

/// The source of truth about session trees.
pub trait Truth: Send + Sync {
    /// Waits until `child`'s tree is terminal, or until `deadline`, and says what it found.
    /// Cancel-safe: dropping the future (the runtime hung up on the held request) ends the wait.
    fn settle<'a>(&'a self, child: &'a SessionRef, deadline: Instant) -> BoxFuture<'a, Finding>;

    /// The child session an oh-my-opencode `bg_…` id stands for, from the runtime's own tool
    /// parts, for claims whose conversation does not carry the launch.
    fn background_session(&self, _task_id: &str) -> Option<String> {
        None
    }
}

impl Truth for Oracle {
    fn background_session(&self, task_id: &str) -> Option<String> {
        self.watch_state().background_session(task_id)
    }

    fn settle<'a>(&'a self, child: &'a SessionRef, deadline: Instant) -> BoxFuture<'a, Finding> {
        Box::pin(async move {
            let first = match self.decide_checked(child).await {
                Ok(first) => first,
                // The runtime is up (it sent this request), so a refused read will not heal by
                // waiting: say so at once rather than hold for max_hold. The model reads this
                // text, so it names the kind of failure, not the runtime's address.
                Err(e) => {
                    tracing::warn!(child = %child.id, error = %e, "model face: cannot read the child");
                    let reason = match e {
                        ClientError::NotFound { .. } => "the runtime does not know this session",
                        ClientError::Unauthorized { .. } => {
                            "the runtime refused taskgate's credentials"
                        }
                        _ => "the runtime could not be read",
                    };
                    return Finding {
                        verdict: Verdict::Unknown {
                            reason: reason.to_owned(),
                        },
                        premature: true,
                        timed_out: false,
                        started_ago: None,
                        last_activity_ago: None,
                    };
                }
            };
            if let Verdict::Gone { .. } = first.verdict {
                // Nothing to wait for, and nothing confirmed: the claim is marked unverified.
                return Finding {
                    verdict: first.verdict,
                    premature: true,
                    timed_out: false,
                    started_ago: None,
                    last_activity_ago: None,
                };
            }
            if first.verdict.is_terminal() && !first.background {
                // Terminal, and no background work that could still wake it: no settle needed.
                return Finding {
                    verdict: first.verdict,
                    premature: false,
                    timed_out: false,
                    started_ago: None,
                    last_activity_ago: None,
                };
            }
            let (verdict, timed_out) = match self.wait_terminal(child, Some(deadline)).await {
                Ok(decision) => (decision.verdict, false),
                Err(OracleError::Deadline(decision)) => (decision.verdict, true),
                Err(OracleError::Unverifiable(decision)) => (decision.verdict, false),
                Err(OracleError::Cancelled) => (
                    Verdict::Unknown {
                        reason: "taskgate is shutting down".to_owned(),
                    },
                    true,
                ),
            };
            // A tree that looked terminal at once and settled on the same verdict was done.
            let premature = !(first.verdict.is_terminal() && first.verdict == verdict);
            if !timed_out {
                return Finding {
                    verdict,
                    premature,
                    timed_out,
                    started_ago: None,
                    last_activity_ago: None,
                };
            }
            // Only the "still running" text needs the times; read them once, at the end.
            let created = match self.client().session(child).await {
                Ok(s) => s.time.and_then(|t| t.created),
                Err(_) => None,
            };
            let busy = match &verdict {
                Verdict::Running { session, .. } => SessionRef {
                    id: session.clone(),
                    directory: child.directory.clone(),
                },
                _ => child.clone(),
            };
            let updated = match self.client().session(&busy).await {
                Ok(s) => s.time.and_then(|t| t.updated),
                Err(_) => None,
            };
            Finding {
                verdict,
                premature,
                timed_out,
                started_ago: created.and_then(ago),
                last_activity_ago: updated.and_then(ago),
            }
        })
    }
}

/// The [`Oracle`], with every wait on a tree that is not yet terminal listed in the shared hold
/// registry beside the client face's (kind `request`), its row following each read.
pub struct Recorded {
    oracle: Oracle,
    holds: Holds,
}

impl Recorded {
    pub fn new(oracle: Oracle, holds: Holds) -> Recorded {
        Recorded { oracle, holds }
    }
}

impl Truth for Recorded {
    fn background_session(&self, task_id: &str) -> Option<String> {
        self.oracle.background_session(task_id)
    }

    fn settle<'a>(&'a self, child: &'a SessionRef, deadline: Instant) -> BoxFuture<'a, Finding> {
        Box::pin(async move {
            let mut settle = self.oracle.settle(child, deadline);
            // The oracle's shared reads, as they change: no read of its own.
            let mut reads = std::pin::pin!(self.oracle.watch(child.clone()));
            // Opened only once a read shows the tree still going: a claim the runtime
            // confirms at once was never held.
            let mut guard = None;
            loop {
                tokio::select! {
                    finding = &mut settle => {
                        if let Some(guard) = guard {
                            crate::holds::HoldGuard::release(guard, &finding.verdict, false);
                        }
                        return finding;
                    }
                    Some(decision) = reads.next() => {
                        if !decision.verdict.is_terminal() && guard.is_none() {
                            guard = Some(self.holds.open(HoldKind::Request, &child.id, &child.id));
                        }
                        if let Some(guard) = &guard {
                            guard.update(&decision);
                        }
                    }
                }
            }
        })
    }
}

/// Time since a runtime timestamp (Unix milliseconds).
fn ago(ms: i64) -> Option<Duration> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis();
    let then = u128::try_from(ms).ok()?;
    let diff = u64::try_from(now.saturating_sub(then)).ok()?;
    Some(Duration::from_millis(diff))
}
