//! The API machinery: Kubernetes semantics on top of the [`Store`].
//!
//! Get, list (selectors, pagination, resourceVersion rules), create (with
//! `generateName`), update with optimistic concurrency, patches (merge,
//! JSON, strategic, server-side apply), the `status` and `scale`
//! subresources, `metadata.generation`, defaulting, and deletion with grace
//! periods, finalizers and garbage collection through ownerReferences.
//!
//! ```text
//!  HTTP handler ─┐                     ┌─► defaults ─► generation ─► managedFields
//!                ├─► Machinery::op ────┤
//!  controllers ──┘                     └─► Store::write(expect rv) ─► watchers
//!                                            │ removal
//!                                            └─► garbage collection (dependents,
//!                                                foreground owners, namespaces)
//! ```
//!
//! Callers inside the process (tests, later controllers) use the same calls
//! as the HTTP layer, so every write goes through one path.

use crate::defaults::{Allocator, apply_defaults};
use crate::error::{ApiError, Result};
use crate::fields::{self, Scope, path_string};
use crate::patch;
use crate::resources::{RESOURCES, ResourceId, ResourceType, ids};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{Expect, Obj, Store, WriteError, key_of};
use crate::util;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Which part of an object a request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// The object itself.
    Main,
    /// `/status`.
    Status,
    /// `/scale` (served as an `autoscaling/v1` Scale).
    Scale,
}

impl Sub {
    fn name(self) -> Option<&'static str> {
        match self {
            Sub::Main => None,
            Sub::Status => Some("status"),
            Sub::Scale => Some("scale"),
        }
    }
}

/// The patch formats, by content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`
    Merge,
    /// `application/json-patch+json`
    Json,
    /// `application/strategic-merge-patch+json`
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply; JSON bodies)
    Apply,
}

/// Options of writes.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// `fieldManager` (for apply, required).
    pub field_manager: Option<String>,
    /// `force` for server-side apply.
    pub force: bool,
    /// `dryRun=All`: validate and answer, store nothing.
    pub dry_run: bool,
}

/// `propagationPolicy` of deletions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    /// Remove the owner now, its dependents after.
    #[default]
    Background,
    /// Remove dependents first; the owner waits with the `foregroundDeletion`
    /// finalizer.
    Foreground,
    /// Leave dependents, removing their owner references.
    Orphan,
}

/// Options of deletions.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// `gracePeriodSeconds` (pods bound to a node honour it).
    pub grace_period: Option<i64>,
    /// `propagationPolicy`.
    pub propagation: Option<Propagation>,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
    /// `dryRun=All`.
    pub dry_run: bool,
}

/// Query of a list.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
    /// `limit` (0 = none).
    pub limit: usize,
    /// `continue`.
    pub continue_token: Option<String>,
    /// `resourceVersion`.
    pub resource_version: Option<String>,
    /// `resourceVersionMatch`.
    pub resource_version_match: Option<String>,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct ListPage {
    /// The items, in key order.
    pub items: Vec<Arc<Obj>>,
    /// The list's resourceVersion.
    pub resource_version: u64,
    /// The token for the next page.
    pub continue_token: Option<String>,
    /// Items left after this page (only computed without selectors).
    pub remaining: Option<usize>,
}

/// Settings of the machinery.
#[derive(Debug, Clone)]
pub struct MachineryConfig {
    /// How long a bound pod stays terminating after a graceful delete before
    /// it disappears (what a kubelet would take to stop it).
    pub pod_termination: Duration,
    /// Whether kubelets stop terminating pods (calling
    /// [`Machinery::finish_pod`]) instead of a timer.
    pub kubelet_stops_pods: bool,
}

impl Default for MachineryConfig {
    fn default() -> Self {
        MachineryConfig {
            pod_termination: Duration::from_millis(0),
            kubelet_stops_pods: false,
        }
    }
}

/// Kubernetes semantics over the store.
pub struct Machinery {
    store: Arc<Store>,
    alloc: Allocator,
    config: MachineryConfig,
}

fn meta(v: &Value, field: &str) -> Option<String> {
    v.get("metadata")?.get(field)?.as_str().map(String::from)
}

