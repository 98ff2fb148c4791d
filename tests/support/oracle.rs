//! A scripted OpenCode runtime for the oracle's tests: the read routes and `/global/event`,
//! serving state the test sets, counting the reads it gets, able to drop its event streams,
//! fail its status map, and demand credentials.
#![allow(dead_code)] // Each test binary uses a different part of it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Response, StatusCode, Uri};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

pub const PARENT: &str = "ses_df4c7ac0effeZp1S7fWTeAToXq";
pub const CHILD: &str = "ses_df4c7ab9bffecks0CL3iL16K45";
pub const FINAL_TEXT: &str = "FINAL: parent got the child result";

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/opencode-1.18.33/background-subagent/",
            $name
        ))
    };
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("fixture is JSON")
}

/// What the double serves.
#[derive(Default, Clone)]
pub struct Data {
    pub statuses: Value,
    pub sessions: HashMap<String, Value>,
    pub children: HashMap<String, Vec<Value>>,
    pub messages: HashMap<String, Vec<Value>>,
}

impl Data {
    /// The recorded run while the background child works (the parent already said "launched").
    pub fn child_busy() -> Data {
        Data::recorded(
            fixture!("parent-messages-while-child-busy.json"),
            fixture!("child-messages-while-busy.json"),
            fixture!("status-while-child-busy.json"),
        )
    }

    /// The recorded run after the parent answered the injected result.
    pub fn all_done() -> Data {
        Data::recorded(
            fixture!("parent-messages-after.json"),
            fixture!("child-messages-after.json"),
            fixture!("status-after.json"),
        )
    }

    fn recorded(parent_messages: &str, child_messages: &str, status: &str) -> Data {
        let child = parse(fixture!("child-session.json"));
        let parent = json!({"id": PARENT, "directory": "/home/dev/project", "title": "parent",
            "agent": "build", "time": {"created": 1, "updated": 2}});
        let list = |v: Value| v.as_array().cloned().unwrap_or_default();
        Data {
            statuses: parse(status),
            sessions: HashMap::from([
                (PARENT.to_owned(), parent),
                (CHILD.to_owned(), child.clone()),
            ]),
            children: HashMap::from([(PARENT.to_owned(), vec![child])]),
            messages: HashMap::from([
                (PARENT.to_owned(), list(parse(parent_messages))),
                (CHILD.to_owned(), list(parse(child_messages))),
            ]),
        }
    }
}

/// Counters and switches the test reads and flips.
pub struct Double {
    pub data: Mutex<Data>,
    pub status_reads: AtomicUsize,
    pub message_reads: AtomicUsize,
    pub event_connects: AtomicUsize,
    pub status_outage: AtomicBool,
    pub password: Option<String>,
    /// While set, a status read is answered only once the test opens this gate (`true`).
    pub status_gate: Mutex<Option<watch::Receiver<bool>>>,
    /// Every session read (`/session/:id`, `…/children`, `…/message`), as it arrived.
    pub session_reads: Mutex<Vec<String>>,
    /// While set, a session read is answered only once the test opens this gate (`true`).
    pub session_gate: Mutex<Option<watch::Receiver<bool>>>,
    events: broadcast::Sender<String>,
    drops: watch::Sender<u64>,
}

impl Double {
    pub fn set(&self, data: Data) {
        *self.data.lock().unwrap() = data;
    }

    /// Sends one event (a runtime event object) on every open `/global/event` stream.
    pub fn emit(&self, payload: Value) {
        let wrapped =
            json!({"directory": "/home/dev/project", "project": "global", "payload": payload});
        let _ = self.events.send(wrapped.to_string());
    }

    /// Ends every open event stream (the runtime restarted, a proxy cut it, …).
    pub fn drop_streams(&self) {
        self.drops.send_modify(|g| *g += 1);
    }

    pub fn reads(&self) -> usize {
        self.status_reads.load(Ordering::SeqCst)
    }

    pub fn connects(&self) -> usize {
        self.event_connects.load(Ordering::SeqCst)
    }
}

