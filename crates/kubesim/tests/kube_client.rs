//! The API machinery through the real kube-rs client over HTTP.

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{
    Api, DeleteParams, EvictParams, ListParams, LogParams, Patch, PatchParams, PostParams,
    PropagationPolicy, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config};
use kubesim::control::{Fault, Injection, Verb};
use kubesim::{Sim, SimConfig};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

async fn sim_with(config: SimConfig) -> (Sim, Client) {
    let sim = Sim::start(config).await.expect("start kubesim");
    let mut config = Config::new(sim.base_url().parse().expect("url"));
    // Tests assert on 429/504 answers; kube-rs would otherwise retry them.
    config.default_retry = false;
    let client = Client::try_from(config).expect("client");
    (sim, client)
}

async fn sim() -> (Sim, Client) {
    sim_with(SimConfig::api_only()).await
}

fn api_status(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn cm(name: &str, labels: Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .unwrap()
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry/app:1.0", "ports": [{"containerPort": 8080}]}]}}
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn crud_with_defaults_generation_and_status_separation() {
    let (_sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d = api
        .create(&PostParams::default(), &deployment("web", 2))
        .await
        .unwrap();
    let meta = &d.metadata;
    assert_eq!(meta.generation, Some(1));
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.revision_history_limit, Some(10));
    let c = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        c.ports.as_ref().unwrap()[0].protocol.as_deref(),
        Some("TCP")
    );

    // Label change: no generation bump. Spec change: bump.
    let p = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(1));
    let p = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(2));

    // Status only changes through the status subresource.
    let p = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 9}})),
        )
        .await
        .unwrap();
    assert_eq!(p.status.as_ref().and_then(|s| s.replicas), None);
    let p = api
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 9}, "spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(p.status.as_ref().and_then(|s| s.replicas), Some(9));
    assert_eq!(p.spec.as_ref().unwrap().replicas, Some(4));
    assert_eq!(p.metadata.generation, Some(2));

    let got = api.get("web").await.unwrap();
    assert_eq!(got.metadata.resource_version, p.metadata.resource_version);
    api.delete("web", &DeleteParams::default()).await.unwrap();
    let e = api_status(api.get("web").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
}

#[tokio::test]
async fn the_written_kubeconfig_works_for_kube_rs() {
    let (sim, _) = sim().await;
    let kc = kube::config::Kubeconfig::from_yaml(&sim.kubeconfig_yaml()).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let zones: Vec<String> = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| n.metadata.labels.unwrap()["topology.kubernetes.io/zone"].clone())
        .collect();
    assert_eq!(zones, ["a", "b", "c"]);
    let v = client.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
}

#[tokio::test]
async fn kube_discovery_finds_every_served_kind() {
    let (_sim, client) = sim().await;
    let discovery = kube::Discovery::new(client).run().await.unwrap();
    for r in kubesim::resources::RESOURCES {
        let gvk = kube::api::GroupVersionKind::gvk(r.group, r.version, r.kind);
        let (ar, caps) = discovery
            .resolve_gvk(&gvk)
            .unwrap_or_else(|| panic!("{gvk:?} not discovered"));
        assert_eq!(ar.plural, r.plural);
        assert_eq!(
            caps.scope == kube::discovery::Scope::Namespaced,
            r.namespaced
        );
    }
}

