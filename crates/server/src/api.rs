//! The HTTP API under `/api/v1`, plus `/healthz`, `/readyz` and `/metrics`.
//!
//! ```text
//!   request ─► observe (span, metrics) ─► route from ENDPOINTS ─► Caller (bearer token)
//!           ─► handler ─► access decision inside the store transaction ─► JSON | ApiError
//! ```
//!
//! [`ENDPOINTS`] is the single list of routes: the router is built from it
//! and so is the OpenAPI document, so neither can drift from the other.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use keelson_store::{
    AppFilter, AppPage, AppRecord, ApplyOutcome, AuditFilter, AuditPage, Environment, IssuedToken,
    NewEnvironment, NewTarget, NewToken, Revision, RevisionSummary, Role, Store, Target,
    TokenRecord,
};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::access::{self, Caller};
use crate::diff::{self, Change};
use crate::error::{ApiError, ErrorBody};
use crate::metrics::Metrics;
use crate::profile_input;

/// Largest request body accepted; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Page size when none is asked for.
pub const DEFAULT_PAGE: u32 = 100;
/// Largest page size.
pub const MAX_PAGE: u32 = 1000;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Request counters and latency histograms.
    pub metrics: Arc<Metrics>,
}

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed.
    Public,
    /// Any valid token.
    Reader,
    /// A member or admin token (members further limited per app).
    Writer,
    /// An admin token.
    Admin,
}

/// Produces a schema (a `$ref` into the document's components).
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// A path or query parameter.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// Its name.
    pub name: &'static str,
    /// `path` or `query`.
    pub location: &'static str,
    /// `string` or `integer`.
    pub kind: &'static str,
    /// Whether it must be given.
    pub required: bool,
    /// What it means.
    pub description: &'static str,
}

const fn path_param(name: &'static str, kind: &'static str, description: &'static str) -> Param {
    Param {
        name,
        location: "path",
        kind,
        required: true,
        description,
    }
}

const fn query_param(name: &'static str, kind: &'static str, description: &'static str) -> Param {
    Param {
        name,
        location: "query",
        kind,
        required: false,
        description,
    }
}

/// A documented response.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// What it means.
    pub description: &'static str,
    /// JSON body schema, if JSON.
    pub schema: Option<SchemaFn>,
}

/// One route: how it is served and how it is documented.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// HTTP method.
    pub method: Method,
    /// Path, with `{param}` segments.
    pub path: &'static str,
    /// OpenAPI operationId.
    pub operation_id: &'static str,
    /// One line.
    pub summary: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Path and query parameters.
    pub params: &'static [Param],
    /// Request body: content types and schema.
    pub request: Option<(&'static [&'static str], SchemaFn)>,
    /// Success responses (errors are documented for every endpoint).
    pub replies: &'static [Reply],
    /// The axum handler.
    pub handler: fn() -> MethodRouter<AppState>,
}

const NAME: Param = path_param("name", "string", "The app's name (metadata.name).");
const PAGE: [Param; 2] = [
    query_param("limit", "integer", "Page size, 1..=1000 (default 100)."),
    query_param("cursor", "string", "The previous page's nextCursor."),
];

const RELEASE_ID: Param = path_param("id", "string", "The release's id.");
const RELEASE_STEERED: &[Reply] = &[Reply {
    status: 200,
    description: "the release after the request; 409 (code release_state) when its state does not allow it",
    schema: Some(crate::releases::release_schema),
}];

