//! Each scenario bites: a client doing what `opencode run --attach` does, talking to the sim
//! directly, believes the work done while the sim itself still shows it going on (the control
//! scenarios `plain` and `fg-child` show it is *not* misled when nothing runs in the background).
//! The sim's state at the client's "done" moment is replayed from a recording of its own event
//! stream, which the sim emits under the same lock as it changes what the routes return.

#[path = "support/sim.rs"]
mod sim;

use hyper::Method;
use serde_json::Value;
use sim::*;
use taskgate::sim::client::{run_like_opencode_run, RunReport, Seen};

const SCALE: f64 = 0.2;

struct Run {
    server: SimServer,
    recorder: Recorder,
    report: RunReport,
    /// Index of the idle event the client stopped at, in the recording.
    done: usize,
    root: String,
}

async fn run_scenario(name: &str) -> Run {
    let server = start(SCALE).await;
    let recorder = Recorder::start(&format!("{}/event", server.url)).await;
    let report = run_like_opencode_run(&server.url, &format!("do it SCENARIO:{name}"))
        .await
        .unwrap();
    let idle = report
        .idle_event_id
        .clone()
        .expect("client stopped at an idle");
    let events = recorder
        .wait_for(|e| e.iter().any(|e| e["id"] == idle))
        .await;
    let done = index_of(&events, &idle);
    let root = report.session_id.clone();
    Run {
        server,
        recorder,
        report,
        done,
        root,
    }
}

impl Run {
    fn children(&self) -> Vec<String> {
        children_of(&self.recorder.events(), &self.root)
    }

    /// Asserts the client stopped before the root's final answer, with `busy` children.
    fn assert_misled(&self, events: &[Value], busy: &[&String]) {
        let at_done = statuses_at(events, self.done);
        for child in busy {
            assert!(
                at_done.contains_key(*child),
                "child {child} should be running when the client believed done; statuses {at_done:?}"
            );
        }
        assert!(
            !self.report.texts().iter().any(|t| t.contains("FINAL:")),
            "the direct client should not see the final answer: {:?}",
            self.report.texts()
        );
        assert!(self
            .report
            .timeline
            .iter()
            .any(|e| matches!(e.seen, Seen::Returned { .. })));
    }

    /// Waits for the root's final answer and checks it came after the client's done moment.
    async fn final_after_done(&self) -> Vec<Value> {
        let root = self.root.clone();
        let events = self
            .recorder
            .wait_for(|e| said_then_idle(e, &root, "FINAL:"))
            .await;
        let final_at = events
            .iter()
            .position(|e| is_text_of(e, &root, "FINAL:"))
            .unwrap();
        assert!(
            final_at > self.done,
            "the final answer came after the client left"
        );
        events
    }
}

#[tokio::test]
async fn bg_child_the_client_exits_while_the_child_works() {
    let run = run_scenario("bg-child").await;
    // Straight after the client left, the runtime's own status map still has the child.
    let status = get(&format!("{}/session/status", run.server.url)).await;
    let kids = run.children();
    assert_eq!(kids.len(), 1);
    assert_eq!(
        status[&kids[0]]["type"], "busy",
        "status right after: {status}"
    );
    assert_eq!(run.report.last_text(), Some("launched, ending my turn"));
    // The launch claim the client saw: completed at once, state="running".
    assert!(run.report.timeline.iter().any(|e| matches!(&e.seen,
        Seen::Tool { tool, status, output } if tool == "task" && status == "completed"
            && output.contains("state=\"running\""))));

    let events = run.final_after_done().await;
    run.assert_misled(&events, &[&kids[0]]);
    let injected = events
        .iter()
        .position(|e| {
            is_user_text_of(
                e,
                &run.root,
                &format!("<task id=\"{}\" state=\"completed\">", kids[0]),
            )
        })
        .expect("result injected into the parent");
    let child_idle = events.iter().position(|e| is_idle_of(e, &kids[0])).unwrap();
    assert!(run.done < child_idle && child_idle < injected);
}

async fn children_finish_in_order(name: &str, launched: usize, finish_order: &[usize]) {
    let run = run_scenario(name).await;
    let events = run.final_after_done().await;
    let kids = run.children();
    assert_eq!(kids.len(), launched);
    run.assert_misled(&events, &kids.iter().collect::<Vec<_>>());
    let mut idles: Vec<(usize, usize)> = kids
        .iter()
        .enumerate()
        .map(|(n, k)| (events.iter().position(|e| is_idle_of(e, k)).unwrap(), n))
        .collect();
    idles.sort();
    let order: Vec<usize> = idles.iter().map(|(_, n)| *n).collect();
    assert_eq!(order, finish_order);
    // Every child's result reached the parent.
    for kid in &kids {
        assert!(events.iter().any(|e| is_user_text_of(
            e,
            &run.root,
            &format!("<task id=\"{kid}\"")
        )));
    }
}

