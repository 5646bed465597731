//! Rendering the example profiles: snapshots for every environment (and so
//! every strategy) and track, round trips through the Kubernetes API types,
//! and the invariants the release engine relies on.

use std::path::Path;

use keelson_core::profile::{self, Profile};
use keelson_kube::render::labels;
use keelson_kube::{RenderRequest, Track, render, yaml_out};
use serde_json::Value;

fn example(name: &str) -> Profile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
        .join("app.yaml");
    profile::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn request<'a>(env: &'a str, track: Track) -> RenderRequest<'a> {
    RenderRequest {
        env,
        version: "1.4.2",
        track,
        cluster: None,
        agent_image: "registry.example.com/keelson/keelson-agent:0.1.0",
        authorization_url: Some("http://keelson.keelson-system.svc:8080"),
        revision: Some(7),
    }
}

fn kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], k: &str) -> &'a Value {
    let found = kind(objects, k);
    assert_eq!(found.len(), 1, "expected one {k}");
    found[0]
}

fn sorted<const N: usize>(mut keys: [&str; N]) -> [&str; N] {
    keys.sort_unstable();
    keys
}

const CASES: &[(&str, &str)] = &[
    ("orders", "prod"),
    ("orders", "staging"),
    ("orders", "test"),
    ("hello", "prod"),
];

#[test]
fn snapshots_for_every_environment_and_track() {
    for (app, env) in CASES {
        let profile = example(app);
        for track in [Track::Blue, Track::Green] {
            let objects = render(&profile, &request(env, track)).unwrap();
            insta::assert_snapshot!(
                format!("{app}-{env}-{track}"),
                yaml_out::documents(&objects)
            );
        }
    }
}

#[test]
fn rendering_is_deterministic() {
    let profile = example("orders");
    let a = yaml_out::documents(&render(&profile, &request("prod", Track::Blue)).unwrap());
    let b =
        yaml_out::documents(&render(&example("orders"), &request("prod", Track::Blue)).unwrap());
    assert_eq!(a, b);
}

/// Every object deserializes into its k8s-openapi type and serializes back
/// to the same JSON: no unknown field, nothing the types would drop.
#[test]
fn objects_round_trip_through_the_api_types() {
    use k8s_openapi::api::{
        apps::v1 as apps, autoscaling::v2 as autoscaling, core::v1 as core, policy::v1 as policy,
    };
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) {
        let typed: T =
            serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{e}: {object}"));
        let back = serde_json::to_value(&typed).unwrap();
        assert_eq!(&back, object, "{} changed in a round trip", object["kind"]);
    }
    let mut kinds = std::collections::BTreeSet::new();
    for (app, env) in CASES {
        for object in render(&example(app), &request(env, Track::Green)).unwrap() {
            let k = object["kind"].as_str().unwrap().to_string();
            match k.as_str() {
                "ServiceAccount" => round_trip::<core::ServiceAccount>(&object),
                "ConfigMap" => round_trip::<core::ConfigMap>(&object),
                "Service" => round_trip::<core::Service>(&object),
                "PodDisruptionBudget" => round_trip::<policy::PodDisruptionBudget>(&object),
                "Deployment" => round_trip::<apps::Deployment>(&object),
                "HorizontalPodAutoscaler" => {
                    round_trip::<autoscaling::HorizontalPodAutoscaler>(&object)
                }
                other => panic!("unexpected kind {other}"),
            }
            kinds.insert(k);
        }
    }
    assert_eq!(kinds.len(), 6, "every kind is covered: {kinds:?}");
}

#[test]
fn selectors_follow_the_design() {
    let objects = render(&example("orders"), &request("prod", Track::Green)).unwrap();
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["metadata"]["name"], "orders-green");
    let selector = deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    let keys: Vec<&str> = selector.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        sorted([labels::NAME, labels::INSTANCE, labels::TRACK])
    );
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in selector {
        assert_eq!(
            &pod_labels[k], v,
            "the pod template carries selector label {k}"
        );
    }
    assert_eq!(pod_labels[labels::TRAFFIC], "online");
    assert_eq!(pod_labels[labels::VERSION], "1.4.2");
    for k in ["Service", "PodDisruptionBudget"] {
        let o = one(&objects, k);
        let sel = if k == "Service" {
            &o["spec"]["selector"]
        } else {
            &o["spec"]["selector"]["matchLabels"]
        };
        let keys: Vec<&str> = sel
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            sorted([labels::NAME, labels::INSTANCE, labels::TRAFFIC]),
            "{k} selects traffic, not track or version"
        );
        for (key, v) in sel.as_object().unwrap() {
            assert_eq!(&pod_labels[key], v);
        }
    }
    let hpa = one(&objects, "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "orders-green");
}

