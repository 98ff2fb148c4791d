//! Signals for the long-running commands (`serve`, `sim`, `wait`).

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT, SIGTERM or SIGHUP (a closed terminal or a supervisor
/// asking to stop: a graceful stop, as `taskgate wrap` treats it). A second signal exits at
/// once with 128 + its number: an operator pressing Ctrl-C twice does not want to wait out
/// `proxy.shutdown_grace`.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Installed here, before the task runs, so a signal right after start is ours (the
        // default action of SIGHUP would end the process without draining).
        let kinds = [
            (SignalKind::interrupt(), libc::SIGINT),
            (SignalKind::terminate(), libc::SIGTERM),
            (SignalKind::hangup(), libc::SIGHUP),
        ];
        let mut streams = Vec::new();
        for (kind, number) in kinds {
            match signal(kind) {
                Ok(stream) => streams.push((stream, number)),
                Err(e) => tracing::warn!(error = %e, signal = number, "cannot handle signal"),
            }
        }
        tokio::spawn(async move {
            if streams.is_empty() {
                return;
            }
            let first = next_signal(&mut streams).await;
            tracing::info!(
                signal = first,
                "shutdown signal received; again to exit at once"
            );
            trigger.cancel();
            let second = next_signal(&mut streams).await;
            tracing::warn!(signal = second, "second signal: exiting without draining");
            std::process::exit(128 + second);
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received; again to exit at once");
        trigger.cancel();
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
    token
}

/// The number of the next signal to arrive on any of `streams`.
#[cfg(unix)]
async fn next_signal(streams: &mut [(tokio::signal::unix::Signal, i32)]) -> i32 {
    let waits = streams.iter_mut().map(|(stream, number)| {
        Box::pin(async move {
            stream.recv().await;
            *number
        })
    });
    futures_util::future::select_all(waits).await.0
}