pub struct Upstream {
    pub url: String,
    pub addr: SocketAddr,
    pub double: Arc<Double>,
    shutdown: CancellationToken,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Upstream {
    pub async fn start(data: Data, password: Option<&str>) -> Upstream {
        let double = Arc::new(Double {
            data: Mutex::new(data),
            status_reads: AtomicUsize::new(0),
            message_reads: AtomicUsize::new(0),
            event_connects: AtomicUsize::new(0),
            status_outage: AtomicBool::new(false),
            password: password.map(str::to_owned),
            status_gate: Mutex::new(None),
            session_reads: Mutex::new(Vec::new()),
            session_gate: Mutex::new(None),
            events: broadcast::channel(1024).0,
            drops: watch::channel(0).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let app = Router::new()
            .route("/global/health", get(health))
            .route("/global/event", get(events))
            .route("/session/status", get(statuses))
            .route("/session/{id}", get(session))
            .route("/session/{id}/children", get(children))
            .route("/session/{id}/message", get(messages).post(prompt))
            .with_state(double.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Upstream {
            url: format!("http://{addr}"),
            addr,
            double,
            shutdown,
        }
    }
}

impl Upstream {
    /// taskgate in front of this double (settle window 100 ms, poll interval 50 ms, then
    /// `tune`), until the returned token is cancelled; returns its URL.
    pub async fn behind_taskgate(
        &self,
        tune: impl FnOnce(&mut taskgate::config::Config),
    ) -> (String, CancellationToken) {
        let mut config = taskgate::config::Config::defaults();
        config.proxy.upstream = self.url.clone();
        config.gate.settle_window = taskgate::config::HumanDuration(Duration::from_millis(100));
        config.oracle.poll_interval = taskgate::config::HumanDuration(Duration::from_millis(50));
        tune(&mut config);
        let shutdown = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(taskgate::cmd::stack::run(
            listener,
            config,
            shutdown.clone(),
        ));
        (proxy, shutdown)
    }
}

/// Polls `condition` until it holds or `within` passes; panics with `what` then.
pub async fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

type Reply = Response<Body>;

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn denied(double: &Double, headers: &HeaderMap) -> Option<Reply> {
    let password = double.password.as_ref()?;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("opencode:{password}"))
    );
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    (given != Some(expected.as_str())).then(|| {
        Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .body(Body::empty())
            .unwrap()
    })
}

fn not_found(id: &str) -> Reply {
    json_reply(
        StatusCode::NOT_FOUND,
        &json!({"name": "NotFoundError", "data": {"message": format!("Session not found: {id}")}}),
    )
}

async fn health(State(d): State<Arc<Double>>, headers: HeaderMap) -> Reply {
    denied(&d, &headers).unwrap_or_else(|| {
        json_reply(
            StatusCode::OK,
            &json!({"healthy": true, "version": "1.18.33"}),
        )
    })
}

async fn statuses(State(d): State<Arc<Double>>, headers: HeaderMap) -> Reply {
    if let Some(r) = denied(&d, &headers) {
        return r;
    }
    d.status_reads.fetch_add(1, Ordering::SeqCst);
    let gate = d.status_gate.lock().unwrap().clone();
    if let Some(mut gate) = gate {
        let _ = gate.wait_for(|open| *open).await;
    }
    if d.status_outage.load(Ordering::SeqCst) {
        return json_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"name": "UnknownError"}),
        );
    }
    let body = d.data.lock().unwrap().statuses.clone();
    json_reply(StatusCode::OK, &body)
}

/// Notes a session read and holds it while the test's gate is closed.
async fn session_read(d: &Double, uri: &Uri) {
    d.session_reads.lock().unwrap().push(uri.path().to_owned());
    let gate = d.session_gate.lock().unwrap().clone();
    if let Some(mut gate) = gate {
        let _ = gate.wait_for(|open| *open).await;
    }
}

async fn session(
    State(d): State<Arc<Double>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Reply {
    if let Some(r) = denied(&d, &headers) {
        return r;
    }
    session_read(&d, &uri).await;
    let found = d.data.lock().unwrap().sessions.get(&id).cloned();
    found.map_or_else(|| not_found(&id), |s| json_reply(StatusCode::OK, &s))
}

async fn children(
    State(d): State<Arc<Double>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Reply {
    if let Some(r) = denied(&d, &headers) {
        return r;
    }
    session_read(&d, &uri).await;
    let data = d.data.lock().unwrap().clone();
    if !data.sessions.contains_key(&id) {
        return not_found(&id);
    }
    let list = data.children.get(&id).cloned().unwrap_or_default();
    json_reply(StatusCode::OK, &Value::Array(list))
}

/// Pages like the runtime: the newest `limit` messages older than `before`, oldest first.
/// `POST /session/:id/message`, answered at once with `content-encoding: gzip` whatever the
/// request asked (a runtime that compresses its JSON): the body starts with gzip's magic bytes,
/// so nothing that tried to read it as JSON could.
async fn prompt(State(d): State<Arc<Double>>, Path(id): Path<String>, headers: HeaderMap) -> Reply {
    if let Some(r) = denied(&d, &headers) {
        return r;
    }
    let last = d
        .data
        .lock()
        .unwrap()
        .messages
        .get(&id)
        .and_then(|m| m.last().cloned());
    let Some(last) = last else {
        return not_found(&id);
    };
    let mut framed = vec![0x1f, 0x8b];
    framed.extend_from_slice(last.to_string().as_bytes());
    axum::response::Response::builder()
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(axum::body::Body::from(framed))
        .unwrap()
}

async fn messages(
    State(d): State<Arc<Double>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Reply {
    if let Some(r) = denied(&d, &headers) {
        return r;
    }
    session_read(&d, &uri).await;
    let found = d.data.lock().unwrap().messages.get(&id).cloned();
    // Counted once the data is taken: a test that sees the count knows what was served.
    d.message_reads.fetch_add(1, Ordering::SeqCst);
    let Some(all) = found else {
        return not_found(&id);
    };
    let query: HashMap<String, String> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let end = query
        .get("before")
        .and_then(|b| all.iter().position(|m| m["info"]["id"] == b.as_str()))
        .unwrap_or(all.len());
    let limit = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(usize::MAX);
    let start = end.saturating_sub(limit);
    json_reply(StatusCode::OK, &Value::Array(all[start..end].to_vec()))
}

async fn events(State(d): State<Arc<Double>>, headers: HeaderMap) -> Reply {
    if let Some(r) = denied(&d, &headers) {
        return r;
    }
    d.event_connects.fetch_add(1, Ordering::SeqCst);
    let rx = d.events.subscribe();
    let mut drops = d.drops.subscribe();
    drops.mark_unchanged();
    let first = json!({"payload": {"id": "evt_0", "type": "server.connected", "properties": {}}});
    let stream = futures_util::stream::unfold(
        (Some(first.to_string()), rx, drops),
        |(first, mut rx, mut drops)| async move {
            if let Some(f) = first {
                let chunk = bytes::Bytes::from(format!("data: {f}\n\n"));
                return Some((Ok::<_, std::io::Error>(chunk), (None, rx, drops)));
            }
            tokio::select! {
                msg = rx.recv() => {
                    let line = msg.ok()?;
                    let chunk = bytes::Bytes::from(format!("data: {line}\n\n"));
                    Some((Ok(chunk), (None, rx, drops)))
                }
                _ = drops.changed() => None,
            }
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}