#[tokio::test]
async fn generate_name_and_missing_namespace() {
    let (_sim, client) = sim().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut c = cm("", json!({}));
    c.metadata.name = None;
    c.metadata.generate_name = Some("gen-".into());
    let a = api.create(&PostParams::default(), &c).await.unwrap();
    let b = api.create(&PostParams::default(), &c).await.unwrap();
    let (an, bn) = (a.metadata.name.unwrap(), b.metadata.name.unwrap());
    assert!(an.starts_with("gen-") && an.len() == 9, "{an}");
    assert_ne!(an, bn);

    let missing: Api<ConfigMap> = Api::namespaced(client.clone(), "nope");
    let e = api_status(
        missing
            .create(&PostParams::default(), &cm("x", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 404);
    assert!(
        e.message.contains("namespaces \"nope\" not found"),
        "{}",
        e.message
    );
    let e = api_status(
        api.create(&PostParams::default(), &cm(&an, json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));
}

#[tokio::test]
async fn stale_resource_version_is_a_conflict() {
    let (_sim, client) = sim().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let first = api
        .create(&PostParams::default(), &cm("c", json!({})))
        .await
        .unwrap();
    let mut a = first.clone();
    a.data = Some([("k".to_string(), "a".to_string())].into());
    let updated = api.replace("c", &PostParams::default(), &a).await.unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        first.metadata.resource_version
    );
    let mut b = first.clone();
    b.data = Some([("k".to_string(), "b".to_string())].into());
    let e = api_status(
        api.replace("c", &PostParams::default(), &b)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message.contains("the object has been modified"),
        "{}",
        e.message
    );
    assert_eq!(api.get("c").await.unwrap().data.unwrap()["k"], "a");
}

#[tokio::test]
async fn list_selectors_and_consistent_pagination() {
    let (sim, client) = sim().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..25 {
        let tier = if i % 2 == 0 { "even" } else { "odd" };
        api.create(
            &PostParams::default(),
            &cm(&format!("c{i:02}"), json!({"tier": tier})),
        )
        .await
        .unwrap();
    }
    let even = api
        .list(&ListParams::default().labels("tier=even"))
        .await
        .unwrap();
    assert_eq!(even.items.len(), 13);
    let notin = api
        .list(&ListParams::default().labels("tier notin (even)"))
        .await
        .unwrap();
    assert_eq!(notin.items.len(), 12);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=c07"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);

    // Paging a label selection: the first page comes from the label index,
    // the rest from the snapshot the token names.
    let mut paged = Vec::new();
    let mut lp = ListParams::default().labels("tier=even").limit(5);
    loop {
        let page = api.list(&lp).await.unwrap();
        paged.extend(page.items.into_iter().map(|c| c.metadata.name.unwrap()));
        match page.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(t) => lp = lp.continue_token(&t),
            None => break,
        }
    }
    let evens: Vec<String> = (0..25).step_by(2).map(|i| format!("c{i:02}")).collect();
    assert_eq!(paged, evens);

    let p1 = api.list(&ListParams::default().limit(10)).await.unwrap();
    assert_eq!(p1.items.len(), 10);
    let token = p1.metadata.continue_.clone().expect("continue token");
    // Written after the first page: not part of this list's snapshot.
    api.create(&PostParams::default(), &cm("c99", json!({})))
        .await
        .unwrap();
    api.delete("c20", &DeleteParams::default()).await.unwrap();
    let mut names: Vec<String> = p1
        .items
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    let mut token = Some(token);
    while let Some(t) = token {
        let page = api
            .list(&ListParams::default().limit(10).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(page.metadata.resource_version, p1.metadata.resource_version);
        names.extend(page.items.iter().map(|c| c.metadata.name.clone().unwrap()));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
    }
    let expected: Vec<String> = (0..25).map(|i| format!("c{i:02}")).collect();
    assert_eq!(names, expected);

    // Once history is compacted, the token expires.
    let p1 = api.list(&ListParams::default().limit(5)).await.unwrap();
    api.create(&PostParams::default(), &cm("late", json!({})))
        .await
        .unwrap();
    sim.compact();
    let e = api_status(
        api.list(
            &ListParams::default()
                .limit(5)
                .continue_token(p1.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));

    // Exact reads of a version in the window, and of a future version.
    let now = api.list(&ListParams::default()).await.unwrap();
    let rv = now.metadata.resource_version.unwrap();
    api.create(&PostParams::default(), &cm("later", json!({})))
        .await
        .unwrap();
    let exact = api
        .list(
            &ListParams::default()
                .at(&rv)
                .matching(kube::api::VersionMatch::Exact),
        )
        .await
        .unwrap();
    assert_eq!(exact.items.len(), now.items.len());
    let future = (rv.parse::<u64>().unwrap() + 1000).to_string();
    let e = api_status(
        api.list(&ListParams::default().at(&future))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 504);
}

async fn next_event<S>(stream: &mut S) -> WatchEvent<ConfigMap>
where
    S: futures_util::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin,
{
    timeout(WAIT, stream.next())
        .await
        .expect("event in time")
        .expect("stream open")
        .expect("event")
}

#[tokio::test]
async fn watch_resumes_sends_bookmarks_and_expires() {
    let (sim, client) = sim_with(SimConfig {
        bookmark_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let start = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    api.create(&PostParams::default(), &cm("a", json!({"w": "1"})))
        .await
        .unwrap();
    api.create(&PostParams::default(), &cm("b", json!({"w": "1"})))
        .await
        .unwrap();

    let wp = WatchParams::default().labels("w=1").disable_bookmarks();
    let mut s = api.watch(&wp, &start).await.unwrap().boxed();
    let resume = match next_event(&mut s).await {
        WatchEvent::Added(c) => {
            assert_eq!(c.metadata.name.as_deref(), Some("a"));
            c.metadata.resource_version.unwrap()
        }
        other => panic!("expected ADDED a, got {other:?}"),
    };
    drop(s);
    // Resuming after "a" replays exactly what followed.
    let mut s = api.watch(&wp, &resume).await.unwrap().boxed();
    match next_event(&mut s).await {
        WatchEvent::Added(c) => assert_eq!(c.metadata.name.as_deref(), Some("b")),
        other => panic!("expected ADDED b, got {other:?}"),
    }
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "2"}})),
    )
    .await
    .unwrap();
    match next_event(&mut s).await {
        WatchEvent::Modified(c) => assert_eq!(c.data.unwrap()["k"], "2"),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    // Leaving the selector reads as a deletion.
    api.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"w": null}}})),
    )
    .await
    .unwrap();
    match next_event(&mut s).await {
        WatchEvent::Deleted(c) => assert_eq!(c.metadata.name.as_deref(), Some("b")),
        other => panic!("expected DELETED b, got {other:?}"),
    }

    // Bookmarks carry a version to resume from.
    let mut s = api
        .watch(&WatchParams::default(), &resume)
        .await
        .unwrap()
        .boxed();
    let bookmark_rv = loop {
        if let WatchEvent::Bookmark(b) = next_event(&mut s).await {
            break b.metadata.resource_version;
        }
    };
    assert!(bookmark_rv.parse::<u64>().unwrap() >= resume.parse::<u64>().unwrap());

    // Too old: 410 as an ERROR event.
    sim.compact();
    let mut s = api
        .watch(&WatchParams::default(), &start)
        .await
        .unwrap()
        .boxed();
    match next_event(&mut s).await {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }
}

