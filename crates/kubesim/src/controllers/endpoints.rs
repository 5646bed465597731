//! Endpoints and EndpointSlices of every Service with a selector: ready
//! pods as addresses, unready ones as `notReadyAddresses` (slices carry
//! ready/serving/terminating conditions). Named target ports resolve
//! against each pod's container ports.

use super::{Ctx, Reconciler, pod_ready, split_key, str_at};
use crate::machinery::Sub;
use crate::resources::ResourceId;
use crate::resources::ids::{ENDPOINTS, ENDPOINTSLICES, PODS, SERVICES};
use crate::selectors::LabelSelector;
use crate::store::{Event, Expect};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

const MANAGER: &str = "kube-controller-manager";

/// Maintains Endpoints and EndpointSlices.
pub struct EndpointsController {
    ctx: Ctx,
}

impl EndpointsController {
    /// A controller over the shared context.
    pub fn new(ctx: Ctx) -> Self {
        EndpointsController { ctx }
    }

    fn services_in(&self, ns: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        let _ = self
            .ctx
            .machinery
            .store()
            .scan(SERVICES, Some(ns), None, None, |o| {
                out.push((o.key.to_string(), o.value()));
                true
            });
        out
    }

    fn sync(&self, key: &str) -> Result<(), crate::error::ApiError> {
        let m = &self.ctx.machinery;
        let (ns, name) = split_key(key);
        let Some(svc_obj) = m.store().get(SERVICES, key) else {
            return Ok(());
        };
        let svc = svc_obj.value();
        let Some(sel) = svc
            .pointer("/spec/selector")
            .filter(|s| s.as_object().is_some_and(|m| !m.is_empty()))
        else {
            return Ok(());
        };
        let selector = LabelSelector::from_json(&json!({"matchLabels": sel}));
        let mut pods = Vec::new();
        let visit = |o: &std::sync::Arc<crate::store::Obj>| {
            if selector.matches(o) {
                pods.push(o.value());
            }
            true
        };
        match selector.first_equality() {
            Some((k, v)) => {
                m.store().scan_label(PODS, Some(ns), k, v, None, visit);
            }
            None => {
                let _ = m.store().scan(PODS, Some(ns), None, None, visit);
            }
        }
        let svc_ports: Vec<Value> = svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let resolve = |p: &Value, pod: &Value| -> Option<i64> {
            match p.get("targetPort") {
                Some(Value::Number(n)) => n.as_i64(),
                Some(Value::String(s)) => pod
                    .pointer("/spec/containers")
                    .and_then(Value::as_array)?
                    .iter()
                    .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                    .find(|cp| cp["name"] == s.as_str())
                    .and_then(|cp| cp["containerPort"].as_i64()),
                _ => p.get("port").and_then(Value::as_i64),
            }
        };
        let mut ready_addrs = Vec::new();
        let mut unready_addrs = Vec::new();
        let mut slice_eps = Vec::new();
        let mut ports: Option<Vec<Value>> = None;
        pods.sort_by(|a, b| str_at(a, "/status/podIP").cmp(&str_at(b, "/status/podIP")));
        for p in &pods {
            let Some(ip) = str_at(p, "/status/podIP") else {
                continue;
            };
            let terminating = p.pointer("/metadata/deletionTimestamp").is_some();
            let ready = pod_ready(p);
            let target = json!({"kind": "Pod", "namespace": ns,
                "name": p["metadata"]["name"], "uid": p["metadata"]["uid"]});
            let mut addr = json!({"ip": ip, "targetRef": target});
            if let Some(n) = str_at(p, "/spec/nodeName") {
                addr["nodeName"] = json!(n);
            }
            if ports.is_none() {
                ports = Some(
                    svc_ports
                        .iter()
                        .filter_map(|sp| {
                            let mut port = json!({"port": resolve(sp, p)?,
                                "protocol": sp.get("protocol").cloned().unwrap_or(json!("TCP"))});
                            if let Some(n) = sp.get("name") {
                                port["name"] = n.clone();
                            }
                            Some(port)
                        })
                        .collect(),
                );
            }
            let mut ep = json!({"addresses": [ip],
                "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
                "targetRef": addr["targetRef"].clone()});
            if let Some(n) = str_at(p, "/spec/nodeName") {
                ep["nodeName"] = json!(n);
            }
            slice_eps.push(ep);
            if terminating {
                continue;
            }
            if ready {
                ready_addrs.push(addr);
            } else {
                unready_addrs.push(addr);
            }
        }
        let ports = ports.unwrap_or_default();
        let mut subset = json!({"ports": ports});
        if !ready_addrs.is_empty() {
            subset["addresses"] = json!(ready_addrs);
        }
        if !unready_addrs.is_empty() {
            subset["notReadyAddresses"] = json!(unready_addrs);
        }
        let subsets = if ready_addrs.is_empty() && unready_addrs.is_empty() {
            json!([])
        } else {
            json!([subset])
        };
        let owner = json!([{"apiVersion": "v1", "kind": "Service", "name": name,
            "uid": &*svc_obj.uid, "controller": true, "blockOwnerDeletion": true}]);
        // Endpoints.
        let labels = svc
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        match m.get(ENDPOINTS, Some(ns), name) {
            Ok(mut cur) => {
                if cur.get("subsets").cloned().unwrap_or(json!([])) != subsets {
                    cur["subsets"] = subsets;
                    m.update(
                        ENDPOINTS,
                        Some(ns),
                        name,
                        cur,
                        Sub::Main,
                        &Ctx::opts(MANAGER),
                    )?;
                }
            }
            Err(_) => {
                m.create(
                    ENDPOINTS,
                    Some(ns),
                    json!({"apiVersion": "v1", "kind": "Endpoints",
                        "metadata": {"name": name, "namespace": ns, "labels": labels},
                        "subsets": subsets}),
                    &Ctx::opts(MANAGER),
                )?;
            }
        }
        // One EndpointSlice per Service.
        let slice_name = format!("{name}-kubesim");
        let slice_ports: Vec<Value> = ports;
        match m.get(ENDPOINTSLICES, Some(ns), &slice_name) {
            Ok(mut cur) => {
                if cur.get("endpoints").cloned().unwrap_or(json!([])) != json!(slice_eps)
                    || cur.get("ports").cloned().unwrap_or(json!([])) != json!(slice_ports)
                {
                    cur["endpoints"] = json!(slice_eps);
                    cur["ports"] = json!(slice_ports);
                    m.update(
                        ENDPOINTSLICES,
                        Some(ns),
                        &slice_name,
                        cur,
                        Sub::Main,
                        &Ctx::opts(MANAGER),
                    )?;
                }
            }
            Err(_) => {
                let mut l = labels.clone();
                l["kubernetes.io/service-name"] = json!(name);
                l["endpointslice.kubernetes.io/managed-by"] =
                    json!("endpointslice-controller.k8s.io");
                m.create(
                    ENDPOINTSLICES,
                    Some(ns),
                    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": slice_name, "namespace": ns, "labels": l,
                            "ownerReferences": owner},
                        "addressType": "IPv4", "endpoints": slice_eps, "ports": slice_ports}),
                    &Ctx::opts(MANAGER),
                )?;
            }
        }
        Ok(())
    }
}

