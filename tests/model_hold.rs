//! The model face holds a request whose newest tool result claims a child is done until the
//! truth is terminal, then forwards it with that result replaced by the truth: for
//! oh-my-opencode's `background_output`, Claude-style `TaskOutput` and OpenCode's `task_status`,
//! in the three provider formats.

#[path = "support/model.rs"]
mod model;

use model::{client, config, post, text, Face, Provider, ScriptedTruth};
use serde_json::{json, Value};
use taskgate::oracle::Verdict;

const CHILD: &str = "ses_df4c7ab9bffecks0CL3iL16K45";
const PARTIAL: &str = "partial: my grandchild's result is not in yet";
const FINAL: &str = "FINAL: the child's real answer";

/// The oh-my-opencode conversation of omo-false-claim.md: a background launch, then a premature
/// `background_output` "Task Result", as an OpenAI chat completions request.
pub fn omo_chat_request() -> String {
    let launch = format!("Background task launched.\n\nBackground Task ID: bg_04817ab3\nDescription: child task\nStatus: pending\n\n<task_metadata>\nsession_id: {CHILD}\nbackground_task_id: bg_04817ab3\nsubagent: Sisyphus-Junior\ncategory: quick\n</task_metadata>");
    let claim = format!("Task Result\n\nTask ID: bg_04817ab3\nDescription: child task\nDuration: 3s\nSession ID: {CHILD}\n\n---\n\n{PARTIAL}");
    json!({"model": "scripted", "stream": true, "messages": [
        {"role": "system", "content": "You are Sisyphus."},
        {"role": "user", "content": "Do the work in the background."},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "task", "arguments": "{\"category\":\"quick\",\"run_in_background\":true,\"description\":\"child task\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": launch},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_2", "type": "function",
            "function": {"name": "background_output", "arguments": "{\"task_id\":\"bg_04817ab3\",\"block\":true}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": claim},
    ]})
    .to_string()
}

fn body_json(text: &str) -> Value {
    serde_json::from_str(text).expect("the provider received JSON")
}

#[tokio::test]
async fn premature_background_output_task_result_is_held_then_replaced_by_the_final_answer() {
    let mut provider = Provider::start(false).await;
    let truth = ScriptedTruth::new();
    let face = Face::start(&config(&provider.url, "60s"), truth.clone()).await;
    let request = post(
        &format!("{}/openai-chat/chat/completions", face.url),
        &omo_chat_request(),
    );
    let sent = tokio::spawn(async move { client().request(request).await.unwrap() });

    truth.asked(CHILD).await;
    assert!(
        !provider.has_pending(),
        "the request must be held while the child's tree runs"
    );
    truth.set(
        CHILD,
        Verdict::Completed {
            text: Some(FINAL.into()),
        },
    );

    let got = provider.next().await;
    assert_eq!(got.target, "/v1/chat/completions");
    let body = body_json(&got.text());
    let result = body["messages"][5]["content"].as_str().unwrap();
    assert!(result.contains(FINAL), "{result}");
    assert!(result.contains(CHILD), "{result}");
    assert!(
        !result.contains(PARTIAL),
        "the false claim must not reach the model: {result}"
    );
    assert!(!result.starts_with("Task Result"), "{result}");
    // Everything else of the conversation is as the runtime sent it.
    assert!(body["messages"][3]["content"]
        .as_str()
        .unwrap()
        .starts_with("Background task launched."));
    assert_eq!(body["messages"][4]["tool_calls"][0]["id"], "call_2");
    assert_eq!(got.headers["authorization"], "Bearer sk-test-secret");

    let response = sent.await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(text(response).await.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn task_output_status_completed_on_an_aborted_child_says_it_was_aborted() {
    let mut provider = Provider::start(false).await;
    let truth = ScriptedTruth::new();
    let face = Face::start(&config(&provider.url, "60s"), truth.clone()).await;
    // Anthropic messages; TaskOutput names only the bg_ id, linked through the launch result.
    let launch = format!("Background task launched.\n\n<task_metadata>\nsession_id: {CHILD}\nbackground_task_id: bg_12345678\n</task_metadata>");
    let claim = "<retrieval_status>success</retrieval_status>\n<task_id>bg_12345678</task_id>\n<status>completed</status>\n<output>half done</output>";
    let request = json!({"model": "claude", "max_tokens": 1024, "stream": true, "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "task",
            "input": {"run_in_background": true}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": launch}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_2", "name": "TaskOutput",
             "input": {"task_id": "bg_12345678", "block": true, "timeout": 30000}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2",
            "content": [{"type": "text", "text": claim}]}]},
    ]})
    .to_string();
    let request = post(&format!("{}/anthropic/messages", face.url), &request);
    let sent = tokio::spawn(async move { client().request(request).await.unwrap() });

    truth.asked(CHILD).await;
    assert!(!provider.has_pending());
    truth.set(
        CHILD,
        Verdict::Aborted {
            session: CHILD.into(),
            message: "MessageAbortedError".into(),
        },
    );

    let got = provider.next().await;
    assert_eq!(got.target, "/v1/messages");
    assert_eq!(got.headers["x-api-key"], "sk-ant-test");
    let body = body_json(&got.text());
    let block = &body["messages"][4]["content"][0];
    let result = block["content"][0]["text"].as_str().unwrap();
    assert!(result.contains("aborted"), "{result}");
    assert!(result.contains("MessageAbortedError"), "{result}");
    assert!(!result.contains("<status>completed</status>"), "{result}");
    assert_eq!(block["is_error"], true);
    assert_eq!(sent.await.unwrap().status(), 200);
}

