//! The fault soak (docs/reliability.md), ignored by `cargo test`. Run it with
//!
//! ```sh
//! SOAK_MINUTES=10 cargo test --test soak -- --ignored --nocapture
//! ```
//!
//! taskgate (the built binary, its own process, so its RSS and descriptors are its own) sits in
//! front of the simulated runtime through a fault shim. Clients run every scenario with held
//! prompts, `prompt_async` and the event stream, history and status reads, and some leave
//! mid-request. Meanwhile the shim takes the runtime away (every connection reset, new ones
//! refused, for 1 to 4 s, every 15 to 40 s), cuts every event-stream connection and a quarter of
//! the others after a random byte count (mid event, mid body), and fails (reset or 500) or slows
//! (0.2 to 2 s) a sixth of the connections at their first request. At the end it prints the
//! counts and fails on any false completion (a release as completed that the runtime's own
//! view, read directly, contradicts then or 2 s later), hang (no answer within the liveness
//! bound), event delivered twice or out of order on a stream (held idles and claim parts
//! aside: they wait aside by design), torn frame, hold left in `/_taskgate/holds`, or RSS and
//! descriptors not back near the start.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use taskgate::sim::{run, SimOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;

const SCENARIOS: [&str; 11] = [
    "plain",
    "bg-child",
    "bg-two",
    "bg-three",
    "grandchild",
    "fg-child",
    "omo",
    "child-fail",
    "retry",
    "late-inject",
    "status-missing",
];

/// No client waits longer than this for its answer: the longest scenario (4 s at scale 0.5),
/// the longest outage (4 s), the unreadable bound (max(rest_bound, 6 × request_timeout) = 12 s),
/// `rest_bound + settle_window + poll_interval` and slack. `max_hold` (60 s) is past it, so a
/// hold that only `max_hold` ends is a hang too.
const LIVENESS: Duration = Duration::from_secs(45);

/// A small xorshift: the soak needs dice, not a crate.
struct Dice(Mutex<u64>);

impl Dice {
    fn below(&self, n: u64) -> u64 {
        let mut s = self.0.lock().unwrap();
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s % n.max(1)
    }

    fn ms(&self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// The taskgate process, killed when the soak ends however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Why a request got no answer.
enum Failure {
    /// None within [`LIVENESS`]: a hang.
    TimedOut,
    /// The exchange broke (a cut the shim made shows through as a broken body).
    Broken,
}

/// What the shim does to the runtime.
struct Chaos {
    dice: Dice,
    down: AtomicBool,
    /// Cancelled when an outage starts: every relayed connection ends at once.
    outage: Mutex<CancellationToken>,
    outages: AtomicU64,
    cuts: AtomicU64,
    failed: AtomicU64,
    slowed: AtomicU64,
}

#[derive(Default)]
struct Tally {
    counts: BTreeMap<String, u64>,
    problems: Vec<String>,
}

struct Soak {
    proxy: String,
    sim: String,
    client: Client<HttpConnector, Full<Bytes>>,
    dice: Dice,
    tally: Mutex<Tally>,
}

impl Soak {
    fn count(&self, what: impl Into<String>) {
        *self
            .tally
            .lock()
            .unwrap()
            .counts
            .entry(what.into())
            .or_default() += 1;
    }

    fn problem(&self, what: String) {
        eprintln!("PROBLEM: {what}");
        self.tally.lock().unwrap().problems.push(what);
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<Value>,
    ) -> Result<(u16, http::HeaderMap, Bytes), Failure> {
        let request = Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .unwrap();
        let response = timeout(LIVENESS, self.client.request(request))
            .await
            .map_err(|_| Failure::TimedOut)?
            .map_err(|_| Failure::Broken)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = timeout(LIVENESS, response.into_body().collect())
            .await
            .map_err(|_| Failure::TimedOut)?
            .map_err(|_| Failure::Broken)?
            .to_bytes();
        Ok((status, headers, body))
    }

    async fn json(&self, url: &str) -> Option<Value> {
        let (status, _, body) = self.call(Method::GET, url, None).await.ok()?;
        (status == 200)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten()
    }

    /// A new root session, through taskgate (the shim may fail it: a few tries).
    async fn session(&self) -> Option<String> {
        for _ in 0..10 {
            if let Ok((200, _, body)) = self
                .call(
                    Method::POST,
                    &format!("{}/session", self.proxy),
                    Some(json!({})),
                )
                .await
            {
                if let Some(id) = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_owned))
                {
                    return Some(id);
                }
            }
            sleep(Duration::from_millis(200)).await;
        }
        self.count("setup_failed");
        None
    }

