//! The two TCP sockets of a forwarded exchange, and how each notices the other side is gone.
//!
//! A client that leaves mid-upload while the runtime has stopped reading is the hard case: hyper
//! reads a request body only when it is asked for the next chunk, and nobody asks while the
//! runtime reads nothing, so the client's reset is never read and the exchange, with its
//! upstream request, would stay open for good. [`ClientIo`] shares the client socket so that
//! [`client_gone`] can watch for its error state independently of hyper; dropping the exchange
//! then drops the upstream request, and [`Abandon`] aborts its connection: hyper would otherwise
//! flush before closing, which never completes while the runtime reads nothing. The aborted
//! [`UpstreamIo`] closes with a reset, because a FIN would queue behind bytes the runtime never
//! reads and the runtime would never learn the request is over.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper_util::client::legacy::connect::{
    capture_connection, CaptureConnection, Connected, Connection, HttpConnector,
};
use hyper_util::rt::TokioIo;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// TCP keepalive on client sockets: a client whose host vanished (or whose last bytes can never
/// be delivered because taskgate stopped reading) answers the probes with a reset, which
/// [`client_gone`] sees. Idle 60 s, then a probe every 10 s, 6 unanswered probes: about 2 min.
const CLIENT_KEEPALIVE: TcpKeepalive = TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(6);

/// A client connection, shared between hyper (which reads and writes it) and [`client_gone`]
/// (which only waits for its error state).
pub struct ClientIo(Arc<TcpStream>);

impl ClientIo {
    /// Wraps an accepted client socket: `TCP_NODELAY` (Nagle would hold back a small SSE frame
    /// until the next one arrives) and keepalive probes.
    pub fn new(stream: TcpStream) -> ClientIo {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if let Err(e) = SockRef::from(&stream).set_tcp_keepalive(&CLIENT_KEEPALIVE) {
            tracing::debug!(error = %e, "cannot set TCP keepalive");
        }
        ClientIo(Arc::new(stream))
    }

    /// Another handle on the same socket, for [`client_gone`].
    pub fn watch(&self) -> Arc<TcpStream> {
        self.0.clone()
    }
}

