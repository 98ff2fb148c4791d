//! The gate's JSON surfaces and admin views, against the simulated runtime while a background
//! child is busy: what a client polling the status map, reading history, or watching
//! `/global/event` sees through taskgate, next to what the runtime itself says.

#[path = "support/sim.rs"]
mod sim;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sim::Stack;
use taskgate::config::{Config, HumanDuration};
use taskgate::sim::SimOptions;
use tokio::time::Instant;

const PATIENCE: Duration = Duration::from_secs(10);

async fn stack(tune: impl FnOnce(&mut Config)) -> Stack {
    let options = SimOptions {
        time_scale: 0.5,
        ..SimOptions::default()
    };
    sim::stack(options, |c| {
        c.gate.settle_window = HumanDuration(Duration::from_millis(200));
        tune(c);
    })
    .await
}

async fn call(method: &str, url: &str, body: Option<Value>) -> (http::HeaderMap, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (headers, value)
}

async fn get(url: &str) -> Value {
    call("GET", url, None).await.1
}

/// Starts `scenario` through `base` without waiting, returns the root session id.
async fn start(base: &str, scenario: &str) -> String {
    let (_, session) = call("POST", &format!("{base}/session"), Some(json!({}))).await;
    let id = session["id"].as_str().unwrap().to_owned();
    let prompt = json!({"parts": [{"type": "text", "text": format!("SCENARIO:{scenario}")}]});
    call(
        "POST",
        &format!("{base}/session/{id}/prompt_async"),
        Some(prompt),
    )
    .await;
    id
}