impl Reconciler for EndpointsController {
    fn resources(&self) -> Vec<ResourceId> {
        vec![SERVICES, PODS]
    }

    fn keys_of(&mut self, res: ResourceId, ev: &Event, out: &mut BTreeSet<String>) {
        if res == SERVICES {
            out.insert(ev.obj.key.to_string());
            if ev.kind == crate::store::EventKind::Deleted {
                // Endpoints are not owned (as upstream); remove them here.
                let store = self.ctx.machinery.store();
                if let Some(e) = store.get(ENDPOINTS, &ev.obj.key) {
                    let _ = store.write(ENDPOINTS, &ev.obj.key, Expect::Version(e.rv), None);
                }
            }
            return;
        }
        let ns = ev.obj.namespace().to_string();
        for (key, svc) in self.services_in(&ns) {
            let Some(sel) = svc.pointer("/spec/selector").filter(|s| s.is_object()) else {
                continue;
            };
            let selector = LabelSelector::from_json(&json!({"matchLabels": sel}));
            if selector.is_empty() {
                continue;
            }
            if selector.matches(&ev.obj) || ev.prev.as_deref().is_some_and(|p| selector.matches(p))
            {
                out.insert(key);
            }
        }
    }

    fn all_keys(&mut self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let _ = self
            .ctx
            .machinery
            .store()
            .scan(SERVICES, None, None, None, |o| {
                out.insert(o.key.to_string());
                true
            });
        out
    }

    fn reconcile(&mut self, key: &str) -> Option<Duration> {
        self.sync(key).err().map(|_| Duration::from_millis(50))
    }
}
