//! The host daemon with real processes on loopback: `keelson-agent host`
//! spawns a supervisor per instance, which runs the app through the pod's
//! entrypoint and the pod's sidecar. The tests drive it through its HTTP
//! API and check the lifecycle order, the live log, restarts, a daemon
//! killed with SIGKILL and re-attached, and precise errors.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keelson_agent_lifecycle::host::instance::kill_all;
use keelson_agent_lifecycle::http::{Request, send};
use keelson_core::lifecycle::{
    Authorization, CheckUrl, Hooks, LIFECYCLE_API_VERSION, LifecycleDocument,
};
use rustix::process::{Pid, Signal, kill_process};
use serde_json::{Value, json};
use support::{AGENT, StubAuthz, TESTAPP, command_hook, ev, find_prefix, free_port, script_hook};

const TOKEN: &str = "host-token-1";

/// One `keelson-agent host` with its state dir; kills everything it started
/// (daemon, supervisors, apps) when dropped.
struct Host {
    dir: tempfile::TempDir,
    port: u16,
    address: String,
    token: String,
    daemon: Option<Child>,
    allow_url: String,
}

impl Host {
    fn start(address: &str) -> Host {
        Host::start_with_token(address, TOKEN)
    }

    fn start_with_token(address: &str, token: &str) -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("artifacts")).unwrap();
        std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
        let mut host = Host {
            dir,
            port: free_port(),
            address: address.to_string(),
            token: token.to_string(),
            daemon: None,
            allow_url: "http://127.0.0.1:9/allowed/".into(),
        };
        host.start_daemon();
        host
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn events_file(&self) -> PathBuf {
        self.path("events")
    }

    fn start_daemon(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.out"))
            .unwrap();
        let child = Command::new(AGENT)
            .arg("host")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--state-dir")
            .arg(self.path("state"))
            .arg("--token-file")
            .arg(self.path("token"))
            .arg("--name")
            .arg(format!("vm-{}", self.address))
            .arg("--instance-address")
            .arg(&self.address)
            .arg("--artifact-root")
            .arg(self.path("artifacts"))
            .arg("--allow-url")
            .arg(&self.allow_url)
            .env("KEELSON_TEST_EVENTS", self.events_file())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start the daemon");
        self.daemon = Some(child);
        wait_until("the daemon answers", Duration::from_secs(10), || {
            self.call("GET", "/v1/host", None).0 == 200
        });
    }

    fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        auth: Option<&str>,
    ) -> (u16, Value) {
        let body = body.map(|b| serde_json::to_vec(b).unwrap());
        let header = auth.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|h| ("Authorization", h.as_str()))
            .collect();
        match send(&Request {
            method,
            host: "127.0.0.1",
            port: self.port,
            path,
            headers: &headers,
            body: body.as_deref(),
            timeout: Duration::from_secs(60),
            read_body: true,
        }) {
            Ok(r) => (
                r.status,
                serde_json::from_slice(&r.body).unwrap_or(Value::Null),
            ),
            Err(_) => (0, Value::Null),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.call_with(method, path, body, Some(&self.token))
    }

    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}\n{}",
            self.dump()
        );
        v
    }

    fn view(&self, name: &str) -> Value {
        self.ok("GET", &format!("/v1/instances/{name}"), None)
    }

    fn wait_phase(&self, name: &str, phase: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.view(name);
            if v["phase"] == phase {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached {phase}: {v}\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The whole log of an instance (not following).
    fn log(&self, name: &str, offset: u64, events_only: bool) -> Vec<(u64, String)> {
        let only = if events_only { "&only=events" } else { "" };
        let r = send(&Request {
            method: "GET",
            host: "127.0.0.1",
            port: self.port,
            path: &format!("/v1/instances/{name}/logs?offset={offset}{only}"),
            headers: &[("Authorization", &format!("Bearer {}", self.token))],
            body: None,
            timeout: Duration::from_secs(10),
            read_body: true,
        })
        .expect("logs");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        parse_sse(&String::from_utf8_lossy(&r.body))
    }

    fn log_lines(&self, name: &str) -> Vec<String> {
        self.log(name, 0, false)
            .into_iter()
            .map(|(_, l)| l)
            .collect()
    }

    fn events(&self) -> Vec<String> {
        std::fs::read_to_string(self.events_file())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn dump(&self) -> String {
        let mut s = format!(
            "--- test events\n{}\n--- daemon\n{}\n",
            self.events().join("\n"),
            std::fs::read_to_string(self.path("daemon.out")).unwrap_or_default()
        );
        for entry in std::fs::read_dir(self.path("state/instances"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            for seg in std::fs::read_dir(entry.path().join("logs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                s.push_str(&format!(
                    "--- {name} {}\n",
                    seg.file_name().to_string_lossy()
                ));
                s.push_str(&std::fs::read_to_string(seg.path()).unwrap_or_default());
            }
            s.push_str(
                &std::fs::read_to_string(entry.path().join("supervisor.stderr"))
                    .unwrap_or_default(),
            );
        }
        s
    }

    fn deploy_body(&self, port: u16, healthy_after_ms: u64) -> Value {
        json!({
            "lifecycle": doc(port),
            "command": [TESTAPP, port.to_string(), healthy_after_ms.to_string(), self.events_file()],
            "env": {"KEELSON_TEST_EVENTS": self.events_file()},
            "restart": {"policy": "on-failure", "backoff_ms": 50},
        })
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_daemon();
        // Every supervisor's session: supervisors, apps, hooks, even one
        // that was just starting.
        kill_all(&self.path("state"), Duration::from_secs(10));
    }
}

fn doc(port: u16) -> LifecycleDocument {
    LifecycleDocument {
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
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn parse_sse(text: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut id = 0;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("data: ") {
            out.push((id, v.to_string()));
        }
    }
    out
}

/// Agent events in log order: `event`, or `event:step` for hooks.
fn event_names(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let event = v["event"].as_str()?;
            Some(match v["step"].as_str() {
                Some(step) => format!("{event}:{step}"),
                None => event.to_string(),
            })
        })
        .collect()
}

fn assert_in_order(haystack: &[String], needles: &[&str], context: &str) {
    let mut at = 0;
    for n in needles {
        match find_prefix(haystack, n, at) {
            Some(i) => at = i + 1,
            None => panic!(
                "expected `{n}` after position {at} in the order {needles:?}\n{haystack:#?}\n{context}"
            ),
        }
    }
}

fn get_work(address: &str, port: u16) -> u16 {
    send(&Request {
        method: "GET",
        host: address,
        port,
        path: "/work",
        headers: &[],
        body: None,
        timeout: Duration::from_secs(2),
        read_body: false,
    })
    .map_or(0, |r| r.status)
}

#[test]
fn deploy_start_stop_and_restart_in_lifecycle_order() {
    let host = Host::start("127.0.0.1");
    // The artifact: a directory with the app's hooks, under the artifact root.
    let artifact = host.path("artifacts/orders-1.2");
    std::fs::create_dir_all(artifact.join("hooks")).unwrap();
    let warm = artifact.join("hooks/warm.sh");
    std::fs::write(
        &warm,
        format!("#!/bin/sh\necho warming caches\n{}\n", ev("hook:preOnline")),
    )
    .unwrap();
    std::fs::set_permissions(&warm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let port = free_port();
    let mut body = host.deploy_body(port, 300);
    let mut d = doc(port);
    d.drain_seconds = 1;
    d.hooks.pre_start = Some(command_hook(
        &format!("echo preparing; {}", ev("hook:preStart")),
        10,
    ));
    d.hooks.pre_online = Some(script_hook("warm.sh", 10));
    d.hooks.pre_offline = Some(command_hook(
        &format!("echo leaving; {}", ev("hook:preOffline")),
        10,
    ));
    body["lifecycle"] = serde_json::to_value(&d).unwrap();
    body["artifact"] = json!({"path": artifact});

    let (status, v) = host.call("PUT", "/v1/instances/orders-1", Some(&body));
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["desired"], "stopped");
    assert!(
        host.path("state/instances/orders-1/app/hooks/warm.sh")
            .exists()
    );

    let v = host.ok("POST", "/v1/instances/orders-1/start", None);
    assert_eq!(v["desired"], "running");
    let v = host.wait_phase("orders-1", "online");
    assert_eq!(v["online"], true);
    assert_eq!(v["state"], "running");
    let first_pid = v["app_pid"].as_u64().unwrap();
    assert_eq!(get_work("127.0.0.1", port), 200);

    let lines = host.log_lines("orders-1");
    let ctx = host.dump();
    // preStart output and the app's stdout come through, tagged.
    assert_in_order(
        &lines,
        &["[preStart] preparing", "[stdout] testapp listening"],
        &ctx,
    );
    assert!(
        lines.iter().any(|l| l == "[preOnline] warming caches"),
        "{ctx}"
    );
    let names = event_names(&lines);
    assert_in_order(
        &names,
        &[
            "supervisor_started",
            "hook_started:preStart",
            "hook_finished:preStart",
            "exec",
            "checkurl_passed",
            "hook_started:preOnline",
            "hook_finished:preOnline",
            "online",
        ],
        &ctx,
    );
    // The sidecar follows the app from its preStart on, as in a pod.
    assert_in_order(
        &names,
        &["sidecar_started", "app_started", "checkurl_passed"],
        &ctx,
    );
    assert_in_order(
        &host.events(),
        &["hook:preStart", "app:start", "hook:preOnline"],
        &ctx,
    );

    // Stop: out of traffic, drain, preOffline, then SIGTERM, exit; a stopped view.
    let v = host.ok("POST", "/v1/instances/orders-1/stop", None);
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(v["online"], false);
    assert_eq!(v["desired"], "stopped");
    assert!(v["supervisor_pid"].is_null());
    assert!(
        !host
            .path("state/instances/orders-1/run/healthcheck.html")
            .exists()
    );
    assert_in_order(
        &host.events(),
        &["hook:preOffline", "app:sigterm", "app:exit"],
        &host.dump(),
    );
    let names = event_names(&host.log_lines("orders-1"));
    assert_in_order(
        &names,
        &[
            "online",
            "stop_requested",
            "healthcheck_removed",
            "draining",
            "hook_started:preOffline",
            "hook_finished:preOffline",
            "offline",
            "offline_done",
            "app_signaled",
            "app_stopped",
            "sidecar_stopped",
            "supervisor_exited",
        ],
        &host.dump(),
    );
    assert_eq!(get_work("127.0.0.1", port), 0, "the app is gone");

    // Restart from stopped, and restart while running: a new app each time,
    // online only after checkurl and preOnline again.
    host.ok("POST", "/v1/instances/orders-1/start", None);
    let v = host.wait_phase("orders-1", "online");
    let second_pid = v["app_pid"].as_u64().unwrap();
    assert_ne!(first_pid, second_pid);
    let before = host
        .events()
        .iter()
        .filter(|e| *e == "hook:preOnline")
        .count();
    let v = host.ok("POST", "/v1/instances/orders-1/restart", None);
    assert_eq!(v["desired"], "running");
    let v = host.wait_phase("orders-1", "online");
    assert_ne!(v["app_pid"].as_u64().unwrap(), second_pid);
    assert_eq!(
        host.events()
            .iter()
            .filter(|e| *e == "hook:preOnline")
            .count(),
        before + 1
    );

    // A stopped instance can be deleted; a running one cannot.
    let (status, err) = host.call("DELETE", "/v1/instances/orders-1", None);
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["code"], "instance_running");
    host.ok("POST", "/v1/instances/orders-1/stop", None);
    let (status, _) = host.call("DELETE", "/v1/instances/orders-1", None);
    assert_eq!(status, 204);
    assert_eq!(host.call("GET", "/v1/instances/orders-1", None).0, 404);
}

