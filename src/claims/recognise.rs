//! Recognising claims: whether a tool result or a message text tells its reader "the child is
//! done", and which child it speaks of. Pure text and JSON work: no I/O, no verdicts.

use serde_json::Value;

use super::{ChildLink, Claim, ClaimTools, Claimed, Source};
use crate::opencode::{self, line_value, TaskTag, ToolPart, ToolStatus};

/// Recognises a tool's *result text* as a claim (what a model reads, and what a completed tool
/// part carries as `state.output`). `input` is the tool's arguments, used for links the output
/// leaves out (`TaskOutput`'s `task_id`).
pub fn tool_result(tools: &ClaimTools, tool: &str, input: &Value, output: &str) -> Option<Claim> {
    let canonical = tools.canonical(tool)?;
    let claim = match canonical {
        "task" => task_output(output).or_else(|| supervised(output)),
        "task_status" => task_status(output),
        "background_output" => background_output(output),
        "TaskOutput" => task_output_tags(output, input),
        // A configured name of no known format: any recognised text format still counts.
        _ => task_output(output)
            .or_else(|| task_status(output))
            .or_else(|| background_output(output))
            .or_else(|| task_output_tags(output, input)),
    };
    claim.filter(|c| !c.children.is_empty())
}

/// Recognises a tool *part* of the runtime (event streams, message history) as a claim.
///
/// Beyond [`tool_result`], a `task` part marked `completed` with `metadata.background: true` is
/// itself a claim: the part says the tool is done while its output says the child runs. Its
/// child is `metadata.sessionId` (camel-case, set while running).
pub fn tool_part(tools: &ClaimTools, part: &ToolPart) -> Option<Claim> {
    let status = part.state.status;
    if status != ToolStatus::Completed && status != ToolStatus::Error {
        return None;
    }
    let output = part
        .state
        .output
        .as_deref()
        .or(part.state.error.as_deref())
        .unwrap_or("");
    let meta_session = part.child_session_id().map(str::to_owned);
    let mut claim = tool_result(tools, &part.tool, &part.state.input, output);
    if claim.is_none() && tools.canonical(&part.tool) == Some("task") {
        // The part itself says done: a background launch, or a foreground child whose output
        // format is not recognised. Either way the child must be terminal for it to be true.
        let child = meta_session
            .clone()
            .or_else(|| first_task_tag(output).map(|t| t.id))?;
        claim = Some(Claim {
            source: Source::Task,
            claimed: if status == ToolStatus::Error {
                Claimed::Error
            } else {
                Claimed::Completed
            },
            children: vec![ChildLink::Session(child)],
        });
    }
    let mut claim = claim?;
    add_session(&mut claim, meta_session);
    Some(claim)
}

/// Recognises a message text as a claim: the runtime's injected result and oh-my-opencode's
/// wake-ups. Only user-role texts carry these.
pub fn message_text(text: &str) -> Option<Claim> {
    if let Some(tag) = first_task_tag(text) {
        if let Some(claimed) = claimed_word(&tag.state) {
            return Some(Claim {
                source: Source::Injection,
                claimed,
                children: vec![ChildLink::Session(tag.id)],
            });
        }
    }
    const WAKES: [&str; 3] = [
        "[BACKGROUND TASK COMPLETED]",
        "[ALL BACKGROUND TASKS COMPLETE]",
        "[BACKGROUND TASK RESULT READY]",
    ];
    if WAKES.iter().any(|w| text.contains(w)) {
        let mut children: Vec<ChildLink> = ids(text, "bg_")
            .into_iter()
            .map(ChildLink::Background)
            .collect();
        children.extend(ids(text, "ses_").into_iter().map(ChildLink::Session));
        return (!children.is_empty()).then_some(Claim {
            source: Source::Wake,
            claimed: Claimed::Completed,
            children,
        });
    }
    supervised(text)
}

// === formats ===

