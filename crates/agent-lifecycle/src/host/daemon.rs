//! The host daemon: the authenticated HTTP API over the instances of one
//! host. It keeps no state of its own in memory: everything is in the
//! instance directories, written by the daemon (spec, desired state) and by
//! each instance's supervisor (record, log). So a restarted daemon has
//! re-attached as soon as it can read files, and a reconcile loop restarts
//! supervisors that died while their instance should run.
//!
//! ```text
//! PUT  …/{name}        validate ─► (stopped?) ─► artifact into the working dir ─► lifecycle.json + spec.json
//! POST …/{name}/start  desired=running ─► record {supervisor, starting} ─► spawn `exe __keelson-host supervise DIR`
//! POST …/{name}/stop   desired=stopped ─► SIGTERM supervisor ─► wait until it has exited (offline, stop, revoke)
//! GET  …/{name}/logs   read the log segments from an offset; follow = keep reading as they grow
//! ```

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keelson_core::lifecycle::LifecycleDocument;
use serde_json::json;

use super::api::{
    DeployRequest, Desired, ErrorBody, ErrorDetail, EventsRequest, HostInfo, InstanceView,
    StartRequest, StreamStart, SupervisorState, valid_instance_name,
};
use super::instance::{HostSpec, InstanceDir, SupervisorRecord};
use super::server::{ChunkWriter, REQUEST_DEADLINE, Reply, Request, serve_admitting};
use super::{INTERNAL_SUBCOMMAND, artifact, log};
use crate::layout::{remove_if_present, write_json_atomic};
use crate::output::{Output, rfc3339_now};
use crate::process::{AppProcess, parse_stat};
use crate::watch::Watch;

/// How the daemon is run.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where the API listens (`127.0.0.1:7400`).
    pub listen: String,
    /// Where instances live.
    pub state_dir: PathBuf,
    /// The host token: the API's bearer token and the grant API's.
    pub token_file: PathBuf,
    /// The host's name.
    pub name: String,
    /// The address instances bind on (`127.0.0.2` to stand in for a second VM).
    pub instance_address: String,
    /// Local directories artifacts may come from.
    pub artifact_roots: Vec<PathBuf>,
    /// URL prefixes artifacts may be downloaded from.
    pub allowed_urls: Vec<String>,
    /// The binary run as supervisor (this one).
    pub exe: PathBuf,
}

/// An API error: status, stable code, message, field.
#[derive(Debug, Clone)]
struct ApiError {
    status: u16,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    fn field(mut self, field: &str) -> Self {
        self.field = Some(field.to_string());
        self
    }

    fn reply(&self) -> Reply {
        Reply::json(
            self.status,
            &ErrorBody {
                error: ErrorDetail {
                    code: self.code.to_string(),
                    message: self.message.clone(),
                    field: self.field.clone(),
                },
            },
        )
    }
}

type ApiResult<T = Reply> = Result<T, ApiError>;

fn internal(what: impl std::fmt::Display) -> ApiError {
    ApiError::new(500, "internal", what.to_string())
}

struct Daemon {
    config: DaemonConfig,
    token: String,
    started_at: String,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    children: Mutex<Vec<Child>>,
    output: Output,
    stop: Arc<AtomicBool>,
}

