//! The control side against real host daemons on loopback: registration in
//! the store, the daemon client, host health with since-when, and the
//! lifecycle events of all hosts as one stream.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_agent_lifecycle::host::api::DeployRequest;
use keelson_agent_lifecycle::host::instance::kill_all;
use keelson_core::lifecycle::{CheckUrl, Hooks, LIFECYCLE_API_VERSION, LifecycleDocument};
use keelson_core::release::InstanceChange;
use keelson_hosts::registry::{add_host, find_host, list_hosts};
use keelson_hosts::{
    Error, HealthStatus, HostClient, HostEvents, HostMonitor, HostRecord, StartAt,
};
use keelson_store::{NewTarget, Store, TargetKind};
use tokio_util::sync::CancellationToken;

const HOSTD: &str = env!("CARGO_BIN_EXE_keelson-hostd");
const APP: &str = env!("CARGO_BIN_EXE_keelson-hosts-testapp");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One daemon; kills it, its supervisors and their apps when dropped.
struct Daemon {
    dir: tempfile::TempDir,
    name: String,
    port: u16,
    address: String,
    child: Option<Child>,
}

impl Daemon {
    fn start(name: &str, address: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), format!("token-of-{name}\n")).unwrap();
        let mut d = Daemon {
            dir,
            name: name.into(),
            port: free_port(),
            address: address.into(),
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        self.child = Some(
            Command::new(HOSTD)
                .arg(format!("127.0.0.1:{}", self.port))
                .arg(self.dir.path().join("state"))
                .arg(self.token_file())
                .arg(&self.name)
                .arg(&self.address)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    fn record(&self, group: &str) -> HostRecord {
        HostRecord {
            name: self.name.clone(),
            group: group.into(),
            address: format!("http://127.0.0.1:{}", self.port),
            token_file: self.token_file().display().to_string(),
            health: None,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        kill_all(&self.dir.path().join("state"), Duration::from_secs(10));
    }
}

fn deploy_request(port: u16) -> DeployRequest {
    DeployRequest {
        lifecycle: LifecycleDocument {
            api_version: LIFECYCLE_API_VERSION.into(),
            app: "orders".into(),
            env: "prod".into(),
            checkurl: CheckUrl {
                port,
                path: "/checkurl".into(),
                expected_status: 200,
                timeout_seconds: 1,
                interval_seconds: 1,
            },
            drain_seconds: 0,
            stop_timeout_seconds: 5,
            hooks: Hooks::default(),
            liveness: "true".into(),
            authorization: None,
        },
        artifact: None,
        version: Some("1.4.2".into()),
        command: vec![APP.into(), port.to_string()],
        env: Default::default(),
        working_dir: None,
        hooks_dir: None,
        restart: Default::default(),
        log_segment_bytes: None,
        start: true,
        generation: Some(3),
    }
}

async fn store() -> Arc<Store> {
    Arc::new(Store::open("sqlite::memory:").await.unwrap())
}

#[tokio::test]
async fn hosts_are_registered_in_their_group_target() {
    let store = store().await;
    let a = Daemon::start("vm-a", "127.0.0.2");
    add_host(&*store, &a.record("web")).await.unwrap();
    let mut b = a.record("web");
    b.name = "vm-b".into();
    add_host(&*store, &b).await.unwrap();
    // Re-adding updates in place.
    let mut moved = b.clone();
    moved.address = "http://127.0.0.1:1/".into();
    add_host(&*store, &moved).await.unwrap();

    let hosts = list_hosts(&*store).await.unwrap();
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[1].name, "vm-b");
    assert_eq!(hosts[1].address, "http://127.0.0.1:1");
    assert_eq!(hosts[1].group, "web");
    let targets = store.list_targets().await.unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].spec.kind, TargetKind::Hosts);
    assert_eq!(
        targets[0].spec.config["hosts"][0]["tokenFile"],
        a.token_file().display().to_string()
    );

    let mut dup = a.record("batch");
    let err = add_host(&*store, &dup).await.unwrap_err();
    assert!(matches!(err, Error::Invalid { field: "name", .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "name: host `vm-a` is already registered in group `web`"
    );
    dup.name = "vm-c".into();
    dup.address = "10.0.0.1:7400".into();
    let err = add_host(&*store, &dup).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "address",
                ..
            }
        ),
        "{err}"
    );
    dup.address = "http://10.0.0.1:7400".into();
    dup.group = "Bad Group".into();
    assert!(matches!(
        add_host(&*store, &dup).await,
        Err(Error::Invalid { field: "group", .. })
    ));
    store
        .put_target(
            &NewTarget {
                name: "zone-1".into(),
                kind: TargetKind::Cluster,
                environment: None,
                config: serde_json::json!({}),
                description: None,
            },
            "test",
        )
        .await
        .unwrap();
    dup.group = "zone-1".into();
    let err = add_host(&*store, &dup).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "group: target `zone-1` is a cluster, not a host group"
    );
    assert!(matches!(
        find_host(&*store, "nope").await,
        Err(Error::UnknownHost(_))
    ));
}

