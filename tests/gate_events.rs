//! The event-stream gate, frame by frame, against a scripted runtime whose events the test
//! sends one at a time: a held idle never delays heartbeats or other sessions' events, is
//! dropped when the session works again, and is released, in order, once the tree is terminal.

#[path = "support/oracle.rs"]
mod oracle;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use oracle::{Data, Upstream, CHILD, PARENT};
use serde_json::{json, Value};
use taskgate::config::{Config, HumanDuration};
use taskgate::opencode::sse::SseDecoder;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(10);
const OTHER: &str = "ses_otherotherotherotherother1";

/// taskgate in front of the scripted runtime, and a `/global/event` subscriber through it.
struct Setup {
    up: Upstream,
    proxy: String,
    events: mpsc::UnboundedReceiver<Value>,
    shutdown: CancellationToken,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn setup(data: Data) -> Setup {
    setup_with(data, |_| {}).await
}

async fn setup_with(data: Data, tune: impl FnOnce(&mut Config)) -> Setup {
    let up = Upstream::start(data, None).await;
    let (proxy, shutdown) = up.behind_taskgate(tune).await;
    let events = subscribe(&proxy).await;
    Setup {
        up,
        proxy,
        events,
        shutdown,
    }
}

/// A `/global/event` subscriber through taskgate, once the runtime's greeting came through.
async fn subscribe(proxy: &str) -> mpsc::UnboundedReceiver<Value> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client
        .get(format!("{proxy}/global/event").parse().unwrap())
        .await
        .unwrap();
    let mut body = response.into_body();
    let (tx, mut events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut decoder = SseDecoder::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for f in decoder.push(&data) {
                if let Ok(v) = serde_json::from_str::<Value>(&f.data) {
                    let _ = tx.send(v["payload"].clone());
                }
            }
        }
    });
    // The stream is open end to end once the runtime's greeting came through.
    let first = next(&mut events).await;
    assert_eq!(first["type"], "server.connected");
    events
}

async fn next(events: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(PATIENCE, events.recv())
        .await
        .expect("an event arrived")
        .expect("the stream is open")
}

/// The next `n` events, described.
async fn next_described(events: &mut mpsc::UnboundedReceiver<Value>, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    while seen.len() < n {
        seen.push(describe(&next(events).await));
    }
    seen
}

/// How a session's two held idles read once released, in their order: `session.idle`, then
/// the `session.status` idle.
fn idles_of(session: &str) -> Vec<String> {
    vec![
        format!("session.idle {session}"),
        format!("session.status {session}"),
    ]
}

fn status(session: &str, kind: &str) -> Value {
    json!({"type": "session.status", "properties": {"sessionID": session, "status": {"type": kind}}})
}

fn idle(session: &str) -> Value {
    json!({"type": "session.idle", "properties": {"sessionID": session}})
}

fn heartbeat() -> Value {
    json!({"type": "server.heartbeat", "properties": {}})
}

