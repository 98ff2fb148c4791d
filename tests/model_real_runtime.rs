//! The model face between the real OpenCode runtime (`opencode-ai`, pinned in `tests/runtime/`)
//! and the scripted provider: the runtime's provider `baseURL` points at taskgate, taskgate at
//! the scripted provider. The model's requests arrive intact, streamed answers reach the runtime,
//! and the runtime's own injected `<task … state="completed">` result (a true claim, checked
//! against the real runtime by the real oracle) goes on unchanged. Skips with a message when the
//! runtime cannot be installed locally; fails under `CI=true`.

#[path = "support/provider.rs"]
mod provider;
#[path = "support/runtime.rs"]
mod runtime;

use std::time::{Duration, Instant};

use provider::{ScriptedProvider, Turn, PARENT_FINAL};
use runtime::{runtime_or_skip, start_model_face, Runtime, RuntimeOptions};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_run_through_the_model_face_reaches_the_model_intact_and_finishes() {
    let Some(bin) = runtime_or_skip(
        "a_background_run_through_the_model_face_reaches_the_model_intact_and_finishes",
    ) else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    // The face's address is needed before the runtime starts, the runtime's before the face
    // can ask it: bind first, serve once both are known.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let face_url = format!("http://{}/openai-chat", listener.local_addr().unwrap());
    let rt = Runtime::start(&bin, &face_url, RuntimeOptions::default()).await;
    let shutdown = start_model_face(listener, rt.url(), &provider.base_url(), "60s");

    let out = rt
        .run(
            rt.url(),
            &[],
            "Delegate this. @bg(CHILD-WORK-2S do the work)",
        )
        .await;
    assert!(out.status.success(), "{out:?}");

    // The parent's last answer is written by the runtime from the streamed reply to the
    // injected result: it reached the runtime through the face.
    let expected = format!("{PARENT_FINAL} (completed=1 error=0)");
    let end = Instant::now() + SETTLE;
    loop {
        if final_texts(&rt).await.iter().any(|t| t.contains(&expected)) {
            break;
        }
        assert!(
            Instant::now() < end,
            "the parent never wrote {expected:?}; the model saw:\n{}\n{}",
            provider.describe(),
            rt.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
    }

    let requests = provider.chat_requests();
    assert!(
        requests.iter().any(|r| r
            .text_of_role("user")
            .contains("@bg(CHILD-WORK-2S do the work)")),
        "the prompt did not reach the model intact:\n{}",
        provider.describe()
    );
    let injected: Vec<String> = requests
        .iter()
        .filter(|r| matches!(r.turn, Some(Turn::ParentInjected { .. })))
        .map(|r| r.body["messages"].to_string())
        .collect();
    assert_eq!(injected.len(), 1, "{}", provider.describe());
    assert!(
        injected[0].contains("state=\\\"completed\\\""),
        "{}",
        injected[0]
    );
    assert!(
        !injected[0].contains("[taskgate]"),
        "a true claim is not rewritten: {}",
        injected[0]
    );
    shutdown.cancel();
}

/// Every text part of every assistant message of every root session.
async fn final_texts(rt: &Runtime) -> Vec<String> {
    let mut out = Vec::new();
    for s in rt.sessions().await {
        if s.get("parentID").is_some() {
            continue;
        }
        let Some(id) = s["id"].as_str() else { continue };
        let msgs = rt.get_json(&format!("/session/{id}/message")).await;
        out.extend(
            msgs.as_array()
                .into_iter()
                .flatten()
                .filter(|m| m.pointer("/info/role").and_then(Value::as_str) == Some("assistant"))
                .flat_map(|m| m["parts"].as_array().cloned().unwrap_or_default())
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str().map(str::to_string)),
        );
    }
    out
}