#[test]
fn a_profile_edit_alone_does_not_change_the_pod_template() {
    let profile = example("orders");
    let mut edited = profile.clone();
    edited.spec.description = Some("A new description.".into());
    edited.spec.owners.push("carol@example.com".into());
    let mut later = request("prod", Track::Blue);
    later.revision = Some(8);
    let before = render(&profile, &request("prod", Track::Blue)).unwrap();
    let after = render(&edited, &later).unwrap();
    let template = |o: &[Value]| one(o, "Deployment")["spec"]["template"].clone();
    assert_eq!(template(&before), template(&after));
    assert_eq!(
        one(&after, "Deployment")["metadata"]["annotations"][labels::REVISION_ANNOTATION],
        "8"
    );
    assert!(
        !template(&after)
            .to_string()
            .contains(labels::REVISION_ANNOTATION)
    );
}

#[test]
fn pod_lifecycle_wiring() {
    let objects = render(&example("orders"), &request("test", Track::Blue)).unwrap();
    let deployment = one(&objects, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["shareProcessNamespace"], true);
    // drain 15s + preOffline 30s + stop 30s + margin 15s
    assert_eq!(pod["terminationGracePeriodSeconds"], 90);
    let init = &pod["initContainers"][0];
    assert_eq!(
        init["image"],
        "registry.example.com/keelson/keelson-agent:0.1.0"
    );
    assert_eq!(init["command"][1], "init");
    let app = &pod["containers"][0];
    let sidecar = &pod["containers"][1];
    assert_eq!(app["image"], "registry.example.com/payments/orders:1.4.2");
    assert_eq!(
        sidecar["image"], app["image"],
        "the sidecar runs the app image so hooks see its files"
    );
    let command: Vec<&str> = app["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        command,
        [
            "/keelson/bin/keelson-agent",
            "entrypoint",
            "--",
            "java",
            "-jar",
            "/app/orders.jar"
        ]
    );
    assert_eq!(app["lifecycle"]["preStop"]["exec"]["command"][2], "--wait");
    assert!(
        sidecar.get("lifecycle").is_none(),
        "only the app container carries the preStop"
    );
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(app["livenessProbe"]["exec"]["command"][1], "probe");
    let java_opts = app["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "JAVA_TOOL_OPTIONS")
        .unwrap();
    let opts = java_opts["value"].as_str().unwrap();
    assert!(opts.starts_with("-Xms1g -Xmx1g"), "{opts}");
    assert!(
        opts.contains("jdwp=transport=dt_socket"),
        "debug is on in test: {opts}"
    );
    let volumes = pod["volumes"].as_array().unwrap();
    let token = volumes
        .iter()
        .find(|v| v["name"] == "keelson-token")
        .unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "keelson"
    );
    let cm_name = volumes
        .iter()
        .find(|v| v["name"] == "keelson-lifecycle")
        .unwrap()["configMap"]["name"]
        .clone();
    let cm = kind(&objects, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == cm_name)
        .unwrap();
    assert_eq!(cm["immutable"], true);
    let document: keelson_core::lifecycle::LifecycleDocument =
        serde_json::from_str(cm["data"]["lifecycle.json"].as_str().unwrap()).unwrap();
    assert!(
        document.liveness.contains("debugger_attached(5005)"),
        "a debugger keeps the JVM alive: {}",
        document.liveness
    );
    assert!(keelson_core::probe::Expr::parse(&document.liveness).is_ok());
    // Prod has no debugger.
    let prod = render(&example("orders"), &request("prod", Track::Blue)).unwrap();
    assert!(!yaml_out::documents(&prod).contains("jdwp"));
}

