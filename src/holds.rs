//! The registry of what both faces hold right now (the gate's prompts, idles and parts, the
//! model face's requests), behind `GET /_taskgate/holds`, the live view and the hold metrics.
//!
//! Every hold is represented by a [`HoldGuard`]; dropping the guard (release, client gone,
//! stream ended) removes the entry and closes the gauge, so the registry cannot leak holds
//! whatever path a request takes. Holds are cancel-safe by construction.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::{FaceKindLabel, FaceLabel, FaceVerdictLabel, Metrics};
use crate::oracle::{unix_ms, Decision, Verdict};

/// How many ended holds the live view keeps (`releases`, newest first).
const RECENT_RELEASES: usize = 50;

/// The verdict of a hold that ended without a release (see [`HoldGuard`]'s `Drop`).
const DROPPED: &str = "dropped";

/// What kind of claim is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldKind {
    /// `POST /session/:id/message` waiting for the session's tree.
    Prompt,
    /// A `session.status` idle / `session.idle` event.
    Idle,
    /// A tool part or message part that claims a child is done.
    Part,
    /// The model face: a request to the model provider whose tool results or texts claim a
    /// child is done, held until the child's tree is terminal.
    Request,
}

impl HoldKind {
    fn name(self) -> &'static str {
        match self {
            HoldKind::Prompt => "prompt",
            HoldKind::Idle => "idle",
            HoldKind::Part => "part",
            HoldKind::Request => "request",
        }
    }

    /// Which face holds it: "client" (the gate) or "model".
    pub fn face(self) -> &'static str {
        match self {
            HoldKind::Request => "model",
            HoldKind::Prompt | HoldKind::Idle | HoldKind::Part => "client",
        }
    }
}

/// The session that keeps a hold waiting: the one the latest verdict names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Blocking {
    pub id: String,
    pub title: Option<String>,
    pub agent: Option<String>,
    /// "busy", "idle", … as the runtime's status map said at the read.
    pub status: Option<String>,
}

/// One row of `/_taskgate/holds`.
#[derive(Debug, Clone, Serialize)]
pub struct HoldInfo {
    /// "client" or "model" (see [`HoldKind::face`]).
    pub face: &'static str,
    pub kind: HoldKind,
    /// The session the claim was made in (or about, for idle and prompt holds).
    pub session: String,
    /// The session whose tree must be terminal for the claim to be released.
    pub child: String,
    /// Unix milliseconds when the hold started.
    pub since_ms: u64,
    /// Whole seconds held so far, at the moment of the snapshot.
    pub age_s: u64,
    /// The latest verdict read while holding ("running" until a read says otherwise).
    pub verdict: &'static str,
    /// Why, in words: what the latest read found still going.
    pub reason: String,
    /// The session the latest read found not done, with its title and agent.
    pub blocking: Option<Blocking>,
    /// Unix ms when the liveness bound releases the tree, while it rests with only unmatched
    /// clauses left (docs/terminal-rule.md, "The liveness bound").
    pub rest_deadline_ms: Option<u64>,
}

/// A hold that ended, as the live view lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseInfo {
    pub face: &'static str,
    pub kind: HoldKind,
    pub session: String,
    pub child: String,
    /// Unix ms when it ended.
    pub at_ms: u64,
    pub held_ms: u64,
    /// The verdict it was released with; "dropped" when the client went away or taskgate
    /// stopped first.
    pub verdict: &'static str,
    pub reason: String,
    /// The claim said "done" and the runtime said otherwise: it was rewritten to the truth.
    pub contradiction: bool,
}

#[derive(Default)]
struct Table {
    rows: BTreeMap<u64, HoldInfo>,
    releases: VecDeque<ReleaseInfo>,
}

impl Table {
    fn ended(&mut self, release: ReleaseInfo) {
        if self.releases.len() == RECENT_RELEASES {
            self.releases.pop_back();
        }
        self.releases.push_front(release);
    }
}

