//! A YAML document as a tree that remembers where each node stood, so every
//! error can point at `line:column`. Built from saphyr's event stream with the
//! YAML 1.2 core schema for plain scalars.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::walk::Path;

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

/// A problem that does not stop parsing (the rest of the document is still
/// checked), with the path of the field.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The field's dotted path.
    pub path: String,
    /// Where.
    pub mark: Mark,
    /// What.
    pub message: String,
}

/// A parsed document and the problems found on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The document's root node.
    pub root: Node,
    /// Duplicate keys; the first occurrence was kept.
    pub problems: Vec<Problem>,
}

/// Most nodes a document may expand to (aliases included), so that a small
/// hostile file cannot make the parser allocate without bound.
const MAX_NODES: usize = 200_000;
/// Deepest nesting accepted, aliases expanded.
const MAX_DEPTH: usize = 64;

/// Parses exactly one YAML document.
pub fn parse(text: &str) -> Result<Parsed, SyntaxError> {
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        nodes: 0,
        last: Mark { line: 1, column: 1 },
        problems: Vec::new(),
    };
    let root = builder.document()?;
    Ok(Parsed {
        root,
        problems: builder.problems,
    })
}

struct Builder<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    /// Anchored nodes with their height, so an alias cannot nest deeper than
    /// the limit by expanding.
    anchors: HashMap<usize, (Node, usize)>,
    nodes: usize,
    last: Mark,
    problems: Vec<Problem>,
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
                    root = Some(self.node(event, mark, 0, &Path::Root)?);
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

    fn too_deep(&self, mark: Mark) -> SyntaxError {
        self.error(mark, format!("nesting is deeper than {MAX_DEPTH} levels"))
    }

    fn node(
        &mut self,
        event: Event<'a>,
        mark: Mark,
        depth: usize,
        path: &Path<'_>,
    ) -> Result<Node, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.too_deep(mark));
        }
        self.count(mark, 1)?;
        let (value, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => {
                let scalar = match tag.as_deref() {
                    // The core schema's tags say the type outright.
                    Some(t) if t.is_yaml_core_schema() && t.suffix == "str" => {
                        Scalar::Str(text.into_owned())
                    }
                    Some(t) if t.is_yaml_core_schema() => plain_scalar(&text),
                    _ if style != ScalarStyle::Plain => Scalar::Str(text.into_owned()),
                    Some(_) => Scalar::Str(text.into_owned()),
                    None => plain_scalar(&text),
                };
                (Value::Scalar(scalar), anchor)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (event, item_mark) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    let item_path = Path::Index(path, items.len());
                    items.push(self.node(event, item_mark, depth + 1, &item_path)?);
                }
                (Value::Seq(items), anchor)
            }
            Event::MappingStart(anchor, _) => (Value::Map(self.mapping(depth, path)?), anchor),
            Event::Alias(id) => {
                let (node, height) = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| self.error(mark, "alias to an unknown anchor"))?;
                if depth + height > MAX_DEPTH {
                    return Err(self.too_deep(mark));
                }
                self.count(mark, node_count(&node))?;
                return Ok(node);
            }
            _ => return Err(self.error(mark, "unexpected YAML event")),
        };
        let node = Node { mark, value };
        if anchor != 0 {
            self.anchors
                .insert(anchor, (node.clone(), node_height(&node)));
        }
        Ok(node)
    }

    /// The entries of a mapping. Keys keep their text as written (`1.10`
    /// stays `1.10`); a key set twice is a problem, and its first value wins.
    fn mapping(
        &mut self,
        depth: usize,
        path: &Path<'_>,
    ) -> Result<Vec<(String, Mark, Node)>, SyntaxError> {
        let mut entries: Vec<(String, Mark, Node)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            let (event, key_mark) = self.next()?;
            let key = match event {
                Event::MappingEnd => return Ok(entries),
                Event::Scalar(text, ..) => text.into_owned(),
                Event::Alias(id) => match self.anchors.get(&id) {
                    Some((
                        Node {
                            value: Value::Scalar(Scalar::Str(s)),
                            ..
                        },
                        _,
                    )) => s.clone(),
                    _ => return Err(self.error(key_mark, "mapping keys must be plain strings")),
                },
                _ => return Err(self.error(key_mark, "mapping keys must be plain strings")),
            };
            let (event, value_mark) = self.next()?;
            let value = self.node(event, value_mark, depth + 1, &Path::Key(path, &key))?;
            if !seen.insert(key.clone()) {
                self.problems.push(Problem {
                    path: Path::Key(path, &key).to_string(),
                    mark: key_mark,
                    message: format!("`{key}` is set twice in this mapping; remove one"),
                });
                continue;
            }
            entries.push((key, key_mark, value));
        }
    }
}