#[tokio::test]
async fn bg_two_children_the_second_finishes_first() {
    children_finish_in_order("bg-two", 2, &[1, 0]).await;
}

#[tokio::test]
async fn bg_three_children_finish_out_of_order() {
    children_finish_in_order("bg-three", 3, &[2, 0, 1]).await;
}

#[tokio::test]
async fn grandchild_the_child_is_reported_completed_while_its_grandchild_works() {
    let run = run_scenario("grandchild").await;
    let kids = run.children();
    assert_eq!(kids.len(), 1);
    let child = kids[0].clone();
    let events = run
        .recorder
        .wait_for(|e| said_then_idle(e, &child, "child final answer"))
        .await;
    run.assert_misled(&events, &[&child]);
    let grandchild = children_of(&events, &child);
    assert_eq!(grandchild.len(), 1);
    // The runtime injects "completed" for the child into the parent while the grandchild is busy.
    let injected = events
        .iter()
        .position(|e| {
            is_user_text_of(
                e,
                &run.root,
                &format!("<task id=\"{child}\" state=\"completed\">"),
            )
        })
        .unwrap();
    assert!(statuses_at(&events, injected).contains_key(&grandchild[0]));
    // And the parent answers FINAL before the child's real final answer exists.
    let parent_final = events
        .iter()
        .position(|e| is_text_of(e, &run.root, "FINAL:"))
        .unwrap();
    let child_final = events
        .iter()
        .position(|e| is_text_of(e, &child, "child final answer"))
        .unwrap();
    assert!(parent_final < child_final);
}

#[tokio::test]
async fn fg_child_control_the_client_sees_the_truth() {
    let run = run_scenario("fg-child").await;
    assert_eq!(
        run.report.last_text(),
        Some("FINAL: parent got the child result")
    );
    let events = run.recorder.events();
    assert!(statuses_at(&events, run.done).is_empty());
    let kids = run.children();
    assert_eq!(kids.len(), 1);
    let child_idle = events.iter().position(|e| is_idle_of(e, &kids[0])).unwrap();
    assert!(child_idle < run.done);
}

#[tokio::test]
async fn plain_control_the_client_sees_the_answer() {
    let run = run_scenario("plain").await;
    assert_eq!(
        run.report.last_text(),
        Some("FINAL: plain answer, no child")
    );
    assert!(run.children().is_empty());
    assert!(statuses_at(&run.recorder.events(), run.done).is_empty());
}

#[tokio::test]
async fn omo_task_result_is_handed_over_while_the_child_works_then_the_child_is_aborted() {
    let run = run_scenario("omo").await;
    let kids = run.children();
    assert_eq!(kids.len(), 1);
    let child = kids[0].clone();
    let events = run.final_after_done().await;
    run.assert_misled(&events, &[&child]);

    // The launch text and the premature Task Result, as the client saw them.
    let outputs: Vec<(&str, &str)> = run
        .report
        .timeline
        .iter()
        .filter_map(|e| match &e.seen {
            Seen::Tool { tool, output, .. } => Some((tool.as_str(), output.as_str())),
            _ => None,
        })
        .collect();
    let launch = outputs.iter().find(|(t, _)| *t == "task").unwrap().1;
    assert!(launch.starts_with("Background task launched.\n\nBackground Task ID: bg_"));
    assert!(launch.contains(&format!(
        "<task_metadata>\nsession_id: {child}\nbackground_task_id: bg_"
    )));
    let result = outputs
        .iter()
        .find(|(t, _)| *t == "background_output")
        .unwrap()
        .1;
    assert!(
        result.starts_with("Task Result\n\nTask ID: bg_"),
        "{result}"
    );
    assert!(result.contains(&format!(
        "Session ID: {child}\n\n---\n\npartial: still working"
    )));

    // When that claim completed, the runtime had the child busy.
    let claim = events
        .iter()
        .position(|e| {
            e["type"] == "message.part.updated"
                && e["properties"]["part"]["tool"] == "background_output"
                && e["properties"]["part"]["state"]["status"] == "completed"
        })
        .unwrap();
    assert_eq!(
        statuses_at(&events, claim).get(&child).map(String::as_str),
        Some("busy")
    );

    // Then the plugin aborts the busy child and wakes the parent.
    let aborted = events
        .iter()
        .position(|e| {
            e["type"] == "session.error"
                && e["properties"]["sessionID"] == child
                && e["properties"]["error"]["name"] == "MessageAbortedError"
        })
        .expect("child aborted");
    assert!(aborted > run.done);
    let wake = events
        .iter()
        .position(|e| is_user_text_of(e, &run.root, "[ALL BACKGROUND TASKS COMPLETE]"))
        .unwrap();
    let wake_text = events[wake]["properties"]["part"]["text"].as_str().unwrap();
    assert!(wake_text.ends_with("<!-- OMO_INTERNAL_INITIATOR -->"));
    let messages = get(&format!("{}/session/{child}/message", run.server.url)).await;
    let last = messages.as_array().unwrap().last().unwrap();
    assert_eq!(last["info"]["error"]["name"], "MessageAbortedError");
}

