//! A kubelet per node: runs the pods bound to it, in simulation.
//!
//! A bound pod is Pending (`ContainerCreating`) for the start delay, then
//! Running; with a readiness probe it turns Ready after the ready delay if
//! its readiness target is ready (the default, [`Control::set_ready`], or
//! the `kubesim.keelson.dev/ready` annotation), without one at once. It
//! gets an IP from the node's range, log lines, and the Events upstream's
//! kubelet records. Failure injection by annotation: `fail-start`,
//! `crash-after`, `exit-code`, `never-ready` (see [`super`]). A deleted pod
//! turns not ready, runs its preStop hook (`sleep` action or an exec
//! `sleep N`) and stops, within `terminationGracePeriodSeconds`, then is
//! removed.
//!
//! [`Control::set_ready`]: super::Control::set_ready

use super::{
    CRASH_AFTER, Ctx, EXIT_CODE, FAIL_START, NEVER_READY, READY, Reconciler, STOP_SECONDS,
    condition, str_at,
};
use crate::machinery::Sub;
use crate::resources::ResourceId;
use crate::resources::ids::PODS;
use crate::store::Event;
use crate::util;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;
use tokio::time::Instant;

const MANAGER: &str = "kubelet";
const COMPONENT: &str = "kubelet";

struct Run {
    uid: String,
    ip: String,
    /// When the current (or next) container run starts.
    start_at: Instant,
    started_str: Option<String>,
    restarts: i64,
    last_term: Option<Value>,
    announced: bool,
    unhealthy_sent: bool,
    killing: Option<(Instant, Duration)>,
    stopped: bool,
}

/// The kubelet of one node.
pub struct Kubelet {
    ctx: Ctx,
    node: String,
    host_ip: String,
    prefix: String,
    next_ip: u32,
    used: HashSet<String>,
    runs: HashMap<String, Run>,
}

fn annotation<'a>(pod: &'a Value, key: &str) -> Option<&'a str> {
    pod.pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Seconds a container's preStop hook takes: a `sleep` action, or an exec
/// hook whose command contains `sleep N`.
fn pre_stop_seconds(c: &Value) -> f64 {
    let Some(h) = c.pointer("/lifecycle/preStop") else {
        return 0.0;
    };
    if let Some(s) = h.pointer("/sleep/seconds").and_then(Value::as_f64) {
        return s;
    }
    let words: Vec<String> = h
        .pointer("/exec/command")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .flat_map(|s| s.split_whitespace().map(String::from).collect::<Vec<_>>())
        .collect();
    words
        .windows(2)
        .find(|w| w[0] == "sleep")
        .and_then(|w| w[1].trim_end_matches(';').parse().ok())
        .unwrap_or(0.0)
}

impl Kubelet {
    /// The kubelet of node `name` (the `index`-th node: its pod IPs come
    /// from `10.(64+index).0.0/16`).
    pub fn new(ctx: Ctx, name: String, index: usize) -> Self {
        let host_ip = ctx
            .machinery
            .get(crate::resources::ids::NODES, None, &name)
            .ok()
            .and_then(|n| {
                n.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
                    .and_then(|x| x["address"].as_str().map(String::from))
            })
            .unwrap_or_else(|| "10.0.0.1".into());
        // IPs of pods already here (a restarted kubelet) stay taken.
        let mut used = HashSet::new();
        let _ = ctx.machinery.store().scan(PODS, None, None, None, |o| {
            if super::node_of(o) == Some(name.as_str())
                && let Some(ip) = str_at(&o.value(), "/status/podIP")
            {
                used.insert(ip.to_string());
            }
            true
        });
        Kubelet {
            ctx,
            node: name,
            host_ip,
            prefix: format!("10.{}", 64 + index % 128),
            next_ip: 0,
            used,
            runs: HashMap::new(),
        }
    }

    fn alloc_ip(&mut self) -> String {
        loop {
            self.next_ip = (self.next_ip + 1) % (254 * 256);
            let n = self.next_ip;
            let ip = format!("{}.{}.{}", self.prefix, n / 254, n % 254 + 1);
            if self.used.len() >= 254 * 256 - 1 || self.used.insert(ip.clone()) {
                return ip;
            }
        }
    }

