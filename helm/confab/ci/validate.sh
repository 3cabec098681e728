#!/usr/bin/env bash
# Lints and renders the chart with several value sets, checks the rendered
# objects, and validates them against the Kubernetes API schemas. Needs no
# cluster and no helm binary: helm-python-sdk bundles Helm's Go library.
#
# Usage: helm/confab/ci/validate.sh
# The Python environment lives in $HELM_VENV (default /tmp/helmvenv); it is
# created, with its two packages, when missing (that step needs PyPI).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${HELM_VENV:-/tmp/helmvenv}"
if ! "$venv/bin/python" -c 'import helm_python, kubernetes_validate' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet helm-python-sdk kubernetes-validate
fi
exec "$venv/bin/python" "$here/validate.py" "$here/.."