#[tokio::test]
async fn child_fail_an_error_result_reaches_the_parent_after_the_client_left() {
    let run = run_scenario("child-fail").await;
    let child = run.children()[0].clone();
    let events = run.final_after_done().await;
    run.assert_misled(&events, &[&child]);
    assert!(events.iter().any(|e| e["type"] == "session.error"
        && e["properties"]["sessionID"] == child
        && e["properties"]["error"]["name"] == "APIError"));
    assert!(events.iter().any(|e| is_user_text_of(
        e,
        &run.root,
        &format!("<task id=\"{child}\" state=\"error\">")
    )));
    let messages = get(&format!("{}/session/{child}/message", run.server.url)).await;
    let last = messages.as_array().unwrap().last().unwrap();
    assert_eq!(last["info"]["role"], "assistant");
    assert_eq!(last["info"]["error"]["name"], "APIError");
}

#[tokio::test]
async fn child_abort_by_the_user_ends_the_child_aborted() {
    let run = run_scenario("child-abort").await;
    let child = run.children()[0].clone();
    let events = run.recorder.events();
    run.assert_misled(&events, &[&child]);
    poll_until(&format!("{}/session/status", run.server.url), |s| {
        s[&child]["type"] == "busy"
    })
    .await;
    let (status, body) = call(
        Method::POST,
        &format!("{}/session/{child}/abort", run.server.url),
        None,
    )
    .await;
    assert_eq!((status, body), (200, Value::Bool(true)));
    let events = run
        .recorder
        .wait_for(|e| e.iter().any(|e| is_idle_of(e, &child)))
        .await;
    assert!(events.iter().any(|e| e["type"] == "session.error"
        && e["properties"]["sessionID"] == child
        && e["properties"]["error"]["name"] == "MessageAbortedError"));
    let messages = get(&format!("{}/session/{child}/message", run.server.url)).await;
    let last = messages.as_array().unwrap().last().unwrap();
    assert_eq!(last["info"]["error"]["name"], "MessageAbortedError");
    assert!(last["info"]["time"]["completed"].is_number());
}

#[tokio::test]
async fn retry_the_child_passes_through_retry_after_the_client_left() {
    let run = run_scenario("retry").await;
    let child = run.children()[0].clone();
    let events = run.final_after_done().await;
    run.assert_misled(&events, &[&child]);
    let retry = events
        .iter()
        .position(|e| {
            e["type"] == "session.status"
                && e["properties"]["sessionID"] == child
                && e["properties"]["status"]["type"] == "retry"
        })
        .unwrap();
    let status = &events[retry]["properties"]["status"];
    assert_eq!(status["attempt"], 2);
    assert!(status["message"].is_string() && status["next"].is_number());
    assert!(retry > run.done);
}

#[tokio::test]
async fn late_inject_the_whole_status_map_is_empty_before_the_parent_wakes() {
    let run = run_scenario("late-inject").await;
    let child = run.children()[0].clone();
    let events = run.final_after_done().await;
    run.assert_misled(&events, &[&child]);
    let child_idle = events.iter().position(|e| is_idle_of(e, &child)).unwrap();
    assert!(
        statuses_at(&events, child_idle).is_empty(),
        "nothing runs between the child's end and the injection"
    );
    let injected = events
        .iter()
        .position(|e| is_user_text_of(e, &run.root, "state=\"completed\""))
        .unwrap();
    assert!(child_idle < injected);
}

#[tokio::test]
async fn status_missing_the_child_is_in_no_status_map_when_the_client_leaves() {
    let run = run_scenario("status-missing").await;
    let child = run.children()[0].clone();
    let events = run.final_after_done().await;
    assert!(
        statuses_at(&events, run.done).is_empty(),
        "the child exists but has no status yet"
    );
    let busy = events
        .iter()
        .position(|e| {
            e["type"] == "session.status"
                && e["properties"]["sessionID"] == child
                && e["properties"]["status"]["type"] == "busy"
        })
        .unwrap();
    assert!(
        busy > run.done,
        "the child goes busy only after the client left"
    );
    assert!(run
        .report
        .last_text()
        .is_some_and(|t| !t.contains("FINAL:")));
}
