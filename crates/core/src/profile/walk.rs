//! The structural check: walks the YAML tree against the profile's JSON
//! Schema (generated from the Rust types, so the two cannot drift) and
//! reports every unknown field, wrong type, missing field and malformed value
//! with its path and position, not just the first.
//!
//! ```text
//! YAML tree ──walk(schema)──► errors + a pruned JSON value ──serde──► Profile
//! ```
//! Invalid nodes are left out of the pruned value, so the semantic checks
//! can still run on whatever is valid and report their errors too.

use serde_json::{Map, Value as Json};

use super::FieldError;
use super::units::check_format;
use super::yaml::{Mark, Node, Scalar, Value};

/// Fields that look plausible but are refused on purpose, with the reason.
const REFUSED_FIELDS: &[(&str, &str)] = &[
    (
        "postStart",
        "postStart is not supported: while a postStart hook runs, Kubernetes shows none of the container's output, so a hanging hook hides why a release is stuck; use preStart (before the app starts) or preOnline (after checkurl passes, before traffic)",
    ),
    (
        "preStop",
        "preStop is not supported: keelson renders the preStop itself to take the instance out of traffic first; use preOffline",
    ),
    (
        "<<",
        "YAML merge keys (`<<`) are not supported; write the fields out, or put what differs per environment under `environments`",
    ),
];

pub(super) struct Walker<'s> {
    root: &'s Json,
    pub errors: Vec<FieldError>,
}

impl<'s> Walker<'s> {
    pub fn new(root: &'s Json) -> Self {
        Self {
            root,
            errors: Vec::new(),
        }
    }

