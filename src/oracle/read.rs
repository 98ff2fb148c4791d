//! Reading a tree: the status map, then every session reached from the root (info, children,
//! history), judged by the terminal rule. One read of a tree is shared by everyone who waits on
//! it ([`Oracle::read`] coalesces); this file is what one read does.

use std::collections::{BTreeMap, HashMap};

use std::sync::Arc;

use tokio::time::Instant;

use crate::opencode::{Message, Session, SessionStatus, StatusMap};

use super::client::ClientError;
use super::rule::{self, SessionSnapshot, TreeSnapshot};
use super::{Decision, Oracle, SessionRef, SessionSummary, SharedStatuses, Verdict, MAX_TREE};

impl Oracle {
    /// Reads the status map once, then every session of the tree (info, children, history).
    /// A root the runtime answers 404 for is [`Verdict::Gone`]. A status map read since
    /// `not_before` may be used instead of a fresh one (see [`Oracle::status_map`]).
    pub(super) async fn read_tree(
        &self,
        root: &SessionRef,
        not_before: Instant,
    ) -> Result<TreeRead, ClientError> {
        let client = &self.inner.client;
        let directory = root.directory.clone();
        // A session's info is asked for only when no `/children` answer of this read lists it
        // (the list carries the same info): the root, and sessions only a task part names.
        let read = |id: String, with_info: bool| {
            let r = SessionRef {
                id,
                directory: directory.clone(),
            };
            async move {
                let info = async {
                    if with_info {
                        Some(client.session(&r).await)
                    } else {
                        None
                    }
                };
                let (info, children, messages) =
                    tokio::join!(info, client.children(&r), client.messages(&r));
                (r.id, info, children, messages)
            }
        };
        // The status map, the root and every descendant the watcher already knows are read at
        // once, then any level of children still unknown: a plain prompt's tree, or one whose
        // children the watcher saw created, costs one round trip. The known descendants' info
        // is expected from their parents' lists, read in the same round.
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
        let began = Instant::now();
        let mut rounds = 1usize;
        let mut asked = first.len();
        let mut info_reads = 1usize;
        let (statuses, mut level) = tokio::join!(
            self.status_map(directory.clone(), &first, Some(not_before)),
            futures_util::future::join_all(first.iter().map(|id| read(id.clone(), *id == root.id)))
        );
        let (statuses, map_seq) = statuses?;
        // Every session read, with its info and history; judged once the status map is known.
        let mut found: BTreeMap<String, (Session, Vec<Message>)> = BTreeMap::new();
        // Every session a `/children` answer of this read listed, with its info.
        let mut listed: HashMap<String, Session> = HashMap::new();
        loop {
            for (_, _, children, _) in &level {
                for child in children.iter().flatten() {
                    listed
                        .entry(child.id.clone())
                        .or_insert_with(|| child.clone());
                }
            }
            let mut next: Vec<String> = Vec::new();
            for (id, info, children, messages) in level {
                let is_root = id == root.id;
                let info = match info {
                    Some(info) => info,
                    None => match listed.get(&id) {
                        Some(info) => Ok(info.clone()),
                        // Known to the watcher, listed by no parent, and gone: dropped as below.
                        None if matches!(messages, Err(ClientError::NotFound { .. })) => continue,
                        // Known to the watcher but listed by no parent (only a task part names
                        // it): read again with its own info.
                        None => {
                            next.push(id);
                            continue;
                        }
                    },
                };
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
                found.insert(id, (info, messages));
            }
            next.sort();
            next.dedup();
            next.retain(|id| !found.contains_key(id));
            next.truncate(MAX_TREE.saturating_sub(found.len()));
            if next.is_empty() {
                break;
            }
            rounds += 1;
            asked += next.len();
            let reads = next.into_iter().map(|id| {
                let with_info = !listed.contains_key(&id);
                info_reads += usize::from(with_info);
                read(id, with_info)
            });
            level = futures_util::future::join_all(reads).await;
        }
        let ids: Vec<String> = found.keys().cloned().collect();
        // The shared map may be stale about a session an event touched during the read (the
        // root's own end of turn, typically): only the map is read again, fresh, since every
        // session was read after the read began.
        let (statuses, status_map) = match map_seq {
            Some(seq) if self.inner.state.changed_since(&ids, seq) => {
                rounds += 1;
                let (fresh, _) = self.status_map(directory, &ids, None).await?;
                (fresh, "shared, then read again")
            }
            Some(_) => (statuses, "shared"),
            None => (statuses, "read"),
        };
        tracing::debug!(
            root = %root.id,
            rounds,
            sessions_read = asked,
            info_reads,
            status_map,
            elapsed_ms = began.elapsed().as_millis() as u64,
            "oracle: tree read"
        );
        let sessions: BTreeMap<String, SessionSnapshot> = found
            .into_iter()
            .map(|(id, (info, messages))| {
                let status = statuses.get(&id).cloned();
                let busy_now = status.as_ref().is_some_and(|s| !s.is_idle());
                let seen_busy = self.inner.state.busy_ever(&id) || busy_now;
                let prompt_pending = self.inner.state.prompt_pending(
                    &id,
                    busy_now,
                    &messages,
                    self.inner.rest_bound,
                );
                let snapshot = SessionSnapshot {
                    info,
                    status,
                    seen_busy,
                    prompt_pending,
                    messages,
                };
                (id, snapshot)
            })
            .collect();
        let tree = TreeSnapshot {
            root: root.id.clone(),
            sessions,
        };
        let judgement = rule::judge(&tree);
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

    /// The runtime's status map for a read of the tree whose known sessions are `known`.
    ///
    /// Every tree read needs the whole map, and the map is the same for every tree: the trees
    /// read within one poll interval share one fetch of it (one in flight, or the last one
    /// answered). A map is reused only when its read started at or after `reuse`, is younger
    /// than the poll interval, and no event has arrived since it started for any session in
    /// `known`, so it can never show idle a session that an event showed busy after it (the
    /// caller checks the sessions it finds beyond `known` the same way, against the sequence
    /// number returned). A read that cannot reuse one starts its own at once rather than
    /// queueing behind another; a fresh map returns no sequence number.
    async fn status_map(
        &self,
        directory: Option<String>,
        known: &[String],
        reuse: Option<Instant>,
    ) -> Result<(Arc<StatusMap>, Option<u64>), ClientError> {
        let usable = |read: &SharedStatuses| {
            reuse.is_some_and(|since| {
                read.started >= since
                    && read.started.elapsed() < self.inner.poll_interval
                    && !self.inner.state.changed_since(known, read.seq)
            })
        };
        let key = directory.clone();
        let (read, shared) = {
            let mut all = self
                .inner
                .statuses
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let reads = all.entry(key.clone()).or_default();
            let found = [&reads.done, &reads.latest]
                .into_iter()
                .flatten()
                .find(|read| usable(read))
                .cloned();
            match found {
                Some(read) => (read, true),
                None => {
                    let client = self.inner.client.clone();
                    let started = Instant::now();
                    let seq = self.inner.state.seq();
                    let map =
                        async move { client.statuses(directory.as_deref()).await.map(Arc::new) };
                    let read = SharedStatuses {
                        started,
                        seq,
                        map: futures_util::FutureExt::shared(
                            Box::pin(map) as futures_util::future::BoxFuture<'static, _>
                        ),
                    };
                    reads.latest = Some(read.clone());
                    (read, false)
                }
            }
        };
        let map = read.map.clone().await?;
        if shared {
            return Ok((map, Some(read.seq)));
        }
        self.inner.state.record_statuses(&map);
        let mut all = self
            .inner
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let reads = all.entry(key).or_default();
        if reads
            .done
            .as_ref()
            .is_none_or(|done| done.started < read.started)
        {
            reads.done = Some(read);
        }
        drop(all);
        Ok((map, None))
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
