//! The live view's data: one plain snapshot of every tree the oracle has read, what both
//! directions of the gate hold on them, and what was released lately. `/_taskgate/view` sends
//! it as JSON, `/_taskgate/events` sends it again on every change, `taskgate holds` and the page
//! at `/_taskgate/` draw it. Built here, from the oracle's trees and the hold registry, so the
//! oracle never learns who looks.

use std::collections::HashSet;

use serde::Serialize;

use super::Gate;
use crate::holds::{HoldInfo, ReleaseInfo};
use crate::oracle::{unix_ms, TreeView};

/// Most trees one snapshot lists (the most recently read): a proxy running for days has read
/// thousands, and the view is about what is going on now.
const MAX_TREES: usize = 30;

/// What the live view shows at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Unix ms when the snapshot was taken: ages on the page count from here.
    pub now_ms: u64,
    /// Whether the gate is on (off: a plain proxy, nothing is ever held).
    pub gate: bool,
    /// Every root read lately with its latest decision and sessions, most recent first; a
    /// subtree read on its own is left out when a listed tree contains it.
    pub trees: Vec<TreeView>,
    /// What is held now, oldest first.
    pub holds: Vec<HoldInfo>,
    /// What ended lately, newest first.
    pub releases: Vec<ReleaseInfo>,
}

impl Snapshot {
    /// The view of a proxy without a gate: nothing held, nothing read.
    pub fn without_gate() -> Snapshot {
        Snapshot {
            now_ms: unix_ms(),
            gate: false,
            trees: Vec::new(),
            holds: Vec::new(),
            releases: Vec::new(),
        }
    }
}

impl Gate {
    /// The live view now.
    pub fn view(&self) -> Snapshot {
        let inner = &self.inner;
        let mut trees = inner.oracle.trees();
        // A child's tree is read on its own when a claim names it; it is drawn inside its
        // root's tree already, and drawing it twice would show its holds twice.
        let inside: HashSet<String> = trees
            .iter()
            .flat_map(|t| {
                t.decision
                    .sessions
                    .iter()
                    .filter(|s| s.id != t.root)
                    .map(|s| s.id.clone())
            })
            .collect();
        trees.retain(|t| !inside.contains(&t.root));
        trees.truncate(MAX_TREES);
        Snapshot {
            now_ms: unix_ms(),
            gate: true,
            trees,
            holds: inner.holds.snapshot(),
            releases: inner.holds.releases(),
        }
    }

    /// Snapshots of the live view: the current one at once, then one after every change of a
    /// hold or of a tree's decision (bursts are coalesced: each wake sends what is true then).
    /// Ends when taskgate shuts down.
    pub fn views(&self) -> impl futures_util::Stream<Item = Snapshot> + Send + 'static {
        let gate = self.clone();
        let holds = self.inner.holds.subscribe();
        let trees = self.inner.oracle.subscribe_trees();
        futures_util::stream::unfold(
            (gate, holds, trees, true),
            |(gate, mut holds, mut trees, first)| async move {
                if !first {
                    let shutdown = gate.inner.shutdown.clone();
                    tokio::select! {
                        changed = holds.changed() => changed.ok()?,
                        changed = trees.changed() => changed.ok()?,
                        () = shutdown.cancelled() => return None,
                    }
                }
                holds.mark_unchanged();
                trees.mark_unchanged();
                Some((gate.view(), (gate, holds, trees, false)))
            },
        )
    }
}
