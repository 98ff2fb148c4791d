//! The one engine that plays every scenario: a task per session (its agent loop), plus the
//! runtime's and the plugin's side jobs (background children, result injection, plugin aborts
//! and wakes). Each visible change goes through a [`Sim`] state method that also emits the event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::messages::{
    abort_open, add_user_message, complete_message, finish_message, latest_text, new_part_id,
    open_assistant, outcome_of, permissions, put_part, queue_existing, result_text, set_status,
    step_start, text_part, tokens, SLUG_A, SLUG_B,
};
pub use super::run::NotFound;
use super::run::{Launched, LoopOutcome, RunCtx, Script, Trigger};
use super::scenario::{self, Launch, Launching, PluginStep, Step};
use super::state::{now_ms, SessionRec, Sim, MODEL_ID, PROJECT_ID, PROVIDER_ID, VERSION};

impl Sim {
    fn scaled(&self, ms: u64) -> Duration {
        let scale = if self.options.time_scale.is_finite() && self.options.time_scale >= 0.0 {
            self.options.time_scale
        } else {
            1.0
        };
        // An absurd scale from the command line means "forever", not a panic.
        Duration::try_from_secs_f64(ms as f64 * scale / 1000.0).unwrap_or(Duration::MAX)
    }

    /// Sleeps a scenario delay, scaled.
    async fn pause(&self, ms: u64) {
        tokio::time::sleep(self.scaled(ms)).await;
    }
}

/// Creates a session (`POST /session`, or a `task` call) and starts its agent loop.
pub fn create_session(
    sim: &Arc<Sim>,
    parent: Option<&str>,
    title: Option<String>,
    agent: Option<&str>,
) -> Value {
    let (tx, rx) = mpsc::unbounded_channel();
    let alive = sim.shutdown.child_token();
    let (id, info) = {
        let mut st = sim.lock();
        let id = st.ids.descending("ses");
        let slug = format!("{}-{}", st.ids.pick(SLUG_A), st.ids.pick(SLUG_B));
        let now = now_ms();
        let title = title.unwrap_or_else(|| {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(now);
            format!("New session - {}", humantime::format_rfc3339_millis(at))
        });
        let mut info = json!({
            "id": id, "slug": slug, "version": VERSION, "projectID": PROJECT_ID,
            "directory": sim.directory, "path": "", "title": title,
            "permission": permissions(parent.is_some()),
            "cost": 0, "tokens": tokens(), "time": {"created": now, "updated": now},
        });
        if let Some(parent) = parent {
            info["parentID"] = json!(parent);
        }
        if let Some(agent) = agent {
            info["agent"] = json!(agent);
        }
        st.sessions.insert(
            id.clone(),
            SessionRec {
                info: info.clone(),
                messages: Vec::new(),
                inbox: tx,
                loop_token: None,
                script: None,
                alive: alive.clone(),
                open: None,
                loops_done: 0,
            },
        );
        sim.emit(
            &mut st,
            "session.created",
            json!({"sessionID": id, "info": info}),
        );
        (id, info)
    };
    tokio::spawn(session_actor(sim.clone(), id, rx, alive));
    info
}

/// Deletes a session and its descendants; their loops stop.
pub fn delete_session(sim: &Sim, id: &str) -> bool {
    let mut st = sim.lock();
    if st.session(id).is_none() {
        return false;
    }
    let mut doomed = vec![id.to_owned()];
    let mut i = 0;
    while i < doomed.len() {
        let kids: Vec<String> = st
            .children(&doomed[i])
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect();
        doomed.extend(kids);
        i += 1;
    }
    for sid in doomed.iter().rev() {
        if let Some(rec) = st.sessions.remove(sid) {
            rec.alive.cancel();
            st.statuses.remove(sid);
            sim.emit(
                &mut st,
                "session.deleted",
                json!({"sessionID": sid, "info": rec.info}),
            );
        }
    }
    true
}

/// `POST /session/:id/abort`: cancels the running loop, if any.
pub fn abort(sim: &Sim, id: &str) -> Result<(), NotFound> {
    let st = sim.lock();
    let rec = st.session(id).ok_or_else(|| NotFound(id.to_owned()))?;
    if let Some(token) = &rec.loop_token {
        token.cancel();
    }
    Ok(())
}

