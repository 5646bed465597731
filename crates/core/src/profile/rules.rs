//! Semantic rules: what the schema cannot say. Checked on the profile as a
//! whole and on each environment's effective spec; an error found in an
//! effective spec is reported at the field that set the value (the
//! environment's override if it has one, the base spec otherwise).

use std::collections::BTreeSet;

use super::effective::{EffectiveApp, mib};
use super::model::*;
use super::{FieldError, MarkIndex};
use crate::probe::Expr;

/// Longest app name: derived object names (`<app>-green`, ConfigMaps named
/// `<app>-lifecycle-<hash>`, pod names) must stay within 63 characters.
pub const MAX_APP_NAME: usize = 40;
/// Longest environment name.
pub const MAX_ENV_NAME: usize = 20;
/// The port the sidecar serves `/ready` and `/state` on, in every pod.
pub const SIDECAR_PORT: u16 = 8901;
/// Container port names keelson uses itself.
pub const RESERVED_PORT_NAMES: &[&str] = &["jdwp", "keelson"];
/// Largest total size of config files (a ConfigMap holds at most 1 MiB).
const MAX_CONFIG_BYTES: usize = 900 * 1024;
/// Privileges an instance may be granted on a schema.
pub const DATABASE_PRIVILEGES: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "EXECUTE",
    "CREATE TEMPORARY TABLES",
    "LOCK TABLES",
    "SHOW VIEW",
];

struct Report<'a> {
    tree: &'a super::yaml::Node,
    /// Built on the first error: a valid profile never pays for it.
    marks: std::cell::OnceCell<MarkIndex>,
    errors: Vec<FieldError>,
}

impl Report<'_> {
    fn marks(&self) -> &MarkIndex {
        self.marks.get_or_init(|| MarkIndex::of(self.tree))
    }

    fn at(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let mark = self.marks().find(&path);
        self.errors.push(FieldError {
            path,
            message: message.into(),
            line: mark.line,
            column: mark.column,
        });
    }
}

pub(super) fn check(profile: &Profile, tree: &super::yaml::Node) -> Vec<FieldError> {
    let mut r = Report {
        tree,
        marks: std::cell::OnceCell::new(),
        errors: Vec::new(),
    };
    if profile.api_version != API_VERSION {
        r.at(
            "apiVersion",
            format!(
                "`{}` is not supported; expected `{API_VERSION}`",
                profile.api_version
            ),
        );
    }
    if profile.kind != KIND {
        r.at(
            "kind",
            format!("`{}` is not supported; expected `{KIND}`", profile.kind),
        );
    }
    if let Err(e) = app_name(&profile.metadata.name) {
        r.at("metadata.name", e);
    }
    for (key, value) in &profile.metadata.labels {
        let path = format!("metadata.labels.{key}");
        if let Err(e) = label_key(key) {
            r.at(&path, e);
        }
        if let Err(e) = label_value(value) {
            r.at(&path, e);
        }
    }
    for key in profile.metadata.annotations.keys() {
        if let Err(e) = label_key(key) {
            r.at(format!("metadata.annotations.{key}"), e);
        }
    }
    let spec = &profile.spec;
    if spec.team.trim().is_empty() {
        r.at(
            "spec.team",
            "`team` is required: the team that owns the app",
        );
    } else if let Err(e) = dns_label(&spec.team, 63) {
        r.at("spec.team", e);
    }
    if spec.owners.is_empty() {
        r.at(
            "spec.owners",
            "`owners` is required: at least one person or service who may change the app",
        );
    }
    for (i, owner) in spec.owners.iter().enumerate() {
        if owner.trim().is_empty() {
            r.at(format!("spec.owners[{i}]"), "an owner must not be empty");
        }
    }

    if spec.environments.is_empty() {
        r.at("spec.environments", "at least one environment is required, e.g. `prod: {targets: [{cluster: prod-a}], replicas: 3}`");
    }
    // Object names are per app, so two environments of one app cannot share
    // a namespace of one cluster.
    let mut placements = std::collections::BTreeMap::new();
    for (name, environment) in &spec.environments {
        for (i, t) in environment.targets.iter().enumerate() {
            let Some(cluster) = &t.cluster else { continue };
            let namespace = t.namespace.clone().unwrap_or_else(|| name.clone());
            if let Some(other) =
                placements.insert((cluster.clone(), namespace.clone()), name.clone())
                && other != *name
            {
                r.at(
                    format!("spec.environments.{name}.targets[{i}]"),
                    format!("environment `{other}` already runs in namespace `{namespace}` of cluster `{cluster}`; give one of them its own `namespace`"),
                );
            }
        }
    }
    for (name, environment) in &spec.environments {
        let base = format!("spec.environments.{name}");
        if let Err(e) = dns_label(name, MAX_ENV_NAME) {
            r.at(&base, format!("environment name: {e}"));
        }
        check_environment(&mut r, &base, environment);
        if let Some(app) = profile.effective(name) {
            check_effective(&mut r, &app);
        }
    }
    r.errors
}

