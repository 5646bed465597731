//! Every transition of the release machine, step by step, on hosts and on
//! Kubernetes: the actions it issues, the states it goes through, and what
//! it refuses.

mod release_sim;

use keelson_core::profile::{Duration, Pause, Strategy};
use keelson_core::release::*;
use release_sim::*;

const T0: Timestamp = Timestamp(1_000_000);

fn at(now: Timestamp, event: Event) -> Input {
    Input { now, event }
}

/// Applies `event` at T0 and returns the transition.
fn go(r: &Release, event: Event) -> Transition {
    step(r, &at(T0, event))
}

fn done(t: &Transition) -> Vec<Event> {
    t.actions
        .iter()
        .filter(|a| a.command.needs_completion())
        .map(|a| Event::Done { step: a.id.clone() })
        .collect()
}

/// Applies `events` in order, returning the last transition.
fn chain(r: &Release, events: Vec<Event>) -> Transition {
    let mut t = Transition {
        release: r.clone(),
        actions: Vec::new(),
        rejected: None,
    };
    for e in events {
        let next = go(&t.release, e);
        assert_eq!(next.rejected, None);
        t = next;
    }
    t
}

fn news(
    id: &str,
    track: Track,
    version: &str,
    generation: Option<u64>,
    change: InstanceChange,
) -> Event {
    Event::Instance(InstanceEvent {
        instance: InstanceId(id.into()),
        track,
        version: v(version),
        generation,
        change,
    })
}

fn online(id: &str, track: Track, version: &str, generation: Option<u64>) -> Event {
    news(id, track, version, generation, InstanceChange::Online)
}

fn failed(id: &str, track: Track, version: &str, generation: Option<u64>) -> Event {
    let change = InstanceChange::Failed {
        error: "image pull timed out".into(),
    };
    news(id, track, version, generation, change)
}

fn hosts_release(slots: u32, strategy: Strategy, batch: u32, pause: Pause) -> Release {
    Release::new(
        "r1",
        v("v1"),
        v("v2"),
        slots,
        World::fleet_of_hosts(slots, &v("v1")),
        settings(strategy, size(batch), pause),
    )
    .unwrap()
}

fn ids(list: &[&str]) -> Vec<InstanceId> {
    list.iter().map(|s| InstanceId(s.to_string())).collect()
}

fn commands(t: &Transition) -> Vec<Command> {
    t.actions.iter().map(|a| a.command.clone()).collect()
}

#[test]
fn in_place_on_hosts_takes_offline_replaces_waits_then_pauses_for_a_person() {
    let r = hosts_release(4, Strategy::InPlace, 2, Pause::Manual);
    assert_eq!(r.status, Status::Pending);
    let t = go(&r, Event::Start);
    assert_eq!(
        commands(&t),
        vec![Command::TakeOffline {
            instances: Instances::Listed(ids(&["vm-0:0@blue", "vm-1:0@blue"]))
        }]
    );
    assert_eq!(
        t.actions[0].id.to_string(),
        "r1/forward/b0/s0/take-offline/a1"
    );
    let t = chain(&t.release, done(&t));
    assert_eq!(
        commands(&t),
        vec![
            Command::StopAndReplace {
                instance: InstanceId("vm-0:0@blue".into()),
                version: v("v2"),
                generation: 1
            },
            Command::StopAndReplace {
                instance: InstanceId("vm-1:0@blue".into()),
                version: v("v2"),
                generation: 2
            },
        ]
    );
    // Half the replacements done: the stage waits for the other.
    let half = go(&t.release, done(&t)[0].clone());
    assert!(half.actions.is_empty());
    let t = go(&half.release, done(&t)[1].clone());
    assert!(matches!(
        commands(&t).as_slice(),
        [Command::WaitOnline { deadline, .. }] if *deadline == T0.plus_millis(600_000)
    ));
    let t = go(
        &t.release,
        online("vm-0:0@blue", Track::Blue, "v2", Some(1)),
    );
    assert!(t.actions.is_empty(), "one of two is not enough");
    let t = go(
        &t.release,
        online("vm-1:0@blue", Track::Blue, "v2", Some(2)),
    );
    assert_eq!(commands(&t), vec![Command::AwaitResume]);
    assert_eq!(
        t.release.status,
        Status::Paused {
            at: Cursor {
                batch: 1,
                stage: 0,
                entered: false
            },
            reason: PauseReason::BetweenBatches
        }
    );
    let s = summarize(&t.release);
    assert_eq!((s.batches_done, s.batches), (1, 2));
    assert_eq!(
        s.versions
            .iter()
            .map(|v| (v.version.0.as_str(), v.instances, v.online))
            .collect::<Vec<_>>(),
        vec![("v1", 2, 2), ("v2", 2, 2)]
    );
    // Resuming goes on with batch 1.
    let t = go(&t.release, Event::Resume);
    assert_eq!(
        commands(&t),
        vec![Command::TakeOffline {
            instances: Instances::Listed(ids(&["vm-2:0@blue", "vm-3:0@blue"]))
        }]
    );
    let t = chain(&t.release, done(&t));
    let t = chain(&t.release, done(&t));
    let t = chain(
        &t.release,
        vec![
            online("vm-2:0@blue", Track::Blue, "v2", Some(3)),
            online("vm-3:0@blue", Track::Blue, "v2", Some(4)),
        ],
    );
    assert_eq!(
        commands(&t),
        vec![Command::Finish {
            outcome: Outcome::Succeeded
        }]
    );
    assert_eq!(t.release.status, Status::Succeeded);
    assert!(
        t.release
            .outcomes
            .iter()
            .all(|o| o.state == OutcomeState::Online && o.attempts == 1)
    );
}

