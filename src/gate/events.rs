//! The event-stream gate (`/event`, `/global/event`).
//!
//! One relay task per stream reads the runtime's bytes, cuts them into frames with the
//! [`Framer`], and decides per frame: **pass** (almost all), **hold**
//! (a session's idle while its tree is not terminal; a part claiming a child is done while the
//! child's tree is not terminal), or **supersede** (a later update of a held part replaces it;
//! a session going busy again drops its held idles, a later idle takes their place).
//!
//! Held frames wait aside: they never delay other events, and each target session has one
//! oracle wait however many frames wait on it. The relay task owns all the stream's state, so
//! there are no locks; waits report back through a channel. Frames it cannot parse pass through
//! untouched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http::{header, Response};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Gate;
use crate::claims::{self, render, Claim, Links};
use crate::holds::{HoldGuard, HoldKind};
use crate::opencode::sse::{self, Chunk, Framer};
use crate::opencode::{Event, ToolPart};
use crate::oracle::{Decision, OracleError, SessionRef, Verdict};

type Frame = Result<Bytes, axum::Error>;

/// Wraps an event-stream response so its claims pass through the gate.
pub(super) fn gate_stream(
    gate: Gate,
    response: Response<Body>,
    directory: Option<String>,
    global: bool,
) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    // A small buffer: the relay waits for a slow client rather than piling frames up, which
    // keeps memory bounded and order intact.
    let (tx, rx) = mpsc::channel::<Frame>(64);
    let relay = StreamGate::new(gate, directory, global, tx);
    tokio::spawn(relay.run(body));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// What one frame asks for.
enum Action {
    Pass,
    /// `session.status` idle or `session.idle` of this session.
    Idle(SessionRef),
    /// `session.status` busy/retry: the session works again.
    Busy(String),
    /// A part claiming its children are done.
    Claim {
        session: String,
        directory: Option<String>,
        part_id: Option<String>,
        claim: Claim,
        children: Vec<String>,
    },
}

/// A frame waiting for its targets' trees.
struct Held {
    frame: Bytes,
    /// The session the event belongs to.
    session: String,
    kind: HeldKind,
    /// Targets not yet terminal.
    pending: Vec<String>,
    /// Decisions of the targets already resolved (shared by every frame held on the target).
    decided: Vec<(String, Arc<Decision>)>,
    guard: HoldGuard,
}

enum HeldKind {
    Idle,
    Claim {
        part_id: Option<String>,
        claim: Claim,
    },
}

struct StreamGate {
    gate: Gate,
    directory: Option<String>,
    global: bool,
    tx: mpsc::Sender<Frame>,
    framer: Framer,
    /// Held frames by arrival order, so releases of one session keep their order.
    held: BTreeMap<u64, Held>,
    /// The held frames pending on each target, in arrival order. A read or the end of one
    /// target's wait touches only its own frames: scanning every held frame for every target
    /// was most of the CPU when 100 trees ended at once under 10,000 holds. Entries of frames
    /// dropped since (superseded idles) are skipped when met.
    by_target: HashMap<String, Vec<u64>>,
    seq: u64,
    /// One oracle wait per target session.
    waits: HashMap<String, JoinHandle<()>>,
    done_tx: mpsc::UnboundedSender<(String, Waited)>,
    done_rx: mpsc::UnboundedReceiver<(String, Waited)>,
    /// `bg_…` → `ses_…` learned from launch results seen on this stream.
    links: Links,
}

/// What a target's wait reports to the relay.
enum Waited {
    /// A read on the way.
    Read(Decision),
    /// The end of the wait.
    Done(Result<Decision, OracleError>),
}

/// The client is gone (or shutdown): stop relaying.
struct Closed;

impl StreamGate {
    fn new(
        gate: Gate,
        directory: Option<String>,
        global: bool,
        tx: mpsc::Sender<Frame>,
    ) -> StreamGate {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        StreamGate {
            gate,
            directory,
            global,
            tx,
            framer: Framer::default(),
            held: BTreeMap::new(),
            by_target: HashMap::new(),
            seq: 0,
            waits: HashMap::new(),
            done_tx,
            done_rx,
            links: Links::default(),
        }
    }

