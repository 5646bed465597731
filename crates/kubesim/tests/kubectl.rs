//! kubectl, a client nobody on the team wrote, against kubesim: get,
//! create, apply --server-side (with a conflict and a forced apply), label,
//! scale, set image, rollout restart, delete and `get -w`.
//!
//! Needs a kubectl binary: `KUBECTL=/path/to/kubectl` or `kubectl` on PATH
//! (`scripts/kubesim-prereqs.sh` installs one). Without it these tests fail.

use kubesim::machinery::WriteOptions;
use kubesim::resources::by_plural;
use kubesim::{Sim, SimConfig};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn kubectl_binary() -> PathBuf {
    if let Some(k) = std::env::var_os("KUBECTL").filter(|k| !k.is_empty()) {
        return PathBuf::from(k);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "kubectl not found: set KUBECTL=/path/to/kubectl or put kubectl on PATH \
                 (scripts/kubesim-prereqs.sh installs it)"
            )
        })
}

struct Kubectl {
    bin: PathBuf,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn new(sim: &Sim) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "kubesim-kubectl-{}-{}",
            std::process::id(),
            sim.addr().port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig).unwrap();
        Kubectl {
            bin: kubectl_binary(),
            dir,
            kubeconfig,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", self.dir.join("cache"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs kubectl, feeding `stdin`; returns (success, stdout, stderr).
    fn run_with(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut child = self.command(args).spawn().expect("spawn kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().expect("kubectl output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs kubectl and requires success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, "")
    }

    fn ok_with(&self, args: &[&str], stdin: &str) -> String {
        let (ok, out, err) = self.run_with(args, stdin);
        assert!(ok, "kubectl {args:?} failed:\n{out}\n{err}");
        out
    }
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn get(sim: &Sim, plural: &str, ns: &str, name: &str) -> Option<Value> {
    sim.machinery()
        .get(by_plural(plural).unwrap(), Some(ns), name)
        .ok()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: app
        image: registry/web:1.0
        ports:
        - containerPort: 8080
";

fn configmap(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: {value}\n  keep: \"yes\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_get_apply_label_scale_delete() {
    let sim = Sim::start(SimConfig::api_only()).await.unwrap();
    let k = std::sync::Arc::new(Kubectl::new(&sim));

    let kk = k.clone();
    let nodes = blocking(move || kk.ok(&["get", "nodes", "-o", "name"])).await;
    assert_eq!(
        nodes.lines().collect::<Vec<_>>(),
        ["node/node-0", "node/node-1", "node/node-2"]
    );
    let kk = k.clone();
    let table = blocking(move || kk.ok(&["get", "nodes"])).await;
    assert!(
        table.starts_with("NAME") && table.contains("Ready"),
        "{table}"
    );

    let kk = k.clone();
    let out = blocking(move || kk.ok_with(&["create", "-f", "-"], DEPLOYMENT)).await;
    assert_eq!(out.trim(), "deployment.apps/web created");
    let kk = k.clone();
    let json_out = blocking(move || kk.ok(&["get", "deployment", "web", "-o", "json"])).await;
    let d: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");

    // The strategic merge and merge patches kubectl builds.
    let kk = k.clone();
    blocking(move || {
        kk.ok(&["label", "deployment", "web", "tier=front"]);
        kk.ok(&["scale", "deployment", "web", "--replicas=5"]);
        kk.ok(&["set", "image", "deployment/web", "app=registry/web:2.0"]);
        kk.ok(&["rollout", "restart", "deployment/web"]);
    })
    .await;
    let d = get(&sim, "deployments", "default", "web").unwrap();
    assert_eq!(d["metadata"]["labels"]["tier"], "front");
    assert_eq!(d["spec"]["replicas"], 5);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry/web:2.0");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert!(
        d["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
            .is_string()
    );

    // Server-side apply: create, re-apply, conflict with another manager,
    // then force.
    let kk = k.clone();
    let out =
        blocking(move || kk.ok_with(&["apply", "--server-side", "-f", "-"], &configmap("a"))).await;
    assert_eq!(out.trim(), "configmap/settings serverside-applied");
    let kk = k.clone();
    let (ok, _, err) = blocking(move || {
        kk.run_with(
            &["apply", "--server-side", "--field-manager=ops", "-f", "-"],
            &configmap("b"),
        )
    })
    .await;
    assert!(!ok, "a conflicting apply must fail");
    assert!(
        err.contains("conflict with \"kubectl\"") && err.contains(".data.mode"),
        "{err}"
    );
    let kk = k.clone();
    blocking(move || {
        kk.ok_with(
            &[
                "apply",
                "--server-side",
                "--field-manager=ops",
                "--force-conflicts",
                "-f",
                "-",
            ],
            &configmap("b"),
        )
    })
    .await;
    let cm = get(&sim, "configmaps", "default", "settings").unwrap();
    assert_eq!(cm["data"]["mode"], "b");
    let managers: Vec<&str> = cm["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert_eq!(managers, ["kubectl", "ops"]);

    let kk = k.clone();
    let out = blocking(move || kk.ok(&["delete", "configmap", "settings"])).await;
    // Newer kubectl versions add " from default namespace".
    assert!(out.starts_with("configmap \"settings\" deleted"), "{out}");
    assert!(get(&sim, "configmaps", "default", "settings").is_none());
    let kk = k.clone();
    let (ok, _, err) = blocking(move || kk.run_with(&["get", "configmap", "settings"], "")).await;
    assert!(!ok && err.contains("NotFound"), "{err}");
}

/// Reads lines from a child's stdout until one satisfies `want` or the
/// deadline passes.
fn wait_for_line(rx: &mpsc::Receiver<String>, want: impl Fn(&str) -> bool, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if want(&line) => return line,
            Ok(_) => {}
            Err(_) => panic!("kubectl get -w never printed {what}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_follows_changes() {
    let sim = Sim::start(SimConfig::api_only()).await.unwrap();
    let k = Kubectl::new(&sim);
    let cms = by_plural("configmaps").unwrap();
    let opts = WriteOptions::default();
    sim.machinery()
        .create(
            cms,
            Some("default"),
            json!({"metadata": {"name": "first"}}),
            &opts,
        )
        .unwrap();

    let mut child = k
        .command(&["get", "configmaps", "-w", "--output-watch-events"])
        .spawn()
        .expect("spawn kubectl get -w");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let rx = blocking(move || {
        wait_for_line(&rx, |l| l.contains("first"), "the existing configmap");
        rx
    })
    .await;
    sim.machinery()
        .create(
            cms,
            Some("default"),
            json!({"metadata": {"name": "second"}, "data": {"a": "b"}}),
            &opts,
        )
        .unwrap();
    let rx = blocking(move || {
        let l = wait_for_line(&rx, |l| l.contains("second"), "the new configmap");
        assert!(l.starts_with("ADDED"), "{l}");
        rx
    })
    .await;
    sim.machinery()
        .delete(cms, Some("default"), "second", &Default::default())
        .unwrap();
    blocking(move || {
        let l = wait_for_line(&rx, |l| l.starts_with("DELETED"), "the deletion");
        assert!(l.contains("second"), "{l}");
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn kubeconfig_written_by_the_binary_interface_is_valid_yaml_for_kubectl() {
    // The kubeconfig is what other tools rely on; kubectl must accept it.
    let k = kubectl_binary();
    let dir = std::env::temp_dir().join(format!("kubesim-kc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: &Path = &dir.join("config");
    std::fs::write(path, kubesim::kubeconfig_yaml("http://127.0.0.1:1")).unwrap();
    let out = Command::new(k)
        .args([
            "config",
            "view",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ])
        .env("KUBECONFIG", path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "http://127.0.0.1:1");
}

/// With the controllers running, kubectl's own rollout tracking completes:
/// `create deployment`, `rollout status`, `set image`, `rollout status`
/// again, and `rollout history` shows both revisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_rollout_status_completes_against_the_controllers() {
    let sim = Sim::start(SimConfig::with_controllers()).await.unwrap();
    let k = std::sync::Arc::new(Kubectl::new(&sim));
    let kk = k.clone();
    let out = blocking(move || {
        kk.ok(&[
            "create",
            "deployment",
            "shop",
            "--image=registry/shop:1",
            "--replicas=3",
            "--port=8080",
        ])
    })
    .await;
    assert!(out.contains("deployment.apps/shop created"), "{out}");
    let kk = k.clone();
    let out =
        blocking(move || kk.ok(&["rollout", "status", "deployment/shop", "--timeout=30s"])).await;
    assert!(out.contains("successfully rolled out"), "{out}");
    let d = get(&sim, "deployments", "default", "shop").unwrap();
    assert_eq!(d["status"]["availableReplicas"], 3);

    let kk = k.clone();
    blocking(move || kk.ok(&["set", "image", "deployment/shop", "shop=registry/shop:2"])).await;
    let kk = k.clone();
    let out =
        blocking(move || kk.ok(&["rollout", "status", "deployment/shop", "--timeout=30s"])).await;
    assert!(out.contains("successfully rolled out"), "{out}");
    let d = get(&sim, "deployments", "default", "shop").unwrap();
    assert_eq!(d["status"]["updatedReplicas"], 3);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "2"
    );
    let kk = k.clone();
    let pods = blocking(move || {
        kk.ok(&[
            "get",
            "pods",
            "-l",
            "app=shop",
            "-o",
            "jsonpath={range .items[*]}{.spec.containers[0].image} {.status.phase}{\"\\n\"}{end}",
        ])
    })
    .await;
    let running_new = pods
        .lines()
        .filter(|l| *l == "registry/shop:2 Running")
        .count();
    assert!(running_new >= 3, "{pods}");
    let kk = k.clone();
    let history = blocking(move || kk.ok(&["rollout", "history", "deployment/shop"])).await;
    assert!(history.contains('1') && history.contains('2'), "{history}");

    // Undo goes back to the first template: its ReplicaSet comes back with
    // the next revision.
    let kk = k.clone();
    blocking(move || kk.ok(&["rollout", "undo", "deployment/shop"])).await;
    let kk = k.clone();
    let out =
        blocking(move || kk.ok(&["rollout", "status", "deployment/shop", "--timeout=30s"])).await;
    assert!(out.contains("successfully rolled out"), "{out}");
    let d = get(&sim, "deployments", "default", "shop").unwrap();
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry/shop:1"
    );
    let kk = k.clone();
    let rss = blocking(move || kk.ok(&["get", "rs", "-l", "app=shop", "-o", "name"])).await;
    assert_eq!(
        rss.lines().count(),
        2,
        "the old ReplicaSet is reused: {rss}"
    );
}
