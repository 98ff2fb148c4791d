//! The command line. Each subcommand only wires parts together; the work lives in the modules.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormat, Overrides};

/// `eprintln!` that never panics: the command's last words on a closed stderr are lost, not a
/// panic in place of the exit code.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

#[derive(Debug, Parser)]
#[command(
    name = "taskgate",
    version,
    about = "A reverse proxy for OpenCode that holds completion claims until the child session tree is really done"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy in front of `opencode serve` (and the model face, with `[model] enabled`).
    Serve {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Block until a session's whole tree is terminal, then report the verdict.
    Wait(WaitArgs),
    /// Run the simulated OpenCode runtime (scripted scenarios that show the bug).
    Sim(SimArgs),
    /// Show the bug and the fix side by side against the simulated runtime.
    Demo(DemoArgs),
    /// Run an opencode command (`serve`, `run …`, the TUI) with taskgate in front of a private
    /// runtime: `taskgate wrap -- opencode run "…"`.
    Wrap(WrapArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (secrets redacted), or the error.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Flags shared by the subcommands that run a proxy.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Path to proxy.toml (defaults are used when absent).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:4097.
    #[arg(long)]
    pub listen: Option<String>,
    /// The runtime's URL, e.g. http://127.0.0.1:4096.
    #[arg(long)]
    pub upstream: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

impl CommonArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            log_format: self.log_format,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// The session whose tree to wait for (`ses_…`).
    pub session: String,
    /// Path to proxy.toml (for credentials, settle window, poll interval).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The runtime's URL.
    #[arg(long)]
    pub upstream: Option<String>,
    /// The session's directory, when the runtime serves several (`?directory=`).
    #[arg(long)]
    pub directory: Option<String>,
    /// Give up after this long (e.g. 30s, 2h); exit code 2.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Print one JSON object instead of the live tree.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4096")]
    pub listen: String,
    /// Multiply every scenario delay by this (0.1 = ten times faster).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Multiply every scenario delay by this (0.1 = ten times faster).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// The scenario to show (see `taskgate sim`); defaults to the native background child.
    #[arg(long)]
    pub scenario: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct WrapArgs {
    /// Path to proxy.toml (defaults are used when absent).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the proxy listens. Default: for `serve`, the address given to the runtime
    /// (127.0.0.1:4096 when none); for `run` and the TUI, a free loopback port.
    #[arg(long)]
    pub listen: Option<String>,
    /// `run` only: exit 1, with one line on stderr, when a session of the run's tree failed or
    /// was aborted (for CI).
    #[arg(long)]
    pub strict: bool,
    /// Print where the runtime, the proxy and the runtime's log are.
    #[arg(short, long)]
    pub verbose: bool,
    /// The opencode command, after `--`: `opencode serve …`, `opencode run …`, `opencode [dir]`
    /// (`npx opencode-ai …` and paths work too).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Runs the parsed command line and returns the process's exit code.
pub fn main(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say!("taskgate: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { common } => serve(common).await,
            Command::Config {
                command: ConfigCommand::Check { config },
            } => match Config::load(config.as_deref(), &Overrides::default()) {
                Ok(config) => {
                    {
                        use std::io::Write as _;
                        // `config check | head -3` closes stdout early; that is not an error.
                        let _ = std::io::stdout().write_all(config.to_redacted_toml().as_bytes());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    say!("taskgate: config: {e}");
                    ExitCode::from(2)
                }
            },
            Command::Wait(args) => crate::oracle::wait_command(args).await,
            Command::Sim(args) => sim(args).await,
            Command::Demo(args) => crate::demo::run(args).await,
            Command::Wrap(args) => crate::wrap::command(args).await,
        }
    })
}

async fn serve(common: CommonArgs) -> ExitCode {
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
    tracing::info!(%listen, upstream = %config.proxy.upstream, "taskgate serving");
    let shutdown = shutdown_on_signal();
    // One oracle for both faces when they read the same runtime: one event subscription, and
    // each tree read once per interval however many wait on it, from either face.
    let model_shares = config.model.runtime_url(&config.proxy) == config.proxy.upstream;
    let oracle = (config.gate.enabled || (config.model.enabled && model_shares)).then(|| {
        let oracle = crate::oracle::Oracle::new(&config);
        oracle.start(shutdown.clone());
        oracle
    });
    // `[model] enabled`: the model face runs beside the client face, on its own listener, and
    // stops with it.
    let model = if config.model.enabled {
        let listen = config.model.listen;
        let model_listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                say!("taskgate: cannot listen on {listen} (model.listen): {e}");
                return ExitCode::from(1);
            }
        };
        tracing::info!(%listen, "model face serving");
        Some(tokio::spawn(crate::model::run(
            model_listener,
            config.clone(),
            oracle.clone(),
            shutdown.clone(),
        )))
    } else {
        None
    };
    let mut code =
        match crate::proxy::run_with_oracle(listener, config, oracle, shutdown.clone()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say!("taskgate: {e}");
                ExitCode::from(1)
            }
        };
    if let Some(model) = model {
        shutdown.cancel();
        match model.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                say!("taskgate: {e}");
                code = ExitCode::from(1);
            }
            Err(e) => {
                say!("taskgate: model face: {e}");
                code = ExitCode::from(1);
            }
        }
    }
    code
}

async fn sim(args: SimArgs) -> ExitCode {
    init_tracing(&Config::defaults());
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            say!("taskgate: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
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
    match crate::sim::run(listener, options, shutdown_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("taskgate: sim: {e}");
            ExitCode::from(1)
        }
    }
}

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
