//! The hosts runtime's agent side: `keelson-agent host`, a daemon on each VM
//! that deploys, starts and stops instances through the same lifecycle as a
//! pod, and a per-instance supervisor process that owns each instance, so
//! the daemon can restart without killing anything.
//!
//! ```text
//! control side ──HTTP (host token)──► daemon ──spawn──► supervisor (one per instance, own session)
//!                                        │                ├─ sidecar thread  (checkurl ─► preOnline ─► ONLINE)
//!                                        │                ├─ app via entrypoint (preStart ─► exec)
//!                                        │                └─ log segments + supervisor.json
//!                                        └──────── reads ──┘  (re-attach = read the files)
//! ```
//!
//! The supervisor is this same binary re-executed with the hidden
//! [`INTERNAL_SUBCOMMAND`]; any binary that embeds the daemon (keelson-agent,
//! keelson) routes it to [`run_internal`] before parsing its own arguments.

pub mod api;
pub mod artifact;
pub mod daemon;
pub mod instance;
pub mod log;
pub mod server;
pub mod supervisor;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

pub use daemon::{DaemonConfig, run};

use crate::hooks;
use crate::output::Output;

/// The hidden subcommand for the supervisor and its helpers:
/// `EXE __keelson-host supervise DIR | entrypoint DIR | tag STEP`.
pub const INTERNAL_SUBCOMMAND: &str = "__keelson-host";

/// When `args` (the whole command line) is an internal call, runs it and
/// returns its exit code; otherwise `None`. Call it first thing in `main`:
///
/// ```no_run
/// # fn main() -> std::process::ExitCode {
/// if let Some(code) = keelson_agent_lifecycle::host::run_internal_from_args(std::env::args_os()) {
///     return code;
/// }
/// # std::process::ExitCode::SUCCESS
/// # }
/// ```
pub fn run_internal_from_args(args: impl IntoIterator<Item = OsString>) -> Option<ExitCode> {
    let args: Vec<OsString> = args.into_iter().collect();
    if args.get(1).is_none_or(|a| a != INTERNAL_SUBCOMMAND) {
        return None;
    }
    Some(run_internal(&args[2..]))
}

/// Runs an internal role: `supervise DIR`, `entrypoint DIR` or `tag STEP`.
pub fn run_internal(args: &[OsString]) -> ExitCode {
    let role = args.first().and_then(|a| a.to_str()).unwrap_or("");
    let arg = args.get(1).cloned().unwrap_or_default();
    let result = match role {
        "supervise" => supervisor::run(&PathBuf::from(arg)).map(|()| 0),
        "entrypoint" => supervisor::entrypoint(&PathBuf::from(arg)),
        "tag" => {
            let step = arg.to_string_lossy().into_owned();
            hooks::tag_lines(
                &step,
                std::io::stdin().lock(),
                &Output::stdout("entrypoint"),
            );
            Ok(0)
        }
        other => Err(format!(
            "unknown internal role `{other}`; expected supervise, entrypoint or tag"
        )),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(message) => {
            eprintln!("keelson-agent {INTERNAL_SUBCOMMAND} {role}: {message}");
            ExitCode::FAILURE
        }
    }
}