fn describe(event: &Value) -> String {
    let kind = event["type"].as_str().unwrap_or("?");
    match event["properties"]["sessionID"].as_str() {
        Some(s) => format!("{kind} {s}"),
        None => kind.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_idle_delays_nothing_else_and_is_released_in_order_when_the_tree_is_done() {
    let mut s = setup(Data::child_busy()).await;
    let histories = || {
        s.up.double
            .message_reads
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = histories();
    s.up.double.emit(status(PARENT, "idle"));
    s.up.double.emit(idle(PARENT));
    // The gate's first read of the tree (the parent's and the child's histories) sees the child
    // busy; only then does the test let the child finish.
    oracle::eventually("the gate's read of the tree", PATIENCE, || {
        histories() >= before + 2
    })
    .await;
    s.up.double.emit(heartbeat());
    s.up.double.emit(status(OTHER, "busy"));
    // The parent's idles are held (its child works); what came after them passes at once.
    assert_eq!(describe(&next(&mut s.events).await), "server.heartbeat");
    assert_eq!(
        describe(&next(&mut s.events).await),
        format!("session.status {OTHER}")
    );

    // The child finishes and the parent answers the injected result: the tree is terminal.
    s.up.double.set(Data::all_done());
    s.up.double.emit(status(CHILD, "idle"));
    let seen = next_described(&mut s.events, 3).await;
    assert_eq!(
        seen,
        vec![
            format!("session.status {CHILD}"),
            format!("session.status {PARENT}"),
            format!("session.idle {PARENT}"),
        ],
        "the held idles come out in their original order, after the tree is done"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_idle_is_dropped_when_the_session_works_again() {
    let mut s = setup(Data::child_busy()).await;
    s.up.double.emit(idle(PARENT));
    // The runtime injects the child's result: the parent is busy again.
    s.up.double.emit(status(PARENT, "busy"));
    assert_eq!(
        describe(&next(&mut s.events).await),
        format!("session.status {PARENT}")
    );
    // The later idle, once the tree is done, is the only one the client sees.
    s.up.double.set(Data::all_done());
    s.up.double.emit(idle(PARENT));
    s.up.double.emit(heartbeat());
    assert_eq!(describe(&next(&mut s.events).await), "server.heartbeat");
    assert_eq!(
        describe(&next(&mut s.events).await),
        format!("session.idle {PARENT}")
    );
    s.up.double.emit(status(OTHER, "busy"));
    assert_eq!(
        describe(&next(&mut s.events).await),
        format!("session.status {OTHER}"),
        "no second (dropped) idle came through"
    );
}

/// Idles held on two trees of one stream: the tree that ends first releases its own idles and
/// nothing else; the other tree's idle stays held until that tree ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_ending_releases_only_the_frames_held_on_it() {
    let mut s = setup(Data::child_busy()).await;
    s.up.double.emit(idle(PARENT));
    s.up.double.emit(idle(CHILD));
    // The child's turn ends; the parent has not answered its result yet (clause 5).
    let done = Data::all_done();
    let mut child_done = Data::child_busy();
    child_done.statuses = done.statuses.clone();
    child_done
        .messages
        .insert(CHILD.to_owned(), done.messages[CHILD].clone());
    s.up.double.set(child_done);
    s.up.double.emit(status(CHILD, "idle"));
    assert_eq!(
        next_described(&mut s.events, 2).await,
        idles_of(CHILD),
        "the child's tree ended: its idles come out, in order"
    );
    s.up.double.emit(heartbeat());
    assert_eq!(
        describe(&next(&mut s.events).await),
        "server.heartbeat",
        "the parent's idle is still held: its launch is not answered"
    );
    s.up.double.set(done);
    s.up.double.emit(status(PARENT, "idle"));
    assert_eq!(next_described(&mut s.events, 2).await, idles_of(PARENT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_the_gate_cannot_parse_pass_untouched() {
    let mut s = setup(Data::child_busy()).await;
    s.up.double
        .emit(json!({"type": "unknown.kind", "properties": {"x": [1, 2]}}));
    s.up.double.emit(json!({"no_type": true}));
    let a = next(&mut s.events).await;
    assert_eq!(
        a,
        json!({"type": "unknown.kind", "properties": {"x": [1, 2]}})
    );
    let b = next(&mut s.events).await;
    assert_eq!(b, json!({"no_type": true}));
}

/// At `max_hold` a held idle is not passed on as if the tree were done: a `session.error`
/// saying why comes first, so a client that stops on the idle has been told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_hold_on_an_event_stream_sends_an_error_before_the_idle() {
    let mut s = setup_with(Data::child_busy(), |c| {
        c.gate.max_hold = HumanDuration(Duration::from_millis(300));
    })
    .await;
    s.up.double.emit(idle(PARENT));
    let error = next(&mut s.events).await;
    assert_eq!(describe(&error), format!("session.error {PARENT}"));
    assert_eq!(error["properties"]["error"]["name"], "TaskgateHoldError");
    let message = error["properties"]["error"]["data"]["message"]
        .as_str()
        .unwrap();
    assert!(message.contains(CHILD), "names the busy child: {message}");
    assert_eq!(
        describe(&next(&mut s.events).await),
        format!("session.idle {PARENT}")
    );
}

/// Reads grow with the trees waited on, not with the claims: idles held on many streams on one
/// tree are released together from the tree's own reads (one shared wait per tree), not from
/// a read (or a closing re-read) per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idles_held_on_many_streams_share_the_trees_reads() {
    const STREAMS: usize = 20;
    let mut s = setup(Data::child_busy()).await;
    let mut streams = vec![std::mem::replace(
        &mut s.events,
        mpsc::unbounded_channel().1,
    )];
    for _ in 1..STREAMS {
        streams.push(subscribe(&s.proxy).await);
    }
    s.up.double.emit(status(PARENT, "idle"));
    s.up.double.emit(idle(PARENT));
    let holds = || async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let body = client
            .get(format!("{}/_taskgate/holds", s.proxy).parse().unwrap())
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["holds"].as_array().map_or(0, Vec::len)
    };
    let until = tokio::time::Instant::now() + PATIENCE;
    while holds().await < 2 * STREAMS {
        assert!(
            tokio::time::Instant::now() < until,
            "every stream holds both idles"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = s.up.double.reads();
    s.up.double.set(Data::all_done());
    s.up.double.emit(status(CHILD, "idle"));
    for events in &mut streams {
        let seen = next_described(events, 3).await;
        assert_eq!(seen[2], format!("session.idle {PARENT}"));
    }
    let reads = s.up.double.reads() - before;
    // The event's re-read, the closing re-read, and a few for the events of the release
    // itself; one per stream would be at least 20.
    assert!(
        reads < STREAMS / 2,
        "{reads} tree reads to release {} idles held on {STREAMS} streams",
        2 * STREAMS
    );
}
