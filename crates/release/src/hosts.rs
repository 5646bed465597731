//! The hosts runtime: an app's instances on plain hosts (VMs) that run
//! `keelson-agent host`, driven through their daemons' API.
//!
//! ```text
//!  slot = a host; instance `<host>@<track>` = daemon instance `<app>-<env>-<track>`
//!  StopAndReplace/StartNew/Recreate ─► (already this generation? done) stop ─► deploy(start, generation)
//!  TakeOffline ─► hold          BringOnline ─► release          Stop ─► stop
//!  events: every instance's view first, then the hosts' event streams (keelson_hosts::HostEvents,
//!          replayed from the start of each instance's log, so nothing is missed across a crash)
//! hook output: `hook_started` (a run at least as new as a subscriber's `since`) ─► follow that
//!          instance's log from there, pass on `[<hook>] …` lines, stop at its `hook_finished`
//! ```
//!
//! The daemons carry what makes the commands idempotent: a start is tagged
//! with the release's generation and reported back in the instance's view,
//! and a hold survives restarts of the app and of the daemon. What a version
//! means on a host (the command, its files, the lifecycle document) comes
//! from a [`DeployFn`] given by whoever builds the runtime.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use keelson_agent_lifecycle::host::api::{DeployRequest, InstanceView, SupervisorState};
use keelson_core::release::{
    Action, Command, Fleet, HostInstance, InstanceChange, InstanceEvent, InstanceState, Instances,
    Timestamp, Track, Version,
};
use keelson_hosts::{HostClient, HostEvents, HostRecord, StartAt};
use keelson_store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::runtime::{HookOutput, HookSubscribers, Runtime, RuntimeError};

/// Where one start goes.
#[derive(Debug, Clone)]
pub struct DeployTarget<'a> {
    /// The app.
    pub app: &'a str,
    /// The environment.
    pub env: &'a str,
    /// The host (the slot).
    pub host: &'a str,
    /// The slot's track.
    pub track: Track,
    /// The version to run.
    pub version: &'a Version,
    /// The start's generation (`None` before any release).
    pub generation: Option<u64>,
}

