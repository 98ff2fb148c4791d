//! The oracle: the truth about session trees.
//!
//! It watches the runtime's events ([`watcher`]), reads the runtime when needed ([`client`];
//! coalesced: one upstream read per tree per interval however many wait), and decides with one
//! pure function, the terminal rule ([`rule::judge`]), whether a tree is done. Callers (the
//! gate, the model face, `taskgate wait`) see only [`Oracle`] and [`Decision`]; they never
//! talk to the runtime's read routes themselves. docs/terminal-rule.md explains every clause.

pub mod client;
pub mod rule;
mod wait;
pub mod watcher;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::opencode::SessionStatus;

use client::{ClientError, RuntimeClient};
use rule::{SessionSnapshot, TreeSnapshot};
use watcher::WatchState;

pub use wait::wait_command;

/// Most sessions one tree read follows; a runaway tree is cut rather than read forever.
const MAX_TREE: usize = 500;
/// Past this many cached trees, slots nobody uses any more are dropped.
const MAX_SLOTS: usize = 1024;

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
    /// The tree had background work (some session launched a background child: OpenCode's
    /// `background: true` task or an oh-my-opencode launch).
    /// Only such trees wait out the settle window.
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
pub struct Oracle {
    inner: Arc<Inner>,
}

struct Inner {
    client: RuntimeClient,
    poll_interval: Duration,
    settle_window: Duration,
    state: Arc<WatchState>,
    /// One slot per root: its lock makes concurrent readers share one upstream read.
    trees: std::sync::Mutex<HashMap<SessionRef, Arc<tokio::sync::Mutex<Option<Reading>>>>>,
    shutdown: CancellationToken,
    started: std::sync::atomic::AtomicBool,
}

/// One read of a tree and what it was decided from.
#[derive(Clone)]
struct Reading {
    started: Instant,
    /// The watcher's sequence number when the read started: later events make it stale.
    seq: u64,
    /// Every session of the tree, to match events against.
    ids: Vec<String>,
    decision: Decision,
    error: Option<ClientError>,
}

/// How fresh a shared read must be for a caller to reuse it.
#[derive(Clone, Copy)]
enum Fresh {
    /// Younger than this, and no event for the tree since.
    MaxAge(Duration),
    /// Started at or after this instant (the settle window's closing re-read).
    StartedAfter(Instant),
}

enum Wake {
    Changed,
    Elapsed,
    Deadline,
    Cancelled,
}

