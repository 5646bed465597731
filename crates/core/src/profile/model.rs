//! The app profile's types: what a platform team writes, one file per app.
//!
//! The same spec types serve the base profile and each environment's
//! overrides: an environment carries the fields it changes, and the
//! effective spec for an environment is the base deep-merged with them (see
//! [`super::effective`]). That is why most nested fields are optional here and
//! their presence is checked on the effective spec.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::units::{CpuQuantity, Duration, MemoryQuantity, Pause};

/// The only `apiVersion` this keelson understands.
pub const API_VERSION: &str = "keelson.dev/v1alpha1";
/// The only `kind` of profile.
pub const KIND: &str = "App";

/// One application's profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "keelson app profile")]
pub struct Profile {
    /// Always `keelson.dev/v1alpha1`.
    pub api_version: String,
    /// Always `App`.
    pub kind: String,
    /// Name, labels and annotations.
    pub metadata: Metadata,
    /// What the app is and how it runs, releases and scales.
    pub spec: AppSpec,
}

/// Identity of the app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// DNS-1123 label of at most 40 characters, starting with a letter.
    pub name: String,
    /// Labels passed through to every rendered object.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations passed through to every rendered object.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The app's spec. Every field but `team`, `owners`, `description` and
/// `environments` can be overridden per environment.
// serde's deny_unknown_fields does not work with flatten; unknown fields are
// caught by the schema walk, which sees `additionalProperties: false`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("additionalProperties" = false))]
pub struct AppSpec {
    /// The team that owns the app.
    #[serde(default)]
    pub team: String,
    /// People (or services) who may change the app.
    #[serde(default)]
    pub owners: Vec<String>,
    /// What the app does, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where the app runs and what differs there.
    #[serde(default)]
    pub environments: BTreeMap<String, Environment>,
    /// Everything an environment may override.
    #[serde(flatten)]
    pub run: RunSpec,
}

/// How the app runs: the part of the spec environments may override.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSpec {
    /// `generic` (default) or `java` with its JDK and heap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    /// The command that starts the app; the agent wraps it. Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Container image without tag, for Kubernetes targets; the release's version is the tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Artifact for host targets: a path or URL; `{version}` is replaced by the release's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    /// Ports the app listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<Port>>,
    /// The URL that says the app is up; an instance takes traffic only after it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkurl: Option<CheckUrl>,
    /// How long an instance keeps serving after it leaves traffic, before preOffline (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Duration>,
    /// How long the app may take to exit after SIGTERM (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<Duration>,
    /// How long the app may take to start before liveness applies (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<Duration>,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Liveness expression, e.g. `http(8080, "/checkurl") == 200 || debugger_attached(5005)`.
    /// Default: the checkurl returns its expected status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<String>,
    /// preStart, preOnline and preOffline hooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
    /// How releases proceed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseSpec>,
    /// Config files, mounted from a content-hashed ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigFiles>,
    /// Environment variables for the app and its hooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Environment variables taken from Kubernetes Secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<SecretRef>>,
    /// Other apps, databases and middleware the app needs (an environment
    /// usually names its own database hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependencies: Option<Dependencies>,
    /// Annotations on the pods only (changing them restarts the pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// Horizontal autoscaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Remote debugging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<Debug>,
}

/// One environment: where it runs, how many instances, what differs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("additionalProperties" = false))]
pub struct Environment {
    /// Clusters or host groups the environment runs on.
    #[serde(default)]
    pub targets: Vec<Target>,
    /// Instances per target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Fields that override the base spec in this environment: mappings merge key
    /// by key, lists and scalars replace; `runtime`, `release.batches`,
    /// `release.failedInstances`, each hook and `autoscaling.custom` replace whole.
    #[serde(flatten)]
    pub overrides: RunSpec,
}

/// A place to run: a Kubernetes cluster (with a namespace) or a host group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Target {
    /// A registered Kubernetes cluster (zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Namespace in the cluster (default: the environment's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A registered group of hosts (VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_group: Option<String>,
}

/// The app's runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Runtime {
    /// Any program: keelson adds nothing to the command.
    Generic,
    /// A JVM: keelson adds heap (and debug) flags through `JAVA_TOOL_OPTIONS`.
    Java(JavaRuntime),
}

/// JVM settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JavaRuntime {
    /// JDK major version, e.g. 17.
    pub version: u32,
    /// Maximum heap (`-Xmx`), e.g. 1Gi.
    pub heap: MemoryQuantity,
    /// Headroom the memory limit must leave above the heap, in percent of the heap (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom_percent: Option<u32>,
    /// Off-heap allowance (metaspace, threads, buffers) on top of that (default 256Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off_heap: Option<MemoryQuantity>,
    /// Extra JVM options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// A port the app listens on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    /// IANA_SVC_NAME: at most 15 lowercase letters, digits and dashes.
    pub name: String,
    /// Port number.
    pub port: u16,
    /// `TCP` (default) or `UDP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// Transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
}

