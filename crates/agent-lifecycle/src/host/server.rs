//! A small threaded HTTP/1.1 server for the host daemon: one thread per
//! connection (at most [`MAX_CONNECTIONS`]), one request per connection,
//! whole JSON responses or chunked streams that run until the client leaves.
//!
//! The pod's [`crate::http::serve`] is sequential on purpose (probes and
//! people); the daemon serves long-lived log streams next to API calls, so
//! it needs a thread per connection, bounded.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// The most connections served at once; more get `503`.
pub const MAX_CONNECTIONS: usize = 256;

/// The largest request body (a deploy request) accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// One request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// Query parameters, in order (not percent-decoded).
    pub query: Vec<(String, String)>,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first query parameter with this name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Writes the body of a streamed response as HTTP chunks.
pub struct ChunkWriter {
    stream: TcpStream,
}

impl ChunkWriter {
    /// Sends one chunk at once; an error means the client is gone.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
        chunk.extend_from_slice(data);
        chunk.extend_from_slice(b"\r\n");
        self.stream.write_all(&chunk)?;
        self.stream.flush()
    }
}

/// A streamed body: runs until it returns (or the client leaves).
pub type StreamBody = Box<dyn FnOnce(&mut ChunkWriter) -> io::Result<()> + Send>;

/// A response.
pub enum Reply {
    /// A whole response.
    Full {
        /// Status.
        status: u16,
        /// Content type.
        content_type: &'static str,
        /// Body.
        body: Vec<u8>,
    },
    /// A chunked stream.
    Stream {
        /// Content type.
        content_type: &'static str,
        /// Produces the body.
        body: StreamBody,
    },
}

impl Reply {
    /// A JSON response.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Reply {
        Reply::Full {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    /// An empty response.
    pub fn empty(status: u16) -> Reply {
        Reply::Full {
            status,
            content_type: "application/json",
            body: Vec::new(),
        }
    }
}

/// Serves `listener` until `stop` is set (checked between connections).
pub fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    handler: Arc<dyn Fn(Request) -> Reply + Send + Sync>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            let _ = write_full(
                stream,
                503,
                "application/json",
                br#"{"error":{"code":"busy","message":"too many connections; retry"}}"#,
            );
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (handler, count) = (handler.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("keelson-host-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let _ = serve_one(stream, &*handler);
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one request from `stream`.
pub fn read_request(stream: &TcpStream) -> io::Result<Request> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    read_line(&mut reader, &mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(bad("bad request line"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        ..Request::default()
    };
    loop {
        line.clear();
        read_line(&mut reader, &mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            request
                .headers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        if request.headers.len() > 100 {
            return Err(bad("too many headers"));
        }
    }
    if let Some(len) = request.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("invalid content-length"))?;
        if len > MAX_BODY_BYTES {
            return Err(bad("body too large"));
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        request.body = body;
    }
    Ok(request)
}

fn read_line(reader: &mut impl BufRead, line: &mut String) -> io::Result<()> {
    let mut bytes = Vec::new();
    reader.take(16 * 1024).read_until(b'\n', &mut bytes)?;
    if bytes.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
    }
    line.push_str(&String::from_utf8_lossy(&bytes));
    Ok(())
}

fn serve_one(
    stream: TcpStream,
    handler: &(dyn Fn(Request) -> Reply + Send + Sync),
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let request = match read_request(&stream) {
        Ok(r) => r,
        Err(e) => {
            let body =
                serde_json::json!({"error": {"code": "bad_request", "message": e.to_string()}});
            return write_full(stream, 400, "application/json", body.to_string().as_bytes());
        }
    };
    match handler(request) {
        Reply::Full {
            status,
            content_type,
            body,
        } => write_full(stream, status, content_type, &body),
        Reply::Stream { content_type, body } => {
            let mut out = stream;
            out.set_write_timeout(Some(Duration::from_secs(30)))?;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            );
            out.write_all(head.as_bytes())?;
            out.flush()?;
            let mut writer = ChunkWriter { stream: out };
            body(&mut writer)?;
            writer.stream.write_all(b"0\r\n\r\n")?;
            writer.stream.flush()
        }
    }
}

fn write_full(
    mut stream: TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    let mut message = head.into_bytes();
    message.extend_from_slice(body);
    stream.write_all(&message)?;
    stream.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