/// Runs the daemon until `stop` is set.
pub fn run(config: DaemonConfig, output: Output, stop: Arc<AtomicBool>) -> Result<(), String> {
    let token = std::fs::read_to_string(&config.token_file)
        .map_err(|e| {
            format!(
                "cannot read the host token {}: {e}",
                config.token_file.display()
            )
        })?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(format!(
            "the host token {} is empty",
            config.token_file.display()
        ));
    }
    std::fs::create_dir_all(config.state_dir.join("instances"))
        .map_err(|e| format!("cannot create {}: {e}", config.state_dir.display()))?;
    let listener = TcpListener::bind(&config.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listen address: {e}"))?;
    let daemon = Arc::new(Daemon {
        config,
        token,
        started_at: rfc3339_now(),
        locks: Mutex::new(HashMap::new()),
        children: Mutex::new(Vec::new()),
        output,
        stop: stop.clone(),
    });
    let attached: Vec<serde_json::Value> = daemon
        .names()
        .iter()
        .filter_map(|n| {
            let dir = daemon.dir(n);
            dir.live_supervisor()
                .map(|p| json!({"instance": n, "supervisor_pid": p.pid}))
        })
        .collect();
    daemon.output.event(
        "host_started",
        &[
            ("name", json!(daemon.config.name)),
            ("listen", json!(local.to_string())),
            ("instance_address", json!(daemon.config.instance_address)),
            (
                "state_dir",
                json!(daemon.config.state_dir.display().to_string()),
            ),
            ("reattached", json!(attached)),
        ],
    );
    {
        let daemon = daemon.clone();
        std::thread::Builder::new()
            .name("reconcile".into())
            .spawn(move || {
                while !daemon.stop.load(Ordering::SeqCst) {
                    daemon.reconcile();
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
            .map_err(|e| format!("cannot start the reconcile thread: {e}"))?;
    }
    {
        // Wake the accept loop when asked to stop.
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = std::net::TcpStream::connect(local);
        });
    }
    let handler = {
        let daemon = daemon.clone();
        Arc::new(move |req: Request| daemon.handle(req))
    };
    // The token is checked on the head, so an unauthenticated client is
    // answered before the daemon reads (and holds) any body it announces.
    let admit = {
        let daemon = daemon.clone();
        Arc::new(move |req: &Request| daemon.authorize(req).err().map(|e| e.reply()))
    };
    serve_admitting(listener, stop, admit, handler, REQUEST_DEADLINE);
    daemon.output.event("host_stopped", &[]);
    Ok(())
}

impl Daemon {
    fn dir(&self, name: &str) -> InstanceDir {
        InstanceDir::new(&self.config.state_dir, name)
    }

    fn names(&self) -> Vec<String> {
        instance_names(&self.config.state_dir)
    }

    fn lock_for(&self, name: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    /// Reaps exited supervisors; restarts those that died while their
    /// instance should run (not the ones that ended on their own).
    fn reconcile(&self) {
        if let Ok(mut children) = self.children.lock() {
            children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        }
        for name in self.names() {
            let dir = self.dir(&name);
            if dir.desired() != Desired::Running || dir.live_supervisor().is_some() {
                continue;
            }
            let Some(record) = dir.record() else { continue };
            if record.state.is_final() {
                continue;
            }
            let lock = self.lock_for(&name);
            let Ok(_guard) = lock.try_lock() else {
                continue;
            };
            // Look again under the lock: a start may just have finished.
            if dir.live_supervisor().is_some() || dir.record().is_some_and(|r| r.state.is_final()) {
                continue;
            }
            self.output.event(
                "supervisor_lost",
                &[("instance", json!(name)), ("state", json!(record.state))],
            );
            if let Err(e) = self.spawn_supervisor(&dir, record.generation) {
                self.output.event(
                    "supervisor_respawn_failed",
                    &[("instance", json!(name)), ("error", json!(e.message))],
                );
            }
        }
    }

    fn handle(&self, req: Request) -> Reply {
        match self.route(req) {
            Ok(reply) => reply,
            Err(e) => e.reply(),
        }
    }

    fn authorize(&self, req: &Request) -> ApiResult<()> {
        let Some(header) = req.header("authorization") else {
            return Err(ApiError::new(
                401,
                "unauthorized",
                "missing `Authorization: Bearer <host token>` header",
            ));
        };
        let presented = header.strip_prefix("Bearer ").unwrap_or("").trim();
        if !constant_time_eq(presented.as_bytes(), self.token.as_bytes()) {
            return Err(ApiError::new(
                401,
                "invalid_token",
                "the bearer token is not this host's token",
            ));
        }
        Ok(())
    }

    fn route(&self, req: Request) -> ApiResult {
        self.authorize(&req)?;
        let Some(rest) = req.path.strip_prefix("/v1/") else {
            return Err(ApiError::new(
                404,
                "no_route",
                format!("no route {} {}", req.method, req.path),
            ));
        };
        let segs: Vec<&str> = rest.split('/').collect();
        match (req.method.as_str(), segs.as_slice()) {
            ("GET", ["host"]) => Ok(Reply::json(200, &self.host_info())),
            ("GET", ["instances"]) => {
                let views: Vec<InstanceView> = self
                    .names()
                    .iter()
                    .filter_map(|n| self.view(n).ok())
                    .collect();
                Ok(Reply::json(200, &views))
            }
            ("PUT", ["instances", name]) => self.deploy(name, &req.body),
            ("GET", ["instances", name]) => Ok(Reply::json(200, &self.view(name)?)),
            ("DELETE", ["instances", name]) => self.delete(name),
            ("POST", ["instances", name, "start"]) => self.start(name, &req.body),
            ("POST", ["instances", name, "stop"]) => self.stop_instance(name),
            ("POST", ["instances", name, "restart"]) => {
                let _ = start_request(&req.body)?;
                self.stop_instance(name)?;
                self.start(name, &req.body)
            }
            ("POST", ["instances", name, "offline"]) => self.hold(name),
            ("POST", ["instances", name, "online"]) => self.release_hold(name),
            ("GET", ["instances", name, "logs"]) => self.logs(name, &req),
            ("POST", ["events"]) => {
                let request: EventsRequest = if req.body.iter().all(u8::is_ascii_whitespace) {
                    EventsRequest::default()
                } else {
                    serde_json::from_slice(&req.body).map_err(|e| {
                        ApiError::new(400, "invalid_body", format!("invalid events request: {e}"))
                    })?
                };
                if let Some(bad) = request.from.keys().find(|n| !valid_instance_name(n)) {
                    return Err(ApiError::new(
                        400,
                        "invalid_field",
                        format!("`{bad}` is not an instance name"),
                    )
                    .field("from"));
                }
                let (state_dir, stop) = (self.config.state_dir.clone(), self.stop.clone());
                Ok(Reply::Stream {
                    content_type: "text/event-stream",
                    body: Box::new(move |w| stream_events(w, &state_dir, request, &stop)),
                })
            }
            (_, ["host" | "instances"] | ["instances", _] | ["instances", _, _]) => {
                Err(ApiError::new(
                    405,
                    "method_not_allowed",
                    format!("{} is not allowed on {}", req.method, req.path),
                ))
            }
            _ => Err(ApiError::new(
                404,
                "no_route",
                format!("no route {} {}", req.method, req.path),
            )),
        }
    }

    fn host_info(&self) -> HostInfo {
        let names = self.names();
        let running = names
            .iter()
            .filter(|n| self.dir(n).live_supervisor().is_some())
            .count();
        HostInfo {
            name: self.config.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            instance_address: self.config.instance_address.clone(),
            started_at: self.started_at.clone(),
            instances: names.len(),
            running,
        }
    }

    fn known(&self, name: &str) -> ApiResult<(InstanceDir, HostSpec, LifecycleDocument)> {
        let not_found = || {
            ApiError::new(
                404,
                "instance_not_found",
                format!("no instance `{name}` on host `{}`", self.config.name),
            )
        };
        if !valid_instance_name(name) {
            return Err(not_found());
        }
        let dir = self.dir(name);
        let spec = dir.spec().ok_or_else(not_found)?;
        let doc = dir.layout(&spec).load_document().map_err(internal)?;
        Ok((dir, spec, doc))
    }

    fn view(&self, name: &str) -> ApiResult<InstanceView> {
        let (dir, spec, doc) = self.known(name)?;
        Ok(dir.view(&spec, &doc.app, &doc.env))
    }

    fn deploy(&self, name: &str, body: &[u8]) -> ApiResult {
        if !valid_instance_name(name) {
            return Err(ApiError::new(
                400,
                "invalid_name",
                format!("`{name}` is not a valid instance name: use 1-63 of a-z, 0-9, `-`, `.`, `_`, starting with a letter or digit"),
            )
            .field("name"));
        }
        let request: DeployRequest = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(400, "invalid_body", format!("invalid deploy request: {e}"))
        })?;
        if request.command.first().is_none_or(|c| c.is_empty()) {
            return Err(
                ApiError::new(400, "invalid_field", "command must name a program").field("command"),
            );
        }
        if let Err((field, message)) = check_command_and_env(&request) {
            return Err(ApiError::new(400, "invalid_field", message).field(&field));
        }
        if let Some(wd) = &request.working_dir
            && let Err(message) = check_working_dir(wd, &self.config.state_dir)
        {
            return Err(ApiError::new(400, "invalid_field", message).field("working_dir"));
        }
        if let Some(h) = &request.hooks_dir
            && (Path::new(h).is_absolute() || h.split('/').any(|c| c == ".."))
        {
            return Err(ApiError::new(
                400,
                "invalid_field",
                format!("hooks_dir `{h}` must be a relative path inside the working directory"),
            )
            .field("hooks_dir"));
        }
        if let Some(a) = &request.artifact {
            artifact::check(a, &self.config.artifact_roots, &self.config.allowed_urls)
                .map_err(|e| ApiError::new(400, "invalid_artifact", e.message).field(e.field))?;
        }
        let lock = self.lock_for(name);
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.dir(name);
        if dir.live_supervisor().is_some() {
            return Err(ApiError::new(
                409,
                "instance_running",
                format!("instance `{name}` is running; stop it before deploying a new version"),
            ));
        }
        std::fs::create_dir_all(&dir.root).map_err(internal)?;
        // The default working directory is built aside and swapped in only
        // when the artifact is in place, so a failed deploy leaves the
        // previous version whole. A given working directory is written in place.
        let (working_dir, staging) = match &request.working_dir {
            Some(wd) => (PathBuf::from(wd), None),
            None => {
                let staging = dir.root.join("app.staging");
                if staging.exists() {
                    std::fs::remove_dir_all(&staging).map_err(internal)?;
                }
                (dir.default_working_dir(), Some(staging))
            }
        };
        let target = staging.clone().unwrap_or_else(|| working_dir.clone());
        std::fs::create_dir_all(&target).map_err(|e| {
            ApiError::new(
                500,
                "internal",
                format!("cannot create {}: {e}", target.display()),
            )
            .field("working_dir")
        })?;
        if let Some(a) = &request.artifact {
            let installed = artifact::install(
                a,
                &self.config.artifact_roots,
                &self.config.allowed_urls,
                &target,
                &dir.root.join("download"),
            );
            let _ = std::fs::remove_dir_all(dir.root.join("download"));
            if let Err(e) = installed {
                if let Some(staging) = &staging {
                    let _ = std::fs::remove_dir_all(staging);
                }
                let status = if e.bad_request { 400 } else { 500 };
                return Err(ApiError::new(status, "invalid_artifact", e.message).field(e.field));
            }
        }
        if let Some(staging) = &staging {
            if working_dir.exists() {
                std::fs::remove_dir_all(&working_dir).map_err(internal)?;
            }
            std::fs::rename(staging, &working_dir).map_err(internal)?;
        }
        let mut doc = request.lifecycle.clone();
        if let Some(auth) = doc.authorization.as_mut() {
            // On hosts the grant API is called with the host token.
            auth.token_path = self.config.token_file.display().to_string();
        }
        let spec = HostSpec {
            name: name.to_string(),
            uid: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            host: self.config.name.clone(),
            address: self.config.instance_address.clone(),
            command: request.command.clone(),
            env: request.env.clone(),
            hooks_dir: working_dir.join(request.hooks_dir.as_deref().unwrap_or("hooks")),
            working_dir,
            restart: request.restart,
            log_segment_bytes: request
                .log_segment_bytes
                .unwrap_or(log::DEFAULT_SEGMENT_BYTES),
            artifact: request.artifact.clone(),
            version: request.version.clone(),
            deployed_at: rfc3339_now(),
        };
        let layout = dir.layout(&spec);
        write_json_atomic(&layout.config, &doc).map_err(internal)?;
        write_json_atomic(&dir.spec_path(), &spec).map_err(internal)?;
        let _ = remove_if_present(&dir.record_path());
        dir.set_desired(Desired::Stopped).map_err(internal)?;
        self.output.event(
            "instance_deployed",
            &[
                ("instance", json!(name)),
                ("artifact", json!(spec.artifact)),
            ],
        );
        if request.start {
            self.start_locked(&dir, request.generation)?;
        }
        Ok(Reply::json(201, &dir.view(&spec, &doc.app, &doc.env)))
    }

    fn start(&self, name: &str, body: &[u8]) -> ApiResult {
        let request = start_request(body)?;
        let (dir, spec, doc) = self.known(name)?;
        let lock = self.lock_for(name);
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        self.start_locked(&dir, request.generation)?;
        Ok(Reply::json(200, &dir.view(&spec, &doc.app, &doc.env)))
    }

    /// Starts the instance anew: this also releases an offline hold.
    fn start_locked(&self, dir: &InstanceDir, generation: Option<u64>) -> ApiResult<()> {
        dir.set_desired(Desired::Running).map_err(internal)?;
        if dir.live_supervisor().is_some() {
            return Ok(());
        }
        dir.set_held(false).map_err(internal)?;
        let run = dir.root.join("run");
        for f in ["offline.request", "offline.ack", "offline.done"] {
            let _ = remove_if_present(&run.join(f));
        }
        let _ = remove_if_present(&dir.record_path());
        self.spawn_supervisor(dir, generation)
    }

    /// Holds the instance out of traffic: the sidecar removes
    /// healthcheck.html; when it was online, the drain period follows
    /// before the answer. The app keeps running, and does not go online
    /// again (even after a restart) until the hold is released.
    fn hold(&self, name: &str) -> ApiResult {
        let (dir, spec, doc) = self.known(name)?;
        let lock = self.lock_for(name);
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let marker = dir.layout(&spec).healthcheck();
        let was_online = dir.live_supervisor().is_some() && marker.exists();
        dir.set_held(true).map_err(internal)?;
        if was_online {
            let deadline = Instant::now() + Duration::from_secs(10);
            while marker.exists() && dir.live_supervisor().is_some() {
                if Instant::now() >= deadline {
                    return Err(internal(format!(
                        "instance `{name}` did not leave traffic within 10s"
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_secs(u64::from(doc.drain_seconds)));
        }
        self.output.event(
            "instance_held",
            &[("instance", json!(name)), ("was_online", json!(was_online))],
        );
        Ok(Reply::json(200, &dir.view(&spec, &doc.app, &doc.env)))
    }

    /// Releases the hold: ONLINE again once checkurl and preOnline pass.
    fn release_hold(&self, name: &str) -> ApiResult {
        let (dir, spec, doc) = self.known(name)?;
        let lock = self.lock_for(name);
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        dir.set_held(false).map_err(internal)?;
        self.output
            .event("instance_released", &[("instance", json!(name))]);
        Ok(Reply::json(200, &dir.view(&spec, &doc.app, &doc.env)))
    }

    /// Spawns the supervisor, records it, then lets it go (closes its stdin),
    /// so the record names the supervisor before the supervisor writes it.
    fn spawn_supervisor(&self, dir: &InstanceDir, generation: Option<u64>) -> ApiResult<()> {
        let spec = dir
            .spec()
            .ok_or_else(|| internal("the instance has no spec"))?;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.root.join("supervisor.stderr"))
            .map_err(internal)?;
        let mut command = Command::new(&self.config.exe);
        command
            .arg(INTERNAL_SUBCOMMAND)
            .arg("supervise")
            .arg(&dir.root)
            .current_dir(&dir.root)
            .envs(&spec.env)
            .env("KEELSON_POD_NAME", &spec.name)
            .env("KEELSON_POD_UID", &spec.uid)
            .env("KEELSON_POD_IP", &spec.address)
            .env("KEELSON_NAMESPACE", "")
            .env("KEELSON_BIND_ADDRESS", &spec.address)
            .env("KEELSON_HOST", &spec.host)
            .env("KEELSON_INSTANCE_DIR", &dir.root)
            .env_remove("KEELSON_CONFIG")
            .env_remove("KEELSON_LABELS")
            .env_remove("KEELSON_HOOKS_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        let mut child = command.spawn().map_err(|e| {
            internal(format!(
                "cannot start a supervisor ({}): {e}",
                self.config.exe.display()
            ))
        })?;
        let process = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
            .ok()
            .and_then(|s| parse_stat(&s))
            .map(|s| AppProcess {
                pid: child.id(),
                start_time: s.start_time,
            });
        let previous = dir.record();
        let record = SupervisorRecord {
            process,
            state: SupervisorState::Starting,
            phase: None,
            app_pid: None,
            restarts: previous.as_ref().map_or(0, |r| r.restarts),
            last_exit: previous.and_then(|r| r.last_exit),
            message: None,
            generation,
            updated_at: rfc3339_now(),
        };
        let written = write_json_atomic(&dir.record_path(), &record);
        drop(child.stdin.take());
        self.output.event(
            "supervisor_spawned",
            &[("instance", json!(spec.name)), ("pid", json!(child.id()))],
        );
        if let Ok(mut children) = self.children.lock() {
            children.push(child);
        }
        written.map_err(internal)
    }

    fn stop_instance(&self, name: &str) -> ApiResult {
        let (dir, spec, doc) = self.known(name)?;
        let lock = self.lock_for(name);
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        dir.set_desired(Desired::Stopped).map_err(internal)?;
        if let Some(supervisor) = dir.live_supervisor() {
            if let Some(pid) = i32::try_from(supervisor.pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let budget = roles_budget(&doc);
            let deadline = Instant::now() + budget;
            while supervisor.is_running() {
                if Instant::now() >= deadline {
                    return Err(ApiError::new(
                        500,
                        "stop_timed_out",
                        format!(
                            "instance `{name}` did not stop within {}s; its supervisor (pid {}) is still stopping",
                            budget.as_secs(),
                            supervisor.pid
                        ),
                    ));
                }
                // Briefly: a release starts the next version right after.
                std::thread::sleep(Duration::from_millis(2));
            }
            if let Ok(mut children) = self.children.lock() {
                children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
            }
        }
        Ok(Reply::json(200, &dir.view(&spec, &doc.app, &doc.env)))
    }

    fn delete(&self, name: &str) -> ApiResult {
        let (dir, _, _) = self.known(name)?;
        let lock = self.lock_for(name);
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        if dir.live_supervisor().is_some() {
            return Err(ApiError::new(
                409,
                "instance_running",
                format!("instance `{name}` is running; stop it before deleting it"),
            ));
        }
        std::fs::remove_dir_all(&dir.root).map_err(internal)?;
        Ok(Reply::empty(204))
    }

    fn logs(&self, name: &str, req: &Request) -> ApiResult {
        let (dir, _, _) = self.known(name)?;
        let logs = dir.logs();
        let end = log::end_offset(&logs);
        let raw = req.param("offset").or_else(|| req.header("last-event-id"));
        let offset = match raw {
            None => 0,
            Some("end") => end,
            Some(v) => v.parse::<u64>().map_err(|_| {
                ApiError::new(
                    400,
                    "invalid_field",
                    format!("offset `{v}` is not a number or `end`"),
                )
                .field("offset")
            })?,
        };
        if offset > end {
            return Err(ApiError::new(
                400,
                "invalid_field",
                format!("offset {offset} is beyond the end of the log ({end})"),
            )
            .field("offset"));
        }
        let follow = matches!(req.param("follow"), Some("true" | "1"));
        let events_only = match req.param("only") {
            None => false,
            Some("events") => true,
            Some(v) => {
                return Err(ApiError::new(
                    400,
                    "invalid_field",
                    format!("only=`{v}` is not supported; use only=events"),
                )
                .field("only"));
            }
        };
        let stop = self.stop.clone();
        Ok(Reply::Stream {
            content_type: "text/event-stream",
            body: Box::new(move |w| stream_log(w, &logs, offset, follow, events_only, &stop)),
        })
    }
}

fn start_request(body: &[u8]) -> ApiResult<StartRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(StartRequest::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "invalid_body", format!("invalid start request: {e}")))
}

fn instance_names(state_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state_dir.join("instances"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| valid_instance_name(n))
        .collect();
    names.sort();
    names
}

/// Writes every instance's events as server-sent events, `id` being
/// `<instance>:<offset to resume from>`; with `follow`, keeps going, picking
/// up new instances and starting over for an instance deployed anew.
fn stream_events(
    w: &mut ChunkWriter,
    state_dir: &Path,
    request: EventsRequest,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut cursor = request.from;
    let mut first = true;
    let mut listed = Instant::now() - Duration::from_secs(1);
    let mut last_write = Instant::now();
    let mut watch = Watch::new();
    loop {
        if listed.elapsed() >= LIST_EVERY {
            let names = instance_names(state_dir);
            cursor.retain(|n, _| names.contains(n));
            watch.begin();
            watch.add(&state_dir.join("instances"));
            for name in names {
                watch.add(&InstanceDir::new(state_dir, &name).logs());
                cursor.entry(name).or_insert_with_key(|n| {
                    if first && request.start == StreamStart::End {
                        log::end_offset(&InstanceDir::new(state_dir, n).logs())
                    } else {
                        0
                    }
                });
            }
            first = false;
            listed = Instant::now();
        }
        let mut text = String::new();
        for (name, offset) in cursor.iter_mut() {
            let logs = InstanceDir::new(state_dir, name).logs();
            let chunk = match log::read_from(&logs, *offset, 64 * 1024) {
                Ok(c) => c,
                // A new deployment under the same name: a new log.
                Err(log::ReadError::BeyondEnd { .. }) => {
                    *offset = 0;
                    continue;
                }
                Err(_) => continue,
            };
            for (end, line) in chunk.lines.iter().filter(|(_, l)| l.starts_with('{')) {
                text.push_str(&format!(
                    "id: {name}:{end}\ndata: {}\n\n",
                    line.replace('\r', "")
                ));
            }
            *offset = chunk.next;
        }
        if !text.is_empty() {
            w.send(text.as_bytes())?;
            last_write = Instant::now();
            continue;
        }
        if !request.follow || stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if last_write.elapsed() > Duration::from_secs(15) {
            w.send(b": keepalive\n\n")?;
            last_write = Instant::now();
        }
        watch.wait(LIST_EVERY.saturating_sub(listed.elapsed()));
    }
}

/// How often an event stream looks for instances deployed or deleted.
const LIST_EVERY: Duration = Duration::from_millis(200);

/// How long a stop may take: the offline sequence, the app's stop, a margin.
fn roles_budget(doc: &LifecycleDocument) -> Duration {
    crate::roles::default_offline_timeout(doc)
        + Duration::from_secs(u64::from(doc.stop_timeout_seconds) + 30)
}

/// Writes the log from `offset` as server-sent events, `id` being the
/// offset to resume from; with `follow`, keeps going as the log grows.
fn stream_log(
    w: &mut ChunkWriter,
    logs: &Path,
    offset: u64,
    follow: bool,
    events_only: bool,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut next = offset;
    let mut last_write = Instant::now();
    let mut watch = Watch::new();
    watch.add(logs);
    loop {
        let chunk = match log::read_from(logs, next, 256 * 1024) {
            Ok(c) => c,
            // The instance was deleted under us.
            Err(_) => return Ok(()),
        };
        let mut text = String::new();
        if let Some(to) = chunk.skipped_to {
            text.push_str(&format!(
                "event: gap\nid: {to}\ndata: {{\"from\":{next},\"to\":{to}}}\n\n"
            ));
        }
        for (end, line) in &chunk.lines {
            if events_only && !line.starts_with('{') {
                continue;
            }
            text.push_str(&format!("id: {end}\ndata: {}\n\n", line.replace('\r', "")));
        }
        let empty = chunk.lines.is_empty();
        next = chunk.next;
        if !text.is_empty() {
            w.send(text.as_bytes())?;
            last_write = Instant::now();
        }
        if empty {
            if !follow || stop.load(Ordering::SeqCst) || !logs.parent().is_some_and(Path::exists) {
                return Ok(());
            }
            if last_write.elapsed() > Duration::from_secs(15) {
                w.send(b": keepalive\n\n")?;
                last_write = Instant::now();
            }
            // At most a second, to notice a stop or a deleted instance.
            watch.wait(Duration::from_secs(1));
        }
    }
}

/// Compares a presented token with the host's in time that depends only on
/// their lengths, not on where they first differ (nor, by an early return,
/// on whether the lengths match).
fn constant_time_eq(presented: &[u8], token: &[u8]) -> bool {
    let mut diff = presented.len() ^ token.len();
    for i in 0..presented.len().max(token.len()) {
        let (x, y) = (presented.get(i), token.get(i));
        diff |= usize::from(x.copied().unwrap_or(0) ^ y.copied().unwrap_or(0xff));
    }
    std::hint::black_box(diff) == 0
}

/// The command and environment must be passable to `execve`: no NUL
/// anywhere, env names non-empty and without `=` (which would set another
/// variable than the one named). Otherwise the deploy is accepted and every
/// start fails as an internal error.
fn check_command_and_env(request: &DeployRequest) -> Result<(), (String, String)> {
    if let Some(i) = request.command.iter().position(|a| a.contains('\0')) {
        return Err((
            format!("command[{i}]"),
            format!("command[{i}] contains a NUL byte"),
        ));
    }
    for (name, value) in &request.env {
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err((
                format!("env.{name}"),
                format!("env name `{name}` must be non-empty, without `=` or NUL"),
            ));
        }
        if value.contains('\0') {
            return Err((
                format!("env.{name}"),
                format!("env.{name} contains a NUL byte"),
            ));
        }
    }
    Ok(())
}

