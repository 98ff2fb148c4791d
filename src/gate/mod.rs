//! The gate: finds completion claims in responses and event streams, holds them until the
//! oracle says the child's tree is terminal, and releases them with the truth.
//!
//! The proxy asks [`Gate::intercept`] with the request alone (before forwarding, so it can ask
//! the runtime for an identity-encoded body), then hands the runtime's response to
//! [`Gate::filter`]. Everything the gate cannot inspect passes through unchanged. The gate never
//! decides what is terminal: it asks the [`Oracle`].
//!
//! Surfaces (each switchable in `[gate]`):
//! - `GET /event`, `GET /global/event`: [`events`] holds root idles and claim parts.
//! - `POST /session/:id/message`: [`json::prompt`] holds the reply until the tree is terminal.
//! - `GET /session/status`: [`json::status`] lists not-yet-terminal trees as busy.
//! - `GET /session/:id/message[/:mid]`: [`json::history`] relabels premature claim parts.

mod events;
pub(crate) mod json;
pub mod view;

use std::sync::Arc;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use http::{HeaderMap, HeaderValue, Method, Response, Uri};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, GateConfig};
use crate::metrics::{KindLabel, Metrics};
use crate::oracle::{Oracle, SessionRef};

use crate::claims::{Claim, ClaimTools, Links};
use crate::holds::Holds;

/// A response the gate wants to see, decided from the request alone.
#[derive(Debug, Clone)]
pub struct Intercept {
    surface: Surface,
    /// When taskgate received the request: a held prompt commits to its status line
    /// `gate.prompt_commit_after` after it, whatever part of that the runtime took.
    received: Instant,
    /// The same moment as Unix milliseconds, to compare with the runtime's message times.
    received_ms: i64,
    /// The client's credentials: when the runtime accepts them, taskgate may read with them
    /// (see [`crate::oracle::client::RuntimeClient::learn_authorization`]).
    authorization: Option<HeaderValue>,
}

#[derive(Debug, Clone)]
enum Surface {
    /// `/event` (one directory) or `/global/event` (all, wrapped).
    Events {
        directory: Option<String>,
        global: bool,
    },
    /// A synchronous prompt.
    Prompt(SessionRef),
    /// `prompt_async`: the runtime accepts the prompt and starts it later.
    Accept(SessionRef),
    /// The status map of one directory.
    Status { directory: Option<String> },
    /// A session's messages, or one message.
    History { single: bool },
}

impl Intercept {
    /// The response is one of the runtime's event streams, open for as long as the client
    /// listens.
    pub fn is_event_stream(&self) -> bool {
        matches!(self.surface, Surface::Events { .. })
    }
}

/// The gate's handle; cheap to clone.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    config: GateConfig,
    tools: ClaimTools,
    oracle: Oracle,
    metrics: Metrics,
    holds: Holds,
    shutdown: CancellationToken,
    /// Largest body read for inspection (`proxy.inspect_limit_bytes`).
    inspect_limit: usize,
    /// Turns to read and parse a large body (`proxy.inspect_concurrency`): what bounds the
    /// gate's memory when many large histories arrive at once.
    inspections: Arc<tokio::sync::Semaphore>,
    inspect_concurrency: usize,
}

impl Gate {
    /// The gate asking `oracle`, listing its holds in `holds` (and counting in its metrics).
    pub fn new(config: &Config, oracle: Oracle, holds: Holds, shutdown: CancellationToken) -> Gate {
        Gate {
            inner: Arc::new(Inner {
                config: config.gate.clone(),
                tools: ClaimTools::new(&config.gate.claim_tools),
                oracle,
                metrics: holds.metrics().clone(),
                holds,
                shutdown,
                inspect_limit: config.proxy.inspect_limit_bytes,
                inspections: Arc::new(tokio::sync::Semaphore::new(
                    config.proxy.inspect_concurrency,
                )),
                inspect_concurrency: config.proxy.inspect_concurrency,
            }),
        }
    }

