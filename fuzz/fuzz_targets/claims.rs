//! The claims room (`src/claims/`) on any JSON: a part, or a list of messages (what message
//! history carries), seeded with the recorded parts and histories of `tests/fixtures/`.
//!
//! Properties:
//! - recognising never panics, names at least one child, and says the same thing twice;
//!   `Links::resolve` keeps every `ses_…` child once, in order, without repeats;
//! - a rewrite of a claim keeps every other byte: `annotate_part` changes a tool part only in
//!   `state.status`, `state.error`, `state.output` and `state.metadata.taskgate` (other metadata
//!   kept), and says "contradiction" exactly when a claimed success meets a failed, aborted or
//!   gone child; a rewritten state is kept whole under `metadata.taskgate.original`;
//! - `relabel_running` changes only `state`, which becomes `running` and keeps the original
//!   whole under `metadata.taskgate.original`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use taskgate::claims::render::{annotate_part, relabel_running};
use taskgate::claims::{self, ChildLink, ClaimTools, Claimed, Links, DEFAULT_TOOLS};
use taskgate::opencode::ToolPart;
use taskgate::oracle::Verdict;

fn verdicts() -> [Verdict; 5] {
    [
        Verdict::Completed {
            text: Some("done".into()),
        },
        Verdict::Running {
            session: "ses_g".into(),
            reason: "ses_g is busy (rule 1)".into(),
        },
        Verdict::Failed {
            session: "ses_c".into(),
            message: "boom".into(),
        },
        Verdict::Aborted {
            session: "ses_c".into(),
            message: "stop".into(),
        },
        Verdict::Gone {
            session: "ses_c".into(),
        },
    ]
}

/// `object` without `keys`, to compare what must not change.
fn except(object: &Value, keys: &[&str]) -> Map<String, Value> {
    let mut map = object.as_object().cloned().unwrap_or_default();
    for key in keys {
        map.remove(*key);
    }
    map
}

fn check_text(text: &str) {
    let claim = claims::message_text(text);
    assert_eq!(claim, claims::message_text(text), "recognised twice");
    if let Some(claim) = claim {
        assert!(!claim.children.is_empty(), "a text claim without a child");
    }
}

fn check_part(tools: &ClaimTools, links: &mut Links, part: &Value) {
    if let Some(text) = part.get("text").and_then(Value::as_str) {
        check_text(text);
    }
    let Some(tool) = ToolPart::from_part(part) else {
        return;
    };
    links.learn_part(&tool);
    if let Some(output) = tool.state.output.as_deref() {
        links.learn_result(output);
        let result = claims::tool_result(tools, &tool.tool, &tool.state.input, output);
        assert!(result.is_none_or(|c| !c.children.is_empty()));
    }
    let Some(claim) = claims::tool_part(tools, &tool) else {
        return;
    };
    assert_eq!(Some(&claim), claims::tool_part(tools, &tool).as_ref());
    assert!(!claim.children.is_empty(), "a claim without a child");
    let resolved = links.resolve(&claim.children, |_| None);
    let mut unique = resolved.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), resolved.len(), "resolve repeats a child");
    for child in &claim.children {
        if let ChildLink::Session(id) = child {
            assert!(resolved.contains(id), "resolve lost {id}");
        }
    }
    let state = &part["state"];
    for verdict in verdicts() {
        for rewrite in [false, true] {
            let mut released = part.clone();
            let contradiction = annotate_part(&mut released, &claim, &verdict, 7, "ses_c", rewrite);
            let claimed_done = claim.claimed == Claimed::Completed;
            assert_eq!(
                contradiction,
                claimed_done
                    && matches!(
                        verdict,
                        Verdict::Failed { .. } | Verdict::Aborted { .. } | Verdict::Gone { .. }
                    )
            );
            assert_eq!(except(&released, &["state"]), except(part, &["state"]));
            if !state.is_object() {
                assert_eq!(&released, part, "a part without a state object changed");
                continue;
            }
            let after = &released["state"];
            assert_eq!(
                except(after, &["status", "error", "output", "metadata"]),
                except(state, &["status", "error", "output", "metadata"])
            );
            let taskgate = &after["metadata"]["taskgate"];
            assert_eq!(taskgate["verdict"], verdict.name());
            assert_eq!(taskgate["child"], "ses_c");
            if state.get("metadata").is_some_and(Value::is_object) {
                assert_eq!(
                    except(&after["metadata"], &["taskgate"]),
                    except(&state["metadata"], &["taskgate"])
                );
            }
            let unconfirmed = claimed_done && !matches!(verdict, Verdict::Completed { .. });
            if unconfirmed && rewrite {
                assert_eq!(after["status"], "error");
                assert_eq!(&taskgate["original"], state);
            } else {
                assert_eq!(after.get("status"), state.get("status"));
                assert_eq!(after.get("output"), state.get("output"));
                assert_eq!(after.get("error"), state.get("error"));
            }
        }
        let mut relabelled = part.clone();
        relabel_running(&mut relabelled, "ses_c", &verdict);
        assert_eq!(except(&relabelled, &["state"]), except(part, &["state"]));
        let after = &relabelled["state"];
        assert_eq!(after["status"], "running");
        assert_eq!(&after["metadata"]["taskgate"]["original"], state);
    }
}

fuzz_target!(|input: &[u8]| {
    check_text(&String::from_utf8_lossy(input));
    let Ok(value) = serde_json::from_slice::<Value>(input) else {
        return;
    };
    let names: Vec<String> = DEFAULT_TOOLS.iter().map(|s| (*s).to_owned()).collect();
    let tools = ClaimTools::new(&names);
    let mut links = Links::default();
    match &value {
        Value::Array(messages) => {
            for message in messages {
                if let Some(parts) = message.get("parts").and_then(Value::as_array) {
                    for part in parts {
                        check_part(&tools, &mut links, part);
                    }
                } else {
                    check_part(&tools, &mut links, message);
                }
            }
        }
        part => check_part(&tools, &mut links, part),
    }
});
