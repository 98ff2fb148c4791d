//! The terminal rule (docs/terminal-rule.md, clauses 1–5) as one pure function over a
//! snapshot of a session tree. No I/O, no clock: the same snapshot always gives the same
//! verdict, so every clause is tested with plain data. Clause 6 (the settle window) needs time
//! and lives in the async layer (`Oracle::wait_terminal`). See docs/terminal-rule.md.

use std::collections::{BTreeMap, HashSet};

use crate::opencode::{task_tags, LaunchStyle, Message, Session, SessionStatus};

use super::Verdict;

/// One session as read from the runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSnapshot {
    pub info: Session,
    /// From `GET /session/status`; `None` = absent from the map (idle, or never started).
    pub status: Option<SessionStatus>,
    /// Seen `busy` at least once (an event or an earlier read).
    pub seen_busy: bool,
    /// A prompt was accepted for this session (through taskgate) and the runtime has not been
    /// seen starting it yet: the runtime shows such a session idle for a while (seconds, with
    /// plugins whose hooks run first).
    pub prompt_pending: bool,
    /// The whole history, oldest first.
    pub messages: Vec<Message>,
}

/// A tree as read at one moment: the root and every session reached from it (children by
/// `parentID`, and children named by task parts' `metadata.sessionId`).
#[derive(Debug, Clone, PartialEq)]
pub struct TreeSnapshot {
    pub root: String,
    pub sessions: BTreeMap<String, SessionSnapshot>,
}

/// The rule's answer for a tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    /// Some session launched background work: only such trees wait out the settle window.
    pub background: bool,
    /// Set when the tree is wholly at rest (no session busy or retrying in the status map, no
    /// prompt accepted and not started) and yet some clause is unmatched: the verdict it gets
    /// once it has rested for the liveness bound, and what was not matched.
    pub at_rest: Option<AtRest>,
    /// What moves when anything in the tree moves: the newest `time.created`/`time.completed`
    /// of any message (the runtime's clock), and the number of sessions and messages. While it
    /// stays the same, the tree has not moved.
    pub activity: Activity,
}

/// See [`Judgement::activity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Activity {
    pub newest: Option<i64>,
    pub count: usize,
}

/// A tree at rest that some clause still keeps running.
#[derive(Debug, Clone, PartialEq)]
pub struct AtRest {
    /// The verdict with the unmatched clauses set aside.
    pub verdict: Verdict,
    /// What was not matched, one reason per session (`background task ses_c not yet answered
    /// (rule 5)`, `ses_g has not started yet (rule 1)`).
    pub unmatched: Vec<String>,
}

/// How one session ended, when it did.
enum Outcome {
    Done,
    Failed(String),
    Aborted(String),
}

/// Why one session is not terminal.
enum NotDone {
    /// The runtime shows the session working: busy, retrying, or an unknown status in the
    /// status map, or a prompt taskgate saw accepted and the runtime has not started.
    Working(String),
    /// The session is idle, but a clause is unmatched: not started, a user message pending, a
    /// turn or tool call left open, a background launch not answered. Normally the runtime
    /// moves on within moments; if nothing moves for the liveness bound, nothing will.
    Resting(String),
}

