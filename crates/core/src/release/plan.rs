//! The release plan: from the instances running now, the desired count, the
//! strategy and the batch parameters, the batches and, per batch, the
//! ordered stages that move it.
//!
//! ```text
//!                    hosts (slots)                         Kubernetes (two tracks)
//! in-place         TakeOffline ─► Replace ─► WaitOnline    ScaleTrack(old, -k) ─► ScaleTrack(new, +k) ─► WaitOnline
//! dual-deployment  StartNew ─► WaitOnline ─► TakeOffline   ScaleTrack(new, +k) ─► WaitOnline ─► ScaleTrack(old, -k)
//!                  ─► Stop
//! rolling          as in-place (no extra capacity)         RollTrack once, then per batch WaitOnline
//!                                                          (PauseRollout / ResumeRollout around pauses)
//! ```
//! Batch sizes sum to the number of instances that change (all of them in a
//! fresh release); there are never more batches than instances. The plan
//! also states the capacity floor it keeps: with `c` instances online at the
//! start, `d` desired and the largest batch `k`, in-place and rolling never
//! go below `min(c, d) - k` online, dual-deployment never below `min(c, d)`
//! (for a fresh release with all `d` online: `d - k` and `d`). Instances
//! that fail on their own are not the plan's doing and come on top.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::action::{InstanceId, Timestamp, Track, Version};
use super::policy::FailedInstancePolicy;
use crate::profile::{Batches, Duration, EffectiveApp, Pause, Strategy};

/// The release parameters of an app in an environment, with defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseSettings {
    /// The strategy.
    pub strategy: Strategy,
    /// How instances are split into batches; `None` means batches of a
    /// quarter of the instances (at least one), like Kubernetes' 25%.
    pub batches: Option<Batches>,
    /// The pause between batches.
    pub pause: Pause,
    /// What to do with instances that fail.
    pub failed_instances: FailedInstancePolicy,
    /// How long a batch may go without progress.
    pub progress_deadline: Duration,
}

impl ReleaseSettings {
    /// The settings of an effective app (the profile with its defaults).
    pub fn of(app: &EffectiveApp) -> Self {
        let release = app.run.release.as_ref();
        Self {
            strategy: app.strategy(),
            batches: release.and_then(|r| r.batches.clone()),
            pause: app.pause(),
            failed_instances: FailedInstancePolicy::of(
                release.and_then(|r| r.failed_instances.as_ref()),
            ),
            progress_deadline: app.progress_deadline(),
        }
    }

    /// Whether there is a pause between batches.
    pub fn pauses(&self) -> bool {
        !matches!(self.pause, Pause::For(d) if d.as_millis() == 0)
    }
}

/// The state of an instance as the machine knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Started, not yet ONLINE.
    Starting,
    /// ONLINE: takes traffic.
    Online,
    /// Running, out of traffic.
    Offline,
    /// Failed to start or to stay up.
    Failed,
    /// Stopped on purpose.
    Stopped,
}

/// One instance on a host slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInstance {
    /// `<slot>@<track>`.
    pub id: InstanceId,
    /// The host slot (e.g. `vm-3:0`).
    pub slot: String,
    /// Which of the slot's two tracks.
    pub track: Track,
    /// The version it runs or last ran.
    pub version: Version,
    /// Its state.
    pub state: InstanceState,
    /// Held out of traffic by a `TakeOffline` (until a `BringOnline` or a
    /// fresh start): news that it is ONLINE cannot be true.
    #[serde(default)]
    pub held: bool,
    /// The generation of the process last started here by the release.
    #[serde(default)]
    pub generation: Option<u64>,
}

impl HostInstance {
    /// The id of the instance on `track` of `slot`.
    pub fn id_of(slot: &str, track: Track) -> InstanceId {
        InstanceId(format!("{slot}@{track}"))
    }

    /// The slot and track an id names (`<slot>@<track>`; blue when the
    /// track is missing).
    pub fn slot_and_track(id: &InstanceId) -> (&str, Track) {
        match id.0.rsplit_once('@') {
            Some((slot, "green")) => (slot, Track::Green),
            Some((slot, _)) => (slot, Track::Blue),
            None => (id.0.as_str(), Track::Blue),
        }
    }

    /// An ONLINE instance on `track` of `slot`.
    pub fn online(slot: &str, track: Track, version: &Version) -> Self {
        Self {
            id: Self::id_of(slot, track),
            slot: slot.to_string(),
            track,
            version: version.clone(),
            state: InstanceState::Online,
            held: false,
            generation: None,
        }
    }
}

