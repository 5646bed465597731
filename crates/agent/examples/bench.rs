//! Figures for keelson-agent's size and cost claims, printed as one JSON line:
//! the stripped static binary's size (goal ≤ 6 MiB), the sidecar's idle RSS
//! once online (goal ≤ 5 MiB) and the wall time of `probe` for a local http
//! check, process start included (goal ≤ 5 ms).
//!
//! ```text
//! cargo run --release -p keelson-agent --example bench -- [--smoke] [--agent PATH]
//! ```
//!
//! Without `--agent` it builds the static binary with `scripts/build-agent.sh`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keelson_agent_lifecycle::http::{ServerResponse, serve};
use serde_json::json;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let agent = match args.iter().position(|a| a == "--agent") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--agent needs a path")?),
        None => build_static()?,
    };
    let (probe_runs, idle) = if smoke {
        (20, Duration::from_secs(1))
    } else {
        (300, Duration::from_secs(10))
    };

    let binary_bytes = std::fs::metadata(&agent)
        .map_err(|e| format!("{}: {e}", agent.display()))?
        .len();
    let static_binary = Command::new("readelf")
        .arg("-d")
        .arg(&agent)
        .output()
        .map(|o| !String::from_utf8_lossy(&o.stdout).contains("NEEDED"))
        .unwrap_or(false);

    // A local app that is healthy at once.
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let app_port = listener.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || serve(listener, |_| ServerResponse::text(200, "ok")));

    let (rss_kib, hwm_kib) = sidecar_idle_rss(&agent, app_port, idle)?;
    let mut probe_ms = probe_times(&agent, app_port, probe_runs)?;
    probe_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| probe_ms[((probe_ms.len() - 1) as f64 * p).round() as usize];

    let mib = |b: f64| (b / (1024.0 * 1024.0) * 100.0).round() / 100.0;
    println!(
        "{}",
        json!({
            "bench": "keelson-agent",
            "smoke": smoke,
            "binary_bytes": binary_bytes,
            "binary_mib": mib(binary_bytes as f64),
            "binary_static": static_binary,
            "sidecar_idle_rss_kib": rss_kib,
            "sidecar_idle_rss_mib": mib(rss_kib as f64 * 1024.0),
            "sidecar_peak_rss_kib": hwm_kib,
            "sidecar_idle_s": idle.as_secs(),
            "probe_http_runs": probe_runs,
            "probe_http_ms_p50": (pct(0.5) * 100.0).round() / 100.0,
            "probe_http_ms_p95": (pct(0.95) * 100.0).round() / 100.0,
            "goals": {"binary_mib": 6, "sidecar_idle_rss_mib": 5, "probe_http_ms": 5},
        })
    );
    Ok(())
}

fn build_static() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-agent.sh");
    let out = Command::new("sh")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed", script.display()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().unwrap_or_default().trim();
    Ok(PathBuf::from(path))
}

/// Starts the sidecar against an app that is healthy, waits until it is
/// online, lets it idle, and reads its resident set (VmRSS, VmHWM) in KiB.
fn sidecar_idle_rss(agent: &Path, app_port: u16, idle: Duration) -> Result<(u64, u64), String> {
    let dir = std::env::temp_dir().join(format!("keelson-agent-bench-{}", std::process::id()));
    let root = dir.join("keelson");
    std::fs::create_dir_all(root.join("config")).map_err(|e| e.to_string())?;
    let doc = json!({
        "apiVersion": "keelson.dev/v1alpha1",
        "app": "bench", "env": "test",
        "checkurl": {"port": app_port, "path": "/checkurl", "expectedStatus": 200,
                     "timeoutSeconds": 1, "intervalSeconds": 1},
        "drainSeconds": 0, "stopTimeoutSeconds": 5,
        "hooks": {"preOnline": {"run": {"command": "echo warm"}, "timeoutSeconds": 5}},
        "liveness": format!("http({app_port}, \"/checkurl\") == 200"),
    });
    std::fs::write(root.join("config/lifecycle.json"), doc.to_string())
        .map_err(|e| e.to_string())?;
    // The app process the sidecar follows: this benchmark itself.
    std::fs::create_dir_all(root.join("run")).map_err(|e| e.to_string())?;
    let me = keelson_agent_lifecycle::process::AppProcess::current().ok_or("no /proc")?;
    std::fs::write(
        root.join("run/app.json"),
        serde_json::to_vec(&me).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let mut sidecar = Command::new(agent)
        .arg("--root")
        .arg(&root)
        .arg("sidecar")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the sidecar: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !root.join("run/healthcheck.html").exists() {
        if Instant::now() > deadline {
            let _ = sidecar.kill();
            return Err("the sidecar did not go online".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(idle);
    let status = std::fs::read_to_string(format!("/proc/{}/status", sidecar.id()))
        .map_err(|e| e.to_string())?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let figures = (field("VmRSS:"), field("VmHWM:"));
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(figures)
}

/// Wall time of `keelson-agent probe 'http(PORT, "/checkurl") == 200'`, in ms.
fn probe_times(agent: &Path, app_port: u16, runs: usize) -> Result<Vec<f64>, String> {
    let expr = format!("http({app_port}, \"/checkurl\") == 200");
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let status = Command::new(agent)
            .arg("probe")
            .arg(&expr)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if !status.success() {
            return Err(format!("probe failed: {status}"));
        }
    }
    Ok(times)
}
