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
use std::time::{Duration, Instant};

/// The most connections served at once; more get `503`.
pub const MAX_CONNECTIONS: usize = 256;

/// The largest request body (a deploy request) accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The time a client has to send its whole request. A per-read timeout
/// alone lets a client that sends a byte now and then hold a connection
/// (one of [`MAX_CONNECTIONS`]) for ever.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

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
    serve_within(listener, stop, handler, REQUEST_DEADLINE);
}

/// Looks at a request's head before its body is read: `Some(reply)` answers
/// at once and the body is never read (an unauthenticated client must not
/// make the daemon wait for, and hold, a body of up to [`MAX_BODY_BYTES`]).
pub type Admit = Arc<dyn Fn(&Request) -> Option<Reply> + Send + Sync>;

/// [`serve`], giving each client `request_deadline` to send its request.
pub fn serve_within(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    handler: Arc<dyn Fn(Request) -> Reply + Send + Sync>,
    request_deadline: Duration,
) {
    serve_admitting(
        listener,
        stop,
        Arc::new(|_| None),
        handler,
        request_deadline,
    );
}

/// [`serve_within`], passing each request's head to `admit` first.
pub fn serve_admitting(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    admit: Admit,
    handler: Arc<dyn Fn(Request) -> Reply + Send + Sync>,
    request_deadline: Duration,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut backoff = crate::http::AcceptBackoff::default();
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(stream) = backoff.accepted(stream) else {
            continue;
        };
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
        let (admit, handler, count) = (admit.clone(), handler.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("keelson-host-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let _ = serve_one(stream, &*admit, &*handler, request_deadline);
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

/// Reads one request from `stream`, within [`REQUEST_DEADLINE`].
pub fn read_request(stream: &TcpStream) -> io::Result<Request> {
    read_request_within(stream, REQUEST_DEADLINE)
}

/// Reads one request from `stream`; the whole request must arrive within
/// `deadline`, its head within [`MAX_HEAD_BYTES`] and its body within
/// [`MAX_BODY_BYTES`].
pub fn read_request_within(stream: &TcpStream, deadline: Duration) -> io::Result<Request> {
    let mut reader = request_reader(stream, deadline)?;
    let mut request = read_head(&mut reader)?;
    read_body(&mut reader, &mut request)?;
    Ok(request)
}

fn request_reader(stream: &TcpStream, deadline: Duration) -> io::Result<BufReader<Deadlined>> {
    Ok(BufReader::new(Deadlined {
        stream: stream.try_clone()?,
        deadline: Instant::now() + deadline,
    }))
}

/// Reads the request line and headers, and checks what the body will be.
fn read_head(reader: &mut impl BufRead) -> io::Result<Request> {
    let mut head_left = MAX_HEAD_BYTES;
    let mut line = String::new();
    read_line(reader, &mut line, &mut head_left)?;
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
        read_line(reader, &mut line, &mut head_left)?;
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
    if request.header("transfer-encoding").is_some() {
        // Its body would otherwise be read as nothing, or as the next request.
        return Err(bad(
            "Transfer-Encoding is not supported; send the body with a Content-Length",
        ));
    }
    if let Some(len) = request.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("invalid content-length"))?;
        if len > MAX_BODY_BYTES {
            return Err(bad("body too large"));
        }
    }
    Ok(request)
}

/// Reads the body the head announced (checked by [`read_head`]).
fn read_body(reader: &mut impl Read, request: &mut Request) -> io::Result<()> {
    let len = request
        .header("content-length")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_BODY_BYTES);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    request.body = body;
    Ok(())
}

/// A stream whose every read is bounded by one deadline for the request.
struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request did not arrive in time",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Reads one head line, counting it against the head's budget; a line that
/// does not end within the budget is an error, not two lines.
fn read_line(
    reader: &mut impl BufRead,
    line: &mut String,
    head_left: &mut usize,
) -> io::Result<()> {
    let mut bytes = Vec::new();
    reader
        .take(*head_left as u64)
        .read_until(b'\n', &mut bytes)?;
    if bytes.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
    }
    *head_left -= bytes.len();
    if bytes.last() != Some(&b'\n') {
        return Err(if *head_left == 0 {
            bad("request head too large")
        } else {
            io::Error::new(io::ErrorKind::UnexpectedEof, "closed mid-line")
        });
    }
    line.push_str(&String::from_utf8_lossy(&bytes));
    Ok(())
}