#[test]
fn an_automatic_pause_ends_when_its_time_has_passed() {
    let r = hosts_release(2, Strategy::InPlace, 1, Pause::For(Duration::from_secs(30)));
    let mut sim = Sim::new(r, World::hosts(2, &v("v1")), Vec::new());
    sim.feed(Event::Start);
    sim.settle();
    sim.resolve_all(|_| false);
    let Status::Pausing { next: 1, until } = sim.release.status else {
        panic!("{:?}", sim.release.status)
    };
    assert_eq!(until, sim.now.plus_millis(30_000));
    sim.advance(29_999);
    assert!(matches!(sim.release.status, Status::Pausing { .. }));
    let t = sim.feed(Event::Tick);
    assert!(t.actions.is_empty());
    sim.advance(1);
    assert!(matches!(sim.release.status, Status::Running { at } if at.batch == 1));
    sim.settle();
    sim.resolve_all(|_| false);
    assert_eq!(sim.release.status, Status::Succeeded);
}

#[test]
fn a_user_pause_holds_the_next_stage_until_resumed() {
    let r = hosts_release(2, Strategy::InPlace, 2, Pause::Manual);
    let t = go(&r, Event::Start);
    let paused = go(&t.release, Event::Pause);
    assert!(matches!(
        paused.release.status,
        Status::Paused {
            reason: PauseReason::User,
            ..
        }
    ));
    // The action in flight completes; nothing new starts.
    let held = chain(&paused.release, done(&t));
    assert!(held.actions.is_empty());
    assert!(held.release.pending.is_empty());
    let resumed = go(&held.release, Event::Resume);
    assert_eq!(resumed.actions.len(), 2, "{:?}", resumed.actions);
    assert!(matches!(
        resumed.actions[0].command,
        Command::StopAndReplace { .. }
    ));
}

#[test]
fn requests_that_do_not_apply_are_refused_without_change() {
    let r = hosts_release(2, Strategy::InPlace, 1, Pause::Manual);
    for event in [Event::Resume, Event::Pause, Event::Rollback] {
        let t = go(&r, event.clone());
        assert!(t.rejected.is_some(), "{event:?}");
        assert_eq!(t.release, r);
        assert!(t.actions.is_empty());
    }
    let t = go(&r, Event::Start);
    let t2 = go(&t.release, Event::Resume);
    assert_eq!(
        t2.rejected.as_deref(),
        Some("a running release cannot be resumed")
    );
    // Starting twice is harmless.
    let again = go(&t.release, Event::Start);
    assert_eq!(again.release, t.release);
    assert!(again.actions.is_empty());
}

#[test]
fn aborting_a_pending_release_ends_it_at_once() {
    let r = hosts_release(2, Strategy::InPlace, 1, Pause::Manual);
    let t = go(&r, Event::Abort { keep_online: false });
    assert_eq!(t.release.status, Status::Aborted { keep_online: false });
    assert_eq!(
        commands(&t),
        vec![Command::Finish {
            outcome: Outcome::Aborted
        }]
    );
    assert!(
        go(&t.release, Event::Abort { keep_online: false })
            .rejected
            .is_some()
    );
}

/// A release of two slots, batch 0 replaced and waiting for ONLINE.
fn waiting(policy: FailedInstancePolicy) -> Release {
    let mut r = hosts_release(2, Strategy::InPlace, 1, Pause::For(Duration::from_secs(0)));
    r.settings.failed_instances = policy;
    let t = go(&r, Event::Start);
    let t = chain(&t.release, done(&t));
    chain(&t.release, done(&t)).release
}

#[test]
fn policy_fail_fails_the_release_at_the_first_failure() {
    let r = waiting(FailedInstancePolicy::Fail);
    let t = go(&r, failed("vm-0:0@blue", Track::Blue, "v2", Some(1)));
    let Status::Failed { reason } = &t.release.status else {
        panic!("{:?}", t.release.status)
    };
    assert!(
        reason.contains("vm-0:0@blue") && reason.contains("image pull"),
        "{reason}"
    );
    assert_eq!(
        commands(&t),
        vec![Command::Finish {
            outcome: Outcome::Failed
        }]
    );
    assert_eq!(t.release.outcomes[0].state, OutcomeState::Fatal);
    assert_eq!(
        t.release.outcomes[0].last_error.as_deref(),
        Some("image pull timed out")
    );
    // Nothing was taken offline in batch 1; the failed release stays put.
    assert_eq!(
        summarize(&t.release).reason.as_deref(),
        Some(reason.as_str())
    );
}

