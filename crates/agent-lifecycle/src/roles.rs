//! The short-lived roles: `init`, `entrypoint`, `offline` and `probe`.
//! (The long-running `sidecar` is in [`crate::sidecar`].)

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use keelson_core::lifecycle::LifecycleDocument;
use keelson_core::probe::Expr;
use serde_json::json;

use crate::grants::{GrantClient, GrantRequest};
use crate::hooks::{HookRunner, HookStatus};
use crate::layout::{Instance, Layout, read_json, remove_if_present, write_json_atomic};
use crate::output::{Output, rfc3339_now};
use crate::probes::SystemProbes;
use crate::process::AppProcess;
use crate::sidecar::OfflineMessage;

/// How long `offline --wait` waits for the sidecar to acknowledge before it
/// takes the instance offline itself.
pub const OFFLINE_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// `init`: copy the agent and the hooks into the shared volume, then obtain
/// this instance's grants and record the lease.
pub fn init(
    layout: &Layout,
    doc: &LifecycleDocument,
    instance: &Instance,
    agent_exe: &Path,
    hooks_from: Option<&Path>,
    output: &Output,
) -> Result<(), String> {
    for dir in [
        layout.root.join("bin"),
        layout.run_dir(),
        layout.hooks.clone(),
    ] {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let target = layout.agent_binary();
    if std::fs::canonicalize(agent_exe).ok() != std::fs::canonicalize(&target).ok() {
        copy_executable(agent_exe, &target)?;
    }
    output.event(
        "agent_copied",
        &[("to", json!(target.display().to_string()))],
    );
    if let Some(from) = hooks_from {
        let count = copy_tree(from, &layout.hooks)?;
        output.event(
            "hooks_copied",
            &[
                ("from", json!(from.display().to_string())),
                ("to", json!(layout.hooks.display().to_string())),
                ("files", json!(count)),
            ],
        );
    }
    let Some(auth) = &doc.authorization else {
        output.event(
            "grants_skipped",
            &[("reason", json!("no authorization configured"))],
        );
        return Ok(());
    };
    let client =
        GrantClient::new(&auth.url, &auth.token_path, output.clone()).map_err(|e| e.to_string())?;
    let request = GrantRequest {
        app: doc.app.clone(),
        env: doc.env.clone(),
        instance: instance.name.clone(),
        uid: instance.uid.clone(),
        ip: instance.ip.clone(),
    };
    output.event(
        "grants_requested",
        &[
            ("url", json!(auth.url)),
            ("instance", json!(instance.name)),
            ("ip", json!(instance.ip)),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(u64::from(auth.deadline_seconds));
    let lease = client.acquire(&request, deadline).map_err(|e| {
        format!(
            "could not obtain database grants for {}/{} instance {} ({}) from {} within {}s: {e}",
            doc.app, doc.env, instance.name, instance.ip, auth.url, auth.deadline_seconds
        )
    })?;
    write_json_atomic(&layout.lease(), &lease).map_err(|e| {
        format!(
            "cannot record the lease in {}: {e}",
            layout.lease().display()
        )
    })?;
    output.event(
        "grants_obtained",
        &[
            ("lease_id", json!(lease.lease_id)),
            ("ttl_s", json!(lease.ttl_s)),
        ],
    );
    Ok(())
}

fn copy_executable(from: &Path, to: &Path) -> Result<(), String> {
    let tmp = to.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::copy(from, &tmp)
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::fs::rename(&tmp, to))
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))
}

