//! The per-instance supervisor: a small process (the daemon's own binary,
//! re-executed) that owns one instance, so the daemon can restart or be
//! upgraded without killing anything.
//!
//! ```text
//! daemon ──spawn──► supervisor (own session; waits for the daemon's go: stdin EOF)
//!                     ├─ init: obtain the grant lease with the host token      roles::init
//!                     ├─ sidecar thread: checkurl ─► preOnline ─► ONLINE, lease renewal
//!                     ├─ app: `exe __keelson-host entrypoint DIR`              roles::entrypoint
//!                     │        (stale healthcheck.html removed ─► preStart ─► exec command)
//!                     │        exits? restart by policy with backoff; the sidecar brings it online again
//!                     └─ SIGTERM: offline --wait (healthcheck.html removed ─► drain ─► preOffline)
//!                              ─► SIGTERM app ─► wait (stopTimeoutSeconds) ─► SIGKILL
//!                              ─► sidecar sees the app gone ─► revokes the lease ─► exit
//! ```
//!
//! Everything it knows is in the instance directory: the record
//! (`supervisor.json`, rewritten on every change, phase included) and the log
//! (every line of the app, the hooks and the lifecycle), so a restarted
//! daemon re-attaches by reading files.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keelson_core::lifecycle::LifecycleDocument;
use serde_json::json;

use super::INTERNAL_SUBCOMMAND;
use super::api::{ExitRecord, RestartPolicy, SupervisorState};
use super::instance::{HostSpec, InstanceDir, SupervisorRecord};
use super::log::LogWriter;
use crate::hooks::for_each_line;
use crate::layout::{
    Instance, Layout, read_json, remove_if_present, write_atomic, write_json_atomic,
};
use crate::output::{Output, rfc3339_now};
use crate::process::AppProcess;
use crate::sidecar::{self, Phase, SidecarConfig};
use crate::{roles, stop_flag};

/// How often the supervisor looks at its app.
const POLL: Duration = Duration::from_millis(10);

/// The longest wait between two restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Uptime after which an app's restarts count from zero again.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Where every line goes: the log, and phase changes into the record.
type LineSink = Arc<dyn Fn(&str) + Send + Sync>;

/// The record, persisted on every change.
struct Recorder {
    path: PathBuf,
    record: Mutex<SupervisorRecord>,
}

impl Recorder {
    fn update(&self, f: impl FnOnce(&mut SupervisorRecord)) {
        if let Ok(mut r) = self.record.lock() {
            f(&mut r);
            r.updated_at = rfc3339_now();
            let _ = write_json_atomic(&self.path, &*r);
        }
    }
}

/// Runs the supervisor of the instance in `dir` until it is stopped or its
/// app ends for good.
pub fn run(dir: &Path) -> Result<(), String> {
    // Its own session: the daemon's terminal, group and death do not reach it.
    let _ = rustix::process::setsid();
    // The daemon closes our stdin once it has recorded us (see the daemon).
    let mut go = Vec::new();
    let _ = std::io::stdin().take(1024).read_to_end(&mut go);

    let idir = InstanceDir {
        root: dir.to_path_buf(),
    };
    let spec = idir
        .spec()
        .ok_or_else(|| format!("no valid {}", idir.spec_path().display()))?;
    let layout = idir.layout(&spec);
    let doc = layout.load_document()?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let stop = stop_flag().map_err(|e| format!("cannot handle signals: {e}"))?;

    let mut initial = idir.record().unwrap_or(SupervisorRecord {
        process: None,
        state: SupervisorState::Starting,
        phase: None,
        app_pid: None,
        restarts: 0,
        last_exit: None,
        message: None,
        generation: None,
        updated_at: String::new(),
    });
    initial.process = AppProcess::current();
    initial.state = SupervisorState::Starting;
    initial.phase = None;
    initial.app_pid = None;
    initial.message = None;
    let generation = initial.generation;
    let recorder = Arc::new(Recorder {
        path: idir.record_path(),
        record: Mutex::new(initial),
    });
    recorder.update(|_| {});

    let log = Arc::new(Mutex::new(
        LogWriter::open(&idir.logs(), spec.log_segment_bytes)
            .map_err(|e| format!("cannot open the log in {}: {e}", idir.logs().display()))?,
    ));
    let sink: LineSink = {
        let (log, recorder) = (log.clone(), recorder.clone());
        Arc::new(move |line: &str| {
            if let Ok(mut w) = log.lock() {
                let _ = w.write_line(line);
            }
            if let Some(phase) = phase_change(line) {
                recorder.update(|r| r.phase = Some(phase));
            }
        })
    };
    let output = {
        let sink = sink.clone();
        Output::with_sink("supervisor", move |l| sink(l))
    };
    output.event(
        "supervisor_started",
        &[
            ("instance", json!(spec.name)),
            ("pid", json!(std::process::id())),
            ("address", json!(spec.address)),
            ("command", json!(spec.command)),
            ("generation", json!(generation)),
        ],
    );
    write_tag_shim(&idir.tag_shim(), &exe)?;
    let instance = Instance::from_env();

    let supervisor = Supervisor {
        idir,
        spec,
        layout,
        doc,
        instance,
        exe,
        output,
        sink,
        recorder,
        stop,
    };
    let result = supervisor.run();
    if let Err(e) = &result {
        supervisor
            .output
            .event("supervisor_failed", &[("error", json!(e))]);
        supervisor.recorder.update(|r| {
            r.state = SupervisorState::Failed;
            r.message = Some(e.clone());
            r.phase = None;
            r.app_pid = None;
        });
    }
    result
}

