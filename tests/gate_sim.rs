//! The gate against every scenario of the simulated runtime: a client that does what
//! `opencode run --attach` does is misled when it talks to the runtime directly, and sees the
//! truth through taskgate: it stops only once the whole tree is terminal, well within the
//! liveness bound of the moment it became so, and prints the parent's last answer.

#[path = "support/sim.rs"]
mod sim;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::Value;
use sim::Stack;
use taskgate::config::HumanDuration;
use taskgate::sim::client::{run_like_opencode_run, RunReport, Seen};
use taskgate::sim::SimOptions;

const TIME_SCALE: f64 = 0.25;
const SETTLE: Duration = Duration::from_millis(300);

async fn stack() -> Stack {
    let options = SimOptions {
        time_scale: TIME_SCALE,
        ..SimOptions::default()
    };
    sim::stack(options, |c| c.gate.settle_window = HumanDuration(SETTLE)).await
}

/// The runtime's own view, read directly: is any session of `root`'s tree still working?
/// A session works while the status map lists it, or while its last message is not a finished
/// assistant turn (a child that is still starting has no answer yet).
async fn tree_still_working(sim: &str, root: &str) -> Option<String> {
    let status = sim::get(&format!("{sim}/session/status")).await;
    let mut pending = vec![root.to_owned()];
    while let Some(id) = pending.pop() {
        if let Some(s) = status.get(&id) {
            return Some(format!("{id} is {s}"));
        }
        let messages = sim::get(&format!("{sim}/session/{id}/message")).await;
        let last = messages
            .as_array()
            .and_then(|m| m.last())
            .cloned()
            .unwrap_or(Value::Null);
        let finished = last.pointer("/info/role") == Some(&Value::from("assistant"))
            && last.pointer("/info/time/completed").is_some()
            && last.pointer("/info/finish") != Some(&Value::from("tool-calls"));
        if !finished {
            return Some(format!("{id}'s last turn has not ended"));
        }
        let children = sim::get(&format!("{sim}/session/{id}/children")).await;
        for child in children.as_array().into_iter().flatten() {
            if let Some(child) = child["id"].as_str() {
                pending.push(child.to_owned());
            }
        }
    }
    None
}

/// Records, from the runtime's own event stream, when each session last went idle.
struct IdleWatch {
    idles: Arc<Mutex<Vec<Instant>>>,
}

impl IdleWatch {
    async fn start(sim: &str) -> IdleWatch {
        let idles: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let response = client
            .get(format!("{sim}/event").parse().unwrap())
            .await
            .unwrap();
        let mut body = response.into_body();
        let sink = idles.clone();
        tokio::spawn(async move {
            let mut buf = String::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.push_str(&String::from_utf8_lossy(&data));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    let Some(json) = event.strip_prefix("data: ") else {
                        continue;
                    };
                    let Ok(v) = serde_json::from_str::<Value>(json.trim()) else {
                        continue;
                    };
                    if v["type"] == "session.idle" {
                        sink.lock().unwrap().push(Instant::now());
                    }
                }
            }
        });
        IdleWatch { idles }
    }

    /// When the last session went idle at the runtime, at or before `before`: the moment the
    /// tree became terminal (each test runs one tree).
    fn last_idle(&self, before: Instant) -> Option<Instant> {
        let idles = self.idles.lock().unwrap();
        idles.iter().rev().find(|at| **at <= before).copied()
    }
}

/// Runs the scenario through taskgate and checks the client saw the truth.
async fn through_taskgate_sees_the_truth(scenario: &str, final_text: &str) {
    let stack = stack().await;
    let watch = IdleWatch::start(&stack.sim).await;
    let prompt = format!("please SCENARIO:{scenario}");
    let started = Instant::now();
    let report = run_like_opencode_run(&stack.proxy, &prompt).await.unwrap();
    let done_at = Instant::now();
    let done = started.elapsed();
    if let Some(working) = tree_still_working(&stack.sim, &report.session_id).await {
        panic!("{scenario}: the client stopped at {done:?} while {working}: {report:#?}");
    }
    let terminal_at = watch
        .last_idle(done_at)
        .expect("the runtime's sessions went idle before the client stopped");
    let lag = done_at - terminal_at;
    // Generous, so the machine's load cannot decide it, yet below the liveness bound (20 s):
    // a tree the rule failed to match, released only by that bound, fails here. How close the
    // lag comes to the settle window is the benchmark's to measure (docs/performance.md).
    eprintln!("{scenario}: released {lag:?} after the tree was terminal");
    assert!(
        lag < Duration::from_secs(10),
        "{scenario}: the client learned the truth {lag:?} after the tree was terminal"
    );
    assert_eq!(
        report.last_text(),
        Some(final_text),
        "{scenario}: the client printed {:?}",
        report.texts()
    );
    assert_claims_released_with_truth(&report);
}

