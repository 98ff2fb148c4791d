//! A scripted OpenAI-compatible model provider for driving the real OpenCode runtime offline.
//!
//! The runtime talks to it through `@ai-sdk/openai-compatible` (`GET /v1/models`,
//! `POST /v1/chat/completions`, streamed). What the "model" answers is decided by marker words in
//! the conversation, so a test states the scenario in its prompt and nothing else:
//!
//! - Parent prompts: every `@bg(<child prompt>)` becomes one `task` call with `background: true`,
//!   every `@fg(<child prompt>)` one foreground `task` call; all calls go out in one step.
//!   After the tool results the parent ends its turn with [`PARENT_LAUNCHED`] (background) or
//!   [`PARENT_FINAL`] (foreground). Each injected `<task … state="…">` message is answered with
//!   [`PARENT_WAITING`] until every background child reported, then with [`PARENT_FINAL`] followed
//!   by the reported states (`completed=N error=M`).
//! - Child prompts: `CHILD-WORK-<N>S` holds the streamed reply open N seconds before answering
//!   [`CHILD_DONE`]; `CHILD-HOLD-<name>` holds it until the test calls [`ScriptedProvider::release`]
//!   (bounded by [`MAX_HOLD`]); `CHILD-FAIL` answers HTTP 400 so the runtime records a
//!   non-retryable `APIError`.
//! - oh-my-opencode scenario ([`OmoTurn`], the plugin's own tools): a root prompt with
//!   `OMO-PARENT-<name>` calls `task` (category `quick`, in the background) with a child prompt
//!   `OMO-CHILD-<name>`, then `background_output` (blocking) on the `bg_…` id the launch returned,
//!   then answers [`OMO_PARENT_READ`]; any later prompt (the plugin's wakes) gets
//!   [`OMO_PARENT_NOTED`]. The child calls `call_omo_agent` (`explore`, in the background) with a
//!   grandchild prompt `CHILD-HOLD-<name>`, ends its turn with [`OMO_CHILD_PARTIAL`], and answers
//!   [`OMO_CHILD_FINAL`] when woken. The grandchild is an ordinary `CHILD-HOLD-<name>` child.
//!   With `OMO-WAKE-<name>` instead, the root launches the same child and ends its turn at once
//!   with [`OMO_PARENT_LAUNCHED`] (it never calls `background_output`): it learns of the child
//!   only through the plugin's wakes, each answered with [`OMO_PARENT_NOTED`].
//!   A `<name>` that starts with `solo` gives a child with no grandchild (it answers
//!   [`OMO_CHILD_FINAL`] at once); one that starts with `fail` gives a child whose model request
//!   fails like `CHILD-FAIL`.
//! - Native nesting: a child prompt `NEST-<name>` (e.g. `@bg(NEST-n1)`) makes that child a parent
//!   in turn: it launches one background grandchild `CHILD-HOLD-<name>` and then behaves like any
//!   parent above.
//! - Anything else is answered plainly with [`PLAIN_ANSWER`]; requests without tools (the title
//!   request) get a short title.
//!
//! Every request is recorded with its raw body so tests can assert what reached the model.

