//! A simulated runtime for release tests: it applies the machine's actions
//! to its own model of hosts or of a Kubernetes Deployment controller, and
//! produces the events a real runtime would push. The model is independent
//! of the machine's own bookkeeping, so the properties are checked against
//! what would really run.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};

use keelson_core::profile::{Batches, Duration, Pause, Strategy};
use keelson_core::release::*;

pub fn v(s: &str) -> Version {
    Version(s.to_string())
}

pub fn settings(strategy: Strategy, batches: Option<Batches>, pause: Pause) -> ReleaseSettings {
    ReleaseSettings {
        strategy,
        batches,
        pause,
        failed_instances: FailedInstancePolicy::Fail,
        progress_deadline: Duration::from_secs(600),
    }
}

pub fn count(n: u32) -> Option<Batches> {
    Some(Batches {
        count: Some(n),
        size: None,
    })
}

pub fn size(n: u32) -> Option<Batches> {
    Some(Batches {
        count: None,
        size: Some(n),
    })
}

#[derive(Debug, Clone)]
pub struct HostProc {
    pub track: Track,
    pub version: Version,
    pub running: bool,
    pub starting: bool,
    pub failed: bool,
    pub online: bool,
    pub held: bool,
    pub generation: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct SimTrack {
    pub version: Option<Version>,
    pub replicas: u32,
    pub paused: bool,
    pub rolling: bool,
    pub max_unavailable: u32,
}

#[derive(Debug, Clone)]
pub struct SimPod {
    pub track: Track,
    pub version: Version,
    pub starting: bool,
    pub failed: bool,
    pub online: bool,
    pub held: bool,
}

#[derive(Debug, Clone)]
pub enum World {
    Hosts(BTreeMap<InstanceId, HostProc>),
    Kube {
        tracks: BTreeMap<Track, SimTrack>,
        pods: BTreeMap<InstanceId, SimPod>,
        next: u32,
        held: Vec<(Track, Version)>,
    },
}

impl World {
    pub fn hosts(slots: u32, version: &Version) -> Self {
        World::Hosts(
            (0..slots)
                .map(|i| {
                    (
                        HostInstance::id_of(&format!("vm-{i}:0"), Track::Blue),
                        HostProc {
                            track: Track::Blue,
                            version: version.clone(),
                            running: true,
                            starting: false,
                            failed: false,
                            online: true,
                            held: false,
                            generation: None,
                        },
                    )
                })
                .collect(),
        )
    }

    pub fn fleet_of_hosts(slots: u32, version: &Version) -> Fleet {
        let names: Vec<String> = (0..slots).map(|i| format!("vm-{i}:0")).collect();
        Fleet::hosts(&names, version)
    }

    /// `replicas` ONLINE pods of `version` on blue; the events announcing
    /// them are returned so the machine learns the pods.
    pub fn kube(replicas: u32, version: &Version) -> (Self, Vec<Event>) {
        Self::kube_two(replicas, version, 0, version)
    }

    /// Blue with `blue` pods of `old`, green with `green` pods of `new`
    /// (a release interrupted earlier), all ONLINE; with the fleet the
    /// machine starts from and the events announcing the pods.
    pub fn kube_two(blue: u32, old: &Version, green: u32, new: &Version) -> (Self, Vec<Event>) {
        let (mut world, mut events) = Self::kube_blue(blue, old);
        let World::Kube { tracks, pods, .. } = &mut world else {
            unreachable!()
        };
        if green > 0 {
            let t = tracks.get_mut(&Track::Green).unwrap();
            t.version = Some(new.clone());
            t.replicas = green;
            for i in 0..green {
                let name = InstanceId(format!("green-old-{i}"));
                pods.insert(
                    name.clone(),
                    SimPod {
                        track: Track::Green,
                        version: new.clone(),
                        starting: false,
                        failed: false,
                        online: true,
                        held: false,
                    },
                );
                events.push(event(
                    &name,
                    Track::Green,
                    new,
                    None,
                    InstanceChange::Online,
                ));
            }
        }
        (world, events)
    }