async fn next(
    s: &mut futures_util::stream::BoxStream<'static, Result<String, watcher::Error>>,
) -> String {
    timeout(WAIT, s.try_next())
        .await
        .expect("in time")
        .expect("no error")
        .expect("open")
}

#[tokio::test]
async fn runtime_watcher_recovers_from_drops_and_expiry() {
    let (sim, client) = sim_with(SimConfig {
        watch_window: 4,
        ..Default::default()
    })
    .await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &cm("before", json!({})))
        .await
        .unwrap();
    let mut seen = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .map_ok(|c: ConfigMap| c.metadata.name.unwrap_or_default())
        .boxed();
    assert_eq!(next(&mut seen).await, "before");
    api.create(&PostParams::default(), &cm("one", json!({})))
        .await
        .unwrap();
    assert_eq!(next(&mut seen).await, "one");

    // Cut the connection and let history run out meanwhile: the watcher
    // resumes or relists and still sees every later object.
    sim.faults()
        .inject(Injection::new("configmaps", Fault::DropWatch));
    for i in 0..10 {
        api.create(&PostParams::default(), &cm(&format!("burst{i}"), json!({})))
            .await
            .unwrap();
    }
    sim.compact();
    api.create(&PostParams::default(), &cm("after", json!({})))
        .await
        .unwrap();
    // Errors (the cut, a 410) surface between retries; names keep coming.
    loop {
        match timeout(WAIT, seen.next())
            .await
            .expect("in time")
            .expect("open")
        {
            Ok(name) if name == "after" => break,
            _ => {}
        }
    }
    assert!(
        sim.metrics()
            .count(Verb::Watch, "configmaps", Some("default"))
            >= 2
    );
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_and_the_end_bookmark() {
    let (sim, client) = sim().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for n in ["s1", "s2"] {
        api.create(&PostParams::default(), &cm(n, json!({})))
            .await
            .unwrap();
    }
    let mut events = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    loop {
        match timeout(WAIT, events.try_next())
            .await
            .expect("in time")
            .expect("no error")
            .expect("open")
        {
            watcher::Event::Init => {}
            watcher::Event::InitApply(c) => initial.push(c.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected before InitDone: {other:?}"),
        }
    }
    assert_eq!(initial, ["s1", "s2"]);
    api.create(&PostParams::default(), &cm("s3", json!({})))
        .await
        .unwrap();
    match timeout(WAIT, events.try_next())
        .await
        .expect("in time")
        .expect("no error")
        .expect("open")
    {
        watcher::Event::Apply(c) => assert_eq!(c.metadata.name.as_deref(), Some("s3")),
        other => panic!("expected s3, got {other:?}"),
    }
    // A streaming list needs no LIST request at all.
    assert_eq!(sim.metrics().total(Verb::List, "configmaps"), 0);
}

fn cm_apply(data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": data})
}

#[tokio::test]
async fn server_side_apply_two_managers_conflict_and_force() {
    let (_sim, client) = sim().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let alice = PatchParams::apply("alice");
    let bob = PatchParams::apply("bob");
    api.patch(
        "shared",
        &alice,
        &Patch::Apply(cm_apply(json!({"a": "1", "shared": "x"}))),
    )
    .await
    .unwrap();
    // Bob co-owns "shared" by agreeing with its value, and adds "b".
    api.patch(
        "shared",
        &bob,
        &Patch::Apply(cm_apply(json!({"b": "2", "shared": "x"}))),
    )
    .await
    .unwrap();

    let e = api_status(
        api.patch(
            "shared",
            &bob,
            &Patch::Apply(cm_apply(json!({"b": "2", "a": "changed"}))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    let causes = e
        .details
        .as_ref()
        .map(|d| d.causes.clone())
        .unwrap_or_default();
    assert_eq!(causes.len(), 1);
    assert_eq!(causes[0].field, ".data.a");
    assert!(
        causes[0].message.contains("conflict with \"alice\""),
        "{}",
        causes[0].message
    );

    let forced = api
        .patch(
            "shared",
            &bob.clone().force(),
            &Patch::Apply(cm_apply(json!({"b": "2", "a": "changed", "shared": "x"}))),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.as_ref().unwrap()["a"], "changed");
    let managers = forced.metadata.managed_fields.unwrap();
    let alice_fields = managers
        .iter()
        .find(|m| m.manager.as_deref() == Some("alice"))
        .unwrap();
    let alice_json = serde_json::to_string(&alice_fields.fields_v1).unwrap();
    assert!(
        !alice_json.contains("f:a\""),
        "alice lost .data.a: {alice_json}"
    );
    assert!(alice_json.contains("f:shared"));

    // Alice stops applying "shared": Bob still owns it, so it stays.
    // Bob stops applying "b": nobody else owns it, so it goes.
    api.patch("shared", &alice, &Patch::Apply(cm_apply(json!({}))))
        .await
        .unwrap();
    let out = api
        .patch(
            "shared",
            &bob,
            &Patch::Apply(cm_apply(json!({"a": "changed", "shared": "x"}))),
        )
        .await
        .unwrap();
    let data = out.data.unwrap();
    assert_eq!(data.get("shared").map(String::as_str), Some("x"));
    assert!(!data.contains_key("b"));
}

#[tokio::test]
async fn apply_keyed_lists_and_scale_ownership() {
    let (sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client, "default");
    let pp = PatchParams::apply("keelson");
    let mut d = serde_json::to_value(deployment("app", 2)).unwrap();
    d["apiVersion"] = json!("apps/v1");
    d["kind"] = json!("Deployment");
    api.patch("app", &pp, &Patch::Apply(&d)).await.unwrap();
    // Another manager adds a sidecar container: list items merge by name.
    let side = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
        "spec": {"template": {"spec": {"containers": [{"name": "side", "image": "side:1"}]}}}});
    let out = api
        .patch("app", &PatchParams::apply("mesh"), &Patch::Apply(&side))
        .await
        .unwrap();
    let names: Vec<String> = out
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["app", "side"]);

    // Scaling through the subresource moves replicas to the scaler.
    api.patch_scale(
        "app",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .unwrap();
    let scale = api.get_scale("app").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(5));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=app"));
    let e = api_status(api.patch("app", &pp, &Patch::Apply(&d)).await.unwrap_err());
    assert_eq!(e.code, 409);
    // Applying without replicas leaves them to the scaler.
    d["spec"].as_object_mut().unwrap().remove("replicas");
    d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("registry/app:2.0");
    let out = api.patch("app", &pp, &Patch::Apply(&d)).await.unwrap();
    let spec = out.spec.unwrap();
    assert_eq!(spec.replicas, Some(5));
    assert_eq!(
        spec.template.spec.unwrap().containers[0].image.as_deref(),
        Some("registry/app:2.0")
    );
    // Created, sidecar added, scaled, image changed.
    assert_eq!(out.metadata.generation, Some(4));
    assert_eq!(
        sim.metrics()
            .count(Verb::Patch, "deployments/scale", Some("default")),
        1
    );
}

#[tokio::test]
async fn strategic_merge_patch_as_kubectl_sends() {
    let (_sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &deployment("web", 1))
        .await
        .unwrap();
    let set_image = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "app"}],
        "containers": [{"image": "registry/app:9", "name": "app"}]}}}});
    let out = api
        .patch("web", &PatchParams::default(), &Patch::Strategic(set_image))
        .await
        .unwrap();
    let c = &out
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(c.image.as_deref(), Some("registry/app:9"));
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8080);
}

