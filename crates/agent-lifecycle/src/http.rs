//! A minimal blocking HTTP/1.1 client and server over std sockets: enough for
//! checkurl, the `http()` probe, the authorization API and the sidecar's
//! `/ready` and `/state`, without an async runtime in the agent.
//!
//! The client sends one request per connection (`Connection: close`) and
//! reads at most [`MAX_RESPONSE_BYTES`]; it speaks plain `http://` only.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The largest response body the client reads.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// The largest request (head and body) the server reads.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// An `http://host[:port][/base]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port, 80 when absent.
    pub port: u16,
    /// Path prefix without a trailing slash (may be empty).
    pub base_path: String,
}

impl Url {
    /// Parses a base URL; only `http://` is supported.
    pub fn parse(url: &str) -> Result<Url, String> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "unsupported scheme `{scheme}` in `{url}`; keelson-agent speaks plain http:// only"
                ));
            }
            None => {
                return Err(format!(
                    "`{url}` is not a URL; expected http://host[:port][/path]"
                ));
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            // `http://trusted@other/` names the host `other`.
            return Err(format!(
                "`{url}` carries user information (`…@`); keelson-agent does not support it"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("unclosed `[` in `{url}`"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("`{url}` has no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("invalid port `{p}` in `{url}`"))?,
            None => 80,
        };
        Ok(Url {
            host: host.to_string(),
            port,
            base_path: path.trim_end_matches('/').to_string(),
        })
    }
}

/// A response as far as the agent cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty when not asked for).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// `GET`, `POST`, `DELETE`, …
    pub method: &'a str,
    /// Target host.
    pub host: &'a str,
    /// Target port.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: &'a str,
    /// Extra headers.
    pub headers: &'a [(&'a str, &'a str)],
    /// JSON body, if any.
    pub body: Option<&'a [u8]>,
    /// Budget for connecting, sending and receiving.
    pub timeout: Duration,
    /// Whether to read the body (a status check stops after the head).
    pub read_body: bool,
}

/// Sends `req` and reads the response, within `req.timeout` in total.
pub fn send(req: &Request<'_>) -> io::Result<Response> {
    let deadline = Instant::now() + req.timeout;
    let addrs: Vec<SocketAddr> = (req.host, req.port).to_socket_addrs()?.collect();
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} has no address", req.host),
    );
    let mut stream = None;
    for addr in addrs {
        let left = remaining(deadline)?;
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut stream = stream.ok_or(last)?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    let host = if req.host.contains(':') {
        format!("[{}]:{}", req.host, req.port)
    } else {
        format!("{}:{}", req.host, req.port)
    };
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: keelson-agent\r\n",
        req.method, req.path
    );
    for (name, value) in req.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = req.body.unwrap_or_default();
    if req.body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if req.body.is_some() || matches!(req.method, "POST" | "PUT" | "PATCH") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut message = head.into_bytes();
    message.extend_from_slice(body);
    stream.write_all(&message)?;

    let mut reader = BufReader::new(Deadlined { stream, deadline });
    let mut line = String::new();
    read_line_limited(&mut reader, &mut line)?;
    let status = parse_status_line(&line)?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        read_line_limited(&mut reader, &mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        if headers.len() > 100 {
            return Err(invalid("too many response headers"));
        }
    }
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if req.read_body && req.method != "HEAD" && status != 204 && status != 304 {
        response.body = read_body(&mut reader, &response)?;
    }
    Ok(response)
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out"));
    }
    Ok(left)
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// A stream whose every read is bounded by a shared deadline.
struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream
            .set_read_timeout(Some(remaining(self.deadline)?))?;
        self.stream.read(buf)
    }
}

/// The longest line of a message head (request line, status line, header).
const MAX_LINE_BYTES: usize = 8192;

fn read_line_limited(reader: &mut impl BufRead, line: &mut String) -> io::Result<()> {
    let mut bytes = Vec::new();
    reader
        .take(MAX_LINE_BYTES as u64)
        .read_until(b'\n', &mut bytes)?;
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before the response head ended",
        ));
    }
    // A line cut at the limit must not have its rest read as the next line.
    if bytes.len() == MAX_LINE_BYTES && bytes.last() != Some(&b'\n') {
        return Err(invalid("header line too long"));
    }
    line.push_str(&String::from_utf8_lossy(&bytes));
    Ok(())
}

