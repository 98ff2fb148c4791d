//! The two TCP sockets of a forwarded exchange, and how each notices the other side is gone.
//!
//! A client that leaves mid-upload while the runtime has stopped reading is the hard case: hyper
//! reads a request body only when it is asked for the next chunk, and nobody asks while the
//! runtime reads nothing, so the client's reset is never read and the exchange, with its
//! upstream request, would stay open for good. [`ClientIo`] shares the client socket so that
//! [`client_gone`] can watch for its error state independently of hyper. The client
//! connection's task then ends, and with it the runtime connection it drives
//! (`upstream::Pinned`), at once: hyper would otherwise flush before closing, which never
//! completes while the runtime reads nothing. An [`UpstreamIo`] dropped with a write stuck
//! closes with a reset, because a FIN would queue behind bytes the runtime never reads and the
//! runtime would never learn the request is over.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
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

/// The connector of runtime connections: [`HttpConnector`], with connections that reset instead
/// of closing when dropped with a write stuck (see the module doc).
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
            })
        })
    }
}

/// An upstream connection that remembers whether its last write is still waiting for the
/// runtime to read: dropped so (the client went away and its exchange with it), it is reset.
pub struct UpstreamIo {
    inner: TokioIo<TcpStream>,
    write_stalled: bool,
}

impl Drop for UpstreamIo {
    fn drop(&mut self) {
        if self.write_stalled {
            // Linger 0: close() sends a reset and discards the unsent bytes, so the runtime
            // sees the request end now rather than never.
            let _ = SockRef::from(self.inner.inner()).set_linger(Some(Duration::ZERO));
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        self.inner.connected()
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
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.write_stalled = result.is_pending();
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.write_stalled = result.is_pending();
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
