//! The command line: one file per subcommand, owning its arguments and what it prints. The
//! parts (proxy, gate, oracle, model face) are put together in one place, [`stack`]; `term`
//! draws the live frames of `wait` and `holds` within the terminal's size.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, Overrides};

/// `eprintln!` that never panics: the command's last words on a closed stderr are lost, not a
/// panic in place of the exit code.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod demo;
mod holds;
mod logging;
mod model_env;
mod serve;
mod signals;
mod sim;
pub mod stack;
mod term;
mod wait;
mod wrap;

pub use demo::DemoArgs;
pub use holds::HoldsArgs;
pub use logging::init_tracing;
pub use model_env::ModelEnvArgs;
pub use signals::shutdown_on_signal;
pub use sim::SimArgs;
pub use wait::WaitArgs;
pub use wrap::WrapArgs;

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
    /// Show what a running taskgate holds and why: its session trees, holds and releases,
    /// redrawn live on a terminal (one snapshot with `--json` or into a pipe).
    Holds(HoldsArgs),
    /// Run the simulated OpenCode runtime (scripted scenarios that show the bug).
    Sim(SimArgs),
    /// Show the bug and the fix side by side against the simulated runtime.
    Demo(DemoArgs),
    /// Run an opencode command (`serve`, `run …`, the TUI) with taskgate in front of a private
    /// runtime: `taskgate wrap -- opencode run "…"`.
    Wrap(WrapArgs),
    /// Print the shell lines that route every provider of the runtime through the model face
    /// of `taskgate serve`: `eval "$(taskgate model-env)"`, then start both in that shell.
    ModelEnv(ModelEnvArgs),
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
            Command::Serve { common } => serve::run(common).await,
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
            Command::Wait(args) => wait::run(args).await,
            Command::Holds(args) => holds::run(args).await,
            Command::Sim(args) => sim::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Wrap(args) => wrap::run(args).await,
            Command::ModelEnv(args) => model_env::run(args).await,
        }
    })
}
