//! taskgate in front of the real OpenCode runtime: the same rig as `real_runtime.rs`
//! (the pinned `opencode-ai`, the scripted model provider), with `taskgate::cmd::stack::run` serving on
//! 127.0.0.1:0 in front of the runtime, and `opencode run --attach` pointed at taskgate.
//!
//! Children are held with `CHILD-HOLD-<name>` and let go with `provider.release(name)`, so every
//! "still waiting" assertion is made at a moment the test caused (the child is provably busy),
//! not after a sleep. The tests skip with a message when the runtime cannot be installed locally
//! and fail under `CI=true` (see `support/runtime.rs`).

#[path = "support/provider.rs"]
mod provider;
#[path = "support/runtime.rs"]
mod runtime;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use provider::{ScriptedProvider, Turn, CHILD_DONE, PARENT_FINAL, PARENT_WAITING};
use runtime::{
    http_get, runtime_or_skip, EventStream, RunOutput, Runtime, RuntimeOptions, Taskgate,
};
use serde_json::Value;

/// How long any one step of a scenario may take (runtime steps take well under a second; the
/// machine running the suite may be busy).
const STEP: Duration = Duration::from_secs(60);

/// The scripted runtime, provider and taskgate of one test.
struct Rig {
    provider: ScriptedProvider,
    rt: Runtime,
    gate: Taskgate,
}

impl Rig {
    async fn start(opts: RuntimeOptions) -> Option<Rig> {
        let bin = runtime_or_skip(&current_test())?;
        let provider = ScriptedProvider::start().await;
        let rt = Runtime::start(&bin, &provider.base_url(), opts).await;
        let gate = Taskgate::start(&rt, |_config| {}).await;
        Some(Rig { provider, rt, gate })
    }

    fn version(&self) -> &str {
        &self.rt.binary.version
    }

    /// `opencode run --attach TASKGATE PROMPT`.
    fn run_through_gate<'a>(&'a self, prompt: &'a str) -> impl Future<Output = RunOutput> + 'a {
        self.rt.run(self.gate.url(), &[], prompt)
    }

    /// Waits until the provider has received the held child `name`'s model request: from then
    /// on that child is busy until [`ScriptedProvider::release`].
    async fn child_held(&self, name: &str) {
        self.provider
            .wait_for(&format!("child {name}'s model turn"), STEP, |reqs| {
                reqs.iter()
                    .any(|r| r.turn == Some(Turn::ChildHold(name.into())))
            })
            .await;
    }

    /// The one root session (panics if there is not exactly one).
    async fn root(&self) -> String {
        let roots = self.rt.root_sessions().await;
        assert_eq!(roots.len(), 1, "expected one root session: {roots:?}");
        roots[0]["id"].as_str().unwrap().to_string()
    }