fn check_environment(r: &mut Report<'_>, base: &str, environment: &Environment) {
    if environment.targets.is_empty() {
        r.at(
            format!("{base}.targets"),
            "at least one target is required: `{cluster: NAME}` or `{hostGroup: NAME}`",
        );
    }
    for (i, t) in environment.targets.iter().enumerate() {
        let path = format!("{base}.targets[{i}]");
        match (&t.cluster, &t.host_group) {
            (Some(_), Some(_)) | (None, None) => r.at(
                &path,
                "a target names exactly one of `cluster` or `hostGroup`",
            ),
            _ => {}
        }
        for (field, value) in [
            ("cluster", &t.cluster),
            ("hostGroup", &t.host_group),
            ("namespace", &t.namespace),
        ] {
            if let Some(v) = value
                && let Err(e) = dns_label(v, 63)
            {
                r.at(format!("{path}.{field}"), e);
            }
        }
        if t.namespace.is_some() && t.cluster.is_none() {
            r.at(
                format!("{path}.namespace"),
                "`namespace` applies only to a `cluster` target",
            );
        }
    }
    let mut seen = BTreeSet::new();
    for (i, t) in environment.targets.iter().enumerate() {
        if !seen.insert((&t.cluster, &t.namespace, &t.host_group)) {
            r.at(
                format!("{base}.targets[{i}]"),
                "this target is listed twice",
            );
        }
    }
    match environment.replicas {
        None => r.at(
            format!("{base}.replicas"),
            "`replicas` is required: instances per target, e.g. 3",
        ),
        Some(n) if n > 1000 => r.at(
            format!("{base}.replicas"),
            format!("{n} is too many; at most 1000 per target"),
        ),
        _ => {}
    }
}

fn check_dependencies(r: &mut Report<'_>, app: &EffectiveApp, origin: &Origin<'_>) {
    let d = &app.dependencies;
    let mut names = BTreeSet::new();
    for (i, db) in d.databases.iter().enumerate() {
        let rel = format!("dependencies.databases[{i}]");
        if !names.insert(&db.name) {
            r.at(
                origin(r, &format!("{rel}.name")),
                format!("database `{}` is listed twice", db.name),
            );
        }
        if let Err(e) = dns_subdomain(&db.host) {
            r.at(origin(r, &format!("{rel}.host")), e);
        }
        if db.port == Some(0) {
            r.at(origin(r, &format!("{rel}.port")), "port must be 1 to 65535");
        }
        if db.schema.is_empty()
            || db.schema.len() > 64
            || !db
                .schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        {
            r.at(
                origin(r, &format!("{rel}.schema")),
                "a schema name is 1 to 64 letters, digits, `_` or `$`",
            );
        }
        if db.privileges.is_empty() {
            r.at(
                origin(r, &format!("{rel}.privileges")),
                format!(
                    "at least one privilege is required, from: {}",
                    DATABASE_PRIVILEGES.join(", ")
                ),
            );
        }
        for (j, p) in db.privileges.iter().enumerate() {
            if !DATABASE_PRIVILEGES.contains(&p.as_str()) {
                r.at(
                    origin(r, &format!("{rel}.privileges[{j}]")),
                    format!(
                        "`{p}` is not a privilege keelson grants; valid: {}",
                        DATABASE_PRIVILEGES.join(", ")
                    ),
                );
            }
        }
    }
    for (i, name) in d.apps.iter().enumerate() {
        if let Err(e) = app_name(name) {
            r.at(origin(r, &format!("dependencies.apps[{i}]")), e);
        }
    }
    for (i, m) in d.middleware.iter().enumerate() {
        if let Err(e) = dns_label(&m.name, 63) {
            r.at(origin(r, &format!("dependencies.middleware[{i}].name")), e);
        }
    }
}

