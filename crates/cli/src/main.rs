//! The `keelson` command.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The host daemon re-runs this binary to supervise each instance.
    if let Some(code) = keelson_agent_lifecycle::host::run_internal_from_args(std::env::args_os()) {
        return code;
    }
    match keelson_cli::run(keelson_cli::Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keelson: {e:#}");
            ExitCode::FAILURE
        }
    }
}
