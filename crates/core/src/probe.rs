//! Liveness probe expressions: parsing, type checking and evaluation.
//!
//! A liveness check is a small boolean expression over probe functions, so
//! that "healthy" can mean more than one HTTP call — for example a JVM that is
//! stopped at a breakpoint must not be killed:
//!
//! ```text
//! http(8080, "/checkurl") == 200 || debugger_attached(5005)
//! ```
//!
//! Grammar (`!` binds looser than a comparison, so `!a == b` is `!(a == b)`):
//!
//! ```text
//! expr := or
//! or   := and ("||" and)*
//! and  := not ("&&" not)*
//! not  := "!" not | cmp
//! cmp  := atom (("=="|"!="|"<"|">"|"<="|">=") atom)?
//! atom := call | number | string | "true" | "false" | "(" expr ")"
//! ```
//!
//! Functions: `http(port, path)` → number (the status code, 0 when
//! unreachable), `tcp(port)`, `process(name)`, `file(path)` and
//! `debugger_attached(port)` → bool. Arguments are literals: ports are
//! integers `1..=65535`, names and paths are double-quoted strings with `\"`
//! and `\\` escapes.
//!
//! ```text
//! source ──lex──► tokens ──parse + type-check──► Expr ──evaluate(&mut impl Probes)──► bool
//! ```
//!
//! Parsing is pure and rejects every type error up front, with the character
//! position of the offending token, so a profile is validated before any
//! instance runs it. Evaluation is pure too: all IO goes through [`Probes`],
//! which the agent implements against the real machine and tests fake.

use std::fmt;

/// Deepest nesting of parentheses and `!` accepted, so hostile input cannot
/// overflow the stack of the parser, the evaluator or `Drop`.
pub const MAX_DEPTH: usize = 64;

/// The functions an expression may call, in the order error messages list them.
pub const FUNCTIONS: [&str; 5] = ["http", "tcp", "process", "file", "debugger_attached"];

/// The IO an expression can ask for; the agent implements it for real.
pub trait Probes {
    /// Status code of `GET http://127.0.0.1:{port}{path}`, 0 when unreachable.
    fn http(&mut self, port: u16, path: &str) -> u16;
    /// Whether a TCP connection to `127.0.0.1:{port}` succeeds.
    fn tcp(&mut self, port: u16) -> bool;
    /// Whether a process with this name runs.
    fn process(&mut self, name: &str) -> bool;
    /// Whether this file exists.
    fn file(&mut self, path: &str) -> bool;
    /// Whether a debugger is attached on this port (e.g. a JDWP session).
    fn debugger_attached(&mut self, port: u16) -> bool;
}

/// Why an expression was rejected, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("at column {column}: {message}")]
pub struct ExprError {
    /// Character offset (not byte) of the offending token, 0-based.
    pub offset: usize,
    /// `offset + 1`: the 1-based column, counting characters from the start
    /// of the expression.
    pub column: usize,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl ExprError {
    fn new(offset: usize, message: impl Into<String>) -> Self {
        ExprError {
            offset,
            column: offset + 1,
            message: message.into(),
        }
    }
}

type Result<T, E = ExprError> = std::result::Result<T, E>;

/// A parsed, type-checked liveness expression whose value is boolean.
///
/// `Display` prints it back in a canonical form that parses to the same
/// expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    root: Node,
}

impl Expr {
    /// Parses and type-checks; the whole expression must be boolean.
    pub fn parse(src: &str) -> Result<Expr, ExprError> {
        let tokens = lex(src)?;
        let mut parser = Parser {
            tokens,
            pos: 0,
            depth: 0,
        };
        let root = parser.parse_or()?;
        let next = parser.peek();
        if next.kind != TokKind::End {
            return Err(ExprError::new(
                next.offset,
                format!(
                    "unexpected {}; expected `||`, `&&` or the end of the expression",
                    next.kind.describe()
                ),
            ));
        }
        if root.ty != Ty::Bool {
            return Err(ExprError::new(
                root.offset,
                format!(
                    "the expression is {} but must be boolean; compare it, e.g. `http(8080, \"/health\") == 200`",
                    root.ty.with_article()
                ),
            ));
        }
        Ok(Expr { root: root.node })
    }

    /// The ports of every `debugger_attached(port)` call in the expression.
    pub fn debugger_ports(&self) -> Vec<u16> {
        fn visit(node: &Node, ports: &mut Vec<u16>) {
            match node {
                Node::Or(items) | Node::And(items) => items.iter().for_each(|n| visit(n, ports)),
                Node::Not(inner) => visit(inner, ports),
                Node::Cmp { left, right, .. } => {
                    visit(left, ports);
                    visit(right, ports);
                }
                Node::Call(Call::DebuggerAttached { port }) => ports.push(*port),
                Node::Call(_) | Node::Number(_) | Node::Str(_) | Node::Bool(_) => {}
            }
        }
        let mut ports = Vec::new();
        visit(&self.root, &mut ports);
        ports
    }

