//! HTTP/1.1 upgrades (WebSocket: the runtime's PTY routes): once the runtime answered `101`, the
//! two upgraded connections are joined by a raw byte tunnel. No frames are parsed: what one side
//! writes the other reads.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Spawns the tunnel between the client's and the runtime's upgraded connections.
///
/// The task is tracked (hyper's graceful shutdown does not know about upgraded connections, so
/// `serve` waits on `tracker` itself) and ends when `shutdown` is cancelled: a terminal session
/// never ends by itself.
pub fn spawn_tunnel(
    tracker: &TaskTracker,
    shutdown: CancellationToken,
    client: OnUpgrade,
    upstream: OnUpgrade,
) {
    tracker.spawn(async move {
        let tunnel = async {
            let (client, upstream) = match tokio::try_join!(client, upstream) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                Ok((up, down)) => {
                    tracing::debug!(to_upstream = up, to_client = down, "tunnel closed")
                }
                Err(e) => tracing::debug!(error = %e, "tunnel broke"),
            }
        };
        tokio::select! {
            () = tunnel => {}
            () = shutdown.cancelled() => tracing::debug!("tunnel ended by shutdown"),
        }
    });
}
