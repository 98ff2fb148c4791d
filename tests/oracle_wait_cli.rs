//! `taskgate wait` as CI scripts run it: the real binary against a scripted runtime, judged by
//! its exit code and its one JSON object.

#[path = "support/oracle.rs"]
mod oracle_double;

use std::process::Output;

use oracle_double::{Data, Upstream, CHILD, FINAL_TEXT, PARENT};
use serde_json::Value;

/// Runs `taskgate wait` with a clean environment (no credentials or overrides leak in).
async fn wait(args: &[&str], password: Option<&str>) -> Output {
    let dir = std::env::temp_dir().join(format!("taskgate-oracle-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("fast.toml");
    std::fs::write(
        &config,
        "[oracle]\npoll_interval = \"50ms\"\n[gate]\nsettle_window = \"50ms\"\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_taskgate"));
    cmd.arg("wait").args(args).arg("--config").arg(&config);
    for (name, _) in std::env::vars() {
        if name.starts_with("TASKGATE_") || name.starts_with("OPENCODE_") {
            cmd.env_remove(name);
        }
    }
    if let Some(p) = password {
        cmd.env("OPENCODE_SERVER_PASSWORD", p);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_tree_exits_0_with_the_final_text() {
    let up = Upstream::start(Data::all_done(), None).await;
    let out = wait(
        &[PARENT, "--upstream", &up.url, "--json", "--timeout", "20s"],
        None,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out);
    assert_eq!(v["verdict"], "completed");
    assert_eq!(v["text"], FINAL_TEXT);
    let ids: Vec<&str> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [PARENT, CHILD]);
    assert_eq!(v["sessions"][1]["parent"], PARENT);
    assert_eq!(v["sessions"][1]["status"], "idle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn still_running_at_the_timeout_exits_2_naming_the_busy_child() {
    let up = Upstream::start(Data::child_busy(), None).await;
    let out = wait(&[PARENT, "--upstream", &up.url, "--timeout", "300ms"], None).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out);
    assert_eq!(v["verdict"], "running");
    assert_eq!(v["session"], CHILD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_runtime_exits_3() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let out = wait(&[PARENT, "--upstream", &url, "--json"], None).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be reached"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_opencode_server_password() {
    let up = Upstream::start(Data::all_done(), Some("s3cret")).await;
    let refused = wait(&[PARENT, "--upstream", &up.url, "--json"], None).await;
    assert_eq!(refused.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    let ok = wait(
        &[PARENT, "--upstream", &up.url, "--json", "--timeout", "20s"],
        Some("s3cret"),
    )
    .await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_child_exits_1() {
    let mut data = Data::all_done();
    let child = data.messages.get_mut(CHILD).unwrap();
    child[1]["info"]["error"] =
        serde_json::json!({"name": "MessageAbortedError", "data": {"message": "Aborted"}});
    up_and_expect(data, 1, "aborted").await;
}

async fn up_and_expect(data: Data, code: i32, verdict: &str) {
    let up = Upstream::start(data, None).await;
    let out = wait(
        &[PARENT, "--upstream", &up.url, "--json", "--timeout", "20s"],
        None,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out);
    assert_eq!(v["verdict"], verdict);
    assert_eq!(v["session"], CHILD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_runtime_does_not_know_exits_3() {
    let up = Upstream::start(Data::all_done(), None).await;
    let out = wait(&["ses_nope", "--upstream", &up.url, "--json"], None).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}
