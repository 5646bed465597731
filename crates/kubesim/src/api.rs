//! The HTTP front: routing of Kubernetes REST paths, discovery documents,
//! JSON and Table responses, chunked watch streams, pod logs and eviction,
//! plus the `/kubesim/…` control endpoints (request counts, faults).
//!
//! ```text
//!  request ─► route (group, version, namespace, plural, name, subresource)
//!          ─► count (verb, resource, namespace) ─► faults (latency, status)
//!          ─► machinery call ─► JSON | Table | watch lines
//! ```

use crate::control::{Fault, Faults, Injection, Metrics, Verb};
use crate::error::ApiError;
use crate::logs::Logs;
use crate::machinery::{
    DeleteOptions, ListOptions, Machinery, PatchKind, Propagation, Sub, WriteOptions,
};
use crate::resources::{self, RESOURCES, ResourceId, ResourceType, ids};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{EventKind, Obj};
use crate::table;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Everything the HTTP handlers share.
pub struct Shared {
    /// The machinery.
    pub machinery: Arc<Machinery>,
    /// Request counters.
    pub metrics: Arc<Metrics>,
    /// Fault rules.
    pub faults: Arc<Faults>,
    /// Pod logs.
    pub logs: Arc<Logs>,
    /// How often watches with `allowWatchBookmarks` get a bookmark.
    pub bookmark_interval: Duration,
    /// Ends watch streams at shutdown.
    pub shutdown: CancellationToken,
}

/// The router serving everything.
pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

fn json_response(code: u16, v: &Value) -> Response {
    bytes_response(code, serde_json::to_vec(v).unwrap_or_default())
}

fn bytes_response(code: u16, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response {
    let mut status = e.status();
    // The machinery's retry marker is not for clients.
    if let Some(d) = status.get_mut("details").and_then(Value::as_object_mut) {
        d.remove("internal");
    }
    let mut r = json_response(e.code, &status);
    if let Some(s) = e.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// Decodes `application/x-www-form-urlencoded` text.
fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (url_decode(k), url_decode(v)),
            None => (url_decode(p), String::new()),
        })
        .collect()
}

fn truthy(q: &HashMap<String, String>, k: &str) -> bool {
    q.get(k).is_some_and(|v| v == "true" || v == "1")
}

/// A parsed resource path.
struct Target {
    res: ResourceId,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn route(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let find = |plural: &str| resources::find(group, version, plural);
    if let ["namespaces", ns, plural, tail @ ..] = rest
        && let Some(res) = find(plural).filter(|r| RESOURCES[*r].namespaced)
    {
        return match tail {
            [] => Some(Target {
                res,
                ns: Some(ns.to_string()),
                name: None,
                sub: None,
            }),
            [name] => Some(Target {
                res,
                ns: Some(ns.to_string()),
                name: Some(name.to_string()),
                sub: None,
            }),
            [name, sub] => Some(Target {
                res,
                ns: Some(ns.to_string()),
                name: Some(name.to_string()),
                sub: Some(sub.to_string()),
            }),
            _ => None,
        };
    }
    let (plural, tail) = rest.split_first()?;
    let res = find(plural)?;
    match tail {
        [] => Some(Target {
            res,
            ns: None,
            name: None,
            sub: None,
        }),
        [name] if !RESOURCES[res].namespaced => Some(Target {
            res,
            ns: None,
            name: Some(name.to_string()),
            sub: None,
        }),
        [name, sub] if !RESOURCES[res].namespaced => Some(Target {
            res,
            ns: None,
            name: Some(name.to_string()),
            sub: Some(sub.to_string()),
        }),
        _ => None,
    }
}

async fn handle(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/');
    let segs: Vec<&str> = path.split('/').filter(|x| !x.is_empty()).collect();
    let q = parse_query(&uri);
    match segs.as_slice() {
        [] => json_response(
            200,
            &json!({"paths": ["/api", "/api/v1", "/apis", "/version", "/kubesim"]}),
        ),
        ["version"] => json_response(200, &version()),
        ["healthz"] | ["readyz"] | ["livez"] => bytes_response(200, b"ok".to_vec()),
        ["api"] => json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("")}]}),
        ),
        ["apis"] => json_response(200, &group_list()),
        ["api", "v1"] => json_response(200, &resource_list("", "v1")),
        ["apis", g] => match resources::groups().iter().find(|(x, _)| x == g) {
            Some((g, v)) => json_response(200, &api_group(g, v)),
            None => error_response(&ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        },
        ["apis", g, v] if resources::groups().iter().any(|(x, y)| x == g && y == v) => {
            json_response(200, &resource_list(g, v))
        }
        ["openapi", "v3"] => json_response(200, &openapi_root()),
        ["openapi", "v3", "api", "v1"] => json_response(200, &openapi_gv("", "v1")),
        ["openapi", "v3", "apis", g, v] => json_response(200, &openapi_gv(g, v)),
        ["kubesim", rest @ ..] => control(&s, &method, rest, &body).await,
        ["api", "v1", rest @ ..] => {
            resource_request(&s, &method, "", "v1", rest, &q, &headers, &body).await
        }
        ["apis", g, v, rest @ ..] => {
            resource_request(&s, &method, g, v, rest, &q, &headers, &body).await
        }
        _ => error_response(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
    }
}

