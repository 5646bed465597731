//! Field ownership (`metadata.managedFields`, FieldsV1) and server-side
//! apply.
//!
//! A field set is a set of paths. A path steps through map fields by name
//! and through lists that merge by key (see [`crate::patch::merge_key`]) by
//! the item's key; every other list, and every scalar, is one leaf owned as a
//! whole. Each manager entry owns a set; apply compares the applied
//! configuration with the live object on the paths other managers own to
//! find conflicts, merges, and removes fields the applier stopped sending
//! when nobody else owns them.

use crate::patch::merge_key;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathElem {
    /// A map field.
    Field(String),
    /// A list item by key: `(key field, key value as JSON)`.
    Key(String, String),
}

/// A path from the object's root.
pub type Path = Vec<PathElem>;
/// A set of owned paths.
pub type FieldSet = BTreeSet<Path>;

/// Which part of an object a request may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The main resource; `status` is excluded when it is a subresource.
    Main {
        /// Whether `status` is a separate subresource.
        status_separate: bool,
    },
    /// The `status` subresource: only `status`.
    Status,
}

const UNTRACKED_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The tracked top-level fields of `obj` within `scope`, each with its path
/// and value: `metadata` is entered one level, minus the fields the server
/// owns, so both [`field_set`] and [`leaf_values`] walk the same roots.
fn tracked_roots(obj: &Value, scope: Scope) -> Vec<(&str, Path, &Value)> {
    let mut roots = Vec::new();
    let Some(m) = obj.as_object() else {
        return roots;
    };
    for (k, v) in m {
        let tracked = match (k.as_str(), scope) {
            ("apiVersion" | "kind", _) => false,
            ("status", Scope::Main { status_separate }) => !status_separate,
            (_, Scope::Main { .. }) => true,
            ("status", Scope::Status) => true,
            (_, Scope::Status) => false,
        };
        if !tracked {
            continue;
        }
        let path = vec![PathElem::Field(k.clone())];
        if k != "metadata" {
            roots.push((k.as_str(), path, v));
            continue;
        }
        for (mk, mv) in v.as_object().into_iter().flatten() {
            if !UNTRACKED_META.contains(&mk.as_str()) {
                let mut p = path.clone();
                p.push(PathElem::Field(mk.clone()));
                roots.push((mk.as_str(), p, mv));
            }
        }
    }
    roots
}

/// The paths set in `obj` within `scope`.
pub fn field_set(obj: &Value, scope: Scope) -> FieldSet {
    let mut out = FieldSet::new();
    for (field, path, value) in tracked_roots(obj, scope) {
        walk(value, field, path, &mut out);
    }
    out
}

/// Every path of [`field_set`] with the value found there (list items map
/// to themselves), collected in one walk so that two versions of an object
/// can be compared path by path.
pub fn leaf_values(obj: &Value, scope: Scope) -> std::collections::BTreeMap<Path, &Value> {
    let mut out = std::collections::BTreeMap::new();
    for (field, path, value) in tracked_roots(obj, scope) {
        walk_values(value, field, path, &mut out);
    }
    out
}

fn walk_values<'a>(
    v: &'a Value,
    field: &str,
    path: Path,
    out: &mut std::collections::BTreeMap<Path, &'a Value>,
) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                let mut p = path.clone();
                p.push(PathElem::Field(k.clone()));
                walk_values(c, k, p, out);
            }
        }
        Value::Array(items) if !items.is_empty() => match merge_key(field, items) {
            Some(key) => {
                for item in items {
                    let mut p = path.clone();
                    p.push(PathElem::Key(key.to_string(), item[key].to_string()));
                    // The item's own entry only records that it exists.
                    out.insert(p.clone(), &Value::Null);
                    if let Some(m) = item.as_object() {
                        for (k, c) in m {
                            let mut q = p.clone();
                            q.push(PathElem::Field(k.clone()));
                            walk_values(c, k, q, out);
                        }
                    }
                }
            }
            None => {
                out.insert(path, v);
            }
        },
        _ => {
            out.insert(path, v);
        }
    }
}

