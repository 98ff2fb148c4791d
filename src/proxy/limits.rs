//! What bounds the client side: how many connections are served at once, how long one may sit
//! idle, and how the accept loop behaves when the process runs out of descriptors.

use std::io;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Descriptors kept back from the connection cap for everything else: the listeners, the
/// oracle's connections, the runtime's log under `wrap`, the runtime's pool spares.
const RESERVED_DESCRIPTORS: u64 = 64;

/// The connection cap actually applied: `configured`, lowered to what the open-file limit
/// allows. Each served client connection costs two descriptors (the client's and one to the
/// runtime), so beyond `(limit - reserve) / 2` accepting would run out of descriptors and then
/// lock out everyone, `/_taskgate/health` included. The soft limit is first raised to the hard
/// one, as the Go runtime does, since the default soft limit (often 1024) is a relic.
pub fn connection_cap(configured: usize) -> usize {
    let limit = raise_open_file_limit();
    let Some(limit) = limit else {
        return configured;
    };
    let affordable = usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    if affordable < configured {
        tracing::warn!(
            max_connections = configured,
            open_file_limit = limit,
            applied = affordable,
            "proxy.max_connections lowered to what the open-file limit allows (raise ulimit -n)"
        );
    }
    configured.min(affordable)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit now in force
/// (`None` when unknown or unlimited).
#[cfg(unix)]
fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not on every unix.
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur as u64)
}

#[cfg(not(unix))]
fn raise_open_file_limit() -> Option<u64> {
    None
}

/// Backs off when `accept` fails. Out of descriptors (EMFILE/ENFILE) or buffers, the error
/// repeats at once for as long as the shortage lasts; retrying every 50 ms logged a warning
/// 20 times a second. The wait doubles from 10 ms to 1 s while failures go on, and one warning
/// is logged per 10 s with the count of failures since.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    delay: Option<Duration>,
    failures: u64,
    last_warned: Option<Instant>,
}

const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);
const WARN_EVERY: Duration = Duration::from_secs(10);

impl AcceptBackoff {
    /// An accept succeeded: the shortage is over.
    pub fn reset(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "accepting connections again");
        }
        *self = AcceptBackoff::default();
    }

    /// Records a failed accept and returns how long to wait before the next one. Errors that
    /// concern only the connection being accepted (it was reset in the queue) need no wait.
    pub fn failed(&mut self, error: &io::Error) -> Duration {
        if matches!(
            error.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
        ) {
            tracing::debug!(%error, "accept failed for one connection");
            return Duration::ZERO;
        }
        self.failures += 1;
        let now = Instant::now();
        if self
            .last_warned
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
        {
            tracing::warn!(%error, failures = self.failures, "accept failed; backing off");
            self.last_warned = Some(now);
        }
        let delay = self.delay.map_or(FIRST_DELAY, |d| (d * 2).min(MAX_DELAY));
        self.delay = Some(delay);
        delay
    }
}

/// The requests of one client connection still in flight (from the request head until the
/// response body is dropped), so that a connection can be closed after `proxy.idle_timeout`
/// with nothing in flight.
///
/// Two atomics, no notification: a request costs two counter updates and a clock read. The
/// idle wait re-checks at the deadline instead of being told of every change (a `watch` here
/// woke the connection task twice per request and re-armed a timer each time, which showed in
/// the forward path's profile, docs/performance.md).
#[derive(Clone)]
pub struct Activity(Arc<ActivityState>);

struct ActivityState {
    /// Requests begun and not yet ended.
    in_flight: AtomicUsize,
    /// When a request last began or ended, in nanoseconds since `since`.
    last: AtomicU64,
    since: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Activity(Arc::new(ActivityState {
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            since: Instant::now(),
        }))
    }
}

impl ActivityState {
    fn touch(&self) {
        let nanos = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }
}

impl Activity {
    /// Marks a request in flight until the returned guard is dropped.
    pub fn begin(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        self.0.touch();
        InFlight(self.0.clone())
    }

    /// Resolves once nothing has been in flight for `idle`. Cancel safe.
    ///
    /// A request that begins just as this resolves is not cut off: the caller closes
    /// gracefully, which lets the exchange under way finish.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let now = Instant::now();
            // Busy: look again one whole period later (a request still in flight then keeps
            // the connection for another period; one that ended meanwhile moves the deadline).
            let deadline = if self.0.in_flight.load(Ordering::Acquire) > 0 {
                now + idle
            } else {
                self.0.since + Duration::from_nanos(self.0.last.load(Ordering::Relaxed)) + idle
            };
            if deadline <= now {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// What a client connection's watchdog tells its task ([`watchdog`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Alarm {
    /// Shutdown, or idle for `proxy.idle_timeout`: finish the exchange under way and close.
    Close,
    /// No request head within `proxy.header_read_timeout` of the connection being ready for
    /// one: close now.
    HeadTimeout,
    /// The client's socket is in error (reset, or dead by keepalive): drop everything now.
    Gone,
}

/// The flags a watchdog raises for its connection's task.
#[derive(Default)]
pub struct Alarms {
    raised: AtomicU8,
    waker: AtomicWaker,
}

const CLOSE: u8 = 1;
const HEAD_TIMEOUT: u8 = 2;
const GONE: u8 = 4;

impl Alarms {
    fn raise(&self, flag: u8) {
        self.raised.fetch_or(flag, Ordering::AcqRel);
        self.waker.wake();
    }