    fn resolve(&self, mut schema: &'s Json) -> &'s Json {
        // Bounded: a schema made of references only would otherwise loop.
        for _ in 0..32 {
            let Some(reference) = schema.get("$ref").and_then(Json::as_str) else {
                return schema;
            };
            let Some(name) = reference.strip_prefix("#/$defs/") else {
                return schema;
            };
            match self.root.get("$defs").and_then(|d| d.get(name)) {
                Some(target) => schema = target,
                None => return schema,
            }
        }
        schema
    }

    fn error(&mut self, path: &Path<'_>, mark: Mark, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.to_string(),
            message: message.into(),
            line: mark.line,
            column: mark.column,
        });
    }

    fn not_one_of(&mut self, path: &Path<'_>, node: &Node, allowed: &[Json]) {
        let message = format!(
            "`{}` is not valid; expected one of {}",
            scalar_text(node),
            list(allowed)
        );
        self.error(path, node.mark, message);
    }

    /// Checks `node` against `schema`; returns the node as JSON when it is
    /// valid enough to keep.
    pub fn walk(&mut self, node: &Node, schema: &'s Json, path: &Path<'_>) -> Option<Json> {
        let schema = self.resolve(schema);
        if let Some(branches) = schema
            .get("anyOf")
            .or_else(|| schema.get("oneOf"))
            .and_then(Json::as_array)
        {
            return self.walk_alternatives(node, branches, path);
        }
        if let Some(types) = schema.get("type")
            && !type_matches(types, node)
        {
            self.error(
                path,
                node.mark,
                format!(
                    "expected {}, found {}{}",
                    describe_types(types),
                    node.value.type_name(),
                    quote_hint(types, node)
                ),
            );
            return None;
        }
        if let Some(allowed) = schema.get("enum").and_then(Json::as_array) {
            let json = super::yaml::to_json(node);
            if !allowed.contains(&json) {
                self.not_one_of(path, node, allowed);
                return None;
            }
        }
        if let Some(constant) = schema.get("const")
            && super::yaml::to_json(node) != *constant
        {
            self.error(path, node.mark, format!("expected {constant}"));
            return None;
        }
        match &node.value {
            Value::Map(entries) => self.walk_map(node.mark, entries, schema, path),
            Value::Seq(items) => {
                let item_schema = schema.get("items").unwrap_or(&Json::Bool(true));
                let kept = items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| self.walk(item, item_schema, &Path::Index(path, i)))
                    .collect();
                Some(Json::Array(kept))
            }
            Value::Scalar(scalar) => self.walk_scalar(node, scalar, schema, path),
        }
    }

    fn walk_scalar(
        &mut self,
        node: &Node,
        scalar: &Scalar,
        schema: &Json,
        path: &Path<'_>,
    ) -> Option<Json> {
        if let Some(format) = schema.get("format").and_then(Json::as_str) {
            if let Some((min, max)) = integer_range(format)
                && let Scalar::Int(i) = scalar
                && !(min..=max).contains(&(*i as i128))
            {
                self.error(
                    path,
                    node.mark,
                    format!("{i} is out of range; expected {min} to {max}"),
                );
                return None;
            }
            if let Some(Err(message)) = check_format(format, &scalar_text(node)) {
                self.error(path, node.mark, message);
                return None;
            }
        }
        if let Scalar::Float(f) = scalar
            && !f.is_finite()
        {
            self.error(path, node.mark, "expected a finite number");
            return None;
        }
        if let Some(min) = schema.get("minimum").and_then(Json::as_f64) {
            let value = match scalar {
                Scalar::Int(i) => *i as f64,
                Scalar::Float(f) => *f,
                _ => min,
            };
            if value < min {
                self.error(
                    path,
                    node.mark,
                    format!("{value} is below the minimum {min}"),
                );
                return None;
            }
        }
        Some(super::yaml::to_json(node))
    }

    /// Returns `None` when a required field is missing or invalid, so that
    /// the parent drops this mapping and deserializing what is left works.
    fn walk_map(
        &mut self,
        mark: Mark,
        entries: &[(String, Mark, Node)],
        schema: &'s Json,
        path: &Path<'_>,
    ) -> Option<Json> {
        static EMPTY: std::sync::OnceLock<Map<String, Json>> = std::sync::OnceLock::new();
        let properties = schema
            .get("properties")
            .and_then(Json::as_object)
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new));
        let additional = schema.get("additionalProperties");
        let mut kept = Map::new();
        for (key, key_mark, value) in entries {
            let child_path = Path::Key(path, key);
            if let Some(property) = properties.get(key) {
                if let Some(v) = self.walk(value, property, &child_path) {
                    kept.insert(key.clone(), v);
                }
                continue;
            }
            match additional {
                Some(Json::Bool(false)) => {
                    let message = REFUSED_FIELDS
                        .iter()
                        .find(|(name, _)| name == key)
                        .map(|(_, why)| why.to_string())
                        .unwrap_or_else(|| unknown_field(key, properties));
                    self.error(&child_path, *key_mark, message);
                }
                Some(extra) if extra.is_object() => {
                    if let Some(v) = self.walk(value, extra, &child_path) {
                        kept.insert(key.clone(), v);
                    }
                }
                _ => {
                    kept.insert(key.clone(), super::yaml::to_json(value));
                }
            }
        }
        let mut complete = true;
        if let Some(required) = schema.get("required").and_then(Json::as_array) {
            for name in required.iter().filter_map(Json::as_str) {
                complete &= kept.contains_key(name);
                if !entries.iter().any(|(k, _, _)| k == name) {
                    let what = properties
                        .get(name)
                        .and_then(|p| self.resolve(p).get("description"))
                        .and_then(Json::as_str)
                        .map(|d| {
                            format!(
                                " ({})",
                                d.lines().next().unwrap_or_default().trim_end_matches('.')
                            )
                        })
                        .unwrap_or_default();
                    self.error(
                        &Path::Key(path, name),
                        mark,
                        format!("`{name}` is required{what}"),
                    );
                }
            }
        }
        complete.then_some(Json::Object(kept))
    }

    fn walk_alternatives(
        &mut self,
        node: &Node,
        branches: &'s [Json],
        path: &Path<'_>,
    ) -> Option<Json> {
        let mut candidates = Vec::new();
        for branch in branches {
            let mut trial = Walker::new(self.root);
            let kept = trial.walk(node, branch, path);
            if trial.errors.is_empty() {
                return kept;
            }
            candidates.push((branch, trial, kept));
        }
        // Report the errors of the one branch the node was evidently meant
        // for: the only non-null branch, or the object branch whose required
        // key the mapping uses.
        let keys: Vec<&str> = match &node.value {
            Value::Map(entries) => entries.iter().map(|(k, _, _)| k.as_str()).collect(),
            _ => Vec::new(),
        };
        let non_null: Vec<usize> = (0..candidates.len())
            .filter(|&i| !is_null_schema(self.resolve(candidates[i].0)))
            .collect();
        let meant: Vec<usize> = if non_null.len() == 1 {
            non_null
        } else {
            non_null
                .into_iter()
                .filter(|&i| {
                    self.resolve(candidates[i].0)
                        .get("required")
                        .and_then(Json::as_array)
                        .is_some_and(|r| {
                            r.iter()
                                .any(|k| k.as_str().is_some_and(|k| keys.contains(&k)))
                        })
                })
                .collect()
        };
        if let [only] = meant[..] {
            let (_, trial, kept) = candidates.swap_remove(only);
            self.errors.extend(trial.errors);
            return kept;
        }
        let all_constants = branches
            .iter()
            .map(|b| self.resolve(b))
            .filter(|b| !is_null_schema(b))
            .all(|b| b.get("const").is_some() || b.get("enum").is_some());
        if all_constants && let Value::Scalar(_) = node.value {
            let values: Vec<Json> = branches
                .iter()
                .map(|b| self.resolve(b))
                .flat_map(|b| {
                    b.get("const").cloned().into_iter().chain(
                        b.get("enum")
                            .and_then(Json::as_array)
                            .cloned()
                            .unwrap_or_default(),
                    )
                })
                .collect();
            self.not_one_of(path, node, &values);
            return None;
        }
        let expected: Vec<String> = branches
            .iter()
            .map(|b| describe_schema(self.resolve(b)))
            .collect();
        self.error(
            path,
            node.mark,
            format!(
                "expected {}, found {}",
                expected.join(" or "),
                node.value.type_name()
            ),
        );
        None
    }
}

