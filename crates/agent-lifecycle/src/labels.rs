//! The pod's labels as the downwardAPI volume writes them: one `key="value"`
//! per line, values quoted like Go strings.

use std::collections::BTreeMap;

/// The label that takes an instance out of traffic without killing it.
pub const TRAFFIC_LABEL: &str = "keelson.dev/traffic";

/// Parses the downwardAPI labels file; malformed lines are skipped.
pub fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(quoted) => unquote(quoted),
            None => value.to_string(),
        };
        labels.insert(key.trim().to_string(), value);
    }
    labels
}

fn unquote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// Whether the labels take this instance out of traffic. A missing file or
/// label means traffic is allowed (hosts have no labels).
pub fn traffic_off(labels: &BTreeMap<String, String>) -> bool {
    labels.get(TRAFFIC_LABEL).is_some_and(|v| v == "offline")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_downward_api_format() {
        let labels = parse_labels(
            "app.kubernetes.io/name=\"shop\"\nkeelson.dev/traffic=\"offline\"\nodd=\"a\\\"b\"\nbroken\n",
        );
        assert_eq!(labels["app.kubernetes.io/name"], "shop");
        assert_eq!(labels["odd"], "a\"b");
        assert!(traffic_off(&labels));
        assert!(!traffic_off(&parse_labels(
            "keelson.dev/traffic=\"online\""
        )));
        assert!(!traffic_off(&parse_labels("")));
    }
}
