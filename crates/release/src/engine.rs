//! Durable execution of releases: creating them, users' requests, and the
//! worker that drives every running release to its end.
//!
//! ```text
//!  Worker::run ── every poll: claim releases (lease) ──► one task per release:
//!     subscribe to runtime events (known instances first)
//!     apply release.pending not journaled done   (again, after a crash)
//!     loop: input ◄─ runtime event │ action done/failed │ deadline tick │ reload
//!           step(release, input) ─► commit state + journal + event (one tx,
//!           only if the release is still at the version read and the lease held)
//!           ─► apply new actions (kill points before/after each)
//! ```
//!
//! A user's request ([`request`]) steps the stored release under the same
//! optimistic version check; the worker sees the new version when its next
//! commit is refused or at its next poll, reloads, and applies the actions
//! the request issued.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keelson_core::release::{
    Action, Event, Fleet, Input, InstanceState, Release, ReleaseSettings, Status, StepId, Summary,
    Timestamp, Version, step, summarize,
};
use keelson_store::{
    CommitOutcome, JournalStatus, NewRelease, ReleaseCommit, ReleaseRecord, Store,
    next_release_change,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::kill::{self, When};
use crate::runtime::{HookLine, HookOutput, Runtime, RuntimeError, Runtimes};
use crate::{Error, Result};

/// How often a commit refused for a newer version is retried.
const MAX_RETRIES: usize = 20;

/// The name of a step within its release, as kill points and logs use it:
/// `<phase>/b<batch>/s<stage>/<target>/a<attempt>`.
pub fn step_name(id: &StepId) -> String {
    format!(
        "{}/b{}/s{}/{}/a{}",
        id.phase.as_str(),
        id.batch,
        id.stage,
        id.target,
        id.attempt
    )
}

fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Timestamp(ms)
}

/// What the store keeps of a release: the request until a worker plans it
/// over the runtime's instances, then the machine's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "kebab-case")]
pub enum StoredRelease {
    /// Asked for through the API; a worker plans it.
    Requested {
        /// The request.
        request: NewReleaseRequest,
    },
    /// It could not be planned (no instances, bad batches, …).
    Refused {
        /// The request.
        request: NewReleaseRequest,
        /// Why.
        error: String,
    },
    /// Planned: the state machine.
    Planned {
        /// The machine's state.
        release: Box<Release>,
    },
    /// Aborted before any worker planned it: nothing ran.
    AbortedUnplanned {
        /// The request.
        request: NewReleaseRequest,
        /// Who aborted it.
        by: String,
    },
}

/// The status label of a release that is not planned yet.
pub const PLANNING: &str = "planning";
/// The status label of a release that could not be planned.
pub const REFUSED: &str = "refused";
/// The status label of an aborted release (the machine's too).
pub const ABORTED: &str = "aborted";

fn decode_stored(record: &ReleaseRecord) -> Result<StoredRelease> {
    serde_json::from_value(record.state.clone()).map_err(|e| Error::Corrupt(e.to_string()))
}

fn decode(record: &ReleaseRecord) -> Result<Release> {
    match decode_stored(record)? {
        StoredRelease::Planned { release } => Ok(*release),
        StoredRelease::Requested { .. } => Err(Error::Rejected(format!(
            "release {} is still being planned: no worker has looked at the instances yet; \
             it can be aborted now, and paused, resumed or rolled back once it is planned",
            record.id
        ))),
        StoredRelease::AbortedUnplanned { by, .. } => Err(Error::Rejected(format!(
            "release {} was aborted by {by} before it was planned; nothing ran",
            record.id
        ))),
        StoredRelease::Refused { error, .. } => Err(Error::Rejected(format!(
            "release {} was refused: {error}",
            record.id
        ))),
    }
}

fn planned(release: &Release) -> serde_json::Value {
    encode(&StoredRelease::Planned {
        release: Box::new(release.clone()),
    })
}

fn generated_id(request: &NewReleaseRequest) -> String {
    request.id.clone().unwrap_or_else(|| {
        format!(
            "{}-{}-{}-{:04x}",
            request.app,
            request.env,
            now().0,
            fastrand::u16(..)
        )
    })
}

/// Plans `request` over `fleet`.
fn plan_release(id: &str, fleet: Fleet, request: &NewReleaseRequest) -> Result<Release> {
    let (from, running) = current(&fleet).ok_or_else(|| {
        Error::Plan(format!(
            "{} has no instances in {}",
            request.app, request.env
        ))
    })?;
    Release::new(
        id.to_string(),
        from,
        request.version.clone(),
        request.desired.unwrap_or(running),
        fleet,
        request.settings.clone(),
    )
    .map_err(|e| Error::Plan(e.to_string()))
}