/// One Deployment track on Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackState {
    /// Which track.
    pub track: Track,
    /// The version of its pod template (`None`: never rendered).
    pub version: Option<Version>,
    /// Its replicas.
    pub replicas: u32,
    /// Pods of this version on this track are held out of traffic.
    #[serde(default)]
    pub held: Option<Version>,
}

/// A pod as the machine knows it from events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    /// Its track.
    pub track: Track,
    /// Its version.
    pub version: Version,
    /// Its state.
    pub state: InstanceState,
    /// Held out of traffic by a `TakeOffline` of this pod.
    #[serde(default)]
    pub held: bool,
}

/// The instances of an app in an environment, as one runtime sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "runtime", rename_all = "kebab-case")]
pub enum Fleet {
    /// Fixed slots on hosts; a version per instance.
    Hosts {
        /// The instances, in slot order.
        instances: Vec<HostInstance>,
    },
    /// Two Deployment tracks with replica counts; pods known from events.
    Kubernetes {
        /// Blue then green.
        tracks: [TrackState; 2],
        /// Pods seen, by name.
        pods: BTreeMap<InstanceId, PodState>,
    },
}

impl Fleet {
    /// Hosts, one ONLINE instance of `version` per slot on the blue track.
    pub fn hosts<S: AsRef<str>>(slots: &[S], version: &Version) -> Self {
        Self::Hosts {
            instances: slots
                .iter()
                .map(|s| HostInstance::online(s.as_ref(), Track::Blue, version))
                .collect(),
        }
    }

    /// Kubernetes with `replicas` pods of `version` on `active`, the other
    /// track empty. Pods get known from events.
    pub fn kubernetes(active: Track, version: &Version, replicas: u32) -> Self {
        let track = |t: Track| TrackState {
            track: t,
            version: (t == active).then(|| version.clone()),
            replicas: if t == active { replicas } else { 0 },
            held: None,
        };
        Self::Kubernetes {
            tracks: [track(Track::Blue), track(Track::Green)],
            pods: BTreeMap::new(),
        }
    }

    /// The track's state (Kubernetes only).
    pub fn track(&self, track: Track) -> Option<&TrackState> {
        match self {
            Self::Kubernetes { tracks, .. } => tracks.iter().find(|t| t.track == track),
            Self::Hosts { .. } => None,
        }
    }

    /// Instances taking traffic now. On Kubernetes, pods reported ONLINE;
    /// before any pod is reported, a track's replicas count as online.
    pub fn online(&self) -> u32 {
        match self {
            Self::Hosts { instances } => instances
                .iter()
                .filter(|i| i.state == InstanceState::Online)
                .count() as u32,
            Self::Kubernetes { tracks, pods } if pods.is_empty() => {
                tracks.iter().map(|t| t.replicas).sum()
            }
            Self::Kubernetes { pods, .. } => pods
                .values()
                .filter(|p| p.state == InstanceState::Online)
                .count() as u32,
        }
    }
}

/// What a WaitOnline stage waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Awaited {
    /// These host instances ONLINE with the plan's version.
    Instances(Vec<InstanceId>),
    /// This many pods of the plan's version ONLINE on the track.
    Track {
        /// The track.
        track: Track,
        /// How many.
        online: u32,
    },
}

/// One step of a batch. Stages run in order; each waits for its actions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Stage {
    /// Take these (old) instances out of traffic.
    TakeOffline {
        /// The instances.
        instances: Vec<InstanceId>,
    },
    /// Put these instances back into traffic.
    BringOnline {
        /// The instances.
        instances: Vec<InstanceId>,
    },
    /// Replace each instance in place with the plan's version.
    Replace {
        /// The instances.
        instances: Vec<InstanceId>,
    },
    /// Start these new instances with the plan's version.
    StartNew {
        /// The instances.
        instances: Vec<InstanceId>,
    },
    /// Stop these (old) instances.
    Stop {
        /// The instances.
        instances: Vec<InstanceId>,
    },
    /// Set a track's replicas (with the version it runs).
    ScaleTrack {
        /// The track.
        track: Track,
        /// Its version.
        version: Version,
        /// The count.
        replicas: u32,
    },
    /// Start the Deployment's own rolling update to the plan's version.
    RollTrack {
        /// The track.
        track: Track,
        /// Replicas at the end.
        replicas: u32,
        /// Instances that may be down at once.
        max_unavailable: u32,
    },
    /// Pause the track's rollout.
    PauseRollout {
        /// The track.
        track: Track,
    },
    /// Resume the track's rollout.
    ResumeRollout {
        /// The track.
        track: Track,
    },
    /// Wait until the batch's new instances are ONLINE.
    WaitOnline {
        /// What is awaited.
        awaited: Awaited,
    },
}

