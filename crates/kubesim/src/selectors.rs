//! Label and field selectors, parsed from their query-string forms.

use crate::store::Obj;
use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

/// A parsed `fieldSelector`: `(path, value, equal)` terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, String, bool)>);

/// A selector did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement: {0}")]
pub struct SelectorError(pub String);

/// Splits on commas that are not inside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn set_values(rest: &str, term: &str) -> Result<Vec<String>, SelectorError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError(term.to_string()))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    /// Parses `app=web,tier in (a,b),!canary`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            let req = if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                LabelReq::NotIn(k.trim().into(), set_values(rest, term)?)
            } else if let Some((k, rest)) = term.split_once(" in ") {
                LabelReq::In(k.trim().into(), set_values(rest, term)?)
            } else if term
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                LabelReq::Exists(term.to_string())
            } else {
                return Err(SelectorError(term.to_string()));
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// Builds a selector from a `metav1.LabelSelector` JSON object
    /// (`matchLabels` and `matchExpressions`).
    pub fn from_json(sel: &Value) -> Self {
        let mut reqs = Vec::new();
        if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in m {
                reqs.push(LabelReq::Eq(k.clone(), v.as_str().unwrap_or("").into()));
            }
        }
        for e in sel
            .get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = e
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let values: Vec<String> = e
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            match e.get("operator").and_then(Value::as_str) {
                Some("In") => reqs.push(LabelReq::In(key, values)),
                Some("NotIn") => reqs.push(LabelReq::NotIn(key, values)),
                Some("Exists") => reqs.push(LabelReq::Exists(key)),
                Some("DoesNotExist") => reqs.push(LabelReq::NotExists(key)),
                _ => {}
            }
        }
        LabelSelector(reqs)
    }

    /// The first `key=value` requirement, which an index can answer.
    pub fn first_equality(&self) -> Option<(&str, &str)> {
        self.0.iter().find_map(|r| match r {
            LabelReq::Eq(k, v) => Some((k.as_str(), v.as_str())),
            _ => None,
        })
    }

    /// Whether the selector has no requirement (selects everything).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether labels looked up through `get` satisfy every requirement.
    pub fn matches_with<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }

    /// Whether a stored object's labels match.
    pub fn matches(&self, obj: &Obj) -> bool {
        self.matches_with(|k| obj.label(k))
    }

    /// Whether a JSON label map matches.
    pub fn matches_map(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        self.matches_with(|k| labels.and_then(|m| m.get(k)).and_then(Value::as_str))
    }
}

impl FieldSelector {
    /// Parses `metadata.name=x,spec.nodeName!=y`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for term in split_terms(s) {
            let t = if let Some((k, v)) = term.split_once("!=") {
                (k.trim().to_string(), v.trim().to_string(), false)
            } else if let Some((k, v)) = term.split_once("==") {
                (k.trim().to_string(), v.trim().to_string(), true)
            } else if let Some((k, v)) = term.split_once('=') {
                (k.trim().to_string(), v.trim().to_string(), true)
            } else {
                return Err(SelectorError(term.to_string()));
            };
            terms.push(t);
        }
        Ok(FieldSelector(terms))
    }

    /// Whether the selector has no term.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a stored object matches, inflating and parsing it only when
    /// a selected field is neither name, namespace nor an indexed field.
    pub fn matches(&self, obj: &Obj) -> bool {
        let mut parsed: Option<Value> = None;
        self.0.iter().all(|(k, v, eq)| {
            let equal = match k.as_str() {
                "metadata.name" => obj.name() == v,
                "metadata.namespace" => obj.namespace() == v,
                other => match obj.indexed_field(other) {
                    Some(x) => x == v,
                    None => {
                        let whole = parsed.get_or_insert_with(|| obj.value());
                        return FieldSelector(vec![(k.clone(), v.clone(), *eq)])
                            .matches_value(whole);
                    }
                },
            };
            equal == *eq
        })
    }

    /// Whether a JSON object matches. A missing field reads as `""`.
    pub fn matches_value(&self, obj: &Value) -> bool {
        self.0.iter().all(|(k, v, eq)| {
            let mut cur = Some(obj);
            for part in k.split('.') {
                cur = cur.and_then(|c| c.get(part));
            }
            let x = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (x == *v) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_forms() {
        let s = LabelSelector::parse("app=web, tier in (a,b),!canary,env!=prod").unwrap();
        let m = json!({"app": "web", "tier": "b", "env": "dev"});
        assert!(s.matches_map(m.as_object()));
        let m = json!({"app": "web", "tier": "c"});
        assert!(!s.matches_map(m.as_object()));
        let m = json!({"app": "web", "tier": "a", "canary": "1"});
        assert!(!s.matches_map(m.as_object()));
        assert!(LabelSelector::parse("a b c").is_err());
    }

    #[test]
    fn stored_objects_match_indexed_and_other_fields() {
        use crate::resources::ids::PODS;
        use crate::store::{Expect, Store};
        let s = Store::new(10);
        let pod = json!({"metadata": {"name": "p", "namespace": "a", "uid": "u"},
            "spec": {"nodeName": "n1", "restartPolicy": "Always"}, "status": {"phase": "Running"}});
        let o = s.write(PODS, "a/p", Expect::Absent, Some(pod)).unwrap();
        assert_eq!(o.indexed_field("spec.nodeName"), Some("n1"));
        assert_eq!(o.indexed_field("involvedObject.uid"), Some(""));
        assert_eq!(o.indexed_field("spec.restartPolicy"), None);
        let yes = FieldSelector::parse(
            "spec.nodeName=n1,status.phase!=Failed,spec.restartPolicy=Always,metadata.namespace=a",
        )
        .unwrap();
        assert!(yes.matches(&o));
        for no in [
            "spec.nodeName=n2",
            "spec.restartPolicy=Never",
            "metadata.name!=p",
            "involvedObject.uid=u",
        ] {
            assert!(!FieldSelector::parse(no).unwrap().matches(&o), "{no}");
        }
    }

    #[test]
    fn field_selector_reads_nested_fields() {
        let s = FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed").unwrap();
        assert!(
            s.matches_value(&json!({"spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}))
        );
        assert!(!s.matches_value(&json!({"spec": {"nodeName": "n2"}})));
    }
}
