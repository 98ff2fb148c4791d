//! A client that does what `opencode run --attach URL "prompt"` does, recording what it saw
//! and when it believed the work was done. The demo runs it direct and through the proxy; the
//! tests use it to show each scenario misleads a direct client.
//!
//! Like the real one it creates a session, subscribes to `GET /event`, sends the prompt with
//! the blocking `POST /session/:id/message`, prints finished text and tool parts of its own
//! session, and stops reading events at its session's first idle signal. It is done when both
//! that idle and the POST's return have happened.

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::opencode::sse::SseDecoder;

/// One thing the client saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// A finished text part of its session (what `opencode run` prints).
    Text(String),
    /// A tool part of its session reaching `completed` or `error`.
    Tool {
        tool: String,
        status: String,
        output: String,
    },
    /// Its session's idle signal (`session.idle`, or `session.status` idle), with the event id.
    Idle { event_id: String },
    /// `POST /session/:id/message` returned; the last text of the returned message.
    Returned { text: Option<String> },
    /// The client believes the work is done and exits.
    Done,
}

/// One timeline entry: milliseconds since the client started, and what it saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub at_ms: u64,
    pub seen: Seen,
}

/// What a run saw, in order.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub session_id: String,
    pub timeline: Vec<Entry>,
    /// When it believed the work was done.
    pub done_at_ms: u64,
    /// The id of the idle event it stopped at, to line it up with a recording of the stream.
    pub idle_event_id: Option<String>,
}

