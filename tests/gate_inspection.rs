//! Bounded inspection: large bodies the gate reads and parses take a turn
//! (`proxy.inspect_concurrency`). Ten concurrent 15 MiB histories once took taskgate to 1.6 GB
//! and stalled unrelated requests; now the histories beyond the bound pass through uninspected
//! (counted), and a prompt reply waits for a turn instead, since its hold is a safety promise.

#[path = "support/proxy.rs"]
mod support;

use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::{raw_exchange, split_response, within, Proxy, Upstream};
use tokio::sync::{mpsc, Semaphore};

/// A message list of about `len` bytes with no claim in it: inspected, it comes back unchanged.
fn history(len: usize) -> Vec<u8> {
    let text = "x".repeat(64 * 1024);
    let mut out = b"[".to_vec();
    let mut n = 0;
    while out.len() < len {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(
            format!(
                r#"{{"info":{{"id":"msg_{n}","sessionID":"ses_big","role":"assistant"}},"parts":[{{"type":"text","text":"{text}"}}]}}"#
            )
            .as_bytes(),
        );
        n += 1;
    }
    out.push(b']');
    out
}

/// The first `head` bytes of `body` at once, the rest once `release` has a permit for it: the
/// runtime part-way through a large reply, for as long as the test needs.
fn held_back(body: Bytes, head: usize, release: Arc<Semaphore>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::spawn(async move {
        let _ = tx.send(Ok(body.slice(..head))).await;
        let Ok(_permit) = release.acquire().await else {
            return;
        };
        let _ = tx.send(Ok(body.slice(head..))).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn uninspected(proxy: &Proxy, kind: &str) -> u64 {
    let raw = raw_exchange(
        proxy.addr,
        b"GET /_taskgate/metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&split_response(&raw).1).into_owned();
    let series = format!("taskgate_passthrough_uninspected_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Sends `method path` through taskgate; returns when the response head arrives, with a task
/// that collects the body.
async fn send(
    proxy: &Proxy,
    method: Method,
    path: &str,
) -> (StatusCode, http::HeaderMap, tokio::task::JoinHandle<Bytes>) {
    let request = Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .header("content-type", "application/json")
        .body(Body::from(if path.ends_with("/message") {
            "{}"
        } else {
            ""
        }))
        .unwrap();
    let response = support::client().request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::spawn(async move { body.collect().await.unwrap().to_bytes() });
    (parts.status, parts.headers, body)
}

/// Ten concurrent large histories with two turns: eight pass through uninspected while the
/// runtime still holds their ends back (so none of them was read whole first); an unrelated
/// request is answered meanwhile; every byte arrives; a large prompt reply arriving while the
/// turns are taken waits for one and is still held, never passed through unheld.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_histories_beyond_the_bound_pass_through_uninspected_and_prompts_still_wait(
) {
    const LARGE: usize = 2 * 1024 * 1024;
    let body = Bytes::from(history(LARGE));
    let release = Arc::new(Semaphore::new(0));
    let (served, release_for, body_for) =
        (Arc::new(Semaphore::new(0)), release.clone(), body.clone());
    let served_for = served.clone();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let (release, body, served) = (release_for.clone(), body_for.clone(), served_for.clone());
        async move {
            let path = req.uri().path().to_owned();
            match (req.method().clone(), path.as_str()) {
                (Method::GET, p) if p.starts_with("/session/ses_big") => {
                    served.add_permits(1);
                    held_back(body, 512 * 1024, release)
                }
                // The prompt's reply is as large, and already complete.
                (Method::POST, "/session/ses_prompt/message") => {
                    served.add_permits(1);
                    Response::new(Body::from(body))
                }
                (Method::GET, "/session/status") => Response::new(Body::from("{}")),
                // The prompt's session is unknown to this runtime: its hold ends as `gone`.
                _ => Response::builder()
                    .status(404)
                    .body(Body::from(r#"{"name":"NotFoundError"}"#))
                    .unwrap(),
            }
        }
    })
    .await;
    let proxy = Proxy::start_with(&upstream.url(), |c| {
        c.gate.enabled = true;
        c.proxy.inspect_concurrency = 2;
    })
    .await;

    let mut bodies = Vec::new();
    let mut heads = mpsc::unbounded_channel();
    for i in 0..10 {
        let (proxy_url, tx) = (
            proxy.url(&format!("/session/ses_big{i}/message")),
            heads.0.clone(),
        );
        bodies.push(tokio::spawn(async move {
            let response = support::client()
                .get(proxy_url.parse().unwrap())
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let _ = tx.send(());
            response.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    within(
        "the runtime to start all ten replies",
        served.acquire_many(10),
    )
    .await
    .unwrap()
    .forget();
    // Eight heads arrive while the runtime still holds every reply's end back.
    for _ in 0..8 {
        within("a history passed through beyond the bound", heads.1.recv()).await;
    }
    assert_eq!(uninspected(&proxy, "concurrency").await, 8);

    // Unrelated requests are answered while the large ones are in flight.
    let (status, _, small) = within(
        "an unrelated request",
        send(&proxy, Method::GET, "/session/status"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(&within("its body", small).await.unwrap()[..], b"{}");

    // A large prompt reply while both turns are taken: it waits for one.
    let prompt = tokio::spawn({
        let url = proxy.url("/session/ses_prompt/message");
        async move {
            let request = Request::post(url).body(Body::from("{}")).unwrap();
            let response = support::client().request(request).await.unwrap();
            let status = response.status();
            let verdict = response.headers().get("x-taskgate-verdict").cloned();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, verdict, body)
        }
    });
    within("the runtime to answer the prompt", served.acquire())
        .await
        .unwrap()
        .forget();
    release.add_permits(10);
    for (i, received) in bodies.into_iter().enumerate() {
        let received = within("a history's whole body", received).await.unwrap();
        assert!(
            received == body,
            "history {i} arrived changed ({} bytes)",
            received.len()
        );
    }
    // Held (the runtime does not know the session, so the hold ends as `gone`), not passed.
    let (status, verdict, reply) = within("the prompt's answer", prompt).await.unwrap();
    assert_eq!(
        status,
        StatusCode::GONE,
        "{}",
        String::from_utf8_lossy(&reply[..reply.len().min(200)])
    );
    assert_eq!(verdict.unwrap(), "error");
    assert_eq!(uninspected(&proxy, "concurrency").await, 8);
}