fn meta_mut(v: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !v.get("metadata").is_some_and(Value::is_object) {
        v["metadata"] = json!({});
    }
    v["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

/// Whether anything but metadata and status differs (what bumps
/// `metadata.generation`).
fn spec_changed(old: &Value, new: &Value) -> bool {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return old != new;
    };
    let outside = |k: &String| k != "metadata" && k != "status";
    o.iter()
        .filter(|(k, _)| outside(k))
        .any(|(k, v)| n.get(k) != Some(v))
        || n.iter()
            .filter(|(k, _)| outside(k))
            .any(|(k, _)| !o.contains_key(k))
}

/// Encodes a continue token.
fn encode_continue(rv: u64, key: &str) -> String {
    util::hex(format!("{rv}:{key}").as_bytes())
}

fn decode_continue(tok: &str) -> Option<(u64, String)> {
    let raw = String::from_utf8(util::unhex(tok)?).ok()?;
    let (rv, key) = raw.split_once(':')?;
    Some((rv.parse().ok()?, key.to_string()))
}

fn parse_rv(s: &str) -> Result<u64> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version {s:?}")))
}

impl Machinery {
    /// Machinery over a store.
    pub fn new(store: Arc<Store>, config: MachineryConfig) -> Self {
        Machinery {
            store,
            alloc: Allocator::default(),
            config,
        }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn rt(res: ResourceId) -> &'static ResourceType {
        &RESOURCES[res]
    }

    fn key(res: ResourceId, ns: Option<&str>, name: &str) -> String {
        if Self::rt(res).namespaced {
            key_of(ns.unwrap_or(""), name)
        } else {
            key_of("", name)
        }
    }

    fn load(&self, res: ResourceId, ns: Option<&str>, name: &str) -> Result<Arc<Obj>> {
        self.store
            .get(res, &Self::key(res, ns, name))
            .ok_or_else(|| ApiError::not_found(Self::rt(res), name))
    }

    /// Reads one object.
    pub fn get(&self, res: ResourceId, ns: Option<&str>, name: &str) -> Result<Value> {
        Ok(self.load(res, ns, name)?.value())
    }

    /// Reads one object as stored (JSON bytes and indexes).
    pub fn get_raw(&self, res: ResourceId, ns: Option<&str>, name: &str) -> Result<Arc<Obj>> {
        self.load(res, ns, name)
    }

    /// Lists objects (`ns == None`: all namespaces or cluster-scoped).
    pub fn list(&self, res: ResourceId, ns: Option<&str>, q: &ListOptions) -> Result<ListPage> {
        let current = self.store.current_rv();
        let (at, after) = match &q.continue_token {
            Some(tok) if !tok.is_empty() => {
                let (rv, key) = decode_continue(tok)
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                (Some(rv), Some(key))
            }
            _ => {
                let rv = q.resource_version.as_deref().unwrap_or("");
                let at = match (rv, q.resource_version_match.as_deref()) {
                    ("", _) | ("0", _) => None,
                    (rv, Some("Exact")) => {
                        let n = parse_rv(rv)?;
                        if n > current {
                            return Err(too_large(n));
                        }
                        Some(n)
                    }
                    (rv, _) => {
                        let n = parse_rv(rv)?;
                        if n > current {
                            return Err(too_large(n));
                        }
                        None
                    }
                };
                (at, None)
            }
        };
        let mut items = Vec::new();
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let mut more = false;
        let mut remaining = 0usize;
        let selective = !q.labels.is_empty() || !q.fields.is_empty();
        let visit = |o: &Arc<Obj>| {
            if !q.labels.matches(o) || !q.fields.matches(o) {
                return true;
            }
            if items.len() < limit {
                items.push(o.clone());
                true
            } else {
                more = true;
                remaining += 1;
                // Counting the rest is only worth it without selectors.
                !selective
            }
        };
        let snapshot = match (at, q.labels.first_equality()) {
            // The latest state, selected by a label: read the label index.
            (None, Some((k, v))) => self.store.scan_label(res, ns, k, v, after.as_deref(), visit),
            _ => self
                .store
                .scan(res, ns, at, after.as_deref(), visit)
                .map_err(|e| {
                    if q.continue_token.is_some() {
                        ApiError::expired(
                            "The provided continue parameter is too old to display a consistent list result. \
                             You can start a new list without the continue parameter.",
                        )
                    } else {
                        ApiError::expired(e.to_string())
                    }
                })?,
        };
        let continue_token = more
            .then(|| items.last().map(|o| encode_continue(snapshot, &o.key)))
            .flatten();
        Ok(ListPage {
            items,
            resource_version: snapshot,
            continue_token,
            remaining: (more && !selective).then_some(remaining),
        })
    }