/// The OpenAPI v3 index. kubectl reads it to learn that the server
/// validates fields itself (`fieldValidation`), so it needs no schemas.
fn openapi_root() -> Value {
    let mut paths = serde_json::Map::new();
    paths.insert(
        "api/v1".into(),
        json!({"serverRelativeURL": "/openapi/v3/api/v1?hash=kubesim1"}),
    );
    for (g, v) in resources::groups() {
        paths.insert(
            format!("apis/{g}/{v}"),
            json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/{v}?hash=kubesim1")}),
        );
    }
    json!({"paths": paths})
}

/// A minimal OpenAPI v3 document for one group/version: the PATCH
/// operation of every kind with its `fieldValidation` parameter.
fn openapi_gv(group: &str, version: &str) -> Value {
    let mut paths = serde_json::Map::new();
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let path = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{prefix}/{}/{{name}}", r.plural)
        };
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let params = json!([
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        ]);
        let op = |action: &str| {
            json!({"operationId": format!("{action}{}", r.kind), "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk, "parameters": params,
                "responses": {"200": {"description": "OK"}}})
        };
        paths.insert(path, json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}));
    }
    json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.30.0-kubesim"},
        "paths": paths, "components": {"schemas": {}}})
}

fn version() -> Value {
    json!({"major": "1", "minor": "30", "gitVersion": "v1.30.0-kubesim", "gitCommit": "kubesim",
        "gitTreeState": "clean", "buildDate": "2024-01-01T00:00:00Z", "goVersion": "go1.22",
        "compiler": "gc", "platform": "linux/amd64"})
}

fn group_list() -> Value {
    let groups: Vec<Value> = resources::groups()
        .into_iter()
        .map(|(g, v)| api_group(g, v))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn api_group(g: &str, v: &str) -> Value {
    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv.clone()], "preferredVersion": gv})
}

fn resource_list(group: &str, version: &str) -> Value {
    let verbs = json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ]);
    let mut out = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut e = json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": verbs});
        if !r.short_names.is_empty() {
            e["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            e["categories"] = json!(r.categories);
        }
        out.push(e);
        let sub = |name: &str, kind: &str, verbs: Value| {
            json!({"name": format!("{}/{name}", r.plural), "singularName": "", "namespaced": r.namespaced,
                "kind": kind, "verbs": verbs})
        };
        if r.status {
            out.push(sub("status", r.kind, json!(["get", "patch", "update"])));
        }
        if r.scale {
            let mut s = sub("scale", "Scale", json!(["get", "patch", "update"]));
            s["group"] = json!("autoscaling");
            s["version"] = json!("v1");
            out.push(s);
        }
        if r.kind == "Pod" {
            out.push(sub("log", "Pod", json!(["get"])));
            let mut e = sub("eviction", "Eviction", json!(["create"]));
            e["group"] = json!("policy");
            e["version"] = json!("v1");
            out.push(e);
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out})
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn field_manager(q: &HashMap<String, String>, headers: &HeaderMap) -> Option<String> {
    q.get("fieldManager")
        .filter(|m| !m.is_empty())
        .cloned()
        .or_else(|| {
            // As upstream: the user agent up to the first '/'.
            headers
                .get(header::USER_AGENT)
                .and_then(|u| u.to_str().ok())
                .map(|u| u.split('/').next().unwrap_or(u).to_string())
                .filter(|u| !u.is_empty())
        })
}

