//! What a release has done, in a form the API and CLI print: which
//! instances run which version, whether each takes traffic, and the outcome
//! of every new instance.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::action::{InstanceId, Track, Version};
use super::machine::{Release, Status};
use super::plan::{Fleet, InstanceState};
use super::policy::{InstanceOutcome, OutcomeState};

/// One instance as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSummary {
    /// Host instance id or pod name.
    pub instance: InstanceId,
    /// Its track.
    pub track: Track,
    /// The version it runs.
    pub version: Version,
    /// Its state.
    pub state: InstanceState,
    /// Whether it takes traffic.
    pub traffic: bool,
}

/// Instances per version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSummary {
    /// The version.
    pub version: Version,
    /// Instances running it (stopped ones left out).
    pub instances: u32,
    /// Of which in traffic.
    pub online: u32,
}

/// A Kubernetes track.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackSummary {
    /// The track.
    pub track: Track,
    /// Its template's version.
    pub version: Option<Version>,
    /// Its replicas.
    pub replicas: u32,
}

/// The release at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The release.
    pub release: String,
    /// `running`, `paused`, `succeeded`, …
    pub status: String,
    /// Why it failed, if it did.
    pub reason: Option<String>,
    /// `forward` or `rollback`.
    pub phase: String,
    /// The version the current phase moves to.
    pub version: Version,
    /// Batches finished, of the current phase.
    pub batches_done: u32,
    /// Batches in the current phase.
    pub batches: u32,
    /// Instances per version.
    pub versions: Vec<VersionSummary>,
    /// Every instance known (hosts: all; Kubernetes: pods reported).
    pub instances: Vec<InstanceSummary>,
    /// Kubernetes tracks (empty on hosts).
    pub tracks: Vec<TrackSummary>,
    /// The new instances' outcomes.
    pub outcomes: Vec<InstanceOutcome>,
}

/// Summarises a release.
pub fn summarize(release: &Release) -> Summary {
    let instances: Vec<InstanceSummary> = match &release.fleet {
        Fleet::Hosts { instances } => instances
            .iter()
            .map(|i| InstanceSummary {
                instance: i.id.clone(),
                track: i.track,
                version: i.version.clone(),
                state: i.state,
                traffic: i.state == InstanceState::Online,
            })
            .collect(),
        Fleet::Kubernetes { pods, .. } => pods
            .iter()
            .map(|(name, p)| InstanceSummary {
                instance: name.clone(),
                track: p.track,
                version: p.version.clone(),
                state: p.state,
                traffic: p.state == InstanceState::Online,
            })
            .collect(),
    };
    let mut versions: BTreeMap<Version, (u32, u32)> = BTreeMap::new();
    for i in instances
        .iter()
        .filter(|i| i.state != InstanceState::Stopped)
    {
        let entry = versions.entry(i.version.clone()).or_default();
        entry.0 += 1;
        entry.1 += u32::from(i.traffic);
    }
    let tracks = match &release.fleet {
        Fleet::Kubernetes { tracks, .. } => tracks
            .iter()
            .map(|t| TrackSummary {
                track: t.track,
                version: t.version.clone(),
                replicas: t.replicas,
            })
            .collect(),
        Fleet::Hosts { .. } => Vec::new(),
    };
    let batches = release.plan.batches.len() as u32;
    let batches_done = match &release.status {
        Status::Running { at } | Status::Paused { at, .. } => {
            let stages = release
                .plan
                .batches
                .get(at.batch as usize)
                .map_or(0, |b| b.stages.len() as u32);
            at.batch + u32::from(at.stage >= stages)
        }
        Status::Pausing { next, .. } => *next,
        Status::Succeeded | Status::RolledBack => batches,
        Status::Aborting { at, .. } => at.map_or(0, |c| c.batch),
        // Ended (or not begun): the leading batches whose every new
        // instance came online (or was tolerated).
        _ => (0..batches)
            .take_while(|b| {
                let mut of = release.outcomes.iter().filter(|o| o.batch == *b);
                of.clone().next().is_some()
                    && of.all(|o| matches!(o.state, OutcomeState::Online | OutcomeState::Tolerated))
            })
            .count() as u32,
    };
    Summary {
        release: release.id.clone(),
        status: release.status.label().to_string(),
        reason: match &release.status {
            Status::Failed { reason } => Some(reason.clone()),
            _ => None,
        },
        phase: release.phase.as_str().to_string(),
        version: release.plan.version.clone(),
        batches_done,
        batches,
        versions: versions
            .into_iter()
            .map(|(version, (instances, online))| VersionSummary {
                version,
                instances,
                online,
            })
            .collect(),
        instances,
        tracks,
        outcomes: release.outcomes.clone(),
    }
}
