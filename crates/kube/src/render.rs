//! Rendering: one app profile, one environment, one cluster target and one
//! track into the Kubernetes objects that run it. Pure and deterministic: the
//! same input gives byte-identical output.
//!
//! ```text
//! ServiceAccount <app>            identity for the pod's projected token
//! ConfigMap <app>-lifecycle-<h>   the agent's lifecycle document (immutable)
//! ConfigMap <app>-config-<h>      config files (immutable, when any)
//! Service <app>                   selects name + instance + traffic=online
//! PodDisruptionBudget <app>       same selector (2+ replicas or autoscaling)
//! Deployment <app>-<track>        selects name + instance + track
//! HorizontalPodAutoscaler <app>   when autoscaling is on
//! ```
//! The HorizontalPodAutoscaler targets the track being rendered. During a
//! release the engine applies only the idle track's Deployment (and
//! content-hashed ConfigMaps); the shared objects — Service, PDB and the
//! autoscaler — are applied once traffic has moved, so the autoscaler never
//! fights the batches.
//! Pod: init `keelson-init` (agent image) copies the agent into the shared
//! `/keelson` emptyDir and obtains grants; `app` runs the command through
//! `keelson-agent entrypoint` and carries the preStop `offline --wait`;
//! `keelson-sidecar` runs the app image with `keelson-agent sidecar` and
//! serves readiness.

use std::collections::BTreeMap;
use std::fmt;

use keelson_core::lifecycle::{Authorization, LIFECYCLE_FILE};
use keelson_core::profile::{EffectiveApp, Profile, Protocol, Strategy, Target, defaults};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// Label keys keelson sets.
pub mod labels {
    /// The app's name.
    pub const NAME: &str = "app.kubernetes.io/name";
    /// The app in one environment: `<app>-<env>`.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// The version being run.
    pub const VERSION: &str = "app.kubernetes.io/version";
    /// Always `keelson`.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// The environment.
    pub const ENV: &str = "keelson.dev/env";
    /// `blue` or `green`.
    pub const TRACK: &str = "keelson.dev/track";
    /// `online` or `offline`: whether Services send the pod traffic.
    pub const TRAFFIC: &str = "keelson.dev/traffic";
    /// Annotation on the Deployment: the profile revision it was rendered from.
    pub const REVISION_ANNOTATION: &str = "keelson.dev/profile-revision";
}

/// Where the agent's files live in every container.
const AGENT_ROOT: &str = "/keelson";
const AGENT: &str = "/keelson/bin/keelson-agent";
const TOKEN_DIR: &str = "/var/run/secrets/keelson";
const SIDECAR_PORT: u16 = 8901;

/// One of the two Deployments of an app in an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// `<app>-blue`.
    Blue,
    /// `<app>-green`.
    Green,
}

impl Track {
    /// `blue` or `green`.
    pub fn as_str(self) -> &'static str {
        match self {
            Track::Blue => "blue",
            Track::Green => "green",
        }
    }

    /// The other track.
    pub fn other(self) -> Track {
        match self {
            Track::Blue => Track::Green,
            Track::Green => Track::Blue,
        }
    }
}

impl std::str::FromStr for Track {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "blue" => Ok(Track::Blue),
            "green" => Ok(Track::Green),
            other => Err(format!(
                "`{other}` is not a track; expected `blue` or `green`"
            )),
        }
    }
}

impl fmt::Display for Track {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a render needs besides the profile.
#[derive(Debug, Clone)]
pub struct RenderRequest<'a> {
    /// The environment to render.
    pub env: &'a str,
    /// The version: the image tag and the version label.
    pub version: &'a str,
    /// The track to render the Deployment for.
    pub track: Track,
    /// The cluster target; `None` picks the environment's first cluster.
    pub cluster: Option<&'a str>,
    /// The keelson-agent image for the init container.
    pub agent_image: &'a str,
    /// keelson's authorization API as this cluster's pods reach it.
    pub authorization_url: Option<&'a str>,
    /// The profile revision, recorded as an annotation.
    pub revision: Option<u64>,
}