fn parse_status_line(line: &str) -> io::Result<u16> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code
            .parse::<u16>()
            .map_err(|_| invalid("invalid status code")),
        _ => Err(invalid("not an HTTP response")),
    }
}

fn read_body(reader: &mut impl BufRead, response: &Response) -> io::Result<Vec<u8>> {
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            read_line_limited(reader, &mut size_line)?;
            let size_hex = size_line.trim().split(';').next().unwrap_or("");
            let size =
                usize::from_str_radix(size_hex, 16).map_err(|_| invalid("invalid chunk size"))?;
            if size == 0 {
                break;
            }
            // `size` is the peer's number: compare without adding to it.
            if size > MAX_RESPONSE_BYTES - body.len() {
                return Err(invalid("response body too large"));
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut crlf = String::new();
            read_line_limited(reader, &mut crlf)?;
        }
    } else if let Some(len) = response.header("content-length") {
        let len: usize = len.parse().map_err(|_| invalid("invalid content-length"))?;
        if len > MAX_RESPONSE_BYTES {
            return Err(invalid("response body too large"));
        }
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader
            .take(MAX_RESPONSE_BYTES as u64 + 1)
            .read_to_end(&mut body)?;
        // Cutting the body short would hand the caller a truncated document.
        if body.len() > MAX_RESPONSE_BYTES {
            return Err(invalid("response body too large"));
        }
    }
    Ok(body)
}

/// A request received by [`serve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRequest {
    /// The method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body (by `Content-Length`).
    pub body: Vec<u8>,
}