/// Whether the runtime knows session `id`.
pub fn exists(sim: &Arc<Sim>, id: &str) -> bool {
    sim.lock().session(id).is_some()
}

/// A user prompt (`POST /session/:id/message` or `prompt_async`). A prompt with a scenario
/// marker, or the first prompt of a session, starts a scenario; later plain prompts get the
/// session's next scripted turn.
pub fn prompt(
    sim: &Arc<Sim>,
    id: &str,
    text: &str,
    reply: Option<oneshot::Sender<LoopOutcome>>,
) -> Result<(), NotFound> {
    let fresh = {
        let st = sim.lock();
        let rec = st.session(id).ok_or_else(|| NotFound(id.to_owned()))?;
        rec.script.is_none() || text.contains(scenario::MARKER)
    };
    if fresh {
        let scn = scenario::pick(text);
        let ctx = Arc::new(RunCtx::default());
        let loops_before = {
            let mut st = sim.lock();
            let rec = st.session_mut(id).ok_or_else(|| NotFound(id.to_owned()))?;
            rec.script = Some(Script {
                agent: Arc::new(scn.root),
                ctx: ctx.clone(),
                taken: 0,
            });
            rec.loops_done
        };
        if !scn.plugin.is_empty() {
            tokio::spawn(run_plugin(
                sim.clone(),
                id.to_owned(),
                scn.plugin,
                ctx,
                loops_before,
            ));
        }
    }
    send_user_message(sim, id, text, false, reply)
}

/// Adds a user message and queues it for the session's loop with the next scripted turn.
fn send_user_message(
    sim: &Sim,
    id: &str,
    text: &str,
    synthetic: bool,
    reply: Option<oneshot::Sender<LoopOutcome>>,
) -> Result<(), NotFound> {
    let mut st = sim.lock();
    let user_msg = add_user_message(sim, &mut st, id, text, synthetic)?;
    let rec = st.session_mut(id).ok_or_else(|| NotFound(id.to_owned()))?;
    let (steps, ctx, agent) = match &mut rec.script {
        Some(script) => {
            let steps = script
                .agent
                .turns
                .get(script.taken)
                .cloned()
                .unwrap_or_else(|| vec![Step::Think(100), Step::Say("noted")]);
            script.taken += 1;
            (steps, script.ctx.clone(), script.agent.agent)
        }
        None => (
            vec![Step::Think(100), Step::Say("noted")],
            Arc::new(RunCtx::default()),
            "build",
        ),
    };
    // A closed inbox means the session is being deleted: the message is moot.
    let _ = rec.inbox.send(Trigger {
        user_msg,
        steps,
        ctx,
        agent,
        reply,
    });
    Ok(())
}

/// The agent loop of one session: waits for a user message, goes busy, answers every queued
/// message, goes idle, and tells the waiting `POST /message` callers how it ended.
async fn session_actor(
    sim: Arc<Sim>,
    sid: String,
    mut inbox: mpsc::UnboundedReceiver<Trigger>,
    alive: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            t = inbox.recv() => match t { Some(t) => t, None => return },
            _ = alive.cancelled() => return,
        };
        let token = CancellationToken::new();
        {
            let mut st = sim.lock();
            match st.session_mut(&sid) {
                Some(rec) => rec.loop_token = Some(token.clone()),
                None => return,
            }
            set_status(&sim, &mut st, &sid, json!({"type": "busy"}));
        }
        let mut waiters = Vec::new();
        let mut outcome = LoopOutcome::default();
        let mut next = Some(first);
        while let Some(mut trigger) = next.take() {
            waiters.extend(trigger.reply.take());
            tokio::select! {
                end = run_turn(&sim, &sid, &trigger) => outcome = end,
                _ = token.cancelled() => {
                    outcome = abort_open(&sim, &sid);
                    break;
                }
                _ = alive.cancelled() => return,
            }
            next = inbox.try_recv().ok();
        }
        {
            let mut st = sim.lock();
            let Some(rec) = st.session_mut(&sid) else {
                return;
            };
            rec.loop_token = None;
            rec.loops_done += 1;
            rec.info["summary"] = json!({"additions": 0, "deletions": 0, "files": 0});
            rec.info["time"]["updated"] = json!(now_ms());
            let info = rec.info.clone();
            set_status(&sim, &mut st, &sid, json!({"type": "idle"}));
            sim.emit(
                &mut st,
                "session.updated",
                json!({"sessionID": sid, "info": info}),
            );
        }
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
    }
}

