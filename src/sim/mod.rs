//! The simulated OpenCode runtime: an HTTP server speaking the wire format of
//! `opencode-ai@1.18.33` (the routes, envelopes and JSON shapes of the recorded fixtures) whose
//! sessions play scripted scenarios. A prompt containing `SCENARIO:<name>` picks one (see
//! [`scenario`] and docs/sim.md). It exists so the bug can be shown, and the gate tested,
//! without a real runtime and a model.
//!
//! - `state`: the world (sessions, messages, parts, statuses) and the event bus, changed
//!   together so routes and events always agree.
//! - `scenario`: the scenarios as data.
//! - `engine`: the one interpreter of that data.
//! - `client`: a client doing what `opencode run --attach` does, recording what it believed.

pub mod client;
mod engine;
mod messages;
mod run;
pub mod scenario;
mod state;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;

use state::{Emitted, Sim, PROJECT_ID, VERSION};

#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// Multiplies every delay of a scenario.
    pub time_scale: f64,
    /// How long after `prompt_async` is answered the prompt starts (not scaled). The real
    /// runtime shows such a session idle for about a second, and for up to 15 s with
    /// oh-my-opencode's hooks running first.
    pub start_delay: Duration,
    /// Like `OPENCODE_SERVER_PASSWORD`: every route wants HTTP Basic `opencode:<password>`
    /// (or `?auth_token=base64(opencode:<password>)`) and answers 401 with an empty body.
    pub password: Option<&'static str>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            time_scale: 1.0,
            start_delay: Duration::ZERO,
            password: None,
        }
    }
}

/// How often `/event` sends `server.heartbeat`, like the runtime (not scaled).
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Serves the simulated runtime on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    options: SimOptions,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let sim = Sim::new(options, shutdown.child_token());
    let names: Vec<&str> = scenario::all().iter().map(|s| s.name).collect();
    tracing::info!(
        time_scale = options.time_scale,
        "sim ready; a prompt picks a scenario with {}<name>, one of: {}",
        scenario::MARKER,
        names.join(", ")
    );
    let mut app = router(sim.clone());
    if let Some(password) = options.password {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("opencode:{password}"))
        );
        app = app.layer(axum::middleware::from_fn(move |req, next| {
            authorize(expected.clone(), req, next)
        }));
    }
    let stop = shutdown.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    // Stop every session loop and event stream still running.
    sim.shutdown.cancel();
    served
}

/// The runtime's password check: Basic credentials or `?auth_token=`, else 401, empty body.
async fn authorize(
    expected: String,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header_ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
    let token_ok = req.uri().query().is_some_and(|q| {
        q.split('&')
            .filter_map(|pair| pair.strip_prefix("auth_token="))
            .any(|token| Some(token) == expected.strip_prefix("Basic "))
    });
    if header_ok || token_ok {
        next.run(req).await
    } else {
        StatusCode::UNAUTHORIZED.into_response()
    }
}

fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/global/health", get(health))
        .route("/global/event", get(global_events))
        .route("/event", get(events))
        .route("/config", get(config))
        .route("/session", get(list_sessions).post(create_session))
        .route("/session/status", get(statuses))
        .route("/session/{id}", get(get_session).delete(delete_session))
        .route("/session/{id}/children", get(children))
        .route("/session/{id}/message", get(messages).post(prompt_sync))
        .route("/session/{id}/message/{mid}", get(message))
        .route("/session/{id}/prompt_async", post(prompt_async))
        .route("/session/{id}/abort", post(abort))
        .fallback(not_found_route)
        .with_state(sim)
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn ok(value: &Value) -> Response {
    json_response(StatusCode::OK, value)
}

/// The runtime's 404 body.
fn not_found(message: String) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"name": "NotFoundError", "data": {"message": message}}),
    )
}

fn session_not_found(id: &str) -> Response {
    not_found(format!("Session not found: {id}"))
}

fn bad_request(message: String) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"name": "BadRequest", "data": {"message": message}}),
    )
}

async fn not_found_route(uri: axum::http::Uri) -> Response {
    not_found(format!("Route not found: {}", uri.path()))
}