    /// The children of `root`, once there are `n` of them.
    async fn children(&self, root: &str, n: usize) -> Vec<String> {
        let end = Instant::now() + STEP;
        loop {
            let kids = self.rt.children(root).await;
            if kids.len() >= n {
                assert_eq!(kids.len(), n, "{kids:?}");
                return kids
                    .iter()
                    .map(|k| k["id"].as_str().unwrap().to_string())
                    .collect();
            }
            assert!(
                Instant::now() < end,
                "{root} has children {kids:?}, want {n}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
        }
    }

    /// `GET /session/status` through taskgate: the ids listed as not idle.
    async fn gate_busy(&self) -> Vec<String> {
        let (status, body) = http_get(
            &format!("{}/session/status", self.gate.url()),
            self.rt.basic_auth().as_deref(),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK, "{body:?}");
        match serde_json::from_slice::<Value>(&body).unwrap() {
            Value::Object(m) => m
                .into_iter()
                .filter(|(_, s)| s["type"] != "idle")
                .map(|(id, _)| id)
                .collect(),
            other => panic!("unexpected status map through taskgate: {other}"),
        }
    }

    /// Waits until taskgate holds the reply to `root`'s `POST /session/:id/message`: the runtime
    /// has answered it, and a client attached directly would now have it (and `run` would exit).
    async fn prompt_held(&self, root: &str) {
        self.gate
            .wait_for_holds("the root's prompt reply", STEP, |holds| {
                holds
                    .iter()
                    .any(|h| h["kind"] == "prompt" && h["session"] == root)
            })
            .await;
    }
}

/// The oldest release whose `run --attach` prints the parent's answers on stdout (verified on
/// 1.18.33); 1.15.0 prints nothing at all, even through taskgate (see docs/compatibility.md).
const ATTACHED_RUN_PRINTS_SINCE: &str = "1.18.33";

impl Rig {
    /// What a user of `run` must have got once it exited: exit 0, and the parent's answer
    /// `needle` already written (read right at exit, no polling: taskgate released the run only
    /// after that turn ended) and, on runtimes whose `run` prints, printed.
    async fn assert_run_ended_with(&self, out: &RunOutput, root: &str, needle: &str) {
        assert!(out.status.success(), "{out:?}");
        let texts = self.rt.assistant_texts(root).await;
        assert!(
            texts.iter().any(|t| t.contains(needle)),
            "run exited before the parent answered {needle:?}: {texts:?}\n{out:?}\nmodel turns:\n{}",
            self.provider.describe()
        );
        if runtime::version_at_least(self.version(), ATTACHED_RUN_PRINTS_SINCE) {
            assert!(
                out.stdout.contains(needle),
                "run must print the parent's last answer {needle:?}: {out:?}"
            );
        }
    }
}

/// The name of the running test (the harness names its threads after the tests).
fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("real_taskgate")
        .to_string()
}

/// Runs `step` while the `run` is still going; panics with the run's output if the run ends
/// first (that is exactly the bug taskgate fixes: `run` believing the work is done).
async fn while_running<T>(
    run: &mut Pin<&mut impl Future<Output = RunOutput>>,
    what: &str,
    step: impl Future<Output = T>,
) -> T {
    tokio::select! {
        biased;
        out = run.as_mut() => panic!("opencode run exited before {what}: {out:?}"),
        v = step => v,
    }
}

/// Whether `e` is a `session.idle` or an idle `session.status` of `session`.
fn is_idle_of(e: &Value, session: &str) -> bool {
    let of = e.pointer("/properties/sessionID").and_then(Value::as_str) == Some(session);
    let idle = e["type"] == "session.idle"
        || (e["type"] == "session.status"
            && e.pointer("/properties/status/type") == Some(&"idle".into()));
    of && idle
}

/// Replays the `session.status` events of one stream; at every idle of `root`, the sessions
/// listed (by that same stream) as not idle. Empty when the stream never showed the root idle
/// while something was busy.
fn busy_at_root_idles(events: &[Value], root: &str) -> Vec<Vec<String>> {
    let mut status = std::collections::BTreeMap::<String, String>::new();
    let mut offences = Vec::new();
    for e in events {
        if e["type"] == "session.status" {
            if let (Some(id), Some(t)) = (
                e.pointer("/properties/sessionID").and_then(Value::as_str),
                e.pointer("/properties/status/type").and_then(Value::as_str),
            ) {
                status.insert(id.to_string(), t.to_string());
            }
        }
        if is_idle_of(e, root) {
            let busy: Vec<String> = status
                .iter()
                .filter(|(id, t)| *id != root && *t != "idle")
                .map(|(id, _)| id.clone())
                .collect();
            if !busy.is_empty() {
                offences.push(busy);
            }
        }
    }
    offences
}

