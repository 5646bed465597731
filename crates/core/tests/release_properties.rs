//! Properties of the release machine over random fleets, strategies, batch
//! parameters, policies, failure injections, event orders and user
//! interventions, run against a simulated runtime:
//! - capacity never drops below the plan's floor (failed instances aside);
//! - after success every instance runs the new version (after a rollback,
//!   the previous one);
//! - after an abort no new instance takes traffic unless `keep_online`;
//! - the decision function is deterministic, and re-applying a completion,
//!   an observation or a tick that was already applied changes nothing;
//! - every release ends.

mod release_sim;

use keelson_core::profile::{Batches, Duration, Pause, Strategy as ReleaseStrategy};
use keelson_core::release::*;
use proptest::prelude::*;
use release_sim::*;

#[derive(Debug, Clone)]
enum User {
    Nothing,
    Abort {
        keep_online: bool,
        then_rollback: bool,
    },
    Rollback,
    PauseResume,
}

#[derive(Debug, Clone)]
struct Scenario {
    kube: bool,
    strategy: ReleaseStrategy,
    current: u32,
    desired: u32,
    batches: Option<Batches>,
    pause: Pause,
    policy: FailedInstancePolicy,
    failures: Vec<bool>,
    choices: Vec<u8>,
    user: User,
    user_at: usize,
    /// Instances already on the new version (an earlier, interrupted
    /// release): hosts slots, or pods on the other track.
    ahead: u32,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let strategy = prop_oneof![
        Just(ReleaseStrategy::InPlace),
        Just(ReleaseStrategy::Rolling),
        Just(ReleaseStrategy::DualDeployment)
    ];
    let batches = prop_oneof![
        Just(None),
        (1u32..6).prop_map(|n| Some(Batches {
            count: Some(n),
            size: None
        })),
        (1u32..6).prop_map(|n| Some(Batches {
            count: None,
            size: Some(n)
        })),
    ];
    let pause = prop_oneof![
        Just(Pause::For(Duration::from_secs(0))),
        Just(Pause::For(Duration::from_secs(30))),
        Just(Pause::Manual),
    ];
    let policy = prop_oneof![
        Just(FailedInstancePolicy::Fail),
        (1u32..4).prop_map(|m| FailedInstancePolicy::Recreate { max_attempts: m }),
        (1u32..=10).prop_map(|t| FailedInstancePolicy::Tolerate {
            max_ratio: f64::from(t) / 10.0
        }),
    ];
    let user = prop_oneof![
        2 => Just(User::Nothing),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(k, r)| User::Abort { keep_online: k, then_rollback: r }),
        1 => Just(User::Rollback),
        1 => Just(User::PauseResume),
    ];
    (
        any::<bool>(),
        strategy,
        1u32..10,
        1u32..10,
        batches,
        pause,
        policy,
        proptest::collection::vec(proptest::bool::weighted(0.2), 0..16),
        proptest::collection::vec(any::<u8>(), 1..64),
        user,
        0usize..40,
        prop_oneof![3 => Just(0u32), 1 => 1u32..4],
    )
        .prop_map(
            |(
                kube,
                strategy,
                current,
                desired,
                batches,
                pause,
                policy,
                failures,
                choices,
                user,
                user_at,
                ahead,
            )| Scenario {
                kube,
                strategy,
                current,
                desired: if kube { desired } else { current },
                batches,
                pause,
                policy,
                failures,
                choices,
                user,
                user_at,
                // Rolling updates one Deployment and refuses two busy tracks.
                ahead: if kube && strategy == ReleaseStrategy::Rolling {
                    0
                } else {
                    ahead
                },
            },
        )
}

struct Run {
    sim: Sim,
    from: Version,
    to: Version,
    keep_online: Option<bool>,
}

