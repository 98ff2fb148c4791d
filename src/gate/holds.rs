//! The registry of what is held right now, behind `GET /_taskgate/holds` and the hold metrics.
//!
//! Every hold is represented by a [`HoldGuard`]; dropping the guard (release, client gone,
//! stream ended) removes the entry and closes the gauge, so the registry cannot leak holds
//! whatever path a request takes. Holds are cancel-safe by construction.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::metrics::{KindLabel, Metrics, VerdictLabel};
use crate::oracle::Verdict;

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
}

impl HoldKind {
    fn name(self) -> &'static str {
        match self {
            HoldKind::Prompt => "prompt",
            HoldKind::Idle => "idle",
            HoldKind::Part => "part",
        }
    }
}

/// One row of `/_taskgate/holds`.
#[derive(Debug, Clone, Serialize)]
pub struct HoldInfo {
    pub kind: HoldKind,
    /// The session the claim was made in (or about, for idle and prompt holds).
    pub session: String,
    /// The session whose tree must be terminal for the claim to be released.
    pub child: String,
    /// Unix milliseconds when the hold started.
    pub since_ms: u64,
    pub verdict: &'static str,
    pub reason: String,
}

#[derive(Default)]
struct Table {
    rows: BTreeMap<u64, HoldInfo>,
}

/// Shared registry; cheap to clone.
#[derive(Clone)]
pub struct Holds {
    table: Arc<Mutex<Table>>,
    next: Arc<AtomicU64>,
    metrics: Metrics,
}

impl Holds {
    pub fn new(metrics: Metrics) -> Holds {
        Holds {
            table: Arc::default(),
            next: Arc::default(),
            metrics,
        }
    }

    /// Registers a hold; it lasts as long as the returned guard.
    pub fn open(&self, kind: HoldKind, session: &str, child: &str) -> HoldGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let since_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.lock().rows.insert(
            id,
            HoldInfo {
                kind,
                session: session.to_owned(),
                child: child.to_owned(),
                since_ms,
                verdict: "running",
                reason: "waiting for the first read".to_owned(),
            },
        );
        tracing::info!(kind = kind.name(), session, child, "hold started");
        self.metrics.holds_open.inc();
        self.metrics
            .holds
            .get_or_create(&KindLabel { kind: kind.name() })
            .inc();
        HoldGuard {
            holds: self.clone(),
            id,
            started: Instant::now(),
            released: false,
        }
    }

    /// What is held now, oldest first.
    pub fn snapshot(&self) -> Vec<HoldInfo> {
        self.lock().rows.values().cloned().collect()
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
    started: Instant,
    /// Ended by [`HoldGuard::release`] (logged there) rather than dropped.
    released: bool,
}

impl HoldGuard {
    /// Records the latest verdict seen while holding (shown by `/_taskgate/holds`).
    pub fn update(&self, verdict: &Verdict) {
        if let Some(row) = self.holds.lock().rows.get_mut(&self.id) {
            row.verdict = verdict.name();
            row.reason = crate::claims::render::reason(verdict);
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

    /// Ends the hold with `verdict`, counting the release and its duration.
    pub fn release(mut self, verdict: &Verdict) -> u64 {
        self.released = true;
        let held = self.started.elapsed();
        if let Some(row) = self.holds.lock().rows.get(&self.id) {
            tracing::info!(
                kind = row.kind.name(),
                session = %row.session,
                child = %row.child,
                verdict = verdict.name(),
                held_ms = held.as_millis() as u64,
                reason = %crate::claims::render::reason(verdict),
                "hold released"
            );
        }
        let metrics = &self.holds.metrics;
        metrics
            .releases
            .get_or_create(&VerdictLabel {
                verdict: verdict.name(),
            })
            .inc();
        metrics.hold_seconds.observe(held.as_secs_f64());
        held.as_millis() as u64
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        let row = self.holds.lock().rows.remove(&self.id);
        if let Some(row) = row.filter(|_| !self.released) {
            // The client went away, the stream ended, or taskgate stops.
            tracing::info!(
                kind = row.kind.name(),
                session = %row.session,
                child = %row.child,
                held_ms = self.started.elapsed().as_millis() as u64,
                "hold dropped"
            );
        }
        self.holds.metrics.holds_open.dec();
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
        b.update(&Verdict::Running {
            session: "ses_child".into(),
            reason: "ses_child is busy".into(),
        });
        let rows = holds.snapshot();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].reason, "ses_child is busy");
        assert_eq!(metrics.holds_open.get(), 2);
        drop(a);
        b.release(&Verdict::Completed { text: None });
        assert!(holds.snapshot().is_empty());
        assert_eq!(metrics.holds_open.get(), 0);
        assert!(metrics
            .render()
            .contains("taskgate_releases_total{verdict=\"completed\"} 1"));
    }
}