/// Applies the terminal rule to `tree`.
///
/// Precedence: any session still running makes the tree running (the deepest such session is
/// named, since that is the one everybody else waits on); else any aborted session makes it
/// aborted, else any failed one failed; else it is completed with the root's final text.
pub fn judge(tree: &TreeSnapshot) -> Judgement {
    let Some(root) = tree.sessions.get(&tree.root) else {
        return Judgement {
            verdict: Verdict::Unknown {
                reason: format!("{} was not read", tree.root),
            },
            background: false,
            at_rest: None,
            activity: Activity::default(),
        };
    };
    // Breadth-first from the root, so depth is known and a cycle cannot loop.
    let mut order: Vec<(&SessionSnapshot, usize)> = vec![(root, 0)];
    let mut seen: HashSet<&str> = HashSet::from([tree.root.as_str()]);
    let mut next = 0;
    while next < order.len() {
        let (s, depth) = order[next];
        next += 1;
        for child in children(tree, s) {
            if let Some(c) = tree.sessions.get(&child) {
                if seen.insert(c.info.id.as_str()) {
                    order.push((c, depth + 1));
                }
            }
        }
    }
    let background = order
        .iter()
        .any(|(s, _)| launches(&s.messages).next().is_some());
    let messages = order.iter().flat_map(|(s, _)| s.messages.iter());
    let activity = Activity {
        newest: messages
            .clone()
            .flat_map(|m| [m.info.time.created, m.info.time.completed])
            .flatten()
            .max(),
        count: order.len() + messages.count(),
    };
    let mut working: Option<(usize, String, String)> = None;
    let mut resting: Option<(usize, String, String)> = None;
    let mut unmatched = Vec::new();
    let mut aborted = None;
    let mut failed = None;
    let deepest = |slot: &mut Option<(usize, String, String)>, depth: usize, id: &str, why| {
        if slot.as_ref().is_none_or(|(d, _, _)| depth > *d) {
            *slot = Some((depth, id.to_owned(), why));
        }
    };
    for (s, depth) in &order {
        let outcome = match session_state(tree, s) {
            Err(NotDone::Working(reason)) => {
                deepest(&mut working, *depth, &s.info.id, reason);
                continue;
            }
            Err(NotDone::Resting(reason)) => {
                deepest(&mut resting, *depth, &s.info.id, reason.clone());
                unmatched.push(reason);
                // Set aside, the session ended as its last message says.
                outcome_of(s)
            }
            Ok(outcome) => outcome,
        };
        match outcome {
            Outcome::Aborted(m) if aborted.is_none() => aborted = Some((s.info.id.clone(), m)),
            Outcome::Failed(m) if failed.is_none() => failed = Some((s.info.id.clone(), m)),
            _ => {}
        }
    }
    let settled = if let Some((session, message)) = aborted {
        Verdict::Aborted { session, message }
    } else if let Some((session, message)) = failed {
        Verdict::Failed { session, message }
    } else {
        Verdict::Completed {
            text: final_text(&root.messages),
        }
    };
    let (verdict, at_rest) = match (working, resting) {
        (Some((_, session, reason)), _) => (Verdict::Running { session, reason }, None),
        (None, Some((_, session, reason))) => (
            Verdict::Running { session, reason },
            Some(AtRest {
                verdict: settled,
                unmatched,
            }),
        ),
        (None, None) => (settled, None),
    };
    Judgement {
        verdict,
        background,
        at_rest,
        activity,
    }
}

/// Direct children of `s`: sessions whose `parentID` is `s` (rule 4), and the sessions its task
/// parts name (`metadata.sessionId`, background launches), which may not carry a `parentID`.
fn children(tree: &TreeSnapshot, s: &SessionSnapshot) -> Vec<String> {
    let mut ids: Vec<String> = tree
        .sessions
        .values()
        .filter(|c| c.info.parent_id.as_deref() == Some(s.info.id.as_str()))
        .map(|c| c.info.id.clone())
        .collect();
    ids.extend(named_children(&s.messages));
    ids
}

/// The child sessions a history names: every task part's `metadata.sessionId` and every
/// background launch's child. The async layer reads these too, since a child is not always
/// listed by `/session/:id/children` (another directory, or a plugin-made session).
pub fn named_children(messages: &[Message]) -> Vec<String> {
    let mut ids: Vec<String> = messages
        .iter()
        .flat_map(|m| m.parts.iter().filter_map(|p| p.as_tool()))
        .filter_map(|t| t.child_session_id().map(str::to_owned))
        .collect();
    ids.extend(launches(messages).map(|(_, l)| l.child));
    ids.sort();
    ids.dedup();
    ids
}

