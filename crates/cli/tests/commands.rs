//! The offline commands as a user runs them: exit codes and what they print.

use std::process::Command;

fn keelson(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_reports_every_error_with_file_position_and_path() {
    let (code, stdout, stderr) = keelson(&[
        "validate",
        "examples/hello/app.yaml",
        "examples/invalid/05-many-errors.yaml",
    ]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("examples/hello/app.yaml: valid"),
        "{stdout}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 5, "{stderr}");
    assert!(
        lines[0].starts_with("examples/invalid/05-many-errors.yaml:9:18: metadata.name: "),
        "{stderr}"
    );
}

#[test]
fn validate_json_lists_errors_per_file() {
    let (code, stdout, _) = keelson(&[
        "validate",
        "-o",
        "json",
        "examples/invalid/02-java-headroom.yaml",
    ]);
    assert_eq!(code, 1);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let errors = report["examples/invalid/02-java-headroom.yaml"]
        .as_array()
        .unwrap();
    assert_eq!(
        errors[0]["path"],
        "spec.environments.prod.resources.limits.memory"
    );
    assert_eq!(errors[0]["line"], 20);
}

#[test]
fn render_prints_yaml_and_json() {
    let (code, yaml, stderr) = keelson(&[
        "render",
        "examples/hello/app.yaml",
        "--env",
        "prod",
        "--version",
        "2.0.1",
        "--track",
        "green",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(yaml.starts_with("---\napiVersion: v1\n"));
    assert!(yaml.contains("name: hello-green"));
    let (code, json, _) = keelson(&[
        "render",
        "examples/hello/app.yaml",
        "--env",
        "prod",
        "--version",
        "2.0.1",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(list["kind"], "List");
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["metadata"]["name"] == "hello-blue")
    );
}

#[test]
fn render_refuses_bad_input_with_a_clear_message() {
    let (code, _, stderr) = keelson(&[
        "render",
        "examples/hello/app.yaml",
        "--env",
        "qa",
        "--version",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("environment `qa` is not in the profile; it has: prod"),
        "{stderr}"
    );
    let (code, _, stderr) = keelson(&[
        "render",
        "examples/hello/app.yaml",
        "--env",
        "prod",
        "--version",
        "1",
        "--track",
        "red",
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("`red` is not a track; expected `blue` or `green`"),
        "{stderr}"
    );
    let (code, _, stderr) = keelson(&[
        "render",
        "examples/invalid/03-post-start.yaml",
        "--env",
        "prod",
        "--version",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("spec.hooks.postStart: postStart is not supported"),
        "{stderr}"
    );
    let (code, stdout, stderr) =
        keelson(&["validate", "no/such/file.yaml", "examples/hello/app.yaml"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read no/such/file.yaml"), "{stderr}");
    assert!(
        stdout.contains("examples/hello/app.yaml: valid"),
        "the other files are still checked: {stdout}"
    );
}

#[test]
fn schema_is_json_schema_of_the_profile() {
    let (code, stdout, _) = keelson(&["schema"]);
    assert_eq!(code, 0);
    let schema: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert!(schema["$defs"]["AppSpec"]["properties"]["environments"].is_object());
    assert_eq!(schema["$defs"]["AppSpec"]["additionalProperties"], false);
}