fn owned(kind: &str, api_version: &str, owner_name: &str, uid: &str) -> Value {
    json!([{"apiVersion": api_version, "kind": kind, "name": owner_name, "uid": uid,
        "controller": true, "blockOwnerDeletion": true}])
}

async fn chain(client: &Client, name: &str) -> (Api<Deployment>, Api<ReplicaSet>, Api<Pod>) {
    let (d, r, p) = (
        Api::<Deployment>::namespaced(client.clone(), "default"),
        Api::<ReplicaSet>::namespaced(client.clone(), "default"),
        Api::<Pod>::namespaced(client.clone(), "default"),
    );
    let dep = d
        .create(&PostParams::default(), &deployment(name, 1))
        .await
        .unwrap();
    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-rs"), "ownerReferences": owned("Deployment", "apps/v1", name, dep.metadata.uid.as_deref().unwrap())},
        "spec": {"selector": {"matchLabels": {"app": name}}, "template": {"metadata": {"labels": {"app": name}},
            "spec": {"containers": [{"name": "app", "image": "x:1"}]}}}
    }))
    .unwrap();
    let rs = r.create(&PostParams::default(), &rs).await.unwrap();
    for i in 0..2 {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-pod{i}"), "labels": {"app": name},
                "ownerReferences": owned("ReplicaSet", "apps/v1", &format!("{name}-rs"), rs.metadata.uid.as_deref().unwrap())},
            "spec": {"containers": [{"name": "app", "image": "x:1"}]}
        }))
        .unwrap();
        p.create(&PostParams::default(), &pod).await.unwrap();
    }
    (d, r, p)
}