/// `(message index, launch)` for every background launch of `s`.
fn launches(
    messages: &[Message],
) -> impl Iterator<Item = (usize, crate::opencode::BackgroundLaunch)> + '_ {
    messages.iter().enumerate().flat_map(|(i, m)| {
        m.parts
            .iter()
            .filter_map(|p| p.as_tool())
            .filter_map(move |t| t.background_launch().map(|l| (i, l)))
    })
}

/// Rules 1, 2, 3 and 5 for `s` alone (rule 4 is the traversal in [`judge`]). `Err` names the
/// clause that keeps `s` running.
fn session_state(tree: &TreeSnapshot, s: &SessionSnapshot) -> Result<Outcome, NotDone> {
    let id = &s.info.id;
    let working = |why: String| Err(NotDone::Working(why));
    let resting = |why: String| Err(NotDone::Resting(why));
    // Rule 1: not busy, and started.
    if let Some(status) = s.status.as_ref().filter(|st| !st.is_idle()) {
        return working(match status {
            SessionStatus::Busy => format!("{id} is busy (rule 1)"),
            SessionStatus::Retry { .. } => format!("{id} is retrying (rule 1)"),
            other => format!("{id} has status {} (rule 1)", other.name()),
        });
    }
    if s.prompt_pending {
        return working(format!(
            "{id} has an accepted prompt the runtime has not started yet (rule 1)"
        ));
    }
    let answered_once = s.messages.iter().any(|m| m.info.is_assistant());
    if !s.seen_busy && !answered_once {
        return resting(format!("{id} has not started yet (rule 1)"));
    }
    // Rule 2: the last message is an assistant message that ended the turn.
    let Some(last) = s.messages.last() else {
        return resting(format!("{id} has no messages yet (rule 2)"));
    };
    if last.info.is_user() {
        return resting(format!("{id} has a user message pending (rule 2)"));
    }
    if !last.info.ends_turn() {
        return resting(format!("{id} has not finished its turn (rule 2)"));
    }
    // Rule 3: no tool call still open.
    for m in &s.messages {
        if let Some(t) = m
            .parts
            .iter()
            .filter_map(|p| p.as_tool())
            .find(|t| t.is_open())
        {
            return resting(format!("{id} has tool call {} still open (rule 3)", t.tool));
        }
    }
    // Rule 5: every background launch answered.
    for (at, launch) in launches(&s.messages) {
        let answered = match &launch.style {
            LaunchStyle::Native => native_answered(s, at, &launch.child),
            // The plugin neither reports a failed child nor wakes its parent for it (seen with
            // the real plugin): the failure is its answer.
            LaunchStyle::OhMyOpencode { .. } => {
                omo_answered(tree, s, at, &launch.child) || child_failed(tree, &launch.child)
            }
        } || child_aborted(tree, &launch.child);
        if !answered {
            return resting(format!(
                "background task {} not yet answered (rule 5)",
                launch.child
            ));
        }
    }
    Ok(outcome_of(s))
}

/// How a session that ended its turn ended, from its last message.
fn outcome_of(s: &SessionSnapshot) -> Outcome {
    let Some(last) = s.messages.last() else {
        return Outcome::Done;
    };
    let info = &last.info;
    match &info.error {
        Some(e) if info.is_aborted() => Outcome::Aborted(e.message()),
        Some(e) => Outcome::Failed(format!("{}: {}", e.name, e.message())),
        None if matches!(info.finish.as_deref(), Some("error" | "length"))
            && final_text(std::slice::from_ref(last)).is_none() =>
        {
            Outcome::Failed(format!(
                "finished with {:?} and no text",
                info.finish.as_deref().unwrap_or_default()
            ))
        }
        None => Outcome::Done,
    }
}

