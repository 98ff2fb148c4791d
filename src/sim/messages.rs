//! Building messages and parts as the runtime does: every change goes through the [`Sim`]
//! state and emits the event a client of the real runtime would see.

use serde_json::{json, Value};

use tokio::sync::oneshot;

use super::run::{LoopOutcome, NotFound, Trigger};
use super::state::{now_ms, MessageRec, Sim, State, MODEL_ID, PROVIDER_ID, SNAPSHOT};

pub(super) fn tokens() -> Value {
    json!({"input": 0, "output": 0, "reasoning": 0, "cache": {"read": 0, "write": 0}})
}

pub(super) fn permissions(child: bool) -> Value {
    let mut p = vec![
        json!({"permission": "question", "pattern": "*", "action": "deny"}),
        json!({"permission": "plan_enter", "pattern": "*", "action": "deny"}),
        json!({"permission": "plan_exit", "pattern": "*", "action": "deny"}),
    ];
    if child {
        p.push(json!({"permission": "task", "pattern": "*", "action": "deny"}));
    }
    Value::Array(p)
}

pub(super) const SLUG_A: &[&str] = &[
    "quick", "curious", "brave", "calm", "eager", "gentle", "silent",
];
pub(super) const SLUG_B: &[&str] = &[
    "circuit", "engine", "river", "comet", "falcon", "harbor", "meadow",
];

/// Sets a session's status; idle removes it from the status map and adds `session.idle`.
pub(super) fn set_status(sim: &Sim, st: &mut State, sid: &str, status: Value) {
    if st.session(sid).is_none() {
        return;
    }
    let idle = status["type"] == "idle";
    if idle {
        st.statuses.remove(sid);
    } else {
        st.statuses.insert(sid.to_owned(), status.clone());
    }
    sim.emit(
        st,
        "session.status",
        json!({"sessionID": sid, "status": status}),
    );
    if idle {
        sim.emit(st, "session.idle", json!({"sessionID": sid}));
    }
}

pub(super) fn open_assistant(sim: &Sim, sid: &str, parent_msg: &str, agent: &str) -> String {
    let mut st = sim.lock();
    let mid = st.ids.ascending("msg");
    let info = json!({
        "id": mid, "sessionID": sid, "role": "assistant", "time": {"created": now_ms()},
        "parentID": parent_msg, "modelID": MODEL_ID, "providerID": PROVIDER_ID,
        "mode": agent, "agent": agent,
        "path": {"cwd": sim.directory, "root": sim.directory},
        "cost": 0, "tokens": tokens(),
    });
    if let Some(rec) = st.session_mut(sid) {
        rec.messages.push(MessageRec {
            info: info.clone(),
            parts: Vec::new(),
        });
        rec.open = Some(mid.clone());
        sim.emit(
            &mut st,
            "message.updated",
            json!({"sessionID": sid, "info": info}),
        );
    }
    mid
}

/// Inserts or replaces a part (by id) and emits `message.part.updated`.
pub(super) fn put_part(sim: &Sim, st: &mut State, sid: &str, mid: &str, part: Value) {
    let Some(msg) = st.message_mut(sid, mid) else {
        return;
    };
    match msg.parts.iter_mut().find(|p| p["id"] == part["id"]) {
        Some(slot) => *slot = part.clone(),
        None => msg.parts.push(part.clone()),
    }
    sim.emit(
        st,
        "message.part.updated",
        json!({"sessionID": sid, "part": part, "time": now_ms()}),
    );
}

pub(super) fn new_part_id(sim: &Sim) -> String {
    sim.lock().ids.ascending("prt")
}

pub(super) fn step_start(sim: &Sim, sid: &str, mid: &str) {
    let id = new_part_id(sim);
    let part = json!({"id": id, "sessionID": sid, "messageID": mid, "type": "step-start", "snapshot": SNAPSHOT});
    put_part(sim, &mut sim.lock(), sid, mid, part);
}