impl RunReport {
    /// The texts it printed, in order.
    pub fn texts(&self) -> Vec<&str> {
        self.timeline
            .iter()
            .filter_map(|e| match &e.seen {
                Seen::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The last thing it printed: what its user takes as the answer.
    pub fn last_text(&self) -> Option<&str> {
        self.texts().last().copied()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("bad URL {0}")]
    Url(String),
    #[error("request failed: {0}")]
    Request(#[from] hyper_util::client::legacy::Error),
    #[error("reading a response failed: {0}")]
    Body(#[from] hyper::Error),
    #[error("{route} answered {status}: {body}")]
    Status {
        route: String,
        status: StatusCode,
        body: String,
    },
    #[error("invalid JSON from {route}: {source}")]
    Json {
        route: String,
        source: serde_json::Error,
    },
    #[error("POST /session answered without an id: {0}")]
    NoSessionId(String),
    #[error("the event stream ended before the session went idle")]
    StreamEnded,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn ms_since(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Runs `prompt` like `opencode run --attach base_url` and reports what it believed.
pub async fn run_like_opencode_run(base_url: &str, prompt: &str) -> Result<RunReport, RunError> {
    let start = Instant::now();
    let base = base_url.trim_end_matches('/').to_owned();
    if !base.starts_with("http://") {
        return Err(RunError::Url(base));
    }
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    let session = send_json(
        &client,
        Method::POST,
        &format!("{base}/session"),
        Some(json!({})),
    )
    .await?;
    let session_id = session["id"]
        .as_str()
        .ok_or_else(|| RunError::NoSessionId(session.to_string()))?
        .to_owned();
    send_json(&client, Method::GET, &format!("{base}/config"), None).await?;

    // Like the real client, prompt only once the stream is live, so no event is missed.
    let events = EventStream::connect(&client, &base).await?;
    let reader = tokio::spawn(read_until_idle(events, session_id.clone(), start));

    let body = json!({"parts": [{"type": "text", "text": prompt}]});
    let url = format!("{base}/session/{session_id}/message");
    let response = send_json(&client, Method::POST, &url, Some(body)).await?;
    let returned = Entry {
        at_ms: ms_since(start),
        seen: Seen::Returned {
            text: response["parts"]
                .as_array()
                .and_then(|parts| super::messages::last_text(parts)),
        },
    };

    let (mut timeline, idle_event_id) = match reader.await {
        Ok(result) => result?,
        Err(_) => return Err(RunError::StreamEnded),
    };
    let at = timeline
        .iter()
        .position(|e| e.at_ms > returned.at_ms)
        .unwrap_or(timeline.len());
    timeline.insert(at, returned);
    let done_at_ms = timeline.iter().map(|e| e.at_ms).max().unwrap_or(0);
    timeline.push(Entry {
        at_ms: done_at_ms,
        seen: Seen::Done,
    });
    Ok(RunReport {
        session_id,
        timeline,
        done_at_ms,
        idle_event_id,
    })
}

async fn open(
    client: &HttpClient,
    method: Method,
    url: &str,
    body: Option<Value>,
) -> Result<Response<Incoming>, RunError> {
    let uri: hyper::Uri = url.parse().map_err(|_| RunError::Url(url.to_owned()))?;
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let request = Request::builder()
        .method(method.clone())
        .uri(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes))
        .map_err(|_| RunError::Url(url.to_owned()))?;
    let response = client.request(request).await?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        return Err(RunError::Status {
            route: format!("{method} {url}"),
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(response)
}

async fn send_json(
    client: &HttpClient,
    method: Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, RunError> {
    let route = format!("{method} {url}");
    let response = open(client, method, url, body).await?;
    let body = response.into_body().collect().await?.to_bytes();
    serde_json::from_slice(&body).map_err(|source| RunError::Json { route, source })
}

/// A live subscription to `GET /event`: era-C envelopes, one at a time. Usable against the sim
/// or a proxy in front of it (the demo watches the truth with it).
pub struct EventStream {
    body: Incoming,
    frames: SseDecoder,
    ready: std::collections::VecDeque<Value>,
}

impl EventStream {
    /// Subscribes to `{base_url}/event` and returns once `server.connected` arrived, so every
    /// event emitted afterwards will be seen.
    pub async fn open(base_url: &str) -> Result<EventStream, RunError> {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        EventStream::connect(&client, base_url.trim_end_matches('/')).await
    }

    async fn connect(client: &HttpClient, base: &str) -> Result<EventStream, RunError> {
        let response = open(client, Method::GET, &format!("{base}/event"), None).await?;
        let mut stream = EventStream {
            body: response.into_body(),
            frames: SseDecoder::new(),
            ready: Default::default(),
        };
        loop {
            match stream.next().await? {
                Some(event) if event["type"] == "server.connected" => return Ok(stream),
                Some(_) => continue,
                None => return Err(RunError::StreamEnded),
            }
        }
    }

    /// The next event, or `None` when the stream ended. Lines that are not JSON `data:` are
    /// skipped, like a browser's EventSource does with unknown fields.
    pub async fn next(&mut self) -> Result<Option<Value>, RunError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            for frame in self.frames.push(&data) {
                if let Ok(event) = serde_json::from_str::<Value>(&frame.data) {
                    self.ready.push_back(event);
                }
            }
        }
    }
}

/// Reads events until `session`'s first idle signal; returns what it saw and the idle event's
/// id.
async fn read_until_idle(
    mut events: EventStream,
    session: String,
    start: Instant,
) -> Result<(Vec<Entry>, Option<String>), RunError> {
    let mut timeline = Vec::new();
    while let Some(event) = events.next().await? {
        let props = &event["properties"];
        let sid = props["sessionID"]
            .as_str()
            .or_else(|| props["part"]["sessionID"].as_str())
            .or_else(|| props["info"]["sessionID"].as_str());
        if sid != Some(session.as_str()) {
            continue;
        }
        let at_ms = ms_since(start);
        let is_idle = event["type"] == "session.idle"
            || (event["type"] == "session.status" && props["status"]["type"] == "idle");
        if is_idle {
            let event_id = event["id"].as_str().unwrap_or_default().to_owned();
            timeline.push(Entry {
                at_ms,
                seen: Seen::Idle {
                    event_id: event_id.clone(),
                },
            });
            return Ok((timeline, Some(event_id)));
        }
        if event["type"] != "message.part.updated" {
            continue;
        }
        let part = &props["part"];
        if part["type"] == "text" && part["time"]["end"].is_number() {
            if let Some(text) = part["text"].as_str() {
                timeline.push(Entry {
                    at_ms,
                    seen: Seen::Text(text.to_owned()),
                });
            }
        } else if part["type"] == "tool" {
            let status = part["state"]["status"].as_str().unwrap_or_default();
            if status == "completed" || status == "error" {
                let output = part["state"]["output"]
                    .as_str()
                    .or_else(|| part["state"]["error"].as_str())
                    .unwrap_or_default();
                timeline.push(Entry {
                    at_ms,
                    seen: Seen::Tool {
                        tool: part["tool"].as_str().unwrap_or_default().to_owned(),
                        status: status.to_owned(),
                        output: output.to_owned(),
                    },
                });
            }
        }
    }
    Err(RunError::StreamEnded)
}
