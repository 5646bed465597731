//! The Deployment controller, after upstream's: one ReplicaSet per pod
//! template (named `{deployment}-{pod-template-hash}`), RollingUpdate
//! within maxSurge/maxUnavailable, Recreate, `paused`, revisions and
//! history cleanup, and status with the Available and Progressing
//! conditions (including `ProgressDeadlineExceeded`).
//!
//! Availability is counted from the pods themselves (not from possibly
//! stale ReplicaSet status), so scale-downs never overshoot.

use super::{
    Ctx, Reconciler, i64_at, owned_pods, owner_keys, pod_active, pod_available, set_condition,
    split_key, str_at,
};
use crate::machinery::{PatchKind, Sub};
use crate::resources::ResourceId;
use crate::resources::ids::{DEPLOYMENTS, PODS, REPLICASETS};
use crate::store::Event;
use crate::util;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

const MANAGER: &str = "kube-controller-manager";
const COMPONENT: &str = "deployment-controller";
/// Annotation carrying the revision on Deployments and ReplicaSets.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// Label distinguishing the pods of each template.
pub const HASH_LABEL: &str = "pod-template-hash";

/// Reconciles Deployments.
pub struct DeploymentController {
    ctx: Ctx,
}

impl DeploymentController {
    /// A controller over the shared context.
    pub fn new(ctx: Ctx) -> Self {
        DeploymentController { ctx }
    }
}

/// Upstream's `ComputeHash`: FNV-1a of the template (and collision count),
/// safe-encoded.
pub fn template_hash(template: &Value, collision: Option<i64>) -> String {
    let mut h: u32 = 0x811c9dc5;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x01000193);
        }
    };
    feed(&serde_json::to_vec(template).unwrap_or_default());
    if let Some(c) = collision {
        feed(&c.to_le_bytes());
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|b| ALPHABET[(b as usize) % ALPHABET.len()] as char)
        .collect()
}

/// A template without the `pod-template-hash` label, for comparison.
fn strip_hash(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(l) = t
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        l.remove(HASH_LABEL);
    }
    t
}

/// Resolves an int-or-percent against `total`, rounding up or down.
fn int_or_percent(v: Option<&Value>, total: i64, round_up: bool, default: i64) -> i64 {
    match v {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(default),
        Some(Value::String(s)) => match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
            Some(p) => {
                let x = p * total;
                if round_up { (x + 99) / 100 } else { x / 100 }
            }
            None => s.parse().unwrap_or(default),
        },
        _ => default,
    }
}

/// `(maxSurge, maxUnavailable)` of a RollingUpdate Deployment.
pub fn surge_and_unavailable(d: &Value) -> (i64, i64) {
    let replicas = i64_at(d, "/spec/replicas").unwrap_or(1);
    if str_at(d, "/spec/strategy/type") == Some("Recreate") {
        return (0, replicas);
    }
    let ru = d.pointer("/spec/strategy/rollingUpdate");
    let surge = int_or_percent(ru.and_then(|r| r.get("maxSurge")), replicas, true, 1);
    let mut unavailable =
        int_or_percent(ru.and_then(|r| r.get("maxUnavailable")), replicas, false, 0);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable.min(replicas))
}

struct Rs {
    name: String,
    value: Value,
    replicas: i64,
    active: i64,
    ready: i64,
    available: i64,
    revision: i64,
}

impl Reconciler for DeploymentController {
    fn resources(&self) -> Vec<ResourceId> {
        vec![DEPLOYMENTS, REPLICASETS, PODS]
    }

    fn keys_of(&mut self, res: ResourceId, ev: &Event, out: &mut BTreeSet<String>) {
        let m = &self.ctx.machinery;
        match res {
            DEPLOYMENTS => {
                out.insert(ev.obj.key.to_string());
            }
            REPLICASETS => out.extend(owner_keys(m, ev, DEPLOYMENTS)),
            _ => {
                for rs in owner_keys(m, ev, REPLICASETS) {
                    if let Some(o) = m.store().get(REPLICASETS, &rs) {
                        for u in o.owners.iter() {
                            if let Some((DEPLOYMENTS, d)) = m.store().by_uid(u) {
                                out.insert(d.key.to_string());
                            }
                        }
                    }
                }
            }
        }
    }