/// Every claim part the client saw carries taskgate's verdict.
fn assert_claims_released_with_truth(report: &RunReport) {
    for entry in &report.timeline {
        if let Seen::Tool { tool, status, .. } = &entry.seen {
            assert!(
                status == "completed" || status == "error",
                "tool {tool} seen as {status}"
            );
        }
    }
}

/// The same scenario, direct: the client stops while the tree is still working.
async fn direct_client_is_misled(scenario: &str) {
    let stack = stack().await;
    let prompt = format!("please SCENARIO:{scenario}");
    let report = run_like_opencode_run(&stack.sim, &prompt).await.unwrap();
    assert!(
        tree_still_working(&stack.sim, &report.session_id)
            .await
            .is_some(),
        "{scenario}: a direct client was not misled: {report:#?}"
    );
}

/// One test per scenario: misled direct, truthful through taskgate.
macro_rules! scenario {
    ($test:ident, $name:literal, $final:literal) => {
        #[tokio::test]
        async fn $test() {
            direct_client_is_misled($name).await;
            through_taskgate_sees_the_truth($name, $final).await;
        }
    };
}

scenario!(bg_child, "bg-child", "FINAL: parent got the child result");
scenario!(bg_two, "bg-two", "FINAL: both children reported");
scenario!(bg_three, "bg-three", "FINAL: all three children reported");
scenario!(
    grandchild,
    "grandchild",
    "FINAL: parent got the child result"
);
scenario!(
    omo_premature_background_output,
    "omo",
    "FINAL: all background tasks complete"
);
scenario!(
    child_fail,
    "child-fail",
    "FINAL: the child failed, reporting the error"
);
scenario!(
    child_abort,
    "child-abort",
    "FINAL: parent got the child result"
);
scenario!(
    retry_in_the_middle,
    "retry",
    "FINAL: parent got the child result"
);
scenario!(
    late_injection,
    "late-inject",
    "FINAL: parent got the child result"
);
scenario!(
    status_map_missing_a_starting_child,
    "status-missing",
    "FINAL: parent got the child result"
);

#[tokio::test]
async fn plain_prompt_passes() {
    through_taskgate_sees_the_truth("plain", "FINAL: plain answer, no child").await;
}

#[tokio::test]
async fn foreground_child_passes() {
    through_taskgate_sees_the_truth("fg-child", "FINAL: parent got the child result").await;
}

/// oh-my-opencode's premature `background_output` "Task Result": direct, the client sees it
/// completed while the child works (and the plugin then aborts the child); through taskgate the
/// claim is held until the child is terminal and released as what it was: an error naming the
/// aborted child.
#[tokio::test]
async fn omo_task_result_is_released_as_the_abort_it_really_was() {
    let stack = stack().await;
    let seen = |report: &RunReport| {
        report
            .timeline
            .iter()
            .find_map(|e| match &e.seen {
                Seen::Tool {
                    tool,
                    status,
                    output,
                } if tool == "background_output" => Some((status.clone(), output.clone())),
                _ => None,
            })
            .expect("the client saw the background_output part")
    };
    let direct = run_like_opencode_run(&stack.sim, "SCENARIO:omo")
        .await
        .unwrap();
    assert_eq!(seen(&direct).0, "completed");
    let proxied = run_like_opencode_run(&stack.proxy, "SCENARIO:omo")
        .await
        .unwrap();
    let (status, output) = seen(&proxied);
    assert_eq!(status, "error", "output: {output}");
}

/// A plain prompt and a foreground child are not held for the settle window: it is only for
/// trees that had background work. The bug this pins: the earlier form of this test bounded
/// the added time at 50 ms, which a loaded two-core machine decides, not taskgate. Here the
/// settle window is made 30 s long, so applying it by mistake cannot pass whatever the load;
/// the added time itself is the benchmark's (docs/performance.md).
#[tokio::test]
async fn plain_and_foreground_prompts_are_not_held_for_the_settle_window() {
    const LONG_SETTLE: Duration = Duration::from_secs(30);
    let options = SimOptions {
        time_scale: TIME_SCALE,
        ..SimOptions::default()
    };
    let stack = sim::stack(options, |c| {
        c.gate.settle_window = HumanDuration(LONG_SETTLE)
    })
    .await;
    for scenario in ["plain", "fg-child"] {
        let prompt = format!("SCENARIO:{scenario}");
        let direct = run_like_opencode_run(&stack.sim, &prompt).await.unwrap();
        let proxied = run_like_opencode_run(&stack.proxy, &prompt).await.unwrap();
        let added = proxied.done_at_ms as i64 - direct.done_at_ms as i64;
        eprintln!("{scenario}: taskgate added {added} ms");
        assert!(
            Duration::from_millis(added.max(0) as u64) < LONG_SETTLE,
            "{scenario}: held {added} ms, as if the settle window applied"
        );
        assert_eq!(proxied.last_text(), direct.last_text(), "{scenario}");
    }
}