    /// The fleet a machine starts from for [`World::kube_two`].
    pub fn fleet_of_kube(blue: u32, old: &Version, green: u32, new: &Version) -> Fleet {
        let Fleet::Kubernetes { mut tracks, pods } = Fleet::kubernetes(Track::Blue, old, blue)
        else {
            unreachable!()
        };
        if green > 0 {
            tracks[1].version = Some(new.clone());
            tracks[1].replicas = green;
        }
        Fleet::Kubernetes { tracks, pods }
    }

    /// Hosts whose first `ahead` slots run `new` already.
    pub fn hosts_ahead(slots: u32, old: &Version, ahead: u32, new: &Version) -> (Self, Fleet) {
        let mut world = Self::hosts(slots, old);
        let mut fleet = Self::fleet_of_hosts(slots, old);
        let (World::Hosts(procs), Fleet::Hosts { instances }) = (&mut world, &mut fleet) else {
            unreachable!()
        };
        for (p, i) in procs
            .values_mut()
            .zip(instances.iter_mut())
            .take(ahead as usize)
        {
            p.version = new.clone();
            i.version = new.clone();
        }
        (world, fleet)
    }

    fn kube_blue(replicas: u32, version: &Version) -> (Self, Vec<Event>) {
        let mut tracks = BTreeMap::new();
        tracks.insert(
            Track::Blue,
            SimTrack {
                version: Some(version.clone()),
                replicas,
                paused: false,
                rolling: false,
                max_unavailable: 1,
            },
        );
        tracks.insert(
            Track::Green,
            SimTrack {
                version: None,
                replicas: 0,
                paused: false,
                rolling: false,
                max_unavailable: 1,
            },
        );
        let mut pods = BTreeMap::new();
        let mut events = Vec::new();
        for i in 0..replicas {
            let name = InstanceId(format!("blue-old-{i}"));
            pods.insert(
                name.clone(),
                SimPod {
                    track: Track::Blue,
                    version: version.clone(),
                    starting: false,
                    failed: false,
                    online: true,
                    held: false,
                },
            );
            events.push(Event::Instance(InstanceEvent {
                instance: name,
                track: Track::Blue,
                version: version.clone(),
                generation: None,
                change: InstanceChange::Online,
            }));
        }
        (
            World::Kube {
                tracks,
                pods,
                next: 0,
                held: Vec::new(),
            },
            events,
        )
    }

    /// Instances taking traffic.
    pub fn online(&self) -> u32 {
        match self {
            World::Hosts(p) => p.values().filter(|p| p.running && p.online).count() as u32,
            World::Kube { pods, .. } => pods.values().filter(|p| p.online).count() as u32,
        }
    }

    /// Instances that failed and stay failed (not the release's doing).
    pub fn failed(&self) -> u32 {
        match self {
            World::Hosts(p) => p.values().filter(|p| p.running && p.failed).count() as u32,
            World::Kube { pods, .. } => pods.values().filter(|p| p.failed).count() as u32,
        }
    }

    /// (version, online) of every running instance.
    pub fn running(&self) -> Vec<(Version, bool)> {
        match self {
            World::Hosts(p) => p
                .values()
                .filter(|p| p.running)
                .map(|p| (p.version.clone(), p.online))
                .collect(),
            World::Kube { pods, .. } => pods
                .values()
                .map(|p| (p.version.clone(), p.online))
                .collect(),
        }
    }

    /// (id, version, online) of every running instance the release started.
    pub fn started(&self) -> Vec<(InstanceId, Version, bool)> {
        match self {
            World::Hosts(p) => p
                .iter()
                .filter(|(_, p)| p.running && p.generation.is_some())
                .map(|(id, p)| (id.clone(), p.version.clone(), p.online))
                .collect(),
            World::Kube { pods, .. } => pods
                .iter()
                .filter(|(name, _)| !name.0.contains("-old-"))
                .map(|(id, p)| (id.clone(), p.version.clone(), p.online))
                .collect(),
        }
    }

