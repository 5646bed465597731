//! The release state machine: [`step`] takes a [`Release`] and one
//! [`Input`] and returns the next release and the [`Action`]s to apply.
//! It is pure and deterministic: the same release and input always give the
//! same output, and a completion or observation that was already applied
//! changes nothing (so an engine that replays its journal after a restart
//! cannot duplicate an effect).
//!
//! Every stage waits for its actions' [`Event::Done`]; a WaitOnline stage
//! also waits until its instances are ONLINE, applying the failed-instance
//! policy to every failure and counting a stage that makes no progress for
//! the progress deadline as failed. Abort and rollback first let the actions
//! in flight finish (each is one idempotent step), then act on the fleet as
//! it then is.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::action::{
    Action, Command, Event, Input, InstanceChange, InstanceEvent, InstanceId, Instances, Outcome,
    Phase, StepId, Timestamp, Track, Version,
};
use super::plan::{
    Awaited, Fleet, HostInstance, InstanceState, PlanError, PodState, ReleasePlan, ReleaseSettings,
    Stage, deadline_after, plan,
};
use super::policy::{InstanceOutcome, OutcomeState, PolicyDecision, decide};
use crate::profile::{Pause, Strategy};

/// A position in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Batch index.
    pub batch: u32,
    /// Stage index in the batch (equal to the stage count once all are done).
    pub stage: u32,
    /// Whether the stage's actions were issued.
    pub entered: bool,
}

impl Cursor {
    fn at_batch(batch: u32) -> Self {
        Self {
            batch,
            stage: 0,
            entered: false,
        }
    }
}

/// Why a release is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PauseReason {
    /// The profile's `pause: manual` between two batches.
    BetweenBatches,
    /// A user paused it.
    User,
}

/// Where a release stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Status {
    /// Created, not started.
    Pending,
    /// Working on a batch.
    Running {
        /// Where.
        at: Cursor,
    },
    /// An automatic pause between batches.
    Pausing {
        /// The batch that comes next.
        next: u32,
        /// When.
        until: Timestamp,
    },
    /// Waiting for a user to resume.
    Paused {
        /// Where it goes on.
        at: Cursor,
        /// Why it waits.
        reason: PauseReason,
    },
    /// Aborting: letting actions in flight finish, then clearing up.
    Aborting {
        /// New instances stay in traffic.
        keep_online: bool,
        /// Where the release was.
        at: Option<Cursor>,
        /// Whether the clearing-up actions were issued.
        planned: bool,
    },
    /// Letting actions in flight finish before planning the way back.
    RollingBack,
    /// Done: every instance runs the new version.
    Succeeded,
    /// Stopped by a failure; instances stay as they are.
    Failed {
        /// What failed.
        reason: String,
    },
    /// Stopped by a user.
    Aborted {
        /// Whether new instances were left in traffic.
        keep_online: bool,
    },
    /// Back on the previous version.
    RolledBack,
}

impl Status {
    /// Whether the release has ended (a failed or aborted one can still be
    /// rolled back).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed { .. } | Self::Aborted { .. } | Self::RolledBack
        )
    }

    /// A one-word label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running { .. } => "running",
            Self::Pausing { .. } => "pausing",
            Self::Paused { .. } => "paused",
            Self::Aborting { .. } => "aborting",
            Self::RollingBack => "rolling-back",
            Self::Succeeded => "succeeded",
            Self::Failed { .. } => "failed",
            Self::Aborted { .. } => "aborted",
            Self::RolledBack => "rolled-back",
        }
    }
}

/// A release: everything needed to resume it, stored as one JSON document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// The release's id (prefix of every step id).
    pub id: String,
    /// The version running before.
    pub from: Version,
    /// The version released.
    pub to: Version,
    /// Instances at the end.
    pub desired: u32,
    /// The parameters.
    pub settings: ReleaseSettings,
    /// Forward, or rolling back.
    pub phase: Phase,
    /// The plan of the current phase.
    pub plan: ReleasePlan,
    /// Where it stands.
    pub status: Status,
    /// The instances as last known.
    pub fleet: Fleet,
    /// One record per new instance of the current phase.
    pub outcomes: Vec<InstanceOutcome>,
    /// Actions issued and not yet confirmed, in issue order. After a
    /// restart the engine applies them again (each is idempotent).
    pub pending: Vec<Action>,
    /// When the current WaitOnline stage counts as stuck.
    pub deadline: Option<Timestamp>,
    /// Kubernetes: pods deleted by a recreate; later news of them is stale.
    pub retired: BTreeSet<InstanceId>,
    /// The last generation given to a started process.
    #[serde(default)]
    pub generations: u64,
}

/// What one input did.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The release after the input.
    pub release: Release,
    /// What to apply, in order (those needing completion are also in
    /// `release.pending`).
    pub actions: Vec<Action>,
    /// Set when a user's request does not apply in this state (the release
    /// is unchanged); the API answers 409 with it.
    pub rejected: Option<String>,
}

