//! Differences between two canonical profiles, as a list of field changes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a field changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Present only in the newer profile.
    Added,
    /// Present only in the older profile.
    Removed,
    /// Present in both with different values.
    Changed,
}

/// One changed field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Change {
    /// Dotted path, with `[i]` for list items: `spec.ports[0].port`.
    pub path: String,
    /// Added, removed or changed.
    pub op: ChangeKind,
    /// The older value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    /// The newer value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

/// The changes that turn `before` into `after`, in path order.
pub fn diff(before: &Value, after: &Value) -> Vec<Change> {
    let mut changes = Vec::new();
    walk("", before, after, &mut changes);
    changes
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn walk(path: &str, before: &Value, after: &Value, out: &mut Vec<Change>) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let child = join(path, key);
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => walk(&child, x, y, out),
                    (Some(x), None) => out.push(Change {
                        path: child,
                        op: ChangeKind::Removed,
                        before: Some(x.clone()),
                        after: None,
                    }),
                    (None, Some(y)) => out.push(Change {
                        path: child,
                        op: ChangeKind::Added,
                        before: None,
                        after: Some(y.clone()),
                    }),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let child = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => walk(&child, x, y, out),
                    (Some(x), None) => out.push(Change {
                        path: child,
                        op: ChangeKind::Removed,
                        before: Some(x.clone()),
                        after: None,
                    }),
                    (None, Some(y)) => out.push(Change {
                        path: child,
                        op: ChangeKind::Added,
                        before: None,
                        after: Some(y.clone()),
                    }),
                    (None, None) => {}
                }
            }
        }
        (x, y) if x == y => {}
        (x, y) => out.push(Change {
            path: path.to_string(),
            op: ChangeKind::Changed,
            before: Some(x.clone()),
            after: Some(y.clone()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_added_removed_and_changed_fields_by_path() {
        let a = json!({"spec": {"image": "a", "ports": [{"port": 80}], "old": true}});
        let b = json!({"spec": {"image": "b", "ports": [{"port": 81}, {"port": 9}], "new": 1}});
        let changes = diff(&a, &b);
        let summary: Vec<(String, ChangeKind)> =
            changes.iter().map(|c| (c.path.clone(), c.op)).collect();
        assert_eq!(
            summary,
            vec![
                ("spec.image".to_string(), ChangeKind::Changed),
                ("spec.new".to_string(), ChangeKind::Added),
                ("spec.old".to_string(), ChangeKind::Removed),
                ("spec.ports[0].port".to_string(), ChangeKind::Changed),
                ("spec.ports[1]".to_string(), ChangeKind::Added),
            ]
        );
        assert_eq!(changes[0].before, Some(json!("a")));
        assert_eq!(changes[0].after, Some(json!("b")));
    }

    #[test]
    fn equal_profiles_have_no_changes() {
        let a = json!({"a": [1, {"b": null}]});
        assert!(diff(&a, &a.clone()).is_empty());
    }
}