/// Shared registry; cheap to clone.
#[derive(Clone)]
pub struct Holds {
    table: Arc<Mutex<Table>>,
    next: Arc<AtomicU64>,
    /// Bumped on every change, so the live view redraws on change rather than on a timer.
    changed: Arc<watch::Sender<u64>>,
    metrics: Metrics,
}

impl Holds {
    pub fn new(metrics: Metrics) -> Holds {
        Holds {
            table: Arc::default(),
            next: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
            metrics,
        }
    }

    /// The metrics the holds are counted in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Registers a hold; it lasts as long as the returned guard.
    pub fn open(&self, kind: HoldKind, session: &str, child: &str) -> HoldGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().rows.insert(
            id,
            HoldInfo {
                face: kind.face(),
                kind,
                session: session.to_owned(),
                child: child.to_owned(),
                since_ms: unix_ms(),
                age_s: 0,
                verdict: "running",
                reason: "waiting for the first read of the tree".to_owned(),
                blocking: None,
                rest_deadline_ms: None,
            },
        );
        self.touch();
        tracing::info!(
            face = kind.face(),
            kind = kind.name(),
            session,
            child,
            "hold started"
        );
        self.metrics
            .holds_open
            .get_or_create(&FaceLabel { face: kind.face() })
            .inc();
        self.metrics
            .holds
            .get_or_create(&FaceKindLabel {
                face: kind.face(),
                kind: kind.name(),
            })
            .inc();
        HoldGuard {
            holds: self.clone(),
            id,
            face: kind.face(),
            started: Instant::now(),
            released: false,
        }
    }

    /// What is held now, oldest first.
    pub fn snapshot(&self) -> Vec<HoldInfo> {
        let now = unix_ms();
        let mut rows: Vec<HoldInfo> = self.lock().rows.values().cloned().collect();
        for row in &mut rows {
            row.age_s = now.saturating_sub(row.since_ms) / 1000;
        }
        rows
    }

    /// The holds that ended lately, newest first.
    pub fn releases(&self) -> Vec<ReleaseInfo> {
        self.lock().releases.iter().cloned().collect()
    }

    /// Wakes on every change of the rows or the releases.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the table inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A live hold. Dropped = no longer held.
pub struct HoldGuard {
    holds: Holds,
    id: u64,
    face: &'static str,
    started: Instant,
    /// Ended by [`HoldGuard::release`] (logged there) rather than dropped.
    released: bool,
}

impl HoldGuard {
    /// Records the latest decision read while holding (shown by `/_taskgate/holds`): its
    /// verdict, why, the session it names, and the liveness deadline.
    pub fn update(&self, decision: &Decision) {
        let changed = {
            let mut table = self.holds.lock();
            let Some(row) = table.rows.get_mut(&self.id) else {
                return;
            };
            let blocking = blocking(decision);
            let reason = crate::claims::render::plain_reason(&decision.verdict);
            let changed = row.verdict != decision.verdict.name()
                || row.reason != reason
                || row.blocking != blocking
                || row.rest_deadline_ms != decision.rest_deadline_ms;
            row.verdict = decision.verdict.name();
            row.reason = reason;
            row.blocking = blocking;
            row.rest_deadline_ms = decision.rest_deadline_ms;
            changed
        };
        if changed {
            self.holds.touch();
        }
    }

    /// The hold's latest reason (what the last read said).
    pub fn reason(&self) -> String {
        self.holds
            .lock()
            .rows
            .get(&self.id)
            .map(|row| row.reason.clone())
            .unwrap_or_default()
    }

