//! The release engine against real local processes: hooks and app starts
//! append `instance,step,version,generation` lines to a file, so the tests
//! check what really ran, in which order and how often.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_core::profile::{Batches, Duration as ProfileDuration, Pause, Strategy};
use keelson_core::release::{
    Event, FailedInstancePolicy, Fleet, InstanceState, OutcomeState, Release, ReleaseSettings,
    Status, Track, Version,
};
use keelson_release::local::{LocalRuntime, LocalRuntimes, LocalSpec};
use keelson_release::{
    Error, NewReleaseRequest, Runtime, Worker, WorkerConfig, create_release, release_view, request,
    step_name, submit_release,
};
use keelson_store::testing::{TestDatabase, test_database};
use keelson_store::{Backend, JournalStatus, Store};
use tokio_util::sync::CancellationToken;

const APP: &str = "shop";
const ENV: &str = "prod";

struct Scene {
    dir: tempfile::TempDir,
    store: Store,
    _db: TestDatabase,
    url: String,
}

impl Drop for Scene {
    /// No process outlives its test, even a failed one.
    fn drop(&mut self) {
        self.runtime().kill_all();
    }
}

impl Scene {
    async fn new(backend: Backend) -> Option<Scene> {
        let db = test_database(backend).await?;
        let store = Store::open(&db.url).await.expect("open the store");
        Some(Scene {
            dir: tempfile::tempdir().expect("temp dir"),
            store,
            url: db.url.clone(),
            _db: db,
        })
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("effects.log")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("runtimes")
    }

    fn spec(&self) -> LocalSpec {
        spec(&self.log())
    }

    fn runtime(&self) -> LocalRuntime {
        LocalRuntime::new(self.root().join(APP).join(ENV), self.spec())
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Slots `vm-0`… running `v1`, ONLINE, as before any release.
    async fn deploy(&self, slots: u32) -> LocalRuntime {
        let runtime = self.runtime();
        for n in 0..slots {
            runtime
                .deploy(&format!("vm-{n}"), Track::Blue, &Version::from("v1"))
                .await
                .expect("deploy v1");
        }
        runtime
    }

    async fn create(
        &self,
        runtime: &LocalRuntime,
        version: &str,
        settings: ReleaseSettings,
    ) -> String {
        let record = create_release(
            &self.store,
            runtime,
            &NewReleaseRequest {
                id: Some("r1".into()),
                app: APP.into(),
                env: ENV.into(),
                version: Version::from(version),
                desired: None,
                settings,
                actor: "alice".into(),
            },
        )
        .await
        .expect("create the release");
        record.id
    }

    fn worker(&self, owner: &str) -> Worker<LocalRuntimes> {
        Worker::new(
            self.store.clone(),
            Arc::new(LocalRuntimes::new(self.root(), self.spec())),
            WorkerConfig {
                owner: owner.into(),
                lease: Duration::from_secs(10),
                poll: Duration::from_millis(50),
            },
        )
    }

    async fn release(&self, id: &str) -> Release {
        release_view(&self.store, id)
            .await
            .expect("read the release")
            .state
            .expect("a planned release")
    }

    /// Waits until the release's status label is `label`.
    async fn wait_status(&self, id: &str, label: &str) -> Release {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let view = release_view(&self.store, id)
                .await
                .expect("read the release");
            let release = view.state.expect("a planned release");
            // A terminal state may still have clearing-up actions to apply.
            if release.status.label() == label && (view.finished || !release.status.is_terminal()) {
                return release;
            }
            assert!(
                Instant::now() < deadline,
                "release never became {label}: {:?}",
                release.status
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn spec(log: &Path) -> LocalSpec {
    let log = log.display();
    let line = format!(
        r#"echo "$KEELSON_INSTANCE,$KEELSON_HOOK,$KEELSON_VERSION,$KEELSON_GENERATION" >> "{log}""#
    );
    LocalSpec {
        app: format!(
            r#"echo "$KEELSON_INSTANCE,start,$KEELSON_VERSION,$KEELSON_GENERATION" >> "{log}"
case "$KEELSON_VERSION" in broken*) exit 3;; esac
case "$KEELSON_SLOT/$KEELSON_VERSION" in vm-1/partly-broken) exit 3;; esac
: > "$KEELSON_READY_FILE"
exec sleep 300"#
        ),
        pre_start: Some(line.clone()),
        pre_online: Some(line.clone()),
        pre_offline: Some(line),
        start_timeout: Duration::from_secs(10),
    }
}

fn settings(strategy: Strategy, batches: u32, pause: Pause) -> ReleaseSettings {
    ReleaseSettings {
        strategy,
        batches: Some(Batches {
            count: Some(batches),
            size: None,
        }),
        pause,
        failed_instances: FailedInstancePolicy::Fail,
        progress_deadline: ProfileDuration::from_secs(60),
    }
}

fn no_pause() -> Pause {
    Pause::For(ProfileDuration::from_secs(0))
}

/// Every line appears once.
fn assert_once(lines: &[String]) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for line in lines {
        *counts.entry(line).or_default() += 1;
    }
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "effects repeated: {repeated:?}\nall: {lines:#?}"
    );
}

