//! A pod as local processes: the agent's init, app and sidecar containers
//! rooted in a temp dir, stopped the way the kubelet stops a pod, plus a stub
//! authorization API the tests own.
//!
//! Every party appends one line per interesting moment to a shared events
//! file (O_APPEND, whole lines): hooks (`hook:…`), the app (`app:…`), the
//! stub API (`authz:…`), the "kubelet" (`kubelet:…`) and the harness's own
//! watchers (`healthcheck:present|absent`, `client:ok|fail`). Assertions are
//! about the order of those lines.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keelson_agent_lifecycle::hooks::for_each_line;
use keelson_agent_lifecycle::http::{ServerResponse, serve};
use keelson_core::lifecycle::{
    Authorization, CheckUrl, Hook, HookRun, Hooks, LIFECYCLE_API_VERSION, LifecycleDocument,
};
pub use rustix::process::Signal;
use rustix::process::{Pid, kill_process, kill_process_group};

pub const AGENT: &str = env!("CARGO_BIN_EXE_keelson-agent");
pub const TESTAPP: &str = env!("CARGO_BIN_EXE_keelson-testapp");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("events file");
    f.write_all(format!("{line}\n").as_bytes()).expect("append");
}

pub fn command_hook(line: &str, timeout_seconds: u32) -> Hook {
    Hook {
        run: HookRun::Command(line.to_string()),
        timeout_seconds,
        env: BTreeMap::new(),
    }
}

pub fn script_hook(name: &str, timeout_seconds: u32) -> Hook {
    Hook {
        run: HookRun::Script(name.to_string()),
        timeout_seconds,
        env: BTreeMap::new(),
    }
}

/// A shell snippet appending `line` to the events file.
pub fn ev(line: &str) -> String {
    format!("echo '{line}' >> \"$KEELSON_TEST_EVENTS\"")
}

/// The authorization API stub: grants leases, counts renewals, revokes.
pub struct StubAuthz {
    pub url: String,
    pub calls: Arc<Mutex<Vec<String>>>,
    events: Arc<Mutex<Option<PathBuf>>>,
}

impl StubAuthz {
    /// Answers the first `busy` grant requests with 503 + `Retry-After: 0`
    /// (or `refuse` with 403 for all), then grants leases of `ttl_s`.
    pub fn start(busy: u32, refuse: bool, ttl_s: u64) -> StubAuthz {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stub");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let events_target: Arc<Mutex<Option<PathBuf>>> = Arc::new(Mutex::new(None));
        let events = events_target.clone();
        let busy_left = AtomicU32::new(busy);
        std::thread::spawn(move || {
            let next_lease = AtomicU32::new(1);
            serve(listener, move |req| {
                let authorized = req.header("authorization") == Some("Bearer pod-token");
                let path = req.path.clone();
                let record = |what: String| {
                    if let Some(events) = events.lock().unwrap().as_ref() {
                        append(events, &format!("authz:{what}"));
                    }
                    log.lock().unwrap().push(what);
                };
                if !authorized {
                    record("unauthorized".into());
                    return ServerResponse::text(401, "missing or wrong token");
                }
                match (req.method.as_str(), path.as_str()) {
                    ("POST", "/api/v1/grants") => {
                        if refuse {
                            record("refused".into());
                            return ServerResponse::text(403, "pod is not allowed");
                        }
                        if busy_left
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok()
                        {
                            record("busy".into());
                            let mut r = ServerResponse::text(503, "database busy");
                            r.headers.push(("Retry-After".into(), "0".into()));
                            return r;
                        }
                        let body: serde_json::Value =
                            serde_json::from_slice(&req.body).unwrap_or_default();
                        let id = format!("lease-{}", next_lease.fetch_add(1, Ordering::SeqCst));
                        record(format!("grant:{id}:{}:{}", body["instance"], body["ip"]));
                        ServerResponse::json(
                            201,
                            &serde_json::json!({"lease_id": id, "ttl_s": ttl_s, "grants": [{"db": "orders"}]}),
                        )
                    }
                    ("POST", p) if p.ends_with("/renew") => {
                        record("renew".into());
                        ServerResponse::json(200, &serde_json::json!({"ttl_s": ttl_s}))
                    }
                    ("DELETE", p) => {
                        record(format!("revoke:{}", p.rsplit('/').next().unwrap_or("")));
                        ServerResponse::text(204, "")
                    }
                    _ => ServerResponse::text(404, "no"),
                }
            })
        });
        StubAuthz {
            url,
            calls,
            events: events_target,
        }
    }

