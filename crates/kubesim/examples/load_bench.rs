//! Loads kubesim with many namespaces and realistic pods, then prints one
//! JSON line: `{namespaces, pods, load_seconds, rss_mib, list_one_app_ms,
//! bytes_per_pod, stored_bytes_per_pod}`: a pod's JSON size and what the
//! store keeps for it (compressed). `list_one_app_ms` is the median time for kube-rs to list
//! one app's pods by label selector across all namespaces over HTTP
//! (`list_one_app_store_ms`: the same selection in-process, without HTTP).
//!
//! `cargo run --release -p kubesim --example load_bench -- [--smoke]`
//! (full: 10,000 namespaces and 100,000 pods; smoke: 100 and 1,000;
//! `--namespaces N --pods N` for other sizes).

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, Config};
use kubesim::machinery::WriteOptions;
use kubesim::resources::ids;
use kubesim::{Sim, SimConfig};
use serde_json::{Value, json};
use std::time::Instant;

const APPS: usize = 2_000;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A pod as keelson renders it: init container, app and sidecar, probes,
/// env, volumes, owner reference, and the status a kubelet reports.
fn pod(ns: &str, app: &str, i: usize) -> Value {
    let name = format!("{app}-blue-7d9f8c6b5-{i:05}");
    let env: Vec<Value> = (0..4)
        .map(|e| json!({"name": format!("APP_SETTING_{e}"), "value": format!("value-{e}-{app}")}))
        .collect();
    let mounts = json!([
        {"name": "keelson", "mountPath": "/keelson"},
        {"name": "lifecycle", "mountPath": "/etc/keelson", "readOnly": true},
        {"name": "podinfo", "mountPath": "/etc/podinfo", "readOnly": true},
        {"name": "token", "mountPath": "/var/run/secrets/keelson", "readOnly": true}
    ]);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns,
            "labels": {
                "app.kubernetes.io/name": app, "app.kubernetes.io/instance": format!("{app}-prod"),
                "app.kubernetes.io/managed-by": "keelson", "keelson.dev/track": "blue",
                "keelson.dev/traffic": "online", "keelson.dev/env": "prod", "pod-template-hash": "7d9f8c6b5"
            },
            "annotations": {"keelson.dev/revision": "42", "keelson.dev/release": format!("rel-{i}")},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-blue-7d9f8c6b5"),
                "uid": format!("0b6c3e9a-0000-4000-8000-{:012}", i % 1000), "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "nodeName": format!("node-{}", i % 3),
            "serviceAccountName": format!("{app}-prod"),
            "shareProcessNamespace": true,
            "initContainers": [{"name": "keelson-init", "image": "registry.example.com/keelson/agent:1.4.2",
                "command": ["/keelson-agent", "init", "--copy-to", "/keelson"], "volumeMounts": mounts,
                "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}}}],
            "containers": [
                {"name": "app", "image": format!("registry.example.com/apps/{app}:2024.11.3"),
                 "command": ["/keelson/bin/keelson-agent", "entrypoint", "--", "/app/bin/server", "--port", "8080"],
                 "ports": [{"name": "http", "containerPort": 8080}, {"name": "debug", "containerPort": 5005}],
                 "env": env, "volumeMounts": mounts,
                 "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
                 "livenessProbe": {"exec": {"command": ["/keelson/bin/keelson-agent", "probe", "liveness"]}, "periodSeconds": 10, "failureThreshold": 6},
                 "startupProbe": {"httpGet": {"path": "/checkurl", "port": 8080}, "periodSeconds": 5, "failureThreshold": 120},
                 "lifecycle": {"preStop": {"exec": {"command": ["/keelson/bin/keelson-agent", "offline", "--wait"]}}}},
                {"name": "keelson-sidecar", "image": format!("registry.example.com/apps/{app}:2024.11.3"),
                 "command": ["/keelson/bin/keelson-agent", "sidecar"], "volumeMounts": mounts,
                 "ports": [{"name": "ready", "containerPort": 9901}],
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": 9901}, "periodSeconds": 2},
                 "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}}}
            ],
            "volumes": [
                {"name": "keelson", "emptyDir": {}},
                {"name": "lifecycle", "configMap": {"name": format!("{app}-lifecycle-5f2a9c")}},
                {"name": "podinfo", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"audience": "keelson", "expirationSeconds": 3600, "path": "token"}}]}}
            ],
            "terminationGracePeriodSeconds": 90
        }
    })
}

