//! The request path: client request → runtime → (gate) → client, bodies streamed both ways.
//!
//! What is changed on the way, and nothing else:
//! - the request target is the client's path and query (origin form), their bytes never
//!   decoded or re-encoded; a `CONNECT` names the runtime's authority;
//! - hop-by-hop headers are dropped both ways ([`headers::strip_hop_by_hop`]), `X-Forwarded-*`
//!   added when `proxy.forwarded_headers` is on;
//! - `Host` stays as the client sent it; only a request without one gets the runtime's
//!   authority, so the runtime sees the name the client used (what it would have seen without
//!   taskgate; it only listens on loopback and does no virtual hosting);
//! - `Accept-Encoding` is removed when the gate wants to read the response, so it reads identity.
//!
//! Framing (`Content-Length` or chunked) is re-derived by hyper from each body's size hint, which
//! [`Relay`] passes through, so a sized body stays sized and a chunked one stays chunked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::Relay;
use super::error::ProxyError;
use super::upstream::Pinned;
use super::{headers, upgrade, ProxyState};
use crate::gate::Intercept;
use crate::metrics::KindLabel;

/// Forwards one request on the client connection's runtime connection (`pinned`) and returns
/// what the client gets. Dropping the future (the client went away) drops the upstream
/// request, and that runtime connection is closed: the runtime sees the cancellation.
pub async fn forward(
    state: &ProxyState,
    shutdown: &CancellationToken,
    tunnels: &TaskTracker,
    forwarded_for: &HeaderValue,
    pinned: &Pinned,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let metrics = state.metrics();
    let intercept = state
        .gate()
        .and_then(|g| g.intercept(req.method(), req.uri(), req.headers()));
    // An event stream gets a runtime connection of its own with a small read buffer
    // (`upstream::STREAM_READ_BUFFER`). Event streams are `GET`s (EventSource sends nothing else).
    let stream = req.method() == http::Method::GET
        && (intercept.as_ref().is_some_and(Intercept::is_event_stream)
            || headers::accepts_event_stream(req.headers()));
    let upgrade_to = headers::upgrade_request(req.headers());
    let client_upgrade = upgrade_to.as_ref().map(|_| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    // For the logs (only its path is logged: queries may carry `auth_token`). A clone shares
    // the parsed bytes, where copying the path out allocated on every request.
    let method = parts.method.clone();
    let client_uri = parts.uri.clone();
    let path = client_uri.path();
    upstream_target(&parts.method, &mut parts.uri, state.authority());
    if !parts.headers.contains_key(header::HOST) {
        parts.headers.insert(header::HOST, state.host().clone());
    }
    // HTTP/1.1 upstream whatever the client spoke, so an HTTP/1.0 client's request can still use
    // a kept-alive runtime connection; hyper answers the client in its own version.
    parts.version = http::Version::HTTP_11;
    let trailers = headers::accepts_trailers(&parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers);
    if trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(protocol) = &upgrade_to {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    if state.config().proxy.forwarded_headers {
        headers::add_forwarded(&mut parts.headers, forwarded_for);
    }
    if intercept.is_some() {
        parts.headers.remove(header::ACCEPT_ENCODING);
    }
    // A request without a body (most of them) has nothing to relay, count or fail: it goes
    // out as an empty body, framed the same (both say they are at their end, of size 0).
    let body_failed = (!body.is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
    let body = match &body_failed {
        Some(failed) => Body::new(
            Relay::new(body, metrics.bytes_to_upstream.clone()).flag_failure(failed.clone()),
        ),
        None => Body::empty(),
    };
    let upstream_req = Request::from_parts(parts, body);

    // A client that goes away drops this future and ends its connection's task, which drops
    // the runtime connection the request was sent on (`upstream`'s module doc).
    let result = pinned
        .send(state.connect(), state.spares(), upstream_req, stream)
        .await;
    let mut response = match result {
        Ok(response) => {
            metrics.upstream_up.set(1);
            response
        }
        // The client's body broke (it left mid-upload, or sent malformed chunked framing):
        // the exchange failed on the client's side, not the runtime's.
        Err(e) if body_failed.is_some_and(|failed| failed.load(Ordering::SeqCst)) => {
            tracing::info!(%method, %path, error = ?e, "client request body failed; request abandoned");
            return client_error(
                state,
                StatusCode::BAD_REQUEST,
                "client_body",
                "the request body ended early or was malformed",
            );
        }
        Err(e) => {
            let error = e.to_proxy_error();
            // A protocol error is an answer, however bad; the other two are no answer at all.
            if !matches!(error, ProxyError::Protocol) {
                metrics.upstream_up.set(0);
            }
            tracing::warn!(%method, %path, kind = error.kind(), error = ?e, "upstream request failed");
            return finish(state, error, &method, path, started);
        }
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            tracing::warn!(%method, %path, "runtime switched protocols without being asked");
            return finish(state, ProxyError::Protocol, &method, path, started);
        };
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        headers::strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = protocol {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
        }
        upgrade::spawn_tunnel(tunnels, shutdown.clone(), client_upgrade, upstream_upgrade);
        record(state, parts.status, &method, path, started);
        return Response::from_parts(parts, Body::empty());
    }

    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    // Not intercepted (almost every request): hyper's body is relayed as it is, one box.
    let (parts, body) = match (state.gate(), intercept) {
        (Some(gate), Some(intercept)) => {
            let response = Response::from_parts(parts, Body::new(body));
            // Boxed: the gate's future is most of the forward future's size, and every
            // forward (and every open event stream's connection task) would otherwise carry
            // it, where only intercepted requests run it.
            let (parts, body) = Box::pin(gate.filter(intercept, response))
                .await
                .into_parts();
            let body = relay(state, shutdown, &parts.headers, body);
            (parts, body)
        }
        _ => {
            let body = relay(state, shutdown, &parts.headers, body);
            (parts, body)
        }
    };
    record(state, parts.status, &method, path, started);
    Response::from_parts(parts, body)
}

/// Makes `uri` the request target sent to the runtime, as hyper-util's client made it from the
/// absolute URI this forwarder used to give it: origin form (path and query, `/` when empty),
/// the client's bytes; authority form naming the runtime for `CONNECT`.
fn upstream_target(method: &http::Method, uri: &mut Uri, runtime: &http::uri::Authority) {
    if method == http::Method::CONNECT {
        let mut target = http::uri::Parts::default();
        target.authority = Some(runtime.clone());
        *uri = Uri::from_parts(target).unwrap_or_default();
        return;
    }
    // Almost every request is in origin form already and stays as it is.
    if uri.scheme().is_none() && uri.authority().is_none() && uri.path_and_query().is_some() {
        return;
    }
    *uri = match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => {
            let mut target = http::uri::Parts::default();
            target.path_and_query = Some(path.clone());
            Uri::from_parts(target).unwrap_or_default()
        }
        _ => Uri::default(),
    };
}

/// The response body as the client gets it: counted, and for an event stream, ended at
/// shutdown and counted as open.
fn relay<B>(
    state: &ProxyState,
    shutdown: &CancellationToken,
    headers: &http::HeaderMap,
    body: B,
) -> Body
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let metrics = state.metrics();
    let mut relay = Relay::new(body, metrics.bytes_to_client.clone());
    if is_event_stream(headers) {
        relay = relay.stream(
            shutdown.clone().cancelled_owned(),
            metrics.sse_streams_open.clone(),
        );
    }
    Body::new(relay)
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
        })
}

