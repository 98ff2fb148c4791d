//! The never-hang matrix against the real runtime and the real oh-my-opencode plugin, through
//! taskgate's client face (`taskgate serve` in front of the runtime, the model face off), each
//! cell driven by the scripted model with the grandchild held and released by the test.
//!
//! For every cell: `opencode run --attach TASKGATE` exits 0 after the runtime's last busy
//! moment (within the liveness bound) and has printed the root's last answer; `taskgate wait
//! ROOT --json` returns the same verdict; no root idle reaches a client through taskgate while
//! a session of the tree is busy. The exit lag is printed (docs/compatibility.md keeps the
//! figures). Skips without node and npm locally; fails under `CI=true`.

#[path = "support/provider.rs"]
mod provider;
#[path = "support/runtime.rs"]
mod runtime;

use std::future::Future;
use std::time::{Duration, Instant};

use provider::{
    OmoTurn, ScriptedProvider, Turn, OMO_CHILD_FINAL, OMO_PARENT_LAUNCHED, OMO_PARENT_NOTED,
    PARENT_FINAL,
};
use runtime::{
    omo_config, omo_plugin_or_skip, plugin_url, runtime_or_skip, EventStream, RunOutput, Runtime,
    RuntimeOptions, Taskgate,
};
use serde_json::{json, Value};
use taskgate::config::HumanDuration;

/// Bound on each step of a cell (the plugin polls every 3 s and wakes ~10 s after).
const STEP: Duration = Duration::from_secs(90);
/// The liveness bound the cells run with: taskgate's default.
const REST_BOUND: Duration = Duration::from_secs(20);

/// Runs `run` (an `opencode run` through taskgate) and `drive` (the test's side of the cell) at
/// once; returns the run's output and when it exited.
async fn run_while<R, D>(run: R, drive: D) -> (RunOutput, Instant)
where
    R: Future<Output = RunOutput>,
    D: Future<Output = ()>,
{
    let run = async {
        let out = run.await;
        (out, Instant::now())
    };
    let (out, ()) = tokio::join!(run, drive);
    out
}

/// `taskgate wait ROOT --upstream RUNTIME --json`, the real binary.
async fn taskgate_wait(rt: &Runtime, root: &str) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskgate"))
        .args([
            "wait",
            root,
            "--upstream",
            rt.url(),
            "--json",
            "--timeout",
            "60s",
        ])
        .env_remove("TASKGATE_REST_BOUND")
        .kill_on_drop(true)
        .output()
        .await
        .expect("taskgate wait runs");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "taskgate wait printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The one root session.
async fn root_of(rt: &Runtime) -> String {
    let roots = rt.root_sessions().await;
    assert_eq!(roots.len(), 1, "one root session: {roots:?}");
    roots[0]["id"].as_str().unwrap().to_owned()
}

fn root_idles(events: &[Value], root: &str) -> usize {
    events
        .iter()
        .filter(|e| e["type"] == "session.idle" && e["properties"]["sessionID"] == root)
        .count()
}

/// oh-my-opencode, wake mode, a child with a grandchild. The plugin judges the child done on
/// its first idle and wakes the root once; the child really ends later (woken by its grandchild)
/// and nobody wakes the root again. taskgate used to wait for a root turn after the child's
/// *last* message, which never comes: `opencode run` never exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omo_wake_before_the_child_really_ends_does_not_hang() {
    let test = "omo_wake_before_the_child_really_ends_does_not_hang";
    let (Some(bin), Some(plugin)) = (runtime_or_skip(test), omo_plugin_or_skip(test)) else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let rt = Runtime::start_with_omo(
        &bin,
        &plugin_url(&plugin),
        &provider.base_url(),
        omo_config(),
    )
    .await;
    let gate = Taskgate::start(&rt, |c| c.gate.rest_bound = HumanDuration(REST_BOUND)).await;
    let through = EventStream::connect(&format!("{}/event", gate.url()), None).await;
    let mut last_busy = Instant::now();
    let drive = async {
        provider
            .wait_for("the grandchild's model turn", STEP, |rs| {
                rs.iter()
                    .any(|r| r.turn == Some(Turn::ChildHold("wake1".into())))
            })
            .await;
        provider
            .wait_for("the plugin's wake of the root", STEP, |rs| {
                rs.iter()
                    .any(|r| r.turn == Some(Turn::Omo(OmoTurn::ParentWake)))
            })
            .await;
        let root = root_of(&rt).await;
        // The root has answered its wake and the runtime shows it idle while the grandchild
        // works; a client through taskgate has not seen it idle.
        rt.wait_for_text(&root, OMO_PARENT_NOTED, STEP).await;
        let busy = rt.busy_sessions().await;
        assert!(!busy.is_empty(), "the grandchild is busy while held");
        assert_eq!(
            root_idles(&through.events(), &root),
            0,
            "a root idle reached a client while {busy:?} worked"
        );
        provider.release("wake1");
        rt.wait_all_idle(STEP).await;
        last_busy = Instant::now();
    };
    let (out, exited) = run_while(
        rt.run(gate.url(), &[], "OMO-WAKE-wake1: delegate this."),
        drive,
    )
    .await;
    assert!(out.status.success(), "{out:?}\n{}", rt.logs());
    let root = root_of(&rt).await;
    let child = rt.children(&root).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Exited only once the child's real end came: its final answer is written.
    assert!(
        rt.assistant_texts(&child)
            .await
            .iter()
            .any(|t| t.contains(OMO_CHILD_FINAL)),
        "run exited before the child's real end"
    );
    assert!(
        out.stdout.contains(OMO_PARENT_NOTED),
        "the root's last answer printed: {out:?}"
    );
    let verdict = taskgate_wait(&rt, &root).await;
    assert_eq!(verdict["verdict"], "completed", "{verdict}");
    assert_eq!(
        verdict["unmatched"],
        json!([]),
        "matched by the rule, not released by the liveness bound: {verdict}"
    );
    eprintln!(
        "omo wake, child with grandchild: run exited {:?} after the runtime's last busy moment",
        exited.saturating_duration_since(last_busy)
    );
}

