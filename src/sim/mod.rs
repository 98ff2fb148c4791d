//! The simulated OpenCode runtime. (Filled in by issue 4.)

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// Multiplies every delay of a scenario.
    pub time_scale: f64,
}

/// Serves the simulated runtime on `listener` until `shutdown`.
pub async fn run(
    _listener: TcpListener,
    _options: SimOptions,
    _shutdown: CancellationToken,
) -> std::io::Result<()> {
    unimplemented!("issue 4")
}