    pub fn track_replicas(&self, track: Track) -> u32 {
        match self {
            World::Kube { tracks, .. } => tracks[&track].replicas,
            World::Hosts(_) => 0,
        }
    }

    pub fn starting(&self) -> Vec<InstanceId> {
        match self {
            World::Hosts(p) => p
                .iter()
                .filter(|(_, p)| p.running && p.starting)
                .map(|(k, _)| k.clone())
                .collect(),
            World::Kube { pods, .. } => pods
                .iter()
                .filter(|(_, p)| p.starting)
                .map(|(k, _)| k.clone())
                .collect(),
        }
    }
}

fn event(
    instance: &InstanceId,
    track: Track,
    version: &Version,
    generation: Option<u64>,
    change: InstanceChange,
) -> Event {
    Event::Instance(InstanceEvent {
        instance: instance.clone(),
        track,
        version: version.clone(),
        generation,
        change,
    })
}

impl World {
    /// Applies an action; returns the events it causes (its Done last).
    pub fn apply(&mut self, action: &Action) -> Vec<Event> {
        let mut events = Vec::new();
        if !action.command.needs_completion() {
            return events; // waits, pauses and the finish notice
        }
        match (&mut *self, &action.command) {
            (World::Hosts(procs), command) => match command {
                Command::TakeOffline {
                    instances: Instances::Listed(ids),
                } => {
                    for id in ids {
                        if let Some(p) = procs.get_mut(id) {
                            p.held = true;
                            if p.online {
                                p.online = false;
                                events.push(event(
                                    id,
                                    p.track,
                                    &p.version,
                                    p.generation,
                                    InstanceChange::Offline,
                                ));
                            }
                        }
                    }
                }
                Command::BringOnline {
                    instances: Instances::Listed(ids),
                } => {
                    for id in ids {
                        if let Some(p) = procs.get_mut(id) {
                            p.held = false;
                            if p.running && !p.starting && !p.failed && !p.online {
                                p.online = true;
                                events.push(event(
                                    id,
                                    p.track,
                                    &p.version,
                                    p.generation,
                                    InstanceChange::Online,
                                ));
                            }
                        }
                    }
                }
                Command::StopAndReplace {
                    instance,
                    version,
                    generation,
                }
                | Command::Recreate {
                    instance,
                    version,
                    generation,
                }
                | Command::StartNew {
                    instance,
                    version,
                    generation,
                } => {
                    let track = if instance.0.ends_with("@green") {
                        Track::Green
                    } else {
                        Track::Blue
                    };
                    // A fresh start is not held offline.
                    let held = false;
                    procs.insert(
                        instance.clone(),
                        HostProc {
                            track,
                            version: version.clone(),
                            running: true,
                            starting: true,
                            failed: false,
                            online: false,
                            held,
                            generation: Some(*generation),
                        },
                    );
                }
                Command::Stop { instances } => {
                    for id in instances {
                        if let Some(p) = procs.get_mut(id) {
                            p.running = false;
                            p.online = false;
                            p.starting = false;
                        }
                    }
                }
                other => panic!("hosts cannot {other:?}"),
            },
            (
                World::Kube {
                    tracks, pods, held, ..
                },
                command,
            ) => {
                match command {
                    Command::ScaleTrack {
                        track,
                        version,
                        replicas,
                    } => {
                        let t = tracks.get_mut(track).unwrap();
                        t.version = Some(version.clone());
                        t.replicas = *replicas;
                        held.retain(|h| h != &(*track, version.clone()));
                    }
                    Command::RollTrack {
                        track,
                        version,
                        replicas,
                        max_unavailable,
                    } => {
                        let t = tracks.get_mut(track).unwrap();
                        t.version = Some(version.clone());
                        t.replicas = *replicas;
                        t.rolling = true;
                        t.paused = false;
                        t.max_unavailable = *max_unavailable;
                        held.retain(|h| h != &(*track, version.clone()));
                    }
                    Command::PauseRollout { track } => tracks.get_mut(track).unwrap().paused = true,
                    Command::ResumeRollout { track } => {
                        tracks.get_mut(track).unwrap().paused = false
                    }
                    Command::Recreate { instance, .. } => {
                        if let Some(p) = pods.remove(instance) {
                            events.push(event(
                                instance,
                                p.track,
                                &p.version,
                                None,
                                InstanceChange::Gone,
                            ));
                        }
                    }
                    Command::TakeOffline { instances } => {
                        if let Instances::Track { track, version } = instances {
                            held.push((*track, version.clone()));
                        }
                        for (name, p) in pods.iter_mut() {
                            let chosen = match instances {
                                Instances::Listed(ids) => ids.contains(name),
                                Instances::Track { track, version } => {
                                    p.track == *track && p.version == *version
                                }
                            };
                            if chosen {
                                p.held = true;
                                if p.online {
                                    p.online = false;
                                    events.push(event(
                                        name,
                                        p.track,
                                        &p.version,
                                        None,
                                        InstanceChange::Offline,
                                    ));
                                }
                            }
                        }
                    }
                    other => panic!("kubernetes cannot {other:?}"),
                }
                events.extend(self.reconcile());
            }
        }
        if action.command.needs_completion() {
            events.push(Event::Done {
                step: action.id.clone(),
            });
        }
        events
    }

