//! Defaulting of the fields keelson and kubectl rely on, as the API server
//! does on create and update.

use serde_json::{Map, Value, json};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

fn obj(v: &mut Value) -> Option<&mut Map<String, Value>> {
    v.as_object_mut()
}

fn set_default(m: &mut Map<String, Value>, k: &str, v: Value) {
    if m.get(k).is_none_or(Value::is_null) {
        m.insert(k.to_string(), v);
    }
}

fn child<'a>(m: &'a mut Map<String, Value>, k: &str) -> &'a mut Map<String, Value> {
    let e = m.entry(k.to_string()).or_insert_with(|| json!({}));
    if !e.is_object() {
        *e = json!({});
    }
    e.as_object_mut().expect("just made an object")
}

/// Allocates service cluster IPs and node ports.
#[derive(Debug, Default)]
pub struct Allocator {
    next_ip: AtomicU32,
    next_port: AtomicU32,
}

impl Allocator {
    fn cluster_ip(&self) -> String {
        // 10.96.0.0/12, skipping .0 to .9 (the cluster's own services).
        let n = self.next_ip.fetch_add(1, Ordering::Relaxed) + 10;
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + n).to_string()
    }

    fn node_port(&self) -> u32 {
        30000 + self.next_port.fetch_add(1, Ordering::Relaxed) % 2768
    }
}

/// Applies the defaults of `kind` to `obj`.
pub fn apply_defaults(kind: &str, o: &mut Value, alloc: &Allocator) {
    let name = o
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(m) = obj(o) else { return };
    match kind {
        "Namespace" => {
            let labels = child(child(m, "metadata"), "labels");
            labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            set_default(child(m, "spec"), "finalizers", json!(["kubernetes"]));
            set_default(child(m, "status"), "phase", json!("Active"));
        }
        "Pod" => {
            pod_spec(child(m, "spec"));
            let status = child(m, "status");
            set_default(status, "phase", json!("Pending"));
            set_default(status, "qosClass", json!("BestEffort"));
        }
        "Deployment" => {
            let spec = child(m, "spec");
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            let strategy = child(spec, "strategy");
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy.get("type") == Some(&json!("RollingUpdate")) {
                let ru = child(strategy, "rollingUpdate");
                set_default(ru, "maxSurge", json!("25%"));
                set_default(ru, "maxUnavailable", json!("25%"));
            }
            template(spec);
        }
        "ReplicaSet" => {
            let spec = child(m, "spec");
            set_default(spec, "replicas", json!(1));
            template(spec);
        }
        "StatefulSet" => {
            let spec = child(m, "spec");
            set_default(spec, "replicas", json!(1));
            set_default(spec, "podManagementPolicy", json!("OrderedReady"));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
            );
            template(spec);
        }
        "DaemonSet" => {
            let spec = child(m, "spec");
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
            );
            template(spec);
        }
        "Job" => {
            let spec = child(m, "spec");
            set_default(spec, "parallelism", json!(1));
            set_default(spec, "completions", json!(1));
            set_default(spec, "backoffLimit", json!(6));
            set_default(spec, "completionMode", json!("NonIndexed"));
            set_default(spec, "suspend", json!(false));
            template(spec);
        }
        "Service" => service(m, alloc),
        "Secret" => set_default(m, "type", json!("Opaque")),
        "HorizontalPodAutoscaler" => {
            let spec = child(m, "spec");
            set_default(spec, "minReplicas", json!(1));
        }
        _ => {}
    }
}

fn template(spec: &mut Map<String, Value>) {
    let t = child(spec, "template");
    pod_spec(child(t, "spec"));
}

fn pod_spec(spec: &mut Map<String, Value>) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    if let Some(sa) = spec.get("serviceAccountName").cloned() {
        set_default(spec, "serviceAccount", sa);
    }
    for list in ["initContainers", "containers"] {
        if let Some(Value::Array(cs)) = spec.get_mut(list) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                container(c);
            }
        }
    }
    if let Some(Value::Array(vols)) = spec.get_mut("volumes") {
        for v in vols.iter_mut().filter_map(Value::as_object_mut) {
            for (src, key) in [("configMap", "defaultMode"), ("secret", "defaultMode")] {
                if let Some(s) = v.get_mut(src).and_then(Value::as_object_mut) {
                    set_default(s, key, json!(420));
                }
            }
        }
    }
}

fn container(c: &mut Map<String, Value>) {
    let image = c.get("image").and_then(Value::as_str).unwrap_or("");
    let last = image.rsplit('/').next().unwrap_or(image);
    let policy = if !last.contains(':') || last.ends_with(":latest") {
        "Always"
    } else {
        "IfNotPresent"
    };
    set_default(c, "imagePullPolicy", json!(policy));
    set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(c, "terminationMessagePolicy", json!("File"));
    set_default(c, "resources", json!({}));
    if let Some(Value::Array(ports)) = c.get_mut("ports") {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe).and_then(Value::as_object_mut) {
            set_default(p, "timeoutSeconds", json!(1));
            set_default(p, "periodSeconds", json!(10));
            set_default(p, "successThreshold", json!(1));
            set_default(p, "failureThreshold", json!(3));
            if let Some(h) = p.get_mut("httpGet").and_then(Value::as_object_mut) {
                set_default(h, "scheme", json!("HTTP"));
            }
        }
    }
}

fn service(m: &mut Map<String, Value>, alloc: &Allocator) {
    let spec = child(m, "spec");
    set_default(spec, "type", json!("ClusterIP"));
    set_default(spec, "sessionAffinity", json!("None"));
    let ty = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if ty != "ExternalName" {
        if spec
            .get("clusterIP")
            .is_none_or(|v| v.as_str().is_none_or(str::is_empty))
        {
            spec.insert("clusterIP".into(), json!(alloc.cluster_ip()));
        }
        let ip = spec["clusterIP"].clone();
        set_default(spec, "clusterIPs", json!([ip]));
        set_default(spec, "ipFamilies", json!(["IPv4"]));
        set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
        set_default(spec, "internalTrafficPolicy", json!("Cluster"));
    }
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
            if let Some(port) = p.get("port").cloned() {
                set_default(p, "targetPort", port);
            }
            if (ty == "NodePort" || ty == "LoadBalancer") && p.get("nodePort").is_none() {
                p.insert("nodePort".into(), json!(alloc.node_port()));
            }
        }
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        set_default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    set_default(child(m, "status"), "loadBalancer", json!({}));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_and_container_defaults() {
        let mut d = json!({"metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "nginx", "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "reg:5000/app:1.2"}
        ]}}}});
        apply_defaults("Deployment", &mut d, &Allocator::default());
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let cs = &d["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["imagePullPolicy"], "Always");
        assert_eq!(cs[1]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(cs[0]["ports"][0]["protocol"], "TCP");
    }

    #[test]
    fn services_get_distinct_cluster_ips() {
        let a = Allocator::default();
        let mut s1 = json!({"spec": {"ports": [{"port": 80}]}});
        let mut s2 = json!({"spec": {"ports": [{"port": 80}]}});
        apply_defaults("Service", &mut s1, &a);
        apply_defaults("Service", &mut s2, &a);
        assert_ne!(s1["spec"]["clusterIP"], s2["spec"]["clusterIP"]);
        assert_eq!(s1["spec"]["ports"][0]["targetPort"], 80);
    }
}