fn node_height(node: &Node) -> usize {
    match &node.value {
        Value::Scalar(_) => 0,
        Value::Seq(items) => 1 + items.iter().map(node_height).max().unwrap_or(0),
        Value::Map(entries) => {
            1 + entries
                .iter()
                .map(|(_, _, v)| node_height(v))
                .max()
                .unwrap_or(0)
        }
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

    fn root(text: &str) -> Node {
        parse(text).unwrap().root
    }

    #[test]
    fn marks_and_types() {
        let doc = root("a: 1\nb:\n  - \"x\"\n  - true\n  - 1.5\n  - ~\n  - 0x1f\nc: 08\n");
        let Value::Map(entries) = &doc.value else {
            panic!()
        };
        assert_eq!(entries[0].1, Mark { line: 1, column: 1 });
        assert_eq!(entries[1].2.mark.line, 3);
        assert_eq!(
            to_json(&doc),
            serde_json::json!({"a": 1, "b": ["x", true, 1.5, null, 31], "c": 8})
        );
    }

    #[test]
    fn duplicate_keys_are_problems_with_paths() {
        let dup = parse("a: 1\nb: {c: 2, c: 3}\na: 2\n").unwrap();
        assert_eq!(
            to_json(&dup.root),
            serde_json::json!({"a": 1, "b": {"c": 2}})
        );
        let paths: Vec<&str> = dup.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["b.c", "a"]);
        assert_eq!(dup.problems[1].mark, Mark { line: 3, column: 1 });
    }

    #[test]
    fn one_document_per_file() {
        let second = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(second.message.contains("one document"));
        assert_eq!(parse("").unwrap_err().message, "the file is empty");
    }

    #[test]
    fn many_keys_parse_in_linear_time() {
        let text: String = (0..50_000).map(|i| format!("k{i}: {i}\n")).collect();
        let doc = root(&text);
        let Value::Map(entries) = doc.value else {
            panic!()
        };
        assert_eq!(entries.len(), 50_000);
    }

    #[test]
    fn aliases_expand_within_bounds() {
        let doc = root("a: &x [1, 2]\nb: *x\n");
        assert_eq!(to_json(&doc), serde_json::json!({"a": [1, 2], "b": [1, 2]}));
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(parse(&bomb).unwrap_err().message.contains("more than"));
    }

    #[test]
    fn aliases_cannot_nest_past_the_limit() {
        let mut text = String::new();
        for i in 0..80 {
            let inner = if i == 0 {
                "x".to_string()
            } else {
                format!("*a{}", i - 1)
            };
            text.push_str(&format!(
                "a{i}: &a{i} {}{inner}{}\n",
                "[".repeat(30),
                "]".repeat(30)
            ));
        }
        assert!(
            parse(&text)
                .unwrap_err()
                .message
                .contains("nesting is deeper")
        );
    }

    #[test]
    fn keys_keep_their_text_and_core_tags_apply() {
        let doc = root("1.10: a\n0x10: b\nn: !!int \"2\"\ns: !!str 3\nt: !custom 4\n");
        assert_eq!(
            to_json(&doc),
            serde_json::json!({"1.10": "a", "0x10": "b", "n": 2, "s": "3", "t": "4"})
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(10_000);
        assert!(parse(&deep).is_err());
    }
}