/// `opencode run --attach TASKGATE` with a background child exits only after the child
/// finished and the parent answered its result: exit 0, the parent's last answer printed, and
/// nothing left busy. The child is held until the run is provably past the point where the
/// direct run exits (the runtime has answered the prompt and taskgate holds that answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_through_taskgate_waits_for_the_background_child() {
    let Some(rig) = Rig::start(RuntimeOptions::default()).await else {
        return;
    };
    let direct = EventStream::connect(&format!("{}/event", rig.rt.url()), None).await;
    let run = rig.run_through_gate("Delegate this. @bg(CHILD-HOLD-one do the long work)");
    tokio::pin!(run);

    let root = while_running(&mut run, "the child was held", async {
        rig.child_held("one").await;
        rig.root().await
    })
    .await;
    let child = rig.children(&root, 1).await.remove(0);
    while_running(&mut run, "the runtime announced the root idle", async {
        direct
            .wait_for("the root's idle on the direct stream", STEP, |evs| {
                evs.iter().any(|e| is_idle_of(e, &root))
            })
            .await;
        rig.prompt_held(&root).await;
    })
    .await;
    assert!(
        rig.rt.busy_sessions().await.contains(&child),
        "the held child must be busy"
    );

    let released = Instant::now();
    rig.provider.release("one");
    let out = run.await;
    eprintln!(
        "run through taskgate: {:.1?} in all, {:.1?} after the child was released",
        out.elapsed,
        released.elapsed()
    );
    rig.assert_run_ended_with(&out, &root, PARENT_FINAL).await;
    let busy = rig.rt.busy_sessions().await;
    assert!(busy.is_empty(), "busy after run exited: {busy:?}");
    let child_texts = rig.rt.assistant_texts(&child).await;
    assert!(
        child_texts.iter().any(|t| t.contains(CHILD_DONE)),
        "{child_texts:?}"
    );
}

