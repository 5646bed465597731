//! A typed client for the HTTP API, used by the CLI, the tests and the
//! benchmark.

use keelson_store::{
    AppHead, AppPage, AppRecord, ApplyOutcome, AuditPage, Environment, IssuedToken, NewEnvironment,
    NewTarget, NewToken, Revision, Target, TokenRecord,
};
use reqwest::{Method, RequestBuilder, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{Items, ProfileDiff, RevisionList, RollbackRequest, WhoAmI};
use crate::error::ErrorBody;
use crate::releases::{AbortBody, ReleaseBody};
pub use keelson_release::ReleaseView;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL is not a URL.
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl {
        /// What was given.
        url: String,
        /// Why it is not usable.
        reason: String,
    },
    /// No answer (connection refused, timeout, …).
    #[error("cannot reach {url}: {source}")]
    Transport {
        /// The request URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error.
    #[error("{status}: {}", body.error.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The server answered something this client does not understand.
    #[error("unexpected response from {url} (HTTP {status}): {reason}")]
    Unexpected {
        /// The request URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// What was wrong with it.
        reason: String,
    },
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::Unexpected { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }

    /// The error body, when the server sent one.
    pub fn body(&self) -> Option<&ErrorBody> {
        match self {
            ClientError::Api { body, .. } => Some(body),
            _ => None,
        }
    }
}

/// Result of client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Filters for [`Client::list_apps`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct ListApps {
    /// Only this team.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Only apps this subject owns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// `k=v,k2=v2`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Page size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The previous page's `nextCursor`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// Filters for [`Client::audit`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct ListAudit {
    /// Only this resource kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Only this resource.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Only this actor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Page size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The previous page's `nextCursor`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<i64>,
}

