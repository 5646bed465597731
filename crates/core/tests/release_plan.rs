//! Release plans: batch sizes, the stages per strategy and runtime, the
//! capacity floor, and the settings taken from a profile.

mod release_sim;

use keelson_core::profile::{self, Batches, Pause, Strategy as ReleaseStrategy};
use keelson_core::release::*;
use proptest::prelude::*;
use release_sim::*;

#[test]
fn batch_sizes_by_count_by_size_and_by_default() {
    assert_eq!(batch_sizes(10, count(3).as_ref()), vec![4, 3, 3]);
    assert_eq!(batch_sizes(10, size(4).as_ref()), vec![4, 4, 2]);
    // Never more batches than instances.
    assert_eq!(batch_sizes(2, count(5).as_ref()), vec![1, 1]);
    assert_eq!(batch_sizes(3, size(10).as_ref()), vec![3]);
    // Default: a quarter, at least one (Kubernetes' 25%, rounded down).
    assert_eq!(batch_sizes(10, None), vec![2, 2, 2, 2, 2]);
    assert_eq!(batch_sizes(3, None), vec![1, 1, 1]);
    assert!(batch_sizes(0, count(3).as_ref()).is_empty());
}

#[test]
fn in_place_on_hosts() {
    let fleet = World::fleet_of_hosts(5, &v("v1"));
    let p = plan(
        &fleet,
        5,
        &v("v2"),
        &settings(ReleaseStrategy::InPlace, size(2), Pause::Manual),
    )
    .unwrap();
    assert_eq!(
        p.batches.iter().map(|b| b.size).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    assert_eq!(p.floor, 3);
    let id = |i: u32| InstanceId(format!("vm-{i}:0@blue"));
    assert_eq!(
        p.batches[0].stages,
        vec![
            Stage::TakeOffline {
                instances: vec![id(0), id(1)]
            },
            Stage::Replace {
                instances: vec![id(0), id(1)]
            },
            Stage::WaitOnline {
                awaited: Awaited::Instances(vec![id(0), id(1)])
            },
        ]
    );
    assert_eq!(p.batches[2].instances, vec![id(4)]);
}

#[test]
fn rolling_on_hosts_is_in_place_without_extra_capacity() {
    let fleet = World::fleet_of_hosts(4, &v("v1"));
    let rolling = plan(
        &fleet,
        4,
        &v("v2"),
        &settings(ReleaseStrategy::Rolling, size(1), Pause::Manual),
    )
    .unwrap();
    let in_place = plan(
        &fleet,
        4,
        &v("v2"),
        &settings(ReleaseStrategy::InPlace, size(1), Pause::Manual),
    )
    .unwrap();
    assert_eq!(rolling.batches, in_place.batches);
    assert_eq!(rolling.floor, 3);
}

#[test]
fn dual_deployment_on_hosts_starts_on_the_idle_track() {
    let fleet = World::fleet_of_hosts(2, &v("v1"));
    let p = plan(
        &fleet,
        2,
        &v("v2"),
        &settings(ReleaseStrategy::DualDeployment, count(1), Pause::Manual),
    )
    .unwrap();
    assert_eq!(p.floor, 2);
    let ids = |t: &str| {
        vec![
            InstanceId(format!("vm-0:0@{t}")),
            InstanceId(format!("vm-1:0@{t}")),
        ]
    };
    assert_eq!(
        p.batches[0].stages,
        vec![
            Stage::StartNew {
                instances: ids("green")
            },
            Stage::WaitOnline {
                awaited: Awaited::Instances(ids("green"))
            },
            Stage::TakeOffline {
                instances: ids("blue")
            },
            Stage::Stop {
                instances: ids("blue")
            },
        ]
    );
}

#[test]
fn slots_already_on_the_version_are_left_alone() {
    let mut fleet = World::fleet_of_hosts(3, &v("v1"));
    let Fleet::Hosts { instances } = &mut fleet else {
        unreachable!()
    };
    instances[1].version = v("v2");
    let p = plan(
        &fleet,
        3,
        &v("v2"),
        &settings(ReleaseStrategy::InPlace, size(5), Pause::Manual),
    )
    .unwrap();
    assert_eq!(p.batches.len(), 1);
    assert_eq!(
        p.batches[0].instances,
        vec![
            InstanceId("vm-0:0@blue".into()),
            InstanceId("vm-2:0@blue".into())
        ]
    );
}

#[test]
fn in_place_on_kubernetes_removes_then_adds() {
    let fleet = Fleet::kubernetes(Track::Blue, &v("v1"), 4);
    let p = plan(
        &fleet,
        4,
        &v("v2"),
        &settings(ReleaseStrategy::InPlace, count(2), Pause::Manual),
    )
    .unwrap();
    assert_eq!(p.target_track, Some(Track::Green));
    assert_eq!(p.floor, 2);
    assert_eq!(
        p.batches[0].stages,
        vec![
            Stage::ScaleTrack {
                track: Track::Blue,
                version: v("v1"),
                replicas: 2
            },
            Stage::ScaleTrack {
                track: Track::Green,
                version: v("v2"),
                replicas: 2
            },
            Stage::WaitOnline {
                awaited: Awaited::Track {
                    track: Track::Green,
                    online: 2
                }
            },
        ]
    );
    assert_eq!(
        p.batches[0].old_track_before,
        Some((Track::Blue, v("v1"), 4))
    );
    assert_eq!(
        p.batches[1].instances,
        vec![InstanceId("green#2".into()), InstanceId("green#3".into())]
    );
}

#[test]
fn dual_deployment_on_kubernetes_adds_then_removes() {
    let fleet = Fleet::kubernetes(Track::Green, &v("v1"), 3);
    let p = plan(
        &fleet,
        3,
        &v("v2"),
        &settings(ReleaseStrategy::DualDeployment, size(3), Pause::Manual),
    )
    .unwrap();
    assert_eq!(p.target_track, Some(Track::Blue));
    assert_eq!(p.floor, 3);
    assert_eq!(
        p.batches[0].stages,
        vec![
            Stage::ScaleTrack {
                track: Track::Blue,
                version: v("v2"),
                replicas: 3
            },
            Stage::WaitOnline {
                awaited: Awaited::Track {
                    track: Track::Blue,
                    online: 3
                }
            },
            Stage::ScaleTrack {
                track: Track::Green,
                version: v("v1"),
                replicas: 0
            },
        ]
    );
}

#[test]
fn rolling_on_kubernetes_rolls_once_and_pauses_only_when_asked() {
    let fleet = Fleet::kubernetes(Track::Blue, &v("v1"), 6);
    let paused = plan(
        &fleet,
        6,
        &v("v2"),
        &settings(ReleaseStrategy::Rolling, count(3), Pause::Manual),
    )
    .unwrap();
    assert_eq!(paused.floor, 4);
    assert_eq!(
        paused.batches[0].stages,
        vec![
            Stage::RollTrack {
                track: Track::Blue,
                replicas: 6,
                max_unavailable: 2
            },
            Stage::WaitOnline {
                awaited: Awaited::Track {
                    track: Track::Blue,
                    online: 2
                }
            },
            Stage::PauseRollout { track: Track::Blue },
        ]
    );
    assert_eq!(
        paused.batches[2].stages,
        vec![
            Stage::ResumeRollout { track: Track::Blue },
            Stage::WaitOnline {
                awaited: Awaited::Track {
                    track: Track::Blue,
                    online: 6
                }
            },
        ]
    );
    let straight = plan(
        &fleet,
        6,
        &v("v2"),
        &settings(
            ReleaseStrategy::Rolling,
            count(3),
            Pause::For(profile::Duration::from_secs(0)),
        ),
    )
    .unwrap();
    assert!(
        straight
            .batches
            .iter()
            .flat_map(|b| &b.stages)
            .all(|s| !matches!(s, Stage::PauseRollout { .. } | Stage::ResumeRollout { .. }))
    );
}

#[test]
fn plans_that_cannot_be_made_say_why() {
    let hosts = World::fleet_of_hosts(3, &v("v1"));
    let s = settings(ReleaseStrategy::InPlace, None, Pause::Manual);
    assert_eq!(plan(&hosts, 0, &v("v2"), &s), Err(PlanError::NoInstances));
    let e = plan(&hosts, 4, &v("v2"), &s).unwrap_err();
    assert_eq!(
        e,
        PlanError::SlotCount {
            slots: 3,
            desired: 4
        }
    );
    assert!(
        e.to_string()
            .contains("the desired count is the number of slots")
    );
    let Fleet::Kubernetes { mut tracks, pods } = Fleet::kubernetes(Track::Blue, &v("v1"), 2) else {
        unreachable!()
    };
    tracks[1] = TrackState {
        track: Track::Green,
        version: Some(v("v0")),
        replicas: 1,
        held: None,
    };
    let busy = Fleet::Kubernetes { tracks, pods };
    assert_eq!(
        plan(&busy, 2, &v("v2"), &s),
        Err(PlanError::BothTracksBusy { blue: 2, green: 1 })
    );
}

#[test]
fn settings_come_from_the_profile() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/orders/app.yaml"
    ))
    .unwrap();
    let p = profile::parse(&text).unwrap();
    let prod = ReleaseSettings::of(&p.effective("prod").unwrap());
    assert_eq!(prod.strategy, ReleaseStrategy::DualDeployment);
    assert_eq!(
        prod.batches,
        Some(Batches {
            count: Some(3),
            size: None
        })
    );
    assert_eq!(prod.pause, Pause::For(profile::Duration::from_secs(30)));
    assert_eq!(
        prod.failed_instances,
        FailedInstancePolicy::Recreate { max_attempts: 3 }
    );
    assert_eq!(prod.progress_deadline, profile::Duration::from_secs(600));
    let test = ReleaseSettings::of(&p.effective("test").unwrap());
    assert_eq!(test.strategy, ReleaseStrategy::InPlace);
    assert_eq!(
        test.failed_instances,
        FailedInstancePolicy::Tolerate { max_ratio: 0.5 }
    );
    assert!(!test.pauses());
}

