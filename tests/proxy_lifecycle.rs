//! Lifecycle: errors a client can act on, taskgate's own endpoints, and shutdown.

#[path = "support/proxy.rs"]
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::{within, Proxy, Upstream};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// GETs `path` from the proxy and returns the status and body.
async fn get(proxy: &Proxy, path: &str) -> (StatusCode, Bytes) {
    let response = within(
        "the response",
        support::client().get(proxy.url(path).parse().unwrap()),
    )
    .await
    .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// An address nothing listens on: a port bound and released.
async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A listener whose accept queue is full, so the kernel drops further SYNs and a connect to it
/// hangs until its own timeout: a connect timeout that needs no network. With a backlog of 0,
/// Linux queues one connection; connects are made (each given a moment to complete) until one
/// does not complete, which proves the queue is full.
async fn blackhole() -> (TcpListener, Vec<TcpStream>, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut streams: Vec<TcpStream> = Vec::new();
    for _ in 0..16 {
        let filler = TcpSocket::new_v4().unwrap();
        match tokio::time::timeout(Duration::from_millis(300), filler.connect(addr)).await {
            Ok(Ok(stream)) => streams.push(stream),
            Ok(Err(e)) => panic!("filling the accept queue failed: {e}"),
            // The established ones are kept: the queue stays full while they live.
            Err(_) => return (listener, streams, addr),
        }
    }
    panic!("the accept queue never filled; cannot simulate a connect timeout here");
}

#[tokio::test]
async fn a_refused_upstream_is_a_502_json_error_naming_the_upstream() {
    let upstream = format!("http://{}", refused_addr().await);
    let proxy = Proxy::start(&upstream).await;
    let (status, body) = get(&proxy, "/session").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let body = json(&body);
    assert_eq!(body["error"]["kind"], "upstream_unreachable");
    assert_eq!(body["error"]["upstream"], upstream.as_str());
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("os error"),
        "raw internals leaked: {message}"
    );
}

#[tokio::test]
async fn a_connect_timeout_is_a_504_json_error() {
    let (_listener, _fillers, addr) = blackhole().await;
    let upstream = format!("http://{addr}");
    let proxy = Proxy::start_with(&upstream, |c| {
        c.proxy.connect_timeout.0 = Duration::from_millis(200);
    })
    .await;
    let (status, body) = get(&proxy, "/session").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    let body = json(&body);
    assert_eq!(body["error"]["kind"], "upstream_timeout");
    assert_eq!(body["error"]["upstream"], upstream.as_str());
}

/// A runtime double whose `/global/health` demands the given password.
async fn healthy_runtime(password: &'static str) -> Upstream {
    Upstream::start(move |req: Request<Incoming>| async move {
        use base64::Engine as _;
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("opencode:{password}"))
        );
        let authorized = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v == expected.as_str());
        match (req.uri().path(), authorized) {
            ("/global/health", true) => {
                Response::new(Body::from(r#"{"healthy":true,"version":"1.18.33"}"#))
            }
            _ => Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .body(Body::empty())
                .unwrap(),
        }
    })
    .await
}

#[tokio::test]
async fn health_reports_the_runtime_version_with_taskgate_credentials() {
    let upstream = healthy_runtime("s3cret").await;
    let proxy = Proxy::start_with(&upstream.url(), |c| {
        c.upstream_auth.password = Some("s3cret".into());
    })
    .await;
    let (status, body) = get(&proxy, "/_taskgate/health").await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let body = json(&body);
    assert_eq!(body["proxy"], "up");
    assert_eq!(body["upstream"]["reachable"], true);
    assert_eq!(body["upstream"]["version"], "1.18.33");
}

