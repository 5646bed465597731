//! The controllers, scheduler and kubelets through the real kube-rs client:
//! rollouts, pauses, surge limits, progress deadlines, Endpoints, failure
//! injection, logs, termination and HPA.

use futures_util::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Endpoints, Event, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, Config};
use kubesim::controllers::ControllerConfig;
use kubesim::{Sim, SimConfig};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(15);

async fn sim_with(cc: ControllerConfig) -> (Sim, Client) {
    let sim = Sim::start(SimConfig {
        controllers: Some(cc),
        ..SimConfig::default()
    })
    .await
    .expect("start kubesim");
    let client = Client::try_from(Config::new(sim.base_url().parse().unwrap())).unwrap();
    (sim, client)
}

async fn sim() -> (Sim, Client) {
    sim_with(ControllerConfig::default()).await
}

/// Polls `check` until it yields a value, or panics after [`WAIT`].
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn deployment(name: &str, replicas: i32, extra: Value) -> Deployment {
    let mut d = json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name, "keelson.dev/traffic": "live"}},
                "spec": {"containers": [{"name": "app", "image": "registry/app:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8901}}}]}}
        }
    });
    json_patch::merge(&mut d, &extra);
    serde_json::from_value(d).unwrap()
}

mod json_patch {
    use serde_json::Value;
    /// RFC 7386 merge, enough to tweak the test objects.
    pub fn merge(target: &mut Value, patch: &Value) {
        if let Value::Object(p) = patch {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        } else {
            *target = patch.clone();
        }
    }
}

fn cond<'a>(
    d: &'a Deployment,
    t: &str,
) -> Option<&'a k8s_openapi::api::apps::v1::DeploymentCondition> {
    d.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t)
}

/// Waits until the Deployment's rollout is complete, as `kubectl rollout
/// status` judges it.
async fn rolled_out(api: &Api<Deployment>, name: &str) -> Deployment {
    until(&format!("{name} rolled out"), || async {
        let d = api.get(name).await.ok()?;
        let s = d.status.as_ref()?;
        let want = d.spec.as_ref()?.replicas.unwrap_or(1);
        (s.observed_generation? >= d.metadata.generation?
            && s.updated_replicas.unwrap_or(0) == want
            && s.replicas.unwrap_or(0) == want
            && s.available_replicas.unwrap_or(0) == want
            && cond(&d, "Progressing")
                .is_some_and(|c| c.reason.as_deref() == Some("NewReplicaSetAvailable"))
            && cond(&d, "Available").is_some_and(|c| c.status == "True"))
        .then_some(d)
    })
    .await
}

fn set_image(image: &str) -> Patch<Value> {
    Patch::Strategic(
        json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}}),
    )
}

async fn replica_sets(client: &Client, app: &str) -> Vec<ReplicaSet> {
    let api: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let mut l = api
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items;
    l.sort_by_key(|r| {
        r.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("deployment.kubernetes.io/revision"))
            .cloned()
    });
    l
}

fn pod_is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn deployment_rolls_out_and_updates() {
    let (_sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &deployment("web", 3, json!({})))
        .await
        .unwrap();
    let d = rolled_out(&api, "web").await;
    assert_eq!(
        d.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"],
        "1"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    assert_eq!(list.len(), 3);
    let mut nodes: Vec<String> = list
        .iter()
        .map(|p| p.spec.as_ref().unwrap().node_name.clone().unwrap())
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "three pods spread over three zones");
    let rss = replica_sets(&client, "web").await;
    assert_eq!(rss.len(), 1);
    let hash = rss[0].metadata.labels.as_ref().unwrap()["pod-template-hash"].clone();
    assert_eq!(
        rss[0].metadata.name.as_deref(),
        Some(format!("web-{hash}").as_str())
    );
    for p in &list {
        assert!(pod_is_ready(p));
        let s = p.status.as_ref().unwrap();
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert!(s.pod_ip.as_deref().is_some_and(|ip| ip.starts_with("10.")));
        assert_eq!(
            p.metadata.labels.as_ref().unwrap()["pod-template-hash"],
            hash
        );
    }

    api.patch("web", &PatchParams::default(), &set_image("registry/app:2"))
        .await
        .unwrap();
    let d = rolled_out(&api, "web").await;
    assert_eq!(
        d.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"],
        "2"
    );
    let rss = replica_sets(&client, "web").await;
    assert_eq!(rss.len(), 2);
    assert_eq!(
        rss[0].spec.as_ref().unwrap().replicas,
        Some(0),
        "old ReplicaSet scaled down"
    );
    assert_eq!(rss[1].spec.as_ref().unwrap().replicas, Some(3));
    let list = until("old pods gone", || async {
        let l = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?
            .items;
        (l.len() == 3).then_some(l)
    })
    .await;
    for p in &list {
        assert_eq!(
            p.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("registry/app:2")
        );
    }

    // The scale subresource drives spec.replicas and the pods follow.
    api.patch_scale(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .unwrap();
    let d = rolled_out(&api, "web").await;
    assert_eq!(d.status.unwrap().ready_replicas, Some(5));

    // Events as the real components record them.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for r in [
        "ScalingReplicaSet",
        "SuccessfulCreate",
        "SuccessfulDelete",
        "Scheduled",
        "Pulling",
        "Pulled",
        "Created",
        "Started",
        "Killing",
    ] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }
}

