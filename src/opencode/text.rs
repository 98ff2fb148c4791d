//! The runtime's text formats inside tool outputs and messages: `<task …>` reports (every
//! era), `key: value` lines, oh-my-opencode launch results.

/// One `<task id="…" state="…">` opening tag (OpenCode 1.18 task output and injected results).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskTag {
    pub id: String,
    pub state: String,
}

/// Every task report in `text`, in order: each `<task id="…" state="…">` opening tag (1.17 and
/// later; attribute order is free), then the 1.15 line form `task_id: ses_… (…)` with a
/// `state: …` line (launch results and injected results of that era alike).
pub fn task_tags(text: &str) -> Vec<TaskTag> {
    let mut tags = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<task ") {
        let after = &rest[start + "<task ".len()..];
        let Some(end) = after.find('>') else { break };
        let attrs = &after[..end];
        if let (Some(id), Some(state)) = (attr(attrs, "id"), attr(attrs, "state")) {
            tags.push(TaskTag { id, state });
        }
        rest = &after[end..];
    }
    let line = |key: &str| line_value(text, key).and_then(|v| v.split_whitespace().next());
    if let (Some(id), Some(state)) = (line("task_id:"), line("state:")) {
        if id.starts_with("ses_") && !tags.iter().any(|t| t.id == id) {
            tags.push(TaskTag {
                id: id.to_owned(),
                state: state.to_owned(),
            });
        }
    }
    tags
}

fn attr(attrs: &str, name: &str) -> Option<String> {
    let needle = format!("{name}=\"");
    let mut search = attrs;
    loop {
        let at = search.find(&needle)?;
        // Reject a match inside a longer name (`xid="…"`).
        let boundary = at == 0 || search[..at].ends_with(char::is_whitespace);
        let value = &search[at + needle.len()..];
        if boundary {
            let end = value.find('"')?;
            return Some(value[..end].to_owned());
        }
        search = value;
    }
}

/// The value of the first `key value` line in `text` (`session_id: ses_…`, `| Status | x |`):
/// leading spaces and table pipes, and the value's backticks, trimmed; empty values skipped.
pub fn line_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let line = line.trim_start_matches(|c: char| c.is_whitespace() || c == '|');
        let value = line.strip_prefix(key)?;
        let value = value.trim().trim_end_matches('|').trim().trim_matches('`');
        (!value.is_empty()).then_some(value)
    })
}

/// What an oh-my-opencode launch result names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OmoLaunch {
    pub session_id: String,
    pub background_task_id: Option<String>,
}

/// Reads an oh-my-opencode background launch from a tool output: `Background task launched`
/// with a `<task_metadata>` block (`session_id:`, `background_task_id:`), or `call_omo_agent`'s
/// `Background agent task launched` with `Session ID:`/`Task ID:` lines.
///
/// The session id must be one (`ses_…`): a runtime too busy to start the child at once makes the
/// plugin write `Session ID: pending`, which names nothing to read.
pub fn omo_launch(output: &str) -> Option<OmoLaunch> {
    let line_value = |key: &str| line_value(output, key).map(str::to_owned);
    let session = |key: &str| line_value(key).filter(|id| id.starts_with("ses_"));
    if output.contains("Background task launched") {
        let session_id = session("session_id:")?;
        return Some(OmoLaunch {
            session_id,
            background_task_id: line_value("background_task_id:"),
        });
    }
    if output.contains("Background agent task launched") {
        let session_id = session("Session ID:")?;
        return Some(OmoLaunch {
            session_id,
            background_task_id: line_value("Task ID:"),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_tags_and_launches() {
        let tags = task_tags("x <task state=\"completed\" id=\"ses_1\">\n<task_result>r</task_result></task> <task id=\"ses_2\" state=\"error\">");
        assert_eq!(
            tags,
            vec![
                TaskTag {
                    id: "ses_1".into(),
                    state: "completed".into()
                },
                TaskTag {
                    id: "ses_2".into(),
                    state: "error".into()
                }
            ]
        );
        let omo = "Background task launched.\n\nBackground Task ID: bg_04817ab3\nStatus: pending\n<task_metadata>\nsession_id: ses_k\nbackground_task_id: bg_04817ab3\nsubagent: Sisyphus-Junior\n</task_metadata>";
        assert_eq!(
            omo_launch(omo),
            Some(OmoLaunch {
                session_id: "ses_k".into(),
                background_task_id: Some("bg_04817ab3".into())
            })
        );
        let agent = "Background agent task launched successfully.\n\nTask ID: bg_1\nSession ID: ses_g\nStatus: pending";
        assert_eq!(omo_launch(agent).unwrap().session_id, "ses_g");
        assert_eq!(omo_launch("Task Result\n\nSession ID: ses_x"), None);
        // Seen on a loaded machine: the child is queued, its session not made yet.
        let queued = "Background agent task launched successfully.\n\nTask ID: bg_2\nSession ID: pending\nStatus: pending";
        assert_eq!(omo_launch(queued), None, "`pending` is no session id");
    }
}