fn status(i: usize) -> Value {
    let t = "2024-11-03T10:00:00Z";
    json!({"status": {
        "phase": "Running", "podIP": format!("10.244.{}.{}", (i / 250) % 256, i % 250 + 2),
        "podIPs": [{"ip": format!("10.244.{}.{}", (i / 250) % 256, i % 250 + 2)}],
        "hostIP": format!("10.0.0.{}", i % 3 + 1), "startTime": t, "qosClass": "Burstable",
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": t},
            {"type": "Ready", "status": "True", "lastTransitionTime": t},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": t},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": t}
        ],
        "containerStatuses": [
            {"name": "app", "ready": true, "restartCount": 0, "started": true, "image": "registry.example.com/apps/app:2024.11.3",
             "imageID": "registry.example.com/apps/app@sha256:4f3c2b1a", "containerID": format!("containerd://{i:064}"),
             "state": {"running": {"startedAt": t}}},
            {"name": "keelson-sidecar", "ready": true, "restartCount": 0, "started": true, "image": "registry.example.com/apps/app:2024.11.3",
             "imageID": "registry.example.com/apps/app@sha256:4f3c2b1a", "containerID": format!("containerd://{:064}", i + 1),
             "state": {"running": {"startedAt": t}}}
        ]
    }})
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let (namespaces, pods) = if smoke {
        (100, 1_000)
    } else {
        (10_000, 100_000)
    };
    let (namespaces, pods) = (
        flag("--namespaces").unwrap_or(namespaces),
        flag("--pods").unwrap_or(pods),
    );
    let sim = Sim::start(SimConfig::api_only()).await?;
    let m = sim.machinery().clone();
    let opts = WriteOptions {
        field_manager: Some("kubelet".into()),
        ..Default::default()
    };
    let base_rss = rss_mib();
    let start = Instant::now();
    let mut bytes = 0usize;
    for n in 0..namespaces {
        m.create(
            ids::NAMESPACES,
            None,
            json!({"metadata": {"name": format!("team-{n:05}")}}),
            &opts,
        )?;
    }
    for i in 0..pods {
        let ns = format!("team-{:05}", i % namespaces);
        let app = format!("app-{:04}", i % APPS);
        let created = m.create(ids::PODS, Some(&ns), pod(&ns, &app, i), &opts)?;
        let name = created["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let running = m.patch(
            ids::PODS,
            Some(&ns),
            &name,
            kubesim::machinery::PatchKind::Merge,
            &status(i),
            kubesim::machinery::Sub::Status,
            &opts,
        )?;
        if i < 1000 {
            bytes += serde_json::to_vec(&running)?.len();
        }
    }
    let load_seconds = start.elapsed().as_secs_f64();
    let stored = m.store().stored_bytes(ids::PODS);
    let rss = rss_mib();

    let mut config = Config::new(sim.base_url().parse()?);
    config.read_timeout = Some(std::time::Duration::from_secs(120));
    let client = Client::try_from(config)?;
    let api: Api<Pod> = Api::all(client);
    let lp =
        ListParams::default().labels("app.kubernetes.io/name=app-0007,keelson.dev/traffic=online");
    let mut times = Vec::new();
    let mut found = 0;
    for _ in 0..5 {
        let t = Instant::now();
        found = api.list(&lp).await?.items.len();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    // The same selection inside the process: the store's share of the time.
    let q = kubesim::machinery::ListOptions {
        labels: kubesim::selectors::LabelSelector::parse(
            "app.kubernetes.io/name=app-0007,keelson.dev/traffic=online",
        )?,
        ..Default::default()
    };
    let mut store_times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let n = m.list(ids::PODS, None, &q)?.items.len();
        store_times.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(n == found, "in-process list found {n}, HTTP {found}");
    }
    store_times.sort_by(f64::total_cmp);
    let expected = (0..pods).filter(|i| i % APPS == 7).count();
    anyhow::ensure!(
        found == expected,
        "listed {found} pods of app-0007, expected {expected}"
    );
    println!(
        "{}",
        json!({
            "namespaces": namespaces,
            "pods": pods,
            "load_seconds": (load_seconds * 100.0).round() / 100.0,
            "rss_mib": ((rss - base_rss).max(0.0) + base_rss).round(),
            "rss_base_mib": base_rss.round(),
            "list_one_app_ms": (times[times.len() / 2] * 100.0).round() / 100.0,
            "list_one_app_pods": found,
            "list_one_app_store_ms": (store_times[store_times.len() / 2] * 1000.0).round() / 1000.0,
            "bytes_per_pod": bytes / pods.min(1000),
            "stored_bytes_per_pod": stored / pods.max(1),
        })
    );
    sim.shutdown().await?;
    Ok(())
}
