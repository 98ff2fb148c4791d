//! The three request formats a model provider is spoken to in, reduced to what the model face
//! needs: the tool results and user texts of the newest turn (with the call that produced each
//! result), every tool result text of the conversation (for `bg_…` launch links), and replacing
//! a result's text or appending to a user text.
//!
//! Pure JSON work, no I/O: the HTTP plumbing lives in `forward.rs`.

use serde_json::{json, Value};

/// A provider API, chosen from the request path's last segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `POST …/chat/completions`: assistant `tool_calls`, then `role: "tool"` messages.
    OpenAiChat,
    /// `POST …/responses`: `function_call` items, then `function_call_output` items.
    OpenAiResponses,
    /// `POST …/messages`: assistant `tool_use` blocks, then user `tool_result` blocks.
    Anthropic,
}

impl Format {
    /// The format of a `POST` to `path`, if it is one the model face reads.
    pub fn of_path(path: &str) -> Option<Format> {
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Some(Format::OpenAiChat)
        } else if path.ends_with("/responses") {
            Some(Format::OpenAiResponses)
        } else if path.ends_with("/messages") {
            Some(Format::Anthropic)
        } else {
            None
        }
    }
}

/// Where a tool result sits in the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// `messages[i]` (chat `role: "tool"`).
    Message(usize),
    /// `input[i]` (responses `function_call_output`).
    Item(usize),
    /// `messages[i].content[j]` (Anthropic `tool_result`).
    Block(usize, usize),
}

/// Where a user-authored text sits: the runtime's injected `<task …>` results and plugin wakes
/// reach the model as user messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextSlot {
    /// `messages[i].content` (or `input[i].content`) is the string itself.
    Whole(usize),
    /// `…[i].content[j].text`.
    Part(usize, usize),
}

/// A user text of the newest turn.
#[derive(Debug, Clone, PartialEq)]
pub struct UserText {
    pub slot: TextSlot,
    pub text: String,
}

/// One tool result of the newest turn, with the call it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult {
    pub slot: Slot,
    /// The tool's name as the model called it (possibly `mcp_`-prefixed).
    pub tool: String,
    /// The call's arguments (`Null` when they are not JSON).
    pub input: Value,
    pub text: String,
}

/// The tool results after the model's last output: the ones the model is about to read.
pub fn newest_results(format: Format, body: &Value) -> Vec<ToolResult> {
    match format {
        Format::OpenAiChat => chat_newest(body),
        Format::OpenAiResponses => responses_newest(body),
        Format::Anthropic => anthropic_newest(body),
    }
}

