//! The watcher: one subscription to the runtime's `/global/event`, kept open with reconnects.
//!
//! It does not decide anything. It remembers what reads cannot show (that a session was ever
//! busy: an idle session absent from the status map looks exactly like one that never
//! started), links children to parents as they are created, and tells waiters *when* to
//! re-read: an event that can change a verdict bumps the session's sequence number and wakes
//! them, so a claim is released within one read of the runtime's own idle, not a poll later.
//! It wakes only the waiters of that session's trees ([`WatchState::wakers`]): with 10,000
//! claims held on 100 trees, waking every waiter on every event made the release of the last
//! claim take seconds of wake-ups instead of one read.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::opencode::sse::SseDecoder;
use crate::opencode::{Event, Part, StatusMap};

use super::client::RuntimeClient;
use crate::claims::Links;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most sessions the watcher remembers. Past it the half least recently changed is forgotten:
/// what it knew (busy once, parent, children) is only a shortcut, a tree read finds it again,
/// and a proxy running for weeks must not grow with every session it ever saw.
const MAX_SESSIONS: usize = 4096;
/// Past this many per-session wakers, those nobody waits on any more are dropped.
const MAX_WAKERS: usize = 4096;

/// What the watcher knows of one session.
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    /// Seen busy (or retrying) at least once: absent from the status map and silent means
    /// "not started", not "done" (terminal rule, clause 1).
    pub busy_ever: bool,
    /// Unix ms since when the session has been working (busy or retrying), as first seen in
    /// the current run; `None` when idle. Only for display ("busy for 40 s").
    pub busy_since_ms: Option<u64>,
    /// `parentID`, which never changes: the status surface walks up from busy sessions.
    pub parent: Option<String>,
    /// Children seen so far: task parts' `metadata.sessionId`, background launches, and
    /// sessions created with this one as `parentID`. A tree read starts from them, so a
    /// plain prompt's tree costs one round trip.
    pub children: BTreeSet<String>,
    /// The global sequence number of the last verdict-relevant change.
    seq: u64,
    /// When that change was seen (this session's or a child's).
    changed_at: Option<Instant>,
}

impl SessionState {
    /// A verdict-relevant change, numbered `seq`, seen now. The number and the time go
    /// together: reads go stale by the one, settle windows count from the other.
    fn changed(&mut self, seq: u64) {
        self.seq = seq;
        self.changed_at = Some(Instant::now());
    }
}

/// A prompt accepted through taskgate, not yet seen started.
#[derive(Debug, Clone, Copy)]
struct Accepted {
    at: Instant,
    received_ms: i64,
}

/// Shared between the watcher task and every reader.
pub struct WatchState {
    sessions: Mutex<HashMap<String, SessionState>>,
    /// oh-my-opencode `bg_…` ids → the child session each launch started, from the runtime's
    /// own tool parts (the latest launch wins: a retry can give a `bg_` id a new session).
    background: Mutex<Links>,
    /// Prompts accepted through taskgate that the runtime has not been seen starting: session
    /// → when taskgate received the request (for the expiry, and Unix ms to compare with the
    /// runtime's message times).
    accepted: Mutex<HashMap<String, Accepted>>,
    seq: AtomicU64,
    /// Sequence number of the last reconnect: everything read before it may have missed events.
    reset_at: AtomicU64,
    /// Wakes every waiter, for a reconnect only (everything may be stale).
    changed: watch::Sender<u64>,
    /// Since when the event stream has been open; `None` while it is not. Only while it is
    /// open does silence about a session mean that nothing happened to it.
    open_since: Mutex<Option<Instant>>,
    /// The latest change of a session forgotten to bound memory: what the watcher can no
    /// longer tell about it is no later than this.
    forgotten_until: Mutex<Option<Instant>>,
    /// Per session, the waiters of the trees it is part of; an event for a session wakes its
    /// own and its parent's.
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Default for WatchState {
    fn default() -> Self {
        WatchState {
            sessions: Mutex::new(HashMap::new()),
            background: Mutex::new(Links::default()),
            accepted: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            reset_at: AtomicU64::new(0),
            changed: watch::channel(0).0,
            open_since: Mutex::new(None),
            forgotten_until: Mutex::new(None),
            wakers: Mutex::new(HashMap::new()),
        }
    }
}

impl WatchState {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionState>> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current sequence number; a read records it when it starts.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Wakes on a reconnect, after which every cached read is stale. Changes of particular
    /// sessions wake their [`WatchState::wakers`] instead.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// One waker per session of `ids`, notified (`notify_waiters`) on every verdict-relevant
    /// change of that session (check [`WatchState::changed_since`] after).
    pub fn wakers(&self, ids: &[String]) -> Vec<Arc<Notify>> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if wakers.len() > MAX_WAKERS {
            wakers.retain(|_, w| Arc::strong_count(w) > 1);
        }
        ids.iter()
            .map(|id| wakers.entry(id.clone()).or_default().clone())
            .collect()
    }