#[tokio::test]
async fn a_host_whose_daemon_is_down_is_reported_with_since_when() {
    let store = store().await;
    let mut a = Daemon::start("vm-a", "127.0.0.2");
    let b = Daemon::start("vm-b", "127.0.0.3");
    add_host(&*store, &a.record("web")).await.unwrap();
    add_host(&*store, &b.record("web")).await.unwrap();
    let monitor = HostMonitor::new(store.clone(), Duration::from_secs(2));

    let first = monitor.check_once().await.unwrap();
    assert!(
        first
            .iter()
            .all(|r| r.health.status == HealthStatus::Up && r.changed)
    );
    assert_eq!(
        first[0].info.as_ref().unwrap().instance_address,
        "127.0.0.2"
    );
    let up_since = first[0].health.since.clone();

    a.kill();
    let second = monitor.check_once().await.unwrap();
    let (ra, rb) = (&second[0], &second[1]);
    assert_eq!(ra.host.name, "vm-a");
    assert_eq!(ra.health.status, HealthStatus::Down);
    assert!(ra.changed);
    assert!(ra.health.since >= up_since);
    let error = ra.health.error.clone().unwrap();
    assert!(error.contains("cannot reach host `vm-a`"), "{error}");
    assert_eq!((rb.health.status, rb.changed), (HealthStatus::Up, false));
    // Recorded in the registry, with since-when.
    let stored = find_host(&*store, "vm-a").await.unwrap().health.unwrap();
    assert_eq!(stored, ra.health);

    // Still down: the same since.
    let third = monitor.check_once().await.unwrap();
    assert!(!third[0].changed);
    assert_eq!(third[0].health.since, ra.health.since);

    // A wrong token is down too, with the daemon's answer.
    std::fs::write(b.token_file(), "something-else").unwrap();
    let fourth = monitor.check_once().await.unwrap();
    assert_eq!(fourth[1].health.status, HealthStatus::Down);
    assert!(
        fourth[1]
            .health
            .error
            .as_ref()
            .unwrap()
            .contains("invalid_token"),
        "{:?}",
        fourth[1].health
    );

    a.spawn();
    let fifth = monitor.check_once().await.unwrap();
    assert_eq!(
        (fifth[0].health.status, fifth[0].changed),
        (HealthStatus::Up, true)
    );
    assert!(fifth[0].health.error.is_none());
}

