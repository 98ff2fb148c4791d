//! The transparent forwarder and the `/_taskgate/` admin endpoints. (Issue 2.)

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the proxy on `listener` until `shutdown` is cancelled, then drains in-flight requests
/// for at most `proxy.shutdown_grace`.
pub async fn run(
    _listener: TcpListener,
    _config: Config,
    _shutdown: CancellationToken,
) -> Result<(), ServeError> {
    unimplemented!("issue 2")
}