    /// The Deployment and ReplicaSet controllers.
    pub fn reconcile(&mut self) -> Vec<Event> {
        let World::Kube {
            tracks,
            pods,
            next,
            held,
        } = self
        else {
            return Vec::new();
        };
        let mut events = Vec::new();
        for (track, t) in tracks.iter() {
            let Some(version) = t.version.clone() else {
                continue;
            };
            // Rolling update, maxSurge 0: replace an old pod while fewer than
            // maxUnavailable are unavailable.
            if t.rolling && !t.paused {
                loop {
                    let mine: Vec<(&InstanceId, &SimPod)> =
                        pods.iter().filter(|(_, p)| p.track == *track).collect();
                    let online = mine.iter().filter(|(_, p)| p.online).count() as u32;
                    let unavailable = t.replicas.saturating_sub(online);
                    let old = mine
                        .iter()
                        .filter(|(_, p)| p.version != version)
                        .min_by_key(|(_, p)| p.online)
                        .map(|(n, _)| (*n).clone());
                    let Some(old) = old else { break };
                    let old_online = pods[&old].online;
                    if old_online && unavailable >= t.max_unavailable {
                        break;
                    }
                    let p = pods.remove(&old).unwrap();
                    events.push(event(&old, p.track, &p.version, None, InstanceChange::Gone));
                    create(pods, next, *track, &version, held, &mut events);
                }
            }
            let count = pods.values().filter(|p| p.track == *track).count() as u32;
            for _ in count..t.replicas {
                create(pods, next, *track, &version, held, &mut events);
            }
            if count > t.replicas {
                let mut mine: Vec<(bool, InstanceId)> = pods
                    .iter()
                    .filter(|(_, p)| p.track == *track)
                    .map(|(n, p)| (p.online, n.clone()))
                    .collect();
                // Unready first, then the newest (names count up).
                mine.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
                for (_, name) in mine.into_iter().take((count - t.replicas) as usize) {
                    let p = pods.remove(&name).unwrap();
                    events.push(event(
                        &name,
                        p.track,
                        &p.version,
                        None,
                        InstanceChange::Gone,
                    ));
                }
            }
        }
        events
    }