/// oh-my-opencode with its documented `background-notification` hook off: nobody is ever
/// woken. Once the grandchild is released every session is idle for good, and the launches
/// are never seen answered. taskgate used to say `running` for ever; now the resting tree is
/// released within the liveness bound, with the launches it could not match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omo_without_wakes_is_released_once_the_tree_rests() {
    let test = "omo_without_wakes_is_released_once_the_tree_rests";
    let (Some(bin), Some(plugin)) = (runtime_or_skip(test), omo_plugin_or_skip(test)) else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let mut omo = omo_config();
    omo["disabled_hooks"] = json!(["background-notification"]);
    let rt = Runtime::start_with_omo(&bin, &plugin_url(&plugin), &provider.base_url(), omo).await;
    let gate = Taskgate::start(&rt, |c| c.gate.rest_bound = HumanDuration(REST_BOUND)).await;
    let mut rested = Instant::now();
    let drive = async {
        provider
            .wait_for("the child's partial answer", STEP, |rs| {
                rs.iter()
                    .any(|r| r.turn == Some(Turn::Omo(OmoTurn::ChildPartial)))
            })
            .await;
        provider.release("quiet1");
        rt.wait_all_idle(STEP).await;
        rested = Instant::now();
        if std::env::var_os("DEBUG_MATRIX").is_some() {
            tokio::time::sleep(Duration::from_secs(40)).await;
            eprintln!("HOLDS {:?}", gate.holds().await);
            let root = root_of(&rt).await;
            eprintln!("WAIT {}", taskgate_wait(&rt, &root).await);
            for s in rt.sessions().await {
                let id = s["id"].as_str().unwrap().to_owned();
                let msgs = rt.get_json(&format!("/session/{id}/message")).await;
                for m in msgs.as_array().unwrap() {
                    eprintln!(
                        "MSG {id} {} {} {:?} {}",
                        m["info"]["role"],
                        m["info"]["finish"],
                        m["info"]["error"]["name"].as_str(),
                        m["parts"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|p| format!("{}:{}", p["type"], p["state"]["status"]))
                            .collect::<Vec<_>>()
                            .join(",")
                    );
                }
            }
        }
    };
    let (out, exited) = run_while(
        rt.run(gate.url(), &[], "OMO-WAKE-quiet1: delegate this."),
        drive,
    )
    .await;
    assert!(out.status.success(), "{out:?}\n{}", rt.logs());
    let lag = exited.saturating_duration_since(rested);
    eprintln!("omo without wakes: run exited {lag:?} after every session came to rest");
    // Generous: the bound is rest_bound + settle window + a poll; this only catches a hang.
    assert!(
        lag < REST_BOUND + Duration::from_secs(30),
        "released {lag:?} after the tree came to rest"
    );
    assert!(
        out.stdout.contains(OMO_PARENT_LAUNCHED),
        "the root's last answer printed: {out:?}"
    );
    let root = root_of(&rt).await;
    let verdict = taskgate_wait(&rt, &root).await;
    assert_eq!(verdict["verdict"], "completed", "{verdict}");
    let unmatched = verdict["unmatched"].as_array().cloned().unwrap_or_default();
    assert!(
        !unmatched.is_empty(),
        "the verdict says what the rule could not match: {verdict}"
    );
}

/// Native background `task`, then a second prompt in the same session: each `run` through
/// taskgate exits with its own last answer, the second without waiting on the first's child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_prompt_in_the_same_session_is_released_on_its_own_tree() {
    let Some(bin) = runtime_or_skip("a_second_prompt_in_the_same_session_is_released") else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let rt = Runtime::start(&bin, &provider.base_url(), RuntimeOptions::default()).await;
    let gate = Taskgate::start(&rt, |_| {}).await;
    let first = rt
        .run(
            gate.url(),
            &[],
            "Delegate this. @bg(CHILD-WORK-1S quick job)",
        )
        .await;
    assert!(first.status.success(), "{first:?}");
    let root = root_of(&rt).await;
    assert!(
        rt.busy_sessions().await.is_empty(),
        "the first run waited for its tree"
    );
    assert!(
        rt.assistant_texts(&root)
            .await
            .iter()
            .any(|t| t.contains(PARENT_FINAL)),
        "the parent answered its child before the first run exited"
    );
    let second = rt
        .run(gate.url(), &["--session", &root], "Say hello.")
        .await;
    assert!(second.status.success(), "{second:?}");
    // The scripted parent answers every later prompt with its final text again: a third
    // answer, written before the second run exited, and printed by it.
    let texts = rt.assistant_texts(&root).await;
    assert_eq!(texts.len(), 3, "{texts:?}");
    assert!(
        second.stdout.contains(texts[2].as_str()),
        "the second run printed the root's last answer: {second:?}"
    );
    let verdict = taskgate_wait(&rt, &root).await;
    assert_eq!(verdict["verdict"], "completed", "{verdict}");
}