fn position(lines: &[String], prefix: &str) -> usize {
    lines
        .iter()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix}… in {lines:#?}"))
}

async fn versions_online(runtime: &LocalRuntime) -> Vec<(String, String, InstanceState)> {
    let Fleet::Hosts { instances } = runtime.fleet().await.expect("fleet") else {
        panic!("hosts fleet expected")
    };
    instances
        .into_iter()
        .filter(|i| i.state != InstanceState::Stopped)
        .map(|i| (i.id.0, i.version.0, i.state))
        .collect()
}

#[tokio::test]
async fn in_place_release_runs_hooks_in_order_batch_by_batch() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(3).await;
    let id = scene
        .create(&runtime, "v2", settings(Strategy::InPlace, 3, no_pause()))
        .await;
    let cancel = CancellationToken::new();
    let worker = scene.worker("w1");
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { worker.run(cancel).await }
    });
    scene.wait_status(&id, "succeeded").await;
    cancel.cancel();
    run.await.expect("join").expect("worker");

    let lines = scene.lines();
    assert_once(&lines);
    for n in 0..3 {
        let i = format!("vm-{n}@blue");
        let order = [
            position(&lines, &format!("{i},preOffline,v1,none")),
            position(&lines, &format!("{i},preStart,v2,")),
            position(&lines, &format!("{i},start,v2,")),
            position(&lines, &format!("{i},preOnline,v2,")),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{i}: {lines:#?}");
        if n > 0 {
            // A batch starts only when the one before is ONLINE.
            let before = position(&lines, &format!("vm-{}@blue,preOnline,v2,", n - 1));
            assert!(before < order[0], "batch {n} began early: {lines:#?}");
        }
    }
    assert_eq!(
        versions_online(&runtime).await,
        (0..3)
            .map(|n| (
                format!("vm-{n}@blue"),
                "v2".to_string(),
                InstanceState::Online
            ))
            .collect::<Vec<_>>()
    );
    // Every journaled step is done, and the events tell the story.
    let journal = scene.store.release_journal(&id).await.expect("journal");
    assert_eq!(journal.len(), 6, "{journal:#?}");
    assert!(journal.iter().all(|e| e.status == JournalStatus::Done));
    let events = scene
        .store
        .release_events(&id, 0, 1000)
        .await
        .expect("events");
    assert_eq!(
        events.first().map(|e| e.body["kind"].clone()),
        Some("created".into())
    );
    assert_eq!(
        events.last().map(|e| e.body["status"]["status"].clone()),
        Some("succeeded".into())
    );
    let view = release_view(&scene.store, &id).await.expect("view");
    assert!(view.finished);
    assert_eq!(view.worker, None, "a finished release holds no lease");
    runtime.stop_all().await;
}

#[tokio::test]
async fn manual_pause_waits_for_resume_and_refuses_what_does_not_fit() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let id = scene
        .create(
            &runtime,
            "v2",
            settings(Strategy::InPlace, 2, Pause::Manual),
        )
        .await;
    let cancel = CancellationToken::new();
    let worker = scene.worker("w1");
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { worker.run(cancel).await }
    });
    scene.wait_status(&id, "paused").await;
    // Only the first batch moved.
    assert_eq!(
        versions_online(&runtime).await,
        vec![
            (
                "vm-0@blue".to_string(),
                "v2".to_string(),
                InstanceState::Online
            ),
            (
                "vm-1@blue".to_string(),
                "v1".to_string(),
                InstanceState::Online
            ),
        ]
    );
    let refused = request(&scene.store, &id, Event::Pause, "alice").await;
    assert!(
        matches!(&refused, Err(Error::Rejected(why)) if why.contains("paused")),
        "{refused:?}"
    );
    request(&scene.store, &id, Event::Resume, "alice")
        .await
        .expect("resume");
    scene.wait_status(&id, "succeeded").await;
    let refused = request(&scene.store, &id, Event::Resume, "alice").await;
    assert!(matches!(refused, Err(Error::Rejected(_))), "{refused:?}");
    cancel.cancel();
    run.await.expect("join").expect("worker");
    assert_once(&scene.lines());
    runtime.stop_all().await;
}

