//! A small, deterministic YAML writer for rendered objects: block style,
//! keys in the order the JSON map holds them (sorted), strings quoted
//! whenever a plain scalar could be read back as something else, multi-line
//! strings as literal blocks.

use serde_json::Value;

/// Writes several objects as one multi-document YAML stream.
pub fn documents(objects: &[Value]) -> String {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        write_value(&mut out, object, 0, false);
    }
    out
}

fn write_value(out: &mut String, value: &Value, indent: usize, in_seq: bool) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (i, (key, v)) in map.iter().enumerate() {
                if !(in_seq && i == 0) {
                    indent_to(out, indent);
                }
                out.push_str(&scalar_string(key));
                out.push(':');
                write_child(out, v, indent);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                if !(in_seq && i == 0) {
                    indent_to(out, indent);
                }
                out.push_str("- ");
                match item {
                    Value::Object(m) if !m.is_empty() => write_value(out, item, indent + 2, true),
                    Value::Array(a) if !a.is_empty() => write_value(out, item, indent + 2, true),
                    _ => {
                        write_scalar(out, item, indent + 2);
                        out.push('\n');
                    }
                }
            }
        }
        _ => {
            write_scalar(out, value, indent);
            out.push('\n');
        }
    }
}

fn indent_to(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

fn write_child(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_value(out, value, indent + 2, false);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write_value(out, value, indent, false);
        }
        _ => {
            out.push(' ');
            write_scalar(out, value, indent + 2);
            out.push('\n');
        }
    }
}

fn write_scalar(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) if s.contains('\n') && literal_ok(s) => {
            out.push_str(if s.ends_with('\n') { "|" } else { "|-" });
            for line in s.strip_suffix('\n').unwrap_or(s).split('\n') {
                out.push('\n');
                if !line.is_empty() {
                    indent_to(out, indent);
                    out.push_str(line);
                }
            }
        }
        Value::String(s) => out.push_str(&scalar_string(s)),
        Value::Object(_) => out.push_str("{}"),
        Value::Array(_) => out.push_str("[]"),
    }
}

/// A literal block keeps the text exactly when no line has trailing
/// spaces, tabs or leading blanks that indentation would swallow, and the
/// text does not end in several newlines.
fn literal_ok(s: &str) -> bool {
    !s.ends_with("\n\n")
        && !s.starts_with([' ', '\n'])
        && s.lines().all(|l| !l.ends_with([' ', '\t']))
        && s.chars()
            .all(|c| c == '\n' || (printable(c) && !breaks_line(c)))
}

/// Characters YAML allows unescaped (its `c-printable`).
fn printable(c: char) -> bool {
    matches!(c, '\t' | '\u{20}'..='\u{7e}' | '\u{85}' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
        && c != '\u{feff}'
}

/// Characters a YAML parser reads as a line break or folds into a space.
fn breaks_line(c: char) -> bool {
    matches!(c, '\r' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

fn scalar_string(s: &str) -> String {
    if plain_ok(s) {
        s.to_string()
    } else {
        double_quoted(s)
    }
}

/// A YAML double-quoted scalar that reads back as exactly `s`: everything
/// outside printable ASCII-safe text is escaped.
fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if printable(c) && !breaks_line(c) => out.push(c),
            c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// Whether `s` reads back as the same string when written plain, under
/// YAML 1.1 and 1.2 alike. Conservative: anything starting with a digit,
/// sign or dot is quoted, so no number form (`0b1`, `0X1F`, `1e3`, `1:20`)
/// can be misread.
fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let reserved = [
        "null", "~", "true", "false", "yes", "no", "on", "off", "y", "n", ".inf", "-.inf", "+.inf",
        ".nan",
    ]
    .iter()
    .any(|r| s.eq_ignore_ascii_case(r));
    !reserved
        && (first.is_ascii_alphabetic() || first == '/' || first == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=+@ ()$,".contains(c))
        && !s.ends_with(' ')
        && !s.contains(" #")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes_what_yaml_would_not_read_back() {
        let doc = documents(&[json!({
            "a": "0b101", "b": "0X1F", "c": "del\u{7f}", "d": "nel\u{85}x", "e": "ls\u{2028}x\nmore\n",
            "f": "tab\there", "g": "quote\"back\\slash", "h": "bom\u{feff}", "i": "😀 ok",
        })]);
        assert_eq!(
            doc,
            "---\na: \"0b101\"\nb: \"0X1F\"\nc: \"del\\x7f\"\nd: \"nel\\x85x\"\ne: \"ls\\u2028x\\nmore\\n\"\nf: \"tab\\there\"\ng: \"quote\\\"back\\\\slash\"\nh: \"bom\\ufeff\"\ni: \"😀 ok\"\n"
        );
    }

    #[test]
    fn quotes_what_would_change_meaning() {
        let doc = documents(&[json!({
            "a": "true", "b": "80", "c": "plain text", "d": "1.28", "e": "", "f": "x: y",
            "g": "-Xmx1g", "h": "line1\nline2\n", "i": [1, "two", {"k": "v", "l": [true]}], "j": {},
            "k": "0x1F", "l": "*alias", "m": "#comment",
        })]);
        assert_eq!(
            doc,
            "---\na: \"true\"\nb: \"80\"\nc: plain text\nd: \"1.28\"\ne: \"\"\nf: \"x: y\"\ng: \"-Xmx1g\"\nh: |\n  line1\n  line2\ni:\n- 1\n- two\n- k: v\n  l:\n  - true\nj: {}\nk: \"0x1F\"\nl: \"*alias\"\nm: \"#comment\"\n"
        );
    }
}
