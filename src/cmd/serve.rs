//! `taskgate serve`: the client face in front of a runtime the user runs, and the model face
//! beside it when `[model] enabled`.

use std::process::ExitCode;

use crate::config::Config;

use super::logging::init_tracing;
use super::signals::shutdown_on_signal;
use super::CommonArgs;

pub async fn run(common: CommonArgs) -> ExitCode {
    let config = match Config::load(common.config.as_deref(), &common.overrides()) {
        Ok(config) => config,
        Err(e) => {
            say!("taskgate: config: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config);
    let listener = match tokio::net::TcpListener::bind(config.proxy.listen).await {
        Ok(l) => l,
        Err(e) => {
            say!("taskgate: cannot listen on {}: {e}", config.proxy.listen);
            return ExitCode::from(1);
        }
    };
    // The bound address, not the configured one: `--listen 127.0.0.1:0` picks a free port.
    let listen = listener.local_addr().unwrap_or(config.proxy.listen);
    // The handlers go in before "taskgate serving" is said: whoever waits for that line may
    // signal at once, and the default action of SIGTERM would end the process without draining.
    let shutdown = shutdown_on_signal();
    tracing::info!(%listen, upstream = %config.proxy.upstream, "taskgate serving");
    // `[model] enabled`: the model face runs beside the client face, on its own listener, and
    // stops with it.
    let model = if config.model.enabled {
        let configured = config.model.listen;
        match tokio::net::TcpListener::bind(configured).await {
            Ok(l) => {
                // The bound address, as for the client face (`model.listen` may name port 0).
                let listen = l.local_addr().unwrap_or(configured);
                tracing::info!(%listen, "model face serving");
                Some(l)
            }
            Err(e) => {
                say!("taskgate: cannot listen on {configured} (model.listen): {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    match super::stack::start(config, listener, model, shutdown)
        .finish()
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("taskgate: {e}");
            ExitCode::from(1)
        }
    }
}
