//! The vocabulary between the release machine and a runtime: what the
//! machine asks for ([`Action`]), and what comes back ([`Event`]).
//!
//! Every action is plain data with a [`StepId`] that names it uniquely
//! within a release (phase, batch, stage, target, attempt), so the engine can
//! journal it and tell, after a restart, whether it was already applied.
//! Every command is idempotent: applying it twice has the effect of applying
//! it once (`ScaleTrack` sets a count, `TakeOffline` sets a flag, `Recreate`
//! names the attempt it makes). Events come back as data too; the clock is
//! an input ([`Timestamp`]), never read.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A point in time, in milliseconds since the Unix epoch. The engine passes
/// it in with every event; the machine never reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// This time plus `millis` milliseconds (saturating).
    pub fn plus_millis(self, millis: u64) -> Self {
        Self(self.0.saturating_add(millis))
    }
}

/// The version an instance runs (an image tag, a build id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(pub String);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Version {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// One instance: on hosts `<slot>@<track>` (stable across replacements of
/// that slot), on Kubernetes a pod's name. Positions that the machine tracks
/// before it knows their pod are named `<track>#<n>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(pub String);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for InstanceId {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// One of the two tracks of an app in an environment: the Deployments
/// `<app>-blue` and `<app>-green` on Kubernetes, the two process slots per
/// host slot on hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Track {
    /// `<app>-blue`.
    Blue,
    /// `<app>-green`.
    Green,
}

impl Track {
    /// The other track.
    pub fn other(self) -> Self {
        match self {
            Self::Blue => Self::Green,
            Self::Green => Self::Blue,
        }
    }

    /// `blue` or `green`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blue => "blue",
            Self::Green => "green",
        }
    }
}

impl fmt::Display for Track {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which part of a release an action belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Moving to the new version.
    Forward,
    /// Moving back to the previous version.
    Rollback,
    /// Clearing up after an abort.
    Abort,
}

impl Phase {
    /// The phase's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Rollback => "rollback",
            Self::Abort => "abort",
        }
    }
}

/// The stable name of one action: the same decision always yields the same
/// id, and no two different actions of a release share one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StepId {
    /// The release.
    pub release: String,
    /// Forward, rollback or abort.
    pub phase: Phase,
    /// Batch index (0-based).
    pub batch: u32,
    /// Stage index within the batch.
    pub stage: u32,
    /// What the action works on: an instance, a track, or the step's kind.
    pub target: String,
    /// 1 for the first try; a recreate counts up.
    pub attempt: u32,
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/b{}/s{}/{}/a{}",
            self.release,
            self.phase.as_str(),
            self.batch,
            self.stage,
            self.target,
            self.attempt
        )
    }
}

/// Which instances a traffic command applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Instances {
    /// These instances (hosts, or pods by name).
    Listed(Vec<InstanceId>),
    /// Every instance of `track` running `version`, present and future
    /// (on Kubernetes: patch the traffic label of those pods).
    Track {
        /// The track.
        track: Track,
        /// Only instances of this version.
        version: Version,
    },
}

/// How a release ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every instance runs the new version.
    Succeeded,
    /// Stopped by a failed instance or a failed action.
    Failed,
    /// Stopped by a user.
    Aborted,
    /// Back on the previous version.
    RolledBack,
}

