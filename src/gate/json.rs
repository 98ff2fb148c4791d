//! The JSON surfaces: the synchronous prompt, the status map and message history.
//!
//! Each reads the runtime's body (bounded by `proxy.inspect_limit_bytes`), and when it cannot
//! (too large, not JSON) passes it on unchanged: the gate may fail to improve a response, never
//! lose one.

use std::collections::HashMap;

use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::Gate;
use crate::claims::{self, render, Links};
use crate::holds::{HoldGuard, HoldKind};
use crate::opencode::ToolPart;
use crate::oracle::{Decision, OracleError, SessionRef, Verdict};
use crate::proxy::body::read_limited;

/// `POST /session/:id/message`: the runtime answers when the session's agent loop ends, which
/// for a background launch is long before the child (and the parent's follow-up turn) is done.
/// The answer is held until the tree is terminal; if the tree had background work, the body is
/// then the session's *latest* assistant message, so a client that prints the reply prints the
/// last word, not the first.
///
/// Every release that is not a terminal tree (shutdown, `max_hold`, the session gone, the
/// runtime unreadable) is an explicit JSON error ([`HoldError`]), never the premature reply.
/// A hold that outlasts `gate.prompt_commit_after` (counted from the request) commits to the
/// runtime's status line and keeps the body alive with whitespace, since Node's fetch gives up
/// after 300 s without headers; a release that is not a terminal tree then cuts the body off,
/// so no complete JSON document arrives (docs/claims.md).
pub(super) async fn prompt(
    gate: &Gate,
    session: SessionRef,
    received: Instant,
    response: Response<Body>,
) -> Response<Body> {
    let inner = &gate.inner;
    // A prompt reply waits for a turn rather than pass unheld; the turn ends once it is read,
    // since the reply is held as bytes, never parsed.
    let (mut parts, original, unread) = match read_whole(gate, response, Turn::Wait).await {
        Ok(read) => (read.parts, read.body, false),
        // Larger than `proxy.inspect_limit_bytes` (or broken mid-body): the body is dropped,
        // never passed on unheld. The hold needs only the runtime's word that the tree ended;
        // the reply is then the latest message as the oracle reads it.
        Err(passthrough) => (passthrough.into_parts().0, Bytes::new(), true),
    };
    inner.oracle.prompt_answered(&session);
    let guard = inner.holds.open(HoldKind::Prompt, &session.id, &session.id);
    // A compressed reply is never sent back as it came: once committed, the headers that said
    // so are gone; the latest message, read as plain JSON, replaces it. So does one not kept.
    let replace_reply = unread
        || parts
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|e| e.as_bytes() != b"identity");
    let mut wait = Box::pin(release_prompt(
        gate.clone(),
        session,
        guard,
        original.clone(),
        replace_reply,
    ));
    let commit_at = received + inner.config.prompt_commit_after.0;
    tokio::select! {
        released = &mut wait => {
            return match released {
                Ok(reply) => {
                    mark(&mut parts.headers, reply.verdict, reply.held_ms);
                    if reply.body != original {
                        // The latest message, as the oracle read it: plain JSON.
                        parts.headers.remove(header::CONTENT_LENGTH);
                        parts.headers.remove(header::CONTENT_ENCODING);
                    }
                    Response::from_parts(parts, Body::from(reply.body))
                }
                Err(error) => error.into_response(),
            };
        }
        _ = tokio::time::sleep_until(commit_at) => {}
    }
    // Committed: the status line and headers go now; the body follows when the tree is done.
    let keepalive = inner.config.prompt_keepalive.0;
    let (tx, rx) = mpsc::channel::<Result<Bytes, HoldError>>(2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
        loop {
            tokio::select! {
                released = &mut wait => {
                    // An error item makes hyper abort the body: the client's read fails.
                    let _ = tx.send(released.map(|reply| reply.body)).await;
                    break;
                }
                _ = tick.tick() => {
                    // JSON allows whitespace before the value.
                    if tx.send(Ok(Bytes::from_static(b" "))).await.is_err() {
                        break;
                    }
                }
                // The client went away: dropping the wait drops the hold.
                _ = tx.closed() => break,
            }
        }
    });
    parts.headers.remove(header::CONTENT_LENGTH);
    // The body that follows may be the latest message as the oracle read it: plain JSON.
    parts.headers.remove(header::CONTENT_ENCODING);
    parts
        .headers
        .insert("x-taskgate-verdict", HeaderValue::from_static("pending"));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// A held prompt released on a terminal tree.
