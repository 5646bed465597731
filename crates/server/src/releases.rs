//! The release API: asking for a release, watching it, and steering it.
//!
//! ```text
//!  POST /apps/{name}/releases ─► settings from the app's profile + overrides
//!        ─► keelson_release::submit_release (status `planning`) ─► a worker plans and runs it
//!  POST …/{id}/pause|resume|abort|rollback ─► keelson_release::request ─► 409 when the
//!        machine refuses it in the release's state (its reason is the message); a release
//!        still `planning` can only be aborted (it ends `aborted`, nothing ran)
//!  GET  /releases/{id}/events ─► SSE of the stored events, resumable with Last-Event-ID;
//!        `hook-output` events carry the lifecycle hooks' lines (instance, hook, line)
//!        and what was dropped, bounded by the engine
//! ```
//!
//! The server does not drive releases itself: the worker that claims one
//! (through its lease) plans it over the runtime and applies its steps.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use keelson_core::profile::{Batches, FailedInstances, Pause, Strategy};
use keelson_core::release::{Event, FailedInstancePolicy, ReleaseSettings, Version};
use keelson_release::{NewReleaseRequest, ReleaseView};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::access::{self, Caller};
use crate::api::{AppState, MAX_BODY_BYTES};
use crate::error::ApiError;

/// What `POST /api/v1/apps/{name}/releases` takes; everything but `env` and
/// `version` defaults to the profile's release settings for `env`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseBody {
    /// The environment (one the profile names).
    pub env: String,
    /// The version to release (an image tag, a build id).
    pub version: String,
    /// `in-place`, `rolling` or `dual-deployment`.
    #[serde(default)]
    pub strategy: Option<Strategy>,
    /// Number of batches.
    #[serde(default)]
    pub batches: Option<u32>,
    /// Instances per batch (instead of `batches`).
    #[serde(default)]
    pub batch_size: Option<u32>,
    /// The pause between batches: `manual` or a duration such as `30s`.
    #[serde(default)]
    pub pause: Option<String>,
    /// The failed-instance policy.
    #[serde(default)]
    pub failed_instances: Option<FailedInstances>,
    /// Instances at the end (default: as many as run now).
    #[serde(default)]
    pub replicas: Option<u32>,
}

/// What `POST …/abort` may take.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortBody {
    /// Leave the release's new instances in traffic.
    #[serde(default)]
    pub keep_online: bool,
}

/// Query of the release list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    env: Option<String>,
    limit: Option<u32>,
}

/// A release as JSON (the machine's state is documented in `keelson_core::release`).
pub(crate) fn release_schema(_: &mut SchemaGenerator) -> Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "A release: id, app, env, status, finished, version, worker, createdBy, createdAt, updatedAt, summary (batches and instances by state and version), state (the state machine), request and error (before planning)",
        "required": ["id", "app", "env", "status", "finished", "version"],
        "properties": {
            "id": { "type": "string" },
            "app": { "type": "string" },
            "env": { "type": "string" },
            "status": { "type": "string" },
            "finished": { "type": "boolean" },
            "version": { "type": "integer" },
        }
    })
}

/// A list of releases as JSON.
pub(crate) fn release_list_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = release_schema(generator);
    schemars::json_schema!({
        "type": "object",
        "required": ["items"],
        "properties": { "items": { "type": "array", "items": item } }
    })
}

fn engine_error(e: keelson_release::Error) -> ApiError {
    use keelson_release::Error as E;
    match e {
        E::Store(e) => e.into(),
        E::Rejected(why) => ApiError::new(StatusCode::CONFLICT, "release_state", why),
        E::Busy(why) => ApiError::new(StatusCode::CONFLICT, "busy", why),
        E::Plan(why) => ApiError::unprocessable("invalid_release", why),
        other => ApiError::internal(other),
    }
}

async fn body_json<T: serde::de::DeserializeOwned + Default>(
    body: Body,
    required: bool,
) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            )
        })?;
    if bytes.iter().all(u8::is_ascii_whitespace) && !required {
        return Ok(T::default());
    }
    let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
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
    })
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
}

