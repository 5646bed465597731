//! The scheduler: binds each unbound pod to a ready, schedulable node,
//! spreading the pods of one owner across zones and then nodes (a loose
//! topology spread), and records `Scheduled` / `FailedScheduling` events.

use super::{Ctx, Reconciler, str_at};
use crate::machinery::{PatchKind, Sub};
use crate::resources::ResourceId;
use crate::resources::ids::{NODES, PODS};
use crate::store::Event;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

const MANAGER: &str = "kube-scheduler";
const COMPONENT: &str = "default-scheduler";
const ZONE: &str = "topology.kubernetes.io/zone";

/// Binds pods to nodes.
pub struct Scheduler {
    ctx: Ctx,
    turn: usize,
}

impl Scheduler {
    /// A scheduler over the shared context.
    pub fn new(ctx: Ctx) -> Self {
        Scheduler { ctx, turn: 0 }
    }

    fn nodes(&self) -> (Vec<(String, String)>, usize) {
        let mut ready = Vec::new();
        let mut total = 0;
        let _ = self
            .ctx
            .machinery
            .store()
            .scan(NODES, None, None, None, |o| {
                total += 1;
                let v = o.value();
                let is_ready = super::condition(&v, "Ready").is_some_and(|c| c["status"] == "True");
                let unschedulable =
                    v.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true);
                let tainted = v
                    .pointer("/spec/taints")
                    .and_then(Value::as_array)
                    .is_some_and(|t| t.iter().any(|t| t["effect"] == "NoSchedule"));
                if is_ready && !unschedulable && !tainted {
                    ready.push((
                        o.name().to_string(),
                        o.label(ZONE).unwrap_or("").to_string(),
                    ));
                }
                true
            });
        (ready, total)
    }
}

impl Reconciler for Scheduler {
    fn resources(&self) -> Vec<ResourceId> {
        vec![PODS, NODES]
    }

    fn keys_of(&mut self, res: ResourceId, ev: &Event, out: &mut BTreeSet<String>) {
        if res == NODES {
            out.extend(self.all_keys());
        } else if ev.kind != crate::store::EventKind::Deleted && super::node_of(&ev.obj).is_none() {
            out.insert(ev.obj.key.to_string());
        }
    }

    fn all_keys(&mut self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let _ = self
            .ctx
            .machinery
            .store()
            .scan(PODS, None, None, None, |o| {
                if super::node_of(o).is_none() {
                    out.insert(o.key.to_string());
                }
                true
            });
        out
    }

    fn reconcile(&mut self, key: &str) -> Option<Duration> {
        let m = self.ctx.machinery.clone();
        let o = m.store().get(PODS, key)?;
        if super::node_of(&o).is_some() {
            return None;
        }
        let pod = o.value();
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            return None;
        }
        if let Some(s) = str_at(&pod, "/spec/schedulerName")
            && s != COMPONENT
        {
            return None;
        }
        let (ns, name) = super::split_key(key);
        let (nodes, total) = self.nodes();

        if nodes.is_empty() {
            let msg = format!("0/{total} nodes are available: {total} node(s) were not ready.");
            let already = super::condition(&pod, "PodScheduled")
                .is_some_and(|c| c["reason"] == "Unschedulable");
            if !already {
                let _ = m.patch(
                    PODS,
                    Some(ns),
                    name,
                    PatchKind::Strategic,
                    &json!({"status": {"conditions": [{"type": "PodScheduled", "status": "False",
                        "reason": "Unschedulable", "message": msg,
                        "lastTransitionTime": crate::util::now_rfc3339()}]}}),
                    Sub::Status,
                    &Ctx::opts(MANAGER),
                );
                self.ctx.event(
                    &pod,
                    "v1",
                    "Pod",
                    "Warning",
                    "FailedScheduling",
                    &msg,
                    COMPONENT,
                    None,
                );
            }
            return None;
        }
        // Count the owner's pods per zone and node.
        let mut per_zone: HashMap<String, usize> = HashMap::new();
        let mut per_node: HashMap<String, usize> = HashMap::new();
        let zone_of: HashMap<&str, &str> = nodes
            .iter()
            .map(|(n, z)| (n.as_str(), z.as_str()))
            .collect();
        if let Some(owner) = o.owners.first() {
            for (res, sib) in m.store().dependents(owner) {
                if res != PODS {
                    continue;
                }
                if let Some(n) = super::node_of(&sib) {
                    *per_node.entry(n.to_string()).or_default() += 1;
                    if let Some(z) = zone_of.get(n) {
                        *per_zone.entry(z.to_string()).or_default() += 1;
                    }
                }
            }
        }
        self.turn = self.turn.wrapping_add(1);
        let turn = self.turn;
        let count = nodes.len();
        let (node, _) = nodes
            .iter()
            .enumerate()
            .min_by_key(|(i, (n, z))| {
                (
                    per_zone.get(z).copied().unwrap_or(0),
                    per_node.get(n).copied().unwrap_or(0),
                    (i + count - turn % count) % count,
                )
            })
            .map(|(_, x)| x.clone())
            .expect("nodes is not empty");
        let mut body = pod.clone();
        body["spec"]["nodeName"] = json!(node);
        match m.update(PODS, Some(ns), name, body, Sub::Main, &Ctx::opts(MANAGER)) {
            Ok(bound) => {
                self.ctx.event(
                    &bound,
                    "v1",
                    "Pod",
                    "Normal",
                    "Scheduled",
                    &format!("Successfully assigned {ns}/{name} to {node}"),
                    COMPONENT,
                    None,
                );
                None
            }
            Err(_) => Some(Duration::from_millis(50)),
        }
    }
}