/// Two held background children, released in `order`: the run waits for both; the parent's
/// answer to the first report (`WAITING`) is not the end, its answer to the last one is.
async fn two_children_released_in(order: [&str; 2]) {
    let Some(rig) = Rig::start(RuntimeOptions::default()).await else {
        return;
    };
    let run =
        rig.run_through_gate("Delegate both. @bg(CHILD-HOLD-a job a) @bg(CHILD-HOLD-b job b)");
    tokio::pin!(run);
    let root = while_running(&mut run, "both children were held", async {
        rig.child_held("a").await;
        rig.child_held("b").await;
        rig.root().await
    })
    .await;
    rig.children(&root, 2).await;

    rig.provider.release(order[0]);
    while_running(&mut run, "the second child was released", async {
        rig.rt.wait_for_text(&root, PARENT_WAITING, STEP).await;
        rig.prompt_held(&root).await;
    })
    .await;
    let first = rig.provider.chat_requests();
    let reported: Vec<_> = first
        .iter()
        .filter_map(|r| match r.turn {
            Some(Turn::ParentInjected { reported, .. }) => Some(reported),
            _ => None,
        })
        .collect();
    assert_eq!(
        reported,
        [1],
        "one report so far: {}",
        rig.provider.describe()
    );

    rig.provider.release(order[1]);
    let out = run.await;
    let last = format!("{PARENT_FINAL} (completed=2 error=0)");
    rig.assert_run_ended_with(&out, &root, &last).await;
    let busy = rig.rt.busy_sessions().await;
    assert!(busy.is_empty(), "busy after run exited: {busy:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_through_taskgate_waits_for_two_children_first_a_then_b() {
    two_children_released_in(["a", "b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_through_taskgate_waits_for_two_children_first_b_then_a() {
    two_children_released_in(["b", "a"]).await;
}

/// A failing child and a held one: the failure is reported to the parent first; the run still
/// waits for the other child and prints the parent's last answer, which counts what the runtime
/// injected. Since [`runtime::FAILURE_REPORTED_SINCE`] that is `error=1`; older runtimes inject
/// the failure as `completed` (their own false claim, see docs/compatibility.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_through_taskgate_waits_for_a_failed_and_a_working_child() {
    let Some(rig) = Rig::start(RuntimeOptions::default()).await else {
        return;
    };
    let reports_error = runtime::version_at_least(rig.version(), runtime::FAILURE_REPORTED_SINCE);
    let run = rig.run_through_gate("Delegate both. @bg(CHILD-HOLD-ok job) @bg(CHILD-FAIL job)");
    tokio::pin!(run);
    let root = while_running(&mut run, "the failed child was reported", async {
        rig.child_held("ok").await;
        let root = rig.root().await;
        rig.rt.wait_for_text(&root, PARENT_WAITING, STEP).await;
        rig.prompt_held(&root).await;
        root
    })
    .await;

    rig.provider.release("ok");
    let out = run.await;
    assert!(out.status.success(), "{out:?}");
    let last = if reports_error {
        format!("{PARENT_FINAL} (completed=1 error=1)")
    } else {
        format!("{PARENT_FINAL} (completed=2 error=0)")
    };
    rig.assert_run_ended_with(&out, &root, &last).await;
    let busy = rig.rt.busy_sessions().await;
    assert!(busy.is_empty(), "busy after run exited: {busy:?}");
    assert_eq!(rig.children(&root, 2).await.len(), 2);
}

/// An event subscriber through taskgate never sees the root idle while its child is busy, and
/// `GET /session/status` through taskgate lists the root busy meanwhile (directly it is absent).
///
/// Synchronisation without timing: once the direct stream showed the root idle, the test makes
/// the runtime emit an unrelated event (it creates a session). taskgate passes events in order
/// and only takes held ones out, so when that event has come through, the root's idle (emitted
/// before it) has reached taskgate too; it must not have been passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_subscriber_through_taskgate_never_sees_the_root_idle_while_a_child_works() {
    let Some(rig) = Rig::start(RuntimeOptions::default()).await else {
        return;
    };
    let direct = EventStream::connect(&format!("{}/event", rig.rt.url()), None).await;
    let proxied = EventStream::connect(&format!("{}/event", rig.gate.url()), None).await;
    let run = rig.run_through_gate("Delegate this. @bg(CHILD-HOLD-ev long work)");
    tokio::pin!(run);
    let root = while_running(&mut run, "the child was held", async {
        rig.child_held("ev").await;
        rig.root().await
    })
    .await;
    let child = rig.children(&root, 1).await.remove(0);
    let marker = while_running(&mut run, "the root idled on the direct stream", async {
        direct
            .wait_for("the root's idle on the direct stream", STEP, |evs| {
                evs.iter().any(|e| is_idle_of(e, &root))
            })
            .await;
        // A session created directly: its events pass through taskgate at once.
        let (status, body) = runtime::http_post_json(
            &format!("{}/session", rig.rt.url()),
            rig.rt.basic_auth().as_deref(),
            &serde_json::json!({"title": "marker"}),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK, "{body:?}");
        let marker: Value = serde_json::from_slice(&body).unwrap();
        let marker = marker["id"].as_str().unwrap().to_string();
        proxied
            .wait_for("the marker session's event through taskgate", STEP, |evs| {
                // `session.created` / `session.updated` (the envelope differs between releases).
                evs.iter().any(|e| e.to_string().contains(marker.as_str()))
            })
            .await;
        marker
    })
    .await;
    let seen = proxied.events();
    assert!(
        !seen.iter().any(|e| is_idle_of(e, &root)),
        "taskgate passed the root's idle while child {child} was held: {seen:?}"
    );
    let direct_busy = rig.rt.busy_sessions().await;
    assert!(
        direct_busy.contains(&child) && !direct_busy.contains(&root),
        "directly: the child busy, the root not listed: {direct_busy:?}"
    );
    let gate_busy = rig.gate_busy().await;
    assert!(
        gate_busy.contains(&root) && gate_busy.contains(&child),
        "through taskgate the root and the child are busy: {gate_busy:?}"
    );

    rig.provider.release("ev");
    let out = run.await;
    rig.assert_run_ended_with(&out, &root, PARENT_FINAL).await;
    proxied
        .wait_for("the root's idle through taskgate", STEP, |evs| {
            evs.iter().any(|e| is_idle_of(e, &root))
        })
        .await;
    let offences = busy_at_root_idles(&proxied.events(), &root);
    assert!(
        offences.is_empty(),
        "the proxied stream showed the root idle while these were busy: {offences:?}"
    );
    let busy: Vec<String> = rig
        .rt
        .busy_sessions()
        .await
        .into_iter()
        .filter(|id| *id != marker)
        .collect();
    assert!(busy.is_empty(), "busy after run exited: {busy:?}");
    assert!(
        rig.gate_busy().await.is_empty(),
        "taskgate's status map is empty once the tree is done"
    );
}

/// With `OPENCODE_SERVER_PASSWORD` on the runtime: a client without credentials (or with wrong
/// ones) gets 401 through taskgate; `run` with the password works through taskgate, and the gate
/// still holds it until the background child is done, which it can only do if taskgate's own
/// reads of the runtime (made with `[upstream_auth]`) are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_protected_runtime_through_taskgate() {
    let opts = RuntimeOptions {
        password: Some("s3cret-for-taskgate".into()),
        ..RuntimeOptions::default()
    };
    let Some(rig) = Rig::start(opts).await else {
        return;
    };
    let status_url = format!("{}/session/status", rig.gate.url());
    let (status, _) = http_get(&status_url, None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no credentials");
    let wrong = runtime::basic_auth("opencode", "wrong");
    let (status, _) = http_get(&status_url, Some(&wrong)).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "wrong password");
    let (status, _) = http_get(&format!("{}/event", rig.gate.url()), None)
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "event stream without credentials"
    );
    let (status, body) = http_get(&status_url, rig.rt.basic_auth().as_deref())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "right password: {body:?}");

    // `run` gets OPENCODE_SERVER_PASSWORD from the harness and sends it to taskgate.
    let run = rig.run_through_gate("Delegate this. @bg(CHILD-HOLD-pw work)");
    tokio::pin!(run);
    let root = while_running(&mut run, "the child was held", async {
        rig.child_held("pw").await;
        let root = rig.root().await;
        rig.prompt_held(&root).await;
        root
    })
    .await;
    // The status surface needs taskgate's own reads too.
    assert!(rig.gate_busy().await.contains(&root));
    rig.provider.release("pw");
    let out = run.await;
    rig.assert_run_ended_with(&out, &root, PARENT_FINAL).await;
    let busy = rig.rt.busy_sessions().await;
    assert!(busy.is_empty(), "busy after run exited: {busy:?}");
}