/// OpenCode `task` output: `<task id="ses_…" state="completed|error">` (1.18), or the older
/// `task_id: ses_…` + `<task_result>` form, which only appears once the child returned.
fn task_output(output: &str) -> Option<Claim> {
    if let Some(tag) = first_task_tag(output) {
        let claimed = claimed_word(&tag.state)?;
        return Some(Claim {
            source: Source::Task,
            claimed,
            children: vec![ChildLink::Session(tag.id)],
        });
    }
    if output.contains("<task_result>") {
        let id = line_value(output, "task_id:")
            .or_else(|| line_value(output, "session_id:"))
            .filter(|v| v.starts_with("ses_"))?;
        return Some(Claim {
            source: Source::Task,
            claimed: Claimed::Completed,
            children: vec![ChildLink::Session(id.to_owned())],
        });
    }
    None
}

/// OpenCode `task_status`: `task_id: ses_…` and `state: completed|error|cancelled`.
fn task_status(output: &str) -> Option<Claim> {
    let state = line_value(output, "state:")?;
    let claimed = claimed_word(state)?;
    let id = line_value(output, "task_id:")?;
    Some(Claim {
        source: Source::TaskStatus,
        claimed,
        children: vec![link(id)],
    })
}

/// oh-my-opencode `background_output`: a `Task Result` (completed), or a `# Task Status` table
/// whose status cell is `**error**`, `**cancelled**` or `**interrupt**`.
fn background_output(output: &str) -> Option<Claim> {
    let trimmed = output.trim_start();
    let claimed = if trimmed.starts_with("Task Result") {
        Claimed::Completed
    } else if trimmed.starts_with("# Task Status") {
        if trimmed.contains("**error**") {
            Claimed::Error
        } else if trimmed.contains("**cancelled**") || trimmed.contains("**interrupt**") {
            Claimed::Cancelled
        } else if trimmed.contains("**completed**") {
            Claimed::Completed
        } else {
            return None;
        }
    } else {
        return None;
    };
    let mut children: Vec<ChildLink> = ids(output, "ses_")
        .into_iter()
        .map(ChildLink::Session)
        .collect();
    if children.is_empty() {
        children = ids(output, "bg_")
            .into_iter()
            .map(ChildLink::Background)
            .collect();
    }
    Some(Claim {
        source: Source::BackgroundOutput,
        claimed,
        children,
    })
}

