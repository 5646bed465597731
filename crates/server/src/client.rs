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
        let items: Items<Environment> = self
            .send(self.request(Method::GET, &["api", "v1", "environments"]))
            .await?;
        Ok(items.items)
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
        let items: Items<Target> = self
            .send(self.request(Method::GET, &["api", "v1", "targets"]))
            .await?;
        Ok(items.items)
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
        let items: Items<TokenRecord> = self
            .send(self.request(Method::GET, &["api", "v1", "tokens"]))
            .await?;
        Ok(items.items)
    }

    /// Revokes a token (admin).
    pub async fn revoke_token(&self, id: &str) -> Result<TokenRecord> {
        self.send(self.request(Method::DELETE, &["api", "v1", "tokens", id]))
            .await
    }
}
