//! Never hang, never hand out the premature answer: every way a held claim can end, against
//! the simulated runtime over real loopback HTTP.
//!
//! Safety: a held prompt is answered with the runtime's reply only when the terminal rule read
//! a terminal tree; shutdown, `max_hold`, a session the runtime no longer knows and refused
//! reads are explicit JSON errors, and after an early commit a cut body. Liveness: nothing
//! waits for something that cannot come (refused credentials, a deleted root), and a prompt
//! the runtime accepted but has not started counts as work.

#[path = "support/sim.rs"]
mod sim;

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sim::Stack;
use taskgate::config::{Config, HumanDuration};
use taskgate::sim::SimOptions;
use tokio::time::Instant;

/// Bound on every wait: a hang fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(30);
const PASSWORD: &str = "s3cret-runtime";

async fn stack(options: SimOptions, tune: impl FnOnce(&mut Config)) -> Stack {
    sim::stack(options, |c| {
        c.gate.settle_window = HumanDuration(Duration::from_millis(200));
        tune(c);
    })
    .await
}

fn basic() -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("opencode:{PASSWORD}"));
    format!("Basic {token}")
}

/// A response as a client sees it: status, headers, the whole body.
struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON ({}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(method: &str, url: &str, body: Option<Value>, auth: Option<&str>) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let response = tokio::time::timeout(
        PATIENCE,
        client.request(request.body(Full::new(Bytes::from(body))).unwrap()),
    )
    .await
    .expect("an answer within the bound")
    .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("the body within the bound")
        .unwrap()
        .to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

async fn new_session(base: &str, auth: Option<&str>) -> String {
    let reply = send("POST", &format!("{base}/session"), Some(json!({})), auth).await;
    reply.json()["id"].as_str().unwrap().to_owned()
}

fn scenario(name: &str) -> Value {
    json!({"parts": [{"type": "text", "text": format!("SCENARIO:{name}")}]})
}

/// Polls until `pred` holds on what `GET url` returns (bounded).
async fn until(url: &str, auth: Option<&str>, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = send("GET", url, None, auth).await;
        if reply.status == 200 {
            let value = reply.json();
            if pred(&value) {
                return value;
            }
        }
        assert!(Instant::now() < deadline, "never saw {what} at {url}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not a sync
    }
}

async fn until_prompt_held(stack: &Stack) {
    until(
        &format!("{}/_taskgate/holds", stack.proxy),
        None,
        "a prompt hold",
        |v| {
            v["holds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["kind"] == "prompt")
        },
    )
    .await;
}

/// Sends a synchronous prompt for `scenario` in a new session and returns as soon as the
/// response head arrives, the body still to be read.
async fn prompt_streamed(stack: &Stack, name: &str) -> http::Response<hyper::body::Incoming> {
    let id = new_session(&stack.proxy, None).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(format!("{}/session/{id}/message", stack.proxy))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(scenario(name).to_string())))
        .unwrap();
    tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .expect("the response head within the bound")
        .unwrap()
}

/// A synchronous prompt for `scenario` in a new session through taskgate, with `auth`.
async fn prompt(stack: &Stack, name: &str, auth: Option<&str>) -> Reply {
    let id = new_session(&stack.proxy, auth).await;
    send(
        "POST",
        &format!("{}/session/{id}/message", stack.proxy),
        Some(scenario(name)),
        auth,
    )
    .await
}

/// Sends `scenario` with `prompt_async` through taskgate in a new session; returns its id once
/// the runtime accepted it.
async fn prompt_async(stack: &Stack, name: &str) -> String {
    let id = new_session(&stack.proxy, None).await;
    let accepted = send(
        "POST",
        &format!("{}/session/{id}/prompt_async", stack.proxy),
        Some(scenario(name)),
        None,
    )
    .await;
    assert_eq!(accepted.status, 204, "{}", accepted.text());
    id
}

/// Sends a synchronous prompt for `scenario` in a new session through taskgate and returns
/// once taskgate holds its reply: the session, and the reply to come.
async fn held_prompt(stack: &Stack, name: &str) -> (String, tokio::task::JoinHandle<Reply>) {
    let id = new_session(&stack.proxy, None).await;
    let url = format!("{}/session/{id}/message", stack.proxy);
    let body = scenario(name);
    let reply = tokio::spawn(async move { send("POST", &url, Some(body), None).await });
    until_prompt_held(stack).await;
    (id, reply)
}