fn serve_one(
    stream: TcpStream,
    admit: &(dyn Fn(&Request) -> Option<Reply> + Send + Sync),
    handler: &(dyn Fn(Request) -> Reply + Send + Sync),
    request_deadline: Duration,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let bad_request = |stream, e: io::Error| {
        let body = serde_json::json!({"error": {"code": "bad_request", "message": e.to_string()}});
        write_full(stream, 400, "application/json", body.to_string().as_bytes())
    };
    let mut reader = request_reader(&stream, request_deadline)?;
    let mut request = match read_head(&mut reader) {
        Ok(r) => r,
        Err(e) => return bad_request(stream, e),
    };
    if let Some(reply) = admit(&request) {
        let answered = write_reply(stream, reply);
        // Discard (never keep) what the client still sends, within its
        // deadline: closing on unread data would reset the connection and
        // could destroy the answer before the client reads it.
        let _ = reader.get_ref().stream.shutdown(std::net::Shutdown::Write);
        let _ = io::copy(&mut reader.take(MAX_BODY_BYTES as u64), &mut io::sink());
        return answered;
    }
    if let Err(e) = read_body(&mut reader, &mut request) {
        return bad_request(stream, e);
    }
    write_reply(stream, handler(request))
}

fn write_reply(stream: TcpStream, reply: Reply) -> io::Result<()> {
    match reply {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// Writes `head`, then one byte at a time as a slow client would, until
    /// the server hangs up (or `limit` passes, so a broken server fails the
    /// test instead of hanging it).
    fn drip(mut client: TcpStream, head: &'static [u8], limit: Duration) {
        std::thread::spawn(move || {
            let _ = client.write_all(head);
            let until = Instant::now() + limit;
            while Instant::now() < until && client.write_all(b"a").is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    }

    #[test]
    fn a_client_dripping_its_head_is_cut_off_at_the_request_deadline() {
        let (client, server) = pair();
        drip(
            client,
            b"GET /v1/host HTTP/1.1\r\nX-Slow: ",
            Duration::from_secs(30),
        );
        let err = read_request_within(&server, Duration::from_millis(500)).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_client_dripping_its_body_is_cut_off_at_the_request_deadline() {
        let (client, server) = pair();
        drip(
            client,
            b"PUT /v1/instances/a HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
            Duration::from_secs(30),
        );
        let err = read_request_within(&server, Duration::from_millis(500)).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{err:?}"
        );
    }

    #[test]
    fn an_oversized_head_or_a_chunked_body_is_refused() {
        let (mut client, server) = pair();
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for _ in 0..20 {
            raw.extend_from_slice(b"X-Pad: ");
            raw.extend(std::iter::repeat_n(b'a', 8 * 1024));
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"\r\n");
        std::thread::spawn(move || client.write_all(&raw));
        let err = read_request_within(&server, Duration::from_secs(10)).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");

        let (mut client, server) = pair();
        client
            .write_all(b"POST /v1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
            .unwrap();
        let err = read_request_within(&server, Duration::from_secs(10)).unwrap_err();
        assert!(err.to_string().contains("Transfer-Encoding"), "{err}");
    }

    fn get_status(addr: SocketAddr) -> Option<u16> {
        let mut s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(b"GET /x HTTP/1.1\r\n\r\n").ok()?;
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.split_whitespace().nth(1)?.parse().ok()
    }

    #[test]
    fn a_refused_head_is_answered_without_waiting_for_its_body() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let admit: Admit = Arc::new(|req: &Request| {
            (req.header("authorization") != Some("Bearer t")).then(|| Reply::empty(401))
        });
        let handler: Arc<dyn Fn(Request) -> Reply + Send + Sync> =
            Arc::new(|req| Reply::json(200, &req.body.len()));
        std::thread::spawn(move || {
            serve_admitting(listener, stop, admit, handler, Duration::from_secs(60))
        });
        // The body is announced and never sent: only the head can answer.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"PUT /v1/instances/a HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(text.starts_with("HTTP/1.1 401 "), "{text}");
        // A refused client that does send its body still reads the answer.
        let mut s = TcpStream::connect(addr).unwrap();
        let mut raw = b"PUT /v1/instances/a HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'x', 1 << 20));
        let mut writer = s.try_clone().unwrap();
        let sent = std::thread::spawn(move || writer.write_all(&raw));
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(text.starts_with("HTTP/1.1 401 "), "{text}");
        let _ = sent.join();
        // An admitted request gets its body read.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"PUT /x HTTP/1.1\r\nAuthorization: Bearer t\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        assert!(
            text.starts_with("HTTP/1.1 200 ") && text.ends_with("\r\n\r\n3"),
            "{text}"
        );
    }

    #[test]
    fn slow_clients_cannot_hold_every_connection_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<dyn Fn(Request) -> Reply + Send + Sync> =
            Arc::new(|_| Reply::json(200, &"ok"));
        std::thread::spawn(move || serve_within(listener, stop, handler, Duration::from_secs(3)));
        // Fill every slot with a client that keeps sending a byte now and then.
        let slow: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        for mut s in &slow {
            s.write_all(b"GET /x HTTP/1.1\r\nX-Slow: ").unwrap();
        }
        assert_eq!(get_status(addr), Some(503));
        // The slow clients go on dripping; the server must free their slots.
        let until = Instant::now() + Duration::from_secs(60);
        let mut served = false;
        while Instant::now() < until && !served {
            for mut s in &slow {
                let _ = s.write_all(b"a");
            }
            served = get_status(addr) == Some(200);
        }
        assert!(served, "slow clients held every slot");
    }
}