/// The app's head, or 404; and whether `caller` may release it.
async fn may_release(state: &AppState, caller: &Caller, app: &str) -> Result<(), ApiError> {
    caller.require_writer().map_err(ApiError::forbidden)?;
    let head = state
        .store
        .app_head(app)
        .await?
        .filter(|h| !h.deleted)
        .ok_or_else(|| ApiError::not_found(format!("app {app:?} not found")))?;
    access::may_change(caller, &head).map_err(ApiError::forbidden)
}

/// The release `id` of app `app`, or 404.
async fn view_of(state: &AppState, app: &str, id: &str) -> Result<ReleaseView, ApiError> {
    let view = keelson_release::release_view(&state.store, id)
        .await
        .map_err(engine_error)?;
    if view.app != app {
        return Err(ApiError::not_found(format!(
            "release {id:?} of app {app:?} not found"
        )));
    }
    Ok(view)
}

/// The release settings of `app` in `env` (from its current profile) with
/// the body's overrides.
async fn settings_for(
    state: &AppState,
    app: &str,
    body: &ReleaseBody,
) -> Result<ReleaseSettings, ApiError> {
    let record = state
        .store
        .get_app(app)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("app {app:?} not found")))?;
    let profile = keelson_core::profile::parse(&record.revision.profile_text)
        .map_err(|_| ApiError::internal(format!("the stored profile of {app} does not parse")))?;
    let effective = profile.effective(&body.env).ok_or_else(|| {
        ApiError::unprocessable(
            "invalid_body",
            format!(
                "app {app:?} has no environment {:?}; its environments: {}",
                body.env,
                profile.environment_names().join(", ")
            ),
        )
        .with_field("env")
    })?;
    let mut settings = ReleaseSettings::of(&effective);
    if let Some(strategy) = body.strategy {
        settings.strategy = strategy;
    }
    match (body.batches, body.batch_size) {
        (Some(_), Some(_)) => {
            return Err(ApiError::unprocessable(
                "invalid_body",
                "give `batches` or `batchSize`, not both",
            )
            .with_field("batchSize"));
        }
        (Some(0), _) | (_, Some(0)) => {
            return Err(
                ApiError::unprocessable("invalid_body", "batches must be at least 1").with_field(
                    if body.batches.is_some() {
                        "batches"
                    } else {
                        "batchSize"
                    },
                ),
            );
        }
        (count, size) if count.is_some() || size.is_some() => {
            settings.batches = Some(Batches { count, size });
        }
        _ => {}
    }
    if let Some(pause) = &body.pause {
        settings.pause = Pause::parse(pause)
            .map_err(|e| ApiError::unprocessable("invalid_body", e).with_field("pause"))?;
    }
    if let Some(policy) = &body.failed_instances {
        settings.failed_instances = FailedInstancePolicy::of(Some(policy));
    }
    Ok(settings)
}

pub(crate) async fn create_release(
    State(state): State<AppState>,
    caller: Caller,
    p: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let app = path(p)?;
    let body: ReleaseBody = body_json(body, true).await?;
    may_release(&state, &caller, &app).await?;
    if body.version.trim().is_empty() {
        return Err(
            ApiError::unprocessable("invalid_body", "the version is empty").with_field("version"),
        );
    }
    let settings = settings_for(&state, &app, &body).await?;
    let running = state.store.releases_of(&app, Some(&body.env), 20).await?;
    if let Some(open) = running.iter().find(|r| !r.finished) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "release_running",
            format!(
                "release {} of {app} in {} is {}; abort it or wait until it ends",
                open.id, body.env, open.status
            ),
        ));
    }
    let record = keelson_release::submit_release(
        &state.store,
        &NewReleaseRequest {
            id: None,
            app: app.clone(),
            env: body.env.clone(),
            version: Version(body.version.clone()),
            desired: body.replicas,
            settings,
            actor: caller.subject.clone(),
        },
    )
    .await
    .map_err(engine_error)?;
    let view = view_of(&state, &app, &record.id).await?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

/// A page of releases.
#[derive(Debug, Serialize)]
pub(crate) struct ReleaseList {
    items: Vec<ReleaseView>,
}