fn create_detail(request: &NewReleaseRequest) -> serde_json::Value {
    serde_json::json!({
        "app": request.app,
        "env": request.env,
        "to": request.version,
        "desired": request.desired,
        "strategy": request.settings.strategy.as_str(),
    })
}

/// Stores a release request; a worker plans it over the runtime's
/// instances (status `planning`, then `pending` or `refused`) and runs it.
pub async fn submit_release(store: &Store, request: &NewReleaseRequest) -> Result<ReleaseRecord> {
    let id = generated_id(request);
    let mut request = request.clone();
    request.id = Some(id.clone());
    let state = encode(&StoredRelease::Requested {
        request: request.clone(),
    });
    Ok(store
        .create_release(&NewRelease {
            id: &id,
            app: &request.app,
            env: &request.env,
            state: &state,
            status: PLANNING,
            actor: &request.actor,
            detail: create_detail(&request),
        })
        .await?)
}

fn encode<T: Serialize>(value: &T) -> serde_json::Value {
    // Plain data types of core: serializing them cannot fail.
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// A release to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewReleaseRequest {
    /// Its id; generated when None.
    pub id: Option<String>,
    /// The app.
    pub app: String,
    /// The environment.
    pub env: String,
    /// The version to release.
    pub version: Version,
    /// Instances at the end; as many as run now when None.
    pub desired: Option<u32>,
    /// Strategy, batches, pauses, failure policy.
    pub settings: ReleaseSettings,
    /// Who asks.
    pub actor: String,
}

/// The version most instances run now, and how many instances there are.
fn current(fleet: &Fleet) -> Option<(Version, u32)> {
    match fleet {
        Fleet::Hosts { instances } => {
            let mut live: Vec<_> = instances
                .iter()
                .filter(|i| i.state != InstanceState::Stopped)
                .collect();
            if live.is_empty() {
                // Nothing runs: the release starts every slot (an app's
                // first deployment, or one whose instances were all stopped).
                live = instances.iter().collect();
            }
            let mut counts: BTreeMap<&Version, u32> = BTreeMap::new();
            for i in &live {
                *counts.entry(&i.version).or_default() += 1;
            }
            let version = counts.into_iter().max_by_key(|(_, n)| *n)?.0.clone();
            let slots: HashSet<&str> = live.iter().map(|i| i.slot.as_str()).collect();
            Some((version, slots.len() as u32))
        }
        Fleet::Kubernetes { tracks, .. } => {
            let active = tracks.iter().max_by_key(|t| t.replicas)?;
            Some((
                active.version.clone()?,
                tracks.iter().map(|t| t.replicas).sum(),
            ))
        }
    }
}

/// Plans a release over the runtime's instances as they run now and stores
/// it, pending; a worker starts it.
pub async fn create_release<R: Runtime>(
    store: &Store,
    runtime: &R,
    request: &NewReleaseRequest,
) -> Result<ReleaseRecord> {
    let fleet = runtime.fleet().await?;
    let id = generated_id(request);
    let release = plan_release(&id, fleet, request)?;
    let state = planned(&release);
    Ok(store
        .create_release(&NewRelease {
            id: &id,
            app: &request.app,
            env: &request.env,
            state: &state,
            status: release.status.label(),
            actor: &request.actor,
            detail: create_detail(request),
        })
        .await?)
}

/// A release as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseView {
    /// Its id.
    pub id: String,
    /// The app.
    pub app: String,
    /// The environment.
    pub env: String,
    /// Its one-word status.
    pub status: String,
    /// Whether it has ended.
    pub finished: bool,
    /// Counts up with every change.
    pub version: i64,
    /// The worker running it.
    pub worker: Option<String>,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: keelson_store::Timestamp,
    /// The last change.
    pub updated_at: keelson_store::Timestamp,
    /// Batches and instances, by state and version (once planned).
    pub summary: Option<Summary>,
    /// The machine's full state (once planned).
    pub state: Option<Release>,
    /// The request, until it is planned.
    pub request: Option<NewReleaseRequest>,
    /// Why it could not be planned.
    pub error: Option<String>,
    /// Who aborted it before it was planned (nothing ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted_unplanned_by: Option<String>,
}

/// The stored release with its summary.
pub async fn release_view(store: &Store, id: &str) -> Result<ReleaseView> {
    let record = store.release(id).await?;
    let mut aborted_unplanned_by = None;
    let (state, request, error) = match decode_stored(&record)? {
        StoredRelease::Planned { release } => (Some(*release), None, None),
        StoredRelease::Requested { request } => (None, Some(request), None),
        StoredRelease::Refused { request, error } => (None, Some(request), Some(error)),
        StoredRelease::AbortedUnplanned { request, by } => {
            aborted_unplanned_by = Some(by);
            (None, Some(request), None)
        }
    };
    Ok(ReleaseView {
        summary: state.as_ref().map(summarize),
        id: record.id,
        app: record.app,
        env: record.env,
        status: record.status,
        finished: record.finished,
        version: record.version,
        worker: record.lease_owner,
        created_by: record.created_by,
        created_at: record.created_at,
        updated_at: record.updated_at,
        state,
        request,
        error,
        aborted_unplanned_by,
    })
}

