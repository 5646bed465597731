//! Runtimes from the stored profile and the host registry: what a start
//! deploys on a host, and a clear refusal for each thing that is missing.

use std::collections::BTreeMap;

use keelson_agent_lifecycle::host::api::Artifact;
use keelson_core::release::{Track, Version};
use keelson_hosts::HostRecord;
use keelson_release::Runtimes as _;
use keelson_release::hosts::DeployTarget;
use keelson_release::profile::{ProfileRuntimes, deploy_fn};
use keelson_store::{ApplyProfile, Store};

const PROFILE: &str = r#"
apiVersion: keelson.dev/v1alpha1
kind: App
metadata: {name: shop}
spec:
  team: web
  owners: [alice]
  runtime: {java: {version: 17, heap: 256Mi}}
  command: ["java", "-jar", "shop.jar"]
  image: registry.example.com/web/shop
  artifact: "/srv/artifacts/shop/{version}.tar.gz"
  ports: [{name: http, port: 8080}]
  checkurl: {port: 8080, path: /ready}
  drain: 3s
  resources: {limits: {memory: 1Gi}}
  env: {JAVA_TOOL_OPTIONS: "-Dshop=1", TZ: UTC}
  hooks:
    preOnline: {script: warm.sh}
  environments:
    prod:
      targets: [{hostGroup: shop-vms}]
      replicas: 2
    k8s:
      targets: [{cluster: prod-a}]
      replicas: 2
"#;

fn allow(_: Option<&keelson_store::AppHead>) -> Result<(), String> {
    Ok(())
}

async fn store_with_profile() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}", dir.path().join("k.db").display()))
        .await
        .unwrap();
    let parsed = keelson_core::profile::parse(PROFILE).unwrap();
    store
        .apply_profile(
            &ApplyProfile {
                name: "shop".into(),
                team: "web".into(),
                owners: vec!["alice".into()],
                labels: BTreeMap::new(),
                description: None,
                text: PROFILE.into(),
                canonical_json: serde_json::to_string(&parsed).unwrap(),
                author: "alice".into(),
                message: None,
                rolled_back_to: None,
            },
            &allow,
        )
        .await
        .unwrap();
    (store, dir)
}

async fn refusal(runtimes: &ProfileRuntimes, app: &str, env: &str) -> String {
    match runtimes.runtime(app, env).await {
        Ok(_) => panic!("{app} in {env} got a runtime"),
        Err(e) => e.0,
    }
}

#[tokio::test]
async fn each_missing_piece_is_named_and_a_complete_one_gets_a_cached_runtime() {
    let (store, dir) = store_with_profile().await;
    let token_file = dir.path().join("host.token");
    std::fs::write(&token_file, "secret").unwrap();
    let token_file = token_file.display().to_string();
    let runtimes = ProfileRuntimes::new(store.clone(), None);
    assert_eq!(
        refusal(&runtimes, "cart", "prod").await,
        "app cart does not exist"
    );
    assert_eq!(
        refusal(&runtimes, "shop", "qa").await,
        "shop has no environment qa; it has: k8s, prod"
    );
    let no_group = refusal(&runtimes, "shop", "k8s").await;
    assert!(
        no_group.contains("environments.k8s.targets[].hostGroup"),
        "{no_group}"
    );
    let no_hosts = refusal(&runtimes, "shop", "prod").await;
    assert!(
        no_hosts.starts_with("host group shop-vms of shop in prod has no hosts")
            && no_hosts.contains("keelson host add"),
        "{no_hosts}"
    );

    let add = |name: &str, group: &str| {
        let host = HostRecord {
            name: name.into(),
            group: group.into(),
            address: "http://127.0.0.1:9".into(),
            token_file: token_file.clone(),
            health: None,
        };
        let store = store.clone();
        async move {
            keelson_hosts::registry::add_host(&store, &host)
                .await
                .unwrap()
        }
    };
    for (name, group) in [
        ("vm-1", "shop-vms"),
        ("vm-2", "shop-vms"),
        ("other", "misc"),
    ] {
        add(name, group).await;
    }
    let first = runtimes.runtime("shop", "prod").await.unwrap();
    let again = runtimes.runtime("shop", "prod").await.unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    assert!(
        format!("{first:?}").contains(r#"hosts: ["vm-1", "vm-2"]"#),
        "{first:?}"
    );

    // A new host in the group makes a new runtime.
    add("vm-3", "shop-vms").await;
    let third = runtimes.runtime("shop", "prod").await.unwrap();
    assert!(!std::sync::Arc::ptr_eq(&first, &third));
}

#[tokio::test]
async fn a_start_deploys_what_the_profile_says_a_version_is() {
    let (store, _dir) = store_with_profile().await;
    let (_, app) = ProfileRuntimes::new(store, None)
        .effective("shop", "prod")
        .await
        .unwrap();
    let deploy = deploy_fn(&app, None).unwrap();
    let version = Version("1.4.2".into());
    let request = deploy(&DeployTarget {
        app: "shop",
        env: "prod",
        host: "vm-1",
        track: Track::Blue,
        version: &version,
        generation: Some(3),
    });
    assert_eq!(
        request.artifact,
        Some(Artifact::Path("/srv/artifacts/shop/1.4.2.tar.gz".into()))
    );
    assert_eq!(request.command, ["java", "-jar", "shop.jar"]);
    assert_eq!(request.hooks_dir.as_deref(), Some("hooks"));
    assert_eq!(request.env["TZ"], "UTC");
    assert_eq!(
        request.env["JAVA_TOOL_OPTIONS"],
        "-Xms256m -Xmx256m -Dshop=1"
    );
    assert_eq!(request.lifecycle.checkurl.port, 8080);
    assert_eq!(request.lifecycle.checkurl.path, "/ready");
    assert_eq!(request.lifecycle.drain_seconds, 3);
    assert!(request.lifecycle.hooks.pre_online.is_some());
    assert!(request.lifecycle.authorization.is_none());
}
