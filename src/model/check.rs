//! The decision for one model request: which newest tool results and user texts claim a child is
//! done, whether the runtime confirms each, and the truthful text for those it does not.
//!
//! Recognition is [`claims::tool_result`]'s and [`claims::message_text`]'s (the one place that
//! knows claim formats); linking `bg_…` ids goes through [`claims::launches`] on the
//! conversation's tool results.

use std::time::{Duration, Instant as StdInstant};

use futures_util::future::join_all;
use serde_json::Value;
use tokio::time::Instant;

use super::format::{self, Format, Slot, TextSlot};
use super::truth::{Finding, Truth};
use crate::claims::{self, Claim, ClaimTools, Claimed, Links};
use crate::oracle::{SessionRef, Verdict};

/// Where a claim was found, and so how it is corrected.
enum Place {
    /// A tool result: replaced by the truth unless it was true when the model's request came.
    Result(Slot),
    /// A user text (an injected result, a plugin wake): it carries no result of its own, so it
    /// is left as it is when the tree has finished by the time it is released, and otherwise
    /// gets the truth appended.
    Text(TextSlot),
}

/// The request body to forward instead of the original, when a claim had to be corrected.
/// `None`: no claim, or every claim is true; the original bytes go on untouched.
pub(super) async fn correct(
    truth: &dyn Truth,
    tools: &ClaimTools,
    format: Format,
    body: &[u8],
    max_hold: Duration,
) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let mut claimed: Vec<(String, Place, Claim)> = format::newest_results(format, &value)
        .into_iter()
        .filter_map(|r| {
            let claim = claims::tool_result(tools, &r.tool, &r.input, &r.text)?;
            Some((r.tool, Place::Result(r.slot), claim))
        })
        .collect();
    claimed.extend(
        format::newest_user_texts(format, &value)
            .into_iter()
            .filter_map(|t| {
                let claim = claims::message_text(&t.text)?;
                Some(("This message".to_owned(), Place::Text(t.slot), claim))
            }),
    );
    if claimed.is_empty() {
        return None;
    }
    // Oldest first, so a retried launch that gave a `bg_` id a new session wins. Launches the
    // runtime's own tool parts showed (the watcher's) explain ids the conversation does not (a
    // trimmed or compacted history); the conversation's own launches come first.
    let mut links = Links::default();
    for text in format::all_result_texts(format, &value) {
        links.learn_result(&text);
    }
    let started = StdInstant::now();
    let deadline = Instant::now() + max_hold;
    let checks = claimed.iter().map(|(who, _, claim)| {
        let children = links.resolve(&claim.children, |bg| truth.background_session(bg));
        async move {
            if children.is_empty() {
                tracing::warn!(%who, "claim names no child taskgate can link; passed unchecked");
            }
            let waits = children.iter().map(|id| async move {
                let child = SessionRef {
                    id: id.clone(),
                    directory: None,
                };
                (id.clone(), truth.settle(&child, deadline).await)
            });
            join_all(waits).await
        }
    });
    let outcomes = join_all(checks).await;
    let mut changed = false;
    for ((who, place, claim), findings) in claimed.iter().zip(outcomes) {
        let true_now = findings
            .iter()
            .all(|(_, f)| agrees(claim.claimed, &f.verdict));
        let true_then = findings.iter().all(|(_, f)| confirms(claim.claimed, f));
        let rewrite = match place {
            Place::Result(_) => !true_then,
            Place::Text(_) => !true_now,
        };
        for (child, f) in &findings {
            tracing::info!(
                %who,
                source = claim.source.name(),
                claimed = ?claim.claimed,
                %child,
                verdict = f.verdict.name(),
                timed_out = f.timed_out,
                held_ms = started.elapsed().as_millis() as u64,
                rewritten = rewrite,
                "model request: claim checked"
            );
        }
        if !rewrite {
            continue;
        }
        let text = truthful_text(who, claim.claimed, &findings);
        match *place {
            Place::Result(slot) => {
                let error = findings.iter().any(|(_, f)| {
                    matches!(f.verdict, Verdict::Failed { .. } | Verdict::Aborted { .. })
                });
                format::replace(&mut value, slot, &text, error);
            }
            Place::Text(slot) => format::append_note(format, &mut value, slot, &text),
        }
        changed = true;
    }
    if !changed {
        return None;
    }
    serde_json::to_vec(&value).ok()
}

/// Whether what the runtime found says what the claim said, and said it when the claim was
/// made. Running and unknown never do.
fn confirms(claimed: Claimed, finding: &Finding) -> bool {
    !finding.premature && agrees(claimed, &finding.verdict)
}

/// Whether `verdict` is what the claim says.
fn agrees(claimed: Claimed, verdict: &Verdict) -> bool {
    matches!(
        (claimed, verdict),
        (Claimed::Completed, Verdict::Completed { .. })
            | (
                Claimed::Error | Claimed::Cancelled,
                Verdict::Failed { .. } | Verdict::Aborted { .. }
            )
    )
}