#[tokio::test]
async fn abort_takes_new_instances_out_of_traffic() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let id = scene
        .create(
            &runtime,
            "v2",
            settings(Strategy::InPlace, 2, Pause::Manual),
        )
        .await;
    let cancel = CancellationToken::new();
    let worker = scene.worker("w1");
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { worker.run(cancel).await }
    });
    scene.wait_status(&id, "paused").await;
    request(
        &scene.store,
        &id,
        Event::Abort { keep_online: false },
        "alice",
    )
    .await
    .expect("abort");
    let release = scene.wait_status(&id, "aborted").await;
    assert!(release.pending.is_empty());
    cancel.cancel();
    run.await.expect("join").expect("worker");
    assert_eq!(
        versions_online(&runtime).await,
        vec![
            (
                "vm-0@blue".to_string(),
                "v2".to_string(),
                InstanceState::Offline
            ),
            (
                "vm-1@blue".to_string(),
                "v1".to_string(),
                InstanceState::Online
            ),
        ]
    );
    let lines = scene.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("vm-0@blue,preOffline,v2,")),
        "{lines:#?}"
    );
    runtime.stop_all().await;
}

#[tokio::test]
async fn failing_instances_are_recreated_then_fail_the_release() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let mut settings = settings(Strategy::InPlace, 2, no_pause());
    settings.failed_instances = FailedInstancePolicy::Recreate { max_attempts: 3 };
    let id = scene.create(&runtime, "broken-v2", settings).await;
    let worker = scene.worker("w1");
    worker.run_until_idle().await.expect("worker");
    let release = scene.release(&id).await;
    assert!(
        matches!(release.status, Status::Failed { .. }),
        "{:?}",
        release.status
    );
    let lines = scene.lines();
    let starts = lines
        .iter()
        .filter(|l| l.starts_with("vm-0@blue,start,broken-v2,"))
        .count();
    assert_eq!(starts, 3, "three attempts: {lines:#?}");
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("vm-1@blue,") && l.contains("broken")),
        "the second batch never began: {lines:#?}"
    );
    assert_once(&lines);
    runtime.stop_all().await;
}

/// Runs the worker binary over the scene; its exit code.
async fn worker_process(scene: &Scene, kill_at: Option<&str>) -> i32 {
    let spec = scene.spec();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_keelson-release-worker"));
    command
        .arg("--database")
        .arg(&scene.url)
        .arg("--root")
        .arg(scene.root())
        .arg("--owner")
        .arg("worker-1")
        .arg("--app")
        .arg(&spec.app)
        .arg("--pre-start")
        .arg(spec.pre_start.as_deref().unwrap_or_default())
        .arg("--pre-online")
        .arg(spec.pre_online.as_deref().unwrap_or_default())
        .arg("--pre-offline")
        .arg(spec.pre_offline.as_deref().unwrap_or_default())
        .env_remove("KEELSON_KILL_AT");
    if let Some(at) = kill_at {
        command.env("KEELSON_KILL_AT", at);
    }
    let status = tokio::time::timeout(Duration::from_secs(60), command.status())
        .await
        .expect("the worker finishes within a minute")
        .expect("run the worker");
    status.code().unwrap_or(-1)
}

/// A full run with no crash: the steps and the effects (sorted).
async fn reference_run(strategy: Strategy) -> (Vec<String>, Vec<String>) {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let id = scene
        .create(&runtime, "v2", settings(strategy, 2, no_pause()))
        .await;
    assert_eq!(worker_process(&scene, None).await, 0);
    assert_eq!(scene.release(&id).await.status, Status::Succeeded);
    let steps = scene
        .store
        .release_journal(&id)
        .await
        .expect("journal")
        .into_iter()
        .map(|e| {
            let action: keelson_core::release::Action =
                serde_json::from_value(e.action).expect("journaled action");
            step_name(&action.id)
        })
        .collect();
    let mut lines = scene.lines();
    assert_once(&lines);
    lines.sort();
    runtime.stop_all().await;
    (steps, lines)
}