/// Every route the server answers.
pub static ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: Method::GET,
        path: "/healthz",
        operation_id: "healthz",
        summary: "Liveness: the process serves HTTP.",
        access: Access::Public,
        params: &[],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "alive (text `ok`)",
            schema: None,
        }],
        handler: || get(healthz),
    },
    Endpoint {
        method: Method::GET,
        path: "/readyz",
        operation_id: "readyz",
        summary: "Readiness: the database answers.",
        access: Access::Public,
        params: &[],
        request: None,
        replies: &[
            Reply {
                status: 200,
                description: "ready",
                schema: Some(schema::<Readiness>),
            },
            Reply {
                status: 503,
                description: "the database does not answer",
                schema: Some(schema::<ErrorBody>),
            },
        ],
        handler: || get(readyz),
    },
    Endpoint {
        method: Method::GET,
        path: "/metrics",
        operation_id: "metrics",
        summary: "Prometheus metrics (text exposition format).",
        access: Access::Public,
        params: &[],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "metrics",
            schema: None,
        }],
        handler: || get(metrics),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/openapi.json",
        operation_id: "openapi",
        summary: "This API's OpenAPI 3 document.",
        access: Access::Public,
        params: &[],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "the document",
            schema: None,
        }],
        handler: || get(openapi),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/whoami",
        operation_id: "whoami",
        summary: "The caller as the server sees its token.",
        access: Access::Reader,
        params: &[],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "the caller",
            schema: Some(schema::<WhoAmI>),
        }],
        handler: || get(whoami),
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v1/apps",
        operation_id: "applyApp",
        summary: "Create or update an app by posting its profile (YAML or JSON). An identical profile makes no revision.",
        access: Access::Writer,
        params: &[query_param(
            "message",
            "string",
            "Why: recorded with the revision.",
        )],
        request: Some((
            &["application/yaml", "application/json"],
            schema::<keelson_core::profile::Profile>,
        )),
        replies: &[
            Reply {
                status: 201,
                description: "the app was created",
                schema: Some(schema::<ApplyOutcome>),
            },
            Reply {
                status: 200,
                description: "the app was updated (changed) or already equal (not changed)",
                schema: Some(schema::<ApplyOutcome>),
            },
        ],
        handler: || post(apply_app),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/apps",
        operation_id: "listApps",
        summary: "List apps by name, filtered and paged.",
        access: Access::Reader,
        params: &[
            query_param("team", "string", "Only this team's apps."),
            query_param("owner", "string", "Only apps this subject owns."),
            query_param(
                "label",
                "string",
                "Only apps with all these labels: `k=v,k2=v2`.",
            ),
            PAGE[0],
            PAGE[1],
        ],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "a page of apps",
            schema: Some(schema::<AppPage>),
        }],
        handler: || get(list_apps),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/apps/{name}",
        operation_id: "getApp",
        summary: "An app with its current revision, or revision N.",
        access: Access::Reader,
        params: &[
            NAME,
            query_param("revision", "integer", "Revision number (default: current)."),
        ],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "the app",
            schema: Some(schema::<AppRecord>),
        }],
        handler: || get(get_app),
    },
    Endpoint {
        method: Method::DELETE,
        path: "/api/v1/apps/{name}",
        operation_id: "deleteApp",
        summary: "Delete an app (soft: history and audit stay; applying it again restores it).",
        access: Access::Writer,
        params: &[NAME],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "deleted",
            schema: Some(schema::<keelson_store::AppHead>),
        }],
        handler: || delete(delete_app),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/apps/{name}/revisions",
        operation_id: "listRevisions",
        summary: "An app's revisions, newest first.",
        access: Access::Reader,
        params: &[NAME],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "the revisions",
            schema: Some(schema::<RevisionList>),
        }],
        handler: || get(list_revisions),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/apps/{name}/revisions/{revision}",
        operation_id: "getRevision",
        summary: "One revision with its profile.",
        access: Access::Reader,
        params: &[NAME, path_param("revision", "integer", "Revision number.")],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "the revision",
            schema: Some(schema::<Revision>),
        }],
        handler: || get(get_revision),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/apps/{name}/diff",
        operation_id: "diffRevisions",
        summary: "Field changes from revision `from` to revision `to`.",
        access: Access::Reader,
        params: &[
            NAME,
            Param {
                name: "from",
                location: "query",
                kind: "integer",
                required: true,
                description: "Older revision.",
            },
            Param {
                name: "to",
                location: "query",
                kind: "integer",
                required: true,
                description: "Newer revision.",
            },
        ],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "the changes",
            schema: Some(schema::<ProfileDiff>),
        }],
        handler: || get(diff_revisions),
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v1/apps/{name}/rollback",
        operation_id: "rollbackProfile",
        summary: "Make revision N's profile current again, as a new revision.",
        access: Access::Writer,
        params: &[NAME],
        request: Some((&["application/json"], schema::<RollbackRequest>)),
        replies: &[Reply {
            status: 200,
            description: "rolled back",
            schema: Some(schema::<ApplyOutcome>),
        }],
        handler: || post(rollback_profile),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/audit",
        operation_id: "listAudit",
        summary: "Audit events, newest first.",
        access: Access::Reader,
        params: &[
            query_param(
                "kind",
                "string",
                "Only this resource kind: app, environment, target, token.",
            ),
            query_param(
                "resource",
                "string",
                "Only this resource (e.g. an app's name).",
            ),
            query_param("actor", "string", "Only this actor."),
            query_param("limit", "integer", "Page size, 1..=1000 (default 100)."),
            query_param("cursor", "integer", "The previous page's nextCursor."),
        ],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "events",
            schema: Some(schema::<AuditPage>),
        }],
        handler: || get(list_audit),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/environments",
        operation_id: "listEnvironments",
        summary: "Registered environments.",
        access: Access::Reader,
        params: &[],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "environments",
            schema: Some(schema::<Items<Environment>>),
        }],
        handler: || get(list_environments),
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v1/environments",
        operation_id: "putEnvironment",
        summary: "Register or update an environment.",
        access: Access::Admin,
        params: &[],
        request: Some((&["application/json"], schema::<NewEnvironment>)),
        replies: &[Reply {
            status: 200,
            description: "stored",
            schema: Some(schema::<Environment>),
        }],
        handler: || post(put_environment),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/targets",
        operation_id: "listTargets",
        summary: "Registered targets (clusters and host groups).",
        access: Access::Reader,
        params: &[],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "targets",
            schema: Some(schema::<Items<Target>>),
        }],
        handler: || get(list_targets),
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v1/targets",
        operation_id: "putTarget",
        summary: "Register or update a target.",
        access: Access::Admin,
        params: &[],
        request: Some((&["application/json"], schema::<NewTarget>)),
        replies: &[Reply {
            status: 200,
            description: "stored",
            schema: Some(schema::<Target>),
        }],
        handler: || post(put_target),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/tokens",
        operation_id: "listTokens",
        summary: "All API tokens, without secrets.",
        access: Access::Admin,
        params: &[],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "tokens",
            schema: Some(schema::<Items<TokenRecord>>),
        }],
        handler: || get(list_tokens),
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v1/tokens",
        operation_id: "createToken",
        summary: "Create a token; its secret is in this response only.",
        access: Access::Admin,
        params: &[],
        request: Some((&["application/json"], schema::<NewToken>)),
        replies: &[Reply {
            status: 201,
            description: "created",
            schema: Some(schema::<IssuedToken>),
        }],
        handler: || post(create_token),
    },
    Endpoint {
        method: Method::DELETE,
        path: "/api/v1/tokens/{id}",
        operation_id: "revokeToken",
        summary: "Revoke a token at once.",
        access: Access::Admin,
        params: &[path_param("id", "string", "The token's id (tok_…).")],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "revoked",
            schema: Some(schema::<TokenRecord>),
        }],
        handler: || delete(revoke_token),
    },
    // Releases (crate::releases).
    Endpoint {
        method: Method::POST,
        path: "/api/v1/apps/{name}/releases",
        operation_id: "createRelease",
        summary: "Release a version of the app in an environment; a worker plans it over the running instances and runs it.",
        access: Access::Writer,
        params: &[NAME],
        request: Some((
            &["application/json"],
            schema::<crate::releases::ReleaseBody>,
        )),
        replies: &[Reply {
            status: 202,
            description: "accepted (status `planning`); 409 while another release of the app in that environment runs",
            schema: Some(crate::releases::release_schema),
        }],
        handler: || post(crate::releases::create_release),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/apps/{name}/releases",
        operation_id: "listReleases",
        summary: "The app's releases, newest first.",
        access: Access::Reader,
        params: &[
            NAME,
            query_param("env", "string", "Only releases in this environment."),
            query_param(
                "limit",
                "integer",
                "At most this many, 1..=100 (default 20).",
            ),
        ],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "the releases",
            schema: Some(crate::releases::release_list_schema),
        }],
        handler: || get(crate::releases::list_releases),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/apps/{name}/releases/{id}",
        operation_id: "getRelease",
        summary: "A release: its state and a summary of batches and instances by state and version.",
        access: Access::Reader,
        params: &[NAME, RELEASE_ID],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "the release",
            schema: Some(crate::releases::release_schema),
        }],
        handler: || get(crate::releases::get_release),
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v1/apps/{name}/releases/{id}/pause",
        operation_id: "pauseRelease",
        summary: "Pause a running release (409 with the reason when it cannot be paused).",
        access: Access::Writer,
        params: &[NAME, RELEASE_ID],
        request: None,
        replies: RELEASE_STEERED,
        handler: || post(crate::releases::pause_release),
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v1/apps/{name}/releases/{id}/resume",
        operation_id: "resumeRelease",
        summary: "Resume a paused release (409 with the reason when it is not paused).",
        access: Access::Writer,
        params: &[NAME, RELEASE_ID],
        request: None,
        replies: RELEASE_STEERED,
        handler: || post(crate::releases::resume_release),
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v1/apps/{name}/releases/{id}/abort",
        operation_id: "abortRelease",
        summary: "Abort a release: it stops where it is; its new instances leave traffic unless keepOnline.",
        access: Access::Writer,
        params: &[NAME, RELEASE_ID],
        request: Some((&["application/json"], schema::<crate::releases::AbortBody>)),
        replies: RELEASE_STEERED,
        handler: || post(crate::releases::abort_release),
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v1/apps/{name}/releases/{id}/rollback",
        operation_id: "rollbackRelease",
        summary: "Roll a release back to the previous version, batch by batch.",
        access: Access::Writer,
        params: &[NAME, RELEASE_ID],
        request: None,
        replies: RELEASE_STEERED,
        handler: || post(crate::releases::rollback_release),
    },
    Endpoint {
        method: Method::GET,
        path: "/api/v1/releases/{id}/events",
        operation_id: "releaseEvents",
        summary: "The release's events as server-sent events (id, event kind, JSON data), from the start or after Last-Event-ID; the stream ends after the release's last event.",
        access: Access::Reader,
        params: &[RELEASE_ID],
        request: None,
        replies: &[Reply {
            status: 200,
            description: "text/event-stream",
            schema: None,
        }],
        handler: || get(crate::releases::release_events),
    },
];

