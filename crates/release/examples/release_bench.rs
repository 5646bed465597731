//! A release on real host daemons, timed, as one JSON line.
//!
//! N hosts = N `keelson-release-hostd` daemons (separate processes), host
//! `vm-NNN` on its own loopback address `127.0.1.NNN`, every daemon and
//! every app instance on the same port there. The app (`keelson-release-hostd
//! app PORT`) answers its checkurl as soon as it listens; preStart,
//! preOnline and preOffline are `true`. v1 is deployed on every host
//! (outside the timing), then a release to v2 is submitted to a store on
//! SQLite in a temp dir and driven by a `Worker` with its default settings
//! (it looks for releases to claim every 200 ms, as a server's worker
//! would; the release is submitted half an interval after its first look,
//! the average wait): in-place, in B batches, with an automatic pause
//! between batches.
//!
//! Figures (all from timestamps that the store and the daemons wrote, on
//! this machine's clock, in ms):
//! - `wall_ms`: from just before `submit_release` to the commit that marked
//!   the release `succeeded` (its release event's `at`);
//! - `pauses_ms`: the configured pause times the pauses taken (the statuses
//!   `pausing` the release went through);
//! - `instance_ms`: the instances' own time on the critical path: per batch,
//!   the longest time of a new instance from its supervisor's
//!   `supervisor_started` event to its sidecar's `online` event (preStart,
//!   exec, checkurl, preOnline), summed over batches;
//! - `overhead_ms` = wall − pauses − instance time (everything else:
//!   claiming, planning, commits, HTTP calls to the daemons, taking the old
//!   instances offline and stopping them, event delivery, pause lateness);
//! - `online_to_action_*`: per new instance, from the daemon's `online`
//!   event (`ts` in the instance's log) to the `at` of the first release
//!   event committed with that observation as its input (the journal
//!   transaction in which the engine records the instance ONLINE and, for
//!   the batch's last instance, ends the batch and starts the pause). That
//!   is the engine's first durable reaction, so it includes the daemon's
//!   log tail, the event stream, the runtime's forwarding, the machine's
//!   step and the SQLite commit. `online_to_engine_*` is the part up to the
//!   engine reading the event (the input's `now`).
//!
//! `breakdown_ms` splits the wall time along the critical path (it adds up
//! to `wall_ms`): `claim_plan_start` (submit → the first batch's first
//! step issued), then per batch, summed: `take_offline` (batch start →
//! TakeOffline journaled done), `offline_done_to_replace`, following the
//! batch's last instance to come ONLINE: `replace_to_stop_requested`,
//! `old_instance_stop` (its supervisor's `stop_requested` → `supervisor_exited`),
//! `exited_to_new_started` (the deploy call and supervisor spawn),
//! `start_to_online`, `online_to_commit`, and `after_batch` (that commit →
//! the next batch's first step, the configured pause included; the last
//! batch: → succeeded). `instance_stop_ms` is, per batch, the longest stop
//! of an old instance, summed (the instances' own stop time, counted in
//! the overhead).
//!
//! `cargo run --release -p keelson-release --example release_bench -- [--smoke]`
//! (full: 100 instances in 10 batches; smoke: 10 in 5; `--instances N`,
//! `--batches N`, `--pause-ms N` for other sizes; `--keep` keeps the temp
//! dir with the database and every daemon's and instance's log;
//! `--what-if-concurrent-holds` measures a proposed runtime change, see
//! [`ConcurrentHolds`]). It needs the
//! `keelson-release-hostd` binary of the same profile, next to the
//! example's directory (`cargo build --release -p keelson-release --bins`),
//! or named by `KEELSON_RELEASE_HOSTD`. Every daemon, supervisor and app
//! is killed at the end, also when the run fails (or panics, or is
//! interrupted with Ctrl-C or SIGTERM).

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use keelson_agent_lifecycle::host::api::{DeployRequest, EventsRequest};
use keelson_agent_lifecycle::host::instance::kill_all;
use keelson_core::lifecycle::{
    CheckUrl, Hook, HookRun, Hooks, LIFECYCLE_API_VERSION, LifecycleDocument,
};
use keelson_core::profile::{Batches, Duration as ProfileDuration, Pause, Strategy};
use keelson_core::release::{
    Action, Command, Event, FailedInstancePolicy, Fleet, HostInstance, Input, InstanceChange,
    InstanceEvent, InstanceState, Instances, Phase, ReleaseSettings, Status, Version,
};
use keelson_hosts::registry::add_host;
use keelson_hosts::{HostClient, HostRecord};
use keelson_release::hosts::{HostsRuntime, HostsRuntimes, templated};
use keelson_release::{
    NewReleaseRequest, Runtime, RuntimeError, Runtimes, Worker, WorkerConfig, submit_release,
};
use keelson_store::{JournalStatus, Store};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const APP: &str = "shop";
const ENV: &str = "prod";
/// The daemon's name for the app's blue instance.
const INSTANCE: &str = "shop-prod-blue";
const RELEASE_ID: &str = "bench";
const GOAL_OVERHEAD_MS: i64 = 1000;
const GOAL_P99_MS: i64 = 100;