    /// Whether the response to this request may carry claims the gate must inspect.
    pub fn intercept(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Intercept> {
        let config = &self.inner.config;
        if !config.enabled {
            return None;
        }
        // The routes have at most four segments; the path is split without allocating and the
        // directory read only for a route that needs it, since this runs on every request.
        let mut segments = [""; 4];
        let mut count = 0;
        for segment in uri.path().trim_matches('/').split('/') {
            let slot = segments.get_mut(count)?;
            *slot = segment;
            count += 1;
        }
        let directory = || directory(uri, headers);
        let surface = match (method, &segments[..count]) {
            (&Method::GET, ["event"]) if config.events => Surface::Events {
                directory: directory(),
                global: false,
            },
            (&Method::GET, ["global", "event"]) if config.events => Surface::Events {
                directory: None,
                global: true,
            },
            (&Method::GET, ["session", "status"]) if config.status => Surface::Status {
                directory: directory(),
            },
            (&Method::POST, ["session", id, "message"]) if config.prompt => {
                Surface::Prompt(SessionRef {
                    id: decode(id),
                    directory: directory(),
                })
            }
            (&Method::POST, ["session", id, "prompt_async"]) => Surface::Accept(SessionRef {
                id: decode(id),
                directory: directory(),
            }),
            (&Method::GET, ["session", _, "message"]) if config.history => {
                Surface::History { single: false }
            }
            (&Method::GET, ["session", _, "message", _]) if config.history => {
                Surface::History { single: true }
            }
            _ => return None,
        };
        Some(Intercept {
            surface,
            received: Instant::now(),
            received_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            authorization: headers.get(http::header::AUTHORIZATION).cloned(),
        })
    }

    /// Inspects (and possibly holds or rewrites) the runtime's response to an intercepted
    /// request. Cancel-safe: dropping the future (the client went away) drops the hold.
    pub async fn filter(&self, intercept: Intercept, response: Response<Body>) -> Response<Body> {
        if !response.status().is_success() {
            return response;
        }
        if let Some(authorization) = &intercept.authorization {
            self.inner
                .oracle
                .client()
                .learn_authorization(authorization);
        }
        if let Surface::Accept(session) = &intercept.surface {
            self.inner
                .oracle
                .prompt_accepted(session, intercept.received_ms);
            return response;
        }
        if let Some(encoding) = response.headers().get(http::header::CONTENT_ENCODING) {
            // The proxy asked for identity; a runtime that compresses anyway is passed through
            // unread rather than broken. A prompt reply is still held: its hold needs only the
            // runtime's word that the tree ended, not the body.
            let held = matches!(intercept.surface, Surface::Prompt(_));
            if encoding.as_bytes() != b"identity" && !held {
                self.count_uninspected("encoded");
                return response;
            }
        }
        match intercept.surface {
            Surface::Events { directory, global } => {
                events::gate_stream(self.clone(), response, directory, global)
            }
            Surface::Prompt(session) => {
                json::prompt(self, session, intercept.received, response).await
            }
            Surface::Accept(_) => response,
            Surface::Status { directory } => json::status(self, directory, response).await,
            Surface::History { single } => json::history(self, single, response).await,
        }
    }

    /// Whether the runtime refused the oracle's last read (401), for `/_taskgate/health`.
    pub fn reads_refused(&self) -> bool {
        self.inner.oracle.client().refused()
    }

    /// What is held now, for `GET /_taskgate/holds`.
    pub fn holds(&self) -> serde_json::Value {
        serde_json::json!({ "holds": self.inner.holds.snapshot() })
    }

    /// Session ids of a claim's children: `bg_…` ids through the launches seen with the claim
    /// (same stream or same history), else through every launch the oracle's watcher saw.
    fn children_of(&self, claim: &Claim, links: &Links) -> Vec<String> {
        let watched = self.inner.oracle.watch_state();
        links.resolve(&claim.children, |bg| watched.background_session(bg))
    }

    fn count_uninspected(&self, kind: &'static str) {
        self.inner
            .metrics
            .passthrough_uninspected
            .get_or_create(&KindLabel { kind })
            .inc();
    }
}

/// The directory a request is scoped to: `?directory=` first, then the `x-opencode-directory`
/// header (URI-encoded), as the runtime itself resolves it.
fn directory(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let from_query = uri.query().and_then(|q| {
        q.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == "directory").then(|| decode(&v.replace('+', " ")))
        })
    });
    from_query.or_else(|| {
        headers
            .get("x-opencode-directory")
            .and_then(|v| v.to_str().ok())
            .map(decode)
    })
}

fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_comes_from_the_query_then_the_header() {
        let uri: Uri = "/event?directory=%2Fhome%2Fdev%2Fmy%20project"
            .parse()
            .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-opencode-directory", "%2Fother".parse().unwrap());
        assert_eq!(
            directory(&uri, &headers).as_deref(),
            Some("/home/dev/my project")
        );
        let bare: Uri = "/event".parse().unwrap();
        assert_eq!(directory(&bare, &headers).as_deref(), Some("/other"));
        assert_eq!(directory(&bare, &HeaderMap::new()), None);
    }
}
