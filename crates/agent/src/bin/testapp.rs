//! A tiny HTTP app for the pod harness and the benchmark.
//!
//! `keelson-testapp PORT HEALTHY_AFTER_MS EVENTS_FILE`: `/checkurl` answers
//! 503 until HEALTHY_AFTER_MS have passed, then 200; `/work` answers 200;
//! `/exit` makes it exit with status 3 at once (a crash). It listens on
//! `KEELSON_BIND_ADDRESS` (default 127.0.0.1).
//! On SIGTERM it appends `app:sigterm` to EVENTS_FILE, keeps serving for a
//! moment (a graceful stop), appends `app:exit` and exits.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn append(path: &str, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(port), Some(delay), Some(events)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: keelson-testapp PORT HEALTHY_AFTER_MS EVENTS_FILE");
        std::process::exit(2);
    };
    let delay = Duration::from_millis(delay.parse().unwrap_or(0));
    let events = events.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone());
    // On hosts the daemon says which loopback address stands for this VM.
    let address = std::env::var("KEELSON_BIND_ADDRESS").unwrap_or_else(|_| "127.0.0.1".into());
    let listener = match TcpListener::bind((address.as_str(), port.parse().unwrap_or(0))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("testapp: cannot listen on {port}: {e}");
            std::process::exit(1);
        }
    };
    let _ = listener.set_nonblocking(true);
    let started = Instant::now();
    append(&events, &format!("app:start:{}", std::process::id()));
    println!("testapp listening on {port}");
    let mut stopping_since: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) && stopping_since.is_none() {
            append(&events, "app:sigterm");
            println!("testapp got SIGTERM, finishing requests");
            stopping_since = Some(Instant::now());
        }
        if stopping_since.is_some_and(|s| s.elapsed() > Duration::from_millis(300)) {
            append(&events, "app:exit");
            println!("testapp exiting");
            return;
        }
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let n = stream.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                if path == "/exit" {
                    // A crash on demand, for restart tests.
                    append(&events, "app:crash");
                    std::process::exit(3);
                }
                let status = match path {
                    "/checkurl" if started.elapsed() >= delay => "200 OK",
                    "/checkurl" => "503 Service Unavailable",
                    "/work" => "200 OK",
                    _ => "404 Not Found",
                };
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                    )
                    .as_bytes(),
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}