    fn wake(&self, ids: &[&str]) {
        let wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if let Some(w) = wakers.get(*id) {
                w.notify_waiters();
            }
        }
    }

    /// A verdict-relevant event for one of `ids` (or a reconnect) happened after `seq`.
    pub fn changed_since(&self, ids: &[String], seq: u64) -> bool {
        if self.reset_at.load(Ordering::SeqCst) > seq {
            return true;
        }
        let sessions = self.sessions();
        ids.iter()
            .any(|id| sessions.get(id).is_some_and(|s| s.seq > seq))
    }

    pub fn session(&self, id: &str) -> Option<SessionState> {
        self.sessions().get(id).cloned()
    }

    /// The child session an oh-my-opencode `bg_…` id was launched as, if a launch was seen.
    pub fn background_session(&self, task_id: &str) -> Option<String> {
        self.background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .session(task_id)
            .map(str::to_owned)
    }

    /// A prompt for `session` was accepted by the runtime (`prompt_async` answered 2xx) for a
    /// request taskgate received at `received_ms` (Unix ms): the session counts as working
    /// until the runtime is seen starting it.
    pub fn prompt_accepted(&self, session: &str, received_ms: i64) {
        self.accepted().insert(
            session.to_owned(),
            Accepted {
                at: Instant::now(),
                received_ms,
            },
        );
        let seq = self.bump();
        if let Some(s) = self.sessions().get_mut(session) {
            s.changed(seq);
        }
        self.wake(&[session]);
    }

    /// The runtime answered a prompt for `session`: its turn just ended, which is news about it
    /// like an event (whose own events may still be on their way), so a status map or tree read
    /// taken before counts as stale for it.
    pub fn prompt_answered(&self, session: &str) {
        let seq = self.bump();
        self.sessions()
            .entry(session.to_owned())
            .or_default()
            .changed(seq);
        self.wake(&[session]);
    }

    /// Whether `session` still has an accepted prompt the runtime has not started. The mark
    /// goes once the session is busy, once its history holds a user message created at or
    /// after the request, or after `bound` (a prompt the runtime dropped must not hold a tree
    /// for ever).
    pub fn prompt_pending(
        &self,
        session: &str,
        busy_now: bool,
        messages: &[crate::opencode::Message],
        bound: Duration,
    ) -> bool {
        let mut accepted = self.accepted();
        let Some(mark) = accepted.get(session) else {
            return false;
        };
        let started = busy_now
            || messages.iter().any(|m| {
                m.info.is_user()
                    && m.info
                        .time
                        .created
                        .is_some_and(|created| created >= mark.received_ms)
            });
        if started || mark.at.elapsed() >= bound {
            accepted.remove(session);
            return false;
        }
        true
    }

    /// Sessions with an accepted prompt not yet seen started (`GET /session/status` lists
    /// them as busy).
    pub fn pending_prompts(&self) -> Vec<String> {
        self.accepted().keys().cloned().collect()
    }

    fn accepted(&self) -> std::sync::MutexGuard<'_, HashMap<String, Accepted>> {
        self.accepted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Everything cached may be stale (a reconnect: events were missed).
    fn reset(&self) {
        let seq = self.bump();
        self.reset_at.store(seq, Ordering::SeqCst);
        self.changed.send_replace(seq);
    }

    /// The event stream is open (and the status map re-read): from now on every change is seen.
    fn stream_opened(&self) {
        *self.open_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.reset();
    }

    /// The event stream broke: changes may go unseen until it is open again.
    fn stream_closed(&self) {
        *self.open_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.reset();
    }

    /// Since when none of `ids` has changed in a way that can move a verdict, as far as the
    /// watcher can vouch for it: the latest such change it took in for any of them, or when
    /// its event stream opened if later. `None` when it cannot vouch: the stream is not open,
    /// or some session is still busy by its events while a read found the tree at rest (its
    /// events are behind the runtime, so the change that ended the work is not in yet).
    pub fn quiet_since(&self, ids: &[String]) -> Option<Instant> {
        let mut since = (*self.open_since.lock().unwrap_or_else(|p| p.into_inner()))?;
        let sessions = self.sessions();
        if let Some(forgotten) = *self
            .forgotten_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            since = since.max(forgotten);
        }
        for id in ids {
            if let Some(s) = sessions.get(id) {
                if s.busy_since_ms.is_some() {
                    return None;
                }
                if let Some(at) = s.changed_at {
                    since = since.max(at);
                }
            }
        }
        Some(since)
    }

    /// Takes in one runtime event.
    pub fn record(&self, event: &Event) {
        let Some(id) = event.session_id() else { return };
        let relevant = event.affects_verdict();
        let seq = if relevant { self.bump() } else { 0 };
        let parent = {
            let mut sessions = self.sessions();
            let s = sessions.entry(id.to_owned()).or_default();
            if let Some(status) = event.status() {
                if !status.is_idle() {
                    // The runtime started whatever prompt was accepted for this session.
                    self.accepted().remove(id);
                }
                s.busy_ever |= !status.is_idle();
                s.busy_since_ms = match status.is_idle() {
                    true => None,
                    false => s.busy_since_ms.or_else(|| Some(super::unix_ms())),
                };
            }
            if let Some(Part::Tool(tool)) = event.part() {
                if let Some(child) = tool.child_session_id() {
                    s.children.insert(child.to_owned());
                }
                self.background
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .learn_part(&tool);
                if let Some(launch) = tool.background_launch() {
                    s.children.insert(launch.child);
                }
            }
            let created_under = event.session_info().and_then(|i| i.parent_id);
            if let Some(parent) = &created_under {
                s.parent = Some(parent.clone());
            }
            if relevant {
                s.changed(seq);
            }
            let parent = s.parent.clone();
            if let Some(parent) = parent.clone() {
                let p = sessions.entry(parent).or_default();
                if created_under.is_some() {
                    p.children.insert(id.to_owned());
                }
                // A new or changed child changes its parent's tree too.
                if relevant {
                    p.changed(seq);
                }
            }
            if event.kind() == "session.deleted" {
                if let Some(gone) = sessions.remove(id) {
                    if let Some(p) = gone.parent.and_then(|p| sessions.get_mut(&p)) {
                        p.children.remove(id);
                    }
                }
            }
            if sessions.len() > MAX_SESSIONS {
                let forgotten = forget_oldest_half(&mut sessions);
                let mut until = self
                    .forgotten_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                *until = (*until).max(forgotten);
            }
            parent
        };
        if relevant {
            match &parent {
                Some(parent) => self.wake(&[id, parent]),
                None => self.wake(&[id]),
            }
        }
    }

    /// Takes in a status map read: every listed session is busy-ish now.
    pub fn record_statuses(&self, map: &StatusMap) {
        let mut sessions = self.sessions();
        for (id, status) in map {
            let s = sessions.entry(id.clone()).or_default();
            s.busy_ever |= !status.is_idle();
            if !status.is_idle() && s.busy_since_ms.is_none() {
                s.busy_since_ms = Some(super::unix_ms());
            }
        }
    }

    /// Sessions with children whose tree changed within `within`: a parent at rest with a
    /// launch not yet answered shows idle in the runtime's status map, and the status surface
    /// must ask about it even when nothing holds it. Older ones are past the liveness bound.
    pub fn recent_parents(&self, within: Duration) -> Vec<String> {
        self.sessions()
            .iter()
            .filter(|(_, s)| {
                !s.children.is_empty() && s.changed_at.is_some_and(|at| at.elapsed() <= within)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether `id` was ever seen busy.
    pub fn busy_ever(&self, id: &str) -> bool {
        self.sessions().get(id).is_some_and(|s| s.busy_ever)
    }
}

/// Keeps the half of `sessions` changed most recently.
/// Returns the latest change of the sessions it forgot.
fn forget_oldest_half(sessions: &mut HashMap<String, SessionState>) -> Option<Instant> {
    let mut seqs: Vec<u64> = sessions.values().map(|s| s.seq).collect();
    let middle = seqs.len() / 2;
    let (_, cut, _) = seqs.select_nth_unstable(middle);
    let cut = *cut;
    let mut latest = None;
    sessions.retain(|_, s| {
        let keep = s.seq > cut;
        if !keep {
            latest = latest.max(s.changed_at);
        }
        keep
    });
    latest
}

/// Holds the `/global/event` subscription until `shutdown`: reconnects with exponential
/// backoff, and after each (re)connect re-reads the status map and marks every cached read
/// stale, since events sent while disconnected are lost for good.
pub async fn run(
    client: RuntimeClient,
    state: std::sync::Arc<WatchState>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    // Refused credentials are a configuration error: said once, as an error, at start-up.
    let mut told_refused = false;
    loop {
        let connect = tokio::select! {
            r = client.global_events() => r,
            _ = shutdown.cancelled() => return,
        };
        match connect {
            Ok(response) => {
                backoff = BACKOFF_MIN;
                tracing::debug!(upstream = client.base(), "oracle: event stream open");
                match client.statuses(None).await {
                    Ok(map) => state.record_statuses(&map),
                    Err(e) => tracing::warn!("oracle: status re-read after connect failed: {e}"),
                }
                state.stream_opened();
                let mut body = response.into_body();
                let mut decoder = SseDecoder::new();
                loop {
                    let frame = tokio::select! {
                        f = body.frame() => f,
                        _ = shutdown.cancelled() => return,
                    };
                    match frame {
                        Some(Ok(frame)) => {
                            let Some(data) = frame.data_ref() else {
                                continue;
                            };
                            for sse in decoder.push(data) {
                                if let Some(event) = Event::parse(sse.data.as_bytes()) {
                                    state.record(&event);
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!("oracle: event stream broke: {e}");
                            break;
                        }
                        None => {
                            tracing::warn!("oracle: event stream ended");
                            break;
                        }
                    }
                }
                state.stream_closed();
            }
            Err(e @ super::client::ClientError::Unauthorized { .. }) => {
                if !std::mem::replace(&mut told_refused, true) {
                    tracing::error!("taskgate cannot read the runtime: {e}; until a client's accepted credentials are seen, held claims are answered with errors");
                }
            }
            Err(e) => tracing::warn!("oracle: cannot open the event stream: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "ses_df4c7ac0effeZp1S7fWTeAToXq";
    const CHILD: &str = "ses_df4c7ab9bffecks0CL3iL16K45";

    #[test]
    fn background_task_ids_are_linked_from_the_runtimes_launch_parts() {
        let state = WatchState::default();
        let output = format!(
            "Background task launched.\n\nBackground Task ID: bg_04817ab3\nStatus: pending\n\n<task_metadata>\nsession_id: {CHILD}\nbackground_task_id: bg_04817ab3\n</task_metadata>"
        );
        let event = serde_json::json!({"type": "message.part.updated", "properties": {
            "sessionID": PARENT,
            "part": {"id": "prt_1", "sessionID": PARENT, "messageID": "msg_1", "type": "tool",
                     "tool": "task", "callID": "c1",
                     "state": {"status": "completed", "input": {}, "output": output}}}});
        state.record(&Event::parse(event.to_string().as_bytes()).unwrap());
        assert_eq!(
            state.background_session("bg_04817ab3").as_deref(),
            Some(CHILD)
        );
        assert_eq!(state.background_session("bg_ffffffff"), None);
    }

    fn created(id: &str, parent: Option<&str>) -> Event {
        let info = serde_json::json!({"id": id, "parentID": parent});
        Event::parse(
            serde_json::json!({"type": "session.created", "properties": {"sessionID": id, "info": info}})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    }

    /// The bug this pins: the watcher's state only ever grew (about 4 MB per 1,000 sessions,
    /// `session.deleted` included), so a proxy left running for weeks grew without end.
    #[test]
    fn memory_does_not_grow_with_every_session_ever_seen() {
        let state = WatchState::default();
        state.record(&created(CHILD, Some(PARENT)));
        assert!(state.session(PARENT).unwrap().children.contains(CHILD));
        let deleted = Event::parse(
            serde_json::json!({"type": "session.deleted", "properties": {"sessionID": CHILD,
                "info": {"id": CHILD, "parentID": PARENT}}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        state.record(&deleted);
        assert!(
            state.session(CHILD).is_none(),
            "a deleted session is forgotten"
        );
        assert!(!state.session(PARENT).unwrap().children.contains(CHILD));
        for n in 0..3 * MAX_SESSIONS {
            state.record(&created(&format!("ses_{n:026}"), None));
        }
        assert!(state.sessions().len() <= MAX_SESSIONS);
        let newest = format!("ses_{:026}", 3 * MAX_SESSIONS - 1);
        assert!(state.session(&newest).is_some(), "the newest are kept");
    }

    #[test]
    fn the_recorded_run_leaves_the_expected_state() {
        let stream = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/opencode-1.18.33/background-subagent/global-event.sse"
        ));
        let state = WatchState::default();
        let mut decoder = SseDecoder::new();
        for frame in decoder.push(stream.as_bytes()) {
            if let Some(event) = Event::parse(frame.data.as_bytes()) {
                state.record(&event);
            }
        }
        let parent = state.session(PARENT).unwrap();
        let child = state.session(CHILD).unwrap();
        assert_eq!(child.parent.as_deref(), Some(PARENT));
        assert!(child.busy_ever && parent.busy_ever);
        assert!(parent.children.contains(CHILD));
        assert!(state.changed_since(&[CHILD.to_owned()], 0));
        assert!(!state.changed_since(&[CHILD.to_owned()], state.seq()));
    }
}
