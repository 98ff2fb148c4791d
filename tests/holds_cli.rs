//! `taskgate holds`, the real binary, against the simulated runtime behind taskgate: into a
//! pipe it prints one snapshot (text, or JSON with `--json`) naming the held root, the
//! grandchild it waits for and why; on a narrow terminal (tmux, 44 columns) it redraws in
//! place with no broken frames left behind.

#[path = "support/sim.rs"]
mod sim;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use taskgate::config::HumanDuration;
use taskgate::sim::SimOptions;
use tokio::time::Instant;

/// Bound on every wait: a hang fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(30);
/// A narrow terminal: session ids alone are 30 columns.
const COLUMNS: usize = 44;

/// The sim at half speed: the grandchild works 6 s. Returns the stack, the root and the
/// grandchild once taskgate holds the root's prompt for it.
async fn held_grandchild() -> (
    sim::Stack,
    String,
    String,
    tokio::task::JoinHandle<(u16, Value)>,
) {
    let options = SimOptions {
        time_scale: 2.0,
        ..SimOptions::default()
    };
    let stack = sim::stack(options, |c| {
        c.gate.settle_window = HumanDuration(Duration::from_millis(200))
    })
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
    let holds = format!("{}/_taskgate/holds", stack.proxy);
    let deadline = Instant::now() + PATIENCE;
    let grandchild = loop {
        let body = sim::get(&holds).await;
        let blocking = body["holds"].as_array().unwrap().iter().find_map(|h| {
            let title = h["blocking"]["title"].as_str()?;
            title
                .starts_with("grandchild job")
                .then(|| h["blocking"]["id"].as_str().unwrap().to_owned())
        });
        if let Some(id) = blocking {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "never held for the grandchild: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not a sync
    };
    (stack, root, grandchild, reply)
}

async fn holds(args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_taskgate"))
            .arg("holds")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("taskgate holds exits within the bound")
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn taskgate_holds_into_a_pipe_prints_the_held_root_and_the_grandchild_it_waits_for() {
    let (stack, root, grandchild, reply) = held_grandchild().await;
    let (ok, text, stderr) = holds(&["--url", &stack.proxy]).await;
    assert!(ok, "{stderr}");
    assert!(text.starts_with("taskgate: 1 held"), "{text}");
    let hold = text
        .lines()
        .find(|l| l.contains("> held client prompt"))
        .unwrap_or_else(|| panic!("a hold line: {text}"));
    assert!(hold.contains(&root), "{hold}");
    assert!(hold.ends_with(&format!("{grandchild} is busy")), "{hold}");
    assert!(
        text.contains(&format!("blocked by {grandchild}, grandchild job")),
        "{text}"
    );
    // The tree: the grandchild drawn two levels under the root.
    assert!(
        text.lines()
            .any(|l| l.starts_with("      busy") && l.contains(&grandchild)),
        "{text}"
    );

    let (ok, json, stderr) = holds(&["--url", &stack.proxy, "--json"]).await;
    assert!(ok, "{stderr}");
    let snapshot: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(snapshot["holds"][0]["blocking"]["id"], grandchild.as_str());

    reply.await.unwrap();
    let (ok, text, _) = holds(&["--url", &stack.proxy]).await;
    assert!(ok);
    assert!(text.starts_with("taskgate: 0 held"), "{text}");
    assert!(
        text.contains(&format!("completed client prompt {root}")),
        "{text}"
    );
}

#[tokio::test]
async fn taskgate_holds_with_no_taskgate_there_says_so_and_fails() {
    let nowhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", nowhere.local_addr().unwrap());
    drop(nowhere);
    let (ok, _, stderr) = holds(&["--url", &url]).await;
    assert!(!ok);
    assert!(stderr.contains("cannot reach taskgate"), "{stderr}");
}

/// A private tmux server running one command in a narrow pseudo-terminal; killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(argv: &[&str]) -> Option<Tmux> {
        let socket = format!("taskgate-holds-{}", std::process::id());
        let status = std::process::Command::new("tmux")
            .args(["-L", &socket, "new-session", "-d", "-x"])
            .arg(COLUMNS.to_string())
            .args(["-y", "40"])
            .args(argv)
            .env("TERM", "xterm-256color")
            .stdin(Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Tmux { socket })
    }

    /// Reads the screen until `pred` holds on it (bounded).
    async fn until(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let screen = self.screen();
            if pred(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "never showed {what}:\n{screen}");
            tokio::time::sleep(Duration::from_millis(100)).await; // poll interval, not a sync
        }
    }

    fn screen(&self) -> String {
        let out = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// The bug this pins (for `wait`, and now `holds`): lines wider than the terminal wrapped, the
/// redraw moved up over fewer rows than were drawn, and old frames piled up on screen.
#[tokio::test]
async fn taskgate_holds_on_a_narrow_terminal_redraws_without_broken_frames() {
    let (stack, _root, _grandchild, reply) = held_grandchild().await;
    let binary = env!("CARGO_BIN_EXE_taskgate");
    let Some(tmux) = Tmux::start(&[binary, "holds", "--url", &stack.proxy]) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and tmux cannot run"
        );
        eprintln!("skipped: tmux cannot run here");
        return;
    };
    // Held first, then the release drawn over it: a second of ticks and several snapshots
    // between them, each frame drawn over the last.
    let held = tmux
        .until("the hold", |s| s.contains("> held client prompt"))
        .await;
    assert!(held.starts_with("taskgate: 1 held"), "{held}");
    reply.await.unwrap();
    let released = tmux
        .until("the release", |s| s.starts_with("taskgate: 0 held"))
        .await;
    for screen in [held, released] {
        let headers = screen.lines().filter(|l| l.contains("taskgate: ")).count();
        assert_eq!(headers, 1, "one frame on screen, not several:\n{screen}");
        assert!(
            !screen.contains("> held") || screen.contains("1 held"),
            "{screen}"
        );
        for line in screen.lines() {
            assert!(
                line.chars().count() <= COLUMNS,
                "{line:?} is wider than the terminal"
            );
        }
    }
}