/// Plays one turn's steps.
async fn run_turn(sim: &Arc<Sim>, sid: &str, trigger: &Trigger) -> LoopOutcome {
    let mut mid = open_assistant(sim, sid, &trigger.user_msg, trigger.agent);
    let mut started = false;
    for step in &trigger.steps {
        let start = |started: &mut bool, mid: &str| {
            if !*started {
                step_start(sim, sid, mid);
                *started = true;
            }
        };
        match step {
            Step::Think(ms) => sim.pause(*ms).await,
            Step::Retry {
                attempt,
                message,
                ms,
            } => {
                let wait = u64::try_from(sim.scaled(*ms).as_millis()).unwrap_or(u64::MAX);
                let next = now_ms().saturating_add(wait);
                set_status(
                    sim,
                    &mut sim.lock(),
                    sid,
                    json!({"type": "retry", "attempt": attempt, "message": message, "next": next}),
                );
                sim.pause(*ms).await;
                set_status(sim, &mut sim.lock(), sid, json!({"type": "busy"}));
            }
            Step::Partial(text) => {
                start(&mut started, &mid);
                text_part(sim, sid, &mid, text);
            }
            Step::Say(text) => {
                start(&mut started, &mid);
                text_part(sim, sid, &mid, text);
                finish_message(sim, sid, &mid, "stop");
                return outcome_of(sim, sid, &mid);
            }
            Step::Fail(message) => {
                let error =
                    json!({"name": "APIError", "data": {"message": message, "isRetryable": false}});
                let mut st = sim.lock();
                let e = error.clone();
                complete_message(sim, &mut st, sid, &mid, |info| info["error"] = e);
                sim.emit(
                    &mut st,
                    "session.error",
                    json!({"sessionID": sid, "error": error}),
                );
                drop(st);
                return outcome_of(sim, sid, &mid);
            }
            Step::Launch(launch) => {
                start(&mut started, &mid);
                run_launch(sim, sid, &mid, launch, &trigger.ctx).await;
                finish_message(sim, sid, &mid, "tool-calls");
                mid = open_assistant(sim, sid, &trigger.user_msg, trigger.agent);
                started = false;
            }
            Step::BackgroundOutput { label, hold_ms } => {
                start(&mut started, &mid);
                run_background_output(sim, sid, &mid, label, *hold_ms, &trigger.ctx).await;
                finish_message(sim, sid, &mid, "tool-calls");
                mid = open_assistant(sim, sid, &trigger.user_msg, trigger.agent);
                started = false;
            }
        }
    }
    // A turn whose data forgot its last word still ends like the runtime's.
    start_if_needed(sim, sid, &mid, started);
    finish_message(sim, sid, &mid, "stop");
    outcome_of(sim, sid, &mid)
}

fn start_if_needed(sim: &Sim, sid: &str, mid: &str, started: bool) {
    if !started {
        step_start(sim, sid, mid);
    }
}

