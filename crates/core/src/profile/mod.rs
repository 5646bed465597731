//! The app profile: parsing, validation and the effective spec per
//! environment.
//!
//! ```text
//! text ─yaml::parse─► marked tree ─walk(schema)─► structural errors + pruned JSON
//!                                                        │ serde
//!                                                        ▼
//!                                  Profile ─rules─► semantic errors (per environment too)
//! ```
//! Every error carries the field path, a sentence saying what would be valid,
//! and the line and column in the file. All errors are reported together.

mod effective;
mod model;
mod rules;
mod units;
mod walk;
pub mod yaml;

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

pub use effective::{EffectiveApp, defaults};
pub use model::*;
pub use units::{CpuQuantity, Duration, MemoryQuantity, Pause, Quantity, QuantityKind};

/// One problem in a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.environments.prod.resources.limits.memory`.
    pub path: String,
    /// What is wrong and what would be valid.
    pub message: String,
    /// 1-based line in the file (0 when the error is not tied to a place).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(document)"
        } else {
            &self.path
        };
        write!(f, "{}:{}: {path}: {}", self.line, self.column, self.message)
    }
}

/// Every problem found in a profile, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct ValidationErrors {
    /// The problems, sorted by position.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{n} error{} in the profile",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// The profile's JSON Schema (draft 2020-12), generated from the types.
pub fn json_schema() -> serde_json::Value {
    schemars::schema_for!(Profile).to_value()
}

/// Parses and validates a profile written in YAML (or JSON).
pub fn parse(text: &str) -> Result<Profile, ValidationErrors> {
    let parsed = yaml::parse(text).map_err(|e| ValidationErrors {
        errors: vec![FieldError {
            path: String::new(),
            message: format!("not valid YAML: {}", e.message),
            line: e.mark.line,
            column: e.mark.column,
        }],
    })?;
    let tree = parsed.root;
    // Generated once: the types do not change while the process runs.
    static SCHEMA: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    let schema = SCHEMA.get_or_init(json_schema);
    let mut walker = walk::Walker::new(schema);
    let pruned = walker.walk(&tree, schema, &walk::Path::Root);
    let mut errors = walker.errors;
    errors.extend(parsed.problems.into_iter().map(|p| FieldError {
        path: p.path,
        message: p.message,
        line: p.mark.line,
        column: p.mark.column,
    }));
    let profile = pruned.and_then(|json| match serde_json::from_value::<Profile>(json) {
        Ok(p) => Some(p),
        // Only reachable when a required field was missing or invalid, and
        // the walk has reported that already.
        Err(_) if !errors.is_empty() => None,
        Err(e) => {
            errors.push(FieldError {
                path: String::new(),
                message: e.to_string(),
                line: 1,
                column: 1,
            });
            None
        }
    });
    if let Some(profile) = &profile {
        // A field the walk found malformed was left out; a rule that then
        // finds it missing would only repeat the same problem.
        let malformed: std::collections::HashSet<String> =
            errors.iter().map(|e| e.path.clone()).collect();
        errors.extend(
            rules::check(profile, &tree)
                .into_iter()
                .filter(|e| !malformed.contains(&e.path)),
        );
    }
    let mut seen = std::collections::HashSet::new();
    errors.retain(|e| seen.insert((e.path.clone(), e.message.clone())));
    errors.sort_by(|a, b| (a.line, a.column, &a.path).cmp(&(b.line, b.column, &b.path)));
    match profile {
        Some(profile) if errors.is_empty() => Ok(profile),
        _ => Err(ValidationErrors { errors }),
    }
}

/// Positions of every path in the document, for errors found after
/// deserializing.
pub(crate) struct MarkIndex {
    marks: HashMap<String, yaml::Mark>,
}

impl MarkIndex {
    fn of(tree: &yaml::Node) -> Self {
        fn visit(node: &yaml::Node, path: String, marks: &mut HashMap<String, yaml::Mark>) {
            match &node.value {
                yaml::Value::Map(entries) => {
                    for (key, key_mark, value) in entries {
                        let child = if path.is_empty() {
                            key.clone()
                        } else {
                            format!("{path}.{key}")
                        };
                        // A scalar's error points at its value, a block's at its key.
                        let mark = if matches!(value.value, yaml::Value::Scalar(_)) {
                            value.mark
                        } else {
                            *key_mark
                        };
                        marks.insert(child.clone(), mark);
                        visit(value, child, marks);
                    }
                }
                yaml::Value::Seq(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let child = format!("{path}[{i}]");
                        marks.insert(child.clone(), item.mark);
                        visit(item, child, marks);
                    }
                }
                yaml::Value::Scalar(_) => {}
            }
        }
        let mut marks = HashMap::new();
        marks.insert(String::new(), tree.mark);
        visit(tree, String::new(), &mut marks);
        Self { marks }
    }

    /// The mark of `path`, or of its nearest ancestor present in the file.
    pub(crate) fn find(&self, path: &str) -> yaml::Mark {
        let mut p = path;
        loop {
            if let Some(m) = self.marks.get(p) {
                return *m;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.marks.get("").copied().unwrap_or_default(),
            }
        }
    }

    /// Whether `path` is written in the file.
    pub(crate) fn has(&self, path: &str) -> bool {
        self.marks.contains_key(path)
    }
}
