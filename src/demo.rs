//! `taskgate demo`. (Filled in by issue 4.)

use std::process::ExitCode;

use crate::cli::DemoArgs;

pub async fn run(_args: DemoArgs) -> ExitCode {
    unimplemented!("issue 4")
}
