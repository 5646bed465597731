//! One instance's directory on the host: the pod's shared volume layout
//! (see [`crate::layout`]) plus what the host side adds.
//!
//! ```text
//! {state}/instances/{name}/
//!   config/lifecycle.json   the LifecycleDocument, as in a pod
//!   spec.json               the host-side spec: command, env, working dir, restart, address
//!   desired                 `running` | `stopped`: what the daemon wants
//!   supervisor.json         the supervisor's record (pid, state, phase, restarts)
//!   app/                    the working directory (default), the artifact unpacked
//!   bin/keelson-tag         forwards preStart output (see HookRunner::with_forwarder)
//!   run/                    healthcheck.html, app.json, lease.json, offline.* (as in a pod)
//!   logs/                   the instance's log segments
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::api::{Artifact, Desired, ExitRecord, InstanceView, Restart, SupervisorState};
use crate::layout::{Layout, read_json};
use crate::process::AppProcess;
use crate::sidecar::Phase;

/// The host-side spec the supervisor runs from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSpec {
    /// The instance's name.
    pub name: String,
    /// A unique id of this deployment (the pod UID's counterpart).
    pub uid: String,
    /// The host's name.
    pub host: String,
    /// The address the instance binds on and is checked at.
    pub address: String,
    /// The command.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// The working directory (absolute).
    pub working_dir: PathBuf,
    /// The hooks directory (absolute).
    pub hooks_dir: PathBuf,
    /// The restart policy.
    pub restart: Restart,
    /// Log segment size.
    pub log_segment_bytes: u64,
    /// What was deployed.
    pub artifact: Option<Artifact>,
    /// The deployed version.
    #[serde(default)]
    pub version: Option<String>,
    /// When.
    pub deployed_at: String,
}

/// The supervisor's record, rewritten atomically on every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorRecord {
    /// The supervisor process.
    pub process: Option<AppProcess>,
    /// Its state.
    pub state: SupervisorState,
    /// The sidecar's phase.
    pub phase: Option<Phase>,
    /// The app's pid.
    pub app_pid: Option<u32>,
    /// Restarts since start.
    pub restarts: u32,
    /// The last exit.
    pub last_exit: Option<ExitRecord>,
    /// Why it failed.
    pub message: Option<String>,
    /// The generation of the start command (see `StartRequest`).
    #[serde(default)]
    pub generation: Option<u64>,
    /// When the record changed.
    pub updated_at: String,
}

/// Paths of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDir {
    /// `{state}/instances/{name}`.
    pub root: PathBuf,
}

impl InstanceDir {
    /// The directory of `name` under the daemon's state directory.
    pub fn new(state_dir: &Path, name: &str) -> Self {
        InstanceDir {
            root: state_dir.join("instances").join(name),
        }
    }

    /// The spec.
    pub fn spec_path(&self) -> PathBuf {
        self.root.join("spec.json")
    }

    /// The desired state.
    pub fn desired_path(&self) -> PathBuf {
        self.root.join("desired")
    }

    /// The supervisor's record.
    pub fn record_path(&self) -> PathBuf {
        self.root.join("supervisor.json")
    }

    /// The log directory.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The default working directory.
    pub fn default_working_dir(&self) -> PathBuf {
        self.root.join("app")
    }

    /// The preStart output forwarder.
    pub fn tag_shim(&self) -> PathBuf {
        self.root.join("bin").join("keelson-tag")
    }

    /// The spec, if deployed.
    pub fn spec(&self) -> Option<HostSpec> {
        read_json(&self.spec_path())
    }

    /// The lifecycle layout: the pod's, rooted here, hooks from the spec.
    pub fn layout(&self, spec: &HostSpec) -> Layout {
        let mut layout = Layout::under(&self.root);
        layout.hooks = spec.hooks_dir.clone();
        layout
    }

    /// What the daemon wants.
    pub fn desired(&self) -> Desired {
        match std::fs::read_to_string(self.desired_path()) {
            Ok(s) if s.trim() == "running" => Desired::Running,
            _ => Desired::Stopped,
        }
    }

    /// Records what the daemon wants.
    pub fn set_desired(&self, desired: Desired) -> std::io::Result<()> {
        let text = match desired {
            Desired::Running => "running\n",
            Desired::Stopped => "stopped\n",
        };
        crate::layout::write_atomic(&self.desired_path(), text.as_bytes())
    }

    /// The traffic label file the sidecar follows (a pod's downwardAPI labels).
    pub fn labels_path(&self) -> PathBuf {
        self.root.join("podinfo").join("labels")
    }

    /// Whether the instance is held out of traffic.
    pub fn held(&self) -> bool {
        std::fs::read_to_string(self.labels_path())
            .is_ok_and(|t| crate::labels::traffic_off(&crate::labels::parse_labels(&t)))
    }