    /// The runtime's own view, read directly: the tree's sessions none busy, and the root's
    /// message count. `None` when the tree is not at rest.
    async fn at_rest(&self, root: &str) -> Option<usize> {
        let status = self.json(&format!("{}/session/status", self.sim)).await?;
        let mut tree = vec![root.to_owned()];
        let mut next = 0;
        while next < tree.len() {
            let children = self
                .json(&format!("{}/session/{}/children", self.sim, tree[next]))
                .await?;
            next += 1;
            for c in children.as_array()? {
                tree.push(c["id"].as_str()?.to_owned());
            }
        }
        if tree
            .iter()
            .any(|id| status.get(id).is_some_and(|s| s["type"] != "idle"))
        {
            return None;
        }
        let messages = self
            .json(&format!("{}/session/{root}/message", self.sim))
            .await?;
        let list = messages.as_array()?;
        let last = list.last()?;
        (last["info"]["role"] == "assistant" && last["info"]["time"]["completed"].is_number())
            .then_some(list.len())
    }

    /// A release as completed is checked against the runtime now and 2 s later (a result
    /// injected after the release would show as a new root message).
    async fn check_completion(self: &Arc<Self>, root: String, how: &'static str, scenario: &str) {
        let now = self.at_rest(&root).await;
        let Some(count) = now else {
            self.problem(format!(
                "false completion ({how}, {scenario}): {root}'s tree is not at rest in the runtime"
            ));
            return;
        };
        sleep(Duration::from_secs(2)).await;
        match self.at_rest(&root).await {
            Some(later) if later == count => self.count(format!("completion_verified_{how}")),
            _ => self.problem(format!(
                "false completion ({how}, {scenario}): {root}'s tree moved after its release"
            )),
        }
    }

    fn prompt(scenario: &str) -> Value {
        json!({"parts": [{"type": "text", "text": format!("please SCENARIO:{scenario}")}]})
    }