/// Checks one environment's effective spec. `at` picks the path that set a
/// value: the environment's override when present, else the base spec.
fn check_effective(r: &mut Report<'_>, app: &EffectiveApp) {
    let env_base = format!("spec.environments.{}", app.env);
    let origin = |r: &Report<'_>, rel: &str| {
        let env_path = format!("{env_base}.{rel}");
        if r.marks().has(&env_path) {
            env_path
        } else {
            format!("spec.{rel}")
        }
    };
    let run = &app.run;

    match &run.command {
        None => r.at(origin(r, "command"), "`command` is required: the program and arguments that start the app (the agent wraps it)"),
        Some(c) if c.is_empty() || c[0].trim().is_empty() => r.at(origin(r, "command"), "`command` must name a program, e.g. [\"java\", \"-jar\", \"/app/app.jar\"]"),
        _ => {}
    }
    let on_cluster = app.targets.iter().any(|t| t.cluster.is_some());
    let on_hosts = app.targets.iter().any(|t| t.host_group.is_some());
    match &run.image {
        None if on_cluster => r.at(
            origin(r, "image"),
            format!(
                "`image` is required: environment `{}` has a cluster target",
                app.env
            ),
        ),
        Some(image) => {
            if let Err(e) = image_name(image) {
                r.at(origin(r, "image"), e);
            }
        }
        None => {}
    }
    if run.artifact.is_none() && on_hosts {
        r.at(
            origin(r, "artifact"),
            format!(
                "`artifact` is required: environment `{}` has a host group target",
                app.env
            ),
        );
    }

    let ports = app.ports();
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let rel = format!("ports[{i}]");
        if let Err(e) = port_name(&p.name) {
            r.at(origin(r, &format!("{rel}.name")), e);
        }
        if !names.insert(&p.name) {
            r.at(
                origin(r, &format!("{rel}.name")),
                format!("port name `{}` is used twice", p.name),
            );
        }
        if p.port == 0 {
            r.at(origin(r, &format!("{rel}.port")), "port must be 1 to 65535");
        } else if !numbers.insert(p.port) {
            r.at(
                origin(r, &format!("{rel}.port")),
                format!("port {} is listed twice", p.port),
            );
        }
    }

    // The pod's network namespace is shared: the sidecar's listener and the
    // debugger take their ports, and the container's port names are unique.
    let debug_port = app.jdwp_port();
    for (i, p) in ports.iter().enumerate() {
        let rel = format!("ports[{i}]");
        if RESERVED_PORT_NAMES.contains(&p.name.as_str()) {
            r.at(
                origin(r, &format!("{rel}.name")),
                format!(
                    "`{}` is reserved for keelson's own ports; choose another name",
                    p.name
                ),
            );
        }
        if p.port == SIDECAR_PORT {
            r.at(
                origin(r, &format!("{rel}.port")),
                format!("port {SIDECAR_PORT} is the keelson sidecar's; choose another"),
            );
        }
        if debug_port == Some(p.port) {
            r.at(
                origin(r, "debug.port"),
                format!(
                    "port {} is the app's `{}` port; the debugger needs its own",
                    p.port, p.name
                ),
            );
        }
    }
    if debug_port == Some(SIDECAR_PORT) {
        r.at(
            origin(r, "debug.port"),
            format!("port {SIDECAR_PORT} is the keelson sidecar's; choose another"),
        );
    }

    match &run.checkurl {
        None => r.at(
            origin(r, "checkurl"),
            "`checkurl` is required: {port, path} of the URL that says the app is up",
        ),
        Some(c) => {
            match c.port {
                None => r.at(origin(r, "checkurl.port"), "`port` is required"),
                Some(0) => r.at(origin(r, "checkurl.port"), "port must be 1 to 65535"),
                Some(port) if !ports.is_empty() && !ports.iter().any(|p| p.port == port) => {
                    let listed: Vec<String> = ports.iter().map(|p| p.port.to_string()).collect();
                    r.at(
                        origin(r, "checkurl.port"),
                        format!(
                            "port {port} is not one of the app's ports ({})",
                            listed.join(", ")
                        ),
                    );
                }
                _ => {}
            }
            match &c.path {
                None => r.at(
                    origin(r, "checkurl.path"),
                    "`path` is required, e.g. /checkurl",
                ),
                Some(p)
                    if !p.starts_with('/')
                        || p.chars().any(|c| c.is_whitespace() || c.is_control()) =>
                {
                    r.at(
                        origin(r, "checkurl.path"),
                        "the path starts with `/` and has no spaces, e.g. /checkurl",
                    )
                }
                _ => {}
            }
            if let Some(s) = c.expected_status
                && !(100..=599).contains(&s)
            {
                r.at(
                    origin(r, "checkurl.expectedStatus"),
                    format!("{s} is not an HTTP status; expected 100 to 599"),
                );
            }
            for (field, d, max) in [("timeout", c.timeout, 60), ("interval", c.interval, 300)] {
                match d {
                    Some(d) if d.as_millis() < 1000 => r.at(
                        origin(r, &format!("checkurl.{field}")),
                        "must be at least 1s",
                    ),
                    Some(d) if d.as_secs_ceil() > max => r.at(
                        origin(r, &format!("checkurl.{field}")),
                        format!("{d} is too long; at most {max}s"),
                    ),
                    _ => {}
                }
            }
        }
    }

    if let Some(expr) = &run.liveness
        && let Err(e) = Expr::parse(expr)
    {
        r.at(
            origin(r, "liveness"),
            format!("invalid liveness expression: {e}"),
        );
    }

    for (rel, d, max) in [
        ("drain", run.drain, 3600),
        ("stopTimeout", run.stop_timeout, 3600),
        ("startupTimeout", run.startup_timeout, 3600),
    ] {
        if let Some(d) = d
            && d.as_secs_ceil() > max
        {
            r.at(origin(r, rel), format!("{d} is too long; at most {max}s"));
        }
    }
    if let Some(d) = run.startup_timeout
        && d.as_millis() < 1000
    {
        r.at(origin(r, "startupTimeout"), "must be at least 1s");
    }

    check_dependencies(r, app, &origin);
    check_resources(r, app, &origin);
    check_hooks(r, app, &origin);
    check_release(r, app, &origin);
    check_env(r, app, &origin);
    check_autoscaling(r, app, &origin);

    if let Some(debug) = &run.debug {
        if debug.jdwp == Some(true) && app.java().is_none() {
            r.at(origin(r, "debug.jdwp"), "JDWP needs `runtime: {java: …}`");
        }
        if debug.port == Some(0) {
            r.at(origin(r, "debug.port"), "port must be 1 to 65535");
        }
    }
    if let Some(java) = app.java() {
        if java.version < 8 {
            r.at(
                origin(r, "runtime.java.version"),
                format!("JDK {} is not supported; expected 8 or newer", java.version),
            );
        }
        if java.heap.0.amount() < (16 << 20) {
            r.at(
                origin(r, "runtime.java.heap"),
                "the heap must be at least 16Mi",
            );
        }
        if java.headroom_percent.is_some_and(|p| p > 400) {
            r.at(
                origin(r, "runtime.java.headroomPercent"),
                "expected 0 to 400",
            );
        }
    }
}