/// Builds the daemon's deploy request for a start (without `start`,
/// `generation` and `version`, which the runtime sets).
pub type DeployFn = Arc<dyn Fn(&DeployTarget<'_>) -> DeployRequest + Send + Sync>;

/// One app in one environment on a set of hosts.
pub struct HostsRuntime {
    app: String,
    env: String,
    hosts: BTreeMap<String, HostClient>,
    deploy: DeployFn,
    subscribers: Arc<Mutex<Vec<mpsc::Sender<InstanceEvent>>>>,
    hooks: Arc<HookSubscribers>,
    /// The version each (host, daemon instance) runs, as last deployed or seen.
    versions: Arc<Mutex<HashMap<(String, String), Version>>>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for HostsRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostsRuntime")
            .field("app", &self.app)
            .field("env", &self.env)
            .field("hosts", &self.hosts.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Drop for HostsRuntime {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError(e.to_string())
}

impl HostsRuntime {
    /// A runtime for `app` in `env` on `hosts` (registered in `store`, whose
    /// registry the event stream follows), starting versions as `deploy`
    /// says. Call it inside a Tokio runtime: it starts following the hosts'
    /// events at once, until the runtime is dropped.
    pub fn new(
        store: Store,
        app: &str,
        env: &str,
        hosts: &[HostRecord],
        deploy: DeployFn,
    ) -> Result<Self, RuntimeError> {
        let clients = hosts
            .iter()
            .map(|h| HostClient::for_host(h).map(|c| (h.name.clone(), c)))
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(err)?;
        let runtime = Self {
            app: app.to_string(),
            env: env.to_string(),
            hosts: clients,
            deploy,
            subscribers: Arc::default(),
            hooks: Arc::default(),
            versions: Arc::default(),
            cancel: CancellationToken::new(),
        };
        runtime.follow(store);
        Ok(runtime)
    }

    /// The daemon's name for the instance on `track`.
    pub fn instance_name(&self, track: Track) -> String {
        format!("{}-{}-{}", self.app, self.env, track.as_str())
    }

    fn track_of(&self, name: &str) -> Option<Track> {
        [Track::Blue, Track::Green]
            .into_iter()
            .find(|t| self.instance_name(*t) == name)
    }

    fn client(&self, host: &str) -> Result<&HostClient, RuntimeError> {
        self.hosts
            .get(host)
            .ok_or_else(|| RuntimeError(format!("host {host:?} is not one of this app's hosts")))
    }

    /// Forwards the hosts' events about this app's instances to subscribers.
    fn follow(&self, store: Store) {
        // From the beginning of every instance's log: a runtime made after a
        // crash must not miss what happened while nobody listened (the
        // machine ignores news it already has, and news of replaced
        // processes by their generation).
        let registry = OwnHosts {
            store,
            names: self.hosts.keys().cloned().collect(),
        };
        let mut events = HostEvents::spawn(
            Arc::new(registry),
            StartAt::Beginning,
            1024,
            self.cancel.clone(),
        );
        let names: HashMap<String, Track> = [Track::Blue, Track::Green]
            .into_iter()
            .map(|t| (self.instance_name(t), t))
            .collect();
        let hosts: Vec<String> = self.hosts.keys().cloned().collect();
        let clients = self.hosts.clone();
        let subscribers = self.subscribers.clone();
        let versions = self.versions.clone();
        let hooks = self.hooks.clone();
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let (Some(track), true) = (names.get(&event.instance), hosts.contains(&event.host))
                else {
                    continue;
                };
                if event.name() == "hook_started"
                    && let (Some(client), Some(step), Some(run)) = (
                        clients.get(&event.host),
                        event.event["step"].as_str(),
                        event.event["ts"].as_str().and_then(parse_ts),
                    )
                    && hooks.wants(run)
                {
                    tokio::spawn(follow_hook(
                        client.clone(),
                        event.instance.clone(),
                        event.offset,
                        HostInstance::id_of(&event.host, *track),
                        step.to_string(),
                        run,
                        hooks.clone(),
                        cancel.clone(),
                    ));
                }
                let Some(change) = event.change() else {
                    continue;
                };
                let key = (event.host.clone(), event.instance.clone());
                let known = versions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&key)
                    .cloned();
                let version = match known {
                    Some(v) => v,
                    None => match clients.get(&event.host) {
                        Some(client) => match client.instance(&event.instance).await {
                            Ok(view) => Version(view.version.unwrap_or_default()),
                            Err(_) => continue,
                        },
                        None => continue,
                    },
                };
                let instance_event = InstanceEvent {
                    instance: HostInstance::id_of(&event.host, *track),
                    track: *track,
                    version,
                    generation: event.generation,
                    change,
                };
                broadcast(&subscribers, instance_event).await;
            }
        });
    }

    async fn view(&self, host: &str, name: &str) -> Result<Option<InstanceView>, RuntimeError> {
        let client = self.client(host)?;
        match client.instance(name).await {
            Ok(view) => Ok(Some(view)),
            Err(keelson_hosts::Error::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// Starts `version` on `host`'s `track` (stopping what runs there),
    /// unless this generation of this version already started.
    async fn start(
        &self,
        host: &str,
        track: Track,
        version: &Version,
        generation: Option<u64>,
    ) -> Result<(), RuntimeError> {
        let name = self.instance_name(track);
        let client = self.client(host)?;
        if let Some(view) = self.view(host, &name).await? {
            if view.generation == generation && view.version.as_deref() == Some(version.0.as_str())
            {
                return Ok(()); // started before (a crash came between start and record)
            }
            if !matches!(
                view.state,
                SupervisorState::Stopped | SupervisorState::Exited | SupervisorState::Failed
            ) {
                client.stop(&name).await.map_err(err)?;
            }
        }
        let mut request = (self.deploy)(&DeployTarget {
            app: &self.app,
            env: &self.env,
            host,
            track,
            version,
            generation,
        });
        request.version = Some(version.0.clone());
        request.start = true;
        request.generation = generation;
        self.versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((host.to_string(), name.clone()), version.clone());
        client.deploy(&name, &request).await.map_err(err)?;
        Ok(())
    }

    /// Deploys and starts `version` on every host's blue track as instances
    /// that predate any release.
    pub async fn deploy_all(&self, version: &Version) -> Result<(), RuntimeError> {
        for host in self.hosts.keys() {
            self.start(host, Track::Blue, version, None).await?;
        }
        Ok(())
    }

    /// Stops and deletes this app's instances on every host.
    pub async fn remove_all(&self) {
        for (host, client) in &self.hosts {
            for track in [Track::Blue, Track::Green] {
                let name = self.instance_name(track);
                if let Ok(Some(_)) = self.view(host, &name).await {
                    let _ = client.stop(&name).await;
                    let _ = client.delete(&name).await;
                }
            }
        }
    }

    /// Runs `call` on every target's host at once; the first error wins.
    async fn on_each<F, Fut>(
        &self,
        targets: Vec<(String, Track)>,
        call: F,
    ) -> Result<(), RuntimeError>
    where
        F: Fn(HostClient, String) -> Fut,
        Fut: std::future::Future<Output = keelson_hosts::Result<()>>,
    {
        let calls = targets
            .into_iter()
            .map(|(host, track)| {
                let client = self.client(&host).cloned();
                let name = self.instance_name(track);
                let call = &call;
                async move { call(client?, name).await.map_err(err) }
            })
            .collect::<Vec<_>>();
        futures_util::future::try_join_all(calls).await.map(drop)
    }

    fn targets(&self, instances: &Instances) -> Vec<(String, Track)> {
        match instances {
            Instances::Listed(ids) => ids
                .iter()
                .map(|id| {
                    let (host, track) = HostInstance::slot_and_track(id);
                    (host.to_string(), track)
                })
                .collect(),
            Instances::Track { track, .. } => {
                self.hosts.keys().map(|h| (h.clone(), *track)).collect()
            }
        }
    }

    fn state_of(view: &InstanceView) -> InstanceState {
        match view.state {
            SupervisorState::Stopped => InstanceState::Stopped,
            SupervisorState::Exited | SupervisorState::Failed | SupervisorState::Lost => {
                InstanceState::Failed
            }
            _ if view.online => InstanceState::Online,
            _ if view.held => InstanceState::Offline,
            _ => InstanceState::Starting,
        }
    }

    fn change_of(view: &InstanceView) -> Option<InstanceChange> {
        Some(match Self::state_of(view) {
            InstanceState::Stopped => InstanceChange::Gone,
            InstanceState::Failed => InstanceChange::Failed {
                error: view
                    .message
                    .clone()
                    .unwrap_or_else(|| "the instance failed; see its log".into()),
            },
            InstanceState::Online => InstanceChange::Online,
            InstanceState::Offline => InstanceChange::Offline,
            InstanceState::Starting => return None,
        })
    }

    async fn views(&self) -> Result<Vec<(String, Track, InstanceView)>, RuntimeError> {
        // Every host at once.
        let listed = futures_util::future::try_join_all(self.hosts.iter().map(
            |(host, client)| async move {
                Ok::<_, RuntimeError>((host, client.instances().await.map_err(err)?))
            },
        ))
        .await?;
        let mut all = Vec::new();
        for (host, views) in listed {
            for view in views {
                if let Some(track) = self.track_of(&view.name) {
                    if let Some(version) = &view.version {
                        self.versions
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry((host.clone(), view.name.clone()))
                            .or_insert_with(|| Version(version.clone()));
                    }
                    all.push((host.clone(), track, view));
                }
            }
        }
        Ok(all)
    }
}

/// Passes on the output lines of one hook run: the instance's log from
/// just past its `hook_started` up to its `hook_finished` (app output in
/// between is skipped), so only the log of an instance running a hook is
/// read, and only while it does.
#[allow(clippy::too_many_arguments)]
async fn follow_hook(
    client: HostClient,
    name: String,
    offset: u64,
    instance: keelson_core::release::InstanceId,
    step: String,
    run: Timestamp,
    hooks: Arc<HookSubscribers>,
    cancel: CancellationToken,
) {
    let Ok(mut log) = client.logs(&name, offset, true, false).await else {
        return;
    };
    let tag = format!("[{step}] ");
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return,
            next = log.next() => next,
        };
        let Ok(Some(entry)) = next else { return };
        if !hooks.wants(run) {
            return; // nobody listens any more (the release ended)
        }
        if let Some(text) = entry.line.strip_prefix(&tag) {
            hooks.publish(&instance, &step, run, text);
        } else if entry.line.starts_with('{')
            && let Ok(event) = serde_json::from_str::<serde_json::Value>(&entry.line)
        {
            let ended = match event["event"].as_str() {
                Some("hook_finished") => event["step"].as_str() == Some(step.as_str()),
                Some("supervisor_exited") => true,
                _ => false,
            };
            if ended {
                return;
            }
        }
    }
}