pub(super) fn text_part(sim: &Sim, sid: &str, mid: &str, text: &str) {
    let id = new_part_id(sim);
    let start = now_ms();
    let mut part = json!({"id": id, "sessionID": sid, "messageID": mid, "type": "text", "text": "", "time": {"start": start}});
    let mut st = sim.lock();
    put_part(sim, &mut st, sid, mid, part.clone());
    sim.emit(
        &mut st,
        "message.part.delta",
        json!({"sessionID": sid, "messageID": mid, "partID": id, "field": "text", "delta": text}),
    );
    part["text"] = json!(text);
    part["time"]["end"] = json!(now_ms());
    put_part(sim, &mut st, sid, mid, part);
}

/// Ends an assistant message: step-finish part, `finish`, `time.completed`.
pub(super) fn finish_message(sim: &Sim, sid: &str, mid: &str, reason: &str) {
    let id = new_part_id(sim);
    let part = json!({"id": id, "sessionID": sid, "messageID": mid, "type": "step-finish",
        "reason": reason, "snapshot": SNAPSHOT, "cost": 0, "tokens": tokens()});
    let mut st = sim.lock();
    put_part(sim, &mut st, sid, mid, part);
    complete_message(sim, &mut st, sid, mid, |info| {
        info["finish"] = json!(reason)
    });
}

pub(super) fn complete_message(
    sim: &Sim,
    st: &mut State,
    sid: &str,
    mid: &str,
    edit: impl FnOnce(&mut Value),
) {
    let Some(msg) = st.message_mut(sid, mid) else {
        return;
    };
    msg.info["time"]["completed"] = json!(now_ms());
    edit(&mut msg.info);
    let info = msg.info.clone();
    if let Some(rec) = st.session_mut(sid) {
        if rec.open.as_deref() == Some(mid) {
            rec.open = None;
        }
    }
    sim.emit(
        st,
        "message.updated",
        json!({"sessionID": sid, "info": info}),
    );
}

/// The loop's outcome as of message `mid`.
pub(super) fn outcome_of(sim: &Sim, sid: &str, mid: &str) -> LoopOutcome {
    let mut st = sim.lock();
    let Some(msg) = st.message_mut(sid, mid) else {
        return LoopOutcome::default();
    };
    LoopOutcome {
        message: Some(msg.to_json()),
        text: last_text(&msg.parts),
        error: msg.info.get("error").cloned(),
        aborted: msg.info["error"]["name"] == "MessageAbortedError",
    }
}

/// The last text part's text (what a client prints as the answer).
pub(super) fn last_text(parts: &[Value]) -> Option<String> {
    parts
        .iter()
        .rev()
        .find(|p| p["type"] == "text")
        .and_then(|p| p["text"].as_str())
        .map(str::to_owned)
}

/// A session's latest text anywhere in its messages (what oh-my-opencode's
/// `background_output` shows as the result).
pub(super) fn latest_text(sim: &Sim, sid: &str) -> String {
    let st = sim.lock();
    st.session(sid)
        .and_then(|rec| rec.messages.iter().rev().find_map(|m| last_text(&m.parts)))
        .unwrap_or_default()
}

pub(super) fn add_user_message(
    sim: &Sim,
    st: &mut State,
    sid: &str,
    text: &str,
    synthetic: bool,
) -> Result<String, NotFound> {
    let mid = st.ids.ascending("msg");
    let pid = st.ids.ascending("prt");
    let now = now_ms();
    let rec = st
        .session_mut(sid)
        .ok_or_else(|| NotFound(sid.to_owned()))?;
    let agent = match &rec.script {
        Some(script) => script.agent.agent.to_owned(),
        None => rec.info["agent"].as_str().unwrap_or("build").to_owned(),
    };
    let first = rec.info.get("model").is_none();
    rec.info["agent"] = json!(agent);
    rec.info["model"] = json!({"id": MODEL_ID, "providerID": PROVIDER_ID, "variant": "default"});
    rec.info["time"]["updated"] = json!(now);
    let session_info = rec.info.clone();
    let info = json!({
        "id": mid, "sessionID": sid, "role": "user", "time": {"created": now},
        "summary": {"diffs": []}, "agent": agent,
        "model": {"providerID": PROVIDER_ID, "modelID": MODEL_ID},
    });
    let mut part =
        json!({"id": pid, "sessionID": sid, "messageID": mid, "type": "text", "text": text});
    if synthetic {
        part["synthetic"] = json!(true);
    }
    rec.messages.push(MessageRec {
        info: info.clone(),
        parts: vec![part.clone()],
    });
    if first {
        sim.emit(
            st,
            "session.updated",
            json!({"sessionID": sid, "info": session_info}),
        );
    }
    sim.emit(
        st,
        "message.updated",
        json!({"sessionID": sid, "info": info}),
    );
    sim.emit(
        st,
        "message.part.updated",
        json!({"sessionID": sid, "part": part, "time": now}),
    );
    Ok(mid)
}

