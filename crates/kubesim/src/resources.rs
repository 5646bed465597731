//! The resource table: every kind kubesim serves, with the facts that drive
//! discovery, routing, defaulting and the status/scale subresources.
//!
//! One generic machinery serves all of them; adding a kind is adding a row.

/// One served resource (a REST collection such as `apps/v1 deployments`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// API group, `""` for the core group.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// Kind of one object.
    pub kind: &'static str,
    /// Plural, lower-case resource name used in URLs.
    pub plural: &'static str,
    /// Singular, lower-case name.
    pub singular: &'static str,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Whether `status` is a separate subresource (the main resource ignores
    /// status changes, and `metadata.generation` tracks spec changes).
    pub status: bool,
    /// Whether a `scale` subresource exists (`spec.replicas`).
    pub scale: bool,
    /// Short names for kubectl.
    pub short_names: &'static [&'static str],
    /// Discovery categories (`all` makes `kubectl get all` include it).
    pub categories: &'static [&'static str],
}

impl ResourceType {
    /// `group/version`, or just `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Whether `metadata.generation` is maintained for this kind.
    pub fn tracks_generation(&self) -> bool {
        self.status && self.kind != "Pod" && self.kind != "Namespace" && self.kind != "Node"
    }
}

#[allow(clippy::too_many_arguments)]
const fn rt(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    namespaced: bool,
    status: bool,
    scale: bool,
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
) -> ResourceType {
    ResourceType {
        group,
        version,
        kind,
        plural,
        singular,
        namespaced,
        status,
        scale,
        short_names,
        categories,
    }
}

const ALL: &[&str] = &["all"];

/// Every resource kubesim serves. Indexes into this table identify resources
/// throughout the crate.
#[rustfmt::skip]
pub static RESOURCES: &[ResourceType] = &[
    rt("", "v1", "Namespace", "namespaces", "namespace", false, true, false, &["ns"], &[]),
    rt("", "v1", "Node", "nodes", "node", false, true, false, &["no"], &[]),
    rt("", "v1", "Pod", "pods", "pod", true, true, false, &["po"], ALL),
    rt("", "v1", "Service", "services", "service", true, true, false, &["svc"], ALL),
    rt("", "v1", "Endpoints", "endpoints", "endpoints", true, false, false, &["ep"], &[]),
    rt("", "v1", "ConfigMap", "configmaps", "configmap", true, false, false, &["cm"], &[]),
    rt("", "v1", "Secret", "secrets", "secret", true, false, false, &[], &[]),
    rt("", "v1", "ServiceAccount", "serviceaccounts", "serviceaccount", true, false, false, &["sa"], &[]),
    rt("", "v1", "Event", "events", "event", true, false, false, &["ev"], &[]),
    rt("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", "persistentvolumeclaim", true, true, false, &["pvc"], &[]),
    rt("apps", "v1", "Deployment", "deployments", "deployment", true, true, true, &["deploy"], ALL),
    rt("apps", "v1", "ReplicaSet", "replicasets", "replicaset", true, true, true, &["rs"], ALL),
    rt("apps", "v1", "StatefulSet", "statefulsets", "statefulset", true, true, true, &["sts"], ALL),
    rt("apps", "v1", "DaemonSet", "daemonsets", "daemonset", true, true, false, &["ds"], ALL),
    rt("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", "horizontalpodautoscaler", true, true, false, &["hpa"], ALL),
    rt("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", "poddisruptionbudget", true, true, false, &["pdb"], &[]),
    rt("coordination.k8s.io", "v1", "Lease", "leases", "lease", true, false, false, &[], &[]),
    rt("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", "endpointslice", true, false, false, &[], &[]),
    rt("networking.k8s.io", "v1", "Ingress", "ingresses", "ingress", true, true, false, &["ing"], &[]),
    rt("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", "networkpolicy", true, false, false, &["netpol"], &[]),
    rt("batch", "v1", "Job", "jobs", "job", true, true, false, &[], ALL),
    rt("batch", "v1", "CronJob", "cronjobs", "cronjob", true, true, false, &["cj"], ALL),
    rt("rbac.authorization.k8s.io", "v1", "Role", "roles", "role", true, false, false, &[], &[]),
    rt("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", "rolebinding", true, false, false, &[], &[]),
    // What kube-runtime's event recorder writes; kept apart from core v1
    // events (upstream stores the two in one place).
    rt("events.k8s.io", "v1", "Event", "events", "event", true, false, false, &[], &[]),
];

/// Index of a resource in [`RESOURCES`].
pub type ResourceId = usize;

/// Finds a resource by group, version and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<ResourceId> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Finds a resource by plural alone (first match; plurals are unique here).
pub fn by_plural(plural: &str) -> Option<ResourceId> {
    RESOURCES.iter().position(|r| r.plural == plural)
}

/// Finds a resource by apiVersion and kind, as written in an object or an
/// owner reference.
pub fn by_kind(api_version: &str, kind: &str) -> Option<ResourceId> {
    RESOURCES
        .iter()
        .position(|r| r.kind == kind && r.api_version() == api_version)
}

/// The served groups in discovery order, each with its one version.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !out.iter().any(|(g, _)| *g == r.group) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// Well-known resource ids used by the machinery (positions in
/// [`RESOURCES`], checked by a unit test).
pub mod ids {
    use super::ResourceId;
    /// `namespaces`
    pub const NAMESPACES: ResourceId = 0;
    /// `nodes`
    pub const NODES: ResourceId = 1;
    /// `pods`
    pub const PODS: ResourceId = 2;
    /// `poddisruptionbudgets`
    pub const PDBS: ResourceId = 15;
    /// `services`
    pub const SERVICES: ResourceId = 3;
    /// `endpoints`
    pub const ENDPOINTS: ResourceId = 4;
    /// core v1 `events`
    pub const EVENTS: ResourceId = 8;
    /// `deployments`
    pub const DEPLOYMENTS: ResourceId = 10;
    /// `replicasets`
    pub const REPLICASETS: ResourceId = 11;
    /// `horizontalpodautoscalers`
    pub const HPAS: ResourceId = 14;
    /// `endpointslices`
    pub const ENDPOINTSLICES: ResourceId = 17;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_ids_point_at_their_rows() {
        assert_eq!(RESOURCES[ids::NAMESPACES].plural, "namespaces");
        assert_eq!(RESOURCES[ids::NODES].plural, "nodes");
        assert_eq!(RESOURCES[ids::PODS].plural, "pods");
        assert_eq!(RESOURCES[ids::PDBS].plural, "poddisruptionbudgets");
        assert_eq!(RESOURCES[ids::SERVICES].plural, "services");
        assert_eq!(RESOURCES[ids::ENDPOINTS].plural, "endpoints");
        assert_eq!(RESOURCES[ids::EVENTS].plural, "events");
        assert_eq!(RESOURCES[ids::EVENTS].group, "");
        assert_eq!(RESOURCES[ids::DEPLOYMENTS].plural, "deployments");
        assert_eq!(RESOURCES[ids::REPLICASETS].plural, "replicasets");
        assert_eq!(RESOURCES[ids::HPAS].plural, "horizontalpodautoscalers");
        assert_eq!(RESOURCES[ids::ENDPOINTSLICES].plural, "endpointslices");
    }
}
