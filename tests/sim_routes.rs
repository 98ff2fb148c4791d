//! The sim's routes behave like the runtime's: ids and ordering, paging, 404s, async prompts,
//! deletion.

#[path = "support/sim.rs"]
mod sim;

use hyper::Method;
use serde_json::{json, Value};
use sim::*;

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v["id"]
                .as_str()
                .or_else(|| v["info"]["id"].as_str())
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn health_config_and_unknown_routes() {
    let server = start(0.05).await;
    let url = &server.url;
    assert_eq!(
        get(&format!("{url}/global/health")).await,
        json!({"healthy": true, "version": "1.18.33"})
    );
    assert!(get(&format!("{url}/config")).await.is_object());
    let (status, body) = call(Method::GET, &format!("{url}/no/such/route"), None).await;
    assert_eq!(status, 404);
    assert_eq!(body["name"], "NotFoundError");
    assert!(body["data"]["message"].is_string());
    let (status, body) = call(Method::GET, &format!("{url}/session/ses_missing"), None).await;
    assert_eq!(status, 404);
    assert_eq!(body["name"], "NotFoundError");
    let (status, _) = call(
        Method::POST,
        &format!("{url}/session/ses_missing/abort"),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn sessions_list_newest_first_with_runtime_ids() {
    let server = start(0.05).await;
    let url = &server.url;
    let mut created = Vec::new();
    for _ in 0..3 {
        let (status, s) = call(Method::POST, &format!("{url}/session"), Some(json!({}))).await;
        assert_eq!(status, 200);
        let id = s["id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("ses_") && id.len() == 30, "{id}");
        assert!(s.get("parentID").is_none());
        created.push(id);
    }
    let listed = ids(&get(&format!("{url}/session")).await);
    let mut newest_first = created.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, listed, "descending ids sort newest first");

    let (status, body) = call(
        Method::DELETE,
        &format!("{url}/session/{}", created[0]),
        None,
    )
    .await;
    assert_eq!((status, body), (200, json!(true)));
    assert_eq!(ids(&get(&format!("{url}/session")).await).len(), 2);
}

#[tokio::test]
async fn messages_page_oldest_first_and_async_prompts_answer_204() {
    let server = start(0.05).await;
    let url = &server.url;
    let events = Recorder::start(&format!("{url}/event")).await;
    let (_, s) = call(Method::POST, &format!("{url}/session"), Some(json!({}))).await;
    let sid = s["id"].as_str().unwrap().to_owned();
    // Two prompts: four messages (user, assistant, user, assistant).
    for n in 0..2 {
        let (status, body) = call(
            Method::POST,
            &format!("{url}/session/{sid}/prompt_async"),
            Some(json!({"parts": [{"type": "text", "text": format!("hello {n}")}]})),
        )
        .await;
        assert_eq!((status, body), (204, Value::Null));
        let want = n + 1;
        events
            .wait_for(|e| e.iter().filter(|e| is_idle_of(e, &sid)).count() >= want)
            .await;
    }
    let all = get(&format!("{url}/session/{sid}/message")).await;
    let all_ids = ids(&all);
    assert_eq!(all_ids.len(), 4);
    let mut sorted = all_ids.clone();
    sorted.sort();
    assert_eq!(sorted, all_ids, "oldest first, ascending ids");
    let roles: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["info"]["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);

    let last_two = get(&format!("{url}/session/{sid}/message?limit=2")).await;
    assert_eq!(ids(&last_two), all_ids[2..]);
    let before = get(&format!(
        "{url}/session/{sid}/message?limit=1&before={}",
        all_ids[2]
    ))
    .await;
    assert_eq!(ids(&before), all_ids[1..2]);
    let one = get(&format!("{url}/session/{sid}/message/{}", all_ids[1])).await;
    assert_eq!(one["info"]["id"], all_ids[1].as_str());
    assert_eq!(one["info"]["finish"], "stop");
    let (status, _) = call(
        Method::GET,
        &format!("{url}/session/{sid}/message/msg_nope"),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_sync_prompt_returns_the_loops_last_assistant_message() {
    let server = start(0.05).await;
    let url = &server.url;
    let (_, s) = call(Method::POST, &format!("{url}/session"), Some(json!({}))).await;
    let sid = s["id"].as_str().unwrap();
    let (status, body) = call(
        Method::POST,
        &format!("{url}/session/{sid}/message"),
        Some(json!({"parts": [{"type": "text", "text": "hi SCENARIO:fg-child"}]})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["info"]["role"], "assistant");
    assert_eq!(body["info"]["finish"], "stop");
    let text = body["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "text")
        .unwrap();
    assert_eq!(text["text"], "FINAL: parent got the child result");
    // The foreground child's session hangs under the root.
    let children = get(&format!("{url}/session/{sid}/children")).await;
    assert_eq!(children.as_array().unwrap().len(), 1);
    assert_eq!(children[0]["parentID"], sid);
    assert_eq!(get(&format!("{url}/session/status")).await, json!({}));
}

/// Rebuilds each session's messages from the event stream: latest `message.updated` info and
/// latest `message.part.updated` part, by id.
fn replay_messages(events: &[Value], sid: &str) -> Value {
    let mut infos: Vec<(String, Value)> = Vec::new();
    let mut parts: Vec<(String, String, Value)> = Vec::new();
    for e in events {
        let p = &e["properties"];
        if p["sessionID"] != sid {
            continue;
        }
        if e["type"] == "message.updated" {
            let id = p["info"]["id"].as_str().unwrap().to_owned();
            match infos.iter_mut().find(|(i, _)| *i == id) {
                Some(slot) => slot.1 = p["info"].clone(),
                None => infos.push((id, p["info"].clone())),
            }
        } else if e["type"] == "message.part.updated" {
            let id = p["part"]["id"].as_str().unwrap().to_owned();
            let mid = p["part"]["messageID"].as_str().unwrap().to_owned();
            match parts.iter_mut().find(|(i, _, _)| *i == id) {
                Some(slot) => slot.2 = p["part"].clone(),
                None => parts.push((id, mid, p["part"].clone())),
            }
        }
    }
    infos.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Array(
        infos
            .into_iter()
            .map(|(id, info)| {
                let mut ps: Vec<&(String, String, Value)> =
                    parts.iter().filter(|(_, m, _)| *m == id).collect();
                ps.sort_by(|a, b| a.0.cmp(&b.0));
                json!({"info": info, "parts": ps.iter().map(|p| p.2.clone()).collect::<Vec<_>>()})
            })
            .collect(),
    )
}

#[tokio::test]
async fn the_routes_say_what_the_event_stream_said() {
    let server = start(0.05).await;
    let url = &server.url;
    let events = Recorder::start(&format!("{url}/event")).await;
    let report = taskgate::sim::client::run_like_opencode_run(url, "SCENARIO:grandchild")
        .await
        .unwrap();
    let root = report.session_id;
    let recorded = events
        .wait_for(|e| {
            let kids = children_of(e, &root);
            kids.first()
                .is_some_and(|c| said_then_idle(e, c, "child final answer"))
                && said_then_idle(e, &root, "FINAL:")
        })
        .await;
    let child = children_of(&recorded, &root)[0].clone();
    let grandchild = children_of(&recorded, &child)[0].clone();
    // Each loop ends with status idle, session.idle, then session.updated: wait for the last.
    let tree = [root.clone(), child.clone(), grandchild.clone()];
    let recorded = events
        .wait_for(|e| {
            tree.iter().all(|sid| {
                let last_idle = e.iter().rposition(|e| is_idle_of(e, sid));
                let last_update = e.iter().rposition(|e| {
                    e["type"] == "session.updated" && e["properties"]["sessionID"] == sid.as_str()
                });
                matches!((last_idle, last_update), (Some(i), Some(u)) if u > i)
            })
        })
        .await;
    for sid in [&root, &child, &grandchild] {
        let listed = get(&format!("{url}/session/{sid}/message")).await;
        assert_eq!(listed, replay_messages(&recorded, sid), "messages of {sid}");
        let info = get(&format!("{url}/session/{sid}")).await;
        let last_update = recorded
            .iter()
            .rev()
            .find(|e| {
                (e["type"] == "session.updated" || e["type"] == "session.created")
                    && e["properties"]["sessionID"] == sid.as_str()
            })
            .unwrap();
        assert_eq!(info, last_update["properties"]["info"], "session {sid}");
    }
    let status = get(&format!("{url}/session/status")).await;
    let replayed = statuses_at(&recorded, recorded.len() - 1);
    assert!(
        replayed.is_empty() && status == json!({}),
        "{status} vs {replayed:?}"
    );
}

#[tokio::test]
async fn the_event_stream_helper_sees_what_happens_after_it_connected() {
    let server = start(0.05).await;
    let mut events = taskgate::sim::client::EventStream::open(&server.url)
        .await
        .unwrap();
    let (_, s) = call(
        Method::POST,
        &format!("{}/session", server.url),
        Some(json!({})),
    )
    .await;
    let created = events.next().await.unwrap().unwrap();
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["properties"]["info"], s);
    assert!(created["id"].as_str().unwrap().starts_with("evt_"));
}
