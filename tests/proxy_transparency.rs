//! Transparency: what the runtime receives through taskgate is what the client sent, and what
//! the client receives is what the runtime answered, minus hop-by-hop fields.

#[path = "support/proxy.rs"]
mod support;

use axum::body::Body;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::{head_headers, raw_exchange, recorder, split_response, within, Proxy, Upstream};

#[tokio::test]
async fn every_method_reaches_the_runtime_with_path_and_query_unchanged() {
    let (upstream, mut seen) = recorder().await;
    let proxy = Proxy::start(&upstream.url()).await;
    let client = support::client();
    let target = "/session/ses_1/message?directory=%2Fhome%2Fdev&limit=10";
    for method in [
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND",
    ] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let req = Request::builder()
            .method(method.clone())
            .uri(proxy.url(target))
            .body(Body::from("payload"))
            .unwrap();
        let response = within("the response", client.request(req)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{method}");
        let got = within("the upstream", seen.recv()).await.unwrap();
        assert_eq!(got.method, method);
        assert_eq!(got.target, target);
        assert_eq!(got.body, "payload", "{method}");
    }
}

#[tokio::test]
async fn odd_query_encodings_reach_the_runtime_byte_for_byte() {
    let (upstream, mut seen) = recorder().await;
    let proxy = Proxy::start(&upstream.url()).await;
    let targets = [
        "/file?path=%2Fhome%2Fdev%2Fa%20b.txt",
        "/find?pattern=a+b&pattern=c%2Bd&pattern=",
        "/find?bad=%zz&half=%2&pct=%25",
        "/a%2Fb//c/./../d?x=1&x=2&=v&flag",
        "/event?auth_token=b3BlbmNvZGU6cw%3D%3D&directory=%2F",
        "/q?x={json}&y=|pipe|&z=^caret^",
    ];
    for target in targets {
        let request = format!("GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let raw = raw_exchange(proxy.addr, request.as_bytes()).await;
        let (head, _) = split_response(&raw);
        assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
        let got = within("the upstream", seen.recv()).await.unwrap();
        assert_eq!(got.target, target);
    }
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_dropped_and_end_to_end_ones_kept() {
    let (upstream, mut seen) = recorder().await;
    let proxy = Proxy::start(&upstream.url()).await;
    let request = "POST /session/ses_1/message HTTP/1.1\r\n\
        Host: example.test:4097\r\n\
        Connection: close, X-Conn-Private\r\n\
        X-Conn-Private: secret\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: gzip\r\n\
        Trailer: X-Checksum\r\n\
        Upgrade: h2c\r\n\
        Proxy-Connection: keep-alive\r\n\
        Proxy-Authorization: Basic cHJveHk6cHJveHk=\r\n\
        Authorization: Basic b3BlbmNvZGU6czNjcmV0\r\n\
        x-opencode-directory: %2Fhome%2Fdev%2Fproject\r\n\
        x-opencode-workspace: wrk_1\r\n\
        Cookie: a=1\r\n\
        Cookie: b=2\r\n\
        X-Repeat: first\r\n\
        X-Repeat: second\r\n\
        Accept-Encoding: gzip, br\r\n\
        Content-Type: application/json\r\n\
        Content-Length: 2\r\n\
        \r\n{}";
    let raw = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert!(split_response(&raw).0.starts_with("HTTP/1.1 200"));
    let got = within("the upstream", seen.recv()).await.unwrap();
    let h = &got.headers;
    for gone in [
        "x-conn-private",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "transfer-encoding",
    ] {
        assert!(!h.contains_key(gone), "{gone} was forwarded: {h:?}");
    }
    // The pooled client keeps its own connection to the runtime alive; no client option leaks.
    assert!(h
        .get_all("connection")
        .iter()
        .all(|v| !v.to_str().unwrap().contains("X-Conn-Private")));
    assert_eq!(h["authorization"], "Basic b3BlbmNvZGU6czNjcmV0");
    assert_eq!(h["x-opencode-directory"], "%2Fhome%2Fdev%2Fproject");
    assert_eq!(h["x-opencode-workspace"], "wrk_1");
    let cookies: Vec<_> = h.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    let repeats: Vec<_> = h.get_all("x-repeat").iter().collect();
    assert_eq!(repeats, ["first", "second"]);
    assert_eq!(h["accept-encoding"], "gzip, br");
    assert_eq!(h["content-length"], "2");
    assert_eq!(h["host"], "example.test:4097", "Host is the client's");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "example.test:4097");
    assert_eq!(got.body, "{}");
}

#[tokio::test]
async fn forwarded_headers_can_be_turned_off() {
    let (upstream, mut seen) = recorder().await;
    let proxy = Proxy::start_with(&upstream.url(), |c| c.proxy.forwarded_headers = false).await;
    let raw = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(split_response(&raw).0.starts_with("HTTP/1.1 200"));
    let got = within("the upstream", seen.recv()).await.unwrap();
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        assert!(!got.headers.contains_key(name), "{name} added");
    }
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_dropped_and_end_to_end_ones_kept() {
    let upstream = Upstream::start(|_req: Request<Incoming>| async {
        Response::builder()
            .header("connection", "x-up-private")
            .header("x-up-private", "internal")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("trailer", "x-checksum")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .header("x-repeat", "first")
            .header("x-repeat", "second")
            .header("content-type", "application/json")
            .body(Body::from("{\"ok\":true}"))
            .unwrap()
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let raw = raw_exchange(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = split_response(&raw);
    let headers = head_headers(&head);
    let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    for gone in [
        "x-up-private",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
    ] {
        assert!(!names.contains(&gone), "{gone} relayed: {head}");
    }
    let values = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(values("set-cookie"), ["a=1", "b=2"]);
    assert_eq!(values("x-repeat"), ["first", "second"]);
    assert_eq!(values("content-length"), ["11"]);
    assert_eq!(body, b"{\"ok\":true}");
}

#[tokio::test]
async fn status_codes_and_bodies_are_relayed_as_the_runtime_sent_them() {
    let upstream = Upstream::start(|req: Request<Incoming>| async move {
        let code: u16 = req.uri().path()[1..].parse().unwrap();
        let body = match code {
            204 | 304 => Body::empty(),
            _ => Body::from(format!("{{\"status\":{code}}}")),
        };
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::from_u16(code).unwrap();
        if code == 304 {
            response
                .headers_mut()
                .insert("etag", "\"v1\"".parse().unwrap());
        }
        response
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let client = support::client();
    for code in [200u16, 204, 304, 400, 401, 404, 409, 500, 503] {
        let response = within(
            "the response",
            client.get(proxy.url(&format!("/{code}")).parse().unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(response.status().as_u16(), code);
        let etag = response.headers().get("etag").cloned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        match code {
            204 | 304 => assert!(body.is_empty(), "{code} carried a body"),
            _ => assert_eq!(body, format!("{{\"status\":{code}}}")),
        }
        if code == 304 {
            assert_eq!(etag.unwrap(), "\"v1\"");
        }
    }
}

#[tokio::test]
async fn head_responses_keep_the_runtime_content_length() {
    let upstream = Upstream::start(|_req: Request<Incoming>| async {
        Response::builder()
            .header("content-length", "1234")
            .body(Body::empty())
            .unwrap()
    })
    .await;
    let proxy = Proxy::start(&upstream.url()).await;
    let raw = raw_exchange(
        proxy.addr,
        b"HEAD /doc HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = split_response(&raw);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head_headers(&head).contains(&("content-length".into(), "1234".into())),
        "{head}"
    );
    assert!(body.is_empty());
}

#[tokio::test]
async fn bodyless_requests_stay_bodyless_and_content_length_zero_is_kept() {
    let (upstream, mut seen) = recorder().await;
    let proxy = Proxy::start(&upstream.url()).await;
    raw_exchange(
        proxy.addr,
        b"GET /a HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    let got = within("the upstream", seen.recv()).await.unwrap();
    assert!(!got.headers.contains_key("transfer-encoding"));
    assert!(!got.headers.contains_key("content-length"));
    raw_exchange(
        proxy.addr,
        b"POST /session/ses_1/abort HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    let got = within("the upstream", seen.recv()).await.unwrap();
    assert!(!got.headers.contains_key("transfer-encoding"));
    assert_eq!(got.headers["content-length"], "0");
}

#[tokio::test]
async fn upstream_connections_are_pooled_across_client_connections() {
    let (upstream, mut seen) = recorder().await;
    let proxy = Proxy::start(&upstream.url()).await;
    for _ in 0..5 {
        // Each exchange is a fresh client connection that closes afterwards.
        let raw = raw_exchange(
            proxy.addr,
            b"GET /session HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(split_response(&raw).0.starts_with("HTTP/1.1 200"));
        within("the upstream", seen.recv()).await.unwrap();
    }
    // A client connection leaves its runtime connection to the next one a few microseconds
    // after its client saw the close, so a next client that is quicker than that (a thread
    // preempted there on a loaded machine) connects afresh: one extra is allowed, not one per
    // client connection.
    let connections = upstream.connections();
    assert!(
        connections <= 2,
        "{connections} runtime connections for 5 client connections"
    );
}

#[tokio::test]
async fn admin_prefix_is_never_forwarded() {
    let (upstream, mut seen) = recorder().await;
    let proxy = Proxy::start(&upstream.url()).await;
    let client = support::client();
    for path in ["/_taskgate/nope", "/_taskgate", "/_taskgate/health/extra"] {
        let response = within("the response", client.get(proxy.url(path).parse().unwrap()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["kind"], "not_found");
    }
    assert!(
        seen.try_recv().is_err(),
        "an admin request reached the runtime"
    );
    assert_eq!(upstream.connections(), 0);
}

#[tokio::test]
async fn http10_clients_are_answered_and_their_host_is_kept() {
    let (upstream, mut seen) = recorder().await;
    let proxy = Proxy::start(&upstream.url()).await;
    let raw = raw_exchange(
        proxy.addr,
        b"GET /session HTTP/1.0\r\nHost: legacy.test\r\n\r\n",
    )
    .await;
    let (head, body) = split_response(&raw);
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert_eq!(body, b"ok");
    let got = within("the upstream", seen.recv()).await.unwrap();
    assert_eq!(got.headers["host"], "legacy.test");
}
