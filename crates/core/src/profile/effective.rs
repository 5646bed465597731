//! The effective spec of one environment: the base spec deep-merged with the
//! environment's overrides (mappings merge key by key; lists and scalars
//! replace), plus the defaults every consumer would otherwise repeat.

use std::collections::BTreeMap;

use super::model::*;
use super::units::{Duration, Pause, Quantity};
use crate::lifecycle;

/// Defaults used when a profile leaves a field out.
pub mod defaults {
    use super::Duration;
    /// Drain after leaving traffic.
    pub const DRAIN: Duration = Duration::from_secs(10);
    /// Time the app gets to exit after SIGTERM.
    pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
    /// Time the app gets to start.
    pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(300);
    /// Hook timeout.
    pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);
    /// Checkurl request timeout.
    pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
    /// Time between checkurl attempts.
    pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
    /// Release progress deadline.
    pub const PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
    /// JVM headroom above the heap, percent.
    pub const JAVA_HEADROOM_PERCENT: u32 = 20;
    /// JVM off-heap allowance, bytes.
    pub const JAVA_OFF_HEAP: u64 = 256 << 20;
    /// JDWP port.
    pub const DEBUG_PORT: u16 = 5005;
    /// Directory of hook scripts in the app image.
    pub const HOOKS_DIRECTORY: &str = "/app/hooks";
    /// Directory config files are mounted in.
    pub const CONFIG_MOUNT_PATH: &str = "/keelson/app-config";
    /// Seconds the kubelet waits beyond the lifecycle's own budget.
    pub const GRACE_MARGIN_SECONDS: u64 = 15;
}

/// One app in one environment, with the environment's overrides applied.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveApp {
    /// The app's name.
    pub name: String,
    /// The environment's name.
    pub env: String,
    /// The profile's metadata.
    pub metadata: Metadata,
    /// Owning team.
    pub team: String,
    /// Owners.
    pub owners: Vec<String>,
    /// Dependencies.
    pub dependencies: Dependencies,
    /// Targets of the environment.
    pub targets: Vec<Target>,
    /// Instances per target.
    pub replicas: u32,
    /// The merged run spec.
    pub run: RunSpec,
}

/// Laying an environment's overrides over the base spec: mappings merge key
/// by key; lists, scalars and the fields that state one choice (`count` or
/// `size`, `script` or `command`, a policy and its parameter) are replaced
/// whole, since merging two choices key by key would yield both.
pub(crate) trait Overlay {
    fn overlay(&mut self, over: &Self);
}

fn deep<T: Overlay + Clone>(base: &mut Option<T>, over: &Option<T>) {
    match (base.as_mut(), over) {
        (Some(b), Some(o)) => b.overlay(o),
        (None, Some(o)) => *base = Some(o.clone()),
        _ => {}
    }
}

fn replace<T: Clone>(base: &mut Option<T>, over: &Option<T>) {
    if over.is_some() {
        base.clone_from(over);
    }
}