/// The health check URL.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckUrl {
    /// Port on the instance's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Path, starting with `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Status that means healthy (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_status: Option<u16>,
    /// Timeout of one check (default 2s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Time between checks (default 2s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
}

/// Requests and limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// What the scheduler reserves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceAmounts>,
    /// The most the app may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceAmounts>,
}

/// CPU and memory amounts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceAmounts {
    /// CPU, e.g. 500m or 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuQuantity>,
    /// Memory, e.g. 1536Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryQuantity>,
}

/// Lifecycle hooks. `postStart` is not supported: it hides the container's
/// output while it runs; use `preStart` or `preOnline`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hooks {
    /// Directory of the hook scripts inside the app image or artifact (default `/app/hooks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// Resources of the sidecar, where preOnline and preOffline run
    /// (default: requests 10m/16Mi, limits 500m/128Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Before the app starts, in the app container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_start: Option<Hook>,
    /// After checkurl passes, before the instance takes traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_online: Option<Hook>,
    /// After the instance leaves traffic and drains, before the app stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_offline: Option<Hook>,
}

/// One hook: a `script` from the app's hooks directory or an inline `command`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hook {
    /// Path of a script relative to the hooks directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// A shell command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The hook's process group is killed after this long (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Extra environment variables for the hook.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Release parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseSpec {
    /// `in-place`, `rolling` or `dual-deployment` (default `rolling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// How instances are split into batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches: Option<Batches>,
    /// Pause between batches: a duration, or `manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
    /// What to do with instances that fail to come online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_instances: Option<FailedInstances>,
    /// A batch that makes no progress for this long fails the release (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<Duration>,
}

/// Release strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Per batch: take instances offline, replace them, bring them online.
    InPlace,
    /// The native Deployment rolling update.
    Rolling,
    /// Two tracks: per batch scale the new one up, then the old one down.
    DualDeployment,
}

impl Strategy {
    /// The name as written in profiles.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InPlace => "in-place",
            Self::Rolling => "rolling",
            Self::DualDeployment => "dual-deployment",
        }
    }
}

/// Batches: a `count` of batches or a batch `size`, not both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Batches {
    /// Number of batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Instances per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
}

/// The failed-instance policy as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailedInstances {
    /// `fail` (default), `recreate` or `tolerate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<FailedInstancePolicyKind>,
    /// With `recreate`: attempts per instance before the release fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// With `tolerate`: the fraction of instances (0 to 1) that may fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ratio: Option<f64>,
}

/// Names of the failed-instance policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FailedInstancePolicyKind {
    /// The release fails at the first failed instance.
    Fail,
    /// Failed instances are recreated up to `maxAttempts` times.
    Recreate,
    /// Up to `maxRatio` of the instances may fail.
    Tolerate,
}

/// What the app depends on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dependencies {
    /// Databases whose grants each instance receives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<Database>,
    /// Other keelson apps this one calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<String>,
    /// Middleware (queues, caches) this one uses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub middleware: Vec<Middleware>,
}

/// A database dependency; each instance is granted `privileges` on `schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Database {
    /// Name of the dependency.
    pub name: String,
    /// Database engine.
    pub engine: DatabaseEngine,
    /// Server host name.
    pub host: String,
    /// Server port (default 3306).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Schema the grants apply to.
    pub schema: String,
    /// Privileges, e.g. SELECT, INSERT, UPDATE, DELETE.
    pub privileges: Vec<String>,
}

/// Database engines keelson grants on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseEngine {
    /// MySQL or MariaDB.
    Mysql,
}

/// A middleware dependency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Middleware {
    /// Name of the middleware instance.
    pub name: String,
    /// What it is, e.g. kafka, redis, rabbitmq.
    pub kind: String,
}

/// Config files mounted read-only into the app container.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFiles {
    /// Directory the files appear in (default `/keelson/app-config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// File name → content.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

/// An environment variable read from a Kubernetes Secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// The variable's name.
    pub env: String,
    /// The Secret's name.
    pub secret: String,
    /// The key inside the Secret.
    pub key: String,
}

/// Horizontal autoscaling; outside releases the autoscaler owns replicas.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autoscaling {
    /// Fewest instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    /// Most instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Target average CPU use, percent of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// Target average memory use, percent of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u32>,
    /// A per-pod custom metric and its target average value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<CustomMetric>,
}

/// A custom per-pod metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomMetric {
    /// Metric name as the metrics adapter serves it.
    pub metric: String,
    /// Target average value per pod, a Kubernetes quantity like 100 or 500m.
    pub target: CpuQuantity,
}

/// Remote debugging.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Debug {
    /// Start the JVM with a JDWP agent (Java only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jdwp: Option<bool>,
    /// The debugger's port (default 5005).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}
