//! The simulated runtime's in-memory world: sessions, messages, parts, statuses, and the event
//! bus. Every change goes through one method here that mutates the state *and* emits the event
//! under the same lock, so a client reading the routes never sees a state that disagrees with the
//! event stream it has already been sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::run::{Script, Trigger};
use super::SimOptions;

/// The version the sim claims to be: the one the recorded fixtures come from.
pub const VERSION: &str = "1.18.33";
/// The project id every session belongs to (the runtime's value for a directory without git).
pub const PROJECT_ID: &str = "global";
/// A fixed snapshot hash, like the runtime's for an unchanged work tree.
pub const SNAPSHOT: &str = "1524924c749dfdee15567c40614d0c12d003824e";
/// Model coordinates reported on sessions and messages.
pub const PROVIDER_ID: &str = "sim";
pub const MODEL_ID: &str = "scripted";

/// Milliseconds since the epoch, the unit of every `time` field of the runtime.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One event as emitted, shared by every subscriber; formatted per route (`/event` bare,
/// `/global/event` wrapped).
#[derive(Debug)]
pub struct Emitted {
    pub id: String,
    pub kind: String,
    pub properties: Value,
    /// `(type.1, seq, aggregateID)` for the events the runtime also mirrors as `sync` payloads
    /// on `/global/event`.
    pub sync: Option<(String, u64, String)>,
}

impl Emitted {
    /// The era-C envelope `/event` sends.
    pub fn envelope(&self) -> Value {
        json!({"id": self.id, "type": self.kind, "properties": self.properties})
    }
}

/// Generates the runtime's identifiers: prefix, 12 hex digits of `(ms * 4096 + counter)` mod
/// 2^48 (bit-inverted for sessions, so newer sessions sort first), then 14 random base62
/// characters. Monotonic within the process, like the runtime's.
pub struct IdGen {
    last_ms: u64,
    counter: u64,
    rng: u64,
}

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const MASK48: u64 = (1 << 48) - 1;

impl IdGen {
    pub fn new() -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        IdGen {
            last_ms: 0,
            counter: 0,
            rng: seed | 1,
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: ids only need to look random and not collide within a run.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn stamp(&mut self) -> u64 {
        let ms = now_ms().max(self.last_ms);
        if ms == self.last_ms {
            self.counter += 1;
            if self.counter >= 4096 {
                // More than 4096 ids in one millisecond: borrow the next millisecond.
                self.last_ms += 1;
                self.counter = 0;
            }
        } else {
            self.last_ms = ms;
            self.counter = 0;
        }
        (self.last_ms.wrapping_mul(4096) + self.counter) & MASK48
    }

    fn suffix(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| BASE62[(self.next_random() % 62) as usize] as char)
            .collect()
    }

    /// An ascending id (`msg_`, `prt_`, `evt_`).
    pub fn ascending(&mut self, prefix: &str) -> String {
        let stamp = self.stamp();
        format!("{prefix}_{stamp:012x}{}", self.suffix(14))
    }

    /// A descending id (`ses_`): newer sorts first.
    pub fn descending(&mut self, prefix: &str) -> String {
        let stamp = !self.stamp() & MASK48;
        format!("{prefix}_{stamp:012x}{}", self.suffix(14))
    }

    /// An oh-my-opencode background task id: `bg_` + 8 hex.
    pub fn background_task(&mut self) -> String {
        format!("bg_{:08x}", self.next_random() as u32)
    }

    /// A pick from a word list, for slugs.
    pub fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[(self.next_random() % words.len() as u64) as usize]
    }
}

/// A message with its parts, as `GET /session/:id/message` returns it.
#[derive(Debug, Clone)]
pub struct MessageRec {
    pub info: Value,
    pub parts: Vec<Value>,
}

impl MessageRec {
    pub fn to_json(&self) -> Value {
        json!({"info": self.info, "parts": self.parts})
    }
}

/// One session and what drives it.
pub struct SessionRec {
    pub info: Value,
    pub messages: Vec<MessageRec>,
    /// The session's agent loop (see `engine::session_actor`) reads its turns from here.
    pub inbox: mpsc::UnboundedSender<Trigger>,
    /// Cancelled by `POST /session/:id/abort`; present while a loop runs.
    pub loop_token: Option<CancellationToken>,
    /// The scenario agent answering this session's turns, if a scenario picked one.
    pub script: Option<Script>,
    /// Stops the session's actor when the session is deleted.
    pub alive: CancellationToken,
    /// The assistant message being written, which an abort marks `MessageAbortedError`.
    pub open: Option<String>,
    /// Agent loops finished so far (plugins wait on it).
    pub loops_done: u64,
}