fn list_options(q: &HashMap<String, String>) -> Result<ListOptions, ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(ListOptions {
        labels,
        fields,
        limit: q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0),
        continue_token: q.get("continue").filter(|c| !c.is_empty()).cloned(),
        resource_version: q.get("resourceVersion").cloned(),
        resource_version_match: q.get("resourceVersionMatch").cloned(),
    })
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not JSON (kubesim reads JSON bodies only, YAML is not supported): {e}"
        ))
    })
}

fn delete_options(q: &HashMap<String, String>, body: &Value) -> Result<DeleteOptions, ApiError> {
    let prop = q
        .get("propagationPolicy")
        .cloned()
        .or_else(|| {
            body.get("propagationPolicy")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .or_else(|| {
            body.get("orphanDependents")
                .and_then(Value::as_bool)
                .map(|o| {
                    if o {
                        "Orphan".into()
                    } else {
                        "Background".into()
                    }
                })
        });
    let propagation = match prop.as_deref() {
        None | Some("") => None,
        Some("Background") => Some(Propagation::Background),
        Some("Foreground") => Some(Propagation::Foreground),
        Some("Orphan") => Some(Propagation::Orphan),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: {other:?}: supported values: \"Background\", \"Foreground\", \"Orphan\""
            )));
        }
    };
    Ok(DeleteOptions {
        grace_period: q
            .get("gracePeriodSeconds")
            .and_then(|g| g.parse().ok())
            .or_else(|| body.get("gracePeriodSeconds").and_then(Value::as_i64)),
        propagation,
        uid: body
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from),
        resource_version: body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from),
        dry_run: q.contains_key("dryRun")
            || body
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty()),
    })
}

/// Writes a list response without re-parsing the stored objects.
fn list_bytes(rt: &ResourceType, page: &crate::machinery::ListPage) -> Vec<u8> {
    let mut meta = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(c) = &page.continue_token {
        meta["continue"] = json!(c);
    }
    if let Some(r) = page.remaining {
        meta["remainingItemCount"] = json!(r);
    }
    let mut out = Vec::with_capacity(page.items.len() * 4096 + 256);
    out.extend_from_slice(
        format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{},\"items\":[",
            rt.kind,
            rt.api_version(),
            meta
        )
        .as_bytes(),
    );
    for (i, o) in page.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&o.json());
    }
    out.extend_from_slice(b"]}");
    out
}