    /// A held synchronous prompt; `leave_after` makes the client vanish mid-hold.
    async fn sync_prompt(self: &Arc<Self>, scenario: &str, leave_after: Option<Duration>) {
        let Some(root) = self.session().await else {
            return;
        };
        let url = format!("{}/session/{root}/message", self.proxy);
        if let Some(after) = leave_after {
            let _ = timeout(
                after,
                self.call(Method::POST, &url, Some(Self::prompt(scenario))),
            )
            .await;
            self.count("prompt_client_left");
            return;
        }
        let started = Instant::now();
        let (status, headers, body) = match self
            .call(Method::POST, &url, Some(Self::prompt(scenario)))
            .await
        {
            Ok(answer) => answer,
            Err(Failure::Broken) => {
                self.count("prompt_broken");
                return;
            }
            Err(Failure::TimedOut) => {
                self.problem(format!(
                    "hang: prompt {scenario} {root} not answered within {LIVENESS:?}"
                ));
                return;
            }
        };
        let verdict = headers
            .get("x-taskgate-verdict")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        let kind = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| {
                v.pointer("/error/kind")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        self.count(format!(
            "prompt_{status}_{verdict}{}",
            if kind.is_empty() {
                String::new()
            } else {
                format!("_{kind}")
            }
        ));
        if kind == "tree_still_running" {
            self.problem(format!(
                "hang: prompt {scenario} {root} reached max_hold after {:?}",
                started.elapsed()
            ));
        }
        if status == 200 && verdict == "completed" {
            self.check_completion(root, "prompt", scenario).await;
        }
    }

    /// `prompt_async`, then the event stream until the root's idle comes through taskgate (or,
    /// after a cut, taskgate's status map no longer lists the root).
    async fn async_prompt(self: &Arc<Self>, scenario: &str) {
        let Some(root) = self.session().await else {
            return;
        };
        let deadline = Instant::now() + LIVENESS;
        let mut stream = match self.open_events().await {
            Some(s) => s,
            None => {
                self.count("events_open_failed");
                return;
            }
        };
        let accepted = self
            .call(
                Method::POST,
                &format!("{}/session/{root}/prompt_async", self.proxy),
                Some(Self::prompt(scenario)),
            )
            .await;
        if !matches!(accepted, Ok((204 | 200, _, _))) {
            self.count("prompt_async_failed");
            return;
        }
        let mut last_id: HashMap<String, String> = HashMap::new();
        let mut seen_ids = std::collections::HashSet::new();
        let mut hold_error = false;
        let mut reconnected = false;
        loop {
            if Instant::now() > deadline {
                self.problem(format!(
                    "hang: {scenario} {root}: no release on the event stream within {LIVENESS:?}"
                ));
                return;
            }
            let wait = (deadline - Instant::now()).min(Duration::from_secs(2));
            match timeout(wait, stream.next()).await {
                Err(_) => {
                    if reconnected && self.released_by_status(&root).await {
                        self.check_completion(root, "status", scenario).await;
                        return;
                    }
                }
                Ok(Some(Ok(event))) => {
                    let kind = event["type"].as_str().unwrap_or_default().to_owned();
                    let session = event
                        .pointer("/properties/sessionID")
                        .or_else(|| event.pointer("/properties/info/sessionID"))
                        .or_else(|| event.pointer("/properties/part/sessionID"))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    if let Some(id) = event["id"].as_str() {
                        if kind != "session.error" && !seen_ids.insert(id.to_owned()) {
                            self.problem(format!(
                                "event {id} ({kind}) delivered twice on one stream"
                            ));
                        }
                        // Held frames (idles, and claim parts, which come back marked
                        // `metadata.taskgate`) wait aside by design; all else keeps the
                        // runtime's order per session.
                        let held_kind = kind == "session.idle"
                            || kind == "session.status"
                            || event
                                .pointer("/properties/part/metadata/taskgate")
                                .is_some()
                            || event
                                .pointer("/properties/part/state/metadata/taskgate")
                                .is_some();
                        if !held_kind && !id.starts_with("evt_taskgate") && !session.is_empty() {
                            if let Some(previous) = last_id.get(&session) {
                                if previous.as_str() >= id {
                                    self.problem(format!(
                                        "event {id} ({kind}) of {session} after {previous}"
                                    ));
                                }
                            }
                            last_id.insert(session.clone(), id.to_owned());
                        }
                    }
                    self.count("event");
                    if session == root
                        && kind == "session.error"
                        && event
                            .pointer("/properties/error/name")
                            .and_then(Value::as_str)
                            == Some("TaskgateHoldError")
                    {
                        hold_error = true;
                    }
                    let idle = kind == "session.idle"
                        || (kind == "session.status"
                            && event
                                .pointer("/properties/status/type")
                                .and_then(Value::as_str)
                                == Some("idle"));
                    if session == root && idle {
                        if hold_error {
                            self.count("events_released_with_error");
                        } else {
                            self.count("events_released_idle");
                            self.check_completion(root, "event", scenario).await;
                        }
                        return;
                    }
                }
                Ok(Some(Err(torn))) => {
                    self.problem(format!("torn frame on the event stream: {torn}"));
                }
                Ok(None) => {
                    // Cut (the shim, or an outage): reconnect, and from now on also ask
                    // taskgate's status map, since the idle may go by while no stream is open.
                    self.count("events_reconnect");
                    reconnected = true;
                    sleep(Duration::from_millis(200)).await;
                    if self.released_by_status(&root).await {
                        self.check_completion(root, "status", scenario).await;
                        return;
                    }
                    match self.open_events().await {
                        Some(s) => {
                            stream = s;
                            last_id.clear();
                        }
                        None => sleep(Duration::from_millis(300)).await,
                    }
                }
            }
        }
    }

    /// Taskgate's status map no longer lists the root, which has answered: released there.
    async fn released_by_status(&self, root: &str) -> bool {
        let Some(status) = self.json(&format!("{}/session/status", self.proxy)).await else {
            return false;
        };
        let released = status.get(root).is_none()
            && self
                .json(&format!("{}/session/{root}/message", self.sim))
                .await
                .is_some_and(|m| m.as_array().is_some_and(|l| l.len() > 1));
        if released {
            self.count("status_released");
        }
        released
    }

    async fn open_events(&self) -> Option<Events> {
        let request = Request::get(format!("{}/event", self.proxy))
            .body(Full::new(Bytes::new()))
            .ok()?;
        let response = timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .ok()?
            .ok()?;
        if response.status() != 200 {
            return None;
        }
        let mut events = Events {
            body: response.into_body(),
            buf: Vec::new(),
        };
        // The runtime's first event is `server.connected`: the stream is live.
        match timeout(Duration::from_secs(10), events.next()).await {
            Ok(Some(Ok(_))) => Some(events),
            _ => None,
        }
    }

    /// History and status reads of recent sessions, and a client that leaves mid-read.
    async fn reads(self: &Arc<Self>) {
        let sessions = self
            .json(&format!("{}/session", self.sim))
            .await
            .unwrap_or(Value::Null);
        let Some(list) = sessions.as_array() else {
            return;
        };
        for s in list.iter().take(5) {
            let Some(id) = s["id"].as_str() else { continue };
            match self
                .call(
                    Method::GET,
                    &format!("{}/session/{id}/message", self.proxy),
                    None,
                )
                .await
            {
                Ok((status, _, _)) => self.count(format!("history_{status}")),
                Err(Failure::Broken) => self.count("history_broken"),
                Err(Failure::TimedOut) => self.problem(format!("hang: history of {id}")),
            }
        }
        let _ = timeout(
            self.dice.ms(1, 50),
            self.call(Method::GET, &format!("{}/session/status", self.proxy), None),
        )
        .await;
        self.count("reads");
    }
}

/// An SSE reader: one JSON event per `next`, `Err` for a frame that is not JSON.
struct Events {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl Events {
    async fn next(&mut self) -> Option<Result<Value, String>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&frame);
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue;
                }
                let joined = data.join("\n");
                return Some(
                    serde_json::from_str(&joined).map_err(|e| format!("{e}: {joined:.200}")),
                );
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                // A stream that ends mid-frame ends: what was left is not a frame.
                _ => return None,
            }
        }
    }
}

