//! Controllers: what makes the simulated cluster behave.
//!
//! Each controller is an in-process tokio task that follows the store's
//! change log (the same one HTTP watches read) and writes through the
//! [`Machinery`] under its own field manager. They are level-triggered: a
//! change only marks keys dirty, and reconciling a key reads the current
//! state, so a restarted controller (or one whose window expired) converges
//! from a full resync.
//!
//! ```text
//!  store changes ─► keys_of ─► dirty keys ─► reconcile ─► Machinery writes
//!        ▲             timers (requeue after) ┘                  │
//!        └───────────────────────────────────────────────────────┘
//! ```
//!
//! - [`deployment`]: Deployments → ReplicaSets (RollingUpdate, Recreate,
//!   paused, progress deadline, revisions, status conditions).
//! - [`replicaset`]: ReplicaSets → Pods, and ReplicaSet status.
//! - [`scheduler`]: binds pods to ready nodes, spreading across zones.
//! - [`kubelet`]: one per node; pod phases, container states, readiness,
//!   restarts, IPs, logs, graceful termination and failure injection.
//! - [`endpoints`]: Endpoints and EndpointSlices of Services.
//! - [`hpa`]: HPA status (and scaling) from a metric tests set.

pub mod deployment;
pub mod endpoints;
pub mod hpa;
pub mod kubelet;
pub mod replicaset;
pub mod scheduler;

use crate::logs::Logs;
use crate::machinery::{Machinery, WriteOptions};
use crate::resources::ResourceId;
use crate::store::Event;
use crate::util;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Annotation prefix of kubesim's per-pod controls.
pub const ANNOTATION_PREFIX: &str = "kubesim.keelson.dev/";
/// `"true"`: the container never starts (restarts with back-off).
pub const FAIL_START: &str = "kubesim.keelson.dev/fail-start";
/// Seconds (may be fractional): the container exits after running this long.
pub const CRASH_AFTER: &str = "kubesim.keelson.dev/crash-after";
/// The exit code of a crash or failed start (default 1).
pub const EXIT_CODE: &str = "kubesim.keelson.dev/exit-code";
/// `"true"`: the readiness probe never passes.
pub const NEVER_READY: &str = "kubesim.keelson.dev/never-ready";
/// `"false"`: the readiness target starts not ready (tests flip it with
/// [`Control::set_ready`]); `"true"` forces it ready.
pub const READY: &str = "kubesim.keelson.dev/ready";
/// Seconds the container takes to exit after SIGTERM (default 0).
pub const STOP_SECONDS: &str = "kubesim.keelson.dev/stop-seconds";

/// Settings of the controllers.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// From a pod's binding to its containers running.
    pub start_delay: Duration,
    /// From containers running to the readiness probe first passing (pods
    /// with a readiness probe only).
    pub ready_delay: Duration,
    /// Whether a pod's readiness target is ready unless told otherwise.
    pub default_ready: bool,
    /// How long a crashed or failed container waits before it restarts.
    pub restart_backoff: Duration,
    /// Whether components record Events.
    pub events: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            start_delay: Duration::from_millis(50),
            ready_delay: Duration::from_millis(50),
            default_ready: true,
            restart_backoff: Duration::from_millis(200),
            events: true,
        }
    }
}

/// What tests steer: per-pod readiness targets and HPA metrics.
#[derive(Debug)]
pub struct Control {
    ready: Mutex<HashMap<(String, String), bool>>,
    metrics: Mutex<HashMap<(String, String), f64>>,
    changed: watch::Sender<u64>,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            ready: Mutex::new(HashMap::new()),
            metrics: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl Control {
    /// Sets whether a pod's readiness target answers ready.
    pub fn set_ready(&self, namespace: &str, pod: &str, ready: bool) {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.into(), pod.into()), ready);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The readiness a test set for a pod, if any.
    pub fn ready_of(&self, namespace: &str, pod: &str) -> Option<bool> {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.to_string(), pod.to_string()))
            .copied()
    }

    /// Sets the simulated metric of an HPA (in the unit of its first
    /// metric's target: a utilization percentage or an average value).
    pub fn set_metric(&self, namespace: &str, hpa: &str, value: f64) {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((namespace.into(), hpa.into()), value);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The metric a test set for an HPA, if any.
    pub fn metric_of(&self, namespace: &str, hpa: &str) -> Option<f64> {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.to_string(), hpa.to_string()))
            .copied()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// What every controller shares.