struct Args {
    smoke: bool,
    keep: bool,
    concurrent_holds: bool,
    instances: u32,
    batches: u32,
    pause_ms: u64,
}

fn args() -> anyhow::Result<Args> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let smoke = all.iter().any(|a| a == "--smoke");
    let mut args = Args {
        smoke,
        keep: false,
        concurrent_holds: false,
        instances: if smoke { 10 } else { 100 },
        batches: if smoke { 5 } else { 10 },
        pause_ms: 200,
    };
    let mut it = all.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse::<u64>()
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--smoke" => {}
            "--keep" => args.keep = true,
            "--what-if-concurrent-holds" => args.concurrent_holds = true,
            "--instances" => args.instances = u32::try_from(value(a)?)?,
            "--batches" => args.batches = u32::try_from(value(a)?)?,
            "--pause-ms" => args.pause_ms = value(a)?,
            other => bail!(
                "unknown argument {other:?}; use --smoke, --keep, --what-if-concurrent-holds, --instances N, --batches N, --pause-ms N"
            ),
        }
    }
    ensure!(
        (1..=250).contains(&args.instances),
        "--instances must be 1..=250 (one loopback address 127.0.1.N each)"
    );
    ensure!(
        (1..=args.instances).contains(&args.batches),
        "--batches must be 1..=instances"
    );
    Ok(args)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (what the agent writes) to ms since the epoch.
fn parse_ts(text: &str) -> Option<i64> {
    text.parse::<keelson_store::Timestamp>().ok().map(|t| t.0)
}

fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// The `keelson-release-hostd` binary of the profile this example was built in.
fn hostd() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("KEELSON_RELEASE_HOSTD") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    // target/<profile>/examples/release_bench → target/<profile>/keelson-release-hostd
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("this executable is not in a target directory")?;
    let path = dir.join("keelson-release-hostd");
    ensure!(
        path.is_file(),
        "{} is missing: build it first with `cargo build {}-p keelson-release --bins` \
         (or name it with KEELSON_RELEASE_HOSTD)",
        path.display(),
        if dir.ends_with("release") {
            "--release "
        } else {
            ""
        }
    );
    Ok(path)
}

/// A port free on every one of `addresses` (checked by binding it there).
fn common_free_port(addresses: &[String], taken: &[u16]) -> anyhow::Result<u16> {
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if taken.contains(&port) {
            continue;
        }
        let free = addresses
            .iter()
            .all(|a| TcpListener::bind((a.as_str(), port)).is_ok());
        if free {
            return Ok(port);
        }
    }
    bail!(
        "no port is free on all of 127.0.1.1..127.0.1.{}",
        addresses.len()
    )
}

