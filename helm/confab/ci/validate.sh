#!/usr/bin/env bash
# Lints and renders the chart with several value sets, checks the rendered
# objects and their cross-references, validates them against the Kubernetes
# API schemas, checks that bad values are refused, and checks the Grafana
# dashboard against the server's metric names. Needs no cluster and no helm
# binary (helm-python-sdk bundles Helm's Go library) and no network once the
# Python environment exists.
#
# Usage: helm/confab/ci/validate.sh
# The Python environment is $HELM_VENV (default: .venv-helm at the repository
# root, which scripts/install-test-deps.sh makes); it is created with the
# pinned packages of requirements.txt when missing (that step needs PyPI).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="${HELM_VENV:-$root/.venv-helm}"
requirements="$here/requirements.txt"
if ! { [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/requirements.installed"; }; then
    echo "validate: $venv: pip install -r $requirements"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.installed"
fi
"$venv/bin/python" "$here/validate.py" "$here/.."
"$venv/bin/python" "$root/deploy/grafana/check_dashboard.py" "$root/deploy/grafana/confab-dashboard.json"