async fn crash_at_every_step(strategy: Strategy, backend: Backend) {
    if Scene::new(backend).await.is_none() {
        return; // PostgreSQL skipped on purpose
    }
    let (steps, expected) = reference_run(strategy).await;
    assert!(steps.len() >= 4, "{steps:?}");
    for step in &steps {
        for when in ["before", "after"] {
            let at = format!("{step}:{when}");
            let scene = Scene::new(backend).await.expect("database");
            let runtime = scene.deploy(2).await;
            let id = scene
                .create(&runtime, "v2", settings(strategy, 2, no_pause()))
                .await;
            assert_eq!(
                worker_process(&scene, Some(&at)).await,
                137,
                "kill point {at} was not reached"
            );
            assert_ne!(scene.release(&id).await.status, Status::Succeeded, "{at}");
            assert_eq!(worker_process(&scene, None).await, 0, "resume after {at}");
            let release = scene.release(&id).await;
            assert_eq!(release.status, Status::Succeeded, "after {at}");
            let mut lines = scene.lines();
            assert_once(&lines);
            lines.sort();
            assert_eq!(lines, expected, "effects after a crash at {at}");
            let online = versions_online(&runtime).await;
            assert!(
                online
                    .iter()
                    .all(|(_, v, s)| v == "v2" && *s == InstanceState::Online)
                    && online.len() == 2,
                "after {at}: {online:?}"
            );
            runtime.stop_all().await;
        }
    }
}