fn gone(id: &str, track: Track, version: &str, generation: Option<u64>) -> Event {
    news(id, track, version, generation, InstanceChange::Gone)
}

#[test]
fn a_new_instance_stopped_by_someone_else_before_online_fails_by_the_policy() {
    let r = waiting(FailedInstancePolicy::Fail);
    // News of the process the release replaced changes nothing.
    let t = go(&r, gone("vm-0:0@blue", Track::Blue, "v2", None));
    assert!(
        matches!(t.release.status, Status::Running { .. }),
        "{:?}",
        t.release.status
    );
    let t = go(&r, gone("vm-0:0@blue", Track::Blue, "v2", Some(1)));
    let Status::Failed { reason } = &t.release.status else {
        panic!("{:?}", t.release.status)
    };
    assert!(reason.contains("stopped outside the release"), "{reason}");
    // Under `recreate`, it is started again instead.
    let r = waiting(FailedInstancePolicy::Recreate { max_attempts: 3 });
    let t = go(&r, gone("vm-0:0@blue", Track::Blue, "v2", Some(1)));
    assert!(
        commands(&t)
            .iter()
            .any(|c| matches!(c, Command::Recreate { .. })),
        "{:?}",
        commands(&t)
    );
}

#[test]
fn policy_recreate_reissues_with_the_next_attempt_and_ignores_stale_news() {
    let r = waiting(FailedInstancePolicy::Recreate { max_attempts: 2 });
    let t = go(&r, failed("vm-0:0@blue", Track::Blue, "v2", Some(1)));
    assert_eq!(
        commands(&t),
        vec![Command::Recreate {
            instance: InstanceId("vm-0:0@blue".into()),
            version: v("v2"),
            generation: 2
        }]
    );
    assert_eq!(t.actions[0].id.attempt, 2);
    assert_eq!(
        t.actions[0].id.to_string(),
        "r1/forward/b0/s2/vm-0:0@blue/a2"
    );
    assert_eq!(t.release.outcomes[0].attempts, 2);
    // The same failure reported again (a late event about attempt 1).
    let stale = go(
        &t.release,
        failed("vm-0:0@blue", Track::Blue, "v2", Some(1)),
    );
    assert_eq!(stale.release, t.release);
    assert!(stale.actions.is_empty());
    let t = chain(&t.release, done(&t));
    // Attempt 2 fails too: that was the last one.
    let t = go(
        &t.release,
        failed("vm-0:0@blue", Track::Blue, "v2", Some(2)),
    );
    let Status::Failed { reason } = &t.release.status else {
        panic!("{:?}", t.release.status)
    };
    assert!(reason.contains("2 of 2 attempts"), "{reason}");
}

#[test]
fn policy_recreate_then_online_completes_the_batch() {
    let r = waiting(FailedInstancePolicy::Recreate { max_attempts: 3 });
    let t = go(&r, failed("vm-0:0@blue", Track::Blue, "v2", Some(1)));
    let t = chain(&t.release, done(&t));
    let t = go(
        &t.release,
        online("vm-0:0@blue", Track::Blue, "v2", Some(2)),
    );
    // On to batch 1.
    assert!(matches!(
        commands(&t).as_slice(),
        [Command::TakeOffline { .. }]
    ));
    assert_eq!(t.release.outcomes[0].state, OutcomeState::Online);
    assert_eq!(t.release.outcomes[0].attempts, 2);
}

#[test]
fn policy_tolerate_accepts_failures_up_to_the_ratio() {
    let r = waiting(FailedInstancePolicy::Tolerate { max_ratio: 0.5 });
    let t = go(&r, failed("vm-0:0@blue", Track::Blue, "v2", Some(1)));
    assert_eq!(t.release.outcomes[0].state, OutcomeState::Tolerated);
    assert!(
        matches!(commands(&t).as_slice(), [Command::TakeOffline { .. }]),
        "{:?}",
        t.actions
    );
    let t = chain(&t.release, done(&t));
    let t = chain(&t.release, done(&t));
    // A second failure is one too many of two.
    let t = go(
        &t.release,
        failed("vm-1:0@blue", Track::Blue, "v2", Some(2)),
    );
    assert!(matches!(t.release.status, Status::Failed { .. }));
}

#[test]
fn a_batch_without_progress_fails_at_the_deadline() {
    let r = waiting(FailedInstancePolicy::Fail);
    let early = step(&r, &at(T0.plus_millis(599_999), Event::Tick));
    assert!(early.actions.is_empty());
    let t = step(&r, &at(T0.plus_millis(600_000), Event::Tick));
    let Status::Failed { reason } = &t.release.status else {
        panic!("{:?}", t.release.status)
    };
    assert!(
        reason.contains("not ONLINE within the progress deadline of 10m"),
        "{reason}"
    );
}

#[test]
fn the_deadline_with_recreate_retries_and_restarts_the_clock() {
    let r = waiting(FailedInstancePolicy::Recreate { max_attempts: 3 });
    let late = T0.plus_millis(600_000);
    let t = step(&r, &at(late, Event::Tick));
    assert!(matches!(
        commands(&t).as_slice(),
        [Command::Recreate { .. }]
    ));
    assert_eq!(t.release.deadline, Some(late.plus_millis(600_000)));
}

