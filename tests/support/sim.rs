//! Test helpers for the simulated runtime: start it on port 0, call its routes, and record its
//! event stream so a test can replay the state at any event.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use taskgate::config::{Config, HumanDuration};
use taskgate::sim::{run, SimOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A running sim; stops when dropped.
pub struct SimServer {
    pub url: String,
    token: CancellationToken,
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

pub async fn start(time_scale: f64) -> SimServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    tokio::spawn(run(
        listener,
        SimOptions {
            time_scale,
            ..SimOptions::default()
        },
        token.clone(),
    ));
    SimServer {
        url: format!("http://{addr}"),
        token,
    }
}

/// A simulated runtime and taskgate in front of it, both on free loopback ports, each with its
/// own stop switch (a test may stop taskgate alone); both stop when dropped.
pub struct Stack {
    pub sim: String,
    pub proxy: String,
    pub sim_stop: CancellationToken,
    pub proxy_stop: CancellationToken,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.proxy_stop.cancel();
        self.sim_stop.cancel();
    }
}

/// Starts the sim with `options` and taskgate in front of it: defaults, a 100 ms poll interval,
/// then `tune`.
pub async fn stack(options: SimOptions, tune: impl FnOnce(&mut Config)) -> Stack {
    let sim_stop = CancellationToken::new();
    let proxy_stop = CancellationToken::new();
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = format!("http://{}", sim_listener.local_addr().unwrap());
    tokio::spawn(run(sim_listener, options, sim_stop.clone()));
    let mut config = Config::defaults();
    config.proxy.upstream = sim.clone();
    config.oracle.poll_interval = HumanDuration(Duration::from_millis(100));
    tune(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(taskgate::cmd::stack::run(
        listener,
        config,
        proxy_stop.clone(),
    ));
    Stack {
        sim,
        proxy,
        sim_stop,
        proxy_stop,
    }
}

/// The first `task` tool part in a session's history (`GET /session/:id/message`).
pub fn task_part(history: &Value) -> Value {
    history
        .as_array()
        .expect("a history is a list")
        .iter()
        .flat_map(|m| m["parts"].as_array().into_iter().flatten())
        .find(|p| p["tool"] == "task")
        .cloned()
        .expect("the launch part")
}

/// Sends a request; returns the status and the body parsed as JSON (`Null` when empty).
pub async fn call(method: Method, url: &str, body: Option<Value>) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(bytes))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    (status, value)
}

pub async fn get(url: &str) -> Value {
    let (status, body) = call(Method::GET, url, None).await;
    assert_eq!(status, 200, "GET {url}: {body}");
    body
}

/// Polls `GET url` until `pred` holds on the body (or panics after 20 s).
pub async fn poll_until(url: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let body = get(url).await;
        if pred(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never matched; last {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Everything one SSE route sent, as parsed `data:` payloads.
#[derive(Clone)]
pub struct Recorder {
    events: Arc<Mutex<Vec<Value>>>,
    notify: Arc<Notify>,
}

impl Recorder {
    /// Subscribes to `url` (an SSE route) and returns once the first frame arrived.
    pub async fn start(url: &str) -> Recorder {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let req = Request::builder()
            .uri(url)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let rec = Recorder {
            events: Arc::default(),
            notify: Arc::default(),
        };
        let sink = rec.clone();
        tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut pending = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=pos).collect();
                    let line = String::from_utf8(line).unwrap();
                    if let Some(json) = line.trim_end().strip_prefix("data: ") {
                        sink.events
                            .lock()
                            .unwrap()
                            .push(serde_json::from_str(json).unwrap());
                        sink.notify.notify_waiters();
                    }
                }
            }
        });
        rec.wait_for(|e| !e.is_empty()).await;
        rec
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `pred` holds on the events so far (panics after 20 s).
    pub async fn wait_for(&self, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let events = self.events.lock().unwrap();
                if pred(&events) {
                    return events.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let events = self.events();
                panic!(
                    "condition never held; {} events: {}",
                    events.len(),
                    summary(&events)
                );
            }
        }
    }
}

/// One line per event, for failure messages.
pub fn summary(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| {
            let p = &e["properties"];
            format!(
                "{} {} {}",
                e["type"],
                p["sessionID"],
                p["status"]["type"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The index of the event with `id`.
pub fn index_of(events: &[Value], id: &str) -> usize {
    events
        .iter()
        .position(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("event {id} not recorded"))
}

/// The status map (non-idle sessions only) right after event `upto`, replayed from the stream.
pub fn statuses_at(events: &[Value], upto: usize) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for e in &events[..=upto] {
        if e["type"] == "session.status" {
            let sid = e["properties"]["sessionID"].as_str().unwrap().to_owned();
            let kind = e["properties"]["status"]["type"]
                .as_str()
                .unwrap()
                .to_owned();
            if kind == "idle" {
                map.remove(&sid);
            } else {
                map.insert(sid, kind);
            }
        }
    }
    map
}

/// Sessions created with `parentID` = `parent`, in creation order.
pub fn children_of(events: &[Value], parent: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "session.created" && e["properties"]["info"]["parentID"] == parent)
        .map(|e| e["properties"]["sessionID"].as_str().unwrap().to_owned())
        .collect()
}

/// The index of the first event after `from` matching `pred`.
pub fn find_after(events: &[Value], from: usize, pred: impl Fn(&Value) -> bool) -> Option<usize> {
    events
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, e)| pred(e))
        .map(|(i, _)| i)
}

pub fn is_idle_of(e: &Value, sid: &str) -> bool {
    e["type"] == "session.idle" && e["properties"]["sessionID"] == sid
}

/// A finished text part of `sid` whose text contains `needle`.
pub fn is_text_of(e: &Value, sid: &str, needle: &str) -> bool {
    e["type"] == "message.part.updated"
        && e["properties"]["sessionID"] == sid
        && e["properties"]["part"]["type"] == "text"
        && e["properties"]["part"]["time"]["end"].is_number()
        && e["properties"]["part"]["text"]
            .as_str()
            .is_some_and(|t| t.contains(needle))
}

/// A user text part (as the runtime injects) of `sid` containing `needle`.
pub fn is_user_text_of(e: &Value, sid: &str, needle: &str) -> bool {
    e["type"] == "message.part.updated"
        && e["properties"]["sessionID"] == sid
        && e["properties"]["part"]["type"] == "text"
        && e["properties"]["part"]["time"].is_null()
        && e["properties"]["part"]["text"]
            .as_str()
            .is_some_and(|t| t.contains(needle))
}

/// True once `sid` wrote a text containing `needle` and then went idle.
pub fn said_then_idle(events: &[Value], sid: &str, needle: &str) -> bool {
    events
        .iter()
        .position(|e| is_text_of(e, sid, needle))
        .and_then(|i| find_after(events, i, |e| is_idle_of(e, sid)))
        .is_some()
}
