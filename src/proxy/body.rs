//! A pass-through body that counts the bytes it relays and, for event streams, ends at shutdown.
//!
//! It wraps the body rather than re-streaming it (`Body::from_stream` would lose the size hint and
//! trailers, turning every sized response into a chunked one): frames, size hint and end-of-stream
//! are the inner body's own.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::WaitForCancellationFutureOwned;

/// Keeps a gauge up for as long as it lives (an open event stream).
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// See the module doc. Generic over the inner body so the forward path wraps hyper's body
/// directly instead of boxing it twice (once into a [`Body`], once more around the relay).
pub struct Relay<B = Body> {
    /// `None` once ended at shutdown: dropping the upstream body closes that connection.
    inner: Option<B>,
    bytes: Counter,
    /// For long-lived streams only: when it resolves the body ends cleanly (the final chunk is
    /// written), so a graceful shutdown is not held up by a stream that never ends by itself.
    end_on: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Held, never read: its drop is the end of an open stream, whether it ended, failed or
    /// the client went away.
    _open: Option<GaugeGuard>,
    /// Set when the inner body fails (for a request body: the client's fault, not the runtime's).
    failed: Option<Arc<AtomicBool>>,
}

impl<B> Relay<B> {
    pub fn new(inner: B, bytes: Counter) -> Relay<B> {
        Relay {
            inner: Some(inner),
            bytes,
            end_on: None,
            _open: None,
            failed: None,
        }
    }

    /// Records in `flag` whether the inner body failed, so a forward that fails because the
    /// client's body broke is not blamed on the runtime.
    pub fn flag_failure(mut self, flag: Arc<AtomicBool>) -> Relay<B> {
        self.failed = Some(flag);
        self
    }

    /// Makes this a long-lived stream: it counts as open in `gauge` and ends at `shutdown`.
    pub fn stream(mut self, shutdown: WaitForCancellationFutureOwned, gauge: Gauge) -> Relay<B> {
        self.end_on = Some(Box::pin(shutdown));
        self._open = Some(GaugeGuard::new(gauge));
        self
    }
}

impl<B> http_body::Body for Relay<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Some(end) = self.end_on.as_mut() {
            if end.as_mut().poll(cx).is_ready() {
                // Dropping the upstream body now closes that upstream connection at once.
                self.inner = None;
                self.end_on = None;
                self._open = None;
                return Poll::Ready(None);
            }
        }
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes.inc_by(data.len() as u64);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                if let Some(flag) = &self.failed {
                    flag.store(true, Ordering::SeqCst);
                }
                Poll::Ready(Some(Err(axum::Error::new(e))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Reads `body` whole if it is at most `limit` bytes. Otherwise returns a body that replays
/// what was read followed by the rest, so a too-large response still reaches the client intact.
pub async fn read_limited(mut body: Body, limit: usize) -> Result<Bytes, Body> {
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(buf.freeze()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() > limit {
                        let prefix =
                            futures_util::stream::once(std::future::ready(Ok::<_, axum::Error>(
                                buf.freeze(),
                            )));
                        let rest = body.into_data_stream();
                        return Err(Body::from_stream(futures_util::StreamExt::chain(
                            prefix, rest,
                        )));
                    }
                }
            }
            Some(Err(e)) => {
                let prefix = Ok::<_, axum::Error>(buf.freeze());
                return Err(Body::from_stream(futures_util::stream::iter([
                    prefix,
                    Err(e),
                ])));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_oversized_body_passes_through_whole() {
        let data = vec![b'x'; 100];
        let body = Body::from(data.clone());
        let Err(passthrough) = read_limited(body, 10).await else {
            panic!("expected passthrough");
        };
        let got = passthrough.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], &data[..]);
        let small = read_limited(Body::from("{}"), 10).await.unwrap();
        assert_eq!(&small[..], b"{}");
    }
}
