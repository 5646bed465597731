//! The OpenAPI 3 document, generated from [`crate::api::ENDPOINTS`] and the
//! request and response types' JSON Schemas (schemars).

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::api::{Access, ENDPOINTS};
use crate::error::ErrorBody;

/// The document served at `/api/v1/openapi.json`.
pub fn document() -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    let error = generator.subschema_for::<ErrorBody>().to_value();
    let error_reply = |description: &str| json!({ "description": description, "content": { "application/json": { "schema": error.clone() } } });
    let mut paths = Map::new();
    for endpoint in ENDPOINTS {
        let parameters: Vec<Value> = endpoint
            .params
            .iter()
            .map(|p| {
                json!({
                    "name": p.name, "in": p.location, "required": p.required,
                    "description": p.description, "schema": { "type": p.kind },
                })
            })
            .collect();
        let mut responses = Map::new();
        for reply in endpoint.replies {
            let body = match reply.schema {
                Some(schema) => json!({
                    "description": reply.description,
                    "content": { "application/json": { "schema": schema(&mut generator).to_value() } },
                }),
                None => json!({
                    "description": reply.description,
                    "content": { "text/plain": { "schema": { "type": "string" } } },
                }),
            };
            responses.insert(reply.status.to_string(), body);
        }
        if endpoint.access != Access::Public {
            responses.insert(
                "400".into(),
                error_reply("malformed request (query, path or body)"),
            );
            responses.insert(
                "401".into(),
                error_reply("missing, invalid or revoked token"),
            );
        }
        if matches!(endpoint.access, Access::Writer | Access::Admin) {
            responses.insert(
                "403".into(),
                error_reply("the token may not make this change"),
            );
        }
        if endpoint.path.contains('{') {
            responses.insert("404".into(), error_reply("not found"));
        }
        let mut operation = json!({
            "operationId": endpoint.operation_id,
            "summary": endpoint.summary,
            "parameters": parameters,
        });
        if let Some((content_types, schema)) = endpoint.request {
            let schema = schema(&mut generator).to_value();
            let content: Map<String, Value> = content_types
                .iter()
                .map(|ct| (ct.to_string(), json!({ "schema": schema.clone() })))
                .collect();
            operation["requestBody"] = json!({ "required": true, "content": content });
            responses.insert("413".into(), error_reply("the body exceeds 1 MiB"));
            responses.insert(
                "422".into(),
                error_reply("the body is well-formed but invalid; `details` lists every field"),
            );
        }
        responses.insert(
            "500".into(),
            error_reply("internal error (details are in the server log only)"),
        );
        operation["responses"] = Value::Object(responses);
        operation["security"] = match endpoint.access {
            Access::Public => json!([]),
            _ => json!([{ "bearer": [] }]),
        };
        let item = paths
            .entry(endpoint.path.to_string())
            .or_insert_with(|| json!({}));
        item[endpoint.method.as_str().to_ascii_lowercase()] = operation;
    }
    let schemas = generator.take_definitions(true);
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "keelson",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Apps, their profile revisions, environments, targets, audit events and API tokens.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_is_documented_and_every_reference_resolves() {
        let doc = document();
        for endpoint in ENDPOINTS {
            let method = endpoint.method.as_str().to_ascii_lowercase();
            assert!(
                doc["paths"][endpoint.path][&method].is_object(),
                "{method} {} missing",
                endpoint.path
            );
        }
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(
            refs.iter().any(|r| r.ends_with("/ApplyOutcome")),
            "{refs:?}"
        );
        // Distinct types keep distinct, readable names (no `Target2`).
        let names: Vec<&String> = doc["components"]["schemas"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert!(
            names
                .iter()
                .all(|n| !n.ends_with(|c: char| c.is_ascii_digit())),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| *n == "ItemsOfRegisteredTarget"),
            "{names:?}"
        );
        for r in refs {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("foreign ref {r}"));
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "dangling ref {r}"
            );
        }
    }

    fn collect_refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    if k == "$ref" {
                        out.extend(v.as_str().map(str::to_string));
                    }
                    collect_refs(v, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }
}
