//! The transparent forwarder and the `/_taskgate/` admin endpoints (docs/proxy.md).
//!
//! One accept loop serves HTTP/1.1 (with upgrades) on every connection; each request is either
//! an admin request (`/_taskgate` and below, never forwarded, see [`admin`]) or forwarded to the
//! runtime by [`forward`]. The loop is hand-rolled rather than `axum::serve` because shutdown
//! must be *bounded* (`proxy.shutdown_grace`) and must also end upgraded tunnels, which
//! `axum::serve` 0.8 neither bounds nor tracks.
//!
//! Module map: [`headers`] (pure header policy), [`forward`] (the request path), [`body`]
//! (metered pass-through bodies), [`upgrade`] (WebSocket tunnels), [`admin`], [`error`],
//! [`limits`] (connection cap, idle connections, accept back-off), [`socket`] (noticing a
//! client or runtime that is gone while nobody reads), [`upstream`] (the runtime connection
//! each client connection forwards on).

pub mod admin;
pub mod body;
pub mod error;
pub mod forward;
pub mod headers;
pub mod limits;
mod repoll;
pub mod socket;
pub mod upgrade;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use axum::body::Body;
use http::uri::Authority;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::gate::Gate;
use crate::metrics::{Metrics, StatusClass};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

pub use error::ProxyError;

/// The path prefix taskgate keeps for itself; requests under it never reach the runtime.
pub const ADMIN_PREFIX: &str = "/_taskgate";

/// The pooled client of the health probe (forwarded requests use [`upstream::Pinned`]).
pub type UpstreamClient = Client<socket::UpstreamConnector, Body>;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("proxy.upstream: {0}")]
    Upstream(String),
}

/// Everything a request needs, built once per server. Cheap to clone.
#[derive(Clone)]
pub struct ProxyState {
    inner: Arc<StateInner>,
}

struct StateInner {
    config: Config,
    /// `host:port` of the runtime, parsed once from `proxy.upstream`.
    authority: Authority,
    client: UpstreamClient,
    /// How forwarded requests reach the runtime, and the runtime connections client
    /// connections left idle.
    connect: upstream::Connect,
    spares: upstream::Spares,
    /// `Host` for a request without one (an HTTP/1.0 client): the runtime's authority.
    host: http::HeaderValue,
    metrics: Metrics,
    /// The request counter of each status class, "1xx" … "5xx", looked up once: finding the
    /// label set in the family took a lock and a hash on every request.
    requests: [Counter; 5],
    /// `taskgate_request_duration_seconds{class}` of each class, looked up once for the same
    /// reason.
    durations: [Histogram; 5],
    /// `None` makes taskgate a plain transparent proxy (`gate.enabled = false`, and tests of the
    /// forwarder, which must not depend on a runtime behind the oracle).
    gate: Option<Gate>,
}

/// "1xx" … "5xx" as 0 … 4 (anything out of range counts with its nearest class).
fn class_index(status: StatusCode) -> usize {
    usize::from(status.as_u16() / 100).clamp(1, 5) - 1
}