fn slow_child() -> SimOptions {
    // bg-child's child works 3 s: long enough to act while the prompt is held.
    SimOptions::default()
}

#[tokio::test]
async fn shutdown_answers_a_held_prompt_with_an_error_not_the_premature_reply() {
    let stack = stack(slow_child(), |_| {}).await;
    let (id, prompt) = held_prompt(&stack, "bg-child").await;
    stack.proxy_stop.cancel();
    let reply = prompt.await.unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    let error = &reply.json()["error"];
    assert_eq!(error["kind"], "taskgate_shutting_down");
    assert!(
        error["message"].as_str().unwrap().contains(&id),
        "names the session: {error}"
    );
    assert!(
        !reply.text().contains("launched"),
        "no premature reply: {}",
        reply.text()
    );
}

#[tokio::test]
async fn max_hold_answers_a_held_prompt_with_an_error_not_the_premature_reply() {
    let stack = stack(slow_child(), |c| {
        c.gate.max_hold = HumanDuration(Duration::from_millis(300));
    })
    .await;
    let reply = prompt(&stack, "bg-child", None).await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    let error = &reply.json()["error"];
    assert_eq!(error["kind"], "tree_still_running");
    assert!(
        error["message"].as_str().unwrap().contains("busy"),
        "{error}"
    );
    assert_eq!(reply.headers["x-taskgate-verdict"], "error");
    let direct = send("GET", &format!("{}/session/status", stack.sim), None, None).await;
    assert!(
        !direct.json().as_object().unwrap().is_empty(),
        "the child really was still busy"
    );
}

#[tokio::test]
async fn a_root_the_runtime_no_longer_knows_is_released_as_gone() {
    let stack = stack(slow_child(), |_| {}).await;
    let (id, prompt) = held_prompt(&stack, "bg-child").await;
    let deleted = send("DELETE", &format!("{}/session/{id}", stack.sim), None, None).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    let reply = prompt.await.unwrap();
    assert_eq!(reply.status, 410, "{}", reply.text());
    assert_eq!(reply.json()["error"]["kind"], "session_gone");
    // Nothing lists it busy any more.
    let status = send(
        "GET",
        &format!("{}/session/status", stack.proxy),
        None,
        None,
    )
    .await;
    assert!(status.json().get(&id).is_none(), "{}", status.text());
}

#[tokio::test]
async fn a_prompt_accepted_through_taskgate_counts_as_busy_until_it_starts() {
    let options = SimOptions {
        // Long enough that the reads below come before the runtime starts the prompt even on
        // a loaded machine (the real runtime was seen taking up to 15 s with plugin hooks).
        start_delay: Duration::from_secs(5),
        ..SimOptions::default()
    };
    let stack = stack(options, |_| {}).await;
    let id = prompt_async(&stack, "plain").await;
    let direct = send("GET", &format!("{}/session/status", stack.sim), None, None).await;
    let through = send(
        "GET",
        &format!("{}/session/status", stack.proxy),
        None,
        None,
    )
    .await;
    // The runtime itself says idle until it starts the prompt; taskgate says busy.
    assert!(direct.json().get(&id).is_none(), "{}", direct.text());
    assert_eq!(through.json()[&id]["type"], "busy", "{}", through.text());
    // Once the prompt has run, the session is idle both ways.
    until(
        &format!("{}/session/{id}/message", stack.sim),
        None,
        "the prompt's answer",
        |v| {
            v.as_array()
                .is_some_and(|m| m.iter().any(|m| m["info"]["role"] == "assistant"))
        },
    )
    .await;
    until(
        &format!("{}/session/status", stack.proxy),
        None,
        "the session idle through taskgate",
        |v| v.get(&id).is_none(),
    )
    .await;
}

#[tokio::test]
async fn a_missing_credential_uses_the_clients_and_does_not_hold_forever() {
    let options = SimOptions {
        password: Some(PASSWORD),
        ..SimOptions::default()
    };
    // taskgate has no credentials of its own.
    let stack = stack(options, |c| c.upstream_auth.password = None).await;
    let auth = basic();
    // Before any client came, the health view says the runtime refuses taskgate.
    let health = send(
        "GET",
        &format!("{}/_taskgate/health", stack.proxy),
        None,
        None,
    )
    .await;
    assert_eq!(health.status, 503, "{}", health.text());
    let reply = prompt(&stack, "bg-child", Some(&auth)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["x-taskgate-verdict"], "completed");
    assert!(
        reply.text().contains("FINAL: parent got the child result"),
        "{}",
        reply.text()
    );
    assert!(!reply.text().contains(PASSWORD));
}