    /// The next alarm raised (the most drastic first when several are).
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Alarm> {
        self.waker.register(cx.waker());
        match self.raised.swap(0, Ordering::AcqRel) {
            0 => Poll::Pending,
            raised if raised & GONE != 0 => Poll::Ready(Alarm::Gone),
            raised if raised & HEAD_TIMEOUT != 0 => Poll::Ready(Alarm::HeadTimeout),
            _ => Poll::Ready(Alarm::Close),
        }
    }
}

/// Watches one client connection for what ends it from outside: shutdown, `idle` with nothing
/// in flight, no request head within `head` (the same wait: a connection with nothing in flight
/// is waiting for a request head, from the first byte or none), the client's socket in error.
/// A task of its own, so that the connection's task, woken several times per request, polls one
/// flag instead of a cancellation token, timers and the socket's error state each time, and no
/// header timer is armed and disarmed per request (docs/performance.md). Runs until aborted.
pub async fn watchdog(
    alarms: Arc<Alarms>,
    shutdown: CancellationToken,
    activity: Activity,
    (idle, head): (Duration, Duration),
    client: Arc<TcpStream>,
    peer: std::net::SocketAddr,
) {
    let mut closing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled(), if !closing => {
                alarms.raise(CLOSE);
                closing = true;
            }
            () = activity.idle_for(idle), if !closing => {
                tracing::debug!(%peer, "closing an idle client connection");
                alarms.raise(CLOSE);
                closing = true;
            }
            () = activity.idle_for(head) => {
                tracing::debug!(%peer, "no request head in time; closing the client connection");
                alarms.raise(HEAD_TIMEOUT);
                return;
            }
            () = super::socket::client_gone(&client) => {
                tracing::debug!(%peer, "client connection reset; cancelling its exchange");
                alarms.raise(GONE);
                return;
            }
        }
    }
}

/// One request in flight; see [`Activity`].
pub struct InFlight(Arc<ActivityState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The end is stamped before the count drops, so a wait that sees nothing in flight
        // also sees when the last request ended.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted in flight until hyper has written it all
/// (or dropped it). Frames, size hint and end of stream are the inner body's own.
pub struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl Tracked {
    pub fn new(inner: Body, in_flight: InFlight) -> Tracked {
        Tracked {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The accept loop both faces run: at most `cap` connections at once (a slot is taken before
/// `accept`, so beyond the cap new connections wait in the kernel's backlog), failing accepts
/// backed off ([`AcceptBackoff`]), finished connection tasks reaped as it goes. Each accepted
/// connection runs as `serve(stream, peer, slot)`, holding its slot until it ends. Returns at
/// `shutdown` with the connections still running, for the caller to drain.
pub async fn accept_loop<F, Fut>(
    listener: &TcpListener,
    cap: usize,
    shutdown: &CancellationToken,
    mut serve: F,
) -> JoinSet<()>
where
    F: FnMut(TcpStream, std::net::SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(cap));
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    'serving: loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break 'serving,
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break 'serving, // never closed
            },
        };
        let accepted = loop {
            tokio::select! {
                () = shutdown.cancelled() => break 'serving,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => break accepted,
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                connections.spawn(serve(stream, peer, slot));
            }
            Err(e) => {
                let delay = backoff.failed(&e);
                drop(slot);
                tokio::select! {
                    () = shutdown.cancelled() => break 'serving,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    connections
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure storm: one warning, then a wait that grows to a second instead of a spin.
    #[test]
    fn accept_failures_back_off_up_to_a_second() {
        let mut backoff = AcceptBackoff::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let delays: Vec<Duration> = (0..10).map(|_| backoff.failed(&emfile)).collect();
        assert_eq!(delays[0], FIRST_DELAY);
        assert!(delays.windows(2).all(|w| w[1] >= w[0]), "{delays:?}");
        assert_eq!(*delays.last().unwrap(), MAX_DELAY);
        backoff.reset();
        assert_eq!(backoff.failed(&emfile), FIRST_DELAY);
        let reset = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(backoff.failed(&reset), Duration::ZERO);
    }

    /// The idle period runs from the end of the last request, not from when the wait began
    /// (the wait is no longer told of each request; it reads when the last one ended).
    #[tokio::test(start_paused = true)]
    async fn idle_is_counted_from_the_end_of_the_last_request() {
        let activity = Activity::default();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(15)).await;
        drop(activity.begin());
        activity.idle_for(Duration::from_millis(20)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(35));
    }

    #[tokio::test]
    async fn idle_for_waits_while_a_request_is_in_flight() {
        let activity = Activity::default();
        let guard = activity.begin();
        let idle = activity.idle_for(Duration::from_millis(20));
        tokio::pin!(idle);
        // Busy: not idle, many idle periods later.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), idle.as_mut())
                .await
                .is_err()
        );
        drop(guard);
        tokio::time::timeout(Duration::from_secs(10), idle)
            .await
            .expect("idle once the request ended");
    }
}