#[tokio::test]
async fn paused_deployment_holds_until_resumed() {
    let (_sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &deployment("held", 2, json!({})))
        .await
        .unwrap();
    rolled_out(&api, "held").await;
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": true}})),
    )
    .await
    .unwrap();
    let d = api
        .patch(
            "held",
            &PatchParams::default(),
            &set_image("registry/app:2"),
        )
        .await
        .unwrap();
    let generation = d.metadata.generation.unwrap();
    let d = until("paused status observed", || async {
        let d = api.get("held").await.ok()?;
        (d.status.as_ref()?.observed_generation? >= generation).then_some(d)
    })
    .await;
    let c = cond(&d, "Progressing").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_deref()),
        ("Unknown", Some("DeploymentPaused"))
    );
    assert_eq!(
        replica_sets(&client, "held").await.len(),
        1,
        "no new ReplicaSet while paused"
    );
    assert_eq!(d.status.as_ref().unwrap().updated_replicas, None);

    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": false}})),
    )
    .await
    .unwrap();
    rolled_out(&api, "held").await;
    assert_eq!(replica_sets(&client, "held").await.len(), 2);
}

/// Follows the pods of `app` through a watch and checks `invariant` on the
/// pod set after every event, until `done` holds for the Deployment.
async fn watch_pods_during(
    client: &Client,
    app: &str,
    mut invariant: impl FnMut(&BTreeMap<String, Pod>) + Send,
    done: impl Future<Output = ()>,
) -> usize {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut stream = watcher(
        pods,
        watcher::Config::default().labels(&format!("app={app}")),
    )
    .boxed();
    let mut state: BTreeMap<String, Pod>;
    let mut init: BTreeMap<String, Pod> = BTreeMap::new();
    let mut steps = 0;
    // Wait for the initial list before the change starts.
    loop {
        match timeout(WAIT, stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Init => init.clear(),
            watcher::Event::InitApply(p) => {
                init.insert(p.metadata.name.clone().unwrap(), p);
            }
            watcher::Event::InitDone => {
                state = std::mem::take(&mut init);
                invariant(&state);
                break;
            }
            _ => {}
        }
    }
    tokio::pin!(done);
    let deadline = tokio::time::sleep(WAIT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut done => return steps,
            _ = &mut deadline => panic!("rollout did not finish"),
            ev = stream.try_next() => match ev.unwrap().unwrap() {
                watcher::Event::Apply(p) => {
                    state.insert(p.metadata.name.clone().unwrap(), p);
                    steps += 1;
                    invariant(&state);
                }
                watcher::Event::Delete(p) => {
                    state.remove(p.metadata.name.as_deref().unwrap());
                    steps += 1;
                    invariant(&state);
                }
                _ => {}
            }
        }
    }
}

fn live(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
}

