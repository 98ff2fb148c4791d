//! `/_taskgate/…`: taskgate's own endpoints, answered by the proxy and never forwarded.
//!
//! - `GET /_taskgate/health`: the proxy is up; whether the runtime answers `GET /global/health`,
//!   and its version. 200 when it does, 503 when it does not. Under `taskgate wrap`,
//!   `upstream.log` is the private runtime's log file.
//! - `GET /_taskgate/metrics`: Prometheus text.
//! - `GET /_taskgate/config`: the effective configuration as TOML, secrets redacted (the text
//!   `taskgate config check` prints).
//! - `GET /_taskgate/holds`: what the gate holds now (`{"holds":[]}` with the gate off).
//! - `GET /_taskgate/view`: the live view's snapshot (trees, holds, recent releases) as JSON.
//! - `GET /_taskgate/events`: that snapshot again as a server-sent event on every change.
//! - `GET /_taskgate/` (with `live.js`, `live.css`): the page that draws it (docs/live-view.md).
//!
//! Anything else under the prefix is a 404 JSON error; another method on a known path, 405.
//!
//! Who may ask ([`access`]): without `proxy.admin_token`, loopback peers only (403 to others):
//! the configuration, the holds and the metrics describe the user's sessions, and taskgate may
//! listen on an address other hosts reach. With a token, any peer that sends
//! `Authorization: Bearer <token>` (RFC 6750 §2.1) and no other (401). The page's three static
//! files follow the loopback rule, but with a token they are served to anyone: they hold no data
//! (everything the page shows comes from `events`, under the token), and a browser cannot send
//! a bearer token when it opens a page, so the page asks for the token and sends it itself.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::Body;
use base64::Engine as _;
use futures_util::StreamExt as _;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use bytes::Bytes;

use super::error::json_response;
use super::ProxyState;
use crate::gate::view::Snapshot;
use crate::gate::Gate;

/// The most of the runtime's health answer that is read (it is a few dozen bytes).
const HEALTH_BODY_LIMIT: usize = 64 * 1024;

/// A comment line on a quiet event stream this often, so proxies and idle timeouts between the
/// page and taskgate do not close it.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The live page, served from the binary (no build step, nothing fetched from elsewhere).
const PAGE: &str = include_str!("live/index.html");
const SCRIPT: &str = include_str!("live/live.js");
const STYLE: &str = include_str!("live/live.css");

/// Whether a request may use the admin endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    /// No token is configured and the peer is not on loopback.
    Forbidden,
    /// A token is configured and the request does not bear it.
    Unauthorized,
}

/// Decides [`Access`] from the peer's address, the configured token and the request's
/// `Authorization` header. Pure, so every case is tested without another network namespace.
pub fn access(peer: IpAddr, token: Option<&str>, authorization: Option<&HeaderValue>) -> Access {
    match token {
        None if is_loopback(peer) => Access::Allowed,
        None => Access::Forbidden,
        Some(token) => {
            let offered = authorization
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.split_once(' '))
                // RFC 9110 §11.1: the scheme is case-insensitive.
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, credentials)| credentials.trim_start_matches(' '));
            match offered {
                Some(offered) if same_secret(offered.as_bytes(), token.as_bytes()) => {
                    Access::Allowed
                }
                _ => Access::Unauthorized,
            }
        }
    }
}