#[derive(Clone)]
pub struct Ctx {
    /// The write path.
    pub machinery: Arc<Machinery>,
    /// Container logs.
    pub logs: Arc<Logs>,
    /// Test controls.
    pub control: Arc<Control>,
    /// Settings.
    pub config: ControllerConfig,
}

impl Ctx {
    /// Write options under a field manager.
    pub fn opts(manager: &str) -> WriteOptions {
        WriteOptions {
            field_manager: Some(manager.into()),
            ..Default::default()
        }
    }

    /// Records a core v1 Event about `obj` (a full object).
    #[allow(clippy::too_many_arguments)]
    pub fn event(
        &self,
        obj: &Value,
        api_version: &str,
        kind: &str,
        type_: &str,
        reason: &str,
        message: &str,
        component: &str,
        host: Option<&str>,
    ) {
        if !self.config.events {
            return;
        }
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let now = util::now_rfc3339();
        let mut source = json!({"component": component});
        if let Some(h) = host {
            source["host"] = json!(h);
        }
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("{name}.{:016x}", util::random_u64()), "namespace": ns},
            "involvedObject": {
                "apiVersion": api_version, "kind": kind, "namespace": ns, "name": name,
                "uid": obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null),
                "resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null),
            },
            "reason": reason, "message": message, "type": type_,
            "source": source,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": component, "reportingInstance": host.unwrap_or(component),
        });
        let _ = self.machinery.create(
            crate::resources::ids::EVENTS,
            Some(ns),
            ev,
            &Self::opts(component),
        );
    }
}

/// A level-triggered controller driven by [`run`].
pub trait Reconciler: Send + 'static {
    /// The resources whose changes matter.
    fn resources(&self) -> Vec<ResourceId>;
    /// Keys (`namespace/name`) a change makes dirty.
    fn keys_of(&mut self, res: ResourceId, ev: &Event, out: &mut BTreeSet<String>);
    /// Every key (a full resync).
    fn all_keys(&mut self) -> BTreeSet<String>;
    /// Brings one key to its desired state; `Some(d)` reconciles it again
    /// after `d`.
    fn reconcile(&mut self, key: &str) -> Option<Duration>;
    /// Whether test controls ([`Control`]) affect this controller.
    fn follows_control(&self) -> bool {
        false
    }
}

