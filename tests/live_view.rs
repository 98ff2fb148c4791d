//! The live view against the simulated runtime over real loopback HTTP: `/_taskgate/holds`
//! read mid-hold names the session the hold waits for (title, agent) and why in plain words;
//! `/_taskgate/events` sends a snapshot at once and another when the hold ends, with the
//! release and its verdict; the model face's holds are listed beside the client face's.

#[path = "support/sim.rs"]
mod sim;

use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::{json, Value};
use taskgate::config::HumanDuration;
use taskgate::sim::SimOptions;
use tokio::time::Instant;

/// Bound on every wait: a hang fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(30);

/// The sim at half speed: the grandchild works for 6 s, a wide window to read the hold in.
async fn stack() -> sim::Stack {
    let options = SimOptions {
        time_scale: 2.0,
        ..SimOptions::default()
    };
    sim::stack(options, |c| {
        c.gate.settle_window = HumanDuration(Duration::from_millis(200))
    })
    .await
}

/// Starts the `grandchild` scenario with a synchronous prompt (held by taskgate until the
/// grandchild is done); returns the root and the prompt's answer to come.
async fn prompt_grandchild(stack: &sim::Stack) -> (String, tokio::task::JoinHandle<(u16, Value)>) {
    let (_, session) = sim::call(
        hyper::Method::POST,
        &format!("{}/session", stack.proxy),
        Some(json!({})),
    )
    .await;
    let root = session["id"].as_str().expect("a session id").to_owned();
    let url = format!("{}/session/{root}/message", stack.proxy);
    let reply = tokio::spawn(async move {
        sim::call(
            hyper::Method::POST,
            &url,
            Some(json!({"parts": [{"type": "text", "text": "SCENARIO:grandchild"}]})),
        )
        .await
    });
    (root, reply)
}

/// Polls `GET url` until `pred` picks something out of it (bounded).
async fn until<T>(url: &str, what: &str, pred: impl Fn(&Value) -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let body = sim::get(url).await;
        if let Some(found) = pred(&body) {
            return found;
        }
        assert!(Instant::now() < deadline, "never saw {what}; last {body}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not a sync
    }
}

/// The session under `parent` whose title starts with `title` (the runtime adds the agent),
/// as the runtime lists it.
async fn child_titled(sim_url: &str, parent: &str, title: &str) -> String {
    let url = format!("{sim_url}/session/{parent}/children");
    until(&url, title, |children| {
        children.as_array()?.iter().find_map(|c| {
            c["title"]
                .as_str()?
                .starts_with(title)
                .then(|| c["id"].as_str().unwrap_or_default().to_owned())
        })
    })
    .await
}

#[tokio::test]
async fn a_hold_row_read_mid_hold_names_the_grandchild_it_waits_for() {
    let stack = stack().await;
    let (root, reply) = prompt_grandchild(&stack).await;
    let child = child_titled(&stack.sim, &root, "child job").await;
    let grandchild = child_titled(&stack.sim, &child, "grandchild job").await;

    let holds = format!("{}/_taskgate/holds", stack.proxy);
    let row = until(&holds, "the prompt hold blocked by the grandchild", |v| {
        v["holds"].as_array()?.iter().find_map(|h| {
            (h["kind"] == "prompt" && h["blocking"]["id"] == grandchild.as_str()).then(|| h.clone())
        })
    })
    .await;
    assert_eq!(row["session"], root.as_str(), "{row}");
    assert_eq!(row["verdict"], "running", "{row}");
    assert_eq!(
        row["blocking"]["title"], "grandchild job (@general subagent)",
        "{row}"
    );
    assert_eq!(row["blocking"]["agent"], "general", "{row}");
    assert_eq!(
        row["reason"],
        format!("{grandchild} is busy"),
        "a plain reason, no clause number: {row}"
    );
    assert!(row["age_s"].is_u64(), "{row}");

    let (status, body) = tokio::time::timeout(PATIENCE, reply)
        .await
        .expect("the prompt is answered once the tree ends")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let view = sim::get(&format!("{}/_taskgate/view", stack.proxy)).await;
    let release = view["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["session"] == root.as_str())
        .unwrap_or_else(|| panic!("the release is listed: {view}"));
    assert_eq!(release["verdict"], "completed", "{release}");
    assert!(view["holds"].as_array().unwrap().is_empty(), "{view}");
}

/// The next `event: snapshot` of an event stream, parsed (keep-alive comments skipped).
async fn next_snapshot(body: &mut hyper::body::Incoming, buffer: &mut String) -> Value {
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                assert!(frame.starts_with("event: snapshot\n"), "{frame}");
                return serde_json::from_str(data).expect("a snapshot is JSON");
            }
            continue;
        }
        let frame = tokio::time::timeout(PATIENCE, body.frame())
            .await
            .expect("a snapshot within the bound")
            .expect("the stream stays open")
            .expect("the stream reads");
        if let Ok(data) = frame.into_data() {
            buffer.push_str(std::str::from_utf8(&data).expect("UTF-8"));
        }
    }
}