    /// Evaluates with short-circuit; pure: all IO goes through `Probes`.
    pub fn evaluate(&self, probes: &mut impl Probes) -> bool {
        match eval(&self.root, probes) {
            Value::Bool(b) => b,
            // The type checker only accepts boolean expressions.
            Value::Number(_) | Value::Str(_) => false,
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_node(&self.root, f)
    }
}

// ---------------------------------------------------------------------------
// AST and evaluation

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Or(Vec<Node>),
    And(Vec<Node>),
    Not(Box<Node>),
    Cmp {
        op: CmpOp,
        left: Box<Node>,
        right: Box<Node>,
    },
    Call(Call),
    Number(u64),
    Str(String),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Http { port: u16, path: String },
    Tcp { port: u16 },
    Process { name: String },
    File { path: String },
    DebuggerAttached { port: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Gt => ">",
            CmpOp::Le => "<=",
            CmpOp::Ge => ">=",
        }
    }

    fn is_ordering(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Ne)
    }
}

#[derive(Debug, PartialEq)]
enum Value {
    Bool(bool),
    Number(u64),
    Str(String),
}

fn eval(node: &Node, probes: &mut impl Probes) -> Value {
    match node {
        Node::Or(items) => Value::Bool(items.iter().any(|n| eval_bool(n, probes))),
        Node::And(items) => Value::Bool(items.iter().all(|n| eval_bool(n, probes))),
        Node::Not(inner) => Value::Bool(!eval_bool(inner, probes)),
        Node::Cmp { op, left, right } => {
            let (l, r) = (eval(left, probes), eval(right, probes));
            Value::Bool(match (op, l, r) {
                (CmpOp::Eq, l, r) => l == r,
                (CmpOp::Ne, l, r) => l != r,
                (op, Value::Number(l), Value::Number(r)) => match op {
                    CmpOp::Lt => l < r,
                    CmpOp::Gt => l > r,
                    CmpOp::Le => l <= r,
                    _ => l >= r,
                },
                // Orderings on anything but numbers are rejected by the parser.
                _ => false,
            })
        }
        Node::Call(call) => match call {
            Call::Http { port, path } => Value::Number(u64::from(probes.http(*port, path))),
            Call::Tcp { port } => Value::Bool(probes.tcp(*port)),
            Call::Process { name } => Value::Bool(probes.process(name)),
            Call::File { path } => Value::Bool(probes.file(path)),
            Call::DebuggerAttached { port } => Value::Bool(probes.debugger_attached(*port)),
        },
        Node::Number(n) => Value::Number(*n),
        Node::Str(s) => Value::Str(s.clone()),
        Node::Bool(b) => Value::Bool(*b),
    }
}

fn eval_bool(node: &Node, probes: &mut impl Probes) -> bool {
    matches!(eval(node, probes), Value::Bool(true))
}

fn write_node(node: &Node, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    // Parentheses are printed exactly where the tree needs them to parse back
    // to itself.
    let child = |n: &Node, f: &mut fmt::Formatter<'_>, paren: bool| -> fmt::Result {
        if paren {
            f.write_str("(")?;
            write_node(n, f)?;
            f.write_str(")")
        } else {
            write_node(n, f)
        }
    };
    match node {
        Node::Or(items) | Node::And(items) => {
            let is_or = matches!(node, Node::Or(_));
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(if is_or { " || " } else { " && " })?;
                }
                let paren = matches!(item, Node::Or(_)) || (!is_or && matches!(item, Node::And(_)));
                child(item, f, paren)?;
            }
            Ok(())
        }
        Node::Not(inner) => {
            f.write_str("!")?;
            child(inner, f, matches!(**inner, Node::Or(_) | Node::And(_)))
        }
        Node::Cmp { op, left, right } => {
            let compound = |n: &Node| {
                matches!(
                    n,
                    Node::Or(_) | Node::And(_) | Node::Not(_) | Node::Cmp { .. }
                )
            };
            child(left, f, compound(left))?;
            write!(f, " {} ", op.symbol())?;
            child(right, f, compound(right))
        }
        Node::Call(call) => match call {
            Call::Http { port, path } => {
                write!(f, "http({port}, ")?;
                write_string(path, f)?;
                f.write_str(")")
            }
            Call::Tcp { port } => write!(f, "tcp({port})"),
            Call::Process { name } => {
                f.write_str("process(")?;
                write_string(name, f)?;
                f.write_str(")")
            }
            Call::File { path } => {
                f.write_str("file(")?;
                write_string(path, f)?;
                f.write_str(")")
            }
            Call::DebuggerAttached { port } => write!(f, "debugger_attached({port})"),
        },
        Node::Number(n) => write!(f, "{n}"),
        Node::Str(s) => write_string(s, f),
        Node::Bool(b) => write!(f, "{b}"),
    }
}

