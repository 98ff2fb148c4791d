//! The minimal fast upstream: a single-threaded hyper server with fixed answers, so the
//! benchmark measures the proxy in front of it rather than a runtime.
//!
//! - `GET /json`: a small JSON object (about 120 bytes, like a session read);
//! - `GET /big`: 10 MiB of `application/octet-stream`;
//! - `POST /sink`: reads the whole body, answers `{"bytes":N}`;
//! - `GET /event?rate=R&secs=S`: an event stream, `server.connected`, then R events a second
//!   for S seconds, each `data: {"type":"bench.tick","properties":{"t":<unix ns>,"seq":<n>}}`,
//!   one body frame per event; without `rate`, `server.connected` and then nothing (idle);
//! - `GET /global/event`: an idle event stream (taskgate's oracle subscribes to it);
//! - `GET /session/status`: `{}`; anything else a 404.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub const BIG: usize = 10 * 1024 * 1024;
const JSON: &str = r#"{"id":"ses_3f2a9c1b7ffeR2hKx8dW4mQzLp","title":"bench","version":"1.18.33","time":{"created":1764540000000}}"#;

type Boxed = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Serves until the process ends. Prints `listening on ADDR` once bound.
pub fn serve(listen: &str) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let big = Bytes::from(vec![b'x'; BIG]);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let big = big.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(req, big.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn answer(req: Request<Incoming>, big: Bytes) -> Result<Response<Boxed>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let response = match path.as_str() {
        "/json" => full("application/json", Bytes::from_static(JSON.as_bytes())),
        "/big" => full("application/octet-stream", big),
        "/sink" => {
            let mut body = req.into_body();
            let mut n = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => n += frame.data_ref().map_or(0, |d| d.len()),
                    Err(_) => break,
                }
            }
            full(
                "application/json",
                Bytes::from(format!("{{\"bytes\":{n}}}")),
            )
        }
        "/event" | "/global/event" => {
            let rate = param(&query, "rate").unwrap_or(0);
            let secs = param(&query, "secs").unwrap_or(0);
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(Ticks::new(rate, secs).boxed_unsync())
                .expect("static response parts")
        }
        "/session/status" => full("application/json", Bytes::from_static(b"{}")),
        _ => {
            let mut r = full(
                "application/json",
                Bytes::from_static(br#"{"name":"NotFoundError"}"#),
            );
            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(response)
}

fn full(content_type: &'static str, body: Bytes) -> Response<Boxed> {
    Response::builder()
        .header("content-type", content_type)
        .body(Full::new(body).boxed_unsync())
        .expect("static response parts")
}

fn param(query: &str, name: &str) -> Option<u64> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The event stream body: `server.connected`, then `rate` events a second for `secs` seconds
/// (as many as are due at each millisecond tick, one frame each), then the end; with no rate,
/// nothing after `server.connected` until the client leaves.
struct Ticks {
    rate: u64,
    end: Option<tokio::time::Instant>,
    started: tokio::time::Instant,
    interval: tokio::time::Interval,
    sent: u64,
    due: u64,
    total: u64,
    connected: bool,
}

impl Ticks {
    fn new(rate: u64, secs: u64) -> Ticks {
        let started = tokio::time::Instant::now();
        let mut interval = tokio::time::interval(Duration::from_millis(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Ticks {
            rate,
            end: (rate > 0).then(|| started + Duration::from_secs(secs)),
            started,
            interval,
            sent: 0,
            due: 0,
            total: rate * secs,
            connected: false,
        }
    }
}

impl hyper::body::Body for Ticks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if !self.connected {
            self.connected = true;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b"data: {\"type\":\"server.connected\",\"properties\":{}}\n\n",
            )))));
        }
        let Some(end) = self.end else {
            return Poll::Pending; // idle: never woken, ends when the client leaves
        };
        loop {
            if self.sent < self.due {
                self.sent += 1;
                let line = format!(
                    "data: {{\"type\":\"bench.tick\",\"properties\":{{\"t\":{},\"seq\":{}}}}}\n\n",
                    unix_ns(),
                    self.sent
                );
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))));
            }
            if self.interval.poll_tick(cx).is_pending() {
                return Poll::Pending;
            }
            let now = tokio::time::Instant::now();
            let elapsed = now.duration_since(self.started).as_micros() as u64;
            // Exactly rate × secs events: the last tick sends whatever is still due.
            let due = (elapsed * self.rate / 1_000_000).min(self.total);
            if now >= end && self.sent >= self.total {
                return Poll::Ready(None);
            }
            self.due = if now >= end { self.total } else { due };
        }
    }
}