type Origin<'f> = dyn Fn(&Report<'_>, &str) -> String + 'f;

fn check_resources(r: &mut Report<'_>, app: &EffectiveApp, origin: &Origin<'_>) {
    let resources = app.run.resources.clone().unwrap_or_default();
    let requests = resources.requests.unwrap_or_default();
    let limits = resources.limits.unwrap_or_default();
    if let (Some(req), Some(lim)) = (&requests.cpu, &limits.cpu)
        && req.0.amount() > lim.0.amount()
    {
        r.at(
            origin(r, "resources.requests.cpu"),
            format!("the request {req} is above the limit {lim}"),
        );
    }
    if let (Some(req), Some(lim)) = (&requests.memory, &limits.memory)
        && req.0.amount() > lim.0.amount()
    {
        r.at(
            origin(r, "resources.requests.memory"),
            format!("the request {req} is above the limit {lim}"),
        );
    }
    for (rel, q) in [("requests.cpu", &requests.cpu), ("limits.cpu", &limits.cpu)] {
        if q.as_ref().is_some_and(|q| q.0.amount() == 0) {
            r.at(
                origin(r, &format!("resources.{rel}")),
                "must be more than 0",
            );
        }
    }
    for (rel, q) in [
        ("requests.memory", &requests.memory),
        ("limits.memory", &limits.memory),
    ] {
        if q.as_ref().is_some_and(|q| q.0.amount() < (4 << 20)) {
            r.at(
                origin(r, &format!("resources.{rel}")),
                "must be at least 4Mi",
            );
        }
    }
    if let Some((heap, headroom, off_heap, floor)) = app.java_memory_floor() {
        match &limits.memory {
            None => r.at(
                origin(r, "resources.limits.memory"),
                format!("a Java app needs a memory limit of at least {} (heap {} + {headroom}% headroom + off-heap {})", mib(floor), mib(heap), mib(off_heap)),
            ),
            Some(limit) if limit.0.amount() < floor => r.at(
                origin(r, "resources.limits.memory"),
                format!(
                    "{limit} ({}) leaves too little room above the heap: at least {} is needed (heap {} + {headroom}% headroom {} + off-heap {})",
                    mib(limit.0.amount()),
                    mib(floor),
                    mib(heap),
                    mib(heap.saturating_mul(u64::from(headroom)) / 100),
                    mib(off_heap)
                ),
            ),
            _ => {}
        }
    }
}