#[tokio::test]
async fn task_status_state_completed_is_held_until_the_child_is_done() {
    let mut provider = Provider::start(false).await;
    let truth = ScriptedTruth::new();
    let face = Face::start(&config(&provider.url, "60s"), truth.clone()).await;
    // OpenAI responses: function_call + function_call_output items.
    let claim =
        format!("task_id: {CHILD}\nstate: completed\n\n<task_result>early words</task_result>");
    let request = json!({"model": "gpt", "stream": true, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "go"}]},
        {"type": "function_call", "call_id": "fc_1", "name": "task_status",
         "arguments": format!("{{\"task_id\":\"{CHILD}\",\"wait\":true}}")},
        {"type": "function_call_output", "call_id": "fc_1", "output": claim},
    ]})
    .to_string();
    let request = post(
        &format!("{}/openai-responses/responses", face.url),
        &request,
    );
    let sent = tokio::spawn(async move { client().request(request).await.unwrap() });

    truth.asked(CHILD).await;
    assert!(!provider.has_pending());
    truth.set(
        CHILD,
        Verdict::Completed {
            text: Some(FINAL.into()),
        },
    );

    let got = provider.next().await;
    assert_eq!(got.target, "/v1/responses");
    let body = body_json(&got.text());
    let output = body["input"][2]["output"].as_str().unwrap();
    assert!(output.contains(FINAL), "{output}");
    assert!(!output.contains("early words"), "{output}");
    assert_eq!(body["input"][1]["call_id"], "fc_1");
    assert_eq!(sent.await.unwrap().status(), 200);
}

#[tokio::test]
async fn when_max_hold_runs_out_the_model_reads_still_running() {
    let mut provider = Provider::start(false).await;
    let truth = ScriptedTruth::new();
    // The truth never becomes terminal: only the bound releases the request.
    let face = Face::start(&config(&provider.url, "300ms"), truth.clone()).await;
    let request = post(
        &format!("{}/openai-chat/chat/completions", face.url),
        &omo_chat_request(),
    );
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);

    let got = provider.next().await;
    let body = body_json(&got.text());
    let result = body["messages"][5]["content"].as_str().unwrap();
    assert!(result.contains("still running"), "{result}");
    assert!(result.contains("started 42 s ago"), "{result}");
    assert!(result.contains("last activity 3 s ago"), "{result}");
    assert!(!result.contains(PARTIAL), "{result}");
}