/// An agent timestamp (`YYYY-MM-DDTHH:MM:SS.mmmZ`, UTC) in milliseconds
/// since the Unix epoch.
fn parse_ts(text: &str) -> Option<Timestamp> {
    let at: keelson_store::Timestamp = text.parse().ok()?;
    u64::try_from(at.0).ok().map(Timestamp)
}

/// The registry as one runtime sees it: only its own hosts, so that its
/// event streams reach those hosts and not every host keelson knows.
struct OwnHosts {
    store: Store,
    names: std::collections::BTreeSet<String>,
}

impl keelson_hosts::TargetRegistry for OwnHosts {
    async fn targets(&self) -> keelson_hosts::Result<Vec<keelson_store::Target>> {
        let mut targets = keelson_hosts::TargetRegistry::targets(&self.store).await?;
        for target in &mut targets {
            if let Some(hosts) = target
                .spec
                .config
                .get_mut("hosts")
                .and_then(|h| h.as_array_mut())
            {
                hosts.retain(|h| {
                    h.get("name")
                        .and_then(|n| n.as_str())
                        .is_some_and(|n| self.names.contains(n))
                });
            }
        }
        Ok(targets)
    }

    async fn put_target(
        &self,
        target: &keelson_store::NewTarget,
    ) -> keelson_hosts::Result<keelson_store::Target> {
        keelson_hosts::TargetRegistry::put_target(&self.store, target).await
    }
}