/// Resolves when the client's socket is in error: reset by the client, or dead by keepalive.
/// A clean half-close (FIN) does not count: a client may finish sending and still read.
///
/// Cancel safe; it never reads, so it takes no byte from hyper.
pub async fn client_gone(stream: &TcpStream) {
    loop {
        match stream.ready(Interest::ERROR).await {
            Ok(ready) if ready.is_error() => return,
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let room = buf.remaining();
            let mut read = 0;
            // A read that leaves room in the buffer emptied the socket: its readiness is cleared
            // now, as tokio's own `TcpStream::poll_read` does (an error of `WouldBlock` from the
            // closure clears it, unless a new event came meanwhile), instead of being learnt
            // from one more `recv` failing with EAGAIN after every request.
            let result = self.0.try_io(Interest::READABLE, || {
                // Into the uninitialised spare room directly (tokio's `BufMut` for `ReadBuf`):
                // hyper offers a fresh, large buffer on every read, and zeroing it each time
                // would cost as much as the copy itself.
                read = self.0.try_read_buf(buf)?;
                if read > 0 && read < room {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match result {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if read > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// The connector of the pooled upstream client: [`HttpConnector`], with connections that reset
/// instead of closing when dropped with a write stuck (see the module doc).
#[derive(Clone)]
pub struct UpstreamConnector(pub HttpConnector);

impl tower::Service<http::Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = <HttpConnector as tower::Service<http::Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            Ok(UpstreamIo {
                inner: connecting.await?,
                write_stalled: false,
                abort: Abort::default(),
            })
        })
    }
}

/// Aborts one upstream connection from outside hyper. Travels as an extra of the connection's
/// [`Connected`] metadata, so a request can reach the connection it was given.
#[derive(Clone, Default)]
pub struct Abort(Arc<AbortState>);

#[derive(Default)]
struct AbortState {
    aborted: AtomicBool,
    /// The connection's last write is waiting for the runtime to read.
    stalled: AtomicBool,
    /// The connection task, waiting on a write the runtime does not read.
    waker: AtomicWaker,
}

impl Abort {
    fn abort(&self) {
        self.0.aborted.store(true, Ordering::SeqCst);
        self.0.waker.wake();
    }

    fn is_aborted(&self) -> bool {
        self.0.aborted.load(Ordering::SeqCst)
    }

    fn is_stalled(&self) -> bool {
        self.0.stalled.load(Ordering::SeqCst)
    }
}

/// Held by a forward while its request is with the runtime and no response head has come.
/// Dropped armed (the client went away, so the forward future was dropped), it takes the
/// upstream connection the request was sent on out of the pool, and aborts it if a write on it
/// is stuck. Only then: the runtime may have answered in full already, the connection gone
/// back to the pool idle or even to the next request, and aborting it there failed that
/// request with a 502 (the benchmark hit it when `wrk` ended a run with requests in flight).
pub struct Abandon {
    capture: CaptureConnection,
    armed: bool,
}

impl Abandon {
    /// Arms for `request`, which must not have been sent yet.
    pub fn arm<B>(request: &mut http::Request<B>) -> Abandon {
        Abandon {
            capture: capture_connection(request),
            armed: true,
        }
    }

    /// The response head arrived (or the request failed): the connection is hyper's again.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(connected) = self.capture.connection_metadata().as_ref() {
            connected.poison();
            let mut extras = http::Extensions::new();
            connected.get_extras(&mut extras);
            if let Some(abort) = extras.get::<Abort>().filter(|a| a.is_stalled()) {
                abort.abort();
            }
        }
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "request abandoned by the client",
    )
}

/// An upstream connection that remembers whether its last write is still waiting for the
/// runtime to read, and can be aborted (see [`Abandon`]).
pub struct UpstreamIo {
    inner: TokioIo<TcpStream>,
    write_stalled: bool,
    abort: Abort,
}

impl UpstreamIo {
    /// `result` of a write: remembers a stall, and fails the write once aborted (checked after
    /// registering for the wake-up, so an abort in between is not missed).
    fn after_write<T>(
        &mut self,
        cx: &Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        self.write_stalled = result.is_pending();
        self.abort
            .0
            .stalled
            .store(self.write_stalled, Ordering::SeqCst);
        if result.is_pending() {
            self.abort.0.waker.register(cx.waker());
            if self.abort.is_aborted() {
                return Poll::Ready(Err(aborted()));
            }
        }
        result
    }
}

impl Drop for UpstreamIo {
    fn drop(&mut self) {
        if self.write_stalled || self.abort.is_aborted() {
            // Linger 0: close() sends a reset and discards the unsent bytes, so the runtime
            // sees the request end now rather than never.
            let _ = SockRef::from(self.inner.inner()).set_linger(Some(Duration::ZERO));
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        self.inner.connected().extra(self.abort.clone())
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.abort.is_aborted() {
            return Poll::Ready(Err(aborted()));
        }
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after_write(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.abort.is_aborted() {
            return Poll::Ready(Err(aborted()));
        }
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.abort.is_aborted() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.abort.is_aborted() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    /// A keep-alive upstream that answers every request with `ok` at once.
    async fn upstream() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    /// The benchmark's 502: a forward dropped after the runtime had answered in full (the
    /// connection back in the pool) aborted that pooled connection, and the next request
    /// given it failed.
    #[tokio::test]
    async fn an_abandoned_request_the_runtime_answered_does_not_break_the_next_one() {
        let addr = upstream().await;
        let client: Client<UpstreamConnector, Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build(UpstreamConnector(HttpConnector::new()));
        let get = || {
            http::Request::get(format!("http://{addr}/"))
                .body(Empty::new())
                .unwrap()
        };
        let mut first = get();
        let abandon = Abandon::arm(&mut first);
        let response = client.request(first).await.unwrap();
        response.into_body().collect().await.unwrap();
        // The connection is idle in the pool now; the forward is dropped before disarming.
        drop(abandon);
        for _ in 0..3 {
            let response = tokio::time::timeout(Duration::from_secs(10), client.request(get()))
                .await
                .expect("the next request is answered")
                .expect("the next request does not fail on an aborted connection");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
    }
}