#[tokio::test]
async fn garbage_collection_background_foreground_orphan() {
    let (_sim, client) = sim().await;
    let (d, r, p) = chain(&client, "bg").await;
    d.delete("bg", &DeleteParams::background()).await.unwrap();
    assert!(r.get_opt("bg-rs").await.unwrap().is_none());
    assert_eq!(
        p.list(&ListParams::default().labels("app=bg"))
            .await
            .unwrap()
            .items
            .len(),
        0
    );

    // Foreground: the owner is marked first and disappears after its
    // dependents; a watcher sees that order.
    let (d, r, p) = chain(&client, "fg").await;
    let rv = d
        .get("fg")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = d
        .watch(
            &WatchParams::default()
                .fields("metadata.name=fg")
                .disable_bookmarks(),
            &rv,
        )
        .await
        .unwrap()
        .boxed();
    d.delete("fg", &DeleteParams::foreground()).await.unwrap();
    let marked = match timeout(WAIT, w.next()).await.unwrap().unwrap().unwrap() {
        WatchEvent::Modified(x) => x,
        other => panic!("expected the owner to be marked first, got {other:?}"),
    };
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert!(
        marked
            .metadata
            .finalizers
            .unwrap()
            .contains(&"foregroundDeletion".to_string())
    );
    match timeout(WAIT, w.next()).await.unwrap().unwrap().unwrap() {
        WatchEvent::Deleted(_) => {}
        other => panic!("expected the owner deleted, got {other:?}"),
    }
    assert!(r.get_opt("fg-rs").await.unwrap().is_none());
    assert_eq!(
        p.list(&ListParams::default().labels("app=fg"))
            .await
            .unwrap()
            .items
            .len(),
        0
    );

    // Orphan: dependents stay, without the owner reference.
    let (d, r, _p) = chain(&client, "or").await;
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..Default::default()
    };
    d.delete("or", &dp).await.unwrap();
    let rs = r.get("or-rs").await.unwrap();
    assert!(rs.metadata.owner_references.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn bound_pods_terminate_gracefully_unbound_ones_go_at_once() {
    let (_sim, client) = sim_with(SimConfig {
        pod_termination: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let make = |name: &str, node: Option<&str>| -> Pod {
        let mut spec = json!({"containers": [{"name": "app", "image": "x:1"}]});
        if let Some(n) = node {
            spec["nodeName"] = json!(n);
        }
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
    };
    pods.create(&PostParams::default(), &make("bound", Some("node-1")))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &make("unbound", None))
        .await
        .unwrap();

    let rv = pods
        .get("bound")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = pods
        .watch(
            &WatchParams::default()
                .fields("metadata.name=bound")
                .disable_bookmarks(),
            &rv,
        )
        .await
        .unwrap()
        .boxed();
    let answer = pods
        .delete("bound", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = answer.left().expect("the terminating pod is returned");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(30));
    match timeout(WAIT, w.next()).await.unwrap().unwrap().unwrap() {
        WatchEvent::Modified(p) => assert!(p.metadata.deletion_timestamp.is_some()),
        other => panic!("expected the pod marked terminating, got {other:?}"),
    }
    match timeout(WAIT, w.next()).await.unwrap().unwrap().unwrap() {
        WatchEvent::Deleted(_) => {}
        other => panic!("expected the pod gone, got {other:?}"),
    }

    pods.delete("unbound", &DeleteParams::default())
        .await
        .unwrap();
    assert!(pods.get_opt("unbound").await.unwrap().is_none());
}

#[tokio::test]
async fn kubelet_style_watch_by_node_name() {
    let (_sim, client) = sim().await;
    let pods: Api<Pod> = Api::all(client.clone());
    let rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = pods
        .watch(
            &WatchParams::default()
                .fields("spec.nodeName=node-1")
                .disable_bookmarks(),
            &rv,
        )
        .await
        .unwrap()
        .boxed();
    let ns: Api<Pod> = Api::namespaced(client, "default");
    for (name, node) in [("on-0", "node-0"), ("on-1", "node-1")] {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "x:1"}]}}))
        .unwrap();
        ns.create(&PostParams::default(), &pod).await.unwrap();
    }
    match timeout(WAIT, w.next()).await.unwrap().unwrap().unwrap() {
        WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("on-1")),
        other => panic!("expected only the pod on node-1, got {other:?}"),
    }
    let on_0 = pods
        .list(&ListParams::default().fields("spec.nodeName=node-0"))
        .await
        .unwrap();
    assert_eq!(on_0.items.len(), 1);
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let (_sim, client) = sim().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut c = cm("held", json!({}));
    c.metadata.finalizers = Some(vec!["keelson.dev/cleanup".into()]);
    api.create(&PostParams::default(), &c).await.unwrap();
    api.delete("held", &DeleteParams::default()).await.unwrap();
    let still = api.get("held").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(api.get_opt("held").await.unwrap().is_none());
}