fn event_name(event: &Event) -> &'static str {
    match event {
        Event::Start => "start",
        Event::Instance(_) => "instance",
        Event::Done { .. } => "done",
        Event::ActionFailed { .. } => "action-failed",
        Event::Tick => "tick",
        Event::Pause => "pause",
        Event::Resume => "resume",
        Event::Abort { .. } => "abort",
        Event::Rollback => "rollback",
    }
}

/// What the journal and the event log get for one transition.
fn commit_of<'a>(
    id: &'a str,
    version: i64,
    owner: Option<&'a str>,
    input: &Input,
    release: &Release,
    actions: &[Action],
    state: &'a serde_json::Value,
) -> ReleaseCommit<'a> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    match &input.event {
        Event::Done { step } => done.push(step.to_string()),
        Event::ActionFailed { step, error } => failed.push((step.to_string(), error.clone())),
        _ => {}
    }
    ReleaseCommit {
        id,
        expected_version: version,
        lease_owner: owner,
        state,
        status: release.status.label(),
        finished: release.status.is_terminal() && release.pending.is_empty(),
        planned: actions
            .iter()
            .filter(|a| a.command.needs_completion())
            .map(|a| (a.id.to_string(), encode(a)))
            .collect(),
        done,
        failed,
        event: Some(serde_json::json!({
            "kind": event_name(&input.event),
            "input": input,
            "status": release.status,
            "actions": actions,
        })),
        audit: None,
    }
}

/// Applies a user's request (pause, resume, abort, rollback) to a stored
/// release; [`Error::Rejected`] with the machine's reason when it does not
/// fit the release's state. Audited as `release.<request>`.
///
/// A release still being planned can only be aborted: it ends `aborted`
/// at once, with nothing run. A worker planning it at the same moment
/// loses the version check and leaves it; if the worker's plan is written
/// first, the abort is retried against the planned release and goes
/// through the machine like any other.
pub async fn request(store: &Store, id: &str, event: Event, actor: &str) -> Result<ReleaseView> {
    for _ in 0..MAX_RETRIES {
        let record = store.release(id).await?;
        if let (StoredRelease::Requested { request }, Event::Abort { .. }) =
            (decode_stored(&record)?, &event)
        {
            match abort_unplanned(store, &record, request, &event, actor).await? {
                CommitOutcome::Written(_) => return release_view(store, id).await,
                CommitOutcome::Stale => continue,
            }
        }
        let release = decode(&record)?;
        let input = Input {
            now: now(),
            event: event.clone(),
        };
        let transition = step(&release, &input);
        if let Some(why) = transition.rejected {
            return Err(Error::Rejected(why));
        }
        let state = planned(&transition.release);
        let mut commit = commit_of(
            id,
            record.version,
            None,
            &input,
            &transition.release,
            &transition.actions,
            &state,
        );
        let action = format!("release.{}", event_name(&event));
        commit.audit = Some((actor, &action, encode(&event)));
        match store.commit_release(&commit).await? {
            CommitOutcome::Written(_) => return release_view(store, id).await,
            CommitOutcome::Stale => continue,
        }
    }
    Err(Error::Busy(id.to_string()))
}

/// Ends a release no worker has planned yet, if it is still at the version
/// read: nothing ran, so there is nothing to clear up.
async fn abort_unplanned(
    store: &Store,
    record: &ReleaseRecord,
    request: NewReleaseRequest,
    event: &Event,
    actor: &str,
) -> Result<CommitOutcome> {
    let state = encode(&StoredRelease::AbortedUnplanned {
        request,
        by: actor.to_string(),
    });
    let input = Input {
        now: now(),
        event: event.clone(),
    };
    let action = format!("release.{}", event_name(event));
    Ok(store
        .commit_release(&ReleaseCommit {
            id: &record.id,
            expected_version: record.version,
            lease_owner: None,
            state: &state,
            status: ABORTED,
            finished: true,
            planned: Vec::new(),
            done: Vec::new(),
            failed: Vec::new(),
            event: Some(serde_json::json!({
                "kind": "aborted-unplanned",
                "input": input,
                "by": actor,
            })),
            audit: Some((actor, &action, encode(event))),
        })
        .await?)
}