/// Why a profile could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The environment is not in the profile.
    #[error("environment `{env}` is not in the profile; it has: {known}")]
    UnknownEnvironment {
        /// The environment asked for.
        env: String,
        /// The ones the profile has.
        known: String,
    },
    /// The environment has no such cluster target.
    #[error("environment `{env}` has no cluster target{}; its clusters: {known}", .cluster.as_ref().map(|c| format!(" `{c}`")).unwrap_or_default())]
    NoClusterTarget {
        /// The environment.
        env: String,
        /// The cluster asked for.
        cluster: Option<String>,
        /// The clusters it has.
        known: String,
    },
    /// The version is not usable as an image tag and label value.
    #[error(
        "version `{0}` is not valid: 1 to 63 letters, digits, `.`, `_` and `-`, starting and ending with a letter or digit"
    )]
    InvalidVersion(String),
    /// The profile has no image for this environment.
    #[error("environment `{0}` has no `image`")]
    NoImage(String),
    /// The app needs database grants but no authorization URL was given.
    #[error(
        "environment `{0}` has database dependencies, so its pods need keelson's authorization URL (the cluster's `authorizationUrl`) to obtain grants"
    )]
    NoAuthorizationUrl(String),
}

/// Renders the objects for one environment, target and track.
pub fn render(profile: &Profile, request: &RenderRequest<'_>) -> Result<Vec<Value>, RenderError> {
    let app = profile
        .effective(request.env)
        .ok_or_else(|| RenderError::UnknownEnvironment {
            env: request.env.to_string(),
            known: profile.environment_names().join(", "),
        })?;
    let clusters: Vec<&Target> = app.targets.iter().filter(|t| t.cluster.is_some()).collect();
    let target = clusters
        .iter()
        .find(|t| {
            request
                .cluster
                .is_none_or(|c| t.cluster.as_deref() == Some(c))
        })
        .ok_or_else(|| RenderError::NoClusterTarget {
            env: request.env.to_string(),
            cluster: request.cluster.map(str::to_string),
            known: clusters
                .iter()
                .filter_map(|t| t.cluster.clone())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let version = request.version;
    let version_ok = !version.is_empty()
        && version.len() <= 63
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && version.starts_with(|c: char| c.is_ascii_alphanumeric())
        && version.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !version_ok {
        return Err(RenderError::InvalidVersion(version.to_string()));
    }
    let image = app
        .run
        .image
        .clone()
        .ok_or_else(|| RenderError::NoImage(request.env.to_string()))?;
    if !app.dependencies.databases.is_empty() && request.authorization_url.is_none() {
        return Err(RenderError::NoAuthorizationUrl(request.env.to_string()));
    }
    let r = Renderer {
        app: &app,
        namespace: app.namespace(target),
        request,
        image: format!("{image}:{version}"),
    };
    Ok(r.objects())
}

struct Renderer<'a> {
    app: &'a EffectiveApp,
    namespace: String,
    request: &'a RenderRequest<'a>,
    image: String,
}

impl Renderer<'_> {
    fn name(&self) -> &str {
        &self.app.name
    }

    fn instance(&self) -> String {
        format!("{}-{}", self.app.name, self.app.env)
    }

    /// Labels every object carries.
    fn common_labels(&self) -> Map<String, Value> {
        let mut l: Map<String, Value> = self
            .app
            .metadata
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        l.insert(labels::NAME.into(), json!(self.name()));
        l.insert(labels::INSTANCE.into(), json!(self.instance()));
        l.insert(labels::MANAGED_BY.into(), json!("keelson"));
        l.insert(labels::ENV.into(), json!(self.app.env));
        l
    }

    fn metadata(&self, name: &str, extra: &[(&str, &str)]) -> Value {
        let mut labels = self.common_labels();
        for (k, v) in extra {
            labels.insert((*k).into(), json!(v));
        }
        let mut m = object([
            ("name", json!(name)),
            ("namespace", json!(self.namespace)),
            ("labels", Value::Object(labels)),
        ]);
        if !self.app.metadata.annotations.is_empty() {
            m["annotations"] = json!(self.app.metadata.annotations);
        }
        m
    }

    /// Name + instance + traffic=online: what Services and PDBs select.
    fn traffic_selector(&self) -> Value {
        json!({labels::NAME: self.name(), labels::INSTANCE: self.instance(), labels::TRAFFIC: "online"})
    }

    /// Name + instance + track: what a Deployment selects. Never version or
    /// revision, which change on every release.
    fn track_selector(&self) -> Value {
        json!({labels::NAME: self.name(), labels::INSTANCE: self.instance(), labels::TRACK: self.request.track.as_str()})
    }

    fn objects(&self) -> Vec<Value> {
        let lifecycle = self.lifecycle_config_map();
        let config = self.app_config_map();
        let mut objects = vec![self.service_account(), lifecycle.clone()];
        objects.extend(config.clone());
        if !self.app.ports().is_empty() {
            objects.push(self.service());
        }
        if self.app.replicas >= 2 || self.app.run.autoscaling.is_some() {
            objects.push(self.pod_disruption_budget());
        }
        objects.push(self.deployment(&lifecycle, config.as_ref()));
        objects.extend(self.autoscaler());
        objects
    }

    fn service_account(&self) -> Value {
        object([
            ("apiVersion", json!("v1")),
            ("kind", json!("ServiceAccount")),
            ("metadata", self.metadata(self.name(), &[])),
            ("automountServiceAccountToken", json!(false)),
        ])
    }

    /// An immutable ConfigMap named by the hash of its content, so a change
    /// makes a new object and rolls the pods that mount it, and nothing
    /// mutates a ConfigMap under running pods.
    fn hashed_config_map(&self, kind: &str, data: BTreeMap<String, String>) -> Value {
        let canonical = serde_json::to_vec(&data).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        let hash: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
        let data = Value::Object(
            data.into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        );
        object([
            ("apiVersion", json!("v1")),
            ("kind", json!("ConfigMap")),
            (
                "metadata",
                self.metadata(&format!("{}-{kind}-{hash}", self.name()), &[]),
            ),
            ("immutable", json!(true)),
            ("data", data),
        ])
    }

    fn lifecycle_config_map(&self) -> Value {
        let authorization = self.request.authorization_url.map(|url| Authorization {
            url: url.to_string(),
            token_path: format!("{TOKEN_DIR}/token"),
            deadline_seconds: 300,
        });
        let document = self.app.lifecycle_document(authorization);
        let text = serde_json::to_string_pretty(&document).unwrap_or_default() + "\n";
        self.hashed_config_map(
            "lifecycle",
            BTreeMap::from([(LIFECYCLE_FILE.to_string(), text)]),
        )
    }

    fn app_config_map(&self) -> Option<Value> {
        let files = &self.app.run.config.as_ref()?.files;
        (!files.is_empty()).then(|| self.hashed_config_map("config", files.clone()))
    }

    fn service(&self) -> Value {
        let ports: Vec<Value> = self
            .app
            .ports()
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "port": p.port,
                    "targetPort": p.name,
                    "protocol": protocol(p.protocol),
                })
            })
            .collect();
        object([
            ("apiVersion", json!("v1")),
            ("kind", json!("Service")),
            ("metadata", self.metadata(self.name(), &[])),
            (
                "spec",
                object([
                    ("type", json!("ClusterIP")),
                    ("selector", self.traffic_selector()),
                    ("ports", Value::Array(ports)),
                ]),
            ),
        ])
    }

    fn pod_disruption_budget(&self) -> Value {
        let max_unavailable = if self.app.replicas > 10 {
            json!("10%")
        } else {
            json!(1)
        };
        object([
            ("apiVersion", json!("policy/v1")),
            ("kind", json!("PodDisruptionBudget")),
            ("metadata", self.metadata(self.name(), &[])),
            (
                "spec",
                object([
                    ("maxUnavailable", max_unavailable),
                    (
                        "selector",
                        object([("matchLabels", self.traffic_selector())]),
                    ),
                ]),
            ),
        ])
    }

    fn autoscaler(&self) -> Option<Value> {
        let a = self.app.run.autoscaling.as_ref()?;
        let mut metrics = Vec::new();
        for (resource, target) in [("cpu", a.cpu), ("memory", a.memory)] {
            if let Some(t) = target {
                metrics.push(json!({
                    "type": "Resource",
                    "resource": {"name": resource, "target": {"type": "Utilization", "averageUtilization": t}},
                }));
            }
        }
        if let Some(c) = &a.custom {
            metrics.push(json!({
                "type": "Pods",
                "pods": {
                    "metric": {"name": c.metric},
                    "target": {"type": "AverageValue", "averageValue": c.target.to_string()},
                },
            }));
        }
        let mut spec = json!({
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": self.deployment_name(),
            },
            "minReplicas": a.min.unwrap_or(1),
            "maxReplicas": a.max.unwrap_or(1),
        });
        spec["metrics"] = Value::Array(metrics);
        Some(object([
            ("apiVersion", json!("autoscaling/v2")),
            ("kind", json!("HorizontalPodAutoscaler")),
            ("metadata", self.metadata(self.name(), &[])),
            ("spec", spec),
        ]))
    }

    fn deployment_name(&self) -> String {
        format!("{}-{}", self.name(), self.request.track)
    }

    fn deployment(&self, lifecycle: &Value, config: Option<&Value>) -> Value {
        let track = self.request.track.as_str();
        let version = self.request.version;
        let mut metadata = self.metadata(
            &self.deployment_name(),
            &[(labels::TRACK, track), (labels::VERSION, version)],
        );
        if let Some(revision) = self.request.revision {
            // On the Deployment only: a profile edit alone must not restart pods.
            metadata["annotations"][labels::REVISION_ANNOTATION] = json!(revision.to_string());
        }
        let mut pod_labels = self.common_labels();
        pod_labels.insert(labels::TRACK.into(), json!(track));
        pod_labels.insert(labels::VERSION.into(), json!(version));
        pod_labels.insert(labels::TRAFFIC.into(), json!("online"));
        let mut pod_metadata = object([("labels", Value::Object(pod_labels))]);
        // Profile annotations stay off the pods: editing them must not
        // restart anything. `podAnnotations` is for what belongs on pods.
        if let Some(annotations) = self
            .app
            .run
            .pod_annotations
            .as_ref()
            .filter(|a| !a.is_empty())
        {
            pod_metadata["annotations"] = json!(annotations);
        }
        let replicas = self
            .app
            .run
            .autoscaling
            .as_ref()
            .and_then(|a| a.min)
            .map_or(self.app.replicas, |min| min.max(self.app.replicas));
        let mut spec = json!({
            "replicas": replicas,
            "progressDeadlineSeconds": self.app.progress_deadline().as_secs_ceil(),
            "revisionHistoryLimit": 5,
        });
        spec["selector"] = object([("matchLabels", self.track_selector())]);
        spec["strategy"] = self.deployment_strategy();
        spec["template"] = object([
            ("metadata", pod_metadata),
            ("spec", self.pod_spec(lifecycle, config)),
        ]);
        object([
            ("apiVersion", json!("apps/v1")),
            ("kind", json!("Deployment")),
            ("metadata", metadata),
            ("spec", spec),
        ])
    }

    /// Rolling: the native update, with no extra capacity (`maxSurge: 0`),
    /// a batch at a time. The other strategies scale the two tracks from the
    /// release engine; their Deployments never roll on their own.
    fn deployment_strategy(&self) -> Value {
        let batch = self
            .app
            .run
            .release
            .as_ref()
            .and_then(|r| r.batches.as_ref());
        let max_unavailable = match (self.app.strategy(), batch) {
            (Strategy::Rolling, Some(b)) => match (b.size, b.count) {
                (Some(size), _) => json!(size.max(1)),
                (None, Some(count)) => json!(self.app.replicas.div_ceil(count.max(1)).max(1)),
                _ => json!("25%"),
            },
            (Strategy::Rolling, None) => json!("25%"),
            _ => json!(1),
        };
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": max_unavailable}})
    }

    fn identity_env(&self) -> Vec<Value> {
        let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
        vec![
            field("KEELSON_POD_NAME", "metadata.name"),
            field("KEELSON_POD_UID", "metadata.uid"),
            field("KEELSON_POD_IP", "status.podIP"),
            field("KEELSON_NAMESPACE", "metadata.namespace"),
        ]
    }

    /// Where the app image keeps its hook scripts; the agent runs them in
    /// place (the init container, on the agent image, never sees them).
    fn hooks_dir_env(&self) -> Value {
        json!({"name": "KEELSON_HOOKS_DIR", "value": self.app.hooks_directory()})
    }

    /// The app's own variables (and secrets), which hooks see too.
    fn app_env(&self) -> Vec<Value> {
        let mut env: Vec<Value> = self
            .app
            .env_vars()
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
        for s in self.app.run.secrets.iter().flatten() {
            env.push(json!({"name": s.env, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key}}}));
        }
        env
    }

    /// The app container's variables: the app's own, with keelson's JVM
    /// flags in `JAVA_TOOL_OPTIONS` (see `EffectiveApp::java_tool_options`).
    fn app_container_env(&self) -> Vec<Value> {
        let mut env = self.app_env();
        if let Some(options) = self.app.java_tool_options() {
            env.retain(|e| e["name"] != "JAVA_TOOL_OPTIONS" || e.get("value").is_none());
            env.push(json!({"name": "JAVA_TOOL_OPTIONS", "value": options}));
        }
        env
    }

    fn mounts(&self, token: bool) -> Vec<Value> {
        let mut m = vec![
            json!({"name": "keelson", "mountPath": AGENT_ROOT}),
            json!({"name": "keelson-lifecycle", "mountPath": format!("{AGENT_ROOT}/config"), "readOnly": true}),
            json!({"name": "keelson-podinfo", "mountPath": format!("{AGENT_ROOT}/podinfo"), "readOnly": true}),
        ];
        if token {
            m.push(json!({"name": "keelson-token", "mountPath": TOKEN_DIR, "readOnly": true}));
        }
        m
    }

    fn resources(&self) -> Value {
        resources_json(self.app.run.resources.as_ref())
    }

    /// The sidecar runs preOnline and preOffline, so its size is the hooks'.
    fn sidecar_resources(&self) -> Value {
        let mut out = json!({
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "500m", "memory": "128Mi"},
        });
        let own = resources_json(self.app.hooks().resources.as_ref());
        for (kind, amounts) in own.as_object().into_iter().flatten() {
            for (resource, amount) in amounts.as_object().into_iter().flatten() {
                out[kind][resource] = amount.clone();
            }
        }
        out
    }
}