fn write_string(s: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        if c == '"' || c == '\\' {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

// ---------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum TokKind {
    LParen,
    RParen,
    Comma,
    OrOr,
    AndAnd,
    Bang,
    Cmp(CmpOp),
    Number(u64),
    Str(String),
    Ident(String),
    End,
}

impl TokKind {
    fn describe(&self) -> String {
        match self {
            TokKind::LParen => "`(`".into(),
            TokKind::RParen => "`)`".into(),
            TokKind::Comma => "`,`".into(),
            TokKind::OrOr => "`||`".into(),
            TokKind::AndAnd => "`&&`".into(),
            TokKind::Bang => "`!`".into(),
            TokKind::Cmp(op) => format!("`{}`", op.symbol()),
            TokKind::Number(n) => format!("number `{n}`"),
            TokKind::Str(_) => "a string".into(),
            TokKind::Ident(name) => format!("`{name}`"),
            TokKind::End => "the end of the expression".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokKind,
    offset: usize,
}

fn lex(src: &str) -> Result<Vec<Token>> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let next = chars.get(i + 1).copied();
        let two = |kind: TokKind| (kind, 2);
        let (kind, len) = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => (TokKind::LParen, 1),
            ')' => (TokKind::RParen, 1),
            ',' => (TokKind::Comma, 1),
            '|' if next == Some('|') => two(TokKind::OrOr),
            '&' if next == Some('&') => two(TokKind::AndAnd),
            '=' if next == Some('=') => two(TokKind::Cmp(CmpOp::Eq)),
            '!' if next == Some('=') => two(TokKind::Cmp(CmpOp::Ne)),
            '<' if next == Some('=') => two(TokKind::Cmp(CmpOp::Le)),
            '>' if next == Some('=') => two(TokKind::Cmp(CmpOp::Ge)),
            '!' => (TokKind::Bang, 1),
            '<' => (TokKind::Cmp(CmpOp::Lt), 1),
            '>' => (TokKind::Cmp(CmpOp::Gt), 1),
            '|' => return Err(ExprError::new(start, "unexpected `|`; use `||` for or")),
            '&' => return Err(ExprError::new(start, "unexpected `&`; use `&&` for and")),
            '=' => {
                return Err(ExprError::new(
                    start,
                    "unexpected `=`; use `==` to compare for equality",
                ));
            }
            '"' => {
                let (s, len) = lex_string(&chars, start)?;
                (TokKind::Str(s), len)
            }
            '0'..='9' => {
                let end = chars[start..]
                    .iter()
                    .position(|c| !c.is_ascii_alphanumeric() && *c != '_' && *c != '.')
                    .map_or(chars.len(), |p| start + p);
                let text: String = chars[start..end].iter().collect();
                if !text.chars().all(|c| c.is_ascii_digit()) {
                    return Err(ExprError::new(
                        start,
                        format!(
                            "invalid number `{text}`; numbers are whole decimal numbers such as 200"
                        ),
                    ));
                }
                let n = text.parse::<u64>().map_err(|_| {
                    ExprError::new(
                        start,
                        format!("number `{text}` is too large; the largest is {}", u64::MAX),
                    )
                })?;
                (TokKind::Number(n), end - start)
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let end = chars[start..]
                    .iter()
                    .position(|c| !c.is_ascii_alphanumeric() && *c != '_')
                    .map_or(chars.len(), |p| start + p);
                (
                    TokKind::Ident(chars[start..end].iter().collect()),
                    end - start,
                )
            }
            c => {
                return Err(ExprError::new(
                    start,
                    format!(
                        "unexpected character `{}`; expected a function call, a number, a string, `true`, `false`, `(`, `!` or an operator",
                        c.escape_debug()
                    ),
                ));
            }
        };
        tokens.push(Token {
            kind,
            offset: start,
        });
        i += len;
    }
    tokens.push(Token {
        kind: TokKind::End,
        offset: chars.len(),
    });
    Ok(tokens)
}