#[allow(clippy::too_many_arguments)]
async fn resource_request(
    s: &Arc<Shared>,
    method: &Method,
    group: &str,
    version: &str,
    rest: &[&str],
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let Some(t) = route(group, version, rest) else {
        return error_response(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let rt = &RESOURCES[t.res];
    let verb = match (method.as_str(), &t.name) {
        ("GET", None) if truthy(q, "watch") => Verb::Watch,
        ("GET", None) => Verb::List,
        ("GET", Some(_)) => Verb::Get,
        ("POST", _) => Verb::Create,
        ("PUT", _) => Verb::Update,
        ("PATCH", _) => Verb::Patch,
        ("DELETE", None) => Verb::DeleteCollection,
        ("DELETE", Some(_)) => Verb::Delete,
        _ => {
            return error_response(&ApiError::new(
                405,
                "MethodNotAllowed",
                "method not allowed",
            ));
        }
    };
    let resource = match &t.sub {
        Some(sub) => format!("{}/{sub}", rt.plural),
        None => rt.plural.to_string(),
    };
    s.metrics.record(verb, &resource, t.ns.as_deref());
    let d = s.faults.decide(verb, &resource);
    if !d.latency.is_zero() {
        tokio::time::sleep(d.latency).await;
    }
    if let Some(code) = d.status {
        return error_response(&injected(code));
    }
    match serve(s, verb, &t, q, headers, body).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

fn injected(code: u16) -> ApiError {
    let (reason, msg) = match code {
        429 => (
            "TooManyRequests",
            "the server has received too many requests and has asked us to try again later",
        ),
        500 => (
            "InternalError",
            "an error on the server (injected) has prevented the request from succeeding",
        ),
        503 => (
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ),
        504 => (
            "Timeout",
            "the server was unable to return a response in the time allotted",
        ),
        409 => ("Conflict", "injected conflict"),
        404 => (
            "NotFound",
            "the server could not find the requested resource",
        ),
        _ => ("InternalError", "injected error"),
    };
    let mut e = ApiError::new(code, reason, msg);
    if code == 429 || code == 503 {
        e.retry_after = Some(1);
    }
    e
}

async fn serve(
    s: &Arc<Shared>,
    verb: Verb,
    t: &Target,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let m = &s.machinery;
    let rt = &RESOURCES[t.res];
    let ns = t.ns.as_deref();
    let sub = match t.sub.as_deref() {
        None => Sub::Main,
        Some("status") if rt.status => Sub::Status,
        Some("scale") if rt.scale => Sub::Scale,
        Some("log") if t.res == ids::PODS && verb == Verb::Get => {
            return pod_log(s, ns.unwrap_or(""), t.name.as_deref().unwrap_or(""), q).await;
        }
        Some("eviction") if t.res == ids::PODS && verb == Verb::Create => {
            return evict(
                s,
                ns.unwrap_or(""),
                t.name.as_deref().unwrap_or(""),
                &parse_body(body)?,
            );
        }
        Some(other) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!(
                    "the server could not find the requested resource ({}/{other})",
                    rt.plural
                ),
            ));
        }
    };
    let include = q
        .get("includeObject")
        .map(String::as_str)
        .unwrap_or("Metadata");
    let write = WriteOptions {
        field_manager: field_manager(q, headers),
        force: truthy(q, "force"),
        dry_run: q.contains_key("dryRun"),
    };
    let name = t.name.as_deref().unwrap_or("");
    let one = |v: Value, code: u16| -> Response {
        if wants_table(headers) && sub == Sub::Main {
            let rv = v
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            json_response(code, &table::table(rt, &[v], &rv, None, include))
        } else {
            json_response(code, &v)
        }
    };
    Ok(match verb {
        Verb::Get => match sub {
            Sub::Scale => json_response(200, &m.get_scale(t.res, ns, name)?),
            _ => one(m.get(t.res, ns, name)?, 200),
        },
        Verb::List => {
            let page = m.list(t.res, ns, &list_options(q)?)?;
            if wants_table(headers) {
                let objs: Vec<Value> = page.items.iter().map(|o| o.value()).collect();
                json_response(
                    200,
                    &table::table(
                        rt,
                        &objs,
                        &page.resource_version.to_string(),
                        page.continue_token.as_deref(),
                        include,
                    ),
                )
            } else {
                bytes_response(200, list_bytes(rt, &page))
            }
        }
        Verb::Watch => watch(s, t.res, t.ns.clone(), q, wants_table(headers))?,
        Verb::Create => {
            if t.name.is_some() {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "POST is not allowed on a named object",
                ));
            }
            one(m.create(t.res, ns, parse_body(body)?, &write)?, 201)
        }
        Verb::Update => one(
            m.update(t.res, ns, name, parse_body(body)?, sub, &write)?,
            200,
        ),
        Verb::Patch => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or("");
            let kind = if ct.starts_with("application/merge-patch+json") {
                PatchKind::Merge
            } else if ct.starts_with("application/json-patch+json") {
                PatchKind::Json
            } else if ct.starts_with("application/strategic-merge-patch+json") {
                PatchKind::Strategic
            } else if ct.starts_with("application/apply-patch+yaml")
                || ct.starts_with("application/apply-patch+json")
            {
                PatchKind::Apply
            } else {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"
                    ),
                ));
            };
            let created = kind == PatchKind::Apply && m.get_raw(t.res, ns, name).is_err();
            let v = m.patch(t.res, ns, name, kind, &parse_body(body)?, sub, &write)?;
            one(v, if created { 201 } else { 200 })
        }
        Verb::Delete => {
            let opts = delete_options(q, &parse_body(body)?)?;
            one(m.delete(t.res, ns, name, &opts)?, 200)
        }
        Verb::DeleteCollection => {
            let opts = delete_options(q, &parse_body(body)?)?;
            let items = m.delete_collection(t.res, ns, &list_options(q)?, &opts)?;
            json_response(
                200,
                &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
                    "metadata": {"resourceVersion": m.store().current_rv().to_string()}, "items": items}),
            )
        }
    })
}

