//! Hostile and unlucky clients: slow heads, idle connections, too many connections, duplicate
//! `Host`, broken bodies, clients that leave while nobody reads, and who may use `/_taskgate/`.

#[path = "support/proxy.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use http::Response;
use http_body_util::BodyExt;
use support::{raw_exchange, split_response, within, Proxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

/// Reads until the server closes the connection (EOF or reset) and returns what it sent.
async fn until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut out = Vec::new();
    within(what, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    out
}

async fn ok_upstream() -> Upstream {
    Upstream::start(|_req| async { Response::new(Body::from("ok")) }).await
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

async fn metrics(proxy: &Proxy) -> String {
    let raw = raw_exchange(
        proxy.addr,
        b"GET /_taskgate/metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    String::from_utf8_lossy(&split_response(&raw).1).into_owned()
}

/// A client sending one header byte at a time (or stopping mid-head) kept its connection
/// forever: hyper's header timeout needs a timer on the server builder, and had none.
#[tokio::test]
async fn slow_header_client_is_disconnected_after_header_read_timeout() {
    let upstream = ok_upstream().await;
    let proxy = Proxy::start_with(&upstream.url(), |c| {
        c.proxy.header_read_timeout.0 = Duration::from_millis(500);
    })
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    until_closed(&mut stream, "the slow client to be disconnected").await;
    // A connection that never sends a byte is no better.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    until_closed(&mut silent, "the silent client to be disconnected").await;
}

/// A kept-alive connection with nothing in flight stayed open for good.
#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let upstream = ok_upstream().await;
    let proxy = Proxy::start_with(&upstream.url(), |c| {
        c.proxy.idle_timeout.0 = Duration::from_millis(300);
    })
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let out = until_closed(&mut stream, "the idle connection to be closed").await;
    let (head, body) = split_response(&out);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok");
}

/// The idle timer does not cut a request in flight, however long it lasts.
#[tokio::test]
async fn idle_timeout_never_cuts_a_request_in_flight() {
    let (tx, mut rx) = mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
    let upstream = Upstream::start(move |_req| {
        let tx = tx.clone();
        async move {
            let (release, released) = tokio::sync::oneshot::channel();
            tx.send(release).unwrap();
            let _ = released.await;
            Response::new(Body::from("late"))
        }
    })
    .await;
    let proxy = Proxy::start_with(&upstream.url(), |c| {
        c.proxy.idle_timeout.0 = Duration::from_millis(50);
    })
    .await;
    let url = proxy.url("/slow");
    let request = tokio::spawn(async move {
        let response = support::client().get(url.parse().unwrap()).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    });
    let release = within("the request upstream", rx.recv()).await.unwrap();
    // Many idle periods pass while the runtime thinks (time passing is the point here).
    tokio::time::sleep(Duration::from_millis(500)).await;
    release.send(()).unwrap();
    let body = within("the response", request).await.unwrap();
    assert_eq!(&body[..], b"late");
}

/// Connections beyond `proxy.max_connections` wait; once one closes, the next is served.
#[tokio::test]
async fn connections_beyond_max_connections_wait_until_a_slot_frees() {
    let upstream = ok_upstream().await;
    let proxy = Proxy::start_with(&upstream.url(), |c| {
        c.proxy.max_connections = 2;
    })
    .await;
    let first = TcpStream::connect(proxy.addr).await.unwrap();
    let second = TcpStream::connect(proxy.addr).await.unwrap();
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    third
        .write_all(b"GET /_taskgate/health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "the third connection was served beyond the cap"
    );
    drop(first);
    let mut out = byte[..0].to_vec();
    within("the third connection's answer", third.read_to_end(&mut out))
        .await
        .unwrap();
    let (head, _) = split_response(&out);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(second);
}

/// RFC 9112 §3.2: more than one `Host` field line is a 400, never forwarded.
#[tokio::test]
async fn duplicate_host_headers_are_a_400() {
    let (upstream, mut seen) = support::recorder().await;
    let proxy = Proxy::start(&upstream.url()).await;
    let raw = raw_exchange(
        proxy.addr,
        b"GET /session HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = split_response(&raw);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(json(&body)["error"]["kind"], "duplicate_host");
    assert!(seen.try_recv().is_err(), "nothing reached the runtime");
    assert_eq!(upstream.connections(), 0);
}

/// Malformed chunked framing from the client was answered 502 and counted as an upstream error.
#[tokio::test]
async fn malformed_client_body_is_a_client_error_not_an_upstream_error() {
    let upstream = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        let _ = req.into_body().collect().await;
        Response::new(Body::from("ok"))
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let raw = raw_exchange(
        proxy.addr,
        b"POST /session HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nabcd\r\nzz\r\n",
    )
    .await;
    let (head, body) = split_response(&raw);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(json(&body)["error"]["kind"], "client_body");
    let text = metrics(&proxy).await;
    assert!(
        text.contains("taskgate_client_errors_total{kind=\"client_body\"} 1"),
        "{text}"
    );
    assert!(!text.contains("taskgate_upstream_errors_total{"), "{text}");
}

/// A runtime that reads a request's head and then stops reading its body, on a socket with a
/// small receive buffer so the proxy's writes stall quickly. Sends once it has the head, then
/// once its connection is closed or reset by the proxy.
async fn stalled_reader() -> (SocketAddr, mpsc::UnboundedReceiver<&'static str>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(8).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.readable().await.unwrap();
            match stream.try_read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                Ok(_) => panic!("closed before the head"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        tx.send("head").unwrap();
        // From here on nothing is read. With the body's bytes queued behind a full window, a
        // FIN could never arrive; only a reset tells this end the request is over.
        let _ = stream.ready(tokio::io::Interest::ERROR).await;
        let _ = tx.send("closed");
    });
    (addr, rx)
}

/// A client left mid-upload while the runtime had stopped reading: nobody read the client's
/// socket any more, so its reset went unseen and the upstream request stayed open for good.
#[tokio::test]
async fn client_leaving_mid_upload_while_the_runtime_stops_reading_closes_the_upstream_request() {
    let (upstream, mut events) = stalled_reader().await;
    let proxy = Proxy::start(&format!("http://{upstream}")).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let client = socket.connect(proxy.addr).await.unwrap();
    client
        .try_write(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1073741824\r\n\r\n")
        .unwrap();
    assert_eq!(
        within("the head upstream", events.recv()).await,
        Some("head")
    );
    // Write until every buffer on the way is full: the client's writes stop making progress.
    let chunk = vec![b'x'; 64 * 1024];
    loop {
        match client.try_write(&chunk) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let writable =
                    tokio::time::timeout(Duration::from_millis(500), client.writable()).await;
                if writable.is_err() {
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Leave: a reset, as a killed client with unsent bytes causes.
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    assert_eq!(
        within("the upstream request to be closed", events.recv()).await,
        Some("closed")
    );
}

/// With `proxy.admin_token`, `/_taskgate/` answers only requests bearing it (loopback too),
/// and never shows it.
#[tokio::test]
async fn admin_token_is_required_when_configured_and_never_shown() {
    let upstream = ok_upstream().await;
    let proxy = Proxy::start_with(&upstream.url(), |c| {
        c.proxy.admin_token = Some("tok-7f3a9".to_owned());
    })
    .await;
    for path in ["health", "metrics", "config", "holds", "nope"] {
        let request =
            format!("GET /_taskgate/{path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let raw = raw_exchange(proxy.addr, request.as_bytes()).await;
        let (head, body) = split_response(&raw);
        assert!(head.starts_with("HTTP/1.1 401"), "{path}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
        assert_eq!(json(&body)["error"]["kind"], "admin_unauthorized");
        let request = format!(
            "GET /_taskgate/{path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer tok-7f3a8\r\nConnection: close\r\n\r\n"
        );
        let raw = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(
            String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 401"),
            "{path}"
        );
    }
    let raw = raw_exchange(
        proxy.addr,
        b"GET /_taskgate/config HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer tok-7f3a9\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = split_response(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("tok-7f3a9"), "{text}");
    assert!(text.contains("admin_token = \"<redacted>\""), "{text}");
    // Forwarded routes are the runtime's business, token or not.
    let raw = raw_exchange(
        proxy.addr,
        b"GET /session HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
}
