//! A YAML document as a tree that remembers where each node stood, so every
//! error can point at `line:column`. Built from saphyr's event stream with the
//! YAML 1.2 core schema for plain scalars.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// Where a node starts: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl Mark {
    fn of(span: &Span) -> Self {
        Self {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

/// A scalar, typed by the YAML 1.2 core schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// `null`, `~` or empty.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// Anything else, or anything quoted.
    Str(String),
}

/// A node with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where it starts.
    pub mark: Mark,
    /// What it is.
    pub value: Value,
}

/// The value of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A scalar.
    Scalar(Scalar),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping with string keys, in document order; each key keeps its mark.
    Map(Vec<(String, Mark, Node)>),
}

impl Value {
    /// A name for the value's type, as used in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Scalar(Scalar::Null) => "null",
            Value::Scalar(Scalar::Bool(_)) => "a boolean",
            Value::Scalar(Scalar::Int(_)) => "an integer",
            Value::Scalar(Scalar::Float(_)) => "a number",
            Value::Scalar(Scalar::Str(_)) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A syntax error with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    /// Where.
    pub mark: Mark,
    /// What.
    pub message: String,
}

/// Most nodes a document may expand to (aliases included), so that a small
/// hostile file cannot make the parser allocate without bound.
const MAX_NODES: usize = 200_000;
/// Deepest nesting accepted.
const MAX_DEPTH: usize = 64;

/// Parses exactly one YAML document.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        nodes: 0,
        last: Mark { line: 1, column: 1 },
    };
    builder.document()
}

struct Builder<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    last: Mark,
}

impl<'a> Builder<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Mark), SyntaxError> {
        match self.parser.next_event() {
            Some(Ok((event, span))) => {
                self.last = Mark::of(&span);
                Ok((event, self.last))
            }
            Some(Err(e)) => Err(SyntaxError {
                mark: Mark {
                    line: e.marker().line(),
                    column: e.marker().col() + 1,
                },
                message: e.info().to_string(),
            }),
            None => Err(self.error(self.last, "unexpected end of the document")),
        }
    }

    fn error(&self, mark: Mark, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            mark,
            message: message.into(),
        }
    }

    fn document(&mut self) -> Result<Node, SyntaxError> {
        let mut root = None;
        loop {
            let (event, mark) = self.next()?;
            match event {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::DocumentStart(_) => {
                    if root.is_some() {
                        return Err(self.error(
                            mark,
                            "a profile file holds one document; remove the second `---` or split the file",
                        ));
                    }
                    let (event, mark) = self.next()?;
                    root = Some(self.node(event, mark, 0)?);
                }
                Event::StreamEnd => {
                    return root.ok_or_else(|| self.error(mark, "the file is empty"));
                }
                _ => return Err(self.error(mark, "unexpected content outside a document")),
            }
        }
    }

    fn count(&mut self, mark: Mark, n: usize) -> Result<(), SyntaxError> {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            return Err(self.error(
                mark,
                format!("the document expands to more than {MAX_NODES} nodes"),
            ));
        }
        Ok(())
    }

    fn node(&mut self, event: Event<'a>, mark: Mark, depth: usize) -> Result<Node, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error(mark, format!("nesting is deeper than {MAX_DEPTH} levels")));
        }
        self.count(mark, 1)?;
        let (node, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => {
                let scalar = if tag.is_some() || style != ScalarStyle::Plain {
                    Scalar::Str(text.into_owned())
                } else {
                    plain_scalar(&text)
                };
                (
                    Node {
                        mark,
                        value: Value::Scalar(scalar),
                    },
                    anchor,
                )
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (event, item_mark) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.node(event, item_mark, depth + 1)?);
                }
                (
                    Node {
                        mark,
                        value: Value::Seq(items),
                    },
                    anchor,
                )
            }
            Event::MappingStart(anchor, _) => {
                let mut entries: Vec<(String, Mark, Node)> = Vec::new();
                loop {
                    let (event, key_mark) = self.next()?;
                    if matches!(event, Event::MappingEnd) {
                        break;
                    }
                    let key_node = self.node(event, key_mark, depth + 1)?;
                    let key = match key_node.value {
                        Value::Scalar(Scalar::Str(s)) => s,
                        Value::Scalar(Scalar::Int(i)) => i.to_string(),
                        Value::Scalar(Scalar::Bool(b)) => b.to_string(),
                        Value::Scalar(Scalar::Float(f)) => f.to_string(),
                        Value::Scalar(Scalar::Null) => "null".to_string(),
                        _ => return Err(self.error(key_mark, "mapping keys must be plain strings")),
                    };
                    if entries.iter().any(|(k, _, _)| *k == key) {
                        return Err(self.error(key_mark, format!("duplicate key `{key}`")));
                    }
                    let (event, value_mark) = self.next()?;
                    let value = self.node(event, value_mark, depth + 1)?;
                    entries.push((key, key_mark, value));
                }
                (
                    Node {
                        mark,
                        value: Value::Map(entries),
                    },
                    anchor,
                )
            }
            Event::Alias(id) => {
                let node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| self.error(mark, "alias to an unknown anchor"))?;
                let size = node_count(&node);
                self.count(mark, size)?;
                return Ok(node);
            }
            _ => return Err(self.error(mark, "unexpected YAML event")),
        };
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }
}