#[test]
fn config_map_names_follow_content() {
    let profile = example("orders");
    let mut changed = profile.clone();
    changed
        .spec
        .run
        .config
        .as_mut()
        .unwrap()
        .files
        .insert("extra.properties".into(), "a=b\n".into());
    let names = |p: &Profile| -> Vec<String> {
        kind(
            &render(p, &request("prod", Track::Blue)).unwrap(),
            "ConfigMap",
        )
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
    };
    let (a, b) = (names(&profile), names(&changed));
    assert_eq!(a[0], b[0], "the lifecycle document did not change");
    assert_ne!(a[1], b[1], "the config files changed");
}

#[test]
fn longest_names_fit_kubernetes_limits() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello/app.yaml"),
    )
    .unwrap()
    .replace("name: hello", &format!("name: {}", "a".repeat(40)));
    let profile = profile::parse(&text).unwrap();
    for object in render(&profile, &request("prod", Track::Green)).unwrap() {
        let name = object["metadata"]["name"].as_str().unwrap();
        // Pods of a Deployment add `-<10-char hash>-<5 chars>`.
        let limit = if object["kind"] == "Deployment" {
            63 - 17
        } else {
            63
        };
        assert!(name.len() <= limit, "{name} is longer than {limit}");
        for (k, v) in object["metadata"]["labels"].as_object().unwrap() {
            assert!(v.as_str().unwrap().len() <= 63, "label {k}={v} is too long");
        }
    }
}

#[test]
fn bad_requests_are_errors() {
    let profile = example("orders");
    let mut r = request("qa", Track::Blue);
    assert_eq!(
        render(&profile, &r).unwrap_err().to_string(),
        "environment `qa` is not in the profile; it has: prod, staging, test"
    );
    r.env = "prod";
    r.version = "1.0/beta";
    assert!(
        render(&profile, &r)
            .unwrap_err()
            .to_string()
            .contains("version `1.0/beta` is not valid")
    );
    r.version = "1.0";
    r.cluster = Some("prod-z");
    assert!(
        render(&profile, &r)
            .unwrap_err()
            .to_string()
            .contains("its clusters: prod-a, prod-b")
    );
}

#[test]
fn an_app_with_databases_needs_the_authorization_url() {
    let mut r = request("prod", Track::Blue);
    r.authorization_url = None;
    let err = render(&example("orders"), &r).unwrap_err();
    assert!(
        err.to_string().contains("need keelson's authorization URL"),
        "{err}"
    );
    assert!(
        render(&example("hello"), &r).is_ok(),
        "no databases, no grants needed"
    );
}

#[test]
fn only_the_app_container_gets_jvm_flags() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/orders/app.yaml"),
    )
    .unwrap()
    .replace(
        "TZ: UTC",
        "TZ: UTC\n    JAVA_TOOL_OPTIONS: \"-Dfile.encoding=UTF-8\"",
    );
    let profile = profile::parse(&text).unwrap();
    let objects = render(&profile, &request("test", Track::Blue)).unwrap();
    let pod = &one(&objects, "Deployment")["spec"]["template"]["spec"];
    let env = |c: usize| pod["containers"][c]["env"].as_array().unwrap().clone();
    let opts: Vec<Value> = env(0)
        .into_iter()
        .filter(|e| e["name"] == "JAVA_TOOL_OPTIONS")
        .collect();
    assert_eq!(
        opts.len(),
        1,
        "one variable, keelson's flags first, then the profile's"
    );
    let value = opts[0]["value"].as_str().unwrap();
    assert!(
        value.starts_with("-Xms1g -Xmx1g") && value.ends_with("-Dfile.encoding=UTF-8"),
        "{value}"
    );
    let sidecar: Vec<Value> = env(1)
        .into_iter()
        .filter(|e| e["name"] == "JAVA_TOOL_OPTIONS")
        .collect();
    assert_eq!(
        sidecar[0]["value"], "-Dfile.encoding=UTF-8",
        "hook JVMs get neither the heap nor the debugger"
    );
    let init = pod["initContainers"][0]["env"].as_array().unwrap();
    assert!(
        init.iter().all(|e| e["name"] != "KEELSON_HOOKS_DIR"),
        "the agent image has no app hooks"
    );
}

#[test]
fn the_startup_probe_covers_pre_start() {
    // startupTimeout 3m + preStart 60s = 240s in 5s periods.
    let objects = render(&example("orders"), &request("prod", Track::Blue)).unwrap();
    let app = &one(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(app["startupProbe"]["failureThreshold"], 48);
}