impl Overlay for BTreeMap<String, String> {
    fn overlay(&mut self, over: &Self) {
        self.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}

/// Declares which fields of a spec type merge deeply and which replace.
/// Every field must be listed: the struct pattern makes a forgotten field a
/// compile error.
macro_rules! overlay {
    ($ty:ident { deep: [$($d:ident),*], replace: [$($r:ident),*] $(, maps: [$($m:ident),*])? }) => {
        impl Overlay for $ty {
            fn overlay(&mut self, over: &Self) {
                let $ty { $($d: _,)* $($r: _,)* $($($m: _,)*)? } = over;
                $( deep(&mut self.$d, &over.$d); )*
                $( replace(&mut self.$r, &over.$r); )*
                $($( self.$m.overlay(&over.$m); )*)?
            }
        }
    };
}

overlay!(RunSpec {
    deep: [
        checkurl,
        resources,
        hooks,
        release,
        config,
        env,
        autoscaling,
        debug,
        dependencies,
        pod_annotations
    ],
    replace: [
        runtime,
        command,
        image,
        artifact,
        ports,
        drain,
        stop_timeout,
        startup_timeout,
        liveness,
        secrets
    ]
});
overlay!(CheckUrl {
    deep: [],
    replace: [port, path, expected_status, timeout, interval]
});
overlay!(Resources {
    deep: [requests, limits],
    replace: []
});
overlay!(ResourceAmounts {
    deep: [],
    replace: [cpu, memory]
});
overlay!(Hooks {
    deep: [resources],
    replace: [directory, pre_start, pre_online, pre_offline]
});
overlay!(ReleaseSpec {
    deep: [],
    replace: [
        strategy,
        batches,
        pause,
        failed_instances,
        progress_deadline
    ]
});
overlay!(ConfigFiles {
    deep: [],
    replace: [mount_path],
    maps: [files]
});
overlay!(Autoscaling {
    deep: [],
    replace: [min, max, cpu, memory, custom]
});
overlay!(Debug {
    deep: [],
    replace: [jdwp, port]
});

/// Each list an environment names replaces the base's list.
impl Overlay for Dependencies {
    fn overlay(&mut self, over: &Self) {
        let Dependencies {
            databases,
            apps,
            middleware,
        } = over;
        if !databases.is_empty() {
            self.databases.clone_from(databases);
        }
        if !apps.is_empty() {
            self.apps.clone_from(apps);
        }
        if !middleware.is_empty() {
            self.middleware.clone_from(middleware);
        }
    }
}

impl Profile {
    /// Names of the environments, sorted.
    pub fn environment_names(&self) -> Vec<&str> {
        self.spec.environments.keys().map(String::as_str).collect()
    }

    /// The effective app in environment `env`, or `None` if the profile has
    /// no such environment.
    pub fn effective(&self, env: &str) -> Option<EffectiveApp> {
        let environment = self.spec.environments.get(env)?;
        let mut run = self.spec.run.clone();
        run.overlay(&environment.overrides);
        Some(EffectiveApp {
            name: self.metadata.name.clone(),
            env: env.to_string(),
            metadata: self.metadata.clone(),
            team: self.spec.team.clone(),
            owners: self.spec.owners.clone(),
            dependencies: run.dependencies.clone().unwrap_or_default(),
            targets: environment.targets.clone(),
            replicas: environment.replicas.unwrap_or(1),
            run,
        })
    }
}

impl EffectiveApp {
    /// The JVM settings when the runtime is Java.
    pub fn java(&self) -> Option<&JavaRuntime> {
        match &self.run.runtime {
            Some(Runtime::Java(java)) => Some(java),
            _ => None,
        }
    }

    /// The command, empty only in an invalid profile.
    pub fn command(&self) -> &[String] {
        self.run.command.as_deref().unwrap_or_default()
    }

    /// The ports.
    pub fn ports(&self) -> &[Port] {
        self.run.ports.as_deref().unwrap_or_default()
    }

    /// Drain period.
    pub fn drain(&self) -> Duration {
        self.run.drain.unwrap_or(defaults::DRAIN)
    }

    /// Stop timeout.
    pub fn stop_timeout(&self) -> Duration {
        self.run.stop_timeout.unwrap_or(defaults::STOP_TIMEOUT)
    }

    /// Startup timeout.
    pub fn startup_timeout(&self) -> Duration {
        self.run
            .startup_timeout
            .unwrap_or(defaults::STARTUP_TIMEOUT)
    }

    /// The hooks, possibly empty.
    pub fn hooks(&self) -> Hooks {
        self.run.hooks.clone().unwrap_or_default()
    }

    /// Directory of the hook scripts.
    pub fn hooks_directory(&self) -> String {
        self.run
            .hooks
            .as_ref()
            .and_then(|h| h.directory.clone())
            .unwrap_or_else(|| defaults::HOOKS_DIRECTORY.to_string())
    }

