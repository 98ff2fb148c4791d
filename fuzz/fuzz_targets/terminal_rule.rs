//! The terminal rule (`src/oracle/rule.rs`) on trees built from the fuzzer's bytes.
//!
//! A tree has one to five sessions. Each takes a parent (any session, so cycles happen), a
//! status (none, idle, busy, retry, an unknown one), `seen_busy`, `prompt_pending` and up to six
//! messages: recorded ones from `tests/fixtures/` (a real background launch, its child, the
//! injected result), sometimes edited (turn not ended, error, aborted, role flipped), or made up
//! (texts with `<task …>` results, `task` / `background_output` parts in every status, naming
//! any session). The fixture's parent and child ids are two of the five session ids, so recorded
//! launches name sessions of the tree.
//!
//! Properties:
//! - a judgement is deterministic: the same tree, judged again or cloned, gets the same one;
//! - a tree in which a session reachable from the root by `parentID` is busy, retrying, in an
//!   unknown status or has a prompt pending is `running` and not "at rest";
//! - a `completed` tree has, in every such session, a last message that is an assistant message
//!   ending its turn, and no tool call left open;
//! - "at rest" is only ever said of a running tree, and a read root is never `gone`/`unknown`;
//! - a session nothing links to does not change the judgement.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use taskgate::opencode::{Message, MessageError, Role, Session, SessionStatus};
use taskgate::oracle::rule::{judge, SessionSnapshot, TreeSnapshot};
use taskgate::oracle::Verdict;

const FIXTURES: [&str; 4] = [
    include_str!("../../tests/fixtures/opencode-1.18.33/background-subagent/parent-messages-after.json"),
    include_str!("../../tests/fixtures/opencode-1.18.33/background-subagent/parent-messages-while-child-busy.json"),
    include_str!("../../tests/fixtures/opencode-1.18.33/background-subagent/child-messages-after.json"),
    include_str!("../../tests/fixtures/opencode-1.18.33/background-subagent/child-messages-while-busy.json"),
];

/// The fixture's parent and child first, so its launches and `sessionId`s name tree members.
const IDS: [&str; 5] = [
    "ses_df4c7ac0effeZp1S7fWTeAToXq",
    "ses_df4c7ab9bffecks0CL3iL16K45",
    "ses_g2",
    "ses_g3",
    "ses_g4",
];

/// Read once, as typed messages: parsing or converting the fixtures on every input would be
/// most of the work.
fn recorded() -> &'static [Message] {
    static RECORDED: OnceLock<Vec<Message>> = OnceLock::new();
    RECORDED.get_or_init(|| {
        FIXTURES
            .iter()
            .flat_map(|text| serde_json::from_str::<Vec<Message>>(text).unwrap_or_default())
            .collect()
    })
}

fn pick<'a, T>(u: &mut Unstructured, from: &'a [T]) -> Result<&'a T> {
    Ok(&from[u.choose_index(from.len())?])
}

fn made_up_part(u: &mut Unstructured) -> Result<Value> {
    let id = *pick(u, &IDS)?;
    let state = *pick(u, &["completed", "error", "running", "cancelled"])?;
    Ok(match u.int_in_range(0..=3)? {
        0 => json!({"type": "text", "text": *pick(u, &["done", "", "working on it"])?}),
        1 => json!({"type": "text",
            "text": format!("<task id=\"{id}\" state=\"{state}\">result</task>")}),
        2 => {
            json!({"type": "tool", "callID": "c", "tool": *pick(u, &["task", "background_output", "bash"])?,
            "state": {
                "status": *pick(u, &["pending", "running", "completed", "error"])?,
                "input": {},
                "output": *pick(u, &["", "task_id: x\nstate: completed", "Background task launched"])?,
                "metadata": {"sessionId": id, "background": u.arbitrary::<bool>()?},
            }})
        }
        _ => json!({"type": "tool", "callID": "c", "tool": "task", "state": {
            "status": "completed", "input": {}, "metadata": {"sessionId": id, "background": true},
            "output": format!("Background task started.\ntask_id: {id}\n"),
        }}),
    })
}

fn message(u: &mut Unstructured, recorded: &[Message], n: i64) -> Result<Option<Message>> {
    if !recorded.is_empty() && u.arbitrary::<bool>()? {
        let mut m = pick(u, recorded)?.clone();
        let error = |name: &str, message: &str| MessageError {
            name: name.to_owned(),
            data: json!({ "message": message }),
        };
        match u.int_in_range(0..=5)? {
            0 => m.info.time.completed = None,
            1 => m.info.error = Some(error("APIError", "boom")),
            2 => m.info.error = Some(error("MessageAbortedError", "stop")),
            3 => {
                m.info.role = if m.info.role == Role::User {
                    Role::Assistant
                } else {
                    Role::User
                }
            }
            _ => {}
        }
        return Ok(Some(m));
    }
    let role = *pick(u, &["user", "assistant"])?;
    let mut info = json!({"id": format!("msg_{n:03}"), "sessionID": "x", "role": role,
        "time": {"created": n}});
    if role == "assistant" {
        if u.arbitrary::<bool>()? {
            info["time"]["completed"] = json!(n);
        }
        if let Some(finish) = *pick(
            u,
            &[
                None,
                Some("stop"),
                Some("tool-calls"),
                Some("error"),
                Some("length"),
            ],
        )? {
            info["finish"] = json!(finish);
        }
    }
    let parts = (0..u.int_in_range(0..=3)?)
        .map(|_| made_up_part(u))
        .collect::<Result<Vec<_>>>()?;
    Ok(serde_json::from_value(json!({"info": info, "parts": parts})).ok())
}