/// A connection to one keelson server with one token.
#[derive(Debug, Clone)]
pub struct Client {
    base: Url,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client for `server` (e.g. `http://127.0.0.1:8080`).
    pub fn new(server: &str, token: Option<String>) -> Result<Client> {
        let base = Url::parse(server).map_err(|e| ClientError::InvalidUrl {
            url: server.into(),
            reason: e.to_string(),
        })?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::InvalidUrl {
                url: server.into(),
                reason: "expected http://HOST:PORT".into(),
            });
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("keelson/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Transport {
                url: server.into(),
                source: e,
            })?;
        Ok(Client { base, token, http })
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            path.extend(segments);
        }
        url
    }

    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        let request = self.http.request(method, self.url(segments));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T> {
        let (client, request) = request.build_split();
        let request = request.map_err(|e| ClientError::Transport {
            url: self.base.to_string(),
            source: e,
        })?;
        let url = request.url().to_string();
        let response = client
            .execute(request)
            .await
            .map_err(|e| ClientError::Transport {
                url: url.clone(),
                source: e,
            })?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| ClientError::Transport {
            url: url.clone(),
            source: e,
        })?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
                url,
                status,
                reason: e.to_string(),
            })
        } else {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => Err(ClientError::Api { status, body }),
                Err(_) => Err(ClientError::Unexpected {
                    url,
                    status,
                    reason: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
                }),
            }
        }
    }

    /// Creates or updates an app from its profile text (YAML or JSON).
    pub async fn apply(&self, profile: &str, message: Option<&str>) -> Result<ApplyOutcome> {
        let mut request = self
            .request(Method::POST, &["api", "v1", "apps"])
            .header(reqwest::header::CONTENT_TYPE, "application/yaml")
            .body(profile.to_string());
        if let Some(message) = message {
            request = request.query(&[("message", message)]);
        }
        self.send(request).await
    }

    /// An app with its current revision, or revision `revision`.
    pub async fn get_app(&self, name: &str, revision: Option<i64>) -> Result<AppRecord> {
        let mut request = self.request(Method::GET, &["api", "v1", "apps", name]);
        if let Some(revision) = revision {
            request = request.query(&[("revision", revision)]);
        }
        self.send(request).await
    }

    /// One page of apps.
    pub async fn list_apps(&self, filter: &ListApps) -> Result<AppPage> {
        self.send(
            self.request(Method::GET, &["api", "v1", "apps"])
                .query(filter),
        )
        .await
    }

    /// Every app matching `filter`, following pages.
    pub async fn list_all_apps(&self, filter: &ListApps) -> Result<Vec<keelson_store::AppSummary>> {
        let mut filter = filter.clone();
        let mut all = Vec::new();
        loop {
            let page = self.list_apps(&filter).await?;
            all.extend(page.items);
            match page.next_cursor {
                Some(cursor) => filter.cursor = Some(cursor),
                None => return Ok(all),
            }
        }
    }

    /// An app's revisions, newest first.
    pub async fn revisions(&self, name: &str) -> Result<RevisionList> {
        self.send(self.request(Method::GET, &["api", "v1", "apps", name, "revisions"]))
            .await
    }

    /// One revision with its profile.
    pub async fn revision(&self, name: &str, number: i64) -> Result<Revision> {
        let number = number.to_string();
        self.send(self.request(
            Method::GET,
            &["api", "v1", "apps", name, "revisions", &number],
        ))
        .await
    }

    /// Field changes from revision `from` to `to`.
    pub async fn diff(&self, name: &str, from: i64, to: i64) -> Result<ProfileDiff> {
        let request = self
            .request(Method::GET, &["api", "v1", "apps", name, "diff"])
            .query(&[("from", from), ("to", to)]);
        self.send(request).await
    }

    /// Makes revision `revision` current again, as a new revision.
    pub async fn rollback(
        &self,
        name: &str,
        revision: i64,
        message: Option<String>,
    ) -> Result<ApplyOutcome> {
        let body = RollbackRequest { revision, message };
        self.send(
            self.request(Method::POST, &["api", "v1", "apps", name, "rollback"])
                .json(&body),
        )
        .await
    }

    /// Soft-deletes an app.
    pub async fn delete_app(&self, name: &str) -> Result<AppHead> {
        self.send(self.request(Method::DELETE, &["api", "v1", "apps", name]))
            .await
    }

    /// Audit events, newest first.
    pub async fn audit(&self, filter: &ListAudit) -> Result<AuditPage> {
        self.send(
            self.request(Method::GET, &["api", "v1", "audit"])
                .query(filter),
        )
        .await
    }

    /// The caller as the server sees the token.
    pub async fn whoami(&self) -> Result<WhoAmI> {
        self.send(self.request(Method::GET, &["api", "v1", "whoami"]))
            .await
    }

    /// The items of a list endpoint.
    async fn list<T: DeserializeOwned>(&self, path: &[&str]) -> Result<Vec<T>> {
        let items: Items<T> = self.send(self.request(Method::GET, path)).await?;
        Ok(items.items)
    }

    /// Registers or updates an environment (admin).
    pub async fn put_environment(&self, env: &NewEnvironment) -> Result<Environment> {
        self.send(
            self.request(Method::POST, &["api", "v1", "environments"])
                .json(env),
        )
        .await
    }

    /// Registered environments.
    pub async fn environments(&self) -> Result<Vec<Environment>> {
        self.list(&["api", "v1", "environments"]).await
    }

    /// Registers or updates a target (admin).
    pub async fn put_target(&self, target: &NewTarget) -> Result<Target> {
        self.send(
            self.request(Method::POST, &["api", "v1", "targets"])
                .json(target),
        )
        .await
    }

    /// Registered targets.
    pub async fn targets(&self) -> Result<Vec<Target>> {
        self.list(&["api", "v1", "targets"]).await
    }

    /// Creates a token (admin); the secret is in the answer only.
    pub async fn create_token(&self, token: &NewToken) -> Result<IssuedToken> {
        self.send(
            self.request(Method::POST, &["api", "v1", "tokens"])
                .json(token),
        )
        .await
    }

    /// All tokens (admin).
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.list(&["api", "v1", "tokens"]).await
    }

    /// Revokes a token (admin).
    pub async fn revoke_token(&self, id: &str) -> Result<TokenRecord> {
        self.send(self.request(Method::DELETE, &["api", "v1", "tokens", id]))
            .await
    }

    /// Asks for a release of `app` (it starts in `planning`; a worker runs it).
    pub async fn create_release(&self, app: &str, body: &ReleaseBody) -> Result<ReleaseView> {
        self.send(
            self.request(Method::POST, &["api", "v1", "apps", app, "releases"])
                .json(body),
        )
        .await
    }

    /// The releases of `app` (only in `env`, when given), newest first.
    pub async fn releases(
        &self,
        app: &str,
        env: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Vec<ReleaseView>> {
        let mut request = self.request(Method::GET, &["api", "v1", "apps", app, "releases"]);
        if let Some(env) = env {
            request = request.query(&[("env", env)]);
        }
        if let Some(limit) = limit {
            request = request.query(&[("limit", limit)]);
        }
        let items: Items<ReleaseView> = self.send(request).await?;
        Ok(items.items)
    }

    /// The newest release of `app` in `env`; 404 (as [`ClientError::Api`]) when there is none.
    pub async fn latest_release(&self, app: &str, env: &str) -> Result<ReleaseView> {
        self.releases(app, Some(env), Some(1))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Api {
                status: 404,
                body: ErrorBody {
                    error: crate::error::ErrorDetail {
                        code: "not_found".into(),
                        message: format!("app {app:?} has no release in {env:?}"),
                        field: None,
                        details: Vec::new(),
                    },
                },
            })
    }

    /// One release of `app`.
    pub async fn release(&self, app: &str, id: &str) -> Result<ReleaseView> {
        self.send(self.request(Method::GET, &["api", "v1", "apps", app, "releases", id]))
            .await
    }

    async fn steer_release(
        &self,
        app: &str,
        id: &str,
        what: &str,
        body: Option<&AbortBody>,
    ) -> Result<ReleaseView> {
        let mut request = self.request(
            Method::POST,
            &["api", "v1", "apps", app, "releases", id, what],
        );
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send(request).await
    }

    /// Pauses a release before its next stage (409 when it cannot be paused now).
    pub async fn pause_release(&self, app: &str, id: &str) -> Result<ReleaseView> {
        self.steer_release(app, id, "pause", None).await
    }

    /// Resumes a paused release.
    pub async fn resume_release(&self, app: &str, id: &str) -> Result<ReleaseView> {
        self.steer_release(app, id, "resume", None).await
    }

    /// Aborts a release: it stops where it is and takes its new instances
    /// out of traffic, unless `keep_online`.
    pub async fn abort_release(
        &self,
        app: &str,
        id: &str,
        keep_online: bool,
    ) -> Result<ReleaseView> {
        self.steer_release(app, id, "abort", Some(&AbortBody { keep_online }))
            .await
    }

    /// Rolls a release back to the version before it.
    pub async fn rollback_release(&self, app: &str, id: &str) -> Result<ReleaseView> {
        self.steer_release(app, id, "rollback", None).await
    }

    /// The release's event stream (server-sent events), from the start or
    /// after event `last_event_id`. The server ends it once the release has
    /// finished and every event is sent.
    pub async fn release_events(
        &self,
        id: &str,
        last_event_id: Option<i64>,
    ) -> Result<ReleaseEventStream> {
        let mut request = self
            .request(Method::GET, &["api", "v1", "releases", id, "events"])
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(last) = last_event_id {
            request = request.header("Last-Event-ID", last.to_string());
        }
        let (client, request) = request.build_split();
        let request = request.map_err(|e| ClientError::Transport {
            url: self.base.to_string(),
            source: e,
        })?;
        let url = request.url().to_string();
        let response = client
            .execute(request)
            .await
            .map_err(|e| ClientError::Transport {
                url: url.clone(),
                source: e,
            })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let bytes = response.bytes().await.map_err(|e| ClientError::Transport {
                url: url.clone(),
                source: e,
            })?;
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => ClientError::Api { status, body },
                Err(_) => ClientError::Unexpected {
                    url,
                    status,
                    reason: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
                },
            });
        }
        Ok(ReleaseEventStream {
            url,
            response,
            buffer: Vec::new(),
        })
    }
}