#[tokio::test]
async fn in_place_resumes_after_a_crash_at_every_step() {
    crash_at_every_step(Strategy::InPlace, Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_in_place_resumes_after_a_crash_at_every_step() {
    crash_at_every_step(Strategy::InPlace, Backend::Postgres).await;
}

#[tokio::test]
async fn dual_deployment_resumes_after_a_crash_at_every_step() {
    crash_at_every_step(Strategy::DualDeployment, Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_workers_share_releases_through_leases() {
    let Some(scene) = Scene::new(Backend::Postgres).await else {
        return;
    };
    let runtime = scene.deploy(2).await;
    let id = scene
        .create(&runtime, "v2", settings(Strategy::InPlace, 2, no_pause()))
        .await;
    // Two workers on one database: the lease gives the release to one.
    let (a, b) = (scene.worker("w-a"), scene.worker("w-b"));
    let (ra, rb) = tokio::join!(a.run_until_idle(), b.run_until_idle());
    ra.expect("worker a");
    rb.expect("worker b");
    assert_eq!(scene.release(&id).await.status, Status::Succeeded);
    assert_once(&scene.lines());
    assert_eq!(
        scene
            .lines()
            .iter()
            .filter(|l| l.contains(",start,v2,"))
            .count(),
        2
    );
    runtime.stop_all().await;
}

#[tokio::test]
async fn submitted_releases_are_planned_by_the_worker_or_refused() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let submit = |app: &str, batches: u32| NewReleaseRequest {
        id: None,
        app: app.into(),
        env: ENV.into(),
        version: Version::from("v2"),
        desired: None,
        settings: settings(Strategy::InPlace, batches, no_pause()),
        actor: "alice".into(),
    };
    let shop = submit_release(&scene.store, &submit(APP, 2))
        .await
        .expect("submit");
    assert_eq!(shop.status, "planning");
    // No instance of `empty` runs anywhere: nothing to plan from.
    let empty = submit_release(&scene.store, &submit("empty", 2))
        .await
        .expect("submit");
    let refused = request(&scene.store, &empty.id, Event::Pause, "alice").await;
    assert!(matches!(refused, Err(Error::Rejected(_))), "{refused:?}");
    scene.worker("w1").run_until_idle().await.expect("worker");

    let view = release_view(&scene.store, &shop.id).await.expect("view");
    assert_eq!(view.status, "succeeded");
    let summary = serde_json::to_value(view.summary.expect("summary")).expect("json");
    assert!(summary.to_string().contains("v2"), "{summary}");
    let view = release_view(&scene.store, &empty.id).await.expect("view");
    assert_eq!((view.status.as_str(), view.finished), ("refused", true));
    assert!(view.error.expect("why").contains("no instances"));
    assert!(view.state.is_none());
    runtime.stop_all().await;
}

#[tokio::test]
async fn tolerated_failures_let_the_release_finish() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let mut settings = settings(Strategy::InPlace, 2, no_pause());
    settings.failed_instances = FailedInstancePolicy::Tolerate { max_ratio: 0.5 };
    let id = scene.create(&runtime, "partly-broken", settings).await;
    scene.worker("w1").run_until_idle().await.expect("worker");
    let release = scene.release(&id).await;
    assert_eq!(release.status, Status::Succeeded);
    let states: Vec<_> = release
        .outcomes
        .iter()
        .map(|o| (o.instance.0.as_str(), o.state))
        .collect();
    assert_eq!(
        states,
        [
            ("vm-0@blue", OutcomeState::Online),
            ("vm-1@blue", OutcomeState::Tolerated)
        ]
    );
    let live = versions_online(&runtime).await;
    assert_eq!(
        live[0],
        (
            "vm-0@blue".into(),
            "partly-broken".into(),
            InstanceState::Online
        )
    );
    assert_eq!(live[1].2, InstanceState::Failed, "{live:?}");
    runtime.stop_all().await;
}

#[tokio::test]
async fn timed_pauses_end_by_themselves() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let pause = Pause::For(ProfileDuration::parse("300ms").expect("duration"));
    let id = scene
        .create(&runtime, "v2", settings(Strategy::InPlace, 2, pause))
        .await;
    scene.worker("w1").run_until_idle().await.expect("worker");
    assert_eq!(scene.release(&id).await.status, Status::Succeeded);
    let events = scene
        .store
        .release_events(&id, 0, 1000)
        .await
        .expect("events");
    let pausing = events
        .iter()
        .find(|e| e.body["status"]["status"] == "pausing")
        .expect("a pause between the batches");
    let tick = events
        .iter()
        .find(|e| e.body["kind"] == "tick")
        .expect("the pause ended by a tick");
    // The tick came no earlier than the pause's end, which is 300 ms after
    // the input that began the pause (both on the engine's clock).
    let until = pausing.body["status"]["until"].as_u64().expect("until");
    let began = pausing.body["input"]["now"].as_u64().expect("now");
    let ticked = tick.body["input"]["now"].as_u64().expect("now");
    assert_eq!(until - began, 300);
    assert!(ticked >= until, "ticked at {ticked}, pause until {until}");
    runtime.stop_all().await;
}

#[tokio::test]
async fn rollback_returns_every_instance_to_the_previous_version() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let id = scene
        .create(&runtime, "v2", settings(Strategy::InPlace, 2, no_pause()))
        .await;
    scene.worker("w1").run_until_idle().await.expect("worker");
    assert_eq!(scene.release(&id).await.status, Status::Succeeded);
    request(&scene.store, &id, Event::Rollback, "alice")
        .await
        .expect("roll back");
    // A second worker (a restarted server) picks the release up again.
    scene.worker("w2").run_until_idle().await.expect("worker");
    assert_eq!(scene.release(&id).await.status, Status::RolledBack);
    assert_eq!(
        versions_online(&runtime).await,
        vec![
            (
                "vm-0@blue".to_string(),
                "v1".to_string(),
                InstanceState::Online
            ),
            (
                "vm-1@blue".to_string(),
                "v1".to_string(),
                InstanceState::Online
            ),
        ]
    );
    let lines = scene.lines();
    assert_once(&lines);
    assert_eq!(
        lines.iter().filter(|l| l.contains(",start,v1,")).count(),
        4,
        "{lines:#?}"
    );
    runtime.stop_all().await;
}

/// A release run to success and then rolled back by worker processes; the
/// kill point applies to the rollback's run. Returns the rollback's steps,
/// the sorted effects and the final status.
async fn rolled_back_run(kill_at: Option<&str>) -> (Vec<String>, Vec<String>, Status) {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let id = scene
        .create(&runtime, "v2", settings(Strategy::InPlace, 2, no_pause()))
        .await;
    assert_eq!(worker_process(&scene, None).await, 0);
    request(&scene.store, &id, Event::Rollback, "alice")
        .await
        .expect("roll back");
    if let Some(at) = kill_at {
        assert_eq!(
            worker_process(&scene, Some(at)).await,
            137,
            "kill point {at} was not reached"
        );
    }
    assert_eq!(worker_process(&scene, None).await, 0);
    let steps = scene
        .store
        .release_journal(&id)
        .await
        .expect("journal")
        .into_iter()
        .map(|e| {
            let action: keelson_core::release::Action =
                serde_json::from_value(e.action).expect("journaled action");
            step_name(&action.id)
        })
        .filter(|s| s.starts_with("rollback/"))
        .collect();
    let mut lines = scene.lines();
    assert_once(&lines);
    lines.sort();
    let online = versions_online(&runtime).await;
    assert!(
        online
            .iter()
            .all(|(_, v, s)| v == "v1" && *s == InstanceState::Online),
        "after {kill_at:?}: {online:?}"
    );
    runtime.stop_all().await;
    (steps, lines, scene.release(&id).await.status)
}