struct Reply {
    verdict: &'static str,
    held_ms: u64,
    body: Bytes,
}

/// Waits for the prompt's tree and makes the reply, or the error that replaces it.
async fn release_prompt(
    gate: Gate,
    session: SessionRef,
    guard: HoldGuard,
    original: Bytes,
    replace_reply: bool,
) -> Result<Reply, HoldError> {
    let inner = &gate.inner;
    let deadline = Instant::now() + inner.config.max_hold.0;
    let outcome = tokio::select! {
        outcome = inner.oracle.wait_terminal_seeing(&session, Some(deadline), |d| guard.update(d)) => outcome,
        _ = inner.shutdown.cancelled() => Err(OracleError::Cancelled),
    };
    let decision = match outcome {
        Ok(decision) => decision,
        Err(OracleError::Deadline(decision)) => {
            tracing::warn!(session = %session.id, "max_hold reached: the prompt's tree still runs; answering with an error");
            guard.release(&decision.verdict, false);
            return Err(HoldError::StillRunning {
                session: session.id,
                reason: render::reason(&decision.verdict),
            });
        }
        Err(OracleError::Cancelled) => {
            return Err(HoldError::ShuttingDown {
                session: session.id,
                reason: guard.reason(),
            });
        }
        Err(OracleError::Unverifiable(decision)) => {
            tracing::warn!(session = %session.id, reason = %render::reason(&decision.verdict), "cannot read the runtime: answering the held prompt with an error");
            guard.release(&decision.verdict, false);
            return Err(HoldError::Unverifiable {
                session: session.id,
                reason: render::reason(&decision.verdict),
            });
        }
    };
    guard.update(&decision);
    let held_ms = guard.release(&decision.verdict, false);
    if let Verdict::Gone { session } = decision.verdict {
        return Err(HoldError::Gone { session });
    }
    let verdict = decision.verdict.name();
    if !decision.background && !replace_reply {
        // Nothing happened after the reply was made: it already is the last word.
        return Ok(Reply {
            verdict,
            held_ms,
            body: original,
        });
    }
    let latest = inner
        .oracle
        .last_assistant_message(&session)
        .await
        .and_then(|latest| serde_json::to_vec(&latest).ok());
    let body = match latest {
        Some(latest) => Bytes::from(latest),
        // An empty 200 would read as a reply that said nothing.
        None if original.is_empty() => {
            return Err(HoldError::Unverifiable {
                session: session.id,
                reason: "the reply was too large to keep and the latest message could not be read"
                    .to_owned(),
            })
        }
        None => original,
    };
    Ok(Reply {
        verdict,
        held_ms,
        body,
    })
}

/// Why a held prompt is answered with an error instead of the runtime's reply: the reply was
/// premature and the tree could not be seen to end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HoldError {
    #[error("session {session}'s tree is still running after gate.max_hold: {reason}")]
    StillRunning { session: String, reason: String },
    #[error("taskgate is shutting down while session {session}'s tree still runs: {reason}")]
    ShuttingDown { session: String, reason: String },
    #[error("the runtime no longer knows session {session}")]
    Gone { session: String },
    #[error("taskgate cannot read session {session}'s tree from the runtime: {reason}")]
    Unverifiable { session: String, reason: String },
}