#[test]
fn a_crashed_app_is_restarted_and_goes_online_only_through_checkurl_again() {
    let host = Host::start("127.0.0.1");
    let port = free_port();
    let mut body = host.deploy_body(port, 200);
    body["start"] = json!(true);
    let mut d = doc(port);
    d.hooks.pre_online = Some(command_hook(&ev("hook:preOnline"), 10));
    body["lifecycle"] = serde_json::to_value(&d).unwrap();
    let (status, v) = host.call("PUT", "/v1/instances/crashy", Some(&body));
    assert_eq!(status, 201, "{v}");
    let v = host.wait_phase("crashy", "online");
    let pid = v["app_pid"].as_u64().unwrap();

    // /exit makes the app exit with status 3.
    let _ = get_work_path("127.0.0.1", port, "/exit");
    wait_until("a restarted app online", Duration::from_secs(20), || {
        let online = event_names(&host.log_lines("crashy"))
            .iter()
            .filter(|e| *e == "online")
            .count();
        let v = host.view("crashy");
        online == 2 && v["restarts"] == 1 && v["app_pid"].as_u64().is_some_and(|p| p != pid)
    });
    let v = host.view("crashy");
    assert_eq!(v["last_exit"]["code"], 3, "{v}");
    let lines = host.log_lines("crashy");
    let names = event_names(&lines);
    assert_in_order(
        &names,
        &[
            "online",
            "app_exit",
            "restarting",
            "app_started",
            "checkurl_passed",
            "hook_finished:preOnline",
            "online",
        ],
        &host.dump(),
    );
    assert_in_order(
        &host.events(),
        &["hook:preOnline", "app:crash", "app:start", "hook:preOnline"],
        &host.dump(),
    );
}

