//! Streaming: bodies flow through taskgate as they are produced, both ways, byte for byte;
//! event streams are relayed event by event; upgrades are tunnelled; a client that goes away
//! cancels what it started upstream.

#[path = "support/proxy.rs"]
mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::{pattern, recorder, within, Proxy, Upstream};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

const TEN_MIB: usize = 10 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// A body that yields what is sent on the returned channel, chunk by chunk, unsized.
fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (tx, Body::from_stream(stream))
}

/// An unsized body made of `data` in [`CHUNK`]-sized pieces (sent chunked on the wire).
fn chunked(data: Vec<u8>) -> Body {
    let chunks: Vec<Result<Bytes, Infallible>> = data
        .chunks(CHUNK)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn ten_mib_uploads_arrive_byte_identical_sized_and_chunked() {
    let (upstream, mut seen) = recorder().await;
    let proxy = Proxy::start(&upstream.url()).await;
    let client = support::client();
    let data = pattern(TEN_MIB);
    for (name, body) in [
        ("sized", Body::from(data.clone())),
        ("chunked", chunked(data.clone())),
    ] {
        let req = Request::post(proxy.url("/file/upload")).body(body).unwrap();
        let response = within("the response", client.request(req)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{name}");
        let got = within("the upstream", seen.recv()).await.unwrap();
        assert!(
            got.body == data,
            "{name}: body differs ({} bytes)",
            got.body.len()
        );
        match name {
            "sized" => assert_eq!(got.headers["content-length"], "10485760"),
            _ => assert_eq!(got.headers["transfer-encoding"], "chunked"),
        }
    }
}

#[tokio::test]
async fn ten_mib_downloads_arrive_byte_identical_sized_and_chunked() {
    let upstream = Upstream::start(|req: Request<Incoming>| async move {
        let data = pattern(TEN_MIB);
        match req.uri().path() {
            "/sized" => Response::new(Body::from(data)),
            _ => Response::new(chunked(data)),
        }
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let client = support::client();
    let data = pattern(TEN_MIB);
    for path in ["/sized", "/chunked"] {
        let response = within("the response", client.get(proxy.url(path).parse().unwrap()))
            .await
            .unwrap();
        let headers = response.headers().clone();
        let body = within("the body", response.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        assert!(body == data, "{path}: body differs ({} bytes)", body.len());
        match path {
            "/sized" => assert_eq!(headers["content-length"], "10485760"),
            _ => assert_eq!(headers["transfer-encoding"], "chunked"),
        }
    }
}

#[tokio::test]
async fn request_body_chunks_reach_the_runtime_before_the_upload_ends() {
    let (first_tx, mut first_rx) = mpsc::unbounded_channel::<Bytes>();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let first_tx = first_tx.clone();
        async move {
            let mut body = req.into_body();
            let mut total = 0;
            let mut first = true;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    total += data.len();
                    if first {
                        first_tx.send(data).unwrap();
                        first = false;
                    }
                }
            }
            Response::new(Body::from(total.to_string()))
        }
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let (tx, body) = channel_body();
    let req = Request::post(proxy.url("/session/ses_1/message"))
        .body(body)
        .unwrap();
    let client = support::client();
    let response = tokio::spawn(async move { client.request(req).await });
    tx.send(Bytes::from_static(b"first chunk")).await.unwrap();
    // The second chunk is only produced once the runtime has the first: a proxy that waited
    // for the whole upload would deadlock here.
    let first = within("the first chunk upstream", first_rx.recv())
        .await
        .unwrap();
    assert_eq!(first, "first chunk");
    tx.send(Bytes::from_static(b", second")).await.unwrap();
    drop(tx);
    let response = within("the response", response).await.unwrap().unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "19");
}

#[tokio::test]
async fn sse_first_event_reaches_the_client_before_the_runtime_sends_the_second() {
    const EVENT1: &[u8] = b"data: {\"type\":\"server.connected\",\"properties\":{}}\n\n";
    const EVENT2: &[u8] = b": keep-alive comment\ndata: {\"type\":\"session.idle\"}\n\n";
    let (saw_tx, saw_rx) = oneshot::channel::<()>();
    let saw_rx = Arc::new(Mutex::new(Some(saw_rx)));
    let upstream = Upstream::start(move |_req: Request<Incoming>| {
        let saw_rx = saw_rx.lock().unwrap().take().expect("one stream");
        async move {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                tx.send(Bytes::from_static(EVENT1)).await.unwrap();
                saw_rx.await.unwrap();
                tx.send(Bytes::from_static(EVENT2)).await.unwrap();
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(body)
                .unwrap()
        }
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let response = within(
        "the response head",
        support::client().get(proxy.url("/event?directory=%2F").parse().unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    let mut body = response.into_body();
    let mut received = Vec::new();
    while received.len() < EVENT1.len() {
        let frame = within("event 1", body.frame()).await.unwrap().unwrap();
        received.extend_from_slice(&frame.into_data().unwrap());
    }
    assert_eq!(received, EVENT1, "event 1 arrived whole and alone");
    saw_tx.send(()).unwrap();
    while let Some(frame) = within("event 2 and the end", body.frame()).await {
        received.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    assert_eq!(received, [EVENT1, EVENT2].concat());
}

/// A runtime connection that carries an event stream reads with a small buffer (64 KiB), since
/// hyper keeps a grown buffer for the connection's life (docs/performance.md, "Holds: a small
/// read buffer for event streams"). A burst far larger than that, and events larger than it,
/// must still arrive whole and in order.
#[tokio::test]
async fn an_event_stream_burst_larger_than_its_read_buffer_arrives_whole() {
    let burst: Vec<u8> = (0..6u8)
        .flat_map(|n| {
            let text = vec![b'a' + n; 150 * 1024];
            [b"data: ".as_slice(), &text, b"\n\n"].concat()
        })
        .collect();
    let sent = Bytes::from(burst.clone());
    let upstream = Upstream::start(move |_req: Request<Incoming>| {
        let sent = sent.clone();
        async move {
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from(sent))
                .unwrap()
        }
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let request = Request::get(proxy.url("/log/stream"))
        .header("accept", "text/event-stream")
        .body(Body::empty())
        .unwrap();
    let response = within("the response head", support::client().request(request))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let received = within("the whole burst", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert!(
        received[..] == burst[..],
        "{} of {} bytes, or not in order",
        received.len(),
        burst.len()
    );
}

/// The runtime connection made for an event stream keeps its small read buffer, so it is not
/// left idle for the next client connection, where a 10 MiB download could get it (plain ones
/// are: `upstream_connections_are_pooled_across_client_connections`): it closes when its
/// client connection ends.
#[tokio::test]
async fn an_event_stream_runtime_connection_closes_with_its_client_connection() {
    use tokio::io::AsyncReadExt;
    // A runtime that answers one request per connection, keeps the connection open, and
    // reports when taskgate closes it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, mut closed) = mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                          content-length: 9\r\n\r\ndata: 1\n\n",
                    )
                    .await
                    .unwrap();
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = closed_tx.send(());
            });
        }
    });
    let proxy = Proxy::start(&format!("http://{addr}")).await;
    let raw = support::raw_exchange(
        proxy.addr,
        b"GET /log/stream HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = support::split_response(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"data: 1\n\n");
    within(
        "the event stream's runtime connection to close",
        closed.recv(),
    )
    .await
    .unwrap();
}

/// An upstream WebSocket endpoint that echoes every message.
async fn websocket_echo(req: Request<Incoming>) -> Response<Body> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
    assert_eq!(req.headers()["upgrade"], "websocket");
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let upgraded = hyper_util::rt::TokioIo::new(on_upgrade.await.unwrap());
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(upgraded, Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            ws.send(msg).await.unwrap();
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(&key))
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn websocket_echo_is_tunnelled_through_taskgate() {
    let upstream = Upstream::start(websocket_echo).await;
    let proxy = Proxy::start(&upstream.url()).await;
    let url = format!("ws://{}/pty/pty_1/connect?directory=%2F", proxy.addr);
    let (mut ws, response) = within("the handshake", tokio_tungstenite::connect_async(url))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for msg in [Message::text("ls -la\r"), Message::binary(pattern(100_000))] {
        ws.send(msg.clone()).await.unwrap();
        let echoed = within("the echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(echoed, msg);
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn an_upgrade_the_runtime_refuses_is_relayed_as_a_plain_response() {
    let upstream = Upstream::start(|_req: Request<Incoming>| async {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from("no pty"))
            .unwrap()
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let url = format!("ws://{}/pty/missing/connect", proxy.addr);
    match within("the handshake", tokio_tungstenite::connect_async(url)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
        }
        other => panic!("expected a 404 handshake failure, got {other:?}"),
    }
}

/// Sends `()` on `tx` when dropped: how the upstream observes its response being abandoned.
struct DropSignal(Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn client_going_away_mid_download_cancels_the_runtime_response() {
    let (dropped_tx, dropped_rx) = oneshot::channel::<()>();
    let dropped_tx = Arc::new(Mutex::new(Some(dropped_tx)));
    let upstream = Upstream::start(move |_req: Request<Incoming>| {
        let signal = DropSignal(dropped_tx.lock().unwrap().take());
        async move {
            // An endless event stream: one frame per tick until somebody stops reading.
            let ticks = futures_util::stream::unfold(
                (signal, tokio::time::interval(Duration::from_millis(10))),
                |(signal, mut interval)| async move {
                    interval.tick().await;
                    Some((
                        Ok::<_, Infallible>(Bytes::from_static(b"data: {}\n\n")),
                        (signal, interval),
                    ))
                },
            );
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(ticks))
                .unwrap()
        }
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let client = support::client();
    let response = within(
        "the response",
        client.get(proxy.url("/event").parse().unwrap()),
    )
    .await
    .unwrap();
    let mut body = response.into_body();
    within("a first event", body.frame())
        .await
        .unwrap()
        .unwrap();
    drop(body);
    drop(client);
    within("the runtime to see its stream dropped", dropped_rx)
        .await
        .unwrap();
}

#[tokio::test]
async fn client_going_away_mid_upload_cancels_the_runtime_request() {
    let (got_tx, mut got_rx) = mpsc::unbounded_channel::<&'static str>();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let got_tx = got_tx.clone();
        async move {
            let mut body = req.into_body();
            loop {
                match body.frame().await {
                    Some(Ok(_)) => got_tx.send("bytes").unwrap(),
                    Some(Err(_)) => {
                        got_tx.send("broken").unwrap();
                        break;
                    }
                    None => {
                        got_tx.send("complete").unwrap();
                        break;
                    }
                }
            }
            Response::new(Body::empty())
        }
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"POST /file/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    assert_eq!(
        within("the first bytes", got_rx.recv()).await,
        Some("bytes")
    );
    drop(stream);
    let mut outcome = "bytes";
    while outcome == "bytes" {
        outcome = within("the upload to end", got_rx.recv()).await.unwrap();
    }
    assert_eq!(
        outcome, "broken",
        "the runtime must not see a complete body"
    );
}

#[tokio::test]
async fn client_going_away_while_the_runtime_thinks_cancels_the_runtime_request() {
    let (arrived_tx, mut arrived_rx) = mpsc::unbounded_channel::<()>();
    let (dropped_tx, dropped_rx) = oneshot::channel::<()>();
    let dropped_tx = Arc::new(Mutex::new(Some(dropped_tx)));
    let upstream = Upstream::start(move |_req: Request<Incoming>| {
        let signal = DropSignal(dropped_tx.lock().unwrap().take());
        let arrived_tx = arrived_tx.clone();
        async move {
            // `POST /session/:id/message` answers only when the agent loop ends: never, here.
            arrived_tx.send(()).unwrap();
            futures_util::future::pending::<()>().await;
            drop(signal);
            Response::new(Body::empty())
        }
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"POST /session/ses_1/message HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await
        .unwrap();
    within("the request upstream", arrived_rx.recv())
        .await
        .unwrap();
    drop(stream);
    within("the runtime to see its request dropped", dropped_rx)
        .await
        .unwrap();
}