    /// From now on, also append every call to this events file.
    pub fn record_into(&self, events: &Path) {
        *self.events.lock().unwrap() = Some(events.to_path_buf());
    }
}

/// One log line of a container.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub container: String,
    pub text: String,
}

struct Container {
    name: String,
    child: Child,
    pre_stop: Option<Vec<String>>,
}

/// What a pod test configures.
pub struct PodSpec {
    pub doc: LifecycleDocument,
    pub hook_scripts: Vec<(String, String)>,
    pub app_healthy_after_ms: u64,
    pub labels: Option<String>,
}

impl PodSpec {
    pub fn new(app: &str) -> PodSpec {
        PodSpec {
            doc: LifecycleDocument {
                api_version: LIFECYCLE_API_VERSION.into(),
                app: app.into(),
                env: "test".into(),
                checkurl: CheckUrl {
                    port: 0,
                    path: "/checkurl".into(),
                    expected_status: 200,
                    timeout_seconds: 1,
                    interval_seconds: 1,
                },
                drain_seconds: 0,
                stop_timeout_seconds: 5,
                hooks: Hooks::default(),
                liveness: "http(8080, \"/checkurl\") == 200".into(),
                authorization: None,
            },
            hook_scripts: Vec::new(),
            app_healthy_after_ms: 0,
            labels: None,
        }
    }
}

pub struct Pod {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub events: PathBuf,
    pub app_port: u16,
    pub sidecar_port: u16,
    pub logs: Arc<Mutex<Vec<LogLine>>>,
    containers: Vec<Container>,
    healthy_after_ms: u64,
    watching: Arc<AtomicBool>,
    pub exits: BTreeMap<String, ExitStatus>,
}