    /// Namespace of a cluster target: its own, or the environment's name.
    pub fn namespace(&self, target: &Target) -> String {
        target.namespace.clone().unwrap_or_else(|| self.env.clone())
    }

    /// The config files' mount path.
    pub fn config_mount_path(&self) -> String {
        self.run
            .config
            .as_ref()
            .and_then(|c| c.mount_path.clone())
            .unwrap_or_else(|| defaults::CONFIG_MOUNT_PATH.to_string())
    }

    /// Debugging: `Some(port)` when JDWP is on.
    pub fn jdwp_port(&self) -> Option<u16> {
        let debug = self.run.debug.as_ref()?;
        debug
            .jdwp
            .unwrap_or(false)
            .then(|| debug.port.unwrap_or(defaults::DEBUG_PORT))
    }

    /// The checkurl with defaults filled in.
    pub fn checkurl(&self) -> lifecycle::CheckUrl {
        let c = self.run.checkurl.clone().unwrap_or_default();
        lifecycle::CheckUrl {
            port: c.port.unwrap_or(0),
            path: c.path.unwrap_or_else(|| "/".to_string()),
            expected_status: c.expected_status.unwrap_or(200),
            timeout_seconds: secs(c.timeout.unwrap_or(defaults::CHECK_TIMEOUT)),
            interval_seconds: secs(c.interval.unwrap_or(defaults::CHECK_INTERVAL)),
        }
    }

    /// The liveness expression: the profile's, or the checkurl's status.
    /// With JDWP on, an attached debugger also counts as alive, so a JVM
    /// stopped at a breakpoint is not killed.
    pub fn liveness(&self) -> String {
        let base = self.run.liveness.clone().unwrap_or_else(|| {
            let c = self.checkurl();
            format!("http({}, {:?}) == {}", c.port, c.path, c.expected_status)
        });
        // Parsed, not searched: a string literal may mention the function.
        let watches_debugger = |port| {
            crate::probe::Expr::parse(&base).is_ok_and(|e| e.debugger_ports().contains(&port))
        };
        match self.jdwp_port() {
            Some(port) if !watches_debugger(port) => {
                format!("({base}) || debugger_attached({port})")
            }
            _ => base,
        }
    }

    /// The release strategy (default `rolling`).
    pub fn strategy(&self) -> Strategy {
        self.run
            .release
            .as_ref()
            .and_then(|r| r.strategy)
            .unwrap_or(Strategy::Rolling)
    }

    /// The pause between batches (default none).
    pub fn pause(&self) -> Pause {
        self.run
            .release
            .as_ref()
            .and_then(|r| r.pause)
            .unwrap_or(Pause::For(Duration::from_secs(0)))
    }

    /// The release's progress deadline.
    pub fn progress_deadline(&self) -> Duration {
        self.run
            .release
            .as_ref()
            .and_then(|r| r.progress_deadline)
            .unwrap_or(defaults::PROGRESS_DEADLINE)
    }

    /// The smallest memory limit the Java runtime needs, with the numbers
    /// that make it up: (heap, headroom percent, off-heap, total bytes).
    pub fn java_memory_floor(&self) -> Option<(u64, u32, u64, u64)> {
        let java = self.java()?;
        let heap = java.heap.0.amount();
        let headroom = java
            .headroom_percent
            .unwrap_or(defaults::JAVA_HEADROOM_PERCENT);
        let off_heap = java
            .off_heap
            .as_ref()
            .map_or(defaults::JAVA_OFF_HEAP, |q| q.0.amount());
        let total = heap
            .saturating_add(heap.saturating_mul(u64::from(headroom)) / 100)
            .saturating_add(off_heap);
        Some((heap, headroom, off_heap, total))
    }

    /// The JVM flags keelson adds (heap, JDWP), in order.
    pub fn jvm_options(&self) -> Vec<String> {
        let Some(java) = self.java() else {
            return Vec::new();
        };
        let heap = Quantity::memory_bytes(java.heap.0.amount());
        let heap_flag = heap_flag(heap.amount());
        let mut options = vec![format!("-Xms{heap_flag}"), format!("-Xmx{heap_flag}")];
        options.extend(java.options.iter().cloned());
        if let Some(port) = self.jdwp_port() {
            options.push(format!(
                "-agentlib:jdwp=transport=dt_socket,server=y,suspend=n,address=*:{port}"
            ));
        }
        options
    }

