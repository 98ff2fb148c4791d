//! The live page in real headless Chromium, driven over the DevTools protocol: while the
//! simulated runtime plays `grandchild`, the page shows the root's prompt held with the
//! grandchild named as what it waits for; once the tree ends it shows the release with verdict
//! completed, without a reload; and it fits a narrow window.
//!
//! Needs `chromium` (or `$TASKGATE_CHROMIUM`): skipped without it, except under `CI=true`,
//! where a missing browser fails the test (.ci/run installs it). With
//! `TASKGATE_LIVE_SCREENSHOT=<path>` the held moment is saved as a PNG (docs/live-view.png).

#[path = "support/sim.rs"]
mod sim;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use taskgate::config::HumanDuration;
use taskgate::sim::SimOptions;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Bound on every wait: a hang fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(60);
/// A phone-sized window: the page must stay readable in it.
const WIDTH: u32 = 420;
const HEIGHT: u32 = 1000;

/// The browser to drive, or why there is none.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TASKGATE_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Headless Chromium in its own process group, killed whole when dropped (its renderers and
/// helpers must not outlive a failed test).
struct Browser {
    child: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: a plain syscall on the process group this test created
            // (process_group(0) makes its id the browser's pid).
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
    }
}

/// Starts the browser on `url`; returns it and its DevTools browser endpoint.
async fn launch(binary: &PathBuf, url: &str) -> (Browser, String) {
    let profile = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(binary)
        .args([
            "--headless=new",
            // Containers and CI run as root, where Chromium refuses its sandbox.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            &format!("--window-size={WIDTH},{HEIGHT}"),
            &format!("--user-data-dir={}", profile.path().display()),
            url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let stderr = child.stderr.take().unwrap();
    let browser = Browser {
        child,
        _profile: profile,
    };
    let mut lines = BufReader::new(stderr).lines();
    let endpoint = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(ws) = line.strip_prefix("DevTools listening on ") {
                return ws.trim().to_owned();
            }
        }
        panic!("the browser exited without a DevTools endpoint");
    })
    .await
    .expect("the browser's DevTools endpoint within the bound");
    // Keep draining its stderr, so a chatty browser never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (browser, endpoint)
}

/// One DevTools-protocol connection to a page.
struct Page {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
}

impl Page {
    /// Connects to the first page target of the browser at `endpoint` (`ws://host:port/…`).
    async fn attach(endpoint: &str) -> Page {
        let host = endpoint
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .expect("a ws:// endpoint");
        let targets = sim::get(&format!("http://{host}/json/list")).await;
        let page = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("a page target: {targets}"))
            .to_owned();
        let (socket, _) = tokio_tungstenite::connect_async(page).await.unwrap();
        Page { socket, next: 0 }
    }

    /// Calls a DevTools method and returns its result (events in between are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let request = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::Text(request.to_string().into()))
            .await
            .unwrap();
        tokio::time::timeout(PATIENCE, async {
            loop {
                let message = self.socket.next().await.expect("DevTools open").unwrap();
                let Message::Text(text) = message else {
                    continue;
                };
                let reply: Value = serde_json::from_str(&text).unwrap();
                if reply["id"] == id {
                    assert!(reply["error"].is_null(), "{method}: {reply}");
                    return reply["result"].clone();
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{method} answered within the bound"))
    }

    /// What the page shows now, read from its DOM.
    async fn shown(&mut self) -> Value {
        let script = r##"JSON.stringify({
            origin: performance.timeOrigin,
            link: document.getElementById("link")?.textContent,
            overflow: document.documentElement.scrollWidth - window.innerWidth,
            trees: [...document.querySelectorAll("article.tree")].map((t) => ({
                root: t.dataset.root, verdict: t.dataset.verdict, text: t.innerText })),
            holds: [...document.querySelectorAll(".hold")].map((h) => ({
                session: h.dataset.session, blocking: h.dataset.blocking, text: h.innerText })),
            releases: [...document.querySelectorAll("#releases li")].map((r) => ({
                session: r.dataset.session, verdict: r.dataset.verdict, text: r.innerText })),
        })"##;
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": script, "returnByValue": true}),
            )
            .await;
        let text = result["result"]["value"]
            .as_str()
            .unwrap_or_else(|| panic!("the page answers: {result}"));
        serde_json::from_str(text).unwrap()
    }

    /// Reads the page until `pred` picks something out of it (bounded).
    async fn until<T>(&mut self, what: &str, pred: impl Fn(&Value) -> Option<T>) -> (Value, T) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let shown = self.shown().await;
            if let Some(found) = pred(&shown) {
                return (shown, found);
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}: {shown:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await; // poll interval, not a sync
        }
    }
}