/// Everything started that must not outlive the benchmark: the daemons
/// (children) and their state directories (supervisors and apps, found and
/// killed by `kill_all`). Shared with the panic hook, since release builds
/// abort on panic without running destructors.
static STARTED: Mutex<Vec<(Child, PathBuf)>> = Mutex::new(Vec::new());

fn kill_everything() {
    let started: Vec<(Child, PathBuf)> = match STARTED.try_lock() {
        Ok(mut s) => s.drain(..).collect(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().drain(..).collect(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    let mut dirs = Vec::new();
    for (mut child, dir) in started {
        let _ = child.kill();
        let _ = child.wait();
        dirs.push(dir);
    }
    // Each scan reads /proc; in a few threads so that 100 hosts go quickly.
    std::thread::scope(|s| {
        for chunk in dirs.chunks(dirs.len().div_ceil(4).max(1)) {
            s.spawn(move || {
                for dir in chunk {
                    kill_all(dir, Duration::from_secs(10));
                }
            });
        }
    });
}

/// Kills everything when dropped (the normal way out, and errors).
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        kill_everything();
    }
}

/// Starts one daemon per host; their records, for the registry.
fn start_daemons(
    hostd: &Path,
    root: &Path,
    addresses: &[String],
    port: u16,
) -> anyhow::Result<Vec<HostRecord>> {
    let mut records = Vec::new();
    for (n, address) in addresses.iter().enumerate() {
        let name = format!("vm-{:03}", n + 1);
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir)?;
        let token = dir.join("token");
        std::fs::write(&token, format!("token-of-{name}\n"))?;
        let state = dir.join("state");
        let child = Process::new(hostd)
            .arg(format!("{address}:{port}"))
            .arg(&state)
            .arg(&token)
            .arg(&name)
            .arg(address)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("daemon.log"))?)
            .stderr(std::fs::File::create(dir.join("daemon.stderr"))?)
            .spawn()
            .with_context(|| format!("cannot start {}", hostd.display()))?;
        STARTED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((child, state));
        records.push(HostRecord {
            name,
            group: format!("{APP}-{ENV}"),
            address: format!("http://{address}:{port}"),
            token_file: token.display().to_string(),
            health: None,
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for address in addresses {
        while std::net::TcpStream::connect((address.as_str(), port)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "the daemon on {address}:{port} did not start; see its daemon.stderr"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(records)
}

/// The app: no shell in between, hooks that do nothing.
fn template(hostd: &Path, port: u16) -> DeployRequest {
    let hook = || Hook {
        run: HookRun::Command("true".into()),
        timeout_seconds: 10,
        env: BTreeMap::new(),
    };
    DeployRequest {
        lifecycle: LifecycleDocument {
            api_version: LIFECYCLE_API_VERSION.into(),
            app: APP.into(),
            env: ENV.into(),
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
                pre_start: Some(hook()),
                pre_online: Some(hook()),
                pre_offline: Some(hook()),
            },
            liveness: "true".into(),
            authorization: None,
        },
        version: None,
        artifact: None,
        command: vec![hostd.display().to_string(), "app".into(), port.to_string()],
        env: BTreeMap::new(),
        working_dir: None,
        hooks_dir: None,
        restart: Default::default(),
        log_segment_bytes: None,
        start: false,
        generation: None,
    }
}

async fn wait_all_online(
    runtime: &HostsRuntime,
    version: &str,
    n: usize,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let Fleet::Hosts { instances } = runtime.fleet().await? else {
            bail!("a hosts fleet was expected");
        };
        let online = instances
            .iter()
            .filter(|i| i.version.0 == version && i.state == InstanceState::Online)
            .count();
        if online == n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {online} of {n} instances ONLINE on {version} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--what-if-concurrent-holds`: the hosts runtime, except that a
/// TakeOffline of listed instances sends its holds to all their hosts at
/// once instead of one host after the other. Measures a proposed change to
/// `HostsRuntime::apply`; everything else is the hosts runtime's own.
/// (It passes no hook output on, so the engine has none to wait for.)
struct ConcurrentHolds {
    hosts: Arc<HostsRuntime>,
    clients: BTreeMap<String, HostClient>,
}

impl Runtime for ConcurrentHolds {
    async fn fleet(&self) -> Result<Fleet, RuntimeError> {
        self.hosts.fleet().await
    }

    async fn apply(&self, action: &Action) -> Result<(), RuntimeError> {
        let Command::TakeOffline {
            instances: Instances::Listed(ids),
        } = &action.command
        else {
            return self.hosts.apply(action).await;
        };
        let mut holds = tokio::task::JoinSet::new();
        for id in ids {
            let (host, track) = HostInstance::slot_and_track(id);
            let client = self.clients.get(host).cloned().ok_or_else(|| {
                RuntimeError(format!("host {host:?} is not one of this app's hosts"))
            })?;
            let name = self.hosts.instance_name(track);
            holds.spawn(async move {
                match client.hold(&name).await {
                    Ok(_) | Err(keelson_hosts::Error::Api { status: 404, .. }) => Ok(()),
                    Err(e) => Err(RuntimeError(e.to_string())),
                }
            });
        }
        while let Some(hold) = holds.join_next().await {
            hold.map_err(|e| RuntimeError(e.to_string()))??;
        }
        Ok(())
    }

    async fn events(&self) -> Result<mpsc::Receiver<InstanceEvent>, RuntimeError> {
        self.hosts.events().await
    }
}

/// The one runtime of the benchmark's app.
struct OneRuntime<R>(Arc<R>);

impl<R: Runtime> Runtimes for OneRuntime<R> {
    type Runtime = R;

    async fn runtime(&self, _app: &str, _env: &str) -> Result<Arc<R>, RuntimeError> {
        Ok(self.0.clone())
    }
}

/// One supervisor's run (one generation) of the app on one host, from the
/// instance's log.
#[derive(Debug, Default, Clone)]
struct Run {
    generation: Option<u64>,
    started: Option<i64>,
    online: Option<i64>,
    stop_requested: Option<i64>,
    exited: Option<i64>,
}

/// Every run of the app's instance on `host`, oldest first.
async fn runs_on(host: HostRecord) -> anyhow::Result<(String, Vec<Run>)> {
    let client = HostClient::for_host(&host)?;
    let mut stream = client
        .events(&EventsRequest {
            from: BTreeMap::new(),
            start: Default::default(),
            follow: false,
        })
        .await?;
    let mut runs: Vec<Run> = Vec::new();
    while let Some(line) = stream.next().await? {
        if line.instance != INSTANCE {
            continue;
        }
        let event = &line.event;
        let Some(ts) = event["ts"].as_str().and_then(parse_ts) else {
            continue;
        };
        let name = event["event"].as_str().unwrap_or_default();
        if name == "supervisor_started" {
            runs.push(Run {
                generation: event["generation"].as_u64(),
                started: Some(ts),
                ..Run::default()
            });
            continue;
        }
        let Some(run) = runs.last_mut() else { continue };
        match name {
            "online" => {
                run.online.get_or_insert(ts);
            }
            "stop_requested" => {
                run.stop_requested.get_or_insert(ts);
            }
            "supervisor_exited" => {
                run.exited.get_or_insert(ts);
            }
            _ => {}
        }
    }
    Ok((host.name, runs))
}

/// What the engine did with one ONLINE observation: when it read it, and
/// when it committed the step that recorded it.
struct Reaction {
    read: i64,
    committed: i64,
}

/// One new instance of a batch.
struct Member {
    host: String,
    planned: i64,
    old: Run,
    new: Run,
}

#[derive(Default)]
struct BatchSteps {
    first_planned: Option<i64>,
    offline_done: Option<i64>,
    replaces: Vec<(String, u64, i64)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_everything();
        default_hook(info);
    }));
    let args = args()?;
    // Removed only after everything that runs in it is killed.
    let dir = tempfile::tempdir()?;
    let cleanup = Cleanup;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = run(&args, dir.path()) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated")),
    };
    drop(cleanup);
    if args.keep {
        eprintln!("kept {}", dir.keep().display());
    }
    let figures = result?;
    println!("{figures}");
    Ok(())
}

async fn run(args: &Args, dir: &Path) -> anyhow::Result<serde_json::Value> {
    let hostd = hostd()?;
    let addresses: Vec<String> = (1..=args.instances)
        .map(|n| format!("127.0.1.{n}"))
        .collect();
    let daemon_port = common_free_port(&addresses, &[])?;
    let app_port = common_free_port(&addresses, &[daemon_port])?;

    let set_up = Instant::now();
    let store = Store::open(&format!("sqlite://{}", dir.join("keelson.db").display())).await?;
    let records = start_daemons(&hostd, &dir.join("hosts"), &addresses, daemon_port)?;
    for record in &records {
        add_host(&store, record).await?;
    }
    let runtime = Arc::new(HostsRuntime::new(
        store.clone(),
        APP,
        ENV,
        &records,
        templated(template(&hostd, app_port), BTreeMap::new()),
    )?);
    runtime.deploy_all(&Version::from("v1")).await?;
    wait_all_online(
        &runtime,
        "v1",
        records.len(),
        Duration::from_secs(60 + u64::from(args.instances)),
    )
    .await?;
    let set_up_ms = set_up.elapsed().as_millis();

    let config = WorkerConfig {
        owner: "bench-worker".into(),
        ..WorkerConfig::default()
    };
    let poll = config.poll;
    let cancel = CancellationToken::new();
    let worker_task = if args.concurrent_holds {
        let clients = records
            .iter()
            .map(|r| Ok((r.name.clone(), HostClient::for_host(r)?)))
            .collect::<anyhow::Result<_>>()?;
        let runtime = ConcurrentHolds {
            hosts: runtime.clone(),
            clients,
        };
        let worker = Worker::new(
            store.clone(),
            Arc::new(OneRuntime(Arc::new(runtime))),
            config,
        );
        let cancel = cancel.clone();
        tokio::spawn(async move { worker.run(cancel).await })
    } else {
        let runtimes = HostsRuntimes::default();
        runtimes.insert(APP, ENV, runtime.clone());
        let worker = Worker::new(store.clone(), Arc::new(runtimes), config);
        let cancel = cancel.clone();
        tokio::spawn(async move { worker.run(cancel).await })
    };
    // A server's worker is somewhere in its poll interval when a release
    // comes in: submit half an interval after its first look.
    tokio::time::sleep(poll / 2).await;

    let submitted = now_ms();
    submit_release(
        &store,
        &NewReleaseRequest {
            id: Some(RELEASE_ID.into()),
            app: APP.into(),
            env: ENV.into(),
            version: Version::from("v2"),
            desired: None,
            settings: ReleaseSettings {
                strategy: Strategy::InPlace,
                batches: Some(Batches {
                    count: Some(args.batches),
                    size: None,
                }),
                pause: Pause::For(
                    ProfileDuration::parse(&format!("{}ms", args.pause_ms))
                        .map_err(anyhow::Error::msg)?,
                ),
                failed_instances: FailedInstancePolicy::Fail,
                progress_deadline: ProfileDuration::from_secs(300),
            },
            actor: "bench".into(),
        },
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(120 + 6 * u64::from(args.instances));
    let record = loop {
        let record = store.release(RELEASE_ID).await?;
        if record.finished {
            break record;
        }
        if worker_task.is_finished() {
            bail!("the worker stopped: {:?}", worker_task.await);
        }
        ensure!(
            Instant::now() < deadline,
            "the release did not finish in time; it is {}",
            record.status
        );
        // The figures come from the store's timestamps, not from this loop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    cancel.cancel();
    worker_task.await??;
    ensure!(
        record.status == "succeeded",
        "the release ended {}: {}",
        record.status,
        record.state
    );
    wait_all_online(&runtime, "v2", records.len(), Duration::from_secs(30)).await?;

    // What the store recorded.
    let events = store.release_events(RELEASE_ID, 0, 1_000_000).await?;
    let journal = store.release_journal(RELEASE_ID).await?;
    let succeeded_at = events
        .iter()
        .find(|e| e.body["status"]["status"] == "succeeded")
        .map(|e| e.at.0)
        .context("no event marked the release succeeded")?;
    let mut reactions: HashMap<(String, u64), Reaction> = HashMap::new();
    let mut pauses: Vec<u32> = Vec::new();
    for event in &events {
        if let Ok(Status::Pausing { next, .. }) =
            serde_json::from_value::<Status>(event.body["status"].clone())
            && !pauses.contains(&next)
        {
            pauses.push(next);
        }
        let Ok(input) = serde_json::from_value::<Input>(event.body["input"].clone()) else {
            continue;
        };
        if let Event::Instance(seen) = &input.event
            && seen.change == InstanceChange::Online
            && let Some(generation) = seen.generation
        {
            let host = seen.instance.0.split('@').next().unwrap_or_default();
            reactions
                .entry((host.to_string(), generation))
                .or_insert(Reaction {
                    read: input.now.0 as i64,
                    committed: event.at.0,
                });
        }
    }
    let mut batches: BTreeMap<u32, BatchSteps> = BTreeMap::new();
    for entry in &journal {
        let action: Action = serde_json::from_value(entry.action.clone())?;
        if action.id.phase != Phase::Forward {
            continue;
        }
        let steps = batches.entry(action.id.batch).or_default();
        let planned = entry.planned_at.0;
        steps.first_planned = Some(steps.first_planned.map_or(planned, |p| p.min(planned)));
        match action.command {
            Command::TakeOffline { .. } => {
                ensure!(entry.status == JournalStatus::Done, "{entry:?}");
                steps.offline_done = entry.done_at.map(|t| t.0);
            }
            Command::StopAndReplace {
                instance,
                generation,
                ..
            } => {
                let host = instance.0.split('@').next().unwrap_or_default().to_string();
                steps.replaces.push((host, generation, planned));
            }
            _ => {}
        }
    }

    // What the daemons recorded.
    let mut reads = tokio::task::JoinSet::new();
    for record in &records {
        reads.spawn(runs_on(record.clone()));
    }
    let mut runs: HashMap<String, Vec<Run>> = HashMap::new();
    while let Some(read) = reads.join_next().await {
        let (host, host_runs) = read??;
        runs.insert(host, host_runs);
    }

    // Per batch, along the critical path.
    let mut breakdown: BTreeMap<&str, i64> = BTreeMap::new();
    let mut add = |key: &'static str, ms: i64| *breakdown.entry(key).or_default() += ms;
    let mut instance_ms = 0;
    let mut instance_stop_ms = 0;
    let mut online_to_action = Vec::new();
    let mut online_to_engine = Vec::new();
    let mut unmatched = 0;
    let starts: Vec<i64> = batches.values().filter_map(|b| b.first_planned).collect();
    ensure!(
        starts.len() == args.batches as usize,
        "{} batches were planned, {} asked for",
        starts.len(),
        args.batches
    );
    add("claim_plan_start", starts[0] - submitted);
    for (n, steps) in batches.values().enumerate() {
        let mut members = Vec::new();
        for (host, generation, planned) in &steps.replaces {
            let host_runs = runs.get(host).map(Vec::as_slice).unwrap_or_default();
            let at = host_runs
                .iter()
                .position(|r| r.generation == Some(*generation))
                .with_context(|| format!("{host}: no run of generation {generation}"))?;
            ensure!(at > 0, "{host}: no run before generation {generation}");
            members.push(Member {
                host: host.clone(),
                planned: *planned,
                old: host_runs[at - 1].clone(),
                new: host_runs[at].clone(),
            });
        }
        ensure!(!members.is_empty(), "batch {n} replaced nothing");
        let mut longest = 0;
        let mut longest_stop = 0;
        let mut last: Option<(&Member, i64)> = None;
        for m in &members {
            let (Some(started), Some(online)) = (m.new.started, m.new.online) else {
                bail!(
                    "{}: the new instance never went ONLINE: {:?}",
                    m.host,
                    m.new
                );
            };
            longest = longest.max(online - started);
            if let (Some(a), Some(b)) = (m.old.stop_requested, m.old.exited) {
                longest_stop = longest_stop.max(b - a);
            }
            match m
                .new
                .generation
                .and_then(|g| reactions.get(&(m.host.clone(), g)))
            {
                Some(r) => {
                    online_to_action.push(r.committed - online);
                    online_to_engine.push(r.read - online);
                }
                None => unmatched += 1,
            }
            if last.is_none_or(|(_, t)| online > t) {
                last = Some((m, online));
            }
        }
        instance_ms += longest;
        instance_stop_ms += longest_stop;
        let (last, online) = last.context("an empty batch")?;
        let batch_start = starts[n];
        let offline_done = steps.offline_done.unwrap_or(batch_start);
        let replace_planned = steps
            .replaces
            .iter()
            .map(|r| r.2)
            .min()
            .unwrap_or(offline_done);
        let stop_requested = last.old.stop_requested.unwrap_or(replace_planned);
        let exited = last.old.exited.unwrap_or(stop_requested);
        let started = last.new.started.unwrap_or(exited);
        let committed = last
            .new
            .generation
            .and_then(|g| reactions.get(&(last.host.clone(), g)))
            .map_or(online, |r| r.committed);
        let next = starts.get(n + 1).copied().unwrap_or(succeeded_at);
        add("take_offline", offline_done - batch_start);
        add("offline_done_to_replace", replace_planned - offline_done);
        add("replace_to_stop_requested", stop_requested - last.planned);
        add("old_instance_stop", exited - stop_requested);
        add("exited_to_new_started", started - exited);
        add("start_to_online", online - started);
        add("online_to_commit", committed - online);
        add("after_batch", next - committed);
        // replace_planned ≤ last.planned: the gap between the two is part
        // of the batch too.
        add("offline_done_to_replace", last.planned - replace_planned);
    }
    online_to_action.sort_unstable();
    online_to_engine.sort_unstable();
    let wall_ms = succeeded_at - submitted;
    let pauses_ms = pauses.len() as i64 * args.pause_ms as i64;
    let overhead_ms = wall_ms - pauses_ms - instance_ms;
    let p = |v: &[i64], q: f64| percentile(v, q).map_or(json!(null), |x| json!(x));
    Ok(json!({
        "bench": "release_hosts",
        "smoke": args.smoke,
        "what_if": args.concurrent_holds.then_some("concurrent-holds"),
        "instances": args.instances,
        "batches": args.batches,
        "pause_ms": args.pause_ms,
        "set_up_ms": set_up_ms,
        "wall_ms": wall_ms,
        "pauses_ms": pauses_ms,
        "instance_ms": instance_ms,
        "overhead_ms": overhead_ms,
        "instance_stop_ms": instance_stop_ms,
        "online_events": online_to_action.len(),
        "online_unmatched": unmatched,
        "online_to_action_p50_ms": p(&online_to_action, 0.5),
        "online_to_action_p99_ms": p(&online_to_action, 0.99),
        "online_to_action_max_ms": p(&online_to_action, 1.0),
        "online_to_engine_p50_ms": p(&online_to_engine, 0.5),
        "online_to_engine_p99_ms": p(&online_to_engine, 0.99),
        "commits": events.len(),
        "breakdown_ms": breakdown,
        "goal_overhead_ms": GOAL_OVERHEAD_MS,
        "goal_p99_ms": GOAL_P99_MS,
        "goal_overhead_met": overhead_ms <= GOAL_OVERHEAD_MS,
        "goal_p99_met": percentile(&online_to_action, 0.99).is_some_and(|x| x <= GOAL_P99_MS),
    }))
}
