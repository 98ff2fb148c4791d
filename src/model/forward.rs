//! The HTTP path of the model face: route by prefix, read (bounded) only the requests that can
//! carry claims, forward, relay the provider's answer untouched.
//!
//! What is changed on the way, and nothing else:
//! - the target becomes the provider URL's scheme, host and path prefix, followed by the rest of
//!   the client's path and its query, as bytes (never decoded);
//! - hop-by-hop headers are dropped both ways ([`headers::strip_hop_by_hop`]), and `Host` is
//!   dropped so the client fills in the provider's (a public API behind TLS routes on it);
//! - a request whose claims the runtime does not confirm gets those tool results replaced, and
//!   its `Content-Length` re-derived.
//!
//! Headers are never logged: provider credentials (`Authorization`, `x-api-key`) pass through
//! as they came.

use axum::body::Body;
use axum::extract::{Request, State};
use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode, Uri};

use super::format::Format;
use super::{check, ModelFace, Route};
use crate::proxy::body::read_limited;
use crate::proxy::error::{json_response, ProxyError};
use crate::proxy::headers;

/// Forwards one request to its provider and returns the provider's answer as it streams.
pub(super) async fn handle(State(face): State<ModelFace>, req: Request) -> Response<Body> {
    let inner = &face.inner;
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let Some(route) = inner.routes.iter().find(|r| under(&path, &r.prefix)) else {
        return no_route(&path, &inner.routes);
    };
    let rest = &path[route.prefix.len()..];
    let format = (parts.method == Method::POST && inspectable(&parts.headers))
        .then(|| Format::of_path(rest))
        .flatten();
    parts.uri = match target(route, rest, parts.uri.query()) {
        Some(uri) => uri,
        None => return no_route(&path, &inner.routes),
    };
    parts.version = http::Version::HTTP_11;
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    let body = match format {
        None => body,
        Some(format) => match read_limited(body, inner.inspect_limit).await {
            Err(passthrough) => {
                tracing::warn!(
                    prefix = %route.prefix,
                    limit = inner.inspect_limit,
                    "model request too large to inspect; forwarded unread"
                );
                passthrough
            }
            Ok(bytes) => {
                let corrected = check::correct(
                    inner.truth.as_ref(),
                    &inner.tools,
                    format,
                    &bytes,
                    inner.max_hold,
                )
                .await;
                match corrected {
                    Some(new) => {
                        parts.headers.remove(header::CONTENT_LENGTH);
                        Body::from(new)
                    }
                    None => Body::from(bytes),
                }
            }
        },
    };
    let response = match inner.client.request(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(e) => {
            let error = ProxyError::from_client(&e);
            tracing::warn!(prefix = %route.prefix, kind = error.kind(), error = ?e, "model provider request failed");
            return provider_error(&error, route);
        }
    };
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::new(body))
}

/// `path` is `prefix` or below it (`/anthropic/messages`, not `/anthropicx`).
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// JSON in identity encoding: the only request bodies the face can read.
fn inspectable(headers: &HeaderMap) -> bool {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    let identity = headers
        .get(header::CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    json && identity
}

/// The provider URL for `rest` (the path after the prefix) and `query`.
fn target(route: &Route, rest: &str, query: Option<&str>) -> Option<Uri> {
    let mut path = format!("{}{rest}", route.base_path);
    if path.is_empty() {
        path.push('/');
    }
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    Uri::builder()
        .scheme(route.scheme.clone())
        .authority(route.authority.clone())
        .path_and_query(path)
        .build()
        .ok()
}

fn no_route(path: &str, routes: &[Route]) -> Response<Body> {
    tracing::debug!(%path, "model face: no provider prefix");
    let prefixes: Vec<&str> = routes.iter().map(|r| r.prefix.as_str()).collect();
    json_response(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"error": {
            "kind": "no_provider_route",
            "message": format!(
                "taskgate's model face forwards only under {}; point the provider's baseURL at one of them",
                prefixes.join(", ")
            ),
        }}),
    )
}

/// The proxy's error body, worded for a provider instead of the runtime.
fn provider_error(error: &ProxyError, route: &Route) -> Response<Body> {
    let message = match error {
        ProxyError::Unreachable => "the model provider could not be reached",
        ProxyError::ConnectTimeout => "the model provider did not accept a connection in time",
        ProxyError::Protocol => "the model provider closed the connection without a valid response",
    };
    json_response(
        error.status(),
        &serde_json::json!({"error": {
            "kind": error.kind(),
            "message": message,
            "upstream": route.url,
        }}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(url: &str) -> Route {
        Route::new("/openai-chat".to_owned(), "test", url).unwrap()
    }

    #[test]
    fn targets_keep_the_provider_prefix_and_the_client_bytes() {
        let r = route("https://api.openai.com/v1");
        assert_eq!(
            target(&r, "/chat/completions", Some("a=%2F")).unwrap(),
            "https://api.openai.com/v1/chat/completions?a=%2F"
        );
        let bare = route("http://127.0.0.1:9/");
        assert_eq!(target(&bare, "", None).unwrap(), "http://127.0.0.1:9/");
        assert!(under("/openai-chat/models", "/openai-chat"));
        assert!(!under("/openai-chatty", "/openai-chat"));
        assert!(under("/p/mock/chat/completions", "/p/mock"));
        assert!(!under("/p/mockery/chat/completions", "/p/mock"));
    }
}
