//! `keelson host add|list|instances` against a stand-in for keelson's
//! `/api/v1/targets` (the registry calls the CLI makes) and a real host
//! daemon.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keelson_agent_lifecycle::http::{ServerResponse, serve};
use keelson_hosts::cli::{
    AddArgs, Format, HostCommand, InstancesArgs, ListArgs, ServerConnection, execute,
};
use keelson_store::{NewTarget, Target, Timestamp};

const HOSTD: &str = env!("CARGO_BIN_EXE_keelson-hostd");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Targets in memory behind the same routes and bodies as keelson's API;
/// requests without the admin token are refused.
fn targets_api() -> (String, Arc<Mutex<Vec<Target>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let targets: Arc<Mutex<Vec<Target>>> = Arc::default();
    let store = targets.clone();
    std::thread::spawn(move || {
        serve(listener, move |req| {
            if req.header("authorization") != Some("Bearer admin-token") {
                return ServerResponse::json(
                    401,
                    &serde_json::json!({"error": {"code": "unauthorized", "message": "a token is required"}}),
                );
            }
            let mut targets = store.lock().unwrap();
            match (req.method.as_str(), req.path.as_str()) {
                ("GET", "/api/v1/targets") => {
                    ServerResponse::json(200, &serde_json::json!({"items": *targets}))
                }
                ("POST", "/api/v1/targets") => {
                    let spec: NewTarget = serde_json::from_slice(&req.body).unwrap();
                    let target = Target {
                        spec,
                        created_at: Timestamp(1_800_000_000_000),
                        updated_at: Timestamp(1_800_000_000_000),
                    };
                    targets.retain(|t| t.spec.name != target.spec.name);
                    targets.push(target.clone());
                    ServerResponse::json(200, &serde_json::to_value(&target).unwrap())
                }
                _ => ServerResponse::text(404, "no"),
            }
        })
    });
    (url, targets)
}

struct Daemon(Child, std::path::PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        keelson_agent_lifecycle::host::instance::kill_all(&self.1, Duration::from_secs(10));
    }
}

fn connection(server: &str, token: &str) -> ServerConnection {
    ServerConnection {
        server: Some(server.into()),
        token: Some(token.into()),
    }
}

async fn run(command: HostCommand) -> anyhow::Result<String> {
    let mut out = Vec::new();
    execute(command, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

#[tokio::test]
async fn host_add_list_and_instances() {
    let (server, targets) = targets_api();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vm-1.token");
    std::fs::write(&token_file, "t0k3n").unwrap();
    let port = free_port();
    let _daemon = Daemon(
        Command::new(HOSTD)
            .arg(format!("127.0.0.1:{port}"))
            .arg(dir.path().join("state"))
            .arg(&token_file)
            .arg("vm-1")
            .arg("127.0.0.1")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
        dir.path().join("state"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }

    let add = |name: &str, address: String, token: &str| {
        HostCommand::Add(AddArgs {
            name: name.into(),
            group: "web".into(),
            address,
            token_file: token_file.clone(),
            connection: connection(&server, token),
        })
    };
    let out = run(add(
        "vm-1",
        format!("http://127.0.0.1:{port}"),
        "admin-token",
    ))
    .await
    .unwrap();
    assert_eq!(
        out,
        format!("host vm-1 registered in group web at http://127.0.0.1:{port}\n")
    );
    // A second host whose daemon does not answer.
    let dead = free_port();
    run(add(
        "vm-2",
        format!("http://127.0.0.1:{dead}"),
        "admin-token",
    ))
    .await
    .unwrap();
    let err = run(add("vm-3", "ftp://x".into(), "admin-token"))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("address: `ftp://x` is not a daemon address"),
        "{err}"
    );
    let err = run(add("vm-3", "http://x:1".into(), "wrong"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("HTTP 401: a token is required"),
        "{err}"
    );
    assert_eq!(targets.lock().unwrap().len(), 1);

    let list = |output| {
        HostCommand::List(ListArgs {
            no_check: false,
            output,
            connection: connection(&server, "admin-token"),
        })
    };
    let table = run(list(Format::Table)).await.unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME  GROUP  ADDRESS"), "{table}");
    assert!(
        lines[1].starts_with("vm-1  web") && lines[1].contains(" up "),
        "{table}"
    );
    assert!(
        lines[2].starts_with("vm-2  web") && lines[2].contains(" down "),
        "{table}"
    );
    assert!(lines[2].contains("cannot reach host `vm-2`"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&run(list(Format::Json)).await.unwrap()).unwrap();
    assert_eq!(json[1]["health"]["status"], "down");
    assert_eq!(json[1]["group"], "web");
    let since = json[1]["health"]["since"].as_str().unwrap().to_string();
    // Still down on the next look: since is unchanged.
    let again: serde_json::Value =
        serde_json::from_str(&run(list(Format::Json)).await.unwrap()).unwrap();
    assert_eq!(again[1]["health"]["since"], since.as_str());

    let instances = |name: &str| {
        HostCommand::Instances(InstancesArgs {
            name: name.into(),
            output: Format::Table,
            connection: connection(&server, "admin-token"),
        })
    };
    let out = run(instances("vm-1")).await.unwrap();
    assert_eq!(
        out.trim(),
        "NAME  APP  ENV  STATE  PHASE  ONLINE  PID  RESTARTS  ADDRESS"
    );
    let client =
        keelson_hosts::HostClient::new("vm-1", &format!("http://127.0.0.1:{port}"), "t0k3n")
            .unwrap();
    let request: keelson_agent_lifecycle::host::api::DeployRequest = serde_json::from_value(serde_json::json!({
        "lifecycle": {
            "apiVersion": "keelson.dev/v1alpha1", "app": "orders", "env": "prod",
            "checkurl": {"port": 1, "path": "/", "expectedStatus": 200, "timeoutSeconds": 1, "intervalSeconds": 1},
            "drainSeconds": 0, "stopTimeoutSeconds": 5, "liveness": "true"
        },
        "command": ["/bin/true"],
    }))
    .unwrap();
    client.deploy("orders-1", &request).await.unwrap();
    let out = run(instances("vm-1")).await.unwrap();
    assert_eq!(
        out.lines().nth(1),
        Some("orders-1  orders  prod  stopped  -      no      -    0         127.0.0.1"),
        "{out}"
    );
    let err = run(instances("vm-9")).await.unwrap_err();
    assert_eq!(err.to_string(), "no host named `vm-9` is registered");
    let err = run(instances("vm-2")).await.unwrap_err();
    assert!(
        err.to_string().starts_with("cannot reach host `vm-2`"),
        "{err}"
    );
}
