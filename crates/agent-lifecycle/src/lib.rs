//! The instance lifecycle that `keelson-agent` runs in every pod, and that
//! the hosts runtime reuses for processes on VMs.
//!
//! ```text
//! init:    copy agent + hooks into the shared volume ─► obtain grants (lease)   roles::init
//! start:   remove stale healthcheck.html ─► preStart ─► exec app               roles::entrypoint
//! online:  poll checkurl ─► preOnline ─► write healthcheck.html ─► ONLINE       sidecar::run
//! stop:    remove healthcheck.html ─► drain ─► preOffline                       roles::offline + sidecar
//!          ─► app stopped ─► wait for it to exit ─► revoke grants               sidecar::run
//! liveness: an expression over http/tcp/process/file/debugger_attached         roles::probe
//! ```
//!
//! Everything is blocking std code with threads: no async runtime, no
//! Kubernetes or database client, so the agent stays one small static binary.
//! All state changes are JSON lines and all hook output is tagged with its
//! step, both written whole and unbuffered through [`output::Output`].

pub mod grants;
pub mod hooks;
pub mod host;
pub mod http;
pub mod labels;
pub mod layout;
pub mod output;
pub mod probes;
pub mod process;
pub mod roles;
pub mod sidecar;
mod watch;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// A flag that becomes true on SIGTERM or SIGINT. The roles poll it; a
/// handled signal also means a PID 1 agent is not immune to SIGTERM.
pub fn stop_flag() -> std::io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, flag.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, flag.clone())?;
    Ok(flag)
}
