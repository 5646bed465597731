//! The server commands through the `keelson` binary: bootstrap a token,
//! serve on SQLite, apply and read profiles with the client commands.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEELSON: &str = env!("CARGO_BIN_EXE_keelson");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ready(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

fn client(addr: &str, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(KEELSON)
        .args(args)
        .current_dir(ROOT)
        .env("KEELSON_SERVER", format!("http://{addr}"))
        .env("KEELSON_TOKEN", token)
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn apply_get_and_history_through_a_served_sqlite_database() {
    let dir = std::env::temp_dir().join(format!("keelson-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let database = format!("sqlite://{}/keelson.db", dir.display());
    let out = Command::new(KEELSON)
        .args([
            "token",
            "create",
            "--database",
            &database,
            "--role",
            "admin",
            "--subject",
            "ops",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    assert!(token.starts_with("kst_"), "{token}");

    let addr = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let _server = Server(
        Command::new(KEELSON)
            .args(["serve", "--listen", &addr, "--database", &database])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready(&addr) {
        assert!(
            Instant::now() < deadline,
            "the server did not become ready on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (code, stdout, stderr) =
        client(&addr, &token, &["apply", "-f", "examples/orders/app.yaml"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("orders created (revision 1)"), "{stdout}");
    let (code, stdout, _) = client(&addr, &token, &["apply", "-f", "examples/orders/app.yaml"]);
    assert_eq!(code, 0);
    assert!(
        !stdout.contains("revision 2"),
        "an identical profile makes no revision: {stdout}"
    );

    let (code, _, stderr) = client(
        &addr,
        &token,
        &["apply", "-f", "examples/invalid/02-java-headroom.yaml"],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("spec.environments.prod.resources.limits.memory"),
        "{stderr}"
    );

    let (code, stdout, _) = client(&addr, &token, &["get", "app", "orders", "-o", "json"]);
    assert_eq!(code, 0);
    let app: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(app.to_string().contains("\"payments\""), "{app}");

    let (code, _, stderr) = client(&addr, "kst_not-a-token", &["get", "apps"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("401"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