/// Lexes the string literal whose opening quote is at `start`; returns its
/// value and its length in characters, quotes included.
fn lex_string(chars: &[char], start: usize) -> Result<(String, usize)> {
    let mut value = String::new();
    let mut i = start + 1;
    loop {
        match chars.get(i) {
            None => {
                return Err(ExprError::new(
                    start,
                    "unterminated string; close it with `\"`",
                ));
            }
            Some('"') => return Ok((value, i + 1 - start)),
            Some('\\') => match chars.get(i + 1) {
                Some(c @ ('"' | '\\')) => {
                    value.push(*c);
                    i += 2;
                }
                Some(c) => {
                    return Err(ExprError::new(
                        i,
                        format!(
                            "invalid escape `\\{}`; only `\\\"` and `\\\\` are allowed in strings",
                            c.escape_debug()
                        ),
                    ));
                }
                None => {
                    return Err(ExprError::new(
                        start,
                        "unterminated string; close it with `\"`",
                    ));
                }
            },
            Some(c) => {
                value.push(*c);
                i += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Parser and type checker

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    Number,
    Str,
}

impl Ty {
    fn with_article(self) -> &'static str {
        match self {
            Ty::Bool => "a boolean",
            Ty::Number => "a number",
            Ty::Str => "a string",
        }
    }
}

/// A parsed sub-expression with its type and the offset where it starts.
struct Typed {
    node: Node,
    ty: Ty,
    offset: usize,
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

const EXPECTED_OPERAND: &str = "expected a function call (http, tcp, process, file, debugger_attached), a number, a string, `true`, `false`, `!` or `(`";

impl Parser {
    fn peek(&self) -> &Token {
        // The lexer always ends the list with `End`, and `bump` never moves
        // past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn bump(&mut self) -> Token {
        let token = self.peek().clone();
        if token.kind != TokKind::End {
            self.pos += 1;
        }
        token
    }

    fn enter(&mut self, offset: usize) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ExprError::new(
                offset,
                format!("expression nested deeper than {MAX_DEPTH} levels; simplify it"),
            ));
        }
        Ok(())
    }

    fn expect_bool(operand: &Typed, operator: &str) -> Result<()> {
        if operand.ty == Ty::Bool {
            return Ok(());
        }
        Err(ExprError::new(
            operand.offset,
            format!(
                "`{operator}` takes booleans but this operand is {}; compare it first, e.g. `http(8080, \"/health\") == 200`",
                operand.ty.with_article()
            ),
        ))
    }

    fn parse_or(&mut self) -> Result<Typed> {
        let first = self.parse_and()?;
        if self.peek().kind != TokKind::OrOr {
            return Ok(first);
        }
        Self::expect_bool(&first, "||")?;
        let offset = first.offset;
        let mut items = vec![first.node];
        while self.peek().kind == TokKind::OrOr {
            self.bump();
            let next = self.parse_and()?;
            Self::expect_bool(&next, "||")?;
            items.push(next.node);
        }
        Ok(Typed {
            node: Node::Or(items),
            ty: Ty::Bool,
            offset,
        })
    }

    fn parse_and(&mut self) -> Result<Typed> {
        let first = self.parse_not()?;
        if self.peek().kind != TokKind::AndAnd {
            return Ok(first);
        }
        Self::expect_bool(&first, "&&")?;
        let offset = first.offset;
        let mut items = vec![first.node];
        while self.peek().kind == TokKind::AndAnd {
            self.bump();
            let next = self.parse_not()?;
            Self::expect_bool(&next, "&&")?;
            items.push(next.node);
        }
        Ok(Typed {
            node: Node::And(items),
            ty: Ty::Bool,
            offset,
        })
    }

    fn parse_not(&mut self) -> Result<Typed> {
        if self.peek().kind != TokKind::Bang {
            return self.parse_cmp();
        }
        let bang = self.bump();
        self.enter(bang.offset)?;
        let inner = self.parse_not()?;
        self.depth -= 1;
        Self::expect_bool(&inner, "!")?;
        Ok(Typed {
            node: Node::Not(Box::new(inner.node)),
            ty: Ty::Bool,
            offset: bang.offset,
        })
    }

    fn parse_cmp(&mut self) -> Result<Typed> {
        let left = self.parse_atom()?;
        let TokKind::Cmp(op) = self.peek().kind else {
            return Ok(left);
        };
        self.bump();
        let right = self.parse_atom()?;
        if op.is_ordering() {
            for side in [&left, &right] {
                if side.ty != Ty::Number {
                    return Err(ExprError::new(
                        side.offset,
                        format!(
                            "`{}` compares numbers but this operand is {}; use `==` or `!=` for booleans and strings",
                            op.symbol(),
                            side.ty.with_article()
                        ),
                    ));
                }
            }
        } else if left.ty != right.ty {
            return Err(ExprError::new(
                right.offset,
                format!(
                    "`{}` compares two operands of the same type but the left is {} and this one is {}",
                    op.symbol(),
                    left.ty.with_article(),
                    right.ty.with_article()
                ),
            ));
        }
        if let TokKind::Cmp(next) = self.peek().kind {
            return Err(ExprError::new(
                self.peek().offset,
                format!(
                    "comparisons cannot be chained; put parentheses around one side of `{}`",
                    next.symbol()
                ),
            ));
        }
        Ok(Typed {
            node: Node::Cmp {
                op,
                left: Box::new(left.node),
                right: Box::new(right.node),
            },
            ty: Ty::Bool,
            offset: left.offset,
        })
    }

    fn parse_atom(&mut self) -> Result<Typed> {
        let token = self.bump();
        let offset = token.offset;
        let (node, ty) = match token.kind {
            TokKind::Number(n) => (Node::Number(n), Ty::Number),
            TokKind::Str(s) => (Node::Str(s), Ty::Str),
            TokKind::LParen => {
                self.enter(offset)?;
                let inner = self.parse_or()?;
                self.depth -= 1;
                let close = self.bump();
                if close.kind != TokKind::RParen {
                    return Err(ExprError::new(
                        close.offset,
                        format!(
                            "expected `)` to close the `(` at column {}, found {}",
                            offset + 1,
                            close.kind.describe()
                        ),
                    ));
                }
                return Ok(Typed { offset, ..inner });
            }
            TokKind::Ident(name) => match name.as_str() {
                "true" => (Node::Bool(true), Ty::Bool),
                "false" => (Node::Bool(false), Ty::Bool),
                _ => return self.parse_call(name, offset),
            },
            TokKind::End => {
                return Err(ExprError::new(
                    offset,
                    format!("the expression ends where an operand is missing; {EXPECTED_OPERAND}"),
                ));
            }
            other => {
                return Err(ExprError::new(
                    offset,
                    format!("unexpected {}; {EXPECTED_OPERAND}", other.describe()),
                ));
            }
        };
        Ok(Typed { node, ty, offset })
    }

    /// Parses a call whose name (at `offset`) was just consumed.
    fn parse_call(&mut self, name: String, offset: usize) -> Result<Typed> {
        let Some(signature) = signature(&name) else {
            let message = if self.peek().kind == TokKind::LParen {
                format!(
                    "unknown function `{name}`; expected one of {}",
                    FUNCTIONS.join(", ")
                )
            } else {
                format!("unexpected word `{name}`; {EXPECTED_OPERAND}")
            };
            return Err(ExprError::new(offset, message));
        };
        let open = self.bump();
        if open.kind != TokKind::LParen {
            return Err(ExprError::new(
                open.offset,
                format!("`{name}` is a function; call it as `{signature}`"),
            ));
        }
        let params = signature_params(signature);
        let mut args: Vec<Token> = Vec::new();
        if self.peek().kind == TokKind::RParen {
            self.bump();
        } else {
            loop {
                let arg = self.bump();
                match arg.kind {
                    TokKind::Number(_) | TokKind::Str(_) => {}
                    other => {
                        let what = params
                            .get(args.len())
                            .map_or("`)`".to_string(), |p| param_description(p));
                        return Err(ExprError::new(
                            arg.offset,
                            format!(
                                "unexpected {} in `{signature}`; expected {what}",
                                other.describe()
                            ),
                        ));
                    }
                }
                if args.len() == params.len() {
                    return Err(ExprError::new(
                        arg.offset,
                        format!(
                            "too many arguments: `{name}` takes {} ({signature})",
                            count(params.len())
                        ),
                    ));
                }
                args.push(arg);
                let sep = self.bump();
                match sep.kind {
                    TokKind::Comma => {}
                    TokKind::RParen => break,
                    other => {
                        return Err(ExprError::new(
                            sep.offset,
                            format!(
                                "unexpected {} in `{signature}`; expected `,` or `)`",
                                other.describe()
                            ),
                        ));
                    }
                }
            }
        }
        if args.len() < params.len() {
            // Point at the closing parenthesis: that is where an argument is missing.
            let close = self.tokens[self.pos - 1].offset;
            return Err(ExprError::new(
                close,
                format!(
                    "too few arguments: `{name}` takes {} ({signature}), got {}",
                    count(params.len()),
                    args.len()
                ),
            ));
        }
        let port = |token: &Token| port_arg(token, signature);
        let string = |token: &Token, what: &str| string_arg(token, what, signature);
        let (call, ty) = match name.as_str() {
            "http" => (
                Call::Http {
                    port: port(&args[0])?,
                    path: string(&args[1], "a path")?,
                },
                Ty::Number,
            ),
            "tcp" => (
                Call::Tcp {
                    port: port(&args[0])?,
                },
                Ty::Bool,
            ),
            "process" => (
                Call::Process {
                    name: string(&args[0], "a process name")?,
                },
                Ty::Bool,
            ),
            "file" => (
                Call::File {
                    path: string(&args[0], "a path")?,
                },
                Ty::Bool,
            ),
            _ => (
                Call::DebuggerAttached {
                    port: port(&args[0])?,
                },
                Ty::Bool,
            ),
        };
        Ok(Typed {
            node: Node::Call(call),
            ty,
            offset,
        })
    }
}