    fn log(&self, ns: &str, pod: &str, containers: &[String], line: &str) {
        for c in containers {
            self.ctx.logs.append(
                ns,
                pod,
                c,
                &format!("{} kubesim: {line}\n", util::now_rfc3339()),
            );
        }
    }

    fn sync(&mut self, key: &str) -> Option<Duration> {
        let m = self.ctx.machinery.clone();
        let Some(o) = m.store().get(PODS, key) else {
            if let Some(run) = self.runs.remove(key) {
                self.used.remove(&run.ip);
            }
            return None;
        };
        if super::node_of(&o) != Some(self.node.as_str()) {
            return None;
        }
        let pod = o.value();
        let (ns, name) = super::split_key(key);
        let uid = o.uid.to_string();
        let now = Instant::now();
        let cfg = self.ctx.config.clone();
        let containers: Vec<Value> = pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let names: Vec<String> = containers
            .iter()
            .filter_map(|c| c["name"].as_str().map(String::from))
            .collect();
        if self.runs.get(key).is_none_or(|r| r.uid != uid) {
            if let Some(old) = self.runs.remove(key) {
                self.used.remove(&old.ip);
            }
            let existing_ip = str_at(&pod, "/status/podIP").map(String::from);
            let running = str_at(&pod, "/status/phase") == Some("Running");
            let ip = existing_ip.unwrap_or_else(|| self.alloc_ip());
            let restarts = pod
                .pointer("/status/containerStatuses/0/restartCount")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let start_at = if running {
                now.checked_sub(cfg.start_delay).unwrap_or(now)
            } else {
                now + cfg.start_delay
            };
            if !running {
                for c in &containers {
                    self.ctx.event(
                        &pod,
                        "v1",
                        "Pod",
                        "Normal",
                        "Pulling",
                        &format!("Pulling image \"{}\"", c["image"].as_str().unwrap_or("")),
                        COMPONENT,
                        Some(&self.node),
                    );
                }
            }
            self.runs.insert(
                key.to_string(),
                Run {
                    uid: uid.clone(),
                    ip,
                    start_at,
                    started_str: None,
                    restarts,
                    last_term: None,
                    announced: running,
                    unhealthy_sent: false,
                    killing: None,
                    stopped: false,
                },
            );
        }
        let mut next: Option<Instant> = None;
        let mut ready = false;
        let mut running = false;
        let mut waiting_reason = "ContainerCreating";
        let terminating = pod.pointer("/metadata/deletionTimestamp").is_some();
        let mut events: Vec<(&str, &str, String)> = Vec::new();
        let mut lines: Vec<String> = Vec::new();
        let exit_code: i64 = annotation(&pod, EXIT_CODE)
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        let backoff = cfg.restart_backoff.max(Duration::from_millis(1));
        let run = self.runs.get_mut(key).expect("inserted above");
        if terminating {
            if run.killing.is_none() {
                let grace = pod
                    .pointer("/metadata/deletionGracePeriodSeconds")
                    .and_then(Value::as_f64)
                    .unwrap_or(30.0);
                let pre = containers.iter().map(pre_stop_seconds).fold(0.0, f64::max);
                let stop: f64 = annotation(&pod, STOP_SECONDS)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0.0);
                run.killing = Some((now, secs((pre + stop).min(grace))));
                for n in &names {
                    events.push(("Normal", "Killing", format!("Stopping container {n}")));
                }
                if pre > 0.0 {
                    lines.push(format!("running preStop hook ({pre}s)"));
                }
                lines.push("received SIGTERM, shutting down".into());
            }
            let (since, took) = run.killing.expect("set above");
            running = run.start_at <= now && run.started_str.is_some();
            if now >= since + took {
                let uid = run.uid.clone();
                if !std::mem::replace(&mut run.stopped, true) {
                    self.log(ns, name, &names, "stopped");
                }
                for (t, r, msg) in events {
                    self.ctx
                        .event(&pod, "v1", "Pod", t, r, &msg, COMPONENT, Some(&self.node));
                }
                m.finish_pod(ns, name, &uid);
                // Finalizers may still hold it: look again later.
                return m
                    .store()
                    .get(PODS, key)
                    .is_some_and(|o| *o.uid == *uid)
                    .then_some(Duration::from_millis(100));
            }
            next = Some(since + took);
        } else {
            let fail_start = annotation(&pod, FAIL_START) == Some("true");
            let crash_after: Option<f64> =
                annotation(&pod, CRASH_AFTER).and_then(|s| s.parse().ok());
            loop {
                if now < run.start_at {
                    if run.restarts > 0 {
                        waiting_reason = "CrashLoopBackOff";
                    }
                    next = Some(run.start_at);
                    break;
                }
                let at = util::now_rfc3339();
                if fail_start {
                    run.restarts += 1;
                    run.last_term = Some(json!({"terminated": {
                        "exitCode": exit_code, "reason": "StartError",
                        "message": "kubesim: fail-start injected",
                        "startedAt": "1970-01-01T00:00:00Z", "finishedAt": at}}));
                    run.start_at += backoff;
                    events.push((
                        "Warning",
                        "Failed",
                        "Error: failed to start container: kubesim: fail-start injected".into(),
                    ));
                    events.push((
                        "Warning",
                        "BackOff",
                        "Back-off restarting failed container".into(),
                    ));
                    continue;
                }
                if run.started_str.is_none() {
                    run.started_str = Some(at.clone());
                    run.unhealthy_sent = false;
                    if !run.announced {
                        for c in &containers {
                            let cn = c["name"].as_str().unwrap_or("");
                            let img = c["image"].as_str().unwrap_or("");
                            if run.restarts == 0 {
                                events.push((
                                    "Normal",
                                    "Pulled",
                                    format!("Successfully pulled image \"{img}\""),
                                ));
                            }
                            events.push(("Normal", "Created", format!("Created container {cn}")));
                            events.push(("Normal", "Started", format!("Started container {cn}")));
                        }
                        lines.push("container started".into());
                    }
                    run.announced = true;
                }
                if let Some(c) = crash_after {
                    let crash_at = run.start_at + secs(c);
                    if now >= crash_at {
                        run.restarts += 1;
                        run.last_term = Some(json!({"terminated": {
                            "exitCode": exit_code,
                            "reason": if exit_code == 0 { "Completed" } else { "Error" },
                            "startedAt": run.started_str.clone(), "finishedAt": at}}));
                        run.started_str = None;
                        run.announced = false;
                        run.start_at = crash_at + backoff;
                        lines.push(format!("exited with code {exit_code}"));
                        events.push((
                            "Warning",
                            "BackOff",
                            "Back-off restarting failed container".into(),
                        ));
                        continue;
                    }
                    next = Some(crash_at);
                }
                running = true;
                let has_probe = containers.iter().any(|c| c.get("readinessProbe").is_some());
                let target = annotation(&pod, NEVER_READY) != Some("true")
                    && self
                        .ctx
                        .control
                        .ready_of(ns, name)
                        .or_else(|| annotation(&pod, READY).map(|r| r == "true"))
                        .unwrap_or(cfg.default_ready);
                if has_probe {
                    let due = run.start_at + cfg.ready_delay;
                    if now < due {
                        next = Some(next.map_or(due, |n| n.min(due)));
                    } else if target {
                        ready = true;
                        run.unhealthy_sent = false;
                    } else if !run.unhealthy_sent {
                        run.unhealthy_sent = true;
                        events.push((
                            "Warning",
                            "Unhealthy",
                            "Readiness probe failed: HTTP probe failed with statuscode: 503".into(),
                        ));
                    }
                } else {
                    ready = target;
                }
                break;
            }
        }
        // Build the status.
        let old = pod.get("status").cloned().unwrap_or(json!({}));
        let started_str = run.started_str.clone();
        let ip = run.ip.clone();
        let restarts = run.restarts;
        let last_term = run.last_term.clone();
        let container_id = format!("kubesim://{}-{}", &uid[..uid.len().min(8)], restarts);
        let statuses: Vec<Value> = containers
            .iter()
            .map(|c| {
                let state = if running {
                    json!({"running": {"startedAt": started_str}})
                } else if waiting_reason == "CrashLoopBackOff" {
                    json!({"waiting": {"reason": "CrashLoopBackOff",
                        "message": format!("back-off restarting failed container {}", c["name"].as_str().unwrap_or(""))}})
                } else {
                    json!({"waiting": {"reason": "ContainerCreating"}})
                };
                let mut s = json!({
                    "name": c["name"], "image": c["image"],
                    "imageID": format!("kubesim://{}", c["image"].as_str().unwrap_or("")),
                    "ready": ready && !terminating, "started": running,
                    "restartCount": restarts, "state": state,
                    "lastState": last_term.clone().unwrap_or(json!({})),
                });
                if running {
                    s["containerID"] = json!(container_id);
                }
                s
            })
            .collect();
        let ready = ready && !terminating;
        let cond = |t: &str, ok: bool, reason: Option<&str>| {
            let status = if ok { "True" } else { "False" };
            let prev = condition(&pod, t);
            let time = match prev {
                Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
                _ => json!(util::now_rfc3339()),
            };
            let mut c = json!({"type": t, "status": status, "lastTransitionTime": time});
            if let Some(r) = reason.filter(|_| !ok) {
                c["reason"] = json!(r);
            }
            c
        };
        let phase = if running || started_str.is_some() || (restarts > 0 && crash_run(&pod)) {
            "Running"
        } else {
            "Pending"
        };
        let mut status = json!({
            "phase": phase,
            "conditions": [
                cond("PodReadyToStartContainers", true, None),
                cond("Initialized", true, None),
                cond("Ready", ready, Some("ContainersNotReady")),
                cond("ContainersReady", ready, Some("ContainersNotReady")),
                cond("PodScheduled", true, None),
            ],
            "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}],
            "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": old.get("startTime").cloned().unwrap_or(json!(util::now_rfc3339())),
            "containerStatuses": statuses,
        });
        if let Some(q) = old.get("qosClass") {
            status["qosClass"] = q.clone();
        }
        for (t, r, msg) in events {
            self.ctx
                .event(&pod, "v1", "Pod", t, r, &msg, COMPONENT, Some(&self.node));
        }
        for l in lines {
            self.log(ns, name, &names, &l);
        }
        if same_status(&old, &status) {
            return next.map(|n| n.saturating_duration_since(Instant::now()));
        }
        let mut body = pod;
        body["status"] = status;
        if m.update(PODS, Some(ns), name, body, Sub::Status, &Ctx::opts(MANAGER))
            .is_err()
        {
            return Some(Duration::from_millis(20));
        }
        next.map(|n| n.saturating_duration_since(Instant::now()))
    }
}