/// Copies a directory tree, keeping file modes; returns the number of files.
fn copy_tree(from: &Path, to: &Path) -> Result<usize, String> {
    let entries =
        std::fs::read_dir(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    std::fs::create_dir_all(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let mut count = 0;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", from.display()))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta =
            std::fs::metadata(&src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        if meta.is_dir() {
            count += copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)
                .map_err(|e| format!("cannot copy {} to {}: {e}", src.display(), dst.display()))?;
            count += 1;
        }
    }
    Ok(count)
}

/// Why `entrypoint` did not exec the app.
#[derive(Debug, thiserror::Error)]
pub enum EntrypointError {
    /// No command was given.
    #[error("no command given; usage: keelson-agent entrypoint -- CMD [ARGS...]")]
    NoCommand,
    /// preStart did not succeed.
    #[error("preStart {0}; the app was not started")]
    PreStart(String, i32),
    /// The command could not be executed.
    #[error("cannot execute {0}: {1}")]
    Exec(String, std::io::Error),
}

impl EntrypointError {
    /// The exit status the container should end with.
    pub fn exit_code(&self) -> i32 {
        match self {
            EntrypointError::NoCommand => 2,
            EntrypointError::PreStart(_, code) => *code,
            EntrypointError::Exec(_, e) if e.kind() == std::io::ErrorKind::NotFound => 127,
            EntrypointError::Exec(..) => 126,
        }
    }
}

/// `entrypoint -- CMD...`: remove a stale healthcheck.html, record the app
/// process, run preStart with live output, then exec CMD in this process so
/// the app receives signals directly. Returns only when the app was not
/// started. `stop` (set on SIGTERM/SIGINT) kills a running preStart, which
/// matters when this process is PID 1 and the kernel would otherwise ignore
/// the signal. With `forwarder` (this agent's executable), preStart's output
/// goes through `forwarder tag preStart`, so processes it leaves in the
/// background keep their stdout after the exec (see
/// [`HookRunner::with_forwarder`]).
pub fn entrypoint(
    layout: &Layout,
    doc: &LifecycleDocument,
    instance: &Instance,
    command: &[String],
    output: &Output,
    stop: Arc<AtomicBool>,
    forwarder: Option<&Path>,
) -> EntrypointError {
    let Some(program) = command.first() else {
        return EntrypointError::NoCommand;
    };
    if let Ok(true) = remove_if_present(&layout.healthcheck()) {
        output.event("stale_healthcheck_removed", &[]);
    }
    // The pid and start time survive exec, so the sidecar follows this
    // process from preStart through the app's whole life.
    match AppProcess::current() {
        Some(me) => {
            if let Err(e) = write_json_atomic(&layout.app_record(), &me) {
                output.event("app_record_failed", &[("error", json!(e.to_string()))]);
            }
        }
        None => output.event(
            "app_record_failed",
            &[("error", json!("cannot read /proc/self/stat"))],
        ),
    }
    if let Some(hook) = &doc.hooks.pre_start {
        let mut runner = HookRunner::new(
            &layout.hooks,
            instance.hook_env(doc, layout),
            output.clone(),
        )
        .with_cancel(stop);
        if let Some(exe) = forwarder {
            runner = runner.with_forwarder(exe);
        }
        let outcome = runner.run("preStart", hook);
        if !outcome.succeeded() {
            let code = match outcome.status {
                HookStatus::Exited(c) if c != 0 => c,
                HookStatus::Cancelled => 143,
                _ => 1,
            };
            return EntrypointError::PreStart(outcome.describe(), code);
        }
    }
    output.event("exec", &[("command", json!(command))]);
    let error = Command::new(program).args(&command[1..]).exec();
    EntrypointError::Exec(program.clone(), error)
}

/// `offline [--wait]`: ask the sidecar, through the shared volume, to take the
/// instance offline (remove healthcheck.html, drain, preOffline). With `wait`
/// it returns when that is done or `timeout` passed. When no sidecar
/// acknowledges within [`OFFLINE_ACK_TIMEOUT`], it does the same itself.
pub fn offline(
    layout: &Layout,
    doc: &LifecycleDocument,
    instance: &Instance,
    wait: bool,
    timeout: Duration,
    output: &Output,
) -> Result<(), String> {
    let started = Instant::now();
    let request = OfflineMessage {
        id: request_id(),
        at: rfc3339_now(),
        outcome: None,
    };
    write_json_atomic(&layout.offline_request(), &request)
        .map_err(|e| format!("cannot write {}: {e}", layout.offline_request().display()))?;
    output.event(
        "offline_requested",
        &[("request", json!(request.id)), ("wait", json!(wait))],
    );
    if !wait {
        return Ok(());
    }
    let mut acked = false;
    loop {
        if let Some(done) = read_json::<OfflineMessage>(&layout.offline_done())
            && done.id == request.id
        {
            output.event(
                "offline_done",
                &[
                    ("by", json!("sidecar")),
                    ("pre_offline", json!(done.outcome)),
                    ("waited_ms", json!(started.elapsed().as_millis() as u64)),
                ],
            );
            return Ok(());
        }
        if !acked {
            acked = read_json::<OfflineMessage>(&layout.offline_ack())
                .is_some_and(|a| a.id == request.id);
            if acked {
                output.event("offline_acknowledged", &[]);
            } else if started.elapsed() >= OFFLINE_ACK_TIMEOUT {
                return offline_locally(layout, doc, instance, output);
            }
        }
        if started.elapsed() >= timeout {
            output.event(
                "offline_wait_timed_out",
                &[("timeout_s", json!(timeout.as_secs()))],
            );
            return Err(format!(
                "the sidecar did not finish going offline within {}s",
                timeout.as_secs()
            ));
        }
        // Short: the app is signalled only once this returns.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A request id no other request shares: the process, the clock in
/// nanoseconds and a per-process sequence number (a supervisor sends its
/// requests from one process, possibly within one millisecond).
fn request_id() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn offline_locally(
    layout: &Layout,
    doc: &LifecycleDocument,
    instance: &Instance,
    output: &Output,
) -> Result<(), String> {
    output.event(
        "sidecar_not_answering",
        &[("action", json!("going offline here"))],
    );
    let was_online = remove_if_present(&layout.healthcheck()).unwrap_or(false);
    if was_online {
        output.event(
            "healthcheck_removed",
            &[("reason", json!("offline request"))],
        );
        if doc.drain_seconds > 0 {
            output.event("draining", &[("seconds", json!(doc.drain_seconds))]);
            std::thread::sleep(Duration::from_secs(u64::from(doc.drain_seconds)));
        }
    }
    if let Some(hook) = &doc.hooks.pre_offline {
        HookRunner::new(
            &layout.hooks,
            instance.hook_env(doc, layout),
            output.clone(),
        )
        .run("preOffline", hook);
    }
    output.event("offline_done", &[("by", json!("offline"))]);
    Ok(())
}

/// The default `offline --wait` timeout: drain plus the preOffline timeout
/// plus a margin.
pub fn default_offline_timeout(doc: &LifecycleDocument) -> Duration {
    let hook = doc
        .hooks
        .pre_offline
        .as_ref()
        .map_or(0, |h| h.timeout_seconds);
    Duration::from_secs(u64::from(doc.drain_seconds) + u64::from(hook) + 10)
}

/// Exit status of `probe` when the instance is healthy.
pub const PROBE_HEALTHY: i32 = 0;
/// Exit status of `probe` when the instance is unhealthy.
pub const PROBE_UNHEALTHY: i32 = 1;
/// Exit status of `probe` when the expression is invalid.
pub const PROBE_INVALID: i32 = 2;

/// `probe EXPR`: evaluates a liveness expression; returns the exit status
/// and the line to print.
pub fn probe(expression: &str, timeout: Duration) -> (i32, String) {
    match Expr::parse(expression) {
        Err(e) => {
            let caret = format!("{}^", " ".repeat(e.offset));
            (
                PROBE_INVALID,
                format!("invalid liveness expression {e}\n  {expression}\n  {caret}"),
            )
        }
        Ok(expr) => {
            if expr.evaluate(&mut SystemProbes::new(timeout)) {
                (PROBE_HEALTHY, format!("healthy: {expr}"))
            } else {
                (PROBE_UNHEALTHY, format!("unhealthy: {expr}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_exit_codes_and_error_caret() {
        let (code, msg) = probe(
            "file(\"/proc/self/stat\") && !file(\"/nope\")",
            Duration::from_secs(1),
        );
        assert_eq!(code, PROBE_HEALTHY, "{msg}");
        let (code, _) = probe("file(\"/nope\")", Duration::from_secs(1));
        assert_eq!(code, PROBE_UNHEALTHY);
        let (code, msg) = probe("tcp(1) || htp(2)", Duration::from_secs(1));
        assert_eq!(code, PROBE_INVALID);
        assert!(
            msg.starts_with("invalid liveness expression at column 11: unknown function `htp`"),
            "{msg}"
        );
        assert!(
            msg.ends_with("\n  tcp(1) || htp(2)\n            ^"),
            "{msg:?}"
        );
    }

    #[test]
    fn copy_tree_keeps_modes_and_nesting() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        std::fs::create_dir(from.path().join("lib")).unwrap();
        std::fs::write(from.path().join("lib/common.sh"), "x").unwrap();
        let script = from.path().join("warm.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(copy_tree(from.path(), to.path()).unwrap(), 2);
        let mode = std::fs::metadata(to.path().join("warm.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
        assert!(to.path().join("lib/common.sh").exists());
    }
}
