//! The real oh-my-opencode plugin (`oh-my-opencode`, pinned in `tests/runtime-omo/`) in the real
//! runtime (`opencode-ai`, pinned in `tests/runtime/`), driven by the scripted provider: the false
//! completion of `omo-false-claim.md`, first pinned directly, then corrected by the model face.
//!
//! The scenario: the root (`Sisyphus`) launches a background `task` in category `quick`; the
//! child (`Sisyphus-Junior`) launches an `explore` grandchild with `call_omo_agent` in the
//! background and ends its turn; the grandchild's streamed reply is held open until the test
//! releases it; the root calls `background_output` with `block: true`. The plugin calls the child
//! done when it goes idle the first time and hands the root a `Task Result` with the child's
//! partial text, while the grandchild still works.
//!
//! Skips with a message when npm cannot install the runtime or the plugin locally; fails under
//! `CI=true`.

#[path = "support/provider.rs"]
mod provider;
#[path = "support/runtime.rs"]
mod runtime;
#[path = "support/wrap.rs"]
mod wrap;

use std::time::{Duration, Instant};

use provider::{
    RecordedRequest, ScriptedProvider, Turn, OMO_CHILD_FINAL, OMO_CHILD_PARTIAL, OMO_PARENT_READ,
};
use runtime::{
    http_post_json, omo_config, omo_plugin_or_skip, plugin_url, runtime_or_skip, sandbox_for,
    start_model_face, Runtime, RuntimeBinary, RuntimeOptions,
};
use serde_json::{json, Value};

/// Bound for each step of the scenario; a run takes seconds (the plugin polls every 3 s).
const STEP: Duration = Duration::from_secs(90);
/// How long the face is given to (wrongly) let the claim through while the grandchild is held:
/// several of the plugin's 3 s polls and many of the oracle's 0.5 s reads.
const CLAIM_WINDOW: Duration = Duration::from_secs(8);

/// The runtime binary and the plugin folder, or `None` (skip) when either is unavailable.
fn runtime_and_plugin(test: &str) -> Option<(RuntimeBinary, String)> {
    let bin = runtime_or_skip(test)?;
    let plugin = omo_plugin_or_skip(test)?;
    Some((bin, plugin_url(&plugin)))
}

async fn start_with_plugin(bin: &RuntimeBinary, plugin: &str, provider_base_url: &str) -> Runtime {
    Runtime::start_with_omo(bin, plugin, provider_base_url, omo_config()).await
}

/// Creates a root session and prompts it with the scenario in the background (the prompt's
/// answer comes only when the root's turn ends); returns the root's id.
async fn prompt_root(rt: &Runtime, name: &str) -> String {
    let (status, body) = http_post_json(&format!("{}/session", rt.url()), None, &json!({}))
        .await
        .unwrap();
    assert!(status.is_success(), "POST /session: {status} {body:?}");
    let root: Value = serde_json::from_slice(&body).unwrap();
    let root = root["id"].as_str().unwrap().to_string();
    let url = format!("{}/session/{root}/message", rt.url());
    let prompt =
        json!({"parts": [{"type": "text", "text": format!("OMO-PARENT-{name}: delegate this.")}]});
    tokio::spawn(async move {
        // The answer is not what the tests look at; a runtime killed at the end drops it.
        let _ = http_post_json(&url, None, &prompt).await;
    });
    root
}

fn is_parent_read(r: &RecordedRequest) -> bool {
    r.turn == Some(Turn::Omo(provider::OmoTurn::ParentRead))
}

fn parent_read(provider: &ScriptedProvider) -> Option<RecordedRequest> {
    provider.chat_requests().into_iter().find(is_parent_read)
}

/// The `role: "tool"` message that answers the `background_output` call in `r`.
fn background_output_result(r: &RecordedRequest) -> String {
    let msgs = r.body["messages"].as_array().cloned().unwrap_or_default();
    let call_id = msgs
        .iter()
        .rev()
        .filter_map(|m| m["tool_calls"].as_array())
        .flat_map(|calls| calls.iter().rev())
        .filter(|c| c.pointer("/function/name") == Some(&json!("background_output")))
        .find_map(|c| c["id"].as_str())
        .unwrap_or_else(|| panic!("no background_output call in {}", r.body))
        .to_string();
    let result = msgs
        .iter()
        .find(|m| m["role"] == "tool" && m["tool_call_id"] == call_id.as_str())
        .unwrap_or_else(|| panic!("no result for {call_id} in {}", r.body));
    match &result["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        other => panic!("unexpected tool content {other}"),
    }
}

/// The value of a `Key: value` line in `text`.
fn line_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
}

