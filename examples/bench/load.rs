//! The load generators: one keep-alive connection driven from Rust for exact per-request
//! latencies, transfers and event latencies; `wrk` for requests/s with many connections.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::upstream::{unix_ns, BIG};
use crate::Error;

/// One HTTP/1.1 keep-alive connection.
pub struct Conn<B> {
    addr: SocketAddr,
    send: SendRequest<B>,
}

impl<B> Conn<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub async fn open(addr: SocketAddr) -> Result<Conn<B>, Error> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("connection to {addr}: {e}");
            }
        });
        Ok(Conn { addr, send })
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: B,
    ) -> Result<hyper::Response<Incoming>, Error> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .body(body)?;
        self.send
            .ready()
            .await
            .map_err(|e| format!("{method} {path} on {}: {e}", self.addr))?;
        let response = self
            .send
            .send_request(req)
            .await
            .map_err(|e| format!("{method} {path} on {}: {e}", self.addr))?;
        if !response.status().is_success() {
            return Err(format!("{method} {path} on {}: {}", self.addr, response.status()).into());
        }
        Ok(response)
    }
}

/// Sequential small GETs on one connection for `for_how_long`: each request's latency in ns.
pub async fn latencies(addr: SocketAddr, for_how_long: Duration) -> Result<Vec<u64>, Error> {
    let mut conn = Conn::<Empty<Bytes>>::open(addr).await?;
    // Warm-up: the proxies open their upstream connection on the first request.
    for _ in 0..200 {
        let r = conn.send("GET", "/json", Empty::new()).await?;
        r.into_body().collect().await?;
    }
    let mut out = Vec::with_capacity(100_000);
    let end = Instant::now() + for_how_long;
    while Instant::now() < end {
        let start = Instant::now();
        let r = conn.send("GET", "/json", Empty::new()).await?;
        r.into_body().collect().await?;
        out.push(start.elapsed().as_nanos() as u64);
    }
    Ok(out)
}

/// `wrk` on `path` with `connections` connections for `secs` seconds: requests/s.
pub fn wrk(addr: SocketAddr, path: &str, connections: u32, secs: u32) -> Result<f64, Error> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            &format!("http://{addr}{path}"),
        ])
        .output()
        .map_err(|e| format!("cannot run wrk (apt-get install wrk): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        return Err(format!("wrk saw errors:\n{text}").into());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk output:\n{text}").into())
}

/// `n` downloads of `GET /big` on one connection: MiB/s.
pub async fn download(addr: SocketAddr, n: usize) -> Result<f64, Error> {
    let mut conn = Conn::<Empty<Bytes>>::open(addr).await?;
    let start = Instant::now();
    for _ in 0..n {
        let r = conn.send("GET", "/big", Empty::new()).await?;
        let mut body = r.into_body();
        let mut got = 0;
        while let Some(frame) = body.frame().await {
            got += frame?.data_ref().map_or(0, |d| d.len());
        }
        if got != BIG {
            return Err(format!("download: {got} bytes, expected {BIG}").into());
        }
    }
    Ok((n * BIG) as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64())
}

/// `n` uploads of 10 MiB to `POST /sink` on one connection: MiB/s.
pub async fn upload(addr: SocketAddr, n: usize) -> Result<f64, Error> {
    let mut conn = Conn::<Full<Bytes>>::open(addr).await?;
    let data = Bytes::from(vec![b'y'; BIG]);
    let start = Instant::now();
    for _ in 0..n {
        let r = conn.send("POST", "/sink", Full::new(data.clone())).await?;
        let body = r.into_body().collect().await?.to_bytes();
        if body != format!("{{\"bytes\":{BIG}}}").as_bytes() {
            return Err(format!("upload: upstream answered {body:?}").into());
        }
    }
    Ok((n * BIG) as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64())
}

/// What one event stream delivered.
pub struct Events {
    /// Latency of each event, upstream write to client read, ns.
    pub latencies: Vec<u64>,
    pub expected: u64,
}

/// Reads `GET /event?rate=&secs=` to its end: each event's latency.
pub async fn events(addr: SocketAddr, rate: u64, secs: u64) -> Result<Events, Error> {
    let mut conn = Conn::<Empty<Bytes>>::open(addr).await?;
    let r = conn
        .send(
            "GET",
            &format!("/event?rate={rate}&secs={secs}"),
            Empty::new(),
        )
        .await?;
    let mut body = r.into_body();
    let mut pending: Vec<u8> = Vec::new();
    let mut latencies = Vec::with_capacity((rate * secs) as usize);
    let deadline = Instant::now() + Duration::from_secs(secs + 30);
    loop {
        let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Ok(Some(frame)) => frame?,
            Ok(None) => break,
            Err(_) => return Err("event stream did not end in time".into()),
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = unix_ns();
        pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(end) = find(&pending[start..], b"\n\n") {
            let event = &pending[start..start + end];
            if let Some(t) = number_after(event, b"\"t\":") {
                latencies.push(now.saturating_sub(t));
            }
            start += end + 2;
        }
        pending.drain(..start);
    }
    Ok(Events {
        latencies,
        expected: rate * secs,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(hay, key)? + key.len();
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&hay[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Opens `n` idle event streams and keeps them open while the returned value lives.
pub async fn open_streams(addr: SocketAddr, n: usize) -> Result<Vec<Incoming>, Error> {
    let mut bodies = Vec::with_capacity(n);
    for _ in 0..n {
        let mut conn = Conn::<Empty<Bytes>>::open(addr).await?;
        let r = conn.send("GET", "/event", Empty::new()).await?;
        let mut body = r.into_body();
        // The first event proves the stream is open end to end.
        match tokio::time::timeout(Duration::from_secs(10), body.frame()).await {
            Ok(Some(Ok(_))) => {}
            _ => return Err("an idle event stream did not open".into()),
        }
        bodies.push(body);
    }
    Ok(bodies)
}
