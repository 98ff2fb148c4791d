//! Prometheus metrics, one typed registry shared by the proxy and the gate
//! (served as text at `/_taskgate/metrics`). Labels are bounded: status *class*, hold *kind*,
//! verdict name; never a raw path or session id.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusClass {
    /// "1xx" … "5xx".
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    pub verdict: &'static str,
}

/// Every metric taskgate exports. Cloning is cheap (the metrics are shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Forwarded requests by the status class of the answer the client got.
    pub requests: Family<StatusClass, Counter>,
    /// Upstream failures by kind (unreachable, timeout, protocol).
    pub upstream_errors: Family<KindLabel, Counter>,
    /// Requests refused or cut short by the client's fault, by kind (a malformed or aborted
    /// body, duplicate `Host`, an admin request refused): never counted as upstream errors.
    pub client_errors: Family<KindLabel, Counter>,
    /// Event streams open right now.
    pub sse_streams_open: Gauge,
    /// Body bytes relayed upstream → client.
    pub bytes_to_client: Counter,
    /// Body bytes relayed client → upstream.
    pub bytes_to_upstream: Counter,
    /// Claims held right now.
    pub holds_open: Gauge,
    /// Holds started, by kind (prompt, idle, part, status, history).
    pub holds: Family<KindLabel, Counter>,
    /// Holds released, by verdict.
    pub releases: Family<VerdictLabel, Counter>,
    /// How long claims were held, seconds.
    pub hold_seconds: Histogram,
    /// Claims whose verdict contradicted them (claimed completed; child aborted or failed).
    pub contradictions: Counter,
    /// Bodies or events that could not be inspected and passed through unchanged.
    pub passthrough_uninspected: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("taskgate");
        let requests = Family::<StatusClass, Counter>::default();
        registry.register(
            "requests",
            "Forwarded requests by status class",
            requests.clone(),
        );
        let upstream_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by kind",
            upstream_errors.clone(),
        );
        let client_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "client_errors",
            "Requests failed by the client, by kind",
            client_errors.clone(),
        );
        let sse_streams_open = Gauge::default();
        registry.register(
            "sse_streams_open",
            "Event streams open now",
            sse_streams_open.clone(),
        );
        let bytes_to_client = Counter::default();
        registry.register(
            "bytes_to_client",
            "Body bytes relayed to clients",
            bytes_to_client.clone(),
        );
        let bytes_to_upstream = Counter::default();
        registry.register(
            "bytes_to_upstream",
            "Body bytes relayed to the runtime",
            bytes_to_upstream.clone(),
        );
        let holds_open = Gauge::default();
        registry.register(
            "holds_open",
            "Completion claims held now",
            holds_open.clone(),
        );
        let holds = Family::<KindLabel, Counter>::default();
        registry.register("holds", "Completion claims held, by kind", holds.clone());
        let releases = Family::<VerdictLabel, Counter>::default();
        registry.register(
            "releases",
            "Held claims released, by verdict",
            releases.clone(),
        );
        let hold_seconds = Histogram::new(exponential_buckets(0.01, 4.0, 10));
        registry.register(
            "hold_seconds",
            "How long claims were held",
            hold_seconds.clone(),
        );
        let contradictions = Counter::default();
        registry.register(
            "contradictions",
            "Claims the runtime contradicted",
            contradictions.clone(),
        );
        let passthrough_uninspected = Family::<KindLabel, Counter>::default();
        registry.register(
            "passthrough_uninspected",
            "Bodies or events passed through without inspection, by reason",
            passthrough_uninspected.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            requests,
            upstream_errors,
            client_errors,
            sse_streams_open,
            bytes_to_client,
            bytes_to_upstream,
            holds_open,
            holds,
            releases,
            hold_seconds,
            contradictions,
            passthrough_uninspected,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out = format!("# cannot encode metrics: {e}\n");
        }
        out
    }
}