fn check_hooks(r: &mut Report<'_>, app: &EffectiveApp, origin: &Origin<'_>) {
    let hooks = app.hooks();
    for (name, hook) in [
        ("preStart", &hooks.pre_start),
        ("preOnline", &hooks.pre_online),
        ("preOffline", &hooks.pre_offline),
    ] {
        let Some(hook) = hook else { continue };
        let rel = format!("hooks.{name}");
        match (&hook.script, &hook.command) {
            (Some(_), Some(_)) | (None, None) => r.at(origin(r, &rel), "a hook has exactly one of `script` (in the hooks directory) or `command` (a shell command line)"),
            (Some(script), None) if script.is_empty() || script.starts_with('/') || script.split('/').any(|p| p == "..") => {
                r.at(origin(r, &format!("{rel}.script")), "a script is a relative path inside the hooks directory, without `..`")
            }
            (None, Some(command)) if command.trim().is_empty() => r.at(origin(r, &format!("{rel}.command")), "the command is empty"),
            _ => {}
        }
        if let Some(t) = hook.timeout {
            if t.as_millis() < 1000 {
                r.at(origin(r, &format!("{rel}.timeout")), "must be at least 1s");
            } else if t.as_secs_ceil() > 3600 {
                r.at(origin(r, &format!("{rel}.timeout")), "at most 1h");
            }
        }
        for key in hook.env.keys() {
            if let Err(e) = env_name(key) {
                r.at(origin(r, &format!("{rel}.env.{key}")), e);
            }
        }
    }
}

fn check_release(r: &mut Report<'_>, app: &EffectiveApp, origin: &Origin<'_>) {
    let Some(release) = &app.run.release else {
        return;
    };
    if let Some(b) = &release.batches {
        match (b.count, b.size) {
            (Some(_), Some(_)) | (None, None) => r.at(
                origin(r, "release.batches"),
                "give exactly one of `count` (number of batches) or `size` (instances per batch)",
            ),
            (Some(0), _) => r.at(origin(r, "release.batches.count"), "at least 1"),
            (_, Some(0)) => r.at(origin(r, "release.batches.size"), "at least 1"),
            _ => {}
        }
    }
    if let Some(f) = &release.failed_instances {
        let policy = f.policy.unwrap_or(FailedInstancePolicyKind::Fail);
        match (policy, f.max_attempts, f.max_ratio) {
            (FailedInstancePolicyKind::Recreate, None, _) => r.at(
                origin(r, "release.failedInstances.maxAttempts"),
                "`recreate` needs `maxAttempts`, e.g. 3",
            ),
            (FailedInstancePolicyKind::Recreate, Some(0), _) => r.at(
                origin(r, "release.failedInstances.maxAttempts"),
                "at least 1",
            ),
            (FailedInstancePolicyKind::Tolerate, _, None) => r.at(
                origin(r, "release.failedInstances.maxRatio"),
                "`tolerate` needs `maxRatio`, a fraction above 0 and at most 1, e.g. 0.1",
            ),
            (FailedInstancePolicyKind::Tolerate, _, Some(x)) if !(x > 0.0 && x <= 1.0) => r.at(
                origin(r, "release.failedInstances.maxRatio"),
                format!("{x} is not a fraction above 0 and at most 1"),
            ),
            _ => {}
        }
        if f.max_attempts.is_some() && policy != FailedInstancePolicyKind::Recreate {
            r.at(
                origin(r, "release.failedInstances.maxAttempts"),
                "`maxAttempts` goes with `policy: recreate`",
            );
        }
        if f.max_ratio.is_some() && policy != FailedInstancePolicyKind::Tolerate {
            r.at(
                origin(r, "release.failedInstances.maxRatio"),
                "`maxRatio` goes with `policy: tolerate`",
            );
        }
    }
    if let Some(d) = release.progress_deadline
        && d.as_millis() < 10_000
    {
        r.at(
            origin(r, "release.progressDeadline"),
            "must be at least 10s",
        );
    }
}