fn tree(u: &mut Unstructured) -> Result<TreeSnapshot> {
    let recorded = recorded();
    let count = u.int_in_range(1..=IDS.len())?;
    let mut sessions = BTreeMap::new();
    let mut n = 0;
    for (i, id) in IDS.iter().enumerate().take(count) {
        let parent = if i == 0 && u.arbitrary::<bool>()? {
            None
        } else {
            *pick(
                u,
                &[None, Some(IDS[0]), Some(IDS[1]), Some(IDS[2]), Some(IDS[3])],
            )?
        };
        let status = *pick(
            u,
            &[
                None,
                Some("idle"),
                Some("busy"),
                Some("retry"),
                Some("compacting"),
            ],
        )?;
        let mut messages = Vec::new();
        for _ in 0..u.int_in_range(0..=6)? {
            n += 1;
            if let Some(m) = message(u, recorded, n)? {
                messages.push(m);
            }
        }
        let info: Session = serde_json::from_value(json!({"id": id, "parentID": parent}))
            .expect("a session of an id and a parent reads");
        sessions.insert(
            (*id).to_owned(),
            SessionSnapshot {
                info,
                status: status
                    .map(|s| SessionStatus::from_value(&json!({"type": s, "attempt": 1}))),
                seen_busy: u.arbitrary()?,
                prompt_pending: u.arbitrary()?,
                messages,
            },
        );
    }
    Ok(TreeSnapshot {
        root: IDS[0].to_owned(),
        sessions,
    })
}

/// Sessions reached from the root through `parentID` alone (a subset of what the rule walks).
fn by_parent(tree: &TreeSnapshot) -> Vec<&SessionSnapshot> {
    let mut seen = BTreeSet::from([tree.root.as_str()]);
    let mut order: Vec<&SessionSnapshot> = tree.sessions.get(&tree.root).into_iter().collect();
    let mut next = 0;
    while next < order.len() {
        let id = order[next].info.id.as_str();
        next += 1;
        for s in tree.sessions.values() {
            if s.info.parent_id.as_deref() == Some(id) && seen.insert(s.info.id.as_str()) {
                order.push(s);
            }
        }
    }
    order
}

fuzz_target!(|input: &[u8]| {
    let mut u = Unstructured::new(input);
    let Ok(tree) = tree(&mut u) else {
        return;
    };
    let judgement = judge(&tree);
    assert_eq!(judgement, judge(&tree), "judged twice");
    assert_eq!(judgement, judge(&tree.clone()), "judged on a clone");
    assert!(
        !matches!(
            judgement.verdict,
            Verdict::Gone { .. } | Verdict::Unknown { .. }
        ),
        "a read root is judged {:?}",
        judgement.verdict
    );
    if judgement.at_rest.is_some() {
        assert!(matches!(judgement.verdict, Verdict::Running { .. }));
    }
    let reached = by_parent(&tree);
    if let Some(s) = reached
        .iter()
        .find(|s| s.prompt_pending || s.status.as_ref().is_some_and(|st| !st.is_idle()))
    {
        assert!(
            matches!(judgement.verdict, Verdict::Running { .. }) && judgement.at_rest.is_none(),
            "{} works, and the tree is judged {:?} (at rest: {:?})",
            s.info.id,
            judgement.verdict,
            judgement.at_rest
        );
    }
    if matches!(judgement.verdict, Verdict::Completed { .. }) {
        for s in &reached {
            let last = s
                .messages
                .last()
                .expect("a completed session has a message");
            assert!(
                last.info.is_assistant() && last.info.ends_turn(),
                "{} did not end its turn, and the tree is completed",
                s.info.id
            );
            assert!(
                s.messages
                    .iter()
                    .flat_map(|m| m.parts.iter().filter_map(|p| p.as_tool()))
                    .all(|t| !t.is_open()),
                "{} has a tool call open, and the tree is completed",
                s.info.id
            );
        }
    }
    let mut with_stranger = tree.clone();
    let stranger: Session =
        serde_json::from_value(json!({"id": "ses_stranger", "parentID": "ses_elsewhere"}))
            .expect("a session of an id and a parent reads");
    with_stranger.sessions.insert(
        "ses_stranger".to_owned(),
        SessionSnapshot {
            info: stranger,
            status: Some(SessionStatus::from_value(&json!({"type": "busy"}))),
            seen_busy: true,
            prompt_pending: true,
            messages: Vec::new(),
        },
    );
    assert_eq!(
        judgement,
        judge(&with_stranger),
        "a session nothing links to changed the judgement"
    );
});
