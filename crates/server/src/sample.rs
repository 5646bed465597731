//! Small valid profiles generated in code, for tests, benchmarks and demos.

/// A minimal valid profile for app `name` of `team`, owned by `owners`,
/// running `image` (no tag: a release's version is the tag), in JSON (which
/// is also YAML).
pub fn profile(name: &str, team: &str, owners: &[&str], image: &str) -> String {
    serde_json::json!({
        "apiVersion": "keelson.dev/v1alpha1",
        "kind": "App",
        "metadata": { "name": name, "labels": { "tier": "web" } },
        "spec": {
            "team": team,
            "owners": owners,
            "description": format!("{name}, a sample app"),
            "command": ["./bin/server", "--port", "8080"],
            "image": image,
            "ports": [{ "name": "http", "port": 8080 }],
            "checkurl": { "port": 8080, "path": "/healthz" },
            "environments": {
                "prod": { "replicas": 2, "targets": [{ "cluster": "zone-a" }] }
            }
        }
    })
    .to_string()
}
