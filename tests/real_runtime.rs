//! Tests against the real OpenCode runtime (`opencode-ai`, pinned in `tests/runtime/`), driven by
//! the scripted model provider. They need no taskgate: they pin the upstream behaviour taskgate
//! exists to fix, and prove the test rig itself works. They skip with a message when the runtime
//! cannot be installed locally, and fail under `CI=true`.
//!
//! The through-taskgate versions (`real_taskgate.rs`) reuse the same rig; see the sketch at the end.

#[path = "support/provider.rs"]
mod provider;
#[path = "support/runtime.rs"]
mod runtime;

use std::time::{Duration, Instant};

use hyper::StatusCode;
use provider::{
    ScriptedProvider, Turn, CHILD_DONE, CHILD_FAIL_MESSAGE, PARENT_FINAL, PARENT_LAUNCHED,
    PLAIN_ANSWER,
};
use runtime::{http_get, runtime_or_skip, EventStream, Runtime, RuntimeOptions};
use serde_json::Value;

/// How long the buggy `run --attach` may take to exit on its own (observed 1.5–4 s).
const EARLY_EXIT_WINDOW: Duration = Duration::from_secs(45);
/// How long a scenario may take to settle after its children are released.
const SETTLE: Duration = Duration::from_secs(60);

/// The one root session of a fresh runtime.
async fn root_session(rt: &Runtime) -> Value {
    let roots = rt.root_sessions().await;
    assert_eq!(roots.len(), 1, "expected one root session: {roots:?}");
    roots.into_iter().next().unwrap()
}