/// Native launch: a later user message carries `<task id="child" state="completed|error">` (or
/// the 1.15-era `task_id:`/`state:` lines, which [`task_tags`] reads too; without them every
/// 1.15 background launch stays "not yet answered", found by `tests/real_taskgate.rs` against
/// 1.15.0) and an assistant message after it ended the turn.
fn native_answered(s: &SessionSnapshot, launched_at: usize, child: &str) -> bool {
    let injected = s.messages[launched_at + 1..].iter().position(|m| {
        m.info.is_user()
            && m.parts.iter().filter_map(|p| p.as_text()).any(|t| {
                task_tags(&t.text).iter().any(|tag| {
                    tag.id == child && matches!(tag.state.as_str(), "completed" | "error")
                })
            })
    });
    injected.is_some_and(|i| {
        s.messages[launched_at + 1 + i + 1..]
            .iter()
            .any(|m| m.info.ends_turn())
    })
}

/// oh-my-opencode launch: the plugin injects nothing the rule can match reliably. It judges a
/// child done on the child's *first* idle (even while a grandchild works) and wakes the parent
/// once, about 10 s later, never again. So the launch counts as answered when the child has
/// ended a turn and the parent ended a turn that started at or after the child's *first* turn
/// ended. Whether the child's *tree* is done is rule 4's job; a parent that is never woken (the
/// plugin's `background-notification` hook off) is the liveness bound's job.
fn omo_answered(tree: &TreeSnapshot, s: &SessionSnapshot, launched_at: usize, child: &str) -> bool {
    let Some(child) = tree.sessions.get(child) else {
        return false;
    };
    if !child.messages.last().is_some_and(|m| m.info.ends_turn()) {
        return false;
    }
    let Some(first_end) = child
        .messages
        .iter()
        .find(|m| m.info.ends_turn())
        .and_then(|m| m.info.time.completed)
    else {
        return false;
    };
    s.messages[launched_at + 1..].iter().any(|m| {
        m.info.ends_turn()
            && m.info
                .time
                .created
                .is_some_and(|created| created >= first_end)
    })
}

/// The child's last message ended with an error.
fn child_failed(tree: &TreeSnapshot, child: &str) -> bool {
    tree.sessions
        .get(child)
        .and_then(|c| c.messages.last())
        .is_some_and(|m| m.info.is_assistant() && m.info.error.is_some())
}

/// A cancelled child injects nothing into its parent: its launch can never be answered, and
/// waiting for it would hold the tree forever.
fn child_aborted(tree: &TreeSnapshot, child: &str) -> bool {
    tree.sessions
        .get(child)
        .and_then(|c| c.messages.last())
        .is_some_and(|m| m.info.is_aborted())
}