/// A given working directory: absolute, without `.`/`..` steps, not `/`,
/// and outside the daemon's state directory (where it would overwrite
/// another instance's files or the daemon's own), symlinks included.
fn check_working_dir(wd: &str, state_dir: &Path) -> Result<(), String> {
    use std::path::Component;
    let path = Path::new(wd);
    if !path.is_absolute() {
        return Err(format!("working_dir `{wd}` must be an absolute path"));
    }
    if wd.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!(
            "working_dir `{wd}` must not contain `.` or `..`; name the directory directly"
        ));
    }
    if !path.components().any(|c| matches!(c, Component::Normal(_))) {
        return Err(format!("working_dir `{wd}` cannot be the root directory"));
    }
    // Resolve the part that exists, so a symlink cannot lead inside.
    let mut existing = path;
    let mut rest = Vec::new();
    while !existing.exists() {
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
            break;
        };
        rest.push(name);
        existing = parent;
    }
    let mut real = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
    real.extend(rest.iter().rev());
    let state = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    if real.starts_with(&state) || state.starts_with(&real) {
        return Err(format!(
            "working_dir `{wd}` overlaps the host daemon's state directory ({})",
            state.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        for presented in [&b""[..], b"s3cre", b"s3cret!", b"s3creT", b"\xffs3cret"] {
            assert!(!constant_time_eq(presented, b"s3cret"), "{presented:?}");
        }
        // A missing byte never matches a token byte, whatever its value.
        assert!(!constant_time_eq(b"ab", b"ab\xff"));
        assert!(!constant_time_eq(b"ab\0", b"ab"));
    }

    #[test]
    fn commands_and_env_that_execve_cannot_take_are_bad_requests() {
        let base: DeployRequest = serde_json::from_value(serde_json::json!({
            "lifecycle": {
                "apiVersion": "keelson.dev/v1alpha1", "app": "a", "env": "prod",
                "checkurl": {"port": 1, "path": "/", "expectedStatus": 200,
                             "timeoutSeconds": 1, "intervalSeconds": 1},
                "drainSeconds": 0, "stopTimeoutSeconds": 1, "liveness": "true"
            },
            "command": ["./app", "--flag"],
            "env": {"MODE": "prod"}
        }))
        .unwrap();
        assert_eq!(check_command_and_env(&base), Ok(()));
        let field = |f: fn(&mut DeployRequest)| {
            let mut r = base.clone();
            f(&mut r);
            check_command_and_env(&r).unwrap_err().0
        };
        assert_eq!(field(|r| r.command[1] = "a\0b".into()), "command[1]");
        assert_eq!(
            field(|r| {
                r.env.insert("PATH=/evil:".into(), "x".into());
            }),
            "env.PATH=/evil:"
        );
        assert_eq!(
            field(|r| {
                r.env.insert(String::new(), "x".into());
            }),
            "env."
        );
        assert_eq!(
            field(|r| {
                r.env.insert("A".into(), "x\0".into());
            }),
            "env.A"
        );
    }

    #[test]
    fn working_dirs_stay_out_of_the_state_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir_all(state.join("instances/other/run")).unwrap();
        std::os::unix::fs::symlink(&state, tmp.path().join("via-link")).unwrap();
        let ok = tmp.path().join("srv/app");
        assert_eq!(check_working_dir(&ok.display().to_string(), &state), Ok(()));
        let cases = [
            ("relative/app".to_string(), "absolute"),
            ("/".to_string(), "root"),
            ("//".to_string(), "root"),
            (format!("{}/srv/../state", tmp.path().display()), "`..`"),
            (format!("{}/./srv", tmp.path().display()), "`..`"),
            (
                state.join("instances/other/run").display().to_string(),
                "state directory",
            ),
            (
                state.join("instances/new/app").display().to_string(),
                "state directory",
            ),
            (
                tmp.path()
                    .join("via-link/instances/x")
                    .display()
                    .to_string(),
                "state directory",
            ),
            (tmp.path().display().to_string(), "state directory"),
        ];
        for (wd, why) in cases {
            let err = check_working_dir(&wd, &state).unwrap_err();
            assert!(err.contains(why), "{wd}: {err}");
        }
    }
}