#![allow(dead_code)] // Each test binary uses a different part of the support code.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// The model id the runtime is configured with (`mock/scripted`).
pub const MODEL_ID: &str = "scripted";
/// The parent's answer once all its background children were launched.
pub const PARENT_LAUNCHED: &str = "LAUNCHED: background children started, ending my turn.";
/// The parent's answer to an injected result while other children are still out.
pub const PARENT_WAITING: &str = "WAITING: not every child reported yet.";
/// The parent's last answer, after every child reported (or a foreground child returned).
pub const PARENT_FINAL: &str = "FINAL: parent got the child result";
/// A child's answer after its work.
pub const CHILD_DONE: &str = "CHILD-DONE: the work is finished.";
/// The answer to a prompt with no marker.
pub const PLAIN_ANSWER: &str = "PLAIN: hello from the scripted model.";
/// The error message of a failing child; the runtime shows it in the injected `state="error"`.
pub const CHILD_FAIL_MESSAGE: &str = "scripted failure: the child could not do its work";
/// The oh-my-opencode child's answer when it ends its first turn, before its grandchild is done.
pub const OMO_CHILD_PARTIAL: &str = "partial: my grandchild's result is not in yet";
/// The oh-my-opencode child's answer once woken by its grandchild's completion: its real result.
pub const OMO_CHILD_FINAL: &str = "CHILD-FINAL: the grandchild reported, here is the real answer";
/// The oh-my-opencode parent's answer after reading `background_output`.
pub const OMO_PARENT_READ: &str = "PARENT-READ: I read the background result.";
/// The oh-my-opencode parent's answer right after launching, in wake mode.
pub const OMO_PARENT_LAUNCHED: &str = "PARENT-LAUNCHED: the child runs in the background.";
/// The oh-my-opencode parent's answer to any later prompt (the plugin's wakes).
pub const OMO_PARENT_NOTED: &str = "PARENT-NOTED: noted.";
/// Upper bound for `CHILD-HOLD-*` so a forgotten release cannot hang a test run forever.
pub const MAX_HOLD: Duration = Duration::from_secs(120);

/// What the provider decided a request was; recorded with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// No tools offered: the runtime's title (or other utility) request.
    Title,
    /// The parent's first step: it calls `task` once per `@bg(...)`/`@fg(...)`.
    ParentLaunch {
        background: usize,
        foreground: usize,
    },
    /// The parent after its tool results.
    ParentAfterTools,
    /// The parent answering an injected `<task … state=…>` message.
    ParentInjected { reported: usize, expected: usize },
    /// A child working for a fixed time.
    ChildWork(Duration),
    /// A child held until released by the test.
    ChildHold(String),
    /// A child that fails.
    ChildFail,
    /// A plain conversation.
    Plain,
    /// A step of the oh-my-opencode scenario.
    Omo(OmoTurn),
}

/// The steps of the oh-my-opencode scenario (see the module docs), by who asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OmoTurn {
    /// Root, first step: `task({category:"quick", run_in_background:true, …})`.
    ParentLaunch { name: String },
    /// Root after the launch result: `background_output({task_id, block:true, timeout:120000})`.
    ParentPoll { task_id: String },
    /// Root after the `background_output` result (the claim under test).
    ParentRead,
    /// Root in wake mode after the launch result: ends its turn with [`OMO_PARENT_LAUNCHED`].
    ParentLaunched,
    /// Root answering anything later (the plugin's wakes).
    ParentWake,
    /// Child (Sisyphus-Junior), first step: `call_omo_agent({subagent_type:"explore", …})`.
    ChildLaunch { name: String },
    /// Child after the launch result: ends its turn with [`OMO_CHILD_PARTIAL`].
    ChildPartial,
    /// Child woken later, or a `solo` child at once: [`OMO_CHILD_FINAL`].
    ChildFinal,
    /// A `fail` child: its model request fails (HTTP 400), like `CHILD-FAIL`.
    ChildFail,
}

/// One request the provider received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    /// The body exactly as received.
    pub raw_body: Bytes,
    /// The body parsed as JSON (`Value::Null` when it was not JSON).
    pub body: Value,
    pub turn: Option<Turn>,
    pub received: Instant,
}

impl RecordedRequest {
    /// The concatenated text of every message of `role` in a chat-completions body.
    pub fn text_of_role(&self, role: &str) -> String {
        messages(&self.body)
            .iter()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some(role))
            .map(content_text)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Names of the tools offered to the model.
    pub fn tool_names(&self) -> Vec<String> {
        tool_names(&self.body)
    }
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    /// Signalled on every recorded request, so tests can wait for one without sleeping.
    recorded: Notify,
    holds: Mutex<HashMap<String, Arc<Notify>>>,
    released: Mutex<Vec<String>>,
    counter: Mutex<u64>,
}

impl Shared {
    fn hold(&self, name: &str) -> Arc<Notify> {
        let mut holds = self.holds.lock().unwrap();
        holds.entry(name.to_string()).or_default().clone()
    }

