//! The runtime connection a client connection forwards on.
//!
//! HTTP/1.1 carries one exchange at a time on a connection, and hyper serves a client
//! connection's requests one after the other, so a client connection never needs more than one
//! runtime connection at once. It keeps one ([`Pinned`]) and drives it in its own task, beside
//! the client side: no pool checkout and return per request, no hashed pool key, no second task
//! woken for every exchange. A client connection that ends leaves its runtime connection, idle,
//! to the next one ([`Spares`]), so short client connections still share runtime connections.
//!
//! What a pool did and this keeps:
//! - a connection the runtime closed while idle is not used: it shows as closed
//!   ([`SendRequest::ready`] fails), or hyper hands the request back unsent; either way the
//!   request goes out once more on a new connection, as hyper-util's pool retried it;
//! - a connection idle for longer than [`IDLE_TIMEOUT`] is closed rather than used;
//! - a request abandoned before its answer came (the client went away) leaves its connection
//!   unused: it is closed, never given to another request. It is closed when the client
//!   connection's task ends, which is what abandoning means here; [`UpstreamIo`](super::socket::UpstreamIo) resets it if a
//!   write to the runtime is stuck.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::error::ProxyError;
use super::socket::UpstreamConnector;

/// How long an idle runtime connection may be kept. Below common server keep-alive timeouts so
/// a connection the runtime is closing is not used (the "connection closed before message
/// completed" race, hyper#2136).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest read buffer of a runtime connection made for an event stream. hyper's adaptive
/// reads grow a connection's buffer up to about 400 KiB when a burst fills it, and the connection
/// keeps what it grew for as long as it lives: 50 event streams after one burst of releases held
/// 25 MB (docs/performance.md, "Holds: a small read buffer for event streams"). Events are small;
/// the rest of a burst waits in the kernel's socket buffer instead.
const STREAM_READ_BUFFER: usize = 64 * 1024;

/// Idle runtime connections kept for client connections to come. Each costs a descriptor; they
/// come out of the reserve `limits::connection_cap` keeps.
const MAX_SPARES: usize = 32;

/// hyper's connection future (with upgrades; its type cannot be named).
type Conn = dyn Future<Output = hyper::Result<()>> + Send;

/// An idle runtime connection: its sender and the connection itself, not driven by anybody
/// until a client connection takes it.
struct Idle {
    sender: SendRequest<Body>,
    conn: Pin<Box<Conn>>,
    since: Instant,
}

/// Runtime connections left idle by client connections that ended, newest last.
#[derive(Default)]
pub struct Spares(Mutex<Vec<Idle>>);

impl Spares {
    fn put(&self, idle: Idle) {
        let mut spares = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        spares.retain(|s| now.duration_since(s.since) < IDLE_TIMEOUT);
        if spares.len() >= MAX_SPARES {
            spares.remove(0);
        }
        spares.push(idle);
    }

    /// The newest spare still young enough (the one least likely to be closed by the runtime).
    fn take(&self) -> Option<Idle> {
        let mut spares = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while let Some(idle) = spares.pop() {
            if now.duration_since(idle.since) < IDLE_TIMEOUT && !idle.sender.is_closed() {
                return Some(idle);
            }
        }
        None
    }
}

/// How to reach the runtime: the connector and the URI it connects to. Cheap to clone.
#[derive(Clone)]
pub struct Connect {
    pub connector: UpstreamConnector,
    pub uri: http::Uri,
}

/// Why a request got no answer head from the runtime.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to the runtime: {0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    #[error("the runtime connection failed: {0}")]
    Http(#[from] hyper::Error),
}

impl SendError {
    /// What the client is told.
    pub fn to_proxy_error(&self) -> ProxyError {
        match self {
            SendError::Connect(e) => ProxyError::from_connect(e.as_ref()),
            SendError::Http(_) => ProxyError::Protocol,
        }
    }
}

/// The runtime connection of one client connection, shared by its requests (one at a time) and
/// its task, which drives it with [`Pinned::poll_drive`].
#[derive(Clone, Default)]
pub struct Pinned(Arc<Mutex<Slot>>);

#[derive(Default)]
struct Slot {
    /// The sender, between requests, with when its last answer head came. Out while a request
    /// uses it; a request abandoned before its answer drops it, and the connection is not used
    /// again.
    sender: Option<(SendRequest<Body>, Instant)>,
    /// The connection, driven by the client connection's task until it ends.
    conn: Option<Pin<Box<Conn>>>,
    /// The client connection's task, told when a connection is installed.
    waker: Option<Waker>,
    /// The runtime switched protocols: the connection hands its socket to a tunnel once it is
    /// driven to its end.
    upgrading: bool,
    /// The connection was made for an event stream, with a small read buffer: it is not left to
    /// [`Spares`], where a large download could get it.
    stream: bool,
}