    /// Milliseconds held so far.
    pub fn held_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Takes the hold's row out of the table, records how it ended and tells the watchers of
    /// the table. Logged with the table unlocked: a slow stderr must not hold up every other
    /// hold.
    fn close(&self, held_ms: u64, verdict: &'static str, reason: String, contradiction: bool) {
        let row = self.holds.lock().rows.remove(&self.id);
        if let Some(row) = row {
            let (face, kind) = (row.face, row.kind.name());
            if verdict == DROPPED {
                tracing::info!(face, kind, session = %row.session, child = %row.child, held_ms, "hold dropped");
            } else {
                tracing::info!(face, kind, session = %row.session, child = %row.child, verdict, held_ms, reason = %reason, "hold released");
            }
            self.holds.lock().ended(ReleaseInfo {
                face: row.face,
                kind: row.kind,
                session: row.session,
                child: row.child,
                at_ms: unix_ms(),
                held_ms,
                verdict,
                reason,
                contradiction,
            });
        }
        self.holds.touch();
    }

    /// Ends the hold with `verdict`, counting the release and its duration. `contradiction`:
    /// the claim was rewritten because the runtime said otherwise.
    pub fn release(mut self, verdict: &Verdict, contradiction: bool) -> u64 {
        self.released = true;
        let held = self.started.elapsed();
        let held_ms = held.as_millis() as u64;
        let reason = crate::claims::render::plain_reason(verdict);
        self.close(held_ms, verdict.name(), reason, contradiction);
        let metrics = &self.holds.metrics;
        metrics
            .releases
            .get_or_create(&FaceVerdictLabel {
                face: self.face,
                verdict: verdict.name(),
            })
            .inc();
        metrics
            .hold_seconds
            .get_or_create(&FaceLabel { face: self.face })
            .observe(held.as_secs_f64());
        held_ms
    }
}

/// The session `decision`'s verdict names, with what the read knew of it.
fn blocking(decision: &Decision) -> Option<Blocking> {
    let id = match &decision.verdict {
        Verdict::Running { session, .. }
        | Verdict::Failed { session, .. }
        | Verdict::Aborted { session, .. }
        | Verdict::Gone { session } => session,
        Verdict::Completed { .. } | Verdict::Unknown { .. } => return None,
    };
    let known = decision.sessions.iter().find(|s| s.id == *id);
    Some(Blocking {
        id: id.clone(),
        title: known.and_then(|s| s.title.clone()),
        agent: known.and_then(|s| s.agent.clone()),
        status: known.map(|s| s.status.clone()),
    })
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if !self.released {
            let held_ms = self.started.elapsed().as_millis() as u64;
            // The client went away, the stream ended, or taskgate stops.
            self.close(
                held_ms,
                DROPPED,
                "the client went away or taskgate stopped before the tree ended".to_owned(),
                false,
            );
        }
        self.holds
            .metrics
            .holds_open
            .get_or_create(&FaceLabel { face: self.face })
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_a_guard_removes_the_hold_and_closes_the_gauge() {
        let metrics = Metrics::new();
        let holds = Holds::new(metrics.clone());
        let a = holds.open(HoldKind::Idle, "ses_root", "ses_root");
        let b = holds.open(HoldKind::Part, "ses_root", "ses_child");
        b.update(&Decision {
            verdict: Verdict::Running {
                session: "ses_child".into(),
                reason: "ses_child is busy (rule 1)".into(),
            },
            background: false,
            unmatched: Vec::new(),
            rest_deadline_ms: None,
            sessions: Vec::new(),
        });
        let rows = holds.snapshot();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].reason, "ses_child is busy");
        assert_eq!(
            rows[1].blocking.as_ref().map(|b| b.id.as_str()),
            Some("ses_child")
        );
        let open = metrics
            .holds_open
            .get_or_create(&FaceLabel { face: "client" });
        assert_eq!(open.get(), 2);
        drop(a);
        b.release(&Verdict::Completed { text: None }, false);
        assert!(holds.snapshot().is_empty());
        let ended: Vec<&str> = holds.releases().iter().map(|r| r.verdict).collect();
        assert_eq!(ended, ["completed", "dropped"]);
        assert_eq!(open.get(), 0);
        assert!(metrics
            .render()
            .contains("taskgate_releases_total{face=\"client\",verdict=\"completed\"} 1"));
    }
}