    /// Resolves a starting instance: it fails, or comes ONLINE (unless held).
    pub fn resolve(&mut self, id: &InstanceId, fail: bool) -> Vec<Event> {
        let mut events = Vec::new();
        match self {
            World::Hosts(procs) => {
                let p = procs.get_mut(id).unwrap();
                p.starting = false;
                if fail {
                    p.failed = true;
                    events.push(event(
                        id,
                        p.track,
                        &p.version,
                        p.generation,
                        InstanceChange::Failed {
                            error: "injected".into(),
                        },
                    ));
                } else if !p.held {
                    p.online = true;
                    events.push(event(
                        id,
                        p.track,
                        &p.version,
                        p.generation,
                        InstanceChange::Online,
                    ));
                } else {
                    events.push(event(
                        id,
                        p.track,
                        &p.version,
                        p.generation,
                        InstanceChange::Offline,
                    ));
                }
            }
            World::Kube { pods, .. } => {
                let p = pods.get_mut(id).unwrap();
                p.starting = false;
                if fail {
                    p.failed = true;
                    events.push(event(
                        id,
                        p.track,
                        &p.version,
                        None,
                        InstanceChange::Failed {
                            error: "injected".into(),
                        },
                    ));
                } else if !p.held {
                    p.online = true;
                    events.push(event(id, p.track, &p.version, None, InstanceChange::Online));
                } else {
                    events.push(event(
                        id,
                        p.track,
                        &p.version,
                        None,
                        InstanceChange::Offline,
                    ));
                }
            }
        }
        events.extend(self.reconcile());
        events
    }
}

fn create(
    pods: &mut BTreeMap<InstanceId, SimPod>,
    next: &mut u32,
    track: Track,
    version: &Version,
    held: &[(Track, Version)],
    _events: &mut Vec<Event>,
) {
    *next += 1;
    pods.insert(
        InstanceId(format!("{track}-pod-{:04}", *next)),
        SimPod {
            track,
            version: version.clone(),
            starting: true,
            failed: false,
            online: false,
            held: held.contains(&(track, version.clone())),
        },
    );
}

/// Drives a release against the world.
pub struct Sim {
    pub now: Timestamp,
    pub release: Release,
    pub world: World,
    pub inbox: VecDeque<Event>,
    /// Every input applied, in order.
    pub inputs: Vec<Input>,
    pub steps: usize,
    /// Inputs and actions, for failure messages.
    pub log: Vec<String>,
    /// Every action issued.
    pub actions: Vec<Action>,
}

impl Sim {
    pub fn new(release: Release, world: World, initial: Vec<Event>) -> Self {
        let mut sim = Self {
            now: Timestamp(1_000_000),
            release,
            world,
            inbox: VecDeque::new(),
            inputs: Vec::new(),
            steps: 0,
            log: Vec::new(),
            actions: Vec::new(),
        };
        for e in initial {
            sim.feed(e);
        }
        sim
    }

    /// Applies one event to the machine and the resulting actions to the
    /// world; returns the transition's actions.
    pub fn feed(&mut self, event: Event) -> Transition {
        let input = Input {
            now: self.now,
            event,
        };
        let t = step(&self.release, &input);
        self.log.push(format!("IN  {:?}", input.event));
        for a in &t.actions {
            self.log.push(format!("    -> {} {:?}", a.id, a.command));
        }
        self.log.push(format!("    status {:?}", t.release.status));
        self.inputs.push(input);
        self.steps += 1;
        for a in &t.actions {
            let events = self.world.apply(a);
            self.inbox.extend(events);
        }
        self.actions.extend(t.actions.iter().cloned());
        self.release = t.release.clone();
        t
    }

    /// Delivers queued events until none is left.
    pub fn settle(&mut self) {
        while let Some(e) = self.inbox.pop_front() {
            self.feed(e);
        }
    }

    /// Resolves every starting instance (failing those `fail` names).
    pub fn resolve_all(&mut self, fail: impl Fn(&InstanceId) -> bool) {
        for id in self.world.starting() {
            let events = self.world.resolve(&id, fail(&id));
            self.inbox.extend(events);
        }
        self.settle();
    }

    pub fn advance(&mut self, millis: u64) {
        self.now = self.now.plus_millis(millis);
        self.feed(Event::Tick);
    }
}
