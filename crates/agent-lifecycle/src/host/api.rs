//! The host daemon's HTTP API: request and response bodies, shared by the
//! daemon and by keelson's control side (`keelson-hosts`).
//!
//! ```text
//! GET    /v1/host                              HostInfo
//! GET    /v1/instances                         [InstanceView]
//! PUT    /v1/instances/{name}                  DeployRequest → InstanceView   (instance must be stopped)
//! GET    /v1/instances/{name}                  InstanceView
//! POST   /v1/instances/{name}/start            StartRequest (optional) → InstanceView (at once; follow events for ONLINE)
//! POST   /v1/instances/{name}/stop             InstanceView (when the offline sequence and the stop are done)
//! POST   /v1/instances/{name}/restart          stop, then start (StartRequest body optional)
//! POST   /v1/instances/{name}/offline          hold it out of traffic (drain included), app keeps running
//! POST   /v1/instances/{name}/online           release the hold: ONLINE again after checkurl + preOnline
//! DELETE /v1/instances/{name}                  204 (instance must be stopped)
//! GET    /v1/instances/{name}/logs?offset=N&follow=true&only=events
//!                                              text/event-stream: `id: <next offset>` + `data: <line>`
//! POST   /v1/events                            EventsRequest → every instance's events as one stream:
//!                                              `id: <instance>:<next offset>` + `data: <event>`
//! ```
//!
//! Every call needs `Authorization: Bearer <host token>`. Errors are
//! `{"error": {"code", "message", "field"}}`.

use std::collections::BTreeMap;

use keelson_core::lifecycle::LifecycleDocument;
use serde::{Deserialize, Serialize};

use crate::sidecar::Phase;

/// Path prefix of every API route.
pub const API_PREFIX: &str = "/v1";

/// Where the instance's files come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Artifact {
    /// A directory, a single file, or a `.tar`/`.tar.gz`/`.tgz` archive on the
    /// host, under one of the daemon's artifact roots.
    Path(String),
    /// An `http://` URL starting with one of the daemon's allowed prefixes.
    Url(String),
}

/// When the supervisor restarts an app that exited on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Always, whatever the exit status.
    Always,
    /// Only after a non-zero exit or a signal.
    #[default]
    OnFailure,
    /// Never: an exit ends the instance.
    Never,
}

/// The restart policy and its backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    /// When to restart.
    #[serde(default)]
    pub policy: RestartPolicy,
    /// Give up after this many restarts in a row (no limit when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
    /// First backoff; it doubles up to 30 s and resets after 60 s of uptime.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
}

fn default_backoff_ms() -> u64 {
    1000
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            policy: RestartPolicy::default(),
            max_restarts: None,
            backoff_ms: default_backoff_ms(),
        }
    }
}

/// `PUT /v1/instances/{name}`: everything one instance needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// The same lifecycle document a pod gets (checkurl, hooks, drain, …).
    /// On hosts, `authorization.tokenPath` is replaced by the host token.
    pub lifecycle: LifecycleDocument,
    /// The version being deployed, as the release knows it (shown in views).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The app's files; none when the command is already on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    /// The app's command; a relative program runs from the working directory.
    pub command: Vec<String>,
    /// Extra environment for the app and its hooks.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The working directory (absolute) [default: the instance's `app/`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Hooks directory relative to the working directory [default: `hooks`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks_dir: Option<String>,
    /// The restart policy.
    #[serde(default)]
    pub restart: Restart,
    /// Size at which the instance's log rotates [default: 8 MiB].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_segment_bytes: Option<u64>,
    /// Start the instance right after deploying it.
    #[serde(default)]
    pub start: bool,
    /// With `start`: tags the started process (see [`StartRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// `POST …/start` and `…/restart` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Tags the started process: the release engine's generation of the
    /// command, carried back in the instance's view and its
    /// `supervisor_started` event, so late news about a replaced process is
    /// recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// Where a host-wide event stream starts for instances its cursor does not
/// name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamStart {
    /// At the beginning of their logs.
    #[default]
    Beginning,
    /// At the end of their logs (what happens from now on). Instances that
    /// appear later are always read from their beginning.
    End,
}

/// `POST /v1/events`: the lifecycle events of every instance of the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    /// Where to resume, per instance: the offsets from the stream's ids.
    #[serde(default)]
    pub from: BTreeMap<String, u64>,
    /// Where instances not in `from` start.
    #[serde(default)]
    pub start: StreamStart,
    /// Keep the stream open and send events as they are written.
    #[serde(default)]
    pub follow: bool,
}

/// What the daemon wants an instance to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    /// Running under its supervisor.
    Running,
    /// Stopped.
    Stopped,
}

/// What the instance's supervisor is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SupervisorState {
    /// Obtaining grants, about to start the app.
    Starting,
    /// The app process runs.
    Running,
    /// The app exited; waiting before a restart.
    Backoff,
    /// Taking the instance offline and stopping the app.
    Stopping,
    /// Stopped on request.
    Stopped,
    /// The app exited and the policy says not to restart it.
    Exited,
    /// The instance could not be started or kept running.
    Failed,
    /// The record says running, but the supervisor process is gone.
    Lost,
}

impl SupervisorState {
    /// Whether a supervisor in this state has finished for good.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SupervisorState::Stopped | SupervisorState::Exited | SupervisorState::Failed
        )
    }
}

/// How the app's last incarnation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal, when one killed it.
    pub signal: Option<i32>,
    /// When.
    pub at: String,
}

/// One instance as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    /// Its name on this host.
    pub name: String,
    /// The app.
    pub app: String,
    /// The environment.
    pub env: String,
    /// The address its ports are bound on.
    pub address: String,
    /// What the daemon wants.
    pub desired: Desired,
    /// What the supervisor does (`stopped` when none ever ran).
    pub state: SupervisorState,
    /// The lifecycle phase (from the sidecar), while a supervisor runs.
    pub phase: Option<Phase>,
    /// Whether healthcheck.html exists: the instance takes traffic.
    pub online: bool,
    /// Held out of traffic (`…/offline`) until `…/online` or a new start.
    pub held: bool,
    /// The generation of the start command of the current supervisor.
    pub generation: Option<u64>,
    /// The supervisor's pid, while it runs.
    pub supervisor_pid: Option<u32>,
    /// The app's pid, while it runs.
    pub app_pid: Option<u32>,
    /// App restarts by the supervisor since the instance was started.
    pub restarts: u32,
    /// How the app last ended.
    pub last_exit: Option<ExitRecord>,
    /// Why the supervisor failed, when it did.
    pub message: Option<String>,
    /// When the current version was deployed.
    pub deployed_at: String,
    /// What was deployed.
    pub artifact: Option<Artifact>,
    /// The deployed version, when the deploy named one.
    pub version: Option<String>,
    /// The end of the instance's log (the offset a follower resumes from).
    pub log_offset: u64,
}

/// `GET /v1/host`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The host's name.
    pub name: String,
    /// The daemon's version.
    pub version: String,
    /// The address instances bind on.
    pub instance_address: String,
    /// When this daemon process started.
    pub started_at: String,
    /// How many instances it knows.
    pub instances: usize,
    /// How many of them run.
    pub running: usize,
}

/// The error body: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// One error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable code (`not_found`, `unauthorized`, `invalid_artifact`, …).
    pub code: String,
    /// What went wrong and what would be valid.
    pub message: String,
    /// The request field at fault, as a path (`artifact.path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Whether `name` may name an instance: 1–63 of `[a-z0-9._-]`, starting
/// with a letter or digit.
pub fn valid_instance_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}