    /// Seconds the kubelet must allow between starting to stop a pod and
    /// killing it: drain + preOffline timeout + stop timeout + a margin.
    pub fn termination_grace_seconds(&self) -> u64 {
        let pre_offline = self.hooks().pre_offline.map_or(0, |h| {
            h.timeout.unwrap_or(defaults::HOOK_TIMEOUT).as_secs_ceil()
        });
        self.drain().as_secs_ceil()
            + pre_offline
            + self.stop_timeout().as_secs_ceil()
            + defaults::GRACE_MARGIN_SECONDS
    }

    /// The environment variables set on the app, merged.
    pub fn env_vars(&self) -> BTreeMap<String, String> {
        self.run.env.clone().unwrap_or_default()
    }

    /// The app process's `JAVA_TOOL_OPTIONS`: keelson's JVM flags (heap,
    /// debugger) in front of any the profile sets; `None` when keelson adds
    /// none. Only the app's JVM gets them: a JVM that a hook starts must not
    /// claim the heap or the debugger's port.
    pub fn java_tool_options(&self) -> Option<String> {
        let jvm = self.jvm_options();
        if jvm.is_empty() {
            return None;
        }
        let mut options = jvm.join(" ");
        if let Some(own) = self
            .run
            .env
            .as_ref()
            .and_then(|e| e.get("JAVA_TOOL_OPTIONS"))
        {
            options = format!("{options} {own}");
        }
        Some(options)
    }

    /// The lifecycle document the agent reads for this app and environment.
    pub fn lifecycle_document(
        &self,
        authorization: Option<lifecycle::Authorization>,
    ) -> lifecycle::LifecycleDocument {
        let hooks = self.hooks();
        let hook = |h: Option<Hook>| {
            h.map(|h| lifecycle::Hook {
                run: match (h.script, h.command) {
                    (Some(script), _) => lifecycle::HookRun::Script(script),
                    (None, command) => lifecycle::HookRun::Command(command.unwrap_or_default()),
                },
                timeout_seconds: secs(h.timeout.unwrap_or(defaults::HOOK_TIMEOUT)),
                env: h.env,
            })
        };
        lifecycle::LifecycleDocument {
            api_version: lifecycle::LIFECYCLE_API_VERSION.to_string(),
            app: self.name.clone(),
            env: self.env.clone(),
            checkurl: self.checkurl(),
            drain_seconds: secs(self.drain()),
            stop_timeout_seconds: secs(self.stop_timeout()),
            hooks: lifecycle::Hooks {
                pre_start: hook(hooks.pre_start),
                pre_online: hook(hooks.pre_online),
                pre_offline: hook(hooks.pre_offline),
            },
            liveness: self.liveness(),
            authorization: if self.dependencies.databases.is_empty() {
                None
            } else {
                authorization
            },
        }
    }
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs_ceil()).unwrap_or(u32::MAX)
}

/// The JVM's spelling of a heap size: the largest of g, m, k that divides it.
fn heap_flag(bytes: u64) -> String {
    [("g", 30), ("m", 20), ("k", 10)]
        .iter()
        .find(|(_, shift)| bytes != 0 && bytes.is_multiple_of(1u64 << shift))
        .map(|(unit, shift)| format!("{}{unit}", bytes >> shift))
        .unwrap_or_else(|| bytes.to_string())
}

/// A memory quantity's amount in MiB, for messages.
pub(crate) fn mib(bytes: u64) -> String {
    let m = bytes as f64 / f64::from(1u32 << 20);
    if m.fract() == 0.0 {
        format!("{m:.0}Mi")
    } else {
        format!("{m:.1}Mi")
    }
}