/// The text the model reads instead of the false claim: one paragraph per child.
fn truthful_text(who: &str, claimed: Claimed, findings: &[(String, Finding)]) -> String {
    let said = match claimed {
        Claimed::Completed => "completed",
        Claimed::Error => "failed",
        Claimed::Cancelled => "cancelled",
    };
    findings
        .iter()
        .map(|(child, f)| paragraph(who, said, child, f))
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn paragraph(who: &str, said: &str, child: &str, f: &Finding) -> String {
    match &f.verdict {
        Verdict::Completed { text } => format!(
            "[taskgate] {who} reported this task as {said}. Checked with the runtime: child \
             session {child} has now finished, with its whole session tree. The child's final \
             answer:\n\n{}",
            text.as_deref().unwrap_or("(the child wrote no final text)")
        ),
        Verdict::Running { reason, .. } => {
            let mut when = Vec::new();
            if let Some(d) = f.started_ago {
                when.push(format!("started {} s ago", d.as_secs()));
            }
            if let Some(d) = f.last_activity_ago {
                when.push(format!("last activity {} s ago", d.as_secs()));
            }
            when.push(reason.clone());
            format!(
                "[taskgate] {who} reported this task as {said}, but it is NOT finished: child \
                 session {child} is still running ({}). Its result is not available yet; wait \
                 and check again before relying on it.",
                when.join(", ")
            )
        }
        Verdict::Aborted { session, message } => format!(
            "[taskgate] {who} reported this task as {said}, but child session {child} did not \
             finish its work: session {session} was aborted ({message})."
        ),
        Verdict::Failed { session, message } => format!(
            "[taskgate] {who} reported this task as {said}, but child session {child} failed: \
             session {session}: {message}."
        ),
        Verdict::Gone { session } => format!(
            "[taskgate] {who} reported this task as {said}, but taskgate could not confirm it \
             (the runtime does not know this session, {session}). Treat the result as \
             unverified."
        ),
        Verdict::Unknown { reason } => format!(
            "[taskgate] {who} reported this task as {said}, but taskgate could not confirm it \
             with the runtime ({reason}). Treat the result as unverified; child session {child} \
             may still be running."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(verdict: Verdict) -> Finding {
        Finding {
            verdict,
            premature: false,
            timed_out: false,
            started_ago: None,
            last_activity_ago: None,
        }
    }

    /// A truth that knows one `bg_` launch from the runtime's tool parts, whose child was
    /// aborted.
    struct KnowsLaunch;

    impl Truth for KnowsLaunch {
        fn settle<'a>(
            &'a self,
            child: &'a SessionRef,
            _deadline: Instant,
        ) -> futures_util::future::BoxFuture<'a, Finding> {
            let verdict = if child.id == "ses_child" {
                Verdict::Aborted {
                    session: "ses_child".into(),
                    message: "MessageAbortedError".into(),
                }
            } else {
                Verdict::Unknown {
                    reason: format!("asked about {}", child.id),
                }
            };
            Box::pin(async move { finding(verdict) })
        }

        fn background_session(&self, task_id: &str) -> Option<String> {
            (task_id == "bg_04817ab3").then(|| "ses_child".to_owned())
        }
    }

    #[tokio::test]
    async fn a_bg_id_the_conversation_does_not_explain_is_linked_through_the_runtime() {
        // The launch is not in this (compacted) conversation; only the claim is.
        let body = serde_json::json!({"model": "m", "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "background_output", "arguments": "{\"task_id\":\"bg_04817ab3\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1",
             "content": "# Task Status\n\n| Task ID | `bg_04817ab3` |\n| Status | **completed** |"}
        ]});
        let tools = ClaimTools::new(&["background_output".to_owned()]);
        let out = correct(
            &KnowsLaunch,
            &tools,
            Format::OpenAiChat,
            body.to_string().as_bytes(),
            Duration::from_secs(1),
        )
        .await
        .expect("the claim was checked against the linked child and corrected");
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ses_child"), "{text}");
        assert!(text.contains("abort"), "{text}");
    }

    #[test]
    fn only_matching_terminal_verdicts_confirm() {
        let done = finding(Verdict::Completed { text: None });
        let aborted = finding(Verdict::Aborted {
            session: "ses_c".into(),
            message: "MessageAbortedError".into(),
        });
        let running = finding(Verdict::Running {
            session: "ses_g".into(),
            reason: "ses_g is busy".into(),
        });
        assert!(confirms(Claimed::Completed, &done));
        assert!(!confirms(Claimed::Completed, &aborted));
        assert!(!confirms(Claimed::Completed, &running));
        assert!(confirms(Claimed::Error, &aborted));
        assert!(!confirms(Claimed::Error, &done));
        let late = Finding {
            premature: true,
            ..done
        };
        assert!(
            !confirms(Claimed::Completed, &late),
            "finished only after the claim"
        );
    }

    #[test]
    fn still_running_text_says_when_and_why() {
        let mut f = finding(Verdict::Running {
            session: "ses_g".into(),
            reason: "ses_g is busy".into(),
        });
        f.timed_out = true;
        f.started_ago = Some(Duration::from_secs(42));
        f.last_activity_ago = Some(Duration::from_secs(3));
        let text = truthful_text(
            "background_output",
            Claimed::Completed,
            &[("ses_c".into(), f)],
        );
        assert!(text.contains("NOT finished"), "{text}");
        assert!(text.contains("started 42 s ago"), "{text}");
        assert!(text.contains("last activity 3 s ago"), "{text}");
        assert!(text.contains("ses_g is busy"), "{text}");
    }
}
