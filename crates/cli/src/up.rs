//! `keelson up [--demo]`: keelson on one machine, no cluster.
//!
//! ```text
//!  keelson up ─► server + release worker   http://127.0.0.1:PORT   (SQLite in DATA/keelson.db)
//!            ├─► host daemons local-1..3    http://127.0.0.{2,3,4}:PORT+1   (group `local`;
//!            │     this binary runs the agent library; instances bind 127.0.0.{2,3,4})
//!            ├─► an admin token             DATA/admin.token, and the CLI config → plain `keelson …` works
//!            └─► --demo: javac the embedded Java app into DATA/demo/artifacts/{1.0.0,2.0.0},
//!                  apply its profile, start 1.0.0 on the three hosts (first run),
//!                  release the other version in 3 batches, progress shown live
//!  SIGINT/SIGTERM ─► every instance stops through its lifecycle (offline, drain,
//!                    preOffline, stop) ─► daemons, worker and server stop
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use keelson_agent_lifecycle::host::api::SupervisorState;
use keelson_agent_lifecycle::host::{self, DaemonConfig};
use keelson_agent_lifecycle::output::Output;
use keelson_core::release::{Event, Fleet, InstanceChange, Version};
use keelson_hosts::{HostClient, HostRecord};
use keelson_release::Runtime as _;
use keelson_release::Runtimes as _;
use keelson_release::profile::ProfileRuntimes;
use keelson_server::cli::{
    ClientCommand, Connection, ReleaseArgs, ReleaseCommand, ReleaseStartArgs, ReleaseTarget,
};
use keelson_store::{NewToken, Role, Store, SubjectKind};
use tokio_util::sync::CancellationToken;

/// The host group `keelson up` runs its local hosts in.
pub const LOCAL_GROUP: &str = "local";
/// How many local hosts `keelson up` runs (127.0.0.2 onwards).
const LOCAL_HOSTS: u8 = 3;
/// The demo app's versions; each run releases the one not running.
const DEMO_VERSIONS: [&str; 2] = ["1.0.0", "2.0.0"];
const DEMO_SOURCE: &str = include_str!("../demo/Demo.java");
const DEMO_PROFILE: &str = include_str!("../demo/app.yaml");
const DEMO_HOOKS: [(&str, &str); 3] = [
    ("pre-start.sh", include_str!("../demo/hooks/pre-start.sh")),
    ("pre-online.sh", include_str!("../demo/hooks/pre-online.sh")),
    (
        "pre-offline.sh",
        include_str!("../demo/hooks/pre-offline.sh"),
    ),
];

/// `keelson up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Also build the demo Java app, start it on the three local hosts and
    /// release a new version of it.
    #[arg(long)]
    pub demo: bool,
    /// Where keelson keeps its database, hosts and the demo
    /// [default: $XDG_DATA_HOME/keelson or ~/.local/share/keelson].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The server's port on 127.0.0.1; the host daemons listen on PORT+1
    /// and the demo app on PORT+2, on 127.0.0.2–127.0.0.4.
    #[arg(long, default_value_t = 7070, value_parser = clap::value_parser!(u16).range(1..65534))]
    pub port: u16,
}