/// The fault shim between taskgate and the runtime.
async fn shim(listener: TcpListener, target: String, chaos: Arc<Chaos>, stop: CancellationToken) {
    loop {
        let (client, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
        };
        if chaos.down.load(Ordering::SeqCst) {
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            continue;
        }
        let outage = chaos.outage.lock().unwrap().clone();
        let (chaos, target) = (chaos.clone(), target.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = outage.cancelled() => {}
                () = relay(client, &target, &chaos) => {}
            }
        });
    }
}

async fn relay(mut client: TcpStream, target: &str, chaos: &Chaos) {
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    let mut head = vec![0u8; 8192];
    let Ok(n) = client.read(&mut head).await else {
        return;
    };
    head.truncate(n);
    let line = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(n)])
        .into_owned();
    let events = line.contains(" /event") || line.contains(" /global/event");
    let mut cut_after = None;
    let mut delay = None;
    // The runtime's connections are pooled, so the first request does not say what a
    // connection will carry: any may be cut after some bytes, mid-event or mid-body.
    if events || chaos.dice.below(4) == 0 {
        cut_after = Some(200 + chaos.dice.below(60_000) as usize);
    }
    if !events {
        match chaos.dice.below(100) {
            0..=2 => {
                chaos.failed.fetch_add(1, Ordering::SeqCst);
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                return;
            }
            3..=5 => {
                chaos.failed.fetch_add(1, Ordering::SeqCst);
                let _ = client.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                return;
            }
            6..=15 => {
                chaos.slowed.fetch_add(1, Ordering::SeqCst);
                delay = Some(chaos.dice.ms(200, 2000));
            }
            _ => {}
        }
    }
    if upstream.write_all(&head).await.is_err() {
        return;
    }
    let (mut from_client, mut to_client) = client.split();
    let (mut from_upstream, mut to_upstream) = upstream.split();
    let up = tokio::io::copy(&mut from_client, &mut to_upstream);
    let down = async {
        if let Some(d) = delay {
            sleep(d).await;
        }
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = 0usize;
        loop {
            let Ok(n) = from_upstream.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            let n = match cut_after {
                Some(limit) if sent + n >= limit => {
                    let _ = to_client.write_all(&buf[..limit - sent]).await;
                    chaos.cuts.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                _ => n,
            };
            if to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n;
        }
    };
    tokio::select! {
        _ = up => {}
        () = down => {}
    }
}

