#!/usr/bin/env python3
"""Validates every rendered-manifest snapshot against the Kubernetes 1.28
schema with kubernetes-validate --strict. Exits non-zero on any failure or
when no snapshot is found."""
import glob
import os
import subprocess
import sys
import tempfile

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
snapshots = sorted(glob.glob(os.path.join(root, "crates/kube/tests/snapshots/*.snap")))
if not snapshots:
    sys.exit("no rendered snapshots found under crates/kube/tests/snapshots")

with tempfile.TemporaryDirectory() as tmp:
    files = []
    for snap in snapshots:
        text = open(snap, encoding="utf-8").read()
        # An insta snapshot is a metadata header between two `---` lines,
        # then the rendered stream itself.
        _, _, body = text.split("---\n", 2)
        out = os.path.join(tmp, os.path.basename(snap).replace(".snap", ".yaml"))
        with open(out, "w", encoding="utf-8") as f:
            f.write(body)
        files.append(out)
    result = subprocess.run(
        ["kubernetes-validate", "--strict", "--quiet", "-k", "1.28.0", *files],
        capture_output=True,
        text=True,
    )
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        sys.exit(f"kubernetes-validate failed on the rendered snapshots (exit {result.returncode})")
    objects = sum(open(f, encoding="utf-8").read().count("\napiVersion:") + open(f, encoding="utf-8").read().startswith("apiVersion:") for f in files)
    print(f"validated {len(files)} snapshots ({objects} objects) against Kubernetes 1.28: 0 failed")
