//! The failures a client can be told about, and the one place they become JSON responses.
//!
//! The body names what happened in plain words and which upstream was tried; the underlying
//! error (addresses, OS error text, hyper internals) goes to the log, never to the client.

use std::error::Error as StdError;
use std::io;

use axum::body::Body;
use http::{header, HeaderValue, Response, StatusCode};

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No TCP connection to the runtime (refused, unreachable, DNS).
    #[error("the runtime could not be reached")]
    Unreachable,
    /// The TCP connect did not finish within `proxy.connect_timeout`.
    #[error("the runtime did not accept a connection in time")]
    ConnectTimeout,
    /// Connected, but the runtime closed or broke the exchange before answering.
    #[error("the runtime closed the connection without a valid response")]
    Protocol,
}

impl ProxyError {
    /// Classifies an error of the pooled client (the health probe's, the model face's).
    pub fn from_client(err: &hyper_util::client::legacy::Error) -> ProxyError {
        if !err.is_connect() {
            return ProxyError::Protocol;
        }
        ProxyError::from_connect(err)
    }

    /// Classifies a failed connect: a timeout somewhere in the source chain (hyper-util's
    /// connector reports one as an `io::ErrorKind::TimedOut` under its connect error), or no
    /// connection at all.
    pub fn from_connect(err: &(dyn StdError + 'static)) -> ProxyError {
        let mut source: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if io.kind() == io::ErrorKind::TimedOut {
                    return ProxyError::ConnectTimeout;
                }
            }
            source = e.source();
        }
        ProxyError::Unreachable
    }

    /// The `kind` field of the JSON body, also the metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Unreachable => "upstream_unreachable",
            ProxyError::ConnectTimeout => "upstream_timeout",
            ProxyError::Protocol => "upstream_protocol",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::ConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unreachable | ProxyError::Protocol => StatusCode::BAD_GATEWAY,
        }
    }

    /// `{"error":{"kind":…,"message":…,"upstream":…}}` with the matching status.
    pub fn into_response(self, upstream: &str) -> Response<Body> {
        let body = serde_json::json!({
            "error": {
                "kind": self.kind(),
                "message": self.to_string(),
                "upstream": upstream,
            }
        });
        json_response(self.status(), &body)
    }
}

/// A JSON response (admin endpoints and errors share it).
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