#[test]
fn completions_and_news_applied_twice_change_nothing() {
    let r = hosts_release(2, Strategy::InPlace, 1, Pause::Manual);
    let t = go(&r, Event::Start);
    let d = done(&t).remove(0);
    let once = go(&t.release, d.clone());
    let twice = go(&once.release, d);
    assert_eq!(twice.release, once.release);
    assert!(twice.actions.is_empty());
    let once = chain(&once.release, done(&once));
    let e = online("vm-0:0@blue", Track::Blue, "v2", Some(1));
    let a = go(&once.release, e.clone());
    let b = go(&a.release, e);
    assert_eq!(b.release, a.release);
    assert!(b.actions.is_empty());
    // An unknown step id is ignored as well.
    let mut bogus = t.actions[0].id.clone();
    bogus.attempt = 9;
    assert_eq!(
        go(&a.release, Event::Done { step: bogus }).release,
        a.release
    );
}

#[test]
fn abort_waits_for_the_step_in_flight_then_takes_new_instances_offline() {
    let r = hosts_release(4, Strategy::InPlace, 2, Pause::Manual);
    let t = go(&r, Event::Start);
    let t = chain(&t.release, done(&t));
    // Replacements are in flight.
    let replacing = done(&t);
    let aborting = go(&t.release, Event::Abort { keep_online: false });
    assert!(
        aborting.actions.is_empty(),
        "nothing before the step in flight ends"
    );
    assert!(matches!(
        aborting.release.status,
        Status::Aborting { planned: false, .. }
    ));
    let t = chain(&aborting.release, replacing);
    assert_eq!(
        commands(&t),
        vec![Command::TakeOffline {
            instances: Instances::Listed(ids(&["vm-0:0@blue", "vm-1:0@blue"]))
        }]
    );
    assert_eq!(t.actions[0].id.phase, Phase::Abort);
    let t = chain(&t.release, done(&t));
    assert_eq!(t.release.status, Status::Aborted { keep_online: false });
    assert_eq!(
        commands(&t),
        vec![Command::Finish {
            outcome: Outcome::Aborted
        }]
    );
    let s = summarize(&t.release);
    assert_eq!(s.status, "aborted");
    for i in &s.instances {
        assert_eq!(i.traffic, i.version == v("v1"), "{i:?}");
    }
}

#[test]
fn abort_after_taking_old_instances_offline_brings_them_back() {
    let r = hosts_release(4, Strategy::InPlace, 2, Pause::Manual);
    let t = go(&r, Event::Start);
    let offline = done(&t);
    let aborting = go(&t.release, Event::Abort { keep_online: false });
    let t = chain(&aborting.release, offline);
    assert_eq!(
        commands(&t),
        vec![Command::BringOnline {
            instances: Instances::Listed(ids(&["vm-0:0@blue", "vm-1:0@blue"]))
        }]
    );
}

#[test]
fn abort_with_keep_online_leaves_new_instances_in_traffic() {
    let r = hosts_release(4, Strategy::InPlace, 2, Pause::Manual);
    let mut sim = Sim::new(r, World::hosts(4, &v("v1")), Vec::new());
    sim.feed(Event::Start);
    sim.settle();
    sim.resolve_all(|_| false);
    assert!(matches!(sim.release.status, Status::Paused { .. }));
    let t = sim.feed(Event::Abort { keep_online: true });
    assert_eq!(
        commands(&t),
        vec![Command::Finish {
            outcome: Outcome::Aborted
        }]
    );
    assert_eq!(sim.world.online(), 4);
    // The batch it finished still counts once it has ended.
    let s = summarize(&sim.release);
    assert_eq!(
        (s.status.as_str(), s.batches_done, s.batches),
        ("aborted", 1, 2)
    );
}

#[test]
fn rollback_after_success_replaces_back_in_batches_without_pauses() {
    let r = hosts_release(3, Strategy::InPlace, 2, Pause::Manual);
    let mut sim = Sim::new(r, World::hosts(3, &v("v1")), Vec::new());
    sim.feed(Event::Start);
    sim.settle();
    sim.resolve_all(|_| false);
    sim.feed(Event::Resume);
    sim.settle();
    sim.resolve_all(|_| false);
    assert_eq!(sim.release.status, Status::Succeeded);
    let t = sim.feed(Event::Rollback);
    assert_eq!(sim.release.phase, Phase::Rollback);
    assert_eq!(t.actions[0].id.phase, Phase::Rollback);
    assert_eq!(sim.release.plan.version, v("v1"));
    sim.settle();
    sim.resolve_all(|_| false);
    sim.settle();
    sim.resolve_all(|_| false);
    assert_eq!(sim.release.status, Status::RolledBack);
    assert!(
        sim.world
            .running()
            .iter()
            .all(|(ver, on)| *ver == v("v1") && *on)
    );
    assert!(sim.feed(Event::Rollback).rejected.is_some());
}

