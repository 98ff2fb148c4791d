//! Logging for every command: one subscriber, and a writer that never takes the process down.

use crate::config::{Config, LogFormat};

/// Installs the tracing subscriber: `RUST_LOG` if set, else `log.filter`; pretty or JSON lines
/// on stderr (stdout stays free for the commands that print results). Colours only when stderr
/// is a terminal, so a log file or pipe gets plain text.
pub fn init_tracing(config: &Config) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // Its fallback for a failed write is `eprintln!`, which panics on a closed stderr.
        .log_internal_errors(false)
        .with_writer(|| LossyStderr);
    // A second initialisation (tests, demo inside a process that already logs) is harmless.
    let _ = match config.log.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Stderr for log lines, dropping what cannot be written. With `taskgate serve 2>&1 | head`
/// the reader goes away and every write fails with EPIPE; a logger that reports or panics then
/// takes down whichever task logged (the watcher, the signal handler, a request). Logging must
/// never stop the proxy, so a lost line is the price.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
