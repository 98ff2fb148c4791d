//! The `taskgate` binary: parse the command line, hand over to [`taskgate::cmd`].

use clap::Parser;

/// jemalloc rather than the system allocator: releasing 10,000 held claims spent over a quarter
/// of taskgate's CPU in glibc's malloc and free, and jemalloc cut that CPU by about 30 % at the
/// same peak memory (docs/performance.md, "jemalloc"). Not on MSVC, which jemalloc does not
/// support (nor does taskgate ship for Windows).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = taskgate::cmd::Cli::parse();
    taskgate::cmd::main(cli)
}