impl HoldError {
    fn kind(&self) -> &'static str {
        match self {
            HoldError::StillRunning { .. } => "tree_still_running",
            HoldError::ShuttingDown { .. } => "taskgate_shutting_down",
            HoldError::Gone { .. } => "session_gone",
            HoldError::Unverifiable { .. } => "tree_unverifiable",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            HoldError::StillRunning { .. } => StatusCode::GATEWAY_TIMEOUT,
            HoldError::ShuttingDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
            HoldError::Gone { .. } => StatusCode::GONE,
            HoldError::Unverifiable { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// `{"error":{"kind":…,"message":…}}`, the shape of every taskgate error.
    fn into_response(self) -> Response<Body> {
        let mut response = crate::proxy::error::json_response(
            self.status(),
            &serde_json::json!({"error": {"kind": self.kind(), "message": self.to_string()}}),
        );
        response
            .headers_mut()
            .insert("x-taskgate-verdict", HeaderValue::from_static("error"));
        response
    }
}

/// `GET /session/status`: the runtime lists only non-idle sessions, so a parent whose child is
/// still busy (or whose background result is not yet answered) looks finished. Such sessions
/// are added as `{"type":"busy"}`.
pub(super) async fn status(
    gate: &Gate,
    directory: Option<String>,
    response: Response<Body>,
) -> Response<Body> {
    let inner = &gate.inner;
    let Read {
        mut parts,
        body: original,
        turn: _turn,
    } = match read_whole(gate, response, Turn::OrPassThrough).await {
        Ok(read) => read,
        Err(passthrough) => return passthrough,
    };
    let Some(Value::Object(mut map)) = parse(&original).await else {
        gate.count_uninspected("not_json");
        return Response::from_parts(parts, Body::from(original));
    };
    let session_ref = |id: &str| SessionRef {
        id: id.to_owned(),
        directory: directory.clone(),
    };
    let mut busy_ancestors = Vec::new();
    for (id, status) in &map {
        let active = status.get("type").and_then(Value::as_str) != Some("idle");
        if active {
            let mut current = id.clone();
            // Walk up the parent links; depth is bounded to stay safe on a cyclic reply.
            for _ in 0..32 {
                match inner.oracle.parent(&session_ref(&current)).await {
                    Some(parent) => {
                        busy_ancestors.push(parent.clone());
                        current = parent;
                    }
                    None => break,
                }
            }
        }
    }
    let mut changed = false;
    for id in busy_ancestors {
        if !map.contains_key(&id) {
            map.insert(id, serde_json::json!({"type": "busy"}));
            changed = true;
        }
    }
    // Sessions the gate is holding something for may be idle with nothing busy below them
    // (a background result not yet injected): ask the oracle about each.
    // So may a session whose prompt the runtime accepted but has not started yet.
    let mut held: Vec<String> = inner
        .holds
        .snapshot()
        .into_iter()
        .map(|h| h.session)
        .collect();
    held.extend(inner.oracle.pending_prompts());
    // So may a parent whose tree rests with a launch not yet answered while nothing holds it
    // (no event stream open, or all cut): within the liveness bound it is not done.
    let bound =
        inner.oracle.rest_bound() + inner.config.settle_window.0 + inner.oracle.poll_interval();
    held.extend(inner.oracle.watch_state().recent_parents(bound));
    held.sort();
    held.dedup();
    for id in held {
        if map.contains_key(&id) {
            continue;
        }
        let decision = inner.oracle.decide(&session_ref(&id)).await;
        if !decision.verdict.is_terminal() {
            map.insert(id, serde_json::json!({"type": "busy"}));
            changed = true;
        }
    }
    if !changed {
        return Response::from_parts(parts, Body::from(original));
    }
    let large = original.len() > SMALL_BODY;
    drop(original);
    replace_body(&mut parts, Value::Object(map), large).await
}

/// `GET /session/:id/message[/:mid]`: history is rewritten, never held. A claim part whose child
/// is not terminal comes back `running`, its original state kept under
/// `state.metadata.taskgate.original`.
pub(super) async fn history(gate: &Gate, single: bool, response: Response<Body>) -> Response<Body> {
    let inner = &gate.inner;
    let Read {
        mut parts,
        body: original,
        turn: _turn,
    } = match read_whole(gate, response, Turn::OrPassThrough).await {
        Ok(read) => read,
        Err(passthrough) => return passthrough,
    };
    let Some(mut value) = parse(&original).await else {
        gate.count_uninspected("not_json");
        return Response::from_parts(parts, Body::from(original));
    };
    let messages: Vec<&mut Value> = if single {
        vec![&mut value]
    } else {
        match value.as_array_mut() {
            Some(list) => list.iter_mut().collect(),
            None => {
                gate.count_uninspected("not_json");
                return Response::from_parts(parts, Body::from(original));
            }
        }
    };
    // Launch results earlier in the history link `bg_…` ids to sessions.
    let mut links = Links::default();
    let mut verdicts: HashMap<String, Decision> = HashMap::new();
    let mut changed = false;
    for message in messages {
        let directory = message
            .pointer("/info/path/cwd")
            .or_else(|| message.pointer("/info/directory"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let Some(list) = message.get_mut("parts").and_then(Value::as_array_mut) else {
            continue;
        };
        for part in list {
            let Some(tool) = ToolPart::from_part(part) else {
                continue;
            };
            links.learn_part(&tool);
            let Some(claim) = claims::tool_part(&inner.tools, &tool) else {
                continue;
            };
            let children = gate.children_of(&claim, &links);
            let mut running: Option<(String, Decision)> = None;
            let mut ended_badly: Option<(String, Decision)> = None;
            for child in children {
                let decision = match verdicts.get(&child) {
                    Some(d) => d.clone(),
                    None => {
                        let d = inner
                            .oracle
                            .decide(&SessionRef {
                                id: child.clone(),
                                directory: directory.clone(),
                            })
                            .await;
                        verdicts.insert(child.clone(), d.clone());
                        d
                    }
                };
                if !decision.verdict.is_terminal() {
                    running = Some((child, decision));
                    break;
                }
                if ended_badly.is_none() && !matches!(decision.verdict, Verdict::Completed { .. }) {
                    ended_badly = Some((child, decision));
                }
            }
            if let Some((child, decision)) = running {
                render::relabel_running(part, &child, &decision.verdict);
                changed = true;
            } else if let Some((child, decision)) = ended_badly {
                // The event stream rewrites the same claim when it releases it; history says
                // the same thing.
                if render::annotate_part(
                    part,
                    &claim,
                    &decision.verdict,
                    0,
                    &child,
                    inner.config.rewrite_contradictions,
                ) {
                    changed = true;
                }
            }
        }
    }
    if !changed {
        return Response::from_parts(parts, Body::from(original));
    }
    let large = original.len() > SMALL_BODY;
    drop(original);
    replace_body(&mut parts, value, large).await
}

/// Sets `x-taskgate-verdict` and `x-taskgate-held-ms` on a released reply.
fn mark(headers: &mut http::HeaderMap, verdict: &'static str, held_ms: u64) {
    headers.insert("x-taskgate-verdict", HeaderValue::from_static(verdict));
    headers.insert("x-taskgate-held-ms", HeaderValue::from(held_ms));
}

async fn replace_body(
    parts: &mut http::response::Parts,
    value: Value,
    large: bool,
) -> Response<Body> {
    let write = move || serde_json::to_vec(&value).unwrap_or_default();
    let body = if large {
        tokio::task::spawn_blocking(write).await.unwrap_or_default()
    } else {
        write()
    };
    // Hyper derives the new length from the body; a stale one would cut the reply.
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::ETAG);
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = parts.status;
    *response.version_mut() = parts.version;
    *response.headers_mut() = std::mem::take(&mut parts.headers);
    response
}

/// A body up to this size is read and parsed on the spot, without a turn: most replies (status
/// maps, short histories) are this small, and parsing one takes well under a millisecond. A
/// larger one takes a turn (`proxy.inspect_concurrency`) and is parsed and written on the
/// blocking pool, so it neither stalls the async workers nor multiplies memory without bound.
const SMALL_BODY: usize = 256 * 1024;

/// An intercepted response read whole.
struct Read {
    parts: http::response::Parts,
    body: Bytes,
    /// The turn a large body took; held while it is parsed and rewritten.
    turn: Option<TurnGuard>,
}

/// A turn at inspecting a large body. When the last one out ends, the memory freed by the
/// parses is given back to the system: the allocator keeps it otherwise (1.6 GB kept after ten
/// 15 MiB histories, measured by `scripts/inspect-rss.sh`).
struct TurnGuard {
    permit: Option<OwnedSemaphorePermit>,
    turns: std::sync::Arc<tokio::sync::Semaphore>,
    all: usize,
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        drop(self.permit.take());
        if self.turns.available_permits() == self.all {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn_blocking(give_back_memory);
            }
        }
    }
}

/// Returns the allocator's free pages to the system. jemalloc (taskgate's allocator,
/// `src/main.rs`) would keep them in its arenas until its decay timers return them, which run
/// only when it is next used: an idle taskgate would keep the peak of the last burst.
#[cfg(not(target_env = "msvc"))]
fn give_back_memory() {
    // `arena.<i>.purge` for every arena: 4096 is jemalloc's `MALLCTL_ARENAS_ALL`.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: the name is NUL-terminated, and `arena.<i>.purge` reads and writes nothing, so
    // the old and new value pointers are null and the length zero, as jemalloc's manual asks.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(rc, "jemalloc did not purge its arenas");
    }
}