    /// Holds the instance out of traffic, or releases the hold.
    pub fn set_held(&self, held: bool) -> std::io::Result<()> {
        if held {
            let line = format!("{}=\"offline\"\n", crate::labels::TRAFFIC_LABEL);
            crate::layout::write_atomic(&self.labels_path(), line.as_bytes())
        } else {
            crate::layout::remove_if_present(&self.labels_path()).map(|_| ())
        }
    }

    /// The supervisor's record.
    pub fn record(&self) -> Option<SupervisorRecord> {
        read_json(&self.record_path())
    }

    /// The supervisor process, while it runs.
    pub fn live_supervisor(&self) -> Option<AppProcess> {
        self.record()
            .and_then(|r| r.process)
            .filter(AppProcess::is_running)
    }

    /// The instance as the API reports it.
    pub fn view(&self, spec: &HostSpec, app: &str, env: &str) -> InstanceView {
        let record = self.record();
        let live = record
            .as_ref()
            .and_then(|r| r.process)
            .filter(AppProcess::is_running);
        let (state, phase, app_pid) = match (&record, live) {
            (None, _) => (SupervisorState::Stopped, None, None),
            (Some(r), Some(_)) => (r.state, r.phase, r.app_pid),
            (Some(r), None) if r.state.is_final() => (r.state, None, None),
            (Some(_), None) => (SupervisorState::Lost, None, None),
        };
        let layout = self.layout(spec);
        InstanceView {
            name: spec.name.clone(),
            app: app.to_string(),
            env: env.to_string(),
            address: spec.address.clone(),
            desired: self.desired(),
            state,
            phase,
            online: live.is_some() && layout.healthcheck().exists(),
            held: self.held(),
            generation: record.as_ref().and_then(|r| r.generation),
            supervisor_pid: live.map(|p| p.pid),
            app_pid,
            restarts: record.as_ref().map_or(0, |r| r.restarts),
            last_exit: record.as_ref().and_then(|r| r.last_exit.clone()),
            message: record.as_ref().and_then(|r| r.message.clone()),
            deployed_at: spec.deployed_at.clone(),
            artifact: spec.artifact.clone(),
            version: spec.version.clone(),
            log_offset: super::log::end_offset(&self.logs()),
        }
    }
}

/// Kills every process of every instance under `state_dir` with SIGKILL:
/// each supervisor's whole session (the supervisor, its app, the app's
/// children, hooks), including processes that were starting while the
/// search ran. For tearing a host runtime down without its lifecycle
/// (tests, a machine being wiped); returns how many processes were killed.
/// Never touches the caller's own session.
pub fn kill_all(state_dir: &Path, timeout: std::time::Duration) -> usize {
    let instances = state_dir.join("instances");
    let marker = instances.display().to_string();
    // From /proc rather than getsid(2): inside a PID namespace whose session
    // leader lives outside it, the session id reads as 0.
    let own_session =
        read_process(Path::new("/proc/self"), std::process::id() as i32).map_or(0, |p| p.session);
    let deadline = std::time::Instant::now() + timeout;
    let mut sessions = std::collections::HashSet::new();
    let mut killed = 0;
    loop {
        for entry in std::fs::read_dir(&instances)
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = InstanceDir { root: entry.path() };
            // A dead supervisor's session lives on while its app does, and
            // its id cannot be reused meanwhile; a live process with that pid
            // but another start time is someone else.
            if let Some(p) = dir.record().and_then(|r| r.process)
                && (p.is_running() || !Path::new(&format!("/proc/{}", p.pid)).exists())
            {
                sessions.insert(p.pid as i32);
            }
        }
        let procs = list_processes();
        for p in &procs {
            if p.cmdline.contains(&marker) {
                sessions.insert(p.session);
            }
        }
        sessions.remove(&own_session);
        // 0 is "a session outside this PID namespace": never ours to kill.
        sessions.remove(&0);
        let mut found = false;
        for p in procs
            .iter()
            .filter(|p| sessions.contains(&p.session) && p.state != 'Z')
        {
            if let Some(pid) = rustix::process::Pid::from_raw(p.pid) {
                if p.pid as u32 == std::process::id() {
                    continue;
                }
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                found = true;
                killed += 1;
            }
        }
        if !found || std::time::Instant::now() >= deadline {
            return killed;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

struct ProcessEntry {
    pid: i32,
    state: char,
    session: i32,
    cmdline: String,
}

fn list_processes() -> Vec<ProcessEntry> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            read_process(&entry.path(), pid)
        })
        .collect()
}

/// One process's state, session and command line from its `/proc` directory.
fn read_process(dir: &Path, pid: i32) -> Option<ProcessEntry> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let session = fields.get(3)?.parse().ok()?;
    let cmdline = std::fs::read(dir.join("cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    Some(ProcessEntry {
        pid,
        state,
        session,
        cmdline,
    })
}
