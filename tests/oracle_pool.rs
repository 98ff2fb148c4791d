//! The oracle's connections to the runtime: after a burst of reads, only a few stay open.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::Response;
use hyper_util::rt::TokioIo;
use taskgate::config::Config;
use taskgate::oracle::client::RuntimeClient;
use tokio::net::TcpListener;
use tokio::sync::Barrier;

const PATIENCE: Duration = Duration::from_secs(10);
const BURST: usize = 100;

/// A runtime double whose `/global/health` answers only once `BURST` reads are in at once, and
/// which counts the connections open right now and the most ever open at once.
async fn runtime() -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let open = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(BURST));
    let (count, most) = (open.clone(), peak.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            most.fetch_max(count.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            let (count, barrier) = (count.clone(), barrier.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let barrier = barrier.clone();
                    async move {
                        barrier.wait().await;
                        Ok::<_, std::convert::Infallible>(Response::new(Body::from(
                            r#"{"healthy":true,"version":"1.0.0"}"#,
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                count.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (url, open, peak)
}

/// 300 held clients left 402 idle sockets to the runtime open two minutes later: the pool
/// kept every connection it ever opened.
#[tokio::test]
async fn oracle_connections_beyond_the_idle_cap_close_after_a_burst() {
    let (url, open, peak) = runtime().await;
    let mut config = Config::defaults();
    config.proxy.upstream = url;
    let client = RuntimeClient::new(&config);
    let reads: Vec<_> = (0..BURST)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.health().await })
        })
        .collect();
    for read in reads {
        read.await.unwrap().expect("a health answer");
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        BURST,
        "one connection per concurrent read"
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while open.load(Ordering::SeqCst) > 16 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} connections still open after the burst",
            open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
}