/// A field path, built as the walk descends and written out only when an
/// error needs it, so a valid profile allocates no path strings.
pub(super) enum Path<'a> {
    /// The document.
    Root,
    /// A mapping key under a parent.
    Key(&'a Path<'a>, &'a str),
    /// A list index under a parent.
    Index(&'a Path<'a>, usize),
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Key(Path::Root, key) => f.write_str(key),
            Path::Key(parent, key) => write!(f, "{parent}.{key}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

fn is_null_schema(schema: &Json) -> bool {
    schema.get("type").and_then(Json::as_str) == Some("null")
}

fn type_matches(types: &Json, node: &Node) -> bool {
    let one = |t: &str| {
        matches!(
            (t, &node.value),
            ("object", Value::Map(_))
                | ("array", Value::Seq(_))
                | ("string", Value::Scalar(Scalar::Str(_)))
                | ("boolean", Value::Scalar(Scalar::Bool(_)))
                | ("null", Value::Scalar(Scalar::Null))
                | ("integer", Value::Scalar(Scalar::Int(_)))
                | ("number", Value::Scalar(Scalar::Int(_) | Scalar::Float(_)))
        )
    };
    match types {
        Json::String(t) => one(t),
        Json::Array(ts) => ts.iter().filter_map(Json::as_str).any(one),
        _ => true,
    }
}

fn type_word(t: &str) -> &str {
    match t {
        "object" => "a mapping",
        "array" => "a list",
        "string" => "a string",
        "boolean" => "true or false",
        "null" => "nothing",
        "integer" => "a whole number",
        "number" => "a number",
        other => other,
    }
}

fn describe_types(types: &Json) -> String {
    match types {
        Json::String(t) => type_word(t).to_string(),
        Json::Array(ts) => ts
            .iter()
            .filter_map(Json::as_str)
            .filter(|t| *t != "null")
            .map(type_word)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "a value".to_string(),
    }
}

fn describe_schema(schema: &Json) -> String {
    if let Some(c) = schema.get("const") {
        return format!(
            "`{}`",
            c.as_str().map_or_else(|| c.to_string(), str::to_string)
        );
    }
    if let Some(e) = schema.get("enum").and_then(Json::as_array) {
        return list(e);
    }
    if let Some(required) = schema.get("required").and_then(Json::as_array)
        && let [only] = &required[..]
    {
        return format!("a mapping with `{}`", only.as_str().unwrap_or_default());
    }
    schema
        .get("type")
        .map_or_else(|| "a value".to_string(), describe_types)
}

fn list(values: &[Json]) -> String {
    values
        .iter()
        .map(|v| {
            format!(
                "`{}`",
                v.as_str().map_or_else(|| v.to_string(), str::to_string)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A hint for the common mistake of writing a number where text is expected.
fn quote_hint(types: &Json, node: &Node) -> &'static str {
    let wants_string = match types {
        Json::String(t) => t == "string",
        Json::Array(ts) => ts.iter().any(|t| t == "string"),
        _ => false,
    };
    match (&node.value, wants_string) {
        (Value::Scalar(Scalar::Int(_) | Scalar::Float(_) | Scalar::Bool(_)), true) => {
            " (quote it to make it a string)"
        }
        _ => "",
    }
}

fn scalar_text(node: &Node) -> String {
    match &node.value {
        Value::Scalar(Scalar::Str(s)) => s.clone(),
        Value::Scalar(Scalar::Int(i)) => i.to_string(),
        Value::Scalar(Scalar::Float(f)) => f.to_string(),
        Value::Scalar(Scalar::Bool(b)) => b.to_string(),
        Value::Scalar(Scalar::Null) => "null".to_string(),
        other => other.type_name().to_string(),
    }
}

fn integer_range(format: &str) -> Option<(i128, i128)> {
    Some(match format {
        "uint8" => (0, u8::MAX as i128),
        "uint16" => (0, u16::MAX as i128),
        "uint32" => (0, u32::MAX as i128),
        "uint64" | "uint" => (0, i64::MAX as i128),
        "int32" => (i32::MIN as i128, i32::MAX as i128),
        _ => return None,
    })
}

fn unknown_field(key: &str, properties: &Map<String, Json>) -> String {
    let suggestion = properties
        .keys()
        .map(|k| (edit_distance(&key.to_lowercase(), &k.to_lowercase()), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| format!("did you mean `{k}`? "))
        .unwrap_or_default();
    if properties.is_empty() {
        return format!("unknown field `{key}`; no fields are allowed here");
    }
    let valid: Vec<&str> = properties.keys().map(String::as_str).collect();
    format!(
        "unknown field `{key}`; {suggestion}valid fields here: {}",
        valid.join(", ")
    )
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}