#[test]
fn dual_deployment_on_hosts_adds_before_it_removes() {
    let r = hosts_release(2, Strategy::DualDeployment, 2, Pause::Manual);
    assert_eq!(r.plan.floor, 2);
    let t = go(&r, Event::Start);
    assert_eq!(
        commands(&t),
        vec![
            Command::StartNew {
                instance: InstanceId("vm-0:0@green".into()),
                version: v("v2"),
                generation: 1
            },
            Command::StartNew {
                instance: InstanceId("vm-1:0@green".into()),
                version: v("v2"),
                generation: 2
            },
        ]
    );
    let t = chain(&t.release, done(&t));
    let t = chain(
        &t.release,
        vec![
            online("vm-0:0@green", Track::Green, "v2", Some(1)),
            online("vm-1:0@green", Track::Green, "v2", Some(2)),
        ],
    );
    assert_eq!(
        commands(&t),
        vec![Command::TakeOffline {
            instances: Instances::Listed(ids(&["vm-0:0@blue", "vm-1:0@blue"]))
        }]
    );
    let t = chain(&t.release, done(&t));
    assert_eq!(
        commands(&t),
        vec![Command::Stop {
            instances: ids(&["vm-0:0@blue", "vm-1:0@blue"])
        }]
    );
    let t = chain(&t.release, done(&t));
    assert_eq!(t.release.status, Status::Succeeded);
}

fn kube_release(strategy: Strategy, replicas: u32, batches: u32, pause: Pause) -> Sim {
    let (world, events) = World::kube(replicas, &v("v1"));
    let r = Release::new(
        "k1",
        v("v1"),
        v("v2"),
        replicas,
        Fleet::kubernetes(Track::Blue, &v("v1"), replicas),
        settings(strategy, count(batches), pause),
    )
    .unwrap();
    Sim::new(r, world, events)
}

#[test]
fn in_place_on_kubernetes_scales_old_down_then_new_up() {
    let mut sim = kube_release(Strategy::InPlace, 4, 2, Pause::Manual);
    let t = sim.feed(Event::Start);
    assert_eq!(
        commands(&t),
        vec![Command::ScaleTrack {
            track: Track::Blue,
            version: v("v1"),
            replicas: 2
        }]
    );
    sim.settle();
    assert_eq!(sim.world.online(), 2);
    assert_eq!(sim.world.track_replicas(Track::Green), 2);
    sim.resolve_all(|_| false);
    assert!(matches!(sim.release.status, Status::Paused { .. }));
    assert_eq!(sim.world.online(), 4);
    sim.feed(Event::Resume);
    sim.settle();
    sim.resolve_all(|_| false);
    assert_eq!(sim.release.status, Status::Succeeded);
    assert_eq!(sim.world.track_replicas(Track::Blue), 0);
    assert_eq!(sim.world.track_replicas(Track::Green), 4);
    let s = summarize(&sim.release);
    assert_eq!(
        s.tracks.iter().map(|t| t.replicas).collect::<Vec<_>>(),
        vec![0, 4]
    );
    assert!(
        s.instances
            .iter()
            .all(|i| i.version == v("v2") && i.traffic)
    );
}

#[test]
fn abort_on_kubernetes_restores_old_capacity_and_takes_the_new_track_offline() {
    let mut sim = kube_release(Strategy::InPlace, 4, 2, Pause::Manual);
    sim.feed(Event::Start);
    sim.settle();
    // Old track at 2, two new pods starting; one comes ONLINE.
    let first = sim.world.starting()[0].clone();
    let events = sim.world.resolve(&first, false);
    sim.inbox.extend(events);
    sim.settle();
    let t = sim.feed(Event::Abort { keep_online: false });
    assert_eq!(
        commands(&t),
        vec![
            Command::ScaleTrack {
                track: Track::Blue,
                version: v("v1"),
                replicas: 4
            },
            Command::TakeOffline {
                instances: Instances::Track {
                    track: Track::Green,
                    version: v("v2")
                }
            },
        ]
    );
    sim.settle();
    sim.resolve_all(|_| false);
    assert_eq!(sim.release.status, Status::Aborted { keep_online: false });
    assert!(
        sim.world
            .running()
            .iter()
            .all(|(ver, on)| *on == (*ver == v("v1")))
    );
    assert_eq!(sim.world.online(), 4);
}

#[test]
fn recreate_on_kubernetes_deletes_the_failed_pod_and_counts_its_successor() {
    let mut sim = kube_release(Strategy::DualDeployment, 2, 1, Pause::Manual);
    sim.release.settings.failed_instances = FailedInstancePolicy::Recreate { max_attempts: 2 };
    sim.feed(Event::Start);
    sim.settle();
    let pods = sim.world.starting();
    assert_eq!(pods.len(), 2);
    let events = sim.world.resolve(&pods[0], true);
    sim.inbox.extend(events);
    sim.settle();
    let o = &sim.release.outcomes[0];
    assert_eq!((o.attempts, o.state), (2, OutcomeState::Starting));
    assert!(sim.release.retired.contains(&pods[0]));
    // The ReplicaSet's new pod fills the same position.
    sim.resolve_all(|_| false);
    assert_eq!(sim.release.status, Status::Succeeded);
    assert_eq!(sim.release.outcomes[0].attempts, 2);
    assert_eq!(sim.release.outcomes[1].attempts, 1);
}

