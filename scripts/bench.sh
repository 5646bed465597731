#!/usr/bin/env bash
# Runs every benchmark; each prints one JSON line of figures.
# `--smoke` runs them at a small size (what CI does); without it, full size.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keelson-target}"
args=("$@")

cargo run --quiet --release --locked -p keelson-cli --example render_bench -- "${args[@]}"
cargo run --quiet --release --locked -p keelson-server --example api_bench -- "${args[@]}"
cargo bench --quiet --locked -p keelson-hosts --bench host_bench -- "${args[@]}"
cargo run --quiet --release --locked -p keelson-agent --example bench -- "${args[@]}"
cargo run --quiet --release --locked -p kubesim --example load_bench -- "${args[@]}"
cargo run --quiet --release --locked -p kubesim --example controllers_bench -- "${args[@]}"
# release_bench runs the keelson-release-hostd binary it finds next to its own directory.
cargo build --quiet --release --locked -p keelson-release --bins
cargo run --quiet --release --locked -p keelson-release --example release_bench -- "${args[@]}"
