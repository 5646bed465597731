//! A client for one host daemon's API (see
//! [`keelson_agent_lifecycle::host::api`]): plain HTTP with the host token.

use std::time::Duration;

use keelson_agent_lifecycle::host::api::{
    DeployRequest, ErrorBody, EventsRequest, HostInfo, InstanceView, StartRequest,
};
use reqwest::Method;
use serde::de::DeserializeOwned;

use crate::registry::HostRecord;
use crate::{Error, Result};

/// How long one API call may take (a stop waits for the whole offline
/// sequence, so it gets [`STOP_TIMEOUT`]).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stop or restart call may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The largest answer body read from a daemon; a bigger one is an error,
/// so a broken daemon cannot grow keelson's memory without bound.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// The largest single server-sent event read from a daemon's streams.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// How long an open log or event stream may stay silent: the daemon sends a
/// keepalive every 15 s, so a longer silence means it is gone.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One line of an instance's log, with the offset just past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Resume after this line from here.
    pub offset: u64,
    /// The line: an agent event (a JSON object), `[step] …` hook output, or
    /// `[stdout] …`/`[stderr] …` from the app.
    pub line: String,
}

/// The client for one host.
#[derive(Debug, Clone)]
pub struct HostClient {
    name: String,
    base: String,
    token: String,
    http: reqwest::Client,
    streams: reqwest::Client,
}

impl HostClient {
    /// A client for a daemon at `address` (`http://HOST:PORT`) with `token`.
    pub fn new(name: &str, address: &str, token: &str) -> Result<Self> {
        Self::with_stream_idle_timeout(name, address, token, STREAM_IDLE_TIMEOUT)
    }

    /// [`Self::new`], ending a log or event stream that stays silent for
    /// `idle` (the default is [`STREAM_IDLE_TIMEOUT`]).
    pub fn with_stream_idle_timeout(
        name: &str,
        address: &str,
        token: &str,
        idle: Duration,
    ) -> Result<Self> {
        let build = |idle: Option<Duration>| {
            let mut builder = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            if let Some(idle) = idle {
                builder = builder.read_timeout(idle);
            }
            builder.build().map_err(|e| Error::Unreachable {
                host: name.to_string(),
                url: address.to_string(),
                message: e.to_string(),
            })
        };
        Ok(HostClient {
            name: name.to_string(),
            base: address.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            // A call that waits for a stop hears nothing until it is done,
            // so only streams get the idle timeout.
            http: build(None)?,
            streams: build(Some(idle))?,
        })
    }

    /// A client for a registered host, reading its token file.
    pub fn for_host(host: &HostRecord) -> Result<Self> {
        let token = std::fs::read_to_string(&host.token_file).map_err(|e| Error::Token {
            host: host.name.clone(),
            path: host.token_file.clone(),
            message: e.to_string(),
        })?;
        HostClient::new(&host.name, &host.address, &token)
    }