async fn pod_log(
    s: &Arc<Shared>,
    ns: &str,
    name: &str,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let pod = s.machinery.get(ids::PODS, Some(ns), name)?;
    let containers: Vec<String> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    let container = match q.get("container").filter(|c| !c.is_empty()) {
        Some(c) => {
            let known = containers.contains(c)
                || pod
                    .pointer("/spec/initContainers")
                    .and_then(Value::as_array)
                    .is_some_and(|ics| ics.iter().any(|i| i["name"] == json!(c)));
            if !known {
                return Err(ApiError::bad_request(format!(
                    "container {c} is not valid for pod {name}"
                )));
            }
            c.clone()
        }
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            )));
        }
    };
    let mut text = s.logs.read(ns, name, &container, 0);
    let mut offset = text.len();
    if let Some(n) = q.get("tailLines").and_then(|n| n.parse::<usize>().ok()) {
        let lines: Vec<&str> = text.lines().collect();
        let keep = lines.len().saturating_sub(n);
        text = lines[keep..].iter().map(|l| format!("{l}\n")).collect();
    }
    let mut r = if !truthy(q, "follow") {
        Response::new(Body::from(text))
    } else {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
        let logs = s.logs.clone();
        let machinery = s.machinery.clone();
        let shutdown = s.shutdown.clone();
        let uid = pod
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let (ns, name) = (ns.to_string(), name.to_string());
        tokio::spawn(async move {
            let mut changed = logs.subscribe();
            let mut pods = machinery.store().subscribe();
            if tx.send(Ok(Bytes::from(text))).await.is_err() {
                return;
            }
            loop {
                let more = logs.read(&ns, &name, &container, offset);
                if !more.is_empty() {
                    offset += more.len();
                    if tx.send(Ok(Bytes::from(more))).await.is_err() {
                        return;
                    }
                }
                let alive = machinery
                    .get_raw(ids::PODS, Some(&ns), &name)
                    .is_ok_and(|o| *o.uid == *uid);
                if !alive {
                    return;
                }
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = pods.changed() => {}
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                }
            }
        });
        Response::new(Body::from_stream(receiver_stream(rx)))
    };
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(r)
}

