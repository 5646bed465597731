//! Parses, validates and renders distinct app profiles on one thread and
//! prints one JSON line: how many, how long, profiles per second.
//!
//! `cargo run --release -p keelson-cli --example render_bench [-- --smoke]`

use std::time::Instant;

use keelson_core::profile;
use keelson_kube::{RenderRequest, Track, render, yaml_out};

const TEMPLATE: &str = include_str!("../../../examples/orders/app.yaml");

/// A distinct, valid profile per index: name, heap, replicas, ports and
/// config differ, so no work can be shared between them.
fn profile_text(i: usize) -> String {
    TEMPLATE
        .replace("name: orders", &format!("name: app-{i:05}"))
        .replace("replicas: 6", &format!("replicas: {}", 2 + i % 20))
        .replace("heap: 1Gi", &format!("heap: {}Mi", 512 + (i % 8) * 64))
        .replace("port: 8081", &format!("port: {}", 9000 + i % 1000))
        .replace(
            "server.port=8080",
            &format!("server.port=8080\n        app.index={i}"),
        )
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let count = if smoke { 300 } else { 3000 };
    let texts: Vec<String> = (0..count).map(profile_text).collect();
    let started = Instant::now();
    let mut objects = 0usize;
    let (mut parse_s, mut render_s, mut yaml_s) = (0f64, 0f64, 0f64);
    let mut bytes = 0usize;
    for text in &texts {
        let t0 = Instant::now();
        let profile = match profile::parse(text) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("generated profile is invalid: {e}");
                std::process::exit(1);
            }
        };
        let t1 = Instant::now();
        parse_s += (t1 - t0).as_secs_f64();
        let rendered = render(
            &profile,
            &RenderRequest {
                env: "prod",
                version: "1.0.0",
                track: Track::Blue,
                cluster: None,
                agent_image: "registry.example.com/keelson/keelson-agent:0.1.0",
                authorization_url: Some("http://keelson:8080"),
                revision: Some(1),
            },
        )
        .unwrap_or_else(|e| {
            eprintln!("render failed: {e}");
            std::process::exit(1);
        });
        let t2 = Instant::now();
        render_s += (t2 - t1).as_secs_f64();
        objects += rendered.len();
        bytes += yaml_out::documents(&rendered).len();
        yaml_s += t2.elapsed().as_secs_f64();
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{{\"bench\":\"parse_validate_render\",\"profiles\":{count},\"objects\":{objects},\"yaml_bytes\":{bytes},\"seconds\":{seconds:.3},\"parse_validate_seconds\":{parse_s:.3},\"render_seconds\":{render_s:.3},\"yaml_seconds\":{yaml_s:.3},\"profiles_per_second\":{:.0},\"threads\":1}}",
        count as f64 / seconds
    );
}