fn walk(v: &Value, field: &str, path: Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                let mut p = path.clone();
                p.push(PathElem::Field(k.clone()));
                walk(c, k, p, out);
            }
        }
        Value::Array(items) if !items.is_empty() => match merge_key(field, items) {
            Some(key) => {
                for item in items {
                    let mut p = path.clone();
                    p.push(PathElem::Key(key.to_string(), item[key].to_string()));
                    out.insert(p.clone());
                    if let Some(m) = item.as_object() {
                        for (k, c) in m {
                            let mut q = p.clone();
                            q.push(PathElem::Field(k.clone()));
                            walk(c, k, q, out);
                        }
                    }
                }
            }
            None => {
                out.insert(path);
            }
        },
        _ => {
            out.insert(path);
        }
    }
}

/// The value at `path`, if present.
pub fn get_at<'a>(obj: &'a Value, path: &[PathElem]) -> Option<&'a Value> {
    let mut cur = obj;
    for e in path {
        cur = match e {
            PathElem::Field(f) => cur.get(f)?,
            PathElem::Key(k, v) => cur
                .as_array()?
                .iter()
                .find(|i| i.get(k).map(Value::to_string).as_deref() == Some(v))?,
        };
    }
    Some(cur)
}

/// Removes the value at `path`, if present.
pub fn remove_at(obj: &mut Value, path: &[PathElem]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for e in parent {
        let next = match e {
            PathElem::Field(f) => cur.get_mut(f),
            PathElem::Key(k, v) => cur.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|i| i.get(k).map(Value::to_string).as_deref() == Some(v))
            }),
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        PathElem::Field(f) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(f);
            }
        }
        PathElem::Key(k, v) => {
            if let Some(a) = cur.as_array_mut() {
                a.retain(|i| i.get(k).map(Value::to_string).as_deref() != Some(v));
            }
        }
    }
}

/// Renders a path as upstream does in conflict messages:
/// `.spec.template.spec.containers[name="app"].image`.
pub fn path_string(path: &[PathElem]) -> String {
    let mut s = String::new();
    for e in path {
        match e {
            PathElem::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            PathElem::Key(k, v) => s.push_str(&format!("[{k}={v}]")),
        }
    }
    s
}