fn receiver_stream(
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

/// `pods/{name}/eviction`: deletes the pod unless a disruption budget
/// forbids it, as the eviction subresource does.
fn evict(s: &Arc<Shared>, ns: &str, name: &str, body: &Value) -> Result<Response, ApiError> {
    let m = &s.machinery;
    let pod = m.get(ids::PODS, Some(ns), name)?;
    let phase = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending");
    let ignore_pdb = matches!(phase, "Succeeded" | "Failed" | "Pending")
        || pod.pointer("/metadata/deletionTimestamp").is_some();
    let opts = body
        .get("deleteOptions")
        .map(|d| delete_options(&HashMap::new(), d))
        .transpose()?
        .unwrap_or_default();
    if !ignore_pdb {
        let labels = pod.pointer("/metadata/labels").and_then(Value::as_object);
        let page = m.list(ids::PDBS, Some(ns), &ListOptions::default())?;
        let pdbs: Vec<Value> = page
            .items
            .iter()
            .map(|o| o.value())
            .filter(|p| {
                p.pointer("/spec/selector")
                    .is_some_and(|sel| LabelSelector::from_json(sel).matches_map(labels))
            })
            .collect();
        if pdbs.len() > 1 {
            return Err(ApiError::new(
                500,
                "InternalError",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
        if let Some(pdb) = pdbs.into_iter().next() {
            let pdb_name = pdb
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let generation = pdb
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let observed = pdb
                .pointer("/status/observedGeneration")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let allowed = pdb
                .pointer("/status/disruptionsAllowed")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if observed < generation || allowed <= 0 {
                let mut e = ApiError::new(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                );
                e.details = Some(json!({"causes": [{"reason": "DisruptionBudget",
                    "message": format!("The disruption budget {pdb_name} needs {} healthy pods and has {} currently",
                        pdb.pointer("/status/desiredHealthy").and_then(Value::as_i64).unwrap_or(0),
                        pdb.pointer("/status/currentHealthy").and_then(Value::as_i64).unwrap_or(0))}]}));
                return Err(e);
            }
            let mut status = pdb.get("status").cloned().unwrap_or(json!({}));
            status["disruptionsAllowed"] = json!(allowed - 1);
            status["disruptedPods"][name] = json!(crate::util::now_rfc3339());
            m.patch(
                ids::PDBS,
                Some(ns),
                &pdb_name,
                PatchKind::Merge,
                &json!({"metadata": {"resourceVersion": pdb["metadata"]["resourceVersion"]}, "status": status}),
                Sub::Status,
                &WriteOptions { field_manager: Some("kube-apiserver".into()), ..Default::default() },
            )?;
        }
    }
    m.delete(ids::PODS, Some(ns), name, &opts)?;
    Ok(json_response(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

fn status_expired(e: &crate::store::Expired) -> Value {
    ApiError::expired(e.to_string()).status()
}

fn event_line(kind: &str, obj: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(obj.len() + 32);
    v.extend_from_slice(b"{\"type\":\"");
    v.extend_from_slice(kind.as_bytes());
    v.extend_from_slice(b"\",\"object\":");
    v.extend_from_slice(obj);
    v.extend_from_slice(b"}\n");
    Bytes::from(v)
}

struct WatchFilter {
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, o: &Obj) -> bool {
        self.ns.as_deref().is_none_or(|n| o.namespace() == n)
            && self.labels.matches(o)
            && self.fields.matches(o)
    }
}

/// Starts a watch: a chunked stream of JSON lines.
fn watch(
    s: &Arc<Shared>,
    res: ResourceId,
    ns: Option<String>,
    q: &HashMap<String, String>,
    as_table: bool,
) -> Result<Response, ApiError> {
    let opts = list_options(q)?;
    let store = s.machinery.store().clone();
    let rt = &RESOURCES[res];
    let filter = WatchFilter {
        ns: ns.clone(),
        labels: opts.labels.clone(),
        fields: opts.fields.clone(),
    };
    let bookmarks = truthy(q, "allowWatchBookmarks");
    let initial_events = truthy(q, "sendInitialEvents");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let rv = opts.resource_version.clone().unwrap_or_default();
    let start: Option<u64> = match rv.as_str() {
        "" | "0" => None,
        r => Some(
            r.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {r:?}")))?,
        ),
    };
    if let Some(n) = start
        && n > store.current_rv()
    {
        return Err(ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {n}"),
        ));
    }
    let include = q
        .get("includeObject")
        .cloned()
        .unwrap_or_else(|| "Metadata".into());
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let shutdown = s.shutdown.clone();
    let mut drops = s.faults.drops();
    // Holding the rules keeps the drop channel open for the task's life.
    let faults = s.faults.clone();
    let interval = s.bookmark_interval;
    tokio::spawn(async move {
        let _faults = faults;
        let encode = |kind: &str, o: &Obj| -> Bytes {
            if as_table {
                let v = o.value();
                let rv = v
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let t = table::table(rt, &[v], &rv, None, &include);
                event_line(kind, &serde_json::to_vec(&t).unwrap_or_default())
            } else {
                event_line(kind, &o.json())
            }
        };
        let bookmark = |rv: u64, initial_end: bool| -> Bytes {
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            let o = json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta});
            event_line("BOOKMARK", &serde_json::to_vec(&o).unwrap_or_default())
        };
        let mut notify = store.subscribe();
        let mut cursor = match start {
            Some(n) if !initial_events => n,
            _ => {
                let mut initial = Vec::new();
                let snap = store.scan(res, filter.ns.as_deref(), None, None, |o| {
                    if filter.matches(o) {
                        initial.push(o.clone());
                    }
                    true
                });
                let snap = snap.unwrap_or_else(|_| store.current_rv());
                for o in &initial {
                    if tx.send(Ok(encode("ADDED", o))).await.is_err() {
                        return;
                    }
                }
                if initial_events && bookmarks && tx.send(Ok(bookmark(snap, true))).await.is_err() {
                    return;
                }
                snap
            }
        };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        let mut events = Vec::new();
        loop {
            events.clear();
            match store.events_after(res, cursor, &mut events) {
                Err(e) => {
                    let _ = tx
                        .send(Ok(event_line(
                            "ERROR",
                            &serde_json::to_vec(&status_expired(&e)).unwrap_or_default(),
                        )))
                        .await;
                    return;
                }
                Ok(now) => {
                    for e in &events {
                        let new_m = filter.matches(&e.obj);
                        let old_m = e.prev.as_ref().is_some_and(|p| filter.matches(p));
                        let kind = match (e.kind, old_m, new_m) {
                            (EventKind::Added, _, true) => "ADDED",
                            (EventKind::Modified, true, true) => "MODIFIED",
                            (EventKind::Modified, false, true) => "ADDED",
                            (EventKind::Modified, true, false) => "DELETED",
                            (EventKind::Deleted, _, true) => "DELETED",
                            _ => continue,
                        };
                        if tx.send(Ok(encode(kind, &e.obj))).await.is_err() {
                            return;
                        }
                    }
                    cursor = now;
                }
            }
            tokio::select! {
                _ = notify.changed() => {}
                _ = tick.tick(), if bookmarks => {
                    if tx.send(Ok(bookmark(cursor, false))).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
                d = drops.recv() => {
                    if let Ok(r) = d && r == rt.plural {
                        let _ = tx.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "watch dropped by fault injection"))).await;
                        return;
                    }
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(receiver_stream(rx)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// `/kubesim/…`: counters, faults and compaction for out-of-process tests.
async fn control(s: &Arc<Shared>, method: &Method, rest: &[&str], body: &Bytes) -> Response {
    match (method.as_str(), rest) {
        ("GET", ["metrics"]) => json_response(200, &json!({"requests": s.metrics.snapshot()})),
        ("DELETE", ["metrics"]) => {
            s.metrics.reset();
            json_response(200, &json!({}))
        }
        ("POST", ["faults"]) => {
            let v: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return error_response(&ApiError::bad_request(e.to_string())),
            };
            match fault_from_json(&v) {
                Ok(rule) => json_response(200, &json!({"id": s.faults.inject(rule)})),
                Err(e) => error_response(&e),
            }
        }
        ("DELETE", ["faults"]) => {
            s.faults.clear();
            json_response(200, &json!({}))
        }
        ("DELETE", ["faults", id]) => {
            s.faults.remove(id.parse().unwrap_or(0));
            json_response(200, &json!({}))
        }
        ("POST", ["compact"]) => {
            s.machinery.store().compact();
            json_response(
                200,
                &json!({"resourceVersion": s.machinery.store().current_rv().to_string()}),
            )
        }
        ("POST", ["logs", ns, pod, container]) => {
            s.logs
                .append(ns, pod, container, &String::from_utf8_lossy(body));
            json_response(200, &json!({}))
        }
        _ => error_response(&ApiError::new(
            404,
            "NotFound",
            "unknown kubesim control path",
        )),
    }
}

/// Parses a fault rule: `{"resource": "pods", "verb": "list", "status": 429,
/// "times": 2}`, `{"resource": "pods", "latencyMs": 200}` or
/// `{"resource": "pods", "dropWatch": true}`.
pub fn fault_from_json(v: &Value) -> Result<Injection, ApiError> {
    let resource = v
        .get("resource")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("resource: Required value"))?;
    let fault = if let Some(code) = v.get("status").and_then(Value::as_u64) {
        Fault::Status(code as u16)
    } else if let Some(ms) = v.get("latencyMs").and_then(Value::as_u64) {
        Fault::Latency(Duration::from_millis(ms))
    } else if v.get("dropWatch").and_then(Value::as_bool) == Some(true) {
        Fault::DropWatch
    } else {
        return Err(ApiError::bad_request(
            "one of status, latencyMs or dropWatch is required",
        ));
    };
    let mut rule = Injection::new(resource, fault);
    if let Some(verb) = v.get("verb") {
        rule.verb = Some(
            serde_json::from_value(verb.clone())
                .map_err(|_| ApiError::bad_request("verb: must be one of get, list, watch, create, update, patch, delete, deletecollection"))?,
        );
    }
    if let Some(n) = v.get("times").and_then(Value::as_u64) {
        rule.times = Some(n as u32);
    }
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_decoding() {
        assert_eq!(url_decode("app%3Dweb%2Ctier+in+(a)"), "app=web,tier in (a)");
        assert_eq!(url_decode("100%"), "100%");
    }

    #[test]
    fn routes() {
        let t = route("", "v1", &["namespaces", "a", "pods", "p", "log"]).unwrap();
        assert_eq!(
            (t.res, t.ns.as_deref(), t.name.as_deref(), t.sub.as_deref()),
            (ids::PODS, Some("a"), Some("p"), Some("log"))
        );
        let t = route("", "v1", &["namespaces", "a"]).unwrap();
        assert_eq!((t.res, t.name.as_deref()), (ids::NAMESPACES, Some("a")));
        let t = route("", "v1", &["pods"]).unwrap();
        assert_eq!((t.res, t.ns), (ids::PODS, None));
        assert!(route("", "v1", &["pods", "x"]).is_none());
    }
}