#[tokio::test]
async fn rolling_update_respects_surge_and_unavailable_at_every_step() {
    let (_sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let strategy = json!({"spec": {"strategy": {"type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}}}});
    api.create(&PostParams::default(), &deployment("roll", 4, strategy))
        .await
        .unwrap();
    rolled_out(&api, "roll").await;
    let mut max_live = 0;
    let mut min_ready = usize::MAX;
    let mut saw_new = false;
    let steps = watch_pods_during(
        &client,
        "roll",
        |pods| {
            let live_pods = pods.values().filter(|p| live(p)).count();
            let ready = pods.values().filter(|p| live(p) && pod_is_ready(p)).count();
            saw_new |= pods.values().any(|p| {
                p.spec.as_ref().unwrap().containers[0].image.as_deref() == Some("registry/app:2")
            });
            max_live = max_live.max(live_pods);
            min_ready = min_ready.min(ready);
            assert!(
                live_pods <= 5,
                "more than replicas + maxSurge pods: {live_pods}"
            );
            assert!(
                ready >= 3,
                "fewer than replicas - maxUnavailable ready pods: {ready}"
            );
        },
        async {
            api.patch(
                "roll",
                &PatchParams::default(),
                &set_image("registry/app:2"),
            )
            .await
            .unwrap();
            rolled_out(&api, "roll").await;
        },
    )
    .await;
    assert!(
        saw_new && steps > 8,
        "the rollout went through steps ({steps})"
    );
    assert_eq!(max_live, 5, "the surge was used");
    assert_eq!(min_ready, 3, "the unavailability budget was used");
}

#[tokio::test]
async fn recreate_stops_old_pods_before_starting_new_ones() {
    let (_sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.create(
        &PostParams::default(),
        &deployment(
            "rec",
            3,
            json!({"spec": {"strategy": {"type": "Recreate", "rollingUpdate": null}}}),
        ),
    )
    .await
    .unwrap();
    rolled_out(&api, "rec").await;
    let image = |p: &Pod| {
        p.spec.as_ref().unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    };
    watch_pods_during(
        &client,
        "rec",
        |pods| {
            let images: std::collections::BTreeSet<String> = pods.values().map(image).collect();
            assert!(images.len() <= 1, "old and new pods at once: {images:?}");
        },
        async {
            api.patch("rec", &PatchParams::default(), &set_image("registry/app:2"))
                .await
                .unwrap();
            rolled_out(&api, "rec").await;
        },
    )
    .await;
}

#[tokio::test]
async fn never_ready_pod_stalls_the_rollout_until_the_progress_deadline() {
    let (_sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let spec = json!({"spec": {"progressDeadlineSeconds": 1,
        "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}}});
    api.create(&PostParams::default(), &deployment("stall", 2, spec))
        .await
        .unwrap();
    rolled_out(&api, "stall").await;
    api.patch(
        "stall",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations": {"kubesim.keelson.dev/never-ready": "true"}}}}})),
    )
    .await
    .unwrap();
    let d = until("ProgressDeadlineExceeded", || async {
        let d = api.get("stall").await.ok()?;
        cond(&d, "Progressing")
            .is_some_and(|c| {
                c.reason.as_deref() == Some("ProgressDeadlineExceeded") && c.status == "False"
            })
            .then_some(d)
    })
    .await;
    let s = d.status.unwrap();
    assert_eq!(s.updated_replicas, Some(1), "one surge pod, never ready");
    assert_eq!(s.available_replicas, Some(2), "the old pods still serve");
    let rss = replica_sets(&client, "stall").await;
    assert_eq!(rss[0].spec.as_ref().unwrap().replicas, Some(2));
    assert_eq!(rss[1].spec.as_ref().unwrap().replicas, Some(1));
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let unhealthy = events
        .list(&ListParams::default().fields("reason=Unhealthy"))
        .await
        .unwrap()
        .items;
    assert!(!unhealthy.is_empty(), "the probe failure is an Event");
}

#[tokio::test]
async fn endpoints_follow_readiness_and_the_traffic_label() {
    let (sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &deployment("ep", 2, json!({})))
        .await
        .unwrap();
    rolled_out(&api, "ep").await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    svcs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "ep"}, "spec": {
            "selector": {"app": "ep", "keelson.dev/traffic": "live"},
            "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}}))
        .unwrap(),
    )
    .await
    .unwrap();
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    let counts = |e: &Endpoints| {
        let s = e.subsets.as_ref().and_then(|s| s.first());
        (
            s.and_then(|s| s.addresses.as_ref()).map_or(0, Vec::len),
            s.and_then(|s| s.not_ready_addresses.as_ref())
                .map_or(0, Vec::len),
        )
    };
    let e = until("two ready endpoints", || async {
        let e = eps.get("ep").await.ok()?;
        (counts(&e) == (2, 0)).then_some(e)
    })
    .await;
    assert_eq!(
        e.subsets.unwrap()[0].ports.as_ref().unwrap()[0].port,
        8080,
        "named targetPort resolved"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels("app=ep"))
        .await
        .unwrap()
        .items;
    let (a, b) = (
        list[0].metadata.name.clone().unwrap(),
        list[1].metadata.name.clone().unwrap(),
    );

    sim.set_ready("default", &a, false);
    until("one ready, one not", || async {
        (counts(&eps.get("ep").await.ok()?) == (1, 1)).then_some(())
    })
    .await;
    let p = pods.get(&a).await.unwrap();
    assert!(!pod_is_ready(&p));
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slice = until("slice follows", || async {
        let l = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=ep"))
            .await
            .ok()?
            .items;
        let s = l.into_iter().next()?;
        let not_ready = s
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(false))
            .count();
        (not_ready == 1 && s.endpoints.len() == 2).then_some(s)
    })
    .await;
    assert_eq!(slice.address_type, "IPv4");

    pods.patch(
        &b,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"keelson.dev/traffic": "idle"}}})),
    )
    .await
    .unwrap();
    until("idle pod leaves", || async {
        (counts(&eps.get("ep").await.ok()?) == (0, 1)).then_some(())
    })
    .await;
    sim.set_ready("default", &a, true);
    until("ready again", || async {
        (counts(&eps.get("ep").await.ok()?) == (1, 0)).then_some(())
    })
    .await;
}

fn bare_pod(name: &str, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry/app:1",
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8901}}}]}
    }))
    .unwrap()
}