/// `127.0.0.0/8`, `::1`, and loopback reached over an IPv4-mapped IPv6 socket.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Compares in time independent of where the inputs differ, so response timing does not
/// reveal the token a byte at a time.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn handle(
    state: &ProxyState,
    shutdown: &CancellationToken,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let endpoint = req
        .uri()
        .path()
        .strip_prefix(super::ADMIN_PREFIX)
        .unwrap_or_default()
        .trim_start_matches('/');
    let token = state.config().proxy.admin_token.as_deref();
    let access = access(peer.ip(), token, req.headers().get(header::AUTHORIZATION));
    // The page lives at `/_taskgate/` exactly (its script and stylesheet beside it); the bare
    // prefix stays a 404, like any other unknown endpoint.
    let page = match req.uri().path() {
        "/_taskgate/" => Some(("text/html; charset=utf-8", PAGE)),
        "/_taskgate/live.js" => Some(("text/javascript; charset=utf-8", SCRIPT)),
        "/_taskgate/live.css" => Some(("text/css; charset=utf-8", STYLE)),
        _ => None,
    };
    // Served to whoever may read the data, and with a token configured to anyone: a browser
    // cannot send a bearer token when it opens a page, so the page asks for it.
    if let (Some((content_type, body)), Access::Allowed | Access::Unauthorized) = (page, access) {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return method_not_allowed();
        }
        return text(content_type, body.to_owned());
    }
    match access {
        Access::Allowed => {}
        Access::Forbidden => {
            return super::forward::client_error(
                state,
                StatusCode::FORBIDDEN,
                "admin_forbidden",
                "taskgate endpoints answer loopback clients only; set proxy.admin_token to allow others",
            );
        }
        Access::Unauthorized => {
            let mut response = super::forward::client_error(
                state,
                StatusCode::UNAUTHORIZED,
                "admin_unauthorized",
                "taskgate endpoints need Authorization: Bearer <proxy.admin_token>",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"taskgate\""),
            );
            return response;
        }
    }
    let known = matches!(
        endpoint,
        "health" | "metrics" | "config" | "holds" | "view" | "events"
    );
    if !known {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {
                "kind": "not_found",
                "message": "no such taskgate endpoint; try /_taskgate/ (the live page), /_taskgate/health, /_taskgate/metrics, /_taskgate/config, /_taskgate/holds, /_taskgate/view or /_taskgate/events",
            }}),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return method_not_allowed();
    }
    match endpoint {
        "health" => health(state).await,
        "metrics" => {
            // `taskgate_upstream_up` is the runtime's state at this scrape, as Prometheus' own
            // `up` is, not at the last forwarded request.
            let _ = probe_upstream(state).await;
            text(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics().render(),
            )
        }
        "config" => text(
            "text/plain; charset=utf-8",
            state.config().to_redacted_toml(),
        ),
        "view" => json_response(
            StatusCode::OK,
            &serde_json::to_value(state.gate().map_or_else(Snapshot::without_gate, Gate::view))
                .unwrap_or_default(),
        ),
        "events" => events(state, shutdown),
        _ => json_response(
            StatusCode::OK,
            &state
                .gate()
                .map_or_else(|| json!({"holds": []}), |gate| gate.holds()),
        ),
    }
}

/// `text/event-stream` of live-view snapshots (`event: snapshot`, the JSON of
/// `/_taskgate/view` as data): one at once, then one per change, a comment line when quiet.
/// Ends when taskgate shuts down, so it never holds up the drain.
fn events(state: &ProxyState, shutdown: &CancellationToken) -> Response<Body> {
    let snapshots = match state.gate() {
        Some(gate) => gate.views().boxed(),
        // Nothing ever changes without a gate: one snapshot, then only keep-alives.
        None => futures_util::stream::iter([Snapshot::without_gate()]).boxed(),
    };
    let frames = snapshots.map(|snapshot| {
        let data = serde_json::to_string(&snapshot).unwrap_or_else(|_| "{}".to_owned());
        Bytes::from(format!("event: snapshot\ndata: {data}\n\n"))
    });
    let keepalive = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(KEEPALIVE).await;
        Some((Bytes::from_static(b": keep-alive\n\n"), ()))
    });
    let body = futures_util::stream::select(frames, keepalive)
        .take_until(shutdown.clone().cancelled_owned())
        .map(Ok::<_, std::convert::Infallible>);
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn method_not_allowed() -> Response<Body> {
    let mut response = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"error": {"kind": "method_not_allowed", "message": "taskgate endpoints answer GET only"}}),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

