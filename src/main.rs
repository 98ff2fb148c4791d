//! The `taskgate` binary: parse the command line, hand over to [`taskgate::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = taskgate::cli::Cli::parse();
    taskgate::cli::main(cli)
}