async fn health() -> Response {
    ok(&json!({"healthy": true, "version": VERSION}))
}

async fn config() -> Response {
    ok(
        &json!({"$schema": "https://opencode.ai/config.json", "model": "sim/scripted",
        "share": "disabled", "autoupdate": false}),
    )
}

/// A request body as JSON; an empty body is `{}`.
fn body_json(body: &Bytes) -> Result<Value, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

async fn create_session(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let body = match body_json(&body) {
        Ok(b) => b,
        Err(e) => return bad_request(e),
    };
    let parent = body["parentID"].as_str();
    if let Some(parent) = parent {
        if sim.lock().session(parent).is_none() {
            return session_not_found(parent);
        }
    }
    let title = body["title"].as_str().map(str::to_owned);
    ok(&engine::create_session(&sim, parent, title, None))
}

async fn list_sessions(State(sim): State<Arc<Sim>>) -> Response {
    // Descending ids: ascending order of the keys is newest first.
    let st = sim.lock();
    let list: Vec<Value> = st.sessions.values().map(|s| s.info.clone()).collect();
    ok(&Value::Array(list))
}

async fn statuses(State(sim): State<Arc<Sim>>) -> Response {
    let st = sim.lock();
    let map: serde_json::Map<String, Value> = st
        .statuses
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ok(&Value::Object(map))
}

async fn get_session(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    match sim.lock().session(&id) {
        Some(s) => ok(&s.info),
        None => session_not_found(&id),
    }
}

async fn delete_session(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    if engine::delete_session(&sim, &id) {
        ok(&json!(true))
    } else {
        session_not_found(&id)
    }
}

async fn children(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    let st = sim.lock();
    if st.session(&id).is_none() {
        return session_not_found(&id);
    }
    ok(&Value::Array(st.children(&id)))
}

/// The value of `name` in a query string.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Oldest first; `before=<msg id>` keeps older messages, `limit=N` the newest N of those.
async fn messages(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let limit = match query_param(query.as_deref(), "limit").map(str::parse::<usize>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return bad_request("limit must be a number".to_owned()),
    };
    let before = query_param(query.as_deref(), "before");
    let st = sim.lock();
    let Some(rec) = st.session(&id) else {
        return session_not_found(&id);
    };
    let kept: Vec<Value> = rec
        .messages
        .iter()
        .filter(|m| before.is_none_or(|b| m.info["id"].as_str().is_some_and(|id| id < b)))
        .map(|m| m.to_json())
        .collect();
    let skip = limit.map_or(0, |n| kept.len().saturating_sub(n));
    ok(&Value::Array(kept.into_iter().skip(skip).collect()))
}

async fn message(State(sim): State<Arc<Sim>>, Path((id, mid)): Path<(String, String)>) -> Response {
    let mut st = sim.lock();
    if st.session(&id).is_none() {
        return session_not_found(&id);
    }
    match st.message_mut(&id, &mid) {
        Some(m) => ok(&m.to_json()),
        None => not_found(format!("Message not found: {mid}")),
    }
}

/// The text of a prompt body's text parts.
fn prompt_text(body: &Value) -> String {
    body["parts"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Blocks until the session's agent loop ends, then returns its last assistant message, like
/// the runtime: for a background launch that is right after the parent's first turn.
async fn prompt_sync(State(sim): State<Arc<Sim>>, Path(id): Path<String>, body: Bytes) -> Response {
    let body = match body_json(&body) {
        Ok(b) => b,
        Err(e) => return bad_request(e),
    };
    let (tx, rx) = oneshot::channel();
    if engine::prompt(&sim, &id, &prompt_text(&body), Some(tx)).is_err() {
        return session_not_found(&id);
    }
    match rx.await {
        Ok(outcome) => ok(&outcome.message.unwrap_or_else(|| json!({}))),
        Err(_) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"name": "UnknownError", "data": {"message": "the session's loop stopped"}}),
        ),
    }
}

