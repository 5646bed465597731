//! A client for one host daemon's API (see
//! [`keelson_agent_lifecycle::host::api`]): plain HTTP with the host token.

use std::time::Duration;

use keelson_agent_lifecycle::host::api::{
    DeployRequest, ErrorBody, HostInfo, InstanceView, StartRequest,
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
}

impl HostClient {
    /// A client for a daemon at `address` (`http://HOST:PORT`) with `token`.
    pub fn new(name: &str, address: &str, token: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| Error::Unreachable {
                host: name.to_string(),
                url: address.to_string(),
                message: e.to_string(),
            })?;
        Ok(HostClient {
            name: name.to_string(),
            base: address.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            http,
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
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.unreachable(&url, e))?;
        self.decode(&url, status, &bytes)
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
        let mut request = self.http.get(&url).bearer_auth(&self.token);
        if !follow {
            request = request.timeout(CALL_TIMEOUT);
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.unreachable(&url, e))?;
        let status = response.status().as_u16();
        if status != 200 {
            let bytes = response
                .bytes()
                .await
                .map_err(|e| self.unreachable(&url, e))?;
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
        Ok(LogStream {
            response,
            buffer: Vec::new(),
            id: offset,
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

/// An open log: server-sent events, parsed.
#[derive(Debug)]
pub struct LogStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    id: u64,
    host: String,
    url: String,
}

impl LogStream {
    /// The next line; `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<LogLine>> {
        loop {
            while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                let mut data = None;
                for field in text.lines() {
                    if let Some(v) = field.strip_prefix("id: ") {
                        self.id = v.parse().unwrap_or(self.id);
                    } else if let Some(v) = field.strip_prefix("data: ") {
                        data = Some(v.to_string());
                    }
                }
                if let Some(line) = data
                    && !text.starts_with("event: gap")
                {
                    return Ok(Some(LogLine {
                        offset: self.id,
                        line,
                    }));
                }
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

    /// The offset to resume from.
    pub fn offset(&self) -> u64 {
        self.id
    }
}