#[tokio::test]
async fn the_event_stream_sends_the_hold_then_its_release_without_being_asked_again() {
    let stack = stack().await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client
        .get(format!("{}/_taskgate/events", stack.proxy).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut buffer = String::new();
    let first = next_snapshot(&mut body, &mut buffer).await;
    assert_eq!(first["gate"], true, "{first}");
    assert!(first["holds"].as_array().unwrap().is_empty(), "{first}");

    let (root, reply) = prompt_grandchild(&stack).await;
    let mut held = false;
    loop {
        let snapshot = next_snapshot(&mut body, &mut buffer).await;
        let holds = snapshot["holds"].as_array().unwrap();
        held |= holds.iter().any(|h| h["session"] == root.as_str());
        let released = snapshot["releases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["session"] == root.as_str())
            .cloned();
        if let Some(release) = released {
            assert!(held, "the hold was sent before its release");
            assert_eq!(release["verdict"], "completed", "{release}");
            let tree = snapshot["trees"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["root"] == root.as_str())
                .unwrap_or_else(|| panic!("the root's tree is listed: {snapshot}"));
            assert_eq!(tree["verdict"], "completed", "{tree}");
            assert_eq!(tree["sessions"].as_array().unwrap().len(), 3, "{tree}");
            break;
        }
    }
    let (status, _) = reply.await.unwrap();
    assert_eq!(status, 200);
}

/// A model request whose newest tool result (oh-my-opencode's `background_output`) claims
/// `child` is done, in the OpenAI chat format.
fn premature_task_result(child: &str) -> String {
    let launch = format!("Background task launched.\n\nBackground Task ID: bg_1\nDescription: child job\nStatus: pending\n\n<task_metadata>\nsession_id: {child}\nbackground_task_id: bg_1\n</task_metadata>");
    let claim = format!("Task Result\n\nTask ID: bg_1\nDescription: child job\nDuration: 1s\nSession ID: {child}\n\n---\n\npartial");
    json!({"model": "scripted", "messages": [
        {"role": "user", "content": "Do the work in the background."},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "task", "arguments": "{\"run_in_background\":true}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": launch},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_2", "type": "function",
            "function": {"name": "background_output", "arguments": "{\"task_id\":\"bg_1\"}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": claim},
    ]})
    .to_string()
}

#[tokio::test]
async fn the_model_faces_hold_is_listed_beside_the_client_faces() {
    let sim = sim::start(2.0).await;
    let mut config = taskgate::config::Config::defaults();
    config.proxy.upstream = sim.url.clone();
    config.oracle.poll_interval = HumanDuration(Duration::from_millis(100));
    config.gate.settle_window = HumanDuration(Duration::from_millis(200));
    config.model.enabled = true;
    // Nothing listens there: the held request is answered 502 once released, which is all this
    // test needs of a provider.
    let nowhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    config.model.openai_chat = format!("http://{}/v1", nowhere.local_addr().unwrap());
    drop(nowhere);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("http://{}", listener.local_addr().unwrap());
    let model_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let model = format!("http://{}", model_listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let _stack = taskgate::cmd::stack::start(config, listener, Some(model_listener), stop.clone());
    let _stop = stop.drop_guard();

    let (_, session) = sim::call(
        hyper::Method::POST,
        &format!("{}/session", sim.url),
        Some(json!({})),
    )
    .await;
    let root = session["id"].as_str().unwrap().to_owned();
    let (status, _) = sim::call(
        hyper::Method::POST,
        &format!("{}/session/{root}/prompt_async", sim.url),
        Some(json!({"parts": [{"type": "text", "text": "SCENARIO:grandchild"}]})),
    )
    .await;
    assert!((200..300).contains(&status), "{status}");
    let child = child_titled(&sim.url, &root, "child job").await;
    let grandchild = child_titled(&sim.url, &child, "grandchild job").await;

    let url = format!("{model}/openai-chat/chat/completions");
    let sent = tokio::spawn(async move {
        sim::call(
            hyper::Method::POST,
            &url,
            Some(serde_json::from_str(&premature_task_result(&child)).unwrap()),
        )
        .await
    });
    let row = until(
        &format!("{proxy}/_taskgate/holds"),
        "the model face's hold",
        |v| {
            v["holds"]
                .as_array()?
                .iter()
                .find(|h| h["face"] == "model")
                .filter(|h| h["blocking"]["id"] == grandchild.as_str())
                .cloned()
        },
    )
    .await;
    assert_eq!(row["kind"], "request", "{row}");
    assert_eq!(row["reason"], format!("{grandchild} is busy"), "{row}");

    tokio::time::timeout(PATIENCE, sent)
        .await
        .expect("the held request goes on once the tree ends")
        .unwrap();
    let view = sim::get(&format!("{proxy}/_taskgate/view")).await;
    assert!(
        view["releases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["face"] == "model" && r["verdict"] == "completed"),
        "{view}"
    );
    let (_, _, metrics) = get_raw(&format!("{proxy}/_taskgate/metrics")).await;
    assert!(
        metrics.contains("taskgate_releases_total{face=\"model\",verdict=\"completed\"} 1"),
        "{metrics}"
    );
}

/// The page's files carry no data and a browser cannot send a bearer token when it opens a
/// page: they are served to anyone, while the data behind them keeps the admin rule.
#[tokio::test]
async fn with_an_admin_token_the_page_loads_and_its_data_needs_the_token() {
    let stack = sim::stack(SimOptions::default(), |c| {
        c.proxy.admin_token = Some("s3cret-admin".to_owned())
    })
    .await;
    for (path, kind) in [
        ("/_taskgate/", "text/html"),
        ("/_taskgate/live.js", "text/javascript"),
        ("/_taskgate/live.css", "text/css"),
    ] {
        let (status, content_type, body) = get_raw(&format!("{}{path}", stack.proxy)).await;
        assert_eq!(status, 200, "{path}");
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert!(!body.is_empty(), "{path}");
    }
    let (_, _, page) = get_raw(&format!("{}/_taskgate/", stack.proxy)).await;
    assert!(page.contains("/_taskgate/live.js"), "{page}");
    for path in ["/_taskgate/events", "/_taskgate/view", "/_taskgate/holds"] {
        let (status, _, _) = get_raw(&format!("{}{path}", stack.proxy)).await;
        assert_eq!(status, 401, "{path}");
    }
}

/// `GET url`: status, content type and body as text.
async fn get_raw(url: &str) -> (u16, String, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client.get(url.parse().unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    )
}
