#!/bin/sh
# Builds keelson-agent as one static binary (no NEEDED entries), so it runs
# inside any app image (glibc, musl, distroless).
#
# RUSTFLAGS are set for the explicit target only: without --target they would
# also apply to proc-macros, which cannot be linked statically.
set -eu
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release -p keelson-agent --bin keelson-agent --target "$TARGET"
BIN="${CARGO_TARGET_DIR:-target}/$TARGET/release/keelson-agent"
if readelf -d "$BIN" | grep -q NEEDED; then
  echo "build-agent: $BIN is not static:" >&2
  readelf -d "$BIN" | grep NEEDED >&2
  exit 1
fi
echo "$BIN"