fn run(s: &Scenario) -> Result<Run, TestCaseError> {
    let (from, to) = (v("v1"), v("v2"));
    let mut settings = settings(s.strategy, s.batches.clone(), s.pause);
    settings.failed_instances = s.policy;
    let ahead = s.ahead.min(s.current);
    let (world, fleet, initial) = if s.kube {
        let (world, events) = World::kube_two(s.current, &from, ahead, &to);
        let fleet = World::fleet_of_kube(s.current, &from, ahead, &to);
        (world, fleet, events)
    } else {
        let (world, fleet) = World::hosts_ahead(s.current, &from, ahead, &to);
        (world, fleet, Vec::new())
    };
    let release = Release::new("r1", from.clone(), to.clone(), s.desired, fleet, settings)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut sim = Sim::new(release, world, initial);
    sim.feed(Event::Start);
    let mut failures = s.failures.iter().copied();
    let mut choice = s.choices.iter().copied().cycle();
    let mut keep_online = None;
    let mut paused_by_user = false;
    for i in 0..4000 {
        check_capacity(&sim)?;
        if i == s.user_at {
            let event = match s.user {
                User::Nothing => None,
                User::Abort { keep_online: k, .. } => {
                    keep_online = Some(k);
                    Some(Event::Abort { keep_online: k })
                }
                User::Rollback => Some(Event::Rollback),
                User::PauseResume => {
                    paused_by_user = true;
                    Some(Event::Pause)
                }
            };
            if let Some(event) = event {
                let t = sim.feed(event);
                if t.rejected.is_some() {
                    keep_online = None;
                    paused_by_user = false;
                }
                continue;
            }
        }
        if !sim.inbox.is_empty() {
            let c = choice.next().unwrap_or(0) as usize;
            // Sometimes a freshly started process reports before its
            // start's completion arrives (a runtime answers the command
            // and streams news independently), keeping the order of news
            // about each instance.
            let starting = sim.world.starting();
            if !s.kube && c % 8 == 3 && !starting.is_empty() {
                let id = starting[c % starting.len()].clone();
                let fail = !sim.release.status.is_terminal()
                    && !matches!(sim.release.status, Status::Aborting { .. })
                    && failures.next().unwrap_or(false);
                let about = |e: &Event| matches!(e, Event::Instance(i) if i.instance == id);
                let at = sim.inbox.iter().rposition(about).map_or(0, |p| p + 1);
                for (n, e) in sim.world.resolve(&id, fail).into_iter().enumerate() {
                    sim.inbox.insert(at + n, e);
                }
                continue;
            }
            // Mostly in order; sometimes a later event overtakes, though
            // never one about the same instance (runtimes keep that order).
            let mut pick = if c.is_multiple_of(4) {
                c % sim.inbox.len().min(3)
            } else {
                0
            };
            let about = |e: &Event| match e {
                Event::Instance(i) => Some(i.instance.clone()),
                _ => None,
            };
            if let Some(instance) = about(&sim.inbox[pick])
                && sim
                    .inbox
                    .iter()
                    .take(pick)
                    .any(|e| about(e).as_ref() == Some(&instance))
            {
                pick = 0;
            }
            let event = sim.inbox.remove(pick).unwrap();
            let before = sim.release.clone();
            let input = Input {
                now: sim.now,
                event: event.clone(),
            };
            let t = sim.feed(event.clone());
            prop_assert_eq!(&step(&before, &input), &t, "not deterministic");
            let mut in_place = before.clone();
            prop_assert_eq!(in_place.apply(&input).ok(), Some(t.actions.clone()));
            prop_assert_eq!(&in_place, &t.release, "apply differs from step");
            if matches!(event, Event::Done { .. } | Event::Instance(_) | Event::Tick) {
                let again = step(&t.release, &input);
                prop_assert_eq!(
                    &again.release,
                    &t.release,
                    "re-applying {:?} changed the release",
                    event
                );
                prop_assert!(
                    again.actions.is_empty(),
                    "re-applying {:?} issued {:?}",
                    event,
                    again.actions
                );
            }
            continue;
        }
        let starting = sim.world.starting();
        if !starting.is_empty() {
            let c = choice.next().unwrap_or(0) as usize;
            let id = starting[c % starting.len()].clone();
            let fail = !sim.release.status.is_terminal()
                && !matches!(sim.release.status, Status::Aborting { .. })
                && failures.next().unwrap_or(false);
            let events = sim.world.resolve(&id, fail);
            sim.inbox.extend(events);
            continue;
        }
        match sim.release.status.clone() {
            Status::Pausing { until, .. } => {
                sim.now = until;
                sim.feed(Event::Tick);
            }
            Status::Paused { .. } => {
                paused_by_user = false;
                sim.feed(Event::Resume);
            }
            Status::Running { .. } if paused_by_user => {
                paused_by_user = false;
            }
            Status::Running { .. } => {
                let Some(deadline) = sim.release.deadline else {
                    return Err(TestCaseError::fail(format!(
                        "stuck with nothing to wait for: {:#?}",
                        sim.release
                    )));
                };
                sim.now = deadline;
                sim.feed(Event::Tick);
            }
            Status::Aborted { .. }
                if matches!(
                    s.user,
                    User::Abort {
                        then_rollback: true,
                        ..
                    }
                ) && sim.release.phase == Phase::Forward =>
            {
                // Aborted, checked, then rolled back.
                let aborted = Run {
                    sim,
                    from: from.clone(),
                    to: to.clone(),
                    keep_online,
                };
                check_end(s, &aborted)?;
                sim = aborted.sim;
                let t = sim.feed(Event::Rollback);
                prop_assert!(t.rejected.is_none(), "{:?}", t.rejected);
            }
            st if st.is_terminal() => {
                return Ok(Run {
                    sim,
                    from,
                    to,
                    keep_online,
                });
            }
            other => {
                return Err(TestCaseError::fail(format!(
                    "stuck in {other:?}: {:#?}",
                    sim.release
                )));
            }
        }
    }
    Err(TestCaseError::fail(format!(
        "did not end: {:#?}",
        sim.release.status
    )))
}