/// Everything the routes read.
pub struct State {
    pub ids: IdGen,
    pub sessions: BTreeMap<String, SessionRec>,
    /// Only non-idle sessions, like the runtime's `GET /session/status`.
    pub statuses: BTreeMap<String, Value>,
    sync_seq: HashMap<String, u64>,
}

/// The shared world of one sim server.
pub struct Sim {
    state: Mutex<State>,
    events: broadcast::Sender<Arc<Emitted>>,
    changed: watch::Sender<u64>,
    pub options: SimOptions,
    pub shutdown: CancellationToken,
    pub directory: String,
}

impl Sim {
    pub fn new(options: SimOptions, shutdown: CancellationToken) -> Arc<Sim> {
        let (events, _) = broadcast::channel(4096);
        let (changed, _) = watch::channel(0);
        let directory = std::env::current_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "/".to_owned());
        Arc::new(Sim {
            state: Mutex::new(State {
                ids: IdGen::new(),
                sessions: BTreeMap::new(),
                statuses: BTreeMap::new(),
                sync_seq: HashMap::new(),
            }),
            events,
            changed,
            options,
            shutdown,
            directory,
        })
    }

    /// Locks the state. A panic while holding it (a bug) must not take every route down with
    /// it, so a poisoned lock is entered anyway: the data is plain JSON, always consistent
    /// between two method calls.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Emitted>> {
        self.events.subscribe()
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A fresh event id for events that only one subscriber sees (`server.connected`,
    /// `server.heartbeat`).
    pub fn event_id(&self) -> String {
        self.lock().ids.ascending("evt")
    }

    /// Emits an event while the caller holds the lock on the state it just changed.
    pub fn emit(&self, st: &mut State, kind: &str, properties: Value) {
        let id = st.ids.ascending("evt");
        let sync = match kind {
            "session.created"
            | "session.updated"
            | "session.deleted"
            | "message.updated"
            | "message.part.updated" => {
                let aggregate = properties["sessionID"].as_str().unwrap_or("").to_owned();
                let seq = st.sync_seq.entry(aggregate.clone()).or_insert(0);
                let this = *seq;
                *seq += 1;
                Some((format!("{kind}.1"), this, aggregate))
            }
            _ => None,
        };
        let event = Arc::new(Emitted {
            id,
            kind: kind.to_owned(),
            properties,
            sync,
        });
        // No subscriber is fine: the state is the truth, events are its news.
        let _ = self.events.send(event);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Waits until `pred` holds on the state, or the sim shuts down (returns false then).
    pub async fn wait_until(&self, pred: impl Fn(&State) -> bool) -> bool {
        let mut rx = self.watch();
        loop {
            if pred(&self.lock()) {
                return true;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return false },
                _ = self.shutdown.cancelled() => return false,
            }
        }
    }
}

impl State {
    pub fn session(&self, id: &str) -> Option<&SessionRec> {
        self.sessions.get(id)
    }

    pub fn session_mut(&mut self, id: &str) -> Option<&mut SessionRec> {
        self.sessions.get_mut(id)
    }

    /// The message `mid` of session `sid`.
    pub fn message_mut(&mut self, sid: &str, mid: &str) -> Option<&mut MessageRec> {
        self.sessions
            .get_mut(sid)?
            .messages
            .iter_mut()
            .find(|m| m.info["id"] == mid)
    }

    /// Direct children of `sid`, newest first (the order of descending ids).
    pub fn children(&self, sid: &str) -> Vec<Value> {
        self.sessions
            .values()
            .filter(|s| s.info["parentID"] == sid)
            .map(|s| s.info.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::IdGen;

    #[test]
    fn ids_look_like_the_runtimes_and_sort_by_creation() {
        let mut ids = IdGen::new();
        let msgs: Vec<String> = (0..5000).map(|_| ids.ascending("msg")).collect();
        let sessions: Vec<String> = (0..50).map(|_| ids.descending("ses")).collect();
        for id in msgs.iter().chain(&sessions) {
            assert_eq!(id.len(), 30, "{id}");
            assert!(id[4..].chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
        }
        assert!(
            msgs.windows(2).all(|w| w[0] < w[1]),
            "ascending ids increase"
        );
        assert!(
            sessions.windows(2).all(|w| w[0] > w[1]),
            "session ids decrease: newest first"
        );
        let bg = ids.background_task();
        assert!(bg.starts_with("bg_") && bg.len() == 11, "{bg}");
    }
}