/// Runs a controller until `cancel` fires.
pub async fn run<R: Reconciler>(
    mut r: R,
    machinery: Arc<Machinery>,
    control: Arc<Control>,
    cancel: CancellationToken,
) {
    let store = machinery.store().clone();
    let mut rx = store.subscribe();
    let mut control_rx = control.subscribe();
    let resources = r.resources();
    let start = store.current_rv();
    let mut last: Vec<u64> = vec![start; resources.len()];
    let mut dirty = r.all_keys();
    let mut timers: HashMap<String, Instant> = HashMap::new();
    let mut events = Vec::new();
    loop {
        rx.borrow_and_update();
        for (i, res) in resources.iter().enumerate() {
            events.clear();
            match store.events_after(*res, last[i], &mut events) {
                Ok(rv) => {
                    last[i] = rv;
                    for e in &events {
                        r.keys_of(*res, e, &mut dirty);
                    }
                }
                Err(_) => {
                    last[i] = store.current_rv();
                    dirty.extend(r.all_keys());
                }
            }
        }
        let now = Instant::now();
        timers.retain(|k, at| {
            if *at <= now {
                dirty.insert(k.clone());
                false
            } else {
                true
            }
        });
        let batch = std::mem::take(&mut dirty);
        for (n, key) in batch.into_iter().enumerate() {
            if let Some(after) = r.reconcile(&key) {
                let at = Instant::now() + after;
                let e = timers.entry(key).or_insert(at);
                if at < *e {
                    *e = at;
                }
            }
            if n % 64 == 63 {
                tokio::task::yield_now().await;
            }
        }
        let next = timers.values().min().copied();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = rx.changed() => {}
            c = control_rx.changed(), if r.follows_control() => {
                if c.is_ok() {
                    dirty.extend(r.all_keys());
                }
            }
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Starts every controller; they stop when `cancel` fires.
pub fn start(ctx: Ctx, cancel: CancellationToken) {
    let m = ctx.machinery.clone();
    let c = ctx.control.clone();
    tokio::spawn(run(
        deployment::DeploymentController::new(ctx.clone()),
        m.clone(),
        c.clone(),
        cancel.clone(),
    ));
    tokio::spawn(run(
        replicaset::ReplicaSetController::new(ctx.clone()),
        m.clone(),
        c.clone(),
        cancel.clone(),
    ));
    tokio::spawn(run(
        scheduler::Scheduler::new(ctx.clone()),
        m.clone(),
        c.clone(),
        cancel.clone(),
    ));
    tokio::spawn(run(
        endpoints::EndpointsController::new(ctx.clone()),
        m.clone(),
        c.clone(),
        cancel.clone(),
    ));
    tokio::spawn(run(
        hpa::HpaController::new(ctx.clone()),
        m.clone(),
        c.clone(),
        cancel.clone(),
    ));
    let mut nodes = Vec::new();
    let _ = m
        .store()
        .scan(crate::resources::ids::NODES, None, None, None, |o| {
            nodes.push((o.name().to_string(), o.value()));
            true
        });
    for (i, (name, _)) in nodes.into_iter().enumerate() {
        tokio::spawn(run(
            kubelet::Kubelet::new(ctx.clone(), name, i),
            m.clone(),
            c.clone(),
            cancel.clone(),
        ));
    }
}

// --- helpers shared by the controllers ---

/// The node a stored pod is bound to, if any.
pub(crate) fn node_of(o: &crate::store::Obj) -> Option<&str> {
    o.indexed_field("spec.nodeName").filter(|n| !n.is_empty())
}

/// Splits `namespace/name`.
pub(crate) fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

pub(crate) fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

pub(crate) fn i64_at(v: &Value, ptr: &str) -> Option<i64> {
    v.pointer(ptr).and_then(Value::as_i64)
}

/// Whether a pod has the Ready condition True.
pub(crate) fn pod_ready(p: &Value) -> bool {
    condition(p, "Ready").is_some_and(|c| c["status"] == "True")
}

/// A condition of an object's status by type.
pub(crate) fn condition<'a>(v: &'a Value, type_: &str) -> Option<&'a Value> {
    v.pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Whether a pod counts as active for its ReplicaSet: not terminating and
/// neither succeeded nor failed.
pub(crate) fn pod_active(p: &Value) -> bool {
    p.pointer("/metadata/deletionTimestamp").is_none()
        && !matches!(
            str_at(p, "/status/phase"),
            Some("Succeeded") | Some("Failed")
        )
}

/// Whether a pod is available: ready for at least `min_ready` seconds.
/// The second value is how long until it becomes available, when it is
/// ready but not yet for long enough.
pub(crate) fn pod_available(p: &Value, min_ready: i64) -> (bool, Option<Duration>) {
    if !pod_ready(p) {
        return (false, None);
    }
    if min_ready <= 0 {
        return (true, None);
    }
    let since = condition(p, "Ready")
        .and_then(|c| c["lastTransitionTime"].as_str())
        .and_then(util::parse_rfc3339)
        .unwrap_or(0);
    let left = since + min_ready - util::now_secs();
    if left <= 0 {
        (true, None)
    } else {
        (false, Some(Duration::from_secs(left as u64)))
    }
}

/// Pods (values) a ReplicaSet (by uid) owns.
pub(crate) fn owned_pods(m: &Machinery, uid: &str) -> Vec<Value> {
    m.store()
        .dependents(uid)
        .into_iter()
        .filter(|(res, _)| *res == crate::resources::ids::PODS)
        .map(|(_, o)| o.value())
        .collect()
}

/// The owners (resource, key) of an object's current and previous state.
pub(crate) fn owner_keys(m: &Machinery, ev: &Event, owner_res: ResourceId) -> Vec<String> {
    let mut out = Vec::new();
    let uids = ev
        .obj
        .owners
        .iter()
        .chain(ev.prev.iter().flat_map(|p| p.owners.iter()));
    for u in uids {
        if let Some((res, o)) = m.store().by_uid(u)
            && res == owner_res
        {
            out.push(o.key.to_string());
        }
    }
    out
}

/// Sets a status condition: keeps `lastTransitionTime` when the status
/// does not change; returns whether anything changed.
pub(crate) fn set_condition(
    conds: &mut Vec<Value>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    with_update_time: bool,
) {
    let now = util::now_rfc3339();
    let prev = conds.iter().position(|c| c["type"] == type_);
    let transition = match prev {
        Some(i) if conds[i]["status"] == status => conds[i]["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    let mut c = json!({
        "type": type_, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": transition,
    });
    if with_update_time {
        c["lastUpdateTime"] = json!(now);
    }
    match prev {
        Some(i) => conds[i] = c,
        None => conds.push(c),
    }
}