/// Encodes a field set as FieldsV1 JSON.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for e in path {
            let k = match e {
                PathElem::Field(f) => format!("f:{f}"),
                PathElem::Key(k, v) => format!("k:{{\"{k}\":{v}}}"),
            };
            node = node
                .entry(k)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("field set nodes are objects");
        }
        if matches!(path.last(), Some(PathElem::Key(..))) {
            node.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

/// Decodes FieldsV1 JSON into a field set (set-valued `v:` and indexed
/// `i:` entries, which kubesim never writes, are skipped).
pub fn from_fields_v1(v: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    decode(v, Vec::new(), &mut out);
    out
}

fn decode(v: &Value, path: Path, out: &mut FieldSet) {
    let Some(m) = v.as_object() else { return };
    for (k, child) in m {
        if k == "." {
            out.insert(path.clone());
            continue;
        }
        let elem = if let Some(f) = k.strip_prefix("f:") {
            PathElem::Field(f.to_string())
        } else if let Some(kv) = k.strip_prefix("k:") {
            match serde_json::from_str::<Map<String, Value>>(kv) {
                Ok(m) if m.len() == 1 => {
                    let (kk, vv) = m.iter().next().expect("one entry");
                    PathElem::Key(kk.clone(), vv.to_string())
                }
                _ => continue,
            }
        } else {
            continue;
        };
        let mut p = path.clone();
        p.push(elem);
        if child.as_object().is_some_and(Map::is_empty) {
            out.insert(p);
        } else {
            decode(child, p, out);
        }
    }
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerEntry {
    /// Field manager name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// The apiVersion the manager used.
    pub api_version: String,
    /// When the entry last changed.
    pub time: String,
    /// `status`, `scale` or none.
    pub subresource: Option<String>,
    /// The owned fields.
    pub fields: FieldSet,
    /// The entry as read, while nothing about it changed (written back
    /// as is, sparing a re-encoding).
    pub raw: Option<Value>,
}

impl ManagerEntry {
    fn same_slot(&self, manager: &str, operation: &str, sub: Option<&str>) -> bool {
        self.manager == manager && self.operation == operation && self.subresource.as_deref() == sub
    }
}

/// Reads `metadata.managedFields`.
pub fn read_managers(obj: &Value) -> Vec<ManagerEntry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| ManagerEntry {
            manager: e["manager"].as_str().unwrap_or("").to_string(),
            operation: e["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: e["apiVersion"].as_str().unwrap_or("").to_string(),
            time: e["time"].as_str().unwrap_or("").to_string(),
            subresource: e["subresource"].as_str().map(String::from),
            fields: from_fields_v1(&e["fieldsV1"]),
            raw: Some(e.clone()),
        })
        .collect()
}

/// The top-level `f:` names of an entry's FieldsV1, read without decoding
/// the whole set.
fn top_fields(entry: &Value) -> Vec<&str> {
    entry["fieldsV1"]
        .as_object()
        .map(|m| m.keys().filter_map(|k| k.strip_prefix("f:")).collect())
        .unwrap_or_default()
}

/// Writes `metadata.managedFields` (dropping entries that own nothing).
pub fn write_managers(obj: &mut Value, managers: Vec<ManagerEntry>) {
    let list: Vec<Value> = managers
        .into_iter()
        .filter(|m| m.raw.is_some() || !m.fields.is_empty())
        .map(|m| {
            if let Some(raw) = m.raw {
                return raw;
            }
            let mut e = json!({
                "manager": m.manager,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": m.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&m.fields),
            });
            if let Some(s) = &m.subresource {
                e["subresource"] = json!(s);
            }
            e
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

fn has_prefix(path: &[PathElem], prefix: &[PathElem]) -> bool {
    path.len() >= prefix.len() && path[..prefix.len()] == *prefix
}

/// Who changed what: records an `Update` operation by `manager` that turned
/// `old` into `new` (`old == None` for a creation). Changed fields move to
/// the updater; fields that disappeared leave every manager.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    subresource: Option<&str>,
    scope: Scope,
    now: &str,
) {
    let new_leaves = leaf_values(new, scope);
    let old_leaves = old.map(|o| leaf_values(o, scope)).unwrap_or_default();
    let changed: FieldSet = new_leaves
        .iter()
        .filter(|(p, v)| old_leaves.get(*p) != Some(*v))
        .map(|(p, _)| p.clone())
        .collect();
    let removed: Vec<Path> = old_leaves
        .keys()
        .filter(|p| !new_leaves.contains_key(*p))
        .cloned()
        .collect();
    drop(new_leaves);
    let touched: BTreeSet<&str> = changed
        .iter()
        .chain(removed.iter())
        .filter_map(|p| match p.first() {
            Some(PathElem::Field(f)) => Some(f.as_str()),
            _ => None,
        })
        .collect();
    // Entries owning nothing under a touched top-level field stay as read,
    // without decoding.
    // `new` carries the entries of `old` (callers copy them over); taking
    // them spares copying each untouched entry once more.
    let entries: Vec<Value> = match old {
        None => Vec::new(),
        Some(_) => match new
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .and_then(|m| m.remove("managedFields"))
        {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        },
    };
    let mut managers: Vec<ManagerEntry> = entries
        .into_iter()
        .map(|e| {
            let same_slot = e["manager"].as_str() == Some(manager)
                && e["operation"].as_str() == Some("Update")
                && e["subresource"].as_str() == subresource;
            if !same_slot && !top_fields(&e).iter().any(|f| touched.contains(f)) {
                return ManagerEntry {
                    manager: e["manager"].as_str().unwrap_or("").to_string(),
                    operation: e["operation"].as_str().unwrap_or("Update").to_string(),
                    api_version: String::new(),
                    time: String::new(),
                    subresource: e["subresource"].as_str().map(String::from),
                    fields: FieldSet::new(),
                    raw: Some(e),
                };
            }
            let mut m = read_managers(&json!({"metadata": {"managedFields": [&e]}}))
                .pop()
                .expect("one entry was given");
            let before = m.fields.len();
            m.fields
                .retain(|p| !changed.contains(p) && !removed.iter().any(|r| has_prefix(p, r)));
            if m.fields.len() != before {
                m.raw = None;
            }
            m
        })
        .collect();
    if !changed.is_empty() {
        match managers
            .iter_mut()
            .find(|m| m.same_slot(manager, "Update", subresource))
        {
            Some(m) => {
                m.fields.extend(changed);
                m.time = now.to_string();
                m.api_version = api_version.to_string();
                m.raw = None;
            }
            None => managers.push(ManagerEntry {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                time: now.to_string(),
                subresource: subresource.map(String::from),
                fields: changed,
                raw: None,
            }),
        }
    }
    write_managers(new, managers);
}

/// A field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The owning manager.
    pub manager: String,
    /// The apiVersion it used.
    pub api_version: String,
    /// The contested field.
    pub path: Path,
}

/// Server-side apply of `config` by `manager` onto `live` (`None` when the
/// object does not exist yet). Returns the merged object with updated
/// managedFields, or the conflicts when `force` is false.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    live: Option<&Value>,
    config: &Value,
    manager: &str,
    api_version: &str,
    subresource: Option<&str>,
    scope: Scope,
    force: bool,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let cfg_fields = field_set(config, scope);
    let empty = json!({});
    let base = live.unwrap_or(&empty);
    let mut managers = live.map(read_managers).unwrap_or_default();
    let mut conflicts = Vec::new();
    for m in &managers {
        if m.same_slot(manager, "Apply", subresource) {
            continue;
        }
        for p in cfg_fields.intersection(&m.fields) {
            if matches!(p.last(), Some(PathElem::Key(..))) {
                continue;
            }
            if get_at(base, p) != get_at(config, p) {
                conflicts.push(Conflict {
                    manager: m.manager.clone(),
                    api_version: m.api_version.clone(),
                    path: p.clone(),
                });
            }
        }
    }
    if !conflicts.is_empty() {
        if !force {
            return Err(conflicts);
        }
        for m in &mut managers {
            if !m.same_slot(manager, "Apply", subresource) {
                let before = m.fields.len();
                m.fields.retain(|p| !conflicts.iter().any(|c| c.path == *p));
                if m.fields.len() != before {
                    m.raw = None;
                }
            }
        }
    }
    let mut merged = base.clone();
    merge_apply(&mut merged, config, "");
    let previous = managers
        .iter()
        .find(|m| m.same_slot(manager, "Apply", subresource))
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    let mut removed: Vec<&Path> = previous.difference(&cfg_fields).collect();
    removed.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in removed {
        let owned_elsewhere = managers.iter().any(|m| {
            !m.same_slot(manager, "Apply", subresource) && m.fields.iter().any(|q| has_prefix(q, p))
        });
        if !owned_elsewhere {
            remove_at(&mut merged, p);
        }
    }
    match managers
        .iter_mut()
        .find(|m| m.same_slot(manager, "Apply", subresource))
    {
        Some(m) => {
            m.fields = cfg_fields;
            m.time = now.to_string();
            m.api_version = api_version.to_string();
            m.raw = None;
        }
        None => managers.push(ManagerEntry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version: api_version.to_string(),
            time: now.to_string(),
            subresource: subresource.map(String::from),
            fields: cfg_fields,
            raw: None,
        }),
    }
    write_managers(&mut merged, managers);
    Ok(merged)
}

