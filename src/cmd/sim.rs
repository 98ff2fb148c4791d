//! `taskgate sim`: the simulated runtime on a port of its own.

use std::process::ExitCode;

use crate::config::Config;

use super::logging::init_tracing;
use super::signals::shutdown_on_signal;

#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4096")]
    pub listen: String,
    /// Multiply every scenario delay by this (0.1 = ten times faster).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
}

pub async fn run(args: SimArgs) -> ExitCode {
    init_tracing(&Config::defaults());
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            say!("taskgate: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    // Before the "listening" line, which a script may answer with a signal at once.
    let shutdown = shutdown_on_signal();
    match listener.local_addr() {
        Ok(addr) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stdout(), "taskgate sim listening on http://{addr}");
        }
        Err(e) => say!("taskgate: {e}"),
    }
    let options = crate::sim::SimOptions {
        time_scale: args.time_scale,
        ..crate::sim::SimOptions::default()
    };
    match crate::sim::run(listener, options, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("taskgate: sim: {e}");
            ExitCode::from(1)
        }
    }
}