impl Release {
    /// A pending release of `to` over `fleet`.
    pub fn new(
        id: impl Into<String>,
        from: Version,
        to: Version,
        desired: u32,
        fleet: Fleet,
        settings: ReleaseSettings,
    ) -> Result<Self, PlanError> {
        let plan = plan(&fleet, desired, &to, &settings)?;
        // Generations go on from the processes earlier releases started,
        // so that news of this release's starts is never taken for news
        // of an older process (nor an older start for this one's).
        let generations = match &fleet {
            Fleet::Hosts { instances } => instances.iter().filter_map(|i| i.generation).max(),
            Fleet::Kubernetes { .. } => None,
        }
        .unwrap_or(0);
        Ok(Self {
            id: id.into(),
            from,
            to,
            desired,
            settings,
            phase: Phase::Forward,
            outcomes: records(&plan),
            plan,
            status: Status::Pending,
            fleet,
            pending: Vec::new(),
            deadline: None,
            retired: BTreeSet::new(),
            generations,
        })
    }

    fn step_id(&self, phase: Phase, batch: u32, stage: u32, target: &str, attempt: u32) -> StepId {
        StepId {
            release: self.id.clone(),
            phase,
            batch,
            stage,
            target: target.to_string(),
            attempt,
        }
    }

    fn issue(&mut self, id: StepId, command: Command, out: &mut Vec<Action>) {
        let action = Action { id, command };
        if action.command.needs_completion() {
            self.pending.push(action.clone());
        }
        out.push(action);
    }

    fn next_generation(&mut self) -> u64 {
        self.generations += 1;
        self.generations
    }

    fn tolerated(&self) -> u32 {
        self.outcomes
            .iter()
            .filter(|o| o.state == OutcomeState::Tolerated)
            .count() as u32
    }
}

fn records(plan: &ReleasePlan) -> Vec<InstanceOutcome> {
    plan.batches
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| {
            batch
                .instances
                .iter()
                .map(move |i| InstanceOutcome::waiting(i.clone(), b as u32))
        })
        .collect()
}

/// Applies one input to a release.
pub fn step(release: &Release, input: &Input) -> Transition {
    let mut r = release.clone();
    match r.apply(input) {
        Ok(actions) => Transition {
            release: r,
            actions,
            rejected: None,
        },
        Err(why) => Transition {
            release: release.clone(),
            actions: Vec::new(),
            rejected: Some(why),
        },
    }
}

impl Release {
    /// [`step`] in place, for an engine that keeps the release in memory
    /// (a clone per event costs more than the step itself for thousands of
    /// instances). Returns the actions, or why a user's request does not
    /// apply; then the release is unchanged.
    pub fn apply(&mut self, input: &Input) -> Result<Vec<Action>, String> {
        apply_input(self, input)
    }
}

fn apply_input(r: &mut Release, input: &Input) -> Result<Vec<Action>, String> {
    let mut out = Vec::new();
    let now = input.now;
    let reject = Err::<Vec<Action>, String>;
    match &input.event {
        Event::Start => {
            if r.status == Status::Pending {
                r.status = Status::Running {
                    at: Cursor::at_batch(0),
                };
            }
        }
        Event::Instance(event) => observe(r, event, now),
        Event::Done { step } => {
            if let Some(i) = r.pending.iter().position(|a| a.id == *step) {
                let action = r.pending.remove(i);
                apply_done(r, &action.command);
            }
        }
        Event::ActionFailed { step, error } => {
            if let Some(i) = r.pending.iter().position(|a| a.id == *step) {
                r.pending.remove(i);
                if matches!(
                    r.status,
                    Status::Running { .. } | Status::Paused { .. } | Status::Pausing { .. }
                ) {
                    fail(r, format!("step {step} failed: {error}"), &mut out);
                }
            }
        }
        Event::Tick => {}
        Event::Pause => match r.status {
            Status::Running { at } => {
                r.status = Status::Paused {
                    at,
                    reason: PauseReason::User,
                }
            }
            Status::Pausing { next, .. } => {
                r.status = Status::Paused {
                    at: Cursor::at_batch(next),
                    reason: PauseReason::User,
                }
            }
            ref s => return reject(format!("a {} release cannot be paused", s.label())),
        },
        Event::Resume => match r.status {
            Status::Paused { at, .. } => {
                r.status = Status::Running { at };
                if at.entered && r.deadline.is_some() {
                    r.deadline = Some(deadline_after(now, &r.settings));
                }
            }
            ref s => return reject(format!("a {} release cannot be resumed", s.label())),
        },
        Event::Abort { keep_online } => {
            // Aborting a rollback stops it where it is; the instances it
            // brought back run the previous version and stay in traffic.
            let keep_online = *keep_online || r.phase == Phase::Rollback;
            let at = match r.status {
                Status::Pending => {
                    finish(r, Status::Aborted { keep_online }, &mut out);
                    return Ok(out);
                }
                Status::Running { at } | Status::Paused { at, .. } => Some(at),
                Status::Pausing { .. } | Status::RollingBack => None,
                ref s => return reject(format!("a {} release cannot be aborted", s.label())),
            };
            r.status = Status::Aborting {
                keep_online,
                at,
                planned: false,
            };
        }
        Event::Rollback => {
            if r.phase != Phase::Forward {
                return reject("the release is rolling back already".to_string());
            }
            if r.from.0.is_empty() {
                return reject(
                    "this release is the app's first deployment: there is no earlier version to roll back to; abort it to take its new instances out of traffic"
                        .to_string(),
                );
            }
            match r.status {
                Status::Pending => {
                    return reject("a pending release has nothing to roll back".to_string());
                }
                Status::Aborting { .. } => {
                    return reject("wait until the abort has finished".to_string());
                }
                Status::RollingBack => {
                    return reject("the release is rolling back already".to_string());
                }
                _ => {
                    r.status = Status::RollingBack;
                    r.deadline = Some(deadline_after(now, &r.settings));
                }
            }
        }
    }
    drive(r, now, &mut out);
    Ok(out)
}