fn proc_figures(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a 10-minute soak; run with SOAK_MINUTES=10 cargo test --test soak -- --ignored --nocapture"]
async fn fault_soak() {
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10.0);
    let stop = CancellationToken::new();
    let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = format!("http://{}", sim_listener.local_addr().unwrap());
    tokio::spawn(run(
        sim_listener,
        SimOptions {
            time_scale: 0.5,
            ..SimOptions::default()
        },
        stop.clone(),
    ));
    let chaos = Arc::new(Chaos {
        dice: Dice(Mutex::new(
            0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()),
        )),
        down: AtomicBool::new(false),
        outage: Mutex::new(CancellationToken::new()),
        outages: AtomicU64::new(0),
        cuts: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        slowed: AtomicU64::new(0),
    });
    let shim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shim_addr = shim_listener.local_addr().unwrap();
    tokio::spawn(shim(
        shim_listener,
        sim.trim_start_matches("http://").to_owned(),
        chaos.clone(),
        stop.clone(),
    ));

    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("proxy.toml");
    std::fs::File::create(&config).unwrap().write_all(format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"http://{shim_addr}\"\n\
         [oracle]\npoll_interval = \"100ms\"\nrequest_timeout = \"2s\"\n\
         [gate]\nsettle_window = \"300ms\"\nrest_bound = \"5s\"\nmax_hold = \"60s\"\nprompt_commit_after = \"120s\"\n\
         [log]\nfilter = \"warn\"\n").as_bytes()).unwrap();
    let log = std::fs::File::create(dir.path().join("taskgate.log")).unwrap();
    let taskgate = std::process::Command::new(env!("CARGO_BIN_EXE_taskgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = taskgate.id();
    // Whatever ends the test, taskgate goes with it.
    let taskgate = KillOnDrop(taskgate);
    let proxy = format!("http://127.0.0.1:{port}");
    let soak = Arc::new(Soak {
        proxy: proxy.clone(),
        sim: sim.clone(),
        client: Client::builder(TokioExecutor::new()).build_http(),
        dice: Dice(Mutex::new(0x2545_F491_4F6C_DD1D ^ u64::from(pid))),
        tally: Mutex::new(Tally::default()),
    });
    let up = Instant::now() + Duration::from_secs(20);
    while soak
        .json(&format!("{proxy}/_taskgate/holds"))
        .await
        .is_none()
    {
        assert!(Instant::now() < up, "taskgate did not start");
        sleep(Duration::from_millis(100)).await;
    }
    let (rss_start, fds_start) = proc_figures(pid);
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(minutes * 60.0);

    // The runtime goes away now and then.
    let outages = tokio::spawn({
        let chaos = chaos.clone();
        async move {
            while Instant::now() + Duration::from_secs(45) < end {
                sleep(chaos.dice.ms(15_000, 40_000)).await;
                chaos.down.store(true, Ordering::SeqCst);
                let old =
                    std::mem::replace(&mut *chaos.outage.lock().unwrap(), CancellationToken::new());
                old.cancel();
                chaos.outages.fetch_add(1, Ordering::SeqCst);
                sleep(chaos.dice.ms(1000, 4000)).await;
                chaos.down.store(false, Ordering::SeqCst);
            }
        }
    });
    let mut workers = Vec::new();
    for _ in 0..6 {
        let soak = soak.clone();
        workers.push(tokio::spawn(async move {
            while Instant::now() < end {
                let scenario = SCENARIOS[soak.dice.below(SCENARIOS.len() as u64) as usize];
                match soak.dice.below(10) {
                    0..=3 => soak.sync_prompt(scenario, None).await,
                    4..=6 => soak.async_prompt(scenario).await,
                    7 => soak.reads().await,
                    _ => {
                        soak.sync_prompt(scenario, Some(soak.dice.ms(100, 2000)))
                            .await
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    outages.await.unwrap();
    let ran = started.elapsed();

    // Every hold ends once its clients are gone and its trees at rest.
    let drained = Instant::now() + LIVENESS;
    let mut holds = Value::Null;
    while Instant::now() < drained {
        holds = soak
            .json(&format!("{proxy}/_taskgate/holds"))
            .await
            .unwrap_or(Value::Null);
        if holds["holds"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        sleep(Duration::from_millis(500)).await;
    }
    if !holds["holds"].as_array().is_some_and(Vec::is_empty) {
        soak.problem(format!("holds left after {LIVENESS:?}: {holds}"));
    }
    // Idle connections to the runtime close after 30 s; then count.
    sleep(Duration::from_secs(35)).await;
    let (rss_end, fds_end) = proc_figures(pid);
    let metrics = soak
        .call(Method::GET, &format!("{proxy}/_taskgate/metrics"), None)
        .await
        .map(|(_, _, b)| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    // What the descriptors beyond the start are (sockets: state and peer), for the record.
    let sockets = std::process::Command::new("ss")
        .args(["-tanpH"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let ours: Vec<&str> = sockets
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .collect();
    drop(taskgate);
    stop.cancel();

    let tally = soak.tally.lock().unwrap();
    println!(
        "soak: {:.1} min against the simulated runtime (time scale 0.5), 6 clients",
        ran.as_secs_f64() / 60.0
    );
    println!(
        "faults: {} outages, {} connections cut mid-response, {} reads failed, {} reads slowed",
        chaos.outages.load(Ordering::SeqCst),
        chaos.cuts.load(Ordering::SeqCst),
        chaos.failed.load(Ordering::SeqCst),
        chaos.slowed.load(Ordering::SeqCst)
    );
    for (what, n) in &tally.counts {
        println!("  {what}: {n}");
    }
    for line in metrics.lines().filter(|l| {
        l.starts_with("taskgate_holds")
            || l.starts_with("taskgate_passthrough")
            || l.starts_with("taskgate_upstream_errors")
    }) {
        println!("  {line}");
    }
    println!(
        "taskgate RSS {} KiB at start, {} KiB at the end; descriptors {fds_start} -> {fds_end}",
        rss_start, rss_end
    );
    if std::env::var_os("SOAK_LOG").is_some() {
        println!(
            "{}",
            std::fs::read_to_string(dir.path().join("taskgate.log")).unwrap_or_default()
        );
    }
    println!("taskgate's sockets at the end ({}):", ours.len());
    for line in &ours {
        println!(
            "  {}",
            line.split_whitespace()
                .take(5)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!("problems: {}", tally.problems.len());
    let mut problems = tally.problems.clone();
    if fds_end > fds_start + 16 {
        problems.push(format!("descriptors not back: {fds_start} -> {fds_end}"));
    }
    if rss_end > rss_start + 48 * 1024 {
        problems.push(format!("RSS not back: {rss_start} KiB -> {rss_end} KiB"));
    }
    if !problems.is_empty() {
        let log = std::fs::read_to_string(dir.path().join("taskgate.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "{} problems:\n{}\n--- taskgate log tail:\n{}",
            problems.len(),
            problems.join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}