    /// The host's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.base)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&dyn erased::Body>,
        timeout: Duration,
    ) -> Result<T> {
        let url = self.url(path);
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .timeout(timeout);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_json());
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.unreachable(&url, e))?;
        let status = response.status().as_u16();
        let bytes = self.body(&url, response).await?;
        self.decode(&url, status, &bytes)
    }

    /// Reads a whole answer body, at most [`MAX_RESPONSE_BYTES`].
    async fn body(&self, url: &str, mut response: reqwest::Response) -> Result<Vec<u8>> {
        let status = response.status().as_u16();
        let too_large = || Error::Unexpected {
            host: self.name.clone(),
            url: url.to_string(),
            status,
            reason: format!("the body is larger than {MAX_RESPONSE_BYTES} bytes"),
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.unreachable(url, e))?
        {
            if chunk.len() > MAX_RESPONSE_BYTES - body.len() {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn unreachable(&self, url: &str, e: reqwest::Error) -> Error {
        // reqwest's Display hides the cause ("error sending request").
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        Error::Unreachable {
            host: self.name.clone(),
            url: url.to_string(),
            message,
        }
    }

    fn decode<T: DeserializeOwned>(&self, url: &str, status: u16, bytes: &[u8]) -> Result<T> {
        if (200..300).contains(&status) {
            let bytes = if bytes.is_empty() {
                b"null".as_slice()
            } else {
                bytes
            };
            return serde_json::from_slice(bytes).map_err(|e| Error::Unexpected {
                host: self.name.clone(),
                url: url.to_string(),
                status,
                reason: e.to_string(),
            });
        }
        match serde_json::from_slice::<ErrorBody>(bytes) {
            Ok(body) => Err(Error::Api {
                host: self.name.clone(),
                status,
                code: body.error.code,
                message: body.error.message,
                field: body.error.field,
            }),
            Err(_) => Err(Error::Unexpected {
                host: self.name.clone(),
                url: url.to_string(),
                status,
                reason: String::from_utf8_lossy(bytes).chars().take(300).collect(),
            }),
        }
    }

    /// `GET /v1/host`: who the host is; the health check.
    pub async fn host_info(&self, timeout: Duration) -> Result<HostInfo> {
        self.call(Method::GET, "host", None, timeout).await
    }

    /// Every instance on the host.
    pub async fn instances(&self) -> Result<Vec<InstanceView>> {
        self.call(Method::GET, "instances", None, CALL_TIMEOUT)
            .await
    }

    /// One instance.
    pub async fn instance(&self, name: &str) -> Result<InstanceView> {
        self.call(
            Method::GET,
            &format!("instances/{name}"),
            None,
            CALL_TIMEOUT,
        )
        .await
    }

    /// Deploys (the instance must be stopped); starts it when `request.start`.
    pub async fn deploy(&self, name: &str, request: &DeployRequest) -> Result<InstanceView> {
        self.call(
            Method::PUT,
            &format!("instances/{name}"),
            Some(request),
            STOP_TIMEOUT,
        )
        .await
    }

    /// Starts an instance, tagging the process with `generation`; returns
    /// at once (follow its events for ONLINE).
    pub async fn start(&self, name: &str, generation: Option<u64>) -> Result<InstanceView> {
        let body = StartRequest { generation };
        self.call(
            Method::POST,
            &format!("instances/{name}/start"),
            Some(&body),
            CALL_TIMEOUT,
        )
        .await
    }

    /// Holds an instance out of traffic (returns once it is out and
    /// drained); it stays out across restarts until [`Self::release`] or a
    /// new start.
    pub async fn hold(&self, name: &str) -> Result<InstanceView> {
        self.call(
            Method::POST,
            &format!("instances/{name}/offline"),
            None,
            STOP_TIMEOUT,
        )
        .await
    }

    /// Releases the hold: ONLINE again once checkurl and preOnline pass.
    pub async fn release(&self, name: &str) -> Result<InstanceView> {
        self.call(
            Method::POST,
            &format!("instances/{name}/online"),
            None,
            CALL_TIMEOUT,
        )
        .await
    }

    /// Stops an instance; returns when it is offline and stopped.
    pub async fn stop(&self, name: &str) -> Result<InstanceView> {
        self.call(
            Method::POST,
            &format!("instances/{name}/stop"),
            None,
            STOP_TIMEOUT,
        )
        .await
    }

    /// Stops, then starts an instance anew, tagged with `generation`.
    pub async fn restart(&self, name: &str, generation: Option<u64>) -> Result<InstanceView> {
        let body = StartRequest { generation };
        self.call(
            Method::POST,
            &format!("instances/{name}/restart"),
            Some(&body),
            STOP_TIMEOUT,
        )
        .await
    }

    /// Deletes a stopped instance.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let _: serde_json::Value = self
            .call(
                Method::DELETE,
                &format!("instances/{name}"),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        Ok(())
    }

    /// Opens an instance's log from `offset`; with `follow` it stays open
    /// and yields lines as they are written.
    pub async fn logs(
        &self,
        name: &str,
        offset: u64,
        follow: bool,
        events_only: bool,
    ) -> Result<LogStream> {
        let url = self.url(&format!(
            "instances/{name}/logs?offset={offset}&follow={follow}{}",
            if events_only { "&only=events" } else { "" }
        ));
        let mut request = self.streams.get(&url).bearer_auth(&self.token);
        if !follow {
            request = request.timeout(CALL_TIMEOUT);
        }
        Ok(LogStream {
            sse: self.open(request, url).await?,
            id: offset,
        })
    }

    /// Opens the host-wide stream of every instance's lifecycle events
    /// (`POST /v1/events`), resuming each instance from `request.from`.
    pub async fn events(&self, request: &EventsRequest) -> Result<EventStream> {
        let url = self.url("events");
        let mut builder = self
            .streams
            .post(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(request).unwrap_or_default());
        if !request.follow {
            builder = builder.timeout(CALL_TIMEOUT);
        }
        Ok(EventStream {
            sse: self.open(builder, url).await?,
        })
    }

    async fn open(&self, request: reqwest::RequestBuilder, url: String) -> Result<Sse> {
        let response = request
            .send()
            .await
            .map_err(|e| self.unreachable(&url, e))?;
        let status = response.status().as_u16();
        if status != 200 {
            let bytes = self.body(&url, response).await?;
            return match self.decode::<serde_json::Value>(&url, status, &bytes) {
                Err(e) => Err(e),
                Ok(_) => Err(Error::Unexpected {
                    host: self.name.clone(),
                    url,
                    status,
                    reason: "expected 200 and an event stream".into(),
                }),
            };
        }
        Ok(Sse {
            response,
            buffer: Vec::new(),
            scanned: 0,
            host: self.name.clone(),
            url,
        })
    }
}

mod erased {
    /// A request body, serialized on demand.
    pub trait Body: Send + Sync {
        fn to_json(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize + Send + Sync> Body for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

/// Server-sent events as they arrive.
#[derive(Debug)]
struct Sse {
    response: reqwest::Response,
    buffer: Vec<u8>,
    /// How much of `buffer` is known to hold no event end.
    scanned: usize,
    host: String,
    url: String,
}

/// One server-sent event.
struct SseEvent {
    id: Option<String>,
    kind: Option<String>,
    data: Option<String>,
}

impl Sse {
    async fn next(&mut self) -> Result<Option<SseEvent>> {
        loop {
            let from = self.scanned.saturating_sub(1);
            if let Some(end) = self.buffer[from..]
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| from + i)
            {
                let raw: Vec<u8> = self.buffer.drain(..end + 2).collect();
                self.scanned = 0;
                let text = String::from_utf8_lossy(&raw);
                let mut event = SseEvent {
                    id: None,
                    kind: None,
                    data: None,
                };
                for field in text.lines() {
                    if let Some(v) = field.strip_prefix("id: ") {
                        event.id = Some(v.to_string());
                    } else if let Some(v) = field.strip_prefix("event: ") {
                        event.kind = Some(v.to_string());
                    } else if let Some(v) = field.strip_prefix("data: ") {
                        event.data = Some(v.to_string());
                    }
                }
                return Ok(Some(event));
            }
            self.scanned = self.buffer.len();
            if self.buffer.len() > MAX_EVENT_BYTES {
                return Err(Error::Unexpected {
                    host: self.host.clone(),
                    url: self.url.clone(),
                    status: 200,
                    reason: format!("an event is larger than {MAX_EVENT_BYTES} bytes"),
                });
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.buffer.extend_from_slice(&bytes),
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(Error::Unreachable {
                        host: self.host.clone(),
                        url: self.url.clone(),
                        message: e.to_string(),
                    });
                }
            }
        }
    }
}

/// An open log of one instance.
#[derive(Debug)]
pub struct LogStream {
    sse: Sse,
    id: u64,
}

impl LogStream {
    /// The next line; `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<LogLine>> {
        while let Some(event) = self.sse.next().await? {
            if let Some(id) = event.id.and_then(|i| i.parse().ok()) {
                self.id = id;
            }
            if let Some(line) = event.data
                && event.kind.as_deref() != Some("gap")
            {
                return Ok(Some(LogLine {
                    offset: self.id,
                    line,
                }));
            }
        }
        Ok(None)
    }

    /// The offset to resume from.
    pub fn offset(&self) -> u64 {
        self.id
    }
}

/// One event of the host-wide stream.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceEventLine {
    /// The instance.
    pub instance: String,
    /// Where to resume this instance from.
    pub offset: u64,
    /// The event (`{"ts", "component", "event", …}`).
    pub event: serde_json::Value,
}

/// The host-wide event stream (`POST /v1/events`).
#[derive(Debug)]
pub struct EventStream {
    sse: Sse,
}

impl EventStream {
    /// The next event; `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<InstanceEventLine>> {
        while let Some(event) = self.sse.next().await? {
            let (Some(id), Some(data)) = (event.id, event.data) else {
                continue;
            };
            let Some((instance, offset)) = id.split_once(':') else {
                continue;
            };
            let (Ok(offset), Ok(event)) = (offset.parse(), serde_json::from_str(&data)) else {
                continue;
            };
            return Ok(Some(InstanceEventLine {
                instance: instance.to_string(),
                offset,
                event,
            }));
        }
        Ok(None)
    }
}