fn get_work_path(address: &str, port: u16, path: &str) -> u16 {
    send(&Request {
        method: "GET",
        host: address,
        port,
        path,
        headers: &[],
        body: None,
        timeout: Duration::from_secs(2),
        read_body: false,
    })
    .map_or(0, |r| r.status)
}

#[test]
fn instances_outlive_a_killed_daemon_and_it_reattaches() {
    let mut host = Host::start("127.0.0.1");
    let ports = [free_port(), free_port()];
    for (i, port) in ports.iter().enumerate() {
        let mut body = host.deploy_body(*port, 0);
        body["start"] = json!(true);
        host.ok("PUT", &format!("/v1/instances/app-{i}"), Some(&body));
    }
    let before: Vec<Value> = (0..2)
        .map(|i| host.wait_phase(&format!("app-{i}"), "online"))
        .collect();
    let offsets: Vec<u64> = (0..2)
        .map(|i| {
            host.view(&format!("app-{i}"))["log_offset"]
                .as_u64()
                .unwrap()
        })
        .collect();

    host.kill_daemon();
    assert_eq!(
        host.call("GET", "/v1/host", None).0,
        0,
        "the daemon is down"
    );
    for port in ports {
        assert_eq!(get_work("127.0.0.1", port), 200, "the app keeps serving");
    }
    // Output written while the daemon is down is kept.
    let _ = get_work_path("127.0.0.1", ports[0], "/nothing-here");

    host.start_daemon();
    let info = host.ok("GET", "/v1/host", None);
    assert_eq!(info["running"], 2, "{info}");
    for (i, old) in before.iter().enumerate() {
        let v = host.view(&format!("app-{i}"));
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["phase"], "online");
        assert_eq!(v["online"], true);
        assert_eq!(v["app_pid"], old["app_pid"], "the same app process");
        assert_eq!(v["supervisor_pid"], old["supervisor_pid"]);
        // The log is all there, and resumes from the old offset.
        let full = host.log(&format!("app-{i}"), 0, false);
        assert!(full.iter().any(|(_, l)| l.contains("\"event\":\"online\"")));
        let rest = host.log(&format!("app-{i}"), offsets[i], false);
        let from_full: Vec<_> = full
            .iter()
            .filter(|(end, _)| *end > offsets[i])
            .cloned()
            .collect();
        assert_eq!(rest, from_full);
    }
    // The re-attached daemon stops an instance it did not spawn, in order.
    let v = host.ok("POST", "/v1/instances/app-0/stop", None);
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(get_work("127.0.0.1", ports[0]), 0);
    assert_eq!(get_work("127.0.0.1", ports[1]), 200);
    let names = event_names(&host.log_lines("app-0"));
    assert_in_order(
        &names,
        &[
            "online",
            "stop_requested",
            "offline",
            "app_signaled",
            "app_stopped",
            "supervisor_exited",
        ],
        &host.dump(),
    );
}