/// The last text part of the last assistant message.
pub fn final_text(messages: &[Message]) -> Option<String> {
    let last = messages.iter().rev().find(|m| m.info.is_assistant())?;
    last.parts
        .iter()
        .rev()
        .filter_map(|p| p.as_text())
        .find(|t| !t.text.is_empty())
        .map(|t| t.text.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const ROOT: &str = "ses_root";
    const CHILD: &str = "ses_child";

    fn session(id: &str, parent: Option<&str>) -> Session {
        serde_json::from_value(json!({"id": id, "parentID": parent})).unwrap()
    }

    /// A message from compact JSON: role, finish, completed?, error, parts.
    fn msg(n: i64, role: &str, finish: Option<&str>, parts: Value) -> Message {
        let mut info = json!({"id": format!("msg_{n:03}"), "sessionID": "x", "role": role,
            "time": {"created": n}});
        if role == "assistant" {
            info["time"]["completed"] = json!(n);
        }
        if let Some(f) = finish {
            info["finish"] = json!(f);
        }
        serde_json::from_value(json!({"info": info, "parts": parts})).unwrap()
    }

    fn user(n: i64, text: &str) -> Message {
        msg(n, "user", None, json!([{"type": "text", "text": text}]))
    }

    fn answer(n: i64, text: &str) -> Message {
        msg(
            n,
            "assistant",
            Some("stop"),
            json!([{"type": "text", "text": text}]),
        )
    }

    fn tool(n: i64, status: &str, metadata: Value, output: &str) -> Message {
        msg(
            n,
            "assistant",
            Some("tool-calls"),
            json!([{"type": "tool", "tool": "task",
            "callID": "c", "state": {"status": status, "metadata": metadata, "output": output}}]),
        )
    }

    fn with_error(mut m: Message, name: &str) -> Message {
        m.info.error = Some(crate::opencode::MessageError {
            name: name.into(),
            data: json!({"message": "boom"}),
        });
        m
    }

    fn snap(
        id: &str,
        parent: Option<&str>,
        status: Option<&str>,
        messages: Vec<Message>,
    ) -> SessionSnapshot {
        SessionSnapshot {
            info: session(id, parent),
            status: status.map(|s| SessionStatus::from_value(&json!({"type": s}))),
            seen_busy: true,
            prompt_pending: false,
            messages,
        }
    }

    fn tree(sessions: Vec<SessionSnapshot>) -> TreeSnapshot {
        TreeSnapshot {
            root: ROOT.into(),
            sessions: sessions
                .into_iter()
                .map(|s| (s.info.id.clone(), s))
                .collect(),
        }
    }

    fn done_child() -> SessionSnapshot {
        snap(
            CHILD,
            Some(ROOT),
            None,
            vec![user(1, "work"), answer(2, "child done")],
        )
    }

    fn launch() -> Message {
        tool(
            2,
            "completed",
            json!({"sessionId": CHILD, "background": true}),
            "<task id=\"ses_child\" state=\"running\">",
        )
    }

    fn injected() -> Message {
        user(
            5,
            "<task id=\"ses_child\" state=\"completed\"><task_result>r</task_result></task>",
        )
    }

    /// Each case fails if the clause it names is removed from the rule.
    #[test]
    fn every_clause_has_a_case() {
        let cases: Vec<(&str, TreeSnapshot, &str, &str)> = vec![
            ("rule 1: busy although the last message looks final",
                tree(vec![snap(ROOT, None, Some("busy"), vec![user(1, "go"), answer(2, "ok")])]),
                "running", "ses_root is busy (rule 1)"),
            ("rule 1: retry and unknown statuses are not idle",
                tree(vec![snap(ROOT, None, Some("compacting"), vec![user(1, "go"), answer(2, "ok")])]),
                "running", "(rule 1)"),
            ("rule 1: absent and silent is not started",
                tree(vec![SessionSnapshot { seen_busy: false, ..snap(ROOT, None, None, vec![user(1, "go")]) }]),
                "running", "has not started yet (rule 1)"),
            ("rule 1: an accepted prompt the runtime has not started",
                tree(vec![SessionSnapshot { prompt_pending: true, ..snap(ROOT, None, None, vec![user(1, "go"), answer(2, "ok")]) }]),
                "running", "accepted prompt the runtime has not started yet (rule 1)"),
            ("rule 2: a user message last is a pending turn",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), answer(2, "ok"), user(3, "more")])]),
                "running", "user message pending (rule 2)"),
            ("rule 2: a tool-calls step is not the end of the turn",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), tool(2, "completed", json!({}), "x")])]),
                "running", "not finished its turn (rule 2)"),
            ("rule 2: a message still streaming",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), {
                    let mut m = answer(2, "partial"); m.info.time.completed = None; m }])]),
                "running", "(rule 2)"),
            ("rule 3: an open tool call",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), tool(2, "running", json!({}), ""), answer(3, "ok")])]),
                "running", "tool call task still open (rule 3)"),
            ("rule 4: a busy child by parentID",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), answer(2, "ok")]),
                          snap(CHILD, Some(ROOT), Some("busy"), vec![user(1, "w")])]),
                "running", "ses_child is busy (rule 1)"),
            ("rule 4: a child named only by metadata.sessionId",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), tool(2, "completed", json!({"sessionId": CHILD}), "x"), answer(3, "ok")]),
                          snap(CHILD, None, None, vec![user(1, "w")])]),
                "running", "ses_child has a user message pending (rule 2)"),
            ("rule 5: a background launch with no injected result",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), launch(), answer(3, "launched")]), done_child()]),
                "running", "background task ses_child not yet answered (rule 5)"),
            ("rule 5: injected result but the parent never answered it",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), launch(), answer(3, "launched"), injected(),
                    with_error(tool(6, "completed", json!({}), ""), "x").tap_finish(None)]), done_child()]),
                "running", "(rule 2)"),
            ("rule 5: answered",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), launch(), answer(3, "launched"), injected(), answer(6, "FINAL")]), done_child()]),
                "completed", "FINAL"),
            ("rule 5: answered in the 1.15 form (no tag)",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), launch(), answer(3, "launched"),
                    user(5, "Background task completed: job\ntask_id: ses_child\nstate: completed\n\n<task_result>r</task_result>"),
                    answer(6, "FINAL")]), done_child()]),
                "completed", "FINAL"),
            ("rule 5: a 1.15 report of another child does not answer this one",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), launch(), answer(3, "launched"),
                    user(5, "Background task completed: job\ntask_id: ses_other\nstate: completed\n"),
                    answer(6, "WAITING")]), done_child()]),
                "running", "background task ses_child not yet answered (rule 5)"),
            ("rule 5: oh-my-opencode launch, parent has not ended a turn since the child ended",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"),
                    tool(2, "completed", json!({}), "Background task launched.\n<task_metadata>\nsession_id: ses_child\nbackground_task_id: bg_1\n</task_metadata>"),
                    answer(3, "waiting")]),
                    snap(CHILD, None, None, vec![user(1, "w"), answer(4, "child done")])]),
                "running", "background task ses_child not yet answered (rule 5)"),
            ("rule 5: oh-my-opencode launch answered by a later turn",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"),
                    tool(2, "completed", json!({}), "Background task launched.\n<task_metadata>\nsession_id: ses_child\nbackground_task_id: bg_1\n</task_metadata>"),
                    answer(3, "waiting"), user(5, "[BACKGROUND TASK COMPLETED]"), answer(6, "got it")]),
                    snap(CHILD, None, None, vec![user(1, "w"), answer(4, "child done")])]),
                "completed", "got it"),
            ("rule 5: a failed oh-my-opencode child answers its launch (the plugin reports nothing)",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), omo_launch(), answer(3, "launched")]),
                    snap(CHILD, None, None, vec![user(1, "w"), with_error(answer(4, ""), "APIError")])]),
                "failed", "ses_child"),
            ("aborted child: its launch is answered by the abort, the tree is aborted",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), launch(), answer(3, "launched")]),
                    snap(CHILD, Some(ROOT), None, vec![user(1, "w"), with_error(answer(2, ""), "MessageAbortedError")])]),
                "aborted", "ses_child"),
            ("failed: assistant error",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), with_error(answer(2, ""), "APIError")])]),
                "failed", "ses_root"),
            ("failed: finish length with no text",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), msg(2, "assistant", Some("length"), json!([]))])]),
                "failed", "ses_root"),
            ("running beats aborted",
                tree(vec![snap(ROOT, None, Some("busy"), vec![user(1, "go")]),
                    snap(CHILD, Some(ROOT), None, vec![user(1, "w"), with_error(answer(2, ""), "MessageAbortedError")])]),
                "running", "ses_root is busy"),
            ("plain completed",
                tree(vec![snap(ROOT, None, None, vec![user(1, "go"), answer(2, "hello")])]),
                "completed", "hello"),
        ];
        for (name, t, verdict, needle) in cases {
            let j = judge(&t);
            assert_eq!(j.verdict.name(), verdict, "{name}: {:?}", j.verdict);
            let shown = format!("{:?}", j.verdict);
            assert!(shown.contains(needle), "{name}: {shown} lacks {needle:?}");
        }
    }

    #[test]
    fn background_is_reported_and_missing_root_is_unknown() {
        let t = tree(vec![
            snap(
                ROOT,
                None,
                None,
                vec![user(1, "go"), launch(), answer(3, "l")],
            ),
            done_child(),
        ]);
        assert!(judge(&t).background);
        let plain = tree(vec![snap(
            ROOT,
            None,
            None,
            vec![user(1, "go"), answer(2, "ok")],
        )]);
        assert!(!judge(&plain).background);
        let empty = TreeSnapshot {
            root: ROOT.into(),
            sessions: BTreeMap::new(),
        };
        assert_eq!(judge(&empty).verdict.name(), "unknown");
    }

    fn omo_launch() -> Message {
        tool(
            2,
            "completed",
            json!({}),
            "Background task launched.\n<task_metadata>\nsession_id: ses_child\nbackground_task_id: bg_1\n</task_metadata>",
        )
    }

    /// oh-my-opencode wakes the parent once, on the child's first idle; the child's real end
    /// (after its own background grandchild) comes later and wakes nobody. The parent's wake
    /// turn answers the launch, or the tree is never terminal.
    #[test]
    fn omo_wake_before_the_child_really_ends_does_not_hang() {
        let t = tree(vec![
            snap(
                ROOT,
                None,
                None,
                vec![
                    user(1, "go"),
                    omo_launch(),
                    answer(3, "launched"),
                    user(5, "[BACKGROUND TASK COMPLETED]"),
                    answer(6, "root read the partial"),
                ],
            ),
            snap(
                CHILD,
                None,
                None,
                vec![
                    user(1, "w"),
                    answer(4, "partial"),
                    user(8, "[BACKGROUND TASK COMPLETED]"),
                    answer(9, "child final"),
                ],
            ),
        ]);
        let j = judge(&t);
        assert_eq!(
            j.verdict,
            Verdict::Completed {
                text: Some("root read the partial".into())
            }
        );
        assert_eq!(j.at_rest, None);
        assert_eq!(j.activity.newest, Some(9));
    }

    /// Clause 5 alone keeps a resting tree running; the judgement says so, with the verdict
    /// the tree gets once it has rested for the liveness bound.
    #[test]
    fn a_resting_tree_with_an_unanswered_launch_reports_what_was_not_matched() {
        let resting = tree(vec![
            snap(
                ROOT,
                None,
                None,
                vec![user(1, "go"), omo_launch(), answer(3, "launched")],
            ),
            snap(
                CHILD,
                None,
                None,
                vec![user(1, "w"), answer(4, "child done")],
            ),
        ]);
        let j = judge(&resting);
        assert_eq!(j.verdict.name(), "running");
        assert_eq!(
            j.at_rest,
            Some(AtRest {
                verdict: Verdict::Completed {
                    text: Some("launched".into())
                },
                unmatched: vec!["background task ses_child not yet answered (rule 5)".to_owned()],
            })
        );
        // A failed child is still failed once the tree has rested (a native launch here, whose
        // answer is the runtime's injection, never made).
        let failing = tree(vec![
            snap(
                ROOT,
                None,
                None,
                vec![user(1, "go"), launch(), answer(3, "launched")],
            ),
            snap(
                CHILD,
                Some(ROOT),
                None,
                vec![user(1, "w"), with_error(answer(4, ""), "APIError")],
            ),
        ]);
        assert_eq!(
            judge(&failing).at_rest.map(|r| r.verdict.name()),
            Some("failed")
        );
        // Anything working (here the child's open turn) means the tree is not at rest.
        let mut working = resting;
        working.sessions.insert(
            CHILD.into(),
            snap(CHILD, None, Some("busy"), vec![user(1, "w")]),
        );
        assert_eq!(judge(&working).at_rest, None);
    }

    trait TapFinish {
        fn tap_finish(self, finish: Option<&str>) -> Self;
    }

    impl TapFinish for Message {
        /// An assistant message with an unfinished turn (no finish, no error).
        fn tap_finish(mut self, finish: Option<&str>) -> Self {
            self.info.finish = finish.map(str::to_owned);
            self.info.error = None;
            self
        }
    }
}