/// One synchronous prompt sent the way `run --attach` sends it (`POST /session`, then
/// `POST /session/:id/message`, which returns when the agent loop ends): the time of the second
/// request and, through taskgate, the `x-taskgate-held-ms` and `x-taskgate-verdict` headers.
async fn timed_prompt(
    base: &str,
    auth: Option<&str>,
    text: &str,
) -> (Duration, Option<u64>, Option<String>) {
    let (status, body) =
        runtime::http_post_json(&format!("{base}/session"), auth, &serde_json::json!({}))
            .await
            .unwrap();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let session: Value = serde_json::from_slice(&body).unwrap();
    let id = session["id"].as_str().unwrap();
    let prompt = serde_json::json!({"parts": [{"type": "text", "text": text}]});
    let started = Instant::now();
    let (status, headers, body) = runtime::http_post_json_with_headers(
        &format!("{base}/session/{id}/message"),
        auth,
        &prompt,
    )
    .await
    .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let held = header("x-taskgate-held-ms").and_then(|v| v.parse().ok());
    (elapsed, held, header("x-taskgate-verdict"))
}

/// A plain prompt and a foreground child are released on the first terminal read: no settle
/// window, no poll interval. The bug this pins: the earlier form of this test asserted a
/// wall-clock margin against the runtime's own round trip, which varies by more than a second
/// on a loaded two-core machine, so `cargo test` failed there. Now it asserts only what
/// taskgate controls: the verdict, and its own account of the hold (`x-taskgate-held-ms`)
/// against a settle window made so long (60 s) that applying it by mistake cannot pass
/// whatever the load. The cost against a direct connection is measured by the benchmark
/// (docs/performance.md), not here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_foreground_prompts_are_not_held_for_a_settle_window() {
    const SETTLE: Duration = Duration::from_secs(60);
    let Some(bin) = runtime_or_skip(&current_test()) else {
        return;
    };
    let provider = ScriptedProvider::start().await;
    let rt = Runtime::start(&bin, &provider.base_url(), RuntimeOptions::default()).await;
    let gate = Taskgate::start(&rt, |config| {
        config.gate.settle_window = taskgate::config::HumanDuration(SETTLE);
        config.gate.rest_bound = taskgate::config::HumanDuration(SETTLE);
    })
    .await;
    let auth = rt.basic_auth();
    for (name, prompt) in [
        ("plain prompt", "Say hello."),
        (
            "foreground child",
            "Do it now. @fg(CHILD-WORK-1S quick job)",
        ),
    ] {
        let (elapsed, held_ms, verdict) = timed_prompt(gate.url(), auth.as_deref(), prompt).await;
        rt.wait_all_idle(STEP).await;
        assert_eq!(verdict.as_deref(), Some("completed"), "{name}");
        let held = Duration::from_millis(held_ms.expect("x-taskgate-held-ms"));
        eprintln!("{name}: taskgate held the reply {held:?} (round trip {elapsed:?})");
        assert!(
            held < SETTLE,
            "{name}: taskgate held the reply {held:?}, as if a settle window applied"
        );
    }
}