/// The user texts after the model's last output (all of them when the model has not spoken).
pub fn newest_user_texts(format: Format, body: &Value) -> Vec<UserText> {
    let list = match format {
        Format::OpenAiResponses => items(body),
        Format::OpenAiChat | Format::Anthropic => messages(body),
    };
    let start = list
        .iter()
        .rposition(|m| is_model_output(format, m))
        .map_or(0, |last| last + 1);
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate().skip(start) {
        if role(m) != Some("user") {
            continue;
        }
        match m.get("content") {
            Some(Value::String(text)) => out.push(UserText {
                slot: TextSlot::Whole(i),
                text: text.clone(),
            }),
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    if !matches!(kind(part), Some("text" | "input_text")) {
                        continue;
                    }
                    if let Some(text) = part.get("text").and_then(Value::as_str) {
                        out.push(UserText {
                            slot: TextSlot::Part(i, j),
                            text: text.to_owned(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Appends `note` (after a blank line) to the user text at `slot`, keeping what it said.
pub fn append_note(format: Format, body: &mut Value, slot: TextSlot, note: &str) {
    let list = match format {
        Format::OpenAiResponses => "input",
        Format::OpenAiChat | Format::Anthropic => "messages",
    };
    let (pointer, field) = match slot {
        TextSlot::Whole(i) => (format!("/{list}/{i}"), "content"),
        TextSlot::Part(i, j) => (format!("/{list}/{i}/content/{j}"), "text"),
    };
    if let Some(Value::String(text)) = body.pointer_mut(&pointer).and_then(|t| t.get_mut(field)) {
        text.push_str("\n\n");
        text.push_str(note);
    }
}

/// Every tool result text of the conversation, oldest first (launch results name `bg_…` ids).
pub fn all_result_texts(format: Format, body: &Value) -> Vec<String> {
    match format {
        Format::OpenAiChat => messages(body)
            .iter()
            .filter(|m| role(m) == Some("tool"))
            .map(|m| content_text(m.get("content")))
            .collect(),
        Format::OpenAiResponses => items(body)
            .iter()
            .filter(|i| kind(i) == Some("function_call_output"))
            .map(|i| content_text(i.get("output")))
            .collect(),
        Format::Anthropic => messages(body)
            .iter()
            .flat_map(blocks)
            .filter(|b| kind(b) == Some("tool_result"))
            .map(|b| content_text(b.get("content")))
            .collect(),
    }
}

/// Replaces the text of the result at `slot` with `text`. `is_error` on an Anthropic result is
/// dropped unless `error`: the truth may be that the child did not fail.
pub fn replace(body: &mut Value, slot: Slot, text: &str, error: bool) {
    match slot {
        Slot::Message(i) => {
            if let Some(m) = body.pointer_mut(&format!("/messages/{i}")) {
                set_text(m, "content", text);
            }
        }
        Slot::Item(i) => {
            if let Some(item) = body.pointer_mut(&format!("/input/{i}")) {
                set_text(item, "output", text);
            }
        }
        Slot::Block(i, j) => {
            if let Some(block) = body.pointer_mut(&format!("/messages/{i}/content/{j}")) {
                set_text(block, "content", text);
                if let Some(obj) = block.as_object_mut() {
                    if error {
                        obj.insert("is_error".to_owned(), Value::Bool(true));
                    } else {
                        obj.remove("is_error");
                    }
                }
            }
        }
    }
}

// === OpenAI chat completions ===

fn chat_newest(body: &Value) -> Vec<ToolResult> {
    let messages = messages(body);
    let Some(last) = messages.iter().rposition(|m| role(m) == Some("assistant")) else {
        return Vec::new();
    };
    let calls = messages[last]
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate().skip(last + 1) {
        if role(m) != Some("tool") {
            continue;
        }
        let id = m.get("tool_call_id").and_then(Value::as_str);
        let Some(call) = calls
            .iter()
            .find(|c| id.is_some() && c.get("id").and_then(Value::as_str) == id)
        else {
            continue;
        };
        let Some(tool) = call.pointer("/function/name").and_then(Value::as_str) else {
            continue;
        };
        out.push(ToolResult {
            slot: Slot::Message(i),
            tool: tool.to_owned(),
            input: arguments(call.pointer("/function/arguments")),
            text: content_text(m.get("content")),
        });
    }
    out
}

// === OpenAI responses ===

fn responses_newest(body: &Value) -> Vec<ToolResult> {
    let items = items(body);
    let is_output = |i: &Value| kind(i) == Some("function_call_output");
    let Some(last) = items
        .iter()
        .rposition(|i| is_model_output(Format::OpenAiResponses, i))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (n, item) in items.iter().enumerate().skip(last + 1) {
        if !is_output(item) {
            continue;
        }
        let id = item.get("call_id").and_then(Value::as_str);
        let call = items[..n].iter().rev().find(|c| {
            kind(c) == Some("function_call")
                && id.is_some()
                && c.get("call_id").and_then(Value::as_str) == id
        });
        let Some(call) = call else { continue };
        let Some(tool) = call.get("name").and_then(Value::as_str) else {
            continue;
        };
        out.push(ToolResult {
            slot: Slot::Item(n),
            tool: tool.to_owned(),
            input: arguments(call.get("arguments")),
            text: content_text(item.get("output")),
        });
    }
    out
}

// === Anthropic messages ===

fn anthropic_newest(body: &Value) -> Vec<ToolResult> {
    let messages = messages(body);
    let Some(last) = messages.iter().rposition(|m| role(m) == Some("assistant")) else {
        return Vec::new();
    };
    let uses: Vec<&Value> = blocks(&messages[last])
        .iter()
        .filter(|b| kind(b) == Some("tool_use"))
        .collect();
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate().skip(last + 1) {
        if role(m) != Some("user") {
            continue;
        }
        for (j, block) in blocks(m).iter().enumerate() {
            if kind(block) != Some("tool_result") {
                continue;
            }
            let id = block.get("tool_use_id").and_then(Value::as_str);
            let Some(call) = uses
                .iter()
                .find(|u| id.is_some() && u.get("id").and_then(Value::as_str) == id)
            else {
                continue;
            };
            let Some(tool) = call.get("name").and_then(Value::as_str) else {
                continue;
            };
            out.push(ToolResult {
                slot: Slot::Block(i, j),
                tool: tool.to_owned(),
                input: call.get("input").cloned().unwrap_or(Value::Null),
                text: content_text(block.get("content")),
            });
        }
    }
    out
}

// === helpers ===

/// Something the model produced: an assistant message, or (responses) a call or reasoning item.
fn is_model_output(format: Format, v: &Value) -> bool {
    role(v) == Some("assistant")
        || (format == Format::OpenAiResponses
            && matches!(kind(v), Some("function_call" | "reasoning")))
}

fn messages(body: &Value) -> &[Value] {
    body.get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn items(body: &Value) -> &[Value] {
    body.get("input")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn blocks(message: &Value) -> &[Value] {
    message
        .get("content")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn role(v: &Value) -> Option<&str> {
    v.get("role").and_then(Value::as_str)
}

fn kind(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}

/// Tool arguments: a JSON object, or (OpenAI) a string holding one.
fn arguments(v: Option<&Value>) -> Value {
    match v {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::Null),
        Some(v) => v.clone(),
        None => Value::Null,
    }
}

/// A result's text: a plain string, or the text parts of a content array joined.
fn content_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Sets `field` to `text`, keeping the shape the client used (a string stays a string, a
/// content array becomes one text part).
fn set_text(target: &mut Value, field: &str, text: &str) {
    let Some(obj) = target.as_object_mut() else {
        return;
    };
    let value = match obj.get(field) {
        Some(Value::Array(parts)) => {
            let kind = parts
                .iter()
                .find_map(|p| p.get("type").and_then(Value::as_str))
                .unwrap_or("text");
            json!([{"type": kind, "text": text}])
        }
        _ => Value::String(text.to_owned()),
    };
    obj.insert(field.to_owned(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_paths() {
        assert_eq!(
            Format::of_path("/v1/chat/completions"),
            Some(Format::OpenAiChat)
        );
        assert_eq!(Format::of_path("/responses"), Some(Format::OpenAiResponses));
        assert_eq!(Format::of_path("/v1/messages/"), Some(Format::Anthropic));
        assert_eq!(Format::of_path("/v1/models"), None);
    }

    #[test]
    fn chat_newest_turn_only() {
        let body = json!({"messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [{"id": "c0", "type": "function",
                "function": {"name": "task", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c0", "content": "launched bg_1"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "background_output", "arguments": "{\"task_id\":\"bg_1\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "Task Result"}]},
        ]});
        let found = newest_results(Format::OpenAiChat, &body);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].tool, "background_output");
        assert_eq!(found[0].input["task_id"], "bg_1");
        assert_eq!(found[0].text, "Task Result");
        assert_eq!(
            all_result_texts(Format::OpenAiChat, &body),
            ["launched bg_1", "Task Result"]
        );
        let mut body = body;
        replace(&mut body, found[0].slot, "truth", false);
        assert_eq!(
            body["messages"][4]["content"],
            json!([{"type": "text", "text": "truth"}])
        );
        assert_eq!(body["messages"][2]["content"], "launched bg_1");
    }

    #[test]
    fn responses_calls_then_outputs() {
        let body = json!({"input": [
            {"role": "user", "content": "go"},
            {"type": "function_call", "call_id": "a", "name": "TaskOutput", "arguments": "{\"task_id\":\"bg_2\"}"},
            {"type": "function_call", "call_id": "b", "name": "read", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "a", "output": "<status>completed</status>"},
            {"type": "function_call_output", "call_id": "b", "output": "file"},
        ]});
        let found = newest_results(Format::OpenAiResponses, &body);
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].tool.as_str(), found[0].slot),
            ("TaskOutput", Slot::Item(3))
        );
        let mut body = body;
        replace(&mut body, Slot::Item(3), "truth", false);
        assert_eq!(body["input"][3]["output"], "truth");
    }

    #[test]
    fn anthropic_tool_results_in_the_last_user_message() {
        let body = json!({"messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "text", "text": "checking"},
                {"type": "tool_use", "id": "t1", "name": "task_status", "input": {"task_id": "ses_x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                "content": "state: completed", "is_error": true}]},
        ]});
        let found = newest_results(Format::Anthropic, &body);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].input["task_id"], "ses_x");
        let mut body = body;
        replace(&mut body, Slot::Block(2, 0), "truth", false);
        assert_eq!(body["messages"][2]["content"][0]["content"], "truth");
        assert!(body["messages"][2]["content"][0].get("is_error").is_none());
    }

    #[test]
    fn user_texts_of_the_newest_turn_get_a_note_appended() {
        let mut body = json!({"messages": [
            {"role": "user", "content": "old"},
            {"role": "assistant", "content": "launched"},
            {"role": "user", "content": [{"type": "text", "text": "[ALL BACKGROUND TASKS COMPLETE]"}]},
            {"role": "user", "content": "more"},
        ]});
        let texts = newest_user_texts(Format::Anthropic, &body);
        assert_eq!(
            texts.iter().map(|t| t.slot).collect::<Vec<_>>(),
            [TextSlot::Part(2, 0), TextSlot::Whole(3)]
        );
        append_note(Format::Anthropic, &mut body, TextSlot::Part(2, 0), "note");
        assert_eq!(
            body["messages"][2]["content"][0]["text"],
            "[ALL BACKGROUND TASKS COMPLETE]\n\nnote"
        );
        let first = json!({"input": [{"role": "user", "content": "hi"}]});
        assert_eq!(newest_user_texts(Format::OpenAiResponses, &first).len(), 1);
    }

    #[test]
    fn no_results_without_an_assistant_turn_or_a_matching_call() {
        let body =
            json!({"messages": [{"role": "tool", "tool_call_id": "x", "content": "Task Result"}]});
        assert!(newest_results(Format::OpenAiChat, &body).is_empty());
        let body = json!({"messages": [
            {"role": "assistant", "tool_calls": []},
            {"role": "tool", "tool_call_id": "x", "content": "Task Result"}]});
        assert!(newest_results(Format::OpenAiChat, &body).is_empty());
        assert!(newest_results(Format::Anthropic, &json!("nope")).is_empty());
    }
}