#[tokio::test]
async fn failure_injection_by_annotation() {
    let (_sim, client) = sim().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    pods.create(
        &pp,
        &bare_pod(
            "crash",
            json!({"kubesim.keelson.dev/crash-after": "0.2", "kubesim.keelson.dev/exit-code": "3"}),
        ),
    )
    .await
    .unwrap();
    pods.create(&pp, &bare_pod("nostart", json!({"kubesim.keelson.dev/fail-start": "true", "kubesim.keelson.dev/exit-code": "127"})))
        .await
        .unwrap();
    pods.create(
        &pp,
        &bare_pod(
            "unready",
            json!({"kubesim.keelson.dev/never-ready": "true"}),
        ),
    )
    .await
    .unwrap();
    pods.create(&pp, &bare_pod("fine", json!({})))
        .await
        .unwrap();

    let cs = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first().cloned())
    };
    let crashed = until("crash restarts", || async {
        let p = pods.get("crash").await.ok()?;
        (cs(&p)?.restart_count >= 2).then_some(p)
    })
    .await;
    let term = cs(&crashed)
        .unwrap()
        .last_state
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(term.exit_code, 3);
    assert_eq!(term.reason.as_deref(), Some("Error"));

    let nostart = until("fail-start back-off", || async {
        let p = pods.get("nostart").await.ok()?;
        (cs(&p)?.restart_count >= 1).then_some(p)
    })
    .await;
    let c = cs(&nostart).unwrap();
    assert!(!c.started.unwrap_or(false));
    assert_eq!(
        c.state.unwrap().waiting.unwrap().reason.as_deref(),
        Some("CrashLoopBackOff")
    );
    assert_eq!(c.last_state.unwrap().terminated.unwrap().exit_code, 127);
    assert_ne!(nostart.status.unwrap().phase.as_deref(), Some("Running"));

    until("fine is ready", || async {
        pod_is_ready(&pods.get("fine").await.ok()?).then_some(())
    })
    .await;
    // "fine" started after "unready" and is ready: "unready" has had its chance.
    let unready = until("unready runs", || async {
        let p = pods.get("unready").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await;
    assert!(!pod_is_ready(&unready));
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let has = |reason: &'static str, pod: &'static str| {
        let events = events.clone();
        async move {
            events
                .list(
                    &ListParams::default()
                        .fields(&format!("reason={reason},involvedObject.name={pod}")),
                )
                .await
                .ok()
                .is_some_and(|l| !l.items.is_empty())
                .then_some(())
        }
    };
    until("Unhealthy event", || has("Unhealthy", "unready")).await;
    until("BackOff event", || has("BackOff", "crash")).await;
    until("Failed event", || has("Failed", "nostart")).await;
}

#[tokio::test]
async fn logs_follow_container_output() {
    let (_sim, client) = sim().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(
        &PostParams::default(),
        &bare_pod("talker", json!({"kubesim.keelson.dev/crash-after": "0.3"})),
    )
    .await
    .unwrap();
    until("talker started", || async {
        let p = pods.get("talker").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    let stream = pods
        .log_stream(
            "talker",
            &LogParams {
                follow: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut lines = stream.lines();
    let first = timeout(WAIT, lines.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.contains("container started"), "{first}");
    // The crash happens after the stream opened: follow delivers it.
    let line = timeout(WAIT, async {
        loop {
            let l = lines.try_next().await.unwrap().expect("stream ended");
            if l.contains("exited with code") {
                return l;
            }
        }
    })
    .await
    .expect("the crash line arrives");
    assert!(line.ends_with("exited with code 1"), "{line}");
}

#[tokio::test]
async fn graceful_termination_runs_pre_stop_and_goes_unready() {
    let (_sim, client) = sim().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut p = bare_pod("stopper", json!({}));
    let spec = p.spec.as_mut().unwrap();
    spec.termination_grace_period_seconds = Some(30);
    spec.containers[0].lifecycle = Some(
        serde_json::from_value(json!({"preStop": {"exec": {"command": ["sh", "-c", "sleep 1"]}}}))
            .unwrap(),
    );
    pods.create(&PostParams::default(), &p).await.unwrap();
    until("ready", || async {
        pod_is_ready(&pods.get("stopper").await.ok()?).then_some(())
    })
    .await;
    pods.delete("stopper", &DeleteParams::default())
        .await
        .unwrap();
    // During the preStop hook the pod is terminating and not ready.
    let t = until("terminating, unready", || async {
        let p = pods.get("stopper").await.ok()?;
        (p.metadata.deletion_timestamp.is_some() && !pod_is_ready(&p)).then_some(p)
    })
    .await;
    assert_eq!(t.metadata.deletion_grace_period_seconds, Some(30));
    until("removed", || async {
        pods.get_opt("stopper").await.ok()?.is_none().then_some(())
    })
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let killing = events
        .list(&ListParams::default().fields("reason=Killing,involvedObject.name=stopper"))
        .await
        .unwrap()
        .items;
    assert_eq!(
        killing[0].message.as_deref(),
        Some("Stopping container app")
    );
}

#[tokio::test]
async fn hpa_status_follows_the_simulated_metric() {
    let (sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &deployment("auto", 2, json!({})))
        .await
        .unwrap();
    rolled_out(&api, "auto").await;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), "default");
    hpas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "auto"}, "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "auto"},
            "minReplicas": 1, "maxReplicas": 5,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 50}}}]}}))
        .unwrap(),
    )
    .await
    .unwrap();
    sim.set_metric("default", "auto", 100.0);
    let h = until("hpa scaled", || async {
        let h = hpas.get("auto").await.ok()?;
        (h.status.as_ref()?.desired_replicas == 4).then_some(h)
    })
    .await;
    assert!(h.status.unwrap().last_scale_time.is_some());
    let d = rolled_out(&api, "auto").await;
    assert_eq!(d.spec.unwrap().replicas, Some(4));
    sim.set_metric("default", "auto", 500.0);
    until("capped at max", || async {
        let d = api.get("auto").await.ok()?;
        (d.spec?.replicas == Some(5)).then_some(())
    })
    .await;
}