#[test]
fn rolling_on_kubernetes_pauses_the_rollout_between_batches() {
    let mut sim = kube_release(Strategy::Rolling, 4, 2, Pause::Manual);
    let t = sim.feed(Event::Start);
    assert_eq!(
        commands(&t),
        vec![Command::RollTrack {
            track: Track::Blue,
            version: v("v2"),
            replicas: 4,
            max_unavailable: 2
        }]
    );
    sim.settle();
    sim.resolve_all(|_| false);
    assert!(matches!(sim.release.status, Status::Paused { .. }));
    let versions = sim.world.running();
    assert!(versions.iter().filter(|(ver, _)| *ver == v("v2")).count() >= 2);
    let t = sim.feed(Event::Resume);
    assert_eq!(
        commands(&t),
        vec![Command::ResumeRollout { track: Track::Blue }]
    );
    sim.settle();
    sim.resolve_all(|_| false);
    sim.resolve_all(|_| false);
    assert_eq!(sim.release.status, Status::Succeeded);
    assert!(
        sim.world
            .running()
            .iter()
            .all(|(ver, on)| *ver == v("v2") && *on)
    );
}

#[test]
fn a_failed_action_fails_the_release() {
    let r = hosts_release(2, Strategy::InPlace, 1, Pause::Manual);
    let t = go(&r, Event::Start);
    let step_id = t.actions[0].id.clone();
    let t = go(
        &t.release,
        Event::ActionFailed {
            step: step_id,
            error: "agent on vm-0 unreachable".into(),
        },
    );
    let Status::Failed { reason } = &t.release.status else {
        panic!("{:?}", t.release.status)
    };
    assert!(reason.contains("r1/forward/b0/s0/take-offline/a1") && reason.contains("unreachable"));
}

#[test]
fn a_stored_release_resumes_exactly_where_it_was() {
    // Run a release, storing it as JSON after every step; at each point a
    // restored copy must make the same decision as the original.
    let mut sim = kube_release(
        Strategy::DualDeployment,
        3,
        3,
        Pause::For(Duration::from_secs(5)),
    );
    sim.feed(Event::Start);
    let mut checked = 0;
    while !sim.release.status.is_terminal() {
        let stored = serde_json::to_string(&sim.release).unwrap();
        let restored: Release = serde_json::from_str(&stored).unwrap();
        let input = if let Some(e) = sim.inbox.front() {
            Input {
                now: sim.now,
                event: e.clone(),
            }
        } else {
            Input {
                now: sim.now.plus_millis(5_000),
                event: Event::Tick,
            }
        };
        assert_eq!(step(&restored, &input), step(&sim.release, &input));
        checked += 1;
        if sim.inbox.is_empty() {
            match sim.world.starting().first() {
                None => sim.advance(5_000),
                Some(pod) => {
                    let events = sim.world.resolve(&pod.clone(), false);
                    sim.inbox.extend(events);
                }
            }
        } else {
            let e = sim.inbox.pop_front().unwrap();
            sim.feed(e);
        }
        assert!(checked < 500);
    }
    assert_eq!(sim.release.status, Status::Succeeded);
    assert!(checked > 10);
}

#[test]
fn a_user_pause_during_an_automatic_pause_waits_for_resume() {
    let r = hosts_release(2, Strategy::InPlace, 1, Pause::For(Duration::from_secs(30)));
    let mut sim = Sim::new(r, World::hosts(2, &v("v1")), Vec::new());
    sim.feed(Event::Start);
    sim.settle();
    sim.resolve_all(|_| false);
    assert!(matches!(
        sim.release.status,
        Status::Pausing { next: 1, .. }
    ));
    sim.feed(Event::Pause);
    // The automatic pause's end no longer moves it.
    sim.advance(60_000);
    assert!(matches!(
        sim.release.status,
        Status::Paused { reason: PauseReason::User, at } if at.batch == 1 && !at.entered
    ));
    let t = sim.feed(Event::Resume);
    assert!(matches!(
        commands(&t).as_slice(),
        [Command::TakeOffline { .. }]
    ));
}

#[test]
fn aborting_during_an_automatic_pause_takes_the_new_batch_offline() {
    let r = hosts_release(2, Strategy::InPlace, 1, Pause::For(Duration::from_secs(30)));
    let mut sim = Sim::new(r, World::hosts(2, &v("v1")), Vec::new());
    sim.feed(Event::Start);
    sim.settle();
    sim.resolve_all(|_| false);
    let t = sim.feed(Event::Abort { keep_online: false });
    assert_eq!(
        commands(&t),
        vec![Command::TakeOffline {
            instances: Instances::Listed(ids(&["vm-0:0@blue"]))
        }]
    );
    sim.settle();
    assert_eq!(sim.release.status, Status::Aborted { keep_online: false });
    assert_eq!(sim.world.online(), 1);
    let s = summarize(&sim.release);
    let traffic: Vec<_> = s
        .instances
        .iter()
        .map(|i| (i.instance.0.as_str(), i.version.0.as_str(), i.traffic))
        .collect();
    assert_eq!(
        traffic,
        vec![("vm-0:0@blue", "v2", false), ("vm-1:0@blue", "v1", true)]
    );
}