/// The `task` tool: pending → child created → running → completed (at once, or when the
/// child's loop ends for a foreground child).
async fn run_launch(sim: &Arc<Sim>, sid: &str, mid: &str, launch: &Launch, ctx: &Arc<RunCtx>) {
    let pid = new_part_id(sim);
    let call_id = format!("call_{}", &pid[4..16]);
    let mut part = json!({"id": pid, "sessionID": sid, "messageID": mid, "type": "tool",
        "callID": call_id, "tool": "task", "state": {"status": "pending", "input": {}, "raw": ""}});
    put_part(sim, &mut sim.lock(), sid, mid, part.clone());

    let child_agent = launch.child.agent;
    let child = create_session(
        sim,
        Some(sid),
        Some(format!("{} (@{child_agent} subagent)", launch.description)),
        Some(child_agent),
    );
    let child_id = child["id"].as_str().unwrap_or_default().to_owned();
    let start = now_ms();
    let model = json!({"modelID": MODEL_ID, "providerID": PROVIDER_ID});
    let bg_id =
        (launch.style == Launching::OmoBackground).then(|| sim.lock().ids.background_task());
    let (input, mut metadata) = match launch.style {
        Launching::OmoBackground => (
            json!({"category": "quick", "run_in_background": true, "load_skills": [],
                "description": launch.description, "prompt": launch.prompt}),
            json!({"sessionId": child_id, "backgroundTaskId": bg_id, "agent": child_agent,
                "category": "quick"}),
        ),
        Launching::Background => (
            json!({"description": launch.description, "prompt": launch.prompt,
                "subagent_type": child_agent, "background": true}),
            json!({"parentSessionId": sid, "sessionId": child_id, "model": model,
                "background": true}),
        ),
        Launching::Foreground => (
            json!({"description": launch.description, "prompt": launch.prompt,
                "subagent_type": child_agent}),
            json!({"parentSessionId": sid, "sessionId": child_id, "model": model}),
        ),
    };
    part["state"] = json!({"status": "running", "input": input, "title": launch.description,
        "metadata": metadata, "time": {"start": start}});
    put_part(sim, &mut sim.lock(), sid, mid, part.clone());
    ctx.push(Launched {
        label: launch.label,
        description: launch.description,
        session: child_id.clone(),
        bg_id: bg_id.clone(),
        at: Instant::now(),
    });

    // The child's first user message exists at once; its loop may start later.
    {
        let mut st = sim.lock();
        if let Some(rec) = st.session_mut(&child_id) {
            rec.script = Some(Script {
                agent: Arc::new(launch.child.clone()),
                ctx: ctx.clone(),
                taken: 0,
            });
        }
    }
    let (tx, rx) = oneshot::channel();
    let starter = {
        let sim = sim.clone();
        let child_id = child_id.clone();
        let delay = launch.child.start_delay_ms;
        let prompt = launch.prompt;
        async move {
            if delay > 0 {
                // Queue after the delay: meanwhile the child is in no status map.
                let user_msg = {
                    let mut st = sim.lock();
                    add_user_message(&sim, &mut st, &child_id, prompt, false)
                };
                sim.pause(delay).await;
                if let Ok(user_msg) = user_msg {
                    queue_existing(&sim, &child_id, user_msg, Some(tx));
                }
            } else {
                let _ = send_user_message(&sim, &child_id, prompt, false, Some(tx));
            }
        }
    };

    let background = launch.style != Launching::Foreground;
    let starter = if background {
        tokio::spawn(starter);
        None
    } else {
        Some(starter)
    };
    if background && launch.child.start_delay_ms == 0 {
        // The runtime starts the child's loop before it answers the launch: make that
        // order certain, so "claimed while the child runs" never depends on scheduling.
        let child_id = child_id.clone();
        sim.wait_until(|st| {
            st.statuses.contains_key(&child_id)
                || st.session(&child_id).is_none_or(|r| r.loops_done > 0)
        })
        .await;
    }
    let output = match launch.style {
        Launching::Foreground => {
            if let Some(starter) = starter {
                starter.await;
            }
            let outcome = rx.await.unwrap_or_default();
            metadata["truncated"] = json!(false);
            result_text(&child_id, launch.description, &outcome, false)
        }
        Launching::Background => {
            tokio::spawn(inject_when_done(
                sim.clone(),
                sid.to_owned(),
                child_id.clone(),
                launch.description,
                launch.inject_delay_ms,
                rx,
            ));
            metadata["jobId"] = json!(child_id);
            metadata["truncated"] = json!(false);
            format!(
                "<task id=\"{child_id}\" state=\"running\">\n<summary>Background task started</summary>\n<task_result>\nThe task is working in the background. You will be notified automatically when it finishes.\nDO NOT sleep, poll for progress, ask the task for status, or duplicate this task's work — avoid working with the same files or topics it is using.\nWork on non-overlapping tasks, or briefly tell the user what you launched and end your response.\n</task_result>\n</task>"
            )
        }
        Launching::OmoBackground => {
            // oh-my-opencode reads the outcome through its own poller; nothing is injected.
            drop(rx);
            let bg = bg_id.unwrap_or_default();
            format!(
                "Background task launched.\n\nBackground Task ID: {bg}\nDescription: {desc}\nAgent: {child_agent} (category: quick)\nStatus: pending\n\nSystem notifies on completion. Use `background_output` with task_id=\"{bg}\" to check.\n\n<task_metadata>\nsession_id: {child_id}\nbackground_task_id: {bg}\nsubagent: {child_agent}\ncategory: quick\n</task_metadata>",
                desc = launch.description
            )
        }
    };
    part["state"] = json!({"status": "completed", "input": part["state"]["input"].clone(),
        "output": output, "title": launch.description, "metadata": metadata,
        "time": {"start": start, "end": now_ms()}});
    put_part(sim, &mut sim.lock(), sid, mid, part);
}