    async fn run(mut self, mut body: Body) {
        let shutdown = self.gate.inner.shutdown.clone();
        let tx = self.tx.clone();
        loop {
            let step = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tx.closed() => break,
                Some((target, waited)) = self.done_rx.recv() => match waited {
                    Waited::Read(decision) => {
                        self.progress(&target, &decision);
                        Ok(())
                    }
                    Waited::Done(outcome) => self.resolved(target, outcome).await,
                },
                frame = body.frame() => match frame {
                    None => {
                        if let Some(rest) = self.framer.finish() {
                            let _ = self.send(rest).await;
                        }
                        break;
                    }
                    Some(Err(e)) => {
                        let _ = self.tx.send(Err(e)).await;
                        break;
                    }
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => self.bytes(&data).await,
                        Err(_) => Ok(()),
                    },
                },
            };
            if step.is_err() {
                break;
            }
        }
        for (_, wait) in self.waits.drain() {
            wait.abort();
        }
        // Held frames are dropped with the stream: a claim that could not be verified is never
        // sent. A client that reconnects reads the state afresh.
    }

    async fn bytes(&mut self, data: &[u8]) -> Result<(), Closed> {
        let was_raw = self.framer.is_raw();
        for chunk in self.framer.push(data) {
            match chunk {
                Chunk::Raw(bytes) => {
                    if !was_raw {
                        tracing::warn!("event larger than the frame cap: stream passed through uninspected from here");
                        self.gate.count_uninspected("oversized_event");
                    }
                    self.send(bytes).await?;
                }
                Chunk::Frame(frame) => self.frame(frame).await?,
            }
        }
        Ok(())
    }

    async fn frame(&mut self, frame: Bytes) -> Result<(), Closed> {
        match self.classify(&frame) {
            Action::Pass => self.send(frame).await,
            Action::Busy(session) => {
                self.send(frame).await?;
                self.drop_idles(&session);
                Ok(())
            }
            Action::Idle(session) => {
                if self.at_capacity() {
                    return self.send(frame).await;
                }
                let id = session.id.clone();
                self.hold(frame, id.clone(), HeldKind::Idle, vec![session]);
                Ok(())
            }
            Action::Claim {
                session,
                directory,
                part_id,
                claim,
                children,
            } => {
                if let Some(id) = &part_id {
                    if let Some(held) = self.held.values_mut().find(
                        |h| matches!(&h.kind, HeldKind::Claim { part_id: Some(p), .. } if p == id),
                    ) {
                        // A later update of a held part replaces it, keeping its place.
                        held.frame = detach(&frame);
                        held.kind = HeldKind::Claim { part_id, claim };
                        return Ok(());
                    }
                }
                if self.at_capacity() {
                    return self.send(frame).await;
                }
                let targets = children
                    .into_iter()
                    .map(|id| SessionRef {
                        id,
                        directory: directory.clone(),
                    })
                    .collect();
                self.hold(frame, session, HeldKind::Claim { part_id, claim }, targets);
                Ok(())
            }
        }
    }

    /// Reads the frame just enough to decide. Anything unexpected means [`Action::Pass`].
    fn classify(&mut self, frame: &[u8]) -> Action {
        let Some(parsed) = sse::parse(frame) else {
            return Action::Pass;
        };
        // Every envelope era and the `/global/event` wrapper; `sync` records pass.
        let Some(event) = Event::parse(parsed.data.as_bytes()) else {
            return Action::Pass;
        };
        let directory = if self.global {
            event.directory.clone()
        } else {
            self.directory.clone()
        };
        let session = event.session_id().map(str::to_owned);
        if event.is_idle() {
            return session.map_or(Action::Pass, |id| {
                Action::Idle(SessionRef { id, directory })
            });
        }
        if let Some(status) = event.status() {
            let Some(id) = session else {
                return Action::Pass;
            };
            // Unknown status types count as "not idle", like the runtime's own.
            return if status.is_idle() {
                Action::Idle(SessionRef { id, directory })
            } else {
                Action::Busy(id)
            };
        }
        if event.kind() != "message.part.updated" {
            return Action::Pass;
        }
        let Some(part) = event.properties.get("part") else {
            return Action::Pass;
        };
        let claim = match ToolPart::from_part(part) {
            Some(tool) => {
                self.links.learn_part(&tool);
                claims::tool_part(&self.gate.inner.tools, &tool)
            }
            None if part.get("type").and_then(Value::as_str) == Some("text") => part
                .get("text")
                .and_then(Value::as_str)
                .and_then(claims::message_text),
            None => None,
        };
        let Some(claim) = claim else {
            return Action::Pass;
        };
        let children = self.gate.children_of(&claim, &self.links);
        if children.is_empty() {
            tracing::warn!(
                source = claim.source.name(),
                "claim names no known child session; passed through unverified"
            );
            self.gate.count_uninspected("unlinked_claim");
            return Action::Pass;
        }
        Action::Claim {
            session: session.unwrap_or_default(),
            directory,
            part_id: part.get("id").and_then(Value::as_str).map(str::to_owned),
            claim,
            children,
        }
    }

    fn at_capacity(&self) -> bool {
        let full = self.held.len() >= self.gate.inner.config.max_held_events;
        if full {
            tracing::warn!(
                limit = self.gate.inner.config.max_held_events,
                "held-event limit reached on this stream: passing the event through"
            );
            self.gate.count_uninspected("hold_limit");
        }
        full
    }

    fn hold(&mut self, frame: Bytes, session: String, kind: HeldKind, targets: Vec<SessionRef>) {
        let (hold_kind, child) = match &kind {
            HeldKind::Idle => (HoldKind::Idle, session.clone()),
            HeldKind::Claim { .. } => (
                HoldKind::Part,
                targets.first().map(|t| t.id.clone()).unwrap_or_default(),
            ),
        };
        let guard = self.gate.inner.holds.open(hold_kind, &session, &child);
        self.seq += 1;
        for target in &targets {
            self.ensure_wait(target);
            self.by_target
                .entry(target.id.clone())
                .or_default()
                .push(self.seq);
        }
        self.held.insert(
            self.seq,
            Held {
                frame: detach(&frame),
                session,
                kind,
                pending: targets.into_iter().map(|t| t.id).collect(),
                decided: Vec::new(),
                guard,
            },
        );
    }

    fn ensure_wait(&mut self, target: &SessionRef) {
        if self.waits.contains_key(&target.id) {
            return;
        }
        let oracle = self.gate.inner.oracle.clone();
        let done = self.done_tx.clone();
        let target = target.clone();
        let deadline = Instant::now() + self.gate.inner.config.max_hold.0;
        let id = target.id.clone();
        let task = tokio::spawn(async move {
            // Only a changed verdict is reported: the hold rows show nothing else, and with
            // thousands of claims held, cloning every shared read into every stream was most of
            // the work between reads.
            let last = std::sync::Mutex::new(None::<Verdict>);
            let seen = |d: &Decision| {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_ref() != Some(&d.verdict) {
                    *last = Some(d.verdict.clone());
                    let _ = done.send((target.id.clone(), Waited::Read(d.clone())));
                }
            };
            let outcome = oracle
                .wait_terminal_seeing(&target, Some(deadline), seen)
                .await;
            let _ = done.send((target.id.clone(), Waited::Done(outcome)));
        });
        self.waits.insert(id, task);
    }

    /// A read of `target`'s tree while frames wait on it: their hold rows show it.
    fn progress(&self, target: &str, decision: &Decision) {
        for seq in self.by_target.get(target).into_iter().flatten() {
            if let Some(held) = self.held.get(seq) {
                held.guard.update(decision);
            }
        }
    }

    /// A session went busy again: its held idles are dropped (a later idle takes their place).
    fn drop_idles(&mut self, session: &str) {
        let before = self.held.len();
        self.held
            .retain(|_, h| !(matches!(h.kind, HeldKind::Idle) && h.session == session));
        if self.held.len() != before {
            self.forget_unwanted_waits();
        }
    }

    fn forget_unwanted_waits(&mut self) {
        // One pass over the held frames, not one per wait: a stream holding 200 frames on
        // 200 targets did 40,000 comparisons on every busy event.
        let wanted: HashSet<&str> = self
            .held
            .values()
            .flat_map(|h| h.pending.iter().map(String::as_str))
            .collect();
        self.waits.retain(|target, wait| {
            let wanted = wanted.contains(target.as_str());
            if !wanted {
                wait.abort();
            }
            wanted
        });
        self.by_target
            .retain(|target, _| wanted.contains(target.as_str()));
    }

    async fn resolved(
        &mut self,
        target: String,
        outcome: Result<Decision, OracleError>,
    ) -> Result<(), Closed> {
        self.waits.remove(&target);
        let seqs = self.by_target.remove(&target).unwrap_or_default();
        let decision = match outcome {
            Ok(decision) => decision,
            Err(OracleError::Deadline(decision)) => {
                tracing::warn!(session = %target, "max_hold reached: releasing held events as errors while the tree still runs");
                *decision
            }
            Err(OracleError::Unverifiable(decision)) => {
                tracing::warn!(session = %target, reason = %render::reason(&decision.verdict), "cannot read the runtime: releasing held events as errors");
                *decision
            }
            // Shutting down: the stream ends, and held frames are dropped with it.
            Err(OracleError::Cancelled) => return Ok(()),
        };
        let decision = Arc::new(decision);
        // Only frames waiting on this target can become ready; `seqs` is in arrival order.
        let mut ready = Vec::new();
        for seq in seqs {
            let Some(held) = self.held.get_mut(&seq) else {
                continue;
            };
            if let Some(at) = held.pending.iter().position(|p| *p == target) {
                held.pending.remove(at);
                held.decided.push((target.clone(), decision.clone()));
                // A frame released now has its row closed by the release; only the frames
                // still waiting on other targets show this decision.
                if held.pending.is_empty() {
                    ready.push(seq);
                } else {
                    held.guard.update(&decision);
                }
            }
        }
        for seq in ready {
            if let Some(held) = self.held.remove(&seq) {
                for frame in self.release(held) {
                    self.send(frame).await?;
                }
            }
        }
        Ok(())
    }

    /// The frames to send for a released hold: an idle as it was, after a `session.error`
    /// saying why when the tree was not seen to end (max_hold, runtime unreadable, session
    /// gone); a claim annotated with `metadata.taskgate` and, unless its child's tree
    /// completed, rewritten to an error saying what is true.
    fn release(&self, held: Held) -> Vec<Bytes> {
        let (child, verdict) = worst(&held.decided);
        let HeldKind::Claim { claim, .. } = &held.kind else {
            held.guard.release(&verdict, false);
            let ended = matches!(
                verdict,
                Verdict::Completed { .. } | Verdict::Failed { .. } | Verdict::Aborted { .. }
            );
            if ended {
                return vec![held.frame];
            }
            return match self.error_frame(&held.frame, &held.session, &verdict) {
                Some(error) => vec![error, held.frame],
                None => vec![held.frame],
            };
        };
        let (frame, contradiction) =
            self.release_claim(&held.frame, claim, &child, &verdict, held.guard.held_ms());
        held.guard.release(&verdict, contradiction);
        vec![frame]
    }

    /// A `session.error` frame in the envelope of `like`, telling why `session`'s idle comes
    /// without its tree seen to end.
    fn error_frame(&self, like: &[u8], session: &str, verdict: &Verdict) -> Option<Bytes> {
        let parsed = sse::parse(like)?;
        let event = Event::parse(parsed.data.as_bytes())?;
        let message = format!(
            "taskgate: session {session}'s tree was not seen to end: {}",
            render::reason(verdict)
        );
        let error = Event::session_error(&event, session, "TaskgateHoldError", &message);
        Some(Bytes::from(format!(
            "data: {}\n\n",
            error.to_value(self.global)
        )))
    }

    fn release_claim(
        &self,
        frame: &Bytes,
        claim: &Claim,
        child: &str,
        verdict: &Verdict,
        held_ms: u64,
    ) -> (Bytes, bool) {
        let Some(parsed) = sse::parse(frame) else {
            return (frame.clone(), false);
        };
        let Ok(mut value) = serde_json::from_str::<Value>(&parsed.data) else {
            return (frame.clone(), false);
        };
        let Some(part) = Event::part_in(&mut value) else {
            return (frame.clone(), false);
        };
        let inner = &self.gate.inner;
        let contradiction = render::annotate_part(
            part,
            claim,
            verdict,
            held_ms,
            child,
            inner.config.rewrite_contradictions,
        );
        if contradiction {
            inner.metrics.contradictions.inc();
        }
        let frame = match serde_json::to_string(&value) {
            Ok(data) => sse::replace_data(frame, &data),
            Err(_) => frame.clone(),
        };
        (frame, contradiction)
    }

    async fn send(&self, frame: Bytes) -> Result<(), Closed> {
        self.tx.send(Ok(frame)).await.map_err(|_| Closed)
    }
}

/// A held frame in an allocation of its own. The framer cuts frames out of its read buffer
/// without copying, so a frame kept aside would keep that whole buffer (kilobytes, shared with
/// the frames around it) alive for as long as it is held: with 10,000 claims held, most of
/// taskgate's memory. Passed frames are sent at once and need no copy.
fn detach(frame: &Bytes) -> Bytes {
    Bytes::copy_from_slice(frame)
}

/// The verdict a claim is released with: the first child that did not complete, else the last.
fn worst(decided: &[(String, Arc<Decision>)]) -> (String, Verdict) {
    decided
        .iter()
        .find(|(_, d)| !matches!(d.verdict, Verdict::Completed { .. }))
        .or_else(|| decided.last())
        .map(|(child, d)| (child.clone(), d.verdict.clone()))
        .unwrap_or_else(|| {
            (
                String::new(),
                Verdict::Unknown {
                    reason: "no decision".to_owned(),
                },
            )
        })
}