/// Runs the real `taskgate wait` binary with a clean environment; `--json` output.
fn taskgate_wait(rt: &Runtime, session: &str, timeout: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskgate"));
    cmd.args([
        "wait",
        session,
        "--upstream",
        rt.url(),
        "--json",
        "--timeout",
        timeout,
    ]);
    for (name, _) in std::env::vars() {
        if name.starts_with("TASKGATE_") || name.starts_with("OPENCODE_") {
            cmd.env_remove(name);
        }
    }
    if let Some(p) = rt.password() {
        cmd.env("OPENCODE_SERVER_PASSWORD", p);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "taskgate wait printed no JSON object ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `taskgate wait SESSION --upstream RUNTIME --json` on a run started directly (which exits
/// early, the upstream bug): while the child is held, a bounded wait times out (exit 2) naming
/// the child; an unbounded one is still waiting, and returns exit 0 with verdict `completed` and
/// the parent's last answer once the child is released and the parent answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taskgate_wait_returns_when_a_direct_runs_tree_is_done() {
    let Some(rig) = Rig::start(RuntimeOptions::default()).await else {
        return;
    };
    let out = rig
        .rt
        .run(rig.rt.url(), &[], "Delegate this. @bg(CHILD-HOLD-w work)")
        .await;
    assert!(out.status.success(), "{out:?}");
    rig.child_held("w").await;
    let root = rig.root().await;
    let child = rig.children(&root, 1).await.remove(0);

    let early = taskgate_wait(&rig.rt, &root, "3s").output().await.unwrap();
    let v = json_of(&early);
    assert_eq!(early.status.code(), Some(2), "timeout while held: {v}");
    assert_eq!(v["verdict"], "running", "{v}");
    assert!(
        v["reason"].as_str().unwrap_or("").contains(&child),
        "the reason names the busy child {child}: {v}"
    );

    // Started while the child is held (the bounded wait above just showed it still is).
    let waiting = taskgate_wait(&rig.rt, &root, "120s").spawn().unwrap();
    rig.provider.release("w");
    let out = waiting.wait_with_output().await.unwrap();
    let v = json_of(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{v}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["verdict"], "completed", "{v}");
    assert!(
        v["text"].as_str().unwrap_or("").contains(PARENT_FINAL),
        "the verdict carries the parent's last answer: {v}"
    );
    let busy = rig.rt.busy_sessions().await;
    assert!(
        busy.is_empty(),
        "busy after taskgate wait returned: {busy:?}"
    );
}