/// Level-triggered: controllers stopped mid-rollout, with the history they
/// followed compacted away and the Deployment changed meanwhile, converge
/// once started again.
#[tokio::test]
async fn controllers_converge_after_a_restart() {
    let sim = Sim::start(SimConfig::api_only()).await.unwrap();
    let client = Client::try_from(Config::new(sim.base_url().parse().unwrap())).unwrap();
    let ctx = kubesim::controllers::Ctx {
        machinery: sim.machinery().clone(),
        logs: sim.logs().clone(),
        control: sim.control().clone(),
        config: ControllerConfig::default(),
    };
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &deployment("again", 3, json!({})))
        .await
        .unwrap();
    let first = tokio_util::sync::CancellationToken::new();
    kubesim::controllers::start(ctx.clone(), first.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    until("a pod", || async {
        let l = pods
            .list(&ListParams::default().labels("app=again"))
            .await
            .ok()?;
        (!l.items.is_empty()).then_some(())
    })
    .await;
    first.cancel();
    api.patch(
        "again",
        &PatchParams::default(),
        &set_image("registry/app:2"),
    )
    .await
    .unwrap();
    sim.compact();
    let second = tokio_util::sync::CancellationToken::new();
    kubesim::controllers::start(ctx, second.clone());
    let d = rolled_out(&api, "again").await;
    assert_eq!(
        d.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"],
        "2"
    );
    let list = until("only new pods", || async {
        let l = pods
            .list(&ListParams::default().labels("app=again"))
            .await
            .ok()?
            .items;
        (l.len() == 3).then_some(l)
    })
    .await;
    for p in &list {
        assert_eq!(
            p.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("registry/app:2")
        );
        assert!(pod_is_ready(p));
    }
    second.cancel();
}

