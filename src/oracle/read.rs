//! Reading a tree: the status map, then every session reached from the root (info, children,
//! history), judged by the terminal rule. One read of a tree is shared by everyone who waits on
//! it ([`Oracle::read`] coalesces); this file is what one read does.

use std::collections::BTreeMap;

use crate::opencode::SessionStatus;

use super::client::ClientError;
use super::rule::{self, SessionSnapshot, TreeSnapshot};
use super::{Decision, Oracle, SessionRef, SessionSummary, Verdict, MAX_TREE};

impl Oracle {
    /// Reads the status map once, then every session of the tree (info, children, history).
    /// A root the runtime answers 404 for is [`Verdict::Gone`].
    pub(super) async fn read_tree(&self, root: &SessionRef) -> Result<TreeRead, ClientError> {
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
                let is_root = id == root.id;
                let (info, messages) = match (info, messages) {
                    (Ok(info), Ok(messages)) => (info, messages),
                    // A child that no longer exists (deleted) cannot hold the tree; a root
                    // that no longer exists is a verdict of its own.
                    (Err(ClientError::NotFound { .. }), _)
                    | (_, Err(ClientError::NotFound { .. })) => {
                        if is_root {
                            return Ok(TreeRead::gone(&root.id));
                        }
                        continue;
                    }
                    (Err(e), _) | (_, Err(e)) => return Err(e),
                };
                let children = match children {
                    Ok(c) => c,
                    Err(ClientError::NotFound { .. }) => Vec::new(),
                    Err(e) => return Err(e),
                };
                next.extend(children.into_iter().map(|c| c.id));
                next.extend(rule::named_children(&messages));
                // Children the watcher saw created, in case `/children` does not list them.
                if let Some(known) = self.inner.state.session(&id) {
                    next.extend(known.children);
                }
                let status = statuses.get(&id).cloned();
                let busy_now = status.as_ref().is_some_and(|s| !s.is_idle());
                let seen_busy = self.inner.state.busy_ever(&id) || busy_now;
                let prompt_pending = self.inner.state.prompt_pending(
                    &id,
                    busy_now,
                    &messages,
                    self.inner.rest_bound,
                );
                sessions.insert(
                    id,
                    SessionSnapshot {
                        info,
                        status,
                        seen_busy,
                        prompt_pending,
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
                busy_since_ms: s
                    .status
                    .as_ref()
                    .filter(|status| !status.is_idle())
                    .and_then(|_| self.inner.state.session(&s.info.id))
                    .and_then(|known| known.busy_since_ms),
            })
            .collect();
        // The root first, for readers that print the list as a tree.
        summaries.sort_by_key(|s| s.id != root.id);
        Ok(TreeRead {
            ids,
            decision: Decision {
                verdict: judgement.verdict,
                background: judgement.background,
                unmatched: Vec::new(),
                rest_deadline_ms: None,
                sessions: summaries,
            },
            at_rest: judgement.at_rest,
            activity: judgement.activity,
        })
    }
}

/// One tree read, before the liveness bound is applied.
pub(super) struct TreeRead {
    /// Every session of the tree, to match events against.
    pub ids: Vec<String>,
    pub decision: Decision,
    pub at_rest: Option<rule::AtRest>,
    pub activity: rule::Activity,
}

impl TreeRead {
    fn gone(root: &str) -> TreeRead {
        TreeRead {
            ids: vec![root.to_owned()],
            decision: Decision {
                verdict: Verdict::Gone {
                    session: root.to_owned(),
                },
                background: false,
                unmatched: Vec::new(),
                rest_deadline_ms: None,
                sessions: Vec::new(),
            },
            at_rest: None,
            activity: rule::Activity::default(),
        }
    }
}