impl Pod {
    /// Lays out the pod's volumes and runs its init container.
    pub fn create(mut spec: PodSpec, authz: Option<&StubAuthz>) -> (Pod, ExitStatus) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("keelson");
        let events = dir.path().join("events.log");
        std::fs::write(&events, "").unwrap();
        let app_port = free_port();
        let sidecar_port = free_port();
        spec.doc.checkurl.port = app_port;
        let token = dir.path().join("token");
        std::fs::write(&token, "pod-token\n").unwrap();
        if let Some(authz) = authz {
            authz.record_into(&events);
            spec.doc.authorization = Some(Authorization {
                url: authz.url.clone(),
                token_path: token.display().to_string(),
                deadline_seconds: 5,
            });
        }
        std::fs::create_dir_all(root.join("config")).unwrap();
        std::fs::write(
            root.join("config/lifecycle.json"),
            serde_json::to_vec_pretty(&spec.doc).unwrap(),
        )
        .unwrap();
        if let Some(labels) = &spec.labels {
            std::fs::create_dir_all(root.join("podinfo")).unwrap();
            std::fs::write(root.join("podinfo/labels"), labels).unwrap();
        }
        let hooks_src = dir.path().join("app-image-hooks");
        std::fs::create_dir_all(&hooks_src).unwrap();
        for (name, body) in &spec.hook_scripts {
            let path = hooks_src.join(name);
            std::fs::write(&path, body).unwrap();
            let mut perms = std::fs::metadata(&path).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
            std::fs::set_permissions(&path, perms).unwrap();
        }
        let pod = Pod {
            dir,
            root,
            events,
            app_port,
            sidecar_port,
            logs: Arc::new(Mutex::new(Vec::new())),
            containers: Vec::new(),
            healthy_after_ms: spec.app_healthy_after_ms,
            watching: Arc::new(AtomicBool::new(true)),
            exits: BTreeMap::new(),
        };
        // The init container runs the agent from its image.
        let mut init = pod.command(AGENT);
        init.arg("init").arg("--hooks-from").arg(&hooks_src);
        let child = init.spawn().expect("spawn init");
        let status = pod.collect("init", child).wait().expect("wait init");
        pod.watch_healthcheck();
        (pod, status)
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("KEELSON_ROOT", &self.root)
            .env("KEELSON_POD_NAME", "shop-blue-7d9f-x1")
            .env("KEELSON_POD_UID", "uid-1")
            .env("KEELSON_POD_IP", "127.0.0.1")
            .env("KEELSON_NAMESPACE", "shop-test")
            .env("KEELSON_TEST_EVENTS", &self.events)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Like a container: one group that SIGKILL at the grace period ends.
            .process_group(0);
        c
    }

    fn collect(&self, name: &str, mut child: Child) -> Child {
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = self.logs.clone();
            let name = name.to_string();
            std::thread::spawn(move || {
                for_each_line(pipe, |line| {
                    logs.lock().unwrap().push(LogLine {
                        container: name.clone(),
                        text: line.to_string(),
                    });
                });
            });
        }
        child
    }

    /// The agent as copied by init into the shared volume.
    pub fn agent(&self) -> PathBuf {
        self.root.join("bin/keelson-agent")
    }

    pub fn start_app(&mut self) {
        let mut c = self.command(self.agent());
        c.arg("entrypoint")
            .arg("--")
            .arg(TESTAPP)
            .arg(self.app_port.to_string())
            .arg(self.healthy_after_ms.to_string())
            .arg(&self.events);
        let child = self.collect("app", c.spawn().expect("spawn app"));
        let pre_stop = vec![
            self.agent().display().to_string(),
            "offline".into(),
            "--wait".into(),
        ];
        self.containers.push(Container {
            name: "app".into(),
            child,
            pre_stop: Some(pre_stop),
        });
    }

    pub fn start_sidecar(&mut self) {
        let mut c = self.command(self.agent());
        c.arg("sidecar")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.sidecar_port));
        let child = self.collect("sidecar", c.spawn().expect("spawn sidecar"));
        self.containers.push(Container {
            name: "sidecar".into(),
            child,
            pre_stop: None,
        });
    }

    pub fn start(&mut self) {
        self.start_app();
        self.start_sidecar();
    }

    pub fn healthcheck(&self) -> PathBuf {
        self.root.join("run/healthcheck.html")
    }

    /// Records every appearance and disappearance of healthcheck.html.
    fn watch_healthcheck(&self) {
        let (path, events, watching) = (
            self.healthcheck(),
            self.events.clone(),
            self.watching.clone(),
        );
        std::thread::spawn(move || {
            let mut present = false;
            while watching.load(Ordering::SeqCst) {
                let now = path.exists();
                if now != present {
                    append(
                        &events,
                        if now {
                            "healthcheck:present"
                        } else {
                            "healthcheck:absent"
                        },
                    );
                    present = now;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
    }

    /// Requests `/work` from the app every 10 ms until the app is gone,
    /// appending `client:ok` / `client:fail`.
    pub fn hammer_app(&self) -> std::thread::JoinHandle<()> {
        let (port, events, watching) = (self.app_port, self.events.clone(), self.watching.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::SeqCst) {
                let status = keelson_agent_lifecycle::probes::http_status(
                    "127.0.0.1",
                    port,
                    "/work",
                    Duration::from_millis(500),
                );
                append(
                    &events,
                    if status == 200 {
                        "client:ok"
                    } else {
                        "client:fail"
                    },
                );
                if status != 200 {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    }

    /// Whether the harness's watcher last saw healthcheck.html present
    /// (waiting on this, not on the file, keeps the events file in order).
    pub fn marker_present(&self) -> bool {
        self.events()
            .iter()
            .rev()
            .find(|e| e.starts_with("healthcheck:"))
            .is_some_and(|e| e == "healthcheck:present")
    }

    pub fn events(&self) -> Vec<String> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn log_lines(&self, container: &str) -> Vec<String> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.container == container)
            .map(|l| l.text.clone())
            .collect()
    }

    /// The JSON events a container printed, in order.
    pub fn agent_events(&self, container: &str) -> Vec<serde_json::Value> {
        self.log_lines(container)
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("event").is_some())
            .collect()
    }

    pub fn dump(&self) -> String {
        let logs = self.logs.lock().unwrap();
        let mut out = String::from("--- events ---\n");
        out.push_str(&self.events().join("\n"));
        out.push_str("\n--- logs ---\n");
        for l in logs
            .iter()
            .filter(|l| !l.text.starts_with("[preStart] line "))
        {
            out.push_str(&format!("{:8} | {}\n", l.container, l.text));
        }
        out
    }

    /// Polls `cond` every 10 ms until it holds, failing with the pod's logs
    /// at the deadline.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut(&Pod) -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn sidecar_get(&self, path: &str) -> Option<(u16, String)> {
        let resp = keelson_agent_lifecycle::http::send(&keelson_agent_lifecycle::http::Request {
            method: "GET",
            host: "127.0.0.1",
            port: self.sidecar_port,
            path,
            headers: &[],
            body: None,
            timeout: Duration::from_secs(2),
            read_body: true,
        })
        .ok()?;
        Some((resp.status, String::from_utf8_lossy(&resp.body).to_string()))
    }

    pub fn sidecar_phase(&self) -> Option<String> {
        let (_, body) = self.sidecar_get("/state")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["phase"].as_str().map(str::to_string)
    }

    pub fn container_pid(&self, name: &str) -> u32 {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.child.id())
            .expect("container")
    }

    /// Sends `signal` to a container's main process.
    pub fn signal(&self, name: &str, signal: Signal) {
        append(&self.events, &format!("test:signal:{name}"));
        if let Some(pid) = Pid::from_raw(self.container_pid(name) as i32) {
            let _ = kill_process(pid, signal);
        }
    }

    /// Waits for a container to exit on its own.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> ExitStatus {
        let i = self
            .containers
            .iter()
            .position(|c| c.name == name)
            .expect("container");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.containers[i].child.try_wait().expect("try_wait") {
                let c = self.containers.remove(i);
                self.exits.insert(c.name, status);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not exit\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The kubelet restarts one container (a failed liveness probe): its
    /// preStop, SIGTERM when that returns, then a new container.
    pub fn restart_like_liveness(&mut self, name: &str) {
        assert_eq!(name, "app", "only the app container has a preStop");
        append(&self.events, "kubelet:liveness-restart:app");
        let mut cmd = self.command(self.agent());
        cmd.arg("offline").arg("--wait");
        let mut pre_stop = self.collect("app-prestop", cmd.spawn().expect("spawn preStop"));
        let status = pre_stop.wait().expect("wait preStop");
        append(
            &self.events,
            &format!("kubelet:prestop-done:app:{}", status.code().unwrap_or(-1)),
        );
        self.signal(name, Signal::TERM);
        self.wait_exit(name, Duration::from_secs(30));
        self.start_app();
    }

    /// The app container crashes: everything in it is killed.
    pub fn crash(&mut self, name: &str) {
        let i = self
            .containers
            .iter()
            .position(|c| c.name == name)
            .expect("container");
        let mut c = self.containers.remove(i);
        append(&self.events, &format!("kubelet:crash:{name}"));
        signal_group(c.child.id(), Signal::KILL);
        let status = c.child.wait().expect("wait");
        self.exits.insert(name.to_string(), status);
    }

    /// Stops the pod as the kubelet does: every preStop at once; SIGTERM to
    /// a container when its own preStop returns (at once without one);
    /// SIGKILL to whatever still runs at the grace period.
    pub fn stop(&mut self, grace: Duration) {
        let started = Instant::now();
        append(&self.events, "kubelet:stop");
        let mut pre_stops: Vec<Option<Child>> = Vec::new();
        for c in &self.containers {
            let child = c.pre_stop.as_ref().map(|argv| {
                append(&self.events, &format!("kubelet:prestop:{}", c.name));
                let mut cmd = self.command(&argv[0]);
                cmd.args(&argv[1..]);
                self.collect(
                    &format!("{}-prestop", c.name),
                    cmd.spawn().expect("spawn preStop"),
                )
            });
            pre_stops.push(child);
        }
        let mut termed = vec![false; self.containers.len()];
        let mut exited: Vec<Option<ExitStatus>> = vec![None; self.containers.len()];
        loop {
            for (i, c) in self.containers.iter_mut().enumerate() {
                if !termed[i] {
                    let pre_stop_done = match &mut pre_stops[i] {
                        None => true,
                        Some(p) => p.try_wait().expect("try_wait").is_some(),
                    };
                    if pre_stop_done {
                        if pre_stops[i].is_some() {
                            append(&self.events, &format!("kubelet:prestop-done:{}", c.name));
                        }
                        append(&self.events, &format!("kubelet:sigterm:{}", c.name));
                        if let Some(pid) = Pid::from_raw(c.child.id() as i32) {
                            let _ = kill_process(pid, Signal::TERM);
                        }
                        termed[i] = true;
                    }
                }
                if exited[i].is_none() {
                    exited[i] = c.child.try_wait().expect("try_wait");
                    if exited[i].is_some() {
                        append(&self.events, &format!("kubelet:exited:{}", c.name));
                    }
                }
            }
            if exited.iter().all(Option::is_some) {
                break;
            }
            if started.elapsed() >= grace {
                for (i, c) in self.containers.iter_mut().enumerate() {
                    if exited[i].is_none() {
                        append(&self.events, &format!("kubelet:sigkill:{}", c.name));
                        signal_group(c.child.id(), Signal::KILL);
                        exited[i] = Some(c.child.wait().expect("wait"));
                    }
                }
                for p in pre_stops.iter_mut().flatten() {
                    signal_group(p.id(), Signal::KILL);
                    let _ = p.wait();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for p in pre_stops.iter_mut().flatten() {
            let _ = p.wait();
        }
        for (c, status) in self.containers.drain(..).zip(exited) {
            if let Some(status) = status {
                self.exits.insert(c.name, status);
            }
        }
    }
}

fn signal_group(pid: u32, signal: Signal) {
    if let Some(pid) = Pid::from_raw(pid as i32) {
        let _ = kill_process_group(pid, signal);
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.watching.store(false, Ordering::SeqCst);
        for c in &mut self.containers {
            signal_group(c.child.id(), Signal::KILL);
            let _ = c.child.wait();
        }
    }
}

/// Index of the first event equal to `line` (at or after `from`).
pub fn find(events: &[String], line: &str, from: usize) -> Option<usize> {
    events
        .iter()
        .skip(from)
        .position(|e| e == line)
        .map(|i| i + from)
}

/// Index of the first event starting with `prefix` (at or after `from`).
pub fn find_prefix(events: &[String], prefix: &str, from: usize) -> Option<usize> {
    events
        .iter()
        .skip(from)
        .position(|e| e.starts_with(prefix))
        .map(|i| i + from)
}

/// Asserts that the lines appear in this order (each after the previous).
pub fn assert_order(pod: &Pod, lines: &[&str]) {
    let events = pod.events();
    let mut at = 0;
    for line in lines {
        match find_prefix(&events, line, at) {
            Some(i) => at = i + 1,
            None => panic!(
                "expected `{line}` after position {at} in the order {lines:?}\n{}",
                pod.dump()
            ),
        }
    }
}
