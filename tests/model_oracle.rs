//! The model face with the real oracle, against a scripted runtime serving the recorded
//! opencode-ai@1.18.33 background run: a premature claim about the busy child is held until the
//! runtime shows the child's tree done, and the model then reads the child's real final text.

#[path = "support/model.rs"]
mod model;
#[path = "support/oracle.rs"]
mod oracle_double;

use std::time::Duration;

use model::{client, post, Provider};
use oracle_double::{eventually, Data, Upstream, CHILD};
use serde_json::json;
use taskgate::config::Config;
use tokio_util::sync::CancellationToken;

/// The child's last text in the recorded run (child-messages-after.json).
const CHILD_FINAL: &str = "child finished the work";
const PARTIAL: &str = "partial: still waiting for my grandchild";

fn config(runtime: &str, provider: &str) -> Config {
    // proxy.upstream points nowhere: the model face must ask model.runtime.
    Config::from_toml_str(
        "test",
        &format!(
            "[proxy]\nupstream = \"http://127.0.0.1:9\"\n[oracle]\npoll_interval = \"50ms\"\nrequest_timeout = \"5s\"\n[gate]\nsettle_window = \"50ms\"\n[model]\nenabled = true\nruntime = \"{runtime}\"\nopenai_chat = \"{provider}/v1\"\nmax_hold = \"30s\"\n"
        ),
    )
    .unwrap()
}

fn claim_request() -> String {
    claim_about(CHILD)
}

fn claim_about(child: &str) -> String {
    let claim = format!("Task Result\n\nTask ID: bg_04817ab3\nDescription: child task\nDuration: 3s\nSession ID: {child}\n\n---\n\n{PARTIAL}");
    json!({"model": "scripted", "stream": true, "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_2", "type": "function",
            "function": {"name": "background_output", "arguments": "{\"task_id\":\"bg_04817ab3\",\"block\":true}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": claim},
    ]})
    .to_string()
}

async fn start_face(config: Config) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(taskgate::model::run(
        listener,
        config,
        None,
        shutdown.clone(),
    ));
    (url, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_about_a_busy_child_waits_for_the_runtime_and_carries_the_final_text() {
    let runtime = Upstream::start(Data::child_busy(), None).await;
    let mut provider = Provider::start(false).await;
    let (face, shutdown) = start_face(config(&runtime.url, &provider.url)).await;
    let request = post(
        &format!("{face}/openai-chat/chat/completions"),
        &claim_request(),
    );
    let sent = tokio::spawn(async move { client().request(request).await.unwrap() });

    // A second status read starts only once the first tree read has finished (one read in
    // flight per tree): from then on the face has seen the child busy. Waiting for the first
    // request alone raced with the flip below, and the claim was then rightly found true.
    eventually(
        "the oracle read the runtime",
        Duration::from_secs(10),
        || runtime.double.reads() > 1,
    )
    .await;
    assert!(
        !provider.has_pending(),
        "held while the runtime shows the child busy"
    );
    runtime.double.set(Data::all_done());

    let got = provider.next().await;
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    let result = body["messages"][2]["content"].as_str().unwrap();
    assert!(result.contains(CHILD_FINAL), "{result}");
    assert!(!result.contains(PARTIAL), "{result}");
    assert_eq!(sent.await.unwrap().status(), 200);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_the_runtime_confirms_passes_byte_for_byte() {
    let runtime = Upstream::start(Data::all_done(), None).await;
    let mut provider = Provider::start(false).await;
    let (face, shutdown) = start_face(config(&runtime.url, &provider.url)).await;
    let body = claim_request();
    let response = client()
        .request(post(&format!("{face}/openai-chat/chat/completions"), &body))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let got = provider.next().await;
    assert!(runtime.double.reads() > 0, "the claim was checked");
    assert_eq!(&got.body[..], body.as_bytes());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_about_a_session_the_runtime_does_not_know_is_marked_unverified_without_a_hold() {
    let runtime = Upstream::start(Data::all_done(), None).await;
    let mut provider = Provider::start(false).await;
    // max_hold (30 s) is far longer than the provider double's patience (10 s): the request
    // can only arrive in time if it was not held.
    let (face, shutdown) = start_face(config(&runtime.url, &provider.url)).await;
    let body = claim_about("ses_nosuchsession0000");
    let response = client()
        .request(post(&format!("{face}/openai-chat/chat/completions"), &body))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let got = provider.next().await;
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    let result = body["messages"][2]["content"].as_str().unwrap();
    assert!(result.contains("could not confirm"), "{result}");
    assert!(result.contains("does not know this session"), "{result}");
    assert!(
        !result.contains(&runtime.url),
        "no runtime address for the model: {result}"
    );
    assert!(!result.contains(PARTIAL), "{result}");
    shutdown.cancel();
}
