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
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::kill::{self, When};
use crate::runtime::{Runtime, RuntimeError, Runtimes};
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
            let live: Vec<_> = instances
                .iter()
                .filter(|i| i.state != InstanceState::Stopped)
                .collect();
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
    Reload,
    Renew,
    Stop,
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
                tokio::select! {
                    _ = self.cancel.cancelled() => Next::Stop,
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
                }
            };
            match next {
                Next::Stop => return Ok(()),
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
