//! A runtime of real local processes: each host instance (`<slot>@<track>`)
//! is a shell script started with `sh -c`, with preStart, preOnline and
//! preOffline hooks run as shell commands around it. It serves the engine's
//! tests and single-machine use; the hosts runtime does the same through
//! host daemons.
//!
//! ```text
//!  start:  preStart ─► spawn app ─► wait for $KEELSON_READY_FILE (the checkurl)
//!          ─► preOnline (unless held) ─► ONLINE
//!  offline: preOffline ─► held (stays offline until BringOnline or a fresh start)
//!  stop:    SIGTERM (SIGKILL after 5 s) ─► gone
//! ```
//!
//! What each instance is and did is kept in `<root>/instances/<id>/state.json`
//! and survives the engine: a start whose generation already ran is not run
//! again (the process keeps running across an engine crash), a hold is kept,
//! and the event stream begins with every instance as it stands. Scripts see
//! `KEELSON_INSTANCE`, `KEELSON_SLOT`, `KEELSON_TRACK`, `KEELSON_VERSION`,
//! `KEELSON_GENERATION` (`none` for instances started before any release),
//! `KEELSON_HOOK` (in hooks), `KEELSON_DIR` and `KEELSON_READY_FILE`.
//! Steps are recorded when they are done, so a crash in the middle of one
//! (not at a kill point) may run that one hook again. A hook's output goes
//! to the instance's `hooks.log` and, line by line, to
//! [`Runtime::hook_output`] subscribers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keelson_core::release::{
    Action, Command, Fleet, HostInstance, InstanceChange, InstanceEvent, InstanceId, InstanceState,
    Instances, Track, Version,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::runtime::{HookOutput, HookSubscribers, Runtime, RuntimeError, Runtimes};

/// How long a finished hook's pipes are read before the hook counts as done.
const HOOK_PIPE_DRAIN: Duration = Duration::from_millis(500);

fn now_ms() -> keelson_core::release::Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    keelson_core::release::Timestamp(ms)
}