    fn all_keys(&mut self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let _ = self
            .ctx
            .machinery
            .store()
            .scan(DEPLOYMENTS, None, None, None, |o| {
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

impl DeploymentController {
    fn sync(&self, key: &str) -> Result<Option<Duration>, crate::error::ApiError> {
        let m = &self.ctx.machinery;
        let Some(obj) = m.store().get(DEPLOYMENTS, key) else {
            return Ok(None);
        };
        let d = obj.value();
        if d.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(None);
        }
        let (ns, name) = split_key(key);
        let replicas = i64_at(&d, "/spec/replicas").unwrap_or(1);
        let paused = d.pointer("/spec/paused").and_then(Value::as_bool) == Some(true);
        let min_ready = i64_at(&d, "/spec/minReadySeconds").unwrap_or(0);
        let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let mut requeue: Option<Duration> = None;
        let mut rss = self.replica_sets(&obj.uid, min_ready, &mut requeue);
        let new_idx = rss
            .iter()
            .position(|rs| strip_hash(&rs.value["spec"]["template"]) == template);
        let max_rev = rss.iter().map(|r| r.revision).max().unwrap_or(0);
        let mut conds: Vec<Value> = d
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let (surge, unavailable) = surge_and_unavailable(&d);
        let mut created_new = None;
        if paused {
            if conds
                .iter()
                .find(|c| c["type"] == "Progressing")
                .is_none_or(|c| c["reason"] != "DeploymentPaused")
            {
                set_condition(
                    &mut conds,
                    "Progressing",
                    "Unknown",
                    "DeploymentPaused",
                    "Deployment is paused",
                    true,
                );
            }
            // Scaling still applies to the only active ReplicaSet.
            let active: Vec<usize> = (0..rss.len()).filter(|i| rss[*i].replicas > 0).collect();
            let target = match (active.as_slice(), new_idx) {
                ([i], _) => Some(*i),
                ([], Some(i)) => Some(i),
                _ => None,
            };
            if let Some(i) = target
                && rss[i].replicas != replicas
            {
                self.scale(&d, &mut rss[i], replicas, surge)?;
            }
        } else {
            if conds
                .iter()
                .find(|c| c["type"] == "Progressing")
                .is_some_and(|c| c["reason"] == "DeploymentPaused")
            {
                set_condition(
                    &mut conds,
                    "Progressing",
                    "Unknown",
                    "DeploymentResumed",
                    "Deployment is resumed",
                    true,
                );
            }
            let recreate = str_at(&d, "/spec/strategy/type") == Some("Recreate");
            let new_idx = match new_idx {
                Some(i) => {
                    if rss[i].revision < max_rev {
                        self.set_revision(&mut rss[i], max_rev + 1)?;
                    }
                    i
                }
                None => {
                    let current: i64 = rss.iter().map(|r| r.replicas).sum();
                    let start = if recreate {
                        0
                    } else if rss.is_empty() {
                        replicas
                    } else {
                        (replicas + surge - current).clamp(0, replicas)
                    };
                    let rs = self.create_rs(&d, &template, start, max_rev + 1, surge)?;
                    let rs_name = rs.name.clone();
                    created_new = Some(rs_name.clone());
                    set_condition(
                        &mut conds,
                        "Progressing",
                        "True",
                        "NewReplicaSetCreated",
                        &format!("Created new replica set \"{rs_name}\""),
                        true,
                    );
                    rss.push(rs);
                    rss.len() - 1
                }
            };
            if recreate {
                self.recreate(&d, &mut rss, new_idx, replicas)?;
            } else {
                self.rolling(&d, &mut rss, new_idx, replicas, surge, unavailable)?;
            }
            self.cleanup(&d, &rss, new_idx);
        }
        // Status.
        let new_rs = rss
            .iter()
            .find(|rs| strip_hash(&rs.value["spec"]["template"]) == template);
        let total_spec: i64 = rss.iter().map(|r| r.replicas).sum();
        let status_replicas: i64 = rss.iter().map(|r| r.active).sum();
        let ready: i64 = rss.iter().map(|r| r.ready).sum();
        let available: i64 = rss.iter().map(|r| r.available).sum();
        let updated = new_rs.map(|r| r.active).unwrap_or(0);
        let generation = i64_at(&d, "/metadata/generation").unwrap_or(1);
        if available >= replicas - unavailable {
            set_condition_keep(
                &mut conds,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            );
        } else {
            set_condition_keep(
                &mut conds,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            );
        }
        let old = d.get("status").cloned().unwrap_or(json!({}));
        let deadline = i64_at(&d, "/spec/progressDeadlineSeconds");
        if !paused && created_new.is_none() && deadline.is_some() {
            let rs_name = new_rs.map(|r| r.name.clone()).unwrap_or_default();
            let cur = conds.iter().find(|c| c["type"] == "Progressing").cloned();
            let complete_cond = cur
                .as_ref()
                .is_some_and(|c| c["reason"] == "NewReplicaSetAvailable");
            let complete =
                updated == replicas && status_replicas == replicas && available == replicas;
            let old_old = i64_at(&old, "/replicas").unwrap_or(0)
                - i64_at(&old, "/updatedReplicas").unwrap_or(0);
            let progressing = updated > i64_at(&old, "/updatedReplicas").unwrap_or(0)
                || status_replicas - updated < old_old
                || ready > i64_at(&old, "/readyReplicas").unwrap_or(0)
                || available > i64_at(&old, "/availableReplicas").unwrap_or(0);
            if !(status_replicas == updated && complete_cond) {
                if complete {
                    set_condition(
                        &mut conds,
                        "Progressing",
                        "True",
                        "NewReplicaSetAvailable",
                        &format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
                        true,
                    );
                } else if progressing {
                    let mut c = json!({
                        "type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                        "message": format!("ReplicaSet \"{rs_name}\" is progressing."),
                        "lastUpdateTime": util::now_rfc3339(),
                        "lastTransitionTime": util::now_rfc3339(),
                    });
                    if let Some(p) = &cur
                        && p["status"] == "True"
                    {
                        c["lastTransitionTime"] = p["lastTransitionTime"].clone();
                    }
                    conds.retain(|c| c["type"] != "Progressing");
                    conds.push(c);
                } else if let Some(p) = &cur
                    && p["reason"] != "ProgressDeadlineExceeded"
                {
                    let from = p["lastUpdateTime"]
                        .as_str()
                        .and_then(util::parse_rfc3339)
                        .unwrap_or(0);
                    let left = from + deadline.unwrap_or(600) - util::now_secs();
                    if left < 0 {
                        set_condition(
                            &mut conds,
                            "Progressing",
                            "False",
                            "ProgressDeadlineExceeded",
                            &format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
                            true,
                        );
                    } else {
                        let after = Duration::from_millis((left as u64 + 1) * 1000);
                        requeue = Some(requeue.map_or(after, |r| r.min(after)));
                    }
                }
            }
        }
        let mut status = json!({
            "observedGeneration": generation,
            "replicas": status_replicas,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": available,
            "unavailableReplicas": (total_spec - available).max(0),
            "conditions": conds,
        });
        if let Some(c) = old.get("collisionCount") {
            status["collisionCount"] = c.clone();
        }
        for k in [
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
        ] {
            if status[k] == 0 {
                status.as_object_mut().map(|s| s.remove(k));
            }
        }
        if status["unavailableReplicas"] == 0 {
            status
                .as_object_mut()
                .map(|s| s.remove("unavailableReplicas"));
        }
        let mut annotations_changed = false;
        let mut body = d.clone();
        if let Some(rs) = new_rs {
            let rev = rs.revision.to_string();
            if str_at(
                &d,
                &format!("/metadata/annotations/{}", REVISION.replace('/', "~1")),
            ) != Some(rev.as_str())
            {
                body["metadata"]["annotations"][REVISION] = json!(rev);
                annotations_changed = true;
            }
        }
        if annotations_changed {
            let v = m.update(
                DEPLOYMENTS,
                Some(ns),
                name,
                body,
                Sub::Main,
                &Ctx::opts(MANAGER),
            )?;
            body = v;
        }
        if body.get("status") != Some(&status) {
            body["status"] = status;
            m.update(
                DEPLOYMENTS,
                Some(ns),
                name,
                body,
                Sub::Status,
                &Ctx::opts(MANAGER),
            )?;
        }
        Ok(requeue)
    }

    fn replica_sets(&self, uid: &str, min_ready: i64, requeue: &mut Option<Duration>) -> Vec<Rs> {
        let m = &self.ctx.machinery;
        let mut out: Vec<Rs> = m
            .store()
            .dependents(uid)
            .into_iter()
            .filter(|(res, _)| *res == REPLICASETS)
            .map(|(_, o)| {
                let v = o.value();
                let pods = owned_pods(m, &o.uid);
                let mut active = 0;
                let mut ready = 0;
                let mut available = 0;
                for p in pods.iter().filter(|p| pod_active(p)) {
                    active += 1;
                    if super::pod_ready(p) {
                        ready += 1;
                    }
                    let (a, left) = pod_available(p, min_ready);
                    if a {
                        available += 1;
                    }
                    if let Some(l) = left {
                        *requeue = Some(requeue.map_or(l, |r| r.min(l)));
                    }
                }
                Rs {
                    name: o.name().to_string(),
                    replicas: i64_at(&v, "/spec/replicas").unwrap_or(0),
                    revision: str_at(
                        &v,
                        &format!("/metadata/annotations/{}", REVISION.replace('/', "~1")),
                    )
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0),
                    value: v,
                    active,
                    ready,
                    available,
                }
            })
            .filter(|rs| rs.value.pointer("/metadata/deletionTimestamp").is_none())
            .collect();
        out.sort_by(|a, b| {
            let ta = str_at(&a.value, "/metadata/creationTimestamp").unwrap_or("");
            let tb = str_at(&b.value, "/metadata/creationTimestamp").unwrap_or("");
            (a.revision, ta, &a.name).cmp(&(b.revision, tb, &b.name))
        });
        out
    }

    fn create_rs(
        &self,
        d: &Value,
        template: &Value,
        replicas: i64,
        revision: i64,
        surge: i64,
    ) -> Result<Rs, crate::error::ApiError> {
        let m = &self.ctx.machinery;
        let ns = str_at(d, "/metadata/namespace").unwrap_or("default");
        let dname = str_at(d, "/metadata/name").unwrap_or("");
        let collision = i64_at(d, "/status/collisionCount");
        let hash = template_hash(template, collision);
        let mut t = template.clone();
        t["metadata"]["labels"][HASH_LABEL] = json!(hash);
        let mut selector = d.pointer("/spec/selector").cloned().unwrap_or(json!({}));
        selector["matchLabels"][HASH_LABEL] = json!(hash);
        let dr = i64_at(d, "/spec/replicas").unwrap_or(1);
        let rs = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {
                "name": format!("{dname}-{hash}"), "namespace": ns,
                "labels": t["metadata"]["labels"].clone(),
                "annotations": {
                    REVISION: revision.to_string(),
                    "deployment.kubernetes.io/desired-replicas": dr.to_string(),
                    "deployment.kubernetes.io/max-replicas": (dr + surge).to_string(),
                },
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "Deployment", "name": dname,
                    "uid": d["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": {
                "replicas": replicas,
                "minReadySeconds": i64_at(d, "/spec/minReadySeconds").unwrap_or(0),
                "selector": selector,
                "template": t,
            },
        });
        let v = m.create(REPLICASETS, Some(ns), rs, &Ctx::opts(MANAGER))?;
        let name = str_at(&v, "/metadata/name").unwrap_or("").to_string();
        if replicas > 0 {
            self.ctx.event(
                d,
                "apps/v1",
                "Deployment",
                "Normal",
                "ScalingReplicaSet",
                &format!("Scaled up replica set {name} to {replicas}"),
                COMPONENT,
                None,
            );
        }
        Ok(Rs {
            name,
            value: v,
            replicas,
            active: 0,
            ready: 0,
            available: 0,
            revision,
        })
    }

    fn set_revision(&self, rs: &mut Rs, revision: i64) -> Result<(), crate::error::ApiError> {
        let ns = str_at(&rs.value, "/metadata/namespace").unwrap_or("default");
        let v = self.ctx.machinery.patch(
            REPLICASETS,
            Some(ns),
            &rs.name,
            PatchKind::Merge,
            &json!({"metadata": {"annotations": {REVISION: revision.to_string()}}}),
            Sub::Main,
            &Ctx::opts(MANAGER),
        )?;
        rs.value = v;
        rs.revision = revision;
        Ok(())
    }

    fn scale(
        &self,
        d: &Value,
        rs: &mut Rs,
        to: i64,
        surge: i64,
    ) -> Result<(), crate::error::ApiError> {
        let ns = str_at(&rs.value, "/metadata/namespace").unwrap_or("default");
        let dr = i64_at(d, "/spec/replicas").unwrap_or(1);
        let v = self.ctx.machinery.patch(
            REPLICASETS,
            Some(ns),
            &rs.name,
            PatchKind::Merge,
            &json!({
                "metadata": {"annotations": {
                    "deployment.kubernetes.io/desired-replicas": dr.to_string(),
                    "deployment.kubernetes.io/max-replicas": (dr + surge).to_string(),
                }},
                "spec": {"replicas": to},
            }),
            Sub::Main,
            &Ctx::opts(MANAGER),
        )?;
        let dir = if to > rs.replicas { "up" } else { "down" };
        self.ctx.event(
            d,
            "apps/v1",
            "Deployment",
            "Normal",
            "ScalingReplicaSet",
            &format!(
                "Scaled {dir} replica set {} from {} to {to}",
                rs.name, rs.replicas
            ),
            COMPONENT,
            None,
        );
        rs.value = v;
        rs.replicas = to;
        Ok(())
    }

    fn recreate(
        &self,
        d: &Value,
        rss: &mut [Rs],
        new_idx: usize,
        replicas: i64,
    ) -> Result<(), crate::error::ApiError> {
        let mut scaled = false;
        for (i, rs) in rss.iter_mut().enumerate() {
            if i != new_idx && rs.replicas > 0 {
                self.scale(d, rs, 0, 0)?;
                scaled = true;
            }
        }
        if scaled {
            return Ok(());
        }
        // Wait until every old pod is gone (terminating ones included).
        let m = &self.ctx.machinery;
        let old_pods = rss.iter().enumerate().any(|(i, rs)| {
            i != new_idx
                && owned_pods(m, str_at(&rs.value, "/metadata/uid").unwrap_or(""))
                    .iter()
                    .any(|p| {
                        !matches!(
                            str_at(p, "/status/phase"),
                            Some("Succeeded") | Some("Failed")
                        )
                    })
        });
        if !old_pods && rss[new_idx].replicas != replicas {
            self.scale(d, &mut rss[new_idx], replicas, 0)?;
        }
        Ok(())
    }

    fn rolling(
        &self,
        d: &Value,
        rss: &mut [Rs],
        new_idx: usize,
        replicas: i64,
        surge: i64,
        max_unavailable: i64,
    ) -> Result<(), crate::error::ApiError> {
        // Scale the new ReplicaSet up (or down) within maxSurge.
        let new_replicas = rss[new_idx].replicas;
        if new_replicas > replicas {
            self.scale(d, &mut rss[new_idx], replicas, surge)?;
            return Ok(());
        }
        if new_replicas < replicas {
            // Pods still running beyond their ReplicaSet's count (being
            // deleted) count too, so live pods never exceed the surge.
            let current: i64 = rss.iter().map(|r| r.replicas.max(r.active)).sum();
            let up = (replicas + surge - current).min(replicas - new_replicas);
            if up > 0 {
                self.scale(d, &mut rss[new_idx], new_replicas + up, surge)?;
                return Ok(());
            }
        }
        // Scale old ReplicaSets down within maxUnavailable.
        let old_total: i64 = (0..rss.len())
            .filter(|i| *i != new_idx)
            .map(|i| rss[i].replicas)
            .sum();
        if old_total == 0 {
            return Ok(());
        }
        let all: i64 = rss.iter().map(|r| r.replicas).sum();
        let min_available = replicas - max_unavailable;
        let new_unavailable = (rss[new_idx].replicas - rss[new_idx].available).max(0);
        let mut max_down = all - min_available - new_unavailable;
        if max_down <= 0 {
            return Ok(());
        }
        // First the old pods that are not available anyway.
        for (i, rs) in rss.iter_mut().enumerate() {
            if i == new_idx || max_down <= 0 {
                continue;
            }
            let unhealthy = (rs.replicas - rs.available).max(0).min(max_down);
            if unhealthy > 0 {
                let to = rs.replicas - unhealthy;
                self.scale(d, rs, to, surge)?;
                max_down -= unhealthy;
            }
        }
        // Then available ones, as long as enough stay available.
        let available: i64 = rss.iter().map(|r| r.available.min(r.replicas)).sum();
        let mut down = available - min_available;
        for (i, rs) in rss.iter_mut().enumerate() {
            if i == new_idx || down <= 0 {
                continue;
            }
            let by = rs.replicas.min(down);
            if by > 0 {
                let to = rs.replicas - by;
                self.scale(d, rs, to, surge)?;
                down -= by;
            }
        }
        Ok(())
    }

    fn cleanup(&self, d: &Value, rss: &[Rs], new_idx: usize) {
        let limit = i64_at(d, "/spec/revisionHistoryLimit").unwrap_or(10).max(0) as usize;
        let idle: Vec<&Rs> = rss
            .iter()
            .enumerate()
            .filter(|(i, rs)| *i != new_idx && rs.replicas == 0 && rs.active == 0)
            .map(|(_, rs)| rs)
            .collect();
        if idle.len() <= limit {
            return;
        }
        for rs in &idle[..idle.len() - limit] {
            let ns = str_at(&rs.value, "/metadata/namespace").unwrap_or("default");
            let _ = self.ctx.machinery.delete(
                REPLICASETS,
                Some(ns),
                &rs.name,
                &crate::machinery::DeleteOptions::default(),
            );
        }
    }
}

/// Sets a condition that keeps both times while its status and reason hold.
fn set_condition_keep(conds: &mut Vec<Value>, type_: &str, status: &str, reason: &str, msg: &str) {
    if conds
        .iter()
        .any(|c| c["type"] == type_ && c["status"] == status && c["reason"] == reason)
    {
        return;
    }
    set_condition(conds, type_, status, reason, msg, true);
}
