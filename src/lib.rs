//! # taskgate
//!
//! A reverse proxy in front of the OpenCode runtime (`opencode serve`) that passes everything
//! through untouched except *completion claims*: events and responses that tell a client "the
//! child session is done". Those are held until the runtime itself shows the child's whole
//! session tree is terminal, then released with a truthful verdict.
//!
//! # Layout
//!
//! - [`config`]: `proxy.toml`, its defaults, environment and flag overrides, validation.
//! - [`opencode`]: the runtime's wire types (sessions, messages, parts, events in every era).
//! - [`proxy`]: the transparent forwarder and the `/_taskgate/` admin endpoints.
//! - [`oracle`]: the truth about sessions: a runtime client, an event watcher, coalesced reads and
//!   the terminal rule (one pure function).
//! - [`gate`]: finds completion claims in responses and event streams, holds and releases them.
//! - [`holds`]: what both faces hold now and released lately (hold rows, the live view).
//! - [`sim`]: a scripted OpenCode-compatible runtime that shows the bug.
//! - [`model`]: the model face, between the runtime and its model provider (docs/model-side.md).
//! - [`demo`]: the side-by-side demo built on the simulated runtime.
//! - [`wrap`]: `taskgate wrap -- opencode …`: a private runtime, the proxy and the client in one.
//! - [`cli`]: the subcommands; `main.rs` only parses and calls them.
//!
//! Data flows one way: client → proxy → upstream, and back through the gate, which asks the
//! oracle. The oracle knows nothing of HTTP clients; the proxy never decides what is terminal.

pub mod claims;
pub mod cmd;
pub mod config;
pub mod gate;
pub mod holds;
pub mod metrics;
pub mod model;
pub mod opencode;
pub mod oracle;
pub mod proxy;
pub mod sim;
pub mod wrap;