    fn check_namespace(&self, rt: &ResourceType, ns: Option<&str>) -> Result<()> {
        if !rt.namespaced {
            return Ok(());
        }
        let ns = ns.unwrap_or("");
        let Some(n) = self.store.get(ids::NAMESPACES, &key_of("", ns)) else {
            return Err(ApiError::not_found(&RESOURCES[ids::NAMESPACES], ns));
        };
        if n.value().pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    rt.plural
                ),
            ));
        }
        Ok(())
    }

    fn normalize_body(
        rt: &ResourceType,
        ns: Option<&str>,
        body: &mut Value,
        name_from_url: Option<&str>,
    ) -> Result<()> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        if let Some(k) = body.get("kind").and_then(Value::as_str)
            && k != rt.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind {k:?} in the body does not match {:?}",
                rt.kind
            )));
        }
        body["kind"] = json!(rt.kind);
        body["apiVersion"] = json!(rt.api_version());
        let m = meta_mut(body);
        if rt.namespaced {
            let url_ns = ns.unwrap_or("");
            match m.get("namespace").and_then(Value::as_str) {
                Some(b) if !b.is_empty() && b != url_ns => {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the provided object ({b}) does not match the namespace sent on the request ({url_ns})"
                    )));
                }
                _ => {
                    m.insert("namespace".into(), json!(url_ns));
                }
            }
        } else {
            m.remove("namespace");
        }
        if let Some(n) = name_from_url {
            match m.get("name").and_then(Value::as_str) {
                Some(b) if b != n => {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({b}) does not match the name on the URL ({n})"
                    )));
                }
                _ => {
                    m.insert("name".into(), json!(n));
                }
            }
        }
        Ok(())
    }

    /// Creates an object.
    pub fn create(
        &self,
        res: ResourceId,
        ns: Option<&str>,
        mut body: Value,
        opts: &WriteOptions,
    ) -> Result<Value> {
        let rt = Self::rt(res);
        Self::normalize_body(rt, ns, &mut body, None)?;
        let manager = opts
            .field_manager
            .clone()
            .unwrap_or_else(|| "unknown".into());
        self.create_prepared(res, ns, body, opts, |obj| {
            // Called before defaulting: ownership covers what the client
            // sent, not the defaults.
            fields::record_update(
                None,
                obj,
                &manager,
                &rt.api_version(),
                None,
                scope_of(rt, Sub::Main),
                &util::now_rfc3339(),
            );
        })
    }

    fn create_prepared(
        &self,
        res: ResourceId,
        ns: Option<&str>,
        mut body: Value,
        opts: &WriteOptions,
        manage: impl Fn(&mut Value),
    ) -> Result<Value> {
        let rt = Self::rt(res);
        self.check_namespace(rt, ns)?;
        let given = meta(&body, "name").filter(|n| !n.is_empty());
        let generate = meta(&body, "generateName").filter(|n| !n.is_empty());
        if given.is_none() && generate.is_none() {
            return Err(ApiError::invalid(
                rt,
                "",
                "metadata.name",
                "Required value: name or generateName is required",
            ));
        }
        if rt.status {
            let keep = body.get("status").cloned();
            if let Some(m) = body.as_object_mut() {
                m.remove("status");
            }
            // Nodes report their own status; everything else starts empty.
            if rt.kind == "Node"
                && let Some(s) = keep
            {
                body["status"] = s;
            }
        }
        {
            let m = meta_mut(&mut body);
            m.insert("uid".into(), json!(util::new_uid()));
            m.insert("creationTimestamp".into(), json!(util::now_rfc3339()));
            for f in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
            ] {
                m.remove(f);
            }
            if rt.tracks_generation() {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
        }
        manage(&mut body);
        apply_defaults(rt.kind, &mut body, &self.alloc);
        for _ in 0..8 {
            let name = match (&given, &generate) {
                (Some(n), _) => n.clone(),
                (None, Some(g)) => format!("{g}{}", util::name_suffix()),
                (None, None) => unreachable!("checked above"),
            };
            meta_mut(&mut body).insert("name".into(), json!(name));
            if rt.kind == "Namespace" {
                apply_defaults(rt.kind, &mut body, &self.alloc);
            }
            if opts.dry_run {
                return Ok(body);
            }
            match self.store.write_returning(
                res,
                &Self::key(res, ns, &name),
                Expect::Absent,
                Some(body.clone()),
            ) {
                Ok((_, v)) => return Ok(v),
                Err(WriteError::Exists) if given.is_none() => continue,
                Err(_) => return Err(ApiError::already_exists(rt, &name)),
            }
        }
        Err(ApiError::new(
            500,
            "InternalError",
            "could not find a free generated name",
        ))
    }

    /// Replaces an object (PUT), on the main resource, `status` or `scale`.
    pub fn update(
        &self,
        res: ResourceId,
        ns: Option<&str>,
        name: &str,
        body: Value,
        sub: Sub,
        opts: &WriteOptions,
    ) -> Result<Value> {
        let rt = Self::rt(res);
        let old = self.load(res, ns, name)?;
        let old_v = old.value();
        if let Some(rv) = meta(&body, "resourceVersion").filter(|r| !r.is_empty())
            && rv != old.rv.to_string()
        {
            return Err(ApiError::stale(rt, name));
        }
        let new = match sub {
            Sub::Scale => {
                let replicas = body.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
                let mut n = old_v.clone();
                n["spec"]["replicas"] = replicas;
                n
            }
            _ => {
                let mut body = body;
                if sub == Sub::Main {
                    Self::normalize_body(rt, ns, &mut body, Some(name))?;
                }
                body
            }
        };
        let out = self.commit(res, ns, name, &old, &old_v, new, sub, opts, None)?;
        if sub == Sub::Scale {
            return Ok(scale_of(&out));
        }
        Ok(out)
    }

    /// Patches an object; server-side apply creates it when absent.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        res: ResourceId,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: &Value,
        sub: Sub,
        opts: &WriteOptions,
    ) -> Result<Value> {
        let rt = Self::rt(res);
        if kind == PatchKind::Apply && opts.field_manager.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::new(
                422,
                "Invalid",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            ));
        }
        let mut last = None;
        for _ in 0..16 {
            let old = match self.load(res, ns, name) {
                Ok(o) => o,
                Err(_) if kind == PatchKind::Apply && sub == Sub::Main => {
                    let mut cfg = body.clone();
                    Self::normalize_body(rt, ns, &mut cfg, Some(name))?;
                    let manager = opts.field_manager.clone().unwrap_or_default();
                    let cfg2 = cfg.clone();
                    match self.create_prepared(res, ns, cfg, opts, |obj| {
                        if let Ok(applied) = fields::apply(
                            None,
                            &cfg2,
                            &manager,
                            &rt.api_version(),
                            None,
                            scope_of(rt, Sub::Main),
                            true,
                            &util::now_rfc3339(),
                        ) && let Some(mf) = applied.pointer("/metadata/managedFields")
                        {
                            meta_mut(obj).insert("managedFields".into(), mf.clone());
                        }
                    }) {
                        Err(ApiError {
                            reason: "AlreadyExists",
                            ..
                        }) => continue,
                        other => return other,
                    }
                }
                Err(e) => return Err(e),
            };
            let old_v = old.value();
            let target = if sub == Sub::Scale {
                scale_of(&old_v)
            } else {
                old_v.clone()
            };
            let (new, applied) = match kind {
                PatchKind::Merge => {
                    let mut t = target;
                    patch::merge_patch(&mut t, body);
                    (t, None)
                }
                PatchKind::Strategic => {
                    let mut t = target;
                    patch::strategic_merge_patch(&mut t, body)
                        .map_err(|e| ApiError::bad_request(e.to_string()))?;
                    (t, None)
                }
                PatchKind::Json => {
                    let mut t = target;
                    patch::json_patch(&mut t, body)
                        .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))?;
                    (t, None)
                }
                PatchKind::Apply => {
                    let mut cfg = body.clone();
                    if sub == Sub::Main {
                        Self::normalize_body(rt, ns, &mut cfg, Some(name))?;
                    }
                    let manager = opts.field_manager.clone().unwrap_or_default();
                    let merged = fields::apply(
                        Some(&old_v),
                        &cfg,
                        &manager,
                        &rt.api_version(),
                        sub.name(),
                        scope_of(rt, sub),
                        opts.force,
                        &util::now_rfc3339(),
                    )
                    .map_err(|c| conflict_error(rt, name, &c))?;
                    (merged.clone(), Some(merged))
                }
            };
            if let Some(rv) = meta(&new, "resourceVersion").filter(|r| !r.is_empty())
                && rv != old.rv.to_string()
                && kind != PatchKind::Apply
                && sub != Sub::Scale
            {
                return Err(ApiError::stale(rt, name));
            }
            let new = match sub {
                Sub::Scale => {
                    let mut n = old_v.clone();
                    n["spec"]["replicas"] =
                        new.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
                    n
                }
                _ => new,
            };
            match self.commit(res, ns, name, &old, &old_v, new, sub, opts, applied) {
                Err(e)
                    if e.reason == "Conflict"
                        && e.details
                            .as_ref()
                            .is_some_and(|d| d.get("internal").is_some()) =>
                {
                    last = Some(e);
                    continue;
                }
                Ok(out) if sub == Sub::Scale => return Ok(scale_of(&out)),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ApiError::stale(rt, name)))
    }

    /// The common tail of updates and patches: subresource separation,
    /// immutable metadata, defaults, generation, field ownership, the
    /// versioned write, and finalization of objects whose last finalizer
    /// went away.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        res: ResourceId,
        ns: Option<&str>,
        name: &str,
        old: &Arc<Obj>,
        old_v: &Value,
        mut new: Value,
        sub: Sub,
        opts: &WriteOptions,
        applied: Option<Value>,
    ) -> Result<Value> {
        let rt = Self::rt(res);
        if !new.is_object() {
            return Err(ApiError::bad_request("the object must be a JSON object"));
        }
        match sub {
            Sub::Status => {
                let status = new.get("status").cloned();
                new = old_v.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                if let Some(mf) = applied
                    .as_ref()
                    .and_then(|a| a.pointer("/metadata/managedFields"))
                {
                    meta_mut(&mut new).insert("managedFields".into(), mf.clone());
                }
            }
            Sub::Main | Sub::Scale => {
                if rt.status {
                    match old_v.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                let om = old_v.get("metadata").cloned().unwrap_or(json!({}));
                let m = meta_mut(&mut new);
                for f in [
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "name",
                    "namespace",
                ] {
                    match om.get(f) {
                        Some(v) => {
                            m.insert(f.into(), v.clone());
                        }
                        None => {
                            m.remove(f);
                        }
                    }
                }
                if applied.is_none() {
                    match om.get("managedFields") {
                        Some(v) => {
                            m.insert("managedFields".into(), v.clone());
                        }
                        None => {
                            m.remove("managedFields");
                        }
                    }
                }
                apply_defaults(rt.kind, &mut new, &self.alloc);
            }
        }
        if rt.tracks_generation() && spec_changed(old_v, &new) {
            let g = old_v
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        if applied.is_none() {
            let manager = opts
                .field_manager
                .clone()
                .unwrap_or_else(|| "unknown".into());
            fields::record_update(
                Some(old_v),
                &mut new,
                &manager,
                &rt.api_version(),
                sub.name(),
                scope_of(rt, sub),
                &util::now_rfc3339(),
            );
        }
        if opts.dry_run {
            return Ok(new);
        }
        if unchanged(old_v, &new) {
            // As upstream: a write that changes nothing (timestamps of
            // managedFields aside) stores nothing and bumps no version.
            return Ok(old_v.clone());
        }
        // With kubelets, a terminating pod bound to a node goes when its
        // kubelet has stopped it, not when its finalizers are gone.
        let kubelet_holds = self.config.kubelet_stops_pods
            && res == ids::PODS
            && new.pointer("/spec/nodeName").is_some()
            && new
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .is_some_and(|g| g > 0);
        let finalized = new.pointer("/metadata/deletionTimestamp").is_some()
            && !kubelet_holds
            && new
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
        let key = Self::key(res, ns, name);
        let (written, written_v) = self
            .store
            .write_returning(res, &key, Expect::Version(old.rv), Some(new))
            .map_err(|e| internal_conflict(rt, name, e))?;
        if finalized {
            let gone = self
                .store
                .write(res, &key, Expect::Version(written.rv), None)
                .map_err(|e| internal_conflict(rt, name, e))?;
            self.after_removal(&gone);
            return Ok(gone.value());
        }
        Ok(written_v)
    }

    /// Deletes an object: at once, or by marking it (grace period,
    /// finalizers, foreground propagation) and finishing later.
    pub fn delete(
        &self,
        res: ResourceId,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value> {
        let rt = Self::rt(res);
        let old = self.load(res, ns, name)?;
        let mut v = old.value();
        if let Some(uid) = &opts.uid
            && *uid != *old.uid
        {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    old.uid
                ),
            ));
        }
        if let Some(rv) = &opts.resource_version
            && *rv != old.rv.to_string()
        {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    old.rv
                ),
            ));
        }
        if opts.dry_run {
            return Ok(v);
        }
        let propagation = opts.propagation.unwrap_or_default();
        if propagation == Propagation::Orphan {
            self.orphan_dependents(&old.uid);
        }
        let key = Self::key(res, ns, name);
        let already = v.pointer("/metadata/deletionTimestamp").is_some();
        let mut finalizers: Vec<Value> = v
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let foreground =
            propagation == Propagation::Foreground && !self.store.dependents(&old.uid).is_empty();
        if foreground && !finalizers.contains(&json!("foregroundDeletion")) {
            finalizers.push(json!("foregroundDeletion"));
        }
        let grace = if res == ids::PODS && v.pointer("/spec/nodeName").is_some() {
            let g = opts.grace_period.unwrap_or_else(|| {
                v.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(30)
            });
            (g > 0).then_some(g)
        } else {
            None
        };
        let namespace_teardown = res == ids::NAMESPACES;
        if finalizers.is_empty() && grace.is_none() && !namespace_teardown {
            let gone = self
                .store
                .write(res, &key, Expect::Version(old.rv), None)
                .map_err(|e| internal_conflict(rt, name, e))?;
            self.after_removal(&gone);
            return Ok(gone.value());
        }
        if !already || foreground {
            let m = meta_mut(&mut v);
            let now = util::now_secs();
            m.insert(
                "deletionTimestamp".into(),
                json!(util::rfc3339(now + grace.unwrap_or(0))),
            );
            m.insert(
                "deletionGracePeriodSeconds".into(),
                json!(grace.unwrap_or(0)),
            );
            m.insert("finalizers".into(), Value::Array(finalizers));
            if m.get("finalizers")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty)
            {
                m.remove("finalizers");
            }
            if rt.tracks_generation() {
                let g = m.get("generation").and_then(Value::as_i64).unwrap_or(0);
                m.insert("generation".into(), json!(g + 1));
            }
            if namespace_teardown {
                v["status"]["phase"] = json!("Terminating");
            }
        }
        let marked = self
            .store
            .write(res, &key, Expect::Version(old.rv), Some(v))
            .map_err(|e| internal_conflict(rt, name, e))?;
        if foreground {
            for (dres, dep) in self.store.dependents(&marked.uid) {
                let dns = (!dep.namespace().is_empty()).then(|| dep.namespace().to_string());
                let _ = self.delete(
                    dres,
                    dns.as_deref(),
                    dep.name(),
                    &DeleteOptions {
                        propagation: Some(Propagation::Foreground),
                        ..Default::default()
                    },
                );
            }
            self.finish_foreground(&marked.uid);
        }
        if namespace_teardown {
            self.teardown_namespace(name);
        }
        if grace.is_some() && !self.config.kubelet_stops_pods {
            self.schedule_pod_removal(
                ns.unwrap_or("").to_string(),
                name.to_string(),
                marked.uid.clone(),
            );
        }
        Ok(self
            .store
            .get(res, &key)
            .map(|o| o.value())
            .unwrap_or_else(|| marked.value()))
    }

    fn schedule_pod_removal(&self, ns: String, name: String, uid: Arc<str>) {
        let store = self.store.clone();
        let delay = self.config.pod_termination;
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = Machinery::new(store, self.config.clone());
        handle.spawn(async move {
            tokio::time::sleep(delay).await;
            this.finish_pod(&ns, &name, &uid);
        });
    }

    /// What the kubelet does when a terminating pod's containers have
    /// stopped: removes the pod unless finalizers still hold it.
    pub fn finish_pod(&self, ns: &str, name: &str, uid: &str) {
        let key = key_of(ns, name);
        let Some(o) = self.store.get(ids::PODS, &key) else {
            return;
        };
        if &*o.uid != uid {
            return;
        }
        let v = o.value();
        if v.pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty())
        {
            return;
        }
        if let Ok(gone) = self
            .store
            .write(ids::PODS, &key, Expect::Version(o.rv), None)
        {
            self.after_removal(&gone);
        }
    }

    fn teardown_namespace(&self, ns: &str) {
        for (res, rt) in RESOURCES.iter().enumerate() {
            if !rt.namespaced {
                continue;
            }
            let mut names = Vec::new();
            let _ = self.store.scan(res, Some(ns), None, None, |o| {
                names.push(o.name().to_string());
                true
            });
            for n in names {
                let _ = self.delete(
                    res,
                    Some(ns),
                    &n,
                    &DeleteOptions {
                        grace_period: Some(0),
                        ..Default::default()
                    },
                );
            }
        }
        let key = key_of("", ns);
        if let Some(o) = self.store.get(ids::NAMESPACES, &key)
            && let Ok(gone) = self
                .store
                .write(ids::NAMESPACES, &key, Expect::Version(o.rv), None)
        {
            self.after_removal(&gone);
        }
    }

    fn orphan_dependents(&self, uid: &str) {
        for (dres, dep) in self.store.dependents(uid) {
            self.drop_owner_ref(dres, &dep, uid);
        }
    }

    fn drop_owner_ref(&self, res: ResourceId, dep: &Arc<Obj>, uid: &str) {
        let mut v = dep.value();
        if let Some(refs) = v
            .pointer_mut("/metadata/ownerReferences")
            .and_then(Value::as_array_mut)
        {
            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
            if refs.is_empty()
                && let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut)
            {
                m.remove("ownerReferences");
            }
        }
        let _ = self
            .store
            .write(res, &dep.key, Expect::Version(dep.rv), Some(v));
    }

    /// Garbage collection after an object is gone: dependents whose owners
    /// are all gone are deleted (background), and owners waiting in
    /// foreground deletion for this dependent are finished.
    fn after_removal(&self, gone: &Arc<Obj>) {
        for (dres, dep) in self.store.dependents(&gone.uid) {
            let alive_owner = dep
                .owners
                .iter()
                .any(|o| **o != *gone.uid && self.store.by_uid(o).is_some());
            if alive_owner {
                self.drop_owner_ref(dres, &dep, &gone.uid);
            } else {
                let dns = (!dep.namespace().is_empty()).then(|| dep.namespace().to_string());
                let _ = self.delete(dres, dns.as_deref(), dep.name(), &DeleteOptions::default());
            }
        }
        for owner in gone.owners.iter() {
            self.finish_foreground(owner);
        }
    }

    fn finish_foreground(&self, uid: &str) {
        let Some((res, o)) = self.store.by_uid(uid) else {
            return;
        };
        let mut v = o.value();
        let waiting = v
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| f.contains(&json!("foregroundDeletion")));
        if !waiting || !self.store.dependents(uid).is_empty() {
            return;
        }
        let m = meta_mut(&mut v);
        let mut left = false;
        if let Some(Value::Array(f)) = m.get_mut("finalizers") {
            f.retain(|x| x != "foregroundDeletion");
            left = !f.is_empty();
            if !left {
                m.remove("finalizers");
            }
        }
        if left {
            let _ = self
                .store
                .write(res, &o.key, Expect::Version(o.rv), Some(v));
        } else if let Ok(gone) = self.store.write(res, &o.key, Expect::Version(o.rv), None) {
            self.after_removal(&gone);
        }
    }

    /// Deletes every object a list query selects.
    pub fn delete_collection(
        &self,
        res: ResourceId,
        ns: Option<&str>,
        q: &ListOptions,
        opts: &DeleteOptions,
    ) -> Result<Vec<Value>> {
        let page = self.list(
            res,
            ns,
            &ListOptions {
                limit: 0,
                continue_token: None,
                ..q.clone()
            },
        )?;
        let mut out = Vec::new();
        for o in page.items {
            let ons = (!o.namespace().is_empty()).then(|| o.namespace().to_string());
            match self.delete(res, ons.as_deref(), o.name(), opts) {
                Ok(v) => out.push(v),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The `scale` view of an object.
    pub fn get_scale(&self, res: ResourceId, ns: Option<&str>, name: &str) -> Result<Value> {
        Ok(scale_of(&self.get(res, ns, name)?))
    }
}

/// Whether a write would change nothing: equal outside metadata, and in
/// metadata equal but for the resourceVersion and managedFields times.
fn unchanged(old: &Value, new: &Value) -> bool {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return old == new;
    };
    if o.len() != n.len()
        || o.iter()
            .any(|(k, v)| k != "metadata" && n.get(k) != Some(v))
    {
        return false;
    }
    let empty = serde_json::Map::new();
    let om = o
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let nm = n
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let skip = |k: &String| k == "resourceVersion" || k == "managedFields";
    let count = |m: &serde_json::Map<String, Value>| m.keys().filter(|k| !skip(k)).count();
    if count(om) != count(nm) || om.iter().any(|(k, v)| !skip(k) && nm.get(k) != Some(v)) {
        return false;
    }
    let entries = |m: &serde_json::Map<String, Value>| -> Vec<Value> {
        m.get("managedFields")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|e| {
                        let mut e = e.clone();
                        if let Some(x) = e.as_object_mut() {
                            x.remove("time");
                        }
                        e
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    entries(om) == entries(nm)
}

fn too_large(n: u64) -> ApiError {
    let mut e = ApiError::new(504, "Timeout", format!("Too large resource version: {n}"));
    e.details = Some(
        json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
    );
    e
}

fn internal_conflict(rt: &ResourceType, name: &str, e: WriteError) -> ApiError {
    match e {
        WriteError::NotFound => ApiError::not_found(rt, name),
        WriteError::Exists => ApiError::already_exists(rt, name),
        WriteError::Stale { .. } => {
            let mut err = ApiError::stale(rt, name);
            if let Some(d) = err.details.as_mut() {
                d["internal"] = json!(true);
            }
            err
        }
    }
}

fn scope_of(rt: &ResourceType, sub: Sub) -> Scope {
    match sub {
        Sub::Status => Scope::Status,
        _ => Scope::Main {
            status_separate: rt.status,
        },
    }
}

fn conflict_error(rt: &ResourceType, name: &str, conflicts: &[fields::Conflict]) -> ApiError {
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with \"{}\" using {}", c.manager, c.api_version),
                "field": path_string(&c.path),
            })
        })
        .collect();
    let message = if conflicts.len() == 1 {
        format!(
            "Apply failed with 1 conflict: conflict with \"{}\" using {}: {}",
            conflicts[0].manager,
            conflicts[0].api_version,
            path_string(&conflicts[0].path)
        )
    } else {
        let lines: Vec<String> = conflicts
            .iter()
            .map(|c| {
                format!(
                    "- conflict with \"{}\" using {}: {}",
                    c.manager,
                    c.api_version,
                    path_string(&c.path)
                )
            })
            .collect();
        format!(
            "Apply failed with {} conflicts:\n{}",
            conflicts.len(),
            lines.join("\n")
        )
    };
    ApiError {
        details: Some(
            json!({"name": name, "group": rt.group, "kind": rt.plural, "causes": causes}),
        ),
        ..ApiError::new(409, "Conflict", message)
    }
}

/// Builds the `autoscaling/v1` Scale of an object with `spec.replicas`.
pub fn scale_of(obj: &Value) -> Value {
    let m = &obj["metadata"];
    let selector = obj
        .pointer("/spec/selector")
        .map(selector_string)
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m["name"],
            "namespace": m["namespace"],
            "uid": m["uid"],
            "resourceVersion": m["resourceVersion"],
            "creationTimestamp": m["creationTimestamp"],
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector,
        },
    })
}

/// Renders a `metav1.LabelSelector` as its string form.
pub fn selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in m {
            parts.push(format!("{k}={}", v.as_str().unwrap_or("")));
        }
    }
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or("");
        let vals: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        match e["operator"].as_str() {
            Some("In") => parts.push(format!("{key} in ({})", vals.join(","))),
            Some("NotIn") => parts.push(format!("{key} notin ({})", vals.join(","))),
            Some("Exists") => parts.push(key.to_string()),
            Some("DoesNotExist") => parts.push(format!("!{key}")),
            _ => {}
        }
    }
    parts.join(",")
}