/// The phase a sidecar event line moves to. ONLINE is taken from the
/// `online` event (which follows its `phase` event), so a record that says
/// online implies the log already holds the `online` event.
fn phase_change(line: &str) -> Option<Phase> {
    if !line.starts_with('{') {
        return None;
    }
    if line.contains("\"event\":\"online\"") || line.contains("\"event\":\"online_adopted\"") {
        return Some(Phase::Online);
    }
    if !line.contains("\"event\":\"phase\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let to: Phase = serde_json::from_value(v.get("to")?.clone()).ok()?;
    (to != Phase::Online).then_some(to)
}

/// `bin/keelson-tag tag STEP` runs this binary's internal `tag`, whatever
/// the binary is called (keelson-agent or keelson).
fn write_tag_shim(path: &Path, exe: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let quoted = exe.display().to_string().replace('\'', "'\\''");
    let script = format!("#!/bin/sh\nexec '{quoted}' {INTERNAL_SUBCOMMAND} tag \"$2\"\n");
    write_atomic(path, script.as_bytes())
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

struct Supervisor {
    idir: InstanceDir,
    spec: HostSpec,
    layout: Layout,
    doc: LifecycleDocument,
    instance: Instance,
    exe: PathBuf,
    output: Output,
    sink: LineSink,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
}

/// How one incarnation of the app ended.
enum Ended {
    /// It exited on its own.
    Exited(ExitStatus, Duration),
    /// A stop was requested while it ran.
    StopRequested(Child),
}

impl Supervisor {
    fn run(&self) -> Result<(), String> {
        self.stop_orphan();
        if self.doc.authorization.is_some() {
            // init "copies" the agent into bin/: a link to this binary.
            let link = self.layout.agent_binary();
            let _ = std::fs::create_dir_all(self.layout.root.join("bin"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&self.exe, &link)
                .map_err(|e| format!("cannot link {}: {e}", link.display()))?;
            roles::init(
                &self.layout,
                &self.doc,
                &self.instance,
                &link,
                None,
                &self.output.component("init"),
            )?;
        }
        let sidecar_stop = Arc::new(AtomicBool::new(false));
        let sidecar = {
            let config = SidecarConfig {
                layout: self.layout.clone(),
                doc: self.doc.clone(),
                instance: self.instance.clone(),
                listen: format!("{}:0", self.spec.address),
                checkurl_host: self.spec.address.clone(),
            };
            let (output, stop) = (self.output.component("sidecar"), sidecar_stop.clone());
            std::thread::Builder::new()
                .name("sidecar".into())
                .spawn(move || sidecar::run(config, output, stop))
                .map_err(|e| format!("cannot start the sidecar thread: {e}"))?
        };

        let (final_state, message) = self.run_app();
        // The app is gone: the sidecar goes offline if needed, revokes the
        // lease and ends.
        sidecar_stop.store(true, Ordering::SeqCst);
        sidecar.thread().unpark();
        let sidecar_result = sidecar
            .join()
            .unwrap_or_else(|_| Err("the sidecar thread panicked".into()));
        let message = match (message, sidecar_result) {
            (m, Ok(())) => m,
            (Some(m), Err(e)) => Some(format!("{m}; {e}")),
            (None, Err(e)) => Some(e),
        };
        self.recorder.update(|r| {
            r.state = final_state;
            r.phase = None;
            r.app_pid = None;
            r.message = message.clone();
        });
        self.output
            .event("supervisor_exited", &[("state", json!(final_state))]);
        Ok(())
    }

    /// An app left running by a supervisor that died (killed, OOM) has had
    /// nobody to restart or stop it: stop it (SIGTERM, then SIGKILL at the
    /// stop timeout) so that this supervisor's app starts clean, through
    /// preStart and checkurl, on a free port.
    fn stop_orphan(&self) {
        let Some(orphan) = read_json::<AppProcess>(&self.layout.app_record()) else {
            return;
        };
        if !orphan.is_running() {
            return;
        }
        self.output
            .event("orphan_found", &[("pid", json!(orphan.pid))]);
        signal_group(orphan.pid, rustix::process::Signal::TERM);
        let deadline =
            Instant::now() + Duration::from_secs(u64::from(self.doc.stop_timeout_seconds));
        while orphan.is_running() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if orphan.is_running() {
            crate::hooks::kill_group(orphan.pid);
            while orphan.is_running() && Instant::now() < deadline + Duration::from_secs(5) {
                std::thread::sleep(POLL);
            }
        }
        let _ = remove_if_present(&self.layout.healthcheck());
        self.output
            .event("orphan_stopped", &[("pid", json!(orphan.pid))]);
    }

    /// Runs incarnations of the app until a stop or the restart policy ends
    /// it; returns the final state.
    fn run_app(&self) -> (SupervisorState, Option<String>) {
        let policy = self.spec.restart;
        let mut in_a_row: u32 = 0;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                self.output.event("stop_requested", &[]);
                self.stop_sequence(None);
                return (SupervisorState::Stopped, None);
            }
            let child = match self.spawn_app() {
                Ok(c) => c,
                Err(e) => {
                    self.output
                        .event("app_spawn_failed", &[("error", json!(e))]);
                    return (SupervisorState::Failed, Some(e));
                }
            };
            let pid = child.id();
            self.recorder.update(|r| {
                r.state = SupervisorState::Running;
                r.app_pid = Some(pid);
            });
            let (status, uptime) = match self.wait_app(child) {
                Ended::StopRequested(child) => {
                    self.output.event("stop_requested", &[]);
                    self.stop_sequence(Some(child));
                    return (SupervisorState::Stopped, None);
                }
                Ended::Exited(status, uptime) => (status, uptime),
            };
            let record = ExitRecord {
                code: status.code(),
                signal: status.signal(),
                at: rfc3339_now(),
            };
            if uptime >= STABLE_AFTER {
                in_a_row = 0;
            }
            let restart = match policy.policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !status.success(),
                RestartPolicy::Never => false,
            };
            let exhausted = policy.max_restarts.is_some_and(|max| in_a_row >= max);
            self.output.event(
                "app_exit",
                &[
                    ("pid", json!(pid)),
                    ("code", json!(record.code)),
                    ("signal", json!(record.signal)),
                    ("uptime_ms", json!(uptime.as_millis() as u64)),
                    ("restart", json!(restart && !exhausted)),
                ],
            );
            self.recorder.update(|r| {
                r.last_exit = Some(record.clone());
                r.app_pid = None;
            });
            if !restart || exhausted {
                let why = if exhausted {
                    format!(
                        "the app exited ({}) and reached its limit of {} restarts",
                        describe(status),
                        in_a_row
                    )
                } else {
                    format!(
                        "the app exited ({}); restart policy {:?}",
                        describe(status),
                        policy.policy
                    )
                };
                let state = if status.success() && !exhausted {
                    SupervisorState::Exited
                } else {
                    SupervisorState::Failed
                };
                return (state, Some(why));
            }
            let backoff = Duration::from_millis(policy.backoff_ms)
                .saturating_mul(1 << in_a_row.min(5))
                .min(MAX_BACKOFF);
            in_a_row += 1;
            self.recorder.update(|r| {
                r.state = SupervisorState::Backoff;
                r.restarts += 1;
            });
            self.output.event(
                "restarting",
                &[
                    ("in_ms", json!(backoff.as_millis() as u64)),
                    ("attempt", json!(in_a_row)),
                ],
            );
            let until = Instant::now() + backoff;
            while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep(POLL);
            }
        }
    }

    /// Starts `exe __keelson-host entrypoint DIR` in the working directory,
    /// in its own process group, its output pumped into the log.
    fn spawn_app(&self) -> Result<Child, String> {
        std::fs::create_dir_all(&self.spec.working_dir).map_err(|e| {
            format!(
                "cannot create the working directory {}: {e}",
                self.spec.working_dir.display()
            )
        })?;
        let mut child = Command::new(&self.exe)
            .arg(INTERNAL_SUBCOMMAND)
            .arg("entrypoint")
            .arg(&self.idir.root)
            .current_dir(&self.spec.working_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        if let Some(out) = child.stdout.take() {
            let sink = self.sink.clone();
            std::thread::spawn(move || {
                // Until the entrypoint's `exec` event the lines are the
                // agent's own (events, [preStart] output); then the app's.
                let mut app = false;
                for_each_line(out, |line| {
                    if app {
                        sink(&format!("[stdout] {line}"));
                    } else {
                        app = line.starts_with('{')
                            && line.contains("\"component\":\"entrypoint\",\"event\":\"exec\"");
                        sink(line);
                    }
                });
            });
        }
        if let Some(err) = child.stderr.take() {
            let sink = self.sink.clone();
            std::thread::spawn(move || {
                for_each_line(err, |line| sink(&format!("[stderr] {line}")))
            });
        }
        Ok(child)
    }

    fn wait_app(&self, mut child: Child) -> Ended {
        let started = Instant::now();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ended::StopRequested(child);
            }
            match child.try_wait() {
                Ok(Some(status)) => return Ended::Exited(status, started.elapsed()),
                Ok(None) => std::thread::sleep(POLL),
                Err(_) => {
                    // Cannot happen for our own child; treat as gone.
                    let status = child
                        .wait()
                        .unwrap_or_else(|_| ExitStatus::from_raw(1 << 8));
                    return Ended::Exited(status, started.elapsed());
                }
            }
        }
    }

    /// offline --wait, then SIGTERM, wait, SIGKILL: the kubelet's order.
    fn stop_sequence(&self, child: Option<Child>) {
        self.recorder
            .update(|r| r.state = SupervisorState::Stopping);
        if let Err(e) = roles::offline(
            &self.layout,
            &self.doc,
            &self.instance,
            true,
            roles::default_offline_timeout(&self.doc),
            &self.output.component("offline"),
        ) {
            self.output.event("offline_failed", &[("error", json!(e))]);
        }
        let Some(mut child) = child else { return };
        let pid = child.id();
        signal_group(pid, rustix::process::Signal::TERM);
        self.output.event(
            "app_signaled",
            &[("pid", json!(pid)), ("signal", json!("SIGTERM"))],
        );
        let grace = Duration::from_secs(u64::from(self.doc.stop_timeout_seconds));
        let deadline = Instant::now() + grace;
        // Briefly: the next version starts only once this one is gone.
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                _ => break None,
            }
        };
        let status = match status {
            Some(s) => s,
            None => {
                self.output.event(
                    "app_killed",
                    &[("pid", json!(pid)), ("after_s", json!(grace.as_secs()))],
                );
                crate::hooks::kill_group(pid);
                child.wait().unwrap_or_else(|_| ExitStatus::from_raw(9))
            }
        };
        let record = ExitRecord {
            code: status.code(),
            signal: status.signal(),
            at: rfc3339_now(),
        };
        self.output.event(
            "app_stopped",
            &[
                ("pid", json!(pid)),
                ("code", json!(record.code)),
                ("signal", json!(record.signal)),
            ],
        );
        self.recorder.update(|r| {
            r.last_exit = Some(record);
            r.app_pid = None;
        });
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// Sends `signal` to the process group led by `pid`.
pub fn signal_group(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// The internal `entrypoint` role for hosts: the pod's entrypoint, with the
/// instance's layout and command, and preStart output forwarded through
/// the tag shim.
pub fn entrypoint(dir: &Path) -> Result<i32, String> {
    let idir = InstanceDir {
        root: dir.to_path_buf(),
    };
    let spec = idir
        .spec()
        .ok_or_else(|| format!("no valid {}", idir.spec_path().display()))?;
    let layout = idir.layout(&spec);
    let doc = layout.load_document()?;
    let stop = stop_flag().map_err(|e| format!("cannot handle signals: {e}"))?;
    let output = Output::stdout("entrypoint");
    let error = roles::entrypoint(
        &layout,
        &doc,
        &Instance::from_env(),
        &spec.command,
        &output,
        stop,
        Some(&idir.tag_shim()),
    );
    output.event("not_started", &[("error", json!(error.to_string()))]);
    eprintln!("keelson-agent: {error}");
    Ok(error.exit_code().clamp(1, 255))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_says_online_only_with_the_online_event() {
        let phase = |to: &str| {
            format!(r#"{{"ts":"t","component":"sidecar","event":"phase","from":"x","to":"{to}"}}"#)
        };
        assert_eq!(
            phase_change(&phase("checking_url")),
            Some(Phase::CheckingUrl)
        );
        assert_eq!(phase_change(&phase("online")), None);
        assert_eq!(
            phase_change(r#"{"ts":"t","component":"sidecar","event":"online","healthcheck":"h"}"#),
            Some(Phase::Online)
        );
        assert_eq!(phase_change(r#"[stdout] {"event":"online"}"#), None);
        assert_eq!(
            phase_change(
                r#"{"ts":"t","component":"sidecar","event":"hook_started","run":"echo \"event\":\"online\""}"#
            ),
            None
        );
    }
}
