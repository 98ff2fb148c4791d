//! What the model face must not touch: true claims, requests without claims, other routes and
//! bodies, provider credentials, and the streamed answer.

#[path = "support/model.rs"]
mod model;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use model::{client, config, post, text, Face, Provider, ScriptedTruth, FIRST_FRAME, LAST_FRAMES};
use serde_json::json;
use taskgate::oracle::Verdict;

const CHILD: &str = "ses_df4c7ab9bffecks0CL3iL16K45";

fn claim_request() -> String {
    // Key order and spacing a serializer would not produce, so any re-encoding shows.
    format!(
        "{{\"stream\":true, \"model\":\"scripted\",\"messages\":[{{\"role\":\"user\",\"content\":\"go\"}},\
         {{\"role\":\"assistant\",\"tool_calls\":[{{\"id\":\"c1\",\"type\":\"function\",\"function\":{{\"name\":\"background_output\",\"arguments\":\"{{\\\"task_id\\\":\\\"bg_04817ab3\\\"}}\"}}}}]}},\
         {{\"tool_call_id\":\"c1\",\"role\":\"tool\",\"content\":\"Task Result\\n\\nTask ID: bg_04817ab3\\nSession ID: {CHILD}\\n\\n---\\n\\ndone \\u00e9\"}}]}}"
    )
}

#[tokio::test]
async fn a_true_claim_passes_byte_for_byte_with_the_credentials() {
    let mut provider = Provider::start(false).await;
    let truth = ScriptedTruth::new();
    truth.set(
        CHILD,
        Verdict::Completed {
            text: Some("done".into()),
        },
    );
    let face = Face::start(&config(&provider.url, "60s"), truth.clone()).await;
    let body = claim_request();
    let response = client()
        .request(post(
            &format!("{}/openai-chat/chat/completions", face.url),
            &body,
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let got = provider.next().await;
    assert_eq!(truth.questions(), [CHILD], "the claim was checked");
    assert_eq!(&got.body[..], body.as_bytes(), "unchanged, byte for byte");
    assert_eq!(got.headers["authorization"], "Bearer sk-test-secret");
    assert_eq!(got.headers["x-api-key"], "sk-ant-test");
    assert_eq!(
        got.headers["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(text(response).await, format!("{FIRST_FRAME}{LAST_FRAMES}"));
}

#[tokio::test]
async fn requests_without_claims_and_other_routes_pass_untouched_and_unchecked() {
    let mut provider = Provider::start(false).await;
    let truth = ScriptedTruth::new();
    let face = Face::start(&config(&provider.url, "60s"), truth.clone()).await;
    let http = client();

    // A chat request with tool results that claim nothing.
    let plain = json!({"model": "m", "messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "read", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "Task Result\n\nSession ID: ses_notaclaimtool"}]})
    .to_string();
    http.request(post(
        &format!("{}/openai-chat/chat/completions", face.url),
        &plain,
    ))
    .await
    .unwrap();
    let got = provider.next().await;
    assert_eq!(&got.body[..], plain.as_bytes());

    // Not JSON: never read, even if it looks like a claim.
    let raw = format!("Task Result\n\nSession ID: {CHILD}");
    let request = http::Request::post(format!("{}/anthropic/messages", face.url))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(raw.clone())))
        .unwrap();
    http.request(request).await.unwrap();
    let got = provider.next().await;
    assert_eq!(got.target, "/v1/messages");
    assert_eq!(&got.body[..], raw.as_bytes());

    // Another route, with its query bytes kept.
    let request = http::Request::get(format!("{}/openai-responses/models?after=a%2Fb", face.url))
        .header("authorization", "Bearer sk-test-secret")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = http.request(request).await.unwrap();
    assert_eq!(response.headers()["x-provider"], "scripted");
    let got = provider.next().await;
    assert_eq!(
        (got.method.as_str(), got.target.as_str()),
        ("GET", "/v1/models?after=a%2Fb")
    );
    assert_eq!(got.headers["authorization"], "Bearer sk-test-secret");
    assert!(got.body.is_empty());

    assert!(truth.questions().is_empty(), "nothing was worth checking");

    // No provider prefix: answered by taskgate, not forwarded.
    let request = http::Request::get(format!("{}/v1/models", face.url))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = http.request(request).await.unwrap();
    assert_eq!(response.status(), 404);
    assert!(text(response).await.contains("/openai-chat"));
    assert!(!provider.has_pending());
}

#[tokio::test]
async fn the_answer_streams_through_as_the_provider_sends_it() {
    let mut provider = Provider::start(true).await;
    let face = Face::start(&config(&provider.url, "60s"), ScriptedTruth::new()).await;
    let response = client()
        .request(post(
            &format!("{}/openai-chat/chat/completions", face.url),
            "{\"model\":\"m\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
        ))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    provider.next().await;
    let mut body = response.into_body();
    // The first frame arrives while the provider still holds the rest back.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], FIRST_FRAME.as_bytes());
    provider.finish_stream();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], LAST_FRAMES.as_bytes());
}

#[tokio::test]
async fn an_unreachable_provider_is_a_json_502_naming_it() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{dead}");
    let face = Face::start(&config(&url, "60s"), ScriptedTruth::new()).await;
    let response = client()
        .request(post(
            &format!("{}/openai-chat/chat/completions", face.url),
            "{}",
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body = text(response).await;
    assert!(
        body.contains("model provider could not be reached"),
        "{body}"
    );
    assert!(body.contains(&url), "{body}");
}

/// The model face served its connections with no limits: a half-sent request head kept a
/// connection open for good. It now has the client face's header-read timeout and connection
/// cap.
#[tokio::test]
async fn model_face_closes_a_half_sent_head_and_caps_connections() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let provider = Provider::start(false).await;
    let mut config = config(&provider.url, "60s");
    config.proxy.header_read_timeout.0 = Duration::from_millis(300);
    config.proxy.max_connections = 1;
    let face = Face::start(&config, ScriptedTruth::new()).await;
    let addr = face.url.trim_start_matches("http://").to_owned();
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /openai-chat/chat/completions HTTP/1.1\r\nHo")
        .await
        .unwrap();
    // The cap is one connection: a second is served only once the slow one is closed.
    let mut second = TcpStream::connect(&addr).await.unwrap();
    second
        .write_all(b"GET /elsewhere HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the half-sent head was never closed");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut answer))
        .await
        .expect("the second connection served once the slot freed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}