/// The whole HTTP service.
pub fn router(state: AppState) -> Router {
    // Endpoints sharing a path contribute their methods to one route.
    let mut router = Router::new();
    for endpoint in ENDPOINTS {
        router = router.route(endpoint.path, (endpoint.handler)());
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().clone();
    let span = tracing::info_span!("request", method = %method, route = %route, subject = tracing::field::Empty);
    let started = Instant::now();
    let in_flight = state.metrics.start();
    let response = next.run(request).instrument(span.clone()).await;
    drop(in_flight);
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state
        .metrics
        .observe(method.as_str(), &route, status, elapsed);
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "request handled"
        );
    });
    response
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
        })?;
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
        let token = state
            .store
            .authenticate(secret)
            .await?
            .ok_or_else(|| ApiError::unauthorized("invalid or revoked token"))?;
        tracing::Span::current().record("subject", token.token.subject.as_str());
        Ok(Caller::from(token))
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
}

/// Oversized bodies are read on (and dropped) up to this size, so the client
/// gets its 413 instead of a connection reset halfway through sending.
const DRAIN_LIMIT: usize = 16 * MAX_BODY_BYTES;

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
    )
}

/// The request body, at most [`MAX_BODY_BYTES`] of it.
async fn body_bytes(body: Body) -> Result<Bytes, ApiError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buffer = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("unreadable_body", format!("cannot read the body: {e}"))
        })?;
        total = total.saturating_add(chunk.len());
        if total <= MAX_BODY_BYTES {
            buffer.extend_from_slice(&chunk);
        } else if total > DRAIN_LIMIT {
            break;
        }
    }
    if total > MAX_BODY_BYTES {
        return Err(too_large());
    }
    Ok(Bytes::from(buffer))
}

