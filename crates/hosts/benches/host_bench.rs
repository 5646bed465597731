//! The host daemon's figures, as one JSON line:
//! - deploy → ONLINE: from sending `PUT /v1/instances/NAME` (start: true) to
//!   healthcheck.html existing, for an app whose checkurl passes as soon as
//!   it listens; and the part of it that is keelson's (minus the time the
//!   app itself takes from exec to answering, measured alone);
//! - the daemon's RSS with N instances running, and a supervisor's RSS.
//!
//! `cargo bench -p keelson-hosts --bench host_bench [-- --smoke]`

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keelson_agent_lifecycle::http::{Request, send};
use serde_json::json;

const HOSTD: &str = env!("CARGO_BIN_EXE_keelson-hostd");
const APP: &str = env!("CARGO_BIN_EXE_keelson-hosts-testapp");
const TOKEN: &str = "bench-token";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn call(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let body = body.map(|b| serde_json::to_vec(b).unwrap());
    let auth = format!("Bearer {TOKEN}");
    let r = send(&Request {
        method,
        host: "127.0.0.1",
        port,
        path,
        headers: &[("Authorization", &auth)],
        body: body.as_deref(),
        timeout: Duration::from_secs(60),
        read_body: true,
    })
    .expect("daemon call");
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or_default(),
    )
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn wait_file(path: &Path, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if path.exists() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// Time from spawning the app to its first 200: the app's own share.
fn app_ready_ms() -> f64 {
    let port = free_port();
    let start = Instant::now();
    let mut child = Command::new(APP)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("app");
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    elapsed.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Cleanup {
    daemon: Child,
    state: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        keelson_agent_lifecycle::host::instance::kill_all(&self.state, Duration::from_secs(10));
    }
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let (rounds, instances) = if smoke { (3, 4) } else { (20, 20) };
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let port = free_port();
    let daemon = Command::new(HOSTD)
        .arg(format!("127.0.0.1:{port}"))
        .arg(&state)
        .arg(dir.path().join("token"))
        .arg("bench")
        .arg("127.0.0.1")
        .stdout(Stdio::null())
        .spawn()
        .expect("daemon");
    let daemon_pid = daemon.id();
    let _cleanup = Cleanup {
        daemon,
        state: state.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while send(&Request {
        method: "GET",
        host: "127.0.0.1",
        port,
        path: "/v1/host",
        headers: &[("Authorization", &format!("Bearer {TOKEN}"))],
        body: None,
        timeout: Duration::from_secs(1),
        read_body: false,
    })
    .map_or(true, |r| r.status != 200)
    {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let rss_idle = rss_kib(daemon_pid);

    let app_ready: Vec<f64> = {
        let mut v: Vec<f64> = (0..rounds).map(|_| app_ready_ms()).collect();
        v.sort_by(f64::total_cmp);
        v
    };

    let mut online = Vec::new();
    for i in 0..rounds.max(instances) {
        let app_port = free_port();
        let body = json!({
            "lifecycle": {
                "apiVersion": "keelson.dev/v1alpha1", "app": "bench", "env": "prod",
                "checkurl": {"port": app_port, "path": "/checkurl", "expectedStatus": 200, "timeoutSeconds": 1, "intervalSeconds": 1},
                "drainSeconds": 0, "stopTimeoutSeconds": 5, "liveness": "true"
            },
            "command": [APP, app_port.to_string()],
            "start": true,
        });
        let name = format!("bench-{i}");
        let marker = state
            .join("instances")
            .join(&name)
            .join("run/healthcheck.html");
        let start = Instant::now();
        let (status, v) = call(port, "PUT", &format!("/v1/instances/{name}"), Some(&body));
        assert_eq!(status, 201, "{v}");
        let waited = wait_file(&marker, Duration::from_secs(20)).expect("online");
        if i < rounds {
            online.push((start.elapsed().max(waited)).as_secs_f64() * 1000.0);
        }
    }
    online.sort_by(f64::total_cmp);
    let median_online = percentile(&online, 0.5);
    let median_app = percentile(&app_ready, 0.5);

    let (_, views) = call(port, "GET", "/v1/instances", None);
    let running = views
        .as_array()
        .map_or(0, |a| a.iter().filter(|v| v["phase"] == "online").count());
    let supervisor_rss: Vec<u64> = views
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["supervisor_pid"].as_u64())
        .map(|p| rss_kib(p as u32))
        .collect();
    let rss_loaded = rss_kib(daemon_pid);
    let supervisor_median = {
        let mut s = supervisor_rss.clone();
        s.sort_unstable();
        s.get(s.len() / 2).copied().unwrap_or(0)
    };
    // Stopping is part of the lifecycle too: time the whole offline sequence.
    let stop_start = Instant::now();
    let (status, _) = call(port, "POST", "/v1/instances/bench-0/stop", None);
    assert_eq!(status, 200);
    let stop_ms = stop_start.elapsed().as_secs_f64() * 1000.0;

    println!(
        "{}",
        json!({
            "bench": "host_daemon",
            "smoke": smoke,
            "rounds": rounds,
            "deploy_to_online_ms": {"median": median_online, "p90": percentile(&online, 0.9), "max": online[online.len() - 1]},
            "app_exec_to_ready_ms": {"median": median_app},
            "keelson_overhead_ms_median": median_online - median_app,
            "overhead_goal_ms": 50,
            "stop_ms": stop_ms,
            "instances_online": running,
            "daemon_rss_kib": {"idle": rss_idle, "with_instances": rss_loaded},
            "supervisor_rss_kib_median": supervisor_median,
        })
    );
}
