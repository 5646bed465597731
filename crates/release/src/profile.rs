//! Runtimes from what the server already knows: an app's stored profile says
//! where each environment runs (its targets' host groups) and what a version
//! is on a host (artifact, command, env, hooks, checkurl, drain); the host
//! registry says which hosts are in a group. No other configuration.
//!
//! ```text
//!  runtime(app, env) ─► current revision ─► effective(env) ─► targets' hostGroups
//!                                              │                    │
//!                      deploy request per start ◄┘    registry: hosts of those groups
//!                                              └──► HostsRuntime (kept per revision + hosts while a release uses it)
//! ```

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use keelson_agent_lifecycle::host::api::{Artifact, DeployRequest};
use keelson_core::lifecycle::Authorization;
use keelson_core::profile::{self, EffectiveApp};
use keelson_hosts::HostRecord;
use keelson_store::Store;

use crate::hosts::{DeployFn, HostsRuntime};
use crate::runtime::{RuntimeError, Runtimes};

/// How long an instance's agent keeps asking for its grants on a host.
const GRANT_DEADLINE_SECONDS: u32 = 120;

/// The runtimes of every app in the store whose environments run on
/// registered host groups.
#[derive(Debug)]
pub struct ProfileRuntimes {
    store: Store,
    authorization_url: Option<String>,
    cache: Mutex<HashMap<(String, String), Cached>>,
}

#[derive(Debug)]
struct Cached {
    key: (i64, Vec<(String, String, String)>),
    runtime: Arc<HostsRuntime>,
}

impl ProfileRuntimes {
    /// Runtimes over `store`; instances of apps with databases obtain their
    /// grants from keelson's authorization API at `authorization_url`.
    pub fn new(store: Store, authorization_url: Option<String>) -> Self {
        Self {
            store,
            authorization_url,
            cache: Mutex::default(),
        }
    }

    /// The effective profile of `app` in `env`, from its current revision.
    pub async fn effective(
        &self,
        app: &str,
        env: &str,
    ) -> Result<(i64, EffectiveApp), RuntimeError> {
        let record = self
            .store
            .get_app(app)
            .await
            .map_err(|e| RuntimeError(e.to_string()))?
            .ok_or_else(|| RuntimeError(format!("app {app} does not exist")))?;
        let profile = profile::parse(&record.revision.profile_text).map_err(|e| {
            RuntimeError(format!(
                "revision {} of {app} no longer validates: {}",
                record.revision.summary.number,
                e.errors
                    .first()
                    .map_or_else(String::new, |f| format!("{}: {}", f.path, f.message))
            ))
        })?;
        let effective = profile.effective(env).ok_or_else(|| {
            RuntimeError(format!(
                "{app} has no environment {env}; it has: {}",
                profile.environment_names().join(", ")
            ))
        })?;
        Ok((record.revision.summary.number, effective))
    }

    /// The hosts `app` runs on in `env`: those of its targets' host groups.
    async fn hosts(&self, app: &EffectiveApp) -> Result<Vec<HostRecord>, RuntimeError> {
        let groups: BTreeSet<&str> = app
            .targets
            .iter()
            .filter_map(|t| t.host_group.as_deref())
            .collect();
        if groups.is_empty() {
            return Err(RuntimeError(format!(
                "{} in {} has no host group among its targets; this server releases to host groups (environments.{}.targets[].hostGroup)",
                app.name, app.env, app.env
            )));
        }
        let hosts: Vec<HostRecord> = keelson_hosts::registry::list_hosts(&self.store)
            .await
            .map_err(|e| RuntimeError(e.to_string()))?
            .into_iter()
            .filter(|h| groups.contains(h.group.as_str()))
            .collect();
        if hosts.is_empty() {
            return Err(RuntimeError(format!(
                "host group {} of {} in {} has no hosts; register them with `keelson host add NAME --group GROUP …`",
                groups.into_iter().collect::<Vec<_>>().join(", "),
                app.name,
                app.env
            )));
        }
        Ok(hosts)
    }
}

impl Runtimes for ProfileRuntimes {
    type Runtime = HostsRuntime;

    async fn runtime(&self, app: &str, env: &str) -> Result<Arc<HostsRuntime>, RuntimeError> {
        let (revision, effective) = self.effective(app, env).await?;
        let hosts = self.hosts(&effective).await?;
        let key = (
            revision,
            hosts
                .iter()
                .map(|h| (h.name.clone(), h.address.clone(), h.token_file.clone()))
                .collect::<Vec<_>>(),
        );
        let id = (app.to_string(), env.to_string());
        if let Some(cached) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .filter(|c| c.key == key)
        {
            return Ok(cached.runtime.clone());
        }
        let deploy = deploy_fn(&effective, self.authorization_url.as_deref())?;
        let runtime = Arc::new(HostsRuntime::new(
            self.store.clone(),
            app,
            env,
            &hosts,
            deploy,
        )?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // A runtime follows its hosts' event streams: keep only those a
        // release still drives, not one per app that ever released.
        cache.retain(|_, c| Arc::strong_count(&c.runtime) > 1);
        cache.insert(
            id,
            Cached {
                key,
                runtime: runtime.clone(),
            },
        );
        Ok(runtime)
    }
}

/// What starting a version of `app` means on a host: the daemon's deploy
/// request, from the effective profile. The artifact's `{version}` becomes
/// the release's version; a hooks directory under `/app/` (where images
/// keep the app) is found at the same place in the unpacked artifact.
pub fn deploy_fn(
    app: &EffectiveApp,
    authorization_url: Option<&str>,
) -> Result<DeployFn, RuntimeError> {
    if app.command().is_empty() {
        return Err(RuntimeError(format!(
            "{} in {} has no command (run.command)",
            app.name, app.env
        )));
    }
    let artifact = app.run.artifact.clone();
    let authorization = match (app.dependencies.databases.is_empty(), authorization_url) {
        (true, _) => None,
        (false, Some(url)) => Some(Authorization {
            url: url.to_string(),
            // The daemon puts its host token here.
            token_path: String::new(),
            deadline_seconds: GRANT_DEADLINE_SECONDS,
        }),
        (false, None) => {
            return Err(RuntimeError(format!(
                "{} in {} has databases, and this server has no authorization URL to give its instances",
                app.name, app.env
            )));
        }
    };
    let hooks_dir = app.hooks_directory();
    let hooks_dir = hooks_dir
        .strip_prefix("/app/")
        .map(str::to_string)
        .or_else(|| (!hooks_dir.starts_with('/')).then(|| hooks_dir.clone()));
    let mut env = app.env_vars();
    if let Some(options) = app.java_tool_options() {
        env.insert("JAVA_TOOL_OPTIONS".into(), options);
    }
    let template = DeployRequest {
        lifecycle: app.lifecycle_document(authorization),
        version: None,
        artifact: None,
        command: app.command().to_vec(),
        env,
        working_dir: None,
        hooks_dir,
        restart: Default::default(),
        log_segment_bytes: None,
        start: false,
        generation: None,
    };
    Ok(Arc::new(move |target| {
        let mut request = template.clone();
        request.artifact = artifact.as_ref().map(|a| {
            let location = a.replace("{version}", &target.version.0);
            if location.starts_with("http://") || location.starts_with("https://") {
                Artifact::Url(location)
            } else {
                Artifact::Path(location)
            }
        });
        request
    }))
}