    fn is_released(&self, name: &str) -> bool {
        self.released.lock().unwrap().iter().any(|n| n == name)
    }

    fn next_id(&self) -> u64 {
        let mut c = self.counter.lock().unwrap();
        *c += 1;
        *c
    }
}

/// The running provider; stops when dropped.
pub struct ScriptedProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl ScriptedProvider {
    /// Serves on 127.0.0.1:0.
    pub async fn start() -> ScriptedProvider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let shutdown = CancellationToken::new();
        let app = Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .fallback(unknown)
            .with_state(shared.clone());
        let token = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .unwrap();
        });
        ScriptedProvider {
            addr,
            shared,
            shutdown,
        }
    }

    /// The base URL the runtime's `options.baseURL` points at (ends in `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The chat-completion requests so far, oldest first.
    pub fn chat_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == "/v1/chat/completions")
            .collect()
    }

    /// One line per chat request: the turn it was taken for and the start of its last message
    /// (for failure messages: it shows how the runtime phrased what it sent).
    pub fn describe(&self) -> String {
        self.chat_requests()
            .iter()
            .map(|r| {
                let last = messages(&r.body)
                    .last()
                    .map(|m| m.to_string().chars().take(300).collect::<String>())
                    .unwrap_or_default();
                format!("{:?} <- {last}", r.turn)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Lets every child held with `CHILD-HOLD-<name>` answer (now or when it arrives later).
    pub fn release(&self, name: &str) {
        self.shared.released.lock().unwrap().push(name.to_string());
        self.shared.hold(name).notify_waiters();
    }

    /// Waits until `pred` holds for the recorded requests, or panics after `deadline`.
    pub async fn wait_for(
        &self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&[RecordedRequest]) -> bool,
    ) {
        if !self.arrives_within(deadline, pred).await {
            let turns: Vec<_> = self.requests().into_iter().map(|r| r.turn).collect();
            panic!(
                "provider: timed out after {deadline:?} waiting for {what}; turns seen: {turns:?}"
            );
        }
    }

    /// Whether `pred` comes to hold for the recorded requests within `window`: for asserting
    /// that something does *not* reach the model while a condition lasts.
    pub async fn arrives_within(
        &self,
        window: Duration,
        pred: impl Fn(&[RecordedRequest]) -> bool,
    ) -> bool {
        let end = Instant::now() + window;
        loop {
            let notified = self.shared.recorded.notified();
            if pred(&self.shared.requests.lock().unwrap()) {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                return false;
            }
        }
    }
}

impl Drop for ScriptedProvider {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn models() -> Response {
    json_response(
        StatusCode::OK,
        json!({
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "taskgate-tests"}]
        }),
    )
}

