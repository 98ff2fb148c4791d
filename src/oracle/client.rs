//! The oracle's own reads of the runtime: statuses, sessions, children, histories, health, and
//! the `/global/event` subscription the watcher holds.
//!
//! Every read has a deadline (`oracle.request_timeout`): a runtime that accepts a connection
//! and then never answers (observed on fresh starts) must not stall every waiter behind it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use base64::Engine;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::opencode::{Health, Message, ProviderList, Session, StatusMap};

use super::SessionRef;

/// Histories are read newest page first, this many messages a page.
const PAGE: usize = 200;
/// A history longer than this many pages is cut (oldest dropped): the rule looks at the tail
/// and the launches in it; a runtime that ignores `before` would otherwise loop forever.
const MAX_PAGES: usize = 100;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("the runtime at {url} cannot be reached: {message}")]
    Unreachable { url: String, message: String },
    #[error("the runtime did not answer {url} within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("the runtime refused taskgate's credentials (401) on {url}; set upstream_auth.password or OPENCODE_SERVER_PASSWORD")]
    Unauthorized { url: String },
    #[error("{url}: not found (404)")]
    NotFound { url: String },
    #[error("{url}: bad reply: {what}")]
    BadReply { url: String, what: String },
}

/// A cheap-to-clone client for the runtime named in `proxy.upstream`.
#[derive(Clone)]
pub struct RuntimeClient {
    client: Client<HttpConnector, Body>,
    base: String,
    /// From `[upstream_auth]` or `OPENCODE_SERVER_PASSWORD`.
    authorization: Option<HeaderValue>,
    /// Without credentials of its own, taskgate reads with an `Authorization` a client sent
    /// and the runtime accepted: the runtime has one password, and a client that reaches it
    /// through taskgate already holds it.
    learned: Arc<Mutex<Option<HeaderValue>>>,
    /// The runtime answered the last read 401 (shown by `/_taskgate/health`).
    refused: Arc<AtomicBool>,
    timeout: Duration,
    /// Kept to build a pool of connections for the watcher ([`RuntimeClient::with_own_connections`]).
    connect_timeout: Duration,
}

/// A pool of connections to the runtime.
fn pool(connect_timeout: Duration) -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    // Held waiters can make hundreds of reads at once; afterwards their connections must
    // not all stay open for good. Keep a few idle ones for the next round of reads, close
    // the rest when they come back, and close any idle for 30 s (below common keep-alive
    // limits, so the pool never hands out one the runtime is closing, hyper#2136).
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(16)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector)
}

impl RuntimeClient {
    pub fn new(config: &Config) -> RuntimeClient {
        let connect_timeout = config.proxy.connect_timeout.0;
        let client = pool(connect_timeout);
        let authorization = config.upstream_auth.password.as_ref().and_then(|password| {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{password}", config.upstream_auth.username));
            HeaderValue::from_str(&format!("Basic {token}")).ok()
        });
        RuntimeClient {
            client,
            base: config.proxy.upstream.trim_end_matches('/').to_owned(),
            authorization,
            learned: Arc::default(),
            refused: Arc::default(),
            timeout: config.oracle.request_timeout.0,
            connect_timeout,
        }
    }

    /// The same runtime and credentials (learned ones included) on a pool of its own. The
    /// watcher runs on a thread of its own, whose runtime drives its connections; sharing the
    /// readers' pool would hand readers connections driven there, or the watcher theirs.
    pub fn with_own_connections(&self) -> RuntimeClient {
        RuntimeClient {
            client: pool(self.connect_timeout),
            ..self.clone()
        }
    }

    /// Offers credentials a client sent on a request the runtime accepted (2xx). Used only
    /// when taskgate has none configured; never logged.
    pub fn learn_authorization(&self, value: &HeaderValue) {
        if self.authorization.is_some() {
            return;
        }
        let mut value = value.clone();
        value.set_sensitive(true);
        *self.learned.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
    }