#[test]
fn a_killed_supervisor_is_restarted_by_the_daemon() {
    let host = Host::start("127.0.0.1");
    let port = free_port();
    let mut body = host.deploy_body(port, 0);
    body["start"] = json!(true);
    host.ok("PUT", "/v1/instances/lonely", Some(&body));
    let v = host.wait_phase("lonely", "online");
    let (sup, app) = (
        v["supervisor_pid"].as_u64().unwrap(),
        v["app_pid"].as_u64().unwrap(),
    );
    // The supervisor dies without a word (OOM killer, a stray kill -9); its
    // app is left running with nobody watching it.
    kill_process(Pid::from_raw(sup as i32).unwrap(), Signal::KILL).unwrap();
    wait_until("a new supervisor online", Duration::from_secs(20), || {
        let v = host.view("lonely");
        v["phase"] == "online"
            && v["supervisor_pid"].as_u64().is_some_and(|p| p != sup)
            && v["app_pid"].as_u64().is_some_and(|p| p != app)
    });
    assert_eq!(get_work("127.0.0.1", port), 200);
    let daemon = std::fs::read_to_string(host.path("daemon.out")).unwrap();
    assert!(daemon.contains("\"event\":\"supervisor_lost\""), "{daemon}");
    // The orphan was stopped (SIGTERM first) before the new app started on
    // the same port. (Its stdout died with its supervisor, so it may not get
    // to say goodbye.)
    let names = event_names(&host.log_lines("lonely"));
    assert_in_order(
        &names,
        &[
            "checkurl_passed",
            "supervisor_started",
            "orphan_found",
            "orphan_stopped",
            "app_started",
            "online",
        ],
        &host.dump(),
    );
    assert_in_order(
        &host.events(),
        &["app:start", "app:sigterm", "app:start"],
        &host.dump(),
    );
}

#[test]
fn output_streams_live_and_resumes_from_an_offset() {
    let host = Host::start("127.0.0.1");
    let port = free_port();
    let mut body = host.deploy_body(port, 0);
    let gate = host.path("gate");
    let mut d = doc(port);
    d.hooks.pre_online = Some(command_hook(
        &format!(
            "echo warming; while [ ! -f '{}' ]; do sleep 0.02; done; echo warmed",
            gate.display()
        ),
        30,
    ));
    body["lifecycle"] = serde_json::to_value(&d).unwrap();
    body["start"] = json!(true);
    host.ok("PUT", "/v1/instances/live", Some(&body));

    // Follow the log over a raw connection and read it as it comes.
    let mut stream = TcpStream::connect(("127.0.0.1", host.port)).unwrap();
    write!(
        stream,
        "GET /v1/instances/live/logs?offset=0&follow=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut id = 0;
    let mut next_data = |reader: &mut BufReader<TcpStream>| -> (u64, String) {
        loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended");
            let line = line.trim_end();
            if let Some(v) = line.strip_prefix("id: ") {
                id = v.parse().unwrap();
            } else if let Some(v) = line.strip_prefix("data: ") {
                return (id, v.to_string());
            }
        }
    };
    // The hook's first line arrives while the hook still runs (it waits for the gate).
    loop {
        let (id, line) = next_data(&mut reader);
        seen.push((id, line.clone()));
        if line == "[preOnline] warming" {
            break;
        }
    }
    assert_eq!(host.view("live")["phase"], "pre_online");
    assert!(!seen.iter().any(|(_, l)| l == "[preOnline] warmed"));
    std::fs::write(&gate, "go").unwrap();
    loop {
        let (id, line) = next_data(&mut reader);
        seen.push((id, line.clone()));
        if line.contains("\"event\":\"online\"") {
            break;
        }
    }
    assert!(seen.iter().any(|(_, l)| l == "[preOnline] warmed"));
    // Offsets grow, and resuming from one gives exactly what followed it.
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    let (mid, _) = seen[seen.len() / 2];
    let resumed = host.log("live", mid, false);
    let expected: Vec<_> = seen.iter().filter(|(end, _)| *end > mid).cloned().collect();
    assert_eq!(&resumed[..expected.len()], &expected[..]);
    // Events only: every line is an agent event.
    let events = host.log("live", 0, true);
    assert!(!events.is_empty());
    assert!(events.iter().all(|(_, l)| l.starts_with('{')));
}