#[test]
fn rollback_mid_release_finishes_the_step_in_flight_then_goes_back() {
    let r = hosts_release(4, Strategy::InPlace, 2, Pause::Manual);
    let mut sim = Sim::new(r, World::hosts(4, &v("v1")), Vec::new());
    sim.feed(Event::Start);
    // The first batch is taken offline; the replacements are issued.
    let offline = sim.inbox.pop_back().unwrap();
    sim.settle();
    sim.feed(offline);
    assert_eq!(sim.release.pending.len(), 2);
    let t = sim.feed(Event::Rollback);
    assert!(t.actions.is_empty());
    assert_eq!(sim.release.status, Status::RollingBack);
    sim.settle();
    assert_eq!(sim.release.phase, Phase::Rollback);
    // Only the two replaced slots go back.
    assert_eq!(
        sim.release.plan.batches.iter().map(|b| b.size).sum::<u32>(),
        2
    );
    sim.resolve_all(|_| false);
    sim.resolve_all(|_| false);
    assert_eq!(sim.release.status, Status::RolledBack);
    assert!(
        sim.world
            .running()
            .iter()
            .all(|(ver, on)| *ver == v("v1") && *on)
    );
    assert_eq!(summarize(&sim.release).phase, "rollback");
}

#[test]
fn a_failed_release_can_be_rolled_back() {
    let mut sim = kube_release(Strategy::DualDeployment, 4, 2, Pause::Manual);
    sim.feed(Event::Start);
    sim.settle();
    sim.resolve_all(|id| id.0.ends_with("0001"));
    assert!(matches!(sim.release.status, Status::Failed { .. }));
    sim.feed(Event::Rollback);
    sim.settle();
    sim.resolve_all(|_| false);
    assert_eq!(sim.release.status, Status::RolledBack);
    assert_eq!(sim.world.track_replicas(Track::Blue), 4);
    assert_eq!(sim.world.track_replicas(Track::Green), 0);
    assert!(
        sim.world
            .running()
            .iter()
            .all(|(ver, on)| *ver == v("v1") && *on)
    );
}

#[test]
fn an_exited_instance_counts_as_failed() {
    let r = waiting(FailedInstancePolicy::Fail);
    let t = go(
        &r,
        Event::Instance(InstanceEvent {
            instance: InstanceId("vm-0:0@blue".into()),
            track: Track::Blue,
            version: v("v2"),
            generation: Some(1),
            change: InstanceChange::Exited { code: Some(137) },
        }),
    );
    let Status::Failed { reason } = &t.release.status else {
        panic!("{:?}", t.release.status)
    };
    assert!(reason.contains("exited with code 137"), "{reason}");
}

#[test]
fn news_of_a_replaced_process_does_not_undo_the_replacement() {
    let r = waiting(FailedInstancePolicy::Fail);
    // The old v1 process's last words arrive after its replacement started.
    let t = go(
        &r,
        Event::Instance(InstanceEvent {
            instance: InstanceId("vm-0:0@blue".into()),
            track: Track::Blue,
            version: v("v1"),
            generation: None,
            change: InstanceChange::Exited { code: Some(0) },
        }),
    );
    assert_eq!(t.release, r);
    // A stopped process does not come back either.
    let hosts = |r: &Release| match &r.fleet {
        Fleet::Hosts { instances } => instances.clone(),
        _ => unreachable!(),
    };
    assert_eq!(hosts(&t.release)[0].version, v("v2"));
}

#[test]
fn an_action_that_fails_while_aborting_does_not_stop_the_abort() {
    let r = hosts_release(2, Strategy::InPlace, 2, Pause::Manual);
    let t = go(&r, Event::Start);
    let aborting = go(&t.release, Event::Abort { keep_online: false });
    let t = go(
        &aborting.release,
        Event::ActionFailed {
            step: t.actions[0].id.clone(),
            error: "agent unreachable".into(),
        },
    );
    // Nothing was replaced, so nothing new is taken offline; the old
    // instances may have gone offline before the failure and come back.
    assert_eq!(
        commands(&t),
        vec![Command::BringOnline {
            instances: Instances::Listed(ids(&["vm-0:0@blue", "vm-1:0@blue"]))
        }]
    );
    let t = chain(&t.release, done(&t));
    assert_eq!(t.release.status, Status::Aborted { keep_online: false });
}