#[tokio::test]
async fn a_runtime_that_gives_up_on_a_held_request_ends_the_hold_and_sends_nothing() {
    let mut provider = Provider::start(false).await;
    let truth = ScriptedTruth::new();
    let face = Face::start(&config(&provider.url, "60s"), truth.clone()).await;
    let request = post(
        &format!("{}/openai-chat/chat/completions", face.url),
        &omo_chat_request(),
    );
    let sent = tokio::spawn(async move { client().request(request).await });
    truth.asked(CHILD).await;
    // The runtime's provider timeout fires: it closes the connection.
    sent.abort();
    truth.idle().await;
    truth.set(
        CHILD,
        Verdict::Completed {
            text: Some(FINAL.into()),
        },
    );
    // A later request is served, and it is the only one the provider ever sees.
    let plain =
        json!({"model": "m", "messages": [{"role": "user", "content": "next"}]}).to_string();
    client()
        .request(post(
            &format!("{}/openai-chat/chat/completions", face.url),
            &plain,
        ))
        .await
        .unwrap();
    let got = provider.next().await;
    assert_eq!(&got.body[..], plain.as_bytes());
    assert!(
        !provider.has_pending(),
        "the abandoned request never reached the provider"
    );
}

/// oh-my-opencode's parent wake (omo-false-claim.md: sent at ~12.5 s while the grandchild works
/// until ~17.4 s), after a launch, as an Anthropic messages request.
fn omo_wake_request() -> String {
    let launch = format!("Background task launched.\n\nBackground Task ID: bg_04817ab3\nStatus: pending\n\n<task_metadata>\nsession_id: {CHILD}\nbackground_task_id: bg_04817ab3\n</task_metadata>");
    json!({"model": "claude", "max_tokens": 1024, "stream": true, "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "task",
            "input": {"run_in_background": true}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": launch}]},
        {"role": "assistant", "content": [{"type": "text", "text": "I will wait for the child."}]},
        {"role": "user", "content": [{"type": "text", "text": WAKE}]},
    ]})
    .to_string()
}

const WAKE: &str =
    "[ALL BACKGROUND TASKS COMPLETE]\n- `bg_04817ab3`: child task\n<!-- OMO_INTERNAL_INITIATOR -->";

#[tokio::test]
async fn a_premature_wake_is_held_and_goes_on_unchanged_once_the_tree_is_done() {
    let mut provider = Provider::start(false).await;
    let truth = ScriptedTruth::new();
    let face = Face::start(&config(&provider.url, "60s"), truth.clone()).await;
    let body = omo_wake_request();
    let request = post(&format!("{}/anthropic/messages", face.url), &body);
    let sent = tokio::spawn(async move { client().request(request).await.unwrap() });

    truth.asked(CHILD).await;
    assert!(!provider.has_pending(), "held while the child's tree runs");
    truth.set(
        CHILD,
        Verdict::Completed {
            text: Some(FINAL.into()),
        },
    );

    let got = provider.next().await;
    assert_eq!(
        &got.body[..],
        body.as_bytes(),
        "the wake is true now: unchanged"
    );
    assert_eq!(sent.await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_wake_while_the_child_still_runs_gets_the_truth_appended() {
    let mut provider = Provider::start(false).await;
    let truth = ScriptedTruth::new();
    let face = Face::start(&config(&provider.url, "300ms"), truth.clone()).await;
    let response = client()
        .request(post(
            &format!("{}/anthropic/messages", face.url),
            &omo_wake_request(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let got = provider.next().await;
    let body = body_json(&got.text());
    let text = body["messages"][4]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with(WAKE),
        "the plugin's text and marker stay: {text}"
    );
    assert!(
        text.contains("[taskgate] This message reported this task as completed"),
        "{text}"
    );
    assert!(text.contains("still running"), "{text}");
}