/// The session under `parent` whose title starts with `title`, as the runtime lists it.
async fn child_titled(sim_url: &str, parent: &str, title: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let children = sim::get(&format!("{sim_url}/session/{parent}/children")).await;
        let found = children.as_array().unwrap().iter().find_map(|c| {
            c["title"]
                .as_str()?
                .starts_with(title)
                .then(|| c["id"].as_str().unwrap_or_default().to_owned())
        });
        if let Some(id) = found {
            return id;
        }
        assert!(Instant::now() < deadline, "no child {title:?} of {parent}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not a sync
    }
}

#[tokio::test]
async fn the_page_shows_the_grandchild_holding_the_root_then_the_release_without_a_reload() {
    let Some(binary) = chromium() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and no chromium on PATH (or $TASKGATE_CHROMIUM)"
        );
        eprintln!("skipped: no chromium on PATH (set TASKGATE_CHROMIUM to use another)");
        return;
    };
    // Half speed: the grandchild works 6 s, wide enough to see the hold on a loaded machine.
    let options = SimOptions {
        time_scale: 2.0,
        ..SimOptions::default()
    };
    let stack = sim::stack(options, |c| {
        c.gate.settle_window = HumanDuration(Duration::from_millis(200))
    })
    .await;
    let (browser, endpoint) = launch(&binary, &format!("{}/_taskgate/", stack.proxy)).await;
    let mut page = Page::attach(&endpoint).await;
    let (first, _) = page
        .until("the live link", |s| (s["link"] == "live").then_some(()))
        .await;

    let (_, session) = sim::call(
        hyper::Method::POST,
        &format!("{}/session", stack.proxy),
        Some(json!({})),
    )
    .await;
    let root = session["id"].as_str().unwrap().to_owned();
    let url = format!("{}/session/{root}/message", stack.proxy);
    let reply = tokio::spawn(async move {
        let prompt = json!({"parts": [{"type": "text", "text": "SCENARIO:grandchild"}]});
        sim::call(hyper::Method::POST, &url, Some(prompt)).await
    });
    let child = child_titled(&stack.sim, &root, "child job").await;
    let grandchild = child_titled(&stack.sim, &child, "grandchild job").await;

    let (held, text) = page
        .until("the root held by the grandchild", |s| {
            s["holds"].as_array()?.iter().find_map(|h| {
                (h["session"] == root.as_str() && h["blocking"] == grandchild.as_str())
                    .then(|| h["text"].as_str().unwrap_or_default().to_owned())
            })
        })
        .await;
    assert!(
        text.contains("grandchild job") && text.contains(&format!("{grandchild} is busy")),
        "the hold names the grandchild and why: {text}"
    );
    let tree = held["trees"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["root"] == root.as_str())
        .unwrap_or_else(|| panic!("the root's tree is drawn: {held:#}"));
    assert_eq!(tree["verdict"], "running", "{tree}");
    assert!(
        held["overflow"].as_i64().unwrap() <= 0,
        "wider than {WIDTH} px: {held:#}"
    );
    if let Some(path) = std::env::var_os("TASKGATE_LIVE_SCREENSHOT") {
        let shot = page
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(&path, png).unwrap();
    }

    let (released, _) = page
        .until("the release with verdict completed", |s| {
            let release = s["releases"]
                .as_array()?
                .iter()
                .any(|r| r["session"] == root.as_str() && r["verdict"] == "completed");
            let done = s["trees"]
                .as_array()?
                .iter()
                .any(|t| t["root"] == root.as_str() && t["verdict"] == "completed");
            (release && done).then_some(())
        })
        .await;
    assert_eq!(
        released["origin"], first["origin"],
        "the page was not reloaded"
    );
    assert!(
        released["holds"].as_array().unwrap().is_empty(),
        "{released:#}"
    );
    let (status, _) = reply.await.unwrap();
    assert_eq!(status, 200);
    drop(browser);
}