#[tokio::test]
async fn the_client_drives_instances_and_events_of_all_hosts_arrive_as_one_stream() {
    let store = store().await;
    let mut a = Daemon::start("vm-a", "127.0.0.2");
    let b = Daemon::start("vm-b", "127.0.0.3");
    add_host(&*store, &a.record("web")).await.unwrap();
    add_host(&*store, &b.record("web")).await.unwrap();
    let cancel = CancellationToken::new();
    let mut events = HostEvents::spawn(store.clone(), StartAt::Beginning, 64, cancel.clone());

    // The same port on both "VMs".
    let port = free_port();
    for d in [&a, &b] {
        let client = HostClient::for_host(&d.record("web")).unwrap();
        let view = client
            .deploy("orders-1", &deploy_request(port))
            .await
            .unwrap();
        assert_eq!(view.address, d.address);
    }
    let mut online = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // Every event once: per instance, offsets only grow (also across a
    // reconnect to a restarted daemon).
    let mut last: std::collections::HashMap<(String, String), u64> = Default::default();
    let mut next = async || {
        let e = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("events")
            .unwrap();
        let key = (e.host.clone(), e.instance.clone());
        let before = last.insert(key, e.offset).unwrap_or(0);
        assert!(e.offset > before, "{e:?} replayed (after {before})");
        e
    };
    while online.len() < 2 {
        let e = next().await;
        assert_eq!(e.group, "web");
        assert_eq!(e.instance, "orders-1");
        if e.name() != "supervisor_started" && e.name() != "host_started" {
            assert_eq!(e.generation, Some(3), "{e:?}");
        }
        if e.name() == "online" {
            assert_eq!(e.change(), Some(InstanceChange::Online));
            online.insert(e.host.clone());
        }
    }
    assert_eq!(online.into_iter().collect::<Vec<_>>(), ["vm-a", "vm-b"]);

    // The daemon restarts under the stream: it resumes where it was.
    a.kill();
    a.spawn();
    let client = HostClient::for_host(&a.record("web")).unwrap();
    let view = client.instance("orders-1").await.unwrap();
    assert!(view.online);
    assert_eq!(view.version.as_deref(), Some("1.4.2"));
    // A hold takes it out of traffic; the stream says so.
    let held = client.hold("orders-1").await.unwrap();
    assert!(held.held && !held.online);
    loop {
        let e = next().await;
        if e.host == "vm-a" && e.change() == Some(InstanceChange::Offline) {
            break;
        }
    }
    let stopped = client.stop("orders-1").await.unwrap();
    assert!(!stopped.online);
    let mut seen = Vec::new();
    loop {
        let e = next().await;
        if e.host == "vm-a" {
            seen.push(e.name().to_string());
            if e.name() == "supervisor_exited" {
                assert_eq!(e.change(), Some(InstanceChange::Gone));
                break;
            }
        }
    }
    let pos = |n: &str| seen.iter().position(|s| s == n).unwrap_or(usize::MAX);
    assert!(pos("offline") < pos("app_stopped"), "{seen:?}");
    assert!(pos("app_stopped") < pos("supervisor_exited"), "{seen:?}");

    // Logs: the whole log, and precise errors.
    let mut log = client.logs("orders-1", 0, false, false).await.unwrap();
    let mut lines = Vec::new();
    while let Some(l) = log.next().await.unwrap() {
        lines.push(l.line);
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[stdout] testapp listening on 127.0.0.2:")),
        "{lines:?}"
    );
    match client.instance("ghost").await {
        Err(Error::Api {
            status: 404, code, ..
        }) => assert_eq!(code, "instance_not_found"),
        other => panic!("{other:?}"),
    }
    match client.logs("orders-1", u64::MAX / 2, false, false).await {
        Err(Error::Api {
            status: 400, field, ..
        }) => assert_eq!(field.as_deref(), Some("offset")),
        other => panic!("{other:?}"),
    }
    let wrong = HostClient::new("vm-a", &a.record("web").address, "wrong").unwrap();
    match wrong.instances().await {
        Err(Error::Api {
            status: 401, code, ..
        }) => assert_eq!(code, "invalid_token"),
        other => panic!("{other:?}"),
    }
    cancel.cancel();
}