/// Polls until `session`'s assistant texts contain `needle`, panicking after `deadline`.
async fn wait_for_text(
    rt: &Runtime,
    provider: &ScriptedProvider,
    session: &str,
    needle: &str,
    deadline: Duration,
) {
    let end = Instant::now() + deadline;
    loop {
        let texts = rt.assistant_texts(session).await;
        if texts.iter().any(|t| t.contains(needle)) {
            return;
        }
        if Instant::now() > end {
            panic!(
                "{session} never answered {needle:?} within {deadline:?}; texts: {texts:?}\n\
                 model turns:\n{}",
                provider.describe()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
    }
}

/// The provider drives the real runtime: a plain prompt is answered by the scripted model and
/// `opencode run` (in-process mode, which drains its events) prints that answer (since
/// [`runtime::LOCAL_RUN_PRINTS_SINCE`]); the same prompt sent with `run --attach` reaches the
/// model intact and its answer is stored by the runtime. (`run --attach` itself exits when its
/// POST returns, usually before the answer's last event reached it, so it is not asserted here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_prompt_is_answered_by_the_scripted_model() {
    let Some(bin) = runtime_or_skip("plain_prompt_is_answered_by_the_scripted_model") else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let rt = Runtime::start(&bin, &provider.base_url(), RuntimeOptions::default()).await;
    eprintln!(
        "opencode-ai@{} healthy after {:.1?}",
        bin.version, rt.startup
    );

    let out = rt.run_local(&[], "Say hello to the tests.").await;
    eprintln!("local run: {:.1?}", out.elapsed);
    assert!(out.status.success(), "local run failed: {out:?}");
    if runtime::version_at_least(&bin.version, runtime::LOCAL_RUN_PRINTS_SINCE) {
        assert!(
            out.stdout.contains(PLAIN_ANSWER),
            "local run did not print the model's answer: {out:?}\n{}",
            rt.logs()
        );
    }

    let before = provider.chat_requests().len();
    let out = rt.run(rt.url(), &[], "Say hello over attach.").await;
    eprintln!("attached run: {:.1?}", out.elapsed);
    assert!(out.status.success(), "attached run failed: {out:?}");
    let turns: Vec<_> = provider.chat_requests()[before..]
        .iter()
        .map(|r| (r.turn.clone(), r.text_of_role("user")))
        .collect();
    assert!(
        turns
            .iter()
            .any(|(t, user)| *t == Some(Turn::Plain) && user.contains("Say hello over attach.")),
        "the prompt did not reach the model intact: {turns:?}"
    );
    let root = rt
        .sessions()
        .await
        .into_iter()
        .find(|s| s["title"] != Value::Null && s.get("parentID").is_none())
        .unwrap();
    let id = root["id"].as_str().unwrap();
    wait_for_text(&rt, &provider, id, PLAIN_ANSWER, SETTLE).await;
}

/// Pins the upstream bug (opencode-runtime.md §1): `opencode run --attach RUNTIME` with a
/// background child exits while the child is still busy and never prints the parent's last
/// answer, which the runtime only writes after the child ends. If a new runtime waits for the
/// child and prints it, this test fails and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_run_exits_while_background_child_is_busy() {
    let Some(bin) = runtime_or_skip("direct_run_exits_while_background_child_is_busy") else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let rt = Runtime::start(&bin, &provider.base_url(), RuntimeOptions::default()).await;

    // The child holds its model reply open until released: it is busy for as long as the test
    // needs, with no timing involved.
    let events = EventStream::connect(&format!("{}/event", rt.url()), None).await;
    let prompt = "Delegate this. @bg(CHILD-HOLD-pin do the long work)";
    let run = rt.run(rt.url(), &[], prompt);
    tokio::pin!(run);
    let early = tokio::select! {
        out = &mut run => Some(out),
        _ = tokio::time::sleep(EARLY_EXIT_WINDOW) => None,
    };
    let Some(out) = early else {
        // The run is still waiting while the child is held: the runtime may have fixed the bug.
        provider.release("pin");
        let out = run.await;
        panic!(
            "opencode-ai@{} kept `run --attach` open while a background child was busy \
             (printed the final answer: {}). Either the runtime has no background subagents \
             (before 1.15.0 the child runs in the foreground) or a new runtime fixed the \
             upstream bug; update this pin and docs/compatibility.md. Output: {out:?}",
            bin.version,
            out.stdout.contains(PARENT_FINAL)
        );
    };
    // Observed right after the run exited, before anything is released.
    let busy = rt.busy_sessions().await;
    let root = root_session(&rt).await;
    let root_id = root["id"].as_str().unwrap().to_string();
    let kids = rt.children(&root_id).await;
    assert_eq!(kids.len(), 1, "expected one child: {kids:?}");
    let child_id = kids[0]["id"].as_str().unwrap().to_string();
    eprintln!(
        "run exited after {:.1?} with {:?}; busy: {busy:?}",
        out.elapsed, out.status
    );

    assert!(
        out.status.success(),
        "the buggy run exits 0 (observed); got {out:?}"
    );
    assert!(
        busy.contains(&child_id),
        "the child {child_id} should still be busy when run exits; busy: {busy:?}"
    );
    assert!(
        !out.all().contains(PARENT_FINAL),
        "run printed the parent's last answer although the child was still held: the runtime \
         changed; update this pin. Output: {out:?}"
    );
    // What any event subscriber sees: the root announced idle while its child works.
    events
        .wait_for("the root's session.idle", SETTLE, |evs| {
            evs.iter().any(|e| {
                e["type"] == "session.idle"
                    && e.pointer("/properties/sessionID") == Some(&root["id"])
            })
        })
        .await;
    assert!(
        rt.busy_sessions().await.contains(&child_id),
        "the child is still busy after the root's idle event"
    );
    // The child's model request may still be on its way when `run` exits.
    provider
        .wait_for("the child's model turn", SETTLE, |reqs| {
            reqs.iter()
                .any(|r| r.turn == Some(Turn::ChildHold("pin".into())))
        })
        .await;
    // Let the child finish: the runtime injects its result into the parent, which answers.
    // That answer exists, but the user of `run` never saw it.
    provider.release("pin");
    wait_for_text(&rt, &provider, &child_id, CHILD_DONE, SETTLE).await;
    wait_for_text(&rt, &provider, &root_id, PARENT_FINAL, SETTLE).await;
    rt.wait_all_idle(SETTLE).await;
    let texts = rt.assistant_texts(&root_id).await;
    assert!(
        texts.iter().any(|t| t.contains(PARENT_LAUNCHED)),
        "the parent's first turn should end with the launch note: {texts:?}"
    );
}

/// With `OPENCODE_SERVER_PASSWORD` set on the runtime, a client without credentials gets 401
/// and one with them gets through: what taskgate must pass through and use for its own reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_with_password_rejects_clients_without_credentials() {
    let Some(bin) = runtime_or_skip("runtime_with_password_rejects_clients_without_credentials")
    else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let opts = RuntimeOptions {
        password: Some("s3cret-for-tests".into()),
        ..RuntimeOptions::default()
    };
    let rt = Runtime::start(&bin, &provider.base_url(), opts).await;

    let url = format!("{}/session/status", rt.url());
    let (status, _) = http_get(&url, None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no credentials");
    let wrong = runtime::basic_auth("opencode", "wrong");
    let (status, _) = http_get(&url, Some(&wrong)).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "wrong password");
    let (status, body) = http_get(&url, rt.basic_auth().as_deref()).await.unwrap();
    assert_eq!(status, StatusCode::OK, "right password: {body:?}");

    // `run --attach` picks the password up from OPENCODE_SERVER_PASSWORD (the harness passes it).
    let out = rt.run(rt.url(), &[], "Say hello with a password.").await;
    assert!(out.status.success(), "authenticated run failed: {out:?}");
    assert!(
        provider.chat_requests().iter().any(|r| r
            .text_of_role("user")
            .contains("Say hello with a password.")),
        "the authenticated run's prompt never reached the model"
    );
}