async fn body_text(body: Body) -> Result<String, ApiError> {
    let bytes = body_bytes(body).await?;
    String::from_utf8(bytes.to_vec()).map_err(|e| {
        ApiError::bad_request("invalid_encoding", format!("the body is not UTF-8: {e}"))
    })
}

/// Decodes a JSON body, naming the field at fault: 400 for malformed JSON,
/// 422 for unknown fields and wrong types.
async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = body_bytes(body).await?;
    let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let error = ApiError::unprocessable("invalid_body", format!("{field}: {inner}"));
                if field == "." {
                    error
                } else {
                    error.with_field(field)
                }
            }
            _ => ApiError::bad_request(
                "malformed_json",
                format!("the body is not valid JSON: {inner}"),
            ),
        }
    })?;
    deserializer.end().map_err(|e| {
        ApiError::bad_request(
            "malformed_json",
            format!("trailing data after the JSON body: {e}"),
        )
    })?;
    Ok(value)
}

/// A list response.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "ItemsOf{T}")]
pub struct Items<T> {
    /// The items.
    pub items: Vec<T>,
}

/// `/readyz` body.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Readiness {
    /// `ready`.
    pub status: String,
    /// `sqlite` or `postgres`.
    pub database: String,
}

/// `/api/v1/whoami` body.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    /// The token's id.
    pub token_id: String,
    /// Its subject.
    pub subject: String,
    /// Its teams.
    pub teams: Vec<String>,
    /// Its role.
    pub role: Role,
}

