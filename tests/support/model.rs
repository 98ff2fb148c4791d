//! Doubles for the model face's tests: a scripted model provider that records exactly the bytes
//! it received and streams an SSE answer, a scripted truth the test drives, and a client.
#![allow(dead_code)] // Each test binary uses a different part of it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Response};
use axum::Router;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use taskgate::config::Config;
use taskgate::model::{Finding, ModelFace, Truth};
use taskgate::oracle::{SessionRef, Verdict};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The first SSE frame of every answer, sent at once.
pub const FIRST_FRAME: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
/// The rest, sent when the test says so (or at once when the stream is not held).
pub const LAST_FRAMES: &str =
    "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";

/// One request as the provider received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct ProviderState {
    seen: mpsc::UnboundedSender<Recorded>,
    /// When set, each answer stops after its first frame until [`Provider::finish_stream`].
    hold_stream: bool,
    finish: Notify,
}

pub struct Provider {
    pub url: String,
    pub addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Recorded>,
    state: Arc<ProviderState>,
    shutdown: CancellationToken,
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Provider {
    pub async fn start(hold_stream: bool) -> Provider {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(ProviderState {
            seen: tx,
            hold_stream,
            finish: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(answer).with_state(state.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Provider {
            url: format!("http://{addr}"),
            addr,
            seen: rx,
            state,
            shutdown,
        }
    }

    /// The next request the provider received (waits for it).
    pub async fn next(&mut self) -> Recorded {
        tokio::time::timeout(PATIENCE, self.seen.recv())
            .await
            .expect("the provider received a request in time")
            .expect("provider running")
    }

    /// Whether a request has arrived that was not taken with [`Provider::next`] yet.
    pub fn has_pending(&mut self) -> bool {
        !self.seen.is_empty()
    }

    /// Lets a held answer stream send its last frames.
    pub fn finish_stream(&self) {
        self.state.finish.notify_one();
    }
}

async fn answer(State(state): State<Arc<ProviderState>>, req: Request) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let _ = state.seen.send(Recorded {
        method: parts.method.to_string(),
        target,
        headers: parts.headers,
        body,
    });
    let stream = answer_stream(state);
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("x-provider", "scripted")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn answer_stream(
    state: Arc<ProviderState>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(0u8, move |step| {
        let state = state.clone();
        async move {
            match step {
                0 => Some((Ok(Bytes::from_static(FIRST_FRAME.as_bytes())), 1)),
                1 => {
                    if state.hold_stream {
                        state.finish.notified().await;
                    }
                    Some((Ok(Bytes::from_static(LAST_FRAMES.as_bytes())), 2))
                }
                _ => None,
            }
        }
    })
}

/// A truth the test drives: each child's verdict is set by the test; `settle` returns once it
/// is terminal, or at the deadline with the current one ("running" when never set).
#[derive(Default)]
pub struct ScriptedTruth {
    verdicts: Mutex<HashMap<String, Verdict>>,
    changed: watch::Sender<u64>,
    asked: watch::Sender<Vec<String>>,
    /// Settles in progress; a dropped (cancelled) one counts down too.
    active: Arc<watch::Sender<usize>>,
}

/// Counts one settle in progress for as long as it lives.
struct Active(Arc<watch::Sender<usize>>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl ScriptedTruth {
    pub fn new() -> Arc<ScriptedTruth> {
        Arc::new(ScriptedTruth::default())
    }

    pub fn set(&self, child: &str, verdict: Verdict) {
        self.verdicts
            .lock()
            .unwrap()
            .insert(child.to_owned(), verdict);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Waits until the face asked about `child` (it is holding a request for it).
    pub async fn asked(&self, child: &str) {
        let mut rx = self.asked.subscribe();
        tokio::time::timeout(PATIENCE, rx.wait_for(|a| a.iter().any(|c| c == child)))
            .await
            .expect("the face asked about the child in time")
            .unwrap();
    }

    /// Waits until no settle is in progress (every hold ended, released or cancelled).
    pub async fn idle(&self) {
        let mut rx = self.active.subscribe();
        tokio::time::timeout(PATIENCE, rx.wait_for(|n| *n == 0))
            .await
            .expect("every hold ended in time")
            .unwrap();
    }

    pub fn questions(&self) -> Vec<String> {
        self.asked.borrow().clone()
    }

    fn current(&self, child: &str) -> Option<Verdict> {
        self.verdicts.lock().unwrap().get(child).cloned()
    }
}

impl Truth for ScriptedTruth {
    fn settle<'a>(&'a self, child: &'a SessionRef, deadline: Instant) -> BoxFuture<'a, Finding> {
        Box::pin(async move {
            let mut changes = self.changed.subscribe();
            self.active.send_modify(|n| *n += 1);
            let _active = Active(self.active.clone());
            self.asked.send_modify(|a| a.push(child.id.clone()));
            let mut premature = false;
            loop {
                let current = self.current(&child.id);
                if let Some(v) = current.clone().filter(Verdict::is_terminal) {
                    return Finding {
                        verdict: v,
                        premature,
                        timed_out: false,
                        started_ago: None,
                        last_activity_ago: None,
                    };
                }
                premature = true;
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        return Finding {
                            verdict: current.unwrap_or(Verdict::Running {
                                session: child.id.clone(),
                                reason: format!("{} is busy", child.id),
                            }),
                            premature: true,
                            timed_out: true,
                            started_ago: Some(Duration::from_secs(42)),
                            last_activity_ago: Some(Duration::from_secs(3)),
                        };
                    }
                }
            }
        })
    }
}

pub const PATIENCE: Duration = Duration::from_secs(10);

/// The model face serving on a port of its own, its three providers all at `provider`.
pub struct Face {
    pub url: String,
    shutdown: CancellationToken,
}

impl Drop for Face {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn config(provider: &str, max_hold: &str) -> Config {
    Config::from_toml_str(
        "test",
        &format!(
            "[model]\nenabled = true\nopenai_chat = \"{provider}/v1\"\nopenai_responses = \"{provider}/v1\"\nanthropic = \"{provider}/v1\"\nmax_hold = \"{max_hold}\"\n"
        ),
    )
    .unwrap()
}

impl Face {
    pub async fn start(config: &Config, truth: Arc<dyn Truth>) -> Face {
        let face = ModelFace::new(config, truth).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(taskgate::model::serve(listener, face, shutdown.clone()));
        Face {
            url: format!("http://{addr}"),
            shutdown,
        }
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A POST of `body` with the provider credentials a runtime would send.
pub fn post(url: &str, body: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test-secret")
        .header("x-api-key", "sk-ant-test")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// Reads a whole response body as text.
pub async fn text(response: http::Response<hyper::body::Incoming>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}
