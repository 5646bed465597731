//! How the CLI prints: aligned tables for people, JSON and YAML for tools.

use serde_json::Value;

/// Left-aligned columns separated by three spaces, like kubectl.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(widths[i] - cell.chars().count() + 3));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// A JSON value as block-style YAML.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_map(map, 0, &mut out),
        Value::Array(items) if !items.is_empty() => write_seq(items, 0, &mut out),
        scalar => {
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
    out
}

fn write_map(map: &serde_json::Map<String, Value>, indent: usize, out: &mut String) {
    for (key, value) in map {
        out.push_str(&" ".repeat(indent));
        out.push_str(&string_text(key));
        out.push(':');
        write_child(value, indent, out);
    }
}

fn write_seq(items: &[Value], indent: usize, out: &mut String) {
    for item in items {
        out.push_str(&" ".repeat(indent));
        out.push('-');
        match item {
            Value::Object(map) if !map.is_empty() => {
                // The first key shares the dash's line.
                let mut first = true;
                for (key, value) in map {
                    if first {
                        out.push(' ');
                        first = false;
                    } else {
                        out.push_str(&" ".repeat(indent + 2));
                    }
                    out.push_str(&string_text(key));
                    out.push(':');
                    write_child(value, indent + 2, out);
                }
            }
            other => write_child(other, indent, out),
        }
    }
}

fn write_child(value: &Value, indent: usize, out: &mut String) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            write_map(map, indent + 2, out);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_seq(items, indent + 2, out);
        }
        scalar => {
            out.push(' ');
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string_text(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A string plain when YAML would read it back as the same string, else
/// double-quoted (JSON escapes are valid YAML escapes).
fn string_text(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./@+".contains(c))
        && !s.starts_with(['-', '.', '@'])
        && s.parse::<f64>().is_err()
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true"
                | "false"
                | "yes"
                | "no"
                | "on"
                | "off"
                | "null"
                | "y"
                | "n"
                | "~"
                | ".inf"
                | ".nan"
        );
    if plain {
        s.to_string()
    } else {
        Value::String(s.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yaml_quotes_only_what_would_change_meaning() {
        let value = json!({
            "apiVersion": "keelson.dev/v1alpha1",
            "spec": {
                "command": ["/bin/hello", "--listen", ":8080"],
                "ports": [{"name": "http", "port": 8080}],
                "flag": "true",
                "version": "1.10",
                "empty": [],
                "note": "a: b"
            }
        });
        let yaml = to_yaml(&value);
        assert_eq!(
            yaml,
            "apiVersion: keelson.dev/v1alpha1\nspec:\n  command:\n    - /bin/hello\n    - \"--listen\"\n    - \":8080\"\n  empty: []\n  flag: \"true\"\n  note: \"a: b\"\n  ports:\n    - name: http\n      port: 8080\n  version: \"1.10\"\n"
        );
    }

    #[test]
    fn tables_align_columns() {
        let out = table(
            &["NAME", "REV"],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "12".into()],
            ],
        );
        assert_eq!(out, "NAME     REV\na        1\nlonger   12\n");
    }
}