/// An app's revisions.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RevisionList {
    /// The app.
    pub app: String,
    /// Newest first.
    pub items: Vec<RevisionSummary>,
}

/// The difference between two revisions.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfileDiff {
    /// The app.
    pub app: String,
    /// The older revision.
    pub from: i64,
    /// The newer revision.
    pub to: i64,
    /// Digest of `from`.
    pub from_digest: String,
    /// Digest of `to`.
    pub to_digest: String,
    /// Field changes, in path order.
    pub changes: Vec<Change>,
}

/// Body of a profile rollback.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The revision whose profile becomes current again.
    pub revision: i64,
    /// Why (default: "roll back to revision N").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyQuery {
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetAppQuery {
    revision: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListAppsQuery {
    team: Option<String>,
    owner: Option<String>,
    label: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffQuery {
    from: i64,
    to: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    kind: Option<String>,
    resource: Option<String>,
    actor: Option<String>,
    limit: Option<u32>,
    cursor: Option<i64>,
}

fn page_size(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(
            "invalid_query",
            format!("limit {n} is out of range 1..={MAX_PAGE}"),
        )
        .with_field("limit")),
    }
}

/// `k=v,k2=v2` into pairs.
fn parse_labels(text: &str) -> Result<Vec<(String, String)>, ApiError> {
    text.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| match part.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(ApiError::bad_request(
                "invalid_query",
                format!("label selector {part:?} is not key=value"),
            )
            .with_field("label")),
        })
        .collect()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Result<Json<Readiness>, ApiError> {
    match state.store.ping().await {
        Ok(()) => Ok(Json(Readiness {
            status: "ready".into(),
            database: serde_json::to_value(state.store.backend())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        })),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database does not answer",
            ))
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        token_id: caller.token_id,
        subject: caller.subject,
        teams: caller.teams,
        role: caller.role,
    })
}

async fn apply_app(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<ApplyQuery>, QueryRejection>,
    body: Body,
) -> Result<(StatusCode, Json<ApplyOutcome>), ApiError> {
    caller.require_writer().map_err(ApiError::forbidden)?;
    let q = query(q)?;
    let text = body_text(body).await?;
    let parsed = profile_input::parse(&text).map_err(|e| ApiError::invalid_profile(&e))?;
    let apply = parsed.to_apply(&text, &caller.subject, q.message, None);
    let proposed = parsed.proposed();
    let outcome = state
        .store
        .apply_profile(&apply, &|head| access::may_apply(&caller, proposed, head))
        .await?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(outcome)))
}