/// Waits until the runtime itself shows the root idle with a busy child: the moment every
/// direct client is misled.
async fn until_root_idle_child_busy(sim: &str, root: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(
            Instant::now() < deadline,
            "the scenario never reached root idle, child busy"
        );
        let status = get(&format!("{sim}/session/status")).await;
        let children = get(&format!("{sim}/session/{root}/children")).await;
        let child = children[0]["id"].as_str().map(str::to_owned);
        let messages = get(&format!("{sim}/session/{root}/message")).await;
        let root_answered = messages
            .as_array()
            .and_then(|m| m.last())
            .is_some_and(|m| m["info"]["role"] == "assistant" && m["info"]["finish"] == "stop");
        if let Some(child) = child {
            if status.get(root).is_none() && status.get(&child).is_some() && root_answered {
                return child;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn status_map_lists_the_root_busy_while_its_child_works() {
    let stack = stack(|_| {}).await;
    let root = start(&stack.proxy, "bg-child").await;
    let child = until_root_idle_child_busy(&stack.sim, &root).await;
    let direct = get(&format!("{}/session/status", stack.sim)).await;
    assert!(
        direct.get(&root).is_none(),
        "the runtime lists the root idle: {direct}"
    );
    let proxied = get(&format!("{}/session/status", stack.proxy)).await;
    assert_eq!(proxied[&root], json!({"type": "busy"}), "{proxied}");
    assert_eq!(proxied[&child], json!({"type": "busy"}), "{proxied}");
}

/// Found by the fault soak: with no event stream holding the root (all cut by an outage, or a
/// client that only polls), the status map listed a root idle while its tree rested with a
/// launch not yet answered (`late-inject`: nothing busy anywhere for a while before the child's
/// result is injected). The tree is not terminal; taskgate must say busy.
#[tokio::test]
async fn status_lists_a_resting_root_with_an_unanswered_launch_busy_without_any_hold() {
    let stack = stack(|_| {}).await;
    let root = start(&stack.proxy, "late-inject").await;
    // The gap: the child idle, nothing in the runtime's status map, no result injected yet.
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(
            Instant::now() < deadline,
            "the scenario never reached its gap"
        );
        let status = get(&format!("{}/session/status", stack.sim)).await;
        let children = get(&format!("{}/session/{root}/children", stack.sim)).await;
        if let Some(child) = children[0]["id"].as_str() {
            let child_done = get(&format!("{}/session/{child}/message", stack.sim))
                .await
                .as_array()
                .and_then(|m| m.last().cloned())
                .is_some_and(|m| m["info"]["finish"] == "stop");
            if child_done && status.as_object().is_some_and(|m| m.is_empty()) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let proxied = get(&format!("{}/session/status", stack.proxy)).await;
    // Either the gap still lasts (taskgate must say busy) or the result was injected meanwhile
    // and the runtime lists the root busy itself: never absent.
    assert_eq!(proxied[&root], json!({"type": "busy"}), "{proxied}");
}

#[tokio::test]
async fn history_shows_the_launch_running_until_the_child_is_done() {
    let stack = stack(|_| {}).await;
    let root = start(&stack.proxy, "bg-child").await;
    let child = until_root_idle_child_busy(&stack.sim, &root).await;
    let direct = sim::task_part(&get(&format!("{}/session/{root}/message", stack.sim)).await);
    assert_eq!(direct["state"]["status"], "completed");
    let proxied = sim::task_part(&get(&format!("{}/session/{root}/message", stack.proxy)).await);
    assert_eq!(proxied["state"]["status"], "running", "{proxied}");
    let taskgate = &proxied["state"]["metadata"]["taskgate"];
    assert_eq!(taskgate["child"], child.as_str());
    assert_eq!(taskgate["original"]["status"], "completed");
    assert!(
        taskgate["reason"].as_str().unwrap().contains(&child),
        "{taskgate}"
    );

    // Once the child's tree is terminal, history reads as the runtime wrote it.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = sim::task_part(&get(&format!("{}/session/{root}/message", stack.proxy)).await);
        if now["state"]["status"] == "completed" {
            assert_eq!(now, direct_now(&stack.sim, &root, sim::task_part).await);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "history never showed the finished child"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn direct_now(sim: &str, root: &str, pick: impl Fn(&Value) -> Value) -> Value {
    pick(&get(&format!("{sim}/session/{root}/message")).await)
}

#[tokio::test]
async fn holds_and_metrics_show_what_is_held_and_how_it_ended() {
    let stack = stack(|_| {}).await;
    // A subscriber makes the event gate hold the root's idle and the launch part.
    let events = EventLog::open(&format!("{}/global/event", stack.proxy)).await;
    let root = start(&stack.proxy, "bg-child").await;
    let child = until_root_idle_child_busy(&stack.sim, &root).await;
    let deadline = Instant::now() + PATIENCE;
    let holds = loop {
        let holds = get(&format!("{}/_taskgate/holds", stack.proxy)).await;
        let list = holds["holds"].as_array().unwrap().clone();
        if list.iter().any(|h| h["kind"] == "idle") && list.iter().any(|h| h["kind"] == "part") {
            break list;
        }
        assert!(Instant::now() < deadline, "no idle and part holds: {holds}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let part = holds.iter().find(|h| h["kind"] == "part").unwrap();
    assert_eq!(part["session"], root.as_str());
    assert_eq!(part["child"], child.as_str());
    assert!(part["since_ms"].as_u64().unwrap() > 0);

    // The root never goes idle on the proxied stream while the child works.
    events.until_idle_of(&root).await;
    assert!(
        get(&format!("{}/session/status", stack.sim))
            .await
            .as_object()
            .unwrap()
            .is_empty(),
        "the proxied stream showed the root idle while the runtime still had busy sessions"
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let holds = get(&format!("{}/_taskgate/holds", stack.proxy)).await;
        if holds["holds"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "holds never released: {holds}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client
        .get(
            format!("{}/_taskgate/metrics", stack.proxy)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("taskgate_holds_total{face=\"client\",kind=\"part\"}"),
        "{text}"
    );
    assert!(
        text.contains("taskgate_releases_total{face=\"client\",verdict=\"completed\"}"),
        "{text}"
    );
    assert!(
        text.contains("taskgate_holds_open{face=\"client\"} 0"),
        "{text}"
    );
}

#[tokio::test]
async fn synchronous_prompt_returns_the_last_word_once_the_tree_is_done() {
    let stack = stack(|_| {}).await;
    let (_, session) = call("POST", &format!("{}/session", stack.proxy), Some(json!({}))).await;
    let id = session["id"].as_str().unwrap();
    let prompt = json!({"parts": [{"type": "text", "text": "SCENARIO:bg-child"}]});
    let (headers, reply) = call(
        "POST",
        &format!("{}/session/{id}/message", stack.proxy),
        Some(prompt),
    )
    .await;
    assert_eq!(headers["x-taskgate-verdict"], "completed");
    let text: Vec<&str> = reply["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert_eq!(text, vec!["FINAL: parent got the child result"], "{reply}");
    assert!(get(&format!("{}/session/status", stack.sim))
        .await
        .as_object()
        .unwrap()
        .is_empty());
}

/// Everything a `/global/event` subscriber received, readable while it keeps arriving.
struct EventLog {
    rx: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl EventLog {
    async fn open(url: &str) -> EventLog {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let response = client.get(url.parse().unwrap()).await.unwrap();
        let mut body = response.into_body();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut decoder = taskgate::opencode::sse::SseDecoder::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                for f in decoder.push(&data) {
                    if let Ok(v) = serde_json::from_str::<Value>(&f.data) {
                        let _ = tx.send(v);
                    }
                }
            }
        });
        EventLog { rx }
    }

    /// Waits for the first `session.idle` of `session` on this stream.
    async fn until_idle_of(mut self, session: &str) {
        let wait = async {
            while let Some(v) = self.rx.recv().await {
                let p = &v["payload"];
                if p["type"] == "session.idle" && p["properties"]["sessionID"] == session {
                    return;
                }
            }
            panic!("the stream ended before the root went idle");
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("root idle arrived");
    }
}

/// While a prompt is held, its row in `/_taskgate/holds` says what the latest read found (the
/// bug this pins: every row said "waiting for the first read" until it ended).
#[tokio::test]
async fn a_hold_row_names_the_blocking_child_while_it_waits() {
    let stack = stack(|_| {}).await;
    let root = start(&stack.proxy, "bg-child").await;
    let child = until_root_idle_child_busy(&stack.sim, &root).await;
    let url = format!("{}/session/{root}/message", stack.proxy);
    let held = tokio::spawn(async move {
        call(
            "POST",
            &url,
            Some(json!({"parts": [{"type": "text", "text": "anything else?"}]})),
        )
        .await
    });
    let deadline = Instant::now() + PATIENCE;
    loop {
        let holds = get(&format!("{}/_taskgate/holds", stack.proxy)).await;
        let row = holds["holds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["kind"] == "prompt")
            .cloned();
        if let Some(row) = row.filter(|r| r["reason"].as_str().unwrap_or("").contains(&child)) {
            assert_eq!(row["verdict"], "running", "{row}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no hold row named the busy child {child}: {holds}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not a sync
    }
    held.abort();
}
