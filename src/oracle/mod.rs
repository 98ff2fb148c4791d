//! The oracle: the truth about session trees.
//!
//! It watches the runtime's events ([`watcher`]), reads the runtime when needed ([`client`];
//! coalesced: one upstream read per tree per interval however many wait), and decides with one
//! pure function, the terminal rule ([`rule::judge`]), whether a tree is done. Callers (the
//! gate, the model face, `taskgate wait`) see only [`Oracle`] and [`Decision`]; they never
//! talk to the runtime's read routes themselves. docs/terminal-rule.md explains every clause.

pub mod client;
mod read;
pub mod rule;
pub mod watcher;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

use client::{ClientError, RuntimeClient};
use watcher::WatchState;

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
    /// The runtime no longer knows the session (404: deleted, or the runtime restarted without
    /// it). Nothing will change any more, and it is not a success.
    Gone { session: String },
    /// The runtime could not be asked. Never released as completed.
    Unknown { reason: String },
}

impl Verdict {
    /// Completed, failed, aborted or gone: nothing in the tree will change any more. Only
    /// [`Verdict::Completed`] is a success.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Verdict::Completed { .. }
                | Verdict::Failed { .. }
                | Verdict::Aborted { .. }
                | Verdict::Gone { .. }
        )
    }

    /// The verdict's name, for metrics and logs: "running", "completed", …
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Running { .. } => "running",
            Verdict::Completed { .. } => "completed",
            Verdict::Failed { .. } => "failed",
            Verdict::Aborted { .. } => "aborted",
            Verdict::Gone { .. } => "gone",
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
    /// Unix ms since when taskgate has seen the session working, while it is not idle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busy_since_ms: Option<u64>,
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
    /// What the rule could not match, one reason per session, when the tree was released by
    /// the liveness bound (at rest, nothing moving, for `gate.rest_bound`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unmatched: Vec<String>,
    /// Unix ms when the liveness bound releases the tree, while it is at rest with only
    /// unmatched clauses left (docs/terminal-rule.md, "The liveness bound"); a new message or
    /// session moves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rest_deadline_ms: Option<u64>,
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
    /// The tree cannot be verified: the runtime refused taskgate's credentials, or it stayed
    /// unreadable for `max(rest_bound, 6 × request_timeout)`. The last decision (verdict unknown)
    /// is attached.
    #[error("the runtime cannot be read: {0:?}")]
    Unverifiable(Box<Decision>),
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
    /// The liveness bound (`gate.rest_bound`): how long a tree may rest with only clause 5
    /// unmatched, and how long the runtime may stay unreadable, before a wait ends.
    rest_bound: Duration,
    state: Arc<WatchState>,
    /// One shared wait per tree waited on (see [`Oracle::wait_terminal_seeing`]).
    waits: std::sync::Mutex<HashMap<SessionRef, tokio::sync::watch::Sender<TreeWait>>>,
    /// The status map last read and the one being read, per directory, shared by the tree
    /// reads of one interval (see [`Oracle::status_map`]).
    statuses: std::sync::Mutex<HashMap<Option<String>, StatusReads>>,
    /// One slot per root: its lock makes concurrent readers share one upstream read.
    trees: std::sync::Mutex<HashMap<SessionRef, Arc<tokio::sync::Mutex<Option<Reading>>>>>,
    shutdown: CancellationToken,
    started: std::sync::atomic::AtomicBool,
    /// The latest decision of every root read, for the live view; bumps `reads` on a change.
    latest: std::sync::Mutex<HashMap<String, TreeView>>,
    reads: tokio::sync::watch::Sender<u64>,
}

/// A root's latest decision, as [`Oracle::trees`] lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TreeView {
    pub root: String,
    /// Unix ms of the read.
    pub read_ms: u64,
    #[serde(flatten)]
    pub decision: Decision,
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
    /// Since when the tree has been at rest with only clause 5 unmatched, and the tree's last
    /// activity then: a later read with the same activity keeps the same start.
    rest: Option<(Instant, rule::Activity)>,
    /// When the current unbroken run of terminal reads began (reads no further apart than two
    /// poll intervals): where the settle window starts, the same for every waiter of the tree,
    /// so their closing re-reads coalesce into one instead of one per waiter.
    terminal_since: Option<Instant>,
}

