//! kubesim: a Kubernetes API simulator for tests (not shipped).
//!
//! It speaks the Kubernetes REST API over plain HTTP on loopback, so
//! keelson's Kubernetes code is tested through the real kube-rs client (and
//! kubectl) without a cluster, and measured at scales where a real API
//! server needs gigabytes.
//!
//! ```text
//!   kube-rs / kubectl ──HTTP──► api (routing, discovery, watch, tables)
//!                                  │ counts + faults (control)
//!                                  ▼
//!   tests, controllers ──────► machinery (CRUD, patch, apply, GC)
//!        ▲                         ▼
//!        └──── change log ───── store (JSON bytes, rv log, indexes)
//!
//!   controllers: deployments, replicasets, scheduler, kubelets,
//!                endpoints, hpa
//! ```
//!
//! Start one in-process with [`Sim::start`] (API only by default, with the
//! [`controllers`] given [`SimConfig::with_controllers`]); the binary `kubesim` serves one
//! in the foreground and writes a kubeconfig.

pub mod api;
pub mod control;
pub mod controllers;
pub mod defaults;
pub mod error;
pub mod fields;
pub mod logs;
pub mod machinery;
pub mod patch;
pub mod resources;
pub mod selectors;
pub mod store;
pub mod table;
pub mod util;

use control::{Fault, Faults, Injection, Metrics};
use logs::Logs;
use machinery::{Machinery, MachineryConfig, WriteOptions};
use resources::ids;
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Errors of starting and stopping a simulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding or serving failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Seeding the initial objects failed.
    #[error("seeding the cluster: {0}")]
    Seed(#[from] error::ApiError),
}

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where to listen (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// How many nodes to create.
    pub nodes: usize,
    /// Zones the nodes are spread over (`topology.kubernetes.io/zone`).
    pub zones: Vec<String>,
    /// How many recent changes each resource keeps for watches and
    /// consistent pagination; older versions answer 410 Gone.
    pub watch_window: usize,
    /// How often watches that allow bookmarks receive one.
    pub bookmark_interval: Duration,
    /// How long a gracefully deleted, node-bound pod stays terminating
    /// (without controllers; with them, the kubelets decide).
    pub pod_termination: Duration,
    /// The controllers, scheduler and kubelets, started by [`Sim::start`]
    /// when set; `None` (the default) serves the API only.
    pub controllers: Option<controllers::ControllerConfig>,
}

impl SimConfig {
    /// The API machinery alone: nothing acts on the objects (the default).
    pub fn api_only() -> Self {
        SimConfig::default()
    }

    /// A cluster that behaves: the API with the controllers, scheduler and
    /// kubelets ([`controllers::ControllerConfig::default`]).
    pub fn with_controllers() -> Self {
        SimConfig {
            controllers: Some(controllers::ControllerConfig::default()),
            ..SimConfig::default()
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            nodes: 3,
            zones: vec!["a".into(), "b".into(), "c".into()],
            watch_window: 10_000,
            bookmark_interval: Duration::from_secs(5),
            pod_termination: Duration::from_millis(0),
            controllers: None,
        }
    }
}