/// Counts and answers a failed forward.
fn finish(
    state: &ProxyState,
    error: ProxyError,
    method: &http::Method,
    path: &str,
    started: Instant,
) -> Response<Body> {
    state
        .metrics()
        .upstream_errors
        .get_or_create(&KindLabel { kind: error.kind() })
        .inc();
    let response = error.into_response(&state.config().proxy.upstream);
    record(state, response.status(), method, path, started);
    response
}

/// Answers a request that failed by the client's fault with a JSON error, counted under
/// `taskgate_client_errors_total{kind}` (and the request counter's 4xx), never as an upstream
/// error.
pub fn client_error(
    state: &ProxyState,
    status: StatusCode,
    kind: &'static str,
    message: &str,
) -> Response<Body> {
    state
        .metrics()
        .client_errors
        .get_or_create(&KindLabel { kind })
        .inc();
    state.requests(status).inc();
    super::error::json_response(
        status,
        &serde_json::json!({"error": {"kind": kind, "message": message}}),
    )
}

fn record(
    state: &ProxyState,
    status: StatusCode,
    method: &http::Method,
    path: &str,
    started: Instant,
) {
    let elapsed = started.elapsed();
    state.requests(status).inc();
    state.durations(status).observe(elapsed.as_secs_f64());
    tracing::debug!(%method, %path, status = status.as_u16(), ?elapsed, "forwarded");
}