/// One read of the runtime's status map, shared by the tree reads that may reuse it.
#[derive(Clone)]
struct SharedStatuses {
    started: Instant,
    /// The watcher's sequence number when the read started: an event for a session since then
    /// means the map may be stale about that session.
    seq: u64,
    map: futures_util::future::Shared<
        futures_util::future::BoxFuture<
            'static,
            Result<Arc<crate::opencode::StatusMap>, ClientError>,
        >,
    >,
}

/// A directory's status map reads: the last one that answered, and the latest one started.
#[derive(Default)]
struct StatusReads {
    done: Option<SharedStatuses>,
    latest: Option<SharedStatuses>,
}

/// What a shared wait on one tree has found so far, as its subscribers see it.
#[derive(Clone, Default)]
struct TreeWait {
    /// The latest decision read (published only when it changed).
    latest: Option<Decision>,
    /// The end: terminal, or the runtime cannot be read (the last decision, verdict unknown).
    outcome: Option<Result<Decision, Decision>>,
}

/// Removes `tx`'s entry for `session`, unless a newer wait has taken its place.
fn forget_wait(
    waits: &mut HashMap<SessionRef, tokio::sync::watch::Sender<TreeWait>>,
    session: &SessionRef,
    tx: &tokio::sync::watch::Sender<TreeWait>,
) {
    if waits.get(session).is_some_and(|w| w.same_channel(tx)) {
        waits.remove(session);
    }
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
                rest_bound: config.gate.rest_bound.0,
                state: Arc::new(WatchState::default()),
                waits: std::sync::Mutex::new(HashMap::new()),
                statuses: std::sync::Mutex::new(HashMap::new()),
                trees: std::sync::Mutex::new(HashMap::new()),
                shutdown: CancellationToken::new(),
                started: std::sync::atomic::AtomicBool::new(false),
                latest: std::sync::Mutex::new(HashMap::new()),
                reads: tokio::sync::watch::channel(0).0,
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
        // The watcher runs on a thread of its own. When held claims are released by the
        // thousand, the workers are busy relaying them; the watcher's task queued behind them
        // took in the runtime's events up to 0.7 s late, and every tree's settle window and
        // closing read came that much later (docs/performance.md). On its own thread the
        // kernel schedules it like any waking thread. It stops with `shutdown`, or when the
        // runtime that started it ends (a test's, say), whichever comes first.
        let stop = CancellationToken::new();
        let watch = watcher::run(
            inner.client.with_own_connections(),
            inner.state.clone(),
            stop.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("taskgate-watcher".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(watch),
                    Err(e) => tracing::error!("oracle: cannot start the watcher's runtime: {e}"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(
                "oracle: cannot start the watcher's thread ({e}); it runs with the rest"
            );
            tokio::spawn(watcher::run(
                inner.client.clone(),
                inner.state.clone(),
                stop.clone(),
            ));
        }
        // Armed here, not in the task: a runtime that ends before its workers first poll the
        // task drops it unpolled, and the guard must still go with it.
        let stop_watcher = stop.drop_guard();
        tokio::spawn(async move {
            let _stop_watcher = stop_watcher;
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
        self.wait_terminal_seeing(session, deadline, |_| {}).await
    }

    /// [`Oracle::wait_terminal`], telling `progress` every decision read on the way that
    /// differs from the one before (what a hold row shows while it waits).
    ///
    /// Every caller waiting on one tree subscribes to the same shared wait ([`TreeWait`]): one
    /// loop reads the tree, waits out the settle window and makes the closing re-read, and its
    /// outcome reaches every subscriber at once. Before, each caller ran that loop itself, and
    /// the 50 waits of 50 event streams on one tree queued one after another on the tree's
    /// slot: the last claim was released seconds after the first.
    pub async fn wait_terminal_seeing(
        &self,
        session: &SessionRef,
        deadline: Option<Instant>,
        progress: impl Fn(&Decision),
    ) -> Result<Decision, OracleError> {
        let mut shared = self.subscribe_wait(session);
        let mut last: Option<Decision> = None;
        loop {
            let state = shared.borrow_and_update().clone();
            if let Some(decision) = state.latest {
                progress(&decision);
                last = Some(decision);
            }
            match state.outcome {
                Some(Ok(decision)) => return Ok(decision),
                Some(Err(decision)) => return Err(OracleError::Unverifiable(Box::new(decision))),
                None => {}
            }
            tokio::select! {
                changed = shared.changed() => {
                    // The shared wait ends without an outcome only when the oracle shuts down.
                    if changed.is_err() {
                        return Err(OracleError::Cancelled);
                    }
                }
                _ = sleep_until_opt(deadline) => {
                    let decision = last
                        .unwrap_or_else(|| unknown("the deadline passed before the first read"));
                    return Err(OracleError::Deadline(Box::new(decision)));
                }
                _ = self.inner.shutdown.cancelled() => return Err(OracleError::Cancelled),
            }
        }
    }

    /// The shared wait on `session`'s tree, started if nobody waits on it yet.
    fn subscribe_wait(&self, session: &SessionRef) -> tokio::sync::watch::Receiver<TreeWait> {
        let mut waits = self.inner.waits.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(wait) = waits.get(session) {
            return wait.subscribe();
        }
        let (tx, rx) = tokio::sync::watch::channel(TreeWait::default());
        waits.insert(session.clone(), tx.clone());
        drop(waits);
        tokio::spawn(self.clone().run_wait(session.clone(), tx));
        rx
    }

    /// Runs the shared wait on one tree until its outcome, shutdown, or until nobody waits on
    /// it any more. The outcome is published and the wait forgotten under one lock, so a
    /// caller arriving later starts a new wait rather than taking an old outcome.
    async fn run_wait(self, session: SessionRef, tx: tokio::sync::watch::Sender<TreeWait>) {
        let publish = |decision: &Decision| {
            tx.send_if_modified(|state| {
                if state.latest.as_ref() == Some(decision) {
                    return false;
                }
                state.latest = Some(decision.clone());
                true
            });
        };
        loop {
            let outcome = tokio::select! {
                outcome = self.settle(&session, &publish) => outcome,
                () = tx.closed() => {
                    let mut waits = self.inner.waits.lock().unwrap_or_else(|p| p.into_inner());
                    // A caller may have subscribed between `closed` and this lock.
                    if tx.receiver_count() == 0 {
                        forget_wait(&mut waits, &session, &tx);
                        return;
                    }
                    continue;
                }
            };
            let mut waits = self.inner.waits.lock().unwrap_or_else(|p| p.into_inner());
            forget_wait(&mut waits, &session, &tx);
            match outcome {
                Ok(decision) => tx.send_modify(|s| s.outcome = Some(Ok(decision))),
                Err(OracleError::Unverifiable(decision)) => {
                    tx.send_modify(|s| s.outcome = Some(Err(*decision)));
                }
                // Shutdown: dropping the sender ends every subscriber's wait as cancelled.
                Err(_) => {}
            }
            return;
        }
    }

    /// The loop of one shared wait: reads until the tree is terminal, holding trees with
    /// background work for the settle window and re-reading them after it (clause 6).
    async fn settle(
        &self,
        session: &SessionRef,
        progress: &impl Fn(&Decision),
    ) -> Result<Decision, OracleError> {
        let mut changes = self.inner.state.subscribe();
        // When the tree was first seen terminal in the current unbroken run of terminal reads.
        let mut settling: Option<Instant> = None;
        // When the runtime first failed to answer in the current unbroken run of failed reads.
        let mut unreadable: Option<Instant> = None;
        loop {
            let reading = tokio::select! {
                r = self.read(session, Fresh::MaxAge(self.inner.poll_interval)) => r,
                _ = self.inner.shutdown.cancelled() => return Err(OracleError::Cancelled),
            };
            progress(&reading.decision);
            // Never wait out something that cannot come: refused credentials are a
            // configuration error at once; an unreadable runtime, after the unreadable bound.
            match &reading.error {
                Some(error) => {
                    let since = *unreadable.get_or_insert(reading.started);
                    if matches!(error, ClientError::Unauthorized { .. })
                        || since.elapsed() >= self.unreadable_bound()
                    {
                        return Err(OracleError::Unverifiable(Box::new(reading.decision)));
                    }
                }
                None => unreadable = None,
            }
            if reading.decision.verdict.is_terminal() {
                if !reading.decision.background {
                    return Ok(reading.decision);
                }
                // Rule 6: hold for the settle window, then re-read. An event meanwhile causes a
                // re-read; the window only starts over if that read is not terminal (runtime
                // chatter such as `session.updated` after an idle must not postpone it).
                let since = reading.terminal_since.unwrap_or(reading.started);
                let settle_end = *settling.get_or_insert(since + self.inner.settle_window);
                match self.wait_change(&reading, settle_end, &mut changes).await {
                    Wake::Changed => continue,
                    Wake::Elapsed => {}
                    Wake::Cancelled => return Err(OracleError::Cancelled),
                }
                let again = tokio::select! {
                    r = self.read(session, Fresh::StartedAfter(settle_end)) => r,
                    _ = self.inner.shutdown.cancelled() => return Err(OracleError::Cancelled),
                };
                progress(&again.decision);
                if again.decision.verdict.is_terminal() {
                    return Ok(again.decision);
                }
                settling = None;
                continue;
            }
            settling = None;
            let until = Instant::now() + self.inner.poll_interval;
            match self.wait_change(&reading, until, &mut changes).await {
                Wake::Changed | Wake::Elapsed => {}
                Wake::Cancelled => return Err(OracleError::Cancelled),
            }
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
                    if let Wake::Cancelled = oracle.wait_change(&reading, until, &mut changes).await
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

    /// A prompt for `session` was accepted by the runtime for a request received at
    /// `received_ms` (Unix ms): the session counts as working until the runtime starts it
    /// (docs/terminal-rule.md, clause 1).
    pub fn prompt_accepted(&self, session: &SessionRef, received_ms: i64) {
        self.inner.state.prompt_accepted(&session.id, received_ms);
    }

    /// The runtime answered a prompt for `session` (a synchronous prompt's reply arrived): the
    /// read that releases it must not decide with a status map taken before, which may still
    /// show the session working while the events that say otherwise are on their way.
    pub fn prompt_answered(&self, session: &SessionRef) {
        self.inner.state.prompt_answered(&session.id);
    }

    /// Sessions with an accepted prompt the runtime has not been seen starting.
    pub fn pending_prompts(&self) -> Vec<String> {
        self.inner.state.pending_prompts()
    }

    /// Every root read so far (the most recent [`MAX_SLOTS`]), with its latest decision,
    /// most recently read first.
    pub fn trees(&self) -> Vec<TreeView> {
        let latest = self.inner.latest.lock().unwrap_or_else(|p| p.into_inner());
        let mut trees: Vec<TreeView> = latest.values().cloned().collect();
        trees.sort_by(|a, b| b.read_ms.cmp(&a.read_ms).then(a.root.cmp(&b.root)));
        trees
    }

    /// Wakes when some tree's decision changes (see [`Oracle::trees`]).
    pub fn subscribe_trees(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.reads.subscribe()
    }

    /// Keeps `decision` as `root`'s latest, waking [`Oracle::subscribe_trees`] if it changed.
    fn remember(&self, root: &SessionRef, decision: &Decision) {
        let mut latest = self.inner.latest.lock().unwrap_or_else(|p| p.into_inner());
        let read_ms = unix_ms();
        let changed = latest
            .get(&root.id)
            .is_none_or(|known| known.decision != *decision);
        latest.insert(
            root.id.clone(),
            TreeView {
                root: root.id.clone(),
                read_ms,
                decision: decision.clone(),
            },
        );
        if latest.len() > MAX_SLOTS {
            if let Some(oldest) = latest
                .values()
                .min_by_key(|t| t.read_ms)
                .map(|t| t.root.clone())
            {
                latest.remove(&oldest);
            }
        }
        drop(latest);
        if changed {
            self.inner.reads.send_modify(|n| *n += 1);
        }
    }

    /// The liveness bound (`gate.rest_bound`).
    pub fn rest_bound(&self) -> Duration {
        self.inner.rest_bound
    }

    /// How long the runtime may stay unreadable before a wait ends as unverifiable: the
    /// liveness bound, but never less than six read timeouts, since a runtime that is merely
    /// slow (reads timing out under load) must not turn every hold into an error.
    fn unreadable_bound(&self) -> Duration {
        self.inner.rest_bound.max(6 * self.inner.client.timeout())
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
        changes: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Wake {
        let wakers = self.inner.state.wakers(&reading.ids);
        loop {
            // Registered before the check, so a change in between still wakes this wait.
            let mut notified: Vec<_> = wakers.iter().map(|w| Box::pin(w.notified())).collect();
            for n in &mut notified {
                n.as_mut().enable();
            }
            if self.inner.state.changed_since(&reading.ids, reading.seq) {
                return Wake::Changed;
            }
            let any_change = async {
                if notified.is_empty() {
                    std::future::pending::<()>().await;
                } else {
                    futures_util::future::select_all(notified).await;
                }
            };
            tokio::select! {
                () = any_change => {}
                r = changes.changed() => {
                    if r.is_err() {
                        // The watcher's state lives as long as the oracle; this cannot happen,
                        // but if it did, fall back to plain polling.
                        tokio::time::sleep_until(until).await;
                        return Wake::Elapsed;
                    }
                }
                _ = tokio::time::sleep_until(until) => return Wake::Elapsed,
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
        let previous_rest = cached.as_ref().and_then(|r| r.rest);
        let previous_terminal = cached
            .as_ref()
            .filter(|r| {
                r.error.is_none()
                    && started.saturating_duration_since(r.started) <= 2 * self.inner.poll_interval
            })
            .and_then(|r| r.terminal_since);
        // The oldest status map this read may use: the same age a shared tree read may have,
        // and for the settle window's closing re-read, one read after the window.
        let not_before = match fresh {
            Fresh::MaxAge(age) => started.checked_sub(age).unwrap_or(started),
            Fresh::StartedAfter(at) => at.max(started),
        };
        let reading = match self.read_tree(session, not_before).await {
            Ok(tree) => {
                let mut decision = tree.decision;
                // The liveness bound: a tree at rest with only clause 5 unmatched is given
                // the verdict it would have without that clause once it has rested long enough.
                let rest = tree.at_rest.as_ref().map(|_| match previous_rest {
                    Some((since, activity)) if activity == tree.activity => (since, activity),
                    _ => (started, tree.activity),
                });
                if let (Some(at_rest), Some((since, _))) = (tree.at_rest, rest) {
                    if started.saturating_duration_since(since) >= self.inner.rest_bound {
                        decision.verdict = at_rest.verdict;
                        decision.unmatched = at_rest.unmatched;
                    } else {
                        // Whole seconds, so reads of an unchanged tree agree on it.
                        let left = (since + self.inner.rest_bound)
                            .saturating_duration_since(Instant::now())
                            .as_millis() as u64;
                        decision.rest_deadline_ms =
                            Some(unix_ms().saturating_add(left).div_ceil(1000) * 1000);
                    }
                }
                // The settle window counts from when the tree came to rest, as the watcher saw
                // the runtime's events: a tree already quiet when this read began (no change
                // since, with the event stream open throughout) has been terminal since then.
                // Otherwise, and whenever the watcher cannot vouch for it, from this read.
                let terminal_since = decision.verdict.is_terminal().then(|| {
                    previous_terminal.unwrap_or_else(|| {
                        self.inner
                            .state
                            .quiet_since(&tree.ids)
                            .filter(|quiet| *quiet <= started)
                            .unwrap_or(started)
                    })
                });
                Reading {
                    started,
                    seq,
                    ids: tree.ids,
                    decision,
                    error: None,
                    rest,
                    terminal_since,
                }
            }
            Err(e) => Reading {
                started,
                seq,
                ids: vec![session.id.clone()],
                decision: unknown(&e.to_string()),
                error: Some(e),
                rest: None,
                terminal_since: None,
            },
        };
        *cached = Some(reading.clone());
        self.remember(session, &reading.decision);
        reading
    }
}

fn unknown(reason: &str) -> Decision {
    Decision {
        verdict: Verdict::Unknown {
            reason: reason.to_owned(),
        },
        background: false,
        unmatched: Vec::new(),
        rest_deadline_ms: None,
        sessions: Vec::new(),
    }
}

/// Milliseconds since the Unix epoch now (0 on a clock set before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
