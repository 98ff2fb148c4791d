//! Wire types of the OpenCode runtime (sessions, statuses, messages, parts, events in every
//! envelope era, the `/global/event` wrapper) and its text formats.
//!
//! The runtime changes its JSON from release to release, and taskgate sits in front of many
//! releases at once. So every type here is lenient: unknown fields are kept in `extra` (a proxy
//! that re-serializes a part must not lose what it did not understand), unknown part kinds and
//! event types are kept raw, and nothing the runtime adds is ever an error.
//!
//! - `session`: sessions, statuses, health.
//! - `message`: messages, parts, the tool state machine, background launches.
//! - `event`: events and their envelopes.
//! - `provider`: the resolved provider list (`GET /config/providers`), keys never kept.
//! - `text`: `<task …>` reports, `key: value` lines, oh-my-opencode launch texts.
//! - [`sse`]: the one SSE framer every stream reader uses.

mod event;
mod message;
mod provider;
mod session;
pub mod sse;
mod text;

use serde_json::{Map, Value};

pub use event::Event;
pub use message::{
    BackgroundLaunch, LaunchStyle, Message, MessageError, MessageInfo, MessageTime, Part, PartIds,
    Role, StepPart, TextPart, ToolPart, ToolState, ToolStatus, ToolTime,
};
pub use provider::{ModelApi, Provider, ProviderList, ProviderModel, ProviderOptions};
pub use session::{Health, Session, SessionStatus, SessionTime, StatusMap};
pub use text::{line_value, omo_launch, task_tags, OmoLaunch, TaskTag};

/// Fields a type does not name, kept so that re-serializing loses nothing.
pub type Extra = Map<String, Value>;