/// How a worker behaves.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The lease owner's name; a restarted worker with the same name takes
    /// its releases back at once (others wait for the lease to expire).
    pub owner: String,
    /// How long a claim lasts without renewal.
    pub lease: Duration,
    /// How often the worker looks for releases to claim and for changes
    /// made by users' requests.
    pub poll: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            owner: format!("worker-{:08x}", fastrand::u32(..)),
            lease: Duration::from_secs(15),
            poll: Duration::from_millis(200),
        }
    }
}

/// Runs releases: claims them through leases and drives each to its end.
pub struct Worker<P: Runtimes> {
    store: Store,
    runtimes: Arc<P>,
    config: WorkerConfig,
}

impl<P: Runtimes> Worker<P> {
    /// A worker over `store` with these runtimes.
    pub fn new(store: Store, runtimes: Arc<P>, config: WorkerConfig) -> Self {
        Self {
            store,
            runtimes,
            config,
        }
    }

    /// Claims and drives releases until `cancel`; the releases it holds
    /// keep their state and are resumed by the next worker.
    pub async fn run(&self, cancel: CancellationToken) -> Result<()> {
        self.run_loop(cancel, false).await
    }

    /// Claims and drives releases until none is left to claim.
    pub async fn run_until_idle(&self) -> Result<()> {
        self.run_loop(CancellationToken::new(), true).await
    }

