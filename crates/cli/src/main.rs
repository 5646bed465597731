//! The `keelson` command.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match keelson_cli::run(keelson_cli::Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keelson: {e:#}");
            ExitCode::FAILURE
        }
    }
}