/// One batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPlan {
    /// New instances this batch brings.
    pub size: u32,
    /// The instance positions whose outcome the batch records: host
    /// instance ids, or `<track>#<n>` on Kubernetes.
    pub instances: Vec<InstanceId>,
    /// The stages, in order.
    pub stages: Vec<Stage>,
    /// Kubernetes in-place: the old track and its replicas before this
    /// batch, restored when the batch is aborted before its new instances
    /// are ONLINE.
    pub old_track_before: Option<(Track, Version, u32)>,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasePlan {
    /// The strategy.
    pub strategy: Strategy,
    /// The version every instance runs at the end.
    pub version: Version,
    /// Instances at the end.
    pub desired: u32,
    /// The fewest instances the plan leaves ONLINE at any time.
    pub floor: u32,
    /// The track that ends up running the version (Kubernetes).
    pub target_track: Option<Track>,
    /// The batches.
    pub batches: Vec<BatchPlan>,
}

impl ReleasePlan {
    /// The largest batch.
    pub fn max_batch(&self) -> u32 {
        self.batches.iter().map(|b| b.size).max().unwrap_or(0)
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A release needs at least one instance at the end.
    #[error("the desired instance count is 0; a release needs at least one instance")]
    NoInstances,
    /// Hosts have fixed slots.
    #[error(
        "{slots} host slots but {desired} instances desired; on hosts the desired count is the number of slots"
    )]
    SlotCount {
        /// Slots found.
        slots: u32,
        /// Desired count.
        desired: u32,
    },
    /// Both tracks run something else than the new version.
    #[error(
        "both tracks run instances of another version ({blue} blue, {green} green); scale one to 0 first"
    )]
    BothTracksBusy {
        /// Blue replicas.
        blue: u32,
        /// Green replicas.
        green: u32,
    },
}

/// Splits `n` changing instances into batch sizes.
pub fn batch_sizes(n: u32, batches: Option<&Batches>) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    let by_size = |size: u32| {
        let size = size.clamp(1, n);
        let mut sizes = vec![size; (n / size) as usize];
        if !n.is_multiple_of(size) {
            sizes.push(n % size);
        }
        sizes
    };
    match batches {
        Some(Batches {
            count: Some(count), ..
        }) => {
            let count = (*count).clamp(1, n);
            let (base, extra) = (n / count, n % count);
            (0..count).map(|i| base + u32::from(i < extra)).collect()
        }
        Some(Batches {
            size: Some(size), ..
        }) => by_size(*size),
        _ => by_size((n / 4).max(1)),
    }
}

/// Plans moving `fleet` to `desired` instances of `version`.
pub fn plan(
    fleet: &Fleet,
    desired: u32,
    version: &Version,
    settings: &ReleaseSettings,
) -> Result<ReleasePlan, PlanError> {
    if desired == 0 {
        return Err(PlanError::NoInstances);
    }
    match fleet {
        Fleet::Hosts { instances } => plan_hosts(instances, desired, version, settings),
        Fleet::Kubernetes { tracks, .. } => {
            plan_kubernetes(tracks, fleet.online(), desired, version, settings)
        }
    }
}

