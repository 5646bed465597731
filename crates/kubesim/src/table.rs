//! Server-side printing: the `meta.k8s.io/v1` Table kubectl asks for with
//! `Accept: application/json;as=Table;…`.

use crate::resources::ResourceType;
use crate::util::age;
use serde_json::{Value, json};

fn col(name: &str, ty: &str, format: &str) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": name, "priority": 0})
}

/// The column definitions for a kind.
pub fn columns(rt: &ResourceType) -> Vec<Value> {
    let mut c = vec![col("Name", "string", "name")];
    match rt.kind {
        "Pod" => {
            c.push(col("Ready", "string", ""));
            c.push(col("Status", "string", ""));
            c.push(col("Restarts", "string", ""));
        }
        "Deployment" => {
            c.push(col("Ready", "string", ""));
            c.push(col("Up-to-date", "integer", ""));
            c.push(col("Available", "integer", ""));
        }
        "ReplicaSet" => {
            c.push(col("Desired", "integer", ""));
            c.push(col("Current", "integer", ""));
            c.push(col("Ready", "integer", ""));
        }
        "Namespace" | "Node" => c.push(col("Status", "string", "")),
        "Service" => {
            c.push(col("Type", "string", ""));
            c.push(col("Cluster-IP", "string", ""));
        }
        "ConfigMap" | "Secret" => c.push(col("Data", "integer", "")),
        _ => {}
    }
    c.push(col("Age", "string", ""));
    c
}

fn int(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn cells(rt: &ResourceType, o: &Value) -> Vec<Value> {
    let name = o.pointer("/metadata/name").cloned().unwrap_or(json!(""));
    let mut c = vec![name];
    match rt.kind {
        "Pod" => {
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array);
            let ready = statuses.map_or(0, |s| {
                s.iter().filter(|c| c["ready"] == json!(true)).count()
            });
            let restarts: i64 = statuses.map_or(0, |s| {
                s.iter()
                    .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                    .sum()
            });
            let phase = if o.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating"
            } else {
                o.pointer("/status/phase")
                    .and_then(Value::as_str)
                    .unwrap_or("Pending")
            };
            c.push(json!(format!("{ready}/{total}")));
            c.push(json!(phase));
            c.push(json!(restarts.to_string()));
        }
        "Deployment" => {
            c.push(json!(format!(
                "{}/{}",
                int(o, "/status/readyReplicas"),
                int(o, "/spec/replicas")
            )));
            c.push(json!(int(o, "/status/updatedReplicas")));
            c.push(json!(int(o, "/status/availableReplicas")));
        }
        "ReplicaSet" => {
            c.push(json!(int(o, "/spec/replicas")));
            c.push(json!(int(o, "/status/replicas")));
            c.push(json!(int(o, "/status/readyReplicas")));
        }
        "Namespace" => c.push(
            o.pointer("/status/phase")
                .cloned()
                .unwrap_or(json!("Active")),
        ),
        "Node" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .is_some_and(|c| c["status"] == "True");
            c.push(json!(if ready { "Ready" } else { "NotReady" }));
        }
        "Service" => {
            c.push(
                o.pointer("/spec/type")
                    .cloned()
                    .unwrap_or(json!("ClusterIP")),
            );
            c.push(
                o.pointer("/spec/clusterIP")
                    .cloned()
                    .unwrap_or(json!("<none>")),
            );
        }
        "ConfigMap" | "Secret" => {
            let n = ["data", "binaryData", "stringData"]
                .iter()
                .filter_map(|k| o.get(*k).and_then(Value::as_object))
                .map(|m| m.len())
                .sum::<usize>();
            c.push(json!(n));
        }
        _ => {}
    }
    c.push(json!(age(o
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .unwrap_or(""))));
    c
}

/// One row, with the object's metadata (`includeObject=Metadata`, the
/// default), the whole object (`Object`) or nothing (`None`).
pub fn row(rt: &ResourceType, o: &Value, include: &str) -> Value {
    let object = match include {
        "None" => Value::Null,
        "Object" => o.clone(),
        _ => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
        }),
    };
    json!({"cells": cells(rt, o), "object": object})
}

/// A Table of rows.
pub fn table(
    rt: &ResourceType,
    objs: &[Value],
    rv: &str,
    cont: Option<&str>,
    include: &str,
) -> Value {
    let mut meta = json!({"resourceVersion": rv});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": columns(rt),
        "rows": objs.iter().map(|o| row(rt, o, include)).collect::<Vec<_>>(),
    })
}
