//! Prometheus metrics, one typed registry shared by the proxy, the gate and the model face
//! (served as text at `/_taskgate/metrics`). Labels are bounded: status *class*, *face*
//! (client or model), hold *kind*, verdict name; never a raw path or session id. Names follow
//! Prometheus conventions: counters end in `_total`, units are spelled out (`_bytes_total`,
//! `_seconds`). docs/proxy.md lists them.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusClass {
    /// "1xx" … "5xx".
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Which face holds: "client" (the gate) or "model".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaceLabel {
    pub face: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaceKindLabel {
    pub face: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaceVerdictLabel {
    pub face: &'static str,
    pub verdict: &'static str,
}

/// A histogram family's constructor: every label set gets the same buckets.
type Buckets = fn() -> Histogram;

/// Seconds from 1 ms to about 4.4 min: a forwarded request takes milliseconds, a held one as
/// long as the child's tree works.
fn request_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

/// Seconds from 10 ms to about 2.9 h (a hold lasts as long as a child's tree works).
fn hold_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 10))
}

/// Every metric taskgate exports. Cloning is cheap (the metrics are shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Forwarded requests by the status class of the answer the client got.
    pub requests: Family<StatusClass, Counter>,
    /// Seconds from a forwarded request's arrival to its response head (holds included; a
    /// streamed body's length is not), by status class.
    pub request_duration: Family<StatusClass, Histogram, Buckets>,
    /// 1 when the runtime answered taskgate's latest contact (a forwarded request or a health
    /// probe), 0 when it could not be reached.
    pub upstream_up: Gauge,
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
    /// Claims held right now, by face.
    pub holds_open: Family<FaceLabel, Gauge>,
    /// Holds started, by face and kind (client: prompt, idle, part; model: request).
    pub holds: Family<FaceKindLabel, Counter>,
    /// Holds released, by face and verdict.
    pub releases: Family<FaceVerdictLabel, Counter>,
    /// How long claims were held, seconds, by face.
    pub hold_seconds: Family<FaceLabel, Histogram, Buckets>,
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
        registry.register(
            "build",
            "taskgate's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let requests = Family::<StatusClass, Counter>::default();
        registry.register(
            "requests",
            "Forwarded requests by status class",
            requests.clone(),
        );
        let request_duration = Family::<StatusClass, Histogram, Buckets>::new_with_constructor(
            request_buckets as Buckets,
        );
        registry.register_with_unit(
            "request_duration",
            "Seconds from a forwarded request to its response head, by status class",
            Unit::Seconds,
            request_duration.clone(),
        );
        let upstream_up = Gauge::default();
        registry.register(
            "upstream_up",
            "Whether the runtime answered taskgate's latest contact",
            upstream_up.clone(),
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
        registry.register_with_unit(
            "response_body",
            "Body bytes relayed from the runtime to clients",
            Unit::Bytes,
            bytes_to_client.clone(),
        );
        let bytes_to_upstream = Counter::default();
        registry.register_with_unit(
            "request_body",
            "Body bytes relayed from clients to the runtime",
            Unit::Bytes,
            bytes_to_upstream.clone(),
        );
        let holds_open = Family::<FaceLabel, Gauge>::default();
        registry.register(
            "holds_open",
            "Completion claims held now, by face",
            holds_open.clone(),
        );
        let holds = Family::<FaceKindLabel, Counter>::default();
        registry.register(
            "holds",
            "Completion claims held, by face and kind",
            holds.clone(),
        );
        let releases = Family::<FaceVerdictLabel, Counter>::default();
        registry.register(
            "releases",
            "Held claims released, by face and verdict",
            releases.clone(),
        );
        let hold_seconds =
            Family::<FaceLabel, Histogram, Buckets>::new_with_constructor(hold_buckets as Buckets);
        registry.register_with_unit(
            "hold",
            "How long claims were held, by face",
            Unit::Seconds,
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
            request_duration,
            upstream_up,
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
