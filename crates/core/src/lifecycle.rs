//! The lifecycle document: every setting one instance's agent needs, rendered
//! from the app profile for one environment.
//!
//! On Kubernetes it is mounted read-only from a ConfigMap
//! (`/keelson/config/lifecycle.json`); on hosts the daemon writes it into the
//! instance's working directory. It is the only contract between rendering
//! and the agent, so both sides use this one type.
//!
//! ```text
//! profile ──render──► LifecycleDocument (JSON) ──► keelson-agent init | entrypoint | sidecar | offline | probe
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The file name of the document inside its mounted directory.
pub const LIFECYCLE_FILE: &str = "lifecycle.json";

/// Version tag of the document format, bumped on incompatible changes.
pub const LIFECYCLE_API_VERSION: &str = "keelson.dev/v1alpha1";

/// Everything the agent needs to run one instance through its lifecycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LifecycleDocument {
    /// Always [`LIFECYCLE_API_VERSION`].
    pub api_version: String,
    /// The app's name.
    pub app: String,
    /// The environment this instance runs in.
    pub env: String,
    /// How the sidecar decides the app is up.
    pub checkurl: CheckUrl,
    /// Seconds to wait after leaving traffic before preOffline runs.
    pub drain_seconds: u32,
    /// Seconds the app gets between SIGTERM and SIGKILL.
    pub stop_timeout_seconds: u32,
    /// The lifecycle hooks; absent ones are skipped.
    #[serde(default)]
    pub hooks: Hooks,
    /// The liveness expression (grammar in `crate::probe`).
    pub liveness: String,
    /// Where the agent obtains database grants; absent when the app has no
    /// database dependency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
}

/// The health check URL the sidecar polls before an instance may go online.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckUrl {
    /// Port on the instance's own address.
    pub port: u16,
    /// Path, starting with `/`.
    pub path: String,
    /// The HTTP status that means healthy.
    pub expected_status: u16,
    /// Timeout of one request, in seconds.
    pub timeout_seconds: u32,
    /// Seconds between two attempts.
    pub interval_seconds: u32,
}

/// The three lifecycle hooks keelson supports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hooks {
    /// Runs in the app container before the app is exec'd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_start: Option<Hook>,
    /// Runs in the sidecar after checkurl passes, before the instance is online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_online: Option<Hook>,
    /// Runs in the sidecar after the drain period, before the app is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_offline: Option<Hook>,
}

/// One hook: what to run, for how long at most, with which environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hook {
    /// What to run.
    pub run: HookRun,
    /// Seconds before the hook's whole process group is killed.
    pub timeout_seconds: u32,
    /// Extra environment variables for the hook.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// A hook is either a script from the app's hooks directory or an inline
/// shell command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum HookRun {
    /// A path relative to the hooks directory, executed directly.
    Script(String),
    /// A command line run with `/bin/sh -c`.
    Command(String),
}

/// Where and how the agent asks for this instance's database grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    /// Base URL of keelson's authorization API (`…/api/v1/grants` is appended).
    pub url: String,
    /// File holding the bearer token (the projected service-account token on
    /// Kubernetes, the host token on hosts).
    pub token_path: String,
    /// Seconds `init` keeps retrying before it gives up.
    pub deadline_seconds: u32,
}