/// What the instances run.
#[derive(Debug, Clone)]
pub struct LocalSpec {
    /// The app: a shell script that creates `$KEELSON_READY_FILE` once it
    /// serves, then keeps running (`exec` its server).
    pub app: String,
    /// Runs before the app starts; a failure fails the instance.
    pub pre_start: Option<String>,
    /// Runs after the app is ready, before it goes ONLINE; a failure fails
    /// the instance.
    pub pre_online: Option<String>,
    /// Runs before the instance leaves traffic; failures are ignored.
    pub pre_offline: Option<String>,
    /// How long the app may take to become ready.
    pub start_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstanceRecord {
    id: String,
    slot: String,
    track: Track,
    version: Version,
    generation: Option<u64>,
    pid: Option<u32>,
    held: bool,
    online: bool,
    stopped: bool,
    failed: Option<String>,
}

/// Local processes for one app in one environment.
#[derive(Debug)]
pub struct LocalRuntime {
    root: PathBuf,
    spec: LocalSpec,
    subscribers: Mutex<Vec<mpsc::Sender<InstanceEvent>>>,
    hooks: Arc<HookSubscribers>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn err(context: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError(format!("{context}: {e}"))
}

/// Whether a process runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

async fn wait_until(deadline: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(2);
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

async fn terminate(pid: u32) {
    if !alive(pid) {
        return;
    }
    signal(pid, rustix::process::Signal::TERM);
    if !wait_until(Duration::from_secs(5), || !alive(pid)).await {
        signal(pid, rustix::process::Signal::KILL);
        wait_until(Duration::from_secs(5), || !alive(pid)).await;
    }
}

impl LocalRuntime {
    /// A runtime keeping its instances under `root`.
    pub fn new(root: impl Into<PathBuf>, spec: LocalSpec) -> Self {
        Self {
            root: root.into(),
            spec,
            subscribers: Mutex::new(Vec::new()),
            hooks: Arc::default(),
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join("instances").join(id.replace('/', "_"))
    }

    fn load(&self, id: &str) -> Result<Option<InstanceRecord>, RuntimeError> {
        let path = self.dir(id).join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| err(&path.display().to_string(), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(&path.display().to_string(), e)),
        }
    }

    fn save(&self, record: &InstanceRecord) -> Result<(), RuntimeError> {
        let dir = self.dir(&record.id);
        std::fs::create_dir_all(&dir).map_err(|e| err("create instance directory", e))?;
        let tmp = dir.join("state.json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| err("encode state", e))?;
        std::fs::write(&tmp, bytes).map_err(|e| err("write state", e))?;
        std::fs::rename(&tmp, dir.join("state.json")).map_err(|e| err("write state", e))
    }

    fn records(&self) -> Result<Vec<InstanceRecord>, RuntimeError> {
        let dir = self.root.join("instances");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err("list instances", e)),
        };
        let mut records = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| err("list instances", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(record) = self.load(&name)? {
                records.push(record);
            }
        }
        records.sort_by(|a, b| (&a.slot, a.track).cmp(&(&b.slot, b.track)));
        Ok(records)
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    fn event_of(record: &InstanceRecord, change: InstanceChange) -> InstanceEvent {
        InstanceEvent {
            instance: InstanceId(record.id.clone()),
            track: record.track,
            version: record.version.clone(),
            generation: record.generation,
            change,
        }
    }

    /// The instance as it stands, as an event (None while starting).
    fn current(record: &InstanceRecord) -> Option<InstanceChange> {
        let running = record.pid.is_some_and(alive);
        Some(match record {
            r if r.stopped => InstanceChange::Gone,
            InstanceRecord {
                failed: Some(error),
                ..
            } => InstanceChange::Failed {
                error: error.clone(),
            },
            _ if !running => InstanceChange::Exited { code: None },
            r if r.online => InstanceChange::Online,
            r if r.held => InstanceChange::Offline,
            _ => return None,
        })
    }

    async fn emit(&self, record: &InstanceRecord, change: InstanceChange) {
        let event = Self::event_of(record, change);
        let senders: Vec<_> = {
            let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            subs.retain(|s| !s.is_closed());
            subs.clone()
        };
        for sender in senders {
            let _ = sender.send(event.clone()).await;
        }
    }

    fn command(
        &self,
        script: &str,
        record: &InstanceRecord,
        hook: Option<&str>,
    ) -> tokio::process::Command {
        let dir = self.dir(&record.id);
        let mut command = tokio::process::Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .current_dir(&dir)
            .env("KEELSON_INSTANCE", &record.id)
            .env("KEELSON_SLOT", &record.slot)
            .env("KEELSON_TRACK", record.track.as_str())
            .env("KEELSON_VERSION", &record.version.0)
            .env(
                "KEELSON_GENERATION",
                record
                    .generation
                    .map_or_else(|| "none".to_string(), |g| g.to_string()),
            )
            .env("KEELSON_DIR", &dir)
            .env("KEELSON_READY_FILE", dir.join("ready"))
            .env("KEELSON_HOOK", hook.unwrap_or(""))
            .stdin(Stdio::null());
        command
    }

    async fn hook(
        &self,
        name: &str,
        script: Option<&String>,
        record: &InstanceRecord,
    ) -> Result<(), String> {
        let Some(script) = script else { return Ok(()) };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir(&record.id).join("hooks.log"))
            .map_err(|e| e.to_string())?;
        let log = Arc::new(Mutex::new(log));
        let mut child = self
            .command(script, record, Some(name))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{name}: {e}"))?;
        let run = now_ms();
        let instance = InstanceId(record.id.clone());
        let mut readers = Vec::new();
        let pipes: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
            child.stdout.take().map(|p| Box::new(p) as _),
            child.stderr.take().map(|p| Box::new(p) as _),
        ];
        for pipe in pipes.into_iter().flatten() {
            let (log, hooks, instance, name) = (
                log.clone(),
                self.hooks.clone(),
                instance.clone(),
                name.to_string(),
            );
            readers.push(tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    {
                        use std::io::Write;
                        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = writeln!(log, "{line}");
                    }
                    hooks.publish(&instance, &name, run, &line);
                }
            }));
        }
        let status = child.wait().await.map_err(|e| format!("{name}: {e}"))?;
        // A process the hook left in the background may keep its pipes
        // open: its later lines still go on, but the hook is done.
        for reader in readers {
            let _ = tokio::time::timeout(HOOK_PIPE_DRAIN, reader).await;
        }
        if status.success() {
            Ok(())
        } else {
            Err(format!("{name} failed with {status}"))
        }
    }

    async fn fail(&self, record: &mut InstanceRecord, error: String) -> Result<(), RuntimeError> {
        record.failed = Some(error.clone());
        record.online = false;
        self.save(record)?;
        self.emit(record, InstanceChange::Failed { error }).await;
        Ok(())
    }

    /// Starts `version` on `id` (stopping what runs there) unless this
    /// generation already started; then brings it ONLINE unless held.
    async fn start(
        &self,
        id: &str,
        version: &Version,
        generation: Option<u64>,
    ) -> Result<(), RuntimeError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let existing = self.load(id)?;
        let instance_id = InstanceId(id.to_string());
        let (slot, track) = HostInstance::slot_and_track(&instance_id);
        let mut record = match existing {
            Some(r)
                if r.generation == generation
                    && r.version == *version
                    && r.pid.is_some()
                    && !r.stopped =>
            {
                // This start happened already (before a crash): report it
                // and finish what it did not.
                if r.failed.is_some() || r.online || r.held || !r.pid.is_some_and(alive) {
                    if let Some(change) = Self::current(&r) {
                        self.emit(&r, change).await;
                    }
                    return Ok(());
                }
                r
            }
            previous => {
                if let Some(pid) = previous.as_ref().and_then(|p| p.pid) {
                    terminate(pid).await;
                }
                let record = InstanceRecord {
                    id: id.to_string(),
                    slot: slot.to_string(),
                    track,
                    version: version.clone(),
                    generation,
                    pid: None,
                    held: false,
                    online: false,
                    stopped: false,
                    failed: None,
                };
                self.spawn(record).await?
            }
        };
        if record.failed.is_some() || record.held {
            return Ok(());
        }
        self.go_online(&mut record).await
    }

    /// preStart, then the app until it is ready; a failure is recorded and
    /// reported as the instance's, not as the command's.
    async fn spawn(&self, mut record: InstanceRecord) -> Result<InstanceRecord, RuntimeError> {
        let dir = self.dir(&record.id);
        std::fs::create_dir_all(&dir).map_err(|e| err("create instance directory", e))?;
        let ready = dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        self.save(&record)?;
        if let Err(e) = self
            .hook("preStart", self.spec.pre_start.as_ref(), &record)
            .await
        {
            self.fail(&mut record, e).await?;
            return Ok(record);
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("app.log"))
            .map_err(|e| err("open app log", e))?;
        let out2 = out.try_clone().map_err(|e| err("open app log", e))?;
        let mut child = self
            .command(&self.spec.app, &record, None)
            .stdout(out)
            .stderr(out2)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| err("start the app", e))?;
        let pid = child
            .id()
            .ok_or_else(|| RuntimeError("the app exited at once".into()))?;
        record.pid = Some(pid);
        self.save(&record)?;
        let ready_in_time =
            wait_until(self.spec.start_timeout, || ready.exists() || !alive(pid)).await;
        if !ready.exists() {
            let why = match child.try_wait() {
                Ok(Some(status)) => format!("the app exited with {status} before it was ready"),
                _ if !ready_in_time => format!(
                    "the app was not ready within {} ms",
                    self.spec.start_timeout.as_millis()
                ),
                _ => "the app exited before it was ready".to_string(),
            };
            terminate(pid).await;
            let _ = child.try_wait();
            self.fail(&mut record, why).await?;
            return Ok(record);
        }
        // Reap the process when it ends; its end is news unless asked for.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(record)
    }

    async fn go_online(&self, record: &mut InstanceRecord) -> Result<(), RuntimeError> {
        if let Err(e) = self
            .hook("preOnline", self.spec.pre_online.as_ref(), record)
            .await
        {
            return self.fail(record, e).await;
        }
        record.online = true;
        self.save(record)?;
        self.emit(record, InstanceChange::Online).await;
        Ok(())
    }

    async fn take_offline(&self, id: &str) -> Result<(), RuntimeError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let Some(mut record) = self.load(id)? else {
            return Ok(()); // nothing runs there: it takes no traffic
        };
        if !record.held {
            if record.online {
                // preOffline failures do not keep an instance in traffic.
                let _ = self
                    .hook("preOffline", self.spec.pre_offline.as_ref(), &record)
                    .await;
            }
            record.held = true;
            record.online = false;
            self.save(&record)?;
        }
        if let Some(change) = Self::current(&record) {
            self.emit(&record, change).await;
        }
        Ok(())
    }

    async fn bring_online(&self, id: &str) -> Result<(), RuntimeError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let Some(mut record) = self.load(id)? else {
            return Err(RuntimeError(format!("no instance {id}")));
        };
        if record.held {
            record.held = false;
            self.save(&record)?;
        }
        let running = record.pid.is_some_and(alive);
        if running && !record.online && !record.stopped && record.failed.is_none() {
            return self.go_online(&mut record).await;
        }
        if let Some(change) = Self::current(&record) {
            self.emit(&record, change).await;
        }
        Ok(())
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let Some(mut record) = self.load(id)? else {
            return Ok(());
        };
        if !record.stopped {
            if let Some(pid) = record.pid {
                terminate(pid).await;
            }
            record.stopped = true;
            record.online = false;
            self.save(&record)?;
        }
        self.emit(&record, InstanceChange::Gone).await;
        Ok(())
    }

    fn matching(&self, instances: &Instances) -> Result<Vec<String>, RuntimeError> {
        Ok(match instances {
            Instances::Listed(ids) => ids.iter().map(|i| i.0.clone()).collect(),
            Instances::Track { track, version } => self
                .records()?
                .into_iter()
                .filter(|r| r.track == *track && r.version == *version && !r.stopped)
                .map(|r| r.id)
                .collect(),
        })
    }

    /// Starts `version` on `track` of `slot` as an instance that predates
    /// any release (generation `none`), and waits until it is ONLINE.
    pub async fn deploy(
        &self,
        slot: &str,
        track: Track,
        version: &Version,
    ) -> Result<(), RuntimeError> {
        let id = HostInstance::id_of(slot, track);
        self.start(&id.0, version, None).await
    }

    /// Stops every process of this runtime (for tests and shutdown).
    pub async fn stop_all(&self) {
        for record in self.records().unwrap_or_default() {
            if let Some(pid) = record.pid {
                terminate(pid).await;
            }
        }
    }

    /// Kills every process of this runtime at once (SIGKILL, no hooks):
    /// for teardown where awaiting is not possible, such as `Drop`.
    pub fn kill_all(&self) {
        for record in self.records().unwrap_or_default() {
            if let Some(pid) = record.pid.filter(|p| alive(*p)) {
                signal(pid, rustix::process::Signal::KILL);
            }
        }
    }

    /// The directory that holds the instances.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Runtime for LocalRuntime {
    async fn fleet(&self) -> Result<Fleet, RuntimeError> {
        let instances = self
            .records()?
            .into_iter()
            .map(|r| {
                let running = r.pid.is_some_and(alive);
                let state = if r.stopped {
                    InstanceState::Stopped
                } else if r.failed.is_some() || !running {
                    InstanceState::Failed
                } else if r.online {
                    InstanceState::Online
                } else if r.held {
                    InstanceState::Offline
                } else {
                    InstanceState::Starting
                };
                HostInstance {
                    id: InstanceId(r.id),
                    slot: r.slot,
                    track: r.track,
                    version: r.version,
                    state,
                    held: r.held,
                    generation: r.generation,
                }
            })
            .collect();
        Ok(Fleet::Hosts { instances })
    }

    async fn apply(&self, action: &Action) -> Result<(), RuntimeError> {
        match &action.command {
            Command::TakeOffline { instances } => {
                for id in self.matching(instances)? {
                    self.take_offline(&id).await?;
                }
                Ok(())
            }
            Command::BringOnline { instances } => {
                for id in self.matching(instances)? {
                    self.bring_online(&id).await?;
                }
                Ok(())
            }
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
            } => self.start(&instance.0, version, Some(*generation)).await,
            Command::Stop { instances } => {
                for id in instances {
                    self.stop(&id.0).await?;
                }
                Ok(())
            }
            Command::ScaleTrack { .. }
            | Command::RollTrack { .. }
            | Command::PauseRollout { .. }
            | Command::ResumeRollout { .. } => Err(RuntimeError(format!(
                "step {}: a Kubernetes command reached the local process runtime",
                action.id
            ))),
            Command::WaitOnline { .. }
            | Command::PauseUntil { .. }
            | Command::AwaitResume
            | Command::Finish { .. } => Ok(()),
        }
    }

    fn hook_output(&self, since: keelson_core::release::Timestamp) -> Option<HookOutput> {
        Some(self.hooks.subscribe(since))
    }

    async fn events(&self) -> Result<mpsc::Receiver<InstanceEvent>, RuntimeError> {
        let (tx, rx) = mpsc::channel(1024);
        // Register first, so that a change made while the snapshot is taken
        // comes after it rather than being lost.
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx.clone());
        for record in self.records()? {
            if let Some(change) = Self::current(&record) {
                let _ = tx.try_send(Self::event_of(&record, change));
            }
        }
        Ok(rx)
    }
}

/// Local runtimes under one directory, one per app and environment
/// (`<root>/<app>/<env>`), all running the same spec.
#[derive(Debug)]
pub struct LocalRuntimes {
    root: PathBuf,
    spec: LocalSpec,
    runtimes: Mutex<HashMap<(String, String), Arc<LocalRuntime>>>,
}

impl LocalRuntimes {
    /// Runtimes under `root`.
    pub fn new(root: impl Into<PathBuf>, spec: LocalSpec) -> Self {
        Self {
            root: root.into(),
            spec,
            runtimes: Mutex::new(HashMap::new()),
        }
    }
}

impl Runtimes for LocalRuntimes {
    type Runtime = LocalRuntime;

    async fn runtime(&self, app: &str, env: &str) -> Result<Arc<LocalRuntime>, RuntimeError> {
        let mut runtimes = self.runtimes.lock().unwrap_or_else(|e| e.into_inner());
        Ok(runtimes
            .entry((app.to_string(), env.to_string()))
            .or_insert_with(|| {
                Arc::new(LocalRuntime::new(
                    self.root.join(app).join(env),
                    self.spec.clone(),
                ))
            })
            .clone())
    }
}
