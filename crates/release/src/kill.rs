//! Deterministic crash points for tests: with
//! `KEELSON_KILL_AT=<step>:<before|after>` a worker process exits with
//! status 137 (as if killed with SIGKILL) right before or right after it
//! applies the step named `<step>` (see [`crate::step_name`], e.g.
//! `forward/b1/s1/vm-2@blue/a1`). Nothing is flushed or cleaned up, so what
//! survives is what a `kill -9` would leave.

use std::sync::OnceLock;

/// The variable that names the kill point.
pub const KILL_AT_VAR: &str = "KEELSON_KILL_AT";

/// The exit status of a kill point (128 + SIGKILL).
pub const KILLED_STATUS: i32 = 137;

/// Where around a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Before the runtime is asked to apply it.
    Before,
    /// After the runtime applied it, before the engine records that.
    After,
}

impl When {
    fn as_str(self) -> &'static str {
        match self {
            Self::Before => "before",
            Self::After => "after",
        }
    }
}

fn configured() -> Option<&'static (String, String)> {
    static AT: OnceLock<Option<(String, String)>> = OnceLock::new();
    AT.get_or_init(|| {
        let value = std::env::var(KILL_AT_VAR).ok()?;
        let (step, when) = value.rsplit_once(':')?;
        Some((step.to_string(), when.to_string()))
    })
    .as_ref()
}

/// Exits the process with [`KILLED_STATUS`] when this is the configured
/// kill point.
pub fn point(step: &str, when: When) {
    if let Some((at, at_when)) = configured()
        && at == step
        && at_when == when.as_str()
    {
        eprintln!("{KILL_AT_VAR}: exiting at {step}:{}", when.as_str());
        std::process::exit(KILLED_STATUS);
    }
}
