//! The release engine on the hosts runtime: real `keelson-agent host`
//! daemons on loopback, each running the app's instances through their
//! supervisors (checkurl, hooks, holds). Hooks and app starts append
//! `instance,step,version,generation` lines to a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_agent_lifecycle::host::api::DeployRequest;
use keelson_agent_lifecycle::host::instance::kill_all;
use keelson_core::lifecycle::{
    CheckUrl, Hook, HookRun, Hooks, LIFECYCLE_API_VERSION, LifecycleDocument,
};
use keelson_core::profile::{Batches, Duration as ProfileDuration, Pause, Strategy};
use keelson_core::release::{
    FailedInstancePolicy, Fleet, InstanceState, ReleaseSettings, Status, Version,
};
use keelson_hosts::HostRecord;
use keelson_hosts::registry::add_host;
use keelson_release::hosts::{HostsRuntime, HostsRuntimes, templated};
use keelson_release::{
    NewReleaseRequest, Runtime, Worker, WorkerConfig, create_release, release_view, step_name,
};
use keelson_store::testing::TestDatabase;
use keelson_store::testing::test_database;
use keelson_store::{Backend, Store};

const HOSTD: &str = env!("CARGO_BIN_EXE_keelson-release-hostd");
const WORKER: &str = env!("CARGO_BIN_EXE_keelson-release-worker");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One daemon; kills it, its supervisors and their apps when dropped.
struct Daemon {
    dir: tempfile::TempDir,
    record: HostRecord,
    child: Child,
}

impl Daemon {
    fn start(name: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let token = dir.path().join("token");
        std::fs::write(&token, format!("token-of-{name}\n")).expect("token");
        let port = free_port();
        let child = Command::new(HOSTD)
            .arg(format!("127.0.0.1:{port}"))
            .arg(dir.path().join("state"))
            .arg(&token)
            .arg(name)
            .arg("127.0.0.1")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the daemon");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            record: HostRecord {
                name: name.into(),
                group: "shop-prod".into(),
                address: format!("http://127.0.0.1:{port}"),
                token_file: token.display().to_string(),
                health: None,
            },
            dir,
            child,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_all(&self.dir.path().join("state"), Duration::from_secs(10));
    }
}

fn template(log: &Path) -> DeployRequest {
    let log = log.display();
    let line = |step: &str| {
        format!(r#"echo "{{{{instance}}}},{step},{{{{version}}}},{{{{generation}}}}" >> "{log}""#)
    };
    // Hooks also print a line, which the release's events show.
    let hook = |step: &str| Hook {
        run: HookRun::Command(format!(
            r#"{}; echo "{step} of {{{{instance}}}} on {{{{version}}}}""#,
            line(step)
        )),
        timeout_seconds: 10,
        env: BTreeMap::new(),
    };
    DeployRequest {
        lifecycle: LifecycleDocument {
            api_version: LIFECYCLE_API_VERSION.into(),
            app: "shop".into(),
            env: "prod".into(),
            checkurl: CheckUrl {
                port: 0,
                path: "/checkurl".into(),
                expected_status: 200,
                timeout_seconds: 1,
                interval_seconds: 1,
            },
            drain_seconds: 0,
            stop_timeout_seconds: 5,
            hooks: Hooks {
                pre_start: Some(hook("preStart")),
                pre_online: Some(hook("preOnline")),
                pre_offline: Some(hook("preOffline")),
            },
            liveness: "true".into(),
            authorization: None,
        },
        version: None,
        artifact: None,
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("{}; exec \"{HOSTD}\" app {{{{port}}}}", line("start")),
        ],
        env: BTreeMap::new(),
        working_dir: None,
        hooks_dir: None,
        restart: Default::default(),
        log_segment_bytes: None,
        start: false,
        generation: None,
    }
}

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn states(runtime: &HostsRuntime) -> Vec<(String, String, InstanceState)> {
    let Fleet::Hosts { instances } = runtime.fleet().await.expect("fleet") else {
        panic!("hosts fleet expected")
    };
    instances
        .into_iter()
        .filter(|i| i.state != InstanceState::Stopped)
        .map(|i| (i.id.0, i.version.0, i.state))
        .collect()
}

