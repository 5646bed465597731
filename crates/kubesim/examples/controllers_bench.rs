//! The controllers under load. Creates Deployments × 3 replicas through
//! kube-rs with instant readiness (no start or ready delay), and prints one
//! JSON line: how long until every Deployment reports Available with all
//! replicas, and the delay from a pod turning Ready (the kubelet's write,
//! seen in-process the moment the store publishes it) to the watch event
//! reaching a kube-rs client over HTTP (p50, p99, max) during that load;
//! then the same delay with the cluster quiet (`quiet_…`: 100 pods, one at
//! a time, turned unready and ready again with `set_ready`).
//!
//! `cargo run --release -p kubesim --example controllers_bench -- [--smoke]`
//! (full: 1,000 Deployments; smoke: 50; `--deployments N` for other sizes;
//! `--no-events` without Events).

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::{Client, Config};
use kubesim::controllers::ControllerConfig;
use kubesim::resources::ids;
use kubesim::{Sim, SimConfig};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const REPLICAS: i64 = 3;
const NAMESPACES: usize = 10;

fn is_ready(p: &serde_json::Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(|c| c.as_array())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut deployments = if args.iter().any(|a| a == "--smoke") {
        50
    } else {
        1_000
    };
    if let Some(i) = args.iter().position(|a| a == "--deployments") {
        deployments = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(deployments);
    }
    let sim = Sim::start(SimConfig {
        watch_window: 200_000,
        controllers: Some(ControllerConfig {
            start_delay: Duration::ZERO,
            ready_delay: Duration::ZERO,
            events: !args.iter().any(|a| a == "--no-events"),
            ..ControllerConfig::default()
        }),
        ..SimConfig::default()
    })
    .await?;
    let client = Client::try_from(Config::new(sim.base_url().parse()?))?;
    let m = sim.machinery().clone();
    for n in 0..NAMESPACES {
        m.create(
            ids::NAMESPACES,
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("bench-{n}")}}),
            &Default::default(),
        )?;
    }

    // In-process: when each pod turned Ready, by resourceVersion.
    let turned_ready: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    {
        let store = m.store().clone();
        let turned_ready = turned_ready.clone();
        let mut rx = store.subscribe();
        let mut last = store.current_rv();
        tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                rx.borrow_and_update();
                out.clear();
                if let Ok(rv) = store.events_after(ids::PODS, last, &mut out) {
                    last = rv;
                }
                let now = Instant::now();
                for e in &out {
                    let was = e.prev.as_ref().is_some_and(|p| is_ready(&p.value()));
                    if !was && is_ready(&e.obj.value()) {
                        turned_ready.lock().unwrap().insert(e.rv, now);
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    // Over HTTP: when each pod event reached the client, by resourceVersion.
    let received: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    {
        let pods: Api<Pod> = Api::all(client.clone());
        let received = received.clone();
        let mut stream = pods
            .watch(&WatchParams::default().timeout(290), "0")
            .await?
            .boxed();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = stream.next().await {
                let now = Instant::now();
                if let WatchEvent::Modified(p) = ev
                    && let Some(rv) = p.metadata.resource_version.and_then(|r| r.parse().ok())
                {
                    received.lock().unwrap().insert(rv, now);
                }
            }
        });
    }

    let start = Instant::now();
    let mut creates = futures_util::stream::iter(0..deployments)
        .map(|i| {
            let client = client.clone();
            async move {
                let ns = format!("bench-{}", i % NAMESPACES);
                let name = format!("app-{i}");
                let api: Api<Deployment> = Api::namespaced(client, &ns);
                let d: Deployment = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": name}},
                        "template": {"metadata": {"labels": {"app": name}},
                            "spec": {"containers": [{"name": "app", "image": "registry/app:1",
                                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8901}}}]}}}
                }))
                .expect("deployment");
                api.create(&PostParams::default(), &d).await.map(|_| ())
            }
        })
        .buffer_unordered(16);
    while let Some(r) = creates.next().await {
        r?;
    }
    let created_secs = start.elapsed().as_secs_f64();
    // Wait until every Deployment is Available with all replicas (read
    // in-process, so the wait adds no load).
    let deadline = start + Duration::from_secs(600);
    loop {
        let mut done = 0;
        let _ = m.store().scan(ids::DEPLOYMENTS, None, None, None, |o| {
            let v = o.value();
            let available = v
                .pointer("/status/conditions")
                .and_then(|c| c.as_array())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Available" && c["status"] == "True")
                });
            if available && v.pointer("/status/availableReplicas") == Some(&json!(REPLICAS)) {
                done += 1;
            }
            true
        });
        if done == deployments {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done}/{deployments} available"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let available_secs = start.elapsed().as_secs_f64();
    // Let the watch catch up with the last Ready events.
    let wait_until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = turned_ready.lock().unwrap().len();
        let got = {
            let r = received.lock().unwrap();
            turned_ready
                .lock()
                .unwrap()
                .keys()
                .filter(|rv| r.contains_key(rv))
                .count()
        };
        if (ready as i64 >= deployments as i64 * REPLICAS && got == ready)
            || Instant::now() > wait_until
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut delays: Vec<f64> = {
        let r = received.lock().unwrap();
        turned_ready
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(rv, at)| {
                r.get(rv)
                    .map(|got| got.saturating_duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    delays.sort_by(|a, b| a.total_cmp(b));

    // Quiet: one pod at a time turns unready then ready again, with the
    // cluster otherwise idle.
    let mut names = Vec::new();
    let _ = m.store().scan(ids::PODS, None, None, None, |o| {
        names.push((o.namespace().to_string(), o.name().to_string()));
        names.len() < 100
    });
    let ready_of = |ns: &str, name: &str| {
        m.get(ids::PODS, Some(ns), name)
            .map(|p| {
                (
                    is_ready(&p),
                    p["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("0")
                        .parse::<u64>()
                        .unwrap_or(0),
                )
            })
            .unwrap_or((false, 0))
    };
    let mut quiet: Vec<f64> = Vec::new();
    for (ns, name) in &names {
        sim.set_ready(ns, name, false);
        let until = Instant::now() + Duration::from_secs(10);
        while ready_of(ns, name).0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sim.set_ready(ns, name, true);
        let rv = loop {
            let (ready, rv) = ready_of(ns, name);
            if ready || Instant::now() > until {
                break rv;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        loop {
            if let (Some(at), Some(got)) = (
                turned_ready.lock().unwrap().get(&rv).copied(),
                received.lock().unwrap().get(&rv).copied(),
            ) {
                quiet.push(got.saturating_duration_since(at).as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    quiet.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{}",
        json!({
            "bench": "kubesim_controllers",
            "deployments": deployments,
            "replicas": REPLICAS,
            "events": !args.iter().any(|a| a == "--no-events"),
            "pods": deployments as i64 * REPLICAS,
            "create_seconds": (created_secs * 1000.0).round() / 1000.0,
            "all_available_seconds": (available_secs * 1000.0).round() / 1000.0,
            "ready_events": delays.len(),
            "ready_to_watch_p50_ms": (percentile(&delays, 0.5) * 100.0).round() / 100.0,
            "ready_to_watch_p99_ms": (percentile(&delays, 0.99) * 100.0).round() / 100.0,
            "ready_to_watch_max_ms": (percentile(&delays, 1.0) * 100.0).round() / 100.0,
            "quiet_ready_events": quiet.len(),
            "quiet_ready_to_watch_p50_ms": (percentile(&quiet, 0.5) * 100.0).round() / 100.0,
            "quiet_ready_to_watch_p99_ms": (percentile(&quiet, 0.99) * 100.0).round() / 100.0,
        })
    );
    sim.shutdown().await?;
    Ok(())
}