/// The only child session of `session`.
async fn only_child(rt: &Runtime, session: &str) -> String {
    let children = rt.get_json(&format!("/session/{session}/children")).await;
    let ids: Vec<&str> = children
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 1, "children of {session}: {children}");
    ids[0].to_string()
}

/// The root's `background_output` tool part once the runtime finished running the tool (its
/// output is what the next model request carries), polled until `STEP` runs out.
async fn wait_background_output_part(rt: &Runtime, root: &str) -> Value {
    let end = Instant::now() + STEP;
    loop {
        let msgs = rt.get_json(&format!("/session/{root}/message")).await;
        let part = msgs
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| m["parts"].as_array().cloned().unwrap_or_default())
            .find(|p| p["tool"] == "background_output" && p["state"]["status"] == "completed");
        if let Some(part) = part {
            return part;
        }
        assert!(
            Instant::now() < end,
            "the root never finished a background_output call: {msgs}\n{}",
            rt.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
    }
}

fn plugin_log(rt: &Runtime) -> String {
    std::fs::read_to_string(rt.tmp_dir().join("oh-my-opencode.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_hands_the_parent_a_task_result_while_the_grandchild_still_works() {
    let test = "the_plugin_hands_the_parent_a_task_result_while_the_grandchild_still_works";
    let Some((bin, plugin)) = runtime_and_plugin(test) else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let rt = start_with_plugin(&bin, &plugin, &provider.base_url()).await;
    let root = prompt_root(&rt, "direct").await;

    provider
        .wait_for("the root's request after background_output", STEP, |rs| {
            rs.iter().any(is_parent_read)
        })
        .await;
    // Read the runtime at once: the grandchild's reply is held until the test releases it, so
    // it is still busy now whatever the timing.
    let busy = rt.busy_sessions().await;
    let read = parent_read(&provider).unwrap();
    let claim = background_output_result(&read);
    let child = only_child(&rt, &root).await;
    let grandchild = only_child(&rt, &child).await;

    assert!(
        claim.starts_with("Task Result"),
        "the plugin did not claim completion: {claim}\n{}",
        provider.describe()
    );
    assert_eq!(
        line_value(&claim, "Session ID:").as_deref(),
        Some(child.as_str()),
        "{claim}"
    );
    assert!(claim.contains(OMO_CHILD_PARTIAL), "{claim}");
    assert!(
        busy.contains(&grandchild),
        "the grandchild {grandchild} is not busy at the claim: {busy:?}"
    );
    assert!(
        provider
            .chat_requests()
            .iter()
            .any(|r| r.turn == Some(Turn::ChildHold("direct".into()))),
        "{}",
        provider.describe()
    );
    assert!(
        !rt.assistant_texts(&child)
            .await
            .iter()
            .any(|t| t.contains(OMO_CHILD_FINAL)),
        "the child's real answer cannot exist before its grandchild is released"
    );

    // The claim was false: once the grandchild ends, the child is woken and writes its real
    // answer, which the root was never given.
    provider.release("direct");
    let end = Instant::now() + STEP;
    while !rt
        .assistant_texts(&child)
        .await
        .iter()
        .any(|t| t.contains(OMO_CHILD_FINAL))
    {
        assert!(
            Instant::now() < end,
            "the child never wrote its real answer:\n{}\n{}",
            provider.describe(),
            plugin_log(&rt)
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
    }
    assert!(!claim.contains(OMO_CHILD_FINAL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_model_face_the_parent_reads_the_truth_instead_of_the_premature_task_result() {
    let test =
        "through_the_model_face_the_parent_reads_the_truth_instead_of_the_premature_task_result";
    let Some((bin, plugin)) = runtime_and_plugin(test) else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    // The face's address is needed before the runtime starts, the runtime's before the face
    // can ask it: bind first, serve once both are known.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let face_url = format!("http://{}/openai-chat", listener.local_addr().unwrap());
    let rt = start_with_plugin(&bin, &plugin, &face_url).await;
    let shutdown = start_model_face(listener, rt.url(), &provider.base_url(), "120s");

    let root = prompt_root(&rt, "face").await;
    // The runtime has run the tool: its output is the plugin's false claim, and the runtime's
    // next model request carries it.
    let part = wait_background_output_part(&rt, &root).await;
    let output = part["state"]["output"].as_str().unwrap_or_default();
    assert!(
        output.starts_with("Task Result") && output.contains(OMO_CHILD_PARTIAL),
        "the plugin did not make its false claim: {part}\n{}",
        provider.describe()
    );
    let child = only_child(&rt, &root).await;
    let grandchild = only_child(&rt, &child).await;
    assert!(
        rt.busy_sessions().await.contains(&grandchild),
        "the grandchild must still work at the claim"
    );

    // While the grandchild is held, the claim does not reach the model.
    let leaked = provider
        .arrives_within(CLAIM_WINDOW, |rs| rs.iter().any(is_parent_read))
        .await;
    assert!(
        !leaked,
        "the model got the premature claim while {grandchild} was busy:\n{}",
        parent_read(&provider)
            .map(|r| background_output_result(&r))
            .unwrap_or_default()
    );
    assert!(rt.busy_sessions().await.contains(&grandchild));

    let released = Instant::now();
    provider.release("face");
    provider
        .wait_for("the root's request after background_output", STEP, |rs| {
            rs.iter().any(is_parent_read)
        })
        .await;
    let busy = rt.busy_sessions().await;
    let read = parent_read(&provider).unwrap();
    let truth = background_output_result(&read);
    assert!(read.received > released);
    assert!(
        !busy.contains(&child) && !busy.contains(&grandchild),
        "the request went on before the tree was terminal: busy {busy:?}"
    );
    assert!(
        !truth.starts_with("Task Result") && truth.starts_with("[taskgate]"),
        "the model got the claim unmodified: {truth}"
    );
    assert!(
        truth.contains(&child) && truth.contains(OMO_CHILD_FINAL),
        "the model was not given the child's real answer: {truth}"
    );
    assert!(!truth.contains(OMO_CHILD_PARTIAL), "{truth}");

    // The model's answer, streamed through the face, reaches the runtime.
    let end = Instant::now() + STEP;
    while !rt
        .assistant_texts(&root)
        .await
        .iter()
        .any(|t| t.contains(OMO_PARENT_READ))
    {
        assert!(
            Instant::now() < end,
            "the root never wrote its answer:\n{}",
            provider.describe()
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
    }
    shutdown.cancel();
}

/// The acceptance of "the model side with no configuration": only the user's own
/// `opencode.json` (the scripted provider, the plugin) and `taskgate wrap -- opencode run`.
/// The wrapper points the runtime's providers at its model face by itself, so the plugin's
/// premature `Task Result` never reaches the model, which reads the child's real final answer;
/// the run then prints the parent's last answer and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_omo_run_never_lets_the_premature_task_result_reach_the_model() {
    let test = "wrapped_omo_run_never_lets_the_premature_task_result_reach_the_model";
    let Some((bin, plugin)) = runtime_and_plugin(test) else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let sandbox = sandbox_for(
        &provider.base_url(),
        &RuntimeOptions {
            plugins: vec![plugin],
            omo_config: Some(omo_config()),
            ..RuntimeOptions::default()
        },
    );
    let mut cmd = wrap::wrap_command(
        &bin.path,
        &["--strict"],
        &["run", "OMO-PARENT-wrapped: delegate this."],
        sandbox.path(),
    );
    cmd.env("OMO_DISABLE_POSTHOG", "1");
    let run = cmd.spawn().unwrap();

    // The grandchild is held by the scripted model and the child has ended its first turn
    // with its partial text: the plugin calls the child done from here on.
    provider
        .wait_for("the child's partial answer, grandchild held", STEP, |rs| {
            rs.iter()
                .any(|r| r.turn == Some(Turn::ChildHold("wrapped".into())))
                && rs
                    .iter()
                    .any(|r| r.turn == Some(Turn::Omo(provider::OmoTurn::ChildPartial)))
        })
        .await;
    let leaked = provider
        .arrives_within(CLAIM_WINDOW, |rs| rs.iter().any(is_parent_read))
        .await;
    assert!(
        !leaked,
        "the model got the premature claim while the grandchild was held:\n{}",
        parent_read(&provider)
            .map(|r| background_output_result(&r))
            .unwrap_or_default()
    );

    let released = Instant::now();
    provider.release("wrapped");
    let out = wrap::finish(run).await;
    let read = parent_read(&provider).unwrap_or_else(|| {
        panic!(
            "the root never read the background output: {out:?}\n{}",
            provider.describe()
        )
    });
    let truth = background_output_result(&read);
    assert!(read.received > released);
    assert!(
        truth.starts_with("[taskgate]") && truth.contains(OMO_CHILD_FINAL),
        "the model did not read the child's real answer: {truth}"
    );
    assert!(!truth.contains(OMO_CHILD_PARTIAL), "{truth}");
    assert!(out.status.success(), "wrapped run: {out:?}");
    assert!(
        out.stdout.contains(OMO_PARENT_READ),
        "the run did not print the parent's last answer: {out:?}"
    );
}