/// Online instances after each stage of a Kubernetes plan, if every new pod
/// came ONLINE as soon as it was asked for at the batch's wait, and pods
/// removed were ONLINE ones.
fn online_through(p: &ReleasePlan, mut old: u32, mut new: u32, target: Track) -> Vec<u32> {
    let mut seen = Vec::new();
    let mut asked = new;
    for b in &p.batches {
        for s in &b.stages {
            match s {
                Stage::ScaleTrack {
                    track, replicas, ..
                } if *track == target => asked = *replicas,
                Stage::ScaleTrack { replicas, .. } => old = *replicas,
                Stage::WaitOnline { .. } => new = asked,
                _ => {}
            }
            seen.push(old + new.min(asked));
        }
    }
    seen
}

proptest! {
    #[test]
    fn batches_sum_to_the_instances_and_never_outnumber_them(
        n in 0u32..200,
        by_count in any::<bool>(),
        k in 1u32..50,
    ) {
        let b = if by_count { count(k) } else { size(k) };
        let sizes = batch_sizes(n, b.as_ref());
        prop_assert_eq!(sizes.iter().sum::<u32>(), n);
        prop_assert!(sizes.len() as u32 <= n);
        prop_assert!(sizes.iter().all(|s| *s >= 1));
        if by_count {
            prop_assert_eq!(sizes.len() as u32, k.min(n));
            let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
            prop_assert!(hi.zip(lo).is_none_or(|(h, l)| h - l <= 1));
        } else {
            prop_assert!(sizes.iter().all(|s| *s <= k));
        }
    }

    /// A fresh plan keeps the floor the strategy promises, and ends with
    /// every instance on the target track.
    #[test]
    fn kubernetes_plans_keep_their_floor(
        current in 1u32..30,
        desired in 1u32..30,
        k in 1u32..10,
        by_count in any::<bool>(),
        dual in any::<bool>(),
    ) {
        let strategy = if dual { ReleaseStrategy::DualDeployment } else { ReleaseStrategy::InPlace };
        let b = if by_count { count(k) } else { size(k) };
        let fleet = Fleet::kubernetes(Track::Blue, &v("v1"), current);
        let p = plan(&fleet, desired, &v("v2"), &settings(strategy, b, Pause::Manual)).unwrap();
        let k = p.max_batch();
        let promised = if dual { current.min(desired) } else { current.min(desired) - k.min(current.min(desired)) };
        prop_assert_eq!(p.floor, promised);
        if current >= desired {
            prop_assert_eq!(p.floor, if dual { desired } else { desired - k });
        }
        let seen = online_through(&p, current, 0, Track::Green);
        prop_assert!(seen.iter().all(|o| *o >= p.floor), "{:?} below {}", seen, p.floor);
        prop_assert_eq!(seen.last().copied(), Some(desired));
        prop_assert_eq!(p.batches.iter().map(|b| b.size).sum::<u32>(), desired);
        prop_assert!(p.batches.len() as u32 <= desired);
    }

    /// Rolling promises `desired - maxUnavailable`, and asks the Deployment
    /// for exactly that `maxUnavailable`.
    #[test]
    fn rolling_plans_promise_desired_minus_max_unavailable(
        current in 1u32..30,
        desired in 1u32..30,
        k in 1u32..10,
        by_count in any::<bool>(),
    ) {
        let b = if by_count { count(k) } else { size(k) };
        let fleet = Fleet::kubernetes(Track::Blue, &v("v1"), current);
        let p = plan(&fleet, desired, &v("v2"), &settings(ReleaseStrategy::Rolling, b, Pause::Manual)).unwrap();
        let Stage::RollTrack { max_unavailable, replicas, .. } = p.batches[0].stages[0] else {
            panic!("{:?}", p.batches[0].stages)
        };
        prop_assert_eq!(max_unavailable, p.max_batch());
        prop_assert_eq!(replicas, desired);
        prop_assert_eq!(p.floor, current.min(desired).saturating_sub(max_unavailable));
        if current >= desired {
            prop_assert_eq!(p.floor, desired - max_unavailable);
        }
        prop_assert_eq!(p.batches.iter().map(|b| b.size).sum::<u32>(), desired);
    }
}