impl Oracle {
    /// An oracle that reads the runtime named in `config.proxy.upstream` with
    /// `config.upstream_auth`, settling for `config.gate.settle_window`.
    pub fn new(config: &Config) -> Oracle {
        Oracle {
            inner: Arc::new(Inner {
                client: RuntimeClient::new(config),
                poll_interval: config.oracle.poll_interval.0,
                settle_window: config.gate.settle_window.0,
                state: Arc::new(WatchState::default()),
                trees: std::sync::Mutex::new(HashMap::new()),
                shutdown: CancellationToken::new(),
                started: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Starts the watcher (one `/global/event` subscription, reconnecting) until `shutdown`.
    /// Waits in progress end with [`OracleError::Cancelled`] when `shutdown` fires. A second
    /// call does nothing: two subscriptions would only double the runtime's work.
    pub fn start(&self, shutdown: CancellationToken) {
        if self
            .inner
            .started
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(watcher::run(
            inner.client.clone(),
            inner.state.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(async move {
            shutdown.cancelled().await;
            inner.shutdown.cancel();
        });
    }

    /// The runtime client the oracle reads with (also for `taskgate wait`'s health check).
    pub fn client(&self) -> &RuntimeClient {
        &self.inner.client
    }

    /// What the watcher knows (busy-ever, parents, connection), for diagnostics.
    pub fn watch_state(&self) -> &WatchState {
        &self.inner.state
    }

    /// The verdict now, from a fresh (coalesced) read. No settle window.
    pub async fn decide(&self, session: &SessionRef) -> Decision {
        self.read(session, Fresh::MaxAge(self.inner.poll_interval))
            .await
            .decision
    }

    /// [`Oracle::decide`], plus the read error behind an `unknown` verdict.
    pub async fn decide_checked(&self, session: &SessionRef) -> Result<Decision, ClientError> {
        let reading = self
            .read(session, Fresh::MaxAge(self.inner.poll_interval))
            .await;
        match reading.error {
            Some(e) => Err(e),
            None => Ok(reading.decision),
        }
    }

    /// Waits until the tree is terminal: the verdict must hold for the settle window (trees with
    /// background work only) and be re-read before it is returned. Cancel-safe.
    pub async fn wait_terminal(
        &self,
        session: &SessionRef,
        deadline: Option<Instant>,
    ) -> Result<Decision, OracleError> {
        let mut changes = self.inner.state.subscribe();
        let mut last: Option<Decision> = None;
        let past_deadline = |last: Option<Decision>, reading: Option<&Reading>| {
            let decision = reading
                .map(|r| r.decision.clone())
                .or(last)
                .unwrap_or_else(|| unknown("the deadline passed before the first read"));
            OracleError::Deadline(Box::new(decision))
        };
        // When the tree was first seen terminal in the current unbroken run of terminal reads.
        let mut settling: Option<Instant> = None;
        loop {
            let reading = tokio::select! {
                r = self.read(session, Fresh::MaxAge(self.inner.poll_interval)) => r,
                _ = sleep_until_opt(deadline) => return Err(past_deadline(last, None)),
                _ = self.inner.shutdown.cancelled() => return Err(OracleError::Cancelled),
            };
            if reading.decision.verdict.is_terminal() {
                if !reading.decision.background {
                    return Ok(reading.decision);
                }
                // Rule 6: hold for the settle window, then re-read. An event meanwhile causes a
                // re-read; the window only starts over if that read is not terminal (runtime
                // chatter such as `session.updated` after an idle must not postpone it).
                let settle_end = *settling.get_or_insert(Instant::now() + self.inner.settle_window);
                match self
                    .wait_change(&reading, settle_end, deadline, &mut changes)
                    .await
                {
                    Wake::Changed => continue,
                    Wake::Elapsed => {}
                    Wake::Deadline => return Err(past_deadline(last, Some(&reading))),
                    Wake::Cancelled => return Err(OracleError::Cancelled),
                }
                let again = tokio::select! {
                    r = self.read(session, Fresh::StartedAfter(settle_end)) => r,
                    _ = sleep_until_opt(deadline) => return Err(past_deadline(last, Some(&reading))),
                    _ = self.inner.shutdown.cancelled() => return Err(OracleError::Cancelled),
                };
                if again.decision.verdict.is_terminal() {
                    return Ok(again.decision);
                }
                settling = None;
                last = Some(again.decision);
                continue;
            }
            settling = None;
            let until = Instant::now() + self.inner.poll_interval;
            match self
                .wait_change(&reading, until, deadline, &mut changes)
                .await
            {
                Wake::Changed | Wake::Elapsed => {}
                Wake::Deadline => return Err(past_deadline(None, Some(&reading))),
                Wake::Cancelled => return Err(OracleError::Cancelled),
            }
            last = Some(reading.decision);
        }
    }

    /// A stream of the tree's decisions: the first read, then every change of verdict. Reads
    /// are shared with every other caller; ends when the oracle shuts down.
    pub fn watch(&self, session: SessionRef) -> impl Stream<Item = Decision> + Send + 'static {
        let oracle = self.clone();
        let changes = self.inner.state.subscribe();
        futures_util::stream::unfold(
            (oracle, session, changes, None::<Verdict>),
            |(oracle, session, mut changes, last)| async move {
                loop {
                    let reading = tokio::select! {
                        r = oracle.read(&session, Fresh::MaxAge(oracle.inner.poll_interval)) => r,
                        _ = oracle.inner.shutdown.cancelled() => return None,
                    };
                    if last.as_ref() != Some(&reading.decision.verdict) {
                        let verdict = reading.decision.verdict.clone();
                        return Some((reading.decision, (oracle, session, changes, Some(verdict))));
                    }
                    let until = Instant::now() + oracle.inner.poll_interval;
                    if let Wake::Cancelled = oracle
                        .wait_change(&reading, until, None, &mut changes)
                        .await
                    {
                        return None;
                    }
                }
            },
        )
    }

    /// The parent of a session (`parentID`), `None` for a root or when it cannot be read.
    /// Parent links never change, so this may be served from what the watcher learned.
    pub async fn parent(&self, session: &SessionRef) -> Option<String> {
        if let Some(parent) = self.inner.state.session(&session.id).and_then(|s| s.parent) {
            return Some(parent);
        }
        self.inner.client.session(session).await.ok()?.parent_id
    }

    /// The session's latest assistant message as the runtime returns it (`{info, parts}`).
    pub async fn last_assistant_message(&self, session: &SessionRef) -> Option<serde_json::Value> {
        // One turn ends with one assistant message; a short page always reaches it.
        let recent = self.inner.client.recent_messages(session, 20).await.ok()?;
        recent.into_iter().rev().find(|m| {
            m.pointer("/info/role").and_then(serde_json::Value::as_str) == Some("assistant")
        })
    }

    /// The poll interval, so callers can bound how stale a decision may be.
    pub fn poll_interval(&self) -> Duration {
        self.inner.poll_interval
    }

    /// Sleeps until `until`, unless an event for the tree of `reading` arrives first.
    async fn wait_change(
        &self,
        reading: &Reading,
        until: Instant,
        deadline: Option<Instant>,
        changes: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Wake {
        loop {
            if self.inner.state.changed_since(&reading.ids, reading.seq) {
                return Wake::Changed;
            }
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        // The watcher's state lives as long as the oracle; this cannot happen,
                        // but if it did, fall back to plain polling.
                        tokio::time::sleep_until(until).await;
                        return Wake::Elapsed;
                    }
                }
                _ = tokio::time::sleep_until(until) => return Wake::Elapsed,
                _ = sleep_until_opt(deadline) => return Wake::Deadline,
                _ = self.inner.shutdown.cancelled() => return Wake::Cancelled,
            }
        }
    }

    fn slot(&self, session: &SessionRef) -> Arc<tokio::sync::Mutex<Option<Reading>>> {
        let mut trees = self.inner.trees.lock().unwrap_or_else(|p| p.into_inner());
        if trees.len() > MAX_SLOTS {
            trees.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        trees.entry(session.clone()).or_default().clone()
    }

    /// Single flight: callers of one root queue on its slot; the first one reads, the others
    /// reuse that read if it is fresh enough for them.
    async fn read(&self, session: &SessionRef, fresh: Fresh) -> Reading {
        let slot = self.slot(session);
        let mut cached = slot.lock().await;
        if let Some(r) = cached.as_ref() {
            let young = match fresh {
                Fresh::MaxAge(age) => r.started.elapsed() < age,
                Fresh::StartedAfter(at) => r.started >= at,
            };
            if young && !self.inner.state.changed_since(&r.ids, r.seq) {
                return r.clone();
            }
        }
        let started = Instant::now();
        let seq = self.inner.state.seq();
        let reading = match self.read_tree(session).await {
            Ok((ids, decision)) => Reading {
                started,
                seq,
                ids,
                decision,
                error: None,
            },
            Err(e) => Reading {
                started,
                seq,
                ids: vec![session.id.clone()],
                decision: unknown(&e.to_string()),
                error: Some(e),
            },
        };
        *cached = Some(reading.clone());
        reading
    }

    /// Reads the status map once, then every session of the tree (info, children, history).
    async fn read_tree(&self, root: &SessionRef) -> Result<(Vec<String>, Decision), ClientError> {
        let client = &self.inner.client;
        let directory = root.directory.clone();
        let read = |id: String| {
            let r = SessionRef {
                id,
                directory: directory.clone(),
            };
            async move {
                let (info, children, messages) =
                    tokio::join!(client.session(&r), client.children(&r), client.messages(&r));
                (r.id, info, children, messages)
            }
        };
        // The status map, the root and every descendant the watcher already knows are read at
        // once, then any level of children still unknown: a plain prompt's tree, or one whose
        // children the watcher saw created, costs one round trip.
        let mut first = vec![root.id.clone()];
        let mut at = 0;
        while at < first.len() && first.len() < MAX_TREE {
            if let Some(known) = self.inner.state.session(&first[at]) {
                for child in known.children {
                    if !first.contains(&child) {
                        first.push(child);
                    }
                }
            }
            at += 1;
        }
        let (statuses, mut level) = tokio::join!(
            client.statuses(directory.as_deref()),
            futures_util::future::join_all(first.into_iter().map(read))
        );
        let statuses = statuses?;
        self.inner.state.record_statuses(&statuses);
        let mut sessions: BTreeMap<String, SessionSnapshot> = BTreeMap::new();
        loop {
            let mut next: Vec<String> = Vec::new();
            for (id, info, children, messages) in level {
                let info = match info {
                    Ok(info) => info,
                    // A child that no longer exists (deleted) cannot hold the tree; a missing
                    // root is an error the caller must see.
                    Err(ClientError::NotFound { .. }) if id != root.id => continue,
                    Err(e) => return Err(e),
                };
                let children = match children {
                    Ok(c) => c,
                    Err(ClientError::NotFound { .. }) => Vec::new(),
                    Err(e) => return Err(e),
                };
                let messages = messages?;
                next.extend(children.into_iter().map(|c| c.id));
                next.extend(rule::named_children(&messages));
                // Children the watcher saw created, in case `/children` does not list them.
                if let Some(known) = self.inner.state.session(&id) {
                    next.extend(known.children);
                }
                let status = statuses.get(&id).cloned();
                let seen_busy = self.inner.state.busy_ever(&id)
                    || status.as_ref().is_some_and(|s| !s.is_idle());
                sessions.insert(
                    id,
                    SessionSnapshot {
                        info,
                        status,
                        seen_busy,
                        messages,
                    },
                );
            }
            next.sort();
            next.dedup();
            next.retain(|id| !sessions.contains_key(id));
            next.truncate(MAX_TREE.saturating_sub(sessions.len()));
            if next.is_empty() {
                break;
            }
            level = futures_util::future::join_all(next.into_iter().map(read)).await;
        }
        let tree = TreeSnapshot {
            root: root.id.clone(),
            sessions,
        };
        let judgement = rule::judge(&tree);
        let ids: Vec<String> = tree.sessions.keys().cloned().collect();
        let mut summaries: Vec<SessionSummary> = tree
            .sessions
            .values()
            .map(|s| SessionSummary {
                id: s.info.id.clone(),
                parent: s.info.parent_id.clone(),
                agent: s
                    .info
                    .agent
                    .clone()
                    .or_else(|| s.messages.iter().rev().find_map(|m| m.info.agent.clone())),
                title: s.info.title.clone(),
                status: s
                    .status
                    .as_ref()
                    .map(SessionStatus::name)
                    .unwrap_or("idle")
                    .to_owned(),
            })
            .collect();
        // The root first, for readers that print the list as a tree.
        summaries.sort_by_key(|s| s.id != root.id);
        Ok((
            ids,
            Decision {
                verdict: judgement.verdict,
                background: judgement.background,
                sessions: summaries,
            },
        ))
    }
}

fn unknown(reason: &str) -> Decision {
    Decision {
        verdict: Verdict::Unknown {
            reason: reason.to_owned(),
        },
        background: false,
        sessions: Vec::new(),
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