impl Pinned {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drives the connection, if any. Never ready: a connection that ends (the runtime closed
    /// it, or it switched protocols) is dropped and the next request makes another.
    pub fn poll_drive(&self, cx: &mut Context<'_>) {
        let mut slot = self.lock();
        match slot.conn.as_mut() {
            Some(conn) => {
                if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "runtime connection ended with an error");
                    }
                    slot.conn = None;
                }
            }
            None => {
                if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    slot.waker = Some(cx.waker().clone());
                }
            }
        }
    }

    fn install(&self, conn: Pin<Box<Conn>>, stream: bool) {
        let mut slot = self.lock();
        slot.conn = Some(conn);
        slot.upgrading = false;
        slot.stream = stream;
        if let Some(waker) = &slot.waker {
            waker.wake_by_ref();
        }
    }

    /// A connection used before: this client connection's own between requests, or a spare.
    /// An event stream takes only a connection made for one (its read buffer is small).
    fn take_reused(&self, spares: &Spares, stream: bool) -> Option<SendRequest<Body>> {
        {
            let mut slot = self.lock();
            match slot.sender.take() {
                Some((sender, since))
                    if slot.conn.is_some()
                        && since.elapsed() < IDLE_TIMEOUT
                        && (slot.stream || !stream) =>
                {
                    return Some(sender);
                }
                // Closed by the runtime, idle too long, or not made for an event stream:
                // closed here too.
                Some(_) => slot.conn = None,
                None => {}
            }
        }
        if stream {
            return None;
        }
        let idle = spares.take()?;
        self.install(idle.conn, false);
        Some(idle.sender)
    }

    async fn connect(
        &self,
        connect: &Connect,
        stream: bool,
    ) -> Result<SendRequest<Body>, SendError> {
        let io = connect
            .connector
            .clone()
            .call(connect.uri.clone())
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        let mut builder = http1::Builder::new();
        // One buffer, one `write` per request, as on the client side (`serve_connection`).
        builder.writev(false);
        if stream {
            builder.max_buf_size(STREAM_READ_BUFFER);
        }
        let (sender, conn) = builder.handshake(io).await?;
        self.install(Box::pin(conn.with_upgrades()), stream);
        Ok(sender)
    }

    /// Sends `request` on this client connection's runtime connection (taking a spare or
    /// connecting when it has none). A connection used before that turns out closed before the
    /// request went out is replaced once, as a pool would. `stream`: the client asked for an
    /// event stream, which gets a connection of its own with a small read buffer.
    pub async fn send(
        &self,
        connect: &Connect,
        spares: &Spares,
        mut request: Request<Body>,
        stream: bool,
    ) -> Result<Response<Incoming>, SendError> {
        let mut reused = self.take_reused(spares, stream);
        loop {
            let (mut sender, was_reused) = match reused.take() {
                Some(sender) => (sender, true),
                None => (self.connect(connect, stream).await?, false),
            };
            if was_reused && sender.ready().await.is_err() {
                tracing::debug!("runtime connection closed while idle; connecting again");
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let mut slot = self.lock();
                    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        slot.upgrading = true;
                    } else {
                        slot.sender = Some((sender, Instant::now()));
                    }
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if was_reused => {
                        tracing::debug!(error = %e.error(), "request not sent on a reused runtime connection; sending it on a new one");
                        request = unsent;
                    }
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// At the end of the client connection (after its HTTP side is dropped, so no response
    /// body holds the runtime connection any more): a tunnel's connection is driven until it
    /// hands its socket over; an idle one is left to [`Spares`], unless it was made for an
    /// event stream; anything else is closed.
    pub async fn finish(self, spares: &Spares, shutdown: &CancellationToken) {
        let (sender, conn, upgrading, stream) = {
            let mut slot = self.lock();
            (
                slot.sender.take(),
                slot.conn.take(),
                slot.upgrading,
                slot.stream,
            )
        };
        let Some(mut conn) = conn else { return };
        if upgrading {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "runtime connection did not hand over its upgrade");
                    }
                }
                () = shutdown.cancelled() => {}
            }
            return;
        }
        let Some((mut sender, _)) = sender else {
            return;
        };
        if stream || shutdown.is_cancelled() {
            return;
        }
        // Until the connection is ready for another request, or closes (a response the client
        // left unfinished ends it).
        let ready = tokio::select! {
            ready = poll_fn(|cx| {
                if conn.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                sender.poll_ready(cx).map(|r| r.is_ok())
            }) => ready,
            () = shutdown.cancelled() => false,
        };
        if ready {
            spares.put(Idle {
                sender,
                conn,
                since: Instant::now(),
            });
        }
    }
}