fn check_env(r: &mut Report<'_>, app: &EffectiveApp, origin: &Origin<'_>) {
    for key in app.env_vars().keys() {
        if let Err(e) = env_name(key) {
            r.at(origin(r, &format!("env.{key}")), e);
        }
    }
    let mut seen = BTreeSet::new();
    for (i, s) in app.run.secrets.iter().flatten().enumerate() {
        let rel = format!("secrets[{i}]");
        if let Err(e) = env_name(&s.env) {
            r.at(origin(r, &format!("{rel}.env")), e);
        }
        if !seen.insert(&s.env) || app.env_vars().contains_key(&s.env) {
            r.at(
                origin(r, &format!("{rel}.env")),
                format!("`{}` is set more than once", s.env),
            );
        }
        if let Err(e) = dns_subdomain(&s.secret) {
            r.at(origin(r, &format!("{rel}.secret")), e);
        }
        if let Err(e) = config_key(&s.key) {
            r.at(origin(r, &format!("{rel}.key")), e);
        }
    }
    if let Some(config) = &app.run.config {
        if let Some(p) = &config.mount_path
            && let Err(e) = mount_path(p, &app.hooks_directory())
        {
            r.at(origin(r, "config.mountPath"), e);
        }
        let mut total = 0;
        for (name, content) in &config.files {
            total += name.len() + content.len();
            if let Err(e) = config_key(name) {
                r.at(origin(r, &format!("config.files.{name}")), e);
            }
        }
        if total > MAX_CONFIG_BYTES {
            r.at(origin(r, "config.files"), format!("the files add up to {total} bytes; at most {MAX_CONFIG_BYTES} fit in a ConfigMap"));
        }
    }
}

/// A directory to mount config files on: absolute, clean, not `/`, and not
/// over keelson's own mounts or the hooks.
fn mount_path(p: &str, hooks: &str) -> Result<(), String> {
    let clean = p.trim_end_matches('/');
    let segments_ok = p.starts_with('/')
        && clean
            .split('/')
            .skip(1)
            .all(|s| !s.is_empty() && s != "." && s != "..");
    let hint = "an absolute path such as /app/config, without `.` or `..`, outside /keelson and the hooks directory";
    if !segments_ok || clean.is_empty() {
        return Err(format!("`{p}` is not valid: {hint}"));
    }
    let overlaps = |other: &str| {
        clean == other
            || clean.starts_with(&format!("{other}/"))
            || other.starts_with(&format!("{clean}/"))
    };
    if (overlaps("/keelson") && clean != "/keelson/app-config")
        || overlaps(hooks.trim_end_matches('/'))
    {
        return Err(format!("`{p}` overlaps keelson's own files: {hint}"));
    }
    Ok(())
}