#[test]
fn a_tolerated_pod_in_a_rollout_gets_room_of_its_own() {
    let mut sim = kube_release(Strategy::Rolling, 4, 4, Pause::For(Duration::from_secs(0)));
    sim.release.settings.failed_instances = FailedInstancePolicy::Tolerate { max_ratio: 0.25 };
    sim.feed(Event::Start);
    sim.settle();
    // The first new pod fails: with maxUnavailable 1 the rollout would stop.
    let first = sim.world.starting()[0].clone();
    let events = sim.world.resolve(&first, true);
    sim.inbox.extend(events);
    sim.settle();
    let widened = sim.actions.iter().find_map(|a| match a.command {
        Command::RollTrack {
            max_unavailable, ..
        } if a.id.attempt == 2 => Some(max_unavailable),
        _ => None,
    });
    assert_eq!(widened, Some(2));
    while !sim.world.starting().is_empty() {
        sim.resolve_all(|_| false);
    }
    assert_eq!(sim.release.status, Status::Succeeded);
    let running = sim.world.running();
    assert!(running.iter().all(|(ver, _)| *ver == v("v2")));
    assert_eq!(running.iter().filter(|(_, on)| *on).count(), 3);
    assert_eq!(
        sim.release
            .outcomes
            .iter()
            .filter(|o| o.state == OutcomeState::Tolerated)
            .count(),
        1
    );
}

#[test]
fn a_rollback_waits_for_removed_pods_to_be_reported_gone() {
    let mut sim = kube_release(Strategy::InPlace, 2, 2, Pause::Manual);
    let t = sim.feed(Event::Start);
    // The old track is scaled down; its pod's removal is not reported yet.
    let done = Event::Done {
        step: t.actions[0].id.clone(),
    };
    sim.inbox.clear();
    sim.feed(Event::Rollback);
    let t = sim.feed(done);
    assert!(t.actions.is_empty(), "{:?}", t.actions);
    assert_eq!(sim.release.status, Status::RollingBack);
    sim.advance(599_999);
    assert_eq!(sim.release.status, Status::RollingBack);
    sim.advance(1);
    let Status::Failed { reason } = &sim.release.status else {
        panic!("{:?}", sim.release.status)
    };
    assert!(reason.contains("not reported gone"), "{reason}");
}

#[test]
fn a_fresh_process_reporting_before_its_start_is_confirmed_counts_as_online() {
    let r = hosts_release(4, Strategy::InPlace, 2, Pause::Manual);
    let t = go(&r, Event::Start);
    // The old processes are held offline, then replaced.
    let t = chain(&t.release, done(&t));
    let replacing = done(&t);
    let hosts = |r: &Release| match &r.fleet {
        Fleet::Hosts { instances } => instances.clone(),
        _ => unreachable!(),
    };
    assert!(hosts(&t.release)[0].held);
    // The new process of vm-0 reports ONLINE before its replacement's
    // completion: it is a process this release started, not the held one.
    let early = go(
        &t.release,
        online("vm-0:0@blue", Track::Blue, "v2", Some(1)),
    );
    let vm0 = hosts(&early.release)[0].clone();
    assert_eq!(
        (vm0.state, vm0.held, vm0.version.clone()),
        (InstanceState::Online, false, v("v2"))
    );
    // The completion then changes nothing about it.
    let t = chain(&early.release, replacing);
    let vm0 = hosts(&t.release)[0].clone();
    assert_eq!((vm0.state, vm0.held), (InstanceState::Online, false));
    // Aborting now takes it offline: it is known to take traffic.
    let t = go(&t.release, Event::Abort { keep_online: false });
    assert_eq!(
        commands(&t),
        vec![Command::TakeOffline {
            instances: Instances::Listed(ids(&["vm-0:0@blue", "vm-1:0@blue"]))
        }]
    );
    // News of the held process itself (same generation) keeps its hold.
    let t = chain(&t.release, done(&t));
    let again = go(
        &t.release,
        online("vm-0:0@blue", Track::Blue, "v2", Some(1)),
    );
    assert_eq!(hosts(&again.release)[0].state, InstanceState::Offline);
    let s = summarize(&again.release);
    assert!(
        s.instances
            .iter()
            .all(|i| !i.traffic || i.version == v("v1")),
        "{s:?}"
    );
}

#[test]
fn a_release_after_another_hands_out_newer_generations() {
    // The processes run what an earlier release started (generations 1–4).
    let mut fleet = World::fleet_of_hosts(2, &v("v2"));
    if let Fleet::Hosts { instances } = &mut fleet {
        instances[0].generation = Some(3);
        instances[1].generation = Some(4);
    }
    let r = Release::new(
        "r2",
        v("v2"),
        v("v3"),
        2,
        fleet,
        settings(Strategy::InPlace, size(1), Pause::Manual),
    )
    .unwrap();
    let t = go(&r, Event::Start);
    let t = chain(&t.release, done(&t));
    assert_eq!(
        commands(&t),
        vec![Command::StopAndReplace {
            instance: InstanceId("vm-0:0@blue".into()),
            version: v("v3"),
            generation: 5
        }]
    );
    // The new process's news counts (it is not older than the fleet's).
    let t = chain(&t.release, done(&t));
    let t = go(
        &t.release,
        online("vm-0:0@blue", Track::Blue, "v3", Some(5)),
    );
    assert!(
        matches!(t.release.status, Status::Paused { .. }),
        "{:?}",
        t.release.status
    );
}