/// A command for a runtime. All are idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Command {
    /// Take instances out of traffic and keep them out (drain included):
    /// an instance held offline does not go ONLINE again, even if it
    /// restarts, until [`Command::BringOnline`] or until a command starts
    /// it anew (`StopAndReplace`, `StartNew`, `Recreate`, or on Kubernetes a
    /// `ScaleTrack`/`RollTrack` of that track and version).
    TakeOffline {
        /// Which instances.
        instances: Instances,
    },
    /// Release the offline hold; the instance goes ONLINE once its checkurl
    /// and preOnline pass.
    BringOnline {
        /// Which instances.
        instances: Instances,
    },
    /// Hosts: stop the instance and start `version` in its place.
    StopAndReplace {
        /// The instance.
        instance: InstanceId,
        /// The version to start.
        version: Version,
        /// Tags the new process; its events carry it back.
        generation: u64,
    },
    /// Hosts: start `version` as a new instance (the idle track of a slot).
    StartNew {
        /// The instance to create.
        instance: InstanceId,
        /// The version to start.
        version: Version,
        /// Tags the new process; its events carry it back.
        generation: u64,
    },
    /// Hosts: stop instances for good (the old track after dual-deployment).
    Stop {
        /// The instances.
        instances: Vec<InstanceId>,
    },
    /// A failed instance gets a fresh start with the same version: on hosts
    /// the slot is restarted, on Kubernetes the pod is deleted so that its
    /// ReplicaSet creates a new one.
    Recreate {
        /// The instance (a pod's name on Kubernetes).
        instance: InstanceId,
        /// The version it should run.
        version: Version,
        /// Hosts: tags the new process; its events carry it back.
        generation: u64,
    },
    /// Kubernetes: render `track` with `version` and set its replicas
    /// (through the scale subresource).
    ScaleTrack {
        /// The track.
        track: Track,
        /// The version its pod template carries.
        version: Version,
        /// The replica count to set.
        replicas: u32,
    },
    /// Kubernetes: update `track` to `version` with the Deployment's own
    /// rolling update (`maxSurge: 0`, `maxUnavailable`), unpausing it.
    RollTrack {
        /// The track.
        track: Track,
        /// The new version.
        version: Version,
        /// Replicas at the end.
        replicas: u32,
        /// Instances that may be down at once.
        max_unavailable: u32,
    },
    /// Kubernetes: pause the track's rollout (`spec.paused: true`).
    PauseRollout {
        /// The track.
        track: Track,
    },
    /// Kubernetes: resume the track's rollout.
    ResumeRollout {
        /// The track.
        track: Track,
    },
    /// Nothing to apply: the machine waits for these instances until
    /// `deadline`; the engine should deliver a [`Event::Tick`] then.
    WaitOnline {
        /// What is awaited, for display.
        awaiting: String,
        /// When the batch counts as stuck.
        deadline: Timestamp,
    },
    /// Nothing to apply: the release pauses until `until`; the engine
    /// should deliver a [`Event::Tick`] then.
    PauseUntil {
        /// When the pause ends.
        until: Timestamp,
    },
    /// Nothing to apply: the release waits for a user to resume it.
    AwaitResume,
    /// The release has ended.
    Finish {
        /// How.
        outcome: Outcome,
    },
}

impl Command {
    /// Whether the machine waits for a [`Event::Done`] before going on.
    /// Waits, pauses and the finish notice are informational.
    pub fn needs_completion(&self) -> bool {
        !matches!(
            self,
            Self::WaitOnline { .. }
                | Self::PauseUntil { .. }
                | Self::AwaitResume
                | Self::Finish { .. }
        )
    }
}

/// A named command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// The step's stable id.
    pub id: StepId,
    /// What to do.
    pub command: Command,
}

/// What an instance did, as a runtime observed it (pushed by a watch or an
/// agent's stream where the runtime can push).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum InstanceChange {
    /// It passed its checkurl and preOnline and takes traffic.
    Online,
    /// It left traffic but runs.
    Offline,
    /// It failed to start or come online (crash loop, image pull, hook).
    Failed {
        /// Why, as the runtime saw it.
        error: String,
    },
    /// Its process exited.
    Exited {
        /// The exit code, if any.
        code: Option<i32>,
    },
    /// It no longer exists (a pod deleted or scaled away).
    Gone,
}

/// One observation about one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceEvent {
    /// The instance (a host instance id or a pod name).
    pub instance: InstanceId,
    /// Its track.
    pub track: Track,
    /// The version it runs.
    pub version: Version,
    /// Hosts: the `generation` of the command that started this process
    /// (`None` for a process started before the release), so that late
    /// news about a process since replaced, recreated or stopped is
    /// recognised. Kubernetes names every pod anew and leaves it `None`.
    pub generation: Option<u64>,
    /// What happened.
    pub change: InstanceChange,
}

/// Everything that can move a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Event {
    /// Begin a pending release.
    Start,
    /// A runtime observation.
    Instance(InstanceEvent),
    /// The engine applied this action.
    Done {
        /// The action's id.
        step: StepId,
    },
    /// The engine gave up on this action.
    ActionFailed {
        /// The action's id.
        step: StepId,
        /// Why.
        error: String,
    },
    /// Time passed (deadlines and pauses are checked against the input's
    /// time).
    Tick,
    /// A user pauses the release.
    Pause,
    /// A user resumes it.
    Resume,
    /// A user aborts it.
    Abort {
        /// Leave the new instances that are online in traffic.
        keep_online: bool,
    },
    /// A user rolls it back to the previous version.
    Rollback,
}

/// An event at a time: the machine's only input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// The engine's clock when the event is applied.
    pub now: Timestamp,
    /// The event.
    pub event: Event,
}