fn node_count(node: &Node) -> usize {
    1 + match &node.value {
        Value::Scalar(_) => 0,
        Value::Seq(items) => items.iter().map(node_count).sum(),
        Value::Map(entries) => entries.iter().map(|(_, _, v)| node_count(v)).sum(),
    }
}

/// Types a plain scalar by the YAML 1.2 core schema.
fn plain_scalar(text: &str) -> Scalar {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Scalar::Null,
        "true" | "True" | "TRUE" => return Scalar::Bool(true),
        "false" | "False" | "FALSE" => return Scalar::Bool(false),
        _ => {}
    }
    let int = |digits: &str, radix| i64::from_str_radix(digits, radix).ok();
    let parsed = if let Some(hex) = text.strip_prefix("0x") {
        int(hex, 16)
    } else if let Some(oct) = text.strip_prefix("0o") {
        int(oct, 8)
    } else if text
        .bytes()
        .enumerate()
        .all(|(i, b)| b.is_ascii_digit() || (i == 0 && (b == b'-' || b == b'+')))
        && text.bytes().any(|b| b.is_ascii_digit())
    {
        text.parse().ok()
    } else {
        None
    };
    if let Some(i) = parsed {
        return Scalar::Int(i);
    }
    let looks_float = text
        .trim_start_matches(['-', '+'])
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
    if looks_float && let Ok(f) = text.parse::<f64>() {
        return Scalar::Float(f);
    }
    match text {
        ".inf" | ".Inf" | ".INF" | "+.inf" => Scalar::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => Scalar::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => Scalar::Float(f64::NAN),
        _ => Scalar::Str(text.to_string()),
    }
}

/// Converts the tree to JSON for deserializing. Non-finite floats become
/// null; the schema walk has already reported them.
pub fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value as J;
    match &node.value {
        Value::Scalar(Scalar::Null) => J::Null,
        Value::Scalar(Scalar::Bool(b)) => J::Bool(*b),
        Value::Scalar(Scalar::Int(i)) => J::from(*i),
        Value::Scalar(Scalar::Float(f)) => {
            serde_json::Number::from_f64(*f).map_or(J::Null, J::Number)
        }
        Value::Scalar(Scalar::Str(s)) => J::String(s.clone()),
        Value::Seq(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Map(entries) => J::Object(
            entries
                .iter()
                .map(|(k, _, v)| (k.clone(), to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_types() {
        let doc =
            parse("a: 1\nb:\n  - \"x\"\n  - true\n  - 1.5\n  - ~\n  - 0x1f\nc: 08\n").unwrap();
        let Value::Map(entries) = &doc.value else {
            panic!()
        };
        assert_eq!(entries[0].1, Mark { line: 1, column: 1 });
        assert_eq!(entries[1].2.mark.line, 3);
        let json = to_json(&doc);
        assert_eq!(
            json,
            serde_json::json!({"a": 1, "b": ["x", true, 1.5, null, 31], "c": 8})
        );
    }

    #[test]
    fn rejects_duplicates_and_second_documents() {
        assert!(
            parse("a: 1\na: 2\n")
                .unwrap_err()
                .message
                .contains("duplicate key `a`")
        );
        assert!(
            parse("a: 1\n---\nb: 2\n")
                .unwrap_err()
                .message
                .contains("one document")
        );
        assert_eq!(parse("").unwrap_err().message, "the file is empty");
    }

    #[test]
    fn aliases_expand_within_bounds() {
        let doc = parse("a: &x [1, 2]\nb: *x\n").unwrap();
        assert_eq!(to_json(&doc), serde_json::json!({"a": [1, 2], "b": [1, 2]}));
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            bomb.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
        }
        assert!(parse(&bomb).unwrap_err().message.contains("more than"));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(10_000);
        assert!(parse(&deep).is_err());
    }
}