#[tokio::test]
async fn rollback_resumes_after_a_crash_at_every_step() {
    let (steps, expected, status) = rolled_back_run(None).await;
    assert_eq!(status, Status::RolledBack);
    assert!(steps.len() >= 4, "{steps:?}");
    for step in &steps {
        for when in ["before", "after"] {
            let at = format!("{step}:{when}");
            let (_, lines, status) = rolled_back_run(Some(&at)).await;
            assert_eq!(status, Status::RolledBack, "after {at}");
            assert_eq!(lines, expected, "effects after a crash at {at}");
        }
    }
}

/// Local runtimes whose first look at the instances (the planning) waits
/// until the test opens the gate, so a user's request can come in while a
/// worker plans.
struct GatedRuntimes {
    inner: LocalRuntimes,
    planning: Arc<tokio::sync::Notify>,
    gate: tokio::sync::watch::Receiver<bool>,
}

struct Gated {
    inner: Arc<LocalRuntime>,
    planning: Arc<tokio::sync::Notify>,
    gate: tokio::sync::watch::Receiver<bool>,
}

impl Runtime for Gated {
    async fn fleet(&self) -> Result<Fleet, keelson_release::RuntimeError> {
        self.planning.notify_one();
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|open| *open).await;
        self.inner.fleet().await
    }

    async fn apply(
        &self,
        action: &keelson_core::release::Action,
    ) -> Result<(), keelson_release::RuntimeError> {
        self.inner.apply(action).await
    }

    async fn events(
        &self,
    ) -> Result<
        tokio::sync::mpsc::Receiver<keelson_core::release::InstanceEvent>,
        keelson_release::RuntimeError,
    > {
        self.inner.events().await
    }
}

impl keelson_release::Runtimes for GatedRuntimes {
    type Runtime = Gated;

    async fn runtime(
        &self,
        app: &str,
        env: &str,
    ) -> Result<Arc<Gated>, keelson_release::RuntimeError> {
        Ok(Arc::new(Gated {
            inner: self.inner.runtime(app, env).await?,
            planning: self.planning.clone(),
            gate: self.gate.clone(),
        }))
    }
}

fn submitted(id: &str) -> NewReleaseRequest {
    NewReleaseRequest {
        id: Some(id.into()),
        app: APP.into(),
        env: ENV.into(),
        version: Version::from("v2"),
        desired: None,
        settings: settings(Strategy::InPlace, 2, no_pause()),
        actor: "alice".into(),
    }
}