fn json_response(status: StatusCode, body: Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn unknown(
    State(shared): State<Arc<Shared>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    record(&shared, method.as_str(), uri.path(), headers, body, None);
    StatusCode::NOT_FOUND
}

fn record(
    shared: &Shared,
    method: &str,
    path: &str,
    headers: HeaderMap,
    raw_body: Bytes,
    turn: Option<Turn>,
) {
    let body = serde_json::from_slice(&raw_body).unwrap_or(Value::Null);
    shared.requests.lock().unwrap().push(RecordedRequest {
        method: method.to_string(),
        path: path.to_string(),
        headers,
        raw_body,
        body,
        turn,
        received: Instant::now(),
    });
    shared.recorded.notify_waiters();
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, raw: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let turn = classify(&body);
    record(
        &shared,
        "POST",
        "/v1/chat/completions",
        headers,
        raw,
        Some(turn.clone()),
    );
    let id = shared.next_id();
    match turn {
        Turn::ChildFail | Turn::Omo(OmoTurn::ChildFail) => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": CHILD_FAIL_MESSAGE, "type": "invalid_request_error", "code": "scripted_failure"}}),
        ),
        Turn::Title => stream(id, vec![Step::Text("Scripted session".into())], None),
        Turn::Plain => stream(id, vec![Step::Text(PLAIN_ANSWER.into())], None),
        Turn::ParentLaunch { .. } => stream(id, vec![Step::ToolCalls(task_calls(&body, id))], None),
        Turn::Omo(omo) => stream(id, vec![omo_step(&omo, id)], None),
        Turn::ParentAfterTools => {
            let text = if launched_counts(&body).0 > 0 {
                PARENT_LAUNCHED.to_string()
            } else {
                PARENT_FINAL.to_string()
            };
            stream(id, vec![Step::Text(text)], None)
        }
        Turn::ParentInjected { reported, expected } => {
            let text = if reported < expected {
                PARENT_WAITING.to_string()
            } else {
                let (completed, error) = injected_states(&body);
                format!("{PARENT_FINAL} (completed={completed} error={error})")
            };
            stream(id, vec![Step::Text(text)], None)
        }
        Turn::ChildWork(d) => stream(id, vec![Step::Text(CHILD_DONE.into())], Some(Wait::For(d))),
        Turn::ChildHold(name) => {
            let wait = if shared.is_released(&name) {
                None
            } else {
                Some(Wait::Until(shared.hold(&name)))
            };
            stream(id, vec![Step::Text(CHILD_DONE.into())], wait)
        }
    }
}

enum Step {
    Text(String),
    /// `(call id, tool name, arguments)` each.
    ToolCalls(Vec<(String, String, Value)>),
}

/// What the "model" waits for after its first chunk (the child's work).
enum Wait {
    For(Duration),
    Until(Arc<Notify>),
}

/// A streamed chat completion that always ends with `data: [DONE]` and closes.
fn stream(id: u64, steps: Vec<Step>, wait: Option<Wait>) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Option<&str>| {
            let v = json!({
                "id": format!("chatcmpl-{id}"),
                "object": "chat.completion.chunk",
                "created": 0,
                "model": MODEL_ID,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            });
            Bytes::from(format!("data: {v}\n\n"))
        };
        // Errors below mean the runtime hung up (e.g. an abort): nothing left to say.
        if tx
            .send(chunk(json!({"role": "assistant", "content": ""}), None))
            .await
            .is_err()
        {
            return;
        }
        match wait {
            Some(Wait::For(d)) => tokio::time::sleep(d).await,
            Some(Wait::Until(n)) => {
                let _ = tokio::time::timeout(MAX_HOLD, n.notified()).await;
            }
            None => {}
        }
        let mut finish = "stop";
        for step in steps {
            match step {
                Step::Text(t) => {
                    let _ = tx.send(chunk(json!({"content": t}), None)).await;
                }
                Step::ToolCalls(calls) => {
                    finish = "tool_calls";
                    for (i, (call_id, name, args)) in calls.into_iter().enumerate() {
                        let delta = json!({"tool_calls": [{
                            "index": i, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": args.to_string()}
                        }]});
                        let _ = tx.send(chunk(delta, None)).await;
                    }
                }
            }
        }
        let last = json!({
            "id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": 0,
            "model": MODEL_ID,
            "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        });
        let _ = tx.send(Bytes::from(format!("data: {last}\n\n"))).await;
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    }));
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap()
}

