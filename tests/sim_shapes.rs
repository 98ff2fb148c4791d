//! The sim cannot drift from the real runtime: its events and JSON bodies have the same keys
//! (recursively, values ignored) as traffic recorded from `opencode-ai@1.18.33`
//! (tests/fixtures/opencode-1.18.33/background-subagent/).

#[path = "support/sim.rs"]
mod sim;

use std::collections::BTreeSet;

use serde_json::Value;
use sim::*;
use taskgate::sim::client::run_like_opencode_run;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/opencode-1.18.33/background-subagent/"
);

fn fixture_json(name: &str) -> Value {
    let text = std::fs::read_to_string(format!("{FIXTURES}{name}")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn fixture_sse(name: &str) -> Vec<Value> {
    std::fs::read_to_string(format!("{FIXTURES}{name}"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `Ok` when `sim` has the shape of `real`: same kind of value, objects with the same keys
/// (recursively), every array element shaped like some element of the real array.
fn same_shape(sim: &Value, real: &Value, path: &str) -> Result<(), String> {
    match (sim, real) {
        (Value::Object(s), Value::Object(r)) => {
            let sk: BTreeSet<_> = s.keys().collect();
            let rk: BTreeSet<_> = r.keys().collect();
            if sk != rk {
                return Err(format!("{path}: keys {sk:?} vs real {rk:?}"));
            }
            for (k, v) in s {
                same_shape(v, &r[k], &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(s), Value::Array(r)) => {
            if r.is_empty() {
                return Ok(());
            }
            for (i, item) in s.iter().enumerate() {
                let errors: Vec<String> = r
                    .iter()
                    .filter_map(|real| same_shape(item, real, &format!("{path}[{i}]")).err())
                    .collect();
                if errors.len() == r.len() {
                    return Err(errors.join(" | "));
                }
            }
            Ok(())
        }
        (Value::String(_), Value::String(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Null, Value::Null) => Ok(()),
        _ => Err(format!("{path}: {sim} vs real {real}")),
    }
}

/// What distinguishes variants of one event type: the type, plus the role of a message and the
/// kind and tool status of a part.
fn kind(envelope: &Value) -> String {
    let p = &envelope["properties"];
    format!(
        "{}/{}/{}/{}",
        envelope["type"].as_str().unwrap_or(""),
        p["info"]["role"].as_str().unwrap_or(""),
        p["part"]["type"].as_str().unwrap_or(""),
        p["part"]["state"]["status"].as_str().unwrap_or("")
    )
}

/// Every sim event of a kind the recording has must match one recorded variant; returns the
/// kinds checked.
fn check_events(
    sim: &[Value],
    real: &[Value],
    unwrap: fn(&Value) -> (&Value, String),
) -> BTreeSet<String> {
    let mut checked = BTreeSet::new();
    for event in sim {
        let (_, k) = unwrap(event);
        let variants: Vec<&Value> = real.iter().filter(|r| unwrap(r).1 == k).collect();
        if variants.is_empty() {
            continue;
        }
        let errors: Vec<String> = variants
            .iter()
            .filter_map(|r| same_shape(event, r, "event").err())
            .collect();
        assert!(
            errors.len() < variants.len(),
            "sim event {event}\nmatches no recorded variant of {k}: {errors:#?}"
        );
        checked.insert(k);
    }
    checked
}

fn bare(e: &Value) -> (&Value, String) {
    (e, kind(e))
}

fn wrapped(e: &Value) -> (&Value, String) {
    let payload = &e["payload"];
    if payload["type"] == "sync" {
        (
            e,
            format!(
                "sync/{}",
                payload["syncEvent"]["type"].as_str().unwrap_or("")
            ),
        )
    } else {
        (e, format!("global/{}", kind(payload)))
    }
}

#[tokio::test]
async fn the_background_child_flow_has_the_recorded_shapes() {
    let server = start(0.2).await;
    let events = Recorder::start(&format!("{}/event", server.url)).await;
    let global = Recorder::start(&format!("{}/global/event", server.url)).await;
    let report = run_like_opencode_run(&server.url, "LAUNCH-PARENT please SCENARIO:bg-child")
        .await
        .unwrap();
    let root = report.session_id.clone();

    // The status map while the child works.
    let status = poll_until(&format!("{}/session/status", server.url), |s| {
        s.as_object().is_some_and(|m| !m.is_empty())
    })
    .await;
    // Keyed by session id: compare the entries.
    let real_status = fixture_json("status-while-child-busy.json");
    let real_entry = real_status.as_object().unwrap().values().next().unwrap();
    for (sid, entry) in status.as_object().unwrap() {
        assert!(sid.starts_with("ses_") && sid.len() == 30, "{sid}");
        same_shape(entry, real_entry, "status entry").unwrap();
    }

    let recorded = events
        .wait_for(|e| said_then_idle(e, &root, "FINAL:"))
        .await;
    let child = children_of(&recorded, &root)[0].clone();
    // The root goes idle twice: after the launch, and after the final answer.
    global
        .wait_for(|e| {
            e.iter()
                .filter(|g| is_idle_of(&g["payload"], &root))
                .count()
                >= 2
        })
        .await;

    // Routes.
    let url = &server.url;
    let child_info = get(&format!("{url}/session/{child}")).await;
    same_shape(&child_info, &fixture_json("child-session.json"), "session").unwrap();
    let children = get(&format!("{url}/session/{root}/children")).await;
    same_shape(&children, &fixture_json("parent-children.json"), "children").unwrap();
    let parent_messages = get(&format!("{url}/session/{root}/message")).await;
    same_shape(
        &parent_messages,
        &fixture_json("parent-messages-after.json"),
        "parent messages",
    )
    .unwrap();
    let child_messages = get(&format!("{url}/session/{child}/message")).await;
    same_shape(
        &child_messages,
        &fixture_json("child-messages-after.json"),
        "child messages",
    )
    .unwrap();
    assert_eq!(
        get(&format!("{url}/session/status")).await,
        serde_json::json!({})
    );

    // The same sequence of message kinds as recorded: user, tool-calls step, stop, injected
    // synthetic user message, final answer.
    let roles: Vec<(String, String)> = parent_messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["info"]["role"].as_str().unwrap().to_owned(),
                m["info"]["finish"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let real_roles: Vec<(String, String)> = fixture_json("parent-messages-after.json")
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["info"]["role"].as_str().unwrap().to_owned(),
                m["info"]["finish"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(roles, real_roles);

    // Events on /event.
    let checked = check_events(&recorded, &fixture_sse("event.sse"), bare);
    for must in [
        "server.connected///",
        "session.created///",
        "session.updated///",
        "session.status///",
        "session.idle///",
        "message.updated/user//",
        "message.updated/assistant//",
        "message.part.updated//text/",
        "message.part.updated//step-start/",
        "message.part.updated//step-finish/",
        "message.part.updated//tool/pending",
        "message.part.updated//tool/running",
        "message.part.updated//tool/completed",
        "message.part.delta///",
    ] {
        assert!(
            checked.contains(must),
            "no sim event of kind {must} checked: {checked:?}"
        );
    }

    // Events on /global/event: the wrapper, and the sync mirrors.
    let checked = check_events(&global.events(), &fixture_sse("global-event.sse"), wrapped);
    for must in [
        "global/server.connected///",
        "global/session.status///",
        "global/message.part.updated//tool/completed",
        "sync/session.created.1",
        "sync/message.updated.1",
        "sync/message.part.updated.1",
    ] {
        assert!(
            checked.contains(must),
            "no global event of kind {must} checked: {checked:?}"
        );
    }
}