#[cfg(target_env = "msvc")]
fn give_back_memory() {}

/// What a large body does when every turn is taken.
enum Turn {
    /// Waits for one: a held prompt may not pass unheld.
    Wait,
    /// Passes through uninspected, counted as `kind="concurrency"`.
    OrPassThrough,
}

/// Reads an intercepted response whole, or hands it back unread (counted) when it is larger
/// than `proxy.inspect_limit_bytes`, or large while every turn is taken and `turn` allows.
async fn read_whole(
    gate: &Gate,
    response: Response<Body>,
    turn: Turn,
) -> Result<Read, Response<Body>> {
    let (parts, body) = response.into_parts();
    let limit = gate.inner.inspect_limit;
    let body = match read_limited(body, SMALL_BODY.min(limit)).await {
        Ok(body) => {
            return Ok(Read {
                parts,
                body,
                turn: None,
            })
        }
        Err(rest) if limit <= SMALL_BODY => {
            gate.count_uninspected("too_large");
            return Err(Response::from_parts(parts, rest));
        }
        Err(rest) => rest,
    };
    let turns = gate.inner.inspections.clone();
    let permit = match turn {
        // The semaphore is never closed: `None` cannot happen, and would only skip the bound.
        Turn::Wait => turns.clone().acquire_owned().await.ok(),
        Turn::OrPassThrough => match turns.clone().try_acquire_owned() {
            Ok(turn) => Some(turn),
            Err(_) => {
                gate.count_uninspected("concurrency");
                return Err(Response::from_parts(parts, body));
            }
        },
    };
    let turn = Some(TurnGuard {
        permit,
        turns,
        all: gate.inner.inspect_concurrency,
    });
    match read_limited(body, limit).await {
        Ok(body) => Ok(Read { parts, body, turn }),
        Err(passthrough) => {
            gate.count_uninspected("too_large");
            Err(Response::from_parts(parts, passthrough))
        }
    }
}

/// Parses a body read whole; a large one on the blocking pool.
async fn parse(body: &Bytes) -> Option<Value> {
    if body.len() <= SMALL_BODY {
        return serde_json::from_slice(body).ok();
    }
    let body = body.clone();
    tokio::task::spawn_blocking(move || serde_json::from_slice(&body).ok())
        .await
        .ok()
        .flatten()
}