/// Runs `keelson up` until SIGINT or SIGTERM.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(up(args))
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|base| base.join("keelson"))
        .ok_or_else(|| anyhow!("neither XDG_DATA_HOME nor HOME is set: give --data-dir DIR"))
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let data = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir()?,
    };
    std::fs::create_dir_all(&data)
        .with_context(|| format!("cannot create the data directory {}", data.display()))?;
    let data = data
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", data.display()))?;
    let database = format!("sqlite://{}", data.join("keelson.db").display());
    let store = Store::open(&database)
        .await
        .with_context(|| format!("cannot open the database {database}"))?;
    let listen = format!("127.0.0.1:{}", args.port);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (choose another with --port)"))?;
    let server = format!("http://{listen}");
    let token = admin_token(&store, &data).await?;
    let config = keelson_server::cli::config_path()
        .ok_or_else(|| anyhow!("no place for the CLI config: set HOME or KEELSON_CONFIG"))?;
    keelson_server::cli::write_config(&config, &server, &token)?;

    let stop_server = CancellationToken::new();
    let serving = tokio::spawn(keelson_server::serve::serve(
        store.clone(),
        listener,
        stop_server.clone().cancelled_owned(),
    ));
    let demo_dir = data.join("demo");
    let hosts = LocalHosts::start(&data, args.port + 1, &demo_dir.join("artifacts"))?;
    let restore = data.join("hosts").join("stopped.json");
    let stop_worker = CancellationToken::new();
    let mut worker = None;
    let outcome = async {
        hosts.register(&store).await?;
        // Instances first, so that a release the last run left open resumes
        // over running instances.
        hosts.restore_instances(&restore).await?;
        worker = Some(keelson_server::cli::spawn_release_worker(
            store.clone(),
            Some(server.clone()),
            &listen,
            stop_worker.clone(),
        ));
        println!("keelson is up");
        println!("  server     {server}   (database {})", data.join("keelson.db").display());
        println!(
            "  hosts      {} in group `{LOCAL_GROUP}`, daemons at {}",
            hosts.names().join(", "),
            hosts.addresses().join(" ")
        );
        println!("  CLI config {} (admin token)", config.display());
        println!("  try        keelson get apps · keelson host list · keelson release status NAME --env ENV");
        if args.demo {
            let connection = Connection {
                server: Some(server.clone()),
                token: Some(token.clone()),
            };
            tokio::select! {
                result = demo(&store, &demo_dir, args.port + 2, connection) => result?,
                _ = keelson_server::serve::shutdown_signal() => return Ok(()),
            }
        }
        println!("keelson keeps running; Ctrl-C (or SIGTERM) stops it and its instances.");
        keelson_server::serve::shutdown_signal().await;
        anyhow::Ok(())
    }
    .await;
    // Releases in flight end first: the instances they act on are about to
    // stop, which no release could go on from.
    if worker.is_some() {
        abort_open_releases(&store).await;
    }
    stop_worker.cancel();
    if let Some(worker) = worker {
        worker
            .await
            .context("the release worker failed")?
            .context("the release worker failed")?;
    }
    println!("stopping: every instance leaves traffic, drains and stops through its lifecycle…");
    hosts.stop_instances(&restore).await;
    hosts.stop();
    stop_server.cancel();
    serving.await.context("the server task failed")??;
    store.close().await;
    println!("stopped");
    outcome
}