async fn list_apps(
    State(state): State<AppState>,
    _caller: Caller,
    q: Result<Query<ListAppsQuery>, QueryRejection>,
) -> Result<Json<AppPage>, ApiError> {
    let q = query(q)?;
    let filter = AppFilter {
        team: q.team,
        owner: q.owner,
        labels: q
            .label
            .as_deref()
            .map(parse_labels)
            .transpose()?
            .unwrap_or_default(),
        after: q.cursor,
        limit: page_size(q.limit)?,
    };
    Ok(Json(state.store.list_apps(&filter).await?))
}

fn app_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("app {name:?} not found"))
}

fn revision_not_found(name: &str, number: i64) -> ApiError {
    ApiError::not_found(format!("app {name:?} has no revision {number}"))
}

async fn get_app(
    State(state): State<AppState>,
    _caller: Caller,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<GetAppQuery>, QueryRejection>,
) -> Result<Json<AppRecord>, ApiError> {
    let name = path(p)?;
    let q = query(q)?;
    let mut record = state
        .store
        .get_app(&name)
        .await?
        .ok_or_else(|| app_not_found(&name))?;
    if let Some(number) = q.revision.filter(|n| *n != record.app.revision) {
        record.revision = state
            .store
            .get_revision(&name, number)
            .await?
            .ok_or_else(|| revision_not_found(&name, number))?;
    }
    Ok(Json(record))
}

async fn delete_app(
    State(state): State<AppState>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
) -> Result<Json<keelson_store::AppHead>, ApiError> {
    caller.require_writer().map_err(ApiError::forbidden)?;
    let name = path(p)?;
    let head = state
        .store
        .delete_app(&name, &caller.subject, &|head| match head {
            Some(head) => access::may_change(&caller, head),
            None => Err(format!("app {name:?} not found")),
        })
        .await?;
    Ok(Json(head))
}

async fn list_revisions(
    State(state): State<AppState>,
    _caller: Caller,
    p: Result<Path<String>, PathRejection>,
) -> Result<Json<RevisionList>, ApiError> {
    let name = path(p)?;
    let items = state
        .store
        .list_revisions(&name)
        .await?
        .ok_or_else(|| app_not_found(&name))?;
    Ok(Json(RevisionList { app: name, items }))
}

async fn get_revision(
    State(state): State<AppState>,
    _caller: Caller,
    p: Result<Path<(String, i64)>, PathRejection>,
) -> Result<Json<Revision>, ApiError> {
    let (name, number) = path(p)?;
    let revision = state
        .store
        .get_revision(&name, number)
        .await?
        .ok_or_else(|| revision_not_found(&name, number))?;
    Ok(Json(revision))
}

async fn diff_revisions(
    State(state): State<AppState>,
    _caller: Caller,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<DiffQuery>, QueryRejection>,
) -> Result<Json<ProfileDiff>, ApiError> {
    let name = path(p)?;
    let q = query(q)?;
    let from = state
        .store
        .get_revision(&name, q.from)
        .await?
        .ok_or_else(|| revision_not_found(&name, q.from))?;
    let to = state
        .store
        .get_revision(&name, q.to)
        .await?
        .ok_or_else(|| revision_not_found(&name, q.to))?;
    Ok(Json(ProfileDiff {
        app: name,
        from: q.from,
        to: q.to,
        changes: diff::diff(&from.profile, &to.profile),
        from_digest: from.summary.digest,
        to_digest: to.summary.digest,
    }))
}