#[tokio::test]
async fn refused_credentials_end_the_hold_with_an_error_at_once() {
    let options = SimOptions {
        password: Some(PASSWORD),
        ..SimOptions::default()
    };
    // taskgate's own password is wrong: its reads are refused whatever the client sends.
    let stack = stack(options, |c| {
        c.upstream_auth.password = Some("not-the-password".into());
    })
    .await;
    let auth = basic();
    let reply = prompt(&stack, "plain", Some(&auth)).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    let error = &reply.json()["error"];
    assert_eq!(error["kind"], "tree_unverifiable");
    assert!(
        error["message"].as_str().unwrap().contains("401"),
        "{error}"
    );
    assert!(!reply.text().contains("not-the-password"));
    let health = send(
        "GET",
        &format!("{}/_taskgate/health", stack.proxy),
        None,
        None,
    )
    .await;
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(health.text().contains("refused"), "{}", health.text());
}

#[tokio::test]
async fn a_long_hold_commits_its_headers_and_keeps_the_body_alive() {
    let stack = stack(slow_child(), |c| {
        c.gate.prompt_commit_after = HumanDuration(Duration::from_millis(200));
        c.gate.prompt_keepalive = HumanDuration(Duration::from_millis(100));
    })
    .await;
    let response = prompt_streamed(&stack, "bg-child").await;
    // The status line came before the release.
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-taskgate-verdict"], "pending");
    let body = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.starts_with(' '),
        "kept alive with whitespace: {text:?}"
    );
    let reply: Value = serde_json::from_slice(&body).expect("whitespace then one JSON document");
    let said: Vec<&str> = reply["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert_eq!(said, vec!["FINAL: parent got the child result"]);
}

#[tokio::test]
async fn a_committed_hold_that_ends_badly_cuts_the_body_instead_of_sending_the_premature_reply() {
    let stack = stack(slow_child(), |c| {
        c.gate.prompt_commit_after = HumanDuration(Duration::from_millis(100));
        c.gate.prompt_keepalive = HumanDuration(Duration::from_millis(50));
        c.gate.max_hold = HumanDuration(Duration::from_millis(600));
    })
    .await;
    let response = prompt_streamed(&stack, "bg-child").await;
    assert_eq!(response.headers()["x-taskgate-verdict"], "pending");
    let read = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("the body ends within the bound");
    assert!(read.is_err(), "the body must fail, not complete: {read:?}");
}

#[tokio::test]
async fn history_agrees_with_the_event_stream_after_an_abort() {
    let stack = stack(slow_child(), |_| {}).await;
    let id = prompt_async(&stack, "child-abort").await;
    let children = until(
        &format!("{}/session/{id}/children", stack.sim),
        None,
        "the child",
        |v| v.as_array().is_some_and(|c| !c.is_empty()),
    )
    .await;
    let child = children[0]["id"].as_str().unwrap().to_owned();
    until(
        &format!("{}/session/status", stack.sim),
        None,
        "the child busy",
        |v| v.get(&child).is_some(),
    )
    .await;
    let aborted = send(
        "POST",
        &format!("{}/session/{child}/abort", stack.sim),
        None,
        None,
    )
    .await;
    assert_eq!(aborted.status, 200);
    until(
        &format!("{}/session/status", stack.sim),
        None,
        "every session idle",
        |v| v.as_object().is_some_and(|m| m.is_empty()),
    )
    .await;
    let direct = send(
        "GET",
        &format!("{}/session/{id}/message", stack.sim),
        None,
        None,
    )
    .await;
    assert_eq!(
        sim::task_part(&direct.json())["state"]["status"],
        "completed"
    );
    let through = until(
        &format!("{}/session/{id}/message", stack.proxy),
        None,
        "the launch part rewritten",
        |v| sim::task_part(v)["state"]["status"] == "error",
    )
    .await;
    let part = sim::task_part(&through);
    assert_eq!(part["state"]["metadata"]["taskgate"]["verdict"], "aborted");
    assert_eq!(
        part["state"]["metadata"]["taskgate"]["original"]["status"],
        "completed"
    );
}