#[tokio::test]
async fn namespace_deletion_removes_its_contents() {
    let (_sim, client) = sim().await;
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap(),
    )
    .await
    .unwrap();
    let created = ns.get("team").await.unwrap();
    assert_eq!(
        created.metadata.labels.unwrap()["kubernetes.io/metadata.name"],
        "team"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    cms.create(&PostParams::default(), &cm("x", json!({})))
        .await
        .unwrap();
    ns.delete("team", &DeleteParams::default()).await.unwrap();
    assert!(ns.get_opt("team").await.unwrap().is_none());
    let all: Api<ConfigMap> = Api::all(client);
    assert!(
        all.list(&ListParams::default().fields("metadata.namespace=team"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn injected_errors_latency_and_request_counts() {
    let (sim, client) = sim().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let all: Api<Pod> = Api::all(client.clone());
    pods.list(&ListParams::default()).await.unwrap();
    all.list(&ListParams::default()).await.unwrap();
    pods.get_opt("missing").await.unwrap();
    let m = sim.metrics();
    assert_eq!(m.count(Verb::List, "pods", Some("default")), 1);
    assert_eq!(m.count(Verb::List, "pods", None), 1);
    assert_eq!(m.count(Verb::Get, "pods", Some("default")), 1);
    assert_eq!(m.total(Verb::List, "pods"), 2);

    sim.faults().inject(
        Injection::new("pods", Fault::Status(429))
            .verb(Verb::List)
            .times(1),
    );
    let e = api_status(pods.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (429, "TooManyRequests"));
    pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(m.count(Verb::List, "pods", Some("default")), 3);

    // kube-rs' default client retries a 429 (Retry-After: 1) by itself.
    let retrying = Client::try_from(Config::new(sim.base_url().parse().unwrap())).unwrap();
    let rpods: Api<Pod> = Api::namespaced(retrying, "default");
    sim.faults().inject(
        Injection::new("pods", Fault::Status(429))
            .verb(Verb::List)
            .times(1),
    );
    rpods.list(&ListParams::default()).await.unwrap();
    assert_eq!(m.count(Verb::List, "pods", Some("default")), 5);

    let id = sim.inject("pods", Fault::Status(500));
    let e = api_status(pods.get("x").await.unwrap_err());
    assert_eq!(e.code, 500);
    sim.faults().remove(id);

    sim.inject("configmaps", Fault::Latency(Duration::from_millis(300)));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let t = std::time::Instant::now();
    cms.list(&ListParams::default()).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    sim.faults().clear();

    // The same over HTTP for out-of-process users.
    let body = raw_http(&sim.base_url(), "GET", "/kubesim/metrics", "").await;
    assert!(body.contains("\"resource\":\"pods\""), "{body}");
    let body = raw_http(
        &sim.base_url(),
        "POST",
        "/kubesim/faults",
        r#"{"resource": "secrets", "verb": "get", "status": 500, "times": 1}"#,
    )
    .await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "default");
    assert_eq!(api_status(secrets.get("s").await.unwrap_err()).code, 500);
    assert_eq!(api_status(secrets.get("s").await.unwrap_err()).code, 404);
}

/// One HTTP/1.1 request over a raw socket (tests need no HTTP client crate).
async fn raw_http(base: &str, method: &str, path: &str, body: &str) -> String {
    let addr = base.trim_start_matches("http://").to_string();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn followed_logs_stream_new_lines_until_the_pod_goes() {
    use futures_util::AsyncBufReadExt;
    let (sim, client) = sim().await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
        "spec": {"containers": [{"name": "app", "image": "x:1"}, {"name": "side", "image": "x:1"}]}})).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    // Two containers: the container must be named.
    let e = api_status(pods.logs("p", &LogParams::default()).await.unwrap_err());
    assert_eq!(e.code, 400);
    assert!(
        e.message.contains("choose one of: [app side]"),
        "{}",
        e.message
    );

    sim.logs().append("default", "p", "app", "starting\n");
    let lp = LogParams {
        follow: true,
        container: Some("app".into()),
        ..Default::default()
    };
    let mut lines = pods.log_stream("p", &lp).await.unwrap().lines();
    assert_eq!(
        timeout(WAIT, lines.try_next())
            .await
            .unwrap()
            .unwrap()
            .as_deref(),
        Some("starting")
    );
    sim.logs().append("default", "p", "app", "preOnline done\n");
    assert_eq!(
        timeout(WAIT, lines.try_next())
            .await
            .unwrap()
            .unwrap()
            .as_deref(),
        Some("preOnline done")
    );
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        timeout(WAIT, lines.try_next()).await.unwrap().unwrap(),
        None
    );
}