async fn rollback_profile(
    State(state): State<AppState>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Json<ApplyOutcome>, ApiError> {
    caller.require_writer().map_err(ApiError::forbidden)?;
    let name = path(p)?;
    let request: RollbackRequest = json_body(body).await?;
    let target = state
        .store
        .get_revision(&name, request.revision)
        .await?
        .ok_or_else(|| revision_not_found(&name, request.revision))?;
    let parsed = profile_input::parse(&target.profile_text).map_err(|e| {
        let mut error = ApiError::invalid_profile(&e);
        error = ApiError::new(
            StatusCode::CONFLICT,
            "revision_no_longer_valid",
            format!(
                "revision {} does not validate under this server's rules: {}",
                request.revision,
                error.detail().message
            ),
        );
        error
    })?;
    let message = request
        .message
        .unwrap_or_else(|| format!("roll back to revision {}", request.revision));
    let apply = parsed.to_apply(
        &target.profile_text,
        &caller.subject,
        Some(message),
        Some(request.revision),
    );
    let proposed = parsed.proposed();
    let outcome = state
        .store
        .apply_profile(&apply, &|head| access::may_apply(&caller, proposed, head))
        .await?;
    Ok(Json(outcome))
}

async fn list_audit(
    State(state): State<AppState>,
    _caller: Caller,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let q = query(q)?;
    let filter = AuditFilter {
        resource_kind: q.kind,
        resource: q.resource,
        actor: q.actor,
        before: q.cursor,
        limit: page_size(q.limit)?,
    };
    Ok(Json(state.store.list_audit(&filter).await?))
}

async fn list_environments(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Items<Environment>>, ApiError> {
    Ok(Json(Items {
        items: state.store.list_environments().await?,
    }))
}

const TIERS: &[&str] = &["production", "staging", "test"];

fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_body",
            format!("{field}: {name:?} is not a DNS label (lowercase letters, digits and '-', at most 63 characters, starting with a letter)"),
        )
        .with_field(field))
    }
}

async fn put_environment(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Json<Environment>, ApiError> {
    caller.require_admin().map_err(ApiError::forbidden)?;
    let env: NewEnvironment = json_body(body).await?;
    check_name("name", &env.name)?;
    if !TIERS.contains(&env.tier.as_str()) {
        return Err(ApiError::unprocessable(
            "invalid_body",
            format!("tier: {:?} is not one of {}", env.tier, TIERS.join(", ")),
        )
        .with_field("tier"));
    }
    Ok(Json(
        state.store.put_environment(&env, &caller.subject).await?,
    ))
}

async fn list_targets(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Items<Target>>, ApiError> {
    Ok(Json(Items {
        items: state.store.list_targets().await?,
    }))
}

async fn put_target(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Json<Target>, ApiError> {
    caller.require_admin().map_err(ApiError::forbidden)?;
    let target: NewTarget = json_body(body).await?;
    check_name("name", &target.name)?;
    if !target.config.is_object() {
        return Err(
            ApiError::unprocessable("invalid_body", "config: must be an object")
                .with_field("config"),
        );
    }
    Ok(Json(
        state.store.put_target(&target, &caller.subject).await?,
    ))
}

async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Items<TokenRecord>>, ApiError> {
    caller.require_admin().map_err(ApiError::forbidden)?;
    Ok(Json(Items {
        items: state.store.list_tokens().await?,
    }))
}

async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<(StatusCode, Json<IssuedToken>), ApiError> {
    caller.require_admin().map_err(ApiError::forbidden)?;
    let token: NewToken = json_body(body).await?;
    if token.subject.trim().is_empty() {
        return Err(
            ApiError::unprocessable("invalid_body", "subject: must not be empty")
                .with_field("subject"),
        );
    }
    Ok((
        StatusCode::CREATED,
        Json(state.store.create_token(&token, &caller.subject).await?),
    ))
}

async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
) -> Result<Json<TokenRecord>, ApiError> {
    caller.require_admin().map_err(ApiError::forbidden)?;
    let id = path(p)?;
    Ok(Json(state.store.revoke_token(&id, &caller.subject).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_parse_or_name_the_bad_part() {
        assert_eq!(
            parse_labels("tier=web, env=prod").unwrap(),
            vec![
                ("tier".to_string(), "web".to_string()),
                ("env".to_string(), "prod".to_string())
            ]
        );
        let err = parse_labels("tier").unwrap_err();
        assert_eq!(err.detail().field.as_deref(), Some("label"));
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_size(None).unwrap(), DEFAULT_PAGE);
        assert!(page_size(Some(0)).is_err());
        assert!(page_size(Some(MAX_PAGE + 1)).is_err());
    }

    #[test]
    fn every_endpoint_path_and_method_is_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for e in ENDPOINTS {
            assert!(
                seen.insert((e.method.as_str(), e.path)),
                "{} {} twice",
                e.method,
                e.path
            );
        }
    }
}