/// The release itself never takes more capacity away than its plan allows;
/// only failed instances may push it lower.
fn check_capacity(sim: &Sim) -> Result<(), TestCaseError> {
    if matches!(
        sim.release.status,
        Status::Running { .. }
            | Status::Pausing { .. }
            | Status::Paused { .. }
            | Status::RollingBack
    ) {
        let (online, failed) = (sim.world.online(), sim.world.failed());
        prop_assert!(
            online + failed >= sim.release.plan.floor,
            "{} online + {} failed < floor {} ({:?} {:?})\n{}",
            online,
            failed,
            sim.release.plan.floor,
            sim.release.plan.strategy,
            sim.release.status,
            sim.log.join("\n")
        );
    }
    Ok(())
}

fn check_end(s: &Scenario, r: &Run) -> Result<(), TestCaseError> {
    check_end_quiet(s, r).map_err(|e| TestCaseError::fail(format!("{e}\n{}", r.sim.log.join("\n"))))
}

fn check_end_quiet(s: &Scenario, r: &Run) -> Result<(), TestCaseError> {
    let running = r.sim.world.running();
    match &r.sim.release.status {
        Status::Succeeded => {
            prop_assert!(
                running.iter().all(|(v, _)| *v == r.to),
                "old version left: {:?}",
                running
            );
            prop_assert_eq!(running.len() as u32, s.desired);
            if s.kube {
                let target = r.sim.release.plan.target_track.unwrap();
                prop_assert_eq!(r.sim.world.track_replicas(target), s.desired);
                if s.strategy != ReleaseStrategy::Rolling {
                    prop_assert_eq!(r.sim.world.track_replicas(target.other()), 0);
                }
            }
            let tolerated = r
                .sim
                .release
                .outcomes
                .iter()
                .filter(|o| o.state == OutcomeState::Tolerated)
                .count() as u32;
            prop_assert!(r.sim.world.online() + tolerated >= s.desired);
        }
        Status::RolledBack => {
            prop_assert!(
                running.iter().all(|(v, _)| *v == r.from),
                "new version left: {:?}",
                running
            );
            prop_assert_eq!(running.len() as u32, s.desired);
        }
        Status::Aborted { keep_online: false } if r.sim.release.phase == Phase::Forward => {
            let started = r.sim.world.started();
            prop_assert!(
                !started.iter().any(|(_, v, online)| *v == r.to && *online),
                "an aborted instance takes traffic: {:?}",
                started
            );
            // The summary the API prints says so too.
            let summary = summarize(&r.sim.release);
            let wrong: Vec<_> = summary
                .instances
                .iter()
                .filter(|i| {
                    i.version == r.to
                        && i.traffic
                        && started.iter().any(|(id, _, _)| *id == i.instance)
                })
                .collect();
            prop_assert!(
                wrong.is_empty(),
                "the summary says {:?} take traffic",
                wrong
            );
        }
        Status::Aborted { keep_online: true } => {
            let offline: Vec<_> = r
                .sim
                .actions
                .iter()
                .filter(|a| {
                    a.id.phase == Phase::Abort && matches!(a.command, Command::TakeOffline { .. })
                })
                .collect();
            prop_assert!(offline.is_empty(), "keep_online, yet {:?}", offline);
        }
        _ => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn releases_keep_their_promises(s in scenario()) {
        let mut r = run(&s)?;
        check_end(&s, &r)?;
        // Whatever still starts after the end (sticky offline holds).
        r.sim.resolve_all(|_| false);
        check_end(&s, &r)?;
        // The stored form resumes the same release.
        let json = serde_json::to_string(&r.sim.release).unwrap();
        let back: Release = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &r.sim.release);
        let _ = r.keep_online;
    }
}