    async fn run_loop(&self, cancel: CancellationToken, until_idle: bool) -> Result<()> {
        let mut changes = self.store.release_changes();
        let mut running: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
        let mut tasks: JoinSet<(String, Result<()>)> = JoinSet::new();
        loop {
            let claimed = match self
                .store
                .claim_releases(&self.config.owner, self.config.lease.as_millis() as u64, 64)
                .await
            {
                Ok(claimed) => claimed,
                // A database that is away for a moment must not end the
                // worker of a long-running server; a run until idle reports it.
                Err(e) if !until_idle => {
                    warn!(error = %e, "cannot claim releases; trying again");
                    Vec::new()
                }
                Err(e) => return Err(e.into()),
            };
            for record in claimed {
                if running.contains_key(&record.id) {
                    continue;
                }
                let id = record.id.clone();
                let driver = Driver {
                    store: self.store.clone(),
                    owner: self.config.owner.clone(),
                    lease: self.config.lease,
                    poll: self.config.poll,
                    cancel: cancel.child_token(),
                };
                let runtimes = self.runtimes.clone();
                let span = info_span!("release", id = %id, app = %record.app, env = %record.env);
                let task_id = id.clone();
                let handle = tasks.spawn(
                    async move {
                        let result = match runtimes.runtime(&record.app, &record.env).await {
                            Ok(runtime) => driver.drive(record, runtime).await,
                            Err(e) => driver.no_runtime(&record, e).await,
                        };
                        (task_id, result)
                    }
                    .instrument(span),
                );
                running.insert(id, handle);
            }
            if until_idle && running.is_empty() {
                return Ok(());
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                joined = tasks.join_next(), if !tasks.is_empty() => {
                    if let Some(Ok((id, result))) = joined {
                        running.remove(&id);
                        match result {
                            Ok(()) => info!(release = %id, "release driven to its end or handed over"),
                            Err(e) => warn!(release = %id, error = %e, "release driver stopped; it will be claimed again"),
                        }
                    }
                }
                // A new release is claimed at once; the poll covers
                // expired leases and missed notifications.
                () = next_release_change(&mut changes, |c| c.version == Some(1)) => {}
                _ = tokio::time::sleep(self.config.poll) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

/// Drives one claimed release.
struct Driver {
    store: Store,
    owner: String,
    lease: Duration,
    poll: Duration,
    cancel: CancellationToken,
}

enum Next {
    Input(Input),
    Hook(Option<HookLine>),
    FlushHooks,
    Reload,
    Renew,
    Stop,
}

/// Hook output lines kept per instance, hook and run; further lines of
/// that run are dropped and counted.
pub const HOOK_LINES_PER_RUN: u32 = 200;
/// Hook output lines a release keeps per second on average (all its
/// instances together), with bursts up to [`HOOK_LINES_BURST`].
pub const HOOK_LINES_PER_SECOND: u32 = 100;
/// The largest burst of hook output lines a release keeps at once.
pub const HOOK_LINES_BURST: u32 = 400;
/// Hook output lines per stored event.
const HOOK_BATCH_LINES: usize = 100;
/// How long hook output lines wait to be stored with others.
const HOOK_FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Before a release's final state is written, how long its hook output may
/// stay quiet (and at most take) to come in first, so that a watcher,
/// whose stream ends with the release, sees it.
const HOOK_SETTLE_QUIET: Duration = Duration::from_millis(25);
const HOOK_SETTLE_MAX: Duration = Duration::from_secs(1);

/// A release's hook output on its way into the event stream: bounded per
/// hook run and per second, stored in batches (one event of up to
/// [`HOOK_BATCH_LINES`] lines at most every [`HOOK_FLUSH_EVERY`]), with
/// what was dropped said in the stream.
///
/// ```text
/// {"kind": "hook-output",
///  "lines": [{"instance": "vm-2@blue", "hook": "preOnline", "line": "warming caches…"}, …],
///  "dropped": [{"instance": "vm-2@blue", "hook": "preOnline", "lines": 12,
///               "why": "more than 200 lines in one run"}, …]}
/// ```
struct HookBatcher {
    lines: Vec<serde_json::Value>,
    /// (instance, hook, why) → lines dropped since the last flush.
    dropped: BTreeMap<(String, String, &'static str), u64>,
    per_run: HashMap<(String, String, Timestamp), u32>,
    tokens: f64,
    refilled: tokio::time::Instant,
    flush_at: Option<tokio::time::Instant>,
}

const WHY_PER_RUN: &str = "more than 200 lines in one run";
const WHY_RATE: &str = "more than 100 lines per second in the release";
const WHY_BACKLOG: &str = "the engine fell behind";

impl HookBatcher {
    fn new() -> Self {
        Self {
            lines: Vec::new(),
            dropped: BTreeMap::new(),
            per_run: HashMap::new(),
            tokens: f64::from(HOOK_LINES_BURST),
            refilled: tokio::time::Instant::now(),
            flush_at: None,
        }
    }

    fn pending(&self) -> bool {
        !self.lines.is_empty() || !self.dropped.is_empty()
    }

    fn drop_line(&mut self, instance: &str, hook: &str, why: &'static str, n: u64) {
        *self
            .dropped
            .entry((instance.to_string(), hook.to_string(), why))
            .or_default() += n;
    }

    fn push(&mut self, line: HookLine) {
        let instance = line.instance.0.clone();
        let now = tokio::time::Instant::now();
        self.tokens = (self.tokens
            + now.duration_since(self.refilled).as_secs_f64() * f64::from(HOOK_LINES_PER_SECOND))
        .min(f64::from(HOOK_LINES_BURST));
        self.refilled = now;
        let count = self
            .per_run
            .entry((instance.clone(), line.hook.clone(), line.run))
            .or_default();
        if *count >= HOOK_LINES_PER_RUN {
            self.drop_line(&instance, &line.hook, WHY_PER_RUN, 1);
        } else if self.tokens < 1.0 {
            self.drop_line(&instance, &line.hook, WHY_RATE, 1);
        } else {
            *count += 1;
            self.tokens -= 1.0;
            self.lines.push(serde_json::json!({
                "instance": instance,
                "hook": line.hook,
                "line": line.line,
            }));
        }
        if self.flush_at.is_none() {
            self.flush_at = Some(now + HOOK_FLUSH_EVERY);
        }
    }

    fn backlog(&mut self, dropped: u64) {
        if dropped > 0 {
            self.drop_line("", "", WHY_BACKLOG, dropped);
            self.flush_at
                .get_or_insert(tokio::time::Instant::now() + HOOK_FLUSH_EVERY);
        }
    }

    /// The events to store now: every line and drop so far.
    fn take(&mut self) -> Vec<serde_json::Value> {
        self.flush_at = None;
        let mut events: Vec<serde_json::Value> = Vec::new();
        let mut lines = std::mem::take(&mut self.lines);
        let dropped: Vec<serde_json::Value> = std::mem::take(&mut self.dropped)
            .into_iter()
            .map(|((instance, hook, why), n)| {
                let mut drop = serde_json::json!({"lines": n, "why": why});
                if !instance.is_empty() {
                    drop["instance"] = instance.into();
                    drop["hook"] = hook.into();
                }
                drop
            })
            .collect();
        while lines.len() > HOOK_BATCH_LINES {
            let rest = lines.split_off(HOOK_BATCH_LINES);
            events.push(serde_json::json!({"kind": "hook-output", "lines": lines}));
            lines = rest;
        }
        let mut last = serde_json::json!({"kind": "hook-output", "lines": lines});
        if !dropped.is_empty() {
            last["dropped"] = dropped.into();
        }
        if !lines_empty(&last) || last.get("dropped").is_some() {
            events.push(last);
        }
        events
    }
}

fn lines_empty(event: &serde_json::Value) -> bool {
    event["lines"].as_array().is_none_or(Vec::is_empty)
}

/// Receives the next hook line; None when there is no (more) subscription.
async fn next_hook_line(hooks: &mut Option<HookOutput>) -> Option<HookLine> {
    match hooks {
        Some(output) => output.lines.recv().await,
        None => std::future::pending().await,
    }
}

impl Driver {
    /// Plans a requested release over the runtime's instances and stores
    /// the plan (or why there is none); None when the release is refused
    /// or was changed meanwhile.
    async fn plan<R: Runtime>(
        &self,
        record: &ReleaseRecord,
        request: &NewReleaseRequest,
        runtime: &R,
    ) -> Result<Option<(Release, i64)>> {
        let fleet = runtime.fleet().await?;
        self.store_plan(record, request, plan_release(&record.id, fleet, request))
            .await
    }

    /// Without a runtime, a release being planned is refused (it names what
    /// is missing); a planned one waits to be claimed again.
    async fn no_runtime(&self, record: &ReleaseRecord, error: RuntimeError) -> Result<()> {
        match decode_stored(record)? {
            StoredRelease::Requested { request } => {
                self.store_plan(record, &request, Err(Error::Plan(error.0)))
                    .await?;
                Ok(())
            }
            StoredRelease::Planned { .. } => Err(error.into()),
            StoredRelease::Refused { .. } | StoredRelease::AbortedUnplanned { .. } => Ok(()),
        }
    }

    /// Stores a release's plan, or why there is none.
    async fn store_plan(
        &self,
        record: &ReleaseRecord,
        request: &NewReleaseRequest,
        plan: Result<Release>,
    ) -> Result<Option<(Release, i64)>> {
        let (state, status, release, event) = match plan {
            Ok(release) => {
                let event = serde_json::json!({"kind": "planned", "status": release.status});
                (
                    planned(&release),
                    release.status.label(),
                    Some(release),
                    event,
                )
            }
            Err(e) => {
                let error = e.to_string();
                warn!(error = %error, "release refused");
                let event = serde_json::json!({"kind": "refused", "error": error});
                let state = encode(&StoredRelease::Refused {
                    request: request.clone(),
                    error,
                });
                (state, REFUSED, None, event)
            }
        };
        let commit = ReleaseCommit {
            id: &record.id,
            expected_version: record.version,
            lease_owner: Some(&self.owner),
            state: &state,
            status,
            finished: release.is_none(),
            planned: Vec::new(),
            done: Vec::new(),
            failed: Vec::new(),
            event: Some(event),
            audit: None,
        };
        match self.store.commit_release(&commit).await? {
            CommitOutcome::Written(version) => Ok(release.map(|r| (r, version))),
            CommitOutcome::Stale => {
                // A user aborted it meanwhile (the only change a release
                // being planned takes): it is theirs, and nothing ran.
                info!("release changed while it was being planned; leaving it");
                Ok(None)
            }
        }
    }

    /// Stores the hook output gathered so far (best effort: hook output
    /// must never stop a release).
    async fn flush_hooks(&self, id: &str, hooks: &Option<HookOutput>, batch: &mut HookBatcher) {
        if let Some(output) = hooks {
            batch.backlog(output.dropped.swap(0, std::sync::atomic::Ordering::Relaxed));
        }
        if !batch.pending() {
            batch.flush_at = None;
            return;
        }
        let events = batch.take();
        if let Err(e) = self.store.append_release_events(id, &events).await {
            warn!(error = %e, lines = events.len(), "cannot store hook output; dropped");
        }
    }

    /// Lets hook output that is on its way come in, then stores it: done
    /// before the release's final state, with which its stream ends.
    async fn settle_hooks(
        &self,
        id: &str,
        hooks: &mut Option<HookOutput>,
        batch: &mut HookBatcher,
    ) {
        if let Some(output) = hooks.as_mut() {
            let end = tokio::time::Instant::now() + HOOK_SETTLE_MAX;
            // A hook that keeps printing cannot hold the release's end back.
            while tokio::time::Instant::now() < end {
                let quiet = (tokio::time::Instant::now() + HOOK_SETTLE_QUIET).min(end);
                match tokio::time::timeout_at(quiet, output.lines.recv()).await {
                    Ok(Some(line)) => batch.push(line),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        self.flush_hooks(id, hooks, batch).await;
    }

    async fn drive<R: Runtime>(self, record: ReleaseRecord, runtime: Arc<R>) -> Result<()> {
        let id = record.id.clone();
        // Subscribe before anything is applied, so no observation is missed.
        let mut events = runtime.events().await?;
        let (mut release, mut version) = match decode_stored(&record)? {
            StoredRelease::Planned { release } => (*release, record.version),
            StoredRelease::Refused { .. } | StoredRelease::AbortedUnplanned { .. } => {
                return Ok(());
            }
            StoredRelease::Requested { request } => {
                match self.plan(&record, &request, runtime.as_ref()).await? {
                    Some(planned) => planned,
                    None => return Ok(()),
                }
            }
        };
        // Hook output of runs since the release was asked for when this
        // worker planned it; after a worker's crash, from now on.
        let since = match decode_stored(&record)? {
            StoredRelease::Requested { .. } => {
                Timestamp(u64::try_from(record.created_at.0).unwrap_or(0))
            }
            _ => now(),
        };
        let mut hooks = runtime.hook_output(since);
        let mut batch = HookBatcher::new();
        let mut done_steps: HashSet<String> = self
            .store
            .release_journal(&id)
            .await?
            .into_iter()
            .filter(|e| e.status == JournalStatus::Done)
            .map(|e| e.step)
            .collect();
        let (done_tx, mut done_rx) = mpsc::channel::<(StepId, Result<(), RuntimeError>)>(256);
        let mut in_flight: HashSet<StepId> = HashSet::new();
        let mut queued: Vec<Input> = Vec::new();
        // The instances the runtime knows come first (the machine's contract).
        while let Ok(event) = events.try_recv() {
            queued.push(Input {
                now: now(),
                event: Event::Instance(event),
            });
        }
        if release.status == Status::Pending {
            queued.push(Input {
                now: now(),
                event: Event::Start,
            });
        }
        let mut ticked_for: Option<Timestamp> = None;
        let mut renew_at = tokio::time::Instant::now() + self.lease / 3;
        let mut poll_at = tokio::time::Instant::now() + self.poll;
        // A user's request (pause, abort, …) is read at once.
        let mut changes = self.store.release_changes();
        info!(
            status = release.status.label(),
            pending = release.pending.len(),
            "driving release"
        );
        loop {
            // Apply what the state says is issued and not confirmed: new
            // actions, and after a restart the ones a crash may have cut.
            for action in &release.pending {
                if in_flight.contains(&action.id) {
                    continue;
                }
                in_flight.insert(action.id.clone());
                if done_steps.contains(&action.id.to_string()) {
                    queued.push(Input {
                        now: now(),
                        event: Event::Done {
                            step: action.id.clone(),
                        },
                    });
                    continue;
                }
                let runtime = runtime.clone();
                let action = action.clone();
                let done_tx = done_tx.clone();
                tokio::spawn(async move {
                    let name = step_name(&action.id);
                    kill::point(&name, When::Before);
                    let result = runtime.apply(&action).await;
                    kill::point(&name, When::After);
                    let _ = done_tx.send((action.id, result)).await;
                });
            }
            if release.status.is_terminal() && release.pending.is_empty() && queued.is_empty() {
                info!(status = release.status.label(), "release finished");
                self.flush_hooks(&id, &hooks, &mut batch).await;
                return Ok(());
            }
            let wake = match release.status {
                Status::Pausing { until, .. } => Some(until),
                Status::Running { .. } => release.deadline,
                _ => None,
            }
            .filter(|w| ticked_for != Some(*w));
            let next = if let Some(input) = (!queued.is_empty()).then(|| queued.remove(0)) {
                Next::Input(input)
            } else {
                let sleep_ms = wake.map(|w| w.0.saturating_sub(now().0));
                let flush_at = batch.flush_at;
                tokio::select! {
                    _ = self.cancel.cancelled() => Next::Stop,
                    line = next_hook_line(&mut hooks), if hooks.is_some() => Next::Hook(line),
                    _ = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => Next::FlushHooks,
                    event = events.recv() => match event {
                        Some(event) => Next::Input(Input { now: now(), event: Event::Instance(event) }),
                        None => return Err(RuntimeError("the runtime's event stream ended".into()).into()),
                    },
                    Some((step, result)) = done_rx.recv() => {
                        in_flight.remove(&step);
                        let event = match result {
                            Ok(()) => Event::Done { step },
                            Err(e) => Event::ActionFailed { step, error: e.0 },
                        };
                        Next::Input(Input { now: now(), event })
                    }
                    _ = tokio::time::sleep(Duration::from_millis(sleep_ms.unwrap_or(0))), if sleep_ms.is_some() => {
                        ticked_for = wake;
                        Next::Input(Input { now: now(), event: Event::Tick })
                    }
                    _ = tokio::time::sleep_until(renew_at) => Next::Renew,
                    _ = tokio::time::sleep_until(poll_at) => Next::Reload,
                    () = next_release_change(&mut changes, |c| c.id == id && c.version.is_some_and(|v| v > version)) => Next::Reload,
                }
            };
            match next {
                Next::Stop => {
                    self.flush_hooks(&id, &hooks, &mut batch).await;
                    return Ok(());
                }
                Next::Hook(Some(line)) => {
                    batch.push(line);
                    if batch.lines.len() >= HOOK_BATCH_LINES {
                        self.flush_hooks(&id, &hooks, &mut batch).await;
                    }
                }
                Next::Hook(None) => {
                    // The runtime stopped passing hook output on.
                    self.flush_hooks(&id, &hooks, &mut batch).await;
                    hooks = None;
                }
                Next::FlushHooks => self.flush_hooks(&id, &hooks, &mut batch).await,
                Next::Renew => {
                    renew_at = tokio::time::Instant::now() + self.lease / 3;
                    if !self
                        .store
                        .renew_release_lease(&id, &self.owner, self.lease.as_millis() as u64)
                        .await?
                    {
                        warn!("lease lost; another worker runs the release now");
                        return Ok(());
                    }
                }
                Next::Reload => {
                    poll_at = tokio::time::Instant::now() + self.poll;
                    let record = self.store.release(&id).await?;
                    if record.lease_owner.as_deref() != Some(self.owner.as_str())
                        && !record.finished
                    {
                        warn!("lease lost; another worker runs the release now");
                        return Ok(());
                    }
                    if record.version != version {
                        release = decode(&record)?;
                        version = record.version;
                    }
                }
                Next::Input(input) => {
                    // News of a process can overtake its start's completion;
                    // the machine reads it in either order.
                    let mut attempts = 0;
                    loop {
                        let transition = step(&release, &input);
                        if transition.rejected.is_some()
                            || (transition.actions.is_empty() && transition.release == release)
                        {
                            break; // nothing changed: nothing to write
                        }
                        let state = planned(&transition.release);
                        let commit = commit_of(
                            &id,
                            version,
                            Some(&self.owner),
                            &input,
                            &transition.release,
                            &transition.actions,
                            &state,
                        );
                        if commit.finished {
                            self.settle_hooks(&id, &mut hooks, &mut batch).await;
                        }
                        match self.store.commit_release(&commit).await? {
                            CommitOutcome::Written(v) => {
                                version = v;
                                if let Event::Done { step } = &input.event {
                                    done_steps.insert(step.to_string());
                                }
                                release = transition.release;
                                break;
                            }
                            CommitOutcome::Stale => {
                                attempts += 1;
                                let record = self.store.release(&id).await?;
                                if record.lease_owner.as_deref() != Some(self.owner.as_str())
                                    || attempts > MAX_RETRIES
                                {
                                    warn!("lease lost; another worker runs the release now");
                                    return Ok(());
                                }
                                release = decode(&record)?;
                                version = record.version;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_core::release::InstanceId;

    fn line(instance: &str, hook: &str, run: u64, text: &str) -> HookLine {
        HookLine {
            instance: InstanceId(instance.into()),
            hook: hook.into(),
            run: Timestamp(run),
            line: text.into(),
        }
    }

    fn kept(events: &[serde_json::Value]) -> Vec<String> {
        events
            .iter()
            .flat_map(|e| e["lines"].as_array().cloned().unwrap_or_default())
            .map(|l| l["line"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    #[tokio::test]
    async fn one_run_keeps_its_first_lines_and_says_how_many_were_dropped() {
        let mut batch = HookBatcher::new();
        for n in 0..250 {
            batch.push(line("vm-0@blue", "preOnline", 1, &format!("line {n}")));
        }
        batch.push(line("vm-1@blue", "preOnline", 1, "other instance"));
        let events = batch.take();
        assert!(events.iter().all(|e| e["kind"] == "hook-output"));
        assert!(
            events
                .iter()
                .all(|e| e["lines"].as_array().map_or(0, Vec::len) <= HOOK_BATCH_LINES)
        );
        let lines = kept(&events);
        assert_eq!(lines.len(), HOOK_LINES_PER_RUN as usize + 1);
        assert_eq!(lines[0], "line 0");
        assert_eq!(lines[199], "line 199");
        assert_eq!(lines[200], "other instance");
        let dropped = &events.last().expect("events")["dropped"];
        assert_eq!(
            dropped,
            &serde_json::json!([{"instance": "vm-0@blue", "hook": "preOnline", "lines": 50, "why": WHY_PER_RUN}])
        );
        assert!(!batch.pending() && batch.take().is_empty());
    }

    #[tokio::test]
    async fn a_release_keeps_a_bounded_rate_of_lines() {
        let mut batch = HookBatcher::new();
        let total = 3 * HOOK_LINES_BURST;
        for n in 0..total {
            // Many runs, so that only the rate bounds them.
            batch.push(line("vm-0@blue", "preStart", u64::from(n), "x"));
        }
        batch.backlog(7);
        let events = batch.take();
        let kept = kept(&events).len() as u64;
        let dropped: u64 = events.last().expect("events")["dropped"]
            .as_array()
            .expect("dropped")
            .iter()
            .map(|d| {
                assert!(d["why"] == WHY_RATE || d["why"] == WHY_BACKLOG, "{d}");
                d["lines"].as_u64().unwrap_or(0)
            })
            .sum();
        assert!(
            kept >= u64::from(HOOK_LINES_BURST) && kept < u64::from(total),
            "{kept}"
        );
        assert_eq!(kept + dropped, u64::from(total) + 7);
    }
}