/// Whether a crashing pod counts as having run (phase Running).
fn crash_run(pod: &Value) -> bool {
    annotation(pod, FAIL_START) != Some("true")
}

/// Equal statuses, but for condition times of unchanged conditions (kept
/// already) — a plain comparison.
fn same_status(old: &Value, new: &Value) -> bool {
    old == new
}

impl Reconciler for Kubelet {
    fn resources(&self) -> Vec<ResourceId> {
        vec![PODS]
    }

    fn keys_of(&mut self, _res: ResourceId, ev: &Event, out: &mut BTreeSet<String>) {
        let mine = |o: &crate::store::Obj| super::node_of(o) == Some(&self.node);
        if mine(&ev.obj) || ev.prev.as_deref().is_some_and(mine) {
            out.insert(ev.obj.key.to_string());
        }
    }

    fn all_keys(&mut self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self.runs.keys().cloned().collect();
        let _ = self
            .ctx
            .machinery
            .store()
            .scan(PODS, None, None, None, |o| {
                if super::node_of(o) == Some(&self.node) {
                    out.insert(o.key.to_string());
                }
                true
            });
        out
    }

    fn reconcile(&mut self, key: &str) -> Option<Duration> {
        self.sync(key)
    }

    fn follows_control(&self) -> bool {
        true
    }
}