fn messages(body: &Value) -> &[Value] {
    body.get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// Text of a message whose `content` is a string or a list of `{type:"text", text}` parts.
fn content_text(m: &Value) -> String {
    match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn tool_names(body: &Value) -> Vec<String> {
    body.get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The `(background, foreground)` child prompts in `text`, in order: `@bg(...)` / `@fg(...)`.
pub fn child_prompts(text: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find(['@']) {
        rest = &rest[pos..];
        let background = if rest.starts_with("@bg(") {
            true
        } else if rest.starts_with("@fg(") {
            false
        } else {
            rest = &rest[1..];
            continue;
        };
        let inner = &rest[4..];
        match inner.find(')') {
            Some(end) => {
                out.push((background, inner[..end].to_string()));
                rest = &inner[end + 1..];
            }
            None => break,
        }
    }
    out
}

/// The children a conversation whose first user text is `text` launches: its `@bg`/`@fg`
/// prompts, or for a nesting child (`NEST-<name>`) one background `CHILD-HOLD-<name>`.
fn launches_of(text: &str) -> Vec<(bool, String)> {
    let prompts = child_prompts(text);
    if !prompts.is_empty() {
        return prompts;
    }
    match marker_value(text, "NEST-") {
        Some(name) => vec![(true, format!("CHILD-HOLD-{name} nested work"))],
        None => Vec::new(),
    }
}

fn first_user_text(body: &Value) -> String {
    messages(body)
        .iter()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(content_text)
        .unwrap_or_default()
}

/// How many background and foreground children the parent conversation launches.
fn launched_counts(body: &Value) -> (usize, usize) {
    let prompts = launches_of(&first_user_text(body));
    let bg = prompts.iter().filter(|(bg, _)| *bg).count();
    (bg, prompts.len() - bg)
}

/// Injected child reports seen so far, as (completed, error) counts.
fn injected_states(body: &Value) -> (usize, usize) {
    let mut completed = 0;
    let mut error = 0;
    for m in messages(body) {
        if m.get("role").and_then(Value::as_str) != Some("user") {
            continue;
        }
        let text = content_text(m);
        // 1.18 era: `<task id=… state="completed">`; 1.15 era: `task_id: …\nstate: completed`.
        completed += text.matches("state=\"completed\"").count();
        completed += text.matches("\nstate: completed").count();
        error += text.matches("state=\"error\"").count();
        error += text.matches("\nstate: error").count();
    }
    (completed, error)
}

fn task_calls(body: &Value, id: u64) -> Vec<(String, String, Value)> {
    launches_of(&first_user_text(body))
        .into_iter()
        .enumerate()
        .map(|(i, (background, prompt))| {
            let mut args = json!({
                "description": format!("scripted child {}", i + 1),
                "prompt": prompt,
                "subagent_type": "general",
            });
            if background {
                args["background"] = json!(true);
            }
            (format!("call_{id}_{i}"), "task".to_string(), args)
        })
        .collect()
}

/// What the "model" does at one step of the oh-my-opencode scenario.
fn omo_step(turn: &OmoTurn, id: u64) -> Step {
    let call = |name: &str, args: Value| {
        Step::ToolCalls(vec![(format!("call_{id}_0"), name.to_string(), args)])
    };
    match turn {
        OmoTurn::ParentLaunch { name } => call(
            "task",
            json!({
                "category": "quick",
                "run_in_background": true,
                "load_skills": [],
                "description": "child task",
                "prompt": format!("OMO-CHILD-{name}: launch an explore agent, then stop."),
            }),
        ),
        OmoTurn::ParentPoll { task_id } => call(
            "background_output",
            json!({"task_id": task_id, "block": true, "timeout": 120000}),
        ),
        OmoTurn::ChildLaunch { name } => call(
            "call_omo_agent",
            json!({
                "subagent_type": "explore",
                "run_in_background": true,
                "description": "grandchild",
                "prompt": format!("CHILD-HOLD-{name} explore the code base."),
            }),
        ),
        OmoTurn::ParentRead => Step::Text(OMO_PARENT_READ.into()),
        OmoTurn::ParentLaunched => Step::Text(OMO_PARENT_LAUNCHED.into()),
        OmoTurn::ParentWake => Step::Text(OMO_PARENT_NOTED.into()),
        OmoTurn::ChildPartial => Step::Text(OMO_CHILD_PARTIAL.into()),
        OmoTurn::ChildFinal => Step::Text(OMO_CHILD_FINAL.into()),
        OmoTurn::ChildFail => unreachable!("a failing child is answered with HTTP 400"),
    }
}

/// The oh-my-opencode step a request is, by the markers in its user texts (the plugin appends
/// its own lines to prompts, so every user text is searched, not only the first) and by what the
/// conversation called last.
fn omo_turn(body: &Value) -> Option<OmoTurn> {
    let msgs = messages(body);
    let users = msgs
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(content_text)
        .collect::<Vec<_>>()
        .join("\n");
    let last = msgs.last();
    let after_tool = last.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("tool");
    let last_call = msgs
        .iter()
        .rev()
        .filter_map(|m| m.get("tool_calls").and_then(Value::as_array))
        .find_map(|calls| calls.last())
        .and_then(|c| c.pointer("/function/name"))
        .and_then(Value::as_str);
    if let Some(name) = marker_value(&users, "OMO-PARENT-") {
        return Some(match (last_call, after_tool) {
            (None, _) => OmoTurn::ParentLaunch { name },
            (Some("task"), true) => OmoTurn::ParentPoll {
                task_id: last
                    .map(content_text)
                    .as_deref()
                    .and_then(bg_task_id)
                    .unwrap_or_default(),
            },
            (Some("background_output"), true) => OmoTurn::ParentRead,
            _ => OmoTurn::ParentWake,
        });
    }
    if let Some(name) = marker_value(&users, "OMO-WAKE-") {
        return Some(match (last_call, after_tool) {
            (None, _) => OmoTurn::ParentLaunch { name },
            (Some("task"), true) => OmoTurn::ParentLaunched,
            _ => OmoTurn::ParentWake,
        });
    }
    if let Some(name) = marker_value(&users, "OMO-CHILD-") {
        return Some(match (last_call, after_tool) {
            (None, _) if name.starts_with("fail") => OmoTurn::ChildFail,
            (None, _) if name.starts_with("solo") => OmoTurn::ChildFinal,
            (None, _) => OmoTurn::ChildLaunch { name },
            (Some(_), true) => OmoTurn::ChildPartial,
            _ => OmoTurn::ChildFinal,
        });
    }
    None
}

/// The first `bg_<hex>` task id in `text` (oh-my-opencode's launch result).
pub fn bg_task_id(text: &str) -> Option<String> {
    let start = text.find("bg_")?;
    let hex: String = text[start + 3..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    (!hex.is_empty()).then(|| format!("bg_{hex}"))
}

/// Decides what kind of turn a chat-completions request is.
pub fn classify(body: &Value) -> Turn {
    if tool_names(body).is_empty() {
        return Turn::Title;
    }
    if let Some(turn) = omo_turn(body) {
        return Turn::Omo(turn);
    }
    let first = first_user_text(body);
    let prompts = launches_of(&first);
    if !prompts.is_empty() {
        let last = messages(body).last();
        let last_role = last.and_then(|m| m.get("role")).and_then(Value::as_str);
        let last_text = last.map(content_text).unwrap_or_default();
        let launched = messages(body)
            .iter()
            .any(|m| m.get("tool_calls").is_some_and(|c| !c.is_null()));
        return match last_role {
            Some("tool") => Turn::ParentAfterTools,
            // Anything after the launch is a report; a script must never launch twice.
            Some("user") if launched || last_text.contains("<task ") => {
                let (c, e) = injected_states(body);
                Turn::ParentInjected {
                    reported: c + e,
                    expected: launched_counts(body).0,
                }
            }
            _ => {
                let (background, foreground) = launched_counts(body);
                Turn::ParentLaunch {
                    background,
                    foreground,
                }
            }
        };
    }
    if first.contains("CHILD-FAIL") {
        return Turn::ChildFail;
    }
    if let Some(name) = marker_value(&first, "CHILD-HOLD-") {
        return Turn::ChildHold(name);
    }
    if let Some(secs) = marker_value(&first, "CHILD-WORK-")
        .and_then(|v| v.strip_suffix('S').map(str::to_string))
        .and_then(|n| n.parse::<u64>().ok())
    {
        return Turn::ChildWork(Duration::from_secs(secs));
    }
    Turn::Plain
}

/// The word following `prefix` in `text` (letters, digits, `_`).
fn marker_value(text: &str, prefix: &str) -> Option<String> {
    let start = text.find(prefix)? + prefix.len();
    let value: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!value.is_empty()).then_some(value)
}
