//! Test doubles for the proxy tests: an upstream that stands in for `opencode serve` (a raw hyper
//! server, so paths reach the handler exactly as sent and connections can be counted), a proxy
//! on port 0, and clients (pooled hyper client, raw TCP).
#![allow(dead_code)] // Each test binary uses a different part of this file.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use taskgate::config::Config;
use taskgate::proxy::ServeError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A generous bound for waits on things that should happen at once; only reached when the
/// behaviour under test is broken, so a failing test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// The upstream double.
pub struct Upstream {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl Upstream {
    /// Serves `handler` for every request on a fresh loopback port.
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let (count, stop) = (connections.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap().0,
                };
                stream.set_nodelay(true).unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let fut = handler(req);
                        async move { Ok::<_, std::convert::Infallible>(fut.await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        Upstream {
            addr,
            connections,
            shutdown,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// TCP connections the upstream has accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A request as the upstream received it.
#[derive(Debug)]
pub struct Seen {
    pub method: Method,
    /// The request target exactly as it arrived (path and query).
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An upstream that records every request (whole body included) and answers 200 `ok`.
pub async fn recorder() -> (Upstream, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let target = parts
                .uri
                .path_and_query()
                .map(|pq| pq.as_str().to_owned())
                .unwrap_or_default();
            tx.send(Seen {
                method: parts.method,
                target,
                headers: parts.headers,
                body,
            })
            .unwrap();
            Response::new(Body::from("ok"))
        }
    })
    .await;
    (upstream, rx)
}

/// A taskgate proxy served by `taskgate::cmd::stack::run` on a fresh loopback port, gate off.
pub struct Proxy {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), ServeError>>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        Proxy::start_with(upstream, |_| {}).await
    }

    /// Like [`Proxy::start`], with `tweak` applied to the config first.
    pub async fn start_with(upstream: &str, tweak: impl FnOnce(&mut Config)) -> Proxy {
        let mut config = Config::defaults();
        config.proxy.upstream = upstream.to_owned();
        config.gate.enabled = false;
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(taskgate::cmd::stack::run(
            listener,
            config,
            shutdown.clone(),
        ));
        Proxy {
            addr,
            shutdown,
            task,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// Waits for `run` to return (after `shutdown` was cancelled).
    pub async fn finished(&mut self) -> Result<(), ServeError> {
        (&mut self.task).await.unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A pooled HTTP/1 client that sends requests exactly as built (no redirects, no added headers
/// beyond `Host`).
pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends `request` (raw bytes, which should ask for `Connection: close`) and returns everything
/// the server wrote until it closed the connection.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    within("the raw response", stream.read_to_end(&mut out))
        .await
        .unwrap();
    out
}

/// Splits a raw HTTP/1.1 response into its head (status line and headers, as text) and body.
pub fn split_response(raw: &[u8]) -> (String, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    (
        String::from_utf8_lossy(&raw[..end]).into_owned(),
        raw[end + 4..].to_vec(),
    )
}

/// The response head's header lines, names lowercased, in order.
pub fn head_headers(head: &str) -> Vec<(String, String)> {
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// Deterministic, non-repeating-looking test data (so a shifted or dropped chunk is caught).
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}
