//! The terminal rule on traffic recorded from a real opencode-ai@1.18.33 run (a parent that
//! launched a background child with `background: true`).

use std::collections::BTreeMap;

use taskgate::opencode::{Message, Session, StatusMap};
use taskgate::oracle::rule::{judge, SessionSnapshot, TreeSnapshot};
use taskgate::oracle::Verdict;

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/opencode-1.18.33/background-subagent/"
);
const PARENT: &str = "ses_df4c7ac0effeZp1S7fWTeAToXq";
const CHILD: &str = "ses_df4c7ab9bffecks0CL3iL16K45";

fn read<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let text = std::fs::read_to_string(format!("{DIR}{name}")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tree(parent_messages: &str, child_messages: &str, status: &str) -> TreeSnapshot {
    let status: StatusMap = read(status);
    let child: Session = read("child-session.json");
    let parent: Session = serde_json::from_value(serde_json::json!({"id": PARENT})).unwrap();
    let snap = |info: Session, messages: Vec<Message>| SessionSnapshot {
        status: status.get(&info.id).cloned(),
        seen_busy: true,
        prompt_pending: false,
        info,
        messages,
    };
    let mut sessions = BTreeMap::new();
    sessions.insert(PARENT.to_owned(), snap(parent, read(parent_messages)));
    sessions.insert(CHILD.to_owned(), snap(child, read(child_messages)));
    TreeSnapshot {
        root: PARENT.to_owned(),
        sessions,
    }
}

#[test]
fn parent_done_while_child_busy_is_running_because_of_the_child() {
    let j = judge(&tree(
        "parent-messages-while-child-busy.json",
        "child-messages-while-busy.json",
        "status-while-child-busy.json",
    ));
    assert_eq!(
        j.verdict,
        Verdict::Running {
            session: CHILD.to_owned(),
            reason: format!("{CHILD} is busy (rule 1)")
        }
    );
    assert!(j.background);
}

#[test]
fn child_idle_but_result_not_yet_injected_is_running_by_rule_5() {
    // The ~0.1 s between the child's idle and the runtime's injection into the parent.
    let j = judge(&tree(
        "parent-messages-while-child-busy.json",
        "child-messages-after.json",
        "status-after.json",
    ));
    assert_eq!(
        j.verdict,
        Verdict::Running {
            session: PARENT.to_owned(),
            reason: format!("background task {CHILD} not yet answered (rule 5)")
        }
    );
}

#[test]
fn after_the_parent_answered_the_tree_is_completed_with_the_final_text() {
    let j = judge(&tree(
        "parent-messages-after.json",
        "child-messages-after.json",
        "status-after.json",
    ));
    assert_eq!(
        j.verdict,
        Verdict::Completed {
            text: Some("FINAL: parent got the child result".to_owned())
        }
    );
    assert!(j.background);
}
