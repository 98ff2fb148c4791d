//! The synchronous prompt's hold against a scripted runtime whose replies the gate cannot keep
//! as they came: compressed, or larger than `proxy.inspect_limit_bytes`.

#[path = "support/oracle.rs"]
mod oracle;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use oracle::{eventually, Data, Upstream, FINAL_TEXT, PARENT};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(10);

/// The bug this pins: a prompt reply with a `Content-Encoding` (taskgate asks for identity; a
/// runtime may compress anyway) skipped the hold entirely, so the premature reply went out at
/// once. Now it is held like any other, and released with the latest message as plain JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_prompt_reply_is_still_held() {
    let up = Upstream::start(Data::child_busy(), None).await;
    let (proxy, shutdown) = up.behind_taskgate(|_| {}).await;
    let _stop = shutdown.drop_guard();
    let headers =
        prompt_held_until_the_tree_is_done(&up, &proxy, &[("accept-encoding", "gzip")]).await;
    assert!(headers.get("content-encoding").is_none());
}

/// The bug this pins: a prompt reply larger than `proxy.inspect_limit_bytes` was passed on at
/// once, unheld, like any body too large to inspect. Its hold is a safety promise: now the body
/// is dropped, the hold goes on, and the latest message is the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_reply_larger_than_the_inspect_limit_is_still_held() {
    let up = Upstream::start(Data::child_busy(), None).await;
    let (proxy, shutdown) = up
        .behind_taskgate(|c| c.proxy.inspect_limit_bytes = 16)
        .await;
    let _stop = shutdown.drop_guard();
    prompt_held_until_the_tree_is_done(&up, &proxy, &[]).await;
}

/// Prompts the parent through taskgate at `proxy` (with `headers`) while the child is busy,
/// checks the reply is held past the hold's first tree read, finishes the tree, and checks the
/// release: verdict completed, the latest message (the child's final text) as plain JSON.
/// Returns the released reply's headers.
async fn prompt_held_until_the_tree_is_done(
    up: &Upstream,
    proxy: &str,
    headers: &[(&str, &str)],
) -> http::HeaderMap {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = http::Request::post(format!("{proxy}/session/{PARENT}/message"))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from_static(b"{\"parts\":[]}")))
        .unwrap();
    let reply = tokio::spawn(async move { client.request(request).await.unwrap() });
    let histories = || {
        up.double
            .message_reads
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    // The gate read the tree (the child busy) instead of passing the reply on.
    eventually("the hold's first read", PATIENCE, || histories() >= 2).await;
    assert!(!reply.is_finished(), "the reply was passed on at once");
    up.double.set(Data::all_done());
    let response = tokio::time::timeout(PATIENCE, reply)
        .await
        .expect("released once the tree is done")
        .unwrap();
    assert_eq!(response.headers()["x-taskgate-verdict"], "completed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let message: Value = serde_json::from_slice(&body).expect("the latest message, plain JSON");
    let said: Vec<&str> = message["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert!(said.contains(&FINAL_TEXT), "{message}");
    parts.headers
}
