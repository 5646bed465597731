#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need,
# runs every test, validates the rendered manifests against the Kubernetes
# 1.28 schema, and runs each benchmark at its small smoke size.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keelson-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

scripts/prereqs.sh
scripts/kubesim-prereqs.sh

# A throwaway PostgreSQL on loopback for the store and server suites.
eval "$(scripts/pg.sh start)"
trap 'scripts/pg.sh stop' EXIT

cargo build --workspace --all-targets --locked
cargo nextest run --workspace --no-fail-fast --locked
python3 scripts/validate-snapshots.py
scripts/bench.sh --smoke