async fn wait_all_online(runtime: &HostsRuntime, version: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = states(runtime).await;
        if now.len() == n
            && now
                .iter()
                .all(|(_, v, s)| v == version && *s == InstanceState::Online)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never all ONLINE on {version}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn position(lines: &[String], prefix: &str) -> usize {
    lines
        .iter()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix}… in {lines:#?}"))
}

/// Two daemons registered in a fresh database, the app's v1 ONLINE on both.
struct Fixture {
    store: Store,
    url: String,
    dir: tempfile::TempDir,
    records: Vec<HostRecord>,
    ports: BTreeMap<String, u16>,
    runtime: Arc<HostsRuntime>,
    // Dropped last: the daemons outlive the runtime's streams.
    _daemons: Vec<Daemon>,
    _db: TestDatabase,
}

impl Fixture {
    async fn start() -> Fixture {
        let f = Fixture::start_empty().await;
        f.runtime
            .deploy_all(&Version::from("v1"))
            .await
            .expect("deploy v1");
        wait_all_online(&f.runtime, "v1", 2).await;
        f
    }

    /// Two daemons registered, the app on neither.
    async fn start_empty() -> Fixture {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let db = test_database(Backend::Sqlite).await.expect("sqlite");
        let store = Store::open(&db.url).await.expect("store");
        let dir = tempfile::tempdir().expect("temp dir");
        let daemons: Vec<Daemon> = ["vm-0", "vm-1"].into_iter().map(Daemon::start).collect();
        let mut ports = BTreeMap::new();
        for d in &daemons {
            add_host(&store, &d.record)
                .await
                .expect("register the host");
            for track in ["blue", "green"] {
                ports.insert(format!("{}@{track}", d.record.name), free_port());
            }
        }
        let records: Vec<HostRecord> = daemons.iter().map(|d| d.record.clone()).collect();
        let log = dir.path().join("effects.log");
        let runtime = Arc::new(
            HostsRuntime::new(
                store.clone(),
                "shop",
                "prod",
                &records,
                templated(template(&log), ports.clone()),
            )
            .expect("runtime"),
        );
        Fixture {
            url: db.url.clone(),
            store,
            dir,
            records,
            ports,
            runtime,
            _daemons: daemons,
            _db: db,
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("effects.log")
    }

    async fn create(&self) -> String {
        self.create_of("v2").await
    }

    async fn create_of(&self, version: &str) -> String {
        create_release(
            &self.store,
            self.runtime.as_ref(),
            &NewReleaseRequest {
                id: Some("r1".into()),
                app: "shop".into(),
                env: "prod".into(),
                version: Version::from(version),
                desired: None,
                settings: ReleaseSettings {
                    strategy: Strategy::InPlace,
                    batches: Some(Batches {
                        count: Some(2),
                        size: None,
                    }),
                    pause: Pause::For(ProfileDuration::from_secs(0)),
                    failed_instances: FailedInstancePolicy::Fail,
                    progress_deadline: ProfileDuration::from_secs(60),
                },
                actor: "alice".into(),
            },
        )
        .await
        .expect("create")
        .id
    }

    async fn status(&self, id: &str) -> Option<Status> {
        release_view(&self.store, id)
            .await
            .expect("view")
            .state
            .map(|r| r.status)
    }

    /// Runs the worker binary over this fixture; its exit code.
    async fn worker_process(&self, kill_at: Option<&str>) -> i32 {
        let config = self.dir.path().join("hosts.json");
        let body = serde_json::json!({
            "app": "shop",
            "env": "prod",
            "hosts": self.records,
            "ports": self.ports,
            "template": template(&self.log()),
        });
        std::fs::write(&config, body.to_string()).expect("write the config");
        let mut command = tokio::process::Command::new(WORKER);
        command
            .arg("--database")
            .arg(&self.url)
            .arg("--owner")
            .arg("worker-1")
            .arg("--hosts-config")
            .arg(&config)
            .env_remove("KEELSON_KILL_AT");
        if let Some(at) = kill_at {
            command.env("KEELSON_KILL_AT", at);
        }
        let status = tokio::time::timeout(Duration::from_secs(120), command.status())
            .await
            .expect("the worker finishes in time")
            .expect("run the worker");
        status.code().unwrap_or(-1)
    }

    /// Every effect, preOffline included, exactly once; sorted.
    fn effects(&self, context: &str) -> Vec<String> {
        let mut lines = lines(&self.log());
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for line in &lines {
            *counts.entry(line).or_default() += 1;
        }
        assert!(
            counts.values().all(|n| *n == 1),
            "{context}: effects repeated: {lines:#?}"
        );
        lines.sort();
        lines.dedup();
        lines
    }
}

impl Fixture {
    /// Drives every release to its end with a worker in this process.
    async fn run_worker(&self) {
        let runtimes = HostsRuntimes::default();
        runtimes.insert("shop", "prod", self.runtime.clone());
        let worker = Worker::new(
            self.store.clone(),
            Arc::new(runtimes),
            WorkerConfig {
                owner: "w1".into(),
                lease: Duration::from_secs(10),
                poll: Duration::from_millis(50),
            },
        );
        tokio::time::timeout(Duration::from_secs(120), worker.run_until_idle())
            .await
            .expect("the release ends in time")
            .expect("worker");
    }
}

/// An app that runs nowhere yet is deployed by a release like any other:
/// every host of its group starts it, through its hooks, and there is no
/// earlier version to roll back to.
#[tokio::test]
async fn a_first_release_starts_the_app_on_every_host() {
    let f = Fixture::start_empty().await;
    let id = f.create_of("v1").await;
    f.run_worker().await;
    assert_eq!(f.status(&id).await, Some(Status::Succeeded));
    wait_all_online(&f.runtime, "v1", 2).await;
    let effects = f.effects("first deploy");
    for host in ["vm-0", "vm-1"] {
        let of_host: Vec<&str> = effects
            .iter()
            .filter(|l| l.starts_with(&format!("{host}@blue,")))
            .map(|l| l.split(',').nth(1).unwrap_or_default())
            .collect();
        assert_eq!(of_host.len(), 3, "{effects:#?}");
        for step in ["preStart", "start", "preOnline"] {
            assert!(of_host.contains(&step), "{host}: {effects:#?}");
        }
    }
    let refused = keelson_release::request(
        &f.store,
        &id,
        keelson_core::release::Event::Rollback,
        "alice",
    )
    .await
    .expect_err("a first deployment has nothing to roll back to");
    assert!(
        refused.to_string().contains("first deployment"),
        "{refused}"
    );
    f.runtime.remove_all().await;
}

#[tokio::test]
async fn in_place_release_on_host_daemons() {
    let f = Fixture::start().await;
    let id = f.create().await;
    f.run_worker().await;
    assert_eq!(f.status(&id).await, Some(Status::Succeeded));
    wait_all_online(&f.runtime, "v2", 2).await;

    f.effects("no crash");
    // What the hooks printed is in the release's events, tagged with the
    // instance and the hook; nothing of the v1 deploys before the release.
    let deadline = Instant::now() + Duration::from_secs(30);
    let expected: Vec<(String, String, String)> = ["vm-0", "vm-1"]
        .iter()
        .flat_map(|host| {
            let i = format!("{host}@blue");
            [
                ("preOffline", "v1"),
                ("preStart", "v2"),
                ("preOnline", "v2"),
            ]
            .map(|(hook, v)| (i.clone(), hook.to_string(), format!("{hook} of {i} on {v}")))
        })
        .collect();
    loop {
        let mut shown: Vec<(String, String, String)> = Vec::new();
        for event in f
            .store
            .release_events(&id, 0, 10_000)
            .await
            .expect("events")
        {
            if event.body["kind"] != "hook-output" {
                continue;
            }
            for line in event.body["lines"].as_array().cloned().unwrap_or_default() {
                let text = |k: &str| line[k].as_str().unwrap_or_default().to_string();
                shown.push((text("instance"), text("hook"), text("line")));
            }
        }
        shown.sort();
        let mut want = expected.clone();
        want.sort();
        if shown == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hook output in the events: {shown:#?}\nexpected: {want:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = lines(&f.log());
    for (n, host) in ["vm-0", "vm-1"].iter().enumerate() {
        let i = format!("{host}@blue");
        let order = [
            position(&lines, &format!("{i},preOffline,v1,none")),
            position(&lines, &format!("{i},preStart,v2,")),
            position(&lines, &format!("{i},start,v2,")),
            position(&lines, &format!("{i},preOnline,v2,")),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{i}: {lines:#?}");
        if n > 0 {
            let before = position(&lines, "vm-0@blue,preOnline,v2,");
            assert!(before < order[0], "batch 2 began early: {lines:#?}");
        }
    }
    f.runtime.remove_all().await;
}

#[tokio::test]
async fn host_releases_resume_after_a_crash_at_every_step() {
    // The reference: no crash.
    let f = Fixture::start().await;
    let id = f.create().await;
    assert_eq!(f.worker_process(None).await, 0);
    assert_eq!(f.status(&id).await, Some(Status::Succeeded));
    let expected = f.effects("reference");
    let steps: Vec<String> = f
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
    f.runtime.remove_all().await;
    drop(f);
    assert!(steps.len() >= 4, "{steps:?}");
    for step in &steps {
        for when in ["before", "after"] {
            let at = format!("{step}:{when}");
            let f = Fixture::start().await;
            let id = f.create().await;
            assert_eq!(
                f.worker_process(Some(&at)).await,
                137,
                "kill point {at} was not reached"
            );
            assert_ne!(f.status(&id).await, Some(Status::Succeeded), "{at}");
            assert_eq!(f.worker_process(None).await, 0, "resume after {at}");
            assert_eq!(f.status(&id).await, Some(Status::Succeeded), "after {at}");
            wait_all_online(&f.runtime, "v2", 2).await;
            assert_eq!(f.effects(&at), expected, "effects after a crash at {at}");
            // The daemons' own count: one supervisor start per generation,
            // no app restarts.
            for (n, record) in f.records.iter().enumerate() {
                let view = keelson_hosts::HostClient::for_host(record)
                    .expect("client")
                    .instance("shop-prod-blue")
                    .await
                    .expect("view");
                assert_eq!(
                    (view.generation, view.restarts, view.version.as_deref()),
                    (Some(n as u64 + 1), 0, Some("v2")),
                    "after {at}: {view:?}"
                );
            }
            f.runtime.remove_all().await;
        }
    }
}