impl ServerRequest {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response written by [`serve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerResponse {
    /// The status code.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// `Content-Type` of the body.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl ServerResponse {
    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        ServerResponse {
            status,
            headers: Vec::new(),
            content_type: "application/json",
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    /// A plain-text response.
    pub fn text(status: u16, body: &str) -> Self {
        ServerResponse {
            status,
            headers: Vec::new(),
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }
}

/// Serves connections from `listener` one at a time, forever, answering each
/// request with `handler`. Sequential on purpose: the callers are kubelet
/// probes and people, and memory stays flat. A slow client is cut off after
/// two seconds.
pub fn serve(listener: TcpListener, handler: impl Fn(&ServerRequest) -> ServerResponse) {
    let mut backoff = AcceptBackoff::default();
    for stream in listener.incoming() {
        let Some(stream) = backoff.accepted(stream) else {
            continue;
        };
        let _ = serve_one(stream, &handler);
    }
}

/// Paces an accept loop after failed accepts. When the process is out of
/// file descriptors (EMFILE), the pending connection stays and `accept`
/// fails again at once: without a pause the loop spins a core until a
/// descriptor is freed. Waits 5 ms after the first failure, doubling to 1 s,
/// and starts over after a success.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    /// The stream, or `None` after pausing when the accept failed.
    pub(crate) fn accepted(&mut self, result: io::Result<TcpStream>) -> Option<TcpStream> {
        match result {
            Ok(stream) => {
                self.next = None;
                Some(stream)
            }
            Err(_) => {
                std::thread::sleep(self.pause());
                None
            }
        }
    }

    fn pause(&mut self) -> Duration {
        let pause = self.next.unwrap_or(Duration::from_millis(5));
        self.next = Some((pause * 2).min(Duration::from_secs(1)));
        pause
    }
}

fn serve_one(
    stream: TcpStream,
    handler: &impl Fn(&ServerRequest) -> ServerResponse,
) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut reader = BufReader::new(Deadlined {
        stream: stream.try_clone()?,
        deadline,
    })
    .take(MAX_REQUEST_BYTES as u64);
    let mut line = String::new();
    read_line_limited(&mut reader, &mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(invalid("bad request line"));
    };
    let (method, path) = (method.to_string(), path.to_string());
    let mut headers = Vec::new();
    loop {
        line.clear();
        read_line_limited(&mut reader, &mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let mut request = ServerRequest {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    if let Some(len) = request.header("content-length") {
        let len: usize = len.parse().map_err(|_| invalid("invalid content-length"))?;
        let mut body = vec![0; len.min(MAX_REQUEST_BYTES)];
        reader.read_exact(&mut body)?;
        request.body = body;
    }
    let response = handler(&request);
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = stream;
    out.set_write_timeout(Some(Duration::from_secs(2)))?;
    out.write_all(head.as_bytes())?;
    out.write_all(&response.body)?;
    out.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            Url::parse("http://keelson.keelson-system.svc:8080/base/").unwrap(),
            Url {
                host: "keelson.keelson-system.svc".into(),
                port: 8080,
                base_path: "/base".into()
            }
        );
        assert_eq!(Url::parse("http://[::1]:9/").unwrap().host, "::1");
        assert_eq!(Url::parse("http://h").unwrap().port, 80);
        assert!(
            Url::parse("https://h")
                .unwrap_err()
                .contains("plain http://")
        );
        assert!(Url::parse("h:80").is_err());
        assert!(
            Url::parse("http://good@evil/")
                .unwrap_err()
                .contains("user information")
        );
        assert!(Url::parse("http://h:99999").is_err());
    }

    #[test]
    fn client_and_server_round_trip() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            serve(listener, |req| {
                let mut r = ServerResponse::json(
                    201,
                    &serde_json::json!({
                        "method": req.method,
                        "path": req.path,
                        "auth": req.header("authorization"),
                        "body": String::from_utf8_lossy(&req.body),
                    }),
                );
                r.headers.push(("Retry-After".into(), "3".into()));
                r
            })
        });
        let resp = send(&Request {
            method: "POST",
            host: "127.0.0.1",
            port,
            path: "/api/v1/grants",
            headers: &[("Authorization", "Bearer t")],
            body: Some(br#"{"a":1}"#),
            timeout: Duration::from_secs(5),
            read_body: true,
        })
        .unwrap();
        assert_eq!(resp.status, 201);
        assert_eq!(resp.header("retry-after"), Some("3"));
        let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(v["path"], "/api/v1/grants");
        assert_eq!(v["auth"], "Bearer t");
        assert_eq!(v["body"], r#"{"a":1}"#);
    }

    #[test]
    fn decodes_chunked_bodies() {
        let raw = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let resp = Response {
            status: 200,
            headers: vec![("transfer-encoding".into(), "chunked".into())],
            body: vec![],
        };
        assert_eq!(read_body(&mut &raw[..], &resp).unwrap(), b"hello world");
    }

    fn chunked(raw: &[u8]) -> io::Result<Vec<u8>> {
        let resp = Response {
            status: 200,
            headers: vec![("transfer-encoding".into(), "chunked".into())],
            body: vec![],
        };
        read_body(&mut &raw[..], &resp)
    }

    #[test]
    fn huge_chunk_sizes_are_errors_not_panics() {
        for raw in [
            &b"5\r\nhello\r\nffffffffffffffff\r\nx\r\n0\r\n\r\n"[..],
            b"ffffffffffffffff\r\nx\r\n0\r\n\r\n",
            b"100001\r\nx\r\n0\r\n\r\n",
            b"1ffffffffffffffff\r\nx\r\n",
        ] {
            let err = chunked(raw).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        }
    }

    /// Serves one connection on loopback with `raw` as the whole response.
    fn one_shot(raw: Vec<u8>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(&raw);
        });
        port
    }

    fn get(port: u16) -> io::Result<Response> {
        send(&Request {
            method: "GET",
            host: "127.0.0.1",
            port,
            path: "/",
            headers: &[],
            body: None,
            timeout: Duration::from_secs(10),
            read_body: true,
        })
    }

    #[test]
    fn an_overlong_header_line_is_an_error_not_two_headers() {
        let mut raw = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 9000));
        raw.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
        let err = get(one_shot(raw)).unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
    }

    #[test]
    fn a_body_without_length_beyond_the_limit_is_an_error_not_truncated() {
        let mut raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_RESPONSE_BYTES + 10));
        let err = get(one_shot(raw)).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        let mut raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 1000));
        assert_eq!(get(one_shot(raw)).unwrap().body.len(), 1000);
    }

    #[test]
    fn failed_accepts_pause_longer_each_time_up_to_a_second() {
        let mut b = AcceptBackoff::default();
        let pauses: Vec<u64> = (0..10).map(|_| b.pause().as_millis() as u64).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(b.accepted(listener.accept().map(|(s, _)| s)).is_some());
        assert_eq!(b.pause(), Duration::from_millis(5));
    }

    #[test]
    fn unreachable_is_an_error_not_a_hang() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = send(&Request {
            method: "GET",
            host: "127.0.0.1",
            port,
            path: "/",
            headers: &[],
            body: None,
            timeout: Duration::from_secs(2),
            read_body: false,
        });
        assert!(err.is_err());
    }
}
