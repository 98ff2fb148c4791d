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
#[path = "support/wrap.rs"]
mod wrap;

use std::time::{Duration, Instant};

use provider::{ScriptedProvider, Turn, PARENT_FINAL};
use runtime::{runtime_or_skip, sandbox_dir, start_model_face, Runtime, RuntimeOptions};
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

/// The one line `serve` users add (`eval "$(taskgate model-env)"`): the runtime started with
/// its `OPENCODE_CONFIG_CONTENT` sends its provider's requests to the model face of a
/// `taskgate serve` started with its `TASKGATE_MODEL*` variables, which forwards them to the
/// provider's real URL. Nobody edited `opencode.json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_env_routes_the_users_provider_through_the_face_of_serve() {
    let Some(bin) =
        runtime_or_skip("model_env_routes_the_users_provider_through_the_face_of_serve")
    else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let sandbox = sandbox_dir(&provider.base_url());
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (face, listen) = (free(), free());
    let env = wrap::finish(
        wrap::isolated(
            std::path::Path::new(wrap::TASKGATE),
            &[
                "model-env",
                "--model-listen",
                &face.to_string(),
                "--",
                bin.path.to_str().unwrap(),
            ],
            sandbox.path(),
        )
        .spawn()
        .unwrap(),
    )
    .await;
    assert!(env.status.success(), "{env:?}");
    let exports = parse_exports(&env.stdout);
    let var = |name: &str| {
        exports
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("model-env printed no {name}: {env:?}"))
    };
    // The user's provider, and the runtime's own built-in ones (OpenCode Zen), each with its
    // real URL.
    let pairs = var("TASKGATE_MODEL_PROVIDERS");
    assert!(
        pairs
            .split(',')
            .any(|p| p == format!("mock={}", provider.base_url())),
        "{pairs}"
    );
    assert!(!env.stdout.contains("not-a-secret"), "{env:?}");

    let rt = Runtime::start(
        &bin,
        &provider.base_url(),
        RuntimeOptions {
            env: vec![(
                "OPENCODE_CONFIG_CONTENT".into(),
                var("OPENCODE_CONFIG_CONTENT"),
            )],
            ..RuntimeOptions::default()
        },
    )
    .await;
    let providers = rt.get_json("/config/providers").await;
    let mock = providers["providers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["id"] == "mock")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        mock["options"]["baseURL"],
        format!("http://{face}/p/mock"),
        "{providers}"
    );

    let mut serve = tokio::process::Command::new(wrap::TASKGATE)
        .args([
            "serve",
            "--listen",
            &listen.to_string(),
            "--upstream",
            rt.url(),
        ])
        .envs(
            [
                "TASKGATE_MODEL",
                "TASKGATE_MODEL_LISTEN",
                "TASKGATE_MODEL_PROVIDERS",
            ]
            .map(|k| (k, var(k))),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + SETTLE;
    while tokio::net::TcpStream::connect(face).await.is_err() {
        assert!(Instant::now() < deadline, "the model face never listened");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
    // The runtime's only way to its provider is now the face's /p/mock: the run's answer
    // came through it.
    let out = rt.run(rt.url(), &[], "Just say hello.").await;
    assert!(out.status.success(), "{out:?}\n{}", provider.describe());
    assert!(
        provider
            .chat_requests()
            .iter()
            .any(|r| r.text_of_role("user").contains("Just say hello.")),
        "{}",
        provider.describe()
    );
    serve.kill().await.unwrap();
}

/// `export NAME='value'` lines as a POSIX shell would read them.
fn parse_exports(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.strip_prefix("export "))
        .filter_map(|rest| rest.split_once('='))
        .map(|(k, v)| {
            let v = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(v)
                .replace("'\\''", "'");
            (k.to_owned(), v)
        })
        .collect()
}