/// The runtime's side of a native background child: when the child's first loop ends,
/// inject its result into the parent (nothing if the child was aborted).
async fn inject_when_done(
    sim: Arc<Sim>,
    parent: String,
    child: String,
    description: &'static str,
    delay_ms: u64,
    rx: oneshot::Receiver<LoopOutcome>,
) {
    let Ok(outcome) = rx.await else {
        return;
    };
    if outcome.aborted {
        return;
    }
    sim.pause(delay_ms).await;
    let text = result_text(&child, description, &outcome, true);
    let _ = send_user_message(&sim, &parent, &text, true, None);
}

/// oh-my-opencode's `background_output(block=true)`: it trusts its own poller, not the
/// runtime, and hands over the child's latest text as the result.
async fn run_background_output(
    sim: &Arc<Sim>,
    sid: &str,
    mid: &str,
    label: &str,
    hold_ms: u64,
    ctx: &RunCtx,
) {
    let launched = ctx.find(label);
    let bg = launched
        .as_ref()
        .and_then(|l| l.bg_id.clone())
        .unwrap_or_default();
    let child = launched
        .as_ref()
        .map(|l| l.session.clone())
        .unwrap_or_default();
    let pid = new_part_id(sim);
    let call_id = format!("call_{}", &pid[4..16]);
    let input = json!({"task_id": bg, "block": true, "timeout": 120000});
    let start = now_ms();
    let mut part = json!({"id": pid, "sessionID": sid, "messageID": mid, "type": "tool",
        "callID": call_id, "tool": "background_output",
        "state": {"status": "running", "input": input, "time": {"start": start}}});
    put_part(sim, &mut sim.lock(), sid, mid, part.clone());
    sim.pause(hold_ms).await;
    let (description, secs) = launched
        .as_ref()
        .map(|l| (l.description, l.at.elapsed().as_secs().max(1)))
        .unwrap_or(("", 1));
    let output = format!(
        "Task Result\n\nTask ID: {bg}\nDescription: {description}\nDuration: {secs}s\nSession ID: {child}\n\n---\n\n{}",
        latest_text(sim, &child)
    );
    part["state"] = json!({"status": "completed", "input": input, "output": output,
        "title": "Task result", "metadata": {"backgroundTaskId": bg, "sessionId": child},
        "time": {"start": start, "end": now_ms()}});
    put_part(sim, &mut sim.lock(), sid, mid, part);
}

/// A plugin's timeline beside the root session.
async fn run_plugin(
    sim: Arc<Sim>,
    root: String,
    steps: Vec<PluginStep>,
    ctx: Arc<RunCtx>,
    loops_before: u64,
) {
    for step in steps {
        match step {
            PluginStep::AfterRootIdle => {
                let ok = sim
                    .wait_until(|st| {
                        st.session(&root)
                            .is_none_or(|r| r.loops_done > loops_before)
                    })
                    .await;
                if !ok {
                    return;
                }
            }
            PluginStep::Wait(ms) => sim.pause(ms).await,
            PluginStep::Abort(label) => {
                if let Some(l) = ctx.find(label) {
                    let _ = abort(&sim, &l.session);
                }
            }
            PluginStep::Wake(template) => {
                let tasks: Vec<String> = ctx
                    .all()
                    .iter()
                    .filter_map(|l| {
                        l.bg_id
                            .as_ref()
                            .map(|bg| format!("- `{bg}`: {}", l.description))
                    })
                    .collect();
                let text = template.replace("{tasks}", &tasks.join("\n"));
                let _ = send_user_message(&sim, &root, &text, false, None);
            }
        }
    }
}