fn text(content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Asks the runtime's own health route, with taskgate's upstream credentials (a runtime with a
/// password answers 401 to anybody else), bounded by `oracle.request_timeout`; sets
/// `taskgate_upstream_up` from the answer. `Ok`: the runtime's version, when it says.
async fn probe_upstream(state: &ProxyState) -> Result<Option<String>, String> {
    let config = state.config();
    let probe = async {
        let uri = format!("http://{}/global/health", state.authority());
        let mut request = Request::get(uri)
            .body(Body::empty())
            .map_err(|e| e.to_string())?;
        if let Some(password) = &config.upstream_auth.password {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{password}", config.upstream_auth.username));
            let value = HeaderValue::from_str(&format!("Basic {token}"))
                .map_err(|_| "the configured upstream credentials are not valid in a header")?;
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let response = state.client().request(request).await.map_err(|e| {
            tracing::debug!(error = ?e, "health probe failed");
            super::ProxyError::from_client(&e).to_string()
        })?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), HEALTH_BODY_LIMIT)
            .collect()
            .await
            .map_err(|_| "the runtime's health answer could not be read".to_owned())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "the runtime answered {} to GET /global/health",
                status.as_u16()
            ));
        }
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if parsed.get("healthy").and_then(|h| h.as_bool()) == Some(false) {
            return Err("the runtime reports itself unhealthy".to_owned());
        }
        Ok(parsed
            .get("version")
            .and_then(|v| v.as_str())
            .map(str::to_owned))
    };
    let outcome = match tokio::time::timeout(config.oracle.request_timeout.0, probe).await {
        Ok(outcome) => outcome,
        Err(_) => Err("the runtime did not answer GET /global/health in time".to_owned()),
    };
    state.metrics().upstream_up.set(i64::from(outcome.is_ok()));
    outcome
}

async fn health(state: &ProxyState) -> Response<Body> {
    let config = state.config();
    let upstream = config.proxy.upstream.as_str();
    let outcome = probe_upstream(state).await;
    let (status, mut body) = match outcome {
        Ok(version) => (
            StatusCode::OK,
            json!({"proxy": "up", "upstream": {"url": upstream, "reachable": true, "version": version}}),
        ),
        Err(message) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"proxy": "up", "upstream": {"url": upstream, "reachable": false, "error": message}}),
        ),
    };
    // The oracle's own reads: a runtime with a password refuses them without credentials.
    if let Some(gate) = state.gate() {
        if gate.reads_refused() {
            body["upstream"]["reads"] = json!("refused (401): taskgate has no credentials the runtime accepts; set OPENCODE_SERVER_PASSWORD or [upstream_auth] password");
            return json_response(StatusCode::SERVICE_UNAVAILABLE, &body);
        }
    }
    // Under `taskgate wrap` the runtime is private: its log is the only place its output goes.
    if let Some(log) = &config.proxy.runtime_log {
        body["upstream"]["log"] = json!(log.display().to_string());
    }
    json_response(status, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn bearer(text: &str) -> HeaderValue {
        HeaderValue::from_str(text).unwrap()
    }

    /// From another network namespace every admin endpoint answered 200.
    #[test]
    fn admin_endpoints_refuse_non_loopback_peers_without_a_token() {
        for peer in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(access(ip(peer), None, None), Access::Allowed, "{peer}");
        }
        for peer in [
            "10.0.0.2",
            "192.168.1.5",
            "::ffff:10.0.0.2",
            "fe80::1",
            "0.0.0.0",
            "::",
        ] {
            assert_eq!(access(ip(peer), None, None), Access::Forbidden, "{peer}");
            // A header alone opens nothing when no token is configured.
            let offered = bearer("Bearer anything");
            assert_eq!(access(ip(peer), None, Some(&offered)), Access::Forbidden);
        }
    }

    #[test]
    fn with_a_token_only_requests_bearing_it_are_allowed_from_any_peer() {
        let token = Some("s3cret-token");
        for peer in ["10.0.0.2", "127.0.0.1", "::1"] {
            let peer = ip(peer);
            for good in [
                "Bearer s3cret-token",
                "bearer s3cret-token",
                "BEARER  s3cret-token",
            ] {
                assert_eq!(
                    access(peer, token, Some(&bearer(good))),
                    Access::Allowed,
                    "{good}"
                );
            }
            for bad in [
                "Bearer s3cret-toke",
                "Bearer s3cret-token2",
                "Basic s3cret-token",
                "s3cret-token",
                "Bearer",
                "",
            ] {
                assert_eq!(
                    access(peer, token, Some(&bearer(bad))),
                    Access::Unauthorized,
                    "{bad}"
                );
            }
            assert_eq!(access(peer, token, None), Access::Unauthorized);
        }
    }
}
