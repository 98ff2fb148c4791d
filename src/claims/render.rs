//! Rendering: a verdict in words, and the truth written onto a claim part the client face
//! releases or relabels (`metadata.taskgate`). One place, so that a hold row, a log line,
//! `taskgate wait`, `wrap --strict` and a rewritten part all say the same thing.

use serde_json::{json, Value};

use super::{Claim, Claimed};
use crate::oracle::Verdict;

/// A one-line human reason for a verdict.
pub fn reason(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Running { reason, .. } => reason.clone(),
        Verdict::Completed { .. } => "the whole tree is terminal".to_owned(),
        Verdict::Failed { session, message } => format!("{session} failed: {message}"),
        Verdict::Aborted { session, message } => format!("{session} was aborted: {message}"),
        Verdict::Gone { session } => format!("the runtime no longer knows {session}"),
        Verdict::Unknown { reason } => format!("runtime not readable: {reason}"),
    }
}

/// [`reason`] for people: without the terminal rule's clause number ("ses_x is busy"), which
/// only docs/terminal-rule.md explains. Hold rows, the live view and logs use it.
pub fn plain_reason(verdict: &Verdict) -> String {
    let reason = reason(verdict);
    match reason.rsplit_once(" (rule ") {
        Some((words, clause)) if clause.ends_with(')') => words.to_owned(),
        _ => reason,
    }
}

/// Marks a released claim part with `metadata.taskgate = {verdict, held_ms, child, reason}`.
/// When the verdict contradicts the claim (it said completed; the child failed or was aborted)
/// and `rewrite` is on, a tool part becomes an `error` naming the child and what happened, the
/// original state kept under `metadata.taskgate.original`. Returns whether it was a
/// contradiction.
pub fn annotate_part(
    part: &mut serde_json::Value,
    claim: &Claim,
    verdict: &crate::oracle::Verdict,
    held_ms: u64,
    child: &str,
    rewrite: bool,
) -> bool {
    let claimed_done = claim.claimed == Claimed::Completed;
    let contradiction = claimed_done
        && matches!(
            verdict,
            Verdict::Failed { .. } | Verdict::Aborted { .. } | Verdict::Gone { .. }
        );
    // Released without the child's tree seen to complete (max_hold, runtime unreadable): the
    // claim is not passed on as a success either.
    let unconfirmed = claimed_done && !matches!(verdict, Verdict::Completed { .. });
    let mut taskgate = taskgate_metadata(verdict, child, Some(held_ms));
    let is_tool = part.get("type").and_then(Value::as_str) == Some("tool");
    if is_tool {
        let Some(state) = part.get_mut("state").filter(|s| s.is_object()) else {
            return contradiction;
        };
        if unconfirmed && rewrite {
            taskgate["original"] = state.clone();
            let error = match verdict {
                Verdict::Running { reason, .. } => {
                    format!("taskgate: child {child} is still running: {reason}")
                }
                other => format!("taskgate: child {}", reason(other)),
            };
            state["status"] = json!("error");
            state["error"] = json!(error);
            if let Some(obj) = state.as_object_mut() {
                obj.remove("output");
            }
        }
        if !state.get("metadata").is_some_and(Value::is_object) {
            state["metadata"] = json!({});
        }
        state["metadata"]["taskgate"] = taskgate;
    } else if let Some(obj) = part.as_object_mut() {
        let metadata = obj.entry("metadata").or_insert_with(|| json!({}));
        if !metadata.is_object() {
            *metadata = json!({});
        }
        metadata["taskgate"] = taskgate;
    }
    contradiction
}

/// `metadata.taskgate` for a released or relabelled part: what the oracle said about `child`.
fn taskgate_metadata(verdict: &Verdict, child: &str, held_ms: Option<u64>) -> Value {
    let mut taskgate = json!({
        "verdict": verdict.name(),
        "reason": reason(verdict),
        "child": child,
    });
    if let Some(held_ms) = held_ms {
        taskgate["held_ms"] = json!(held_ms);
    }
    taskgate
}

/// Turns a completed/error tool part back into `running`, keeping what it said.
pub fn relabel_running(part: &mut Value, child: &str, verdict: &Verdict) {
    let Some(state) = part.get_mut("state") else {
        return;
    };
    let original = state.clone();
    let mut metadata = original
        .get("metadata")
        .cloned()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    let mut taskgate = taskgate_metadata(verdict, child, None);
    taskgate["original"] = original.clone();
    metadata["taskgate"] = taskgate;
    let mut running = json!({
        "status": "running",
        "input": original.get("input").cloned().unwrap_or_else(|| json!({})),
        "metadata": metadata,
        "time": {"start": original.pointer("/time/start").cloned().unwrap_or(Value::Null)},
    });
    if let Some(title) = original.get("title") {
        running["title"] = title.clone();
    }
    *state = running;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relabel_keeps_the_original_and_says_why() {
        let mut part = json!({"type":"tool","tool":"background_output","state":{"status":"completed",
            "input":{"task_id":"bg_1"},"output":"Task Result\n\nSession ID: ses_child\n","title":"t",
            "metadata":{"k":1},"time":{"start":5,"end":6}}});
        let verdict = Verdict::Running {
            session: "ses_grandchild".into(),
            reason: "ses_grandchild is busy".into(),
        };
        relabel_running(&mut part, "ses_child", &verdict);
        let state = &part["state"];
        assert_eq!(state["status"], "running");
        assert_eq!(state["time"]["start"], 5);
        assert_eq!(state["metadata"]["k"], 1);
        assert_eq!(
            state["metadata"]["taskgate"]["original"]["status"],
            "completed"
        );
        assert_eq!(
            state["metadata"]["taskgate"]["reason"],
            "ses_grandchild is busy"
        );
        assert!(state.get("output").is_none());
    }
}
