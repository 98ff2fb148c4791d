//! The official OpenCode SDK (`@opencode-ai/sdk`, pinned in `tests/sdk/`) on Node, through
//! taskgate, while taskgate holds a synchronous prompt for a background child.
//!
//! The bug this pins: Node's fetch gives up after 300 s without response headers (and after
//! 300 s without body bytes), and taskgate used to send nothing until it released the reply, so
//! `session.prompt` threw `fetch failed` (`HeadersTimeoutError`) on any hold longer than that.
//! Here Node's two timeouts are scaled down to 2.5 s (`tests/sdk/prompt.mjs` sets them on the
//! global dispatcher, which Node's own fetch reads) and the simulated child works about 6 s:
//! the same failure, in seconds. Skips without node and npm locally; fails under `CI=true`.

#[path = "support/runtime.rs"]
mod runtime;
#[path = "support/sim.rs"]
mod sim;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sim::Stack;
use taskgate::config::{Config, HumanDuration};
use taskgate::sim::SimOptions;

/// Node's header and body timeouts in the script, scaled down from 300 s: well below the
/// child's 6 s of work, well above the keep-alive interval the committed stack uses.
const NODE_TIMEOUT_MS: &str = "2500";
/// Bound on the whole script: a hang fails the test.
const PATIENCE: Duration = Duration::from_secs(60);

/// The simulated runtime (bg-child at half speed: the child works 6 s) and taskgate in front of
/// it.
async fn stack(tune: impl FnOnce(&mut Config)) -> Stack {
    let options = SimOptions {
        time_scale: 2.0,
        ..SimOptions::default()
    };
    sim::stack(options, |c| {
        c.gate.settle_window = HumanDuration(Duration::from_millis(200));
        tune(c);
    })
    .await
}

/// Runs `tests/sdk/prompt.mjs` with the installed SDK; returns its one JSON line.
async fn sdk_prompt(sdk: &Path, base_url: &str, text: &str) -> Value {
    let script = sdk.join("prompt.mjs");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/prompt.mjs"),
        &script,
    )
    .unwrap();
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .args([base_url, text, NODE_TIMEOUT_MS])
        .current_dir(sdk)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the SDK script ends within the bound")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON line from the script ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_longer_than_nodes_fetch_timeouts_reaches_the_sdk() {
    let Some(sdk) = runtime::sdk_or_skip("a_hold_longer_than_nodes_fetch_timeouts_reaches_the_sdk")
    else {
        return;
    };
    // Without the early commit (it would come after 60 s), Node gives up: the bug, pinned.
    let late = stack(|_| {}).await;
    let failed = sdk_prompt(&sdk, &late.proxy, "SCENARIO:bg-child").await;
    assert_eq!(failed["ok"], false, "{failed}");
    assert!(
        failed.to_string().contains("Timeout"),
        "Node's fetch timed out waiting: {failed}"
    );
    drop(late);
    // Committing well before Node's timeout, and keeping the body alive, the SDK gets the last
    // word once the tree is done.
    let committed = stack(|c| {
        c.gate.prompt_commit_after = HumanDuration(Duration::from_millis(300));
        c.gate.prompt_keepalive = HumanDuration(Duration::from_millis(300));
    })
    .await;
    let reply = sdk_prompt(&sdk, &committed.proxy, "SCENARIO:bg-child").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        reply["texts"],
        serde_json::json!(["FINAL: parent got the child result"]),
        "{reply}"
    );
}