/// Claude-style `TaskOutput`: `<status>completed</status>` with `<task_id>` in the output or
/// `task_id` in the input.
fn task_output_tags(output: &str, input: &Value) -> Option<Claim> {
    let status = tag_value(output, "status")?;
    let claimed = claimed_word(status)?;
    let id = tag_value(output, "task_id")
        .map(str::to_owned)
        .or_else(|| {
            input
                .get("task_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })?;
    Some(Claim {
        source: Source::TaskOutput,
        claimed,
        children: vec![link(&id)],
    })
}

/// oh-my-opencode's forced background mode: `SUPERVISED TASK COMPLETED SUCCESSFULLY` with the
/// `<task_metadata>` block naming the child.
fn supervised(text: &str) -> Option<Claim> {
    if !text.contains("SUPERVISED TASK COMPLETED SUCCESSFULLY") {
        return None;
    }
    let id = line_value(text, "session_id:").filter(|v| v.starts_with("ses_"));
    let children = match id {
        Some(id) => vec![ChildLink::Session(id.to_owned())],
        None => ids(text, "bg_")
            .into_iter()
            .map(ChildLink::Background)
            .collect(),
    };
    (!children.is_empty()).then_some(Claim {
        source: Source::Supervised,
        claimed: Claimed::Completed,
        children,
    })
}

// === helpers ===

/// The first `<task id="…" state="…">` tag (the runtime's own format, parsed in [`opencode`]).
fn first_task_tag(text: &str) -> Option<TaskTag> {
    opencode::task_tags(text).into_iter().next()
}

fn add_session(claim: &mut Claim, session: Option<String>) {
    if let Some(s) = session {
        let link = ChildLink::Session(s);
        if !claim.children.contains(&link) {
            claim.children.push(link);
        }
    }
}

fn link(id: &str) -> ChildLink {
    if id.starts_with("bg_") {
        ChildLink::Background(id.to_owned())
    } else {
        ChildLink::Session(id.to_owned())
    }
}

fn claimed_word(word: &str) -> Option<Claimed> {
    match word.trim().trim_matches('*').to_ascii_lowercase().as_str() {
        "completed" | "complete" | "success" | "succeeded" | "done" => Some(Claimed::Completed),
        "error" | "failed" | "failure" => Some(Claimed::Error),
        "cancelled" | "canceled" | "interrupt" | "interrupted" | "aborted" => {
            Some(Claimed::Cancelled)
        }
        _ => None,
    }
}

/// The trimmed value after `key` on the first line that starts with it (after whitespace or
/// a table pipe).
fn tag_value<'a>(text: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&close)? + start;
    Some(text[start..end].trim())
}

/// Every distinct id with `prefix` (`ses_`, `bg_`) in `text`, in order of appearance.
pub fn ids(text: &str, prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let boundary = at == 0
            || !rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at + prefix.len()..];
        let len = tail
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(tail.len());
        if boundary && len >= 4 {
            let id = format!("{prefix}{}", &tail[..len]);
            if !out.contains(&id) {
                out.push(id);
            }
        }
        rest = &tail[len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> ClaimTools {
        ClaimTools::new(&crate::config::GateConfig::default().claim_tools)
    }

    const CHILD: &str = "ses_df4c7ab9bffecks0CL3iL16K45";

    fn typed(part: &Value) -> Option<ToolPart> {
        crate::opencode::Part::from_value(part.clone())
            .as_tool()
            .cloned()
    }

    #[test]
    fn background_task_part_completed_is_a_claim_on_its_child() {
        // The 1.18.33 part as recorded: completed at once, output says the child runs.
        let part = json!({"type":"tool","tool":"task","state":{"status":"completed",
            "input":{"background":true},
            "output":format!("<task id=\"{CHILD}\" state=\"running\">\n<summary>Background task started</summary>"),
            "metadata":{"sessionId":CHILD,"background":true}}});
        let claim = tool_part(&tools(), &typed(&part).unwrap()).unwrap();
        assert_eq!(claim.source, Source::Task);
        assert_eq!(claim.claimed, Claimed::Completed);
        assert_eq!(claim.children, vec![ChildLink::Session(CHILD.into())]);
    }

    #[test]
    fn running_task_part_is_not_a_claim() {
        let part = json!({"type":"tool","tool":"task","state":{"status":"running","metadata":{"sessionId":CHILD}}});
        assert_eq!(tool_part(&tools(), &typed(&part).unwrap()), None);
        let text = json!({"type":"text","text":"hello"});
        assert_eq!(typed(&text), None, "a text part is no tool part");
    }

    #[test]
    fn task_result_text_running_is_not_a_claim_for_the_model() {
        let out = format!("<task id=\"{CHILD}\" state=\"running\">…</task>");
        assert_eq!(tool_result(&tools(), "task", &Value::Null, &out), None);
        let done = format!("<task id=\"{CHILD}\" state=\"completed\">…</task>");
        assert_eq!(
            tool_result(&tools(), "task", &Value::Null, &done)
                .unwrap()
                .claimed,
            Claimed::Completed
        );
    }

    #[test]
    fn task_status_state_lines() {
        let out = format!("task_id: {CHILD}\nstate: completed\n\n<task_result>x</task_result>");
        let c = tool_result(&tools(), "task_status", &Value::Null, &out).unwrap();
        assert_eq!(
            (c.source, c.claimed),
            (Source::TaskStatus, Claimed::Completed)
        );
        let running = format!("task_id: {CHILD}\nstate: running\n");
        assert_eq!(
            tool_result(&tools(), "task_status", &Value::Null, &running),
            None
        );
    }

    #[test]
    fn background_output_task_result_and_status_tables() {
        let result = format!("Task Result\n\nTask ID: bg_04817ab3\nDescription: child task\nDuration: 3s\nSession ID: {CHILD}\n\n---\n\npartial");
        let c = tool_result(&tools(), "mcp_background_output", &Value::Null, &result).unwrap();
        assert_eq!(c.claimed, Claimed::Completed);
        assert_eq!(c.children, vec![ChildLink::Session(CHILD.into())]);
        let error = "# Task Status\n\n| Field | Value |\n|---|---|\n| Task ID | `bg_04817ab3` |\n| Status | **error** |\n";
        let c = tool_result(&tools(), "background_output", &Value::Null, error).unwrap();
        assert_eq!(c.claimed, Claimed::Error);
        assert_eq!(
            c.children,
            vec![ChildLink::Background("bg_04817ab3".into())]
        );
        let running = "# Task Status\n\n| Status | **running** |\n| Task ID | `bg_04817ab3` |";
        assert_eq!(
            tool_result(&tools(), "background_output", &Value::Null, running),
            None
        );
        assert_eq!(
            tool_result(
                &tools(),
                "background_output",
                &Value::Null,
                "(No new output since last check)"
            ),
            None
        );
    }

    #[test]
    fn task_output_tags_link_through_input() {
        let out = "<retrieval_status>success</retrieval_status>\n<status>completed</status>\n<output>x</output>";
        let c = tool_result(
            &tools(),
            "TaskOutput",
            &json!({"task_id":"bg_12345678","block":true}),
            out,
        )
        .unwrap();
        assert_eq!(
            c.children,
            vec![ChildLink::Background("bg_12345678".into())]
        );
        assert_eq!(c.source, Source::TaskOutput);
    }

    #[test]
    fn unconfigured_tools_are_ignored() {
        let only_task = ClaimTools::new(&["task".to_owned()]);
        let result = format!("Task Result\n\nSession ID: {CHILD}\n");
        assert_eq!(
            tool_result(&only_task, "background_output", &Value::Null, &result),
            None
        );
        assert_eq!(only_task.canonical("mcp_task"), Some("task"));
    }

    #[test]
    fn the_1_15_line_form_is_read_like_the_task_tag() {
        let launch = format!("task_id: {CHILD} (for polling this task with task_status)\nstate: running\n\n<task_result>\nstarted\n</task_result>");
        assert_eq!(tool_result(&tools(), "task", &Value::Null, &launch), None);
        let injected = format!("Background task completed: child job\ntask_id: {CHILD}\nstate: completed\n\n<task_result>x</task_result>");
        let c = message_text(&injected).unwrap();
        assert_eq!(
            (c.source, c.claimed),
            (Source::Injection, Claimed::Completed)
        );
        assert_eq!(c.children, vec![ChildLink::Session(CHILD.into())]);
    }

    #[test]
    fn injected_results_and_wakes() {
        let injected =
            format!("<task id=\"{CHILD}\" state=\"error\">\n<task_error>boom</task_error></task>");
        let c = message_text(&injected).unwrap();
        assert_eq!((c.source, c.claimed), (Source::Injection, Claimed::Error));
        let wake = "[ALL BACKGROUND TASKS COMPLETE]\n- `bg_04817ab3`: child task\n<!-- OMO_INTERNAL_INITIATOR -->";
        let c = message_text(wake).unwrap();
        assert_eq!(c.source, Source::Wake);
        assert_eq!(
            c.children,
            vec![ChildLink::Background("bg_04817ab3".into())]
        );
        assert_eq!(message_text("please continue"), None);
    }

    #[test]
    fn ids_respect_word_boundaries() {
        assert_eq!(
            ids("x ses_abcd1234, myses_zzzz9999 ses_abcd1234", "ses_"),
            vec!["ses_abcd1234"]
        );
    }
}