/// Merges an applied configuration into the live object: maps field by
/// field, keyed lists item by item, everything else replaced.
fn merge_apply(live: &mut Value, cfg: &Value, field: &str) {
    match (live, cfg) {
        (Value::Object(l), Value::Object(c)) => {
            for (k, v) in c {
                if k == "metadata" && field.is_empty() {
                    let lm = l.entry(k.clone()).or_insert_with(|| json!({}));
                    if let (Value::Object(lm), Value::Object(cm)) = (lm, v) {
                        for (mk, mv) in cm {
                            if mk == "managedFields" || mk == "resourceVersion" || mk == "uid" {
                                continue;
                            }
                            match lm.get_mut(mk) {
                                Some(cur) => merge_apply(cur, mv, mk),
                                None => {
                                    lm.insert(mk.clone(), mv.clone());
                                }
                            }
                        }
                    }
                    continue;
                }
                match l.get_mut(k) {
                    Some(cur) => merge_apply(cur, v, k),
                    None => {
                        l.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(c)) => {
            let all: Vec<Value> = l.iter().chain(c.iter()).cloned().collect();
            match merge_key(field, &all) {
                Some(key) => {
                    for item in c {
                        match l.iter_mut().find(|x| x.get(key) == item.get(key)) {
                            Some(cur) => merge_apply(cur, item, ""),
                            None => l.push(item.clone()),
                        }
                    }
                }
                None => *l = c.clone(),
            }
        }
        (l, c) => *l = c.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: Scope = Scope::Main {
        status_separate: true,
    };

    fn deploy(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "labels": {"a": "1"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "app", "image": image}]}}}})
    }

    #[test]
    fn fields_v1_round_trips() {
        let set = field_set(&deploy(1, "x"), MAIN);
        let enc = to_fields_v1(&set);
        assert_eq!(
            enc["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"app\"}"]["."],
            json!({})
        );
        assert_eq!(from_fields_v1(&enc), set);
    }

    #[test]
    fn second_manager_conflicts_then_forces() {
        let live = apply(
            None,
            &deploy(1, "x"),
            "a",
            "apps/v1",
            None,
            MAIN,
            false,
            "t",
        )
        .unwrap();
        let cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 3}});
        let err = apply(Some(&live), &cfg, "b", "apps/v1", None, MAIN, false, "t").unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(path_string(&err[0].path), ".spec.replicas");
        let forced = apply(Some(&live), &cfg, "b", "apps/v1", None, MAIN, true, "t").unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        let ms = read_managers(&forced);
        let a = ms.iter().find(|m| m.manager == "a").unwrap();
        assert!(!a.fields.iter().any(|p| path_string(p) == ".spec.replicas"));
        // Same value: shared, no conflict.
        let same = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 1}});
        assert!(apply(Some(&live), &same, "c", "apps/v1", None, MAIN, false, "t").is_ok());
    }

    #[test]
    fn fields_no_longer_applied_are_removed_unless_shared() {
        let live = apply(
            None,
            &deploy(1, "x"),
            "a",
            "apps/v1",
            None,
            MAIN,
            false,
            "t",
        )
        .unwrap();
        let mut cfg = deploy(1, "x");
        cfg["metadata"].as_object_mut().unwrap().remove("labels");
        cfg["spec"].as_object_mut().unwrap().remove("replicas");
        // b shares replicas, so it survives a's dropping it; the label goes.
        let shared = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 1}});
        let live = apply(Some(&live), &shared, "b", "apps/v1", None, MAIN, false, "t").unwrap();
        let out = apply(Some(&live), &cfg, "a", "apps/v1", None, MAIN, false, "t").unwrap();
        assert_eq!(out["spec"]["replicas"], 1);
        assert!(out["metadata"]["labels"].get("a").is_none());
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["image"],
            "x"
        );
    }

    #[test]
    fn update_moves_changed_fields_to_the_updater() {
        let live = apply(
            None,
            &deploy(1, "x"),
            "a",
            "apps/v1",
            None,
            MAIN,
            false,
            "t",
        )
        .unwrap();
        let mut new = live.clone();
        new["spec"]["replicas"] = json!(5);
        record_update(
            Some(&live),
            &mut new,
            "kubectl-scale",
            "apps/v1",
            Some("scale"),
            MAIN,
            "t",
        );
        let ms = read_managers(&new);
        assert_eq!(ms.len(), 2);
        let s = ms.iter().find(|m| m.manager == "kubectl-scale").unwrap();
        assert_eq!(
            s.fields.iter().map(|p| path_string(p)).collect::<Vec<_>>(),
            [".spec.replicas"]
        );
        let cfg = deploy(2, "x");
        let err = apply(Some(&new), &cfg, "a", "apps/v1", None, MAIN, false, "t").unwrap_err();
        assert_eq!(err[0].manager, "kubectl-scale");
    }
}
