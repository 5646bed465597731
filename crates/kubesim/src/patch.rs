//! Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and
//! Kubernetes strategic merge patch for the cases kubectl sends.
//!
//! Strategic merge needs to know which lists merge by key; [`merge_key`] is
//! that table, shared with server-side apply.

use serde_json::{Map, Value};

/// A patch could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(pub String);

/// The key fields identifying items of the list under `field`, when the list
/// merges by key (and every item is an object carrying the key); `None` for
/// lists that are replaced as a whole.
pub fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    let key = match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => {
            if items.iter().any(|i| i.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    };
    items.iter().all(|i| i.get(key).is_some()).then_some(key)
}

/// Lists of strings that merge as sets under strategic merge patch.
fn is_set_list(field: &str) -> bool {
    field == "finalizers"
}

/// Applies an RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Applies a strategic merge patch.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    smp_map(target, patch)
}

fn smp_map(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut m = p.clone();
            m.remove("$patch");
            *target = Value::Object(strip_directives(m));
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()) || p.contains_key(k));
    }
    for (k, v) in p {
        if k.starts_with('$') {
            if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/")
                && let (Some(Value::Array(list)), Value::Array(del)) = (t.get_mut(field), v)
            {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match v {
            Value::Array(items) => {
                let cur = t.entry(k.clone()).or_insert(Value::Null);
                smp_list(k, cur, items)?;
            }
            Value::Object(_) => {
                let cur = t.entry(k.clone()).or_insert(Value::Null);
                if v.get("$patch").and_then(Value::as_str) == Some("delete") {
                    t.remove(k);
                } else {
                    smp_map(cur, v)?;
                }
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

fn strip_directives(mut m: Map<String, Value>) -> Map<String, Value> {
    m.retain(|k, _| !k.starts_with('$'));
    m
}

fn smp_list(field: &str, cur: &mut Value, items: &[Value]) -> Result<(), PatchError> {
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *cur = Value::Array(
            items
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect(),
        );
        return Ok(());
    }
    if is_set_list(field) {
        let mut list = cur.as_array().cloned().unwrap_or_default();
        for i in items {
            if !list.contains(i) {
                list.push(i.clone());
            }
        }
        *cur = Value::Array(list);
        return Ok(());
    }
    let live: Vec<Value> = cur.as_array().cloned().unwrap_or_default();
    let patch_items: Vec<Value> = items.to_vec();
    let mut all = live.clone();
    all.extend(patch_items.iter().cloned());
    let Some(key) = merge_key(field, &all) else {
        *cur = Value::Array(
            items
                .iter()
                .map(|i| match i {
                    Value::Object(m) => Value::Object(strip_directives(m.clone())),
                    other => other.clone(),
                })
                .collect(),
        );
        return Ok(());
    };
    let mut out = live;
    for item in patch_items {
        let kv = item.get(key).cloned();
        let pos = out.iter().position(|x| x.get(key) == kv.as_ref());
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => smp_map(&mut out[i], &item)?,
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                smp_map(&mut fresh, &item)?;
                out.push(fresh);
            }
        }
    }
    *cur = Value::Array(out);
    Ok(())
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn pointer_parent<'a>(
    doc: &'a mut Value,
    path: &str,
) -> Result<(&'a mut Value, String), PatchError> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| PatchError(format!("invalid JSON pointer {path:?}")))?;
    let node = doc
        .pointer_mut(parent)
        .ok_or_else(|| PatchError(format!("path {parent:?} does not exist")))?;
    Ok((node, unescape(last)))
}

fn add_at(doc: &mut Value, path: &str, value: Value) -> Result<(), PatchError> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = pointer_parent(doc, path)?;
    match parent {
        Value::Object(m) => {
            m.insert(last, value);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
            } else {
                let i: usize = last
                    .parse()
                    .map_err(|_| PatchError(format!("invalid index {last:?}")))?;
                if i > a.len() {
                    return Err(PatchError(format!("index {i} out of bounds")));
                }
                a.insert(i, value);
            }
        }
        _ => return Err(PatchError(format!("cannot add at {path:?}"))),
    }
    Ok(())
}

fn remove_at(doc: &mut Value, path: &str) -> Result<Value, PatchError> {
    let (parent, last) = pointer_parent(doc, path)?;
    let missing = || PatchError(format!("path {path:?} does not exist"));
    match parent {
        Value::Object(m) => m.remove(&last).ok_or_else(missing),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            (i < a.len()).then(|| a.remove(i)).ok_or_else(missing)
        }
        _ => Err(missing()),
    }
}

/// Applies an RFC 6902 JSON patch.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| PatchError("a JSON patch must be an array of operations".into()))?;
    for op in ops {
        let path = op.get("path").and_then(Value::as_str).unwrap_or("");
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        match op.get("op").and_then(Value::as_str) {
            Some("add") => add_at(doc, path, value)?,
            Some("remove") => {
                remove_at(doc, path)?;
            }
            Some("replace") => {
                remove_at(doc, path)?;
                add_at(doc, path, value)?;
            }
            Some("test") => {
                if doc.pointer(path) != Some(&value) {
                    return Err(PatchError(format!("test failed at {path:?}")));
                }
            }
            Some(kind @ ("move" | "copy")) => {
                let from = op
                    .get("from")
                    .and_then(Value::as_str)
                    .ok_or_else(|| PatchError("move/copy needs \"from\"".into()))?;
                let v = if kind == "move" {
                    remove_at(doc, from)?
                } else {
                    doc.pointer(from)
                        .cloned()
                        .ok_or_else(|| PatchError(format!("path {from:?} does not exist")))?
                };
                add_at(doc, path, v)?;
            }
            other => {
                return Err(PatchError(format!(
                    "unknown JSON patch operation {other:?}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kubectl_set_image_patch_merges_containers_by_name() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "a:1", "ports": [{"containerPort": 80}]},
            {"name": "side", "image": "s:1"}
        ]}}}});
        let p = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}],
            "containers": [{"image": "a:2", "name": "app"}]
        }}}});
        strategic_merge_patch(&mut d, &p).unwrap();
        let cs = &d["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["image"], "a:2");
        assert_eq!(cs[0]["ports"][0]["containerPort"], 80);
        assert_eq!(cs[1]["image"], "s:1");
    }

    #[test]
    fn strategic_delete_directive_and_null() {
        let mut d = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"name": "x"}, {"name": "y"}]}});
        let p = json!({"metadata": {"labels": {"a": null}}, "spec": {"containers": [{"name": "x", "$patch": "delete"}]}});
        strategic_merge_patch(&mut d, &p).unwrap();
        assert_eq!(
            d,
            json!({"metadata": {"labels": {"b": "2"}}, "spec": {"containers": [{"name": "y"}]}})
        );
    }

    #[test]
    fn json_merge_patch_removes_nulls() {
        let mut d = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut d, &json!({"a": {"b": null}, "l": [3]}));
        assert_eq!(d, json!({"a": {"c": 2}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut d = json!({"a": [1, 2], "b": {"c": 1}});
        json_patch(
            &mut d,
            &json!([
                {"op": "add", "path": "/a/-", "value": 3},
                {"op": "replace", "path": "/b/c", "value": 5},
                {"op": "remove", "path": "/a/0"},
                {"op": "test", "path": "/b/c", "value": 5}
            ]),
        )
        .unwrap();
        assert_eq!(d, json!({"a": [2, 3], "b": {"c": 5}}));
        assert!(json_patch(&mut d, &json!([{"op": "test", "path": "/b/c", "value": 6}])).is_err());
    }
}
