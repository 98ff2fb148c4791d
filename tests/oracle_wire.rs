//! The wire types on a real recorded event stream and on long histories.

#[path = "support/oracle.rs"]
mod oracle_double;

use std::collections::HashSet;

use oracle_double::{Data, Upstream, CHILD, PARENT};
use serde_json::json;
use taskgate::config::Config;
use taskgate::opencode::sse::SseDecoder;
use taskgate::opencode::{Event, SessionStatus};
use taskgate::oracle::client::RuntimeClient;
use taskgate::oracle::SessionRef;

const GLOBAL: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/opencode-1.18.33/background-subagent/global-event.sse"
));
const EVENT: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/opencode-1.18.33/background-subagent/event.sse"
));

fn events(stream: &str, chunk: usize) -> Vec<Event> {
    let mut decoder = SseDecoder::new();
    stream
        .as_bytes()
        .chunks(chunk)
        .flat_map(|c| decoder.push(c))
        .filter_map(|f| Event::parse(f.data.as_bytes()))
        .collect()
}

#[test]
fn the_recorded_global_stream_reads_the_same_as_the_directory_stream() {
    let global = events(GLOBAL, 7);
    let plain = events(EVENT, 4096);
    // `sync` payloads are dropped; what remains is the directory stream's events.
    let kinds = |v: &[Event]| {
        v.iter()
            .filter(|e| !e.kind.starts_with("server."))
            .map(|e| e.kind.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&global), kinds(&plain));
    assert!(global
        .iter()
        .filter(|e| !e.kind.starts_with("server."))
        .all(|e| e.directory.as_deref() == Some("/home/dev/project")));
    // The child's busy → idle, seen through the typed accessors.
    let child: Vec<SessionStatus> = global
        .iter()
        .filter(|e| e.session_id() == Some(CHILD))
        .filter_map(|e| e.status())
        .collect();
    assert_eq!(child.first(), Some(&SessionStatus::Busy));
    assert_eq!(child.last(), Some(&SessionStatus::Idle));
    assert_eq!(global.iter().filter(|e| e.is_idle()).count(), 3);
    // The background launch, from the part updates.
    let launch = global
        .iter()
        .filter_map(|e| e.part())
        .filter_map(|p| p.as_tool().and_then(|t| t.background_launch()))
        .next()
        .expect("the task part launches the child");
    assert_eq!(launch.child, CHILD);
    let sessions: HashSet<&str> = global.iter().filter_map(|e| e.session_id()).collect();
    assert_eq!(sessions, HashSet::from([PARENT, CHILD]));
    assert!(global
        .iter()
        .filter_map(|e| e.message_info())
        .any(|m| m.finish.as_deref() == Some("stop")));
}

#[tokio::test]
async fn long_histories_are_read_page_by_page() {
    let mut data = Data::all_done();
    let history: Vec<_> = (0..450)
        .map(|i| json!({"info": {"id": format!("msg_{i:05}"), "sessionID": PARENT, "role": "user", "time": {"created": i}},
            "parts": [{"type": "text", "text": format!("m{i}")}]}))
        .collect();
    data.messages.insert(PARENT.to_owned(), history);
    let up = Upstream::start(data, None).await;
    let config =
        Config::from_toml_str("t", &format!("[proxy]\nupstream = \"{}\"\n", up.url)).unwrap();
    let client = RuntimeClient::new(&config);
    let messages = client
        .messages(&SessionRef {
            id: PARENT.into(),
            directory: Some("/home/dev/project".into()),
        })
        .await
        .unwrap();
    assert_eq!(messages.len(), 450);
    assert_eq!(messages[0].info.id, "msg_00000");
    assert_eq!(messages[449].info.id, "msg_00449");
    assert_eq!(
        up.double
            .message_reads
            .load(std::sync::atomic::Ordering::SeqCst),
        3
    );
}