#[tokio::test]
async fn health_is_503_when_the_runtime_is_down_or_refuses_taskgate() {
    let upstream = format!("http://{}", refused_addr().await);
    let proxy = Proxy::start(&upstream).await;
    let (status, body) = get(&proxy, "/_taskgate/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let body = json(&body);
    assert_eq!(body["proxy"], "up");
    assert_eq!(body["upstream"]["reachable"], false);
    assert_eq!(body["upstream"]["url"], upstream.as_str());

    let runtime = healthy_runtime("s3cret").await;
    let proxy = Proxy::start(&runtime.url()).await; // no password configured
    let (status, body) = get(&proxy, "/_taskgate/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        json(&body)["upstream"]["error"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{body:?}"
    );
}

#[tokio::test]
async fn metrics_count_requests_by_class_errors_streams_and_bytes() {
    let upstream = Upstream::start(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/event" => {
                let once = futures_util::stream::once(async {
                    Ok::<_, Infallible>(Bytes::from_static(b"data: {}\n\n"))
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(
                        once.chain(futures_util::stream::pending()),
                    ))
                    .unwrap()
            }
            "/missing" => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::from("{}"))
                .unwrap(),
            _ => Response::new(Body::from("hello")),
        }
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    assert_eq!(get(&proxy, "/ok").await.0, StatusCode::OK);
    assert_eq!(get(&proxy, "/missing").await.0, StatusCode::NOT_FOUND);
    let client = support::client();
    let sse = within(
        "the stream",
        client.get(proxy.url("/event").parse().unwrap()),
    )
    .await
    .unwrap();
    let mut sse = sse.into_body();
    within("an event", sse.frame()).await.unwrap().unwrap();

    let (status, body) = get(&proxy, "/_taskgate/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    for line in [
        "taskgate_requests_total{class=\"2xx\"} 2",
        "taskgate_requests_total{class=\"4xx\"} 1",
        "taskgate_sse_streams_open 1",
        "taskgate_response_body_bytes_total 17",
        "taskgate_request_duration_seconds_count{class=\"2xx\"} 2",
        "taskgate_upstream_up 1",
        &format!(
            "taskgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    drop(sse);

    // Before any request is forwarded, a scrape already says whether the runtime answers.
    let fresh = Proxy::start(&upstream.url()).await;
    let (_, body) = get(&fresh, "/_taskgate/metrics").await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.lines().any(|l| l == "taskgate_upstream_up 1"),
        "{text}"
    );

    let refused = Proxy::start(&format!("http://{}", refused_addr().await)).await;
    assert_eq!(get(&refused, "/x").await.0, StatusCode::BAD_GATEWAY);
    let (_, body) = get(&refused, "/_taskgate/metrics").await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    for line in [
        "taskgate_upstream_errors_total{kind=\"upstream_unreachable\"} 1",
        "taskgate_requests_total{class=\"5xx\"} 1",
        "taskgate_upstream_up 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn config_holds_and_method_rules_of_the_admin_endpoints() {
    let (upstream, mut seen) = support::recorder().await;
    let proxy = Proxy::start_with(&upstream.url(), |c| {
        c.upstream_auth.password = Some("hunter2-s3cret".into());
    })
    .await;
    let (status, body) = get(&proxy, "/_taskgate/config").await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(!text.contains("hunter2-s3cret"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
    assert!(text.contains(&upstream.url()), "{text}");

    let (status, body) = get(&proxy, "/_taskgate/holds").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body), serde_json::json!({"holds": []}));

    let req = Request::post(proxy.url("/_taskgate/health"))
        .body(Body::empty())
        .unwrap();
    let response = within("the response", support::client().request(req))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        seen.try_recv().is_err(),
        "an admin request reached the runtime"
    );
}

/// A runtime double whose `/slow` answers only when the test says so; it reports arrivals.
async fn slow_runtime() -> (Upstream, mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
    let (arrived_tx, arrived_rx) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
    let upstream = Upstream::start(move |_req: Request<Incoming>| {
        let arrived_tx = arrived_tx.clone();
        async move {
            let (release_tx, release_rx) = oneshot::channel();
            arrived_tx.send(release_tx).unwrap();
            let _ = release_rx.await;
            Response::new(Body::from("the whole answer"))
        }
    })
    .await;
    (upstream, arrived_rx)
}

#[tokio::test]
async fn graceful_shutdown_stops_accepting_and_lets_an_in_flight_request_finish() {
    let (upstream, mut arrived) = slow_runtime().await;
    let mut proxy = Proxy::start(&upstream.url()).await;
    let url = proxy.url("/session/ses_1/message");
    let in_flight = tokio::spawn(async move {
        let req = Request::post(url).body(Body::from("{}")).unwrap();
        let response = support::client().request(req).await.unwrap();
        let status = response.status();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    });
    let release = within("the request upstream", arrived.recv())
        .await
        .unwrap();
    proxy.shutdown.cancel();
    // New connections are refused once the accept loop has stopped.
    within("the listener to close", async {
        while TcpStream::connect(proxy.addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    release.send(()).unwrap();
    let (status, body) = within("the in-flight answer", in_flight).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "the whole answer");
    within("the proxy to return", proxy.finished())
        .await
        .unwrap();
}

#[tokio::test]
async fn shutdown_grace_bounds_a_request_that_never_finishes() {
    let (upstream, mut arrived) = slow_runtime().await;
    let mut proxy = Proxy::start_with(&upstream.url(), |c| {
        c.proxy.shutdown_grace.0 = Duration::from_millis(200);
    })
    .await;
    let url = proxy.url("/session/ses_1/message");
    let in_flight = tokio::spawn(async move {
        let req = Request::post(url).body(Body::from("{}")).unwrap();
        support::client().request(req).await
    });
    let _release = within("the request upstream", arrived.recv())
        .await
        .unwrap();
    proxy.shutdown.cancel();
    let result = within("the cut request", in_flight).await.unwrap();
    assert!(
        result.is_err(),
        "the client should see its connection closed"
    );
    within("the proxy to return", proxy.finished())
        .await
        .unwrap();
}

#[tokio::test]
async fn shutdown_ends_event_streams_and_websocket_tunnels_without_waiting_out_the_grace() {
    let upstream = Upstream::start(|req: Request<Incoming>| async move {
        if req.headers().contains_key("upgrade") {
            use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
            let key = derive_accept_key(req.headers()["sec-websocket-key"].as_bytes());
            let on_upgrade = hyper::upgrade::on(req);
            tokio::spawn(async move {
                // Hold the upgraded connection open, silent, like an idle terminal.
                let upgraded = on_upgrade.await.unwrap();
                futures_util::future::pending::<()>().await;
                drop(upgraded);
            });
            return Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", key)
                .body(Body::empty())
                .unwrap();
        }
        let once = futures_util::stream::once(async {
            Ok::<_, Infallible>(Bytes::from_static(b"data: {}\n\n"))
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(
                once.chain(futures_util::stream::pending()),
            ))
            .unwrap()
    })
    .await;
    // A grace far longer than the test's patience: ending on time proves the streams were
    // ended by the shutdown, not cut by the grace deadline.
    let mut proxy = Proxy::start_with(&upstream.url(), |c| {
        c.proxy.shutdown_grace.0 = Duration::from_secs(3600);
    })
    .await;
    let sse = within(
        "the stream",
        support::client().get(proxy.url("/event").parse().unwrap()),
    )
    .await
    .unwrap();
    let mut sse = sse.into_body();
    within("an event", sse.frame()).await.unwrap().unwrap();
    let (mut ws, _) = within(
        "the handshake",
        tokio_tungstenite::connect_async(format!("ws://{}/pty/p/connect", proxy.addr)),
    )
    .await
    .unwrap();

    proxy.shutdown.cancel();
    assert!(
        within("the event stream to end", sse.frame())
            .await
            .is_none(),
        "the stream ends cleanly"
    );
    match within("the tunnel to close", ws.next()).await {
        None | Some(Err(_)) => {}
        Some(Ok(msg)) => panic!("unexpected message {msg:?}"),
    }
    within("the proxy to return", proxy.finished())
        .await
        .unwrap();
}

/// A runtime that answers one request (`ok`, keep-alive) on each connection and closes the
/// connection, idle, when told (as one whose keep-alive timeout ran out), reporting each close.
struct ClosingRuntime {
    addr: SocketAddr,
    close: tokio::sync::watch::Sender<u32>,
    closed: mpsc::UnboundedReceiver<()>,
}

impl ClosingRuntime {
    async fn start() -> ClosingRuntime {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let (close, close_rx) = tokio::sync::watch::channel(0);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let closed_tx = closed_tx.clone();
                let mut close_rx = close_rx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                    let _ = close_rx.changed().await;
                    drop(stream);
                    let _ = closed_tx.send(());
                });
            }
        });
        ClosingRuntime {
            addr,
            close,
            closed,
        }
    }

    /// Closes the connections answered so far and waits for `n` of them to be closed.
    async fn close_idle(&mut self, n: usize) {
        self.close.send_modify(|generation| *generation += 1);
        for _ in 0..n {
            within("the runtime's close", self.closed.recv())
                .await
                .unwrap();
        }
    }
}

