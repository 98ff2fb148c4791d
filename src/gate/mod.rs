//! The gate: finds completion claims in responses and event streams, holds them until the
//! oracle says the child's tree is terminal, releases them with the truth. (Issue 5.)

use axum::body::Body;
use http::{HeaderMap, Method, Response, Uri};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::oracle::Oracle;
use tokio_util::sync::CancellationToken;

/// A response the gate wants to see, decided from the request alone (before it is forwarded,
/// so the proxy can ask the runtime for an identity-encoded body).
#[derive(Debug, Clone)]
pub struct Intercept {}

#[derive(Clone)]
pub struct Gate {}

impl Gate {
    pub fn new(
        _config: &Config,
        _oracle: Oracle,
        _metrics: Metrics,
        _shutdown: CancellationToken,
    ) -> Gate {
        Gate {}
    }

    /// Whether the response to this request may carry claims the gate must inspect.
    pub fn intercept(
        &self,
        _method: &Method,
        _uri: &Uri,
        _headers: &HeaderMap,
    ) -> Option<Intercept> {
        None
    }

    /// Inspects (and possibly holds or rewrites) the runtime's response to an intercepted request.
    /// Cancel-safe: dropping the future (client gone) drops the hold.
    pub async fn filter(&self, _intercept: Intercept, response: Response<Body>) -> Response<Body> {
        response
    }

    /// What is held now, for `GET /_taskgate/holds`.
    pub fn holds(&self) -> serde_json::Value {
        serde_json::json!({"holds": []})
    }
}

pub mod claims;
pub mod sse;