/// The scripted scenarios play out in the real runtime: two background children, one working and
/// one whose model call fails (a non-retryable `APIError`), are both reported back to the parent,
/// whose last answer counts the reports. How the failure is reported depends on the release:
/// since [`runtime::FAILURE_REPORTED_SINCE`] as `state="error"` with the error text; before, as
/// `state="completed"` with an empty result (the runtime's own false completion claim, pinned here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn working_and_failing_background_children_are_reported_to_the_parent() {
    let Some(bin) =
        runtime_or_skip("working_and_failing_background_children_are_reported_to_the_parent")
    else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let rt = Runtime::start(&bin, &provider.base_url(), RuntimeOptions::default()).await;
    let reports_error = runtime::version_at_least(&bin.version, runtime::FAILURE_REPORTED_SINCE);

    let prompt = "Delegate both. @bg(CHILD-WORK-2S first job) @bg(CHILD-FAIL second job)";
    let out = rt.run(rt.url(), &[], prompt).await;
    assert!(out.status.success(), "{out:?}");
    let root = root_session(&rt).await;
    let root_id = root["id"].as_str().unwrap().to_string();
    let expected_final = if reports_error {
        "(completed=1 error=1)"
    } else {
        "(completed=2 error=0)"
    };
    wait_for_text(&rt, &provider, &root_id, expected_final, SETTLE).await;
    rt.wait_all_idle(SETTLE).await;

    let kids = rt.children(&root_id).await;
    assert_eq!(kids.len(), 2, "{kids:?}");
    let mut errors = Vec::new();
    for kid in &kids {
        let id = kid["id"].as_str().unwrap();
        let msgs = rt.get_json(&format!("/session/{id}/message")).await;
        errors.extend(
            msgs.as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m.pointer("/info/error/name").and_then(Value::as_str))
                .map(str::to_string),
        );
    }
    assert_eq!(
        errors,
        ["APIError"],
        "exactly the failing child records an APIError"
    );
    let injected: Vec<String> = provider
        .chat_requests()
        .iter()
        .filter(|r| matches!(r.turn, Some(Turn::ParentInjected { .. })))
        .filter_map(|r| {
            r.body["messages"]
                .as_array()
                .and_then(|m| m.last())
                .map(|m| m.to_string())
        })
        .collect();
    assert_eq!(injected.len(), 2, "one report per child: {injected:?}");
    if reports_error {
        assert!(
            injected
                .iter()
                .any(|t| t.contains("state=\\\"error\\\"") && t.contains(CHILD_FAIL_MESSAGE)),
            "the parent's model should read the injected failure: {injected:?}"
        );
    } else {
        assert!(
            injected.iter().all(|t| !t.contains(CHILD_FAIL_MESSAGE)),
            "opencode-ai@{} now reports the failure: raise FAILURE_REPORTED_SINCE: {injected:?}",
            bin.version
        );
    }
}

/// A foreground child (task without `background`) runs inside the parent's turn: the model reads
/// the child's answer as the tool result, and `run --attach` exits only after the whole tree is
/// idle. This is the contrast the background case breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_child_runs_inside_the_parents_turn() {
    let Some(bin) = runtime_or_skip("foreground_child_runs_inside_the_parents_turn") else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let rt = Runtime::start(&bin, &provider.base_url(), RuntimeOptions::default()).await;
    let out = rt
        .run(rt.url(), &[], "Do it now. @fg(CHILD-WORK-1S quick job)")
        .await;
    assert!(out.status.success(), "{out:?}");
    let busy = rt.busy_sessions().await;
    assert!(
        busy.is_empty(),
        "nothing may be busy after a foreground run: {busy:?}"
    );
    let tool_results: Vec<String> = provider
        .chat_requests()
        .iter()
        .filter(|r| r.turn == Some(Turn::ParentAfterTools))
        .map(|r| r.text_of_role("tool"))
        .collect();
    assert!(
        tool_results.iter().any(|t| t.contains(CHILD_DONE)),
        "the parent's model should read the child's answer as the tool result: {tool_results:?}"
    );
    let root = root_session(&rt).await;
    let root_id = root["id"].as_str().unwrap();
    let texts = rt.assistant_texts(root_id).await;
    assert!(texts.iter().any(|t| t.contains(PARENT_FINAL)), "{texts:?}");
}

// The same scenarios through taskgate are in tests/real_taskgate.rs.
