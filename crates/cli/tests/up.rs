//! `keelson up --demo` as a new user runs it: the server, three local host
//! daemons and the Java demo, built with javac and released to a second
//! version in three batches; plain `keelson` commands reach it through the
//! CLI config it writes; SIGTERM stops every instance through its stop
//! lifecycle, and the next `keelson up --demo` brings them back and releases
//! the other version.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const KEELSON: &str = env!("CARGO_BIN_EXE_keelson");

/// A running `keelson up`, its output lines arriving on a channel.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    fn start(data: &Path, config: &Path, port: u16) -> Up {
        let mut child = Command::new(KEELSON)
            .args(["up", "--demo", "--port", &port.to_string(), "--data-dir"])
            .arg(data)
            .env("KEELSON_CONFIG", config)
            .env_remove("KEELSON_SERVER")
            .env_remove("KEELSON_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("up: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Up {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `text`.
    fn wait_for(&mut self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no line with {text:?} within {within:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends SIGTERM and waits for the exit; the rest of the output.
    fn terminate(mut self) -> (i32, String) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "keelson up did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut rest = String::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            rest.push_str(&line);
            rest.push('\n');
        }
        (status.code().unwrap_or(-1), rest)
    }
}

/// A port P such that P, P+1 and P+2 are free on the addresses `up` uses.
fn free_ports() -> u16 {
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port > 65000 {
            continue;
        }
        let free = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
            .iter()
            .all(|a| (0..3).all(|d| TcpListener::bind((*a, port + d)).is_ok()));
        if free {
            return port;
        }
    }
    panic!("no free ports");
}

fn get(address: &str, port: u16) -> Option<String> {
    let mut stream = TcpStream::connect((address, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split("\r\n\r\n").nth(1).map(str::to_string)
}

fn status_json(config: &Path) -> serde_json::Value {
    let out = Command::new(KEELSON)
        .args(["release", "status", "demo", "--env", "local", "-o", "json"])
        .env("KEELSON_CONFIG", config)
        .env_remove("KEELSON_SERVER")
        .env_remove("KEELSON_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The hook log's lines of one host, as `step,version`.
fn hooks_of(log: &str, host: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.strip_prefix(&format!("{host},")))
        .map(str::to_string)
        .collect()
}

fn check_release(config: &Path, port: u16, version: &str) {
    let status = status_json(config);
    assert_eq!(status["status"], "succeeded", "{status:#}");
    assert_eq!(status["summary"]["batches"], 3, "{status:#}");
    let instances = status["summary"]["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 3, "{status:#}");
    for i in instances {
        assert_eq!(i["version"], version, "{status:#}");
    }
    for address in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let body = get(address, port + 2).unwrap_or_default();
        assert!(
            body.starts_with(&format!("demo {version} on {address}:{}", port + 2)),
            "{address}: {body:?}"
        );
    }
}

#[test]
fn up_demo_releases_a_java_app_on_three_local_hosts_and_stops_it_through_its_lifecycle() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = tmp.path().join("config.yaml");
    let hook_log = data.join("demo/hooks.log");
    let port = free_ports();

    let mut up = Up::start(&data, &config, port);
    up.wait_for("keelson is up", Duration::from_secs(30));
    up.wait_for("first deployment of 1.0.0", Duration::from_secs(60));
    up.wait_for("releasing 2.0.0 in 3 batches", Duration::from_secs(120));
    // Hook output arrives live in the progress.
    up.wait_for("preOnline: warming up demo 2.0.0", Duration::from_secs(120));
    up.wait_for("keelson keeps running", Duration::from_secs(120));
    check_release(&config, port, "2.0.0");
    let (code, rest) = up.terminate();
    assert_eq!(code, 0, "{rest}");
    assert_eq!(rest.matches("demo-local-blue stopped").count(), 3, "{rest}");
    let log = std::fs::read_to_string(&hook_log).unwrap();
    for host in ["local-1", "local-2", "local-3"] {
        assert_eq!(
            hooks_of(&log, host),
            [
                "preStart,1.0.0",
                "preOnline,1.0.0",
                "preOffline,1.0.0",
                "preStart,2.0.0",
                "preOnline,2.0.0",
                "preOffline,2.0.0",
            ],
            "{log}"
        );
        let address = format!("127.0.0.{}", &host[6..].parse::<u8>().unwrap() + 1);
        assert!(
            get(&address, port + 2).is_none(),
            "{host}'s demo still answers"
        );
    }

    // The next start brings the stopped instances back and releases the
    // other version; the admin token and CLI config stay valid.
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let mut up = Up::start(&data, &config, port);
    up.wait_for("started again", Duration::from_secs(30));
    up.wait_for("releasing 1.0.0 in 3 batches", Duration::from_secs(120));
    up.wait_for("keelson keeps running", Duration::from_secs(120));
    check_release(&config, port, "1.0.0");
    assert_eq!(
        std::fs::read_to_string(data.join("admin.token")).unwrap(),
        token
    );
    let (code, rest) = up.terminate();
    assert_eq!(code, 0, "{rest}");
    let log = std::fs::read_to_string(&hook_log).unwrap();
    for host in ["local-1", "local-2", "local-3"] {
        assert_eq!(
            hooks_of(&log, host)[6..],
            [
                "preStart,2.0.0",
                "preOnline,2.0.0",
                "preOffline,2.0.0",
                "preStart,1.0.0",
                "preOnline,1.0.0",
                "preOffline,1.0.0",
            ],
            "{log}"
        );
    }
}
