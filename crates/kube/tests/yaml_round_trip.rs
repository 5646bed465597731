//! What `yaml_out` writes reads back as exactly the same JSON, for rendered
//! objects and for arbitrary strings a profile could carry into them.

use std::path::Path;

use keelson_core::profile::{self, yaml};
use keelson_kube::{RenderRequest, Track, render, yaml_out};
use proptest::prelude::*;
use serde_json::{Value, json};

fn read_back(text: &str) -> Vec<Value> {
    // The stream is `---`-separated documents; the profile parser takes one.
    text.split("---\n")
        .filter(|d| !d.is_empty())
        .map(|d| yaml::to_json(&yaml::parse(d).unwrap().root))
        .collect()
}

#[test]
fn rendered_examples_read_back_unchanged() {
    for (app, env) in [("orders", "prod"), ("orders", "test"), ("hello", "prod")] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(app)
            .join("app.yaml");
        let profile = profile::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        let request = RenderRequest {
            env,
            version: "1.4.2",
            track: Track::Blue,
            cluster: None,
            agent_image: "registry.example.com/keelson/keelson-agent:0.1.0",
            authorization_url: Some("http://keelson:8080"),
            revision: Some(1),
        };
        let objects = render(&profile, &request).unwrap();
        assert_eq!(read_back(&yaml_out::documents(&objects)), objects);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn any_string_reads_back(key in "\\PC{0,12}", value in any::<String>(), lines in proptest::collection::vec("[ -~\\t]{0,10}", 0..4)) {
        let multi = lines.join("\n") + "\n";
        let object = json!({"k": {"value": value, "multi": multi, "list": [value.clone(), "x"]}, "named": {key.clone(): 1}});
        let text = yaml_out::documents(std::slice::from_ref(&object));
        prop_assert_eq!(read_back(&text), vec![object], "{}", text);
    }
}