async fn prompt_async(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let body = match body_json(&body) {
        Ok(b) => b,
        Err(e) => return bad_request(e),
    };
    let delay = sim.options.start_delay;
    if !delay.is_zero() {
        // Accepted now, started later: what a real runtime does while plugin hooks run.
        if !engine::exists(&sim, &id) {
            return session_not_found(&id);
        }
        let text = prompt_text(&body);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = engine::prompt(&sim, &id, &text, None);
        });
        return StatusCode::NO_CONTENT.into_response();
    }
    match engine::prompt(&sim, &id, &prompt_text(&body), None) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => session_not_found(&id),
    }
}

async fn abort(State(sim): State<Arc<Sim>>, Path(id): Path<String>) -> Response {
    match engine::abort(&sim, &id) {
        Ok(()) => ok(&json!(true)),
        Err(_) => session_not_found(&id),
    }
}

/// Which event route a stream serves.
#[derive(Clone, Copy)]
enum Flavor {
    /// `/event`: bare era-C envelopes.
    Directory,
    /// `/global/event`: `{directory, project, payload}`, plus `sync` mirrors.
    Global,
}

fn sse_line(value: &Value) -> String {
    format!("data: {value}\n\n")
}

/// The frames one event becomes on a route.
fn frames(sim: &Sim, flavor: Flavor, event: &Emitted) -> String {
    match flavor {
        Flavor::Directory => sse_line(&event.envelope()),
        Flavor::Global => {
            let mut out = sse_line(&json!({"directory": sim.directory, "project": PROJECT_ID,
                "payload": event.envelope()}));
            if let Some((kind, seq, aggregate)) = &event.sync {
                out.push_str(&sse_line(
                    &json!({"directory": sim.directory, "project": PROJECT_ID,
                    "payload": {"id": event.id, "type": "sync", "syncEvent": {"id": event.id, "type": kind,
                        "seq": seq, "aggregateID": aggregate, "data": event.properties}}}),
                ));
            }
            out
        }
    }
}

/// A server-only event (`server.connected`, `server.heartbeat`): unwrapped on `/global/event`
/// but for `payload`, as recorded.
fn server_event(sim: &Sim, flavor: Flavor, kind: &str) -> String {
    let envelope = json!({"id": sim.event_id(), "type": kind, "properties": {}});
    match flavor {
        Flavor::Directory => sse_line(&envelope),
        Flavor::Global => sse_line(&json!({"payload": envelope})),
    }
}

async fn events(State(sim): State<Arc<Sim>>) -> Response {
    event_stream(sim, Flavor::Directory)
}

async fn global_events(State(sim): State<Arc<Sim>>) -> Response {
    event_stream(sim, Flavor::Global)
}

struct StreamState {
    sim: Arc<Sim>,
    flavor: Flavor,
    rx: broadcast::Receiver<Arc<Emitted>>,
    heartbeat: tokio::time::Interval,
    connected: bool,
}

fn event_stream(sim: Arc<Sim>, flavor: Flavor) -> Response {
    // Subscribe before answering, so nothing emitted after the response starts is missed.
    let rx = sim.subscribe();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = StreamState {
        sim,
        flavor,
        rx,
        heartbeat,
        connected: false,
    };
    let stream = futures_util::stream::unfold(start, |mut s| async move {
        if !s.connected {
            s.connected = true;
            // The interval's first tick is immediate: spend it on `server.connected`.
            s.heartbeat.tick().await;
            let frame = server_event(&s.sim, s.flavor, "server.connected");
            return Some((Ok::<_, std::convert::Infallible>(Bytes::from(frame)), s));
        }
        loop {
            let frame = tokio::select! {
                _ = s.sim.shutdown.cancelled() => return None,
                _ = s.heartbeat.tick() => server_event(&s.sim, s.flavor, "server.heartbeat"),
                r = s.rx.recv() => match r {
                    Ok(event) => frames(&s.sim, s.flavor, &event),
                    // Like newer runtimes, a reader too slow loses the oldest events.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "sim event subscriber lagged");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            };
            return Some((Ok(Bytes::from(frame)), s));
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