    /// Whether the runtime refused (401) taskgate's last read.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    fn credentials(&self) -> Option<HeaderValue> {
        self.authorization.clone().or_else(|| {
            self.learned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    /// The deadline of each read (`oracle.request_timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The runtime's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /global/health`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get_json("/global/health", &[]).await
    }

    /// `GET /config/providers`: the providers the runtime resolved for `directory`. Read by
    /// `taskgate wrap` to route each one through the model face; never by the oracle itself.
    pub async fn providers(&self, directory: Option<&str>) -> Result<ProviderList, ClientError> {
        self.get_json("/config/providers", &dir_query(directory))
            .await
    }

    /// `GET /session/status`: only non-idle sessions are listed.
    pub async fn statuses(&self, directory: Option<&str>) -> Result<StatusMap, ClientError> {
        self.get_json("/session/status", &dir_query(directory))
            .await
    }

    /// `GET /session`: the sessions of `directory` (the runtime's own directory when `None`).
    pub async fn sessions(&self, directory: Option<&str>) -> Result<Vec<Session>, ClientError> {
        self.get_json("/session", &dir_query(directory)).await
    }

    /// `GET /session/:id`.
    pub async fn session(&self, session: &SessionRef) -> Result<Session, ClientError> {
        let path = format!("/session/{}", session.id);
        self.get_json(&path, &dir_query(session.directory.as_deref()))
            .await
    }

    /// `GET /session/:id/children` (direct children only).
    pub async fn children(&self, session: &SessionRef) -> Result<Vec<Session>, ClientError> {
        let path = format!("/session/{}/children", session.id);
        self.get_json(&path, &dir_query(session.directory.as_deref()))
            .await
    }

    /// `GET /session/:id/message`, every page, oldest first.
    pub async fn messages(&self, session: &SessionRef) -> Result<Vec<Message>, ClientError> {
        let path = format!("/session/{}/message", session.id);
        let mut all: Vec<Message> = Vec::new();
        let mut before: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut query = dir_query(session.directory.as_deref());
            query.push(("limit", PAGE.to_string()));
            if let Some(b) = &before {
                query.push(("before", b.clone()));
            }
            let page: Vec<Message> = self.get_json(&path, &query).await?;
            let full = page.len() >= PAGE;
            let oldest = page.first().map(|m| m.info.id.clone());
            // A runtime that ignores `before` sends the same page again: stop, do not repeat.
            let repeated = oldest.is_some() && oldest == all.first().map(|m| m.info.id.clone());
            if repeated {
                break;
            }
            let mut page = page;
            page.append(&mut all);
            all = page;
            if !full || oldest.is_none() {
                break;
            }
            before = oldest;
        }
        Ok(all)
    }

    /// The newest `limit` messages of a session as the runtime wrote them (raw JSON, so a
    /// message relayed to a client keeps every field), oldest first.
    pub async fn recent_messages(
        &self,
        session: &SessionRef,
        limit: usize,
    ) -> Result<Vec<serde_json::Value>, ClientError> {
        let path = format!("/session/{}/message", session.id);
        let mut query = dir_query(session.directory.as_deref());
        query.push(("limit", limit.to_string()));
        self.get_json(&path, &query).await
    }

    /// `GET /global/event`: the response, once its headers arrived (the body streams forever).
    pub async fn global_events(
        &self,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let url = format!("{}/global/event", self.base);
        let response = self.send(&url, "text/event-stream").await?;
        check_status(&url, response.status())?;
        Ok(response)
    }

    async fn send(
        &self,
        url: &str,
        accept: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let mut request = Request::get(url)
            .header(header::ACCEPT, accept)
            // The oracle parses bodies; ask for them unencoded.
            .header(header::ACCEPT_ENCODING, "identity");
        if let Some(auth) = self.credentials() {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let request = request
            .body(Body::empty())
            .map_err(|e| ClientError::Unreachable {
                url: url.to_owned(),
                message: format!("invalid request: {e}"),
            })?;
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => Err(ClientError::Timeout {
                url: url.to_owned(),
                timeout: self.timeout,
            }),
            Ok(Err(e)) => Err(ClientError::Unreachable {
                url: url.to_owned(),
                message: error_chain(&e),
            }),
            Ok(Ok(response)) => {
                self.refused.store(
                    response.status() == StatusCode::UNAUTHORIZED,
                    Ordering::Relaxed,
                );
                Ok(response)
            }
        }
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        let mut url = format!("{}{path}", self.base);
        for (i, (k, v)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(k);
            url.push('=');
            url.push_str(&encode(v));
        }
        let read = async {
            let response = self.send(&url, "application/json").await?;
            check_status(&url, response.status())?;
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Unreachable {
                    url: url.clone(),
                    message: format!("body cut: {}", error_chain(&e)),
                })?
                .to_bytes();
            serde_json::from_slice(&body).map_err(|e| ClientError::BadReply {
                url: url.clone(),
                what: format!("not the expected JSON ({e})"),
            })
        };
        // Timed per request: a tree read is as slow as its slowest request, and which one that
        // is says where the runtime spends the time (docs/performance.md, release lag).
        let began = tokio::time::Instant::now();
        let result = tokio::time::timeout(self.timeout, read).await;
        tracing::trace!(%url, elapsed_ms = began.elapsed().as_millis() as u64, "oracle: read");
        match result {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

fn check_status(url: &str, status: StatusCode) -> Result<(), ClientError> {
    match status {
        s if s.is_success() => Ok(()),
        StatusCode::UNAUTHORIZED => Err(ClientError::Unauthorized {
            url: url.to_owned(),
        }),
        StatusCode::NOT_FOUND => Err(ClientError::NotFound {
            url: url.to_owned(),
        }),
        s => Err(ClientError::BadReply {
            url: url.to_owned(),
            what: format!("status {s}"),
        }),
    }
}

fn dir_query(directory: Option<&str>) -> Vec<(&'static str, String)> {
    directory
        .map(|d| vec![("directory", d.to_owned())])
        .unwrap_or_default()
}

/// Percent-encodes a query value (directories hold `/`, spaces, non-ASCII).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An error with its causes, which hyper keeps in `source()` ("connection refused" is there).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