/// One event of a release's stream.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ReleaseStreamEvent {
    /// Its id: give it as `Last-Event-ID` to resume after it.
    pub id: i64,
    /// When it was recorded.
    pub at: keelson_store::Timestamp,
    /// What happened: `kind` (`created`, `planned`, `refused`, `start`,
    /// `instance`, `done`, `action-failed`, `tick`, `pause`, `resume`,
    /// `abort`, `rollback`), and for transitions the `input`, the `status`
    /// after it and the `actions` it issued.
    pub body: serde_json::Value,
}

impl ReleaseStreamEvent {
    /// The event's kind.
    pub fn kind(&self) -> &str {
        self.body["kind"].as_str().unwrap_or("event")
    }
}

/// The longest event line this client buffers (the server's events are
/// one JSON document each, well below it).
const MAX_EVENT_BYTES: usize = 4 << 20;

/// A release's server-sent events, read as they arrive.
#[derive(Debug)]
pub struct ReleaseEventStream {
    url: String,
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl ReleaseEventStream {
    /// The next event; `None` when the server has ended the stream.
    pub async fn next(&mut self) -> Result<Option<ReleaseStreamEvent>> {
        loop {
            // Events are separated by a blank line.
            let end = self
                .buffer
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| (p, p + 2));
            if let Some((at, skip)) = end {
                let block: Vec<u8> = self.buffer.drain(..skip).take(at).collect();
                if let Some(event) = self.parse(&block)? {
                    return Ok(Some(event));
                }
                continue;
            }
            if self.buffer.len() > MAX_EVENT_BYTES {
                return Err(self.unexpected("an event larger than 4 MiB".into()));
            }
            match self
                .response
                .chunk()
                .await
                .map_err(|e| ClientError::Transport {
                    url: self.url.clone(),
                    source: e,
                })? {
                Some(chunk) => self.buffer.extend(chunk.iter().filter(|b| **b != b'\r')),
                None => return Ok(None),
            }
        }
    }

    fn unexpected(&self, reason: String) -> ClientError {
        ClientError::Unexpected {
            url: self.url.clone(),
            status: 200,
            reason,
        }
    }

    /// The `data:` of one block as an event; `None` for keep-alive comments.
    fn parse(&self, block: &[u8]) -> Result<Option<ReleaseStreamEvent>> {
        let text = String::from_utf8_lossy(block);
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&data.join("\n"))
            .map(Some)
            .map_err(|e| self.unexpected(format!("an event that is not JSON: {e}")))
    }
}