/// The pool taskgate used before retried a request whose pooled connection the runtime had
/// closed while idle; the runtime connection a client connection keeps must be replaced the
/// same way, or the next request on that client connection is a 502.
#[tokio::test]
async fn a_runtime_connection_closed_while_idle_is_replaced_for_the_next_request() {
    let mut runtime = ClosingRuntime::start().await;
    let proxy = Proxy::start(&format!("http://{}", runtime.addr)).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for round in 0..3 {
        let request = Request::get("/session")
            .header(http::header::HOST, "t")
            .body(Body::empty())
            .unwrap();
        let response = within("the response", sender.send_request(request))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {round}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        runtime.close_idle(1).await;
    }
}

/// The same for a runtime connection a client connection left idle when it ended: the next
/// client connection takes it, finds it closed (hyper hands the request back unsent), and
/// sends the request on a new one.
#[tokio::test]
async fn a_spare_runtime_connection_closed_while_idle_is_replaced() {
    let mut runtime = ClosingRuntime::start().await;
    let proxy = Proxy::start(&format!("http://{}", runtime.addr)).await;
    for round in 0..3 {
        let raw = support::raw_exchange(
            proxy.addr,
            b"GET /session HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await;
        let (head, body) = support::split_response(&raw);
        assert!(head.starts_with("HTTP/1.1 200"), "request {round}: {head}");
        assert_eq!(body, b"ok");
        runtime.close_idle(1).await;
    }
}

/// The benchmark's 502 (docs/performance.md): when `wrk` ended a run with requests in flight,
/// the runtime connection of an abandoned request was used again and the next request on it
/// failed. A client connection that leaves with its request in flight must not spoil a runtime
/// connection for anyone else.
#[tokio::test]
async fn an_abandoned_request_does_not_break_the_next_one() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start(|_req| async { Response::new(Body::from("ok")) }).await;
    let proxy = Proxy::start(&upstream.url()).await;
    for round in 0..5 {
        // Sent and abandoned at once: the client closes before any answer can come.
        let mut abandoned = TcpStream::connect(proxy.addr).await.unwrap();
        abandoned
            .write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        drop(abandoned);
        let (status, body) = get(&proxy, "/next").await;
        assert_eq!(status, StatusCode::OK, "round {round}: {body:?}");
        assert_eq!(&body[..], b"ok");
    }
}