async fn event_kinds(store: &Store, id: &str) -> Vec<String> {
    store
        .release_events(id, 0, 1000)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.body["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn a_release_being_planned_can_be_aborted_and_nothing_runs() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let before = scene.lines();
    let record = submit_release(&scene.store, &submitted("r1"))
        .await
        .expect("submit");

    // Pausing something that has no batches yet makes no sense: refused, saying why.
    match request(&scene.store, &record.id, Event::Pause, "bob").await {
        Err(Error::Rejected(why)) => {
            assert!(
                why.contains("still being planned") && why.contains("aborted now"),
                "{why}"
            );
        }
        other => panic!("pause of a release being planned: {other:?}"),
    }
    let view = request(
        &scene.store,
        &record.id,
        Event::Abort { keep_online: false },
        "bob",
    )
    .await
    .expect("abort");
    assert_eq!((view.status.as_str(), view.finished), ("aborted", true));
    assert_eq!(view.aborted_unplanned_by.as_deref(), Some("bob"));
    assert!(view.state.is_none() && view.summary.is_none());
    assert_eq!(view.worker, None);
    // Aborting twice says what happened.
    match request(
        &scene.store,
        &record.id,
        Event::Abort { keep_online: false },
        "bob",
    )
    .await
    {
        Err(Error::Rejected(why)) => assert!(why.contains("aborted by bob"), "{why}"),
        other => panic!("second abort: {other:?}"),
    }

    // A worker coming later finds nothing to do.
    scene.worker("w1").run_until_idle().await.expect("worker");
    let view = release_view(&scene.store, &record.id).await.expect("view");
    assert_eq!(view.status, "aborted");
    assert_eq!(
        event_kinds(&scene.store, &record.id).await,
        ["created", "aborted-unplanned"]
    );
    assert!(
        scene
            .store
            .release_journal(&record.id)
            .await
            .expect("journal")
            .is_empty()
    );
    assert_eq!(scene.lines(), before, "nothing ran");
    // The app and env are free for the next release.
    submit_release(&scene.store, &submitted("r2"))
        .await
        .expect("a new release after the aborted one");
    runtime.stop_all().await;
}

/// A worker that is planning the release when the abort comes: the abort
/// is written first, the worker's plan loses the version check, and the
/// worker leaves the release alone.
#[tokio::test]
async fn an_abort_during_planning_wins_over_the_worker_planning() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let before = scene.lines();
    let record = submit_release(&scene.store, &submitted("r1"))
        .await
        .expect("submit");
    let planning = Arc::new(tokio::sync::Notify::new());
    let (open, gate) = tokio::sync::watch::channel(false);
    let worker = Worker::new(
        scene.store.clone(),
        Arc::new(GatedRuntimes {
            inner: LocalRuntimes::new(scene.root(), scene.spec()),
            planning: planning.clone(),
            gate,
        }),
        WorkerConfig {
            owner: "w1".into(),
            lease: Duration::from_secs(10),
            poll: Duration::from_millis(50),
        },
    );
    let run = tokio::spawn(async move { worker.run_until_idle().await });
    tokio::time::timeout(Duration::from_secs(30), planning.notified())
        .await
        .expect("the worker plans the release");
    assert_eq!(
        scene
            .store
            .release(&record.id)
            .await
            .expect("record")
            .lease_owner
            .as_deref(),
        Some("w1"),
        "the worker holds the release while it plans"
    );
    let view = request(
        &scene.store,
        &record.id,
        Event::Abort { keep_online: false },
        "bob",
    )
    .await
    .expect("abort while a worker plans");
    assert_eq!((view.status.as_str(), view.finished), ("aborted", true));
    open.send(true).expect("open the gate");
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the worker ends")
        .expect("join")
        .expect("worker");

    let view = release_view(&scene.store, &record.id).await.expect("view");
    assert_eq!(view.status, "aborted");
    assert!(view.state.is_none(), "the worker's plan was not written");
    assert_eq!(
        event_kinds(&scene.store, &record.id).await,
        ["created", "aborted-unplanned"]
    );
    assert_eq!(scene.lines(), before, "nothing ran");
    runtime.stop_all().await;
}

