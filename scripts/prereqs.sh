#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine that has only
# the Rust toolchain, Python, the JDK, PostgreSQL binaries and git.
# Idempotent: what is already there is left alone.
set -euo pipefail

log() { echo "prereqs: $*" >&2; }

if ! command -v kubernetes-validate >/dev/null 2>&1; then
    log "installing kubernetes-validate (PyPI)"
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest (crates.io)"
    cargo install --locked cargo-nextest
fi
