//! The `taskgate` binary: parse the command line, hand over to [`taskgate::cmd`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = taskgate::cmd::Cli::parse();
    taskgate::cmd::main(cli)
}