/// Moves the release as far as it can go without new input.
fn drive(r: &mut Release, now: Timestamp, out: &mut Vec<Action>) {
    loop {
        match r.status.clone() {
            Status::Running { at } => {
                if !apply_policy(r, at, now, out) {
                    return;
                }
                let batches = r.plan.batches.len() as u32;
                if batches == 0 {
                    let done = success(r);
                    finish(r, done, out);
                    return;
                }
                let stages = r.plan.batches[at.batch as usize].stages.len() as u32;
                if at.stage >= stages {
                    if at.batch + 1 >= batches {
                        let done = success(r);
                        finish(r, done, out);
                        return;
                    }
                    let next = at.batch + 1;
                    if r.phase == Phase::Forward && r.settings.pauses() {
                        let id = r.step_id(r.phase, next, 0, "pause", 1);
                        match r.settings.pause {
                            Pause::Manual => {
                                r.status = Status::Paused {
                                    at: Cursor::at_batch(next),
                                    reason: PauseReason::BetweenBatches,
                                };
                                r.issue(id, Command::AwaitResume, out);
                            }
                            Pause::For(d) => {
                                let until = now.plus_millis(d.as_millis());
                                r.status = Status::Pausing { next, until };
                                r.issue(id, Command::PauseUntil { until }, out);
                            }
                        }
                        return;
                    }
                    r.status = Status::Running {
                        at: Cursor::at_batch(next),
                    };
                    continue;
                }
                if !at.entered {
                    enter_stage(r, at, now, out);
                    r.status = Status::Running {
                        at: Cursor {
                            entered: true,
                            ..at
                        },
                    };
                    continue;
                }
                if !r.pending.is_empty() {
                    return;
                }
                if stage_satisfied(r, at) {
                    r.deadline = None;
                    r.status = Status::Running {
                        at: Cursor {
                            batch: at.batch,
                            stage: at.stage + 1,
                            entered: false,
                        },
                    };
                    continue;
                }
                if r.deadline.is_some_and(|d| now >= d) {
                    if !time_out(r, at) {
                        let reason = format!(
                            "no progress within the progress deadline of {}",
                            r.settings.progress_deadline
                        );
                        fail(r, reason, out);
                        return;
                    }
                    r.deadline = Some(deadline_after(now, &r.settings));
                    continue;
                }
                return;
            }
            Status::Pausing { next, until } => {
                if now < until {
                    return;
                }
                r.status = Status::Running {
                    at: Cursor::at_batch(next),
                };
            }
            Status::Aborting {
                keep_online,
                at,
                planned,
            } => {
                if !r.pending.is_empty() {
                    return;
                }
                if !planned {
                    let actions = abort_actions(r, keep_online, at);
                    if !actions.is_empty() {
                        for (id, command) in actions {
                            r.issue(id, command, out);
                        }
                        r.status = Status::Aborting {
                            keep_online,
                            at,
                            planned: true,
                        };
                        return;
                    }
                }
                finish(r, Status::Aborted { keep_online }, out);
                return;
            }
            Status::RollingBack => {
                if !r.pending.is_empty() {
                    return;
                }
                if !settled(r) {
                    // Pods a scale-down removed have not been reported gone.
                    if r.deadline.is_some_and(|d| now >= d) {
                        r.phase = Phase::Rollback;
                        let reason = format!(
                            "pods removed from a track were not reported gone within {}; the rollback was not started",
                            r.settings.progress_deadline
                        );
                        fail(r, reason, out);
                    }
                    return;
                }
                match plan(&r.fleet, r.desired, &r.from, &r.settings) {
                    Ok(p) => {
                        r.phase = Phase::Rollback;
                        r.outcomes = records(&p);
                        r.plan = p;
                        r.deadline = None;
                        r.retired.clear();
                        r.status = Status::Running {
                            at: Cursor::at_batch(0),
                        };
                    }
                    Err(e) => {
                        r.phase = Phase::Rollback;
                        fail(r, format!("the rollback cannot be planned: {e}"), out);
                        return;
                    }
                }
            }
            _ => return,
        }
    }
}