fn plan_hosts(
    instances: &[HostInstance],
    desired: u32,
    version: &Version,
    settings: &ReleaseSettings,
) -> Result<ReleasePlan, PlanError> {
    let mut slots: Vec<&str> = Vec::new();
    for i in instances {
        if !slots.contains(&i.slot.as_str()) {
            slots.push(&i.slot);
        }
    }
    if slots.len() as u32 != desired {
        return Err(PlanError::SlotCount {
            slots: slots.len() as u32,
            desired,
        });
    }
    let dual = settings.strategy == Strategy::DualDeployment;
    // Per slot that changes: (the instance to bring up, the old one to retire).
    let mut changes: Vec<(InstanceId, Option<InstanceId>)> = Vec::new();
    // Slots that run the version already: other live instances there (left
    // by an aborted dual-deployment batch) are stopped at the end, and a
    // held-offline instance of the version goes back into traffic.
    let (mut strays, mut held) = (Vec::new(), Vec::new());
    for slot in &slots {
        let of_slot: Vec<&HostInstance> = instances.iter().filter(|i| i.slot == *slot).collect();
        let live = |i: &&&HostInstance| i.state != InstanceState::Stopped;
        if let Some(good) = of_slot
            .iter()
            .filter(live)
            .find(|i| i.version == *version && i.state != InstanceState::Failed)
        {
            if good.state == InstanceState::Offline {
                held.push(good.id.clone());
            }
            strays.extend(
                of_slot
                    .iter()
                    .filter(live)
                    .filter(|i| i.id != good.id)
                    .map(|i| i.id.clone()),
            );
            continue;
        }
        let current = of_slot
            .iter()
            .find(live)
            .or(of_slot.last())
            .copied()
            .expect("a listed slot has an instance");
        let old_live = (current.state != InstanceState::Stopped).then(|| current.id.clone());
        if dual {
            changes.push((HostInstance::id_of(slot, current.track.other()), old_live));
        } else {
            changes.push((current.id.clone(), old_live));
        }
    }
    let sizes = batch_sizes(changes.len() as u32, settings.batches.as_ref());
    let mut batches = Vec::new();
    let mut rest = changes.as_slice();
    for size in &sizes {
        let (now, later) = rest.split_at(*size as usize);
        rest = later;
        let new: Vec<InstanceId> = now.iter().map(|(n, _)| n.clone()).collect();
        let old: Vec<InstanceId> = now.iter().filter_map(|(_, o)| o.clone()).collect();
        let mut stages = Vec::new();
        let wait = Stage::WaitOnline {
            awaited: Awaited::Instances(new.clone()),
        };
        if dual {
            stages.push(Stage::StartNew {
                instances: new.clone(),
            });
            stages.push(wait);
            if !old.is_empty() {
                stages.push(Stage::TakeOffline {
                    instances: old.clone(),
                });
                stages.push(Stage::Stop { instances: old });
            }
        } else {
            if !old.is_empty() {
                stages.push(Stage::TakeOffline { instances: old });
            }
            stages.push(Stage::Replace {
                instances: new.clone(),
            });
            stages.push(wait);
        }
        batches.push(BatchPlan {
            size: *size,
            instances: new,
            stages,
            old_track_before: None,
        });
    }
    let mut cleanup = Vec::new();
    if !held.is_empty() {
        cleanup.push(Stage::BringOnline { instances: held });
    }
    if !strays.is_empty() {
        cleanup.push(Stage::TakeOffline {
            instances: strays.clone(),
        });
        cleanup.push(Stage::Stop { instances: strays });
    }
    if !cleanup.is_empty() {
        match batches.last_mut() {
            Some(last) => last.stages.extend(cleanup),
            None => batches.push(BatchPlan {
                size: 0,
                instances: Vec::new(),
                stages: cleanup,
                old_track_before: None,
            }),
        }
    }
    // A slot with an ONLINE instance counts once.
    let online = slots
        .iter()
        .filter(|slot| {
            instances
                .iter()
                .any(|i| i.slot == **slot && i.state == InstanceState::Online)
        })
        .count() as u32;
    let base = online.min(desired);
    let k = sizes.iter().copied().max().unwrap_or(0);
    Ok(ReleasePlan {
        strategy: settings.strategy,
        version: version.clone(),
        desired,
        floor: if dual { base } else { base.saturating_sub(k) },
        target_track: None,
        batches,
    })
}