fn check_autoscaling(r: &mut Report<'_>, app: &EffectiveApp, origin: &Origin<'_>) {
    let Some(a) = &app.run.autoscaling else {
        return;
    };
    match a.min {
        None => r.at(origin(r, "autoscaling.min"), "`min` is required"),
        Some(0) => r.at(origin(r, "autoscaling.min"), "at least 1"),
        _ => {}
    }
    match (a.min, a.max) {
        (_, None) => r.at(origin(r, "autoscaling.max"), "`max` is required"),
        (Some(min), Some(max)) if max < min => r.at(
            origin(r, "autoscaling.max"),
            format!("{max} is below min {min}"),
        ),
        _ => {}
    }
    if a.cpu.is_none() && a.memory.is_none() && a.custom.is_none() {
        r.at(
            origin(r, "autoscaling"),
            "give at least one target: `cpu` or `memory` (percent of requests) or `custom`",
        );
    }
    let requests = app
        .run
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    for (field, target, request) in [
        ("cpu", a.cpu, requests.cpu.is_some()),
        ("memory", a.memory, requests.memory.is_some()),
    ] {
        match target {
            Some(0) => r.at(origin(r, &format!("autoscaling.{field}")), "a percentage above 0"),
            Some(_) if !request => r.at(origin(r, &format!("autoscaling.{field}")), format!("a {field} target is a percentage of `resources.requests.{field}`, which is not set")),
            _ => {}
        }
    }
    if let Some(c) = &a.custom
        && c.target.0.amount() == 0
    {
        r.at(
            origin(r, "autoscaling.custom.target"),
            "the target must be above 0",
        );
    }
    if let Some(c) = &a.custom
        && (c.metric.is_empty()
            || c.metric == "."
            || c.metric == ".."
            || c.metric.len() > 253
            || !c
                .metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_:.-".contains(c)))
    {
        r.at(
            origin(r, "autoscaling.custom.metric"),
            format!(
                "`{}` is not a metric name: letters, digits, `_`, `:`, `.` and `-`",
                c.metric
            ),
        );
    }
}

/// An app name: a DNS-1123 label of at most 40 characters starting with a letter.
pub fn app_name(name: &str) -> Result<(), String> {
    dns_label(name, MAX_APP_NAME)?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!("`{name}` must start with a lowercase letter"));
    }
    Ok(())
}

/// A DNS-1123 label of at most `max` characters.
pub fn dns_label(name: &str, max: usize) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not valid: use 1 to {max} lowercase letters, digits and `-`, starting and ending with a letter or digit"
        ))
    }
}

fn dns_subdomain(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| dns_label(part, 63).is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid DNS name: lowercase letters, digits, `-` and `.`, at most 253 characters"
        ))
    }
}

fn port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid port name: 1 to 15 lowercase letters, digits and single `-`, with at least one letter"
        ))
    }
}

fn env_name(name: &str) -> Result<(), String> {
    let ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(format!(
            "`{name}` is not a valid variable name: letters, digits and `_`, not starting with a digit"
        ));
    }
    if name.starts_with("KEELSON_") {
        return Err(format!(
            "`{name}`: names starting with KEELSON_ are set by keelson"
        ));
    }
    Ok(())
}

fn config_key(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name != "."
        && !name.starts_with("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid file name: letters, digits, `-`, `_` and `.`, not starting with `..`"
        ))
    }
}

fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        dns_subdomain(p).map_err(|e| format!("label prefix: {e}"))?;
        if p == "keelson.dev"
            || p.ends_with(".keelson.dev")
            || p == "app.kubernetes.io"
            || p.ends_with(".kubernetes.io")
            || p == "kubernetes.io"
        {
            return Err(format!(
                "`{key}`: the prefix `{p}/` is reserved; keelson and Kubernetes set these"
            ));
        }
    }
    let ok = !name.is_empty() && name.len() <= 63 && label_chars(name);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{key}` is not a valid key: an optional DNS prefix and `/`, then 1 to 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit"
        ))
    }
}

fn label_chars(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A label value: empty, or up to 63 letters, digits, `-`, `_`, `.`,
/// starting and ending alphanumeric.
pub fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || (value.len() <= 63 && label_chars(value)) {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a valid label value: at most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit"
        ))
    }
}

fn image_name(image: &str) -> Result<(), String> {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        return Err(format!(
            "`{image}`: leave the tag out; the release's version becomes the tag"
        ));
    }
    let ok = !image.is_empty()
        && image.len() <= 200
        && image
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._/:".contains(c))
        && !image.starts_with(['/', '-', '.'])
        && !image.ends_with(['/', '-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{image}` is not a valid image name: lowercase letters, digits, `-`, `_`, `.`, `/` and a registry port, e.g. registry.example.com/team/app"
        ))
    }
}