/// A running simulator.
pub struct Sim {
    addr: SocketAddr,
    machinery: Arc<Machinery>,
    metrics: Arc<Metrics>,
    faults: Arc<Faults>,
    logs: Arc<Logs>,
    control: Arc<controllers::Control>,
    shutdown: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Sim {
    /// Seeds the cluster (system namespaces, nodes) and starts serving.
    pub async fn start(config: SimConfig) -> Result<Sim, Error> {
        let store = Arc::new(Store::new(config.watch_window));
        let machinery = Arc::new(Machinery::new(
            store,
            MachineryConfig {
                pod_termination: config.pod_termination,
                kubelet_stops_pods: config.controllers.is_some(),
            },
        ));
        seed(&machinery, &config)?;
        let metrics = Arc::new(Metrics::default());
        let faults = Arc::new(Faults::default());
        let logs = Arc::new(Logs::default());
        let shutdown = CancellationToken::new();
        let control = Arc::new(controllers::Control::default());
        if let Some(cc) = &config.controllers {
            controllers::start(
                controllers::Ctx {
                    machinery: machinery.clone(),
                    logs: logs.clone(),
                    control: control.clone(),
                    config: cc.clone(),
                },
                shutdown.clone(),
            );
        }
        let shared = Arc::new(api::Shared {
            machinery: machinery.clone(),
            metrics: metrics.clone(),
            faults: faults.clone(),
            logs: logs.clone(),
            bookmark_interval: config.bookmark_interval,
            shutdown: shutdown.clone(),
        });
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let token = shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, api::router(shared))
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await
        });
        Ok(Sim {
            addr,
            machinery,
            metrics,
            faults,
            logs,
            control,
            shutdown,
            server: Some(server),
        })
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The machinery, for in-process reads and writes.
    pub fn machinery(&self) -> &Arc<Machinery> {
        &self.machinery
    }

    /// Request counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Fault rules.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// Adds a fault rule for every request on `resource`; returns its id.
    pub fn inject(&self, resource: &str, fault: Fault) -> u64 {
        self.faults.inject(Injection::new(resource, fault))
    }

    /// Container logs served by `pods/{name}/log`.
    pub fn logs(&self) -> &Arc<Logs> {
        &self.logs
    }

    /// Test controls of the simulated workloads.
    pub fn control(&self) -> &Arc<controllers::Control> {
        &self.control
    }

    /// Sets whether a pod's readiness target (its readiness probe) answers
    /// ready; the kubelet follows within its ready delay.
    pub fn set_ready(&self, namespace: &str, pod: &str, ready: bool) {
        self.control.set_ready(namespace, pod, ready);
    }

    /// Sets the simulated metric an HPA reads.
    pub fn set_metric(&self, namespace: &str, hpa: &str, value: f64) {
        self.control.set_metric(namespace, hpa, value);
    }

    /// Forgets all change history (every older resourceVersion is gone).
    pub fn compact(&self) {
        self.machinery.store().compact();
    }

    /// A kubeconfig pointing at this simulator (context `kubesim`).
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(&self.base_url())
    }

    /// Writes [`Sim::kubeconfig_yaml`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// Stops serving and waits for the server to finish.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.shutdown.cancel();
        if let Some(s) = self.server.take() {
            match s.await {
                Ok(r) => r?,
                Err(e) => return Err(Error::Io(std::io::Error::other(e))),
            }
        }
        Ok(())
    }

    /// Serves until the server stops (for the binary).
    pub async fn wait(mut self) -> Result<(), Error> {
        if let Some(s) = self.server.take() {
            match s.await {
                Ok(r) => r?,
                Err(e) => return Err(Error::Io(std::io::Error::other(e))),
            }
        }
        Ok(())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A kubeconfig with one cluster, user and context named `kubesim`.
pub fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kubesim\n  cluster:\n    server: {server}\n\
         users:\n- name: kubesim\n  user:\n    token: kubesim\ncontexts:\n- name: kubesim\n  context:\n    \
         cluster: kubesim\n    user: kubesim\n    namespace: default\ncurrent-context: kubesim\npreferences: {{}}\n"
    )
}

fn seed(m: &Machinery, config: &SimConfig) -> Result<(), error::ApiError> {
    let opts = WriteOptions {
        field_manager: Some("kubesim".into()),
        ..Default::default()
    };
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        m.create(
            ids::NAMESPACES,
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            &opts,
        )?;
    }
    let zones = if config.zones.is_empty() {
        vec!["a".to_string()]
    } else {
        config.zones.clone()
    };
    for i in 0..config.nodes {
        let name = format!("node-{i}");
        let zone = &zones[i % zones.len()];
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": zone, "topology.kubernetes.io/region": "kubesim",
            }},
            "spec": {"podCIDR": format!("10.{}.0.0/16", 64 + i % 128)},
            "status": {
                "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"},
                "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "kubelet is posting ready status", "lastHeartbeatTime": util::now_rfc3339(),
                    "lastTransitionTime": util::now_rfc3339()}],
                "addresses": [{"type": "InternalIP", "address": format!("10.0.{}.{}", i / 250, i % 250 + 1)},
                    {"type": "Hostname", "address": name}],
                "nodeInfo": {"kubeletVersion": "v1.30.0-kubesim", "kubeProxyVersion": "v1.30.0-kubesim",
                    "containerRuntimeVersion": "kubesim://1", "operatingSystem": "linux", "architecture": "amd64",
                    "osImage": "kubesim", "kernelVersion": "6.1", "machineID": "", "systemUUID": "", "bootID": ""},
            },
        });
        m.create(ids::NODES, None, node, &opts)?;
    }
    Ok(())
}