fn resources_json(resources: Option<&keelson_core::profile::Resources>) -> Value {
    let mut out = json!({});
    if let Some(r) = resources {
        for (key, amounts) in [("requests", &r.requests), ("limits", &r.limits)] {
            let Some(a) = amounts else { continue };
            let mut m = Map::new();
            if let Some(cpu) = &a.cpu {
                m.insert("cpu".into(), json!(cpu.to_string()));
            }
            if let Some(memory) = &a.memory {
                m.insert("memory".into(), json!(memory.to_string()));
            }
            if !m.is_empty() {
                out[key] = Value::Object(m);
            }
        }
    }
    out
}

impl Renderer<'_> {
    fn pod_spec(&self, lifecycle: &Value, config: Option<&Value>) -> Value {
        let app = self.app;
        let probe_command = json!({"exec": {"command": [AGENT, "probe"]}});
        let mut liveness = probe_command.clone();
        liveness["periodSeconds"] = json!(10);
        liveness["timeoutSeconds"] = json!(5);
        liveness["failureThreshold"] = json!(3);
        let mut startup = probe_command;
        startup["periodSeconds"] = json!(5);
        startup["timeoutSeconds"] = json!(5);
        // The entrypoint runs preStart before the app: its timeout is part
        // of the start, or the kubelet would kill a long preStart.
        let pre_start = app.hooks().pre_start.map_or(0, |h| {
            h.timeout.unwrap_or(defaults::HOOK_TIMEOUT).as_secs_ceil()
        });
        let startup_budget = app.startup_timeout().as_secs_ceil() + pre_start;
        startup["failureThreshold"] = json!(startup_budget.div_ceil(5).max(1));

        let mut app_mounts = self.mounts(false);
        if config.is_some() {
            app_mounts.push(json!({"name": "app-config", "mountPath": app.config_mount_path(), "readOnly": true}));
        }
        let mut ports: Vec<Value> = app
            .ports()
            .iter()
            .map(|p| json!({"name": p.name, "containerPort": p.port, "protocol": protocol(p.protocol)}))
            .collect();
        if let Some(port) = app.jdwp_port() {
            ports.push(json!({"name": "jdwp", "containerPort": port, "protocol": "TCP"}));
        }
        let mut command = vec![AGENT.to_string(), "entrypoint".into(), "--".into()];
        command.extend(app.command().iter().cloned());

        let app_env = [
            self.identity_env(),
            vec![self.hooks_dir_env()],
            self.app_container_env(),
        ]
        .concat();
        let sidecar_env = [
            self.identity_env(),
            vec![self.hooks_dir_env()],
            self.app_env(),
        ]
        .concat();
        let mut app_container = json!({
            "name": "app",
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "command": command,
            "lifecycle": {"preStop": {"exec": {"command": [AGENT, "offline", "--wait"]}}},
        });
        app_container["env"] = Value::Array(app_env);
        app_container["livenessProbe"] = liveness;
        app_container["startupProbe"] = startup;
        app_container["resources"] = self.resources();
        app_container["volumeMounts"] = Value::Array(app_mounts);
        if !ports.is_empty() {
            app_container["ports"] = Value::Array(ports);
        }
        let mut sidecar = json!({
        "name": "keelson-sidecar",
        "image": self.image,
        "imagePullPolicy": "IfNotPresent",
        "command": [AGENT, "sidecar", "--listen", format!("0.0.0.0:{SIDECAR_PORT}")],
        "ports": [{"name": "keelson", "containerPort": SIDECAR_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": SIDECAR_PORT},
            "periodSeconds": 2,
            "timeoutSeconds": 1,
            "successThreshold": 1,
            "failureThreshold": 1,
        },
                });
        sidecar["resources"] = self.sidecar_resources();
        sidecar["env"] = Value::Array(sidecar_env);
        sidecar["volumeMounts"] = Value::Array(self.mounts(true));
        let mut init = json!({
            "name": "keelson-init",
            "image": self.request.agent_image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["keelson-agent", "init"],
            "resources": {
                "requests": {"cpu": "10m", "memory": "16Mi"},
                "limits": {"cpu": "200m", "memory": "64Mi"},
            },
        });
        init["env"] = Value::Array(self.identity_env());
        init["volumeMounts"] = Value::Array(self.mounts(true));
        let mut volumes = vec![
            json!({"name": "keelson", "emptyDir": {}}),
            json!({"name": "keelson-lifecycle", "configMap": {"name": lifecycle["metadata"]["name"].as_str()}}),
            json!({"name": "keelson-podinfo", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}),
            json!({"name": "keelson-token", "projected": {"sources": [{"serviceAccountToken": {"audience": "keelson", "expirationSeconds": 3600, "path": "token"}}]}}),
        ];
        if let Some(cm) = config {
            volumes.push(json!({"name": "app-config", "configMap": {"name": cm["metadata"]["name"].as_str()}}));
        }
        let mut spec = json!({
            "serviceAccountName": self.name(),
            "automountServiceAccountToken": false,
            "shareProcessNamespace": true,
            "terminationGracePeriodSeconds": app.termination_grace_seconds(),
        });
        spec["initContainers"] = Value::Array(vec![init]);
        spec["containers"] = Value::Array(vec![app_container, sidecar]);
        spec["volumes"] = Value::Array(volumes);
        spec["topologySpreadConstraints"] = Value::Array(vec![object([
            ("maxSkew", json!(1)),
            ("topologyKey", json!("topology.kubernetes.io/zone")),
            ("whenUnsatisfiable", json!("ScheduleAnyway")),
            (
                "labelSelector",
                object([("matchLabels", self.track_selector())]),
            ),
        ])]);
        spec
    }
}

/// Builds a JSON object from owned values. `json!` would serialize every
/// interpolated `Value` into a deep copy; rendering thousands of apps makes
/// that copy the biggest cost.
fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn protocol(p: Option<Protocol>) -> &'static str {
    match p {
        Some(Protocol::Udp) => "UDP",
        _ => "TCP",
    }
}