fn plan_kubernetes(
    tracks: &[TrackState; 2],
    online: u32,
    desired: u32,
    version: &Version,
    settings: &ReleaseSettings,
) -> Result<ReleasePlan, PlanError> {
    let (blue, green) = (&tracks[0], &tracks[1]);
    let runs = |t: &TrackState| t.version.as_ref() == Some(version) && t.replicas > 0;
    if settings.strategy == Strategy::Rolling {
        // A rollout updates one Deployment; the other must be empty.
        if blue.replicas > 0 && green.replicas > 0 {
            return Err(PlanError::BothTracksBusy {
                blue: blue.replicas,
                green: green.replicas,
            });
        }
        return Ok(plan_rolling(tracks, online, desired, version, settings));
    }
    // The target track: the one already running the version (a rollback or
    // a resumed release), else the idle one.
    let target = if runs(blue) {
        blue
    } else if runs(green) {
        green
    } else if blue.replicas == 0 && green.replicas > 0 {
        blue
    } else if green.replicas == 0 {
        green
    } else {
        return Err(PlanError::BothTracksBusy {
            blue: blue.replicas,
            green: green.replicas,
        });
    };
    let old = if target.track == Track::Blue {
        green
    } else {
        blue
    };
    let old_version = old.version.clone().unwrap_or_else(|| version.clone());
    let n0 = if runs(target) { target.replicas } else { 0 };
    let r = old.replicas;
    let dual = settings.strategy == Strategy::DualDeployment;
    let sizes = batch_sizes(desired.saturating_sub(n0), settings.batches.as_ref());
    let mut batches = Vec::new();
    let mut on_target = n0;
    let mut old_now = r;
    for size in &sizes {
        let before = on_target;
        on_target += size;
        let old_after = r.min(desired - on_target);
        let scale_old = (old_after != old_now).then(|| Stage::ScaleTrack {
            track: old.track,
            version: old_version.clone(),
            replicas: old_after,
        });
        let scale_new = Stage::ScaleTrack {
            track: target.track,
            version: version.clone(),
            replicas: on_target,
        };
        let wait = Stage::WaitOnline {
            awaited: Awaited::Track {
                track: target.track,
                online: on_target,
            },
        };
        let old_track_before =
            (!dual && scale_old.is_some()).then(|| (old.track, old_version.clone(), old_now));
        let stages = if dual {
            [Some(scale_new), Some(wait), scale_old]
        } else {
            [scale_old, Some(scale_new), Some(wait)]
        };
        batches.push(BatchPlan {
            size: *size,
            instances: (before..on_target)
                .map(|n| InstanceId(format!("{}#{n}", target.track)))
                .collect(),
            stages: stages.into_iter().flatten().collect(),
            old_track_before,
        });
        old_now = old_after;
    }
    if sizes.is_empty() && (target.replicas != desired || r > 0) {
        // Nothing to add: only counts to settle.
        let mut stages = Vec::new();
        if target.replicas != desired {
            stages.push(Stage::ScaleTrack {
                track: target.track,
                version: version.clone(),
                replicas: desired,
            });
        }
        if r > 0 {
            stages.push(Stage::ScaleTrack {
                track: old.track,
                version: old_version,
                replicas: 0,
            });
        }
        batches.push(BatchPlan {
            size: 0,
            instances: Vec::new(),
            stages,
            old_track_before: None,
        });
    }
    let base = online.min(desired);
    let k = sizes.iter().copied().max().unwrap_or(0);
    Ok(ReleasePlan {
        strategy: settings.strategy,
        version: version.clone(),
        desired,
        floor: if dual { base } else { base.saturating_sub(k) },
        target_track: Some(target.track),
        batches,
    })
}

/// Rolling on Kubernetes: one RollTrack; batches are milestones of ONLINE
/// new pods, with the rollout paused between them when the release pauses.
fn plan_rolling(
    tracks: &[TrackState; 2],
    online: u32,
    desired: u32,
    version: &Version,
    settings: &ReleaseSettings,
) -> ReleasePlan {
    let track = if tracks[1].replicas > tracks[0].replicas {
        &tracks[1]
    } else {
        &tracks[0]
    };
    let sizes = batch_sizes(desired, settings.batches.as_ref());
    let k = sizes.iter().copied().max().unwrap_or(1);
    let mut batches = Vec::new();
    let mut done = 0;
    for (i, size) in sizes.iter().enumerate() {
        let before = done;
        done += size;
        let mut stages = Vec::new();
        if i == 0 {
            stages.push(Stage::RollTrack {
                track: track.track,
                replicas: desired,
                max_unavailable: k,
            });
        } else if settings.pauses() {
            stages.push(Stage::ResumeRollout { track: track.track });
        }
        stages.push(Stage::WaitOnline {
            awaited: Awaited::Track {
                track: track.track,
                online: done,
            },
        });
        if i + 1 < sizes.len() && settings.pauses() {
            stages.push(Stage::PauseRollout { track: track.track });
        }
        batches.push(BatchPlan {
            size: *size,
            instances: (before..done)
                .map(|n| InstanceId(format!("{}#{n}", track.track)))
                .collect(),
            stages,
            old_track_before: None,
        });
    }
    ReleasePlan {
        strategy: Strategy::Rolling,
        version: version.clone(),
        desired,
        floor: online.min(desired).saturating_sub(k),
        target_track: Some(track.track),
        batches,
    }
}

/// When a stage that waits should give up: `now` plus the progress deadline.
pub(crate) fn deadline_after(now: Timestamp, settings: &ReleaseSettings) -> Timestamp {
    now.plus_millis(settings.progress_deadline.as_millis())
}
