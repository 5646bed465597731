//! The ReplicaSet controller: keeps `spec.replicas` active pods, deleting
//! the least useful first (unscheduled, pending, not ready, newest), and
//! reports status (replicas, ready, available, observedGeneration).

use super::{
    Ctx, Reconciler, i64_at, owned_pods, owner_keys, pod_active, pod_available, pod_ready,
    split_key, str_at,
};
use crate::machinery::{DeleteOptions, Sub};
use crate::resources::ResourceId;
use crate::resources::ids::{PODS, REPLICASETS};
use crate::store::Event;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

const MANAGER: &str = "kube-controller-manager";
const COMPONENT: &str = "replicaset-controller";

/// Reconciles ReplicaSets.
pub struct ReplicaSetController {
    ctx: Ctx,
}

impl ReplicaSetController {
    /// A controller over the shared context.
    pub fn new(ctx: Ctx) -> Self {
        ReplicaSetController { ctx }
    }

    fn sync(&self, key: &str) -> Result<Option<Duration>, crate::error::ApiError> {
        let m = &self.ctx.machinery;
        let Some(obj) = m.store().get(REPLICASETS, key) else {
            return Ok(None);
        };
        let rs = obj.value();
        let (ns, name) = split_key(key);
        let replicas = i64_at(&rs, "/spec/replicas").unwrap_or(1);
        let min_ready = i64_at(&rs, "/spec/minReadySeconds").unwrap_or(0);
        let deleting = rs.pointer("/metadata/deletionTimestamp").is_some();
        let mut pods: Vec<Value> = owned_pods(m, &obj.uid)
            .into_iter()
            .filter(pod_active)
            .collect();
        let diff = pods.len() as i64 - replicas;
        if !deleting && diff < 0 {
            let template = rs.pointer("/spec/template").cloned().unwrap_or(json!({}));
            for _ in 0..(-diff) {
                let mut pod = json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {
                        "generateName": format!("{name}-"), "namespace": ns,
                        "labels": template.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
                        "ownerReferences": [{
                            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name,
                            "uid": &*obj.uid, "controller": true, "blockOwnerDeletion": true,
                        }],
                    },
                    "spec": template.get("spec").cloned().unwrap_or(json!({})),
                });
                if let Some(a) = template.pointer("/metadata/annotations") {
                    pod["metadata"]["annotations"] = a.clone();
                }
                let created = m.create(PODS, Some(ns), pod, &Ctx::opts(MANAGER))?;
                self.ctx.event(
                    &rs,
                    "apps/v1",
                    "ReplicaSet",
                    "Normal",
                    "SuccessfulCreate",
                    &format!(
                        "Created pod: {}",
                        str_at(&created, "/metadata/name").unwrap_or("")
                    ),
                    COMPONENT,
                    None,
                );
                pods.push(created);
            }
        } else if diff > 0 {
            // Least useful first.
            let rank = |p: &Value| {
                (
                    p.pointer("/spec/nodeName").is_some(),
                    str_at(p, "/status/phase") == Some("Running"),
                    pod_ready(p),
                    std::cmp::Reverse(
                        str_at(p, "/metadata/creationTimestamp")
                            .unwrap_or("")
                            .to_string(),
                    ),
                )
            };
            pods.sort_by_key(rank);
            let doomed: Vec<Value> = pods.drain(..diff as usize).collect();
            for p in doomed {
                let pname = str_at(&p, "/metadata/name").unwrap_or("").to_string();
                match m.delete(PODS, Some(ns), &pname, &DeleteOptions::default()) {
                    Ok(_) => self.ctx.event(
                        &rs,
                        "apps/v1",
                        "ReplicaSet",
                        "Normal",
                        "SuccessfulDelete",
                        &format!("Deleted pod: {pname}"),
                        COMPONENT,
                        None,
                    ),
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let mut requeue = None;
        let mut ready = 0;
        let mut available = 0;
        for p in &pods {
            if pod_ready(p) {
                ready += 1;
            }
            let (a, left) = pod_available(p, min_ready);
            if a {
                available += 1;
            }
            if left.is_some() {
                requeue = left;
            }
        }
        let mut status = json!({
            "replicas": pods.len(),
            "fullyLabeledReplicas": pods.len(),
            "readyReplicas": ready,
            "availableReplicas": available,
            "observedGeneration": i64_at(&rs, "/metadata/generation").unwrap_or(1),
        });
        for k in ["fullyLabeledReplicas", "readyReplicas", "availableReplicas"] {
            if status[k] == 0 {
                status.as_object_mut().map(|s| s.remove(k));
            }
        }
        if rs.get("status") != Some(&status) {
            let mut body = rs;
            body["status"] = status;
            m.update(
                REPLICASETS,
                Some(ns),
                name,
                body,
                Sub::Status,
                &Ctx::opts(MANAGER),
            )?;
        }
        Ok(requeue)
    }
}

impl Reconciler for ReplicaSetController {
    fn resources(&self) -> Vec<ResourceId> {
        vec![REPLICASETS, PODS]
    }

    fn keys_of(&mut self, res: ResourceId, ev: &Event, out: &mut BTreeSet<String>) {
        if res == REPLICASETS {
            out.insert(ev.obj.key.to_string());
        } else {
            out.extend(owner_keys(&self.ctx.machinery, ev, REPLICASETS));
        }
    }

    fn all_keys(&mut self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let _ = self
            .ctx
            .machinery
            .store()
            .scan(REPLICASETS, None, None, None, |o| {
                out.insert(o.key.to_string());
                true
            });
        out
    }

    fn reconcile(&mut self, key: &str) -> Option<Duration> {
        match self.sync(key) {
            Ok(after) => after,
            Err(_) => Some(Duration::from_millis(50)),
        }
    }
}