/// The other order: the plan is written first, so the abort goes through
/// the machine like the abort of any planned release.
#[tokio::test]
async fn an_abort_after_the_plan_aborts_the_planned_release() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let runtime = scene.deploy(2).await;
    let mut request_ = submitted("r1");
    request_.settings = settings(Strategy::InPlace, 2, Pause::Manual);
    let record = submit_release(&scene.store, &request_)
        .await
        .expect("submit");
    let cancel = CancellationToken::new();
    let worker = scene.worker("w1");
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { worker.run(cancel).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while scene
        .store
        .release(&record.id)
        .await
        .expect("record")
        .status
        != "paused"
    {
        assert!(Instant::now() < deadline, "never paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let view = request(
        &scene.store,
        &record.id,
        Event::Abort { keep_online: false },
        "bob",
    )
    .await
    .expect("abort");
    assert_eq!(view.aborted_unplanned_by, None);
    scene.wait_status(&record.id, "aborted").await;
    cancel.cancel();
    run.await.expect("join").expect("worker");
    let kinds = event_kinds(&scene.store, &record.id).await;
    assert!(
        kinds.contains(&"planned".to_string()) && kinds.contains(&"abort".to_string()),
        "{kinds:?}"
    );
    assert!(
        !kinds.contains(&"aborted-unplanned".to_string()),
        "{kinds:?}"
    );
    runtime.stop_all().await;
}

/// `(instance, hook, line)` of every hook output line in the release's
/// events, and the drops they report.
async fn hook_output(
    store: &Store,
    id: &str,
) -> (Vec<(String, String, String)>, Vec<serde_json::Value>) {
    let mut lines = Vec::new();
    let mut dropped = Vec::new();
    for event in store.release_events(id, 0, 10_000).await.expect("events") {
        if event.body["kind"] != "hook-output" {
            continue;
        }
        for line in event.body["lines"].as_array().cloned().unwrap_or_default() {
            let text = |k: &str| line[k].as_str().unwrap_or_default().to_string();
            lines.push((text("instance"), text("hook"), text("line")));
        }
        dropped.extend(
            event.body["dropped"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
    }
    (lines, dropped)
}

#[tokio::test]
async fn hook_output_lines_reach_the_release_events_bounded() {
    let scene = Scene::new(Backend::Sqlite).await.expect("sqlite");
    let chatty = LocalSpec {
        app: r#": > "$KEELSON_READY_FILE"
echo "app stdout is not hook output"
exec sleep 300"#
            .into(),
        pre_start: Some(r#"echo "preparing $KEELSON_VERSION"; echo "to stderr" >&2"#.into()),
        pre_online: Some(
            r#"echo "warming caches…"; case "$KEELSON_SLOT" in vm-1) seq 1 250;; esac"#.into(),
        ),
        pre_offline: Some(r#"echo "draining $KEELSON_INSTANCE""#.into()),
        start_timeout: Duration::from_secs(10),
    };
    let runtime = LocalRuntime::new(scene.root().join(APP).join(ENV), chatty.clone());
    for n in 0..2 {
        runtime
            .deploy(&format!("vm-{n}"), Track::Blue, &Version::from("v1"))
            .await
            .expect("deploy v1");
    }
    let id = scene
        .create(&runtime, "v2", settings(Strategy::InPlace, 2, no_pause()))
        .await;
    Worker::new(
        scene.store.clone(),
        Arc::new(LocalRuntimes::new(scene.root(), chatty)),
        WorkerConfig {
            owner: "w1".into(),
            lease: Duration::from_secs(10),
            poll: Duration::from_millis(50),
        },
    )
    .run_until_idle()
    .await
    .expect("worker");
    assert_eq!(
        release_view(&scene.store, &id).await.expect("view").status,
        "succeeded"
    );

    let (lines, dropped) = hook_output(&scene.store, &id).await;
    let of = |instance: &str, hook: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|(i, h, _)| i == instance && h == hook)
            .map(|(_, _, l)| l.clone())
            .collect()
    };
    // In-place: the old process leaves traffic (preOffline), the new one starts.
    assert_eq!(of("vm-0@blue", "preOffline"), ["draining vm-0@blue"]);
    let mut pre_start = of("vm-0@blue", "preStart");
    pre_start.sort();
    assert_eq!(pre_start, ["preparing v2", "to stderr"]);
    assert_eq!(of("vm-0@blue", "preOnline"), ["warming caches…"]);
    // Lines of one run come in the order the hook wrote them, up to the cap.
    let vm1 = of("vm-1@blue", "preOnline");
    assert_eq!(vm1.len(), 200, "{vm1:?}");
    assert_eq!(vm1[0], "warming caches…");
    assert_eq!(vm1[1..4], ["1", "2", "3"]);
    assert_eq!(vm1[199], "199");
    assert_eq!(
        dropped,
        vec![serde_json::json!({
            "instance": "vm-1@blue", "hook": "preOnline", "lines": 51,
            "why": "more than 200 lines in one run"
        })]
    );
    // Only hooks: not the app's output, not the hooks of the v1 deploys
    // made before the release.
    assert!(
        lines.iter().all(|(_, _, l)| !l.contains("app stdout")),
        "{lines:?}"
    );
    assert!(
        lines.iter().all(|(_, _, l)| l != "preparing v1"),
        "{lines:?}"
    );
    // Stored before the release's end, with which its stream ends.
    let events = scene
        .store
        .release_events(&id, 0, 10_000)
        .await
        .expect("events");
    let last_hooks = events
        .iter()
        .rposition(|e| e.body["kind"] == "hook-output")
        .expect("hook output");
    let finished = events
        .iter()
        .position(|e| e.body["status"]["status"] == "succeeded")
        .expect("the final state");
    assert!(last_hooks < finished, "hook output after the end");
    runtime.stop_all().await;
}
