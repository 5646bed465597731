//! How an environment's overrides combine with the base spec.

use keelson_core::profile::{self, FailedInstancePolicyKind, Strategy};

const BASE: &str = r#"
apiVersion: keelson.dev/v1alpha1
kind: App
metadata: {name: orders}
spec:
  team: payments
  owners: [alice@example.com]
  command: ["/bin/orders"]
  image: registry.example.com/orders
  checkurl: {port: 8080, path: /checkurl, timeout: 3s}
  resources:
    requests: {cpu: 500m, memory: 1Gi}
    limits: {cpu: "2", memory: 1Gi}
  env: {A: base, B: base}
  release:
    strategy: dual-deployment
    batches: {count: 3}
    failedInstances: {policy: recreate, maxAttempts: 3}
  hooks:
    preOnline: {script: warm.sh, timeout: 30s}
  environments:
    prod:
      targets: [{cluster: prod-a}]
      replicas: 4
      resources:
        limits: {memory: 2Gi}
      env: {B: prod, C: prod}
      checkurl: {path: /ready}
      release:
        batches: {size: 1}
        failedInstances: {policy: tolerate, maxRatio: 0.25}
      hooks:
        preOnline: {command: "curl -fsS localhost:8080/warm"}
    test:
      targets: [{hostGroup: test-vms}]
      replicas: 1
      artifact: /srv/artifacts/orders.jar
"#;

#[test]
fn mappings_merge_and_choices_replace_whole() {
    let profile = profile::parse(BASE).unwrap();
    let prod = profile.effective("prod").unwrap();
    let resources = prod.run.resources.clone().unwrap();
    assert_eq!(
        resources
            .limits
            .as_ref()
            .unwrap()
            .memory
            .as_ref()
            .unwrap()
            .to_string(),
        "2Gi"
    );
    assert_eq!(
        resources
            .limits
            .as_ref()
            .unwrap()
            .cpu
            .as_ref()
            .unwrap()
            .to_string(),
        "2",
        "untouched sibling kept"
    );
    assert_eq!(
        resources.requests.unwrap().memory.unwrap().to_string(),
        "1Gi"
    );
    let env = prod.env_vars();
    assert_eq!(
        (env["A"].as_str(), env["B"].as_str(), env["C"].as_str()),
        ("base", "prod", "prod")
    );
    let checkurl = prod.checkurl();
    assert_eq!(
        (
            checkurl.port,
            checkurl.path.as_str(),
            checkurl.timeout_seconds
        ),
        (8080, "/ready", 3)
    );
    let release = prod.run.release.clone().unwrap();
    assert_eq!(
        release.strategy,
        Some(Strategy::DualDeployment),
        "kept from the base"
    );
    let batches = release.batches.unwrap();
    assert_eq!(
        (batches.count, batches.size),
        (None, Some(1)),
        "a choice replaces whole"
    );
    let failed = release.failed_instances.unwrap();
    assert_eq!(failed.policy, Some(FailedInstancePolicyKind::Tolerate));
    assert_eq!(
        failed.max_attempts, None,
        "no leftover parameter of the base policy"
    );
    let hook = prod.hooks().pre_online.unwrap();
    assert_eq!(
        (hook.script, hook.timeout),
        (None, None),
        "the hook is replaced whole"
    );

    let test = profile.effective("test").unwrap();
    assert_eq!(
        test.run.artifact.as_deref(),
        Some("/srv/artifacts/orders.jar")
    );
    assert_eq!(test.env_vars()["B"], "base");
    assert_eq!(test.replicas, 1);
    assert!(profile.effective("staging").is_none());
}

#[test]
fn errors_in_an_override_point_into_the_environment() {
    let bad = BASE.replace("limits: {memory: 2Gi}", "limits: {memory: 2GB}");
    let errors = profile::parse(&bad).unwrap_err().errors;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0].path,
        "spec.environments.prod.resources.limits.memory"
    );
    assert_eq!(
        (errors[0].line, errors[0].column),
        (26, 26),
        "line and column of `2GB`"
    );
}
