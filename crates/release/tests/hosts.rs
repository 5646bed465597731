//! The release engine on the hosts runtime: real `keelson-agent host`
//! daemons on loopback, each running the app's instances through their
//! supervisors (checkurl, hooks, holds). Hooks and app starts append
//! `instance,step,version,generation` lines to a file.

use std::collections::{BTreeMap, HashMap};
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
    FailedInstancePolicy, Fleet, InstanceState, ReleaseSettings, Status, Track, Version,
};
use keelson_hosts::HostRecord;
use keelson_hosts::registry::add_host;
use keelson_release::hosts::{DeployFn, HostsRuntime, HostsRuntimes};
use keelson_release::{
    NewReleaseRequest, Runtime, Worker, WorkerConfig, create_release, release_view,
};
use keelson_store::testing::test_database;
use keelson_store::{Backend, Store};

const HOSTD: &str = env!("CARGO_BIN_EXE_keelson-release-hostd");

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

fn deploy_fn(log: &Path, ports: HashMap<(String, Track), u16>) -> DeployFn {
    let log = log.display().to_string();
    Arc::new(move |target| {
        let port = ports[&(target.host.to_string(), target.track)];
        let line = |step: &str| {
            format!(
                r#"echo "$KEELSON_RELEASE_INSTANCE,{step},$KEELSON_RELEASE_VERSION,$KEELSON_RELEASE_GENERATION" >> "{log}""#
            )
        };
        let hook = |step: &str| Hook {
            run: HookRun::Command(line(step)),
            timeout_seconds: 10,
            env: BTreeMap::new(),
        };
        DeployRequest {
            lifecycle: LifecycleDocument {
                api_version: LIFECYCLE_API_VERSION.into(),
                app: target.app.into(),
                env: target.env.into(),
                checkurl: CheckUrl {
                    port,
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
                format!("{}; exec \"{HOSTD}\" app {port}", line("start")),
            ],
            env: BTreeMap::from([
                (
                    "KEELSON_RELEASE_INSTANCE".to_string(),
                    format!("{}@{}", target.host, target.track),
                ),
                (
                    "KEELSON_RELEASE_VERSION".to_string(),
                    target.version.0.clone(),
                ),
                (
                    "KEELSON_RELEASE_GENERATION".to_string(),
                    target
                        .generation
                        .map_or_else(|| "none".to_string(), |g| g.to_string()),
                ),
            ]),
            working_dir: None,
            hooks_dir: None,
            restart: Default::default(),
            log_segment_bytes: None,
            start: false,
            generation: None,
        }
    })
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

#[tokio::test]
async fn in_place_release_on_host_daemons() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let db = test_database(Backend::Sqlite).await.expect("sqlite");
    let store = Store::open(&db.url).await.expect("store");
    let dir = tempfile::tempdir().expect("temp dir");
    let log: PathBuf = dir.path().join("effects.log");
    let daemons: Vec<Daemon> = ["vm-0", "vm-1"].into_iter().map(Daemon::start).collect();
    let mut ports = HashMap::new();
    for d in &daemons {
        add_host(&store, &d.record)
            .await
            .expect("register the host");
        for track in [Track::Blue, Track::Green] {
            ports.insert((d.record.name.clone(), track), free_port());
        }
    }
    let records: Vec<HostRecord> = daemons.iter().map(|d| d.record.clone()).collect();
    let runtime = Arc::new(
        HostsRuntime::new(
            store.clone(),
            "shop",
            "prod",
            &records,
            deploy_fn(&log, ports),
        )
        .expect("runtime"),
    );
    runtime
        .deploy_all(&Version::from("v1"))
        .await
        .expect("deploy v1");
    wait_all_online(&runtime, "v1", 2).await;

    let record = create_release(
        &store,
        runtime.as_ref(),
        &NewReleaseRequest {
            id: Some("r1".into()),
            app: "shop".into(),
            env: "prod".into(),
            version: Version::from("v2"),
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
    .expect("create");
    let runtimes = HostsRuntimes::default();
    runtimes.insert("shop", "prod", runtime.clone());
    let worker = Worker::new(
        store.clone(),
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
    let view = release_view(&store, &record.id).await.expect("view");
    assert_eq!(
        view.state.as_ref().map(|r| r.status.clone()),
        Some(Status::Succeeded),
        "{:#?}",
        view.state.map(|s| s.status)
    );
    wait_all_online(&runtime, "v2", 2).await;

    let lines = lines(&log);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for line in &lines {
        *counts.entry(line).or_default() += 1;
    }
    assert!(counts.values().all(|n| *n == 1), "{lines:#?}");
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
    runtime.remove_all().await;
}
