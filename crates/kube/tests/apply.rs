//! Rendered objects go through a Kubernetes API with the real kube-rs
//! client: server-side apply accepts every object, keeps what was sent, and
//! a second identical apply changes nothing.

use std::path::Path;

use keelson_core::profile;
use keelson_kube::{RenderRequest, Track, render};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Config};
use kubesim::{Sim, SimConfig};
use serde_json::{Value, json};

fn api_resource(object: &Value) -> ApiResource {
    let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", object["apiVersion"].as_str().unwrap()),
    };
    let kind = object["kind"].as_str().unwrap();
    let plural = match kind {
        "ServiceAccount" => "serviceaccounts",
        "ConfigMap" => "configmaps",
        "Service" => "services",
        "PodDisruptionBudget" => "poddisruptionbudgets",
        "Deployment" => "deployments",
        "HorizontalPodAutoscaler" => "horizontalpodautoscalers",
        other => panic!("unexpected kind {other}"),
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// Whether everything in `sent` is in `stored` with the same value (the
/// server may add defaults, status and metadata).
fn contains(stored: &Value, sent: &Value, path: &str) -> Result<(), String> {
    match (stored, sent) {
        (Value::Object(s), Value::Object(o)) => o.iter().try_for_each(|(k, v)| {
            let child = format!("{path}.{k}");
            s.get(k)
                .ok_or_else(|| format!("{child} was dropped"))
                .and_then(|sv| contains(sv, v, &child))
        }),
        (Value::Array(s), Value::Array(o)) if s.len() == o.len() => s
            .iter()
            .zip(o)
            .enumerate()
            .try_for_each(|(i, (sv, ov))| contains(sv, ov, &format!("{path}[{i}]"))),
        (s, o) if s == o => Ok(()),
        (s, o) => Err(format!("{path}: sent {o}, stored {s}")),
    }
}

#[tokio::test]
async fn rendered_objects_apply_server_side_and_reapply_as_no_ops() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let client = Client::try_from(Config::new(sim.base_url().parse().unwrap())).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/orders/app.yaml");
    let profile = profile::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let namespaces: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("", "v1", "Namespace"),
            "namespaces",
        ),
    );
    let params = PatchParams::apply("keelson");
    for (env, namespace) in [("prod", "prod"), ("test", "orders-test")] {
        let ns: DynamicObject = serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        )
        .unwrap();
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        for track in [Track::Blue, Track::Green] {
            let request = RenderRequest {
                env,
                version: "1.4.2",
                track,
                cluster: None,
                agent_image: "registry.example.com/keelson/keelson-agent:0.1.0",
                authorization_url: Some("http://keelson:8080"),
                revision: Some(3),
            };
            for object in render(&profile, &request).unwrap() {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), namespace, &api_resource(&object));
                let name = object["metadata"]["name"].as_str().unwrap().to_string();
                let applied = api
                    .patch(&name, &params, &Patch::Apply(&object))
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let stored = serde_json::to_value(&applied).unwrap();
                contains(&stored, &object, &name).unwrap();
                let again = api
                    .patch(&name, &params, &Patch::Apply(&object))
                    .await
                    .unwrap();
                assert_eq!(
                    again.metadata.resource_version, applied.metadata.resource_version,
                    "{name}: an identical apply is a no-op"
                );
            }
        }
        let deployments: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            namespace,
            &api_resource(&json!({"apiVersion": "apps/v1", "kind": "Deployment"})),
        );
        let names: Vec<String> = deployments
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|d| d.metadata.name)
            .collect();
        assert_eq!(
            names,
            ["orders-blue", "orders-green"],
            "both tracks live side by side"
        );
    }
    sim.shutdown().await.unwrap();
}