/// Aborts every open release (new instances leave traffic) and waits, at
/// most 30 s, for them to end.
async fn abort_open_releases(store: &Store) {
    let mut open = Vec::new();
    let apps = store
        .list_apps(&keelson_store::AppFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .map(|page| page.items)
        .unwrap_or_default();
    for app in apps {
        for release in store
            .releases_of(&app.name, None, 20)
            .await
            .unwrap_or_default()
        {
            if !release.finished {
                open.push(release.id);
            }
        }
    }
    for id in &open {
        println!("stopping: aborting release {id}");
        let abort = Event::Abort { keep_online: false };
        if let Err(e) = keelson_release::request(store, id, abort, "keelson-up").await {
            eprintln!("keelson up: cannot abort release {id}: {e}");
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for id in &open {
        while tokio::time::Instant::now() < deadline
            && store.release(id).await.is_ok_and(|r| !r.finished)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The admin token of this data directory: the one it holds while it is
/// valid, else a new one.
async fn admin_token(store: &Store, data: &Path) -> anyhow::Result<String> {
    let path = data.join("admin.token");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim().to_string();
        if let Some(record) = store.authenticate(&secret).await?
            && record.token.role == Role::Admin
        {
            return Ok(secret);
        }
    }
    let issued = store
        .create_token(
            &NewToken {
                subject: "admin".into(),
                subject_kind: SubjectKind::Person,
                teams: Vec::new(),
                role: Role::Admin,
                description: Some("keelson up".into()),
            },
            "keelson-up",
        )
        .await?;
    keelson_server::cli::write_private(&path, &issued.secret)?;
    Ok(issued.secret)
}

/// The local host daemons, each on a thread of this process.
struct LocalHosts {
    records: Vec<HostRecord>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LocalHosts {
    fn start(data: &Path, port: u16, artifacts: &Path) -> anyhow::Result<LocalHosts> {
        let exe = std::env::current_exe().context("cannot find the keelson binary")?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut records = Vec::new();
        let mut threads = Vec::new();
        for n in 1..=LOCAL_HOSTS {
            let name = format!("local-{n}");
            let dir = data.join("hosts").join(&name);
            std::fs::create_dir_all(dir.join("state"))
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let token_file = dir.join("host.token");
            if !token_file.exists() {
                keelson_server::cli::write_private(&token_file, &keelson_store::random_hex(32)?)?;
            }
            let address = format!("127.0.0.{}", n + 1);
            let listen = format!("{address}:{port}");
            // Bind once here so a taken port is reported before anything runs.
            std::net::TcpListener::bind(&listen).with_context(|| {
                format!("cannot listen on {listen} for host {name} (choose another --port)")
            })?;
            let config = DaemonConfig {
                listen: listen.clone(),
                state_dir: dir.join("state"),
                token_file: token_file.clone(),
                name: name.clone(),
                instance_address: address,
                artifact_roots: vec![artifacts.to_path_buf()],
                allowed_urls: Vec::new(),
                exe: exe.clone(),
            };
            let log = std::sync::Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("daemon.log"))
                    .with_context(|| format!("cannot open {}", dir.join("daemon.log").display()))?,
            );
            let output = Output::with_sink("host", move |line| {
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                let _ = writeln!(log, "{line}");
            });
            let flag = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || {
                        if let Err(e) = host::run(config, output, flag) {
                            eprintln!("keelson up: host daemon {name} stopped: {e}");
                        }
                    })?,
            );
            records.push(HostRecord {
                name: format!("local-{n}"),
                group: LOCAL_GROUP.into(),
                address: format!("http://{listen}"),
                token_file: token_file.display().to_string(),
                health: None,
            });
        }
        Ok(LocalHosts {
            records,
            stop,
            threads,
        })
    }

    fn names(&self) -> Vec<String> {
        self.records.iter().map(|h| h.name.clone()).collect()
    }

    fn addresses(&self) -> Vec<String> {
        self.records.iter().map(|h| h.address.clone()).collect()
    }

    /// Registers the hosts in their group, once their daemons answer.
    async fn register(&self, store: &Store) -> anyhow::Result<()> {
        for record in &self.records {
            let client = HostClient::for_host(record)?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while let Err(e) = client.instances().await {
                if tokio::time::Instant::now() > deadline {
                    bail!("host daemon {} does not answer: {e}", record.name);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            keelson_hosts::registry::add_host(store, record).await?;
        }
        Ok(())
    }

    /// Stops every running instance on every host through its lifecycle,
    /// hosts in parallel, and records them in `restore` so that the next
    /// `keelson up` starts them again.
    async fn stop_instances(&self, restore: &Path) {
        let mut stopping = tokio::task::JoinSet::new();
        for record in &self.records {
            let Ok(client) = HostClient::for_host(record) else {
                continue;
            };
            let host = record.name.clone();
            stopping.spawn(async move {
                let mut stopped = Vec::new();
                let Ok(instances) = client.instances().await else {
                    return stopped;
                };
                for instance in instances.into_iter().filter(|i| is_running(i.state)) {
                    match client.stop(&instance.name).await {
                        Ok(_) => {
                            println!("  {host}: {} stopped", instance.name);
                            stopped.push(Stopped {
                                host: host.clone(),
                                instance: instance.name,
                                generation: instance.generation,
                            });
                        }
                        Err(e) => eprintln!("  {host}: cannot stop {}: {e}", instance.name),
                    }
                }
                stopped
            });
        }
        let mut stopped = Vec::new();
        while let Some(done) = stopping.join_next().await {
            stopped.extend(done.unwrap_or_default());
        }
        let text = serde_json::to_string_pretty(&stopped).unwrap_or_default();
        if let Err(e) = std::fs::write(restore, text) {
            eprintln!(
                "keelson up: cannot record the stopped instances in {}: {e}",
                restore.display()
            );
        }
    }

    /// Starts again the instances the last `keelson up` stopped when it
    /// ended (with their release generation), then forgets them.
    async fn restore_instances(&self, restore: &Path) -> anyhow::Result<()> {
        let Ok(text) = std::fs::read_to_string(restore) else {
            return Ok(());
        };
        let stopped: Vec<Stopped> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a list of stopped instances", restore.display()))?;
        for s in &stopped {
            let Some(record) = self.records.iter().find(|r| r.name == s.host) else {
                continue;
            };
            let client = HostClient::for_host(record)?;
            match client.instance(&s.instance).await {
                Ok(view) if !is_running(view.state) => {
                    client.start(&s.instance, s.generation).await?;
                    println!("  {}: {} started again", s.host, s.instance);
                }
                _ => {}
            }
        }
        std::fs::remove_file(restore)
            .with_context(|| format!("cannot remove {}", restore.display()))?;
        Ok(())
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// An instance `keelson up` stopped when it ended.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Stopped {
    host: String,
    instance: String,
    generation: Option<u64>,
}

fn is_running(state: SupervisorState) -> bool {
    !matches!(
        state,
        SupervisorState::Stopped | SupervisorState::Exited | SupervisorState::Failed
    )
}

/// Builds the demo, starts its first version where nothing runs yet, and
/// releases the other version with live progress.
async fn demo(store: &Store, dir: &Path, port: u16, connection: Connection) -> anyhow::Result<()> {
    let artifacts = dir.join("artifacts");
    build_demo(dir, &artifacts)?;
    let hook_log = dir.join("hooks.log");
    let profile = DEMO_PROFILE
        .replace("{{ARTIFACTS}}", &artifacts.display().to_string())
        .replace("{{PORT}}", &port.to_string())
        .replace("{{HOOK_LOG}}", &hook_log.display().to_string());
    let client = connection.client()?;
    client
        .apply(&profile, Some("keelson up --demo"))
        .await
        .map_err(|e| anyhow!("cannot apply the demo's profile: {e}"))?;

    if let Ok(open) = client.latest_release("demo", "local").await
        && !open.finished
    {
        println!("demo: release {} is still open; following it", open.id);
        let watch = ClientCommand::Release(Box::new(ReleaseArgs {
            command: Some(ReleaseCommand::Watch(ReleaseTarget {
                name: "demo".into(),
                env: "local".into(),
                id: Some(open.id),
                output: Default::default(),
                connection: connection.clone(),
            })),
            start: start_args(None, None, connection),
        }));
        return keelson_server::cli::execute(watch, &mut std::io::stdout()).await;
    }
    let runtimes = ProfileRuntimes::new(store.clone(), None);
    let runtime = runtimes
        .runtime("demo", "local")
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let Fleet::Hosts { instances } = runtime.fleet().await.map_err(|e| anyhow!("{e}"))? else {
        bail!("the demo does not run on hosts");
    };
    let running = instances
        .iter()
        .map(|i| i.version.0.clone())
        .find(|v| !v.is_empty());
    let current = match running {
        Some(version) => {
            let mut events = runtime.events().await.map_err(|e| anyhow!("{e}"))?;
            let count = instances.iter().filter(|i| i.version.0 == version).count();
            wait_online(&mut events, &Version(version.clone()), count).await?;
            version
        }
        None => {
            // The first deployment is a release too, in one batch.
            let first = DEMO_VERSIONS[0];
            println!(
                "demo: first deployment of {first} on the {LOCAL_HOSTS} hosts (hooks also append to {})",
                hook_log.display()
            );
            let release = ClientCommand::Release(Box::new(ReleaseArgs {
                command: None,
                start: start_args(Some(first), Some(1), connection.clone()),
            }));
            keelson_server::cli::execute(release, &mut std::io::stdout()).await?;
            first.to_string()
        }
    };
    drop(runtime);
    let next = DEMO_VERSIONS
        .iter()
        .find(|v| **v != current)
        .copied()
        .unwrap_or(DEMO_VERSIONS[1]);
    println!(
        "demo: {current} runs at {}; releasing {next} in 3 batches",
        (2..2 + LOCAL_HOSTS)
            .map(|n| format!("http://127.0.0.{n}:{port}/"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let release = ClientCommand::Release(Box::new(ReleaseArgs {
        command: None,
        start: start_args(Some(next), None, connection),
    }));
    keelson_server::cli::execute(release, &mut std::io::stdout()).await?;
    println!("demo: {next} runs at http://127.0.0.2:{port}/ (and .3, .4)");
    Ok(())
}

/// `keelson release demo --env local --version VERSION [--batches N]
/// --watch` (otherwise the profile's strategy, batches and pause).
fn start_args(
    version: Option<&str>,
    batches: Option<u32>,
    connection: Connection,
) -> ReleaseStartArgs {
    ReleaseStartArgs {
        name: Some("demo".into()),
        env: Some("local".into()),
        version: version.map(str::to_string),
        strategy: None,
        batches,
        batch_size: None,
        pause: None,
        replicas: None,
        watch: true,
        output: Default::default(),
        connection,
    }
}

/// Waits until `count` instances run `version` online.
async fn wait_online(
    events: &mut tokio::sync::mpsc::Receiver<keelson_core::release::InstanceEvent>,
    version: &Version,
    count: usize,
) -> anyhow::Result<()> {
    let mut online = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while online.len() < count {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| anyhow!("the demo's instances did not come online within 2 minutes; see `keelson host instances local-1`"))?
            .ok_or_else(|| anyhow!("the hosts' event stream ended"))?;
        if &event.version != version {
            continue;
        }
        match event.change {
            InstanceChange::Online => {
                online.insert(event.instance.0.clone());
            }
            InstanceChange::Failed { error } => {
                bail!("demo instance {} failed: {error}", event.instance.0)
            }
            _ => {}
        }
    }
    Ok(())
}

/// Compiles the embedded demo with javac and lays out one artifact per
/// version (classes, `VERSION`, hooks).
fn build_demo(dir: &Path, artifacts: &Path) -> anyhow::Result<()> {
    let src = dir.join("src");
    let classes = dir.join("classes");
    std::fs::create_dir_all(&src)?;
    std::fs::create_dir_all(&classes)?;
    std::fs::write(src.join("Demo.java"), DEMO_SOURCE)?;
    let javac = std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/javac"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("javac"));
    let status = std::process::Command::new(&javac)
        .arg("-d")
        .arg(&classes)
        .arg(src.join("Demo.java"))
        .status()
        .with_context(|| {
            format!(
                "cannot run {}: `keelson up --demo` compiles its demo with the JDK's javac (17 or later); install a JDK or set JAVA_HOME",
                javac.display()
            )
        })?;
    if !status.success() {
        bail!("javac could not compile the demo ({status})");
    }
    for version in DEMO_VERSIONS {
        let out = artifacts.join(version);
        std::fs::create_dir_all(out.join("hooks"))?;
        for entry in std::fs::read_dir(&classes)? {
            let entry = entry?;
            std::fs::copy(entry.path(), out.join(entry.file_name()))?;
        }
        std::fs::write(out.join("VERSION"), format!("{version}\n"))?;
        for (name, text) in DEMO_HOOKS {
            let path = out.join("hooks").join(name);
            std::fs::write(&path, text)?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}