/// The scheduler places pods only on Ready nodes, reports
/// `FailedScheduling` when none is, and binds once one turns Ready; pod IPs
/// come from the node's range.
#[tokio::test]
async fn scheduler_honours_node_readiness() {
    let (sim, client) = sim().await;
    let m = sim.machinery();
    let set_node_ready = |name: &str, ready: bool| {
        let status = if ready { "True" } else { "False" };
        m.patch(
            kubesim::resources::ids::NODES,
            None,
            name,
            kubesim::machinery::PatchKind::Merge,
            &json!({"status": {"conditions": [{"type": "Ready", "status": status, "reason": "KubeletReady"}]}}),
            kubesim::machinery::Sub::Status,
            &Default::default(),
        )
        .unwrap();
    };
    for n in ["node-0", "node-1", "node-2"] {
        set_node_ready(n, false);
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &bare_pod("waiting", json!({})))
        .await
        .unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    until("FailedScheduling", || async {
        let l = events
            .list(
                &ListParams::default()
                    .fields("reason=FailedScheduling,involvedObject.name=waiting"),
            )
            .await
            .ok()?;
        (!l.items.is_empty()).then_some(())
    })
    .await;
    assert!(
        pods.get("waiting")
            .await
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .is_none()
    );
    set_node_ready("node-2", true);
    let p = until("bound to node-2 and running", || async {
        let p = pods.get("waiting").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await;
    assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("node-2"));
    let ip = p.status.unwrap().pod_ip.unwrap();
    assert!(
        ip.starts_with("10.66."),
        "node-2's range is 10.66.0.0/16: {ip}"
    );
    let node = m
        .get(kubesim::resources::ids::NODES, None, "node-2")
        .unwrap();
    assert_eq!(node["spec"]["podCIDR"], "10.66.0.0/16");
}

/// Old ReplicaSets beyond `revisionHistoryLimit` are deleted.
#[tokio::test]
async fn revision_history_is_trimmed() {
    let (_sim, client) = sim().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.create(
        &PostParams::default(),
        &deployment("hist", 1, json!({"spec": {"revisionHistoryLimit": 1}})),
    )
    .await
    .unwrap();
    for v in 2..=4 {
        rolled_out(&api, "hist").await;
        api.patch(
            "hist",
            &PatchParams::default(),
            &set_image(&format!("registry/app:{v}")),
        )
        .await
        .unwrap();
    }
    let d = rolled_out(&api, "hist").await;
    assert_eq!(
        d.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"],
        "4"
    );
    let rss = until("history trimmed to one old ReplicaSet", || async {
        let l = replica_sets(&client, "hist").await;
        (l.len() == 2).then_some(l)
    })
    .await;
    let revs: Vec<String> = rss
        .iter()
        .map(|r| {
            r.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"].clone()
        })
        .collect();
    assert_eq!(revs, ["3", "4"]);
}