#[tokio::test]
async fn eviction_respects_disruption_budgets_and_logs_are_served() {
    let (sim, client) = sim().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod =
        serde_json::from_value(json!({"metadata": {"name": "p", "labels": {"app": "a"}},
        "spec": {"nodeName": "node-0", "containers": [{"name": "app", "image": "x:1"}]}}))
        .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.patch_status(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();

    sim.logs()
        .append("default", "p", "app", "line one\nline two\n");
    let log = pods.logs("p", &LogParams::default()).await.unwrap();
    assert_eq!(log, "line one\nline two\n");
    let tail = pods
        .logs(
            "p",
            &LogParams {
                tail_lines: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(tail, "line two\n");

    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({"metadata": {"name": "b"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "a"}}}}))
    .unwrap();
    pdbs.create(&PostParams::default(), &pdb).await.unwrap();
    let e = api_status(pods.evict("p", &EvictParams::default()).await.unwrap_err());
    assert_eq!(e.code, 429);
    // The disruption controller's verdict allows one.
    pdbs.patch_status("b", &PatchParams::default(),
        &Patch::Merge(json!({"status": {"observedGeneration": 1, "disruptionsAllowed": 1, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1}})))
        .await
        .unwrap();
    pods.evict("p", &EvictParams::default()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while pods.get_opt("p").await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "evicted pod never went away"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = pdbs.get("b").await.unwrap();
    assert_eq!(b.status.unwrap().disruptions_allowed, 0);
}