/// Marks the open assistant message aborted, like the runtime on `POST /abort`.
pub(super) fn abort_open(sim: &Sim, sid: &str) -> LoopOutcome {
    let error =
        json!({"name": "MessageAbortedError", "data": {"message": "The operation was aborted."}});
    let open = {
        let mut st = sim.lock();
        let open = st.session(sid).and_then(|r| r.open.clone());
        if let Some(mid) = &open {
            let now = now_ms();
            let unfinished: Vec<Value> = st
                .message_mut(sid, mid)
                .map(|m| {
                    m.parts
                        .iter()
                        .filter(|p| {
                            p["type"] == "tool"
                                && matches!(
                                    p["state"]["status"].as_str(),
                                    Some("pending" | "running")
                                )
                        })
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            for mut part in unfinished {
                let start = part["state"]["time"]["start"].as_u64().unwrap_or(now);
                let input = part["state"]["input"].clone();
                part["state"] = json!({"status": "error", "input": input,
                    "error": "Tool execution aborted", "time": {"start": start, "end": now}});
                put_part(sim, &mut st, sid, mid, part);
            }
            let e = error.clone();
            complete_message(sim, &mut st, sid, mid, |info| info["error"] = e);
        }
        sim.emit(
            &mut st,
            "session.error",
            json!({"sessionID": sid, "error": error}),
        );
        open
    };
    match open {
        Some(mid) => outcome_of(sim, sid, &mid),
        None => LoopOutcome {
            aborted: true,
            error: Some(error),
            ..LoopOutcome::default()
        },
    }
}

/// Queues an already-added user message for the session's loop (the delayed-start child).
pub(super) fn queue_existing(
    sim: &Sim,
    sid: &str,
    user_msg: String,
    reply: Option<oneshot::Sender<LoopOutcome>>,
) {
    let mut st = sim.lock();
    let Some(rec) = st.session_mut(sid) else {
        return;
    };
    let Some(script) = &mut rec.script else {
        return;
    };
    let steps = script
        .agent
        .turns
        .get(script.taken)
        .cloned()
        .unwrap_or_default();
    script.taken += 1;
    let trigger = Trigger {
        user_msg,
        steps,
        ctx: script.ctx.clone(),
        agent: script.agent.agent,
        reply,
    };
    let _ = rec.inbox.send(trigger);
}

/// `<task id=… state="completed|error">` as the runtime writes it.
pub(super) fn result_text(
    child: &str,
    description: &str,
    outcome: &LoopOutcome,
    background: bool,
) -> String {
    match &outcome.error {
        Some(error) => {
            let message = error["data"]["message"].as_str().unwrap_or("unknown error");
            let summary = if background {
                format!("<summary>Background task failed: {description}</summary>\n")
            } else {
                String::new()
            };
            format!("<task id=\"{child}\" state=\"error\">\n{summary}<task_error>\n{message}\n</task_error>\n</task>")
        }
        None => {
            let text = outcome.text.as_deref().unwrap_or("");
            let summary = if background {
                format!("<summary>Background task completed: {description}</summary>\n")
            } else {
                String::new()
            };
            format!("<task id=\"{child}\" state=\"completed\">\n{summary}<task_result>\n{text}\n</task_result>\n</task>")
        }
    }
}