#[test]
fn bad_requests_get_precise_errors() {
    let host = Host::start("127.0.0.1");
    let port = free_port();
    let body = host.deploy_body(port, 0);

    let (s, e) = host.call_with("GET", "/v1/instances", None, None);
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer")
    );
    let (s, e) = host.call_with("GET", "/v1/instances", None, Some("not-the-token"));
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("invalid_token")),
        "{e}"
    );

    for (method, path) in [
        ("GET", "/v1/instances/ghost"),
        ("POST", "/v1/instances/ghost/start"),
        ("POST", "/v1/instances/ghost/stop"),
        ("GET", "/v1/instances/ghost/logs"),
        ("DELETE", "/v1/instances/ghost"),
    ] {
        let (s, e) = host.call(method, path, None);
        assert_eq!(s, 404, "{method} {path}: {e}");
        assert_eq!(e["error"]["code"], "instance_not_found");
        assert_eq!(
            e["error"]["message"],
            "no instance `ghost` on host `vm-127.0.0.1`"
        );
    }

    let deploy = |b: &Value| host.call("PUT", "/v1/instances/bad", Some(b));
    let mut b = body.clone();
    b["artifact"] = json!({"path": host.path("artifacts/missing.tar.gz")});
    let (s, e) = deploy(&b);
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error"]["code"], "invalid_artifact");
    assert_eq!(e["error"]["field"], "artifact.path");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing.tar.gz` cannot be used: No such file"),
        "{e}"
    );

    b["artifact"] = json!({"path": "/etc/hostname"});
    let (s, e) = deploy(&b);
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("artifact.path")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is outside the host's artifact roots"),
        "{e}"
    );

    b["artifact"] = json!({"path": "relative/app"});
    let (s, e) = deploy(&b);
    assert_eq!(s, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must be an absolute path"),
        "{e}"
    );

    b["artifact"] = json!({"url": "http://example.invalid/app.tar.gz"});
    let (s, e) = deploy(&b);
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("artifact.url")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not start with an allowed prefix (http://127.0.0.1:9/allowed/)"),
        "{e}"
    );

    std::fs::write(host.path("artifacts/broken.tar.gz"), "not a tarball").unwrap();
    b["artifact"] = json!({"path": host.path("artifacts/broken.tar.gz")});
    let (s, e) = deploy(&b);
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("artifact.path")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not a valid archive"),
        "{e}"
    );

    let mut b = body.clone();
    b["command"] = json!([]);
    let (s, e) = deploy(&b);
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("command")),
        "{e}"
    );

    let mut b = body.clone();
    b.as_object_mut().unwrap().remove("lifecycle");
    let (s, e) = deploy(&b);
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("invalid_body")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing field `lifecycle`"),
        "{e}"
    );

    let (s, e) = host.call("PUT", "/v1/instances/Bad_Name!", Some(&body));
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("name")),
        "{e}"
    );

    // A running instance refuses a new deploy; a log offset past the end is named.
    let mut b = body.clone();
    b["start"] = json!(true);
    host.ok("PUT", "/v1/instances/busy", Some(&b));
    let (s, e) = host.call("PUT", "/v1/instances/busy", Some(&body));
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("instance_running")),
        "{e}"
    );
    let (s, e) = host.call("GET", "/v1/instances/busy/logs?offset=999999999", None);
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("offset")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("offset 999999999 is beyond the end of the log"),
        "{e}"
    );
    let (s, _) = host.call("PATCH", "/v1/instances/busy", None);
    assert_eq!(s, 405);
}

#[test]
fn several_hosts_on_one_machine_bind_the_same_port_on_their_own_address() {
    let hosts = [Host::start("127.0.0.2"), Host::start("127.0.0.3")];
    let port = free_port();
    for h in &hosts {
        let mut body = h.deploy_body(port, 0);
        body["start"] = json!(true);
        h.ok("PUT", "/v1/instances/web-1", Some(&body));
    }
    for h in &hosts {
        let v = h.wait_phase("web-1", "online");
        assert_eq!(v["address"], h.address);
        assert_eq!(get_work(&h.address, port), 200);
        let lines = h.log_lines("web-1");
        let url = format!("http://{}:{port}/checkurl", h.address);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("\"event\":\"checkurl_passed\""))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("\"event\":\"sidecar_started\"") && l.contains(&h.address)),
            "{lines:#?} {url}"
        );
    }
    assert_eq!(
        get_work("127.0.0.1", port),
        0,
        "nothing on the default address"
    );
}

#[test]
fn the_host_obtains_renews_and_revokes_grants_with_its_token() {
    let authz = StubAuthz::start(1, false, 3);
    // The stub accepts this token; on hosts it is the host token.
    let host = Host::start_with_token("127.0.0.1", "pod-token");
    authz.record_into(&host.events_file());
    let port = free_port();
    let mut body = host.deploy_body(port, 0);
    let mut d = doc(port);
    d.authorization = Some(Authorization {
        url: authz.url.clone(),
        token_path: "/ignored/on/hosts".into(),
        deadline_seconds: 10,
    });
    body["lifecycle"] = serde_json::to_value(&d).unwrap();
    body["start"] = json!(true);
    host.ok("PUT", "/v1/instances/db-user", Some(&body));
    host.wait_phase("db-user", "online");
    wait_until("a renewal", Duration::from_secs(10), || {
        authz.calls.lock().unwrap().iter().any(|c| c == "renew")
    });
    host.ok("POST", "/v1/instances/db-user/stop", None);
    let events = host.events();
    assert_in_order(
        &events,
        &[
            "authz:busy",
            "authz:grant:lease-1:\"db-user\":\"127.0.0.1\"",
            "app:start",
            "authz:renew",
            "app:sigterm",
            "app:exit",
            "authz:revoke:lease-1",
        ],
        &host.dump(),
    );
    assert!(
        !authz
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c == "unauthorized")
    );
    assert!(!host.path("state/instances/db-user/run/lease.json").exists());
}

#[test]
fn an_instance_held_offline_stays_out_of_traffic_across_restarts_until_released() {
    let host = Host::start("127.0.0.1");
    let port = free_port();
    let mut body = host.deploy_body(port, 0);
    let mut d = doc(port);
    d.drain_seconds = 1;
    body["lifecycle"] = serde_json::to_value(&d).unwrap();
    host.ok("PUT", "/v1/instances/held", Some(&body));
    let v = host.ok(
        "POST",
        "/v1/instances/held/start",
        Some(&json!({"generation": 7})),
    );
    assert_eq!(v["generation"], 7);
    host.wait_phase("held", "online");

    // The hold answers once out of traffic and drained; the app keeps running.
    let started = Instant::now();
    let v = host.ok("POST", "/v1/instances/held/offline", None);
    assert!(started.elapsed() >= Duration::from_secs(1), "drained");
    assert_eq!(
        (v["held"].as_bool(), v["online"].as_bool()),
        (Some(true), Some(false)),
        "{v}"
    );
    assert_eq!(get_work("127.0.0.1", port), 200);
    host.wait_phase("held", "traffic_off");

    // A crash and restart does not bring it back into traffic.
    let pid = host.view("held")["app_pid"].as_u64().unwrap();
    let _ = get_work_path("127.0.0.1", port, "/exit");
    wait_until("the restarted app is seen", Duration::from_secs(20), || {
        let v = host.view("held");
        v["app_pid"].as_u64().is_some_and(|p| p != pid) && v["phase"] == "traffic_off"
    });
    let lines = host.log_lines("held");
    let names = event_names(&lines);
    let restarted = names.iter().rposition(|n| n == "app_started").unwrap();
    assert!(
        !names[restarted..].iter().any(|n| n == "online"),
        "{names:?}"
    );
    assert!(
        !host
            .path("state/instances/held/run/healthcheck.html")
            .exists()
    );

    // Released: online again through the checkurl.
    let v = host.ok("POST", "/v1/instances/held/online", None);
    assert_eq!(v["held"], false);
    host.wait_phase("held", "online");
    let started: Vec<Value> = host
        .log_lines("held")
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "supervisor_started")
        .collect();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["generation"], 7);

    // Holding again, then a new start (restart) releases the hold: a fresh process.
    host.ok("POST", "/v1/instances/held/offline", None);
    let v = host.ok(
        "POST",
        "/v1/instances/held/restart",
        Some(&json!({"generation": 8})),
    );
    assert_eq!(
        (v["held"].as_bool(), v["generation"].as_u64()),
        (Some(false), Some(8)),
        "{v}"
    );
    host.wait_phase("held", "online");
    let (s, e) = host.call(
        "POST",
        "/v1/instances/held/start",
        Some(&json!({"generation": "x"})),
    );
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("invalid_body")),
        "{e}"
    );
}

/// A stop of an instance held offline runs preOffline exactly once and gets
/// the sidecar's answer (no `offline --wait` timeout), every time: the stop's
/// offline request, the sidecar's ack and its done are written by one process
/// at nearly the same moment, and the app's exit is seen just before the
/// sidecar is told to stop. Repeated, because both used to be races.
#[test]
fn a_held_instance_is_stopped_with_exactly_one_pre_offline_every_time() {
    const ROUNDS: usize = 25;
    let host = Host::start("127.0.0.1");
    let port = free_port();
    let mut body = host.deploy_body(port, 0);
    let mut d = doc(port);
    d.hooks.pre_offline = Some(command_hook(&ev("hook:preOffline"), 10));
    body["lifecycle"] = serde_json::to_value(&d).unwrap();
    host.ok("PUT", "/v1/instances/held", Some(&body));
    let count = |what: &str| host.events().iter().filter(|e| *e == what).count();
    for round in 1..=ROUNDS {
        host.ok("POST", "/v1/instances/held/start", None);
        host.wait_phase("held", "online");
        host.ok("POST", "/v1/instances/held/offline", None);
        host.wait_phase("held", "traffic_off");
        let before = count("hook:preOffline");
        let started = Instant::now();
        let v = host.ok("POST", "/v1/instances/held/stop", None);
        let took = started.elapsed();
        assert_eq!(v["state"], "stopped", "{v}");
        let lines = host.log_lines("held");
        let names = event_names(&lines);
        // This round's events: from its (last) supervisor start on.
        let from = names
            .iter()
            .rposition(|n| n == "supervisor_started")
            .unwrap();
        let this_round = &names[from..];
        let ctx = || {
            format!(
                "round {round}/{ROUNDS}, stop took {took:?}\n{}",
                host.dump()
            )
        };
        assert_eq!(
            count("hook:preOffline"),
            before + 1,
            "preOffline ran once per stop; {}",
            ctx()
        );
        assert_eq!(
            this_round
                .iter()
                .filter(|n| *n == "hook_started:preOffline")
                .count(),
            1,
            "{this_round:?}\n{}",
            ctx()
        );
        assert!(
            !this_round.iter().any(|n| n == "offline_wait_timed_out"),
            "offline --wait missed the sidecar's done: {this_round:?}\n{}",
            ctx()
        );
        let done: Vec<Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "offline_done")
            .collect();
        assert_eq!(
            done.last().map(|v| v["by"].clone()),
            Some(json!("sidecar")),
            "{}",
            ctx()
        );
        assert_in_order(
            this_round,
            &[
                "stop_requested",
                "hook_finished:preOffline",
                "offline_request_done",
                "offline_done",
                "app_signaled",
                "sidecar_stopped",
            ],
            &ctx(),
        );
    }
    assert_eq!(count("hook:preOffline"), ROUNDS);
}

/// `POST /v1/events` without following: (instance, offset, event name).
fn host_events(host: &Host, body: &Value) -> Vec<(String, u64, String)> {
    let bytes = serde_json::to_vec(body).unwrap();
    let r = send(&Request {
        method: "POST",
        host: "127.0.0.1",
        port: host.port,
        path: "/v1/events",
        headers: &[("Authorization", &format!("Bearer {}", host.token))],
        body: Some(&bytes),
        timeout: Duration::from_secs(10),
        read_body: true,
    })
    .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let text = String::from_utf8_lossy(&r.body).to_string();
    let mut out = Vec::new();
    let mut id = String::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            let (name, offset) = id.split_once(':').unwrap();
            let event: Value = serde_json::from_str(v).unwrap();
            out.push((
                name.to_string(),
                offset.parse().unwrap(),
                event["event"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

#[test]
fn one_stream_carries_every_instances_events_and_resumes_per_instance() {
    let host = Host::start("127.0.0.1");
    for name in ["one", "two"] {
        let mut body = host.deploy_body(free_port(), 0);
        body["start"] = json!(true);
        host.ok("PUT", &format!("/v1/instances/{name}"), Some(&body));
        host.wait_phase(name, "online");
    }
    let all = host_events(&host, &json!({}));
    for name in ["one", "two"] {
        let names: Vec<&str> = all
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, e)| e.as_str())
            .collect();
        assert_eq!(names.first(), Some(&"supervisor_started"), "{all:?}");
        assert!(names.contains(&"online"), "{all:?}");
    }
    // Only events: every offset is one of an event line in that instance's log.
    let one_offsets: Vec<u64> = host.log("one", 0, true).iter().map(|(o, _)| *o).collect();
    let streamed: Vec<u64> = all
        .iter()
        .filter(|(n, _, _)| n == "one")
        .map(|(_, o, _)| *o)
        .collect();
    assert_eq!(streamed, one_offsets);

    // Resuming: from the last ids, nothing new; after a stop, only the stop.
    let last = |name: &str| all.iter().rev().find(|(n, _, _)| n == name).unwrap().1;
    let cursor = json!({"from": {"one": last("one"), "two": last("two")}});
    assert_eq!(host_events(&host, &cursor), vec![]);
    assert_eq!(host_events(&host, &json!({"start": "end"})), vec![]);
    host.ok("POST", "/v1/instances/two/stop", None);
    let after = host_events(&host, &cursor);
    assert!(after.iter().all(|(n, _, _)| n == "two"), "{after:?}");
    assert_eq!(after.first().map(|e| e.2.as_str()), Some("stop_requested"));
    assert_eq!(
        after.last().map(|e| e.2.as_str()),
        Some("supervisor_exited")
    );

    let (s, e) = host.call("POST", "/v1/events", Some(&json!({"from": {"../x": 1}})));
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("from")),
        "{e}"
    );
}

#[test]
fn an_artifact_from_an_allowed_url_is_downloaded_and_unpacked() {
    // A release archive with the app's hooks, served over plain HTTP.
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("hooks")).unwrap();
    std::fs::write(
        src.path().join("hooks/warm.sh"),
        "#!/bin/sh\necho warm from the archive\n",
    )
    .unwrap();
    std::fs::set_permissions(
        src.path().join("hooks/warm.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(src.path().join("VERSION"), "2.0.0\n").unwrap();
    let archive = src.path().join("orders-2.0.0.tar.gz");
    let status = Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(src.path())
        .arg("hooks")
        .arg("VERSION")
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&archive).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/releases/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        keelson_agent_lifecycle::http::serve(listener, move |req| {
            let mut r = keelson_agent_lifecycle::http::ServerResponse::text(404, "no");
            if req.path == "/releases/orders-2.0.0.tar.gz" {
                r.status = 200;
                r.body = bytes.clone();
            }
            r
        })
    });

    let mut host = Host::start("127.0.0.1");
    host.kill_daemon();
    host.allow_url = base.clone();
    host.start_daemon();
    let port = free_port();
    let mut body = host.deploy_body(port, 0);
    let mut d = doc(port);
    d.hooks.pre_online = Some(script_hook("warm.sh", 10));
    body["lifecycle"] = serde_json::to_value(&d).unwrap();
    body["artifact"] = json!({"url": format!("{base}orders-2.0.0.tar.gz")});
    body["start"] = json!(true);
    let (status, v) = host.call("PUT", "/v1/instances/fetched", Some(&body));
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        std::fs::read_to_string(host.path("state/instances/fetched/app/VERSION")).unwrap(),
        "2.0.0\n"
    );
    host.wait_phase("fetched", "online");
    assert!(
        host.log_lines("fetched")
            .iter()
            .any(|l| l == "[preOnline] warm from the archive")
    );

    // A missing file on an allowed server is the request's fault, named.
    host.ok("POST", "/v1/instances/fetched/stop", None);
    body["artifact"] = json!({"url": format!("{base}orders-9.tar.gz")});
    let (status, e) = host.call("PUT", "/v1/instances/fetched", Some(&body));
    assert_eq!(
        (status, e["error"]["field"].as_str()),
        (400, Some("artifact.url")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("HTTP 404"),
        "{e}"
    );
}

#[test]
fn hostile_deploys_are_refused_with_the_field_at_fault() {
    let host = Host::start("127.0.0.1");
    let body = host.deploy_body(free_port(), 0);
    let deploy = |b: &Value| host.call("PUT", "/v1/instances/hostile", Some(b));
    let refused = |b: &Value, field: &str, needle: &str| {
        let (s, e) = deploy(b);
        assert_eq!(
            (s, e["error"]["field"].as_str()),
            (400, Some(field)),
            "{b}: {e}"
        );
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{message}");
    };

    // The allow-list is http://127.0.0.1:9/allowed/: text-prefix tricks fail.
    for url in [
        "http://127.0.0.1:9/allowed/../secret.tar.gz",
        "http://127.0.0.1:9/allowed/%2e%2e/secret.tar.gz",
        "http://127.0.0.1:9/allowed-not/app.tar.gz",
        "http://127.0.0.1:9@evil.example/allowed/app.tar.gz",
        "http://127.0.0.1:99/allowed/app.tar.gz",
    ] {
        let mut b = body.clone();
        b["artifact"] = json!({ "url": url });
        let (s, e) = deploy(&b);
        assert_eq!(
            (s, e["error"]["field"].as_str()),
            (400, Some("artifact.url")),
            "{url}: {e}"
        );
    }

    // An archive whose symlink leaves the tree.
    let src = host.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::os::unix::fs::symlink("/etc", src.join("etc")).unwrap();
    let archive = host.path("artifacts/escape.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&src)
        .arg("etc")
        .status()
        .unwrap();
    assert!(status.success());
    let mut b = body.clone();
    b["artifact"] = json!({ "path": archive });
    refused(&b, "artifact.path", "points outside the archive");

    // A working directory inside the daemon's state, or climbing out.
    let mut b = body.clone();
    b["working_dir"] = json!(host.path("state/instances/other/app"));
    refused(&b, "working_dir", "state directory");
    b["working_dir"] = json!(format!("{}/../x", host.path("srv").display()));
    refused(&b, "working_dir", "`..`");

    // What execve cannot take.
    let mut b = body.clone();
    b["env"] = json!({"PATH=/tmp/evil:": "x"});
    refused(&b, "env.PATH=/tmp/evil:", "without `=`");

    // Nothing of it was deployed.
    let (s, _) = host.call("GET", "/v1/instances/hostile", None);
    assert_eq!(s, 404);
}