fn signature(name: &str) -> Option<&'static str> {
    Some(match name {
        "http" => "http(port, path)",
        "tcp" => "tcp(port)",
        "process" => "process(name)",
        "file" => "file(path)",
        "debugger_attached" => "debugger_attached(port)",
        _ => return None,
    })
}

fn signature_params(signature: &'static str) -> Vec<&'static str> {
    let inner = signature
        .split_once('(')
        .map_or("", |(_, rest)| rest.trim_end_matches(')'));
    inner.split(", ").collect()
}

fn param_description(param: &str) -> String {
    match param {
        "port" => "a port number 1..=65535".into(),
        "path" => "a path as a double-quoted string".into(),
        _ => "a name as a double-quoted string".into(),
    }
}

fn count(n: usize) -> String {
    if n == 1 {
        "1 argument".into()
    } else {
        format!("{n} arguments")
    }
}

fn port_arg(token: &Token, signature: &str) -> Result<u16> {
    match &token.kind {
        TokKind::Number(n) => u16::try_from(*n).ok().filter(|p| *p > 0).ok_or_else(|| {
            ExprError::new(
                token.offset,
                format!("port {n} is out of range; expected an integer 1..=65535"),
            )
        }),
        other => Err(ExprError::new(
            token.offset,
            format!(
                "expected a port number 1..=65535 in `{signature}`, found {}",
                other.describe()
            ),
        )),
    }
}

fn string_arg(token: &Token, what: &str, signature: &str) -> Result<String> {
    match &token.kind {
        TokKind::Str(s) => Ok(s.clone()),
        other => Err(ExprError::new(
            token.offset,
            format!(
                "expected {what} as a double-quoted string in `{signature}`, found {}",
                other.describe()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const PRODUCTION: &str =
        r#"(http(8080, "/checkurl") == 200) || (process("socat") && process("java"))"#;

    /// Answers from tables and records every call, in order.
    #[derive(Default)]
    struct FakeProbes {
        http: BTreeMap<(u16, String), u16>,
        tcp: BTreeMap<u16, bool>,
        processes: Vec<String>,
        files: Vec<String>,
        debuggers: Vec<u16>,
        calls: Vec<String>,
    }

    impl Probes for FakeProbes {
        fn http(&mut self, port: u16, path: &str) -> u16 {
            self.calls.push(format!("http({port},{path})"));
            self.http
                .get(&(port, path.to_string()))
                .copied()
                .unwrap_or(0)
        }
        fn tcp(&mut self, port: u16) -> bool {
            self.calls.push(format!("tcp({port})"));
            self.tcp.get(&port).copied().unwrap_or(false)
        }
        fn process(&mut self, name: &str) -> bool {
            self.calls.push(format!("process({name})"));
            self.processes.iter().any(|p| p == name)
        }
        fn file(&mut self, path: &str) -> bool {
            self.calls.push(format!("file({path})"));
            self.files.iter().any(|p| p == path)
        }
        fn debugger_attached(&mut self, port: u16) -> bool {
            self.calls.push(format!("debugger_attached({port})"));
            self.debuggers.contains(&port)
        }
    }

    fn err(src: &str) -> ExprError {
        match Expr::parse(src) {
            Ok(e) => panic!("{src:?} parsed as {e}"),
            Err(e) => e,
        }
    }

    fn canon(src: &str) -> String {
        match Expr::parse(src) {
            Ok(e) => e.to_string(),
            Err(e) => panic!("{src:?}: {e}"),
        }
    }

    #[test]
    fn production_expression_parses_and_evaluates() {
        let expr = Expr::parse(PRODUCTION).unwrap();
        let mut probes = FakeProbes::default();
        probes.http.insert((8080, "/checkurl".into()), 200);
        assert!(expr.evaluate(&mut probes));
        assert_eq!(probes.calls, ["http(8080,/checkurl)"]);

        let mut probes = FakeProbes {
            processes: vec!["socat".into(), "java".into()],
            ..Default::default()
        };
        assert!(expr.evaluate(&mut probes));
        assert_eq!(
            probes.calls,
            ["http(8080,/checkurl)", "process(socat)", "process(java)"]
        );

        let mut probes = FakeProbes {
            processes: vec!["java".into()],
            ..Default::default()
        };
        assert!(!expr.evaluate(&mut probes));
        // `&&` stops at the first false operand.
        assert_eq!(probes.calls, ["http(8080,/checkurl)", "process(socat)"]);
    }

    #[test]
    fn and_binds_tighter_than_or() {
        assert_eq!(canon("true || false && false"), "true || false && false");
        assert_eq!(
            canon("(true || false) && false"),
            "(true || false) && false"
        );
        let mut p = FakeProbes::default();
        assert!(
            Expr::parse("true || false && false")
                .unwrap()
                .evaluate(&mut p)
        );
        assert!(
            !Expr::parse("(true || false) && false")
                .unwrap()
                .evaluate(&mut p)
        );
        assert!(
            Expr::parse("false && false || true")
                .unwrap()
                .evaluate(&mut p)
        );
    }

    #[test]
    fn not_binds_looser_than_comparison_and_tighter_than_and() {
        // `!a == b` is `!(a == b)` by the grammar: `not := "!" not | cmp`.
        let mut p = FakeProbes::default();
        assert!(!Expr::parse("!false == false").unwrap().evaluate(&mut p));
        assert!(Expr::parse("(!false) == true").unwrap().evaluate(&mut p));
        assert!(!Expr::parse("!true && true").unwrap().evaluate(&mut p));
        assert!(Expr::parse("!!true").unwrap().evaluate(&mut p));
        assert_eq!(canon("!(true && false)"), "!(true && false)");
        assert_eq!(canon("(!true) == false"), "(!true) == false");
    }

    #[test]
    fn comparisons_on_numbers_strings_and_booleans() {
        let mut p = FakeProbes::default();
        p.http.insert((80, "/".into()), 503);
        for (src, want) in [
            (r#"http(80, "/") >= 500"#, true),
            (r#"http(80, "/") < 500"#, false),
            (r#"http(80, "/") <= 503"#, true),
            (r#"http(80, "/") > 503"#, false),
            (r#"http(80, "/") != 200"#, true),
            (r#"http(81, "/") == 0"#, true),
            (r#""a" == "a""#, true),
            (r#""a\"b" != "a\"b""#, false),
            ("true == false", false),
            ("tcp(5432) == false", true),
        ] {
            assert_eq!(Expr::parse(src).unwrap().evaluate(&mut p), want, "{src}");
        }
    }

    #[test]
    fn or_short_circuits() {
        let expr = Expr::parse(r#"tcp(1) || file("/x") || debugger_attached(5005)"#).unwrap();
        let mut probes = FakeProbes::default();
        probes.tcp.insert(1, true);
        assert!(expr.evaluate(&mut probes));
        assert_eq!(probes.calls.len(), 1);

        let mut probes = FakeProbes {
            files: vec!["/x".into()],
            ..Default::default()
        };
        assert!(expr.evaluate(&mut probes));
        assert_eq!(probes.calls, ["tcp(1)", "file(/x)"]);

        let mut probes = FakeProbes::default();
        assert!(!expr.evaluate(&mut probes));
        assert_eq!(probes.calls.len(), 3);
    }

    #[test]
    fn debugger_keeps_a_stopped_jvm_alive() {
        let expr =
            Expr::parse(r#"http(8080, "/checkurl") == 200 || debugger_attached(5005)"#).unwrap();
        let mut probes = FakeProbes {
            debuggers: vec![5005],
            ..Default::default()
        };
        assert!(expr.evaluate(&mut probes));
        let mut probes = FakeProbes::default();
        assert!(!expr.evaluate(&mut probes));
    }

    #[test]
    fn strings_unescape() {
        let expr = Expr::parse(r#"file("/a \"b\" \\c")"#).unwrap();
        let mut probes = FakeProbes::default();
        expr.evaluate(&mut probes);
        assert_eq!(probes.calls, [r#"file(/a "b" \c)"#]);
        assert_eq!(expr.to_string(), r#"file("/a \"b\" \\c")"#);
    }

    #[test]
    fn error_positions() {
        let cases: &[(&str, usize, &str)] = &[
            (
                r#"htp(8080, "/")"#,
                0,
                "unknown function `htp`; expected one of http, tcp, process, file, debugger_attached",
            ),
            (
                r#"tcp(1) || htp(8080, "/") == 200"#,
                10,
                "unknown function `htp`",
            ),
            (
                "tcp(70000)",
                4,
                "port 70000 is out of range; expected an integer 1..=65535",
            ),
            ("tcp(0)", 4, "out of range"),
            (r#"tcp("x")"#, 4, "expected a port number"),
            ("tcp(1, 2)", 7, "too many arguments: `tcp` takes 1 argument"),
            (
                r#"http(8080)"#,
                9,
                "too few arguments: `http` takes 2 arguments",
            ),
            ("process()", 8, "too few arguments"),
            (
                r#"http(8080, "/")"#,
                0,
                "the expression is a number but must be boolean",
            ),
            (
                r#"tcp(1) && http(8080, "/")"#,
                10,
                "`&&` takes booleans but this operand is a number",
            ),
            (r#"http(8080, "/") || true"#, 0, "`||` takes booleans"),
            (r#"!http(8080, "/")"#, 1, "`!` takes booleans"),
            (
                r#"tcp(1) == 200"#,
                10,
                "the left is a boolean and this one is a number",
            ),
            (r#""a" < "b""#, 0, "`<` compares numbers"),
            (
                r#"200 > tcp(1)"#,
                6,
                "`>` compares numbers but this operand is a boolean",
            ),
            ("1 < 2 < 3", 6, "comparisons cannot be chained"),
            ("(tcp(1)", 7, "expected `)` to close the `(` at column 1"),
            (
                "tcp(1))",
                6,
                "unexpected `)`; expected `||`, `&&` or the end",
            ),
            ("tcp(1) | tcp(2)", 7, "use `||`"),
            ("tcp(1) & tcp(2)", 7, "use `&&`"),
            ("200 = 200", 4, "use `==`"),
            (r#"file("abc"#, 5, "unterminated string"),
            (r#"file("a\nb")"#, 7, "invalid escape `\\n`"),
            ("", 0, "the expression ends where an operand is missing"),
            ("tcp(1) &&", 9, "expected a function call"),
            ("socat", 0, "unexpected word `socat`"),
            ("tcp", 3, "`tcp` is a function; call it as `tcp(port)`"),
            ("tcp(1) @", 7, "unexpected character `@`"),
            ("12ab == 1", 0, "invalid number `12ab`"),
            ("99999999999999999999999 == 1", 0, "too large"),
            (
                r#"process(tcp(1))"#,
                8,
                "unexpected `tcp` in `process(name)`",
            ),
            // Character offsets, not bytes: `é` is two bytes in UTF-8.
            (r#"file("é") || htp(1)"#, 13, "unknown function"),
        ];
        for (src, offset, message) in cases {
            let e = err(src);
            assert_eq!((e.offset, e.column), (*offset, offset + 1), "{src}: {e}");
            assert!(e.message.contains(message), "{src}: {e}");
        }
    }

    #[test]
    fn error_display_names_the_column() {
        assert_eq!(
            err("tcp(1) && htp(1)").to_string(),
            "at column 11: unknown function `htp`; expected one of http, tcp, process, file, debugger_attached"
        );
    }

    #[test]
    fn nesting_is_limited() {
        let ok = format!("{}true{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(Expr::parse(&ok).is_ok());
        let deep = format!(
            "{}true{}",
            "(".repeat(MAX_DEPTH + 1),
            ")".repeat(MAX_DEPTH + 1)
        );
        let e = err(&deep);
        assert_eq!(e.offset, MAX_DEPTH);
        assert!(e.message.contains("nested deeper"));
        let bangs = format!("{}true", "!".repeat(100_000));
        assert_eq!(err(&bangs).offset, MAX_DEPTH);
        let parens = "(".repeat(100_000);
        assert_eq!(err(&parens).offset, MAX_DEPTH);
        // Long flat chains are not nesting.
        let chain = vec!["tcp(1)"; 10_000].join(" || ");
        assert!(Expr::parse(&chain).is_ok());
    }

    #[test]
    fn display_round_trips() {
        for src in [
            PRODUCTION,
            "(true || false) || true",
            "((true && false) && true)",
            "!(!(tcp(1)))",
            r#"(http(1, "/") == 200) == (tcp(2) != true)"#,
        ] {
            let once = canon(src);
            assert_eq!(canon(&once), once, "{src}");
            assert_eq!(Expr::parse(&once).unwrap(), Expr::parse(src).unwrap());
        }
    }

    /// A valid boolean expression, built from the grammar.
    fn arb_bool() -> impl Strategy<Value = String> {
        let port = 1u16..=65535;
        let text = "[a-z/ \"\\\\]{0,6}".prop_map(|s| {
            let escaped: String = s
                .chars()
                .flat_map(|c| match c {
                    '"' | '\\' => vec!['\\', c],
                    c => vec![c],
                })
                .collect();
            format!("\"{escaped}\"")
        });
        let leaf = prop_oneof![
            Just("true".to_string()),
            Just("false".to_string()),
            port.clone().prop_map(|p| format!("tcp({p})")),
            port.clone().prop_map(|p| format!("debugger_attached({p})")),
            text.clone().prop_map(|s| format!("process({s})")),
            text.clone().prop_map(|s| format!("file({s})")),
            (port, text, 0u16..600, 0usize..6).prop_map(|(p, s, n, op)| format!(
                "http({p}, {s}) {} {n}",
                ["==", "!=", "<", ">", "<=", ">="][op]
            )),
        ];
        leaf.prop_recursive(6, 48, 4, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a} || {b}")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a} && {b}")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) == ({b})")),
                inner.clone().prop_map(|a| format!("!({a})")),
                inner.prop_map(|a| format!("({a})")),
            ]
        })
    }

    const TOKENS: &[&str] = &[
        "(",
        ")",
        ",",
        "||",
        "&&",
        "!",
        "==",
        "!=",
        "<",
        ">",
        "<=",
        ">=",
        "|",
        "&",
        "=",
        "http",
        "tcp",
        "process",
        "file",
        "debugger_attached",
        "true",
        "false",
        "htp",
        "0",
        "1",
        "200",
        "8080",
        "65535",
        "65536",
        "99999999999999999999999",
        "\"/\"",
        "\"a\\\"b\"",
        "\"\\\\\"",
        "\"",
        "\\",
        "é",
        " ",
        "\n",
        "1.5",
    ];

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(src in "\\PC{0,64}") {
            if let Err(e) = Expr::parse(&src) {
                prop_assert!(e.offset <= src.chars().count());
                prop_assert_eq!(e.column, e.offset + 1);
            }
        }

        #[test]
        fn token_soups_never_panic(soup in prop::collection::vec(prop::sample::select(TOKENS), 0..40)) {
            let src = soup.join("");
            let spaced = soup.join(" ");
            for src in [src, spaced] {
                match Expr::parse(&src) {
                    Ok(expr) => {
                        // Anything that parses evaluates and prints back to itself.
                        expr.evaluate(&mut FakeProbes::default());
                        prop_assert_eq!(Expr::parse(&expr.to_string()), Ok(expr));
                    }
                    Err(e) => prop_assert!(e.offset <= src.chars().count()),
                }
            }
        }

        #[test]
        fn valid_expressions_parse_and_round_trip(src in arb_bool()) {
            let expr = Expr::parse(&src);
            prop_assert!(expr.is_ok(), "{}: {:?}", src, expr);
            let expr = expr.unwrap();
            prop_assert_eq!(Expr::parse(&expr.to_string()), Ok(expr.clone()));
            expr.evaluate(&mut FakeProbes::default());
        }
    }
}