fn success(r: &Release) -> Status {
    match r.phase {
        Phase::Forward => Status::Succeeded,
        _ => Status::RolledBack,
    }
}

fn finish(r: &mut Release, status: Status, out: &mut Vec<Action>) {
    let outcome = match status {
        Status::Succeeded => Outcome::Succeeded,
        Status::RolledBack => Outcome::RolledBack,
        Status::Aborted { .. } => Outcome::Aborted,
        _ => Outcome::Failed,
    };
    r.status = status;
    r.deadline = None;
    let id = r.step_id(r.phase, 0, 0, "finish", 1);
    r.issue(id, Command::Finish { outcome }, out);
}

fn fail(r: &mut Release, reason: String, out: &mut Vec<Action>) {
    finish(r, Status::Failed { reason }, out);
}

fn enter_stage(r: &mut Release, at: Cursor, now: Timestamp, out: &mut Vec<Action>) {
    let stage = r.plan.batches[at.batch as usize].stages[at.stage as usize].clone();
    let version = r.plan.version.clone();
    let phase = r.phase;
    let id = |r: &Release, target: &str| r.step_id(phase, at.batch, at.stage, target, 1);
    match stage {
        Stage::TakeOffline { instances } => {
            let id = id(r, "take-offline");
            r.issue(
                id,
                Command::TakeOffline {
                    instances: Instances::Listed(instances),
                },
                out,
            );
        }
        Stage::BringOnline { instances } => {
            let id = id(r, "bring-online");
            r.issue(
                id,
                Command::BringOnline {
                    instances: Instances::Listed(instances),
                },
                out,
            );
        }
        Stage::Replace { instances } | Stage::StartNew { instances } => {
            let replace = matches!(
                r.plan.batches[at.batch as usize].stages[at.stage as usize],
                Stage::Replace { .. }
            );
            for instance in instances {
                let generation = r.next_generation();
                start_record(r, &instance, generation);
                let id = id(r, &instance.0);
                let version = version.clone();
                let command = if replace {
                    Command::StopAndReplace {
                        instance,
                        version,
                        generation,
                    }
                } else {
                    Command::StartNew {
                        instance,
                        version,
                        generation,
                    }
                };
                r.issue(id, command, out);
            }
        }
        Stage::Stop { instances } => {
            let id = id(r, "stop");
            r.issue(id, Command::Stop { instances }, out);
        }
        Stage::ScaleTrack {
            track,
            version,
            replicas,
        } => {
            r.deadline = Some(deadline_after(now, &r.settings));
            let id = id(r, &format!("scale-{track}"));
            r.issue(
                id,
                Command::ScaleTrack {
                    track,
                    version,
                    replicas,
                },
                out,
            );
        }
        Stage::RollTrack {
            track,
            replicas,
            max_unavailable,
        } => {
            let id = id(r, &format!("roll-{track}"));
            r.issue(
                id,
                Command::RollTrack {
                    track,
                    version,
                    replicas,
                    max_unavailable,
                },
                out,
            );
        }
        Stage::PauseRollout { track } => {
            let id = id(r, &format!("pause-{track}"));
            r.issue(id, Command::PauseRollout { track }, out);
        }
        Stage::ResumeRollout { track } => {
            let id = id(r, &format!("resume-{track}"));
            r.issue(id, Command::ResumeRollout { track }, out);
        }
        Stage::WaitOnline { awaited } => {
            for o in r.outcomes.iter_mut() {
                if o.batch <= at.batch && o.state == OutcomeState::Waiting {
                    o.state = OutcomeState::Starting;
                    o.attempts = o.attempts.max(1);
                }
            }
            let deadline = deadline_after(now, &r.settings);
            r.deadline = Some(deadline);
            let awaiting = match awaited {
                Awaited::Instances(ids) => ids
                    .iter()
                    .map(|i| i.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                Awaited::Track { track, online } => {
                    format!("{online} {version} instances ONLINE on {track}")
                }
            };
            let id = id(r, "wait-online");
            r.issue(id, Command::WaitOnline { awaiting, deadline }, out);
        }
    }
}

fn start_record(r: &mut Release, instance: &InstanceId, generation: u64) {
    if let Some(o) = r.outcomes.iter_mut().find(|o| o.instance == *instance) {
        o.state = OutcomeState::Starting;
        o.attempts = o.attempts.max(1);
        o.generation = Some(generation);
    }
}

fn online_pods(r: &Release, track: Track) -> u32 {
    match &r.fleet {
        Fleet::Kubernetes { pods, .. } => pods
            .values()
            .filter(|p| {
                p.track == track && p.version == r.plan.version && p.state == InstanceState::Online
            })
            .count() as u32,
        Fleet::Hosts { .. } => 0,
    }
}

fn stage_satisfied(r: &Release, at: Cursor) -> bool {
    match &r.plan.batches[at.batch as usize].stages[at.stage as usize] {
        Stage::WaitOnline {
            awaited: Awaited::Instances(ids),
        } => {
            let done: BTreeSet<&InstanceId> = r
                .outcomes
                .iter()
                .filter(|o| matches!(o.state, OutcomeState::Online | OutcomeState::Tolerated))
                .map(|o| &o.instance)
                .collect();
            ids.iter().all(|id| done.contains(id))
        }
        Stage::WaitOnline {
            awaited: Awaited::Track { track, online },
        } => {
            let last = at.batch as usize + 1 == r.plan.batches.len();
            // A rollout is done when no pod of another version is left.
            let old_left = r.plan.strategy == Strategy::Rolling
                && last
                && match &r.fleet {
                    Fleet::Kubernetes { pods, .. } => pods
                        .values()
                        .any(|p| p.track == *track && p.version != r.plan.version),
                    Fleet::Hosts { .. } => false,
                };
            !old_left && online_pods(r, *track) + r.tolerated() >= *online
        }
        // A scale-down is done once its pods are seen gone, so that the
        // next count of ONLINE pods does not include pods being deleted.
        Stage::ScaleTrack {
            track, replicas, ..
        } => pods_on(r, *track) <= *replicas,
        _ => true,
    }
}

fn pods_on(r: &Release, track: Track) -> u32 {
    match &r.fleet {
        Fleet::Kubernetes { pods, .. } => pods.values().filter(|p| p.track == track).count() as u32,
        Fleet::Hosts { .. } => 0,
    }
}

/// Whether every track has no more pods than its replicas in the view.
fn settled(r: &Release) -> bool {
    match &r.fleet {
        Fleet::Kubernetes { tracks, .. } => {
            tracks.iter().all(|t| pods_on(r, t.track) <= t.replicas)
        }
        Fleet::Hosts { .. } => true,
    }
}

/// The stage made no progress for the deadline: its missing instances fail.
/// Returns false when there was no instance to blame (a rollout that does
/// not move): then the release fails.
fn time_out(r: &mut Release, at: Cursor) -> bool {
    let error = format!(
        "not ONLINE within the progress deadline of {}",
        r.settings.progress_deadline
    );
    let stage = r.plan.batches[at.batch as usize].stages[at.stage as usize].clone();
    if !matches!(stage, Stage::WaitOnline { .. }) {
        return false;
    }
    let mut missing = match &stage {
        Stage::WaitOnline {
            awaited: Awaited::Track { track, online },
        } => online.saturating_sub(online_pods(r, *track) + r.tolerated()),
        _ => u32::MAX,
    };
    let awaited_ids = match &stage {
        Stage::WaitOnline {
            awaited: Awaited::Instances(ids),
        } => Some(ids.iter().cloned().collect::<BTreeSet<_>>()),
        _ => None,
    };
    let mut blamed = false;
    for o in r.outcomes.iter_mut() {
        if missing == 0 {
            break;
        }
        let in_scope = match &awaited_ids {
            Some(ids) => ids.contains(&o.instance),
            None => o.batch <= at.batch,
        };
        if in_scope && matches!(o.state, OutcomeState::Starting | OutcomeState::Waiting) {
            o.state = OutcomeState::Failed;
            o.last_error = Some(error.clone());
            missing -= 1;
            blamed = true;
        }
    }
    blamed
}

/// Decides every failed instance. Returns false when the release failed.
fn apply_policy(r: &mut Release, at: Cursor, now: Timestamp, out: &mut Vec<Action>) -> bool {
    let kubernetes = matches!(r.fleet, Fleet::Kubernetes { .. });
    for i in 0..r.outcomes.len() {
        if r.outcomes[i].state != OutcomeState::Failed {
            continue;
        }
        let decision = decide(
            &r.settings.failed_instances,
            &r.outcomes[i],
            r.tolerated(),
            r.plan.desired,
        );
        match decision {
            PolicyDecision::Recreate { attempt } => {
                let o = &mut r.outcomes[i];
                o.attempts = attempt;
                o.state = OutcomeState::Starting;
                let target = if kubernetes {
                    o.pod.take()
                } else {
                    Some(o.instance.clone())
                };
                let (instance, batch) = (o.instance.clone(), o.batch);
                if let Some(target) = target {
                    if kubernetes {
                        r.retired.insert(target.clone());
                    }
                    let id = r.step_id(r.phase, batch, at.stage, &instance.0, attempt);
                    let version = r.plan.version.clone();
                    let generation = r.next_generation();
                    r.outcomes[i].generation = Some(generation);
                    r.issue(
                        id,
                        Command::Recreate {
                            instance: target,
                            version,
                            generation,
                        },
                        out,
                    );
                }
                r.deadline = r.deadline.map(|_| deadline_after(now, &r.settings));
            }
            PolicyDecision::Tolerate => {
                r.outcomes[i].state = OutcomeState::Tolerated;
                // A failed pod counts as unavailable and would stall the
                // Deployment's rollout; a tolerated one gets room of its own.
                if let (Strategy::Rolling, Some(track), true) =
                    (r.plan.strategy, r.plan.target_track, kubernetes)
                {
                    let tolerated = r.tolerated();
                    let id = r.step_id(
                        r.phase,
                        at.batch,
                        at.stage,
                        &format!("roll-{track}"),
                        1 + tolerated,
                    );
                    let command = Command::RollTrack {
                        track,
                        version: r.plan.version.clone(),
                        replicas: r.plan.desired,
                        max_unavailable: r.plan.max_batch() + tolerated,
                    };
                    r.issue(id, command, out);
                }
            }
            PolicyDecision::FailRelease { reason } => {
                r.outcomes[i].state = OutcomeState::Fatal;
                fail(r, reason, out);
                return false;
            }
        }
    }
    true
}

/// Records what a runtime saw.
fn observe(r: &mut Release, event: &InstanceEvent, now: Timestamp) {
    let version = r.plan.version.clone();
    let state = match &event.change {
        InstanceChange::Online => Some(InstanceState::Online),
        InstanceChange::Offline => Some(InstanceState::Offline),
        InstanceChange::Failed { .. } | InstanceChange::Exited { .. } => {
            Some(InstanceState::Failed)
        }
        InstanceChange::Gone => None,
    };
    let record = match &mut r.fleet {
        Fleet::Hosts { instances } => {
            let record = r.outcomes.iter().position(|o| o.instance == event.instance);
            if record.is_some_and(|i| event.generation < r.outcomes[i].generation) {
                return; // about a process a start in flight replaces
            }
            let state = state.unwrap_or(InstanceState::Stopped);
            match instances.iter_mut().find(|i| i.id == event.instance) {
                Some(i) => {
                    // News of an earlier process (replaced, recreated), or
                    // of a process since stopped, is stale. `None` (started
                    // before the release) is older than any generation.
                    if event.generation < i.generation
                        || (i.state == InstanceState::Stopped && event.generation <= i.generation)
                    {
                        return;
                    }
                    // A newer process was started by this release (only
                    // starts hand out generations): the process that was
                    // held offline is gone, and with it the hold, even if
                    // this news overtakes the start's completion.
                    if event.generation > i.generation {
                        i.held = false;
                    }
                    i.generation = event.generation;
                    i.version = event.version.clone();
                    i.state = match state {
                        InstanceState::Online if i.held => InstanceState::Offline,
                        state => state,
                    };
                }
                None => {
                    let (slot, _) = HostInstance::slot_and_track(&event.instance);
                    instances.push(HostInstance {
                        id: event.instance.clone(),
                        slot: slot.to_string(),
                        track: event.track,
                        version: event.version.clone(),
                        state,
                        held: false,
                        generation: event.generation,
                    });
                }
            }
            record.filter(|_| event.version == version)
        }
        Fleet::Kubernetes { pods, tracks } => {
            if r.retired.contains(&event.instance) {
                return;
            }
            match state {
                Some(state) => {
                    let track_held = tracks
                        .iter()
                        .any(|t| t.track == event.track && t.held.as_ref() == Some(&event.version));
                    let held = track_held || pods.get(&event.instance).is_some_and(|p| p.held);
                    let state = match state {
                        InstanceState::Online if held => InstanceState::Offline,
                        state => state,
                    };
                    pods.insert(
                        event.instance.clone(),
                        PodState {
                            track: event.track,
                            version: event.version.clone(),
                            state,
                            held,
                        },
                    );
                }
                None => {
                    pods.remove(&event.instance);
                }
            }
            if event.version != version || r.plan.target_track != Some(event.track) {
                None
            } else {
                let pod = Some(event.instance.clone());
                r.outcomes
                    .iter()
                    .position(|o| o.pod == pod)
                    .or_else(|| {
                        (event.change != InstanceChange::Gone)
                            .then(|| {
                                r.outcomes.iter().position(|o| {
                                    o.pod.is_none()
                                        && !matches!(
                                            o.state,
                                            OutcomeState::Online
                                                | OutcomeState::Tolerated
                                                | OutcomeState::Fatal
                                        )
                                })
                            })
                            .flatten()
                    })
                    .inspect(|&i| r.outcomes[i].pod = pod)
            }
        }
    };
    let Some(i) = record else {
        return;
    };
    let kubernetes = matches!(r.fleet, Fleet::Kubernetes { .. });
    let o = &mut r.outcomes[i];
    match &event.change {
        InstanceChange::Online => {
            if !matches!(o.state, OutcomeState::Online | OutcomeState::Fatal) {
                o.state = OutcomeState::Online;
                o.attempts = o.attempts.max(1);
                r.deadline = r.deadline.map(|_| deadline_after(now, &r.settings));
            }
        }
        InstanceChange::Failed { error } => fail_record(o, error.clone()),
        InstanceChange::Exited { code } => fail_record(
            o,
            match code {
                Some(c) => format!("exited with code {c}"),
                None => "exited".to_string(),
            },
        ),
        InstanceChange::Gone => {
            if kubernetes {
                o.pod = None;
                if o.state == OutcomeState::Online {
                    o.state = OutcomeState::Starting;
                }
            } else if o.state == OutcomeState::Starting
                && event.generation == o.generation
                && r.phase == Phase::Forward
                && matches!(
                    r.status,
                    Status::Running { .. } | Status::Pausing { .. } | Status::Paused { .. }
                )
            {
                // The process this release started was stopped before it
                // came online, by someone else: it never will, so the
                // failure policy decides instead of the progress deadline.
                fail_record(
                    o,
                    "stopped outside the release before it came online".into(),
                );
            }
        }
        InstanceChange::Offline => {}
    }
}

fn fail_record(o: &mut InstanceOutcome, error: String) {
    if matches!(
        o.state,
        OutcomeState::Waiting | OutcomeState::Starting | OutcomeState::Online
    ) {
        o.state = OutcomeState::Failed;
        o.attempts = o.attempts.max(1);
        o.last_error = Some(error);
    }
}

/// Updates the fleet with an applied action's effect.
fn apply_done(r: &mut Release, command: &Command) {
    match (&mut r.fleet, command) {
        (Fleet::Hosts { instances }, command) => {
            let mut set = |ids: &[InstanceId], f: &dyn Fn(&mut HostInstance)| {
                let ids: BTreeSet<&InstanceId> = ids.iter().collect();
                for i in instances.iter_mut().filter(|i| ids.contains(&i.id)) {
                    f(i);
                }
            };
            match command {
                Command::TakeOffline {
                    instances: Instances::Listed(ids),
                } => set(ids, &|i| {
                    i.held = true;
                    if matches!(i.state, InstanceState::Online | InstanceState::Starting) {
                        i.state = InstanceState::Offline;
                    }
                }),
                Command::BringOnline {
                    instances: Instances::Listed(ids),
                } => set(ids, &|i| {
                    i.held = false;
                    if i.state == InstanceState::Offline {
                        i.state = InstanceState::Starting;
                    }
                }),
                Command::StopAndReplace {
                    instance,
                    version,
                    generation,
                }
                | Command::Recreate {
                    instance,
                    version,
                    generation,
                } => set(std::slice::from_ref(instance), &|i| {
                    // The new process may have reported already.
                    if i.generation < Some(*generation) {
                        i.generation = Some(*generation);
                        i.version = version.clone();
                        i.state = InstanceState::Starting;
                        i.held = false;
                    }
                }),
                Command::StartNew {
                    instance,
                    version,
                    generation,
                } => match instances.iter_mut().find(|i| i.id == *instance) {
                    Some(i) => {
                        if i.generation < Some(*generation) {
                            i.generation = Some(*generation);
                            i.version = version.clone();
                            i.state = InstanceState::Starting;
                            i.held = false;
                        }
                    }
                    None => {
                        let (slot, track) = HostInstance::slot_and_track(instance);
                        instances.push(HostInstance {
                            id: instance.clone(),
                            slot: slot.to_string(),
                            track,
                            version: version.clone(),
                            state: InstanceState::Starting,
                            held: false,
                            generation: Some(*generation),
                        });
                    }
                },
                Command::Stop { instances: ids } => set(ids, &|i| i.state = InstanceState::Stopped),
                _ => {}
            }
        }
        (Fleet::Kubernetes { tracks, pods }, command) => match command {
            Command::ScaleTrack {
                track,
                version,
                replicas,
            }
            | Command::RollTrack {
                track,
                version,
                replicas,
                ..
            } => {
                if let Some(t) = tracks.iter_mut().find(|t| t.track == *track) {
                    t.version = Some(version.clone());
                    t.replicas = *replicas;
                    if t.held.as_ref() == Some(version) {
                        t.held = None;
                    }
                }
            }
            Command::Recreate { instance, .. } => {
                pods.remove(instance);
            }
            Command::TakeOffline { instances } => {
                if let Instances::Track { track, version } = instances
                    && let Some(t) = tracks.iter_mut().find(|t| t.track == *track)
                {
                    t.held = Some(version.clone());
                }
                for (name, pod) in pods.iter_mut() {
                    let chosen = match instances {
                        Instances::Listed(ids) => ids.contains(name),
                        Instances::Track { track, version } => {
                            pod.track == *track && pod.version == *version
                        }
                    };
                    if chosen {
                        pod.held = true;
                        if pod.state == InstanceState::Online {
                            pod.state = InstanceState::Offline;
                        }
                    }
                }
            }
            _ => {}
        },
    }
}

/// The clearing-up after an abort, computed once the actions in flight
/// have finished.
fn abort_actions(r: &Release, keep_online: bool, at: Option<Cursor>) -> Vec<(StepId, Command)> {
    let batch = at.map_or(0, |c| c.batch);
    let mut actions = Vec::new();
    let id = |n: usize, target: &str| r.step_id(Phase::Abort, batch, n as u32, target, 1);
    let current = at.and_then(|c| r.plan.batches.get(c.batch as usize).map(|b| (c, b)));
    let started: BTreeSet<&InstanceId> = r
        .outcomes
        .iter()
        .filter(|o| o.state != OutcomeState::Waiting)
        .map(|o| &o.instance)
        .collect();
    match &r.fleet {
        Fleet::Hosts { instances } => {
            // Old instances this batch took offline and did not replace or
            // stop go back into traffic.
            let mut restore = Vec::new();
            if let Some((c, b)) = current {
                for (s, stage) in b.stages.iter().enumerate() {
                    let reached = (s as u32) < c.stage || (s as u32 == c.stage && c.entered);
                    if let (true, Stage::TakeOffline { instances: ids }) = (reached, stage) {
                        restore.extend(ids.iter().filter(|id| {
                            instances.iter().any(|i| {
                                // Whether or not the take-offline took
                                // effect (it may have failed halfway):
                                // bringing an instance online is idempotent.
                                i.id == **id
                                    && i.state != InstanceState::Stopped
                                    && i.version != r.plan.version
                            })
                        }));
                    }
                }
            }
            if !restore.is_empty() {
                let restore: Vec<InstanceId> = restore.into_iter().cloned().collect();
                actions.push((
                    id(actions.len(), "bring-online"),
                    Command::BringOnline {
                        instances: Instances::Listed(restore),
                    },
                ));
            }
            if !keep_online {
                let new: Vec<InstanceId> = instances
                    .iter()
                    .filter(|i| {
                        started.contains(&i.id)
                            && i.version == r.plan.version
                            && matches!(
                                i.state,
                                InstanceState::Starting
                                    | InstanceState::Online
                                    | InstanceState::Failed
                            )
                    })
                    .map(|i| i.id.clone())
                    .collect();
                if !new.is_empty() {
                    actions.push((
                        id(actions.len(), "take-offline"),
                        Command::TakeOffline {
                            instances: Instances::Listed(new),
                        },
                    ));
                }
            }
        }
        Fleet::Kubernetes { .. } => {
            let target = r.plan.target_track;
            if let (Strategy::Rolling, Some(track)) = (r.plan.strategy, target) {
                actions.push((
                    id(actions.len(), &format!("pause-{track}")),
                    Command::PauseRollout { track },
                ));
            }
            if let Some((c, b)) = current
                && let Some((track, version, before)) = &b.old_track_before
            {
                // In-place removes old instances first; if the batch's new
                // ones are not all ONLINE yet, the old ones come back.
                let wait = b
                    .stages
                    .iter()
                    .position(|s| matches!(s, Stage::WaitOnline { .. }))
                    .unwrap_or(0) as u32;
                let removed = c.stage > 0 || c.entered;
                let now = r.fleet.track(*track).map_or(0, |t| t.replicas);
                if removed && c.stage <= wait && now < *before {
                    actions.push((
                        id(actions.len(), &format!("scale-{track}")),
                        Command::ScaleTrack {
                            track: *track,
                            version: version.clone(),
                            replicas: *before,
                        },
                    ));
                }
            }
            // Any pod of the version on the target track is an aborted one.
            let touched = target.is_some_and(|t| {
                r.fleet.track(t).and_then(|t| t.version.as_ref()) == Some(&r.plan.version)
            });
            if let (false, Some(track), true) = (keep_online, target, touched) {
                actions.push((
                    id(actions.len(), "take-offline"),
                    Command::TakeOffline {
                        instances: Instances::Track {
                            track,
                            version: r.plan.version.clone(),
                        },
                    },
                ));
            }
        }
    }
    actions
}