impl ProxyState {
    /// Builds how the runtime is reached: runtime connections with TCP_NODELAY (so small SSE
    /// frames are not delayed by Nagle) and a connect timeout from `proxy.connect_timeout`; no
    /// response timeout, because `POST /session/:id/message` legitimately lasts hours.
    pub fn new(
        config: Config,
        metrics: Metrics,
        gate: Option<Gate>,
    ) -> Result<ProxyState, ServeError> {
        let authority = crate::config::upstream_authority(&config.proxy.upstream)
            .map_err(ServeError::Upstream)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.proxy.connect_timeout.0));
        let connector = socket::UpstreamConnector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(upstream::IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        let uri = http::Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| ServeError::Upstream(e.to_string()))?;
        // As hyper-util's client fills it: the port only when it is not the default one.
        let host = match authority.port_u16() {
            Some(80) | None => authority.host(),
            Some(_) => authority.as_str(),
        };
        let host =
            http::HeaderValue::from_str(host).map_err(|e| ServeError::Upstream(e.to_string()))?;
        let requests = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
            metrics
                .requests
                .get_or_create(&StatusClass { class })
                .clone()
        });
        let durations = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
            metrics
                .request_duration
                .get_or_create(&StatusClass { class })
                .clone()
        });
        Ok(ProxyState {
            inner: Arc::new(StateInner {
                config,
                authority,
                client,
                connect: upstream::Connect { connector, uri },
                spares: upstream::Spares::default(),
                host,
                metrics,
                requests,
                durations,
                gate,
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// `taskgate_requests_total{class}` for an answer with `status`.
    pub fn requests(&self, status: StatusCode) -> &Counter {
        &self.inner.requests[class_index(status)]
    }

    /// `taskgate_request_duration_seconds{class}` for an answer with `status`.
    pub fn durations(&self, status: StatusCode) -> &Histogram {
        &self.inner.durations[class_index(status)]
    }

    pub fn gate(&self) -> Option<&Gate> {
        self.inner.gate.as_ref()
    }

    pub fn client(&self) -> &UpstreamClient {
        &self.inner.client
    }

    pub fn authority(&self) -> &Authority {
        &self.inner.authority
    }

    pub fn connect(&self) -> &upstream::Connect {
        &self.inner.connect
    }

    pub fn spares(&self) -> &upstream::Spares {
        &self.inner.spares
    }

    /// `Host` for a forwarded request that has none.
    pub fn host(&self) -> &http::HeaderValue {
        &self.inner.host
    }
}

/// What every connection task shares: the state plus the server's lifetime.
struct Server {
    state: ProxyState,
    shutdown: CancellationToken,
    /// Upgraded tunnels outlive the HTTP exchange that created them, so hyper's graceful
    /// shutdown does not see them; they are tracked here and waited for at the end.
    tunnels: TaskTracker,
}

/// Serves the proxy on `listener` until `shutdown` is cancelled, then drains in-flight requests
/// for at most `proxy.shutdown_grace`. The gate is on when `gate.enabled` and an oracle is
/// given; the oracle and the hold registry (with its metrics) are the caller's (the
/// composition root, `src/cmd/stack.rs`, shares them with the model face).
pub async fn run_with_oracle(
    listener: TcpListener,
    config: Config,
    oracle: Option<crate::oracle::Oracle>,
    holds: crate::holds::Holds,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let metrics = holds.metrics().clone();
    let gate = oracle
        .filter(|_| config.gate.enabled)
        .map(|oracle| Gate::new(&config, oracle, holds, shutdown.clone()));
    let state = ProxyState::new(config, metrics, gate)?;
    serve(listener, state, shutdown).await
}

/// Serves `state` on `listener` until `shutdown` is cancelled.
///
/// At most `proxy.max_connections` client connections are served at once (lowered to what the
/// open-file limit allows, see [`limits::connection_cap`]); beyond it the loop stops accepting
/// and new connections wait in the kernel's listen backlog until one closes. The header-read
/// and idle timeouts make sure slots free up: a client that sends nothing useful cannot keep one.
///
/// Shutdown, in order: stop accepting; tell every connection to finish its current exchange and
/// close (idle keep-alive connections close at once); end event streams and upgrade tunnels,
/// which would never end by themselves; wait for the rest up to `proxy.shutdown_grace`; then
/// close whatever is still open and return.
pub async fn serve(
    listener: TcpListener,
    state: ProxyState,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let grace = state.config().proxy.shutdown_grace.0;
    let cap = limits::connection_cap(state.config().proxy.max_connections);
    let server = Arc::new(Server {
        state,
        shutdown: shutdown.clone(),
        tunnels: TaskTracker::new(),
    });
    let mut connections = limits::accept_loop(&listener, cap, &shutdown, |stream, peer, slot| {
        serve_connection(server.clone(), stream, peer, slot)
    })
    .await;
    drop(listener);
    tracing::info!(
        open = connections.len(),
        grace = ?grace,
        "shutting down: no longer accepting; finishing in-flight requests"
    );
    let deadline = Instant::now() + grace;
    let drained = tokio::time::timeout_at(deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            grace = ?grace,
            "shutdown grace period over; closing the connections still open"
        );
        connections.shutdown().await;
    }
    // Tunnels end on the cancelled token by themselves; this only waits for them to unwind.
    server.tunnels.close();
    server.tunnels.wait().await;
    tracing::info!("proxy stopped");
    Ok(())
}

/// Serves one client connection until it closes, is idle for `proxy.idle_timeout`, takes longer
/// than `proxy.header_read_timeout` to send a request head, is reset by the client, or until
/// shutdown lets its current exchange finish. `_slot` is its place under the connection cap.
async fn serve_connection(
    server: Arc<Server>,
    stream: TcpStream,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
) {
    let io = socket::ClientIo::new(stream);
    let shutdown = server.shutdown.clone();
    let proxy = &server.state.config().proxy;
    let (header_read_timeout, idle_timeout) = (proxy.header_read_timeout.0, proxy.idle_timeout.0);
    let activity = limits::Activity::default();
    let alarms = Arc::new(limits::Alarms::default());
    let _watchdog = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(limits::watchdog(
        alarms.clone(),
        server.shutdown.clone(),
        activity.clone(),
        (idle_timeout, header_read_timeout),
        io.watch(),
        peer,
    )));
    let forwarded_for = headers::forwarded_for(peer.ip());
    let pinned = upstream::Pinned::default();
    let service = {
        let (server, activity, pinned) = (server.clone(), activity.clone(), pinned.clone());
        service_fn(move |req: Request<Incoming>| {
            let (server, forwarded_for, pinned) =
                (server.clone(), forwarded_for.clone(), pinned.clone());
            let in_flight = activity.begin();
            async move {
                let response = handle(&server, peer, &forwarded_for, &pinned, req).await;
                // Tracked as it is, not boxed once more: hyper takes any body type.
                Ok::<_, Infallible>(response.map(|body| limits::Tracked::new(body, in_flight)))
            }
        })
    };
    let ended = {
        // The header read timeout is the watchdog's, not hyper's: hyper's armed and disarmed
        // a timer for every request.
        let conn = hyper::server::conn::http1::Builder::new()
            .header_read_timeout(None)
            // A head and a small body copied into one buffer and written with one `write`,
            // rather than gathered by `writev`: fewer instructions per small request
            // (docs/performance.md, "Forward path, fifth pass"), and large bodies no slower.
            .writev(false)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let repoll = Arc::new(repoll::Repoll::default());
        std::future::poll_fn(|cx| {
            repoll.poll(cx, |cx| {
                // The client side first, then the runtime connection (which the client side
                // may just have installed or sent on), then the watchdog's alarms.
                if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                    return Poll::Ready(Some(result));
                }
                pinned.poll_drive(cx);
                match alarms.poll_next(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(limits::Alarm::Close) => {
                        conn.as_mut().graceful_shutdown();
                        // Polled again at once: the shutdown may end the connection now.
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    Poll::Ready(limits::Alarm::HeadTimeout) => Poll::Ready(Some(Ok(()))),
                    // Dropping the connection drops its in-flight request, and returning
                    // drops the runtime connection it was sent on: the runtime sees the
                    // cancellation.
                    Poll::Ready(limits::Alarm::Gone) => Poll::Ready(None),
                }
            })
        })
        .await
    };
    let Some(result) = ended else { return };
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "client connection ended with an error");
    }
    // The client side is dropped now, with any response body still reading the runtime.
    pinned.finish(server.state.spares(), &shutdown).await;
}

async fn handle(
    server: &Server,
    peer: SocketAddr,
    forwarded_for: &http::HeaderValue,
    pinned: &upstream::Pinned,
    req: Request<Incoming>,
) -> Response<Body> {
    // RFC 9112 §3.2: a server MUST answer 400 to a request with more than one Host field line
    // (which name would the runtime use?).
    if req
        .headers()
        .get_all(http::header::HOST)
        .iter()
        .nth(1)
        .is_some()
    {
        return forward::client_error(
            &server.state,
            StatusCode::BAD_REQUEST,
            "duplicate_host",
            "the request has more than one Host header",
        );
    }
    let path = req.uri().path();
    if path == ADMIN_PREFIX || path.starts_with("/_taskgate/") {
        admin::handle(&server.state, &server.shutdown, peer, req).await
    } else {
        forward::forward(
            &server.state,
            &server.shutdown,
            &server.tunnels,
            forwarded_for,
            pinned,
            req,
        )
        .await
    }
}