/// A command on an instance that does not exist has nothing to do.
fn absent_is_done(result: Result<InstanceView, keelson_hosts::Error>) -> keelson_hosts::Result<()> {
    match result {
        Ok(_) | Err(keelson_hosts::Error::Api { status: 404, .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn broadcast(subscribers: &Mutex<Vec<mpsc::Sender<InstanceEvent>>>, event: InstanceEvent) {
    let senders: Vec<_> = {
        let mut subs = subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| !s.is_closed());
        subs.clone()
    };
    for sender in senders {
        let _ = sender.send(event.clone()).await;
    }
}

impl Runtime for HostsRuntime {
    async fn fleet(&self) -> Result<Fleet, RuntimeError> {
        let mut instances: Vec<HostInstance> = self
            .views()
            .await?
            .into_iter()
            .map(|(host, track, view)| HostInstance {
                id: HostInstance::id_of(&host, track),
                slot: host,
                track,
                version: Version(view.version.clone().unwrap_or_default()),
                state: Self::state_of(&view),
                held: view.held,
                generation: view.generation,
            })
            .collect();
        if instances.is_empty() {
            // The app's first deployment: every host is a slot whose blue
            // instance does not exist yet (no version), so a release starts
            // it there.
            instances = self
                .hosts
                .keys()
                .map(|host| HostInstance {
                    id: HostInstance::id_of(host, Track::Blue),
                    slot: host.clone(),
                    track: Track::Blue,
                    version: Version(String::new()),
                    state: InstanceState::Stopped,
                    held: false,
                    generation: None,
                })
                .collect();
        }
        Ok(Fleet::Hosts { instances })
    }

    async fn apply(&self, action: &Action) -> Result<(), RuntimeError> {
        match &action.command {
            Command::StopAndReplace {
                instance,
                version,
                generation,
            }
            | Command::StartNew {
                instance,
                version,
                generation,
            }
            | Command::Recreate {
                instance,
                version,
                generation,
            } => {
                let (host, track) = HostInstance::slot_and_track(instance);
                self.start(host, track, version, Some(*generation)).await
            }
            // All hosts at once: each call returns only once its host has
            // done it (drained, stopped), so one after the other would add
            // up every host's time.
            Command::TakeOffline { instances } => {
                self.on_each(self.targets(instances), |client, name| async move {
                    absent_is_done(client.hold(&name).await)
                })
                .await
            }
            Command::BringOnline { instances } => {
                self.on_each(self.targets(instances), |client, name| async move {
                    client.release(&name).await.map(drop)
                })
                .await
            }
            Command::Stop { instances } => {
                let targets = instances
                    .iter()
                    .map(|id| {
                        let (host, track) = HostInstance::slot_and_track(id);
                        (host.to_string(), track)
                    })
                    .collect();
                self.on_each(targets, |client, name| async move {
                    absent_is_done(client.stop(&name).await)
                })
                .await
            }
            Command::ScaleTrack { .. }
            | Command::RollTrack { .. }
            | Command::PauseRollout { .. }
            | Command::ResumeRollout { .. } => Err(RuntimeError(format!(
                "step {}: a Kubernetes command reached the hosts runtime",
                action.id
            ))),
            Command::WaitOnline { .. }
            | Command::PauseUntil { .. }
            | Command::AwaitResume
            | Command::Finish { .. } => Ok(()),
        }
    }

    fn hook_output(&self, since: Timestamp) -> Option<HookOutput> {
        Some(self.hooks.subscribe(since))
    }

    async fn events(&self) -> Result<mpsc::Receiver<InstanceEvent>, RuntimeError> {
        let (tx, rx) = mpsc::channel(1024);
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx.clone());
        for (host, track, view) in self.views().await? {
            if let Some(change) = Self::change_of(&view) {
                let _ = tx.try_send(InstanceEvent {
                    instance: HostInstance::id_of(&host, track),
                    track,
                    version: Version(view.version.clone().unwrap_or_default()),
                    generation: view.generation,
                    change,
                });
            }
        }
        Ok(rx)
    }
}

/// The same hosts runtime for every app and environment it was made for.
#[derive(Debug, Default)]
pub struct HostsRuntimes {
    runtimes: Mutex<HashMap<(String, String), Arc<HostsRuntime>>>,
}

impl HostsRuntimes {
    /// Adds the runtime of one app in one environment.
    pub fn insert(&self, app: &str, env: &str, runtime: Arc<HostsRuntime>) {
        self.runtimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((app.to_string(), env.to_string()), runtime);
    }
}

impl crate::runtime::Runtimes for HostsRuntimes {
    type Runtime = HostsRuntime;

    async fn runtime(&self, app: &str, env: &str) -> Result<Arc<HostsRuntime>, RuntimeError> {
        self.runtimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(app.to_string(), env.to_string()))
            .cloned()
            .ok_or_else(|| RuntimeError(format!("no hosts for {app} in {env}")))
    }
}

/// A [`DeployFn`] from a deploy request in which the strings `{{host}}`,
/// `{{track}}`, `{{instance}}` (`<host>@<track>`), `{{version}}`,
/// `{{generation}}` (`none` before any release) and `{{port}}` are replaced
/// per start; the checkurl's port is set from `ports` (by instance id) when
/// listed there.
pub fn templated(template: DeployRequest, ports: BTreeMap<String, u16>) -> DeployFn {
    // A plain data type: serializing it cannot fail.
    let text = serde_json::to_string(&template).unwrap_or_default();
    Arc::new(move |target| {
        let id = HostInstance::id_of(target.host, target.track).0;
        let port = ports
            .get(&id)
            .copied()
            .unwrap_or(template.lifecycle.checkurl.port);
        let generation = target
            .generation
            .map_or_else(|| "none".to_string(), |g| g.to_string());
        let escape = |value: &str| {
            let quoted = serde_json::to_string(value).unwrap_or_default();
            quoted[1..quoted.len().saturating_sub(1).max(1)].to_string()
        };
        let filled = text
            .replace("{{host}}", &escape(target.host))
            .replace("{{track}}", target.track.as_str())
            .replace("{{instance}}", &escape(&id))
            .replace("{{version}}", &escape(&target.version.0))
            .replace("{{generation}}", &generation)
            .replace("{{port}}", &port.to_string());
        let mut request: DeployRequest =
            serde_json::from_str(&filled).unwrap_or_else(|_| template.clone());
        request.lifecycle.checkurl.port = port;
        request
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_timestamps_are_read_as_unix_milliseconds() {
        assert_eq!(parse_ts("1970-01-01T00:00:00.000Z"), Some(Timestamp(0)));
        assert_eq!(
            parse_ts("2026-11-22T02:50:26.123Z"),
            Some(Timestamp(1_795_315_826_123))
        );
        assert_eq!(
            parse_ts("2000-02-29T12:00:00Z"),
            Some(Timestamp(951_825_600_000))
        );
        assert_eq!(parse_ts("yesterday"), None);
    }
}