pub(crate) async fn list_releases(
    State(state): State<AppState>,
    _caller: Caller,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ReleaseList>, ApiError> {
    let app = path(p)?;
    let Query(query) = q.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    let records = state
        .store
        .releases_of(&app, query.env.as_deref(), limit)
        .await?;
    let mut items = Vec::with_capacity(records.len());
    for record in records {
        items.push(
            keelson_release::release_view(&state.store, &record.id)
                .await
                .map_err(engine_error)?,
        );
    }
    Ok(Json(ReleaseList { items }))
}

pub(crate) async fn get_release(
    State(state): State<AppState>,
    _caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<ReleaseView>, ApiError> {
    let (app, id) = path(p)?;
    Ok(Json(view_of(&state, &app, &id).await?))
}

async fn steer(
    state: AppState,
    caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
    event: impl FnOnce(AbortBody) -> Event,
    body: Body,
) -> Result<Json<ReleaseView>, ApiError> {
    let (app, id) = path(p)?;
    let body: AbortBody = body_json(body, false).await?;
    may_release(&state, &caller, &app).await?;
    view_of(&state, &app, &id).await?;
    let view = keelson_release::request(&state.store, &id, event(body), &caller.subject)
        .await
        .map_err(engine_error)?;
    Ok(Json(view))
}

pub(crate) async fn pause_release(
    State(state): State<AppState>,
    caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Json<ReleaseView>, ApiError> {
    steer(state, caller, p, |_| Event::Pause, body).await
}

pub(crate) async fn resume_release(
    State(state): State<AppState>,
    caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Json<ReleaseView>, ApiError> {
    steer(state, caller, p, |_| Event::Resume, body).await
}

pub(crate) async fn abort_release(
    State(state): State<AppState>,
    caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Json<ReleaseView>, ApiError> {
    steer(
        state,
        caller,
        p,
        |b| Event::Abort {
            keep_online: b.keep_online,
        },
        body,
    )
    .await
}

pub(crate) async fn rollback_release(
    State(state): State<AppState>,
    caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Json<ReleaseView>, ApiError> {
    steer(state, caller, p, |_| Event::Rollback, body).await
}

/// How often the event stream looks for events it was not told of (the
/// store pushes changes; a notification can be missed).
const EVENT_POLL: Duration = Duration::from_secs(1);

/// Events per read.
const EVENT_PAGE: u32 = 200;

pub(crate) async fn release_events(
    State(state): State<AppState>,
    _caller: Caller,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = path(p)?;
    // 404 before the stream starts.
    state.store.release(&id).await?;
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_header",
                    "Last-Event-ID must be an event id (an integer)",
                )
            })?,
    };
    struct Cursor {
        changes: tokio::sync::broadcast::Receiver<keelson_store::ReleaseChange>,
        store: keelson_store::Store,
        id: String,
        after: i64,
        buffered: std::collections::VecDeque<keelson_store::ReleaseEvent>,
        done: bool,
    }
    let cursor = Cursor {
        changes: state.store.release_changes(),
        store: state.store.clone(),
        id,
        after,
        buffered: Default::default(),
        done: false,
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(event) = c.buffered.pop_front() {
                c.after = event.id;
                let kind = event.body["kind"].as_str().unwrap_or("event").to_string();
                let sse = SseEvent::default()
                    .id(event.id.to_string())
                    .event(kind)
                    .data(
                        serde_json::json!({"id": event.id, "at": event.at, "body": event.body})
                            .to_string(),
                    );
                return Some((Ok::<_, Infallible>(sse), c));
            }
            if c.done {
                return None;
            }
            // Read whether it has ended before reading events, so that the
            // last events are never missed.
            let finished = match c.store.release(&c.id).await {
                Ok(record) => record.finished,
                Err(e) => {
                    tracing::warn!(error = %e, "release event stream stopped");
                    return None;
                }
            };
            match c.store.release_events(&c.id, c.after, EVENT_PAGE).await {
                Ok(events) => {
                    let full = events.len() as u32 == EVENT_PAGE;
                    c.buffered.extend(events);
                    if finished && !full {
                        c.done = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "release event stream stopped");
                    return None;
                }
            }
            if c.buffered.is_empty() && !c.done {
                // Woken by the release's next change; the poll covers
                // missed notifications.
                tokio::select! {
                    () = tokio::time::sleep(EVENT_POLL) => {}
                    () = keelson_store::next_release_change(&mut c.changes, |change| change.id == c.id) => {}
                }
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
